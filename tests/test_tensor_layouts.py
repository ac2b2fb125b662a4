"""Every tensor argument of every public op and every llmkern:: op, in every memory layout (issue 16, kind 1).

Each tensor argument is passed, one at a time, as
  every_other   every other element of a larger tensor, in every dim (a strided last dim included),
  rows          every other row (dim 0) of a larger tensor, the other dims contiguous (tensors of 2+ dims),
  offset        a view at a storage offset of 3 elements (no longer 16-byte aligned),
  column_major  the same values with the dims laid out in reverse order (`bt.t().contiguous().t()`; 2+ dims),
  expanded      dim 0 (or the first dim longer than 1) broadcast from its first slice, stride 0, where meaningful,
and the call must give exactly what the same call on contiguous tensors gives (for `expanded`: on the expanded
values made contiguous), or raise the ValueError naming that argument that is declared below (REFUSED). The gaps of
the larger tensors hold values out of every valid range (NaN, 2**30, 2**40), which a kernel that ignored the strides
would read: a wrong answer or an out-of-bounds access. After the call the gaps must be unchanged (no write outside
the caller's view), and every argument must hold what it holds after the contiguous call (in-place ops).

The public ops are found, not listed: every name exported by llmkern whose signature takes a torch.Tensor (for a
class, its __init__ and its own methods). `test_every_public_op_has_a_case` fails for one without a case in CASES,
so an op added later (MoE, decoding) must add one. The llmkern:: ops run through the same variants directly, with the
schema arguments of tests/test_ops.py's CASES (an op added there is covered here too).

What was found and done, per op and argument ("strides": the kernel takes the argument's strides and honours them;
"contiguous": `_dispatch.custom_op(contiguous=...)` copies it to contiguous (a no-op when it is) before the op's check
and before every implementation, so what is validated is exactly what the kernel reads; "last dim": strides passed
except a strided last dim, which is copied first; "torch": read by torch operations on the host only):
  attention q, k, v: strides, last dim
  attention alibi_slopes, sinks: contiguous (one value per query head, read with unit stride)
  attention_varlen q, k, v: strides, last dim
  attention_varlen cu_seqlens_q, cu_seqlens_k: contiguous (the kernel reads them with unit stride)
  attention_varlen alibi_slopes, sinks: contiguous
  paged_kv_write k, v: strides (all four dims)
  paged_kv_write k_cache, v_cache: strides (all four dims); written in place, so an expanded (stride-0) or
    self-overlapping cache is refused (ValueError, the op's check)
  paged_kv_write slot_mapping: contiguous
  paged_decode_attention q, k_cache, v_cache: strides (all dims)
  paged_decode_attention block_tables: strides (both dims; stride(1) != 1 included)
  paged_decode_attention seq_lens: contiguous
  paged_prefill_attention q, k_cache, v_cache: strides (all dims)
  paged_prefill_attention block_tables: strides (both dims)
  paged_prefill_attention cu_seqlens_q, seq_lens: contiguous
  mla_kv_write ckv, kpe: strides, last dim
  mla_kv_write ckv_cache, kpe_cache: strides (all three dims); written in place, so an expanded or self-overlapping
    cache is refused (ValueError, the op's check)
  mla_kv_write slot_mapping: contiguous
  mla_decode_attention q_nope, q_pe, ckv_cache, kpe_cache: strides, last dim
  mla_decode_attention block_tables: strides (both dims)
  mla_decode_attention seq_lens: contiguous
  mla_prefill_attention q_nope, q_pe, ckv_cache, kpe_cache: strides, last dim
  mla_prefill_attention block_tables: strides (both dims)
  mla_prefill_attention cu_seqlens_q, seq_lens: contiguous
  paged_decode_attention k_scale, v_scale, alibi_slopes, sinks: contiguous (one value per KV head / query head,
    read with unit stride; the [fp8] cases: an e5m2 cache)
  paged_prefill_attention k_scale, v_scale, alibi_slopes, sinks: contiguous
  PagedAttentionPlan.run k_scale, v_scale, alibi_slopes, sinks: contiguous
  PagedKVCache k_scale, v_scale: torch (broadcast into the cache's own (num_layers, num_kv_heads) float32 tensors)
  PagedAttentionPlan block_tables, seq_lens, cu_seqlens_q: torch (read on the host at plan time, copied into the
    plan's own buffers)
  PagedAttentionPlan.update block_tables, seq_lens, cu_seqlens_q: torch
  PagedAttentionPlan.run q, k_cache, v_cache: strides (all dims)
  PagedAttentionPlan.run out: strides; written in place, so an expanded out is refused (ValueError)
  rms_norm x: row stride, last dim (leading dims flattened by reshape, a copy only when no view exists)
  rms_norm weight: contiguous (the kernel reads it with unit stride)
  add_rms_norm x, residual: row stride, last dim
  add_rms_norm weight: contiguous
  apply_rope q, k: strides, last dim; inplace=True writes through the strides and refuses a strided last dim or
    an expanded q/k (ValueError, the op's check)
  apply_rope positions: strides (both dims, 0 for a broadcast batch)
  apply_rope cos, sin: strides, last dim
  sample logits: row stride, last dim (in the op)
  sample temperature, top_k, top_p, min_p, seed: contiguous (read one element per row)
  sampling_probs logits: row stride, last dim (in the op)
  sampling_probs temperature, top_k, top_p, min_p: contiguous
  quant_matmul x: strides, last dim
  quant_matmul bias: contiguous
  QuantizedWeight qweight, scales, zeros, perm: contiguous (the constructor, and the op's declaration); an expanded
    perm repeats one index, not a permutation: refused (ValueError)
  QuantizedWeight.from_codes q, zeros, scales, g_idx: torch (packed into new contiguous tensors)
  QuantizedWeight.from_gptq qweight, qzeros, scales, g_idx: torch
  QuantizedWeight.from_awq qweight, qzeros, scales: torch
  quantize_weight weight: torch
  QuantLinear.from_quantized bias: torch (copied into the module's parameter)
  QuantLinear.forward x: as quant_matmul x
  speculative_sample draft_probs, target_probs: strides (batch and draft dims), last dim (in the op)
  speculative_sample draft_token_ids: strides
  speculative_sample seed: contiguous
  beam_topk logits: row stride (0: one row for every beam), last dim (in the op)
  beam_topk beam_scores: contiguous (a float32 copy in the public function; declared by the op)
  apply_penalties logits: row stride, last dim (in the op)
  apply_penalties token_ids: strides
  apply_penalties repetition_penalty, presence_penalty, frequency_penalty: contiguous
  apply_penalties logit_bias: row stride (0: one row for every sequence), last dim (in the op)
  moe_topk router_logits: strides (both dims)
  moe_topk correction_bias: contiguous (copied by the Triton implementation; torch in the reference)
  fused_moe hidden_states: row stride, last dim
  fused_moe w13, w2: strides (all three dims: a transposed view is read in place)
  fused_moe topk_weights, topk_ids: strides
  QuantizedExperts qweight, scales, zeros, perm: contiguous (the constructor)
  quantize_experts w: torch
  beam_search input_ids, attention_mask: torch (as generate)
  generate input_ids, attention_mask: torch (split into per-prompt token lists before any kernel)
`test_docstring_lists_every_argument` keeps this list equal to the arguments the harness exercises.
"""
from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
from torch import nn

