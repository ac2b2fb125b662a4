"""RMSNorm, fused residual add + RMSNorm, and RoPE: llmkern against the PyTorch code Hugging Face models run.

Shapes are Llama-3-8B's (hidden 4096, 32 query / 8 KV heads of 128) and Llama-3-70B's hidden 8192, at 16 tokens (a
decode batch) and 4096 / 16384 tokens (prefill chunks), in bf16. Peers in the same run:
  * torch_hf_eager: the eager PyTorch of transformers' LlamaRMSNorm (float32 statistics, the same roundings),
    `residual + x` followed by it, and transformers' `apply_rotary_pos_emb` on the (batch, heads, seq, head_dim)
    views the attention modules pass;
  * torch_compile: the same three functions under torch.compile (inductor on CUDA, compiled outside the timing; on
    CPU dynamo's "eager" backend, which checks the wiring without inductor's C++ build);
  * torch_F_rms_norm: torch.nn.functional.rms_norm where torch has it;
  * liger_kernel (CUDA, when importable): Liger-Kernel's Triton RMSNorm ("llama" casting), fused add + RMSNorm and
    RoPE (its functional API, on the same layouts transformers passes).

These ops do no matmul: FLOPs are reported as 0 and the bound is HBM bandwidth (llmkern.perf.rmsnorm_bytes,
rope_bytes), so GB/s is the figure of merit. On CPU (no CUDA): Llama-3-8B's hidden 4096 and heads at 16 tokens (a
decode batch) and 1024 tokens (a prefill chunk), through the CPU path (the C++ backend when it builds), against
the same eager PyTorch peers; --quick: 16 tokens.
"""
from __future__ import annotations

from typing import Iterable

import torch

from llmkern import layers, perf, reference
from llmkern.bench.common import Case, optional_import

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


def _compiled(fn, device: torch.device):
    """`fn` under torch.compile with static shapes: inductor on CUDA; dynamo's "eager" backend on CPU, where
    inductor's C++ build would dominate a smoke run."""
    return torch.compile(fn, dynamic=False, backend="inductor" if device.type == "cuda" else "eager")


def _liger(device: torch.device):
    """Liger-Kernel's functional API on CUDA when installed, else None."""
    return optional_import("liger_kernel.transformers.functional") if device.type == "cuda" else None


def _norm_cases(tokens: int, hidden: int, dtype: torch.dtype, device) -> Iterable[Case]:
    elem = perf.dtype_bytes(dtype)
    shape = dict(tokens=tokens, hidden=hidden, dtype=str(dtype).replace("torch.", ""))
    plain, fused = perf.rmsnorm_bytes(tokens, hidden, elem), perf.rmsnorm_bytes(tokens, hidden, elem, residual=True)

    def inputs():
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(tokens, hidden, device=device, generator=g).to(dtype)
        r = torch.randn(tokens, hidden, device=device, generator=g).to(dtype)
        return x, r, torch.ones(hidden, dtype=dtype, device=device)

    def make(fn, compile=False):
        def build():
            x, r, w = inputs()
            f = _compiled(fn, device) if compile else fn
            f(x, r, w)                          # compiles (torch.compile, Triton) outside the timing
            return lambda: f(x, r, w)
        return build

    def hf_norm(x, r, w):
        return _hf_rms_norm(x, w, 1e-5)

    def hf_add_norm(x, r, w):
        h = r + x
        return _hf_rms_norm(h, w, 1e-5), h

    yield Case("rmsnorm", "llmkern", shape, 0.0, plain, make(lambda x, r, w: layers.rms_norm(x, w, 1e-5)),
               tensor_cores=False)
    yield Case("rmsnorm", "torch_hf_eager", shape, 0.0, plain, make(hf_norm), tensor_cores=False)
    yield Case("rmsnorm", "torch_compile", shape, 0.0, plain, make(hf_norm, compile=True), tensor_cores=False)
    if hasattr(torch.nn.functional, "rms_norm"):
        yield Case("rmsnorm", "torch_F_rms_norm", shape, 0.0, plain,
                   make(lambda x, r, w: torch.nn.functional.rms_norm(x, (hidden,), w, 1e-5)), tensor_cores=False,
                   note="no Llama rounding before the weight multiply")
    liger = _liger(device)
    if liger is not None:
        yield Case("rmsnorm", "liger_kernel", shape, 0.0, plain,
                   make(lambda x, r, w: liger.liger_rms_norm(x, w, 1e-5)), tensor_cores=False)
    yield Case("add_rmsnorm", "llmkern", shape, 0.0, fused,
               make(lambda x, r, w: layers.add_rms_norm(x, r, w, 1e-5)), tensor_cores=False)
    yield Case("add_rmsnorm", "torch_hf_eager", shape, 0.0, fused, make(hf_add_norm), tensor_cores=False)
    yield Case("add_rmsnorm", "torch_compile", shape, 0.0, fused, make(hf_add_norm, compile=True),
               tensor_cores=False)
    if liger is not None:
        yield Case("add_rmsnorm", "liger_kernel", shape, 0.0, fused,
                   make(lambda x, r, w: liger.liger_fused_add_rms_norm(x, r, w, 1e-5)), tensor_cores=False)


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

    def make(fn, compile=False):
        def build():
            q, k, pos, cos, sin = inputs()
            f = _compiled(fn, device) if compile else fn
            f(q, k, pos, cos, sin)              # compiles outside the timing
            return lambda: f(q, k, pos, cos, sin)
        return build

    def hf_rope(q, k, pos, c, s):
        return _hf_rope(q.transpose(1, 2), k.transpose(1, 2), c, s)

    yield Case("rope", "llmkern_positions", shape, 0.0, nbytes,
               make(lambda q, k, pos, c, s: layers.apply_rope(q, k, pos, theta=500000.0)), tensor_cores=False)
    yield Case("rope", "llmkern_hf_tables", shape, 0.0, nbytes,
               make(lambda q, k, pos, c, s: layers.apply_rope(q, k, cos=c, sin=s)), tensor_cores=False)
    yield Case("rope", "torch_hf_eager", shape, 0.0, nbytes, make(hf_rope), tensor_cores=False)
    yield Case("rope", "torch_compile", shape, 0.0, nbytes, make(hf_rope, compile=True), tensor_cores=False)
    liger = _liger(device)
    if liger is not None:   # rotates its (batch, heads, seq, head_dim) views in place: the timing repeats a rotation
        yield Case("rope", "liger_kernel", shape, 0.0, nbytes,
                   make(lambda q, k, pos, c, s: liger.liger_rope(q.transpose(1, 2), k.transpose(1, 2), c, s)),
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
