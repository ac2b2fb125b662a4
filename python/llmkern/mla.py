"""Multi-head latent attention (MLA: DeepSeek-V2/V3), host side: write the latent cache, decode, chunked prefill.

MLA (arXiv 2405.04434, section 2.1) caches per token one compressed latent c^KV ("ckv", kv_lora_rank wide: 512 in
DeepSeek-V2/V3) and one decoupled RoPE key k^R ("kpe", rope_dim wide: 64), shared by every head, instead of K and V
per KV head: 576 values per token and layer where Llama-3-8B's GQA keeps 2048. Queries arrive absorbed (W^UK folded
into the query, W^UV into the output projection; llmkern.reference states the equations), so the ops here compute,
for each query row (token, head),

    s_j = scale * (q_nope . ckv_j + q_pe . kpe_j),    out = sum_j softmax(s)_j ckv_j    (kv_lora_rank wide),

in FlashInfer's terms (flashinfer.mla.BatchMLAPagedAttentionWrapper: q_nope, q_pe, ckv_cache, kpe_cache). Layout:
ckv_cache (num_blocks, block_size, kv_lora_rank) and kpe_cache (num_blocks, block_size, rope_dim), int32 block
tables and lengths as the paged KV ops (llmkern.paged_attention). The two caches may also be two views of one
(num_blocks, block_size, kv_lora_rank + rope_dim) tensor, vLLM's and FlashMLA's layout: every tensor is read
through its strides.

  mla_kv_write            new tokens' ckv and kpe into their slots (a kernel of its own: paged_kv_write's caches are
                          (num_blocks, block_size, kv_heads, head_dim) pairs of one shape, and head_dim <= 256)
  mla_decode_attention    one query token per sequence over its whole cache, split-KV for long contexts
  mla_prefill_attention   the newest tokens of each sequence over its cached prefix and each other (chunked
                          prefill), causal and bottom-right aligned as paged_prefill_attention

Supported: fp16, bf16, fp32; (kv_lora_rank, rope_dim) in SUPPORTED: (512, 64) of DeepSeek-V2/V3 and most MLA
models, (256, 64) of Mistral Small 4, (256, 32) of MiniCPM3 (SUPPORTED's sources); any number of heads. `scale` has
no default: it is the model's 1 / sqrt(qk_nope_head_dim + qk_rope_head_dim) from before the absorption
(DeepSeek-V3: 1 / sqrt(192)), times YaRN's mscale^2 where the model scales RoPE, which the absorbed shapes cannot
tell.

CPU: with no GPU these ops run the Triton kernels under the interpreter (TRITON_INTERPRET=1), else the C++ CPU
backend (csrc/mla.cpp: each latent row read once for all heads and used as key and value, by paged decode's
register-blocked tiles with every query head in one group below 32 heads, by BLAS on fp32 tiles from 32 on; prefill
runs the same loop per new token over the keys it sees), else llmkern.reference. On a CPU MLA decode is
compute-bound: about 1.9 x heads FLOPs per latent byte.

Kernels (kernels/mla.py): one program owns a row tile of BLOCK_M (query token, head) pairs of one sequence and one
split of its keys; each step loads a tile of ckv and kpe once and uses the ckv tile twice, as the keys of the scores
and as the values of the output. The row tile is sized so that its (rows x kv_lora_rank) fp32 output accumulator and
its q_nope operand stay in registers without spills (`_config`); more pairs than a tile holds take more tiles, each
loading its split's latents from global memory itself.

Latent reads per decode (`decode_row_tiles`): how many times each latent byte of a (sequence, split) is loaded from
global memory, 16-bit, kv_lora_rank 512, the same tiles on sm_80 and sm_90 (fp32 and rank 256 keep 16- and 32-row
tiles):
    heads          16    32    64    128
    32-row tile     1     1     2      4     (before: 16 rows up to 16 heads, else 32)
    now             1     1     1      2     (16 rows up to 16 heads, 32 up to 32, else 64)
One of those loads per byte has to come from HBM; the others are made by the tiles of the same (sequence, split),
which sit next to each other on the grid's fastest axis (axis 0), so they start together and are expected to hit L2.
That expectation is what only a GPU can confirm: a profiler's DRAM bytes against the latent bytes, or `llmkern bench
decode`'s MLA GB/s, which counts each latent byte once (perf.mla_attention_bytes) and so falls short of the memory
roof when the repeats go to HBM.
Why not one tile for all 128 heads: their fp32 accumulator, 128 x 512 x 4 bytes = 256 KiB, is the whole register
file of an sm_80 or sm_90 SM (65536 32-bit registers); the 64-row tile's half of that (128 registers a thread over
8 warps) is the most that compiles without spills (`_config` names what spilled). The peers draw the same line:
  * FlashMLA's dense decode for sm_90 (github.com/deepseek-ai/FlashMLA, csrc/sm90/decode/dense: BLOCK_SIZE_M = 64
    query rows per CTA of two warpgroups, grid (row blocks, KV heads, SM partitions)) runs 128 heads as two CTAs per
    sequence, each loading the latents; its deep dive (docs/20250422-new-kernel-deep-dive.md) gives the 64 x 512
    output as 32768 registers, half an SM, split into two 64 x 256 halves, one per warpgroup, and loads the KV cache
    with TMA's EVICT_FIRST hint. Its README's 3000 GB/s on an H800 SXM5 (about 90% of 3.35 TB/s) is for the
    memory-bound shapes; at 128 heads and one query token the deep dive puts MLA decode at the compute bound
    (2 x heads FLOPs a byte against the H800's ~865 TFLOPS / 3.35 TB/s).
  * FlashInfer's MLA decode (github.com/flashinfer-ai/flashinfer, include/flashinfer/attention/mla.cuh for sm_80,
    mla_hopper.cuh for sm_90) also takes CTA_TILE_Q = 64 rows, with the 512 output columns split between two
    warpgroups, and 64, 32 or 16 keys a step as the SM's shared memory allows.
"""
from __future__ import annotations

