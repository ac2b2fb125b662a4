"""Decode attention over a paged KV cache: llmkern.paged_decode_attention against PyTorch SDPA, flash-attn and
FlashInfer.

One new token per sequence attends to its whole cached context; every sequence in a shape has the same length.
Shapes (bf16, block_size 16, block tables a random permutation of the cache's blocks, as a long-running server's
cache looks):
  * Llama-3-8B heads (32 query heads, 8 KV heads, head_dim 128) over batch 1..256 x context 512..32k, skipping
    combinations whose K/V would take more than a quarter of the GPU's memory;
  * an MQA shape (32 query heads, 1 KV head, head_dim 128: PaLM / Falcon style) and an MHA shape (Llama-2-7B: 32/32,
    head_dim 128) over a smaller grid.
Bytes are `perf.decode_attention_bytes`: every cached K/V element once plus q and o, the traffic decode cannot
avoid; GB/s and "% of memory roofline" against the device's HBM bandwidth show how close to memory-bound it runs.
FLOPs (`perf.decode_attention_flops`) are reported but are not the bound.

Peers in the same run:
  * torch_sdpa: scaled_dot_product_attention over K/V already gathered into contiguous (batch, kv_heads, ctx, dim)
    tensors (the gather is outside the timing: this is what a dense, non-paged cache costs), with enable_gqa when
    the installed PyTorch has it, else K/V repeated per query head beforehand;
  * flash_attn: flash_attn_with_kvcache with its paged cache (FlashAttention-2 requires pages of 256 tokens, so its
    cache uses block_size 256), when importable;
  * flashinfer: BatchDecodeWithPagedKVCacheWrapper on the very same NHD pages and block ids as llmkern, when
    importable.

MLA (DeepSeek-V3's multi-head latent attention, llmkern.mla_decode_attention): one latent cache of kv_lora_rank 512
+ rope 64 per token shared by every head, absorbed queries, 128 heads (one GPU) and 16 (DeepSeek-V3 split over 8
GPUs by heads), batch 1/16/64 x context 8k and 64 x 32k, block_size 64 (FlashMLA's page). Bytes
`perf.mla_attention_bytes`: the latents once (for all heads, however many row tiles load them: the record's note
says how many, llmkern.mla.decode_row_tiles), q and o. Peers: torch_sdpa over the latents gathered into
one contiguous (batch, 1, ctx, 576) key tensor whose first 512 columns are the values (one KV head for every query
head, enable_gqa), and FlashInfer's BatchMLAPagedAttentionWrapper on the very same pages, when importable.

Mixed batches (op "mixed_attention", issue 11): one prompt chunk of `chunk` tokens over a cached prefix next to
`decodes` sequences decoding one token each, every sequence holding `context` tokens after the step (on CUDA: a
chunk of 512 + 63 decodes at context 2048, Llama-3-8B heads, bf16). Bytes and FLOPs: `perf.paged_attention_bytes` /
`paged_attention_flops` (K/V of every sequence once; causal pairs of the chunk). Implementations, each timed per
layer with its plans made outside the timing (a plan is made once per step and shared by every layer):
  * llmkern: PagedAttentionPlan.run, one launch for the whole step;
  * llmkern_two_launches: a decode plan's run for the decode tokens and a prefill plan's run for the chunk, what the
    step costs without the unified kernel;
  * llmkern_oneshot: llmkern.paged_prefill_attention over the mixed batch, planning (and its host sync) inside the
    timing, what a layer costs without a plan;
  * flashinfer: BatchPrefillWithPagedKVCacheWrapper on the same NHD pages and block ids, plan() outside the timing,
    when importable.

fp8 KV cache (issue 12, impl "llmkern_fp8", every decode shape): the same call over an fp8 copy of the cache
(float8_e4m3fn on compute capability 8.9+, else float8_e5m2; per-KV-head scales amax / the format's largest value, as
vLLM calibrates them), one byte per K/V element (`perf.decode_attention_bytes(kv_elem=1)`). The summary's "fp8 x" is
the bf16 call's time / the fp8 call's (issue 12's target: >= 1.7x at batch 64, context 8k, where the cache is nearly
all the bytes); the record's note gives the fp8 output's max |error| against the bf16 cache's output on the same data.
On CPU the fp8 call runs on the C++ backend (fp8 loaded exactly as fp32 in the decode loops, the scales folded into
q and the output), next to its bf16 call: fp8 halves the bytes but adds the conversion's instructions.

On CPU (no CUDA): the issue-15 target shape, batch 8 x context 2048 with Llama-3-8B heads, in fp32 and bf16 caches,
through the CPU path (the C++ backend when it builds) against SDPA over gathered K/V, with the measured STREAM read
bandwidth as the roof (bench.common.measured_cpu_peak); --quick runs a batch of 2 x 512 in fp32. MLA on CPU: the
same batch and context with 16 heads in bf16 (C++ backend, csrc/mla.cpp), against SDPA over the gathered latents.
Its "% of roof" stays low by nature: at 16 heads MLA decode does about 30 FLOPs per latent byte (1.9 x heads), so a
CPU core's FMA rate, not memory, bounds it.
"""
from __future__ import annotations

