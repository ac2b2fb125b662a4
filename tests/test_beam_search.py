"""llmkern.beam_search against transformers' generate(num_beams=..., do_sample=False), and its cache accounting.

A tiny random Llama (one layer, as in test_generate's shapes otherwise), two prompts of different lengths in one
batch. The property test drives the search bookkeeping with random logits instead of a model, on a real
PagedKVCache whose K slots hold token ids, so every step can check both the block accounting and the contents.
"""
import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

import llmkern  # noqa: E402
from llmkern import reference  # noqa: E402
from llmkern.beam_search import BeamSearch, run_searches  # noqa: E402

CONFIG = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, initializer_range=0.1,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
NUM_BEAMS, NEW_TOKENS = 3, 5


def _model(device):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval().to(device)


def _batch(device):
    """Prompts of lengths 4 and 7, left-padded to width 7."""
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    return ids.to(device), mask.to(device)


def _hf_beams(model, ids, mask, eos, early_stopping, length_penalty=1.0):
    """transformers' num_beams hypotheses per prompt (new tokens, cut after the first EOS id) and their scores."""
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, num_beams=NUM_BEAMS, num_return_sequences=NUM_BEAMS,
                             max_new_tokens=NEW_TOKENS, do_sample=False, early_stopping=early_stopping,
                             length_penalty=length_penalty, eos_token_id=eos, pad_token_id=0, output_scores=True,
                             return_dict_in_generate=True)
    rows = []
    for r in out.sequences[:, ids.shape[1]:].tolist():
        rows.append(r[:r.index(eos) + 1] if eos in r else r)
    return [rows[i:i + NUM_BEAMS] for i in range(0, len(rows), NUM_BEAMS)], out.sequences_scores.view(-1, NUM_BEAMS)


# EOS id 5 with its lm_head row scaled by 3, so that it is likely at some steps: then num_beams hypotheses of the
# second prompt finish before the limit and early stopping changes transformers' answer (asserted, so that the
# test keeps exercising the difference).
EOS = 5


def test_matches_transformers_with_eos_and_early_stopping(device):
    model = _model(device)
    with torch.no_grad():
        model.lm_head.weight[EOS] *= 3
    ids, mask = _batch(device)
    with_stop, without = (_hf_beams(model, ids, mask, EOS, es) for es in (True, False))
    assert with_stop[0] != without[0], "early stopping no longer matters here: pick another EOS setup"
    for early_stopping, (want, want_scores) in ((True, with_stop), (False, without)):
        got = llmkern.beam_search(model, ids, attention_mask=mask, num_beams=NUM_BEAMS, max_new_tokens=NEW_TOKENS,
                                  eos_token_id=EOS, early_stopping=early_stopping)
        assert got.sequences == want, f"early_stopping={early_stopping}"
        torch.testing.assert_close(got.scores, want_scores.cpu(), rtol=1e-5, atol=1e-5)


def test_matches_transformers_length_penalty_never(device):
    """No EOS at all (every hypothesis runs to the limit), a negative length penalty, early_stopping="never"."""
    model = _model(device)
    ids, mask = (t[1:] for t in _batch(device))          # one prompt: the batch case is covered above
    want, want_scores = _hf_beams(model, ids, mask, None, "never", length_penalty=-0.5)
    got = llmkern.beam_search(model, ids, attention_mask=mask, num_beams=NUM_BEAMS, max_new_tokens=NEW_TOKENS,
                              eos_token_id=[], early_stopping="never", length_penalty=-0.5)
    assert got.sequences == want
    torch.testing.assert_close(got.scores, want_scores.cpu(), rtol=1e-5, atol=1e-5)


