"""Quantized matmul: quantization bounds, GPTQ/AWQ conversion, both kernel paths, QuantLinear, quantize_model and
bad input.

Ground truth is float64: x @ W.T with W the exactly dequantized weight, W[n, k] = (q - z) * s (reference.py).

Error budget. Both kernels multiply the integer codes (q - z) (exact in fp16/bf16: |q - z| <= 256) or the fp32 weight
(q - z) * s (exact in fp32: an 8-bit integer times an 11-bit mantissa) by x, so every product is exact or rounded once
in fp32, and the only other roundings are (a) fp32 accumulation over K terms (plus the scale multiply, the bias add,
and split-K's partial sums), bounded by Higham's gamma_n = n * 2^-24 times sum_k |x_k| |w_kn| with n = K + 4, and (b)
the final rounding to the output dtype: half an ulp, u = 2^-11 (fp16), 2^-8 (bf16) or 2^-24 (fp32) relative, on every
path and under the interpreter too (whose own fp32 -> bf16 cast truncates: the kernels round on the bits there). fp32
activations get IEEE fp32 products (x times an exact small integer), no TF32. A floor of 2^-24 covers fp16's
subnormal spacing near zero. This is a worst case, so it cannot flake, and it is tight enough that
one wrong code, zero point or scale (an error of one quantization step times |x|) fails it.
"""
import copy

import pytest
import torch
from torch import nn

import llmkern
from llmkern import cpu, quant, reference

pytestmark = pytest.mark.cpu_backends("interpreter", "cpp")   # on CPU: the Triton interpreter and the C++ backend

UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -24}


def assert_quant_close(out, x, w64, bias=None, *, what="output"):
    """out (..., N) vs x (..., K) @ w64 (N, K).T (+ bias) in float64, within the budget in the module docstring."""
    x64 = x.double()
    ref = x64 @ w64.t()
    mag = x64.abs() @ w64.abs().t()
    if bias is not None:
        ref = ref + bias.double()
        mag = mag + bias.double().abs()
    k = x.shape[-1]
    acc_err = (k + 4) * 2.0 ** -24 * mag
    u = UNIT_ROUNDOFF[x.dtype]
    budget = u * (ref.abs() + acc_err) + acc_err + 2.0 ** -24
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == x.dtype, f"{what}: dtype {out.dtype} != {x.dtype}"
    err = (out.double() - ref).abs()
    worst = int(torch.argmax(err - budget))
    assert bool((err <= budget).all()), (
        f"{what}: error {err.flatten()[worst]:.3e} exceeds budget {budget.flatten()[worst]:.3e} at flat index {worst}")


def random_codes(n, k, bits, group_size, gen, *, zero_hi=None):
    groups = 1 if group_size == -1 else k // group_size
    q = torch.randint(0, 2 ** bits, (n, k), generator=gen, dtype=torch.int32)
    zero_hi = 2 ** bits - 1 if zero_hi is None else zero_hi
    z = torch.randint(0, zero_hi + 1, (groups, n), generator=gen, dtype=torch.int32)
    # scales of a realistic magnitude (|w| ~ 0.05), with varying exponents so a wrong group shows
    s = (torch.rand(groups, n, generator=gen, dtype=torch.float64) * 0.02 + 0.002)
    return q, z, s


def act_order_g_idx(k, group_size, gen):
    """GPTQ act-order: columns are quantized in a permuted order `order`, the j-th one into group j // group_size."""
    order = torch.randperm(k, generator=gen)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // group_size).to(torch.int32)
    return g_idx


# --------------------------------------------------------------------------- test-side packers (from the formats)
def _to_int32(words64):
    """Reinterpret the low 32 bits of non-negative int64 words as int32 (what a checkpoint stores)."""
    return torch.where(words64 >= 2 ** 31, words64 - 2 ** 32, words64).to(torch.int32)


