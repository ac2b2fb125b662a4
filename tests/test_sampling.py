"""Fused sampling (`llmkern.sample`, `llmkern.sampling_probs`) against the float64 sort-based reference.

Under the interpreter every program (row) costs tens of milliseconds, so the shapes are small, and many draws are
made as one call over a batch of identical rows with distinct seeds.
"""
import pytest
import torch

import llmkern
from llmkern import reference
from stats import assert_follows
from tolerance import assert_fa_close

pytestmark = pytest.mark.cpu_backends("interpreter", "cpp")   # on CPU: the Triton interpreter and the C++ backend


def _logits(batch, vocab, dtype, device, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, vocab, generator=g) * scale).to(dtype).to(device)


def _safe_params(logits, seed=0):
    """Per-row parameters with every cut-off far from a rounding boundary.

    top_p sits halfway between two consecutive cumulative masses of the top-k survivors (at a step of at least 1e-3),
    min_p halfway between two consecutive probability ratios q / q_max (a gap of at least 1e-3), so that fp32
    rounding in the kernel cannot flip a token that float64 keeps. Rows cycle through every combination of the
    filters being on or off; one row is greedy.
    """
    g = torch.Generator().manual_seed(seed)
    batch, vocab = logits.shape
    x = logits.double().cpu()
    temps, ks, ps, mps = [], [], [], []
    for b in range(batch):
        t = 0.0 if b == 3 else float(torch.empty(1).uniform_(0.6, 1.5, generator=g))
        k = [0, 1 + int(torch.randint(0, 40, (1,), generator=g)), vocab + 3][b % 3]
        q = torch.softmax(x[b] / (t or 1.0), 0)
        keep = x[b] >= torch.topk(x[b], k).values[-1] if 0 < k < vocab else torch.ones(vocab, dtype=torch.bool)
        p, mp = 1.0, 0.0
        if b % 2 == 1:
            qs = torch.sort(q[keep] / q[keep].sum(), descending=True).values
            cum = torch.cumsum(qs, 0)
            steps = torch.nonzero(qs[1:] >= 1e-3).flatten() + 1  # positions r >= 1 whose own mass is >= 1e-3
            if len(steps):
                r = int(steps[int(torch.randint(0, len(steps), (1,), generator=g))])
                p = float(cum[r - 1] + qs[r] / 2)
        if b % 4 >= 2:
            ratios = torch.unique(q / q.max())                      # ascending
            gaps = torch.nonzero(ratios[1:] - ratios[:-1] >= 1e-3).flatten()
            i = int(gaps[len(gaps) // 2]) if len(gaps) else 0
            mp = float((ratios[i] + ratios[i + 1]) / 2) if len(gaps) else 0.0
        temps.append(t), ks.append(k), ps.append(min(p, 1.0)), mps.append(mp)
    dev = logits.device
    return dict(temperature=torch.tensor(temps, device=dev), top_k=torch.tensor(ks, device=dev),
                top_p=torch.tensor(ps, device=dev), min_p=torch.tensor(mps, device=dev))


def _check_probs(logits, params):
    out = llmkern.sampling_probs(logits, **params)
    ref, kept = reference.sampling_probs(logits, **params, return_kept=True)
    assert out.dtype == torch.float32 and out.shape == logits.shape
    # The kept set is exact: a token is nonzero iff the float64 reference keeps it with nonzero probability.
    assert torch.equal(out.cpu() > 0, kept & (ref > 0)), "kept set differs from the float64 reference"
    # Values: PyTorch's own fp32 version of the same renormalization sets the error scale.
    t = params["temperature"].cpu().float()
    q32 = torch.softmax(logits.cpu().float() / torch.where(t > 0, t, 1.0)[:, None], dim=1)
    q32 = torch.where(kept, q32, 0.0)
    torch32 = q32 / q32.sum(1, keepdim=True)
    torch32[t == 0] = ref[t == 0].float()
    assert_fa_close(out.cpu(), ref, torch32, what="sampling_probs")
    return out, ref, kept


# ------------------------------------------------------------------------------------------ sampling_probs
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_probs_match_float64_reference(device, dtype):
    logits = _logits(8, 1000, dtype, device, seed=1)       # 1000: not a multiple of any tile
    _check_probs(logits, _safe_params(logits, seed=1))


def test_probs_multi_tile_strided_rows(device):
    # 2500 columns span several tiles of both passes (1024 and 128) and end mid-tile; a column slice of a wider
    # tensor has a row stride != vocab (passed to the kernel, no copy).
    wide = _logits(4, 2600, torch.float32, device, seed=2)
    logits = wide[:, 50:2550]
    assert logits.stride(0) == 2600
    _check_probs(logits, _safe_params(logits, seed=2))


def test_probs_large_vocab(device):
    # A Llama-3-sized vocabulary (128256), once: top-k 50 then top-p, the benchmark's setting.
    logits = _logits(1, 128256, torch.bfloat16, device, seed=3, scale=3.0)
    params = _safe_params(logits, seed=3)
    params = dict(temperature=torch.tensor([0.8], device=device), top_k=torch.tensor([50], device=device),
                  top_p=params["top_p"], min_p=torch.tensor([0.0], device=device))
    out, ref, kept = _check_probs(logits, params)
    # top_p sits past the first token (see _safe_params); bf16 ties at the 50th logit may keep a few more than 50.
    tied_50th = int((logits.float() >= logits.float().topk(50).values[:, -1:]).sum())
    assert 2 <= int(kept.sum()) <= tied_50th


def test_topk_boundary_ties_are_all_kept(device):
    # Logits 5, 4, 4, 4, 3, ...: top_k = 2 cuts through the three-way tie at 4; all three are kept (documented).
    logits = torch.tensor([[3.0, 4.0, 5.0, 4.0, 1.0, 4.0, 0.0, 2.0]], device=device)
    out = llmkern.sampling_probs(logits, top_k=2)
    assert torch.equal((out.cpu() > 0)[0], torch.tensor([False, True, True, True, False, True, False, False]))
    ref = reference.sampling_probs(logits, top_k=2)
    assert_fa_close(out.cpu(), ref, ref.float(), what="tied top-k")
    # top_p cutting inside a tie keeps the whole tie too: the tokens tied at 4 have the same mass above them.
    out = llmkern.sampling_probs(logits, top_p=0.75)
    assert torch.equal(out.cpu() > 0, reference.sampling_probs(logits, top_p=0.75) > 0)


# -------------------------------------------------------------------------------------------------- draws
def test_draws_follow_the_distribution(device):
    # 1500 draws from one row (40 tokens, temperature 0.9, top-k 12): identical rows, seeds 0..1499, one call.
    n = 1500
    row = _logits(1, 40, torch.float32, device, seed=4)
    params = dict(temperature=0.9, top_k=12)
    tokens = llmkern.sample(row.expand(n, -1), seed=torch.arange(n, device=device), **params).cpu()
    probs = reference.sampling_probs(row, **params)[0]
    assert bool((probs[tokens] > 0).all()), "a draw fell outside the kept set"
    assert_follows(tokens, probs)   # chi-square; the seeds are fixed, so this is deterministic
    # Each draw is exactly the inverse CDF at the row's Philox uniform: the CPU reference sampler agrees.
    assert torch.equal(tokens, reference.sample(row.expand(n, -1), seed=torch.arange(n), **params))


def test_draws_stay_in_kept_set_mixed_params(device):
    logits = _logits(4, 300, torch.float16, device, seed=5).repeat(12, 1)   # 48 rows, 4 distinct
    params = _safe_params(logits, seed=5)
    seeds = torch.arange(1000, 1048, device=device) * 7919
    tokens = llmkern.sample(logits, seed=seeds, **params).cpu()
    probs = reference.sampling_probs(logits, **params)
    assert bool((probs[torch.arange(48), tokens] > 0).all()), "a draw fell outside the kept set"
    assert torch.equal(tokens, reference.sample(logits, seed=seeds, **params))


def test_greedy_and_top1_are_argmax(device):
    logits = _logits(6, 500, torch.bfloat16, device, seed=6)
    argmax = logits.float().argmax(1).cpu()
    assert torch.equal(llmkern.sample(logits, temperature=0.0).cpu(), argmax)
    assert torch.equal(llmkern.sample(logits, top_k=1, seed=3).cpu(), argmax)
    assert torch.equal(llmkern.sampling_probs(logits, temperature=0.0).cpu(),
                       torch.nn.functional.one_hot(argmax, 500).float())


def test_greedy_tie_across_tiles_takes_the_first(device):
    """The maximum twice, in two different 1024-column tiles of the first pass: greedy takes the first one."""
    logits = torch.zeros(1, 2048, device=device)
    logits[0, 5] = logits[0, 1500] = 3.0
    assert llmkern.sample(logits, temperature=0.0).tolist() == [5]
    probs = llmkern.sampling_probs(logits, temperature=0.0)
    assert probs[0, 5] == 1.0 and probs.sum() == 1.0


@pytest.mark.parametrize("temperature", [1e-40, 1e-45, 2.0 ** -127])
def test_subnormal_temperature_is_greedy(device, temperature):
    """Below float32's smallest normal (2**-126), 1 / temperature overflows: such rows are greedy, the argmax, as in
    the float64 reference (which uses the same rule: reference.GREEDY_BELOW), not -1 and NaN."""
    logits = _logits(3, 256, torch.float32, device, seed=12)
    argmax = logits.argmax(1).cpu()
    assert torch.equal(llmkern.sample(logits, temperature=temperature, seed=torch.arange(3, device=device)).cpu(),
                       argmax)
    probs = llmkern.sampling_probs(logits, temperature=temperature).cpu()
    assert torch.equal(probs, torch.nn.functional.one_hot(argmax, 256).float())
    assert torch.equal(probs.double(), reference.sampling_probs(logits, temperature=temperature))


def test_same_seed_same_token_and_batch_invariance(device):
    logits = _logits(6, 700, torch.float32, device, seed=7, scale=0.5)   # flat rows: many plausible tokens
    seeds = torch.tensor([11, 22, 33, 44, 55, 66], device=device)
    params = dict(temperature=torch.full((6,), 1.2, device=device), top_p=0.95)
    full = llmkern.sample(logits, seed=seeds, **params)
    assert torch.equal(full, llmkern.sample(logits, seed=seeds, **params))
    # Remove rows, reorder them, add others: each row keeps its token.
    idx = torch.tensor([4, 1], device=device)
    sub = llmkern.sample(logits[idx], seed=seeds[idx], temperature=params["temperature"][idx], top_p=0.95)
    assert torch.equal(sub, full[idx])
    extra = _logits(3, 700, torch.float32, device, seed=8)
    grown = llmkern.sample(torch.cat([extra, logits]), seed=torch.cat([seeds[:3] + 100, seeds]),
                           temperature=torch.full((9,), 1.2, device=device), top_p=0.95)
    assert torch.equal(grown[3:], full)
    # Different seeds do draw different tokens (the seed reaches the kernel).
    other = llmkern.sample(logits, seed=seeds + 1, **params)
    assert not torch.equal(other, full)


def test_generator_and_default_rng(device):
    logits = _logits(8, 200, torch.float32, device, seed=9, scale=0.3)
    a = llmkern.sample(logits, generator=torch.Generator().manual_seed(5))
    b = llmkern.sample(logits, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    torch.manual_seed(123)
    c = llmkern.sample(logits)
    torch.manual_seed(123)
    assert torch.equal(c, llmkern.sample(logits))
    assert not torch.equal(c, llmkern.sample(logits))   # the default generator advanced


def test_invalid_rows(device):
    logits = _logits(5, 300, torch.float32, device, seed=10)
    logits[0, 17] = float("nan")
    logits[1] = float("-inf")
    logits[2, 5] = float("inf")
    logits[3, :290] = float("-inf")                     # masked tokens: only the last 10 can be drawn
    tokens = llmkern.sample(logits, seed=torch.arange(5, device=device), top_k=20).cpu()
    assert tokens[:3].tolist() == [-1, -1, -1]
    assert 290 <= int(tokens[3]) < 300 and 0 <= int(tokens[4]) < 300
    probs = llmkern.sampling_probs(logits, top_k=20)
    assert bool((probs[:3] == 0).all())
    _check_probs(logits[3:], dict(temperature=torch.ones(2, device=device), top_k=torch.full((2,), 20, device=device),
                                  top_p=torch.ones(2, device=device), min_p=torch.zeros(2, device=device)))
    assert torch.equal(llmkern.sample(logits, temperature=0.0).cpu()[:3], torch.tensor([-1, -1, -1]))


def test_scalar_params_and_torch_compile(device):
    logits = _logits(3, 250, torch.float16, device, seed=11)
    seeds = torch.tensor([7, 8, 9], device=device)
    kw = dict(temperature=0.7, top_k=30, top_p=0.9, min_p=0.02)
    eager = llmkern.sample(logits, seed=seeds, **kw)
    # aot_eager traces through the fake (meta) implementations without inductor's codegen (slow on CPU).
    compiled = torch.compile(lambda x, s: llmkern.sample(x, seed=s, **kw), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(logits, seeds), eager)
    assert torch.equal(eager.cpu(), reference.sample(logits, seed=seeds, **kw))
    probs = torch.compile(lambda x: llmkern.sampling_probs(x, **kw), fullgraph=True, backend="aot_eager")(logits)
    assert torch.equal(probs, llmkern.sampling_probs(logits, **kw))


def test_huge_top_k_is_off(device):
    # k >= vocab keeps everything, however large (clamped, not wrapped, on the way to the kernel's int32)
    logits = _logits(2, 60, torch.float32, device, seed=12)
    off = llmkern.sampling_probs(logits)
    assert torch.equal(llmkern.sampling_probs(logits, top_k=2 ** 40), off)
    assert torch.equal(llmkern.sampling_probs(logits, top_k=torch.tensor([2 ** 40, 2 ** 33], device=device)), off)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16])
def test_narrow_integer_top_k(device, dtype):
    logits = _logits(3, 50, torch.float32, device)
    top_k = torch.tensor([1, 1, 0], dtype=dtype, device=device)
    assert torch.equal(llmkern.SamplingParams(top_k=top_k, batch=3, device=device).top_k,
                       torch.tensor([1, 1, 0], dtype=torch.int32, device=device))
    assert torch.equal(llmkern.sample(logits, top_k=top_k, seed=1)[:2], logits[:2].argmax(-1))


def test_empty_batch(device):
    logits = torch.empty(0, 100, device=device)
    assert llmkern.sample(logits, seed=1).shape == (0,)
    assert llmkern.sampling_probs(logits).shape == (0, 100)


# -------------------------------------------------------------------------------------------- bad input
_BAD = [
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(min_p=1.01), "min_p"),
    (dict(seed=1.5), "seed"),
    (dict(seed=2 ** 64), "seed"),
    (dict(seed=1, generator=torch.Generator()), "seed"),
    ("temperature_len", "temperature"),
    ("top_k_dtype", "top_k"),
    ("top_p_range_tensor", "top_p"),
    ("min_p_2d", "min_p"),
    ("seed_dtype", "seed"),
    ("seed_len", "seed"),
    ("temperature_device", "temperature"),
    ("temperature_f64_overflow", "temperature"),   # finite in float64, inf once cast to the kernel's float32
    ("top_k_int64_negative", "top_k"),
]


