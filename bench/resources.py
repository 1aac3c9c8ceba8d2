"""Resource fit of every Triton kernel on every GPU arch we support, proven on a CPU.

For each kernel op (``layer_norm``, ``feed_forward``, ``attention``, ``linear_cross_entropy``), each arch (sm_75 ... sm_120) and
each dtype (fp32, fp16; bf16 has fp16's sizes), this compiles every config that the dispatcher may
choose -- ``kernels/<op>.py: resource_specs(arch, dtype)`` -- with ``triton.compile`` for that
``GPUTarget``, then reports registers and spills (from the ``ptxas -v`` shipped with triton) and
shared memory (``CompiledKernel.metadata.shared``, which includes the dynamic part that cuobjdump
misses). It exits non-zero when a config that can be chosen on an arch needs more shared memory
than that arch allows one block, or more registers than a block can have, so a launch that would fail
on a user's card is caught here, without a GPU.

    python -m bench.resources                     # everything (parallel, cached)
    python -m bench.resources --op attention --arch 86
    python -m bench.resources --smoke             # one config, for the test suite

Results are cached under ``~/.cache/gptfast/resources`` keyed by the kernel's source and arguments.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

# Shared memory a block may use (opt-in maximum), bytes; and the register file a block may use.
ARCH_LIMITS = {
    75: {"shared": 64 * 1024, "name": "T4 / RTX 20"},
    80: {"shared": 163 * 1024, "name": "A100"},
    86: {"shared": 99 * 1024, "name": "RTX 30"},
    89: {"shared": 99 * 1024, "name": "RTX 40 / L4"},
    90: {"shared": 227 * 1024, "name": "H100"},
    120: {"shared": 99 * 1024, "name": "RTX 50"},
}
REGISTERS_PER_BLOCK = 65536
DTYPES = ("fp32", "fp16")
OPS = ("layer_norm", "feed_forward", "attention", "linear_cross_entropy")


@dataclass
class Row:
    op: str
    kernel: str
    label: str
    arch: int
    dtype: str
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int
    shared_limit: int
    chosen: bool  # can the dispatcher pick this config on this arch?
    problem: str = ""
    blocks_per_sm: int = 0  # blocks of this config one SM holds at once (bench.launches.SM_LIMITS)
    mma: str = "-"  # the MMA instruction in the SASS (HGMMA, HMMA, ...), "-" for none
    loads: str = "-"  # the widest global loads: tma, async (cp.async), vector or scalar
    main_loop: int | None = None  # SASS instructions in the innermost loop holding the MMA

    @property
    def fits(self) -> bool:
        return not self.problem


def _torch_dtype(name):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def kernel_modules(ops=OPS):
    """``{op: module}`` for the ops that have a kernel module, and ``{op: reason}`` for those that do not."""
    found, missing = {}, {}
    for op in ops:
        name = f"gptfast.kernels.{op}"
        try:
            found[op] = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            missing[op] = "no kernel yet"
    return found, missing


def _ptxas():
    import triton

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for exe in ("ptxas-blackwell", "ptxas"):  # the newer one reads every PTX version triton emits
        path = os.path.join(bindir, exe)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"no ptxas in {bindir}: this triton build cannot compile for NVIDIA GPUs")


def _spec_key(spec, arch):
    fn = spec["kernel"]
    src = inspect.getsource(getattr(fn, "fn", fn))
    import triton

    blob = json.dumps(
        [src, triton.__version__, spec["signature"], {k: repr(v) for k, v in spec.get("constexprs", {}).items()},
         spec.get("num_warps", 4), spec.get("num_stages", 3), arch, repr(spec.get("attrs", "aligned"))],
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def aligned_attrs(kernel, signature):
    """The alignment facts of a real launch at GPT-2 shapes: every pointer and integer divisible by 16.

    Triton specializes a launch on them (torch's allocations are 16-byte aligned, GPT-2's widths and
    strides are multiples of 16), and aligned code pipelines loads through shared memory (cp.async,
    TMA), so it is the variant that needs the most shared memory -- the one the limits must hold for.
    A spec can pass its own ``attrs`` instead.
    """
    names = getattr(kernel, "arg_names", None) or list(signature)
    return {(names.index(name),): [["tt.divisibility", 16]] for name, ty in signature.items()
            if ty.startswith("*") or ty in ("i32", "i64", "u32", "u64")}


def static_compile_supported() -> bool:
    """Whether this triton compiles a kernel for a named GPU the way :func:`compile_spec` asks (3.3 and later)."""
    import inspect

    from triton.compiler import ASTSource

    return "constexprs" in inspect.signature(ASTSource).parameters


def compile_spec(spec, arch):
    """Compile one spec for ``sm_<arch>``; returns (registers, spill_stores, spill_loads, shared_bytes)."""
    compiled = _compiled(spec, arch)
    return (*ptxas_usage(compiled), int(compiled.metadata.shared))


def spec_evidence(spec, arch) -> dict:
    """Compile one spec for ``sm_<arch>``: its registers, spills and shared memory, and from its SASS the
    MMA instruction, the kind of global loads and the main loop's instruction count (bench.launches)."""
    from . import launches

    compiled = _compiled(spec, arch)
    regs, st, ld = ptxas_usage(compiled)
    summary = launches.summarize(launches.sass(compiled))
    return {"registers": regs, "spill_stores": st, "spill_loads": ld, "shared": int(compiled.metadata.shared),
            "mma": summary.mma, "loads": summary.loads, "main_loop": summary.main_loop}


