"""The C++ CPU backend: builds csrc/ just in time and runs llmkern's ops on CPU tensors with it.

    kernel(op_name) -> Callable | None   the C++ implementation of the custom op llmkern::<op_name>: a function taking
                                         exactly that op's schema arguments and returning what the op returns, or
                                         NotImplemented (having done nothing) when they ask for a feature the C++
                                         kernel lacks, which the dispatcher then gives to the reference; None when
                                         the C++ backend is off or unavailable, or has no kernel for that op
    load() -> bool                       build (first use) and load the library once per process; False when that
                                         failed (a one-time warning names the cause and the build log)
    build() -> Build                     the same, raising BuildError on failure (`llmkern build-ext` calls it)
    measure_stream(...) -> dict          STREAM read/copy/triad GB/s over all threads (the measured memory roof)

The op registrations (python/llmkern/*.py, torch.library.custom_op) call `kernel(name)` from their CPU slot; the
ops stay defined in Python, so torch.compile and opcheck see the same llmkern:: schemas on every backend. The C++
functions are registered as `torch.ops.llmkern_cpu.*` (TORCH_LIBRARY_FRAGMENT, one per csrc/*.cpp file); the
adapters below turn an op's arguments into their calls (views, strides, output allocation).

Build (torch.utils.cpp_extension.load with ninja, the first time an op needs it, or `llmkern build-ext`):
  * sources: every csrc/*.cpp, with csrc/llmkern_cpu.h; compiled with -O3 and -fopenmp (ATen's at::parallel_for is
    OpenMP in torch's CPU wheels, and compiles to a serial loop without it);
  * the vector ISA: torch's own CPU capability (torch.backends.cpu.get_cpu_capability(), which follows
    ATEN_CPU_CAPABILITY), or LLMKERN_CPU_ISA=avx512|avx2|default. It sets CPU_CAPABILITY_AVX512 / _AVX2 and the
    matching -m flags; without them ATen's Vectorized<float> compiles to a scalar array;
  * cached in $LLMKERN_CACHE_DIR (default ~/.cache/llmkern)/cpu/<torch version, python, ISA, hash>, the hash over
    the sources, the flags, the torch version and the compiler ($CXX), so an edit, a new torch or another machine
    gets its own build and a finished build loads in milliseconds;
  * on failure (no compiler, no ninja, a compile error) the CPU ops fall back to llmkern.reference with one warning
    naming the cause and the build log (<build dir>/build.log).

Environment: LLMKERN_CPU_BACKEND=auto (default: C++ when it builds, else the reference), cpp (C++ required: a build
failure raises), reference (always the reference). LLMKERN_CPU_ISA, LLMKERN_CACHE_DIR and CXX as above.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import platform
import shutil
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

BACKEND_ENV = "LLMKERN_CPU_BACKEND"
_BACKEND_CHOICES = ("auto", "cpp", "reference")

# The -m flags of each vector ISA: the ones torch's own build compiles its AVX2 / AVX512 kernels with
# (cmake/Codegen.cmake: "-mavx2 -mfma -mf16c" and "-mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma").
_ISA_FLAGS = {
    "avx512": ["-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "avx2": ["-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "default": [],
}


class BuildError(RuntimeError):
    """The C++ backend could not be built or loaded. `cause` is one line; `log` the file with the full output."""

    def __init__(self, cause: str, log: Optional[Path]):
        super().__init__(cause if log is None else f"{cause} (build log: {log})")
        self.cause, self.log = cause, log


@dataclass(frozen=True)
class Build:
    """Where a build lives and what it was compiled with."""
    name: str            # the library's name (unique per hash)
    directory: Path      # the build directory (ninja file, objects, the library, build.log)
    isa: str             # avx512 / avx2 / default
    cflags: tuple[str, ...]
    ldflags: tuple[str, ...]
    sources: tuple[Path, ...]

    @property
    def library(self) -> Path:
        return self.directory / f"{self.name}.so"

    @property
    def log(self) -> Path:
        return self.directory / "build.log"

    @property
    def done(self) -> Path:      # written last, after a successful build: a library without it may be half-written
        return self.directory / "ok"


# ------------------------------------------------------------------------------------------------------ the plan
def source_dir() -> Path:
    """csrc/: installed as llmkern/csrc (package data), or at the root of a source checkout (editable installs)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parents[1] / "csrc"):
        if (candidate / "llmkern_cpu.h").is_file():
            return candidate
    raise BuildError(f"the C++ sources (csrc/llmkern_cpu.h) are not installed next to {here}", None)


