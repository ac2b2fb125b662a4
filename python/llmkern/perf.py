"""Roofline facts in one place: device peaks, and the FLOPs and bytes each op must do and move.

The benchmarks and `llmkern roofline` both use these formulas, so a benchmark's "% of roofline" and the roofline
tool's "lowest possible time" are computed the same way.

Conventions:
  * FLOPs count a multiply-add as 2. Only the matmul-like work is counted (softmax/exp are ignored, as
    FlashAttention's papers do).
  * Bytes are the compulsory traffic to and from HBM: every input read once, every output written once.
  * `roofline(flops, bytes, peak)`: the time the compute alone needs (flops / peak FLOP/s) and the time the traffic
    alone needs (bytes / peak bandwidth); the larger is the lowest time the device allows, and names the roof that
    binds ("compute" or "memory").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class DevicePeak:
    name: str
    hbm_gbps: float          # memory bandwidth, GB/s (1e9 bytes/s)
    tensor_tflops: float     # dense fp16/bf16 tensor-core TFLOP/s with fp32 accumulation
    fp32_tflops: float       # non-tensor fp32 TFLOP/s
    source: str


# Sources are the vendors' datasheets. Sparse tensor figures are halved to their dense value.
DEVICES: dict[str, DevicePeak] = {
    # NVIDIA H100 datasheet (SXM5): BF16/FP16 tensor 1,979 TFLOPS with sparsity -> 989.5 dense; FP32 67; 3.35 TB/s.
    "h100-sxm": DevicePeak("NVIDIA H100 SXM", 3350.0, 989.5, 67.0, "NVIDIA H100 datasheet, SXM column"),
    # Same datasheet, PCIe column: 1,513 sparse -> 756.5 dense; FP32 51; 2.0 TB/s.
    "h100-pcie": DevicePeak("NVIDIA H100 PCIe", 2000.0, 756.5, 51.0, "NVIDIA H100 datasheet, PCIe column"),
    # Same datasheet, NVL column (per GPU): 1,671 sparse -> 835.5 dense; FP32 60; 3.9 TB/s.
    "h100-nvl": DevicePeak("NVIDIA H100 NVL", 3900.0, 835.5, 60.0, "NVIDIA H100 datasheet, NVL column"),
    # NVIDIA H200 datasheet (SXM): same compute as H100 SXM; HBM3e 4.8 TB/s.
    "h200": DevicePeak("NVIDIA H200 SXM", 4800.0, 989.5, 67.0, "NVIDIA H200 datasheet, SXM column"),
    # NVIDIA A100 datasheet: BF16/FP16 tensor 312 dense; FP32 19.5; 80GB SXM 2,039 GB/s.
    "a100-80gb": DevicePeak("NVIDIA A100 80GB SXM", 2039.0, 312.0, 19.5, "NVIDIA A100 datasheet, 80GB SXM column"),
    # Same datasheet, 40GB: 1,555 GB/s.
    "a100-40gb": DevicePeak("NVIDIA A100 40GB", 1555.0, 312.0, 19.5, "NVIDIA A100 datasheet, 40GB column"),
    # NVIDIA L40S datasheet: BF16/FP16 tensor 362.05 dense (733 with sparsity); FP32 91.6; 864 GB/s.
    "l40s": DevicePeak("NVIDIA L40S", 864.0, 362.05, 91.6, "NVIDIA L40S datasheet"),
    # NVIDIA Ada (AD102) whitepaper, RTX 4090: FP16 tensor with FP32 accumulate 165.2 dense; FP32 82.6; 1,008 GB/s.
    "rtx4090": DevicePeak("NVIDIA GeForce RTX 4090", 1008.0, 165.2, 82.6, "NVIDIA Ada GPU architecture whitepaper"),
}


# Names people type for the devices in DEVICES.
DEVICE_ALIASES = {"h100": "h100-sxm", "h100-sxm5": "h100-sxm", "a100": "a100-80gb", "a100-80": "a100-80gb",
                  "a100-40": "a100-40gb", "4090": "rtx4090", "rtx-4090": "rtx4090", "h200-sxm": "h200"}


def resolve_device(name: str) -> DevicePeak:
    """A DEVICES key or alias (case-insensitive) -> its peaks; ValueError naming the known ones otherwise."""
    key = name.strip().lower()
    key = DEVICE_ALIASES.get(key, key)
    if key not in DEVICES:
        known = ", ".join(list(DEVICES) + sorted(DEVICE_ALIASES))
        raise ValueError(f"unknown device {name!r}; known: {known}")
    return DEVICES[key]


def device_peak(device: torch.device | str | None = None) -> DevicePeak | None:
    """The peak table entry for a CUDA device (by its reported name), or a table key; None when unknown or CPU."""
    if isinstance(device, str) and device in DEVICES:
        return DEVICES[device]
    dev = torch.device(device) if device is not None else None
    if dev is None or dev.type != "cuda" or not torch.cuda.is_available():
        return None
    return match_device_name(torch.cuda.get_device_name(dev))


def match_device_name(name: str) -> DevicePeak | None:
    n = name.lower()
    if "h200" in n:
        return DEVICES["h200"]
    if "h100" in n:
        if "pcie" in n:
            return DEVICES["h100-pcie"]
        if "nvl" in n:
            return DEVICES["h100-nvl"]
        return DEVICES["h100-sxm"]  # "NVIDIA H100 80GB HBM3" is the SXM part
    if "a100" in n:
        return DEVICES["a100-40gb"] if "40gb" in n else DEVICES["a100-80gb"]
    if "l40s" in n:
        return DEVICES["l40s"]
    if "4090" in n:
        return DEVICES["rtx4090"]
    return None


@dataclass(frozen=True)
class Roof:
    """An op (or a model step) under a device's roofline: the seconds its FLOPs alone and its bytes alone need."""
    compute_s: float
    memory_s: float

    @property
    def time_s(self) -> float:
        """The lowest time the device allows: the larger of the two."""
        return max(self.compute_s, self.memory_s)

    @property
    def bound(self) -> str:
        """The roof that binds: "compute" or "memory"."""
        return "compute" if self.compute_s >= self.memory_s else "memory"


