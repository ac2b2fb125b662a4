"""Prefill attention: llmkern.attention against PyTorch SDPA and flash-attn.

Heads are Llama-3-8B's (32 query heads, 8 KV heads, head_dim 128), causal, bf16, over sequence lengths 512 .. 16k
with the batch chosen so every shape holds 16k tokens (the work per shape then grows with the sequence length, as
causal attention's FLOPs are quadratic in it). Peers in the same run:
  * torch_sdpa_flash, torch_sdpa_cudnn (CUDA): torch.nn.functional.scaled_dot_product_attention pinned to its
    FlashAttention-2 and its cuDNN backend (`torch.nn.attention.sdpa_kernel`, entered inside each timed call), on
    (batch, heads, seq, dim) tensors with K/V repeated to 32 heads beforehand (outside the timing), since the flash
    backend does not take grouped heads; on CPU, torch_sdpa with PyTorch's own backend choice;
  * flash_attn: flash_attn_func (FlashAttention-2, native GQA) when the package is importable.
FLOPs and bytes come from llmkern.perf (attention_pairs/attention_flops/attention_bytes), the same for every
implementation: they describe the problem, not what an implementation happens to move. `summarize` prints each
shape's speedup over SDPA.

Variants (one shape: 4 x 4096 tokens on CUDA, the CPU shape in fp32 on CPU; the same heads): `variant=alibi` (llmkern.alibi_slopes(32)) against
flash_attn_func(alibi_slopes=...) when installed and SDPA with the ALiBi bias materialized as an additive
(heads, seq, seq) mask, built outside the timing (what code without a fused kernel does); `variant=sinks` (gpt-oss
sinks), whose peer is llmkern's own plain causal call: the cost of the sink. A variant's FLOPs and bytes are the
plain problem's (the bias and the sink add O(pairs) scalar work and no HBM traffic).

MLA chunked prefill (llmkern.mla_prefill_attention, DeepSeek-V3's kv_lora_rank 512 + rope 64, 128 heads, one
sequence): a chunk of 512 new tokens after a cached prefix of 0, 4k and 16k tokens, causal and bottom-right aligned,
against SDPA over the latents gathered into one contiguous key tensor whose first 512 columns are the values (one KV
head, enable_gqa, an explicit bottom-right mask). FLOPs and bytes: perf.mla_attention_flops/bytes (the absorbed
form, the latents read once).

On CPU (no CUDA): one 1024-token causal prompt with the same heads, in fp32 and bf16, through the CPU path (the C++
backend when it builds) against SDPA on PyTorch's CPU kernels, with the measured fp32 matmul rate as the compute
roof; --quick: 256 tokens in fp32.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

import llmkern
from llmkern import perf
from llmkern.attention import attention
from llmkern.mla import mla_prefill_attention
from llmkern.bench.common import Case, optional_import

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128   # Llama-3-8B (config.json: 32 attention heads, 8 KV heads, 4096/32)
TOKENS = 16384                                   # tokens per shape: batch = TOKENS // seqlen
SEQLENS = [512, 1024, 2048, 4096, 8192, 16384]
QUICK_SEQLENS = [1024, 8192]
VARIANT_BATCH, VARIANT_SEQLEN = 4, 4096
# CPU: (batch, seqlen, heads, kv_heads, head_dim), small enough for the reference in well under a second.
CPU_SHAPES = [(1, 1024, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM)]   # (batch, seqlen, heads, kv_heads, head_dim)
CPU_QUICK = [(1, 256, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM)]
MLA_RANK, MLA_ROPE, MLA_HEADS = 512, 64, 128      # DeepSeek-V3 config.json: kv_lora_rank, qk_rope_head_dim, heads
MLA_SCALE = 192 ** -0.5                           # 1 / sqrt(qk_nope_head_dim + qk_rope_head_dim)
MLA_CHUNK, MLA_PREFIXES, MLA_BLOCK_SIZE = 512, [0, 4096, 16384], 64
MLA_CPU = [(64, 64, 16)]                          # (chunk, prefix, heads): small, the C++ backend's prefill


def _shape(batch, seqlen, h, hk, d, dtype, variant=None) -> dict:
    shape = dict(batch=batch, seqlen=seqlen, heads=h, kv_heads=hk, head_dim=d, causal=True,
                 dtype=str(dtype).replace("torch.", ""))
    return shape if variant is None else dict(shape, variant=variant)


def _cost(batch, seqlen, h, hk, d, dtype) -> tuple[float, float]:
    pairs = perf.attention_pairs(seqlen, seqlen, causal=True)
    flops = perf.attention_flops(batch, h, d, pairs)
    nbytes = perf.attention_bytes(batch, seqlen, seqlen, h, hk, d, perf.dtype_bytes(dtype))
    return flops, nbytes


def _inputs(batch, seqlen, h, hk, d, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, seqlen, h, d, dtype=dtype, device=device, generator=g)
    k = torch.randn(batch, seqlen, hk, d, dtype=dtype, device=device, generator=g)
    v = torch.randn(batch, seqlen, hk, d, dtype=dtype, device=device, generator=g)
    return q, k, v


def _cases_for(batch, seqlen, h, hk, d, dtype, device, flash_attn) -> Iterable[Case]:
    shape = _shape(batch, seqlen, h, hk, d, dtype)
    flops, nbytes = _cost(batch, seqlen, h, hk, d, dtype)

    def make_llmkern():
        q, k, v = _inputs(batch, seqlen, h, hk, d, dtype, device)
        return lambda: attention(q, k, v, causal=True)
    yield Case(op="attention_prefill", impl="llmkern", shape=shape, flops=flops, nbytes=nbytes, make=make_llmkern)

    for impl, backend in _sdpa_backends(device):
        def make_sdpa(backend=backend):
            q, k, v = _inputs(batch, seqlen, h, hk, d, dtype, device)
            # SDPA's layout (batch, heads, seq, dim), K/V repeated per query head, all prepared outside the timing
            qt = q.transpose(1, 2).contiguous()
            kt = k.transpose(1, 2).repeat_interleave(h // hk, dim=1).contiguous()
            vt = v.transpose(1, 2).repeat_interleave(h // hk, dim=1).contiguous()
            if backend is None:
                return lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
            from torch.nn.attention import sdpa_kernel

            def run():
                with sdpa_kernel(backend):     # raises "No available kernel" when the backend cannot take the inputs
                    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
            return run
        yield Case(op="attention_prefill", impl=impl, shape=shape, flops=flops, nbytes=nbytes, make=make_sdpa,
                   note="K/V repeated to num_heads outside the timing")

    if flash_attn is not None and device.type == "cuda":
        def make_fa():
            q, k, v = _inputs(batch, seqlen, h, hk, d, dtype, device)
            return lambda: flash_attn.flash_attn_func(q, k, v, causal=True)
        yield Case(op="attention_prefill", impl="flash_attn", shape=shape, flops=flops, nbytes=nbytes,
                   make=make_fa)


def _mla_cases(chunk, prefix, h, dtype, device) -> Iterable[Case]:
    """One sequence: `chunk` new tokens after `prefix` cached ones, all in a paged latent cache."""
    total = prefix + chunk
    shape = dict(batch=1, seqlen=chunk, prefix=prefix, heads=h, kv_lora_rank=MLA_RANK, rope_dim=MLA_ROPE,
                 causal=True, dtype=str(dtype).replace("torch.", ""))
    flops = perf.mla_attention_flops(perf.attention_pairs(chunk, total, causal=True), h, MLA_RANK, MLA_ROPE)
    nbytes = perf.mla_attention_bytes(total, chunk, h, MLA_RANK, MLA_ROPE, perf.dtype_bytes(dtype))

    def inputs():
        g = torch.Generator(device="cpu").manual_seed(0)
        q = torch.randn(chunk, h, MLA_RANK + MLA_ROPE, generator=g).to(dtype).to(device)
        latents = torch.randn(total, MLA_RANK + MLA_ROPE, generator=g).to(dtype).to(device)
        return q, latents

    def make_llmkern():
        q, latents = inputs()
        blocks = -(-total // MLA_BLOCK_SIZE)
        joint = torch.zeros(blocks, MLA_BLOCK_SIZE, MLA_RANK + MLA_ROPE, dtype=dtype, device=device)
        joint.view(-1, MLA_RANK + MLA_ROPE)[:total] = latents
        bt = torch.arange(blocks, dtype=torch.int32, device=device)[None]
        cu = torch.tensor([0, chunk], dtype=torch.int32, device=device)
        sl = torch.tensor([total], dtype=torch.int32, device=device)
        return lambda: mla_prefill_attention(q[..., :MLA_RANK], q[..., MLA_RANK:], joint[..., :MLA_RANK],
                                             joint[..., MLA_RANK:], bt, cu, sl, scale=MLA_SCALE)
    yield Case(op="mla_prefill", impl="llmkern", shape=shape, flops=flops, nbytes=nbytes, make=make_llmkern,
               note=f"paged latents, block_size {MLA_BLOCK_SIZE}")

    def make_sdpa():
        q, latents = inputs()
        qt, k = q.transpose(0, 1)[None], latents[None, None]        # (1, h, chunk, 576), (1, 1, total, 576)
        # bottom-right causal: new token i sees keys j <= prefix + i
        mask = torch.ones(chunk, total, dtype=torch.bool, device=device).tril(diagonal=prefix)
        return lambda: F.scaled_dot_product_attention(qt, k, k[..., :MLA_RANK], attn_mask=mask, scale=MLA_SCALE,
                                                      enable_gqa=True)
    yield Case(op="mla_prefill", impl="torch_sdpa", shape=shape, flops=flops, nbytes=nbytes, make=make_sdpa,
               note="contiguous latents, one KV head of 576 / 512, explicit bottom-right mask")


def _variant_cases(batch, seqlen, h, hk, d, dtype, device, flash_attn) -> Iterable[Case]:
    """ALiBi and sinks (module docstring)."""
    flops, nbytes = _cost(batch, seqlen, h, hk, d, dtype)
    alibi = _shape(batch, seqlen, h, hk, d, dtype, "alibi")

    def slopes():   # made in each make(): listing the cases touches no device
        return llmkern.alibi_slopes(h).to(device)

    def make_alibi():
        q, k, v = _inputs(batch, seqlen, h, hk, d, dtype, device)
        s = slopes()
        return lambda: attention(q, k, v, causal=True, alibi_slopes=s)
    yield Case(op="attention_prefill", impl="llmkern", shape=alibi, flops=flops, nbytes=nbytes, make=make_alibi)

    def make_sdpa_bias():
        q, k, v = _inputs(batch, seqlen, h, hk, d, dtype, device)
        qt = q.transpose(1, 2).contiguous()
        kt = k.transpose(1, 2).repeat_interleave(h // hk, dim=1).contiguous()
        vt = v.transpose(1, 2).repeat_interleave(h // hk, dim=1).contiguous()
        i = torch.arange(seqlen, device=device)
        bias = -slopes()[:, None, None] * (i[:, None] - i[None, :]).abs().float()
        bias = bias.masked_fill(i[None, :] > i[:, None], float("-inf")).to(dtype)   # causal, in the bias
        return lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=bias)
    yield Case(op="attention_prefill", impl="torch_sdpa_bias", shape=alibi, flops=flops, nbytes=nbytes,
               make=make_sdpa_bias, note="ALiBi + causal as a materialized (heads, seq, seq) additive mask")

    if flash_attn is not None:
        def make_fa():
            q, k, v = _inputs(batch, seqlen, h, hk, d, dtype, device)
            s = slopes()
            return lambda: flash_attn.flash_attn_func(q, k, v, causal=True, alibi_slopes=s)
        yield Case(op="attention_prefill", impl="flash_attn", shape=alibi, flops=flops, nbytes=nbytes, make=make_fa)

    sink_shape = _shape(batch, seqlen, h, hk, d, dtype, "sinks")

    def make_sinks(with_sinks: bool):
        q, k, v = _inputs(batch, seqlen, h, hk, d, dtype, device)
        sinks = torch.linspace(-2.0, 2.0, h, device=device) if with_sinks else None
        return lambda: attention(q, k, v, causal=True, sinks=sinks)
    yield Case(op="attention_prefill", impl="llmkern", shape=sink_shape, flops=flops, nbytes=nbytes,
               make=lambda: make_sinks(True))
    yield Case(op="attention_prefill", impl="llmkern_no_sinks", shape=sink_shape, flops=flops, nbytes=nbytes,
               make=lambda: make_sinks(False), note="the same call without sinks: the sink's cost")


def _sdpa_backends(device: torch.device) -> list[tuple[str, object]]:
    """(impl name, SDPBackend) of the SDPA peers: on CUDA the flash and cuDNN backends, each when this PyTorch has
    it; elsewhere one peer with PyTorch's own choice (backend None)."""
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:                     # PyTorch < 2.3
        return [("torch_sdpa", None)]
    if device.type != "cuda":
        return [("torch_sdpa", None)]
    names = {"torch_sdpa_flash": "FLASH_ATTENTION", "torch_sdpa_cudnn": "CUDNN_ATTENTION"}
    return [(impl, getattr(SDPBackend, b)) for impl, b in names.items() if hasattr(SDPBackend, b)]


