"""FlashAttention-2 style Triton kernels for masked diffusion attention, forward and backward.

Layout: q ``[B, H, T, Dh]``, k/v ``[B, H_kv, T, Dh]`` with any strides (what transformers' attention
interface hands over: ``[B, T, H, Dh]`` memory seen through ``.transpose(1, 2)``); query head ``h`` reads
K/V head ``h // (H // H_kv)`` (GQA by index, no repeat).

Masks, computed from indices (no mask tensor):

* BD3LM (docs/method.md §2.3), ``T = 2L``. Query rows of x_t block ``b`` see x_t keys of block ``b`` and
  x_0 keys of blocks ``< b``; x_0 rows of block ``b`` see x_0 keys of blocks ``<= b``. Each program
  derives from (L, K) which key tiles its query tile needs: a *full* range that every row may attend
  (no mask arithmetic), and at most two *masked* ranges (the staircase / diagonal tiles) where the
  predicate is evaluated per element. Every other tile is skipped. Backward (dK/dV) mirrors this with
  the ranges of query tiles that see a key tile.
* Key lengths (``HAS_KEY_LENS``): sequence ``b`` has ``key_lens[b]`` real tokens; (i, j) is allowed
  iff ``i, j < key_lens[b]``. Tiles past the length are skipped; padding rows give 0.

Numerics: scores in base 2 (``qk_scale = scale * log2(e)``), fp32 accumulation (fp64 for fp64 inputs),
online softmax. The forward saves ``lse2 = m + log2(l)`` per row (base 2), or ``+inf`` for a row with no
key, so that the backward's ``exp2(s - lse2)`` is 0 there. The backward is two kernels after a
``delta = rowsum(dO * O)`` preprocess: dQ per query tile, and dK/dV per key tile looping over the
query heads of its group (no atomics).
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl
from tide_kernels.common import autotune_configs, compute_dtypes, is_interpreter, pick_kernel

__all__ = ["bd3lm_attention_bwd", "bd3lm_attention_fwd"]

_LOG2E = math.log2(math.e)
# Tuned once per (L, K) and head geometry; key-lengths mode passes the power-of-two bucket of T as
# ``seq_len`` (see _mask_args), so a teacher whose padded length changes every batch tunes once per bucket.
_KEY = ["seq_len", "block_size", "HEAD_DIM", "GROUP", "CLEAN_FIRST", "HAS_KEY_LENS"]


def _configs(blocks: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in blocks]


_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)
# (BLOCK_M, BLOCK_N, warps, stages). Checked by compiling for sm_90 (bf16, Dh=128, contiguous last dimension
# as launched) with ptxas -v: no config spills (tests/kernels/compile_report.py, bench_results/
# triton_compile_report.md). dK/dV holds two fp32 [BLOCK_N, Dh] accumulators plus K and V: with 8 warps and
# BLOCK_M = 16 (or 32 x 32) it fits in 255 registers; 32 x 64, 64 x 64 and 32 x 128 spilled. The autotuner
# picks on the device.
_FWD_CONFIGS = _configs([(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 4, 4)])
_DQ_CONFIGS = _configs([(128, 32, 8, 3), (64, 32, 4, 3), (128, 64, 8, 3), (64, 64, 8, 3)])
_DKDV_CONFIGS = _configs([(16, 64, 8, 3), (32, 32, 8, 3), (16, 128, 8, 2), (16, 32, 4, 3)])


@triton.jit
def _allowed(q_idx, k_idx, seq_len, block_size, key_len, CLEAN_FIRST: tl.constexpr, HAS_KEY_LENS: tl.constexpr):
    """May query ``q_idx`` attend to key ``k_idx``? Broadcasts ``[BM, 1]`` x ``[1, BN]`` (or transposed)."""
    if HAS_KEY_LENS:
        ok = (q_idx < key_len) & (k_idx < key_len)
    else:
        q_second = q_idx >= seq_len
        k_second = k_idx >= seq_len
        q_block = (q_idx - tl.where(q_second, seq_len, 0)) // block_size
        k_block = (k_idx - tl.where(k_second, seq_len, 0)) // block_size
        if CLEAN_FIRST:
            q_clean = ~q_second
            k_clean = ~k_second
        else:
            q_clean = q_second
            k_clean = k_second
        # docs/method.md §2.3: block-diagonal within a copy, or a clean key of a strictly earlier block (the offset
        # block-causal and block-causal terms; the equal-block clean/clean case is block-diagonal).
        ok = ((q_block == k_block) & (q_clean == k_clean)) | (k_clean & (q_block > k_block))
    return ok


@triton.jit
def _key_len(key_lens_ptr, b, num_tokens, HAS_KEY_LENS: tl.constexpr):
    """``key_lens[b]`` clamped to ``[0, T]`` (so that tile ranges stay in bounds); 0 when unused."""
    if HAS_KEY_LENS:
        out = tl.minimum(tl.maximum(tl.load(key_lens_ptr + b).to(tl.int32), 0), num_tokens)
    else:
        out = 0
    return out


@triton.jit
def _split_halves(lo, hi, seq_len, block_size, CLEAN_FIRST: tl.constexpr):
    """Blocks touched by the index range ``[lo, hi)``: (has_noisy, first, last, has_clean, first, last)."""
    first_a = lo // block_size
    first_b = (tl.minimum(hi, seq_len) - 1) // block_size
    has_first = lo < seq_len
    second_a = (tl.maximum(lo, seq_len) - seq_len) // block_size
    # Only used when has_second, i.e. hi > seq_len, so the division sees a non-negative number.
    second_b = (tl.maximum(hi, seq_len + 1) - 1 - seq_len) // block_size
    has_second = hi > seq_len
    if CLEAN_FIRST:
        out = has_second, second_a, second_b, has_first, first_a, first_b
    else:
        out = has_first, first_a, first_b, has_second, second_a, second_b
    return out


@triton.jit
def _copy_bases(seq_len, CLEAN_FIRST: tl.constexpr):
    """Global index of the first token of the (noisy, clean) copies."""
    if CLEAN_FIRST:
        out = seq_len, seq_len * 0
    else:
        out = seq_len * 0, seq_len
    return out


@triton.jit
def _scale(x, scale_hi, scale_lo, ACC_DTYPE: tl.constexpr):
    """``x * scale`` where the host split ``scale`` into fp32 ``scale_hi + scale_lo`` (float args reach kernels
    as fp32; the second term keeps float64 runs exact)."""
    if ACC_DTYPE == tl.float64:
        out = x * scale_hi + x * scale_lo
    else:
        out = x * scale_hi
    return out


@triton.jit
def _key_ranges(m0, m1, seq_len, block_size, key_len, BLOCK_N: tl.constexpr, CLEAN_FIRST: tl.constexpr,
                HAS_KEY_LENS: tl.constexpr):
    """Key ranges for query rows ``[m0, m1)``: one full ``[a, b)`` then two masked ``[c, d)``, ``[e, f)``."""
    zero = m0 * 0
    if HAS_KEY_LENS:
        full_hi = tl.where(m1 <= key_len, key_len // BLOCK_N * BLOCK_N, zero)
        masked_hi = tl.where(m0 < key_len, key_len, zero)
        out = zero, full_hi, full_hi, masked_hi, zero, zero
    else:
        k = block_size
        has_n, n_a, n_b, has_c, c_a, c_b = _split_halves(m0, m1, seq_len, block_size, CLEAN_FIRST)
        noisy_base, clean_base = _copy_bases(seq_len, CLEAN_FIRST)
        # x_t rows of blocks [n_a, n_b] see clean keys of blocks < n_b (all rows: < n_a) and their own
        # x_t blocks; x_0 rows of blocks [c_a, c_b] see clean keys of blocks <= c_b (all rows: < c_a).
        clean_hi = tl.maximum(tl.where(has_n, n_b * k, zero), tl.where(has_c, (c_b + 1) * k, zero))
        full_hi = tl.minimum(tl.where(has_n, n_a * k, seq_len), tl.where(has_c, c_a * k, seq_len))
        full_hi = full_hi // BLOCK_N * BLOCK_N
        noisy_lo = tl.where(has_n, n_a * k, zero)
        noisy_hi = tl.where(has_n, (n_b + 1) * k, zero)
        out = (clean_base, clean_base + full_hi, clean_base + full_hi, clean_base + clean_hi,
               noisy_base + noisy_lo, noisy_base + noisy_hi)
    return out


@triton.jit
def _query_ranges(n0, n1, seq_len, block_size, key_len, BLOCK_M: tl.constexpr, CLEAN_FIRST: tl.constexpr,
                  HAS_KEY_LENS: tl.constexpr):
    """Query ranges that see keys ``[n0, n1)``: masked ``[a, b)``, full ``[b, c)``, masked ``[d, e)``, full ``[e, f)``."""
    zero = n0 * 0
    if HAS_KEY_LENS:
        full_hi = tl.where(n1 <= key_len, key_len // BLOCK_M * BLOCK_M, zero)
        masked_hi = tl.where(n0 < key_len, key_len, zero)
        # The full range comes first here: [0, full_hi) full, [full_hi, masked_hi) masked.
        out = full_hi, masked_hi, masked_hi, zero, zero, full_hi
    else:
        k = block_size
        has_n, n_a, n_b, has_c, c_a, c_b = _split_halves(n0, n1, seq_len, block_size, CLEAN_FIRST)
        noisy_base, clean_base = _copy_bases(seq_len, CLEAN_FIRST)
        # x_t keys of blocks [n_a, n_b] are seen by x_t rows of the same blocks; clean keys of blocks
        # [c_a, c_b] by x_t rows of blocks > c_a (all keys: > c_b) and x_0 rows of blocks >= c_a (all: >= c_b).
        clean_seen = has_c & ((c_a + 1) * k < seq_len)  # some x_t block lies after the first clean key
        nq_lo = tl.minimum(tl.where(has_n, n_a * k, seq_len), tl.where(clean_seen, (c_a + 1) * k, seq_len))
        nq_hi = tl.maximum(tl.where(has_n, (n_b + 1) * k, zero), tl.where(clean_seen, seq_len, zero))
        nq_lo = tl.minimum(nq_lo, nq_hi)
        nq_full = tl.where(has_n | ~clean_seen, nq_hi, seq_len - (seq_len - (c_b + 1) * k) // BLOCK_M * BLOCK_M)
        cq_lo = tl.where(has_c, c_a * k, seq_len)
        cq_full = tl.where(has_n, seq_len, seq_len - (seq_len - c_b * k) // BLOCK_M * BLOCK_M)
        out = (noisy_base + nq_lo, noisy_base + nq_full, noisy_base + nq_hi,
               clean_base + cq_lo, clean_base + cq_full, clean_base + seq_len)
    return out


@triton.jit
def _scaled(x, scale_hi, scale_lo, ACC_DTYPE: tl.constexpr):
    """``x * scale``; the host splits ``scale`` into ``scale_hi + scale_lo`` because float arguments reach a
    kernel as fp32, and the second term keeps float64 runs exact."""
    if ACC_DTYPE == tl.float64:
        out = x * scale_hi + x * scale_lo
    else:
        out = x * scale_hi
    return out


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, offs_m, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
               lo, hi, seq_len, block_size, key_len, qk_scale, qk_scale_lo,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CLEAN_FIRST: tl.constexpr, HAS_KEY_LENS: tl.constexpr,
               MASKED: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)  # [BN]
        k_ptrs = k_base + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :] * stride_kd
        v_ptrs = v_base + offs_n[:, None].to(tl.int64) * stride_vt + offs_d[None, :] * stride_vd
        if MASKED:
            in_range = offs_n < hi
            k = tl.load(k_ptrs, mask=in_range[:, None], other=0.0)  # [BN, D]
            v = tl.load(v_ptrs, mask=in_range[:, None], other=0.0)  # [BN, D]
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = _scaled(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE), qk_scale, qk_scale_lo, ACC_DTYPE)  # [BM, BN]
        if MASKED:
            ok = _allowed(offs_m[:, None], offs_n[None, :], seq_len, block_size, key_len, CLEAN_FIRST, HAS_KEY_LENS)
            s = tl.where(ok & in_range[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # [BM]
        # A row with no allowed key so far keeps m = -inf; shift by 0 there so exp2 never sees inf - inf.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])  # [BM, BN]
        alpha = tl.math.exp2(m_i - m_shift)  # [BM]
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)  # [BM, D]
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=autotune_configs(_FWD_CONFIGS, _INTERPRETER_CONFIG), key=_KEY)
@triton.jit
def _bd3lm_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, key_lens_ptr,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    num_heads, num_tokens, seq_len, block_size, qk_scale, qk_scale_lo,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, CLEAN_FIRST: tl.constexpr, HAS_KEY_LENS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # over B * H
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    key_len = _key_len(key_lens_ptr, b, num_tokens, HAS_KEY_LENS)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)  # [BM]
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < num_tokens
    rows = offs_m[:, None].to(tl.int64)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows * stride_qt + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)  # [BM, D]
    k_base = k_ptr + b * stride_kb + (h // GROUP) * stride_kh
    v_base = v_ptr + b * stride_vb + (h // GROUP) * stride_vh

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)
    full_lo, full_hi, a_lo, a_hi, b_lo, b_hi = _key_ranges(
        m0, tl.minimum(m0 + BLOCK_M, num_tokens), seq_len, block_size, key_len, BLOCK_N, CLEAN_FIRST, HAS_KEY_LENS)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, offs_m, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                               full_lo, full_hi, seq_len, block_size, key_len, qk_scale, qk_scale_lo,
                               HEAD_DIM, BLOCK_N, CLEAN_FIRST, HAS_KEY_LENS, False, ACC_DTYPE, DOT_PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, offs_m, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                               a_lo, a_hi, seq_len, block_size, key_len, qk_scale, qk_scale_lo,
                               HEAD_DIM, BLOCK_N, CLEAN_FIRST, HAS_KEY_LENS, True, ACC_DTYPE, DOT_PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, offs_m, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                               b_lo, b_hi, seq_len, block_size, key_len, qk_scale, qk_scale_lo,
                               HEAD_DIM, BLOCK_N, CLEAN_FIRST, HAS_KEY_LENS, True, ACC_DTYPE, DOT_PRECISION)

    empty = l_i == 0.0  # [BM]; a row with no key (key-lengths padding): output 0, lse +inf
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    o_ptrs = o_ptr + b * stride_ob + h * stride_oh + rows * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, (acc / l_safe[:, None]).to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + pid_bh * num_tokens + offs_m, lse, mask=row_ok)


@triton.jit
def _bd3lm_attention_bwd_preprocess_kernel(
    o_ptr, do_ptr, delta_ptr,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    num_heads, num_tokens,
    HEAD_DIM: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # over B * H
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < num_tokens
    rows = offs_m[:, None].to(tl.int64)
    o = tl.load(o_ptr + b * stride_ob + h * stride_oh + rows * stride_ot + offs_d[None, :] * stride_od,
                mask=row_ok[:, None], other=0.0).to(ACC_DTYPE)  # [BM, D]
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + rows * stride_dot + offs_d[None, :] * stride_dod,
                 mask=row_ok[:, None], other=0.0).to(ACC_DTYPE)  # [BM, D]
    tl.store(delta_ptr + pid_bh * num_tokens + offs_m, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, offs_m, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
              lo, hi, seq_len, block_size, key_len, qk_scale, qk_scale_lo,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CLEAN_FIRST: tl.constexpr, HAS_KEY_LENS: tl.constexpr,
              MASKED: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)  # [BN]
        k_ptrs = k_base + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :] * stride_kd
        v_ptrs = v_base + offs_n[:, None].to(tl.int64) * stride_vt + offs_d[None, :] * stride_vd
        if MASKED:
            in_range = offs_n < hi
            k = tl.load(k_ptrs, mask=in_range[:, None], other=0.0)  # [BN, D]
            v = tl.load(v_ptrs, mask=in_range[:, None], other=0.0)  # [BN, D]
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = _scaled(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE), qk_scale, qk_scale_lo, ACC_DTYPE)  # [BM, BN]
        if MASKED:
            ok = _allowed(offs_m[:, None], offs_n[None, :], seq_len, block_size, key_len, CLEAN_FIRST, HAS_KEY_LENS)
            s = tl.where(ok & in_range[None, :], s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])  # [BM, BN]
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)  # [BM, BN]
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)  # [BM, D]
    return dq


@triton.autotune(configs=autotune_configs(_DQ_CONFIGS, _INTERPRETER_CONFIG), key=_KEY)
@triton.jit
def _bd3lm_attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, lse_ptr, delta_ptr, key_lens_ptr,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    num_heads, num_tokens, seq_len, block_size, qk_scale, qk_scale_lo, sm_scale, sm_scale_lo,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, CLEAN_FIRST: tl.constexpr, HAS_KEY_LENS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # over B * H
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    key_len = _key_len(key_lens_ptr, b, num_tokens, HAS_KEY_LENS)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)  # [BM]
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < num_tokens
    rows = offs_m[:, None].to(tl.int64)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows * stride_qt + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)  # [BM, D]
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + rows * stride_dot + offs_d[None, :] * stride_dod,
                 mask=row_ok[:, None], other=0.0)  # [BM, D]
    lse = tl.load(lse_ptr + pid_bh * num_tokens + offs_m, mask=row_ok, other=float("inf"))  # [BM]
    delta = tl.load(delta_ptr + pid_bh * num_tokens + offs_m, mask=row_ok, other=0.0)  # [BM]
    k_base = k_ptr + b * stride_kb + (h // GROUP) * stride_kh
    v_base = v_ptr + b * stride_vb + (h // GROUP) * stride_vh

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=ACC_DTYPE)
    full_lo, full_hi, a_lo, a_hi, b_lo, b_hi = _key_ranges(
        m0, tl.minimum(m0 + BLOCK_M, num_tokens), seq_len, block_size, key_len, BLOCK_N, CLEAN_FIRST, HAS_KEY_LENS)
    dq = _dq_inner(dq, q, do, lse, delta, offs_m, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                   full_lo, full_hi, seq_len, block_size, key_len, qk_scale, qk_scale_lo,
                   HEAD_DIM, BLOCK_N, CLEAN_FIRST, HAS_KEY_LENS, False, ACC_DTYPE, DOT_PRECISION)
    dq = _dq_inner(dq, q, do, lse, delta, offs_m, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                   a_lo, a_hi, seq_len, block_size, key_len, qk_scale, qk_scale_lo,
                   HEAD_DIM, BLOCK_N, CLEAN_FIRST, HAS_KEY_LENS, True, ACC_DTYPE, DOT_PRECISION)
    dq = _dq_inner(dq, q, do, lse, delta, offs_m, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                   b_lo, b_hi, seq_len, block_size, key_len, qk_scale, qk_scale_lo,
                   HEAD_DIM, BLOCK_N, CLEAN_FIRST, HAS_KEY_LENS, True, ACC_DTYPE, DOT_PRECISION)
    dq = _scaled(dq, sm_scale, sm_scale_lo, ACC_DTYPE)  # dQ = scale * dS K
    tl.store(dq_ptr + b * stride_dqb + h * stride_dqh + rows * stride_dqt + offs_d[None, :] * stride_dqd,
             dq.to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dkdv_inner(dk, dv, k, v, offs_n, q_base, do_base, lse_base, delta_base,
                stride_qt, stride_qd, stride_dot, stride_dod,
                lo, hi, seq_len, block_size, key_len, qk_scale, qk_scale_lo,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CLEAN_FIRST: tl.constexpr, HAS_KEY_LENS: tl.constexpr,
                MASKED: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)  # [BM]
        rows = offs_m[:, None].to(tl.int64)
        q_ptrs = q_base + rows * stride_qt + offs_d[None, :] * stride_qd
        do_ptrs = do_base + rows * stride_dot + offs_d[None, :] * stride_dod
        if MASKED:
            in_range = offs_m < hi
            q = tl.load(q_ptrs, mask=in_range[:, None], other=0.0)  # [BM, D]
            do = tl.load(do_ptrs, mask=in_range[:, None], other=0.0)  # [BM, D]
            lse = tl.load(lse_base + offs_m, mask=in_range, other=0.0)  # [BM]
            delta = tl.load(delta_base + offs_m, mask=in_range, other=0.0)  # [BM]
        else:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        s_t = _scaled(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE), qk_scale, qk_scale_lo, ACC_DTYPE)  # [BN, BM]
        if MASKED:
            ok = _allowed(offs_m[None, :], offs_n[:, None], seq_len, block_size, key_len, CLEAN_FIRST, HAS_KEY_LENS)
            s_t = tl.where(ok & in_range[None, :], s_t, float("-inf"))
        p_t = tl.math.exp2(s_t - lse[None, :])  # [BN, BM]
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)  # [BN, D]
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)  # [BN, BM]
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)  # [BN, D]
    return dk, dv


@triton.autotune(configs=autotune_configs(_DKDV_CONFIGS, _INTERPRETER_CONFIG), key=_KEY)
@triton.jit
def _bd3lm_attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, lse_ptr, delta_ptr, key_lens_ptr,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dvb, stride_dvh, stride_dvt, stride_dvd,
    num_heads, num_kv_heads, num_tokens, seq_len, block_size, qk_scale, qk_scale_lo, sm_scale, sm_scale_lo,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, CLEAN_FIRST: tl.constexpr, HAS_KEY_LENS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # over B * H_kv
    b = pid_bh // num_kv_heads
    hk = pid_bh % num_kv_heads
    key_len = _key_len(key_lens_ptr, b, num_tokens, HAS_KEY_LENS)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)  # [BN]
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < num_tokens
    # Padding keys are never read, so their gradient is 0 whatever they hold (NaN included).
    if HAS_KEY_LENS:
        load_ok = offs_n < key_len
    else:
        load_ok = col_ok
    cols = offs_n[:, None].to(tl.int64)
    k = tl.load(k_ptr + b * stride_kb + hk * stride_kh + cols * stride_kt + offs_d[None, :] * stride_kd,
                mask=load_ok[:, None], other=0.0)  # [BN, D]
    v = tl.load(v_ptr + b * stride_vb + hk * stride_vh + cols * stride_vt + offs_d[None, :] * stride_vd,
                mask=load_ok[:, None], other=0.0)  # [BN, D]

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC_DTYPE)
    a_lo, a_full, a_hi, c_lo, c_full, c_hi = _query_ranges(
        n0, tl.minimum(n0 + BLOCK_N, num_tokens), seq_len, block_size, key_len, BLOCK_M, CLEAN_FIRST, HAS_KEY_LENS)
    # Every query head of the GQA group adds into this K/V head's gradient: loop here, no atomics.
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = q_ptr + b * stride_qb + h * stride_qh
        do_base = do_ptr + b * stride_dob + h * stride_doh
        lse_base = lse_ptr + (b * num_heads + h) * num_tokens
        delta_base = delta_ptr + (b * num_heads + h) * num_tokens
        dk, dv = _dkdv_inner(dk, dv, k, v, offs_n, q_base, do_base, lse_base, delta_base,
                             stride_qt, stride_qd, stride_dot, stride_dod, a_lo, a_full,
                             seq_len, block_size, key_len, qk_scale, qk_scale_lo,
                             HEAD_DIM, BLOCK_M, CLEAN_FIRST, HAS_KEY_LENS, True, ACC_DTYPE, DOT_PRECISION)
        dk, dv = _dkdv_inner(dk, dv, k, v, offs_n, q_base, do_base, lse_base, delta_base,
                             stride_qt, stride_qd, stride_dot, stride_dod, a_full, a_hi,
                             seq_len, block_size, key_len, qk_scale, qk_scale_lo,
                             HEAD_DIM, BLOCK_M, CLEAN_FIRST, HAS_KEY_LENS, False, ACC_DTYPE, DOT_PRECISION)
        dk, dv = _dkdv_inner(dk, dv, k, v, offs_n, q_base, do_base, lse_base, delta_base,
                             stride_qt, stride_qd, stride_dot, stride_dod, c_lo, c_full,
                             seq_len, block_size, key_len, qk_scale, qk_scale_lo,
                             HEAD_DIM, BLOCK_M, CLEAN_FIRST, HAS_KEY_LENS, True, ACC_DTYPE, DOT_PRECISION)
        dk, dv = _dkdv_inner(dk, dv, k, v, offs_n, q_base, do_base, lse_base, delta_base,
                             stride_qt, stride_qd, stride_dot, stride_dod, c_full, c_hi,
                             seq_len, block_size, key_len, qk_scale, qk_scale_lo,
                             HEAD_DIM, BLOCK_M, CLEAN_FIRST, HAS_KEY_LENS, False, ACC_DTYPE, DOT_PRECISION)
    dk = _scaled(dk, sm_scale, sm_scale_lo, ACC_DTYPE)  # dK = scale * dS^T Q
    tl.store(dk_ptr + b * stride_dkb + hk * stride_dkh + cols * stride_dkt + offs_d[None, :] * stride_dkd,
             dk.to(dk_ptr.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv_ptr + b * stride_dvb + hk * stride_dvh + cols * stride_dvt + offs_d[None, :] * stride_dvd,
             dv.to(dv_ptr.dtype.element_ty), mask=col_ok[:, None])


def _split_scale(x: float) -> tuple[float, float]:
    """``x`` as ``hi + lo`` with ``hi`` exactly representable in fp32 (see :func:`_scaled`)."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, x - hi


