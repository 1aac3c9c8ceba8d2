"""The book's cached greedy loop."""

from ...generation import generate
from .utils import KVCache

__all__ = ["generate_text_simple", "KVCache"]


def generate_text_simple(model, idx, max_new_tokens, context_size=None, use_cache=True):
    """Append the most likely next token ``max_new_tokens`` times. idx (B, T) -> (B, T + n).

    With ``use_cache`` the prompt runs once and then one token per step against a KV cache (a model
    without one runs the book's recompute loop). ``context_size`` defaults to the model's context_length."""
    model.eval()
    return generate(model, idx, max_new_tokens, context_size, use_cache=None if use_cache else False)