import llmkern
from llmkern import _dispatch
from llmkern.beam_search import BeamSearchOutput
from test_ops import CASES as OP_CASES

# On CPU: the Triton interpreter, and the C++ backend for the cases it serves (tests/conftest.py: runs_cpp).
pytestmark = pytest.mark.cpu_backends("interpreter", "cpp", cpp_case_params=("label", "name"))
VARIANTS = ("every_other", "rows", "offset", "column_major", "expanded")
# Gap contents: out of every valid range (a NaN weight, a 2**30 block id or length, a 2**40 slot or seed).
GARBAGE = {torch.int16: 2 ** 14, torch.int32: 2 ** 30, torch.int64: 2 ** 40}


# ------------------------------------------------------------------------------------------------- the cases
@dataclass
class Case:
    """fn(**args); `refused`: {(arg, variant): why} for the layouts the op refuses with a ValueError naming arg;
    `skip`: {(arg, variant): why} for layouts that are not meaningful (never a refusal that could hide a bug);
    `variants`: fewer layouts for a composite op whose tensors only torch reads (said where it is used)."""
    fn: Callable
    args: dict[str, Any]
    refused: dict[tuple[str, str], str] = field(default_factory=dict)
    skip: dict[tuple[str, str], str] = field(default_factory=dict)
    variants: tuple[str, ...] = VARIANTS


