"""``gptfast bench``: run every benchmark this device supports (same as ``python -m bench``)."""

HELP = "run every benchmark this device supports and print one table (JSON and PNG saved)"


def add_arguments(parser):
    from gptfast.bench.harness import add_arguments as add

    add(parser)


def run(args):
    from gptfast.bench.harness import run as run_bench

    run_bench(args.device, args.quick, args.only, args.out, not args.no_save)
    return 0
