"""The book's GPT-2 with a KV cache: gptfast's ``GPTModel`` (whose forward already takes a cache)
with the book's ``forward(in_idx, use_cache=False, cache=None)`` and ``reset_kv_cache()``."""

from ...kv_cache import KVCache as _Buffers
from ...model import GELU, FeedForward, GPTModel as _GPTModel, LayerNorm, MultiHeadAttention, TransformerBlock
from .utils import KVCache

__all__ = ["GPTModel", "KVCache", "MultiHeadAttention", "LayerNorm", "GELU", "FeedForward", "TransformerBlock"]


class GPTModel(_GPTModel):
    """gptfast's GPT with the book's KV-cache interface. ``cache`` is the book's :class:`KVCache` (or a
    :class:`gptfast.KVCache`); each call appends the new tokens' keys and values to it, so a prompt and
    then one token at a time give the logits of the whole sequence. Without a cache, the plain model."""

    def forward(self, in_idx, use_cache=False, cache=None):  # in_idx (B, T) -> logits (B, T, vocab_size)
        if cache is None:
            return super().forward(in_idx)
        if isinstance(cache, KVCache):
            if cache.buffers is None:
                cache.buffers = _Buffers.for_model(self, batch_size=in_idx.shape[0])
            cache = cache.buffers
        return super().forward(in_idx, cache=cache)

    def reset_kv_cache(self):
        """The book's hook before a new sequence; the cache object holds the state, so there is nothing here."""