def _randn(*shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def _ints(values, dtype, device):
    return torch.tensor(values, dtype=dtype, device=device)


def _cache(device, seed=0):
    """A paged cache of 5 blocks of 4 tokens, one KV head of 32."""
    return _randn(5, 4, 1, 32, device=device, seed=seed)


def _paged(device):
    return dict(k_cache=_cache(device, 1), v_cache=_cache(device, 2),
                block_tables=_ints([[0, 1, 4], [3, 2, 0]], torch.int32, device),
                seq_lens=_ints([9, 6], torch.int32, device))


def _mla_caches(device):
    """An MLA latent cache of 3 blocks of 4 tokens: kv_lora_rank 256, rope_dim 32 (the smallest supported)."""
    return dict(ckv_cache=_randn(3, 4, 256, device=device, seed=1), kpe_cache=_randn(3, 4, 32, device=device, seed=2))


def _mla_tables(device):
    return dict(block_tables=_ints([[2, 0], [1, 0]], torch.int32, device), seq_lens=_ints([7, 3], torch.int32, device))


E5M2 = torch.float8_e5m2   # the fp8 cases' cache: e5m2 builds on every GPU


def _paged_fp8(device):
    """_paged's cache in e5m2 with its K and V scales (one KV head: a (1,) tensor each)."""
    p = _paged(device)
    return dict(p, k_cache=p["k_cache"].to(E5M2), v_cache=p["v_cache"].to(E5M2),
                k_scale=_ints([0.5], torch.float32, device), v_scale=_ints([2.0], torch.float32, device))


def _cache_scales(cache) -> list[torch.Tensor]:
    """What a PagedKVCache made from scale tensors holds: every layer's K and V scales."""
    return [s for layer in range(2) for s in (cache.k_scale(layer), cache.v_scale(layer))]


def _head_params(device):
    """ALiBi slopes and sinks of two query heads that differ, so that reading a view's gap (NaN) or one head's value
    for the other changes the output."""
    return dict(alibi_slopes=_ints([0.5, 0.125], torch.float32, device), sinks=_ints([1.5, -0.5], torch.float32, device))


_WRITTEN_CACHE = "a cache written in place must not overlap itself"
# quant_matmul with 17 rows runs the GEMM kernel: the decode kernels' split-K sums partials with atomics, whose order
# (and so the last bit) is not deterministic on a GPU. Their strides are covered by tests/test_quant.py.
_GEMM_ROWS = 17


def _sampling_params(device):
    """Per-row parameters; row 1, the row that would read a view's gap with unit stride, has every filter on and
    cutting (top-k 4 of 8 tokens, then top-p and min-p), so a gap's value (NaN, 2**30) changes its output."""
    return dict(temperature=_ints([0.8, 1.5], torch.float32, device), top_k=_ints([0, 4], torch.int32, device),
                top_p=_ints([1.0, 0.8], torch.float32, device), min_p=_ints([0.0, 0.1], torch.float32, device))


def _quantized(device, dtype=torch.float16, act_order=False):
    gen = torch.Generator().manual_seed(5)
    q = torch.randint(0, 16, (24, 64), generator=gen, dtype=torch.int32)
    z = torch.randint(0, 16, (2, 24), generator=gen, dtype=torch.int32)
    s = (torch.rand(2, 24, generator=gen) * 0.02 + 0.002).to(dtype)
    g_idx = None
    if act_order:
        g_idx = torch.empty(64, dtype=torch.int32)
        g_idx[torch.randperm(64, generator=gen)] = (torch.arange(64) // 32).to(torch.int32)
    qw = llmkern.QuantizedWeight.from_codes(q, z, s, bits=4, group_size=32, g_idx=g_idx)
    return qw.to(device), (q, z, s, g_idx)


@functools.lru_cache(maxsize=None)
def _generate_model(device: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, head_dim=32, vocab_size=64, max_position_embeddings=64,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(cfg).eval().to(device)


def _plan(block_tables, seq_lens, cu_seqlens_q, *update, kv_dtype=None):
    """A plan over _paged's cache (5 blocks of 4 tokens, one KV head of 32, two query heads), updated with `update`'s
    tables when given."""
    plan = llmkern.PagedAttentionPlan(block_tables, seq_lens, cu_seqlens_q, num_heads=2, num_kv_heads=1, head_dim=32,
                                      num_blocks=5, block_size=4, dtype=torch.float32, kv_dtype=kv_dtype,
                                      max_batch_size=2, max_num_tokens=5, max_blocks_per_seq=3)
    if update:
        plan.update(*update)
    return plan


def _plan_run(plan, device):
    """The plan's run on _paged's cache, for as many query rows as the plan has tokens."""
    paged = _paged(device)
    return plan.run(_randn(5, 2, 32, device=device, seed=3)[:plan.num_tokens], paged["k_cache"], paged["v_cache"])


def _moe_weights(device):
    """Dense fp16 experts: w13 (4 experts, 2 x 32 gate/up rows, hidden 64), w2 (4, 64, 32)."""
    return dict(w13=_randn(4, 64, 64, dtype=torch.float16, device=device, seed=11) / 8,
                w2=_randn(4, 64, 32, dtype=torch.float16, device=device, seed=12) / 6)


def _routing(device):
    """Top-2 of 4 experts for 6 tokens: topk_weights fp32 and topk_ids int32."""
    w, ids = llmkern.moe_topk(_randn(6, 4, device=device, seed=14), 2)
    return dict(topk_weights=w, topk_ids=ids)


def _cases(device) -> dict[str, Case]:
    f16 = torch.float16
    paged = _paged(device)
    qw, (codes, zeros, scales, g_idx) = _quantized(device, act_order=True)
    qexperts = llmkern.quantize_experts(_moe_weights("cpu")["w2"], bits=4, group_size=32).to(device)
    gen = torch.Generator().manual_seed(15)
    expert_perm = torch.stack([torch.randperm(32, generator=gen) for _ in range(4)]).to(torch.int32).to(device)
    gptq_qw, _ = _quantized("cpu")
    ql = llmkern.QuantLinear.from_quantized(qw)
    cases = {
        "attention": Case(
            lambda q, k, v, alibi_slopes, sinks: llmkern.attention(q, k, v, causal=True, alibi_slopes=alibi_slopes,
                                                                   sinks=sinks),
            dict(q=_randn(2, 5, 2, 32, dtype=f16, device=device),
                 k=_randn(2, 6, 1, 32, dtype=f16, device=device, seed=1),
                 v=_randn(2, 6, 1, 32, dtype=f16, device=device, seed=2), **_head_params(device))),
        "attention_varlen": Case(
            lambda q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, sinks: llmkern.attention_varlen(
                q, k, v, cu_seqlens_q, cu_seqlens_k, 4, 5, causal=True, alibi_slopes=alibi_slopes, sinks=sinks),
            dict(q=_randn(7, 2, 32, device=device), k=_randn(9, 1, 32, device=device, seed=1),
                 v=_randn(9, 1, 32, device=device, seed=2), cu_seqlens_q=_ints([0, 3, 7], torch.int32, device),
                 cu_seqlens_k=_ints([0, 4, 9], torch.int32, device), **_head_params(device))),
        "paged_kv_write": Case(
            llmkern.paged_kv_write,
            dict(k=_randn(3, 1, 32, device=device, seed=3), v=_randn(3, 1, 32, device=device, seed=4),
                 k_cache=_cache(device, 1), v_cache=_cache(device, 2),
                 slot_mapping=_ints([5, -1, 9], torch.int64, device)),
            refused={("k_cache", "expanded"): _WRITTEN_CACHE, ("v_cache", "expanded"): _WRITTEN_CACHE},
            skip={("slot_mapping", "expanded"): "one slot for every token: which token lands there is unspecified"}),
        "paged_decode_attention": Case(
            lambda q, k_cache, v_cache, block_tables, seq_lens: llmkern.paged_decode_attention(
                q, k_cache, v_cache, block_tables, seq_lens, num_splits=2),
            dict(q=_randn(2, 2, 32, device=device, seed=3), **_paged(device))),
        "paged_prefill_attention": Case(
            llmkern.paged_prefill_attention,
            dict(q=_randn(5, 2, 32, device=device, seed=3), **_paged(device),
                 cu_seqlens_q=_ints([0, 2, 5], torch.int32, device)),
            refused={("cu_seqlens_q", "expanded"): "[0, 0, 0] does not end at total_q: a bad value, refused"}),
        "mla_kv_write": Case(
            llmkern.mla_kv_write,
            dict(ckv=_randn(3, 256, device=device, seed=3), kpe=_randn(3, 32, device=device, seed=4),
                 **_mla_caches(device), slot_mapping=_ints([5, -1, 9], torch.int64, device)),
            refused={("ckv_cache", "expanded"): _WRITTEN_CACHE, ("kpe_cache", "expanded"): _WRITTEN_CACHE},
            skip={("slot_mapping", "expanded"): "one slot for every token: which token lands there is unspecified"}),
        "mla_decode_attention": Case(
            lambda q_nope, q_pe, ckv_cache, kpe_cache, block_tables, seq_lens: llmkern.mla_decode_attention(
                q_nope, q_pe, ckv_cache, kpe_cache, block_tables, seq_lens, scale=0.1, num_splits=2),
            dict(q_nope=_randn(2, 2, 256, device=device, seed=3), q_pe=_randn(2, 2, 32, device=device, seed=4),
                 **_mla_caches(device), **_mla_tables(device))),
        "mla_prefill_attention": Case(
            lambda q_nope, q_pe, ckv_cache, kpe_cache, block_tables, cu_seqlens_q, seq_lens:
                llmkern.mla_prefill_attention(q_nope, q_pe, ckv_cache, kpe_cache, block_tables, cu_seqlens_q,
                                              seq_lens, scale=0.1),
            dict(q_nope=_randn(5, 2, 256, device=device, seed=3), q_pe=_randn(5, 2, 32, device=device, seed=4),
                 **_mla_caches(device), **_mla_tables(device), cu_seqlens_q=_ints([0, 2, 5], torch.int32, device)),
            refused={("cu_seqlens_q", "expanded"): "[0, 0, 0] does not end at total_q: a bad value, refused"}),
        "paged_decode_attention[fp8]": Case(
            lambda q, k_cache, v_cache, block_tables, seq_lens, k_scale, v_scale, alibi_slopes, sinks:
            llmkern.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, num_splits=2, k_scale=k_scale,
                                           v_scale=v_scale, alibi_slopes=alibi_slopes, sinks=sinks),
            dict(q=_randn(2, 2, 32, device=device, seed=3), **_paged_fp8(device), **_head_params(device))),
        "paged_prefill_attention[fp8]": Case(
            lambda q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, k_scale, v_scale, alibi_slopes, sinks:
            llmkern.paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens,
                                            k_scale=k_scale, v_scale=v_scale, alibi_slopes=alibi_slopes, sinks=sinks),
            dict(q=_randn(5, 2, 32, device=device, seed=3), **_paged_fp8(device),
                 cu_seqlens_q=_ints([0, 2, 5], torch.int32, device), **_head_params(device)),
            refused={("cu_seqlens_q", "expanded"): "[0, 0, 0] does not end at total_q: a bad value, refused"}),
        "PagedAttentionPlan.run[fp8]": Case(
            lambda q, k_cache, v_cache, k_scale, v_scale, alibi_slopes, sinks: _plan(
                paged["block_tables"], paged["seq_lens"], _ints([0, 2, 5], torch.int32, device), kv_dtype=E5M2).run(
                q, k_cache, v_cache, k_scale=k_scale, v_scale=v_scale, alibi_slopes=alibi_slopes, sinks=sinks),
            dict(q=_randn(5, 2, 32, device=device, seed=3),
                 **{k: v for k, v in _paged_fp8(device).items() if k not in ("block_tables", "seq_lens")},
                 **_head_params(device))),
        "PagedKVCache": Case(
            lambda k_scale, v_scale: _cache_scales(llmkern.PagedKVCache(2, 4, 4, 2, 32, dtype=E5M2, device=device,
                                                                        k_scale=k_scale, v_scale=v_scale)),
            dict(k_scale=_ints([[0.5, 2.0], [1.0, 0.25]], torch.float32, device),
                 v_scale=_ints([3.0, 0.125], torch.float32, device))),
        "PagedAttentionPlan": Case(
            lambda block_tables, seq_lens, cu_seqlens_q: _plan_run(_plan(block_tables, seq_lens, cu_seqlens_q), device),
            dict(block_tables=paged["block_tables"], seq_lens=paged["seq_lens"],
                 cu_seqlens_q=_ints([0, 2, 5], torch.int32, device))),
        "PagedAttentionPlan.update": Case(
            lambda block_tables, seq_lens, cu_seqlens_q: _plan_run(_plan(
                paged["block_tables"][:1], paged["seq_lens"][:1], None, block_tables, seq_lens, cu_seqlens_q),
                device),
            dict(block_tables=paged["block_tables"], seq_lens=paged["seq_lens"],
                 cu_seqlens_q=_ints([0, 2, 5], torch.int32, device))),
        "PagedAttentionPlan.run": Case(
            lambda q, k_cache, v_cache, out: _plan(paged["block_tables"], paged["seq_lens"], _ints(
                [0, 2, 5], torch.int32, device)).run(q, k_cache, v_cache, window=(3, -1), out=out),
            dict(q=_randn(5, 2, 32, device=device, seed=3), k_cache=paged["k_cache"], v_cache=paged["v_cache"],
                 out=torch.zeros(5, 2, 32, device=device)),
            refused={("out", "expanded"): "written in place: an element at two indices is refused"}),
        "rms_norm": Case(
            llmkern.rms_norm,
            dict(x=_randn(3, 40, device=device), weight=_randn(40, device=device, seed=1))),
        "add_rms_norm": Case(
            llmkern.add_rms_norm,
            dict(x=_randn(3, 40, dtype=f16, device=device), residual=_randn(3, 40, dtype=f16, device=device, seed=2),
                 weight=_randn(40, dtype=f16, device=device, seed=1))),
        "apply_rope": Case(
            llmkern.apply_rope,
            dict(q=_randn(2, 3, 2, 32, device=device), k=_randn(2, 3, 1, 32, device=device, seed=1),
                 positions=_ints([[0, 1, 2], [7, 8, 9]], torch.int64, device))),
        "apply_rope[tables]": Case(
            lambda q, k, cos, sin: llmkern.apply_rope(q, k, cos=cos, sin=sin),
            dict(q=_randn(3, 2, 32, dtype=f16, device=device), k=_randn(3, 1, 32, dtype=f16, device=device, seed=1),
                 cos=_randn(1, 3, 32, device=device, seed=2), sin=_randn(1, 3, 32, device=device, seed=3))),
        "apply_rope[inplace]": Case(
            lambda q, k, positions: llmkern.apply_rope(q, k, positions, inplace=True),
            dict(q=_randn(2, 3, 2, 32, device=device), k=_randn(2, 3, 1, 32, device=device, seed=1),
                 positions=_ints([[0, 1, 2], [7, 8, 9]], torch.int64, device)),
            refused={(a, v): "rotated in place: a strided last dim or an element at two indices is refused"
                     for a in ("q", "k") for v in ("every_other", "column_major", "expanded")}),
        "sample": Case(
            lambda logits, temperature, top_k, top_p, min_p, seed: llmkern.sample(
                logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed),
            dict(logits=_randn(2, 8, device=device), **_sampling_params(device),
                 seed=_ints([1, 2], torch.int64, device))),
        "sampling_probs": Case(
            lambda logits, temperature, top_k, top_p, min_p: llmkern.sampling_probs(
                logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p),
            dict(logits=_randn(2, 8, dtype=f16, device=device), **_sampling_params(device))),
        "quant_matmul": Case(
            lambda x, bias: llmkern.quant_matmul(x, qw, bias),
            dict(x=_randn(_GEMM_ROWS, 64, dtype=f16, device=device),
                 bias=_randn(24, dtype=f16, device=device, seed=1))),
        "QuantizedWeight": Case(
            lambda qweight, scales, zeros, perm: llmkern.quant_matmul(
                _randn(_GEMM_ROWS, 64, dtype=f16, device=device, seed=9),
                llmkern.QuantizedWeight(qweight, scales, zeros, bits=4, group_size=32, in_features=64,
                                        out_features=24, perm=perm)),
            dict(qweight=qw.qweight, scales=qw.scales, zeros=qw.zeros, perm=qw.perm),
            refused={("perm", "expanded"): "one index repeated is not a permutation: refused"}),
        "QuantizedWeight.from_codes": Case(
            lambda q, zeros, scales, g_idx: llmkern.QuantizedWeight.from_codes(
                q, zeros, scales, bits=4, group_size=32, g_idx=g_idx),
            dict(q=codes, zeros=zeros, scales=scales, g_idx=g_idx),
            refused={("g_idx", "expanded"): "every column in group 0: not group_size columns per group, refused"}),
        "QuantizedWeight.from_gptq": Case(
            lambda qweight, qzeros, scales, g_idx: llmkern.QuantizedWeight.from_gptq(
                qweight, qzeros, scales, g_idx=g_idx, bits=4, group_size=32),
            dict(qweight=gptq_qw.qweight, qzeros=_ints([[0x76543210] * 3, [0x01234567] * 3], torch.int32, "cpu"),
                 scales=gptq_qw.scales, g_idx=g_idx),
            refused={("g_idx", "expanded"): "every column in group 0: not group_size columns per group, refused"}),
        "QuantizedWeight.from_awq": Case(
            lambda qweight, qzeros, scales: llmkern.QuantizedWeight.from_awq(qweight, qzeros, scales, group_size=32),
            dict(qweight=torch.randint(-2 ** 31, 2 ** 31 - 1, (64, 3), generator=torch.Generator().manual_seed(1),
                                       dtype=torch.int32),
                 qzeros=_ints([[0x76543210] * 3, [0x01234567] * 3], torch.int32, "cpu"), scales=gptq_qw.scales)),
        "quantize_weight": Case(
            lambda weight: llmkern.quantize_weight(weight, bits=4, group_size=32),
            dict(weight=_randn(8, 64, device="cpu", seed=4))),
        "QuantLinear.from_quantized": Case(
            lambda bias: llmkern.QuantLinear.from_quantized(qw, bias),
            dict(bias=_randn(24, dtype=f16, device=device, seed=6))),
        "QuantLinear.forward": Case(
            lambda x: ql(x),
            dict(x=_randn(_GEMM_ROWS, 64, dtype=f16, device=device, seed=7))),
        "speculative_sample": Case(
            lambda draft_probs, draft_token_ids, target_probs, seed: llmkern.speculative_sample(
                draft_probs, draft_token_ids, target_probs, seed=seed),
            dict(draft_probs=torch.softmax(_randn(2, 3, 16, device=device, seed=3) * 2, -1),
                 draft_token_ids=_ints([[3, 5, 1], [0, 15, 7]], torch.int64, device),
                 target_probs=torch.softmax(_randn(2, 4, 16, device=device, seed=4) * 2, -1),
                 seed=_ints([11, 12], torch.int64, device))),
        "beam_topk": Case(
            lambda logits, beam_scores: llmkern.beam_topk(logits, beam_scores, num_beams=2, k=3),
            dict(logits=_randn(4, 16, device=device, seed=5),
                 beam_scores=_ints([0.0, -1.0, -0.5, -2.0], torch.float32, device))),
        "apply_penalties": Case(
            lambda logits, token_ids, repetition_penalty, presence_penalty, frequency_penalty, logit_bias:
                llmkern.apply_penalties(logits, token_ids, repetition_penalty=repetition_penalty,
                                        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                        logit_bias=logit_bias),
            dict(logits=_randn(2, 16, dtype=f16, device=device, seed=6),
                 token_ids=_ints([[1, 1, -1, 4], [4, 0, 15, 4]], torch.int64, device),
                 repetition_penalty=_ints([1.3, 0.7], torch.float32, device),
                 presence_penalty=_ints([0.2, -0.1], torch.float32, device),
                 frequency_penalty=_ints([0.1, 0.3], torch.float32, device),
                 logit_bias=_randn(2, 16, device=device, seed=7))),
        "moe_topk": Case(
            lambda router_logits, correction_bias: llmkern.moe_topk(
                router_logits, 4, scoring="sigmoid", num_expert_group=4, topk_group=2,
                correction_bias=correction_bias, routed_scaling_factor=2.5),
            dict(router_logits=_randn(5, 16, device=device, seed=8),
                 correction_bias=_randn(16, device=device, seed=9))),
        "fused_moe": Case(
            lambda hidden_states, w13, w2, topk_weights, topk_ids: llmkern.fused_moe(
                hidden_states, w13, w2, topk_weights, topk_ids),
            dict(hidden_states=_randn(6, 64, dtype=f16, device=device, seed=10), **_moe_weights(device),
                 **_routing(device))),
        "QuantizedExperts": Case(
            lambda qweight, scales, zeros, perm: llmkern.fused_moe(
                _randn(6, 64, dtype=f16, device=device, seed=10), _moe_weights(device)["w13"],
                llmkern.QuantizedExperts(qweight, scales, zeros, bits=4, group_size=32, in_features=32,
                                         out_features=64, perm=perm), **_routing(device)),
            dict(qweight=qexperts.qweight, scales=qexperts.scales, zeros=qexperts.zeros, perm=expert_perm)),
        "quantize_experts": Case(
            lambda w: llmkern.quantize_experts(w, bits=4, group_size=32),
            dict(w=_randn(2, 8, 64, device="cpu", seed=13))),
        "beam_search": Case(
            lambda input_ids, attention_mask: llmkern.beam_search(
                _generate_model(device), input_ids, attention_mask=attention_mask, num_beams=2, max_new_tokens=1),
            dict(input_ids=_ints([[0, 5, 6, 7], [9, 10, 11, 12]], torch.int64, device),
                 attention_mask=_ints([[0, 1, 1, 1], [1, 1, 1, 1]], torch.int64, device)),
            variants=("every_other", "expanded")),   # as generate
        "generate": Case(
            lambda input_ids, attention_mask: llmkern.generate(
                _generate_model(device), input_ids, attention_mask=attention_mask, max_new_tokens=2),
            dict(input_ids=_ints([[0, 5, 6, 7], [9, 10, 11, 12]], torch.int64, device),
                 attention_mask=_ints([[0, 1, 1, 1], [1, 1, 1, 1]], torch.int64, device)),
            # host-side tensors (torch indexing), and each call runs a model: the strided and the stride-0 layout
            variants=("every_other", "expanded")),
    }
    return cases


def _op_name(label: str) -> str:
    return label.split("[")[0]


# ------------------------------------------------------------------------------------------------- layouts
def _fill(shape, like: torch.Tensor) -> torch.Tensor:
    value = float("nan") if like.dtype.is_floating_point else GARBAGE.get(like.dtype, 1)
    return torch.full(shape, value, dtype=like.dtype, device=like.device)


def _layout(t: torch.Tensor, variant: str):
    """(the argument in this layout, the larger tensor it views or None, the values the contiguous call gets)."""
    if variant == "every_other":
        base = _fill([2 * s for s in t.shape], t)
        view = base[tuple(slice(None, None, 2) for _ in t.shape)]
    elif variant == "rows":
        base = _fill([2 * t.shape[0], *t.shape[1:]], t)
        view = base[::2]
    elif variant == "offset":
        base = _fill([t.numel() + 3], t)
        view = base[3:].view(t.shape)
    elif variant == "column_major":
        order = list(range(t.dim()))[::-1]
        return t.permute(order).contiguous().permute(order), None, t
    else:  # expanded
        dim = next(d for d, s in enumerate(t.shape) if s > 1)
        view = t.narrow(dim, 0, 1).expand(t.shape)
        return view, None, view.contiguous()
    view.copy_(t)
    return view, base, t


def _applies(t: torch.Tensor, variant: str) -> bool:
    if variant in ("rows", "column_major"):
        return t.dim() >= 2
    if variant == "expanded":
        return any(s > 1 for s in t.shape)
    return True


def _fresh(args: dict[str, Any]) -> dict[str, Any]:
    return {n: a.clone() if isinstance(a, torch.Tensor) else a for n, a in args.items()}


def _flatten(result: Any) -> list:
    """The values a result is compared by: tensors, numbers and token lists, from nested outputs and objects."""
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [x for r in result for x in _flatten(r)]
    if isinstance(result, (llmkern.QuantizedWeight, llmkern.QuantizedExperts)):
        return [result.qweight, result.scales, result.zeros, result.perm]
    if isinstance(result, BeamSearchOutput):
        return _flatten(result.sequences) + [result.scores]
    if isinstance(result, nn.Module):
        return list(result.state_dict().values())
    return [result]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of t's bits (NaNs compare equal to themselves this way)."""
    if t.dtype.is_floating_point:
        return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def _assert_same(got: list, want: list, what: str) -> None:
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        if isinstance(w, torch.Tensor):
            assert isinstance(g, torch.Tensor) and g.shape == w.shape and g.dtype == w.dtype, f"{what}: output {i}"
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True, msg=f"{what}: output {i} differs")
        else:
            assert g == w, f"{what}: output {i}: {g!r} != {w!r}"


