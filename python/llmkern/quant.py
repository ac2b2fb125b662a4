"""Weight-only quantized matmul, the host side: int8 / int4 weights, fp16 / bf16 / fp32 activations.

    quant_matmul(x, qweight, bias=None)     x (..., K) -> (..., N) = x @ qweight.dequantize().T + bias
    triton_matmul(x, weight, bias=None, *, path=None, split_k=None)      the Triton kernels, path chosen by hand

The weight format (QuantizedWeight: packed codes, scales, zero points, act-order) and the GPTQ/AWQ conversions are in
llmkern.quant_weight; the nn.Module (QuantLinear, quantize_model) in llmkern.quant_linear.

Three kernels (llmkern.kernels.quant); the dispatcher picks by M = rows of x (the product of its leading dims):
  M = 1     quant_gemv_kernel: each packed word loaded once, unpacked slot by slot in registers, fp32 FMAs.
  M 2..16   quant_decode_kernel: a 32-row K-tile of codes through a 16-row tl.dot (rows padded to 16).
            Both decode kernels split K across programs so all SMs stream weights: each K-range writes its fp32
            partial tile to a workspace, and quant_split_reduce_kernel adds them in split order (deterministic).
  M > 16    quant_gemm_kernel: tiled GEMM, a K-tile of codes dequantized on chip and fed to tl.dot.

The hot path (issue 11: a Llama-3-8B decode step makes 224 of these calls): no device sync, no check or launch
decision repeated per call, no allocation but the output. The op's checks run once per signature of its arguments
(every tensor's shape, dtype and device, bits, group size: exactly what the checks read) and are cached with the
weight format they describe (`_format`); each format caches the launch of each M class (the GEMV, the 16-row dot,
the GEMM per power-of-two bucket of M: `_Format.plan`). The split-K workspace is `_utils.scratch`, reused from call
to call, and needs no zeroing: every element the reduce kernel reads was written by the decode kernel before it.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from llmkern import _dispatch, _utils, compile_check, reference, tuning
from llmkern.kernels.quant import (quant_decode_kernel, quant_gemm_kernel, quant_gemv_kernel,
                                   quant_split_reduce_kernel)
from llmkern.quant_weight import SCALE_DTYPES, QuantizedWeight

# The dot kernels' K-tile is 32 rows: the smallest supported group size, so a tile lies inside one group.
BLOCK_K = 32

# ----------------------------------------------------------------------------------------------- tile configs
# Decode, M = 1 (GEMV): a tile is BLOCK_W = 4 word rows (32 rows of K at int4, 16 at int8: inside the smallest group)
# by BLOCK_N = 256 columns, 4 KB of words, two 16-byte loads per thread at 4 warps (80 registers per thread, so six
# programs fit on an SM). check-compile shows no shared-memory staging for these loads, so latency is hidden by
# programs in flight rather than by stages: see _PROGRAMS_PER_SM.
_GEMV_CONFIG = triton.Config({"BLOCK_N": 256, "BLOCK_W": 4}, num_warps=4, num_stages=4)
# Decode, M = 2..16: rows padded to 16 for tl.dot; a 16 x 64 fp32 accumulator is tiny, and narrow column blocks give
# more programs before split-K is needed. Three stages let the next tiles' loads fly during this one's dot.
_DECODE_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": BLOCK_K}, num_warps=4, num_stages=3)
# Prefill (M > 16): Triton's matmul tutorial tiles for fp16 on A100/H100 with BLOCK_K = 32 (64 x 128, 4 warps,
# 4 stages; 128 x 128, 8 warps, 3 stages), GROUP_M = 8 as there. The 64-row tile is first: the interpreter runs
# configs[0], and test shapes then cross several row tiles.
_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": BLOCK_K, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": BLOCK_K, "GROUP_M": 8}, num_warps=8, num_stages=3),
]
# The best tile depends on the weight shape and on M, which changes every prefill call: one autotuner per tuning key
# (llmkern.tuning) with M bucketed to the next power of two, so a new prompt length re-runs the tuner only when it
# crosses into a new bucket. A config shipped for the GPU in python/llmkern/configs/ replaces autotuning for its key.
# fp32 activations: the IEEE fp32 dot runs on the FMA units with its operand tiles in registers (no tensor cores).
# A software pipeline keeps the next tiles in registers too: with num_stages >= 2 even 32 x 64 tiles took 255
# registers and spilled on sm_90, while one stage needs 120-190 (llmkern check-compile, triton 3.9). Latency is
# hidden by the FMA work per tile instead. The 32-row tile is first: the interpreter runs configs[0].
_GEMM_FP32_CONFIGS = [
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": BLOCK_K, "GROUP_M": 8}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": BLOCK_K, "GROUP_M": 8}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": BLOCK_K, "GROUP_M": 8}, num_warps=8, num_stages=1),
]
_GEMM = tuning.TunedKernel("quant_gemm", quant_gemm_kernel, buckets=("m",),
                           configs=lambda key: (_GEMM_FP32_CONFIGS if key.get("dtype") == torch.float32
                                                else _GEMM_CONFIGS),
                           spec=lambda key, cfg: _gemm_spec(cfg, key["dtype"]))

# Cut-over. Up to 16 rows a tensor-core tile (minimum M = 16) is not even full, each weight feeds at most 16
# multiply-adds, and the time is the weight bytes over HBM bandwidth: what matters is that every SM streams weights,
# which the decode kernel's split-K gives. Beyond 16 rows the GEMM's BLOCK_M = 64/128 row tiles reuse each
# dequantized K-tile across many rows, and the work per weight byte grows until the op turns compute-bound.
DECODE_MAX_M = 16

# The decode grid aims at four programs per SM. Little's law: an H100 streams 3.35 TB/s with ~1 us of DRAM latency,
# ~25 KB in flight per SM (132 SMs); four GEMV programs with a 4 KB tile each in flight, plus the next tile's loads
# issued while the current one is multiplied, come close. (A guess from the datasheet: not yet timed on a GPU.)
_PROGRAMS_PER_SM = 4


# The split-K reduction: one program per (row, 1024 columns), 8 fp32 values per thread at 4 warps; it reads the
# splits' partial tiles (a few KB per program) from L2, where the decode kernel just wrote them.
_REDUCE_CONFIG = triton.Config({"BLOCK_N": 1024}, num_warps=4)


# ----------------------------------------------------------------------------------------------- launch plans
class _Plan:
    """One launch of one weight format at one M class: the kernel, its grid (decode paths) and its arguments that do
    not change from call to call."""

    def __init__(self, path: str, kernel, grid: Optional[tuple], split: int, tiles_per_split: int, meta: dict):
        self.path, self.kernel, self.grid, self.meta = path, kernel, grid, meta
        self.split, self.tiles_per_split = split, tiles_per_split


class _Format:
    """A weight format as the kernels see it (K, N, bits, group size, act-order, bias, activation dtype, device),
    with the launch plan of each M class, made on first use."""

    def __init__(self, weight: QuantizedWeight, dtype: torch.dtype, has_bias: bool):
        self.k, self.n, self.bits = weight.in_features, weight.out_features, weight.bits
        self.gs = self.k if weight.group_size == -1 else weight.group_size
        self.pack_shift = {4: 3, 8: 2}[self.bits]                       # log2(32 // bits)
        self.has_perm, self.has_bias = weight.perm is not None, has_bias
        self.dtype, self.device = dtype, weight.device
        self.plans: dict[tuple, _Plan] = {}

    def plan(self, m: int, path: Optional[str] = None, split_k: Optional[int] = None) -> _Plan:
        """The launch for m rows: path "decode" (m <= DECODE_MAX_M: the GEMV at m = 1, else the 16-row dot) or
        "gemm", default by m; split_k: K-ranges per column block of the decode path (default: enough programs to
        fill the SMs)."""
        path = path or ("decode" if m <= DECODE_MAX_M else "gemm")
        if path == "decode" and m > DECODE_MAX_M:
            raise ValueError(f"the decode path serves at most {DECODE_MAX_M} rows, got {m}")
        # the GEMV, the 16-row dot, the GEMM's buckets (and the interpreter switch, which tests flip)
        key = (path, tuning.bucket(m) if path == "gemm" else min(m, 2), split_k, _utils.INTERPRET)
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = self._make_plan(m, path, split_k)
        return plan

    def _make_plan(self, m: int, path: str, split_k: Optional[int]) -> _Plan:
        # The dot kernels' fp32 tiles and IEEE dot: fp32 activations keep fp32 accuracy (no TF32), and the
        # interpreter gets fp32 tiles (its bf16 dot is unreliable). The codes (q - z) are small integers, exact in
        # every dtype.
        flags = dict(HAS_PERM=self.has_perm, HAS_BIAS=self.has_bias, INTERPRET=_utils.INTERPRET)
        dot_fp32 = _utils.INTERPRET or self.dtype == torch.float32
        if path == "gemm":
            gemm = _GEMM.get(self.device, dtype=self.dtype, bits=self.bits, n=self.n, k=self.k, m=m)
            return _Plan("gemm", gemm, None, 1, 0, dict(flags, DOT_FP32=dot_fp32))
        gemv = m == 1
        cfg = _GEMV_CONFIG if gemv else _DECODE_CONFIG
        n_blocks = triton.cdiv(self.n, cfg.kwargs["BLOCK_N"])
        # K is split in whole tiles: BLOCK_W word rows for the GEMV, BLOCK_K rows of K for the 16-row dot
        k_tiles = (triton.cdiv(self.k >> self.pack_shift, cfg.kwargs["BLOCK_W"]) if gemv
                   else triton.cdiv(self.k, BLOCK_K))
        split = split_k if split_k is not None else _decode_split(n_blocks, k_tiles, self.device)
        tiles_per_split = triton.cdiv(k_tiles, max(1, min(split, k_tiles)))
        split = triton.cdiv(k_tiles, tiles_per_split)                     # no empty K-ranges
        meta = dict(flags, SPLIT=split > 1, **cfg.kwargs, **_launch_options(cfg))
        if not gemv:
            meta["DOT_FP32"] = dot_fp32
        return _Plan("gemv" if gemv else "decode", quant_gemv_kernel if gemv else quant_decode_kernel,
                     (n_blocks, split), split, tiles_per_split, meta)


def _launch_options(cfg: triton.Config) -> dict:
    return {} if _utils.INTERPRET else dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _decode_split(n_blocks: int, k_tiles: int, device: torch.device) -> int:
    """K-ranges per column block: enough programs for _PROGRAMS_PER_SM per SM, at least one K-tile each."""
    want = _utils.cdiv(_PROGRAMS_PER_SM * _utils.num_sms(device), n_blocks)
    return max(1, min(k_tiles, want))


def _launch(fmt: _Format, plan: _Plan, x2, qweight, scales, zeros, perm, bias, out) -> None:
    """Run plan on x2 (m, K) into out (m, N); the weight tensors contiguous, as the op makes them."""
    m, n, k = x2.shape[0], fmt.n, fmt.k
    perm_arg = perm if perm is not None else qweight                     # never read without HAS_PERM
    bias_arg = bias if bias is not None else out                          # never read without HAS_BIAS
    if plan.path == "gemm":
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _utils.launch(plan.kernel, grid, x2, qweight, scales, zeros, perm_arg, bias_arg, out,
                      m, n, k, x2.stride(0), x2.stride(1), out.stride(0), fmt.gs, fmt.bits, fmt.pack_shift,
                      **plan.meta)
        return
    ws = _utils.scratch(x2.device, plan.split * m * n) if plan.split > 1 else out   # (split, m, n) partial tiles
    if plan.path == "gemv":
        plan.kernel[plan.grid](x2, qweight, scales, zeros, perm_arg, bias_arg, out, ws, n, k >> fmt.pack_shift,
                               x2.stride(1), fmt.gs, fmt.bits, fmt.pack_shift, plan.tiles_per_split, **plan.meta)
    else:
        plan.kernel[plan.grid](x2, qweight, scales, zeros, perm_arg, bias_arg, out, ws, m, n, k, x2.stride(0),
                               x2.stride(1), out.stride(0), fmt.gs, fmt.bits, fmt.pack_shift, plan.tiles_per_split,
                               **plan.meta)
    if plan.split > 1:
        block = _REDUCE_CONFIG.kwargs["BLOCK_N"]
        quant_split_reduce_kernel[(m, triton.cdiv(n, block))](
            ws, bias_arg, out, m, n, out.stride(0), plan.split, HAS_BIAS=fmt.has_bias, BLOCK_N=block,
            INTERPRET=_utils.INTERPRET, **_launch_options(_REDUCE_CONFIG))


def triton_matmul(x: torch.Tensor, weight: QuantizedWeight, bias: Optional[torch.Tensor] = None, *,
                  path: Optional[str] = None, split_k: Optional[int] = None) -> torch.Tensor:
    """x (M, K) @ weight.dequantize().T + bias on the Triton kernels, with the dispatcher's choices open to the caller.

    What quant_matmul's op runs on CUDA, exposed so tests and benchmarks can run every path on the same shapes:
    path "decode" (M <= DECODE_MAX_M: the GEMV at M = 1, else the 16-row dot) or "gemm" (any M), default by M;
    split_k: K-ranges per column block of the decode path (default: enough programs to fill the SMs). Needs CUDA
    tensors, or CPU tensors under TRITON_INTERPRET=1. Only path and split_k are checked here: x (M, K) in the
    weight's dtype and device, and bias (N,) or None, must be what quant_matmul accepts.
    """
    if split_k is not None and (isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 1):
        raise ValueError(f"split_k must be an int >= 1 or None, got {split_k!r}")
    if path not in ("decode", "gemm", None):
        raise ValueError(f"path must be 'decode', 'gemm' or None, got {path!r}")
    bias = None if bias is None else bias.contiguous()
    return _matmul(_Format(weight, x.dtype, bias is not None), x, weight.qweight, weight.scales, weight.zeros,
                   weight.perm, bias, path, split_k)


def _matmul(fmt: _Format, x, qweight, scales, zeros, perm, bias, path=None, split_k=None) -> torch.Tensor:
    """x (..., K) -> (..., N) with the plan for its rows."""
    x2 = _utils.last_dim_contiguous("x", x).reshape(-1, fmt.k)
    out = torch.empty((x2.shape[0], fmt.n), dtype=x2.dtype, device=x2.device)
    if x2.shape[0]:
        _launch(fmt, fmt.plan(x2.shape[0], path, split_k), x2, qweight, scales, zeros, perm, bias, out)
    return out.view(*x.shape[:-1], fmt.n)


# ----------------------------------------------------------------------------------------------- the op
def _weight(x, qweight, scales, zeros, perm, bits, group_size) -> QuantizedWeight:
    """The op's tensors as a QuantizedWeight, checking that they agree (no device sync: a perm's values were checked
    where its QuantizedWeight was built)."""
    return QuantizedWeight._unchecked_values(qweight, scales, zeros, bits=bits, group_size=group_size,
                                             in_features=x.shape[-1] if x.dim() else 0,
                                             out_features=scales.shape[1] if scales.dim() == 2 else 0, perm=perm)


def _meta(t: Optional[torch.Tensor]) -> Optional[tuple]:
    return None if t is None else (t.shape, t.dtype, t.device)


# The checked formats, by the signature of the op's arguments. One entry per weight format a process runs (a model
# has a handful), so the dict stays small.
_FORMATS: dict[tuple, _Format] = {}


def _format(x, qweight, scales, zeros, perm, bias, bits, group_size) -> _Format:
    """The op's argument checks (the public function's, for a direct torch.ops.llmkern.quant_matmul call too), run
    once per signature: every tensor's shape, dtype and device (x: its last dim), bits and group size, which is all
    the checks read (the tensors arrive contiguous: the op's `contiguous`). Raises before any implementation runs, so
    inconsistent tensors never reach a kernel as out-of-bounds reads; no device sync."""
    key = (x.shape[-1:], x.dtype, x.device, bits, group_size, _meta(qweight), _meta(scales), _meta(zeros),
           _meta(perm), _meta(bias))
    fmt = _FORMATS.get(key)
    if fmt is None:
        weight = _weight(x, qweight, scales, zeros, perm, bits, group_size)
        _check_x_bias(x, weight, bias)
        fmt = _FORMATS[key] = _Format(weight, x.dtype, bias is not None)
    return fmt


def _quant_matmul_reference(x, qweight, scales, zeros, perm, bias, bits, group_size):
    qw = _weight(x, qweight, scales, zeros, perm, bits, group_size)
    out = reference.quant_matmul(x.reshape(-1, qw.in_features), qw.dequantize(torch.float32), bias)
    return out.reshape(*x.shape[:-1], qw.out_features)


@_dispatch.custom_op("quant_matmul", mutates_args=(), reference=_quant_matmul_reference, check=_format,
                     contiguous=("qweight", "scales", "zeros", "perm", "bias"))
def _quant_matmul_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     perm: Optional[torch.Tensor], bias: Optional[torch.Tensor], bits: int,
                     group_size: int) -> torch.Tensor:
    fmt = _format(x, qweight, scales, zeros, perm, bias, bits, group_size)        # the cached entry `check` made
    return _matmul(fmt, x, qweight, scales, zeros, perm, bias)


@_quant_matmul_op.register_fake
def _(x, qweight, scales, zeros, perm, bias, bits, group_size):
    return x.new_empty((*x.shape[:-1], scales.shape[1]))


def quant_matmul(x: torch.Tensor, qweight: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (..., in_features) fp16/bf16/fp32 -> x @ qweight.dequantize().T + bias, (..., out_features) in x's dtype.

    Accumulates in fp32 (fp32 x: IEEE fp32 products too, no TF32); the result is rounded to nearest even into x's
    dtype on every path. x's dtype must be the scales' dtype (convert with qweight.to(dtype=...)). Any strides.
    Deterministic: the same inputs give the same bits on every call (split-K partial sums are added in a fixed
    order). TypeError/ValueError name a bad argument before any launch (the op's checks, run once per argument
    signature: see the module docstring); no device sync."""
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"qweight must be a llmkern.QuantizedWeight, got {type(qweight).__name__}")
    _utils.check_tensor("x", x)
    _check_x_weight(x, qweight)    # before the op: its checks take K from x, and a meta x would run its fake only
    if bias is not None:
        _utils.check_tensor("bias", bias)
        _utils.check_same(("x", "bias"), (x, bias), dtype=False)
    return _quant_matmul_op(x, qweight.qweight, qweight.scales, qweight.zeros, qweight.perm, bias, qweight.bits,
                            qweight.group_size)


