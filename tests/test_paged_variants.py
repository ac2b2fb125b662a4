"""The attention variants on the paged KV cache (issue 12): the fp8 cache (PagedKVCache storage, paged_kv_write's
quantization), against llmkern.reference.

fp8 writes are compared bit for bit with reference.quantize_kv (torch's own float32 -> fp8 cast, to nearest even,
after a float32 division and saturation): the kernel rounds on the fp8 grid itself (kernels/rounding.py), so a wrong
rounding, a missed saturation or a wrong head's scale changes bits.
"""
import pytest
import torch

import llmkern
from llmkern import reference as ref

pytestmark = pytest.mark.cpu_backends("interpreter", "cpp")   # on CPU: the C++ adapters hand fp8 to the reference

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


# ------------------------------------------------------------------------------------------------------ fp8 write
@pytest.mark.parametrize("cache_dtype,x_dtype", [(E4M3, torch.float16), (E4M3, torch.float32), (E5M2, torch.bfloat16)])
def test_fp8_write_is_the_reference_quantization(device, cache_dtype, x_dtype):
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


@pytest.mark.parametrize("cache_dtype", [E4M3, E5M2])
def test_fp8_rounding_ties_and_saturation(device, cache_dtype):
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
    for bad in (dict(k_scale=0.0), dict(v_scale=torch.ones(3)), dict(k_scale=torch.ones(2, dtype=torch.float16))):
        with pytest.raises((ValueError, TypeError), match="scale"):
            llmkern.PagedKVCache(1, 2, 4, 2, 32, dtype=E4M3, **bad)
    with pytest.raises(ValueError, match="fp8 caches only"):
        llmkern.PagedKVCache(1, 2, 4, 2, 32, v_scale=2.0)
