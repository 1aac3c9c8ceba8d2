"""The GPT model of *Build a Large Language Model (From Scratch)*, chapters 3 and 4.

Module names, parameter names and initialization order are the book's, so a ``model.pth`` saved by the
book's code loads here and ours loads there, and ``torch.manual_seed(123)`` builds the same weights.
The heavy ops go through :mod:`gptfast.ops`, which runs either the reference (the book's math) or a
Triton kernel. Shapes: ``B`` batch, ``T`` tokens, ``E`` = emb_dim, ``H`` heads, ``D`` = E // H.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.utils.checkpoint

from . import ops, reference
from .config import GPTConfig


class LayerNorm(nn.Module):
    """The book's LayerNorm: parameters ``scale`` and ``shift``, biased variance, eps 1e-5."""

    def __init__(self, emb_dim, eps=1e-5, backend=None):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))
        self.backend = backend

    def forward(self, x):  # (..., E) -> (..., E)
        return ops.layer_norm(x, self.scale, self.shift, self.eps, backend=self.backend)


class GELU(nn.Module):
    """GELU, tanh approximation (as GPT-2 was trained with)."""

    def forward(self, x):
        return reference.gelu(x)


def linear_weight_and_bias(layer: nn.Module):
    """The weight and bias a linear layer applies: its own, or the effective ones of a wrapper (LoRA)."""
    effective = getattr(layer, "effective_weight_and_bias", None)
    if effective is not None:
        return effective()
    return layer.weight, layer.bias


class FeedForward(nn.Module):
    """Linear E->4E, GELU, Linear 4E->E; ``layers.0`` and ``layers.2`` as in the book."""

    def __init__(self, cfg, backend=None):
        super().__init__()
        cfg = GPTConfig.coerce(cfg)
        self.layers = nn.Sequential(
            nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim),
            GELU(),
            nn.Linear(4 * cfg.emb_dim, cfg.emb_dim),
        )
        self.backend = backend

    def forward(self, x):  # (B, T, E) -> (B, T, E)
        fc_w, fc_b = linear_weight_and_bias(self.layers[0])
        proj_w, proj_b = linear_weight_and_bias(self.layers[2])
        return ops.feed_forward(x, fc_w, fc_b, proj_w, proj_b, backend=self.backend)


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention, the book's chapter 3 class.

    Keeps the book's persistent ``mask`` buffer so state dicts match; loading accepts it absent.
    """

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False, backend=None):
        super().__init__()
        if d_out % num_heads:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))
        self.backend = backend

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The mask is derived, not learned: accept checkpoints that leave it out.
        state_dict.setdefault(prefix + "mask", self.mask)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def split_heads(self, x):  # (B, T, d_out) -> (B, H, T, D)
        b, num_tokens, _ = x.shape
        return x.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x, return_attn_weights=False, cache=None, layer=0):
        """(B, T, d_in) -> (B, T, d_out). With a :class:`~gptfast.kv_cache.KVCache`, this call's keys and
        values are appended to the cache's entry ``layer`` and the queries attend to everything cached."""
        b, num_tokens, _ = x.shape  # (B, T, d_in)
        keys = self.split_heads(self.W_key(x))  # (B, H, T, D)
        queries = self.split_heads(self.W_query(x))  # (B, H, T, D)
        values = self.split_heads(self.W_value(x))  # (B, H, T, D)
        cache_seqlens = None
        if cache is not None:
            keys, values, cache_seqlens = cache.update(layer, keys, values)  # (B, H, T_cached, D), (B,)
        dropout_p = self.dropout.p if self.training else 0.0
        out = ops.causal_attention(
            queries, keys, values, dropout_p=dropout_p, cache_seqlens=cache_seqlens,
            return_weights=return_attn_weights, backend=self.backend,
        )
        context_vec, attn_weights = out if return_attn_weights else (out, None)
        context_vec = context_vec.transpose(1, 2).contiguous().view(b, num_tokens, self.d_out)  # (B, T, d_out)
        context_vec = self.out_proj(context_vec)
        return (context_vec, attn_weights) if return_attn_weights else context_vec


