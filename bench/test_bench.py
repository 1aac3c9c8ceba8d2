"""``pytest bench/``: every benchmark case of this device through pytest-benchmark.

Same cases as ``python -m bench`` with no flags (see :mod:`bench.harness`): the device's default plan,
the quick one on a CPU. GPU cases synchronize after each call.
"""

import pytest

from .harness import Context, default_plan, device_info, discover_cases

_INFO = device_info(measure=False)
_CTX = Context(_INFO.kind, _INFO, quick=default_plan(_INFO.kind) == "quick")
_CASES = discover_cases(_CTX)


def _sync_fn(case):
    if case.device != "cuda":
        return case.fn
    import torch

    def run():
        case.fn()
        torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("case", _CASES, ids=[f"{c.op}[{c.shape}|{c.dtype}|{c.impl}]" for c in _CASES])
def test_case(benchmark, case):
    benchmark.extra_info.update(op=case.op, shape=case.shape, impl=case.impl, dtype=case.dtype, unit=case.unit,
                                work=case.work, device=_INFO.name)
    benchmark(_sync_fn(case))


def test_skipped_cases_are_named():
    # What this device cannot run is reported, not silently dropped.
    for reason in _CTX.skipped:
        assert ":" in reason, reason
