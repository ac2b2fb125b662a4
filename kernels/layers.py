"""Triton device code for the per-token layers around attention: RMSNorm (optionally fused with the residual add)
and rotary position embedding (RoPE, the rotate-half convention of Hugging Face Llama/Mistral/Qwen2/Gemma).

Host logic (checks, dispatch, configs) lives in llmkern/layers.py.
"""
import triton
import triton.language as tl

from .rounding import round_to


@triton.jit
def _load_sum(x_row, r_row, ro_row, c, mask, HAS_RESIDUAL: tl.constexpr, DT: tl.constexpr,
              INTERPRET: tl.constexpr):
    """Columns c of r = x (+ residual) as fp32. With a residual the sum is rounded to the input dtype DT and stored
    as the new residual, and the norm is taken of that rounded value (what the unfused model computes)."""
    v = tl.load(x_row + c, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(r_row + c, mask=mask, other=0.0).to(tl.float32)
        v = round_to(v.to(tl.float32) + res, DT, INTERPRET)
        tl.store(ro_row + c, v, mask=mask)
    return v.to(tl.float32)


@triton.jit
def _store_normed(y_row, W, c, mask, v, rstd, offset, CAST_BEFORE_WEIGHT: tl.constexpr, DT: tl.constexpr,
                  INTERPRET: tl.constexpr):
    """y[c] = v * rstd * (offset + w[c]) in DT; Llama rounds v * rstd to DT before the weight (CAST_BEFORE_WEIGHT)."""
    w = tl.load(W + c, mask=mask, other=0.0).to(tl.float32) + offset
    n = v * rstd
    if CAST_BEFORE_WEIGHT:
        n = round_to(n, DT, INTERPRET).to(tl.float32)
    tl.store(y_row + c, round_to(n * w, DT, INTERPRET), mask=mask)


@triton.jit
def _rmsnorm_kernel(
    X, R, W, Y, R_OUT,                   # R / R_OUT (residual in, new residual out) only read when HAS_RESIDUAL
    stride_x, stride_r, stride_y, stride_ro,  # row strides; the hidden dim is contiguous (host guarantees it)
    N, eps, offset,
    HAS_RESIDUAL: tl.constexpr,
    CAST_BEFORE_WEIGHT: tl.constexpr,    # Llama: round x*rstd to the input dtype, then multiply by the weight
    BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,             # running under TRITON_INTERPRET (see round_to)
):
    """One program per row. y = norm(r) * (offset + w), r = x (+ residual); math in fp32.

    HAS_RESIDUAL: r = x + residual is rounded to the input dtype (what `residual + hidden` gives in PyTorch),
    stored to R_OUT, and the norm is taken of that rounded value, so the pair matches the unfused model exactly.
    """
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    r_row = R + row * stride_r
    y_row = Y + row * stride_y
    ro_row = R_OUT + row * stride_ro
    cols = tl.arange(0, BLOCK)
    DT: tl.constexpr = Y.dtype.element_ty  # x, residual and y share it (the host checks)

    if N <= BLOCK:
        # The whole row fits in one tile: one read of x (and the residual), kept in registers for both passes.
        mask = cols < N
        v = _load_sum(x_row, r_row, ro_row, cols, mask, HAS_RESIDUAL, DT, INTERPRET)
        rstd = 1.0 / tl.sqrt(tl.sum(v * v, axis=0) / N + eps)
        _store_normed(y_row, W, cols, mask, v, rstd, offset, CAST_BEFORE_WEIGHT, DT, INTERPRET)
    else:
        # Wide rows: a first pass accumulates the sum of squares (and writes the new residual), a second pass
        # re-reads the row (from L2, just touched) and writes y. Register use stays bounded by BLOCK.
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            c = start + cols
            v = _load_sum(x_row, r_row, ro_row, c, c < N, HAS_RESIDUAL, DT, INTERPRET)
            acc += v * v
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
        for start in range(0, N, BLOCK):
            c = start + cols
            mask = c < N
            if HAS_RESIDUAL:
                v = tl.load(ro_row + c, mask=mask, other=0.0).to(tl.float32)
            else:
                v = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
            _store_normed(y_row, W, c, mask, v, rstd, offset, CAST_BEFORE_WEIGHT, DT, INTERPRET)


@triton.jit
def _rope_rotate_heads(
    IN, OUT, stride_ih, stride_oh, num_heads, c, s, half_cols, half_mask,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Rotate every head of one token (IN/OUT already point at the token): for the two halves x1, x2 of a head,
    out1 = x1 cos - x2 sin, out2 = x2 cos + x1 sin (rotate-half / GPT-NeoX convention). Heads in chunks of BLOCK_H."""
    for h0 in range(0, num_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        mask = (heads[:, None] < num_heads) & half_mask[None, :]
        in_ptr = IN + heads[:, None] * stride_ih + half_cols[None, :]
        out_ptr = OUT + heads[:, None] * stride_oh + half_cols[None, :]
        x1 = tl.load(in_ptr, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(in_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
        y1 = x1 * c[None, :] - x2 * s[None, :]
        y2 = x2 * c[None, :] + x1 * s[None, :]
        tl.store(out_ptr, round_to(y1, OUT.dtype.element_ty, INTERPRET), mask=mask)
        tl.store(out_ptr + HALF, round_to(y2, OUT.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _rope_kernel(
    Q, K, Q_OUT, K_OUT, POS, COS, SIN,
    seqlen,                               # tokens are numbered t = b * seqlen + s
    stride_qb, stride_qs, stride_qh,      # q/k in and out: (batch, seq, heads, head_dim), head_dim contiguous
    stride_kb, stride_ks, stride_kh,
    stride_qob, stride_qos, stride_qoh,
    stride_kob, stride_kos, stride_koh,
    stride_pb, stride_ps,                 # positions (batch, seq); a 0 stride broadcasts
    stride_cb, stride_cs,                 # cos (batch, seq, >= head_dim/2); a 0 stride broadcasts
    stride_sb, stride_ss,                 # sin, likewise
    num_heads, num_kv_heads, log2_theta,
    HALF: tl.constexpr,                   # head_dim // 2 (the true size: loads/stores are masked to it)
    HALF_P2: tl.constexpr,                # HALF rounded up to a power of two (tile width)
    USE_TABLE: tl.constexpr,              # True: read cos/sin from COS/SIN; False: compute them from POS and theta
    BLOCK_H: tl.constexpr,
    INTERPRET: tl.constexpr,              # running under TRITON_INTERPRET (see round_to)
):
    """One program per token: q's and k's heads rotated by the same angles, in one launch.

    The angle of frequency i at position p is p * theta^(-2i/head_dim) (RoFormer; Hugging Face's default
    inv_freq). Out of place or in place: the host passes Q_OUT == Q (with equal strides) for in place; each element
    is read before it is written by the same program, and no other program touches it.
    """
    t = tl.program_id(0)
    b = (t // seqlen).to(tl.int64)
    s_idx = (t % seqlen).to(tl.int64)
    half_cols = tl.arange(0, HALF_P2)
    half_mask = half_cols < HALF

    if USE_TABLE:
        # Hugging Face tables are (batch, seq, head_dim) = cat(freqs, freqs) (times an attention scale for some
        # rope types): the first half holds every distinct value.
        c = tl.load(COS + b * stride_cb + s_idx * stride_cs + half_cols, mask=half_mask, other=0.0).to(tl.float32)
        s = tl.load(SIN + b * stride_sb + s_idx * stride_ss + half_cols, mask=half_mask, other=0.0).to(tl.float32)
    else:
        pos = tl.load(POS + b * stride_pb + s_idx * stride_ps).to(tl.float32)
        # inv_freq_i = theta^(-2i/d) = exp2(-(2i/d) * log2(theta)), in fp32 as Hugging Face computes it.
        inv_freq = tl.exp2(-(half_cols.to(tl.float32) * 2.0 / (2 * HALF)) * log2_theta)
        angle = pos * inv_freq
        c = tl.cos(angle)
        s = tl.sin(angle)

    _rope_rotate_heads(Q + b * stride_qb + s_idx * stride_qs, Q_OUT + b * stride_qob + s_idx * stride_qos,
                       stride_qh, stride_qoh, num_heads, c, s, half_cols, half_mask,
                       HALF, BLOCK_H, INTERPRET)
    _rope_rotate_heads(K + b * stride_kb + s_idx * stride_ks, K_OUT + b * stride_kob + s_idx * stride_kos,
                       stride_kh, stride_koh, num_kv_heads, c, s, half_cols, half_mask,
                       HALF, BLOCK_H, INTERPRET)
