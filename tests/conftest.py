"""Test setup shared by every test module.

Device: with a CUDA GPU the tests run on CUDA tensors (the compiled kernels); without one they run on CPU tensors
through the Triton interpreter. TRITON_INTERPRET must be set before llmkern (and so its @triton.jit kernels) is
imported, hence here, at the top. LLMKERN_TEST_DEVICE=cpu forces the interpreter on a GPU machine.

Backends on CPU: a kernel test module that marks itself `pytestmark = pytest.mark.cpu_backends("interpreter",
"cpp")` runs each of its tests that take the `device` fixture twice: once through the Triton interpreter and once
through the C++ CPU backend (llmkern.cpu), with the same test matrix. A test marked
`@pytest.mark.cpu_backends("interpreter")` stays with the interpreter (it inspects Triton launches or tiles). The cpp
runs skip, saying why, only when the machine has no C++ compiler; any other build failure fails them (CI builds
the extension first with `llmkern build-ext`, which fails loudly).

A harness that covers every public op (tests/test_extremes.py, test_tensor_layouts.py) runs its cpp variant only
for the cases that reach a C++ kernel: `cpu_backends("interpreter", "cpp", cpp_case_params=("label", ...))` names the
test parameters that hold a case's public name or llmkern:: op name (a test has one of them, or none: then it
runs). A cpp case whose name runs no C++ kernel (MoE, beam search, the quantized-weight constructors: the reference
serves them, as in the interpreter cases) is deselected, counted as such in the summary: the harnesses' added time
stays small.
"""
import os
import shutil

import torch

if os.environ.get("LLMKERN_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu") == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
    DEVICE = "cpu"
else:
    DEVICE = "cuda"

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_backends(*names): on CPU, run the test once per backend "
                                       "('interpreter', 'cpp'); default: the interpreter only")


def pytest_generate_tests(metafunc):
    if DEVICE != "cpu" or "device" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("cpu_backends")
    backends = marker.args if marker is not None else ("interpreter",)
    metafunc.parametrize("device", backends, indirect=True)


# Public names whose llmkern:: op is not their own name (for runs_cpp).
_OP_OF_PUBLIC = {"apply_rope": "rope", "QuantLinear.forward": "quant_matmul", "QuantizedWeight.scales": "quant_matmul"}


def runs_cpp(name: str) -> bool:
    """Whether a harness case named after a public function or llmkern:: op ("apply_rope[tables]", "attention.scale",
    "QuantLinear.forward", "rope_") runs a C++ kernel on CPU: its op is in llmkern.cpu.implemented()."""
    from llmkern import cpu
    full = name.split("[")[0]
    return any(_OP_OF_PUBLIC.get(n, n) in cpu.implemented() for n in (full, full.split(".")[0]))


def pytest_collection_modifyitems(config, items):
    keep, dropped = [], []
    for item in items:
        marker = item.get_closest_marker("cpu_backends")
        params = getattr(getattr(item, "callspec", None), "params", {})
        names = [n for n in (marker.kwargs.get("cpp_case_params", ()) if marker else ()) if n in params]
        if params.get("device") == "cpp" and names and not runs_cpp(params[names[0]]):
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture
def device(request, monkeypatch) -> str:
    if getattr(request, "param", None) == "cpp":
        use_cpp_backend(monkeypatch)
    return DEVICE


def use_cpp_backend(monkeypatch) -> None:
    """Send CPU ops to the C++ backend for this test: the interpreter off, the C++ library required."""
    from llmkern import _utils, cpu
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler on this machine: the C++ CPU backend cannot be built")
    cpu.build()   # raises BuildError (and so fails the test) when a compiler is there but the build fails
    monkeypatch.setattr(_utils, "INTERPRET", False)
    monkeypatch.setenv(cpu.BACKEND_ENV, "cpp")


@pytest.fixture
def backend(request, device) -> str:
    """Which implementation serves this test's ops: "cpp" (the C++ CPU backend) or "triton" (compiled on a GPU,
    interpreted on CPU). For tests that call one backend's kernels directly."""
    callspec = getattr(request.node, "callspec", None)
    return "cpp" if callspec is not None and callspec.params.get("device") == "cpp" else "triton"


@pytest.fixture
def no_kernel(monkeypatch):
    """Bad input must be refused before any kernel runs: a Triton launch or a C++ call fails the test."""
    from llmkern import _utils, cpu

    def boom(*a, **k):
        raise AssertionError("a kernel was launched")
    monkeypatch.setattr(_utils, "launch", boom)
    monkeypatch.setattr(cpu, "_lib", boom)


def pytest_report_header(config):
    how = "CUDA tensors, compiled Triton kernels" if DEVICE == "cuda" else \
        "CPU tensors, Triton interpreter (and the C++ backend where a module asks for it)"
    return f"llmkern tests on {DEVICE}: {how}"
