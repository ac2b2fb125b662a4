"""Fused sampling: llmkern.sample against the PyTorch sort-based sampler and FlashInfer.

One decoding step's sampling: logits (batch, vocab) in bf16 for batch 1 .. 512 and vocab 32k, 128k and 256k (Llama-2,
Llama-3 and Gemma-sized vocabularies), with per-row parameters as a serving batch has them: temperature 0.7 .. 1.0,
top-k 50 and top-p 0.9 (the common serving defaults), one seed per row. Peers in the same run:
  * torch_sort: what people write in PyTorch: logits / temperature, softmax, a full descending sort per row, top-k and
    top-p masks from the sorted cumulative sum, torch.multinomial;
  * flashinfer: flashinfer.sampling.top_k_top_p_sampling_from_logits (pivot-based rejection sampling) when
    importable, after the same per-row temperature division (it takes no temperature).
Bytes are llmkern.perf.sampling_bytes (the logits read once plus one int64 token per row), the same for every
implementation; there are no FLOPs to speak of (flops = 0, bound by the CUDA-core peak, tensor_cores=False), so the
GB/s column is the achieved bandwidth on the compulsory logits read.

On CPU (no CUDA), the issue-15 target: batch 64 x vocab 128256 in bf16 through the CPU path (the C++ backend when
it builds) against the sort-based sampler; --quick: batch 8.
"""
from __future__ import annotations

from typing import Iterable

import torch

from llmkern import perf
from llmkern.bench.common import Case, optional_import
from llmkern.sampling import sample

TOP_K, TOP_P = 50, 0.9                           # common serving defaults (vLLM / HF generation configs)
VOCABS = [32000, 128256, 262144]                 # Llama-2, Llama-3, Gemma-3 (256k)
BATCHES = [1, 8, 32, 64, 128, 256, 512]
QUICK = [(1, 128256), (128, 128256)]
CPU_SHAPES = [(64, 128256)]                      # (batch, vocab)
CPU_QUICK = [(8, 128256)]


def _inputs(batch, vocab, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(batch, vocab, generator=g, device=device) * 3).to(dtype)
    # per-row parameters: temperatures spread over 0.7 .. 1.0, top-k and top-p per row (the same values here)
    temperature = torch.linspace(0.7, 1.0, batch, device=device)
    top_k = torch.full((batch,), TOP_K, dtype=torch.int32, device=device)
    top_p = torch.full((batch,), TOP_P, device=device)
    seed = torch.arange(batch, dtype=torch.int64, device=device)
    return logits, temperature, top_k, top_p, seed


def torch_sort_sample(logits, temperature, top_k, top_p, generator=None):
    """The PyTorch sort-based sampler (temperature, then top-k, then top-p over the top-k survivors)."""
    probs = torch.softmax(logits.float() / temperature[:, None], dim=-1)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    rank = torch.arange(probs.shape[-1], device=probs.device)[None, :]
    sorted_p = sorted_p.masked_fill(rank >= top_k[:, None], 0.0)
    cum = torch.cumsum(sorted_p, dim=-1)
    above = cum - sorted_p                                   # mass strictly before each token
    sorted_p = sorted_p.masked_fill(above >= top_p[:, None] * cum[:, -1:], 0.0)
    pick = torch.multinomial(sorted_p, 1, generator=generator)
    return order.gather(-1, pick).squeeze(-1)


def _shape(batch, vocab, dtype) -> dict:
    return dict(batch=batch, vocab=vocab, top_k=TOP_K, top_p=TOP_P, dtype=str(dtype).replace("torch.", ""))


def _cases_for(batch, vocab, dtype, device, flashinfer) -> Iterable[Case]:
    shape = _shape(batch, vocab, dtype)
    nbytes = perf.sampling_bytes(batch, vocab, perf.dtype_bytes(dtype))

    def make_llmkern():
        logits, t, k, p, seed = _inputs(batch, vocab, dtype, device)
        return lambda: sample(logits, temperature=t, top_k=k, top_p=p, seed=seed)
    yield Case(op="sampling", impl="llmkern", shape=shape, flops=0.0, nbytes=nbytes, make=make_llmkern,
               tensor_cores=False, note="per-row parameters, includes the host-side parameter checks")

    def make_torch():
        logits, t, k, p, _ = _inputs(batch, vocab, dtype, device)
        return lambda: torch_sort_sample(logits, t, k, p)
    yield Case(op="sampling", impl="torch_sort", shape=shape, flops=0.0, nbytes=nbytes, make=make_torch,
               tensor_cores=False)

    if flashinfer is not None and device.type == "cuda":
        def make_fi():
            logits, t, k, p, _ = _inputs(batch, vocab, dtype, device)
            fn = flashinfer.sampling.top_k_top_p_sampling_from_logits
            return lambda: fn(logits / t[:, None].to(logits.dtype), k, p)
        yield Case(op="sampling", impl="flashinfer", shape=shape, flops=0.0, nbytes=nbytes, make=make_fi,
                   tensor_cores=False, note="temperature applied by a division before the call")


def cases(device: torch.device, quick: bool) -> Iterable[Case]:
    flashinfer = optional_import("flashinfer")
    if device.type != "cuda":
        for batch, vocab in CPU_QUICK if quick else CPU_SHAPES:
            yield from _cases_for(batch, vocab, torch.bfloat16, device, None)
        return
    shapes = QUICK if quick else [(b, v) for v in VOCABS for b in BATCHES]
    for batch, vocab in shapes:
        yield from _cases_for(batch, vocab, torch.bfloat16, device, flashinfer)


def summarize(records: list[dict]) -> str:
    """Per shape: llmkern's time per step, its GB/s on the logits, and its speedup over the peers."""
    by_shape: dict[str, dict[str, dict]] = {}
    for r in records:
        key = f"b={r['shape']['batch']} v={r['shape']['vocab']}"
        by_shape.setdefault(key, {})[r["impl"]] = r
    lines = ["", f"{'shape':<18} {'llmkern ms':>11} {'GB/s':>8} {'vs torch_sort':>14} {'vs flashinfer':>14}"]
    for key, recs in by_shape.items():
        if "llmkern" not in recs:
            continue
        ours = recs["llmkern"]["median_ms"]
        vs = lambda peer: f"{recs[peer]['median_ms'] / ours:.2f}x" if peer in recs else "-"  # noqa: E731
        lines.append(f"{key:<18} {ours:>11.4f} {recs['llmkern']['gbps']:>8.1f} {vs('torch_sort'):>14} "
                     f"{vs('flashinfer'):>14}")
    return "\n".join(lines)
