"""Fine-tuning runs behind ``gptfast finetune classify|instruct``: load, adapt, train, checkpoint.

A run folder looks like a training run's, so everything that reads one reads this too::

    OUT/step-N/model.safetensors   the fine-tuned weights (LoRA adapters merged in), the book's names
    OUT/step-N/config.json         model config + the task (num_classes, labels, pad_token_id, template, ...)
    OUT/step-N/lora/               with LoRA: only the adapters (+ the new head), see gptfast.lora
    OUT/step-N/trainer_state.pt    what --resume needs: step, data position, optimizer, GradScaler, RNG and
                                   the trainable tensors unmerged; torch.load(weights_only=True)
    OUT/metrics.jsonl              one JSON object per evaluation, then the test split's scores
    OUT/summary.json               the last evaluation and the test scores of the latest invocation
    OUT/settings.json              the command's effective settings (reusable as --config)
    OUT/responses.json             instruct: validation and test entries with the model's responses

A step folder is written as ``OUT/.step-N.tmp`` and renamed into place (a crash never leaves half a
checkpoint). ``GPTModel.from_pretrained(OUT)`` loads the newest step, classifier head included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
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
                       calc_loss_loader, prepare_for_classification)
from .instruct import (DEFAULT_TEMPLATE, TEMPLATES, InstructionDataset, check_entries, custom_collate_fn,
                       generate_response, load_instruction_data, split_instruction_data)
from .lora import merged_state_dict, replace_linear_with_lora, save_lora

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
STATE_FILE = "trainer_state.pt"  # the name gptfast train uses for the same purpose
DTYPES = ("auto", "bf16", "fp16", "fp32")


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
    max_steps: int | None = None  # stop after this many optimizer steps (a checkpoint is saved there)
    save_every: int = 0  # steps between checkpoints besides those at each epoch's end (0: none)
    dtype: str = "auto"  # autocast: auto (bf16 on a GPU that has it, else fp32), bf16, fp16 (+ GradScaler), fp32
    resume: bool = False  # continue from the newest step-N/trainer_state.pt in out_dir

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
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.save_every < 0:
            raise ValueError(f"save_every must be 0 (only at epoch ends) or positive, got {self.save_every}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


def autocast_dtype(dtype: str, device) -> torch.dtype | None:
    """The autocast dtype for ``--dtype`` on ``device`` (None: plain fp32). ``auto`` is bf16 on a CUDA GPU
    that supports it and fp32 elsewhere (the CPU, MPS)."""
    device = torch.device(device)
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[dtype]


def save_finetuned(model, folder: str, extra_config: dict, state: dict | None = None) -> None:
    """Write ``folder`` atomically: merged weights + config (+ ``lora/`` adapters when the model has them,
    + ``trainer_state.pt`` when ``state`` is given)."""
    from .lora import lora_layers

    parent = os.path.dirname(os.path.abspath(folder))
    tmp = os.path.join(parent, f".{os.path.basename(folder)}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    checkpoint.save_model(model, tmp, extra_config=extra_config, state_dict=merged_state_dict(model))
    if lora_layers(model):
        save_lora(model, os.path.join(tmp, "lora"))
    if state is not None:
        with checkpoint.atomic_open(os.path.join(tmp, STATE_FILE), "wb") as f:
            torch.save(state, f)
    checkpoint.publish_dir(tmp, folder)


def read_trainer_state(folder: str) -> dict:
    """``folder/trainer_state.pt`` of a fine-tuning step (tensors only, ``weights_only=True``);
    ValueError naming the file when it is missing or damaged."""
    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no {STATE_FILE} (it was written by a gptfast that saved only weights), "
                         f"so it cannot be resumed exactly; start a new run into another --out folder")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a zip error, EOFError, an UnpicklingError: all mean a damaged file
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path} is truncated or corrupt ({detail}); delete {folder} to resume from an "
                         f"older step, or start a new run") from None
    missing = [k for k in ("step", "epoch", "batch", "optimizer", "trainable") if not isinstance(state, dict)
               or k not in state]
    if missing:
        raise ValueError(f"{path} is not a fine-tuning trainer state: it lacks {', '.join(missing)}")
    return state


def resume_point(out_dir: str) -> tuple[str, int]:
    """The newest step folder of the run in ``out_dir`` and its step; ValueError when there is none."""
    steps = checkpoint.step_dirs(out_dir)
    if not steps:
        raise ValueError(f"--resume: {out_dir} holds no step-N checkpoint to resume from; "
                         f"leave out --resume to start a new run there")
    step, folder = steps[-1]
    return folder, step


class _Stop(Exception):
    pass


def fit(model, train_loader, val_loader, loss_batch, cfg: FinetuneConfig, extra_config: dict, extra_eval=None,
        test_eval=None):
    """Train ``model`` for ``cfg.epochs`` over ``train_loader`` with AdamW on its trainable parameters.

    ``loss_batch(inputs, targets, model, device)`` gives a batch's loss; every ``eval_every`` steps and
    after each epoch the mean train/val loss over ``eval_iters`` batches (and ``extra_eval(model)``'s
    dict) goes to ``metrics.jsonl``. ``step-N/`` (weights + ``trainer_state.pt``) is saved after each
    epoch, every ``save_every`` steps and where ``max_steps`` stops the run; the newest ``keep_last``
    are kept. With ``cfg.resume`` the run continues from its newest step exactly: weights, optimizer,
    GradScaler, RNG and the position in the data order. At the end ``test_eval(model)``'s dict (if
    given) is added to ``metrics.jsonl`` and ``summary.json``. Returns the metric records.
    """
    from tqdm.auto import tqdm

    device = torch.device(cfg.device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    amp = autocast_dtype(cfg.dtype, device)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None

    def autocast():
        return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()

    gen = getattr(train_loader, "generator", None)  # the shuffle's generator (a DataLoader's), if any
    n_batches = len(train_loader)
    total = cfg.epochs * n_batches
    last_step = total if cfg.max_steps is None else min(total, cfg.max_steps)
    metrics_path = os.path.join(cfg.out_dir, METRICS_FILE)
    step, examples, start_epoch, skip, epoch_gen_state = 0, 0, 1, 0, None
    history = []
    if cfg.resume:
        folder, _ = resume_point(cfg.out_dir)
        state = read_trainer_state(folder)
        step = int(state["step"])
        if cfg.max_steps is not None and cfg.max_steps < step:
            raise ValueError(f"--max-steps {cfg.max_steps} is below this run's step {step}: pass a larger "
                             f"--max-steps, or leave it out to train to the end of --epochs")
        if step >= last_step:
            where = (f"--max-steps {cfg.max_steps} ends" if cfg.max_steps is not None and cfg.max_steps < total
                     else f"its {cfg.epochs} epoch(s) of {n_batches} steps end")
            raise ValueError(f"the run in {cfg.out_dir} is already at step {step}, where {where}; pass a larger "
                             f"--max-steps or more --epochs to train on")
        _load_trainable(model, state["trainable"], folder)
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        examples, start_epoch, skip = int(state["examples_seen"]), int(state["epoch"]), int(state["batch"])
        epoch_gen_state = state.get("generator")
        rng = state.get("rng", {})
        if "cpu" in rng:
            torch.set_rng_state(rng["cpu"])
        if device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
        if os.path.isfile(metrics_path):
            # The records an uninterrupted run would have: those up to the checkpoint (later ones are
            # redone), less the evaluation and test scores made only because a run stopped there.
            with open(metrics_path) as f:
                history = [r for r in map(json.loads, filter(str.strip, f))
                           if r.get("step", 0) <= step and not r.get("stop") and r.get("split") != "test"]
        checkpoint.atomic_write_bytes(metrics_path, "".join(json.dumps(r) + "\n" for r in history).encode())
    else:
        check_out_dir(cfg.out_dir)
        os.makedirs(cfg.out_dir, exist_ok=True)
        checkpoint.atomic_write_bytes(metrics_path, b"")
    bar = tqdm(total=last_step, initial=step, desc="finetune", unit="step", dynamic_ncols=True,
               disable=not cfg.progress)

    def batches(loader, limit=None):
        """The first ``limit`` batches of ``loader``, leaving its shuffle generator as it was."""
        saved = gen.get_state() if gen is not None and getattr(loader, "generator", None) is gen else None
        try:
            yield from itertools.islice(loader, limit)
        finally:
            if saved is not None:
                gen.set_state(saved)

    def evaluate(epoch, stop=False):
        model.eval()
        with torch.no_grad(), autocast():
            losses = {}
            for name, loader in (("train_loss", train_loader), ("val_loss", val_loader)):
                values = [loss_batch(x, y, model, device).item() for x, y in batches(loader, cfg.eval_iters)]
                losses[name] = sum(values) / len(values) if values else float("nan")
            record = {"step": step, "epoch": epoch, "examples_seen": examples, **losses}
            if extra_eval is not None:
                record.update(extra_eval(model))
            if stop:
                record["stop"] = True
        model.train()
        history.append(record)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if isinstance(v, float)})
        return record

    def save(epoch, batch):
        state = {"step": step, "epoch": epoch, "batch": batch, "examples_seen": examples,
                 "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
                 "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler is not None else {},
                 "generator": epoch_gen_state, "rng": _rng_state(device),
                 "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "resume"}}
        if state["generator"] is None:
            del state["generator"]
        save_finetuned(model, os.path.join(cfg.out_dir, f"step-{step}"), extra_config, state)
        # only older steps are pruned: a newer one (left by an interrupted run) is replaced when reached
        for _, old in [d for d in checkpoint.step_dirs(cfg.out_dir) if d[0] <= step][:-cfg.keep_last]:
            shutil.rmtree(old)

    model.train()
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            if epoch == start_epoch and cfg.resume:
                if gen is not None and epoch_gen_state is not None:
                    gen.set_state(epoch_gen_state)
            else:
                skip = 0
                epoch_gen_state = gen.get_state() if gen is not None else None
            for batch, (inputs, targets) in enumerate(train_loader, 1):
                if batch <= skip:
                    continue  # already trained on before the resume: the same order, skipped
                optimizer.zero_grad(set_to_none=True)
                with autocast():
                    loss = loss_batch(inputs, targets, model, device)
                (scaler.scale(loss) if scaler is not None else loss).backward()
                # Checked once the backward is queued, so the GPU is busy while the CPU waits for the
                # value, and before the optimizer step, so a non-finite loss never reaches the weights.
                value = loss.item()
                if not math.isfinite(value):
                    raise FloatingPointError(f"the loss became {value} at step {step}; lower --lr"
                                             + (" or use --dtype bf16/fp32" if scaler is not None else ""))
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                step += 1
                examples += inputs.shape[0]
                bar.update(1)
                end_of_epoch = batch == n_batches
                if step % cfg.eval_every == 0 or end_of_epoch:
                    evaluate(epoch)
                elif step == last_step:  # where --max-steps stops: an evaluation an uninterrupted run lacks
                    evaluate(epoch, stop=True)
                if end_of_epoch or step == last_step or (cfg.save_every and step % cfg.save_every == 0):
                    save(epoch, batch)
                if step == last_step:
                    raise _Stop
    except _Stop:
        pass
    finally:
        bar.close()
    if test_eval is not None:
        model.eval()
        with torch.no_grad(), autocast():
            result = test_eval(model)
        model.train()
        if result:
            record = {"split": "test", "step": step, "epoch": history[-1]["epoch"] if history else 0,
                      "examples_seen": examples, **result}
            history.append(record)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
    last_eval = next((r for r in reversed(history) if "val_loss" in r), {})
    tested = {k: v for k, v in history[-1].items() if k.startswith("test_")} if history else {}
    summary = {"step": step, "epochs": cfg.epochs, "examples_seen": examples, "finished": step >= total,
               **{k: v for k, v in last_eval.items() if k not in ("step", "epoch", "examples_seen")}, **tested}
    checkpoint.atomic_write_json(os.path.join(cfg.out_dir, SUMMARY_FILE), summary)
    return history


def _rng_state(device) -> dict:
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def _load_trainable(model, saved: dict, folder: str) -> None:
    """Put a checkpoint's trainable tensors (unmerged: LoRA adapters, head, unfrozen blocks) into ``model``."""
    ours = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(ours) != set(saved) or any(ours[n].shape != saved[n].shape for n in ours):
        diff = sorted(set(ours) ^ set(saved)) or [n for n in ours if ours[n].shape != saved[n].shape]
        raise ValueError(f"{folder} was trained with other trainable layers than this run's (first difference: "
                         f"{diff[0]}); resume with the run's own --lora-rank and --trainable-blocks")
    with torch.no_grad():
        for name, p in ours.items():
            p.copy_(saved[name])