def roofline(flops: float, nbytes: float, peak: DevicePeak, *, tensor_cores: bool = True) -> Roof:
    """FLOPs against the tensor-core peak (or the fp32 one when tensor_cores is False), bytes against HBM bandwidth."""
    tflops = peak.tensor_tflops if tensor_cores else peak.fp32_tflops
    return Roof(compute_s=flops / (tflops * 1e12), memory_s=nbytes / (peak.hbm_gbps * 1e9))


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ------------------------------------------------------------------------------------------------------ attention
def attention_pairs(seqlen_q: int, seqlen_k: int, *, causal: bool = False, window: tuple[int, int] = (-1, -1)) -> int:
    """Number of (query, key) pairs a mask allows, bottom-right aligned (query i sits at i + seqlen_k - seqlen_q)."""
    left, right = window
    if causal:
        right = 0
    total = 0
    offset = seqlen_k - seqlen_q
    # Closed form per query row; a Python loop over rows is fast enough for benchmark sizes (<= 128k rows).
    for i in range(seqlen_q):
        p = i + offset
        lo = 0 if left < 0 else max(0, p - left)
        hi = seqlen_k - 1 if right < 0 else min(seqlen_k - 1, p + right)
        total += max(0, hi - lo + 1)
    return total


def attention_flops(batch: int, num_heads: int, head_dim: int, pairs: int) -> float:
    """QK^T and PV: two matmuls, 2 FLOPs per multiply-add, over every allowed (query, key) pair."""
    return 4.0 * batch * num_heads * head_dim * pairs


def attention_bytes(batch: int, seqlen_q: int, seqlen_k: int, num_heads: int, num_kv_heads: int, head_dim: int,
                    elem: int) -> float:
    """Read q, k, v once, write o once (K/V per KV head: GQA never repeats them)."""
    return float(elem * head_dim * batch * (2 * seqlen_q * num_heads + 2 * seqlen_k * num_kv_heads))


# ------------------------------------------------------------------------------------------------ paged decode
def decode_attention_bytes(seq_lens: Sequence[int], num_heads: int, num_kv_heads: int, head_dim: int,
                           elem: int) -> float:
    """Every cached K and V element once, plus q in and o out. Block tables and lengths are noise and ignored."""
    tokens = sum(int(s) for s in seq_lens)
    kv = 2.0 * tokens * num_kv_heads * head_dim * elem
    qo = 2.0 * len(seq_lens) * num_heads * head_dim * elem
    return kv + qo


def decode_attention_flops(seq_lens: Sequence[int], num_heads: int, head_dim: int) -> float:
    return 4.0 * num_heads * head_dim * sum(int(s) for s in seq_lens)


def mla_attention_bytes(cached_tokens: int, query_rows: int, num_heads: int, kv_lora_rank: int, rope_dim: int,
                        elem: int) -> float:
    """MLA over a latent cache (llmkern.mla_decode_attention / mla_prefill_attention): every cached latent
    (kv_lora_rank) and RoPE key (rope_dim) once, shared by all heads, plus q_nope and q_pe in and o (kv_lora_rank)
    out per query row and head. Decode: cached_tokens = sum(seq_lens), query_rows = batch."""
    return float(elem * (cached_tokens * (kv_lora_rank + rope_dim) + query_rows * num_heads * (2 * kv_lora_rank
                                                                                               + rope_dim)))


def mla_attention_flops(pairs: int, num_heads: int, kv_lora_rank: int, rope_dim: int) -> float:
    """Absorbed MLA: per head and (query, key) pair, a score over kv_lora_rank + rope_dim and an output of
    kv_lora_rank, 2 FLOPs per multiply-add. Decode: pairs = sum(seq_lens)."""
    return 2.0 * num_heads * (2 * kv_lora_rank + rope_dim) * pairs


def paged_attention_bytes(seq_lens: Sequence[int], q_lens: Sequence[int], num_heads: int, num_kv_heads: int,
                          head_dim: int, elem: int) -> float:
    """A mixed paged step (PagedAttentionPlan.run): every cached K and V element of every sequence once, plus each
    new token's q in and o out."""
    kv = 2.0 * sum(int(s) for s in seq_lens) * num_kv_heads * head_dim * elem
    return kv + 2.0 * sum(int(n) for n in q_lens) * num_heads * head_dim * elem


