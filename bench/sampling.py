"""Fused sampling: llmkern.sample against the PyTorch sort-based sampler and FlashInfer.

One decoding step's sampling: logits (batch, vocab) in bf16 for batch 1 .. 512 and vocab 32k, 128k and 256k (Llama-2,
Llama-3 and Gemma-sized vocabularies), with per-row parameters as a serving batch has them: temperature 0.7 .. 1.0,
top-k 50 and top-p 0.9 (the common serving defaults), one seed per row. Peers in the same run:
  * torch_sort: what people write in PyTorch: logits / temperature, softmax, a full descending sort per row, top-k and
    top-p masks from the sorted cumulative sum, torch.multinomial;
  * flashinfer: flashinfer.sampling.top_k_top_p_sampling_from_logits (pivot-based rejection sampling) when
    importable, after the same per-row temperature division (it takes no temperature).
Bytes are llmkern.perf.sampling_bytes (the logits read once plus one int64 token per row), the same for every
implementation; there are no FLOPs to speak of (flops = 0, bound by the CUDA-core peak, tensor_cores=False), so the
GB/s column is the achieved bandwidth on the compulsory logits read.

The decoding controls (llmkern.decoding) run in the same suite, each against what people use instead:
  * speculative_sample (k = 4 draft tokens, fp32 probabilities, vocab 32k / 128k, batch 1 .. 128) against
    torch_spec, the same algorithm in PyTorch ops (gather, a uniform per draft token, argmax of the first rejection,
    the residual, torch.multinomial), and FlashInfer's chain_speculative_sampling when importable;
  * beam_topk (4 beams, fp32 logits, vocab 32k / 128k) against torch_topk, transformers' beam step
    (log_softmax, add the beam scores, torch.topk over beams x vocab);
  * apply_penalties (vocab 128k, histories of 1024 and 4096 tokens) against transformers'
    RepetitionPenaltyLogitsProcessor (repetition alone), and against torch_dense, all three controls in PyTorch
    with a dense (batch, vocab) count tensor from scatter_add (what vLLM's sampler builds).
Bytes are the compulsory traffic from llmkern.perf (speculative_bytes, beam_topk_bytes, penalties_bytes).

On CPU (no CUDA), the issue-15 target: batch 64 x vocab 128256 in bf16 through the CPU path (the C++ backend when
it builds) against the sort-based sampler; --quick: batch 8. The decoding controls run tiny shapes there, to show
the suite works, not to measure anything.
"""
from __future__ import annotations

from typing import Iterable

import torch

from llmkern import perf
from llmkern.bench.common import Case, optional_import
from llmkern.decoding import apply_penalties, beam_topk, speculative_sample
from llmkern.sampling import sample

TOP_K, TOP_P = 50, 0.9                           # common serving defaults (vLLM / HF generation configs)
VOCABS = [32000, 128256, 262144]                 # Llama-2, Llama-3, Gemma-3 (256k)
BATCHES = [1, 8, 32, 64, 128, 256, 512]
QUICK = [(1, 128256), (128, 128256)]
CPU_SHAPES = [(64, 128256)]                      # (batch, vocab)
CPU_QUICK = [(8, 128256)]


def _inputs(batch, vocab, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(batch, vocab, generator=g, device=device) * 3).to(dtype)
    # per-row parameters: temperatures spread over 0.7 .. 1.0, top-k and top-p per row (the same values here)
    temperature = torch.linspace(0.7, 1.0, batch, device=device)
    top_k = torch.full((batch,), TOP_K, dtype=torch.int32, device=device)
    top_p = torch.full((batch,), TOP_P, device=device)
    seed = torch.arange(batch, dtype=torch.int64, device=device)
    return logits, temperature, top_k, top_p, seed


