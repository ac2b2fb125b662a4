"""Decoding controls: `speculative_sample`, `beam_topk` (the selection step of `llmkern.beam_search`) and
`apply_penalties`.

Host side: check the inputs, turn per-row parameters into tensors (sampling's rules, `per_row_param` and
`row_seeds`), launch one program per row. The kernels are in llmkern.kernels.decoding, whose docstring explains
each algorithm. Randomness flows as in `sample`: speculative sampling draws from counter-based Philox keyed by the
row's int64 seed (offset i for draft token i's test, offset k for the one draw), so a row's result depends only on
its own inputs and seed: deterministic and batch-invariant, on the GPU, under the interpreter and in the CPU
reference (up to rounding at a CDF step, as for `sample`).

Dispatch: each op is declared with `llmkern._dispatch.custom_op` (CUDA: the Triton kernel; CPU: the same kernel
under TRITON_INTERPRET=1, else the C++ backend when it has the op, else `llmkern.reference`). Value checks that read
tensor contents (draft ids, histories, the bias) are the ops' `check`: they run inside the op, before any
implementation, so they also hold under torch.compile.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch
import triton

from llmkern import _dispatch, _utils, compile_check, reference
from llmkern.kernels import decoding as kernels
from llmkern.sampling import check_row_tensor, per_row_param, row_seeds

# One fixed tile per kernel, not autotuned: a different tile changes the fp32 summation order of a row's mass and so
# could move a speculative draw that sits on a CDF step (the reason `sample` has one config too).
#   BLOCK = 1024: a streaming pass reads 4 KB of fp32 per tile, 8 elements per thread at 4 warps (as in sampling).
#   BLOCK_H = 256: the penalties' history passes gather/scatter 256 entries at a time (2 per thread).
BLOCK = 1024
BLOCK_H = 256
NUM_WARPS = 4
# Chain lengths: KP = the power of two above k; up to 15 draft tokens (chains in practice use 1-8: Leviathan et al.
# report gains up to about 7, EAGLE uses 5-6). Beam candidates: K = 2 * num_beams (transformers keeps (1 + number of
# EOS ids) * num_beams) up to 32, i.e. 16 beams with one EOS id: check-compile found KP = 64 spilling on sm_90 with
# triton 3.6 (12 bytes), and beam widths above 16 are rare.
MAX_DRAFT_TOKENS = 15
MAX_BEAM_CANDIDATES = 32
SPEC_KP = (2, 4, 8, 16)
BEAM_KP = (2, 4, 8, 16, 32)
# Histories longer than this are refused: the counts live in fp32, exact up to 2**24.
MAX_HISTORY = 2 ** 24

_INDEX_DTYPES = (torch.int32, torch.int64)


def _pow2_above(n: int) -> int:
    return max(2, triton.next_power_of_2(n + 1))


def _launch_meta(**meta: Any) -> dict:
    if not _utils.INTERPRET:
        meta["num_warps"] = NUM_WARPS
    return meta


def _index_values(name: str, ids: torch.Tensor, lo: int, hi: int) -> None:
    """ValueError unless every value of the (logical) index tensor is in [lo, hi). One device-to-host sync (an op's
    `check`). The kernels never read or write outside their tensors whatever the ids anyway: an out-of-range draft
    token is rejected, an out-of-range history entry skipped."""
    if ids.numel() == 0:
        return
    vmin, vmax = (int(v) for v in torch.aminmax(ids))
    if vmin < lo or vmax >= hi:
        bad = vmin if vmin < lo else vmax
        raise ValueError(f"{name} values must be in [{lo}, {hi}), got {bad}")


# ------------------------------------------------------------------------------------------- speculative sampling
def _check_speculative_args(draft_probs, draft_token_ids, target_probs) -> None:
    _utils.check_tensor("draft_probs", draft_probs, ndim=3, dtypes=_utils.FLOAT_DTYPES)
    _utils.check_tensor("target_probs", target_probs, ndim=3, dtypes=_utils.FLOAT_DTYPES)
    _utils.check_tensor("draft_token_ids", draft_token_ids, ndim=2, dtypes=_INDEX_DTYPES)
    _utils.check_same(("draft_probs", "target_probs"), (draft_probs, target_probs))
    _utils.check_same(("draft_probs", "draft_token_ids"), (draft_probs, draft_token_ids), dtype=False)
    batch, k, vocab = draft_probs.shape
    if vocab == 0:
        raise ValueError("draft_probs must have at least one column (vocab >= 1)")
    if k > MAX_DRAFT_TOKENS:
        raise ValueError(f"draft_probs: at most {MAX_DRAFT_TOKENS} draft tokens per row, got k = {k}")
    if tuple(target_probs.shape) != (batch, k + 1, vocab):
        raise ValueError(f"target_probs must have shape (batch, k + 1, vocab) = {(batch, k + 1, vocab)}, got "
                         f"{tuple(target_probs.shape)}")
    if tuple(draft_token_ids.shape) != (batch, k):
        raise ValueError(f"draft_token_ids must have shape (batch, k) = {(batch, k)}, got "
                         f"{tuple(draft_token_ids.shape)}")


def _check_int64_ids(name: str, ids: torch.Tensor) -> None:
    """The kernels read ids as int64 (one signature): the public functions copy int32 ids, a direct call must too."""
    if ids.dtype != torch.int64:
        raise TypeError(f"{name}: the op reads int64 ids (the public function converts int32), got {ids.dtype}")


@_dispatch.signature_checked
def _check_speculative_op(draft_probs, draft_token_ids, target_probs, seed) -> None:
    _check_speculative_args(draft_probs, draft_token_ids, target_probs)
    _check_int64_ids("draft_token_ids", draft_token_ids)
    row_seeds(seed, None, draft_probs.shape[0], draft_probs.device, like="draft_probs")


def _speculative_values(draft_probs, draft_token_ids, target_probs, seed):
    """llmkern::speculative_sample's check: speculative_sample()'s argument checks as the op receives them (once per
    signature, no sync), then the draft ids' values (one sync)."""
    _check_speculative_op(draft_probs, draft_token_ids, target_probs, seed)
    _index_values("draft_token_ids", draft_token_ids, 0, draft_probs.shape[-1])


