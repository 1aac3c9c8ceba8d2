"""gptfast benchmarks: speed, memory and resource fit.

Run everything the current device supports::

    python -m bench            # from the repository root: the quick plan on a CPU, the full one on a GPU
    gptfast bench              # after pip install, from any folder; the same flags
    python -m bench --dry-run  # the plan and each case's time budget, nothing run
    pytest bench/              # the same cases through pytest-benchmark
    python -m bench.resources  # registers / spills / shared memory of every Triton kernel, per GPU arch

Results go to ``./bench-results/`` in the current folder (``--out DIR`` to choose).

Each ``bench/cases_<topic>.py`` module defines ``cases(ctx) -> list[Case]``; the harness finds
them by name, times them side by side and prints one table.
"""

from .harness import Case, Context, discover_cases, run

__all__ = ["Case", "Context", "discover_cases", "run"]
