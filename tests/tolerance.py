"""One tolerance rule for every kernel test (flash-attention's rule, with the scale of what was summed).

A kernel's output in a low-precision dtype is compared with an fp64 reference. Its max-abs error may be

    factor * (max-abs error of plain PyTorch computing the same math in that dtype)
    + eps_multiple * eps(dtype) * max(scale)

The first term is the error an equally good implementation makes; the second leaves room for a
different, equally good summation order where PyTorch happens to round luckily (or exactly).

``scale`` is the magnitude of *what was summed*, never of the result. Rounding a sum ``sum_k t_k``
costs about ``eps * sum_k |t_k|``, whatever the sum comes to: a sum of large terms that cancel to
about zero (a weight or bias gradient, a key bias's gradient, which is exactly zero since softmax
ignores a constant added to a row) still carries the rounding of its terms, and a bound built from
``|result|`` then shrinks to PyTorch's own error alone, which a kernel summing in another order
passes or fails by chance, depending on the CPU's vector width, the BLAS and the thread count.

Each test computes its scale in fp64 from the reference math and says in a comment which one it
uses; the helpers here cover the common shapes:

* a matrix product ``a @ b``: :func:`matmul_terms`, ``|a| @ |b|``;
* a bias gradient (the upstream gradient summed over rows): :func:`row_sum_terms`, ``sum_rows |dy|``;
* a model's logits: :func:`logit_terms`, ``|x| @ |W_out|^T`` of the output head;
* every parameter gradient of a model: :class:`SummedTerms`, which records during an fp64
  backward pass, for each use of a parameter, the magnitudes its gradient adds up
  (``|dY|^T @ |X|`` for a linear weight, ``sum_rows |dY|`` for a bias, ``sum_rows |dY * other|``
  for an elementwise scale, the scattered ``|dE|`` for an embedding table).

Two fp32 implementations of the same math with no fp64 reference (a checkpoint converted to another
library, LoRA merged into the weights) are compared by :func:`assert_agree`, within twice that floor.

A wrong kernel is off by far more than either term: the scale is at most a few times ``sqrt(n)``
larger than a typical result, so ``eps * scale`` stays in the 1e-6 range relative for fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _max_abs(scale) -> float:
    if isinstance(scale, torch.Tensor):
        return scale.double().abs().max().item() if scale.numel() else 0.0
    return abs(float(scale))


def matmul_terms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|a| @ |b|`` in fp64: entry (i, j) is the sum of |terms| that ``(a @ b)[i, j]`` adds up."""
    return a.double().abs() @ b.double().abs()


def row_sum_terms(dy: torch.Tensor) -> torch.Tensor:
    """``sum_rows |dy|`` in fp64, (E,) for dy (..., E): the terms of a bias gradient."""
    return dy.double().abs().reshape(-1, dy.shape[-1]).sum(0)


def bound(scale, torch_lowp: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype, factor: float = 2.0,
          eps_multiple: float = 4.0) -> float:
    """The allowed max-abs error of a kernel output in ``dtype`` against ``ref64``.

    ``torch_lowp`` is the same math computed by PyTorch in ``dtype`` (the baseline error); ``scale``
    the fp64 magnitude of the terms summed to get ``ref64`` (a tensor or a number; its max is used).
    """
    eps = torch.finfo(dtype).eps
    return factor * max_abs_err(torch_lowp, ref64) + eps_multiple * eps * _max_abs(scale)


