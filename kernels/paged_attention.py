"""Triton device code for the paged KV cache: the cache write, split-KV decode attention, and prefill over a cache.

Cache layout (per layer, for K and for V): (num_blocks, block_size, num_kv_heads, head_dim). Token t of a sequence
lives in physical block block_table[t // block_size] at offset t % block_size. Kernels gather one tile of tokens at a
time by looking up each token's block, so a tile may span several blocks and block_size needs no relation to the
tile size.

The attention math (score transform, masks, online softmax, its finish and the split merge) is the shared core in
kernels/attention.py; what is here is where the tiles come from and how the rows are laid out. Every lse written
here is a base-2 value, as the core computes it.
"""
import triton
import triton.language as tl

from .attention import (dot_precision, key_range, mask_scores, online_softmax_init, online_softmax_step, score_log2,
                        softmax_lse, softmax_output)
from .rounding import fp8_format, round_to


@triton.jit
def _tile_mask(row_mask, d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Mask of a (rows, BLOCK_D) tile. The head-dim test is emitted only when head_dim is not a power of two: a mask
    constant along the contiguous dim lets Triton keep 16-byte vector loads, one predicate per vector."""
    if HEAD_DIM == BLOCK_D:
        return row_mask[:, None]
    else:
        return row_mask[:, None] & (d < HEAD_DIM)[None, :]


@triton.jit
def _load_kv_tile(KC, VC, bt_row, stride_btn, n, n_mask, d, kvh, block_size,
                  stride_kcb, stride_kct, stride_kch, stride_kcd,
                  stride_vcb, stride_vct, stride_vch, stride_vcd,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr):
    """Gather the K and V rows of logical tokens n (BLOCK_N,) of one KV head through the block table.

    Token n lives in physical block bt_row[n // block_size] at offset n % block_size; masked tokens load as 0.
    Returns (k, v), each (BLOCK_N, BLOCK_D), as fp32 under the interpreter (whose bf16 arithmetic is unreliable).
    """
    blk = tl.load(bt_row + (n // block_size) * stride_btn, mask=n_mask, other=0).to(tl.int64)
    off = n % block_size
    kv_mask = _tile_mask(n_mask, d, HEAD_DIM, BLOCK_D)
    k = tl.load(KC + blk[:, None] * stride_kcb + off[:, None] * stride_kct + kvh * stride_kch
                + d[None, :] * stride_kcd, mask=kv_mask, other=0.0)
    v = tl.load(VC + blk[:, None] * stride_vcb + off[:, None] * stride_vct + kvh * stride_vch
                + d[None, :] * stride_vcd, mask=kv_mask, other=0.0)
    if INTERPRET:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


# ------------------------------------------------------------------------------------------------------ cache write
@triton.jit
def quantize_fp8(x, scale, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """x as an fp8 cache stores it: round_to_fp8(x / scale), saturated to +-(the format's largest finite value) as
    vLLM's cache write does (NaN stays NaN). IEEE division (div_rn; Triton's `/` is the approximate div.full), so
    the stored value is exactly llmkern.reference.quantize_kv's."""
    BIG: tl.constexpr = fp8_format(DTYPE)[3]
    y = tl.math.div_rn(x.to(tl.float32), scale)
    y = tl.where(y > BIG, BIG, tl.where(y < -BIG, -BIG, y))
    return round_to(y, DTYPE, INTERPRET)


@triton.jit
def paged_kv_write_kernel(
    K, V, KC, VC, SLOT, K_SCALE, V_SCALE,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_kcb, stride_kct, stride_kch, stride_kcd,
    stride_vcb, stride_vct, stride_vch, stride_vcd,
    num_kv_heads, block_size,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, QUANTIZE: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """One program per token: copies its (num_kv_heads, head_dim) K and V rows into their cache slot, bit-exact, or
    with QUANTIZE (an fp8 cache) stores quantize_fp8(row, scale of its KV head), K_SCALE / V_SCALE float32
    (num_kv_heads,).

    A slot of -1 means padding: nothing is written.
    """
    tok = tl.program_id(0)
    slot = tl.load(SLOT + tok)
    if slot >= 0:
        blk = slot // block_size
        off = slot % block_size
        hs = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        mask = _tile_mask(hs < num_kv_heads, d, HEAD_DIM, BLOCK_D)
        h = hs[:, None]
        d = d[None, :]
        k = tl.load(K + tok.to(tl.int64) * stride_kt + h * stride_kh + d * stride_kd, mask=mask)
        v = tl.load(V + tok.to(tl.int64) * stride_vt + h * stride_vh + d * stride_vd, mask=mask)
        if QUANTIZE:
            k = quantize_fp8(k, tl.load(K_SCALE + h, mask=h < num_kv_heads, other=1.0), KC.dtype.element_ty,
                             INTERPRET)
            v = quantize_fp8(v, tl.load(V_SCALE + h, mask=h < num_kv_heads, other=1.0), VC.dtype.element_ty,
                             INTERPRET)
        tl.store(KC + blk * stride_kcb + off * stride_kct + h * stride_kch + d * stride_kcd, k, mask=mask)
        tl.store(VC + blk * stride_vcb + off * stride_vct + h * stride_vch + d * stride_vcd, v, mask=mask)


# ---------------------------------------------------------------------------------------------------- decode
@triton.jit
def paged_decode_kernel(
    Q, KC, VC, BT, SEQ_LENS, O, PART_O, PART_LSE,
    stride_qb, stride_qh, stride_qd,
    stride_kcb, stride_kct, stride_kch, stride_kcd,
    stride_vcb, stride_vct, stride_vch, stride_vcd,
    stride_btb, stride_btn,
    stride_ob, stride_oh, stride_od,
    stride_pob, stride_poh, stride_pos, stride_pod,
    stride_plb, stride_plh, stride_pls,
    qk_scale, softcap, window_left,
    group, block_size, num_splits,
    HEAD_DIM: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_DOT: tl.constexpr, SPLIT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_LEFT: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Grid (batch, num_kv_heads, num_splits). One program: every query head of one KV head, one slice of the keys.

    The query heads that share a KV head form the rows of the score tile, so each cached K/V byte is loaded once per
    decode step. With USE_DOT the rows are padded to GROUP_PAD >= 16 so the scores and P@V are tensor-core MMAs;
    without it (a group of one) the products are broadcast multiplies and row sums.

    SPLIT: write the normalized partial output and its base-2 lse to PART_O/PART_LSE for the reduce kernel;
    otherwise (one split) write the final output directly. qk_scale = softmax scale * log2(e). window_left: read
    only with HAS_LEFT. INTERPRET: fp32 tiles (see kernels/attention.py).
    """
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(SEQ_LENS + b)
    # The new token sits at position seq_len - 1; a left window hides keys before it - window_left. No key lies to
    # its right, so the right window never masks anything in decode, and the range start is the only window mask.
    kv_start = 0
    if HAS_LEFT:
        kv_start = tl.maximum(seq_len - 1 - window_left, 0)
    # Each split takes an equal, BLOCK_N-aligned share of [kv_start, seq_len); trailing splits may be empty.
    per_split = tl.cdiv(tl.cdiv(seq_len - kv_start, num_splits), BLOCK_N) * BLOCK_N
    start = kv_start + split * per_split
    end = tl.minimum(start + per_split, seq_len)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * group + g
    g_mask = g < group
    gd_mask = _tile_mask(g_mask, d, HEAD_DIM, BLOCK_D)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=gd_mask, other=0.0)
    if INTERPRET:
        q = q.to(tl.float32)

    m_i, l_i, acc = online_softmax_init(GROUP_PAD, BLOCK_D)
    bt_row = BT + b.to(tl.int64) * stride_btb
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < end
        k, v = _load_kv_tile(KC, VC, bt_row, stride_btn, n, n_mask, d, kvh, block_size,
                             stride_kcb, stride_kct, stride_kch, stride_kcd,
                             stride_vcb, stride_vct, stride_vch, stride_vcd, HEAD_DIM, BLOCK_D, INTERPRET)
        if USE_DOT:
            s = tl.dot(q, tl.trans(k), input_precision=dot_precision(q.dtype))
        else:
            s = tl.sum(q[:, None, :].to(tl.float32) * k[None, :, :].to(tl.float32), axis=2)
        s = tl.where(n_mask[None, :], score_log2(s, qk_scale, softcap, HAS_SOFTCAP), float("-inf"))
        # every tile holds a key of [start, end) for every row (padding rows score 0): no all-masked row
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, USE_DOT, False)

    # An empty split (start >= end) has l = 0: o = 0 and lse = -inf, weight 0 in the reduce.
    if SPLIT:
        o = softmax_output(acc, l_i)
        lse = softmax_lse(m_i, l_i)
        po = (PART_O + b.to(tl.int64) * stride_pob + heads[:, None] * stride_poh + split * stride_pos
              + d[None, :] * stride_pod)
        tl.store(po, o, mask=gd_mask)
        tl.store(PART_LSE + b.to(tl.int64) * stride_plb + heads * stride_plh + split * stride_pls, lse, mask=g_mask)
    else:
        o = softmax_output(acc, l_i)
        po = O + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :] * stride_od
        tl.store(po, o.to(O.dtype.element_ty), mask=gd_mask)


@triton.jit
def paged_decode_reduce_kernel(
    PART_O, PART_LSE, O,
    stride_pob, stride_poh, stride_pos, stride_pod,
    stride_plb, stride_plh, stride_pls,
    stride_ob, stride_oh, stride_od,
    num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (batch, num_heads): merge the splits' normalized outputs, each weighted by 2^(lse_s - lse_total).

    That merge is the online softmax over the splits, one split per step, with the split's base-2 lse as its logit
    and its output as its value: a (1 x 1) score tile against a (1 x BLOCK_D) value tile. It needs no bound on
    num_splits; empty splits (lse = -inf) get weight 0, and split 0 is never empty (it starts at the first visible
    key), so no row is all-masked.
    """
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)[None, :]
    d_mask = d < HEAD_DIM
    m, l, acc = online_softmax_init(1, BLOCK_D)
    for s in range(0, num_splits):
        split = s + tl.arange(0, 1)  # one split as a (1,)-long tile of "keys"
        lse = tl.load(PART_LSE + b * stride_plb + h * stride_plh + split * stride_pls)
        o = tl.load(PART_O + b * stride_pob + h * stride_poh + split[:, None] * stride_pos + d * stride_pod,
                    mask=d_mask, other=0.0)
        m, l, acc = online_softmax_step(lse[None, :], o, m, l, acc, False, False)
    o = softmax_output(acc, l)
    tl.store(O + b * stride_ob + h * stride_oh + d * stride_od, o.to(O.dtype.element_ty), mask=d_mask)


# ---------------------------------------------------------------------------------------------------- prefill
@triton.jit
def paged_prefill_kernel(
    Q, KC, VC, BT, CU_Q, SEQ_LENS, O,
    stride_qt, stride_qh, stride_qd,
    stride_kcb, stride_kct, stride_kch, stride_kcd,
    stride_vcb, stride_vct, stride_vch, stride_vcd,
    stride_btb, stride_btn,
    stride_ot, stride_oh, stride_od,
    qk_scale, softcap, window_left, window_right, group, block_size,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Grid (cdiv(max_q_len, BLOCK_M), batch, num_heads): a tile of the newest q_len tokens of one sequence, one head.

    Query i of a sequence with q_len new tokens and seq_len total sits at position i + seq_len - q_len
    (bottom-right alignment) and sees keys in [pos - window_left, pos + window_right] (HAS_LEFT/HAS_RIGHT say which
    bound is set; causal is HAS_RIGHT with window_right = 0). Keys come from the cache through the block table. GQA:
    head h reads KV head h // group; prefill is compute-bound, so the repeated K/V reads across a group hit L2 and
    matter little.
    """
    mb = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    kvh = h // group

    q_start = tl.load(CU_Q + b)
    q_len = tl.load(CU_Q + b + 1) - q_start
    seq_len = tl.load(SEQ_LENS + b)
    if mb * BLOCK_M < q_len:
        i = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        id_mask = _tile_mask(i < q_len, d, HEAD_DIM, BLOCK_D)
        pos = i + (seq_len - q_len)
        q_rows = (q_start + i).to(tl.int64)
        q = tl.load(Q + q_rows[:, None] * stride_qt + h * stride_qh + d[None, :] * stride_qd,
                    mask=id_mask, other=0.0)
        if INTERPRET:
            q = q.to(tl.float32)

        # The key range any row of this tile can see; tokens outside it are never loaded. (Unlike the dense kernel,
        # every tile is masked: skipping the mask on interior tiles spilled here on sm_80.)
        first_pos = mb * BLOCK_M + (seq_len - q_len)
        last_pos = tl.minimum(first_pos + BLOCK_M, seq_len) - 1
        lo, _, _, hi = key_range(first_pos, last_pos, seq_len, window_left, window_right, HAS_LEFT, HAS_RIGHT, BLOCK_N)

        m_i, l_i, acc = online_softmax_init(BLOCK_M, BLOCK_D)
        bt_row = BT + b.to(tl.int64) * stride_btb
        for n0 in range(lo, hi, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            k, v = _load_kv_tile(KC, VC, bt_row, stride_btn, n, n < hi, d, kvh, block_size,
                                 stride_kcb, stride_kct, stride_kch, stride_kcd,
                                 stride_vcb, stride_vct, stride_vch, stride_vcd, HEAD_DIM, BLOCK_D, INTERPRET)
            s = score_log2(tl.dot(q, tl.trans(k), input_precision=dot_precision(q.dtype)), qk_scale, softcap,
                           HAS_SOFTCAP)
            s = mask_scores(s, pos, n, hi, window_left, window_right, HAS_LEFT, HAS_RIGHT)
            m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, True, True)

        # Every real row sees at least its own key; padding rows are masked from the store.
        o = softmax_output(acc, l_i)
        tl.store(O + q_rows[:, None] * stride_ot + h * stride_oh + d[None, :] * stride_od,
                 o.to(O.dtype.element_ty), mask=id_mask)

