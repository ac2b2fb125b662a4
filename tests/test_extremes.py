"""Every float parameter of every public op at its extremes (issue 16, kind 2), against the float64 reference.

Values are drawn from these classes (hypothesis, plus one explicit example of each): zero (+0 and -0), float32
subnormals, float32's smallest normal 2**-126, ordinary values, very large values (1e30 up to float32's top, and
beyond float32: 1e300), inf, -inf, NaN and negative values. Integer parameters (windows, top_k) get their own
extremes: -1, 0, 2**31 - 1, 2**63 and beyond. Each parameter has a documented meaning for every value (in the op's
docstring; attention's scale and softcap in llmkern._utils) or is refused:
    refused(value)  -> a ValueError naming the parameter, raised before any kernel runs;
    otherwise       -> the same numbers as the float64 reference given the documented meaning of the value (e.g.
                       a softcap above 2**127, inf included, is no cap), under the op's tolerance rule.
The meanings, in short (the op docstrings have them in full):
  attention scale (every attention op, PagedAttentionPlan.run included): finite, |scale| <= 2**127; 0 or subnormal: uniform over visible keys.
  softcap: > 0; below max(2**-126, |scale| / 2**127) refused; above 2**127 (inf included): no cap.
  window sides: -1 unbounded, below -1 refused; any side reaching past every key (2**31 - 1 and more) unbounded.
  rms_norm / add_rms_norm eps: 0 or [2**-126, 3.4e38]; offset: |offset| <= 3.4e38.
  apply_rope theta: 1 < theta < inf.
  sample / sampling_probs, used as float32: temperature >= 0 and finite in float32, below 2**-126 greedy;
    top_p in (0, 1]; min_p in [0, 1]; top_k >= 0 (>= vocab: off).
  quantization scales (QuantizedWeight.from_codes and every conversion): finite; any finite value is used as is.
  apply_penalties: repetition_penalty > 0 and finite in float32; presence/frequency_penalty finite in float32;
    float32 arithmetic, as transformers' processor (a tiny or huge value can send a repeated logit to +-inf).
  moe_topk routed_scaling_factor: finite in float32; multiplies the weights in float32.
  mla_decode_attention / mla_prefill_attention scale: as the attention scale; mla_decode_attention num_splits:
    [1, 256] (more splits than key blocks leave some empty: weight 0 in the merge).
  beam_search length_penalty: finite; scores are sums of log-probabilities / length ** length_penalty, -0.0 where
    the power overflows float64 and -inf where it underflows.
Keep it cheap: small shapes, one value of each class (a test id each) plus three random draws per parameter. Finite
softcaps from 1 to 2**127 are section 3's (kernel precision): test_large_finite_softcap_precision.
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmkern
from llmkern import _utils, reference
from llmkern.beam_search import BeamSearch, run_searches
from tolerance import assert_fa_close

# On CPU: the Triton interpreter, and the C++ backend for the cases it serves (tests/conftest.py: runs_cpp).
pytestmark = pytest.mark.cpu_backends("interpreter", "cpp", cpp_case_params=("name", "op"))
TINY = 2.0 ** -126                       # float32's smallest normal
F32_MAX = float(torch.finfo(torch.float32).max)
SUBNORMAL = st.floats(min_value=2.0 ** -149, max_value=TINY, exclude_max=True)
FLOATS = st.one_of(st.sampled_from([0.0, -0.0, TINY, math.inf, -math.inf, math.nan]), SUBNORMAL,
                   st.floats(min_value=1e-3, max_value=1e3), st.floats(min_value=1e30, max_value=1e300),
                   st.floats(min_value=-1e300, max_value=-1e-300))
INTS = st.one_of(st.sampled_from([-2, -1, 0, 1, 2 ** 31 - 2, 2 ** 31 - 1, 2 ** 31, 2 ** 63, 2 ** 100]),
                 st.integers(min_value=-5, max_value=40))
SETTINGS = settings(max_examples=3, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def _f32(v: float) -> float:
    """v as float32 holds it (the kernels take every float parameter as float32)."""
    return float(torch.tensor(v, dtype=torch.float32))


@dataclass
class Param:
    """refused(value) -> bool; check(value, device) runs the op with the value and compares with the reference;
    word: what the ValueError must name."""
    refused: Callable
    check: Callable
    word: str
    domain: Callable = lambda v: True     # the values this sweep covers (softcap: see the end of the file)


def _randn(*shape, seed=0, scale=1.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device)


# ------------------------------------------------------------------------------------------------ attention
# Small scores (|q.k| < 1, q and k scaled by 0.05) so that scale = 2**127 still gives finite float32 scores.
def _attention_call(op: str, device, **kw):
    """(ours, float64 reference, PyTorch float32) for one attention op and keywords (scale, softcap, window)."""
    ref_kw = dict(kw)
    if ref_kw.get("softcap") is not None and ref_kw["softcap"] > _utils.NO_CAP_ABOVE:
        ref_kw["softcap"] = None                                    # documented: no cap
    if "window" in ref_kw:
        ref_kw["window"] = tuple(-1 if w >= 64 else w for w in ref_kw["window"])   # past every key: unbounded
    q, k, v = _randn(1, 6, 2, 32, scale=0.05, device=device), _randn(1, 7, 1, 32, seed=1, scale=0.05, device=device), \
        _randn(1, 7, 1, 32, seed=2, device=device)
    if op == "attention":
        ours = llmkern.attention(q, k, v, **kw)
        refs = [reference.attention(q.double(), k.double(), v.double(), **ref_kw),
                reference.attention(q, k, v, compute_dtype=torch.float32, **ref_kw)]
    elif op == "attention_varlen":
        cu = torch.tensor([0, 6], dtype=torch.int32, device=device)
        cu_k = torch.tensor([0, 7], dtype=torch.int32, device=device)
        ours = llmkern.attention_varlen(q[0], k[0], v[0], cu, cu_k, 6, 7, **kw)
        refs = [reference.attention_varlen(q[0].double(), k[0].double(), v[0].double(), cu, cu_k, **ref_kw),
                reference.attention_varlen(q[0], k[0], v[0], cu, cu_k, compute_dtype=torch.float32, **ref_kw)]
    else:   # the paged ops: the 7 keys in blocks 2 and 0 of a 4-token-block cache
        kc, vc = torch.zeros(3, 4, 1, 32, device=device), torch.zeros(3, 4, 1, 32, device=device)
        slots = torch.tensor([8, 9, 10, 11, 0, 1, 2], device=device)
        llmkern.paged_kv_write(k[0], v[0], kc, vc, slots)
        bt = torch.tensor([[2, 0]], dtype=torch.int32, device=device)
        sl = torch.tensor([7], dtype=torch.int32, device=device)
        if op == "PagedAttentionPlan.run":
            cu = torch.tensor([0, 6], dtype=torch.int32, device=device)
            plan = llmkern.PagedAttentionPlan(bt, sl, cu, num_heads=2, num_kv_heads=1, head_dim=32, num_blocks=3,
                                              block_size=4, dtype=torch.float32)
            ours = plan.run(q[0], kc, vc, causal=False, **kw)
            refs = [reference.paged_prefill_attention(q[0].double(), kc.double(), vc.double(), bt, cu, sl,
                                                      causal=False, **ref_kw),
                    reference.paged_prefill_attention(q[0], kc, vc, bt, cu, sl, causal=False,
                                                      compute_dtype=torch.float32, **ref_kw)]
        elif op == "paged_decode_attention":
            ours = llmkern.paged_decode_attention(q[0, -1:], kc, vc, bt, sl, **kw)
            refs = [reference.paged_decode_attention(q[0, -1:].double(), kc.double(), vc.double(), bt, sl, **ref_kw),
                    reference.paged_decode_attention(q[0, -1:], kc, vc, bt, sl, compute_dtype=torch.float32,
                                                     **ref_kw)]
        else:
            cu = torch.tensor([0, 6], dtype=torch.int32, device=device)
            ours = llmkern.paged_prefill_attention(q[0], kc, vc, bt, cu, sl, causal=False, **kw)
            refs = [reference.paged_prefill_attention(q[0].double(), kc.double(), vc.double(), bt, cu, sl,
                                                      causal=False, **ref_kw),
                    reference.paged_prefill_attention(q[0], kc, vc, bt, cu, sl, causal=False,
                                                      compute_dtype=torch.float32, **ref_kw)]
    assert_fa_close(ours.cpu(), refs[0].cpu(), refs[1].cpu(), what=f"{op} {kw}")


def _scale_refused(v):
    return not abs(v) <= 2.0 ** 127


def _softcap_refused(v, scale=32 ** -0.5):
    return not v > 0 or (v <= _utils.NO_CAP_ABOVE and v < max(TINY, abs(scale) / 2.0 ** 127))


ATTENTION_OPS = ("attention", "attention_varlen", "paged_decode_attention", "paged_prefill_attention",
                 "PagedAttentionPlan.run")
PARAMS = {}
for _op in ATTENTION_OPS:
    PARAMS[f"{_op}.scale"] = Param(_scale_refused, lambda v, d, op=_op: _attention_call(op, d, scale=v), "scale")
    PARAMS[f"{_op}.softcap"] = Param(_softcap_refused, lambda v, d, op=_op: _attention_call(op, d, softcap=v),
                                     "softcap", domain=lambda v: not 1 <= v <= _utils.NO_CAP_ABOVE)


def _window_refused(v):
    return v < -1


INT_PARAMS = {f"{op}.window_{side}": Param(_window_refused, lambda v, d, op=op, side=side: _attention_call(
    op, d, window=(v, -1) if side == "left" else (-1, v)), "window")
    for op in ATTENTION_OPS for side in ("left", "right")}


# MLA (DeepSeek's absorbed latent attention): scale as the attention ops (|scale| <= 2**127, 0 or subnormal uniform),
# num_splits in [1, 256]. Small scores (q and the latents scaled by 0.05, rank 256) keep scale = 2**127 finite.
def _mla_call(op: str, device, scale=0.1, num_splits=None):
    q_nope, q_pe = _randn(3, 2, 256, scale=0.05, device=device), _randn(3, 2, 32, seed=1, scale=0.05, device=device)
    ckv, kpe = _randn(2, 4, 256, seed=2, scale=0.05, device=device), _randn(2, 4, 32, seed=3, scale=0.05, device=device)
    bt = torch.tensor([[1, 0]], dtype=torch.int32, device=device)
    sl = torch.tensor([7], dtype=torch.int32, device=device)
    if op == "mla_decode_attention":
        args = (q_nope[-1:], q_pe[-1:], ckv, kpe, bt, sl)
        ours = llmkern.mla_decode_attention(*args, scale=scale, num_splits=num_splits)
    else:
        args = (q_nope, q_pe, ckv, kpe, bt, torch.tensor([0, 3], dtype=torch.int32, device=device), sl)
        ours = llmkern.mla_prefill_attention(*args, scale=scale)
    fn = getattr(reference, op)
    ref = fn(*[a.double() if a.is_floating_point() else a for a in args], scale=scale)
    base = fn(*args, scale=scale, compute_dtype=torch.float32)
    assert_fa_close(ours.cpu(), ref.cpu(), base.cpu(), what=f"{op} scale={scale} num_splits={num_splits}")


for _op in ("mla_decode_attention", "mla_prefill_attention"):
    PARAMS[f"{_op}.scale"] = Param(_scale_refused, lambda v, d, op=_op: _mla_call(op, d, scale=v), "scale")
INT_PARAMS["mla_decode_attention.num_splits"] = Param(
    lambda v: not 1 <= v <= 256, lambda v, d: _mla_call("mla_decode_attention", d, num_splits=v), "num_splits")


# ------------------------------------------------------------------------------------------------ layers
def _rms_call(op: str, device, eps=1e-6, offset=0.0):
    x, w = _randn(3, 40, device=device), _randn(40, seed=1, device=device)
    if op == "add_rms_norm":
        r = _randn(3, 40, seed=2, device=device)
        ours, _ = llmkern.add_rms_norm(x, r, w, eps, offset=offset)
        x = x + r                                                   # exact enough: fp32 sum, rounded the same way
    else:
        ours = llmkern.rms_norm(x, w, eps, offset=offset)
    ref = reference.rms_norm(x.double(), w.double(), eps, offset=offset)
    base = reference.rms_norm(x, w, eps, offset=offset, compute_dtype=torch.float32)
    assert_fa_close(ours.cpu(), ref.cpu(), base.cpu(), what=f"{op} eps={eps} offset={offset}")


def _eps_refused(v):
    return not (v == 0 or TINY <= v <= F32_MAX)


def _offset_refused(v):
    return not abs(v) <= F32_MAX


for _op in ("rms_norm", "add_rms_norm"):
    PARAMS[f"{_op}.eps"] = Param(_eps_refused, lambda v, d, op=_op: _rms_call(op, d, eps=v), "eps")
    PARAMS[f"{_op}.offset"] = Param(_offset_refused, lambda v, d, op=_op: _rms_call(op, d, offset=v), "offset")


def _rope_call(theta, device):
    q, k = _randn(1, 3, 2, 32, device=device), _randn(1, 3, 1, 32, seed=1, device=device)
    pos = torch.tensor([0, 1, 7], device=device)
    ours = llmkern.apply_rope(q, k, pos, theta=theta)
    ref = reference.apply_rope(q.double(), k.double(), pos, theta=theta)
    base = reference.apply_rope(q, k, pos, theta=theta, compute_dtype=torch.float32)
    for o, r, b, name in zip(ours, ref, base, "qk"):
        assert_fa_close(o.cpu(), r.cpu(), b.cpu(), what=f"rope {name} theta={theta}")


PARAMS["apply_rope.theta"] = Param(lambda v: not 1 < v < math.inf, _rope_call, "theta")


# ------------------------------------------------------------------------------------------------ sampling
def _sampling_call(name, value, device):
    """sampling_probs (and, for greedy temperatures, sample) with one parameter at `value`, against the float64
    sort-based reference given the value as float32 holds it."""
    logits = _randn(2, 64, seed=3, scale=2.0, device=device)
    kw = {"top_p": 0.9} if name == "temperature" else {"temperature": 0.7}
    kw[name] = value
    ref_kw = dict(kw)
    ref_kw[name] = min(value, 2 ** 62) if name == "top_k" else _f32(value)
    probs = llmkern.sampling_probs(logits, **kw)
    ref, kept = reference.sampling_probs(logits, **ref_kw, return_kept=True)
    assert torch.equal(probs.cpu() > 0, kept & (ref > 0)), f"kept set differs ({name}={value})"
    torch.testing.assert_close(probs.cpu().double(), ref, rtol=1e-5, atol=1e-6, msg=f"{name}={value}")
    if name == "temperature" and _f32(value) < reference.GREEDY_BELOW:
        tokens = llmkern.sample(logits, **kw, seed=0)
        assert tokens.tolist() == logits.argmax(dim=1).tolist(), f"temperature {value}: not the argmax"


def _f32_refused(lo, hi, lo_open=False):
    def refused(v):
        v32 = _f32(v) if abs(v) < 1e300 else math.copysign(math.inf, v)   # as the op reads it (float32)
        return math.isnan(v) or (v32 <= lo if lo_open else v32 < lo) or v32 > hi
    return refused


for _name, _refused in (("temperature", _f32_refused(0.0, F32_MAX)), ("top_p", _f32_refused(0.0, 1.0, lo_open=True)),
                        ("min_p", _f32_refused(0.0, 1.0))):
    PARAMS[f"sample.{_name}"] = Param(_refused, lambda v, d, n=_name: _sampling_call(n, v, d), _name)
INT_PARAMS["sample.top_k"] = Param(lambda v: v < 0, lambda v, d: _sampling_call("top_k", v, d), "top_k")


# ------------------------------------------------------------------------------------------------ quantization
def _quant_call(value, device):
    """Every scale of an int4 weight set to `value` (float32 scales and activations)."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randint(0, 16, (24, 64), generator=gen, dtype=torch.int32)
    z = torch.randint(0, 16, (2, 24), generator=gen, dtype=torch.int32)
    scales = torch.full((2, 24), value, dtype=torch.float64).float()       # beyond float32: inf
    qw = llmkern.QuantizedWeight.from_codes(q, z, scales, bits=4, group_size=32).to(device)
    x = _randn(3, 64, seed=5, scale=0.1, device=device)
    out = llmkern.quant_matmul(x, qw).cpu().double()
    w64 = reference.quant_dequantize(q, z, scales, 32, dtype=torch.float64)
    ref = x.cpu().double() @ w64.t()
    mag = x.cpu().double().abs() @ w64.abs().t()
    budget = 2.0 ** -24 * ref.abs() + 68 * 2.0 ** -24 * mag + 2.0 ** -140     # test_quant.py's budget, fp32
    ok = (out - ref).abs() <= budget
    # documented: where the terms' magnitude passes float32's range, intermediate sums may overflow (inf or NaN)
    overflow = mag > F32_MAX / 2
    assert bool((ok | (overflow & ~torch.isfinite(out))).all()), f"scale {value}"
    assert bool(ok[~overflow].all()), f"scale {value}"


