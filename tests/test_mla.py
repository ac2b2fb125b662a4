"""mla_kv_write, mla_decode_attention, mla_prefill_attention (DeepSeek's multi-head latent attention) against
llmkern.reference.

The reference gathers each sequence's latents through its block table and computes the absorbed form of the paper's
equations (arXiv 2405.04434) in float64; PyTorch's own error in the input dtype sets the tolerance
(tests/tolerance.py). Block tables are random permutations of the cache's blocks and the cache holds random data
everywhere a sequence does not own, so reading a wrong block shows up as a wrong answer. Shapes are small (the
Triton interpreter is slow): rank 256 / rope 32 (MiniCPM3) mostly, one DeepSeek-V3 (512 / 64) decode. On CPU every
test runs on the Triton interpreter and on the C++ backend (csrc/mla.cpp).
"""
import math

import pytest
import torch

import llmkern
from llmkern import mla
from llmkern import reference as ref
from conftest import use_cpp_backend
from tolerance import assert_fa_close

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.cpu_backends("interpreter", "cpp")]   # on CPU: the Triton interpreter and the C++ backend


def _make(device, *, seq_lens, rank=256, rope_dim=32, block_size=16, dtype=torch.float16, seed=0, extra_blocks=2):
    """Random ckv/kpe caches (plus spare blocks) and scattered block tables for the given lengths."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(need) + extra_blocks
    ckv = torch.randn(num_blocks, block_size, rank, generator=g).to(dtype).to(device)
    kpe = torch.randn(num_blocks, block_size, rope_dim, generator=g).to(dtype).to(device)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    rows, i = [], 0
    for n in need:
        rows.append(perm[i:i + n] + [0] * (max(need) - n))
        i += n
    bt = torch.tensor(rows, dtype=torch.int32, device=device)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return ckv, kpe, bt, sl, g


def _queries(g, tokens, heads, rank, rope_dim, dtype, device, q_scale=1.0):
    q_nope = (q_scale * torch.randn(tokens, heads, rank, generator=g)).to(dtype).to(device)
    q_pe = (q_scale * torch.randn(tokens, heads, rope_dim, generator=g)).to(dtype).to(device)
    return q_nope, q_pe


def _check(op, q_nope, q_pe, *args, **kw):
    """Ours against the float64 reference, with PyTorch's own error in the input dtype as the yardstick."""
    out = getattr(llmkern, op)(q_nope, q_pe, *args, **kw)
    assert out.dtype == q_nope.dtype and out.shape == q_nope.shape
    kw.pop("num_splits", None)
    d = [t.double() if t.is_floating_point() else t for t in args]
    ref64 = getattr(ref, op)(q_nope.double(), q_pe.double(), *d, **kw)
    lowp = getattr(ref, op)(q_nope, q_pe, *args, compute_dtype=q_nope.dtype, **kw)
    assert_fa_close(out, ref64, lowp)
    return out


# ------------------------------------------------------------------------------------------------------ write
def test_kv_write_exact_into_one_joint_cache(device):
    """vLLM's layout: ckv_cache and kpe_cache are two slices of one (blocks, block_size, rank + rope) tensor; ckv a
    strided view. Bit-exact; -1 and a slot past the cache (32 = 4 blocks x 8) skip their token, with no error (no
    sync: the kernel bounds the slots, as paged_kv_write); every other slot untouched."""
    g = torch.Generator().manual_seed(1)
    joint = torch.randn(4, 8, 256 + 32, generator=g).to(torch.bfloat16).to(device)
    ckv_cache, kpe_cache = joint[..., :256], joint[..., 256:]
    ckv = torch.randn(10, 256, generator=g).to(torch.bfloat16).to(device)[::2]
    kpe = torch.randn(5, 32, generator=g).to(torch.bfloat16).to(device)
    slots = torch.tensor([31, 0, -1, 32, 17], dtype=torch.int64, device=device)
    want = joint.clone()
    ref.mla_kv_write(ckv, kpe, want[..., :256], want[..., 256:], slots)
    llmkern.mla_kv_write(ckv, kpe, ckv_cache, kpe_cache, slots)
    assert torch.equal(joint, want)
    assert torch.equal(ckv_cache[3, 7], ckv[0]) and torch.equal(kpe_cache[2, 1], kpe[4])


