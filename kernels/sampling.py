"""Fused sampling: temperature, top-k, top-p and min-p over one vocabulary row, with no sort.

One program owns one row and streams it in tiles. What it computes, in terms of the row's fp32 logits l and the
row's temperature T (all math in fp32, whatever the input dtype):

    q_i = exp((l_i - max l) / T)            unnormalized probability, q = 1 for the most probable token
    kept = { i : key(l_i) >= t  and  q_i >= min_p }
    p_i  = q_i / sum_kept q                 the distribution `sampling_probs` writes and `sample` draws from

Every cut-off of top-k and top-p is "keep the tokens whose logit is at least some logit value t" (ties at a boundary
are therefore all kept or all dropped together), so the whole problem is finding t without sorting. Logits are
compared through an order-preserving int32 key (`_ordered_key`), which makes the search exact integer arithmetic.

How the cut-off is found: a multi-pivot search on the key ("threshold bisection with counts and masses").
  * The answer is the largest element key v with F(v) >= target, where F(v) is the count (top-k: target k) or the
    q-mass (top-p: target top_p * mass of the top-k survivors) of the elements with key >= v. F never increases
    with v, so a bracket [lo, hi) with F(lo) >= target > F(hi) always holds the answer.
  * One pass over the row evaluates F at NPIV evenly spaced pivots of [lo, hi) at once, and for each pivot the
    smallest element key at or above it and the largest element key below the next pivot. The sub-interval that
    holds the answer becomes the new bracket, shrunk to the element keys it actually contains. When it holds a
    single distinct value, that value is the exact answer.
  * Pass count: each pass divides the key width by NPIV = 16; a bracket starts at most 2**32 wide, so a search ends
    after at most 8 passes (16**8 = 2**32); the min/max shrinking usually ends it after 3-5 (the bracket then holds
    one distinct logit). Pivot-based rejection sampling (FlashInfer) reads a row fewer times on average but has no
    fixed bound and does not give the exact kept set that `sampling_probs` must return; this search gives both.
Reads of one row, at most: 1 (max, argmax, normalizer) + 8 (top-k search, only when top-k is on) + 8 (top-p search,
only when top-p is on) + 1 (kept mass, only when min-p is on) + 1 (the draw, or the normalize-and-write pass).
Every read is a contiguous tile of the row (coalesced). The row stays in L2 between passes for moderate batches.

The draw is inverse-CDF: u from Philox (`tl.rand`, keyed by the row's seed, offset 0) scaled by the kept mass, then
the first kept token whose running mass exceeds it. Rows holding NaN or +inf, or with every logit -inf, are
"invalid": the sampler returns -1 and `sampling_probs` writes a row of zeros.
"""
import triton
import triton.language as tl

# int32 extremes as constexprs: a literal -2147483648 would be parsed as -(2147483648), an int64.
KEY_MIN = tl.constexpr(-(2 ** 31))
KEY_MAX = tl.constexpr(2 ** 31 - 1)
LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) == exp2(x * log2(e)); exp2 is the hardware instruction


# Two one-liners recur in every pass and are written out inline rather than as @triton.jit helpers (the Triton
# interpreter re-patches its language module on every nested jit call, a few ms each, which dominated test time):
#   load:  tl.load(row + offs, mask=offs < n, other=-inf).to(fp32) + 0.0      (`+ 0.0` maps -0.0 to +0.0, so a
#          zero logit has one key; n = V, or 0 to switch a pass's loads off)
#   key:   bits ^ ((bits >> 31) & KEY_MAX), bits = the fp32 bit pattern as int32: an int32 key that orders like the
#          floats (same-sign IEEE floats order like their bit patterns; negative ones backwards, so the arithmetic
#          shift selects them and the xor flips their magnitude bits).


