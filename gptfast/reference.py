"""Reference implementations of the heavy ops: plain PyTorch, written the way the book writes them.

These are the ground truth that every Triton kernel is tested against, and the path ``"auto"``
takes on a CPU. Each function has the same signature and contract as its kernel twin in
``gptfast.kernels``; :mod:`gptfast.ops` chooses between them. Shapes: ``B`` batch, ``T`` tokens,
``E`` embedding width, ``H`` heads, ``D`` head width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .loss import REDUCTIONS as LOSS_REDUCTIONS
from .loss import linear_cross_entropy  # noqa: F401  (the chunked teaching version)


def layer_norm(x, weight, bias, eps=1e-5):
    """LayerNorm over the last dimension with biased variance: ``weight * (x - mean) / sqrt(var + eps) + bias``.

    x: (..., E); weight, bias: (E,). Returns (..., E).
    """
    mean = x.mean(dim=-1, keepdim=True)  # (..., 1)
    var = x.var(dim=-1, keepdim=True, unbiased=False)  # (..., 1), divides by E as GPT-2 does
    norm_x = (x - mean) / torch.sqrt(var + eps)  # (..., E)
    return weight * norm_x + bias


def add_layer_norm(x, branch, weight, bias, eps=1e-5):
    """The pre-LN block's residual step: ``s = x + branch`` and ``layer_norm(s)``; returns ``(s, layer_norm(s))``."""
    s = branch + x  # (..., E), the book's `x = x + shortcut`
    return s, layer_norm(s, weight, bias, eps)


def gelu(x):
    """GELU in GPT-2's tanh approximation: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``."""
    return 0.5 * x * (1 + torch.tanh(torch.sqrt(torch.tensor(2.0 / torch.pi)) * (x + 0.044715 * torch.pow(x, 3))))


def feed_forward(x, fc_weight, fc_bias, proj_weight, proj_bias):
    """The block's MLP: Linear E->4E, tanh-GELU, Linear 4E->E (weights in ``nn.Linear`` layout).

    x: (..., E); fc_weight: (4E, E); fc_bias: (4E,); proj_weight: (E, 4E); proj_bias: (E,).
    """
    h = F.linear(x, fc_weight, fc_bias)  # (..., 4E)
    return F.linear(gelu(h), proj_weight, proj_bias)  # (..., E)


def causal_mask(t_q, t_k, cache_seqlens=None, device=None):
    """Boolean mask, True where a query must NOT see a key.

    Without a cache: (T, T), strictly above the diagonal. With ``cache_seqlens`` (B,): (B, 1, Tq, Tk),
    query i of row b sits at position ``cache_seqlens[b] + i`` and sees keys ``0 .. that position``.
    """
    if cache_seqlens is None:
        return torch.triu(torch.ones(t_q, t_k, dtype=torch.bool, device=device), diagonal=1)
    q_pos = cache_seqlens.to(torch.long)[:, None] + torch.arange(t_q, device=device)  # (B, Tq)
    k_pos = torch.arange(t_k, device=device)  # (Tk,)
    return (k_pos[None, None, :] > q_pos[:, :, None])[:, None]  # (B, 1, Tq, Tk)


def causal_attention(q, k, v, *, dropout_p=0.0, softmax_scale=None, cache_seqlens=None, return_weights=False):
    """Causal scaled dot-product attention, as the book's ``MultiHeadAttention`` computes it.

    q: (B, H, Tq, D); k, v: (B, H, Tk, D) with Tk == Tq unless ``cache_seqlens`` (B,) int is given, in
    which case k/v are a KV cache and query i of row b sits at position ``cache_seqlens[b] + i``.
    ``softmax_scale`` defaults to 1/sqrt(D). Dropout with probability ``dropout_p`` is applied to the
    attention weights (torch's default generator). Returns (B, H, Tq, D), and the (B, H, Tq, Tk)
    attention weights too when ``return_weights`` is set.
    """
    t_q, t_k = q.shape[-2], k.shape[-2]
    attn_scores = q @ k.transpose(-2, -1)  # (B, H, Tq, Tk)
    mask_bool = causal_mask(t_q, t_k, cache_seqlens, device=q.device)
    attn_scores = attn_scores.masked_fill(mask_bool, -torch.inf)
    if softmax_scale is None:
        attn_weights = torch.softmax(attn_scores / k.shape[-1] ** 0.5, dim=-1)
    else:
        attn_weights = torch.softmax(attn_scores * softmax_scale, dim=-1)
    if dropout_p > 0.0:
        attn_weights = F.dropout(attn_weights, p=dropout_p, training=True)
    context_vec = attn_weights @ v  # (B, H, Tq, D)
    return (context_vec, attn_weights) if return_weights else context_vec


def sinusoidal_positions(context_length, emb_dim, dtype=torch.float32, device=None):
    """The original Transformer's fixed encoding: sin on even features, cos on odd ones. (T, E)."""
    pos = torch.arange(context_length, dtype=torch.float64, device=device)[:, None]  # (T, 1)
    inv_freq = torch.exp(
        torch.arange(0, emb_dim, 2, dtype=torch.float64, device=device) * (-math.log(10000.0) / emb_dim)
    )  # (ceil(E/2),)
    table = torch.zeros(context_length, emb_dim, dtype=torch.float64, device=device)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq[: emb_dim // 2])
    return table.to(dtype)
