"""The benchmark harness and the resource report: they run on a CPU and catch what they should."""

import argparse
import io
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from bench import harness
from bench.harness import Case, Context, DeviceInfo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env_without_interpreter():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # bench.resources compiles for real GPUs
    return env


def test_ratios_table_and_saved_results(tmp_path):
    info = DeviceInfo("cpu", "test cpu", "test-cpu")
    slow = Case("op.x", "n", "reference", lambda: time.sleep(0.004), "GB/s", 4e6, baseline=True, min_time_s=0.05)
    fast = Case("op.x", "n", "fast", lambda: time.sleep(0.001), "GB/s", 4e6, min_time_s=0.05)
    results = [harness.measure(c, info) for c in (slow, fast)]
    harness._add_ratios(results, [slow, fast])
    assert results[0].ratio == 1.0 and results[1].ratio > 1.5  # 4 ms vs 1 ms of sleep
    assert results[0].median_ms >= 4.0 and results[1].median_ms >= 1.0
    assert abs(results[0].throughput - 4e6 / (results[0].median_ms * 1e-3) / 1e9) < 1e-9
    table = harness.format_table(results, info)
    assert "op.x" in table and "GB/s" in table
    json_path, png_path = harness.save(results, info, str(tmp_path), ["thing: needs a CUDA GPU"])
    data = json.load(open(json_path))
    assert data["device"]["name"] == "test cpu" and len(data["results"]) == 2
    assert data["skipped"] == ["thing: needs a CUDA GPU"]
    assert os.path.getsize(png_path) > 1000


def test_interleaved_cases_alternate_and_keep_their_ratio():
    calls = []

    def sleeper(name, seconds):
        def fn():
            calls.append(name)
            time.sleep(seconds)
        return fn

    a = Case("op.y", "n", "a", sleeper("a", 0.003), "MB/s", 1e6, baseline=True, min_time_s=0.05, interleave=True)
    b = Case("op.y", "n", "b", sleeper("b", 0.001), "MB/s", 1e6, min_time_s=0.05, interleave=True)
    alone = Case("op.y", "n", "c", sleeper("c", 0.001), "MB/s", 1e6, min_time_s=0.05)  # did not ask
    other = Case("op.z", "n", "d", sleeper("d", 0.001), "MB/s", 1e6, min_time_s=0.05, interleave=True)
    cases = [a, b, alone, other]
    assert harness._interleaved_group(cases, 0) == [a, b]
    assert harness._interleaved_group(cases, 2) == [alone]
    assert harness._interleaved_group(cases, 3) == [other]
    ms_a, ms_b = harness.time_cpu_interleaved([a.fn, b.fn], 0.05)
    assert calls[:2] == ["a", "b"]  # one warm-up call each
    timed = calls[2:]
    # one call of each a round, the round starting with each in turn
    rounds = [timed[i:i + 2] for i in range(0, len(timed), 2)]
    assert rounds == [["a", "b"] if r % 2 == 0 else ["b", "a"] for r in range(len(rounds))]
    assert len(timed) >= 6
    assert ms_a >= 3.0 and ms_b >= 1.0 and ms_a > 1.5 * ms_b


def test_min_rounds_outlasts_min_time():
    calls = []
    ms = harness.time_cpu_interleaved([lambda: calls.append("a"), lambda: calls.append("b")], 0.0, min_rounds=9)
    assert calls == ["a", "b"] + ["a", "b", "b", "a"] * 4 + ["a", "b"]  # the warm-up round, then nine timed ones
    assert len(ms) == 2
    n = []
    harness.time_cpu(lambda: n.append(1), 0.0, min_reps=5)
    assert len(n) == 6


def test_each_round_starts_one_further_on():
    calls = []
    fns = [lambda k=k: calls.append(k) for k in range(3)]
    harness.time_cpu_interleaved(fns, 0.0, min_rounds=6)
    rounds = [calls[i:i + 3] for i in range(3, len(calls), 3)]  # after the warm-up round
    assert rounds == [[0, 1, 2], [1, 2, 0], [2, 0, 1]] * 2


def test_unknown_unit_is_rejected():
    with pytest.raises(ValueError, match="unknown unit"):
        Case("op", "s", "impl", lambda: None, "widgets/s", 1.0)


def test_only_filter():
    ctx = Context("cpu", DeviceInfo("cpu", "x", "x"), only="^layer_norm")
    assert ctx.wants("layer_norm.fwd") and not ctx.wants("attention.fwd")


