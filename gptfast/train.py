"""Pretraining: the book's loss, evaluation and training loops (chapter 5, appendix D), and a trainer
for real runs (:class:`Trainer`, behind ``gptfast train``).

The book's functions keep their names, arguments and printed lines. The trainer adds what a long run
needs: token shards read by random windows, AdamW with warmup + cosine decay and gradient clipping,
bf16 autocast, gradient accumulation, DistributedDataParallel (or FSDP) under ``torchrun``, and
checkpoints that resume exactly::

    DIR/step-N/model.safetensors     the weights under the book's key names (gptfast.checkpoint)
    DIR/step-N/config.json           the model config (+ the tokenizer's name)
    DIR/step-N/trainer_state.pt      optimizer, scheduler, RNG and data position; torch.load(weights_only=True)
    DIR/metrics.jsonl                one JSON object per logged step
    DIR/loss.png                     the loss curve, redrawn at each evaluation

A step folder is written as ``DIR/.step-N.tmp`` and renamed into place, so a crash mid-write leaves
the previous checkpoints intact; only the last ``keep_last`` are kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import zipfile
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import checkpoint
from .checkpoint import CheckpointError, latest_checkpoint, step_dirs  # noqa: F401  (also part of this module's API)
from .generation import generate, generate_text_simple, text_to_token_ids, token_ids_to_text

STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
CSV_FILE = "metrics.csv"
PLOT_FILE = "loss.png"
BEST_DIR = "best"
BEST_FILE = "best.json"
TENSORBOARD_DIR = "tensorboard"
DTYPES = ("auto", "bf16", "fp16", "fp32")
# metric writers besides metrics.jsonl, and the pip extra that installs each one's package
LOGGERS = {"csv": None, "tensorboard": "tensorboard", "wandb": "wandb"}
CSV_COLUMNS = ("step", "train_loss", "val_loss", "val_ppl", "lr", "tokens_per_s", "mfu")


class TrainingError(RuntimeError):
    """A run that cannot go on (a NaN loss, a checkpoint that does not fit); the message says why."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :meth:`Trainer.fit`: the step under way was finished and saved as ``checkpoint``
    (``step``), so ``--resume`` continues exactly. A second Ctrl-C stops at once, without saving."""

    def __init__(self, step: int, checkpoint: str | None):
        super().__init__(f"interrupted after step {step}")
        self.step, self.checkpoint = step, checkpoint


def perplexity(loss: float) -> float:
    """``exp(loss)``, the perplexity of a mean cross-entropy (``inf`` past what a float holds)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def check_loggers(names) -> None:
    """Raise ``ValueError`` (a one-line message with the pip command) unless each metric writer in
    ``names`` can run here: ``csv`` always can, ``tensorboard`` and ``wandb`` need their package."""
    for name in names:
        if name not in LOGGERS:
            raise ValueError(f"log {name!r} is not a metrics writer: use {', '.join(LOGGERS)} (comma-separated)")
        if name == "tensorboard":
            try:
                import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
            except ImportError:
                raise ValueError("log tensorboard needs the tensorboard package: "
                                 "pip install 'gptfast-from-scratch[tensorboard]'") from None
        elif name == "wandb":
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise ValueError("log wandb needs the wandb package: pip install 'gptfast-from-scratch[wandb]'") \
                    from None


class _CsvLog:
    """``metrics.csv``: one row per logged step, the columns of :data:`CSV_COLUMNS` (empty where unknown)."""

    def __init__(self, out_dir, history):
        self.path = os.path.join(out_dir, CSV_FILE)
        # a resumed run rewrites what came after its checkpoint, as metrics.jsonl does
        checkpoint.atomic_write_bytes(self.path, "".join(self._row(r) for r in [None, *history]).encode())

    @staticmethod
    def _row(record):
        if record is None:
            return ",".join(CSV_COLUMNS) + "\n"
        return ",".join("" if record.get(c) is None else repr(record[c]) for c in CSV_COLUMNS) + "\n"

    def write(self, record):
        with open(self.path, "a") as f:
            f.write(self._row(record))

    def close(self):
        pass


class _TensorBoardLog:
    def __init__(self, out_dir, start_step):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run's events replace those logged after its checkpoint
        self.writer = SummaryWriter(os.path.join(out_dir, TENSORBOARD_DIR), purge_step=start_step + 1)

    def write(self, record):
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, record["step"])

    def close(self):
        self.writer.close()


class _WandbLog:
    ID_FILE = "wandb-run-id"

    def __init__(self, out_dir, settings):
        import wandb

        id_path = os.path.join(out_dir, self.ID_FILE)
        run_id = open(id_path).read().strip() if os.path.isfile(id_path) else wandb.util.generate_id()
        checkpoint.atomic_write_bytes(id_path, (run_id + "\n").encode())
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "gptfast"), id=run_id, resume="allow",
                              name=os.path.basename(os.path.abspath(out_dir)), dir=out_dir, config=settings or {})

    def write(self, record):
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self):
        self.run.finish()


