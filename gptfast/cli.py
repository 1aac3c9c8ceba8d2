"""The ``gptfast`` command line (also ``python -m gptfast``).

Each subcommand lives in ``gptfast/commands/<name>.py`` and defines::

    HELP = "one line for the overview"
    def add_arguments(parser: argparse.ArgumentParser) -> None: ...
    def run(args: argparse.Namespace) -> int: ...   # the exit code
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("bench", "tokenize", "train", "generate", "finetune")


class CommandError(Exception):
    """A user-facing failure: printed as ``gptfast <cmd>: error: <message>`` with exit code 2."""


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
        print(f"gptfast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gptfast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
