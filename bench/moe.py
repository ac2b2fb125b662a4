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
HBM bandwidth on the touched experts' weights. On CPU (no CUDA) one small layer runs through the CPU path (the
PyTorch reference) at 1, 8 and 64 tokens, to show the suite works, not to measure anything.
"""
from __future__ import annotations

import functools
from typing import Iterable

import torch

from llmkern import moe, perf
from llmkern.bench.common import Case, optional_import
from llmkern.models import ModelShape, get_model

MODELS = ["mixtral-8x7b", "qwen3-30b-a3b"]
TOKENS = [1, 8, 64, 512]
DTYPE = torch.bfloat16
# transformers' experts class and config for each model; the CPU run uses a small layer of Mixtral's kind.
_HF = {"mixtral-8x7b": ("mixtral", "MixtralExperts", "MixtralConfig", "num_local_experts", "intermediate_size"),
       "qwen3-30b-a3b": ("qwen3_moe", "Qwen3MoeExperts", "Qwen3MoeConfig", "num_experts", "moe_intermediate_size")}
_CPU_LAYER = ModelShape("small MoE layer", hidden=256, layers=1, heads=4, kv_heads=4, head_dim=64, intermediate=512,
                        vocab=1, tied_embeddings=True, source="(CPU smoke shape)", num_experts=8, experts_per_token=2)


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
def _hf_experts(name: str, device: str):
    """transformers' experts module of the layer, random weights (std 0.02), bf16. One layer cached at a time (a
    Mixtral layer is 2.8 GB); the cases of one shape run one after the other."""
    transformers = optional_import("transformers")
    module_name, cls_name, cfg_name, experts_key, inter_key = _HF.get(name, _HF["mixtral-8x7b"])
    mod = __import__(f"transformers.models.{module_name}.modeling_{module_name}", fromlist=[cls_name])
    shape = _CPU_LAYER if name == "cpu" else get_model(name)
    cfg = getattr(transformers, cfg_name)(hidden_size=shape.hidden, num_experts_per_tok=shape.experts_per_token,
                                          **{experts_key: shape.num_experts, inter_key: shape.intermediate})
    with torch.device(device):
        experts = getattr(mod, cls_name)(cfg).to(DTYPE)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0.0, 0.02, generator=g)
    return experts


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


def _layer_case(name: str, shape: ModelShape, tokens: int, impl: str, device: torch.device, note: str = "") -> Case:
    bits = 4 if impl == "llmkern_int4_g128" else None
    hit = _experts_hit(shape, tokens)

    def make():
        hf = _hf_experts(name, str(device))
        # the experts module dispatches on its config at every call (transformers' use_experts_implementation)
        hf.config._experts_implementation = "grouped_mm" if impl == "hf_grouped_mm" else "eager"
        g = torch.Generator(device=device).manual_seed(1)
        x = torch.randn(tokens, shape.hidden, generator=g, device=device).to(DTYPE)
        weights, ids = (t.to(device) for t in _routing(shape.num_experts, shape.experts_per_token, tokens))
        if impl.startswith("hf_"):
            return lambda: hf(x, ids, weights)
        w13, w2 = hf.gate_up_proj.detach(), hf.down_proj.detach()
        if bits:
            w13, w2 = (moe.quantize_experts(w, bits=4, group_size=128) for w in (w13, w2))
        ids32 = ids.to(torch.int32)
        return lambda: moe.fused_moe(x, w13, w2, weights, ids32)
    return Case(op="moe_layer", impl=impl,
                shape=dict(model=shape.name, tokens=tokens, experts=shape.num_experts, top_k=shape.experts_per_token,
                           hidden=shape.hidden, inter=shape.intermediate, experts_hit=hit),
                flops=perf.moe_flops(tokens, shape.experts_per_token, shape.hidden, shape.intermediate),
                nbytes=perf.moe_bytes(tokens, hit, shape.hidden, shape.intermediate, 2, bits=bits), make=make,
                note=note)


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
        for tokens in (1, 8) if quick else (1, 8, 64):
            yield _layer_case("cpu", _CPU_LAYER, tokens, "hf_eager", device)
            yield _layer_case("cpu", _CPU_LAYER, tokens, "llmkern", device)
        yield _topk_case(_CPU_LAYER, 64, "llmkern", device)
        yield _topk_case(_CPU_LAYER, 64, "torch", device)
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


def summarize(records: list[dict]) -> str:
    """Per MoE-layer shape: each implementation's time, speedup over hf_eager, and the bandwidth at which it
    streamed the weights of the experts hit, also as a share of the device's HBM peak."""
    eager = {(r["shape"]["model"], r["shape"]["tokens"]): r["median_ms"]
             for r in records if r["op"] == "moe_layer" and r["impl"] == "hf_eager"}
    peak = perf.match_device_name(records[0]["device"]) if records else None
    lines = [f"{'model':<18} {'tokens':>6} {'hit':>4}  {'impl':<18} {'ms':>9} {'vs eager':>9} {'weight GB/s':>12} "
             f"{'% HBM':>6}",
             "targets (GPU): >= 3x hf_eager at 64 tokens; >= 70% of HBM on the touched experts' weights in decode"]
    for r in records:
        if r["op"] != "moe_layer":
            continue
        s = r["shape"]
        base = eager.get((s["model"], s["tokens"]))
        speedup = f"{base / r['median_ms']:8.2f}x" if base else "        -"
        bits = 4 if r["impl"] == "llmkern_int4_g128" else None
        gbps = perf.moe_weight_bytes(s["experts_hit"], s["hidden"], s["inter"], 2, bits=bits) \
            / (r["median_ms"] * 1e-3) / 1e9
        pct = f"{100 * gbps / peak.hbm_gbps:5.1f}%" if peak else "     -"
        lines.append(f"{s['model']:<18} {s['tokens']:>6} {s['experts_hit']:>4}  {r['impl']:<18} "
                     f"{r['median_ms']:9.4f} {speedup:>9} {gbps:12.1f} {pct:>6}")
    return "\n".join(lines)
