"""Attention benchmarks: the Triton flash attention beside PyTorch's, in TFLOP/s (GB/s for decode).

Causal self-attention at GPT-2 scale -- 12 heads of D = 64, batch x tokens = 16k tokens, T = 512, 1024,
2048, 4096 -- in bf16, q/k/v in the layout the model's projections produce (``view(B, T, H, D)
.transpose(1, 2)``). Implementations: ``sdpa-flash`` (``F.scaled_dot_product_attention`` restricted
to its flash backend; the baseline of every group), ``reference`` (the book's math, the (T, T) matrix
in memory), ``torch.compile`` of the reference, and ``triton``. Ops:

* ``attention.fwd`` -- the forward pass; work = 4 B H T^2 D / 2 FLOPs (two matmuls, half the matrix
  under the causal mask).
* ``attention.fwd+bwd`` -- forward and backward; work = 3.5x the forward's (the backward does 2.5x
  the forward's matmul work: dV, dP, dQ, dK plus recomputing S).
* ``attention.fwd+bwd p=0.1`` -- the same with the book's attention dropout (T = 1024).
* ``attention.decode`` -- one new query per row against a KV cache of Tk tokens (B = 8, H = 12);
  work = the bytes of K and V read, in GB/s. The baseline is SDPA with the cache's boolean mask.

Targets on a GPU: ``attention.fwd`` >= 1.0x ``sdpa-flash`` at T >= 1024, ``attention.fwd+bwd`` >=
0.9x. ``--quick``: T = 1024 and 4096, no dropout or decode groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .harness import Case, drop_live_inputs, kernel_arch, live_inputs

HEADS, HEAD_DIM, TOKENS = 12, 64, 16 * 1024
_DTYPES = {"bf16": torch.bfloat16}



def _qkv(b, t, dtype, requires_grad, t_k=None):
    """q, k, v (B, H, T, D) strided like the projections' output, and the output gradient."""
    g = torch.Generator(device="cuda").manual_seed(b * 7 + t)
    t_k = t if t_k is None else t_k

    def make(n):
        x = torch.randn(b, n, HEADS, HEAD_DIM, device="cuda", dtype=dtype, generator=g).transpose(1, 2)
        return x.requires_grad_(requires_grad)

    return make(t), make(t_k), make(t_k), torch.randn(b, HEADS, t, HEAD_DIM, device="cuda", dtype=dtype, generator=g)


def _implementations(arch):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from gptfast import reference
    from gptfast.kernels import attention as K

    def sdpa_flash(q, k, v, dropout_p=0.0):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)

    def ref(q, k, v, dropout_p=0.0):
        return reference.causal_attention(q, k, v, dropout_p=dropout_p)

    impls = {"sdpa-flash": sdpa_flash, "reference": ref, "torch.compile": torch.compile(ref, dynamic=False)}
    if arch is not None:
        impls["triton"] = lambda q, k, v, dropout_p=0.0: K.causal_attention(q, k, v, dropout_p=dropout_p, arch=arch)
    return impls


def _fwd_case(key, fn, b, t, dtype, p):
    def fwd():
        q, k, v, _ = live_inputs(key, lambda: _qkv(b, t, dtype, False))
        with torch.no_grad():
            return fn(q, k, v, dropout_p=p)
    return fwd


def _fwd_bwd_case(key, fn, b, t, dtype, p):
    def fwd_bwd():
        q, k, v, do = live_inputs(key, lambda: _qkv(b, t, dtype, True))
        return torch.autograd.grad(fn(q, k, v, dropout_p=p), (q, k, v), do)
    return fwd_bwd


# Seconds to get an implementation ready before its first timed call: torch.compile traces and
# compiles the reference for each new shape; Triton compiles its kernels once per config.
SETUP_S = {"torch.compile": 30.0, "triton": 5.0}


def _group(op, t, dtype_name, impls, p=0.0, dry_run=False):
    dtype = _DTYPES[dtype_name]
    b = max(1, TOKENS // t)
    flops = 4 * b * HEADS * t * t * HEAD_DIM / 2  # causal forward: QK^T and PV over half the matrix
    backward = op.startswith("attention.fwd+bwd")
    for impl, fn in impls.items():
        key = (op, t, dtype_name, impl)
        make = _fwd_bwd_case if backward else _fwd_case
        case_fn = make(key, fn, b, t, dtype, p)
        try:
            if not dry_run:
                case_fn()  # compile / first launch outside the timing; a backend that cannot run is skipped
        except (RuntimeError, NotImplementedError, ValueError) as e:
            drop_live_inputs()
            yield ("skip", f"{op} T={t} [{impl}]: {str(e).splitlines()[0][:160]}")
            continue
        yield ("case", Case(op, f"{b}x{HEADS}x{t}x{HEAD_DIM}", impl, case_fn, "TFLOP/s",
                            flops * (3.5 if backward else 1.0), dtype_name, "cuda",
                            baseline=impl == "sdpa-flash", note=f"causal, p={p}",
                            call_s=0.05 if impl == "reference" else 0.01, setup_s=SETUP_S.get(impl, 0.5)))


def _decode_cases(t_k, arch):
    from gptfast import reference
    from gptfast.kernels import attention as K

    b, dtype = 8, torch.bfloat16
    bytes_read = 2 * b * HEADS * t_k * HEAD_DIM * 2  # K and V, bf16

    def setup():
        q, k, v, _ = _qkv(b, 1, dtype, False, t_k=t_k)
        seqlens = torch.full((b,), t_k - 1, device="cuda", dtype=torch.long)
        seqlens[::2] = t_k // 2  # rows at different lengths
        mask = ~reference.causal_mask(1, t_k, seqlens, device="cuda")  # (B, 1, 1, Tk), True = visible
        return q, k, v, seqlens, mask

    impls = {
        "sdpa": lambda q, k, v, s, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
        "reference": lambda q, k, v, s, m: reference.causal_attention(q, k, v, cache_seqlens=s),
    }
    if arch is not None:
        impls["triton"] = lambda q, k, v, s, m: K.causal_attention(q, k, v, cache_seqlens=s, arch=arch)
    out = []
    for impl, fn in impls.items():
        key = ("decode", t_k, impl)

        def decode(fn=fn, key=key):
            with torch.no_grad():
                return fn(*live_inputs(key, setup))

        out.append(Case("attention.decode", f"{b}x{HEADS}x1x{t_k}x{HEAD_DIM}", impl, decode, "GB/s", bytes_read,
                        "bf16", "cuda", baseline=impl == "sdpa", note="KV cache, rows at two lengths",
                        setup_s=SETUP_S.get(impl, 0.5)))
    return out


def cases(ctx):
    if ctx.device != "cuda":
        ctx.skip("attention: needs a CUDA GPU")
        return []
    from gptfast.kernels import attention as K

    arch = kernel_arch(ctx, "attention", K)
    impls = _implementations(arch)
    lengths = (1024, 4096) if ctx.quick else (512, 1024, 2048, 4096)
    groups = [("attention.fwd", t, 0.0) for t in lengths] + [("attention.fwd+bwd", t, 0.0) for t in lengths]
    if not ctx.quick:
        groups.append(("attention.fwd+bwd p=0.1", 1024, 0.1))
    out = []
    for op, t, p in groups:
        if not ctx.wants(op):
            continue
        for kind, item in _group(op, t, "bf16", impls, p, ctx.dry_run):
            if kind == "skip":
                ctx.skip(item)
            else:
                out.append(item)
    if not ctx.quick and ctx.wants("attention.decode"):
        for t_k in (512, 2048, 8192):
            out += _decode_cases(t_k, arch)
    return out
