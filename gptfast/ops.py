"""The one dispatch point: every heavy op of the model goes through here, and only this module knows
that a reference implementation (:mod:`gptfast.reference`) and a Triton kernel (:mod:`gptfast.kernels`)
both exist.

Which one runs is decided per op and per call, by the first of these that names a backend for the op:

1. the call's ``backend=`` argument (the model's layers pass the model's choice here),
2. ``with gptfast.use_backend(...)``,
3. the environment variable ``GPTFAST_BACKEND``,
4. ``"auto"``.

A choice is a name (``"auto"``, ``"reference"``, ``"triton"``) for every op, or a dict keyed by op
(``"layer_norm"`` -- which covers ``add_layer_norm`` --, ``"feed_forward"``, ``"attention"``,
``"linear_cross_entropy"``), e.g.
``{"attention": "triton", "layer_norm": "reference"}``; an op a dict leaves out falls through to the
next rule. ``GPTFAST_BACKEND`` takes a name or ``"attention=triton,layer_norm=reference"``.

``"auto"`` runs the kernel when the op has one, triton imports, the inputs are CUDA tensors on a GPU
architecture the kernel was proven on (see ``python -m bench.resources``) and the kernel supports the
shape; otherwise the reference, quietly. An explicit ``"triton"`` never falls back: on CPU tensors it
runs through Triton's interpreter when ``TRITON_INTERPRET=1`` was set before triton was imported, and
raises an error saying why otherwise.

Under autocast each op casts its inputs as the matching torch op would (layer norm to float32,
linear layers and attention to the autocast dtype) and runs with autocast off.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
from dataclasses import dataclass
from typing import Mapping

import torch

from . import reference

OPS = ("layer_norm", "feed_forward", "attention", "linear_cross_entropy")
BACKENDS = ("auto", "reference", "triton")
ENV_VAR = "GPTFAST_BACKEND"

# op -> the module in gptfast.kernels that implements it. A missing module means "no kernel yet".
_KERNEL_MODULES = {
    "layer_norm": "gptfast.kernels.layer_norm",
    "feed_forward": "gptfast.kernels.feed_forward",
    "attention": "gptfast.kernels.attention",
    "linear_cross_entropy": "gptfast.kernels.linear_cross_entropy",
}

# The choices of the enclosing `use_backend` blocks, innermost last. A plain list (not a ContextVar):
# torch.compile can read it and guard on it, so the dispatch never breaks a compiled graph.
_context_stack: list = []


# --------------------------------------------------------------------------------------------------
# Parsing and resolving a backend choice
# --------------------------------------------------------------------------------------------------


def parse_backend(spec, where: str = "backend") -> dict:
    """Normalize a backend choice to ``{op: backend}``; raise ``ValueError`` on unknown names."""
    if spec is None:
        return {}
    if isinstance(spec, str):
        text = spec.strip()
        if "=" in text:
            pairs = {}
            for part in filter(None, (p.strip() for p in text.split(","))):
                op, _, name = part.partition("=")
                pairs[op.strip()] = name.strip()
            spec = pairs
        else:
            _check_backend_name(text, where)
            return {op: text for op in OPS}
    if isinstance(spec, Mapping):
        out = {}
        for op, name in spec.items():
            if op not in OPS:
                raise ValueError(f"{where}: unknown op {op!r}; ops with a backend choice: {', '.join(OPS)}")
            _check_backend_name(name, f"{where}[{op!r}]")
            out[op] = name
        return out
    raise TypeError(f"{where}: expected a backend name or a dict of op -> name, got {type(spec).__name__}")


def _check_backend_name(name, where):
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {name!r}; known backends: {', '.join(BACKENDS)}")


def resolve(op: str, backend=None, backend_source: str = "the call's backend argument") -> tuple[str, str]:
    """The backend name chosen for ``op`` and the rule that chose it (``backend_source`` names where
    ``backend`` came from)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops: {', '.join(OPS)}")
    rules = (
        (backend_source, backend),
        ("gptfast.use_backend", _context_stack[-1] if _context_stack else None),
        (f"${ENV_VAR}", os.environ.get(ENV_VAR) or None),
    )
    for where, spec in rules:
        chosen = parse_backend(spec, where).get(op)
        if chosen is not None:
            return chosen, where
    return "auto", "the default"


