"""The MoE part of `patch_model` and `quantize_model`: Hugging Face Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE blocks on
llmkern.moe_topk and llmkern.fused_moe.

transformers 5.x splits each sparse MoE block into a router module (`<Family>TopKRouter`: logits = linear(x),
softmax in fp32, torch.topk, optional renormalization; returns (logits, weights, ids)) and an experts module
(`<Family>Experts`: 3D `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I) parameters, forward(x, ids, weights)).
The block's own forward (and Qwen2-MoE's shared expert, added after the routed experts) is left as it is; the two
modules get llmkern subclasses by class swap, so the model's weights, hooks and output capture (router logits for
the auxiliary loss) are untouched:
  * router: the same linear, then moe_topk; renormalized always (Mixtral) or as the router's norm_topk_prob says
    (Qwen2/3-MoE, OLMoE); the weights rounded to the logits' dtype where transformers rounds them (Qwen, OLMoE)
    and kept fp32 where it does not (Mixtral). Ties: moe_topk's lower-index rule (transformers' torch.topk leaves
    their order unspecified).
  * experts: fused_moe on the same weights, or on int4/int8 experts after quantize_model (`quantize_experts`
    below replaces the two parameters by llmkern's packed buffers).
Inputs the kernels do not serve (an activation other than SiLU, experts with biases or transposed weights, mixed
dtypes) go to transformers' own forward.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from llmkern import moe


@dataclass(frozen=True)
class _MoeFamily:
    module: str               # transformers modeling module
    prefix: str               # <prefix>TopKRouter, <prefix>Experts
    always_renormalize: bool  # Mixtral's router renormalizes unconditionally; the others read norm_topk_prob
    cast_weights: bool        # the router returns its weights in the logits' dtype (transformers' .to(dtype))


FAMILIES = (
    _MoeFamily("transformers.models.mixtral.modeling_mixtral", "Mixtral", True, False),
    _MoeFamily("transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2Moe", False, True),
    _MoeFamily("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3Moe", False, True),
    _MoeFamily("transformers.models.olmoe.modeling_olmoe", "Olmoe", False, True),
)

_PARTS = ("gate_up_proj", "down_proj")
_QUANT_TENSORS = ("qweight", "scales", "zeros", "perm")


def _classes(family: _MoeFamily):
    """(router class, experts class) of a family, or None when this transformers lacks it."""
    try:
        mod = importlib.import_module(family.module)
        return getattr(mod, f"{family.prefix}TopKRouter"), getattr(mod, f"{family.prefix}Experts")
    except (ImportError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------------- router
@functools.lru_cache(maxsize=None)
def _router_class(family: _MoeFamily) -> type:
    base = _classes(family)[0]

    def forward(self, hidden_states: torch.Tensor):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight)
        if router_logits.dtype not in (torch.float16, torch.bfloat16, torch.float32) \
                or not 1 <= self.top_k <= router_logits.shape[1] <= moe.MAX_EXPERTS:
            return base.forward(self, hidden_states)
        renormalize = family.always_renormalize or bool(self.norm_topk_prob)
        weights, ids = moe.moe_topk(router_logits, self.top_k, renormalize=renormalize)
        if family.cast_weights:
            weights = weights.to(router_logits.dtype)
        return router_logits, weights, ids

    return type(f"Llmkern{base.__name__}", (base,), {
        "forward": forward, "__doc__": f"{base.__name__} on llmkern.moe_topk (installed by llmkern.patch_model)."})


# --------------------------------------------------------------------------------------------------- experts
def _quantized(module: nn.Module, part: str) -> moe.QuantizedExperts | None:
    if f"{part}_qweight" not in module._buffers:
        return None
    t = {name: getattr(module, f"{part}_{name}") for name in _QUANT_TENSORS}
    e, kw, n = t["qweight"].shape
    return moe.QuantizedExperts._unchecked_values(   # buffers a checked QuantizedExperts gave (no sync per forward)
        t["qweight"], t["scales"], t["zeros"], bits=module.llmkern_bits, group_size=module.llmkern_group_size,
        in_features=kw * (32 // module.llmkern_bits), out_features=n, perm=t["perm"])


@functools.lru_cache(maxsize=1)
def _silu_classes() -> tuple[type, ...]:
    """What transformers' ACT2FN gives for "silu" (its own SiLUActivation in 5.x) and "swish" (nn.SiLU)."""
    try:
        from transformers.activations import SiLUActivation
        return (nn.SiLU, SiLUActivation)
    except ImportError:
        return (nn.SiLU,)


