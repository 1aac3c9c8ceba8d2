"""``gptfast train DATA... --out DIR``: pretrain a GPT on text files or token shards.

One process: ``gptfast train data.txt --out runs/a``. Several GPUs (or CPU processes, over gloo):
``torchrun --nproc_per_node=N -m gptfast train data/ --out runs/a``. See docs/training.md.
"""

from __future__ import annotations

import os
import sys

HELP = "pretrain a GPT on text files or token shards (one device, or many under torchrun); resumable"

_SIZE_FLAGS = ("emb_dim", "n_layers", "n_heads", "context_length", "drop_rate")


def _log_list(text: str) -> list:
    """``--log csv,tensorboard``, each name checked, as a normalized comma list (``"csv,tensorboard"``)."""
    import argparse

    from gptfast.train import LOGGERS

    names = [n.strip() for n in str(text).split(",") if n.strip()]
    for n in names:
        if n not in LOGGERS:
            raise argparse.ArgumentTypeError(f"{n!r} is not a metrics writer: use {', '.join(LOGGERS)} "
                                             f"(comma-separated)")
    return ",".join(dict.fromkeys(names))


def add_arguments(p):
    from gptfast import settings

    p.add_argument("data", nargs="*", metavar="DATA",
                   help="text files (one document each), JSONL files ({\"text\": ...} per line, one document "
                        "each), folders or globs of them, or shard folders written by `gptfast tokenize`")
    p.add_argument("--out", metavar="DIR", help="run folder: checkpoints, metrics.jsonl, loss.png (required)")
    settings.add_config_flag(p)
    m = p.add_argument_group("model")
    m.add_argument("--model", metavar="NAME", help="a GPT-2 size: gpt2, gpt2-medium, gpt2-large, gpt2-xl (default gpt2)")
    m.add_argument("--emb-dim", type=int)
    m.add_argument("--n-layers", type=int)
    m.add_argument("--n-heads", type=int)
    m.add_argument("--context-length", type=int)
    m.add_argument("--drop-rate", type=float)
    m.add_argument("--backend", default=None, help="ops backend: auto, reference, triton, or op=name,... (default auto)")
    o = p.add_argument_group("optimization")
    o.add_argument("--batch-size", type=int, default=8, help="windows per micro-batch per process (default 8)")
    o.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    o.add_argument("--steps", type=int, default=1000, help="optimizer steps in all (default 1000)")
    o.add_argument("--lr", type=float, default=6e-4, help="peak learning rate (default 6e-4)")
    o.add_argument("--min-lr", type=float, default=None, help="end of the cosine decay (default lr/10)")
    o.add_argument("--warmup", type=int, default=100, help="linear warmup steps (default 100)")
    o.add_argument("--weight-decay", type=float, default=0.1)
    o.add_argument("--clip", type=float, default=1.0, help="max gradient norm, 0 for none (default 1.0)")
    o.add_argument("--seed", type=int, default=1337)
    o.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="auto: bf16 autocast on a GPU that supports it, fp32 otherwise; fp16: fp16 autocast with "
                        "a gradient scaler")
    o.add_argument("--compile", action="store_true", help="torch.compile the model")
    o.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute each block in the backward pass (less memory, ~30%% more compute)")
    o.add_argument("--fsdp", action="store_true", help="under torchrun: shard the model over the processes (FSDP)")
    e = p.add_argument_group("evaluation and checkpoints")
    e.add_argument("--val-fraction", type=float, default=0.1, help="last fraction of the tokens held out (default 0.1)")
    e.add_argument("--eval-every", type=int, default=100, help="evaluate, plot and sample every N steps (default 100)")
    e.add_argument("--eval-iters", type=int, default=20, help="validation batches per evaluation (default 20)")
    e.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (default: --eval-every)")
    e.add_argument("--keep-last", type=int, default=3, help="checkpoints kept (default 3)")
    e.add_argument("--save-best", action="store_true",
                   help="also keep the weights of the lowest validation loss as DIR/best")
    e.add_argument("--sample-prompt", default="Every effort moves you")
    e.add_argument("--sample-tokens", type=int, default=30, help="tokens sampled at each evaluation, 0 for none")
    e.add_argument("--log", type=_log_list, default="", metavar="LIST",
                   help="more metric writers besides metrics.jsonl, comma-separated: csv (DIR/metrics.csv), "
                        "tensorboard (DIR/tensorboard), wandb")
    e.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint, with the settings it was started "
                        "with (flags given now override them)")
    e.add_argument("--device", default="auto",
                   help="auto (default): cuda (this process's GPU under torchrun), else mps, else cpu; or cpu, "
                        "cuda, cuda:N, mps")
    e.add_argument("--no-progress", action="store_true",
                   help="no progress bar (a line per evaluation still)")
    settings.use_sentinels(p)


