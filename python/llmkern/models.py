"""Shapes of popular decoder-only LLMs, for the roofline tool and the end-to-end benchmark.

Every number is the model's Hugging Face `config.json` value (the source is named per entry). All models here are
Llama-style: per layer, attention projections q (hidden -> heads*head_dim), k and v (hidden -> kv_heads*head_dim),
o (heads*head_dim -> hidden), a gated MLP of three matrices (gate, up: hidden -> intermediate; down: back), and
RMSNorms; plus the token embedding and the LM head (shared when the embeddings are tied).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    source: str
    qkv_bias: bool = False                # Qwen2 adds biases to q, k, v
    norms_per_layer: int = 2              # Gemma-2 has 4 (pre/post attention, pre/post feed-forward)
    sliding_window: int | None = None     # tokens a sliding-window layer attends to (None: full attention)
    sliding_layers: int = 0               # how many layers use the window (Mistral v0.1: all; Gemma-2: every other)

    # ------------------------------------------------------------------ parameter counts (weights, no buffers)
    def attn_params(self) -> int:
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        bias = (q_out + 2 * kv_out) if self.qkv_bias else 0
        return self.hidden * q_out + 2 * self.hidden * kv_out + q_out * self.hidden + bias

    def mlp_params(self) -> int:
        return 3 * self.hidden * self.intermediate

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(out_features, in_features) of one layer's linear layers: the ones weight-only quantization packs."""
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [(q_out, self.hidden), (kv_out, self.hidden), (kv_out, self.hidden), (self.hidden, q_out),
                (self.intermediate, self.hidden), (self.intermediate, self.hidden), (self.hidden, self.intermediate)]

    def layer_params(self) -> int:
        return self.attn_params() + self.mlp_params() + self.norms_per_layer * self.hidden

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def lm_head_params(self) -> int:
        """0 when tied: the LM head is the embedding matrix."""
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    def param_count(self) -> int:
        return (self.layers * self.layer_params() + self.embedding_params() + self.lm_head_params()
                + self.hidden)  # + the final norm


MODELS: dict[str, ModelShape] = {
    "llama-3-8b": ModelShape(
        "Llama-3-8B", hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=128256,
        tied_embeddings=False, source="huggingface.co/meta-llama/Meta-Llama-3-8B config.json"),
    "llama-3-70b": ModelShape(
        "Llama-3-70B", hidden=8192, layers=80, heads=64, kv_heads=8, head_dim=128, intermediate=28672, vocab=128256,
        tied_embeddings=False, source="huggingface.co/meta-llama/Meta-Llama-3-70B config.json"),
    "mistral-7b": ModelShape(
        "Mistral-7B-v0.1", hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336,
        vocab=32000, tied_embeddings=False, sliding_window=4096, sliding_layers=32,
        source="huggingface.co/mistralai/Mistral-7B-v0.1 config.json (sliding_window 4096 on every layer)"),
    "qwen2.5-7b": ModelShape(
        "Qwen2.5-7B", hidden=3584, layers=28, heads=28, kv_heads=4, head_dim=128, intermediate=18944, vocab=152064,
        tied_embeddings=False, qkv_bias=True, source="huggingface.co/Qwen/Qwen2.5-7B config.json"),
    "gemma-2-9b": ModelShape(
        "Gemma-2-9B", hidden=3584, layers=42, heads=16, kv_heads=8, head_dim=256, intermediate=14336, vocab=256000,
        tied_embeddings=True, norms_per_layer=4, sliding_window=4096, sliding_layers=21,
        source="huggingface.co/google/gemma-2-9b config.json (sliding_window 4096 on every other layer)"),
}

# Spellings people type.
_ALIASES = {"llama3-8b": "llama-3-8b", "llama-3.1-8b": "llama-3-8b", "llama3-70b": "llama-3-70b",
            "llama-3.1-70b": "llama-3-70b", "mistral": "mistral-7b", "mistral-7b-v0.1": "mistral-7b",
            "qwen2.5": "qwen2.5-7b", "qwen-2.5-7b": "qwen2.5-7b", "gemma2-9b": "gemma-2-9b"}


def get_model(name: str) -> ModelShape:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[key]
