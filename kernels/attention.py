"""Fused prefill attention, forward only, in the FlashAttention-2 style.

One program owns BLOCK_M query rows of one (sequence, query head). Its Q tile stays on chip; K/V tiles of BLOCK_N keys
stream through, and an online softmax (running row max m, running denominator l, fp32 accumulator) folds each tile in,
so the (seqlen_q, seqlen_k) score matrix is never written anywhere.

The same kernel serves the batched and the packed (varlen) layouts: a sequence's first row and length come either
from cu_seqlens (IS_VARLEN) or from the batch stride and the fixed lengths.

Masking is decided per tile, not per element: the key range a Q tile may see ([lo, hi)) is computed once and tiles
outside it are never visited (the loop bounds skip everything above the causal diagonal or outside the window);
inside it only the tiles that straddle a boundary (window left edge, causal diagonal / window right edge, end of the
sequence) build a score mask.

Softmax in base 2: scores are pre-multiplied by log2(e) so the inner loop uses exp2, and lse is converted back to
the natural log at the end.
"""
import triton
import triton.language as tl

# log2(e) and ln(2): exp(x) = exp2(x * LOG2E), log(x) = log2(x) * LN2. constexpr so jit functions can read them.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _tanh(x):
    # tanh(x) = 1 - 2 / (exp(2x) + 1): saturates to +-1 without nan (exp overflow gives inf -> 1, underflow 0 -> -1).
    # tl has no tanh that works both compiled and under the interpreter across triton 3.6-3.9.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def attention_fwd_kernel(
    Q, K, V, O, LSE, CU_SEQLENS_Q, CU_SEQLENS_K,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    stride_lb, stride_lh, stride_lm,
    seqlen_q_fixed, seqlen_k_fixed, num_heads, group,
    win_left, win_right, qk_scale, softcap,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_SOFTCAP: tl.constexpr, RETURN_LSE: tl.constexpr,
    FP32_DOT: tl.constexpr, IEEE: tl.constexpr,
):
    """Grid: (batch * num_heads, cdiv(max_seqlen_q, BLOCK_M)); batch * heads on axis 0, whose limit is 2**31 - 1.

    qk_scale = softmax scale * log2(e). win_left/win_right: -1 unbounded (causal passes win_right = 0).
    FP32_DOT: do both matmuls on fp32 tiles (the interpreter, whose bf16 dot is unreliable).
    IEEE: fp32 inputs, full-precision fp32 dot instead of TF32.
    """
    pid_bh = tl.program_id(0)
    # Q tiles in reverse: under causal masking the last tiles see the most keys, so they start first and the
    # short ones fill the tail of the launch.
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    kv_h = h // group  # GQA/MQA: query heads [kv_h * group, (kv_h + 1) * group) share KV head kv_h

    # ---- where this sequence lives
    if IS_VARLEN:
        q_first = tl.load(CU_SEQLENS_Q + b)
        seqlen_q = tl.load(CU_SEQLENS_Q + b + 1) - q_first
        k_first = tl.load(CU_SEQLENS_K + b)
        seqlen_k = tl.load(CU_SEQLENS_K + b + 1) - k_first
        q_start = q_first.to(tl.int64)  # row offsets into packed tensors may pass 2**31 elements
        k_start = k_first.to(tl.int64)
    else:
        q_start = 0
        seqlen_q = seqlen_q_fixed
        k_start = 0
        seqlen_k = seqlen_k_fixed
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM  # head_dim padded to a power of two: the extra lanes load 0 and are never stored
    row_ok = offs_m < seqlen_q

    q_base = Q + b.to(tl.int64) * stride_qb + q_start * stride_qm + h * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + k_start * stride_kn + kv_h * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + k_start * stride_vn + kv_h * stride_vh
    q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if FP32_DOT:
        q = q.to(tl.float32)
    # tile offsets within one BLOCK_N-key tile fit in int32; the tile's start is added to the pointers in 64 bits
    k_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None]
    v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]

    # ---- the key range this tile may see (bottom-right alignment: query i sits at p = i + seqlen_k - seqlen_q)
    pos_q = offs_m + (seqlen_k - seqlen_q)
    p_first = start_m + seqlen_k - seqlen_q
    p_last = tl.minimum(start_m + BLOCK_M, seqlen_q) - 1 + seqlen_k - seqlen_q
    # Scalar tl.where rather than `if`: both branches must give the same (tensor) type.
    lo = tl.where(win_left >= 0, (tl.maximum(p_first - win_left, 0) // BLOCK_N) * BLOCK_N, 0)
    full_lo = tl.where(win_left >= 0, tl.cdiv(tl.maximum(p_last - win_left, 0), BLOCK_N) * BLOCK_N, 0)
    hi = tl.where(win_right >= 0, tl.minimum(seqlen_k, tl.maximum(p_last + win_right + 1, 0)), seqlen_k)
    full_hi = (seqlen_k // BLOCK_N) * BLOCK_N  # tiles past this one hang over the end of the sequence
    full_hi = tl.where(win_right >= 0,
                       tl.minimum(full_hi, (tl.maximum(p_first + win_right + 1, 0) // BLOCK_N) * BLOCK_N), full_hi)
    # order the three ranges: lo <= full_lo <= full_hi <= hi
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (base-2 scores)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                  # running softmax denominator
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)         # running unnormalised output
    # the first visited tile; pointers then advance by one tile per step (pointer arithmetic is 64-bit, so a long
    # sequence with wide rows cannot overflow the way n * stride in int32 could)
    k_ptrs += lo.to(tl.int64) * stride_kn
    v_ptrs += lo.to(tl.int64) * stride_vn
    for n in range(lo, hi, BLOCK_N):
        cols = n + offs_n
        # K^T tile (BLOCK_D, BLOCK_N) and V tile (BLOCK_N, BLOCK_D); keys past the sequence end load as 0.
        k = tl.load(k_ptrs, mask=d_ok[:, None] & (cols[None, :] < seqlen_k), other=0.0)
        v = tl.load(v_ptrs, mask=(cols[:, None] < seqlen_k) & d_ok[None, :], other=0.0)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
        if FP32_DOT:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        if HAS_SOFTCAP:
            # Gemma-2: softcap * tanh(q.k * scale / softcap); qk_scale = scale * log2(e), so divide it back out
            # for the tanh argument and multiply log2(e) in afterwards.
            s = (softcap * LOG2E) * _tanh(s * (qk_scale / (softcap * LOG2E)))
        else:
            s = s * qk_scale
        # Only boundary tiles build a mask: the interior [full_lo, full_hi) is visible to every row of this tile.
        # (A runtime branch rather than separate loops: three loop copies cost ~50 more registers on sm_80 and
        # spilled at 128 x 64 tiles.)
        if (n < full_lo) | (n >= full_hi):
            # key j is visible to the query at position p when p - left <= j <= p + right (-1: unbounded)
            ok = cols[None, :] < seqlen_k
            ok = ok & ((win_left < 0) | (cols[None, :] >= pos_q[:, None] - win_left))
            ok = ok & ((win_right < 0) | (cols[None, :] <= pos_q[:, None] + win_right))
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen no visible key yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not nan
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if IEEE:
            acc += tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc += tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # ---- normalise; a row that saw no key gets o = 0 and lse = -inf
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_base = O + b.to(tl.int64) * stride_ob + q_start * stride_om + h * stride_oh
    tl.store(o_base + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    if RETURN_LSE:
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2)
        l_base = LSE + b.to(tl.int64) * stride_lb + h * stride_lh + q_start * stride_lm
        tl.store(l_base + offs_m.to(tl.int64) * stride_lm, lse, mask=row_ok)