@contextlib.contextmanager
def use_backend(spec):
    """Choose backends for the ops called inside the block (unless a call or model names its own).

    The choice holds for the whole process while the block runs (not per thread): it is kept where
    ``torch.compile`` can read it, so the dispatch never breaks a compiled graph.

    >>> import gptfast
    >>> with gptfast.use_backend({"attention": "reference"}):
    ...     gptfast.ops.resolve("attention")
    ('reference', 'gptfast.use_backend')
    """
    parse_backend(spec, "use_backend")
    _context_stack.append(spec)
    try:
        yield
    finally:
        _context_stack.pop()


# --------------------------------------------------------------------------------------------------
# Deciding between reference and kernel
# --------------------------------------------------------------------------------------------------

_kernel_cache: dict = {}


def kernel_module(op: str):
    """The kernel module of ``op``, or None when it has no kernel or triton cannot be imported."""
    if op not in _kernel_cache:
        try:
            _kernel_cache[op] = (importlib.import_module(_KERNEL_MODULES[op]), None)
        except ModuleNotFoundError as e:
            if e.name == _KERNEL_MODULES[op]:
                _kernel_cache[op] = (None, f"no Triton kernel for {op} exists yet")
            elif e.name == "triton" or (e.name or "").startswith("triton."):
                _kernel_cache[op] = (None, f"triton cannot be imported ({e})")
            else:
                raise
        except ImportError as e:
            _kernel_cache[op] = (None, f"triton cannot be imported ({e})")
    return _kernel_cache[op]


def interpreting() -> bool:
    """True when Triton's CPU interpreter is on (``TRITON_INTERPRET=1`` set before triton was imported)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def cuda_arch(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


@dataclass
class Choice:
    op: str
    implementation: str  # "reference" | "triton"
    backend: str  # what was asked for
    rule: str  # which rule asked
    why: str
    arch: int | None = None  # the CUDA arch the kernel targets; None under the interpreter


def choose(op: str, device: torch.device, backend=None, shape_check=None,
           backend_source: str = "the call's backend argument") -> Choice:
    """Decide which implementation of ``op`` runs for inputs on ``device``.

    ``shape_check(module) -> str | None`` asks the kernel whether it supports the inputs.
    """
    name, rule = resolve(op, backend, backend_source)
    if name == "reference":
        return Choice(op, "reference", name, rule, f"{rule} asked for the reference")
    explicit = name == "triton"
    device = torch.device(device)
    if not explicit and device.type != "cuda":  # decided before importing anything: no triton on CPU runs
        return Choice(op, "reference", name, rule, f"auto: the inputs are on the {device.type.upper()}")
    module, missing = kernel_module(op)

    def decline(why, exc=RuntimeError):
        if explicit:
            raise exc(f"{op}: backend 'triton' was asked for by {rule}, but {why}")
        return Choice(op, "reference", name, rule, f"auto: {why}")

    if module is None:
        return decline(missing, NotImplementedError if "no Triton kernel" in missing else RuntimeError)
    if device.type == "cuda":
        arch = cuda_arch(device)
        if arch not in module.SUPPORTED_ARCHS:
            proven = ", ".join(f"sm_{a}" for a in module.SUPPORTED_ARCHS)
            return decline(f"its kernel is not proven on this GPU (sm_{arch}; proven: {proven})")
    elif device.type == "cpu":
        if not interpreting():
            return decline(
                "the inputs are CPU tensors: move them to a CUDA GPU, or set TRITON_INTERPRET=1 before "
                "triton is imported to run the kernel through Triton's (slow) CPU interpreter"
            )
        arch = None
    else:
        return decline(f"Triton kernels run on CUDA tensors, not on {device.type}")
    if shape_check is not None:
        problem = shape_check(module)
        if problem:
            return decline(problem, ValueError)
    where = f"sm_{arch}" if arch is not None else "Triton's CPU interpreter"
    return Choice(op, "triton", name, rule, f"{rule} -> {name}: kernel on {where}", arch)


def describe(target=None) -> str:
    """Which implementation each op uses now, and why: for a model (its own backend, on the device of
    its parameters), or for inputs on a device (default: the GPU if any) under the global rules.

    >>> print(gptfast.describe("cpu"))  # doctest: +SKIP
    layer_norm    reference  auto: the inputs are on the CPU
    ...
    >>> print(gptfast.describe(model.set_backend("reference")))  # doctest: +SKIP
    layer_norm    reference  the model's backend (set_backend) asked for the reference
    """
    backend, source = None, "the call's backend argument"
    if isinstance(target, torch.nn.Module):
        source = "the model's backend (set_backend)"
        backend = getattr(target, "backend", None)
        param = next(target.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    elif target is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = target
    lines = []
    for op in OPS:
        try:
            c = choose(op, torch.device(device), backend, backend_source=source)
            lines.append(f"{op:<20} {c.implementation:<10} {c.why}")
        except (RuntimeError, NotImplementedError, ValueError) as e:
            lines.append(f"{op:<20} {'error':<10} {e}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Input checks and autocast
# --------------------------------------------------------------------------------------------------


def _check_same(op, named):
    (first_name, first), *rest = named
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    for name, t in rest:
        if t.device != first.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; move them to one device"
            )
        if t.dtype != first.dtype:
            raise TypeError(
                f"{op}: {name} is {t.dtype} but {first_name} is {first.dtype}; cast them to one dtype "
                f"(or run under torch.autocast)"
            )


def _autocast(op_kind, device_type, tensors):
    """Cast like torch's autocast would for the matching op; return tensors and a context that disables it."""
    if not torch.is_autocast_enabled(device_type):
        return tensors, contextlib.nullcontext()
    target = torch.float32 if op_kind == "fp32" else torch.get_autocast_dtype(device_type)
    cast = [t.to(target) if (t is not None and t.is_floating_point()) else t for t in tensors]
    return cast, torch.autocast(device_type, enabled=False)