def torch_sort_sample(logits, temperature, top_k, top_p, generator=None):
    """The PyTorch sort-based sampler (temperature, then top-k, then top-p over the top-k survivors)."""
    probs = torch.softmax(logits.float() / temperature[:, None], dim=-1)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    rank = torch.arange(probs.shape[-1], device=probs.device)[None, :]
    sorted_p = sorted_p.masked_fill(rank >= top_k[:, None], 0.0)
    cum = torch.cumsum(sorted_p, dim=-1)
    above = cum - sorted_p                                   # mass strictly before each token
    sorted_p = sorted_p.masked_fill(above >= top_p[:, None] * cum[:, -1:], 0.0)
    pick = torch.multinomial(sorted_p, 1, generator=generator)
    return order.gather(-1, pick).squeeze(-1)


def _shape(batch, vocab, dtype) -> dict:
    return dict(batch=batch, vocab=vocab, top_k=TOP_K, top_p=TOP_P, dtype=str(dtype).replace("torch.", ""))


def _cases_for(batch, vocab, dtype, device, flashinfer) -> Iterable[Case]:
    shape = _shape(batch, vocab, dtype)
    nbytes = perf.sampling_bytes(batch, vocab, perf.dtype_bytes(dtype))

    def make_llmkern():
        logits, t, k, p, seed = _inputs(batch, vocab, dtype, device)
        return lambda: sample(logits, temperature=t, top_k=k, top_p=p, seed=seed)
    yield Case(op="sampling", impl="llmkern", shape=shape, flops=0.0, nbytes=nbytes, make=make_llmkern,
               tensor_cores=False, note="per-row parameters, includes the host-side parameter checks")

    def make_torch():
        logits, t, k, p, _ = _inputs(batch, vocab, dtype, device)
        return lambda: torch_sort_sample(logits, t, k, p)
    yield Case(op="sampling", impl="torch_sort", shape=shape, flops=0.0, nbytes=nbytes, make=make_torch,
               tensor_cores=False)

    if flashinfer is not None and device.type == "cuda":
        def make_fi():
            logits, t, k, p, _ = _inputs(batch, vocab, dtype, device)
            fn = flashinfer.sampling.top_k_top_p_sampling_from_logits
            return lambda: fn(logits / t[:, None].to(logits.dtype), k, p)
        yield Case(op="sampling", impl="flashinfer", shape=shape, flops=0.0, nbytes=nbytes, make=make_fi,
                   tensor_cores=False, note="temperature applied by a division before the call")


# --------------------------------------------------------------------------------------------- decoding controls
SPEC_K = 4                                           # draft tokens per round (Leviathan et al. find 3-7 useful)
NUM_BEAMS = 4                                        # a common beam width (transformers' examples use 4-5)
DECODING_VOCABS = [32000, 128256]
SPEC_BATCHES = [1, 8, 32, 128]
BEAM_BATCHES = [1, 8, 32]
PENALTY_BATCHES = [1, 32, 128]
HISTORIES = [1024, 4096]
REPETITION, PRESENCE, FREQUENCY = 1.2, 0.5, 0.3     # typical serving values (OpenAI's range is -2 .. 2)


def torch_speculative_sample(draft_probs, draft_ids, target_probs, generator=None):
    """Chain speculative sampling in PyTorch ops: what people write without a fused kernel."""
    batch, k, _ = draft_probs.shape
    rows = torch.arange(batch, device=draft_probs.device)
    p_x = target_probs[:, :k].gather(2, draft_ids[..., None])[..., 0]
    q_x = draft_probs.gather(2, draft_ids[..., None])[..., 0]
    u = torch.rand(batch, k, device=draft_probs.device, generator=generator)
    rejected = u * q_x >= p_x
    first = torch.where(rejected.any(1), rejected.int().argmax(1), k)
    q_row = torch.where((first < k)[:, None], draft_probs[rows, first.clamp(max=k - 1)], 0.0)
    residual = (target_probs[rows, first] - q_row).clamp(min=0)
    drawn = torch.multinomial(residual, 1)[:, 0]
    pos = torch.arange(k + 1, device=draft_probs.device)[None, :]
    out = torch.where(pos < first[:, None], torch.nn.functional.pad(draft_ids, (0, 1)), -1)
    out[rows, first] = drawn
    return out, first