@triton.jit
def _row_stats(row_ptr, V, scale, BLOCK: tl.constexpr):
    """Pass 1: max logit, its first index, the smallest key, the NaN count and Z = sum exp2((l - max) * scale).

    Z is accumulated online (rescaled whenever the running max grows), as in flash attention.
    """
    offs0 = tl.arange(0, BLOCK)
    m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), 0)
    arg = tl.min(tl.full([BLOCK], 0, tl.int32), 0)
    kmin = tl.min(tl.full([BLOCK], KEY_MAX, tl.int32), 0)
    nans = tl.min(tl.full([BLOCK], 0, tl.int32), 0)
    z = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
    for start in range(0, V, BLOCK):
        offs = start + offs0
        l = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32) + 0.0
        bits = l.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) & KEY_MAX)
        nans += tl.sum((l != l).to(tl.int32), 0)
        tile_max = tl.max(l, 0)
        tile_arg = tl.min(tl.where(l == tile_max, offs, KEY_MAX), 0)
        arg = tl.where(tile_max > m, tile_arg, arg)          # strictly greater: the first maximum wins
        m_new = tl.maximum(m, tile_max)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: avoid (-inf) - (-inf)
        z = z * tl.exp2((m - m_safe) * scale) + tl.sum(tl.exp2((l - m_safe) * scale), 0)
        m = m_new
        kmin = tl.minimum(kmin, tl.min(tl.where(offs < V, key, KEY_MAX), 0))
    return m, arg, kmin, nans, z


@triton.jit
def _search(row_ptr, V, lo, hi, mass_lo, target, m, scale,
            BY_MASS: tl.constexpr, BLOCK: tl.constexpr, LOG2_NPIV: tl.constexpr, MAX_PASSES: tl.constexpr):
    """Largest element key v in [lo, hi) with F(v) >= target, and the q-mass of the elements with key >= v.

    F is the count (BY_MASS False) or the q-mass (BY_MASS True) of elements with key >= v. Requires lo to be an
    element key with F(lo) >= target, and F(hi) < target; an empty bracket (hi <= lo + 1) returns (lo, mass_lo).
    See the module docstring for why MAX_PASSES = 8 always suffices.
    """
    NPIV: tl.constexpr = 1 << LOG2_NPIV
    j = tl.arange(0, NPIV)
    offs0 = tl.arange(0, BLOCK)
    n_pass = 0
    while (lo + 1 < hi) & (n_pass < MAX_PASSES):
        n_pass += 1
        # A finished search (one distinct key left) runs its remaining passes over zero tiles. Warp reductions
        # (shuffles) stay out of that data-dependent loop and out of any data-dependent `if`: ptxas cannot prove
        # such code warp-uniform and compiles shuffles there as calls to a fallback that needs a stack frame.
        active = lo + 1 < hi
        width = hi.to(tl.int64) - lo.to(tl.int64)                  # up to 2**32: int64
        # floor(width * j / NPIV) as a shift: an int64 division would be a stack-using call on the GPU
        piv = (lo.to(tl.int64) + ((width * j) >> LOG2_NPIV)).to(tl.int32)          # piv[0] = lo
        upper = (lo.to(tl.int64) + ((width * (j + 1)) >> LOG2_NPIV)).to(tl.int32)  # upper[-1] = hi
        # Per-lane accumulators, reduced once after the tile loop: the loop has no cross-thread traffic.
        cnt = tl.zeros([NPIV, BLOCK], tl.float32)   # counts in fp32: exact up to 2**24 tokens
        mass = tl.zeros([NPIV, BLOCK], tl.float32)
        mn = tl.full([NPIV, BLOCK], KEY_MAX, tl.int32)
        mx = tl.full([NPIV, BLOCK], KEY_MIN, tl.int32)
        for start in range(0, V, BLOCK):
            offs = start + offs0
            l = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32) + 0.0
            bits = l.to(tl.int32, bitcast=True)
            key = tl.where(offs < V, bits ^ ((bits >> 31) & KEY_MAX), KEY_MIN)[None, :]  # past the end: lowest
            ge = key >= piv[:, None]                                        # (NPIV, BLOCK)
            mass += tl.where(ge, tl.exp2((l - m) * scale)[None, :], 0.0)
            if not BY_MASS:
                cnt += ge.to(tl.float32)
            mn = tl.minimum(mn, tl.where(ge, key, KEY_MAX))
            mx = tl.maximum(mx, tl.where(key < upper[:, None], key, KEY_MIN))
        mass = tl.sum(mass, 1)
        mn = tl.min(mn, 1)
        mx = tl.max(mx, 1)
        if BY_MASS:
            f = mass
        else:
            f = tl.sum(cnt, 1)
        # F falls with j, so the pivots that reach the target are a prefix; the last of them starts the
        # sub-interval [piv[js], upper[js]) that holds the answer. j = 0 (= lo) reaches it by the invariant.
        js = tl.max(tl.where(f >= target, j, 0), 0)
        sel = j == js
        lo = tl.where(active, tl.sum(tl.where(sel, mn, 0), 0), lo)           # smallest element key in it
        hi = tl.where(active, tl.sum(tl.where(sel, mx, 0), 0) + 1, hi)       # one past the largest
        mass_lo = tl.where(active, tl.sum(tl.where(sel, mass, 0.0), 0), mass_lo)
    return lo, mass_lo