@functools.lru_cache(maxsize=None)
def _experts_class(family: _MoeFamily) -> type:
    base = _classes(family)[1]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        w13, w2 = (_quantized(self, part) for part in _PARTS)
        if w13 is None and w2 is None and not self._llmkern_supported(hidden_states):
            # transformers' one_hot needs int64 ids; moe_topk gives int32
            return base.forward(self, hidden_states, top_k_index.long(), top_k_weights)
        w13 = self.gate_up_proj if w13 is None else w13
        w2 = self.down_proj if w2 is None else w2
        return moe.fused_moe(hidden_states, w13, w2, top_k_weights, top_k_index)

    def supported(self, x: torch.Tensor) -> bool:
        """The layout and math fused_moe implements: gated, concatenated [gate; up], not transposed, no bias, SiLU,
        x and the weights of one dtype and device."""
        layout = (getattr(self, "has_gate", True) and getattr(self, "is_concatenated", True)
                  and not getattr(self, "is_transposed", False) and not getattr(self, "has_bias", False))
        w13, w2 = self.gate_up_proj, self.down_proj
        return (layout and isinstance(self.act_fn, _silu_classes()) and x.dim() == 2
                and x.dtype == w13.dtype == w2.dtype and x.device == w13.device == w2.device
                and 1 <= w13.shape[0] <= moe.MAX_EXPERTS)

    return type(f"Llmkern{base.__name__}", (base,), {
        "forward": forward, "_llmkern_supported": supported,
        "__doc__": f"{base.__name__} on llmkern.fused_moe (installed by llmkern.patch_model or quantize_model)."})


# ---------------------------------------------------------------------------------------------------- public
def patch(model: nn.Module, enabled: bool = True) -> int:
    """Swap the routers and experts of every supported MoE block in `model` (when `enabled`); return how many
    router and experts modules of a supported family the model has (patched or not)."""
    found = 0
    for family in FAMILIES:
        classes = _classes(family)
        if classes is None:
            continue
        router_cls, experts_cls = classes
        for m in model.modules():
            if isinstance(m, router_cls):
                found += 1
                if enabled and type(m) is router_cls:
                    m.__class__ = _router_class(family)
            elif isinstance(m, experts_cls):
                found += 1
                if enabled and type(m) is experts_cls:
                    m.__class__ = _experts_class(family)
    return found


def experts_modules(model: nn.Module, exclude: Iterable[str]) -> list[tuple[str, nn.Module, _MoeFamily]]:
    """(qualified name, module, family) of every experts module of a supported family not named in `exclude`."""
    exclude = set(exclude)
    found = []
    for family in FAMILIES:
        classes = _classes(family)
        if classes is None:
            continue
        for name, m in model.named_modules():
            if isinstance(m, classes[1]) and name not in exclude and name.rsplit(".", 1)[-1] not in exclude:
                found.append((name, m, family))
    return found


def check_quantizable(name: str, module: nn.Module, bits: int, group_size: int) -> None:
    """ValueError when an experts module's weights do not fit llmkern's packed format (checked for every module
    before any is changed)."""
    for part in _PARTS:
        w = module._parameters.get(part)
        if w is None:
            continue                        # already quantized
        k = w.shape[2]
        if w.dim() != 3 or k % (32 // bits) or (group_size != -1 and k % group_size) \
                or getattr(module, "is_transposed", False) or getattr(module, "has_bias", False):
            raise ValueError(f"experts {name!r}: {part} {tuple(w.shape)} does not fit bits={bits}, "
                             f"group_size={group_size}; add it to exclude")


def quantize_experts(module: nn.Module, family: _MoeFamily, bits: int, group_size: int, symmetric: bool) -> None:
    """Replace an experts module's gate_up_proj / down_proj parameters, in place, by llmkern's packed int4/int8
    buffers (`<part>_qweight`, `_scales`, `_zeros`, `_perm`: QuantizedExperts' tensors, round to nearest per expert
    as quantize_weight does), and make it an llmkern experts module (the only forward that can run them)."""
    for part in _PARTS:
        w = module._parameters.get(part)
        if w is None:
            continue
        q = moe.quantize_experts(w.detach(), bits=bits, group_size=group_size, symmetric=symmetric)
        delattr(module, part)
        for name in _QUANT_TENSORS:
            module.register_buffer(f"{part}_{name}", getattr(q, name))
    module.llmkern_bits, module.llmkern_group_size = bits, group_size
    if not hasattr(module, "_llmkern_supported"):
        module.__class__ = _experts_class(family)
