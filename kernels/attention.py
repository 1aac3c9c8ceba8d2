"""Causal multi-head attention as a FlashAttention-2-style Triton kernel.

The (T, T) attention matrix never exists in memory. The forward pass walks over tiles of keys with an
*online softmax* (a running row maximum ``m_i`` and running denominator ``l_i``), skips the tiles that
lie entirely above the causal diagonal, and saves only the output and one log-sum-exp per query row.
The backward pass recomputes the probabilities tile by tile from that log-sum-exp: one kernel owns a
tile of keys and accumulates dK and dV over the queries that see it, another owns a tile of queries
and accumulates dQ over its keys -- no atomics, so gradients are bitwise reproducible.

Dropout is applied inside the kernels, on the attention weights as the book applies it
(``dropout(softmax(S)) @ V``): a keep/drop decision per (batch*head, query, key) from one random byte
of Philox (``tl.randint4x``: sixteen decisions a call), keyed by a seed drawn from torch's default
generator at call time and by the element's position, so the backward pass regenerates the same mask
and ``torch.manual_seed`` reproduces a run. A byte compared with ``256 p`` makes the probability a
multiple of 1/256 (:func:`effective_dropout_p`: 0.1 becomes 0.1016), and survivors are scaled by that.

With ``cache_seqlens`` the same kernels serve a KV cache: query ``i`` of row ``b`` sits at position
``cache_seqlens[b] + i`` and sees keys ``0 .. cache_seqlens[b] + i``. Decode steps (a few queries
against a cache) get their own small-query configs, bucketed by cache length: a long cache is split
over several programs and merged by a combine kernel (flash-decoding). The lengths are runtime
arguments that Triton does not specialize on, so a growing cache never recompiles.

Layout, as every kernel module: private ``@triton.jit`` kernels -> launchers -> the custom ops
(``gptfast::flash_attention_fwd`` / ``gptfast::flash_attention_bwd``, ``torch.library.triton_op``)
and their autograd registration -> :func:`causal_attention`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._compat import wrap_triton

# Archs whose every config compiles within the arch's limits (``python -m bench.resources --op attention``).
SUPPORTED_ARCHS = (80, 86, 89, 90, 120)
HEAD_DIMS = (16, 32, 64, 128)  # padded head widths the kernels are built for; D <= 128 is padded up
_MAX_OFFSET = 2**31  # in-slice offsets (token * stride) are int32; (batch, head) bases are int64

LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _keep_mask(seed, rng_base, offs_m, start_n, T_K, dropout_p, BLOCK_N: tl.constexpr):
    """Philox keep decisions for queries ``offs_m`` x keys ``start_n .. start_n + BLOCK_N`` of one slice.

    One Philox call gives four 32-bit words (``tl.randint4x``), sixteen bytes, used by sixteen
    neighbouring keys: key 16g + 4a + b of row i reads byte b of word a of counter
    ``rng_base + i * ceil(Tk / 16) + g`` (int64), with ``rng_base = bh * Tq * ceil(Tk / 16)``, and is
    dropped when that byte is below ``256 * dropout_p`` (``dropout_p`` is a multiple of 1/256: see
    :func:`effective_dropout_p`). The forward and both backward kernels build the mask with this one
    function, so all three see the same mask. ``start_n`` is a multiple of 16.
    """
    BLOCK_M: tl.constexpr = offs_m.shape[0]
    offs_g = start_n // 16 + tl.arange(0, BLOCK_N // 16)  # (BLOCK_N // 16,) groups of sixteen keys
    counters = rng_base + offs_m.to(tl.int64)[:, None] * ((T_K + 15) // 16) + offs_g[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counters)  # (BLOCK_M, BLOCK_N // 16) each, uint32
    threshold = tl.cast(dropout_p * 256.0, tl.uint32)  # exact: dropout_p = threshold / 256
    # byte b of every word, joined so that key 4a + b of a group reads byte b of word a (the first join
    # is the most significant index: words a = 2 a1 + a0, then bytes b = 2 b1 + b0)
    w0 = _words(r0, r1, r2, r3, 0)
    w1 = _words(r0, r1, r2, r3, 1)
    w2 = _words(r0, r1, r2, r3, 2)
    w3 = _words(r0, r1, r2, r3, 3)
    u = tl.join(tl.join(w0, w2), tl.join(w1, w3))  # (BLOCK_M, BLOCK_N // 16, 2, 2, 2, 2)
    return tl.reshape(u, (BLOCK_M, BLOCK_N)) >= threshold


@triton.jit
def _words(r0, r1, r2, r3, BYTE: tl.constexpr):
    """Byte ``BYTE`` of the four words, joined as (a1, a0): word a = 2 a1 + a0."""
    return tl.join(tl.join((r0 >> (8 * BYTE)) & 255, (r2 >> (8 * BYTE)) & 255),
                   tl.join((r1 >> (8 * BYTE)) & 255, (r3 >> (8 * BYTE)) & 255))


@triton.jit
def _load_kv(K_tile, V_tile, stride_kt, stride_vt, k_pos, offs_d, T_K,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PARTIAL: tl.constexpr):
    """Load a (BLOCK_N, BLOCK_D) tile of keys and of values; masks only where the tile may run past
    the last key (PARTIAL) or the head dim is padded."""
    if PARTIAL:
        mask = (k_pos[:, None] < T_K) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(K_tile + k_pos[:, None] * stride_kt, mask=mask, other=0.0)
        v = tl.load(V_tile + k_pos[:, None] * stride_vt, mask=mask, other=0.0)
    elif HEAD_DIM == BLOCK_D:
        k = tl.load(K_tile + k_pos[:, None] * stride_kt)
        v = tl.load(V_tile + k_pos[:, None] * stride_vt)
    else:
        mask = offs_d[None, :] < HEAD_DIM
        k = tl.load(K_tile + k_pos[:, None] * stride_kt, mask=mask, other=0.0)
        v = tl.load(V_tile + k_pos[:, None] * stride_vt, mask=mask, other=0.0)
    return k, v


@triton.jit
def _fwd_tile(
    acc, m_i, l_i, q, K_tile, V_tile, stride_kt, stride_vt,
    q_pos, start_n, offs_m, offs_n, offs_d,
    T_K, qk_scale, seed, rng_base, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_CACHE: tl.constexpr,
):
    """One step of the online softmax: fold keys ``start_n .. start_n + BLOCK_N`` into (acc, m_i, l_i)."""
    k_pos = start_n + offs_n  # (BLOCK_N,)
    k, v = _load_kv(K_tile, V_tile, stride_kt, stride_vt, k_pos, offs_d, T_K, HEAD_DIM, BLOCK_D, CAUSAL_MASK)
    # raw scores; the scale (softmax_scale * log2(e), > 0) is folded into the exponent, so the row
    # maximum is taken on the raw dot and each probability costs one FMA: exp2(s * scale - m)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
    if CAUSAL_MASK:  # a tile on the diagonal: hide the keys after each query
        if HAS_CACHE:  # rows of a cache may end before the tile's last key
            visible = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < T_K)
        else:  # Tq == Tk: a key a real query sees is never past the end (padded rows are not stored)
            visible = k_pos[None, :] <= q_pos[:, None]
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # (BLOCK_M,) running row maximum, log2 units
    alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old maximum
    p = tl.exp2(s * qk_scale - m_new[:, None])  # (BLOCK_M, BLOCK_N) unnormalized probabilities
    l_i = l_i * alpha + tl.sum(p, 1)  # the denominator counts every weight, dropped or not
    if DROPOUT:  # dropout(softmax(S)): drop weights after the softmax, scale survivors by 1/(1-p)
        keep = _keep_mask(seed, rng_base, offs_m, start_n, T_K, dropout_p, offs_n.shape[0])
        p = tl.where(keep, p * (1.0 / (1.0 - dropout_p)), 0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["T_Q", "T_K", "split_len"])
def _attn_fwd_kernel(
    Q,  # (B, H, Tq, D) queries, read through their strides
    K,  # (B, H, Tk, D) keys
    V,  # (B, H, Tk, D) values
    O,  # (B, H, Tq, D) output, written through its strides
    LSE,  # (B * H, Tq) fp32 out: log2 of each row's softmax denominator, in log2 units
    SEQLENS,  # (B,) int: position of each row's first query (read only when HAS_CACHE)
    SEED,  # (1,) int64: Philox seed (read only when DROPOUT)
    PART_ACC,  # (B * H, splits, Tq, BLOCK_D) fp32 out: each key split's unnormalized output (SPLIT_KV)
    PART_M,  # (B * H, splits, Tq) fp32 out: each split's row maximum (SPLIT_KV)
    PART_L,  # (B * H, splits, Tq) fp32 out: each split's row denominator (SPLIT_KV)
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    H, T_Q, T_K,
    split_len,  # keys per split (a multiple of BLOCK_N) when SPLIT_KV
    qk_scale,  # softmax_scale * log2(e)
    dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_CACHE: tl.constexpr, DROPOUT: tl.constexpr, SPLIT_KV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # causal tiles further down see more keys: launch them first, so the short ones fill the tail
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    off_bh = tl.program_id(1)
    b = off_bh // H
    h = off_bh % H
    # int64 bases: batch * stride can pass 2**31; offsets inside one (b, h) slice stay int32
    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    K += b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    O += b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    LSE += off_bh.to(tl.int64) * T_Q
    offset = 0  # position of query 0: 0 without a cache
    if HAS_CACHE:
        offset = tl.load(SEQLENS + b).to(tl.int32)
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)
    rng_base = off_bh.to(tl.int64) * T_Q * ((T_K + 15) // 16)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query indices
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_pos = offset + offs_m  # each query's position in the sequence
    q_mask = (offs_m[:, None] < T_Q) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
    K_tile = K + offs_d[None, :] * stride_kd  # (1, BLOCK_D): add key rows to address a tile
    V_tile = V + offs_d[None, :] * stride_vd

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of s, log2 units
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # running sum of p @ v

    # Keys below position offset + start_m * BLOCK_M are seen by every query of the tile: no mask.
    full_end = (tl.minimum(offset + start_m * BLOCK_M, T_K) // BLOCK_N) * BLOCK_N
    # Keys up to the tile's last query position: the diagonal band, masked. Beyond it: skipped.
    end = tl.minimum(offset + (start_m + 1) * BLOCK_M, T_K)
    lo = 0
    if SPLIT_KV:  # decode against a long cache: this program takes keys lo .. lo + split_len only
        lo = tl.program_id(2) * split_len
        end = tl.minimum(end, lo + split_len)
    for start_n in range(lo, tl.minimum(full_end, end), BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, K_tile, V_tile, stride_kt, stride_vt,
                                  q_pos, start_n, offs_m, offs_n, offs_d, T_K, qk_scale, seed, rng_base,
                                  dropout_p, HEAD_DIM, BLOCK_D, False, DROPOUT, DOT_PRECISION, HAS_CACHE)
    for start_n in range(tl.maximum(full_end, lo), end, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, K_tile, V_tile, stride_kt, stride_vt,
                                  q_pos, start_n, offs_m, offs_n, offs_d, T_K, qk_scale, seed, rng_base,
                                  dropout_p, HEAD_DIM, BLOCK_D, True, DROPOUT, DOT_PRECISION, HAS_CACHE)

    if SPLIT_KV:  # leave (acc, m_i, l_i) for _attn_fwd_combine_kernel; a split past a row's keys leaves -inf, 0
        part = (off_bh.to(tl.int64) * tl.num_programs(2) + tl.program_id(2)) * T_Q + offs_m  # (BLOCK_M,)
        row_ok = offs_m < T_Q
        tl.store(PART_ACC + part[:, None] * BLOCK_D + offs_d[None, :], acc, mask=row_ok[:, None])
        tl.store(PART_M + part, m_i, mask=row_ok)
        tl.store(PART_L + part, l_i, mask=row_ok)
    else:
        # every query sees key 0, so l_i > 0 on real rows; padded rows are never stored
        acc = acc / l_i[:, None]
        tl.store(O + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od, acc.to(O.dtype.element_ty),
                 mask=q_mask)
        tl.store(LSE + offs_m, m_i + tl.log2(l_i), mask=offs_m < T_Q)


@triton.jit(do_not_specialize=["T_Q", "num_splits"])
def _attn_fwd_combine_kernel(
    PART_ACC,  # (B * H, splits, Tq, BLOCK_D) fp32: each split's unnormalized output
    PART_M,  # (B * H, splits, Tq) fp32: each split's row maximum (log2 units; -inf if it saw no key)
    PART_L,  # (B * H, splits, Tq) fp32: each split's row denominator
    O,  # (B, H, Tq, D) out
    LSE,  # (B * H, Tq) fp32 out
    stride_ob, stride_oh, stride_ot, stride_od,
    H, T_Q, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Merge the key splits of a decode step: the online softmax's update, once per split."""
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    b = off_bh // H
    h = off_bh % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T_Q
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for split in range(0, num_splits):  # split 0 holds key 0, so m_i is finite from the start on real rows
        part = (off_bh.to(tl.int64) * num_splits + split) * T_Q + offs_m
        m_s = tl.load(PART_M + part, mask=row_ok, other=0.0)
        l_s = tl.load(PART_L + part, mask=row_ok, other=0.0)
        acc_s = tl.load(PART_ACC + part[:, None] * BLOCK_D + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        m_new = tl.maximum(m_i, m_s)
        alpha = tl.exp2(m_i - m_new)
        beta = tl.exp2(m_s - m_new)
        l_i = l_i * alpha + l_s * beta
        acc = acc * alpha[:, None] + acc_s * beta[:, None]
        m_i = m_new
    l_i = tl.where(row_ok, l_i, 1.0)  # padded rows: never stored, kept finite
    acc = acc / l_i[:, None]
    O += b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    o_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    tl.store(O + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od, acc.to(O.dtype.element_ty), mask=o_mask)
    tl.store(LSE + off_bh.to(tl.int64) * T_Q + offs_m, m_i + tl.log2(l_i), mask=row_ok)


# Backward. With S = scale * Q K^T (masked), P = softmax(S) row-wise, Z the dropout mask already
# scaled (Z = keep / (1 - p), or all ones without dropout), and O = (P * Z) V:
#
#   dV  = (P * Z)^T dO
#   dP  = (dO V^T) * Z                     (the gradient reaching the undropped weights)
#   dS  = P * (dP - delta),  delta_i = sum_j P_ij dP_ij = sum_d dO_id O_id
#   dQ  = scale * dS K
#   dK  = scale * dS^T Q
#
# P is recomputed from the saved log-sum-exp: P_ij = exp2(s_ij - lse_i) with s in log2 units. delta
# is one number per query row: the dQ kernel, which runs first and reads the row's dO anyway, computes
# it from O and stores it for the dK/dV kernel (no launch of its own, and dO is read once less).


@triton.jit
def _dkdv_tile(
    dk, dv, k, v, Q_tile, DO_tile, LSE, DELTA, stride_qt, stride_dot,
    start_n, k_pos, start_m, offs_m, offs_d, q_offset,
    T_Q, T_K, qk_scale, seed, rng_base, dropout_p,
    HEAD_DIM: tl.constexpr, CAUSAL_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Add the queries ``start_m .. start_m + BLOCK_M`` to one key tile's dK and dV (transposed tiles)."""
    q_idx = start_m + offs_m  # (BLOCK_M,)
    row_ok = q_idx < T_Q
    q_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q_tile + q_idx[:, None] * stride_qt, mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
    do = tl.load(DO_tile + q_idx[:, None] * stride_dot, mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
    lse = tl.load(LSE + q_idx, mask=row_ok, other=0.0)  # (BLOCK_M,)
    delta = tl.load(DELTA + q_idx, mask=row_ok, other=0.0)  # (BLOCK_M,)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M) = S^T
    p_t = tl.exp2(s_t - lse[None, :])  # P^T
    if CAUSAL_MASK:
        p_t = tl.where(k_pos[:, None] <= (q_offset + q_idx)[None, :], p_t, 0.0)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M) = (dO V^T)^T
    pz_t = p_t
    if DROPOUT:
        keep_t = tl.trans(_keep_mask(seed, rng_base, q_idx, start_n, T_K, dropout_p, k_pos.shape[0]))
        z = 1.0 / (1.0 - dropout_p)
        pz_t = tl.where(keep_t, p_t * z, 0.0)
        dp_t = tl.where(keep_t, dp_t * z, 0.0)
    dv += tl.dot(pz_t.to(do.dtype), do, input_precision=DOT_PRECISION)  # (P * Z)^T dO
    ds_t = p_t * (dp_t - delta[None, :])  # dS^T, without the softmax scale
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)  # dS^T Q
    return dk, dv


@triton.jit(do_not_specialize=["T_Q", "T_K"])
def _attn_bwd_dkdv_kernel(
    Q, K, V,  # (B, H, Tq, D), (B, H, Tk, D), (B, H, Tk, D) forward inputs
    DO,  # (B, H, Tq, D) gradient of the output
    LSE,  # (B * H, Tq) fp32 log-sum-exp saved by the forward pass (log2 units)
    DELTA,  # (B * H, Tq) fp32 rowsum(dO * O)
    DK, DV,  # (B, H, Tk, D) out
    SEQLENS,  # (B,) int cache offsets (read only when HAS_CACHE)
    SEED,  # (1,) int64 Philox seed (read only when DROPOUT)
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dvb, stride_dvh, stride_dvt, stride_dvd,
    H, T_Q, T_K,
    qk_scale, softmax_scale, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_CACHE: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    off_bh = tl.program_id(1)
    b = off_bh // H
    h = off_bh % H
    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    K += b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    DO += b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    DK += b.to(tl.int64) * stride_dkb + h.to(tl.int64) * stride_dkh
    DV += b.to(tl.int64) * stride_dvb + h.to(tl.int64) * stride_dvh
    LSE += off_bh.to(tl.int64) * T_Q
    DELTA += off_bh.to(tl.int64) * T_Q
    q_offset = 0
    if HAS_CACHE:
        q_offset = tl.load(SEQLENS + b).to(tl.int32)
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)
    rng_base = off_bh.to(tl.int64) * T_Q * ((T_K + 15) // 16)

    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k_pos = start_n + offs_n  # (BLOCK_N,) key positions of this program
    kv_mask = (k_pos[:, None] < T_K) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + k_pos[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + k_pos[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    Q_tile = Q + offs_d[None, :] * stride_qd
    DO_tile = DO + offs_d[None, :] * stride_dod

    # Query i (position q_offset + i) sees key j when j <= q_offset + i. The first query tile that sees
    # any key of this tile starts at lo; from mid on, every query sees every key of the tile.
    lo = (tl.maximum(start_n - q_offset, 0) // BLOCK_M) * BLOCK_M
    all_seen = tl.maximum(start_n + BLOCK_N - 1 - q_offset, lo)
    mid = tl.minimum(lo + tl.cdiv(all_seen - lo, BLOCK_M) * BLOCK_M, T_Q)
    for start_m in range(lo, mid, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, Q_tile, DO_tile, LSE, DELTA, stride_qt, stride_dot,
                            start_n, k_pos, start_m, offs_m, offs_d, q_offset, T_Q, T_K, qk_scale, seed, rng_base,
                            dropout_p, HEAD_DIM, True, DROPOUT, DOT_PRECISION)
    for start_m in range(mid, T_Q, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, Q_tile, DO_tile, LSE, DELTA, stride_qt, stride_dot,
                            start_n, k_pos, start_m, offs_m, offs_d, q_offset, T_Q, T_K, qk_scale, seed, rng_base,
                            dropout_p, HEAD_DIM, False, DROPOUT, DOT_PRECISION)

    dk = dk * softmax_scale
    tl.store(DK + k_pos[:, None] * stride_dkt + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + k_pos[:, None] * stride_dvt + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_tile(
    dq, q, do, lse, delta, K_tile, V_tile, stride_kt, stride_vt,
    q_pos, start_n, offs_m, offs_n, offs_d,
    T_K, qk_scale, seed, rng_base, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Add the keys ``start_n .. start_n + BLOCK_N`` to one query tile's dQ."""
    k_pos = start_n + offs_n
    k, v = _load_kv(K_tile, V_tile, stride_kt, stride_vt, k_pos, offs_d, T_K, HEAD_DIM, BLOCK_D, CAUSAL_MASK)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
    p = tl.exp2(s - lse[:, None])
    if CAUSAL_MASK:
        p = tl.where((k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < T_K), p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N) = dO V^T
    if DROPOUT:
        keep = _keep_mask(seed, rng_base, offs_m, start_n, T_K, dropout_p, offs_n.shape[0])
        dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)  # dS K
    return dq


@triton.jit(do_not_specialize=["T_Q", "T_K"])
def _attn_bwd_dq_kernel(
    Q, K, V,  # (B, H, Tq, D), (B, H, Tk, D), (B, H, Tk, D) forward inputs
    DO,  # (B, H, Tq, D) gradient of the output
    O,  # (B, H, Tq, D) forward output
    LSE,  # (B * H, Tq) fp32 log-sum-exp (log2 units)
    DELTA,  # (B * H, Tq) fp32 out: rowsum(dO * O), for the dK/dV kernel
    DQ,  # (B, H, Tq, D) out
    SEQLENS,  # (B,) int cache offsets (read only when HAS_CACHE)
    SEED,  # (1,) int64 Philox seed (read only when DROPOUT)
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    H, T_Q, T_K,
    qk_scale, softmax_scale, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_CACHE: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)  # the query tiles that see the most keys first
    off_bh = tl.program_id(1)
    b = off_bh // H
    h = off_bh % H
    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    K += b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    DO += b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    O += b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    DQ += b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
    LSE += off_bh.to(tl.int64) * T_Q
    DELTA += off_bh.to(tl.int64) * T_Q
    offset = 0
    if HAS_CACHE:
        offset = tl.load(SEQLENS + b).to(tl.int32)
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)
    rng_base = off_bh.to(tl.int64) * T_Q * ((T_K + 15) // 16)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_pos = offset + offs_m
    row_ok = offs_m < T_Q
    q_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod, mask=q_mask, other=0.0)
    o = tl.load(O + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od, mask=q_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BLOCK_M,)
    tl.store(DELTA + offs_m, delta, mask=row_ok)
    lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    K_tile = K + offs_d[None, :] * stride_kd
    V_tile = V + offs_d[None, :] * stride_vd

    full_end = (tl.minimum(offset + start_m * BLOCK_M, T_K) // BLOCK_N) * BLOCK_N
    end = tl.minimum(offset + (start_m + 1) * BLOCK_M, T_K)
    for start_n in range(0, full_end, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, K_tile, V_tile, stride_kt, stride_vt, q_pos, start_n, offs_m,
                      offs_n, offs_d, T_K, qk_scale, seed, rng_base, dropout_p, HEAD_DIM, BLOCK_D, False, DROPOUT,
                      DOT_PRECISION)
    for start_n in range(full_end, end, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, K_tile, V_tile, stride_kt, stride_vt, q_pos, start_n, offs_m,
                      offs_n, offs_d, T_K, qk_scale, seed, rng_base, dropout_p, HEAD_DIM, BLOCK_D, True, DROPOUT,
                      DOT_PRECISION)

    dq = dq * softmax_scale
    tl.store(DQ + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=q_mask)


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------
# One config per (kernel, padded head dim); the decode kernel has two, bucketed by cache length. No
# autotuning: a config is a pure function of (arch, dtype, head dim, bucket), so a growing cache never
# re-tunes, and bench.resources can prove every one of them fits before it is ever launched.

_DECODE_MAX_QUERIES = 16  # a call with a cache and at most this many queries uses the decode configs
_DECODE_LONG = 1024  # cache length from which the decode configs take wider key tiles


def _cfg(kernel, block_d, block_m, block_n, num_warps, num_stages, **extra):
    return dict(kernel=kernel, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
                num_warps=num_warps, num_stages=num_stages, **extra)


def _block_d(head_dim):
    return max(16, triton.next_power_of_2(head_dim))


def configs(arch, dtype):
    """Every config a launch on ``arch`` (None: the CPU interpreter) with ``dtype`` inputs may use.

    Keys: ``kernel`` ("fwd", "decode", "combine", "bwd_dkdv", "bwd_dq"), ``BLOCK_D`` (padded head
    dim), ``BLOCK_M`` (queries per tile), ``BLOCK_N`` (keys per tile), ``num_warps``, ``num_stages``;
    decode configs also carry ``bucket``: "short" cache, or "long" (split over the keys, then merged by
    the "combine" kernel). The kernels that draw the dropout mask ("fwd", "decode", "bwd_dkdv",
    "bwd_dq") have a config for each value of ``dropout`` (the mask's random bytes need registers, so a
    tile that fits without them may spill with them; the mask does not depend on the tile).
    """
    out = []
    if arch is None:  # the interpreter: one fixed config per kernel, small tiles, uneven M/N
        for d in HEAD_DIMS:
            for dropout in (False, True):
                out += [_cfg("fwd", d, 64, 32, 4, 1, dropout=dropout),
                        _cfg("decode", d, 16, 32, 4, 1, bucket="short", dropout=dropout),
                        _cfg("decode", d, 16, 32, 4, 1, bucket="long", dropout=dropout),
                        _cfg("bwd_dkdv", d, 32, 64, 4, 1, dropout=dropout), _cfg("bwd_dq", d, 64, 32, 4, 1, dropout=dropout)]
            out += [_cfg("combine", d, 16, d, 4, 1)]
        return out
    if arch not in SUPPORTED_ARCHS:
        return []  # sm_75: its 64 KB of shared memory and no bf16 tensor cores -- the reference runs there
    for d in HEAD_DIMS:
        for dropout in (False, True):
            out += [dict(c, dropout=dropout) for c in _tiles(arch, dtype != torch.float32, d, dropout)]
        out += [_cfg("combine", d, 16, d, 4, 1)]
    return out


def _tiles(arch, wide, d, dropout):
    """The fwd, short and long decode, dkdv and dq configs for head dim ``d`` on ``arch``: ``wide`` for
    16-bit inputs. ptxas's choices do not follow a tile's size (a smaller tile can spill where a larger
    one does not), so each exception below is a config that spilled there, with the one that replaced
    it; ``python -m bench.resources`` compiles them all, and the tests hold GPT-2's."""
    big_smem = arch in (80, 90)  # 163 KB / 227 KB a block; sm_86/89/120 have 99 KB
    stages = 3 if big_smem else 2
    if wide:
        if d <= 64:
            # sm_90 (and sm_120, where 4 warps spill): 128 queries on 8 warps, two blocks an SM on
            # sm_90; on sm_80/86/89 the same 16 queries a warp in 64-query blocks of 4 warps, which
            # hold ~156-168 registers a thread -- three blocks an SM where the 8-warp block fitted one
            if arch in (80, 86, 89):
                fwd = _cfg("fwd", d, 64, 32 if d == 32 and arch != 80 else 64, 4, stages)  # 64 x 64 spills
            else:
                fwd = _cfg("fwd", d, 128, 32 if d == 16 and arch == 120 else 64, 8, stages)  # 128 x 64 spills
            dkdv = _cfg("bwd_dkdv", d, 32, 128, 8, stages)
            dq = _cfg("bwd_dq", d, 128, 16 if dropout and arch == 120 else 32, 8, stages)  # 128 x 32 spills
        else:
            if dropout and arch in (86, 89, 120):  # 128 x 32 on 8 warps spills there with the mask
                fwd = _cfg("fwd", d, 64, 32, 4, stages)
            else:
                fwd = _cfg("fwd", d, 128, 64 if arch == 90 else 32, 8, stages)
            dkdv = _cfg("bwd_dkdv", d, 32, 64, 8, stages)
            dq = _cfg("bwd_dq", d, 64, 32, 8, stages)
        short = _cfg("decode", d, 16, 64, 4, stages, bucket="short")
        long_n = 128 if d <= 64 and not (dropout and arch == 90) else 64  # 128 keys spill there at D=32
        long = _cfg("decode", d, 16, long_n, 4, stages, bucket="long")
    else:  # fp32 tiles hold twice the bytes and ieee dots keep more in registers
        warps = 4 if d <= 64 else 8
        if d <= 64:
            fwd = _cfg("fwd", d, 32, 32, 4, 2)
            dkdv = _cfg("bwd_dkdv", d, 32, 32, 8 if dropout and arch == 120 else 4, 2)  # 4 warps spill
            # 4 warps spill without the mask at D=64 on sm_80/86/89
            dq = _cfg("bwd_dq", d, 32, 32, 8 if d == 64 and not dropout and arch in (80, 86, 89) else 4, 2)
        else:  # 32 x 32 tiles spill on sm_90 and sm_120 (dQ: and on sm_80/86/89)
            fwd = _cfg("fwd", d, 32, 16, 4 if dropout and arch == 90 else 8, 2)
            dkdv = _cfg("bwd_dkdv", d, 16 if arch in (90, 120) else 32, 32, 8, 2)
            dq = _cfg("bwd_dq", d, 32, 16, 8, 2)
        short = _cfg("decode", d, 16, 32, warps, 2, bucket="short")
        long_n = 32 if d > 64 or d == 16 or (dropout and arch == 90) else 64
        long = _cfg("decode", d, 16, long_n, 4 if dropout and d > 64 and arch in (86, 89) else warps, 2,
                    bucket="long")
    return [fwd, short, long, dkdv, dq]


def _pick(arch, dtype, kernel, head_dim, t_q=None, t_k=None, dropout=False):
    d = _block_d(head_dim)
    bucket = None
    if kernel == "fwd" and t_q is not None and t_q <= _DECODE_MAX_QUERIES and t_k is not None:
        kernel, bucket = "decode", ("long" if t_k >= _DECODE_LONG else "short")
    for c in configs(arch, dtype):
        if (c["kernel"] == kernel and c["BLOCK_D"] == d and c.get("bucket") == bucket
                and c.get("dropout", dropout) == dropout):
            return c
    raise KeyError(f"attention: no {kernel} config for head dim {head_dim} on arch {arch}")


_SIG_NAMES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def resource_specs(arch, dtype):
    """What ``python -m bench.resources`` compiles: every config of :func:`configs` as it launches, with
    or without dropout as the config says, in its costliest variant otherwise (a cache, and the key
    split for long ones, in the decode configs), head-dim stride 1 as at runtime."""
    ptr = _SIG_NAMES[dtype]
    precision = "ieee" if dtype == torch.float32 else "tf32"
    specs = []
    for c in configs(arch, dtype):
        kernel = c["kernel"]
        common = {"HEAD_DIM": c["BLOCK_D"], "BLOCK_D": c["BLOCK_D"]}
        if kernel in ("fwd", "decode"):
            fn = _attn_fwd_kernel
            tensors = {"Q": ptr, "K": ptr, "V": ptr, "O": ptr, "LSE": "*fp32", "SEQLENS": "*i64", "SEED": "*i64",
                       "PART_ACC": "*fp32", "PART_M": "*fp32", "PART_L": "*fp32"}
            groups = "qkvo"
            scalars = {"H": "i32", "T_Q": "i32", "T_K": "i32", "split_len": "i32", "qk_scale": "fp32",
                       "dropout_p": "fp32"}
            const = dict(common, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], HAS_CACHE=kernel == "decode",
                         DROPOUT=c["dropout"], SPLIT_KV=c.get("bucket") == "long", DOT_PRECISION=precision)
        elif kernel == "combine":
            fn = _attn_fwd_combine_kernel
            tensors = {"PART_ACC": "*fp32", "PART_M": "*fp32", "PART_L": "*fp32", "O": ptr, "LSE": "*fp32"}
            groups = ["o"]
            scalars = {"H": "i32", "T_Q": "i32", "num_splits": "i32"}
            const = dict(common, BLOCK_M=c["BLOCK_M"])
        else:
            fn = _attn_bwd_dkdv_kernel if kernel == "bwd_dkdv" else _attn_bwd_dq_kernel
            outs = {"DK": ptr, "DV": ptr} if kernel == "bwd_dkdv" else {"O": ptr, "DQ": ptr}
            tensors = {"Q": ptr, "K": ptr, "V": ptr, "DO": ptr, "LSE": "*fp32", "DELTA": "*fp32", **outs,
                       "SEQLENS": "*i64", "SEED": "*i64"}
            groups = ["q", "k", "v", "do"] + (["dk", "dv"] if kernel == "bwd_dkdv" else ["o", "dq"])
            scalars = {"H": "i32", "T_Q": "i32", "T_K": "i32", "qk_scale": "fp32", "softmax_scale": "fp32",
                       "dropout_p": "fp32"}
            const = dict(common, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], HAS_CACHE=False, DROPOUT=c["dropout"],
                         DOT_PRECISION=precision)
        signature = dict(tensors)
        for g in groups:
            for axis in "bht":
                signature[f"stride_{g}{axis}"] = "i32"
            signature[f"stride_{g}d"] = "constexpr"
            const[f"stride_{g}d"] = 1
        signature.update(scalars)
        for name in const:
            if not name.startswith("stride_"):
                signature[name] = "constexpr"
        signature = {name: signature[name] for name in fn.arg_names}  # in the kernel's argument order
        label = f"{kernel} D={c['BLOCK_D']} BLOCK_M={c['BLOCK_M']} BLOCK_N={c['BLOCK_N']}"
        if "bucket" in c:
            label += f" ({c['bucket']} cache)"
        if c.get("dropout"):
            label += " dropout"
        specs.append({"kernel": fn, "signature": signature, "constexprs": const, "num_warps": c["num_warps"],
                      "num_stages": c["num_stages"], "label": label})
    return specs


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # 16-bit dots ignore it; fp32 stays exact


def _launch_fwd(q, k, v, cache_seqlens, seed, dropout_p, softmax_scale, arch, wrap):
    b, h, t_q, d = q.shape
    t_k = k.shape[2]
    o = torch.empty_like(q)  # keeps q's layout: (B, T, H, D) memory when q came from the projections
    lse = torch.empty((b, h, t_q), device=q.device, dtype=torch.float32)
    if o.numel() == 0:
        return o, lse
    c = _pick(arch, q.dtype, "fwd", d, t_q if cache_seqlens is not None else None, t_k, dropout_p > 0.0)
    m_tiles = triton.cdiv(t_q, c["BLOCK_M"])
    splits, split_len = 1, t_k
    if c.get("bucket") == "long":  # flash-decoding: spread a long cache over programs, merge after
        splits, split_len = _kv_splits(b * h * m_tiles, t_k, c["BLOCK_N"], q.device)
    part_acc = part_m = part_l = lse  # placeholders: only read when SPLIT_KV
    if splits > 1:
        part_acc = torch.empty((b * h, splits, t_q, c["BLOCK_D"]), device=q.device, dtype=torch.float32)
        part_m = torch.empty((b * h, splits, t_q), device=q.device, dtype=torch.float32)
        part_l = torch.empty_like(part_m)
    wrap(_attn_fwd_kernel)[(m_tiles, b * h, splits)](
        q, k, v, o, lse,
        cache_seqlens if cache_seqlens is not None else lse,
        seed if seed is not None else lse,
        part_acc, part_m, part_l,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        h, t_q, t_k, split_len, softmax_scale * LOG2E, dropout_p,
        HEAD_DIM=d, BLOCK_D=c["BLOCK_D"], BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"],
        HAS_CACHE=cache_seqlens is not None, DROPOUT=dropout_p > 0.0, SPLIT_KV=splits > 1,
        DOT_PRECISION=_precision(q.dtype), num_warps=c["num_warps"], num_stages=c["num_stages"],
    )
    if splits > 1:
        cc = _pick(arch, q.dtype, "combine", d)
        wrap(_attn_fwd_combine_kernel)[(triton.cdiv(t_q, cc["BLOCK_M"]), b * h)](
            part_acc, part_m, part_l, o, lse, *o.stride(), h, t_q, splits,
            HEAD_DIM=d, BLOCK_D=cc["BLOCK_D"], BLOCK_M=cc["BLOCK_M"], num_warps=cc["num_warps"],
        )
    return o, lse


_SM_COUNT: dict = {}


def _kv_splits(programs, t_k, block_n, device):
    """(number of key splits, keys per split) for a decode step: about two programs per SM in all,
    each split at least 4 key tiles long; the grid changes with the cache, the compiled kernel does not."""
    if device.type == "cuda":
        if device not in _SM_COUNT:
            _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
        sms = _SM_COUNT[device]
    else:
        sms = 4  # the interpreter: a few splits, so the tests cover the merge
    splits = max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(t_k, 4 * block_n), 64))
    split_len = triton.cdiv(triton.cdiv(t_k, splits), block_n) * block_n
    return triton.cdiv(t_k, split_len), split_len


def _launch_bwd(do, q, k, v, o, lse, cache_seqlens, seed, dropout_p, softmax_scale, arch, wrap):
    b, h, t_q, d = q.shape
    t_k = k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    delta = torch.empty((b, h, t_q), device=q.device, dtype=torch.float32)  # written by the dQ kernel
    seqlens = cache_seqlens if cache_seqlens is not None else lse
    seed_ptr = seed if seed is not None else lse
    flags = dict(HAS_CACHE=cache_seqlens is not None, DROPOUT=dropout_p > 0.0, DOT_PRECISION=_precision(q.dtype))
    c = _pick(arch, q.dtype, "bwd_dq", d, dropout=dropout_p > 0.0)
    wrap(_attn_bwd_dq_kernel)[(triton.cdiv(t_q, c["BLOCK_M"]), b * h)](
        q, k, v, do, o, lse, delta, dq, seqlens, seed_ptr,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *o.stride(), *dq.stride(),
        h, t_q, t_k, softmax_scale * LOG2E, softmax_scale, dropout_p,
        HEAD_DIM=d, BLOCK_D=c["BLOCK_D"], BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], **flags,
        num_warps=c["num_warps"], num_stages=c["num_stages"],
    )
    c = _pick(arch, q.dtype, "bwd_dkdv", d, dropout=dropout_p > 0.0)
    wrap(_attn_bwd_dkdv_kernel)[(triton.cdiv(t_k, c["BLOCK_N"]), b * h)](
        q, k, v, do, lse, delta, dk, dv, seqlens, seed_ptr,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        h, t_q, t_k, softmax_scale * LOG2E, softmax_scale, dropout_p,
        HEAD_DIM=d, BLOCK_D=c["BLOCK_D"], BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], **flags,
        num_warps=c["num_warps"], num_stages=c["num_stages"],
    )
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------
# The custom ops and their autograd
# --------------------------------------------------------------------------------------------------
# torch.library.triton_op keeps each op whole under torch.compile (wrap_triton lets the compiler see
# the kernels); eagerly, and under Triton's interpreter, it runs the launchers as they are. ``arch``
# is -1 for the interpreter.


