"""llmkern.generate: a decode loop on llmkern kernels, checked against transformers' own generate.

Tiny random-weight models built locally (no downloads), float32, head_dim 32 with GQA (4 query / 2 KV heads), three
prompts of different lengths in one batch. Greedy tokens must equal `model.generate(..., do_sample=False)` token for
token (up to each sequence's EOS, after which transformers pads).
"""
import importlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

import llmkern  # noqa: E402

# Same tiny shapes as tests/test_transformers_backend.py (see there for why these numbers).
COMMON = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, initializer_range=0.1,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
NEW_TOKENS = 6
WINDOW = 4  # Mistral's sliding window, far below prompt + generation (up to 15 tokens)


def _model(kind: str, device="cpu"):
    torch.manual_seed(0)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON))
    elif kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=WINDOW, **COMMON))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON))
    else:
        raise ValueError(kind)
    return model.eval().to(device)


def _batch(device="cpu"):
    """Prompts of lengths 5, 8 and 9, left-padded to width 9."""
    ids = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, :4], mask[0, :4] = 0, 0
    ids[1, :1], mask[1, :1] = 0, 0
    return ids.to(device), mask.to(device)


def _hf_greedy(model, ids, mask, eos=2):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                             eos_token_id=eos)
    rows = []
    for row in out[:, ids.shape[1]:].tolist():
        if eos is not None and eos in row:
            row = row[:row.index(eos) + 1]
        rows.append(row)
    return rows


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_greedy_matches_transformers(kind, device):
    model = _model(kind, device)
    ids, mask = _batch(device)
    want = _hf_greedy(model, ids, mask)
    got = llmkern.generate(model, ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=2)
    assert got == want
    if kind == "llama":  # the same prompts as a list of different-length id lists (once: the interpreter is slow)
        prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
        assert llmkern.generate(model, prompts, max_new_tokens=NEW_TOKENS, eos_token_id=2) == want


