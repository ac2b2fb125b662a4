"""llmkern.PagedAttentionPlan: one plan per step, one run per layer, mixed prefill + decode batches in one launch.

Numbers: mixed batches (decode tokens next to prompt chunks over cached prefixes, a prompt with no prefix, a
sequence with no new token) against the float64 reference with FlashAttention's tolerance rule, and against each
sequence run alone (bit for bit where both runs use the same tiles). The hot path: `plan.run` and `paged_kv_write`
inside the `no_host_sync` fixture (tests/conftest.py), with no allocation when out is given, and inside
torch.compile(fullgraph=True). Bad input: inconsistent tables raise ValueError at plan time (update changes nothing
then), and a run whose tensors do not match the plan raises before any launch.
"""
import contextlib

import pytest
import torch

import llmkern
from llmkern import _utils
from llmkern import paged_attention as pa
from llmkern import reference as ref
from test_paged_attention import _make
from tolerance import assert_fa_close

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.cpu_backends("interpreter", "cpp")]   # on CPU: the Triton interpreter and the C++ backend


def _cu(q_lens, device):
    return torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _plan(bt, sl, cu, kc, num_heads, **kw):
    """A plan for caches like kc; keywords override its arguments."""
    num_blocks, block_size, num_kv_heads, head_dim = kc.shape
    args = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, num_blocks=num_blocks,
                block_size=block_size, dtype=kc.dtype)
    return llmkern.PagedAttentionPlan(bt, sl, cu, **{**args, **kw})


def _reference(q, kc, vc, bt, cu, sl, **kw):
    """(float64 ground truth, PyTorch in the input dtype), causal."""
    return (ref.paged_prefill_attention(q.double(), kc.double(), vc.double(), bt, cu, sl, **kw),
            ref.paged_prefill_attention(q, kc, vc, bt, cu, sl, compute_dtype=q.dtype, **kw))


# A mixed step: a decode token over 100 keys (three splits of 64 keys: the last one empty), a whole prompt of 40 with no
# prefix, a sequence with no new token, a first decode token (one key: two of its three splits empty), and a chunk of
# 21 that straddles blocks over a cached prefix of 13.
MIXED_Q = [1, 40, 0, 1, 21]
MIXED_LEN = [100, 40, 12, 1, 34]


@pytest.mark.parametrize("num_heads,num_kv_heads,dtype,kw", [
    (2, 2, torch.float16, {}),
    (8, 2, torch.bfloat16, dict(window=(20, -1))),
    (8, 1, torch.float16, dict(softcap=3.0)),
    (4, 1, torch.float32, dict(window=(9, -1), softcap=5.0)),
], ids=["mha", "gqa4-window", "gqa8-mqa-softcap", "mqa-window-softcap-fp32"])
def test_mixed_batch(device, num_heads, num_kv_heads, dtype, kw):
    """One launch for the whole step, against the float64 reference and against each sequence alone."""
    kc, vc, bt, sl, g = _make(device, seq_lens=MIXED_LEN, num_heads=num_heads, num_kv_heads=num_kv_heads,
                              head_dim=64, block_size=16, dtype=dtype, seed=21)
    cu = _cu(MIXED_Q, device)
    q = (2 * torch.randn(sum(MIXED_Q), num_heads, 64, generator=g)).to(dtype).to(device)
    plan = _plan(bt, sl, cu, kc, num_heads, num_splits=3)
    out = plan.run(q, kc, vc, **kw)
    assert out.shape == q.shape and out.dtype == dtype
    assert_fa_close(out, *_reference(q, kc, vc, bt, cu, sl, causal=True, **kw))
    bounds = cu.tolist()
    for b, n in enumerate(MIXED_Q):
        if n == 0:
            continue
        alone = _plan(bt[b:b + 1], sl[b:b + 1], _cu([n], device), kc, num_heads, num_splits=3)
        rows = slice(bounds[b], bounds[b + 1])
        got = alone.run(q[rows], kc, vc, **kw)
        if n > 1:   # prefill tiles in both runs, tiles within the sequence: the same arithmetic, bit for bit
            assert torch.equal(got, out[rows]), f"sequence {b} alone differs from its rows in the batch"
        else:       # alone it runs on decode tiles (other key tiles): equal up to rounding
            torch.testing.assert_close(got, out[rows], rtol=2e-2, atol=2e-2)