PARAMS["QuantizedWeight.scales"] = Param(lambda v: abs(v) >= 1e300 or not math.isfinite(_f32(v)), _quant_call,
                                         "scales")


# ------------------------------------------------------------------------------------------------ decoding controls
def _penalties_call(name, value, device):
    """apply_penalties with one control at `value`: exactly the float32 reference given the value as float32 holds it
    (the documented meaning: float32 arithmetic, as transformers' processor; inf results included)."""
    logits = _randn(2, 16, seed=6, scale=3.0, device=device)
    ids = torch.tensor([[1, 1, -1, 4], [4, 0, 15, 4]], device=device)
    ours = llmkern.apply_penalties(logits, ids, **{name: value})
    want = reference.apply_penalties(logits, ids, **{name: _f32(value)})
    assert torch.equal(ours.cpu(), want.cpu()), f"{name}={value}"


PARAMS["apply_penalties.repetition_penalty"] = Param(
    _f32_refused(0.0, F32_MAX, lo_open=True), lambda v, d: _penalties_call("repetition_penalty", v, d),
    "repetition_penalty")
for _name in ("presence_penalty", "frequency_penalty"):
    PARAMS[f"apply_penalties.{_name}"] = Param(_f32_refused(-F32_MAX, F32_MAX),
                                               lambda v, d, n=_name: _penalties_call(n, v, d), _name)


