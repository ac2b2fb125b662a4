"""The attention variants on the paged KV cache (issue 12): the fp8 cache (PagedKVCache storage, paged_kv_write's
quantization, attention over it in the one-shots and a plan's run), ALiBi and attention sinks in paged decode and
mixed steps, against llmkern.reference.

fp8 writes are compared bit for bit with reference.quantize_kv (torch's own float32 -> fp8 cast, to nearest even,
after a float32 division and saturation): the kernel rounds on the fp8 grid itself (kernels/rounding.py), so a wrong
rounding, a missed saturation or a wrong head's scale changes bits.
"""
import pytest
import torch

import llmkern
from llmkern import reference as ref
from test_paged_attention import _make
from tolerance import assert_fa_close

pytestmark = pytest.mark.cpu_backends("interpreter", "cpp")   # on the cpp backend every variant runs in C++ (cpp_calls)

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


# ------------------------------------------------------------------------------------------------------ fp8 write
@pytest.mark.parametrize("cache_dtype,x_dtype", [(E4M3, torch.float16), (E4M3, torch.float32), (E5M2, torch.bfloat16)])
def test_fp8_write_is_the_reference_quantization(device, backend, cpp_calls, cache_dtype, x_dtype):
    """Per-head tensor scales for K, a float for V; values from 1e-4 (fp8 subnormals) to beyond the format's range
    (saturated), skipped slots, a strided k: every written byte equals reference.quantize_kv's, every other byte
    is untouched."""
    g = torch.Generator().manual_seed(0)
    kc = torch.randn(5, 16, 2, 64, generator=g).to(cache_dtype).to(device)
    vc = torch.randn(5, 16, 2, 64, generator=g).to(cache_dtype).to(device)
    magnitude = 10.0 ** torch.randint(-4, 6, (14, 2, 64), generator=g)
    k = (torch.randn(14, 2, 64, generator=g) * magnitude).to(x_dtype).to(device)[::2]
    v = torch.randn(7, 2, 64, generator=g).to(x_dtype).to(device)
    k_scale = torch.tensor([0.37, 3.0], device=device)
    slots = torch.tensor([79, 0, -1, 17, 31, -1, 40], dtype=torch.int64, device=device)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    ref.paged_kv_write(k, v, kc_ref, vc_ref, slots, k_scale, 0.05)
    llmkern.paged_kv_write(k, v, kc, vc, slots, k_scale=k_scale, v_scale=0.05)
    assert torch.equal(_bits(kc), _bits(kc_ref)) and torch.equal(_bits(vc), _bits(vc_ref))
    big = torch.finfo(cache_dtype).max
    assert kc.float().abs().max() == big   # some values saturated
    assert backend != "cpp" or cpp_calls == ["paged_kv_write"]


@pytest.mark.parametrize("cache_dtype", [E4M3, E5M2])
def test_fp8_rounding_ties_and_saturation(device, backend, cpp_calls, cache_dtype):
    """Values exactly halfway between two fp8 neighbours go to the even one, normals and subnormals; beyond the
    largest value they saturate (+-448 / +-57344, never NaN), NaN stays NaN; -0 keeps its sign."""
    info = torch.finfo(cache_dtype)
    mant = 3 if cache_dtype == E4M3 else 2
    step, sub = 2.0 ** -mant, info.smallest_normal * 2.0 ** -mant     # spacing in [1, 2); subnormal spacing
    ties = [1 + step / 2, 1 + 3 * step / 2, -(1 + step / 2), 8 * (1 + 5 * step / 2), sub / 2, 3 * sub / 2,
            -5 * sub / 2, info.smallest_normal - sub / 2]
    want_even = [1.0, 1 + 2 * step, -1.0, 8 * (1 + 2 * step), 0.0, 2 * sub, -2 * sub, info.smallest_normal]
    special = [info.max * 1.1, -info.max * 4, float("inf"), float("-inf"), 1e30, -0.0, float("nan")]
    x = torch.tensor(ties + special + [0.0] * (32 - len(ties) - len(special)), device=device).view(1, 1, 32)
    kc = torch.zeros(1, 1, 1, 32, dtype=cache_dtype, device=device)
    llmkern.paged_kv_write(x, x, kc, kc.clone(), torch.zeros(1, dtype=torch.int64, device=device),
                           k_scale=1.0, v_scale=1.0)
    got = kc.float().flatten().tolist()
    assert got[:len(ties)] == want_even
    n = len(ties)
    assert got[n:n + 5] == [info.max, -info.max, info.max, -info.max, info.max]
    assert str(got[n + 5]) == "-0.0" and got[n + 6] != got[n + 6]
    assert backend != "cpp" or cpp_calls == ["paged_kv_write"]