def test_kv_write_overlapping_caches_refused(device, no_kernel):
    """ckv_cache and kpe_cache are both written: a kpe_cache slice that reaches into ckv_cache's columns of one joint
    tensor (or the same tensor twice) would have kpe overwrite ckv; refused by name, nothing written. The two
    disjoint slices of the joint cache are accepted (test_kv_write_exact_into_one_joint_cache)."""
    joint = torch.zeros(4, 8, 256 + 32, dtype=torch.float16, device=device)
    ckv, kpe = torch.ones(2, 256, dtype=torch.float16, device=device), torch.ones(2, 32, dtype=torch.float16,
                                                                                   device=device)
    slots = torch.tensor([0, 9], dtype=torch.int64, device=device)
    for kpe_cache in (joint[..., 255:287], joint[..., :32]):
        with pytest.raises(ValueError, match="ckv_cache and kpe_cache"):
            llmkern.mla_kv_write(ckv, kpe, joint[..., :256], kpe_cache, slots)
    assert not joint.any()


def test_kv_write_source_inside_a_cache_refused(device, no_kernel):
    """ckv or kpe read from a cache the write overwrites (one row of the joint cache moved to another slot) would
    depend on the order of the stores: refused by name, nothing written."""
    joint = torch.randn(4, 8, 256 + 32, dtype=torch.float16, device=device)
    ckv_cache, kpe_cache = joint[..., :256], joint[..., 256:]
    slots = torch.tensor([0, 9], dtype=torch.int64, device=device)
    before = joint.clone()
    for name, ckv, kpe in [("ckv", ckv_cache[1, :2], kpe_cache[2, :2].clone()),
                           ("kpe", ckv_cache[1, :2].clone(), kpe_cache[0, :2])]:
        with pytest.raises(ValueError, match=f"{name} is read"):
            llmkern.mla_kv_write(ckv, kpe, ckv_cache, kpe_cache, slots)
        assert torch.equal(joint, before)
    # slot_mapping read from bytes the write overwrites (an int64 view of the joint cache): a store into slot 0
    # would change the slots later programs load
    inside = joint.view(-1)[:8].view(torch.int64)[:2]
    inside.copy_(slots)
    before = joint.clone()
    with pytest.raises(ValueError, match="slot_mapping is read"):
        llmkern.mla_kv_write(ckv_cache[1, :2].clone(), kpe_cache[0, :2].clone(), ckv_cache, kpe_cache, inside)
    assert torch.equal(joint, before)


# ------------------------------------------------------------------------------------------------------ decode
@pytest.mark.parametrize("dtype,heads,seq_lens,num_splits", [
    (torch.float16, 3, [1, 16, 17, 53], None),   # fewer heads than a row tile: padding rows; lengths across block
                                                 # edges (1, a block, a block + 1, several blocks)
    (torch.bfloat16, 34, [17, 40], 3),           # more heads than one row tile (two tiles), split-KV merged by the
                                                 # reduce kernel, a split with no keys (17 keys in 3 splits of 32)
    (torch.float32, 20, [1, 33], 1),             # fp32's 16-row tiles: two tiles, one split
])
def test_decode(device, dtype, heads, seq_lens, num_splits):
    """Ragged lengths in one batch against the float64 reference."""
    ckv, kpe, bt, sl, g = _make(device, seq_lens=seq_lens, dtype=dtype)
    q_nope, q_pe = _queries(g, len(seq_lens), heads, 256, 32, dtype, device)
    _check("mla_decode_attention", q_nope, q_pe, ckv, kpe, bt, sl, scale=1 / math.sqrt(192), num_splits=num_splits)