def gptq_pack(q, z, bits):
    """GPTQ v1: qweight (K*bits/32, N), word i of column n holds q[n, i*P + j] at bits j*bits (P = 32/bits);
    qzeros (G, N*bits/32), word c of group g holds (z[g, c*P + j] - 1) mod 2**bits at bits j*bits."""
    n, k = q.shape
    p = 32 // bits
    qweight = torch.zeros(k // p, n, dtype=torch.int64)
    for j in range(p):
        qweight |= q.t()[j::p].to(torch.int64) << (bits * j)
    stored = (z.to(torch.int64) - 1) & (2 ** bits - 1)
    qzeros = torch.zeros(z.shape[0], n // p, dtype=torch.int64)
    for j in range(p):
        qzeros |= stored[:, j::p] << (bits * j)
    return _to_int32(qweight), _to_int32(qzeros)


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def awq_pack(q, z):
    """AWQ GEMM, 4 bits: qweight (K, N/8), word c of row k holds q[8c + AWQ_ORDER[i], k] at bits 4i; qzeros alike."""
    def pack_cols(a):  # a (R, N) -> (R, N/8)
        out = torch.zeros(a.shape[0], a.shape[1] // 8, dtype=torch.int64)
        for i, col in enumerate(AWQ_ORDER):
            out |= a[:, col::8].to(torch.int64) << (4 * i)
        return _to_int32(out)
    return pack_cols(q.t()), pack_cols(z)


# --------------------------------------------------------------------------- quantization
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [False, True])
def test_quantize_within_half_step(bits, group_size, symmetric):
    gen = torch.Generator().manual_seed(bits * 1000 + group_size + symmetric)
    w = torch.randn(24, 256, generator=gen, dtype=torch.float32) * 0.05
    w[0] = 0.0                      # an all-zero row: every group degenerate
    w[1] = 0.03                     # a constant positive row
    w[2, :128] = -torch.rand(128, generator=gen)   # one-signed groups
    w[3] *= 40.0                    # an outlier row
    for dtype in (torch.float16, torch.bfloat16):
        wd = w.to(dtype)
        qw = llmkern.quantize_weight(wd, bits=bits, group_size=group_size, symmetric=symmetric)
        assert qw.dtype == dtype and qw.shape == (24, 256)
        codes = qw.codes()
        assert int(codes.min()) >= 0 and int(codes.max()) < 2 ** bits
        deq = qw.dequantize(torch.float64)
        gs = 256 if group_size == -1 else group_size
        step = qw.scales.double().repeat_interleave(gs, dim=0).t()      # (N, K): each element's scale
        err = (deq - wd.double()).abs()
        # half a step, up to float64 rounding of w / s in the quantizer
        assert bool((err <= 0.5 * step * (1 + 1e-12)).all()), f"max err/step {float((err / step).max()):.6f}"
        if symmetric:
            assert bool((qw.zeros == 2 ** (bits - 1)).all())
    # the scales take the weight's dtype, fp32 included: the activation dtype the weight serves
    assert llmkern.quantize_weight(w, bits=bits, group_size=group_size).dtype == torch.float32


# --------------------------------------------------------------------------- both kernel paths
# Each setting: (bits, group_size, symmetric, act_order, N, K, dtype). Odd N everywhere; K from 64 to 384 (several
# 32-row K-tiles, and for group -1 a K that is not a multiple of the tiles: 104); int4 and int8 at every group size,
# with and without act-order (act-order with group -1 is one group: nothing to reorder).
SETTINGS = [
    (4, 32, False, False, 77, 96, torch.float16),
    (4, 64, True, False, 131, 128, torch.bfloat16),
    (4, 128, False, False, 45, 256, torch.float16),
    (4, -1, False, False, 131, 104, torch.bfloat16),
    (8, 32, False, False, 45, 64, torch.bfloat16),
    (8, 64, False, False, 77, 128, torch.float16),
    (8, 128, True, False, 131, 384, torch.bfloat16),
    (8, -1, True, False, 29, 160, torch.float16),
    (4, 128, False, True, 77, 384, torch.bfloat16),
    (4, 32, False, True, 131, 128, torch.float16),
    (8, 64, False, True, 45, 192, torch.float16),
    (4, 64, False, True, 29, 192, torch.bfloat16),
    (8, 32, False, True, 77, 96, torch.bfloat16),
    (8, 128, False, True, 131, 256, torch.float16),
    (4, 32, False, False, 45, 96, torch.float32),
    (8, 64, False, True, 29, 128, torch.float32),
]


def _setting_weight(bits, group_size, symmetric, act_order, n, k, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    if act_order:
        q, z, s = random_codes(n, k, bits, group_size, gen)
        g_idx = act_order_g_idx(k, group_size, gen)
        qw = quant.QuantizedWeight.from_codes(q, z, s.to(dtype), bits=bits, group_size=group_size, g_idx=g_idx)
        assert qw.perm is not None
        w64 = reference.quant_dequantize(q, z, s.to(dtype), group_size, g_idx=g_idx, dtype=torch.float64)
    else:
        w = torch.randn(n, k, generator=gen) * 0.05
        qw = llmkern.quantize_weight(w.to(dtype), bits=bits, group_size=group_size, symmetric=symmetric)
        w64 = qw.dequantize(torch.float64)
    assert torch.equal(qw.dequantize(torch.float64), w64)
    return qw, w64, gen


def _path_matmul(x, qw, bias, path, backend):
    """One kernel path ("decode" or "gemm") of the backend under test, the dispatcher's choice by M bypassed."""
    if backend == "cpp":
        out = torch.empty(x.shape[0], qw.out_features, dtype=x.dtype)
        cpu._lib().quant_matmul(x, qw.qweight, qw.scales, qw.zeros, qw.perm, bias, qw.bits, qw.group_size,
                                {"decode": 1, "gemm": 2}[path], out)
        return out
    return quant.triton_matmul(x, qw, bias, path=path)


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: f"int{s[0]}-g{s[1]}-sym{int(s[2])}-act{int(s[3])}-{s[6]}"
                         .replace("torch.", ""))
def test_paths_against_float64(setting, device, backend):
    bits, group_size, symmetric, act_order, n, k, dtype = setting
    qw, w64, gen = _setting_weight(*setting, seed=n * k + bits)
    qw = qw.to(device)
    bias = (torch.randn(n, generator=gen) * 0.1).to(dtype).to(device)
    for m, paths in ((1, ("decode", "gemm")), (3, ("decode", "gemm")), (16, ("decode",)), (67, ("gemm",))):
        x = torch.randn(m, k, generator=gen).to(dtype).to(device)
        for path in paths:
            for b in (None, bias) if m == 3 else (None,):
                out = _path_matmul(x, qw, b, path, backend)
                assert_quant_close(out.cpu(), x.cpu(), w64, None if b is None else b.cpu(),
                                   what=f"{path} M={m} bias={b is not None}")


@pytest.mark.cpu_backends("interpreter")   # the Triton decode kernels' split-K (the C++ path does not split K)
@pytest.mark.parametrize("split_k", [1, 2, 3, 100])
def test_decode_split_k(split_k, device):
    """Every split of K (one K-range per program, uneven ranges, more splits than K-tiles), GEMV (7 tiles of 4 word
    rows) and 16-row dot (7 tiles of 32 rows), with bias: the partial sums are added once each, the bias once.
    split_k=1 runs in bf16: the kernels' own epilogue (no atomics) then rounds to bf16, where truncating shows."""
    gen = torch.Generator().manual_seed(split_k)
    dtype = torch.bfloat16 if split_k == 1 else torch.float16
    k, n = 224, 150                                   # 7 K-tiles; 2 column blocks of the GEMV, 3 of the dot
    w = torch.randn(n, k, generator=gen) * 0.05
    qw = llmkern.quantize_weight(w.to(dtype), bits=4, group_size=32).to(device)
    w64 = qw.dequantize(torch.float64)
    bias = torch.randn(n, generator=gen).to(dtype).to(device)
    for m in (1, 5):
        x = torch.randn(m, k, generator=gen).to(dtype).to(device)
        out = quant.triton_matmul(x, qw, bias, path="decode", split_k=split_k)
        assert_quant_close(out.cpu(), x.cpu(), w64, bias.cpu(), what=f"M={m} split_k={split_k}")


@pytest.mark.cpu_backends("interpreter")   # the Triton implementation's host path: the one a CUDA call runs
def test_hot_path_makes_no_host_sync(monkeypatch, device, no_host_sync):
    """quant_matmul on every path (the GEMV and the 16-row dot with split-K and its reduction, the GEMM) and
    QuantLinear's forward make no device-to-host transfer, from the first call (the checks read shapes and dtypes
    only: issue 11). The launch of each (weight, M class) is planned once: M 3 and 5 share the 16-row dot's, M 20
    and 24 the GEMM's bucket. Repeated calls, reusing the plans and the split-K scratch, give the same bits."""
    monkeypatch.setattr(quant, "_FORMATS", {})                 # plans made by other tests do not count
    made = []
    make_plan = quant._Format._make_plan
    monkeypatch.setattr(quant._Format, "_make_plan", lambda self, m, *a: made.append(m) or make_plan(self, m, *a))
    gen = torch.Generator().manual_seed(11)
    qw = llmkern.quantize_weight((torch.randn(48, 96, generator=gen) * 0.05).half(), bits=4,
                                 group_size=32).to(device)
    layer = llmkern.QuantLinear.from_linear(nn.Linear(96, 40).half(), bits=8, group_size=32).to(device)
    xs = [torch.randn(m, 96, generator=gen).half().to(device) for m in (1, 3, 5, 20, 24)]
    with no_host_sync():
        outs = [llmkern.quant_matmul(x, qw) for x in xs]
        again = [llmkern.quant_matmul(x, qw) for x in xs]
        layer_outs = [layer(xs[0]), layer(xs[0])]
    assert made == [1, 3, 20, 1], f"plans made for M = {made}"  # qw: GEMV, dot, GEMM bucket; layer: GEMV
    assert max(quant._FORMATS[k].plans[p].split for k in quant._FORMATS for p in quant._FORMATS[k].plans) > 1
    w64 = qw.dequantize(torch.float64)
    for x, out, out2 in zip(xs, outs, again):
        assert_quant_close(out.cpu(), x.cpu(), w64, what=f"M={x.shape[0]}")
        assert torch.equal(out, out2)
    assert torch.equal(*layer_outs)
    assert_quant_close(layer_outs[0].cpu(), xs[0].cpu(), layer.quantized_weight().dequantize(torch.float64),
                       layer.bias.cpu(), what="QuantLinear")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quant_matmul_public(dtype, device):
    """The dispatcher (M in {1, 3, 16, 67} through leading batch dims), bias, and a strided x."""
    gen = torch.Generator().manual_seed(7)
    n, k = 99, 256
    qw = llmkern.quantize_weight((torch.randn(n, k, generator=gen) * 0.05).to(dtype), bits=4,
                                 group_size=64).to(device)
    w64 = qw.dequantize(torch.float64)
    bias = torch.randn(n, generator=gen).to(dtype).to(device)
    for lead in ((1,), (3,), (2, 8), (67,), (1, 67)):
        x = torch.randn(*lead, k, generator=gen).to(dtype).to(device)
        out = llmkern.quant_matmul(x, qw, bias)
        assert out.shape == (*lead, n)
        assert_quant_close(out.cpu(), x.cpu(), w64, bias.cpu(), what=f"x{tuple(x.shape)}")
    wide = torch.randn(20, k + 40, generator=gen).to(dtype).to(device)
    x = wide[:, 8:8 + k]                              # row stride k + 40: passed as is, not copied
    assert_quant_close(llmkern.quant_matmul(x, qw).cpu(), x.cpu(), w64, what="strided rows")
    xt = torch.randn(k, 4, generator=gen).to(dtype).to(device).t()   # a strided last dim: copied first
    assert_quant_close(llmkern.quant_matmul(xt, qw).cpu(), xt.cpu(), w64, what="transposed x")
    assert llmkern.quant_matmul(torch.empty(0, k, dtype=dtype, device=device), qw).shape == (0, n)
    other = torch.bfloat16 if dtype == torch.float16 else torch.float16
    moved = qw.to(other)                              # a dtype converts the scales only
    assert moved.dtype == other and moved.qweight.dtype == torch.int32 and moved.device == qw.device
    assert torch.equal(moved.codes(), qw.codes())


def test_torch_compile_fullgraph(device):
    gen = torch.Generator().manual_seed(3)
    qw = llmkern.quantize_weight(torch.randn(40, 64, generator=gen).half(), bits=8, group_size=32).to(device)
    x = torch.randn(2, 3, 64, generator=gen).half().to(device)
    # aot_eager traces the op through its fake implementation (shapes, dtypes) without a C++ compiler
    fn = torch.compile(lambda a: llmkern.quant_matmul(a, qw), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(x), llmkern.quant_matmul(x, qw), rtol=0, atol=0)
    block = nn.Sequential(llmkern.QuantLinear.from_linear(nn.Linear(64, 32).half(), bits=4, group_size=32), nn.SiLU(),
                          llmkern.QuantLinear.from_linear(nn.Linear(32, 16).half(), bits=8, group_size=-1)).to(device)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), block(x), rtol=0, atol=0)


