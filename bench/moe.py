"""Mixture of Experts: llmkern's fused_moe against transformers' own expert implementations, and moe_topk.

Shapes: one MoE layer of Mixtral-8x7B (8 experts, top-2, hidden 4096, intermediate 14336) and of Qwen3-30B-A3B
(128 experts, top-8, hidden 2048, intermediate 768), from llmkern.models, at 1, 8, 64 and 512 tokens, bf16.
Every implementation gets the same routing: each token's top_k experts drawn uniformly without replacement (what
a trained router's load balancing aims at) with softmax weights, fixed per shape.

Peers in the same run, on the same weights:
  * hf_eager: transformers' experts module (MixtralExperts / Qwen3MoeExperts) as the model runs it by default: a
    Python loop over the experts hit, two linears each, index_add_ back.
  * hf_grouped_mm: the same module with transformers' "grouped_mm" experts implementation, which sorts the tokens
    and calls torch.nn.functional.grouped_mm / torch._grouped_mm (only where transformers would: CUDA with the
    function present; the record's note names the function).
  * llmkern: fused_moe on the module's gate_up_proj / down_proj (what patch_model runs); llmkern_int4_g128: the
    same with int4 group-128 experts (Mixtral only: 8 experts' packed weights).
  * moe_topk: llmkern.moe_topk against transformers' router math (softmax in fp32, torch.topk, renormalize).

Bytes are llmkern.perf.moe_bytes with the experts this routing actually hits (the weights of those experts once,
hidden states in and out), so "GB/s" is the rate at which the touched experts' weights stream: the decode figure of
merit. `summarize` prints, per shape, each implementation's speedup over hf_eager and that weight bandwidth against
the device's HBM peak. Targets (issue 13, on a GPU): at 64 tokens at least 3x hf_eager; in decode at least 70% of
HBM bandwidth on the touched experts' weights.

On CPU (no CUDA): two small-model MoE layers, OLMoE-1B-7B's (64 experts, top-8, hidden 2048, intermediate 1024) and
a Mixtral-routed one (8 experts, top-2, hidden 2048, Qwen1.5-MoE's intermediate 1408), in bf16 and fp32, at 1, 4 and
16 tokens (decode) and 256 (a prefill chunk): llmkern (the C++ backend, csrc/moe.cpp; in bf16 also
llmkern_int4_g128) against hf_eager, the same transformers experts module as on the GPU (its per-expert loop of two
F.linear calls is what the model runs on CPU; llmkern.reference's loop has the same shape). `run_suite` times each
shape's implementations alternating, call by call, so that a shared machine's load changes hit all alike; records add
every call's time (samples_ms), the fastest (best_ms) and the load average. The roof is the same run's measured
STREAM read (bench.common.measured_cpu_peak): "% STREAM" in the summary is the touched experts' weight bytes over the
time, against it (decode is bound by those bytes). --quick: OLMoE's layer in bf16 at 1 and 16 tokens.
"""
from __future__ import annotations

import functools
import json
import os
import statistics
import time
from typing import Callable, Iterable

import torch

from llmkern import moe, perf
from llmkern.bench import common
from llmkern.bench.common import Case, optional_import
from llmkern.models import ModelShape, get_model

MODELS = ["mixtral-8x7b", "qwen3-30b-a3b"]
TOKENS = [1, 8, 64, 512]
DTYPE = torch.bfloat16
# transformers' experts class and config for each model; the CPU run uses a small layer of Mixtral's kind.
_HF = {"mixtral-8x7b": ("mixtral", "MixtralExperts", "MixtralConfig", "num_local_experts", "intermediate_size"),
       "qwen3-30b-a3b": ("qwen3_moe", "Qwen3MoeExperts", "Qwen3MoeConfig", "num_experts", "moe_intermediate_size")}
