"""``gptfast generate --checkpoint DIR --prompt TEXT``: continue a prompt with a trained model, streaming
the text as it is generated (the prompt first)."""

from __future__ import annotations

import os
import sys

HELP = "continue a prompt with a trained checkpoint, streaming tokens as they are generated"


def add_arguments(p):
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a training run folder (its latest step), one step-N folder, or its model.safetensors")
    p.add_argument("--prompt", required=True, metavar="TEXT")
    p.add_argument("--max-new-tokens", type=int, default=50, help="default 50")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) picks the most likely token")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample among the most likely tokens holding this mass")
    p.add_argument("--seed", type=int, default=123, help="seed of the sampling (default 123)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-text token")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context at every step (the book's loop)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--backend", default=None, help="ops backend: auto, reference, triton (default auto)")


class TextStream:
    """Decode a growing list of token ids and hand out only the new text, holding back an incomplete
    UTF-8 character (a token can end in the middle of one) until the next token completes it."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.printed = 0

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.printed = text[self.printed:], len(text)
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        new, self.printed = text[self.printed:], len(text)
        return new


def _check_sampling_flags(args):
    from gptfast.cli import CommandError

    if args.max_new_tokens < 0:
        raise CommandError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not args.temperature >= 0:
        raise CommandError(f"--temperature must be >= 0 (0 picks the most likely token), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise CommandError(f"--top-k must be a positive number of tokens, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise CommandError(f"--top-p must be in (0, 1], got {args.top_p}")


def _older_steps_hint(path: str, folder: str) -> str:
    """For a run folder whose newest step cannot be read: the older steps to pass instead."""
    from gptfast import checkpoint

    if os.path.abspath(path) == os.path.abspath(folder):
        return ""
    older = [p for _, p in checkpoint.step_dirs(path) if os.path.abspath(p) != os.path.abspath(folder)]
    return f"; older checkpoints of this run: {', '.join(reversed(older))}" if older else ""


def run(args):
    import torch

    from gptfast import checkpoint
    from gptfast.cli import CommandError
    from gptfast.data import DataError, tokenizer_by_name
    from gptfast.devices import check_backend, resolve_device
    from gptfast.generation import generate_stream, text_to_token_ids
    from gptfast.train import resolve_checkpoint

    # the flags first: nothing is loaded for a run that cannot start
    _check_sampling_flags(args)
    device = resolve_device(args.device)
    check_backend(args.backend, device)
    try:
        folder = resolve_checkpoint(args.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        raise CommandError(str(e)) from None
    try:
        tokenizer = tokenizer_by_name(checkpoint.read_raw_config(folder).get("tokenizer", "gpt2"))
        model = checkpoint.load_model(folder, backend=args.backend, device=device)
    except checkpoint.CheckpointError as e:
        raise CommandError(f"{e}{_older_steps_hint(args.checkpoint, folder)}") from None
    except (FileNotFoundError, ValueError, DataError) as e:
        raise CommandError(str(e)) from None
    if args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda"):
        model = model.to(torch.bfloat16)
    model.eval()
    idx = text_to_token_ids(args.prompt, tokenizer).to(device)  # (1, T)
    if idx.numel() == 0:
        raise CommandError("--prompt is empty: give at least one character of text to continue")
    torch.manual_seed(args.seed)
    eos_id = None if args.ignore_eos else tokenizer.eot_token
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    stream = TextStream(tokenizer)
    try:
        for idx_next in generate_stream(model, idx, args.max_new_tokens, temperature=args.temperature,
                                        top_k=args.top_k, top_p=args.top_p, eos_id=eos_id,
                                        use_cache=not args.no_cache):
            out.write(stream.push(idx_next[0, 0].item()))
            out.flush()
    except ValueError as e:
        out.write("\n")
        raise CommandError(str(e)) from None
    out.write(stream.flush() + "\n")
    out.flush()
    return 0
