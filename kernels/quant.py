"""Weight-only quantized matmul: out = x @ dequant(W).T (+ bias), W stored as int4/int8 codes.

Device code only. The packed layout (llmkern.quant documents it in full):
  qweight int32 (K // PACK, N), PACK = 32 // bits codes per word along K: code (k, n) is bits [(k % PACK) * bits, +bits)
          of word (k // PACK, n). A K-tile of BLOCK_K rows touches BLOCK_K // PACK consecutive word rows, and the
          words of one row are contiguous along N, so the loads coalesce along N.
  scales  (G, N) fp16/bf16 and zeros (G, N) int16, one per (group, output column); groups are contiguous runs of
          `group_size` rows of K (act-order checkpoints are sorted at conversion; `perm` then gathers x's columns).
  perm    int32 (K,), only with HAS_PERM: row j of the packed weight multiplies x[:, perm[j]].

Three kernels: quant_gemv_kernel (M = 1), quant_decode_kernel (M = 2..16) and quant_gemm_kernel (M > 16), plus
quant_split_reduce_kernel, which sums the decode kernels' split-K partial tiles in split order (deterministic: no
atomics) and writes the output.

Every K-tile lies inside one group (at most 32 rows of K, the smallest group size), so a tile needs one scale and one
zero point per column. That lets the kernels multiply the integer codes (q - z), exact in fp16 and bf16 (|q - z| <=
256), or exact fp32 products, and apply the scale to the fp32 tile product: the only roundings are fp32 accumulation
and the final cast to the output dtype.

`bits` and `pack_shift` (log2 PACK) are runtime arguments: they enter only per-row index arithmetic on a K vector (or a
per-slot shift), never a tile shape, so one compiled kernel serves int4 and int8.
"""
import triton
import triton.language as tl

from .rounding import round_to


@triton.jit
def _codes(w_ptr, offs_k, offs_n, k_mask, n_mask, N, bits, pack_shift):
    """(BLOCK_K, BLOCK_N) int32 codes of rows offs_k, columns offs_n, unpacked from the K-packed words."""
    row = offs_k >> pack_shift                                   # the word holding code k
    shift = (offs_k & ((1 << pack_shift) - 1)) * bits            # its bit offset inside the word
    # Words of one row are contiguous along N. Rows of the same word are re-read by the PACK rows sharing it: those
    # repeats hit L1, so each word still crosses HBM once. (Word count < 2**31 for any real layer: i32 offsets.)
    words = tl.load(w_ptr + row[:, None] * N + offs_n[None, :], mask=k_mask[:, None] & n_mask[None, :], other=0)
    return (words >> shift[:, None]) & ((1 << bits) - 1)


@triton.jit
def _centered_tile(w_ptr, s_ptr, z_ptr, g, offs_k, offs_n, k_mask, n_mask, N, bits, pack_shift):
    """A K-tile of group g: the integer codes minus their zero points, (BLOCK_K, BLOCK_N) int32, and the group's
    fp32 scales (BLOCK_N,). The weight is their product; the kernels apply the scale after the exact integer dot."""
    s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.int32)
    return _codes(w_ptr, offs_k, offs_n, k_mask, n_mask, N, bits, pack_shift) - z[None, :], s


@triton.jit
def _x_cols(perm_ptr, offs_k, k_mask, K, HAS_PERM: tl.constexpr):
    """The columns of x that packed rows offs_k multiply: offs_k itself, or perm[offs_k] for act-order. A perm entry
    outside [0, K) (only a corrupted buffer could hold one) is clamped, so x is never read out of bounds."""
    if HAS_PERM:
        cols = tl.load(perm_ptr + offs_k, mask=k_mask, other=0)
        return tl.minimum(tl.maximum(cols, 0), K - 1)
    else:
        return offs_k