import itertools
from typing import Iterable

import torch
import torch.nn.functional as F

from llmkern import perf, reference
from llmkern.bench.common import Case, optional_import
from llmkern.mla import decode_row_tiles, mla_decode_attention
from llmkern.paged_attention import PagedAttentionPlan, paged_decode_attention, paged_prefill_attention

BLOCK_SIZE = 16                                   # vLLM's default block size
LLAMA3 = (32, 8, 128)                             # Llama-3-8B config.json: 32 heads, 8 KV heads, 4096 / 32
MQA = (32, 1, 128)
MHA = (32, 32, 128)                               # Llama-2-7B
BATCHES = [1, 4, 16, 64, 256]
CONTEXTS = [512, 1024, 2048, 8192, 32768]
SMALL_GRID = [(1, 8192), (16, 2048), (64, 4096)]  # (batch, context) for the MQA and MHA shapes
QUICK = [(1, 32768), (64, 2048)]
MEMORY_FRACTION = 0.25                            # K/V of a shape may take this much of the GPU (peers copy it)
CPU_SHAPES = [(8, 2048, *LLAMA3)]                 # (batch, context, heads, kv_heads, head_dim)
CPU_QUICK = [(2, 512, *LLAMA3)]
MLA_RANK, MLA_ROPE = 512, 64                      # DeepSeek-V3 config.json: kv_lora_rank, qk_rope_head_dim
MLA_SCALE = 192 ** -0.5                           # 1 / sqrt(qk_nope_head_dim + qk_rope_head_dim)
MLA_BLOCK_SIZE = 64                               # FlashMLA's page size
MLA_HEADS = (128, 16)                             # DeepSeek-V3's heads on one GPU, and per GPU with 8-way TP
MLA_GRID = [(1, 8192), (16, 8192), (64, 8192), (64, 32768)]
MLA_QUICK = [(64, 8192)]
MLA_CPU = [(8, 2048, 16, torch.bfloat16)]         # (batch, context, heads, dtype): issue 15's decode shape
MLA_CPU_QUICK = [(2, 512, 16, torch.float32)]
MIXED = (512, 63, 2048)                           # (prompt chunk, decode sequences, context): issue 11's example
CPU_MIXED = (64, 7, 256)                          # the same step, small enough for a CPU run


def _shape(batch, ctx, h, hk, d, dtype) -> dict:
    return dict(batch=batch, context=ctx, heads=h, kv_heads=hk, head_dim=d, dtype=str(dtype).replace("torch.", ""))