def test_fp8_cache_storage(device):
    """PagedKVCache in fp8: one byte per element, scales per layer and KV head (1.0 unless given), and a forked,
    partly filled block copied byte for byte on the first append (copy-on-write)."""
    cache = llmkern.PagedKVCache(2, 4, 4, 2, 32, dtype=E5M2, device=device,
                                 k_scale=torch.tensor([[0.5], [2.0]]), v_scale=0.25)
    assert cache.k_cache(1).dtype == E5M2 and cache.k_cache(1).element_size() == 1
    assert cache.k_scale(1).tolist() == [2.0, 2.0] and cache.v_scale(0).tolist() == [0.25, 0.25]
    assert cache.k_scale(0).device.type == torch.device(device).type
    assert llmkern.PagedKVCache(1, 1, 4, 2, 32, dtype=E4M3).k_scale(0).tolist() == [1.0, 1.0]
    assert llmkern.PagedKVCache(1, 1, 4, 2, 32).k_scale(0) is None
    x = torch.randn(6, 2, 32, generator=torch.Generator().manual_seed(1)).to(device)
    slots = cache.append("a", 6)
    for layer in range(2):
        llmkern.paged_kv_write(x, x, cache.k_cache(layer), cache.v_cache(layer), slots,
                               k_scale=cache.k_scale(layer), v_scale=cache.v_scale(layer))
    cache.fork("a", "b")
    cache.append("b", 1)
    old, new = cache.block_table("a")[1], cache.block_table("b")[1]
    assert old != new
    for layer in range(2):
        assert torch.equal(_bits(cache.k_cache(layer)[new, :2]), _bits(cache.k_cache(layer)[old, :2]))


def test_fp8_scale_bad_input(device, no_kernel):
    kc = torch.zeros(2, 4, 2, 32, dtype=E4M3, device=device)
    k = torch.zeros(3, 2, 32, device=device)
    slots = torch.tensor([0, 1, 2], device=device)
    ok = dict(k_scale=1.0, v_scale=torch.ones(2, device=device))
    cases = [
        (ValueError, "k_scale is required", dict(ok, k_scale=None)),
        (ValueError, "v_scale is required", dict(ok, v_scale=None)),
        (ValueError, "k_scale must be a finite scale", dict(ok, k_scale=0.0)),
        (ValueError, "k_scale must be a finite scale", dict(ok, k_scale=-1.0)),
        (ValueError, "k_scale must be a finite scale", dict(ok, k_scale=float("nan"))),
        (ValueError, "k_scale must be a finite scale", dict(ok, k_scale=float("inf"))),
        (ValueError, "k_scale must be a finite scale", dict(ok, k_scale=1e-40)),     # subnormal
        (ValueError, "k_scale must be a finite scale", dict(ok, k_scale=1e36)),      # 448 * 1e36 overflows
        (ValueError, "k_scale must be a finite scale", dict(ok, k_scale=10 ** 400)),  # float() would overflow
        (ValueError, "v_scale must be a finite scale", dict(ok, v_scale=-10 ** 400)),
        (ValueError, "v_scale must be a finite scale", dict(ok, v_scale=torch.tensor([1.0, 0.0], device=device))),
        (ValueError, "v_scale must be a finite scale", dict(ok, v_scale=torch.tensor([float("nan"), 1.0],
                                                                                      device=device))),
        (ValueError, "one scale per KV head", dict(ok, v_scale=torch.ones(3, device=device))),
        (TypeError, "v_scale", dict(ok, v_scale=torch.ones(2, dtype=torch.float16, device=device))),
        (TypeError, "k_scale must be a float", dict(ok, k_scale="1")),
    ]
    for exc, msg, kw in cases:
        with pytest.raises(exc, match=msg):
            llmkern.paged_kv_write(k, k, kc, kc.clone(), slots, **kw)
    with pytest.raises(ValueError, match="fp8 caches only"):
        llmkern.paged_kv_write(k, k, kc.float(), kc.float(), slots, k_scale=1.0)
    with pytest.raises(TypeError, match="v_cache"):
        llmkern.paged_kv_write(k, k, kc, kc.to(E5M2), slots, **ok)
    with pytest.raises(TypeError, match="k must have dtype"):
        llmkern.paged_kv_write(k.int(), k.int(), kc, kc.clone(), slots, **ok)
    for bad in (dict(k_scale=0.0), dict(v_scale=torch.ones(3)), dict(k_scale=torch.ones(2, dtype=torch.float16)),
                dict(k_scale=10 ** 400)):
        with pytest.raises((ValueError, TypeError), match="scale"):
            llmkern.PagedKVCache(1, 2, 4, 2, 32, dtype=E4M3, **bad)
    with pytest.raises(ValueError, match="fp8 caches only"):
        llmkern.PagedKVCache(1, 2, 4, 2, 32, v_scale=2.0)


