"""Host-side helpers shared by every op: the interpreter switch, argument checks, kernel launch, device facts.

Which implementation serves which device is llmkern._dispatch's business; this module only tells whether the
Triton interpreter is on.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Any, Callable, Sequence

import torch
import triton

# TRITON_INTERPRET=1 set before llmkern was imported: CPU tensors then run the Triton kernels under the interpreter.
# Read once, at import, exactly as the @triton.jit decorators in llmkern.kernels read it.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
F32_TINY = 2.0 ** -126   # float32's smallest normal number; below it GPUs may flush values to zero
F32_MAX = float(torch.finfo(torch.float32).max)   # 3.4028e38


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


def supported_head_dim(head_dim: int) -> bool:
    """Every multiple of 8 from 32 to 256: the set the attention kernels are compiled and tested for."""
    return head_dim % 8 == 0 and 32 <= head_dim <= 256


def check_head_dim(name: str, head_dim: int) -> None:
    if not supported_head_dim(head_dim):
        raise ValueError(f"{name}: head_dim must be a multiple of 8 in [32, 256], got {head_dim}")


def check_window(window: Any) -> tuple[int, int]:
    """(left, right) with -1 for an unbounded side; ValueError below -1. A side of 2**31 - 1 or more reaches every key
    of any sequence (lengths are int32) and is returned as -1."""
    if not (isinstance(window, (tuple, list)) and len(window) == 2
            and all(isinstance(w, int) and not isinstance(w, bool) for w in window)):
        raise TypeError(f"window must be a pair of ints (left, right), got {window!r}")
    left, right = int(window[0]), int(window[1])
    if left < -1 or right < -1:
        raise ValueError(f"window values must be >= -1 (-1 means unbounded), got {window!r}")
    # Lengths are int32 (cu_seqlens, seq_lens): a window of 2**31 - 1 or more reaches every key, which is what -1 says.
    return tuple(-1 if w >= 2 ** 31 - 1 else w for w in (left, right))


def unbounded_beyond(window: int, longest: int) -> int:
    """A window side as the kernels take it: -1 (unbounded) when it reaches at least `longest` keys, the longest
    sequence the call can hold. The mask is the same, and the kernels' int32 position arithmetic (position + window)
    cannot overflow: a window of 2**31 - 1 would otherwise wrap and hide every key."""
    return -1 if window >= longest else window


# Attention's float parameters at their extremes. The kernels take scale and softcap as float32 and work in the
# log2 domain (exp2), multiplying by log2(e) = 1.44.
#   scale: any finite value with |scale| <= 2**127 (then scale * log2(e) is a finite float32). 0 or a subnormal
#     scale: every visible key weighs the same (uniform attention); a negative scale favours the smallest scores.
#     Scores q.k * scale beyond float32 range give NaN rows, as PyTorch's float32 attention does.
#   softcap: None, or a cap in [max(2**-126, |scale| * 2**-127), inf]: a normal float32 (a subnormal one is flushed
#     to zero by GPUs) no smaller than |scale| / 2**127, so that scale / softcap stays a finite float32. A cap above
#     2**127, inf included, is no cap (None): softcap * log2(e) would overflow float32, and such a cap changes a
#     scaled score s by the factor tanh(x)/x, x = s / softcap, which is within float32 rounding (1 - x^2/3 > 1 - 2**-24)
#     for every |s| < 7e34.
MAX_SCALE = 2.0 ** 127
NO_CAP_ABOVE = 2.0 ** 127
MIN_SOFTCAP = F32_TINY


def check_scale(scale: Any, head_dim: int | None) -> float:
    """scale as the kernels take it: None gives the default head_dim ** -0.5, or, with head_dim None (an op with no
    default: its caller explains why first), a TypeError; ValueError outside its range (see MAX_SCALE)."""
    if scale is None and head_dim is not None:
        return head_dim ** -0.5
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        allowed = "a float" if head_dim is None else "a float or None"
        raise TypeError(f"scale must be {allowed}, got {scale!r}")
    if not abs(scale) <= MAX_SCALE:   # also refuses NaN
        raise ValueError(f"scale must be finite with |scale| <= 2**127 (about 1.7e38), got {scale!r}")
    return float(scale)


def check_softcap(softcap: Any, scale: float) -> float | None:
    """softcap as the kernels take it: None for no cap (also for caps above NO_CAP_ABOVE, inf included); ValueError
    for caps too small for float32 (see MIN_SOFTCAP), zero, negative or NaN. `scale` is the checked scale."""
    if softcap is None:
        return None
    if not isinstance(softcap, (int, float)) or isinstance(softcap, bool):
        raise TypeError(f"softcap must be a positive float or None, got {softcap!r}")
    if not softcap > 0:
        raise ValueError(f"softcap must be > 0 (or None for no capping), got {softcap!r}")
    if softcap > NO_CAP_ABOVE:
        return None
    smallest = max(MIN_SOFTCAP, abs(scale) / MAX_SCALE)
    if softcap < smallest:
        raise ValueError(f"softcap must be >= {smallest:.3g} (a normal float32, and scale / softcap must stay "
                         f"finite in float32), got {softcap!r}")
    return float(softcap)


# Attention's per-head variants (llmkern.attention and the paged ops), float32 (num_heads,) tensors:
#   alibi_slopes: finite with |slope| <= 2**96, so that slope * log2(e) * distance stays a finite float32 for every
#     int32 distance (2**96 * 1.45 * 2**31 < 2**128); any such slope has its meaning (0: no bias; negative: far keys
#     favoured), though ALiBi's own slopes lie in (0, 1) (llmkern.alibi_slopes).
#   sinks: natural-log logits, NaN refused; -inf (and anything below -2**127, whose exp is 0 in every float format)
#     is no sink; above 2**127 (+inf included) refused: sink * log2(e) would overflow float32.
MAX_ALIBI_SLOPE = 2.0 ** 96
MAX_SINK = 2.0 ** 127


def check_head_vector(name: str, t: Any, num_heads: int, like: torch.Tensor) -> None:
    """A per-head parameter (alibi_slopes, sinks): None, or a float32 (num_heads,) tensor on like's device."""
    if t is None:
        return
    check_tensor(name, t, ndim=1, dtypes=(torch.float32,))
    if t.shape[0] != num_heads:
        raise ValueError(f"{name} must have one value per query head ({num_heads}), got shape {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but q is on {like.device}; they must share a device")