def cpu_isa() -> str:
    """The vector ISA to compile for: LLMKERN_CPU_ISA, else torch's CPU capability (what ATen's own kernels use)."""
    forced = os.environ.get("LLMKERN_CPU_ISA", "").strip().lower()
    if forced:
        if forced not in _ISA_FLAGS:
            raise ValueError(f"LLMKERN_CPU_ISA must be one of {tuple(_ISA_FLAGS)}, got {forced!r}")
        return forced
    cap = torch.backends.cpu.get_cpu_capability().upper()
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "default"      # ARM: ATen's Vectorized is NEON in its default build; nothing to add
    return "avx512" if cap.startswith("AVX512") else "avx2" if cap == "AVX2" else "default"


def _openmp() -> list[str]:
    """-fopenmp where torch's parallel backend is OpenMP with GCC/Clang on Linux (macOS clang has no -fopenmp)."""
    if sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info():
        return ["-fopenmp"]
    return []


def _cache_root() -> Path:
    root = os.environ.get("LLMKERN_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "llmkern"


def plan() -> Build:
    """What would be built, and where (no compiling)."""
    csrc = source_dir()
    sources = tuple(sorted(csrc.glob("*.cpp")))
    isa = cpu_isa()
    cflags = ("-O3", "-DNDEBUG", "-fvisibility-inlines-hidden", *_openmp(), *_ISA_FLAGS[isa])
    ldflags = tuple(_openmp())
    h = hashlib.sha256()
    for path in (*sources, *sorted(csrc.glob("*.h"))):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for part in (*cflags, "|", *ldflags, "|", torch.__version__, sys.version, platform.machine(),
                 os.environ.get("CXX", "c++")):
        h.update(part.encode() + b"\0")
    key = h.hexdigest()[:16]
    tag = f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{isa}-{key}"
    return Build(name=f"llmkern_cpu_{key}", directory=_cache_root() / "cpu" / tag, isa=isa, cflags=cflags,
                 ldflags=ldflags, sources=sources)


# ------------------------------------------------------------------------------------------------------- build
_lock = threading.Lock()
_loaded: Optional[Build] = None          # the build loaded into this process
_failure: Optional[BuildError] = None    # why it could not be, once tried


def _summary(output: str) -> str:
    """The line of a compiler/ninja output that says what went wrong: the first compiler error, else the first
    failed command, else the last line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for marker in ("error:", "FAILED:"):
        for ln in lines:
            if marker in ln:
                return ln[:300]
    return lines[-1][:300] if lines else "no output"


def _compile(b: Build, verbose: bool) -> None:
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise BuildError(f"no C++ compiler: {cxx!r} (from $CXX, default c++) is not on PATH", None)
    if not cpp_extension.is_ninja_available():
        raise BuildError("ninja is not installed (pip install ninja)", None)
    b.directory.mkdir(parents=True, exist_ok=True)
    with _build_lock(b):
        if b.done.is_file():          # another process built it while this one waited
            torch.ops.load_library(str(b.library))
            return
        _load_extension(b, cxx, verbose)


@contextlib.contextmanager
def _build_lock(b: Build):
    """One builder per build directory, across processes (pytest-xdist workers, several shells). cpp_extension has
    its own lock, a file ("lock") that a killed build leaves behind, after which every later build of the directory
    waits forever; an flock is released by the OS when its holder dies, so under it a leftover "lock" is stale and
    is removed. (Where fcntl is missing, cpp_extension's lock alone.)"""
    if fcntl is None:
        yield
        return
    with open(b.directory / "build.flock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        (b.directory / "lock").unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load_extension(b: Build, cxx: str, verbose: bool) -> None:
    from torch.utils import cpp_extension

    t0 = time.perf_counter()
    try:
        cpp_extension.load(name=b.name, sources=[str(s) for s in b.sources], extra_cflags=list(b.cflags),
                           extra_ldflags=list(b.ldflags), build_directory=str(b.directory), verbose=verbose,
                           is_python_module=False)
    except Exception as e:  # noqa: BLE001 (cpp_extension raises RuntimeError, OSError, subprocess errors)
        b.log.write_text(f"llmkern C++ CPU backend build failed\ncompiler: {cxx}\ncflags: {' '.join(b.cflags)}\n\n"
                         f"{type(e).__name__}: {e}\n")
        raise BuildError(f"the build failed: {_summary(str(e))}", b.log) from e
    b.log.write_text(f"llmkern C++ CPU backend built in {time.perf_counter() - t0:.1f} s\ncompiler: {cxx}\n"
                     f"cflags: {' '.join(b.cflags)}\nsources: {', '.join(s.name for s in b.sources)}\n")
    b.done.write_text("ok\n")


def build(verbose: bool = False) -> Build:
    """Build (unless cached) and load the library into this process; return where it is. Raises BuildError, and
    raises the same error again on later calls: a build is tried once per process."""
    global _loaded, _failure
    with _lock:
        if _loaded is not None:
            return _loaded
        if _failure is not None:
            raise _failure
        try:
            b = plan()
            if b.done.is_file():
                torch.ops.load_library(str(b.library))
            else:
                _compile(b, verbose)          # cpp_extension.load also loads the library
        except Exception as e:  # noqa: BLE001 (any failure means: no C++ backend in this process)
            _failure = e if isinstance(e, BuildError) else BuildError(f"{type(e).__name__}: {e}", None)
            raise _failure from e
        _loaded = b
        return b


_warned = False


def load() -> bool:
    """True when the C++ library is loaded (building it the first time). A failure warns once, then stays False."""
    global _warned
    if _loaded is not None:
        return True
    try:
        build()
        return True
    except BuildError as e:
        if not _warned:
            _warned = True
            warnings.warn(f"llmkern: the C++ CPU backend is unavailable, CPU ops fall back to the PyTorch reference: "
                          f"{e}", RuntimeWarning, stacklevel=3)
        return False


def backend_choice() -> str:
    """LLMKERN_CPU_BACKEND, read on every call so that tests and users can switch it at run time."""
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in _BACKEND_CHOICES:
        raise ValueError(f"{BACKEND_ENV} must be one of {_BACKEND_CHOICES}, got {choice!r}")
    return choice


def build_info() -> str:
    """How the loaded library was compiled (vector ISA, lanes, OpenMP), as the C++ side reports it."""
    return _lib().build_info()


# ------------------------------------------------------------------------------------------------------ kernels
_ADAPTERS: dict[str, Callable] = {}


def _adapter(op_name: str):
    def wrap(fn: Callable) -> Callable:
        _ADAPTERS[op_name] = fn
        return fn
    return wrap


def _lib():
    """The C++ functions (one place, so a test can check that bad input never reaches them)."""
    return torch.ops.llmkern_cpu


def implemented() -> tuple[str, ...]:
    """The llmkern:: ops that have a C++ kernel."""
    return tuple(sorted(_ADAPTERS))


def kernel(op_name: str) -> Optional[Callable]:
    """The C++ implementation of llmkern::<op_name>, or None (module docstring). With LLMKERN_CPU_BACKEND=cpp a
    failed build raises BuildError instead of returning None."""
    choice = backend_choice()
    if choice == "reference" or op_name not in _ADAPTERS:
        return None
    if choice == "cpp":
        build()
    elif not load():
        return None
    return _ADAPTERS[op_name]


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any strides but a strided last dim: copy only then (as llmkern._utils.last_dim_contiguous)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(rows, last dim) with a contiguous last dim (a copy only when no such view exists). The row count is given,
    not -1: reshape cannot infer it for an empty last dim (linear's in_features 0)."""
    t = _last_contiguous(t)
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


# -------------------------------------------------------------------------------------------------- layers.cpp
@_adapter("rms_norm")
def _rms_norm(x, weight, eps, offset, casting):
    y = torch.empty(x.shape, dtype=x.dtype)
    _lib().rms_norm(_rows(x), None, weight.contiguous(), y.view(-1, x.shape[-1]), None, eps, offset,
                    casting == "llama")
    return y


@_adapter("add_rms_norm")
def _add_rms_norm(x, residual, weight, eps, offset, casting):
    y = torch.empty(x.shape, dtype=x.dtype)
    r_out = torch.empty(x.shape, dtype=x.dtype)
    n = x.shape[-1]
    _lib().rms_norm(_rows(x), _rows(residual), weight.contiguous(), y.view(-1, n), r_out.view(-1, n), eps, offset,
                    casting == "llama")
    return y, r_out


def _as4d(t: torch.Tensor) -> torch.Tensor:
    """(tokens, heads, d) packed tokens as one sequence: (1, tokens, heads, d)."""
    return t.unsqueeze(0) if t.dim() == 3 else t


def _run_rope(q, k, q_out, k_out, positions, cos, sin, theta):
    """q/k (and the outputs) as 4-D (batch, seq, heads, head_dim) views and the angles as (batch or 1, seq[, d])
    views, as llmkern.layers builds them for the Triton launcher (the public function has checked their shapes)."""
    if cos is not None:
        cos, sin = (_last_contiguous(t.unsqueeze(0) if t.dim() == 2 else t) for t in (cos, sin))
    else:
        positions = positions.unsqueeze(0) if positions.dim() == 1 else positions
    _lib().rope(_as4d(q), _as4d(k), _as4d(q_out), _as4d(k_out), positions, cos, sin, theta)


@_adapter("rope")
def _rope(q, k, positions, cos, sin, theta):
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype), torch.empty(k.shape, dtype=k.dtype)
    _run_rope(_last_contiguous(q), _last_contiguous(k), q_out, k_out, positions, cos, sin, theta)
    return q_out, k_out


@_adapter("rope_")
def _rope_inplace(q, k, positions, cos, sin, theta):
    _run_rope(q, k, q, k, positions, cos, sin, theta)


# ----------------------------------------------------------------------------------------------------- linear.cpp
LINEAR_MAX_ROWS = 16    # rows of x up to which llmkern::linear runs the C++ kernel (csrc/linear.cpp kMaxRows)


@_adapter("linear")
def _linear(x, weight, bias):
    """csrc/linear.cpp for decode shapes (at most LINEAR_MAX_ROWS rows of x, leading dims flattened); F.linear (the
    reference, torch's BLAS GEMM) for more rows."""
    x2 = _rows(x)
    if x2.shape[0] > LINEAR_MAX_ROWS:
        return NotImplemented
    out = torch.empty((x2.shape[0], weight.shape[0]), dtype=x.dtype)
    _lib().linear(x2, _last_contiguous(weight), bias, out)
    return out.view(*x.shape[:-1], weight.shape[0])


# ----------------------------------------------------------------------------------------------- attention.cpp
_NO_LSE = torch.empty(0, dtype=torch.float32)


# The variants (issue 12), all in C++: the dense ops take ALiBi and sinks (alibi_slopes, sinks); the paged ops also an
# fp8 cache (k_scale / v_scale, float32 (num_kv_heads,) tensors by the time an op runs).
@_adapter("attention")
def _attention(q, k, v, causal, scale, window_left, window_right, softcap, return_lse, alibi_slopes, sinks):
    q, k, v = (_last_contiguous(t) for t in (q, k, v))
    o = torch.empty(q.shape, dtype=q.dtype)
    lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32) if return_lse else None
    _lib().attention(q, k, v, None, None, o, lse, scale, softcap, window_left, 0 if causal else window_right,
                     alibi_slopes, sinks)
    return o, (lse if return_lse else _NO_LSE.clone())


@_adapter("attention_varlen")
def _attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window_left,
                      window_right, softcap, return_lse, alibi_slopes, sinks):
    q, k, v = (_last_contiguous(t) for t in (q, k, v))
    # rows past cu_seqlens_q[-1] belong to no sequence: 0 and -inf, as from the Triton kernel
    o = torch.zeros(q.shape, dtype=q.dtype)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32) if return_lse else None
    _lib().attention(q, k, v, cu_seqlens_q, cu_seqlens_k, o, lse, scale, softcap, window_left,
                     0 if causal else window_right, alibi_slopes, sinks)
    return o, (lse if return_lse else _NO_LSE.clone())