import math

import torch

from llmkern import _dispatch, _utils, reference
from llmkern.compile_check import CompileSpec, register
from llmkern.kernels import mla as kernels
from llmkern.kernels.paged_attention import REDUCE_FIELDS, paged_attention_reduce_kernel
from llmkern.paged_attention import (_SLOT_DTYPE, _check_decode_args, _check_index, _check_num_splits,
                                     _check_prefill_args, _merge_splits, _ptr, _read_tables, _strides,
                                     _validate_tables, choose_num_splits)

# (kv_lora_rank, rope_dim) pairs the kernels are built for, each with tiles of its own (`_config`), all
# compile-checked: ptxas's register allocation does not shrink steadily with the rank (a tile that fits at 512
# spilled at 256), so a pair is supported only once its tiles are checked. Sources: the defaults of kv_lora_rank and
# qk_rope_head_dim in transformers' configuration files (5.x), whose docstrings name the checkpoint:
#   (512, 64): deepseek_v2 (DeepSeek-V2-Lite), deepseek_v3, glm4_moe_lite, kimi_linear (Kimi-Linear-48B-A3B),
#              longcat_flash (LongCat-Flash-Chat), mistral_large4 (Mistral-Large-4-1T-A52B);
#   (256, 64): mistral4 (Mistral-Small-4-119B-2603);
#   (256, 32): minicpm3 (MiniCPM3-4B).
SUPPORTED = ((512, 64), (256, 64), (256, 32))


# ---------------------------------------------------------------------------------------------------- configs
def _config(rank: int, num_heads: int, dtype: torch.dtype, decode: bool) -> dict:
    """Tile sizes for mla_attention_kernel: BLOCK_M (query token, head) rows, BLOCK_N keys a step. The same tiles
    serve sm_80 and sm_90.

    The fp32 output accumulator (rows x kv_lora_rank) and the q_nope operand (rows x kv_lora_rank, which an sm_80
    mma.sync keeps in registers for every warp that shares its rows) grow with the rows and the rank. Each choice
    below compiles without spills on sm_80 and sm_90 with triton 3.9 (`llmkern check-compile`; the 64-row tile is
    not yet checked on triton 3.6); the alternatives that spilled are named, since ptxas, given a need just above
    64, 80 or 128 registers, sometimes caps the kernel there and spills a few bytes:
      16-bit, rank 512, decode: the fewest row tiles per sequence, since each tile reads the latent cache once
        (module docstring):
          <= 16 heads: 16 rows (all its heads, the M of an MMA) with 4 warps (8 warps spilled 8 bytes on sm_80);
          <= 32 heads: 32 rows with 8 warps;
          more: 64 rows, 16 keys a step, 8 warps: 248-254 registers, no spills, on both archs, once the direct
            epilogue stores its two column halves one after the other (storing the whole tile spilled 88 bytes
            on sm_90); 32 keys a step spilled 24 (split) and 136 (direct) bytes on sm_90, 16 (direct) on sm_80;
            4 warps spilled over 1 KiB. FlashMLA's and FlashInfer's MLA decode also take 64 query rows per CTA.
      16-bit, rank 512, prefill: 32 rows with 8 warps (64 rows spilled 24 to 96 bytes on both archs).
      16-bit, rank 256: 32 rows with 4 warps (8 warps spilled 8 to 12 bytes).
      fp32 runs its IEEE dot on FMA units with both operands in registers: 16 rows, 8 warps at rank 512, 4 at 256
        (8 spilled 8 bytes on sm_80 with triton 3.6).
    BLOCK_N: a (32 x 512) 16-bit ckv tile is 32 KiB, 64 KiB in flight with two stages (64 keys spilled on sm_80);
    fp32 halves it to keep the bytes.
    """
    if dtype == torch.float32:
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=8 if rank > 256 else 4, num_stages=2)
    if rank <= 256:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)
    if decode and num_heads <= 16:
        return dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2)
    if decode and num_heads > 32:
        return dict(BLOCK_M=64, BLOCK_N=16, num_warps=8, num_stages=2)
    return dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2)


