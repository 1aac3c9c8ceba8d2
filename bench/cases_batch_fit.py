"""The largest training batch that fits a memory budget, with the book's output head and the fused one.

GPT-2 124M on the triton backend, context 1024, bf16 autocast, one full step (forward, backward, clip,
AdamW). Two heads: ``book head`` (``logits = model(idx)`` then ``F.cross_entropy`` of the float logits:
B x 1024 x 50,257 logits, their fp32 copy and their gradient are kept) and ``fused head``
(``model(idx, targets=...)``: the blockwise ``linear_cross_entropy``, no logits). For each budget
(8, 12, 24 GiB; 8 in the quick plan; only those under the card's memory) the batch is binary-searched:
the largest B whose step's peak (``torch.cuda.max_memory_allocated`` after a reset, less what was
allocated before the model was built: weights, gradients, AdamW state and activations all count) stays
within the budget, an out-of-memory error counting as over. Each case then times a step at its
largest batch, in tokens/s, and its note gives the batch and its peak (the fused one also the book
head's batch). The search runs while the plan is built; a dry run searches nothing. GPU only.
"""

from __future__ import annotations

import functools

import torch

from .harness import Case, drop_live_inputs, live_inputs

OP = "train.batch_fit"
T = 1024
GIB = 2 ** 30
MAX_BATCH = 512  # the search's ceiling: 512 x 1024 tokens


def _step_fn(model, b, fused):
    from gptfast.train import make_optimizer

    opt = make_optimizer(model, lr=1e-4, weight_decay=0.1)
    g = torch.Generator(device="cuda").manual_seed(b)
    idx = torch.randint(0, model.cfg.vocab_size, (b, T + 1), device="cuda", generator=g)
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if fused:
                loss = model(x, targets=y)
            else:
                logits = model(x)  # (B, T, V)
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _build(cfg, b, fused):
    import gptfast

    torch.manual_seed(0)
    model = gptfast.GPTModel(cfg, backend="triton").cuda()
    return _step_fn(model, b, fused)


def _peak_bytes(cfg, b, fused):
    """Peak bytes of one step at batch ``b`` (model, optimizer state and activations), or None on OOM."""
    drop_live_inputs()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step = None
    try:
        step = _build(cfg, b, fused)
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        del step
        torch.cuda.empty_cache()


def largest_batch(fits, ceiling=MAX_BATCH):
    """The largest b in [1, ceiling] with ``fits(b)`` (monotone: fits(b) implies fits(b - 1)); 0 if none."""
    lo, hi = 0, 1
    while hi <= ceiling and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, ceiling + 1)
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def cases(ctx):
    if not ctx.wants(OP):
        return []
    if ctx.device != "cuda":
        ctx.skip(f"{OP}: the largest GPT-2 124M batch in a memory budget, book vs fused head, needs a CUDA GPU")
        return []
    import gptfast
    from gptfast.kernels import linear_cross_entropy as K

    from .harness import kernel_arch

    if kernel_arch(ctx, OP, K) is None:
        return []
    cfg = gptfast.GPTConfig.from_name("gpt2", drop_rate=0.0)
    total = ctx.info.memory_bytes or torch.cuda.get_device_properties(0).total_memory
    budgets = [g for g in ((8,) if ctx.quick else (8, 12, 24)) if g * GIB <= total]
    if not budgets:
        ctx.skip(f"{OP}: the card has {total / GIB:.1f} GiB, under the smallest budget (8 GiB)")
        return []
    heads = (("book head", False), ("fused head", True))
    peak = {fused: functools.lru_cache(maxsize=None)(functools.partial(_peak_bytes, cfg, fused=fused))
            for _, fused in heads}
    out = []
    for gib in budgets:
        found = {}
        for impl, fused in heads:
            if ctx.dry_run:
                found[fused] = (4 * gib, None)  # a guess, for the plan's time budget only
                continue
            try:
                b = largest_batch(lambda b: (p := peak[fused](b)) is not None and p <= gib * GIB)
            except (RuntimeError, NotImplementedError, ValueError) as err:
                ctx.skip(f"{OP} {gib} GiB [{impl}]: {str(err).splitlines()[0][:160]}")
                continue
            if b == 0:
                ctx.skip(f"{OP} {gib} GiB [{impl}]: not even batch 1 fits")
                continue
            found[fused] = (b, peak[fused](b))
        for impl, fused in heads:
            if fused not in found:
                continue
            b, p = found[fused]
            note = "dry run: batch searched at run time" if p is None else f"batch {b} fits (peak {p / GIB:.1f} GiB)"
            if fused and p is not None and False in found:
                note += f"; book head: batch {found[False][0]}"

            def run(b=b, fused=fused, key=(OP, b, fused)):
                return live_inputs(key, lambda: _build(cfg, b, fused))()

            out.append(Case(OP, f"gpt2 {gib} GiB Bx{T}", impl, run, "tokens/s", b * T, "bf16", "cuda",
                            baseline=not fused, note=note, call_s=0.06 * b,
                            # the search: about 2 log2(B) steps of up to B sequences, a model built for each
                            setup_s=30.0 + 0.5 * b))
    drop_live_inputs()
    return out
