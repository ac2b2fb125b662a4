"""RMSNorm, fused add + RMSNorm and RoPE against the plain-PyTorch reference (float64 ground truth).

Tolerance: FlashAttention's rule (tests/tolerance.py): our error against float64 at most twice PyTorch's own error
when it computes the same thing in the input dtype, plus a small floor.
"""
import math

import pytest
import torch

import llmkern
from llmkern import reference
from tolerance import assert_fa_close, max_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

pytestmark = pytest.mark.cpu_backends("interpreter", "cpp")   # on CPU: the Triton interpreter and the C++ backend


def _randn(*shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------- RMSNorm
def _check_norm(y, x, w, eps, offset, casting):
    ref64 = reference.rms_norm(x.double(), w.double(), eps, offset=offset, casting=casting)
    lowp = reference.rms_norm(x, w, eps, offset=offset, casting=casting, compute_dtype=x.dtype)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_fa_close(y, ref64, lowp, what=f"rms_norm {x.dtype} {casting}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 64), (5, 300)])                 # pow-2 hidden; ragged hidden (masked tail)
@pytest.mark.parametrize("casting,offset", [("llama", 0.0), ("gemma", 1.0)])
def test_rms_norm(device, dtype, shape, casting, offset):
    x = _randn(*shape, dtype=dtype, device=device)
    w = _randn(shape[-1], dtype=dtype, device=device, seed=1)
    _check_norm(llmkern.rms_norm(x, w, 1e-6, offset=offset, casting=casting), x, w, 1e-6, offset, casting)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm(device, dtype):
    x = _randn(3, 4, 96, dtype=dtype, device=device)
    res = _randn(3, 4, 96, dtype=dtype, device=device, seed=2)
    w = _randn(96, dtype=dtype, device=device, seed=1)
    y, r = llmkern.add_rms_norm(x, res, w, 1e-5)
    # The new residual is exactly what `residual + hidden` gives in a model (one rounding of the exact sum).
    assert torch.equal(r, res + x)
    _check_norm(y, r, w, 1e-5, 0.0, "llama")
    assert torch.equal(x, _randn(3, 4, 96, dtype=dtype, device=device))   # inputs untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wide_rows_two_pass(device, dtype):
    """hidden > 8192 (the widest register tile) takes the two-pass loop, with and without the residual."""
    n = 8192 + 808
    x = _randn(2, n, dtype=dtype, device=device)
    res = _randn(2, n, dtype=dtype, device=device, seed=2)
    w = _randn(n, dtype=dtype, device=device, seed=1)
    _check_norm(llmkern.rms_norm(x, w, 1e-6), x, w, 1e-6, 0.0, "llama")
    y, r = llmkern.add_rms_norm(x, res, w, 1e-6, offset=1.0, casting="gemma")
    assert torch.equal(r, res + x)
    _check_norm(y, r, w, 1e-6, 1.0, "gemma")


@pytest.mark.parametrize("n", [4000, 9000], ids=["one-tile", "two-pass"])
def test_rms_norm_mean_square_comparable_to_eps(device, n):
    """Rows with mean(x^2) ~ eps (x ~ 1e-3, eps 1e-6): eps changes the result by a factor sqrt(2), so an eps added
    in the wrong place (outside the square root) shows; both the one-tile path (n <= 8192) and the two-pass one."""
    x = _randn(2, n, device=device) * 1e-3
    w = _randn(n, device=device, seed=1)
    _check_norm(llmkern.rms_norm(x, w, 1e-6), x, w, 1e-6, 0.0, "llama")
    res = _randn(2, n, device=device, seed=2) * 1e-3
    y, r = llmkern.add_rms_norm(x, res, w, 1e-6)
    _check_norm(y, r, w, 1e-6, 0.0, "llama")


def test_rms_norm_matches_hf_modules(device):
    """The same bf16 numbers as transformers' LlamaRMSNorm and Gemma2RMSNorm, rounding steps included: only a
    float32 sum taken in another order may move an element by one bf16 ulp, rarely (0 of 8192 here at writing;
    dropping Llama's rounding before the weight multiply changes ~25%)."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    x = _randn(64, 128, dtype=torch.bfloat16, device=device)
    for mod, kw in ((LlamaRMSNorm(128, eps=1e-5), {}),
                    (Gemma2RMSNorm(128, eps=1e-6), {"offset": 1.0, "casting": "gemma"})):
        mod = mod.to(device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            mod.weight.copy_(_randn(128, seed=3) * 0.5)
            ref = mod(x)
        eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", None))
        ours = llmkern.rms_norm(x, mod.weight, eps, **kw)
        ulp = ref.float().abs() * 2 ** -7                       # one bf16 ulp (8 significant bits)
        assert ((ours.float() - ref.float()).abs() <= ulp).all(), type(mod).__name__
        assert (ours != ref).float().mean() <= 0.005, type(mod).__name__


def test_rms_norm_strides_and_edges(device):
    base = _randn(4, 6, 64, dtype=torch.float16, device=device)
    w = _randn(64, dtype=torch.float16, device=device, seed=1)
    x = base[:, ::2]                                            # strided rows, contiguous hidden
    _check_norm(llmkern.rms_norm(x, w), x, w, 1e-6, 0.0, "llama")
    xt = _randn(64, 5, dtype=torch.float16, device=device).t()  # strided hidden: copied first
    _check_norm(llmkern.rms_norm(xt, w), xt, w, 1e-6, 0.0, "llama")
    one = base[:1, :1]                                          # a single token
    _check_norm(llmkern.rms_norm(one, w), one, w, 1e-6, 0.0, "llama")
    empty = base[:0]
    assert llmkern.rms_norm(empty, w).shape == empty.shape
    y, r = llmkern.add_rms_norm(empty, empty, w)
    assert y.shape == r.shape == empty.shape
    zeros = torch.zeros(2, 64, dtype=torch.float32, device=device)  # all-zero row: eps keeps it finite (0)
    assert torch.equal(llmkern.rms_norm(zeros, w.float(), 1e-6), zeros)


def test_rms_norm_bad_input(device, no_kernel):
    x = _randn(2, 64, device=device)
    w = _randn(64, device=device)
    with pytest.raises(ValueError, match="weight"):
        llmkern.rms_norm(x, w[:32])
    with pytest.raises(TypeError, match="x"):
        llmkern.rms_norm(x.to(torch.int32), w)
    with pytest.raises(TypeError, match="x"):
        llmkern.rms_norm(x.tolist(), w)
    with pytest.raises(ValueError, match="eps"):
        llmkern.rms_norm(x, w, -1.0)
    with pytest.raises(ValueError, match="casting"):
        llmkern.rms_norm(x, w, casting="t5")
    with pytest.raises(TypeError, match="offset"):
        llmkern.rms_norm(x, w, offset=True)
    for eps in (float("nan"), float("inf"), 1e-40, 1e39):          # NaN, inf, subnormal, beyond float32
        with pytest.raises(ValueError, match="eps"):
            llmkern.rms_norm(x, w, eps)
    for offset in (float("nan"), float("inf"), -1e39):
        with pytest.raises(ValueError, match="offset"):
            llmkern.rms_norm(x, w, offset=offset)
    with pytest.raises(ValueError, match="residual"):
        llmkern.add_rms_norm(x, x[:1], w)
    with pytest.raises(TypeError, match="residual"):
        llmkern.add_rms_norm(x, x.half(), w)


# -------------------------------------------------------------------------------------------------------- RoPE
def _check_rope(out, q, k, *, what, **angles):
    """out = (q_rot, k_rot) vs float64; the float64 truth uses float64 angles (or the given tables in float64)."""
    tabs = {n: angles[n].double() for n in ("cos", "sin") if n in angles}
    ref64 = reference.apply_rope(q.double(), k.double(), angles.get("positions"), theta=angles.get("theta", 1e4),
                                 **tabs)
    lowp = reference.apply_rope(q, k, angles.get("positions"), theta=angles.get("theta", 1e4),
                                compute_dtype=q.dtype, **{n: angles[n] for n in ("cos", "sin") if n in angles})
    # Floor: a float32 angle p * inv_freq carries a relative error of ~2 ulp (2^-22), an absolute error of
    # max_pos * 2^-22 radians that moves an output by up to that times |x|.
    pos = angles.get("positions")
    floor = None
    if pos is not None:
        floor = max(1e-5, float(pos.max()) * 2.0 ** -22 * float(max(q.abs().max(), k.abs().max())))
        floor = max(floor, {torch.float16: 1e-3, torch.bfloat16: 8e-3}.get(q.dtype, 0.0))
    for name, o, r, lp in zip(("q", "k"), out, ref64, lowp):
        assert o.dtype == q.dtype
        assert_fa_close(o, r, lp, floor=floor, what=f"{what} {name}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_positions(device, dtype):
    q = _randn(2, 5, 4, 32, dtype=dtype, device=device)
    k = _randn(2, 5, 2, 32, dtype=dtype, device=device, seed=1)                   # GQA: fewer k heads
    pos = torch.randint(0, 2000, (2, 5), generator=torch.Generator().manual_seed(0)).to(device)
    out = llmkern.apply_rope(q, k, pos, theta=500000.0)                          # Llama-3's theta
    _check_rope(out, q, k, positions=pos, theta=500000.0, what="positions")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_hf_tables(device, dtype):
    """cos/sin exactly as Hugging Face's rotary module returns them: (batch, seq, head_dim), in the model dtype."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    cfg = LlamaConfig(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    q = _randn(2, 6, 2, 64, dtype=dtype, device=device)
    k = _randn(2, 6, 1, 64, dtype=dtype, device=device, seed=1)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12]], device=device)
    cos, sin = LlamaRotaryEmbedding(cfg).to(device)(q, pos)
    out = llmkern.apply_rope(q, k, cos=cos, sin=sin)
    _check_rope(out, q, k, cos=cos, sin=sin, what="hf tables")
    # And against transformers' own function (inputs (batch, heads, seq, d)): its three bf16 roundings vs our one.
    hq, hk = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    ref64 = reference.apply_rope(q.double(), k.double(), cos=cos.double(), sin=sin.double())
    for o, h, r in zip(out, (hq.transpose(1, 2), hk.transpose(1, 2)), ref64):
        assert max_err(o, r) <= max_err(h, r) + 1e-6


