"""Every llmkern:: op through torch.library: its registration (opcheck), and the implementation each device gets.

The ops are discovered from llmkern._dispatch.OPS (and torch's own registry must hold no other llmkern:: op), so an
op added without a case here fails `test_opcheck`.
"""
import pytest
import torch

import llmkern
from llmkern import _dispatch, _utils, cpu

F16 = torch.float16


def _randn(*shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def _ints(values, dtype, device):
    return torch.tensor(values, dtype=dtype, device=device)


def _attention(device):
    q = _randn(1, 20, 2, 64, dtype=F16, device=device)
    k, v = (_randn(1, 30, 1, 64, dtype=F16, device=device, seed=s) for s in (1, 2))
    slopes, sinks = _randn(2, device=device, seed=3).abs(), _randn(2, device=device, seed=4)
    return [(q, k, v, True, 0.125, -1, -1, None, True, None, None), (q, k, v, False, 0.125, 4, 2, 2.0, False, None, None),
            (q, k, v, True, 0.125, 8, -1, None, True, slopes, sinks)]


def _attention_varlen(device):
    q = _randn(10, 2, 32, dtype=F16, device=device)
    k, v = (_randn(12, 1, 32, dtype=F16, device=device, seed=s) for s in (1, 2))
    cu_q, cu_k = _ints([0, 4, 10], torch.int32, device), _ints([0, 6, 12], torch.int32, device)
    slopes, sinks = _randn(2, device=device, seed=3).abs(), _randn(2, device=device, seed=4)
    return [(q, k, v, cu_q, cu_k, 6, 6, True, 0.17, -1, -1, None, True, None, None),
            (q, k, v, cu_q, cu_k, 6, 6, False, 0.17, -1, -1, 3.0, True, slopes, sinks)]


def _paged(device):
    """A float32 cache of 5 blocks of 16 tokens, 2 KV heads of 32, holding sequences of 5 and 20 tokens."""
    kc, vc = (_randn(5, 16, 2, 32, device=device, seed=s) for s in (0, 1))
    return kc, vc, _ints([[3, 0], [1, 4]], torch.int32, device), _ints([5, 20], torch.int32, device)


def _paged_kv_write(device):
    kc, vc, _, _ = _paged(device)
    k = _randn(2, 2, 32, device=device, seed=2)
    kc8, vc8 = (torch.zeros(kc.shape, dtype=torch.float8_e4m3fn, device=device) for _ in range(2))
    scales = _ints([0.5, 2.0], torch.float32, device)
    return [(k, k, kc, vc, _ints([3, 40], torch.int64, device), None, None),
            (k, k, kc8, vc8, _ints([3, 40], torch.int64, device), scales, scales * 4)]


def _paged_variants(device):
    """An e5m2 cache (every GPU builds e5m2) with per-KV-head scales, and ALiBi slopes and sinks for 4 query heads:
    (k_cache, v_cache, k_scale, v_scale, alibi_slopes, sinks)."""
    kc, vc, _, _ = _paged(device)
    scales = _ints([0.5, 2.0], torch.float32, device)
    return (kc.to(torch.float8_e5m2), vc.to(torch.float8_e5m2), scales, scales * 4,
            _randn(4, device=device, seed=5).abs(), _randn(4, device=device, seed=6))


def _paged_decode_attention(device):
    kc, vc, bt, sl = _paged(device)
    kc8, vc8, *variants = _paged_variants(device)
    q = _randn(2, 4, 32, device=device, seed=2)
    return [(q, kc, vc, bt, sl, 0.2, None, -1, -1, 2, None, None, None, None),
            (q, kc8, vc8, bt, sl, 0.2, None, -1, -1, 2, *variants)]


def _paged_prefill_attention(device):
    kc, vc, bt, sl = _paged(device)
    kc8, vc8, *variants = _paged_variants(device)
    cu = _ints([0, 2, 5], torch.int32, device)
    q = _randn(5, 4, 32, device=device, seed=2)
    return [(q, kc, vc, bt, cu, sl, True, 0.2, None, -1, -1, None, None, None, None),
            (q, kc8, vc8, bt, cu, sl, True, 0.2, None, 3, -1, *variants)]


def _paged_attention(device):
    """A plan's run: a mixed step (2 and 3 new tokens: prefill tiles) and a decode step (decode tiles), no splits
    (the reference slot computes no partials, so the workspace must stay as it was to compare); the mixed step again
    over an fp8 cache with ALiBi and sinks."""
    kc, vc, bt, sl = _paged(device)
    kc8, vc8, *variants = _paged_variants(device)
    cases = []
    for cu, rows, caches, options in ((_ints([0, 2, 5], torch.int32, device), 5, (kc, vc), (None,) * 4),
                                      (None, 2, (kc, vc), (None,) * 4),
                                      (_ints([0, 2, 5], torch.int32, device), 5, (kc8, vc8), variants)):
        plan = llmkern.PagedAttentionPlan(bt, sl, cu, num_heads=4, num_kv_heads=2, head_dim=32, num_blocks=5,
                                          block_size=16, dtype=torch.float32, kv_dtype=caches[0].dtype, num_splits=1)
        q = _randn(rows, 4, 32, device=device, seed=2)
        cases.append(plan._op_args(q, *caches, torch.zeros_like(q), 0.2, None, -1, 0, *options))
    return cases


def _rms_norm(device):
    return [(_randn(3, 64, device=device), _randn(64, device=device, seed=1), 1e-6, 0.0, "llama")]


def _add_rms_norm(device):
    x = _randn(3, 64, device=device)
    return [(x, x.flip(0), _randn(64, device=device, seed=1), 1e-6, 1.0, "gemma")]


def _rope(device):
    q, k = _randn(1, 3, 2, 16, device=device), _randn(1, 3, 2, 16, device=device, seed=1)
    return [(q, k, torch.arange(3, device=device), None, None, 1e4)]


def _linear(device):
    x = _randn(2, 3, 64, device=device)
    return [(x, _randn(40, 64, device=device, seed=1), None), (x[0], _randn(40, 64, device=device, seed=1),
                                                                 _randn(40, device=device, seed=2))]


def _sampling_params(device):
    return (_ints([0.7, 0.0, 1.0], torch.float32, device), _ints([5, 0, 0], torch.int32, device),
            _ints([0.9, 1.0, 0.8], torch.float32, device), _ints([0.0, 0.0, 0.05], torch.float32, device))


def _sample(device):
    return [(_randn(3, 50, device=device), *_sampling_params(device), _ints([1, 2, 3], torch.int64, device))]


def _sampling_probs(device):
    return [(_randn(3, 50, device=device), *_sampling_params(device))]


def _quant_matmul(device):
    qw = llmkern.quantize_weight(_randn(40, 64, seed=3).half(), bits=8, group_size=32).to(device)
    return [(_randn(2, 3, 64, dtype=F16, device=device), qw.qweight, qw.scales, qw.zeros, None, None, 8, 32)]


def _speculative_sample(device):
    q = torch.softmax(_randn(2, 2, 16, device=device), -1)
    p = torch.softmax(_randn(2, 3, 16, device=device, seed=1), -1)
    return [(q, _ints([[3, 5], [0, 15]], torch.int64, device), p, _ints([1, 2], torch.int64, device))]


def _beam_topk(device):
    return [(_randn(4, 16, device=device), _ints([0.0, -1.0, -0.5, -2.0], torch.float32, device), 2, 3)]


def _apply_penalties(device):
    params = [_ints([v, v, v, v], torch.float32, device) for v in (1.3, 0.2, 0.1)]
    history = _ints([[1, 1, -1], [4, 0, 15], [-1, -1, -1], [2, 9, 2]], torch.int64, device)
    return [(_randn(4, 16, device=device), history, *params, _randn(16, device=device, seed=1)),
            (_randn(4, 16, device=device), history, *params, None)]


def _moe_topk(device):
    logits = _randn(5, 16, device=device)
    return [(logits, 2, True, "softmax", 0, 0, None, 1.0),
            (logits, 4, True, "sigmoid", 4, 2, _randn(16, device=device, seed=1), 2.5)]


def _fused_moe(device):
    """8 tokens, hidden 64, intermediate 32, 4 experts, top-2: dense fp16 gate/up, int4 group-32 down."""
    x = _randn(8, 64, dtype=F16, device=device)
    w13 = _randn(4, 64, 64, dtype=F16, device=device, seed=1) / 8
    w2 = llmkern.quantize_experts(_randn(4, 64, 32, dtype=F16, seed=2) / 6, bits=4, group_size=32).to(device)
    w, ids = llmkern.moe_topk(_randn(8, 4, device=device, seed=3), 2)
    return [(x, w13, None, None, None, 16, -1, w2.qweight, w2.scales, w2.zeros, None, 4, 32, w, ids, "silu")]


def _mla(device):
    """A latent cache of 3 blocks of 8 tokens (kv_lora_rank 256, rope_dim 32: MiniCPM3's), sequences of 5 and 12."""
    ckv, kpe = _randn(3, 8, 256, device=device), _randn(3, 8, 32, device=device, seed=1)
    return ckv, kpe, _ints([[2, 0], [0, 1]], torch.int32, device), _ints([5, 12], torch.int32, device)


def _mla_kv_write(device):
    ckv, kpe, _, _ = _mla(device)
    return [(_randn(2, 256, device=device, seed=2), _randn(2, 32, device=device, seed=3), ckv, kpe,
             _ints([3, -1], torch.int64, device))]


def _mla_decode_attention(device):
    ckv, kpe, bt, sl = _mla(device)
    return [(_randn(2, 3, 256, device=device, seed=2), _randn(2, 3, 32, device=device, seed=3), ckv, kpe, bt, sl,
             0.07, 2)]


def _mla_prefill_attention(device):
    ckv, kpe, bt, sl = _mla(device)
    cu = _ints([0, 2, 5], torch.int32, device)
    return [(_randn(5, 3, 256, device=device, seed=2), _randn(5, 3, 32, device=device, seed=3), ckv, kpe, bt, cu, sl,
             True, 0.07)]


# op name -> its argument tuples (schema order); the in-place rope_ takes rope's
CASES = {"attention": _attention, "attention_varlen": _attention_varlen, "paged_kv_write": _paged_kv_write,
         "paged_decode_attention": _paged_decode_attention, "paged_prefill_attention": _paged_prefill_attention,
         "paged_attention": _paged_attention,
         "rms_norm": _rms_norm, "add_rms_norm": _add_rms_norm, "rope": _rope, "rope_": _rope, "linear": _linear, "sample": _sample,
         "sampling_probs": _sampling_probs, "quant_matmul": _quant_matmul, "moe_topk": _moe_topk,
         "fused_moe": _fused_moe, "speculative_sample": _speculative_sample, "beam_topk": _beam_topk,
         "apply_penalties": _apply_penalties, "mla_kv_write": _mla_kv_write,
         "mla_decode_attention": _mla_decode_attention, "mla_prefill_attention": _mla_prefill_attention}


# op name -> (argument position, the inconsistent value from the case's argument, a word of the error): each op's
# `check` refuses a direct call (torch.ops.llmkern.*) whose tensors disagree, before any implementation runs.
BAD_ARGS = {
    "attention": (1, lambda k: k[..., :32], "k"),                         # head_dim 32 vs q's 64
    "attention_varlen": (1, lambda k: k[..., :16], "k"),
    "paged_kv_write": (0, lambda k: k[:, :1], "k"),                       # 1 KV head vs the cache's 2
    "paged_decode_attention": (0, lambda q: q[..., :16], "q"),
    "paged_prefill_attention": (3, lambda bt: bt[:1], "block_tables"),
    "rms_norm": (1, lambda w: w[:8], "weight"),                           # the repro of breaker bug 4
    "add_rms_norm": (1, lambda r: r[:2], "residual"),
    "rope": (1, lambda k: k[:, :2], "k"),
    "rope_": (1, lambda k: k[:, :2], "k"),
    "linear": (2, lambda bias: bias[:8], "bias"),                         # 8 biases for 40 outputs
    "sample": (2, lambda top_k: top_k[:2], "top_k"),
    "sampling_probs": (1, lambda t: t.double(), "temperature"),
    "quant_matmul": (1, lambda qweight: qweight[:4], "qweight"),
    "moe_topk": (0, lambda logits: logits[:, :8], "correction_bias"),     # 8 experts vs the bias's 16
    "fused_moe": (14, lambda ids: ids[:4], "topk_ids"),
    "speculative_sample": (2, lambda p: p[:, :2], "target_probs"),
    "beam_topk": (1, lambda scores: scores[:3], "beam_scores"),
    "apply_penalties": (1, lambda ids: ids[:3], "token_ids"),
    "mla_kv_write": (1, lambda kpe: kpe[:, :16], "kpe"),
    "mla_decode_attention": (1, lambda q_pe: q_pe[:1], "q_pe"),
    "mla_prefill_attention": (5, lambda cu: cu[:2], "cu_seqlens_q"),
}
# Ops without a BAD_ARGS case, and why.
UNCHECKED = {"paged_attention": "a PagedAttentionPlan's run: its sizes and work schedule come from the plan, which "
                                "validated them; a direct call is not supported (its schedule would need a sync)"}


def test_every_op_has_a_bad_args_case():
    """A new op needs a BAD_ARGS case (or a reason in UNCHECKED)."""
    assert sorted(_dispatch.OPS) == sorted({*BAD_ARGS, *UNCHECKED}) and not set(BAD_ARGS) & set(UNCHECKED)


@pytest.mark.cpu_backends("interpreter", "cpp")
@pytest.mark.parametrize("name", sorted(BAD_ARGS))
def test_direct_call_with_inconsistent_arguments_raises(name, device, request):
    """torch.ops.llmkern.<op> called directly with one argument that disagrees with the others raises a
    ValueError/TypeError naming it before any implementation runs (the Triton kernels would read outside the
    caller's tensors), on the Triton path and on the C++ backend's."""
    position, bad, word = BAD_ARGS[name]
    args = list(_clone(CASES[name](device)[-1]))
    args[position] = bad(args[position])
    request.getfixturevalue("no_kernel")    # after building the case (fused_moe's routes with moe_topk)
    with pytest.raises((ValueError, TypeError), match=word):
        _dispatch.OPS[name](*args)


OPCHECKS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")   # all


def _clone(args):
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def test_every_op_is_declared_through_dispatch():
    """torch's registry holds exactly the ops llmkern._dispatch declared (none bypasses the per-device rule)."""
    registered = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("llmkern::")}
    assert registered == set(_dispatch.OPS)


