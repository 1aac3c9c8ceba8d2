"""One tolerance rule for every kernel test (flash-attention's rule).

A kernel's output in a low-precision dtype is compared with an fp64 reference. Its max-abs error may be
at most ``factor`` times the error that plain PyTorch makes computing the same math in that dtype, plus
a few units of the dtype's epsilon times the reference's magnitude (so an exact PyTorch result still
leaves room for a different, equally good summation order). Never a loose constant: a wrong kernel
is off by far more than either term.
"""

from __future__ import annotations

import torch


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def bound(ref64: torch.Tensor, torch_lowp: torch.Tensor, dtype: torch.dtype, factor: float = 2.0,
          eps_multiple: float = 4.0) -> float:
    """The allowed max-abs error of a kernel output in ``dtype`` against ``ref64``.

    ``torch_lowp`` is the same math computed by PyTorch in ``dtype`` (the baseline error).
    """
    eps = torch.finfo(dtype).eps
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    return factor * max_abs_err(torch_lowp, ref64) + eps_multiple * eps * max(scale, 1e-30)


def assert_close(name: str, out: torch.Tensor, ref64: torch.Tensor, torch_lowp: torch.Tensor,
                 dtype: torch.dtype, factor: float = 2.0, eps_multiple: float = 4.0) -> None:
    """Fail with the numbers when ``out`` is farther from ``ref64`` than :func:`bound` allows."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values in the kernel's output"
    err = max_abs_err(out, ref64)
    allowed = bound(ref64, torch_lowp, dtype, factor, eps_multiple)
    assert err <= allowed, (
        f"{name}: max-abs error {err:.3e} vs fp64 exceeds {allowed:.3e} "
        f"(PyTorch {dtype} error {max_abs_err(torch_lowp, ref64):.3e}, |ref| max {ref64.abs().max().item():.3e})"
    )