# --------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("bits,group_size,act_order", [(4, 128, False), (4, 32, True), (8, 64, False),
                                                        (8, 128, True), (4, -1, False)])
def test_from_gptq(bits, group_size, act_order, device):
    gen = torch.Generator().manual_seed(bits + group_size)
    n, k = 40, 256                                    # N a multiple of 32 / bits, as GPTQ's qzeros require
    # v1 stores zero - 1: zeros run 1..2**bits, and 2**bits wraps to a stored 2**bits - 1 (read back as 2**bits)
    q, z, s = random_codes(n, k, bits, group_size, gen)
    z = z + 1
    s = s.half()
    g_idx = act_order_g_idx(k, group_size if group_size != -1 else k, gen) if act_order else None
    qweight, qzeros = gptq_pack(q, z, bits)
    qw = llmkern.QuantizedWeight.from_gptq(qweight, qzeros, s, g_idx=g_idx, bits=bits, group_size=group_size)
    w64 = reference.quant_dequantize(q, z, s, group_size, g_idx=g_idx, dtype=torch.float64)
    assert torch.equal(qw.codes(), q)
    assert torch.equal(qw.dequantize(torch.float64), w64)
    assert (qw.perm is not None) == act_order
    if act_order:
        assert torch.equal(qw.g_idx, g_idx)
    qw = qw.to(device)
    for m in (1, 4, 20):
        x = torch.randn(m, k, generator=gen).half().to(device)
        assert_quant_close(llmkern.quant_matmul(x, qw).cpu(), x.cpu(), w64, what=f"gptq M={m}")


