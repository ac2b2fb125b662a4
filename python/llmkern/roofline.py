"""The roofline of a whole model step: how fast prefill and decode can possibly run on a device, and why.

    llmkern roofline --model llama-3-8b --device h100 --batch 16 --context 4096 [--bits 4] [--kv-dtype fp8]
                     [--plot PATH [--bench-json FILE]]          (the command: llmkern.cli; this module: the model)

The model of one step (functions below, shared with the end-to-end benchmark):
  * FLOPs: 2 per multiply-add of every linear layer for every token processed, plus attention's QK^T and PV
    (llmkern.perf.attention_flops) over the (query, key) pairs the causal (and sliding-window) mask allows; the LM
    head runs for one token per sequence (generation needs only the last logits). Norms, RoPE, activations, softmax
    are ignored (well under 1% of the FLOPs).
  * Bytes: the compulsory HBM traffic: every weight read once per step (the embedding table only for the rows
    looked up), the KV cache read once (decode) and the new K/V written once. Activations are assumed to stay
    on chip, so this is a lower bound on traffic.
  * Time: llmkern.perf.roofline: max(FLOPs / peak tensor FLOP/s, bytes / peak bandwidth), and the roof that binds.

MLA (DeepSeek-V3): the cache is one kv_lora_rank latent plus one qk_rope_head_dim RoPE key per token and layer.
Decode runs the absorbed form (llmkern.mla_decode_attention: every head attends to the latent itself, a pair costs
2 x (2 x kv_lora_rank + qk_rope_head_dim) FLOPs per head); prefill decompresses K and V per head (head dims
qk_nope + qk_rope and v_head_dim), as DeepSeek's inference code does. The linear FLOPs are the same either way:
absorbing kv_b into the query and the output moves its multiply-adds from the keys to the queries, token for token.

Decode with a small batch reads every weight to do 2 FLOPs per weight per sequence: intensity ~ batch FLOP/byte in
bf16, far below the ridge (~295 FLOP/byte on an H100), so it is memory-bound; prefill of thousands of tokens is
compute-bound.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from llmkern import perf
from llmkern.models import ModelShape

BF16_BYTES = 2        # weights, activations and the KV cache are bf16 unless quantized
# Bytes per element of the KV cache by its dtype (--kv-dtype): an fp8 cache (llmkern.PagedKVCache with
# float8_e4m3fn / e5m2) halves the bill; its float32 scales, one per layer and KV head, are a few hundred bytes.
KV_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1}
DEFAULT_GROUP = 128   # group size of weight-only int4/int8 quantization (GPTQ/AWQ's common default)

# --------------------------------------------------------------------------------------------------- weights
def _linear_bytes(shapes, bits: int | None, group_size: int, elem: int = BF16_BYTES) -> float:
    """Dense weights of `elem` bytes each, or packed `bits`-bit codes with `elem`-byte scales."""
    if bits is None or bits >= 16:
        return float(sum(n * k for n, k in shapes) * elem)
    return float(sum(perf.quant_weight_bytes(n, k, bits, group_size, scale_elem=elem) for n, k in shapes))


def linear_weight_bytes(model: ModelShape, bits: int | None = None, group_size: int = DEFAULT_GROUP,
                        experts: float | None = None, elem: int = BF16_BYTES) -> float:
    """Bytes of every decoder layer's linear weights: `elem` bytes each (bf16 by default), or packed `bits`-bit
    with scales (of `elem` bytes) and zero points. A MoE model's experts count `experts` times per layer
    (default: all of them, the weights as stored)."""
    n = (model.num_experts if experts is None else experts) + model.shared_experts
    dense_layers = model.layers - model.moe_layers
    return float(model.layers * _linear_bytes(model.attn_linear_shapes(), bits, group_size, elem)
                 + dense_layers * _linear_bytes(model.dense_mlp_shapes(), bits, group_size, elem)
                 + model.moe_layers * n * _linear_bytes(model.expert_linear_shapes(), bits, group_size, elem))


def _other_weight_bytes(model: ModelShape, elem: int = BF16_BYTES) -> float:
    """Norms, q/k/v biases and MoE routers, all layers, plus the final norm (never quantized)."""
    bias = (model.heads + 2 * model.kv_heads) * model.head_dim if model.qkv_bias else 0
    per_layer = model._norm_params() + bias
    return float(elem * (model.layers * per_layer + model.moe_layers * model.router_params() + model.hidden))


def weight_bytes(model: ModelShape, bits: int | None = None, group_size: int = DEFAULT_GROUP) -> float:
    """All weights as stored. Weight-only quantization packs the decoder's linear layers (a MoE model's experts
    too); the embedding, the LM head and the routers stay bf16 (what GPTQ/AWQ checkpoints and
    llmkern.quantize_model do)."""
    emb = (model.embedding_params() + model.lm_head_params()) * BF16_BYTES
    return linear_weight_bytes(model, bits, group_size) + _other_weight_bytes(model) + emb


def experts_touched(model: ModelShape, tokens: int) -> float:
    """Experts of one layer a step over `tokens` tokens reads, expected under uniform routing
    (llmkern.perf.moe_expected_experts: E * (1 - (1 - k/E)^tokens)); 1 for a dense model's MLP."""
    if not model.is_moe:
        return 1.0
    return perf.moe_expected_experts(model.num_experts, model.experts_per_token, tokens)


