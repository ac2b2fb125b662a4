"""Decoding controls: `speculative_sample`, `beam_topk`, `apply_penalties` against their references.

Speculative sampling's distribution is shown in two steps, because the interpreter runs about 20 ms per row: the
kernel draws exactly the reference's tokens (same Philox uniforms) on a slice of the rows (all of them on a GPU),
and the reference's draws over thousands of rows pass a chi-square test against the target. Beam top-k must give
the float64 reference's indices exactly (ties included) and its scores within the fp32 tolerance rule; penalties
must equal transformers' processor and the float64 reference.
"""
import pytest
import torch

import llmkern
from llmkern import reference
from stats import assert_follows
from tolerance import assert_fa_close

transformers = pytest.importorskip("transformers")


# ------------------------------------------------------------------------------------------- speculative sampling
def _dists(rows, vocab, seed, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(rows, vocab, generator=g, dtype=torch.float64) * scale, -1)


_V, _K = 6, 2
_TARGET = _dists(_K + 1, _V, seed=0)


def _draft(kind):
    """close: near the target; far: another distribution; zero: no mass on tokens 0 and 1, where the target has
    some (those tokens can then only come from the residual)."""
    if kind == "close":
        return 0.85 * _TARGET[:_K] + 0.15 * _dists(_K, _V, seed=1)
    if kind == "far":
        return _dists(_K, _V, seed=2, scale=3.0)
    q = _dists(_K, _V, seed=3)
    q[:, :2] = 0.0
    return q / q.sum(-1, keepdim=True)


@pytest.mark.parametrize("kind", ["close", "far", "zero"])
def test_speculative_output_follows_target(device, kind):
    n = 2000
    q = _draft(kind)
    g = torch.Generator().manual_seed(10)
    ids = torch.stack([torch.multinomial(q[i], n, replacement=True, generator=g) for i in range(_K)], 1)
    qs, ps = q.float().expand(n, -1, -1), _TARGET.float().expand(n, -1, -1)
    seeds = torch.arange(n) * 7 + 3
    tokens, accepted = reference.speculative_sample(qs, ids, ps, seed=seeds)
    # The kernel makes the same decisions (a slice under the interpreter: it costs ~20 ms a row there).
    m = n if device == "cuda" else 32
    got = llmkern.speculative_sample(qs[:m].to(device), ids[:m].to(device), ps[:m].to(device),
                                     seed=seeds[:m].to(device))
    assert torch.equal(got[0].cpu(), tokens[:m]) and torch.equal(got[1].cpu(), accepted[:m])
    # Position 0 always follows p_0; position i follows p_i in the rows that accepted the draft tokens before it.
    assert_follows(tokens[:, 0], _TARGET[0], what=f"{kind}: first token")
    assert_follows(tokens[accepted >= 1, 1], _TARGET[1], what=f"{kind}: second token")
    # Draft token 0 is accepted with probability sum_x min(p(x), q(x)) (Leviathan et al., Theorem 3.5).
    rate = float(torch.minimum(_TARGET[0], q[0]).sum())
    assert abs(float((accepted >= 1).double().mean()) - rate) < 4 * (rate * (1 - rate) / n) ** 0.5 + 1e-9
    # Shape of the output: accepted tokens are the draft's, then one drawn token, then -1.
    rows = torch.arange(n)
    assert bool((tokens[rows, accepted] >= 0).all())
    for i in range(_K + 1):
        if i < _K:
            assert bool((tokens[accepted > i, i] == ids[accepted > i, i]).all())
        assert bool((tokens[accepted < i, i] == -1).all())