def _check_x_weight(x: torch.Tensor, qweight: QuantizedWeight) -> None:
    if x.dim() < 1 or x.shape[-1] != qweight.in_features:
        raise ValueError(f"x's last dimension must be in_features={qweight.in_features}, got shape {tuple(x.shape)}")
    if x.device != qweight.device:
        raise ValueError(f"x is on {x.device} but qweight is on {qweight.device}; they must share a device")


def _check_x_bias(x, qweight: QuantizedWeight, bias) -> None:
    _utils.check_tensor("x", x, dtypes=SCALE_DTYPES)
    _check_x_weight(x, qweight)
    if x.dtype != qweight.dtype:
        raise TypeError(f"x has dtype {x.dtype} but qweight's scales are {qweight.dtype}; they must match "
                        f"(qweight.to(dtype=x.dtype) converts the scales)")
    if bias is not None:
        _utils.check_tensor("bias", bias, ndim=1, dtypes=SCALE_DTYPES)
        if bias.shape[0] != qweight.out_features:
            raise ValueError(f"bias must have shape ({qweight.out_features},), got {tuple(bias.shape)}")
        _utils.check_same(("x", "bias"), (x, bias))


# ----------------------------------------------------------------------------------------------- compile specs
_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _sig(dtype: torch.dtype) -> dict[str, str]:
    """Every kernel's arguments (each kernel reads the ones it has)."""
    ty = _TRITON_DTYPE[dtype]
    return {"x_ptr": f"*{ty}:16", "w_ptr": "*i32:16", "s_ptr": f"*{ty}:16", "z_ptr": "*i16:16",
            "perm_ptr": "*i32:16", "b_ptr": f"*{ty}:16", "out_ptr": f"*{ty}:16", "ws_ptr": "*fp32:16",
            # Llama shapes: every dimension and row stride is a multiple of 16, as the launcher would see them
            "M": "i32", "N": "i32:16", "K": "i32:16", "KW": "i32:16", "stride_xm": "i32:16", "stride_xk": "i32",
            "stride_om": "i32:16", "group_size": "i32:16", "bits": "i32", "pack_shift": "i32",
            "tiles_per_split": "i32"}