def test_decode_deepseek_v3_shape(device):
    """DeepSeek-V3's kv_lora_rank 512 and rope 64, 16 heads (a decode tile of its own), 4 splits."""
    ckv, kpe, bt, sl, g = _make(device, seq_lens=[70, 5], rank=512, rope_dim=64, block_size=32)
    q_nope, q_pe = _queries(g, 2, 16, 512, 64, torch.float16, device)
    _check("mla_decode_attention", q_nope, q_pe, ckv, kpe, bt, sl, scale=1 / math.sqrt(192), num_splits=4)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_128_heads_two_row_tiles(device, backend, monkeypatch, num_splits):
    """DeepSeek-V3 on one GPU (128 heads, rank 512, bf16): the dispatcher launches 2 row tiles of 64 heads per
    (sequence, split), so each latent byte is loaded twice (mla.decode_row_tiles; 4 times with the old 32-row
    tile); the output against the float64 reference, through the direct epilogue (its two column halves) with one
    split and the partials' merge with three. The C++ backend launches no Triton kernel."""
    grids = []
    launch = mla._utils.launch

    def record(kernel, grid, *args, **kw):
        grids.append((kernel, tuple(grid), kw.get("BLOCK_M"), kw.get("SPLIT")))
        return launch(kernel, grid, *args, **kw)

    monkeypatch.setattr(mla._utils, "launch", record)
    ckv, kpe, bt, sl, g = _make(device, seq_lens=[20, 37], rank=512, rope_dim=64, dtype=torch.bfloat16)
    q_nope, q_pe = _queries(g, 2, 128, 512, 64, torch.bfloat16, device)
    _check("mla_decode_attention", q_nope, q_pe, ckv, kpe, bt, sl, scale=1 / math.sqrt(192), num_splits=num_splits)
    attn = [(grid, bm, split) for kernel, grid, bm, split in grids if kernel is mla.kernels.mla_attention_kernel]
    assert attn == ([((2, 2, num_splits), 64, num_splits > 1)] if backend == "triton" else [])
    assert mla.decode_row_tiles(128) == 2 and mla.decode_row_tiles(64) == 1 and mla.decode_row_tiles(16) == 1


def test_decode_splits_agree(device):
    """The split count changes the summation order only: 1, 2 and 5 splits agree to fp32 rounding."""
    ckv, kpe, bt, sl, g = _make(device, seq_lens=[90, 33], dtype=torch.float32)
    q_nope, q_pe = _queries(g, 2, 4, 256, 32, torch.float32, device)
    outs = [llmkern.mla_decode_attention(q_nope, q_pe, ckv, kpe, bt, sl, scale=0.1, num_splits=n) for n in (1, 2, 5)]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[2], outs[0], rtol=1e-5, atol=1e-5)


def test_decode_peaked_scores(device):
    """Large scores (q scaled up 30x): the online softmax's running max must keep exp from overflowing."""
    ckv, kpe, bt, sl, g = _make(device, seq_lens=[40], dtype=torch.float32)
    q_nope, q_pe = _queries(g, 1, 2, 256, 32, torch.float32, device, q_scale=30.0)
    out = _check("mla_decode_attention", q_nope, q_pe, ckv, kpe, bt, sl, scale=1.0, num_splits=2)
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------------ prefill
@pytest.mark.parametrize("dtype,heads,causal", [
    (torch.float16, 5, True),      # rows of a tile span several tokens x 5 heads (token-major pairs)
    (torch.bfloat16, 40, True),    # a token's heads span two tiles
    (torch.float32, 2, False),
])
def test_prefill_chunked(device, dtype, heads, causal):
    """Chunked prefill: each sequence's new tokens after a cached prefix (none, partial block, several blocks), one
    sequence with no new tokens; bottom-right aligned causal mask."""
    seq_lens, q_lens = [7, 20, 37, 9], [7, 4, 11, 0]
    ckv, kpe, bt, sl, g = _make(device, seq_lens=seq_lens, dtype=dtype)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    q_nope, q_pe = _queries(g, sum(q_lens), heads, 256, 32, dtype, device)
    _check("mla_prefill_attention", q_nope, q_pe, ckv, kpe, bt, cu, sl, scale=1 / math.sqrt(192), causal=causal)


def test_prefill_last_token_equals_decode(device):
    """A sequence's last new token in prefill sees exactly what decode sees: the same output."""
    ckv, kpe, bt, sl, g = _make(device, seq_lens=[25], dtype=torch.float32)
    q_nope, q_pe = _queries(g, 6, 3, 256, 32, torch.float32, device)
    cu = torch.tensor([0, 6], dtype=torch.int32, device=device)
    pre = llmkern.mla_prefill_attention(q_nope, q_pe, ckv, kpe, bt, cu, sl, scale=0.2)
    dec = llmkern.mla_decode_attention(q_nope[-1:], q_pe[-1:], ckv, kpe, bt, sl, scale=0.2, num_splits=1)
    torch.testing.assert_close(pre[-1:], dec, rtol=1e-5, atol=1e-5)


