"""llmkern.layers.linear (llmkern::linear): F.linear's result, on the C++ CPU kernel at decode shapes (csrc/linear.cpp)
and on F.linear elsewhere. Checked against a float64 reference with FlashAttention's tolerance rule."""
import pytest
import torch

from llmkern import cpu, layers
from tolerance import assert_fa_close

pytestmark = pytest.mark.cpu_backends("interpreter", "cpp")


def _randn(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 5, 16, 17])          # 17: past the C++ kernel's rows, F.linear's GEMM
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_float64(dtype, rows, bias, device, backend, monkeypatch):
    calls = []
    if backend == "cpp":                       # the C++ kernel must serve the decode shapes, F.linear the others
        lib = cpu._lib()
        monkeypatch.setattr(cpu, "_lib", lambda: calls.append(1) or lib)
    # out_features 37 (not a multiple of the kernel's 4-row blocks), in_features 100 (not of the vector width)
    x = _randn(rows, 100, dtype=dtype, seed=0).to(device)
    w = _randn(37, 100, dtype=dtype, seed=1).to(device)
    b = _randn(37, dtype=dtype, seed=2).to(device) if bias else None
    out = layers.linear(x, w, b)
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    assert out.dtype == dtype and out.shape == (rows, 37) and out.is_contiguous()
    assert_fa_close(out, ref, torch.nn.functional.linear(x, w, b))
    assert bool(calls) == (backend == "cpp" and rows <= cpu.LINEAR_MAX_ROWS)


def test_linear_leading_dims_and_strides(device):
    """(batch, seq, in) x, a weight whose rows are strided (every other row of a larger tensor) and one with a
    strided last dim (copied for the kernel): F.linear's values and shape."""
    x = _randn(2, 3, 64, dtype=torch.float32, seed=0).to(device)
    big = _randn(80, 128, dtype=torch.float32, seed=1).to(device)
    for w in (big[::2, :64], big[:40, ::2]):
        out = layers.linear(x, w)
        assert out.shape == (2, 3, 40)
        torch.testing.assert_close(out, torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)


def test_linear_bad_arguments_are_named(no_kernel):
    x = torch.randn(1, 8)
    with pytest.raises(ValueError, match="weight"):
        layers.linear(x, torch.randn(4, 9))
    with pytest.raises(ValueError, match="bias"):
        layers.linear(x, torch.randn(4, 8), torch.randn(3))
    with pytest.raises(TypeError, match="weight"):
        layers.linear(x, torch.randn(4, 8).half())                      # dtype disagrees with x


def test_linear_zero_in_features(device):
    """in_features 0: the empty sum, so F.linear's bias broadcast over the rows (zeros without a bias). The C++
    adapter used to flatten x with reshape(-1, 0), which torch refuses for an empty tensor (a RuntimeError)."""
    x = torch.randn(2, 3, 0, device=device)
    b = _randn(4, dtype=torch.float32, seed=0).to(device)
    for bias in (b, None):
        out = layers.linear(x, torch.randn(4, 0, device=device), bias)
        assert out.shape == (2, 3, 4)
        assert torch.equal(out, torch.nn.functional.linear(x, torch.randn(4, 0, device=device), bias))