def _arch(arch):
    return None if arch < 0 else arch


def _wrap(kernel):
    """wrap_triton, except that under Triton's interpreter -- where wrap_triton hands back the bare
    interpreted kernel -- a launch on FakeTensors (shape propagation, torch.compile tracing) does nothing,
    as the traced kernel call does on a GPU."""
    wrapped = wrap_triton(kernel)
    if wrapped is not kernel:
        return wrapped

    class _Launcher:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                if any(isinstance(a, torch._subclasses.FakeTensor) for a in args):
                    return None
                return kernel[grid](*args, **kwargs)

            return launch

    return _Launcher()


@torch.library.triton_op("gptfast::flash_attention_fwd", mutates_args=())
def flash_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_seqlens: torch.Tensor | None,
                        seed: torch.Tensor | None, dropout_p: float, softmax_scale: float,
                        arch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, Tq, D) output and the (B, H, Tq) fp32 log-sum-exp (log2 units) the backward needs."""
    return _launch_fwd(q, k, v, cache_seqlens, seed, dropout_p, softmax_scale, _arch(arch), _wrap)


@torch.library.triton_op("gptfast::flash_attention_bwd", mutates_args=())
def flash_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                        lse: torch.Tensor, cache_seqlens: torch.Tensor | None, seed: torch.Tensor | None,
                        dropout_p: float, softmax_scale: float,
                        arch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv -- deterministic: every gradient element is written by exactly one program."""
    return _launch_bwd(do, q, k, v, o, lse, cache_seqlens, seed, dropout_p, softmax_scale, _arch(arch), _wrap)


