"""``gptfast chat --checkpoint RUN``: talk to an instruction-tuned run, one instruction per line.

Each line read from standard input (a terminal or a pipe) is one instruction: it goes into the prompt
template the run was trained with (``template`` in its ``config.json``; ``task: instruct`` alone means
the Alpaca template), and the model's response is streamed to standard output followed by an empty
line. Every line is a request of its own -- the template is single-turn, so the model does not see
earlier turns. Empty lines are skipped; ``/quit``, ``/exit``, end of input (Ctrl-D) and Ctrl-C end the
chat with exit code 0. Turn ``i`` (counting from 0) samples under seed ``--seed + i``, so its response
is what ``gptfast generate --checkpoint RUN --prompt LINE --seed SEED+i`` prints.

A checkpoint that is not instruction-tuned is refused unless ``--template NAME`` says which template to
use anyway. The greeting and the ``>`` prompt go to standard error, so standard output holds only the
responses.
"""

from __future__ import annotations

import sys

from gptfast.commands.generate import (add_checkpoint_argument, add_sampling_arguments, check_sampling_flags,
                                       encode_prompt, load_for_generation, run_template, stream_text)

HELP = "chat with an instruction-tuned run: one instruction per line in, its response streamed out"

QUIT = ("/quit", "/exit")


def add_arguments(p):
    from gptfast.instruct import TEMPLATES

    add_checkpoint_argument(p)
    p.add_argument("--template", default=None, choices=sorted(TEMPLATES),
                   help="prompt template to use (default: the one the run was trained with); needed for a "
                        "checkpoint that is not instruction-tuned")
    add_sampling_arguments(p, max_new_tokens=256)


def _read_line(interactive: bool):
    """The next line without its line end, or None at the end of input."""
    if interactive:
        try:
            return input()  # the "> " prompt is written to stderr by the caller
        except EOFError:
            return None
    line = sys.stdin.readline()
    return None if line == "" else line.rstrip("\r\n")


def run(args):
    from gptfast.cli import CommandError
    from gptfast.devices import check_backend, resolve_device
    from gptfast.instruct import apply_template

    check_sampling_flags(args)
    check_backend(args.backend, resolve_device(args.device))
    loaded = load_for_generation(args)
    template = args.template or run_template(loaded.config, args.checkpoint)
    if template is None:
        raise CommandError(f"{args.checkpoint} is not an instruction-tuned run (its config.json names no prompt "
                           f"template): chat with a run written by `gptfast finetune instruct`, pass --template "
                           f"alpaca to use the Alpaca prompt anyway, or use `gptfast generate` to continue text")
    interactive = sys.stdin.isatty()
    err, out = sys.stderr, sys.stdout
    turn = 0
    try:
        # The greeting is inside the try: a Ctrl-C that lands just after it ends the chat like any other.
        print(f"gptfast chat: {args.checkpoint} (template {template}); one instruction per line, "
              f"/quit or Ctrl-D to end", file=err, flush=True)
        while True:
            if interactive:
                err.write("> ")
                err.flush()
            line = _read_line(interactive)
            if line is None or line.strip() in QUIT:
                break
            if not line.strip():
                continue
            idx = encode_prompt(apply_template(template, line), loaded, "the instruction")
            stream_text(loaded, idx, args, args.seed + turn, out, response_only=True)
            out.write("\n\n")
            out.flush()
            turn += 1
    except KeyboardInterrupt:  # Ctrl-C ends the chat, mid-response or at the prompt
        out.write("\n")
        out.flush()
    return 0