# --------------------------------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------------------------------


def _check_layer_norm(op, x, weight, bias):
    _check_same(op, [("x", x), ("weight", weight), ("bias", bias)])
    width = x.shape[-1] if x.dim() else 0
    for name, t in (("weight", weight), ("bias", bias)):
        if t.shape != (width,):
            raise ValueError(f"{op}: {name} must have shape ({width},) to match x's last dim, got {tuple(t.shape)}")


def layer_norm(x, weight, bias, eps=1e-5, *, backend=None):
    """LayerNorm over the last dimension (biased variance, fp32 statistics in the kernel).

    x: (..., E); weight, bias: (E,). Returns a tensor like x.
    """
    (x, weight, bias), ctx = _autocast("fp32", x.device.type, (x, weight, bias))
    _check_layer_norm("layer_norm", x, weight, bias)
    c = choose("layer_norm", x.device, backend, lambda m: _unsupported(m, "layer_norm", x, weight, bias))
    with ctx:
        if c.implementation == "triton":
            return c_module("layer_norm").layer_norm(x, weight, bias, eps, arch=c.arch)
        return reference.layer_norm(x, weight, bias, eps)


def add_layer_norm(x, branch, weight, bias, eps=1e-5, *, backend=None):
    """The residual step of a pre-LN block: ``s = x + branch``; returns ``(s, layer_norm(s))``.

    x, branch: (..., E); weight, bias: (E,). Uses the ``layer_norm`` backend choice.
    """
    (x, branch, weight, bias), ctx = _autocast("fp32", x.device.type, (x, branch, weight, bias))
    _check_layer_norm("add_layer_norm", x, weight, bias)
    _check_same("add_layer_norm", [("x", x), ("branch", branch)])
    if branch.shape != x.shape:
        raise ValueError(f"add_layer_norm: branch has shape {tuple(branch.shape)} but x has {tuple(x.shape)}")
    c = choose("layer_norm", x.device, backend, lambda m: _unsupported(m, "add_layer_norm", x, weight, bias))
    with ctx:
        if c.implementation == "triton":
            return c_module("layer_norm").add_layer_norm(x, branch, weight, bias, eps, arch=c.arch)
        return reference.add_layer_norm(x, branch, weight, bias, eps)


