"""`llmkern.generate`: a reference decode loop for Llama-family Hugging Face models, run on llmkern's kernels.

It exists to show the kernels composing into whole model steps (and to time those steps), not to serve traffic:
no scheduler, no request queue, no CUDA graphs. One step of the loop, for every sequence still running:

    embeddings (the model's)  ->  per decoder layer:
        llmkern.rms_norm / add_rms_norm (fused residual add)    the model's RMSNorm weights and eps
        q/k/v projections (the model's own Linear layers, or llmkern QuantLinear after quantize_model)
        llmkern.apply_rope with the model's own cos/sin tables  (any rope_scaling the model uses, e.g. Llama-3's)
        llmkern.paged_kv_write into a PagedKVCache (one cache layer per decoder layer)
        llmkern.paged_prefill_attention (the prompt) or paged_decode_attention (one new token)
        o projection, add_rms_norm, the model's MLP
    ->  final add_rms_norm, lm_head on each sequence's last token  ->  llmkern.sample

Prefill runs all prompts packed together (varlen: no padding is ever computed); each decode step runs one token per
running sequence. A sequence stops at an EOS token or after max_new_tokens; its cache blocks are then freed and the
batch shrinks.

Supported: the model types in `SUPPORTED` (Llama, Mistral with its sliding window, Qwen2 with its q/k/v biases):
pre-norm decoder layers of `input_layernorm -> self_attn -> post_attention_layernorm -> mlp` with RMSNorm. Others
raise ValueError.
"""
from __future__ import annotations

import numbers
from typing import Any, Sequence

import torch

from llmkern import _utils, layers, paged_attention, sampling
from llmkern.kv_cache import PagedKVCache

SUPPORTED = ("llama", "mistral", "qwen2")
# Cache block size: 16 tokens is FlashAttention's / vLLM's usual page size and a size the paged kernels are tested at.
BLOCK_SIZE = 16
_SEED_MAX = 2 ** 62  # per-step seeds are drawn below this; any int64 works for llmkern.sample


def _check_model(model: Any) -> None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(f"model: llmkern.generate supports Hugging Face models of type {', '.join(SUPPORTED)}; "
                         f"got {model_type!r}")
    inner = getattr(model, "model", None)
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(inner, name):
            raise ValueError(f"model: expected model.model.{name} (a *ForCausalLM of type {model_type})")
    if not hasattr(model, "lm_head"):
        raise ValueError("model: expected model.lm_head (a *ForCausalLM model)")


def _prompts(input_ids: Any, attention_mask: Any) -> list[torch.Tensor]:
    """The real tokens of each prompt: from a list of id lists, or a (batch, seqlen) tensor and its 0/1 mask."""
    if isinstance(input_ids, torch.Tensor):
        _utils.check_tensor("input_ids", input_ids, ndim=2, dtypes=(torch.int32, torch.int64))
        if attention_mask is None:
            return [row for row in input_ids]
        _utils.check_tensor("attention_mask", attention_mask, ndim=2)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got "
                             f"{tuple(attention_mask.shape)}")
        keep = attention_mask.to(device=input_ids.device) != 0
        return [row[m] for row, m in zip(input_ids, keep)]
    if attention_mask is not None:
        raise ValueError("attention_mask is only meaningful with an input_ids tensor; a list of prompts has none")
    if not isinstance(input_ids, (list, tuple)):
        raise TypeError(f"input_ids must be a (batch, seqlen) int tensor or a list of token-id lists, got "
                        f"{type(input_ids).__name__}")
    prompts = []
    for i, p in enumerate(input_ids):
        if isinstance(p, torch.Tensor):
            if p.dim() != 1:
                raise ValueError(f"input_ids[{i}] must be 1-D, got shape {tuple(p.shape)}")
            prompts.append(p.to(torch.int64))
        elif isinstance(p, (list, tuple)) and all(isinstance(t, numbers.Integral) for t in p):
            prompts.append(torch.tensor(list(p), dtype=torch.int64))
        else:
            raise TypeError(f"input_ids[{i}] must be a list of ints or a 1-D tensor")
    return prompts