@pytest.mark.cpu_backends("interpreter")   # runs the C++ kernel itself, on CPU tensors, on any machine
@pytest.mark.parametrize("causal,heads,dtype", [
    (True, 6, torch.bfloat16), (False, 6, torch.bfloat16),   # the register tiles
    (True, 40, torch.float32), (False, 33, torch.float16),   # BLAS tiles (csrc/mla.cpp: kGemmHeads = 32)
])
def test_cpp_prefill_split_kv(monkeypatch, causal, heads, dtype):
    """The C++ prefill over split-KV (which it picks only for few new tokens on many threads): 3 splits of a
    31-key sequence (a split left empty for the first tokens under the causal mask) merged, against the reference;
    with few heads (register tiles) and many (BLAS tiles), in each dtype."""
    use_cpp_backend(monkeypatch)
    ckv, kpe, bt, sl, g = _make("cpu", seq_lens=[31, 9], dtype=dtype)
    cu = torch.tensor([0, 5, 9], dtype=torch.int32)
    q_nope, q_pe = _queries(g, 9, heads, 256, 32, dtype, "cpu")
    out = torch.empty(q_nope.shape, dtype=q_nope.dtype)
    torch.ops.llmkern_cpu.mla_attention(q_nope, q_pe, ckv, kpe, bt, cu, sl, out, 0.1, causal, 3)
    args = (ckv, kpe, bt, cu, sl)
    ref64 = ref.mla_prefill_attention(q_nope.double(), q_pe.double(), *[t.double() for t in args[:2]], *args[2:],
                                      scale=0.1, causal=causal)
    lowp = ref.mla_prefill_attention(q_nope, q_pe, *args, scale=0.1, causal=causal, compute_dtype=dtype)
    assert_fa_close(out, ref64, lowp)


