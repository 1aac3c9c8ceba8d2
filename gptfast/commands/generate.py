"""``gptfast generate --checkpoint PATH --prompt TEXT``: continue prompts with a model, streaming the text
as it is generated.

``--checkpoint`` is anything :func:`gptfast.weights.from_pretrained` reads: a training run folder (its
newest step), one step folder (or the ``model.safetensors`` inside it), a Hugging Face GPT-2 folder, the
book's ``model.pth``, or a GPT-2 name. On an instruction-tuned run (``config.json`` has ``task:
instruct``) each prompt is the instruction of the run's prompt template and only the response is
printed; ``--raw`` continues the prompt as plain text instead.

One prompt and one sample print exactly the prompt and its continuation. More than one output puts a
header line before each and an empty line between them::

    ==> prompt 1/2, sample 1/3, seed 123 <==
    Every effort moves you ...

Sample ``i`` (counting from 0) of every prompt is drawn under seed ``--seed + i``, so any one output is
reproduced by generating that prompt alone with that seed.

The loading, sampling and streaming helpers here are shared with ``gptfast chat``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

HELP = "continue prompts with a trained checkpoint or a pretrained GPT-2, streaming tokens as they are generated"

RESPONSE_HEADER = "### Response:"
ACCEPTS = ("a training run folder (its newest step-N is used), one of its step-N folders or the model.safetensors "
           "inside one, a Hugging Face GPT-2 folder (config.json + model.safetensors), the book's model.pth, "
           "or a GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl)")


def add_checkpoint_argument(p):
    p.add_argument("--checkpoint", required=True, metavar="PATH|NAME",
                   help="a training run folder (its latest step), a step-N folder or its model.safetensors, a "
                        "Hugging Face GPT-2 folder, the book's model.pth, or gpt2 ... gpt2-xl")


def add_sampling_arguments(p, max_new_tokens=50):
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"default {max_new_tokens}")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) picks the most likely token")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample among the most likely tokens holding this mass")
    p.add_argument("--seed", type=int, default=123, help="seed of the sampling (default 123)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-text token")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context at every step (the book's loop)")
    p.add_argument("--device", default=None, help="auto (default): cuda, then mps, then cpu; or cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--backend", default=None, help="ops backend: auto, reference, triton (default auto)")


def add_arguments(p):
    add_checkpoint_argument(p)
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="text to continue; repeat the flag for several prompts, each with its own output")
    p.add_argument("--prompt-file", default=None, metavar="FILE",
                   help="more prompts, one per non-empty line (after the --prompt ones); - reads standard input")
    p.add_argument("--num-samples", type=int, default=1, metavar="N",
                   help="outputs per prompt (default 1); sample i is drawn under seed --seed + i")
    p.add_argument("--raw", action="store_true",
                   help="on an instruction-tuned run, continue each prompt as it is instead of as an instruction "
                        "in the run's prompt template")
    add_sampling_arguments(p)


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


class ResponseStream:
    """Stream what :func:`gptfast.instruct.extract_response` would return for the finished text: the
    generated text without the ``### Response:`` header and without surrounding whitespace.

    ``push`` takes new generated text and returns what can be printed already: a tail that could be the
    start of a header, and trailing whitespace, are held back until later text decides them; ``flush``
    returns the rest. The pieces joined equal ``generated.replace("### Response:", "").strip()``.
    """

    def __init__(self, header: str = RESPONSE_HEADER):
        self.header = header
        self.raw = ""
        self.printed = 0

    def _settled(self) -> str:
        raw, h = self.raw, self.header
        keep = next((n for n in range(min(len(h) - 1, len(raw)), 0, -1) if h.startswith(raw[-n:])), 0)
        return raw[:len(raw) - keep].replace(h, "").lstrip()

    def push(self, text: str) -> str:
        self.raw += text
        settled = self._settled().rstrip()
        new, self.printed = settled[self.printed:], max(self.printed, len(settled))
        return new

    def flush(self) -> str:
        final = self.raw.replace(self.header, "").strip()
        new, self.printed = final[self.printed:], len(final)
        return new


def check_sampling_flags(args):
    from gptfast.cli import CommandError

    if args.max_new_tokens < 0:
        raise CommandError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not args.temperature >= 0:
        raise CommandError(f"--temperature must be >= 0 (0 picks the most likely token), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise CommandError(f"--top-k must be a positive number of tokens, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise CommandError(f"--top-p must be in (0, 1], got {args.top_p}")


_check_sampling_flags = check_sampling_flags  # the name it had before chat shared it


def read_prompts(args) -> list[str]:
    """The ``--prompt`` values, then the non-empty lines of ``--prompt-file``; a clear error for none,
    an empty one, or a file that cannot be read."""
    from gptfast.cli import CommandError

    prompts = list(args.prompt)
    for i, p in enumerate(prompts):
        if p == "":
            which = "--prompt" if len(prompts) == 1 else f"--prompt number {i + 1}"
            raise CommandError(f"{which} is empty: give at least one character of text to continue")
    if args.prompt_file is not None:
        path = args.prompt_file
        try:
            if path == "-":
                text = sys.stdin.read()
            else:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
        except FileNotFoundError:
            raise CommandError(f"--prompt-file {path} does not exist: pass a text file with one prompt per line") from None
        except IsADirectoryError:
            raise CommandError(f"--prompt-file {path} is a folder: pass a text file with one prompt per line") from None
        except UnicodeDecodeError:
            raise CommandError(f"--prompt-file {path} is not UTF-8 text: pass a text file with one prompt per line") from None
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            raise CommandError(f"--prompt-file {path} has no prompts: write one prompt per line")
        prompts += lines
    if not prompts:
        raise CommandError("no prompt: pass --prompt TEXT (repeatable) or --prompt-file FILE")
    return prompts


@dataclass
class Loaded:
    """A model ready to generate, with its tokenizer and its run's ``config.json`` ({} when it has none)."""
    model: object
    tokenizer: object
    config: dict
    source: str


