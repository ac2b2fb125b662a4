"""Decoding controls beyond one plain draw: speculative sampling, beam search's top-k, repetition penalties.

Three kernels, each one program per row (beam search: per sequence, over its beams), all math in fp32.

_speculative_kernel: chain speculative sampling (Leviathan et al., arXiv 2211.17192, Algorithm 1; FlashInfer's
  chain_speculative_sampling). Draft token i is accepted when u_i * q_i(x_i) < p_i(x_i), u_i = tl.rand(seed, i), which
  is "u_i < min(1, p/q)" without a division (p >= q always accepts, q = 0 accepts any token the target allows). The
  first rejection j (k when none) selects the row to draw from: the residual max(0, p_j - q_j), or the target row p_k
  for the bonus token (q is taken as 0 there, so both are max(0, p - q')). The draw is an inverse CDF with
  u = tl.rand(seed, k), two passes over the row: its mass, then the scan (sampling's `inverse_cdf_step`).

_beam_topk_kernel: the 2 * num_beams best (beam, token) continuations of each sequence by
  beam_score + log_softmax(logits), without sorting beams x vocab. K (the number kept) is small, so each beam row is
  read once: a K-entry buffer in registers keeps the row's best logits while the row streams by (a tile only costs
  insertion rounds when some of its logits beat the buffer's weakest entry, rare after the first tiles), and the
  row's log-normalizer is computed online in the same pass. Then the row's entries, turned into scores, are
  inserted into the sequence's K-entry buffer the same way, and that buffer is sorted by rank (a (K, K) compare). (sampling's threshold search fits a k of thousands with a bounded number of re-reads;
  for a K this small one read with a register buffer is cheaper.) Order: score descending, then flat index
  beam * vocab + token ascending, so a tie goes to the lower beam and token.

_penalties_kernel: repetition (transformers), presence and frequency (OpenAI), logit bias, with no (batch, vocab)
  count tensor: the output row itself holds the counts while they are needed. Pass 1 writes logits + bias for
  every token; the history's tokens then get their slot zeroed, counted by atomic adds, read back (each history
  entry parks its token's final value in a workspace the size of the history), and overwritten with the final
  value. Barriers order the passes within the program; each pass over the history is a loop of tiles.
"""
import triton
import triton.language as tl

from llmkern.kernels.sampling import KEY_MAX, LOG2E, inverse_cdf_step