class _Baseline:
    """The contiguous call of a case, made once: its flattened result and its arguments afterwards."""

    def __init__(self, fn: Callable, args: dict[str, Any]):
        self.fn, self.args = fn, args
        call_args = _fresh(args)
        self.result = _flatten(fn(**call_args))
        self.after = call_args


def _run_layout(baseline: _Baseline, name: str, variant: str, refused: bool, what: str) -> None:
    """One argument in one layout against the contiguous call (module docstring)."""
    fn, args = baseline.fn, baseline.args
    arg, base, values = _layout(args[name], variant)
    before = None if base is None else base.clone()
    got_args = {**_fresh(args), name: arg}
    if refused:
        with pytest.raises(ValueError, match=re.escape(name)):
            fn(**got_args)
        return
    if values is not args[name]:     # expanded: other values, their own contiguous call
        baseline = _Baseline(fn, {**args, name: values})
    got = _flatten(fn(**got_args))
    _assert_same(got, baseline.result, what)
    # in-place ops: every argument ends as after the contiguous call (the strided one through its view)
    for n in _tensor_args(args):
        _assert_same([got_args[n]], [baseline.after[n]], f"{what}: argument {n} after the call")
    if base is not None:   # nothing written into the gaps
        patched = base.clone()
        patched.as_strided(arg.shape, arg.stride(), arg.storage_offset()).copy_(
            before.as_strided(arg.shape, arg.stride(), arg.storage_offset()))
        assert torch.equal(_bits(patched), _bits(before)), f"{what}: the call wrote outside {name}'s view"


