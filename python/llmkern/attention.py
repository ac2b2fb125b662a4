"""Fused prefill attention: the public functions, their checks, dispatch and launch.

    attention(q, k, v, *, causal=False, scale=None, window=(-1, -1), softcap=None, alibi_slopes=None, sinks=None,
              return_lse=False)
    attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, same keywords)
    alibi_slopes(num_heads) -> float32 (num_heads,)     ALiBi's standard slopes

Layouts follow FlashAttention: q (batch, seqlen_q, num_heads, head_dim), k/v (batch, seqlen_k, num_kv_heads, head_dim);
varlen packs the sequences: q (total_q, num_heads, head_dim) with int32 cu_seqlens. Both run one Triton kernel
(llmkern.kernels.attention.attention_fwd_kernel); the batched call is the varlen kernel with the sequence start taken
from the batch stride instead of cu_seqlens.
"""
import math
from typing import Optional

import torch
import triton

from llmkern import _dispatch, _utils, compile_check, reference, tuning
from llmkern.kernels.attention import attention_fwd_kernel

# ----------------------------------------------------------------------------------------------- tile configs
# head_dim is padded to BLOCK_D = next power of two (>= 32); each (BLOCK_D class, fp16/bf16 or fp32) gets a short
# config list, autotuned on GPUs. Where the numbers come from:
#   * 16-bit inputs: FlashAttention-2's forward tiles (128 query rows x 64 keys for head_dim <= 128 on A100/H100,
#     fewer key columns for 256) and Triton's fused-attention tutorial (4 warps per 64 rows, a 3-stage K/V pipeline;
#     2 stages at head_dim 256, where each K+V stage is 32-64 KB). Each candidate was compiled for sm_80 and sm_90
#     (`llmkern check-compile`) and kept only if it fits in 255 registers without spilling; e.g. 128 x 64 with 4 warps
#     at head_dim 128 spills, with 8 warps it does not.
#   * fp32 inputs: the dot runs in full fp32 on the FMA units (no tensor cores), which holds whole operand tiles in
#     registers; 32-row tiles are the largest that compiled without spills.
# Each list starts with its smallest config: it is the one the interpreter runs (_utils.launch picks configs[0]),
# so small test shapes still cross several tiles.
_CONFIGS = {
    (64, False): [  # head_dim 32..64
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),  # 4 warps: 255 registers
    ],
    (128, False): [  # head_dim 72..128
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=3),  # fewer registers (~170)
    ],
    (256, False): [  # head_dim 136..256
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=2),
    ],
    (64, True): [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2)],
    (128, True): [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=2)],
    (256, True): [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=8, num_stages=2)],
}


def _config_class(head_dim: int, dtype: torch.dtype) -> tuple[int, bool]:
    return (64 if head_dim <= 64 else (128 if head_dim <= 128 else 256)), dtype == torch.float32


# One autotuner per tuning key (llmkern.tuning): what changes the best tile, the config list's class among it, and the
# query length bucketed to the next power of two (a 100-token prompt and a 16k-token one want different tiles). A
# config shipped for the GPU in python/llmkern/configs/ replaces autotuning for its key.
_TUNED = tuning.TunedKernel(
    "attention_fwd", attention_fwd_kernel, buckets=("seqlen_q",),
    configs=lambda key: _CONFIGS[_config_class(key["head_dim"], key["dtype"])],
    spec=lambda key, cfg: _spec(key["head_dim"], cfg, key["dtype"], varlen=key["varlen"], softcap=key["softcap"],
                                lse=key["lse"], alibi=key["alibi"], sinks=key["sinks"]))


def _tuned_kernel(q: torch.Tensor, max_seqlen_q: int, varlen: bool, softcap, return_lse: bool, alibi: bool,
                  sinks: bool):
    return _TUNED.get(q.device, head_dim=q.shape[-1], dtype=q.dtype, varlen=varlen, softcap=softcap is not None,
                      lse=return_lse, alibi=alibi, sinks=sinks, seqlen_q=max_seqlen_q)