def check_head_values(alibi_slopes: torch.Tensor | None, sinks: torch.Tensor | None) -> None:
    """The values of alibi_slopes and sinks (one host sync each when given; see MAX_ALIBI_SLOPE and MAX_SINK)."""
    if alibi_slopes is not None:
        bad = alibi_slopes[~(alibi_slopes.abs() <= MAX_ALIBI_SLOPE)]   # NaN included
        if bad.numel():
            raise ValueError(f"alibi_slopes must be finite with |slope| <= 2**96, got {bad[0].item()!r}")
    if sinks is not None:
        bad = sinks[~(sinks <= MAX_SINK)]
        if bad.numel():
            raise ValueError(f"sinks must be <= 2**127 and not NaN (-inf: no sink), got {bad[0].item()!r}")


# fp8 KV caches (llmkern.PagedKVCache, the paged ops): a scale per KV head, float32. A value x is stored as
# round_to_fp8(x / scale) and read back as fp8 * scale, so a scale must be a normal float32 (>= 2**-126: a subnormal
# one GPUs may flush to zero, and x / 0 means nothing) and finite, and no larger than F32_MAX / (the fp8 format's
# largest value: 448 for e4m3fn, 57344 for e5m2), so that every value the cache can hold reads back finite.
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
MIN_KV_SCALE = F32_TINY


def max_kv_scale(cache_dtype: torch.dtype) -> float:
    return F32_MAX / float(torch.finfo(cache_dtype).max)


def check_kv_scale(name: str, scale: Any, cache_dtype: torch.dtype, num_kv_heads: int,
                   like: torch.Tensor) -> torch.Tensor | None:
    """An fp8 cache's k_scale / v_scale (a number or a float32 (num_kv_heads,) tensor on like's device) as the
    (num_kv_heads,) float32 tensor the kernels read; None for a 16-bit cache, which takes no scale. A number's value
    is checked here; a tensor's values by check_kv_scale_values (a host sync), in the op."""
    if cache_dtype not in FP8_DTYPES:
        if scale is not None:
            raise ValueError(f"{name} applies to fp8 caches only; this cache is "
                             f"{str(cache_dtype).replace('torch.', '')}")
        return None
    if scale is None:
        raise ValueError(f"{name} is required for an fp8 cache: the scale its values were written with "
                         f"(a float, or a float32 (num_kv_heads,) tensor)")
    if isinstance(scale, torch.Tensor):
        check_tensor(name, scale, ndim=1, dtypes=(torch.float32,))
        if scale.shape[0] != num_kv_heads:
            raise ValueError(f"{name} must have one scale per KV head ({num_kv_heads}), got shape {tuple(scale.shape)}")
        if scale.device != like.device:
            raise ValueError(f"{name} is on {scale.device} but the cache is on {like.device}; they must share a "
                             f"device")
        return scale
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"{name} must be a float or a float32 tensor, got {scale!r}")
    value = kv_scale_number(name, scale, cache_dtype)
    return torch.full((num_kv_heads,), value, dtype=torch.float32, device=like.device)