def _speculative_reference(draft_probs, draft_token_ids, target_probs, seed):
    return reference.speculative_sample(draft_probs, draft_token_ids, target_probs, seed=seed)


# The kernels read per-row tensors (seeds, beam scores, penalties) with unit stride: `contiguous=` copies a strided
# view before the check and every implementation; a strided vocab dim is copied in the Triton implementation.
@_dispatch.custom_op("speculative_sample", mutates_args=(), reference=_speculative_reference,
                     check=_speculative_values, contiguous=("seed",))
def _speculative_op(draft_probs: torch.Tensor, draft_token_ids: torch.Tensor, target_probs: torch.Tensor,
                    seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch, k, vocab = draft_probs.shape
    draft_probs = _utils.last_dim_contiguous("draft_probs", draft_probs)
    target_probs = _utils.last_dim_contiguous("target_probs", target_probs)
    out = torch.empty(batch, k + 1, dtype=torch.int64, device=draft_probs.device)
    accepted = torch.empty(batch, dtype=torch.int64, device=draft_probs.device)
    if batch:
        kernels._speculative_kernel[(batch,)](
            draft_probs, draft_probs.stride(0), draft_probs.stride(1), draft_token_ids, draft_token_ids.stride(0),
            draft_token_ids.stride(1), target_probs, target_probs.stride(0), target_probs.stride(1), seed,
            out, out.stride(0), accepted, k, vocab, **_launch_meta(KP=_pow2_above(k), BLOCK=BLOCK))
    return out, accepted


@_speculative_op.register_fake
def _(draft_probs, draft_token_ids, target_probs, seed):
    batch, k, _ = draft_probs.shape
    return (draft_probs.new_empty(batch, k + 1, dtype=torch.int64),
            draft_probs.new_empty(batch, dtype=torch.int64))


def speculative_sample(draft_probs: torch.Tensor, draft_token_ids: torch.Tensor, target_probs: torch.Tensor, *,
                       seed=None, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chain speculative sampling: accept a prefix of the draft's tokens and draw one more, so that the emitted
    tokens follow the target distribution exactly, whatever the draft (Leviathan et al., arXiv 2211.17192,
    Algorithm 1; the interface of FlashInfer's `chain_speculative_sampling`).

    draft_probs: (batch, k, vocab), the distributions the draft tokens were drawn from; target_probs:
      (batch, k + 1, vocab), the target's distributions at the same k positions plus one. fp32/fp16/bf16, the same
      dtype; each row a probability vector (nonnegative, summing to 1: e.g. `llmkern.sampling_probs`). Any strides
      (a strided vocab dim is copied). k <= 15.
    draft_token_ids: (batch, k) int32/int64, draft token i drawn from draft_probs[:, i]; values in [0, vocab) (checked
      inside the op, one device-to-host sync). Any strides (honoured).
    seed / generator: as in `llmkern.sample`: an int, an int64 (batch,) tensor, or None (one seed per row drawn from
      `generator` or torch's default generator).
    Per row: draft token i is accepted with probability min(1, p_i(x) / q_i(x)) (tested as u_i * q < p, u_i from
    Philox(seed, offset i)); at the first rejection j one token is drawn from the residual max(0, p_j - q_j),
    renormalized; when all k are accepted, a bonus token is drawn from p_k (Philox offset k for either draw). If
    rounding leaves the residual without mass, p_j is used. A row whose final distribution has no positive finite
    mass (NaN, all zeros) draws -1.
    Returns (tokens, accepted): tokens (batch, k + 1) int64, the accepted draft tokens, then the drawn token, then
    -1 padding; accepted (batch,) int64, the number of accepted draft tokens (tokens[:, accepted] is the drawn one).
    Raises TypeError/ValueError naming the argument for bad shapes, dtypes, devices or ids, before any launch.
    """
    _check_speculative_args(draft_probs, draft_token_ids, target_probs)
    batch = draft_probs.shape[0]
    # int32 ids become an int64 copy (one kernel signature); the op checks the ids the kernel reads.
    ids = draft_token_ids if draft_token_ids.dtype == torch.int64 else draft_token_ids.to(torch.int64)
    seeds = row_seeds(seed, generator, batch, draft_probs.device, like="draft_probs")
    return _speculative_op(_utils.last_dim_contiguous("draft_probs", draft_probs), ids,
                           _utils.last_dim_contiguous("target_probs", target_probs), seeds)


# ------------------------------------------------------------------------------------------------ beam search top-k
def _beam_kp(k: int) -> int:
    return max(2, triton.next_power_of_2(k))


def _beam_k(num_beams: int, k: int | None) -> int:
    return 2 * num_beams if k is None else k    # transformers' (1 + number of EOS ids) * num_beams, one EOS id


def _check_beam_args(logits, beam_scores, num_beams, k) -> None:
    _utils.check_tensor("logits", logits, ndim=2, dtypes=_utils.FLOAT_DTYPES)
    _utils.check_tensor("beam_scores", beam_scores, ndim=1)
    if not beam_scores.dtype.is_floating_point:
        raise TypeError(f"beam_scores must be a floating-point tensor, got {beam_scores.dtype}")
    _utils.check_same(("logits", "beam_scores"), (logits, beam_scores), dtype=False)
    if isinstance(num_beams, bool) or not isinstance(num_beams, numbers.Integral) or num_beams < 1:
        raise ValueError(f"num_beams must be an int >= 1, got {num_beams!r}")
    rows, vocab = logits.shape
    if vocab == 0 or rows % num_beams:
        raise ValueError(f"logits must be (batch * num_beams, vocab) with vocab >= 1; got shape {tuple(logits.shape)} "
                         f"for num_beams = {num_beams}")
    if num_beams * vocab >= 2 ** 31:
        raise ValueError(f"logits: num_beams * vocab must be below 2**31 (int32 flat indices), got {num_beams * vocab}")
    if beam_scores.shape[0] != rows:
        raise ValueError(f"beam_scores must have shape ({rows},), one score per logits row, got "
                         f"{tuple(beam_scores.shape)}")
    k = _beam_k(num_beams, k)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= min(MAX_BEAM_CANDIDATES,
                                                                                        num_beams * vocab):
        raise ValueError(f"k must be an int in [1, {min(MAX_BEAM_CANDIDATES, num_beams * vocab)}] "
                         f"(at most {MAX_BEAM_CANDIDATES} and num_beams * vocab), got {k!r}")


@_dispatch.signature_checked
def _check_beam_op(logits, beam_scores, num_beams, k) -> None:
    """llmkern::beam_topk's check: beam_topk()'s argument checks as the op receives them (once per signature, no
    sync); the kernel reads float32 beam scores (beam_topk converts)."""
    _check_beam_args(logits, beam_scores, num_beams, k)
    if beam_scores.dtype != torch.float32:
        raise TypeError(f"beam_scores: the op reads float32 scores (beam_topk converts), got {beam_scores.dtype}")


def _beam_topk_reference(logits, beam_scores, num_beams, k):
    # contiguous: the fake's layout (the reference's are column slices of the sorted (batch, beams * vocab) rows)
    return tuple(t.to(logits.device).contiguous() for t in reference.beam_topk(logits, beam_scores, num_beams, k))


@_dispatch.custom_op("beam_topk", mutates_args=(), reference=_beam_topk_reference, check=_check_beam_op,
                     contiguous=("beam_scores",))
def _beam_topk_op(logits: torch.Tensor, beam_scores: torch.Tensor, num_beams: int,
                  k: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch = logits.shape[0] // num_beams
    logits = _utils.last_dim_contiguous("logits", logits)
    values = torch.empty(batch, k, dtype=torch.float32, device=logits.device)
    indices = torch.empty(batch, k, dtype=torch.int64, device=logits.device)
    if batch:
        kernels._beam_topk_kernel[(batch,)](logits, logits.stride(0), beam_scores, values, indices, num_beams, k,
                                            logits.shape[1], **_launch_meta(KP=_beam_kp(k), BLOCK=BLOCK))
    return values, indices


@_beam_topk_op.register_fake
def _(logits, beam_scores, num_beams, k):
    batch = logits.shape[0] // num_beams
    return logits.new_empty(batch, k, dtype=torch.float32), logits.new_empty(batch, k, dtype=torch.int64)


def beam_topk(logits: torch.Tensor, beam_scores: torch.Tensor, *, num_beams: int,
              k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search's selection step: per sequence, the k best continuations over its beams x vocab by
    beam_score + log_softmax(logits), in one pass over the logits and with no sort of beams x vocab.

    logits: (batch * num_beams, vocab) fp32/fp16/bf16, row r = sequence r // num_beams, beam r % num_beams; any row
      stride (0 too: one row broadcast to every beam). Math in fp32, as transformers' beam search.
    beam_scores: (batch * num_beams,) float, each beam's running sum of log-probabilities (transformers starts beams
      1.. at -1e9 so that the first step expands beam 0 only). A NaN or -inf score gives that beam no candidates.
    num_beams >= 1; k: candidates kept per sequence, default 2 * num_beams (transformers keeps (1 + number of EOS
      ids) * num_beams), at most 32 and at most num_beams * vocab.
    Returns (scores, indices): float32 (batch, k), best first, and int64 (batch, k) flat indices
      beam * vocab + token (transformers' `topk_indices`: beam = index // vocab, token = index % vocab). Ties go to the
      lower flat index. A beam row holding NaN or +inf, or all -inf, has no candidates; -inf logits are no
      candidates; when fewer than k remain, the last entries are (-inf, -1).
    Raises TypeError/ValueError naming the argument before any launch.
    """
    _check_beam_args(logits, beam_scores, num_beams, k)
    scores = beam_scores.detach().to(torch.float32).contiguous()
    return _beam_topk_op(_utils.last_dim_contiguous("logits", logits), scores, int(num_beams),
                         int(_beam_k(num_beams, k)))


# ----------------------------------------------------------------------------------------------- penalties
def _check_penalty_args(logits, token_ids) -> None:
    _utils.check_tensor("logits", logits, ndim=2, dtypes=_utils.FLOAT_DTYPES)
    _utils.check_tensor("token_ids", token_ids, ndim=2, dtypes=_INDEX_DTYPES)
    _utils.check_same(("logits", "token_ids"), (logits, token_ids), dtype=False)
    batch, vocab = logits.shape
    if vocab == 0:
        raise ValueError("logits must have at least one column (vocab >= 1)")
    if token_ids.shape[0] != batch:
        raise ValueError(f"token_ids must have shape ({batch}, max_len), one history per logits row, got "
                         f"{tuple(token_ids.shape)}")
    if token_ids.shape[1] >= MAX_HISTORY:
        raise ValueError(f"token_ids: histories must be shorter than 2**24 tokens, got {token_ids.shape[1]}")


@_dispatch.signature_checked
def _check_penalties_op(logits, token_ids, repetition_penalty, presence_penalty, frequency_penalty,
                        logit_bias) -> None:
    """apply_penalties()'s argument checks as the op receives them (once per signature, no sync): int64 ids, the
    penalties float32 (batch,) tensors, the bias float32 (its values: `_penalties_values`)."""
    _check_penalty_args(logits, token_ids)
    _check_int64_ids("token_ids", token_ids)
    batch, vocab = logits.shape
    for name, t in (("repetition_penalty", repetition_penalty), ("presence_penalty", presence_penalty),
                    ("frequency_penalty", frequency_penalty)):
        check_row_tensor(name, t, batch, logits.device, torch.float32)
    _check_bias(logit_bias, batch, vocab, logits.device)
    if logit_bias is not None and logit_bias.dtype != torch.float32:
        raise TypeError(f"logit_bias: the op reads a float32 bias (apply_penalties converts), got {logit_bias.dtype}")


def _penalties_values(logits, token_ids, repetition_penalty, presence_penalty, frequency_penalty, logit_bias):
    """llmkern::apply_penalties' check: the arguments (`_check_penalties_op`), then the history's and the bias's
    values (one sync each)."""
    _check_penalties_op(logits, token_ids, repetition_penalty, presence_penalty, frequency_penalty, logit_bias)
    _index_values("token_ids", token_ids, -1, logits.shape[1])
    if logit_bias is not None and bool((torch.isnan(logit_bias) | (logit_bias == math.inf)).any()):
        raise ValueError("logit_bias must hold no NaN and no +inf (as float32); -inf bans a token")


def _penalties_reference(logits, token_ids, repetition_penalty, presence_penalty, frequency_penalty, logit_bias):
    return reference.apply_penalties(logits, token_ids, repetition_penalty=repetition_penalty,
                                     presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                     logit_bias=logit_bias).to(torch.float32)


@_dispatch.custom_op("apply_penalties", mutates_args=(), reference=_penalties_reference, check=_penalties_values,
                     contiguous=("repetition_penalty", "presence_penalty", "frequency_penalty"))
def _penalties_op(logits: torch.Tensor, token_ids: torch.Tensor, repetition_penalty: torch.Tensor,
                  presence_penalty: torch.Tensor, frequency_penalty: torch.Tensor,
                  logit_bias: torch.Tensor | None) -> torch.Tensor:
    batch, vocab = logits.shape
    logits = _utils.last_dim_contiguous("logits", logits)
    logit_bias = None if logit_bias is None else _utils.last_dim_contiguous("logit_bias", logit_bias)
    length = token_ids.shape[1]
    out = torch.empty(batch, vocab, dtype=torch.float32, device=logits.device)
    work = torch.empty(batch, length, dtype=torch.float32, device=logits.device)   # one value per history entry
    if batch:
        has_bias = logit_bias is not None
        bias = logit_bias if has_bias else out              # never read without a bias
        stride_bias = (logit_bias.stride(0) if logit_bias.dim() == 2 else 0) if has_bias else 0
        kernels._penalties_kernel[(batch,)](
            logits, logits.stride(0), token_ids, token_ids.stride(0), token_ids.stride(1), length, bias, stride_bias,
            repetition_penalty, presence_penalty, frequency_penalty, out, out.stride(0), work, vocab,
            **_launch_meta(HAS_BIAS=has_bias, BLOCK=BLOCK, BLOCK_H=BLOCK_H))
    return out


@_penalties_op.register_fake
def _(logits, token_ids, repetition_penalty, presence_penalty, frequency_penalty, logit_bias):
    return logits.new_empty(logits.shape, dtype=torch.float32)


def _check_bias(logit_bias: Any, batch: int, vocab: int, device: torch.device) -> torch.Tensor | None:
    """The bias as the fp32 tensor the kernel reads, (vocab,) or (batch, vocab) (its values: the op's check)."""
    if logit_bias is None:
        return None
    _utils.check_tensor("logit_bias", logit_bias)
    if not logit_bias.dtype.is_floating_point:
        raise TypeError(f"logit_bias must be a floating-point tensor, got {logit_bias.dtype}")
    if tuple(logit_bias.shape) not in ((vocab,), (batch, vocab)):
        raise ValueError(f"logit_bias must have shape ({vocab},) or ({batch}, {vocab}), got {tuple(logit_bias.shape)}")
    if logit_bias.device != device:
        raise ValueError(f"logit_bias is on {logit_bias.device} but logits is on {device}; they must share a device")
    return _utils.last_dim_contiguous("logit_bias", logit_bias.detach().to(torch.float32))


def apply_penalties(logits: torch.Tensor, token_ids: torch.Tensor, *, repetition_penalty=1.0, presence_penalty=0.0,
                    frequency_penalty=0.0, logit_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Repetition controls in one kernel, with no (batch, vocab) count tensor: float32 (batch, vocab) logits.

    logits: (batch, vocab) fp32/fp16/bf16, any row stride. token_ids: (batch, max_len) int64 (or int32) history of
    each row, padded with -1 anywhere; values in [-1, vocab) (checked inside the op, one device-to-host sync); any
    strides (honoured). For every token t that occurs c_t > 0 times in the row's history, in this order:
      repetition_penalty r in (0, inf): x_t / r if x_t >= 0 else x_t * r (transformers'
        RepetitionPenaltyLogitsProcessor; 1 = off, > 1 discourages repeats);
      presence_penalty a and frequency_penalty f, finite: x_t - f * c_t - a (OpenAI's definition; 0 = off,
        negative values encourage repeats);
    then logit_bias, a float (vocab,) or (batch, vocab) tensor, is added to every token (OpenAI's logit_bias as a
    dense row; -inf bans a token; NaN and +inf are refused). The three penalties are numbers or (batch,) tensors.
    Extremes follow float32 arithmetic, as transformers' processor does: a tiny repetition penalty or a huge
    presence/frequency penalty can turn a repeated token's logit into +-inf (-inf: never drawn; +inf makes
    `llmkern.sample` treat the row as invalid); values beyond float32 are refused.
    The output is float32 (the dtype transformers' generate casts logits to before its processors): the kernel
    counts in the output row itself, exactly, while the counts are needed.
    Raises TypeError/ValueError naming the argument before any launch.
    """
    _check_penalty_args(logits, token_ids)
    batch, vocab = logits.shape
    # int32 ids become an int64 copy (one kernel signature); the op checks the ids the kernel reads.
    ids = token_ids if token_ids.dtype == torch.int64 else token_ids.to(torch.int64)
    params = penalty_params(batch, vocab, logits.device, repetition_penalty=repetition_penalty,
                            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                            logit_bias=logit_bias)
    return _penalties_op(_utils.last_dim_contiguous("logits", logits), ids, *params)


def penalty_params(batch: int, vocab: int, device: torch.device, *, repetition_penalty, presence_penalty,
                   frequency_penalty, logit_bias) -> tuple:
    """apply_penalties' parameter checks: (repetition, presence, frequency) as float32 (batch,) tensors on device,
    and the bias as the fp32 tensor the kernel reads (or None). Raises ValueError/TypeError naming the argument."""
    rep = per_row_param("repetition_penalty", repetition_penalty, batch, device, integer=False, lo=0.0,
                        hi=float("inf"), lo_open=True, hi_open=True)
    pres, freq = (per_row_param(name, value, batch, device, integer=False, lo=-float("inf"), hi=float("inf"),
                                lo_open=True, hi_open=True)
                  for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)))
    return rep, pres, freq, _check_bias(logit_bias, batch, vocab, device)


def penalties_active(repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, logit_bias=None) -> bool:
    """False when every control is at its off value (Python numbers), so a decode loop can skip the op."""
    numbers_off = all(not isinstance(v, torch.Tensor) and v == off for v, off in
                      ((repetition_penalty, 1.0), (presence_penalty, 0.0), (frequency_penalty, 0.0)))
    return not (numbers_off and logit_bias is None)


# --------------------------------------------------------------------------------------------- compile specs
@compile_check.register
def _compile_specs():
    """Every variant the dispatcher can launch: each kernel for each input dtype, speculative sampling for each
    chain-length tile KP, beam top-k for each candidate tile KP, penalties with and without a bias."""
    for name in ("fp16", "bf16", "fp32"):
        for kp in SPEC_KP:
            yield compile_check.CompileSpec(
                kernel=kernels._speculative_kernel, name="_speculative_kernel", config=f"KP={kp},BLOCK={BLOCK},{name}",
                signature={"draft_ptr": f"*{name}:16", "sd_b": "i32", "sd_i": "i32", "ids_ptr": "*i64:16",
                           "si_b": "i32", "si_i": "i32", "target_ptr": f"*{name}:16", "st_b": "i32", "st_i": "i32",
                           "seed_ptr": "*i64:16", "out_ptr": "*i64:16", "so_b": "i32", "accepted_ptr": "*i64:16",
                           "K": "i32", "V": "i32"},
                constexprs=dict(KP=kp, BLOCK=BLOCK), num_warps=NUM_WARPS)
        for kp in BEAM_KP:
            yield compile_check.CompileSpec(
                kernel=kernels._beam_topk_kernel, name="_beam_topk_kernel", config=f"KP={kp},BLOCK={BLOCK},{name}",
                signature={"logits_ptr": f"*{name}:16", "stride_row": "i32", "scores_ptr": "*fp32:16",
                           "out_val_ptr": "*fp32:16", "out_idx_ptr": "*i64:16", "NB": "i32", "K": "i32", "V": "i32"},
                constexprs=dict(KP=kp, BLOCK=BLOCK), num_warps=NUM_WARPS)
        for has_bias in (False, True):
            yield compile_check.CompileSpec(
                kernel=kernels._penalties_kernel, name="_penalties_kernel",
                config=f"HAS_BIAS={has_bias},BLOCK={BLOCK},BLOCK_H={BLOCK_H},{name}",
                signature={"logits_ptr": f"*{name}:16", "stride_l": "i32", "ids_ptr": "*i64:16", "si_b": "i32",
                           "si_j": "i32", "L": "i32", "bias_ptr": "*fp32:16", "stride_bias": "i32",
                           "rep_ptr": "*fp32:16", "pres_ptr": "*fp32:16", "freq_ptr": "*fp32:16",
                           "out_ptr": "*fp32:16", "stride_o": "i32", "work_ptr": "*fp32:16", "V": "i32"},
                constexprs=dict(HAS_BIAS=has_bias, BLOCK=BLOCK, BLOCK_H=BLOCK_H), num_warps=NUM_WARPS)