# --------------------------------------------------------------------------------- paged attention: fp8, ALiBi, sinks
# The mixed step of tests/test_paged_plan.py: a decode token over 100 keys, a whole prompt of 40, a sequence with no
# new token, a first decode token (one key), and a chunk of 21 over a cached prefix of 13.
MIXED_Q, MIXED_LEN = [1, 40, 0, 1, 21], [100, 40, 12, 1, 34]


def _cu(q_lens, device):
    return torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _fp8(kc, vc, cache_dtype, k_scale, v_scale):
    """The fp8 cache paged_kv_write makes of kc, vc (reference.quantize_kv: bit-exact with the write, tested above)."""
    return ref.quantize_kv(kc, k_scale, cache_dtype), ref.quantize_kv(vc, v_scale, cache_dtype)


def _check(out, q, kc, vc, bt, cu, sl, **kw):
    """FlashAttention's rule against the reference on the same (dequantized) cache: float64 truth, PyTorch in q's
    dtype (an fp8 cache dequantized in float32, rounded to q's dtype) as the baseline."""
    ref64 = ref.paged_prefill_attention(q.double(), kc if kc.dtype in ref.FP8_DTYPES else kc.double(),
                                        vc if vc.dtype in ref.FP8_DTYPES else vc.double(), bt, cu, sl, **kw)
    lowp = ref.paged_prefill_attention(q, kc, vc, bt, cu, sl, compute_dtype=q.dtype, **kw)
    assert_fa_close(out, ref64, lowp)
    return ref64


# Error of the fp8 result against the same call on the 16-bit cache it was quantized from, measured here (CPU,
# interpreter, this test's data: q, V ~ N(0, 1), scores of std <= 1, max |o| 2.6-2.9): e4m3fn 0.111 (4% of max |o|),
# e5m2 0.186 (6.5%). The bound, the format's mantissa step (2**-3 with e4m3's 3 bits, 2**-2 with e5m2's 2) times max |o|,
# leaves room for other data and still fails by far if a scale is dropped or applied twice (v_scale 0.03: a factor 33).
FP8_STEP = {E4M3: 2.0 ** -3, E5M2: 2.0 ** -2}


@pytest.mark.parametrize("cache_dtype,dtype", [(E4M3, torch.float16), (E5M2, torch.bfloat16)])
def test_fp8_cache_decode_prefill_and_plan(device, backend, cpp_calls, cache_dtype, dtype):
    """fp8 caches with per-KV-head k_scale tensors and a float v_scale: split decode (the merge), a mixed step
    through a plan (prefill tiles), each equal to the reference on the dequantized cache; the error against the
    16-bit cache is reported and bounded."""
    kc16, vc16, bt, sl, g = _make(device, seq_lens=MIXED_LEN, num_heads=8, num_kv_heads=2, head_dim=32,
                                  block_size=16, dtype=dtype, seed=3)
    k_scale = torch.tensor([0.02, 0.5], device=device)
    kc16 = kc16 * (2 * k_scale).to(dtype)[:, None]     # K heads at different magnitudes, so each needs its scale
    kc, vc = _fp8(kc16, vc16, cache_dtype, k_scale, 0.03)
    q = torch.randn(len(MIXED_LEN), 8, 32, generator=g).to(dtype).to(device)
    dec = _cu([1] * len(MIXED_LEN), device)
    out = llmkern.paged_decode_attention(q, kc, vc, bt, sl, num_splits=3, k_scale=k_scale, v_scale=0.03)
    _check(out, q, kc, vc, bt, dec, sl, k_scale=k_scale, v_scale=0.03)
    decode = llmkern.PagedAttentionPlan(bt, sl, num_heads=8, num_kv_heads=2, head_dim=32, num_blocks=kc.shape[0],
                                        block_size=16, dtype=dtype, kv_dtype=cache_dtype)
    _check(decode.run(q, kc, vc, k_scale=k_scale, v_scale=0.03), q, kc, vc, bt, dec, sl, k_scale=k_scale,
           v_scale=0.03)

    cu = _cu(MIXED_Q, device)
    qm = torch.randn(sum(MIXED_Q), 8, 32, generator=g).to(dtype).to(device)
    plan = llmkern.PagedAttentionPlan(bt, sl, cu, num_heads=8, num_kv_heads=2, head_dim=32, num_blocks=kc.shape[0],
                                      block_size=16, dtype=dtype, kv_dtype=cache_dtype)
    out = plan.run(qm, kc, vc, k_scale=k_scale, v_scale=0.03)
    _check(out, qm, kc, vc, bt, cu, sl, k_scale=k_scale, v_scale=0.03)
    vs_16bit = (out.double() - ref.paged_prefill_attention(qm.double(), kc16.double(), vc16.double(), bt, cu, sl))
    err = float(vs_16bit.abs().max())
    print(f"fp8 {cache_dtype} vs {dtype} cache: max |error| {err:.4f}, output max {float(out.abs().max()):.3f}")
    assert err < FP8_STEP[cache_dtype] * float(out.abs().max())
    assert backend != "cpp" or cpp_calls == ["paged_decode"] * 2 + ["paged_prefill"]


