"""Text generation: the book's greedy loop and its sampling ``generate``, with top-p and per-row eos.

Each step is a small named function, so the loop reads as the algorithm: crop the context, run the
model, take the last position's logits, turn them into the next token.
"""

from __future__ import annotations

import torch


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


def generate(model, idx, max_new_tokens, context_size=None, temperature=0.0, top_k=None, top_p=None, eos_id=None):
    """Generate up to ``max_new_tokens`` tokens after ``idx`` (B, T); returns (B, T + n).

    Greedy at ``temperature=0``; otherwise top-k, then temperature scaling, then top-p (nucleus)
    sampling, drawing from torch's default generator. With ``eos_id``, a row that produces it is
    finished: its later positions hold ``eos_id``, and generation stops once every row has finished
    (the final eos itself is not appended -- at batch size 1 this is the book's behaviour).
    ``context_size`` defaults to the model's ``context_length``.
    """
    _check_idx(idx)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    context_size = _context_size(model, context_size)
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        logits = next_token_logits(model, idx, context_size)
        idx_next = sample_next(logits, temperature, top_k, top_p)  # (B, 1)
        if eos_id is not None:
            is_eos = idx_next.squeeze(1) == eos_id
            if bool((finished | is_eos).all()):
                break
            idx_next = idx_next.masked_fill(finished[:, None], eos_id)
            finished |= is_eos
        idx = torch.cat((idx, idx_next), dim=1)
    return idx