def _mask_args(num_tokens: int, seq_len: int | None, block_size: int | None, key_lens: torch.Tensor | None):
    """The kernels' (seq_len, block_size). Key-lengths mode ignores them, so they carry T's power-of-two
    bucket, an autotuning key."""
    if key_lens is not None:
        return triton.next_power_of_2(num_tokens), 1
    return seq_len, block_size


def bd3lm_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    seq_len: int | None,
    block_size: int | None,
    clean_first: bool,
    key_lens: torch.Tensor | None,
    scale: float,
    block_config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward: ``(out [B, H, T, Dh] (q's dtype), lse2 [B, H, T] (fp32, fp64 for fp64))``.

    Inputs are validated by :func:`tide_kernels.bd3lm_attention.bd3lm_attention`. ``block_config``
    (``BLOCK_M``, ``BLOCK_N``, optional ``num_warps``/``num_stages``) replaces autotuning.
    """
    batch, num_heads, num_tokens, head_dim = q.shape
    acc_dtype, tl_acc, precision = compute_dtypes(q.dtype)
    out = torch.empty_like(q)
    lse = torch.empty((batch, num_heads, num_tokens), dtype=acc_dtype, device=q.device)
    qk_hi, qk_lo = _split_scale(scale * _LOG2E)
    mask_len, mask_block = _mask_args(num_tokens, seq_len, block_size, key_lens)
    kernel, meta = pick_kernel(_bd3lm_attention_fwd_kernel, block_config)
    grid = lambda m: (triton.cdiv(num_tokens, m["BLOCK_M"]), batch * num_heads)
    kernel[grid](
        q, k, v, out, lse, key_lens if key_lens is not None else lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        num_heads, num_tokens, mask_len, mask_block, qk_hi, qk_lo,
        HEAD_DIM=head_dim, GROUP=num_heads // k.shape[1], CLEAN_FIRST=bool(clean_first),
        HAS_KEY_LENS=key_lens is not None, ACC_DTYPE=tl_acc, DOT_PRECISION=precision, **meta,
    )
    return out, lse


def bd3lm_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    seq_len: int | None,
    block_size: int | None,
    clean_first: bool,
    key_lens: torch.Tensor | None,
    scale: float,
    block_config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward: ``(dq, dk, dv)`` shaped and typed like ``(q, k, v)``; ``grad_out`` may have any strides."""
    batch, num_heads, num_tokens, head_dim = q.shape
    num_kv_heads = k.shape[1]
    _, tl_acc, precision = compute_dtypes(q.dtype)
    delta = torch.empty_like(lse)
    pre_block = 16 if is_interpreter() else 64
    _bd3lm_attention_bwd_preprocess_kernel[(triton.cdiv(num_tokens, pre_block), batch * num_heads)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), num_heads, num_tokens,
        HEAD_DIM=head_dim, ACC_DTYPE=tl_acc, BLOCK_M=pre_block,
    )
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    qk_hi, qk_lo = _split_scale(scale * _LOG2E)
    sm_hi, sm_lo = _split_scale(scale)
    mask_len, mask_block = _mask_args(num_tokens, seq_len, block_size, key_lens)
    key_lens_arg = key_lens if key_lens is not None else lse
    common = {
        "HEAD_DIM": head_dim, "GROUP": num_heads // num_kv_heads, "CLEAN_FIRST": bool(clean_first),
        "HAS_KEY_LENS": key_lens is not None, "ACC_DTYPE": tl_acc, "DOT_PRECISION": precision,
    }
    kernel, meta = pick_kernel(_bd3lm_attention_bwd_dq_kernel, block_config)
    grid = lambda m: (triton.cdiv(num_tokens, m["BLOCK_M"]), batch * num_heads)
    kernel[grid](
        q, k, v, grad_out, dq, lse, delta, key_lens_arg,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
        num_heads, num_tokens, mask_len, mask_block, qk_hi, qk_lo, sm_hi, sm_lo, **common, **meta,
    )
    kernel, meta = pick_kernel(_bd3lm_attention_bwd_dkdv_kernel, block_config)
    grid = lambda m: (triton.cdiv(num_tokens, m["BLOCK_N"]), batch * num_kv_heads)
    kernel[grid](
        q, k, v, grad_out, dk, dv, lse, delta, key_lens_arg,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
        num_heads, num_kv_heads, num_tokens, mask_len, mask_block, qk_hi, qk_lo, sm_hi, sm_lo, **common, **meta,
    )
    return dq, dk, dv
