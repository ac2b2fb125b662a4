"""Paged KV cache kernels, host side: write new K/V into the cache, and attention over it, planned once per step.

Cache layout (per layer, for K and for V): (num_blocks, block_size, num_kv_heads, head_dim), as FlashAttention's
`block_table` and FlashInfer's NHD pages. Block tables are int32 (batch, max_blocks); token t of sequence b lives in
block block_tables[b, t // block_size] at offset t % block_size. `llmkern.PagedKVCache` does the bookkeeping.

Plan, then run (FlashInfer's plan/run split). A step's metadata (block tables, lengths, query lengths) is the same
for every layer, so `PagedAttentionPlan` takes it once per step: it reads the values on the host (no sync when they
are CPU tensors, one device-to-host copy when they are not), validates them, chooses the tiles and the split-KV
counts, writes the step's work list, and copies all of it into buffers it allocated once. `plan.run` is then the
per-layer call: it checks shapes, dtypes and devices only (no sync, no device-property query, no allocation but the
output when none is given) and launches one kernel for the whole batch, decode tokens and prompt chunks alike (plus
the split-KV merge when the plan split a decode token). `plan.update` refills the same buffers for the next step, so
a CUDA graph captured around `plan.run` stays valid.

`paged_decode_attention` and `paged_prefill_attention` are one-shots over the same kernel: llmkern:: ops whose check
validates the tables (one sync) and whose Triton implementation makes a plan and runs it. `paged_kv_write` needs no
sync at all: its kernel writes only slots inside the cache (vLLM's -1 and any other slot outside are skipped), and
`PagedAttentionPlan.slot_mapping` gives the step's slots, computed from the validated tables.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from llmkern import _dispatch, _utils, reference
from llmkern.compile_check import CompileSpec, register
from llmkern.kernels import paged_attention as kernels

_INDEX_DTYPE = torch.int32  # block tables, seq_lens and cu_seqlens: int32, as FlashAttention and FlashInfer
_SLOT_DTYPE = torch.int64   # slot_mapping: int64, as vLLM (block * block_size overflows int32 for big caches)
_WORK_FIELDS = kernels.WORK_FIELDS.value       # (b, i0, split, num_splits, slot) per work item
_REDUCE_FIELDS = kernels.REDUCE_FIELDS.value   # (output row, first slot, num_splits) per split token

# Split-KV heuristic constants (the SM count comes from _utils.num_sms, with its stand-in for CPU tensors).
# A split should read at least this many tokens: 256 tokens x 128 dims x 2 (K and V) x 2 bytes = 128 KiB, against
# which the partial output it writes (heads_per_group x head_dim x 4 bytes) and the reduce pass are small.
_MIN_TOKENS_PER_SPLIT = 256
# Upper bound on automatic splits: FlashAttention's own heuristic stops at 128; beyond 64 the reduce's serial merge
# starts to show and no realistic (batch x kv_heads) needs more to fill a GPU.
_MAX_AUTO_SPLITS = 64
# Upper bound on a caller's explicit num_splits: the partial buffers are tokens x heads x splits x head_dim fp32.
_MAX_SPLITS = 256


# ---------------------------------------------------------------------------------------------------- tiles
def _tile_config(decode_tiles: bool, group: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes of the attention kernel: BLOCK_M rows = BLOCK_Q query tokens x the `group` query heads of one KV
    head (GQA packing), BLOCK_N keys per step.

    Decode tiles (every sequence of the step has one query token): BLOCK_Q = 1, the group's heads are the rows. A
    group of one uses broadcast multiply-and-sum (no MMA has fewer than 16 rows, and 15 wasted rows of 16 buy
    nothing for one head); larger groups are padded to >= 16 rows (the M of an sm_80 mma.m16n8k16 and of a Hopper
    wgmma) and use tl.dot. BLOCK_N 64 keeps a (64 x 128) fp16 K tile and V tile at 16 KiB each, enough bytes in
    flight per step to stream from HBM with two pipeline stages; halved for head_dim 256 and for fp32 (same bytes)
    and for the broadcast path (its (1 x BLOCK_N x BLOCK_D) product lives in registers). num_warps 8: 256 threads
    share the tiles, the (BLOCK_N x BLOCK_D) products and the fp32 accumulator, so a thread holds about half of
    what it would with 4 (16-bit head_dim 64 and 256, triton 3.6 and 3.9: 40-67 registers a thread at 8 warps
    against 62-168 at 4, never fewer resident warps per SM). Two exceptions take 4 warps. The 16-bit broadcast path
    at padded head_dim <= 128: its products now stay in the K tile's layout (kernels/paged_attention.py), 56-80
    registers at 4 warps on triton 3.6 and 3.9 (at head_dim 128 8 warps hold fewer resident warps on triton 3.6;
    at 64 either count loses 4 of them on one arch and version, and on sm_90 with triton 3.6, the GPU machine's,
    neither does; fp32, at twice the bytes a key, takes 8: 48-80). And head_dim 256 on the 16-bit dot path with 16 rows: with 8 it
    spilled on sm_90 over an fp8 cache (below); 32 rows take 8 warps at 16 keys a step (122-128 registers on both
    triton versions; 32 keys took 195 at 4 warps, 12 -> 8 resident warps, and spilled at 8). Measured with `llmkern
    check-compile` (bench/results/compile-registers-vs-house-core.md).

    Prefill tiles (some sequence has more query tokens: prompt chunks, mixed batches): FlashAttention-2's forward
    tiles, 64 rows, 8 warps so the (64 x head_dim) fp32 accumulator and the (64 x BLOCK_N) scores stay in
    registers (4 warps spilled on sm_80 at head_dim 64, 168 registers), BLOCK_N 64 (32 for head_dim 256, keeping
    the K/V tiles' shared-memory footprint); fp32 runs its IEEE dot on FMA units with the operands in registers: 32 x
    16 tiles, 8 warps (4 spilled 24 bytes on sm_80 with triton 3.6 at head_dim 64). The 64
    rows hold 64 // group tokens of a group (a group larger than the rows: one token, its heads padded to a power of
    two). Decode tokens in a mixed batch use these tiles too (one launch), filling `group` of the rows.

    An fp8 cache keeps the query dtype's tiles: its tiles are half the bytes, and their conversion to 16-bit is what
    the 8 warps of the (64 x 128) decode tiles also absorb (with 4, e5m2 spilled 12 bytes on sm_80 at group 8; with
    8, 106 registers; at head_dim 256, 16-row tiles take 16 keys a step: at 32, 4 warps spilled 12 bytes on sm_90
    with triton 3.6 and 8 warps 16 bytes).

    `llmkern check-compile` shows every choice without spills on sm_80 and sm_90 (the fp32 dot path spilled on
    sm_90 with 4 warps; 4 warps spilled on sm_80 for 16-bit prefill tiles at every head_dim).
    """
    block_d = triton.next_power_of_2(head_dim)
    if decode_tiles:
        use_dot = group > 1
        block_m = max(16, triton.next_power_of_2(group)) if use_dot else 1
        block_n = 64
        if block_d > 128 or dtype == torch.float32 or not use_dot:
            block_n = 32
        if not use_dot and block_d > 128:
            block_n = 16  # the broadcast product (BLOCK_N x 256) fp32 at 32 tokens spilled on sm_90 with triton 3.6
        if use_dot and block_m <= 32 and block_d > 128:
            block_n = 16  # 16 rows: fp8 (16 x 256) tiles at 32 keys spilled on sm_90 with triton 3.6 (4 warps: 12
            # bytes, 8: 16); 32 rows: 32 keys took 195 registers at 4 warps and spilled at 8 (sm_80, triton 3.9)
        # (the fp32 dot path, on FMA units with its operands in registers, spilled on sm_90 with 4 at head_dim 256)
        if use_dot:
            num_warps = 4 if (block_d > 128 and block_m <= 16 and dtype != torch.float32) else 8
        else:
            num_warps = 4 if (block_d <= 128 and dtype != torch.float32) else 8
        block_q = 1
    else:
        use_dot = True
        rows = 32 if dtype == torch.float32 else 64
        block_m = max(rows, triton.next_power_of_2(group))
        block_q = max(1, rows // group)
        if dtype == torch.float32:
            block_n, num_warps = 16, 8
        else:
            block_n, num_warps = 64 if block_d <= 128 else 32, 8
    # A tile of several tokens can hold a row that sees no key of a tile (causal diagonal, windows); one token's
    # rows all see the same keys, at least one per tile (kernels/paged_attention.py).
    return dict(BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=block_d, USE_DOT=use_dot,
                MASKED_ROWS=block_q > 1, num_warps=num_warps, num_stages=2)


def _auto_splits(num_items: int, num_kv_heads: int, kv_lens: torch.Tensor, num_sms: int) -> torch.Tensor:
    """Splits per sequence (int64, like kv_lens): choose_num_splits for each length, with num_items unsplit items."""
    programs = max(1, num_items * num_kv_heads)
    target = 2 * num_sms
    if programs >= target:
        return torch.ones_like(kv_lens)
    by_grid = min(_utils.cdiv(target, programs), _MAX_AUTO_SPLITS)
    return (kv_lens // _MIN_TOKENS_PER_SPLIT).clamp(min=1, max=by_grid)


def choose_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """How many programs share one sequence's keys (flash-decoding).

    Without splitting, decode launches batch x num_kv_heads programs. Aim for two programs per SM (so one's loads
    overlap another's math and a ragged last wave costs little): when the batch already gives that, do not split;
    otherwise split each sequence into enough pieces to get there, but never so fine that a split reads fewer than
    _MIN_TOKENS_PER_SPLIT tokens of its sequence (then the partial writes and the reduce stop being noise), and never
    more than _MAX_AUTO_SPLITS. A plan applies this per decode token, with its own length and the step's item count.
    """
    lens = torch.tensor([max_seq_len], dtype=torch.int64)
    return int(_auto_splits(batch, num_kv_heads, lens, _utils.num_sms(device))[0])


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
    _check_fp8_arch("k_cache", k_cache.dtype, k_cache.device)
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    if num_blocks < 1 or block_size < 1 or num_kv_heads < 1:
        raise ValueError(f"k_cache: num_blocks, block_size and num_kv_heads must be >= 1, got {tuple(k_cache.shape)}")
    _utils.check_head_dim("k_cache", head_dim)
    return num_blocks, block_size, num_kv_heads, head_dim


# Triton compiles float8_e4m3fn (its fp8e4nv) for compute capability 8.9 and newer only ("type fp8e4nv not supported
# in this architecture" on sm_80); float8_e5m2 (fp8e5) builds everywhere.
_E4M3_MIN_CAPABILITY = (8, 9)


def _check_fp8_arch(name: str, cache_dtype: torch.dtype, device: torch.device) -> None:
    if cache_dtype == torch.float8_e4m3fn and device.type == "cuda" and \
            torch.cuda.get_device_capability(device) < _E4M3_MIN_CAPABILITY:
        raise ValueError(f"{name}: float8_e4m3fn caches need a GPU of compute capability 8.9 or newer (Triton has no "
                         f"e4m3fn before it); use float8_e5m2 on this one")


def _check_variants(num_heads: int, q: torch.Tensor, alibi_slopes, sinks) -> None:
    """alibi_slopes and sinks: None or float32 (num_heads,) on q's device (their values: _utils.check_head_values)."""
    _utils.check_head_vector("alibi_slopes", alibi_slopes, num_heads, q)
    _utils.check_head_vector("sinks", sinks, num_heads, q)


def _check_scale_times_k_scale(scale: float, k_scale_max: float) -> None:
    """The kernels fold an fp8 cache's k_scale into the score scale (q . (k8 * k_scale) * scale computed as
    (q . k8) * (scale * k_scale), in float32, log2-based on the Triton path): a product beyond float32 range would
    turn finite scores into NaN rows. Refused, naming both."""
    if abs(scale) * math.log2(math.e) * k_scale_max > _utils.F32_MAX:
        raise ValueError(f"scale * k_scale must stay within float32 range (|scale| * k_scale * log2(e) <= 3.4e38: "
                         f"the kernels fold k_scale into the score scale); got scale {scale!r} and k_scale "
                         f"{k_scale_max!r}")


def _check_variant_values(k_cache, k_scale, v_scale, alibi_slopes, sinks, scale: float = 1.0) -> None:
    """The values of the variants' tensors (one host sync for each one given): the one-shots' checks."""
    _utils.check_kv_scale_values("k_scale", k_scale, k_cache.dtype)
    _utils.check_kv_scale_values("v_scale", v_scale, k_cache.dtype)
    if k_scale is not None and k_scale.numel():
        _check_scale_times_k_scale(scale, k_scale.max().item())
    _utils.check_head_values(alibi_slopes, sinks)


def _check_heads(q: torch.Tensor, num_kv_heads: int, head_dim: int) -> None:
    num_heads = q.shape[1]
    if q.shape[2] != head_dim:
        raise ValueError(f"q has head_dim {q.shape[2]} but the cache has head_dim {head_dim}")
    if num_heads < 1 or num_heads % num_kv_heads != 0:
        raise ValueError(f"q has {num_heads} heads, which must be a positive multiple of the cache's num_kv_heads "
                         f"({num_kv_heads})")


def _check_q_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, ...]:
    """The one-shots' q (num_rows, num_heads, head_dim) against the cache pair; returns the cache's shape."""
    _utils.check_tensor("q", q, ndim=3, dtypes=_utils.FLOAT_DTYPES)
    num_blocks, block_size, num_kv_heads, head_dim = _check_cache_pair("q", q, k_cache, v_cache)
    _check_heads(q, num_kv_heads, head_dim)
    return num_blocks, block_size, num_kv_heads, head_dim


def _check_one_shot_op(q, k_cache, v_cache, scale, softcap, window_left, window_right, *variants) -> None:
    """The one-shot ops' arguments that their public functions check, as the ops receive them (for a direct
    torch.ops.llmkern call): q and the caches, scale, softcap, window, the variants' tensors (no sync)."""
    head_dim = _check_q_cache(q, k_cache, v_cache)[3]
    _utils.check_softcap(softcap, _utils.check_scale(scale, head_dim))
    _utils.check_window((window_left, window_right))
    _check_variant_args(q, k_cache, *variants)


def _check_index(name: str, t: torch.Tensor, ndim: int, dtype: torch.dtype, like: torch.Tensor,
                 like_name: str = "q") -> None:
    _utils.check_tensor(name, t, ndim=ndim, dtypes=(dtype,))
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}; they must share a device")