def _moe_topk_call(value, device):
    """moe_topk's routed_scaling_factor (DeepSeek-V3's sigmoid routing) against the float64 reference."""
    logits = _randn(5, 16, seed=8, device=device)
    kw = dict(scoring="sigmoid", num_expert_group=4, topk_group=2)
    w, ids = llmkern.moe_topk(logits, 4, routed_scaling_factor=value, **kw)
    ref_w, ref_ids = reference.moe_topk(logits.double(), 4, routed_scaling_factor=value, **kw)
    assert torch.equal(ids.cpu().long(), ref_ids.cpu())
    # documented: the weights times the factor in float32 (a few float32 roundings of the exact product, which is
    # below the subnormals for a subnormal factor)
    torch.testing.assert_close(w.cpu().double(), ref_w.cpu(), rtol=2.0 ** -21, atol=2.0 ** -148,
                               msg=f"routed_scaling_factor={value}")


PARAMS["moe_topk.routed_scaling_factor"] = Param(lambda v: not abs(v) <= F32_MAX, _moe_topk_call,
                                                 "routed_scaling_factor")


@functools.lru_cache(maxsize=None)
def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1,
                                   num_key_value_heads=1, head_dim=32, vocab_size=16, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _beam_scores(length_penalty, device):
    """The finished hypotheses (tokens, scores) of one beam search over fixed random logits (vocabulary 8, no EOS,
    2 beams, 2 new tokens), driven as llmkern.beam_search drives it but with no model (beam_search.run_searches)."""
    cache = llmkern.PagedKVCache(1, 8, 4, 1, 32, dtype=torch.float32, device=device)
    search = BeamSearch(cache, 0, [1, 2, 3], num_beams=2, max_new_tokens=2, length_penalty=length_penalty,
                        early_stopping=False, eos=set(), new_ids=itertools.count(1))
    g = torch.Generator().manual_seed(7)

    def feed(seqs):
        for sid, tokens in seqs.items():
            cache.append(sid, len(tokens) - (cache.seq_len(sid) if sid in cache else 0))
        return torch.randn(len(seqs), 8, generator=g).to(device)
    run_searches([search], feed, 8, 4)
    return [b.tokens for b in search.finished], torch.tensor([b.score for b in search.finished])


