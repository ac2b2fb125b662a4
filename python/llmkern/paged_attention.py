"""Paged KV cache kernels, host side: write new K/V into the cache, decode attention, prefill over a cached prefix.

Cache layout (per layer, for K and for V): (num_blocks, block_size, num_kv_heads, head_dim), as FlashAttention's
`block_table` and FlashInfer's NHD pages. Block tables are int32 (batch, max_blocks); token t of sequence b lives in
block block_tables[b, t // block_size] at offset t % block_size. `llmkern.PagedKVCache` does the bookkeeping.

Each public function: checks shapes/dtypes (these run under torch.compile too), then calls its llmkern:: op
(llmkern._dispatch). The op's check reads the values that only the host can see in the tensors (block ids within the
cache, lengths within the tables, slots within the cache: one small .min()/.max() each) before any implementation
runs; the device then picks the implementation (CUDA: the Triton launch here). Value checks live inside the op so
that a `torch.compile(fullgraph=True)` graph holds the op without a data-dependent break.
"""
from __future__ import annotations

import math

import torch
import triton

from llmkern import _dispatch, _utils, reference
from llmkern.compile_check import CompileSpec, register
from llmkern.kernels import paged_attention as kernels

_INDEX_DTYPE = torch.int32  # block tables, seq_lens and cu_seqlens: int32, as FlashAttention and FlashInfer
_SLOT_DTYPE = torch.int64   # slot_mapping: int64, as vLLM (block * block_size overflows int32 for big caches)

# Split-KV heuristic constants (the SM count comes from _utils.num_sms, with its stand-in for CPU tensors).
# A split should read at least this many tokens: 256 tokens x 128 dims x 2 (K and V) x 2 bytes = 128 KiB, against
# which the partial output it writes (heads_per_group x head_dim x 4 bytes) and the reduce pass are small.
_MIN_TOKENS_PER_SPLIT = 256
# Upper bound on automatic splits: FlashAttention's own heuristic stops at 128; beyond 64 the reduce's serial merge
# starts to show and no realistic (batch x kv_heads) needs more to fill a GPU.
_MAX_AUTO_SPLITS = 64
# Upper bound on a caller's explicit num_splits: the partial buffers are batch x heads x splits x head_dim fp32.
_MAX_SPLITS = 256


# ---------------------------------------------------------------------------------------------------- configs
def _decode_config(group: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes for the decode kernel.

    GROUP_PAD: the query heads of one KV head are the rows of the score tile. A group of one uses broadcast
    multiply-and-sum (no MMA has fewer than 16 rows, and 15 wasted rows of 16 buy nothing for one head); larger
    groups are padded to >= 16 rows (the M of an sm_80 mma.m16n8k16 and of a Hopper wgmma) and use tl.dot.
    BLOCK_N: tokens per loop step. 64 keeps a (64 x 128) fp16 K tile and V tile at 16 KiB each, enough bytes in
    flight per step to stream from HBM with two pipeline stages; halved for head_dim 256 and for fp32 (same bytes)
    and for the broadcast path (its (1 x BLOCK_N x BLOCK_D) product lives in registers).
    num_warps: 4 (one warpgroup) unless the fp32 accumulator GROUP_PAD x BLOCK_D exceeds 64 x 128, then 8, which
    keeps it at <= 64 registers per thread; also 8 for the fp32 dot path. `llmkern check-compile` shows each of
    these choices without spills on sm_80 and sm_90 (the fp32 dot path spilled on sm_90 with 4 warps).
    """
    block_d = triton.next_power_of_2(head_dim)
    use_dot = group > 1
    group_pad = max(16, triton.next_power_of_2(group)) if use_dot else 1
    block_n = 64
    if block_d > 128 or dtype == torch.float32 or not use_dot:
        block_n = 32
    if not use_dot and block_d > 128:
        block_n = 16  # the broadcast product (BLOCK_N x 256) fp32 at 32 tokens spilled on sm_90 with triton 3.6
    # fp32 tiles are twice the bytes and the IEEE-fp32 dot runs on FMA units with its operands in registers.
    num_warps = 8 if (group_pad * block_d > 64 * 128 or (use_dot and dtype == torch.float32)) else 4
    return dict(GROUP_PAD=group_pad, BLOCK_N=block_n, BLOCK_D=block_d, USE_DOT=use_dot, num_warps=num_warps,
                num_stages=2)


def _prefill_config(head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes for the prefill kernel, from FlashAttention-2's forward tiles (BLOCK_M 64 query rows, 4 warps for
    head_dim <= 64, 8 warps above so the (64 x head_dim) fp32 accumulator stays in registers), halving BLOCK_N for
    head_dim 256 so the K/V tiles keep their shared-memory footprint. fp32 runs its IEEE dot on FMA units with the
    operands in registers: 32 x 16 tiles (32 x 32 spills on sm_80 with softcap and window), 4 warps up to head_dim
    128 (8 spilled 4 bytes on sm_90 with triton 3.6) and 8 at 256 (4 spilled there). Each choice compiles without
    spills on sm_80 and sm_90 with triton 3.6 and 3.9 (`llmkern check-compile`); for 16-bit inputs, 4 warps at
    head_dim 128 and 256 spilled on sm_80."""
    block_d = triton.next_power_of_2(head_dim)
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=16, BLOCK_D=block_d, num_warps=4 if block_d <= 128 else 8, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=64 if block_d <= 128 else 32, BLOCK_D=block_d,
                num_warps=4 if block_d <= 64 else 8, num_stages=2)


