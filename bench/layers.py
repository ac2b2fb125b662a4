"""RMSNorm, fused residual add + RMSNorm, and RoPE: llmkern against the PyTorch code Hugging Face models run.

Shapes are Llama-3-8B's (hidden 4096, 32 query / 8 KV heads of 128) and Llama-3-70B's hidden 8192, at 16 tokens (a
decode batch) and 4096 / 16384 tokens (prefill chunks), in bf16. Peers in the same run: the eager PyTorch of
transformers' LlamaRMSNorm (float32 statistics, the same roundings), `residual + x` followed by it, and
transformers' `apply_rotary_pos_emb` on the (batch, heads, seq, head_dim) views the attention modules pass; and
torch.nn.functional.rms_norm where torch has it.

These ops do no matmul: FLOPs are reported as 0 and the bound is HBM bandwidth (llmkern.perf.rmsnorm_bytes,
rope_bytes), so GB/s is the figure of merit. On CPU (no CUDA): Llama-3-8B's hidden 4096 and heads at 16 tokens (a
decode batch) and 1024 tokens (a prefill chunk), through the CPU path (the C++ backend when it builds), against
the same eager PyTorch peers; --quick: 16 tokens.
"""
from __future__ import annotations

from typing import Iterable

import torch

from llmkern import layers, perf, reference
from llmkern.bench.common import Case

HIDDEN = [4096, 8192]           # Llama-3-8B, Llama-3-70B
TOKENS = [16, 4096, 16384]      # a decode batch; prefill chunks
CPU_TOKENS = [16, 1024]
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128   # Llama-3-8B attention


def _hf_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward, verbatim in effect."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def _hf_rope(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb on (batch, heads, seq, head_dim) with (batch, seq, head_dim) tables."""
    def rotate_half(x):
        return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _norm_cases(tokens: int, hidden: int, dtype: torch.dtype, device) -> Iterable[Case]:
    elem = perf.dtype_bytes(dtype)
    shape = dict(tokens=tokens, hidden=hidden, dtype=str(dtype).replace("torch.", ""))
    plain, fused = perf.rmsnorm_bytes(tokens, hidden, elem), perf.rmsnorm_bytes(tokens, hidden, elem, residual=True)

    def inputs():
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(tokens, hidden, device=device, generator=g).to(dtype)
        r = torch.randn(tokens, hidden, device=device, generator=g).to(dtype)
        return x, r, torch.ones(hidden, dtype=dtype, device=device)

    def make(fn):
        def build():
            x, r, w = inputs()
            return lambda: fn(x, r, w)
        return build

    yield Case("rmsnorm", "llmkern", shape, 0.0, plain, make(lambda x, r, w: layers.rms_norm(x, w, 1e-5)),
               tensor_cores=False)
    yield Case("rmsnorm", "torch_hf_eager", shape, 0.0, plain, make(lambda x, r, w: _hf_rms_norm(x, w, 1e-5)),
               tensor_cores=False)
    if hasattr(torch.nn.functional, "rms_norm"):
        yield Case("rmsnorm", "torch_F_rms_norm", shape, 0.0, plain,
                   make(lambda x, r, w: torch.nn.functional.rms_norm(x, (hidden,), w, 1e-5)), tensor_cores=False,
                   note="no Llama rounding before the weight multiply")
    yield Case("add_rmsnorm", "llmkern", shape, 0.0, fused,
               make(lambda x, r, w: layers.add_rms_norm(x, r, w, 1e-5)), tensor_cores=False)

    def eager_add(x, r, w):
        h = r + x
        return _hf_rms_norm(h, w, 1e-5), h
    yield Case("add_rmsnorm", "torch_hf_eager", shape, 0.0, fused, make(eager_add), tensor_cores=False)


def _rope_cases(tokens: int, dtype: torch.dtype, device) -> Iterable[Case]:
    batch = 16 if tokens == 16 else 1      # decode: 16 sequences of 1 token; prefill: 1 sequence of `tokens`
    seq = tokens // batch
    shape = dict(batch=batch, seq=seq, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                 dtype=str(dtype).replace("torch.", ""))
    nbytes = perf.rope_bytes(tokens, HEADS, KV_HEADS, HEAD_DIM, perf.dtype_bytes(dtype))

    def inputs():
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(batch, seq, HEADS, HEAD_DIM, device=device, generator=g).to(dtype)
        k = torch.randn(batch, seq, KV_HEADS, HEAD_DIM, device=device, generator=g).to(dtype)
        pos = torch.arange(seq, device=device)[None].expand(batch, seq) + 4000   # a deep decode position
        cos, sin = reference.rope_cos_sin(pos, HEAD_DIM, 500000.0)
        return q, k, pos, cos.to(dtype), sin.to(dtype)

    def make(fn):
        def build():
            q, k, pos, cos, sin = inputs()
            return lambda: fn(q, k, pos, cos, sin)
        return build

    yield Case("rope", "llmkern_positions", shape, 0.0, nbytes,
               make(lambda q, k, pos, c, s: layers.apply_rope(q, k, pos, theta=500000.0)), tensor_cores=False)
    yield Case("rope", "llmkern_hf_tables", shape, 0.0, nbytes,
               make(lambda q, k, pos, c, s: layers.apply_rope(q, k, cos=c, sin=s)), tensor_cores=False)
    yield Case("rope", "torch_hf_eager", shape, 0.0, nbytes,
               make(lambda q, k, pos, c, s: _hf_rope(q.transpose(1, 2), k.transpose(1, 2), c, s)),
               tensor_cores=False)


def cases(device: torch.device, quick: bool) -> Iterable[Case]:
    dtype = torch.bfloat16
    if device.type != "cuda":
        for tokens in CPU_TOKENS[:1] if quick else CPU_TOKENS:
            yield from _norm_cases(tokens, HIDDEN[0], dtype, device)
            yield from _rope_cases(tokens, dtype, device)
        return
    for hidden in HIDDEN[:1] if quick else HIDDEN:
        for tokens in TOKENS[:2] if quick else TOKENS:
            yield from _norm_cases(tokens, hidden, dtype, device)
    for tokens in TOKENS[:2] if quick else TOKENS:
        yield from _rope_cases(tokens, dtype, device)
