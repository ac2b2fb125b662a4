"""Triton device code for multi-head latent attention (MLA: DeepSeek-V2, arXiv 2405.04434, section 2.1) over a paged
latent cache: the cache write, and one attention kernel that serves decode and chunked prefill.

The cache holds, per token, the compressed latent c^KV (kv_lora_rank wide, "ckv") and the decoupled RoPE key k^R
(rope_dim wide, "kpe"), shared by every head: (num_blocks, block_size, kv_lora_rank) and (num_blocks, block_size,
rope_dim), token t of a sequence in block block_table[t // block_size] at offset t % block_size. Queries come
absorbed (W^UK folded into q, W^UV into the output projection), so for query row (token, head):
    s_j = scale * (q_nope . ckv_j + q_pe . kpe_j),    o = sum_j softmax(s)_j ckv_j    (kv_lora_rank wide).
That is attention with one KV head of head_dim kv_lora_rank + rope_dim whose values are the first kv_lora_rank
columns of its keys: the ckv tile, loaded once per step, is the B operand of both matmuls.

Rows. A program's row tile is BLOCK_M consecutive (query token, head) pairs of one sequence, token-major (row r of
tile t: pair t * BLOCK_M + r, token pair // num_heads, head pair % num_heads), so every head in the tile reads each
latent byte once, whatever the head count: decode (one token) fills the rows with heads, prefill with heads and then
tokens. The math between the loads is the shared attention core (kernels/attention.py): score_log2, key_range,
mask_scores, the online softmax and its finish; a split's partial result is merged by paged attention's reduce
kernel, paged_attention_reduce_kernel (the core's online softmax over the splits).

The output accumulator is BLOCK_M x kv_lora_rank fp32, whole in each program: kv_lora_rank is a constexpr power of
two (no padded lanes), and BLOCK_M is chosen on the host (python/llmkern/mla.py) so that this accumulator and the
q_nope operand fit the register file without spills (`llmkern check-compile`): up to 64 rows, with the direct
epilogue storing the kv_lora_rank output columns as two halves. More pairs than one tile holds take several tiles per (sequence,
split), adjacent in the launch (axis 0), so they stream the same latent tiles at about the same time: each tile
loads every latent byte of its split once (python/llmkern/mla.py counts them: twice at DeepSeek-V3's 128 heads).
"""
import triton
import triton.language as tl

from .attention import (cache_slot, dot_precision, key_range, mask_scores, online_softmax_init, online_softmax_step,
                        score_log2, softmax_lse, softmax_output)
from .rounding import round_to


# ------------------------------------------------------------------------------------------------------ cache write
@triton.jit
def mla_kv_write_kernel(
    CKV, KPE, CKV_CACHE, KPE_CACHE, SLOT,
    stride_ct, stride_cd, stride_pt, stride_pd,
    stride_ccb, stride_cct, stride_ccd,
    stride_pcb, stride_pct, stride_pcd,
    block_size, num_slots,
    RANK: tl.constexpr, ROPE_DIM: tl.constexpr,
):
    """One program per token: copies its ckv (RANK) and kpe (ROPE_DIM) rows into its cache slot, bit-exact.

    Only slots in [0, num_slots) are written (num_slots = num_blocks * block_size): -1, vLLM's padding slot, and any
    other slot outside the cache write nothing, so the host needs no sync to read the slots (as paged_kv_write)."""
    tok = tl.program_id(0).to(tl.int64)
    ok, blk, off = cache_slot(SLOT, tok, num_slots, block_size)
    if ok:
        r = tl.arange(0, RANK)
        p = tl.arange(0, ROPE_DIM)
        tl.store(CKV_CACHE + blk * stride_ccb + off * stride_cct + r * stride_ccd,
                 tl.load(CKV + tok * stride_ct + r * stride_cd))
        tl.store(KPE_CACHE + blk * stride_pcb + off * stride_pct + p * stride_pcd,
                 tl.load(KPE + tok * stride_pt + p * stride_pd))