def choose_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """How many programs share one sequence's keys (flash-decoding).

    Without splitting, decode launches batch x num_kv_heads programs. Aim for two programs per SM (so one's loads
    overlap another's math and a ragged last wave costs little): when the batch already gives that, do not split;
    otherwise split each sequence into enough pieces to get there, but never so fine that a split reads fewer than
    _MIN_TOKENS_PER_SPLIT tokens of the longest sequence (then the partial writes and the reduce stop being noise),
    and never more than _MAX_AUTO_SPLITS.
    """
    programs = max(1, batch * num_kv_heads)
    target = 2 * _utils.num_sms(device)
    if programs >= target:
        return 1
    by_grid = _utils.cdiv(target, programs)
    by_len = max(1, max_seq_len // _MIN_TOKENS_PER_SPLIT)
    return max(1, min(by_grid, by_len, _MAX_AUTO_SPLITS))


# ---------------------------------------------------------------------------------------------------- shared checks
_CACHE_DTYPES = _utils.FLOAT_DTYPES + _utils.FP8_DTYPES


def _check_cache_pair(q_name: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, ...]:
    """The cache pair: 4-D, one shape, one dtype; q's dtype, or fp8 (e4m3fn / e5m2) with q in any float dtype."""
    _utils.check_tensor("k_cache", k_cache, ndim=4, dtypes=_CACHE_DTYPES)
    _utils.check_tensor("v_cache", v_cache, ndim=4, dtypes=_CACHE_DTYPES)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape (num_blocks, block_size, num_kv_heads, "
                         f"head_dim), got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    _utils.check_same(["k_cache", "v_cache"], [k_cache, v_cache])
    _utils.check_same([q_name, "k_cache", "v_cache"], [q, k_cache, v_cache],
                      dtype=k_cache.dtype not in _utils.FP8_DTYPES)
    _check_fp8_arch(k_cache)
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    if num_blocks < 1 or block_size < 1 or num_kv_heads < 1:
        raise ValueError(f"k_cache: num_blocks, block_size and num_kv_heads must be >= 1, got {tuple(k_cache.shape)}")
    _utils.check_head_dim("k_cache", head_dim)
    return num_blocks, block_size, num_kv_heads, head_dim


# Triton compiles float8_e4m3fn (its fp8e4nv) for compute capability 8.9 and newer only ("type fp8e4nv not supported
# in this architecture" on sm_80); float8_e5m2 (fp8e5) builds everywhere.
_E4M3_MIN_CAPABILITY = (8, 9)


def _check_fp8_arch(cache: torch.Tensor) -> None:
    if cache.dtype == torch.float8_e4m3fn and cache.device.type == "cuda" and \
            torch.cuda.get_device_capability(cache.device) < _E4M3_MIN_CAPABILITY:
        raise ValueError("k_cache: float8_e4m3fn caches need a GPU of compute capability 8.9 or newer (Triton has no "
                         "e4m3fn before it); use float8_e5m2 on this one")


def _check_heads(q: torch.Tensor, num_kv_heads: int, head_dim: int) -> None:
    num_heads = q.shape[1]
    if q.shape[2] != head_dim:
        raise ValueError(f"q has head_dim {q.shape[2]} but the cache has head_dim {head_dim}")
    if num_heads < 1 or num_heads % num_kv_heads != 0:
        raise ValueError(f"q has {num_heads} heads, which must be a positive multiple of the cache's num_kv_heads "
                         f"({num_kv_heads})")


def _check_index(name: str, t: torch.Tensor, ndim: int, dtype: torch.dtype, like: torch.Tensor) -> None:
    _utils.check_tensor(name, t, ndim=ndim, dtypes=(dtype,))
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but q is on {like.device}; they must share a device")


def _check_tables(block_tables: torch.Tensor, seq_lens: torch.Tensor, num_blocks: int, block_size: int,
                  min_len: int) -> int:
    """Value checks on the host (one sync): lengths within the tables, used table entries within the cache.

    Only the entries a sequence uses (the first cdiv(seq_len, block_size) of its row) are checked, so tables may be
    padded with anything (-1, 0, stale ids). Returns the longest sequence."""
    if seq_lens.numel() == 0:
        return 0
    lo, hi = int(seq_lens.min()), int(seq_lens.max())
    if lo < min_len:
        raise ValueError(f"seq_lens must be >= {min_len}, got a minimum of {lo}")
    capacity = block_tables.shape[1] * block_size
    if hi > capacity:
        raise ValueError(f"seq_lens: a sequence of {hi} tokens does not fit its block table of "
                         f"{block_tables.shape[1]} blocks x block_size {block_size} = {capacity} tokens")
    used_blocks = (seq_lens.to(torch.int64) + block_size - 1) // block_size
    used = torch.arange(block_tables.shape[1], device=block_tables.device)[None, :] < used_blocks[:, None]
    ids = block_tables[used]
    if ids.numel():
        bmin, bmax = int(ids.min()), int(ids.max())
        if bmin < 0 or bmax >= num_blocks:
            raise ValueError(f"block_tables: entries used by the sequences must lie in [0, {num_blocks}) "
                             f"(num_blocks of the cache), found values in [{bmin}, {bmax}]")
    return hi


def _cache_strides(c: torch.Tensor) -> tuple[int, int, int, int]:
    return c.stride(0), c.stride(1), c.stride(2), c.stride(3)


# ---------------------------------------------------------------------------------------------------- kv write
def _check_kv_scale_values(k_cache, k_scale, v_scale) -> None:
    _utils.check_kv_scale_values("k_scale", k_scale, k_cache.dtype)
    _utils.check_kv_scale_values("v_scale", v_scale, k_cache.dtype)


def _check_slots(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale) -> None:
    """Caches that can be written (no element at two indices), every slot within the cache or -1 (one sync), and an
    fp8 cache's scales (one more), before any implementation runs (llmkern._dispatch)."""
    _check_kv_scale_values(k_cache, k_scale, v_scale)
    _utils.check_writable("k_cache", k_cache)
    _utils.check_writable("v_cache", v_cache)
    num_blocks, block_size = k_cache.shape[:2]
    if slot_mapping.numel() == 0:
        return
    smin, smax = int(slot_mapping.min()), int(slot_mapping.max())
    if smin < -1 or smax >= num_blocks * block_size:
        raise ValueError(f"slot_mapping values must lie in [-1, {num_blocks * block_size}) (-1 = skip; "
                         f"num_blocks x block_size slots), found values in [{smin}, {smax}]")


@_dispatch.custom_op("paged_kv_write", mutates_args=("k_cache", "v_cache"), reference=reference.paged_kv_write,
                     check=_check_slots, contiguous=("slot_mapping", "k_scale", "v_scale"))
def _paged_kv_write_op(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor, k_scale: torch.Tensor | None,
                       v_scale: torch.Tensor | None) -> None:
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    quantize = k_scale is not None   # an fp8 cache (its scales are required)
    _utils.launch(
        kernels.paged_kv_write_kernel, (num_tokens,),
        k, v, k_cache, v_cache, slot_mapping, k_scale if quantize else k, v_scale if quantize else v,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        *_cache_strides(k_cache), *_cache_strides(v_cache),
        num_kv_heads, block_size,
        HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        QUANTIZE=quantize, INTERPRET=_utils.INTERPRET,
    )


@_paged_kv_write_op.register_fake
def _(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale) -> None:
    return None


def paged_kv_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, *, k_scale: float | torch.Tensor | None = None,
                   v_scale: float | torch.Tensor | None = None) -> None:
    """Copy k, v (num_tokens, num_kv_heads, head_dim) into the cache slots `slot_mapping` (int64, num_tokens).

    Slot s is block s // block_size, offset s % block_size; -1 skips the token (padding). A 16-bit or fp32 cache gets
    bit-exact copies: k, v must have its dtype, and k_scale / v_scale must be None. An fp8 cache (float8_e4m3fn or
    float8_e5m2; k, v in any float dtype) stores round_to_fp8(x / scale), to nearest even, saturated to the format's
    largest value (+-448 for e4m3fn, +-57344 for e5m2) as vLLM does; its scales are required: k_scale, v_scale a
    float or a float32 (num_kv_heads,) tensor (one scale per KV head; a finite value in [2**-126, 3.4e38 / fp8 max],
    a tensor's values checked with one host sync). Slots must be distinct (two tokens in one slot leave either one
    there). The caches are written through their strides (any view that does not overlap itself: an expanded cache
    raises ValueError); slot_mapping and the scales may be any view, read as their values.
    """
    _utils.check_tensor("k", k, ndim=3, dtypes=_utils.FLOAT_DTYPES)
    _utils.check_tensor("v", v, ndim=3, dtypes=_utils.FLOAT_DTYPES)
    _, _, num_kv_heads, head_dim = _check_cache_pair("k", k, k_cache, v_cache)
    _utils.check_same(["k", "v"], [k, v])
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[1:] != (num_kv_heads, head_dim):
        raise ValueError(f"k must be (num_tokens, {num_kv_heads}, {head_dim}) to match the cache, got "
                         f"{tuple(k.shape)}")
    _check_index("slot_mapping", slot_mapping, 1, _SLOT_DTYPE, k)
    if slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(f"slot_mapping must have one slot per token ({k.shape[0]}), got {slot_mapping.shape[0]}")
    k_scale = _utils.check_kv_scale("k_scale", k_scale, k_cache.dtype, num_kv_heads, k_cache)
    v_scale = _utils.check_kv_scale("v_scale", v_scale, k_cache.dtype, num_kv_heads, k_cache)
    k = _utils.last_dim_contiguous("k", k)
    v = _utils.last_dim_contiguous("v", v)
    _paged_kv_write_op(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


# ---------------------------------------------------------------------------------------------------- decode
def _check_decode_values(q, k_cache, v_cache, block_tables, seq_lens, *options) -> None:
    """Lengths and block ids (host syncs), before any implementation runs (llmkern._dispatch)."""
    _check_tables(block_tables, seq_lens, k_cache.shape[0], k_cache.shape[1], min_len=1)


def _paged_decode_reference(q, k_cache, v_cache, block_tables, seq_lens, scale, softcap, window_left, window_right,
                            num_splits):
    if q.shape[0] == 0:
        return torch.empty_like(q)
    return reference.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale=scale,
                                            softcap=softcap, window=(window_left, window_right))


@_dispatch.custom_op("paged_decode_attention", mutates_args=(), reference=_paged_decode_reference,
                     check=_check_decode_values, contiguous=("seq_lens",))
def _paged_decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, softcap: float | None, window_left: int,
                     window_right: int, num_splits: int) -> torch.Tensor:
    batch, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    group = num_heads // num_kv_heads
    window_left = _utils.unbounded_beyond(window_left, block_tables.shape[1] * block_size)
    cfg = _decode_config(group, head_dim, q.dtype)
    if num_splits == 0:
        num_splits = choose_num_splits(batch, num_kv_heads, int(seq_lens.max()), q.device)
    split = num_splits > 1
    if split:
        part_o = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    else:  # never read: the kernel writes the output directly; these only fill the pointer/stride arguments
        part_o = torch.empty(1, 1, 1, 1, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(1, 1, 1, dtype=torch.float32, device=q.device)
    has_softcap = softcap is not None
    _utils.launch(
        kernels.paged_decode_kernel, (batch, num_kv_heads, num_splits),
        q, k_cache, v_cache, block_tables, seq_lens, out, part_o, part_lse,
        q.stride(0), q.stride(1), q.stride(2),
        *_cache_strides(k_cache), *_cache_strides(v_cache),
        block_tables.stride(0), block_tables.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_o.stride(3),
        part_lse.stride(0), part_lse.stride(1), part_lse.stride(2),
        scale * math.log2(math.e), softcap if has_softcap else 1.0, window_left,
        group, block_size, num_splits,
        HEAD_DIM=head_dim, SPLIT=split, HAS_SOFTCAP=has_softcap, HAS_LEFT=window_left >= 0,
        INTERPRET=_utils.INTERPRET, **cfg,
    )
    if split:
        _utils.launch(
            kernels.paged_decode_reduce_kernel, (batch, num_heads),
            part_o, part_lse, out,
            part_o.stride(0), part_o.stride(1), part_o.stride(2), part_o.stride(3),
            part_lse.stride(0), part_lse.stride(1), part_lse.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            num_splits,
            HEAD_DIM=head_dim, BLOCK_D=cfg["BLOCK_D"], num_warps=4,
        )
    return out


@_paged_decode_op.register_fake
def _(q, k_cache, v_cache, block_tables, seq_lens, scale, softcap, window_left, window_right, num_splits):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, *, scale: float | None = None,
                           softcap: float | None = None, window: tuple[int, int] = (-1, -1),
                           num_splits: int | None = None) -> torch.Tensor:
    """One new token per sequence attends to its whole cached sequence (its own K/V already written).

    q (batch, num_heads, head_dim); k_cache, v_cache (num_blocks, block_size, num_kv_heads, head_dim) with
    num_heads % num_kv_heads == 0 (GQA/MQA); block_tables int32 (batch, max_blocks); seq_lens int32 (batch,), the
    cached length including the new token (>= 1). window=(left, right): the token at position seq_len - 1 sees keys
    from seq_len - 1 - left (-1: unbounded); right has nothing to mask in decode. softcap: Gemma-2 tanh capping.
    scale, softcap and window take the values llmkern.attention documents (inf softcap: no cap). Every tensor may be
    any view: the cache, q and block_tables (either stride) are read through their strides, seq_lens as its values.
    num_splits: programs per sequence (split-KV); None picks one from batch, length and SM count.
    Returns (batch, num_heads, head_dim) in q's dtype.
    """
    _utils.check_tensor("q", q, ndim=3, dtypes=_utils.FLOAT_DTYPES)
    num_blocks, block_size, num_kv_heads, head_dim = _check_cache_pair("q", q, k_cache, v_cache)
    _check_heads(q, num_kv_heads, head_dim)
    batch = q.shape[0]
    _check_index("block_tables", block_tables, 2, _INDEX_DTYPE, q)
    _check_index("seq_lens", seq_lens, 1, _INDEX_DTYPE, q)
    if block_tables.shape[0] != batch or seq_lens.shape[0] != batch:
        raise ValueError(f"block_tables ({tuple(block_tables.shape)}) and seq_lens ({tuple(seq_lens.shape)}) must "
                         f"have one row per sequence of q (batch {batch})")
    scale = _utils.check_scale(scale, head_dim)
    softcap = _utils.check_softcap(softcap, scale)
    left, right = _utils.check_window(window)
    if num_splits is not None:
        if not isinstance(num_splits, int) or isinstance(num_splits, bool):
            raise TypeError(f"num_splits must be an int or None, got {num_splits!r}")
        if not 1 <= num_splits <= _MAX_SPLITS:
            raise ValueError(f"num_splits must be in [1, {_MAX_SPLITS}] (or None to choose), got {num_splits}")
    q = _utils.last_dim_contiguous("q", q)
    k_cache = _utils.last_dim_contiguous("k_cache", k_cache)
    v_cache = _utils.last_dim_contiguous("v_cache", v_cache)
    return _paged_decode_op(q, k_cache, v_cache, block_tables, seq_lens, scale, softcap, left, right,
                            0 if num_splits is None else num_splits)


