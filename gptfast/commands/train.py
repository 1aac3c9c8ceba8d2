"""``gptfast train DATA... --out DIR``: pretrain a GPT on text files or token shards.

One process: ``gptfast train data.txt --out runs/a``. Several GPUs (or CPU processes, over gloo):
``torchrun --nproc_per_node=N -m gptfast train data/ --out runs/a``. See docs/training.md.
"""

from __future__ import annotations

import os
import sys

HELP = "pretrain a GPT on text files or token shards (one device, or many under torchrun); resumable"

_SIZE_FLAGS = ("emb_dim", "n_layers", "n_heads", "context_length", "drop_rate")


def add_arguments(p):
    p.add_argument("data", nargs="+", metavar="DATA",
                   help="plain text files (one document each), or shard folders written by `gptfast tokenize`")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder: checkpoints, metrics.jsonl, loss.png")
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
    o.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 autocast on a GPU that supports it, fp32 otherwise")
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
    e.add_argument("--sample-prompt", default="Every effort moves you")
    e.add_argument("--sample-tokens", type=int, default=30, help="tokens sampled at each evaluation, 0 for none")
    e.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    e.add_argument("--device", default=None, help="default: the GPU (this process's under torchrun), else cpu")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")


def _model_config(args, saved_cfg, n_vocab):
    from gptfast.config import GPTConfig

    overrides = {k: getattr(args, k) for k in _SIZE_FLAGS if getattr(args, k) is not None}
    if saved_cfg is not None and args.model is None and not overrides:
        return saved_cfg  # resuming without size flags: the checkpoint's own config
    cfg = GPTConfig.from_name(args.model or "gpt2", vocab_size=n_vocab, **overrides)
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
            progress=not args.no_progress,
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
        os.rmdir(folder)
    except OSError:
        pass  # not empty (or already gone): what is there was completed and stays


def run(args):
    import torch

    from gptfast import checkpoint
    from gptfast.cli import CommandError
    from gptfast.data import DataError, data_fingerprint, data_sources, open_token_data, split_tokens, \
        tokenizer_by_name
    from gptfast.devices import check_backend, resolve_device
    from gptfast.model import GPTModel
    from gptfast.train import (Trainer, TrainingError, barrier, init_distributed, latest_checkpoint,
                               resumable_checkpoint)

    rank, world, local = init_distributed()
    out = args.out
    created = not os.path.exists(out)
    try:
        # Everything the flags alone decide comes first: a bad flag reads and writes nothing.
        device = resolve_device(args.device, local_rank=local)
        check_backend(args.backend, device)
        config = _train_config(args)
        _check_model_flags(args)
        if os.path.exists(out) and not os.path.isdir(out):
            raise CommandError(f"--out {out} is a file: pass a folder for the run (new, or a run to --resume)")
        latest = latest_checkpoint(out)
        if args.resume:
            latest, skipped = resumable_checkpoint(out)
            if latest is None:
                if skipped:
                    raise CommandError(f"--resume: no checkpoint in {out} loads: "
                                       + "; ".join(why for _, why in skipped))
                raise CommandError(f"--resume: {out} holds no checkpoint (step-N folder) to resume from")
            if rank == 0:
                for folder, why in skipped:
                    print(f"warning: --resume skipped {folder}: {why}; resuming from {latest} instead (the "
                          f"skipped folder stays until this run saves that step again)", file=sys.stderr, flush=True)
        elif latest is not None:
            raise CommandError(f"{out} already holds checkpoints (latest {os.path.basename(latest)}); "
                               f"pass --resume to continue that run, or choose another --out")
        try:
            saved_cfg = checkpoint.read_config(latest) if args.resume else None
            cache = os.path.join(out, "data")
            if rank == 0:
                datasets = open_token_data(args.data, cache)
            barrier()
            if rank != 0:
                datasets = open_token_data(args.data, cache)
            train_split, val_split = split_tokens(datasets, args.val_fraction)
            name = datasets[0].tokenizer_name
            try:
                tokenizer = tokenizer_by_name(name)
            except DataError as e:
                tokenizer = None  # training needs only the ids; samples need the tokenizer
                if rank == 0:
                    print(f"warning: {e}; no text samples during training", flush=True)
            cfg = _model_config(args, saved_cfg, datasets[0].n_vocab)
            if cfg.vocab_size < datasets[0].n_vocab:
                raise DataError(f"the data's vocabulary has {datasets[0].n_vocab} ids but the model's vocab_size is "
                                f"{cfg.vocab_size}")
            torch.manual_seed(args.seed)  # the same initial weights on every process
            model = GPTModel(cfg, backend=args.backend)
            torch.manual_seed(args.seed + rank)  # each process its own dropout
            # what the data was made from, so that a resume can say when an input changed
            data_info = {"tokenizer": name, "data_sha256": data_fingerprint(datasets),
                         "sources": data_sources(datasets)}
            trainer = Trainer(model, train_split, val_split, config, tokenizer=tokenizer, device=device,
                              data_info=data_info)
            if rank == 0:
                print(f"model: {cfg.n_layers} layers, {cfg.n_heads} heads, emb_dim {cfg.emb_dim}, context "
                      f"{cfg.context_length}, {model.num_parameters() / 1e6:.1f}M parameters; "
                      f"data: {train_split.num_tokens} training / {val_split.num_tokens} validation tokens; "
                      f"{world} process(es) on {device}, {trainer.dtype_name}", flush=True)
            history = trainer.fit(resume_from=latest if args.resume else None)
        except (DataError, TrainingError, ValueError, FileNotFoundError) as e:
            raise CommandError(str(e)) from None
        if rank == 0 and history:
            last = history[-1]
            val = f", validation loss {last['val_loss']:.4f}" if "val_loss" in last else ""
            print(f"step {last['step']}: training loss {last['train_loss']:.4f}{val}; "
                  f"checkpoint {latest_checkpoint(out)}")
        return 0
    except BaseException:
        if created and rank == 0:
            _remove_if_empty(out)
        raise
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