@pytest.mark.cpu_backends("interpreter", "cpp")   # on CPU: also opcheck the C++ implementations
@pytest.mark.parametrize("name", sorted(_dispatch.OPS))
def test_opcheck(name, device):
    """torch.library's own checks: schema, fake vs real, autograd registration, AOT dispatch with dynamic shapes."""
    assert name in CASES, f"llmkern::{name} has no opcheck case: add one to CASES"
    for args in CASES[name](device):
        checks = OPCHECKS
        if any(isinstance(a, torch.Tensor) and a.dtype in _utils.FP8_DTYPES for a in args):
            # SchemaCheckMode compares arguments before and after with torch.allclose, which torch 2.13 cannot run on
            # fp8 CPU tensors ("mul_cpu_reduced_float" not implemented for 'Float8_e4m3fn'); the op's schema is
            # checked by its 16-bit case, the fp8 case runs the other checks.
            checks = tuple(c for c in OPCHECKS if c != "test_schema")
        torch.library.opcheck(_dispatch.OPS[name], _clone(args), test_utils=checks)


@pytest.mark.parametrize("name", sorted(CASES))
def test_cpu_reference_slot_matches_triton(name, device, monkeypatch):
    """The CPU slot without the interpreter and without a C++ kernel (llmkern.reference, through its adapter) returns
    what the Triton implementation returns for the same schema arguments: same structure, shapes, dtypes, values
    (to fp16 rounding), and the same mutation of mutated arguments."""
    for args in CASES[name](device):
        triton_args = _clone(args)
        expected = _dispatch.OPS[name](*triton_args)
        monkeypatch.setattr(_utils, "INTERPRET", False)
        monkeypatch.setattr(cpu, "kernel", lambda op_name: None)
        cpu_args = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in _clone(args))
        got = _dispatch.OPS[name](*cpu_args)
        monkeypatch.undo()
        flat = lambda r: [r] if isinstance(r, torch.Tensor) else list(r or [])  # noqa: E731
        for e, g in zip(flat(expected) + list(triton_args), flat(got) + list(cpu_args)):
            if isinstance(e, torch.Tensor):
                assert g.dtype == e.dtype and g.shape == e.shape
                torch.testing.assert_close(g.float(), e.cpu().float(), rtol=2e-2, atol=2e-2)
        assert len(flat(expected)) == len(flat(got))


