"""``gptfast classify --checkpoint RUN TEXT... | --file F.csv``: label texts with a fine-tuned classifier.

The run folder (or one of its step-N folders) is one written by ``gptfast finetune classify``; its
``config.json`` gives the class names, the longest input, the padding token and how the outputs are
read, so every text is classified as training read it. Output: one line per text, in order,
tab-separated -- the label, the probability of that label (4 decimals) and the text (line breaks and
tabs shown as spaces)::

    spam	0.9731	WINNER!! Claim your free prize now

``--file`` reads the text column of a CSV file (``--text-column``, default ``Text``, matched
case-insensitively, as ``gptfast finetune classify`` reads it); any other columns are ignored.
"""

from __future__ import annotations

import sys

HELP = "label texts with a classifier fine-tuned by `gptfast finetune classify`"


def add_arguments(p):
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify (or --file)")
    p.add_argument("--checkpoint", required=True, metavar="RUN",
                   help="a run folder written by `gptfast finetune classify` (its newest step) or one step-N folder")
    p.add_argument("--file", default=None, metavar="F.csv", help="classify the text column of this CSV file")
    p.add_argument("--text-column", default="Text",
                   help="the CSV column holding the text (default Text; case-insensitive)")
    p.add_argument("--batch-size", type=int, default=16, help="texts per forward pass (default 16)")
    p.add_argument("--device", default=None, help="auto (default): cuda, then mps, then cpu; or cpu, cuda, cuda:N, mps")
    p.add_argument("--backend", default=None, help="ops backend: auto, reference, triton (default auto)")


def _shown(text: str) -> str:
    return " ".join(text.split())


def run(args):
    from gptfast import checkpoint
    from gptfast.classify import DatasetError, classify, load_classifier, read_texts
    from gptfast.cli import CommandError
    from gptfast.devices import check_backend, resolve_device
    from gptfast.weights import WeightsError

    # the flags and the texts first: nothing is loaded for input that cannot be classified
    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.texts and args.file is not None:
        raise CommandError("give the texts as arguments or in --file, not both")
    if not args.texts and args.file is None:
        raise CommandError("no text to classify: pass one or more TEXT arguments, or --file F.csv")
    device = resolve_device(args.device)
    check_backend(args.backend, device)
    try:
        texts = list(args.texts) if args.texts else read_texts(args.file, args.text_column)
        for i, text in enumerate(texts):
            if not text.strip():
                raise CommandError(f"text {i + 1} is empty: give at least one character to classify")
        model = load_classifier(args.checkpoint, args.backend, device=device)
        predictions = classify(model, texts, batch_size=args.batch_size)
    except checkpoint.CheckpointError as e:
        raise CommandError(str(e)) from None
    except (DatasetError, WeightsError, FileNotFoundError, UnicodeDecodeError, ValueError) as e:
        raise CommandError(str(e)) from None
    out = sys.stdout
    for text, (label, probability) in zip(texts, predictions):
        out.write(f"{label}\t{probability:.4f}\t{_shown(text)}\n")
    out.flush()
    return 0