# ------------------------------------------------------------------------------------------------------ the paper
def test_absorbed_equals_naive_per_head(device):
    """The absorbed computation equals DeepSeek-V2's naive one (arXiv 2405.04434, eqs. 9-19) on a tiny random
    configuration: per head, keys [W^UK_i c_j; k^R_j] and values W^UV_i c_j decompressed from the latents, plain
    softmax attention, against W^UV_i applied to the absorbed op's output with q_nope = W^UK_i^T q^C."""
    heads, d_nope, d_rope, d_v, rank, n = 3, 16, 32, 24, 256, 21
    g = torch.Generator().manual_seed(5)
    w_uk = torch.randn(heads, d_nope, rank, generator=g, dtype=torch.float64) / math.sqrt(rank)
    w_uv = torch.randn(heads, d_v, rank, generator=g, dtype=torch.float64) / math.sqrt(rank)
    c_kv = torch.randn(n, rank, generator=g, dtype=torch.float64)
    k_r = torch.randn(n, d_rope, generator=g, dtype=torch.float64)
    q_c = torch.randn(heads, d_nope, generator=g, dtype=torch.float64)
    q_r = torch.randn(heads, d_rope, generator=g, dtype=torch.float64)
    scale = 1 / math.sqrt(d_nope + d_rope)

    # naive: decompress per head
    k = torch.cat([torch.einsum("hdr,nr->hnd", w_uk, c_kv), k_r.expand(heads, n, d_rope)], dim=-1)
    v = torch.einsum("hdr,nr->hnd", w_uv, c_kv)
    p = torch.softmax(scale * torch.einsum("hd,hnd->hn", torch.cat([q_c, q_r], -1), k), dim=-1)
    naive = torch.einsum("hn,hnd->hd", p, v)

    # absorbed, through the op (fp32 kernel) on a paged cache of 2 blocks of 16
    q_nope = torch.einsum("hdr,hd->hr", w_uk, q_c)
    ckv_cache = torch.zeros(2, 16, rank, dtype=torch.float64)
    kpe_cache = torch.zeros(2, 16, d_rope, dtype=torch.float64)
    ckv_cache.view(32, rank)[:n], kpe_cache.view(32, d_rope)[:n] = c_kv, k_r
    bt = torch.tensor([[1, 0]], dtype=torch.int32, device=device)
    ckv_cache, kpe_cache = ckv_cache[[1, 0]], kpe_cache[[1, 0]]   # block table [1, 0]: the first 16 in block 1
    o = llmkern.mla_decode_attention(q_nope[None].float().to(device), q_r[None].float().to(device),
                                     ckv_cache.float().to(device), kpe_cache.float().to(device), bt,
                                     torch.tensor([n], dtype=torch.int32, device=device), scale=scale)
    absorbed = torch.einsum("hdr,hr->hd", w_uv, o[0].double().cpu())
    torch.testing.assert_close(absorbed, naive, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------------ errors
def _decode_args(device):
    ckv, kpe, bt, sl, g = _make(device, seq_lens=[5, 20])
    q_nope, q_pe = _queries(g, 2, 4, 256, 32, torch.float16, device)
    return q_nope, q_pe, ckv, kpe, bt, sl


@pytest.mark.parametrize("change,error,match", [
    (lambda a: {**a, "q_pe": a["q_pe"][:, :3]}, ValueError, "q_pe"),
    (lambda a: {**a, "q_nope": a["q_nope"].float()}, TypeError, "q_nope"),
    (lambda a: {**a, "q_nope": a["q_nope"][..., :128], "ckv_cache": a["ckv_cache"][..., :128]}, ValueError,
     "kv_lora_rank"),
    (lambda a: {**a, "kpe_cache": a["kpe_cache"][:1]}, ValueError, "kpe_cache"),
    (lambda a: {**a, "seq_lens": a["seq_lens"].long()}, TypeError, "seq_lens"),
    (lambda a: {**a, "seq_lens": a["seq_lens"] * 0 + 33}, ValueError, "seq_lens"),   # longer than its table row
    (lambda a: {**a, "seq_lens": a["seq_lens"] * 0}, ValueError, "seq_lens"),        # decode needs >= 1 token
    (lambda a: {**a, "block_tables": a["block_tables"] * 0 + 7}, ValueError, "block"),
    (lambda a: {**a, "scale": None}, TypeError, "scale is required"),
    (lambda a: {**a, "scale": "0.1"}, TypeError, "scale must be a float, got '0.1'"),   # None is no choice here
    (lambda a: {**a, "scale": float("nan")}, ValueError, "scale"),
    (lambda a: {**a, "num_splits": 0}, ValueError, "num_splits"),
])
def test_decode_bad_input(device, no_kernel, change, error, match):
    names = ("q_nope", "q_pe", "ckv_cache", "kpe_cache", "block_tables", "seq_lens")
    a = change(dict(zip(names, _decode_args(device)), scale=0.1))
    with pytest.raises(error, match=match):
        args = [a.pop(n) for n in names]
        llmkern.mla_decode_attention(*args, **a)


def test_prefill_and_write_bad_input(device, no_kernel):
    q_nope, q_pe, ckv, kpe, bt, sl = _decode_args(device)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        llmkern.mla_prefill_attention(q_nope, q_pe, ckv, kpe, bt, cu[:2], sl, scale=0.1)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        llmkern.mla_prefill_attention(q_nope, q_pe, ckv, kpe, bt, cu.flip(0), sl, scale=0.1)
    with pytest.raises(TypeError, match="causal"):
        llmkern.mla_prefill_attention(q_nope, q_pe, ckv, kpe, bt, cu, sl, scale=0.1, causal=1)
    slots = torch.tensor([0, 1], dtype=torch.int64, device=device)
    with pytest.raises(TypeError, match="ckv"):
        llmkern.mla_kv_write(q_nope[:, 0].float(), q_pe[:, 0], ckv, kpe, slots)
    with pytest.raises(ValueError, match="ckv_cache"):
        llmkern.mla_kv_write(q_nope[:, 0], q_pe[:, 0], ckv.expand(2, *ckv.shape)[0].as_strided(ckv.shape, (0, 256, 1)),
                             kpe, slots)


def test_supported_pairs_are_compile_checked():
    """Every (kv_lora_rank, rope_dim) the checks accept has compile specs (so check-compile covers its tiles)."""
    specs = list(mla._compile_specs())
    for rank, rope_dim in mla.SUPPORTED:
        assert any(s.constexprs.get("RANK") == rank and s.constexprs.get("ROPE_DIM") == rope_dim
                   and s.kernel is mla.kernels.mla_attention_kernel for s in specs), (rank, rope_dim)