def paged_attention_flops(seq_lens: Sequence[int], q_lens: Sequence[int], num_heads: int, head_dim: int) -> float:
    """Causal attention of each sequence's q_len newest tokens over its seq_len keys (bottom-right aligned)."""
    pairs = sum(attention_pairs(int(n), int(s), causal=True) for s, n in zip(seq_lens, q_lens))
    return attention_flops(1, num_heads, head_dim, pairs)


# ------------------------------------------------------------------------------------------------------ sampling
def sampling_bytes(batch: int, vocab: int, elem: int) -> float:
    """The logits read once and one int64 token written per row: the compulsory traffic of a sampler."""
    return float(batch * vocab * elem + batch * 8)


def speculative_bytes(batch: int, k: int, vocab: int, elem: int) -> float:
    """Chain speculative sampling's compulsory traffic: per row the two probability rows of the final draw (target
    and draft at the first rejection; the bonus row alone needs less) plus the k + 1 output tokens. The other rows
    are touched at one entry each (the draft token's probability)."""
    return float(batch * (2 * vocab * elem + (k + 1) * 8))


def beam_topk_bytes(batch: int, num_beams: int, vocab: int, elem: int) -> float:
    """Beam search's selection: every beam's logits read once (the k outputs are negligible)."""
    return float(batch * num_beams * vocab * elem)


def penalties_bytes(batch: int, vocab: int, history: int, elem: int) -> float:
    """Repetition controls: the logits read once, float32 logits written once, the int64 history read once."""
    return float(batch * (vocab * (elem + 4) + history * 8))


# ------------------------------------------------------------------------------------------------------- matmul
def matmul_flops(m: int, n: int, k: int) -> float:
    return 2.0 * m * n * k


def matmul_bytes(m: int, n: int, k: int, elem: int) -> float:
    """Dense x (m,k) @ w (k,n) -> (m,n), all in the same dtype."""
    return float(elem * (m * k + k * n + m * n))


def quant_weight_bytes(n: int, k: int, bits: int, group_size: int, *, scale_elem: int = 2,
                       zero_points: bool = True) -> float:
    """Packed weights, plus one scale (and zero point, stored at `bits` width) per group per output column."""
    groups = 1 if group_size in (-1, None) else k // group_size
    packed = n * k * bits / 8
    scales = n * groups * scale_elem
    zeros = n * groups * bits / 8 if zero_points else 0
    return packed + scales + zeros


def quant_matmul_bytes(m: int, n: int, k: int, bits: int, group_size: int, elem: int) -> float:
    return quant_weight_bytes(n, k, bits, group_size) + elem * (m * k + m * n)


# ------------------------------------------------------------------------------------------- norms and rotary
def rmsnorm_bytes(tokens: int, hidden: int, elem: int, *, residual: bool = False) -> float:
    """x in, y out, the weight once; with the fused residual add also the residual in and the new residual out."""
    per_token = 2 + (2 if residual else 0)
    return float(elem * (tokens * hidden * per_token + hidden))


def rope_bytes(tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, elem: int) -> float:
    """q and k read and written once; the cos/sin tables (fp32, half a head each) once per token."""
    qk = 2.0 * tokens * (num_heads + num_kv_heads) * head_dim * elem
    return qk + 2.0 * tokens * (head_dim // 2) * 4


# ------------------------------------------------------------------------------------------- mixture of experts
def moe_expected_experts(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected number of distinct experts a batch of `tokens` touches when each token picks top_k of num_experts
    uniformly: an expert is missed by one token with probability 1 - k/E, by all B independent tokens with
    probability (1 - k/E)^B, so E * (1 - (1 - k/E)^B) are hit."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def moe_flops(tokens: int, top_k: int, hidden: int, inter: int) -> float:
    """The experts' three projections (gate, up: hidden -> inter; down: inter -> hidden) for each (token, k) pair."""
    return 2.0 * tokens * top_k * 3 * hidden * inter


def moe_weight_bytes(experts: float, hidden: int, inter: int, elem: int = 2, *, bits: int | None = None,
                     group_size: int = 128) -> float:
    """The weights of `experts` experts (gate, up, down): dense `elem` bytes each, or packed `bits` with scales."""
    if bits is None:
        return experts * 3.0 * hidden * inter * elem
    return experts * (2 * quant_weight_bytes(inter, hidden, bits, group_size)
                      + quant_weight_bytes(hidden, inter, bits, group_size))


def moe_bytes(tokens: int, experts_hit: float, hidden: int, inter: int, elem: int, *, bits: int | None = None,
              group_size: int = 128) -> float:
    """An MoE layer's compulsory traffic: the weights of the experts hit, once, plus the hidden states in and out.
    Intermediates stay on chip in the ideal kernel, so this is a lower bound."""
    return moe_weight_bytes(experts_hit, hidden, inter, elem, bits=bits, group_size=group_size) \
        + 2.0 * tokens * hidden * elem
