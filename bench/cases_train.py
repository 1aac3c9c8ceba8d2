"""Training throughput: one full trainer step (forward, backward, clipping, AdamW) per backend.

On a GPU: GPT-2 124M at context 1024 under bf16 autocast, the triton backend vs the reference vs the
reference under ``torch.compile``, in tokens/s, and again in TFLOP/s, whose "% peak" column is the
MFU (nanoGPT's 6N + 12LHQT FLOPs per token). Target: triton >= 1.3x the reference and >= the compiled
reference. On a CPU: a small GPT on the reference, the same step, fp32.
"""

from __future__ import annotations

import contextlib

import torch

from .harness import Case


def _step_fn(model, idx, device, bf16, compiled):
    from gptfast.train import make_optimizer

    opt = make_optimizer(model, lr=1e-4, weight_decay=0.1)
    fn = torch.compile(model) if compiled else model
    autocast = torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step():
        with autocast:
            logits = fn(idx)  # (B, T, V)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), idx.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def cases(ctx):
    import gptfast
    from gptfast.train import flops_per_token, matmul_parameters

    out = []
    if not any(ctx.wants(op) for op in ("train.step", "train.step.flops")):
        return out
    if ctx.device == "cpu":
        cfg = gptfast.GPTConfig(vocab_size=8192, context_length=128, emb_dim=128, n_heads=4,
                                n_layers=2 if ctx.quick else 4, drop_rate=0.0)
        b = 4
        torch.manual_seed(0)
        model = gptfast.GPTModel(cfg, backend="reference")
        idx = torch.randint(0, cfg.vocab_size, (b, cfg.context_length))
        out.append(Case("train.step", f"{b}x{cfg.context_length} E{cfg.emb_dim} L{cfg.n_layers}", "reference",
                        _step_fn(model, idx, "cpu", False, False), "tokens/s", b * cfg.context_length, "fp32", "cpu",
                        baseline=True, note="forward + backward + clip + AdamW",
                        call_s=1.0 if ctx.quick else 2.0, setup_s=2.0))
        ctx.skip("train.step at GPT-2 124M, bf16, per backend (and MFU): needs a CUDA GPU")
        return out

    cfg = gptfast.GPTConfig.from_name("gpt2", drop_rate=0.0)
    b, t = (4, 1024) if ctx.quick else (8, 1024)
    # a dry run lists the plan without touching the device (a GPU's plan can be listed without one)
    device = "meta" if ctx.dry_run else "cuda"
    idx = torch.randint(0, cfg.vocab_size, (b, t), device=device)
    for name, backend, compiled in [("reference", "reference", False), ("triton", "triton", False),
                                    ("torch.compile", "reference", True)]:
        torch.manual_seed(0)
        model = gptfast.GPTModel(cfg, backend=backend).to(device)
        step = _step_fn(model, idx, "cuda", True, compiled)
        try:
            if not ctx.dry_run:
                step()  # compile / first launch outside the timing
        except (NotImplementedError, RuntimeError) as e:
            ctx.skip(f"train.step [{name}]: {e}")
            continue
        flops = flops_per_token(cfg, matmul_parameters(model)) * b * t
        shape = f"{b}x{t} gpt2"
        call_s = 0.06 * b  # a 124M step at context 1024 on a recent GPU, generously
        out.append(Case("train.step", shape, name, step, "tokens/s", b * t, "bf16", "cuda",
                        baseline=name == "reference", call_s=call_s, setup_s=90.0 if compiled else 5.0))
        out.append(Case("train.step.flops", shape, name, step, "TFLOP/s", flops, "bf16", "cuda",
                        baseline=name == "reference", note="% peak = MFU", call_s=call_s))
    return out
