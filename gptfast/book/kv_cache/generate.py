"""The book's cached greedy loop."""

from ...generation import generate, generate_stream
from .utils import KVCache

__all__ = ["generate_text_simple", "generate_text_simple_stream", "trim_input_tensor", "KVCache"]


def trim_input_tensor(input_ids_tensor, context_len, max_new_tokens):
    """Keep the last ``context_len - max_new_tokens`` tokens (at least one), so the prompt and the new
    tokens fit the context. (B, T) -> (B, <=T)."""
    assert max_new_tokens < context_len
    keep_len = max(1, context_len - max_new_tokens)
    return input_ids_tensor[:, -keep_len:] if input_ids_tensor.shape[1] > keep_len else input_ids_tensor


def generate_text_simple_stream(model, token_ids, max_new_tokens, eos_token_id=None, context_size=None):
    """Yield each greedy next token, (B, 1), as it is chosen, against a KV cache; stops once every row
    produced ``eos_token_id`` (not yielded)."""
    model.eval()
    yield from generate_stream(model, token_ids, max_new_tokens, context_size, eos_id=eos_token_id)


def generate_text_simple(model, idx, max_new_tokens, context_size=None, use_cache=True):
    """Append the most likely next token ``max_new_tokens`` times. idx (B, T) -> (B, T + n).

    With ``use_cache`` the prompt runs once and then one token per step against a KV cache (a model
    without one runs the book's recompute loop). ``context_size`` defaults to the model's context_length."""
    model.eval()
    return generate(model, idx, max_new_tokens, context_size, use_cache=None if use_cache else False)
