"""Mixture of Experts: routing (top-k over the router logits) and the fused expert MLP. Device code only.

    moe_topk_kernel   router logits (T, E) -> top_k weights (fp32) and expert ids (int32) per token, no sort
    moe_align_kernel  topk ids -> the token slots sorted by expert, each expert's run padded to BLOCK_M rows
    moe_gemm_kernel   one grouped GEMM over those row blocks: gate/up with SiLU-and-mul in the epilogue (GATED),
                      or down with the routing weight in the epilogue; dense or int4/int8 weight-only experts
    moe_sum_kernel    each token's top_k down-projection rows summed, in a fixed order

Terms (vLLM's fused_moe): a "slot" is one (token, k) pair, slot = token * top_k + k, A = T * top_k slots in all.
The GEMMs read and write rows by slot; the token of a slot is slot // top_k.
"""
import triton
import triton.language as tl

from llmkern.kernels.quant import _centered_tile, _grouped_order, _x_cols

NEG_INF = tl.constexpr(float("-inf"))


# ------------------------------------------------------------------------------------------------------ routing
@triton.jit
def _first_max(keys, avail, offs, NONE: tl.constexpr):
    """Per row of (BLOCK_T, W) keys: the column index of the largest available key, the lowest index among equal
    keys (as torch.argmax and a stable descending sort). A row with no available column gets NONE."""
    k = tl.where(avail, keys, NEG_INF)
    best = tl.max(k, axis=1)
    return tl.min(tl.where(avail & (k == best[:, None]), offs[None, :], NONE), axis=1)


@triton.jit
def moe_topk_kernel(logits_ptr, stride_lt, stride_le, bias_ptr, weights_ptr, ids_ptr,
                    T, E, top_k, group_size, num_groups, topk_group, scaling,
                    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr,
                    RENORMALIZE: tl.constexpr):
    """A program routes BLOCK_T tokens: their (BLOCK_T, BLOCK_E) logits stay in registers, and top_k rounds of
    "take the largest remaining key" pick the experts (O(top_k * E) compares per token, no sort).

    Scores and keys, in fp32 (the host docstring, llmkern.moe.moe_topk, gives the formulas and their sources):
      softmax: key = the logit (softmax is monotone, so the choice never depends on how exp rounds), weight = the
               softmax probability; renormalized: divided by the chosen probabilities' sum.
      sigmoid: score = sigmoid(logit), key = score + correction bias; weight = score; renormalized: divided by
               the chosen scores' sum + 1e-20 (DeepSeek-V3).
    GROUPED (DeepSeek's group-limited routing): experts form num_groups runs of group_size; a group's key is its
    largest key (softmax, DeepSeek-V2) or the sum of its two largest (sigmoid, DeepSeek-V3); only the experts of
    the topk_group best groups can be picked. NaN keys count as -inf for the choice (ids stay in range); the
    weights are computed from the raw logits, so a NaN logit still shows as NaN weights.
    """
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    offs_k = tl.arange(0, BLOCK_K)
    t_mask = offs_t < T
    e_mask = offs_e < E
    rows = offs_t.to(tl.int64)
    x = tl.load(logits_ptr + rows[:, None] * stride_lt + offs_e[None, :] * stride_le,
                mask=t_mask[:, None] & e_mask[None, :], other=NEG_INF).to(tl.float32)
    if SIGMOID:
        score = 1.0 / (1.0 + tl.exp(-x))
        key = score
        if HAS_BIAS:
            key += tl.load(bias_ptr + offs_e, mask=e_mask, other=0.0).to(tl.float32)[None, :]
    else:
        key = x
    key = tl.where(key == key, key, NEG_INF)                     # NaN -> -inf, for the choice only
    avail = t_mask[:, None] & e_mask[None, :]                    # (BLOCK_T, BLOCK_E): may still be picked
    if not SIGMOID:
        m = tl.max(tl.where(avail, key, NEG_INF), axis=1)
        z = tl.sum(tl.where(avail, tl.exp(x - m[:, None]), 0.0), axis=1)

    if GROUPED:
        gid = offs_e // group_size
        gkey = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)    # each expert holds its group's key
        for g in range(0, num_groups):
            in_g = avail & (gid == g)[None, :]
            top1 = tl.max(tl.where(in_g, key, NEG_INF), axis=1)
            if SIGMOID:    # plus the second largest: the largest once the first-found maximum is removed
                first = _first_max(key, in_g, offs_e, BLOCK_E)
                top1 += tl.max(tl.where(in_g & (offs_e[None, :] != first[:, None]), key, NEG_INF), axis=1)
            gkey = tl.where((gid == g)[None, :], top1[:, None], gkey)
        # the topk_group best groups, ties to the lower group index (via its first expert's index)
        free = avail
        chosen = avail & (offs_e < 0)[None, :]
        for _g in range(0, topk_group):
            best = _first_max(gkey, free, offs_e, BLOCK_E) // group_size
            pick_g = gid[None, :] == best[:, None]
            chosen |= pick_g & avail
            free &= ~pick_g
        avail = chosen

    w_out = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    id_out = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for j in range(0, top_k):
        idx = _first_max(key, avail, offs_e, BLOCK_E)
        pick = offs_e[None, :] == idx[:, None]
        if SIGMOID:
            w = tl.sum(tl.where(pick, score, 0.0), axis=1)
        else:
            w = tl.exp(tl.sum(tl.where(pick, x, 0.0), axis=1) - m) / z
        w_out = tl.where(offs_k[None, :] == j, w[:, None], w_out)
        id_out = tl.where(offs_k[None, :] == j, idx[:, None], id_out)
        avail &= ~pick
    if RENORMALIZE:
        total = tl.sum(w_out, axis=1)
        if SIGMOID:
            total += 1e-20
        w_out = w_out / total[:, None]
    w_out = w_out * scaling
    out_mask = t_mask[:, None] & (offs_k < top_k)[None, :]
    out_offs = rows[:, None] * top_k + offs_k[None, :]
    tl.store(weights_ptr + out_offs, w_out, mask=out_mask)
    tl.store(ids_ptr + out_offs, id_out, mask=out_mask)