# --------------------------------------------------------------------------------------------------------- attention
@triton.jit
def _load_rows(ROWS, cols, stride_col, row_ok, INTERPRET: tl.constexpr):
    """A (rows, cols) tile: row i at pointer ROWS[i], its elements cols * stride_col apart; rows not ok read 0 (a
    padding row's q, a key past the split's end). fp32 under the interpreter (see kernels/attention.py)."""
    tile = tl.load(ROWS[:, None] + cols[None, :] * stride_col, mask=row_ok[:, None], other=0.0)
    if INTERPRET:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def mla_attention_kernel(
    Q_NOPE, Q_PE, CKV, KPE, BT, CU_Q, SEQ_LENS, O, PART_O, PART_LSE,
    stride_qnt, stride_qnh, stride_qnd,
    stride_qpt, stride_qph, stride_qpd,
    stride_ckb, stride_ckt, stride_ckd,
    stride_kpb, stride_kpt, stride_kpd,
    stride_btb, stride_btn,
    stride_ot, stride_oh, stride_od,
    stride_pot, stride_poh, stride_pos, stride_pod,
    stride_plt, stride_plh, stride_pls,
    qk_scale, num_heads, block_size, num_splits,
    RANK: tl.constexpr, ROPE_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DECODE: tl.constexpr, CAUSAL: tl.constexpr, SPLIT: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Grid (cdiv(max q_len * num_heads, BLOCK_M), batch, num_splits).

    DECODE: sequence b has one query, row b of q (CU_Q is not read); else its queries are rows
    CU_Q[b]:CU_Q[b + 1]. Query i of q_len sits at position i + seq_len - q_len (bottom-right alignment) and with
    CAUSAL sees keys j <= its position, else all seq_len keys. Each split takes an equal BLOCK_N-aligned share of
    the tile's key range; SPLIT writes the normalised partial output and its base-2 lse to PART_O/PART_LSE (rows
    indexed by token and split: the host lays them out as the reduce's slots) for paged_attention_reduce_kernel,
    else the output to O. qk_scale = scale * log2(e).
    INTERPRET: fp32 tiles (see kernels/attention.py).
    """
    tile = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)

    if DECODE:
        q_start = b
        q_len = 1
    else:
        q_start = tl.load(CU_Q + b)
        q_len = tl.load(CU_Q + b + 1) - q_start
    seq_len = tl.load(SEQ_LENS + b)
    if tile * BLOCK_M < q_len * num_heads:
        pair = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        if DECODE:   # one token: the rows are heads (a constant token lets the compiler drop its per-row math)
            i = pair * 0
            h = pair
        else:
            i = pair // num_heads
            h = pair % num_heads
        row_ok = (i < q_len) & (h < num_heads)
        pos = i + (seq_len - q_len)
        tok = (q_start + i).to(tl.int64)
        r = tl.arange(0, RANK)
        p = tl.arange(0, ROPE_DIM)
        # padding rows (past the last token or head) load q = 0: finite scores, never stored
        q_nope = _load_rows(Q_NOPE + tok * stride_qnt + h * stride_qnh, r, stride_qnd, row_ok, INTERPRET)
        q_pe = _load_rows(Q_PE + tok * stride_qpt + h * stride_qph, p, stride_qpd, row_ok, INTERPRET)

        # The keys this tile's tokens may see, then this split's share of them.
        first_pos = (tile * BLOCK_M) // num_heads + (seq_len - q_len)
        last_pos = tl.minimum(((tile + 1) * BLOCK_M - 1) // num_heads, q_len - 1) + (seq_len - q_len)
        lo, _, _, hi = key_range(first_pos, last_pos, seq_len, 0, 0, False, CAUSAL, BLOCK_N)
        per_split = tl.cdiv(tl.cdiv(hi - lo, num_splits), BLOCK_N) * BLOCK_N
        start = lo + split * per_split
        end = tl.minimum(start + per_split, hi)

        m_i, l_i, acc = online_softmax_init(BLOCK_M, RANK)
        bt_row = BT + b.to(tl.int64) * stride_btb
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < end
            blk = tl.load(bt_row + (n // block_size) * stride_btn, mask=n_ok, other=0).to(tl.int64)
            off = n % block_size
            ckv = _load_rows(CKV + blk * stride_ckb + off * stride_ckt, r, stride_ckd, n_ok, INTERPRET)
            kpe = _load_rows(KPE + blk * stride_kpb + off * stride_kpt, p, stride_kpd, n_ok, INTERPRET)
            s = tl.dot(q_nope, tl.trans(ckv), input_precision=dot_precision(q_nope.dtype))
            s = tl.dot(q_pe, tl.trans(kpe), acc=s, input_precision=dot_precision(q_pe.dtype))
            s = score_log2(s, qk_scale, 1.0, False)
            s = mask_scores(s, pos, n, end, 0, 0, False, CAUSAL)
            # Causal: a row may see none of a tile's keys (the diagonal), or none of a split's.
            m_i, l_i, acc = online_softmax_step(s, ckv, m_i, l_i, acc, True, CAUSAL)

        # An empty split or row (l = 0) gives o = 0 and lse = -inf: weight 0 in the reduce.
        o = softmax_output(acc, l_i)
        if SPLIT:
            tl.store(PART_O + tok[:, None] * stride_pot + h[:, None] * stride_poh + split * stride_pos
                     + r[None, :] * stride_pod, o, mask=row_ok[:, None])
            tl.store(PART_LSE + tok * stride_plt + h * stride_plh + split * stride_pls, softmax_lse(m_i, l_i),
                     mask=row_ok)
        else:   # stored as two column halves: the whole 64 x 512 16-bit store spilled 88 bytes on sm_90
            o = round_to(o, O.dtype.element_ty, INTERPRET)
            o_lo, o_hi = tl.split(tl.permute(tl.reshape(o, (BLOCK_M, 2, RANK // 2)), (0, 2, 1)))
            half = tl.arange(0, RANK // 2)
            o_ptr = O + tok[:, None] * stride_ot + h[:, None] * stride_oh + half[None, :] * stride_od
            tl.store(o_ptr, o_lo, mask=row_ok[:, None])
            tl.store(o_ptr + (RANK // 2) * stride_od, o_hi, mask=row_ok[:, None])
