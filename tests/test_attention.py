"""Fused prefill attention against the float64 reference (FlashAttention's tolerance rule).

Without a GPU every call runs the Triton kernel under the interpreter, which uses the first config of each class
(BLOCK_M=64 rows, BLOCK_N=32 keys for 16-bit inputs; 32 x 32 or 32 x 16 for fp32). The shapes below are chosen
around those tiles: lengths that are not multiples of them, several tiles per row block so that both interior
(unmasked) and boundary (masked) tiles run, while staying small enough for the interpreter.
"""
import pytest
import torch

import llmkern
from llmkern import _utils, reference
from tolerance import assert_fa_close

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32

pytestmark = pytest.mark.cpu_backends("interpreter", "cpp")   # on CPU: the Triton interpreter and the C++ backend


def _randn(shape, dtype, device, g):
    return torch.randn(*shape, generator=g).to(dtype).to(device)


def _qkv(batch, seqlen_q, seqlen_k, num_heads, num_kv_heads, head_dim, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (_randn((batch, seqlen_q, num_heads, head_dim), dtype, device, g),
            _randn((batch, seqlen_k, num_kv_heads, head_dim), dtype, device, g),
            _randn((batch, seqlen_k, num_kv_heads, head_dim), dtype, device, g))


def _assert_same_math(a, b):
    """Two calls that differ only in what the autotuner keys on (return_lse, varlen): bit-identical under the
    interpreter (one config per class); on a GPU each may be tuned to a different tile, which reorders the fp32
    sums and the 16-bit rounding of p, so allow a couple of 16-bit ulps of a unit-scale output."""
    if _utils.INTERPRET:
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    else:
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=4e-3 if a.dtype != F32 else 1e-5)


def _check(q, k, v, **kw):
    """Ours vs float64, with PyTorch-in-the-input-dtype as the error baseline, for o and lse."""
    o, lse = llmkern.attention(q, k, v, return_lse=True, **kw)
    ref_o, ref_lse = reference.attention(q.double(), k.double(), v.double(), return_lse=True, **kw)
    base_o, base_lse = reference.attention(q, k, v, return_lse=True, compute_dtype=q.dtype, **kw)
    assert o.dtype == q.dtype and o.shape == q.shape and o.device == q.device
    assert lse.dtype == F32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert_fa_close(o.cpu(), ref_o.cpu(), base_o.cpu())
    # lse is fp32 in the kernel whatever the input dtype: hold it to the fp32 floor plus the input's own error
    assert_fa_close(lse.cpu(), ref_lse.cpu(), base_lse.cpu().float(), floor=1e-4, what="lse")
    o_only = llmkern.attention(q, k, v, **kw)  # the return_lse=False path computes the same o
    _assert_same_math(o_only, o)
    return o, lse


# ----------------------------------------------------------------------------------------------- shapes and masks
@pytest.mark.parametrize("seqlen_q,seqlen_k,causal,window", [
    (70, 70, False, (-1, -1)),     # lengths not a multiple of either tile
    (70, 70, True, (-1, -1)),      # causal, the diagonal crosses boundary tiles
    (33, 33, True, (-1, -1)),      # causal, one key past a 32-key tile: the last key of the last row counts
    (65, 65, True, (-1, -1)),      # causal, one row and one key past a 64-row / 32-key tile
    (1, 77, False, (-1, -1)),      # one query token
    (1, 77, True, (-1, -1)),       # one query token, causal: sees every key (bottom-right)
    (40, 100, True, (-1, -1)),     # seqlen_q < seqlen_k, causal: interior tiles fully visible, diagonal masked
    (100, 40, True, (-1, -1)),     # seqlen_q > seqlen_k, causal: the first 60 rows see no key (o = 0, lse = -inf)
    (130, 130, False, (20, 5)),    # sliding window both sides: tiles left and right of it are skipped
    (96, 160, True, (33, -1)),     # causal + left window (Mistral-style)
    (64, 128, False, (-1, 40)),    # right window only
    (50, 150, False, (0, 0)),      # each query sees exactly one key
])
def test_shapes_and_masks(device, seqlen_q, seqlen_k, causal, window):
    q, k, v = _qkv(2, seqlen_q, seqlen_k, 2, 1, 64, F16, device)
    _check(q, k, v, causal=causal, window=window)