def _older_steps_hint(path: str, folder: str) -> str:
    """For a run folder whose newest step cannot be read: the older steps to pass instead."""
    from gptfast import checkpoint

    if os.path.abspath(path) == os.path.abspath(folder):
        return ""
    older = [p for _, p in checkpoint.step_dirs(path) if os.path.abspath(p) != os.path.abspath(folder)]
    return f"; older checkpoints of this run: {', '.join(reversed(older))}" if older else ""


def locate(path: str):
    """What ``--checkpoint`` names: ``("folder", step_folder)`` for gptfast's own layout (a run resolves to
    its newest step), or ``("pretrained", path_or_name)`` for what only ``from_pretrained`` reads."""
    from gptfast import checkpoint
    from gptfast.cli import CommandError
    from gptfast.weights import BOOK_FILE, _is_hf_folder, hub_repo

    if os.path.isdir(path):
        if checkpoint.is_model_folder(path):
            return "folder", path
        if _is_hf_folder(path) or os.path.isfile(os.path.join(path, BOOK_FILE)):
            return "pretrained", path
        if os.path.exists(os.path.join(path, checkpoint.MODEL_FILE)) or \
                os.path.exists(os.path.join(path, checkpoint.CONFIG_FILE)):
            return "folder", path  # a damaged step folder: loading it names what is missing or wrong
        latest = checkpoint.latest_checkpoint(path)
        if latest is None:
            raise CommandError(f"{path} holds no checkpoint (no step-N folder with {checkpoint.MODEL_FILE}, no "
                               f"config.json): pass {ACCEPTS}")
        return "folder", latest
    if os.path.isfile(path):
        name, folder = os.path.basename(path), os.path.dirname(path) or "."
        if name in (checkpoint.MODEL_FILE, checkpoint.CONFIG_FILE):
            return ("pretrained", folder) if _is_hf_folder(folder) else ("folder", folder)
        if name.endswith((".pth", ".pt", ".bin")):
            return "pretrained", path
        raise CommandError(f"{path} is a file, not a loadable checkpoint: pass {ACCEPTS}")
    if hub_repo(path) is not None:
        return "pretrained", path
    raise CommandError(f"{path} does not exist: pass {ACCEPTS}")


def load_for_generation(args) -> Loaded:
    """Load ``--checkpoint`` on ``--device`` with ``--dtype``, in eval mode; refuses a classifier."""
    import torch

    from gptfast import checkpoint
    from gptfast.cli import CommandError
    from gptfast.data import DataError, tokenizer_by_name
    from gptfast.devices import resolve_device
    from gptfast.weights import WeightsError, from_pretrained

    device = resolve_device(args.device)
    kind, where = locate(args.checkpoint)
    config = {}
    try:
        if kind == "folder":
            config = checkpoint.read_raw_config(where)
            check_not_classifier(config, args.checkpoint)
            tokenizer = tokenizer_by_name(config.get("tokenizer", "gpt2"))
            model = checkpoint.load_model(where, backend=args.backend, device=device)
        else:
            tokenizer = tokenizer_by_name("gpt2")
            model = from_pretrained(where, args.backend, device=device)
    except checkpoint.CheckpointError as e:
        raise CommandError(f"{e}{_older_steps_hint(args.checkpoint, where)}") from None
    except (WeightsError, FileNotFoundError, ValueError, DataError) as e:
        raise CommandError(str(e)) from None
    if args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda"):
        model = model.to(torch.bfloat16)
    model.eval()
    return Loaded(model, tokenizer, config, where)


