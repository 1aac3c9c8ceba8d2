"""gptfast.kernels: the Triton kernels behind ``backend="triton"``.

These modules import torch and triton only -- never the model -- and this package's ``__init__``
imports neither, so ``import gptfast`` stays free of triton. :mod:`gptfast.ops` imports a kernel
module the first time it is chosen.

Every kernel module (``layer_norm``, ``feed_forward``, ``attention``) follows one layout, in this order:
private ``@triton.jit`` kernels -> launchers (taking their config as an argument) -> a thin
``torch.autograd.Function`` / ``torch.library`` custom op -> the public function. It provides:

``SUPPORTED_ARCHS``
    CUDA archs (``86`` for sm_86 ...) whose configs ``python -m bench.resources`` has compiled and
    checked against the arch's limits. ``"auto"`` never picks a kernel on any other arch.
``configs(arch, dtype) -> list[dict]``
    The configs a launch on ``arch`` may use (``arch=None``: the one fixed config for Triton's CPU
    interpreter, where autotuning cannot run).
``resource_specs(arch, dtype) -> list[dict]``
    What ``bench.resources`` compiles: dicts with ``kernel`` (the jit function), ``signature``,
    ``constexprs``, ``num_warps``, ``num_stages`` and ``label``.
``unsupported_reason(fn_name, *args) -> str | None``
    Why the kernel cannot take these inputs (``None`` if it can); ``"auto"`` falls back to the reference,
    an explicit ``"triton"`` raises ``ValueError`` with this text.
the op functions
    Same signatures as in :mod:`gptfast.reference`, plus a keyword ``arch``.
"""