def decode_row_tiles(num_heads: int, dtype: torch.dtype = torch.bfloat16, kv_lora_rank: int = 512) -> int:
    """Row tiles (programs) per (sequence, split) that mla_decode_attention launches for `num_heads` query heads:
    each one loads every latent byte of its split from global memory once, so this is how many times a decode
    reads each latent byte (the first from HBM, the rest, launched next to it, hopefully from L2). DeepSeek-V3
    (rank 512, 16-bit): 1 up to 64 heads, 2 at 128. ValueError for a rank not in SUPPORTED."""
    if kv_lora_rank not in {r for r, _ in SUPPORTED}:
        raise ValueError(f"kv_lora_rank must be one of {sorted({r for r, _ in SUPPORTED})}, got {kv_lora_rank}")
    return _utils.cdiv(num_heads, _config(kv_lora_rank, num_heads, dtype, True)["BLOCK_M"])


# ---------------------------------------------------------------------------------------------------- checks
def _check_latent(q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor) -> None:
    """Shapes, dtypes and devices of the queries and the two caches."""
    _utils.check_tensor("q_nope", q_nope, ndim=3, dtypes=_utils.FLOAT_DTYPES)
    _utils.check_tensor("q_pe", q_pe, ndim=3, dtypes=_utils.FLOAT_DTYPES)
    _utils.check_tensor("ckv_cache", ckv_cache, ndim=3, dtypes=_utils.FLOAT_DTYPES)
    _utils.check_tensor("kpe_cache", kpe_cache, ndim=3, dtypes=_utils.FLOAT_DTYPES)
    _utils.check_same(["q_nope", "q_pe", "ckv_cache", "kpe_cache"], [q_nope, q_pe, ckv_cache, kpe_cache])
    if q_pe.shape[:2] != q_nope.shape[:2]:
        raise ValueError(f"q_pe must have q_nope's (tokens, heads) = {tuple(q_nope.shape[:2])}, got "
                         f"{tuple(q_pe.shape)}")
    if q_nope.shape[1] < 1:
        raise ValueError(f"q_nope must have at least one head, got shape {tuple(q_nope.shape)}")
    _check_cache_pair(ckv_cache, kpe_cache)
    if q_nope.shape[2] != ckv_cache.shape[2]:
        raise ValueError(f"q_nope has kv_lora_rank {q_nope.shape[2]} but ckv_cache has {ckv_cache.shape[2]}")
    if q_pe.shape[2] != kpe_cache.shape[2]:
        raise ValueError(f"q_pe has rope_dim {q_pe.shape[2]} but kpe_cache has {kpe_cache.shape[2]}")


def _check_cache_pair(ckv_cache: torch.Tensor, kpe_cache: torch.Tensor) -> None:
    """Two caches of the same blocks; ValueError for a (kv_lora_rank, rope_dim) the kernels are not built for."""
    num_blocks, block_size, rank = ckv_cache.shape
    if kpe_cache.shape[:2] != (num_blocks, block_size):
        raise ValueError(f"kpe_cache must have ckv_cache's (num_blocks, block_size) = {(num_blocks, block_size)}, "
                         f"got {tuple(kpe_cache.shape)}")
    if num_blocks < 1 or block_size < 1:
        raise ValueError(f"ckv_cache: num_blocks and block_size must be >= 1, got {tuple(ckv_cache.shape)}")
    if (rank, kpe_cache.shape[2]) not in SUPPORTED:
        raise ValueError(f"ckv_cache, kpe_cache: (kv_lora_rank, rope_dim) = ({rank}, {kpe_cache.shape[2]}) is not "
                         f"one the kernels are built for: {', '.join(map(str, SUPPORTED))}")


