"""`patch_model`: run a Hugging Face Llama/Mistral/Qwen2/Gemma2 model's RMSNorms and rotary embedding on llmkern, and
the Mixture-of-Experts blocks of Mixtral/Qwen2-MoE/Qwen3-MoE/OLMoE (their norms and RoPE too) on llmkern's MoE kernels.

What it changes, per model instance (the way Liger-Kernel patches models, but for inference):
  * every `<Family>RMSNorm` module becomes an llmkern-backed subclass (same weight, same eps, same dtype rules:
    Llama-style casting for Llama/Mistral/Qwen2, Gemma's (1 + weight) in float32 for Gemma2), by a class swap;
  * every `<Family>DecoderLayer` of Llama/Mistral/Qwen2 gets a forward whose post-attention residual add is fused
    into the following RMSNorm (`add_rms_norm`): one pass over the hidden states instead of two;
  * every `<Family>Attention` module becomes a subclass that rotates q and k with llmkern's RoPE kernel (one launch
    for both) instead of `apply_rotary_pos_emb`;
  * every MoE router and experts module becomes a subclass on llmkern.moe_topk / llmkern.fused_moe
    (llmkern.patch_moe explains how).

The rotary function is a module-level function in transformers (`modeling_llama.apply_rotary_pos_emb`), called from
the attention forward without the module; so that only *patched* models use llmkern, the function is replaced once by
a wrapper that forwards to the original unless a patched attention module (an llmkern subclass, by class swap) is
running. Unpatched models of the same family are unaffected. Everything here traces under torch.compile.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

import torch
from torch import nn

from llmkern import layers, patch_moe


@dataclass(frozen=True)
class _Family:
    module: str          # transformers modeling module
    prefix: str          # class name prefix: <prefix>RMSNorm, <prefix>DecoderLayer, <prefix>Attention
    eps_attr: str        # where the norm keeps eps
    offset: float        # weight offset of the norm (Gemma stores w - 1)
    casting: str         # llmkern.rms_norm casting mode matching the family's norm
    fuse_residual: bool  # decoder layer is `x + attn(norm(x))` then `norm` -> fusable add + norm


_FAMILIES = (
    _Family("transformers.models.llama.modeling_llama", "Llama", "variance_epsilon", 0.0, "llama", True),
    _Family("transformers.models.mistral.modeling_mistral", "Mistral", "variance_epsilon", 0.0, "llama", True),
    _Family("transformers.models.qwen2.modeling_qwen2", "Qwen2", "variance_epsilon", 0.0, "llama", True),
    # Gemma-2's layer norms its attention output before the residual add (four norms per layer): only the norms
    # and RoPE are swapped, the layer forward is left as is.
    _Family("transformers.models.gemma2.modeling_gemma2", "Gemma2", "eps", 1.0, "gemma", False),
    # MoE models: the same decoder layer, norm and RoPE as Llama in transformers 5.x (the MLP is the MoE block).
    _Family("transformers.models.mixtral.modeling_mixtral", "Mixtral", "variance_epsilon", 0.0, "llama", True),
    _Family("transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2Moe", "variance_epsilon", 0.0, "llama", True),
    _Family("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3Moe", "variance_epsilon", 0.0, "llama", True),
    _Family("transformers.models.olmoe.modeling_olmoe", "Olmoe", "variance_epsilon", 0.0, "llama", True),
)


def _load(family: _Family):
    try:
        return importlib.import_module(family.module)
    except ImportError:  # an older transformers without this family: nothing of it can be in the model
        return None


# --------------------------------------------------------------------------------------------------- RMSNorm
@functools.lru_cache(maxsize=None)
def _norm_class(family: _Family) -> type:
    """A subclass of the family's RMSNorm whose forward runs llmkern.rms_norm (weights and attributes unchanged)."""
    base = getattr(_load(family), f"{family.prefix}RMSNorm")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self._llmkern_supported(hidden_states):
            return base.forward(self, hidden_states)
        return layers.rms_norm(hidden_states, self.weight, getattr(self, family.eps_attr), offset=family.offset,
                               casting=family.casting)

    def add_forward(self, hidden_states: torch.Tensor, residual: torch.Tensor):
        """(norm(residual + hidden_states), residual + hidden_states) in one kernel."""
        if not (self._llmkern_supported(hidden_states) and residual.dtype == hidden_states.dtype
                and residual.shape == hidden_states.shape):
            r = residual + hidden_states
            return base.forward(self, r), r
        return layers.add_rms_norm(hidden_states, residual, self.weight, getattr(self, family.eps_attr),
                                   offset=family.offset, casting=family.casting)

    def supported(self, x: torch.Tensor) -> bool:
        # Llama-style norms multiply in the weight's dtype and return the promoted dtype: only when x and the weight
        # share a dtype is that x's dtype, which is what the kernel writes. Otherwise the original forward runs.
        same = family.casting != "llama" or x.dtype == self.weight.dtype
        return same and x.dtype in (torch.float16, torch.bfloat16, torch.float32) and x.device == self.weight.device

    return type(f"Llmkern{base.__name__}", (base,), {
        "forward": forward, "add_forward": add_forward, "_llmkern_supported": supported,
        "__doc__": f"{base.__name__} running on llmkern.rms_norm (installed by llmkern.patch_model)."})