def test_empty_rows_are_zero_with_minus_inf_lse(device):
    q, k, v = _qkv(1, 100, 40, 2, 2, 64, F16, device)
    o, lse = llmkern.attention(q, k, v, causal=True, return_lse=True)
    # bottom-right: query i sits at i + 40 - 100, so rows 0..59 see nothing
    assert torch.all(o[:, :60] == 0) and torch.all(lse[:, :, :60] == float("-inf"))
    assert torch.isfinite(lse[:, :, 60:]).all() and torch.isfinite(o).all()


def test_no_keys(device):
    q, k, v = _qkv(1, 5, 0, 2, 2, 64, F16, device)
    o, lse = llmkern.attention(q, k, v, return_lse=True)
    assert torch.all(o == 0) and torch.all(lse == float("-inf"))


@pytest.mark.parametrize("seqlen", [3, 20])    # scores of fewer keys than a vector (scalar max) and more
def test_nan_propagates_like_pytorch(device, seqlen):
    """A NaN in a visible key, or in a query, makes exactly the rows that see it NaN (PyTorch's softmax does the
    same); rows that cannot see the NaN key stay finite. On every backend and in the reference."""
    q, k, v = _qkv(1, seqlen, seqlen, 2, 2, 32, F32, device)
    k[0, 1, 0, 5] = float("nan")                 # key 1 of head 0: causal rows 1.. see it
    q[0, 0, 1, 3] = float("nan")                 # query 0 of head 1
    for out in (llmkern.attention(q, k, v, causal=True),
                reference.attention(q.cpu(), k.cpu(), v.cpu(), causal=True)):
        nan = torch.isnan(out).all(-1)           # (1, seqlen, heads): a row is NaN whole or not at all
        assert torch.equal(nan | torch.isfinite(out).all(-1), torch.ones_like(nan))
        expect = torch.zeros_like(nan)
        expect[0, 1:, 0] = True
        expect[0, 0, 1] = True
        assert torch.equal(nan.cpu(), expect.cpu())


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (8, 1)])  # GQA ratio 1, 4, and 8 = MQA
def test_gqa(device, num_heads, num_kv_heads):
    q, k, v = _qkv(1, 45, 70, num_heads, num_kv_heads, 64, F16, device)
    _check(q, k, v, causal=True)


@pytest.mark.parametrize("head_dim", [32, 64, 80, 96, 128, 136, 256])  # every class, padded (80, 96, 136) or not
def test_head_dims(device, head_dim):
    q, k, v = _qkv(1, 70, 90, 2, 1, head_dim, F16, device)
    _check(q, k, v, causal=True)


@pytest.mark.parametrize("dtype", [F16, BF16, F32])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_dtypes(device, dtype, head_dim):
    q, k, v = _qkv(2, 66, 66, 2, 1, head_dim, dtype, device)
    _check(q, k, v, causal=True)


@pytest.mark.parametrize("dtype", [F16, BF16, F32])
def test_softcap_and_scale(device, dtype):
    q, k, v = _qkv(1, 70, 100, 4, 2, 64, dtype, device)
    q = q * 3  # large scores so the cap matters: tanh saturates for some of them
    _check(q, k, v, softcap=5.0)
    _check(q, k, v, causal=True, softcap=2.0, scale=0.3, window=(30, -1))