def kv_scale_number(name: str, scale: int | float, cache_dtype: torch.dtype) -> float:
    """A number k_scale / v_scale as a float, checked by check_kv_scale's rule (an int too large for a float, which
    float() would raise OverflowError for, is out of range like any other)."""
    try:
        value = float(scale)
    except OverflowError:
        value = math.inf if scale > 0 else -math.inf
    _check_kv_scale_range(name, value, cache_dtype)
    return value


def _check_kv_scale_range(name: str, value: float, cache_dtype: torch.dtype) -> None:
    top = max_kv_scale(cache_dtype)
    if not MIN_KV_SCALE <= value <= top:   # also refuses NaN
        raise ValueError(f"{name} must be a finite scale in [2**-126, {top:.4g}] (a normal float32 whose product "
                         f"with every {str(cache_dtype).replace('torch.', '')} value is finite), got {value!r}")


def check_kv_scale_values(name: str, scale: torch.Tensor | None, cache_dtype: torch.dtype) -> None:
    """The values of a scale tensor (one host sync), by check_kv_scale's rule."""
    if scale is None:
        return
    top = max_kv_scale(cache_dtype)
    bad = scale[~((scale >= MIN_KV_SCALE) & (scale <= top))]
    if bad.numel():
        _check_kv_scale_range(name, bad[0].item(), cache_dtype)


def check_writable(name: str, t: torch.Tensor) -> None:
    """ValueError when t may hold one memory location at two indices (an expanded, stride-0 view, or any layout whose
    strides interleave): a kernel writing it would race with itself. Sufficient test: with the dims sorted by stride,
    each stride exceeds the farthest offset the smaller dims reach."""
    reach = 0
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
        if stride <= reach:
            raise ValueError(f"{name} is written in place, so it must not overlap itself (an expanded or stride-0 "
                             f"view); got shape {tuple(t.shape)} with strides {t.stride()}")
        reach += stride * (size - 1)


