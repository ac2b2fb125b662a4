"""Mixture of Experts: `llmkern.moe_topk` and `llmkern.fused_moe` against the float64 references.

Shapes are small (the interpreter runs every program in Python) but cross every tile edge: 37 tokens (not a multiple
of the 16-row tile), hidden 96 and intermediate 80 (not multiples of the 64-wide K and N tiles). torch.compile with
fullgraph=True over both ops is tested on a patched model (tests/test_patch_moe.py).

On CPU every test runs on the Triton interpreter and on the C++ backend (csrc/moe.cpp, dense and packed experts); the
cpp runs of test_fused_moe_cpp_matrix and the quantized tests check that the C++ kernel ran (cpp_calls).
"""
import pytest
import torch

import llmkern
from llmkern import moe, reference
from tolerance import assert_fa_close

pytestmark = pytest.mark.cpu_backends("interpreter", "cpp")

T, H, I, E = 37, 96, 80, 8


def _randn(*shape, dtype=torch.float32, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)


def _experts(dtype, device, num_experts=E, hidden=H, inter=I, seed=1):
    # 1/sqrt(fan_in) weights keep every activation near unit scale, so the tolerance floors mean what they say
    w13 = _randn(num_experts, 2 * inter, hidden, dtype=dtype, device=device, seed=seed, scale=hidden ** -0.5)
    w2 = _randn(num_experts, hidden, inter, dtype=dtype, device=device, seed=seed + 1, scale=inter ** -0.5)
    return w13, w2


def _check_moe(out, x, w13, w2, weights, ids, what="fused_moe"):
    """FlashAttention's rule: our error against float64 at most twice PyTorch's own in the input dtype."""
    ref64 = reference.fused_moe(x.double(), w13.double(), w2.double(), weights.double(), ids)
    lowp = reference.fused_moe(x, w13, w2, weights, ids, compute_dtype=x.dtype)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert_fa_close(out.cpu(), ref64.cpu(), lowp.cpu(), what=what)


# ------------------------------------------------------------------------------------------------------ moe_topk
@pytest.mark.parametrize("num_experts,top_k,renormalize,dtype", [
    (8, 2, True, torch.bfloat16),     # Mixtral
    (60, 4, False, torch.float32),    # Qwen1.5-MoE: 60 experts (not a power of two), no renormalization
    (128, 8, True, torch.float16),    # Qwen3-30B-A3B
])
def test_topk_softmax_matches_reference(device, num_experts, top_k, renormalize, dtype):
    logits = _randn(T, num_experts, dtype=dtype, device=device, seed=num_experts)
    w, ids = llmkern.moe_topk(logits, top_k, renormalize=renormalize)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32 and w.shape == ids.shape == (T, top_k)
    ref_w, ref_ids = reference.moe_topk(logits.double(), top_k, renormalize=renormalize)
    assert torch.equal(ids.cpu().long(), ref_ids.cpu())
    # the chosen logits are exactly torch.topk's values (the selection does not depend on exp's rounding)
    assert torch.equal(logits.gather(1, ids.long()), torch.topk(logits, top_k, dim=1).values)
    ref32_w, _ = reference.moe_topk(logits.float(), top_k, renormalize=renormalize)
    assert_fa_close(w.cpu(), ref_w.cpu(), ref32_w.cpu(), what="topk weights")


