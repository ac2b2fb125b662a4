"""Triton device code for the paged KV cache: the cache write, and paged attention over a step's work list.

Cache layout (per layer, for K and for V): (num_blocks, block_size, num_kv_heads, head_dim). Token t of a sequence
lives in physical block block_table[t // block_size] at offset t % block_size. Kernels gather one tile of tokens at a
time by looking up each token's block, so a tile may span several blocks and block_size needs no relation to the
tile size.

One attention kernel serves every step: decode tokens, prompt chunks over a cached prefix (chunked prefill, prefix
caching) and mixtures of both in one launch. The host (llmkern.PagedAttentionPlan) prepares, once per step, a work
list of items; a program is one item x one KV head:

    item = (sequence b, first query token i0, split, num_splits, partial slot)

Its rows are BLOCK_Q query tokens x the `group` query heads that share the KV head (GQA packing, as vLLM's unified
Triton attention): row r is token i0 + r // group, head kv_head * group + r % group, so every K/V tile the program
loads serves all the heads of its group at once. A decode token (BLOCK_Q = 1) has `group` rows, padded to the MMA's
16. The keys an item sees are the range its tokens may see (`key_range`), cut into num_splits equal shares when the
plan split a decode token over several programs (split-KV, flash-decoding); such a program writes its normalised
partial output and base-2 lse to a slot of the plan's workspace, and `paged_attention_reduce_kernel` merges a
token's slots. Unsplit items write the output directly.

The plan's int32 metadata the kernels read (offsets and layout: llmkern.paged_attention.PlanLayout):
    SCHEDULE[0], SCHEDULE[1]   the number of work items and of reduce rows in this step (the grid may be larger,
                               sized for a CUDA graph's capacity: programs past the count return at once)
    reduce rows                (output token row, first slot, num_splits), REDUCE_FIELDS each
    work items                 (b, i0, split, num_splits, slot or -1), WORK_FIELDS each
    seq_lens, cu_seqlens_q, block_tables    FlashAttention's names: total cached length (prefix + new tokens),
                               query-row offsets, block ids

The variants (issue 12) come from the core too, each behind a constexpr: an fp8 cache (tiles converted to the query
dtype in registers by `mma_operand`, the per-KV-head scales applied once per program), ALiBi (`alibi_log2`, at the
positions the masks use) and attention sinks (`add_sink`: in the attention kernel for an unsplit item, in the reduce
for a split token, so each token's rows get their sink once).

The attention math (score transform, masks, online softmax, its finish and the split merge) is the shared core in
kernels/attention.py; what is here is where the tiles come from and how the rows are laid out. Every lse written
here is a base-2 value, as the core computes it.
"""
import triton
import triton.language as tl

from .attention import (LOG2E, ROW_IN_TILE_MAX_D, add_sink, alibi_log2, cache_slot, dot_precision, key_range,
                        mask_scores, mma_operand, online_softmax_init, online_softmax_step, score_log2, softmax_lse,
                        softmax_output)
from .rounding import fp8_format, round_to

