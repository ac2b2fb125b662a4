"""Weight-only quantized matmul: llmkern int4 (group 128) and int8 (per channel) against bf16 cuBLAS.

Shapes are the linear layers of Llama-3-8B, as (in_features K, out_features N): the q/o projections (4096 x 4096),
gate/up (4096 x 14336), down (14336 x 4096) and the lm_head (4096 x 128256), at M = 1, 4, 16 (decode batches) and
64, 128, 256, 1024 (prefill chunks), activations in bf16 (Llama-3's dtype). Peers in the same run: torch.matmul in
bf16 (cuBLAS) on the same shape, and when torchao is importable, torchao's int4 weight-only linear (group 128).

Bytes are llmkern.perf.quant_matmul_bytes (packed weights + scales + zero points, x in, out out) and matmul_bytes for
the dense peers: at decode the weight bytes are everything, so GB/s there is the distance to the HBM roofline.
`summarize` prints each shape's speedup over bf16 cuBLAS.

On CPU (no CUDA), the issue-15 target: the 4096 x 4096 q/o projection with bf16 activations at M = 1 and 16 (the
decode path: packed weights streamed once) against bf16 F.linear on the dense weight, and M = 64 (a dequantized
tile through BLAS) against fp32 F.linear (PyTorch's bf16 CPU matmul is far off its fp32 rate); --quick: M = 1.
"""
from __future__ import annotations

from typing import Iterable

import torch

from llmkern import perf
from llmkern.bench.common import Case, optional_import
from llmkern.quant import quant_matmul
from llmkern.quant_weight import QuantizedWeight

LLAMA3_8B = [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 128256)]   # (K, N)
MS = [1, 4, 16, 64, 128, 256, 1024]
# (bits, group_size): int4 with Llama GPTQ/AWQ checkpoints' usual group of 128; int8 per output channel, the usual
# int8 weight-only recipe (torchao's int8_weight_only, LLM.int8 without outliers).
SETTINGS = [(4, 128), (8, -1)]


