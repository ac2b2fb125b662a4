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
batch shrinks. Repetition controls (`llmkern.apply_penalties`) run between lm_head and the sampler when any is on.

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

import numbers
from dataclasses import dataclass
from typing import Any, Sequence

import torch

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
    reserved (cache.append); the end-to-end benchmark times it. `feed` reserves the slots itself, for sequences
    given as all their tokens (generate's loops and llmkern.beam_search use it).
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
                slots: torch.Tensor, *, all_logits: bool = False) -> torch.Tensor:
        """Run packed new tokens (their K/V slots already reserved) through the model; logits of each sequence's
        last new token, (len(seq_ids), vocab) float32, or with all_logits those of every new token (total, vocab)."""
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
        if not all_logits:
            last = cu_q[1:].long() - 1
            hidden, residual = hidden[last], residual[last]
        norm = self.inner.norm
        x, _ = layers.add_rms_norm(hidden, residual, norm.weight, norm.variance_epsilon)
        return self.model.lm_head(x).float()

    def feed(self, seqs: dict[int, list[int]], all_logits: bool = False) -> torch.Tensor:
        """Append each sequence's tokens past its cached length (seqs: id -> all its tokens) and run them: prefill
        for several tokens, decode for one each. Returns `forward`'s logits."""
        ids = list(seqs)
        lens = [self.cache.seq_len(i) if i in self.cache else 0 for i in ids]
        new = [seqs[i][n:] for i, n in zip(ids, lens)]
        slots = torch.cat([self.cache.append(i, len(t)) for i, t in zip(ids, new)])
        device = self.model.model.embed_tokens.weight.device
        tokens = torch.tensor([t for ts in new for t in ts], dtype=torch.int64, device=device)
        positions = torch.cat([torch.arange(n, n + len(t)) for n, t in zip(lens, new)]).to(device)
        return self.forward(tokens, positions, ids, [len(t) for t in new], slots, all_logits=all_logits)


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
        return torch.randint(0, _SEED_MAX, (n,), generator=self.rng, dtype=torch.int64).to(self.device)

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


def _new_cache(model: Any, prompts: list[torch.Tensor], extra_tokens: int, block_size: int) -> PagedKVCache:
    """A cache with enough blocks for every sequence at its longest (prompt + extra_tokens): no CacheFullError."""
    weight = model.model.embed_tokens.weight
    cfg = model.config
    num_blocks = sum(_utils.cdiv(p.numel() + extra_tokens, block_size) for p in prompts)
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
             draft_model: Any = None, num_speculative_tokens: int = 4, return_stats: bool = False):
    """Generate up to max_new_tokens tokens per prompt with llmkern kernels; see the module docstring.

    model: a Hugging Face Llama/Mistral/Qwen2 *ForCausalLM (any dtype and device the kernels support; its Linear
      layers may be llmkern QuantLinear from `llmkern.quantize_model`).
    input_ids: a (batch, seqlen) int tensor, with `attention_mask` (1 = token, 0 = padding, any side) when prompts
      have different lengths; or a list of token-id lists (or 1-D tensors) of any lengths. Ids must be in
      [0, vocab_size) (ValueError naming input_ids).
    temperature/top_k/top_p/min_p: llmkern.sample's parameters; temperature 0 (the default) is greedy.
    repetition_penalty/presence_penalty/frequency_penalty (numbers) and logit_bias (a (vocab,) float tensor):
      llmkern.apply_penalties' controls, counted over each sequence's prompt and generated tokens (transformers'
      repetition penalty sees the same, except that it also counts the pad ids of a padded batch), applied before
      the sampler.
    seed: makes sampling reproducible (each step draws per-sequence seeds from a generator seeded with it).
    eos_token_id: an int or list of ints (default: model.generation_config.eos_token_id); a sequence stops after
      emitting one of them.
    draft_model: a smaller model of a supported type with the same vocabulary: speculative decoding, proposing
      num_speculative_tokens (1..15) tokens per round (module docstring). Same output distribution as without it;
      with greedy settings, the same tokens.
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
    eos = _eos_set(eos_token_id, model)
    sampling.check_params(temperature, top_k, top_p, min_p)   # refused here, not after the first forward
    device = model.model.embed_tokens.weight.device
    penalties = _check_penalties(model, device, repetition_penalty=repetition_penalty,
                                 presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                 logit_bias=logit_bias)
    k = _check_draft(draft_model, model, num_speculative_tokens)
    sampler = _Sampler(dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p), penalties, seed, device)
    seqs = _Sequences(prompts, max_new_tokens, eos)
    stats = GenerateStats()
    # Speculation may run k + 1 tokens past the end before the surplus is cut: room for them too.
    extra = max_new_tokens + (k + 1 if draft_model is not None else 0)
    target = ModelRunner(model, _new_cache(model, prompts, extra, block_size))
    if draft_model is None:
        _plain_loop(target, sampler, seqs, stats)
    else:
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
    return penalties


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


def _plain_loop(target: ModelRunner, sampler: _Sampler, seqs: _Sequences, stats: GenerateStats) -> None:
    """Prefill every prompt in one pass, then one token per running sequence per step."""
    while seqs.tokens:
        ids = list(seqs.tokens)
        logits = target.feed(seqs.tokens)
        stats.target_passes += 1
        for i, t in zip(ids, sampler.draw(sampler.scores(logits, list(seqs.tokens.values())))):
            if seqs.emit(i, [t]):
                target.cache.free(i)


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
