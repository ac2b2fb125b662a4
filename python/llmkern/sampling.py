"""Fused sampling: `sample` (one token per row) and `sampling_probs` (the distribution it draws from).

Host side: check the parameters, turn each into a per-row tensor, call the op (llmkern._dispatch picks the
implementation by device), launch one program per row. The kernel is in llmkern.kernels.sampling, whose docstring
explains the no-sort threshold search and its pass count.

How randomness flows: every row draws one uniform u from counter-based Philox keyed by that row's int64 seed
(offset 0). `sample` with a seed tensor is therefore a pure function of (logits, parameters, seeds): the custom op
is deterministic, batch-invariant (a row never reads another row or the batch size) and the same on the compiled
GPU kernel, the interpreted kernel and the CPU reference (which replays the same Philox in Python), up to
rounding: they may sum a row's mass in different orders (the reference in float64), which moves a draw only when u
falls within rounding of a CDF step. When no seed is given, one seed per row is drawn first from `generator` or
torch's default CPU generator; that is the only place where generator state is consumed.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from llmkern import _dispatch, _utils, compile_check, reference
from llmkern.kernels import sampling as kernels

# One fixed configuration, on purpose not autotuned: a different tile or warp count changes the fp32 summation
# order of a row's mass, and so could move a draw that sits on a CDF step. With one config a seed gives the same
# token on every call, whatever the batch.
#   BLOCK = 1024: the streaming passes (stats, mass, draw/write) read 4 KB of fp32 per tile, 8 elements per thread
#     at 4 warps: enough loads in flight per thread, no register pressure.
#   BLOCK_S = 128 with NPIV = 2**LOG2_NPIV = 16 pivots: the search pass keeps (16, 128) tiles of compares, masked keys and masses: 16
#     per thread per quantity at 4 warps, which compiles without spills (see check-compile).
#   MAX_PASSES = 8: a key bracket is at most 2**32 wide and each pass divides it by NPIV = 16 (16**8 = 2**32).
CONFIG = dict(BLOCK=1024, BLOCK_S=128, LOG2_NPIV=4, MAX_PASSES=8)
NUM_WARPS = 4

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_SEED_RANGE = (-(2 ** 63), 2 ** 63 - 1)
_INT32_MAX = 2 ** 31 - 1
# The per-row parameter tensors: the kernel reads element `row` of each (unit stride: the op makes them contiguous).
_PER_ROW = ("temperature", "top_k", "top_p", "min_p")
_KERNEL_DTYPES = dict(temperature=torch.float32, top_k=torch.int32, top_p=torch.float32, min_p=torch.float32)


# ----------------------------------------------------------------------------------------------- argument checks
def per_row_param(name: str, value: Any, batch: int, device: torch.device, *, integer: bool, lo: float, hi: float,
                  lo_open: bool = False, hi_open: bool = False, like: str = "logits") -> torch.Tensor:
    """A per-row parameter as a (batch,) tensor on `device` (float32, or int32 for top_k), range-checked.

    The range is checked on the value the kernel will see (after the cast to float32), so that e.g. a float64
    temperature of 1e300 (inf in fp32) is refused rather than silently turned into inf. top_k is clamped to
    2**31 - 1 before its int32 cast (after the check): every k >= vocab means "off" anyway.
    Tensor parameters cost one device-to-host sync here (the range check), before any launch: a decode loop builds
    them once as a SamplingParams instead. `like` names the tensor whose device the parameter must share (in error
    messages). Shared with llmkern.decoding.
    """
    what = "an int" if integer else "a float"
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.shape[0] != batch:
            raise ValueError(f"{name} must be {what} or a ({batch},) tensor (one value per row), "
                             f"got shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but {like} is on {device}; they must share a device")
        ok_dtype = value.dtype in _INT_DTYPES if integer else value.dtype.is_floating_point
        if not ok_dtype:
            raise ValueError(f"{name} must be an {'integer' if integer else 'floating-point'} tensor, "
                             f"got {value.dtype}")
        v = value.detach()
        if integer:    # in int64 first: a narrow dtype (int8, uint8, ...) cannot hold the clamp bound
            v = v.to(torch.int64)
            _check_range(name, v, lo, hi, lo_open, hi_open)
            return v.clamp(max=_INT32_MAX).to(torch.int32).contiguous()
        t = v.to(torch.float32).contiguous()
    else:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
            raise ValueError(f"{name} must be {what} or a ({batch},) tensor, got {value!r}")
        # checked as a one-element CPU tensor (no device sync), then broadcast to the batch
        if integer:
            _check_range(name, torch.tensor([max(-(2 ** 63), min(int(value), 2 ** 63 - 1))]), lo, hi, lo_open, hi_open)
            one = torch.tensor([min(int(value), _INT32_MAX)], dtype=torch.int32)
        else:
            big = abs(value) >= 1e300                      # beyond float32 (and maybe float64): +-inf
            one = torch.tensor([math.inf if big and value > 0 else -math.inf if big else float(value)],
                               dtype=torch.float32)
            _check_range(name, one, lo, hi, lo_open, hi_open)
        return torch.full((batch,), one.item(), dtype=one.dtype, device=device)
    _check_range(name, t, lo, hi, lo_open, hi_open)
    return t


def _check_range(name: str, t: torch.Tensor, lo: float, hi: float, lo_open: bool, hi_open: bool) -> None:
    if t.numel() == 0:
        return
    tf = t.double()
    bad = bool(torch.isnan(tf).any())
    vmin, vmax = (float(x) for x in torch.aminmax(tf))
    below = vmin <= lo if lo_open else vmin < lo
    above = vmax >= hi if hi_open else vmax > hi
    if bad or below or above:
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        got = "NaN" if bad else (vmin if below else vmax)
        as_f32 = " (as float32)" if t.dtype == torch.float32 else ""
        got = got if as_f32 or bad else int(got)
        raise ValueError(f"{name} must be in {rng}{as_f32}, got {got}")


def row_seeds(seed: Any, generator: Any, batch: int, device: torch.device, like: str = "logits") -> torch.Tensor:
    """int64 (batch,) seeds on `device`: given, one int for every row, or drawn from the generator. Shared with
    llmkern.decoding; `like` names the tensor whose device the seeds must share (in error messages)."""
    if seed is not None and generator is not None:
        raise ValueError("seed and generator are exclusive: pass at most one")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if seed is None:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        s = torch.randint(_SEED_RANGE[0], _SEED_RANGE[1], (batch,), dtype=torch.int64, generator=generator,
                          device=gen_device)
        return s.to(device)
    if isinstance(seed, torch.Tensor):
        if seed.dim() != 1 or seed.shape[0] != batch:
            raise ValueError(f"seed must be an int or a ({batch},) int64 tensor, got shape {tuple(seed.shape)}")
        if seed.dtype != torch.int64:
            raise ValueError(f"seed must be an int64 tensor, got {seed.dtype}")
        if seed.device != device:
            raise ValueError(f"seed is on {seed.device} but {like} is on {device}; they must share a device")
        return seed.detach().contiguous()
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an int or a ({batch},) int64 tensor, got {seed!r}")
    if not _SEED_RANGE[0] <= int(seed) <= _SEED_RANGE[1]:
        raise ValueError(f"seed must fit in int64, got {seed}")
    return torch.full((batch,), int(seed), dtype=torch.int64, device=device)


def _check_logits(logits: Any) -> None:
    _utils.check_tensor("logits", logits, ndim=2, dtypes=_utils.FLOAT_DTYPES)
    vocab = logits.shape[1]
    if vocab == 0:
        raise ValueError("logits must have at least one column (vocab >= 1)")
    if vocab >= 2 ** 24:
        # counts are kept in fp32 by the search, exact up to 2**24
        raise ValueError(f"logits: vocab must be below 2**24 = 16777216, got {vocab}")


class SamplingParams:
    """Per-row sampling parameters, range-checked once where they are built, for a decode loop's hot path.

    SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, *, batch=1, device="cpu"): each parameter a
    Python number for every row or a (batch,) tensor on `device`, with `sample`'s ranges and errors (ValueError
    naming the parameter); batch an int >= 0 (else TypeError/ValueError naming batch). Building it costs one
    device-to-host sync per tensor parameter (the range check); `sample(logits, params=p)` and
    `sampling_probs(logits, params=p)` then check only the shape, dtype and device of p's tensors against logits:
    no sync, no copy, however many steps reuse it.
    Attributes temperature, top_k, top_p, min_p (read-only: assigning one raises AttributeError): contiguous (batch,)
    tensors on `device` as the kernel reads them (float32; top_k int32, clamped to 2**31 - 1), the object's own
    copies: writing to the caller's tensors later does not change it (an unchecked value never reaches the kernel).
    Their values are checked once, here: editing them in place afterwards is the caller's responsibility (every call
    still checks their shape, dtype and device, which needs no sync, so no edit can make the kernel read outside
    them). Iterating yields them in that order.
    """

    __slots__ = tuple("_" + name for name in _PER_ROW)

    def __init__(self, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, *, batch: int = 1,
                 device: torch.device | str = "cpu"):
        if isinstance(batch, bool) or not isinstance(batch, numbers.Integral):
            raise TypeError(f"batch must be an int, got {batch!r}")
        if batch < 0:
            raise ValueError(f"batch must be >= 0, got {batch}")
        batch = int(batch)
        device = torch.device(device)
        given = (temperature, top_k, top_p, min_p)
        checked = (
            per_row_param("temperature", temperature, batch, device, integer=False, lo=0.0, hi=float("inf"),
                          hi_open=True),
            per_row_param("top_k", top_k, batch, device, integer=True, lo=0, hi=float("inf"), hi_open=True),
            per_row_param("top_p", top_p, batch, device, integer=False, lo=0.0, hi=1.0, lo_open=True),
            per_row_param("min_p", min_p, batch, device, integer=False, lo=0.0, hi=1.0),
        )
        for name, value, t in zip(_PER_ROW, given, checked):
            aliased = isinstance(value, torch.Tensor) and t.data_ptr() == value.data_ptr()
            setattr(self, "_" + name, t.clone() if aliased else t)

    temperature, top_k, top_p, min_p = (property(lambda self, slot="_" + name: getattr(self, slot))
                                        for name in _PER_ROW)

    def __iter__(self):
        return iter((self.temperature, self.top_k, self.top_p, self.min_p))

    def __repr__(self) -> str:
        return f"SamplingParams(batch={self.temperature.shape[0]}, device={self.temperature.device})"


def check_params(temperature, top_k, top_p, min_p, *, batch: int = 1,
                 device: torch.device | str = "cpu") -> SamplingParams:
    """The sampling parameters as the kernel reads them (SamplingParams: temperature, top_k, top_p, min_p, each a
    contiguous (batch,) tensor on `device`, float32; top_k int32). ValueError naming the first bad one. `sample`
    and `sampling_probs` call it; a decode loop (llmkern.generate) calls it once up front, so bad parameters are
    refused before the model runs."""
    return SamplingParams(temperature, top_k, top_p, min_p, batch=batch, device=device)


# What sample's and sampling_probs' keywords left at None (unset) stand for. With params=..., every one must be
# left unset: None, not merely a value equal to the default, so no keyword is ignored silently.
_DEFAULTS = (1.0, 0, 1.0, 0.0)


def _params(logits: Any, params: Any, given: tuple) -> SamplingParams:
    """Check logits, then the parameters: built here from `given` (one sync per tensor), or `params` prebuilt, whose
    tensors the op's check checks for the shape, dtype and device the kernel reads (no sync)."""
    _check_logits(logits)
    batch, device = logits.shape[0], logits.device
    if params is None:
        return check_params(*(d if v is None else v for v, d in zip(given, _DEFAULTS)), batch=batch, device=device)
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a llmkern.SamplingParams or None, got {type(params).__name__}")
    if any(v is not None for v in given):
        raise ValueError("pass temperature/top_k/top_p/min_p either in params or as keywords, not both")
    return params


