"""PagedKVCache: the block manager (append, fork with copy-on-write, free, atomic refusal) and its use by the kernels.

The property test drives random append/fork/free sequences against a simple model, a dict from sequence id to the
list of token values it should hold, and after every step reads each sequence back through its block table.
"""
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import llmkern
from llmkern import CacheFullError, PagedKVCache
from llmkern import reference as ref

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _snapshot(cache: PagedKVCache):
    ids = cache.seq_ids
    return (cache.num_free_blocks, {s: cache.block_table(s) for s in ids}, {s: cache.seq_len(s) for s in ids},
            cache._k.clone(), cache._v.clone())


def _assert_same(a, b):
    assert a[0] == b[0] and a[1] == b[1] and a[2] == b[2]
    assert torch.equal(a[3], b[3]) and torch.equal(a[4], b[4])


def test_append_slots_tables_and_lens(device):
    cache = PagedKVCache(2, 8, 16, 2, 32, dtype=torch.float16, device=device)
    assert cache.num_free_blocks == 8
    s0 = cache.append("a", 20)
    assert s0.dtype == torch.int64 and s0.shape == (20,) and s0.device.type == torch.device(device).type
    s1 = cache.append("a", 13)
    table = cache.block_table("a")
    assert len(table) == 3 and cache.num_free_blocks == 5
    expected = [table[p // 16] * 16 + p % 16 for p in range(33)]
    assert s0.tolist() + s1.tolist() == expected
    assert cache.append("b", 0).numel() == 0 and cache.seq_len("b") == 0  # an empty new sequence
    bt, sl = cache.block_tables(["b", "a"]), cache.seq_lens(["b", "a"])
    assert bt.dtype == torch.int32 and bt.shape == (2, 3) and bt[1].tolist() == table
    assert sl.dtype == torch.int32 and sl.tolist() == [0, 33]
    assert cache.k_cache(1).shape == (8, 16, 2, 32) and cache.v_cache(0).dtype == torch.float16


def _write_layers(cache, seq, n, g, device):
    """Append n tokens to seq and write random K/V for them in every layer; returns the per-layer (k, v)."""
    slots = cache.append(seq, n)
    kvs = []
    for layer in range(cache.num_layers):
        k = torch.randn(n, cache.num_kv_heads, cache.head_dim, generator=g).to(cache.dtype).to(device)
        v = torch.randn(n, cache.num_kv_heads, cache.head_dim, generator=g).to(cache.dtype).to(device)
        llmkern.paged_kv_write(k, v, cache.k_cache(layer), cache.v_cache(layer), slots)
        kvs.append((k, v))
    return kvs


def _attend(cache, seqs, q):
    bt, sl = cache.block_tables(seqs), cache.seq_lens(seqs)
    return [llmkern.paged_decode_attention(q, cache.k_cache(layer), cache.v_cache(layer), bt, sl)
            for layer in range(cache.num_layers)]


@pytest.mark.parametrize("appender", ["child", "parent"])
def test_fork_then_append_copy_on_write_every_layer(device, appender):
    """Fork a sequence whose last block is partly filled, then append to one side: the other side's attention is
    unchanged in every layer, and the appender's prefix (copied block included) still reads the shared tokens."""
    g = torch.Generator().manual_seed(0)
    cache = PagedKVCache(3, 10, 16, 2, 32, dtype=torch.float32, device=device)
    _write_layers(cache, "p", 20, g, device)   # 1 full block + 4 tokens in a second block
    q = torch.randn(1, 4, 32, generator=g).to(device)
    before = _attend(cache, ["p"], q)
    cache.fork("p", "c")
    assert cache.block_table("c") == cache.block_table("p") and cache.num_free_blocks == 8
    appender, other = ("c", "p") if appender == "child" else ("p", "c")
    new_kv = _write_layers(cache, appender, 3, g, device)
    assert cache.block_table(appender)[0] == cache.block_table(other)[0]    # the full block stays shared
    assert cache.block_table(appender)[1] != cache.block_table(other)[1]    # the partly filled one was copied
    assert cache.num_free_blocks == 7
    after = _attend(cache, [other], q)
    for layer in range(3):
        assert torch.equal(before[layer], after[layer]), f"layer {layer} changed for the non-appending sequence"
        # The appender holds the 20 shared tokens then its 3 new ones, in this layer.
        mine = ref.paged_gather(cache.k_cache(layer), cache.block_tables([appender])[0], 23)
        theirs = ref.paged_gather(cache.k_cache(layer), cache.block_tables([other])[0], 20)
        assert torch.equal(mine[:20], theirs) and torch.equal(mine[20:], new_kv[layer][0])
    # The other side appends too: its block is no longer shared, so it writes in place without a copy.
    table = cache.block_table(other)
    _write_layers(cache, other, 2, g, device)
    assert cache.block_table(other) == table and cache.num_free_blocks == 7


def test_fork_at_block_boundary_needs_no_copy(device):
    cache = PagedKVCache(1, 6, 16, 1, 32, dtype=torch.float16, device=device)
    cache.append("p", 32)
    cache.fork("p", "c")
    cache.append("c", 1)
    assert cache.block_table("c")[:2] == cache.block_table("p") and cache.num_free_blocks == 3


def test_refused_append_changes_nothing(device):
    g = torch.Generator().manual_seed(1)
    cache = PagedKVCache(2, 4, 16, 1, 32, dtype=torch.float16, device=device)
    _write_layers(cache, "a", 20, g, device)   # 2 blocks
    cache.fork("a", "b")
    _write_layers(cache, "c", 16, g, device)   # 1 block: 1 free left
    snap = _snapshot(cache)
    with pytest.raises(CacheFullError):
        cache.append("c", 17)                   # needs 2 new blocks
    _assert_same(snap, _snapshot(cache))
    with pytest.raises(CacheFullError):
        cache.append("new", 33)                 # a new sequence that does not fit is not created either
    assert "new" not in cache
    _assert_same(snap, _snapshot(cache))
    with pytest.raises(CacheFullError):
        cache.append("a", 13)                   # the copy-on-write block plus one new block: 2 > 1
    _assert_same(snap, _snapshot(cache))
    cache.append("a", 12)                       # the copy alone fits (4 + 12 = 16 tokens in the copied block)
    assert cache.num_free_blocks == 0


def test_free_then_reuse(device):
    cache = PagedKVCache(1, 4, 16, 1, 32, dtype=torch.float16, device=device)
    cache.append("a", 40)
    cache.fork("a", "b")
    cache.free("a")
    assert cache.num_free_blocks == 1           # b still holds all three blocks
    with pytest.raises(ValueError, match="unknown"):
        cache.seq_len("a")
    cache.free("b")
    assert cache.num_free_blocks == 4
    cache.append("c", 64)                       # the whole cache, reused
    assert sorted(cache.block_table("c")) == [0, 1, 2, 3] and cache.num_free_blocks == 0
    with pytest.raises(CacheFullError):
        cache.append("c", 1)


def test_bad_arguments(device):
    cache = PagedKVCache(1, 4, 16, 1, 32, dtype=torch.float16, device=device)
    cache.append("a", 3)
    with pytest.raises(ValueError, match="n must be >= 0"):
        cache.append("a", -1)
    with pytest.raises(TypeError, match="n must be an int"):
        cache.append("a", 2.0)
    with pytest.raises(ValueError, match="unknown"):
        cache.fork("zz", "b")
    with pytest.raises(ValueError, match="already exists"):
        cache.fork("a", "a")
    with pytest.raises(ValueError, match="unknown"):
        cache.free("zz")
    with pytest.raises(ValueError, match="unknown"):
        cache.block_tables(["a", "zz"])
    with pytest.raises(ValueError, match="duplicates"):
        cache.seq_lens(["a", "a"])
    with pytest.raises(TypeError, match="hashable"):
        cache.append(["a"], 1)
    with pytest.raises(ValueError, match="layer"):
        cache.k_cache(1)
    with pytest.raises(ValueError, match="block_size"):
        PagedKVCache(1, 4, 12, 1, 32)
    with pytest.raises(ValueError, match="head_dim"):
        PagedKVCache(1, 4, 16, 1, 20)
    with pytest.raises(ValueError, match="num_blocks"):
        PagedKVCache(1, 0, 16, 1, 32)
    with pytest.raises(TypeError, match="dtype"):
        PagedKVCache(1, 4, 16, 1, 32, dtype=torch.int8)
    assert cache.seq_len("a") == 3 and cache.num_free_blocks == 3


def test_truncate_rolls_back_and_frees(device):
    """truncate keeps a prefix: blocks past it are released (freed unless shared), a shared partly filled block at
    the new end is copied on the next append, and the other sequence keeps its tokens."""
    g = torch.Generator().manual_seed(2)
    cache = PagedKVCache(2, 8, 16, 1, 32, dtype=torch.float32, device=device)
    _write_layers(cache, "a", 40, g, device)                      # 3 blocks
    cache.truncate("a", 33)
    assert cache.seq_len("a") == 33 and len(cache.block_table("a")) == 3 and cache.num_free_blocks == 5
    cache.truncate("a", 32)
    assert len(cache.block_table("a")) == 2 and cache.num_free_blocks == 6
    q = torch.randn(1, 2, 32, generator=g).to(device)
    cache.fork("a", "b")
    before = _attend(cache, ["a"], q)
    cache.truncate("b", 20)                                        # into the shared second block
    assert cache.block_table("b") == cache.block_table("a") and cache.num_free_blocks == 6
    new_kv = _write_layers(cache, "b", 5, g, device)               # copy-on-write of the shared block
    assert cache.block_table("b")[1] != cache.block_table("a")[1] and cache.num_free_blocks == 5
    after = _attend(cache, ["a"], q)
    for layer in range(2):
        assert torch.equal(before[layer], after[layer])
        mine = ref.paged_gather(cache.k_cache(layer), cache.block_tables(["b"])[0], 25)
        theirs = ref.paged_gather(cache.k_cache(layer), cache.block_tables(["a"])[0], 20)
        assert torch.equal(mine[:20], theirs) and torch.equal(mine[20:], new_kv[layer][0])
    cache.truncate("b", 0)
    assert cache.seq_len("b") == 0 and cache.block_table("b") == [] and cache.num_free_blocks == 6
    with pytest.raises(ValueError, match="num_tokens"):
        cache.truncate("a", 33)
    with pytest.raises(ValueError, match="num_tokens"):
        cache.truncate("a", -1)
    with pytest.raises(TypeError, match="num_tokens"):
        cache.truncate("a", 3.0)
    with pytest.raises(ValueError, match="unknown"):
        cache.truncate("zz", 0)
    assert cache.seq_len("a") == 32 and cache.num_free_blocks == 6


# ------------------------------------------------------------------------------------------------- property test
_IDS = ["s0", "s1", "s2"]
# Appends and forks weighted above frees, so that forked sequences live long enough to both append.
_ops = st.tuples(st.sampled_from(["append", "append", "append", "fork", "fork", "free", "truncate"]),
                 st.sampled_from(_IDS), st.sampled_from(_IDS), st.integers(0, 6))


@settings(max_examples=50, deadline=None, database=None,  # no .hypothesis/ folder in the repository
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_ops, min_size=1, max_size=30))
# Both sides of a fork append into their shared, partly filled block: the case copy-on-write exists for.
@example(ops=[("append", "s0", "s0", 5), ("fork", "s0", "s1", 0), ("append", "s0", "s0", 2),
              ("append", "s1", "s1", 2)])
# A rollback into a shared block, then an append there.
@example(ops=[("append", "s0", "s0", 6), ("fork", "s0", "s1", 0), ("truncate", "s1", "s1", 3),
              ("append", "s1", "s1", 2), ("truncate", "s0", "s0", 6)])
def test_random_append_fork_free_matches_model(device, ops):
    """Random programs against a model of token contents. Token values are unique, written into every layer with a
    per-layer offset; after each step every sequence must read back exactly its model tokens, in every layer, and
    the free blocks must be exactly those no sequence references. truncate rolls back n tokens."""
    cache = PagedKVCache(_LAYERS, 12, _BS, 1, 32, dtype=torch.float32, device=device)
    model: dict[str, list[int]] = {}
    counter = [1]
    for op, a, b, n in ops:
        if op == "append":
            table, length = (cache.block_table(a), cache.seq_len(a)) if a in model else ([], 0)
            shared = {blk for s in model if s != a for blk in cache.block_table(s)}
            cow = n > 0 and length % _BS != 0 and table[-1] in shared
            needed = -(-(length + n) // _BS) - len(table) + int(cow)
            if needed > cache.num_free_blocks:
                snap = _snapshot(cache)
                with pytest.raises(CacheFullError):
                    cache.append(a, n)
                _assert_same(snap, _snapshot(cache))
                continue
            _append_values(cache, model, a, n, counter, device)
        elif op == "truncate":
            if a not in model or n > len(model[a]):
                with pytest.raises(ValueError):
                    cache.truncate(a, len(model.get(a, [])) - n)
                continue
            cache.truncate(a, len(model[a]) - n)
            model[a] = model[a][:len(model[a]) - n]
        elif op == "fork":
            if a not in model or b in model:
                with pytest.raises(ValueError):
                    cache.fork(a, b)
                continue
            cache.fork(a, b)
            model[b] = list(model[a])
        else:
            if a not in model:
                with pytest.raises(ValueError):
                    cache.free(a)
                continue
            cache.free(a)
            del model[a]
        _check_against_model(cache, model, device)


_BS, _LAYERS = 4, 2


def _append_values(cache, model, seq, n, counter, device):
    """Append n slots to seq and write fresh token values into them, in every layer (K = value + 1000 * layer,
    V = -K)."""
    slots = cache.append(seq, n)
    values = list(range(counter[0], counter[0] + n))
    counter[0] += n
    for layer in range(_LAYERS):
        kv = torch.tensor(values, dtype=torch.float32, device=device) + 1000 * layer
        kv = kv[:, None, None].expand(n, 1, 32)
        ref.paged_kv_write(kv, -kv, cache.k_cache(layer), cache.v_cache(layer), slots)
    model[seq] = model.get(seq, []) + values


def _check_against_model(cache, model, device):
    """Every sequence reads back exactly its model tokens in every layer; the free blocks are exactly those no
    sequence references."""
    assert sorted(cache.seq_ids) == sorted(model)
    used = set()
    for s, tokens in model.items():
        table = cache.block_table(s)
        assert cache.seq_len(s) == len(tokens) and len(table) == -(-len(tokens) // _BS)
        used.update(table)
        bt = cache.block_tables([s])[0]
        for layer in range(_LAYERS):
            k = ref.paged_gather(cache.k_cache(layer), bt, len(tokens))[:, 0, 0]
            v = ref.paged_gather(cache.v_cache(layer), bt, len(tokens))[:, 0, 0]
            want = torch.tensor(tokens, dtype=torch.float32, device=device) + 1000 * layer
            assert torch.equal(k, want) and torch.equal(v, -want), f"{s} layer {layer}"
    assert cache.num_free_blocks == cache.num_blocks - len(used)


@settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.integers(1, 9), cycles=st.lists(st.tuples(st.integers(0, 2), st.integers(1, 5), st.integers(0, 5)),
                                                 min_size=1, max_size=25))
def test_speculative_cycles_keep_blocks_exact(device, prompt, cycles):
    """Speculative decoding's cache use: three sequences forked from one prompt; each cycle appends k + 1 tokens to
    one of them (the verification pass) and rolls back the k - accepted rejected ones. Contents and block
    accounting stay exact after every cycle, and freeing everything returns every block."""
    cache = PagedKVCache(_LAYERS, 3 * 12, _BS, 1, 32, dtype=torch.float32, device=device)
    model: dict[str, list[int]] = {}
    counter = [1]
    _append_values(cache, model, "s0", prompt, counter, device)
    for s in ("s1", "s2"):
        cache.fork("s0", s)
        model[s] = list(model["s0"])
    for which, k, accepted in cycles:
        seq = _IDS[which]
        if len(model[seq]) + k + 1 > 30:           # keep within the pool (each sequence <= 30 tokens)
            continue
        _append_values(cache, model, seq, k + 1, counter, device)
        rejected = k - min(accepted, k)
        cache.truncate(seq, len(model[seq]) - rejected)
        model[seq] = model[seq][:len(model[seq]) - rejected]
        _check_against_model(cache, model, device)
    for s in _IDS:
        cache.free(s)
    assert cache.num_free_blocks == cache.num_blocks
