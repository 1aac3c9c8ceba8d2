"""Output head + cross-entropy benchmarks: the fused loss beside the book's logits, in TFLOP/s and memory.

GPT-2 shapes: 8,192 rows (8 x 1024 tokens), hidden 768, 1024, 1600, vocabulary 50,257, bf16, forward
and backward (``linear_cross_entropy.fwd+bwd``). Implementations: ``torch`` (``F.cross_entropy`` of
the materialized logits ``out_head(x)``, the baseline), ``torch.compile`` of it, ``reference`` (the
chunked PyTorch op of ``gptfast.loss``), ``triton`` (the blockwise kernel), and ``liger`` (Liger-Kernel's
``LigerFusedLinearCrossEntropyLoss``) when it imports. FLOPs: the head's GEMM 2·N·E·V forward and
twice that backward (``x 3``); the kernel recomputes the logits twice more, which is not counted.
Each case's note gives the peak memory its call allocated beyond its inputs
(``torch.cuda.max_memory_allocated`` around one forward + backward). GPU only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .harness import Case, drop_live_inputs, kernel_arch, live_inputs

ROWS = 8 * 1024
VOCAB = 50257


def _torch_loss(x, w, t):
    return F.cross_entropy(F.linear(x, w).float(), t)


def _implementations(arch):
    from gptfast import reference

    impls = {"torch": _torch_loss, "torch.compile": torch.compile(_torch_loss),
             "reference": lambda x, w, t: reference.linear_cross_entropy(x, w, t)}
    if arch is not None:
        from gptfast.kernels import linear_cross_entropy as K

        impls["triton"] = lambda x, w, t: K.linear_cross_entropy(x, w, t, arch=arch)
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        impls["liger"] = lambda x, w, t: liger(w, x, t)
    except ImportError:
        pass
    return impls


def _inputs(e, dtype):
    g = torch.Generator(device="cuda").manual_seed(e)
    x = torch.randn(ROWS, e, device="cuda", generator=g).to(dtype).requires_grad_()
    w = (torch.randn(VOCAB, e, device="cuda", generator=g) / e ** 0.5).to(dtype).requires_grad_()
    t = torch.randint(0, VOCAB, (ROWS,), device="cuda", generator=g)
    return x, w, t


def _peak_gib(run):
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2 ** 30


def cases(ctx):
    if ctx.device != "cuda":
        ctx.skip("linear_cross_entropy: needs a CUDA GPU")
        return []
    from gptfast.kernels import linear_cross_entropy as K

    impls = _implementations(kernel_arch(ctx, "linear_cross_entropy", K))
    widths = (768, 1600) if ctx.quick else (768, 1024, 1600)
    op = "linear_cross_entropy.fwd+bwd"
    out = []
    for e in widths:
        flops = 3 * 2 * ROWS * e * VOCAB
        for impl, fn in impls.items():
            key = (op, e, impl)

            def run(fn=fn, key=key, e=e):
                x, w, t = live_inputs(key, lambda: _inputs(e, torch.bfloat16))
                return torch.autograd.grad(fn(x, w, t), (x, w))

            note = ""
            try:
                if not ctx.dry_run:
                    run()  # compile / first launch outside the timing
                    note = f"peak {_peak_gib(run):.2f} GiB"
            except (RuntimeError, NotImplementedError, ValueError) as err:
                drop_live_inputs()
                ctx.skip(f"{op} E={e} [{impl}]: {str(err).splitlines()[0][:160]}")
                continue
            out.append(Case(op, f"{ROWS}x{e}->{VOCAB}", impl, run, "TFLOP/s", flops, "bf16", "cuda",
                            baseline=impl == "torch", note=note, call_s=0.05,
                            setup_s={"torch.compile": 40.0, "triton": 10.0, "liger": 10.0}.get(impl, 1.0)))
    return out