def _check_required_scale(scale) -> float:
    if scale is None:
        raise TypeError("scale is required: MLA's softmax scale is the model's 1 / sqrt(qk_nope_head_dim + "
                        "qk_rope_head_dim) before absorption (DeepSeek-V3: 1 / sqrt(192), times YaRN's mscale^2), "
                        "which the absorbed head dims cannot tell")
    return _utils.check_scale(scale, None)


def _last_dims_contiguous(*named: tuple[str, torch.Tensor]) -> list[torch.Tensor]:
    return [_utils.last_dim_contiguous(name, t) for name, t in named]


# ---------------------------------------------------------------------------------------------------- cache write
def _check_kv_write_args(ckv, kpe, ckv_cache, kpe_cache, slot_mapping) -> None:
    _utils.check_tensor("ckv", ckv, ndim=2, dtypes=_utils.FLOAT_DTYPES)
    _utils.check_tensor("kpe", kpe, ndim=2, dtypes=_utils.FLOAT_DTYPES)
    _utils.check_tensor("ckv_cache", ckv_cache, ndim=3, dtypes=_utils.FLOAT_DTYPES)
    _utils.check_tensor("kpe_cache", kpe_cache, ndim=3, dtypes=_utils.FLOAT_DTYPES)
    _utils.check_same(["ckv", "kpe", "ckv_cache", "kpe_cache"], [ckv, kpe, ckv_cache, kpe_cache])
    _check_cache_pair(ckv_cache, kpe_cache)
    if ckv.shape[1] != ckv_cache.shape[2] or kpe.shape[1] != kpe_cache.shape[2] or kpe.shape[0] != ckv.shape[0]:
        raise ValueError(f"ckv must be (num_tokens, {ckv_cache.shape[2]}) and kpe (num_tokens, "
                         f"{kpe_cache.shape[2]}) to match the caches, got {tuple(ckv.shape)} and {tuple(kpe.shape)}")
    _check_index("slot_mapping", slot_mapping, 1, _SLOT_DTYPE, ckv)
    if slot_mapping.shape[0] != ckv.shape[0]:
        raise ValueError(f"slot_mapping must have one slot per token ({ckv.shape[0]}), got {slot_mapping.shape[0]}")


@_dispatch.signature_checked
def _check_writable_caches(ckv, kpe, ckv_cache, kpe_cache, slot_mapping) -> None:
    """llmkern::mla_kv_write's check (once per signature, no sync): mla_kv_write()'s argument checks, and caches
    that can be written (no element at two indices: strides only). Slots need no check: the kernel writes only those
    inside the cache, as paged_kv_write's."""
    _check_kv_write_args(ckv, kpe, ckv_cache, kpe_cache, slot_mapping)
    _utils.check_writable("ckv_cache", ckv_cache)
    _utils.check_writable("kpe_cache", kpe_cache)


def _check_kv_write(ckv, kpe, ckv_cache, kpe_cache, slot_mapping) -> None:
    """llmkern::mla_kv_write's check: _check_writable_caches, then caches that share no memory (kpe would
    overwrite ckv) and sources (ckv, kpe, slot_mapping) that share none with them, decided from their data pointers,
    so per call."""
    _check_writable_caches(ckv, kpe, ckv_cache, kpe_cache, slot_mapping)
    _utils.check_disjoint("ckv_cache", ckv_cache, "kpe_cache", kpe_cache)
    _utils.check_sources_disjoint({"ckv": ckv, "kpe": kpe, "slot_mapping": slot_mapping},
                                  {"ckv_cache": ckv_cache, "kpe_cache": kpe_cache})


@_dispatch.custom_op("mla_kv_write", mutates_args=("ckv_cache", "kpe_cache"), reference=reference.mla_kv_write,
                     check=_check_kv_write, contiguous=("slot_mapping",))
def _mla_kv_write_op(ckv: torch.Tensor, kpe: torch.Tensor, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor,
                     slot_mapping: torch.Tensor) -> None:
    if ckv.shape[0] == 0:
        return
    _utils.launch(
        kernels.mla_kv_write_kernel, (ckv.shape[0],),
        ckv, kpe, ckv_cache, kpe_cache, slot_mapping,
        ckv.stride(0), ckv.stride(1), kpe.stride(0), kpe.stride(1),
        *ckv_cache.stride(), *kpe_cache.stride(),
        ckv_cache.shape[1], ckv_cache.shape[0] * ckv_cache.shape[1],
        RANK=ckv.shape[1], ROPE_DIM=kpe.shape[1],
    )


@_mla_kv_write_op.register_fake
def _(ckv, kpe, ckv_cache, kpe_cache, slot_mapping) -> None:
    return None


