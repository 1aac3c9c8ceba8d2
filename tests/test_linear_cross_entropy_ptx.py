"""The fused head's kernels index rows in 64 bits: checked in the PTX that sm_90 runs.

The dispatcher accepts up to 2^31 rows, and a row index times a row stride passes 2^31 long before
that: x's rows x 768 at 2.8M rows, the (V, E) dW buffer's vocab rows x E at V > 2^31 / E. So every
``offs * stride`` that forms an address must be a 64-bit product.

How it is checked: the real launchers (``_forward`` / ``_backward``) run on meta tensors at GPT-2's
training shape (8,192 rows, hidden 768, vocabulary 50,257, bf16, no bias, sm_90's config) with the
launch recorded instead of run; Triton's own binder turns each recorded launch into the signature,
constants (the stride-1 arguments) and alignment attributes a real launch specializes on, and the
kernel is compiled for sm_90 exactly so. In the PTX, each row-stride parameter (``stride_xn``,
``stride_wv``, and ``E``, the row stride of the DX / DW buffers) is followed from its
``ld.param`` through register copies to every instruction that reads it: none may be a 32-bit product
(``mul.lo.s32``, ``mad.lo.s32``, ``shl.b32``, ...), at least one must be a 64-bit one
(``mul.wide.s32``, ``mul.lo.s64``, a sign-extending load into a 64-bit register, ...), and what the
64-bit products compute must reach a global load, store or ``cp.async`` address.

The check is shown to fail: the same kernels with their ``.to(tl.int64)`` casts deleted from a copy
of the source (the 32-bit kernels one would write without thinking) are compiled the same way, and
each of their row strides must then turn up in a 32-bit product.

The compiles need Triton's real compiler (not the interpreter), so they run in a subprocess with
``TRITON_INTERPRET`` unset; this file is that subprocess's script too.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS, HIDDEN, VOCAB = 8 * 1024, 768, 50257
BIG_ROWS = 4 * 1024 * 1024  # rows x hidden = 3.2e9 > 2^31: the launch specializes exactly as at ROWS
ARCH = 90
# the row strides of each kernel's global addresses, by argument name
ROW_STRIDES = {"_lce_fwd_kernel": ("stride_xn", "stride_wv"),
               "_lce_dx_kernel": ("stride_xn", "stride_wv", "E"),  # E: DX's row stride
               "_lce_dw_kernel": ("stride_xn", "stride_wv", "E")}  # E: DW's row stride

NARROW = re.compile(r"^(mul\.lo|mul\.hi|mad\.lo|mad\.hi|mul24|mad24)\.[su]32$|^shl\.b32$")
WIDE = re.compile(r"^(mul|mad)\.wide\.[su]32$|^(mul|mad)\.lo\.[su]64$|^cvt\.[su]64\.[su]32$|^shl\.b64$")
MEMORY = re.compile(r"^(ld\.global|st\.global|cp\.async|red\.global|atom\.global)")


# --------------------------------------------------------------------------------------------------
# The subprocess: record the launches, compile them for sm_90, read the PTX
# --------------------------------------------------------------------------------------------------


def _recorded_launches(module, rows):
    """[(kernel name, args, kwargs)] of one forward and one backward at (rows, HIDDEN) -> VOCAB, sm_90."""
    import torch

    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel.__name__, args, kwargs))

    saved = module.wrap_triton
    module.wrap_triton = Recorder
    try:
        x = torch.empty(rows, HIDDEN, device="meta", dtype=torch.bfloat16)
        w = torch.empty(VOCAB, HIDDEN, device="meta", dtype=torch.bfloat16)
        t = torch.empty(rows, device="meta", dtype=torch.long)
        lse = torch.empty(rows, device="meta", dtype=torch.float32)
        module._forward(x, w, None, t, -100, 0.0, 0.0, ARCH)  # GPT-2's head has no bias
        module._backward(lse, x, w, None, t, lse, 0.0, 0.0, ARCH)
    finally:
        module.wrap_triton = saved
    return launches


def _specialize(kernel, args, kwargs, backend):
    """What a launch with these arguments compiles: Triton's binder and _pack_args, as JITFunction.run."""
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    return kernel._pack_args(backend, kwargs, bound, specialization, options)


def _int32_variant(path, out_dir):
    """The kernels section of the module with every ``.to(tl.int64)`` deleted, imported from a copy."""
    src = open(path).read()
    kernels = src.split("# Configs")[0].rsplit("\n# ---", 1)[0]
    kernels = kernels.replace("from ._compat import wrap_triton\n", "")
    assert ".to(tl.int64)" in kernels
    variant = os.path.join(out_dir, "lce_int32_variant.py")
    with open(variant, "w") as f:
        f.write(kernels.replace(".to(tl.int64)", ""))
    spec = importlib.util.spec_from_file_location("lce_int32_variant", variant)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _instructions(ptx):
    """[(opcode, [operands])] of the PTX body, one per instruction."""
    out = []
    for line in ptx.splitlines():
        line = line.split("//")[0].strip()
        if not line or line.startswith((".", "{", "}", "$")) or line.endswith(":"):
            continue
        line = re.sub(r"^@!?%p\d+\s+", "", line).rstrip(";")
        parts = line.split(None, 1)
        operands = [o.strip() for o in re.split(r",(?![^\[]*\])", parts[1])] if len(parts) > 1 else []
        out.append((parts[0], operands))
    return out


def _registers(operand):
    return re.findall(r"%[a-z]+\d+", operand)