def step_weight_bytes(model: ModelShape, tokens: int, bits: int | None = None,
                      group_size: int = DEFAULT_GROUP, elem: int = BF16_BYTES) -> float:
    """Weight bytes one forward step must read: everything but the embedding table, of which only the `tokens`
    rows looked up (the whole table when it is tied, being the LM head too); of a MoE model's experts, those the
    `tokens` tokens are expected to touch (experts_touched). `elem`: bytes per unquantized weight (4 for a
    float32 model)."""
    lm_head = model.vocab * model.hidden * elem
    emb_rows = 0 if model.tied_embeddings else min(tokens, model.vocab) * model.hidden * elem
    return (linear_weight_bytes(model, bits, group_size, experts_touched(model, tokens), elem)
            + _other_weight_bytes(model, elem) + lm_head + emb_rows)


# -------------------------------------------------------------------------------------------------- KV cache
def kv_bytes_per_token(model: ModelShape, elem: int = BF16_BYTES) -> float:
    """K and V of every layer for one token; MLA: the latent and the RoPE key (DeepSeek-V3: (512 + 64) x 2 bytes x
    61 layers = 70,272 bytes)."""
    if model.is_mla:
        return float(model.layers * (model.kv_lora_rank + model.qk_rope_head_dim) * elem)
    return float(2 * model.layers * model.kv_heads * model.head_dim * elem)


def mha_kv_bytes_per_token(model: ModelShape, elem: int = BF16_BYTES) -> float:
    """What an MLA model's cache would hold per token with its K and V decompressed per head (keys of head_dim, values
    of v_head_dim): the bill MLA avoids."""
    return float(model.layers * model.heads * (model.head_dim + model.v_head_dim) * elem)


def _kv_tokens(model: ModelShape, context: int) -> float:
    """Cached tokens summed over layers / layers: sliding-window layers keep only the last `window` tokens."""
    if model.sliding_window is None or model.sliding_layers == 0:
        return float(context)
    windowed = min(context, model.sliding_window)
    return (model.sliding_layers * windowed + (model.layers - model.sliding_layers) * context) / model.layers


def kv_cache_bytes(model: ModelShape, batch: int, context: int, elem: int = BF16_BYTES) -> float:
    """The KV cache of `batch` sequences of `context` tokens."""
    return batch * _kv_tokens(model, context) * kv_bytes_per_token(model, elem)


# ----------------------------------------------------------------------------------------------------- steps
@dataclass(frozen=True)
class StepCost:
    kind: str            # "prefill" or "decode"
    tokens: int          # tokens processed (prefill: batch x context; decode: batch)
    flops: float
    bytes: float
    linear_flops: float
    attention_flops: float
    weight_bytes: float
    kv_bytes: float

    @property
    def intensity(self) -> float:
        """FLOPs per byte of compulsory traffic."""
        return self.flops / self.bytes


