"""Looking inside the model: attention-weight heatmaps (the book suggests inspecting them)."""

from __future__ import annotations


def attention_weights(model, idx):
    """Each block's attention weights for ``idx`` (B, T): a list of (B, H, T, T) tensors (reference attention)."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _, weights = model(idx, return_attn_weights=True)
    finally:
        model.train(was_training)
    return weights


def plot_attention(weights, tokens=None, *, heads=None, title=None, path=None):
    """Draw attention weights as heatmaps, one panel per head.

    weights: (T, T), (H, T, T) or (1, H, T, T); tokens: optional labels for the T positions;
    heads: which heads to draw (default: all, at most 16). Returns the matplotlib Figure, saved to
    ``path`` when given.
    """
    import matplotlib

    if path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = weights.detach().float().cpu()
    if w.dim() == 4:
        if w.shape[0] != 1:
            raise ValueError(f"plot_attention draws one sequence; got a batch of {w.shape[0]} (index it first)")
        w = w[0]
    if w.dim() == 2:
        w = w[None]
    if w.dim() != 3 or w.shape[-1] != w.shape[-2]:
        raise ValueError(f"expected attention weights of shape (T, T) or (H, T, T), got {tuple(weights.shape)}")
    heads = list(range(min(w.shape[0], 16))) if heads is None else list(heads)
    t = w.shape[-1]
    if tokens is not None and len(tokens) != t:
        raise ValueError(f"got {len(tokens)} token labels for {t} positions")
    cols = min(4, len(heads))
    rows = (len(heads) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax, h in zip(axes.flat, heads):
        ax.imshow(w[h].numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"head {h}", fontsize=8)
        if tokens is not None and t <= 32:
            ax.set_xticks(range(t), labels=tokens, rotation=90, fontsize=6)
            ax.set_yticks(range(t), labels=tokens, fontsize=6)
        ax.set_xlabel("key", fontsize=7)
        ax.set_ylabel("query", fontsize=7)
    for ax in list(axes.flat)[len(heads):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