def test_decode_step_auto_splits_and_mixed_noncausal(device, monkeypatch):
    """A decode step whose long sequences the plan splits on its own (from the SM count and a minimum of keys per
    split, lowered here from 256 to 16 so that short sequences split), and a non-causal mixed step with a two-sided
    window (the one-shot prefill's path)."""
    monkeypatch.setattr(pa, "_MIN_TOKENS_PER_SPLIT", 16)
    lens = [70, 5, 40]
    kc, vc, bt, sl, g = _make(device, seq_lens=lens, num_heads=8, num_kv_heads=2, head_dim=64, block_size=16,
                              dtype=torch.float16, seed=22)
    q = torch.randn(3, 8, 64, generator=g).half().to(device)
    plan = _plan(bt, sl, None, kc, 8)
    assert plan._grid_reduce == 2 and plan._grid_items == 6   # 70 in 3 splits, 40 in 2 (6 programs < 2 x 8 SMs)
    cu = _cu([1, 1, 1], device)
    assert_fa_close(plan.run(q, kc, vc), *_reference(q, kc, vc, bt, cu, sl, causal=True))
    q_lens = [3, 1, 20]
    cu = _cu(q_lens, device)
    q = torch.randn(24, 8, 64, generator=g).half().to(device)
    plan = _plan(bt, sl, cu, kc, 8)
    assert_fa_close(plan.run(q, kc, vc, causal=False, window=(6, 4)),
                    *_reference(q, kc, vc, bt, cu, sl, causal=False, window=(6, 4)))


def test_one_plan_for_every_layer_and_update_in_place(device):
    """A plan serves several layers (other caches, other windows); update plans the next step into the same
    buffers, and slot_mapping gives the cache slots PagedKVCache.append reserved."""
    torch.manual_seed(23)
    cache = llmkern.PagedKVCache(2, 12, 8, 2, 32, dtype=torch.float32, device=device)
    steps = [{"a": 11, "b": 3}, {"a": 1, "b": 1, "c": 6}]   # a prefill step, then a mixed step with a new prompt
    plan = None
    for step in steps:
        ids = list(step)
        slots = torch.cat([cache.append(s, n) for s, n in step.items()])
        bt, sl, cu = cache.block_tables(ids), cache.seq_lens(ids), _cu(list(step.values()), device)
        if plan is None:
            plan = llmkern.PagedAttentionPlan(bt, sl, cu, num_heads=4, num_kv_heads=2, head_dim=32,
                                              num_blocks=12, block_size=8, dtype=torch.float32, max_batch_size=4,
                                              max_num_tokens=16, max_blocks_per_seq=4)
            buffers = [t.data_ptr() for t in (plan._data, plan._slots, plan._part_o, plan._part_lse)]
        else:
            plan.update(bt, sl, cu)
            assert [t.data_ptr() for t in (plan._data, plan._slots, plan._part_o, plan._part_lse)] == buffers
        assert torch.equal(plan.slot_mapping, slots)
        total = int(cu[-1])
        for layer, window in ((0, (-1, -1)), (1, (2, -1))):
            k, v, q = (torch.randn(total, h, 32, device=device) for h in (2, 2, 4))
            llmkern.paged_kv_write(k, v, cache.k_cache(layer), cache.v_cache(layer), plan.slot_mapping)
            out = plan.run(q, cache.k_cache(layer), cache.v_cache(layer), window=window)
            want = llmkern.paged_prefill_attention(q, cache.k_cache(layer), cache.v_cache(layer), bt, cu, sl,
                                                   window=window)
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_empty_step(device):
    """A step with no sequences (batch 0) plans with the default capacities and runs as a no-op; the plan then
    takes a real step."""
    kc = torch.randn(4, 8, 2, 32, device=device)
    plan = _plan(torch.zeros(0, 2, dtype=torch.int32, device=device), torch.zeros(0, dtype=torch.int32,
                 device=device), None, kc, 4)
    assert plan.batch_size == 0 and plan.run(torch.randn(0, 4, 32, device=device), kc, kc).shape == (0, 4, 32)
    bt, sl = torch.tensor([[1, 2]], dtype=torch.int32, device=device), torch.tensor([9], dtype=torch.int32,
                                                                                   device=device)
    plan.update(bt, sl)
    q = torch.randn(1, 4, 32, device=device)
    torch.testing.assert_close(plan.run(q, kc, kc), llmkern.paged_prefill_attention(
        q, kc, kc, bt, _cu([1], device), sl), rtol=1e-5, atol=1e-6)