# ------------------------------------------------------------------------------------------- speculative sampling
@triton.jit
def _speculative_kernel(draft_ptr, sd_b, sd_i, ids_ptr, si_b, si_i, target_ptr, st_b, st_i, seed_ptr,
                        out_ptr, so_b, accepted_ptr, K, V,
                        KP: tl.constexpr, BLOCK: tl.constexpr):
    """draft (batch, K, V), ids (batch, K), target (batch, K + 1, V), unit stride along V. out (batch, K + 1) int64:
    the accepted draft tokens, the drawn token (-1 when its row has no positive finite mass), then -1.
    accepted (batch,) int64: the number of accepted draft tokens. KP: a power of two > K."""
    row = tl.program_id(0).to(tl.int64)
    seed = tl.load(seed_ptr + row)
    i = tl.arange(0, KP)
    in_chain = i < K
    x = tl.load(ids_ptr + row * si_b + i * si_i, mask=in_chain, other=0).to(tl.int64)
    x_ok = in_chain & (x >= 0) & (x < V)            # the host checked the ids; never read outside a row anyway
    p_x = tl.load(target_ptr + row * st_b + i * st_i + x, mask=x_ok, other=0.0).to(tl.float32)
    q_x = tl.load(draft_ptr + row * sd_b + i * sd_i + x, mask=x_ok, other=0.0).to(tl.float32)
    u = tl.rand(seed, i)                                             # u[i]: draft i's test; u[K]: the draw
    rejected = in_chain & ~(u * q_x < p_x)                           # NaN rejects
    j = tl.min(tl.where(rejected, i, K), 0)                          # first rejection, K if none
    u_draw = tl.sum(tl.where(i == K, u, 0.0), 0)

    # The draw's row: max(0, p_j - q_j), with q_j = 0 for the bonus row (j == K). If rounding left the residual
    # without mass, p_j itself (pass 1 sums both).
    t_row = target_ptr + row * st_b + j.to(tl.int64) * st_i
    d_row = draft_ptr + row * sd_b + j.to(tl.int64) * sd_i
    n_q = tl.where(j < K, V, 0)                                      # q loads off for the bonus row
    offs0 = tl.arange(0, BLOCK)
    mass_res = tl.full([], 0.0, tl.float32)
    mass_p = tl.full([], 0.0, tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + offs0
        p = tl.load(t_row + offs, mask=offs < V, other=0.0).to(tl.float32)
        q = tl.load(d_row + offs, mask=offs < n_q, other=0.0).to(tl.float32)
        mass_res += tl.sum(tl.maximum(p - q, 0.0, propagate_nan=tl.PropagateNan.ALL), 0)   # NaN stays NaN
        mass_p += tl.sum(tl.maximum(p, 0.0, propagate_nan=tl.PropagateNan.ALL), 0)
    use_q = mass_res > 0.0
    n_q = tl.where(use_q, n_q, 0)
    mass = tl.where(use_q, mass_res, mass_p)
    goal = u_draw * mass
    running = tl.full([], 0.0, tl.float32)
    token = tl.full([], KEY_MAX, tl.int32)
    last = tl.full([], -1, tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + offs0
        p = tl.load(t_row + offs, mask=offs < V, other=0.0).to(tl.float32)
        q = tl.load(d_row + offs, mask=offs < n_q, other=0.0).to(tl.float32)
        w = tl.maximum(p - q, 0.0, propagate_nan=tl.PropagateNan.ALL)
        running, token, last = inverse_cdf_step(w, offs, running, goal, token, last)
    token = tl.where(token == KEY_MAX, last, token)
    token = tl.where((mass > 0.0) & (mass < float("inf")), token, -1)

    out = tl.where(i < j, x, tl.where(i == j, token.to(tl.int64), -1))
    tl.store(out_ptr + row * so_b + i, out, mask=i <= K)
    tl.store(accepted_ptr + row, j.to(tl.int64))


# ------------------------------------------------------------------------------------------------ beam search top-k
@triton.jit
def _insert(bv, bi, slot, vals, idx):
    """Insert into a K-entry buffer (bv values, bi indices; slots >= K hold +inf and are never replaced; empty
    entries are (-inf, -1)) every candidate of (vals, idx) that beats its weakest entry, best first (value
    descending, index ascending), each replacing the weakest: the smallest value, and among equal values the largest
    index. "Beats" is "strictly greater": every call offers indices above those already in the buffer, so an equal
    value loses the tie. -inf and NaN never enter. Rounds: at most K (the candidates left after K insertions are
    no better than the K inserted)."""
    cand = vals > tl.min(bv, 0)
    n = tl.sum(cand.to(tl.int32), 0)
    while n > 0:
        best = tl.max(tl.where(cand, vals, float("-inf")), 0)
        at = tl.min(tl.where(cand & (vals == best), idx, KEY_MAX), 0)
        vmin = tl.min(bv, 0)
        imax = tl.max(tl.where(bv == vmin, bi, -2), 0)
        weakest = tl.max(tl.where((bv == vmin) & (bi == imax), slot, -1), 0)
        bv = tl.where(slot == weakest, best, bv)
        bi = tl.where(slot == weakest, at, bi)
        cand = cand & (vals > tl.min(bv, 0)) & (idx != at)
        n = tl.sum(cand.to(tl.int32), 0)
    return bv, bi


@triton.jit
def _beam_topk_kernel(logits_ptr, stride_row, scores_ptr, out_val_ptr, out_idx_ptr, NB, K, V,
                      KP: tl.constexpr, BLOCK: tl.constexpr):
    """logits (batch * NB, V), row r = sequence r // NB, beam r % NB; scores (batch * NB,) fp32 beam scores.
    out_val (batch, K) fp32 and out_idx (batch, K) int64 (beam * V + token), best first; (-inf, -1) pads a sequence
    with fewer than K finite candidates. KP: a power of two >= K."""
    seq = tl.program_id(0)
    slot = tl.arange(0, KP)
    offs0 = tl.arange(0, BLOCK)
    empty_v = tl.where(slot < K, float("-inf"), float("inf"))
    gv = empty_v                                   # the sequence's buffer: scores, flat indices
    gi = tl.full([KP], -1, tl.int32)
    for b in range(0, NB):
        r = seq * NB + b
        row_ptr = logits_ptr + r.to(tl.int64) * stride_row
        rv = empty_v                               # the row's buffer: logits, token ids
        ri = tl.full([KP], -1, tl.int32)
        m = tl.full([], float("-inf"), tl.float32)
        z = tl.full([], 0.0, tl.float32)
        nans = tl.full([], 0, tl.int32)
        for start in range(0, V, BLOCK):
            offs = start + offs0
            l = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            # online log-normalizer, as in sampling's first pass
            nans += tl.sum((l != l).to(tl.int32), 0)
            m_new = tl.maximum(m, tl.max(l, 0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            z = z * tl.exp2((m - m_safe) * LOG2E) + tl.sum(tl.exp2((l - m_safe) * LOG2E), 0)
            m = m_new
            # the row's best logits so far (a tile costs insertion rounds only when it beats the buffer)
            rv, ri = _insert(rv, ri, slot, l, offs)
        # The row's entries as scores, offered to the sequence's buffer. A row holding NaN or +inf, or all -inf,
        # has no log-probabilities: it offers nothing.
        valid = (nans == 0) & (m > float("-inf")) & (m < float("inf"))
        lse = m + tl.log(z)
        score = tl.load(scores_ptr + r) + (rv - lse)
        score = tl.where((ri >= 0) & (slot < K), score, float("-inf"))
        score = tl.where(valid, score, float("-inf"))
        gv, gi = _insert(gv, gi, slot, score, b * V + ri)

    # Sort the K entries: rank = number of entries ahead (score descending, index ascending, slot for the empties).
    # Padding slots (>= K) rank last.
    real = slot < K
    v_a = tl.where(real, gv, float("-inf"))[:, None]
    v_b = tl.where(real, gv, float("-inf"))[None, :]
    i_a = tl.where(real, gi, KEY_MAX)[:, None]
    i_b = tl.where(real, gi, KEY_MAX)[None, :]
    ahead = (v_b > v_a) | ((v_b == v_a) & ((i_b < i_a) | ((i_b == i_a) & (slot[None, :] < slot[:, None]))))
    rank = tl.sum(ahead.to(tl.int32), 1)
    base = seq.to(tl.int64) * K
    tl.store(out_val_ptr + base + rank, gv, mask=real)
    tl.store(out_idx_ptr + base + rank, gi.to(tl.int64), mask=real)


# ----------------------------------------------------------------------------------------------- penalties
@triton.jit
def _penalties_kernel(logits_ptr, stride_l, ids_ptr, si_b, si_j, L, bias_ptr, stride_bias,
                      rep_ptr, pres_ptr, freq_ptr, out_ptr, stride_o, work_ptr, V,
                      HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_H: tl.constexpr):
    """out (batch, V) fp32 = the penalized logits; ids (batch, L) the history (-1 = padding, any strides);
    work (batch, L) fp32 scratch. See the module docstring for the pass structure."""
    row = tl.program_id(0).to(tl.int64)
    l_row = logits_ptr + row * stride_l
    o_row = out_ptr + row * stride_o
    b_row = bias_ptr + row * stride_bias
    h_row = ids_ptr + row * si_b
    w_row = work_ptr + row * L
    rep = tl.load(rep_ptr + row)
    pres = tl.load(pres_ptr + row)
    freq = tl.load(freq_ptr + row)

    # 1. every token: logits + bias
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(l_row + offs, mask=offs < V, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(b_row + offs, mask=offs < V, other=0.0).to(tl.float32)
        tl.store(o_row + offs, x, mask=offs < V)
    tl.debug_barrier()
    # 2. the history's slots become counters
    for start in range(0, L, BLOCK_H):
        j = start + tl.arange(0, BLOCK_H)
        t = tl.load(h_row + j * si_j, mask=j < L, other=-1)
        tl.store(o_row + t, tl.zeros([BLOCK_H], tl.float32), mask=(t >= 0) & (t < V))
    tl.debug_barrier()
    # 3. count (fp32 counts are exact up to 2**24, far above any history the host accepts)
    for start in range(0, L, BLOCK_H):
        j = start + tl.arange(0, BLOCK_H)
        t = tl.load(h_row + j * si_j, mask=j < L, other=-1)
        tl.atomic_add(o_row + t, tl.full([BLOCK_H], 1.0, tl.float32), mask=(t >= 0) & (t < V))
    tl.debug_barrier()
    # 4. each history entry computes its token's final value (equal entries compute equal values) and parks it.
    #    The counts are read from L2 (.cg): the atomics above bypassed L1.
    for start in range(0, L, BLOCK_H):
        j = start + tl.arange(0, BLOCK_H)
        t = tl.load(h_row + j * si_j, mask=j < L, other=-1)
        ok = (t >= 0) & (t < V)
        count = tl.load(o_row + t, mask=ok, other=0.0, cache_modifier=".cg")
        x = tl.load(l_row + t, mask=ok, other=0.0).to(tl.float32)
        x = tl.where(x < 0.0, x * rep, x / rep)          # transformers' RepetitionPenaltyLogitsProcessor
        x = x - freq * count - pres                      # OpenAI: frequency * count + presence * [count > 0]
        if HAS_BIAS:
            x += tl.load(b_row + t, mask=ok, other=0.0).to(tl.float32)
        tl.store(w_row + j, x, mask=ok)
    tl.debug_barrier()
    # 5. write the final values over the counters
    for start in range(0, L, BLOCK_H):
        j = start + tl.arange(0, BLOCK_H)
        t = tl.load(h_row + j * si_j, mask=j < L, other=-1)
        ok = (t >= 0) & (t < V)
        tl.store(o_row + t, tl.load(w_row + j, mask=ok, other=0.0), mask=ok)