def test_speculative_edge_rows(device):
    """Rows that take every branch: draft equal to the target (everything accepted, bonus from p_k), greedy
    one-hot rows that agree or disagree, an unnormalized target whose residual has no mass (p = q / 2: the draw
    falls back to p_j), and a NaN row (its draw is -1)."""
    vocab, k = 40, 3
    p = _dists(6 * (k + 1), vocab, seed=4).float().view(6, k + 1, vocab)
    q = p[:, :k].clone()
    one_hot = torch.nn.functional.one_hot
    q[2], p[2] = one_hot(torch.tensor([5, 6, 7]), vocab).float(), one_hot(torch.tensor([5, 9, 7, 8]), vocab).float()
    p[3] = q[3].repeat(2, 1)[:k + 1] * 0.5
    p[4, 1, 3] = float("nan")
    q[5] = _dists(k, vocab, seed=5).float()
    ids = torch.stack([torch.multinomial(q[b], 1, generator=torch.Generator().manual_seed(b))[:, 0]
                       for b in range(6)])
    ids[2] = torch.tensor([5, 6, 7])
    ids[4, 1] = 3                                                   # p[4, 1, 3] is NaN: rejected, draw -1
    seeds = torch.tensor([11, 12, 13, 20, 15, 16])   # seed 20: u_0 = 0.46 < 1/2 accepts, u_1 = 0.96 rejects
    tokens, accepted = llmkern.speculative_sample(q.to(device), ids.to(device), p.to(device), seed=seeds.to(device))
    want = reference.speculative_sample(q, ids, p, seed=seeds)
    assert torch.equal(tokens.cpu(), want[0]) and torch.equal(accepted.cpu(), want[1])
    tokens, accepted = tokens.cpu(), accepted.cpu()
    assert accepted[0] == k and accepted[1] == k                  # q == p accepts everything
    assert tokens[2].tolist() == [5, 9, -1, -1]                    # greedy: agree on 5, then the target's 9
    assert accepted[3] == 1 and tokens[3, 1] >= 0                 # p = q / 2: residual empty, drawn from p_1
    assert accepted[4] == 1 and tokens[4].tolist() == [int(ids[4, 0]), -1, -1, -1]   # q[4] == p[4] accepts x_0
    # k = 0: one token from p_0, the same as the reference's inverse CDF
    t0, a0 = llmkern.speculative_sample(q[:, :0].to(device), ids[:, :0].to(device), p[:, :1].to(device),
                                        seed=seeds.to(device))
    assert t0.shape == (6, 1) and bool((a0 == 0).all())
    assert torch.equal(t0.cpu(), reference.speculative_sample(q[:, :0], ids[:, :0], p[:, :1], seed=seeds)[0])


def test_speculative_batch_invariant_strided_and_compiled(device):
    vocab, k, batch = 300, 2, 5
    p = _dists(batch * (k + 1), vocab, seed=6, scale=0.3).view(batch, k + 1, vocab).to(torch.bfloat16)
    q = _dists(batch * k, vocab, seed=7, scale=0.3).view(batch, k, vocab).to(torch.bfloat16)
    wide = torch.randint(0, vocab, (batch, 2 * k), generator=torch.Generator().manual_seed(8))
    ids = wide[:, ::2]                                               # a strided view: honoured, not misread
    seeds = torch.arange(batch) + 100
    p, q, ids, wide, seeds = (t.to(device) for t in (p, q, ids, wide, seeds))
    full = llmkern.speculative_sample(q, ids, p, seed=seeds)
    assert torch.equal(full[0], llmkern.speculative_sample(q, ids.contiguous(), p, seed=seeds)[0])
    sub = torch.tensor([3, 0], device=device)
    part = llmkern.speculative_sample(q[sub], ids[sub], p[sub], seed=seeds[sub])
    assert torch.equal(part[0], full[0][sub]) and torch.equal(part[1], full[1][sub])
    # a strided vocab dim (copied before the launch)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(llmkern.speculative_sample(qt, ids, p, seed=seeds)[0], full[0])
    compiled = torch.compile(lambda a, b, c, s: llmkern.speculative_sample(a, b, c, seed=s), fullgraph=True,
                             backend="aot_eager")
    out = compiled(q, ids, p, seeds)
    assert torch.equal(out[0], full[0]) and torch.equal(out[1], full[1])