# ---------------------------------------------------------------------------------------------------- prefill
def _check_prefill_values(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, *options) -> None:
    """cu_seqlens_q, lengths and block ids (host syncs), before any implementation runs (llmkern._dispatch)."""
    total_q = q.shape[0]
    cu = cu_seqlens_q.tolist()
    if cu[0] != 0 or cu[-1] != total_q:
        raise ValueError(f"cu_seqlens_q must start at 0 and end at total_q ({total_q}), got {cu[0]} ... {cu[-1]}")
    q_lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if any(n < 0 for n in q_lens):
        raise ValueError("cu_seqlens_q must be non-decreasing")
    for b, (q_len, seq_len) in enumerate(zip(q_lens, seq_lens.tolist())):
        if q_len > seq_len:
            raise ValueError(f"seq_lens[{b}] = {seq_len} is shorter than that sequence's {q_len} new tokens "
                             f"(seq_lens counts the cached prefix plus the new tokens)")
    if total_q:
        _check_tables(block_tables, seq_lens, k_cache.shape[0], k_cache.shape[1], min_len=0)


def _paged_prefill_reference(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, causal, scale, softcap,
                             window_left, window_right):
    if q.shape[0] == 0:
        return torch.empty_like(q)
    return reference.paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens,
                                             causal=causal, scale=scale, softcap=softcap,
                                             window=(window_left, 0 if causal else window_right))