def test_run_and_kv_write_without_host_sync(device, no_host_sync):
    """plan.run (decode with split-KV and its merge; a mixed step) and paged_kv_write read no value on the host,
    query no device property, and, with out given, allocate nothing."""
    lens = [90, 40, 9]
    kc, vc, bt, sl, g = _make(device, seq_lens=lens, num_heads=8, num_kv_heads=2, head_dim=64, block_size=16,
                              dtype=torch.float16, seed=24)
    for cu, rows in ((None, 3), (_cu([1, 7, 2], device), 10)):
        plan = _plan(bt, sl, cu, kc, 8, num_splits=None if cu is not None else 4)
        q = torch.randn(rows, 8, 64, generator=g).half().to(device)
        k = torch.randn(rows, 2, 64, generator=g).half().to(device)
        out = torch.empty_like(q)
        kc_want, vc_want = kc.clone(), vc.clone()
        ref.paged_kv_write(k, k, kc_want, vc_want, plan.slot_mapping)
        with no_host_sync(), pytest.MonkeyPatch.context() as m:
            m.setattr(_utils, "num_sms", lambda *a: pytest.fail("a device-property query in plan.run"))
            llmkern.paged_kv_write(k, k, kc, vc, plan.slot_mapping)
            with _no_allocation():
                got = plan.run(q, kc, vc, out=out)
        assert got is out and torch.equal(kc, kc_want) and torch.equal(vc, vc_want)
        expected = llmkern.paged_prefill_attention(q, kc, vc, bt, _cu([1, 1, 1], device) if cu is None else cu, sl)
        torch.testing.assert_close(out, expected, rtol=2e-3, atol=2e-3)


@contextlib.contextmanager
def _no_allocation():
    """Fails when host code allocates a tensor through torch's factory functions; kernel launches are exempt (the
    interpreter standing in for the GPU allocates), and the C++ kernels allocate through none of them."""
    launching = []
    with pytest.MonkeyPatch.context() as m:
        for name in ("empty", "zeros", "ones", "full", "empty_like", "zeros_like", "full_like", "empty_strided"):
            def guarded(*a, _name=name, _original=getattr(torch, name), **k):
                if not launching:
                    raise AssertionError(f"plan.run allocated a tensor (torch.{_name})")
                return _original(*a, **k)
            m.setattr(torch, name, guarded)
        launch = _utils.launch

        def exempt(*a, **k):
            launching.append(1)
            try:
                return launch(*a, **k)
            finally:
                launching.pop()
        m.setattr(_utils, "launch", exempt)
        yield


@pytest.mark.cpu_backends("interpreter")
def test_no_host_sync_fixture_catches_transfers(no_host_sync):
    """The fixture itself: each kind of device-to-host transfer fails inside it and works outside."""
    t = torch.tensor([1.0, 0.0, 2.0])
    calls = {
        "item": lambda: t[0].item(), "tolist": lambda: t.tolist(), "cpu": lambda: t.cpu(), "numpy": lambda: t.numpy(),
        "bool": lambda: bool(t[0]), "if": lambda: 1 if t[0] else 0, "int": lambda: int(t[0]),
        "float": lambda: float(t[0]), "index": lambda: [0, 1, 2][t.long()[2]], "repr": lambda: repr(t),
        "nonzero": lambda: t.nonzero(), "torch.nonzero": lambda: torch.nonzero(t), "mask": lambda: t[t > 0],
        "mask assign": lambda: t.clone().__setitem__(t > 0, 0.0), "masked_select": lambda: t.masked_select(t > 0),
        "unique": lambda: torch.unique(t), "equal": lambda: torch.equal(t, t), "to cpu": lambda: t.to("cpu"),
        "repeat_interleave": lambda: t.repeat_interleave(torch.tensor([1, 2, 0])),
        "synchronize": lambda: torch.cuda.synchronize(),
    }
    for name, call in calls.items():
        with no_host_sync():
            with pytest.raises(AssertionError, match="host sync"):
                call()
        if name != "synchronize":
            call()
    with no_host_sync():   # what a hot path does do: views, shapes, async work
        t[1:].add_(1.0)
        t.repeat_interleave(2)
        assert t.shape[0] == 3 and t.to(torch.float64).dtype == torch.float64