@pytest.mark.parametrize("cache_dtype", [E4M3, E5M2])
def test_fp8_cache_every_byte_reads_exactly(device, backend, cpp_calls, cache_dtype):
    """A one-token sequence's output is its V row: with all 256 fp8 bytes in it (subnormals, +-0, the largest
    values, NaN, and e5m2's inf), decode (split and not) and prefill return each byte's value times v_scale (a
    power of two: exact) in float32, bit for bit, NaN where the byte is NaN."""
    vc = torch.arange(256, dtype=torch.uint8).view(cache_dtype).view(1, 1, 1, 256).to(device)
    kc = torch.zeros_like(vc)
    bt = torch.zeros(2, 1, dtype=torch.int32, device=device)
    sl = torch.ones(2, dtype=torch.int32, device=device)
    q = torch.randn(2, 2, 256, generator=torch.Generator().manual_seed(5)).to(device)
    want = (vc.float() * 0.5).view(1, 1, 256).expand(2, 2, 256)
    scales = dict(k_scale=torch.tensor([3.0], device=device), v_scale=0.5)
    outs = [llmkern.paged_decode_attention(q, kc, vc, bt, sl, num_splits=n, **scales) for n in (1, 2)]
    outs.append(llmkern.paged_prefill_attention(q.view(2, 2, 256), kc, vc, bt, _cu([1, 1], device), sl, **scales))
    # Every byte on every backend: Triton 3.9's interpreter reads fp8's non-finite bytes as finite numbers (e4m3fn's
    # NaN as +-480, e5m2's inf and NaN as 65536 and up); the kernels' interpreter path decodes them (mma_operand).
    for out in outs:
        torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True)
    assert backend != "cpp" or cpp_calls == ["paged_decode"] * 2 + ["paged_prefill"]