# The CPU shapes: MoE layers of small models (attention fields unused). OLMoE-1B-7B-0924's config.json: hidden_size
# 2048, intermediate_size 1024, num_experts 64, num_experts_per_tok 8. The second takes Mixtral's routing (8 experts,
# top-2) at Qwen1.5-MoE-A2.7B's hidden 2048 and moe_intermediate_size 1408.
_CPU_LAYERS = {
    "olmoe-1b-7b": ModelShape("olmoe-1b-7b", hidden=2048, layers=1, heads=16, kv_heads=16, head_dim=128,
                              intermediate=1024, vocab=1, tied_embeddings=False, source="allenai/OLMoE-1B-7B-0924",
                              num_experts=64, experts_per_token=8),
    "mixtral-like-2048": ModelShape("mixtral-like-2048", hidden=2048, layers=1, heads=16, kv_heads=16, head_dim=128,
                                    intermediate=1408, vocab=1, tied_embeddings=False,
                                    source="(Mixtral's 8 experts, top-2; Qwen1.5-MoE's 2048 / 1408)", num_experts=8,
                                    experts_per_token=2),
}
CPU_TOKENS = [1, 4, 16, 256]
CPU_DTYPES = [torch.bfloat16, torch.float32]
CPU_MIN_ROUNDS = 5          # alternating rounds per shape: at least this many, more while they take < CPU_BUDGET_MS
CPU_BUDGET_MS = 1500.0
CPU_MAX_ROUNDS = 50


@functools.lru_cache(maxsize=None)
def _routing(num_experts: int, top_k: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights fp32, ids int64) on the CPU: top_k distinct experts per token, uniformly, softmax weights."""
    g = torch.Generator().manual_seed(tokens * 131 + num_experts)
    ids = torch.rand(tokens, num_experts, generator=g).argsort(dim=1)[:, :top_k]
    weights = torch.softmax(torch.randn(tokens, top_k, generator=g), dim=1)
    return weights, ids


def _experts_hit(model: ModelShape, tokens: int) -> int:
    return int(torch.unique(_routing(model.num_experts, model.experts_per_token, tokens)[1]).numel())


@functools.lru_cache(maxsize=1)
def _hf_experts(name: str, device: str, dtype: torch.dtype = DTYPE):
    """transformers' experts module of the layer, random weights (std 0.02), in `dtype`. One layer cached at a time
    (a Mixtral layer is 2.8 GB); the cases of one shape run one after the other."""
    transformers = optional_import("transformers")
    module_name, cls_name, cfg_name, experts_key, inter_key = _HF.get(name, _HF["mixtral-8x7b"])
    mod = __import__(f"transformers.models.{module_name}.modeling_{module_name}", fromlist=[cls_name])
    shape = _CPU_LAYERS[name] if name in _CPU_LAYERS else get_model(name)
    cfg = getattr(transformers, cfg_name)(hidden_size=shape.hidden, num_experts_per_tok=shape.experts_per_token,
                                          **{experts_key: shape.num_experts, inter_key: shape.intermediate})
    with torch.device(device):
        experts = getattr(mod, cls_name)(cfg).to(dtype)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0.0, 0.02, generator=g)
    return experts


@functools.lru_cache(maxsize=1)
def _quantized(name: str, device: str, dtype: torch.dtype = DTYPE):
    """The layer's w13 and w2 as int4 group-128 QuantizedExperts (round to nearest), made once per layer."""
    hf = _hf_experts(name, device, dtype)
    return tuple(moe.quantize_experts(w.detach(), bits=4, group_size=128) for w in (hf.gate_up_proj, hf.down_proj))


def _grouped_mm_name(device: torch.device) -> str | None:
    """The function transformers' grouped_mm implementation would call on this device, or None (then it falls back
    to a loop of its own, which is not the peer we want)."""
    if device.type != "cuda":
        return None
    if hasattr(torch.nn.functional, "grouped_mm"):
        return "torch.nn.functional.grouped_mm" if torch.cuda.get_device_capability(device) >= (8, 0) else None
    if hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability(device)[0] >= 9:
        return "torch._grouped_mm"
    return None