def check_disjoint(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """ValueError when two tensors a kernel writes share memory (one would overwrite the other there)."""
    if share_memory(a, b):
        raise ValueError(f"{name_a} and {name_b} are both written, so they must not share memory (the same tensor "
                         f"twice, or overlapping views of one buffer); got shapes {tuple(a.shape)} and "
                         f"{tuple(b.shape)}, strides {a.stride()} and {b.stride()}, {b.data_ptr() - a.data_ptr()} "
                         f"bytes apart")


def check_sources_disjoint(sources: dict[str, torch.Tensor], written: dict[str, torch.Tensor]) -> None:
    """ValueError when a tensor a kernel reads shares memory with one it writes: the result would depend on the order
    of the loads and stores (torch's index_put_ refuses the same overlap)."""
    for src_name, src in sources.items():
        for dst_name, dst in written.items():
            if share_memory(src, dst):
                raise ValueError(f"{src_name} is read while {dst_name} is written, so they must not share memory "
                                 f"(clone() {src_name} first); got {src.data_ptr() - dst.data_ptr()} bytes apart")


def share_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether strided views a and b have a byte in common: exact, so views whose address ranges interleave
    without a common element (FlashInfer's joint cache's [:, 0] and [:, 1], column slices of one buffer) do not.
    Tensors of two disjoint storages: under a microsecond; views of one storage: decided once per layout and
    offset (cached), a cache lookup of a few microseconds after that."""
    sa, sb = a.untyped_storage(), b.untyped_storage()
    pa, pb = sa.data_ptr(), sb.data_ptr()
    if pa != pb and (pa + sa.nbytes() <= pb or pb + sb.nbytes() <= pa):
        return False
    if a.numel() == 0 or b.numel() == 0:
        return False
    return _share_bytes(tuple(a.shape), a.stride(), a.element_size(), tuple(b.shape), b.stride(), b.element_size(),
                        b.data_ptr() - a.data_ptr())


@functools.lru_cache(maxsize=256)
def _share_bytes(a_shape, a_stride, a_size, b_shape, b_stride, b_size, delta: int) -> bool:
    """Whether some element of b, `delta` bytes after a's first, overlaps some element of a: whether
    delta + sum_d j_d * b_stride_d * b_size - sum_d i_d * a_stride_d * a_size lies in (-b_size, a_size) for
    indices 0 <= i_d < a_shape_d, 0 <= j_d < b_shape_d. One bounded linear equation: terms of equal byte stride
    merge (index range [-(a_n - 1), b_n - 1]), then a depth-first search from the largest stride, each level keeping
    only the indices the smaller terms can still complement (for two non-self-overlapping views of equal strides,
    at most two per level; views whose byte ranges are disjoint end at the first). True (may share) past `budget`
    search steps, a bound no cache layout comes near."""
    budget = 4096
    ranges: dict[int, list[int]] = {}
    for shape, stride, size, sign in ((a_shape, a_stride, a_size, -1), (b_shape, b_stride, b_size, 1)):
        for n, st in zip(shape, stride):
            if n > 1 and st:
                r = ranges.setdefault(st * size, [0, 0])
                r[sign > 0] += sign * (n - 1)
    terms = sorted(ranges.items(), reverse=True)
    # reach[i]: the least and largest sum of terms[i:]
    reach = [(0, 0)] * (len(terms) + 1)
    for i in range(len(terms) - 1, -1, -1):
        c, (lo, hi) = terms[i]
        reach[i] = (reach[i + 1][0] + c * lo, reach[i + 1][1] + c * hi)
    stack = [(0, -(b_size - 1) - delta, a_size - 1 - delta)]   # (term, sum of terms[i:] must lie in [lo, hi])
    while stack:
        budget -= 1
        if budget < 0:
            return True
        i, lo, hi = stack.pop()
        if i == len(terms):
            if lo <= 0 <= hi:
                return True
            continue
        c, (k_lo, k_hi) = terms[i]
        rest_lo, rest_hi = reach[i + 1]
        first, last = max(k_lo, -((rest_hi - lo) // c)), min(k_hi, (hi - rest_lo) // c)
        if last - first >= budget:
            return True
        stack.extend((i + 1, lo - k * c, hi - k * c) for k in range(first, last + 1))
    return False


def last_dim_contiguous(name: str, t: torch.Tensor) -> torch.Tensor:
    """Kernels take any strides except a strided last dim; copy only in that case."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


# ----------------------------------------------------------------------------------------------- host to device
def copy_async(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src) for a host tensor src without making the host wait for the device: on CUDA from pinned memory,
    asynchronously on the current stream (PyTorch's caching host allocator keeps the pinned block until the copy has
    run; a copy from pageable memory would synchronize the stream)."""
    if dst.device.type == "cuda" and src.device.type == "cpu":
        src = src.pin_memory()
    dst.copy_(src, non_blocking=True)


def to_device(src: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`, copied as copy_async does (src itself when it is already there)."""
    if src.device == torch.device(device):
        return src
    dst = torch.empty(src.shape, dtype=src.dtype, device=device)
    copy_async(dst, src)
    return dst


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


# ----------------------------------------------------------------------------------------------- scratch memory
# Per (device, stream, dtype): one buffer that kernels use for intermediate results within one op call (split-K
# partial sums, ...). Work on one stream runs in order, so consecutive ops can share it; another stream gets its own.
_SCRATCH: dict[tuple, torch.Tensor] = {}
# Outgrown buffers stay alive: a CUDA graph captured while one was current keeps replaying with its address.
_RETIRED_SCRATCH: list[torch.Tensor] = []


def scratch(device: torch.device, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A (numel,) tensor of uninitialized memory on `device` for an op's intermediates, valid until the next op on
    the same stream asks for scratch. Reused across calls (no allocation once it is large enough: it grows to twice
    the largest request), so no per-call allocation or zeroing on a decode step's hot path. Never returned to a
    caller: an op's outputs are always allocated for them."""
    stream = torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0
    key = (device, stream, dtype)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        if buf is not None:
            _RETIRED_SCRATCH.append(buf)
        buf = _SCRATCH[key] = torch.empty(max(numel, 2 * (0 if buf is None else buf.numel())), dtype=dtype,
                                          device=device)
    return buf[:numel]
