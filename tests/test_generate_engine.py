"""llmkern.generate's engine (issue 11): continuous batching with chunked prefill, and the fixed-shape decode step
that CUDA graphs capture.

Tiny random Llama configs (no downloads), float32: the token-equality checks compare runs of the same kernels
scheduled differently, so a token flips only on an exact near-tie of two logits. On CPU the padded decode step
runs eagerly (nothing to capture); on a GPU the same tests capture and replay it, and test_cuda_graph_replay_*
checks the graph against the eager step to the bit.
"""
import importlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

import llmkern  # noqa: E402
gen = importlib.import_module("llmkern.generate")
from llmkern.paged_attention import PagedAttentionPlan  # noqa: E402

NEW_TOKENS = 3
PROMPT_LENS = (2, 11, 7)   # chunks straddle the 4-token blocks used below


def _model(device, *, heads=4, kv_heads=2, layers=1):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32 * heads, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=32,
                                   vocab_size=64, max_position_embeddings=64, initializer_range=0.1)
    return transformers.LlamaForCausalLM(cfg).eval().to(device)


def _prompts(lens=PROMPT_LENS):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 64, (n,), generator=g).tolist() for n in lens]


def _record_steps(monkeypatch):
    """Each model step's (kind, new tokens per sequence): 'feed' for the eager packed step, 'decode' for the padded
    one."""
    steps = []
    feed, decode = gen.ModelRunner.feed, gen.ModelRunner.decode

    def rec_feed(self, seqs, all_logits=False):
        steps.append(("feed", [len(t) - (self.cache.seq_len(i) if i in self.cache else 0) for i, t in seqs.items()]))
        return feed(self, seqs, all_logits)

    def rec_decode(self, seq_ids, tokens, **kw):
        steps.append(("decode", [1] * len(seq_ids)))
        return decode(self, seq_ids, tokens, **kw)
    monkeypatch.setattr(gen.ModelRunner, "feed", rec_feed)
    monkeypatch.setattr(gen.ModelRunner, "decode", rec_decode)
    return steps


def test_continuous_batching_same_greedy_tokens_as_alone(device, monkeypatch):
    """Two seats and 5 tokens a step: prompts wait, are cut into chunks that share steps with decode tokens, and
    each sequence's greedy tokens equal those of running its prompt alone (whole prefill, then eager decode). The
    batched run's decode-only steps take the padded step (cuda_graph=True: captured on a GPU, eager on CPU)."""
    model = _model(device)
    prompts = _prompts()
    alone = [llmkern.generate(model, [p], max_new_tokens=NEW_TOKENS, eos_token_id=[], block_size=4,
                              cuda_graph=False)[0] for p in prompts]
    steps = _record_steps(monkeypatch)
    got = llmkern.generate(model, prompts, max_new_tokens=NEW_TOKENS, eos_token_id=[], block_size=4,
                           max_batch_size=2, max_tokens_per_step=5, cuda_graph=True)
    assert got == alone
    assert all(len(s) <= 2 and sum(s) <= 5 for _, s in steps)
    mixed = [s for kind, s in steps if kind == "feed" and 1 in s and max(s) > 1]
    assert mixed, f"no step mixed a prompt chunk with a decode token: {steps}"
    assert any(kind == "decode" for kind, _ in steps)


def test_padded_decode_step_matches_eager(device):
    """The fixed-shape decode step (static buffers, padded batches, sampling inside the step) gives the eager
    loop's tokens: greedy with a sequence stopping early, seeded sampling with top_p, and with a repetition
    penalty."""
    model = _model(device)
    prompts = _prompts()
    free = llmkern.generate(model, prompts, max_new_tokens=NEW_TOKENS, eos_token_id=[], cuda_graph=False)
    eos = free[0][0]     # sequence 0 stops at its first token: the decode batch is 2 (or 1), padded to 2 (or 1)
    want = [r[:r.index(eos) + 1] if eos in r else r for r in free]
    assert len(want[0]) == 1 and llmkern.generate(model, prompts, max_new_tokens=NEW_TOKENS, eos_token_id=eos,
                                                  cuda_graph=True) == want
    for kw in (dict(temperature=1.0, top_p=0.9, seed=11),     # drawn inside the step, batch 3 padded to 4
               dict(repetition_penalty=1.3)):                 # penalties: the step ends at the logits
        want = llmkern.generate(model, prompts, max_new_tokens=NEW_TOKENS, eos_token_id=[], cuda_graph=False, **kw)
        got = llmkern.generate(model, prompts, max_new_tokens=NEW_TOKENS, eos_token_id=[], cuda_graph=True, **kw)
        assert got == want, kw


