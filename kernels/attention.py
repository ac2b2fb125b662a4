"""The attention core, and the fused prefill attention kernel (forward only, FlashAttention-2 style).

## The core: what every attention kernel shares
llmkern's attention kernels (`attention_fwd_kernel` below; `paged_attention_kernel` and `paged_attention_reduce_kernel`
in kernels/paged_attention.py) differ in where their K/V tiles come from and in how their rows
are laid out. The math in between is written once, here:

    score_log2(s, qk_scale, softcap, HAS_SOFTCAP)   raw q.k -> base-2 logits: scale, optional tanh soft-cap
    alibi_log2(s, slope_log2, pos_q, pos_k)         ALiBi: minus slope * |pos_q - pos_k| (base 2), after score_log2
    key_range(p_first, p_last, seqlen_k, window_left, window_right, HAS_LEFT, HAS_RIGHT, BLOCK_N)
                                             -> (lo, full_lo, full_hi, hi)
                                                    the key tiles a block of queries may see, and those it sees whole
    mask_scores(s, pos_q, pos_k, seqlen_k, window_left, window_right, HAS_LEFT, HAS_RIGHT)
                                                    -inf for keys past the sequence or outside the causal/window band
    online_softmax_init(ROWS, BLOCK_D) -> (m_i, l_i, acc)   the empty running state
    online_softmax_step(s, v, m_i, l_i, acc, USE_DOT, MASKED_ROWS) -> (m_i, l_i, acc)
                                                    fold one tile of logits and values into the running softmax
    add_sink(m_i, l_i, acc, sink_log2) -> (m_i, l_i, acc)
                                                    attention sinks: one more logit per row, with no value
    softmax_output(acc, l_i) -> o                   normalise (o = 0 for a row that saw no key)
    softmax_lse(m_i, l_i) -> lse                    base-2 log-sum-exp (-inf for a row that saw no key)
    dot_precision(dtype)                            "ieee" for fp32 operands (full fp32, not TF32), else "tf32"
    mma_operand(x, DTYPE, INTERPRET)                a loaded K/V tile as an MMA operand: the query dtype (an fp8
                                                    cache tile is dequantized here, in registers), fp32 under the
                                                    interpreter

The split-KV reduce of paged decode is the same online softmax run over the splits: each split's base-2 lse is its
logit and its normalised partial output its value, so merging partial results needs no code of its own.
Conventions shared by all of them: softmax in base 2 (scores are multiplied by log2(e) so the inner loop uses exp2, the
hardware instruction; lse is converted back to the natural log only where it is returned); windows as in the public
API, the query at position p seeing keys j with p - window_left <= j <= p + window_right (causal is window_right =
0), where constexprs HAS_LEFT/HAS_RIGHT say which bounds exist (the paged kernels compile a variant per combination;
the dense kernel applies both, its host turning an unbounded side into a window that covers every key); and an
INTERPRET flag that, under the Triton interpreter, casts tiles to fp32 (its bf16 dot and arithmetic are unreliable).
The variants, each written once here and compiled in only where a constexpr asks for it (HAS_ALIBI, HAS_SINKS, an
fp8 cache), so kernels without them build as before:
  * ALiBi (Press et al., arXiv 2108.12409): `alibi_log2` right after `score_log2`, with the positions the masks use
    (bottom-right aligned), so the bias -slope * |p - j| follows causal and window alignment exactly.
  * attention sinks (gpt-oss): `add_sink` after the loop, before `softmax_output` and `softmax_lse`; a sink is one
    more logit per head in the denominator whose value is 0, so lse includes it. Split-KV decode adds it once, in
    its reduce.
  * fp8 KV cache: tiles load as fp8 and `mma_operand` converts them to the query dtype (exact: every e4m3/e5m2
    value is an fp16 and a bf16 value), so the MMAs run in the query dtype. The per-KV-head scales are applied
    once per program, not per element: k_scale multiplies qk_scale (s = (q . k8) * k_scale * sm_scale) and v_scale
    the normalised output (o = v_scale * sum p v8 / l), the same numbers as dequantizing every element first, with
    one rounding less.

## The dense prefill kernel
One program owns BLOCK_M query rows of one (sequence, query head). Its Q tile stays on chip; K/V tiles of BLOCK_N keys
stream through and are folded into the running softmax, so the (seqlen_q, seqlen_k) score matrix is never written.

The same kernel serves the batched and the packed (varlen) layouts: a sequence's first row and length come either
from cu_seqlens (IS_VARLEN) or from the batch stride and the fixed lengths.

Masking is decided per tile, not per element: the key range a Q tile may see ([lo, hi)) is computed once and tiles
outside it are never visited (the loop bounds skip everything above the causal diagonal or outside the window);
inside it only the tiles that straddle a boundary (window left edge, causal diagonal / window right edge, end of the
sequence) build a score mask.
"""
import triton
import triton.language as tl