def check_not_classifier(config: dict, path: str) -> None:
    from gptfast.cli import CommandError

    if config.get("task") == "classify" or config.get("num_classes") is not None:
        raise CommandError(f"{path} is a classifier (its config.json has task 'classify'), which answers with a "
                           f"label, not text: run `gptfast classify --checkpoint {path} TEXT` instead")


def run_template(config: dict, path: str):
    """The prompt template the run's config names, or None; an unknown one is one clear line."""
    from gptfast.classify import DatasetError
    from gptfast.cli import CommandError
    from gptfast.instruct import template_of

    try:
        return template_of(config)
    except DatasetError as e:
        raise CommandError(f"{path}: {e}") from None


def encode_prompt(text: str, loaded: Loaded, what: str = "the prompt"):
    """(1, T) ids of ``text`` on the model's device; a clear error for ids outside the model's vocabulary."""
    from gptfast.cli import CommandError
    from gptfast.generation import text_to_token_ids

    idx = text_to_token_ids(text, loaded.tokenizer)
    if idx.numel() == 0:
        raise CommandError(f"{what} is empty: give at least one character of text to continue")
    vocab = loaded.model.cfg.vocab_size
    if int(idx.max()) >= vocab:
        raise CommandError(f"{what} has token id {int(idx.max())}, outside the model's vocabulary of {vocab} ids: "
                           f"this model was not trained with GPT-2's tokenizer")
    device = next(loaded.model.parameters()).device
    return idx.to(device)


def stream_text(loaded: Loaded, idx, args, seed: int, out, response_only: bool) -> str:
    """Generate after ``idx`` under ``seed`` and write the new text to ``out`` as it arrives (with
    ``response_only``, through :class:`ResponseStream`); returns what was written."""
    import torch

    from gptfast.cli import CommandError
    from gptfast.generation import generate_stream

    torch.manual_seed(seed)
    eos_id = None if args.ignore_eos else loaded.tokenizer.eot_token
    text_stream = TextStream(loaded.tokenizer)
    response = ResponseStream() if response_only else None
    written = []

    def emit(piece):
        if response is not None:
            piece = response.push(piece)
        if piece:
            out.write(piece)
            out.flush()
            written.append(piece)

    try:
        for idx_next in generate_stream(loaded.model, idx, args.max_new_tokens, temperature=args.temperature,
                                        top_k=args.top_k, top_p=args.top_p, eos_id=eos_id,
                                        use_cache=not args.no_cache):
            emit(text_stream.push(idx_next[0, 0].item()))
    except ValueError as e:
        out.write("\n")
        raise CommandError(str(e)) from None
    emit(text_stream.flush())
    if response is not None and (rest := response.flush()):
        out.write(rest)
        written.append(rest)
    out.flush()
    return "".join(written)


def run(args):
    from gptfast.cli import CommandError
    from gptfast.devices import check_backend, resolve_device
    from gptfast.instruct import apply_template

    # the flags and the prompts first: nothing is loaded or printed for a run that cannot start
    check_sampling_flags(args)
    if args.num_samples < 1:
        raise CommandError(f"--num-samples must be >= 1, got {args.num_samples}")
    check_backend(args.backend, resolve_device(args.device))
    prompts = read_prompts(args)
    if args.num_samples > 1 and args.temperature == 0:
        print(f"gptfast generate: warning: --num-samples {args.num_samples} at --temperature 0 gives "
              f"{args.num_samples} identical outputs (greedy); pass --temperature > 0 to sample", file=sys.stderr)
    loaded = load_for_generation(args)
    template = None if args.raw else run_template(loaded.config, args.checkpoint)
    contexts = []
    for i, prompt in enumerate(prompts):
        text = prompt if template is None else apply_template(template, prompt)
        what = "--prompt" if len(prompts) == 1 else f"prompt {i + 1}"
        contexts.append(encode_prompt(text, loaded, what))
    out = sys.stdout
    headed = len(prompts) * args.num_samples > 1
    first = True
    for p, (prompt, idx) in enumerate(zip(prompts, contexts)):
        for s in range(args.num_samples):
            seed = args.seed + s
            if headed:
                out.write(("" if first else "\n") + f"==> prompt {p + 1}/{len(prompts)}, "
                          f"sample {s + 1}/{args.num_samples}, seed {seed} <==\n")
            first = False
            if template is None:
                out.write(prompt)
                out.flush()
            stream_text(loaded, idx, args, seed, out, response_only=template is not None)
            out.write("\n")
            out.flush()
    return 0
