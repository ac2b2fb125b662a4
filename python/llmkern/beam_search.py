"""`llmkern.beam_search`: beam search for Llama-family Hugging Face models on llmkern's kernels and paged KV cache,
with transformers' semantics: the same sequences and scores as `model.generate(num_beams=n, do_sample=False)`.

One step, for every prompt still searching (all prompts' beams run as one batch):
  the running beams' newest tokens -> the model (llmkern.generate's runner: one decode token per beam)
  -> llmkern.beam_topk: the K = max(2, 1 + number of EOS ids) * num_beams best (beam, token) continuations by
     running score + log_softmax(logits) (transformers' `beams_to_keep`), one pass over the logits, no sort
  -> of the first num_beams candidates, those ending in EOS (all of them at max_new_tokens) become finished
     hypotheses scored score / generated_length ** length_penalty; the best num_beams others become the next
     running beams (transformers' `_get_running_beams_for_next_iteration` and `_update_finished_beams`)
  -> each new beam forks its parent's cache sequence (`PagedKVCache.fork`: the prompt's blocks stay shared; the
     first append into a shared, partly filled block copies it), then the old beams are freed: blocks that only
     pruned beams held return to the pool.
A prompt's search stops when no running beam can still beat its num_beams finished hypotheses (transformers'
`_check_early_stop_heuristic`: with early_stopping=False, judged at the current length; "never", at the longest
length when length_penalty > 0), when early_stopping=True and num_beams hypotheses are finished, or at
max_new_tokens. transformers keeps stepping a stopped prompt (its results frozen) while others run; here it leaves
the batch, which changes no result.
"""
from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from llmkern import _utils, decoding
from llmkern.generate import BLOCK_SIZE, ModelRunner, _check_bound, _check_model, _checked_prompts, _eos_set
from llmkern.kv_cache import PagedKVCache

# transformers' marker score: beams 1.. start at -1e9 (only beam 0 expands at the first step), and an empty
# finished slot counts as -1e9 in the stopping heuristic.
_NEG = -1.0e9


@dataclass
class BeamSearchOutput:
    """sequences: per prompt, its num_beams finished hypotheses, best first, as lists of new token ids (ending with
    the EOS id when one ended it). scores: float32 (batch, num_beams), each hypothesis' sum of log-probabilities
    divided by its length ** length_penalty (transformers' `sequences_scores`)."""
    sequences: list[list[list[int]]]
    scores: torch.Tensor


def _length_power(length: int, length_penalty: float) -> float:
    """length ** length_penalty as a float64, inf where it overflows (Python's power raises OverflowError there):
    a score divided by it is then -0.0, the documented degenerate case."""
    try:
        return float(length) ** length_penalty
    except OverflowError:
        return math.inf


@dataclass
class _Beam:
    seq_id: int          # its sequence in the cache (holds every token but the newest)
    tokens: list[int]    # the new tokens so far
    score: float         # float32 sum of log-probabilities