# ----------------------------------------------------------------------------------------- paged_attention.cpp
@_adapter("paged_kv_write")
def _paged_kv_write(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale):
    # any strides, the caches' last dim's included; an fp8 cache quantized with the scales
    _lib().paged_kv_write(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


# The attention kernels read a cache with any strides but a strided head_dim: a cache in that (rare) layout is copied.
@_adapter("paged_decode_attention")
def _paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, softcap, window_left, window_right, num_splits,
                  *variants):
    out = torch.empty(q.shape, dtype=q.dtype)
    # decode's one query sits at the last key: a right window masks nothing
    _lib().paged_decode(_last_contiguous(q), _last_contiguous(k_cache), _last_contiguous(v_cache), block_tables,
                        seq_lens, out, scale, softcap, window_left, num_splits, *variants)
    return out


@_adapter("paged_prefill_attention")
def _paged_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, causal, scale, softcap, window_left,
                   window_right, *variants):
    out = torch.empty(q.shape, dtype=q.dtype)
    _lib().paged_prefill(_last_contiguous(q), _last_contiguous(k_cache), _last_contiguous(v_cache), block_tables,
                         cu_seqlens_q, seq_lens, out, scale, softcap, window_left, 0 if causal else window_right,
                         *variants)
    return out


@_adapter("paged_attention")
def _paged_attention(q, k_cache, v_cache, out, block_tables, seq_lens, cu_seqlens_q, schedule, part_o, part_lse,
                     batch_size, num_tokens, grid_items, grid_reduce, decode_tiles, scale, softcap, window_left,
                     window_right, *variants):
    """A PagedAttentionPlan's run on the C++ kernels above, which take the step's tables, not the plan's work list
    (the schedule and the split-KV workspace are the GPU's): a decode step (one token per sequence) goes to
    paged_decode (its own split choice, over CPU threads), any other step to paged_prefill, which serves mixed
    batches (a decode token is a one-token chunk). The plan's buffers are sized for its capacities: the first
    batch_size sequences and num_tokens rows are this step's. The variants (k_scale, v_scale, alibi_slopes, sinks) go
    to either."""
    if num_tokens == 0:
        return
    b = batch_size
    q = _last_contiguous(q[:num_tokens])
    k_cache, v_cache = _last_contiguous(k_cache), _last_contiguous(v_cache)
    rows = out[:num_tokens]
    dst = rows if rows.stride(-1) == 1 else torch.empty(rows.shape, dtype=rows.dtype)
    if decode_tiles and num_tokens == b:
        _lib().paged_decode(q, k_cache, v_cache, block_tables[:b], seq_lens[:b], dst, scale, softcap, window_left, 0,
                            *variants)
    else:
        _lib().paged_prefill(q, k_cache, v_cache, block_tables[:b], cu_seqlens_q[:b + 1], seq_lens[:b], dst, scale,
                             softcap, window_left, window_right, *variants)
    if dst is not rows:
        rows.copy_(dst)