def _paged(batch, ctx, hk, d, dtype, device, block_size):
    """A cache holding exactly the batch's blocks, in a random order, and the matching tables and lengths."""
    g = torch.Generator(device="cpu").manual_seed(0)
    per_seq = -(-ctx // block_size)
    num_blocks = batch * per_seq
    k_cache = torch.randn(num_blocks, block_size, hk, d, dtype=dtype, device=device)
    v_cache = torch.randn(num_blocks, block_size, hk, d, dtype=dtype, device=device)
    tables = torch.randperm(num_blocks, generator=g).to(torch.int32).reshape(batch, per_seq).to(device)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    return k_cache, v_cache, tables, seq_lens


def _cases_for(batch, ctx, h, hk, d, dtype, device, flash_attn, flashinfer) -> Iterable[Case]:
    shape = _shape(batch, ctx, h, hk, d, dtype)
    lens = [ctx] * batch
    flops = perf.decode_attention_flops(lens, h, d)
    nbytes = perf.decode_attention_bytes(lens, h, hk, d, perf.dtype_bytes(dtype))

    def q_new():
        return torch.randn(batch, h, d, dtype=dtype, device=device)

    def make_llmkern():
        kc, vc, bt, sl = _paged(batch, ctx, hk, d, dtype, device, BLOCK_SIZE)
        q = q_new()
        return lambda: paged_decode_attention(q, kc, vc, bt, sl)
    yield Case(op="decode_attention", impl="llmkern", shape=shape, flops=flops, nbytes=nbytes, make=make_llmkern,
               note=f"block_size {BLOCK_SIZE}, split-KV chosen automatically")
    yield _fp8_case(batch, ctx, h, hk, d, dtype, device, shape, flops)

    def make_sdpa():
        q = q_new()[:, :, None]                                     # (batch, heads, 1, dim)
        k = torch.randn(batch, hk, ctx, d, dtype=dtype, device=device)
        v = torch.randn(batch, hk, ctx, d, dtype=dtype, device=device)
        try:
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        except TypeError:                                           # PyTorch < 2.5 has no enable_gqa
            kr, vr = k.repeat_interleave(h // hk, dim=1), v.repeat_interleave(h // hk, dim=1)
            return lambda: F.scaled_dot_product_attention(q, kr, vr)
    yield Case(op="decode_attention", impl="torch_sdpa", shape=shape, flops=flops, nbytes=nbytes, make=make_sdpa,
               note="contiguous K/V (gathered outside the timing)")

    if device.type != "cuda":
        return
    if flash_attn is not None and hasattr(flash_attn, "flash_attn_with_kvcache"):
        def make_fa():
            kc, vc, bt, sl = _paged(batch, ctx, hk, d, dtype, device, 256)
            q = q_new()[:, None]                                    # (batch, 1, heads, dim)
            return lambda: flash_attn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=sl, block_table=bt)
        yield Case(op="decode_attention", impl="flash_attn", shape=shape, flops=flops, nbytes=nbytes, make=make_fa,
                   note="paged, block_size 256 (FlashAttention-2's minimum page)")
    if flashinfer is not None and hasattr(flashinfer, "BatchDecodeWithPagedKVCacheWrapper"):
        def make_fi():
            kc, vc, bt, sl = _paged(batch, ctx, hk, d, dtype, device, BLOCK_SIZE)
            q = q_new()
            per_seq = bt.shape[1]
            indptr = torch.arange(0, batch + 1, dtype=torch.int32, device=device) * per_seq
            indices = bt.reshape(-1)
            last = torch.full((batch,), ctx - (per_seq - 1) * BLOCK_SIZE, dtype=torch.int32, device=device)
            workspace = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device=device)  # FlashInfer docs: 128 MB
            wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
            wrapper.plan(indptr, indices, last, h, hk, d, BLOCK_SIZE, q_data_type=dtype, kv_data_type=dtype)
            return lambda: wrapper.run(q, (kc, vc))
        yield Case(op="decode_attention", impl="flashinfer", shape=shape, flops=flops, nbytes=nbytes, make=make_fi,
                   note=f"same pages as llmkern, block_size {BLOCK_SIZE}; plan() outside the timing")