def cases(device: torch.device, quick: bool) -> Iterable[Case]:
    flash_attn = optional_import("flash_attn")
    if device.type != "cuda":
        for batch, seqlen, h, hk, d in CPU_QUICK if quick else CPU_SHAPES:
            for dtype in (torch.float32,) if quick else (torch.float32, torch.bfloat16):
                yield from _cases_for(batch, seqlen, h, hk, d, dtype, device, None)
            if not quick:
                yield from _variant_cases(batch, seqlen, h, hk, d, torch.float32, device, None)
        for chunk, prefix, h in MLA_CPU:
            yield from _mla_cases(chunk, prefix, h, torch.float32, device)
        return
    for seqlen in QUICK_SEQLENS if quick else SEQLENS:
        yield from _cases_for(max(1, TOKENS // seqlen), seqlen, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, torch.bfloat16,
                              device, flash_attn)
    for prefix in MLA_PREFIXES[-1:] if quick else MLA_PREFIXES:
        yield from _mla_cases(MLA_CHUNK, prefix, MLA_HEADS, torch.bfloat16, device)
    yield from _variant_cases(VARIANT_BATCH, VARIANT_SEQLEN, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, torch.bfloat16,
                              device, flash_attn)


def summarize(records: list[dict]) -> str:
    """Per shape: llmkern's time and its speedup over each peer that ran (SDPA backends, flash-attn)."""
    by_shape: dict[str, dict[str, float]] = {}
    for r in records:
        mla = f"mla prefix={r['shape']['prefix']} " if r["op"] == "mla_prefill" else ""
        key = f"{mla}b={r['shape']['batch']} s={r['shape']['seqlen']} {r['shape']['dtype']} " \
              f"{r['shape'].get('variant', '')}".strip()
        by_shape.setdefault(key, {})[r["impl"]] = r["median_ms"]
    peers = sorted({r["impl"] for r in records} - {"llmkern"})
    lines = ["", f"{'shape':<26} {'llmkern ms':>11} " + " ".join(f"{'vs ' + p:>20}" for p in peers)]
    for key, t in by_shape.items():
        if "llmkern" not in t:
            continue
        ours = t["llmkern"]
        vs = lambda peer: f"{t[peer] / ours:.2f}x" if peer in t else "-"  # noqa: E731
        lines.append(f"{key:<26} {ours:>11.4f} " + " ".join(f"{vs(p):>20}" for p in peers))
    return "\n".join(lines)
