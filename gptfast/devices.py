"""Checks of the ``--device`` and ``--backend`` flags, made before a command does any work.

Every subcommand that runs a model calls these first, so a machine without CUDA, a misspelt device
or a Triton backend that cannot run here is a one-line error (exit code 2), not a traceback from
deep inside a load or the first forward pass::

    device = resolve_device(args.device)           # torch.device; DeviceError if it cannot be used
    check_backend(args.backend, device)             # DeviceError if a kernel asked for cannot run there
"""

from __future__ import annotations

import os

import torch

from .cli import CommandError

KNOWN_TYPES = ("cpu", "cuda", "mps")


class DeviceError(CommandError, ValueError):
    """A ``--device`` or ``--backend`` that this machine cannot run; the message says what to use."""


def _cuda_missing_reason() -> str:
    if torch.version.cuda is None:
        return f"this PyTorch ({torch.__version__}) was built without CUDA"
    return f"PyTorch (CUDA {torch.version.cuda}) finds no CUDA GPU"


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def auto_device(local_rank: int = 0) -> torch.device:
    """The best device here: this process's CUDA GPU, else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(spec: str | None, *, local_rank: int = 0, flag: str = "--device") -> torch.device:
    """The device named by ``spec`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``), checked to exist here.

    ``"auto"`` (and ``None``) picks :func:`auto_device`: cuda (``cuda:local_rank``), then mps, then cpu. Raises
    :class:`DeviceError` naming ``flag`` for a name torch does not know, a type gptfast does not run
    on, or a device this machine lacks.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if spec is None or spec == "" or spec == "auto":
        return auto_device(local_rank)
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise DeviceError(f"{flag} {spec!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in KNOWN_TYPES:
        raise DeviceError(f"{flag} {spec!r}: gptfast runs on cpu, cuda or mps, not {device.type}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{flag} {spec}: {_cuda_missing_reason()}; use --device cpu, or --device auto "
                              f"to use the GPU only when there is one")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"{flag} {spec}: this machine has {count} CUDA GPU(s), numbered 0..{count - 1}")
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            built = mps is not None and mps.is_built()
            why = "this Mac's macOS or hardware has no MPS support" if built else \
                f"this PyTorch ({torch.__version__}) has no MPS support (it needs Apple silicon and a macOS build)"
            raise DeviceError(f"{flag} mps: {why}; use --device cpu")
    return device


def _flag_of(rule: str, backend) -> str:
    """How the user asked for a backend, in command-line words."""
    from . import ops

    if rule == "the call's backend argument":
        return f"--backend {backend}"
    if rule == f"${ops.ENV_VAR}":
        return f"{ops.ENV_VAR}={os.environ.get(ops.ENV_VAR)}"
    return rule


def check_backend(backend, device: torch.device) -> None:
    """Raise :class:`DeviceError` when ``backend`` (a ``--backend`` value, or ``$GPTFAST_BACKEND``
    when it is None) is not a valid choice, or asks for a Triton kernel that cannot run on ``device``.

    ``"auto"`` and ``"reference"`` always pass: they fall back quietly. Only an op that resolves to
    ``"triton"`` is checked, the way :func:`gptfast.ops.choose` would check it at its first call.
    """
    from . import ops

    try:
        ops.parse_backend(backend, "--backend")
        if backend is None:
            ops.parse_backend(os.environ.get(ops.ENV_VAR) or None, f"${ops.ENV_VAR}")
    except (ValueError, TypeError) as e:
        raise DeviceError(str(e)) from None
    device = torch.device(device)
    for op in ops.OPS:
        name, rule = ops.resolve(op, backend)
        if name != "triton":
            continue
        asked = _flag_of(rule, backend)
        if device.type == "cpu" and not ops.interpreting():
            raise DeviceError(f"{asked}: Triton kernels need a CUDA GPU, and this run is on the CPU; set "
                              f"TRITON_INTERPRET=1 to run them through Triton's (slow) CPU interpreter, or use "
                              f"--backend reference")
        if device.type not in ("cpu", "cuda"):
            raise DeviceError(f"{asked}: Triton kernels run on CUDA GPUs, not on {device.type}; "
                              f"use --backend reference or auto")
        try:
            ops.choose(op, device, backend)
        except (RuntimeError, NotImplementedError) as e:
            why = str(e).split(", but ", 1)[-1]
            raise DeviceError(f"{asked}: {op} cannot run its kernel here: {why}; use --backend reference or auto") \
                from None
