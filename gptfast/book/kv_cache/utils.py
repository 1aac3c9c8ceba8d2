"""The book's ``KVCache``: one slot per layer. Handed to :class:`~gptfast.book.kv_cache.gpt2.GPTModel`,
it holds a :class:`gptfast.KVCache` (preallocated key/value buffers) made on the first call."""


class KVCache:
    """Per-layer slots, the book's API (``get``, ``update``, ``get_all``, ``reset``)."""

    def __init__(self, n_layers):
        self.cache = [None] * n_layers
        self.buffers = None  # gptfast's KVCache, made by the model on first use

    def get(self, layer_idx):
        return self.cache[layer_idx]

    def update(self, layer_idx, value):
        self.cache[layer_idx] = value

    def get_all(self):
        return self.cache

    def reset(self):
        self.cache = [None] * len(self.cache)
        self.buffers = None