def _launch(q, k, v, o, lse, cu_q, cu_k, q_strides, k_strides, v_strides, o_strides, l_strides, seqlen_q, seqlen_k,
            batch, max_seqlen_q, causal, scale, window, softcap, return_lse, varlen, alibi_slopes, sinks):
    num_heads, head_dim = q.shape[-2], q.shape[-1]
    group = num_heads // k.shape[-2]
    longest = k.shape[-3]  # seqlen_k, or total_k for varlen: no sequence has more keys
    left, right = (_utils.unbounded_beyond(w, longest) for w in window)
    if causal:
        right = 0  # causal is the window (left, 0)
    # The kernel applies both window bounds: an unbounded side (-1) goes in as a window that covers every key, so
    # one build serves full, causal and sliding-window attention. Query i of a sequence sits at p = i + seqlen_k -
    # seqlen_q, so p - left < 0 once left >= seqlen_k, and p + right >= seqlen_k once right >= seqlen_q; k's and
    # q's row counts bound every sequence in both layouts.
    left = k.shape[-3] if left < 0 else left
    right = q.shape[-3] if right < 0 else right
    kernel = _tuned_kernel(q, max_seqlen_q, varlen, softcap, return_lse, alibi_slopes is not None, sinks is not None)
    grid = lambda meta: (batch * num_heads, triton.cdiv(max_seqlen_q, meta["BLOCK_M"]))  # noqa: E731
    _utils.launch(
        kernel, grid,
        q, k, v, o, lse, cu_q, cu_k,
        q if alibi_slopes is None else alibi_slopes, q if sinks is None else sinks,   # unread when absent
        *q_strides, *k_strides, *v_strides, *o_strides, *l_strides,
        seqlen_q, seqlen_k, num_heads, group,
        left, right, scale * math.log2(math.e), 1.0 if softcap is None else softcap,  # exp2-based softmax
        HEAD_DIM=head_dim, BLOCK_D=_utils.pow2_at_least(head_dim, 32),
        IS_VARLEN=varlen, HAS_SOFTCAP=softcap is not None, HAS_ALIBI=alibi_slopes is not None,
        HAS_SINKS=sinks is not None, RETURN_LSE=return_lse, INTERPRET=_utils.INTERPRET,
    )


# ----------------------------------------------------------------------------------------------- checks
def _check_qkv(q, k, v, ndim: int):
    for name, t in (("q", q), ("k", k), ("v", v)):
        _utils.check_tensor(name, t, ndim=ndim, dtypes=_utils.FLOAT_DTYPES)
    _utils.check_same(("q", "k", "v"), (q, k, v))
    head_dim = q.shape[-1]
    for name, t in (("k", k), ("v", v)):
        if t.shape[-1] != head_dim:
            raise ValueError(f"{name} has head_dim {t.shape[-1]} but q has {head_dim}; they must match")
    _utils.check_head_dim("q", head_dim)
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    num_heads, num_kv_heads = q.shape[-2], k.shape[-2]
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"q's num_heads ({num_heads}) must be a multiple of k/v's num_kv_heads ({num_kv_heads})")


def _check_batched(q, k, v):
    _check_qkv(q, k, v, ndim=4)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k has batch {k.shape[0]} but q has batch {q.shape[0]}; they must match")


