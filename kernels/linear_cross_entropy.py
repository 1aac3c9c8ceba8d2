"""The output head and its cross-entropy loss, blockwise: the (rows, vocab) logits never exist.

With x: (N, E) rows, W: (V, E) the head's weight (``nn.Linear`` layout), b: (V,) and targets t: (N,),
the logits z = x W^T + b are computed a (BLOCK_M, BLOCK_V) tile at a time and thrown away.

forward (one program per block of rows, walking the vocabulary tile by tile)
    m_i   = running max of z_i.         l_i = running sum of exp(z_ij - m_i)   (online log-sum-exp)
    z_it  = the target's logit, picked up in the tile that holds it; s_i = sum_j z_ij (label smoothing)
    lse_i = m_i + log l_i               saved: one float per row
    loss_i = lse_i - (1 - eps) z_it - (eps / V) s_i + z_loss lse_i^2      (0 where t_i is ignored)

backward, with g_i the upstream gradient of row i (0 on ignored rows), per recomputed tile
    p_ij  = exp(z_ij - lse_i)
    dz_ij = (1 + 2 z_loss lse_i) p_ij - (1 - eps) [j = t_i] - eps / V    (times g_i)
    dx = dz W     one program per block of rows, over every vocab tile: it alone writes those rows
    dW = dz^T x   one program per block of vocab, over every row tile: it alone writes those rows of dW
    db = sum_rows dz, in the dW program

so no atomics and a fixed summation order: the results are deterministic. Both backward kernels
recompute the logits (three GEMMs' worth of logits in all, against one for the book's loss, which
instead keeps N x V floats). dx and dW are summed in fp32 buffers; g_i is applied to the fp32 dot
of a row (dx) or folded into x's rows (dW), so a small 1/N never underflows 16-bit dz.
Order in this file: kernels -> configs -> launchers -> custom ops -> autograd -> the public function.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._compat import wrap_triton

# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _logits_tile(
    X,  # (N, E) rows, read through stride_xn / stride_xe
    W,  # (V, E) weight, read through stride_wv / stride_we
    BIAS,  # (V,) bias, when HAS_BIAS
    offs_m, offs_v,  # (BLOCK_M,), (BLOCK_V,) int64 row and vocab indices
    m_ok, v_ok,  # their masks
    E, stride_xn, stride_xe, stride_wv, stride_we,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
):
    """z = x[offs_m] W[offs_v]^T + b[offs_v]: a (BLOCK_M, BLOCK_V) fp32 tile of the logits.

    When ``EVEN_K`` (``BLOCK_K`` divides E) no step tests the columns: the row and vocab masks are the
    same on every step, so the loop is a plain GEMM's."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, E, BLOCK_K):
        x_ptrs = X + offs_m[:, None] * stride_xn + (k0 + offs_k)[None, :] * stride_xe
        w_ptrs = W + offs_v[None, :] * stride_wv + (k0 + offs_k)[:, None] * stride_we
        if EVEN_K:
            x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)  # (BLOCK_M, BLOCK_K)
            w = tl.load(w_ptrs, mask=v_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_V) = W^T's tile
        else:
            k_ok = (k0 + offs_k) < E
            x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & v_ok[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_v, mask=v_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _dlogits_tile(z, lse, target, offs_v, v_ok, V, label_smoothing, z_loss):
    """dz / g for one tile: (1 + 2 z_loss lse) softmax - (1 - eps) one_hot - eps / V; 0 past the vocab."""
    p = tl.exp(z - lse[:, None])  # (BLOCK_M, BLOCK_V) softmax, from the saved lse
    dz = p * (1.0 + 2.0 * z_loss * lse)[:, None] - label_smoothing / V
    dz = tl.where(offs_v[None, :] == target[:, None], dz - (1.0 - label_smoothing), dz)
    return tl.where(v_ok[None, :], dz, 0.0)


@triton.jit
def _lce_fwd_kernel(
    X, W, BIAS,  # (N, E), (V, E), (V,) as in _logits_tile
    TARGETS,  # (N,) int64 class ids
    LOSS,  # (N,) fp32 out: each row's loss, 0 on ignored rows
    LSE,  # (N,) fp32 out: each row's log-sum-exp, for backward
    N, V, E, stride_xn, stride_xe, stride_wv, stride_we,
    ignore_index, label_smoothing, z_loss,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
):
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,)
    m_ok = offs_m < N
    target = tl.load(TARGETS + offs_m, mask=m_ok, other=ignore_index)  # (BLOCK_M,)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running max
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running sum of exp(z - m_i)
    z_target = tl.zeros((BLOCK_M,), dtype=tl.float32)
    z_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)  # (BLOCK_V,)
        v_ok = offs_v < V
        z = _logits_tile(X, W, BIAS, offs_m, offs_v, m_ok, v_ok, E, stride_xn, stride_xe, stride_wv, stride_we,
                         HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION, EVEN_K)
        z = tl.where(v_ok[None, :], z, float("-inf"))  # columns past the vocab add exp(-inf) = 0
        # online log-sum-exp: rescale the old sum to the new max, add this tile
        m_new = tl.maximum(m_i, tl.max(z, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
        m_i = m_new
        z_target += tl.sum(tl.where(offs_v[None, :] == target[:, None], z, 0.0), 1)
        z_sum += tl.sum(tl.where(v_ok[None, :], z, 0.0), 1)
    lse = m_i + tl.log(l_i)
    loss = lse - (1.0 - label_smoothing) * z_target - (label_smoothing / V) * z_sum + z_loss * lse * lse
    loss = tl.where(target != ignore_index, loss, 0.0)
    tl.store(LOSS + offs_m, loss, mask=m_ok)
    tl.store(LSE + offs_m, lse, mask=m_ok)


@triton.jit
def _lce_dx_kernel(
    X, W, BIAS, TARGETS,  # as in the forward
    LSE,  # (N,) fp32 saved log-sum-exp
    SCALE,  # (N,) fp32 each row's upstream gradient, 0 on ignored rows
    DX,  # (N, E) fp32 out, zero-filled, contiguous: this program alone adds to its rows
    N, V, E, stride_xn, stride_xe, stride_wv, stride_we,
    label_smoothing, z_loss,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
):
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_ok = offs_m < N
    target = tl.load(TARGETS + offs_m, mask=m_ok, other=-1)
    lse = tl.load(LSE + offs_m, mask=m_ok, other=0.0)
    scale = tl.load(SCALE + offs_m, mask=m_ok, other=0.0)
    offs_k = tl.arange(0, BLOCK_K)
    for v0 in range(0, V, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        v_ok = offs_v < V
        z = _logits_tile(X, W, BIAS, offs_m, offs_v, m_ok, v_ok, E, stride_xn, stride_xe, stride_wv, stride_we,
                         HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION, EVEN_K)
        dz = _dlogits_tile(z, lse, target, offs_v, v_ok, V, label_smoothing, z_loss)  # (BLOCK_M, BLOCK_V)
        for k0 in range(0, E, BLOCK_K):  # dx[:, k] += g * (dz @ W[:, k])
            k_ok = (k0 + offs_k) < E
            w = tl.load(W + offs_v[:, None] * stride_wv + (k0 + offs_k)[None, :] * stride_we,
                        mask=v_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_V, BLOCK_K)
            part = tl.dot(dz.to(w.dtype), w, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_K)
            dx_ptrs = DX + offs_m[:, None] * E + (k0 + offs_k)[None, :]
            dx_mask = m_ok[:, None] & k_ok[None, :]
            acc = tl.load(dx_ptrs, mask=dx_mask, other=0.0)
            tl.store(dx_ptrs, acc + scale[:, None] * part, mask=dx_mask)


@triton.jit
def _lce_dw_kernel(
    X, W, BIAS, TARGETS, LSE, SCALE,  # as in _lce_dx_kernel
    DW,  # (V, E) fp32 out, zero-filled, contiguous: this program alone adds to its rows
    DB,  # (V,) fp32 out: the bias gradient of this program's vocab rows
    N, V, E, stride_xn, stride_xe, stride_wv, stride_we,
    label_smoothing, z_loss,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
):
    offs_v = (tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    v_ok = offs_v < V
    offs_k = tl.arange(0, BLOCK_K)
    db = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for m0 in range(0, N, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        m_ok = offs_m < N
        target = tl.load(TARGETS + offs_m, mask=m_ok, other=-1)
        lse = tl.load(LSE + offs_m, mask=m_ok, other=0.0)
        scale = tl.load(SCALE + offs_m, mask=m_ok, other=0.0)
        z = _logits_tile(X, W, BIAS, offs_m, offs_v, m_ok, v_ok, E, stride_xn, stride_xe, stride_wv, stride_we,
                         HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION, EVEN_K)
        dz = _dlogits_tile(z, lse, target, offs_v, v_ok, V, label_smoothing, z_loss)  # (BLOCK_M, BLOCK_V)
        db += tl.sum(dz * scale[:, None], 0)
        dz_t = tl.trans(dz)  # (BLOCK_V, BLOCK_M)
        for k0 in range(0, E, BLOCK_K):  # dW[:, k] += dz^T @ (g * x[:, k])
            k_ok = (k0 + offs_k) < E
            x = tl.load(X + offs_m[:, None] * stride_xn + (k0 + offs_k)[None, :] * stride_xe,
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
            xs = (x.to(tl.float32) * scale[:, None]).to(x.dtype)
            part = tl.dot(dz_t.to(x.dtype), xs, input_precision=DOT_PRECISION)  # (BLOCK_V, BLOCK_K)
            dw_ptrs = DW + offs_v[:, None] * E + (k0 + offs_k)[None, :]
            dw_mask = v_ok[:, None] & k_ok[None, :]
            acc = tl.load(dw_ptrs, mask=dw_mask, other=0.0)
            tl.store(dw_ptrs, acc + part, mask=dw_mask)
    tl.store(DB + offs_v, db, mask=v_ok)


# --------------------------------------------------------------------------------------------------
# Configs (per arch; one fixed config under the interpreter, where autotuning cannot run)
# --------------------------------------------------------------------------------------------------

SUPPORTED_ARCHS = (80, 86, 89, 90, 120)

_INTERPRETER_CONFIG = {"BLOCK_M": 64, "BLOCK_V": 128, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}
_CONFIGS_16 = {
    80: {"BLOCK_M": 64, "BLOCK_V": 128, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},
    90: {"BLOCK_M": 64, "BLOCK_V": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    86: {"BLOCK_M": 64, "BLOCK_V": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2},
}
# fp32 (exact, input_precision="ieee"): 8 warps over small tiles, so the dW kernel's dz and its
# transpose fit in registers without spilling (bench.resources: 32 x 64 x 32 spilled on sm_80/86/89/120,
# and 32 x 32 x 32 spills dW on sm_120)
_CONFIGS_32 = {
    80: {"BLOCK_M": 32, "BLOCK_V": 32, "BLOCK_K": 32, "num_warps": 8, "num_stages": 2},
    90: {"BLOCK_M": 32, "BLOCK_V": 32, "BLOCK_K": 32, "num_warps": 8, "num_stages": 2},
    86: {"BLOCK_M": 32, "BLOCK_V": 32, "BLOCK_K": 32, "num_warps": 8, "num_stages": 2},
    120: {"BLOCK_M": 32, "BLOCK_V": 64, "BLOCK_K": 16, "num_warps": 8, "num_stages": 2},
}
_ARCH_FAMILY = {80: 80, 86: 86, 89: 86, 90: 90, 120: 120}
# sm_120: sm_86's tiles with a third stage; with two, the dx kernel for an E that BLOCK_K does not
# divide spilled 16 bytes (bench.resources), and three fit its shared memory at the same blocks per SM
_CONFIGS_16[120] = dict(_CONFIGS_16[86], num_stages=3)
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def configs(arch, dtype):
    """The configs a launch on ``arch`` may use (``arch=None``: the interpreter's)."""
    if arch is None:
        return [dict(_INTERPRETER_CONFIG)]
    if arch not in _ARCH_FAMILY:
        return []
    table = _CONFIGS_32 if dtype == torch.float32 else _CONFIGS_16
    return [dict(table[_ARCH_FAMILY[arch]])]


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


_KERNELS = (("forward: loss, lse", _lce_fwd_kernel), ("backward: dx", _lce_dx_kernel),
            ("backward: dW, db", _lce_dw_kernel))


def resource_specs(arch, dtype):
    """Every (kernel, config) the dispatcher can launch on ``arch`` in ``dtype``, for ``bench.resources``."""
    t = _DTYPES[dtype]
    specs = []
    for cfg, even_k in ((c, e) for c in configs(arch, dtype) for e in (True, False)):
        for label, kernel in _KERNELS:
            ptrs = {"X": f"*{t}", "W": f"*{t}", "BIAS": f"*{t}", "TARGETS": "*i64"}
            if kernel is _lce_fwd_kernel:
                ptrs.update(LOSS="*fp32", LSE="*fp32")
            else:
                ptrs.update(LSE="*fp32", SCALE="*fp32")
                ptrs.update({"DX": "*fp32"} if kernel is _lce_dx_kernel else {"DW": "*fp32", "DB": "*fp32"})
            # x and W are row-major as they launch (the model's hidden states and its output head), so
            # Triton's binder makes their feature strides the constant 1
            scalars = {n: "i32" for n in ("N", "V", "E", "stride_xn", "stride_wv")}
            scalars.update(stride_xe="constexpr", stride_we="constexpr")
            if kernel is _lce_fwd_kernel:
                scalars["ignore_index"] = "i32"
            scalars.update(label_smoothing="fp32", z_loss="fp32")
            consts = {"HAS_BIAS": True, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_V": cfg["BLOCK_V"],
                      "BLOCK_K": cfg["BLOCK_K"], "DOT_PRECISION": _precision(dtype), "EVEN_K": even_k}
            signature = {**ptrs, **scalars, **{k: "constexpr" for k in consts}}
            consts.update(stride_xe=1, stride_we=1)
            specs.append({
                "kernel": kernel,
                "signature": {name: signature[name] for name in kernel.arg_names},  # in the kernel's order
                "constexprs": consts,
                "num_warps": cfg["num_warps"],
                "num_stages": cfg["num_stages"],
                "label": f"{label} {cfg['BLOCK_M']}x{cfg['BLOCK_V']}x{cfg['BLOCK_K']}" + ("" if even_k else " (E uneven)"),
            })
    return specs


def unsupported_reason(fn_name, x, weight, bias=None):
    """Why the kernel cannot take these inputs, or None if it can."""
    if x.dtype not in _DTYPES:
        return f"{fn_name}: the Triton kernel takes float32, float16 or bfloat16 inputs, not {x.dtype}"
    if x.numel() == 0 or weight.numel() == 0:
        return f"{fn_name}: empty input; use backend='reference'"
    if max(x.shape[0], weight.shape[0], x.shape[1]) >= 2 ** 31:
        return f"{fn_name}: more than 2^31 rows, tokens or features"
    return None


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _common(x, weight, arch):
    cfg = configs(arch, x.dtype)[0]
    blocks = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_V", "BLOCK_K")}
    return cfg, dict(**blocks, DOT_PRECISION=_precision(x.dtype), EVEN_K=x.shape[1] % cfg["BLOCK_K"] == 0,
                     num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _forward(x, weight, bias, targets, ignore_index, label_smoothing, z_loss, arch):
    """(N,) losses and (N,) lse, both fp32."""
    n, e = x.shape
    v = weight.shape[0]
    cfg, launch = _common(x, weight, arch)
    loss = torch.empty(n, device=x.device, dtype=torch.float32)
    lse = torch.empty(n, device=x.device, dtype=torch.float32)
    wrap_triton(_lce_fwd_kernel)[(triton.cdiv(n, cfg["BLOCK_M"]),)](
        x, weight, bias if bias is not None else weight, targets, loss, lse,
        n, v, e, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        ignore_index, label_smoothing, z_loss, HAS_BIAS=bias is not None, **launch,
    )
    return loss, lse


def _backward(scale, x, weight, bias, targets, lse, label_smoothing, z_loss, arch):
    """dx (N, E), dW (V, E), db (V,), in fp32."""
    n, e = x.shape
    v = weight.shape[0]
    cfg, launch = _common(x, weight, arch)
    dx = torch.zeros((n, e), device=x.device, dtype=torch.float32)
    dw = torch.zeros((v, e), device=x.device, dtype=torch.float32)
    db = torch.empty(v, device=x.device, dtype=torch.float32)
    args = (x, weight, bias if bias is not None else weight, targets, lse, scale)
    sizes = (n, v, e, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), label_smoothing, z_loss)
    wrap_triton(_lce_dx_kernel)[(triton.cdiv(n, cfg["BLOCK_M"]),)](
        *args, dx, *sizes, HAS_BIAS=bias is not None, **launch)
    wrap_triton(_lce_dw_kernel)[(triton.cdiv(v, cfg["BLOCK_V"]),)](
        *args, dw, db, *sizes, HAS_BIAS=bias is not None, **launch)
    return dx, dw, db


# --------------------------------------------------------------------------------------------------
# Custom ops (torch.library.triton_op: torch.compile keeps them whole and sees the kernels inside)
# --------------------------------------------------------------------------------------------------


@torch.library.triton_op("gptfast::linear_cross_entropy_fwd", mutates_args=())
def _lce_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                ignore_index: int, label_smoothing: float, z_loss: float, arch: Optional[int]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (N, E), weight: (V, E), targets: (N,) -> losses (N,), lse (N,), fp32."""
    return _forward(x, weight, bias, targets, ignore_index, label_smoothing, z_loss, arch)


@torch.library.triton_op("gptfast::linear_cross_entropy_bwd", mutates_args=())
def _lce_bwd_op(scale: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                targets: torch.Tensor, lse: torch.Tensor, label_smoothing: float, z_loss: float,
                arch: Optional[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scale: (N,) upstream gradients -> dx (N, E), dW (V, E), db (V,), fp32."""
    return _backward(scale, x, weight, bias, targets, lse, label_smoothing, z_loss, arch)


@_lce_fwd_op.register_fake
def _(x, weight, bias, targets, ignore_index, label_smoothing, z_loss, arch):
    n = x.shape[0]
    return x.new_empty(n, dtype=torch.float32), x.new_empty(n, dtype=torch.float32)


@_lce_bwd_op.register_fake
def _(scale, x, weight, bias, targets, lse, label_smoothing, z_loss, arch):
    f32 = torch.float32
    return (x.new_empty(x.shape, dtype=f32), x.new_empty(weight.shape, dtype=f32),
            x.new_empty((weight.shape[0],), dtype=f32))


# --------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-row losses of cross_entropy(x W^T + b, t); saves x, W, b, t and the (N,) lse."""

    @staticmethod
    def forward(ctx, x, weight, bias, targets, ignore_index, label_smoothing, z_loss, arch):
        losses, lse = torch.ops.gptfast.linear_cross_entropy_fwd(
            x, weight, bias, targets, ignore_index, label_smoothing, z_loss, arch)
        ctx.save_for_backward(x, weight, bias, targets, lse)
        ctx.options = (ignore_index, label_smoothing, z_loss, arch)
        return losses

    @staticmethod
    def backward(ctx, d_losses):
        x, weight, bias, targets, lse = ctx.saved_tensors
        ignore_index, label_smoothing, z_loss, arch = ctx.options
        # d_losses may arrive expanded (stride 0) from a sum or a mean: made contiguous, 0 on ignored rows
        scale = torch.where(targets != ignore_index, d_losses.float(), 0.0).contiguous()  # (N,)
        dx, dw, db = torch.ops.gptfast.linear_cross_entropy_bwd(
            scale, x, weight, bias, targets, lse, label_smoothing, z_loss, arch)
        return (dx.to(x.dtype), dw.to(weight.dtype), None if bias is None else db.to(bias.dtype),
                None, None, None, None, None)


# --------------------------------------------------------------------------------------------------
# Public function (the signature of gptfast.reference.linear_cross_entropy, plus `arch`)
# --------------------------------------------------------------------------------------------------


def linear_cross_entropy(x, weight, targets, *, bias=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, z_loss=0.0, arch=None):
    """``F.cross_entropy(x @ weight.T + bias, targets)`` plus the z-loss, blockwise on the GPU.

    x: (N, E), any strides; weight: (V, E); bias: (V,) or None; targets: (N,) integers. Returns a
    float32 scalar (``"mean"`` over the rows not ignored, NaN if all are; ``"sum"``) or the (N,)
    losses (``"none"``, 0 on ignored rows). ``arch``: the CUDA arch whose config to use; None runs
    Triton's CPU interpreter with its fixed config.
    """
    problem = unsupported_reason("linear_cross_entropy", x, weight, bias)
    if problem:
        raise ValueError(problem)
    targets = targets.contiguous().long()
    losses = _LinearCrossEntropy.apply(x, weight, bias, targets, int(ignore_index), float(label_smoothing),
                                       float(z_loss), arch)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (targets != ignore_index).sum()
