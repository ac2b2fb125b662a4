"""llmkern as a Hugging Face transformers attention backend (attn_implementation="llmkern").

Tiny random-weight models built locally (no downloads), float32: hidden 128 with 4 query / 2 KV heads gives
head_dim 32 (the smallest head_dim llmkern supports) and GQA. Each test runs the same weights on transformers' own
attention ("sdpa", or "eager" for Gemma-2's softcap, which SDPA refuses) and on llmkern, and asserts identical
greedy tokens from model.generate and logits within float32 tolerance at every real (non-padding) position.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import llmkern  # noqa: E402
from llmkern.integrations import transformers as lkt  # noqa: E402
from transformers import masking_utils  # noqa: E402

# Tiny shapes (see the module docstring); initializer_range 0.1 (HF default 0.02) makes the random logits less flat
# so greedy decoding is not decided by float rounding; vocab 128 keeps the lm_head cheap.
COMMON = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, initializer_range=0.1,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
WINDOW = 4            # sliding window far shorter than prompt + generation (up to 15 tokens), so it matters
NEW_TOKENS = 6
# float32 logits: both paths accumulate in fp32; 2e-4 is ~100x the differences seen (~2e-6) and far below the
# logit gaps that decide greedy tokens
ATOL = 2e-4


def _build(kind: str, device="cpu", **overrides):
    torch.manual_seed(0)
    common = {**COMMON, **overrides}
    if kind == "llama":
        cfg, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    elif kind == "mistral":
        cfg, cls = transformers.MistralConfig(sliding_window=WINDOW, **common), \
            transformers.MistralForCausalLM
    elif kind == "qwen2":
        cfg, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    elif kind == "gemma2":
        # query_pre_attn_scalar 24 != head_dim: the module's scaling (24**-0.5) must be the one used; softcap 5
        # (Gemma-2 uses 50) so that capping changes scores of this size
        cfg = transformers.Gemma2Config(sliding_window=WINDOW, head_dim=32, query_pre_attn_scalar=24,
                                        attn_logit_softcapping=5.0, final_logit_softcapping=30.0, **common)
        cls = transformers.Gemma2ForCausalLM
    else:
        raise ValueError(kind)
    return cls(cfg).eval().to(device)


def _batch(pad: str = "left", device="cpu"):
    """Two prompts of lengths 5 and 9 in one batch of width 9 (pad id 0)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    if pad == "left":
        ids[0, :4], mask[0, :4] = 0, 0
    elif pad == "right":
        ids[0, 5:], mask[0, 5:] = 0, 0
    return ids.to(device), mask.to(device)


def _run(model, impl, ids, mask, **gen_kwargs):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                pad_token_id=0, **gen_kwargs)
        logits = model(ids, attention_mask=mask).logits
    return tokens[:, ids.shape[1]:], logits


@pytest.mark.parametrize("kind,ref,pad,gen_kwargs", [
    ("llama", "sdpa", "left", {}),             # left padding: the varlen path, prefill and decode
    ("qwen2", "sdpa", "none", {}),             # no padding: the zero-copy dense path
    ("mistral", "sdpa", "left", {}),           # sliding window + left padding
    ("gemma2", "eager", "left", {}),           # softcap, scaling != 1/sqrt(d), alternating sliding/full layers
    ("llama", "sdpa", "left", {"cache_implementation": "static"}),    # static cache: unwritten tail slots
    ("mistral", "sdpa", "left", {"cache_implementation": "static"}),  # static sliding-window layers
], ids=["llama-leftpad", "qwen2-nopad", "mistral-window", "gemma2-softcap", "llama-static", "mistral-static"])
def test_generate_matches_transformers(kind, ref, pad, gen_kwargs, device):
    model = _build(kind, device)
    ids, mask = _batch(pad, device)
    want_tokens, want_logits = _run(model, ref, ids, mask, **gen_kwargs)
    got_tokens, got_logits = _run(model, "llmkern", ids, mask, **gen_kwargs)
    assert got_tokens.tolist() == want_tokens.tolist()
    real = mask.bool()
    torch.testing.assert_close(got_logits[real], want_logits[real], atol=ATOL, rtol=0)


def _gpt_oss(device):
    """A tiny random gpt-oss: attention sinks on every layer, alternating sliding (window 4) and full attention, a
    4-expert MoE. The sinks drawn at several score units (the initializer's are ~0.1) so that they matter."""
    torch.manual_seed(0)
    cfg = transformers.GptOssConfig(**{**COMMON, "intermediate_size": 128}, head_dim=32, num_local_experts=4,
                                    num_experts_per_tok=2, sliding_window=WINDOW,
                                    layer_types=["sliding_attention", "full_attention"])
    model = transformers.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.randn(4) * 2)
    return model.to(device)