# ------------------------------------------------------------------------------------------------ decoder layer
@functools.lru_cache(maxsize=None)
def _decoder_class(family: _Family) -> type:
    """A subclass of the family's decoder layer with the post-attention residual add fused into the norm.

    Same computation as transformers' forward (Llama/Mistral/Qwen2 in 5.x):
        residual = x; x = attn(input_norm(x)); x = residual + x; residual = x; x = mlp(post_norm(x)); x = residual + x
    """
    base = getattr(_load(family), f"{family.prefix}DecoderLayer")

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask, **kwargs)
        hidden_states, residual = self.post_attention_layernorm.add_forward(hidden_states, residual)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states

    return type(f"Llmkern{base.__name__}", (base,), {
        "forward": forward,
        "__doc__": f"{base.__name__} with a fused residual add + RMSNorm (installed by llmkern.patch_model)."})


# -------------------------------------------------------------------------------------------------------- RoPE
class _RopeScope:
    """How many patched attention forwards are running (nested calls count). A plain attribute rather than a
    ContextVar so that torch.compile can trace it. Not per thread: a patched and an unpatched model of one family
    running at once in two threads may both get llmkern's RoPE, which computes the same rotation."""
    depth = 0


_ROPE_SCOPE = _RopeScope()


def _hf_rope_supported(q, k, cos, sin, unsqueeze_dim) -> bool:
    """Inputs the kernel serves exactly as transformers' function would; anything else goes to the original."""
    if unsqueeze_dim not in (1, 2) or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        return False
    d = q.shape[-1]
    seq_dim = 2 if unsqueeze_dim == 1 else 1
    return (cos.shape[-1] == d and k.shape[-1] == d and d % 2 == 0 and d <= 256  # full rotary only
            and q.dtype == k.dtype and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and cos.shape[1] == q.shape[seq_dim] == k.shape[seq_dim] and cos.shape[0] in (1, q.shape[0])
            and q.device == k.device == cos.device == sin.device)


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for transformers' `apply_rotary_pos_emb` on llmkern's RoPE kernel.

    q, k: (batch, heads, seq, head_dim) (unsqueeze_dim=1, what the attention modules pass) or (batch, seq, heads,
    head_dim) (unsqueeze_dim=2); cos, sin: (batch or 1, seq, head_dim) from the model's rotary embedding module.
    Returns tensors of q's and k's shapes (views of new (batch, seq, heads, head_dim) buffers).
    """
    if unsqueeze_dim == 1:
        q_rot, k_rot = layers.apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos=cos, sin=sin)
        return q_rot.transpose(1, 2), k_rot.transpose(1, 2)
    return layers.apply_rope(q, k, cos=cos, sin=sin)


def _install_rope(mod) -> None:
    """Replace mod.apply_rotary_pos_emb, once, by a wrapper that uses llmkern only inside patched modules."""
    original = mod.apply_rotary_pos_emb
    if getattr(original, "_llmkern_original", None) is not None:
        return

    @functools.wraps(original)
    def wrapper(q, k, cos, sin, unsqueeze_dim=1, *args, **kwargs):
        if _ROPE_SCOPE.depth > 0 and not args and not kwargs and _hf_rope_supported(q, k, cos, sin, unsqueeze_dim):
            return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)
        return original(q, k, cos, sin, unsqueeze_dim, *args, **kwargs)

    wrapper._llmkern_original = original
    mod.apply_rotary_pos_emb = wrapper


@functools.lru_cache(maxsize=None)
def _attention_class(family: _Family) -> type:
    """A subclass of the family's attention whose forward runs inside the llmkern RoPE scope."""
    base = getattr(_load(family), f"{family.prefix}Attention")

    def forward(self, *args, **kwargs):
        _ROPE_SCOPE.depth += 1
        try:
            return base.forward(self, *args, **kwargs)
        finally:
            _ROPE_SCOPE.depth -= 1

    return type(f"Llmkern{base.__name__}", (base,), {
        "forward": forward,
        "__doc__": f"{base.__name__} rotating q/k with llmkern.apply_rope (installed by llmkern.patch_model)."})


