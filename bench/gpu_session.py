"""One command that measures everything a GPU can tell us, within a fixed time::

    python -m bench.gpu_session --out DIR            # on a CUDA GPU: about 8 minutes
    python -m bench.gpu_session --dry-run            # anywhere: the parts, each with its budget

It runs, in this order (the tests first, the slowest parts last):

1. the GPU-only tests (``pytest -m gpu``: bf16, ``torch.compile``, full sizes), when run from a
   checkout of the repository (the tests are not installed with the package);
2. the peak-memory table: each op's forward + backward at GPT-2 124M shapes, reference against
   Triton, as ``torch.cuda.max_memory_allocated`` beyond the inputs;
3. the GPU's default bench cases (the quick plan) but the tokenizer's, which run on the CPU: the
   kernels against PyTorch, the train step, the model's forward and generation.

Every part declares a time budget. Before each part, the parts left must fit in the time left
(``--budget-s``, 480 s by default, Triton's compile time included): when they do not, the slowest
are left out first (the tests only when nothing else is left), and the JSON says which and why.
The session prints how much of its budget is left as it goes; the tests run in a child process that
is stopped when their time is up.

It writes ``DIR/<device>-session.json`` (the device, every part's time, the tests' outcome, the bench
results, the memory table) and ``DIR/<device>-session.png`` (bench throughput and peak memory).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import os
import platform
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from . import harness

DEFAULT_BUDGET_S = 480.0
# Importing torch, reading the device, writing the JSON and the chart.
STARTUP_S = 15.0
# The GPU-only tests: pytest's start-up and collection, then each test (a compile or a full-size
# check each; torch.compile's first compile is the slow one).
TESTS_STARTUP_S = 30.0
TEST_S = 2.0
MEMORY_OP_S = 4.0  # one op at one shape: first launch (compile) + one forward and backward
# Ops of the default plan that belong in the session: all but the tokenizer, which runs on the CPU.
BENCH_ONLY = r"^(?!tokenizer)"
# What a --dry-run on a machine without a GPU plans for: an H100-class card.
PREVIEW = harness.DeviceInfo("cuda", "an H100-class GPU (sm_90, 80 GB): preview", "preview-sm90", arch="sm_90",
                             memory_bytes=80 * 2 ** 30)


@dataclass
class Part:
    """One unit of the session: the GPU tests, one op's memory rows, or one bench group."""

    name: str
    kind: str  # "tests" | "memory" | "bench"
    budget_s: float
    detail: str = ""
    cases: list = field(default_factory=list, repr=False)  # bench groups: the harness cases
    op: str = ""  # memory parts: the op
    required: bool = False  # the tests: never left out for a slower part's sake, only when nothing is left


def fit(parts: list[Part], seconds: float) -> tuple[list[Part], list[Part]]:
    """Keep ``parts`` in order, leaving out the slowest first until their budgets fit ``seconds``
    (a required part goes only when it alone does not fit). Returns ``(kept, left_out)``."""
    kept = list(parts)
    left_out = []
    while kept and sum(p.budget_s for p in kept) > seconds:
        optional = [p for p in kept if not p.required]
        if optional:
            slowest = max(optional, key=lambda p: p.budget_s)
        else:
            slowest = max(kept, key=lambda p: p.budget_s)
        kept.remove(slowest)
        left_out.append(slowest)
    return kept, left_out


# --------------------------------------------------------------------------------------------------
# The parts
# --------------------------------------------------------------------------------------------------


def tests_dir() -> str | None:
    """The repository's ``tests/`` folder when this runs from a checkout, else None."""
    here = os.path.dirname(os.path.abspath(__file__))
    candidate = os.path.join(os.path.dirname(here), "tests")
    return candidate if os.path.isfile(os.path.join(candidate, "conftest.py")) else None