def _check_options(q, causal, scale, window, softcap, alibi_slopes, sinks, return_lse):
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    _utils.check_head_vector("alibi_slopes", alibi_slopes, q.shape[-2], q)
    _utils.check_head_vector("sinks", sinks, q.shape[-2], q)
    scale = _utils.check_scale(scale, q.shape[-1])
    return scale, _utils.check_window(window), _utils.check_softcap(softcap, scale)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's slopes for `num_heads` heads, float32 (num_heads,) on the CPU (`.to(device)` them): the geometric
    sequence 2^(-8 i / n), i = 1..n, of Press et al. 2022 (arXiv 2108.12409, section 3) for n a power of two, and for
    other head counts the paper's recipe as BLOOM uses it (the slopes of the largest power of two below n, then every
    other slope of twice that many heads). For `alibi_slopes=` of the attention ops; raises ValueError for
    num_heads < 1 or > 65536 (MAX_ALIBI_HEADS) and TypeError for a non-int."""
    if not isinstance(num_heads, int) or isinstance(num_heads, bool):
        raise TypeError(f"num_heads must be an int, got {num_heads!r}")
    if not 1 <= num_heads <= MAX_ALIBI_HEADS:
        raise ValueError(f"num_heads must be in [1, {MAX_ALIBI_HEADS}], got {num_heads}")
    return reference.alibi_slopes(num_heads)


# alibi_slopes' bound: far above any model's head count (a few hundred at most); a count past it is a mistake, which
# would otherwise build a Python list of that many slopes (2**40: hours and terabytes) or overflow float().
MAX_ALIBI_HEADS = 2 ** 16


def _check_head_values(*args) -> None:
    """The op's value check (a host sync, only when the variant is on): the last two schema arguments are
    alibi_slopes and sinks."""
    _utils.check_head_values(*args[-2:])


@_dispatch.signature_checked
def _check_op_options(q, causal, scale, window_left, window_right, softcap, return_lse, alibi_slopes, sinks) -> None:
    """The options as the ops receive them (the public functions' checks, for a direct torch.ops.llmkern call)."""
    _check_options(q, causal, scale, (window_left, window_right), softcap, alibi_slopes, sinks, return_lse)


_check_batched_signature = _dispatch.signature_checked(_check_batched)


def _check_attention_op(q, k, v, *options) -> None:
    """llmkern::attention's check: attention()'s argument checks (once per signature, no sync), then the values."""
    _check_batched_signature(q, k, v)
    _check_op_options(q, *options)
    _check_head_values(*options)


def _check_cu_seqlens(name: str, cu: torch.Tensor, q: torch.Tensor):
    _utils.check_tensor(name, cu, ndim=1, dtypes=(torch.int32,))
    if cu.device != q.device:
        raise ValueError(f"{name} is on {cu.device} but q is on {q.device}; they must share a device")
    if cu.shape[0] < 1:
        raise ValueError(f"{name} must have length batch + 1 >= 1, got length 0")


def _check_cu_values(name: str, cu: torch.Tensor, total: int, max_seqlen: int, max_name: str):
    """Values, read on the host (a small copy): the kernel trusts them for every address it forms."""
    vals = cu.tolist()
    if vals[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {vals[0]}")
    lens = [b - a for a, b in zip(vals[:-1], vals[1:])]
    if any(n < 0 for n in lens):
        raise ValueError(f"{name} must be non-decreasing, got {vals}")
    if vals[-1] > total:
        raise ValueError(f"{name}[-1] = {vals[-1]} exceeds the {total} rows of the packed tensor")
    if lens and max(lens) > max_seqlen:
        raise ValueError(f"{max_name} = {max_seqlen} is smaller than the longest sequence in {name} ({max(lens)})")


def _check_max_seqlen(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


# ----------------------------------------------------------------------------------------------- batched op
def _attention_reference(q, k, v, causal, scale, window_left, window_right, softcap, return_lse, alibi_slopes,
                         sinks):
    o, lse = reference.attention(q, k, v, causal=causal, scale=scale, window=(window_left, window_right),
                                 softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, return_lse=True)
    # the fake's layout (the reference computes in (batch, heads, seq, d) and returns a transposed view)
    return o.contiguous(), (lse.contiguous() if return_lse else lse.new_empty(0))


@_dispatch.custom_op("attention", mutates_args=(), reference=_attention_reference, check=_check_attention_op,
                     contiguous=("alibi_slopes", "sinks"))
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, window_left: int,
                  window_right: int, softcap: Optional[float], return_lse: bool, alibi_slopes: Optional[torch.Tensor],
                  sinks: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    window = (window_left, window_right)
    batch, seqlen_q, num_heads, _ = q.shape
    seqlen_k = k.shape[1]
    q, k, v = (_utils.last_dim_contiguous(n, t) for n, t in (("q", q), ("k", k), ("v", v)))
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, num_heads, seqlen_q) if return_lse else (0,), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse.fill_(float("-inf"))
    l_strides = lse.stride() if return_lse else (0, 0, 0)
    _launch(q, k, v, o, lse, q, q,  # cu_seqlens pointers are unused when IS_VARLEN is off
            (q.stride(0), q.stride(1), q.stride(2)), (k.stride(0), k.stride(1), k.stride(2)),
            (v.stride(0), v.stride(1), v.stride(2)), (o.stride(0), o.stride(1), o.stride(2)), l_strides,
            seqlen_q, seqlen_k, batch, seqlen_q, causal, scale, window, softcap, return_lse, False, alibi_slopes,
            sinks)
    return o, lse


@_attention_op.register_fake
def _(q, k, v, causal, scale, window_left, window_right, softcap, return_lse, alibi_slopes, sinks):
    batch, seqlen_q, num_heads, _ = q.shape
    lse_shape = (batch, num_heads, seqlen_q) if return_lse else (0,)
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: Optional[float] = None, window: tuple = (-1, -1), softcap: Optional[float] = None,
              alibi_slopes: Optional[torch.Tensor] = None, sinks: Optional[torch.Tensor] = None,
              return_lse: bool = False):
    """Softmax(q k^T * scale) v per head, fused.

    q (batch, seqlen_q, num_heads, head_dim); k, v (batch, seqlen_k, num_kv_heads, head_dim), num_heads a multiple of
    num_kv_heads (GQA/MQA without repeating K/V). head_dim: a multiple of 8 in [32, 256]. fp16, bf16 or fp32.
    causal aligns bottom-right: query i sits at p = i + seqlen_k - seqlen_q and sees keys j <= p.
    window=(left, right): the query at p sees p - left <= j <= p + right (-1 unbounded; causal means right = 0; a side
    reaching past every key, 2**31 - 1 or more included, is unbounded too; below -1: ValueError).
    softcap: scores become softcap * tanh(scores / softcap). scale defaults to 1/sqrt(head_dim).
    alibi_slopes: float32 (num_heads,), ALiBi (arXiv 2108.12409) as in FlashAttention 2: -slope * |p - j| is added
    to the (capped) score of the query at position p and key j, p aligned as for causal (llmkern.alibi_slopes gives
    the paper's slopes). sinks: float32 (num_heads,), gpt-oss's attention sinks: one logit per head that joins the
    softmax denominator and contributes no value (softmax over [scores, sink], the sink's column dropped).
    Extremes (llmkern._utils): scale finite with |scale| <= 2**127 (0 or subnormal: uniform over the visible keys);
    softcap None or > 0, a cap above 2**127 (inf included) is no cap, one below max(2**-126, |scale| / 2**127) is
    refused; alibi slopes finite with |slope| <= 2**96; sinks not NaN and <= 2**127 (-inf: no sink); NaN anywhere is
    refused (checking the slopes' and sinks' values is one host sync each). Scores q.k * scale beyond float32 range
    give NaN rows, as in PyTorch.
    Returns o like q; with return_lse also the float32 (batch, num_heads, seqlen_q) natural-log softmax denominator
    (the sink included). A query that sees no key gets o = 0 and lse = -inf (with sinks: lse = its sink).
    Raises TypeError/ValueError naming the argument for a wrong type, dtype, shape (slopes or sinks not of length
    num_heads) or device, before any kernel runs.
    """
    _check_batched(q, k, v)
    scale, window, softcap = _check_options(q, causal, scale, window, softcap, alibi_slopes, sinks, return_lse)
    o, lse = _attention_op(q, k, v, causal, scale, window[0], window[1], softcap, return_lse, alibi_slopes, sinks)
    return (o, lse) if return_lse else o


# ----------------------------------------------------------------------------------------------- varlen op
def _check_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> None:
    _check_qkv(q, k, v, ndim=3)
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q)
    if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
        raise ValueError(f"cu_seqlens_q (length {cu_seqlens_q.shape[0]}) and cu_seqlens_k (length "
                         f"{cu_seqlens_k.shape[0]}) must both have length batch + 1")
    _check_max_seqlen("max_seqlen_q", max_seqlen_q)
    _check_max_seqlen("max_seqlen_k", max_seqlen_k)


