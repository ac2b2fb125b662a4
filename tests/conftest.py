"""Test setup shared by every test module.

Device: with a CUDA GPU the tests run on CUDA tensors (the compiled kernels); without one they run on CPU tensors
through the Triton interpreter. TRITON_INTERPRET must be set before llmkern (and so its @triton.jit kernels) is
imported, hence here, at the top. LLMKERN_TEST_DEVICE=cpu forces the interpreter on a GPU machine.
"""
import os

import torch

if os.environ.get("LLMKERN_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu") == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
    DEVICE = "cpu"
else:
    DEVICE = "cuda"

import pytest  # noqa: E402


@pytest.fixture
def device() -> str:
    return DEVICE


def pytest_report_header(config):
    how = "CUDA tensors, compiled Triton kernels" if DEVICE == "cuda" else "CPU tensors, Triton interpreter"
    return f"llmkern tests on {DEVICE}: {how}"