# ----------------------------------------------------------------------------------------------------- mla.cpp
@_adapter("mla_kv_write")
def _mla_kv_write(ckv, kpe, ckv_cache, kpe_cache, slot_mapping):
    _lib().mla_kv_write(ckv, kpe, ckv_cache, kpe_cache, slot_mapping)   # any strides, the caches' last dims included


# One C++ function serves decode (no cu_seqlens_q: one query row per sequence) and prefill; like the paged attention
# kernels it reads any strides but a strided last dim, which is copied.
def _run_mla(q_nope, q_pe, ckv_cache, kpe_cache, block_tables, cu_seqlens_q, seq_lens, scale, causal, num_splits):
    q_nope, q_pe, ckv_cache, kpe_cache = (_last_contiguous(t) for t in (q_nope, q_pe, ckv_cache, kpe_cache))
    out = torch.empty(q_nope.shape, dtype=q_nope.dtype)
    _lib().mla_attention(q_nope, q_pe, ckv_cache, kpe_cache, block_tables, cu_seqlens_q, seq_lens, out, scale,
                         causal, num_splits)
    return out


@_adapter("mla_decode_attention")
def _mla_decode(q_nope, q_pe, ckv_cache, kpe_cache, block_tables, seq_lens, scale, num_splits):
    return _run_mla(q_nope, q_pe, ckv_cache, kpe_cache, block_tables, None, seq_lens, scale, False, num_splits)


