"""How every `llmkern::` op is declared, and which implementation serves each device.

One decorator declares an op from its Triton implementation:

    @_dispatch.custom_op("attention", mutates_args=(), reference=_attention_reference, check=None)
    def _attention_op(q: torch.Tensor, ..., return_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ...  # allocate, launch the Triton kernel, return

    @_attention_op.register_fake
    def _(q, ...): ...  # shapes and dtypes only (torch.compile traces through this)

The result is an `Op`: calling it calls `torch.ops.llmkern.attention` (the OpOverload, also in `OPS`). The public
function validates its arguments and then calls this object; nothing in llmkern calls an op through `torch.ops`.

Registration is torch.library's low-level one (`Library.define` with the schema inferred from the annotations, and
`Library.impl` per dispatch key, as vLLM's `direct_register_custom_op`), not `torch.library.custom_op`: that wrapper
runs Python autograd and aliasing layers on every call, about 17 us per call on this project's CPU against 3.5 us
(bench/host.py measures every op's path). The ops are inference-only: called through `Op` (as every public
function does) with grad mode on and an input that requires grad, an op returns outputs whose backward raises a
RuntimeError naming the op (the contract custom_op gave too), instead of torch's autograd fallback, which only warns
and leaves the inputs without gradients. The check costs one `torch.is_grad_enabled()` under no_grad and
inference_mode; torch.ops.llmkern.* called directly get torch's fallback.

Which implementation runs (torch.library's per-device registration, as vLLM and Hugging Face's kernels do it):
  * CUDA tensors: the Triton implementation (the decorated function).
  * CPU tensors, in this order:
      1. the same Triton implementation, under the interpreter, when `_utils.INTERPRET` (TRITON_INTERPRET=1 was set
         before llmkern was imported);
      2. the C++ CPU backend, when `llmkern.cpu.kernel(name)` returns a callable;
      3. `reference`, the plain-PyTorch adapter over `llmkern.reference`.
The three take exactly the op's schema arguments, positionally, and return what the op returns (a mutating op
mutates its arguments and returns None). A C++ kernel that lacks a feature the arguments ask for returns
`NotImplemented` before touching anything, and the reference runs instead (no C++ kernel does today). `contiguous` names the tensor arguments the kernels read with unit stride
(index tensors such as seq_lens or slot_mapping, whose kernels take no strides): each is made contiguous (a copy only
when it is not) before `check` and before every implementation, so that what `check` validates is exactly what every
implementation reads, whatever view the caller passed. A mutated argument is never copied (the copy would be
written instead of the caller's tensor): its kernels honour its strides.
`check` (optional, same arguments, returns nothing) holds the checks an op needs when it is called directly
(torch.ops.llmkern.*), and any value checks that need the tensors' contents (a device-to-host sync: block ids within
the cache, lengths within the tables). It runs before every implementation, on every device, so no implementation
ever sees values that would make it read or write outside the caller's tensors, and it lives inside the op so a
`torch.compile(fullgraph=True)` graph holds the op without a data-dependent break. A check on the hot path of a
decode step (issue 11) must need no sync and cost little: `signature_checked` runs such a check once per argument
signature (quant.py caches its checks the same way, with the weight format they build).
"""
from __future__ import annotations

import inspect
from typing import Callable, Iterable, Optional

import torch

from llmkern import _utils, cpu

NAMESPACE = "llmkern"
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")

# Every op declared through `custom_op`, by name without the namespace ("attention", "rms_norm", ...).
OPS: dict[str, torch._ops.OpOverload] = {}


class Op:
    """An llmkern:: op as `custom_op` declares it: call it with the schema's arguments, positionally."""

    def __init__(self, name: str):
        self.name = name
        self.overload = OPS[name]
        self._call = self.overload._op     # the dispatcher entry itself: no Python frame of OpOverload.__call__

    def __call__(self, *args):
        if torch.compiler.is_compiling():   # dynamo traces the OpOverload, not the raw dispatcher entry
            return self.overload(*args)
        out = self._call(*args)
        if torch.is_grad_enabled():
            grads = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
            if grads:
                return _NoBackward.wrap(self.name, grads, out)
        return out

    def register_fake(self, fake: Callable) -> Callable:
        """Register the fake implementation (shapes and dtypes only) that torch.compile and FakeTensor run."""
        torch.library.register_fake(f"{NAMESPACE}::{self.name}", fake, lib=_LIB)
        return fake