def test_padded_batch_sizes():
    assert [gen.padded_batch_size(n) for n in (1, 2, 3, 5, 16, 17, 32, 33, 100)] == [1, 2, 4, 8, 16, 32, 32, 64,
                                                                                      128]


def test_decode_step_without_host_sync(device, no_host_sync, monkeypatch):
    """A whole decode step (tables, plan refresh, input copies, every layer with int4 QuantLinear projections,
    lm_head, sampling) reads no device value on the host. plan.update reads its tables on the host by design: the
    step gives it CPU tensors (checked here), so it cannot wait for the device, and it is exempt like a kernel
    launch."""
    model = _model(device)
    llmkern.quantize_model(model, bits=4, group_size=64)     # quant_matmul inside the step (and the graph)
    cache = gen._new_cache(model, [torch.zeros(9)], 8, 16)
    runner = gen.ModelRunner(model, cache, cuda_graph=True)
    runner.feed({0: _prompts()[1][:9], 1: _prompts()[0]})
    update = PagedAttentionPlan.update

    def host_update(plan, *tables):
        assert all(t is None or t.device.type == "cpu" for t in tables), "the step gave plan.update device tables"
        no_host_sync.paused += 1
        try:
            return update(plan, *tables)
        finally:
            no_host_sync.paused -= 1
    monkeypatch.setattr(PagedAttentionPlan, "update", host_update)
    params = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)
    runner.decode([0, 1], [3, 4], sampling_params=params)          # builds the step (and captures it on a GPU)
    with no_host_sync():
        logits, drawn = runner.decode([0, 1], [5, 6], sampling_params=params, seeds=torch.zeros(2, dtype=torch.int64))
    assert drawn.tolist() == logits.argmax(-1).tolist()
    # the same step eagerly, after rolling the cache back: the same logits
    for i in (0, 1):
        cache.truncate(i, cache.seq_len(i) - 1)
    eager = runner.feed({0: [0] * 10 + [5], 1: [0] * 3 + [6]})
    torch.testing.assert_close(logits, eager, rtol=1e-5, atol=1e-5)


def test_tables_sized_by_the_sequences_not_the_cache(device):
    """The runner's rotary tables and its decode steps' block-table width follow the longest sequence it has run
    (a power of two of blocks, at least 16), not the cache: a 4096-block cache used to get rotary tables for all
    its 16384 positions and a 4096-column plan per padded batch size (about 512 MB of tables at 65,536 blocks x 16
    tokens, head_dim 128, bf16). A sequence outgrowing them grows them by doubling; the padded step rebuilt for the
    wider tables gives the eager step's logits."""
    model = _model(device)
    cache = llmkern.PagedKVCache(1, 4096, 4, 2, 32, dtype=torch.float32, device=device)
    runner = gen.ModelRunner(model, cache, cuda_graph=True)
    prompt = _prompts((70,))[0]
    runner.feed({0: prompt[:11]})
    runner.decode([0], [prompt[11]])
    assert runner._rope[0].shape[0] == 16 * 4
    assert [s.plan.max_blocks_per_seq for s in runner._steps.values()] == [16]
    runner.feed({0: prompt[:69]})                           # 69 tokens: 18 blocks, the tables double
    logits, _ = runner.decode([0], [prompt[69]])
    assert runner._rope[0].shape[0] == 32 * 4
    assert [s.plan.max_blocks_per_seq for s in runner._steps.values()] == [32]
    cache.truncate(0, 69)
    torch.testing.assert_close(logits, runner.feed({0: prompt}), rtol=1e-5, atol=1e-5)