def test_only_filter_can_pick_one_tokenizer_op():
    pytest.importorskip("tiktoken")
    from bench import cases_tokenizer

    ctx = Context("cpu", DeviceInfo("cpu", "x", "x"), quick=True, only="tokenizer.decode_bytes")
    picked = [c for c in cases_tokenizer.cases(ctx) if ctx.wants(c.op)]
    assert picked and {c.op for c in picked} == {"tokenizer.decode_bytes"}
    assert {c.impl for c in picked} >= {"tiktoken", "fast", "fast[array]"}
    assert not cases_tokenizer.cases(Context("cpu", DeviceInfo("cpu", "x", "x"), only="^layer_norm"))


def test_python_m_bench_runs_on_cpu(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "^model", "--device", "cpu", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "model.train_step" in out.stdout and "tokens/s" in out.stdout
    assert "needs a CUDA GPU" in out.stdout  # says what it could not run here
    saved = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    assert saved and json.load(open(tmp_path / saved[0]))["results"][0]["op"] == "model.train_step"


def test_cli_lists_bench():
    out = subprocess.run([sys.executable, "-m", "gptfast", "--help"], capture_output=True, text=True, check=True)
    assert "bench" in out.stdout
    out = subprocess.run([sys.executable, "-m", "gptfast", "bench", "--help"], capture_output=True, text=True, check=True)
    for flag in ("--quick", "--full", "--dry-run", "--only", "--out", "--no-save", "--device"):
        assert flag in out.stdout
    assert "./bench-results" in " ".join(out.stdout.split())  # --help says where the results go


def test_python_m_bench_and_gptfast_bench_share_their_flags():
    from gptfast.cli import build_parser

    def flags(parser):
        return sorted(o for a in parser._actions for o in a.option_strings)

    ours = argparse.ArgumentParser()
    harness.add_arguments(ours)
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert flags(sub.choices["bench"]) == flags(ours)


# --- the plans and their budgets --------------------------------------------------------------------

def _listing_only(monkeypatch):
    """Make every timer, every case function and the tokenizer's corpus fail if anything touches them."""
    from bench import cases_tokenizer

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run timed or built something")

    for name in ("time_cpu", "time_cpu_interleaved", "time_cuda", "measure", "save", "plot",
                 "measure_copy_bandwidth"):
        monkeypatch.setattr(harness, name, refuse)
    monkeypatch.setattr(cases_tokenizer, "corpus", refuse)
    post_init = Case.__post_init__

    def no_calls(self):
        post_init(self)
        self.fn = refuse

    monkeypatch.setattr(Case, "__post_init__", no_calls)


def _key(case):
    return case.op, case.shape, case.dtype, case.impl


def test_default_plan_on_a_cpu_is_the_quick_plan(monkeypatch):
    _listing_only(monkeypatch)
    default = harness.make_plan("cpu", dry_run=True)
    quick = harness.make_plan("cpu", quick=True, dry_run=True)
    full = harness.make_plan("cpu", quick=False, dry_run=True)
    assert default.name == "quick" and default.ctx.quick
    assert [_key(c) for c in default.cases] == [_key(c) for c in quick.cases]
    assert [_key(c) for c in default.cases] != [_key(c) for c in full.cases]
    ops = {c.op for c in default.cases}
    assert {"tokenizer.encode_ordinary", "model.train_step", "train.step", "generate"} <= ops


def test_default_cpu_plan_declares_a_budget_under_the_limit(monkeypatch):
    # Declared, not measured: a case added to the default plan must fit here, or go under --full.
    _listing_only(monkeypatch)
    plan = harness.make_plan("cpu", dry_run=True)
    assert harness.CPU_DEFAULT_LIMIT_S == 120.0  # a shared 2-core CPU; README and docs/benchmarks.md say so
    assert all(c.budget_s > 0 for c in plan.cases)
    assert plan.budget_s == harness.STARTUP_S + sum(c.budget_s for c in plan.cases)
    assert plan.budget_s <= harness.CPU_DEFAULT_LIMIT_S, harness.format_plan(plan.cases, plan.name)
    full = harness.make_plan("cpu", quick=False, dry_run=True)
    assert full.budget_s > plan.budget_s


def test_a_case_budget_follows_the_timer_rules():
    fn = lambda: None  # noqa: E731
    slow = Case("op", "s", "i", fn, "MB/s", 1.0, call_s=0.5, setup_s=2.0, min_time_s=1.0, min_rounds=7)
    assert slow.budget_s == pytest.approx(2.0 + 0.5 + 7 * 0.5)  # warm-up, then seven rounds
    quick = Case("op", "s", "i", fn, "MB/s", 1.0, call_s=0.01, min_time_s=1.0, min_rounds=7)
    assert quick.budget_s == pytest.approx(0.01 + 1.0 + 0.01)  # warm-up, then min_time_s and one call past
    gpu = Case("op", "s", "i", fn, "GB/s", 1.0, device="cuda", call_s=0.001)
    assert 0.2 < gpu.budget_s < 0.3  # do_bench's 25 ms warm-up and 100 ms of calls


def test_dry_run_runs_nothing_and_lists_every_case_with_its_budget(monkeypatch, tmp_path):
    _listing_only(monkeypatch)
    monkeypatch.chdir(tmp_path)
    plan = harness.make_plan("cpu", dry_run=True)
    out = io.StringIO()
    assert harness.run("cpu", dry_run=True, stream=out) == []
    text = out.getvalue()
    rows = [line for line in text.splitlines() if line[:1].isdigit()]
    assert len(rows) == len(plan.cases)
    for i, (row, case) in enumerate(zip(rows, plan.cases), 1):
        assert row.split()[0] == str(i) and f" {case.op} " in row and f" {case.impl} " in row
        assert f" {case.budget_s:.1f} s" in row
    assert f"declared budget {plan.budget_s:.0f} s" in text
    assert "skipped: layer_norm: needs a CUDA GPU" in text
    assert str(tmp_path / "bench-results") in text  # where a real run would write
    assert os.listdir(tmp_path) == []  # and nothing was written


def test_results_go_to_bench_results_in_the_current_folder(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(REPO)
    assert harness.default_out_dir() == os.path.join(REPO, "bench-results")  # not bench/results
    monkeypatch.chdir(tmp_path)
    assert harness.default_out_dir() == str(tmp_path / "bench-results")
    tiny = [Case("op.tiny", "n", "a", lambda: None, "MB/s", 1e3, baseline=True, min_time_s=0.01),
            Case("op.tiny", "n", "b", lambda: None, "MB/s", 1e3, min_time_s=0.01)]
    monkeypatch.setattr(harness, "discover_cases", lambda ctx, progress=None: list(tiny))
    monkeypatch.setattr(harness, "plot", lambda results, info, path: open(path, "wb").close())
    results = harness.run("cpu")
    assert [r.impl for r in results] == ["a", "b"]
    saved = os.listdir(tmp_path / "bench-results")
    assert len(saved) == 2 and any(f.endswith(".json") for f in saved)
    data = json.load(open(tmp_path / "bench-results" / next(f for f in saved if f.endswith(".json"))))
    assert data["plan"]["name"] == "quick" and data["plan"]["budget_s"] > 0
    err = capsys.readouterr().err
    assert "[1/2] op.tiny n - [a]" in err and "[2/2] op.tiny n - [b]" in err  # progress on stderr


def test_the_tokenizer_cases_need_no_download(monkeypatch):
    pytest.importorskip("tiktoken")
    import tiktoken

    from bench import cases_tokenizer

    def offline(name):
        raise AssertionError(f"tiktoken.get_encoding({name!r}) would download when its cache is empty")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    ctx = Context("cpu", DeviceInfo("cpu", "x", "x"), quick=True, dry_run=True)
    picked = cases_tokenizer.cases(ctx)
    if not picked:
        pytest.skip(reason=f"no tokenizer cases here: {ctx.skipped}")
    assert {c.op for c in picked} == set(cases_tokenizer.OPS)


def test_dry_run_offline_from_any_folder(tmp_path):
    # As on a machine without internet and with an empty tiktoken cache: the plan still lists.
    env = dict(_env_without_interpreter(), PYTHONPATH=os.path.join(REPO, "tests", "offline"),
               TIKTOKEN_CACHE_DIR=str(tmp_path / "empty-cache"))
    out = subprocess.run([sys.executable, "-m", "gptfast", "bench", "--dry-run", "--only", "^tokenizer"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert "tokenizer.encode_ordinary" in out.stdout and "tiktoken" in out.stdout
    assert str(tmp_path / "bench-results") in out.stdout
    assert sorted(os.listdir(tmp_path)) == ["empty-cache"] or os.listdir(tmp_path) == []


# --- bad input: one line, exit 2, before anything runs -------------------------------------------------

def _bad_inputs(tmp_path):
    a_file = tmp_path / "results.json"
    a_file.write_text("{}")
    cases = [
        (["--device", "mps"], "mps"),
        (["--device", "banana"], "banana"),
        (["--device", "cuda:1"], "CUDA_VISIBLE_DEVICES"),
        (["--only", "("], "not a regular expression"),
        (["--only", "no-such-op"], "matches no benchmark"),
        (["--only", "^layer_norm", "--device", "cpu"], "needs a CUDA GPU"),
        (["--out", str(a_file)], "is a file"),
        (["--out", str(a_file / "sub")], "is a file"),
        (["--quick", "--full"], "one of them"),
    ]
    import torch

    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "use --device cpu"))
    return cases


def _one_error_line(err, prog, expected):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: --") and expected in lines[0], lines[0]
    assert "Traceback" not in err


def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    from gptfast import cli

    monkeypatch.chdir(tmp_path)
    for argv, expected in _bad_inputs(tmp_path):
        assert harness.main(argv) == 2, argv
        captured = capsys.readouterr()
        _one_error_line(captured.err, "python -m bench", expected)
        assert cli.main(["bench", *argv]) == 2, argv
        captured = capsys.readouterr()
        _one_error_line(captured.err, "gptfast bench", expected)
        assert "results.json" in os.listdir(tmp_path) and not os.path.exists(tmp_path / "bench-results")


@pytest.mark.parametrize("command", [["-m", "bench"], ["-m", "gptfast", "bench"]],
                         ids=["python -m bench", "gptfast bench"])
def test_bad_device_exits_2_with_one_line(command):
    out = subprocess.run([sys.executable, *command, "--device", "banana"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and out.stdout == ""
    prog = "python -m bench" if command[1] == "bench" else "gptfast bench"
    _one_error_line(out.stderr, prog, "banana")


PROBE = """
import json, sys
import triton, triton.language as tl
from bench.resources import compile_spec, ARCH_LIMITS

@triton.jit
def probe_dot(A, B, C, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    m = tl.arange(0, BLOCK_M)
    n = tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, 4):
        a = tl.load(A + m[:, None] * BLOCK_K + k[None, :] + i)
        b = tl.load(B + k[:, None] * BLOCK_N + n[None, :] + i)
        acc += tl.dot(a, b)
    tl.store(C + m[:, None] * BLOCK_N + n[None, :], acc)

def spec(block, block_k, stages):
    return {"kernel": probe_dot, "signature": {"A": "*fp16", "B": "*fp16", "C": "*fp32", "BLOCK_M": "constexpr",
            "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
            "constexprs": {"BLOCK_M": block, "BLOCK_N": block, "BLOCK_K": block_k}, "num_warps": 4, "num_stages": stages}

small = compile_spec(spec(32, 32, 2), 86)
big = compile_spec(spec(256, 128, 3), 86)
print(json.dumps({"small": small, "big": big, "limit": ARCH_LIMITS[86]["shared"]}))
"""


def _needs_static_compile():
    pytest.importorskip("triton", reason="bench.resources compiles Triton kernels: triton is not installed")
    from bench.resources import static_compile_supported

    if not static_compile_supported():
        import triton

        pytest.skip(reason=f"bench.resources needs triton >= 3.3 to compile for a named GPU (this is {triton.__version__})")


def test_resources_measures_shared_memory_and_flags_overflow(tmp_path):
    _needs_static_compile()
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(PROBE))
    out = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=dict(_env_without_interpreter(), PYTHONPATH=REPO))
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    regs, _, _, shared = r["small"]
    assert regs > 0 and 0 < shared <= r["limit"]
    # 256x128 fp16 tiles of A and B (64 KB each) need far more than sm_86's 99 KB
    assert r["big"][3] > r["limit"]


def test_resources_smoke_run():
    _needs_static_compile()
    from gptfast import ops

    if not any(ops.kernel_module(op)[0] is not None for op in ops.OPS):
        pytest.skip(reason="no Triton kernel module can be imported here (triton missing)")
    out = subprocess.run([sys.executable, "-m", "bench.resources", "--smoke", "--no-cache", "--arch", "86"],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env=_env_without_interpreter())
    assert out.returncode == 0, out.stdout + out.stderr
    assert "sm_86" in out.stdout and "compiled" in out.stdout
    # each row also reads the SASS: blocks per SM, the MMA, the loads and the main loop's length
    head = next(line for line in out.stdout.splitlines() if line.startswith("op "))
    assert all(col in head for col in ("blocks/SM", "MMA", "loads", "main loop")), head
    row = next(line for line in out.stdout.splitlines() if "sm_86" in line)
    at = head.index("blocks/SM")  # the columns are padded to the header's positions
    assert int(row[at:].split()[0]) >= 1, row


def test_batch_fit_searches_the_largest_batch_and_skips_on_a_cpu():
    from bench import cases_batch_fit

    for limit in (0, 1, 3, 16, 17, 300, 512, 10_000):
        tried = []

        def fits(b, limit=limit):
            tried.append(b)
            return b <= limit

        assert cases_batch_fit.largest_batch(fits) == min(limit, cases_batch_fit.MAX_BATCH)
        assert max(tried) <= cases_batch_fit.MAX_BATCH
    ctx = Context("cpu", DeviceInfo("cpu", "x", "x"), quick=True, dry_run=True)
    assert cases_batch_fit.cases(ctx) == []
    assert any(r.startswith("train.batch_fit") and "CUDA" in r for r in ctx.skipped)
