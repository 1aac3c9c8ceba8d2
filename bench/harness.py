"""The benchmark harness: find cases, time them side by side, print a table, save JSON and a chart.

A benchmark module is ``bench/cases_<topic>.py`` with one function::

    def cases(ctx: Context) -> list[Case]

returning the cases it can run on ``ctx.device`` (and calling ``ctx.skip(reason)`` for what it
cannot, e.g. "layer_norm: needs a CUDA GPU"). Every case of one ``(op, shape, dtype)`` group is
timed in the same run, so the ratios between implementations are meaningful; absolute times only
hold on the device named in the header.

Two plans: ``quick`` (``ctx.quick``: fewer, smaller shapes) and ``full``. A CPU runs the quick plan
unless told ``--full``; a GPU runs the full one unless told ``--quick``. Every case declares what one
call costs and what it must build first, so each has a time budget before anything runs
(``--dry-run`` lists them), and the default CPU plan's budget is held under ``CPU_DEFAULT_LIMIT_S``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import pkgutil
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

# Units a case can report, and what its ``work`` counts.
UNITS = {
    "GB/s": ("bytes moved", 1e9),
    "TFLOP/s": ("floating-point operations", 1e12),
    "MB/s": ("bytes of text", 1e6),
    "tokens/s": ("tokens", 1.0),
}


@dataclass
class Case:
    """One thing to time.

    ``fn`` runs one iteration (it may return anything; GPU work is synchronized by the timer).
    ``work`` is what one call does, in the unit's measure: bytes for GB/s, FLOPs for TFLOP/s,
    bytes of input text for MB/s, tokens for tokens/s.
    """

    op: str  # e.g. "layer_norm.fwd", "tokenizer.encode_ordinary"
    shape: str  # human-readable, e.g. "16384x768" or "30 MB mixed corpus"
    impl: str  # "triton", "reference", "torch", "torch.compile", "tiktoken", "fast", ...
    fn: Callable[[], Any]
    unit: str
    work: float
    dtype: str = "-"
    device: str = "cpu"
    baseline: bool = False  # ratios in the table are against the baseline impl of the group
    note: str = ""
    min_time_s: float = 0.2  # CPU timer: keep repeating until this much time has passed
    # CPU cases of one (op, shape, dtype) group that all set this are timed in alternation, one
    # call of each per round, so a machine whose speed drifts (a shared one) shifts them alike.
    interleave: bool = False
    # CPU timer: at least this many calls (rounds, when interleaved), whatever min_time_s says; a
    # median of three slow calls on a shared machine can be off by a fifth.
    min_rounds: int = 3
    # What the case expects to cost on the machine its plan is sized for (a shared 2-core CPU for CPU
    # cases): seconds for one call, and seconds to build what it needs before the first (a model, a
    # corpus, a compile; shared work is counted once, on the first case that needs it).
    call_s: float = 0.01
    setup_s: float = 0.0

    def __post_init__(self):
        if self.unit not in UNITS:
            raise ValueError(f"unknown unit {self.unit!r}; use one of {sorted(UNITS)}")

    @property
    def budget_s(self) -> float:
        """Seconds this case may take: its setup, then what the timer spends at ``call_s`` a call."""
        c = self.call_s
        if self.device == "cuda":  # do_bench: one call, 5 to estimate, >= 25 ms warm-up, >= 100 ms timed
            return self.setup_s + 6 * c + max(c, 0.025) + max(c, 0.1) + 0.1
        # time_cpu(_interleaved): one warm-up call, then calls until min_rounds and min_time_s are both
        # passed (the last call may run past min_time_s by one call)
        return self.setup_s + c + max(self.min_rounds * c, self.min_time_s + c)


@dataclass
class Result:
    op: str
    shape: str
    impl: str
    dtype: str
    device: str
    unit: str
    median_ms: float
    throughput: float
    pct_peak: float | None
    ratio: float | None = None  # throughput / baseline throughput in the same group
    note: str = ""


@dataclass
class DeviceInfo:
    kind: str  # "cuda" | "cpu"
    name: str
    slug: str
    arch: str | None = None
    peak_gbps: float | None = None  # measured device-to-device copy bandwidth (GPU)
    peak_tflops: dict = field(default_factory=dict)  # nominal dense tensor-core peak by dtype
    peak_source: str = ""
    memory_bytes: int | None = None  # the GPU's memory


@dataclass
class Context:
    device: str
    info: DeviceInfo
    quick: bool = False
    only: str | None = None
    # List the cases without building anything heavy (no corpus, no compile, no warm-up call): the
    # plan's names and budgets only. No case's ``fn`` is called.
    dry_run: bool = False
    skipped: list = field(default_factory=list)

    def skip(self, reason: str) -> None:
        self.skipped.append(reason)

    def wants(self, op: str) -> bool:
        return self.only is None or re.search(self.only, op) is not None


# Nominal dense peaks (TFLOP/s, tensor cores, fp32 accumulate) of cards we know, by name fragment.
_KNOWN_PEAKS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100 80GB HBM3": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6},
    "RTX 3090": {"bf16": 71.0, "fp16": 71.0, "fp32": 35.6},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3},
    "T4": {"fp16": 65.0, "fp32": 8.1},
}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_info(device: str | None = None, measure: bool = True) -> DeviceInfo:
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        name = torch.cuda.get_device_name()
        major, minor = torch.cuda.get_device_capability()
        info = DeviceInfo("cuda", name, _slug(name), arch=f"sm_{major}{minor}",
                          memory_bytes=torch.cuda.get_device_properties(0).total_memory)
        for frag, peaks in _KNOWN_PEAKS.items():
            if frag in name:
                info.peak_tflops = dict(peaks)
                info.peak_source = f"nominal dense peak for {frag}"
                break
        if measure:
            info.peak_gbps = measure_copy_bandwidth()
        return info
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    name = f"{cpu} ({os.cpu_count()} cores)"
    return DeviceInfo("cpu", name, "cpu-" + _slug(cpu)[:40])


def measure_copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s (read + write counted), the roofline for memory-bound ops."""
    import torch

    buffers = [torch.empty(nbytes // 4, dtype=torch.float32, device="cuda") for _ in range(2)]
    ms = time_cuda(lambda: buffers[1].copy_(buffers[0]))
    buffers.clear()
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3) / 1e9


def time_cuda(fn: Callable[[], Any], warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds of ``fn`` on the GPU, with warm-up and an L2 flush before each call."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def time_cpu(fn: Callable[[], Any], min_time_s: float = 0.2, max_reps: int = 1000, min_reps: int = 3) -> float:
    """Median milliseconds of ``fn`` on the CPU: one warm-up call, then repeat until ``min_time_s``
    (and at least ``min_reps`` times)."""
    return time_cpu_interleaved([fn], min_time_s, max_reps, min_reps)[0]


def time_cpu_interleaved(fns: list[Callable[[], Any]], min_time_s: float = 0.2, max_rounds: int = 1000,
                         min_rounds: int = 3) -> list[float]:
    """Median milliseconds of each of ``fns``, timed in rounds of one call each (after one warm-up
    each), until ``min_time_s`` a function has passed and at least ``min_rounds`` rounds are done.

    Each round starts one function further on (the first starts with ``fns[0]``, the next with
    ``fns[1]``, ...): a call runs in the state the call before it left (the processor's caches, a
    string's UTF-8 form that the first reader makes and later ones reuse), and no function should
    always come first, or always after the same one."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    budget = min_time_s * len(fns)
    n = len(fns)
    while len(times[0]) < min_rounds or (time.perf_counter() - start < budget and len(times[0]) < max_rounds):
        first = len(times[0]) % n
        for k in range(n):
            i = (first + k) % n
            t0 = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(ts) * 1e3 for ts in times]


# The inputs of one case at a time: cases are timed one after another, so a case builds its tensors
# (and the graph a backward needs) on its first call, and that frees the previous case's.
_LIVE: dict = {}


def live_inputs(key, setup: Callable[[], Any]):
    """``setup()``'s result for case ``key``, built on first use; building it drops every other case's."""
    if key not in _LIVE:
        _LIVE.clear()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass
        _LIVE[key] = setup()
    return _LIVE[key]


def drop_live_inputs() -> None:
    _LIVE.clear()


def kernel_arch(ctx: Context, op: str, module) -> int | None:
    """The CUDA arch to launch ``module``'s kernel for, or None (and a note) when it is not proven here."""
    from gptfast import ops

    import torch

    # the info's arch, so that a plan for a GPU can be listed on a machine without one (gpu_session --dry-run)
    arch = int(ctx.info.arch[3:]) if ctx.info.arch else ops.cuda_arch(torch.device("cuda"))
    if arch not in module.SUPPORTED_ARCHS:
        proven = ", ".join(f"sm_{a}" for a in module.SUPPORTED_ARCHS)
        ctx.skip(f"{op} [triton]: the kernel is not proven on sm_{arch} (proven: {proven})")
        return None
    return arch


def discover_cases(ctx: Context, progress=None) -> list[Case]:
    """Import every ``cases_*`` module of this package and collect what it offers for ``ctx``.

    ``progress``: a stream that gets one line per module that offered cases, once they are ready."""
    out: list[Case] = []
    pkg = sys.modules[__package__]
    for mod in sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name.startswith("cases_")):
        start = time.perf_counter()
        module = importlib.import_module(f"{__package__}.{mod}")
        found = [case for case in module.cases(ctx) if ctx.wants(case.op)]
        if found and progress is not None:
            print(f"[plan] {mod[len('cases_'):]}: {len(found)} cases ready in {time.perf_counter() - start:.1f} s",
                  file=progress, flush=True)
        out += found
    return out


def measure(case: Case, info: DeviceInfo, ms: float | None = None) -> Result:
    """Times ``case`` (or takes ``ms`` already measured) and derives throughput and % of peak."""
    if ms is None:
        ms = time_cuda(case.fn) if case.device == "cuda" else time_cpu(case.fn, case.min_time_s, min_reps=case.min_rounds)
    scale = UNITS[case.unit][1]
    throughput = case.work / (ms * 1e-3) / scale
    pct = None
    if case.device == "cuda":
        if case.unit == "GB/s" and info.peak_gbps:
            pct = 100.0 * throughput / info.peak_gbps
        elif case.unit == "TFLOP/s" and case.dtype in info.peak_tflops:
            pct = 100.0 * throughput / info.peak_tflops[case.dtype]
    return Result(case.op, case.shape, case.impl, case.dtype, case.device, case.unit, ms, throughput, pct, None, case.note)


def _interleaved_group(cases: list[Case], i: int) -> list[Case]:
    """The run of CPU cases from ``i`` on that share ``cases[i]``'s group and all ask to interleave."""
    first = cases[i]
    if first.device != "cpu" or not first.interleave:
        return [first]
    group = [first]
    for c in cases[i + 1:]:
        if c.device != "cpu" or not c.interleave or (c.op, c.shape, c.dtype) != (first.op, first.shape, first.dtype):
            break
        group.append(c)
    return group


def _add_ratios(results: list[Result], cases: list[Case]) -> None:
    base = {}
    for r, c in zip(results, cases):
        if c.baseline:
            base[(r.op, r.shape, r.dtype)] = r.throughput
    for r in results:
        b = base.get((r.op, r.shape, r.dtype))
        if b:
            r.ratio = r.throughput / b


def format_table(results: list[Result], info: DeviceInfo) -> str:
    head = ["op", "shape", "dtype", "impl", "median ms", "throughput", "% peak", "vs base"]
    rows = []
    for r in results:
        rows.append([
            r.op, r.shape, r.dtype, r.impl, f"{r.median_ms:.4g}", f"{r.throughput:.4g} {r.unit}",
            "" if r.pct_peak is None else f"{r.pct_peak:.1f}%",
            "" if r.ratio is None else f"{r.ratio:.2f}x",
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def header(info: DeviceInfo) -> str:
    import torch

    parts = [f"device: {info.name}" + (f" ({info.arch})" if info.arch else ""), f"torch {torch.__version__}"]
    if info.peak_gbps:
        parts.append(f"measured copy bandwidth {info.peak_gbps:.0f} GB/s (100% for GB/s rows)")
    if info.peak_tflops:
        parts.append(f"{info.peak_source}: " + ", ".join(f"{k} {v:g} TFLOP/s" for k, v in info.peak_tflops.items()))
    return "\n".join(parts)


def save(results: list[Result], info: DeviceInfo, out_dir: str, skipped: list[str],
         plan: dict | None = None) -> tuple[str, str | None]:
    """Write ``<out_dir>/<device>.json`` (atomically) and a PNG chart beside it; return both paths.

    ``plan``: the plan's name, declared budget and wall time, kept with the numbers."""
    import torch

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{info.slug}.json")
    payload = {
        "device": asdict(info),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "plan": plan,
        "skipped": skipped,
        "results": [asdict(r) for r in results],
    }
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)
    png = os.path.join(out_dir, f"{info.slug}.png")
    try:
        plot(results, info, png)
    except ImportError:
        png = None
    return path, png


def plot(results: list[Result], info: DeviceInfo, path: str) -> None:
    """One horizontal bar panel per (op, shape, dtype) group, throughput by implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault((r.op, r.shape, r.dtype), []).append(r)
    n = max(1, len(groups))
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 2.2 * rows), squeeze=False)
    for ax, ((op, shape, dtype), rs) in zip(axes.flat, groups.items()):
        ax.barh([r.impl for r in rs], [r.throughput for r in rs], color="tab:blue")
        ax.set_title(f"{op} {shape} {dtype}", fontsize=8)
        ax.set_xlabel(rs[0].unit, fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.suptitle(f"gptfast benchmarks on {info.name}", fontsize=10)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# The default plan on a CPU (the quick one) must declare at most this many seconds in all, start-up
# included: it is what ``python -m bench`` and CI run on a shared 2-core machine.
CPU_DEFAULT_LIMIT_S = 120.0
# Importing torch, reading the device, drawing and writing the chart: counted once in every plan.
STARTUP_S = 5.0
OUT_DIR_NAME = "bench-results"


def default_plan(kind: str) -> str:
    """``"quick"`` on a CPU (at most ``CPU_DEFAULT_LIMIT_S`` declared), ``"full"`` on a GPU."""
    return "quick" if kind == "cpu" else "full"


def default_out_dir() -> str:
    """``./bench-results`` in the current folder, wherever that is (never the package's own folder)."""
    return os.path.join(os.getcwd(), OUT_DIR_NAME)


def plan_budget(cases: list[Case]) -> float:
    """Seconds the plan declares: start-up plus every case's budget."""
    return STARTUP_S + sum(c.budget_s for c in cases)


def check_device(device: str | None) -> str | None:
    """``device`` if this machine can run benchmarks on it; a ``CommandError`` saying what to use if not.

    The command line's own check (:func:`gptfast.devices.resolve_device`) names a device this machine
    lacks; on top of it, the benchmarks run on the current CUDA device only, and not on MPS."""
    from gptfast.cli import CommandError
    from gptfast.devices import resolve_device

    if device is None or device == "cpu":
        return device
    if device.startswith("cuda:"):
        raise CommandError(f"--device {device}: the benchmarks run on the current CUDA device; "
                           f"pick it with CUDA_VISIBLE_DEVICES={device[5:]} and --device cuda")
    kind = resolve_device(device).type
    if kind == "mps":
        raise CommandError("--device mps: no benchmark runs on MPS yet; use --device cpu")
    return device


def check_only(only: str | None) -> None:
    from gptfast.cli import CommandError

    if only is None:
        return
    try:
        re.compile(only)
    except re.error as e:
        raise CommandError(f"--only {only!r} is not a regular expression ({e}); "
                           "quote it, or escape the character, e.g. --only 'attention\\.fwd'") from None


def check_out(out_dir: str | None) -> None:
    """The output folder must be a folder, or be creatable as one."""
    from gptfast.cli import CommandError

    if out_dir is None:
        return
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CommandError(f"--out {out_dir} is a file; give a folder to hold <device>.json and <device>.png "
                           f"(the default is ./{OUT_DIR_NAME})")
    parent = os.path.abspath(out_dir)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise CommandError(f"--out {out_dir}: {parent} is a file, so no folder can be made there; "
                           "give another folder")
    if not os.access(parent, os.W_OK):
        raise CommandError(f"--out {out_dir}: {parent} is not writable; give a folder you can write to")


def _no_match(ctx: Context) -> str:
    near = [r for r in ctx.skipped if re.search(ctx.only, r)]
    why = f" ({'; '.join(near)})" if near else ""
    return f"--only {ctx.only!r} matches no benchmark on {ctx.device}{why}; --dry-run lists every case"


def format_plan(cases: list[Case], plan: str) -> str:
    """The cases in the order they run, each with its budget, and the total."""
    head = ["#", "op", "shape", "dtype", "impl", "budget", "of it setup"]
    rows = [[str(i), c.op, c.shape, c.dtype, c.impl, f"{c.budget_s:.1f} s", f"{c.setup_s:.1f} s" if c.setup_s else ""]
            for i, c in enumerate(cases, 1)]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.append(f"{plan} plan: {len(cases)} cases, declared budget {plan_budget(cases):.0f} s "
                 f"({STARTUP_S:.0f} s of it start-up)")
    return "\n".join(lines)


def _progress(cases: list[Case], i: int, group: list[Case], elapsed: float) -> str:
    span = f"{i + 1}" if len(group) == 1 else f"{i + 1}-{i + len(group)}"
    impls = ", ".join(c.impl for c in group)
    alternation = " in alternation" if len(group) > 1 else ""
    budget = sum(c.budget_s for c in group)
    first = group[0]
    return (f"[{span}/{len(cases)}] {first.op} {first.shape} {first.dtype} [{impls}]{alternation} "
            f"(budget {budget:.1f} s, {elapsed:.0f} s so far)")


@dataclass
class Plan:
    """The cases one run will time, in order, for one device and plan."""

    name: str  # "quick" or "full"
    info: DeviceInfo
    ctx: Context
    cases: list

    @property
    def budget_s(self) -> float:
        return plan_budget(self.cases)


def make_plan(device: str | None = None, quick: bool | None = None, only: str | None = None,
              dry_run: bool = False, progress=None) -> Plan:
    """The plan for ``device`` (``quick``: None picks the device's default); a ``CommandError`` for a
    device this machine lacks, a bad ``only``, or an ``only`` that matches nothing."""
    from gptfast.cli import CommandError

    device = check_device(device)
    check_only(only)
    info = device_info(device, measure=not dry_run)
    name = default_plan(info.kind) if quick is None else ("quick" if quick else "full")
    ctx = Context(info.kind, info, quick=name == "quick", only=only, dry_run=dry_run)
    cases = discover_cases(ctx, progress)
    if only is not None and not cases:
        raise CommandError(_no_match(ctx))
    return Plan(name, info, ctx, cases)


def run(device: str | None = None, quick: bool | None = None, only: str | None = None, out_dir: str | None = None,
        save_results: bool = True, stream=sys.stdout, dry_run: bool = False) -> list[Result]:
    """Run the plan for ``device`` (``quick``: None picks the device's default plan) and return its results.

    Bad arguments raise ``gptfast.cli.CommandError`` before anything runs. With ``dry_run`` it prints
    the plan and every case's budget, runs nothing, and returns ``[]``.
    """
    if save_results:  # the device and --only are checked by make_plan, before anything is built
        check_out(out_dir)
    out_dir = out_dir or default_out_dir()
    start = time.perf_counter()
    plan = make_plan(device, quick, only, dry_run, progress=None if dry_run else sys.stderr)
    info, ctx, cases = plan.info, plan.ctx, plan.cases
    print(header(info), file=stream, flush=True)
    if dry_run:
        print(format_plan(cases, plan.name), file=stream)
        for reason in ctx.skipped:
            print(f"skipped: {reason}", file=stream)
        where = os.path.join(out_dir, f"{info.slug}.json") if save_results else "nothing (--no-save)"
        print(f"dry run: nothing was timed; a run would write {where}", file=stream)
        return []
    budget = plan.budget_s
    print(f"{plan.name} plan: {len(cases)} cases, declared budget {budget:.0f} s", file=sys.stderr, flush=True)
    results = []
    i = 0
    while i < len(cases):
        group = _interleaved_group(cases, i)
        print(_progress(cases, i, group, time.perf_counter() - start), file=sys.stderr, flush=True)
        group_start = time.perf_counter()
        if len(group) > 1:
            times = time_cpu_interleaved([c.fn for c in group], max(c.min_time_s for c in group),
                                         min_rounds=max(c.min_rounds for c in group))
            results += [measure(c, info, ms) for c, ms in zip(group, times)]
        else:
            results.append(measure(group[0], info))
        took, budget_here = time.perf_counter() - group_start, sum(c.budget_s - c.setup_s for c in group)
        if took > 1.5 * budget_here + 1.0:  # the machine is busier than the plan assumes, or a budget is stale
            print(f"    took {took:.1f} s against a budget of {budget_here:.1f} s", file=sys.stderr, flush=True)
        i += len(group)
    _add_ratios(results, cases)
    print(format_table(results, info), file=stream)
    for reason in ctx.skipped:
        print(f"skipped: {reason}", file=stream)
    wall = time.perf_counter() - start
    if save_results and results:
        plan_info = {"name": plan.name, "budget_s": round(budget, 1), "wall_s": round(wall, 1)}
        json_path, png_path = save(results, info, out_dir, ctx.skipped, plan_info)
        print(f"saved {json_path}" + (f" and {png_path}" if png_path else ""), file=stream)
    wall = time.perf_counter() - start
    print(f"{plan.name} plan: {len(results)} cases in {wall:.0f} s (declared budget {budget:.0f} s)", file=stream)
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``python -m bench``, which ``gptfast bench`` shares."""
    p.add_argument("--device", metavar="DEVICE", help="cpu or cuda (default: cuda when torch sees a GPU, else cpu)")
    p.add_argument("--quick", action="store_true",
                   help="the quick plan: fewer and smaller shapes (the default on a CPU)")
    p.add_argument("--full", action="store_true",
                   help="the full plan: every shape (the default on a GPU; minutes to hours on a CPU)")
    p.add_argument("--only", metavar="REGEX", help="run only the ops this regular expression finds, e.g. '^tokenizer'")
    p.add_argument("--out", metavar="DIR",
                   help=f"folder for <device>.json and <device>.png (default: ./{OUT_DIR_NAME} in the current "
                        "folder; bench/results/ in the repository holds only results committed for a named device)")
    p.add_argument("--no-save", action="store_true", help="print the table only; write nothing")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan, each case's time budget and where results would go; run nothing")


def run_args(args: argparse.Namespace, stream=sys.stdout) -> list[Result]:
    """``run`` with the flags ``add_arguments`` parsed; the one entry of both command lines."""
    from gptfast.cli import CommandError

    if args.quick and args.full:
        raise CommandError("--quick and --full pick one of the two plans; give one of them")
    quick = True if args.quick else (False if args.full else None)
    return run(args.device, quick, args.only, args.out, not args.no_save, stream=stream, dry_run=args.dry_run)


DESCRIPTION = (
    "Run every gptfast benchmark this device supports and print one table. On a CPU the quick plan "
    f"runs by default (its declared budget is at most {CPU_DEFAULT_LIMIT_S:.0f} s on 2 cores); --full "
    "runs the long one. --dry-run lists the plan with each case's budget. Results go to "
    f"./{OUT_DIR_NAME}/<device>.json and .png in the current folder unless --out says otherwise."
)


def main(argv=None, prog: str = "python -m bench") -> int:
    from gptfast.cli import CommandError

    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        run_args(args)
    except CommandError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0
