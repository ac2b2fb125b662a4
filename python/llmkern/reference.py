"""Plain PyTorch of every llmkern op: the ground truth the kernels are tested against.

Written for clarity, not speed. By default the math runs in float32 (float64 if the inputs are float64); pass
`compute_dtype` to run it in another dtype, which the tests use to measure how much error PyTorch itself makes in
the input dtype (FlashAttention's tolerance rule).
"""
from __future__ import annotations

import math

import torch


def _compute_dtype(t: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.dtype:
    if compute_dtype is not None:
        return compute_dtype
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------------ attention
def attention_mask(seqlen_q: int, seqlen_k: int, *, causal: bool = False, window: tuple[int, int] = (-1, -1),
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Bool (seqlen_q, seqlen_k): True where query i may see key j.

    Query i sits at position p = i + seqlen_k - seqlen_q (bottom-right alignment, FlashAttention >= 2.1) and sees
    keys p - left <= j <= p + right; -1 means unbounded; causal sets right = 0.
    """
    left, right = window
    if causal:
        right = 0
    p = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    j = torch.arange(seqlen_k, device=device)[None, :]
    mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        mask &= j >= p - left
    if right >= 0:
        mask &= j <= p + right
    return mask


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's head slopes (Press et al. 2022, arXiv 2108.12409, section 3), float32 (num_heads,).

    For n a power of two: the geometric sequence 2^(-8/n), 2^(-16/n), ..., 2^(-8). Otherwise (footnote of section 3,
    as BLOOM builds them): the n2 = 2^floor(log2 n) slopes of n2 heads, then the odd-indexed slopes of 2 * n2 heads,
    2^(-4/n2), 2^(-12/n2), ..., for the n - n2 heads left. Computed in float64, rounded once.
    """
    n2 = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = [2.0 ** (-8.0 * i / n2) for i in range(1, n2 + 1)]
    slopes += [2.0 ** (-4.0 * i / n2) for i in range(1, 2 * (num_heads - n2), 2)]
    return torch.tensor(slopes, dtype=torch.float64).to(torch.float32)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, scale: float | None = None,
              window: tuple[int, int] = (-1, -1), softcap: float | None = None,
              alibi_slopes: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
              return_lse: bool = False, compute_dtype: torch.dtype | None = None):
    """q (batch, seqlen_q, num_heads, head_dim); k, v (batch, seqlen_k, num_kv_heads, head_dim).

    Scores s = q.k * scale, then softcap * tanh(s / softcap), then ALiBi's bias -slope_h * |p - j| (query at
    position p, key j; alibi_slopes (num_heads,)), then the mask. sinks (num_heads,): one more logit per head in the
    softmax denominator, whose value is 0 (gpt-oss; softmax over [scores, sink], the sink's column dropped).
    Returns o in q's dtype, and with return_lse the float32 (batch, num_heads, seqlen_q) natural-log softmax
    denominator (the sink included). A query that sees no key gets o = 0, and lse = -inf (= the sink with sinks).
    """
    batch, seqlen_q, num_heads, head_dim = q.shape
    seqlen_k, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    cd = _compute_dtype(q, compute_dtype)

    qh = q.to(cd).transpose(1, 2)                                   # (b, h, sq, d)
    kh = k.to(cd).transpose(1, 2).repeat_interleave(group, dim=1)   # (b, h, sk, d): fine here, never in a kernel
    vh = v.to(cd).transpose(1, 2).repeat_interleave(group, dim=1)
    s = (qh @ kh.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        pos = torch.arange(seqlen_q, device=q.device)[:, None] + (seqlen_k - seqlen_q)   # bottom-right, as the mask
        distance = (pos - torch.arange(seqlen_k, device=q.device)[None, :]).abs().to(cd)
        s = s - alibi_slopes.to(cd)[:, None, None] * distance
    mask = attention_mask(seqlen_q, seqlen_k, causal=causal, window=window, device=q.device)
    s = s.masked_fill(~mask, float("-inf"))
    if sinks is not None:   # the sink joins the denominator only
        sink = sinks.to(cd)[None, :, None, None].expand(batch, num_heads, seqlen_q, 1)
        lse = torch.logsumexp(torch.cat([s, sink], dim=-1), dim=-1)
    else:
        lse = torch.logsumexp(s, dim=-1)                             # -inf for a row with no visible key
    p = torch.exp(s - lse[..., None])
    # a row with no visible key (lse = -inf) gives exp(-inf - -inf) = nan: its output is 0. NaN from the data (a NaN
    # score, or scores beyond float32 range) stays NaN, as in PyTorch's softmax.
    p = p.masked_fill(lse[..., None] == float("-inf"), 0.0)
    o = (p @ vh).transpose(1, 2).to(q.dtype)
    if return_lse:
        return o, lse.to(torch.float32)
    return o


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, *,
                     causal: bool = False, scale: float | None = None, window: tuple[int, int] = (-1, -1),
                     softcap: float | None = None, alibi_slopes: torch.Tensor | None = None,
                     sinks: torch.Tensor | None = None, return_lse: bool = False,
                     compute_dtype: torch.dtype | None = None):
    """Packed sequences: q (total_q, num_heads, head_dim), k, v (total_k, num_kv_heads, head_dim).

    Sequence b owns rows cu_seqlens[b]:cu_seqlens[b+1]. Returns o (total_q, ...) and lse (num_heads, total_q)."""
    outs, lses = [], []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        o, lse = attention(q[None, cq[b]:cq[b + 1]], k[None, ck[b]:ck[b + 1]], v[None, ck[b]:ck[b + 1]],
                           causal=causal, scale=scale, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
                           sinks=sinks, return_lse=True, compute_dtype=compute_dtype)
        outs.append(o[0])
        lses.append(lse[0])
    o = torch.cat(outs, dim=0) if outs else q.new_zeros(q.shape)
    lse = torch.cat(lses, dim=-1) if lses else torch.zeros(q.shape[1], 0, dtype=torch.float32, device=q.device)
    return (o, lse) if return_lse else o


# ---------------------------------------------------------------------------------------- layers: RMSNorm, RoPE
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, offset: float = 0.0,
             casting: str = "llama", compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * (offset + weight), over the last dim; output in x's dtype.

    casting="llama" (Hugging Face LlamaRMSNorm): the normalized x is rounded to x's dtype before the weight multiply.
    casting="gemma" (Gemma2RMSNorm): everything in the compute dtype, rounded once at the end.
    With compute_dtype=float64 (the tests' ground truth) no intermediate rounding happens in either mode.
    """
    cd = _compute_dtype(x, compute_dtype)
    xf = x.to(cd)
    n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if casting == "llama" and cd != torch.float64:
        n = n.to(x.dtype).to(cd)
    return (n * (offset + weight.to(cd))).to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
                 offset: float = 0.0, casting: str = "llama",
                 compute_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """r = x + residual (rounded to x's dtype, as `residual + hidden` is in a model); returns (rms_norm(r), r)."""
    r = (x.to(torch.float64) + residual.to(torch.float64)).to(x.dtype)
    return rms_norm(r, weight, eps, offset=offset, casting=casting, compute_dtype=compute_dtype), r


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float = 10000.0,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (*positions.shape, head_dim) in Hugging Face's cat(freqs, freqs) layout.

    angle_i = position * theta^(-2i/head_dim) (RoFormer, eq. 15), computed in `dtype`.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=dtype) / head_dim))
    freqs = positions.to(dtype)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor | None = None, *,
               cos: torch.Tensor | None = None, sin: torch.Tensor | None = None, theta: float = 10000.0,
               compute_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE (Hugging Face Llama): x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1).

    q (batch, seq, heads, d) or (tokens, heads, d), k likewise. Angles from positions ((batch, seq), (seq,) or
    (tokens,)) and theta, or from cos/sin tables ((batch or 1, seq, d or d/2) or (seq, d or d/2)).
    """
    cd = _compute_dtype(q, compute_dtype)
    d = q.shape[-1]
    if cos is None:
        cos, sin = rope_cos_sin(positions, d, theta, dtype=torch.float64 if cd == torch.float64 else torch.float32)
    cos, sin = cos.to(cd)[..., : d // 2], sin.to(cd)[..., : d // 2]
    if q.dim() == 4 and cos.dim() == 2:
        cos, sin = cos[None], sin[None]                       # (seq, d) table: one for every sequence
    if q.dim() == 3 and cos.dim() == 3:
        cos, sin = cos[0], sin[0]                             # (1, tokens, d) table for packed tokens
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)          # broadcast over heads

    def rotate(x):
        x1, x2 = x.to(cd)[..., : d // 2], x.to(cd)[..., d // 2:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


# -------------------------------------------------------------------------------------------- paged KV cache
def paged_gather(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The logically contiguous (seq_len, num_kv_heads, head_dim) of one sequence from a paged cache layer.

    cache (num_blocks, block_size, num_kv_heads, head_dim); token t lives in block block_table[t // block_size] at
    offset t % block_size."""
    block_size = cache.shape[1]
    t = torch.arange(seq_len, device=cache.device)
    blocks = block_table.to(torch.int64)[t // block_size]
    return cache[blocks, t % block_size]


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _kv_scale(scale, num_kv_heads: int, device) -> torch.Tensor:
    """A KV-cache scale (a number or a (num_kv_heads,) tensor) as a float32 (num_kv_heads,) tensor."""
    if isinstance(scale, torch.Tensor):
        return scale.to(device=device, dtype=torch.float32).expand(num_kv_heads)
    return torch.full((num_kv_heads,), float(scale), dtype=torch.float32, device=device)


def quantize_kv(x: torch.Tensor, scale, dtype: torch.dtype) -> torch.Tensor:
    """x (..., num_kv_heads, head_dim) as an fp8 cache stores it: round_to_fp8(x / scale), to nearest even, saturated
    to the format's largest finite value (as vLLM's cache write; NaN stays NaN). The division is float32."""
    s = _kv_scale(scale, x.shape[-2], x.device)
    big = torch.finfo(dtype).max
    return (x.to(torch.float32) / s[:, None]).clamp(-big, big).to(dtype)


def dequantize_kv(x: torch.Tensor, scale, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """What an fp8 cache's x (..., num_kv_heads, head_dim) holds: x * scale per KV head, in `dtype`."""
    return x.to(dtype) * _kv_scale(scale, x.shape[-2], x.device).to(dtype)[:, None]


def paged_kv_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale=None, v_scale=None) -> None:
    """In place: token i of k, v goes to slot slot_mapping[i] (block * block_size + offset); a slot outside
    [0, num_blocks * block_size), -1 (padding) included, skips its token. An fp8 cache stores quantize_kv(k, k_scale)
    and quantize_kv(v, v_scale)."""
    block_size = k_cache.shape[1]
    keep = (slot_mapping >= 0) & (slot_mapping < k_cache.shape[0] * block_size)
    slots = slot_mapping[keep].to(torch.int64)
    for x, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        x = x[keep]
        x = quantize_kv(x, scale, cache.dtype) if cache.dtype in FP8_DTYPES else x.to(cache.dtype)
        cache[slots // block_size, slots % block_size] = x


def _gather_kv(k_cache, v_cache, block_table, seq_len, k_scale, v_scale, like: torch.Tensor):
    """One sequence's K and V from the cache; an fp8 cache dequantized (in float64 for a float64 `like`, exactly; else
    float32 products rounded to `like`'s dtype, the dtype the attention below computes in)."""
    k = paged_gather(k_cache, block_table, seq_len)
    v = paged_gather(v_cache, block_table, seq_len)
    if k_cache.dtype in FP8_DTYPES:
        wide = torch.float64 if like.dtype == torch.float64 else torch.float32
        k, v = (dequantize_kv(x, s, wide).to(like.dtype) for x, s in ((k, k_scale), (v, v_scale)))
    return k, v


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, *, scale: float | None = None,
                           softcap: float | None = None, window: tuple[int, int] = (-1, -1),
                           alibi_slopes: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
                           k_scale=None, v_scale=None, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """q (batch, num_heads, head_dim): one new token per sequence, at position seq_len - 1 of its cached K/V.

    Gathers each sequence's K/V (an fp8 cache dequantized with k_scale / v_scale) and runs `attention` with one
    query row (bottom-right aligned, so the query sits at the last key). Returns (batch, num_heads, head_dim) in q's
    dtype."""
    outs = []
    for b, n in enumerate(seq_lens.tolist()):
        k, v = _gather_kv(k_cache, v_cache, block_tables[b], n, k_scale, v_scale, q)
        outs.append(attention(q[b][None, None], k[None], v[None], scale=scale, softcap=softcap, window=window,
                              alibi_slopes=alibi_slopes, sinks=sinks, compute_dtype=compute_dtype)[0, 0])
    return torch.stack(outs) if outs else q.new_empty(q.shape)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, *,
                            causal: bool = True, scale: float | None = None, softcap: float | None = None,
                            window: tuple[int, int] = (-1, -1), alibi_slopes: torch.Tensor | None = None,
                            sinks: torch.Tensor | None = None, k_scale=None, v_scale=None,
                            compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """q (total_q, num_heads, head_dim): rows cu_seqlens_q[b]:cu_seqlens_q[b+1] are the newest tokens of sequence b,
    whose full K/V (seq_lens[b] tokens, prefix included) are in the cache. Bottom-right aligned `attention`."""
    out = q.new_zeros(q.shape)
    cu = cu_seqlens_q.tolist()
    for b, n in enumerate(seq_lens.tolist()):
        if cu[b + 1] == cu[b]:
            continue
        k, v = _gather_kv(k_cache, v_cache, block_tables[b], n, k_scale, v_scale, q)
        out[cu[b]:cu[b + 1]] = attention(q[None, cu[b]:cu[b + 1]], k[None], v[None], causal=causal, scale=scale,
                                         softcap=softcap, window=window, alibi_slopes=alibi_slopes, sinks=sinks,
                                         compute_dtype=compute_dtype)[0]
    return out


# ------------------------------------------------------------------------------------- multi-head latent attention
# DeepSeek-V2 (arXiv 2405.04434), sections 2.1.2 (low-rank key-value joint compression) and 2.1.3 (decoupled
# rotary position embedding). Per token t the cache holds the compressed latent c_t^KV = W^DKV h_t (kv_lora_rank
# wide) and the decoupled RoPE key k_t^R = RoPE(W^KR h_t) (rope_dim wide), both shared by every head. Head i's key is
# [W^UK_i c_t^KV; k_t^R], its value W^UV_i c_t^KV, and with its query [q^C_{t,i}; q^R_{t,i}]
#     o_{t,i} = sum_j softmax_j((q^C_{t,i} . W^UK_i c_j^KV + q^R_{t,i} . k_j^R) / sqrt(d_h + d_h^R)) W^UV_i c_j^KV.
# Absorbed form (the paper notes that W^UK can be absorbed into W^UQ, and W^UV into W^O, at inference):
# q^C_{t,i} . W^UK_i c_j^KV = (W^UK_i^T q^C_{t,i}) . c_j^KV, so with q_nope = W^UK_i^T q^C_{t,i} (kv_lora_rank wide)
# and q_pe = q^R_{t,i},
#     s_j = scale * (q_nope . c_j^KV + q_pe . k_j^R),    o = sum_j softmax(s)_j c_j^KV,
# and W^UV_i o is head i's output. These functions compute that absorbed form; the caller supplies the scale
# (1 / sqrt(d_h + d_h^R): 1 / sqrt(128 + 64) for DeepSeek-V2/V3, times their YaRN factor with long-context RoPE).
def _mla_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, ckv: torch.Tensor, kpe: torch.Tensor, scale: float,
                   mask: torch.Tensor | None, cd: torch.dtype) -> torch.Tensor:
    """q_nope (tq, heads, rank), q_pe (tq, heads, rope_dim) against one sequence's ckv (tk, rank), kpe (tk,
    rope_dim); mask (tq, tk) True where visible, or None. Returns (tq, heads, rank) in q_nope's dtype."""
    s = scale * (torch.einsum("qhr,kr->hqk", q_nope.to(cd), ckv.to(cd))
                 + torch.einsum("qhp,kp->hqk", q_pe.to(cd), kpe.to(cd)))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("hqk,kr->qhr", p, ckv.to(cd)).to(q_nope.dtype)


def mla_kv_write(ckv: torch.Tensor, kpe: torch.Tensor, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """In place: token i's ckv (rank,) and kpe (rope_dim,) go to slot slot_mapping[i] (block * block_size +
    offset) of the (num_blocks, block_size, rank) and (num_blocks, block_size, rope_dim) caches; a slot outside
    [0, num_blocks * block_size), -1 (padding) included, skips its token."""
    block_size = ckv_cache.shape[1]
    keep = (slot_mapping >= 0) & (slot_mapping < ckv_cache.shape[0] * block_size)
    slots = slot_mapping[keep].to(torch.int64)
    ckv_cache[slots // block_size, slots % block_size] = ckv[keep].to(ckv_cache.dtype)
    kpe_cache[slots // block_size, slots % block_size] = kpe[keep].to(kpe_cache.dtype)


def mla_decode_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor,
                         block_tables: torch.Tensor, seq_lens: torch.Tensor, *, scale: float,
                         compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """q_nope (batch, heads, rank), q_pe (batch, heads, rope_dim): one new token per sequence, attending to all
    seq_lens[b] cached tokens (its own included). Returns (batch, heads, rank) in q_nope's dtype."""
    cd = _compute_dtype(q_nope, compute_dtype)
    outs = [_mla_attention(q_nope[b, None], q_pe[b, None], paged_gather(ckv_cache, block_tables[b], n),
                           paged_gather(kpe_cache, block_tables[b], n), scale, None, cd)[0]
            for b, n in enumerate(seq_lens.tolist())]
    return torch.stack(outs) if outs else q_nope.new_empty(q_nope.shape)


def mla_prefill_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor,
                          kpe_cache: torch.Tensor, block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                          seq_lens: torch.Tensor, *, scale: float, causal: bool = True,
                          compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """q_nope (total_q, heads, rank), q_pe (total_q, heads, rope_dim): rows cu_seqlens_q[b]:cu_seqlens_q[b+1] are
    the newest tokens of sequence b, whose seq_lens[b] tokens (prefix included) are in the cache; bottom-right
    aligned causal mask as `attention_mask`. Returns (total_q, heads, rank)."""
    cd = _compute_dtype(q_nope, compute_dtype)
    out = q_nope.new_zeros(q_nope.shape)
    cu = cu_seqlens_q.tolist()
    for b, n in enumerate(seq_lens.tolist()):
        if cu[b + 1] == cu[b]:
            continue
        rows = slice(cu[b], cu[b + 1])
        mask = attention_mask(cu[b + 1] - cu[b], n, causal=causal, device=q_nope.device)
        out[rows] = _mla_attention(q_nope[rows], q_pe[rows], paged_gather(ckv_cache, block_tables[b], n),
                                   paged_gather(kpe_cache, block_tables[b], n), scale, mask, cd)
    return out


# ------------------------------------------------------------------------------------------------------- sampling
# Greedy below float32's smallest normal temperature (2**-126): the kernels take temperature as float32, and there
# 1 / temperature would overflow or be flushed.
GREEDY_BELOW = 2.0 ** -126

def _per_row(value, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """A sampling parameter (Python number or (batch,) tensor) as a CPU (batch,) tensor."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", dtype)
    return torch.full((batch,), value, dtype=dtype)


def sampling_probs(logits: torch.Tensor, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                   return_kept: bool = False):
    """The distribution a sampler draws from, by sorting, in float64: (batch, vocab) float64.

    Per row, in this order: q = softmax(logits / temperature); top-k keeps the tokens whose logit is at least the
    k-th largest (ties at the boundary all kept; k = 0 or k >= vocab: off); top-p keeps, among those, a token when
    the renormalized mass of the survivors with a strictly larger logit is below top_p; min-p keeps tokens with
    q >= min_p * max q; the survivors are renormalized. temperature below GREEDY_BELOW (0 and float32's subnormals):
    one-hot at the first argmax. A row holding NaN or +inf, or all -inf, is all zeros. With return_kept, also the bool
    (batch, vocab) kept set.
    """
    batch, vocab = logits.shape
    x = logits.detach().to("cpu", torch.float64)
    temps = _per_row(temperature, batch, torch.float64)
    ks = _per_row(top_k, batch, torch.int64)
    ps = _per_row(top_p, batch, torch.float64)
    mps = _per_row(min_p, batch, torch.float64)
    probs = torch.zeros(batch, vocab, dtype=torch.float64)
    kept = torch.zeros(batch, vocab, dtype=torch.bool)
    for b in range(batch):
        row = x[b]
        if torch.isnan(row).any() or not torch.isfinite(row.max()):
            continue
        t = float(temps[b])
        if t < GREEDY_BELOW:
            i = int(torch.argmax(row))  # the first maximum
            probs[b, i] = 1.0
            kept[b, i] = True
            continue
        q = torch.softmax(row / t, dim=0)
        keep = torch.ones(vocab, dtype=torch.bool)
        k = int(ks[b])
        if 0 < k < vocab:
            keep &= row >= torch.topk(row, k).values[-1]
        p = float(ps[b])
        if p < 1.0:
            qk = torch.where(keep, q, 0.0)
            qk = qk / qk.sum()
            desc, order = torch.sort(row, descending=True)
            cum = torch.cumsum(qk[order], dim=0)
            # mass of the tokens with a strictly larger logit: the cumulative mass just before the first token
            # whose logit is not larger (searchsorted on the ascending negated logits).
            n_larger = torch.searchsorted(-desc, -row, side="left")
            above = torch.where(n_larger > 0, cum[(n_larger - 1).clamp(min=0)], 0.0)
            keep &= above < p
        keep &= q >= float(mps[b]) * q.max()
        kept[b] = keep
        qk = torch.where(keep, q, 0.0)
        probs[b] = qk / qk.sum()
    return (probs, kept) if return_kept else probs


def philox_uniform(seed: int, offset: int = 0) -> float:
    """The float32 uniform that Triton's `tl.rand(seed, offset)` returns (Philox-4x32, 10 rounds), in plain Python.

    Lets the CPU references draw the same u as the kernels for the same seed (sampling uses offset 0; speculative
    sampling uses offset i for draft token i's test and offset k for its draw).
    """
    mask32 = 0xFFFFFFFF
    s = seed & 0xFFFFFFFFFFFFFFFF
    k0, k1 = s & mask32, s >> 32
    c0, c1, c2, c3 = offset & mask32, (offset >> 32) & mask32, 0, 0   # counter = (offset low, offset high, 0, 0)
    for _ in range(10):
        prod_b, prod_a = 0xCD9E8D57 * c2, 0xD2511F53 * c0
        c0, c1, c2, c3 = ((prod_b >> 32) ^ c1 ^ k0) & mask32, prod_b & mask32, \
                         ((prod_a >> 32) ^ c3 ^ k1) & mask32, prod_a & mask32
        k0, k1 = (k0 + 0x9E3779B9) & mask32, (k1 + 0xBB67AE85) & mask32
    v = c0 - (1 << 32) if c0 >= (1 << 31) else c0       # as int32
    v = ~v if v < 0 else v
    return float(torch.tensor(float(v), dtype=torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32))


def _inverse_cdf(w: torch.Tensor, u: float) -> int:
    """The first index whose running sum of the nonnegative weights w exceeds u * sum(w) (a zero weight is never
    drawn; the last positive weight when rounding leaves none); -1 when w has no positive finite mass."""
    mass = float(w.sum())
    if not 0.0 < mass < math.inf:
        return -1
    hit = torch.nonzero((torch.cumsum(w, 0) > u * mass) & (w > 0))
    return int(hit[0]) if len(hit) else int(torch.nonzero(w > 0)[-1])


def sample(logits: torch.Tensor, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
           seed: torch.Tensor) -> torch.Tensor:
    """int64 (batch,) tokens drawn from `sampling_probs` by inverse CDF, u = philox_uniform(seed[row]).

    Each row depends only on its own logits, parameters and seed (batch-invariant). -1 for an invalid row.
    """
    probs, kept = sampling_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                 return_kept=True)
    seeds = seed.detach().to("cpu", torch.int64)
    out = torch.full((logits.shape[0],), -1, dtype=torch.int64)
    for b in range(logits.shape[0]):
        if not kept[b].any():
            continue
        out[b] = _inverse_cdf(probs[b], philox_uniform(int(seeds[b])))
    return out.to(logits.device)


# ---------------------------------------------------------------------------------------- decoding controls
def speculative_sample(draft_probs: torch.Tensor, draft_token_ids: torch.Tensor, target_probs: torch.Tensor, *,
                       seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chain speculative sampling (Leviathan et al., arXiv 2211.17192), in float64, with the kernel's uniforms.

    Per row: draft token i is accepted when philox_uniform(seed, i) * q_i(x_i) < p_i(x_i); at the first rejection j
    (or j = k when all are accepted) one token is drawn with philox_uniform(seed, k) from max(0, p_j - q_j) (q_k = 0:
    the bonus row p_k), or from p_j when that residual has no mass. Returns tokens (batch, k + 1) int64 (accepted
    draft tokens, the drawn token, then -1) and the accepted counts (batch,) int64.
    """
    batch, k, _ = draft_probs.shape
    q = draft_probs.detach().to("cpu", torch.float64)
    p = target_probs.detach().to("cpu", torch.float64)
    ids = draft_token_ids.detach().to("cpu", torch.int64)
    seeds = seed.detach().to("cpu", torch.int64)
    out = torch.full((batch, k + 1), -1, dtype=torch.int64)
    accepted = torch.zeros(batch, dtype=torch.int64)
    for b in range(batch):
        s = int(seeds[b])
        j = k
        for i in range(k):
            x = int(ids[b, i])
            if not philox_uniform(s, i) * float(q[b, i, x]) < float(p[b, i, x]):
                j = i
                break
            out[b, i] = x
        w = (p[b, j] - q[b, j]).clamp(min=0) if j < k else p[b, j].clamp(min=0)
        if not float(w.sum()) > 0:
            w = p[b, j].clamp(min=0)
        out[b, j] = _inverse_cdf(w, philox_uniform(s, k))
        accepted[b] = j
    return out.to(draft_probs.device), accepted.to(draft_probs.device)


def beam_topk(logits: torch.Tensor, beam_scores: torch.Tensor, num_beams: int, k: int, *,
              compute_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best continuations per sequence by beam_score + log_softmax(logits), as transformers' beam search
    computes them (log_softmax of the float32 logits, plus the running beam score, top-k over beams x vocab).

    logits (batch * num_beams, vocab), beam_scores (batch * num_beams,). Returns scores (batch, k) float32 and flat
    indices beam * vocab + token (batch, k) int64, best first, ties to the lower index. A row holding NaN or +inf,
    or all -inf, has no candidates; -inf scores are no candidates either; missing ones are (-inf, -1).
    """
    cd = _compute_dtype(logits, compute_dtype)
    rows, vocab = logits.shape
    x = logits.detach().to(cd)
    bad = torch.isnan(x).any(1) | (x == math.inf).any(1) | (x == -math.inf).all(1)
    scores = torch.log_softmax(x, dim=-1) + beam_scores.detach().to(cd)[:, None]
    scores = scores.masked_fill(bad[:, None] | torch.isnan(scores), -math.inf)
    vals, order = torch.sort(scores.reshape(rows // num_beams, num_beams * vocab), dim=1, descending=True,
                             stable=True)
    vals, idx = vals[:, :k], order[:, :k]
    return vals.to(torch.float32), torch.where(vals == -math.inf, -1, idx)


def apply_penalties(logits: torch.Tensor, token_ids: torch.Tensor, *, repetition_penalty=1.0, presence_penalty=0.0,
                    frequency_penalty=0.0, logit_bias: torch.Tensor | None = None,
                    compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Penalized logits, with a dense count per token (fine here, the kernel has none).

    For every token t that occurs c_t > 0 times in the row's history token_ids (batch, max_len; -1 = padding):
    x_t -> (x_t * r if x_t < 0 else x_t / r) - frequency * c_t - presence (transformers' repetition penalty, then
    OpenAI's presence/frequency); then every token gets logit_bias ((vocab,) or (batch, vocab)) added.
    """
    cd = _compute_dtype(logits, compute_dtype)
    batch, vocab = logits.shape
    x = logits.detach().to("cpu", cd)
    ids = token_ids.detach().to("cpu", torch.int64)
    counts = torch.zeros(batch, vocab + 1, dtype=cd)
    counts.scatter_add_(1, torch.where(ids >= 0, ids, vocab), (ids >= 0).to(cd))
    counts = counts[:, :vocab]
    rep, pres, freq = (_per_row(v, batch, cd)[:, None] for v in (repetition_penalty, presence_penalty,
                                                                 frequency_penalty))
    penalized = torch.where(x < 0, x * rep, x / rep) - freq * counts - pres
    x = torch.where(counts > 0, penalized, x)
    if logit_bias is not None:
        x = x + logit_bias.detach().to("cpu", cd)
    return x.to(logits.device)


# ------------------------------------------------------------------------------------------ quantized matmul
# Weight-only quantization as the formats define it: integer codes q (out_features, in_features), and per (group,
# output column) a scale s and an integer zero point z, with group(k) = k // group_size (or g_idx[k] for GPTQ's
# act-order); the weight is w[n, k] = (q[n, k] - z[group(k), n]) * s[group(k), n].
def quant_dequantize(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int, *,
                     g_idx: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q (N, K) integer codes, zeros (G, N) integers, scales (G, N) -> w (N, K) in `dtype`, computed in float64.

    (q - z) is a small integer and s a half-precision number, so the float64 product is exact."""
    n, k = q.shape
    if g_idx is None:
        gs = k if group_size == -1 else group_size
        g_idx = torch.arange(k, device=q.device) // gs
    g_idx = g_idx.long()
    z = zeros.double()[g_idx].t()          # (N, K): the zero point of every weight
    s = scales.double()[g_idx].t()
    return ((q.double() - z) * s).to(dtype)


def quant_matmul(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
                 compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x (..., K) @ w.T + bias with w (N, K) the dequantized weight: float32 math by default, output in x's dtype."""
    cd = _compute_dtype(x, compute_dtype)
    y = x.to(cd) @ w.to(cd).t()
    if bias is not None:
        y = y + bias.to(cd)
    return y.to(x.dtype)


def quantize_rtn(w: torch.Tensor, *, bits: int, group_size: int, symmetric: bool,
                 scale_dtype: torch.dtype = torch.float16):
    """Round-to-nearest quantization of w (N, K) -> (q (N, K) int32 in [0, 2**bits), zeros (G, N) int32, scales (G, N)).

    With zero points the range of each group is widened to include 0 (as GPTQ does), so the zero point is an integer
    in [0, 2**bits - 1]. Symmetric: q - 2**(bits-1) in [-(2**(bits-1) - 1), 2**(bits-1) - 1], zero point 2**(bits-1).
    The scale is rounded UP to scale_dtype before the codes are computed, so the codes span the whole range and every
    element's exact (q - z) * s is within half a step (s / 2) of the original (a 16-bit product adds its rounding).
    """
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    wg = w.double().reshape(n, k // gs, gs)                               # (N, G, gs)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        span = wg.abs().amax(dim=-1) / qmax                               # (N, G)
    else:
        qmax = 2 ** bits - 1
        lo = wg.amin(dim=-1).clamp(max=0.0)
        hi = wg.amax(dim=-1).clamp(min=0.0)
        span = (hi - lo) / qmax
    span = torch.where(span > 0, span, torch.ones_like(span))            # an all-zero group: any scale is exact
    s = span.to(scale_dtype)
    s = torch.where(s.double() < span, torch.nextafter(s, torch.full_like(s, float("inf"))), s)  # round up
    sd = s.double()[..., None]
    if symmetric:
        z = torch.full_like(span, 2 ** (bits - 1))
        q = torch.clamp(torch.round(wg / sd), -qmax, qmax) + 2 ** (bits - 1)
    else:
        z = torch.clamp(torch.round(-lo / s.double()), 0, qmax)
        q = torch.clamp(torch.round(wg / sd) + z[..., None], 0, qmax)
    return (q.reshape(n, k).to(torch.int32), z.t().contiguous().to(torch.int32), s.t().contiguous())


# -------------------------------------------------------------------------------------------- mixture of experts
def moe_topk(router_logits: torch.Tensor, top_k: int, *, renormalize: bool = True, scoring: str = "softmax",
             num_expert_group: int | None = None, topk_group: int | None = None,
             correction_bias: torch.Tensor | None = None, routed_scaling_factor: float = 1.0):
    """Router logits (T, E) -> (weights (T, top_k), ids (T, top_k) int64): llmkern.moe_topk, written with a full sort.

    Experts are ranked by their key (softmax: the logit; sigmoid: sigmoid(logit) + correction_bias), descending,
    equal keys by ascending expert index (a stable sort); NaN keys rank as -inf. With groups (DeepSeek), a group's key
    is its largest key (softmax) or the sum of its two largest (sigmoid), the topk_group best groups are kept the same
    way, and only their experts are ranked. Weights: the softmax probability or the sigmoid score of each chosen
    expert, renormalized over the chosen ones if asked (sigmoid adds 1e-20 to the sum), times routed_scaling_factor.
    float32 math (float64 for float64 logits).
    """
    cd = torch.float64 if router_logits.dtype == torch.float64 else torch.float32
    x = router_logits.to(cd)
    t, e = x.shape
    if scoring == "softmax":
        score, key = torch.softmax(x, dim=-1), x
    else:
        score = torch.sigmoid(x)
        key = score if correction_bias is None else score + correction_bias.to(cd)
    key = torch.where(torch.isnan(key), float("-inf"), key)
    allowed = torch.ones(t, e, dtype=torch.bool, device=x.device)
    if num_expert_group:
        grouped = key.reshape(t, num_expert_group, e // num_expert_group)
        if scoring == "sigmoid":
            gkey = torch.sort(grouped, dim=-1, descending=True).values[..., :2].sum(dim=-1)
        else:
            gkey = grouped.max(dim=-1).values
        best_groups = torch.sort(gkey, dim=-1, descending=True, stable=True).indices[:, :topk_group]
        keep = torch.zeros(t, num_expert_group, dtype=torch.bool, device=x.device).scatter_(1, best_groups, True)
        allowed = keep.repeat_interleave(e // num_expert_group, dim=1)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    # allowed experts first, each part still in key order (a second stable sort on the allowed flag)
    order = order.gather(1, torch.sort(allowed.gather(1, order).to(torch.int8), dim=-1, descending=True,
                                       stable=True).indices)
    ids = order[:, :top_k]
    w = score.gather(1, ids)
    if renormalize:
        w = w / (w.sum(dim=-1, keepdim=True) + (1e-20 if scoring == "sigmoid" else 0.0))
    return w * routed_scaling_factor, ids


def fused_moe(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, *, activation: str = "silu", compute_dtype: torch.dtype | None = None):
    """The MoE MLP, expert by expert: out[t] = sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(hidden_states[t]),
    expert_e(x) = w2[e] @ (silu(g) * u), [g; u] = w13[e] @ x (Mixtral/Qwen's gated layout: w13 (E, 2I, H), gate rows
    first; w2 (E, H, I)). Ids outside [0, E) contribute nothing. Math in float32 (or `compute_dtype`, rounding after
    every op as PyTorch in that dtype would); output in hidden_states' dtype."""
    if activation != "silu":
        raise ValueError(f"activation must be 'silu', got {activation!r}")
    cd = _compute_dtype(hidden_states, compute_dtype)
    x = hidden_states.to(cd)
    num_experts, inter = w13.shape[0], w13.shape[1] // 2
    out = torch.zeros_like(x)
    for e in range(num_experts):
        tok, kk = torch.nonzero(topk_ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        gu = x[tok] @ w13[e].to(cd).t()
        h = torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]
        y = (h @ w2[e].to(cd).t()) * topk_weights[tok, kk].to(cd)[:, None]
        out.index_add_(0, tok, y)
    return out.to(hidden_states.dtype)