def _random_qweight(k: int, n: int, bits: int, group_size: int, dtype: torch.dtype, device) -> QuantizedWeight:
    """Random packed words, scales and zero points: the kernel's speed does not depend on the values, and this
    builds a 128256-column weight in milliseconds without a float copy of it."""
    groups = 1 if group_size == -1 else k // group_size
    g = torch.Generator(device=device).manual_seed(0)
    words = torch.randint(-2 ** 31, 2 ** 31 - 1, (k * bits // 32, n), dtype=torch.int32, device=device, generator=g)
    scales = (torch.rand(groups, n, device=device, generator=g) * 0.01 + 0.001).to(dtype)
    zeros = torch.randint(0, 2 ** bits, (groups, n), device=device, generator=g).to(torch.int16)
    return QuantizedWeight(words, scales, zeros, bits=bits, group_size=group_size, in_features=k, out_features=n)


def _llmkern_case(m, k, n, bits, group_size, dtype, device) -> Case:
    def make():
        qw = _random_qweight(k, n, bits, group_size, dtype, device)
        x = torch.randn(m, k, dtype=dtype, device=device)
        return lambda: quant_matmul(x, qw)
    return Case(op="quant_matmul", impl=f"llmkern_int{bits}_g{group_size}",
                shape=dict(M=m, N=n, K=k, bits=bits, group=group_size, dtype=str(dtype).replace("torch.", "")),
                flops=perf.matmul_flops(m, n, k),
                nbytes=perf.quant_matmul_bytes(m, n, k, bits, group_size, perf.dtype_bytes(dtype)), make=make)


def _dense_case(m, k, n, dtype, device) -> Case:
    def make():
        w = torch.randn(n, k, dtype=dtype, device=device) * 0.02
        x = torch.randn(m, k, dtype=dtype, device=device)
        wt = w.t()
        return lambda: torch.matmul(x, wt)
    name = str(dtype).replace("torch.", "")
    return Case(op="quant_matmul", impl=f"torch_{ {torch.float16: 'fp16', torch.bfloat16: 'bf16'}.get(dtype, 'fp32')}",
                shape=dict(M=m, N=n, K=k, bits=16, group=0, dtype=name), flops=perf.matmul_flops(m, n, k),
                nbytes=perf.matmul_bytes(m, n, k, perf.dtype_bytes(dtype)), make=make)


def _torchao_int4_quantizer():
    """torchao's int4 weight-only quantization as a function of an nn.Linear, across its API versions; None when
    torchao is missing or cannot quantize on this machine."""
    tq = optional_import("torchao.quantization") if torch.cuda.is_available() else None
    if tq is None:
        return None
    if hasattr(tq, "Int4WeightOnlyConfig"):
        config = lambda: tq.Int4WeightOnlyConfig(group_size=128)  # noqa: E731
    elif hasattr(tq, "int4_weight_only"):
        config = lambda: tq.int4_weight_only(group_size=128)  # noqa: E731
    else:
        return None

    def quantize(linear):
        tq.quantize_(linear, config())
        return linear
    try:   # a probe: some builds lack the CUDA kernel for this GPU
        probe = quantize(torch.nn.Linear(256, 256, bias=False, dtype=torch.bfloat16, device="cuda"))
        probe(torch.randn(1, 256, dtype=torch.bfloat16, device="cuda"))
    except Exception:
        return None
    return quantize


def _torchao_case(m, k, n, quantize, device) -> Case:
    def make():
        lin = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16, device=device)
        lin = quantize(lin)
        x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
        return lambda: lin(x)
    return Case(op="quant_matmul", impl="torchao_int4_g128",
                shape=dict(M=m, N=n, K=k, bits=4, group=128, dtype="bfloat16"), flops=perf.matmul_flops(m, n, k),
                nbytes=perf.quant_matmul_bytes(m, n, k, 4, 128, 2), make=make)


def cases(device: torch.device, quick: bool) -> Iterable[Case]:
    dtype = torch.bfloat16
    if device.type != "cuda":
        k, n = LLAMA3_8B[0]
        for m in (1,) if quick else (1, 16, 64):
            yield _dense_case(m, k, n, torch.bfloat16 if m <= 16 else torch.float32, device)
            for bits, group in SETTINGS:
                yield _llmkern_case(m, k, n, bits, group, torch.bfloat16, device)
        return
    shapes = LLAMA3_8B[:2] if quick else LLAMA3_8B
    ms = [1, 16, 256] if quick else MS
    torchao = _torchao_int4_quantizer()
    for k, n in shapes:
        for m in ms:
            yield _dense_case(m, k, n, dtype, device)
            for bits, group in SETTINGS:
                yield _llmkern_case(m, k, n, bits, group, dtype, device)
            if torchao is not None:
                yield _torchao_case(m, k, n, torchao, device)


def summarize(records: list[dict]) -> str:
    """Per shape: each implementation's time, its speedup over the dense matmul of the same dtype (bf16 cuBLAS), and
    its GB/s on the weight bytes alone (the decode roofline's numerator)."""
    dense = {(r["shape"]["M"], r["shape"]["N"], r["shape"]["K"], r["shape"]["dtype"]): r["median_ms"]
             for r in records if r["impl"].startswith("torch_")}
    any_dense = {key[:3]: ms for key, ms in dense.items()}   # the dense peer of another dtype (CPU, M > 16: fp32)
    lines = [f"{'M':>5} {'N':>7} {'K':>6}  {'impl':<20} {'ms':>9} {'vs dense':>9} {'weight GB/s':>12}"]
    for r in records:
        if r["impl"].startswith("torch_"):
            continue
        s = r["shape"]
        base = dense.get((s["M"], s["N"], s["K"], s["dtype"]), any_dense.get((s["M"], s["N"], s["K"])))
        speedup = f"{base / r['median_ms']:8.2f}x" if base else "        -"
        wbytes = perf.quant_weight_bytes(s["N"], s["K"], s["bits"], s["group"])
        lines.append(f"{s['M']:>5} {s['N']:>7} {s['K']:>6}  {r['impl']:<20} {r['median_ms']:9.4f} {speedup:>9} "
                     f"{wbytes / (r['median_ms'] * 1e-3) / 1e9:12.1f}")
    return "\n".join(lines)