# Settings a resumed run takes from this machine and invocation, not from the run's settings.json.
NOT_RESTORED = ("device", "no_progress")
# TrainConfig fields that are flags of the same name: what a run made before settings.json recorded
_STATE_CONFIG_FLAGS = ("steps", "batch_size", "grad_accum", "lr", "min_lr", "warmup", "weight_decay", "clip", "seed",
                       "eval_every", "eval_iters", "save_every", "keep_last", "dtype", "compile", "grad_checkpoint",
                       "fsdp", "sample_prompt", "sample_tokens")


def _model_config(args, saved_cfg, n_vocab, chosen=None):
    """The model config: the checkpoint's when resuming (``chosen``: the size flags given this time,
    which must agree with it), else the preset with the size flags."""
    from gptfast.config import GPTConfig

    chosen = set(chosen) if chosen is not None else {"model", *_SIZE_FLAGS}
    model = args.model if "model" in chosen else None
    overrides = {k: getattr(args, k) for k in _SIZE_FLAGS if k in chosen and getattr(args, k) is not None}
    if saved_cfg is not None and model is None and not overrides:
        return saved_cfg  # resuming without size flags: the checkpoint's own config
    cfg = GPTConfig.from_name(model or "gpt2", vocab_size=n_vocab, **overrides)
    if saved_cfg is not None:
        saved = saved_cfg.to_dict()
        diff = [f"{k}: checkpoint {v!r}, flags {getattr(cfg, k)!r}" for k, v in saved.items()
                if k != "drop_rate" and getattr(cfg, k) != v]
        if diff:
            raise ValueError("the checkpoint in --out was written for another model config (" + "; ".join(diff)
                             + "); drop the size flags to resume it, or train into a new --out folder")
    return cfg


def _train_config(args):
    """The run's TrainConfig, every flag checked (nothing read or written yet)."""
    from gptfast.cli import CommandError, as_flag_error
    from gptfast.train import TrainConfig

    try:
        config = TrainConfig(
            out_dir=args.out, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
            min_lr=args.min_lr, warmup=args.warmup, weight_decay=args.weight_decay, clip=args.clip,
            seed=args.seed, eval_every=args.eval_every, eval_iters=args.eval_iters, save_every=args.save_every,
            keep_last=args.keep_last, dtype=args.dtype, compile=args.compile, grad_checkpoint=args.grad_checkpoint,
            fsdp=args.fsdp, sample_prompt=args.sample_prompt, sample_tokens=args.sample_tokens,
            progress=not args.no_progress, save_best=args.save_best,
            log=tuple(n for n in (args.log or "").split(",") if n),
        )
    except ValueError as e:
        raise as_flag_error(e, TrainConfig.__dataclass_fields__) from None
    if not 0.0 <= args.val_fraction < 1.0:
        raise CommandError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    return config


def _check_model_flags(args):
    """The --model name and size flags make a valid config (the vocabulary is the data's, later)."""
    from gptfast.cli import CommandError
    from gptfast.config import GPTConfig

    overrides = {k: getattr(args, k) for k in _SIZE_FLAGS if getattr(args, k) is not None}
    try:
        GPTConfig.from_name(args.model or "gpt2", **overrides)
    except ValueError as e:
        text = str(e)
        if text.startswith("unknown model name"):
            raise CommandError(f"--model: {text}") from None
        if not text.startswith("GPTConfig."):
            raise CommandError(text) from None
        # "GPTConfig.emb_dim (30) must be divisible by n_heads (4)" -> "--emb-dim (30) must be ..."
        name = text.split(" ", 1)[0].removeprefix("GPTConfig.")
        raise CommandError(f"--{name.replace('_', '-')}{text[len('GPTConfig.') + len(name):]}") from None


def _remove_if_empty(folder):
    """Take back a folder this command created, when the failed run left nothing in it."""
    try:
        if os.listdir(folder) == ["settings.json"]:  # written as the run started: no run without its steps
            os.remove(os.path.join(folder, "settings.json"))
        os.rmdir(folder)
    except OSError:
        pass  # not empty (or already gone): what is there was completed and stays