@pytest.mark.cpu_backends("interpreter")   # the op's registration is the same for every backend
def test_run_inside_torch_compile_fullgraph(device):
    """The plan's tensors are inputs of the compiled graph: a fullgraph compile of a layer step (cache write, then
    attention) gives eager's numbers and cache."""
    kc, vc, bt, sl, g = _make(device, seq_lens=[9, 33], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                              dtype=torch.float16, seed=25)
    plan = _plan(bt, sl, _cu([2, 5], device), kc, 4)
    q = torch.randn(7, 4, 64, generator=g).half().to(device)
    k = torch.randn(7, 2, 64, generator=g).half().to(device)

    def layer(q, k, kc, vc):
        llmkern.paged_kv_write(k, k, kc, vc, plan.slot_mapping)
        return plan.run(q, kc, vc, softcap=10.0, window=(6, -1))

    kc2, vc2 = kc.clone(), vc.clone()
    expected = layer(q, k, kc2, vc2)
    out = torch.compile(layer, fullgraph=True)(q, k, kc, vc)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    assert torch.equal(out, expected)


def _decode_reference(q, kc, vc, bt, sl):
    """PyTorch's decode attention in fp32 (returned in q's dtype)."""
    return ref.paged_decode_attention(q, kc, vc, bt, sl, compute_dtype=torch.float32)


def test_cuda_graph_plan_fixed_sizes(device):
    """cuda_graph=True: the launch sizes cover the capacities, q and out have max_num_tokens rows (padding rows
    untouched), slot_mapping pads with -1, and update keeps the buffers; on CUDA, a captured run replays the next
    step exactly as eager runs it."""
    kc, vc, bt, sl, g = _make(device, seq_lens=[40, 7, 150, 16], num_heads=8, num_kv_heads=2, head_dim=64,
                              block_size=16, dtype=torch.float16, seed=26)
    plan = _plan(bt[:2], sl[:2], None, kc, 8, cuda_graph=True, max_batch_size=4, max_num_tokens=4,
                 max_blocks_per_seq=bt.shape[1], num_splits=2)
    q = torch.randn(4, 8, 64, generator=g).half().to(device)
    out = torch.full_like(q, 7.0)
    assert plan.slot_mapping.shape == (4,) and plan.slot_mapping[2:].eq(-1).all()
    plan.run(q, kc, vc, out=out)
    torch.testing.assert_close(out[:2], _decode_reference(q[:2], kc, vc, bt[:2], sl[:2]), rtol=2e-3, atol=2e-3)
    assert out[2:].eq(7.0).all()
    with pytest.raises(ValueError, match="decode tiles"):
        plan.update(bt, sl, _cu([1, 2, 1, 0], device))
    if device == "cuda":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            plan.run(q, kc, vc, out=out)
    plan.update(bt, sl)
    if device == "cuda":
        graph.replay()
    else:
        plan.run(q, kc, vc, out=out)
    torch.testing.assert_close(out, _decode_reference(q, kc, vc, bt, sl), rtol=2e-3, atol=2e-3)
    eager = plan.run(q, kc, vc)
    assert torch.equal(out, eager)