def feed_forward(x, fc_weight, fc_bias, proj_weight, proj_bias, *, backend=None):
    """Linear E->H, tanh-GELU, Linear H->E, weights in ``nn.Linear`` layout (H is 4E in GPT-2).

    x: (..., E); fc_weight: (H, E); fc_bias: (H,) or None; proj_weight: (E, H); proj_bias: (E,) or None.
    """
    (x, fc_weight, fc_bias, proj_weight, proj_bias), ctx = _autocast(
        "low", x.device.type, (x, fc_weight, fc_bias, proj_weight, proj_bias)
    )
    named = [("x", x), ("fc_weight", fc_weight), ("proj_weight", proj_weight)]
    named += [(n, t) for n, t in (("fc_bias", fc_bias), ("proj_bias", proj_bias)) if t is not None]
    _check_same("feed_forward", named)
    e = x.shape[-1]
    if fc_weight.dim() != 2 or fc_weight.shape[1] != e:
        raise ValueError(f"feed_forward: fc_weight must be (hidden, {e}) for x of width {e}, got {tuple(fc_weight.shape)}")
    h = fc_weight.shape[0]
    if proj_weight.shape != (e, h):
        raise ValueError(f"feed_forward: proj_weight must be ({e}, {h}), got {tuple(proj_weight.shape)}")
    for name, t, n in (("fc_bias", fc_bias, h), ("proj_bias", proj_bias, e)):
        if t is not None and t.shape != (n,):
            raise ValueError(f"feed_forward: {name} must be ({n},), got {tuple(t.shape)}")
    c = choose(
        "feed_forward", x.device, backend,
        lambda m: _unsupported(m, "feed_forward", x, fc_weight, fc_bias, proj_weight, proj_bias),
    )
    with ctx:
        if c.implementation == "triton":
            return c_module("feed_forward").feed_forward(x, fc_weight, fc_bias, proj_weight, proj_bias, arch=c.arch)
        return reference.feed_forward(x, fc_weight, fc_bias, proj_weight, proj_bias)


def causal_attention(q, k, v, *, dropout_p=0.0, softmax_scale=None, cache_seqlens=None, return_weights=False,
                     backend=None):
    """Causal multi-head attention on ``(B, H, T, D)`` tensors.

    q: (B, H, Tq, D); k, v: (B, H, Tk, D). Without ``cache_seqlens``, Tq == Tk and query i sees keys
    0..i. With ``cache_seqlens`` (B,) integer tensor, k/v hold a KV cache and query i of row b sits at
    position ``cache_seqlens[b] + i`` (rows may differ). ``softmax_scale`` defaults to 1/sqrt(D);
    ``dropout_p`` drops attention weights using torch's default generator, so ``torch.manual_seed``
    reproduces it. ``return_weights=True`` also returns the (B, H, Tq, Tk) weights -- the reference
    alone computes them, so it is chosen under "auto" and an explicit "triton" raises.
    """
    (q, k, v), ctx = _autocast("low", q.device.type, (q, k, v))
    _check_same("causal_attention", [("q", q), ("k", k), ("v", v)])
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("causal_attention: q, k and v must be 4-D (batch, heads, tokens, head_dim)")
    if k.shape != v.shape:
        raise ValueError(f"causal_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    b, h, t_q, d = q.shape
    if k.shape[0] != b or k.shape[1] != h or k.shape[3] != d:
        raise ValueError(f"causal_attention: k/v {tuple(k.shape)} do not match q {tuple(q.shape)} in batch, heads or head_dim")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"causal_attention: dropout_p must be in [0, 1), got {dropout_p}")
    if softmax_scale is not None and not 0.0 < float(softmax_scale) < math.inf:
        # masked scores are -inf: a scale of 0 or below turns them into NaN or into the largest score
        raise ValueError(f"causal_attention: softmax_scale must be a positive number, got {softmax_scale}")
    if cache_seqlens is None:
        if k.shape[2] != t_q:
            raise ValueError(
                f"causal_attention: q has {t_q} tokens but k/v have {k.shape[2]}; pass cache_seqlens for a KV cache"
            )
    else:
        if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.is_floating_point() or cache_seqlens.shape != (b,):
            raise ValueError(f"causal_attention: cache_seqlens must be an integer tensor of shape ({b},)")
        if cache_seqlens.device != q.device:
            raise ValueError(f"causal_attention: cache_seqlens is on {cache_seqlens.device} but q is on {q.device}")
    if return_weights:
        name, rule = resolve("attention", backend)
        if name == "triton":
            raise ValueError(
                f"causal_attention: return_weights=True needs the reference backend (the kernel never forms the "
                f"attention matrix), but {rule} asked for 'triton'"
            )
        with ctx:
            return reference.causal_attention(q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale,
                                              cache_seqlens=cache_seqlens, return_weights=True)
    c = choose("attention", q.device, backend, lambda m: _unsupported(m, "causal_attention", q, k, v))
    with ctx:
        if c.implementation == "triton":
            return c_module("attention").causal_attention(
                q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, cache_seqlens=cache_seqlens, arch=c.arch
            )
        return reference.causal_attention(q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale,
                                          cache_seqlens=cache_seqlens)