def mla_kv_write(ckv: torch.Tensor, kpe: torch.Tensor, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """Copy new tokens' latents into the MLA cache: ckv (num_tokens, kv_lora_rank) and kpe (num_tokens, rope_dim)
    into slots `slot_mapping` (int64, num_tokens) of ckv_cache (num_blocks, block_size, kv_lora_rank) and kpe_cache
    (num_blocks, block_size, rope_dim).

    ckv is the normalised c^KV (after kv_a_layernorm in DeepSeek's code) and kpe the RoPE-rotated k^R, as the
    attention ops read them. Slot s is block s // block_size, offset s % block_size. Only slots in
    [0, num_blocks * block_size) are written: -1 (vLLM's padding slot) and any other slot outside the cache leave
    the cache untouched for that token, without an error (no sync: the values are never read on the host), as
    paged_kv_write. Bit-exact copies: ckv and kpe must have the caches' dtype. Slots must be distinct. The
    caches are written through their strides (any view that does not overlap itself, e.g. two slices of one
    (num_blocks, block_size, kv_lora_rank + rope_dim) tensor; an expanded cache raises ValueError), and must share
    no element (ValueError), nor ckv, kpe and slot_mapping with either cache (ValueError); slot_mapping may be any
    view, read as its values. Raises TypeError/ValueError naming the argument before anything is written.
    """
    _check_kv_write_args(ckv, kpe, ckv_cache, kpe_cache, slot_mapping)
    ckv, kpe = _last_dims_contiguous(("ckv", ckv), ("kpe", kpe))
    _mla_kv_write_op(ckv, kpe, ckv_cache, kpe_cache, slot_mapping)


# ---------------------------------------------------------------------------------------------------- attention
def _launch(q_nope, q_pe, ckv_cache, kpe_cache, block_tables, cu_seqlens_q, seq_lens, scale, *, decode: bool,
            causal: bool, max_q_len: int, num_splits: int) -> torch.Tensor:
    """Run mla_attention_kernel (and the split merge when num_splits > 1); returns out, shaped as q_nope."""
    total_q, num_heads, rank = q_nope.shape
    batch = seq_lens.shape[0]
    out = torch.empty(q_nope.shape, dtype=q_nope.dtype, device=q_nope.device)
    cfg = _config(rank, num_heads, q_nope.dtype, decode)
    split = num_splits > 1
    # Split partials (decode only): token b's split s is slot b * num_splits + s of paged attention's merge, which
    # reads them as (slots, num_heads, ...). Unsplit, the kernel writes out directly: 1-element stand-ins.
    shape = (total_q, num_splits, num_heads) if split else (1, 1, 1)
    part_o = torch.empty(*shape, rank if split else 1, dtype=torch.float32, device=q_nope.device)
    part_lse = torch.empty(shape, dtype=torch.float32, device=q_nope.device)
    _utils.launch(
        kernels.mla_attention_kernel, (_utils.cdiv(max_q_len * num_heads, cfg["BLOCK_M"]), batch, num_splits),
        q_nope, q_pe, ckv_cache, kpe_cache, block_tables, cu_seqlens_q, seq_lens, out, part_o, part_lse,
        *q_nope.stride(), *q_pe.stride(), *ckv_cache.stride(), *kpe_cache.stride(), *block_tables.stride(),
        *out.stride(), *part_o.transpose(1, 2).stride(), *part_lse.transpose(1, 2).stride(),
        scale * math.log2(math.e), num_heads, ckv_cache.shape[1], num_splits,
        RANK=rank, ROPE_DIM=q_pe.shape[2], DECODE=decode, CAUSAL=causal, SPLIT=split, INTERPRET=_utils.INTERPRET,
        **cfg,
    )
    if split:   # paged attention's merge (the attention core's online softmax over the splits)
        _merge_splits(part_o.flatten(0, 1), part_lse.flatten(0, 1), out, _reduce_schedule(total_q, num_splits,
                                                                                         q_nope.device), total_q)
    return out


def _reduce_schedule(batch: int, num_splits: int, device) -> torch.Tensor:
    """The merge's int32 schedule for a decode split evenly (kernels/paged_attention.py): [unused, batch rows],
    then per token b the reduce row (output row b, first slot b * num_splits, num_splits). Built on the device,
    without a sync."""
    sched = torch.empty(2 + REDUCE_FIELDS.value * batch, dtype=torch.int32, device=device)
    sched[0], sched[1] = 0, batch
    rows = sched[2:].view(batch, REDUCE_FIELDS.value)
    rows[:, 0] = torch.arange(batch, dtype=torch.int32, device=device)
    rows[:, 1] = rows[:, 0] * num_splits
    rows[:, 2] = num_splits
    return sched


@_dispatch.signature_checked
def _check_decode_op(q_nope, q_pe, ckv_cache, kpe_cache, block_tables, seq_lens, scale, num_splits) -> None:
    _check_latent(q_nope, q_pe, ckv_cache, kpe_cache)
    _check_decode_args("q_nope", q_nope, block_tables, seq_lens)
    _check_required_scale(scale)
    _check_num_splits(num_splits or None)


def _check_decode_values(q_nope, q_pe, ckv_cache, kpe_cache, block_tables, seq_lens, *options) -> None:
    """mla_decode_attention()'s argument checks as the op receives them (once per signature, no sync), then lengths
    and block ids (one host sync, paged attention's table checks), before any implementation runs
    (llmkern._dispatch)."""
    _check_decode_op(q_nope, q_pe, ckv_cache, kpe_cache, block_tables, seq_lens, *options)
    _validate_tables(_read_tables(block_tables, seq_lens, None), ckv_cache.shape[0], ckv_cache.shape[1])


def _mla_decode_reference(q_nope, q_pe, ckv_cache, kpe_cache, block_tables, seq_lens, scale, num_splits):
    return reference.mla_decode_attention(q_nope, q_pe, ckv_cache, kpe_cache, block_tables, seq_lens, scale=scale)


@_dispatch.custom_op("mla_decode_attention", mutates_args=(), reference=_mla_decode_reference,
                     check=_check_decode_values, contiguous=("seq_lens",))
def _mla_decode_op(q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor,
                   block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float, num_splits: int) -> torch.Tensor:
    batch, num_heads, _ = q_nope.shape
    if batch == 0:
        return torch.empty(q_nope.shape, dtype=q_nope.dtype, device=q_nope.device)
    if num_splits == 0:
        num_splits = choose_num_splits(batch, decode_row_tiles(num_heads, q_nope.dtype, q_nope.shape[2]),
                                       int(seq_lens.max()), q_nope.device)
    # DECODE: query b is row b, and the kernel never reads cu_seqlens_q (seq_lens fills the argument)
    return _launch(q_nope, q_pe, ckv_cache, kpe_cache, block_tables, seq_lens, seq_lens, scale, decode=True,
                   causal=False, max_q_len=1, num_splits=num_splits)


@_mla_decode_op.register_fake
def _(q_nope, q_pe, ckv_cache, kpe_cache, block_tables, seq_lens, scale, num_splits):
    return torch.empty(q_nope.shape, dtype=q_nope.dtype, device=q_nope.device)


def mla_decode_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor,
                         block_tables: torch.Tensor, seq_lens: torch.Tensor, *, scale: float,
                         num_splits: int | None = None) -> torch.Tensor:
    """One new token per sequence attends, with every head, to its whole cached latent sequence (its own ckv and
    kpe already written with mla_kv_write).

    q_nope (batch, num_heads, kv_lora_rank): the absorbed no-RoPE query part; q_pe (batch, num_heads, rope_dim): the
    RoPE part; ckv_cache (num_blocks, block_size, kv_lora_rank), kpe_cache (num_blocks, block_size, rope_dim);
    block_tables int32 (batch, max_blocks); seq_lens int32 (batch,), the cached length including the new token
    (>= 1). Scores are scale * (q_nope . ckv + q_pe . kpe) (no mask: the new token sees every cached one), the
    output softmax . ckv: (batch, num_heads, kv_lora_rank) in q_nope's dtype, fp32 accumulation. All dtypes equal
    (fp16, bf16 or fp32).

    scale (required, see the module docstring): a finite float with |scale| <= 2**127; 0 or a subnormal scale
    weighs every key the same (llmkern._utils.check_scale). num_splits: programs per sequence (split-KV, merged by
    their log-sum-exp), in [1, 256]; None picks one from the batch, the head tiles, the longest length and the SM
    count. Every tensor may be any view (read through its strides; seq_lens as its values).

    Raises TypeError for a non-tensor, a wrong dtype, a missing scale or a non-int num_splits, ValueError for
    mismatched shapes, a (kv_lora_rank, rope_dim) not in SUPPORTED, a scale or num_splits out of range, lengths
    outside [1, the block table's capacity] or block ids outside the cache, before any kernel runs.
    """
    _check_latent(q_nope, q_pe, ckv_cache, kpe_cache)
    _check_decode_args("q_nope", q_nope, block_tables, seq_lens)
    scale = _check_required_scale(scale)
    splits = _check_num_splits(num_splits)
    tensors = _last_dims_contiguous(("q_nope", q_nope), ("q_pe", q_pe), ("ckv_cache", ckv_cache),
                                    ("kpe_cache", kpe_cache))
    return _mla_decode_op(*tensors, block_tables, seq_lens, scale, splits)