class _NoBackward(torch.autograd.Function):
    """Ties an op's outputs to its inputs that require grad, with a backward that raises (module docstring)."""

    @staticmethod
    def forward(ctx, name: str, num_outputs: int, *tensors: torch.Tensor):
        ctx.name = name
        outputs = tuple(t.view_as(t) for t in tensors[len(tensors) - num_outputs:])
        return outputs[0] if num_outputs == 1 else outputs

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"llmkern::{ctx.name} has no backward: llmkern's ops are inference-only (call them under "
                           "torch.no_grad() or torch.inference_mode(), or detach their inputs)")

    @staticmethod
    def wrap(name: str, grads: list[torch.Tensor], out):
        if isinstance(out, torch.Tensor):
            return _NoBackward.apply(name, 1, *grads, out)
        if isinstance(out, (tuple, list)) and out and all(isinstance(t, torch.Tensor) for t in out):
            return type(out)(_NoBackward.apply(name, len(out), *grads, *out))
        return out          # a mutating op's None


def custom_op(name: str, *, mutates_args: Iterable[str] | str, reference: Callable,
              check: Optional[Callable] = None,
              contiguous: Iterable[str] = ()) -> Callable[[Callable], Op]:
    """Declare `llmkern::<name>` from its Triton implementation (the decorated function, whose annotations give the
    schema); CUDA runs it, CPU runs it under the interpreter or else the C++ backend or `reference` (module
    docstring). `contiguous`: arguments every implementation receives contiguous (module docstring). Returns the op;
    register its fake implementation with `@op.register_fake`."""
    def declare(triton_impl: Callable) -> Op:
        schema = torch.library.infer_schema(triton_impl, mutates_args=mutates_args)
        prepare = _contiguous_args(triton_impl, contiguous, mutates_args)

        def on_cuda(*args):
            args = prepare(args)
            if check is not None:
                check(*args)
            return triton_impl(*args)

        def on_cpu(*args):
            args = prepare(args)
            if check is not None:
                check(*args)
            out = cpu_implementation(name, triton_impl, reference)(*args)
            return reference(*args) if out is NotImplemented else out

        _LIB.define(name + schema)
        _LIB.impl(name, on_cuda, "CUDA")
        _LIB.impl(name, on_cpu, "CPU")
        OPS[name] = getattr(torch.ops, NAMESPACE).__getattr__(name).default
        return Op(name)
    return declare


def signature_checked(check: Callable, maxsize: int = 1024) -> Callable:
    """`check` run once per argument signature: every tensor's shape, strides, dtype and device, every other
    argument's type and value. For checks that read nothing else (no tensor contents, no data pointers), which is
    what an op's argument checks are: building the key costs about a microsecond, a plain check of a few tensors
    several (bench/host.py). A check that raises caches nothing, and neither does one given an unhashable argument
    (a public function's caller may pass anything: the check names it). At most `maxsize` signatures are kept (a
    decode loop has a handful per op; the dict is emptied when full rather than grown without bound)."""
    seen: dict[tuple, None] = {}

    def checked(*args) -> None:
        key = tuple((a.shape, a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor) else (type(a), a)
                    for a in args)
        try:
            if key in seen:
                return
        except TypeError:           # unhashable
            check(*args)
            return
        check(*args)
        if len(seen) >= maxsize:
            seen.clear()
        seen[key] = None
    checked.__wrapped__ = check
    return checked


def _contiguous_args(fn: Callable, names: Iterable[str], mutates_args: Iterable[str] | str) -> Callable:
    """args -> args with the arguments called `names` made contiguous (None stays None)."""
    params = list(inspect.signature(fn).parameters)
    names = tuple(names)
    unknown = [n for n in names if n not in params]
    mutated = [n for n in names if mutates_args == "unknown" or n in mutates_args]
    if unknown or mutated:
        raise ValueError(f"contiguous: {unknown or mutated} are not read-only arguments of {fn.__name__}")
    positions = [params.index(n) for n in names]

    def prepare(args: tuple) -> tuple:
        if not positions:
            return args
        args = list(args)
        for i in positions:
            if args[i] is not None:
                args[i] = args[i].contiguous()
        return tuple(args)
    return prepare


def cpu_implementation(name: str, triton_impl: Callable, reference: Callable) -> Callable:
    """The implementation CPU tensors get now (read on every call, so LLMKERN_CPU_BACKEND and a C++ build that
    appears later take effect without re-importing llmkern)."""
    if _utils.INTERPRET:
        return triton_impl
    return cpu.kernel(name) or reference
