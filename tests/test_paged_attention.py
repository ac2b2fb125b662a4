"""paged_kv_write, paged_decode_attention, paged_prefill_attention against llmkern.reference.

The reference gathers each sequence's logically contiguous K/V from its block table and runs plain attention in
float64; PyTorch's own error in the input dtype sets the tolerance (tests/tolerance.py). Block tables are random
permutations of the cache's blocks, so tables are scattered and non-monotone, and the cache holds other data
(random) everywhere a sequence does not own: reading a wrong block shows up as a wrong answer.
"""
import pytest
import torch

import llmkern
from llmkern import _utils
from llmkern import paged_attention as pa
from llmkern import reference as ref
from tolerance import assert_fa_close

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.cpu_backends("interpreter", "cpp")]   # on CPU: the Triton interpreter and the C++ backend


def _make(device, *, seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, extra_blocks=3, seed=0,
          pad=0):
    """A random cache big enough for the sequences (plus spare blocks) and scattered block tables."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in seq_lens]
    width = max(need + [1]) + pad
    num_blocks = sum(need) + extra_blocks
    kc = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype).to(device)
    vc = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype).to(device)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    rows, i = [], 0
    for n in need:
        rows.append(perm[i:i + n] + [0] * (width - n))
        i += n
    bt = torch.tensor(rows, dtype=torch.int32, device=device)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return kc, vc, bt, sl, g


def _check_decode(q, kc, vc, bt, sl, **kw):
    num_splits = kw.pop("num_splits", None)
    out = llmkern.paged_decode_attention(q, kc, vc, bt, sl, num_splits=num_splits, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    ref64 = ref.paged_decode_attention(q.double(), kc.double(), vc.double(), bt, sl, **kw)
    lowp = ref.paged_decode_attention(q, kc, vc, bt, sl, compute_dtype=q.dtype, **kw)
    assert_fa_close(out, ref64, lowp)
    return out


def _check_prefill(q, kc, vc, bt, cu, sl, **kw):
    out = llmkern.paged_prefill_attention(q, kc, vc, bt, cu, sl, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    ref64 = ref.paged_prefill_attention(q.double(), kc.double(), vc.double(), bt, cu, sl, **kw)
    lowp = ref.paged_prefill_attention(q, kc, vc, bt, cu, sl, compute_dtype=q.dtype, **kw)
    assert_fa_close(out, ref64, lowp)
    return out


# ------------------------------------------------------------------------------------------------------ write
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_kv_write_exact_with_skips(device, dtype):
    num_blocks, bs, kvh, d = 6, 16, 2, 64
    g = torch.Generator().manual_seed(1)
    kc = torch.randn(num_blocks, bs, kvh, d, generator=g).to(dtype).to(device)
    vc = torch.randn(num_blocks, bs, kvh, d, generator=g).to(dtype).to(device)
    # k as a strided view (every other token of a bigger tensor): strides are honoured, not assumed.
    k = torch.randn(14, kvh, d, generator=g).to(dtype).to(device)[::2]
    v = torch.randn(7, kvh, d, generator=g).to(dtype).to(device)
    slots = torch.tensor([95, 0, -1, 17, 31, -1, 40], dtype=torch.int64, device=device)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    ref.paged_kv_write(k, v, kc_ref, vc_ref, slots)
    llmkern.paged_kv_write(k, v, kc, vc, slots)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)  # bit-exact, skipped and other slots untouched
    assert torch.equal(kc[95 // bs, 95 % bs], k[0]) and torch.equal(vc[2, 8], v[6])


# ------------------------------------------------------------------------------------------------------ decode
@pytest.mark.parametrize("block_size", [8, 16, 32, 12])
def test_decode_lengths_across_block_edges(device, block_size):
    """Lengths 1, block_size, block_size + 1 and several blocks in one batch (ragged), GQA group 4; a block_size
    that is not a power of two too (the ops take any; PagedKVCache allocates powers of two)."""
    lens = [1, block_size, block_size + 1, 3 * block_size + 5]
    kc, vc, bt, sl, g = _make(device, seq_lens=lens, num_heads=8, num_kv_heads=2, head_dim=64,
                              block_size=block_size, dtype=torch.float16)
    q = torch.randn(len(lens), 8, 64, generator=g).half().to(device)
    _check_decode(q, kc, vc, bt, sl)


# gqa6: a group that the C++ decode splits into head blocks of unequal sizes (4 + 2 in P @ V, 6 in the scores)
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (16, 4), (16, 2), (8, 1), (12, 2)],
                         ids=["mha", "gqa4", "gqa8", "mqa", "gqa6"])
def test_decode_gqa_mqa(device, num_heads, num_kv_heads):
    lens = [5, 40]
    kc, vc, bt, sl, g = _make(device, seq_lens=lens, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=64,
                              block_size=16, dtype=torch.float16, seed=2)
    q = torch.randn(len(lens), num_heads, 64, generator=g).half().to(device)
    _check_decode(q, kc, vc, bt, sl)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group", [1, 4])
def test_decode_dtypes(device, dtype, group):
    lens = [33, 7]
    kc, vc, bt, sl, g = _make(device, seq_lens=lens, num_heads=2 * group, num_kv_heads=2, head_dim=64,
                              block_size=16, dtype=dtype, seed=3)
    q = torch.randn(len(lens), 2 * group, 64, generator=g).to(dtype).to(device)
    _check_decode(q, kc, vc, bt, sl)


@pytest.mark.parametrize("head_dim", [80, 256])
@pytest.mark.parametrize("group,num_splits", [(4, None), (1, None), (1, 2)])
def test_decode_head_dims(device, head_dim, group, num_splits):
    """A head_dim that is not a power of two (masked lanes) and the largest supported one, on the dot path (group
    4) and the broadcast path (group 1: its head_dim <= 128 and 256 products take different layouts, and so does
    the split merge of the reduce)."""
    lens = [20, 3]
    kc, vc, bt, sl, g = _make(device, seq_lens=lens, num_heads=group, num_kv_heads=1, head_dim=head_dim,
                              block_size=16, dtype=torch.float16, seed=4)
    q = torch.randn(len(lens), group, head_dim, generator=g).half().to(device)
    _check_decode(q, kc, vc, bt, sl, num_splits=num_splits)


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("num_splits", [2, 7])
def test_decode_forced_splits(device, group, num_splits):
    """Split-KV with a forced count: ragged lengths give uneven and empty splits (length 3 into 7 splits)."""
    lens = [3, 70, 150]
    kc, vc, bt, sl, g = _make(device, seq_lens=lens, num_heads=2 * group, num_kv_heads=2, head_dim=64,
                              block_size=16, dtype=torch.float16, seed=5)
    q = torch.randn(len(lens), 2 * group, 64, generator=g).half().to(device)
    one = llmkern.paged_decode_attention(q, kc, vc, bt, sl, num_splits=1)
    split = _check_decode(q, kc, vc, bt, sl, num_splits=num_splits)
    # The same softmax merged differently: they may differ by the final fp16 rounding (2^-10 relative) and little else.
    torch.testing.assert_close(split, one, rtol=2e-3, atol=2e-3)


def test_decode_auto_split_long_sequence(device):
    """num_splits=None picks more than one split for a lone long-ish sequence, and the merged result is right."""
    lens = [700]
    assert pa.choose_num_splits(1, 2, 700, torch.device(device)) > 1
    assert pa.choose_num_splits(256, 8, 700, torch.device(device)) == 1  # a full batch needs no split
    kc, vc, bt, sl, g = _make(device, seq_lens=lens, num_heads=8, num_kv_heads=2, head_dim=64, block_size=32,
                              dtype=torch.bfloat16, seed=6)
    q = torch.randn(1, 8, 64, generator=g).bfloat16().to(device)
    _check_decode(q, kc, vc, bt, sl)


@pytest.mark.parametrize("group", [1, 4])
def test_decode_window_softcap_scale(device, group):
    lens = [1, 30, 90]
    kc, vc, bt, sl, g = _make(device, seq_lens=lens, num_heads=2 * group, num_kv_heads=2, head_dim=64,
                              block_size=16, dtype=torch.float16, seed=7)
    q = (3 * torch.randn(len(lens), 2 * group, 64, generator=g)).half().to(device)  # big scores: softcap bites
    _check_decode(q, kc, vc, bt, sl, window=(20, 0))
    _check_decode(q, kc, vc, bt, sl, window=(0, -1), num_splits=3)  # sees only itself: o = its own v
    _check_decode(q, kc, vc, bt, sl, softcap=2.0, scale=0.3)
    _check_decode(q, kc, vc, bt, sl, softcap=5.0, window=(33, -1), num_splits=2)


# Caps 1 to 1e6 (issue 16.3), as in test_attention.test_softcap_precision: fp32 shows a tanh that loses precision
# for small |s| / softcap; the fp16 case checks that large caps stay accurate in the 16-bit path too.
SOFTCAP_SWEEP = [(torch.float32, 1.0), (torch.float32, 1e3), (torch.float32, 1e6), (torch.float16, 1e6)]


@pytest.mark.parametrize("dtype,softcap", SOFTCAP_SWEEP)
@pytest.mark.parametrize("group", [1, 4])
def test_decode_softcap_precision(device, dtype, softcap, group):
    lens = [9, 70]
    kc, vc, bt, sl, g = _make(device, seq_lens=lens, num_heads=2 * group, num_kv_heads=2, head_dim=64,
                              block_size=16, dtype=dtype, seed=14)
    q = (3 * torch.randn(len(lens), 2 * group, 64, generator=g)).to(dtype).to(device)
    _check_decode(q, kc, vc, bt, sl, softcap=softcap, num_splits=2)


def test_decode_strided_q_and_table_padding(device):
    """q as a view into a packed qkv tensor; unused table entries hold -1 (never read, never rejected)."""
    lens = [17, 2]
    kc, vc, bt, sl, g = _make(device, seq_lens=lens, num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                              dtype=torch.float16, seed=8, pad=2)
    bt[1, 1:] = -1
    bt[0, 2:] = -1
    qkv = torch.randn(2, 8, 64, generator=g).half().to(device)
    _check_decode(qkv[:, 2:6], kc, vc, bt, sl)


def test_block_table_column_stride(device):
    """A block table whose column stride is not 1 (bt.t().contiguous().t(): stride(1) = batch) is read through its
    strides by decode and prefill (ignoring stride(1) reads other sequences' entries: an error of about 1)."""
    lens = [37, 21, 9]
    kc, vc, bt, sl, g = _make(device, seq_lens=lens, num_heads=4, num_kv_heads=2, head_dim=64, block_size=8,
                              dtype=torch.float32, seed=11)
    col = bt.t().contiguous().t()
    assert col.stride(1) == bt.shape[0] and torch.equal(col, bt)
    _check_decode(torch.randn(3, 4, 64, generator=g).to(device), kc, vc, col, sl, num_splits=2)
    cu = torch.tensor([0, 5, 6, 9], dtype=torch.int32, device=device)
    _check_prefill(torch.randn(9, 4, 64, generator=g).to(device), kc, vc, col, cu, sl)


def test_infinite_softcap_is_no_cap(device):
    """softcap=inf means no cap (paged decode and prefill): the numbers of softcap=None, not NaN."""
    kc, vc, bt, sl, g = _make(device, seq_lens=[20, 5], num_heads=2, num_kv_heads=1, head_dim=32, block_size=16,
                              dtype=torch.float32, seed=12)
    q = torch.randn(2, 2, 32, generator=g).to(device)
    plain = llmkern.paged_decode_attention(q, kc, vc, bt, sl)
    torch.testing.assert_close(llmkern.paged_decode_attention(q, kc, vc, bt, sl, softcap=float("inf")), plain,
                               rtol=0, atol=0)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)
    plain = llmkern.paged_prefill_attention(q, kc, vc, bt, cu, sl)
    torch.testing.assert_close(llmkern.paged_prefill_attention(q, kc, vc, bt, cu, sl, softcap=float("inf")), plain,
                               rtol=0, atol=0)