def _causal_pairs(seqlen: int, window: int | None) -> float:
    """(query, key) pairs of one causal sequence, closed form; a window of w keys includes the query itself
    (FlashAttention's window (w - 1, 0), Hugging Face's sliding_window=w)."""
    full = seqlen * (seqlen + 1) / 2
    if window is None or window >= seqlen:
        return full
    # Query i sees min(i + 1, window) keys: the first `window` queries as in full causal, the rest `window` each.
    return window * (window + 1) / 2 + (seqlen - window) * window


def _attention_flops_per_pair(model: ModelShape, *, absorbed: bool = False) -> float:
    """QK^T and PV FLOPs of one (query, key) pair in one layer, all heads. MLA: absorbed (decode) over the latent,
    or decompressed (prefill) with keys of head_dim and values of v_head_dim."""
    if not model.is_mla:
        return perf.attention_flops(1, model.heads, model.head_dim, 1)
    if absorbed:
        return 2.0 * model.heads * (2 * model.kv_lora_rank + model.qk_rope_head_dim)
    return 2.0 * model.heads * (model.head_dim + model.v_head_dim)


def _attention_flops_per_layer_avg(model: ModelShape, pairs_full: float, pairs_windowed: float, *,
                                   absorbed: bool = False) -> float:
    """Attention FLOPs summed over all layers, sliding layers using their windowed pair count."""
    per_pair = _attention_flops_per_pair(model, absorbed=absorbed)
    slid = model.sliding_layers if model.sliding_window is not None else 0
    return per_pair * (slid * pairs_windowed + (model.layers - slid) * pairs_full)


def linear_flops(model: ModelShape, tokens: int, lm_head_tokens: int) -> float:
    """Every linear layer a token passes (a MoE model: its experts_per_token experts and the router), per token."""
    dense_layers = model.layers - model.moe_layers
    per_token = (model.layers * sum(n * k for n, k in model.attn_linear_shapes())
                 + dense_layers * model.dense_mlp_params() + model.moe_layers * model.active_mlp_params())
    return 2.0 * (per_token * tokens + model.vocab * model.hidden * lm_head_tokens)


def prefill_step(model: ModelShape, batch: int, context: int, bits: int | None = None,
                 group_size: int = DEFAULT_GROUP, kv_elem: int = BF16_BYTES,
                 weight_elem: int = BF16_BYTES) -> StepCost:
    """One forward over `batch` prompts of `context` tokens each (causal), writing their K/V into the cache
    (kv_elem bytes per element: KV_DTYPE_BYTES; weight_elem bytes per unquantized weight)."""
    tokens = batch * context
    lin = linear_flops(model, tokens, lm_head_tokens=batch)
    attn = batch * _attention_flops_per_layer_avg(model, _causal_pairs(context, None),
                                                  _causal_pairs(context, model.sliding_window))
    w = step_weight_bytes(model, tokens, bits, group_size, weight_elem)
    kv = kv_cache_bytes(model, batch, context, kv_elem)  # written once
    return StepCost("prefill", tokens, lin + attn, w + kv, lin, attn, w, kv)


def decode_step(model: ModelShape, batch: int, context: int, bits: int | None = None,
                group_size: int = DEFAULT_GROUP, kv_elem: int = BF16_BYTES,
                weight_elem: int = BF16_BYTES) -> StepCost:
    """One new token for each of `batch` sequences whose cache holds `context` tokens (the new one included),
    kv_elem bytes per cache element, weight_elem bytes per unquantized weight."""
    lin = linear_flops(model, batch, lm_head_tokens=batch)
    window = model.sliding_window if model.sliding_window is not None else None
    windowed = min(context, window) if window is not None else context
    attn = batch * _attention_flops_per_layer_avg(model, context, windowed, absorbed=True)
    w = step_weight_bytes(model, batch, bits, group_size, weight_elem)
    # read the cache, write the new token's K/V
    kv = kv_cache_bytes(model, batch, context, kv_elem) + batch * kv_bytes_per_token(model, kv_elem)
    return StepCost("decode", batch, lin + attn, w + kv, lin, attn, w, kv)