def test_bad_input():
    model = _model("cpu")
    ids, mask = _batch("cpu")
    for kw, name in ((dict(num_beams=0), "num_beams"), (dict(num_beams=17), "num_beams"),
                     (dict(max_new_tokens=0), "max_new_tokens"), (dict(length_penalty=float("inf")), "length_penalty"),
                     (dict(early_stopping="sometimes"), "early_stopping"), (dict(block_size=0), "block_size"),
                     (dict(block_size=3), "block_size")):
        args = {**dict(num_beams=2, max_new_tokens=3, eos_token_id=2), **kw}
        with pytest.raises(ValueError, match=name):
            llmkern.beam_search(model, ids, attention_mask=mask, **args)
    for kw in (dict(num_beams=2.0), dict(block_size=16.0)):      # block_size 0 / 16.0: ZeroDivisionError / 'num_blocks'
        with pytest.raises(TypeError, match=next(iter(kw))):
            llmkern.beam_search(model, ids, attention_mask=mask, **{**dict(num_beams=2, max_new_tokens=3), **kw})
    for bad_id in (-1, CONFIG["vocab_size"]):     # an IndexError from the embedding (a device assert on CUDA) before
        with pytest.raises(ValueError, match="input_ids: prompt 1 holds token id"):
            llmkern.beam_search(model, [[5, 6], [7, bad_id]], num_beams=2, max_new_tokens=3)


# ------------------------------------------------------------------------------------------------- property test
@settings(max_examples=8, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2 ** 16), num_beams=st.integers(1, 3), prompt_lens=st.lists(st.integers(1, 9), min_size=1,
       max_size=2), new_tokens=st.integers(1, 6), early_stopping=st.sampled_from([True, False, "never"]),
       length_penalty=st.sampled_from([1.0, 0.0, -3.0, 60.0, 1e-30]))
def test_blocks_are_never_leaked(device, seed, num_beams, prompt_lens, new_tokens, early_stopping, length_penalty):
    """Random logits over a vocabulary of 5 (EOS = 0, so hypotheses end at random times), block size 2 (forks
    land mid-block, so copy-on-write happens), length penalties up to extremes (6 ** 60 overflows float32: the
    scores then degenerate to 0, as in transformers, and nothing else changes). After every step: the live
    sequences are exactly the running beams, each holds its own tokens in the cache, and the free blocks are
    exactly those no live sequence holds. At the end every block is free again."""
    vocab, bs = 5, 2
    num_blocks = sum(-(-n // bs) + num_beams * (-(-new_tokens // bs) + 1) for n in prompt_lens)
    cache = llmkern.PagedKVCache(1, num_blocks, bs, 1, 32, dtype=torch.float32, device=device)
    g = torch.Generator().manual_seed(seed)
    ids = itertools.count(len(prompt_lens))
    searches = [BeamSearch(cache, i, list(range(1, n + 1)), num_beams=num_beams, max_new_tokens=new_tokens,
                           length_penalty=length_penalty, early_stopping=early_stopping, eos={0}, new_ids=ids)
                for i, n in enumerate(prompt_lens)]

    def feed(seqs):
        for sid, tokens in seqs.items():           # append and write: K slot value = token id + 1
            n = cache.seq_len(sid) if sid in cache else 0
            slots = cache.append(sid, len(tokens) - n)
            k = torch.tensor(tokens[n:], dtype=torch.float32, device=device)[:, None, None].expand(-1, 1, 32) + 1
            reference.paged_kv_write(k, k, cache.k_cache(0), cache.v_cache(0), slots)
        _check(cache, seqs)
        return torch.randn(len(seqs), vocab, generator=g).to(device)

    k = max(2, 1 + 1) * num_beams
    run_searches(searches, feed, vocab, k)
    assert cache.seq_ids == [] and cache.num_free_blocks == num_blocks
    for s in searches:
        assert len(s.finished) == num_beams and all(1 <= len(b.tokens) <= new_tokens for b in s.finished)


def _check(cache, seqs):
    assert sorted(cache.seq_ids) == sorted(seqs)
    used = set()
    for sid, tokens in seqs.items():
        table = cache.block_tables([sid])[0]
        used.update(cache.block_table(sid))
        held = reference.paged_gather(cache.k_cache(0), table, len(tokens))[:, 0, 0]
        assert held.tolist() == [t + 1 for t in tokens], f"sequence {sid} holds other tokens"
    assert cache.num_free_blocks == cache.num_blocks - len(used)