def test_decode_torch_compile_fullgraph(device):
    lens = [9, 33]
    kc, vc, bt, sl, g = _make(device, seq_lens=lens, num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                              dtype=torch.float16, seed=9)
    q = torch.randn(2, 4, 64, generator=g).half().to(device)
    slots = torch.tensor([8 + 16 * 0, -1], dtype=torch.int64, device=device)  # overwrite one cached token
    k_new = torch.randn(2, 2, 64, generator=g).half().to(device)

    def step(q, k_new, kc, vc, bt, sl, slots):
        llmkern.paged_kv_write(k_new, k_new, kc, vc, slots)
        return llmkern.paged_decode_attention(q, kc, vc, bt, sl, softcap=10.0)

    kc2, vc2 = kc.clone(), vc.clone()
    expected = step(q, k_new, kc2, vc2, bt, sl, slots)
    compiled = torch.compile(step, fullgraph=True)
    out = compiled(q, k_new, kc, vc, bt, sl, slots)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    assert torch.equal(out, expected)


# ------------------------------------------------------------------------------------------------------ prefill
@pytest.mark.parametrize("num_heads,num_kv_heads,dtype", [(4, 4, torch.float16), (8, 2, torch.bfloat16),
                                                          (4, 1, torch.float32)], ids=["mha-fp16", "gqa-bf16",
                                                                                      "mqa-fp32"])