def bound(step: StepCost, peak: perf.DevicePeak) -> dict[str, Any]:
    """Lowest time for the step on the device, which resource binds, and the tokens/s that time allows."""
    roof = perf.roofline(step.flops, step.bytes, peak)
    return {"time_s": roof.time_s, "compute_s": roof.compute_s, "memory_s": roof.memory_s, "bound": roof.bound,
            "tokens_per_s": step.tokens / roof.time_s, "ridge": ridge_point(peak)}


def ridge_point(peak: perf.DevicePeak, *, tensor_cores: bool = True) -> float:
    """The arithmetic intensity (FLOP/byte) where the compute and memory roofs meet."""
    tflops = peak.tensor_tflops if tensor_cores else peak.fp32_tflops
    return tflops * 1e12 / (peak.hbm_gbps * 1e9)


# ---------------------------------------------------------------------------------------------------- report
def _fmt_bytes(b: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{b:.0f} B"


def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} us"


def report(model: ModelShape, peak: perf.DevicePeak, batch: int, context: int, bits: int | None = None,
           group_size: int = DEFAULT_GROUP, kv_dtype: str = "bf16") -> str:
    """The text `llmkern roofline` prints. kv_dtype: a key of KV_DTYPE_BYTES."""
    wq = f"int{bits} (group {group_size}) linear layers, bf16 embeddings/LM head" if bits else "bf16"
    wbytes = weight_bytes(model, bits, group_size)
    kv_elem = KV_DTYPE_BYTES[kv_dtype]
    per_token, total = kv_bytes_per_token(model, kv_elem), kv_cache_bytes(model, batch, context, kv_elem)
    lines = [
        f"{model.name} on {peak.name}: batch {batch}, context {context}, weights {wq}, KV cache {kv_dtype}",
        f"  model: {model.param_count() / 1e9:.2f} B parameters"
        + (f", {model.active_param_count() / 1e9:.2f} B active per token" if model.is_moe else "")
        + f" ({model.source})",
        f"  device: {peak.hbm_gbps:.4g} GB/s, {peak.tensor_tflops:.4g} dense matmul TFLOP/s, ridge point "
        f"{ridge_point(peak):.0f} FLOP/byte ({peak.source})",
        f"  weight bytes:            {wbytes:.4g} ({_fmt_bytes(wbytes)})",
        f"  KV cache per token:      {per_token:.4g} ({_fmt_bytes(per_token)}, {kv_dtype}"
        + (f"; MLA latent {model.kv_lora_rank} + rope {model.qk_rope_head_dim} per layer: "
           f"{mha_kv_bytes_per_token(model, kv_elem) / per_token:.0f}x less than per-head K and V, "
           f"{_fmt_bytes(mha_kv_bytes_per_token(model, kv_elem))})" if model.is_mla else ")"),
        f"  KV cache total:          {total:.4g} ({_fmt_bytes(total)}: {batch} x {context} tokens)",
        "",
        f"  {'step':<8} {'tokens':>8} {'FLOPs':>11} {'bytes':>11} {'FLOP/byte':>10} {'bound':>8} "
        f"{'lowest time':>12} {'tokens/s':>12}",
    ]
    for step in (prefill_step(model, batch, context, bits, group_size, kv_elem),
                 decode_step(model, batch, context, bits, group_size, kv_elem)):
        b = bound(step, peak)
        lines.append(f"  {step.kind:<8} {step.tokens:>8} {step.flops:>11.4g} {step.bytes:>11.4g} "
                     f"{step.intensity:>10.1f} {b['bound']:>8} {_fmt_time(b['time_s']):>12} "
                     f"{b['tokens_per_s']:>12,.0f}")
    lines.append("")
    lines.append("  prefill: one forward of batch x context prompt tokens; decode: one token per sequence over a "
                 "cache of `context` tokens. Bytes are compulsory HBM traffic (weights once, KV cache), a lower bound.")
    if model.is_moe:
        lines += ["", *moe_report(model, peak, batch, context, bits, group_size)]
    return "\n".join(lines)