_check_varlen_signature = _dispatch.signature_checked(_check_varlen_args)


def _check_varlen_values(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *options):
    """llmkern::attention_varlen's check: attention_varlen()'s argument checks (once per signature, no sync), then
    the cu_seqlens values (a host sync), before any implementation runs (llmkern._dispatch)."""
    _check_varlen_signature(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    _check_op_options(q, *options)
    _check_cu_values("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q")
    _check_cu_values("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k")
    _check_head_values(*options)


def _attention_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                                window_left, window_right, softcap, return_lse, alibi_slopes, sinks):
    total_q, num_heads, _ = q.shape
    o, lse = reference.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, scale=scale,
                                        window=(window_left, window_right), softcap=softcap,
                                        alibi_slopes=alibi_slopes, sinks=sinks, return_lse=True)
    # rows after cu_seqlens_q[-1] belong to no sequence: zeros and -inf, as from the kernel
    o_full = q.new_zeros(q.shape)
    o_full[:o.shape[0]] = o
    lse_full = torch.full((num_heads, total_q), float("-inf"), dtype=torch.float32, device=q.device)
    lse_full[:, :lse.shape[1]] = lse
    return o_full, (lse_full if return_lse else lse_full.new_empty(0))


@_dispatch.custom_op("attention_varlen", mutates_args=(), reference=_attention_varlen_reference,
                     check=_check_varlen_values, contiguous=("cu_seqlens_q", "cu_seqlens_k", "alibi_slopes", "sinks"))