def test_prefill_chunks_over_cached_prefix(device, num_heads, num_kv_heads, dtype):
    """New-token counts 1, < block, > block (and a whole prompt with no prefix), against prefixes of all sizes."""
    q_lens = [1, 5, 40, 23]
    lens = [30, 16, 75, 23]
    kc, vc, bt, sl, g = _make(device, seq_lens=lens, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=64,
                              block_size=16, dtype=dtype, seed=11)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    q = torch.randn(sum(q_lens), num_heads, 64, generator=g).to(dtype).to(device)
    _check_prefill(q, kc, vc, bt, cu, sl)


def test_prefill_window_softcap_noncausal_and_empty(device):
    q_lens = [3, 0, 70]
    lens = [40, 12, 100]
    kc, vc, bt, sl, g = _make(device, seq_lens=lens, num_heads=4, num_kv_heads=2, head_dim=64, block_size=32,
                              dtype=torch.float16, seed=12)
    cu = torch.tensor([0, 3, 3, 73], dtype=torch.int32, device=device)
    q = (2 * torch.randn(73, 4, 64, generator=g)).half().to(device)
    _check_prefill(q, kc, vc, bt, cu, sl, window=(17, -1), softcap=4.0)
    _check_prefill(q, kc, vc, bt, cu, sl, causal=False, window=(9, 5))
    _check_prefill(q, kc, vc, bt, cu, sl, causal=False, scale=0.05)