def _beam_call(value, device):
    """beam_search's length_penalty. A refused value is refused by llmkern.beam_search before its model runs; an
    accepted one is run through the search itself: with no EOS every
    hypothesis has 2 tokens, so the hypotheses do not depend on it and each score is the sum of log-probabilities
    (length_penalty 0) divided by 2 ** value (a float64 power: where it overflows the score is -0.0, where it
    underflows -inf, the documented degenerate ends; float32 division, so within float32's subnormals either)."""
    if not math.isfinite(value):
        llmkern.beam_search(_tiny_llama(), torch.tensor([[5, 6]]), num_beams=2, max_new_tokens=2,
                            length_penalty=value)
        raise AssertionError(f"length_penalty={value} was accepted")
    raw_tokens, raw = _beam_scores(0.0, device)
    tokens, ours = _beam_scores(value, device)
    assert tokens == raw_tokens, f"length_penalty={value}"
    power = 2.0 ** value if value < 1024 else math.inf        # float64's largest power of 2 is 2**1023
    want = (raw.double() / power).float()
    torch.testing.assert_close(ours, want, rtol=1e-6, atol=TINY, msg=f"length_penalty={value}")


PARAMS["beam_search.length_penalty"] = Param(lambda v: not math.isfinite(v), _beam_call, "length_penalty")


