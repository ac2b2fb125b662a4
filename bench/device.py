"""The `device` sweep: the cases a short GPU lease can afford, picked from the full suites (about 4 minutes on an
H200, autotuning and compilation included).

It is a selection, not a suite of its own: each suite's full sweep is filtered by shape, so the cases, their FLOPs
and bytes, and their peers are exactly the suites' (`llmkern bench SUITE` runs the same code on more shapes). On
CUDA (bf16 throughout):

  attention  prefill, Llama-3-8B heads (32/8, d=128), causal, 1k/4k/16k tokens (batch 16/4/1): llmkern vs SDPA's
             flash and cuDNN backends
  decode     paged decode, 32/8 heads, batch 1/16/64 x context 1k/8k/32k: llmkern vs SDPA over gathered K/V; MLA
             decode (DeepSeek-V3, 128 and 16 heads), batch 1/64 x context 8k: vs SDPA over gathered latents,
             FlashInfer; and a mixed step (a prompt chunk of 512 + 63 decodes, context 2048): one
             PagedAttentionPlan.run vs two launches, the planning one-shot and FlashInfer
  quant      int4 g128 and int8 weight-only at M = 1/16/128 on the four Llama-3-8B linear shapes: vs bf16 cuBLAS
  sampling   batch 1/64/256, vocab 128256, top-k 50 + top-p 0.9: llmkern vs the torch sort-based sampler
  layers     RMSNorm, add+RMSNorm, RoPE at 16 and 4096 tokens (hidden 4096): vs eager, torch.compile, Liger-Kernel
  e2e        the decode step of a random-weight Llama-3-8B, batch 1/16, context 1024: llmkern (bf16, int4) vs
             transformers with SDPA

Peers that are not installed (flash-attn, FlashInfer, torchao, Liger-Kernel) simply yield no case. The order puts
the costly e2e cases (a 16 GB model) last, so a run cut short by its time budget loses the fewest records. On CPU
each suite's quick CPU cases run (e2e: decode only): tiny shapes that check the wiring, not the speed.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Iterable

import torch

from llmkern.bench.common import Case


def _is(key: str, values: tuple) -> Callable[[dict[str, Any]], bool]:
    return lambda shape: shape.get(key) in values


def _all(*tests: Callable[[dict[str, Any]], bool]) -> Callable[[Case], bool]:
    return lambda case: all(t(case.shape) for t in tests)


def _layer_tokens(shape: dict[str, Any]) -> int:
    """Tokens of a layers-suite shape: norms name them, RoPE has batch x seq."""
    return shape["tokens"] if "tokens" in shape else shape["batch"] * shape["seq"]


# suite -> which of its full-sweep CUDA cases the device sweep keeps, in this order
SELECTION: dict[str, Callable[[Case], bool]] = {
    "attention": _all(_is("seqlen", (1024, 4096, 16384))),
    "decode": lambda case: case.op == "mixed_attention" or _all(
        _is("heads", (32,)), _is("kv_heads", (8,)), _is("batch", (1, 16, 64)), _is("context", (1024, 8192, 32768)))(case)
    or (case.op == "mla_decode"
        and _all(_is("heads", (128, 16)), _is("batch", (1, 64)), _is("context", (8192,)))(case)),
    "quant": _all(_is("M", (1, 16, 128))),
    "sampling": _all(_is("batch", (1, 64, 256)), _is("vocab", (128256,))),
    "layers": lambda case: case.shape.get("hidden", 4096) == 4096 and _layer_tokens(case.shape) in (16, 4096),
    "e2e": lambda case: case.op == "e2e_decode" and case.shape["batch"] in (1, 16),
}
SUITES = list(SELECTION)
# On CPU each suite's quick CPU cases run, except the e2e prefill cases (the sweep times decode steps only).
CPU_SELECTION: dict[str, Callable[[Case], bool]] = {"e2e": lambda case: case.op == "e2e_decode"}


def suite_cases(name: str, device: torch.device) -> Iterable[Case]:
    """One suite's part of the device sweep, in the suite's own order."""
    suite = importlib.import_module(f"llmkern.bench.{name}")
    cuda = device.type == "cuda"
    keep = SELECTION[name] if cuda else CPU_SELECTION.get(name, lambda case: True)
    yield from (case for case in suite.cases(device, quick=not cuda) if keep(case))


def cases(device: torch.device, quick: bool = False) -> Iterable[Case]:
    """Every case of the device sweep (`quick` is accepted for the suite interface and changes nothing)."""
    for name in SUITES:
        yield from suite_cases(name, device)