# ---------------------------------------------------------------------------------------------- beam search top-k
def _check_beam_topk(logits, beam_scores, num_beams, k=None):
    k = 2 * num_beams if k is None else k
    scores, idx = llmkern.beam_topk(logits, beam_scores, num_beams=num_beams, k=k)
    ref64, ref_idx = reference.beam_topk(logits, beam_scores, num_beams, k, compute_dtype=torch.float64)
    ref32, _ = reference.beam_topk(logits, beam_scores, num_beams, k)     # PyTorch's own fp32: the error scale
    assert scores.dtype == torch.float32 and idx.dtype == torch.int64
    assert torch.equal(idx.cpu(), ref_idx), f"indices differ:\n{idx.cpu()}\n{ref_idx}"
    assert_fa_close(scores.cpu(), ref64, ref32, what="beam_topk scores")
    return scores.cpu(), idx.cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_beam_topk_matches_reference(device, dtype):
    # 2500 columns: three tiles, the last partial; beam scores spread so that candidates come from several beams
    g = torch.Generator().manual_seed(20)
    logits = (torch.randn(2 * 3, 2500, generator=g) * 2).to(dtype).to(device)
    beam_scores = torch.tensor([-1.0, -1.5, -1.2, -3.0, -2.9, -3.1], device=device)
    scores, idx = _check_beam_topk(logits, beam_scores, 3)
    assert len(set((idx[0] // 2500).tolist())) > 1            # candidates from more than one beam


def test_beam_topk_ties_strides_and_first_step(device):
    # Integer logits: ties everywhere; they go to the lower beam, then the lower token.
    g = torch.Generator().manual_seed(21)
    ties = torch.randint(-3, 3, (2 * 4, 70), generator=g).float().to(device)
    _check_beam_topk(ties, torch.zeros(8, device=device), 4, k=7)
    # transformers' first step: one row for every beam (row stride 0), beams 1.. at -1e9: beam 0 alone expands.
    row = torch.randn(1, 90, generator=g).to(device)
    scores0 = torch.tensor([0.0, -1e9, -1e9], device=device)
    scores, idx = _check_beam_topk(row.expand(3, -1), scores0, 3)
    assert bool((idx < 90).all())
    assert torch.equal(llmkern.beam_topk(row.repeat(3, 1), scores0, num_beams=3)[1].cpu(), idx)
    # a column slice of a wider tensor (row stride != vocab)
    wide = torch.randn(4, 130, generator=g).to(device)
    _check_beam_topk(wide[:, 20:110], torch.tensor([0.0, -0.5, -2.0, -0.1], device=device), 2, k=3)


def test_beam_topk_invalid_rows(device):
    """NaN / +inf / all -inf rows and NaN / -inf beam scores give no candidates; -inf logits are never candidates;
    a sequence with fewer than k finite candidates is padded with (-inf, -1)."""
    logits = torch.randn(3 * 2, 5, generator=torch.Generator().manual_seed(22))
    logits[0, 2] = float("nan")
    logits[1, :3] = float("-inf")            # sequence 0: beam 1 has 2 candidates, beam 0 none
    logits[2, 1] = float("inf")              # sequence 1: beam 0 invalid, beam 1 ok
    logits[4] = float("-inf")                # sequence 2: beam 0 has none; beam 1's score is NaN
    beam_scores = torch.tensor([0.0, -1.0, 0.0, -2.0, 0.0, float("nan")])
    scores, idx = _check_beam_topk(logits.to(device), beam_scores.to(device), 2, k=4)
    assert idx[0].tolist()[2:] == [-1, -1] and bool((idx[0, :2] >= 8).all())
    assert bool((idx[1] >= 5).all())
    assert idx[2].tolist() == [-1] * 4 and bool((scores[2] == float("-inf")).all())


# ------------------------------------------------------------------------------------------------------ penalties
def _history(batch, length, vocab, seed, pad=0.2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab // 3, (batch, length), generator=g)     # a third of the vocab: many repeats
    ids[torch.rand(batch, length, generator=g) < pad] = -1
    return ids


def _check_penalties(logits, ids, **kw):
    out = llmkern.apply_penalties(logits, ids, **kw)
    ref64 = reference.apply_penalties(logits, ids, compute_dtype=torch.float64, **kw)
    ref32 = reference.apply_penalties(logits, ids, **kw)
    assert out.dtype == torch.float32 and out.shape == logits.shape
    assert_fa_close(out.cpu(), ref64, ref32, what="apply_penalties")
    return out


def test_penalties_match_transformers(device):
    logits = (torch.randn(4, 300, generator=torch.Generator().manual_seed(30)) * 3).to(device)
    ids = _history(4, 40, 300, seed=31, pad=0.0)
    ours = _check_penalties(logits, ids.to(device), repetition_penalty=1.3)
    hf = transformers.RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.cpu().clone())
    assert_fa_close(ours.cpu(), reference.apply_penalties(logits, ids, repetition_penalty=1.3,
                                                          compute_dtype=torch.float64), hf, what="vs transformers")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_penalties_all_controls(device, dtype):
    """Per-row parameters, padding anywhere, a history longer than one tile (600 > 256), a strided int32 history,
    a strided logits row, and both bias shapes."""
    g = torch.Generator().manual_seed(32)
    wide = (torch.randn(3, 1100, generator=g) * 2).to(dtype).to(device)
    logits = wide[:, 50:1050]                                             # row stride 1100
    ids = _history(3, 1200, 1000, seed=33)
    strided = ids.to(torch.int32).to(device)[:, ::2]                      # (3, 600), column stride 2
    kw = dict(repetition_penalty=torch.tensor([1.2, 0.8, 1.0], device=device), presence_penalty=0.5,
              frequency_penalty=torch.tensor([0.1, -0.2, 0.0], device=device))
    out = _check_penalties(logits, strided, **kw)
    assert torch.equal(out, llmkern.apply_penalties(logits, strided.contiguous().long(), **kw))
    bias = torch.randn(1000, generator=g).to(device)
    bias[7] = float("-inf")
    out = _check_penalties(logits, strided, logit_bias=bias, **kw)
    assert bool(out[:, 7].eq(float("-inf")).all())
    _check_penalties(logits, strided, logit_bias=bias.expand(3, -1) * 2, **kw)
    # no history at all, and an all-padding one: the logits (plus bias) as they are
    plain = logits.float() + bias
    assert torch.equal(llmkern.apply_penalties(logits, torch.empty(3, 0, dtype=torch.int64, device=device),
                                               logit_bias=bias, **kw), plain)
    assert torch.equal(llmkern.apply_penalties(logits, torch.full((3, 9), -1, device=device), logit_bias=bias,
                                               **kw), plain)


def test_penalties_extremes_and_compile(device):
    """Every float parameter at its extremes: results follow float32 arithmetic, like the reference (and
    transformers' processor): a tiny repetition penalty sends positive repeated logits to +inf, a huge presence
    penalty sends repeated tokens to -inf; values outside the documented ranges are refused."""
    logits = torch.tensor([[2.0, -1.0, 0.0, 3.0, -2.0]] * 2, device=device)
    ids = torch.tensor([[0, 1, 2, -1], [3, 3, 4, 0]], device=device)
    for kw in (dict(repetition_penalty=1e-30), dict(repetition_penalty=1e30), dict(repetition_penalty=1e-40),
               dict(presence_penalty=1e30), dict(frequency_penalty=-1e30), dict(presence_penalty=1e-45)):
        out = llmkern.apply_penalties(logits, ids, **kw)
        assert torch.equal(out.cpu(), reference.apply_penalties(logits, ids, **kw).cpu()), kw
    assert llmkern.apply_penalties(logits, ids, repetition_penalty=1e-39)[0, 0] == float("inf")   # 2 / 1e-39
    assert llmkern.apply_penalties(logits, ids, frequency_penalty=2e38)[1, 3] == float("-inf")   # 3 - 2 * 2e38
    for bad in (dict(repetition_penalty=0.0), dict(repetition_penalty=-1.0), dict(repetition_penalty=float("inf")),
                dict(repetition_penalty=float("nan")), dict(presence_penalty=float("inf")),
                dict(frequency_penalty=float("nan")), dict(presence_penalty=1e39),    # inf as float32
                dict(repetition_penalty=torch.tensor([1.0, 0.0], device=device))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            llmkern.apply_penalties(logits, ids, **bad)
    for bias_value in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="logit_bias"):
            llmkern.apply_penalties(logits, ids, logit_bias=torch.full((5,), bias_value, device=device))
    kw = dict(repetition_penalty=1.5, presence_penalty=0.3, frequency_penalty=0.2)
    compiled = torch.compile(lambda x, h: llmkern.apply_penalties(x, h, **kw), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(logits, ids), llmkern.apply_penalties(logits, ids, **kw))
    with pytest.raises(ValueError, match="token_ids"):      # the value check is inside the op: compiled too
        compiled(logits, ids + 5)
    compiled = torch.compile(lambda x, s: llmkern.beam_topk(x, s, num_beams=2), fullgraph=True, backend="aot_eager")
    s = torch.zeros(2, device=device)
    assert all(torch.equal(a, b) for a, b in zip(compiled(logits, s), llmkern.beam_topk(logits, s, num_beams=2)))


# ------------------------------------------------------------------------------------------------------ bad input
def test_bad_input_raises_before_launch(device):
    d = device
    q, p = torch.full((2, 2, 8), 1 / 8, device=d), torch.full((2, 3, 8), 1 / 8, device=d)
    ids = torch.zeros(2, 2, dtype=torch.int64, device=d)
    spec = [((q, ids, p[:, :2]), "target_probs"), ((q, ids[:, :1], p), "draft_token_ids"),
            ((q, ids.float(), p), "draft_token_ids"), ((q, ids + 8, p), "draft_token_ids"),
            ((q, ids - 1, p), "draft_token_ids"), ((q.half(), ids, p), "target_probs"),
            ((q[:, :, :0], ids, p[:, :, :0]), "vocab"), ((q[0], ids, p), "draft_probs")]
    for args, name in spec:
        with pytest.raises((TypeError, ValueError), match=name):
            llmkern.speculative_sample(*args, seed=1)
    big = torch.full((1, 16, 4), 0.25, device=d)
    with pytest.raises(ValueError, match="15"):
        llmkern.speculative_sample(big, torch.zeros(1, 16, dtype=torch.int64, device=d),
                                   torch.full((1, 17, 4), 0.25, device=d), seed=1)
    with pytest.raises(ValueError, match="seed"):
        llmkern.speculative_sample(q, ids, p, seed=torch.zeros(3, dtype=torch.int64, device=d))

    logits = torch.zeros(6, 10, device=d)
    beam = [(dict(num_beams=4), "logits"), (dict(num_beams=0), "num_beams"), (dict(num_beams=3, k=33), "k"),
            (dict(num_beams=3, k=31), "k"), (dict(num_beams=3, k=0), "k"), (dict(num_beams=2.0), "num_beams")]
    for kw, name in beam:
        with pytest.raises(ValueError, match=name):
            llmkern.beam_topk(logits, torch.zeros(6, device=d), **kw)
    with pytest.raises(ValueError, match="beam_scores"):
        llmkern.beam_topk(logits, torch.zeros(5, device=d), num_beams=3)
    with pytest.raises(TypeError, match="beam_scores"):
        llmkern.beam_topk(logits, torch.zeros(6, dtype=torch.int64, device=d), num_beams=3)

    hist = torch.zeros(6, 3, dtype=torch.int64, device=d)
    pen = [((logits, hist + 10), "token_ids"), ((logits, hist - 2), "token_ids"), ((logits, hist[:5]), "token_ids"),
           ((logits, hist.float()), "token_ids"), ((logits, hist[:, 0]), "token_ids"),
           ((logits.long(), hist), "logits")]
    for args, name in pen:
        with pytest.raises((TypeError, ValueError), match=name):
            llmkern.apply_penalties(*args, repetition_penalty=1.2)
    with pytest.raises(ValueError, match="logit_bias"):
        llmkern.apply_penalties(logits, hist, logit_bias=torch.zeros(9, device=d))