# Fields of one work item and of one reduce row in the plan's schedule (the host builds them with these widths).
WORK_FIELDS = tl.constexpr(5)
REDUCE_FIELDS = tl.constexpr(3)


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
                  DTYPE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr):
    """Gather the K and V rows of logical tokens n (BLOCK_N,) of one KV head through the block table.

    Token n lives in physical block bt_row[n // block_size] at offset n % block_size; masked tokens load as 0.
    Returns (k, v), each (BLOCK_N, BLOCK_D), as MMA operands of the query dtype DTYPE (an fp8 cache's tiles
    converted in registers; its scales are applied by the caller) or fp32 under the interpreter (mma_operand).
    """
    blk = tl.load(bt_row + (n // block_size) * stride_btn, mask=n_mask, other=0).to(tl.int64)
    off = n % block_size
    kv_mask = _tile_mask(n_mask, d, HEAD_DIM, BLOCK_D)
    k = tl.load(KC + blk[:, None] * stride_kcb + off[:, None] * stride_kct + kvh * stride_kch
                + d[None, :] * stride_kcd, mask=kv_mask, other=0.0)
    v = tl.load(VC + blk[:, None] * stride_vcb + off[:, None] * stride_vct + kvh * stride_vch
                + d[None, :] * stride_vcd, mask=kv_mask, other=0.0)
    return mma_operand(k, DTYPE, INTERPRET), mma_operand(v, DTYPE, INTERPRET)


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
    num_kv_heads, block_size, num_slots,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, QUANTIZE: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """One program per token: copies its (num_kv_heads, head_dim) K and V rows into their cache slot, bit-exact, or
    with QUANTIZE (an fp8 cache) stores quantize_fp8(row, scale of its KV head), K_SCALE / V_SCALE float32
    (num_kv_heads,).

    Only slots in [0, num_slots) are written (num_slots = num_blocks * block_size): -1, vLLM's padding slot, and any
    other slot outside the cache write nothing. The bound is checked here, so the host needs no sync to read the
    slots, and no slot can write outside the cache.
    """
    tok = tl.program_id(0)
    ok, blk, off = cache_slot(SLOT, tok, num_slots, block_size)
    if ok:
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




# ---------------------------------------------------------------------------------------------------- attention
@triton.jit
def paged_attention_kernel(
    Q, KC, VC, O, BT, SEQ_LENS, CU_Q, SCHEDULE, PART_O, PART_LSE, K_SCALE, V_SCALE, ALIBI_SLOPES, SINKS,
    off_work,
    stride_qt, stride_qh, stride_qd,
    stride_kcb, stride_kct, stride_kch, stride_kcd,
    stride_vcb, stride_vct, stride_vch, stride_vcd,
    stride_btb, stride_btn,
    stride_ot, stride_oh, stride_od,
    stride_pos, stride_poh, stride_pod,
    stride_pls, stride_plh,
    qk_scale, softcap, window_left, window_right, group, block_size,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, USE_DOT: tl.constexpr, MASKED_ROWS: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, KV_FP8: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SINKS: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Grid (work items or more, num_kv_heads). One program: one work item (module docstring), one KV head.

    Query i of a sequence with q_len new tokens and seq_len cached in all sits at position i + seq_len - q_len
    (bottom-right alignment) and sees keys in [pos - window_left, pos + window_right] (HAS_LEFT/HAS_RIGHT say which
    bound is set; causal is HAS_RIGHT with window_right = 0). BLOCK_M >= BLOCK_Q * group rows. USE_DOT: the
    products as tensor-core MMAs (rows >= 16); without it (one row: a decode token of an MHA model) broadcast
    multiplies and row sums. MASKED_ROWS: whether a row can see no key of a tile (tiles of several tokens); a
    program of one token has a visible key in every tile it loads. qk_scale = softmax scale * log2(e). INTERPRET:
    fp32 tiles (see kernels/attention.py).

    The variants (kernels/attention.py), each read only under its constexpr: KV_FP8, an fp8 cache whose tiles are
    converted to the query dtype in registers, with this KV head's K_SCALE folded into qk_scale and its V_SCALE
    into the output (float32 (num_kv_heads,)); HAS_ALIBI, ALIBI_SLOPES float32 (num_heads,), a row's slope by its
    query head, at the masks' positions; HAS_SINKS, SINKS float32 (num_heads,) natural-log logits, added here to an
    unsplit item's rows and by the reduce to a split token's merged rows (once per token either way).
    """
    item = tl.program_id(0)
    kvh = tl.program_id(1)
    if item >= tl.load(SCHEDULE):
        return
    work = SCHEDULE + off_work + item * WORK_FIELDS
    b = tl.load(work)
    i0 = tl.load(work + 1)
    split = tl.load(work + 2)
    num_splits = tl.load(work + 3)
    slot = tl.load(work + 4)
    q_start = tl.load(CU_Q + b)
    q_len = tl.load(CU_Q + b + 1) - q_start
    seq_len = tl.load(SEQ_LENS + b)

    # ---- the rows: tokens i0 .. tok_end - 1 of this sequence x the query heads of KV head kvh
    r = tl.arange(0, BLOCK_M)
    if BLOCK_Q == 1:
        tok = tl.zeros([BLOCK_M], tl.int32) + i0   # padding rows share the token, so they see the same keys
        head = r
    else:
        tok = i0 + r // group
        head = r % group
    tok_end = tl.minimum(i0 + BLOCK_Q, q_len)
    row_ok = (tok < tok_end) & (head < group)
    heads = kvh * group + head
    q_rows = (q_start + tok).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    rd_mask = _tile_mask(row_ok, d, HEAD_DIM, BLOCK_D)
    q = tl.load(Q + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=rd_mask, other=0.0)
    if INTERPRET:
        q = q.to(tl.float32)

    # ---- the keys: what these tokens may see, and this split's share of it (aligned to BLOCK_N, possibly empty)
    shift = seq_len - q_len
    pos = tok + shift
    lo, full_lo, full_hi, hi = key_range(i0 + shift, tok_end - 1 + shift, seq_len, window_left, window_right,
                                         HAS_LEFT, HAS_RIGHT, BLOCK_N)
    per_split = tl.cdiv(tl.cdiv(hi - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, hi)

    if KV_FP8:   # q . (k8 * k_scale) = (q . k8) * k_scale: one multiply per program, not per element
        qk_scale = qk_scale * tl.load(K_SCALE + kvh)
    if HAS_ALIBI:
        slope_log2 = tl.load(ALIBI_SLOPES + heads, mask=row_ok, other=0.0) * LOG2E

    m_i, l_i, acc = online_softmax_init(BLOCK_M, BLOCK_D)
    bt_row = BT + b.to(tl.int64) * stride_btb
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        k, v = _load_kv_tile(KC, VC, bt_row, stride_btn, n, n < end, d, kvh, block_size,
                             stride_kcb, stride_kct, stride_kch, stride_kcd,
                             stride_vcb, stride_vct, stride_vch, stride_vcd, Q.dtype.element_ty, HEAD_DIM, BLOCK_D,
                             INTERPRET)
        if USE_DOT:
            s = tl.dot(q, tl.trans(k), input_precision=dot_precision(q.dtype))
        elif BLOCK_D <= ROW_IN_TILE_MAX_D:
            # One row (BLOCK_M = 1): q broadcast over the (BLOCK_N, BLOCK_D) K tile in the layout K was loaded in.
            # The 3-D product below converts K to a layout of its own through shared memory every tile, and its
            # scores then live in two layouts across the mask branch: 95-96 registers a thread against 56-72 this
            # way at head_dim 128 (check-compile, triton 3.9). At head_dim 256 (16 keys, 8 warps) the 3-D form
            # allocates fewer on triton 3.6 (60-78 against 64-98), so it stays there.
            s = tl.sum(q.to(tl.float32) * k.to(tl.float32), axis=1)[None, :]
        else:
            s = tl.sum(q[:, None, :].to(tl.float32) * k[None, :, :].to(tl.float32), axis=2)
        s = score_log2(s, qk_scale, softcap, HAS_SOFTCAP)
        if HAS_ALIBI:
            s = alibi_log2(s, slope_log2[:, None], pos[:, None], n[None, :])
        # Tiles in [full_lo, full_hi) are visible whole to every row (and end inside this split): no mask.
        if (n0 < full_lo) | (n0 >= full_hi):
            s = mask_scores(s, pos, n, end, window_left, window_right, HAS_LEFT, HAS_RIGHT)
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, USE_DOT, MASKED_ROWS)

    if HAS_SINKS:   # a split token's sink joins in the reduce (-inf: no sink here)
        sink_log2 = tl.load(SINKS + heads, mask=row_ok, other=float("-inf")) * LOG2E
        m_i, l_i, acc = add_sink(m_i, l_i, acc, tl.where(slot < 0, sink_log2, float("-inf")))
    # Every real row sees at least its own key over all splits; an empty split has l = 0: o = 0, lse = -inf.
    o = softmax_output(acc, l_i)
    if KV_FP8:   # sum p (v8 * v_scale) / l = v_scale * (sum p v8 / l); the split merge is linear in o
        o = o * tl.load(V_SCALE + kvh)
    if slot < 0:
        tl.store(O + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :] * stride_od,
                 o.to(O.dtype.element_ty), mask=rd_mask)
    else:   # a split decode token: its rows are the heads of the group
        part = slot.to(tl.int64)
        tl.store(PART_O + part * stride_pos + heads[:, None] * stride_poh + d[None, :] * stride_pod, o,
                 mask=rd_mask)
        tl.store(PART_LSE + part * stride_pls + heads * stride_plh, softmax_lse(m_i, l_i), mask=row_ok)


@triton.jit
def paged_attention_reduce_kernel(
    PART_O, PART_LSE, O, SCHEDULE, SINKS,
    off_reduce,
    stride_pos, stride_poh, stride_pod,
    stride_pls, stride_plh,
    stride_ot, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    """Grid (reduce rows or more, num_heads): merge one split token's partial outputs, each weighted by
    2^(lse_s - lse_total).

    That merge is the online softmax over the splits, one split per step, with the split's base-2 lse as its logit
    and its output as its value: a (1 x 1) score tile against a (1 x BLOCK_D) value tile. It needs no bound on the
    split count; empty splits (lse = -inf) get weight 0, and split 0 is never empty (it starts at the first visible
    key), so no row is all-masked. HAS_SINKS: the head's sink (SINKS float32 (num_heads,)) joins the merged
    denominator, once per token.
    """
    r = tl.program_id(0)
    h = tl.program_id(1)
    if r >= tl.load(SCHEDULE + 1):
        return
    row = SCHEDULE + off_reduce + r * REDUCE_FIELDS
    tok = tl.load(row).to(tl.int64)
    first = tl.load(row + 1)
    num_splits = tl.load(row + 2)
    d = tl.arange(0, BLOCK_D)[None, :]
    d_mask = d < HEAD_DIM
    m, l, acc = online_softmax_init(1, BLOCK_D)
    for s in range(0, num_splits):
        part = (first + s + tl.arange(0, 1)).to(tl.int64)   # one split as a (1,)-long tile of "keys"
        lse = tl.load(PART_LSE + part * stride_pls + h * stride_plh)
        o = tl.load(PART_O + part[:, None] * stride_pos + h * stride_poh + d * stride_pod, mask=d_mask, other=0.0)
        m, l, acc = online_softmax_step(lse[None, :], o, m, l, acc, False, False)
    if HAS_SINKS:
        m, l, acc = add_sink(m, l, acc, tl.load(SINKS + h) * LOG2E)
    o = softmax_output(acc, l)
    tl.store(O + tok * stride_ot + h * stride_oh + d * stride_od, o.to(O.dtype.element_ty), mask=d_mask)