@pytest.mark.parametrize("group_size", [128, 32])
def test_from_awq(group_size, device):
    gen = torch.Generator().manual_seed(group_size)
    n, k = 48, 256
    q, z, s = random_codes(n, k, 4, group_size, gen)
    s = s.to(torch.bfloat16)
    qweight, qzeros = awq_pack(q, z)
    qw = llmkern.QuantizedWeight.from_awq(qweight, qzeros, s, group_size=group_size)
    w64 = reference.quant_dequantize(q, z, s, group_size, dtype=torch.float64)
    assert torch.equal(qw.codes(), q)
    assert torch.equal(qw.dequantize(torch.float64), w64)
    qw = qw.to(device)
    for m in (1, 4, 20):
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16).to(device)
        assert_quant_close(llmkern.quant_matmul(x, qw).cpu(), x.cpu(), w64, what=f"awq M={m}")


# --------------------------------------------------------------------------- modules
def test_quant_linear(device):
    gen = torch.Generator().manual_seed(11)
    lin = nn.Linear(128, 72, bias=True).half()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(72, 128, generator=gen) * 0.05)
        lin.bias.copy_(torch.randn(72, generator=gen) * 0.1)
    ql = llmkern.QuantLinear.from_linear(lin, bits=4, group_size=32).to(device)
    assert (ql.in_features, ql.out_features) == (128, 72) and ql.bias is not None
    assert ql.qweight.device.type == torch.device(device).type
    x = torch.randn(2, 5, 128, generator=gen).half().to(device)
    out = ql(x)
    w64 = ql.quantized_weight().dequantize(torch.float64).cpu()
    assert_quant_close(out.cpu(), x.cpu(), w64, lin.bias.detach(), what="QuantLinear")
    # against the float layer: off by at most the quantization error, sum_k |x_k| * s/2, plus fp16 rounding
    step = ql.scales.double().cpu().repeat_interleave(32, dim=0).t()
    bound = x.cpu().double().abs() @ (0.5 * step).t() + 2.0 ** -10 * lin(x.cpu()).double().abs() + 1e-3
    assert bool(((out.cpu().double() - lin(x.cpu()).double()).abs() <= bound).all())
    # state: state_dict round trip, dtype moves the scales and bias
    fresh = llmkern.QuantLinear(128, 72, bits=4, group_size=32)
    fresh.load_state_dict(ql.cpu().state_dict())
    torch.testing.assert_close(fresh.to(device)(x), out, rtol=0, atol=0)
    bf = fresh.to(torch.bfloat16)
    assert bf.scales.dtype == torch.bfloat16 and bf.bias.dtype == torch.bfloat16 and bf.qweight.dtype == torch.int32
    assert bf(x.to(torch.bfloat16)).dtype == torch.bfloat16
    bad = llmkern.QuantLinear(128, 72, bits=4, group_size=32, act_order=True)
    state = {**bad.state_dict(), "perm": torch.zeros(128, dtype=torch.int32)}
    with pytest.raises(ValueError, match="perm must be a permutation"):
        bad.load_state_dict(state)
    nobias = llmkern.QuantLinear.from_linear(nn.Linear(64, 8, bias=False).half(), bits=8, group_size=-1).to(device)
    assert nobias.bias is None and nobias(torch.randn(3, 64).half().to(device)).shape == (3, 8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_quantize_model(dtype, device):
    """float32 too: the usual dtype of a model on a CPU; its QuantLinear layers keep float32 scales and activations
    (a float32 model used to be accepted here and refused only at its first forward)."""
    torch.manual_seed(0)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 64)
            self.mlp = nn.Sequential(nn.Linear(64, 96), nn.SiLU(), nn.Linear(96, 64))
            self.lm_head = nn.Linear(64, 50, bias=False)

        def forward(self, ids):
            return self.lm_head(self.mlp(self.embed(ids)))

    model = Tiny().to(dtype).to(device)
    ids = torch.randint(0, 50, (2, 7), device=device)
    # the expected model: float32 copies of the layers, with the quantized-then-dequantized weights
    ref_model = copy.deepcopy(model).float()
    for name in ("mlp.0", "mlp.2"):
        qw = llmkern.quantize_weight(model.get_submodule(name).weight.detach(), bits=4, group_size=32)
        ref_model.get_submodule(name).weight.data.copy_(qw.dequantize(torch.float32))
    assert llmkern.quantize_model(model, bits=4, group_size=32) is model
    assert isinstance(model.mlp[0], llmkern.QuantLinear) and isinstance(model.mlp[2], llmkern.QuantLinear)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, llmkern.QuantLinear)
    assert model.mlp[0].scales.dtype == dtype
    out = model(ids)
    assert out.dtype == dtype
    # fp16 activations between layers (|h| ~ 1): a few fp16 ulps of error per layer
    torch.testing.assert_close(out.float(), ref_model(ids), rtol=1e-2, atol=1e-2)
    # exclude by full name; a Sequential is a model too
    seq = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 16)).half()
    llmkern.quantize_model(seq, bits=8, group_size=32, exclude=("1",))
    assert isinstance(seq[0], llmkern.QuantLinear) and type(seq[1]) is nn.Linear


