"""A preallocated key/value cache for generation.

During generation the keys and values of tokens already seen never change, so each attention layer
keeps them instead of recomputing them: the prompt is run once (the *prefill*), then each new token
is run alone (the *decode* step) and attends to the cached keys and values.

One :class:`KVCache` serves a whole model: per layer a ``(B, H, capacity, D)`` key buffer and a value
buffer, allocated on the first write with the dtype and device of the keys (so autocast works), and
``seqlens`` -- the number of tokens each row holds. Rows may hold different numbers of tokens (prompts
of different lengths); token ``i`` of a call is written at position ``seqlens[b] + i`` of row ``b``,
and attention masks every key beyond a query's own position, so stale entries past a row's length
are never seen.

>>> import torch, gptfast
>>> from gptfast.kv_cache import KVCache
>>> cfg = gptfast.GPTConfig(vocab_size=100, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
>>> model = gptfast.GPTModel(cfg).eval()
>>> cache = KVCache.for_model(model, batch_size=1)
>>> prefill = model(torch.tensor([[1, 2, 3]]), cache=cache)   # (1, 3, 100), cache holds 3 tokens
>>> step = model(torch.tensor([[4]]), cache=cache)             # (1, 1, 100), position 3
>>> cache.lengths
[4]
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer for ``batch_size`` rows of up to ``capacity`` tokens.

    ``lengths`` (a list of ints, on the host) and ``seqlens`` (the same as a ``(B,)`` long tensor on
    the model's device, the ``cache_seqlens`` that attention takes) say how many tokens each row holds.
    """

    def __init__(self, batch_size: int, capacity: int, n_layers: int, device=None):
        if batch_size < 1 or capacity < 1 or n_layers < 1:
            raise ValueError(f"KVCache needs batch_size, capacity and n_layers >= 1, got {batch_size}, {capacity}, {n_layers}")
        self.batch_size = batch_size
        self.capacity = capacity
        self.n_layers = n_layers
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.keys: list[torch.Tensor | None] = [None] * n_layers  # each (B, H, capacity, D)
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.lengths = [0] * batch_size
        self.seqlens = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # (B,)

    @classmethod
    def for_model(cls, model, batch_size: int, capacity: int | None = None) -> "KVCache":
        """A cache sized for ``model`` (a :class:`~gptfast.GPTModel`); capacity defaults to its context_length."""
        cfg = model.cfg
        capacity = cfg.context_length if capacity is None else capacity
        if capacity > cfg.context_length:
            raise ValueError(f"KVCache capacity {capacity} exceeds the model's context_length {cfg.context_length}")
        device = next(model.parameters()).device
        return cls(batch_size, capacity, cfg.n_layers, device=device)

    def positions(self, num_tokens: int) -> torch.Tensor:
        """Positions of the next ``num_tokens`` tokens of each row: ``seqlens[b] + i``. (B, T)."""
        return self.seqlens[:, None] + torch.arange(num_tokens, device=self.device)

    def check_room(self, num_tokens: int) -> None:
        end = max(self.lengths) + num_tokens
        if end > self.capacity:
            raise ValueError(
                f"the KV cache holds up to {self.capacity} tokens per row; adding {num_tokens} to a row of "
                f"{max(self.lengths)} would need {end}. Crop the cache (cache.crop) or start a new one"
            )

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write ``k``/``v`` (B, H, T, D) of ``layer`` after each row's cached tokens.

        Returns the layer's cached keys and values up to the longest row, (B, H, T_used, D) each, and
        ``seqlens`` (B,) -- the arguments :func:`gptfast.ops.causal_attention` takes for a cache.
        """
        b, h, t, d = k.shape
        if b != self.batch_size:
            raise ValueError(f"the KV cache was made for batch size {self.batch_size}, got {b} rows")
        if self.keys[layer] is None:
            self.keys[layer] = k.new_zeros(b, h, self.capacity, d)
            self.values[layer] = v.new_zeros(b, h, self.capacity, d)
        k_cache, v_cache = self.keys[layer], self.values[layer]
        start = self.lengths[0]
        if all(n == start for n in self.lengths):  # every row at the same length: one slice
            k_cache[:, :, start:start + t] = k
            v_cache[:, :, start:start + t] = v
        else:  # rows at different lengths: scatter each row's tokens to its own positions
            index = self.positions(t)[:, None, :, None].expand(b, h, t, d)  # (B, H, T, D)
            k_cache.scatter_(2, index, k.to(k_cache.dtype))
            v_cache.scatter_(2, index, v.to(v_cache.dtype))
        used = max(self.lengths) + t
        return k_cache[:, :, :used], v_cache[:, :, :used], self.seqlens

    def advance(self, num_tokens: int) -> None:
        """Count ``num_tokens`` more tokens in every row (the model calls this after all layers wrote)."""
        self.lengths = [n + num_tokens for n in self.lengths]
        self.seqlens += num_tokens

    def crop(self, lengths) -> None:
        """Keep only the first ``lengths[b]`` tokens of each row (an int applies to every row).

        After a right-padded prefill of prompts of different lengths, cropping to the true lengths makes
        the next token of each row land right after its prompt.
        """
        if isinstance(lengths, int):
            lengths = [lengths] * self.batch_size
        lengths = [int(n) for n in lengths]
        if len(lengths) != self.batch_size or any(n < 0 or n > self.capacity for n in lengths):
            raise ValueError(f"crop needs {self.batch_size} lengths in [0, {self.capacity}], got {lengths}")
        self.lengths = lengths
        self.seqlens = torch.tensor(lengths, dtype=torch.long, device=self.device)

    def reset(self) -> None:
        """Forget every token (the buffers stay allocated)."""
        self.crop(0)
