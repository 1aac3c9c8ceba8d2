"""``gptfast finetune classify|instruct``: the book's chapter-6 and chapter-7 fine-tuning (LoRA optional).

    gptfast finetune classify --base gpt2 --data sms.csv --out runs/spam [--lora-rank 16]
    gptfast finetune instruct --base gpt2-medium --data instruction-data.json --out runs/alpaca
    gptfast finetune instruct --config run.toml              # the same flags, from a TOML file
    gptfast finetune instruct --out runs/alpaca --resume     # continue from the newest checkpoint
"""

from __future__ import annotations

HELP = "fine-tune a pretrained GPT-2: text classification (chapter 6) or instruction following (chapter 7)"

# Settings a resumed run does not take back from the run's settings.json: where it is, how it looks,
# and where this invocation stops (a resume without --max-steps trains to the end of --epochs).
RESTORE_EXCLUDE = ("out", "no_progress", "max_steps")
# Settings that decide which examples a step trains on: changing one on resume breaks exactness.
_PATH_SETTINGS = ("base", "data", "val_data", "test_data")
ORDER_FLAGS = ("--data", "--batch-size", "--seed", "--val-data", "--test-data", "--test-fraction", "--max-length",
               "--text-column", "--label-column", "--template")


def _common(p, epochs, data_help):
    p.add_argument("--base", metavar="DIR|NAME",
                   help="pretrained model: a folder (Hugging Face, gptfast, training run, model.pth) or gpt2...gpt2-xl")
    p.add_argument("--data", metavar="FILE", help=data_help)
    p.add_argument("--out", metavar="DIR", help="run folder: step-N/ checkpoints, metrics.jsonl, summary.json")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest checkpoint, exactly (its settings are restored; "
                        "flags given override them)")
    p.add_argument("--epochs", type=int, default=epochs, help=f"passes over the data (default {epochs}, as the book)")
    p.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help="stop after N optimizer steps, even mid-epoch, saving a checkpoint (resume with a larger N)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (default 8)")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (default 5e-5)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default 0.1)")
    p.add_argument("--eval-every", type=int, default=50, help="steps between evaluations (default 50)")
    p.add_argument("--eval-iters", type=int, default=5, help="batches per evaluation (default 5)")
    p.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="also save a checkpoint every N steps (default 0: after each epoch and at --max-steps)")
    p.add_argument("--lora-rank", type=int, default=0, metavar="R",
                   help="train LoRA adapters of rank R instead of the layers themselves (appendix E uses 16)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale alpha (default 16)")
    p.add_argument("--max-length", type=int, default=None, help="longest input in tokens (default: context_length)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="autocast precision: auto (bf16 on a GPU that supports it, else fp32), bf16, "
                        "fp16 (with a gradient scaler) or fp32 (default auto)")
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda, cuda:N or mps (default auto: cuda, then mps, then cpu)")
    p.add_argument("--backend", default=None, help="ops backend: auto, reference or triton")
    p.add_argument("--seed", type=int, default=123, help="random seed (default 123)")
    p.add_argument("--keep-last", type=int, default=1, help="step-N checkpoints to keep, newest first (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_arguments(parser):
    from gptfast import settings
    from gptfast.instruct import DEFAULT_TEMPLATE, TEMPLATES

    sub = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    c = sub.add_parser("classify", help="train a classifier head on a CSV of texts and labels (chapter 6)")
    settings.add_config_flag(c)
    _common(c, epochs=5, data_help="CSV file with a text column and a label column (integers or names)")
    c.add_argument("--text-column", default="Text", help="CSV column with the text (default Text; case-insensitive)")
    c.add_argument("--label-column", default="Label", help="CSV column with the label (default Label)")
    c.add_argument("--num-classes", type=int, default=None, help="number of classes (default: from the labels)")
    c.add_argument("--val-data", default=None, metavar="FILE", help="validation CSV (default: 10%% of --data)")
    c.add_argument("--test-data", default=None, metavar="FILE",
                   help="test CSV, scored at the end (default: --test-fraction of --data, held out from training)")
    c.add_argument("--test-fraction", type=float, default=0.2,
                   help="share of --data held out as the test split without --test-data (default 0.2, the book's "
                        "70/10/20 split; 0: no test split)")
    c.add_argument("--trainable-blocks", type=int, default=1, help="last blocks to train without LoRA (default 1)")
    settings.use_sentinels(c)
    i = sub.add_parser("instruct", help="instruction-tune on {instruction, input, output} entries (chapter 7)")
    settings.add_config_flag(i)
    _common(i, epochs=2, data_help='JSON file with a list of {"instruction", "input", "output"} entries, or a JSONL '
                                   'file with one per line; split in order 85%% train, 10%% test, 5%% validation')
    i.add_argument("--template", choices=sorted(TEMPLATES), default=DEFAULT_TEMPLATE,
                   help=f"prompt template, stored in the run's config.json (default {DEFAULT_TEMPLATE})")
    i.add_argument("--samples", type=int, default=3,
                   help="validation and test entries each to answer into responses.json (default 3)")
    i.add_argument("--max-new-tokens", type=int, default=256, help="longest generated response (default 256)")
    settings.use_sentinels(i)


def _config(s, device):
    """The run's FinetuneConfig; a bad flag is named as the flag."""
    from gptfast.cli import as_flag_error
    from gptfast.finetune import FinetuneConfig

    try:
        return FinetuneConfig(out_dir=s["out"], epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"],
                              weight_decay=s["weight_decay"], eval_every=s["eval_every"], eval_iters=s["eval_iters"],
                              lora_rank=s["lora_rank"], lora_alpha=s["lora_alpha"], seed=s["seed"],
                              device=str(device), progress=not s["no_progress"], keep_last=s["keep_last"],
                              max_steps=s["max_steps"], save_every=s["save_every"], dtype=s["dtype"],
                              resume=bool(s["resume"]))
    except ValueError as e:
        raise as_flag_error(e, FinetuneConfig.__dataclass_fields__) from None


def _settings(args):
    """The effective settings: flags over --config over (with --resume) the run's saved settings."""
    import os

    from gptfast import settings
    from gptfast.cli import CommandError

    try:
        s = settings.resolve(args)
        if s["resume"]:
            if not s["out"]:
                raise CommandError("--resume needs --out: the run folder to continue")
            if not os.path.isdir(s["out"]):
                raise CommandError(f"--resume: {s['out']} is not a run folder (it does not exist); pass the --out "
                                   f"of the run to continue, or leave out --resume to start one there")
            s = settings.resolve(args, saved=settings.read_saved(s["out"]), restore_exclude=RESTORE_EXCLUDE)
    except settings.SettingsError as e:
        raise CommandError(str(e)) from None
    for key, what in (("base", "--base DIR|NAME (the pretrained model)"), ("data", "--data FILE"),
                      ("out", "--out DIR (the run folder)")):
        if not s[key]:
            raise CommandError(f"--{key} is missing: pass {what}, or set {key} in a --config file")
    return s


def run(args):
    import os

    from gptfast import checkpoint, settings
    from gptfast.classify import DatasetError
    from gptfast.cli import CommandError
    from gptfast.devices import check_backend, resolve_device
    from gptfast.finetune import autocast_dtype, finetune_classifier, finetune_instructions, resume_point
    from gptfast.weights import WeightsError

    s = _settings(args)
    out = s["out"]
    # the flags first: a bad one loads nothing and writes nothing
    device = resolve_device(s["device"])
    check_backend(s["backend"], device)
    if os.path.exists(out) and not os.path.isdir(out):
        raise CommandError(f"--out {out} is a file: pass a new folder for the run")
    cfg = _config(s, device)
    if args.task == "classify" and not 0.0 <= s["test_fraction"] < 0.9:
        raise CommandError(f"--test-fraction must be in [0, 0.9), got {s['test_fraction']}")
    if args.task == "instruct" and s["samples"] < 0:
        raise CommandError(f"--samples must be 0 or more, got {s['samples']}")
    if s["dtype"] in ("bf16", "fp16") and device.type == "mps":
        raise CommandError(f"--dtype {s['dtype']}: autocast on mps is not supported by gptfast; use --dtype fp32")
    if cfg.resume:
        try:
            folder, step = resume_point(out)
        except ValueError as e:
            raise CommandError(str(e)) from None
        if cfg.max_steps is not None and cfg.max_steps < step:
            raise CommandError(f"--max-steps {cfg.max_steps} is below this run's step {step} ({folder}): pass a "
                               f"larger --max-steps, or leave it out to train to the end of --epochs")
        print(f"resuming {folder} at step {step}")
        for line in settings.describe_overrides(s):
            print(f"  {line}")
        reordered = [flag for flag, _, _ in s.overrides if flag in ORDER_FLAGS]
        if reordered:
            print(f"warning: {', '.join(reordered)} changed: the examples and their order from here on are not "
                  f"those of an uninterrupted run")
    created = not os.path.exists(out)
    amp = autocast_dtype(cfg.dtype, device)
    before = steps_before = None  # the run folder's settings.json and checkpoints before this invocation
    try:
        if args.task == "classify":
            command = "finetune classify"
            kw = dict(text_column=s["text_column"], label_column=s["label_column"], num_classes=s["num_classes"],
                      max_length=s["max_length"], val_data=s["val_data"], test_data=s["test_data"],
                      test_fraction=s["test_fraction"], trainable_blocks=s["trainable_blocks"], backend=s["backend"])
            job = lambda: finetune_classifier(s["base"], s["data"], cfg, **kw)  # noqa: E731
        else:
            command = "finetune instruct"
            kw = dict(max_length=s["max_length"], samples=s["samples"], max_new_tokens=s["max_new_tokens"],
                      template=s["template"], backend=s["backend"])
            job = lambda: finetune_instructions(s["base"], s["data"], cfg, **kw)  # noqa: E731
        if not cfg.resume:
            from gptfast.finetune import check_out_dir

            check_out_dir(out)
        os.makedirs(out, exist_ok=True)
        settings_path = os.path.join(out, settings.SETTINGS_FILE)
        before = open(settings_path, "rb").read() if os.path.isfile(settings_path) else None
        steps_before = checkpoint.step_dirs(out)
        # paths as absolute ones, so that a resume from another folder reads the same files (a GPT-2
        # name for --base stays a name)
        record = settings.Settings({k: (os.path.abspath(v) if k in _PATH_SETTINGS and isinstance(v, str)
                                        and os.path.exists(v) else v) for k, v in s.items()})
        settings.save_settings(out, command, record)
        if amp is not None:
            print(f"training with {str(amp).removeprefix('torch.')} autocast on {device}")
        model, history = job()
    except BaseException as e:
        if steps_before is None or checkpoint.step_dirs(out) == steps_before:
            # nothing was trained: the run folder goes back to what it was
            _undo_settings(out, created, before)
        if isinstance(e, (DatasetError, WeightsError, FileNotFoundError, FileExistsError, ValueError)):
            raise CommandError(str(e)) from None
        raise
    evals = [r for r in history if "val_loss" in r]
    last = evals[-1] if evals else {}
    summary = ", ".join(f"{k} {v:.4f}" for k, v in last.items() if isinstance(v, float))
    labels = getattr(model, "labels", None)
    named = f"; classes {', '.join(f'{i} {n!r}' for i, n in enumerate(labels))}" if labels else ""
    step = history[-1]["step"] if history else 0
    print(f"done at step {step}: {summary}{named}; checkpoints in {out}")
    tested = history[-1] if history and "test_loss" in history[-1] else None
    if tested:
        acc = f", test_accuracy {tested['test_accuracy']:.4f}" if "test_accuracy" in tested else ""
        print(f"test ({tested['test_examples']} examples): test_loss {tested['test_loss']:.4f}{acc}")
    else:
        print("test: no test split (too few examples, or --test-fraction 0)")
    if args.task == "instruct" and s["samples"]:
        print(f"responses: {os.path.join(out, 'responses.json')}")
    return 0


def _undo_settings(out, created, before):
    """After a failed start: put back the settings.json a resumed run had (or remove the one written),
    and remove the --out folder this run created if nothing else is in it."""
    import os

    from gptfast import settings
    from gptfast.files import atomic_write_bytes

    path = os.path.join(out, settings.SETTINGS_FILE)
    if before is not None:
        atomic_write_bytes(path, before)
    elif os.path.isfile(path) and not any(name.startswith("step-") for name in os.listdir(out)):
        os.remove(path)
    if created and os.path.isdir(out) and not os.listdir(out):
        os.rmdir(out)