def _setup_context(ctx, inputs, output):
    q, k, v, cache_seqlens, seed, dropout_p, softmax_scale, arch = inputs
    o, lse = output
    # O(T) per (batch, head): the inputs, the output and one fp32 number per query row -- never P.
    ctx.save_for_backward(q, k, v, o, lse, cache_seqlens, seed)
    ctx.dropout_p, ctx.softmax_scale, ctx.arch = dropout_p, softmax_scale, arch
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, cache_seqlens, seed = ctx.saved_tensors
    dq, dk, dv = torch.ops.gptfast.flash_attention_bwd(do, q, k, v, o, lse, cache_seqlens, seed, ctx.dropout_p,
                                                       ctx.softmax_scale, ctx.arch)
    return dq, dk, dv, None, None, None, None, None


torch.library.register_autograd("gptfast::flash_attention_fwd", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# The public function
# --------------------------------------------------------------------------------------------------


def unsupported_reason(fn_name, q, k, v, *args):
    """Why the kernel cannot take these inputs, or None (``gptfast.ops`` has checked shapes already)."""
    if fn_name != "causal_attention":
        return f"attention kernel: no function {fn_name!r}"
    if q.dtype not in _SIG_NAMES:
        return f"attention kernel: dtype {q.dtype} is not supported; cast q, k, v to float32, float16 or bfloat16"
    d = q.shape[-1]
    if d > max(HEAD_DIMS):
        return (f"attention kernel: head dim {d} > {max(HEAD_DIMS)} is not supported; use fewer, wider heads' "
                f"split (n_heads so that emb_dim / n_heads <= {max(HEAD_DIMS)}) or backend='reference'")
    if k.shape[2] == 0 and q.shape[2] > 0:
        return "attention kernel: k/v have no tokens; every query needs at least key 0"
    for name, t in (("q", q), ("k", k), ("v", v)):
        reach = sum((n - 1) * abs(s) for n, s in zip(t.shape[2:], t.stride()[2:]))
        if reach >= _MAX_OFFSET:
            return (f"attention kernel: one (batch, head) slice of {name} spans {reach} elements (>= 2**31); "
                    f"split the sequence or use backend='reference'")
    return None


def effective_dropout_p(p: float) -> float:
    """The dropout probability the kernels apply for a requested ``p`` in [0, 1): the nearest multiple
    of 1/256, and at least 1/256 when ``p > 0`` (each decision compares one random byte with
    ``256 p``). 0.1 becomes 26/256 = 0.1016; survivors are scaled by 1 / (1 - that)."""
    p = float(p)
    if p <= 0.0:
        return 0.0
    return min(255, max(1, round(p * 256))) / 256


def causal_attention(q, k, v, *, dropout_p=0.0, softmax_scale=None, cache_seqlens=None, arch=None):
    """Causal scaled dot-product attention, the kernel twin of :func:`gptfast.reference.causal_attention`.

    q: (B, H, Tq, D); k, v: (B, H, Tk, D), any strides (the model's ``view(B, T, H, D).transpose(1, 2)``
    is read as it is). Without ``cache_seqlens`` Tq == Tk and query i sees keys 0..i. With
    ``cache_seqlens`` (B,) int, query i of row b sits at position ``cache_seqlens[b] + i`` of the cache
    k/v and sees keys up to it. ``softmax_scale`` defaults to 1/sqrt(D). ``dropout_p`` drops attention
    weights after the softmax with the probability :func:`effective_dropout_p` rounds it to (a multiple
    of 1/256), survivors scaled by 1/(1 - that); the mask comes from a seed drawn from
    torch's default generator of q's device, so ``torch.manual_seed`` reproduces it. ``arch``: the CUDA
    arch (e.g. 86) whose configs to use, None for Triton's CPU interpreter. Returns (B, H, Tq, D) in
    q's dtype, laid out like q. Differentiable in q, k and v (with or without a cache).
    """
    problem = unsupported_reason("causal_attention", q, k, v)
    if problem:
        raise ValueError(problem)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    softmax_scale = float(softmax_scale)
    if not 0.0 < softmax_scale < math.inf:  # the kernels fold it into the exponent: the max needs it > 0
        raise ValueError(f"causal_attention: softmax_scale must be a positive number, got {softmax_scale}")
    dropout_p = effective_dropout_p(dropout_p)
    seed = None
    if dropout_p > 0.0:  # drawn now, so torch.manual_seed and checkpointing's RNG replay reproduce it
        seed = torch.randint(0, 2**62, (1,), device=q.device, dtype=torch.int64)
    o, _ = torch.ops.gptfast.flash_attention_fwd(q, k, v, cache_seqlens, seed, dropout_p, softmax_scale,
                                                 -1 if arch is None else int(arch))
    return o