@_dispatch.signature_checked
def _check_prefill_op(q_nope, q_pe, ckv_cache, kpe_cache, block_tables, cu_seqlens_q, seq_lens, causal,
                      scale) -> None:
    _check_latent(q_nope, q_pe, ckv_cache, kpe_cache)
    _check_prefill_args(q_nope, block_tables, cu_seqlens_q, seq_lens, causal)
    _check_required_scale(scale)


def _check_prefill_values(q_nope, q_pe, ckv_cache, kpe_cache, block_tables, cu_seqlens_q, seq_lens,
                          *options) -> None:
    """mla_prefill_attention()'s argument checks as the op receives them (once per signature, no sync), then
    cu_seqlens_q, lengths and block ids (one host sync, paged attention's table checks), before any implementation
    runs (llmkern._dispatch)."""
    _check_prefill_op(q_nope, q_pe, ckv_cache, kpe_cache, block_tables, cu_seqlens_q, seq_lens, *options)
    _validate_tables(_read_tables(block_tables, seq_lens, cu_seqlens_q), ckv_cache.shape[0], ckv_cache.shape[1],
                     total_q=q_nope.shape[0])


def _mla_prefill_reference(q_nope, q_pe, ckv_cache, kpe_cache, block_tables, cu_seqlens_q, seq_lens, causal, scale):
    return reference.mla_prefill_attention(q_nope, q_pe, ckv_cache, kpe_cache, block_tables, cu_seqlens_q, seq_lens,
                                           scale=scale, causal=causal)