@_dispatch.custom_op("paged_prefill_attention", mutates_args=(), reference=_paged_prefill_reference,
                     check=_check_prefill_values, contiguous=("cu_seqlens_q", "seq_lens"))
def _paged_prefill_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, causal: bool, scale: float,
                      softcap: float | None, window_left: int, window_right: int) -> torch.Tensor:
    total_q, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    batch = seq_lens.shape[0]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if total_q == 0:
        return out
    q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    longest = block_tables.shape[1] * block_size   # no sequence outgrows its block table (checked)
    window_left, window_right = (_utils.unbounded_beyond(w, longest) for w in (window_left, window_right))
    if causal:
        window_right = 0
    cfg = _prefill_config(head_dim, q.dtype)
    grid = (_utils.cdiv(max(q_lens), cfg["BLOCK_M"]), batch, num_heads)
    has_softcap = softcap is not None
    _utils.launch(
        kernels.paged_prefill_kernel, grid,
        q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, out,
        q.stride(0), q.stride(1), q.stride(2),
        *_cache_strides(k_cache), *_cache_strides(v_cache),
        block_tables.stride(0), block_tables.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        scale * math.log2(math.e), softcap if has_softcap else 1.0, window_left, window_right,
        num_heads // num_kv_heads, block_size,
        HEAD_DIM=head_dim, HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, HAS_SOFTCAP=has_softcap,
        INTERPRET=_utils.INTERPRET, **cfg,
    )
    return out


