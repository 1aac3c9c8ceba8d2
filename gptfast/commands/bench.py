"""``gptfast bench``: run every benchmark this device supports (same flags as ``python -m bench``)."""

HELP = ("run every benchmark this device supports and print one table (the quick plan on a CPU; "
        "JSON and PNG saved to ./bench-results)")


def add_arguments(parser):
    from gptfast.bench.harness import DESCRIPTION, add_arguments as add

    parser.description = DESCRIPTION
    add(parser)


def run(args):
    from gptfast.bench.harness import run_args

    run_args(args)  # a bad flag raises CommandError: one line, exit 2
    return 0