class BeamSearch:
    """One prompt's search: running beams (each a cache sequence), finished hypotheses, the stopping rule.

    `advance` consumes one row of `llmkern.beam_topk` output and updates the cache: new beams fork their parents,
    old beams are freed, and a finished search frees everything it held.
    """

    def __init__(self, cache: PagedKVCache, prompt_id: int, prompt: list[int], *, num_beams: int,
                 max_new_tokens: int, length_penalty: float, early_stopping: bool | str, eos: set[int],
                 new_ids: Iterator[int]):
        self.cache, self.prompt, self.num_beams = cache, prompt, num_beams
        self.max_new_tokens, self.length_penalty, self.early_stopping = max_new_tokens, length_penalty, early_stopping
        self.eos, self.new_ids = eos, new_ids
        self.running = [_Beam(prompt_id, [], 0.0)]    # the first step expands the prompt alone
        self.finished: list[_Beam] = []               # best first, at most num_beams
        self.improvable = True                        # transformers' is_early_stop_heuristic_unsatisfied
        self.steps = 0
        self.done = False

    def beam_scores(self) -> list[float]:
        """The running score of each of the num_beams logits rows (first step: the prompt's row in every beam)."""
        if self.steps == 0:
            return [0.0] + [_NEG] * (self.num_beams - 1)
        return [b.score for b in self.running]

    def feed(self) -> dict[int, list[int]]:
        """Each running beam's cache sequence and all its tokens (the runner feeds what the cache lacks)."""
        return {b.seq_id: self.prompt + b.tokens for b in self.running}

    def advance(self, scores: torch.Tensor, indices: list[int], vocab: int) -> None:
        """scores: float32 (K,) best first and indices beam * vocab + token (-1: none), for this prompt."""
        self.steps += 1
        length = self.steps                                          # generated tokens, this one included
        at_limit = length == self.max_new_tokens
        parents = self.running if len(self.running) == self.num_beams else self.running[:1] * self.num_beams
        final = (scores / _length_power(length, self.length_penalty)).tolist()   # float32, as transformers divides
        running: list[_Beam] = []
        for c, (score, idx) in enumerate(zip(scores.tolist(), indices)):
            if idx < 0:
                break
            parent, token = parents[idx // vocab], idx % vocab
            if token in self.eos or at_limit:
                if c < self.num_beams:                               # only the top num_beams may finish
                    self.finished.append(_Beam(-1, parent.tokens + [token], final[c]))
            elif len(running) < self.num_beams:
                running.append(_Beam(parent.seq_id, parent.tokens + [token], score))
        self.finished = sorted(self.finished, key=lambda b: -b.score)[:self.num_beams]   # stable: older first
        for beam in running:                                          # fork before freeing: shared blocks stay
            child = next(self.new_ids)
            self.cache.fork(beam.seq_id, child)
            beam.seq_id = child
        for beam in self.running:
            self.cache.free(beam.seq_id)
        self.running = running
        self._update_stop(at_limit)
        if not self.done and len(running) < self.num_beams:
            raise RuntimeError(f"llmkern.beam_search: fewer than num_beams = {self.num_beams} finite continuations "
                               "(NaN or -inf logits from the model)")
        if self.done:
            for beam in self.running:
                self.cache.free(beam.seq_id)
            self.running = []

    def _update_stop(self, at_limit: bool) -> None:
        full = len(self.finished) == self.num_beams
        if self.running:
            best_length = self.steps
            if self.early_stopping == "never" and self.length_penalty > 0.0:
                best_length = self.max_new_tokens
            best = torch.tensor([self.running[0].score], dtype=torch.float32) / _length_power(best_length,
                                                                                            self.length_penalty)
            worst = self.finished[-1].score if full else _NEG
            self.improvable = self.improvable and float(best) > worst
        self.done = at_limit or not self.running or not self.improvable or (self.early_stopping is True and full)


def run_searches(searches: list[BeamSearch], feed: Callable[[dict[int, list[int]]], torch.Tensor], vocab: int,
                 k: int) -> None:
    """Step every search to its end. feed(seqs) appends and runs each sequence's uncached tokens (seq id -> all
    its tokens) and returns one logits row per sequence, in order; the first call prefills the prompts."""
    active = list(searches)
    logits = feed({s.running[0].seq_id: s.prompt for s in active})
    num_beams = searches[0].num_beams
    while active:
        if logits.shape[0] == len(active):                 # the first step: the prompt's row for every beam
            logits = logits.repeat_interleave(num_beams, 0)
        beam_scores = torch.tensor([x for s in active for x in s.beam_scores()], dtype=torch.float32,
                                   device=logits.device)
        top_scores, top_idx = decoding.beam_topk(logits, beam_scores, num_beams=num_beams, k=k)
        top_scores, top_idx = top_scores.cpu(), top_idx.cpu()
        for row, search in enumerate(active):
            search.advance(top_scores[row], top_idx[row].tolist(), vocab)
        active = [s for s in active if not s.done]
        if active:
            logits = feed({sid: toks for s in active for sid, toks in s.feed().items()})


@torch.no_grad()
def beam_search(model: Any, input_ids: Any, *, num_beams: int, max_new_tokens: int, length_penalty: float = 1.0,
                early_stopping: bool | str = False, eos_token_id: int | list[int] | None = None,
                attention_mask: torch.Tensor | None = None, block_size: int = BLOCK_SIZE) -> BeamSearchOutput:
    """Beam search with transformers' semantics on llmkern's kernels and paged cache (module docstring).

    model, input_ids, attention_mask, eos_token_id, block_size: as in `llmkern.generate`.
    num_beams >= 1, with max(2, 1 + number of EOS ids) * num_beams <= 32 (the candidates `llmkern.beam_topk` keeps).
    max_new_tokens >= 1. length_penalty: a finite float, the exponent of the length in a finished hypothesis'
      score (> 0 favours longer ones, < 0 shorter ones; transformers' default 1.0). Lengths are at most
      max_new_tokens, so every power is finite and nonzero for any exponent whose power fits in float32; beyond
      that the scores degenerate to 0 or inf as in transformers.
    early_stopping: True, False or "never" (transformers' `early_stopping`, module docstring).
    Returns BeamSearchOutput(sequences, scores): per prompt its num_beams hypotheses best first (new tokens only)
    and their float32 scores. Raises TypeError/ValueError naming the argument before the model runs.
    """
    _check_model(model)
    for name, value, lo in (("num_beams", num_beams, 1), ("max_new_tokens", max_new_tokens, 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if value < lo:
            raise ValueError(f"{name} must be >= {lo}, got {value}")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, numbers.Real) or not math.isfinite(
            length_penalty):
        raise ValueError(f"length_penalty must be a finite float, got {length_penalty!r}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    block_size = _check_bound("block_size", block_size, BLOCK_SIZE)   # a power of two: PagedKVCache's check
    prompts = _checked_prompts(model, input_ids, attention_mask)
    eos = _eos_set(eos_token_id, model)
    k = max(2, 1 + len(eos)) * num_beams
    vocab = model.config.vocab_size
    if k > min(decoding.MAX_BEAM_CANDIDATES, num_beams * vocab):
        raise ValueError(f"num_beams: max(2, 1 + number of EOS ids) * num_beams = {k} candidates per step must be at "
                         f"most {min(decoding.MAX_BEAM_CANDIDATES, num_beams * vocab)}")

    # Blocks: a prompt's blocks once (shared), and per beam at most the blocks its new tokens reach, plus the
    # partly filled block it copies on write.
    cfg = model.config
    weight = model.model.embed_tokens.weight
    num_blocks = sum(_utils.cdiv(p.numel(), block_size) + num_beams * (_utils.cdiv(max_new_tokens, block_size) + 1)
                     for p in prompts)
    cache = PagedKVCache(cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads,
                                 model.model.layers[0].self_attn.head_dim, dtype=weight.dtype, device=weight.device)
    runner = ModelRunner(model, cache)
    new_ids = itertools.count(len(prompts))
    searches = [BeamSearch(cache, i, p.tolist(), num_beams=int(num_beams), max_new_tokens=int(max_new_tokens),
                           length_penalty=float(length_penalty), early_stopping=early_stopping, eos=eos,
                           new_ids=new_ids) for i, p in enumerate(prompts)]
    run_searches(searches, runner.feed, vocab, k)
    return BeamSearchOutput([[b.tokens for b in s.finished] for s in searches],
                            torch.tensor([[b.score for b in s.finished] for s in searches], dtype=torch.float32))