def _eos_set(eos_token_id: Any, model: Any) -> set[int]:
    if eos_token_id is None:
        gen = getattr(model, "generation_config", None)
        eos_token_id = getattr(gen, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    ids = [eos_token_id] if isinstance(eos_token_id, numbers.Integral) else list(eos_token_id)
    if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in ids):
        raise TypeError(f"eos_token_id must be an int or a list of ints, got {eos_token_id!r}")
    return {int(t) for t in ids}


class ModelRunner:
    """A Llama-family model's forward pass on llmkern ops over a PagedKVCache: the step `generate` runs.

    ModelRunner(model, cache): model as `generate` takes it; cache a PagedKVCache with one layer per decoder layer,
    the model's KV heads, head_dim and dtype. `forward` runs one step for tokens whose cache slots the caller has
    reserved (cache.append); the end-to-end benchmark times it.
    """

    def __init__(self, model: Any, cache: PagedKVCache):
        self.model = model
        self.inner = model.model
        self.cache = cache
        cfg = model.config
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.layers = list(self.inner.layers)[: cfg.num_hidden_layers]
        self.windows = []
        for layer in self.layers:
            attn = layer.self_attn
            # Qwen2 sets self_attn.sliding_window per layer (None on full layers); Mistral only has the config's.
            w = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(cfg, "sliding_window", None)
            # HF keeps key j for query i when j > i - w (masking_utils.sliding_window_overlay): left window w - 1
            self.windows.append((-1, -1) if w is None else (int(w) - 1, 0))

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, seq_ids: list[int], q_lens: list[int],
                slots: torch.Tensor) -> torch.Tensor:
        """Run packed new tokens (their K/V slots already reserved) through the model; logits of each sequence's
        last new token, (len(seq_ids), vocab) float32."""
        cache = self.cache
        device = tokens.device
        block_tables = cache.block_tables(seq_ids)
        seq_lens = cache.seq_lens(seq_ids)
        decode = all(n == 1 for n in q_lens)
        cu_q = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
        cu_q[1:] = torch.cumsum(torch.tensor(q_lens, dtype=torch.int32), 0)
        cu_q = cu_q.to(device)

        hidden = self.inner.embed_tokens(tokens)                                   # (T, hidden)
        # The model's own rotary tables for these positions: (1, T, head_dim), any rope_scaling included.
        cos, sin = self.inner.rotary_emb(hidden[None], positions[None])
        total = tokens.shape[0]
        residual = None
        for i, layer in enumerate(self.layers):
            norm = layer.input_layernorm
            if residual is None:
                residual = hidden
                x = layers.rms_norm(hidden, norm.weight, norm.variance_epsilon)
            else:
                x, residual = layers.add_rms_norm(hidden, residual, norm.weight, norm.variance_epsilon)
            attn = layer.self_attn
            q = attn.q_proj(x).view(total, self.num_heads, attn.head_dim)
            k = attn.k_proj(x).view(total, self.num_kv_heads, attn.head_dim)
            v = attn.v_proj(x).view(total, self.num_kv_heads, attn.head_dim)
            q, k = layers.apply_rope(q, k, cos=cos[0], sin=sin[0])
            k_cache, v_cache = cache.k_cache(i), cache.v_cache(i)
            paged_attention.paged_kv_write(k, v.contiguous(), k_cache, v_cache, slots)
            if decode:
                o = paged_attention.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens,
                                                           scale=attn.scaling, window=self.windows[i])
            else:
                o = paged_attention.paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_q, seq_lens,
                                                            causal=True, scale=attn.scaling, window=self.windows[i])
            hidden = attn.o_proj(o.reshape(total, self.num_heads * attn.head_dim))
            post = layer.post_attention_layernorm
            x, residual = layers.add_rms_norm(hidden, residual, post.weight, post.variance_epsilon)
            hidden = layer.mlp(x)
        last = cu_q[1:].long() - 1
        norm = self.inner.norm
        x, _ = layers.add_rms_norm(hidden[last], residual[last], norm.weight, norm.variance_epsilon)
        return self.model.lm_head(x).float()