def _tensor_args(args: dict[str, Any]) -> list[str]:
    return [n for n, a in args.items() if isinstance(a, torch.Tensor)]


def _labels() -> list[str]:
    return ["attention", "attention_varlen", "paged_kv_write", "paged_decode_attention", "paged_prefill_attention",
            "paged_decode_attention[fp8]", "paged_prefill_attention[fp8]", "PagedAttentionPlan.run[fp8]",
            "PagedKVCache", "PagedAttentionPlan", "PagedAttentionPlan.update", "PagedAttentionPlan.run", "rms_norm",
            "add_rms_norm",
            "apply_rope", "apply_rope[tables]", "apply_rope[inplace]", "sample",
            "sampling_probs", "quant_matmul", "QuantizedWeight", "QuantizedWeight.from_codes",
            "QuantizedWeight.from_gptq", "QuantizedWeight.from_awq", "quantize_weight", "QuantLinear.from_quantized",
            "QuantLinear.forward", "speculative_sample", "beam_topk", "apply_penalties", "moe_topk", "fused_moe",
            "QuantizedExperts", "quantize_experts", "beam_search", "generate", "mla_kv_write",
            "mla_decode_attention", "mla_prefill_attention"]


@pytest.mark.parametrize("label", _labels())
def test_public_op_layouts(label, device):
    case = _cases(device)[label]
    baseline = _Baseline(case.fn, case.args)
    for name in _tensor_args(case.args):
        for variant in case.variants:
            if not _applies(case.args[name], variant) or (name, variant) in case.skip:
                continue
            _run_layout(baseline, name, variant, (name, variant) in case.refused, f"{label}({name} {variant})")


