"""End-to-end model steps: prefill and decode tokens/s of a Llama-3-8B-shaped model, llmkern vs transformers.

On CUDA the model is `LlamaConfig` with Llama-3-8B's dimensions (llmkern.models "llama-3-8b") and random weights
in bf16 (no downloads), built once and shared by every case so all implementations run the same weights. On CPU a
tiny config of the same structure (hidden 256, 2 layers, 8/2 heads of 32, vocab 512) in bf16 stands in: the suite
runs, on the CPU path, and its numbers say nothing about a GPU.

What one timed call is (every implementation produces the last-token logits of each sequence; sampling is not
timed):
  prefill  `batch` prompts of `context` tokens, K/V written to the cache.
    llmkern               llmkern.generate's step (embeddings, llmkern RMSNorm/RoPE, the model's Linear layers,
                          paged_kv_write + paged_prefill_attention into a PagedKVCache), prompts packed (varlen).
    transformers_sdpa     model(input_ids, logits_to_keep=1) with attn_implementation="sdpa" and a fresh
                          DynamicCache, as model.generate's prefill does.
    transformers_llmkern  the same call with attn_implementation="llmkern" (only attention differs from SDPA).
  decode   one new token for each of `batch` sequences whose cache holds `context` tokens (the new one included).
    llmkern               the same step (ModelRunner.forward: one PagedAttentionPlan, run in every layer), eager.
    llmkern_graph         ModelRunner.decode, the fixed-shape step llmkern.generate runs for decode tokens: batch
                          padded to a graph size, static buffers, plan.update; on CUDA captured once as a CUDA graph
                          and replayed (on CPU the same padded step runs eagerly: nothing to capture).
    transformers_sdpa     model(next_token, cache=cache) on a DynamicCache of context - 1 tokens, cropped
                          back after each call (DynamicCache appends by concatenation, as in model.generate).
    transformers_llmkern  the same with attn_implementation="llmkern".
    llmkern_int4          the llmkern step after llmkern.quantize_model(bits=4, group_size=128) (lm_head kept bf16);
                          these cases run last because quantization replaces the shared model's Linear layers.
Host overhead per decode step, in each decode record:
  host_ms      (CUDA) the host's wall time to issue one step, without waiting for the GPU: a step whose host_ms
               approaches its median_ms is host-bound (the GPU idles between launches); graphs cut it to the
               preparation plus one replay.
  prepare_ms   (llmkern_graph, every device) the host work of a graph step before its replay: cache slots, block
               tables, plan.update, one host-to-device copy of the inputs. On CPU every kernel runs synchronously
               on the host, so this is the one host overhead a CPU run can separate.
FLOPs and bytes come from llmkern.roofline's prefill_step / decode_step (the `llmkern roofline` tool's formulas), so
each record's "% of roofline" is measured time against the roofline's lowest time for that step. `summarize` prints
tokens/s per implementation.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

from llmkern.bench.common import Case

# Shapes: (batch, context). Prefill of 2k-token prompts is compute-bound on an H100; decode at batch 1..64 is
# memory-bound (weights dominate at small batch, the KV cache grows with batch x context).
CUDA_PREFILL = [(1, 2048), (4, 1024)]
CUDA_DECODE = [(1, 1024), (16, 1024), (64, 1024)]
CUDA_QUICK_PREFILL = [(1, 512)]
CUDA_QUICK_DECODE = [(16, 512)]
CPU_PREFILL = [(2, 32)]
CPU_DECODE = [(2, 32)]

_MODEL: dict[str, Any] = {}   # the one shared model per process (built lazily by the first case that runs)


def _config(device: torch.device):
    import transformers
    from llmkern.models import get_model
    if device.type == "cuda":
        s = get_model("llama-3-8b")
        # rope_theta 500000: Llama-3's config.json value (not part of the shape table; it does not change timing)
        return transformers.LlamaConfig(hidden_size=s.hidden, intermediate_size=s.intermediate,
                                        num_hidden_layers=s.layers, num_attention_heads=s.heads,
                                        num_key_value_heads=s.kv_heads, head_dim=s.head_dim, vocab_size=s.vocab,
                                        tie_word_embeddings=s.tied_embeddings, rope_theta=500000.0,
                                        max_position_embeddings=8192), s.name
    # CPU stand-in: the smallest dims that keep Llama-3-8B's structure (GQA 4:1, head_dim >= 32, int4 groups of 128)
    return transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                    num_attention_heads=8, num_key_value_heads=2, head_dim=32, vocab_size=512,
                                    max_position_embeddings=512), "tiny Llama (CPU stand-in)"


def _shape_of(config, name: str):
    from llmkern.models import ModelShape
    return ModelShape(name, hidden=config.hidden_size, layers=config.num_hidden_layers,
                      heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
                      head_dim=config.head_dim, intermediate=config.intermediate_size, vocab=config.vocab_size,
                      tied_embeddings=bool(config.tie_word_embeddings), source="bench/e2e.py")


def _model(device: torch.device, *, int4: bool = False):
    """The shared random-weight model; quantized in place (once) when an int4 case asks for it."""
    import transformers
    import llmkern.integrations.transformers  # noqa: F401  (registers "llmkern")
    key = str(device)
    if key not in _MODEL:
        config, _ = _config(device)
        torch.manual_seed(0)
        with torch.device(device):
            model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
        _MODEL[key] = {"model": model.eval(), "int4": False}
    entry = _MODEL[key]
    if int4 and not entry["int4"]:
        import llmkern
        llmkern.quantize_model(entry["model"], bits=4, group_size=128)
        entry["int4"] = True
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if entry["int4"] and not int4:
        raise RuntimeError("bench e2e: a bf16 case ran after the shared model was quantized; int4 cases go last")
    return entry["model"]


def _prompt_ids(batch: int, length: int, vocab: int, device: torch.device) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1)).to(device)


# -------------------------------------------------------------------------------------------- timed functions
def _llmkern_step(device: torch.device, batch: int, context: int, decode: bool, int4: bool = False,
                  graph: bool = False):
    import llmkern
    from llmkern.generate import BLOCK_SIZE, ModelRunner
    model = _model(device, int4=int4)
    cfg = model.config
    blocks = batch * -(-context // BLOCK_SIZE)
    cache = llmkern.PagedKVCache(cfg.num_hidden_layers, blocks, BLOCK_SIZE, cfg.num_key_value_heads, cfg.head_dim,
                                 dtype=torch.bfloat16, device=device)
    runner = ModelRunner(model, cache, cuda_graph=graph)
    seqs = list(range(batch))
    if graph:
        for s in seqs:
            cache.append(s, context - 1)
        last = _prompt_ids(batch, 1, cfg.vocab_size, device).view(-1).tolist()

        @torch.no_grad()
        def step():
            logits, _ = runner.decode(seqs, last)   # reserves one slot per sequence: give it back (host only)
            for s in seqs:
                cache.truncate(s, context - 1)
            return logits
        return step
    if decode:
        # the first context - 1 tokens are already cached (their values do not change the timing); the timed call
        # writes and attends the last one, rewriting the same slot on every repetition
        for s in seqs:
            cache.append(s, context - 1)
        slots = torch.cat([cache.append(s, 1) for s in seqs])
        tokens = _prompt_ids(batch, 1, cfg.vocab_size, device).view(-1)
        positions = torch.full((batch,), context - 1, dtype=torch.int64, device=device)
        q_lens = [1] * batch
    else:
        slots = torch.cat([cache.append(s, context) for s in seqs])
        tokens = _prompt_ids(batch, context, cfg.vocab_size, device).view(-1)
        positions = torch.arange(context, device=device).repeat(batch)
        q_lens = [context] * batch

    @torch.no_grad()
    def run():
        return runner.forward(tokens, positions, seqs, q_lens, slots)
    return run


def _hf_step(device: torch.device, batch: int, context: int, decode: bool, attn: str):
    from transformers import DynamicCache
    model = _model(device)
    model.set_attn_implementation(attn)
    vocab = model.config.vocab_size
    if not decode:
        ids = _prompt_ids(batch, context, vocab, device)

        @torch.no_grad()
        def run():
            return model(ids, cache=DynamicCache(config=model.config), use_cache=True,
                         logits_to_keep=1).logits
        return run
    past = context - 1
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(_prompt_ids(batch, past, vocab, device), cache=cache, use_cache=True, logits_to_keep=1)
    nxt = _prompt_ids(batch, 1, vocab, device)

    @torch.no_grad()
    def run():
        out = model(nxt, cache=cache, use_cache=True).logits
        cache.crop(-1)  # drop the token just appended: the next call sees the same context
        return out
    return run


# ------------------------------------------------------------------------------------------------------ cases
def cases(device: torch.device, quick: bool) -> Iterable[Case]:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return
    from llmkern import roofline
    config, name = _config(device)
    shape = _shape_of(config, name)
    if device.type == "cuda":
        prefill, decode = (CUDA_QUICK_PREFILL, CUDA_QUICK_DECODE) if quick else (CUDA_PREFILL, CUDA_DECODE)
    else:
        prefill, decode = CPU_PREFILL, CPU_DECODE
    note = "" if device.type == "cuda" else "CPU stand-in: tiny Llama config, the CPU path"

    def case(op, impl, batch, context, make, bits=None):
        step = (roofline.prefill_step if op == "e2e_prefill" else roofline.decode_step)(shape, batch, context, bits)
        metrics = None if op == "e2e_prefill" or not impl.startswith("llmkern") else _host_overhead
        return Case(op=op, impl=impl, shape={"model": name, "batch": batch, "context": context, "tokens": step.tokens},
                    flops=step.flops, nbytes=step.bytes, make=make, note=note, metrics=metrics)

    for op, shapes, is_decode in (("e2e_prefill", prefill, False), ("e2e_decode", decode, True)):
        for batch, context in shapes:
            yield case(op, "llmkern", batch, context,
                       lambda b=batch, c=context, d=is_decode: _llmkern_step(device, b, c, decode=d))
            if is_decode:
                yield case(op, "llmkern_graph", batch, context,
                           lambda b=batch, c=context: _llmkern_step(device, b, c, decode=True, graph=True))
            for attn in ("sdpa", "llmkern"):
                yield case(op, f"transformers_{attn}", batch, context,
                           lambda b=batch, c=context, d=is_decode, a=attn: _hf_step(device, b, c, decode=d, attn=a))
    # int4 last: it quantizes the shared model in place
    for batch, context in decode:
        yield case("e2e_decode", "llmkern_int4", batch, context,
                   lambda b=batch, c=context: _llmkern_step(device, b, c, decode=True, int4=True), bits=4)


def _host_overhead(step, device: torch.device, reps: int = 20) -> dict[str, float]:
    """The decode records' host_ms and prepare_ms (module docstring): medians over reps calls of the timed step."""
    import statistics
    import time
    from llmkern.generate import _DecodeStep

    def median_ms(fn) -> float:
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return statistics.median(times)

    out = {"host_ms": median_ms(step)} if device.type == "cuda" else {}
    run, calls = _DecodeStep.run, []
    _DecodeStep.run = lambda self: calls.append(1)      # the step's host work alone (no replay, no kernel)
    try:
        prepare = median_ms(step)
    finally:
        _DecodeStep.run = run
    if calls:    # the step went through ModelRunner.decode
        out["prepare_ms"] = prepare
    return out


def summarize(records: list[dict]) -> str:
    """Tokens/s per step and implementation, with the roofline's lowest time when the device is known."""
    head = (f"{'step':<12} {'batch':>5} {'context':>7} {'impl':<22} {'ms':>10} {'tokens/s':>12} {'floor ms':>9} "
            f"{'% roof':>7} {'host ms':>8} {'prep ms':>8}")
    lines = ["", head, "-" * len(head)]
    for r in records:
        s = r["shape"]
        tps = s["tokens"] / (r["median_ms"] * 1e-3)
        floor = "-" if r["roofline_ms"] is None else f"{r['roofline_ms']:.3f}"
        pct = "-" if r["pct_roofline"] is None else f"{r['pct_roofline']:.1f}%"
        host, prep = (f"{r[k]:.3f}" if k in r else "-" for k in ("host_ms", "prepare_ms"))
        lines.append(f"{r['op'].removeprefix('e2e_'):<12} {s['batch']:>5} {s['context']:>7} {r['impl']:<22} "
                     f"{r['median_ms']:>10.3f} {tps:>12.1f} {floor:>9} {pct:>7} {host:>8} {prep:>8}")
    return "\n".join(lines)