@pytest.mark.parametrize("num_heads,num_kv_heads,kw", [
    (2, 2, dict(num_splits=2)),                  # one row per program (broadcast path), splits merged with sinks
    (8, 2, dict(window=(30, -1), num_splits=1)),  # GQA rows (MMA path), windowed, the sinks in the kernel
], ids=["mha-split", "gqa-window"])
def test_alibi_and_sinks_decode_and_mixed_step(device, backend, cpp_calls, num_heads, num_kv_heads, kw):
    """ALiBi slopes and sinks together (slopes at twice the paper's, so the bias matters over 100 keys; one sink
    -inf: no sink for that head) on decode and on a mixed step through a plan, against the reference; and the sinks
    do change the output."""
    kc, vc, bt, sl, g = _make(device, seq_lens=MIXED_LEN, num_heads=num_heads, num_kv_heads=num_kv_heads,
                              head_dim=32, block_size=16, dtype=torch.float16, seed=4)
    slopes = (2 * llmkern.alibi_slopes(num_heads)).to(device)
    sinks = torch.randn(num_heads, generator=g).mul(3).to(device)
    sinks[0] = float("-inf")
    variants = dict(alibi_slopes=slopes, sinks=sinks, window=kw.get("window", (-1, -1)))
    q = torch.randn(len(MIXED_LEN), num_heads, 32, generator=g).half().to(device)
    out = llmkern.paged_decode_attention(q, kc, vc, bt, sl, **variants, num_splits=kw.get("num_splits"))
    _check(out, q, kc, vc, bt, _cu([1] * len(MIXED_LEN), device), sl, **variants)
    without = llmkern.paged_decode_attention(q, kc, vc, bt, sl, alibi_slopes=slopes, window=variants["window"],
                                             num_splits=kw.get("num_splits"))
    assert (out - without)[:, 1:].abs().max() > 1e-2 and torch.equal(out[:, 0], without[:, 0])

    cu = _cu(MIXED_Q, device)
    qm = torch.randn(sum(MIXED_Q), num_heads, 32, generator=g).half().to(device)
    plan = llmkern.PagedAttentionPlan(bt, sl, cu, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=32,
                                      num_blocks=kc.shape[0], block_size=16, dtype=torch.float16)
    _check(plan.run(qm, kc, vc, **variants), qm, kc, vc, bt, cu, sl, causal=True, **variants)
    out = llmkern.paged_prefill_attention(qm, kc, vc, bt, cu, sl, causal=True, **variants)
    _check(out, qm, kc, vc, bt, cu, sl, causal=True, **variants)
    assert backend != "cpp" or cpp_calls == ["paged_decode"] * 2 + ["paged_prefill"] * 2


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # the interpreter's NaN math
@pytest.mark.parametrize("bad_sink", [float("nan"), float("inf")])
def test_plan_run_nan_or_inf_sink_gives_nan_rows(device, backend, cpp_calls, bad_sink):
    """PagedAttentionPlan.run does not read the sinks' values (no sync); its docstring promises NaN rows for a NaN
    there, nothing worse. A NaN or +inf sink makes that head's softmax sum NaN: its rows are NaN on every backend
    (the C++ backend returned zeros, as for a row that saw no key), the other heads match the same run without the
    bad sink. Decode (one split and two) and a mixed step."""
    kc, vc, bt, sl, g = _make(device, seq_lens=[5, 20], num_heads=4, num_kv_heads=2, head_dim=32, block_size=4,
                              dtype=torch.float16, seed=6)
    sinks = torch.tensor([bad_sink, 0.5, -1.0, 2.0], device=device)
    for cu, num_splits in [(None, 1), (None, 2), (_cu([2, 3], device), None)]:
        plan = llmkern.PagedAttentionPlan(bt, sl, cu, num_heads=4, num_kv_heads=2, head_dim=32,
                                          num_blocks=kc.shape[0], block_size=4, dtype=torch.float16,
                                          num_splits=num_splits)
        q = torch.randn(plan.num_tokens, 4, 32, generator=g).half().to(device)
        out = plan.run(q, kc, vc, sinks=sinks)
        good = plan.run(q, kc, vc, sinks=torch.where(sinks.isnan() | sinks.isinf(), 0.0, sinks))
        assert out[:, 0].isnan().all(), (cu, num_splits)
        torch.testing.assert_close(out[:, 1:], good[:, 1:], rtol=0, atol=0)
    assert backend != "cpp" or cpp_calls == ["paged_decode"] * 4 + ["paged_prefill"] * 2


def test_fp8_write_scale_or_slots_inside_the_cache_refused(device, no_kernel):
    """A k_scale or slot_mapping tensor viewed from the bytes of a cache the write overwrites: its stores would
    change the scale or the slots of the tokens written after them (31 of 32 rows quantized with a clobbered scale,
    before this was refused); refused by name before anything is written."""
    buf = torch.zeros(8, 4, 2, 32, dtype=torch.uint8, device=device)
    kc, vc = buf.view(E4M3), torch.zeros(8, 4, 2, 32, dtype=E4M3, device=device)
    k = torch.ones(2, 2, 32, device=device)
    slots = torch.tensor([31, 30], device=device)
    k_scale = buf.view(-1)[-8:].view(torch.float32)        # slot 31's last bytes
    k_scale.fill_(0.5)
    inside = buf.view(-1)[8:24].view(torch.int64)           # slot 0's bytes
    inside.copy_(slots)
    before = buf.clone()
    with pytest.raises(ValueError, match="k_scale is read while k_cache is written"):
        llmkern.paged_kv_write(k, k, kc, vc, slots, k_scale=k_scale, v_scale=1.0)
    with pytest.raises(ValueError, match="slot_mapping is read while k_cache is written"):
        llmkern.paged_kv_write(k, k, kc, vc, inside, k_scale=1.0, v_scale=1.0)
    with pytest.raises(ValueError, match="v_scale is read while k_cache is written"):
        llmkern.paged_kv_write(k, k, kc, vc, slots, k_scale=1.0, v_scale=k_scale)
    assert torch.equal(buf, before) and not vc.view(torch.uint8).any()