def test_topk_deepseek_v3_matches_transformers(device):
    """sigmoid scores, correction bias, 8 groups with 4 kept, routed scale: transformers' DeepseekV3TopkRouter."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    cfg = transformers.DeepseekV3Config(hidden_size=32, n_routed_experts=64, num_experts_per_tok=8, n_group=8,
                                        topk_group=4, norm_topk_prob=True, routed_scaling_factor=2.5)
    router = DeepseekV3TopkRouter(cfg)
    with torch.no_grad():
        router.weight.copy_(_randn(64, 32, seed=3))
        router.e_score_correction_bias.copy_(_randn(64, seed=4, scale=0.1))
        hidden = _randn(T, 32, seed=5)
        logits, hf_w, hf_ids = router(hidden)
    # a column-major (transposed) view: the strides are honoured
    strided = logits.t().contiguous().t().to(device)
    w, ids = llmkern.moe_topk(strided, 8, scoring="sigmoid", num_expert_group=8, topk_group=4,
                              correction_bias=router.e_score_correction_bias.to(device), routed_scaling_factor=2.5)
    # transformers returns its choice unsorted (topk sorted=False): compare as sets, weights in id order
    ours, theirs = torch.sort(ids.cpu().long(), dim=1), torch.sort(hf_ids, dim=1)
    assert torch.equal(ours.values, theirs.values)
    torch.testing.assert_close(w.cpu().gather(1, ours.indices), hf_w.gather(1, theirs.indices), rtol=1e-6,
                               atol=1e-6)
    ref_w, ref_ids = reference.moe_topk(logits.double(), 8, scoring="sigmoid", num_expert_group=8, topk_group=4,
                                        correction_bias=router.e_score_correction_bias, routed_scaling_factor=2.5)
    assert torch.equal(ids.cpu().long(), ref_ids)


def test_topk_grouped_softmax_matches_reference(device):
    """DeepSeek-V2's group-limited greedy: softmax scores, a group ranks by its best expert."""
    logits = _randn(T, 16, device=device, seed=6)
    w, ids = llmkern.moe_topk(logits, 3, renormalize=False, num_expert_group=4, topk_group=2)
    ref_w, ref_ids = reference.moe_topk(logits.double(), 3, renormalize=False, num_expert_group=4, topk_group=2)
    assert torch.equal(ids.cpu().long(), ref_ids.cpu())
    torch.testing.assert_close(w.cpu().double(), ref_w.cpu(), rtol=1e-6, atol=1e-7)


def test_topk_ties_edge_cases(device):
    """Ties go to the lower expert index (torch.topk's own tie order is unspecified); one token; top_k = E; NaN."""
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0, 3.0, 3.0]], device=device)
    _, ids = llmkern.moe_topk(logits, 3)
    assert ids.tolist() == [[1, 2, 4]]                                # torch.topk on CPU gives [4, 7, 6]
    many = torch.randint(0, 3, (T, 16), generator=torch.Generator().manual_seed(7)).float().to(device)
    w, ids = llmkern.moe_topk(many, 5)
    _, ref_ids = reference.moe_topk(many, 5)
    assert torch.equal(ids.cpu().long(), ref_ids.cpu())
    assert torch.equal(many.gather(1, ids.long()), torch.topk(many, 5, dim=1).values)
    # top_k = E: every expert, best first, weights the full softmax
    w, ids = llmkern.moe_topk(many[:1], 16, renormalize=False)
    assert sorted(ids[0].tolist()) == list(range(16))
    torch.testing.assert_close(w[0].sum().cpu(), torch.tensor(1.0), rtol=1e-6, atol=1e-6)
    # NaN: ids stay in range, weights show it
    bad = many[:2].clone()
    bad[0, 3] = float("nan")
    w, ids = llmkern.moe_topk(bad, 2)
    assert bool(((ids >= 0) & (ids < 16)).all()) and bool(torch.isnan(w[0]).all()) and not torch.isnan(w[1]).any()


