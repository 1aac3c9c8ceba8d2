"""gptfast benchmarks: speed, memory and resource fit.

Run everything the current device supports::

    python -m bench            # from the repository root
    gptfast bench              # after pip install
    pytest bench/              # the same cases through pytest-benchmark
    python -m bench.resources  # registers / spills / shared memory of every Triton kernel, per GPU arch

Each ``bench/cases_<topic>.py`` module defines ``cases(ctx) -> list[Case]``; the harness finds
them by name, times them side by side and prints one table.
"""

from .harness import Case, Context, discover_cases, run

__all__ = ["Case", "Context", "discover_cases", "run"]