@_paged_prefill_op.register_fake
def _(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, causal, scale, softcap, window_left, window_right):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, *,
                            causal: bool = True, scale: float | None = None, softcap: float | None = None,
                            window: tuple[int, int] = (-1, -1)) -> torch.Tensor:
    """The newest tokens of each sequence attend to its cached prefix and, causally, to each other.

    q (total_q, num_heads, head_dim) packs each sequence's new tokens (rows cu_seqlens_q[b]:cu_seqlens_q[b+1],
    int32 (batch + 1,)); their K/V are already in the cache. seq_lens int32 (batch,) is each sequence's total
    length, prefix plus new tokens, so new token i sits at position seq_len - q_len + i (bottom-right alignment, as
    FlashAttention's kvcache API). This is chunked prefill and prefix caching. Returns (total_q, num_heads, head_dim).
    scale, softcap and window as in llmkern.attention; tensors in any layout, as in paged_decode_attention.
    """
    _utils.check_tensor("q", q, ndim=3, dtypes=_utils.FLOAT_DTYPES)
    num_blocks, block_size, num_kv_heads, head_dim = _check_cache_pair("q", q, k_cache, v_cache)
    _check_heads(q, num_kv_heads, head_dim)
    _check_index("block_tables", block_tables, 2, _INDEX_DTYPE, q)
    _check_index("cu_seqlens_q", cu_seqlens_q, 1, _INDEX_DTYPE, q)
    _check_index("seq_lens", seq_lens, 1, _INDEX_DTYPE, q)
    batch = seq_lens.shape[0]
    if cu_seqlens_q.shape[0] != batch + 1 or block_tables.shape[0] != batch:
        raise ValueError(f"cu_seqlens_q must have batch + 1 entries and block_tables batch rows, for seq_lens' "
                         f"batch {batch}; got {tuple(cu_seqlens_q.shape)} and {tuple(block_tables.shape)}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    scale = _utils.check_scale(scale, head_dim)
    softcap = _utils.check_softcap(softcap, scale)
    left, right = _utils.check_window(window)
    q = _utils.last_dim_contiguous("q", q)
    k_cache = _utils.last_dim_contiguous("k_cache", k_cache)
    v_cache = _utils.last_dim_contiguous("v_cache", v_cache)
    return _paged_prefill_op(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, causal, scale, softcap,
                             left, right)


# ---------------------------------------------------------------------------------------------------- compile specs
def _ptr(dtype: torch.dtype) -> str:
    return {torch.float16: "*fp16:16", torch.bfloat16: "*bf16:16", torch.float32: "*fp32:16",
            torch.float8_e4m3fn: "*fp8e4nv:16", torch.float8_e5m2: "*fp8e5:16"}[dtype]


_I32 = "i32"
_I64 = "i64"
# Strides of the batch/block dimension may exceed 2**31 elements in a big cache or batch: the launcher passes them
# as i64 then, so the specs compile them that way. Triton's launcher specializes an integer argument equal to 1 to
# the constant 1 and marks one divisible by 16 as such (which is what lets loads vectorize); the specs do the same for
# the layouts the ops see in practice: contiguous tensors with head_dim % 16 == 0.
_WIDE_STRIDES = ("stride_qb", "stride_qt", "stride_kcb", "stride_vcb", "stride_btb", "stride_ob", "stride_ot",
                 "stride_pob", "stride_plb")
_UNIT_STRIDES = ("stride_qd", "stride_kcd", "stride_vcd", "stride_od", "stride_pod", "stride_kd", "stride_vd",
                 "stride_btn", "stride_pls")


def _strides(kernel) -> tuple[dict[str, str], dict[str, int]]:
    names = [n for n in kernel.arg_names if n.startswith("stride_")]
    sig = {n: (_I64 if n in _WIDE_STRIDES else _I32) + ":16" for n in names if n not in _UNIT_STRIDES}
    return sig, {n: 1 for n in names if n in _UNIT_STRIDES}


def _decode_spec(dtype: torch.dtype, group: int, head_dim: int, *, split: bool = True,
                 masks: bool = False) -> CompileSpec:
    cfg = _decode_config(group, head_dim, dtype)
    stride_sig, unit = _strides(kernels.paged_decode_kernel)
    sig = {"Q": _ptr(dtype), "KC": _ptr(dtype), "VC": _ptr(dtype), "BT": "*i32:16", "SEQ_LENS": "*i32:16",
           "O": _ptr(dtype), "PART_O": "*fp32:16", "PART_LSE": "*fp32:16", **stride_sig, "qk_scale": "fp32",
           "softcap": "fp32", "window_left": _I32, "group": _I32, "block_size": _I32, "num_splits": _I32}
    const = {k: cfg[k] for k in ("GROUP_PAD", "BLOCK_N", "BLOCK_D", "USE_DOT")}
    const.update(unit, HEAD_DIM=head_dim, SPLIT=split, HAS_SOFTCAP=masks, HAS_LEFT=masks, INTERPRET=False)
    config = (f"{str(dtype)[6:]} g{group} d{head_dim} {'split' if split else 'direct'}"
              f"{' softcap+window' if masks else ''} GP{cfg['GROUP_PAD']} BN{cfg['BLOCK_N']} w{cfg['num_warps']}")
    return CompileSpec(kernels.paged_decode_kernel, "paged_decode", config, sig, const, num_warps=cfg["num_warps"],
                       num_stages=cfg["num_stages"], expect_mma=cfg["USE_DOT"] and dtype != torch.float32)


def _prefill_spec(dtype: torch.dtype, head_dim: int, *, causal: bool = True, masks: bool = False) -> CompileSpec:
    cfg = _prefill_config(head_dim, dtype)
    stride_sig, unit = _strides(kernels.paged_prefill_kernel)
    sig = {"Q": _ptr(dtype), "KC": _ptr(dtype), "VC": _ptr(dtype), "BT": "*i32:16", "CU_Q": "*i32:16",
           "SEQ_LENS": "*i32:16", "O": _ptr(dtype), **stride_sig, "qk_scale": "fp32", "softcap": "fp32",
           "window_left": _I32, "window_right": _I32, "group": _I32, "block_size": _I32}
    const = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D")}
    const.update(unit, HEAD_DIM=head_dim, HAS_LEFT=masks, HAS_RIGHT=causal, HAS_SOFTCAP=masks, INTERPRET=False)
    config = (f"{str(dtype)[6:]} d{head_dim} {'causal' if causal else 'full'}{' softcap+window' if masks else ''} "
              f"BM{cfg['BLOCK_M']} BN{cfg['BLOCK_N']} w{cfg['num_warps']}")
    return CompileSpec(kernels.paged_prefill_kernel, "paged_prefill", config, sig, const, num_warps=cfg["num_warps"],
                       num_stages=cfg["num_stages"], expect_mma=dtype != torch.float32)


def _fp8_archs(cache_dtype: torch.dtype) -> tuple[int, ...] | None:
    """The archs a kernel over this cache dtype builds for: e4m3fn only from sm_89 on (of the checked ones, sm_90;
    see _check_fp8_arch), everything else everywhere."""
    return (90,) if cache_dtype == torch.float8_e4m3fn else None


@register
def _compile_specs():
    """Every config the dispatchers can pick. Tile sizes depend only on (group, head_dim, dtype):

    decode: the groups that change the tile (1 = broadcast path; 4 -> 16 rows; 32; 64, which takes 8 warps at
    head_dim 256) x head dims 64/128/256 (80/96: masked lanes) in fp16, bf16 and fp32 spot checks (fp32's dot path
    takes 8 warps); the split (partial-write) epilogue everywhere, the direct-output one with the softcap code at
    head_dim 128 and 256. prefill: per head dim and dtype, plus the softcap variant at the largest tiles. Windows
    and causality are runtime values, compiled into every build. Then the reduce and the write kernel.
    """
    for dtype, groups, dims in ((torch.float16, (1, 4, 32, 64), (64, 128, 256)),
                                (torch.float16, (1, 4), (80, 96)),
                                (torch.bfloat16, (1, 8), (128,)),
                                (torch.float32, (1, 8), (128, 256))):
        for group in groups:
            for head_dim in dims:
                yield _decode_spec(dtype, group, head_dim)
                if head_dim in (128, 256) and dtype != torch.bfloat16:
                    yield _decode_spec(dtype, group, head_dim, split=False, masks=True)

    for dtype, head_dim in ((torch.float16, 64), (torch.float16, 96), (torch.float16, 128), (torch.float16, 256),
                            (torch.bfloat16, 128), (torch.float32, 64), (torch.float32, 128), (torch.float32, 256)):
        yield _prefill_spec(dtype, head_dim)
        if head_dim in (128, 256):
            yield _prefill_spec(dtype, head_dim, causal=False, masks=True)

    kr = kernels.paged_decode_reduce_kernel
    for head_dim in (64, 128, 256):
        stride_sig, unit = _strides(kr)
        sig = {"PART_O": "*fp32:16", "PART_LSE": "*fp32:16", "O": "*fp16:16", **stride_sig, "num_splits": _I32}
        yield CompileSpec(kr, "paged_decode_reduce", f"fp16 d{head_dim} w4", sig,
                          {"HEAD_DIM": head_dim, "BLOCK_D": triton.next_power_of_2(head_dim), **unit}, num_warps=4)

    # the write: copies, and the fp8 quantizing writes (from 16-bit and fp32 K/V into e4m3fn and e5m2 caches)
    kw = kernels.paged_kv_write_kernel
    for dtype, cache, heads, head_dim in ((torch.float16, torch.float16, 8, 128),
                                          (torch.bfloat16, torch.bfloat16, 1, 256),
                                          (torch.float32, torch.float32, 32, 64),
                                          (torch.bfloat16, torch.float8_e4m3fn, 8, 128),
                                          (torch.float16, torch.float8_e5m2, 1, 256),
                                          (torch.float32, torch.float8_e4m3fn, 32, 64)):
        stride_sig, unit = _strides(kw)
        sig = {"K": _ptr(dtype), "V": _ptr(dtype), "KC": _ptr(cache), "VC": _ptr(cache), "SLOT": "*i64:16",
               "K_SCALE": "*fp32:16", "V_SCALE": "*fp32:16", **stride_sig, "num_kv_heads": _I32, "block_size": _I32}
        quantize = cache in _utils.FP8_DTYPES
        name = f"{str(dtype)[6:]}{' -> ' + str(cache)[6:] if quantize else ''} h{heads} d{head_dim}"
        yield CompileSpec(kw, "paged_kv_write", name, sig,
                          {"HEAD_DIM": head_dim, "BLOCK_H": triton.next_power_of_2(heads),
                           "BLOCK_D": triton.next_power_of_2(head_dim), "QUANTIZE": quantize, "INTERPRET": False,
                           **unit}, archs=_fp8_archs(cache))