def test_paged_variants_bad_input(device, no_kernel):
    """Refused before any launch: a missing or stray scale, wrong-length or wrong-dtype slopes and sinks, bad values
    (one-shots), a plan's cache dtype mismatch."""
    kc16, vc16, bt, sl, _ = _make(device, seq_lens=[5, 9], num_heads=4, num_kv_heads=2, head_dim=32, block_size=4,
                                  dtype=torch.float16)
    kc, vc = kc16.to(E5M2), vc16.to(E5M2)
    q = torch.zeros(2, 4, 32, dtype=torch.float16, device=device)
    cu = _cu([1, 1], device)
    ok = dict(k_scale=1.0, v_scale=torch.ones(2, device=device))
    cases = [
        (ValueError, "k_scale is required", kc, dict(ok, k_scale=None)),
        (ValueError, "fp8 caches only", kc16, dict(k_scale=1.0)),
        (ValueError, "one scale per KV head", kc, dict(ok, v_scale=torch.ones(4, device=device))),
        (ValueError, "v_scale must be a finite scale", kc, dict(ok, v_scale=torch.tensor([1.0, float("nan")],
                                                                                        device=device))),
        (ValueError, "alibi_slopes must have one value per query head", kc16, dict(alibi_slopes=torch.ones(2))),
        (TypeError, "sinks", kc16, dict(sinks=torch.ones(4, dtype=torch.float16, device=device))),
        (ValueError, "alibi_slopes must be finite", kc16, dict(alibi_slopes=torch.full((4,), float("inf"),
                                                                                      device=device))),
        (ValueError, "sinks must be <= 2", kc16, dict(sinks=torch.full((4,), float("nan"), device=device))),
        (ValueError, "k_scale must be a finite scale", kc, dict(ok, k_scale=10 ** 400)),   # not OverflowError
        # each in range, but the kernels fold k_scale into the score scale: 1e40 overflows float32 (NaN rows where
        # the scores, about 1e10 for q ~ 1e-30, are finite)
        (ValueError, r"scale \* k_scale must stay within float32", kc,
         dict(ok, k_scale=torch.full((2,), 1e20, device=device), scale=1e20)),
    ]
    for exc, msg, cache, kw in cases:
        v = vc if cache.dtype == E5M2 else vc16
        with pytest.raises(exc, match=msg):
            llmkern.paged_decode_attention(q, cache, v, bt, sl, **kw)
        with pytest.raises(exc, match=msg):
            llmkern.paged_prefill_attention(q, cache, v, bt, cu, sl, **kw)
    plan = llmkern.PagedAttentionPlan(bt, sl, num_heads=4, num_kv_heads=2, head_dim=32, num_blocks=kc.shape[0],
                                      block_size=4, dtype=torch.float16, kv_dtype=E5M2)
    with pytest.raises(TypeError, match="k_cache has dtype"):
        plan.run(q, kc16, vc16)
    with pytest.raises(ValueError, match="k_scale is required"):
        plan.run(q, kc, vc, v_scale=1.0)
    with pytest.raises(ValueError, match="sinks must have one value per query head"):
        plan.run(q, kc, vc, **ok, sinks=torch.zeros(2, device=device))
    with pytest.raises(ValueError, match=r"scale \* k_scale must stay within float32"):
        plan.run(q, kc, vc, k_scale=1e20, v_scale=1.0, scale=-1e20)
    with pytest.raises(ValueError, match="v_scale must be a finite scale"):
        plan.run(q, kc, vc, k_scale=1.0, v_scale=10 ** 400)
    with pytest.raises(TypeError, match="kv_dtype"):
        llmkern.PagedAttentionPlan(bt, sl, num_heads=4, num_kv_heads=2, head_dim=32, num_blocks=kc.shape[0],
                                   block_size=4, dtype=torch.float16, kv_dtype=torch.float32)