def test_rope_packed_broadcast_and_half_tables(device):
    # Packed tokens of two sequences (lengths 3 and 4) with per-token positions.
    q = _randn(7, 4, 16, dtype=torch.float16, device=device)
    k = _randn(7, 2, 16, dtype=torch.float16, device=device, seed=1)
    pos = torch.tensor([0, 1, 2, 0, 1, 2, 3], device=device)
    _check_rope(llmkern.apply_rope(q, k, pos), q, k, positions=pos, what="packed")
    # One (seq, d/2) table shared by every sequence of a batch.
    q4 = _randn(3, 5, 4, 16, device=device)
    k4 = _randn(3, 5, 4, 16, device=device, seed=1)
    cos, sin = reference.rope_cos_sin(torch.arange(5, device=device) + 2, 16)
    cos, sin = cos[:, :8], sin[:, :8]
    _check_rope(llmkern.apply_rope(q4, k4, cos=cos, sin=sin), q4, k4, cos=cos, sin=sin, what="broadcast table")
    # positions (seq,) broadcast over the batch give the same result as the explicit (batch, seq).
    p1 = torch.arange(5, device=device) + 2
    a = llmkern.apply_rope(q4, k4, p1)
    b = llmkern.apply_rope(q4, k4, p1[None].expand(3, 5).contiguous())
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_rope_inplace_and_fused_qkv(device):
    """q and k sliced from one fused qkv projection (strided heads), rotated out of place and in place."""
    b, s, h, kv, d = 2, 3, 4, 2, 32
    qkv = _randn(b, s, h + 2 * kv, d, device=device)
    q, k = qkv[:, :, :h], qkv[:, :, h:h + kv]
    pos = torch.arange(s, device=device)
    expect = llmkern.apply_rope(q, k, pos)
    _check_rope(expect, q, k, positions=pos, what="fused qkv")
    v_before = qkv[:, :, h + kv:].clone()
    q_out, k_out = llmkern.apply_rope(q, k, pos, inplace=True)
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()
    assert torch.equal(q, expect[0]) and torch.equal(k, expect[1])
    assert torch.equal(qkv[:, :, h + kv:], v_before)                      # v untouched
    with pytest.raises(ValueError, match="overlap"):
        llmkern.apply_rope(qkv[:, :, :h], qkv[:, :, 1:h + 1], pos, inplace=True)
    # k's head in one batch row is q's first head in the next (rows 8 elements apart, q 2 heads of 4, k at 8): the
    # overlap across rows must be seen whatever stride the size-1 seq dim has (it used to be taken as the row stride)
    buf = _randn(32, device=device)
    q1, k1 = buf.as_strided((2, 1, 2, 4), (8, 1000, 4, 1)), buf.as_strided((2, 1, 1, 4), (8, 1000, 4, 1), 8)
    with pytest.raises(ValueError, match="overlap"):
        llmkern.apply_rope(q1, k1, torch.arange(1, device=device), inplace=True)