def check_out_dir(out_dir):
    """Refuse a folder that already holds a run: its step folders would mix with (and be pruned by) this one."""
    if checkpoint.step_dirs(out_dir):
        raise FileExistsError(f"{out_dir} already holds a run's checkpoints (step-N folders); pass --resume to "
                              f"continue that run, or choose a new --out folder")


def _split(n, val_fraction, seed, test_fraction=0.0):
    """Shuffled (train, val, test) index lists. Validation gets at least one example (the only one when
    ``n`` is 1), the test split gets ``round(n * test_fraction)`` (at least one when asked for) as long
    as training keeps one; ``val_fraction`` 0 means no validation split (a separate file has it)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1) and leave room for training, got {test_fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(n - 1, max(1, round(n * val_fraction))) if n > 1 and val_fraction else 0
    n_test = min(n - 1 - n_val, max(1, round(n * test_fraction))) if test_fraction else 0
    n_test = max(0, n_test)
    val = order[:n_val] or (order[:1] if val_fraction else [])
    return order[n_val + n_test:], val, order[n_val:n_val + n_test]


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
                        num_classes=None, max_length=None, val_data=None, val_fraction=0.1, test_data=None,
                        test_fraction=0.2, trainable_blocks=1, backend=None, model=None):
    """Chapter 6 end to end: a classifier from ``base`` trained on the CSV ``data``; returns (model, history).

    Validation is ``val_data`` or ``val_fraction`` of ``data``; the test split is ``test_data`` or
    ``test_fraction`` of ``data`` (the book's 70/10/20 by default; 0: none), scored once at the end
    (``test_loss``, ``test_accuracy`` over all of it)."""
    if not cfg.resume:
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
    full = train_set

    def other(path):
        return ClassificationDataset(path, tokenizer, max_length=full.max_length, labels=labels,
                                     **{**kw, "num_classes": n_classes})

    train_idx, val_idx, test_idx = _split(len(full), 0.0 if val_data is not None else val_fraction, cfg.seed,
                                          0.0 if test_data is not None else test_fraction)
    train_set = Subset(full, train_idx)
    val_set = other(val_data) if val_data is not None else Subset(full, val_idx)
    test_set = other(test_data) if test_data is not None else (Subset(full, test_idx) if test_idx else None)
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
             "max_length": full.max_length, "base": os.fspath(base) if base is not None else None}
    scored = dict(pool="last_token", pad_token_id=pad)

    def accuracy(m):
        return {"val_accuracy": calc_accuracy_loader(val_loader, m, cfg.device, cfg.eval_iters, **scored)}

    def test(m):
        if test_set is None:
            return {}
        loader = DataLoader(test_set, batch_size=cfg.batch_size, shuffle=False)
        return {"test_loss": calc_loss_loader(loader, m, cfg.device, **scored),
                "test_accuracy": calc_accuracy_loader(loader, m, cfg.device, **scored), "test_examples": len(test_set)}

    history = fit(model, train_loader, val_loader, lambda x, y, m, d: loss(x, y, m, d), cfg, extra, accuracy, test)
    model.labels = labels  # the class names (None for integer labels), as config.json keeps them
    model.pool = "last_token"  # classify_review answers as the model trained
    return model, history


def instruct_loss_batch(input_batch, target_batch, model, device):
    """The book's ``calc_loss_batch`` -- the mean cross-entropy over the targets that are not -100 --
    with the output head fused into the loss (``model(x, targets=y)``), so no (B, T, V) logits exist."""
    return model(input_batch.to(device), targets=target_batch.to(device))


def finetune_instructions(base, data, cfg: FinetuneConfig, *, tokenizer=None, max_length=None, val_fraction=0.05,
                          test_fraction=0.10, samples=3, max_new_tokens=256, template=DEFAULT_TEMPLATE, backend=None,
                          model=None):
    """Chapter 7 end to end: instruction-tune ``base`` on ``data`` (a JSON or JSONL file, or a list of
    entries) split as the book does -- in file order, 85% train, 10% test, the last 5% validation.
    At the end the test split's loss goes to ``metrics.jsonl`` and ``responses.json`` gets up to
    ``samples`` validation and ``samples`` test entries with the model's responses. Returns (model, history)."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {', '.join(sorted(TEMPLATES))}, got {template!r}")
    if not cfg.resume:
        check_out_dir(cfg.out_dir)
    tokenizer = tokenizer or default_tokenizer()
    torch.manual_seed(cfg.seed)
    entries = load_instruction_data(data) if isinstance(data, (str, os.PathLike)) else check_entries(list(data))
    train_entries, test_entries, val_entries = split_instruction_data(entries, 1.0 - val_fraction - test_fraction,
                                                                      test_fraction)
    if not train_entries:
        where = os.fspath(data) if isinstance(data, (str, os.PathLike)) else "the data"
        raise DatasetError(f"{where} has {len(entries)} entry: instruction tuning needs at least 2 "
                           f"(one to train on, one to validate with)")
    if model is None:
        model = _load_base(base, 0.0, backend, cfg.device)
    _check_vocabulary(model, tokenizer, base)
    allowed = min(max_length or model.cfg.context_length, model.cfg.context_length)
    train_set = InstructionDataset(train_entries, tokenizer, template=template)
    val_set = InstructionDataset(val_entries, tokenizer, template=template)
    collate = functools.partial(custom_collate_fn, allowed_max_length=allowed, device=cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate, generator=gen)
    val_loader = DataLoader(val_set, batch_size=cfg.batch_size, shuffle=False, collate_fn=collate)
    if cfg.lora_rank:
        replace_linear_with_lora(model, cfg.lora_rank, cfg.lora_alpha, freeze_base=True)
    extra = {"task": "instruct", "template": template, "base": os.fspath(base) if base is not None else None}

    def test(m):
        if not test_entries:
            return {}
        loader = DataLoader(InstructionDataset(test_entries, tokenizer, template=template),
                            batch_size=cfg.batch_size, shuffle=False, collate_fn=collate)
        values = [instruct_loss_batch(x, y, m, cfg.device).item() for x, y in loader]
        return {"test_loss": sum(values) / len(values), "test_examples": len(test_entries)}

    history = fit(model, train_loader, val_loader, instruct_loss_batch, cfg, extra, test_eval=test)
    if samples:
        out = []
        for split, chosen in (("val", val_entries), ("test", test_entries)):
            for entry in chosen[:samples]:
                response = generate_response(model, tokenizer, entry, max_new_tokens, template=template)
                out.append({**entry, "split": split, "model_response": response})
        checkpoint.atomic_write_json(os.path.join(cfg.out_dir, "responses.json"), out)
    return model, history


__all__ = ["FinetuneConfig", "fit", "finetune_classifier", "finetune_instructions", "save_finetuned", "resume_point",
           "read_trainer_state", "autocast_dtype", "DatasetError"]