def _sweep(param: Param, value, device):
    if param.refused(value):
        with pytest.raises(ValueError, match=param.word):
            param.check(value, device)
    else:
        param.check(value, device)


# One value of every class, for every parameter (a test id each), then a few drawn at random within the classes.
CLASSES = {"zero": 0.0, "minus_zero": -0.0, "subnormal": 1e-45, "smallest_normal": TINY, "ordinary": 0.37,
           "very_large": 2.0 ** 127, "beyond_float32": 1e300, "inf": math.inf, "minus_inf": -math.inf,
           "nan": math.nan, "negative": -1.5}
INT_CLASSES = {"below_minus_one": -2, "minus_one": -1, "zero": 0, "int32_max": 2 ** 31 - 1, "beyond_int64": 2 ** 63}


def _class_cases(params, classes):
    return [pytest.param(name, value, id=f"{name}-{cls}") for name, p in sorted(params.items())
            for cls, value in classes.items() if p.domain(value)]


@pytest.mark.parametrize("name,value", _class_cases(PARAMS, CLASSES))
def test_float_parameter_classes(name, value, device):
    _sweep(PARAMS[name], value, device)


@pytest.mark.parametrize("name,value", _class_cases(INT_PARAMS, INT_CLASSES))
def test_integer_parameter_classes(name, value, device):
    _sweep(INT_PARAMS[name], value, device)


@pytest.mark.parametrize("name", sorted(PARAMS) + sorted(INT_PARAMS))
@SETTINGS
@given(data=st.data())
def test_parameter_sweep(name, data, device):
    param = PARAMS.get(name) or INT_PARAMS[name]
    strategy = FLOATS if name in PARAMS else INTS
    _sweep(param, data.draw(strategy.filter(param.domain), label=name), device)


# Finite caps from 1 to 2**127: issue 16's section 3 (the old tanh, 1 - 2 / (exp(2x) + 1), cancelled for small
# x = s / cap, an error growing with the cap; the shared attention core's _tanh is accurate for every |x|).
@pytest.mark.parametrize("op", ATTENTION_OPS)
def test_large_finite_softcap_precision(op, device):
    for cap in (1e3, 1e6, 1e12, 2.0 ** 127):
        _attention_call(op, device, softcap=cap)