def test_rope_bad_input(device, no_kernel):
    q = _randn(2, 3, 4, 32, device=device)
    k = _randn(2, 3, 2, 32, device=device)
    pos = torch.arange(3, device=device)
    with pytest.raises(ValueError, match="needs positions"):
        llmkern.apply_rope(q, k)
    with pytest.raises(ValueError, match="head_dim"):
        llmkern.apply_rope(q[..., :31], k[..., :31], pos)
    with pytest.raises(ValueError, match="k"):
        llmkern.apply_rope(q, k[:, :2], pos)
    with pytest.raises(TypeError, match="positions"):
        llmkern.apply_rope(q, k, pos.float())
    with pytest.raises(ValueError, match=r"positions.*got \(4,\)$"):     # the shape passed, not a reshaped one
        llmkern.apply_rope(q, k, torch.arange(4, device=device))
    cos, sin = reference.rope_cos_sin(pos, 32)
    with pytest.raises(ValueError, match=r"cos.*got \(2, 32\)$"):
        llmkern.apply_rope(q, k, cos=cos[:2], sin=sin[:2])
    with pytest.raises(ValueError, match="together"):
        llmkern.apply_rope(q, k, cos=cos)
    with pytest.raises(ValueError, match="not both"):
        llmkern.apply_rope(q, k, pos, cos=cos, sin=sin)
    with pytest.raises(ValueError, match="cos"):
        llmkern.apply_rope(q, k, cos=cos[:, :10], sin=sin[:, :10])
    with pytest.raises(ValueError, match="theta"):
        llmkern.apply_rope(q, k, pos, theta=1.0)
    with pytest.raises(TypeError, match="k"):
        llmkern.apply_rope(q, k.half(), pos)
    # in place: an element at two indices (expanded), also through the op itself (its check), before any launch
    qe = _randn(1, 3, 4, 32, device=device).expand(2, 3, 4, 32)
    with pytest.raises(ValueError, match="q is written in place"):
        llmkern.apply_rope(qe, k, pos, inplace=True)
    with pytest.raises(ValueError, match="contiguous last dim"):
        torch.ops.llmkern.rope_(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, pos, None, None, 1e4)


