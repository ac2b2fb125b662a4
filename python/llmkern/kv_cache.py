"""The paged KV cache and its block manager: plain Python bookkeeping on the host, tensors for the kernels.

Memory is a pool of fixed-size blocks per layer, `(num_blocks, block_size, num_kv_heads, head_dim)` for K and for V
(FlashAttention's `block_table` / FlashInfer's NHD page layout). Each sequence owns a list of block ids, its block
table; token t of a sequence lives in block table[t // block_size] at offset t % block_size.

Sharing: `fork` gives a new sequence the same blocks (a reference count per block). Full shared blocks are never
written again, so they stay shared. A shared block that is only partly filled would receive the next token of
either sequence, so the first append into it copies the block, in every layer, to a fresh block owned by the
appending sequence alone (copy-on-write).

FP8 caches (dtype torch.float8_e4m3fn or torch.float8_e5m2) halve the bytes of a 16-bit cache. Each layer has a
float32 scale per KV head for K and for V (`k_scale(layer)`, `v_scale(layer)`): the cache stores
round_to_fp8(x / scale) and the attention kernels read fp8 * scale. The scales are given (vLLM and FlashInfer take
per-tensor scales; per-head ones are a superset), 1.0 unless set: calibrate them so that max |x| / scale stays near
the format's largest value (448 for e4m3fn) and values saturate rarely.

Every mutating method checks everything first and only then changes state, so a refused call (CacheFullError,
ValueError) leaves the cache exactly as it was.
"""
from __future__ import annotations

from typing import Hashable, Sequence

import torch

from llmkern import _utils


class CacheFullError(RuntimeError):
    """An append needs more free blocks than the cache has; nothing was changed."""


