"""Mixture of Experts: the router's top-k and the fused expert MLP. The host side.

    moe_topk(router_logits, top_k, *, renormalize=True, scoring="softmax", num_expert_group=None, topk_group=None,
             correction_bias=None, routed_scaling_factor=1.0)                  -> (topk_weights fp32, topk_ids int32)
    fused_moe(hidden_states, w13, w2, topk_weights, topk_ids, *, activation="silu")  -> (tokens, hidden)
    quantize_experts(w, *, bits=4, group_size=128, symmetric=False)           -> QuantizedExperts
    QuantizedExperts.from_weights([QuantizedWeight per expert])  (GPTQ/AWQ experts, converted one by one)

Layouts (Mixtral's, Qwen2/3-MoE's and OLMoE's in Hugging Face transformers 5.x, and vLLM's fused_moe):
  w13  (E, 2 * I, H): per expert the gate projection's I rows, then the up projection's I rows;
  w2   (E, H, I):     the down projection.
An expert computes w2[e] @ (silu(w13[e][:I] @ x) * w13[e][I:] @ x).

How fused_moe runs (vLLM's fused_moe plan; the code is ours): four launches, no host sync.
  1. align: the A = tokens * top_k (token, k) "slots" are sorted by expert and each expert's run is padded to the
     GEMM's BLOCK_M rows (vLLM's moe_align_block_size), one program, a counting sort in two passes;
  2. gate/up: one grouped GEMM; a program owns BLOCK_M rows of one expert and BLOCK_N intermediate columns, keeps
     a gate and an up accumulator, and writes silu(gate) * up (its epilogue) per slot;
  3. down: the same grouped GEMM over those rows, the routing weight multiplied in its epilogue;
  4. sum: each token adds its top_k rows, in k order (deterministic; no atomics).
The GEMM grid is sized from shapes alone: at most cdiv(A, BLOCK_M) + min(E, A) row blocks can be non-empty
(each expert that was hit adds at most one partly filled block), and a program past the padded total
returns before reading anything. Experts no token picked get no block at all, so a decode step reads the
weights of the experts it hit and no others.

Dispatch: CUDA -> Triton; CPU -> the same Triton kernels under TRITON_INTERPRET, else the C++ backend's fused_moe
(csrc/moe.cpp: each hit expert's weights read once per call, dense or packed; the same roundings), else
llmkern.reference (moe_topk: the reference).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch
import triton

from llmkern import _dispatch, _utils, compile_check, quant_weight, reference, tuning
from llmkern.kernels import moe as kernels
from llmkern.quant import BLOCK_K as QUANT_BLOCK_K
from llmkern.quant_weight import SCALE_DTYPES, PackedTensors, QuantizedWeight, check_bits_group, quantize_weight

SCORINGS = ("softmax", "sigmoid")
ACTIVATIONS = ("silu",)

# ----------------------------------------------------------------------------------------------------- moe_topk
# A program keeps a (BLOCK_T, BLOCK_E) tile of one BLOCK_T-token block's logits in registers, BLOCK_E the power of
# two >= E: 1024 fp32 values for every E (BLOCK_T = 1024 // BLOCK_E), 8 per thread at 4 warps (2048 values spilled
# in check-compile, at 4 warps and at 8). Top-k outputs build up in a (BLOCK_T, BLOCK_K) tile, BLOCK_K = max(8, next power of two >= top_k) capped at BLOCK_E (8 serves
# Mixtral's 2, Qwen3's 8, DeepSeek-V3's 8). 1024 experts is the largest tile kept (DeepSeek-V3 has 256, Qwen3-Next
# 512); check-compile covers every BLOCK_E with the smallest and largest BLOCK_K.
TOPK_TILE = 1024
TOPK_WARPS = 4
MAX_EXPERTS = 1024


def _topk_blocks(num_experts: int, top_k: int) -> tuple[int, int, int]:
    block_e = max(16, triton.next_power_of_2(num_experts))
    block_k = min(block_e, max(8, triton.next_power_of_2(top_k)))
    return TOPK_TILE // block_e, block_e, block_k


_F32_MAX = float(torch.finfo(torch.float32).max)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_topk(router_logits, top_k, renormalize, scoring, num_expert_group, topk_group, correction_bias,
                routed_scaling_factor) -> None:
    _utils.check_tensor("router_logits", router_logits, ndim=2, dtypes=_utils.FLOAT_DTYPES)
    num_experts = router_logits.shape[1]
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"router_logits must have 1 to {MAX_EXPERTS} experts (columns), got {num_experts}")
    if not _is_int(top_k) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an int in [1, {num_experts}] (the number of experts), got {top_k!r}")
    if not isinstance(renormalize, bool):
        raise TypeError(f"renormalize must be a bool, got {renormalize!r}")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    if (num_expert_group is None) != (topk_group is None):
        raise ValueError("num_expert_group and topk_group go together: pass both or neither")
    if num_expert_group is not None:
        if not _is_int(num_expert_group) or num_expert_group < 1 or num_experts % num_expert_group:
            raise ValueError(f"num_expert_group must be a positive int dividing the {num_experts} experts, "
                             f"got {num_expert_group!r}")
        if not _is_int(topk_group) or not 1 <= topk_group <= num_expert_group:
            raise ValueError(f"topk_group must be an int in [1, {num_expert_group}], got {topk_group!r}")
        group_size = num_experts // num_expert_group
        if top_k > topk_group * group_size:
            raise ValueError(f"top_k={top_k} exceeds the {topk_group} kept groups' {topk_group * group_size} experts")
        if scoring == "sigmoid" and group_size < 2:
            raise ValueError("sigmoid scoring ranks a group by its two best experts: groups need >= 2 experts")
    if correction_bias is not None:
        if scoring != "sigmoid":
            raise ValueError("correction_bias is DeepSeek-V3's sigmoid-score bias: it needs scoring='sigmoid'")
        _utils.check_tensor("correction_bias", correction_bias, ndim=1, dtypes=_utils.FLOAT_DTYPES)
        if correction_bias.shape[0] != num_experts:
            raise ValueError(f"correction_bias must have shape ({num_experts},), got {tuple(correction_bias.shape)}")
        _utils.check_same(("router_logits", "correction_bias"), (router_logits, correction_bias), dtype=False)
    if not isinstance(routed_scaling_factor, numbers.Real) or isinstance(routed_scaling_factor, bool):
        raise TypeError(f"routed_scaling_factor must be a float, got {routed_scaling_factor!r}")
    if not abs(routed_scaling_factor) <= _F32_MAX:      # the kernel multiplies in float32: inf there is refused too
        raise ValueError(f"routed_scaling_factor must be finite in float32, got {routed_scaling_factor!r}")


def _topk_triton(logits, top_k, renormalize, scoring, num_expert_group, topk_group, bias, scaling):
    tokens, num_experts = logits.shape
    weights = torch.empty((tokens, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((tokens, top_k), dtype=torch.int32, device=logits.device)
    if tokens == 0:
        return weights, ids
    block_t, block_e, block_k = _topk_blocks(num_experts, top_k)
    groups = num_expert_group or 1
    bias = None if bias is None else bias.contiguous()
    launch_opts = {} if _utils.INTERPRET else dict(num_warps=TOPK_WARPS)
    kernels.moe_topk_kernel[(triton.cdiv(tokens, block_t),)](
        logits, logits.stride(0), logits.stride(1), bias if bias is not None else logits, weights, ids,
        tokens, num_experts, top_k, num_experts // groups, groups, topk_group or groups, float(scaling),
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=block_k, SIGMOID=scoring == "sigmoid", HAS_BIAS=bias is not None,
        GROUPED=num_expert_group is not None and num_expert_group > 1, RENORMALIZE=renormalize, **launch_opts)
    return weights, ids


# The op takes num_expert_group = topk_group = 0 for "no groups".
def _check_topk_op(router_logits, top_k, renormalize, scoring, num_expert_group, topk_group, correction_bias,
                   routed_scaling_factor) -> None:
    """The op may be called directly (torch.ops.llmkern.moe_topk): the public function's checks again, before any
    implementation runs (llmkern._dispatch)."""
    _check_topk(router_logits, top_k, renormalize, scoring, num_expert_group or None, topk_group or None,
                correction_bias, routed_scaling_factor)


def _topk_reference(router_logits, top_k, renormalize, scoring, num_expert_group, topk_group, correction_bias,
                    routed_scaling_factor):
    w, ids = reference.moe_topk(router_logits, top_k, renormalize=renormalize, scoring=scoring,
                                num_expert_group=num_expert_group or None, topk_group=topk_group or None,
                                correction_bias=correction_bias, routed_scaling_factor=routed_scaling_factor)
    return w.float(), ids.int()


@_dispatch.custom_op("moe_topk", mutates_args=(), reference=_topk_reference, check=_check_topk_op)
def _moe_topk_op(router_logits: torch.Tensor, top_k: int, renormalize: bool, scoring: str, num_expert_group: int,
                 topk_group: int, correction_bias: Optional[torch.Tensor],
                 routed_scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _topk_triton(router_logits, top_k, renormalize, scoring, num_expert_group or None, topk_group or None,
                        correction_bias, routed_scaling_factor)


@_moe_topk_op.register_fake
def _(router_logits, top_k, renormalize, scoring, num_expert_group, topk_group, correction_bias,
      routed_scaling_factor):
    shape = (router_logits.shape[0], top_k)
    return router_logits.new_empty(shape, dtype=torch.float32), router_logits.new_empty(shape, dtype=torch.int32)


def moe_topk(router_logits: torch.Tensor, top_k: int, *, renormalize: bool = True, scoring: str = "softmax",
             num_expert_group: Optional[int] = None, topk_group: Optional[int] = None,
             correction_bias: Optional[torch.Tensor] = None,
             routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each token's top_k experts: (topk_weights float32 (T, top_k), topk_ids int32 (T, top_k)).

    router_logits: (T, E) fp16/bf16/fp32, any strides, 1 <= E <= 1024; math in fp32.
    scoring="softmax" (Mixtral, Qwen2/3-MoE, OLMoE): experts ranked by logit; weight = softmax probability over all
      E experts. renormalize=True divides the chosen weights by their sum (Mixtral always; Qwen/OLMoE when
      norm_topk_prob): transformers' MixtralTopKRouter / Qwen3MoeTopKRouter.
    scoring="sigmoid" (DeepSeek-V3): score = sigmoid(logit); experts ranked by score + correction_bias
      (e_score_correction_bias, (E,)); weight = the score without bias; renormalize adds 1e-20 to the sum, as
      transformers' DeepseekV3TopkRouter does.
    num_expert_group, topk_group: DeepSeek's group-limited routing: E experts in num_expert_group equal groups; only
      the topk_group best groups' experts can be chosen. A group ranks by its best key (softmax, DeepSeek-V2) or by
      the sum of its two best keys (sigmoid, DeepSeek-V3).
    routed_scaling_factor: multiplies the final weights in float32 (DeepSeek-V3: 2.5); any value finite in float32
      (0 zeroes the weights, a negative one flips their sign; a huge one may overflow them to inf), else ValueError.

    Order and ties: each row lists its experts by key, best first; equal keys go to the lower expert index (as
    torch.argmax, or torch.sort(descending=True, stable=True)); groups likewise. torch.topk returns the same
    values, but its order among equal values is not specified (torch 2.13 on CPU: the top 3 of
    [1, 3, 3, 2, 3, 0, 3, 3] are indices [4, 7, 6]; here [1, 2, 4]), so ties follow the stable rule, and the tests
    check values against torch.topk and ids against the stable sort. NaN logits never win a choice (ids stay in [0, E))
    but give NaN weights.
    One kernel launch: a program keeps a block of tokens' logits in registers and takes the best remaining key
    top_k times (no sort). Raises TypeError/ValueError naming the argument for bad input.
    """
    _check_topk(router_logits, top_k, renormalize, scoring, num_expert_group, topk_group, correction_bias,
                routed_scaling_factor)
    return _moe_topk_op(router_logits, top_k, renormalize, scoring, num_expert_group or 0, topk_group or 0,
                        correction_bias, float(routed_scaling_factor))


