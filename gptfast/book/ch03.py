"""Chapter 3, attention mechanisms: each class the chapter builds on its way to multi-head attention.

The first five are the chapter's teaching steps, written plainly; ``MultiHeadAttention`` is gptfast's,
the one its ``GPTModel`` uses (the book's parameters and numbers, gptfast's dispatch to the kernels).
"""

import torch
import torch.nn as nn

from ..model import MultiHeadAttention

__all__ = ["SelfAttention_v1", "SelfAttention_v2", "CausalAttention", "MultiHeadAttentionWrapper",
           "MultiHeadAttention", "PyTorchMultiHeadAttention"]


def _scaled_softmax(attn_scores, d_k):
    """Softmax of the scores scaled by sqrt(d_k), over the keys (the last dimension)."""
    return torch.softmax(attn_scores / d_k**0.5, dim=-1)


class SelfAttention_v1(nn.Module):
    """Section 3.4.1: self-attention with trainable weights as three raw (d_in, d_out) matrices drawn
    from ``torch.rand``. Input (T, d_in), no batch dimension; output (T, d_out)."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.W_query = nn.Parameter(torch.rand(d_in, d_out))
        self.W_key = nn.Parameter(torch.rand(d_in, d_out))
        self.W_value = nn.Parameter(torch.rand(d_in, d_out))

    def forward(self, x):  # x (T, d_in)
        keys = x @ self.W_key  # (T, d_out)
        queries = x @ self.W_query
        values = x @ self.W_value
        attn_scores = queries @ keys.T  # (T, T), omega
        attn_weights = _scaled_softmax(attn_scores, keys.shape[-1])
        context_vec = attn_weights @ values  # (T, d_out)
        return context_vec


class SelfAttention_v2(nn.Module):
    """Section 3.4.2: the same computation with ``nn.Linear`` projections (their better initialization,
    an optional bias). Input (T, d_in); output (T, d_out)."""

    def __init__(self, d_in, d_out, qkv_bias=False):
        super().__init__()
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)

    def forward(self, x):  # x (T, d_in)
        keys = self.W_key(x)  # (T, d_out)
        queries = self.W_query(x)
        values = self.W_value(x)
        attn_scores = queries @ keys.T  # (T, T)
        attn_weights = _scaled_softmax(attn_scores, keys.shape[-1])
        return attn_weights @ values  # (T, d_out)


class CausalAttention(nn.Module):
    """Section 3.5.3: one causal head for batches -- future positions masked to -inf before the
    softmax, dropout on the attention weights. Input (B, T, d_in), T <= context_length; output (B, T, d_out)."""

    def __init__(self, d_in, d_out, context_length, dropout, qkv_bias=False):
        super().__init__()
        self.d_out = d_out
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.dropout = nn.Dropout(dropout)
        # 1 above the diagonal: the positions each query may not see
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x):  # x (B, T, d_in)
        b, num_tokens, d_in = x.shape
        keys = self.W_key(x)  # (B, T, d_out)
        queries = self.W_query(x)
        values = self.W_value(x)
        attn_scores = queries @ keys.transpose(1, 2)  # (B, T, T)
        attn_scores.masked_fill_(self.mask.bool()[:num_tokens, :num_tokens], -torch.inf)
        attn_weights = self.dropout(_scaled_softmax(attn_scores, keys.shape[-1]))
        return attn_weights @ values  # (B, T, d_out)


class MultiHeadAttentionWrapper(nn.Module):
    """Section 3.6.1: ``num_heads`` independent :class:`CausalAttention` heads, outputs concatenated.
    Input (B, T, d_in); output (B, T, num_heads * d_out)."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.heads = nn.ModuleList([CausalAttention(d_in, d_out, context_length, dropout, qkv_bias)
                                    for _ in range(num_heads)])

    def forward(self, x):
        return torch.cat([head(x) for head in self.heads], dim=-1)  # (B, T, num_heads * d_out)


class PyTorchMultiHeadAttention(nn.Module):
    """The chapter's bonus: multi-head causal attention through one fused qkv projection and
    ``F.scaled_dot_product_attention``. Input (B, T, d_in); output (B, T, d_out)."""

    def __init__(self, d_in, d_out, num_heads, dropout=0.0, qkv_bias=False):
        super().__init__()
        assert d_out % num_heads == 0, "d_out is indivisible by num_heads"
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.d_out = d_out
        self.qkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)
        self.proj = nn.Linear(d_out, d_out)
        self.dropout = dropout

    def forward(self, x):  # x (B, T, d_in)
        b, num_tokens, _ = x.shape
        qkv = self.qkv(x).view(b, num_tokens, 3, self.num_heads, self.head_dim)  # (B, T, 3, H, D)
        queries, keys, values = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, D)
        dropout_p = self.dropout if self.training else 0.0
        context_vec = nn.functional.scaled_dot_product_attention(queries, keys, values, attn_mask=None,
                                                                 dropout_p=dropout_p, is_causal=True)
        context_vec = context_vec.transpose(1, 2).contiguous().view(b, num_tokens, self.d_out)  # (B, T, d_out)
        return self.proj(context_vec)
