"""patch_model and quantize_model on tiny random-weight Hugging Face MoE models (Mixtral, Qwen2-MoE with its shared
expert, Qwen3-MoE, OLMoE; built locally, no downloads): the same logits and greedy tokens as transformers' own, with
llmkern's MoE kernels actually running."""
import pytest
import torch

import llmkern
from llmkern import moe
from test_patch import VOCAB, _compiled_logits, _inputs, _Spy

transformers = pytest.importorskip("transformers")

_COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
               max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, num_experts_per_tok=2)
_FAMILIES = {   # model class, config: each family's own names for the expert count and size
    "mixtral": ("MixtralForCausalLM", lambda: transformers.MixtralConfig(
        **_COMMON, intermediate_size=64, num_local_experts=4)),
    "qwen2_moe": ("Qwen2MoeForCausalLM", lambda: transformers.Qwen2MoeConfig(
        **_COMMON, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        num_experts=8, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeForCausalLM", lambda: transformers.Qwen3MoeConfig(
        **_COMMON, head_dim=16, intermediate_size=64, moe_intermediate_size=32, num_experts=8, norm_topk_prob=True)),
    "olmoe": ("OlmoeForCausalLM", lambda: transformers.OlmoeConfig(
        **_COMMON, intermediate_size=32, num_experts=8, norm_topk_prob=False)),
}


def _model(family: str, dtype=torch.float32, device="cpu", layers=2):
    torch.manual_seed(0)
    cls, config = _FAMILIES[family]
    cfg = config()
    cfg.num_hidden_layers = layers
    model = getattr(transformers, cls)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:        # the init sets norm weights to 1: make them matter
                p.copy_(torch.randn_like(p) * 0.3 + 1.0)
            elif name.endswith("gate.weight"):
                p.mul_(20.0)          # decisive routing: near-equal router scores would make the test about ties
    return model.to(device=device, dtype=dtype)


def _spy(monkeypatch):
    return _Spy(monkeypatch, moe, ("moe_topk", "fused_moe"))


def _generate(model, ids, mask):
    """Two greedy steps (a prefill of the left-padded batch, then a one-token decode step): tokens and each step's
    last-position logits."""
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    return torch.stack(out.logits), out.sequences


# Mixtral and Qwen3-MoE: every llmkern kernel (norms, RoPE, MoE); Qwen2-MoE (shared expert) and OLMoE: the MoE
# blocks only, to keep the interpreter's time down (their norms and RoPE are Llama's, tested in test_patch.py).
@pytest.mark.parametrize("family,full", [("mixtral", True), ("qwen3_moe", True), ("qwen2_moe", False),
                                         ("olmoe", False)])
def test_patched_moe_model_matches(device, family, full, monkeypatch):
    model = _model(family, device=device)
    ids, mask = _inputs(device)
    ref_logits, ref_tokens = _generate(model, ids, mask)
    spy = _spy(monkeypatch)
    flags = {} if full else dict(rms_norm=False, rope=False, fuse_residual=False)
    assert llmkern.patch_model(model, **flags) is model
    logits, tokens = _generate(model, ids, mask)
    layers = model.config.num_hidden_layers
    assert spy.calls["moe_topk"] >= 2 * layers and spy.calls["fused_moe"] >= 2 * layers
    mlp = model.model.layers[0].mlp
    assert type(mlp.gate).__name__.startswith("Llmkern") and type(mlp.experts).__name__.startswith("Llmkern")
    assert type(model.model.layers[0]).__name__.startswith("Llmkern") == full
    # float32: differences come from summation order only; a few ulps of the largest logit
    assert float((logits - ref_logits).abs().max()) <= 1e-5 * float(ref_logits.abs().max())
    assert torch.equal(tokens, ref_tokens)


def test_router_logits_and_aux_loss_unchanged(device):
    """The router module still returns its logits (transformers records them for the load-balancing loss)."""
    model = _model("mixtral", device=device)
    ids, mask = _inputs(device)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, labels=ids, output_router_logits=True)
        out = llmkern.patch_model(model, rms_norm=False, rope=False, fuse_residual=False)(input_ids=ids, attention_mask=mask, labels=ids, output_router_logits=True)
    assert len(out.router_logits) == len(ref.router_logits) == model.config.num_hidden_layers
    for a, b in zip(out.router_logits, ref.router_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, rtol=1e-5, atol=1e-6)


def test_quantize_model_composes_with_moe(device):
    """quantize_model packs the experts (int4, group 32) and runs them on fused_moe; the quantized experts compute
    what transformers computes with the dequantized weights; patch_model before or after gives the same logits to
    fp16 rounding."""
    exclude = ("q_proj", "k_proj", "v_proj", "o_proj", "lm_head")      # only the experts are quantized here
    ids, mask = _inputs(device)
    real = mask.bool()

    def quantized():
        return llmkern.quantize_model(_model("qwen3_moe", torch.float16, device, layers=1), bits=4, group_size=32,
                                      exclude=exclude)

    def logits(model):
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits.float()

    plain = quantized()
    experts = plain.model.layers[0].mlp.experts
    assert "gate_up_proj" not in dict(experts.named_parameters()) and experts.gate_up_proj_qweight.dtype == torch.int32
    ref = logits(plain)
    # transformers' own model with the dequantized expert weights
    dense = _model("qwen3_moe", torch.float16, device, layers=1)
    with torch.no_grad():
        for part in ("gate_up_proj", "down_proj"):
            getattr(dense.model.layers[0].mlp.experts, part).copy_(
                llmkern.patch_moe._quantized(experts, part).dequantize())
    scale = float(ref.abs().max())
    assert float((logits(dense) - ref)[real].abs().max()) <= 1e-2 * scale

    first = llmkern.quantize_model(llmkern.patch_model(_model("qwen3_moe", torch.float16, device, layers=1)),
                                   bits=4, group_size=32, exclude=exclude)
    second = llmkern.patch_model(quantized())
    for m in (first, second):
        assert type(m.model.layers[0].mlp.gate).__name__ == "LlmkernQwen3MoeTopKRouter"
        assert float((logits(m) - ref)[real].abs().max()) <= 1e-2 * scale
    with pytest.raises(ValueError, match="experts"):
        llmkern.quantize_model(_model("qwen3_moe", torch.float16, device, layers=1), bits=4, group_size=128,
                               exclude=exclude)


def test_patch_moe_option_and_compile(device, monkeypatch):
    """moe=False leaves the MoE blocks alone; a patched MoE model compiles with fullgraph=True."""
    ids, mask = _inputs(device)
    model = llmkern.patch_model(_model("mixtral", device=device, layers=1), moe=False)
    assert type(model.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    with pytest.raises(TypeError, match="moe"):
        llmkern.patch_model(model, moe=1)
    model = llmkern.patch_model(model, rms_norm=False, rope=False, fuse_residual=False)   # the MoE ops only
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask).logits
    spy = _spy(monkeypatch)
    out = _compiled_logits(model, ids, mask)
    assert spy.calls["fused_moe"] > 0
    assert torch.equal(out, eager)
