"""Whole-model cases: the forward pass (and a training step on the CPU) per backend.

On a GPU: GPT-2 124M forward at batch 8 x 1024 tokens in bf16, reference vs triton vs ``torch.compile``
of the reference, in tokens/s. On a CPU: a small GPT's forward + backward step on the reference.
"""

from __future__ import annotations

import torch

from .harness import Case


def _model(cfg, backend, device, dtype=torch.float32):
    import gptfast

    torch.manual_seed(0)
    return gptfast.GPTModel(cfg, backend=backend).to(device=device, dtype=dtype)


def cases(ctx):
    import gptfast

    out = []
    if not (ctx.wants("model.train_step") or ctx.wants("model.forward")):
        return out
    if ctx.device == "cpu":
        cfg = gptfast.GPTConfig(vocab_size=50257, context_length=256, emb_dim=256, n_heads=4,
                                n_layers=2 if ctx.quick else 4, drop_rate=0.0)
        b, t = 4, 128 if ctx.quick else 256
        model = _model(cfg, "reference", "cpu")
        idx = torch.randint(0, cfg.vocab_size, (b, t))

        def step():
            model.zero_grad(set_to_none=True)
            logits = model(idx)
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten()).backward()

        # On the shared 2-core machine at busy times: 2.5 s a step at 4x128, L2 (the quick plan), 10 s at 4x256, L4.
        out.append(Case("model.train_step", f"{b}x{t} E{cfg.emb_dim} L{cfg.n_layers}", "reference", step, "tokens/s",
                        b * t, "fp32", "cpu", baseline=True, call_s=2.5 if ctx.quick else 10.0, setup_s=1.0))
        ctx.skip("model.forward at GPT-2 124M per backend: needs a CUDA GPU")
        return out

    cfg = gptfast.GPTConfig.from_name("gpt2", drop_rate=0.0)
    b, t = (2, 1024) if ctx.quick else (8, 1024)
    # a dry run lists the plan without touching the device (a GPU's plan can be listed without one)
    device = "meta" if ctx.dry_run else "cuda"
    idx = torch.randint(0, cfg.vocab_size, (b, t), device=device)
    impls = [("reference", "reference", False), ("triton", "triton", False), ("torch.compile", "reference", True)]
    for name, backend, compiled in impls:
        model = _model(cfg, backend, device, torch.bfloat16).eval()
        fn = torch.compile(model) if compiled else model

        def forward(fn=fn):
            with torch.no_grad():
                return fn(idx)

        try:
            if not ctx.dry_run:
                forward()  # compile / first launch outside the timing
        except (NotImplementedError, RuntimeError) as e:
            ctx.skip(f"model.forward [{name}]: {e}")
            continue
        out.append(Case("model.forward", f"{b}x{t} gpt2", name, forward, "tokens/s", b * t, "bf16", "cuda",
                        baseline=name == "reference", call_s=0.02 * b, setup_s=60.0 if compiled else 5.0))
    return out