def assert_close(name: str, out: torch.Tensor, ref64: torch.Tensor, torch_lowp: torch.Tensor,
                 dtype: torch.dtype, *, scale, factor: float = 2.0, eps_multiple: float = 4.0) -> None:
    """Fail with the numbers when ``out`` is farther from ``ref64`` than :func:`bound` allows."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values in the kernel's output"
    err = max_abs_err(out, ref64)
    allowed = bound(scale, torch_lowp, ref64, dtype, factor, eps_multiple)
    ref_max = ref64.abs().max().item() if ref64.numel() else 0.0
    assert err <= allowed, (
        f"{name}: max-abs error {err:.3e} vs fp64 exceeds {allowed:.3e} "
        f"(PyTorch {dtype} error {max_abs_err(torch_lowp, ref64):.3e}, scale of the summed terms "
        f"{_max_abs(scale):.3e}, |ref| max {ref_max:.3e})"
    )


def assert_agree(name: str, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, *, scale,
                 eps_multiple: float = 8.0) -> None:
    """Two implementations of the same math, both run in ``dtype`` (no fp64 reference at hand).

    Each stays within the floor of :func:`bound` (4 eps times the summed terms) of the exact result,
    so the two differ by at most twice that: ``eps_multiple`` = 8.
    """
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = max_abs_err(a, b)
    allowed = eps_multiple * torch.finfo(dtype).eps * _max_abs(scale)
    assert err <= allowed, (f"{name}: max-abs difference {err:.3e} exceeds {allowed:.3e} "
                            f"(scale of the summed terms {_max_abs(scale):.3e})")


def logit_terms(model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """``|x| @ |W_out|^T`` (fp64) for the logits ``model`` gives ``idx``: the terms its out_head sums."""
    with torch.no_grad(), SummedTerms(model) as terms:
        model(idx)
    return terms.outputs[terms.name_of(model.out_head.weight)]  # a tied head is named tok_emb.weight


class SummedTerms(TorchFunctionMode):
    """Records, during an fp64 forward and backward pass, the terms each parameter's gradient sums.

    >>> with SummedTerms(model) as terms:   # doctest: +SKIP
    ...     model(idx).sum().backward()
    >>> terms.grads["trf_blocks.0.att.W_key.bias"]   # sum over rows of |dK|, shape (E,)

    Per use of a parameter (summed over uses, e.g. a tied embedding):

    * ``F.linear(x, W, b)``: W gets ``|dY|^T @ |X|`` over all rows, b gets ``sum_rows |dY|``;
    * ``F.embedding(idx, W)``: W gets ``|dE|`` scattered to the rows that were looked up;
    * ``p * other`` or ``p + other`` (a layer norm's scale and shift, broadcast over rows): ``|dOut * other|``
      or ``|dOut|``, summed over the broadcast dimensions.

    ``outputs[name]`` holds the forward terms of each linear layer's output, ``|X| @ |W|^T + |b|``, keyed
    by its weight's name. A parameter used in any other way is reported by :meth:`check_complete`.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self._names = {id(p): n for n, p in model.named_parameters()}
        self.grads: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.unhandled: set[str] = set()

    def name_of(self, param) -> str:
        return self._names[id(param)]

    def _add(self, param, terms):
        name = self._names[id(param)]
        terms = terms.detach().double()
        self.grads[name] = self.grads[name] + terms if name in self.grads else terms

    def _on_grad(self, out, fn):
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda g: (fn(g.detach()), None)[1])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        params = [a for a in list(args) + list(kwargs.values())
                  if isinstance(a, torch.nn.Parameter) and id(a) in self._names]
        if params and isinstance(out, torch.Tensor):
            with torch._C.DisableTorchFunction():
                self._record(func, args, kwargs, out, params)
        return out

    def _record(self, func, args, kwargs, out, params):
        if func is F.linear:
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            x2 = x.detach().double().abs().reshape(-1, x.shape[-1])  # (N, in)
            fwd = x2 @ w.detach().double().abs().T + (0 if b is None else b.detach().double().abs())
            self.outputs[self._names[id(w)]] = fwd.reshape(*x.shape[:-1], w.shape[0])
            if not out.requires_grad:
                return

            def on_grad(dy):
                dy2 = dy.double().abs().reshape(-1, dy.shape[-1])  # (N, out)
                self._add(w, dy2.T @ x2)
                if b is not None:
                    self._add(b, dy2.sum(0))

            self._on_grad(out, on_grad)
        elif func is F.embedding:
            idx, w = args[0], args[1]

            def on_grad(de):
                rows = de.double().abs().reshape(-1, w.shape[1])
                self._add(w, torch.zeros(w.shape, dtype=torch.float64, device=w.device)
                          .index_add_(0, idx.reshape(-1), rows))

            self._on_grad(out, on_grad)
        elif getattr(func, "__name__", None) in ("__mul__", "__rmul__", "mul", "__add__", "__radd__", "add") \
                and len(args) == 2 and not kwargs:
            is_mul = "mul" in func.__name__
            for i, p in enumerate(args):
                if not isinstance(p, torch.nn.Parameter) or id(p) not in self._names:
                    continue
                other = args[1 - i]

                def on_grad(d, p=p, other=other):
                    t = d.double().abs()
                    if is_mul:
                        t = t * (other.detach().double().abs() if isinstance(other, torch.Tensor) else abs(other))
                    self._add(p, t.sum_to_size(p.shape))

                self._on_grad(out, on_grad)
        elif out.requires_grad:  # not shape or dtype reads, detach(): ops a gradient flows through
            self.unhandled.update(self._names[id(p)] for p in params)

    def check_complete(self, model: torch.nn.Module) -> None:
        """Every parameter that received a gradient had all its uses recorded."""
        for name, p in model.named_parameters():
            assert name not in self.unhandled, f"{name} is used by an op SummedTerms does not know"
            assert p.grad is None or name in self.grads, f"no gradient terms were recorded for {name}"