def test_cpu_slot_order(monkeypatch):
    """The CPU slot: the Triton implementation under the interpreter, else a C++ kernel, else the reference."""
    triton_impl, reference_impl, cxx = object(), object(), object()
    monkeypatch.setattr(cpu, "kernel", lambda name: cxx if name == "rms_norm" else None)
    monkeypatch.setattr(_utils, "INTERPRET", True)
    assert _dispatch.cpu_implementation("rms_norm", triton_impl, reference_impl) is triton_impl
    monkeypatch.setattr(_utils, "INTERPRET", False)
    assert _dispatch.cpu_implementation("rms_norm", triton_impl, reference_impl) is cxx
    assert _dispatch.cpu_implementation("rope", triton_impl, reference_impl) is reference_impl


def test_cpu_backend_gets_schema_arguments_after_checks(monkeypatch):
    """A C++ kernel receives exactly the op's schema arguments and its result is the op's; the op's checks run
    before it (a cache that overlaps itself never reaches it)."""
    calls = []

    def fake_kernel(*args):
        calls.append(args)
        k_cache = args[2]
        k_cache.fill_(7.0)   # a visible effect of this implementation

    monkeypatch.setattr(_utils, "INTERPRET", False)
    monkeypatch.setattr(cpu, "kernel", lambda name: fake_kernel if name == "paged_kv_write" else None)
    k, _, kc, vc, slots, _, _ = _paged_kv_write("cpu")[0]
    llmkern.paged_kv_write(k, k, kc, vc, slots)
    assert len(calls) == 1 and len(calls[0]) == 7
    assert calls[0][4].data_ptr() == slots.data_ptr() and calls[0][2].data_ptr() == kc.data_ptr()
    assert bool((kc == 7.0).all())
    with pytest.raises(ValueError, match="k_cache is written in place"):
        llmkern.paged_kv_write(k, k, kc[:1].expand(kc.shape), vc, slots)
    assert len(calls) == 1