def test_infinite_softcap_is_no_cap(device):
    """softcap=inf (and any cap above 2**127) means no cap: the same numbers as softcap=None, not NaN."""
    q, k, v = _qkv(1, 20, 30, 2, 1, 64, F32, device)
    plain = llmkern.attention(q, k, v, causal=True)
    for cap in (float("inf"), 1e300, 2.0 ** 128):
        torch.testing.assert_close(llmkern.attention(q, k, v, causal=True, softcap=cap), plain, rtol=0, atol=0)


def test_window_reaching_past_every_key(device):
    """A window side of 2**31 - 1 (or more) is unbounded: position + window used to wrap around in int32 and hide
    every key (an error of about 1)."""
    q, k, v = _qkv(1, 40, 40, 2, 2, 32, F32, device)
    for window in ((2 ** 31 - 1, 2 ** 31 - 1), (5, 2 ** 31 - 2), (2 ** 40, 3)):
        _check(q, k, v, window=window)


# Caps 1 to 1e6: scores of ~|10| sweep tanh's argument |s| / softcap from saturation down to ~1e-5 (issue 16.3).
SOFTCAP_SWEEP = [(F32, 1.0), (F32, 30.0), (F32, 1e3), (F32, 1e6), (F16, 1e6)]


@pytest.mark.parametrize("dtype,softcap", SOFTCAP_SWEEP)
def test_softcap_precision(device, dtype, softcap):
    """softcap * tanh(s / softcap) keeps fp32 accuracy for every cap. The earlier tanh, 1 - 2 / (exp(2x) + 1),
    cancelled for small x and gave an error that grew with the cap: 1.4e-4 at cap 1000 in fp32, where PyTorch's own
    error is 2e-6."""
    q, k, v = _qkv(1, 40, 70, 2, 1, 64, dtype, device, seed=3)
    _check(q * 3, k, v, causal=True, softcap=softcap)


def test_non_contiguous(device):
    g = torch.Generator().manual_seed(1)
    # q stored (batch, heads, seq, dim) and viewed as (batch, seq, heads, dim); k a head slice of a bigger tensor;
    # v with a strided last dim (the one case that is copied).
    q = _randn((2, 2, 70, 64), F16, device, g).transpose(1, 2)
    k = _randn((2, 90, 3, 64), F16, device, g)[:, :, 1:2]
    v = _randn((2, 90, 1, 128), F16, device, g)[..., ::2]
    assert not q.is_contiguous() and not k.is_contiguous() and v.stride(-1) == 2
    _check(q, k, v, causal=True)
    # a broadcast (stride 0) batch dim
    kb, vb = k[:1].expand(2, -1, -1, -1), v[:1].expand(2, -1, -1, -1)
    _check(q, kb, vb)