@triton.jit
def _finish(acc, offs_m, m_mask, offs_n, n_mask, b_ptr, out_ptr, ws_ptr, M, N, stride_om,
            HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, INTERPRET: tl.constexpr):
    """Decode epilogue for an fp32 (BLOCK_M, BLOCK_N) tile. SPLIT: this program summed one of several K-ranges; its
    partial tile goes to its own (M, N) slice of the fp32 workspace, slice pid_k (quant_split_reduce_kernel adds them
    up). Otherwise add the bias and round to the output dtype to nearest even (round_to), as the reduce kernel does."""
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT:
        part = ws_ptr + tl.program_id(1) * M * N
        tl.store(part + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
                 round_to(acc, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def quant_split_reduce_kernel(ws_ptr, b_ptr, out_ptr, M, N, stride_om, num_splits,
                              HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr):
    """out[m, n] = sum over the splits s, in order, of ws[s, m, n] (+ bias[n]), rounded to out's dtype. Program
    (m, pid_n) owns BLOCK_N columns of row m. The workspace is (num_splits, M, N) fp32, every element written by the
    decode kernel before this launch."""
    m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for s in range(num_splits):
        acc += tl.load(ws_ptr + (s * M + m) * N + offs_n, mask=n_mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + offs_n, round_to(acc, out_ptr.dtype.element_ty, INTERPRET), mask=n_mask)


@triton.jit
def _grouped_order(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Program pid's (row block, column block) in grouped launch order (Triton's matmul tutorial): GROUP_M row
    blocks walk the same column blocks together, so a column block's weights are still in L2 when the next row
    block needs them."""
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    rows_here = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % rows_here, (pid % per_group) // rows_here


# int4 packs 8 codes per word (int8 4): the GEMV unrolls over the 8 slots and gives int8's slots 4..7 an x of zero.
MAX_PACK = tl.constexpr(8)


@triton.jit
def quant_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, perm_ptr, b_ptr, out_ptr, ws_ptr,
    N, KW, stride_xk, group_size, bits, pack_shift, tiles_per_split,
    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, INTERPRET: tl.constexpr,
):
    """M = 1. Program (pid_n, pid_k) owns BLOCK_N output columns and one range of the KW = K / PACK word rows, so every
    packed word is loaded exactly once, by one thread: a (BLOCK_W, BLOCK_N) tile of words is unpacked slot by slot in
    registers (slot j of word row w is K row w * PACK + j) against the matching x values (a tiny, cached gather).

    BLOCK_W * MAX_PACK = 32 rows of K at most, so a tile lies in one group: the codes minus the zero point (integer,
    exact) are multiplied into an fp32 tile product, and the group's scale is applied once per tile. The fp32
    (BLOCK_W, BLOCK_N) accumulator is reduced over its rows once, after the loop.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w_begin = pid_k * tiles_per_split * BLOCK_W
    w_end = tl.minimum(KW, w_begin + tiles_per_split * BLOCK_W)
    slot_mask = (1 << pack_shift) - 1
    code_mask = (1 << bits) - 1

    acc = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.float32)
    for w0 in range(w_begin, w_end, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        w_mask = offs_w < w_end
        words = tl.load(w_ptr + offs_w[:, None] * N + offs_n[None, :], mask=w_mask[:, None] & n_mask[None, :],
                        other=0)
        g = (w0 << pack_shift) // group_size
        s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.int32)
        part = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(MAX_PACK):
            slot = j & slot_mask                                  # int8: slots 4..7 repeat 0..3 with x = 0
            # a vector mask: the interpreter rejects a scalar bool broadcast into a load mask
            in_word = w_mask & (tl.full((BLOCK_W,), j, tl.int32) <= slot_mask)
            ks = (offs_w << pack_shift) + slot
            cols = _x_cols(perm_ptr, ks, in_word, KW << pack_shift, HAS_PERM)
            xv = tl.load(x_ptr + cols * stride_xk, mask=in_word, other=0.0).to(tl.float32)
            q = ((words >> (slot * bits)) & code_mask) - z[None, :]
            part += xv[:, None] * q.to(tl.float32)
        acc += part * s[None, :]

    out = tl.sum(acc, axis=0)[None, :]
    offs_m = tl.arange(0, 1)
    _finish(out, offs_m, offs_m < 1, offs_n, n_mask, b_ptr, out_ptr, ws_ptr, 1, N, 0, HAS_BIAS, SPLIT, INTERPRET)


@triton.jit
def quant_decode_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, perm_ptr, b_ptr, out_ptr, ws_ptr,
    M, N, K, stride_xm, stride_xk, stride_om, group_size, bits, pack_shift, tiles_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, DOT_FP32: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """2 <= M <= 16. Program (pid_n, pid_k) owns BLOCK_N output columns for ALL rows and one K-range, so every packed
    word is read by exactly one program (split-K keeps the machine busy when N alone gives too few programs). The rows
    are padded to the MMA's minimum M of 16 and each K-tile of codes goes through tl.dot.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    k_begin = pid_k * tiles_per_split * BLOCK_K
    k_end = tl.minimum(K, k_begin + tiles_per_split * BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        g = k0 // group_size                                     # the tile's single group (BLOCK_K divides it)
        q, s = _centered_tile(w_ptr, s_ptr, z_ptr, g, offs_k, offs_n, k_mask, n_mask, N, bits, pack_shift)
        cols = _x_cols(perm_ptr, offs_k, k_mask, K, HAS_PERM)
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :] * stride_xk,
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if DOT_FP32:   # fp32 x, or the interpreter (its bf16 dot is unreliable): an IEEE fp32 dot, no TF32
            part = tl.dot(xt.to(tl.float32), q.to(tl.float32), input_precision="ieee")
        else:
            part = tl.dot(xt, q.to(xt.dtype))
        acc += part * s[None, :]
    _finish(acc, offs_m, m_mask, offs_n, n_mask, b_ptr, out_ptr, ws_ptr, M, N, stride_om, HAS_BIAS, SPLIT, INTERPRET)


@triton.jit
def quant_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, perm_ptr, b_ptr, out_ptr,
    M, N, K, stride_xm, stride_xk, stride_om, group_size, bits, pack_shift,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Large M: a tiled GEMM. Each K-tile of codes is unpacked on chip, its zero point subtracted, and fed to tl.dot
    (tensor cores); the group's scale multiplies the fp32 tile product. One dequantized tile serves BLOCK_M rows."""
    pid_m, pid_n = _grouped_order(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # Row offsets in int64: a prefill of 32k tokens into the 128256-wide lm_head already has M * N > 2**31.
    rows64 = offs_m.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        g = k0 // group_size
        q, s = _centered_tile(w_ptr, s_ptr, z_ptr, g, offs_k, offs_n, k_mask, n_mask, N, bits, pack_shift)
        cols = _x_cols(perm_ptr, offs_k, k_mask, K, HAS_PERM)
        xt = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :] * stride_xk,
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if INTERPRET:
            part = tl.dot(xt.to(tl.float32), q.to(tl.float32), input_precision="ieee")
        else:
            part = tl.dot(xt, q.to(xt.dtype))
        acc += part * s[None, :]

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows64[:, None] * stride_om + offs_n[None, :],
             round_to(acc, out_ptr.dtype.element_ty, INTERPRET), mask=m_mask[:, None] & n_mask[None, :])