# log2(e) and ln(2): exp(x) = exp2(x * LOG2E), log(x) = log2(x) * LN2. constexpr so jit functions can read them.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Widest head_dim tile whose one-row broadcast products stay in the K/V tile's layout (kernels/paged_attention.py).
ROW_IN_TILE_MAX_D = tl.constexpr(128)


# ------------------------------------------------------------------------------------------------------- the core
@triton.constexpr_function
def dot_precision(dtype):
    """tl.dot's input_precision for operands of `dtype`: fp32 inputs get a full IEEE fp32 product rather than TF32
    (10-bit mantissa), so fp32 means fp32 accuracy; "tf32" is tl.dot's own default, which 16-bit operands ignore."""
    return "ieee" if dtype == tl.float32 else "tf32"


@triton.jit
def mma_operand(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """A loaded K or V tile as the operand of the MMAs: fp32 under the interpreter (whose bf16 dot and arithmetic are
    unreliable), else the query dtype DTYPE. For a 16-bit cache that is a no-op; an fp8 cache tile is dequantized
    here, in registers (exactly: fp16 and bf16 hold every e4m3 and e5m2 value; the scale is applied elsewhere, see
    the module docstring). Under the interpreter an fp8 tile's non-finite bytes are decoded here: its fp8 -> fp32
    cast reads them as finite numbers (e4m3fn's NaN as +-480, e5m2's inf and NaN as 65536 and up, Triton 3.9), where
    the GPU's cvt and the C++ backend give NaN and inf."""
    if INTERPRET:
        y = x.to(tl.float32)
        if x.dtype == tl.float8e4nv:     # NaN: S.1111.111
            y = tl.where((x.to(tl.uint8, bitcast=True) & 0x7F) == 0x7F, float("nan"), y)
        elif x.dtype == tl.float8e5:     # inf: S.11111.00, NaN: S.11111.mm with mm != 0
            bits = x.to(tl.uint8, bitcast=True)
            mag = bits & 0x7F
            inf = tl.where(bits >= 0x80, float("-inf"), float("inf"))
            y = tl.where(mag > 0x7C, float("nan"), tl.where(mag == 0x7C, inf, y))
        return y
    else:
        return x.to(DTYPE)


@triton.jit
def _tanh(x):
    """tanh(x) within a few fp32 ulps for every x, from tl.exp alone (tl has no tanh that runs both compiled and
    under the interpreter across triton 3.6-3.9).

    |x| >= 1/4: sign(x) (1 - e) / (1 + e) with e = exp(-2|x|) <= 0.61, so 1 - e >= 0.39 does not cancel, and a large
    |x| gives e = 0 and exactly +-1 (no overflow). Below 1/4, where 1 - e would cancel (1 - 2 / (exp(2x) + 1), used
    before, had relative error ~1e-7 / |x|: 1e-4 at |x| = 1e-3), the Taylor series of tanh to x^9: the first term
    left out, 1382 x^11 / 155925, is below 2^-26 of tanh(x) there. Measured in numpy fp32 over 1e-30 <= |x| <= 50:
    at most 3.4 ulps (a GPU's approximate exp adds about as much again to the |x| >= 1/4 branch).
    """
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    x2 = x * x
    # coefficients -1/3, 2/15, -17/315, 62/2835 (2^2n (2^2n - 1) B_2n / (2n)!, B the Bernoulli numbers)
    series = x + x * x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (-0.05396825396825397
                                                                                 + x2 * 0.021869488536155203)))
    return tl.where(a < 0.25, series, tl.where(x < 0, -t, t))