# ---------------------------------------------------------------------------------------------------- alignment
@triton.jit
def _slot_experts(ids_ptr, stride_it, stride_ik, offs_a, A, E, top_k):
    """The expert of each slot in offs_a (slot a is id (a // top_k, a % top_k) of the (T, top_k) tensor), and whether
    it is routed: a slot past A, or whose id lies outside [0, E), goes nowhere (its expert reads as 0)."""
    a_mask = offs_a < A
    e = tl.load(ids_ptr + (offs_a // top_k).to(tl.int64) * stride_it + (offs_a % top_k) * stride_ik,
                mask=a_mask, other=-1)
    routed = a_mask & (e >= 0) & (e < E)                         # compared as loaded: int64 ids are never wrapped
    return tl.where(routed, e, 0).to(tl.int32), routed


@triton.jit
def moe_align_kernel(ids_ptr, stride_it, stride_ik, sorted_ptr, block_expert_ptr, total_ptr, cursor_ptr,
                     A, E, top_k, max_blocks,
                     BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr):
    """One program (vLLM's moe_align_block_size does it in one thread block too). Writes
      sorted_ptr[max_blocks * BLOCK_M]  slots grouped by expert, ascending expert, each expert's run padded with
                                        the sentinel A to a multiple of BLOCK_M rows;
      block_expert_ptr[max_blocks]      the expert of each BLOCK_M-row block (blocks past the total: not written);
      total_ptr[1]                      the padded total, sum over experts of cdiv(count, BLOCK_M) * BLOCK_M;
      cursor_ptr[E]                     scratch.
    A counting sort. Pass 1 counts the slots per expert (tl.histogram) and a prefix sum places each expert's run;
    pass 2 hands each slot the next free row of its expert's run with an atomic add on that expert's cursor. The
    order of slots inside a run is therefore not fixed on a GPU, and need not be: every GEMM row is computed on its
    own, so a slot's result does not depend on its row. Cost: A / BLOCK_A iterations per pass, whatever E."""
    offs_e = tl.arange(0, BLOCK_E)
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for a0 in range(0, A, BLOCK_A):
        e, routed = _slot_experts(ids_ptr, stride_it, stride_ik, a0 + tl.arange(0, BLOCK_A), A, E, top_k)
        counts += tl.histogram(e, BLOCK_E, mask=routed)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, axis=0)
    start = end - padded
    total = tl.sum(padded, axis=0)
    tl.store(total_ptr, total)
    tl.store(cursor_ptr + offs_e, start, mask=offs_e < E)

    # block b holds rows [b * BLOCK_M, (b + 1) * BLOCK_M): its expert is the number of runs ending at or before them
    for b0 in range(0, max_blocks, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        first_row = offs_b * BLOCK_M
        expert = tl.sum((end[None, :] <= first_row[:, None]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + offs_b, expert, mask=first_row < total)
    # the padding rows of each run hold the sentinel A
    for j in range(0, BLOCK_M):
        tl.store(sorted_ptr + start + counts + j, tl.zeros((BLOCK_E,), dtype=tl.int32) + A,
                 mask=j < padded - counts)
    tl.debug_barrier()          # the cursors are in memory before any thread adds to them

    for a0 in range(0, A, BLOCK_A):
        offs_a = a0 + tl.arange(0, BLOCK_A)
        e, routed = _slot_experts(ids_ptr, stride_it, stride_ik, offs_a, A, E, top_k)
        row = tl.atomic_add(cursor_ptr + e, 1, mask=routed)
        tl.store(sorted_ptr + row, offs_a, mask=routed)


# -------------------------------------------------------------------------------------------------- grouped GEMM
@triton.jit
def _tile_dot(xt, w_ptr, s_ptr, z_ptr, offs_k, offs_n, k_mask, n_mask, g, W_N, stride_wn, stride_wk, bits, pack_shift,
              QUANT: tl.constexpr, FP32_DOT: tl.constexpr):
    """xt (BLOCK_M, BLOCK_K) times one expert's weight tile for output columns offs_n, (BLOCK_K, BLOCK_N): the fp32
    product. Dense: w[n, k] at w_ptr + n * stride_wn + k * stride_wk. QUANT: llmkern's packed layout
    (kernels/quant.py): the K-tile's codes minus their zero points (exact integers) through the dot, the group's
    scale applied to the fp32 product."""
    if QUANT:
        w, s = _centered_tile(w_ptr, s_ptr, z_ptr, g, offs_k, offs_n, k_mask, n_mask, W_N, bits, pack_shift)
    else:
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
    if FP32_DOT:   # fp32 activations, or the interpreter, whose bf16 dot is unreliable: exact fp32 products
        part = tl.dot(xt.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    else:
        part = tl.dot(xt, w.to(xt.dtype))
    if QUANT:
        part = part * s[None, :]
    return part


@triton.jit
def moe_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, perm_ptr, out_ptr, topk_w_ptr, sorted_ptr, block_expert_ptr, total_ptr,
    N, K, W_N, A, top_k, num_m,
    stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_se, stride_om, stride_twt, stride_twk,
    group_size, bits, pack_shift,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    GATED: tl.constexpr, QUANT: tl.constexpr, HAS_PERM: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """The grouped GEMM over the aligned row blocks. Program (pid_m, pid_n): rows sorted[pid_m * BLOCK_M + i] (slots;
    the sentinel A marks padding), the expert block_expert[pid_m], output columns pid_n * BLOCK_N + j.

    GATED (gate/up): x rows are tokens (slot // top_k) of hidden_states; the weight has W_N = 2N rows, gate rows
      [0, N) and up rows [N, 2N); out[slot, n] = silu(gate) * up.
    not GATED (down): x rows are slots of the gate/up output; out[slot, n] = topk_weight[slot] * (x @ w[e].T).
    QUANT weights are (E, K // PACK, W_N) int32 words with (E, groups, W_N) scales and zero points, HAS_PERM an
    (E, K) act-order permutation of x's columns; dense weights are (E, W_N, K) with any strides.
    """
    # grouped launch order: the row blocks of one group are mostly one expert's, sharing its weight tiles in L2
    pid_m, pid_n = _grouped_order(tl.program_id(0), num_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(total_ptr):
        return                                                   # past the last expert's run: reads nothing

    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    slots = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    m_mask = slots < A
    if GATED:
        x_rows = (slots // top_k).to(tl.int64)
    else:
        x_rows = slots.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w_e = w_ptr + e * stride_we
    s_e = s_ptr + e * stride_se
    z_e = z_ptr + e * stride_se
    perm_e = perm_ptr + e * K

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATED:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        cols = _x_cols(perm_e, offs_k, k_mask, K, HAS_PERM)
        xt = tl.load(x_ptr + x_rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        g = k0 // group_size                                     # QUANT: the tile's one group (BLOCK_K divides it)
        acc += _tile_dot(xt, w_e, s_e, z_e, offs_k, offs_n, k_mask, n_mask, g, W_N, stride_wn, stride_wk,
                         bits, pack_shift, QUANT, FP32_DOT)
        if GATED:
            acc_up += _tile_dot(xt, w_e, s_e, z_e, offs_k, offs_n + N, k_mask, n_mask, g, W_N, stride_wn, stride_wk,
                                bits, pack_shift, QUANT, FP32_DOT)

    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up                # silu(gate) * up, in fp32
    else:
        tw = tl.load(topk_w_ptr + (slots // top_k).to(tl.int64) * stride_twt + (slots % top_k) * stride_twk,
                     mask=m_mask, other=0.0).to(tl.float32)
        acc = acc * tw[:, None]
    tl.store(out_ptr + slots.to(tl.int64)[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


# ---------------------------------------------------------------------------------------------------------- sum
@triton.jit
def moe_sum_kernel(y_ptr, ids_ptr, out_ptr, H, E, top_k, stride_it, stride_ik, stride_ot,
                   BLOCK_H: tl.constexpr):
    """out[t, :] = sum over k of y[t * top_k + k, :], k ascending, in fp32. A slot whose id lies outside [0, E)
    was routed nowhere: its row of y was never written and is skipped."""
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in range(0, top_k):
        e = tl.load(ids_ptr + t * stride_it + k * stride_ik)
        y = tl.load(y_ptr + (t * top_k + k) * H + offs_h, mask=h_mask, other=0.0).to(tl.float32)
        acc += tl.where((e >= 0) & (e < E), y, 0.0)
    tl.store(out_ptr + t * stride_ot + offs_h, acc.to(out_ptr.dtype.element_ty), mask=h_mask)