def test_topk_bad_input(device):
    logits = _randn(4, 8, device=device)
    cases = [
        (dict(router_logits=logits[0], top_k=2), ValueError, "router_logits"),
        (dict(router_logits=logits.long(), top_k=2), TypeError, "router_logits"),
        (dict(router_logits=logits, top_k=0), ValueError, "top_k"),
        (dict(router_logits=logits, top_k=9), ValueError, "top_k"),
        (dict(router_logits=logits, top_k=True), ValueError, "top_k"),
        (dict(router_logits=logits, top_k=2, scoring="relu"), ValueError, "scoring"),
        (dict(router_logits=logits, top_k=2, renormalize=1), TypeError, "renormalize"),
        (dict(router_logits=logits, top_k=2, num_expert_group=3, topk_group=1), ValueError, "num_expert_group"),
        (dict(router_logits=logits, top_k=2, num_expert_group=4), ValueError, "topk_group"),
        (dict(router_logits=logits, top_k=2, num_expert_group=4, topk_group=5), ValueError, "topk_group"),
        (dict(router_logits=logits, top_k=5, num_expert_group=4, topk_group=2), ValueError, "top_k"),
        (dict(router_logits=logits, top_k=2, correction_bias=torch.zeros(8, device=device)), ValueError, "sigmoid"),
        (dict(router_logits=logits, top_k=2, scoring="sigmoid", correction_bias=torch.zeros(7, device=device)),
         ValueError, "correction_bias"),
        (dict(router_logits=logits, top_k=2, routed_scaling_factor=float("inf")), ValueError, "routed_scaling"),
        (dict(router_logits=logits, top_k=2, routed_scaling_factor="2.5"), TypeError, "routed_scaling"),
        (dict(router_logits=_randn(2, 1025, device=device), top_k=2), ValueError, "1024"),
    ]
    for kwargs, err, match in cases:
        with pytest.raises(err, match=match):
            llmkern.moe_topk(**kwargs)


# ----------------------------------------------------------------------------------------------------- fused_moe
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])   # fp16: the edge-case and quantized tests
def test_fused_moe_matches_float64(device, dtype):
    x = _randn(T, H, dtype=dtype, device=device, seed=8)
    w13, w2 = _experts(dtype, device)
    weights, ids = llmkern.moe_topk(_randn(T, E, device=device, seed=9), 2)
    _check_moe(llmkern.fused_moe(x, w13, w2, weights, ids), x, w13, w2, weights, ids)


def test_fused_moe_routing_edge_cases(device):
    """All tokens on one expert; unpicked experts (NaN weights there must never be read); top_k = E; one token;
    no token; ids outside [0, E) skipped; int64 ids; bf16 routing weights."""
    dtype, t = torch.float16, 13
    x = _randn(t, H, dtype=dtype, device=device, seed=10)
    w13, w2 = _experts(dtype, device)
    poisoned13, poisoned2 = w13.clone(), w2.clone()
    poisoned13[[0, 2, 5, 6, 7]] = float("nan")
    poisoned2[[0, 2, 5, 6, 7]] = float("nan")
    ones = torch.ones(t, 1, device=device)
    ids = torch.full((t, 1), 3, dtype=torch.int32, device=device)          # everyone on expert 3
    _check_moe(llmkern.fused_moe(x, poisoned13, poisoned2, ones, ids), x, w13, w2, ones, ids, what="one expert")
    two = torch.stack([torch.full((t,), 1), torch.arange(t) % 2 * 3 + 1], 1).to(device=device, dtype=torch.int64)
    w = torch.rand(t, 2, generator=torch.Generator().manual_seed(11)).to(device=device, dtype=torch.bfloat16)
    _check_moe(llmkern.fused_moe(x, poisoned13, poisoned2, w, two), x, w13, w2, w, two, what="experts 1 and 4 only")
    weights, ids = llmkern.moe_topk(_randn(t, E, device=device, seed=12), E)   # top_k = E
    _check_moe(llmkern.fused_moe(x, w13, w2, weights, ids), x, w13, w2, weights, ids, what="top_k = E")
    _check_moe(llmkern.fused_moe(x[:1], w13, w2, weights[:1], ids[:1]), x[:1], w13, w2, weights[:1], ids[:1],
               what="one token")
    assert llmkern.fused_moe(x[:0], w13, w2, weights[:0], ids[:0]).shape == (0, H)
    sentinel = ids[:, :3].clone().long()
    sentinel[::3, 0] = E                                   # transformers' "not on this rank"
    sentinel[1::5, 1] = -1
    sentinel[2, 2] = 2 ** 40                               # would be expert 0 if the int64 were wrapped to int32
    _check_moe(llmkern.fused_moe(x, w13, w2, weights[:, :3], sentinel), x, w13, w2, weights[:, :3], sentinel,
               what="ids outside [0, E)")