def _resolve_settings(args, rank):
    """The effective settings (flags over --config over a resumed run's settings.json), and the
    checkpoint to resume from (None for a new run)."""
    from gptfast import settings
    from gptfast.cli import CommandError
    from gptfast.train import load_trainer_state, resumable_checkpoint

    try:
        first = settings.resolve(args)
    except settings.SettingsError as e:
        raise CommandError(str(e)) from None
    out = first["out"]
    if not out:
        raise CommandError("no run folder given: pass --out DIR (or out = \"DIR\" in the --config file)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise CommandError(f"--out {out} is a file: pass a folder for the run (new, or a run to --resume)")
    if not args.resume:
        return first, None
    latest, skipped = resumable_checkpoint(out)
    if latest is None:
        if skipped:
            raise CommandError(f"--resume: no checkpoint in {out} loads: " + "; ".join(why for _, why in skipped))
        raise CommandError(f"--resume: {out} holds no checkpoint (step-N folder) to resume from")
    if rank == 0:
        for folder, why in skipped:
            print(f"warning: --resume skipped {folder}: {why}; resuming from {latest} instead (the "
                  f"skipped folder stays until this run saves that step again)", file=sys.stderr, flush=True)
    try:
        saved = settings.read_saved(out)
        if saved is None:
            # a run made before settings.json: its trainer state records the optimization settings
            recorded = load_trainer_state(latest, mmap=True).get("config", {})
            saved = {k: recorded[k] for k in _STATE_CONFIG_FLAGS if k in recorded}
        # --out is how the run was found (it may have been moved since): never an override
        s = settings.resolve(args, saved=saved, restore_exclude=(*NOT_RESTORED, "out"))
    except settings.SettingsError as e:
        raise CommandError(str(e)) from None
    # the same files named another way (relative, absolute) are no override
    s.overrides = [o for o in s.overrides if not (o[0] == "data" and _same_paths(o[1], o[2]))]
    return s, latest


def _same_paths(a, b):
    try:
        return [os.path.abspath(p) for p in a] == [os.path.abspath(p) for p in b]
    except TypeError:
        return False


def resume_command(out, world, s=None):
    """What to type to continue the run in ``out``: its settings.json holds everything else but the
    settings of this machine (``--device``, ``--no-progress``), repeated when they were given."""
    import shlex

    extra = []
    if s is not None and "device" in s.given:
        extra += ["--device", str(s["device"])]
    if s is not None and s.get("no_progress"):
        extra.append("--no-progress")

    if world > 1:
        head = ["torchrun", f"--nproc_per_node={world}", "-m", "gptfast"]
    elif os.path.basename(sys.argv[0] or "") in ("gptfast", "gptfast.exe"):
        head = ["gptfast"]
    else:
        head = ["python", "-m", "gptfast"]
    return shlex.join([*head, "train", "--out", out, "--resume", *extra])


def run(args):
    import torch

    from gptfast import checkpoint, settings
    from gptfast.cli import CommandError
    from gptfast.data import DataError, data_fingerprint, data_sources, open_token_data, split_tokens, \
        tokenizer_by_name
    from gptfast.devices import check_backend, resolve_device
    from gptfast.model import GPTModel
    from gptfast.train import (Trainer, TrainingError, TrainingInterrupted, barrier, check_loggers,
                               init_distributed, latest_checkpoint)

    rank, world, local = init_distributed()
    out = None  # a folder this command created, taken back if the run fails before writing into it
    try:
        # Everything the flags alone decide comes first: a bad flag reads and writes nothing.
        s, latest = _resolve_settings(args, rank)
        out = s["out"]
        created = not os.path.exists(out)
        a = s.as_namespace(args)
        device = resolve_device(a.device, local_rank=local)
        check_backend(a.backend, device)
        config = _train_config(a)
        _check_model_flags(a)
        try:
            check_loggers(config.log)
        except ValueError as e:
            raise CommandError(f"--{e}") from None
        if not a.data:
            raise CommandError("no training data given: pass text files, JSONL files, folders or shard folders as "
                               "DATA (or data = [...] in the --config file)")
        if latest is None and latest_checkpoint(out) is not None:
            raise CommandError(f"{out} already holds checkpoints (latest {os.path.basename(latest_checkpoint(out))}); "
                               f"pass --resume to continue that run, or choose another --out")
        if latest is not None:
            at = int(os.path.basename(latest).split("-", 1)[1])
            if config.steps <= at:
                if "steps" in s.given or "steps" in s.from_file:
                    raise CommandError(f"--steps {config.steps} is not past this run's step {at}: pass a larger "
                                       f"--steps to train on (or leave --resume out to train a new run elsewhere)")
                raise CommandError(f"{out} has already trained its {config.steps} steps ({latest}): pass a larger "
                                   f"--steps with --resume to train on")
            if rank == 0:
                for line in settings.describe_overrides(s):
                    print(line, flush=True)
        try:
            saved_cfg = checkpoint.read_config(latest) if latest else None
            cache = os.path.join(out, "data")
            if rank == 0:
                datasets = open_token_data(a.data, cache)
            barrier()
            if rank != 0:
                datasets = open_token_data(a.data, cache)
            train_split, val_split = split_tokens(datasets, a.val_fraction)
            name = datasets[0].tokenizer_name
            try:
                tokenizer = tokenizer_by_name(name)
            except DataError as e:
                tokenizer = None  # training needs only the ids; samples need the tokenizer
                if rank == 0:
                    print(f"warning: {e}; no text samples during training", flush=True)
            chosen = (s.given | s.from_file) if latest else None
            cfg = _model_config(a, saved_cfg, datasets[0].n_vocab, chosen)
            if cfg.vocab_size < datasets[0].n_vocab:
                raise DataError(f"the data's vocabulary has {datasets[0].n_vocab} ids but the model's vocab_size is "
                                f"{cfg.vocab_size}")
            torch.manual_seed(a.seed)  # the same initial weights on every process
            model = GPTModel(cfg, backend=a.backend)
            torch.manual_seed(a.seed + rank)  # each process its own dropout
            # what the data was made from, so that a resume can say when an input changed
            data_info = {"tokenizer": name, "data_sha256": data_fingerprint(datasets),
                         "sources": data_sources(datasets)}
            config.run_settings = s.savable(NOT_RESTORED)
            trainer = Trainer(model, train_split, val_split, config, tokenizer=tokenizer, device=device,
                              data_info=data_info)
            trainer._explained = {o[0].lstrip("-").replace("-", "_") for o in s.overrides}
            if rank == 0:
                os.makedirs(out, exist_ok=True)
                # unset values (None) are left out: the file then works as a --config file too; the data
                # paths are made absolute, so that a resume from another folder finds them
                record = settings.Settings({**s, "data": [os.path.abspath(p) for p in s["data"]]})
                settings.save_settings(out, "train", record,
                                       exclude=(*NOT_RESTORED, *(k for k, v in s.items() if v is None)))
                print(f"model: {cfg.n_layers} layers, {cfg.n_heads} heads, emb_dim {cfg.emb_dim}, context "
                      f"{cfg.context_length}, {model.num_parameters() / 1e6:.1f}M parameters; "
                      f"data: {train_split.num_tokens} training / {val_split.num_tokens} validation tokens; "
                      f"{world} process(es) on {device}, {trainer.dtype_name}", flush=True)
            history = trainer.fit(resume_from=latest)
        except TrainingInterrupted as stop:
            if rank == 0:
                if stop.checkpoint is not None:
                    print(f"gptfast train: saved {os.path.basename(stop.checkpoint)}; resume with: "
                          f"{resume_command(out, world, s)}", file=sys.stderr, flush=True)
                else:
                    print("gptfast train: stopped before the first checkpoint; nothing to resume",
                          file=sys.stderr, flush=True)
            raise
        except (DataError, TrainingError, ValueError, FileNotFoundError) as e:
            raise CommandError(str(e)) from None
        if rank == 0 and history:
            last = history[-1]
            val = f", validation loss {last['val_loss']:.4f}" if "val_loss" in last else ""
            best = (f"; best validation loss {trainer.best_val:.4f} at step {trainer.best_step} in "
                    f"{os.path.join(out, 'best')}" if config.save_best and trainer.best_step is not None else "")
            print(f"step {last['step']}: training loss {last['train_loss']:.4f}{val}; "
                  f"checkpoint {latest_checkpoint(out)}{best}")
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            # every process done with its last collective before any tears the group down (gloo
            # aborts a process whose peer closes the group while it is still sending)
            dist.barrier()
        return 0
    except BaseException:
        if out is not None and created and rank == 0:
            _remove_if_empty(out)
        raise
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