# ------------------------------------------------------------------------------------------ quantized experts
class QuantizedExperts(PackedTensors):
    """E experts' (out_features, in_features) weights in llmkern's int4/int8 weight-only layout, stacked.

    Each expert is exactly a llmkern.QuantizedWeight (see llmkern.quant for the packed layout), and the tensors are
    those of the E experts stacked along a new first dim:
      qweight (E, in_features // PACK, out_features) int32, PACK = 32 // bits codes per word along K;
      scales  (E, groups, out_features) fp16/bf16 (the activation dtype); zeros (E, groups, out_features) int16;
      perm    optional (E, in_features) int32: GPTQ act-order, a permutation of x's columns per expert.
    Build it with `quantize_experts` (round to nearest) or `QuantizedExperts.from_weights` (per-expert weights,
    e.g. each converted from a GPTQ/AWQ checkpoint with QuantizedWeight.from_gptq / from_awq);
    `from_gate_up` joins separate gate and up projections into w13's layout.
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, *, bits: int,
                 group_size: int, in_features: int, out_features: int, perm: Optional[torch.Tensor] = None):
        self._set(qweight, scales, zeros, bits, group_size, in_features, out_features, perm)
        if perm is not None:
            quant_weight.check_permutation("perm", perm)

    @classmethod
    def _unchecked_values(cls, qweight, scales, zeros, *, bits, group_size, in_features, out_features,
                          perm=None) -> "QuantizedExperts":
        """The constructor's checks of shapes, dtypes and devices only, no device sync: for the op's per-call
        arguments and a patched module's buffers, which a checked QuantizedExperts normally gave them."""
        self = cls.__new__(cls)
        self._set(qweight, scales, zeros, bits, group_size, in_features, out_features, perm)
        return self

    def _set(self, qweight, scales, zeros, bits, group_size, in_features, out_features, perm) -> None:
        check_bits_group(bits, group_size, in_features)
        _utils.check_tensor("qweight", qweight, ndim=3, dtypes=(torch.int32,))
        _utils.check_tensor("scales", scales, ndim=3, dtypes=SCALE_DTYPES)
        _utils.check_tensor("zeros", zeros, ndim=3, dtypes=(torch.int16,))
        num_experts = qweight.shape[0]
        groups = 1 if group_size == -1 else in_features // group_size
        quant_weight._expect_shape("qweight", qweight, (num_experts, in_features // (32 // bits), out_features))
        quant_weight._expect_shape("scales", scales, (num_experts, groups, out_features))
        quant_weight._expect_shape("zeros", zeros, (num_experts, groups, out_features))
        tensors = [qweight, scales, zeros]
        if perm is not None:
            _utils.check_tensor("perm", perm, ndim=2, dtypes=(torch.int32,))
            quant_weight._expect_shape("perm", perm, (num_experts, in_features))
            tensors.append(perm)
        _utils.check_same(("qweight", "scales", "zeros", "perm")[:len(tensors)], tensors, dtype=False)
        self.qweight, self.scales, self.zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
        self.perm = None if perm is None else perm.contiguous()
        self.bits, self.group_size = bits, group_size
        self.in_features, self.out_features = in_features, out_features

    @property
    def num_experts(self) -> int:
        return self.qweight.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(E, out_features, in_features): the shape of the dense weight it stands for."""
        return (self.num_experts, self.out_features, self.in_features)

    def __repr__(self) -> str:
        return (f"QuantizedExperts(num_experts={self.num_experts}, out_features={self.out_features}, "
                f"in_features={self.in_features}, bits={self.bits}, group_size={self.group_size}, dtype={self.dtype}, "
                f"device={self.device}, act_order={self.perm is not None})")

    def expert(self, e: int) -> QuantizedWeight:
        """Expert e as a QuantizedWeight (views of the stacked tensors, no copy)."""
        return QuantizedWeight(self.qweight[e], self.scales[e], self.zeros[e], bits=self.bits,
                                     group_size=self.group_size, in_features=self.in_features,
                                     out_features=self.out_features, perm=None if self.perm is None else self.perm[e])

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense (E, out_features, in_features) weight, in `dtype` (default: the scales' dtype)."""
        return torch.stack([self.expert(e).dequantize(dtype) for e in range(self.num_experts)])

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "QuantizedExperts":
        """A copy on `device` and/or with scales in `dtype` (fp16/bf16), as QuantizedWeight.to."""
        return QuantizedExperts.from_weights([self.expert(e).to(device, dtype) for e in range(self.num_experts)])

    @classmethod
    def from_weights(cls, weights: Sequence[QuantizedWeight]) -> "QuantizedExperts":
        """Stack per-expert QuantizedWeights that agree on shape, bits, group size, dtype, device and act-order."""
        weights = list(weights)
        if not weights or not all(isinstance(w, QuantizedWeight) for w in weights):
            raise TypeError("weights must be a non-empty sequence of llmkern.QuantizedWeight")
        first = weights[0]
        for i, w in enumerate(weights):
            same = (w.shape, w.bits, w.group_size, w.dtype, w.device, w.perm is None) == \
                (first.shape, first.bits, first.group_size, first.dtype, first.device, first.perm is None)
            if not same:
                raise ValueError(f"weights[{i}] ({w!r}) does not match weights[0] ({first!r})")
        stack = lambda name: torch.stack([getattr(w, name) for w in weights])  # noqa: E731
        return cls(stack("qweight"), stack("scales"), stack("zeros"), bits=first.bits, group_size=first.group_size,
                   in_features=first.in_features, out_features=first.out_features,
                   perm=None if first.perm is None else stack("perm"))

    @classmethod
    def from_gate_up(cls, gates: Sequence[QuantizedWeight],
                     ups: Sequence[QuantizedWeight]) -> "QuantizedExperts":
        """w13 from separate gate and up projections (as GPTQ/AWQ MoE checkpoints store them): expert e's rows are
        gates[e]'s then ups[e]'s. With act-order, an expert's gate and up must share their permutation."""
        gates, ups = list(gates), list(ups)
        if len(gates) != len(ups):
            raise ValueError(f"gates and ups must list the same experts, got {len(gates)} and {len(ups)}")
        joined = []
        for e, (g, u) in enumerate(zip(gates, ups)):
            if (g.shape, g.bits, g.group_size, g.dtype, g.device) != (u.shape, u.bits, u.group_size, u.dtype, u.device):
                raise ValueError(f"expert {e}: gate {g!r} and up {u!r} must agree in shape, bits, group size, "
                                 "dtype and device")
            if (g.perm is None) != (u.perm is None) or (g.perm is not None and not torch.equal(g.perm, u.perm)):
                raise ValueError(f"expert {e}: gate and up have different act-order permutations; w13 needs one")
            joined.append(QuantizedWeight(
                torch.cat([g.qweight, u.qweight], 1), torch.cat([g.scales, u.scales], 1),
                torch.cat([g.zeros, u.zeros], 1), bits=g.bits, group_size=g.group_size, in_features=g.in_features,
                out_features=2 * g.out_features, perm=g.perm))
        return cls.from_weights(joined)


def quantize_experts(w: torch.Tensor, *, bits: int = 4, group_size: int = 128,
                     symmetric: bool = False) -> QuantizedExperts:
    """Round-to-nearest quantization of each expert of a dense (E, out_features, in_features) weight (w13 or w2),
    exactly as llmkern.quantize_weight does for one nn.Linear weight."""
    _utils.check_tensor("w", w, ndim=3, dtypes=_utils.FLOAT_DTYPES)
    return QuantizedExperts.from_weights([quantize_weight(w[e], bits=bits, group_size=group_size,
                                                                symmetric=symmetric) for e in range(w.shape[0])])


# ----------------------------------------------------------------------------------------------------- fused_moe
# The align kernel: 1024 slots per iteration, block -> expert in (BLOCK_B, BLOCK_E) tiles of 2048 compares, 8 warps
# (4 per thread; at 4 warps the 1024-expert build spilled in check-compile).
ALIGN_BLOCK_A = 1024
ALIGN_TILE = 2048
ALIGN_WARPS = 8
# The sum kernel: one program per (token, 1024 hidden columns), 8 per thread at 4 warps.
SUM_BLOCK_H = 1024
SUM_WARPS = 4

# Grouped GEMM tiles. The row tile BLOCK_M is fixed before the launch (the alignment pads runs to it), from the
# average run length A / E: up to 32 rows per expert (decode, small batches: Mixtral up to 128 tokens, Qwen3-30B-A3B
# up to 512) 16-row tiles, the MMA's minimum, so a run of a few tokens wastes little; longer runs 64-row tiles, which
# reuse each weight tile across more rows. For each tuning key (_GEMM below) Triton's autotuner picks among the
# row tile's configs on the first call (configs[0] under the interpreter). 16-row tiles stream weights: the choice trades columns per
# program (more programs when few experts are hit) against K depth per load. The 64-row tiles follow Triton's matmul
# tutorial (64 x 64 and 64 x 128, GROUP_M 8) with BLOCK_K 32: the gate/up kernel keeps two accumulators, and with
# BLOCK_K 64 its 64 x 128 tile (8 warps) spilled on sm_80, its 64 x 64 one (4 warps) with triton 3.6. fp32
# activations use exact fp32 dots on CUDA cores, whose operands live in registers: small tiles (a 64 x 64 x 64 one
# spilled kilobytes on sm_80).
# Quantized weights use BLOCK_K = 32, the smallest group size, so a K-tile lies in one group (as in llmkern.quant);
# their 16-row 128-column tile spilled on sm_90, hence 32 and 64 columns.
SMALL_RUN = 32


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 1 if bm == 16 else 8},
                         num_warps=warps, num_stages=stages)


