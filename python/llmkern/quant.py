"""Weight-only quantized matmul, the host side: int8 / int4 weights, fp16 / bf16 activations.

    quant_matmul(x, qweight, bias=None)     x (..., K) -> (..., N) = x @ qweight.dequantize().T + bias
    triton_matmul(x, weight, bias=None, *, path=None, split_k=None)      the Triton kernels, path chosen by hand

The weight format (QuantizedWeight: packed codes, scales, zero points, act-order) and the GPTQ/AWQ conversions are in
llmkern.quant_weight; the nn.Module (QuantLinear, quantize_model) in llmkern.quant_linear.

Three kernels (llmkern.kernels.quant); the dispatcher picks by M = rows of x (the product of its leading dims):
  M = 1     quant_gemv_kernel: each packed word loaded once, unpacked slot by slot in registers, fp32 FMAs.
  M 2..16   quant_decode_kernel: a 32-row K-tile of codes through a 16-row tl.dot (rows padded to 16).
            Both decode kernels split K across programs (fp32 atomics into a workspace) so all SMs stream weights.
  M > 16    quant_gemm_kernel: tiled GEMM, a K-tile of codes dequantized on chip and fed to tl.dot.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from llmkern import _dispatch, _utils, compile_check, reference, tuning
from llmkern.kernels.quant import quant_decode_kernel, quant_gemm_kernel, quant_gemv_kernel
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
_GEMM = tuning.TunedKernel("quant_gemm", quant_gemm_kernel, buckets=("m",), configs=lambda key: _GEMM_CONFIGS,
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


# ----------------------------------------------------------------------------------------------- launch
def _decode_split(n_blocks: int, k_tiles: int, device: torch.device) -> int:
    """K-ranges per column block: enough programs for _PROGRAMS_PER_SM per SM, at least one K-tile each."""
    want = _utils.cdiv(_PROGRAMS_PER_SM * _utils.num_sms(device), n_blocks)
    return max(1, min(k_tiles, want))


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
    x2 = _utils.last_dim_contiguous("x", x)
    bias = None if bias is None else bias.contiguous()
    qweight, scales, zeros, perm = weight.qweight, weight.scales, weight.zeros, weight.perm
    bits, group_size = weight.bits, weight.group_size
    m, k = x2.shape
    n = scales.shape[1]
    out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if m == 0:
        return out
    gs = k if group_size == -1 else group_size
    pack_shift = {4: 3, 8: 2}[bits]                                       # log2(32 // bits)
    perm_arg = perm if perm is not None else qweight                     # never read without HAS_PERM
    bias_arg = bias if bias is not None else out                          # never read without HAS_BIAS
    if path is None:
        path = "decode" if m <= DECODE_MAX_M else "gemm"
    if path not in ("decode", "gemm"):
        raise ValueError(f"path must be 'decode', 'gemm' or None, got {path!r}")
    if path == "gemm":
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        gemm = _GEMM.get(x2.device, dtype=x2.dtype, bits=bits, n=n, k=k, m=m)
        _utils.launch(gemm, grid, x2, qweight, scales, zeros, perm_arg, bias_arg, out,
                      m, n, k, x2.stride(0), x2.stride(1), out.stride(0), gs, bits, pack_shift,
                      HAS_PERM=perm is not None, HAS_BIAS=bias is not None, DOT_FP32=_utils.INTERPRET)
        return out
    if m > DECODE_MAX_M:
        raise ValueError(f"the decode path serves at most {DECODE_MAX_M} rows, got {m}")
    gemv = m == 1
    cfg = _GEMV_CONFIG if gemv else _DECODE_CONFIG
    n_blocks = triton.cdiv(n, cfg.kwargs["BLOCK_N"])
    # K is split in whole tiles: BLOCK_W word rows for the GEMV, BLOCK_K rows of K for the 16-row dot
    k_tiles = triton.cdiv(k >> pack_shift, cfg.kwargs["BLOCK_W"]) if gemv else triton.cdiv(k, BLOCK_K)
    split = split_k if split_k is not None else _decode_split(n_blocks, k_tiles, x2.device)
    tiles_per_split = triton.cdiv(k_tiles, max(1, min(split, k_tiles)))
    split = triton.cdiv(k_tiles, tiles_per_split)                         # no empty K-ranges
    atomic = split > 1
    ws = out
    if atomic:   # fp32 partial sums from every K-range land here; it starts as the bias so none is added twice
        ws = (bias.float().expand(m, n).contiguous() if bias is not None
              else torch.zeros((m, n), dtype=torch.float32, device=x2.device))
    launch_opts = {} if _utils.INTERPRET else dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    flags = dict(HAS_PERM=perm is not None, HAS_BIAS=bias is not None, ATOMIC=atomic, **cfg.kwargs, **launch_opts)
    if gemv:
        quant_gemv_kernel[(n_blocks, split)](
            x2, qweight, scales, zeros, perm_arg, bias_arg, out, ws,
            n, k >> pack_shift, x2.stride(1), gs, bits, pack_shift, tiles_per_split, **flags)
    else:
        quant_decode_kernel[(n_blocks, split)](
            x2, qweight, scales, zeros, perm_arg, bias_arg, out, ws,
            m, n, k, x2.stride(0), x2.stride(1), out.stride(0), gs, bits, pack_shift, tiles_per_split,
            DOT_FP32=_utils.INTERPRET, **flags)
    if atomic:
        out.copy_(ws)
    return out


# ----------------------------------------------------------------------------------------------- the op
def _weight(x, qweight, scales, zeros, perm, bits, group_size) -> QuantizedWeight:
    """The op's tensors as a QuantizedWeight, which checks that they agree (no device sync)."""
    return QuantizedWeight(qweight, scales, zeros, bits=bits, group_size=group_size,
                           in_features=x.shape[-1] if x.dim() else 0,
                           out_features=scales.shape[1] if scales.dim() == 2 else 0, perm=perm)


