"""Shapes of popular decoder-only LLMs, for the roofline tool and the end-to-end benchmark.

Every number is the model's Hugging Face `config.json` value (the source is named per entry). All models here are
Llama-style: per layer, attention projections q (hidden -> heads*head_dim), k and v (hidden -> kv_heads*head_dim),
o (heads*head_dim -> hidden), a gated MLP of three matrices (gate, up: hidden -> intermediate; down: back), and
RMSNorms; plus the token embedding and the LM head (shared when the embeddings are tied).

Mixture-of-Experts models (Mixtral, Qwen3-MoE) replace the MLP by `num_experts` such gated MLPs of `intermediate`
each and a router (hidden -> num_experts); each token runs `experts_per_token` of them. So a MoE model has two
parameter counts: the total (every expert, all of which must sit in memory) and the active one (what one token
multiplies).

DeepSeek-V3 adds three things, each a field below: multi-head latent attention (MLA, arXiv 2405.04434 section
2.1): q through a low-rank q_lora_rank bottleneck, K and V from one kv_lora_rank latent per token plus a shared
qk_rope_head_dim RoPE key, and that latent and RoPE key are all the cache holds; its first `dense_layers` layers keep
a dense MLP (of dense_intermediate); and `shared_experts` experts that every token runs besides its routed ones.
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
    num_experts: int = 0                  # routed experts per layer (0: a dense MLP); `intermediate` is per expert
    experts_per_token: int = 0            # the router's top_k
    qk_norm: bool = False                 # Qwen3: an RMSNorm (head_dim weights) on q and on k in every layer
    # MLA (kv_lora_rank > 0): head_dim is the query/key head dim qk_nope_head_dim + qk_rope_head_dim, v_head_dim
    # the value's; kv_heads = heads (as the config says), but the cache holds kv_lora_rank + qk_rope_head_dim per token
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    q_lora_rank: int = 0                  # 0: q projected from the hidden state directly
    v_head_dim: int = 0
    dense_layers: int = 0                 # MoE: the first layers with a dense MLP (DeepSeek's first_k_dense_replace)
    dense_intermediate: int = 0           # their MLP's intermediate size
    shared_experts: int = 0               # experts (of `intermediate`) every token runs besides its routed ones

    # ------------------------------------------------------------------ parameter counts (weights, no buffers)
    def attn_params(self) -> int:
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        bias = (q_out + 2 * kv_out) if self.qkv_bias else 0
        return sum(n * k for n, k in self.attn_linear_shapes()) + bias

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def moe_layers(self) -> int:
        """Layers whose MLP is the experts (the rest have a dense MLP)."""
        return self.layers - self.dense_layers if self.is_moe else 0

    def expert_params(self) -> int:
        """One gated MLP: the dense model's MLP, or one expert."""
        return 3 * self.hidden * self.intermediate

    def router_params(self) -> int:
        return self.num_experts * self.hidden

    def dense_mlp_params(self) -> int:
        """The gated MLP of a dense layer."""
        return sum(n * k for n, k in self.dense_mlp_shapes())

    def mlp_params(self) -> int:
        """Every MLP weight of one MoE layer (all experts, shared ones included, plus the router), or of a dense
        model's layer."""
        if self.is_moe:
            return (self.num_experts + self.shared_experts) * self.expert_params() + self.router_params()
        return self.expert_params()

    def active_mlp_params(self) -> int:
        """The MLP weights one token multiplies in a MoE layer (its experts_per_token experts, the shared ones, the
        router), or in a dense model's layer."""
        if self.is_moe:
            return (self.experts_per_token + self.shared_experts) * self.expert_params() + self.router_params()
        return self.expert_params()

    def attn_linear_shapes(self) -> list[tuple[int, int]]:
        """(out_features, in_features) of q, k, v, o; for MLA (DeepSeek's names) q_a and q_b (or q), kv_a (to the
        latent and the RoPE key), kv_b (the latent to every head's no-RoPE key and value), o."""
        if self.is_mla:
            nope = self.head_dim - self.qk_rope_head_dim
            q_out = self.heads * self.head_dim
            q = [(self.q_lora_rank, self.hidden), (q_out, self.q_lora_rank)] if self.q_lora_rank else \
                [(q_out, self.hidden)]
            return q + [(self.kv_lora_rank + self.qk_rope_head_dim, self.hidden),
                        (self.heads * (nope + self.v_head_dim), self.kv_lora_rank),
                        (self.hidden, self.heads * self.v_head_dim)]
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [(q_out, self.hidden), (kv_out, self.hidden), (kv_out, self.hidden), (self.hidden, q_out)]

    def dense_mlp_shapes(self) -> list[tuple[int, int]]:
        """gate, up, down of a dense layer's MLP (a MoE model's first dense_layers layers: dense_intermediate)."""
        inter = self.dense_intermediate if self.is_moe else self.intermediate
        return [(inter, self.hidden), (inter, self.hidden), (self.hidden, inter)]

    def expert_linear_shapes(self) -> list[tuple[int, int]]:
        """gate, up, down of one gated MLP (the dense MLP, or one expert)."""
        return [(self.intermediate, self.hidden), (self.intermediate, self.hidden), (self.hidden, self.intermediate)]

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(out_features, in_features) of the linear layers one token passes in a layer: attention and one gated MLP
        (for a MoE model, one expert; it passes experts_per_token of them). Weight-only quantization packs these."""
        return self.attn_linear_shapes() + self.expert_linear_shapes()

    def _norm_params(self) -> int:
        """One layer's norms: MLA adds one on the q bottleneck and one on the latent (DeepSeek's q_a_layernorm,
        kv_a_layernorm)."""
        return (self.norms_per_layer * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
                + self.q_lora_rank + self.kv_lora_rank)

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def lm_head_params(self) -> int:
        """0 when tied: the LM head is the embedding matrix."""
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    def param_count(self) -> int:
        """All parameters (a MoE model: every expert)."""
        mlp = self.moe_layers * self.mlp_params() + (self.layers - self.moe_layers) * self.dense_mlp_params()
        return (self.layers * (self.attn_params() + self._norm_params()) + mlp + self.embedding_params()
                + self.lm_head_params() + self.hidden)  # + the final norm

    def active_param_count(self) -> int:
        """The parameters one token uses: for a MoE model, experts_per_token experts per layer (the embedding table
        counted whole, as the model cards' "active parameters" do)."""
        unused = self.moe_layers * (self.mlp_params() - self.active_mlp_params())
        return self.param_count() - unused


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
    # MoE. Mixtral: num_local_experts 8, num_experts_per_tok 2, no sliding window in v0.1's config; "46.7B total,
    # 12.9B active" (Mistral AI's announcement) is what these fields give. Qwen3: the MoE intermediate is
    # moe_intermediate_size (intermediate_size 6144 is for dense layers, of which this model has none:
    # decoder_sparse_step 1, mlp_only_layers []), q/k RMSNorms; "30.5B total, 3.3B activated" (the model card).
    "mixtral-8x7b": ModelShape(
        "Mixtral-8x7B-v0.1", hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336,
        vocab=32000, tied_embeddings=False, num_experts=8, experts_per_token=2,
        source="huggingface.co/mistralai/Mixtral-8x7B-v0.1 config.json"),
    "qwen3-30b-a3b": ModelShape(
        "Qwen3-30B-A3B", hidden=2048, layers=48, heads=32, kv_heads=4, head_dim=128, intermediate=768,
        vocab=151936, tied_embeddings=False, num_experts=128, experts_per_token=8, qk_norm=True,
        source="huggingface.co/Qwen/Qwen3-30B-A3B config.json (moe_intermediate_size 768)"),
    # MLA and MoE: head_dim = qk_nope_head_dim 128 + qk_rope_head_dim 64; intermediate = moe_intermediate_size;
    # first_k_dense_replace 3 dense layers of intermediate_size 18432; n_shared_experts 1. "671B total parameters
    # with 37B activated for each token" (the DeepSeek-V3 technical report, arXiv 2412.19437; the multi-token-
    # prediction module's extra 14B is not part of the model a forward runs, nor counted here).
    "deepseek-v3": ModelShape(
        "DeepSeek-V3", hidden=7168, layers=61, heads=128, kv_heads=128, head_dim=192, intermediate=2048,
        vocab=129280, tied_embeddings=False, num_experts=256, experts_per_token=8, kv_lora_rank=512,
        qk_rope_head_dim=64, q_lora_rank=1536, v_head_dim=128, dense_layers=3, dense_intermediate=18432,
        shared_experts=1, source="huggingface.co/deepseek-ai/DeepSeek-V3 config.json"),
}

# Spellings people type.
_ALIASES = {"llama3-8b": "llama-3-8b", "llama-3.1-8b": "llama-3-8b", "llama3-70b": "llama-3-70b",
            "llama-3.1-70b": "llama-3-70b", "mistral": "mistral-7b", "mistral-7b-v0.1": "mistral-7b",
            "qwen2.5": "qwen2.5-7b", "qwen-2.5-7b": "qwen2.5-7b", "gemma2-9b": "gemma-2-9b",
            "mixtral": "mixtral-8x7b", "mixtral-8x7b-v0.1": "mixtral-8x7b", "qwen3-30b": "qwen3-30b-a3b",
            "qwen3-moe": "qwen3-30b-a3b", "deepseek-v3-0324": "deepseek-v3", "deepseek-r1": "deepseek-v3"}


def get_model(name: str) -> ModelShape:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[key]