@pytest.mark.parametrize("bad,name", _BAD, ids=[f"{n}-{i}" for i, (_, n) in enumerate(_BAD)])
def test_bad_parameters_raise_value_error(device, no_kernel, bad, name):
    logits = _logits(3, 50, torch.float32, device)
    tensor_cases = {
        "temperature_len": dict(temperature=torch.ones(2, device=device)),
        "top_k_dtype": dict(top_k=torch.ones(3, device=device)),
        "top_p_range_tensor": dict(top_p=torch.tensor([0.5, 0.0, 1.0], device=device)),
        "min_p_2d": dict(min_p=torch.zeros(3, 1, device=device)),
        "seed_dtype": dict(seed=torch.ones(3, dtype=torch.int32, device=device)),
        "seed_len": dict(seed=torch.ones(4, dtype=torch.int64, device=device)),
        "temperature_device": dict(temperature=torch.ones(3, device="meta")),
        "temperature_f64_overflow": dict(temperature=torch.tensor([1.0, 1e300, 1.0], dtype=torch.float64,
                                                                  device=device)),
        "top_k_int64_negative": dict(top_k=torch.tensor([5, -2 ** 40, 0], device=device)),
    }
    kw = tensor_cases[bad] if isinstance(bad, str) else bad
    with pytest.raises(ValueError, match=name):
        llmkern.sample(logits, **kw)
    if "seed" not in kw and "generator" not in kw:
        with pytest.raises(ValueError, match=name):
            llmkern.sampling_probs(logits, **kw)


