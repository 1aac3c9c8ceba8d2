"""LayerNorm over the last dimension in Triton: forward, backward, and the fused residual add.

What runs:

* ``_layer_norm_fwd_kernel``: a tile of ``ROWS`` whole rows per program. Each row is read once, its
  mean and biased variance are taken in fp32, and ``y = (x - mean) * rstd * w + b`` is written in the
  input's dtype, with ``mean`` and ``rstd`` (fp32, one per row) kept for the backward. With
  ``HAS_RES`` it first forms the residual stream ``s = x + branch`` (written out too) and normalizes s.
* ``_layer_norm_bwd_kernel``: persistent programs. Program ``p`` walks the row tiles
  ``p, p + G, p + 2G, ...``: it writes ``dx`` for each row and adds the row's ``dy * xhat`` and ``dy``
  into fp32 accumulators held in registers; at the end it stores one partial row of dweight and of
  dbias. One ``sum`` over the ``G`` partial rows gives dweight and dbias. No atomics and no locks, and
  every program adds its rows in a fixed order, so the gradients are the same bits on every run (on
  one GPU model: ``G`` follows the number of SMs).

The math and the tiling are taught in ``docs/kernels/layer_norm.md``.

Layout of this file: kernels -> configs and resource specs -> launchers -> torch custom ops
(``gptfast::layer_norm_fwd``, ``gptfast::add_layer_norm_fwd``, ``gptfast::layer_norm_bwd``, made with
``torch.library.triton_op`` so ``torch.compile`` sees the Triton kernels inside them) -> thin
``autograd.Function``s -> the public functions ``layer_norm`` and ``add_layer_norm``.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ._compat import wrap_triton

# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # pointer to the input x: (M, N), rows `stride_x_row` elements apart, unit column stride
    BRANCH,  # pointer to the branch added to x (read only when HAS_RES): (M, N), rows `stride_branch_row` apart
    S,  # pointer to the residual stream s = x + branch (written only when HAS_RES): (M, N) contiguous
    Y,  # pointer to the output y = layer_norm(s or x): (M, N) contiguous
    W,  # pointer to the weight (the book's `scale`): (N,)
    B,  # pointer to the bias (the book's `shift`): (N,)
    MEAN,  # pointer to the per-row mean, fp32: (M,)
    RSTD,  # pointer to the per-row 1 / sqrt(var + eps), fp32: (M,)
    stride_x_row,  # elements between two rows of x
    stride_branch_row,  # elements between two rows of branch
    M,  # number of rows
    N,  # width of a row (the normalized dimension)
    eps,  # added to the variance
    ROWS: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # power of two >= N: a whole row lives in registers
    HAS_RES: tl.constexpr,  # fuse s = x + branch before the norm
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)  # (ROWS,)
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]  # (ROWS, BLOCK_N)
    rows64 = rows.to(tl.int64)  # M * stride can pass 2^31
    x = tl.load(X + rows64[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        # the residual stream is stored in the input dtype, and the norm sees exactly what is stored
        branch = tl.load(BRANCH + rows64[:, None] * stride_branch_row + cols[None, :], mask=mask, other=0.0)
        s = (x + branch.to(tl.float32)).to(S.dtype.element_ty)
        tl.store(S + rows64[:, None] * N + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)
    # statistics in fp32, variance from the centred values (two passes over registers, no cancellation)
    mean = tl.sum(x, axis=1) / N  # (ROWS,)
    xc = tl.where(mask, x - mean[:, None], 0.0)  # (ROWS, BLOCK_N), zero outside the row
    var = tl.sum(xc * xc, axis=1) / N  # (ROWS,), biased: divides by N as GPT-2 does
    rstd = 1.0 / tl.sqrt_rn(var + eps)  # (ROWS,), correctly rounded: one per row, so it costs nothing
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)  # (BLOCK_N,)
    b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]  # (ROWS, BLOCK_N)
    tl.store(Y + rows64[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


# The backward, for one row of width N (xhat = (x - mean) * rstd, y = w * xhat + b, dy = dL/dy):
#
#   dL/db      = sum over rows of dy
#   dL/dw      = sum over rows of dy * xhat
#   dL/dxhat   = w * dy                                    (call it wdy)
#   dL/dx      = rstd * (wdy - mean_j(wdy) - xhat * mean_j(wdy * xhat))
#
# The last line comes from d xhat_i / d x_j = rstd * (delta_ij - 1/N - xhat_i xhat_j / N): the mean
# term removes the part of wdy shared by every column, the variance term the part along xhat.
# With the fused residual (s = x + branch feeds both the next block and the norm), the gradient of
# s is the stream's own gradient ds plus the norm's dL/ds, and x and branch both receive that sum.
@triton.jit
def _layer_norm_bwd_kernel(
    DY,  # pointer to dL/dy: (M, N), rows `stride_dy_row` apart, unit column stride
    X,  # pointer to the normalized input (x, or s for the fused residual): (M, N), rows `stride_x_row` apart
    W,  # pointer to the weight: (N,)
    MEAN,  # pointer to the per-row mean saved by the forward, fp32: (M,)
    RSTD,  # pointer to the per-row rstd saved by the forward, fp32: (M,)
    DRES,  # pointer to ds, the residual stream's own gradient (read only when HAS_DRES): rows `stride_dres_row` apart
    DX,  # pointer to dL/dx (dL/ds in total when HAS_DRES): (M, N) contiguous
    PARTIAL_DW,  # pointer to one fp32 partial dweight row per program: (G, N)
    PARTIAL_DB,  # pointer to one fp32 partial dbias row per program: (G, N)
    stride_dy_row,  # elements between two rows of dy
    stride_x_row,  # elements between two rows of x
    stride_dres_row,  # elements between two rows of ds
    M,  # number of rows
    N,  # width of a row
    ROWS: tl.constexpr,  # rows per step of the loop
    BLOCK_N: tl.constexpr,  # power of two >= N
    HAS_DRES: tl.constexpr,  # add ds (fused residual) to dx
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)  # G
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)  # (BLOCK_N,), read once
    dw_acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)  # this program's share of dL/dw
    db_acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)  # this program's share of dL/db
    for start in range(pid * ROWS, M, num_programs * ROWS):
        rows = start + tl.arange(0, ROWS)  # (ROWS,)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]  # (ROWS, BLOCK_N)
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * stride_dy_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)  # (ROWS,)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)  # (ROWS,)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)  # (ROWS, BLOCK_N)
        wdy = w[None, :] * dy  # dL/dxhat, zero outside the row
        c_xhat = tl.sum(xhat * wdy, axis=1) / N  # (ROWS,), mean_j(wdy * xhat)
        c_mean = tl.sum(wdy, axis=1) / N  # (ROWS,), mean_j(wdy)
        dx = (wdy - (xhat * c_xhat[:, None] + c_mean[:, None])) * rstd[:, None]
        if HAS_DRES:
            dx += tl.load(DRES + rows64[:, None] * stride_dres_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += dy * xhat
        db_acc += dy
    # one partial row per program; the launcher sums the G rows (a fixed order: deterministic)
    tl.store(PARTIAL_DW + pid * N + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
    tl.store(PARTIAL_DB + pid * N + cols, tl.sum(db_acc, axis=0), mask=col_ok)


@triton.jit
def _layer_norm_dwdb_kernel(
    PARTIAL_DW,  # (G, N) fp32: one partial dweight row per backward program
    PARTIAL_DB,  # (G, N) fp32: one partial dbias row per backward program
    DW,  # (N,) out, in the weight's dtype
    DB,  # (N,) out, in the weight's dtype
    G,  # number of partial rows
    N,  # width
    BLOCK_G: tl.constexpr,  # partial rows per step
    BLOCK_C: tl.constexpr,  # columns per program
):
    # dweight and dbias from the backward's partial rows: summed in fp32, always in the same order
    # (BLOCK_G rows a step, steps in row order), then cast -- one launch instead of two sums and two casts
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    col_ok = cols < N
    dw = tl.zeros((BLOCK_G, BLOCK_C), dtype=tl.float32)
    db = tl.zeros((BLOCK_G, BLOCK_C), dtype=tl.float32)
    for start in range(0, G, BLOCK_G):
        rows = start + tl.arange(0, BLOCK_G)  # (BLOCK_G,)
        mask = (rows < G)[:, None] & col_ok[None, :]
        offs = rows[:, None] * N + cols[None, :]
        dw += tl.load(PARTIAL_DW + offs, mask=mask, other=0.0)
        db += tl.load(PARTIAL_DB + offs, mask=mask, other=0.0)
    tl.store(DW + cols, tl.sum(dw, axis=0).to(DW.dtype.element_ty), mask=col_ok)
    tl.store(DB + cols, tl.sum(db, axis=0).to(DB.dtype.element_ty), mask=col_ok)


# --------------------------------------------------------------------------------------------------
# Configs, limits and resource specs
# --------------------------------------------------------------------------------------------------

# Archs whose every config `python -m bench.resources --op layer_norm` compiled within the limits.
SUPPORTED_ARCHS = (80, 86, 89, 90)

MAX_WIDTH = 8192  # the backward keeps x, dy and two fp32 accumulators of a row in registers
_MIN_BLOCK_N = 256
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _gpu_config(block_n):
    """One config per row width bucket.

    Forward: a tile of at least 2048 elements per program step, 8 elements a thread (one 16-byte
    vector in 16-bit dtypes). Backward: 4096 elements a step (4 rows at width 768,
    2 at 1600) on 8 warps, 16 elements of x and of dy a thread; at about 116 registers two programs
    fit an SM, so each SM has two steps' loads (2 x 4096 x 2 tensors, 32 KB in 16-bit dtypes) in
    flight -- a memory-bound kernel needs that many bytes moving to reach an H100's bandwidth. The
    widest bucket (8192) takes 16 warps and one program an SM.
    """
    fwd_rows = max(1, 2048 // block_n)
    # 8 elements a thread up to 32 warps (the widest rows, 8192: at 16 warps ptxas spills on sm_80)
    fwd_warps = min(32, max(4, fwd_rows * block_n // 256))
    bwd_rows = max(1, 4096 // block_n)
    bwd_warps = 8 if bwd_rows * block_n <= 4096 else 16
    return {
        "BLOCK_N": block_n,
        "FWD_ROWS": fwd_rows, "fwd_warps": fwd_warps,
        "BWD_ROWS": bwd_rows, "bwd_warps": bwd_warps,
        "programs_per_sm": 2 if bwd_warps == 8 else 1,
        "num_stages": 1,
    }


# The dweight/dbias reduction: 8 partial rows a step, 256 columns a program.
_REDUCE = {"BLOCK_G": 8, "BLOCK_C": 256, "num_warps": 4}


# Under Triton's CPU interpreter: big tiles (fewer interpreted steps) and 3 backward programs, an odd
# count so the row-to-program striding and the partial sums are exercised.
_INTERPRETER_CONFIG = {"FWD_ROWS": 16, "fwd_warps": 1, "BWD_ROWS": 8, "bwd_warps": 1, "programs": 3, "num_stages": 1}


def _block_n(n):
    return max(_MIN_BLOCK_N, triton.next_power_of_2(n))


def configs(arch, dtype):
    """The configs a launch on ``arch`` may use, one per width bucket (``arch=None``: the interpreter's)."""
    if arch is None:
        return [dict(_INTERPRETER_CONFIG)]
    out, block_n = [], _MIN_BLOCK_N
    while block_n <= triton.next_power_of_2(MAX_WIDTH):
        out.append(_gpu_config(block_n))
        block_n *= 2
    return out


@functools.lru_cache(maxsize=None)
def _config(arch, n):
    """The config for rows of width ``n`` on ``arch`` (cached: it is asked on every call)."""
    if arch is None:
        return dict(_INTERPRETER_CONFIG, BLOCK_N=_block_n(n))
    return _gpu_config(_block_n(n))


def resource_specs(arch, dtype):
    """Every (kernel, config) the dispatcher can launch on ``arch`` in ``dtype``, for ``bench.resources``."""
    t = _TRITON_DTYPE[dtype]
    specs = []
    for cfg in configs(arch, dtype):
        for has_res in (False, True):
            specs.append({
                "kernel": _layer_norm_fwd_kernel,
                "signature": {
                    "X": f"*{t}", "BRANCH": f"*{t}", "S": f"*{t}", "Y": f"*{t}", "W": f"*{t}", "B": f"*{t}",
                    "MEAN": "*fp32", "RSTD": "*fp32", "stride_x_row": "i64", "stride_branch_row": "i64",
                    "M": "i32", "N": "i32", "eps": "fp32",
                    "ROWS": "constexpr", "BLOCK_N": "constexpr", "HAS_RES": "constexpr",
                },
                "constexprs": {"ROWS": cfg["FWD_ROWS"], "BLOCK_N": cfg["BLOCK_N"], "HAS_RES": has_res},
                "num_warps": cfg["fwd_warps"], "num_stages": cfg["num_stages"],
                "label": f"fwd BLOCK_N={cfg['BLOCK_N']} ROWS={cfg['FWD_ROWS']}" + (" +residual" if has_res else ""),
            })
            specs.append({
                "kernel": _layer_norm_bwd_kernel,
                "signature": {
                    "DY": f"*{t}", "X": f"*{t}", "W": f"*{t}", "MEAN": "*fp32", "RSTD": "*fp32", "DRES": f"*{t}",
                    "DX": f"*{t}", "PARTIAL_DW": "*fp32", "PARTIAL_DB": "*fp32",
                    "stride_dy_row": "i64", "stride_x_row": "i64", "stride_dres_row": "i64",
                    "M": "i32", "N": "i32",
                    "ROWS": "constexpr", "BLOCK_N": "constexpr", "HAS_DRES": "constexpr",
                },
                "constexprs": {"ROWS": cfg["BWD_ROWS"], "BLOCK_N": cfg["BLOCK_N"], "HAS_DRES": has_res},
                "num_warps": cfg["bwd_warps"], "num_stages": cfg["num_stages"],
                "label": f"bwd BLOCK_N={cfg['BLOCK_N']} ROWS={cfg['BWD_ROWS']}" + (" +residual" if has_res else ""),
            })
    if specs:
        specs.append({
            "kernel": _layer_norm_dwdb_kernel,
            "signature": {"PARTIAL_DW": "*fp32", "PARTIAL_DB": "*fp32", "DW": f"*{t}", "DB": f"*{t}", "G": "i32",
                          "N": "i32", "BLOCK_G": "constexpr", "BLOCK_C": "constexpr"},
            "constexprs": {"BLOCK_G": _REDUCE["BLOCK_G"], "BLOCK_C": _REDUCE["BLOCK_C"]},
            "num_warps": _REDUCE["num_warps"], "num_stages": 1,
            "label": "dweight/dbias reduce",
        })
    return specs


def unsupported_reason(fn_name, *args):
    """Why the kernel cannot take ``(x, weight, bias)`` for ``fn_name``, or None if it can."""
    x = args[0]
    width = x.shape[-1] if x.dim() else 0
    if x.dtype not in _DTYPES:
        return (f"{fn_name}: the Triton kernel takes float32, float16 or bfloat16, got {x.dtype}; cast the "
                f"inputs or use backend='reference'")
    if width == 0:
        return f"{fn_name}: the rows have width 0; there is nothing to normalize"
    if width > MAX_WIDTH:
        return (f"{fn_name}: rows of width {width} are wider than the Triton kernel supports ({MAX_WIDTH}); "
                f"use backend='reference' for this layer")
    return None


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _rows(t, n):
    """``t`` as (M, n) with unit column stride (a view when its strides allow one, else a copy)."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 or n == 1 else t2.contiguous()


def _launch_fwd(x, branch, weight, bias, eps, arch):
    m, n = x.shape
    cfg = _config(arch, n)
    has_res = branch is not None
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    s = torch.empty((m, n), dtype=x.dtype, device=x.device) if has_res else y
    mean = torch.empty((m,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return s, y, mean, rstd
    br = branch if has_res else x
    grid = (triton.cdiv(m, cfg["FWD_ROWS"]),)
    wrap_triton(_layer_norm_fwd_kernel)[grid](
        x, br, s, y, weight, bias, mean, rstd, x.stride(0), br.stride(0), m, n, eps,
        ROWS=cfg["FWD_ROWS"], BLOCK_N=cfg["BLOCK_N"], HAS_RES=has_res,
        num_warps=cfg["fwd_warps"], num_stages=cfg["num_stages"],
    )
    return s, y, mean, rstd


def _backward_programs(cfg, arch, m, device):
    tiles = triton.cdiv(m, cfg["BWD_ROWS"])
    if arch is None:
        return min(tiles, cfg["programs"])
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return min(tiles, sms * cfg["programs_per_sm"])


def _launch_bwd(dy, x, weight, mean, rstd, dres, arch):
    m, n = x.shape
    cfg = _config(arch, n)
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        zeros = torch.zeros_like(weight)
        return dx, zeros, zeros.clone()
    g = _backward_programs(cfg, arch, m, x.device)
    partial_dw = torch.empty((g, n), dtype=torch.float32, device=x.device)
    partial_db = torch.empty((g, n), dtype=torch.float32, device=x.device)
    has_dres = dres is not None
    dr = dres if has_dres else dy
    wrap_triton(_layer_norm_bwd_kernel)[(g,)](
        dy, x, weight, mean, rstd, dr, dx, partial_dw, partial_db,
        dy.stride(0), x.stride(0), dr.stride(0), m, n,
        ROWS=cfg["BWD_ROWS"], BLOCK_N=cfg["BLOCK_N"], HAS_DRES=has_dres,
        num_warps=cfg["bwd_warps"], num_stages=cfg["num_stages"],
    )
    dw = torch.empty((n,), dtype=weight.dtype, device=x.device)
    db = torch.empty((n,), dtype=weight.dtype, device=x.device)
    wrap_triton(_layer_norm_dwdb_kernel)[(triton.cdiv(n, _REDUCE["BLOCK_C"]),)](
        partial_dw, partial_db, dw, db, g, n, BLOCK_G=_REDUCE["BLOCK_G"], BLOCK_C=_REDUCE["BLOCK_C"],
        num_warps=_REDUCE["num_warps"], num_stages=1,
    )  # (N,) each: the G partial rows in one fixed order, cast to the weight's dtype
    return dx, dw, db


# --------------------------------------------------------------------------------------------------
# Custom ops (torch.library.triton_op: torch.compile keeps them whole and sees the kernels inside)
# --------------------------------------------------------------------------------------------------


def _unit_stride(t):
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


@torch.library.triton_op("gptfast::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                       arch: Optional[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: (M, N) -> y (M, N), mean (M,) fp32, rstd (M,) fp32."""
    _, y, mean, rstd = _launch_fwd(_unit_stride(x), None, weight.contiguous(), bias.contiguous(), eps, arch)
    return y, mean, rstd


@torch.library.triton_op("gptfast::add_layer_norm_fwd", mutates_args=())
def _add_layer_norm_fwd_op(x: torch.Tensor, branch: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                           eps: float, arch: Optional[int]
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, branch: (M, N) -> s = x + branch (M, N), y = layer_norm(s) (M, N), mean (M,), rstd (M,)."""
    return _launch_fwd(_unit_stride(x), _unit_stride(branch), weight.contiguous(), bias.contiguous(), eps, arch)


@torch.library.triton_op("gptfast::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                       rstd: torch.Tensor, dres: Optional[torch.Tensor], arch: Optional[int]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dy, x: (M, N), mean/rstd: (M,), dres: (M, N) or None -> dx (M, N), dweight (N,), dbias (N,)."""
    dres = None if dres is None else _unit_stride(dres)
    return _launch_bwd(_unit_stride(dy), _unit_stride(x), weight.contiguous(), mean, rstd, dres, arch)


# Output shapes for tracing with fake tensors. triton_op would trace the bodies above instead, which
# works on a GPU but not under Triton's CPU interpreter (it reads the tensors' data).
def _row_stats(x):
    return x.new_empty((x.shape[0],), dtype=torch.float32)


@_layer_norm_fwd_op.register_fake
def _(x, weight, bias, eps, arch):
    return x.new_empty(x.shape), _row_stats(x), _row_stats(x)


@_add_layer_norm_fwd_op.register_fake
def _(x, branch, weight, bias, eps, arch):
    return x.new_empty(x.shape), x.new_empty(x.shape), _row_stats(x), _row_stats(x)


@_layer_norm_bwd_op.register_fake
def _(dy, x, weight, mean, rstd, dres, arch):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


# --------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------


class _LayerNorm(torch.autograd.Function):
    """y = layer_norm(x) on (M, N) rows; saves x, weight, mean and rstd."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, arch):
        y, mean, rstd = torch.ops.gptfast.layer_norm_fwd(x, weight, bias, eps, arch)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.arch = arch
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = torch.ops.gptfast.layer_norm_bwd(dy, x, weight, mean, rstd, None, ctx.arch)
        return dx, dw, db, None, None


class _AddLayerNorm(torch.autograd.Function):
    """(s, y) = (x + branch, layer_norm(x + branch)) on (M, N) rows; saves s, weight, mean and rstd."""

    @staticmethod
    def forward(ctx, x, branch, weight, bias, eps, arch):
        s, y, mean, rstd = torch.ops.gptfast.add_layer_norm_fwd(x, branch, weight, bias, eps, arch)
        ctx.save_for_backward(s, weight, mean, rstd)
        ctx.arch = arch
        return s, y

    @staticmethod
    def backward(ctx, ds, dy):
        s, weight, mean, rstd = ctx.saved_tensors
        ds_total, dw, db = torch.ops.gptfast.layer_norm_bwd(dy, s, weight, mean, rstd, ds, ctx.arch)
        return ds_total, ds_total, dw, db, None, None  # d(x + branch)/dx = d(x + branch)/dbranch = 1


# --------------------------------------------------------------------------------------------------
# Public functions (the signatures of gptfast.reference, plus `arch`)
# --------------------------------------------------------------------------------------------------


def _check(fn_name, x, weight, bias):
    problem = unsupported_reason(fn_name, x, weight, bias)
    if problem:
        raise ValueError(problem)


def layer_norm(x, weight, bias, eps=1e-5, *, arch=None):
    """LayerNorm over the last dimension, biased variance, fp32 statistics.

    x: (..., E), any strides; weight, bias: (E,). Returns a contiguous (..., E) tensor in x's dtype.
    ``arch``: the CUDA arch to pick a config for (86 for sm_86); None runs Triton's CPU interpreter.
    """
    _check("layer_norm", x, weight, bias)
    n = x.shape[-1]
    y = _LayerNorm.apply(_rows(x, n), weight, bias, float(eps), arch)  # (M, E)
    return y.view(x.shape)


def add_layer_norm(x, branch, weight, bias, eps=1e-5, *, arch=None):
    """The pre-LN block's residual step in one pass: ``s = x + branch``; returns ``(s, layer_norm(s))``.

    x, branch: (..., E), any strides; weight, bias: (E,). Both outputs are contiguous, in x's dtype.
    In the backward, x and branch both get ``ds + d layer_norm(s) / ds`` (one tensor).
    """
    _check("add_layer_norm", x, weight, bias)
    n = x.shape[-1]
    s, y = _AddLayerNorm.apply(_rows(x, n), _rows(branch, n), weight, bias, float(eps), arch)  # (M, E) each
    return s.view(x.shape), y.view(x.shape)