# ------------------------------------------------------------------------------------------------------ public
def patch_model(model: nn.Module, *, rms_norm: bool = True, rope: bool = True,
                fuse_residual: bool = True, moe: bool = True) -> nn.Module:
    """Swap a Hugging Face Llama/Mistral/Qwen2/Gemma2/Mixtral/Qwen2-MoE/Qwen3-MoE/OLMoE model's RMSNorm, RoPE and
    MoE blocks onto llmkern's kernels, in place.

    rms_norm: RMSNorm modules -> llmkern.rms_norm; fuse_residual (needs rms_norm): the post-attention residual add of
    the decoder layers (all but Gemma2's) fused into its norm (llmkern.add_rms_norm); rope: q/k rotation ->
    llmkern.apply_rope; moe: MoE routers -> llmkern.moe_topk and experts -> llmkern.fused_moe. Weights are untouched
    (shared, not copied), so it composes with quantize_model in either order and with attention backends. Calling it
    twice is harmless. Returns the model.
    Raises ValueError when the model contains no module of a supported family.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, flag in (("rms_norm", rms_norm), ("rope", rope), ("fuse_residual", fuse_residual), ("moe", moe)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if fuse_residual and not rms_norm:
        raise ValueError("fuse_residual=True needs rms_norm=True (the fused add lives in the llmkern norm)")

    found = patch_moe.patch(model, enabled=moe)
    for family in _FAMILIES:
        mod = _load(family)
        if mod is None:
            continue
        norm_cls = getattr(mod, f"{family.prefix}RMSNorm")
        layer_cls = getattr(mod, f"{family.prefix}DecoderLayer")
        attn_cls = getattr(mod, f"{family.prefix}Attention")
        # Norms first: a decoder layer is fused only when its post-attention norm is an llmkern norm.
        for m in model.modules():
            if isinstance(m, norm_cls):
                found += 1
                if rms_norm and type(m) is norm_cls:
                    m.__class__ = _norm_class(family)
        for m in model.modules():
            if isinstance(m, layer_cls):
                found += 1
                if (fuse_residual and family.fuse_residual and type(m) is layer_cls
                        and hasattr(getattr(m, "post_attention_layernorm", None), "add_forward")):
                    m.__class__ = _decoder_class(family)
            elif isinstance(m, attn_cls):
                found += 1
                if rope and type(m) is attn_cls:
                    _install_rope(mod)
                    m.__class__ = _attention_class(family)
    if not found:
        names = ", ".join(f.prefix for f in _FAMILIES)
        raise ValueError(f"model ({type(model).__name__}) has no {names} RMSNorm/decoder/attention/MoE modules to "
                         "patch")
    return model


__all__ = ["patch_model", "apply_rotary_pos_emb"]
