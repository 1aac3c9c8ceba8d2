"""Chapter 4, a GPT model from scratch: gptfast's modules under the book's names, and the book's
"fast" variant (PyTorch's own LayerNorm, GELU and scaled-dot-product attention) as its module tree is."""

import torch
import torch.nn as nn

from ..generation import generate_text_simple
from ..model import GELU, FeedForward, GPTModel, LayerNorm, TransformerBlock
from .ch03 import MultiHeadAttention, PyTorchMultiHeadAttention

__all__ = ["LayerNorm", "GELU", "FeedForward", "TransformerBlock", "GPTModel", "generate_text_simple",
           "MultiHeadAttention", "PyTorchMultiHeadAttention", "FeedForwardFast", "TransformerBlockFast",
           "GPTModelFast"]


class FeedForwardFast(nn.Module):
    """The feed-forward of :class:`GPTModelFast`: Linear -> ``nn.GELU(approximate="tanh")`` -> Linear."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg["emb_dim"]
        self.layers = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))

    def forward(self, x):  # (B, T, emb_dim)
        return self.layers(x)


class TransformerBlockFast(nn.Module):
    """The block of :class:`GPTModelFast`: pre-norm with ``nn.LayerNorm``, :class:`PyTorchMultiHeadAttention`."""

    def __init__(self, cfg):
        super().__init__()
        self.att = PyTorchMultiHeadAttention(d_in=cfg["emb_dim"], d_out=cfg["emb_dim"], num_heads=cfg["n_heads"],
                                             dropout=cfg["drop_rate"], qkv_bias=cfg["qkv_bias"])
        self.ff = FeedForwardFast(cfg)
        self.norm1 = nn.LayerNorm(cfg["emb_dim"])
        self.norm2 = nn.LayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x):  # (B, T, emb_dim)
        shortcut = x
        x = self.drop_shortcut(self.att(self.norm1(x))) + shortcut
        shortcut = x
        x = self.drop_shortcut(self.ff(self.norm2(x))) + shortcut
        return x


class GPTModelFast(nn.Module):
    """The book's faster GPT: the same shapes as :class:`GPTModel` built from PyTorch's own modules
    (state-dict keys differ: ``att.qkv``/``att.proj``, ``norm.weight``/``bias``)."""

    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlockFast(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = nn.LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, in_idx):  # in_idx (B, T) -> logits (B, T, vocab_size)
        seq_len = in_idx.shape[1]
        x = self.tok_emb(in_idx) + self.pos_emb(torch.arange(seq_len, device=in_idx.device))
        x = self.trf_blocks(self.drop_emb(x))
        return self.out_head(self.final_norm(x))