# ------------------------------------------------------------------------------------------------- llmkern:: ops
# The op called directly (torch.ops.llmkern.*), so that the layouts a public function normalizes first reach it as
# they are. Two layouts: every_other (every dim strided, gaps of out-of-range values) and expanded (stride 0; the
# in-place ops must refuse it for what they write). The public cases above cover the others for the same code.
OP_VARIANTS = ("every_other", "expanded")
# Refused: caches written in place, expanded; cu_seqlens_q expanded ([0, 0, 0] does not end at total_q). Skipped: an
# expanded slot_mapping (one slot for every token, see above).
OP_REFUSED = {("rope_", n, v) for n in ("q", "k") for v in OP_VARIANTS} | {
    ("paged_kv_write", n, "expanded") for n in ("k_cache", "v_cache")} | {
    ("mla_kv_write", n, "expanded") for n in ("ckv_cache", "kpe_cache")} | {
    # [0, 0, 0] does not end at total_q: refused
    (op, "cu_seqlens_q", "expanded") for op in ("paged_prefill_attention", "mla_prefill_attention")} | {
    ("paged_attention", n, "expanded") for n in ("out", "part_o", "part_lse")}   # written in place
OP_SKIPPED = {(op, "slot_mapping", "expanded") for op in ("paged_kv_write", "mla_kv_write")} | {   # one slot per token
    # llmkern::paged_attention runs a PagedAttentionPlan's work list, built with (and only valid for) its tables: one
    # repeated value is no plan (work items would name sequences that do not exist), and the op has no check that
    # reads values (that is the point of the plan: no sync per call). The plan's public layouts are covered above.
    ("paged_attention", n, "expanded") for n in ("schedule", "seq_lens", "cu_seqlens_q", "block_tables")}