@_adapter("mla_prefill_attention")
def _mla_prefill(q_nope, q_pe, ckv_cache, kpe_cache, block_tables, cu_seqlens_q, seq_lens, causal, scale):
    return _run_mla(q_nope, q_pe, ckv_cache, kpe_cache, block_tables, cu_seqlens_q, seq_lens, scale, causal, 0)


# ---------------------------------------------------------------------------------------------------- quant.cpp
@_adapter("quant_matmul")
def _quant_matmul(x, qweight, scales, zeros, perm, bias, bits, group_size):
    n = scales.shape[1]
    x2 = _rows(x)
    out = torch.empty((x2.shape[0], n), dtype=x.dtype)
    _lib().quant_matmul(x2, qweight.contiguous(), scales.contiguous(), zeros.contiguous(),
                        None if perm is None else perm.contiguous(), None if bias is None else bias.contiguous(),
                        bits, group_size, 0, out)   # path 0: the decode or GEMM path by rows (quant.cpp)
    return out.reshape(*x.shape[:-1], n)


# ------------------------------------------------------------------------------------------------------ moe.cpp
@_adapter("fused_moe")
def _fused_moe(hidden_states, w13, w13_scales, w13_zeros, w13_perm, w13_bits, w13_group_size, w2, w2_scales,
               w2_zeros, w2_perm, w2_bits, w2_group_size, topk_weights, topk_ids, activation):
    """csrc/moe.cpp, for dense and packed (int4/int8) experts alike. A dense weight is read in place with any strides
    but a strided last dim: a weight stored transposed is copied (whole, every call: the rare layout pays, as the
    attention caches above do); a packed weight's tensors are read contiguous (QuantizedExperts keeps them so). The
    routing tensors are tiny: made float32 / int64 contiguous (int64 keeps ids such as 2**40 out of range, where int32
    would wrap them)."""
    def weight(w, scales, zeros, perm, bits):
        if bits == 16:
            return (_last_contiguous(w), scales, zeros, perm)
        return tuple(None if t is None else t.contiguous() for t in (w, scales, zeros, perm))
    out = torch.empty(hidden_states.shape, dtype=hidden_states.dtype)
    _lib().fused_moe(_last_contiguous(hidden_states), *weight(w13, w13_scales, w13_zeros, w13_perm, w13_bits),
                     w13_bits, w13_group_size, *weight(w2, w2_scales, w2_zeros, w2_perm, w2_bits), w2_bits,
                     w2_group_size, topk_weights.float().contiguous(), topk_ids.long().contiguous(), out)
    return out