class PagedKVCache:
    """K/V storage for `num_layers` layers in `num_blocks` blocks of `block_size` tokens, plus the block manager.

    Typical step: `slots = cache.append(seq_id, n)` reserves n token slots; write the new K/V of every layer with
    `llmkern.paged_kv_write(k, v, cache.k_cache(layer), cache.v_cache(layer), slots)`; attend with
    `cache.block_tables(ids)` and `cache.seq_lens(ids)`. An fp8 cache also passes `k_scale=cache.k_scale(layer),
    v_scale=cache.v_scale(layer)` to the write and to the attention ops.

    dtype: float16, bfloat16, float32, or fp8 (float8_e4m3fn, float8_e5m2). k_scale, v_scale (fp8 only; None means
    1.0): a float, or a float32 tensor that broadcasts to (num_layers, num_kv_heads); each a finite scale in
    [2**-126, 3.4e38 / the format's largest value]. Raises TypeError/ValueError naming the argument otherwise.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu",
                 k_scale: float | torch.Tensor | None = None, v_scale: float | torch.Tensor | None = None):
        for name, value in (("num_layers", num_layers), ("num_blocks", num_blocks), ("block_size", block_size),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two (16 and 32 are usual), got {block_size}")
        _utils.check_head_dim("head_dim", head_dim)
        if dtype not in _utils.FLOAT_DTYPES + _utils.FP8_DTYPES:
            raise TypeError(f"dtype must be one of float16, bfloat16, float32, float8_e4m3fn, float8_e5m2, got {dtype}")
        scales = [self._scales(name, value, dtype, num_layers, num_kv_heads)
                  for name, value in (("k_scale", k_scale), ("v_scale", v_scale))]
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        # Zero-filled so that a never-written slot reads as 0 rather than garbage (tests and debugging).
        self._k = torch.zeros(shape, dtype=dtype, device=self.device)
        self._v = torch.zeros(shape, dtype=dtype, device=self.device)
        self._k_scale, self._v_scale = (None if t is None else t.to(self.device) for t in scales)
        # Free blocks as a stack: a freed block is reused first (it is likely still in L2).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._refs: list[int] = [0] * num_blocks
        self._tables: dict[Hashable, list[int]] = {}
        self._lens: dict[Hashable, int] = {}

    # ------------------------------------------------------------------------------------------------ storage
    def k_cache(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s K blocks, (num_blocks, block_size, num_kv_heads, head_dim): a view, written in place."""
        return self._k[self._layer(layer)]

    def v_cache(self, layer: int) -> torch.Tensor:
        return self._v[self._layer(layer)]

    def k_scale(self, layer: int) -> torch.Tensor | None:
        """Layer `layer`'s K scales, float32 (num_kv_heads,) (a view: set them in place), or None for a cache that
        is not fp8."""
        return None if self._k_scale is None else self._k_scale[self._layer(layer)]

    def v_scale(self, layer: int) -> torch.Tensor | None:
        return None if self._v_scale is None else self._v_scale[self._layer(layer)]

    @staticmethod
    def _scales(name: str, value, dtype: torch.dtype, num_layers: int, num_kv_heads: int) -> torch.Tensor | None:
        """The (num_layers, num_kv_heads) float32 scales of an fp8 cache (CPU, checked), None for another cache."""
        if dtype not in _utils.FP8_DTYPES:
            if value is not None:
                raise ValueError(f"{name} applies to fp8 caches only; this cache is {str(dtype).replace('torch.', '')}")
            return None
        if value is None:
            value = 1.0
        if isinstance(value, torch.Tensor):
            _utils.check_tensor(name, value, dtypes=(torch.float32,))
            try:
                table = value.detach().to("cpu").expand(num_layers, num_kv_heads).clone()
            except RuntimeError:
                raise ValueError(f"{name} must broadcast to (num_layers, num_kv_heads) = ({num_layers}, "
                                 f"{num_kv_heads}), got shape {tuple(value.shape)}") from None
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            table = torch.full((num_layers, num_kv_heads), _utils.kv_scale_number(name, value, dtype),
                               dtype=torch.float64).float()
        else:
            raise TypeError(f"{name} must be a float or a float32 tensor, got {value!r}")
        _utils.check_kv_scale_values(name, table, dtype)
        return table

    def _layer(self, layer: int) -> int:
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        return layer

    # ------------------------------------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def seq_ids(self) -> list[Hashable]:
        return list(self._tables)

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._tables

    def seq_len(self, seq_id: Hashable) -> int:
        self._require(seq_id, "seq_id")
        return self._lens[seq_id]

    def block_table(self, seq_id: Hashable) -> list[int]:
        """The block ids of one sequence, in token order (a copy)."""
        self._require(seq_id, "seq_id")
        return list(self._tables[seq_id])

    def block_tables(self, seq_ids: Sequence[Hashable]) -> torch.Tensor:
        """int32 (len(seq_ids), max_blocks) on the cache's device. Rows are padded with block 0: a valid id that the
        kernels never read, since they stop at each sequence's length."""
        ids = self._check_batch(seq_ids)
        width = max([len(self._tables[s]) for s in ids] + [1])
        rows = [self._tables[s] + [0] * (width - len(self._tables[s])) for s in ids]
        return torch.tensor(rows, dtype=torch.int32).reshape(len(ids), width).to(self.device)

    def seq_lens(self, seq_ids: Sequence[Hashable]) -> torch.Tensor:
        """int32 (len(seq_ids),): tokens reserved so far per sequence, on the cache's device."""
        ids = self._check_batch(seq_ids)
        return torch.tensor([self._lens[s] for s in ids], dtype=torch.int32).to(self.device)

    # ------------------------------------------------------------------------------------------------ changes
    def append(self, seq_id: Hashable, n: int) -> torch.Tensor:
        """Reserve n more token slots for seq_id (a new id starts an empty sequence). Returns the int64 slots
        (block * block_size + offset) of the n new tokens, for `paged_kv_write`.

        Raises CacheFullError, changing nothing, when the free blocks do not suffice.
        """
        if not isinstance(n, int) or isinstance(n, bool):
            raise TypeError(f"n must be an int, got {n!r}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        try:
            hash(seq_id)
        except TypeError:
            raise TypeError(f"seq_id must be hashable, got {type(seq_id).__name__}") from None
        table = self._tables.get(seq_id, [])
        length = self._lens.get(seq_id, 0)
        bs = self.block_size

        # Plan: how many new blocks, and whether the partly filled last block is shared and must be copied first.
        cow = n > 0 and length % bs != 0 and self._refs[table[-1]] > 1
        new_blocks = _utils.cdiv(length + n, bs) - len(table)
        needed = new_blocks + (1 if cow else 0)
        if needed > len(self._free):
            raise CacheFullError(f"append({seq_id!r}, {n}) needs {needed} free blocks, the cache has "
                                 f"{len(self._free)} of {self.num_blocks}")

        # Commit: nothing below can fail.
        table = list(table)
        if cow:
            old, new = table[-1], self._free.pop()
            self._k[:, new].copy_(self._k[:, old])  # every layer at once
            self._v[:, new].copy_(self._v[:, old])
            self._refs[old] -= 1
            self._refs[new] = 1
            table[-1] = new
        for _ in range(new_blocks):
            blk = self._free.pop()
            self._refs[blk] = 1
            table.append(blk)
        self._tables[seq_id] = table
        self._lens[seq_id] = length + n
        pos = range(length, length + n)
        slots = [table[p // bs] * bs + p % bs for p in pos]
        return _utils.to_device(torch.tensor(slots, dtype=torch.int64), self.device)   # no wait for the device

    def fork(self, src_seq_id: Hashable, new_seq_id: Hashable) -> None:
        """new_seq_id shares all of src's blocks and its length; later appends to either copy a shared, partly
        filled block before writing into it."""
        self._require(src_seq_id, "src_seq_id")
        try:
            hash(new_seq_id)
        except TypeError:
            raise TypeError(f"new_seq_id must be hashable, got {type(new_seq_id).__name__}") from None
        if new_seq_id in self._tables:
            raise ValueError(f"new_seq_id {new_seq_id!r} already exists; fork needs a fresh id")
        table = list(self._tables[src_seq_id])
        for blk in table:
            self._refs[blk] += 1
        self._tables[new_seq_id] = table
        self._lens[new_seq_id] = self._lens[src_seq_id]

    def truncate(self, seq_id: Hashable, num_tokens: int) -> None:
        """Keep the first num_tokens tokens of seq_id (0 <= num_tokens <= its length), e.g. to roll back the draft
        tokens a speculative step rejected. Blocks left without a token are released (freed when no other sequence
        shares them). The kept part needs nothing else: if its last block is partly filled and shared, the next
        append copies it first (copy-on-write, as after `fork`); slots past the new length are never read."""
        self._require(seq_id, "seq_id")
        if not isinstance(num_tokens, int) or isinstance(num_tokens, bool):
            raise TypeError(f"num_tokens must be an int, got {num_tokens!r}")
        length = self._lens[seq_id]
        if not 0 <= num_tokens <= length:
            raise ValueError(f"num_tokens must be in [0, {length}] (the length of {seq_id!r}), got {num_tokens}")
        table = self._tables[seq_id]
        keep = _utils.cdiv(num_tokens, self.block_size)
        self._release(table[keep:])
        del table[keep:]
        self._lens[seq_id] = num_tokens

    def free(self, seq_id: Hashable) -> None:
        """Drop a sequence; blocks no other sequence shares return to the free pool."""
        self._require(seq_id, "seq_id")
        self._release(self._tables.pop(seq_id))
        del self._lens[seq_id]

    def _release(self, blocks: list[int]) -> None:
        """Drop one reference to each block; unshared ones return to the free pool (last block first, so the
        stack hands out the first block first again)."""
        for blk in reversed(blocks):
            self._refs[blk] -= 1
            if self._refs[blk] == 0:
                self._free.append(blk)

    # ------------------------------------------------------------------------------------------------ checks
    def _require(self, seq_id: Hashable, name: str) -> None:
        try:
            known = seq_id in self._tables
        except TypeError:
            raise TypeError(f"{name} must be hashable, got {type(seq_id).__name__}") from None
        if not known:
            raise ValueError(f"{name}: unknown sequence {seq_id!r}")

    def _check_batch(self, seq_ids: Sequence[Hashable]) -> list[Hashable]:
        if isinstance(seq_ids, (str, bytes)) or not hasattr(seq_ids, "__iter__"):
            raise TypeError(f"seq_ids must be a sequence of ids, got {seq_ids!r}")
        ids = list(seq_ids)
        for s in ids:
            self._require(s, "seq_ids")
        if len(set(ids)) != len(ids):
            raise ValueError(f"seq_ids contains duplicates: {ids!r}; each sequence may appear once in a batch")
        return ids

    def __repr__(self) -> str:
        return (f"PagedKVCache(num_layers={self.num_layers}, num_blocks={self.num_blocks}, "
                f"block_size={self.block_size}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"dtype={self.dtype}, device={self.device}, sequences={len(self._tables)}, "
                f"free_blocks={self.num_free_blocks})")