_CONFIGS = {   # (weight kind, row tile) -> configs; kind: "dense" (fp16/bf16), "fp32", "quant"
    ("dense", 16): [_cfg(16, 64, 64, 4, 4), _cfg(16, 32, 128, 4, 4)],
    ("dense", 64): [_cfg(64, 64, 32, 4, 4), _cfg(64, 128, 32, 8, 3)],
    ("fp32", 16): [_cfg(16, 32, 32, 4, 2)],
    ("fp32", 64): [_cfg(64, 32, 32, 4, 2)],
    ("quant", 16): [_cfg(16, 64, QUANT_BLOCK_K, 4, 3), _cfg(16, 32, QUANT_BLOCK_K, 4, 4)],
    ("quant", 64): [_cfg(64, 64, QUANT_BLOCK_K, 4, 4), _cfg(64, 128, QUANT_BLOCK_K, 8, 3)],
}


def _kind(dtype: torch.dtype, quantized: bool) -> str:
    return "quant" if quantized else "fp32" if dtype == torch.float32 else "dense"


# One autotuner per tuning key (llmkern.tuning): the weight kind and dtype, gate/up or down, the row tile (fixed by
# the alignment, not the autotuner's to change), the weight's N and K, and the slot count A bucketed to the next
# power of two (how many row blocks there are decides how wide a column tile may be). A config shipped for the GPU
# in python/llmkern/configs/ replaces autotuning for its key.
_GEMM = tuning.TunedKernel(
    "moe_gemm", kernels.moe_gemm_kernel, buckets=("slots",),
    configs=lambda key: _CONFIGS[(_kind(key["dtype"], key["quantized"]), key["block_m"])],
    spec=lambda key, cfg: _gemm_spec(cfg, key["dtype"], quantized=key["quantized"], gated=key["gated"]))