# rows of other blocks do see the NaN keys: numpy warns about their all-NaN row max under the interpreter
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered")
@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (10, -1))])
def test_skipped_tiles_are_never_read(device, causal, window):
    """Keys that no query of a row block can see are never loaded: poison them with NaN and the rows of that
    block stay finite (a kernel that loaded and masked them would get 0 * NaN = NaN in p @ V)."""
    q, k, v = _qkv(1, 256, 256, 2, 2, 64, F16, device)
    if causal:
        # rows 0..127 (one row block for every config, BLOCK_M <= 128) see keys <= 127; poison keys 192.. (more
        # than one BLOCK_N <= 64 away), then check those rows only
        poison, rows = slice(192, None), slice(0, 128)
    else:
        # query i sees keys i - 10 .. 255: every row block starting at 128 or later (BLOCK_M in 32..128) begins
        # its loop at key floor(118 / BLOCK_N) * BLOCK_N >= 64 (BLOCK_N <= 64), so keys 0..63 are never read
        poison, rows = slice(0, 64), slice(128, None)
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, poison] = float("nan")
    v_bad[:, poison] = float("nan")
    o_bad = llmkern.attention(q, k_bad, v_bad, causal=causal, window=window)
    o = llmkern.attention(q, k, v, causal=causal, window=window)
    assert torch.isfinite(o_bad[:, rows]).all()
    torch.testing.assert_close(o_bad[:, rows], o[:, rows], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- varlen
def _check_varlen(lens_q, lens_k, num_heads, num_kv_heads, head_dim, dtype, device, pad_rows=0, **kw):
    g = torch.Generator().manual_seed(2)
    total_q, total_k = sum(lens_q) + pad_rows, sum(lens_k)
    q = _randn((total_q, num_heads, head_dim), dtype, device, g)
    k = _randn((total_k, num_kv_heads, head_dim), dtype, device, g)
    v = _randn((total_k, num_kv_heads, head_dim), dtype, device, g)
    cu_q, cu_k = (torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
                  for lens in (lens_q, lens_k))
    o, lse = llmkern.attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), return_lse=True, **kw)
    assert o.shape == q.shape and lse.shape == (num_heads, total_q)
    n = sum(lens_q)
    ref_o, ref_lse = reference.attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, return_lse=True, **kw)
    base_o, base_lse = reference.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, compute_dtype=dtype, **kw)
    assert_fa_close(o[:n].cpu(), ref_o.cpu(), base_o.cpu())
    assert_fa_close(lse[:, :n].cpu(), ref_lse.cpu(), base_lse.cpu().float(), floor=1e-4, what="lse")
    # rows past cu_seqlens_q[-1] belong to no sequence: defined as 0 / -inf, never left uninitialised
    assert torch.all(o[n:] == 0) and torch.all(lse[:, n:] == float("-inf"))


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_very_different_lengths(device, causal):
    # an empty sequence, a single token, one spanning several tiles, seqlen_q > seqlen_k (causal: empty rows)
    _check_varlen([0, 1, 130, 7, 20], [3, 1, 150, 0, 9], 4, 2, 64, F16, device, causal=causal)


def test_varlen_window_softcap_bf16_padded_rows(device):
    _check_varlen([33, 1, 70], [33, 60, 100], 2, 1, 80, BF16, device, pad_rows=5, window=(16, 4), softcap=4.0)


def test_varlen_matches_batched(device):
    """Equal-length sequences packed: the varlen call gives the batched call's result."""
    q, k, v = _qkv(3, 40, 50, 4, 2, 64, F16, device)
    o, lse = llmkern.attention(q, k, v, causal=True, return_lse=True)
    cu_q = torch.arange(0, 121, 40, dtype=torch.int32, device=device)
    cu_k = torch.arange(0, 151, 50, dtype=torch.int32, device=device)
    ov, lsev = llmkern.attention_varlen(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, 40, 50,
                                        causal=True, return_lse=True)
    _assert_same_math(ov, o.flatten(0, 1))
    _assert_same_math(lsev, lse.permute(1, 0, 2).flatten(1))


# ----------------------------------------------------------------------------------------------- ALiBi and sinks
@pytest.mark.parametrize("seqlen_q,seqlen_k,causal,window,dtype", [
    (70, 70, True, (-1, -1), F16),     # causal: the bias grows along each row up to the diagonal
    (40, 100, False, (-1, -1), BF16),  # full attention, seqlen_q < seqlen_k: |p - j| on both sides of p
    (100, 40, True, (20, -1), F32),    # bottom-right alignment: the first 60 rows see nothing (o = 0)
    (65, 90, False, (10, 5), F16),     # a window on both sides
])
def test_alibi_and_sinks(device, seqlen_q, seqlen_k, causal, window, dtype):
    """alibi_slopes and sinks, alone and together (with softcap), against the float64 reference; slopes from
    llmkern.alibi_slopes scaled so the bias spans many score units across the sequence."""
    q, k, v = _qkv(1, seqlen_q, seqlen_k, 4, 2, 64, dtype, device, seed=4)
    slopes = (llmkern.alibi_slopes(4) * 4).to(device)
    sinks = torch.tensor([-1.0, 0.5, 3.0, float("-inf")], device=device)   # the last head: no sink
    _check(q, k, v, causal=causal, window=window, alibi_slopes=slopes)
    o, lse = _check(q, k, v, causal=causal, window=window, sinks=sinks, alibi_slopes=slopes, softcap=4.0)
    if seqlen_q > seqlen_k:   # rows that see no key: o = 0 and lse = the sink (-inf without one)
        empty = seqlen_q - seqlen_k
        assert torch.all(o[:, :empty] == 0)
        torch.testing.assert_close(lse[:, :, :empty].cpu(), sinks.cpu()[None, :, None].expand(1, 4, empty))