def test_gpt_oss_sinks_match_eager(device):
    """gpt-oss hands its sinks to the backend as s_aux: same greedy tokens and logits as transformers' eager path
    (softmax over [scores, sink], sink dropped), through the varlen path (left padding: prefill and decode) and the
    dense one (the unpadded prompt alone)."""
    model = _gpt_oss(device)
    ids, mask = _batch("left", device)
    want_tokens, want_logits = _run(model, "eager", ids, mask)
    got_tokens, got_logits = _run(model, "llmkern", ids, mask)
    assert got_tokens.tolist() == want_tokens.tolist()
    real = mask.bool()
    torch.testing.assert_close(got_logits[real], want_logits[real], atol=ATOL, rtol=0)
    with torch.no_grad():
        dense = model(ids[1:]).logits
    torch.testing.assert_close(dense, want_logits[1:], atol=ATOL, rtol=0)
    # the sinks change the answer by far more than the tolerance, so a backend that dropped them would fail above
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.fill_(float("-inf"))   # no sink
        no_sinks = model(ids, attention_mask=mask).logits
    assert (no_sinks - got_logits)[real].abs().max() > 100 * ATOL


def test_sliding_window_is_applied(device):
    """The window changes the answer here, so the test above can tell a window bug from no window at all."""
    ids, mask = _batch("left", device)
    windowed = _build("mistral", device)
    full = _build("mistral", device)
    full.config.sliding_window = None
    windowed.set_attn_implementation("llmkern")
    full.set_attn_implementation("llmkern")
    with torch.no_grad():
        lw = windowed(ids, attention_mask=mask).logits
        lf = full(ids, attention_mask=mask).logits
    real = mask.bool()
    # positions < WINDOW see the same keys either way; later ones must differ by far more than ATOL
    assert (lw[:, :WINDOW] - lf[:, :WINDOW])[real[:, :WINDOW]].abs().max() < ATOL
    assert (lw - lf)[real].abs().max() > 100 * ATOL


def test_right_padding_forward(device):
    """Right padding (a scoring batch): real positions match SDPA, padded query rows are never used."""
    model = _build("llama", device)
    ids, mask = _batch("right", device)
    logits = {}
    for impl in ("sdpa", "llmkern"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            logits[impl] = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(logits["llmkern"][real], logits["sdpa"][real], atol=ATOL, rtol=0)


def test_packed_sequences_use_the_fallback(device):
    """Packed sequences (position_ids restart, no mask) are not causal+padding: the dense fallback keeps them
    exact instead of attending across sequence boundaries."""
    model = _build("llama", device)
    ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(2)).to(device)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]], device=device)
    logits = {}
    for impl in ("sdpa", "llmkern"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            logits[impl] = model(ids, position_ids=pos).logits
    torch.testing.assert_close(logits["llmkern"], logits["sdpa"], atol=ATOL, rtol=0)


def test_mask_patterns_recognized():
    assert lkt._mask_pattern(masking_utils.causal_mask_function) == ("causal", None)
    assert lkt._mask_pattern(masking_utils.sliding_window_causal_mask_function(7)) == ("causal", 7)
    assert lkt._mask_pattern(masking_utils.bidirectional_mask_function) == ("bidirectional", None)
    chunked = masking_utils.chunked_causal_mask_function(3, torch.zeros(1, dtype=torch.long))
    assert lkt._mask_pattern(chunked) is None
    overlay = masking_utils.or_masks(masking_utils.causal_mask_function, masking_utils.bidirectional_mask_function)
    assert lkt._mask_pattern(overlay) is None


def test_mask_function_outputs():
    # no padding, queries at the end of the keys: nothing to pass
    assert lkt.llmkern_mask(2, 3, 8, q_offset=5, kv_offset=0) is None
    # a static cache of 16 slots, 8 written: the mask stops at the last query
    pad = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8], dtype=torch.bool)
    m = lkt.llmkern_mask(2, 1, 16, q_offset=7, kv_offset=0, attention_mask=pad)
    assert m.shape == (2, 8) and m.tolist() == pad.tolist()
    # a sliding cache layer whose first kept slot is cache position 3
    m = lkt.llmkern_mask(2, 1, 5, q_offset=7, kv_offset=3, attention_mask=pad,
                         mask_function=masking_utils.sliding_window_causal_mask_function(5))
    assert m is None  # every kept slot is real
    # an unsupported pattern gets transformers' dense 4D mask
    chunked = masking_utils.chunked_causal_mask_function(3, torch.zeros(2, dtype=torch.long))
    m = lkt.llmkern_mask(2, 8, 8, mask_function=chunked, attention_mask=pad)
    assert m.shape == (2, 1, 8, 8) and m.dtype == torch.bool


def test_registered():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    assert AttentionInterface._global_mapping["llmkern"] is lkt.llmkern_attention_forward
    assert AttentionMaskInterface._global_mapping["llmkern"] is lkt.llmkern_mask


def test_from_pretrained_switch(tmp_path):
    """The one-line switch at load time, from a local checkpoint (no download)."""
    _build("llama").save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="llmkern")
    assert model.config._attn_implementation == "llmkern"
    ids, mask = _batch("left")
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=0)


