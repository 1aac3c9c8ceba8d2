"""What the kernels launch at GPT-2's shapes, compiled exactly so for a GPU we do not have, and what
the compiled code says about speed.

``python -m bench.resources`` compiles every config the dispatcher may choose, from each kernel
module's ``resource_specs``. This module answers a narrower question precisely: at the shapes GPT-2
trains at, which kernels launch, with which arguments -- and so with which specializations, since
Triton specializes a launch on its arguments (an integer equal to 1 becomes a constant, pointers and
integers divisible by 16 are marked so, and both change the code: unit strides give vector or
asynchronous loads). The op's real entry point runs, forward and backward, on CPU tensors of the real
shapes, with every launch recorded instead of run; Triton's own binder turns each recorded launch
into the signature, constants and attributes that ``JITFunction.run`` would compile, and
``triton.compile`` compiles them for the named arch.

From the compiled kernel: registers and spills (``ptxas -v``), shared memory (the kernel's metadata),
blocks per SM (from the per-arch table :data:`SM_LIMITS`), and from the SASS (``nvdisasm``, shipped in
triton) the MMA instruction, the kind of global loads, and the number of instructions in the main
loop: the innermost loop, found from the backward branches, that holds the MMA (or, for kernels
without one, the innermost loop that loads from global memory).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field

# Per SM, by arch: the register file, resident threads, resident blocks and shared memory (bytes,
# what blocks may share in all), and the shared memory the driver reserves for each block. From
# NVIDIA's CUDA C++ Programming Guide, "Compute capabilities" table.
SM_LIMITS = {
    75: {"registers": 65536, "threads": 1024, "blocks": 16, "shared": 64 * 1024, "reserved": 0},
    80: {"registers": 65536, "threads": 2048, "blocks": 32, "shared": 164 * 1024, "reserved": 1024},
    86: {"registers": 65536, "threads": 1536, "blocks": 16, "shared": 100 * 1024, "reserved": 1024},
    89: {"registers": 65536, "threads": 1536, "blocks": 24, "shared": 100 * 1024, "reserved": 1024},
    90: {"registers": 65536, "threads": 2048, "blocks": 32, "shared": 228 * 1024, "reserved": 1024},
    120: {"registers": 65536, "threads": 1536, "blocks": 32, "shared": 100 * 1024, "reserved": 1024},
}
REGISTER_UNIT = 256  # registers are allocated to a warp in units of this many
# SMs of the card each arch's launches are recorded for (grids that size to the GPU read this).
REFERENCE_CARDS = {75: ("T4", 40), 80: ("A100", 108), 86: ("RTX 3090", 82), 89: ("RTX 4090", 128),
                   90: ("H100 SXM", 132), 120: ("RTX 5090", 170)}


def blocks_per_sm(arch: int, registers: int, num_warps: int, shared: int) -> int:
    """How many blocks of this kernel one SM holds at once (0: it does not fit)."""
    lim = SM_LIMITS[arch]
    per_warp = -(-max(registers, 1) * 32 // REGISTER_UNIT) * REGISTER_UNIT
    by_regs = lim["registers"] // (per_warp * num_warps)
    by_threads = lim["threads"] // (32 * num_warps)
    by_shared = lim["shared"] // (shared + lim["reserved"]) if shared or lim["reserved"] else lim["blocks"]
    return max(0, min(by_regs, by_threads, lim["blocks"], by_shared))


# --------------------------------------------------------------------------------------------------
# Recording launches
# --------------------------------------------------------------------------------------------------


@dataclass
class Launch:
    kernel: object  # the JITFunction
    args: tuple
    kwargs: dict
    grid: object

    @property
    def name(self) -> str:
        return self.kernel.__name__


KERNEL_MODULES = ("layer_norm", "feed_forward", "attention", "linear_cross_entropy")


@contextlib.contextmanager
def recording(arch: int | None = None):
    """Inside the block, every kernel launch of gptfast.kernels is appended to the yielded list and
    not run; a launcher that sizes its grid to the GPU sees the SMs of ``arch``'s reference card.
    Needs Triton's compiler, not its interpreter (``TRITON_INTERPRET`` unset)."""
    import types
    from unittest import mock

    import torch

    launches: list[Launch] = []
    sms = REFERENCE_CARDS[arch][1] if arch in REFERENCE_CARDS else 1
    card = types.SimpleNamespace(multi_processor_count=sms)

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(Launch(self.kernel, args, kwargs, grid))

    saved = {}
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"gptfast.kernels.{name}")
        saved[module] = module.wrap_triton
        module.wrap_triton = Recorder
    try:
        with mock.patch.object(torch.cuda, "get_device_properties", lambda *a, **k: card):
            yield launches
    finally:
        for module, fn in saved.items():
            module.wrap_triton = fn


