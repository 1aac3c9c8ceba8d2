"""Feed-forward benchmarks: the fused Triton GEMMs beside PyTorch, in TFLOP/s.

GPT-2 shapes: 8 x 1024 tokens, widths 768, 1024, 1280, 1600 (hidden 4x), bf16. Implementations:
``torch`` (cuBLAS linears and ``F.gelu(approximate="tanh")``, the baseline), ``book`` (the reference:
the book's composite tanh GELU between two linears), ``torch.compile`` of the reference, and ``triton``.
``feed_forward.fwd`` and ``feed_forward.fwd+bwd``; FLOPs: two GEMMs of 2·M·E·H forward, twice that
again backward (``x`` 3 for forward + backward). Targets on a GPU: forward + backward at least 1.05x
``torch`` (1.15x ``book``) and at least ``torch.compile``. ``--quick``: widths 768 and 1600.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .harness import Case, drop_live_inputs, kernel_arch, live_inputs

TOKENS = 8 * 1024


def _torch_ff(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)


def _implementations(arch):
    from gptfast import reference
    from gptfast.kernels import feed_forward as K

    impls = {"torch": _torch_ff, "book": reference.feed_forward,
             "torch.compile": torch.compile(reference.feed_forward)}
    if arch is not None:
        impls["triton"] = lambda *a: K.feed_forward(*a, arch=arch)
    return impls


def _inputs(e, dtype, grad):
    g = torch.Generator(device="cuda").manual_seed(e)
    h = 4 * e
    ts = [torch.randn(TOKENS, e, device="cuda", generator=g),
          torch.randn(h, e, device="cuda", generator=g) / e ** 0.5, torch.zeros(h, device="cuda"),
          torch.randn(e, h, device="cuda", generator=g) / h ** 0.5, torch.zeros(e, device="cuda")]
    ts = [t.to(dtype).requires_grad_(grad) for t in ts]
    dy = torch.randn(TOKENS, e, device="cuda", dtype=dtype, generator=g)
    return ts, dy


def cases(ctx):
    if ctx.device != "cuda":
        ctx.skip("feed_forward: needs a CUDA GPU")
        return []
    from gptfast.kernels import feed_forward as K

    impls = _implementations(kernel_arch(ctx, "feed_forward", K))
    widths = (768, 1600) if ctx.quick else (768, 1024, 1280, 1600)
    out = []
    for e in widths:
        flops = 2 * (2 * TOKENS * e * 4 * e)  # two GEMMs, 2·M·E·H each
        for op, backward in (("feed_forward.fwd", False), ("feed_forward.fwd+bwd", True)):
            for impl, fn in impls.items():
                key = (op, e, impl)

                def run(fn=fn, key=key, backward=backward, e=e):
                    ts, dy = live_inputs(key, lambda: _inputs(e, torch.bfloat16, backward))
                    if not backward:
                        with torch.no_grad():
                            return fn(*ts)
                    return torch.autograd.grad(fn(*ts), ts, dy)

                try:
                    if not ctx.dry_run:
                        run()  # compile / first launch outside the timing
                except (RuntimeError, NotImplementedError, ValueError) as err:
                    drop_live_inputs()
                    ctx.skip(f"{op} E={e} [{impl}]: {str(err).splitlines()[0][:160]}")
                    continue
                out.append(Case(op, f"{TOKENS}x{e}->{4 * e}", impl, run, "TFLOP/s", flops * (3 if backward else 1),
                                "bf16", "cuda", baseline=impl == "torch",
                                setup_s={"torch.compile": 30.0, "triton": 5.0}.get(impl, 0.5)))
    return out
