"""Weight-only quantized matmul: int8 / int4 weights, fp16 / bf16 activations; GPTQ and AWQ checkpoints.

    quantize_weight(weight, *, bits=4, group_size=128, symmetric=False) -> QuantizedWeight
    QuantizedWeight.from_gptq(qweight, qzeros, scales, *, g_idx=None, bits=4, group_size=128)
    QuantizedWeight.from_awq(qweight, qzeros, scales, *, group_size=128)
    quant_matmul(x, qweight, bias=None)            x (..., K) -> (..., N) = x @ qweight.dequantize().T + bias
    QuantLinear.from_linear(linear, bits=4, group_size=128, symmetric=False);  quantize_model(model, ...)

The weight is w[n, k] = (q[n, k] - z[g, n]) * s[g, n], g the group of k: N = out_features, K = in_features.

llmkern's packed layout (what QuantizedWeight holds; checkpoints are repacked into it once, at conversion):
  qweight  int32 (K // PACK, N), PACK = 32 // bits (8 int4 or 4 int8 codes per word), packed ALONG K: code (k, n)
           sits in bits [(k % PACK) * bits, (k % PACK + 1) * bits) of word (k // PACK, n); codes are unsigned. The
           same bit layout as GPTQ's qweight. Packing along K means one word holds PACK consecutive K rows of ONE
           output column, so a thread that loads it has everything one column's dot product needs from it: the GEMV
           loads (BLOCK_W, BLOCK_N) words once, coalesced along N, and unpacks them in registers; the dot kernels
           expand a (32, BLOCK_N) K-tile from 32 / PACK word rows.
  scales   (G, N) fp16 or bf16, G = K // group_size (1 for group_size -1); must match the activations' dtype.
  zeros    (G, N) int16, the integer zero point itself (not GPTQ's zero - 1). Always stored, also for symmetric
           quantization (2**(bits-1) there): one code path, at 2 bytes per group per column (3% of int4 g128).
           int16 because GPTQ v1 checkpoints can hold a zero of 2**bits (stored zero-1 = 2**bits - 1 wraps to it).
  perm     optional int32 (K,): GPTQ act-order. The checkpoint's g_idx gives each k a group, and groups are not
           contiguous in k. We sort K by group ONCE at conversion (packed row j is original row perm[j]), so every
           group is again a contiguous run of group_size rows and a K-tile needs a single scale/zero row; the kernels
           then gather x's columns through perm (x[:, perm[j]]), a K-length int32 vector per tile. The alternative,
           gathering the group index per k, would load a (32, BLOCK_N) tile of scales and zeros per K-tile instead of
           one row, and rules out applying the scale after the integer dot product (see kernels/quant.py).

Two kernels (llmkern.kernels.quant); the dispatcher picks by M = rows of x (the product of its leading dims):
  M = 1     quant_gemv_kernel: each packed word loaded once, unpacked slot by slot in registers, fp32 FMAs.
  M 2..16   quant_decode_kernel: a 32-row K-tile of codes through a 16-row tl.dot (rows padded to 16).
            Both decode kernels split K across programs (fp32 atomics into a workspace) so all SMs stream weights.
  M > 16    quant_gemm_kernel: tiled GEMM, a K-tile of codes dequantized on chip and fed to tl.dot.
"""
from __future__ import annotations

import functools
from typing import Iterable, Optional

import torch
import triton
from torch import nn

from llmkern import _utils, compile_check, reference
from llmkern.kernels.quant import quant_decode_kernel, quant_gemm_kernel, quant_gemv_kernel

SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUPS = (32, 64, 128, -1)
SCALE_DTYPES = (torch.float16, torch.bfloat16)

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
# The best tile depends on the weight shape; M changes every prefill call and is left out of the key so a new
# prompt length does not re-run the tuner (Triton adds the argument dtypes to the key itself).
_gemm = _utils.autotune(_GEMM_CONFIGS, key=["N", "K"])(quant_gemm_kernel)

# Cut-over. Up to 16 rows a tensor-core tile (minimum M = 16) is not even full, each weight feeds at most 16
# multiply-adds, and the time is the weight bytes over HBM bandwidth: what matters is that every SM streams weights,
# which the decode kernel's split-K gives. Beyond 16 rows the GEMM's BLOCK_M = 64/128 row tiles reuse each
# dequantized K-tile across many rows, and the work per weight byte grows until the op turns compute-bound.
DECODE_MAX_M = 16