@_dispatch.custom_op("mla_prefill_attention", mutates_args=(), reference=_mla_prefill_reference,
                     check=_check_prefill_values, contiguous=("cu_seqlens_q", "seq_lens"))
def _mla_prefill_op(q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor,
                    block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, causal: bool,
                    scale: float) -> torch.Tensor:
    if q_nope.shape[0] == 0:
        return torch.empty(q_nope.shape, dtype=q_nope.dtype, device=q_nope.device)
    max_q_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    return _launch(q_nope, q_pe, ckv_cache, kpe_cache, block_tables, cu_seqlens_q, seq_lens, scale, decode=False,
                   causal=causal, max_q_len=max_q_len, num_splits=1)


@_mla_prefill_op.register_fake
def _(q_nope, q_pe, ckv_cache, kpe_cache, block_tables, cu_seqlens_q, seq_lens, causal, scale):
    return torch.empty(q_nope.shape, dtype=q_nope.dtype, device=q_nope.device)


def mla_prefill_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor,
                          kpe_cache: torch.Tensor, block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                          seq_lens: torch.Tensor, *, scale: float, causal: bool = True) -> torch.Tensor:
    """The newest tokens of each sequence attend to its cached latent prefix and, causally, to each other
    (chunked prefill, prefix caching), in the absorbed form.

    q_nope (total_q, num_heads, kv_lora_rank) and q_pe (total_q, num_heads, rope_dim) pack each sequence's new
    tokens (rows cu_seqlens_q[b]:cu_seqlens_q[b+1], int32 (batch + 1,)); their ckv/kpe are already in the cache.
    seq_lens int32 (batch,) is each sequence's total length, prefix plus new tokens, so new token i sits at position
    seq_len - q_len + i and, with causal, sees keys up to that position (bottom-right alignment, as
    paged_prefill_attention); causal=False: every token sees all seq_len keys. Returns (total_q, num_heads,
    kv_lora_rank) in q_nope's dtype. Caches, block tables, scale, dtypes and layouts as mla_decode_attention.
    (The absorbed form costs 2 x (2 x kv_lora_rank + rope_dim) FLOPs per head and key; for a long prompt with little
    prefix, DeepSeek's own inference decompresses K and V instead, head dims 192 and 128: fewer FLOPs, more bytes.)

    Raises as mla_decode_attention, and ValueError for cu_seqlens_q that does not run from 0 to total_q without
    decreasing or a sequence with more new tokens than its length, before any kernel runs.
    """
    _check_latent(q_nope, q_pe, ckv_cache, kpe_cache)
    _check_prefill_args(q_nope, block_tables, cu_seqlens_q, seq_lens, causal)
    scale = _check_required_scale(scale)
    tensors = _last_dims_contiguous(("q_nope", q_nope), ("q_pe", q_pe), ("ckv_cache", ckv_cache),
                                    ("kpe_cache", kpe_cache))
    return _mla_prefill_op(*tensors, block_tables, cu_seqlens_q, seq_lens, causal, scale)