def specialize(launch: Launch, arch: int):
    """``(ASTSource, options)`` that ``JITFunction.run`` would compile for this launch on ``sm_<arch>``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), options


def unit_strides(launch: Launch, arch: int) -> list[str]:
    """The integer arguments the launch specializes to the constant 1 (unit strides, mostly)."""
    src, _ = specialize(launch, arch)
    names = list(launch.kernel.arg_names)
    ones = []
    for key, value in src.constants.items():
        index = key[0] if isinstance(key, tuple) else key
        name = names[index] if isinstance(index, int) else index
        if value == 1 and src.signature.get(name) == "constexpr" and not launch.kernel.params[names.index(name)].is_constexpr:
            ones.append(name)
    return ones


# --------------------------------------------------------------------------------------------------
# Compiling and reading the compiled code
# --------------------------------------------------------------------------------------------------


def _tool(name):
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {name} in triton's nvidia backend: this triton cannot compile for NVIDIA GPUs")
    return path


def compile_launch(launch: Launch, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget

    src, options = specialize(launch, arch)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options.__dict__)


def ptxas_usage(compiled) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes), as :mod:`bench.resources` reads them."""
    from .resources import ptxas_usage as usage

    return usage(compiled)


def sass(compiled) -> str:
    """The kernel's SASS, as ``nvdisasm -c`` prints it (labels kept, so branches can be followed)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        out = subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    return out.stdout


_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
_PREDICATE = re.compile(r"^@!?U?P\w+\s+")
MMA_OPCODES = ("HGMMA", "HMMA", "IMMA", "DMMA", "UTCHMMA", "UTCQMMA", "QMMA", "OMMA")


def parse_sass(text: str) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """([(address, instruction)], {label: address}) of one kernel's SASS."""
    labels, instructions, pending = {}, [], []
    for line in text.splitlines():
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTRUCTION.search(line)
        if m:
            address = int(m.group(1), 16)
            for label in pending:
                labels[label] = address
            pending = []
            instructions.append((address, m.group(2)))
    return instructions, labels


def opcode(instruction: str) -> str:
    """``"@!P0 LDG.E.128 R4, desc[UR4][R2.64]"`` -> ``"LDG.E.128"``."""
    return _PREDICATE.sub("", instruction).split()[0]


def loops(instructions, labels) -> list[tuple[int, int]]:
    """Each backward branch as (first address, branch address): the loops of the kernel."""
    out = []
    for address, ins in instructions:
        if opcode(ins) in ("BRA", "BRA.U", "BRA.DIV") or opcode(ins).startswith("BRA"):
            t = _TARGET.search(ins)
            if t and t.group(1) in labels and labels[t.group(1)] < address:
                out.append((labels[t.group(1)], address))
    return out


def _body(instructions, loop):
    start, end = loop
    return [ins for a, ins in instructions if start <= a <= end]


def _is_mma(op):
    return op.split(".")[0] in MMA_OPCODES


def _is_global_load(op):
    return op.startswith(("LDG", "LDGSTS", "UTMALDG", "UBLKCP"))


def mma_loops(text: str) -> list[int]:
    """The instruction counts of every loop that holds an MMA, innermost loops only, in address order."""
    instructions, labels = parse_sass(text)
    found = [lp for lp in loops(instructions, labels) if any(_is_mma(opcode(i)) for i in _body(instructions, lp))]
    inner = [lp for lp in found if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in found)]
    return [len(_body(instructions, lp)) for lp in sorted(inner)]


def main_loop(instructions, labels) -> list[str] | None:
    """The innermost loop holding an MMA (else the innermost one loading from global memory)."""
    candidates = loops(instructions, labels)
    for wanted in (_is_mma, _is_global_load):
        found = [lp for lp in candidates if any(wanted(opcode(i)) for i in _body(instructions, lp))]
        if found:
            inner = min(found, key=lambda lp: lp[1] - lp[0])
            return _body(instructions, inner)
    return None