def test_bad_input():
    model = _model("cpu", layers=1)
    for kw, err, name in ((dict(max_batch_size=0), ValueError, "max_batch_size"),
                          (dict(max_batch_size=1.5), TypeError, "max_batch_size"),
                          (dict(max_tokens_per_step=0), ValueError, "max_tokens_per_step"),
                          (dict(max_tokens_per_step=True), TypeError, "max_tokens_per_step"),
                          (dict(cuda_graph="yes"), TypeError, "cuda_graph"),
                          (dict(draft_model=model, max_batch_size=1), ValueError, "draft_model")):
        with pytest.raises(err, match=name):
            llmkern.generate(model, [[1, 2], [3]], max_new_tokens=2, **kw)
    with pytest.raises(TypeError, match="cuda_graph"):
        gen.ModelRunner(model, gen._new_cache(model, [torch.zeros(2)], 2, 16), cuda_graph=1)
    # a cache that does not fit the model: refused by name at construction (it used to fail at the first step, with
    # "layer must be an int in [0, 1)", k's shape against the cache, or the plan's dtype list for an fp8 cache)
    two_layers = _model("cpu", layers=2)
    ok = dict(num_layers=2, num_blocks=4, block_size=16, num_kv_heads=2, head_dim=32, dtype=torch.float32)
    for change, err in ((dict(num_layers=1), ValueError), (dict(num_kv_heads=1), ValueError),
                        (dict(head_dim=64), ValueError), (dict(dtype=torch.float16), TypeError),
                        (dict(dtype=torch.float8_e5m2), TypeError)):
        with pytest.raises(err, match="cache"):
            gen.ModelRunner(two_layers, llmkern.PagedKVCache(**{**ok, **change}))
    # feed with nothing new to run: refused by name, the cache untouched (it was torch.cat's "expected a non-empty
    # list" for no sequences, an IndexError for a sequence whose tokens are all cached)
    runner = gen.ModelRunner(two_layers, llmkern.PagedKVCache(**ok))
    runner.feed({0: [1, 2]})
    for seqs in ({}, {0: [1, 2]}, {0: [1, 2, 3], 1: []}):
        with pytest.raises(ValueError, match="seqs"):
            runner.feed(seqs)
        assert runner.cache.seq_ids == [0] and runner.cache.seq_len(0) == 2
    # token ids outside the vocabulary (the sampler's -1 fed back, say): refused by name before the cache changes
    # (the embedding's IndexError after the slots were appended before; a device-side assert on CUDA)
    for call in (lambda: runner.feed({0: [1, 2, 64]}), lambda: runner.feed({0: [1, 2, 3], 1: [-1]}),
                 lambda: runner.decode([0], [-1]), lambda: runner.decode([0, 1], [5, 64])):
        with pytest.raises(ValueError, match="token id"):
            call()
        assert runner.cache.seq_ids == [0] and runner.cache.seq_len(0) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device (none here); the "
                    "padded step it captures runs on CPU in the tests above")
def test_cuda_graph_replay_equals_eager_to_the_bit():
    """On a GPU: the captured decode step, replayed for a new step, equals the same padded step run eagerly, bit for
    bit (logits and drawn tokens); capture happens once per padded size."""
    model = _model("cuda")
    prompts = _prompts()[:3]
    outs = {}
    for capture in (False, True):
        cache = gen._new_cache(model, [torch.zeros(12)] * 3, 8, 16)
        runner = gen.ModelRunner(model, cache, cuda_graph=True)
        runner.capture = capture
        runner.feed(dict(enumerate(prompts)))
        params = dict(temperature=1.0, top_k=0, top_p=0.9, min_p=0.0)
        for step in range(3):
            logits, drawn = runner.decode([0, 1, 2], [7 + step, 8, 9], sampling_params=params,
                                          seeds=torch.arange(3, dtype=torch.int64) + step)
            outs[capture, step] = (logits.clone(), drawn.clone())
        assert (len(runner._steps) == 1 and
                (list(runner._steps.values())[0].graph is not None) == capture)
    for step in range(3):
        assert torch.equal(outs[False, step][0], outs[True, step][0])
        assert torch.equal(outs[False, step][1], outs[True, step][1])
