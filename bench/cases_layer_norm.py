"""Layer norm benchmarks: the Triton kernel beside the reference and ``F.layer_norm``, in GB/s.

GPT-2 shapes: rows = batch x tokens (8 x 1024 and 16 x 1024), widths 768, 1024, 1280, 1600 (the four
GPT-2 sizes), bf16 and fp32. For each: ``layer_norm.fwd``, ``layer_norm.bwd`` (the backward alone, on a
retained graph), ``layer_norm.fwd+bwd``, and the fused residual step ``add_layer_norm.fwd`` /
``add_layer_norm.fwd+bwd``. ``torch`` (``F.layer_norm``, after a plain ``x + branch`` for the residual
step) is the baseline of every group.

Layer norm is bound by memory traffic, so ``work`` counts the bytes an ideal implementation must move
(every row tensor read or written once, the per-row mean and rstd between forward and backward);
"% peak" compares with the device's measured copy bandwidth. Targets: forward and backward each at
85% of it or more, the backward 1.5x ``F.layer_norm`` or more. ``--quick``: 16 x 1024 rows, widths 768
and 1600, bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .harness import Case, kernel_arch, live_inputs

EPS = 1e-5
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}



def _implementations(arch, n):
    from gptfast import reference
    from gptfast.kernels import layer_norm as K

    def torch_add_layer_norm(x, branch, w, b):
        s = x + branch
        return s, F.layer_norm(s, (n,), w, b, EPS)

    impls = {
        "torch": (lambda x, w, b: F.layer_norm(x, (n,), w, b, EPS), torch_add_layer_norm),
        "reference": (lambda x, w, b: reference.layer_norm(x, w, b, EPS),
                      lambda x, r, w, b: reference.add_layer_norm(x, r, w, b, EPS)),
    }
    if arch is not None:
        impls["triton"] = (lambda x, w, b: K.layer_norm(x, w, b, EPS, arch=arch),
                           lambda x, r, w, b: K.add_layer_norm(x, r, w, b, EPS, arch=arch))
    return impls


def _inputs(m, n, dtype, requires_grad):
    g = torch.Generator(device="cuda").manual_seed(m + n)
    x, branch, dy, ds = (torch.randn(m, n, device="cuda", dtype=dtype, generator=g) for _ in range(4))
    w = (1 + 0.1 * torch.randn(n, device="cuda", generator=g)).to(dtype)
    b = (0.1 * torch.randn(n, device="cuda", generator=g)).to(dtype)
    for t in (x, branch, w, b):
        t.requires_grad_(requires_grad)
    return x, branch, w, b, dy, ds


def _group_cases(m, n, dtype_name, impls, note):
    """The five ops for one (rows, width, dtype), every implementation of each."""
    dtype = _DTYPES[dtype_name]
    e = torch.finfo(dtype).bits // 8  # bytes per element
    rows, row_params, stats = m * n * e, n * e, 8 * m  # one (M, N) tensor, one (N,) tensor, mean + rstd
    work = {
        "layer_norm.fwd": 2 * rows + 2 * row_params,  # x in, y out; w, b in
        "layer_norm.bwd": 3 * rows + 3 * row_params + stats,  # x, dy in, dx out; w in, dw, db out
        "layer_norm.fwd+bwd": 5 * rows + 5 * row_params + 2 * stats,
        "add_layer_norm.fwd": 4 * rows + 2 * row_params,  # x, branch in; s, y out
        "add_layer_norm.fwd+bwd": 8 * rows + 5 * row_params + 2 * stats,  # + ds, dy, s in, dx out
    }
    out = []
    for op, bytes_moved in work.items():
        for impl, (ln, add_ln) in impls.items():
            key = (op, m, n, dtype_name, impl)
            fn = _case_fn(op, key, m, n, dtype, ln, add_ln)
            # first call: the inputs are made, and Triton compiles for a new width
            out.append(Case(op, f"{m}x{n}", impl, fn, "GB/s", bytes_moved, dtype_name, "cuda",
                            baseline=impl == "torch", note=note, setup_s=2.0 if impl == "triton" else 0.2))
    return out


def _case_fn(op, key, m, n, dtype, ln, add_ln):
    if op == "layer_norm.fwd":
        def fwd():
            x, _, w, b, _, _ = live_inputs(key, lambda: _inputs(m, n, dtype, False))
            with torch.no_grad():
                return ln(x, w, b)
        return fwd
    if op == "add_layer_norm.fwd":
        def add_fwd():
            x, r, w, b, _, _ = live_inputs(key, lambda: _inputs(m, n, dtype, False))
            with torch.no_grad():
                return add_ln(x, r, w, b)
        return add_fwd
    if op == "layer_norm.bwd":
        def setup():
            x, _, w, b, dy, _ = _inputs(m, n, dtype, True)
            return x, w, b, dy, ln(x, w, b)

        def bwd():
            x, w, b, dy, y = live_inputs(key, setup)
            return torch.autograd.grad(y, (x, w, b), dy, retain_graph=True)
        return bwd
    if op == "layer_norm.fwd+bwd":
        def fwd_bwd():
            x, _, w, b, dy, _ = live_inputs(key, lambda: _inputs(m, n, dtype, True))
            return torch.autograd.grad(ln(x, w, b), (x, w, b), dy)
        return fwd_bwd

    def add_fwd_bwd():
        x, r, w, b, dy, ds = live_inputs(key, lambda: _inputs(m, n, dtype, True))
        s, y = add_ln(x, r, w, b)
        return torch.autograd.grad((s, y), (x, r, w, b), (ds, dy))
    return add_fwd_bwd


def cases(ctx):
    if ctx.device != "cuda":
        ctx.skip("layer_norm: needs a CUDA GPU")
        return []
    from gptfast.kernels import layer_norm as K

    arch = kernel_arch(ctx, "layer_norm", K)
    if ctx.quick:
        batches, widths, dtypes = (16,), (768, 1600), ("bf16",)
    else:
        batches, widths, dtypes = (8, 16), (768, 1024, 1280, 1600), ("bf16", "fp32")
    out = []
    for dtype_name in dtypes:
        for batch in batches:
            for n in widths:
                out += _group_cases(batch * 1024, n, dtype_name, _implementations(arch, n),
                                    note=f"{batch}x1024 tokens")
    return out