# --------------------------------------------------------------------------- bad input
def test_bad_input(device, no_kernel):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=gen).half()
    qw = llmkern.quantize_weight(w, bits=4, group_size=32)
    x = torch.randn(2, 64).half()
    q, z, s = random_codes(16, 128, 4, 32, gen)
    qweight, qzeros = gptq_pack(q, z + 1, 4)
    aw, az = awq_pack(q, z)
    s = s.half()
    cases = [
        (ValueError, "bits", lambda: llmkern.quantize_weight(w, bits=3)),
        (ValueError, "group_size", lambda: llmkern.quantize_weight(w, group_size=48)),
        (ValueError, "divisible by group_size", lambda: llmkern.quantize_weight(w[:, :48], group_size=32)),
        (TypeError, "weight", lambda: llmkern.quantize_weight(w.int())),
        (ValueError, "weight", lambda: llmkern.quantize_weight(torch.randn(64))),
        (ValueError, "finite", lambda: llmkern.quantize_weight(torch.full((4, 64), float("nan")), group_size=32)),
        # no output rows: a RuntimeError from min() over an empty tensor before
        (ValueError, "out_features", lambda: llmkern.quantize_weight(w[:0], group_size=32)),
        (ValueError, "out_features", lambda: llmkern.QuantizedWeight.from_gptq(qweight[:, :0], qzeros[:, :0], s[:, :0],
                                                                                group_size=32)),
        (TypeError, "qweight", lambda: llmkern.quant_matmul(x, w)),
        (ValueError, "in_features", lambda: llmkern.quant_matmul(torch.randn(2, 32).half(), qw)),
        (TypeError, "x", lambda: llmkern.quant_matmul(x.float(), qw)),
        (TypeError, "scales", lambda: llmkern.quant_matmul(x.bfloat16(), qw)),
        (TypeError, "x", lambda: llmkern.quant_matmul([1.0], qw)),
        (ValueError, "bias", lambda: llmkern.quant_matmul(x, qw, torch.zeros(15).half())),
        (TypeError, "bias", lambda: llmkern.quant_matmul(x, qw, torch.zeros(16).bfloat16())),
        (ValueError, "device", lambda: llmkern.quant_matmul(x.to("meta"), qw)),
        (TypeError, "dtype", lambda: qw.to(dtype=torch.float64)),
        # an act-order perm must be a permutation of range(K): the kernels gather x's columns through it
        *[(ValueError, "perm must be a permutation", lambda p=p: llmkern.QuantizedWeight(
            qw.qweight, qw.scales, qw.zeros, bits=4, group_size=32, in_features=64, out_features=16, perm=p))
          for p in (torch.arange(64, dtype=torch.int32).index_fill_(0, torch.tensor([3]), 10**6),
                    torch.arange(64, dtype=torch.int32) - 1, torch.zeros(64, dtype=torch.int32))],
        # GPTQ: dtypes, shapes, bits, group size, g_idx
        (TypeError, "qweight", lambda: llmkern.QuantizedWeight.from_gptq(qweight.float(), qzeros, s, group_size=32)),
        (TypeError, "qzeros", lambda: llmkern.QuantizedWeight.from_gptq(qweight, qzeros.long(), s, group_size=32)),
        (TypeError, "scales", lambda: llmkern.QuantizedWeight.from_gptq(qweight, qzeros, s.double(), group_size=32)),
        (ValueError, "qzeros", lambda: llmkern.QuantizedWeight.from_gptq(qweight, qzeros[:2], s, group_size=32)),
        (ValueError, "scales", lambda: llmkern.QuantizedWeight.from_gptq(qweight, qzeros, s[:, :8], group_size=32)),
        (ValueError, "qzeros", lambda: llmkern.QuantizedWeight.from_gptq(qweight, qzeros, s, group_size=64)),
        (ValueError, "bits", lambda: llmkern.QuantizedWeight.from_gptq(qweight, qzeros, s, bits=2, group_size=32)),
        (ValueError, "qweight", lambda: llmkern.QuantizedWeight.from_gptq(qweight[None], qzeros, s, group_size=32)),
        (ValueError, "g_idx", lambda: llmkern.QuantizedWeight.from_gptq(
            qweight, qzeros, s, g_idx=torch.zeros(128, dtype=torch.int32), group_size=32)),
        (ValueError, "g_idx", lambda: llmkern.QuantizedWeight.from_gptq(
            qweight, qzeros, s, g_idx=torch.arange(128, dtype=torch.int32), group_size=32)),
        (ValueError, "g_idx", lambda: llmkern.QuantizedWeight.from_gptq(
            qweight, qzeros, s, g_idx=torch.zeros(64, dtype=torch.int32), group_size=32)),
        (TypeError, "g_idx", lambda: llmkern.QuantizedWeight.from_gptq(
            qweight, qzeros, s, g_idx=torch.zeros(128), group_size=32)),
        # AWQ
        (ValueError, "qzeros", lambda: llmkern.QuantizedWeight.from_awq(aw, az[:, :1], s, group_size=32)),
        (ValueError, "scales", lambda: llmkern.QuantizedWeight.from_awq(aw, az, s[:2], group_size=32)),
        (TypeError, "qweight", lambda: llmkern.QuantizedWeight.from_awq(aw.to(torch.int16), az, s, group_size=32)),
        (ValueError, "group_size", lambda: llmkern.QuantizedWeight.from_awq(aw, az, s, group_size=16)),
        # the registered op called directly still checks its tensors before any launch
        (ValueError, "qweight", lambda: torch.ops.llmkern.quant_matmul(x, qw.qweight[:2], qw.scales, qw.zeros, None,
                                                                       None, 4, 32)),
        (ValueError, "zeros", lambda: torch.ops.llmkern.quant_matmul(x, qw.qweight, qw.scales, qw.zeros[:, :3], None,
                                                                     None, 4, 32)),
        (ValueError, "perm", lambda: torch.ops.llmkern.quant_matmul(x, qw.qweight, qw.scales, qw.zeros,
                                                                    torch.arange(32, dtype=torch.int32), None, 4, 32)),
        # codes out of range, modules
        (ValueError, "codes", lambda: llmkern.QuantizedWeight.from_codes(q + 16, z, s, bits=4, group_size=32)),
        (TypeError, "linear", lambda: llmkern.QuantLinear.from_linear(nn.Conv1d(4, 4, 1))),
        (TypeError, "model", lambda: llmkern.quantize_model("model")),
        (TypeError, "exclude", lambda: llmkern.quantize_model(nn.Sequential(nn.Linear(64, 8)), exclude="lm_head")),
        (ValueError, "exclude", lambda: llmkern.quantize_model(nn.Sequential(nn.Linear(48, 8)), group_size=32)),
        (ValueError, "bits", lambda: llmkern.quantize_model(nn.Sequential(nn.Linear(64, 8)), bits=5)),
        (TypeError, "model.float", lambda: llmkern.quantize_model(nn.Sequential(nn.Linear(64, 8)).double())),
    ]
    for exc, word, fn in cases:
        with pytest.raises(exc, match=word):
            fn()
    # every layer is checked before any is replaced: an empty layer after a good one leaves the model as it was
    model = nn.Sequential(nn.Linear(64, 8), nn.Linear(64, 0))
    with pytest.raises(ValueError, match="layer '1' has out_features=0"):
        llmkern.quantize_model(model, group_size=32)
    assert type(model[0]) is nn.Linear


@pytest.mark.cpu_backends("interpreter")   # spies on the Triton kernels the dispatcher launches
def test_dispatch_cut_over(monkeypatch, device):
    """M = 1 goes to the GEMV, 2..16 rows (counted across leading dims) to the 16-row decode dot, more to the GEMM."""
    launched = []

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launched.append(self.name)
            return self.kernel[grid]

    for name in ("quant_gemv_kernel", "quant_decode_kernel"):
        monkeypatch.setattr(quant, name, Spy(name, getattr(quant, name)))
    qw = llmkern.quantize_weight(torch.randn(24, 64).half(), bits=4, group_size=32).to(device)
    for shape, kernel in (((1, 64), "quant_gemv_kernel"), ((1, 1, 64), "quant_gemv_kernel"),
                          ((4, 4, 64), "quant_decode_kernel"), ((2, 64), "quant_decode_kernel"),
                          ((17, 64), None), ((2, 9, 64), None)):
        launched.clear()
        x = torch.randn(*shape).half().to(device)
        assert_quant_close(llmkern.quant_matmul(x, qw).cpu(), x.cpu(), qw.dequantize(torch.float64).cpu())
        assert launched == ([kernel] if kernel else []), f"x{shape}: launched {launched}"