def _attention_varlen_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool, scale: float,
                         window_left: int, window_right: int, softcap: Optional[float], return_lse: bool,
                         alibi_slopes: Optional[torch.Tensor],
                         sinks: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    window = (window_left, window_right)
    total_q, num_heads, _ = q.shape
    q, k, v = (_utils.last_dim_contiguous(n, t) for n, t in (("q", q), ("k", k), ("v", v)))
    batch = cu_seqlens_q.shape[0] - 1
    # rows past cu_seqlens_q[-1] (padding some callers leave) get 0 / -inf rather than whatever was in memory
    o = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full((num_heads, total_q) if return_lse else (0,), float("-inf"), dtype=torch.float32,
                     device=q.device)
    if batch == 0 or max_seqlen_q == 0 or o.numel() == 0:
        return o, lse
    l_strides = (0, lse.stride(0), lse.stride(1)) if return_lse else (0, 0, 0)
    _launch(q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k,
            (0, q.stride(0), q.stride(1)), (0, k.stride(0), k.stride(1)), (0, v.stride(0), v.stride(1)),
            (0, o.stride(0), o.stride(1)), l_strides,
            0, 0, batch, max_seqlen_q, causal, scale, window, softcap, return_lse, True, alibi_slopes, sinks)
    return o, lse


@_attention_varlen_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window_left, window_right,
      softcap, return_lse, alibi_slopes, sinks):
    lse_shape = (q.shape[1], q.shape[0]) if return_lse else (0,)
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                     scale: Optional[float] = None, window: tuple = (-1, -1), softcap: Optional[float] = None,
                     alibi_slopes: Optional[torch.Tensor] = None, sinks: Optional[torch.Tensor] = None,
                     return_lse: bool = False):
    """attention() over packed sequences: q (total_q, num_heads, head_dim), k, v (total_k, num_kv_heads, head_dim).

    Sequence b owns q rows cu_seqlens_q[b]:cu_seqlens_q[b+1] and k/v rows cu_seqlens_k[b]:cu_seqlens_k[b+1]
    (int32, length batch + 1, starting at 0) and attends only within itself. max_seqlen_q/k bound the longest
    sequence (the grid is sized from max_seqlen_q). Returns o like q; with return_lse also lse (num_heads, total_q).
    cu_seqlens may be any view (strided, expanded): they are read as their values. scale, softcap, window,
    alibi_slopes and sinks take the same values as in attention() (positions count within each sequence).
    """
    _check_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    scale, window, softcap = _check_options(q, causal, scale, window, softcap, alibi_slopes, sinks, return_lse)
    o, lse = _attention_varlen_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                                  window[0], window[1], softcap, return_lse, alibi_slopes, sinks)
    return (o, lse) if return_lse else o