@pytest.mark.parametrize("dtype,softcap", SOFTCAP_SWEEP)
def test_prefill_softcap_precision(device, dtype, softcap):
    q_lens, lens = [5, 40], [30, 40]
    kc, vc, bt, sl, g = _make(device, seq_lens=lens, num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                              dtype=dtype, seed=15)
    cu = torch.tensor([0, 5, 45], dtype=torch.int32, device=device)
    q = (3 * torch.randn(45, 4, 64, generator=g)).to(dtype).to(device)
    _check_prefill(q, kc, vc, bt, cu, sl, softcap=softcap)


def test_prefill_then_decode_matches_dense_attention(device):
    """The serving loop end to end: write a prompt chunk by chunk through the cache, prefill each chunk, decode
    two tokens; every output equals dense causal attention over the whole sequence at that point."""
    torch.manual_seed(13)
    cache = llmkern.PagedKVCache(1, 12, 16, 2, 64, dtype=torch.float32, device=device)
    total = 40 + 2
    q_all = torch.randn(total, 4, 64, device=device)
    k_all = torch.randn(total, 2, 64, device=device)
    v_all = torch.randn(total, 2, 64, device=device)
    dense = ref.attention(q_all[None].double(), k_all[None].double(), v_all[None].double(), causal=True)[0]
    pos = 0
    for n in (25, 15, 1, 1):  # two prefill chunks (the second one crosses a block edge), then two decode steps
        slots = cache.append("s", n)
        llmkern.paged_kv_write(k_all[pos:pos + n], v_all[pos:pos + n], cache.k_cache(0), cache.v_cache(0), slots)
        bt, sl = cache.block_tables(["s"]), cache.seq_lens(["s"])
        if n > 1:
            cu = torch.tensor([0, n], dtype=torch.int32, device=device)
            out = llmkern.paged_prefill_attention(q_all[pos:pos + n], cache.k_cache(0), cache.v_cache(0), bt, cu, sl)
        else:
            out = llmkern.paged_decode_attention(q_all[pos:pos + 1], cache.k_cache(0), cache.v_cache(0), bt, sl)
        torch.testing.assert_close(out.double(), dense[pos:pos + n], atol=1e-5, rtol=1e-5)
        pos += n


# ------------------------------------------------------------------------------------------------------ bad input
def _bad_setup(device):
    kc, vc, bt, sl, g = _make(device, seq_lens=[20, 5], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                              dtype=torch.float16, extra_blocks=0)
    q = torch.randn(2, 4, 64, generator=g).half().to(device)
    return q, kc, vc, bt, sl


