"""Text generation: the book's greedy loop and its sampling ``generate``, with top-p, per-row eos,
prompts of different lengths, and a KV cache.

Each step is a small named function, so the loop reads as the algorithm: crop the context, run the
model, take the last position's logits, turn them into the next token. With the cache the model runs
the prompt once (:func:`prefill`) and then one token per step (:func:`decode_one_token`).
"""

from __future__ import annotations

import inspect

import torch

from .kv_cache import KVCache


def text_to_token_ids(text, tokenizer):
    """Encode ``text`` to a (1, T) tensor of ids (``<|endoftext|>`` allowed), as in the book."""
    encoded = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    return torch.tensor(encoded).unsqueeze(0)  # (1, T)


def token_ids_to_text(token_ids, tokenizer):
    """Decode a (1, T) or (T,) tensor of ids back to text."""
    flat = token_ids.squeeze(0)  # (T,)
    return tokenizer.decode(flat.tolist())


def _context_size(model, context_size):
    if context_size is not None:
        return int(context_size)
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        raise ValueError("pass context_size: the model has no .cfg to read context_length from")
    return cfg.context_length


def _check_idx(idx):
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.is_floating_point():
        raise ValueError("idx must be an integer tensor of token ids with shape (batch, tokens)")


def next_token_logits(model, idx, context_size):
    """Logits of the next token for each row: the model on the last ``context_size`` tokens. (B, V)."""
    idx_cond = idx[:, -context_size:]  # (B, <=context_size)
    with torch.no_grad():
        logits = model(idx_cond)  # (B, T, V)
    return logits[:, -1, :]  # (B, V)


def generate_text_simple(model, idx, max_new_tokens, context_size):
    """The book's chapter-4 loop: always append the most likely next token. idx (B, T) -> (B, T + n)."""
    _check_idx(idx)
    for _ in range(max_new_tokens):
        logits = next_token_logits(model, idx, context_size)
        probas = torch.softmax(logits, dim=-1)  # (B, V)
        idx_next = torch.argmax(probas, dim=-1, keepdim=True)  # (B, 1)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def apply_top_k(logits, top_k):
    """Keep the ``top_k`` largest logits of each row, the rest become -inf (ties at the k-th value kept)."""
    top_logits, _ = torch.topk(logits, min(top_k, logits.shape[-1]))
    min_val = top_logits[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < min_val, float("-inf"))


def apply_top_p(probs, top_p):
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability reaches ``top_p``,
    then renormalize. The most likely token is always kept."""
    sorted_probs, sorted_idx = torch.sort(probs, dim=-1, descending=True)
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    drop_sorted = cumulative - sorted_probs >= top_p  # mass before this token already reaches top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
    probs = probs.masked_fill(drop, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def sample_next(logits, temperature=0.0, top_k=None, top_p=None):
    """Pick each row's next token: top-k, then temperature, then top-p; greedy at temperature 0. (B, 1)."""
    if top_k is not None:
        logits = apply_top_k(logits, top_k)
    if temperature > 0.0:
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p is not None and top_p < 1.0:
            probs = apply_top_p(probs, top_p)
        return torch.multinomial(probs, num_samples=1)
    return torch.argmax(logits, dim=-1, keepdim=True)


# --------------------------------------------------------------------------------------------------
# Rows of different lengths: a right-padded buffer plus each row's length
# --------------------------------------------------------------------------------------------------


def _as_rows(idx, device):
    """A (B, T) tensor or a list of 1-D prompts -> list of 1-D long tensors, and whether it was a list."""
    if isinstance(idx, torch.Tensor):
        _check_idx(idx)
        return list(idx), False
    if not isinstance(idx, (list, tuple)) or not idx:
        raise ValueError("idx must be a (batch, tokens) tensor of token ids or a non-empty list of 1-D prompts")
    rows = []
    for i, row in enumerate(idx):
        row = torch.as_tensor(row, device=device if not isinstance(row, torch.Tensor) else row.device)
        if row.dim() != 1 or row.is_floating_point() or row.numel() == 0:
            raise ValueError(f"prompt {i} must be a non-empty 1-D sequence of integer token ids, got shape "
                             f"{tuple(row.shape)} and dtype {row.dtype}")
        rows.append(row.long())
    return rows, True


class _Sequences:
    """B token sequences in one right-padded (B, capacity) buffer; every row grows by one per step."""

    def __init__(self, rows, max_new_tokens):
        self.lengths = [len(r) for r in rows]
        self.tokens = rows[0].new_zeros(len(rows), max(self.lengths) + max_new_tokens)  # (B, capacity)
        for b, r in enumerate(rows):
            self.tokens[b, : len(r)] = r
        self.equal = len(set(self.lengths)) == 1

    def append(self, idx_next):  # idx_next (B, 1)
        if self.equal:
            self.tokens[:, self.lengths[0]] = idx_next[:, 0]
        else:
            self.tokens.scatter_(1, torch.tensor(self.lengths, device=self.tokens.device)[:, None], idx_next)
        self.lengths = [n + 1 for n in self.lengths]

    def window(self, context_size):
        """Each row's last ``context_size`` tokens, left-aligned and right-padded: (B, W) and each row's width."""
        widths = [min(n, context_size) for n in self.lengths]
        if self.equal:
            n = self.lengths[0]
            return self.tokens[:, n - widths[0]: n], widths
        x = self.tokens.new_zeros(len(widths), max(widths))  # (B, W); padding sits after each row's tokens
        for b, (n, w) in enumerate(zip(self.lengths, widths)):
            x[b, :w] = self.tokens[b, n - w: n]
        return x, widths

    def rows(self):
        return [self.tokens[b, :n] for b, n in enumerate(self.lengths)]


