"""The benchmark harness and the resource report: they run on a CPU and catch what they should."""

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
    assert timed[0::2] == ["a"] * (len(timed) // 2) and timed[1::2] == ["b"] * (len(timed) // 2)
    assert len(timed) >= 6
    assert ms_a >= 3.0 and ms_b >= 1.0 and ms_a > 1.5 * ms_b


def test_min_rounds_outlasts_min_time():
    calls = []
    ms = harness.time_cpu_interleaved([lambda: calls.append("a"), lambda: calls.append("b")], 0.0, min_rounds=9)
    assert calls == ["a", "b"] * 10  # the warm-up round, then nine timed ones
    assert len(ms) == 2
    n = []
    harness.time_cpu(lambda: n.append(1), 0.0, min_reps=5)
    assert len(n) == 6


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
    assert "--quick" in out.stdout


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


def test_resources_measures_shared_memory_and_flags_overflow(tmp_path):
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
    from gptfast import ops

    if not any(ops.kernel_module(op)[0] is not None for op in ops.OPS):
        pytest.skip(reason="no Triton kernel module can be imported here (triton missing)")
    out = subprocess.run([sys.executable, "-m", "bench.resources", "--smoke", "--no-cache", "--arch", "86"],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env=_env_without_interpreter())
    assert out.returncode == 0, out.stdout + out.stderr
    assert "sm_86" in out.stdout and "compiled" in out.stdout
