"""The output head and the cross-entropy loss in one step, without ever holding all the logits.

The book computes the loss as ``F.cross_entropy(out_head(x), targets)``: the logits are a
(rows, vocab) tensor -- 2048 rows x 50,257 tokens of GPT-2 are 412 MB in fp32 -- kept for backward
together with the softmax. Only two numbers per row are needed to get the loss back, and the
gradient can be rebuilt from them:

forward, row i with logits z_i = x_i W^T + b and target t_i
    lse_i  = log sum_j exp(z_ij)                       (saved, one float per row)
    loss_i = lse_i - (1 - eps) z_it - (eps / V) sum_j z_ij + z_loss lse_i^2

backward, with s_i the upstream gradient of row i (1 / n_valid for "mean")
    dz_ij = s_i ((1 + 2 z_loss lse_i) softmax_ij - (1 - eps) [j = t_i] - eps / V),
    softmax_ij = exp(z_ij - lse_i) recomputed from z_ij and the saved lse_i
    dx = dz W,   dW = dz^T x,   db = sum_rows dz

Rows whose target is ``ignore_index`` add nothing and get no gradient. This module computes it in
PyTorch, a chunk of rows at a time: each chunk's logits exist only while that chunk is worked on,
in forward and again in backward. ``gptfast.kernels.linear_cross_entropy`` does the same blockwise
on the GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum", "none")


def chunk_rows(rows: int, hidden: int, vocab: int) -> int:
    """Rows per chunk: one chunk's (chunk, vocab) fp32 logits take at most a quarter of the elements
    of x and W together, so the temporaries stay within the size of the op's inputs."""
    return max(1, min(rows, (rows * hidden + vocab * hidden) // (4 * max(vocab, 1))))


def _acc_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)  # fp32 statistics, fp64 for fp64 inputs


def _chunk_logits(x_c, weight, bias):
    return F.linear(x_c, weight, bias).to(_acc_dtype(x_c.dtype))  # (c, V), fp32 like the book's loss


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-row losses of ``cross_entropy(x W^T + b, targets)``; saves x, W, b, targets and lse."""

    @staticmethod
    def forward(ctx, x, weight, bias, targets, ignore_index, label_smoothing, z_loss, chunk):
        rows, vocab = x.shape[0], weight.shape[0]
        acc = _acc_dtype(x.dtype)
        losses = torch.zeros(rows, dtype=acc, device=x.device)  # (N,)
        lse = torch.zeros(rows, dtype=acc, device=x.device)  # (N,)
        for start in range(0, rows, chunk):
            part = slice(start, start + chunk)
            z = _chunk_logits(x[part], weight, bias)  # (c, V)
            t = targets[part]  # (c,)
            valid = t != ignore_index
            lse_c = torch.logsumexp(z, dim=-1)  # (c,)
            z_t = z.gather(1, torch.where(valid, t, 0)[:, None]).squeeze(1)  # (c,) the target's logit
            loss = lse_c - (1.0 - label_smoothing) * z_t
            if label_smoothing:
                loss = loss - (label_smoothing / vocab) * z.sum(-1)
            if z_loss:
                loss = loss + z_loss * lse_c.square()
            losses[part] = torch.where(valid, loss, 0.0)
            lse[part] = lse_c
        ctx.save_for_backward(x, weight, bias, targets, lse)
        ctx.options = (ignore_index, label_smoothing, z_loss, chunk)
        return losses

    @staticmethod
    def backward(ctx, d_losses):  # d_losses: (N,), maybe expanded
        x, weight, bias, targets, lse = ctx.saved_tensors
        ignore_index, label_smoothing, z_loss, chunk = ctx.options
        vocab = weight.shape[0]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = torch.empty_like(x) if need_x else None
        acc = lse.dtype
        dw = torch.zeros(weight.shape, dtype=acc, device=x.device) if need_w else None
        db = torch.zeros(vocab, dtype=acc, device=x.device) if (need_b and bias is not None) else None
        for start in range(0, x.shape[0], chunk):
            part = slice(start, start + chunk)
            t = targets[part]
            valid = t != ignore_index
            s = torch.where(valid, d_losses[part].to(acc), 0.0)  # (c,) each row's upstream gradient
            lse_c = lse[part]
            dz = _chunk_logits(x[part], weight, bias)  # (c, V), turned into dz in place:
            dz.sub_(lse_c[:, None]).exp_()  # softmax
            if z_loss:
                dz.mul_((1.0 + 2.0 * z_loss * lse_c)[:, None])
            if label_smoothing:
                dz.sub_(label_smoothing / vocab)
            rows = torch.arange(dz.shape[0], device=dz.device)
            dz[rows, torch.where(valid, t, 0)] -= (1.0 - label_smoothing) * valid.to(acc)  # - one_hot
            dz.mul_(s[:, None])
            if dx is not None:
                dx[part] = (dz.to(weight.dtype) @ weight).to(x.dtype)  # (c, E)
            if dw is not None:
                dw.addmm_(dz.t(), x[part].to(acc))  # (V, E), fp32 sum over the chunks
            if db is not None:
                db += dz.sum(0)
        return (dx, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype),
                None, None, None, None, None)


def reduce_losses(losses, targets, ignore_index, reduction):
    """``"mean"``: over the rows whose target is not ignored (NaN when there are none, as in
    ``F.cross_entropy``); ``"sum"``; ``"none"``: the (N,) losses, 0 on ignored rows."""
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (targets != ignore_index).sum()


def linear_cross_entropy(x, weight, targets, *, bias=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, z_loss=0.0, chunk=None):
    """``F.cross_entropy(x @ weight.T + bias, targets)`` (plus the z-loss), a chunk of rows at a time.

    x: (N, E); weight: (V, E); bias: (V,) or None; targets: (N,) integers. Returns a float32 (float64 for float64 inputs) scalar
    (``"mean"``, ``"sum"``) or the (N,) per-row losses (``"none"``). ``chunk``: rows per chunk
    (default :func:`chunk_rows`).
    """
    chunk = chunk or chunk_rows(x.shape[0], x.shape[1], weight.shape[0])
    losses = _ChunkedLinearCrossEntropy.apply(x, weight, bias, targets, ignore_index, float(label_smoothing),
                                              float(z_loss), int(chunk))
    return reduce_losses(losses, targets, ignore_index, reduction)
