"""Host overhead per call: the microseconds the host spends in each op's dispatch path, from the public function to
the kernel launch (issue 11: a decode step is a few milliseconds of GPU work, so per-call host time of tens of
microseconds times a few hundred calls per step is what keeps it off its roofline).

Every case calls one public op (or QuantLinear's forward) on tiny tensors, so the kernels themselves cost nothing
next to the host path. What is timed:
  * CPU: the Triton implementation's host path, the one a CUDA call runs (checks, torch.library dispatch, the op's
    `check`, configs, allocations, the launch arguments), with the kernel launches themselves replaced by no-ops
    (`stub_launches`: `_utils.INTERPRET` is set so that CPU tensors take the Triton implementation, and the Triton
    kernels' `run` returns at once). Triton's own launch cost (argument binding, cache lookup, cuLaunchKernel) is
    not in these numbers, and neither is the wait of a device-to-host sync (free on CPU; tests/conftest.py's
    `no_host_sync` fixture is what shows an op makes none).
  * CUDA: the real path, launches included. host_us is the wall time of CALLS back-to-back calls (the host is the
    bottleneck with tiny tensors: the GPU waits for each launch), stream_us the CUDA-event time of the same calls;
    host_us close to stream_us says the op is host-bound at this size.
Each number is per call, from the fastest of ROUNDS rounds of CALLS calls (timeit's rule: on a shared machine the
fastest round is the one least disturbed by other processes; the median moved by half between runs on 2 busy cores).

    llmkern bench host [--json PATH]
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterable, Iterator

import torch

import llmkern
from llmkern import _utils
from llmkern.bench.common import Case, device_name

CALLS = 200
ROUNDS = 9


@contextlib.contextmanager
def stub_launches() -> Iterator[None]:
    """CPU tensors take the Triton implementation's host path and every Triton kernel launch returns at once (see
    the module docstring). Outputs hold whatever torch.empty left in them."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    saved = (_utils.INTERPRET, JITFunction.run, InterpretedFunction.run)
    _utils.INTERPRET = True
    JITFunction.run = InterpretedFunction.run = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        _utils.INTERPRET, JITFunction.run, InterpretedFunction.run = saved


