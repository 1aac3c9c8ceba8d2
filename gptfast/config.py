"""Model configuration: the book's config dict, as a dataclass with GPT-2 presets."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

# The book's GPT_CONFIG_124M (chapter 4), key for key.
GPT_CONFIG_124M = {
    "vocab_size": 50257,  # vocabulary size of the GPT-2 BPE tokenizer
    "context_length": 1024,  # longest sequence the positional embedding covers
    "emb_dim": 768,  # embedding (model) width
    "n_heads": 12,  # attention heads per block
    "n_layers": 12,  # transformer blocks
    "drop_rate": 0.1,  # dropout on embeddings, attention weights and residual branches
    "qkv_bias": False,  # bias in the query/key/value projections (True for OpenAI's weights)
}

# GPT-2's four sizes: (emb_dim, n_layers, n_heads).
_PRESETS = {
    "gpt2": (768, 12, 12),  # 124M
    "gpt2-small": (768, 12, 12),
    "gpt2-medium": (1024, 24, 16),  # 355M
    "gpt2-large": (1280, 36, 20),  # 774M
    "gpt2-xl": (1600, 48, 25),  # 1558M
}


@dataclass
class GPTConfig:
    """Everything that shapes a :class:`~gptfast.GPTModel`.

    The first seven fields are the book's config dict; ``pos_emb`` and ``tie_weights`` are options
    the book discusses but does not build.

    >>> GPTConfig.from_name("gpt2-medium").emb_dim
    1024
    >>> GPTConfig.coerce({"vocab_size": 100, "context_length": 16, "emb_dim": 32, "n_heads": 4,
    ...                   "n_layers": 2, "drop_rate": 0.0, "qkv_bias": False}).head_dim
    8
    """

    vocab_size: int = 50257  # tokens in the vocabulary
    context_length: int = 1024  # longest sequence the model accepts
    emb_dim: int = 768  # model width
    n_heads: int = 12  # attention heads; emb_dim must be a multiple of it
    n_layers: int = 12  # transformer blocks
    drop_rate: float = 0.1  # dropout probability everywhere the book applies dropout
    qkv_bias: bool = False  # bias in W_query/W_key/W_value
    pos_emb: str = "learned"  # "learned" (GPT-2) or "sinusoidal" (fixed, the original Transformer's)
    tie_weights: bool = False  # share tok_emb.weight with out_head.weight

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.emb_dim % self.n_heads:
            raise ValueError(
                f"GPTConfig.emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads}): "
                f"each head gets emb_dim // n_heads features"
            )
        if not 0.0 <= float(self.drop_rate) < 1.0:
            raise ValueError(f"GPTConfig.drop_rate must be in [0, 1), got {self.drop_rate!r}")
        if self.pos_emb not in ("learned", "sinusoidal"):
            raise ValueError(f"GPTConfig.pos_emb must be 'learned' or 'sinusoidal', got {self.pos_emb!r}")
        self.drop_rate = float(self.drop_rate)
        self.qkv_bias = bool(self.qkv_bias)
        self.tie_weights = bool(self.tie_weights)

    def __getitem__(self, key: str):
        """``cfg["emb_dim"]``: read like the book's config dict, so the book's code runs on gptfast's models."""
        if key not in {f.name for f in dataclasses.fields(self)}:
            raise KeyError(key)
        return getattr(self, key)

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "GPTConfig":
        """A GPT-2 size by name: ``gpt2`` (124M), ``gpt2-medium`` (355M), ``gpt2-large`` (774M), ``gpt2-xl`` (1558M)."""
        key = name.lower().replace("_", "-")
        if key not in _PRESETS:
            raise ValueError(f"unknown model name {name!r}; known: {', '.join(sorted(_PRESETS))}")
        emb_dim, n_layers, n_heads = _PRESETS[key]
        base = dict(GPT_CONFIG_124M, emb_dim=emb_dim, n_layers=n_layers, n_heads=n_heads)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def coerce(cls, cfg: "GPTConfig | Mapping[str, Any]") -> "GPTConfig":
        """Accept a GPTConfig or the book's config dict. Keys the model does not use are ignored, as the
        book's ``GPTModel`` ignores them, with one warning naming them (a misspelt key shows up there);
        missing keys take the defaults."""
        if isinstance(cfg, cls):
            return cfg
        if isinstance(cfg, Mapping):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(cfg) - known)
            if unknown:
                warnings.warn(f"config keys {unknown} are not used by gptfast's GPTModel and are ignored "
                              f"(the book's GPTModel ignores them too); the keys it reads are {sorted(known)}",
                              UserWarning, stacklevel=3)
            return cls(**{k: v for k, v in cfg.items() if k in known})
        raise TypeError(f"expected a GPTConfig or a config dict, got {type(cfg).__name__}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        """Write ``config.json`` atomically."""
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "GPTConfig":
        with open(path) as f:
            return cls.coerce(json.load(f))