def check_row_tensor(name: str, t: torch.Tensor, batch: int, device: torch.device, dtype: torch.dtype,
                     like: str = "logits") -> None:
    """ValueError unless a per-row parameter tensor is what a kernel reads: (batch,) of `dtype` on `device` (the
    ops' checks; the values were checked where the tensor was built). Shared with llmkern.decoding."""
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but {like} is on {device}; they must share a device")
    if tuple(t.shape) != (batch,):
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {like} has {batch} rows: one value per row (a "
                         f"SamplingParams must be built for batch={batch}, and not resized)")
    if t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, the kernel reads {dtype} (a SamplingParams' tensors must not "
                         "be changed in place)")


@_dispatch.signature_checked
def _check_kernel_args(logits, temperature, top_k, top_p, min_p, seed=None) -> None:
    """The ops' check (a direct torch.ops.llmkern call, and a SamplingParams changed in place after it was built):
    what the kernel reads, logits as `sample` takes them, each parameter a (batch,) tensor of the kernel's dtype on
    logits' device, seed an int64 (batch,) tensor; once per argument signature, no sync."""
    _check_logits(logits)
    batch, device = logits.shape[0], logits.device
    for name, t in zip(_PER_ROW, (temperature, top_k, top_p, min_p)):
        check_row_tensor(name, t, batch, device, _KERNEL_DTYPES[name])
    if seed is not None:
        row_seeds(seed, None, batch, device)