MOE_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def moe_report(model: ModelShape, peak: perf.DevicePeak, batch: int, context: int, bits: int | None = None,
               group_size: int = DEFAULT_GROUP) -> list[str]:
    """The MoE bill: parameters active per token against the total, and the weight bytes a decode step reads as the
    batch grows (each token's FLOPs do not grow; the experts touched, and so the bytes, do)."""
    total, active = model.param_count(), model.active_param_count()
    e, k = model.num_experts, model.experts_per_token
    stored = weight_bytes(model, bits, group_size)
    lines = [
        f"  MoE: {e} experts per layer, {k} per token: {active / 1e9:.2f} B parameters active per token, "
        f"{100 * active / total:.1f}% of the {total / 1e9:.2f} B that must all sit in memory.",
        f"  Decode weight reads by batch (context {context}): experts touched per layer E * (1 - (1 - k/E)^batch) "
        "under uniform routing.",
        f"  {'batch':>7} {'experts/layer':>14} {'weight bytes':>13} {'stored':>7} {'per token':>11} "
        f"{'FLOPs/token':>12} {'lowest time':>12} {'tokens/s':>12}",
    ]
    for b in sorted(set(MOE_BATCHES) | {batch}):
        step = decode_step(model, b, context, bits, group_size)
        t = bound(step, peak)
        mark = "  <- --batch" if b == batch else ""
        lines.append(f"  {b:>7} {experts_touched(model, b):>14.2f} {_fmt_bytes(step.weight_bytes):>13} "
                     f"{100 * step.weight_bytes / stored:>6.1f}% {_fmt_bytes(step.weight_bytes / b):>11} "
                     f"{step.flops / b:>12.4g} {_fmt_time(t['time_s']):>12} {t['tokens_per_s']:>12,.0f}{mark}")
    lines.append("  FLOPs per token stay at the active parameters' (plus attention); the bytes a step reads climb "
                 "from the active weights to all of them as the batch grows: MoE saves compute, not memory.")
    return lines


# ------------------------------------------------------------------------------------------------------ plot
def plot(path: str, peak: perf.DevicePeak, steps: Sequence[tuple[str, StepCost]] = (),
         records: Sequence[dict] = ()) -> int:
    """Draw the device's roofline (log-log: FLOP/byte vs TFLOP/s) with the model steps at their bound and each
    benchmark record at its measured throughput. Returns how many records were placed (records with no FLOPs
    have no place on a log axis and are skipped)."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only; no display needed
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from e

    points = []
    for r in records:
        flops, nbytes, ms = float(r.get("flops") or 0), float(r.get("bytes") or 0), float(r.get("median_ms") or 0)
        if flops > 0 and nbytes > 0 and ms > 0:
            label = f"{r.get('op', '?')}/{r.get('impl', '?')}"
            points.append((flops / nbytes, flops / (ms * 1e-3) / 1e12, label))
    xs = [p[0] for p in points] + [s.intensity for _, s in steps] + [ridge_point(peak)]
    lo, hi = min(xs + [0.1]) / 4, max(xs + [1e4]) * 4

    fig, ax = plt.subplots(figsize=(8, 5.5))
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    for tflops, style, name in ((peak.tensor_tflops, "-", "bf16 tensor"), (peak.fp32_tflops, "--", "fp32")):
        ax.plot(grid, [min(tflops, x * peak.hbm_gbps / 1e3) for x in grid], style, color="black", lw=1.2,
                label=f"{name} roof ({tflops:g} TFLOP/s, {peak.hbm_gbps:g} GB/s)")
    for name, s in steps:
        at = min(peak.tensor_tflops, s.intensity * peak.hbm_gbps / 1e3)
        ax.plot([s.intensity], [at], marker="*", markersize=14, linestyle="none", label=f"{name} (bound)")
    for x, y, label in points:
        ax.plot([x], [y], marker="o", linestyle="none", alpha=0.8, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte of HBM traffic)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(f"Roofline: {peak.name}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return len(points)