# --------------------------------------------------------------------------------------------------
# The book's chapter-5 functions
# --------------------------------------------------------------------------------------------------


def calc_loss_batch(input_batch, target_batch, model, device):
    """Mean cross-entropy of the next-token predictions of one batch (the book's function)."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), target_batch.flatten())


def calc_loss_loader(data_loader, model, device, num_batches=None):
    """Average batch loss over the first ``num_batches`` batches (all by default); NaN for an empty loader."""
    total_loss = 0.0
    if len(data_loader) == 0:
        return float("nan")
    elif num_batches is None:
        num_batches = len(data_loader)
    else:
        num_batches = min(num_batches, len(data_loader))
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i < num_batches:
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            total_loss += loss.item()
        else:
            break
    return total_loss / num_batches


def evaluate_model(model, train_loader, val_loader, device, eval_iter):
    """Training and validation loss over ``eval_iter`` batches each, in eval mode and without gradients."""
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    model.train()
    return train_loss, val_loss


def _context_length(model):
    cfg = getattr(model, "cfg", None)
    return cfg.context_length if cfg is not None else model.pos_emb.weight.shape[0]


def generate_and_print_sample(model, tokenizer, device, start_context):
    """Print 50 greedy tokens after ``start_context`` on one line (the book's progress check)."""
    model.eval()
    context_size = _context_length(model)
    encoded = text_to_token_ids(start_context, tokenizer).to(device)
    with torch.no_grad():
        token_ids = generate_text_simple(model=model, idx=encoded, max_new_tokens=50, context_size=context_size)
    decoded_text = token_ids_to_text(token_ids, tokenizer)
    print(decoded_text.replace("\n", " "))
    model.train()


def train_model_simple(model, train_loader, val_loader, optimizer, device, num_epochs, eval_freq, eval_iter,
                       start_context, tokenizer):
    """The book's chapter-5 loop. Returns ``(train_losses, val_losses, track_tokens_seen)``, one entry
    per evaluation (every ``eval_freq`` steps, starting with step 0)."""
    train_losses, val_losses, track_tokens_seen = [], [], []
    tokens_seen, global_step = 0, -1
    for epoch in range(num_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()
            optimizer.step()
            tokens_seen += input_batch.numel()
            global_step += 1
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                track_tokens_seen.append(tokens_seen)
                print(f"Ep {epoch+1} (Step {global_step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        generate_and_print_sample(model, tokenizer, device, start_context)
    return train_losses, val_losses, track_tokens_seen


def train_model(model, train_loader, val_loader, optimizer, device, n_epochs, eval_freq, eval_iter, start_context,
                tokenizer, warmup_steps, initial_lr=3e-05, min_lr=1e-6, orig_book_version=False):
    """Appendix D's loop: linear warmup from ``initial_lr`` to the optimizer's lr over ``warmup_steps``,
    cosine decay to ``min_lr``, and gradient clipping (max norm 1) from the end of warmup on.

    Returns ``(train_losses, val_losses, track_tokens_seen, track_lrs)``; ``track_lrs`` has one lr per step.
    Clipping starts at step ``warmup_steps``; ``orig_book_version=True`` starts it one step later, as
    the book's first printing did (the book's code takes the same flag).
    """
    train_losses, val_losses, track_tokens_seen, track_lrs = [], [], [], []
    tokens_seen, global_step = 0, -1
    peak_lr = optimizer.param_groups[0]["lr"]
    total_training_steps = len(train_loader) * n_epochs
    lr_increment = (peak_lr - initial_lr) / warmup_steps
    for epoch in range(n_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            global_step += 1
            if global_step < warmup_steps:
                lr = initial_lr + global_step * lr_increment
            else:
                progress = (global_step - warmup_steps) / (total_training_steps - warmup_steps)
                lr = min_lr + (peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            track_lrs.append(lr)
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()
            if global_step >= warmup_steps + int(bool(orig_book_version)):
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            optimizer.step()
            tokens_seen += input_batch.numel()
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                track_tokens_seen.append(tokens_seen)
                print(f"Ep {epoch+1} (Iter {global_step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        generate_and_print_sample(model, tokenizer, device, start_context)
    return train_losses, val_losses, track_tokens_seen, track_lrs


def plot_losses(epochs_seen, tokens_seen, train_losses, val_losses, path="loss-plot.pdf", *, show=True):
    """The book's loss plot: training and validation loss against epochs, tokens seen on a second axis.

    As the book, saves it to ``loss-plot.pdf`` and shows it (``plt.show()``, a no-op under a
    non-interactive backend such as Agg). ``path=None`` saves nothing, ``show=False`` shows nothing.
    Returns the matplotlib figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax1 = plt.subplots(figsize=(5, 3))
    ax1.plot(epochs_seen, train_losses, label="Training loss")
    ax1.plot(epochs_seen, val_losses, linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2 = ax1.twiny()  # a second x-axis sharing the y-axis
    ax2.plot(tokens_seen, train_losses, alpha=0)  # invisible, aligns the ticks
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    if show:
        plt.show()
    return fig


# --------------------------------------------------------------------------------------------------
# The trainer's pieces: schedule, optimizer, checkpoints
# --------------------------------------------------------------------------------------------------


class WarmupCosine:
    """lr multiplier for ``LambdaLR``: linear warmup over ``warmup`` steps (step 0 gets 1/warmup), then a
    cosine from 1 down to ``min_ratio`` at ``total`` steps. A class, so the scheduler's state saves."""

    def __init__(self, warmup: int, total: int, min_ratio: float):
        self.warmup, self.total, self.min_ratio = int(warmup), int(total), float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model, lr, weight_decay, betas=(0.9, 0.95), fused=None):
    """AdamW with weight decay on matrices and embeddings only (not on biases and LayerNorm parameters);
    fused on a GPU when torch offers it."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if fused is None:
        fused = all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=bool(fused))




ACCEPTED_CHECKPOINTS = (f"a training run folder (its newest step-N is used), one of its step-N folders, "
                        f"or the {checkpoint.MODEL_FILE} inside one")


def resolve_checkpoint(path: str) -> str:
    """A run folder (its latest step), one step folder, or the weights file inside one -> the step
    folder; a clear error otherwise (a missing path, a file that is no checkpoint, a run without steps)."""
    if os.path.isfile(path):
        if os.path.basename(path) in (checkpoint.MODEL_FILE, checkpoint.CONFIG_FILE):
            return os.path.dirname(path) or "."
        raise CheckpointError(f"{path} is a file, not a loadable checkpoint: pass {ACCEPTED_CHECKPOINTS}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} does not exist: pass {ACCEPTED_CHECKPOINTS}")
    if os.path.exists(os.path.join(path, checkpoint.MODEL_FILE)) or \
            os.path.exists(os.path.join(path, checkpoint.CONFIG_FILE)):
        return path  # a step folder; loading it names a missing or damaged file
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path} holds no checkpoint (no step-N folder with {checkpoint.MODEL_FILE}): "
                              f"pass {ACCEPTED_CHECKPOINTS}")
    return latest


def load_trainer_state(folder: str, mmap: bool = False) -> dict:
    """``folder/trainer_state.pt`` (tensors only, ``weights_only=True``); :class:`CheckpointError` when it
    is missing, truncated or not a trainer state. ``mmap`` reads only the file's index (a cheap check)."""
    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder} lacks {STATE_FILE}: it holds weights but no trainer state to resume "
                              f"from (generate and from_pretrained can still read it)")
    damaged = f"{path} is truncated or corrupt, not a readable trainer state"
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{damaged} (it is not the zip archive torch.save writes)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # a zip error (RuntimeError), EOFError, an UnpicklingError: all mean a damaged file
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
        raise CheckpointError(f"{damaged} ({detail})") from None
    missing = [k for k in ("step", "optimizer", "scheduler") if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a trainer state: it lacks {', '.join(missing)}")
    return state


def check_resumable(folder: str) -> None:
    """Raise :class:`CheckpointError` unless ``folder`` has a readable config, weights and trainer state
    (file headers only: quick even for a large model)."""
    checkpoint.read_config(folder)
    checkpoint.check_weights_file(folder)
    load_trainer_state(folder, mmap=True)


def resumable_checkpoint(run_dir: str) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest step folder of ``run_dir`` that loads, and ``(folder, why)`` for each newer one skipped.

    Skipped folders are left as they are; a resumed run replaces them when it saves their step again.
    """
    skipped = []
    for _, folder in reversed(step_dirs(run_dir)):
        try:
            check_resumable(folder)
        except CheckpointError as e:
            skipped.append((folder, str(e)))
            continue
        return folder, skipped
    return None, skipped


def _param_names(model, optimizer):
    """The name of each parameter in the order ``optimizer.state_dict()`` numbers them."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _optimizer_state_by_name(model, optimizer, state):
    """An optimizer state dict keyed by parameter names (the layout FSDP's full state dict uses), so a
    checkpoint resumes on one process, under DDP or under FSDP alike."""
    names = _param_names(model, optimizer)
    return {"state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]]}


def _optimizer_state_by_index(model, optimizer, state):
    """The inverse of :func:`_optimizer_state_by_name`: ``torch.optim``'s own layout."""
    index = {n: i for i, n in enumerate(_param_names(model, optimizer))}
    return {"state": {index[n]: v for n, v in state["state"].items()},
            "param_groups": [dict(g, params=[index[n] for n in g["params"]]) for g in state["param_groups"]]}


def _torch_save_atomic(obj, path):
    with checkpoint.atomic_open(path, "wb") as f:
        torch.save(obj, f)


def _data_changes(saved: dict, ours: dict) -> str:
    """Which inputs differ between two ``data`` records (``sources``: ``[{"path", "sha256"}]``), in words."""
    before = {s["path"]: s.get("sha256") for s in saved.get("sources", [])}
    now = {s["path"]: s.get("sha256") for s in ours.get("sources", [])}
    parts = []
    changed = [p for p in before if p in now and before[p] != now[p]]
    for label, paths in (("changed", changed), ("added", [p for p in now if p not in before]),
                         ("no longer given", [p for p in before if p not in now])):
        if paths:
            parts.append(f"{label}: {', '.join(paths)}")
    return "; ".join(parts) or "the tokens differ"


# --------------------------------------------------------------------------------------------------
# Distributed setup
# --------------------------------------------------------------------------------------------------


def init_distributed() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)``; joins the process group when launched by ``torchrun``
    (NCCL with GPUs, gloo without)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        else:
            dist.init_process_group("gloo")
    return rank, world, local


def _torch_older_than(major: int, minor: int) -> bool:
    found = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    return found < (major, minor)


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def barrier():
    d = _dist()
    if d is not None:
        d.barrier()


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything about a run except the model and the data (``gptfast train``'s flags)."""

    out_dir: str
    steps: int = 1000  # optimizer steps in all (a resumed run continues up to here)
    batch_size: int = 8  # windows per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 6e-4  # peak learning rate
    min_lr: float | None = None  # where the cosine ends; default lr / 10
    warmup: int = 100  # linear warmup steps
    weight_decay: float = 0.1
    clip: float = 1.0  # max gradient norm; 0 turns clipping off
    seed: int = 1337
    eval_every: int = 100  # evaluate (and draw the plot, print a sample) every this many steps
    eval_iters: int = 20  # validation batches per evaluation
    save_every: int | None = None  # checkpoint every this many steps; default eval_every
    keep_last: int = 3  # checkpoints kept
    log_every: int = 1  # write a metrics line every this many steps
    dtype: str = "auto"  # "auto" (bf16 autocast on a GPU that has it, fp32 otherwise), "bf16", "fp16", "fp32"
    compile: bool = False
    grad_checkpoint: bool = False
    fsdp: bool = False  # shard parameters, gradients and optimizer state over the processes
    sample_prompt: str = "Every effort moves you"
    sample_tokens: int = 30  # 0: no samples
    progress: bool = True
    save_best: bool = False  # keep the checkpoint of the lowest validation loss as out_dir/best
    log: tuple = ()  # more metric writers besides metrics.jsonl: "csv", "tensorboard", "wandb"
    run_settings: dict | None = None  # what wandb records as the run's config (the command's settings)

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_iters", "keep_last", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("warmup", "weight_decay", "clip", "min_lr"):
            if getattr(self, name) is not None and not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.save_every is not None and self.save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {self.save_every}")
        if self.sample_tokens < 0:
            raise ValueError(f"sample_tokens must be >= 0, got {self.sample_tokens}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        self.log = tuple(self.log)
        unknown = [name for name in self.log if name not in LOGGERS]
        if unknown:
            raise ValueError(f"log {unknown[0]!r} is not a metrics writer: use {', '.join(LOGGERS)} (comma-separated)")
        if self.dtype == "fp16" and self.fsdp:
            raise ValueError("dtype fp16 needs a gradient scaler, which gptfast does not run under fsdp; "
                             "use --dtype bf16 with --fsdp")


def flops_per_token(cfg, num_params: int) -> float:
    """Training FLOPs per token, nanoGPT's estimate: ``6 N + 12 L H Q T`` (N: parameters in matmuls)."""
    return 6 * num_params + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * cfg.context_length


def matmul_parameters(model) -> int:
    """Parameters that take part in matmuls: all but the positional and (untied) token embeddings."""
    n = model.num_parameters() - sum(p.numel() for p in model.pos_emb.parameters())
    if not model.cfg.tie_weights:
        n -= model.tok_emb.weight.numel()
    return n


def _peak_tflops(device, dtype_name):
    if device.type != "cuda":
        return None
    try:
        from .bench.harness import device_info
    except ImportError:
        return None
    return device_info("cuda", measure=False).peak_tflops.get(dtype_name)


class Trainer:
    """Train ``model`` on token windows from ``train`` (a :class:`gptfast.data.TokenSplit`), evaluating on ``val``.

    Under ``torchrun`` (after :func:`init_distributed`) every process runs a Trainer: each reads its own
    slice of every global batch, gradients are averaged by DDP (or sharded by FSDP), rank 0 writes.
    """

    def __init__(self, model, train, val, config: TrainConfig, tokenizer=None, device=None, data_info=None):
        self.model = model
        self.train_split, self.val_split = train, val
        self.cfg = config
        self.tokenizer = tokenizer
        self.data_info = dict(data_info or {})
        d = _dist()
        self.rank = d.get_rank() if d else 0
        self.world = d.get_world_size() if d else 1
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.device = torch.device(device)
        self.seq_len = model.cfg.context_length
        self.history: list[dict] = []
        for split in (train, val):
            split.check(self.seq_len)
        use_bf16 = config.dtype == "bf16" or (
            config.dtype == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported())
        self.dtype_name = "bf16" if use_bf16 else "fp16" if config.dtype == "fp16" else "fp32"
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.dtype_name)
        self.autocast = torch.autocast(self.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
        # fp16's narrow range needs the loss scaled up for the backward pass (and the gradients back down)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype_name == "fp16" else None
        self.best_val, self.best_step = float("inf"), None
        self.tokens_seen = 0
        self._stop_requested = False
        self._explained = set()  # resume checks the caller has already told the user about
        self.is_main = self.rank == 0
        if config.fsdp and self.world > 1 and self.device.type == "cpu" and _torch_older_than(2, 7):
            raise ValueError(f"fsdp on CPU processes needs torch >= 2.7 (torch {torch.__version__}'s FSDP needs "
                             "CUDA streams); run it on GPUs, upgrade torch, or drop --fsdp to train with DDP")

    # ---- setup ---------------------------------------------------------------------------------

    def _setup(self, resume_from):
        cfg, model = self.cfg, self.model
        model.to(self.device)
        model.gradient_checkpointing = cfg.grad_checkpoint
        model.train()
        self.start_step = 0
        self.tokens_seen = 0
        self.best_val, self.best_step = float("inf"), None
        state = None
        if resume_from is not None:
            state = self._load_weights(resume_from)
            self.resumed_from = resume_from
        self.wrapped = model
        if self.world > 1:
            if cfg.fsdp:
                from torch.distributed.fsdp import fully_shard

                for block in model.trf_blocks:
                    fully_shard(block)
                fully_shard(model)
            else:
                from torch.nn.parallel import DistributedDataParallel as DDP

                self.wrapped = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
        min_ratio = (cfg.min_lr if cfg.min_lr is not None else cfg.lr / 10) / cfg.lr
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, WarmupCosine(cfg.warmup, cfg.steps, min_ratio))
        if state is not None:
            self._load_state(state)
            if self.is_main:
                best = (f", best validation loss {self.best_val:.4f} at step {self.best_step}"
                        if self.best_step is not None else "")
                print(f"resuming from step {self.start_step} ({resume_from}, {self.tokens_seen:,} tokens seen{best})",
                      flush=True)
        self.step_fn = torch.compile(self.wrapped) if cfg.compile else self.wrapped
        n = matmul_parameters(model)
        self.flops_per_token = flops_per_token(model.cfg, n)
        self.peak = _peak_tflops(self.device, self.dtype_name)

    def _load_weights(self, folder):
        saved = checkpoint.read_config(folder)
        ours = self.model.cfg
        diff = [f"{k} (checkpoint {v!r}, this run {getattr(ours, k)!r})" for k, v in saved.to_dict().items()
                if k != "drop_rate" and getattr(ours, k) != v]
        if diff:
            raise TrainingError(f"{folder} was written for another model config; it differs in " + ", ".join(diff)
                                + ". Resume with the same --model / size flags, or train into a new --out folder")
        state = load_trainer_state(folder)
        checkpoint.check_weights_file(folder)
        tensors = checkpoint.load_safetensors(os.path.join(folder, checkpoint.MODEL_FILE), device=self.device)
        checkpoint.load_state_dict_checked(self.model, tensors, source=folder)
        self.start_step = int(state["step"])
        return state

    def _load_state(self, state):
        if self.cfg.fsdp and _dist() is not None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
        else:
            self.optimizer.load_state_dict(_optimizer_state_by_index(self.model, self.optimizer, state["optimizer"]))
        self.scheduler.load_state_dict(state["scheduler"])
        # This run's config is the schedule from here on: a resume with other --steps stretches (or
        # shortens) the cosine, another --lr, --min-lr or --warmup takes effect (with the same values,
        # everything is as saved, so the run continues exactly).
        cfg, schedule = self.cfg, self.scheduler.lr_lambdas[0]
        schedule.total, schedule.warmup = int(cfg.steps), int(cfg.warmup)
        schedule.min_ratio = (cfg.min_lr if cfg.min_lr is not None else cfg.lr / 10) / cfg.lr
        self.scheduler.base_lrs = [cfg.lr for _ in self.optimizer.param_groups]
        self.optimizer.param_groups[0]["weight_decay"] = cfg.weight_decay  # the decayed group (make_optimizer)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["initial_lr"] = base
            group["lr"] = base * schedule(self.scheduler.last_epoch)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        best = state.get("best") or {}
        if best.get("val_loss") is not None:
            self.best_val, self.best_step = float(best["val_loss"]), best.get("step")
        saved_data = state.get("data", {})
        tokens_per_step = (saved_data.get("batch_size", self.cfg.batch_size) * saved_data.get("grad_accum", 1)
                           * saved_data.get("world_size", 1) * self.seq_len)
        self.tokens_seen = int(state.get("tokens_seen", self.start_step * tokens_per_step))
        rng = state.get("rng", {})
        cpu = rng.get("cpu", [])
        if len(cpu) == self.world:
            torch.set_rng_state(cpu[self.rank])
        cuda = rng.get("cuda", [])
        if self.device.type == "cuda" and len(cuda) == self.world:
            torch.cuda.set_rng_state(cuda[self.rank], self.device)
        saved, ours = state.get("data", {}), self._data_state()
        for what, key in (("seed", lambda d: d.get("seed")), ("grad_accum", lambda d: d.get("grad_accum")),
                          ("global batch (batch_size x processes)",
                           lambda d: d.get("batch_size", 0) * d.get("world_size", 1))):
            explained = {"seed": {"seed"}, "grad_accum": {"grad_accum"}}.get(what, {"batch_size"})
            if key(saved) is not None and key(saved) != key(ours) and self.is_main and \
                    not (explained & self._explained and saved.get("world_size", 1) == self.world):
                print(f"warning: the checkpoint was trained with {what} {key(saved)}, this run uses {key(ours)}; "
                      f"it goes on, but does not read the batches the first run would have", file=sys.stderr)
        if "data_sha256" in saved and saved["data_sha256"] != ours.get("data_sha256") and self.is_main:
            print(f"warning: the training data changed since this run started ({_data_changes(saved, ours)}); "
                  f"it goes on with the data as it is now, so it will not match an uninterrupted run",
                  file=sys.stderr)

    def _data_state(self):
        return {"seed": self.cfg.seed, "batch_size": self.cfg.batch_size, "grad_accum": self.cfg.grad_accum,
                "world_size": self.world, **self.data_info}

    # ---- the loop ------------------------------------------------------------------------------

    def fit(self, resume_from: str | None = None, until: int | None = None) -> list[dict]:
        """Train up to ``config.steps`` optimizer steps (from ``resume_from``'s step when given).

        ``until`` stops earlier, after that step (with a checkpoint), as an interrupted run would; the
        schedule still spans ``config.steps``. Returns the metrics of every logged step (what ``metrics.jsonl`` holds). Raises
        :class:`TrainingError` when the loss stops being finite; checkpoints already written stay.
        """
        cfg = self.cfg
        self._setup(resume_from)
        if self.is_main:
            os.makedirs(cfg.out_dir, exist_ok=True)
            self._truncate_metrics(self.start_step)
        save_every = cfg.save_every or cfg.eval_every
        tokens_per_step = cfg.batch_size * cfg.grad_accum * self.seq_len * self.world
        writers = self._open_writers() if self.is_main else []
        bar = self._progress_bar()
        step = self.start_step
        last = cfg.steps if until is None else min(until, cfg.steps)
        post = {}
        saved_step = self.start_step if resume_from is not None else None
        self._stop_requested = False
        restore_sigint = self._catch_sigint()
        try:
            while step < last:
                t0 = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]
                loss = self._train_step(step)
                step += 1
                self.tokens_seen += tokens_per_step
                elapsed = time.perf_counter() - t0
                record = {"step": step, "train_loss": loss, "lr": lr, "tokens_per_s": tokens_per_step / elapsed}
                mfu = self._mfu(tokens_per_step / elapsed)
                if mfu is not None:
                    record["mfu"] = mfu
                evaluating = step % cfg.eval_every == 0 or step == cfg.steps
                if evaluating:
                    record["val_loss"] = self.evaluate()
                    record["val_ppl"] = perplexity(record["val_loss"])
                if self.is_main and (evaluating or step % cfg.log_every == 0):
                    self._log(record)
                    for w in writers:
                        w.write(record)
                if bar is not None:
                    bar.update(1)
                    post.update({"loss": f"{loss:.3f}", "tok/s": f"{record['tokens_per_s']:.0f}"})
                    if evaluating:
                        post.update({"val": f"{record['val_loss']:.3f}", "ppl": f"{record['val_ppl']:.1f}"})
                    if mfu is not None:
                        post["mfu"] = f"{100 * mfu:.1f}%"
                    bar.set_postfix(post, refresh=False)
                if evaluating and self.is_main:
                    self._print(bar, self._eval_line(record))
                    self._plot()
                    self._sample(bar)
                if evaluating and cfg.save_best and record["val_loss"] < self.best_val:
                    self.best_val, self.best_step = record["val_loss"], step
                    self.save_best(step, record["val_loss"])
                stopping = self._stop_requested  # the same on every process (see _train_step)
                if step % save_every == 0 or step == last or stopping:
                    self.save_checkpoint(step)
                    saved_step = step
                if stopping:
                    break
        except KeyboardInterrupt:
            # a second Ctrl-C, or one before the first step: stop now; the last checkpoint stays
            raise TrainingInterrupted(saved_step, self._checkpoint_path(saved_step)) from None
        finally:
            restore_sigint()
            if bar is not None:
                bar.close()
            for w in writers:
                w.close()
        if self._stop_requested:
            raise TrainingInterrupted(step, self._checkpoint_path(step))
        return self.history

    def _checkpoint_path(self, step):
        return None if step is None else os.path.join(self.cfg.out_dir, f"step-{step}")

    def _catch_sigint(self):
        """Make the first Ctrl-C finish the step under way and save it (``_stop_requested``); a second one
        raises ``KeyboardInterrupt`` at once. Returns what puts the previous handler back."""
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = signal.getsignal(signal.SIGINT)
        if previous is not signal.default_int_handler:
            return lambda: None  # someone else handles Ctrl-C (or ignores it): leave it to them

        def handler(signum, frame):
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            if self.is_main:
                print(("\n" if self.cfg.progress else "") + "stopping after this step to save a checkpoint (Ctrl-C again to stop at once, without "
                      "saving)", file=sys.stderr, flush=True)

        signal.signal(signal.SIGINT, handler)
        return lambda: signal.signal(signal.SIGINT, previous)

    def _eval_line(self, record):
        mfu = f", MFU {100 * record['mfu']:.1f}%" if "mfu" in record else ""
        return (f"step {record['step']}/{self.cfg.steps}: training loss {record['train_loss']:.4f}, validation loss "
                f"{record['val_loss']:.4f}, perplexity {record['val_ppl']:.2f}, lr {record['lr']:.2e}, "
                f"{record['tokens_per_s']:,.0f} tokens/s{mfu}")

    @staticmethod
    def _print(bar, line):
        if bar is not None:
            bar.write(line)
        else:
            print(line, flush=True)

    def _open_writers(self):
        writers = []
        try:
            for name in self.cfg.log:
                if name == "csv":
                    writers.append(_CsvLog(self.cfg.out_dir, self.history))
                elif name == "tensorboard":
                    writers.append(_TensorBoardLog(self.cfg.out_dir, self.start_step))
                elif name == "wandb":
                    writers.append(_WandbLog(self.cfg.out_dir, self.cfg.run_settings))
        except BaseException:
            for w in writers:
                w.close()
            raise
        return writers

    def _train_step(self, step) -> float:
        cfg = self.cfg
        total = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            x, y = self.train_split.random_batch(cfg.batch_size, self.seq_len, key=(cfg.seed, step, micro),
                                                 rank=self.rank, world_size=self.world)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            last = micro == cfg.grad_accum - 1
            sync = self.wrapped.no_sync() if (not last and hasattr(self.wrapped, "no_sync")) else contextlib.nullcontext()
            with sync:
                with self.autocast:
                    # the book's mean cross-entropy, with the head fused into the loss: no (B, T, V) logits
                    loss = self.step_fn(x, targets=y) / cfg.grad_accum
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total += loss.detach()
        d = _dist()
        if d is not None:
            # one reduction carries the loss and whether any process was asked to stop (Ctrl-C), so all
            # processes finish the same step and save it together
            both = torch.stack([total.float(), torch.tensor(float(self._stop_requested), device=self.device)])
            d.all_reduce(both, op=d.ReduceOp.SUM)
            total = both[0] / self.world
            self._stop_requested = bool(both[1].item() > 0)
        value = total.item()
        if not math.isfinite(value):
            kept = latest_checkpoint(cfg.out_dir)
            raise TrainingError(
                f"the training loss became {value} at step {step + 1}; stopping without saving. "
                + (f"The last good checkpoint, {kept}, is kept; " if kept else "")
                + "try a lower --lr, a longer --warmup, --clip 1.0, or --dtype fp32"
            )
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped when a gradient is inf or NaN
            self.scaler.update()  # and then the scale is halved; it doubles after 2000 clean steps
        else:
            self.optimizer.step()
        if self.scaler is not None:
            import warnings

            with warnings.catch_warnings():  # a step the scaler skipped still counts in the schedule
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
                self.scheduler.step()
        else:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over ``eval_iters`` fixed global batches, each process taking its slice."""
        cfg = self.cfg
        self.model.eval()
        total = torch.zeros((), device=self.device)
        batches = self.val_split.eval_batches(cfg.batch_size * self.world, self.seq_len, cfg.eval_iters)
        for x, y in batches:
            rows = slice(self.rank * cfg.batch_size, (self.rank + 1) * cfg.batch_size)
            with self.autocast:
                total += self.step_fn(x[rows].to(self.device), targets=y[rows].to(self.device))
        d = _dist()
        if d is not None:
            d.all_reduce(total, op=d.ReduceOp.SUM)
        self.model.train()
        return (total / (cfg.eval_iters * self.world)).item()

    def _mfu(self, tokens_per_s):
        if self.peak is None:
            return None
        return self.flops_per_token * tokens_per_s / self.world / (self.peak * 1e12)

    # ---- output --------------------------------------------------------------------------------

    def _progress_bar(self):
        if not (self.cfg.progress and self.is_main):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.cfg.steps, initial=self.start_step, desc="train", unit="step", dynamic_ncols=True)

    def _metrics_path(self):
        return os.path.join(self.cfg.out_dir, METRICS_FILE)

    def _truncate_metrics(self, step):
        """Keep only the metrics up to ``step`` (a resumed run rewrites what came after its checkpoint)."""
        path = self._metrics_path()
        self.history = []
        if not os.path.isfile(path):
            return
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    rec = json.loads(line)
                    if rec.get("step", 0) <= step:
                        self.history.append(rec)
        checkpoint.atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in self.history).encode())

    def _log(self, record):
        self.history.append(record)
        with open(self._metrics_path(), "a") as f:
            f.write(json.dumps(record) + "\n")

    def _plot(self):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["step"] for r in self.history], [r["train_loss"] for r in self.history], lw=0.8,
                label="training loss")
        val = [r for r in self.history if "val_loss" in r]
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(loc="upper right")
        fig.tight_layout()
        with checkpoint.atomic_open(os.path.join(self.cfg.out_dir, PLOT_FILE), "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        plt.close(fig)

    def _sample(self, bar):
        if self.tokenizer is None or self.cfg.sample_tokens <= 0 or self.cfg.fsdp:
            return
        idx = text_to_token_ids(self.cfg.sample_prompt, self.tokenizer).to(self.device)
        idx = idx[:, -self.seq_len:]
        if idx.numel() == 0 or int(idx.max()) >= self.model.cfg.vocab_size:
            return  # the prompt does not fit this model's vocabulary
        self.model.eval()
        with self.autocast:
            out = generate(self.model, idx, self.cfg.sample_tokens)
        self.model.train()
        text = token_ids_to_text(out, self.tokenizer).replace("\n", " ")
        (bar.write if bar is not None else print)(f"sample: {text}")

    # ---- checkpoints ---------------------------------------------------------------------------

    def _gather_states(self):
        """The full model state dict, optimizer state dict and every rank's RNG states (rank 0 gets them)."""
        d = _dist()
        if self.cfg.fsdp and d is not None:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                 get_optimizer_state_dict)

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_state = get_model_state_dict(self.model, options=opts)
            optim_state = get_optimizer_state_dict(self.model, self.optimizer, options=opts)
        else:
            model_state = self.model.state_dict()
            optim_state = _optimizer_state_by_name(self.model, self.optimizer, self.optimizer.state_dict())
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        if d is not None:
            gathered = [None] * self.world
            d.all_gather_object(gathered, rng)
        else:
            gathered = [rng]
        rngs = {"cpu": [g["cpu"] for g in gathered]}
        if self.device.type == "cuda":
            rngs["cuda"] = [g["cuda"] for g in gathered]
        return model_state, optim_state, rngs

    def _config_record(self):
        record = dataclasses.asdict(self.cfg)
        record["log"] = list(record["log"])
        record.pop("run_settings", None)  # settings.json holds them, and they need not be tensors or numbers
        return record

    def save_best(self, step: int, val_loss: float) -> str | None:
        """Write the weights as ``out_dir/best`` (atomically, replacing the previous best) with
        ``best.json``: ``{"step", "val_loss"}``. Every process calls it; rank 0 writes."""
        model_state, _, _ = self._gather_states()
        if not self.is_main:
            barrier()
            return None
        final = os.path.join(self.cfg.out_dir, BEST_DIR)
        tmp = os.path.join(self.cfg.out_dir, f".{BEST_DIR}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        extra = {"tokenizer": self.data_info["tokenizer"]} if "tokenizer" in self.data_info else None
        checkpoint.save_model(self.model, tmp, extra_config=extra, state_dict=model_state)
        checkpoint.atomic_write_json(os.path.join(tmp, BEST_FILE), {"step": step, "val_loss": val_loss})
        checkpoint.publish_dir(tmp, final)
        barrier()
        return final

    def save_checkpoint(self, step: int) -> str | None:
        """Write ``out_dir/step-N`` atomically and prune old ones; returns its path on rank 0."""
        model_state, optim_state, rngs = self._gather_states()
        if not self.is_main:
            barrier()
            return None
        out = self.cfg.out_dir
        final = os.path.join(out, f"step-{step}")
        tmp = os.path.join(out, f".step-{step}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        extra = {"tokenizer": self.data_info["tokenizer"]} if "tokenizer" in self.data_info else None
        checkpoint.save_model(self.model, tmp, extra_config=extra, state_dict=model_state)
        state = {
            "step": step,
            "optimizer": optim_state,
            "scheduler": self.scheduler.state_dict(),
            "rng": rngs,
            "data": self._data_state(),
            "config": self._config_record(),
            "tokens_seen": int(self.tokens_seen),
            "best": {"val_loss": None if self.best_step is None else float(self.best_val), "step": self.best_step},
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        _torch_save_atomic(state, os.path.join(tmp, STATE_FILE))
        checkpoint.publish_dir(tmp, final)  # the same step written again (a resumed run) is swapped in whole
        # Only steps up to this one count: a newer step folder (one a resume skipped as unreadable) is
        # left alone until this run writes that step again.
        for _, path in [d for d in step_dirs(out) if d[0] <= step][: -self.cfg.keep_last]:
            shutil.rmtree(path)
        barrier()
        return final