def _check_int(name: str, value, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _cache_strides(c: torch.Tensor) -> tuple[int, int, int, int]:
    return c.stride(0), c.stride(1), c.stride(2), c.stride(3)


# ---------------------------------------------------------------------------------------------------- tables
@dataclass
class _HostTables:
    """One step's metadata on the host: int32 CPU tensors, contiguous."""
    block_tables: torch.Tensor   # (batch, width)
    seq_lens: torch.Tensor       # (batch,)
    cu_seqlens_q: torch.Tensor   # (batch + 1,)
    decode: bool                 # cu_seqlens_q was not given: one query token per sequence


def _read_tables(block_tables, seq_lens, cu_seqlens_q) -> _HostTables:
    """Check the metadata tensors' types and shapes, and bring their values to the host: nothing to copy when they
    are CPU tensors, else one device-to-host copy of all three (the plan's one sync)."""
    _utils.check_tensor("block_tables", block_tables, ndim=2, dtypes=(_INDEX_DTYPE,))
    _check_index("seq_lens", seq_lens, 1, _INDEX_DTYPE, block_tables, "block_tables")
    batch = seq_lens.shape[0]
    if block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must have one row per sequence of seq_lens ({batch}), got "
                         f"{tuple(block_tables.shape)}")
    parts = [block_tables.reshape(-1), seq_lens]
    if cu_seqlens_q is not None:
        _check_index("cu_seqlens_q", cu_seqlens_q, 1, _INDEX_DTYPE, block_tables, "block_tables")
        if cu_seqlens_q.shape[0] != batch + 1:
            raise ValueError(f"cu_seqlens_q must have batch + 1 = {batch + 1} entries (seq_lens has {batch}), got "
                             f"{tuple(cu_seqlens_q.shape)}")
        parts.append(cu_seqlens_q)
    flat = torch.cat(parts).cpu() if block_tables.device.type != "cpu" else torch.cat(parts)
    n = block_tables.numel()
    bt = flat[:n].view(block_tables.shape)
    lens = flat[n:n + batch]
    cu = flat[n + batch:] if cu_seqlens_q is not None else torch.arange(batch + 1, dtype=_INDEX_DTYPE)
    return _HostTables(bt, lens, cu, cu_seqlens_q is None)


