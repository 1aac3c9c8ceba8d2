"""The ``gptfast`` command line (also ``python -m gptfast``).

Each subcommand lives in ``gptfast/commands/<name>.py`` and defines::

    HELP = "one line for the overview"
    def add_arguments(parser: argparse.ArgumentParser) -> None: ...
    def run(args: argparse.Namespace) -> int: ...   # the exit code

Exit codes: 0 done; 2 bad input (a flag, a path, the data, a corrupt checkpoint), raised as
:class:`CommandError` and printed as one line; 1 a failure during the run (any other exception),
printed as one line naming the exception; 130 interrupted. ``GPTFAST_DEBUG=1`` prints the traceback
as well.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

SUBCOMMANDS = ("bench", "tokenize", "train", "generate", "chat", "classify", "finetune")


DEBUG_ENV = "GPTFAST_DEBUG"


class CommandError(Exception):
    """A user-facing failure: printed as ``gptfast <cmd>: error: <message>`` with exit code 2."""


def debugging() -> bool:
    """True when ``GPTFAST_DEBUG`` asks for tracebacks."""
    return os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no", "off")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def as_flag_error(error: Exception, fields) -> CommandError:
    """A config's ``"name must be ..."`` error in the words of the command line: ``"--name must be ..."``
    (``fields``: the config's field names, each spelt like its flag with ``_`` for ``-``)."""
    text = str(error)
    name = text.split(" ", 1)[0]
    if name in fields:
        text = f"--{name.replace('_', '-')}{text[len(name):]}"
    return CommandError(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptfast", description="GPT-2 from scratch, with Triton kernels and a C++ tokenizer.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"gptfast.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"gptfast.commands.{name}":
                raise
            continue
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except CommandError as e:
        if debugging():
            traceback.print_exc()
        print(f"gptfast {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gptfast {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a failure nobody foresaw: one line, the traceback on request
        if debugging():
            traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else "(no message)"
        hint = "" if debugging() else f" (set {DEBUG_ENV}=1 for the traceback)"
        print(f"gptfast {args.command}: failed: {type(e).__name__}: {first}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