# ----------------------------------------------------------------------------------------------- the cases
def _randn(*shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def _calls(device: torch.device) -> Iterable[tuple[str, dict[str, Any], Callable[[], Callable[[], Any]]]]:
    """(op, shape, build) per case; build() makes the inputs and returns the call to time. Shapes are a decode step's
    at toy sizes: 4 sequences, hidden 256, 4 query / 2 KV heads of 64, vocab 512."""
    f16 = torch.float16
    tokens, hidden, vocab = 4, 256, 512

    def quant(m, *, act_order=False):
        def build():
            w = _randn(hidden, hidden, dtype=f16, seed=1)
            qw = llmkern.quantize_weight(w, bits=4, group_size=128)
            if act_order:   # a non-trivial permutation: the GPTQ act-order path
                g_idx = (torch.arange(hidden) % (hidden // 128)).to(torch.int32)
                qw = llmkern.QuantizedWeight.from_codes(qw.codes(), qw.zeros, qw.scales, bits=4, group_size=128,
                                                        g_idx=g_idx)
            qw = qw.to(device)
            x = _randn(m, hidden, dtype=f16, device=device)
            return lambda: llmkern.quant_matmul(x, qw)
        return build

    def quant_linear(m):
        def build():
            mod = llmkern.QuantLinear.from_linear(torch.nn.Linear(hidden, hidden, dtype=f16), bits=4, group_size=128)
            mod = mod.to(device)
            x = _randn(m, hidden, dtype=f16, device=device)
            return lambda: mod(x)
        return build

    def sampler(tensor_params: bool, probs: bool = False, prebuilt: bool = False):
        def build():
            logits = _randn(tokens, vocab, device=device)
            if tensor_params:
                params = dict(temperature=torch.full((tokens,), 0.8, device=device),
                              top_k=torch.full((tokens,), 50, dtype=torch.int32, device=device),
                              top_p=torch.full((tokens,), 0.9, device=device),
                              min_p=torch.zeros(tokens, device=device))
                seed = torch.arange(tokens, dtype=torch.int64, device=device)
                if prebuilt:   # checked once, as a decode loop builds them (llmkern.SamplingParams)
                    params = dict(params=llmkern.SamplingParams(**params, batch=tokens, device=device))
            else:
                params, seed = dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.0), 1234
            if probs:
                return lambda: llmkern.sampling_probs(logits, **params)
            return lambda: llmkern.sample(logits, seed=seed, **params)
        return build

    def penalties(tensor_params: bool):
        def build():
            logits = _randn(tokens, vocab, device=device)
            history = torch.randint(0, vocab, (tokens, 64), generator=torch.Generator().manual_seed(0)).to(device)
            value = (lambda v: torch.full((tokens,), v, device=device)) if tensor_params else (lambda v: v)
            return lambda: llmkern.apply_penalties(logits, history, repetition_penalty=value(1.2),
                                                   presence_penalty=value(0.1), frequency_penalty=value(0.1))
        return build

    def speculative():
        k = 4
        q = torch.softmax(_randn(tokens, k, vocab, device=device), -1)
        p = torch.softmax(_randn(tokens, k + 1, vocab, device=device, seed=1), -1)
        ids = torch.randint(0, vocab, (tokens, k), generator=torch.Generator().manual_seed(0)).to(device)
        seed = torch.arange(tokens, dtype=torch.int64, device=device)
        return lambda: llmkern.speculative_sample(q, ids, p, seed=seed)

    def beam():
        logits = _randn(tokens * 2, vocab, device=device)
        scores = torch.zeros(tokens * 2, device=device)
        return lambda: llmkern.beam_topk(logits, scores, num_beams=2)

    def norm(residual: bool):
        def build():
            x, r = _randn(tokens, hidden, dtype=f16, device=device), _randn(tokens, hidden, dtype=f16, device=device)
            w = _randn(hidden, dtype=f16, device=device, seed=2)
            if residual:
                return lambda: llmkern.add_rms_norm(x, r, w, 1e-5)
            return lambda: llmkern.rms_norm(x, w, 1e-5)
        return build

    def rope(mode: str):
        def build():
            q = _randn(tokens, 4, 64, dtype=f16, device=device)
            k = _randn(tokens, 2, 64, dtype=f16, device=device, seed=1)
            pos = torch.arange(100, 100 + tokens, device=device)
            if mode == "positions":
                return lambda: llmkern.apply_rope(q, k, pos)
            if mode == "inplace":
                return lambda: llmkern.apply_rope(q, k, pos, inplace=True)
            angles = pos[:, None].float() * torch.ones(32, device=device)   # values do not matter here
            cos, sin = torch.cat([angles.cos()] * 2, -1).to(f16), torch.cat([angles.sin()] * 2, -1).to(f16)
            return lambda: llmkern.apply_rope(q, k, cos=cos, sin=sin)    # as llmkern.generate calls it
        return build

    def moe_topk():
        logits = _randn(tokens, 8, device=device)
        return lambda: llmkern.moe_topk(logits, 2)

    def fused_moe(quantized: bool):
        def build():
            x = _randn(tokens, hidden, dtype=f16, device=device)
            w13 = _randn(8, 128, hidden, dtype=f16, seed=1) / 16
            w2 = _randn(8, hidden, 64, dtype=f16, seed=2) / 8
            if quantized:
                w13, w2 = (llmkern.quantize_experts(w, bits=4, group_size=64) for w in (w13, w2))
            w13, w2 = w13.to(device), w2.to(device)
            weights, ids = llmkern.moe_topk(_randn(tokens, 8, device=device, seed=3), 2)
            return lambda: llmkern.fused_moe(x, w13, w2, weights, ids)
        return build

    def attention():
        q = _randn(1, tokens, 4, 64, dtype=f16, device=device)
        k, v = (_randn(1, 16, 2, 64, dtype=f16, device=device, seed=s) for s in (1, 2))
        return lambda: llmkern.attention(q, k, v, causal=True)

    yield "quant_matmul", dict(m=1, k=hidden, n=hidden, bits=4), quant(1)
    yield "quant_matmul", dict(m=4, k=hidden, n=hidden, bits=4), quant(4)
    yield "quant_matmul", dict(m=32, k=hidden, n=hidden, bits=4), quant(32)
    yield "quant_matmul", dict(m=1, k=hidden, n=hidden, bits=4, act_order=True), quant(1, act_order=True)
    yield "QuantLinear", dict(m=1, k=hidden, n=hidden, bits=4), quant_linear(1)
    yield "sample", dict(batch=tokens, vocab=vocab, params="scalar"), sampler(False)
    yield "sample", dict(batch=tokens, vocab=vocab, params="tensor"), sampler(True)
    yield "sample", dict(batch=tokens, vocab=vocab, params="SamplingParams"), sampler(True, prebuilt=True)
    yield "sampling_probs", dict(batch=tokens, vocab=vocab, params="scalar"), sampler(False, probs=True)
    yield "sampling_probs", dict(batch=tokens, vocab=vocab, params="tensor"), sampler(True, probs=True)
    yield "sampling_probs", dict(batch=tokens, vocab=vocab, params="SamplingParams"), \
        sampler(True, probs=True, prebuilt=True)
    yield "apply_penalties", dict(batch=tokens, vocab=vocab, history=64, params="scalar"), penalties(False)
    yield "apply_penalties", dict(batch=tokens, vocab=vocab, history=64, params="tensor"), penalties(True)
    yield "speculative_sample", dict(batch=tokens, k=4, vocab=vocab), speculative
    yield "beam_topk", dict(batch=tokens, beams=2, vocab=vocab), beam
    yield "rms_norm", dict(tokens=tokens, hidden=hidden), norm(False)
    yield "add_rms_norm", dict(tokens=tokens, hidden=hidden), norm(True)
    yield "apply_rope", dict(tokens=tokens, heads=4, kv_heads=2, head_dim=64, angles="cos/sin"), rope("table")
    yield "apply_rope", dict(tokens=tokens, heads=4, kv_heads=2, head_dim=64, angles="positions"), rope("positions")
    yield "apply_rope", dict(tokens=tokens, heads=4, kv_heads=2, head_dim=64, angles="positions, inplace"), \
        rope("inplace")
    yield "moe_topk", dict(tokens=tokens, experts=8, top_k=2), moe_topk
    yield "fused_moe", dict(tokens=tokens, hidden=hidden, inter=64, experts=8, weights="dense"), fused_moe(False)
    yield "fused_moe", dict(tokens=tokens, hidden=hidden, inter=64, experts=8, weights="int4"), fused_moe(True)
    yield "attention", dict(batch=1, seqlen_q=tokens, seqlen_k=16, heads=4, kv_heads=2, head_dim=64), attention


def cases(device: torch.device, quick: bool) -> Iterable[Case]:
    """One Case per op call (the same list with --quick: each is a fraction of a second). A case's function makes
    one call; on CPU its launches are stubbed (module docstring), and `.raw` is the call without the stub."""
    for op, shape, build in _calls(device):
        def make(build=build):
            fn = build()
            if device.type == "cuda":
                return fn

            def stubbed():
                with stub_launches():
                    return fn()
            stubbed.raw = fn
            return stubbed
        yield Case(op=op, impl="llmkern_host", shape=shape, flops=0.0, nbytes=0.0, make=make, tensor_cores=False,
                   note="host overhead per call (bench/host.py)")


# ----------------------------------------------------------------------------------------------- timing
def host_us(fn: Callable[[], Any], device: torch.device) -> dict[str, float]:
    """Microseconds per call in the fastest of ROUNDS rounds of CALLS calls: {"host_us"} on CPU (launches stubbed),
    {"host_us", "stream_us"} on CUDA (wall time, CUDA events)."""
    cuda = device.type == "cuda"
    walls, streams = [], []
    with contextlib.nullcontext() if cuda else stub_launches():
        fn()   # warm-up: first-call work (tuner creation, compilation on CUDA) is not per-call overhead
        for _ in range(ROUNDS):
            if cuda:
                torch.cuda.synchronize(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            for _ in range(CALLS):
                fn()
            walls.append((time.perf_counter() - t0) * 1e6 / CALLS)
            if cuda:
                end.record()
                end.synchronize()
                streams.append(start.elapsed_time(end) * 1e3 / CALLS)
    out = {"host_us": min(walls)}
    if cuda:
        out["stream_us"] = min(streams)
    return out


def run_suite(cases: Iterable[Case], device: torch.device, *, log: Callable[[str], None] = print) -> list[dict]:
    """The CLI's runner for this suite (instead of bench.common.run_suite): per case, host_us (and stream_us on
    CUDA); median_ms is host_us / 1000, so the common record format holds."""
    records = []
    for case in cases:
        fn = case.make()
        timing = host_us(getattr(fn, "raw", fn), device)
        rec = {"op": case.op, "impl": case.impl, "shape": case.shape, "device": device_name(device),
               "median_ms": timing["host_us"] / 1e3, "flops": 0.0, "bytes": 0.0, "tensor_cores": False,
               "roofline_ms": None, "pct_roofline": None, "bound": None, "note": case.note, **timing}
        records.append(rec)
        log("  " + format_record(rec))
    return records


def format_record(r: dict[str, Any]) -> str:
    shape = " ".join(f"{k}={v}" for k, v in r["shape"].items())
    stream = f" {r['stream_us']:8.1f} us stream" if "stream_us" in r else ""
    return f"{r['op']:<20} {shape:<62} {r['host_us']:8.1f} us host{stream}"