def test_decode_bad_inputs(device, no_kernel):
    q, kc, vc, bt, sl = _bad_setup(device)
    nb = kc.shape[0]
    cases = [
        (TypeError, "q must", dict(q=q.tolist())),
        (TypeError, "v_cache", dict(v_cache=vc.float())),
        (ValueError, "multiple of the cache's num_kv_heads", dict(q=q[:, :3])),
        (ValueError, "head_dim", dict(q=torch.randn(2, 4, 32, device=device).half())),
        (ValueError, "same shape", dict(v_cache=vc[:, :8])),
        (TypeError, "block_tables", dict(block_tables=bt.long())),
        (TypeError, "seq_lens", dict(seq_lens=sl.long())),
        (ValueError, "one row per sequence", dict(seq_lens=sl[:1])),
        (ValueError, "block_tables: entries", dict(block_tables=torch.where(bt == bt[0, 1], nb, bt))),
        (ValueError, "block_tables: entries", dict(block_tables=torch.where(bt == bt[1, 0], -1, bt))),
        (ValueError, "does not fit", dict(seq_lens=torch.tensor([20, 33], dtype=torch.int32, device=device))),
        (ValueError, "seq_lens must be >= 1", dict(seq_lens=torch.tensor([20, 0], dtype=torch.int32,
                                                                          device=device))),
        (ValueError, "num_splits", dict(num_splits=0)),
        (TypeError, "num_splits", dict(num_splits=2.0)),
        (ValueError, "window", dict(window=(-2, 0))),
        (ValueError, "softcap", dict(softcap=0.0)),
        (ValueError, "softcap", dict(softcap=float("nan"))),
        (ValueError, "softcap", dict(softcap=1e-40)),
        (ValueError, "scale", dict(scale=float("inf"))),
        (ValueError, "scale", dict(scale=float("nan"))),
    ]
    for exc, msg, change in cases:
        args = dict(q=q, k_cache=kc, v_cache=vc, block_tables=bt, seq_lens=sl)
        kwargs = {k: change.pop(k) for k in ("num_splits", "window", "softcap", "scale") if k in change}
        args.update(change)
        with pytest.raises(exc, match=msg):
            llmkern.paged_decode_attention(*args.values(), **kwargs)


def test_prefill_bad_inputs(device):
    q, kc, vc, bt, sl = _bad_setup(device)
    qp = torch.randn(6, 4, 64, device=device).half()
    cu = torch.tensor([0, 4, 6], dtype=torch.int32, device=device)
    llmkern.paged_prefill_attention(qp, kc, vc, bt, cu, sl)  # the valid call
    with pytest.raises(ValueError, match="shorter than"):
        llmkern.paged_prefill_attention(qp, kc, vc, bt, torch.tensor([0, 0, 6], dtype=torch.int32, device=device),
                                        sl)
    with pytest.raises(ValueError, match="end at total_q"):
        llmkern.paged_prefill_attention(qp, kc, vc, bt, torch.tensor([0, 4, 5], dtype=torch.int32, device=device),
                                        sl)
    with pytest.raises(ValueError, match="non-decreasing"):
        llmkern.paged_prefill_attention(qp, kc, vc, bt, torch.tensor([0, 7, 6], dtype=torch.int32, device=device),
                                        sl)
    with pytest.raises(ValueError, match="batch \\+ 1"):
        llmkern.paged_prefill_attention(qp, kc, vc, bt, cu[:2], sl)
    with pytest.raises(TypeError, match="cu_seqlens_q"):
        llmkern.paged_prefill_attention(qp, kc, vc, bt, cu.long(), sl)
    with pytest.raises(ValueError, match="block_tables: entries"):
        llmkern.paged_prefill_attention(qp, kc, vc, bt + 100, cu, sl)