# ----------------------------------------------------------------------------------------------- compile specs
_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _spec(head_dim, cfg, dtype, *, varlen=False, softcap=False, lse=False, alibi=False, sinks=False):
    ty = _TRITON_DTYPE[dtype]
    sig = {"Q": f"*{ty}:16", "K": f"*{ty}:16", "V": f"*{ty}:16", "O": f"*{ty}:16", "LSE": "*fp32:16",
           "CU_SEQLENS_Q": "*i32:16", "CU_SEQLENS_K": "*i32:16", "ALIBI_SLOPES": "*fp32:16", "SINKS": "*fp32:16"}
    for t in "qkvol":  # row/head strides of contiguous tensors with head_dim % 16 == 0 are 16-divisible
        for s in ("b", "m" if t in "qol" else "n", "h"):
            sig[f"stride_{t}{s}"] = "i32:16"
    sig.update({n: "i32" for n in ("seqlen_q_fixed", "seqlen_k_fixed", "num_heads", "group", "window_left",
                                   "window_right")})
    sig.update(qk_scale="fp32", softcap="fp32")
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=_utils.pow2_at_least(head_dim, 32), IS_VARLEN=varlen,
                      HAS_SOFTCAP=softcap, HAS_ALIBI=alibi, HAS_SINKS=sinks, RETURN_LSE=lse, INTERPRET=False,
                      **cfg.kwargs)
    flags = "".join(f",{f}" for f, on in (("varlen", varlen), ("softcap", softcap), ("lse", lse), ("alibi", alibi),
                                          ("sinks", sinks)) if on)
    name = f"M{cfg.kwargs['BLOCK_M']}N{cfg.kwargs['BLOCK_N']}w{cfg.num_warps}s{cfg.num_stages}"
    return compile_check.CompileSpec(
        kernel=attention_fwd_kernel, name="attention_fwd", config=f"d{head_dim},{ty},{name}{flags}",
        signature=sig, constexprs=constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        expect_mma=dtype != torch.float32)


@compile_check.register
def _compile_specs():
    """Every config the dispatcher can pick, 18 builds in all: each 16-bit config in fp16 or bf16 (both for the
    Llama-like head_dim 128), the largest tile of each class with every optional feature on (varlen + softcap + lse,
    the most registers; at a padded head_dim, 80 -> 128, for the middle class), and the fp32 configs. The variants
    (ALiBi, sinks) add code only where their constexpr is on: each build with every feature on is made again with
    both of them too, plus ALiBi alone at the largest head_dim-128 tile (BLOOM, MPT). Windows and causality are
    runtime values, in every build."""
    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
    widest = dict(varlen=True, softcap=True, lse=True)
    variants = dict(widest, alibi=True, sinks=True)
    small64, large64 = _CONFIGS[(64, False)]
    small128, large128, narrow128 = _CONFIGS[(128, False)]
    small256, large256 = _CONFIGS[(256, False)]
    yield _spec(64, small64, f16)
    yield _spec(64, large64, bf16, **widest)
    yield _spec(64, large64, bf16, **variants)
    for dtype in (f16, bf16):
        yield _spec(128, small128, dtype)
        yield _spec(128, large128, dtype)
    yield _spec(80, large128, bf16, **widest)
    yield _spec(80, large128, bf16, **variants)
    yield _spec(128, large128, bf16, alibi=True)
    yield _spec(128, narrow128, f16)
    yield _spec(256, small256, f16)
    yield _spec(256, large256, bf16, **widest)
    yield _spec(256, large256, bf16, **variants)
    yield _spec(64, _CONFIGS[(64, True)][0], f32)
    yield _spec(128, _CONFIGS[(128, True)][0], f32, **widest)
    yield _spec(128, _CONFIGS[(128, True)][0], f32, **variants)
    yield _spec(256, _CONFIGS[(256, True)][0], f32)