@triton.jit
def _row_threshold(row_ptr, V, T, top_k, top_p, min_p,
                   BLOCK: tl.constexpr, BLOCK_S: tl.constexpr, LOG2_NPIV: tl.constexpr, MAX_PASSES: tl.constexpr):
    """Everything before the last pass: (sampled, greedy, argmax, max, scale, threshold key, kept mass)."""
    scale = LOG2E / tl.where(T > 0, T, 1.0)      # T == 0 (greedy) never uses the scale
    m, arg, kmin, nans, z = _row_stats(row_ptr, V, scale, BLOCK)
    valid = (nans == 0) & (m > float("-inf")) & (m < float("inf"))
    greedy = valid & (T == 0)
    sampled = valid & (T > 0)
    m_bits = m.to(tl.int32, bitcast=True)
    key_top = (m_bits ^ ((m_bits >> 31) & KEY_MAX)) + 1     # one past the largest key: F there is 0

    # top-k: the k-th largest logit (ties kept). Off (empty bracket) when k == 0 or k >= vocab.
    do_k = sampled & (top_k > 0) & (top_k < V)
    t, mass = _search(row_ptr, V, kmin, tl.where(do_k, key_top, kmin), z, top_k.to(tl.float32), m, scale,
                      False, BLOCK_S, LOG2_NPIV, MAX_PASSES)
    # top-p over the top-k survivors (all of them have key >= t, so the mass above any v >= t is unrestricted).
    do_p = sampled & (top_p < 1.0)
    t, mass = _search(row_ptr, V, t, tl.where(do_p, key_top, t), mass, top_p * mass, m, scale,
                      True, BLOCK_S, LOG2_NPIV, MAX_PASSES)
    # min-p: q >= min_p, an elementwise test; its kept mass needs one more pass.
    # When min-p is off the loads are masked off (no memory traffic); the loop itself keeps the uniform bound V
    # because it holds a reduction (see _search).
    offs0 = tl.arange(0, BLOCK)
    do_min_p = sampled & (min_p > 0.0)
    kept_mass = tl.zeros_like(mass)
    for start in range(0, V, BLOCK):
        offs = start + offs0
        l = tl.load(row_ptr + offs, mask=offs < tl.where(do_min_p, V, 0), other=float("-inf")).to(tl.float32) + 0.0
        bits = l.to(tl.int32, bitcast=True)
        q = tl.exp2((l - m) * scale)
        kept_mass += tl.sum(tl.where((bits ^ ((bits >> 31) & KEY_MAX) >= t) & (q >= min_p), q, 0.0), 0)
    mass = tl.where(do_min_p, kept_mass, mass)
    return sampled, greedy, arg, m, scale, t, mass