@pytest.mark.parametrize("head_dim", [20, 264])
def test_unsupported_head_dim_refused_before_launch(device, head_dim, no_kernel):
    """A cache of head_dim 20 or 264 (outside multiples of 8 in [32, 256]) is refused by every paged op, with a
    ValueError naming head_dim, before any kernel is launched."""
    kc = torch.zeros(4, 16, 1, head_dim, device=device)
    bt = torch.tensor([[0, 1]], dtype=torch.int32, device=device)
    sl = torch.tensor([20], dtype=torch.int32, device=device)
    q = torch.zeros(1, 2, head_dim, device=device)
    with pytest.raises(ValueError, match="head_dim"):
        llmkern.paged_decode_attention(q, kc, kc.clone(), bt, sl)
    with pytest.raises(ValueError, match="head_dim"):
        llmkern.paged_prefill_attention(q, kc, kc.clone(), bt, torch.tensor([0, 1], dtype=torch.int32,
                                                                             device=device), sl)
    with pytest.raises(ValueError, match="head_dim"):
        llmkern.paged_kv_write(q[:, :1], q[:, :1], kc, kc.clone(), torch.tensor([3], device=device))


def test_kv_write_bad_inputs_change_nothing(device, no_kernel):
    _, kc, vc, _, _ = _bad_setup(device)
    k = torch.randn(3, 2, 64, device=device).half()
    slots = torch.tensor([0, 5, 9], dtype=torch.int64, device=device)
    before = kc.clone(), vc.clone()
    cases = [
        (TypeError, "slot_mapping", dict(slot_mapping=slots.int())),
        (ValueError, "one slot per token", dict(slot_mapping=slots[:2])),
        (TypeError, "dtype", dict(k=k.float(), v=k.float())),
        (ValueError, "to match the cache", dict(k=k[:, :1], v=k[:, :1])),
        (ValueError, "same shape", dict(v=k[:2])),
        # a cache with one element at two indices (stride 0) cannot be written: the op's check refuses it
        (ValueError, "k_cache is written in place", dict(k_cache=kc[:1].expand(kc.shape))),
    ]
    for exc, msg, change in cases:
        args = dict(k=k, v=k, k_cache=kc, v_cache=vc, slot_mapping=slots)
        args.update(change)
        with pytest.raises(exc, match=msg):
            llmkern.paged_kv_write(*args.values())
        assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])


def test_kv_write_aliased_caches_refused(device, no_kernel):
    """k_cache and v_cache are both written: if they share an element, v overwrites k there. The same tensor twice,
    two overlapping block ranges of one buffer, or head-dim slices that overlap are refused by name, unchanged."""
    k = torch.randn(3, 2, 64, device=device).half()
    slots = torch.tensor([0, 5, 9], dtype=torch.int64, device=device)
    base = torch.zeros(5, 16, 2, 96, device=device).half()
    for kc, vc in [(base[:4, ..., :64], base[:4, ..., :64]),            # one tensor as both
                   (base[:4, ..., :64], base[1:, ..., :64]),            # blocks 1-3 in both
                   (base[:4, ..., :64], base[:4, ..., 32:])]:           # head dims 32-63 in both
        before = base.clone()
        with pytest.raises(ValueError, match="k_cache and v_cache"):
            llmkern.paged_kv_write(k, k, kc, vc, slots)
        assert torch.equal(base, before)


def test_kv_write_source_inside_a_cache_refused(device, no_kernel):
    """k or v read from memory that the write overwrites (a view of k_cache or v_cache, e.g. to move tokens within
    the cache) would give an answer that depends on the order of the stores: refused by name, as torch's index_put_
    refuses such an overlap, nothing written."""
    joint = torch.randn(2, 3, 16, 2, 32, device=device).half()       # k_cache, v_cache, and a spare region
    kc, vc, spare = joint[0, :2], joint[1, :2], joint[:, 2]
    slots = torch.tensor([1, 2, 3], dtype=torch.int64, device=device)
    before = joint.clone()
    for name, k, v in [("k", kc[0, :3], spare[1, :3]), ("v", spare[0, :3], vc[1, 4:7]), ("v", spare[0, :3],
                                                                                          kc[0, 8:11])]:
        with pytest.raises(ValueError, match=f"{name} is read"):
            llmkern.paged_kv_write(k, v, kc, vc, slots)
        assert torch.equal(joint, before)


def test_kv_write_source_beside_the_caches_in_one_buffer(device):
    """k and v from a region of the caches' own buffer that the write does not touch are written as copies."""
    joint = torch.randn(2, 3, 16, 2, 32, device=device).half()
    kc, vc, spare = joint[0, :2], joint[1, :2], joint[:, 2]
    slots = torch.tensor([1, 2, 3], dtype=torch.int64, device=device)
    want_k, want_v = kc.clone(), vc.clone()
    ref.paged_kv_write(spare[0, :3].clone(), spare[1, :3].clone(), want_k, want_v, slots)
    llmkern.paged_kv_write(spare[0, :3], spare[1, :3], kc, vc, slots)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