@dataclass
class SassSummary:
    main_loop: int | None  # instructions in the main loop (None: the kernel has no loop)
    mma: str  # the MMA opcode family in the kernel ("HGMMA", "HMMA", ... or "-")
    loads: str  # "tma", "async" (cp.async, LDGSTS), "vector" (64/128-bit LDG) or "scalar"
    loop_opcodes: dict = field(default_factory=dict)  # main-loop opcode families, most frequent first


def summarize(text: str) -> SassSummary:
    instructions, labels = parse_sass(text)
    ops = [opcode(i) for _, i in instructions]
    mma = sorted({o.split(".")[0] for o in ops if _is_mma(o)})
    if any(o.startswith("UTMALDG") for o in ops):
        loads = "tma"
    elif any(o.startswith("LDGSTS") for o in ops):
        loads = "async"
    elif any(o.startswith("LDG") and (".128" in o or ".64" in o) for o in ops):
        loads = "vector"
    else:
        loads = "scalar"
    body = main_loop(instructions, labels)
    counts = Counter(opcode(i).split(".")[0] for i in body) if body else Counter()
    return SassSummary(len(body) if body else None, "+".join(mma) or "-", loads, dict(counts.most_common(8)))


@dataclass
class Evidence:
    op: str
    kernel: str
    arch: int
    dtype: str
    constexprs: str  # the kernel's own constexpr arguments, as launched
    unit: str  # the arguments specialized to 1
    num_warps: int
    num_stages: int
    grid: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int
    blocks_per_sm: int
    mma: str
    loads: str
    main_loop: int | None


def evidence(op: str, launch: Launch, arch: int, dtype: str) -> Evidence:
    compiled = compile_launch(launch, arch)
    regs, st, ld = ptxas_usage(compiled)
    shared = int(compiled.metadata.shared)
    warps = int(compiled.metadata.num_warps)
    summary = summarize(sass(compiled))
    names = list(launch.kernel.arg_names)
    bound = dict(zip(names, launch.args)) | launch.kwargs
    own = {p.name: bound.get(p.name) for p in launch.kernel.params if p.is_constexpr and p.name in bound}
    grid = launch.grid(bound) if callable(launch.grid) else launch.grid
    programs = 1
    for g in grid:
        programs *= int(g)
    return Evidence(op, launch.name, arch, dtype, ", ".join(f"{k}={v}" for k, v in own.items()),
                    ",".join(unit_strides(launch, arch)), warps, int(compiled.metadata.num_stages), programs, regs,
                    st, ld, shared, blocks_per_sm(arch, regs, warps, shared), summary.mma, summary.loads,
                    summary.main_loop)


# --------------------------------------------------------------------------------------------------
# GPT-2's shapes
# --------------------------------------------------------------------------------------------------

ROWS = 8 * 1024  # 8 sequences of 1024 tokens
WIDTH, HEADS, VOCAB = 768, 12, 50257


WORKLOADS = ("layer_norm", "add_layer_norm", "feed_forward", "attention", "attention_dropout", "linear_cross_entropy")