@triton.jit
def score_log2(s, qk_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """Raw q.k scores -> base-2 logits: s * sm_scale * log2(e), or with HAS_SOFTCAP Gemma 2's soft-cap
    softcap * tanh(s * sm_scale / softcap), times log2(e).

    qk_scale = sm_scale * log2(e), computed by the host: computed here, it took a register for the whole loop.
    """
    if HAS_SOFTCAP:
        return _tanh(s * (qk_scale / (softcap * LOG2E))) * (softcap * LOG2E)
    else:
        return s * qk_scale


@triton.jit
def alibi_log2(s, slope_log2, pos_q, pos_k):
    """ALiBi's bias (Press et al. 2022, arXiv 2108.12409) on base-2 logits: s - slope_log2 * |pos_q - pos_k|.

    slope_log2 = the head's slope * log2(e). Arguments broadcast against s (rows, cols): pos_k (1, cols), pos_q
    (rows, 1) or a scalar, slope_log2 a scalar or (rows, 1). Positions are those of the masks (mask_scores): the
    distance of a query to each key it sees, whatever the causal/window alignment. Applied after the soft-cap, as
    FlashAttention-2 does. |pos_q - pos_k| < 2**31 converts to float32 exactly up to 2**24.
    """
    return s - slope_log2 * tl.abs(pos_q - pos_k).to(tl.float32)


@triton.jit
def key_range(p_first, p_last, seqlen_k, window_left, window_right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """The BLOCK_N-key tiles that queries at positions p_first..p_last (consecutive) may see.

    Returns (lo, full_lo, full_hi, hi), lo <= full_lo <= full_hi <= hi: keys in [lo, hi) hold every visible key (lo
    a multiple of BLOCK_N, so tiles stay aligned to it), and the tiles starting in [full_lo, full_hi) are visible
    whole to every one of these queries, so they need no mask. Windows as in mask_scores.
    """
    lo = 0
    full_lo = 0
    if HAS_LEFT:
        lo = (tl.maximum(p_first - window_left, 0) // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(p_last - window_left, 0), BLOCK_N) * BLOCK_N
    hi = seqlen_k
    full_hi = (seqlen_k // BLOCK_N) * BLOCK_N  # tiles past this one hang over the end of the sequence
    if HAS_RIGHT:
        hi = tl.minimum(seqlen_k, tl.maximum(p_last + window_right + 1, 0))
        full_hi = tl.minimum(full_hi, (tl.maximum(p_first + window_right + 1, 0) // BLOCK_N) * BLOCK_N)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def cache_slot(SLOT, tok, num_slots, block_size):
    """Where token `tok` goes in a paged cache: (ok, block, offset) of its slot SLOT[tok] (int64). ok is false for
    -1 (vLLM's padding slot) and any other slot outside [0, num_slots), which the cache writes skip: the host need
    not sync to check the slots, and no slot can write outside the cache."""
    slot = tl.load(SLOT + tok)
    return (slot >= 0) & (slot < num_slots), slot // block_size, slot % block_size


@triton.jit
def mask_scores(s, pos_q, pos_k, seqlen_k, window_left, window_right, HAS_LEFT: tl.constexpr,
                HAS_RIGHT: tl.constexpr):
    """s (rows, cols) with -inf where key pos_k (cols,) is invisible to the query at pos_q (rows,): past the
    sequence (pos_k >= seqlen_k) or outside pos_q - window_left <= pos_k <= pos_q + window_right.

    HAS_LEFT/HAS_RIGHT: whether that bound exists; the window of a bound that does not is never read (the public
    API's -1), so no test is emitted for it.
    """
    ok = pos_k[None, :] < seqlen_k
    if HAS_LEFT:
        ok = ok & (pos_k[None, :] >= pos_q[:, None] - window_left)
    if HAS_RIGHT:
        ok = ok & (pos_k[None, :] <= pos_q[:, None] + window_right)
    return tl.where(ok, s, float("-inf"))


@triton.jit
def online_softmax_init(ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """The empty running state (m_i, l_i, acc) of ROWS rows: max -inf, denominator 0, fp32 output 0."""
    return (tl.full([ROWS], float("-inf"), tl.float32), tl.zeros([ROWS], tl.float32),
            tl.zeros([ROWS, BLOCK_D], tl.float32))


@triton.jit
def online_softmax_step(s, v, m_i, l_i, acc, USE_DOT: tl.constexpr, MASKED_ROWS: tl.constexpr):
    """Fold one tile into the running softmax (FlashAttention's online softmax); returns the new (m_i, l_i, acc).

    s (rows, cols): base-2 logits, -inf where masked. v (cols, BLOCK_D): the values. m_i, l_i (rows,): running max
    and denominator, from online_softmax_init; acc (rows, BLOCK_D) fp32: running unnormalised output. USE_DOT:
    p @ v as a tl.dot (rows >= 16); otherwise a broadcast multiply and sum (decode with one query head, the split
    merge), for one row and BLOCK_D <= 128 as p's column against v in v's own layout (no layout conversion of the
    tile; the paged kernel's scores take the same form, see there). MASKED_ROWS: a row may have seen only -inf so far (a window or the causal diagonal hides a whole tile
    row from it); its max stays -inf and is replaced by 0 in the shifts, so exp2 gives 0 rather than nan. Off where
    every tile gives every row a visible key: the guard cost up to 15 registers there.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_shift = m_new
    if MASKED_ROWS:
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_shift)  # rescales what was accumulated under the old max
    p = tl.exp2(s - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if USE_DOT:
        acc += tl.dot(p.to(v.dtype), v, input_precision=dot_precision(v.dtype))
    elif p.shape[0] == 1 and v.shape[1] <= ROW_IN_TILE_MAX_D:
        acc += tl.sum(tl.trans(p) * v.to(tl.float32), axis=0)[None, :]
    else:
        acc += tl.sum(p[:, :, None] * v[None, :, :].to(tl.float32), axis=1)
    return m_new, l_i, acc


@triton.jit
def add_sink(m_i, l_i, acc, sink_log2):
    """Attention sinks (gpt-oss): fold one more base-2 logit per row into the finished running softmax, a "key" whose
    value is 0, so it joins the denominator l and leaves acc alone but for the rescale to the new max. sink_log2: a
    scalar or (rows,), the sink * log2(e); -inf is no sink. A row that saw no key gets l = 2^0 = 1 at m = sink: o = 0,
    lse = the sink. (The online softmax step for a (rows, 1) tile with a zero value, without building the tile.)
    """
    m_new = tl.maximum(m_i, sink_log2)
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)   # no key and no sink: stays empty, not nan
    alpha = tl.exp2(m_i - m_shift)
    return m_new, l_i * alpha + tl.exp2(sink_log2 - m_shift), acc * alpha[:, None]


@triton.jit
def softmax_output(acc, l_i):
    """The attention output o = acc / l (rows, BLOCK_D); o = 0 for a row that saw no key (l = 0)."""
    return acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]


@triton.jit
def softmax_lse(m_i, l_i):
    """lse = m + log2(l) (rows,), the base-2 log-sum-exp of each row's logits; -inf for a row that saw no key.
    Separate from softmax_output so that each kernel places the two where its registers allow: the dense kernel
    stores lse before computing o (holding lse across the o store spilled at the largest tiles on sm_80)."""
    return tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))


# ------------------------------------------------------------------------------------------- dense prefill kernel
@triton.jit
def attention_fwd_kernel(
    Q, K, V, O, LSE, CU_SEQLENS_Q, CU_SEQLENS_K, ALIBI_SLOPES, SINKS,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    stride_lb, stride_lh, stride_lm,
    seqlen_q_fixed, seqlen_k_fixed, num_heads, group,
    window_left, window_right, qk_scale, softcap,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SINKS: tl.constexpr,
    RETURN_LSE: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Grid: (batch * num_heads, cdiv(max_seqlen_q, BLOCK_M)); batch * heads on axis 0, whose limit is 2**31 - 1.

    qk_scale = softmax scale * log2(e). window_left/window_right >= 0, both always applied: the host passes an
    unbounded side as a window that covers every key, so one build serves full, causal (window_right = 0) and
    sliding-window attention. softcap: read only with HAS_SOFTCAP. ALIBI_SLOPES, SINKS: float32 (num_heads,), read
    only with HAS_ALIBI / HAS_SINKS. INTERPRET: both matmuls on fp32 tiles (see the module docstring).
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
    if INTERPRET:
        q = q.to(tl.float32)
    # tile offsets within one BLOCK_N-key tile fit in int32; the tile's start is added to the pointers in 64 bits
    k_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None]
    v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]

    # ---- the key range this tile may see (bottom-right alignment: query i sits at p = i + seqlen_k - seqlen_q)
    pos_q = offs_m + (seqlen_k - seqlen_q)
    p_first = start_m + seqlen_k - seqlen_q
    p_last = tl.minimum(start_m + BLOCK_M, seqlen_q) - 1 + seqlen_k - seqlen_q
    lo, full_lo, full_hi, hi = key_range(p_first, p_last, seqlen_k, window_left, window_right, True, True, BLOCK_N)
    if HAS_ALIBI:
        slope_log2 = tl.load(ALIBI_SLOPES + h) * LOG2E

    m_i, l_i, acc = online_softmax_init(BLOCK_M, BLOCK_D)
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
        if INTERPRET:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = score_log2(tl.dot(q, k, input_precision=dot_precision(q.dtype)), qk_scale, softcap, HAS_SOFTCAP)
        if HAS_ALIBI:
            s = alibi_log2(s, slope_log2, pos_q[:, None], cols[None, :])
        # Only boundary tiles build a mask: the interior [full_lo, full_hi) is visible to every row of this tile.
        # (A runtime branch rather than separate loops: three loop copies cost ~50 more registers on sm_80 and
        # spilled at 128 x 64 tiles.)
        if (n < full_lo) | (n >= full_hi):
            s = mask_scores(s, pos_q, cols, seqlen_k, window_left, window_right, True, True)
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, True, True)

    if HAS_SINKS:
        m_i, l_i, acc = add_sink(m_i, l_i, acc, tl.load(SINKS + h) * LOG2E)
    if RETURN_LSE:
        l_base = LSE + b.to(tl.int64) * stride_lb + h * stride_lh + q_start * stride_lm
        tl.store(l_base + offs_m.to(tl.int64) * stride_lm, softmax_lse(m_i, l_i) * LN2, mask=row_ok)  # natural log
    o = softmax_output(acc, l_i)
    o_base = O + b.to(tl.int64) * stride_ob + q_start * stride_om + h * stride_oh
    tl.store(o_base + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