def stride_uses(ptx, kernel_name, param_index):
    """How the PTX uses one parameter: {'narrow': [...], 'wide': [...], 'reaches_memory': bool}.

    The parameter's registers are its ``ld.param`` destinations and their ``mov`` copies; every
    instruction reading one of them is a 32-bit product (narrow), a 64-bit one (wide; a sign-extending
    load straight into a 64-bit register counts, and its readers are followed), or something else
    (a compare, a loop bound). reaches_memory: some value computed from the wide products is part of
    a global memory instruction's address.
    """
    insts = _instructions(ptx)
    param = f"[{kernel_name}_param_{param_index}]"
    regs, wide_regs, narrow, wide = set(), set(), [], []
    for op, ops in insts:
        if op.startswith("ld.param") and ops[-1] == param:
            (wide_regs if ops[0].startswith("%rd") else regs).add(ops[0])
            if ops[0].startswith("%rd"):
                wide.append(f"{op} {', '.join(ops)}")
    changed = True
    while changed:  # register copies
        changed = False
        for op, ops in insts:
            if op.startswith("mov.") and len(ops) == 2 and ops[1] in regs | wide_regs:
                target = regs if ops[1] in regs else wide_regs
                if ops[0] not in target:
                    target.add(ops[0])
                    changed = True
    products = set()
    for op, ops in insts:
        srcs = [r for o in ops[1:] for r in _registers(o)]
        if op.startswith("mov.") or not ops:
            continue
        text = f"{op} {', '.join(ops)}"
        if any(r in regs for r in srcs):
            if NARROW.match(op):
                narrow.append(text)
            elif WIDE.match(op) or ops[0].startswith("%rd"):
                wide.append(text)
                products.add(ops[0])
        elif any(r in wide_regs for r in srcs) and ops[0].startswith("%rd"):
            wide.append(text)
            products.add(ops[0])
    # forward: does what the wide products compute feed an address?
    tainted, reaches = set(products), False
    changed = True
    while changed and not reaches:
        changed = False
        for op, ops in insts:
            if not ops:
                continue
            if MEMORY.match(op):
                addresses = [r for o in ops if "[" in o for r in _registers(o)]
                if any(r in tainted for r in addresses):
                    reaches = True
                    break
                continue
            if any(r in tainted for o in ops[1:] for r in _registers(o)) and ops[0] not in tainted \
                    and ops[0].startswith("%"):
                tainted.add(ops[0])
                changed = True
    return {"narrow": narrow, "wide": wide, "reaches_memory": reaches}


def _param_index(kernel, signature, name):
    """The PTX parameter number of argument ``name``: constexpr arguments are not parameters."""
    names = [p.name for p in kernel.params]
    return [n for n in names if signature[n] != "constexpr"].index(name)


def report(out_dir):
    """{variant: {kernel: {stride: stride_uses(...)}}} for the shipped kernels and the 32-bit copy."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    from gptfast.kernels import linear_cross_entropy as K

    target = GPUTarget("cuda", ARCH, 32)
    backend = make_backend(target)
    launches = _recorded_launches(K, ROWS)
    big = _recorded_launches(K, BIG_ROWS)
    result = {"same_specialization_at_big_rows": True}
    for (name, args, kwargs), (_, big_args, big_kwargs) in zip(launches, big):
        kernel = getattr(K, name)
        small = _specialize(kernel, args, kwargs, backend)
        large = _specialize(kernel, big_args, big_kwargs, backend)
        if repr(small[1:]) != repr(large[1:]):
            result["same_specialization_at_big_rows"] = False
    variant = _int32_variant(K.__file__, out_dir)
    for label, module in (("shipped", K), ("int32", variant)):
        per_kernel = {}
        for name, args, kwargs in launches:
            kernel = getattr(module, name)
            options, signature, constexprs, attrs = _specialize(kernel, args, kwargs, backend)
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
            ptx = compiled.asm["ptx"]
            per_kernel[name] = {
                "constexprs": sorted(n for n, t in signature.items() if t == "constexpr"),
                "strides": {s: stride_uses(ptx, name, _param_index(kernel, signature, s)) for s in ROW_STRIDES[name]},
            }
        result[label] = per_kernel
    return result


# --------------------------------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------------------------------


def test_row_offsets_are_64_bit_in_the_sm90_ptx(tmp_path):
    import pytest

    pytest.importorskip("triton", reason="compiles the Triton kernels for sm_90")
    from bench.resources import static_compile_supported

    if not static_compile_supported():
        pytest.skip(reason="compiling for a named GPU needs triton >= 3.3")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # compile for a real GPU
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [env.get("PYTHONPATH")] if p])
    out = subprocess.run([sys.executable, os.path.abspath(__file__), str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # the shape's row count is not baked in: 4M rows (rows x hidden > 2^31) compile the same kernels
    assert result["same_specialization_at_big_rows"]
    for name, strides in ROW_STRIDES.items():
        shipped, narrow32 = result["shipped"][name], result["int32"][name]
        # as launched: the unit strides are constants, the row strides runtime values
        assert {"stride_xe", "stride_we"} <= set(shipped["constexprs"]), shipped["constexprs"]
        for stride in strides:
            uses = shipped["strides"][stride]
            assert not uses["narrow"], f"{name}: {stride} in a 32-bit product: {uses['narrow']}"
            assert uses["wide"], f"{name}: {stride} in no 64-bit product"
            assert uses["reaches_memory"], f"{name}: {stride}'s 64-bit products feed no global address"
            # the check can fail: without the casts, the same stride shows up in 32-bit products
            assert narrow32["strides"][stride]["narrow"], \
                f"{name}: the 32-bit copy shows no 32-bit product of {stride}: the check sees nothing"


if __name__ == "__main__":
    print(json.dumps(report(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())))