def _validate_tables(t: _HostTables, num_blocks: int, block_size: int, total_q: Optional[int] = None) -> None:
    """ValueError for metadata the kernels cannot run safely: negative lengths (below 1 in decode), query offsets
    that do not start at 0 (or end at total_q) or decrease, more new tokens than cached tokens, a sequence longer
    than its block table, a used table entry outside the cache. Only the entries a sequence uses (the first
    cdiv(seq_len, block_size) of its row) are checked, so tables may be padded with anything (-1, 0, stale ids)."""
    lens, cu, bt = t.seq_lens, t.cu_seqlens_q, t.block_tables
    batch = lens.shape[0]
    if batch == 0:
        return
    min_len = 1 if t.decode else 0
    lo, hi = int(lens.min()), int(lens.max())
    if lo < min_len:
        raise ValueError(f"seq_lens must be >= {min_len}, got a minimum of {lo}")
    if int(cu[0]) != 0 or (total_q is not None and int(cu[-1]) != total_q):
        raise ValueError(f"cu_seqlens_q must start at 0 and end at total_q ({total_q}), got {int(cu[0])} ... "
                         f"{int(cu[-1])}" if total_q is not None else
                         f"cu_seqlens_q must start at 0, got {int(cu[0])}")
    q_lens = cu[1:] - cu[:-1]
    if int(q_lens.min()) < 0:
        raise ValueError("cu_seqlens_q must be non-decreasing")
    longer = (q_lens > lens).nonzero()
    if longer.numel():
        b = int(longer[0, 0])
        raise ValueError(f"seq_lens[{b}] = {int(lens[b])} is shorter than that sequence's {int(q_lens[b])} new "
                         f"tokens (seq_lens counts the cached prefix plus the new tokens)")
    capacity = bt.shape[1] * block_size
    if hi > capacity:
        raise ValueError(f"seq_lens: a sequence of {hi} tokens does not fit its block table of {bt.shape[1]} "
                         f"blocks x block_size {block_size} = {capacity} tokens")
    used = torch.arange(bt.shape[1])[None, :] < ((lens.to(torch.int64) + block_size - 1) // block_size)[:, None]
    ids = bt[used]
    if ids.numel():
        bmin, bmax = int(ids.min()), int(ids.max())
        if bmin < 0 or bmax >= num_blocks:
            raise ValueError(f"block_tables: entries used by the sequences must lie in [0, {num_blocks}) "
                             f"(num_blocks of the cache), found values in [{bmin}, {bmax}]")


def _schedule(t: _HostTables, block_q: int, num_kv_heads: int, num_sms: int,
              num_splits: Optional[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The step's work list: (work int32 (items, WORK_FIELDS), reduce int32 (rows, REDUCE_FIELDS), partial slots).

    Each sequence's query tokens in tiles of block_q, one item per tile. A decode token (one query token) may be
    split over several items (split-KV): num_splits when given, else `_auto_splits` with the step's tile count; its
    items write partial slots, consecutive per token, and a reduce row merges them. Items are ordered by the keys
    they read, most first, so the longest start first and short ones fill the tail of the launch.
    """
    lens = t.seq_lens.to(torch.int64)
    cu = t.cu_seqlens_q.to(torch.int64)
    q_lens = cu[1:] - cu[:-1]
    tiles = (q_lens + block_q - 1) // block_q
    decode = q_lens == 1
    if num_splits is None:
        splits = _auto_splits(int(tiles.sum()), num_kv_heads, lens, num_sms)
    else:
        splits = torch.full_like(lens, num_splits)
    splits = torch.where(decode, splits, torch.ones_like(splits))
    per_seq = torch.where(decode, splits, tiles)
    n = int(per_seq.sum())
    b = torch.repeat_interleave(torch.arange(lens.shape[0]), per_seq)
    local = torch.arange(n) - (torch.cumsum(per_seq, 0) - per_seq)[b]
    is_split = splits > 1
    slot_count = torch.where(is_split, splits, torch.zeros_like(splits))
    slot_base = torch.cumsum(slot_count, 0) - slot_count
    split = torch.where(decode[b], local, torch.zeros_like(local))
    i0 = torch.where(decode[b], torch.zeros_like(local), local * block_q)
    slot = torch.where(is_split[b], slot_base[b] + split, torch.full_like(split, -1))
    work = torch.stack([b, i0, split, splits[b], slot], 1)
    keys = torch.where(decode[b], lens[b] // splits[b], lens[b] - q_lens[b] + torch.minimum(i0 + block_q, q_lens[b]))
    work = work[torch.argsort(keys, descending=True, stable=True)]
    rows = is_split.nonzero().flatten()
    reduce = torch.stack([cu[rows], slot_base[rows], splits[rows]], 1)
    return work.to(torch.int32), reduce.to(torch.int32), int(slot_count.sum())


def _slot_mapping(t: _HostTables, block_size: int) -> torch.Tensor:
    """int64 (total_q,): the cache slot of every new token, block_tables[b, p // block_size] * block_size +
    p % block_size at its position p = seq_len - q_len + i (vLLM's slot_mapping)."""
    cu = t.cu_seqlens_q.to(torch.int64)
    q_lens = cu[1:] - cu[:-1]
    b = torch.repeat_interleave(torch.arange(q_lens.shape[0]), q_lens)
    pos = torch.arange(int(cu[-1])) - cu[b] + (t.seq_lens.to(torch.int64) - q_lens)[b]
    blocks = t.block_tables[b, pos // block_size].to(torch.int64)
    return blocks * block_size + pos % block_size


@dataclass(frozen=True)
class _Layout:
    """Where each array lives in a plan's int32 buffer: the schedule (counts, reduce rows, work items), then
    seq_lens, cu_seqlens_q and block_tables, each at its capacity."""
    max_batch: int
    max_items: int
    width: int

    @property
    def off_work(self) -> int:
        return 2 + _REDUCE_FIELDS * self.max_batch

    @property
    def off_seq_lens(self) -> int:
        return self.off_work + _WORK_FIELDS * self.max_items

    @property
    def off_cu(self) -> int:
        return self.off_seq_lens + self.max_batch

    @property
    def off_bt(self) -> int:
        return self.off_cu + self.max_batch + 1

    @property
    def size(self) -> int:
        return self.off_bt + self.max_batch * self.width


# ---------------------------------------------------------------------------------------------------- the plan
class PagedAttentionPlan:
    """Paged attention for one step of a batch, planned once and run per layer (FlashInfer's plan/run wrappers).

    PagedAttentionPlan(block_tables, seq_lens, cu_seqlens_q=None, *, num_heads, num_kv_heads, head_dim, num_blocks,
                       block_size, dtype, kv_dtype=None, device=None, num_splits=None, max_batch_size=None,
                       max_num_tokens=None, max_blocks_per_seq=None, cuda_graph=False)

    block_tables int32 (batch, width): sequence b's blocks, token t in block block_tables[b, t // block_size] at
      offset t % block_size; entries past a sequence's length are never read (any value);
    seq_lens int32 (batch,): each sequence's cached length after this step's tokens (its K/V already written, or
      written by `paged_kv_write` before `run`), prefix plus new tokens;
    cu_seqlens_q int32 (batch + 1,): sequence b's new tokens are query rows cu_seqlens_q[b] : cu_seqlens_q[b + 1]
      (0 new tokens allowed), the newest of its seq_lens[b] tokens (bottom-right aligned, as FlashAttention's kvcache
      API): prompt chunks over a cached prefix (chunked prefill, prefix caching), decode tokens (one each) and
      speculative tokens, in any mixture. None: one new token per sequence (decode), seq_lens >= 1.
    The three may be CPU tensors (no sync at all) or on the device (one device-to-host copy); any strides.
    num_heads, num_kv_heads, head_dim, num_blocks, block_size, dtype: the q and caches `run` will get (num_heads a
      multiple of num_kv_heads: GQA/MQA). kv_dtype (FlashInfer's kv_data_type): the caches' dtype, `dtype` (the
      default) or an fp8 cache's float8_e4m3fn / float8_e5m2 (e4m3fn needs compute capability 8.9+ on a GPU).
      device: the plan's buffers' device (default: block_tables').
    num_splits: programs per decode token (split-KV) in [1, 256]; None chooses per token from its length, the step's
      size and the device's SM count (`choose_num_splits`). Tokens of longer queries are never split.
    max_batch_size, max_num_tokens, max_blocks_per_seq: the capacities the buffers are sized for (default: this
      step's, at least 1: an empty step, batch 0, is planned and runs as a no-op); `update` refuses a step beyond
      them.
    cuda_graph: fixed launch sizes for CUDA-graph capture. The grid is sized for the capacities (programs past the
      step's work return at once), q and out have max_num_tokens rows (rows past num_tokens are padding: not read,
      not written), slot_mapping covers them with -1, and the tile kind chosen at construction (decode tiles when
      every sequence has at most one new token) stays: an update needing the other kind raises ValueError.

    Raises TypeError/ValueError naming the argument for a wrong type, shape or device, and, at plan time, for values
    the kernels cannot run safely: negative lengths (below 1 without cu_seqlens_q), cu_seqlens_q not starting at 0 or
    decreasing, more new tokens than seq_lens, a sequence longer than its table, a used table entry outside
    [0, num_blocks), or a step beyond the capacities.

    Per step: `update(block_tables, seq_lens, cu_seqlens_q=None)` with the next step's tables (same rules, same
    buffers). Per layer: `run(q, k_cache, v_cache, ...)`. `slot_mapping` (int64) holds the step's cache slots for
    `llmkern.paged_kv_write`. Attributes: batch_size, num_tokens and the constructor's arguments.
    """

    def __init__(self, block_tables: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor] = None,
                 *, num_heads: int, num_kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, kv_dtype: Optional[torch.dtype] = None,
                 device: torch.device | str | None = None, num_splits: Optional[int] = None,
                 max_batch_size: Optional[int] = None, max_num_tokens: Optional[int] = None,
                 max_blocks_per_seq: Optional[int] = None, cuda_graph: bool = False):
        for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("num_blocks", num_blocks),
                            ("block_size", block_size), ("head_dim", head_dim)):
            _check_int(name, value, 1)
        _utils.check_head_dim("head_dim", head_dim)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if dtype not in _utils.FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of float16, bfloat16, float32, got {dtype}")
        kv_dtype = dtype if kv_dtype is None else kv_dtype
        if kv_dtype != dtype and kv_dtype not in _utils.FP8_DTYPES:
            raise TypeError(f"kv_dtype must be dtype ({dtype}) or float8_e4m3fn / float8_e5m2, got {kv_dtype}")
        if num_splits is not None:
            _check_int("num_splits", num_splits, 1)
            if num_splits > _MAX_SPLITS:
                raise ValueError(f"num_splits must be in [1, {_MAX_SPLITS}] (or None to choose), got {num_splits}")
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be a bool, got {cuda_graph!r}")
        tables = _read_tables(block_tables, seq_lens, cu_seqlens_q)
        batch, tokens = tables.seq_lens.shape[0], int(tables.cu_seqlens_q[-1])
        self.max_batch_size = _check_int("max_batch_size", max(batch, 1) if max_batch_size is None
                                         else max_batch_size, 1)
        self.max_num_tokens = _check_int("max_num_tokens", max(tokens, 1) if max_num_tokens is None
                                         else max_num_tokens, 1)
        width = max(1, tables.block_tables.shape[1])
        self.max_blocks_per_seq = _check_int("max_blocks_per_seq", width if max_blocks_per_seq is None
                                             else max_blocks_per_seq, 1)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.num_blocks, self.block_size, self.dtype, self.kv_dtype = num_blocks, block_size, dtype, kv_dtype
        self.device = torch.device(device) if device is not None else block_tables.device
        _check_fp8_arch("kv_dtype", kv_dtype, self.device)
        self._const_scales: dict[float, torch.Tensor] = {}   # a number k_scale / v_scale as the kernel's tensor
        self.num_splits, self.cuda_graph = num_splits, cuda_graph
        self._num_sms = _utils.num_sms(self.device)

        # Partial slots: a forced count splits every decode token; the automatic one splits only while the step has
        # fewer than 2 x SMs programs, which bounds its slots by 2 x cdiv(2 x SMs, num_kv_heads) (_schedule).
        if num_splits is not None:
            self._max_slots = self.max_batch_size * num_splits
        else:
            self._max_slots = min(self.max_batch_size * _MAX_AUTO_SPLITS,
                                  2 * _utils.cdiv(2 * self._num_sms, num_kv_heads))
        # Items: one per tile (at most one per token) plus one per extra split.
        self._layout = _Layout(self.max_batch_size, self.max_num_tokens + self._max_slots, self.max_blocks_per_seq)
        lay = self._layout
        self._data = torch.zeros(lay.size, dtype=torch.int32, device=self.device)
        self._schedule = self._data[:lay.off_seq_lens]
        self._seq_lens = self._data[lay.off_seq_lens:lay.off_cu]
        self._cu_seqlens_q = self._data[lay.off_cu:lay.off_bt]
        self._block_tables = self._data[lay.off_bt:].view(lay.max_batch, lay.width)
        self._slots = torch.full((self.max_num_tokens,), -1, dtype=_SLOT_DTYPE, device=self.device)
        # Zeroed once so a slot never written reads as a finite 0 (the workspace is only read where written).
        self._part_o = torch.zeros(max(1, self._max_slots), num_heads, head_dim, dtype=torch.float32,
                                   device=self.device)
        self._part_lse = torch.zeros(max(1, self._max_slots), num_heads, dtype=torch.float32, device=self.device)
        self._decode_tiles: Optional[bool] = None
        self._update(tables)

    # ------------------------------------------------------------------------------------------------ per step
    def update(self, block_tables: torch.Tensor, seq_lens: torch.Tensor,
               cu_seqlens_q: Optional[torch.Tensor] = None) -> None:
        """Plan the next step into the same buffers (arguments and errors as the constructor's; nothing changes when
        it raises). A CUDA graph captured around `run` replays the new step."""
        self._update(_read_tables(block_tables, seq_lens, cu_seqlens_q))

    def _update(self, t: _HostTables) -> None:
        _validate_tables(t, self.num_blocks, self.block_size)
        batch, tokens = t.seq_lens.shape[0], int(t.cu_seqlens_q[-1])
        lay = self._layout
        if batch > lay.max_batch or tokens > self.max_num_tokens:
            raise ValueError(f"seq_lens / cu_seqlens_q: this step has {batch} sequences and {tokens} new tokens, more "
                             f"than the plan's capacity (max_batch_size {lay.max_batch}, max_num_tokens "
                             f"{self.max_num_tokens})")
        need = int(t.seq_lens.to(torch.int64).add(self.block_size - 1).div(self.block_size, rounding_mode="floor")
                   .max()) if batch else 0
        if need > lay.width:
            raise ValueError(f"block_tables: a sequence needs {need} blocks, more than max_blocks_per_seq "
                             f"({lay.width})")
        q_lens = t.cu_seqlens_q[1:] - t.cu_seqlens_q[:-1]
        decode_tiles = batch == 0 or int(q_lens.max()) <= 1
        if self.cuda_graph and self._decode_tiles is not None and decode_tiles != self._decode_tiles:
            if self._decode_tiles:
                raise ValueError("cu_seqlens_q: this cuda_graph plan runs decode tiles (one new token per sequence), "
                                 "set at construction; a step with longer queries needs another plan")
            decode_tiles = False    # prefill tiles serve decode steps too
        cfg = _tile_config(decode_tiles, self.num_heads // self.num_kv_heads, self.head_dim, self.dtype)
        work, reduce, slots_used = _schedule(t, cfg["BLOCK_Q"], self.num_kv_heads, self._num_sms, self.num_splits)
        assert slots_used <= self._max_slots and work.shape[0] <= lay.max_items, "split-KV capacity bound broken"

        stage = torch.zeros(lay.off_bt + batch * lay.width, dtype=torch.int32)
        stage[0], stage[1] = work.shape[0], reduce.shape[0]
        stage[2:2 + reduce.numel()] = reduce.flatten()
        stage[lay.off_work:lay.off_work + work.numel()] = work.flatten()
        stage[lay.off_seq_lens:lay.off_seq_lens + batch] = t.seq_lens
        stage[lay.off_cu:lay.off_cu + batch + 1] = t.cu_seqlens_q
        cols = min(t.block_tables.shape[1], lay.width)
        stage[lay.off_bt:].view(batch, lay.width)[:, :cols] = t.block_tables[:, :cols]
        slots = torch.full((self.max_num_tokens if self.cuda_graph else tokens,), -1, dtype=_SLOT_DTYPE)
        slots[:tokens] = _slot_mapping(t, self.block_size)
        _utils.copy_async(self._data[:stage.numel()], stage)
        _utils.copy_async(self._slots[:slots.numel()], slots)

        self.batch_size, self.num_tokens, self._decode_tiles = batch, tokens, decode_tiles
        if self.cuda_graph:   # launch sizes for any step within the capacities
            bound = self.max_num_tokens if not decode_tiles else min(self.max_num_tokens, lay.max_batch)
            tiles = min(bound, _utils.cdiv(self.max_num_tokens, cfg["BLOCK_Q"]) + lay.max_batch)
            self._grid_items = tiles + self._max_slots
            self._grid_reduce = min(lay.max_batch, self._max_slots)
        else:
            self._grid_items, self._grid_reduce = work.shape[0], reduce.shape[0]

    @property
    def slot_mapping(self) -> torch.Tensor:
        """int64 (num_tokens,) on the plan's device (cuda_graph: (max_num_tokens,), -1 past num_tokens): the cache
        slot of each new token, computed from the validated tables, for `llmkern.paged_kv_write`."""
        return self._slots if self.cuda_graph else self._slots[:self.num_tokens]

    # ------------------------------------------------------------------------------------------------ per layer
    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, causal: bool = True,
            scale: float | None = None, softcap: float | None = None, window: tuple[int, int] = (-1, -1),
            k_scale: float | torch.Tensor | None = None, v_scale: float | torch.Tensor | None = None,
            alibi_slopes: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of the step's new tokens over their cached sequences, for one layer.

        q (num_tokens, num_heads, head_dim) (cuda_graph: max_num_tokens rows) packs the sequences' new tokens as
        cu_seqlens_q said; k_cache, v_cache (num_blocks, block_size, num_kv_heads, head_dim) hold every token of the
        step (write them first: `paged_kv_write(k, v, k_cache, v_cache, plan.slot_mapping)`). causal: query i of a
        sequence sees keys up to its own position (window_right = 0); scale (default head_dim ** -0.5), softcap
        (Gemma 2's tanh cap) and window=(left, right) as in llmkern.attention: the query at position p sees keys in
        [p - left, p + right] (-1: unbounded). out: written in place (any strides; else a new tensor is returned).
        Returns out, (rows of q, num_heads, head_dim) in q's dtype.
        The variants, as in the one-shots (paged_decode_attention): k_scale, v_scale, required by an fp8 cache
        (kv_dtype) and refused otherwise, a float or a float32 (num_kv_heads,) tensor, the scales the cache was
        written with (the value read is fp8 * scale; dequantized in registers, MMAs in q's dtype); alibi_slopes
        float32 (num_heads,), ALiBi's bias -slope * |i - j| at the causal/window positions; sinks float32
        (num_heads,), gpt-oss's per-head logits that join the softmax denominator with no value.

        Only what needs no sync is checked, before any launch: TypeError/ValueError naming the argument when q,
        the caches or out do not match the plan (shape, dtype, device), out shares memory with q, a cache,
        scale/softcap/window/causal or a number k_scale / v_scale are invalid (scale * k_scale beyond float32 range
        included: the kernels fold k_scale into the score scale), or a variant tensor has the wrong dtype, shape or
        device. The values of tensor scales, slopes and sinks are not read here (that needs a sync per layer): the
        one-shots and paged_kv_write check them; a NaN there (or a tensor k_scale whose product with scale
        overflows) gives NaN rows, nothing worse.
        No device-to-host transfer, no device-property query; no allocation when out is given and q and the caches
        have a contiguous last dim (one that is not is copied) and scales are tensors or numbers seen before (each
        distinct number becomes a (num_kv_heads,) tensor once, kept by the plan).
        """
        rows = self.max_num_tokens if self.cuda_graph else self.num_tokens
        want_q = (rows, self.num_heads, self.head_dim)
        want_cache = (self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        given = [("q", q, want_q), ("k_cache", k_cache, want_cache), ("v_cache", v_cache, want_cache)]
        for name, t, shape in given + ([] if out is None else [("out", out, want_q)]):
            _utils.check_tensor(name, t, ndim=len(shape))
            want = self.kv_dtype if name in ("k_cache", "v_cache") else self.dtype
            if t.dtype != want:
                raise TypeError(f"{name} has dtype {t.dtype}, the plan was made for {want}")
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device}, the plan's buffers on {self.device}")
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape} for this plan, got {tuple(t.shape)}")
        if out is not None:
            _utils.check_writable("out", out)
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {causal!r}")
        scale = _utils.check_scale(scale, self.head_dim)
        softcap = _utils.check_softcap(softcap, scale)
        left, right = _utils.check_window(window)
        number_k_scale = k_scale if isinstance(k_scale, (int, float)) else None
        k_scale, v_scale = self._kv_scale("k_scale", k_scale), self._kv_scale("v_scale", v_scale)
        if number_k_scale is not None:
            _check_scale_times_k_scale(scale, float(number_k_scale))
        _check_variants(self.num_heads, q, alibi_slopes, sinks)
        q = _utils.last_dim_contiguous("q", q)
        k_cache = _utils.last_dim_contiguous("k_cache", k_cache)
        v_cache = _utils.last_dim_contiguous("v_cache", v_cache)
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        _paged_attention_op(*self._op_args(q, k_cache, v_cache, out, scale, softcap, left, 0 if causal else right,
                                           k_scale, v_scale, alibi_slopes, sinks))
        return out

    def _kv_scale(self, name: str, scale) -> torch.Tensor | None:
        """k_scale / v_scale as the kernel's float32 (num_kv_heads,) tensor (_utils.check_kv_scale's rules); a
        number's tensor is made once per distinct value and kept."""
        if isinstance(scale, torch.Tensor) or scale is None:
            return _utils.check_kv_scale(name, scale, self.kv_dtype, self.num_kv_heads, self._part_lse)
        key = scale if isinstance(scale, (int, float)) and not isinstance(scale, bool) else None
        if key is None or key not in self._const_scales:
            t = _utils.check_kv_scale(name, scale, self.kv_dtype, self.num_kv_heads, self._part_lse)
            if key is None:
                return t
            self._const_scales[key] = t
        return self._const_scales[key]

    def _op_args(self, q, k_cache, v_cache, out, scale, softcap, window_left, window_right, k_scale, v_scale,
                 alibi_slopes, sinks) -> tuple:
        """The llmkern::paged_attention arguments of one run: the tensors, this step's sizes and the options."""
        return (q, k_cache, v_cache, out, self._block_tables, self._seq_lens, self._cu_seqlens_q, self._schedule,
                self._part_o, self._part_lse, self.batch_size, self.num_tokens, self._grid_items, self._grid_reduce,
                self._decode_tiles, scale, softcap, window_left, window_right, k_scale, v_scale, alibi_slopes, sinks)

    def __repr__(self) -> str:
        return (f"PagedAttentionPlan(batch_size={self.batch_size}, num_tokens={self.num_tokens}, "
                f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"block_size={self.block_size}, dtype={self.dtype}, kv_dtype={self.kv_dtype}, device={self.device}, "
                f"decode_tiles={self._decode_tiles}, cuda_graph={self.cuda_graph})")


# ---------------------------------------------------------------------------------------------------- the op
def _check_outputs(q, k_cache, v_cache, out, block_tables, seq_lens, cu_seqlens_q, schedule, part_o, part_lse,
                   *sizes_and_options) -> None:
    """What the op writes must not overlap itself (no sync: strides only), nor out any tensor it reads: q, the
    caches, the scales, slopes and sinks (data pointers; a program's stores into q would change the rows another
    program has yet to load, as an out one row off q did on both CPU backends). The plan validated everything
    else."""
    for name, t in (("out", out), ("part_o", part_o), ("part_lse", part_lse)):
        _utils.check_writable(name, t)
    k_scale, v_scale, alibi_slopes, sinks = sizes_and_options[-4:]
    sources = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "k_scale": k_scale, "v_scale": v_scale,
               "alibi_slopes": alibi_slopes, "sinks": sinks}
    _utils.check_sources_disjoint({n: t for n, t in sources.items() if t is not None}, {"out": out})


def _paged_attention_reference(q, k_cache, v_cache, out, block_tables, seq_lens, cu_seqlens_q, schedule, part_o,
                               part_lse, batch_size, num_tokens, grid_items, grid_reduce, decode_tiles, scale,
                               softcap, window_left, window_right, k_scale, v_scale, alibi_slopes, sinks) -> None:
    if num_tokens == 0:
        return
    b = batch_size
    out[:num_tokens] = reference.paged_prefill_attention(
        q[:num_tokens], k_cache, v_cache, block_tables[:b], cu_seqlens_q[:b + 1], seq_lens[:b], causal=False,
        scale=scale, softcap=softcap, window=(window_left, window_right), alibi_slopes=alibi_slopes, sinks=sinks,
        k_scale=k_scale, v_scale=v_scale)


def _paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     schedule: torch.Tensor, part_o: torch.Tensor, part_lse: torch.Tensor, batch_size: int,
                     num_tokens: int, grid_items: int, grid_reduce: int, decode_tiles: bool, scale: float,
                     softcap: Optional[float], window_left: int, window_right: int, k_scale: Optional[torch.Tensor],
                     v_scale: Optional[torch.Tensor], alibi_slopes: Optional[torch.Tensor],
                     sinks: Optional[torch.Tensor]) -> None:
    """The Triton implementation of llmkern::paged_attention: the attention kernel over the plan's work list, then
    the split-KV merge. Sizes are the plan's (host ints): nothing here reads a tensor's values. k_scale, v_scale:
    given for an fp8 cache (and only then); alibi_slopes, sinks: the optional variants. An absent one's pointer is
    part_lse's, never read (its constexpr is off)."""
    if grid_items == 0:
        return
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    cfg = _tile_config(decode_tiles, group, head_dim, q.dtype)
    longest = block_tables.shape[1] * block_size    # no sequence outgrows its table (the plan checked)
    window_left, window_right = (_utils.unbounded_beyond(w, longest) for w in (window_left, window_right))
    has_softcap = softcap is not None
    kv_fp8 = k_scale is not None
    unused = part_lse
    _utils.launch(
        kernels.paged_attention_kernel, (grid_items, num_kv_heads),
        q, k_cache, v_cache, out, block_tables, seq_lens, cu_seqlens_q, schedule, part_o, part_lse,
        k_scale if kv_fp8 else unused, v_scale if kv_fp8 else unused,
        unused if alibi_slopes is None else alibi_slopes, unused if sinks is None else sinks,
        2 + _REDUCE_FIELDS * seq_lens.shape[0],
        q.stride(0), q.stride(1), q.stride(2),
        *_cache_strides(k_cache), *_cache_strides(v_cache),
        block_tables.stride(0), block_tables.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        part_o.stride(0), part_o.stride(1), part_o.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        scale * math.log2(math.e), softcap if has_softcap else 1.0, window_left, window_right, group, block_size,
        HEAD_DIM=head_dim, HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, HAS_SOFTCAP=has_softcap,
        KV_FP8=kv_fp8, HAS_ALIBI=alibi_slopes is not None, HAS_SINKS=sinks is not None,
        INTERPRET=_utils.INTERPRET, **cfg,
    )
    if grid_reduce:
        _merge_splits(part_o, part_lse, out, schedule, grid_reduce, sinks)


def _merge_splits(part_o: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor, schedule: torch.Tensor,
                  grid_reduce: int, sinks: torch.Tensor | None = None) -> None:
    """Split-KV merge (paged_attention_reduce_kernel): for each reduce row of schedule (int32: schedule[1] rows of
    (output row, first slot, num_splits) from schedule[2]), out[row] = its slots' partial outputs of part_o
    (slots, num_heads, head_dim) fp32, weighted by their base-2 log-sum-exps in part_lse (slots, num_heads); sinks
    (float32 (num_heads,), or None) join each row's softmax denominator once, here. grid_reduce >= schedule[1]
    programs per head. (Shared with llmkern.mla.)"""
    head_dim = part_o.shape[2]
    _utils.launch(
        kernels.paged_attention_reduce_kernel, (grid_reduce, part_o.shape[1]),
        part_o, part_lse, out, schedule, part_lse if sinks is None else sinks, 2,
        part_o.stride(0), part_o.stride(1), part_o.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), HAS_SINKS=sinks is not None, num_warps=4,
    )


_paged_attention_op = _dispatch.custom_op(
    "paged_attention", mutates_args=("out", "part_o", "part_lse"), reference=_paged_attention_reference,
    check=_check_outputs,
    contiguous=("seq_lens", "cu_seqlens_q", "schedule", "k_scale", "v_scale", "alibi_slopes", "sinks"))(_paged_attention)


@_paged_attention_op.register_fake
def _(q, k_cache, v_cache, out, block_tables, seq_lens, cu_seqlens_q, schedule, part_o, part_lse, batch_size,
      num_tokens, grid_items, grid_reduce, decode_tiles, scale, softcap, window_left, window_right, k_scale, v_scale,
      alibi_slopes, sinks) -> None:
    return None


def _plan_and_run(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, num_splits, scale, softcap,
                  window_left, window_right, k_scale, v_scale, alibi_slopes, sinks) -> torch.Tensor:
    """The one-shots' Triton path: a plan for this call, then its run's launch."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[0] == 0:
        return out
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    plan = PagedAttentionPlan(block_tables, seq_lens, cu_seqlens_q, num_heads=q.shape[1], num_kv_heads=num_kv_heads,
                              head_dim=head_dim, num_blocks=num_blocks, block_size=block_size, dtype=q.dtype,
                              kv_dtype=k_cache.dtype, device=q.device, num_splits=num_splits)
    _paged_attention(*plan._op_args(q, k_cache, v_cache, out, scale, softcap, window_left, window_right, k_scale,
                                    v_scale, alibi_slopes, sinks))
    return out


# ---------------------------------------------------------------------------------------------------- kv write
def _check_kv_write_args(k, v, k_cache, v_cache, slot_mapping) -> int:
    """paged_kv_write()'s tensors (no sync); returns num_kv_heads."""
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
    return num_kv_heads


@_dispatch.signature_checked
def _check_kv_write_op(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale) -> None:
    num_kv_heads = _check_kv_write_args(k, v, k_cache, v_cache, slot_mapping)
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        _utils.check_kv_scale(name, scale, k_cache.dtype, num_kv_heads, k_cache)
    _utils.check_writable("k_cache", k_cache)
    _utils.check_writable("v_cache", v_cache)


def _check_kv_write(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale) -> None:
    """llmkern::paged_kv_write's check: paged_kv_write()'s argument checks as the op receives them and caches that
    can be written (no element at two indices: strides only), once per signature, no sync; then an fp8 cache's
    scale tensors' values (one host sync each). Slots need no check: the kernel writes only those inside the
    cache. The caches must not share memory (v would overwrite k), nor anything the kernel reads with them (k, v,
    slot_mapping, the scales: a store would change what a later load reads): decided from their data pointers, so
    per call."""
    _check_kv_write_op(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    _utils.check_disjoint("k_cache", k_cache, "v_cache", v_cache)
    sources = {"k": k, "v": v, "slot_mapping": slot_mapping, "k_scale": k_scale, "v_scale": v_scale}
    _utils.check_sources_disjoint({n: t for n, t in sources.items() if t is not None},
                                  {"k_cache": k_cache, "v_cache": v_cache})
    _utils.check_kv_scale_values("k_scale", k_scale, k_cache.dtype)
    _utils.check_kv_scale_values("v_scale", v_scale, k_cache.dtype)


@_dispatch.custom_op("paged_kv_write", mutates_args=("k_cache", "v_cache"), reference=reference.paged_kv_write,
                     check=_check_kv_write, contiguous=("slot_mapping", "k_scale", "v_scale"))
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
        num_kv_heads, block_size, num_blocks * block_size,
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

    Slot s is block s // block_size, offset s % block_size. Only slots in [0, num_blocks * block_size) are written:
    -1 (vLLM's padding slot) and any other slot outside the cache leave the cache untouched for that token, without
    an error (no sync: the values are never read on the host). Valid slots come from the block manager
    (`PagedKVCache.append`) or a plan (`PagedAttentionPlan.slot_mapping`), which check the tables they come from.
    A 16-bit or fp32 cache gets bit-exact copies: k, v must have its dtype, and k_scale / v_scale must be None. An fp8
    cache (float8_e4m3fn or float8_e5m2; k, v in any float dtype) stores round_to_fp8(x / scale), to nearest even,
    saturated to the format's largest value (+-448 for e4m3fn, +-57344 for e5m2) as vLLM does; its scales are
    required: k_scale, v_scale a float or a float32 (num_kv_heads,) tensor (one scale per KV head; a finite value in
    [2**-126, 3.4e38 / fp8 max], a tensor's values checked with one host sync). Slots must be distinct (two tokens in
    one slot leave either one there). The caches are written through their strides (any view that does not overlap
    itself: an expanded cache raises ValueError) and must share no element (ValueError; FlashInfer's joint
    (num_blocks, 2, block_size, heads, head_dim) cache's [:, 0] and [:, 1] share none); k, v, slot_mapping and the
    scales must share no element with either cache (ValueError: clone() a view of the cache first); slot_mapping and
    the scales may be any view, read as their values.
    """
    num_kv_heads = _check_kv_write_args(k, v, k_cache, v_cache, slot_mapping)
    k_scale = _utils.check_kv_scale("k_scale", k_scale, k_cache.dtype, num_kv_heads, k_cache)
    v_scale = _utils.check_kv_scale("v_scale", v_scale, k_cache.dtype, num_kv_heads, k_cache)
    k = _utils.last_dim_contiguous("k", k)
    v = _utils.last_dim_contiguous("v", v)
    _paged_kv_write_op(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


# ---------------------------------------------------------------------------------------------------- decode
_VARIANT_ARGS = ("k_scale", "v_scale", "alibi_slopes", "sinks")   # the one-shot ops' last arguments, read contiguous


@_dispatch.signature_checked
def _check_decode_op(q, k_cache, v_cache, block_tables, seq_lens, scale, softcap, window_left, window_right,
                     num_splits, *variants) -> None:
    _check_one_shot_op(q, k_cache, v_cache, scale, softcap, window_left, window_right, *variants)
    _check_decode_args("q", q, block_tables, seq_lens)
    _check_num_splits(num_splits or None)


def _check_decode_values(q, k_cache, v_cache, block_tables, seq_lens, scale, softcap, window_left, window_right,
                         num_splits, *variants) -> None:
    """paged_decode_attention()'s argument checks as the op receives them (once per signature, no sync), then lengths
    and block ids (one host sync) and the variants' values (one sync each), before any implementation runs
    (llmkern._dispatch)."""
    _check_decode_op(q, k_cache, v_cache, block_tables, seq_lens, scale, softcap, window_left, window_right,
                     num_splits, *variants)
    _validate_tables(_read_tables(block_tables, seq_lens, None), k_cache.shape[0], k_cache.shape[1])
    _check_variant_values(k_cache, *variants, scale=scale)


def _paged_decode_reference(q, k_cache, v_cache, block_tables, seq_lens, scale, softcap, window_left, window_right,
                            num_splits, k_scale, v_scale, alibi_slopes, sinks):
    if q.shape[0] == 0:
        return torch.empty_like(q)
    return reference.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale=scale,
                                            softcap=softcap, window=(window_left, window_right),
                                            alibi_slopes=alibi_slopes, sinks=sinks, k_scale=k_scale, v_scale=v_scale)


@_dispatch.custom_op("paged_decode_attention", mutates_args=(), reference=_paged_decode_reference,
                     check=_check_decode_values, contiguous=("seq_lens",) + _VARIANT_ARGS)
def _paged_decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, softcap: float | None, window_left: int,
                     window_right: int, num_splits: int, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                     alibi_slopes: torch.Tensor | None, sinks: torch.Tensor | None) -> torch.Tensor:
    # decode's one query sits at the last key: a right window masks nothing
    return _plan_and_run(q, k_cache, v_cache, block_tables, seq_lens, None, num_splits or None, scale, softcap,
                         window_left, -1, k_scale, v_scale, alibi_slopes, sinks)


@_paged_decode_op.register_fake
def _(q, k_cache, v_cache, block_tables, seq_lens, scale, softcap, window_left, window_right, num_splits, *variants):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def _check_variant_args(q, k_cache, k_scale, v_scale, alibi_slopes, sinks) -> tuple:
    """The one-shots' variant keywords, checked without a sync (values: _check_variant_values, in the op); the
    scales as float32 (num_kv_heads,) tensors."""
    num_kv_heads = k_cache.shape[2]
    _check_variants(q.shape[1], q, alibi_slopes, sinks)
    return (_utils.check_kv_scale("k_scale", k_scale, k_cache.dtype, num_kv_heads, k_cache),
            _utils.check_kv_scale("v_scale", v_scale, k_cache.dtype, num_kv_heads, k_cache), alibi_slopes, sinks)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, *, scale: float | None = None,
                           softcap: float | None = None, window: tuple[int, int] = (-1, -1),
                           num_splits: int | None = None, k_scale: float | torch.Tensor | None = None,
                           v_scale: float | torch.Tensor | None = None, alibi_slopes: torch.Tensor | None = None,
                           sinks: torch.Tensor | None = None) -> torch.Tensor:
    """One new token per sequence attends to its whole cached sequence (its own K/V already written).

    q (batch, num_heads, head_dim); k_cache, v_cache (num_blocks, block_size, num_kv_heads, head_dim) with
    num_heads % num_kv_heads == 0 (GQA/MQA); block_tables int32 (batch, max_blocks); seq_lens int32 (batch,), the
    cached length including the new token (>= 1). window=(left, right): the token at position seq_len - 1 sees keys
    from seq_len - 1 - left (-1: unbounded); right has nothing to mask in decode. softcap: Gemma-2 tanh capping.
    scale, softcap and window take the values llmkern.attention documents (inf softcap: no cap). Every tensor may be
    any view: the cache, q and block_tables (either stride) are read through their strides, seq_lens as its values.
    num_splits: programs per sequence (split-KV); None picks one from batch, length and SM count.
    Returns (batch, num_heads, head_dim) in q's dtype.

    Variants (issue 12; FlashAttention's and vLLM's names), on the shared attention core:
    * fp8 cache: k_cache, v_cache float8_e4m3fn (compute capability 8.9+ on a GPU) or float8_e5m2, written by
      paged_kv_write with k_scale / v_scale, which are required here (a float or a float32 (num_kv_heads,) tensor;
      refused for a 16-bit cache). The value read is fp8 * scale: tiles load as fp8 and are converted to q's dtype
      in registers, the MMAs run in q's dtype, and the scales multiply the scores and the output once per program
      (so scale * k_scale must stay within float32 range: ValueError otherwise).
    * alibi_slopes float32 (num_heads,): ALiBi's bias -slope * |i - j| on the scores (arXiv 2108.12409; slopes from
      llmkern.alibi_slopes), finite with |slope| <= 2**96.
    * sinks float32 (num_heads,): gpt-oss's attention sinks, one natural-log logit per head that joins the softmax
      denominator and contributes no value (-inf: none; NaN and above 2**127 refused).
    Wrong dtypes, shapes, devices, a missing or stray scale raise before anything runs; the tensors' values are
    checked in the op (one host sync each).

    A one-shot: it validates the tables on the host (one sync), plans and runs. A decode loop should make one
    `PagedAttentionPlan` per step and call its `run` in every layer.
    """
    num_blocks, block_size, num_kv_heads, head_dim = _check_q_cache(q, k_cache, v_cache)
    _check_decode_args("q", q, block_tables, seq_lens)
    scale = _utils.check_scale(scale, head_dim)
    softcap = _utils.check_softcap(softcap, scale)
    left, right = _utils.check_window(window)
    splits = _check_num_splits(num_splits)
    variants = _check_variant_args(q, k_cache, k_scale, v_scale, alibi_slopes, sinks)
    q = _utils.last_dim_contiguous("q", q)
    k_cache = _utils.last_dim_contiguous("k_cache", k_cache)
    v_cache = _utils.last_dim_contiguous("v_cache", v_cache)
    return _paged_decode_op(q, k_cache, v_cache, block_tables, seq_lens, scale, softcap, left, right, splits,
                            *variants)


def _check_decode_args(q_name: str, q: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor) -> None:
    """A decode's index tensors (no sync): int32 on q's device, one table row and one length per query row of
    q_name. (Shared with llmkern.mla.)"""
    batch = q.shape[0]
    _check_index("block_tables", block_tables, 2, _INDEX_DTYPE, q)
    _check_index("seq_lens", seq_lens, 1, _INDEX_DTYPE, q)
    if block_tables.shape[0] != batch or seq_lens.shape[0] != batch:
        raise ValueError(f"block_tables ({tuple(block_tables.shape)}) and seq_lens ({tuple(seq_lens.shape)}) must "
                         f"have one row per sequence of {q_name} (batch {batch})")


def _check_num_splits(num_splits) -> int:
    """A one-shot's num_splits: None (0 to the op: choose) or an int in [1, _MAX_SPLITS]."""
    if num_splits is None:
        return 0
    if not isinstance(num_splits, int) or isinstance(num_splits, bool):
        raise TypeError(f"num_splits must be an int or None, got {num_splits!r}")
    if not 1 <= num_splits <= _MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {_MAX_SPLITS}] (or None to choose), got {num_splits}")
    return num_splits


# ---------------------------------------------------------------------------------------------------- prefill
@_dispatch.signature_checked
def _check_prefill_op(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, causal, scale, softcap,
                      window_left, window_right, *variants) -> None:
    _check_one_shot_op(q, k_cache, v_cache, scale, softcap, window_left, window_right, *variants)
    _check_prefill_args(q, block_tables, cu_seqlens_q, seq_lens, causal)


def _check_prefill_values(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, causal, scale, softcap,
                          window_left, window_right, *variants) -> None:
    """paged_prefill_attention()'s argument checks as the op receives them (once per signature, no sync), then
    cu_seqlens_q, lengths and block ids (one host sync) and the variants' values (one sync each), before any
    implementation runs (llmkern._dispatch)."""
    _check_prefill_op(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, causal, scale, softcap,
                      window_left, window_right, *variants)
    _validate_tables(_read_tables(block_tables, seq_lens, cu_seqlens_q), k_cache.shape[0], k_cache.shape[1],
                     total_q=q.shape[0])
    _check_variant_values(k_cache, *variants, scale=scale)


def _paged_prefill_reference(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, causal, scale, softcap,
                             window_left, window_right, k_scale, v_scale, alibi_slopes, sinks):
    if q.shape[0] == 0:
        return torch.empty_like(q)
    # A fresh, aligned copy of q: a CPU matmul's bits depend on its operands' alignment, and a view of q at a storage
    # offset must give the contiguous call's answer (tests/test_tensor_layouts.py).
    q = q.clone(memory_format=torch.contiguous_format)
    return reference.paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens,
                                             causal=causal, scale=scale, softcap=softcap,
                                             window=(window_left, 0 if causal else window_right),
                                             alibi_slopes=alibi_slopes, sinks=sinks, k_scale=k_scale,
                                             v_scale=v_scale)


@_dispatch.custom_op("paged_prefill_attention", mutates_args=(), reference=_paged_prefill_reference,
                     check=_check_prefill_values, contiguous=("cu_seqlens_q", "seq_lens") + _VARIANT_ARGS)
def _paged_prefill_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, causal: bool, scale: float,
                      softcap: float | None, window_left: int, window_right: int, k_scale: torch.Tensor | None,
                      v_scale: torch.Tensor | None, alibi_slopes: torch.Tensor | None,
                      sinks: torch.Tensor | None) -> torch.Tensor:
    return _plan_and_run(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, None, scale, softcap,
                         window_left, 0 if causal else window_right, k_scale, v_scale, alibi_slopes, sinks)


@_paged_prefill_op.register_fake
def _(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, causal, scale, softcap, window_left, window_right,
      *variants):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, *,
                            causal: bool = True, scale: float | None = None, softcap: float | None = None,
                            window: tuple[int, int] = (-1, -1), k_scale: float | torch.Tensor | None = None,
                            v_scale: float | torch.Tensor | None = None, alibi_slopes: torch.Tensor | None = None,
                            sinks: torch.Tensor | None = None) -> torch.Tensor:
    """The newest tokens of each sequence attend to its cached prefix and, causally, to each other.

    q (total_q, num_heads, head_dim) packs each sequence's new tokens (rows cu_seqlens_q[b]:cu_seqlens_q[b+1],
    int32 (batch + 1,)); their K/V are already in the cache. seq_lens int32 (batch,) is each sequence's total
    length, prefix plus new tokens, so new token i sits at position seq_len - q_len + i (bottom-right alignment, as
    FlashAttention's kvcache API). This is chunked prefill and prefix caching; sequences with one new token (decode)
    may share the batch. Returns (total_q, num_heads, head_dim). scale, softcap and window as in llmkern.attention;
    tensors in any layout, as in paged_decode_attention. A one-shot (one sync, then plan and run), as
    paged_decode_attention. k_scale, v_scale (an fp8 cache), alibi_slopes and sinks as in paged_decode_attention;
    ALiBi's distances are those of the bottom-right aligned positions.
    """
    num_blocks, block_size, num_kv_heads, head_dim = _check_q_cache(q, k_cache, v_cache)
    _check_prefill_args(q, block_tables, cu_seqlens_q, seq_lens, causal)
    scale = _utils.check_scale(scale, head_dim)
    softcap = _utils.check_softcap(softcap, scale)
    left, right = _utils.check_window(window)
    variants = _check_variant_args(q, k_cache, k_scale, v_scale, alibi_slopes, sinks)
    q = _utils.last_dim_contiguous("q", q)
    k_cache = _utils.last_dim_contiguous("k_cache", k_cache)
    v_cache = _utils.last_dim_contiguous("v_cache", v_cache)
    return _paged_prefill_op(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, causal, scale, softcap,
                             left, right, *variants)


def _check_prefill_args(q: torch.Tensor, block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                        seq_lens: torch.Tensor, causal) -> None:
    """A prefill's index tensors (no sync: int32 on q's device; batch + 1 offsets and batch table rows for seq_lens'
    batch) and causal (a bool). (Shared with llmkern.mla.)"""
    _check_index("block_tables", block_tables, 2, _INDEX_DTYPE, q)
    _check_index("cu_seqlens_q", cu_seqlens_q, 1, _INDEX_DTYPE, q)
    _check_index("seq_lens", seq_lens, 1, _INDEX_DTYPE, q)
    batch = seq_lens.shape[0]
    if cu_seqlens_q.shape[0] != batch + 1 or block_tables.shape[0] != batch:
        raise ValueError(f"cu_seqlens_q must have batch + 1 entries and block_tables batch rows, for seq_lens' "
                         f"batch {batch}; got {tuple(cu_seqlens_q.shape)} and {tuple(block_tables.shape)}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")


# ---------------------------------------------------------------------------------------------------- compile specs
def _ptr(dtype: torch.dtype) -> str:
    return {torch.float16: "*fp16:16", torch.bfloat16: "*bf16:16", torch.float32: "*fp32:16",
            torch.float8_e4m3fn: "*fp8e4nv:16", torch.float8_e5m2: "*fp8e5:16"}[dtype]


_I32 = "i32"
_I64 = "i64"
# Strides of the block/token dimension may exceed 2**31 elements in a big cache or batch: the launcher passes them
# as i64 then, so the specs compile them that way. Triton's launcher specializes an integer argument equal to 1 to
# the constant 1 and marks one divisible by 16 as such (which is what lets loads vectorize); the specs do the same for
# the layouts the ops see in practice: contiguous tensors with head_dim % 16 == 0.
_WIDE_STRIDES = ("stride_qt", "stride_kcb", "stride_vcb", "stride_ot", "stride_pos")
_UNIT_STRIDES = ("stride_qd", "stride_kcd", "stride_vcd", "stride_od", "stride_pod", "stride_kd", "stride_vd",
                 "stride_btn", "stride_plh")


def _strides(kernel, wide=_WIDE_STRIDES, unit=_UNIT_STRIDES) -> tuple[dict[str, str], dict[str, int]]:
    """A kernel's stride arguments for its compile specs: (signature of the non-unit ones, the unit ones); wide and
    unit name the 64-bit and the unit strides (llmkern.mla passes its own)."""
    names = [n for n in kernel.arg_names if n.startswith("stride_")]
    sig = {n: (_I64 if n in wide else _I32) + ":16" for n in names if n not in unit}
    return sig, {n: 1 for n in names if n in unit}


def _attention_spec(dtype: torch.dtype, group: int, head_dim: int, *, decode_tiles: bool, masks: bool = False,
                    cache: torch.dtype | None = None, variants: bool = False) -> CompileSpec:
    """One attention kernel build: its tiles, causal (HAS_RIGHT), with masks softcap and both windows; over a
    `cache` of another dtype (fp8: KV_FP8), and with `variants` ALiBi and sinks."""
    cache = cache or dtype
    cfg = _tile_config(decode_tiles, group, head_dim, dtype)
    stride_sig, unit = _strides(kernels.paged_attention_kernel)
    sig = {"Q": _ptr(dtype), "KC": _ptr(cache), "VC": _ptr(cache), "O": _ptr(dtype), "BT": "*i32:16",
           "SEQ_LENS": "*i32:16", "CU_Q": "*i32:16", "SCHEDULE": "*i32:16", "PART_O": "*fp32:16",
           "PART_LSE": "*fp32:16", "K_SCALE": "*fp32:16", "V_SCALE": "*fp32:16", "ALIBI_SLOPES": "*fp32:16",
           "SINKS": "*fp32:16", "off_work": _I32, **stride_sig, "qk_scale": "fp32", "softcap": "fp32",
           "window_left": _I32, "window_right": _I32, "group": _I32, "block_size": _I32}
    const = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_Q", "BLOCK_N", "BLOCK_D", "USE_DOT", "MASKED_ROWS")}
    kv_fp8 = cache in _utils.FP8_DTYPES
    const.update(unit, HEAD_DIM=head_dim, HAS_LEFT=masks, HAS_RIGHT=True, HAS_SOFTCAP=masks, KV_FP8=kv_fp8,
                 HAS_ALIBI=variants, HAS_SINKS=variants, INTERPRET=False)
    config = (f"{str(dtype)[6:]}{' <- ' + str(cache)[6:] if kv_fp8 else ''} g{group} d{head_dim} "
              f"{'decode' if decode_tiles else 'prefill'}{' softcap+window' if masks else ''}"
              f"{' alibi+sinks' if variants else ''} BM{cfg['BLOCK_M']} BQ{cfg['BLOCK_Q']} BN{cfg['BLOCK_N']} "
              f"w{cfg['num_warps']}")
    return CompileSpec(kernels.paged_attention_kernel, "paged_attention", config, sig, const,
                       num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                       expect_mma=cfg["USE_DOT"] and dtype != torch.float32, archs=_fp8_archs(cache))


def _fp8_archs(cache_dtype: torch.dtype) -> tuple[int, ...] | None:
    """The archs a kernel over this cache dtype builds for: e4m3fn only from sm_89 on (of the checked ones, sm_90;
    see _check_fp8_arch), everything else everywhere."""
    return (90,) if cache_dtype == torch.float8_e4m3fn else None


@register
def _compile_specs():
    """Every config a plan can pick. Tiles depend only on (decode or prefill tiles, group, head_dim, dtype):

    decode tiles: the groups that change the tile (1 = broadcast path; 4 -> 16 rows; 32; 64, which takes 8 warps at
    head_dim 256) x head dims 64/128/256 (80/96: masked lanes) in fp16, bf16 and fp32 spot checks (fp32's dot path
    takes 8 warps). prefill tiles: per head dim and dtype at groups 1 and 4 (64 and 16 tokens a tile), 8 (bf16) and
    64 (one token a tile). Both with the softcap and window code at head_dim 128 and 256. The split epilogue and
    window values are runtime, compiled into every build. Then the reduce and the cache write.
    """
    for dtype, groups, dims in ((torch.float16, (1, 4, 32, 64), (64, 128, 256)),
                                (torch.float16, (1, 4), (80, 96)),
                                (torch.bfloat16, (1, 8), (128,)),
                                (torch.float32, (1, 8), (128, 256))):
        for group in groups:
            for head_dim in dims:
                yield _attention_spec(dtype, group, head_dim, decode_tiles=True)
                if head_dim in (128, 256) and dtype != torch.bfloat16:
                    yield _attention_spec(dtype, group, head_dim, decode_tiles=True, masks=True)

    for dtype, groups, dims in ((torch.float16, (1, 4), (64, 96, 128, 256)),
                                (torch.float16, (64,), (128,)),
                                (torch.bfloat16, (1, 8), (128,)),
                                (torch.float32, (1, 8), (64, 128, 256))):
        for group in groups:
            for head_dim in dims:
                yield _attention_spec(dtype, group, head_dim, decode_tiles=False)
                if head_dim in (128, 256):
                    yield _attention_spec(dtype, group, head_dim, decode_tiles=False, masks=True)

    # fp8 caches (issue 12): e4m3fn (sm_90 of the checked archs) under bf16 and fp16 queries, e5m2 everywhere, at
    # the groups that change the tile (1: broadcast path, 8: the Llama-3-8B decode of bench/decode.py) and head
    # dims 128 / 256; ALiBi and sinks, alone and over an fp8 cache.
    for dtype, cache in ((torch.bfloat16, torch.float8_e4m3fn), (torch.float16, torch.float8_e4m3fn),
                         (torch.float16, torch.float8_e5m2), (torch.bfloat16, torch.float8_e5m2)):
        for group, head_dim in ((1, 128), (8, 128), (8, 256)):
            yield _attention_spec(dtype, group, head_dim, decode_tiles=True, cache=cache)
        yield _attention_spec(dtype, 8, 128, decode_tiles=False, cache=cache)
    for dtype, cache in ((torch.float16, None), (torch.bfloat16, torch.float8_e4m3fn)):
        for decode_tiles, group, head_dim in ((True, 1, 128), (True, 8, 128), (True, 8, 256), (False, 8, 128),
                                              (False, 1, 256)):
            yield _attention_spec(dtype, group, head_dim, decode_tiles=decode_tiles, cache=cache, variants=True,
                                  masks=head_dim == 256)

    kr = kernels.paged_attention_reduce_kernel
    for head_dim, sinks in ((64, False), (128, False), (256, False), (128, True)):
        stride_sig, unit = _strides(kr)
        sig = {"PART_O": "*fp32:16", "PART_LSE": "*fp32:16", "O": "*fp16:16", "SCHEDULE": "*i32:16",
               "SINKS": "*fp32:16", "off_reduce": _I32, **stride_sig}
        yield CompileSpec(kr, "paged_attention_reduce", f"fp16 d{head_dim}{' sinks' if sinks else ''} w4", sig,
                          {"HEAD_DIM": head_dim, "BLOCK_D": triton.next_power_of_2(head_dim), "HAS_SINKS": sinks,
                           **unit}, num_warps=4)

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
               "K_SCALE": "*fp32:16", "V_SCALE": "*fp32:16", **stride_sig, "num_kv_heads": _I32, "block_size": _I32,
               "num_slots": _I64}
        quantize = cache in _utils.FP8_DTYPES
        name = f"{str(dtype)[6:]}{' -> ' + str(cache)[6:] if quantize else ''} h{heads} d{head_dim}"
        yield CompileSpec(kw, "paged_kv_write", name, sig,
                          {"HEAD_DIM": head_dim, "BLOCK_H": triton.next_power_of_2(heads),
                           "BLOCK_D": triton.next_power_of_2(head_dim), "QUANTIZE": quantize, "INTERPRET": False,
                           **unit}, archs=_fp8_archs(cache))
