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
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from llmkern import _utils, cpu

    def boom(*a, **k):
        raise AssertionError("a kernel was launched")
    monkeypatch.setattr(_utils, "launch", boom)
    monkeypatch.setattr(JITFunction, "run", boom)             # kernels launched as kernel[grid](...), not via launch
    monkeypatch.setattr(InterpretedFunction, "run", boom)
    monkeypatch.setattr(cpu, "_lib", boom)


@pytest.fixture
def cpp_calls(monkeypatch) -> list:
    """The names of the C++ functions (torch.ops.llmkern_cpu.*) this test calls, in order: a test that runs on the
    cpp backend can assert that its ops reached C++ rather than falling back to the reference."""
    from llmkern import cpu
    calls, lib = [], cpu._lib

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(lib(), name)
    monkeypatch.setattr(cpu, "_lib", Spy)
    return calls


def pytest_report_header(config):
    how = "CUDA tensors, compiled Triton kernels" if DEVICE == "cuda" else \
        "CPU tensors, Triton interpreter (and the C++ backend where a module asks for it)"
    return f"llmkern tests on {DEVICE}: {how}"


# ------------------------------------------------------------------------------------------------- no host sync
# What copies a device tensor's values to the host, or waits for the device, reached from Python: each name is
# patched to fail inside `with no_host_sync():` (module docstring of the fixture). Tensor methods, then torch functions.
_SYNC_TENSOR_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__",
                        "__array__", "__repr__", "__format__", "nonzero", "argwhere", "masked_select", "unique",
                        "unique_consecutive", "bincount", "equal", "allclose")
_SYNC_TORCH_FUNCTIONS = ("nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount", "equal",
                         "allclose")


def _bool_index(self, index, *rest) -> bool:
    """t[mask] / t[mask] = x with a bool tensor: the selected count is read on the host (nonzero)."""
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _to_host(self, *args, **kwargs) -> bool:
    device = torch._C._nn._parse_to(*args, **kwargs)[0]
    return device is not None and device.type == "cpu"


def _copy_to_host(self, src, *rest, **kwargs) -> bool:
    return self.device.type == "cpu" and isinstance(src, torch.Tensor) and src.device.type != "cpu"


def _sized_by_repeats(*args, **kwargs) -> bool:
    """repeat_interleave with tensor repeats (x.repeat_interleave(r), torch.repeat_interleave(x, r) or
    torch.repeat_interleave(r)) and no output_size: the output's size is the repeats' sum, read on the host."""
    repeats = kwargs.get("repeats", args[1] if len(args) > 1 else args[0] if args else None)
    return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None


class _NoHostSync:
    """Inside `with no_host_sync():`, any listed host sync fails the test with an AssertionError naming it. Kernel
    launches (llmkern._utils.launch) are exempt: on a GPU a launch is asynchronous, and the Triton interpreter that
    stands in for it on CPU reads its tensors on the host."""

    def __init__(self, monkeypatch):
        from llmkern import _utils
        self.active = 0
        self.paused = 0
        for name in _SYNC_TENSOR_METHODS:
            self._patch(monkeypatch, torch.Tensor, name, f"Tensor.{name}")
        for name in _SYNC_TORCH_FUNCTIONS:
            self._patch(monkeypatch, torch, name, f"torch.{name}")
        self._patch(monkeypatch, torch.Tensor, "__getitem__", "boolean-mask indexing", _bool_index)
        self._patch(monkeypatch, torch.Tensor, "__setitem__", "boolean-mask assignment", _bool_index)
        self._patch(monkeypatch, torch.Tensor, "to", "Tensor.to(a CPU device)", _to_host)
        self._patch(monkeypatch, torch.Tensor, "copy_", "Tensor.copy_ from a device to the host", _copy_to_host)
        for owner, what in ((torch.Tensor, "Tensor"), (torch, "torch")):
            self._patch(monkeypatch, owner, "repeat_interleave", f"{what}.repeat_interleave without output_size",
                        _sized_by_repeats)
        self._patch(monkeypatch, torch.cuda, "synchronize", "torch.cuda.synchronize")
        self._patch(monkeypatch, torch.cuda.Stream, "synchronize", "torch.cuda.Stream.synchronize")
        self._patch(monkeypatch, torch.cuda.Event, "synchronize", "torch.cuda.Event.synchronize")
        launch = _utils.launch

        def exempt_launch(*args, **kwargs):
            self.paused += 1
            try:
                return launch(*args, **kwargs)
            finally:
                self.paused -= 1
        monkeypatch.setattr(_utils, "launch", exempt_launch)

    def _patch(self, monkeypatch, owner, name, what, refuse=None):
        original = getattr(owner, name)

        def guarded(*args, **kwargs):
            if self.active and not self.paused and (refuse is None or refuse(*args, **kwargs)):
                raise AssertionError(f"host sync inside no_host_sync: {what}")
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, name, guarded)

    def __call__(self):
        return self

    def __enter__(self):
        self.active += 1
        return self

    def __exit__(self, *exc):
        self.active -= 1
        return False


@pytest.fixture
def no_host_sync(monkeypatch):
    """A context manager, `with no_host_sync(): ...`, inside which a device-to-host transfer or a wait for the device
    fails the test: Tensor.item/tolist/cpu/numpy, bool()/int()/float()/index of a tensor, printing one, nonzero,
    argwhere, masked_select, unique, bincount, equal/allclose, boolean-mask indexing and assignment, .to(a CPU device),
    copy_ from a device into a CPU tensor, repeat_interleave sized by its repeats, torch.cuda.synchronize and
    Stream/Event.synchronize. It works on CPU tensors too, where none of these would wait for anything, so CI checks
    the hot paths without a GPU. Kernel launches are exempt (see _NoHostSync)."""
    return _NoHostSync(monkeypatch)
