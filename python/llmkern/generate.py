"""`llmkern.generate`: a reference decode loop for Llama-family Hugging Face models, run on llmkern's kernels.

It exists to show the kernels composing into whole model steps (and to time those steps), not to serve traffic:
no request queue, no preemption. One step of the loop, for the sequences it schedules:

    embeddings (the model's)  ->  per decoder layer:
        llmkern.rms_norm / add_rms_norm (fused residual add)    the model's RMSNorm weights and eps
        q/k/v projections: llmkern.layers.linear on the model's own nn.Linear weights (on CPU at decode shapes a C++
            kernel that reads the weights on every thread), or the model's QuantLinear after quantize_model
        llmkern.apply_rope with the model's own cos/sin tables  (any rope_scaling the model uses, e.g. Llama-3's)
        llmkern.paged_kv_write into a PagedKVCache (one cache layer per decoder layer)
        PagedAttentionPlan.run: one plan per step (made once, from the host's block tables), run in every layer
        o projection, add_rms_norm, the MLP (Llama's gated SiLU MLP on the same linear, else the model's module)
    ->  final add_rms_norm, lm_head on each sequence's last token  ->  llmkern.sample

Continuous batching (`max_batch_size`, `max_tokens_per_step`; `_plain_loop`): a step runs the running sequences'
decode tokens and chunks of prompts in one packed batch (varlen: no padding is computed), waiting prompts join as
running ones finish. By default every prompt runs at once and the first step prefills them whole. A sequence stops
at an EOS token or after max_new_tokens; its cache blocks are then freed. Repetition controls
(`llmkern.apply_penalties`) run between lm_head and the sampler when any is on.

CUDA graphs (`cuda_graph`, default on for CUDA models; `ModelRunner.decode`): a step of decode tokens only runs
padded to a fixed batch size, on static buffers, with a plan refreshed in place; it is captured once per padded size
and replayed, from the embeddings through the sampler.

Speculative decoding (`draft_model=`, Leviathan et al., arXiv 2211.17192): each round the draft model proposes k
tokens (k decode steps on its own paged cache, drawn with `llmkern.sample` from `llmkern.sampling_probs`), the
target scores all k + 1 positions in one paged-prefill pass over its cache, `llmkern.speculative_sample` keeps a
prefix of the proposal plus one token of its own, and both caches roll back to the kept tokens
(`PagedKVCache.truncate`). The tokens follow the target's distribution exactly; greedy decoding gives the
target-only tokens.

Supported: the model types in `SUPPORTED` (Llama, Mistral with its sliding window, Qwen2 with its q/k/v biases):
pre-norm decoder layers of `input_layernorm -> self_attn -> post_attention_layernorm -> mlp` with RMSNorm. Others
raise ValueError.
"""
from __future__ import annotations

import itertools
import numbers
import sys
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
import triton

from llmkern import _utils, decoding, layers, paged_attention, sampling
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
    dtype = inner.embed_tokens.weight.dtype
    if dtype not in _utils.FLOAT_DTYPES:     # refused here, before the cache and the first forward
        raise TypeError(f"model: dtype {dtype} is not one the kernels run (float16, bfloat16, float32); convert it "
                        f"first (e.g. model.float())")


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
        mask = attention_mask.to(device=input_ids.device)
        if not bool(((mask == 0) | (mask == 1)).all()):   # one sync per call; a 2 or -1 is no "token or padding"
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
        keep = mask != 0
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
            _utils.check_tensor(f"input_ids[{i}]", p, dtypes=(torch.int32, torch.int64))  # a float one: no truncation
            prompts.append(p.to(torch.int64))
        elif isinstance(p, (list, tuple)) and all(isinstance(t, numbers.Integral) for t in p):
            prompts.append(torch.tensor(list(p), dtype=torch.int64))
        else:
            raise TypeError(f"input_ids[{i}] must be a list of ints or a 1-D tensor")
    return prompts


def _checked_prompts(model: Any, input_ids: Any, attention_mask: Any) -> list[torch.Tensor]:
    """_prompts, refusing (ValueError) no prompt, a prompt with no token, or an id outside the model's vocabulary
    (which the embedding would meet as an IndexError, a device-side assert on CUDA)."""
    prompts = _prompts(input_ids, attention_mask)
    if not prompts:
        raise ValueError("input_ids holds no prompt")
    vocab = model.model.embed_tokens.weight.shape[0]     # the rows the embedding looks ids up in
    for i, p in enumerate(prompts):
        if p.numel() == 0:
            raise ValueError(f"prompt {i} has no tokens (all padding?)")
        lo, hi = (int(v) for v in torch.aminmax(p))
        if lo < 0 or hi >= vocab:
            raise ValueError(f"input_ids: prompt {i} holds token id {lo if lo < 0 else hi}, outside the vocabulary "
                             f"[0, vocab_size={vocab})")
    return prompts


def _eos_set(eos_token_id: Any, model: Any) -> set[int]:
    if eos_token_id is None:
        gen = getattr(model, "generation_config", None)
        eos_token_id = getattr(gen, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    try:
        ids = [eos_token_id] if isinstance(eos_token_id, numbers.Integral) else list(eos_token_id)
    except TypeError:     # not iterable (a float, a 0-d tensor): refused below, by name
        ids = [eos_token_id]
    if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in ids):
        raise TypeError(f"eos_token_id must be an int or a list of ints, got {eos_token_id!r}")
    return {int(t) for t in ids}