def _compiled(spec, arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not static_compile_supported():
        raise RuntimeError(f"bench.resources compiles kernels through triton's ASTSource(constexprs=...), which "
                           f"triton {triton.__version__} lacks; install triton >= 3.3 to run it")
    src = ASTSource(fn=spec["kernel"], signature=spec["signature"], constexprs=spec.get("constexprs", {}),
                    attrs=spec.get("attrs", aligned_attrs(spec["kernel"], spec["signature"])))
    options = {"num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 3)}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def ptxas_usage(compiled) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) of a compiled kernel, from ``ptxas -v`` on its PTX."""
    ptx = compiled.asm["ptx"]
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1).rstrip(",")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        out = subprocess.run([_ptxas(), "-v", f"-arch={target}", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    info = out.stderr + out.stdout
    regs = int(re.search(r"Used (\d+) registers", info).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    return regs, int(spills.group(1)), int(spills.group(2))


def _cache_dir():
    d = os.environ.get("GPTFAST_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "gptfast")
    return os.path.join(d, "resources")


def _compile_cached(spec, arch, use_cache=True):
    key = _spec_key(spec, arch)
    path = os.path.join(_cache_dir(), key + ".v2.json")
    if use_cache and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    result = spec_evidence(spec, arch)
    os.makedirs(_cache_dir(), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, path)
    return result


def _job(op, arch, dtype, index, use_cache):
    """Runs in a worker process: compile spec ``index`` of ``op`` for (arch, dtype)."""
    module = importlib.import_module(f"gptfast.kernels.{op}")
    spec = module.resource_specs(arch, _torch_dtype(dtype))[index]
    return _compile_cached(spec, arch, use_cache)


def collect(ops=OPS, archs=tuple(ARCH_LIMITS), dtypes=DTYPES, jobs=None, use_cache=True, smoke=False, progress=None):
    """Compile what was asked and return (rows, missing_ops)."""
    from .launches import blocks_per_sm  # launches reads ptxas_usage from here: imported late both ways

    found, missing = kernel_modules(ops)
    work = []
    for op, module in found.items():
        for arch in archs:
            for dtype in dtypes:
                specs = module.resource_specs(arch, _torch_dtype(dtype))
                chosen = arch in getattr(module, "SUPPORTED_ARCHS", ())
                for i, spec in enumerate(specs):
                    work.append((op, arch, dtype, i, spec, chosen))
                    if smoke:
                        break
                if smoke and work:
                    break
            if smoke and work:
                break
        if smoke and work:
            break
    rows = []
    jobs = jobs or os.cpu_count() or 1
    with cf.ProcessPoolExecutor(max_workers=max(1, min(jobs, len(work) or 1))) as pool:
        futures = {pool.submit(_job, op, arch, dtype, i, use_cache): (op, arch, dtype, spec, chosen)
                   for op, arch, dtype, i, spec, chosen in work}
        for n, fut in enumerate(cf.as_completed(futures), 1):
            op, arch, dtype, spec, chosen = futures[fut]
            fn = spec["kernel"]
            name = getattr(getattr(fn, "fn", fn), "__name__", str(fn))
            limit = ARCH_LIMITS[arch]["shared"]
            warps, stages = spec.get("num_warps", 4), spec.get("num_stages", 3)
            try:
                ev = fut.result()
                regs, st, ld, shared = ev["registers"], ev["spill_stores"], ev["spill_loads"], ev["shared"]
                problem = []
                if shared > limit:
                    problem.append(f"shared {shared} B > {limit} B")
                if regs * 32 * warps > REGISTERS_PER_BLOCK:
                    problem.append(f"{regs} regs x {32 * warps} threads > {REGISTERS_PER_BLOCK}")
                rows.append(Row(op, name, spec.get("label", ""), arch, dtype, warps, stages, regs, st, ld, shared,
                                limit, chosen, "; ".join(problem), blocks_per_sm(arch, regs, warps, shared),
                                ev["mma"], ev["loads"], ev["main_loop"]))
            except Exception as e:  # a config that does not even compile is a problem too
                rows.append(Row(op, name, spec.get("label", ""), arch, dtype, warps, stages, -1, -1, -1, -1, limit,
                                chosen, f"compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"))
            if progress:
                progress(n, len(work))
    rows.sort(key=lambda r: (r.op, r.arch, r.dtype, r.kernel, r.label))
    return rows, missing


def format_rows(rows):
    head = ["op", "arch", "dtype", "kernel", "config", "warps", "stages", "regs", "spills st/ld", "shared B",
            "limit B", "blocks/SM", "MMA", "loads", "main loop", "status"]
    table = []
    for r in rows:
        if r.fits:
            notes = (["spills"] if r.spill_stores + r.spill_loads else []) + ([] if r.chosen else ["arch not enabled"])
            status = "ok" + (f" ({', '.join(notes)})" if notes else "")
        else:
            status = ("OVER: " if r.chosen else "not chosen: ") + r.problem
        table.append([r.op, f"sm_{r.arch}", r.dtype, r.kernel, r.label, str(r.num_warps), str(r.num_stages),
                      str(r.registers), f"{r.spill_stores}/{r.spill_loads}", str(r.shared), str(r.shared_limit),
                      str(r.blocks_per_sm), r.mma, r.loads, "-" if r.main_loop is None else str(r.main_loop), status])
    widths = [max([len(h)] + [len(row[i]) for row in table]) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table]
    return "\n".join(lines)


def _progress(n, total):
    print(f"\r  compiled {n}/{total}", end="", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.resources", description=__doc__.split("\n\n")[0])
    p.add_argument("--op", action="append", choices=OPS, help="only this op (repeatable)")
    p.add_argument("--arch", action="append", type=int, choices=sorted(ARCH_LIMITS), help="only this arch, e.g. 86")
    p.add_argument("--dtype", action="append", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: all cores)")
    p.add_argument("--no-cache", action="store_true", help="recompile even when a cached result exists")
    p.add_argument("--smoke", action="store_true", help="compile one config only (a quick self-check)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p.add_argument("--launched", action="store_true",
                   help="instead: what GPT-2's training shapes launch, compiled as launched, with blocks per SM, the "
                        "MMA, the loads and the main loop's SASS instructions (bench/launches.py)")
    args = p.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # we compile for real GPUs here, never interpret
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, stated (and its warning quiet)
    if args.launched:
        return _main_launched(args)
    rows, missing = collect(tuple(args.op or OPS), tuple(args.arch or ARCH_LIMITS), tuple(args.dtype or DTYPES),
                            args.jobs, not args.no_cache, args.smoke,
                            progress=_progress if sys.stderr.isatty() else None)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    for op, why in missing.items():
        print(f"{op}: {why}")
    if rows:
        print(format_rows(rows))
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
        os.replace(tmp, args.json)
    bad = [r for r in rows if r.chosen and not r.fits]
    if bad:
        print(f"\n{len(bad)} config(s) that the dispatcher can choose do not fit their arch", file=sys.stderr)
        return 1
    spilled = [r for r in rows if r.chosen and (r.spill_stores or r.spill_loads)]
    print(f"\n{len(rows)} compiled; every config the dispatcher can choose fits"
          + (f"; {len(spilled)} spill registers" if spilled else ""))
    return 0


def _main_launched(args) -> int:
    from . import launches

    workloads = launches.WORKLOADS if not args.op else tuple(
        w for w in launches.WORKLOADS if {"add_layer_norm": "layer_norm", "attention_dropout": "attention"}.get(w, w)
        in args.op)
    dtypes = tuple(args.dtype or ("fp16", "bf16"))
    rows = launches.collect(workloads, tuple(args.arch) if args.arch else None, dtypes, args.jobs, not args.no_cache,
                            progress=_progress if sys.stderr.isatty() else None)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    print(launches.format_table(rows))
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
        os.replace(tmp, args.json)
    spilled = [r for r in rows if r.spill_stores or r.spill_loads]
    print(f"\n{len(rows)} launches compiled as launched at GPT-2 124M's training shapes"
          + (f"; {len(spilled)} spill registers" if spilled else "; none spills"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