def test_kv_write_interleaved_caches_that_share_nothing(device):
    """The overlap check is exact: caches whose address ranges interleave without a common element are written,
    as FlashInfer's joint (num_blocks, 2, block_size, heads, head_dim) cache's [:, 0] and [:, 1] and two head-dim
    halves of one buffer."""
    k, v = torch.randn(3, 2, 32, device=device).half(), torch.randn(3, 2, 32, device=device).half()
    slots = torch.tensor([0, 21, 9], dtype=torch.int64, device=device)
    joint = torch.zeros(3, 2, 16, 2, 32, device=device).half()
    halves = torch.zeros(3, 16, 2, 64, device=device).half()
    for kc, vc in [(joint[:, 0], joint[:, 1]), (halves[..., :32], halves[..., 32:])]:
        want_k, want_v = kc.clone(), vc.clone()
        ref.paged_kv_write(k, v, want_k, want_v, slots)
        llmkern.paged_kv_write(k, v, kc, vc, slots)
        assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


def test_share_memory_is_exact():
    """_utils.share_memory against marking every element's bytes, on random strided views of one small buffer."""
    g = torch.Generator().manual_seed(0)
    buf = torch.zeros(400, dtype=torch.float16)

    def view():
        ndim = int(torch.randint(1, 4, (1,), generator=g))
        shape = torch.randint(1, 5, (ndim,), generator=g).tolist()
        stride = torch.randint(0, 12, (ndim,), generator=g).tolist()
        return buf.as_strided(shape, stride, int(torch.randint(0, 40, (1,), generator=g)))

    def marked(t):
        return {t.storage_offset() + sum(i * s for i, s in zip(idx, t.stride())) for idx in torch.cartesian_prod(
            *[torch.arange(n) for n in t.shape]).reshape(-1, t.dim()).tolist()}

    for _ in range(300):
        a, b = view(), view()
        assert _utils.share_memory(a, b) == bool(marked(a) & marked(b)), (a.shape, a.stride(), b.shape, b.stride())
    # different element sizes: bytes, not elements, decide
    assert _utils.share_memory(buf[:2], buf.view(torch.uint8)[3:4])
    assert not _utils.share_memory(buf[:2], buf.view(torch.uint8)[4:6])


def test_kv_write_slots_outside_the_cache_write_nothing(device):
    """Slots are not read on the host (no sync): one outside [0, num_blocks * block_size), below or above, writes
    nothing, like -1; the valid slots of the same call are written. (Valid slots come from PagedKVCache.append or
    PagedAttentionPlan.slot_mapping, which check the tables they come from.)"""
    _, kc, vc, _, _ = _bad_setup(device)
    nslots = kc.shape[0] * kc.shape[1]
    k = torch.randn(5, 2, 64, device=device).half()
    slots = torch.tensor([nslots, 3, -2, -(2 ** 40), 2 ** 40], dtype=torch.int64, device=device)
    want_k, want_v = kc.clone(), vc.clone()
    want_k[0, 3], want_v[0, 3] = k[1], k[1]
    llmkern.paged_kv_write(k, k, kc, vc, slots)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_nan_key_propagates(device, num_splits):
    """A NaN in a visible cached key makes its sequence's rows of that KV head NaN, through the split merge too (as
    PyTorch's softmax would); the other sequence, and keys past a sequence's length, stay out of it."""
    kc, vc, bt, sl, g = _make(device, seq_lens=[3, 40], num_heads=4, num_kv_heads=2, head_dim=32, block_size=16,
                              dtype=torch.float32, seed=9)
    kc[bt[1, 1].long(), 7, 0, 4] = float("nan")        # sequence 1, position 23, KV head 0
    kc[bt[0, 0].long(), 5, :, :] = float("nan")         # sequence 0, position 5: past its length 3
    q = torch.randn(2, 4, 32, generator=g).to(device)
    out = llmkern.paged_decode_attention(q, kc, vc, bt, sl, num_splits=num_splits)
    nan = torch.isnan(out).all(-1).cpu()
    assert torch.equal(nan, torch.tensor([[False] * 4, [True, True, False, False]]))
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[1, 2:]).all()
