"""``gptfast finetune classify|instruct``: the book's chapter-6 and chapter-7 fine-tuning (LoRA optional).

    gptfast finetune classify --base gpt2 --data sms.csv --out runs/spam [--lora-rank 16]
    gptfast finetune instruct --base gpt2-medium --data instruction-data.json --out runs/alpaca
"""

from __future__ import annotations

HELP = "fine-tune a pretrained GPT-2: text classification (chapter 6) or instruction following (chapter 7)"


def _common(p, epochs, data_help):
    p.add_argument("--base", required=True, metavar="DIR|NAME",
                   help="pretrained model: a folder (Hugging Face, gptfast, training run, model.pth) or gpt2...gpt2-xl")
    p.add_argument("--data", required=True, metavar="FILE", help=data_help)
    p.add_argument("--out", required=True, metavar="DIR", help="run folder: step-N/ checkpoints, metrics.jsonl")
    p.add_argument("--epochs", type=int, default=epochs, help=f"passes over the data (default {epochs}, as the book)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (default 8)")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (default 5e-5)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default 0.1)")
    p.add_argument("--eval-every", type=int, default=50, help="steps between evaluations (default 50)")
    p.add_argument("--eval-iters", type=int, default=5, help="batches per evaluation (default 5)")
    p.add_argument("--lora-rank", type=int, default=0, metavar="R",
                   help="train LoRA adapters of rank R instead of the layers themselves (appendix E uses 16)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale alpha (default 16)")
    p.add_argument("--max-length", type=int, default=None, help="longest input in tokens (default: context_length)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when available)")
    p.add_argument("--backend", default=None, help="ops backend: auto, reference or triton")
    p.add_argument("--seed", type=int, default=123, help="random seed (default 123)")
    p.add_argument("--keep-last", type=int, default=1, help="step-N checkpoints to keep, newest first (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_arguments(parser):
    sub = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    c = sub.add_parser("classify", help="train a classifier head on a CSV of texts and labels (chapter 6)")
    _common(c, epochs=5, data_help="CSV file with a text column and a label column (integers or names)")
    c.add_argument("--text-column", default="Text", help="CSV column with the text (default Text; case-insensitive)")
    c.add_argument("--label-column", default="Label", help="CSV column with the label (default Label)")
    c.add_argument("--num-classes", type=int, default=None, help="number of classes (default: from the labels)")
    c.add_argument("--val-data", default=None, metavar="FILE", help="validation CSV (default: 10%% of --data)")
    c.add_argument("--trainable-blocks", type=int, default=1, help="last blocks to train without LoRA (default 1)")
    i = sub.add_parser("instruct", help="instruction-tune on a JSON list of {instruction, input, output} (chapter 7)")
    _common(i, epochs=2, data_help='JSON file: a list of {"instruction", "input", "output"} entries')
    i.add_argument("--samples", type=int, default=3, help="validation entries to answer into responses.json (default 3)")
    i.add_argument("--max-new-tokens", type=int, default=256, help="longest generated response (default 256)")


def _config(args, device):
    """The run's FinetuneConfig; a bad flag is named as the flag."""
    from gptfast.cli import as_flag_error
    from gptfast.finetune import FinetuneConfig

    try:
        return FinetuneConfig(out_dir=args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                              weight_decay=args.weight_decay, eval_every=args.eval_every, eval_iters=args.eval_iters,
                              lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, seed=args.seed,
                              device=str(device), progress=not args.no_progress, keep_last=args.keep_last)
    except ValueError as e:
        raise as_flag_error(e, FinetuneConfig.__dataclass_fields__) from None


def run(args):
    import os

    from gptfast.classify import DatasetError
    from gptfast.cli import CommandError
    from gptfast.devices import check_backend, resolve_device
    from gptfast.finetune import finetune_classifier, finetune_instructions
    from gptfast.weights import WeightsError

    # the flags first: a bad one loads nothing and writes nothing
    device = resolve_device(args.device)
    check_backend(args.backend, device)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CommandError(f"--out {args.out} is a file: pass a new folder for the run")
    cfg = _config(args, device)
    created = not os.path.exists(args.out)
    try:
        if args.task == "classify":
            model, history = finetune_classifier(
                args.base, args.data, cfg, text_column=args.text_column, label_column=args.label_column,
                num_classes=args.num_classes, max_length=args.max_length, val_data=args.val_data,
                trainable_blocks=args.trainable_blocks, backend=args.backend)
        else:
            model, history = finetune_instructions(args.base, args.data, cfg, max_length=args.max_length,
                                                   samples=args.samples, max_new_tokens=args.max_new_tokens,
                                                   backend=args.backend)
    except (DatasetError, WeightsError, FileNotFoundError, FileExistsError, ValueError) as e:
        raise CommandError(str(e)) from None
    finally:
        if created and os.path.isdir(args.out) and not os.listdir(args.out):
            os.rmdir(args.out)  # a run that failed before writing anything leaves no folder behind
    last = history[-1] if history else {}
    summary = ", ".join(f"{k} {v:.4f}" for k, v in last.items() if isinstance(v, float))
    labels = getattr(model, "labels", None)
    named = f"; classes {', '.join(f'{i} {n!r}' for i, n in enumerate(labels))}" if labels else ""
    print(f"done: {summary}{named}; checkpoints in {args.out}")
    return 0
