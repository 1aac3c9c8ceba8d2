"""The block's feed-forward -- Linear E->H, tanh-GELU, Linear H->E -- as fused Triton GEMMs.

One tiled GEMM kernel, ``C = A @ B (+ bias)``, with the pointwise work of the feed-forward folded into
its loads and its epilogue, so no GELU or GELU-derivative ever costs a pass of its own. With
x: (M, E), W1 = fc_weight: (H, E), W2 = proj_weight: (E, H):

forward
    h  = x @ W1^T + b1            epilogue: store h (saved for backward) and g = gelu(h)
    y  = g @ W2^T + b2

backward (dy: (M, E))
    dh  = (dy @ W2) * gelu'(h)    epilogue: gelu(h) and its derivative from one tanh, reading h; it
                                  writes dh, g = gelu(h), and each tile's column sums of dh (db1)
    dW2 = dy^T @ g                a plain GEMM: no GELU in any main loop
    dW1 = dh^T @ x
    dx  = dh @ W1
    db2 = sum_rows(dy), db1 = the tiles' partial sums added in order   (deterministic)

so the autograd function saves x (the op's input) and h alone -- no GELU output and none of the
composite GELU's intermediates (g exists only during the backward). Weight gradients have few output
tiles and a long K at GPT-2's shapes, so they are split along K until they fill two waves of the GPU;
the fp32 partials are added in a fixed order, so every gradient is the same bits on every run. Loads
and stores are masked only when a dimension is not a multiple of the tile, and offsets are 32-bit
unless one reaches 2^31. Transposes are stride swaps: the kernel reads A and B through any
strides. Order in this file: the kernel -> launchers -> custom ops -> autograd -> the public function.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._compat import wrap_triton

# --------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)

EPI_NONE = 0  # C = A @ B (+ bias)
EPI_GELU = 1  # H = A @ B + bias is stored, and C = gelu(H)
EPI_DGELU = 2  # C = (A @ B) * gelu'(H), H read from memory


@triton.jit
def _tanh(u):
    # tanh(u) = 1 - 2 / (exp(2u) + 1): exact limits +-1 when exp overflows or underflows
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _gelu(h):
    # 0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3)))
    return 0.5 * h * (1.0 + _tanh(0.7978845608028654 * (h + 0.044715 * h * h * h)))


@triton.jit
def _gelu_and_grad(h):
    # gelu(h) and d gelu / dh from one tanh:
    # gelu' = 0.5 (1 + t) + 0.5 h (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 h^2),  t = tanh(...)
    t = _tanh(0.7978845608028654 * (h + 0.044715 * h * h * h))
    gelu = 0.5 * h * (1.0 + t)
    grad = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * h * h)
    return gelu, grad


@triton.jit
def _ffn_matmul_kernel(
    A,  # (M, K) left operand, read through stride_am / stride_ak
    B,  # (K, N) right operand, read through stride_bk / stride_bn
    C,  # (M, N) output, row-major; with SPLIT_K > 1 (SPLIT_K, M, N) fp32 partial sums
    BIAS,  # (N,) bias, when HAS_BIAS
    H,  # (M, N) pre-activation: written when EPILOGUE == EPI_GELU, read when EPI_DGELU
    G,  # (M, N) gelu(H), written when EPILOGUE == EPI_DGELU (what dW2 multiplies)
    DB,  # (cdiv(M, BLOCK_M), N) fp32 column sums of C per tile row, when EPILOGUE == EPI_DGELU
    M, N, K,  # problem size
    stride_am, stride_ak,  # A's strides
    stride_bk, stride_bn,  # B's strides
    HAS_BIAS: tl.constexpr,
    EPILOGUE: tl.constexpr,  # EPI_NONE | EPI_GELU | EPI_DGELU
    SPLIT_K: tl.constexpr,  # programs along K (axis 1), each summing K / SPLIT_K of the products
    EVEN_MN: tl.constexpr,  # M and N are multiples of the tiles: no row or column masks
    EVEN_K: tl.constexpr,  # K is a multiple of BLOCK_K * SPLIT_K: no K masks in the main loop
    IDX64: tl.constexpr,  # some offset passes 2^31: form offsets in 64 bits
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # tiles of M walked together, so B's tiles stay in L2
    DOT_PRECISION: tl.constexpr,  # "ieee" for exact fp32, "tf32" otherwise (ignored for 16-bit inputs)
):
    # program id -> (tile row, tile column), grouped along M for L2 reuse
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_size
    pid_n = (pid % (GROUP_M * num_n)) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    if IDX64:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    # this program's share of K: whole BLOCK_K steps, the last split taking what is left
    k_steps = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_begin = tl.program_id(1) * k_steps * BLOCK_K
    k_end = tl.minimum(k_begin + k_steps * BLOCK_K, K)
    a_ptrs = A + offs_m[:, None] * stride_am + (k_begin + offs_k)[None, :] * stride_ak  # (BLOCK_M, BLOCK_K)
    b_ptrs = B + (k_begin + offs_k)[:, None] * stride_bk + offs_n[None, :] * stride_bn  # (BLOCK_K, BLOCK_N)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        if EVEN_K and EVEN_MN:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = (k0 + offs_k) < k_end
            a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    n_ok = offs_n < N
    out_mask = (offs_m[:, None] < M) & n_ok[None, :]
    out_offs = offs_m[:, None] * N + offs_n[None, :]  # C, H and G are row-major (M, N)
    if SPLIT_K > 1:  # fp32 partials, summed in a fixed order by the launcher
        part = C + tl.program_id(1).to(tl.int64) * M * N + out_offs
        if EVEN_MN:
            tl.store(part, acc)
        else:
            tl.store(part, acc, mask=out_mask)
    else:
        if HAS_BIAS:
            if EVEN_MN:
                acc += tl.load(BIAS + offs_n).to(tl.float32)[None, :]
            else:
                acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if EPILOGUE == 1:  # EPI_GELU: keep the pre-activation for backward, pass gelu(h) on
            if EVEN_MN:
                tl.store(H + out_offs, acc.to(H.dtype.element_ty))
            else:
                tl.store(H + out_offs, acc.to(H.dtype.element_ty), mask=out_mask)
            acc = _gelu(acc)
        if EPILOGUE == 2:  # EPI_DGELU: chain rule through the GELU; gelu(h) for dW2 from the same tanh
            if EVEN_MN:
                h = tl.load(H + out_offs).to(tl.float32)
            else:
                h = tl.load(H + out_offs, mask=out_mask, other=0.0).to(tl.float32)
            gelu, grad = _gelu_and_grad(h)
            acc = acc * grad
            if EVEN_MN:
                tl.store(G + out_offs, gelu.to(G.dtype.element_ty))
            else:
                tl.store(G + out_offs, gelu.to(G.dtype.element_ty), mask=out_mask)
            # db1's partial sums: this tile's column sums of dh as stored (rounded to C's dtype)
            rounded = acc.to(C.dtype.element_ty).to(tl.float32)
            if not EVEN_MN:
                rounded = tl.where(out_mask, rounded, 0.0)
            tl.store(DB + pid_m * N + offs_n, tl.sum(rounded, axis=0), mask=n_ok)
        if EVEN_MN:
            tl.store(C + out_offs, acc.to(C.dtype.element_ty))
        else:
            tl.store(C + out_offs, acc.to(C.dtype.element_ty), mask=out_mask)


# --------------------------------------------------------------------------------------------------
# Configs (per arch; one fixed config under the interpreter, where autotuning cannot run)
# --------------------------------------------------------------------------------------------------

SUPPORTED_ARCHS = (80, 86, 89, 90, 120)

_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "num_warps": 4, "num_stages": 1}
# 16-bit inputs: large tiles on the data-centre parts, 99 KB-friendly tiles on consumer cards.
_CONFIGS_16 = {
    80: {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
    90: {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    86: {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
}
# fp32 (exact, input_precision="ieee"): smaller tiles, twice the bytes per element.
_CONFIGS_32 = {
    80: {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
    90: {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
    86: {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 2},
}
_ARCH_FAMILY = {80: 80, 86: 86, 89: 86, 90: 90, 120: 86}
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def configs(arch, dtype):
    """The configs a launch on ``arch`` may use (``arch=None``: the interpreter's)."""
    if arch is None:
        return [dict(_INTERPRETER_CONFIG)]
    if arch not in _ARCH_FAMILY:
        return []
    table = _CONFIGS_32 if dtype == torch.float32 else _CONFIGS_16
    return [dict(table[_ARCH_FAMILY[arch]])]


def _config_for(arch, dtype, epilogue):
    """The arch's config, except for dh: its epilogue (h, gelu, gelu', the column sums) holds several
    values per accumulator element, so dh keeps at most 32 accumulator elements a thread -- twice the
    warps up to 8, then half the tile's columns. Masked (an edge that does not divide the tiles) and
    with 64-bit offsets, 64 a thread spill 28-52 bytes on sm_80/86/90; 32 hold about 140 registers."""
    cfg = configs(arch, dtype)[0]
    if arch is None or epilogue != EPI_DGELU:
        return cfg
    cfg = dict(cfg)
    while cfg["BLOCK_M"] * cfg["BLOCK_N"] > 32 * 32 * cfg["num_warps"]:
        if cfg["num_warps"] < 8:
            cfg["num_warps"] *= 2
        else:
            cfg["BLOCK_N"] //= 2
    return cfg


# Programs a GEMM should launch to fill the GPU: two waves of the SMs of the largest card each config
# family is sized for (H100 SXM: 132; A100: 108; the consumer family: an RTX 4090's 128). A weight
# gradient at GPT-2's shapes has few output tiles (768 x 3072 in 128 x 128 tiles: 144) and a long K
# (the 8,192 rows), so it is split along K until it fills them; under the interpreter, a small target
# makes the tests' shapes take the split path too.
_TARGET_PROGRAMS = {80: 2 * 108, 86: 2 * 128, 90: 2 * 132, None: 8}
_MAX_SPLIT = 8
_MIN_K_STEPS = {None: 1}  # BLOCK_K steps each split keeps at least (8 on a GPU)


def split_k(arch, tiles, k, block_k):
    """How many programs share each output tile along K (1: no split), deterministic in the shape."""
    target = _TARGET_PROGRAMS[None if arch is None else _ARCH_FAMILY[arch]]
    if tiles >= target:
        return 1
    steps = triton.cdiv(k, block_k)
    most = max(1, min(_MAX_SPLIT, steps // _MIN_K_STEPS.get(arch, 8)))
    return max(1, min(most, triton.cdiv(target, tiles)))


def _needs_int64(m, n, k, a_strides, b_strides, split):
    """Whether some element offset the kernel forms reaches 2^31 (then it forms them in 64 bits)."""
    sam, sak = (abs(x) for x in a_strides)
    sbk, sbn = (abs(x) for x in b_strides)
    largest = max((m - 1) * sam + (k - 1) * sak, (k - 1) * sbk + (n - 1) * sbn, split * m * n)
    return largest >= 2 ** 31 - 1


# The kernel variants a feed-forward launches: (label, HAS_BIAS, EPILOGUE, the strides that are 1).
# A launch specializes an integer argument equal to 1 into a constant, and unit strides are what let
# Triton emit vector and asynchronous loads, so each spec marks the ones its launch has.
_VARIANTS = (
    ("fc + gelu epilogue", True, EPI_GELU, ("stride_ak", "stride_bk")),  # x, W1^T
    ("proj + bias", True, EPI_NONE, ("stride_ak", "stride_bk")),  # g, W2^T
    ("dh = dy W2 * gelu'(h); gelu(h); db1 partials", False, EPI_DGELU, ("stride_ak", "stride_bn")),  # dy, W2
    ("dW1, dW2", False, EPI_NONE, ("stride_am", "stride_bn")),  # dh^T / dy^T, x / g
    ("dx", False, EPI_NONE, ("stride_ak", "stride_bn")),  # dh, W1
)


def resource_specs(arch, dtype):
    """Every (variant, config) the dispatcher can launch on ``arch`` in ``dtype``, for ``bench.resources``."""
    t = _DTYPES[dtype]
    specs = []
    for base in configs(arch, dtype):
        for label, has_bias, epilogue, unit in _VARIANTS:
            cfg = _config_for(arch, dtype, epilogue) if arch is not None else base
            for split in ((1, 2) if epilogue == EPI_NONE and not has_bias else (1,)):
                signature = {"A": f"*{t}", "B": f"*{t}", "C": "*fp32" if split > 1 else f"*{t}",
                             "BIAS": f"*{t}", "H": f"*{t}", "G": f"*{t}", "DB": "*fp32",
                             "M": "i32", "N": "i32", "K": "i32", "stride_am": "i32", "stride_ak": "i32",
                             "stride_bk": "i32", "stride_bn": "i32", "HAS_BIAS": "constexpr",
                             "EPILOGUE": "constexpr", "SPLIT_K": "constexpr", "EVEN_MN": "constexpr",
                             "EVEN_K": "constexpr", "IDX64": "constexpr", "BLOCK_M": "constexpr",
                             "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "GROUP_M": "constexpr",
                             "DOT_PRECISION": "constexpr"}
                signature.update({name: "constexpr" for name in unit})
                specs.append({
                    "kernel": _ffn_matmul_kernel,
                    "signature": signature,
                    "constexprs": {"HAS_BIAS": has_bias, "EPILOGUE": epilogue, "SPLIT_K": split, "EVEN_MN": False,
                                   "EVEN_K": False, "IDX64": True, "BLOCK_M": cfg["BLOCK_M"],
                                   "BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"], "GROUP_M": cfg["GROUP_M"],
                                   "DOT_PRECISION": _precision(dtype), **{name: 1 for name in unit}},
                    "num_warps": cfg["num_warps"],
                    "num_stages": cfg["num_stages"],
                    "label": f"{label}{f' split {split}' if split > 1 else ''} "
                             f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}",
                })
    return specs


def unsupported_reason(fn_name, *args):
    """Why the kernel cannot take these inputs, or None if it can."""
    x = args[0]
    if x.dtype not in _DTYPES:
        return f"{fn_name}: the Triton kernel takes float32, float16 or bfloat16 inputs, not {x.dtype}"
    if x.numel() == 0:
        return f"{fn_name}: empty input; use backend='reference'"
    return None


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------


def _matmul(a, b, bias, arch, *, epilogue=EPI_NONE, h=None):
    """C = a @ b (+ bias) with the requested epilogue; a: (M, K), b: (K, N), any strides.

    Returns C (M, N); for ``EPI_GELU`` also the stored pre-activation H; for ``EPI_DGELU`` also
    gelu(H) and the column sums of C (fp32, summed over the tile rows in a fixed order).
    """
    m, k = a.shape
    n = b.shape[1]
    cfg = _config_for(arch, a.dtype, epilogue)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split = split_k(arch, tiles, k, bk) if epilogue == EPI_NONE and bias is None else 1
    if split > 1:
        c = torch.empty((split, m, n), device=a.device, dtype=torch.float32)
    else:
        c = torch.empty((m, n), device=a.device, dtype=a.dtype)
    g = db = None
    if epilogue == EPI_GELU:
        h = torch.empty((m, n), device=a.device, dtype=a.dtype)
    if epilogue == EPI_DGELU:
        g = torch.empty((m, n), device=a.device, dtype=a.dtype)
        db = torch.empty((triton.cdiv(m, bm), n), device=a.device, dtype=torch.float32)
    wrap_triton(_ffn_matmul_kernel)[(tiles, split)](
        a, b, c, bias if bias is not None else c, h if h is not None else c, g if g is not None else c,
        db if db is not None else c,
        m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        HAS_BIAS=bias is not None, EPILOGUE=epilogue, SPLIT_K=split,
        EVEN_MN=m % bm == 0 and n % bn == 0, EVEN_K=k % (bk * split) == 0,
        IDX64=_needs_int64(m, n, k, a.stride(), b.stride(), split),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"],
        DOT_PRECISION=_precision(a.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if split > 1:
        c = c.sum(0).to(a.dtype)  # the partials in a fixed order: the same bits every run
    if epilogue == EPI_GELU:
        return c, h
    if epilogue == EPI_DGELU:
        return c, g, db.sum(0)
    return c


# --------------------------------------------------------------------------------------------------
# Custom ops (torch.library.triton_op: torch.compile keeps them whole and sees the kernels inside)
# --------------------------------------------------------------------------------------------------


@torch.library.triton_op("gptfast::feed_forward_fwd", mutates_args=())
def _ffn_fwd_op(x: torch.Tensor, fc_weight: torch.Tensor, fc_bias: Optional[torch.Tensor],
                proj_weight: torch.Tensor, proj_bias: Optional[torch.Tensor], arch: Optional[int]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (M, E) -> y (M, E), h (M, H): the output and the saved pre-activation."""
    g, h = _matmul(x, fc_weight.t(), fc_bias, arch, epilogue=EPI_GELU)  # (M, H) each
    y = _matmul(g, proj_weight.t(), proj_bias, arch)  # (M, E)
    return y, h


@torch.library.triton_op("gptfast::feed_forward_bwd", mutates_args=())
def _ffn_bwd_op(dy: torch.Tensor, x: torch.Tensor, h: torch.Tensor, fc_weight: torch.Tensor,
                proj_weight: torch.Tensor, arch: Optional[int]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dy: (M, E) -> dx (M, E), dW1 (H, E), db1 (H,), dW2 (E, H), db2 (E,)."""
    dh, g, db1 = _matmul(dy, proj_weight, None, arch, epilogue=EPI_DGELU, h=h)  # (M, H), (M, H), (H,)
    d_proj_w = _matmul(dy.t(), g, None, arch)  # (E, H) = dy^T gelu(h): a plain GEMM
    d_fc_w = _matmul(dh.t(), x, None, arch)  # (H, E)
    dx = _matmul(dh, fc_weight, None, arch)  # (M, E)
    d_fc_b = db1.to(dh.dtype)
    d_proj_b = dy.sum(0, dtype=torch.float32).to(dy.dtype)
    return dx, d_fc_w, d_fc_b, d_proj_w, d_proj_b


# Output shapes for tracing with fake tensors (triton_op would trace the bodies, which the CPU
# interpreter cannot do: it reads the tensors' data).
@_ffn_fwd_op.register_fake
def _(x, fc_weight, fc_bias, proj_weight, proj_bias, arch):
    return x.new_empty((x.shape[0], proj_weight.shape[0])), x.new_empty((x.shape[0], fc_weight.shape[0]))


@_ffn_bwd_op.register_fake
def _(dy, x, h, fc_weight, proj_weight, arch):
    return (x.new_empty(x.shape), fc_weight.new_empty(fc_weight.shape), h.new_empty((h.shape[1],)),
            proj_weight.new_empty(proj_weight.shape), dy.new_empty((dy.shape[1],)))


# --------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------


class _FeedForward(torch.autograd.Function):
    """y = gelu(x W1^T + b1) W2^T + b2 on (M, E) rows; saves x, h and the two weights."""

    @staticmethod
    def forward(ctx, x, fc_weight, fc_bias, proj_weight, proj_bias, arch):
        y, h = torch.ops.gptfast.feed_forward_fwd(x, fc_weight, fc_bias, proj_weight, proj_bias, arch)
        ctx.save_for_backward(x, h, fc_weight, proj_weight)
        ctx.arch = arch
        ctx.has_bias = (fc_bias is not None, proj_bias is not None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, h, fc_weight, proj_weight = ctx.saved_tensors
        dx, dw1, db1, dw2, db2 = torch.ops.gptfast.feed_forward_bwd(
            dy.contiguous(), x, h, fc_weight, proj_weight, ctx.arch)  # dy may arrive expanded (stride 0)
        return (dx, dw1, db1 if ctx.has_bias[0] else None, dw2, db2 if ctx.has_bias[1] else None, None)


# --------------------------------------------------------------------------------------------------
# Public function (the signature of gptfast.reference.feed_forward, plus `arch`)
# --------------------------------------------------------------------------------------------------


def feed_forward(x, fc_weight, fc_bias, proj_weight, proj_bias, *, arch=None):
    """Linear E->H, tanh-GELU, Linear H->E in two fused GEMMs (weights in ``nn.Linear`` layout).

    x: (..., E), any strides; fc_weight: (H, E); fc_bias: (H,) or None; proj_weight: (E, H);
    proj_bias: (E,) or None. Returns (..., E) in x's dtype. ``arch``: the CUDA arch whose config to use
    (86 for sm_86); None runs Triton's CPU interpreter with its fixed config.
    """
    problem = unsupported_reason("feed_forward", x, fc_weight, fc_bias, proj_weight, proj_bias)
    if problem:
        raise ValueError(problem)
    e = x.shape[-1]
    rows = x.reshape(-1, e)  # (M, E): a view when it can be, any strides are read as they are
    y = _FeedForward.apply(rows, fc_weight, fc_bias, proj_weight, proj_bias, arch)
    return y.view(*x.shape[:-1], proj_weight.shape[0])
