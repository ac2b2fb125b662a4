"""QuantLinear, a drop-in nn.Linear over a quantized weight, and quantize_model, which swaps a model's Linear layers
(and quantizes the experts of Hugging Face MoE blocks).

    QuantLinear.from_linear(linear, bits=4, group_size=128, symmetric=False)
    QuantLinear.from_quantized(qweight, bias=None)
    quantize_model(model, bits=4, group_size=128, exclude=("lm_head",), *, symmetric=False)
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from llmkern import patch_moe
from llmkern.quant import quant_matmul
from llmkern.quant_weight import (SCALE_DTYPES, QuantizedWeight, check_bits_group, check_finite_scales,
                                  check_permutation, quantize_weight)


class QuantLinear(nn.Module):
    """A drop-in nn.Linear with a quantized weight: same in_features/out_features/bias contract, forward = quant_matmul.

    The packed weight, scales, zeros and act-order permutation are buffers (so .to(device), state_dict and
    .half()/.bfloat16()/.float() act on them: a dtype change converts the scales and bias, the activation dtype it
    serves; a float32 model quantized by quantize_model keeps running in float32).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 4,
                 group_size: int = 128, dtype: torch.dtype = torch.float16, device=None, act_order: bool = False):
        super().__init__()
        check_bits_group(bits, group_size, in_features)
        if dtype not in SCALE_DTYPES:
            raise TypeError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        groups = 1 if group_size == -1 else in_features // group_size
        self.register_buffer("qweight", torch.zeros(in_features // (32 // bits), out_features, dtype=torch.int32,
                                                    device=device))
        self.register_buffer("scales", torch.ones(groups, out_features, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.zeros(groups, out_features, dtype=torch.int16, device=device))
        self.register_buffer("perm", torch.arange(in_features, dtype=torch.int32, device=device)
                             if act_order else None)
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        check_finite_scales(f"{prefix}scales", self.scales)
        # A loaded act-order permutation must be one (the kernels gather x's columns through it).
        if self.perm is not None:
            check_permutation(f"{prefix}perm", self.perm)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> "QuantLinear":
        mod = cls(qw.in_features, qw.out_features, bias is not None, bits=qw.bits, group_size=qw.group_size,
                  dtype=qw.dtype, device=qw.device, act_order=qw.perm is not None)
        mod.qweight.copy_(qw.qweight)
        mod.scales.copy_(qw.scales)
        mod.zeros.copy_(qw.zeros)
        if qw.perm is not None:
            mod.perm.copy_(qw.perm)
        if bias is not None:
            mod.bias.data.copy_(bias.detach().to(qw.dtype))
        return mod

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 128,
                    symmetric: bool = False) -> "QuantLinear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        qw = quantize_weight(linear.weight.detach(), bits=bits, group_size=group_size, symmetric=symmetric)
        return cls.from_quantized(qw, linear.bias)

    def quantized_weight(self) -> QuantizedWeight:
        """The buffers as a QuantizedWeight (views, no copy). Built again only when a buffer was replaced (.to(),
        .half(), load_state_dict(assign=True)): forward runs it on every call."""
        buffers = (self.qweight, self.scales, self.zeros, self.perm)
        cached = self.__dict__.get("_quantized")
        if cached is None or any(a is not b for a, b in zip(cached[0], buffers)):
            qw = QuantizedWeight(*buffers[:3], bits=self.bits, group_size=self.group_size,
                                 in_features=self.in_features, out_features=self.out_features, perm=self.perm)
            cached = self.__dict__["_quantized"] = (buffers, qw)
        return cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_matmul(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, group_size={self.group_size}")


def quantize_model(model: nn.Module, bits: int = 4, group_size: int = 128,
                   exclude: Iterable[str] = ("lm_head",), *, symmetric: bool = False) -> nn.Module:
    """Replace every nn.Linear of `model` (in place) by a QuantLinear, and quantize the experts of every Hugging Face
    MoE block llmkern.patch_model knows (their 3D weights, per expert, run by llmkern.fused_moe: llmkern.patch_moe),
    except modules whose qualified name, or its last component, is in `exclude`. Returns the model. Each layer keeps
    its dtype (float16, bfloat16 or float32: the activations it then takes); every layer is checked before any is
    replaced (TypeError/ValueError naming it)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(exclude, str):
        raise TypeError("exclude must be a collection of names (e.g. ('lm_head',)), not a single string")
    exclude = set(exclude)
    check_bits_group(bits, group_size, None)   # each layer's in_features is checked below
    targets = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name not in exclude and name.rsplit(".", 1)[-1] not in exclude:
            if mod.weight.dtype not in SCALE_DTYPES:
                raise TypeError(f"layer {name!r} has dtype {mod.weight.dtype}; quantized layers run float16, bfloat16 "
                                f"or float32 activations: convert the model first (e.g. model.float())")
            if (group_size != -1 and mod.in_features % group_size) or mod.in_features % (32 // bits):
                raise ValueError(f"layer {name!r}: in_features={mod.in_features} does not fit bits={bits}, "
                                 f"group_size={group_size}; add it to exclude")
            if mod.out_features < 1:
                raise ValueError(f"layer {name!r} has out_features=0: nothing to quantize; add it to exclude")
            targets.append(name)
    if isinstance(model, nn.Linear) and "" in targets:
        raise ValueError("model is itself an nn.Linear: use QuantLinear.from_linear(model)")
    experts = patch_moe.experts_modules(model, exclude)
    for name, mod, _ in experts:
        patch_moe.check_quantizable(name, mod, bits, group_size)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear.from_linear(getattr(parent, child), bits=bits, group_size=group_size,
                                                       symmetric=symmetric))
    for _, mod, family in experts:
        patch_moe.quantize_experts(mod, family, bits, group_size, symmetric)
    return model

