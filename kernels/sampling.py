"""Fused sampling: temperature, top-k, top-p and min-p over one vocabulary row, with no sort.

One program owns one row and streams it in tiles. What it computes, in terms of the row's fp32 logits l and the
row's temperature T (all math in fp32, whatever the input dtype):

    q_i = exp((l_i - max l) / T)            unnormalized probability, q = 1 for the most probable token
    kept = { i : key(l_i) >= t  and  q_i >= min_p }
    p_i  = q_i / sum_kept q                 the distribution `sampling_probs` writes and `sample` draws from

Every cut-off of top-k and top-p is "keep the tokens whose logit is at least some logit value t" (ties at a boundary
are therefore all kept or all dropped together), so the whole problem is finding t without sorting. Logits are
compared through an order-preserving int32 key (see below), which makes the search exact integer arithmetic.

How the cut-off is found: a multi-pivot search on the key ("threshold bisection with counts and masses").
  * The answer is the largest element key v with F(v) >= target, where F(v) is the count (top-k: target k) or the
    q-mass (top-p: target top_p * mass of the top-k survivors) of the elements with key >= v. F never increases
    with v, so a bracket [lo, hi) with F(lo) >= target > F(hi) always holds the answer.
  * One pass over the row evaluates F at NPIV evenly spaced pivots of [lo, hi) at once, and for each pivot the
    smallest element key at or above it and the largest element key below the next pivot. The sub-interval that
    holds the answer becomes the new bracket, shrunk to the element keys it actually contains. When it holds a
    single distinct value, that value is the exact answer. The top-k search starts from the bracket
    [key(-inf), key(max) + 1); the top-p search from [top-k threshold, key(max) + 1), with target top_p times the
    mass at the top-k threshold (every top-k survivor has key >= that threshold, so above it the mass of the
    survivors is simply the mass of the row).
  * Pass count: each pass divides the key width by NPIV = 16; a bracket starts at most 2**32 wide, so a search ends
    after at most 8 passes (16**8 = 2**32); the min/max shrinking usually ends it after 3-5 (the bracket then holds
    one distinct logit). FlashInfer's pivot-based rejection sampling often reads a row fewer times, but its number
    of rounds is random (no fixed bound) and it yields a token, not the kept set that `sampling_probs` must
    return; this search has a hard bound and yields the exact set, which both ops share.
    Cost: each element of a search pass is compared with all 16 pivots (about 8 integer/fp32 operations per
    pivot), so these passes lean on the ALUs more than on bandwidth; the tiles are re-read from L2.
Reads of one row, at most: 1 (max, argmax, normalizer) + 8 (top-k search, only when top-k is on) + 8 (top-p search,
only when top-p is on) + 1 (kept mass, only when min-p is on) + 1 (the draw, or the normalize-and-write pass).
Every read is a contiguous tile of the row (coalesced). The row stays in L2 between passes for moderate batches.

The draw is inverse-CDF: u from Philox (`tl.rand`, keyed by the row's seed, offset 0) scaled by the kept mass, then
the first kept token whose running mass exceeds it. Rows holding NaN or +inf, or with every logit -inf, are
"invalid": the sampler returns -1 and `sampling_probs` writes a row of zeros.
"""
import triton
import triton.language as tl

from .attention import LOG2E  # exp(x) == exp2(x * log2(e)), as in attention's softmax; exp2 is the hardware instruction

# int32 extremes as constexprs: a literal -2147483648 would be parsed as -(2147483648), an int64.
KEY_MIN = tl.constexpr(-(2 ** 31))
KEY_MAX = tl.constexpr(2 ** 31 - 1)
KEY_NEG_INF = tl.constexpr(-2139095041)  # key(-inf), the smallest key of a non-NaN fp32
# Temperatures below float32's smallest normal (2**-126: 0 and the subnormals) are greedy. At and above it the scale
# log2(e) / T <= 1.2e38 is finite, so (l - max) * scale never computes 0 * inf = NaN for the top token.
GREEDY_BELOW = tl.constexpr(2.0 ** -126)

# Two one-liners recur in every pass and are written out inline. (The search passes are one kernel body, not a set
# of @triton.jit helpers, because the Triton interpreter re-patches its language module on every nested jit call,
# which dominated the test time when it happened per search tile. The draw's per-tile step, `inverse_cdf_step`, is a
# helper: it is shared with llmkern.kernels.decoding and runs once per tile of one pass only, about 0.2 ms per call
# under triton 3.9's interpreter.)
#   load:  tl.load(row + offs, mask=offs < n, other=-inf).to(fp32) + 0.0      (`+ 0.0` maps -0.0 to +0.0, so a
#          zero logit has one key; n = V, or 0 to switch a pass's loads off)
#   key:   bits ^ ((bits >> 31) & KEY_MAX), bits = the fp32 bit pattern as int32: an int32 key that orders like the
#          floats (same-sign IEEE floats order like their bit patterns; negative ones backwards, so the arithmetic
#          shift selects them and the xor flips their magnitude bits). key(-inf) = -2139095041 is the smallest key
#          of a non-NaN value; KEY_MIN stands for "past the row end".