def count_gpu_tests(folder: str) -> int:
    """How many tests ``pytest -m gpu`` would run (collected here, without running any)."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                          folder], capture_output=True, text=True, cwd=os.path.dirname(folder))
    found = re.search(r"(\d+)(?:/\d+)? tests? (?:collected|selected)", out.stdout)
    if found:
        return int(found.group(1))
    return sum(1 for line in out.stdout.splitlines() if "::" in line)


def tests_part(folder: str | None, skipped: list[str]) -> Part | None:
    if folder is None:
        skipped.append("gpu tests: the tests are not installed with the package; run from a checkout of the "
                       "repository to include them")
        return None
    n = count_gpu_tests(folder)
    return Part("gpu tests", "tests", TESTS_STARTUP_S + TEST_S * n, f"pytest -m gpu: {n} tests", required=True)


MEMORY_OPS = ("layer_norm", "feed_forward", "attention", "linear_cross_entropy")


def memory_parts() -> list[Part]:
    return [Part(f"memory {op}", "memory", 2 * MEMORY_OP_S, "forward + backward at GPT-2 124M, reference and triton",
                 op=op) for op in MEMORY_OPS]


def bench_parts(info: harness.DeviceInfo, dry_run: bool) -> tuple[list[Part], list[str]]:
    """The default GPU plan but the tokenizer, one part per (op, shape, dtype) group."""
    import warnings

    ctx = harness.Context("cuda", info, quick=True, only=BENCH_ONLY, dry_run=dry_run)
    with warnings.catch_warnings():  # a plan listed without a GPU: torch warns that autocast is off
        warnings.simplefilter("ignore")
        cases = harness.discover_cases(ctx)
    groups: dict[tuple, list] = {}
    for c in cases:  # train.step.flops times the same step as train.step: one part
        groups.setdefault((c.op.removesuffix(".flops"), c.shape, c.dtype), []).append(c)
    parts = [Part(f"bench {op} {shape} {dtype}", "bench", sum(c.budget_s for c in cs),
                  ", ".join(c.impl for c in cs), cases=cs) for (op, shape, dtype), cs in groups.items()]
    return parts, ctx.skipped


def _peak_bytes(run) -> int:
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _op_runner(op: str, backend: str):
    """Forward + backward of ``op`` at GPT-2 124M shapes (8 x 1024 tokens, bf16), inputs made once."""
    import torch

    from gptfast import ops

    b, t, e, h, v = 8, 1024, 768, 12, 50257
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).to(torch.bfloat16).requires_grad_()

    if op == "layer_norm":
        args = (rand(b, t, e), rand(e), rand(e))

        def fn():
            ops.layer_norm(*args, backend=backend).float().square().mean().backward()
    elif op == "feed_forward":
        args = (rand(b, t, e), rand(4 * e, e, scale=e ** -0.5), rand(4 * e), rand(e, 4 * e, scale=(4 * e) ** -0.5),
                rand(e))

        def fn():
            ops.feed_forward(*args, backend=backend).float().square().mean().backward()
    elif op == "attention":
        q, k, vv = (rand(b, h, t, e // h) for _ in range(3))

        def fn():
            ops.causal_attention(q, k, vv, backend=backend).float().square().mean().backward()
    else:
        x, w = rand(b * t, e), rand(v, e, scale=e ** -0.5)
        targets = torch.randint(0, v, (b * t,), device="cuda", generator=g)

        def fn():
            ops.linear_cross_entropy(x, w, targets, backend=backend).backward()
    return fn


def measure_memory(op: str) -> list[dict]:
    """Peak bytes of ``op``'s forward + backward beyond its inputs, per implementation."""
    rows = []
    for backend in ("reference", "triton"):
        row = {"op": op, "shape": "8x1024 gpt2", "dtype": "bf16", "impl": backend}
        try:
            run = _op_runner(op, backend)
            run()  # compile and first launch outside the measurement
            row["peak_gib"] = round(_peak_bytes(run) / 2 ** 30, 4)
        except (RuntimeError, NotImplementedError, ValueError) as e:
            row["error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
        rows.append(row)
    return rows


def run_tests(folder: str, out_dir: str, timeout_s: float) -> dict:
    """``pytest -m gpu`` in a child process, stopped after ``timeout_s``; the outcome from its JUnit XML."""
    xml = os.path.join(out_dir, "gpu-tests.xml")
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", folder]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, timeout_s),
                              cwd=os.path.dirname(folder))
        code, tail = proc.returncode, proc.stdout.strip().splitlines()[-1:] or [""]
    except subprocess.TimeoutExpired:
        code, tail = None, [f"stopped after {timeout_s:.0f} s"]
    outcome = {"command": " ".join(["python", "-m", "pytest", "-m", "gpu", "tests"]), "exit_code": code,
               "summary": tail[0], "wall_s": round(time.perf_counter() - start, 1)}
    if os.path.isfile(xml):
        outcome.update(_junit(xml))
        os.remove(xml)
    return outcome


