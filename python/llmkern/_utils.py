"""Host-side helpers shared by every op: the interpreter switch, argument checks, kernel launch, device facts.

Which implementation serves which device is llmkern._dispatch's business; this module only tells whether the
Triton interpreter is on.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Sequence

import torch
import triton

# TRITON_INTERPRET=1 set before llmkern was imported: CPU tensors then run the Triton kernels under the interpreter.
# Read once, at import, exactly as the @triton.jit decorators in llmkern.kernels read it.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------- argument checks
def check_tensor(name: str, t: Any, *, ndim: int | None = None, dtypes: Sequence[torch.dtype] | None = None) -> None:
    """TypeError/ValueError naming `name` when t is not a tensor of the expected rank and dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")


def check_same(names: Sequence[str], tensors: Sequence[torch.Tensor], *, dtype: bool = True, device: bool = True) -> None:
    """ValueError when the tensors disagree on device or dtype."""
    first_name, first = names[0], tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if device and t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; they must share a device")
        if dtype and t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; they must match")


def check_head_dim(name: str, head_dim: int) -> None:
    """Every multiple of 8 from 32 to 256: the set the attention kernels are compiled and tested for."""
    if head_dim % 8 != 0 or not (32 <= head_dim <= 256):
        raise ValueError(f"{name}: head_dim must be a multiple of 8 in [32, 256], got {head_dim}")


def check_window(window: Any) -> tuple[int, int]:
    if not (isinstance(window, (tuple, list)) and len(window) == 2 and all(isinstance(w, int) for w in window)):
        raise TypeError(f"window must be a pair of ints (left, right), got {window!r}")
    left, right = int(window[0]), int(window[1])
    if left < -1 or right < -1:
        raise ValueError(f"window values must be >= -1 (-1 means unbounded), got {window!r}")
    return left, right


def check_softcap(softcap: Any) -> float | None:
    if softcap is None:
        return None
    if not isinstance(softcap, (int, float)) or isinstance(softcap, bool):
        raise TypeError(f"softcap must be a positive float or None, got {softcap!r}")
    if not softcap > 0:
        raise ValueError(f"softcap must be > 0 (or None for no capping), got {softcap!r}")
    return float(softcap)


def check_scale(scale: Any, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a float or None, got {scale!r}")
    return float(scale)


def last_dim_contiguous(name: str, t: torch.Tensor) -> torch.Tensor:
    """Kernels take any strides except a strided last dim; copy only in that case."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


# ----------------------------------------------------------------------------------------------- kernel launch
def autotune(configs: list[triton.Config], key: list[str], **kwargs: Any) -> Callable:
    """`triton.autotune` that the launcher below can bypass under the interpreter.

    The interpreter has no GPU driver, and a multi-config autotuner raises "0 active drivers" there, so under
    TRITON_INTERPRET the first config is used directly. Each op lists its configs in one place; `check-compile`
    compiles every one of them for sm_80 and sm_90.
    """
    def wrap(fn):
        tuned = triton.autotune(configs=configs, key=key, **kwargs)(fn)
        tuned.llmkern_configs = configs
        tuned.llmkern_raw = fn
        return tuned
    return wrap


def launch(kernel: Any, grid: Callable[[dict], tuple] | tuple, *args: Any, **kwargs: Any) -> None:
    """Launch a kernel wrapped by `autotune` (or a plain @triton.jit one).

    Under the interpreter, an autotuned kernel runs its first config: the config's meta-parameters are passed
    explicitly (num_warps/num_stages do not exist there).
    """
    if INTERPRET and hasattr(kernel, "llmkern_configs"):
        cfg = kernel.llmkern_configs[0]
        meta = {**kwargs, **cfg.kwargs}
        g = grid(meta) if callable(grid) else grid
        kernel.llmkern_raw[g](*args, **meta)
    else:
        kernel[grid](*args, **kwargs)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2_at_least(x: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(int(x)))


# ----------------------------------------------------------------------------------------------- device facts
# The SM count assumed for tensors on a device that has none to ask (CPU tensors under the interpreter). The split-K
# (quant decode) and split-KV (paged decode) heuristics size their grids from the SM count; a small stand-in makes
# the modest shapes of the tests take the split paths that long inputs take on a GPU (an A100 has 108 SMs).
STAND_IN_SMS = 8


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached: a property query per call costs more than a decode
    kernel), or STAND_IN_SMS for any other device."""
    if device.type != "cuda":
        return STAND_IN_SMS
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