def _layer_case(name: str, shape: ModelShape, tokens: int, impl: str, device: torch.device, note: str = "",
                dtype: torch.dtype = DTYPE) -> Case:
    bits = 4 if impl == "llmkern_int4_g128" else None
    hit = _experts_hit(shape, tokens)

    def make():
        hf = _hf_experts(name, str(device), dtype)
        # the experts module dispatches on its config at every call (transformers' use_experts_implementation)
        hf.config._experts_implementation = "grouped_mm" if impl == "hf_grouped_mm" else "eager"
        g = torch.Generator(device=device).manual_seed(1)
        x = torch.randn(tokens, shape.hidden, generator=g, device=device).to(dtype)
        weights, ids = (t.to(device) for t in _routing(shape.num_experts, shape.experts_per_token, tokens))
        if impl.startswith("hf_"):
            return torch.no_grad()(lambda: hf(x, ids, weights))
        w13, w2 = _quantized(name, str(device), dtype) if bits else (hf.gate_up_proj.detach(), hf.down_proj.detach())
        ids32 = ids.to(torch.int32)
        return lambda: moe.fused_moe(x, w13, w2, weights, ids32)
    return Case(op="moe_layer", impl=impl,
                shape=dict(model=shape.name, tokens=tokens, experts=shape.num_experts, top_k=shape.experts_per_token,
                           hidden=shape.hidden, inter=shape.intermediate, experts_hit=hit,
                           dtype=str(dtype).replace("torch.", "")),
                flops=perf.moe_flops(tokens, shape.experts_per_token, shape.hidden, shape.intermediate),
                nbytes=perf.moe_bytes(tokens, hit, shape.hidden, shape.intermediate, perf.dtype_bytes(dtype),
                                      bits=bits),
                make=make, note=note, tensor_cores=dtype != torch.float32)


def _topk_case(shape: ModelShape, tokens: int, impl: str, device: torch.device) -> Case:
    def make():
        g = torch.Generator(device=device).manual_seed(2)
        logits = torch.randn(tokens, shape.num_experts, generator=g, device=device).to(DTYPE)
        k = shape.experts_per_token
        if impl == "llmkern":
            return lambda: moe.moe_topk(logits, k)

        def hf_router():   # MixtralTopKRouter / Qwen3MoeTopKRouter after the linear
            w, i = torch.topk(torch.softmax(logits.float(), dim=-1), k, dim=-1)
            return w / w.sum(dim=-1, keepdim=True), i
        return hf_router
    return Case(op="moe_topk", impl=impl if impl == "llmkern" else "torch_softmax_topk",
                shape=dict(model=shape.name, tokens=tokens, experts=shape.num_experts, top_k=shape.experts_per_token),
                flops=0.0, nbytes=float(tokens * (shape.num_experts * 2 + shape.experts_per_token * 8)), make=make,
                tensor_cores=False)


def cases(device: torch.device, quick: bool) -> Iterable[Case]:
    if optional_import("transformers") is None:
        return
    if device.type != "cuda":
        for name, shape in list(_CPU_LAYERS.items())[:1 if quick else None]:
            for dtype in CPU_DTYPES[:1 if quick else None]:
                for tokens in (1, 16) if quick else CPU_TOKENS:
                    impls = ("hf_eager", "llmkern") + (("llmkern_int4_g128",) if dtype == torch.bfloat16 else ())
                    for impl in impls:
                        yield _layer_case(name, shape, tokens, impl, device, dtype=dtype,
                                          note="C++ backend (csrc/moe.cpp)" if impl.startswith("llmkern") else "")
        shape = _CPU_LAYERS["olmoe-1b-7b"]
        yield _topk_case(shape, 64, "llmkern", device)
        yield _topk_case(shape, 64, "torch", device)
        return
    grouped = _grouped_mm_name(device)
    for name in MODELS[:1] if quick else MODELS:
        shape = get_model(name)
        for tokens in [1, 64] if quick else TOKENS:
            yield _layer_case(name, shape, tokens, "hf_eager", device)
            if grouped is not None:
                yield _layer_case(name, shape, tokens, "hf_grouped_mm", device, note=f"calls {grouped}")
            yield _layer_case(name, shape, tokens, "llmkern", device)
            if name == "mixtral-8x7b":
                yield _layer_case(name, shape, tokens, "llmkern_int4_g128", device)
        for tokens in [1, 512]:
            yield _topk_case(shape, tokens, "llmkern", device)
            yield _topk_case(shape, tokens, "torch", device)