def block_m(num_slots: int, num_experts: int) -> int:
    """The row tile for A = num_slots (token, k) pairs over num_experts experts (see SMALL_RUN)."""
    return 16 if num_slots <= SMALL_RUN * num_experts else 64


def max_row_blocks(num_slots: int, num_experts: int, bm: int) -> int:
    """An upper bound on the non-empty BLOCK_M-row blocks, from shapes alone (no sync): each of the at most
    min(E, A) experts hit adds at most one partly filled block to the cdiv(A, BLOCK_M) full ones."""
    return triton.cdiv(num_slots, bm) + min(num_experts, num_slots)


class _Weight:
    """One projection's experts as the kernels see them: dense (E, N, K) with any strides, or QuantizedExperts."""

    def __init__(self, name: str, w):
        self.name = name
        self.quantized = isinstance(w, QuantizedExperts)
        if self.quantized:
            self.tensor, self.scales, self.zeros, self.perm = w.qweight, w.scales, w.zeros, w.perm
            self.bits, self.group_size = w.bits, w.group_size
            self.num_experts, self.n, self.k, self.dtype = w.num_experts, w.out_features, w.in_features, w.dtype
        else:
            _utils.check_tensor(name, w, ndim=3, dtypes=_utils.FLOAT_DTYPES)
            self.tensor, self.scales, self.zeros, self.perm = w, None, None, None
            self.bits, self.group_size = 16, -1
            self.num_experts, self.n, self.k = w.shape
            self.dtype = w.dtype

    def op_args(self) -> tuple:
        return (self.tensor, self.scales, self.zeros, self.perm, self.bits, self.group_size)

    @classmethod
    def from_op_args(cls, name, tensor, scales, zeros, perm, bits, group_size) -> "_Weight":
        if bits == 16:
            if scales is not None or zeros is not None or perm is not None:
                raise ValueError(f"{name}: a dense weight (bits=16) takes no scales, zeros or perm")
            return cls(name, tensor)
        if tensor.dim() != 3 or scales is None or zeros is None:
            raise ValueError(f"{name}: a quantized weight needs (E, K // PACK, N) words, scales and zeros")
        return cls(name, QuantizedExperts._unchecked_values(
            tensor, scales, zeros, bits=bits, group_size=group_size,
            in_features=tensor.shape[1] * (32 // bits) if bits in (4, 8) else 0, out_features=tensor.shape[2],
            perm=perm))

    def dense(self) -> torch.Tensor:
        """(E, N, K) for the reference path: the tensor itself (the reference converts the experts it uses), or the
        dequantized experts in float32."""
        if not self.quantized:
            return self.tensor
        q = QuantizedExperts._unchecked_values(self.tensor, self.scales, self.zeros, bits=self.bits,
                                               group_size=self.group_size, in_features=self.k, out_features=self.n,
                                               perm=self.perm)
        return q.dequantize(torch.float32)


def _check_moe(hidden_states, w13: _Weight, w2: _Weight, topk_weights, topk_ids, activation) -> None:
    _utils.check_tensor("hidden_states", hidden_states, ndim=2, dtypes=_utils.FLOAT_DTYPES)
    tokens, hidden = hidden_states.shape
    dev = hidden_states.device
    if w13.num_experts != w2.num_experts:
        raise ValueError(f"w13 has {w13.num_experts} experts but w2 has {w2.num_experts}")
    if not 1 <= w13.num_experts <= MAX_EXPERTS:
        raise ValueError(f"w13: the number of experts must be in [1, {MAX_EXPERTS}], got {w13.num_experts}")
    if w13.n % 2 or w13.n == 0:
        raise ValueError(f"w13 must be (E, 2 * intermediate, hidden): its {w13.n} rows are not an even count")
    inter = w13.n // 2
    if w13.k != hidden:
        raise ValueError(f"w13 must be (E, 2 * intermediate, hidden={hidden}), got in_features {w13.k}")
    if (w2.n, w2.k) != (hidden, inter):
        raise ValueError(f"w2 must be (E, hidden={hidden}, intermediate={inter}), got ({w2.n}, {w2.k}) per expert")
    for w in (w13, w2):
        if w.dtype != hidden_states.dtype:
            what = "its scales" if w.quantized else "it"
            raise TypeError(f"{w.name}: {what} must have hidden_states' dtype {hidden_states.dtype}, got {w.dtype}")
        if w.tensor.device != dev:
            raise ValueError(f"{w.name} is on {w.tensor.device} but hidden_states is on {dev}")
    _utils.check_tensor("topk_weights", topk_weights, ndim=2, dtypes=_utils.FLOAT_DTYPES)
    _utils.check_tensor("topk_ids", topk_ids, ndim=2, dtypes=(torch.int32, torch.int64))
    if topk_weights.shape[0] != tokens or topk_weights.shape[1] < 1:
        raise ValueError(f"topk_weights must be ({tokens}, top_k), got {tuple(topk_weights.shape)}")
    if topk_ids.shape != topk_weights.shape:
        raise ValueError(f"topk_ids must have topk_weights' shape {tuple(topk_weights.shape)}, "
                         f"got {tuple(topk_ids.shape)}")
    _utils.check_same(("hidden_states", "topk_weights", "topk_ids"), (hidden_states, topk_weights, topk_ids),
                      dtype=False)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _gemm(x: torch.Tensor, w: _Weight, out: torch.Tensor, align, topk_weights: torch.Tensor, top_k: int, *,
          gated: bool) -> None:
    sorted_ids, block_expert, total, bm, max_blocks = align
    n = out.shape[1]
    qkw = {}
    if w.quantized:
        pack_shift = {4: 3, 8: 2}[w.bits]
        gs = w.k if w.group_size == -1 else w.group_size
        args = (w.tensor, w.scales, w.zeros, w.perm if w.perm is not None else w.tensor)
        strides = (w.tensor.stride(0), 0, 0, w.scales.stride(0))
        qkw = dict(group_size=gs, bits=w.bits, pack_shift=pack_shift)
    else:
        args = (w.tensor,) * 4                     # scales, zeros, perm: never read for a dense weight
        strides = (w.tensor.stride(0), w.tensor.stride(1), w.tensor.stride(2), 0)
        qkw = dict(group_size=w.k, bits=0, pack_shift=0)
    grid = lambda meta: (max_blocks * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    gemm = _GEMM.get(x.device, dtype=x.dtype, quantized=w.quantized, gated=gated, block_m=bm, n=n, k=w.k,
                     slots=topk_weights.shape[0] * top_k)
    _utils.launch(gemm, grid,
                  x, *args, out, topk_weights, sorted_ids, block_expert, total,
                  n, w.k, w.n, topk_weights.shape[0] * top_k, top_k, max_blocks,
                  x.stride(0), x.stride(1), *strides, out.stride(0), topk_weights.stride(0), topk_weights.stride(1),
                  **qkw, GATED=gated, QUANT=w.quantized, HAS_PERM=w.perm is not None,
                  FP32_DOT=_utils.INTERPRET or x.dtype == torch.float32)


def _align(topk_ids: torch.Tensor, num_experts: int, bm: int):
    tokens, top_k = topk_ids.shape
    slots = tokens * top_k
    max_blocks = max_row_blocks(slots, num_experts, bm)
    dev = topk_ids.device
    sorted_ids = torch.empty(max_blocks * bm, dtype=torch.int32, device=dev)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    total = torch.empty(1, dtype=torch.int32, device=dev)
    cursor = torch.empty(num_experts, dtype=torch.int32, device=dev)
    block_e = max(16, triton.next_power_of_2(num_experts))
    launch_opts = {} if _utils.INTERPRET else dict(num_warps=ALIGN_WARPS)
    kernels.moe_align_kernel[(1,)](topk_ids, topk_ids.stride(0), topk_ids.stride(1), sorted_ids, block_expert, total,
                             cursor, slots, num_experts, top_k, max_blocks, BLOCK_M=bm, BLOCK_A=ALIGN_BLOCK_A,
                             BLOCK_E=block_e, BLOCK_B=ALIGN_TILE // block_e, **launch_opts)
    return sorted_ids, block_expert, total, bm, max_blocks


def _fused_moe_triton(hidden_states, w13: _Weight, w2: _Weight, topk_weights, topk_ids, activation):
    tokens, hidden = hidden_states.shape
    top_k = topk_ids.shape[1]
    out = torch.empty((tokens, hidden), dtype=hidden_states.dtype, device=hidden_states.device)
    if tokens == 0:
        return out
    slots = tokens * top_k
    x = _utils.last_dim_contiguous("hidden_states", hidden_states)
    align = _align(topk_ids, w13.num_experts, block_m(slots, w13.num_experts))
    inter = torch.empty((slots, w2.k), dtype=x.dtype, device=x.device)     # silu(gate) * up, one row per slot
    _gemm(x, w13, inter, align, topk_weights, top_k, gated=True)
    down = torch.empty((slots, hidden), dtype=x.dtype, device=x.device)    # weighted expert outputs, per slot
    _gemm(inter, w2, down, align, topk_weights, top_k, gated=False)
    launch_opts = {} if _utils.INTERPRET else dict(num_warps=SUM_WARPS)
    kernels.moe_sum_kernel[(tokens, triton.cdiv(hidden, SUM_BLOCK_H))](
        down, topk_ids, out, hidden, w13.num_experts, top_k, topk_ids.stride(0), topk_ids.stride(1), out.stride(0),
        BLOCK_H=SUM_BLOCK_H, **launch_opts)
    return out


def _weights(args) -> tuple["_Weight", "_Weight"]:
    """w13 and w2 from the op's schema arguments (6 each: tensor, scales, zeros, perm, bits, group_size)."""
    return _Weight.from_op_args("w13", *args[:6]), _Weight.from_op_args("w2", *args[6:12])


def _check_fused_moe_op(hidden_states, *args) -> None:
    """The op may be called directly (torch.ops.llmkern.fused_moe): the public function's checks again, before any
    implementation runs (llmkern._dispatch), so inconsistent tensors never reach a kernel."""
    _check_moe(hidden_states, *_weights(args), *args[12:])


def _fused_moe_reference(hidden_states, *args):
    w13, w2 = _weights(args)
    topk_weights, topk_ids, activation = args[12:]
    return reference.fused_moe(hidden_states, w13.dense(), w2.dense(), topk_weights, topk_ids, activation=activation)


@_dispatch.custom_op("fused_moe", mutates_args=(), reference=_fused_moe_reference, check=_check_fused_moe_op)
def _fused_moe_op(hidden_states: torch.Tensor,
                  w13: torch.Tensor, w13_scales: Optional[torch.Tensor], w13_zeros: Optional[torch.Tensor],
                  w13_perm: Optional[torch.Tensor], w13_bits: int, w13_group_size: int,
                  w2: torch.Tensor, w2_scales: Optional[torch.Tensor], w2_zeros: Optional[torch.Tensor],
                  w2_perm: Optional[torch.Tensor], w2_bits: int, w2_group_size: int,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor, activation: str) -> torch.Tensor:
    """The op behind fused_moe. Each weight is either dense (bits=16; no scales, zeros, perm) or llmkern's packed
    format (bits 4/8; QuantizedExperts' tensors)."""
    args = (w13, w13_scales, w13_zeros, w13_perm, w13_bits, w13_group_size,
            w2, w2_scales, w2_zeros, w2_perm, w2_bits, w2_group_size)
    return _fused_moe_triton(hidden_states, *_weights(args), topk_weights, topk_ids, activation)


@_fused_moe_op.register_fake
def _(hidden_states, w13, w13_scales, w13_zeros, w13_perm, w13_bits, w13_group_size, w2, w2_scales, w2_zeros,
      w2_perm, w2_bits, w2_group_size, topk_weights, topk_ids, activation):
    return hidden_states.new_empty(hidden_states.shape)


def fused_moe(hidden_states: torch.Tensor, w13, w2, topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
              activation: str = "silu") -> torch.Tensor:
    """The MoE MLP of a batch of tokens: (T, H) in hidden_states' dtype.

        out[t] = sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(hidden_states[t]),
        expert_e(x) = w2[e] @ (silu(w13[e][:I] @ x) * (w13[e][I:] @ x))

    hidden_states: (T, H) fp16/bf16/fp32, any strides.
    w13: (E, 2 * I, H), gate rows then up rows; w2: (E, H, I). Each either a dense tensor of hidden_states' dtype
      (any strides: a transposed view is read in place) or a QuantizedExperts (int4/int8 weight-only, scales in
      hidden_states' dtype, fp16/bf16). 1 <= E <= 1024.
    topk_weights: (T, top_k) fp32 (as moe_topk returns) or fp16/bf16, read as fp32; topk_ids: (T, top_k) int32 or
      int64, any strides. An id outside [0, E) routes its slot nowhere (it adds nothing): transformers' experts
      modules skip id E the same way (expert parallelism's "not on this rank").
    activation: "silu" (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek).
    Math: fp32 accumulation; silu(gate) * up is rounded to the activation dtype once, each weighted expert output
    once, and each token's top_k outputs are summed in fp32 in k order (deterministic) and rounded once.
    Raises TypeError/ValueError naming the argument for bad shapes, dtypes or devices, before any launch; the ids'
    values are not checked on the host (that would need a device sync) but can never cause an out-of-range access.
    """
    w13w, w2w = _Weight("w13", w13), _Weight("w2", w2)
    _check_moe(hidden_states, w13w, w2w, topk_weights, topk_ids, activation)
    return _fused_moe_op(hidden_states, *w13w.op_args(), *w2w.op_args(), topk_weights, topk_ids, activation)


# ----------------------------------------------------------------------------------------------- compile specs
_TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _topk_spec(block_e: int, block_k: int, dtype: torch.dtype, *, sigmoid: bool, bias: bool, grouped: bool,
               renormalize: bool = True):
    flags = dict(SIGMOID=sigmoid, HAS_BIAS=bias, GROUPED=grouped, RENORMALIZE=renormalize)
    return compile_check.CompileSpec(
        kernel=kernels.moe_topk_kernel, name="moe_topk",
        config=f"{_TY[dtype]},T{TOPK_TILE // block_e}E{block_e}K{block_k}w{TOPK_WARPS}"
               + "".join(f",{k.lower()}" for k, on in flags.items() if on),
        signature={"logits_ptr": f"*{_TY[dtype]}:16", "stride_lt": "i32", "stride_le": "i32", "bias_ptr": "*fp32:16",
                   "weights_ptr": "*fp32:16", "ids_ptr": "*i32:16", "T": "i32", "E": "i32", "top_k": "i32",
                   "group_size": "i32", "num_groups": "i32", "topk_group": "i32", "scaling": "fp32"},
        constexprs=dict(BLOCK_T=TOPK_TILE // block_e, BLOCK_E=block_e, BLOCK_K=block_k, **flags),
        num_warps=TOPK_WARPS)


def _align_spec(bm: int, block_e: int, ids_dtype: str = "i32"):
    return compile_check.CompileSpec(
        kernel=kernels.moe_align_kernel, name="moe_align", config=f"M{bm}E{block_e}w{ALIGN_WARPS},ids {ids_dtype}",
        signature={"ids_ptr": f"*{ids_dtype}:16", "stride_it": "i32", "stride_ik": "i32", "sorted_ptr": "*i32:16",
                   "block_expert_ptr": "*i32:16", "total_ptr": "*i32:16", "cursor_ptr": "*i32:16", "A": "i32",
                   "E": "i32", "top_k": "i32", "max_blocks": "i32"},
        constexprs=dict(BLOCK_M=bm, BLOCK_A=ALIGN_BLOCK_A, BLOCK_E=block_e, BLOCK_B=ALIGN_TILE // block_e),
        num_warps=ALIGN_WARPS)


def _gemm_spec(cfg: triton.Config, dtype: torch.dtype, *, quantized: bool, gated: bool, perm: bool = False):
    ty = _TY[dtype]
    w_ty, z_ty, p_ty = ("i32", "i16", "i32") if quantized else (ty, ty, ty)   # dense: the weight passed for all
    tiles = "".join(f"{k[6:]}{v}" for k, v in cfg.kwargs.items() if k.startswith("BLOCK"))
    return compile_check.CompileSpec(
        kernel=kernels.moe_gemm_kernel, name="moe_gemm_gate_up" if gated else "moe_gemm_down",
        config=f"{ty},{'int4/8' if quantized else 'dense'},{tiles}w{cfg.num_warps}s{cfg.num_stages}"
               + (",act_order" if perm else ""),
        # Mixtral/Qwen shapes: every dimension and row stride a multiple of 16, as the launcher would see them
        signature={"x_ptr": f"*{ty}:16", "w_ptr": f"*{w_ty}:16", "s_ptr": f"*{ty}:16", "z_ptr": f"*{z_ty}:16",
                   "perm_ptr": f"*{p_ty}:16", "out_ptr": f"*{ty}:16", "topk_w_ptr": "*fp32:16",
                   "sorted_ptr": "*i32:16", "block_expert_ptr": "*i32:16", "total_ptr": "*i32:16",
                   "N": "i32:16", "K": "i32:16", "W_N": "i32:16", "A": "i32", "top_k": "i32", "num_m": "i32",
                   "stride_xm": "i32:16", "stride_xk": "i32", "stride_we": "i32:16", "stride_wn": "i32:16",
                   "stride_wk": "i32", "stride_se": "i32:16", "stride_om": "i32:16", "stride_twt": "i32",
                   "stride_twk": "i32", "group_size": "i32:16", "bits": "i32", "pack_shift": "i32"},
        constexprs=dict(GATED=gated, QUANT=quantized, HAS_PERM=perm, FP32_DOT=dtype == torch.float32, **cfg.kwargs),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, expect_mma=dtype != torch.float32)


def _sum_spec(dtype: torch.dtype, ids_dtype: str = "i32"):
    return compile_check.CompileSpec(
        kernel=kernels.moe_sum_kernel, name="moe_sum", config=f"{_TY[dtype]},H{SUM_BLOCK_H}w{SUM_WARPS},ids {ids_dtype}",
        signature={"y_ptr": f"*{_TY[dtype]}:16", "ids_ptr": f"*{ids_dtype}:16", "out_ptr": f"*{_TY[dtype]}:16",
                   "H": "i32:16", "E": "i32", "top_k": "i32", "stride_it": "i32", "stride_ik": "i32",
                   "stride_ot": "i32:16"},
        constexprs=dict(BLOCK_H=SUM_BLOCK_H), num_warps=SUM_WARPS)


@compile_check.register
def _compile_specs():
    """moe_topk: every expert tile (16..1024) with the common case (softmax, bf16 logits, BLOCK_K 8) and with the
    most live tiles (DeepSeek-V3's sigmoid + bias + groups, fp32 logits, BLOCK_K = BLOCK_E, the largest), plus
    grouped softmax in fp16. moe_align: every expert tile for both row tiles, int64 ids once. moe_gemm: every
    autotuned config of both row tiles, gate/up and down: dense and int4/int8 in fp16 and bf16 (tensor cores
    expected), dense fp32 (exact fp32 dots, no tensor cores), act-order once per row tile.
    moe_sum: each dtype."""
    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
    expert_tiles = [2 ** i for i in range(4, 11)]                 # 16 .. MAX_EXPERTS
    for block_e in expert_tiles:
        yield _topk_spec(block_e, 8, bf16, sigmoid=False, bias=False, grouped=False)
        yield _topk_spec(block_e, block_e, f32, sigmoid=True, bias=True, grouped=True)
    yield _topk_spec(64, 8, f16, sigmoid=False, bias=False, grouped=True, renormalize=False)
    for bm in (16, 64):
        for block_e in expert_tiles:
            yield _align_spec(bm, block_e)
    yield _align_spec(16, 128, "i64")
    for (kind, bm), cfgs in _CONFIGS.items():
        for gated in (True, False):
            for cfg in cfgs:
                for dtype in ((f32,) if kind == "fp32" else (f16, bf16)):
                    yield _gemm_spec(cfg, dtype, quantized=kind == "quant", gated=gated)
        if kind == "quant":
            yield _gemm_spec(cfgs[0], bf16, quantized=True, gated=True, perm=True)
    for dtype in (f16, bf16, f32):
        yield _sum_spec(dtype)
    yield _sum_spec(bf16, "i64")