def _junit(path: str) -> dict:
    root = ET.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            failures.append({"test": name, "message": (bad.get("message") or "")[:300]})
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures}


# --------------------------------------------------------------------------------------------------
# The session
# --------------------------------------------------------------------------------------------------


def plan(info: harness.DeviceInfo, budget_s: float, dry_run: bool, folder: str | None):
    """All the parts, which fit the budget, and what was left out (with why)."""
    skipped: list[str] = []
    parts = []
    t = tests_part(folder, skipped)
    if t is not None:
        parts.append(t)
    parts += memory_parts()
    bench, bench_skipped = bench_parts(info, dry_run)
    parts += bench
    skipped += bench_skipped
    # the order they run in: correctness, memory, the kernels, then the whole model (slowest last)
    order = {"tests": 0, "memory": 1}
    whole = ("train.", "model.", "generate")
    parts.sort(key=lambda p: (order.get(p.kind, 2), p.kind == "bench" and p.cases[0].op.startswith(whole)))
    kept, left_out = fit(parts, budget_s - STARTUP_S)
    return parts, kept, left_out, skipped


def format_plan(parts: list[Part], kept: list[Part], budget_s: float) -> str:
    lines = [f"{'part':<58} {'budget':>8}  at its budget"]
    for p in parts:
        lines.append(f"{p.name[:58]:<58} {p.budget_s:>7.1f}s  {'runs' if p in kept else 'left out'}")
    total = STARTUP_S + sum(p.budget_s for p in kept)
    lines.append(f"{len(kept)} of {len(parts)} parts fit: {total:.0f} s declared of a {budget_s:.0f} s budget "
                 f"({STARTUP_S:.0f} s of it start-up); every part: {STARTUP_S + sum(p.budget_s for p in parts):.0f} s")
    lines.append("budgets are generous: before each part the session fits what is left into the time left, so a "
                 "part left out here runs when the others finish early")
    return "\n".join(lines)


def _left_out(p: Part, why: str) -> dict:
    return {"part": p.name, "budget_s": round(p.budget_s, 1), "why": why}


def run_session(out_dir: str, budget_s: float = DEFAULT_BUDGET_S, stream=sys.stdout) -> dict:
    import torch

    start = time.perf_counter()
    deadline = start + budget_s
    info = harness.device_info("cuda")
    folder = tests_dir()
    parts, kept, left_out, skipped = plan(info, budget_s, False, folder)
    print(harness.header(info), file=stream, flush=True)
    print(format_plan(parts, kept, budget_s), file=stream, flush=True)
    record = {"device": dataclasses.asdict(info), "torch": torch.__version__, "python": platform.python_version(),
              "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "budget_s": budget_s,
              "parts": [], "left_out": [], "skipped": skipped, "tests": None, "memory": [], "bench": []}
    results, result_cases = [], []
    queue = list(parts)
    while queue:
        left = deadline - time.perf_counter() - 5.0  # the JSON and the chart
        queue, dropped = fit(queue, left)
        record["left_out"] += [_left_out(p, f"{left:.0f} s were left: the slowest go first") for p in dropped]
        if not queue:
            break
        part = queue.pop(0)
        print(f"[{time.perf_counter() - start:5.0f} s, {left:.0f} s left] {part.name} (budget {part.budget_s:.0f} s)",
              file=stream, flush=True)
        t0 = time.perf_counter()
        status = "done"
        try:
            if part.kind == "tests":
                record["tests"] = run_tests(folder, out_dir, min(left, 1.5 * part.budget_s))
                status = f"exit code {record['tests']['exit_code']}: {record['tests']['summary']}"
            elif part.kind == "memory":
                record["memory"] += measure_memory(part.op)
            else:
                for case in part.cases:
                    results.append(harness.measure(case, info))
                    result_cases.append(case)
        except Exception as e:  # one part's failure must not lose the others' numbers
            status = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        took = time.perf_counter() - t0
        record["parts"].append({"part": part.name, "budget_s": round(part.budget_s, 1), "wall_s": round(took, 1),
                                "status": status})
        if took > 1.5 * part.budget_s + 1.0:
            print(f"    took {took:.1f} s against a budget of {part.budget_s:.1f} s", file=stream, flush=True)
        harness.drop_live_inputs()
    harness._add_ratios(results, result_cases)
    record["bench"] = [dataclasses.asdict(r) for r in results]
    if results:
        print(harness.format_table(results, info), file=stream)
    for row in record["memory"]:
        print(f"memory {row['op']:<22} {row['impl']:<10} "
              + (f"{row['peak_gib']:.3f} GiB" if "peak_gib" in row else f"error: {row['error']}"), file=stream)
    record["wall_s"] = round(time.perf_counter() - start, 1)
    json_path, png_path = save(record, info, out_dir, results)
    print(f"saved {json_path}" + (f" and {png_path}" if png_path else ""), file=stream)
    print(f"session: {len(record['parts'])} parts in {record['wall_s']:.0f} s of a {budget_s:.0f} s budget; "
          f"{len(record['left_out'])} left out", file=stream)
    return record