# ---------------------------------------------------------------------------------------------------- compile specs
# 64-bit strides: token and block dimensions of big tensors; unit strides: the contiguous last dims (and the index
# tensors' inner dims), as the launcher specializes them (see paged_attention's _WIDE_STRIDES).
_WIDE = ("stride_qnt", "stride_qpt", "stride_ckb", "stride_kpb", "stride_btb", "stride_ot", "stride_pot",
         "stride_plt", "stride_ct", "stride_pt", "stride_ccb", "stride_pcb")
_UNIT = ("stride_qnd", "stride_qpd", "stride_ckd", "stride_kpd", "stride_od", "stride_pod", "stride_btn",
         "stride_pls", "stride_cd", "stride_pd", "stride_ccd", "stride_pcd")


def _attention_spec(dtype: torch.dtype, num_heads: int, *, decode: bool, causal: bool = False, split: bool = False,
                    rank: int = 512, rope_dim: int = 64) -> CompileSpec:
    cfg = _config(rank, num_heads, dtype, decode)
    stride_sig, unit = _strides(kernels.mla_attention_kernel, _WIDE, _UNIT)
    sig = {"Q_NOPE": _ptr(dtype), "Q_PE": _ptr(dtype), "CKV": _ptr(dtype), "KPE": _ptr(dtype), "BT": "*i32:16",
           "CU_Q": "*i32:16", "SEQ_LENS": "*i32:16", "O": _ptr(dtype), "PART_O": "*fp32:16", "PART_LSE": "*fp32:16",
           **stride_sig, "qk_scale": "fp32", "num_heads": "i32", "block_size": "i32", "num_splits": "i32"}
    const = dict(unit, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], RANK=rank, ROPE_DIM=rope_dim, DECODE=decode,
                 CAUSAL=causal, SPLIT=split, INTERPRET=False)
    kind = "decode" + (" split" if split else "") if decode else "prefill" + (" causal" if causal else "")
    config = f"{str(dtype)[6:]} r{rank}/{rope_dim} {kind} BM{cfg['BLOCK_M']} BN{cfg['BLOCK_N']} w{cfg['num_warps']}"
    return CompileSpec(kernels.mla_attention_kernel, "mla_attention", config, sig, const,
                       num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], expect_mma=dtype != torch.float32)


@register
def _compile_specs():
    """Every tile the dispatcher can pick (`_config`: by rank, dtype, decode or prefill, and for a 16-bit decode at
    rank 512 whether the heads fit 16, 32 or more rows) for every supported (kv_lora_rank, rope_dim) (SUPPORTED),
    each decode tile in its split and direct epilogue, prefill causal (the masked-rows softmax) and not. Then the
    split merge at each rank and the cache write."""
    for rank, rope_dim in SUPPORTED:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            seen = set()
            for heads in (16, 32, 128):    # the three decode tiles of rank 512 (one elsewhere: deduplicated)
                cfg = tuple(_config(rank, heads, dtype, True).items())
                if cfg not in seen:
                    seen.add(cfg)
                    for split in (True, False):
                        yield _attention_spec(dtype, heads, decode=True, split=split, rank=rank, rope_dim=rope_dim)
            for causal in (True, False):
                yield _attention_spec(dtype, 128, decode=False, causal=causal, rank=rank, rope_dim=rope_dim)

    kr = paged_attention_reduce_kernel
    for rank in sorted({rank for rank, _ in SUPPORTED}):
        stride_sig, unit = _strides(kr)
        sig = {"PART_O": "*fp32:16", "PART_LSE": "*fp32:16", "O": "*bf16:16", "SCHEDULE": "*i32:16",
               "SINKS": "*fp32:16", "off_reduce": "i32", **stride_sig}
        yield CompileSpec(kr, "mla_decode_reduce", f"bf16 r{rank} w4", sig,
                          {"HEAD_DIM": rank, "BLOCK_D": rank, "HAS_SINKS": False, **unit}, num_warps=4)

    kw = kernels.mla_kv_write_kernel
    for (rank, rope_dim), dtype in zip(SUPPORTED, (torch.bfloat16, torch.float16, torch.float32)):
        stride_sig, unit = _strides(kw, _WIDE, _UNIT)
        sig = {"CKV": _ptr(dtype), "KPE": _ptr(dtype), "CKV_CACHE": _ptr(dtype), "KPE_CACHE": _ptr(dtype),
               "SLOT": "*i64:16", **stride_sig, "block_size": "i32", "num_slots": "i64"}
        yield CompileSpec(kw, "mla_kv_write", f"{str(dtype)[6:]} r{rank}/{rope_dim}", sig,
                          {"RANK": rank, "ROPE_DIM": rope_dim, **unit})
