"""Generation throughput: new tokens/s with the KV cache vs recomputing the whole context each step.

On a GPU: GPT-2 124M in bf16, a 32-token prompt, 512 new tokens (128 with --quick), batch 1 and 8.
Target: cached >= 3x uncached at 512 new tokens. On a CPU: a small GPT, 64 new tokens (32 with --quick).
"""

from __future__ import annotations

import torch

from .harness import Case


def cases(ctx):
    import gptfast
    from gptfast.generation import generate

    if not ctx.wants("generate"):
        return []
    if ctx.device == "cpu":
        cfg = gptfast.GPTConfig(vocab_size=8192, context_length=256, emb_dim=128, n_heads=4, n_layers=4,
                                drop_rate=0.0)
        new_tokens, dtype, name = (32 if ctx.quick else 64), torch.float32, "small"
        ctx.skip("generate at GPT-2 124M, 512 new tokens: needs a CUDA GPU")
    else:
        cfg = gptfast.GPTConfig.from_name("gpt2", drop_rate=0.0)
        new_tokens, dtype, name = (128 if ctx.quick else 512), torch.bfloat16, "gpt2"
    torch.manual_seed(0)
    # a dry run lists the plan without touching the device (a GPU's plan can be listed without one)
    model = None if ctx.dry_run else gptfast.GPTModel(cfg).to(ctx.device, dtype).eval()
    out = []
    # Seconds a call on the shared 2-core machine at busy times, by (batch, cached), at the quick
    # plan's 32 new tokens (the full plan's 64 are held at 3x: the uncached cost grows faster than the
    # count); on a GPU, 10 ms a new token, generously.
    cpu_s = {(1, False): 1.5, (1, True): 0.7, (8, False): 4.0, (8, True): 0.7}
    for batch in (1, 8):
        prompt = None if ctx.dry_run else torch.randint(0, cfg.vocab_size, (batch, 32), device=ctx.device)
        for use_cache in (False, True):
            def run(prompt=prompt, use_cache=use_cache):
                return generate(model, prompt, new_tokens, use_cache=use_cache)

            out.append(Case("generate", f"b{batch} 32+{new_tokens} {name}", "cached" if use_cache else "uncached",
                            run, "tokens/s", batch * new_tokens, "bf16" if dtype == torch.bfloat16 else "fp32",
                            ctx.device, baseline=not use_cache,
                            call_s=(cpu_s[batch, use_cache] * (1 if ctx.quick else 3) if ctx.device == "cpu"
                                    else 0.01 * new_tokens),
                            setup_s=1.0 if not out else 0.0))
    return out