def save(record: dict, info: harness.DeviceInfo, out_dir: str, results) -> tuple[str, str | None]:
    from gptfast.files import atomic_write_json

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{info.slug}-session.json")
    atomic_write_json(path, record)
    png = os.path.join(out_dir, f"{info.slug}-session.png")
    try:
        plot(record, info, results, png)
    except ImportError:
        png = None
    return path, png


def plot(record: dict, info: harness.DeviceInfo, results, path: str) -> None:
    """Left: each bench group's ratio to its baseline, by implementation. Right: peak memory per op."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, max(3.0, 0.22 * max(len(results), 8))),
                                      gridspec_kw={"width_ratios": [2, 1]})
    rows = [r for r in results if r.ratio is not None]
    left.barh([f"{r.op} {r.shape} {r.dtype} [{r.impl}]" for r in rows], [r.ratio for r in rows], color="tab:blue")
    left.axvline(1.0, color="black", linewidth=0.8)
    left.set_xlabel("throughput / baseline", fontsize=8)
    left.tick_params(labelsize=6)
    left.invert_yaxis()
    mem = [m for m in record["memory"] if "peak_gib" in m]
    right.barh([f"{m['op']} [{m['impl']}]" for m in mem], [m["peak_gib"] for m in mem], color="tab:orange")
    right.set_xlabel("peak GiB beyond the inputs (fwd + bwd, 8x1024, bf16)", fontsize=8)
    right.tick_params(labelsize=7)
    right.invert_yaxis()
    fig.suptitle(f"gptfast GPU session on {info.name}", fontsize=10)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None, prog: str = "python -m bench.gpu_session") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--out", metavar="DIR", help=f"folder for the JSON and PNG (default ./{harness.OUT_DIR_NAME})")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help=f"seconds the whole session may take (default {DEFAULT_BUDGET_S:.0f})")
    p.add_argument("--dry-run", action="store_true",
                   help="list the parts and each one's budget, run nothing (works without a GPU: an H100-class "
                        "preview)")
    args = p.parse_args(argv)
    if not args.budget_s > STARTUP_S:
        print(f"{prog}: error: --budget-s must be more than the {STARTUP_S:.0f} s of start-up, got {args.budget_s}",
              file=sys.stderr)
        return 2
    import torch

    if args.dry_run:
        info = harness.device_info("cuda", measure=False) if torch.cuda.is_available() else PREVIEW
        parts, kept, left_out, skipped = plan(info, args.budget_s, True, tests_dir())
        print(f"device: {info.name}")
        print(format_plan(parts, kept, args.budget_s))
        for reason in skipped:
            print(f"skipped: {reason}")
        print("dry run: nothing was run")
        return 0
    if not torch.cuda.is_available():
        print(f"{prog}: error: the session measures a CUDA GPU, and torch sees none here; --dry-run lists what "
              f"it would run, and `python -m bench` runs the CPU's benchmarks", file=sys.stderr)
        return 2
    out_dir = args.out or harness.default_out_dir()
    try:
        harness.check_out(out_dir)
    except Exception as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        run_session(out_dir, args.budget_s)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