# ------------------------------------------------------------------------------------------------- custom ops
def _sample_reference(logits, temperature, top_k, top_p, min_p, seed):
    return reference.sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)


def _probs_reference(logits, temperature, top_k, top_p, min_p):
    probs = reference.sampling_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    return probs.to(device=logits.device, dtype=torch.float32)


@_dispatch.custom_op("sample", mutates_args=(), reference=_sample_reference, check=_check_kernel_args,
                     contiguous=_PER_ROW + ("seed",))
def _sample_op(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
               min_p: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    batch = logits.shape[0]
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if batch:
        _run(logits, temperature, top_k, top_p, min_p, seed, out, 0, write_probs=False)
    return out


@_sample_op.register_fake
def _(logits, temperature, top_k, top_p, min_p, seed):
    return logits.new_empty(logits.shape[0], dtype=torch.int64)


@_dispatch.custom_op("sampling_probs", mutates_args=(), reference=_probs_reference, check=_check_kernel_args,
                     contiguous=_PER_ROW)
def _probs_op(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
              min_p: torch.Tensor) -> torch.Tensor:
    out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    if logits.shape[0]:
        no_seed = torch.zeros(1, dtype=torch.int64, device=logits.device)   # never read when writing probs
        _run(logits, temperature, top_k, top_p, min_p, no_seed, out, out.stride(0), write_probs=True)
    return out


@_probs_op.register_fake
def _(logits, temperature, top_k, top_p, min_p):
    return logits.new_empty(logits.shape, dtype=torch.float32)


def _run(logits, *args, write_probs: bool) -> None:
    """One program per row; the one fixed config (see CONFIG). The kernel takes the row stride of logits only."""
    logits = _utils.last_dim_contiguous("logits", logits)
    meta = dict(CONFIG, WRITE_PROBS=write_probs)
    if not _utils.INTERPRET:
        meta["num_warps"] = NUM_WARPS
    kernels._sampling_kernel[(logits.shape[0],)](logits, logits.stride(0), logits.shape[1], *args, **meta)


# ------------------------------------------------------------------------------------------------- public API
def sample(logits: torch.Tensor, *, temperature=None, top_k=None, top_p=None, min_p=None, seed=None,
           generator: torch.Generator | None = None, params: SamplingParams | None = None) -> torch.Tensor:
    """Draw one token per row: int64 (batch,).

    logits: (batch, vocab) fp32/fp16/bf16 (any row stride). Each parameter is a Python number for all rows or a
    (batch,) tensor on logits' device, one value per row; None (unset, the default) means temperature 1, top_k 0,
    top_p 1, min_p 0 (each off). Applied in this order:
      temperature >= 0: logits / temperature, softmax. 0, and any temperature below float32's smallest normal
        2**-126 = 1.2e-38 (llmkern.reference.GREEDY_BELOW; 1 / temperature would overflow float32), means greedy for
        that row: the first argmax. Used as float32: a larger value that rounds below it is greedy too. NaN,
        negative, inf and values beyond float32 range (> 3.4e38, inf there) raise ValueError.
      top_k >= 0: keep the tokens whose logit is at least the k-th largest (0 or >= vocab: off). Ties at the
        boundary are all kept, so a row may keep more than k tokens when logits tie exactly.
      top_p in (0, 1]: among those, keep a token when the renormalized mass of the survivors with a strictly larger
        logit is below top_p (the smallest most-probable set reaching top_p; tokens tied with its last one stay).
        A tiny top_p keeps the most probable token(s); 1 (or a value rounding to 1 in float32) is off.
      min_p in [0, 1]: keep tokens whose probability is at least min_p times the largest (1: the argmax and its
        ties). Values outside the ranges, and NaN, raise ValueError naming the parameter.
    The token is drawn from the survivors, renormalized (exactly `sampling_probs`), by inverse CDF.
    seed: an int (every row uses it: equal rows then draw equal tokens) or an int64 (batch,) tensor, one seed per
      request. A row's token depends only on its logits, its parameters and its seed: the same on every call,
      whatever else is in the batch, on GPU and CPU alike (see the module docstring). With no seed, one seed per
      row is drawn from `generator`, or from torch's default generator when that is None too.
    A row holding NaN or +inf, or whose logits are all -inf, returns -1 (never reads past the row, never hangs:
    every loop has a fixed bound). Bad parameters raise ValueError naming the argument.
    params: a SamplingParams built once (for example per request batch of a decode loop), instead of the four
      keywords (ValueError when any of them is given with it, even at its default value): its values were checked
      when it was built, so a call with it and a seed tensor makes no device-to-host sync. Tensor keywords cost one sync each per call (their range check).
    """
    temp, k, p, mp = _params(logits, params, (temperature, top_k, top_p, min_p))
    seeds = row_seeds(seed, generator, logits.shape[0], logits.device)
    return _sample_op(logits, temp, k, p, mp, seeds)


def sampling_probs(logits: torch.Tensor, *, temperature=None, top_k=None, top_p=None, min_p=None,
                   params: SamplingParams | None = None) -> torch.Tensor:
    """The exact distribution `sample` draws from: float32 (batch, vocab), zeros outside the kept set.

    Same parameters and order as `sample`; computed by the same threshold search (no sort), then a
    normalize-and-write pass. Greedy rows (temperature 0 or below 2**-126) are one-hot at the first argmax; invalid
    rows (NaN, +inf, all -inf) are all zeros. params: as in `sample`.
    """
    temp, k, p, mp = _params(logits, params, (temperature, top_k, top_p, min_p))
    return _probs_op(logits, temp, k, p, mp)


# --------------------------------------------------------------------------------------------- compile specs
@compile_check.register
def _compile_specs():
    """The one kernel, in both modes, for each logits dtype: every variant the dispatcher can launch."""
    params = {"temp_ptr": "*fp32:16", "top_k_ptr": "*i32:16", "top_p_ptr": "*fp32:16", "min_p_ptr": "*fp32:16",
              "seed_ptr": "*i64:16"}
    for name in ("fp16", "bf16", "fp32"):
        for write_probs in (False, True):
            cfg = ",".join(f"{k}={v}" for k, v in CONFIG.items()) + f",w{NUM_WARPS},{name}"
            yield compile_check.CompileSpec(
                kernel=kernels._sampling_kernel,
                name="_sampling_kernel[probs]" if write_probs else "_sampling_kernel[sample]", config=cfg,
                signature={"logits_ptr": f"*{name}:16", "stride_row": "i32", "V": "i32", **params,
                           "out_ptr": "*fp32:16" if write_probs else "*i64:16", "stride_out": "i32"},
                constexprs=dict(CONFIG, WRITE_PROBS=write_probs), num_warps=NUM_WARPS)
