"""Fine-tuning runs behind ``gptfast finetune classify|instruct``: load, adapt, train, checkpoint.

A run folder looks like a training run's, so everything that reads one reads this too::

    OUT/step-N/model.safetensors   the fine-tuned weights (LoRA adapters merged in), the book's names
    OUT/step-N/config.json         model config + the task (num_classes, labels, pad_token_id, ...)
    OUT/step-N/lora/               with LoRA: only the adapters (+ the new head), see gptfast.lora
    OUT/metrics.jsonl              one JSON object per evaluation
    OUT/responses.json             instruct: the validation entries with the model's responses

A step folder is written as ``OUT/.step-N.tmp`` and renamed into place (a crash never leaves half a
checkpoint). ``GPTModel.from_pretrained(OUT)`` loads the newest step, classifier head included.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Subset

from . import checkpoint
from .data import default_tokenizer
from .classify import (DatasetError, ClassificationDataset, calc_accuracy_loader, calc_loss_batch as classify_loss_batch,
                       prepare_for_classification)
from .instruct import InstructionDataset, custom_collate_fn, generate_response, load_instruction_data
from .lora import merged_state_dict, replace_linear_with_lora, save_lora

METRICS_FILE = "metrics.jsonl"


@dataclass
class FinetuneConfig:
    """The knobs of a fine-tuning run; defaults are the book's (chapters 6 and 7, appendix E)."""

    out_dir: str
    epochs: int = 5  # chapter 6 trains 5 epochs, chapter 7 two
    batch_size: int = 8
    lr: float = 5e-5
    weight_decay: float = 0.1
    eval_every: int = 50  # steps between evaluations (and one after every epoch)
    eval_iters: int = 5  # batches per evaluation
    lora_rank: int = 0  # 0: no LoRA (train the chosen layers); the book uses 16
    lora_alpha: float = 16.0
    seed: int = 123
    device: str = "cpu"
    progress: bool = True
    keep_last: int = 1  # step folders kept (the newest ones)

    def __post_init__(self):
        for name in ("epochs", "batch_size", "eval_every", "eval_iters", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be 0 (off) or positive, got {self.lora_rank}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")


def save_finetuned(model, folder: str, extra_config: dict) -> None:
    """Write ``folder`` atomically: merged weights + config (+ ``lora/`` adapters when the model has them)."""
    from .lora import lora_layers

    parent = os.path.dirname(os.path.abspath(folder))
    tmp = os.path.join(parent, f".{os.path.basename(folder)}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    checkpoint.save_model(model, tmp, extra_config=extra_config, state_dict=merged_state_dict(model))
    if lora_layers(model):
        save_lora(model, os.path.join(tmp, "lora"))
    checkpoint.publish_dir(tmp, folder)


def fit(model, train_loader, val_loader, loss_batch, cfg: FinetuneConfig, extra_config: dict, extra_eval=None):
    """Train ``model`` for ``cfg.epochs`` over ``train_loader`` with AdamW on its trainable parameters.

    ``loss_batch(inputs, targets, model, device)`` gives a batch's loss; every ``eval_every`` steps and
    after each epoch the mean train/val loss over ``eval_iters`` batches (and ``extra_eval(model)``'s
    dict) goes to ``metrics.jsonl``; after each epoch ``step-N/`` is saved (the newest ``keep_last`` are kept). Returns the metric records.
    """
    from tqdm.auto import tqdm

    device = torch.device(cfg.device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    check_out_dir(cfg.out_dir)
    os.makedirs(cfg.out_dir, exist_ok=True)
    metrics_path = os.path.join(cfg.out_dir, METRICS_FILE)
    checkpoint.atomic_write_bytes(metrics_path, b"")
    history = []
    total = cfg.epochs * len(train_loader)
    bar = tqdm(total=total, desc="finetune", unit="step", dynamic_ncols=True, disable=not cfg.progress)

    def evaluate(step, epoch, examples):
        model.eval()
        with torch.no_grad():
            losses = {}
            for name, loader in (("train_loss", train_loader), ("val_loss", val_loader)):
                values = [loss_batch(x, y, model, device).item() for i, (x, y) in enumerate(loader) if i < cfg.eval_iters]
                losses[name] = sum(values) / len(values) if values else float("nan")
        record = {"step": step, "epoch": epoch, "examples_seen": examples, **losses}
        if extra_eval is not None:
            record.update(extra_eval(model))
        model.train()
        history.append(record)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if isinstance(v, float)})
        return record

    step, examples = 0, 0
    model.train()
    for epoch in range(1, cfg.epochs + 1):
        for inputs, targets in train_loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_batch(inputs, targets, model, device)
            loss.backward()
            # Checked once the backward is queued, so the GPU is busy while the CPU waits for the
            # value, and before the optimizer step, so a non-finite loss never reaches the weights.
            value = loss.item()
            if not math.isfinite(value):
                bar.close()
                raise FloatingPointError(f"the loss became {value} at step {step}; lower --lr")
            optimizer.step()
            step += 1
            examples += inputs.shape[0]
            bar.update(1)
            if step % cfg.eval_every == 0:
                evaluate(step, epoch, examples)
        if step % cfg.eval_every:
            evaluate(step, epoch, examples)
        save_finetuned(model, os.path.join(cfg.out_dir, f"step-{step}"), extra_config)
        for _, old in checkpoint.step_dirs(cfg.out_dir)[:-cfg.keep_last]:
            shutil.rmtree(old)
    bar.close()
    return history


def check_out_dir(out_dir):
    """Refuse a folder that already holds a run: its step folders would mix with (and be pruned by) this one."""
    if checkpoint.step_dirs(out_dir):
        raise FileExistsError(f"{out_dir} already holds a run's checkpoints (step-N folders); "
                              f"choose a new --out folder, or move that run away first")


def _split(n, val_fraction, seed):
    """Shuffled train/val index lists; at least one example in each when there are two or more."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(n - 1, max(1, round(n * val_fraction))) if n > 1 else 0
    return order[n_val:], order[:n_val] or order[:1]


def _load_base(base, drop_rate, backend, device):
    from .weights import from_pretrained

    return from_pretrained(base, backend, drop_rate=drop_rate, device=device)


def _check_vocabulary(model, tokenizer, base):
    """The tokenizer's ids must all be rows of the model's embedding (GPT-2's 50,257 for GPT-2's tokenizer)."""
    n_vocab = getattr(tokenizer, "n_vocab", None)
    if n_vocab is not None and model.cfg.vocab_size < n_vocab:
        where = f" {os.fspath(base)}" if base is not None else ""
        raise ValueError(f"the base model{where} has a vocabulary of "
                         f"{model.cfg.vocab_size} ids, but the tokenizer's ids go up to {n_vocab - 1}; fine-tune a "
                         f"model trained with this tokenizer (GPT-2's, for the gpt2 names)")


def finetune_classifier(base, data, cfg: FinetuneConfig, *, tokenizer=None, text_column="Text", label_column="Label",
                        num_classes=None, max_length=None, val_data=None, val_fraction=0.1, trainable_blocks=1,
                        backend=None, model=None):
    """Chapter 6 end to end: a classifier from ``base`` trained on the CSV ``data``; returns (model, history)."""
    check_out_dir(cfg.out_dir)
    tokenizer = tokenizer or default_tokenizer()
    torch.manual_seed(cfg.seed)
    kw = dict(text_column=text_column, label_column=label_column, num_classes=num_classes)
    train_set = ClassificationDataset(data, tokenizer, max_length=max_length, **kw)  # bad data fails before loading
    if model is None:
        model = _load_base(base, 0.0, backend, cfg.device)
    _check_vocabulary(model, tokenizer, base)
    context = model.cfg.context_length
    if max_length is not None and max_length > context:
        raise ValueError(f"max_length {max_length} exceeds the model's context_length {context}")
    if train_set.max_length > context:  # texts longer than the model sees: keep their first tokens
        train_set = ClassificationDataset(data, tokenizer, max_length=context, **kw)
    labels, pad = train_set.labels, train_set.pad_token_id
    n_classes = max(2, num_classes or train_set.num_classes)
    if val_data is not None:
        val_set = ClassificationDataset(val_data, tokenizer, max_length=train_set.max_length, labels=labels,
                                        **{**kw, "num_classes": n_classes})
    else:
        train_idx, val_idx = _split(len(train_set), val_fraction, cfg.seed)
        train_set, val_set = Subset(train_set, train_idx), Subset(train_set, val_idx)
    gen = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=False, generator=gen)
    val_loader = DataLoader(val_set, batch_size=cfg.batch_size, shuffle=False)
    prepare_for_classification(model, n_classes, trainable_blocks=trainable_blocks)
    if cfg.lora_rank:
        replace_linear_with_lora(model, cfg.lora_rank, cfg.lora_alpha, freeze_base=True)
        for p in model.out_head.linear.parameters():  # the new head is untrained: let it learn too
            p.requires_grad = True
    loss = functools.partial(classify_loss_batch, pool="last_token", pad_token_id=pad)  # padding changes nothing
    extra = {"task": "classify", "num_classes": n_classes, "labels": labels, "pad_token_id": pad,
             "max_length": (val_set.dataset if isinstance(val_set, Subset) else val_set).max_length,
             "base": os.fspath(base) if base is not None else None}

    def accuracy(m):
        return {"val_accuracy": calc_accuracy_loader(val_loader, m, cfg.device, cfg.eval_iters, pool="last_token",
                                                    pad_token_id=pad)}

    history = fit(model, train_loader, val_loader, lambda x, y, m, d: loss(x, y, m, d), cfg, extra, accuracy)
    model.labels = labels  # the class names (None for integer labels), as config.json keeps them
    model.pool = "last_token"  # classify_review answers as the model trained
    return model, history


def instruct_loss_batch(input_batch, target_batch, model, device):
    """The book's ``calc_loss_batch`` -- the mean cross-entropy over the targets that are not -100 --
    with the output head fused into the loss (``model(x, targets=y)``), so no (B, T, V) logits exist."""
    return model(input_batch.to(device), targets=target_batch.to(device))


def finetune_instructions(base, data, cfg: FinetuneConfig, *, tokenizer=None, max_length=None, val_fraction=0.05,
                          samples=3, max_new_tokens=256, backend=None, model=None):
    """Chapter 7 end to end: instruction-tune ``base`` on the JSON ``data``; writes ``responses.json``
    for up to ``samples`` validation entries. Returns (model, history)."""
    check_out_dir(cfg.out_dir)
    tokenizer = tokenizer or default_tokenizer()
    torch.manual_seed(cfg.seed)
    entries = load_instruction_data(data) if isinstance(data, (str, os.PathLike)) else list(data)
    if model is None:
        model = _load_base(base, 0.0, backend, cfg.device)
    _check_vocabulary(model, tokenizer, base)
    allowed = min(max_length or model.cfg.context_length, model.cfg.context_length)
    train_idx, val_idx = _split(len(entries), val_fraction, cfg.seed)
    train_set = InstructionDataset([entries[i] for i in train_idx], tokenizer)
    val_entries = [entries[i] for i in val_idx]
    val_set = InstructionDataset(val_entries, tokenizer)
    collate = functools.partial(custom_collate_fn, allowed_max_length=allowed, device=cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate, generator=gen)
    val_loader = DataLoader(val_set, batch_size=cfg.batch_size, shuffle=False, collate_fn=collate)
    if cfg.lora_rank:
        replace_linear_with_lora(model, cfg.lora_rank, cfg.lora_alpha, freeze_base=True)
    extra = {"task": "instruct", "base": os.fspath(base) if base is not None else None}
    history = fit(model, train_loader, val_loader, instruct_loss_batch, cfg, extra)
    if samples:
        out = []
        for entry in val_entries[:samples]:
            out.append({**entry, "model_response": generate_response(model, tokenizer, entry, max_new_tokens)})
        checkpoint.atomic_write_json(os.path.join(cfg.out_dir, "responses.json"), out)
    return model, history


__all__ = ["FinetuneConfig", "fit", "finetune_classifier", "finetune_instructions", "save_finetuned", "DatasetError"]