class TransformerBlock(nn.Module):
    """Pre-LN block: ``x + drop(att(norm1(x)))``, then ``x + drop(ff(norm2(x)))``."""

    def __init__(self, cfg, backend=None):
        super().__init__()
        cfg = GPTConfig.coerce(cfg)
        self.att = MultiHeadAttention(
            d_in=cfg.emb_dim, d_out=cfg.emb_dim, context_length=cfg.context_length,
            num_heads=cfg.n_heads, dropout=cfg.drop_rate, qkv_bias=cfg.qkv_bias, backend=backend,
        )
        self.ff = FeedForward(cfg, backend=backend)
        self.norm1 = LayerNorm(cfg.emb_dim, backend=backend)
        self.norm2 = LayerNorm(cfg.emb_dim, backend=backend)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x, return_attn_weights=False, cache=None, layer=0):  # (B, T, E) -> (B, T, E)
        att = self.att(self.norm1(x), return_attn_weights=return_attn_weights, cache=cache, layer=layer)
        att, weights = att if return_attn_weights else (att, None)
        # x + drop(att) and norm2 of that sum, in one fused pass on the triton backend
        x, h = ops.add_layer_norm(x, self.drop_shortcut(att), self.norm2.scale, self.norm2.shift,
                                  self.norm2.eps, backend=self.norm2.backend)
        x = x + self.drop_shortcut(self.ff(h))
        return (x, weights) if return_attn_weights else x


class SinusoidalPositionalEmbedding(nn.Module):
    """Fixed sin/cos positions, called like ``nn.Embedding`` on position ids; nothing to learn or save."""

    def __init__(self, context_length, emb_dim):
        super().__init__()
        self.register_buffer("table", reference.sinusoidal_positions(context_length, emb_dim), persistent=False)

    def forward(self, positions):  # (T,) -> (T, E)
        return self.table[positions]