# The decode grid aims at four programs per SM. Little's law: an H100 streams 3.35 TB/s with ~1 us of DRAM latency,
# ~25 KB in flight per SM (132 SMs); four GEMV programs with a 4 KB tile each in flight, plus the next tile's loads
# issued while the current one is multiplied, come close. (A guess from the datasheet: not yet timed on a GPU.)
_PROGRAMS_PER_SM = 4
# Under the interpreter there is no GPU to fill; a small pretend SM count makes the small test shapes split K.
_INTERPRET_SMS = 2


# ----------------------------------------------------------------------------------------------- the weight
class QuantizedWeight:
    """A quantized (out_features, in_features) weight in llmkern's packed layout (module docstring)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, *, bits: int,
                 group_size: int, in_features: int, out_features: int, perm: Optional[torch.Tensor] = None):
        _check_bits_group(bits, group_size, in_features)
        pack = 32 // bits
        groups = 1 if group_size == -1 else in_features // group_size
        _utils.check_tensor("qweight", qweight, ndim=2, dtypes=(torch.int32,))
        _utils.check_tensor("scales", scales, ndim=2, dtypes=SCALE_DTYPES)
        _utils.check_tensor("zeros", zeros, ndim=2, dtypes=(torch.int16,))
        _expect_shape("qweight", qweight, (in_features // pack, out_features))
        _expect_shape("scales", scales, (groups, out_features))
        _expect_shape("zeros", zeros, (groups, out_features))
        tensors = [qweight, scales, zeros]
        if perm is not None:
            _utils.check_tensor("perm", perm, ndim=1, dtypes=(torch.int32,))
            _expect_shape("perm", perm, (in_features,))
            tensors.append(perm)
        _utils.check_same(("qweight", "scales", "zeros", "perm")[:len(tensors)], tensors, dtype=False)
        self.qweight = qweight.contiguous()
        self.scales = scales.contiguous()
        self.zeros = zeros.contiguous()
        self.perm = None if perm is None else perm.contiguous()
        self.bits, self.group_size = bits, group_size
        self.in_features, self.out_features = in_features, out_features

    # -------------------------------------------------------------------- properties
    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype this weight multiplies: its scales' dtype."""
        return self.scales.dtype

    @property
    def g_idx(self) -> torch.Tensor:
        """(K,) group of every ORIGINAL column k (GPTQ's g_idx; k // group_size without act-order)."""
        k = self.in_features
        gs = k if self.group_size == -1 else self.group_size
        sorted_groups = torch.arange(k, device=self.device) // gs
        if self.perm is None:
            return sorted_groups.to(torch.int32)
        g = torch.empty_like(sorted_groups)
        g[self.perm.long()] = sorted_groups
        return g.to(torch.int32)

    def __repr__(self) -> str:
        return (f"QuantizedWeight(out_features={self.out_features}, in_features={self.in_features}, bits={self.bits}, "
                f"group_size={self.group_size}, dtype={self.dtype}, device={self.device}, "
                f"act_order={self.perm is not None})")

    # -------------------------------------------------------------------- conversions
    def codes(self) -> torch.Tensor:
        """(N, K) int32 codes in the ORIGINAL column order (unpacked from the words)."""
        q_sorted = _unpack_along(self.qweight, self.bits, dim=0).t()             # (N, K), packed (sorted) order
        if self.perm is None:
            return q_sorted.contiguous()
        q = torch.empty_like(q_sorted)
        q[:, self.perm.long()] = q_sorted
        return q

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The (out_features, in_features) weight, (q - z) * s computed exactly, returned in `dtype` (default: the
        scales' dtype)."""
        return reference.quant_dequantize(self.codes(), self.zeros, self.scales, self.group_size, g_idx=self.g_idx,
                                          dtype=dtype or self.dtype)

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "QuantizedWeight":
        """A copy on `device`; `dtype` (fp16/bf16) converts the scales, i.e. the activation dtype it serves.
        `.to(torch.bfloat16)` is read as a dtype, as torch.Tensor.to reads it (the integer tensors keep theirs)."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        if dtype is not None and dtype not in SCALE_DTYPES:
            raise TypeError(f"dtype must be float16 or bfloat16 (the scales' dtype), got {dtype}")
        mv = (lambda t: None if t is None else t.to(device))  # noqa: E731
        return QuantizedWeight(mv(self.qweight), mv(self.scales).to(dtype or self.dtype), mv(self.zeros),
                               bits=self.bits, group_size=self.group_size, in_features=self.in_features,
                               out_features=self.out_features, perm=mv(self.perm))

    @classmethod
    def from_codes(cls, q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, *, bits: int, group_size: int,
                   g_idx: Optional[torch.Tensor] = None) -> "QuantizedWeight":
        """From unpacked codes q (N, K), zeros (G, N) and scales (G, N), with an optional act-order g_idx (K,)."""
        n, k = q.shape
        _check_bits_group(bits, group_size, k)
        if int(q.min()) < 0 or int(q.max()) >= 2 ** bits:
            raise ValueError(f"codes must lie in [0, {2 ** bits}) for bits={bits}")
        perm = None
        if g_idx is not None:
            perm = _act_order_perm(g_idx, k, group_size, scales.shape[0])
            if perm is not None:
                q = q[:, perm.long()]
        qweight = _pack_along(q.t().contiguous(), bits, dim=0)
        return cls(qweight, scales, zeros.to(torch.int16), bits=bits, group_size=group_size, in_features=k,
                   out_features=n, perm=perm)

    @classmethod
    def from_gptq(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, *,
                  g_idx: Optional[torch.Tensor] = None, bits: int = 4, group_size: int = 128) -> "QuantizedWeight":
        """A GPTQ checkpoint's tensors as stored: qweight int32 (K*bits/32, N) packed along K; qzeros int32
        (G, N*bits/32) packed along N holding zero - 1 (GPTQ v1); scales (G, N); g_idx (K,) for act-order."""
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
        pack = 32 // bits
        _utils.check_tensor("qweight", qweight, ndim=2, dtypes=(torch.int32,))
        _utils.check_tensor("qzeros", qzeros, ndim=2, dtypes=(torch.int32,))
        _utils.check_tensor("scales", scales, ndim=2, dtypes=SCALE_DTYPES)
        k, n = qweight.shape[0] * pack, qweight.shape[1]
        _check_bits_group(bits, group_size, k)
        groups = 1 if group_size == -1 else k // group_size
        if n % pack:
            raise ValueError(f"qweight: out_features {n} must be a multiple of {pack} (qzeros packs {pack} per int32)")
        _expect_shape("qzeros", qzeros, (groups, n // pack))
        _expect_shape("scales", scales, (groups, n))
        _utils.check_same(("qweight", "qzeros", "scales"), (qweight, qzeros, scales), dtype=False)
        if g_idx is not None:
            _utils.check_tensor("g_idx", g_idx, ndim=1, dtypes=(torch.int32, torch.int64))
            _utils.check_same(("qweight", "g_idx"), (qweight, g_idx), dtype=False)
        q = _unpack_along(qweight, bits, dim=0).t()                          # (N, K)
        zeros = _unpack_along(qzeros, bits, dim=1) + 1                       # v1: the checkpoint stores zero - 1
        return cls.from_codes(q, zeros, scales, bits=bits, group_size=group_size, g_idx=g_idx)

    @classmethod
    def from_awq(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, *,
                 group_size: int = 128) -> "QuantizedWeight":
        """An AWQ checkpoint's GEMM-layout tensors: qweight int32 (K, N/8) and qzeros int32 (G, N/8), both packed
        along N with word slot i holding column 8c + [0, 2, 4, 6, 1, 3, 5, 7][i]; scales (G, N). 4 bits only."""
        _utils.check_tensor("qweight", qweight, ndim=2, dtypes=(torch.int32,))
        _utils.check_tensor("qzeros", qzeros, ndim=2, dtypes=(torch.int32,))
        _utils.check_tensor("scales", scales, ndim=2, dtypes=SCALE_DTYPES)
        k, n = qweight.shape[0], qweight.shape[1] * 8
        _check_bits_group(4, group_size, k)
        groups = 1 if group_size == -1 else k // group_size
        _expect_shape("qzeros", qzeros, (groups, n // 8))
        _expect_shape("scales", scales, (groups, n))
        _utils.check_same(("qweight", "qzeros", "scales"), (qweight, qzeros, scales), dtype=False)
        q = _awq_deinterleave(_unpack_along(qweight, 4, dim=1)).t()         # (N, K)
        zeros = _awq_deinterleave(_unpack_along(qzeros, 4, dim=1))          # (G, N)
        return cls.from_codes(q, zeros, scales, bits=4, group_size=group_size)


def quantize_weight(weight: torch.Tensor, *, bits: int = 4, group_size: int = 128,
                    symmetric: bool = False) -> QuantizedWeight:
    """Round-to-nearest quantization of an nn.Linear weight (out_features, in_features).

    Scales are stored in the weight's dtype when it is fp16/bf16 (fp16 for fp32 weights): the activation dtype the
    result multiplies. Every dequantized element is within half a quantization step (its scale / 2) of the original.
    """
    _utils.check_tensor("weight", weight, ndim=2, dtypes=_utils.FLOAT_DTYPES)
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {symmetric!r}")
    _check_bits_group(bits, group_size, weight.shape[1])
    if not torch.isfinite(weight).all():
        raise ValueError("weight must be finite (it has inf or nan)")
    scale_dtype = weight.dtype if weight.dtype in SCALE_DTYPES else torch.float16
    q, zeros, scales = reference.quantize_rtn(weight.detach(), bits=bits, group_size=group_size, symmetric=symmetric,
                                              scale_dtype=scale_dtype)
    return QuantizedWeight.from_codes(q, zeros, scales, bits=bits, group_size=group_size)


# ----------------------------------------------------------------------------------------------- packing helpers
def _check_bits_group(bits, group_size, in_features: Optional[int]) -> None:
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if isinstance(group_size, bool) or group_size not in SUPPORTED_GROUPS:
        raise ValueError(f"group_size must be one of {SUPPORTED_GROUPS}, got {group_size!r}")
    if in_features is None:
        return
    pack = 32 // bits
    if in_features <= 0 or in_features % pack:
        raise ValueError(f"in_features must be a positive multiple of {pack} for bits={bits}, got {in_features}")
    if group_size != -1 and in_features % group_size:
        raise ValueError(f"in_features ({in_features}) must be divisible by group_size ({group_size})")


def _expect_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _unpack_along(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> int32 codes, PACK = 32 // bits per word, the low bits first, expanded along `dim`."""
    pack = 32 // bits
    shifts = torch.arange(0, 32, bits, device=words.device, dtype=torch.int32)
    w = words.unsqueeze(dim + 1)                                          # (.., 1, ..) next to the packed dim
    view = [1] * w.dim()
    view[dim + 1] = pack
    codes = (w >> shifts.view(view)) & (2 ** bits - 1)                    # arithmetic shift, then the low bits
    shape = list(words.shape)
    shape[dim] *= pack
    return codes.reshape(shape)


def _pack_along(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of _unpack_along: codes in [0, 2**bits) -> int32 words."""
    pack = 32 // bits
    shape = list(codes.shape)
    shape[dim] //= pack
    shape.insert(dim + 1, pack)
    c = codes.to(torch.int64).reshape(shape)
    view = [1] * c.dim()
    view[dim + 1] = pack
    shifts = torch.arange(0, 32, bits, device=codes.device, dtype=torch.int64).view(view)
    words = (c << shifts).sum(dim=dim + 1)                                # disjoint bit fields: sum == or
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)  # the same 32 bits, signed


# AWQ's GEMM kernels pack the 8 columns of a word in the order [0, 2, 4, 6, 1, 3, 5, 7] (slot i holds column
# order[i]), which suits their dequantization instruction sequence; slot i of column block c is column 8c + order[i].
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _awq_deinterleave(slots: torch.Tensor) -> torch.Tensor:
    """(.., 8C) values in AWQ slot order -> natural column order."""
    blocks = slots.reshape(*slots.shape[:-1], -1, 8)
    out = torch.empty_like(blocks)
    out[..., list(_AWQ_ORDER)] = blocks                                   # slot i -> column order[i]
    return out.reshape(slots.shape)


def _act_order_perm(g_idx: torch.Tensor, k: int, group_size: int, groups: int) -> Optional[torch.Tensor]:
    """The sort of K by group (None when K is already in group order). Each group must hold group_size columns."""
    _expect_shape("g_idx", g_idx, (k,))
    g = g_idx.long()
    if int(g.min()) < 0 or int(g.max()) >= groups:
        raise ValueError(f"g_idx values must lie in [0, {groups}), got [{int(g.min())}, {int(g.max())}]")
    gs = k if group_size == -1 else group_size
    if not bool((torch.bincount(g, minlength=groups) == gs).all()):
        raise ValueError(f"g_idx must assign exactly group_size={gs} columns to every group")
    perm = torch.sort(g, stable=True).indices
    if bool((perm == torch.arange(k, device=g.device)).all()):
        return None
    return perm.to(torch.int32)


# ----------------------------------------------------------------------------------------------- launch
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return _INTERPRET_SMS


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:   # a device property query per decode call would cost more than the kernel
    return torch.cuda.get_device_properties(index).multi_processor_count


def _decode_split(n_blocks: int, k_tiles: int, device: torch.device) -> int:
    """K-ranges per column block: enough programs for _PROGRAMS_PER_SM per SM, at least one K-tile each."""
    want = _utils.cdiv(_PROGRAMS_PER_SM * _num_sms(device), n_blocks)
    return max(1, min(k_tiles, want))


def _launch(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
            perm: Optional[torch.Tensor], bias: Optional[torch.Tensor], bits: int, group_size: int, *,
            path: Optional[str] = None, split_k: Optional[int] = None) -> torch.Tensor:
    """x2 (M, K) -> (M, N) with the Triton kernels. `path` ("decode"/"gemm") and `split_k` override the dispatcher
    (the tests use them to run both paths on the same shapes)."""
    m, k = x2.shape
    n = scales.shape[1]
    out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if m == 0:
        return out
    gs = k if group_size == -1 else group_size
    pack_shift = {4: 3, 8: 2}[bits]                                       # log2(32 // bits)
    perm_arg = perm if perm is not None else qweight                      # never read without HAS_PERM
    bias_arg = bias if bias is not None else out                          # never read without HAS_BIAS
    if path is None:
        path = "decode" if m <= DECODE_MAX_M else "gemm"
    if path == "gemm":
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _utils.launch(_gemm, grid, x2, qweight, scales, zeros, perm_arg, bias_arg, out,
                      m, n, k, x2.stride(0), x2.stride(1), out.stride(0), gs, bits, pack_shift,
                      HAS_PERM=perm is not None, HAS_BIAS=bias is not None, INTERPRET=_utils.INTERPRET)
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
            INTERPRET=_utils.INTERPRET, **flags)
    if atomic:
        out.copy_(ws)
    return out


# ----------------------------------------------------------------------------------------------- the op
@torch.library.custom_op("llmkern::quant_matmul", mutates_args=())
def _quant_matmul_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     perm: Optional[torch.Tensor], bias: Optional[torch.Tensor], bits: int,
                     group_size: int) -> torch.Tensor:
    # The op may be called directly (torch.ops.llmkern.quant_matmul): the same checks as the public function, so
    # inconsistent tensors raise here and never reach a kernel as out-of-bounds reads.
    qw = QuantizedWeight(qweight, scales, zeros, bits=bits, group_size=group_size,
                         in_features=x.shape[-1] if x.dim() else 0,
                         out_features=scales.shape[1] if scales.dim() == 2 else 0, perm=perm)
    bias = _check_x_bias(x, qw, bias)
    k = qw.in_features
    x2 = _utils.last_dim_contiguous("x", x.reshape(-1, k))
    if _utils.use_triton(x):
        out = _launch(x2, qw.qweight, qw.scales, qw.zeros, qw.perm, bias, bits, group_size)
    else:
        out = reference.quant_matmul(x2, qw.dequantize(torch.float32), bias)
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


# ----------------------------------------------------------------------------------------------- nn.Module
class QuantLinear(nn.Module):
    """A drop-in nn.Linear with a quantized weight: same in_features/out_features/bias contract, forward = quant_matmul.

    The packed weight, scales, zeros and act-order permutation are buffers (so .to(device), state_dict and
    .half()/.bfloat16() act on them: a dtype change converts the scales and bias, the activation dtype it serves).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 4,
                 group_size: int = 128, dtype: torch.dtype = torch.float16, device=None, act_order: bool = False):
        super().__init__()
        _check_bits_group(bits, group_size, in_features)
        if dtype not in SCALE_DTYPES:
            raise TypeError(f"dtype must be float16 or bfloat16, got {dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        groups = 1 if group_size == -1 else in_features // group_size
        self.register_buffer("qweight", torch.zeros(in_features // (32 // bits), out_features, dtype=torch.int32,
                                                    device=device))
        self.register_buffer("scales", torch.ones(groups, out_features, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.zeros(groups, out_features, dtype=torch.int16, device=device))
        self.register_buffer("perm", torch.arange(in_features, dtype=torch.int32, device=device)
                             if act_order else None)
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # A loaded act-order permutation must be one (the kernels gather x's columns through it).
        if self.perm is not None:
            seen = torch.zeros(self.in_features, dtype=torch.bool, device=self.perm.device)
            p = self.perm.long()
            if int(p.min()) < 0 or int(p.max()) >= self.in_features or not bool(seen.index_fill_(0, p, True).all()):
                raise ValueError(f"{prefix}perm must be a permutation of range({self.in_features})")

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> "QuantLinear":
        mod = cls(qw.in_features, qw.out_features, bias is not None, bits=qw.bits, group_size=qw.group_size,
                  dtype=qw.dtype, device=qw.device, act_order=qw.perm is not None)
        mod.qweight.copy_(qw.qweight)
        mod.scales.copy_(qw.scales)
        mod.zeros.copy_(qw.zeros)
        if qw.perm is not None:
            mod.perm.copy_(qw.perm)
        if bias is not None:
            mod.bias.data.copy_(bias.detach().to(qw.dtype))
        return mod

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 128,
                    symmetric: bool = False) -> "QuantLinear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        qw = quantize_weight(linear.weight.detach(), bits=bits, group_size=group_size, symmetric=symmetric)
        return cls.from_quantized(qw, linear.bias)

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.qweight, self.scales, self.zeros, bits=self.bits, group_size=self.group_size,
                               in_features=self.in_features, out_features=self.out_features, perm=self.perm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_matmul(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, group_size={self.group_size}")


def quantize_model(model: nn.Module, bits: int = 4, group_size: int = 128,
                   exclude: Iterable[str] = ("lm_head",), *, symmetric: bool = False) -> nn.Module:
    """Replace every nn.Linear of `model` (in place) by a QuantLinear, except those whose qualified name, or its
    last component, is in `exclude`. Returns the model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(exclude, str):
        raise TypeError("exclude must be a collection of names (e.g. ('lm_head',)), not a single string")
    exclude = set(exclude)
    _check_bits_group(bits, group_size, None)   # each layer's in_features is checked below
    targets = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name not in exclude and name.rsplit(".", 1)[-1] not in exclude:
            if (group_size != -1 and mod.in_features % group_size) or mod.in_features % (32 // bits):
                raise ValueError(f"layer {name!r}: in_features={mod.in_features} does not fit bits={bits}, "
                                 f"group_size={group_size}; add it to exclude")
            targets.append(name)
    if isinstance(model, nn.Linear) and "" in targets:
        raise ValueError("model is itself an nn.Linear: use QuantLinear.from_linear(model)")
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear.from_linear(getattr(parent, child), bits=bits, group_size=group_size,
                                                       symmetric=symmetric))
    return model


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
        constexprs=dict(HAS_PERM=perm, HAS_BIAS=perm, ATOMIC=atomic, INTERPRET=False, **cfg.kwargs), expect_mma=True)


def _gemm_spec(cfg, dtype: torch.dtype, *, perm: bool = False):
    return compile_check.CompileSpec(
        kernel=quant_gemm_kernel, name="quant_gemm", config=_cfg_name(cfg, dtype, act_order=perm),
        signature=_sig(dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        constexprs=dict(HAS_PERM=perm, HAS_BIAS=perm, INTERPRET=False, **cfg.kwargs), expect_mma=True)


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