def torch_beam_topk(logits, beam_scores, num_beams, k):
    """transformers' beam step: log_softmax in fp32, add the running scores, topk over beams x vocab."""
    scores = torch.log_softmax(logits.float(), dim=-1) + beam_scores[:, None]
    return torch.topk(scores.view(logits.shape[0] // num_beams, -1), k)


def torch_dense_penalties(logits, token_ids):
    """All three controls with a dense (batch, vocab) count tensor (vLLM's sampler builds one by scatter_add)."""
    batch, vocab = logits.shape
    counts = torch.zeros(batch, vocab + 1, dtype=torch.int32, device=logits.device)
    counts.scatter_add_(1, torch.where(token_ids >= 0, token_ids, vocab), torch.ones_like(token_ids, dtype=torch.int32))
    counts = counts[:, :vocab]
    x = logits.float()
    penalized = torch.where(x < 0, x * REPETITION, x / REPETITION) - FREQUENCY * counts - PRESENCE
    return torch.where(counts > 0, penalized, x)


def _probs(shape, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.softmax(torch.randn(*shape, generator=g, device=device) * 2, dim=-1)


def _speculative_cases(batch, vocab, device, flashinfer) -> Iterable[Case]:
    shape = dict(batch=batch, k=SPEC_K, vocab=vocab, dtype="float32")
    nbytes = perf.speculative_bytes(batch, SPEC_K, vocab, 4)

    def inputs():
        q, p = _probs((batch, SPEC_K, vocab), device, 0), _probs((batch, SPEC_K + 1, vocab), device, 1)
        ids = torch.multinomial(q.view(-1, vocab), 1).view(batch, SPEC_K)
        return q, ids, p

    def make_llmkern():
        q, ids, p = inputs()
        seed = torch.arange(batch, device=device)
        return lambda: speculative_sample(q, ids, p, seed=seed)
    yield Case(op="speculative_sample", impl="llmkern", shape=shape, flops=0.0, nbytes=nbytes, make=make_llmkern,
               tensor_cores=False, note="includes the host-side draft-id check (one sync)")

    def make_torch():
        q, ids, p = inputs()
        return lambda: torch_speculative_sample(q, ids, p)
    yield Case(op="speculative_sample", impl="torch_spec", shape=shape, flops=0.0, nbytes=nbytes, make=make_torch,
               tensor_cores=False)

    if flashinfer is not None and device.type == "cuda":
        def make_fi():
            q, ids, p = inputs()
            ids32 = ids.to(torch.int32)
            return lambda: flashinfer.sampling.chain_speculative_sampling(q, ids32, p)
        yield Case(op="speculative_sample", impl="flashinfer", shape=shape, flops=0.0, nbytes=nbytes, make=make_fi,
                   tensor_cores=False)


def _beam_cases(batch, vocab, device) -> Iterable[Case]:
    shape = dict(batch=batch, num_beams=NUM_BEAMS, vocab=vocab, k=2 * NUM_BEAMS, dtype="float32")
    nbytes = perf.beam_topk_bytes(batch, NUM_BEAMS, vocab, 4)

    def inputs():
        g = torch.Generator(device=device).manual_seed(2)
        logits = torch.randn(batch * NUM_BEAMS, vocab, generator=g, device=device) * 3
        return logits, -torch.rand(batch * NUM_BEAMS, generator=g, device=device) * 10

    def make_llmkern():
        logits, scores = inputs()
        return lambda: beam_topk(logits, scores, num_beams=NUM_BEAMS)
    yield Case(op="beam_topk", impl="llmkern", shape=shape, flops=0.0, nbytes=nbytes, make=make_llmkern,
               tensor_cores=False)

    def make_torch():
        logits, scores = inputs()
        return lambda: torch_beam_topk(logits, scores, NUM_BEAMS, 2 * NUM_BEAMS)
    yield Case(op="beam_topk", impl="torch_topk", shape=shape, flops=0.0, nbytes=nbytes, make=make_torch,
               tensor_cores=False)


def _penalty_cases(batch, vocab, history, device, transformers) -> Iterable[Case]:
    nbytes = perf.penalties_bytes(batch, vocab, history, 4)

    def inputs():
        g = torch.Generator(device=device).manual_seed(3)
        logits = torch.randn(batch, vocab, generator=g, device=device)
        return logits, torch.randint(0, vocab, (batch, history), generator=g, device=device)

    for controls in ("repetition", "all"):
        shape = dict(batch=batch, vocab=vocab, history=history, controls=controls, dtype="float32")
        kw = dict(repetition_penalty=REPETITION)
        if controls == "all":
            kw.update(presence_penalty=PRESENCE, frequency_penalty=FREQUENCY)

        def make_llmkern(kw=kw):
            logits, ids = inputs()
            return lambda: apply_penalties(logits, ids, **kw)
        yield Case(op="apply_penalties", impl="llmkern", shape=shape, flops=0.0, nbytes=nbytes, make=make_llmkern,
                   tensor_cores=False, note="includes the host-side history check (one sync)")
        if controls == "repetition" and transformers is not None:
            def make_hf():
                logits, ids = inputs()
                proc = transformers.RepetitionPenaltyLogitsProcessor(REPETITION)
                return lambda: proc(ids, logits.clone())   # it writes into its input: a fresh copy per call
            yield Case(op="apply_penalties", impl="transformers", shape=shape, flops=0.0, nbytes=nbytes,
                       make=make_hf, tensor_cores=False, note="includes a copy of the logits (it works in place)")
        if controls == "all":
            def make_dense():
                logits, ids = inputs()
                return lambda: torch_dense_penalties(logits, ids)
            yield Case(op="apply_penalties", impl="torch_dense", shape=shape, flops=0.0, nbytes=nbytes,
                       make=make_dense, tensor_cores=False)


# ------------------------------------------------------------------------------------------------------- suite
def cases(device: torch.device, quick: bool) -> Iterable[Case]:
    flashinfer = optional_import("flashinfer")
    transformers = optional_import("transformers")
    if device.type != "cuda":
        for batch, vocab in CPU_QUICK if quick else CPU_SHAPES:
            yield from _cases_for(batch, vocab, torch.bfloat16, device, None)
        yield from _speculative_cases(2, 1000, device, None)
        yield from _beam_cases(1, 1000, device)
        yield from _penalty_cases(2, 1000, 64, device, transformers)
        return
    shapes = QUICK if quick else [(b, v) for v in VOCABS for b in BATCHES]
    for batch, vocab in shapes:
        yield from _cases_for(batch, vocab, torch.bfloat16, device, flashinfer)
    vocabs = DECODING_VOCABS[-1:] if quick else DECODING_VOCABS
    for vocab in vocabs:
        for batch in (SPEC_BATCHES[::3] if quick else SPEC_BATCHES):
            yield from _speculative_cases(batch, vocab, device, flashinfer)
        for batch in (BEAM_BATCHES[:1] if quick else BEAM_BATCHES):
            yield from _beam_cases(batch, vocab, device)
    for batch in (PENALTY_BATCHES[1:2] if quick else PENALTY_BATCHES):
        for history in (HISTORIES[:1] if quick else HISTORIES):
            yield from _penalty_cases(batch, DECODING_VOCABS[-1], history, device, transformers)


def summarize(records: list[dict]) -> str:
    """Per op and shape: llmkern's time, its GB/s on the compulsory bytes, and its speedup over each peer."""
    groups: dict[tuple[str, str], dict[str, dict]] = {}
    for r in records:
        shape = " ".join(f"{k}={v}" for k, v in r["shape"].items() if k != "dtype")
        groups.setdefault((r["op"], shape), {})[r["impl"]] = r
    lines = ["", f"{'op':<19} {'shape':<52} {'llmkern ms':>11} {'GB/s':>8}  speedup over peers"]
    for (op, shape), recs in groups.items():
        if "llmkern" not in recs:
            continue
        ours = recs["llmkern"]
        peers = ", ".join(f"{impl} {r['median_ms'] / ours['median_ms']:.2f}x" for impl, r in recs.items()
                          if impl != "llmkern") or "-"
        lines.append(f"{op:<19} {shape:<52} {ours['median_ms']:>11.4f} {ours['gbps']:>8.1f}  {peers}")
    return "\n".join(lines)