def test_stops_at_eos_per_sequence(device):
    model = _model("llama", device)
    ids, mask = _batch(device)
    free = llmkern.generate(model, ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    assert all(len(r) == NEW_TOKENS for r in free)
    eos = free[1][2]   # make row 1's third token the EOS: row 1 stops there, the others run to the limit
    got = llmkern.generate(model, ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=eos)
    assert got[1] == free[1][:free[1].index(eos) + 1]
    for r in (0, 2):
        want = free[r][:free[r].index(eos) + 1] if eos in free[r] else free[r]
        assert got[r] == want


def test_sampling_seeded_and_topk1_is_greedy(device):
    model = _model("llama", device)
    ids, mask = _batch(device)
    greedy = llmkern.generate(model, ids, attention_mask=mask, max_new_tokens=3, eos_token_id=[])
    # top_k=1 keeps only the argmax, whatever the temperature
    assert llmkern.generate(model, ids, attention_mask=mask, max_new_tokens=3, eos_token_id=[], temperature=1.0,
                            top_k=1, seed=3) == greedy
    a = llmkern.generate(model, ids, attention_mask=mask, max_new_tokens=3, eos_token_id=[], temperature=1.0,
                         top_p=0.9, seed=7)
    b = llmkern.generate(model, ids, attention_mask=mask, max_new_tokens=3, eos_token_id=[], temperature=1.0,
                         top_p=0.9, seed=7)
    assert a == b
    assert all(0 <= t < COMMON["vocab_size"] for row in a for t in row)


def test_bad_input(monkeypatch):
    model = _model("llama")
    ids, mask = _batch()
    # refused before the first forward: the step the caller can fix, not a failure deep inside the model
    monkeypatch.setattr(importlib.import_module("llmkern.generate").ModelRunner, "forward",
                        lambda *a, **k: pytest.fail("the model ran before the bad argument was refused"))
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(min_p=float("nan")), dict(top_k=-3)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            llmkern.generate(model, ids, attention_mask=mask, max_new_tokens=2, **bad)
    for prompt in ([5, model.config.vocab_size], [5, -3]):     # outside the embedding: no IndexError from it
        with pytest.raises(ValueError, match=r"input_ids.*\[0, vocab_size"):
            llmkern.generate(model, [[4], prompt], max_new_tokens=2)
    with pytest.raises(TypeError, match="model.float"):
        llmkern.generate(_model("llama").double(), ids, attention_mask=mask, max_new_tokens=2)
    # each used to fail in the cache set-up or the sampler with an error that did not name it (ZeroDivisionError,
    # "num_blocks", "Overflow when unpacking long long", "iteration over a 0-d tensor"), or (the float prompt) to be
    # truncated to int64 silently
    for bad, error in ((dict(block_size=0), ValueError), (dict(block_size=16.0), TypeError),
                       (dict(seed=2 ** 70), ValueError), (dict(eos_token_id=torch.tensor(2)), TypeError)):
        with pytest.raises(error, match=next(iter(bad))):
            llmkern.generate(model, ids, attention_mask=mask, max_new_tokens=2, **bad)
    with pytest.raises(TypeError, match=r"input_ids\[1\]"):
        llmkern.generate(model, [[5], torch.tensor([5.5, 6.0])], max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask must hold only 0"):   # a 2 was read as "token"
        llmkern.generate(model, ids, attention_mask=mask * 2, max_new_tokens=2)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="max_new_tokens"):
        llmkern.generate(model, ids, attention_mask=mask, max_new_tokens=0)
    with pytest.raises(ValueError, match="attention_mask"):
        llmkern.generate(model, ids, attention_mask=mask[:, :5], max_new_tokens=2)
    with pytest.raises(ValueError, match="no tokens"):
        llmkern.generate(model, [[5, 6], []], max_new_tokens=2)
    with pytest.raises(TypeError, match="input_ids"):
        llmkern.generate(model, "hello", max_new_tokens=2)
    torch.manual_seed(0)
    gemma = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(head_dim=32, **COMMON)).eval()
    with pytest.raises(ValueError, match="model"):
        llmkern.generate(gemma, ids, attention_mask=mask, max_new_tokens=2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_quantized_model_composes(device, dtype):
    """quantize_model's QuantLinear layers serve the loop's projections and MLP: greedy output equals transformers'
    generate on the same int4 model. float32 is the issue's case: a float32 model (the usual dtype on a CPU) used to
    be accepted by quantize_model and refused at its first forward."""
    model = _model("llama", device).to(dtype)
    llmkern.quantize_model(model, bits=4, group_size=64)   # group 64: hidden 128 holds two groups per row
    assert isinstance(model.model.layers[0].mlp.down_proj, llmkern.QuantLinear)
    ids, mask = _batch(device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                             eos_token_id=[])
    want = out[:, ids.shape[1]:].tolist()
    assert llmkern.generate(model, ids, attention_mask=mask, max_new_tokens=3, eos_token_id=[]) == want


# ------------------------------------------------------------------------------------- speculative decoding, penalties
# Smaller than the tests above (the interpreter runs every kernel of every draft step and verification pass): a
# one-layer target, a smaller random draft, two short prompts.
def _spec_models(device):
    torch.manual_seed(0)
    target = transformers.LlamaForCausalLM(transformers.LlamaConfig(**dict(COMMON, num_hidden_layers=1)))
    torch.manual_seed(5)
    draft_cfg = dict(COMMON, num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                     num_key_value_heads=1)
    draft = transformers.LlamaForCausalLM(transformers.LlamaConfig(**draft_cfg))
    return target.eval().to(device), draft.eval().to(device)


def _spec_batch(device):
    """Prompts of lengths 3 and 6, left-padded to width 6."""
    ids, mask = _batch(device)
    return ids[:2, 3:], mask[:2, 3:]


def test_speculative_greedy_equals_target_alone(device):
    """Greedy speculative decoding with a random smaller draft (mostly rejected) gives the target's greedy tokens,
    one sequence stopping at an EOS inside a round. The reference is transformers' greedy output, which
    test_greedy_matches_transformers shows plain llmkern.generate reproduces. (The all-accepted path, where the
    draft's cache lags by two tokens, is in test_repetition_penalty_matches_transformers.)"""
    model, draft = _spec_models(device)
    ids, mask = _spec_batch(device)
    free = _hf_greedy(model, ids, mask, eos=None)
    eos = free[1][3]
    want = [r[:r.index(eos) + 1] if eos in r else r for r in free]
    got, stats = llmkern.generate(model, ids, attention_mask=mask, max_new_tokens=NEW_TOKENS - 1, eos_token_id=eos,
                                  draft_model=draft, num_speculative_tokens=2, return_stats=True)
    assert got == [r[:NEW_TOKENS - 1] for r in want]
    assert stats.draft_tokens % 2 == 0 and 0 <= stats.accepted_tokens <= stats.draft_tokens
    assert stats.target_passes <= NEW_TOKENS - 1      # the prefill, then at least one token per pass


def test_repetition_penalty_matches_transformers(device):
    """transformers' greedy generate with repetition_penalty (prompt and new tokens counted) equals llmkern.generate
    with the same keyword, with and without a draft model (whose proposals are penalized position by position)."""
    model, _ = _spec_models(device)
    ids, mask = _spec_batch(device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                             eos_token_id=None, repetition_penalty=1.5)
    want = out[:, ids.shape[1]:].tolist()
    assert want != _hf_greedy(model, ids, mask, eos=None)   # the penalty changes the answer here
    assert llmkern.generate(model, ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=[],
                            repetition_penalty=1.5) == want
    # The target as its own draft: every proposal is accepted only if the draft's penalized distributions (each
    # position counting the proposals before it) equal the target's.
    got, stats = llmkern.generate(model, ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=[],
                                  repetition_penalty=1.5, draft_model=model, num_speculative_tokens=2,
                                  return_stats=True)
    assert got == want and stats.acceptance_rate == 1.0
    assert stats.target_passes == 1 + -(-(NEW_TOKENS - 1) // 3)   # the prefill, then 3 tokens per pass


def test_speculative_and_penalty_bad_input():
    model = _model("llama")
    ids, mask = _batch()
    for kw, err, name in ((dict(repetition_penalty=0.0), ValueError, "repetition_penalty"),
                          (dict(presence_penalty=float("nan")), ValueError, "presence_penalty"),
                          (dict(frequency_penalty=torch.ones(3)), TypeError, "frequency_penalty"),
                          (dict(logit_bias=torch.zeros(3, 128)), ValueError, "logit_bias"),
                          (dict(logit_bias=torch.zeros(127)), ValueError, "logit_bias"),
                          # every token banned: the sampler's -1 surfaced as a RuntimeError blaming the model
                          (dict(logit_bias=torch.full((128,), float("-inf"))), ValueError, "logit_bias bans every"),
                          (dict(draft_model=model, num_speculative_tokens=0), ValueError, "num_speculative_tokens"),
                          (dict(draft_model=model, num_speculative_tokens=16), ValueError, "num_speculative_tokens")):
        with pytest.raises(err, match=name):
            llmkern.generate(model, ids, attention_mask=mask, max_new_tokens=2, **kw)
    torch.manual_seed(0)
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(**dict(COMMON, vocab_size=64))).eval()
    with pytest.raises(ValueError, match="vocab"):
        llmkern.generate(model, ids, attention_mask=mask, max_new_tokens=2, draft_model=other)