def gpt2_launches(workload: str, arch: int, dtype, width: int = WIDTH) -> list[Launch]:
    """Every launch of one forward and backward of a workload at GPT-2 124M's training shapes on
    ``arch``: an op of :data:`WORKLOADS` (``attention_dropout``: attention at GPT-2's dropout, 0.1).
    ``width``: the model width for the layer norms (768 in GPT-2 124M, 1600 in GPT-2 XL)."""
    import torch

    op = {"add_layer_norm": "layer_norm", "attention_dropout": "attention"}.get(workload, workload)
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; workloads: {', '.join(WORKLOADS)}")
    kernels = importlib.import_module(f"gptfast.kernels.{op}")

    def t(*shape, grad=True, dt=dtype):
        x = torch.empty(*shape, dtype=dt)
        return x.requires_grad_() if grad else x

    with recording(arch) as launches:
        if workload == "layer_norm":
            y = kernels.layer_norm(t(ROWS, width), t(width), t(width), arch=arch)
            y.backward(torch.empty_like(y))
        elif workload == "add_layer_norm":
            s, y = kernels.add_layer_norm(t(ROWS, width), t(ROWS, width), t(width), t(width), arch=arch)
            torch.autograd.backward([s, y], [torch.empty_like(s), torch.empty_like(y)])
        elif op == "feed_forward":
            y = kernels.feed_forward(t(ROWS, WIDTH), t(4 * WIDTH, WIDTH), t(4 * WIDTH), t(WIDTH, 4 * WIDTH), t(WIDTH),
                                     arch=arch)
            y.backward(torch.empty_like(y))
        elif op == "attention":
            q, k, v = (t(8, HEADS, 1024, WIDTH // HEADS) for _ in range(3))
            y = kernels.causal_attention(q, k, v, dropout_p=0.1 if workload == "attention_dropout" else 0.0,
                                         arch=arch)
            y.backward(torch.empty_like(y))
        elif op == "linear_cross_entropy":
            loss = kernels.linear_cross_entropy(t(ROWS, WIDTH), t(VOCAB, WIDTH), torch.zeros(ROWS, dtype=torch.long),
                                                arch=arch)
            loss.backward()
    return launches


# --------------------------------------------------------------------------------------------------
# The table: every workload, arch and dtype, in parallel, cached
# --------------------------------------------------------------------------------------------------

DTYPES = ("fp16", "bf16", "fp32")


def supported_archs(workload: str) -> tuple[int, ...]:
    op = {"add_layer_norm": "layer_norm", "attention_dropout": "attention"}.get(workload, workload)
    return tuple(importlib.import_module(f"gptfast.kernels.{op}").SUPPORTED_ARCHS)


def _torch_dtype(name):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _cache_key(launch: Launch, arch: int) -> str:
    import hashlib
    import inspect
    import json

    import triton

    src, options = specialize(launch, arch)
    blob = json.dumps([inspect.getsource(launch.kernel.fn), triton.__version__, arch, repr(src.signature),
                       repr(sorted((repr(k), repr(v)) for k, v in src.constants.items())), repr(src.attrs),
                       repr(sorted(options.__dict__.items())), repr(launch.grid), 2], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _cache_dir():
    d = os.environ.get("GPTFAST_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "gptfast")
    return os.path.join(d, "launches")


def _job(workload, arch, dtype, use_cache):
    """In a worker process: the evidence of every launch of one workload on one arch and dtype."""
    import dataclasses
    import json

    os.environ.pop("TRITON_INTERPRET", None)
    out = []
    for launch in gpt2_launches(workload, arch, _torch_dtype(dtype)):
        path = os.path.join(_cache_dir(), _cache_key(launch, arch) + ".json")
        if use_cache and os.path.exists(path):
            with open(path) as f:
                cached = Evidence(**json.load(f))
            out.append(dataclasses.replace(cached, op=workload))  # one kernel can serve two workloads
            continue
        ev = evidence(workload, launch, arch, dtype)
        os.makedirs(_cache_dir(), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(dataclasses.asdict(ev), f)
        os.replace(tmp, path)
        out.append(ev)
    return out


def collect(workloads=WORKLOADS, archs=None, dtypes=("fp16", "bf16"), jobs=None, use_cache=True, progress=None):
    """Evidence rows for each workload on each of its supported archs (or those of ``archs`` it supports)."""
    import concurrent.futures as cf

    work = [(w, a, d) for w in workloads for a in supported_archs(w) if archs is None or a in archs for d in dtypes]
    rows = []
    with cf.ProcessPoolExecutor(max_workers=max(1, min(jobs or os.cpu_count() or 1, len(work) or 1))) as pool:
        futures = [pool.submit(_job, w, a, d, use_cache) for w, a, d in work]
        for n, fut in enumerate(cf.as_completed(futures), 1):
            rows += fut.result()
            if progress:
                progress(n, len(work))
    rows.sort(key=lambda r: (WORKLOADS.index(r.op), r.arch, DTYPES.index(r.dtype)))
    return rows


def format_table(rows) -> str:
    head = ["workload", "arch", "dtype", "kernel", "constexprs", "unit strides", "warps", "stages", "programs",
            "regs", "spills st/ld", "shared B", "blocks/SM", "MMA", "loads", "main loop"]
    body = [[r.op, f"sm_{r.arch}", r.dtype, r.kernel, r.constexprs, r.unit or "-", str(r.num_warps), str(r.num_stages),
             str(r.grid), str(r.registers), f"{r.spill_stores}/{r.spill_loads}", str(r.shared), str(r.blocks_per_sm),
             r.mma, r.loads, "-" if r.main_loop is None else str(r.main_loop)] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)
