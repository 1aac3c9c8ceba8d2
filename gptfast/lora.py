"""LoRA, the book's appendix E: train a low-rank update ``alpha * A @ B`` beside each frozen linear layer.

A linear layer computes ``x @ W.T + b``. LoRA leaves ``W`` frozen and learns two thin matrices,
``A`` (in, r) and ``B`` (r, out), adding ``alpha * x @ A @ B``; with r much smaller than in and out,
that is a few percent of the parameters. ``B`` starts at zero, so a freshly wrapped model computes
exactly what it did before. The same update written as a weight is ``W + alpha * (A @ B).T``, which is
what :meth:`LinearWithLoRA.effective_weight_and_bias` gives the fused feed-forward kernel (gradients
reach ``A`` and ``B`` through it) and what :func:`merge_lora` folds in for inference.

>>> import torch, gptfast
>>> model = gptfast.GPTModel(dict(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1))
>>> _ = gptfast.replace_linear_with_lora(model, rank=4, alpha=8, freeze_base=True)
>>> sum(p.numel() for p in model.parameters() if p.requires_grad)
1416
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn as nn

from . import checkpoint

ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class LoRALayer(nn.Module):
    """The book's LoRA layer: ``alpha * (x @ A @ B)``, A (in_dim, rank) Kaiming-uniform, B (rank, out_dim) zeros."""

    def __init__(self, in_dim, out_dim, rank, alpha, *, device=None, dtype=None):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
        self.A = nn.Parameter(torch.empty(in_dim, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear initializes its weight
        self.B = nn.Parameter(torch.zeros(rank, out_dim, device=device, dtype=dtype))
        self.alpha = alpha

    def forward(self, x):  # (..., in_dim) -> (..., out_dim)
        return self.alpha * (x @ self.A @ self.B)

    def delta_weight(self):
        """The update in ``nn.Linear`` layout: ``alpha * (A @ B).T``, (out_dim, in_dim)."""
        return self.alpha * (self.A @ self.B).t()


class LinearWithLoRA(nn.Module):
    """A frozen ``nn.Linear`` plus a :class:`LoRALayer`: ``linear(x) + lora(x)`` (the book's class)."""

    def __init__(self, linear, rank, alpha):
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha,
                              device=linear.weight.device, dtype=linear.weight.dtype)

    @property
    def in_features(self):
        return self.linear.in_features

    @property
    def out_features(self):
        return self.linear.out_features

    def forward(self, x):
        return self.linear(x) + self.lora(x)

    def effective_weight_and_bias(self):
        """``(W + alpha * (A @ B).T, b)``: the one linear layer this module equals (used by fused kernels)."""
        return self.linear.weight + self.lora.delta_weight(), self.linear.bias


def _replace(module, rank, alpha):
    for name, child in module.named_children():
        if isinstance(child, LinearWithLoRA):
            continue
        if isinstance(child, nn.Linear):
            setattr(module, name, LinearWithLoRA(child, rank, alpha))
        else:
            _replace(child, rank, alpha)


def freeze_parameters(model):
    """Set ``requires_grad=False`` on every parameter of ``model`` (the book's loop before LoRA). Returns it."""
    for param in model.parameters():
        param.requires_grad = False
    return model


def replace_linear_with_lora(model, rank, alpha, *, freeze_base=False):
    """Wrap each ``nn.Linear`` of ``model`` in a :class:`LinearWithLoRA`, in place (the output head too),
    as the book's appendix E does: nothing is frozen, the book freezes the model itself beforehand.

    ``freeze_base=True`` first freezes every parameter already there, so only the new ``A``/``B`` train
    (what ``gptfast finetune --lora-rank`` does). Returns ``model``."""
    if freeze_base:
        freeze_parameters(model)
    _replace(model, rank, alpha)
    return model


def merge_lora(model):
    """Fold each adapter into its linear layer (``W += alpha * (A @ B).T``) and drop the wrappers, in
    place: the model computes the same and runs at plain speed. Returns ``model``."""
    for name, child in list(model.named_children()):
        if isinstance(child, LinearWithLoRA):
            linear = child.linear
            with torch.no_grad():
                linear.weight.copy_(child.effective_weight_and_bias()[0])
            setattr(model, name, linear)
        else:
            merge_lora(child)
    return model


def lora_layers(model):
    """``[(name, LinearWithLoRA), ...]`` in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LinearWithLoRA)]


def merged_state_dict(model) -> dict:
    """The state dict the model would have after :func:`merge_lora`, without changing the model."""
    state = {}
    wrapped = dict(lora_layers(model))
    for key, value in model.state_dict().items():
        owner = next((p for p in wrapped if key.startswith(p + ".")), None)
        if owner is None:
            state[key] = value
            continue
        rest = key[len(owner) + 1:]
        if rest == "linear.weight":
            state[owner + ".weight"] = wrapped[owner].effective_weight_and_bias()[0].detach()
        elif rest == "linear.bias":
            state[owner + ".bias"] = value
    return state


def save_lora(model, folder: str) -> None:
    """Write only what fine-tuning changed: every trainable parameter (the adapters, and e.g. a new
    classifier head) to ``folder/adapters.safetensors``, with rank and alpha in ``adapter_config.json``."""
    from safetensors.torch import save

    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers: call replace_linear_with_lora(model, rank, alpha) first")
    lora = layers[0][1].lora
    state = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    os.makedirs(folder, exist_ok=True)
    checkpoint.atomic_write_bytes(os.path.join(folder, ADAPTER_FILE),
                                  save(state, metadata={"format": "pt", "library": "gptfast"}))
    rank = lora.A.shape[1]
    checkpoint.atomic_write_json(os.path.join(folder, ADAPTER_CONFIG),
                                 {"rank": int(rank), "alpha": float(lora.alpha), "tensors": sorted(state)})


def load_lora(model, folder: str):
    """Add the adapters saved by :func:`save_lora` to ``model`` (wrapping its linear layers first when
    needed) and load them; every saved tensor must fit by name and shape. Returns ``model``."""
    from safetensors.torch import load_file

    config_path = os.path.join(folder, ADAPTER_CONFIG)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} is missing: pass a folder written by save_lora")
    with open(config_path) as f:
        cfg = json.load(f)
    if not lora_layers(model):
        replace_linear_with_lora(model, int(cfg["rank"]), cfg["alpha"], freeze_base=True)
    device = next(model.parameters()).device
    saved = load_file(os.path.join(folder, ADAPTER_FILE), device=str(device))
    params = dict(model.named_parameters())
    problems = [f"{k} is not in the model" if k not in params else
                f"{k} has shape {tuple(v.shape)} in {folder} but {tuple(params[k].shape)} in the model"
                for k, v in saved.items() if k not in params or params[k].shape != v.shape]
    if problems:
        raise ValueError(f"the adapters in {folder} do not fit this model: " + "; ".join(problems[:8]))
    with torch.no_grad():
        for k, v in saved.items():
            params[k].copy_(v)
            params[k].requires_grad = True
    return model