# ------------------------------------------------------------------------------------------------------ bad input
@pytest.mark.cpu_backends("interpreter")   # refused before any backend runs
def test_inconsistent_tables_raise_at_plan_time(device, no_kernel):
    kc, vc, bt, sl, g = _make(device, seq_lens=[20, 5], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                              dtype=torch.float16, extra_blocks=0)
    nb = kc.shape[0]
    cu = _cu([3, 2], device)
    ints = lambda v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
    cases = [
        (ValueError, "seq_lens must be >= 0", dict(seq_lens=ints([20, -1]), cu_seqlens_q=ints([0, 3, 3]))),
        (ValueError, "seq_lens must be >= 1", dict(seq_lens=ints([20, 0]), cu_seqlens_q=None)),
        (ValueError, "does not fit", dict(seq_lens=ints([20, 33]))),
        (ValueError, "block_tables: entries", dict(block_tables=torch.where(bt == bt[0, 1], nb, bt))),
        (ValueError, "block_tables: entries", dict(block_tables=torch.where(bt == bt[1, 0], -1, bt))),
        (ValueError, "shorter than", dict(cu_seqlens_q=ints([0, 3, 9]))),
        (ValueError, "start at 0", dict(cu_seqlens_q=ints([1, 3, 5]))),
        (ValueError, "non-decreasing", dict(cu_seqlens_q=ints([0, 3, 2]))),
        (ValueError, "batch \\+ 1", dict(cu_seqlens_q=cu[:2])),
        (ValueError, "one row per sequence", dict(seq_lens=sl[:1], cu_seqlens_q=cu[:2])),
        (TypeError, "block_tables", dict(block_tables=bt.long())),
        (TypeError, "seq_lens", dict(seq_lens=sl.float())),
        (TypeError, "cu_seqlens_q", dict(cu_seqlens_q=cu.long())),
        (ValueError, "max_batch_size", dict(max_batch_size=1)),
        (ValueError, "max_num_tokens", dict(max_num_tokens=4)),
        (ValueError, "max_blocks_per_seq", dict(max_blocks_per_seq=1)),
        (ValueError, "multiple of num_kv_heads", dict(num_heads=3)),
        (ValueError, "head_dim", dict(head_dim=20)),
        (ValueError, "num_splits", dict(num_splits=0)),
        (TypeError, "dtype", dict(dtype=torch.int8)),
    ]
    for exc, msg, change in cases:
        args = dict(block_tables=bt, seq_lens=sl, cu_seqlens_q=cu, num_heads=4)
        args.update(change)
        with pytest.raises(exc, match=msg):
            _plan(args.pop("block_tables"), args.pop("seq_lens"), args.pop("cu_seqlens_q"), kc,
                  args.pop("num_heads"), **args)

    plan = _plan(bt, sl, cu, kc, 4, max_num_tokens=6)
    before = plan._data.clone(), plan._slots.clone(), plan.num_tokens
    with pytest.raises(ValueError, match="block_tables: entries"):
        plan.update(torch.where(bt == bt[0, 0], nb + 3, bt), sl, cu)
    with pytest.raises(ValueError, match="capacity"):
        plan.update(bt, sl, _cu([3, 4], device))
    assert torch.equal(plan._data, before[0]) and torch.equal(plan._slots, before[1]) and plan.num_tokens == 5


@pytest.mark.cpu_backends("interpreter")   # refused before any backend runs
def test_run_with_tensors_that_do_not_match_the_plan(device, no_kernel):
    kc, vc, bt, sl, g = _make(device, seq_lens=[20, 5], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                              dtype=torch.float16)
    plan = _plan(bt, sl, _cu([3, 2], device), kc, 4)
    q = torch.randn(5, 4, 64, generator=g).half().to(device)
    qbuf = torch.randn(6, 4, 64, generator=g).half().to(device)
    cases = [
        (ValueError, "q must have shape", dict(q=q[:4])),
        (ValueError, "q must have shape", dict(q=q[:, :2])),
        (TypeError, "q has dtype", dict(q=q.float())),
        (TypeError, "q must be a torch.Tensor", dict(q=q.tolist())),
        (ValueError, "k_cache must have shape", dict(k_cache=kc[:-1])),
        (TypeError, "v_cache has dtype", dict(v_cache=vc.float())),
        (ValueError, "out must have shape", dict(out=q[:4].clone())),
        (TypeError, "out has dtype", dict(out=q.float())),
        (ValueError, "out is written in place", dict(out=q[:1].expand(q.shape))),
        # out inside a cache the run reads: its stores would change the keys/values later tiles load
        (ValueError, "v_cache is read while out is written", dict(out=vc.view(-1, 4, 64)[3:8])),
        (ValueError, "k_cache is read while out is written", dict(out=kc.view(-1, 4, 64)[:5])),
        # out one row off q in one buffer: stores into q rows another program has yet to load (a silent wrong
        # answer on both CPU backends before this was refused); sinks inside out: read while out is written
        (ValueError, "q is read while out is written", dict(q=qbuf[1:], out=qbuf[:5])),
        (ValueError, "sinks is read while out is written",
         dict(out=qbuf[:5], sinks=qbuf[4].reshape(-1).view(torch.float32)[:4])),
        (ValueError, "scale", dict(scale=float("nan"))),
        (ValueError, "softcap", dict(softcap=-1.0)),
        (ValueError, "window", dict(window=(-3, 0))),
        (TypeError, "causal", dict(causal=1)),
    ]
    for exc, msg, change in cases:
        args = dict(q=q, k_cache=kc, v_cache=vc)
        args.update(change)
        with pytest.raises(exc, match=msg):
            plan.run(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"), **args)