def _shape_key(shape: dict) -> str:
    return json.dumps(shape, sort_keys=True)


def run_suite(cases: Iterable[Case], device: torch.device, *, log: Callable[[str], None] = print) -> list[dict]:
    """The CLI's runner for this suite: on CUDA bench.common.run_suite; on CPU each shape's implementations
    alternating (module docstring): one warm-up call each, then rounds of one call each, CPU_MIN_ROUNDS to
    CPU_MAX_ROUNDS while the rounds take under CPU_BUDGET_MS; median_ms over the rounds, plus samples_ms, best_ms
    and the load average."""
    if device.type == "cuda":
        return common.run_suite(cases, device, log=log)
    groups: dict[str, list[Case]] = {}
    for case in cases:
        groups.setdefault(f"{case.op}:{_shape_key(case.shape)}", []).append(case)
    records = []
    for group in groups.values():
        fns = [c.make() for c in group]
        for fn in fns:
            fn()
        samples: list[list[float]] = [[] for _ in group]
        start = time.perf_counter()
        while len(samples[0]) < CPU_MIN_ROUNDS or (
                (time.perf_counter() - start) * 1e3 < CPU_BUDGET_MS and len(samples[0]) < CPU_MAX_ROUNDS):
            for fn, times in zip(fns, samples):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        del fns
        for case, times in zip(group, samples):
            rec = common.to_record(case, statistics.median(times), device)
            rec.update(samples_ms=times, best_ms=min(times), rounds=len(times), load_average=list(os.getloadavg()))
            records.append(rec)
            log("  " + common.format_record(rec))
    return records


def summarize(records: list[dict]) -> str:
    """Per MoE-layer shape: each implementation's time, speedup over hf_eager, and the bandwidth at which it
    streamed the weights of the experts hit, also as a share of the memory roof: the device's HBM peak on a GPU, the
    same run's STREAM read on a CPU (decode's bound)."""
    eager = {_shape_key(r["shape"]): r for r in records if r["op"] == "moe_layer" and r["impl"] == "hf_eager"}
    on_cpu = bool(records) and records[0]["device"].startswith("CPU")
    peak = common.device_roof(torch.device("cpu")) if on_cpu else \
        perf.match_device_name(records[0]["device"]) if records else None
    roof = "% STREAM" if on_cpu else "% HBM"
    lines = [f"{'model':<18} {'dtype':<8} {'tokens':>6} {'hit':>4}  {'impl':<18} {'ms':>9} {'vs eager':>9} "
             f"{'best vs':>8} {'weight GB/s':>12} {roof:>8}",
             "targets (GPU): >= 3x hf_eager at 64 tokens; >= 70% of HBM on the touched experts' weights in decode"]
    for r in records:
        if r["op"] != "moe_layer":
            continue
        s = r["shape"]
        base = eager.get(_shape_key(s))
        speedup = f"{base['median_ms'] / r['median_ms']:8.2f}x" if base else "        -"
        best = f"{base['best_ms'] / r['best_ms']:7.2f}x" if base and "best_ms" in r else "       -"
        bits = 4 if r["impl"] == "llmkern_int4_g128" else None
        elem = perf.dtype_bytes(getattr(torch, s.get("dtype", "bfloat16")))
        gbps = perf.moe_weight_bytes(s["experts_hit"], s["hidden"], s["inter"], elem, bits=bits) \
            / (r["median_ms"] * 1e-3) / 1e9
        pct = f"{100 * gbps / peak.hbm_gbps:7.1f}%" if peak else "       -"
        lines.append(f"{s['model']:<18} {s.get('dtype', 'bfloat16'):<8} {s['tokens']:>6} {s['experts_hit']:>4}  "
                     f"{r['impl']:<18} {r['median_ms']:9.4f} {speedup:>9} {best:>8} {gbps:12.1f} {pct:>8}")
    if on_cpu:
        lines.append("(CPU: median of alternating calls; 'best vs': hf_eager's fastest call / llmkern's fastest; "
                     f"roof: this run's STREAM read, {peak.hbm_gbps:.1f} GB/s)" if peak else "")
    return "\n".join(lines)