def test_sinks_as_gpt_oss_computes_them(device):
    """The sink is a logit in the softmax denominator, with no value: gpt-oss's eager formula (cat, softmax, drop the
    sink's column) in float64."""
    q, k, v = _qkv(1, 30, 30, 4, 1, 32, F32, device, seed=5)
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(6)).to(device) * 3
    scale = 32 ** -0.5
    scores = torch.einsum("bqhd,bkd->bhqk", q.double(), k[:, :, 0].double()) * scale
    scores = scores.masked_fill(~reference.attention_mask(30, 30, causal=True, device=device), float("-inf"))
    logits = torch.cat([scores, sinks.double()[None, :, None, None].expand(1, 4, 30, 1)], dim=-1)
    probs = torch.softmax(logits, dim=-1)[..., :-1]
    want = torch.einsum("bhqk,bkd->bqhd", probs, v[:, :, 0].double())
    got = llmkern.attention(q, k, v, causal=True, sinks=sinks)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_alibi_sinks_varlen(device):
    _check_varlen([33, 1, 70, 0], [40, 60, 70, 3], 4, 2, 64, F16, device, pad_rows=2, causal=True, window=(30, -1),
                  alibi_slopes=(llmkern.alibi_slopes(4) * 2).to(device),
                  sinks=torch.tensor([0.0, 1.0, -2.0, 5.0], device=device))


@pytest.mark.parametrize("num_heads", [1, 2, 8, 12, 16, 40, 96])
def test_alibi_slopes(num_heads):
    """The paper's slopes: 2^(-8 i / n) for a power of two n (8 heads: 1/2, 1/4, ..., 1/256, section 3); for other
    counts, BLOOM's recipe (transformers' BLOOM builds its biases from the same numbers)."""
    got = llmkern.alibi_slopes(num_heads)
    assert got.dtype == F32 and got.shape == (num_heads,)
    if num_heads & (num_heads - 1) == 0:
        want = torch.tensor([2.0 ** (-8 * i / num_heads) for i in range(1, num_heads + 1)])
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    torch.testing.assert_close(got, bloom._get_alibi_slopes(num_heads, torch.device("cpu")).float(), rtol=1e-6,
                               atol=0)
    if num_heads == 8:
        assert got.tolist() == [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625]


# ----------------------------------------------------------------------------------------------- bad input
def _t(*shape, dtype=F16):
    return torch.zeros(*shape, dtype=dtype)


_Q, _K = _t(1, 8, 4, 64), _t(1, 8, 2, 64)
_CU = torch.tensor([0, 8], dtype=torch.int32)