@torch.no_grad()
def generate(model: Any, input_ids: Any, *, attention_mask: torch.Tensor | None = None, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
             seed: int | None = None, eos_token_id: int | Sequence[int] | None = None,
             block_size: int = BLOCK_SIZE) -> list[list[int]]:
    """Generate up to max_new_tokens tokens per prompt with llmkern kernels; see the module docstring.

    model: a Hugging Face Llama/Mistral/Qwen2 *ForCausalLM (any dtype and device the kernels support; its Linear
      layers may be llmkern QuantLinear from `llmkern.quantize_model`).
    input_ids: a (batch, seqlen) int tensor, with `attention_mask` (1 = token, 0 = padding, any side) when prompts
      have different lengths; or a list of token-id lists (or 1-D tensors) of any lengths.
    temperature/top_k/top_p/min_p: llmkern.sample's parameters; temperature 0 (the default) is greedy.
    seed: makes sampling reproducible (each step draws per-sequence seeds from a generator seeded with it).
    eos_token_id: an int or list of ints (default: model.generation_config.eos_token_id); a sequence stops after
      emitting one of them.
    Returns, per prompt, the list of new token ids (ending with the EOS token when one stopped it).
    """
    _check_model(model)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral):
        raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    prompts = _prompts(input_ids, attention_mask)
    if not prompts:
        raise ValueError("input_ids holds no prompt")
    for i, p in enumerate(prompts):
        if p.numel() == 0:
            raise ValueError(f"prompt {i} has no tokens (all padding?)")
    eos = _eos_set(eos_token_id, model)

    weight = model.model.embed_tokens.weight
    device, dtype = weight.device, weight.dtype
    cfg = model.config
    head_dim = model.model.layers[0].self_attn.head_dim
    # Enough blocks for every sequence at its longest: no CacheFullError mid-generation.
    num_blocks = sum(_utils.cdiv(p.numel() + max_new_tokens, block_size) for p in prompts)
    cache = PagedKVCache(cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads, head_dim,
                                 dtype=dtype, device=device)
    runner = ModelRunner(model, cache)
    rng = torch.Generator().manual_seed(seed) if seed is not None else None

    def draw(logits: torch.Tensor) -> list[int]:
        seeds = None
        if rng is not None:
            seeds = torch.randint(0, _SEED_MAX, (logits.shape[0],), generator=rng, dtype=torch.int64).to(device)
        tok = sampling.sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seeds)
        out = tok.tolist()
        if any(t < 0 for t in out):
            raise RuntimeError("llmkern.generate: the model produced NaN/inf logits (llmkern.sample returned -1)")
        return out

    # Prefill: every prompt packed into one varlen pass.
    running = list(range(len(prompts)))
    slots = torch.cat([cache.append(i, p.numel()) for i, p in enumerate(prompts)])
    tokens = torch.cat(prompts).to(device)
    positions = torch.cat([torch.arange(p.numel()) for p in prompts]).to(device)
    first = draw(runner.forward(tokens, positions, running, [p.numel() for p in prompts], slots))
    outputs: list[list[int]] = [[t] for t in first]

    # Decode: one token per running sequence per step.
    for _ in range(max_new_tokens - 1):
        for i in list(running):
            if outputs[i][-1] in eos:
                running.remove(i)
                cache.free(i)
        if not running:
            break
        positions = cache.seq_lens(running).to(torch.int64)     # the new token's position = current length
        slots = torch.cat([cache.append(i, 1) for i in running])
        tokens = torch.tensor([outputs[i][-1] for i in running], dtype=torch.int64, device=device)
        new = draw(runner.forward(tokens, positions, running, [1] * len(running), slots))
        for i, t in zip(running, new):
            outputs[i].append(t)
    return outputs