@triton.jit
def _sampling_sample_kernel(logits_ptr, stride_row, V, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, out_ptr,
                            BLOCK: tl.constexpr, BLOCK_S: tl.constexpr, LOG2_NPIV: tl.constexpr,
                            MAX_PASSES: tl.constexpr):
    """One token per row: out[row] = int64 token, -1 for an invalid row."""
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    T = tl.load(temp_ptr + row)
    sampled, greedy, arg, m, scale, t, mass = _row_threshold(
        row_ptr, V, T, tl.load(top_k_ptr + row), tl.load(top_p_ptr + row), tl.load(min_p_ptr + row),
        BLOCK, BLOCK_S, LOG2_NPIV, MAX_PASSES)
    min_p = tl.load(min_p_ptr + row)

    # Inverse CDF: the first kept token whose running mass exceeds u * mass. A token of zero mass can never be
    # that token. If rounding leaves u * mass above the last running sum, the last kept token is taken.
    u = tl.max(tl.rand(tl.load(seed_ptr + row), tl.zeros([1], tl.int32)), 0)
    goal = u * mass
    offs0 = tl.arange(0, BLOCK)
    token = tl.zeros_like(arg) + KEY_MAX     # "not found yet"
    last = tl.zeros_like(arg) - 1
    running = tl.zeros_like(u)
    for start in range(0, V, BLOCK):   # uniform bound (a scan inside); no loads for greedy and invalid rows
        offs = start + offs0
        l = tl.load(row_ptr + offs, mask=offs < tl.where(sampled, V, 0), other=float("-inf")).to(tl.float32) + 0.0
        bits = l.to(tl.int32, bitcast=True)
        q = tl.exp2((l - m) * scale)
        q = tl.where((bits ^ ((bits >> 31) & KEY_MAX) >= t) & (q >= min_p), q, 0.0)   # kept tokens only
        hit = ((running + tl.cumsum(q, 0)) > goal) & (q > 0.0)
        token = tl.minimum(token, tl.min(tl.where(hit, offs, KEY_MAX), 0))
        last = tl.maximum(last, tl.max(tl.where(q > 0.0, offs, -1), 0))
        running += tl.sum(q, 0)
    token = tl.where(token == KEY_MAX, last, token)
    token = tl.where(greedy, arg, tl.where(sampled, token, -1))
    tl.store(out_ptr + row, token.to(tl.int64))


@triton.jit
def _sampling_probs_kernel(logits_ptr, stride_row, V, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, out_ptr,
                           stride_out,
                           BLOCK: tl.constexpr, BLOCK_S: tl.constexpr, LOG2_NPIV: tl.constexpr,
                           MAX_PASSES: tl.constexpr):
    """The distribution `_sampling_sample_kernel` draws from, as fp32 (batch, vocab): the same threshold, then a
    normalize-and-write pass. Greedy rows are one-hot at the argmax; invalid rows are zeros."""
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    out_row = out_ptr + row.to(tl.int64) * stride_out
    T = tl.load(temp_ptr + row)
    sampled, greedy, arg, m, scale, t, mass = _row_threshold(
        row_ptr, V, T, tl.load(top_k_ptr + row), tl.load(top_p_ptr + row), tl.load(min_p_ptr + row),
        BLOCK, BLOCK_S, LOG2_NPIV, MAX_PASSES)
    min_p = tl.load(min_p_ptr + row)
    inv = 1.0 / mass                      # mass >= 1: the top token (q = 1) is always kept
    offs0 = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        offs = start + offs0
        l = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32) + 0.0
        bits = l.to(tl.int32, bitcast=True)
        q = tl.exp2((l - m) * scale)
        p = tl.where((bits ^ ((bits >> 31) & KEY_MAX) >= t) & (q >= min_p), q * inv, 0.0)
        p = tl.where(sampled, p, tl.where(greedy & (offs == arg), 1.0, 0.0))
        tl.store(out_row + offs, p, mask=offs < V)