class ModelRunner:
    """A Llama-family model's forward pass on llmkern ops over a PagedKVCache: the step `generate` runs.

    ModelRunner(model, cache, *, cuda_graph=False): model as `generate` takes it; cache a PagedKVCache with one layer
    per decoder layer, the model's KV heads, head_dim and dtype.

    Two ways to run a step. `forward` (and `feed`, which reserves the cache slots itself) runs any packed batch of
    new tokens eagerly: prompts, chunks of prompts next to decode tokens (one `PagedAttentionPlan` per step, its
    `run` in every layer), speculative verification, beam search. `decode` runs one new token per sequence through
    a fixed-shape step: the batch padded to `padded_batch_size(n)`, inputs copied into static buffers, a plan with
    cuda_graph=True refreshed in place (`plan.update`), and the whole step, from the embeddings through sampling,
    touching only those buffers. With cuda_graph=True on a CUDA model that step is captured into a CUDA graph
    once per padded size (vLLM's and SGLang's graph runners; capture on first use, after one eager warm-up run)
    and replayed; on CPU there is nothing to capture and the same padded step runs eagerly (how CI checks it).
    The rotary tables and the padded steps' block tables are sized by the longest sequence run so far (`_reach`),
    not by the cache.
    """

    def __init__(self, model: Any, cache: PagedKVCache, *, cuda_graph: bool = False):
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be a bool, got {cuda_graph!r}")
        self.model = model
        self.inner = model.model
        self.cache = cache
        cfg = model.config
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.layers = list(self.inner.layers)[: cfg.num_hidden_layers]
        self.head_dim = self.layers[0].self_attn.head_dim
        self.device = self.inner.embed_tokens.weight.device
        self._check_cache(cache)
        self.windows = []
        for layer in self.layers:
            attn = layer.self_attn
            # Qwen2 sets self_attn.sliding_window per layer (None on full layers); Mistral only has the config's.
            w = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(cfg, "sliding_window", None)
            # HF keeps key j for query i when j > i - w (masking_utils.sliding_window_overlay): left window w - 1
            self.windows.append((-1, -1) if w is None else (int(w) - 1, 0))
        self._layer_steps = [_LayerStep(layer, cfg) for layer in self.layers]
        self._lm_head = _projection(model.lm_head)
        # the cache's per-layer views, made once (the cache never reallocates its blocks)
        self._kv = [(cache.k_cache(i), cache.v_cache(i)) for i in range(len(self.layers))]
        self.cuda_graph = cuda_graph
        self._steps: dict[tuple, _DecodeStep] = {}
        # The model's own rotary tables (any rope_scaling included) for positions [0, reach); a step gathers its rows
        # (vLLM's cos/sin cache). Dynamic-NTK scaling depends on the longest position seen so far, so those models
        # compute their tables per step, and are not captured (the rotary module reads the positions' maximum on the
        # host).
        rope = getattr(cfg, "rope_scaling", None) or getattr(cfg, "rope_parameters", None)
        self._dynamic_rope = isinstance(rope, dict) and "dynamic" in str(rope.get("rope_type", rope.get("type")))
        self._rope = None
        self._reach_blocks = 0
        self.capture = cuda_graph and self.device.type == "cuda" and not self._dynamic_rope

    def _check_cache(self, cache: PagedKVCache) -> None:
        """The cache must hold this model's K/V (class docstring): else TypeError/ValueError naming it, here rather
        than at the first step, where the mismatch surfaces as a layer index or a K shape."""
        if not isinstance(cache, PagedKVCache):
            raise TypeError(f"cache must be a PagedKVCache, got {type(cache).__name__}")
        dtype = self.inner.embed_tokens.weight.dtype
        if cache.dtype != dtype:
            raise TypeError(f"cache has dtype {cache.dtype}; this runner keeps K/V in the model's dtype {dtype}")
        have = (cache.num_layers, cache.num_kv_heads, cache.head_dim)
        if have[0] < len(self.layers) or have[1:] != (self.num_kv_heads, self.head_dim):
            raise ValueError(f"cache has (num_layers, num_kv_heads, head_dim) = {have}; the model needs at least "
                             f"{len(self.layers)} layers of {self.num_kv_heads} KV heads of head_dim {self.head_dim}")

    def _check_tokens(self, name: str, tokens: Sequence[int]) -> None:
        """ValueError naming `name` for a token id outside the embedding's rows (host ints: no sync), before the
        cache changes; the embedding would raise an IndexError (on CUDA, a device-side assert) after the append."""
        vocab = self.inner.embed_tokens.weight.shape[0]
        bad = next((t for t in tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"{name}: token id {bad} is outside the vocabulary [0, vocab_size={vocab})")

    # ------------------------------------------------------------------------------------------------ the model
    def _plan(self, block_tables: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor | None,
              **capacity: Any) -> paged_attention.PagedAttentionPlan:
        cache = self.cache
        return paged_attention.PagedAttentionPlan(
            block_tables, seq_lens, cu_seqlens_q, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, num_blocks=cache.num_blocks, block_size=cache.block_size, dtype=cache.dtype,
            device=self.device, **capacity)

    def _reach(self, longest: int) -> None:
        """Size the rotary tables and the decode steps' block-table width for sequences of `longest` tokens: a power
        of two of blocks, at least MIN_REACH_BLOCKS, at most the cache's, growing (never shrinking) with the longest
        sequence run, rather than sized by the cache (a large cache's every position and block would cost memory
        for tables no sequence reaches). Growing rebuilds the decode steps: their plans' width and their CUDA graphs
        (which read the old tables) are fixed. Host work only, a comparison when nothing grows."""
        blocks = _utils.cdiv(longest, self.cache.block_size)
        if blocks <= self._reach_blocks:
            return
        self._reach_blocks = min(self.cache.num_blocks, _utils.pow2_at_least(blocks, MIN_REACH_BLOCKS))
        if not self._dynamic_rope:
            self._rope = self._rotary(torch.arange(self._reach_blocks * self.cache.block_size, device=self.device))
        self._steps.clear()

    def _host_tables(self, seq_ids: Sequence[Any], width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """int32 CPU block tables (len(seq_ids), width: default the longest row) and seq_lens: the plan reads them
        without a device sync."""
        rows = [self.cache.block_table(i) for i in seq_ids]
        width = max([len(r) for r in rows] + [1]) if width is None else width
        bt = torch.zeros(len(rows), width, dtype=torch.int32)
        for b, r in enumerate(rows):
            bt[b, :len(r)] = torch.tensor(r, dtype=torch.int32)
        lens = torch.tensor([self.cache.seq_len(i) for i in seq_ids], dtype=torch.int32)
        return bt, lens

    @torch.no_grad()
    def _body(self, tokens: torch.Tensor, positions: torch.Tensor, plan: paged_attention.PagedAttentionPlan,
              slots: torch.Tensor, attn_out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder layers over packed tokens: (hidden, residual) of every row, before the final norm. Device
        work only (no host sync): what a CUDA graph captures. Without autograd (llmkern's ops have no backward), so
        that the step may work in place on its own intermediate tensors (RoPE, the MLP's activation)."""
        hidden = self.inner.embed_tokens(tokens)                                   # (T, hidden)
        if self._rope is None:
            cos, sin = self._rotary(positions)
        else:
            cos, sin = (t.index_select(0, positions) for t in self._rope)
        total = tokens.shape[0]
        residual = None
        for i, step in enumerate(self._layer_steps):
            if residual is None:
                residual = hidden
                x = layers.rms_norm(hidden, *step.input_norm)
            else:
                x, residual = layers.add_rms_norm(hidden, residual, *step.input_norm)
            q = step.q_proj(x).view(total, self.num_heads, self.head_dim)
            k = step.k_proj(x).view(total, self.num_kv_heads, self.head_dim)
            v = step.v_proj(x).view(total, self.num_kv_heads, self.head_dim)
            layers.apply_rope(q, k, cos=cos, sin=sin, inplace=True)    # q, k: this step's own new tensors
            k_cache, v_cache = self._kv[i]
            paged_attention.paged_kv_write(k, v, k_cache, v_cache, slots)
            o = plan.run(q, k_cache, v_cache, causal=True, scale=step.scale, window=self.windows[i], out=attn_out)
            hidden = step.o_proj(o.reshape(total, self.num_heads * self.head_dim))
            x, residual = layers.add_rms_norm(hidden, residual, *step.post_norm)
            hidden = step.mlp(x)
        return hidden, residual

    def _rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's rotary cos and sin at these positions, (len(positions), head_dim) each."""
        like = self.inner.embed_tokens.weight[:1][None]        # only its dtype and device are read
        cos, sin = self.inner.rotary_emb(like, positions[None])
        return cos[0], sin[0]

    def _logits(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        norm = self.inner.norm
        x, _ = layers.add_rms_norm(hidden, residual, norm.weight, norm.variance_epsilon)
        return self._lm_head(x).float()

    # ------------------------------------------------------------------------------------------------ eager steps
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, seq_ids: list[int], q_lens: list[int],
                slots: torch.Tensor, *, all_logits: bool = False) -> torch.Tensor:
        """Run packed new tokens (their K/V slots already reserved) through the model; logits of each sequence's
        last new token, (len(seq_ids), vocab) float32, or with all_logits those of every new token (total, vocab).
        positions (total,) int64 on the model's device: each below its sequence's cached length (which sizes the
        rotary tables). Any mixture of prompt chunks and decode tokens: one plan for the step, run in every layer."""
        block_tables, seq_lens = self._host_tables(seq_ids)
        self._reach(int(seq_lens.max()))
        cu_q = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
        cu_q[1:] = torch.cumsum(torch.tensor(q_lens, dtype=torch.int32), 0)
        plan = self._plan(block_tables, seq_lens, cu_q)
        hidden, residual = self._body(tokens, positions, plan, slots, None)
        if not all_logits:
            last = _utils.to_device(torch.tensor([n - 1 for n in itertools.accumulate(q_lens)]), tokens.device)
            hidden, residual = hidden[last], residual[last]
        return self._logits(hidden, residual)

    def feed(self, seqs: dict[int, list[int]], all_logits: bool = False) -> torch.Tensor:
        """Append each sequence's tokens past its cached length (seqs: id -> all its tokens) and run them: prefill
        for several tokens, decode for one each. Returns `forward`'s logits. ValueError (before the cache changes)
        for no sequences or a sequence with no token past its cached length (there is nothing to run for it), or a
        token id outside [0, vocab_size)."""
        ids = list(seqs)
        lens = [self.cache.seq_len(i) if i in self.cache else 0 for i in ids]
        new = [seqs[i][n:] for i, n in zip(ids, lens)]
        if not ids or not all(new):
            raise ValueError(f"seqs: every sequence needs at least one token past its cached length; got new-token "
                             f"counts {[len(t) for t in new]}")
        self._check_tokens("seqs", [t for ts in new for t in ts])
        slots = torch.cat([self.cache.append(i, len(t)) for i, t in zip(ids, new)])
        tokens = _utils.to_device(torch.tensor([t for ts in new for t in ts], dtype=torch.int64), self.device)
        positions = _utils.to_device(torch.cat([torch.arange(n, n + len(t)) for n, t in zip(lens, new)]), self.device)
        return self.forward(tokens, positions, ids, [len(t) for t in new], slots, all_logits=all_logits)

    # ------------------------------------------------------------------------------------------------ decode steps
    def decode(self, seq_ids: Sequence[Any], tokens: Sequence[int], *, sampling_params: dict | None = None,
               seeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One new token per sequence through the fixed-shape step (class docstring): appends one cache slot to each
        of seq_ids (tokens[b] is the token fed for seq_ids[b], at position seq_len), runs the step, and returns
        (logits (n, vocab) float32, drawn tokens int64 (n,) or None), views of the step's static buffers (valid until
        the next `decode` of the same padded size).

        sampling_params: llmkern.sample's temperature/top_k/top_p/min_p (numbers, checked with
        llmkern.sampling.check_params); given, the step also draws the tokens (inside the graph); seeds: int64 CPU
        (n,) seeds for those draws (default 0: greedy needs none). The host work (tables, plan.update, one
        host-to-device copy of tokens, positions and seeds) never waits for the device. ValueError (before the cache
        changes) for a token id outside [0, vocab_size)."""
        n = len(seq_ids)
        if n == 0 or len(tokens) != n:
            raise ValueError(f"decode: one token per sequence, got {len(tokens)} tokens for {n} sequences")
        self._check_tokens("tokens", tokens)
        positions = [self.cache.seq_len(i) if i in self.cache else 0 for i in seq_ids]
        self._reach(max(positions) + 1)
        key = (padded_batch_size(n), None if sampling_params is None else tuple(sorted(sampling_params.items())))
        step = self._steps.get(key)
        if step is None:
            step = self._steps[key] = _DecodeStep(self, key[0], sampling_params)
        for i in seq_ids:
            self.cache.append(i, 1)
        step.prepare(*self._host_tables(seq_ids, step.plan.max_blocks_per_seq), tokens, positions, seeds)
        step.run()
        return step.logits[:n], None if step.drawn is None else step.drawn[:n]


# Hugging Face's gated MLPs whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)) (LlamaMLP.forward and its
# copies in the Mistral and Qwen2 modeling files): `_LayerStep` runs that expression itself when the activation is
# SiLU (config.hidden_act "silu", these models' setting), in place on the gate's output.
_GATED_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP")


def _hooked(module: torch.nn.Module) -> bool:
    """Whether calling the module runs hooks (accelerate's offloading moves weights in them): then it is called."""
    return bool(module._forward_hooks or module._forward_pre_hooks or torch.nn.modules.module._global_forward_hooks
                or torch.nn.modules.module._global_forward_pre_hooks)


def _projection(module: torch.nn.Module):
    """x -> module(x): llmkern.layers.linear on a plain nn.Linear's own weight and bias (F.linear's result; on CPU
    at decode shapes the C++ kernel that reads the weight on every thread, where torch's F.linear uses one; and no
    nn.Module call machinery, about 2 us per call on a 2-core CPU, 8 calls per layer), the module itself otherwise
    (llmkern QuantLinear, subclasses, hooked modules)."""
    if type(module) is not torch.nn.Linear or _hooked(module):
        return module
    weight, bias = module.weight, module.bias
    return lambda x: layers.linear(x, weight, bias)


class _LayerStep:
    """What ModelRunner's step calls for one decoder layer, resolved once per runner: the projections
    (`_projection`), the norms' (weight, eps), the attention scale and the MLP (the gated SiLU expression of
    _GATED_MLPS with the gate's activation in place, else the model's own mlp module)."""

    def __init__(self, layer: torch.nn.Module, cfg: Any):
        attn = layer.self_attn
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            _projection(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
        self.scale = attn.scaling
        self.input_norm = (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        self.post_norm = (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
        mlp = layer.mlp
        if type(mlp).__name__ in _GATED_MLPS and getattr(cfg, "hidden_act", None) == "silu" and not _hooked(mlp):
            gate, up, down = (_projection(m) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
            self.mlp = lambda x: down(F.silu(gate(x), inplace=True).mul_(up(x)))
        else:
            self.mlp = mlp


# The fewest blocks ModelRunner sizes its rotary tables and decode plans for (`ModelRunner._reach`): short
# sequences then never rebuild them (16 blocks of 16 tokens: 256 positions, a few KB of tables).
MIN_REACH_BLOCKS = 16


def padded_batch_size(n: int) -> int:
    """The batch size a decode step of n sequences is padded to (one CUDA graph each): powers of two up to 32, then
    multiples of 32 (vLLM captures 1, 2, 4 and then every multiple of 8; coarser buckets keep the capture count
    small: padding wastes less than half a step below 32 and less than 32 rows above)."""
    return triton.next_power_of_2(n) if n <= 32 else _utils.cdiv(n, 32) * 32


class _DecodeStep:
    """The fixed-shape decode step of one padded batch size: static input buffers, a cuda_graph plan sized for them,
    the outputs, and (on CUDA, with capture on) the CUDA graph that replays the whole step."""

    def __init__(self, runner: ModelRunner, size: int, sampling_params: dict | None):
        self.runner, self.size = runner, size
        device = runner.device
        # tokens | positions | seeds: one int64 buffer, so a step's inputs cost one host-to-device copy
        self.inputs = torch.zeros(3, size, dtype=torch.int64, device=device)
        self.tokens, self.positions, self.seeds = self.inputs
        # Attention output rows past the batch are never written by the plan: zeroed once, they stay finite.
        self.attn_out = torch.zeros(size, runner.num_heads, runner.head_dim, dtype=runner.cache.dtype, device=device)
        # A one-sequence stand-in step to build the plan; prepare() replaces it before the first run.
        self.plan = runner._plan(torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), None,
                                 max_batch_size=size, max_num_tokens=size,
                                 max_blocks_per_seq=runner._reach_blocks, cuda_graph=True)
        self.params = None if sampling_params is None else \
            sampling.SamplingParams(**sampling_params, batch=size, device=device)
        self.graph = None
        self.logits = self.drawn = None

    def prepare(self, block_tables: torch.Tensor, seq_lens: torch.Tensor, tokens: Sequence[int],
                positions: Sequence[int], seeds: torch.Tensor | None) -> None:
        """Host side: the plan refreshed in place and the inputs copied into the static buffers (rows past the
        batch get token 0 at position 0: padding, whose K/V the plan's slot_mapping never writes and whose results
        are never read)."""
        n = len(tokens)
        self.plan.update(block_tables, seq_lens)
        stage = torch.zeros(3, self.size, dtype=torch.int64)
        stage[0, :n] = torch.tensor(list(tokens), dtype=torch.int64)
        stage[1, :n] = torch.tensor(list(positions), dtype=torch.int64)
        if seeds is not None:
            stage[2, :n] = seeds
        _utils.copy_async(self.inputs, stage)

    def body(self) -> None:
        """Device side: the whole step on the static buffers (no host sync, no shape that depends on the batch)."""
        r = self.runner
        hidden, residual = r._body(self.tokens, self.positions, self.plan, self.plan.slot_mapping, self.attn_out)
        self.logits = r._logits(hidden, residual)
        if self.params is not None:   # checked once, at construction: sample() with them and a seed tensor is sync-free
            self.drawn = sampling.sample(self.logits, params=self.params, seed=self.seeds)

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        self.body()
        if self.runner.capture:
            self._capture()

    def _capture(self) -> None:
        """Capture the step (its eager run just warmed it up: Triton compiled, cuBLAS initialized). The capture
        executes nothing and its outputs are new tensors of the graph's memory pool, so one replay of the same step
        fills them (rewriting the same K/V into the same slots). A host sync inside the step makes the capture raise
        (CUDA refuses it), so a step that syncs cannot go unnoticed here."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):     # synchronizes, then records on a side stream
            self.body()
        self.graph = graph
        graph.replay()   # the captured outputs are new buffers: fill them (the same step again, same values)


@dataclass
class GenerateStats:
    """What one `generate` call did (returned with return_stats=True)."""
    target_passes: int = 0      # forward passes of the target model, prefill included
    draft_tokens: int = 0       # tokens the draft model proposed (speculative decoding)
    accepted_tokens: int = 0    # proposed tokens that llmkern.speculative_sample accepted

    @property
    def acceptance_rate(self) -> float:
        """accepted_tokens / draft_tokens (NaN without a draft model): FlashInfer's and vLLM's draft acceptance
        rate. A round emits accepted + 1 tokens for one target pass."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else float("nan")


class _Sampler:
    """One step's choice of tokens: the repetition controls (when any is on), then llmkern.sample, with per-row
    seeds drawn from a generator seeded once per generate() call (or none: llmkern.sample draws its own)."""

    def __init__(self, sampling: dict, penalties: dict, seed: int | None, device: torch.device):
        self.sampling = sampling
        self.penalties = penalties if decoding.penalties_active(**penalties) else None
        self.rng = torch.Generator().manual_seed(seed) if seed is not None else None
        self.device = device

    def seeds(self, n: int) -> torch.Tensor | None:
        if self.rng is None:
            return None
        return self.host_seeds(n).to(self.device)

    def host_seeds(self, n: int) -> torch.Tensor:
        """int64 CPU (n,): the next n per-row seeds (from torch's default generator when no seed was given, as
        llmkern.sample draws them itself)."""
        return torch.randint(0, _SEED_MAX, (n,), generator=self.rng, dtype=torch.int64)

    def scores(self, logits: torch.Tensor, histories: list[list[int]]) -> torch.Tensor:
        """The logits the sampler sees: penalized by each row's history (prompt + tokens so far) when a control is
        on."""
        if self.penalties is None:
            return logits
        ids = torch.full((len(histories), max(map(len, histories))), -1, dtype=torch.int64)
        for row, h in enumerate(histories):
            ids[row, :len(h)] = torch.tensor(h)
        return decoding.apply_penalties(logits, ids.to(self.device), **self.penalties)

    def draw(self, scores: torch.Tensor) -> list[int]:
        return _valid(sampling.sample(scores, seed=self.seeds(scores.shape[0]), **self.sampling).tolist())


def _valid(tokens: list[int]) -> list[int]:
    if any(t < 0 for t in tokens):
        raise RuntimeError("llmkern.generate: NaN/inf logits (from the model, or the repetition controls pushed a "
                           "logit to +inf): the sampler returned -1")
    return tokens


def _new_cache(model: Any, prompts: list[torch.Tensor], extra_tokens: int, block_size: int,
               max_batch_size: int | None = None) -> PagedKVCache:
    """A cache with enough blocks for any max_batch_size sequences (default all) at their longest (prompt +
    extra_tokens) at once: the most blocks a batch of running sequences can hold, so never a CacheFullError."""
    weight = model.model.embed_tokens.weight
    cfg = model.config
    needs = sorted((_utils.cdiv(p.numel() + extra_tokens, block_size) for p in prompts), reverse=True)
    num_blocks = sum(needs[:max_batch_size])
    return PagedKVCache(cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads,
                                model.model.layers[0].self_attn.head_dim, dtype=weight.dtype, device=weight.device)


class _Sequences:
    """The running sequences of one generate() call: all tokens (prompt + new), the new ones, the stop rules."""

    def __init__(self, prompts: list[torch.Tensor], max_new_tokens: int, eos: set[int]):
        self.tokens = {i: p.tolist() for i, p in enumerate(prompts)}       # running sequences only
        self.new: list[list[int]] = [[] for _ in prompts]
        self.max_new_tokens = max_new_tokens
        self.eos = eos

    def emit(self, i: int, tokens: list[int]) -> bool:
        """Append tokens to sequence i up to its stop (EOS, max_new_tokens); True when it stopped."""
        for t in tokens:
            self.tokens[i].append(t)
            self.new[i].append(t)
            if t in self.eos or len(self.new[i]) == self.max_new_tokens:
                del self.tokens[i]
                return True
        return False


@torch.no_grad()
def generate(model: Any, input_ids: Any, *, attention_mask: torch.Tensor | None = None, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
             repetition_penalty: float = 1.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
             logit_bias: torch.Tensor | None = None, seed: int | None = None,
             eos_token_id: int | Sequence[int] | None = None, block_size: int = BLOCK_SIZE,
             draft_model: Any = None, num_speculative_tokens: int = 4, max_batch_size: int | None = None,
             max_tokens_per_step: int | None = None, cuda_graph: bool | None = None, return_stats: bool = False):
    """Generate up to max_new_tokens tokens per prompt with llmkern kernels; see the module docstring.

    model: a Hugging Face Llama/Mistral/Qwen2 *ForCausalLM (any dtype and device the kernels support; its Linear
      layers may be llmkern QuantLinear from `llmkern.quantize_model`).
    input_ids: a (batch, seqlen) int tensor, with `attention_mask` (1 = token, 0 = padding, any side; other values
      raise ValueError) when prompts have different lengths; or a list of token-id lists (or 1-D tensors) of any
      lengths. Ids must be in [0, vocab_size) (ValueError naming input_ids).
    temperature/top_k/top_p/min_p: llmkern.sample's parameters; temperature 0 (the default) is greedy.
    repetition_penalty/presence_penalty/frequency_penalty (numbers) and logit_bias (a (vocab,) float tensor, not
      all -inf):
      llmkern.apply_penalties' controls, counted over each sequence's prompt and generated tokens (transformers'
      repetition penalty sees the same, except that it also counts the pad ids of a padded batch), applied before
      the sampler.
    seed: an int in [-2**63, 2**64) (torch.Generator's seeds): makes sampling reproducible (each step draws
      per-sequence seeds from a generator seeded with it).
    eos_token_id: an int or list of ints (default: model.generation_config.eos_token_id); a sequence stops after
      emitting one of them.
    block_size: the KV cache's page size in tokens, a power of two (PagedKVCache).
    draft_model: a smaller model of a supported type with the same vocabulary: speculative decoding, proposing
      num_speculative_tokens (1..15) tokens per round (module docstring). Same output distribution as without it;
      with greedy settings, the same tokens.
    max_batch_size: at most this many sequences run at once (default: every prompt); the others wait and are
      admitted as running ones finish. The cache is sized for the longest max_batch_size sequences.
    max_tokens_per_step: at most this many new tokens per model step (default: no bound, so the first step
      prefills every admitted prompt whole). Decode tokens come first; prompts are cut into chunks that fill the
      rest and share steps with the decode tokens (chunked prefill). Both are continuous batching (`_plain_loop`);
      with greedy settings a sequence's tokens do not depend on them.
    cuda_graph: decode steps (one new token per sequence) run as a fixed-shape step padded to
      `padded_batch_size`, captured as a CUDA graph per padded size and replayed (`ModelRunner`), sampling
      included (unless a repetition control is on: then the graph ends at the logits). Default: on for a CUDA
      model, off on CPU; True on CPU runs the same padded step without capture. Same tokens either way.
      Speculative decoding (draft_model) runs its steps eagerly and takes none of these three.
    return_stats: also return a GenerateStats (target passes, proposed and accepted draft tokens, acceptance rate).
    Returns, per prompt, the list of new token ids (ending with the EOS token when one stopped it); with
    return_stats, (that list, GenerateStats).
    """
    _check_model(model)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral):
        raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    if seed is not None and not -2 ** 63 <= seed < 2 ** 64:    # what torch.Generator.manual_seed takes
        raise ValueError(f"seed must be in [-2**63, 2**64), got {seed}")
    block_size = _check_bound("block_size", block_size, BLOCK_SIZE)   # a power of two: PagedKVCache's check
    prompts = _checked_prompts(model, input_ids, attention_mask)
    eos = _eos_set(eos_token_id, model)
    sampling.check_params(temperature, top_k, top_p, min_p)   # refused here, not after the first forward
    device = model.model.embed_tokens.weight.device
    penalties = _check_penalties(model, device, repetition_penalty=repetition_penalty,
                                 presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                 logit_bias=logit_bias)
    k = _check_draft(draft_model, model, num_speculative_tokens)
    max_batch_size = _check_bound("max_batch_size", max_batch_size, len(prompts))
    max_tokens_per_step = _check_bound("max_tokens_per_step", max_tokens_per_step, None)
    if cuda_graph is not None and not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be a bool or None, got {cuda_graph!r}")
    if draft_model is not None and (max_batch_size < len(prompts) or max_tokens_per_step is not None or cuda_graph):
        raise ValueError("max_batch_size, max_tokens_per_step and cuda_graph are not supported with draft_model "
                         "(speculative decoding runs every prompt at once, eagerly)")
    sampler = _Sampler(dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p), penalties, seed, device)
    seqs = _Sequences(prompts, max_new_tokens, eos)
    stats = GenerateStats()
    # Speculation may run k + 1 tokens past the end before the surplus is cut: room for them too.
    extra = max_new_tokens + (k + 1 if draft_model is not None else 0)
    if draft_model is None:
        graphs = device.type == "cuda" if cuda_graph is None else cuda_graph
        target = ModelRunner(model, _new_cache(model, prompts, extra, block_size, max_batch_size), cuda_graph=graphs)
        _plain_loop(target, sampler, seqs, stats, max_batch_size, max_tokens_per_step or sys.maxsize)
    else:
        target = ModelRunner(model, _new_cache(model, prompts, extra, block_size))
        draft = ModelRunner(draft_model, _new_cache(draft_model, prompts, extra, block_size))
        _speculative_loop(target, draft, sampler, seqs, k, stats)
    return (seqs.new, stats) if return_stats else seqs.new


def _check_penalties(model: Any, device: torch.device, **penalties: Any) -> dict:
    """The repetition controls, checked once before the model runs (llmkern.apply_penalties' own checks)."""
    for name in ("repetition_penalty", "presence_penalty", "frequency_penalty"):
        value = penalties[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number in generate (one value for every sequence), got {value!r}")
    bias = penalties["logit_bias"]
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.dim() != 1):
        raise ValueError("logit_bias must be a (vocab,) float tensor in generate (one row for every sequence)")
    decoding.penalty_params(1, model.config.vocab_size, device, **penalties)
    if bias is not None and bool((bias == float("-inf")).all()):
        raise ValueError("logit_bias bans every token (all -inf): no token could be generated")
    return penalties


def _check_bound(name: str, value: Any, default: int | None) -> int | None:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int or None, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _check_draft(draft_model: Any, model: Any, k: Any) -> int:
    if draft_model is None:
        return 0
    _check_model(draft_model)
    if draft_model.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"draft_model must share the target's vocabulary: vocab_size {draft_model.config.vocab_size}"
                         f" != {model.config.vocab_size}")
    if draft_model.model.embed_tokens.weight.device != model.model.embed_tokens.weight.device:
        raise ValueError("draft_model must be on the target model's device")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= decoding.MAX_DRAFT_TOKENS:
        raise ValueError(f"num_speculative_tokens must be an int in [1, {decoding.MAX_DRAFT_TOKENS}], got {k!r}")
    return int(k)


def _plain_loop(target: ModelRunner, sampler: _Sampler, seqs: _Sequences, stats: GenerateStats,
                max_batch_size: int, max_tokens_per_step: int) -> None:
    """Continuous batching (Orca's iteration-level scheduling, vLLM's chunked prefill): every step runs at most
    max_batch_size sequences and max_tokens_per_step new tokens. The running sequences' decode tokens are scheduled
    first, one each, in admission order; the rest of the budget goes to prompt chunks (the unfed part of a prompt,
    cut to what is left), in admission order; a waiting prompt is admitted when a running sequence finishes and
    frees its seat. A step of decode tokens only goes through `ModelRunner.decode` when the runner has
    cuda_graph on (the padded, graph-replayed step), else through `ModelRunner.feed`; a step with prompt chunks is
    one mixed batch through `feed` (one plan: the chunks and the decode tokens in one launch per layer). A sequence
    draws its next token once its prompt is fed; its chunks are each causal over its cached prefix, so its tokens do
    not depend on what shares its steps (greedy: the same tokens as alone, up to floating-point summation order)."""
    waiting = deque(seqs.tokens)
    running: list[int] = []
    graph_sampling = sampler.sampling if sampler.penalties is None else None   # drawn inside the step
    while waiting or running:
        while waiting and len(running) < max_batch_size:
            running.append(waiting.popleft())
        fed = {i: target.cache.seq_len(i) if i in target.cache else 0 for i in running}
        pending = {i: len(seqs.tokens[i]) - fed[i] for i in running}
        chunks, budget = {}, max_tokens_per_step
        for i in sorted(running, key=lambda i: pending[i] > 1):     # stable: decode tokens, then prompt chunks
            if budget == 0:
                break
            chunks[i] = min(pending[i], budget)
            budget -= chunks[i]
        ids = list(chunks)
        stats.target_passes += 1
        if target.cuda_graph and all(n == 1 for n in chunks.values()):
            seeds = sampler.host_seeds(len(ids)) if graph_sampling is not None else None
            logits, drawn = target.decode(ids, [seqs.tokens[i][-1] for i in ids], sampling_params=graph_sampling,
                                          seeds=seeds)
            done = ids
        else:
            logits = target.feed({i: seqs.tokens[i][:fed[i] + chunks[i]] for i in ids})
            rows = [b for b, i in enumerate(ids) if chunks[i] == pending[i]]   # prompts fed in full
            done, drawn = [ids[b] for b in rows], None
            if len(rows) != len(ids):
                logits = logits[torch.tensor(rows, dtype=torch.int64, device=logits.device)]
        if not done:
            continue
        tokens = _valid(drawn.tolist()) if drawn is not None else \
            sampler.draw(sampler.scores(logits, [seqs.tokens[i] for i in done]))
        for i, t in zip(done, tokens):
            if seqs.emit(i, [t]):
                target.cache.free(i)
                running.remove(i)


def _speculative_loop(target: ModelRunner, draft: ModelRunner, sampler: _Sampler, seqs: _Sequences, k: int,
                      stats: GenerateStats) -> None:
    """The target's prefill draws the first token; then rounds of k draft proposals and one verification pass.

    Cache invariant at the start of a round: the target holds every token of a sequence but its last; the draft
    holds a prefix of that (it never ran the last proposal of a fully accepted round), and feeds what it lacks.
    """
    logits = target.feed(seqs.tokens)
    stats.target_passes += 1
    for i, t in zip(list(seqs.tokens), sampler.draw(sampler.scores(logits, list(seqs.tokens.values())))):
        if seqs.emit(i, [t]):
            target.cache.free(i)
    while seqs.tokens:
        ids = list(seqs.tokens)
        lens = [len(seqs.tokens[i]) for i in ids]
        ext = {i: list(seqs.tokens[i]) for i in ids}          # the tokens plus the proposals so far
        draft_probs = []
        for _ in range(k):
            scores = sampler.scores(draft.feed(ext), list(ext.values()))
            draft_probs.append(sampling.sampling_probs(scores, **sampler.sampling))
            for i, t in zip(ids, sampler.draw(scores)):
                ext[i].append(t)
        # One pass of the target over [last token, k proposals]: the distributions at all k + 1 positions.
        logits = target.feed(ext, all_logits=True)
        stats.target_passes += 1
        histories = [ext[i][:n + j] for i, n in zip(ids, lens) for j in range(k + 1)]
        target_probs = sampling.sampling_probs(sampler.scores(logits, histories), **sampler.sampling)
        proposals = torch.tensor([ext[i][n:] for i, n in zip(ids, lens)], dtype=torch.int64, device=logits.device)
        tokens, accepted = decoding.speculative_sample(torch.stack(draft_probs, 1), proposals,
                                                      target_probs.view(len(ids), k + 1, -1),
                                                      seed=sampler.seeds(len(ids)))
        for i, row, a in zip(ids, tokens.tolist(), accepted.tolist()):
            stats.draft_tokens += k
            stats.accepted_tokens += a
            if seqs.emit(i, _valid(row[:a + 1])):
                target.cache.free(i)
                draft.cache.free(i)
            else:   # roll both caches back to the kept tokens (all but the last, which the next round feeds)
                kept = len(seqs.tokens[i]) - 1
                target.cache.truncate(i, kept)
                draft.cache.truncate(i, min(draft.cache.seq_len(i), kept))