def test_bad_input():
    model = _build("llama")
    model.set_attn_implementation("llmkern")
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 3, 32)
    k = torch.randn(1, 2, 3, 32)
    with pytest.raises(ValueError, match="dropout"):
        lkt.llmkern_attention_forward(attn, q, k, k, None, dropout=0.1, scaling=0.2)
    with pytest.raises(ValueError, match="head_dim"):
        lkt.llmkern_attention_forward(attn, q, k, k[..., :16], None, scaling=0.2)
    with pytest.raises(ValueError, match="sliding_window"):
        lkt.llmkern_attention_forward(attn, q, k, k, None, scaling=0.2, sliding_window=0)


@pytest.mark.parametrize("overrides,dtype", [({"hidden_size": 64}, torch.float32), ({}, torch.float64)])
def test_layers_the_kernels_cannot_run_fall_back(overrides, dtype, caplog):
    """head_dim 16 and float64 are outside what the kernels run. Choosing attn_implementation="llmkern" is the step
    the user could change, but transformers checks nothing there, so those layers take the PyTorch fallback (with a
    warning) instead of failing at the first forward; the logits of the real tokens are SDPA's."""
    model = _build("llama", **overrides).to(dtype)
    ids, mask = _batch("left")

    def logits(impl):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            return model(ids, attention_mask=mask).logits
    want = logits("sdpa")
    lkt._warned.clear()
    with caplog.at_level("WARNING"):
        got = logits("llmkern")
    assert "outside what the kernels run" in caplog.text
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=0)


def test_continuous_batching_is_refused_by_transformers():
    """Documents why "llmkern" cannot serve generate_batch (see lkt.CONTINUOUS_BATCHING): transformers itself
    rejects every implementation name but sdpa, paged|eager and flash ones. If a future transformers accepts it,
    this test fails and the integration should be extended."""
    model = _build("llama")
    model.set_attn_implementation("llmkern")
    gen = transformers.GenerationConfig(max_new_tokens=2, do_sample=False, eos_token_id=2, pad_token_id=0)
    with pytest.raises(ValueError, match="not supported for continuous batching"):
        model.generate_batch([[5, 6, 7]], generation_config=gen)


def test_alibi_models_cannot_use_llmkern():
    """Documents the module docstring's ALiBi note (it used to say choosing "llmkern" leaves BLOOM, MPT and Falcon
    as they were, but loading them with it fails): their attention never calls AttentionInterface, so
    set_attn_implementation("llmkern") is refused and the logits stay eager's, and a model built with
    attn_implementation="llmkern" fails in transformers' own code (BLOOM: llmkern's 2D mask where it wants 4D;
    Falcon: its class table has no "llmkern"). If a future transformers routes them through the interface, this
    fails and the note (and the ALiBi pass-through) should be revisited."""
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    bloom = dict(vocab_size=64, hidden_size=64, n_layer=1, n_head=4, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.BloomForCausalLM(transformers.BloomConfig(**bloom)).eval()
    with torch.no_grad():
        eager = model(ids).logits
        model.set_attn_implementation("llmkern")
        assert model.config._attn_implementation != "llmkern"
        assert torch.equal(model(ids).logits, eager)
    built = transformers.BloomForCausalLM._from_config(transformers.BloomConfig(**bloom), attn_implementation="llmkern")
    with torch.no_grad(), pytest.raises(RuntimeError):
        built(ids, attention_mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]))
    falcon = transformers.FalconConfig(vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                       alibi=True, new_decoder_architecture=False, multi_query=True)
    with pytest.raises(KeyError, match="llmkern"):
        transformers.FalconForCausalLM._from_config(falcon, attn_implementation="llmkern")


def _sdpa_reference(q, k, v, keep, scale):
    """Plain SDPA with an explicit (batch, 1, sq, sk) boolean mask, K/V repeated for GQA; float64."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1).double(), v.repeat_interleave(g, 1).double()
    out = torch.nn.functional.scaled_dot_product_attention(q.double(), k, v, attn_mask=keep, scale=scale)
    return out.transpose(1, 2)


@pytest.mark.parametrize("window", [None, 2])
def test_padding_patterns_direct(window, device):
    """The attention function on hand-made masks: an all-padding row, interior padding (varlen, no window), and
    interior padding under a sliding window (cache-position distances: the fallback). Real query rows must match
    SDPA with transformers' mask semantics; padding query rows are zeros."""
    class Attn(torch.nn.Module):
        is_causal = True
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(3, 4, 5, 32, generator=g), torch.randn(3, 2, 5, 32, generator=g), \
        torch.randn(3, 2, 5, 32, generator=g)
    pad = torch.tensor([[0, 0, 0, 0, 0], [1, 0, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool)
    q, k, v, pad = q.to(device), k.to(device), v.to(device), pad.to(device)
    out, _ = lkt.llmkern_attention_forward(Attn(), q, k, v, pad, scaling=0.3, sliding_window=window)
    i = torch.arange(5, device=device)[:, None]
    j = torch.arange(5, device=device)[None, :]
    keep = (j <= i) & pad[:, None, None, :]
    if window is not None:
        keep &= j > i - window          # masking_utils.sliding_window_overlay
    real = pad[:, :, None, None].expand_as(out)
    ref = _sdpa_reference(q, k, v, keep, 0.3)
    torch.testing.assert_close(out[real].double(), ref[real], atol=1e-5, rtol=0)
    assert out[~real].abs().max() == 0