# ------------------------------------------------------------------------------------------------- sampling.cpp
@_adapter("sample")
def _sample(logits, temperature, top_k, top_p, min_p, seed):
    return _lib().sample(_last_contiguous(logits), temperature, top_k, top_p, min_p, seed)


@_adapter("sampling_probs")
def _sampling_probs(logits, temperature, top_k, top_p, min_p):
    return _lib().sampling_probs(_last_contiguous(logits), temperature, top_k, top_p, min_p)


# ------------------------------------------------------------------------------------------------ roofline.cpp
def _last_level_cache_bytes() -> Optional[int]:
    """The size of cpu0's largest cache as Linux reports it (sysfs), or None."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        scale = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes) if sizes else None


def measure_stream(array_bytes: Optional[int] = None, reps: int = 5) -> dict[str, float]:
    """STREAM read / copy / triad over all of torch's threads, in GB/s (1e9 B/s), best of `reps` (McCalpin's rule).

    array_bytes: each of the three fp32 arrays. STREAM asks for at least 4x the last-level cache, which is the
    default (from sysfs; 256 MiB when unknown), kept within [64 MiB, 1 GiB]. Bytes are counted as STREAM counts them:
    read 1 array, copy 2, triad 3 (write-allocate traffic not counted). Raises BuildError when the C++ backend
    cannot be built. Also returns the thread count and the array size used.
    """
    if array_bytes is None:
        llc = _last_level_cache_bytes()
        array_bytes = min(max(4 * llc, 64 * 2 ** 20), 2 ** 30) if llc else 256 * 2 ** 20
    build()
    n = max(int(array_bytes) // 4, 1024)
    read, copy, triad = (float(v) for v in _lib().stream(n, int(reps)))
    return {"read_gbps": read, "copy_gbps": copy, "triad_gbps": triad, "threads": torch.get_num_threads(),
            "array_bytes": n * 4}