# ----------------------------------------------------------------------------------------- torch.library/compile
def test_torch_compile_fullgraph(device):
    def block(x, res, w, q, k, pos):
        y, r = llmkern.add_rms_norm(x, res, w, 1e-6)
        qr, kr = llmkern.apply_rope(q, k, pos)
        return llmkern.rms_norm(y, w), r, qr, kr

    x = _randn(4, 64, device=device)
    res = _randn(4, 64, device=device, seed=1)
    w = _randn(64, device=device, seed=2)
    q = _randn(1, 4, 2, 16, device=device, seed=3)
    k = _randn(1, 4, 2, 16, device=device, seed=4)
    pos = torch.arange(4, device=device)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(x, res, w, q, k, pos), block(x, res, w, q, k, pos)):
        assert torch.equal(a, b)


def test_reference_rope_is_rotation():
    """The ground truth itself: RoPE preserves each pair's norm and q.k depends only on the position difference."""
    q = _randn(1, 1, 1, 32, dtype=torch.float64)
    k = _randn(1, 1, 1, 32, dtype=torch.float64, seed=1)
    dots = []
    for p in (3, 10):
        qr, _ = reference.apply_rope(q, q, torch.tensor([[p]]))
        kr, _ = reference.apply_rope(k, k, torch.tensor([[p - 2]]))
        assert math.isclose(float(qr.norm()), float(q.norm()), rel_tol=1e-12)
        dots.append(float((qr * kr).sum()))
    assert math.isclose(dots[0], dots[1], rel_tol=1e-9)