def test_bad_logits(device, no_kernel):
    with pytest.raises(TypeError, match="logits"):
        llmkern.sample(torch.zeros(2, 10, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="logits"):
        llmkern.sample(torch.zeros(10, device=device))
    with pytest.raises(ValueError, match="logits"):
        llmkern.sampling_probs(torch.zeros(2, 0, device=device))


def test_prebuilt_params_cannot_be_swapped(device, no_kernel):
    """A SamplingParams' tensors cannot be reassigned, and one changed in place to another shape or dtype is refused
    before the kernel (which reads batch int32/float32 values from each) runs."""
    logits = _logits(3, 50, torch.float32, device)
    params = llmkern.SamplingParams(batch=3, device=device)
    with pytest.raises(AttributeError):
        params.top_k = torch.ones(1, dtype=torch.int32, device=device)
    params.top_k.resize_(1)
    with pytest.raises(ValueError, match="top_k"):
        llmkern.sample(logits, params=params, seed=1)
    params = llmkern.SamplingParams(batch=3, device=device)
    params.temperature.data = params.temperature.double()
    with pytest.raises(ValueError, match="temperature"):
        llmkern.sampling_probs(logits, params=params)


# -------------------------------------------------------------------------------------------- hot path
@pytest.mark.cpu_backends("interpreter")   # the Triton implementation's host path: the one a CUDA call runs
def test_prebuilt_params_make_no_host_sync(device, no_host_sync):
    """Tensor parameters checked once where they are built (SamplingParams): sample and sampling_probs with them and
    a seed tensor make no device-to-host transfer (issue 11), and draw what the keyword path draws."""
    logits = _logits(4, 300, torch.float32, device, seed=13)
    seeds = torch.arange(4, device=device)
    raw = dict(temperature=torch.tensor([0.7, 0.0, 1.3, 1.0], device=device),
               top_k=torch.tensor([0, 5, 50, 3], device=device),
               top_p=torch.tensor([0.9, 1.0, 0.5, 1.0], device=device),
               min_p=torch.tensor([0.0, 0.1, 0.0, 0.05], device=device))
    params = llmkern.SamplingParams(**raw, batch=4, device=device)      # the range check: one sync per tensor
    with no_host_sync():
        tokens = llmkern.sample(logits, params=params, seed=seeds)
        probs = llmkern.sampling_probs(logits, params=params)
        with pytest.raises(AssertionError, match="host sync"):         # the keyword path checks values per call
            llmkern.sample(logits, seed=seeds, **raw)
    assert torch.equal(tokens, llmkern.sample(logits, seed=seeds, **raw))
    assert torch.equal(probs, llmkern.sampling_probs(logits, **raw))
    raw["temperature"][0] = float("nan")      # params hold their own copies: a later write cannot skip the check
    assert torch.equal(llmkern.sample(logits, params=params, seed=seeds), tokens)
    with pytest.raises(ValueError, match="temperature"):
        llmkern.SamplingParams(**raw, batch=4, device=device)
    with pytest.raises(ValueError, match="not both"):
        llmkern.sample(logits, params=params, top_k=3, seed=seeds)
    with pytest.raises(ValueError, match="not both"):     # a keyword at its default value is not ignored either
        llmkern.sampling_probs(logits, params=params, temperature=1.0)
    with pytest.raises(ValueError, match="batch"):
        llmkern.sampling_probs(logits[:2], params=params)
    with pytest.raises(TypeError, match="params"):
        llmkern.sampling_probs(logits, params=tuple(params))


@pytest.mark.parametrize("batch,exc", [(-1, ValueError), ("2", TypeError), (2.0, TypeError), (True, TypeError)])
def test_params_bad_batch(batch, exc):
    with pytest.raises(exc, match="batch"):
        llmkern.SamplingParams(0.5, batch=batch)
