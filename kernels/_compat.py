"""Version differences the kernel modules paper over (torch 2.6 -> current, triton 3.2 -> current)."""

from __future__ import annotations

import torch
from triton.runtime.interpreter import InterpretedFunction


def wrap_triton(kernel):
    """``torch.library.wrap_triton(kernel)``, and the kernel itself under Triton's interpreter.

    With ``TRITON_INTERPRET=1``, ``@triton.jit`` gives an ``InterpretedFunction``: newer torch hands it
    back unwrapped (there is nothing to trace), torch 2.6 raises on it. Either way it is launched as it is.
    """
    if isinstance(kernel, InterpretedFunction):
        return kernel
    return torch.library.wrap_triton(kernel)