def _mla_cases(batch, ctx, h, dtype, device, flashinfer) -> Iterable[Case]:
    shape = dict(batch=batch, context=ctx, heads=h, kv_lora_rank=MLA_RANK, rope_dim=MLA_ROPE,
                 dtype=str(dtype).replace("torch.", ""))
    lens = [ctx] * batch
    flops = perf.mla_attention_flops(sum(lens), h, MLA_RANK, MLA_ROPE)
    nbytes = perf.mla_attention_bytes(sum(lens), batch, h, MLA_RANK, MLA_ROPE, perf.dtype_bytes(dtype))
    per_seq = -(-ctx // MLA_BLOCK_SIZE)

    def q_new():
        return (torch.randn(batch, h, MLA_RANK, dtype=dtype, device=device),
                torch.randn(batch, h, MLA_ROPE, dtype=dtype, device=device))

    def pages():
        """One joint (blocks, block_size, 576) cache viewed as ckv and kpe (vLLM's layout), random block order."""
        g = torch.Generator(device="cpu").manual_seed(0)
        joint = torch.randn(batch * per_seq, MLA_BLOCK_SIZE, MLA_RANK + MLA_ROPE, dtype=dtype, device=device)
        tables = torch.randperm(batch * per_seq, generator=g).to(torch.int32).reshape(batch, per_seq).to(device)
        return joint[..., :MLA_RANK], joint[..., MLA_RANK:], tables, torch.full((batch,), ctx, dtype=torch.int32,
                                                                                 device=device)

    def make_llmkern():
        ckv, kpe, bt, sl = pages()
        q_nope, q_pe = q_new()
        return lambda: mla_decode_attention(q_nope, q_pe, ckv, kpe, bt, sl, scale=MLA_SCALE)
    if device.type == "cuda":
        tiles = decode_row_tiles(h, dtype, MLA_RANK)
        reads = f"{tiles} row tile(s) per (sequence, split), each loading every latent byte (bytes count them once)"
    else:   # csrc/mla.cpp: one thread per (sequence, split), all heads; later head blocks re-read from L1/L2
        reads = "C++ backend: each latent row read from memory once for all heads"
    yield Case(op="mla_decode", impl="llmkern", shape=shape, flops=flops, nbytes=nbytes, make=make_llmkern,
               note=f"block_size {MLA_BLOCK_SIZE}, split-KV chosen automatically; {reads}")

    def make_sdpa():
        q = torch.cat(q_new(), dim=-1)[:, :, None]                  # (batch, heads, 1, 576)
        k = torch.randn(batch, 1, ctx, MLA_RANK + MLA_ROPE, dtype=dtype, device=device)
        v = k[..., :MLA_RANK]                                       # the values are the latents
        try:
            F.scaled_dot_product_attention(q, k, v, scale=MLA_SCALE, enable_gqa=True)
            return lambda: F.scaled_dot_product_attention(q, k, v, scale=MLA_SCALE, enable_gqa=True)
        except TypeError:                                           # PyTorch < 2.5 has no enable_gqa
            ke, ve = k.expand(batch, h, ctx, -1), v.expand(batch, h, ctx, -1)
            return lambda: F.scaled_dot_product_attention(q, ke, ve, scale=MLA_SCALE)
    yield Case(op="mla_decode", impl="torch_sdpa", shape=shape, flops=flops, nbytes=nbytes, make=make_sdpa,
               note="contiguous latents (gathered outside the timing), one KV head of 576 / 512")

    if device.type == "cuda" and flashinfer is not None and hasattr(flashinfer, "mla"):
        def make_fi():
            ckv, kpe, bt, sl = pages()
            q_nope, q_pe = q_new()
            wrapper = flashinfer.mla.BatchMLAPagedAttentionWrapper(
                torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device=device))   # FlashInfer docs: 128 MB
            ar = torch.arange(0, batch + 1, dtype=torch.int32, device=device)
            wrapper.plan(ar, ar * per_seq, bt.reshape(-1), sl, h, MLA_RANK, MLA_ROPE, MLA_BLOCK_SIZE, False,
                         MLA_SCALE, dtype, dtype)
            return lambda: wrapper.run(q_nope, q_pe, ckv, kpe)
        yield Case(op="mla_decode", impl="flashinfer", shape=shape, flops=flops, nbytes=nbytes, make=make_fi,
                   note="BatchMLAPagedAttentionWrapper, same pages as llmkern; plan() outside the timing")


