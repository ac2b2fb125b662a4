"""llmkern.patch_model on tiny random-weight Hugging Face models (built locally, no downloads).

Patched and unpatched models must give the same logits (float32: within a few float32 ulps of the logits' scale;
bf16: FlashAttention's rule at model level, against the float32 model) and the same greedy tokens, with a
left-padded batch; and the llmkern kernels must actually have run.
"""
import pytest
import torch

import llmkern
from llmkern import layers

transformers = pytest.importorskip("transformers")

VOCAB = 128


def _config(family: str):
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=6)   # shorter than the prompts: it matters
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    if family == "gemma2":
        return transformers.Gemma2Config(**common, head_dim=16, sliding_window=6, query_pre_attn_scalar=16)
    raise ValueError(family)


_MODEL_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "gemma2": "Gemma2ForCausalLM"}


def _model(family: str, dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    model = getattr(transformers, _MODEL_CLASSES[family])(_config(family)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # the init sets norm weights to 1 (0 for Gemma): make them matter
                p.copy_(torch.randn_like(p) * 0.3 + (0.0 if family == "gemma2" else 1.0))
    return model.to(device=device, dtype=dtype)


def _inputs(device):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 9), generator=g).to(device)
    mask = torch.ones_like(ids)
    ids[0, :3] = 0                 # left padding of the first sequence
    mask[0, :3] = 0
    return ids, mask


class _Spy:
    """Counts calls to the llmkern functions that patch_model routes to (by default, the layer functions)."""
    def __init__(self, monkeypatch, module=layers, names=("rms_norm", "add_rms_norm", "apply_rope")):
        self.calls = {name: 0 for name in names}
        for name in self.calls:
            fn = getattr(module, name)
            monkeypatch.setattr(module, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def counted(*a, **k):
            self.calls[name] += 1
            return fn(*a, **k)
        return counted


def _run(model, ids, mask, new_tokens=3):
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                pad_token_id=0)
    return logits, tokens


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma2"])
def test_patched_model_matches(device, family, monkeypatch):
    model = _model(family, device=device)
    ids, mask = _inputs(device)
    ref_logits, ref_tokens = _run(model, ids, mask)

    spy = _Spy(monkeypatch)
    assert llmkern.patch_model(model) is model
    logits, tokens = _run(model, ids, mask)

    layers_n = model.config.num_hidden_layers
    assert spy.calls["apply_rope"] > 0
    assert spy.calls["rms_norm"] > 0
    if family == "gemma2":
        assert spy.calls["add_rms_norm"] == 0                        # Gemma-2 keeps its own layer forward
    else:
        assert spy.calls["add_rms_norm"] >= layers_n                 # one fused add per layer per forward
        assert type(model.model.layers[0]).__name__.startswith("Llmkern")
    # float32: differences come from summation order only; a few ulps of the largest logit.
    scale = float(ref_logits.abs().max())
    real = mask.bool()                                               # padded positions' logits are meaningless
    assert float((logits - ref_logits)[real].abs().max()) <= 1e-5 * scale
    assert torch.equal(tokens, ref_tokens)


def test_patch_bf16_llama_within_fa_rule(device):
    """bf16: the patched model's error against the float32 model is at most twice the unpatched bf16 model's."""
    ids, mask = _inputs(device)
    with torch.no_grad():
        ref32 = _model("llama", device=device)(input_ids=ids, attention_mask=mask).logits
        plain = _model("llama", torch.bfloat16, device)(input_ids=ids, attention_mask=mask).logits
        patched_model = llmkern.patch_model(_model("llama", torch.bfloat16, device))
        patched = patched_model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    err = float((patched.float() - ref32)[real].abs().max())
    base = float((plain.float() - ref32)[real].abs().max())
    assert err <= 2 * base + 1e-3 * float(ref32.abs().max()), (err, base)