def _fake_outputs(op, args) -> list:
    """The op's outputs under a FakeTensorMode: the shapes, dtypes and strides its register_fake promises."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        out = op(*fake_args)
    return [out] if isinstance(out, torch.Tensor) else list(out or [])


@pytest.mark.parametrize("name,slot", [(n, "reference") for n in sorted(CASES)] +
                         [(n, "cpp") for n in sorted(CASES) if n in cpu.implemented()])
def test_cpu_slot_returns_the_fake_layout(name, slot, monkeypatch):
    """Each CPU implementation (the reference adapter, the C++ kernel) returns outputs of the shape, dtype and
    significant strides the op's fake implementation promises: torch.compile plans its graph with the fake's layout,
    and a real output laid out otherwise (e.g. a column slice of a wider tensor) is a silent mismatch there."""
    from torch._prims_common import check_significant_strides
    if slot == "cpp":
        from conftest import use_cpp_backend
        use_cpp_backend(monkeypatch)
    else:
        monkeypatch.setattr(_utils, "INTERPRET", False)
        monkeypatch.setattr(cpu, "kernel", lambda op_name: None)
    op = _dispatch.OPS[name]
    for args in CASES[name]("cpu"):
        want = _fake_outputs(op, _clone(args))
        got = op(*_clone(args))
        got = [got] if isinstance(got, torch.Tensor) else list(got or [])
        assert len(got) == len(want)
        for i, (g, w) in enumerate(zip(got, want)):
            assert (g.shape, g.dtype) == (w.shape, w.dtype), f"output {i}"
            same, dim = check_significant_strides(g, w, only_cuda=False)
            assert same, f"output {i}: strides {g.stride()} where the fake promises {w.stride()} (dim {dim})"


@pytest.mark.parametrize("backend_env", ["default", "reference"])
def test_backward_raises(monkeypatch, backend_env):
    """The ops are inference-only: with grad on, backward through an op's output raises a RuntimeError naming it
    (on every CPU backend), instead of torch's fallback that warns and leaves the parameters without gradients;
    under no_grad the outputs need no grad."""
    if backend_env == "reference":
        monkeypatch.setenv(cpu.BACKEND_ENV, "reference")
    lin = torch.nn.Linear(32, 32)
    y = llmkern.rms_norm(lin(torch.randn(4, 32)), torch.ones(32), 1e-6)
    with pytest.raises(RuntimeError, match="llmkern::rms_norm has no backward"):
        y.pow(2).sum().backward()
    assert lin.weight.grad is None
    q, k, v = (torch.randn(1, 4, 2, 32, requires_grad=True) for _ in range(3))
    out, lse = llmkern.attention(q, k, v, causal=True, return_lse=True)
    with pytest.raises(RuntimeError, match="llmkern::attention has no backward"):
        (out.sum() + lse.sum()).backward()
    with torch.no_grad():
        assert not llmkern.attention(q, k, v, causal=True).requires_grad