def _logits_at(logits, widths):
    """The logits at each row's last real position: (B, T, V) -> (B, V). Causal attention makes the
    padding after a row's tokens invisible to them."""
    if len(set(widths)) == 1:
        return logits[:, widths[0] - 1, :]
    last = torch.tensor(widths, device=logits.device) - 1
    return logits[torch.arange(logits.shape[0], device=logits.device), last, :]


# --------------------------------------------------------------------------------------------------
# One step each: uncached, prefill, decode
# --------------------------------------------------------------------------------------------------


def supports_cache(model) -> bool:
    """True when ``model.forward`` takes a ``cache`` (gptfast's GPTModel does; the book's does not)."""
    try:
        return getattr(model, "cfg", None) is not None and "cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def uncached_logits(model, seqs, context_size):
    """The model on each row's last ``context_size`` tokens; the next-token logits. (B, V)."""
    x, widths = seqs.window(context_size)
    with torch.no_grad():
        return _logits_at(model(x), widths)


def prefill(model, seqs, cache, context_size):
    """Empty the cache and run each row's last ``context_size`` tokens through the model, filling it. (B, V)."""
    x, widths = seqs.window(context_size)
    cache.reset()
    with torch.no_grad():
        logits = model(x, cache=cache)  # (B, W, V)
    cache.crop(widths)  # padded positions are overwritten by the next tokens
    return _logits_at(logits, widths)


def decode_one_token(model, idx_next, cache):
    """Run one new token per row against the cache. idx_next (B, 1) -> next-token logits (B, V)."""
    with torch.no_grad():
        return model(idx_next, cache=cache)[:, -1, :]


def _check_sampling(temperature, top_k, top_p):
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def _model_device(model):
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def generate_stream(model, idx, max_new_tokens, context_size=None, temperature=0.0, top_k=None, eos_id=None, *,
                    top_p=None, use_cache=None):
    """Yield each step's next tokens, (B, 1), as soon as they are chosen; arguments as :func:`generate`.

    Finished rows (with ``eos_id``) yield ``eos_id``; the stream ends once every row has finished,
    without yielding that last eos.
    """
    _check_sampling(temperature, top_k, top_p)
    context_size = _context_size(model, context_size)
    rows, _ = _as_rows(idx, _model_device(model))
    seqs = _Sequences(rows, max_new_tokens)
    if use_cache is None:
        use_cache = supports_cache(model)
    elif use_cache and not supports_cache(model):
        raise ValueError("use_cache=True needs a model whose forward takes a KV cache (gptfast.GPTModel); "
                         "pass use_cache=False for this model")
    cache = None
    if use_cache:
        capacity = min(context_size, model.cfg.context_length)
        cache = KVCache.for_model(model, batch_size=len(rows), capacity=capacity)
    finished = torch.zeros(len(rows), dtype=torch.bool, device=seqs.tokens.device)
    idx_next = None
    for _ in range(max_new_tokens):
        if cache is None:
            logits = uncached_logits(model, seqs, context_size)
        elif idx_next is None or max(cache.lengths) >= cache.capacity:
            # first step, or a row's window is full: positions shift, so every cached key is stale
            logits = prefill(model, seqs, cache, context_size)
        else:
            logits = decode_one_token(model, idx_next, cache)
        idx_next = sample_next(logits, temperature, top_k, top_p)  # (B, 1)
        if eos_id is not None:
            is_eos = idx_next.squeeze(1) == eos_id
            if bool((finished | is_eos).all()):
                return
            idx_next = idx_next.masked_fill(finished[:, None], eos_id)
            finished |= is_eos
        seqs.append(idx_next)
        yield idx_next


def generate(model, idx, max_new_tokens, context_size=None, temperature=0.0, top_k=None, eos_id=None, *, top_p=None,
             use_cache=None):
    """Generate up to ``max_new_tokens`` tokens after ``idx``; returns (B, T + n).

    The positional arguments are the book's chapter-5 ``generate``, in its order and with its
    defaults; ``top_p`` and ``use_cache`` are gptfast's additions and keyword-only.

    ``idx`` is a (B, T) tensor of token ids, or a list of 1-D prompts of different lengths (tensors or
    lists of ints); a list gives back a list of 1-D tensors, prompt then new tokens, each equal to
    what generating that prompt alone gives (with ``eos_id``, followed by eos padding if other rows
    ran longer).

    Greedy at ``temperature=0``; otherwise top-k, then temperature scaling, then top-p (nucleus)
    sampling, drawing from torch's default generator. With ``eos_id``, a row that produces it is
    finished: its later positions hold ``eos_id``, and generation stops once every row has finished
    (the final eos itself is not appended -- at batch size 1 this is the book's behaviour).
    ``context_size`` defaults to the model's ``context_length``.

    ``use_cache``: ``None`` (default) uses a KV cache when the model supports one (gptfast's
    ``GPTModel``) and the book's recompute-everything loop otherwise; ``True`` insists on the cache,
    ``False`` never uses it. Both give the book's tokens, under sampling too with the same seed (the
    tests hold the cached path to the book's own ``generate``); past ``context_size``
    the cached path re-runs the last ``context_size`` tokens at each step, as the uncached one does.
    """
    rows, as_list = _as_rows(idx, _model_device(model))
    stream = generate_stream(model, idx, max_new_tokens, context_size, temperature, top_k, eos_id, top_p=top_p,
                             use_cache=use_cache)
    new = [t for t in stream]
    if not as_list:
        return torch.cat([idx, *new], dim=1) if new else idx
    return [torch.cat([r, *(t[b] for t in new)]) for b, r in enumerate(rows)]