@pytest.mark.cpu_backends("cpp")   # the interpreter's Triton path has its own tests above; this is the C++ kernel's
@pytest.mark.parametrize("top_k", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_moe_cpp_matrix(device, backend, cpp_calls, dtype, top_k):
    """Every dtype and top_k 1..4 at 0, 1, 7 and 40 tokens (40 * top_k slots over 6 experts: many slots per
    expert); hidden 100 and intermediate 37 (not multiples of the vector width or the 4-row tile); experts 6 and 7
    picked by no token and poisoned with NaN (never read); ids E and -1 (skipped); hidden_states a strided view."""
    hidden, inter, picked = 100, 37, 6
    w13, w2 = _experts(dtype, device, hidden=hidden, inter=inter, seed=30 + top_k)
    poisoned13, poisoned2 = w13.clone(), w2.clone()
    poisoned13[picked:], poisoned2[picked:] = float("nan"), float("nan")
    g = torch.Generator().manual_seed(31 + top_k)
    calls = 0
    for tokens in (0, 1, 7, 40):
        wide = _randn(tokens, 2 * hidden, dtype=dtype, device=device, seed=32 + tokens)
        x = wide[:, 1:hidden + 1]                                        # row stride 2 * hidden, offset 1
        ids = torch.randint(0, picked, (tokens, top_k), generator=g).to(device=device, dtype=torch.int32)
        if tokens > 1:
            ids[1, 0], ids[-1, -1] = E, -1                               # routed nowhere
        weights = torch.rand(tokens, top_k, generator=g).to(device)
        out = llmkern.fused_moe(x, poisoned13, poisoned2, weights, ids)
        calls += 1
        if tokens:
            _check_moe(out, x, w13, w2, weights, ids, what=f"{tokens} tokens")
        else:
            assert out.shape == (0, hidden)
    assert backend != "cpp" or cpp_calls == ["fused_moe"] * calls


def _guarded(t, fill):
    """t's values in the middle of a larger buffer filled with `fill`: a read past either end of t shows."""
    buf = torch.full((t.numel() + 256,), fill, dtype=t.dtype, device=t.device)
    buf[128:128 + t.numel()] = t.reshape(-1)
    return buf[128:128 + t.numel()].view(t.shape)


@pytest.mark.parametrize("threads", [1, 3])
def test_fused_moe_reads_only_its_arguments(device, threads):
    """Every tensor argument a view into a NaN-filled (ids: zero-filled) buffer, dense and packed (act-order): no
    read past any of them. Duplicate ids within a token (each pair counts), top_k > E, ids 2**32 and -2**40 (int64,
    skipped: 2**32 wraps to expert 0 as int32), experts stored once and expanded (stride 0); 1 and 3 threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dtype, t, hidden, inter, experts, nan = torch.float16, 5, 64, 32, 3, float("nan")
        x = _randn(t, hidden, dtype=dtype, device=device, seed=50)
        w13, w2 = _experts(dtype, device, num_experts=experts, hidden=hidden, inter=inter, seed=51)
        ids = torch.randint(0, experts, (t, 5), generator=torch.Generator().manual_seed(52)).to(device)   # 5 > E
        ids[0] = 1                                                                  # one expert five times
        ids[1, 0], ids[2, 3] = 2 ** 32, -2 ** 40
        w = torch.rand(t, 5, generator=torch.Generator().manual_seed(53)).to(device)
        gx, gw, gids = _guarded(x, nan), _guarded(w, nan), _guarded(ids, 0)
        _check_moe(llmkern.fused_moe(gx, _guarded(w13, nan), _guarded(w2, nan), gw, gids), x, w13, w2, w, ids,
                   what="guarded dense")
        one13, one2 = w13[:1].expand(experts, -1, -1), w2[:1].expand(experts, -1, -1)
        _check_moe(llmkern.fused_moe(gx, one13, one2, gw, gids), x, one13, one2, w, ids, what="expanded experts")
        perm = torch.stack([torch.randperm(hidden, generator=torch.Generator().manual_seed(54 + e))
                            for e in range(experts)]).to(device=device, dtype=torch.int32)
        q13 = llmkern.quantize_experts(w13, bits=4, group_size=32)
        q2 = llmkern.quantize_experts(w2, bits=8, group_size=-1)

        def guarded_q(q, perm=None):
            return llmkern.QuantizedExperts(_guarded(q.qweight, -1), _guarded(q.scales, nan),
                                            _guarded(q.zeros, -30000), bits=q.bits, group_size=q.group_size,
                                            in_features=q.in_features, out_features=q.out_features,
                                            perm=None if perm is None else _guarded(perm, 0))
        p13 = guarded_q(q13, perm)
        _check_moe(llmkern.fused_moe(gx, p13, guarded_q(q2), gw, gids), x, p13.dequantize(), q2.dequantize(), w,
                   ids, what="guarded packed, act-order")
    finally:
        torch.set_num_threads(old)


@pytest.mark.cpu_backends("interpreter")   # inspects the Triton path's alignment kernel
def test_grid_covers_only_hit_experts(device):
    """The aligned blocks: every slot exactly once, in its expert's run; runs padded to the tile; no block for an
    expert no token picked; the grid bound holds."""
    ids = torch.tensor([[5, 1], [1, 5], [1, 7], [5, 1]], dtype=torch.int32, device=device)
    bm = 16
    sorted_ids, block_expert, total, _, max_blocks = moe._align(ids, 8, bm)
    slots = ids.numel()
    assert int(total) == 3 * bm and max_blocks == moe.max_row_blocks(slots, 8, bm) >= 3
    blocks = sorted_ids[:int(total)].view(-1, bm).cpu()
    experts = block_expert[:int(total) // bm].cpu().tolist()
    assert experts == [1, 5, 7]
    flat = ids.flatten().cpu()
    for b, e in enumerate(experts):
        real = blocks[b][blocks[b] < slots]
        assert bool((flat[real.long()] == e).all()) and bool((blocks[b][len(real):] == slots).all())
    assert sorted(blocks[blocks < slots].tolist()) == list(range(slots))


def test_fused_moe_quantized(device, backend, cpp_calls):
    """int4 group 32 gate/up with int8 group 64 down (fp16), int8 per-channel with int4 group 32 (bf16), against the
    reference on the dequantized weights (the quantization error is the format's, not the kernel's); then 40 tokens
    on two experts (20 slots each: the C++ kernel's GEMM path, past its 16-row decode path), a dense w13 with a
    packed w2 and a packed w13 with a dense w2."""
    hidden, inter = 128, 64
    for dtype, (bits13, group13), (bits2, group2) in ((torch.float16, (4, 32), (8, 64)),
                                                      (torch.bfloat16, (8, -1), (4, 32))):
        x = _randn(20, hidden, dtype=dtype, device=device, seed=13)
        w13, w2 = _experts(dtype, device, hidden=hidden, inter=inter, seed=14)
        q13 = llmkern.quantize_experts(w13, bits=bits13, group_size=group13)
        q2 = llmkern.quantize_experts(w2, bits=bits2, group_size=group2)
        weights, ids = llmkern.moe_topk(_randn(20, E, device=device, seed=16), 2)
        out = llmkern.fused_moe(x, q13, q2, weights, ids)
        _check_moe(out, x, q13.dequantize(), q2.dequantize(), weights, ids, what=f"quantized {dtype}")
    x = _randn(40, hidden, dtype=dtype, device=device, seed=15)
    ids = (torch.arange(40, device=device) % 2 * 5)[:, None].to(torch.int32)
    ones = torch.ones(40, 1, device=device)
    _check_moe(llmkern.fused_moe(x, q13, q2, ones, ids), x, q13.dequantize(), q2.dequantize(), ones, ids,
               what="20 slots per expert")
    _check_moe(llmkern.fused_moe(x, w13, q2, ones, ids), x, w13, q2.dequantize(), ones, ids, what="dense w13")
    # packed gate/up writing h for a dense bf16 down projection (h in the bf16 GEMV tile's pair order)
    _check_moe(llmkern.fused_moe(x, q13, w2, ones, ids), x, q13.dequantize(), w2, ones, ids, what="dense w2")
    assert backend != "cpp" or cpp_calls == ["fused_moe"] * 5


def test_fused_moe_act_order(device, backend, cpp_calls):
    """GPTQ act-order experts (g_idx not sorted), gate and up joined from separate projections: the kernel gathers
    x's columns through each expert's permutation."""
    from llmkern.quant import QuantizedWeight
    g = torch.Generator().manual_seed(17)
    hidden, inter, dtype, experts = 64, 64, torch.float16, 4

    def gptq_like(n, k, g_idx):
        return QuantizedWeight.from_codes(torch.randint(0, 16, (n, k), generator=g),
                                          torch.randint(4, 12, (k // 32, n), generator=g),
                                          (torch.rand(k // 32, n, generator=g) * 0.05).to(dtype), bits=4,
                                          group_size=32, g_idx=g_idx).to(device)
    order = [torch.randperm(hidden, generator=g) % (hidden // 32) for _ in range(experts)]
    q13 = moe.QuantizedExperts.from_gate_up([gptq_like(inter, hidden, o) for o in order],
                                            [gptq_like(inter, hidden, o) for o in order])
    q2 = moe.QuantizedExperts.from_weights([gptq_like(hidden, inter, torch.randperm(inter, generator=g) % 2)
                                            for _ in range(experts)])
    assert q13.perm is not None and q13.shape == (experts, 2 * inter, hidden)
    x = _randn(5, hidden, dtype=dtype, device=device, seed=18)
    weights, ids = llmkern.moe_topk(_randn(5, experts, device=device, seed=19), 2)
    _check_moe(llmkern.fused_moe(x, q13, q2, weights, ids), x, q13.dequantize(), q2.dequantize(), weights, ids,
               what="act-order")
    assert backend != "cpp" or cpp_calls == ["fused_moe"]
    with pytest.raises(ValueError, match="permutation"):
        moe.QuantizedExperts.from_gate_up([gptq_like(inter, hidden, order[0])], [gptq_like(inter, hidden, order[1])])
    bad = q2.perm.clone()
    bad[1, 0] = bad[1, 1]       # one expert's row repeats an index: the kernel would skip a column of x
    with pytest.raises(ValueError, match="perm must be a permutation of range.* in every row"):
        moe.QuantizedExperts(q2.qweight, q2.scales, q2.zeros, bits=4, group_size=32, in_features=inter,
                             out_features=hidden, perm=bad)


def test_fused_moe_strided_inputs(device):
    """Strided hidden states, transposed-storage weights, strided ids and weights: the same result as contiguous."""
    dtype = torch.bfloat16
    x = _randn(20, H, dtype=dtype, device=device, seed=20)
    w13, w2 = _experts(dtype, device)
    weights, ids = llmkern.moe_topk(_randn(20, E, device=device, seed=21), 2)
    expect = llmkern.fused_moe(x, w13, w2, weights, ids)
    wide = torch.zeros(20, 2 * H, dtype=dtype, device=device)
    wide[:, H:] = x                                                      # row stride 2H: read in place
    w13_t = w13.transpose(1, 2).contiguous().transpose(1, 2)             # (E, 2I, H) with stride (.., 1, 2I)
    w2_t = w2.transpose(0, 2).contiguous().transpose(0, 2)
    ids_t = ids.t().contiguous().t()                                     # column-major (T, top_k)
    weights_w = torch.zeros(20, 4, device=device)
    weights_w[:, ::2] = weights
    out = llmkern.fused_moe(wide[:, H:], w13_t, w2_t, weights_w[:, ::2], ids_t)
    torch.testing.assert_close(out, expect, rtol=0, atol=0)


def test_fused_moe_bad_input(device):
    x = _randn(4, H, device=device)
    w13, w2 = _experts(torch.float32, device)
    w, ids = llmkern.moe_topk(_randn(4, E, device=device), 2)
    q13 = llmkern.quantize_experts(_experts(torch.float16, device, hidden=128, inter=64)[0], bits=4, group_size=32)
    cases = [
        ((x[0], w13, w2, w, ids), {}, ValueError, "hidden_states"),
        ((x.long(), w13, w2, w, ids), {}, TypeError, "hidden_states"),
        ((x, w13[0], w2, w, ids), {}, ValueError, "w13"),
        ((x, w13[:, :-1], w2, w, ids), {}, ValueError, "w13"),
        ((x, w13[:, :, :-1], w2, w, ids), {}, ValueError, "w13"),
        ((x, w13, w2[:4], w, ids), {}, ValueError, "experts"),
        ((x, w13, w2[:, :, :-1], w, ids), {}, ValueError, "w2"),
        ((x, w13.half(), w2, w, ids), {}, TypeError, "w13"),
        ((x, "w13", w2, w, ids), {}, TypeError, "w13"),
        ((x, q13, w2, w, ids), {}, ValueError, "w13"),             # hidden 128 quantized vs 96
        ((x.half(), w13.half(), w2.half(), w[:3], ids), {}, ValueError, "topk_weights"),
        ((x, w13, w2, w, ids[:, :1]), {}, ValueError, "topk_ids"),
        ((x, w13, w2, w, ids.float()), {}, TypeError, "topk_ids"),
        ((x, w13, w2, w, ids), dict(activation="gelu"), ValueError, "activation"),
    ]
    for args, kwargs, err, match in cases:
        with pytest.raises(err, match=match):
            llmkern.fused_moe(*args, **kwargs)
    # the op called directly checks the same things
    with pytest.raises(ValueError, match="w2"):
        torch.ops.llmkern.fused_moe(x, w13, None, None, None, 16, -1, w2[:, :, :-1], None, None, None, 16, -1, w,
                                    ids, "silu")


@pytest.mark.cpu_backends("cpp")
def test_fused_moe_cpp_refuses_inconsistent_tensors(device, backend):
    """The C++ function called directly (torch.ops.llmkern_cpu.fused_moe) checks the facts its addressing relies on
    and raises, rather than reading out of bounds."""
    if backend != "cpp":
        pytest.skip("the C++ backend's own checks")
    hidden, inter, dtype = 64, 32, torch.float16
    x = _randn(3, hidden, dtype=dtype, device=device, seed=40)
    w13, w2 = _experts(dtype, device, num_experts=4, hidden=hidden, inter=inter, seed=41)
    q13 = llmkern.quantize_experts(w13, bits=4, group_size=32)
    w = torch.ones(3, 2)
    ids = torch.zeros(3, 2, dtype=torch.int64)
    out = torch.empty(3, hidden, dtype=dtype)
    dense = (None, None, None, 16, -1)
    fn = torch.ops.llmkern_cpu.fused_moe
    fn(x, w13, *dense, w2, *dense, w, ids, out)                                  # consistent: runs
    bad_perm = torch.arange(hidden, dtype=torch.int32).repeat(4, 1)
    bad_perm[2, 5] = hidden
    for args, match in [
        ((x, w13, *dense, w2[:, :-1], *dense, w, ids, out), "w2"),
        ((x, w13[:3], *dense, w2, *dense, w, ids, out), "w13"),
        ((x, w13, *dense, w2, *dense, w, ids.int(), out), "topk_ids"),
        ((x, w13, *dense, w2.float(), *dense, w, ids, out), "w2"),
        ((x, q13.qweight, q13.scales.float(), q13.zeros, None, 4, 32, w2, *dense, w, ids, out), "scales"),
        ((x, q13.qweight, q13.scales, q13.zeros, bad_perm, 4, 32, w2, *dense, w, ids, out), "perm"),
        ((x, q13.qweight, q13.scales, q13.zeros, None, 4, 48, w2, *dense, w, ids, out), "group_size"),
        ((x, w13, *dense, w2, *dense, w, ids, out[:2]), "out"),
    ]:
        with pytest.raises(RuntimeError, match=match):
            fn(*args)