class GPTModel(nn.Module):
    """GPT-2, as built in the book's chapter 4.

    ``cfg`` is the book's config dict or a :class:`GPTConfig`; ``backend`` chooses the ops'
    implementation for this model (see :mod:`gptfast.ops`) and can be changed with :meth:`set_backend`.

    >>> import torch, gptfast
    >>> torch.manual_seed(123)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = gptfast.GPTModel(gptfast.GPTConfig(vocab_size=100, context_length=16, emb_dim=32,
    ...                                            n_heads=4, n_layers=2, drop_rate=0.0))
    >>> model(torch.tensor([[1, 2, 3]])).shape
    torch.Size([1, 3, 100])
    """

    def __init__(self, cfg, backend=None):
        super().__init__()
        cfg = GPTConfig.coerce(cfg)
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        if cfg.pos_emb == "learned":
            self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        else:
            self.pos_emb = SinusoidalPositionalEmbedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = LayerNorm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.out_head.weight = self.tok_emb.weight
        self._backend = None
        self.set_backend(backend)
        # Recompute each block in the backward pass instead of keeping its activations (training only).
        self.gradient_checkpointing = False

    @property
    def backend(self):
        """The backend choice this model passes to every op (None: fall through to the global rules)."""
        return self._backend

    def set_backend(self, backend):
        """Choose the implementation of the ops for this model; parameters are not touched."""
        ops.parse_backend(backend, "GPTModel backend")
        self._backend = backend
        for module in self.modules():
            if module is not self and hasattr(module, "backend"):
                module.backend = backend
        return self

    def check_input(self, in_idx):
        if not isinstance(in_idx, torch.Tensor):
            raise TypeError(f"GPTModel expects a tensor of token ids, got {type(in_idx).__name__}")
        if in_idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"GPTModel expects integer token ids (torch.long), got {in_idx.dtype}")
        if in_idx.dim() != 2:
            raise ValueError(f"GPTModel expects token ids of shape (batch, tokens), got {tuple(in_idx.shape)}")
        seq_len = in_idx.shape[1]
        if seq_len > self.cfg.context_length:
            raise ValueError(
                f"the sequence has {seq_len} tokens but the model's context_length is {self.cfg.context_length}; "
                f"pass at most the last {self.cfg.context_length} tokens (e.g. idx[:, -{self.cfg.context_length}:])"
            )
        if seq_len == 0:
            raise ValueError("GPTModel got an empty sequence (0 tokens)")
        device = self.tok_emb.weight.device
        if in_idx.device != device:
            raise ValueError(f"the token ids are on {in_idx.device} but the model is on {device}; move one of them")

    def forward(self, in_idx, return_attn_weights=False, cache=None, *, targets=None):
        """(B, T) token ids -> (B, T, vocab_size) logits; with ``return_attn_weights`` also a list with
        each block's (B, H, T, T) attention weights (computed by the reference attention).

        With ``cache`` (a :class:`~gptfast.kv_cache.KVCache`) the tokens continue each row's cached
        ones: token i of row b sits at position ``cache.seqlens[b] + i``, and the cache then holds them too.

        With ``targets`` ((B, T) token ids, -100 to ignore a position) it returns the mean cross-entropy
        loss instead -- the book's ``F.cross_entropy(logits.flatten(0, 1), targets.flatten())`` -- as a
        float32 scalar, through :func:`gptfast.ops.linear_cross_entropy`, which never materializes the
        (B, T, vocab_size) logits.
        """
        if targets is not None and (return_attn_weights or cache is not None):
            raise ValueError("GPTModel: targets= returns the loss alone; call the model without targets to get "
                             "attention weights or to decode with a KV cache")
        self.check_input(in_idx)
        if targets is not None and (not isinstance(targets, torch.Tensor) or targets.shape != in_idx.shape):
            raise ValueError(f"GPTModel: targets must be a tensor of token ids shaped like the input "
                             f"{tuple(in_idx.shape)}, got {getattr(targets, 'shape', type(targets).__name__)}")
        batch_size, seq_len = in_idx.shape
        tok_embeds = self.tok_emb(in_idx)  # (B, T, E)
        if cache is None:
            pos_embeds = self.pos_emb(torch.arange(seq_len, device=in_idx.device))  # (T, E)
        else:
            cache.check_room(seq_len)
            pos_embeds = self.pos_emb(cache.positions(seq_len))  # (B, T, E), each row from its own offset
        x = self.drop_emb(tok_embeds + pos_embeds)  # (B, T, E)
        weights = []
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for layer, block in enumerate(self.trf_blocks):
            if return_attn_weights:
                x, w = block(x, return_attn_weights=True, cache=cache, layer=layer)
                weights.append(w)
            elif checkpointing:
                # dropout replays in the recomputation: checkpoint restores torch's RNG state first
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, cache=cache, layer=layer)
        if cache is not None:
            cache.advance(seq_len)
        x = self.final_norm(x)
        if targets is not None:
            weight, bias = linear_weight_and_bias(self.out_head)  # a tied or LoRA-wrapped head too
            return ops.linear_cross_entropy(x, weight, targets.to(x.device), bias=bias, backend=self.backend)
        logits = self.out_head(x)  # (B, T, vocab_size)
        return (logits, weights) if return_attn_weights else logits

    @classmethod
    def from_pretrained(cls, path_or_name, backend=None, **kwargs):
        """Load weights: a gptfast or Hugging Face folder, the book's ``model.pth``, or a GPT-2 name.

        See :func:`gptfast.weights.from_pretrained`.
        """
        from .weights import from_pretrained

        return from_pretrained(path_or_name, backend=backend, **kwargs)

    def save_pretrained(self, folder, **kwargs):
        """Write Hugging Face's GPT-2 layout (safetensors) to ``folder``; see :func:`gptfast.weights.save_pretrained`."""
        from .weights import save_pretrained

        return save_pretrained(self, folder, **kwargs)

    def num_parameters(self, exclude_embeddings=False) -> int:
        """Parameters counted once each (a tied out_head is not counted twice)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel() + sum(p.numel() for p in self.pos_emb.parameters())
        return n