def test_unpatched_models_untouched_and_idempotent(device, monkeypatch):
    patched = llmkern.patch_model(_model("llama", device=device))
    other = _model("llama", device=device)                          # same family, never patched
    ids, mask = _inputs(device)
    spy = _Spy(monkeypatch)
    with torch.no_grad():
        expect = other(input_ids=ids, attention_mask=mask).logits
    assert spy.calls == {"rms_norm": 0, "add_rms_norm": 0, "apply_rope": 0}
    assert type(other.model.norm).__name__ == "LlamaRMSNorm"
    # Patching twice changes nothing; the subclasses do not stack.
    with torch.no_grad():
        once = patched(input_ids=ids, attention_mask=mask).logits
        llmkern.patch_model(patched)
        twice = patched(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(once, twice)
    assert type(patched.model.layers[0].self_attn).__mro__[1].__name__ == "LlamaAttention"   # not stacked
    assert float((once - expect)[mask.bool()].abs().max()) <= 1e-5 * float(expect.abs().max())


def test_patch_options_and_errors(device, monkeypatch):
    model = _model("qwen2", device=device)
    llmkern.patch_model(model, rope=False, fuse_residual=False)
    spy = _Spy(monkeypatch)
    ids, mask = _inputs(device)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert spy.calls["apply_rope"] == 0 and spy.calls["add_rms_norm"] == 0 and spy.calls["rms_norm"] > 0
    with pytest.raises(TypeError, match="model"):
        llmkern.patch_model("llama")
    with pytest.raises(ValueError, match="no .*modules to patch"):
        llmkern.patch_model(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="fuse_residual"):
        llmkern.patch_model(model, rms_norm=False)
    with pytest.raises(TypeError, match="rope"):
        llmkern.patch_model(model, rope=1)


def test_hf_rope_dropin_layouts(device):
    """llmkern.patch.apply_rotary_pos_emb == transformers' function for both layouts it is called with."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_rope
    from llmkern.patch import apply_rotary_pos_emb
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 16, generator=g).to(device)           # (batch, heads, seq, d)
    k = torch.randn(2, 2, 5, 16, generator=g).to(device)
    cos, sin = llmkern.reference.rope_cos_sin(torch.arange(5, device=device)[None] + 3, 16)
    for dim, (qq, kk) in ((1, (q, k)), (2, (q.transpose(1, 2), k.transpose(1, 2)))):
        ours = apply_rotary_pos_emb(qq, kk, cos, sin, unsqueeze_dim=dim)
        ref = hf_rope(qq, kk, cos, sin, unsqueeze_dim=dim)
        for o, r in zip(ours, ref):
            assert o.shape == r.shape
            torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6)


def test_composes_with_quantize_model(device, monkeypatch):
    """patch_model swaps norms/RoPE, quantize_model swaps the linear layers: in either order the result is the
    quantized model with llmkern norms/RoPE: both paths run, greedy tokens equal the quantized model's, logits agree
    to fp16 rounding (quantization is deterministic, so the weights are identical; only norm/RoPE rounding differs)."""
    from llmkern.quant_linear import QuantLinear
    ids, mask = _inputs(device)
    plain = llmkern.quantize_model(_model("llama", torch.float16, device), bits=4, group_size=32)
    ref_logits, ref_tokens = _run(plain, ids, mask)
    real = mask.bool()
    scale = float(ref_logits.float().abs().max())

    first = llmkern.quantize_model(llmkern.patch_model(_model("llama", torch.float16, device)), bits=4, group_size=32)
    second = llmkern.patch_model(llmkern.quantize_model(_model("llama", torch.float16, device), bits=4, group_size=32))
    spy = _Spy(monkeypatch)
    logits, tokens = _run(first, ids, mask)
    assert spy.calls["apply_rope"] > 0 and spy.calls["add_rms_norm"] > 0 and spy.calls["rms_norm"] > 0
    assert torch.equal(tokens, ref_tokens)
    with torch.no_grad():
        logits2 = second(input_ids=ids, attention_mask=mask).logits
    for m, out in ((first, logits), (second, logits2)):
        assert isinstance(m.model.layers[0].mlp.down_proj, QuantLinear)
        assert type(m.model.layers[0]).__name__ == "LlmkernLlamaDecoderLayer"
        assert float((out.float() - ref_logits.float())[real].abs().max()) <= 1e-2 * scale


def test_composes_with_llmkern_attention_backend(device):
    """patch_model + attn_implementation="llmkern": every layer op of the model on llmkern, same logits as SDPA."""
    import llmkern.integrations.transformers  # noqa: F401  (registers "llmkern" with transformers)
    cfg = _config("llama")
    cfg.hidden_size, cfg.head_dim = 128, 32         # the attention kernels take head_dim >= 32
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval().to(device)
    ids, mask = _inputs(device)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        model.set_attn_implementation("llmkern")
        out = llmkern.patch_model(model)(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert float((out - ref)[real].abs().max()) <= 1e-5 * float(ref.abs().max())


def test_patched_model_under_torch_compile(device, monkeypatch):
    """A patched model compiles with fullgraph=True (llmkern ops are torch.library custom ops with fake kernels,
    and the RoPE scope is a plain attribute Dynamo can trace) and gives the eager patched logits."""
    import torch._dynamo
    model = llmkern.patch_model(_model("llama", device=device))
    ids, mask = _inputs(device)
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask).logits
    spy = _Spy(monkeypatch)
    out = _compiled_logits(model, ids, mask)
    assert spy.calls["apply_rope"] > 0 and spy.calls["add_rms_norm"] > 0
    assert torch.equal(out, eager)


def _compiled_logits(model, ids, mask):
    """The model's logits through torch.compile(fullgraph=True) (aot_eager: tracing without a C++ compiler)."""
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = compiled(input_ids=ids, attention_mask=mask).logits
    torch._dynamo.reset()
    return out