# The schema arguments of tests/test_ops.py, except quant_matmul's x: 17 rows, for the GEMM path (see _GEMM_ROWS).
OP_X_ROWS = {"quant_matmul": _GEMM_ROWS}


def _schema_names(op) -> list[str]:
    return [a.name for a in op._schema.arguments]


@pytest.mark.parametrize("name", sorted(_dispatch.OPS))
def test_op_layouts(name, device):
    op = _dispatch.OPS[name]
    assert name in OP_CASES, f"llmkern::{name} has no case in tests/test_ops.py CASES"
    names = _schema_names(op)
    args = dict(zip(names, OP_CASES[name](device)[0]))
    if name in OP_X_ROWS:
        args["x"] = _randn(OP_X_ROWS[name], args["x"].shape[-1], dtype=args["x"].dtype, device=device)
    baseline = _Baseline(lambda **kw: op(*[kw[n] for n in names]), args)
    for arg in _tensor_args(args):
        for variant in OP_VARIANTS:
            if not _applies(args[arg], variant) or (name, arg, variant) in OP_SKIPPED:
                continue
            _run_layout(baseline, arg, variant, (name, arg, variant) in OP_REFUSED, f"llmkern::{name}({arg} {variant})")


# ------------------------------------------------------------------------------------------------- coverage
def _takes_tensor(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any("Tensor" in str(p.annotation) for p in params)


def public_tensor_ops() -> set[str]:
    """Names exported by llmkern that take a torch.Tensor: functions, and for classes "Class" (its __init__) and
    "Class.method" for the methods it defines itself."""
    found = set()
    for name in dir(llmkern):
        obj = getattr(llmkern, name)
        if name.startswith("_") or inspect.ismodule(obj):
            continue
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr != "__init__" and attr.startswith("_"):
                    continue
                member = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
                if callable(member) and _takes_tensor(member):
                    found.add(name if attr == "__init__" else f"{name}.{attr}")
        elif callable(obj) and _takes_tensor(obj):
            found.add(name)
    return found


def test_every_public_op_has_a_case():
    ops = {_op_name(label) for label in _labels()}
    missing = public_tensor_ops() - ops
    assert not missing, f"public ops without a layout case: {sorted(missing)} (add them to _cases)"
    assert ops <= public_tensor_ops(), f"cases for names that are not public tensor ops: {ops - public_tensor_ops()}"
    assert set(_labels()) == set(_cases("cpu"))


def test_docstring_lists_every_argument():
    listed = set()
    for op, names in re.findall(r"^  (\S+) ([\w, ]+?):", __doc__, flags=re.M):
        listed |= {(op, n.strip()) for n in names.split(",")}
    exercised = {(_op_name(label), n) for label, case in _cases("cpu").items() for n in _tensor_args(case.args)}
    assert listed == exercised, (f"documented but not exercised: {sorted(listed - exercised)}; "
                                 f"exercised but not documented: {sorted(exercised - listed)}")


# ------------------------------------------------------------------------------------------------- the cases
def test_seq_lens_view_in_decode(device):
    """seq_lens = tensor([[40, 1], [9, 1]])[:, 0] (values [40, 9]): the second sequence attends over its 9 tokens
    (it used to attend over 1: the kernel read the view with unit stride)."""
    kc, vc = _randn(8, 16, 1, 32, device=device, seed=1), _randn(8, 16, 1, 32, device=device, seed=2)
    q = _randn(2, 1, 32, device=device)
    bt = _ints([[0, 1, 2], [3, 4, 5]], torch.int32, device)
    seq_lens = _ints([[40, 1], [9, 1]], torch.int32, device)[:, 0]
    want = llmkern.reference.paged_decode_attention(q.double(), kc.double(), vc.double(), bt, seq_lens)
    torch.testing.assert_close(llmkern.paged_decode_attention(q, kc, vc, bt, seq_lens).double(), want,
                               rtol=1e-5, atol=1e-6)
    # out-of-range values in the view's gaps are never read (they used to crash the process)
    wild = _ints([[40, 2 ** 30], [9, -(2 ** 30)]], torch.int32, device)[:, 0]
    torch.testing.assert_close(llmkern.paged_decode_attention(q, kc, vc, bt, wild).double(), want,
                               rtol=1e-5, atol=1e-6)


def test_slot_mapping_view_in_kv_write(device):
    """slot_mapping = tensor([[5, 60], [6, 61], [7, 62]])[:, 0] (values [5, 6, 7]) writes slots 5, 6 and 7 and leaves
    slot 60, another sequence's token, alone (it used to write 5, 6 and 60)."""
    kc = torch.zeros(4, 16, 1, 32, device=device)
    vc = torch.zeros(4, 16, 1, 32, device=device)
    k = _randn(3, 1, 32, device=device)
    v = _randn(3, 1, 32, device=device, seed=1)
    for slots in (_ints([[5, 60], [6, 61], [7, 62]], torch.int64, device)[:, 0],
                  _ints([[5, 2 ** 40], [6, -(2 ** 40)], [7, 10 ** 12]], torch.int64, device)[:, 0]):
        kc.zero_(), vc.zero_()
        llmkern.paged_kv_write(k, v, kc, vc, slots)
        flat_k, flat_v = kc.view(64, 1, 32), vc.view(64, 1, 32)
        assert torch.equal(flat_k[5:8], k) and torch.equal(flat_v[5:8], v)
        assert flat_k[:5].abs().sum() == 0 and flat_k[8:].abs().sum() == 0 and flat_v[8:].abs().sum() == 0