@triton.jit
def inverse_cdf_step(w, offs, running, goal, token, last):
    """One tile of an inverse-CDF draw over nonnegative weights streamed in index order (shared with
    llmkern.kernels.decoding). running: the weight of the earlier tiles; goal: u times the total weight.
    token: the first index whose running sum exceeds goal (KEY_MAX while none has); a zero weight is never drawn.
    last: the last index of positive weight, taken when rounding leaves goal at or above the final running sum.
    Returns (running, token, last) after this tile."""
    hit = ((running + tl.cumsum(w, 0)) > goal) & (w > 0.0)
    token = tl.minimum(token, tl.min(tl.where(hit, offs, KEY_MAX), 0))
    last = tl.maximum(last, tl.max(tl.where(w > 0.0, offs, -1), 0))
    return running + tl.sum(w, 0), token, last


@triton.jit
def _sampling_kernel(logits_ptr, stride_row, V, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr,
                     out_ptr, stride_out,
                     WRITE_PROBS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
                     LOG2_NPIV: tl.constexpr, MAX_PASSES: tl.constexpr):
    """One program per row. WRITE_PROBS False: out[row] = the drawn token (int64; -1 for an invalid row).
    WRITE_PROBS True: out[row, :] = the fp32 distribution drawn from (one-hot for greedy rows, zeros if invalid)."""
    NPIV: tl.constexpr = 1 << LOG2_NPIV
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    T = tl.load(temp_ptr + row)
    top_k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    min_p = tl.load(min_p_ptr + row)
    t_greedy = T < GREEDY_BELOW
    scale = LOG2E / tl.where(t_greedy, 1.0, T)   # greedy rows never use the scale
    offs0 = tl.arange(0, BLOCK)

    # ---- Pass 1: max logit, its first index, NaN count, Z = sum exp2((l - max) * scale) (online, rescaled as the
    # running max grows, as in flash attention).
    m = scale * 0.0 + float("-inf")  # scalar accumulators, built by arithmetic on scalars (scale is finite)
    arg = row * 0
    nans = row * 0
    z = scale * 0.0
    for start in range(0, V, BLOCK):
        offs = start + offs0
        l = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32) + 0.0
        nans += tl.sum((l != l).to(tl.int32), 0)
        tile_max = tl.max(l, 0)
        tile_arg = tl.min(tl.where(l == tile_max, offs, KEY_MAX), 0)
        arg = tl.where(tile_max > m, tile_arg, arg)            # strictly greater: the first maximum wins
        m_new = tl.maximum(m, tile_max)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: avoid (-inf) - (-inf)
        z = z * tl.exp2((m - m_safe) * scale) + tl.sum(tl.exp2((l - m_safe) * scale), 0)
        m = m_new
    valid = (nans == 0) & (m > float("-inf")) & (m < float("inf"))
    greedy = valid & t_greedy
    sampled = valid & (T >= GREEDY_BELOW)
    m_bits = m.to(tl.int32, bitcast=True)
    key_top = (m_bits ^ ((m_bits >> 31) & KEY_MAX)) + 1        # one past the largest key: F there is 0

    # ---- The two searches (module docstring). Search 0: top-k, F = count, target k; off (empty bracket) when
    # k == 0 or k >= vocab. Search 1: top-p over the top-k survivors, F = mass, target top_p * mass(t).
    t = m_bits * 0 + KEY_NEG_INF   # threshold key: keep key >= t (key(-inf): keep everything)
    mass = z                                   # q-mass of the tokens with key >= t
    j = tl.arange(0, NPIV)
    for which in tl.static_range(2):
        if which == 0:
            on = sampled & (top_k > 0) & (top_k < V)
            target = top_k.to(tl.float32)
        else:
            on = sampled & (top_p < 1.0)
            target = top_p * mass
        lo = t
        hi = tl.where(on, key_top, t)
        n_pass = 0
        # Bounded: each pass divides hi - lo (at most 2**32) by NPIV, so MAX_PASSES = 8 passes always finish.
        while (lo + 1 < hi) & (n_pass < MAX_PASSES):
            n_pass += 1
            width = hi.to(tl.int64) - lo.to(tl.int64)
            # floor(width * j / NPIV) as a shift: an int64 division would be a stack-using call on the GPU
            piv = (lo.to(tl.int64) + ((width * j) >> LOG2_NPIV)).to(tl.int32)          # piv[0] = lo
            upper = (lo.to(tl.int64) + ((width * (j + 1)) >> LOG2_NPIV)).to(tl.int32)  # upper[-1] = hi
            # Per-lane accumulators, reduced once after the tile loop: warp shuffles stay out of this
            # data-dependent loop (ptxas compiles shuffles it cannot prove warp-uniform as stack-using calls).
            cnt = tl.zeros([NPIV, BLOCK_S], tl.float32)     # counts in fp32: exact up to 2**24 tokens
            acc = tl.zeros([NPIV, BLOCK_S], tl.float32)
            mn = tl.full([NPIV, BLOCK_S], KEY_MAX, tl.int32)
            mx = tl.full([NPIV, BLOCK_S], KEY_MIN, tl.int32)
            for start in range(0, V, BLOCK_S):
                offs = start + tl.arange(0, BLOCK_S)
                l = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32) + 0.0
                bits = l.to(tl.int32, bitcast=True)
                key = tl.where(offs < V, bits ^ ((bits >> 31) & KEY_MAX), KEY_MIN)[None, :]
                ge = key >= piv[:, None]                                      # (NPIV, BLOCK_S)
                acc += tl.where(ge, tl.exp2((l - m) * scale)[None, :], 0.0)
                if which == 0:
                    cnt += ge.to(tl.float32)
                mn = tl.minimum(mn, tl.where(ge, key, KEY_MAX))
                mx = tl.maximum(mx, tl.where(key < upper[:, None], key, KEY_MIN))
            f_mass = tl.sum(acc, 1)
            if which == 0:
                f = tl.sum(cnt, 1)
            else:
                f = f_mass
            # F falls with j, so the pivots reaching the target are a prefix 0..js (pivot 0 = lo does by the
            # invariant; forced, against rounding). The answer lies in [piv[js], upper[js]); mn and mx grow with
            # j and the mass falls, so their values at js are the max / max / min over that prefix.
            ok = (f >= target) | (j == 0)
            lo = tl.max(tl.where(ok, tl.min(mn, 1), KEY_MIN), 0)         # smallest element key in it
            hi = tl.max(tl.where(ok, tl.max(mx, 1), KEY_MIN), 0) + 1     # one past the largest
            mass = tl.min(tl.where(ok, f_mass, float("inf")), 0)         # mass at lo
        t = lo

    # ---- min-p: q >= min_p, an elementwise test; the kept mass then needs one more pass. When min-p is off the
    # loads are masked off (no memory traffic); the loop keeps the uniform bound V because it holds a reduction.
    do_min_p = sampled & (min_p > 0.0)
    kept_mass = mass * 0.0
    for start in range(0, V, BLOCK):
        offs = start + offs0
        l = tl.load(row_ptr + offs, mask=offs < tl.where(do_min_p, V, 0), other=float("-inf")).to(tl.float32) + 0.0
        bits = l.to(tl.int32, bitcast=True)
        q = tl.exp2((l - m) * scale)
        kept_mass += tl.sum(tl.where((bits ^ ((bits >> 31) & KEY_MAX) >= t) & (q >= min_p), q, 0.0), 0)
    mass = tl.where(do_min_p, kept_mass, mass)

    if WRITE_PROBS:
        # ---- Normalize and write. mass >= 1: the top token (q = 1) is always kept.
        out_row = out_ptr + row.to(tl.int64) * stride_out
        inv = 1.0 / mass
        for start in range(0, V, BLOCK):
            offs = start + offs0
            l = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32) + 0.0
            bits = l.to(tl.int32, bitcast=True)
            q = tl.exp2((l - m) * scale)
            p = tl.where((bits ^ ((bits >> 31) & KEY_MAX) >= t) & (q >= min_p), q * inv, 0.0)
            p = tl.where(sampled, p, tl.where(greedy & (offs == arg), 1.0, 0.0))
            tl.store(out_row + offs, p, mask=offs < V)
    else:
        # ---- Inverse CDF: the first kept token whose running mass exceeds u * mass. A token of zero mass is
        # never that token. If rounding leaves u * mass at or above the last running sum, the last kept token
        # is taken. No loads for greedy and invalid rows (uniform loop bound: it holds a scan).
        u = tl.max(tl.rand(tl.load(seed_ptr + row), tl.zeros([1], tl.int32)), 0)
        goal = u * mass
        token = arg * 0 + KEY_MAX     # "not found yet"
        last = arg * 0 - 1
        running = u * 0.0
        for start in range(0, V, BLOCK):
            offs = start + offs0
            l = tl.load(row_ptr + offs, mask=offs < tl.where(sampled, V, 0), other=float("-inf")).to(tl.float32)
            l += 0.0
            bits = l.to(tl.int32, bitcast=True)
            q = tl.exp2((l - m) * scale)
            q = tl.where((bits ^ ((bits >> 31) & KEY_MAX) >= t) & (q >= min_p), q, 0.0)   # kept tokens only
            running, token, last = inverse_cdf_step(q, offs, running, goal, token, last)
        token = tl.where(token == KEY_MAX, last, token)
        token = tl.where(greedy, arg, tl.where(sampled, token, -1))
        tl.store(out_ptr + row, token.to(tl.int64))