def _fp8_dtype(device: torch.device) -> torch.dtype:
    """e4m3fn where Triton builds it (compute capability 8.9+, and on CPU), else e5m2."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return torch.float8_e5m2
    return torch.float8_e4m3fn


def _fp8_case(batch, ctx, h, hk, d, dtype, device, shape, flops) -> Case:
    lens = [ctx] * batch
    case = Case(op="decode_attention", impl="llmkern_fp8", shape=shape, flops=flops,
                nbytes=perf.decode_attention_bytes(lens, h, hk, d, perf.dtype_bytes(dtype), kv_elem=1), make=None,
                note="per-KV-head scales")

    def make():   # the format is chosen here: listing cases queries no device
        cache_dtype = _fp8_dtype(device)
        case.note = f"{str(cache_dtype)[6:]} cache, " + case.note
        kc, vc, bt, sl = _paged(batch, ctx, hk, d, dtype, device, BLOCK_SIZE)
        big = torch.finfo(cache_dtype).max
        ks, vs = (c.abs().amax(dim=(0, 1, 3)).float().clamp(min=1e-6) / big for c in (kc, vc))
        kc8, vc8 = reference.quantize_kv(kc, ks, cache_dtype), reference.quantize_kv(vc, vs, cache_dtype)
        q = torch.randn(batch, h, d, dtype=dtype, device=device)
        err = (paged_decode_attention(q, kc8, vc8, bt, sl, k_scale=ks, v_scale=vs).float()
               - paged_decode_attention(q, kc, vc, bt, sl).float()).abs().max()
        case.note += f"; max |error| vs the {str(dtype)[6:]} cache {float(err):.3g}"
        del kc, vc
        return lambda: paged_decode_attention(q, kc8, vc8, bt, sl, k_scale=ks, v_scale=vs)
    case.make = make
    return case


def _mixed_step(chunk, decodes, ctx, hk, d, dtype, device, block_size=BLOCK_SIZE):
    """A cache holding the step's sequences (the chunk's first, then the decodes), all `ctx` tokens long after the
    step, in a random block order; their tables, lengths and query offsets."""
    kc, vc, bt, sl = _paged(decodes + 1, ctx, hk, d, dtype, device, block_size)
    q_lens = [chunk] + [1] * decodes
    cu = torch.tensor([0] + list(itertools.accumulate(q_lens)), dtype=torch.int32, device=device)
    return kc, vc, bt, sl, cu, q_lens


def _mixed_cases(chunk, decodes, ctx, h, hk, d, dtype, device, flashinfer) -> Iterable[Case]:
    shape = dict(chunk=chunk, decodes=decodes, context=ctx, heads=h, kv_heads=hk, head_dim=d,
                 dtype=str(dtype).replace("torch.", ""))
    lens, q_lens = [ctx] * (decodes + 1), [chunk] + [1] * decodes
    flops = perf.paged_attention_flops(lens, q_lens, h, d)
    nbytes = perf.paged_attention_bytes(lens, q_lens, h, hk, d, perf.dtype_bytes(dtype))
    common = dict(op="mixed_attention", shape=shape, flops=flops, nbytes=nbytes)

    def plan(kc, bt, sl, cu):
        return PagedAttentionPlan(bt, sl, cu, num_heads=h, num_kv_heads=hk, head_dim=d, num_blocks=kc.shape[0],
                                  block_size=BLOCK_SIZE, dtype=dtype)

    def make_llmkern():
        kc, vc, bt, sl, cu, _ = _mixed_step(chunk, decodes, ctx, hk, d, dtype, device)
        q = torch.randn(chunk + decodes, h, d, dtype=dtype, device=device)
        step, out = plan(kc, bt, sl, cu), torch.empty_like(q)
        return lambda: step.run(q, kc, vc, out=out)
    yield Case(impl="llmkern", make=make_llmkern, note="PagedAttentionPlan.run: one launch; plan outside the timing",
               **common)

    def make_two():
        kc, vc, bt, sl, cu, _ = _mixed_step(chunk, decodes, ctx, hk, d, dtype, device)
        q = torch.randn(chunk + decodes, h, d, dtype=dtype, device=device)
        prefill = plan(kc, bt[:1], sl[:1], cu[:2])
        decode = plan(kc, bt[1:], sl[1:], None)
        qp, qd = q[:chunk], q[chunk:]
        op, od = torch.empty_like(qp), torch.empty_like(qd)
        return lambda: (prefill.run(qp, kc, vc, out=op), decode.run(qd, kc, vc, out=od))
    yield Case(impl="llmkern_two_launches", make=make_two,
               note="a prefill plan's run for the chunk + a decode plan's run; plans outside the timing", **common)

    def make_oneshot():
        kc, vc, bt, sl, cu, _ = _mixed_step(chunk, decodes, ctx, hk, d, dtype, device)
        q = torch.randn(chunk + decodes, h, d, dtype=dtype, device=device)
        return lambda: paged_prefill_attention(q, kc, vc, bt, cu, sl)
    yield Case(impl="llmkern_oneshot", make=make_oneshot,
               note="paged_prefill_attention: validation sync and planning inside the timing", **common)

    if device.type == "cuda" and flashinfer is not None and hasattr(flashinfer, "BatchPrefillWithPagedKVCacheWrapper"):
        def make_fi():
            kc, vc, bt, sl, cu, _ = _mixed_step(chunk, decodes, ctx, hk, d, dtype, device)
            q = torch.randn(chunk + decodes, h, d, dtype=dtype, device=device)
            per_seq = bt.shape[1]
            indptr = torch.arange(0, decodes + 2, dtype=torch.int32, device=device) * per_seq
            last = torch.full((decodes + 1,), ctx - (per_seq - 1) * BLOCK_SIZE, dtype=torch.int32, device=device)
            workspace = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device=device)  # FlashInfer docs: 128 MB
            wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
            wrapper.plan(cu, indptr, bt.reshape(-1), last, h, hk, d, BLOCK_SIZE, causal=True, q_data_type=dtype,
                         kv_data_type=dtype)
            return lambda: wrapper.run(q, (kc, vc))
        yield Case(impl="flashinfer", make=make_fi, note="same pages as llmkern; plan() outside the timing",
                   **common)


def cases(device: torch.device, quick: bool) -> Iterable[Case]:
    if device.type != "cuda":
        for batch, ctx, h, hk, d in CPU_QUICK if quick else CPU_SHAPES:
            for dtype in (torch.float32,) if quick else (torch.float32, torch.bfloat16):
                yield from _cases_for(batch, ctx, h, hk, d, dtype, device, None, None)
        for batch, ctx, h, dtype in MLA_CPU_QUICK if quick else MLA_CPU:
            yield from _mla_cases(batch, ctx, h, dtype, device, None)
        yield from _mixed_cases(*CPU_MIXED, *LLAMA3, torch.float32, device, None)
        return
    flash_attn = optional_import("flash_attn")
    flashinfer = optional_import("flashinfer")
    budget = MEMORY_FRACTION * torch.cuda.get_device_properties(device).total_memory
    dtype = torch.bfloat16

    def fits(batch, ctx, hk, d):
        return 2 * batch * ctx * hk * d * perf.dtype_bytes(dtype) <= budget

    h, hk, d = LLAMA3
    grid = QUICK if quick else [(b, c) for b in BATCHES for c in CONTEXTS]
    for batch, ctx in grid:
        if fits(batch, ctx, hk, d):
            yield from _cases_for(batch, ctx, h, hk, d, dtype, device, flash_attn, flashinfer)
    for h, hk, d in (MQA, MHA):
        for batch, ctx in (QUICK[:1] if quick else SMALL_GRID):
            if fits(batch, ctx, hk, d):
                yield from _cases_for(batch, ctx, h, hk, d, dtype, device, flash_attn, flashinfer)
    for h in MLA_HEADS[:1] if quick else MLA_HEADS:
        for batch, ctx in MLA_QUICK if quick else MLA_GRID:
            yield from _mla_cases(batch, ctx, h, dtype, device, flashinfer)
    yield from _mixed_cases(*MIXED, *LLAMA3, dtype, device, flashinfer)


def summarize(records: list[dict]) -> str:
    """Per shape: llmkern's time, its share of the HBM bandwidth, and the peers' time relative to it."""
    by_shape: dict[str, dict[str, dict]] = {}
    mixed = [r for r in records if r["op"] == "mixed_attention"]
    for r in records:
        if r["op"] == "mixed_attention":
            continue
        s = r["shape"]
        heads = f"mla h={s['heads']}" if r["op"] == "mla_decode" else f"h={s['heads']}/{s['kv_heads']}"
        key = f"{heads} b={s['batch']} ctx={s['context']} {s['dtype']}"
        by_shape.setdefault(key, {})[r["impl"]] = r
    lines = ["", f"{'shape':<38} {'llmkern ms':>11} {'GB/s':>8} {'%roof':>6} {'vs sdpa':>8} {'vs flash_attn':>14} "
                 f"{'vs flashinfer':>14} {'fp8 x':>6}"]
    for key, t in by_shape.items():
        if "llmkern" not in t:
            continue
        ours = t["llmkern"]
        pct = "-" if ours["pct_roofline"] is None else f"{ours['pct_roofline']:.1f}"
        vs = lambda peer: f"{t[peer]['median_ms'] / ours['median_ms']:.2f}x" if peer in t else "-"  # noqa: E731
        fp8 = f"{ours['median_ms'] / t['llmkern_fp8']['median_ms']:.2f}x" if "llmkern_fp8" in t else "-"
        lines.append(f"{key:<38} {ours['median_ms']:>11.4f} {ours['gbps']:>8.1f} {pct:>6} {vs('torch_sdpa'):>8} "
                     f"{vs('flash_attn'):>14} {vs('flashinfer'):>14} {fp8:>6}")
    lines.append("(%roof: of the memory roof, HBM from the datasheet on a GPU, measured STREAM read on a CPU; vs X: X's "
                 "time / llmkern's time, > 1 means llmkern is faster; fp8 x: llmkern's time over the bf16 cache / over "
                 "the fp8 cache, > 1 means the fp8 cache is faster)")
    if any(r["op"] == "mla_decode" for r in records):
        lines.append("(mla: GB/s counts each latent byte once, however many row tiles load it; FlashMLA's anchor is "
                     "about 3000 GB/s, 90% of an H800's HBM, in memory-bound shapes (few heads); at 128 heads MLA "
                     "decode is near the compute bound, about 1.9 x heads FLOPs a latent byte)")
    lines += _summarize_mixed(mixed)
    return "\n".join(lines)


def _summarize_mixed(records: list[dict]) -> list[str]:
    """Mixed steps: each implementation's time, against llmkern's one launch."""
    if not records:
        return []
    ours = {json_key(r["shape"]): r for r in records if r["impl"] == "llmkern"}
    lines = ["", f"{'mixed step':<44} {'impl':<22} {'ms':>9} {'%roof':>6} {'vs llmkern':>11}"]
    for r in records:
        s, base = r["shape"], ours.get(json_key(r["shape"]))
        key = f"chunk {s['chunk']} + {s['decodes']} decodes, ctx {s['context']} {s['dtype']}"
        pct = "-" if r["pct_roofline"] is None else f"{r['pct_roofline']:.1f}"
        vs = f"{r['median_ms'] / base['median_ms']:.2f}x" if base else "-"
        lines.append(f"{key:<44} {r['impl']:<22} {r['median_ms']:>9.4f} {pct:>6} {vs:>11}")
    lines.append("(vs llmkern: the implementation's time / PagedAttentionPlan.run's, > 1 means the one launch is faster)")
    return lines


def json_key(shape: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(shape.items()))