def c_module(op):
    return kernel_module(op)[0]


def _unsupported(module, fn_name, *args):
    check = getattr(module, "unsupported_reason", None)
    return check(fn_name, *args) if check is not None else None


def linear_cross_entropy(x, weight, targets, *, bias=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, z_loss=0.0, backend=None):
    """``F.cross_entropy(x @ weight.T + bias, targets)`` without materializing the (rows, vocab) logits.

    x: (..., E); weight: (V, E) (an output head in ``nn.Linear`` layout); bias: (V,) or None;
    targets: (...) integer class ids matching x's leading dims. ``ignore_index``, ``reduction``
    (``"mean"`` over the rows not ignored -- NaN when every row is --, ``"sum"``, ``"none"``) and
    ``label_smoothing`` mean what they mean in ``F.cross_entropy``; ``z_loss`` adds
    ``z_loss * logsumexp(logits)^2`` to each row's loss (PaLM's auxiliary loss), reduced the same way.

    Returns a float32 tensor (float64 for float64 inputs): a scalar, or the per-row losses of shape
    ``targets.shape`` (0 on ignored rows) for ``reduction="none"``. Gradients flow to x, weight and
    bias. The logits are computed in the inputs' dtype and the softmax statistics in float32.
    """
    (x, weight, bias), ctx = _autocast("low", x.device.type, (x, weight, bias))
    named = [("x", x), ("weight", weight)] + ([("bias", bias)] if bias is not None else [])
    _check_same("linear_cross_entropy", named)
    if x.dim() < 1 or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"linear_cross_entropy: weight must be (vocab, {x.shape[-1] if x.dim() else '?'}) for x "
                         f"of shape {tuple(x.shape)}, got {tuple(weight.shape)}")
    vocab = weight.shape[0]
    if bias is not None and bias.shape != (vocab,):
        raise ValueError(f"linear_cross_entropy: bias must be ({vocab},), got {tuple(bias.shape)}")
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.is_complex():
        raise TypeError("linear_cross_entropy: targets must be an integer tensor of class ids")
    if targets.shape != x.shape[:-1]:
        raise ValueError(f"linear_cross_entropy: targets have shape {tuple(targets.shape)} but x's leading dims are "
                         f"{tuple(x.shape[:-1])}")
    if targets.device != x.device:
        raise ValueError(f"linear_cross_entropy: targets are on {targets.device} but x is on {x.device}")
    if reduction not in reference.LOSS_REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {', '.join(reference.LOSS_REDUCTIONS)}, "
                         f"got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"linear_cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    if float(z_loss) < 0.0:
        raise ValueError(f"linear_cross_entropy: z_loss must be >= 0, got {z_loss}")
    shape = targets.shape
    rows, targets = x.reshape(-1, x.shape[-1]), targets.reshape(-1).long()  # (N, E), (N,)
    if not torch.compiler.is_compiling() and targets.numel():
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
        if targets.device.type != "cpu":  # checked on the device, as F.cross_entropy does: no sync per step
            torch._assert_async(~bad.any(), f"linear_cross_entropy: a target is outside 0..{vocab - 1} "
                                            f"and is not ignore_index ({ignore_index})")
        elif bad.any():
            raise ValueError(f"linear_cross_entropy: a target is outside 0..{vocab - 1} and is not ignore_index "
                             f"({ignore_index}), e.g. {targets[bad][0].item()}")
    c = choose("linear_cross_entropy", x.device, backend,
               lambda m: _unsupported(m, "linear_cross_entropy", rows, weight, bias))
    options = dict(bias=bias, ignore_index=int(ignore_index), reduction=reduction,
                   label_smoothing=float(label_smoothing), z_loss=float(z_loss))
    with ctx:
        if c.implementation == "triton":
            out = c_module("linear_cross_entropy").linear_cross_entropy(rows, weight, targets, **options, arch=c.arch)
        else:
            out = reference.linear_cross_entropy(rows, weight, targets, **options)
    return out.view(shape) if reduction == "none" else out