def _cfg_name(cfg, dtype, **flags) -> str:
    tiles = "".join(f"{k[6:]}{v}" for k, v in cfg.kwargs.items() if k in ("BLOCK_M", "BLOCK_N", "BLOCK_W"))
    return (f"{_TRITON_DTYPE[dtype]},{tiles}w{cfg.num_warps}s{cfg.num_stages}"
            + "".join(f",{name}" for name, on in flags.items() if on))


def _gemv_spec(dtype: torch.dtype, *, split: bool, perm: bool = False):
    cfg = _GEMV_CONFIG
    return compile_check.CompileSpec(
        kernel=quant_gemv_kernel, name="quant_gemv", config=_cfg_name(cfg, dtype, split=split, act_order=perm),
        signature=_sig(dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        constexprs=dict(HAS_PERM=perm, HAS_BIAS=perm, SPLIT=split, INTERPRET=False, **cfg.kwargs))


def _decode_spec(dtype: torch.dtype, *, split: bool, perm: bool = False):
    cfg = _DECODE_CONFIG
    return compile_check.CompileSpec(
        kernel=quant_decode_kernel, name="quant_decode", config=_cfg_name(cfg, dtype, split=split, act_order=perm),
        signature=_sig(dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        constexprs=dict(HAS_PERM=perm, HAS_BIAS=perm, SPLIT=split, DOT_FP32=dtype == torch.float32,
                        INTERPRET=False, **cfg.kwargs),
        expect_mma=dtype != torch.float32)


def _reduce_spec(dtype: torch.dtype, *, bias: bool):
    cfg = _REDUCE_CONFIG
    ty = _TRITON_DTYPE[dtype]
    return compile_check.CompileSpec(
        kernel=quant_split_reduce_kernel, name="quant_split_reduce",
        config=f"{ty},N{cfg.kwargs['BLOCK_N']}w{cfg.num_warps}" + (",bias" if bias else ""),
        signature={"ws_ptr": "*fp32:16", "b_ptr": f"*{ty}:16", "out_ptr": f"*{ty}:16", "M": "i32", "N": "i32:16",
                   "stride_om": "i32:16", "num_splits": "i32"},
        num_warps=cfg.num_warps, constexprs=dict(HAS_BIAS=bias, INTERPRET=False, **cfg.kwargs))


def _gemm_spec(cfg, dtype: torch.dtype, *, perm: bool = False):
    return compile_check.CompileSpec(
        kernel=quant_gemm_kernel, name="quant_gemm", config=_cfg_name(cfg, dtype, act_order=perm),
        signature=_sig(dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        constexprs=dict(HAS_PERM=perm, HAS_BIAS=perm, DOT_FP32=dtype == torch.float32, INTERPRET=False,
                        **cfg.kwargs),
        expect_mma=dtype != torch.float32)


@compile_check.register
def _compile_specs():
    """The GEMV (M = 1) and the 16-row decode dot, each with and without split-K, the split-K reduction with and
    without bias, and every GEMM config, in fp16, bf16 and fp32, without bias (Llama's linears have none); two
    act-order variants also take a bias: 27 specs. bits is a runtime argument, so int4 and int8 share each one. The
    16-bit dot kernels must use tensor cores (fp32 runs an IEEE fp32 dot on the FMA units)."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for split in (False, True):
            yield _gemv_spec(dtype, split=split)
            yield _decode_spec(dtype, split=split)
            yield _reduce_spec(dtype, bias=split)
        for cfg in (_GEMM_FP32_CONFIGS if dtype == torch.float32 else _GEMM_CONFIGS):
            yield _gemm_spec(cfg, dtype)
    yield _gemv_spec(torch.float16, split=True, perm=True)
    yield _decode_spec(torch.bfloat16, split=True, perm=True)