def _check_op_args(x, qweight, scales, zeros, perm, bias, bits, group_size) -> None:
    """The op may be called directly (torch.ops.llmkern.quant_matmul): the public function's checks again, before any
    implementation runs (llmkern._dispatch), so inconsistent tensors never reach a kernel as out-of-bounds reads."""
    _check_x_bias(x, _weight(x, qweight, scales, zeros, perm, bits, group_size), bias)


def _quant_matmul_reference(x, qweight, scales, zeros, perm, bias, bits, group_size):
    qw = _weight(x, qweight, scales, zeros, perm, bits, group_size)
    out = reference.quant_matmul(x.reshape(-1, qw.in_features), qw.dequantize(torch.float32), bias)
    return out.reshape(*x.shape[:-1], qw.out_features)


@_dispatch.custom_op("quant_matmul", mutates_args=(), reference=_quant_matmul_reference, check=_check_op_args)
def _quant_matmul_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     perm: Optional[torch.Tensor], bias: Optional[torch.Tensor], bits: int,
                     group_size: int) -> torch.Tensor:
    qw = _weight(x, qweight, scales, zeros, perm, bits, group_size)
    out = triton_matmul(x.reshape(-1, qw.in_features), qw, bias)
    return out.reshape(*x.shape[:-1], qw.out_features)


@_quant_matmul_op.register_fake
def _(x, qweight, scales, zeros, perm, bias, bits, group_size):
    return x.new_empty((*x.shape[:-1], scales.shape[1]))


def quant_matmul(x: torch.Tensor, qweight: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (..., in_features) fp16/bf16 -> x @ qweight.dequantize().T + bias, (..., out_features) in x's dtype.

    Accumulates in fp32. x's dtype must be the scales' dtype (convert with qweight.to(dtype=...))."""
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"qweight must be a llmkern.QuantizedWeight, got {type(qweight).__name__}")
    bias = _check_x_bias(x, qweight, bias)
    return _quant_matmul_op(x, qweight.qweight, qweight.scales, qweight.zeros, qweight.perm, bias, qweight.bits,
                            qweight.group_size)


def _check_x_bias(x, qweight: QuantizedWeight, bias):
    _utils.check_tensor("x", x, dtypes=SCALE_DTYPES)
    if x.dim() < 1 or x.shape[-1] != qweight.in_features:
        raise ValueError(f"x's last dimension must be in_features={qweight.in_features}, got shape {tuple(x.shape)}")
    if x.dtype != qweight.dtype:
        raise TypeError(f"x has dtype {x.dtype} but qweight's scales are {qweight.dtype}; they must match "
                        f"(qweight.to(dtype=x.dtype) converts the scales)")
    if x.device != qweight.device:
        raise ValueError(f"x is on {x.device} but qweight is on {qweight.device}; they must share a device")
    if bias is not None:
        _utils.check_tensor("bias", bias, ndim=1, dtypes=SCALE_DTYPES)
        if bias.shape[0] != qweight.out_features:
            raise ValueError(f"bias must have shape ({qweight.out_features},), got {tuple(bias.shape)}")
        _utils.check_same(("x", "bias"), (x, bias))
        bias = bias.contiguous()
    return bias


# ----------------------------------------------------------------------------------------------- compile specs
_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16"}


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


def _gemv_spec(dtype: torch.dtype, *, atomic: bool, perm: bool = False):
    cfg = _GEMV_CONFIG
    return compile_check.CompileSpec(
        kernel=quant_gemv_kernel, name="quant_gemv", config=_cfg_name(cfg, dtype, atomic=atomic, act_order=perm),
        signature=_sig(dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        constexprs=dict(HAS_PERM=perm, HAS_BIAS=perm, ATOMIC=atomic, **cfg.kwargs))


def _decode_spec(dtype: torch.dtype, *, atomic: bool, perm: bool = False):
    cfg = _DECODE_CONFIG
    return compile_check.CompileSpec(
        kernel=quant_decode_kernel, name="quant_decode", config=_cfg_name(cfg, dtype, atomic=atomic, act_order=perm),
        signature=_sig(dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        constexprs=dict(HAS_PERM=perm, HAS_BIAS=perm, ATOMIC=atomic, DOT_FP32=False, **cfg.kwargs), expect_mma=True)


def _gemm_spec(cfg, dtype: torch.dtype, *, perm: bool = False):
    return compile_check.CompileSpec(
        kernel=quant_gemm_kernel, name="quant_gemm", config=_cfg_name(cfg, dtype, act_order=perm),
        signature=_sig(dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        constexprs=dict(HAS_PERM=perm, HAS_BIAS=perm, DOT_FP32=False, **cfg.kwargs), expect_mma=True)


@compile_check.register
def _compile_specs():
    """The GEMV (M = 1) and the 16-row decode dot, each with and without split-K atomics, and every GEMM config, in
    fp16 and bf16, without bias (Llama's linears have none); two act-order variants also take a bias: 14 specs. bits
    is a runtime argument, so int4 and int8 share each one. The 16-row decode dot and the GEMM must use tensor cores."""
    for dtype in (torch.float16, torch.bfloat16):
        for atomic in (False, True):
            yield _gemv_spec(dtype, atomic=atomic)
            yield _decode_spec(dtype, atomic=atomic)
        for cfg in _GEMM_CONFIGS:
            yield _gemm_spec(cfg, dtype)
    yield _gemv_spec(torch.float16, atomic=True, perm=True)
    yield _decode_spec(torch.bfloat16, atomic=True, perm=True)