@pytest.mark.parametrize("call,exc,word", [
    (lambda: llmkern.attention(_Q, _t(1, 8, 3, 64), _t(1, 8, 3, 64)), ValueError, "num_kv_heads"),
    (lambda: llmkern.attention(_Q, _t(1, 8, 2, 32), _t(1, 8, 2, 32)), ValueError, "head_dim"),
    (lambda: llmkern.attention(_Q, _K, _t(1, 8, 2, 32)), ValueError, "v"),
    (lambda: llmkern.attention(_Q, _K.float(), _K), TypeError, "k"),
    (lambda: llmkern.attention(_Q, _K, _K.to("meta")), ValueError, "v"),
    (lambda: llmkern.attention(_t(1, 8, 4, 36), _t(1, 8, 2, 36), _t(1, 8, 2, 36)), ValueError, "head_dim"),
    (lambda: llmkern.attention(_t(1, 8, 4, 264), _t(1, 8, 2, 264), _t(1, 8, 2, 264)), ValueError, "head_dim"),
    (lambda: llmkern.attention(_t(1, 8, 4, 16), _t(1, 8, 2, 16), _t(1, 8, 2, 16)), ValueError, "head_dim"),
    (lambda: llmkern.attention(_Q.int(), _K.int(), _K.int()), TypeError, "q"),
    (lambda: llmkern.attention(_Q[0], _K[0], _K[0]), ValueError, "q"),
    (lambda: llmkern.attention(_Q, _t(2, 8, 2, 64), _t(2, 8, 2, 64)), ValueError, "batch"),
    (lambda: llmkern.attention(_Q, _K, _K, window=(-2, 0)), ValueError, "window"),
    (lambda: llmkern.attention(_Q, _K, _K, window=(3,)), TypeError, "window"),
    (lambda: llmkern.attention(_Q, _K, _K, softcap=0.0), ValueError, "softcap"),
    (lambda: llmkern.attention(_Q, _K, _K, softcap=-1.0), ValueError, "softcap"),
    (lambda: llmkern.attention(_Q, _K, _K, scale="x"), TypeError, "scale must be a float or None"),
    (lambda: llmkern.attention(_Q, _K, _K, scale=float("inf")), ValueError, "scale"),
    (lambda: llmkern.attention(_Q, _K, _K, scale=float("nan")), ValueError, "scale"),
    (lambda: llmkern.attention(_Q, _K, _K, scale=3e38), ValueError, "scale"),     # scale * log2(e) overflows
    (lambda: llmkern.attention(_Q, _K, _K, softcap=float("nan")), ValueError, "softcap"),
    (lambda: llmkern.attention(_Q, _K, _K, softcap=1e-40), ValueError, "softcap"),    # subnormal
    (lambda: llmkern.attention(_Q, _K, _K, scale=1e30, softcap=1e-9), ValueError, "softcap"),  # scale/softcap: inf
    (lambda: llmkern.attention(_Q, _K, _K, causal=1), TypeError, "causal"),
    (lambda: llmkern.attention(_Q, _K, _K, alibi_slopes=torch.ones(2)), ValueError, "alibi_slopes"),
    (lambda: llmkern.attention(_Q, _K, _K, alibi_slopes=torch.ones(4, dtype=F16)), TypeError, "alibi_slopes"),
    (lambda: llmkern.attention(_Q, _K, _K, alibi_slopes=torch.ones(1, 4)), ValueError, "alibi_slopes"),
    (lambda: llmkern.attention(_Q, _K, _K, alibi_slopes=[1.0] * 4), TypeError, "alibi_slopes"),
    (lambda: llmkern.attention(_Q, _K, _K, alibi_slopes=torch.ones(4, device="meta")), ValueError, "alibi_slopes"),
    (lambda: llmkern.attention(_Q, _K, _K, alibi_slopes=torch.tensor([1.0, float("nan"), 1.0, 1.0])), ValueError,
     "alibi_slopes"),
    (lambda: llmkern.attention(_Q, _K, _K, alibi_slopes=torch.full((4,), float("inf"))), ValueError, "alibi_slopes"),
    (lambda: llmkern.attention(_Q, _K, _K, alibi_slopes=torch.full((4,), 2.0 ** 97)), ValueError, "alibi_slopes"),
    (lambda: llmkern.attention(_Q, _K, _K, sinks=torch.zeros(8)), ValueError, "sinks"),
    (lambda: llmkern.attention(_Q, _K, _K, sinks=torch.zeros(4, dtype=torch.float64)), TypeError, "sinks"),
    (lambda: llmkern.attention(_Q, _K, _K, sinks=torch.tensor([0.0, 0.0, float("nan"), 0.0])), ValueError, "sinks"),
    (lambda: llmkern.attention(_Q, _K, _K, sinks=torch.full((4,), float("inf"))), ValueError, "sinks"),
    (lambda: llmkern.attention_varlen(_Q[0], _K[0], _K[0], _CU, _CU, 8, 8, sinks=torch.zeros(2)), ValueError,
     "sinks"),
    (lambda: llmkern.attention_varlen(_Q[0], _K[0], _K[0], _CU, _CU, 8, 8, alibi_slopes=torch.full((4,), -2.0 ** 100)),
     ValueError, "alibi_slopes"),
    (lambda: llmkern.alibi_slopes(0), ValueError, "num_heads"),
    (lambda: llmkern.alibi_slopes(10 ** 400), ValueError, "num_heads"),   # was OverflowError
    (lambda: llmkern.alibi_slopes(2 ** 40), ValueError, "num_heads"),     # was a list of 2**40 slopes (a hang)
    (lambda: llmkern.alibi_slopes(4.0), TypeError, "num_heads"),
    (lambda: llmkern.attention_varlen(_Q[0], _K[0], _K[0], _CU.long(), _CU, 8, 8), TypeError, "cu_seqlens_q"),
    (lambda: llmkern.attention_varlen(_Q[0], _K[0], _K[0], _CU, torch.tensor([0, 4, 8], dtype=torch.int32), 8, 8),
     ValueError, "cu_seqlens"),
    (lambda: llmkern.attention_varlen(_Q[0], _K[0], _K[0], _CU[None], _CU, 8, 8), ValueError, "cu_seqlens_q"),
    (lambda: llmkern.attention_varlen(_Q[0], _K[0], _K[0], _CU, torch.tensor([0, 9], dtype=torch.int32), 8, 9),
     ValueError, "cu_seqlens_k"),
    (lambda: llmkern.attention_varlen(_Q[0], _K[0], _K[0], torch.tensor([0, 5, 3], dtype=torch.int32),
                                      torch.tensor([0, 4, 8], dtype=torch.int32), 8, 8), ValueError, "cu_seqlens_q"),
    (lambda: llmkern.attention_varlen(_Q[0], _K[0], _K[0], torch.tensor([1, 8], dtype=torch.int32), _CU, 8, 8),
     ValueError, "cu_seqlens_q"),
    (lambda: llmkern.attention_varlen(_Q[0], _K[0], _K[0], _CU, _CU, 4, 8), ValueError, "max_seqlen_q"),
    (lambda: llmkern.attention_varlen(_Q[0], _K[0], _K[0], _CU, _CU, 8, 8.0), TypeError, "max_seqlen_k"),
    (lambda: llmkern.attention_varlen(_Q[0], _t(8, 3, 64), _t(8, 3, 64), _CU, _CU, 8, 8), ValueError,
     "num_kv_heads"),
    (lambda: llmkern.attention_varlen(_Q[0], _K[0], _K[0], _CU, _CU, 8, 8, window=(1, -5)), ValueError, "window"),
])
def test_bad_input(device, no_kernel, call, exc, word):
    with pytest.raises(exc, match=word):
        call()


# ----------------------------------------------------------------------------------------------- torch.compile
def test_torch_compile_fullgraph(device):
    q, k, v = _qkv(1, 40, 50, 4, 2, 64, F16, device)
    cu = torch.tensor([0, 15, 40], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 20, 50], dtype=torch.int32, device=device)

    def f(q, k, v):
        o, lse = llmkern.attention(q, k, v, causal=True, return_lse=True)
        ov = llmkern.attention_varlen(q[0], k[0], v[0], cu, cu_k, 25, 30, window=(8, -1), softcap=3.0)
        return o * 2, lse, ov

    eager = f(q, k, v)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
