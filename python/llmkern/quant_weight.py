"""The quantized weight: llmkern's packed int4/int8 format, round-to-nearest quantization, GPTQ and AWQ conversion.

    quantize_weight(weight, *, bits=4, group_size=128, symmetric=False) -> QuantizedWeight
    QuantizedWeight.from_gptq(qweight, qzeros, scales, *, g_idx=None, bits=4, group_size=128)
    QuantizedWeight.from_awq(qweight, qzeros, scales, *, group_size=128)
    QuantizedWeight.from_codes(q, zeros, scales, *, bits, group_size, g_idx=None)

The matmul over this format is llmkern.quant (quant_matmul); the nn.Module is llmkern.quant_linear (QuantLinear).

The weight is w[n, k] = (q[n, k] - z[g, n]) * s[g, n], g the group of k: N = out_features, K = in_features.

llmkern's packed layout (what QuantizedWeight holds; checkpoints are repacked into it once, at conversion):
  qweight  int32 (K // PACK, N), PACK = 32 // bits (8 int4 or 4 int8 codes per word), packed ALONG K: code (k, n)
           sits in bits [(k % PACK) * bits, (k % PACK + 1) * bits) of word (k // PACK, n); codes are unsigned. The
           same bit layout as GPTQ's qweight. Packing along K means one word holds PACK consecutive K rows of ONE
           output column, so a thread that loads it has everything one column's dot product needs from it: the GEMV
           loads (BLOCK_W, BLOCK_N) words once, coalesced along N, and unpacks them in registers; the dot kernels
           expand a (32, BLOCK_N) K-tile from 32 / PACK word rows.
  scales   (G, N) fp16, bf16 or fp32, G = K // group_size (1 for group_size -1); must match the activations' dtype.
           Finite (every conversion checks it: check_finite_scales); 0, subnormal and negative scales are used as is.
  zeros    (G, N) int16, the integer zero point itself (not GPTQ's zero - 1). Always stored, also for symmetric
           quantization (2**(bits-1) there): one code path, at 2 bytes per group per column (3% of int4 g128).
           int16 because GPTQ v1 checkpoints can hold a zero of 2**bits (stored zero-1 = 2**bits - 1 wraps to it).
  perm     optional int32 (K,): GPTQ act-order. The checkpoint's g_idx gives each k a group, and groups are not
           contiguous in k. We sort K by group ONCE at conversion (packed row j is original row perm[j]), so every
           group is again a contiguous run of group_size rows and a K-tile needs a single scale/zero row; the kernels
           then gather x's columns through perm (x[:, perm[j]]), a K-length int32 vector per tile. The alternative,
           gathering the group index per k, would load a (32, BLOCK_N) tile of scales and zeros per K-tile instead of
           one row, and rules out applying the scale after the integer dot product (see kernels/quant.py).

"""
from __future__ import annotations

from typing import Optional

import torch

from llmkern import _utils, reference

SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUPS = (32, 64, 128, -1)
# The scales' dtype is the activation dtype the weight serves (quant_matmul needs x in it).
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class PackedTensors:
    """What a packed weight (QuantizedWeight) and stacked packed experts (llmkern.QuantizedExperts) share: the codes
    in `qweight`, the scales in the activation dtype."""

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype it multiplies: its scales' dtype."""
        return self.scales.dtype


class QuantizedWeight(PackedTensors):
    """A quantized (out_features, in_features) weight in llmkern's packed layout (module docstring)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, *, bits: int,
                 group_size: int, in_features: int, out_features: int, perm: Optional[torch.Tensor] = None):
        self._set(qweight, scales, zeros, bits, group_size, in_features, out_features, perm)
        if perm is not None:
            check_permutation("perm", perm)

    @classmethod
    def _unchecked_values(cls, qweight, scales, zeros, *, bits, group_size, in_features, out_features,
                          perm=None) -> "QuantizedWeight":
        """The constructor's checks of shapes, dtypes and devices only, no device sync: for the op's per-signature
        check (llmkern.quant), whose tensors a checked QuantizedWeight normally gave it."""
        self = cls.__new__(cls)
        self._set(qweight, scales, zeros, bits, group_size, in_features, out_features, perm)
        return self

    def _set(self, qweight, scales, zeros, bits, group_size, in_features, out_features, perm) -> None:
        check_bits_group(bits, group_size, in_features)
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
        """A copy on `device`; `dtype` (fp16/bf16/fp32) converts the scales, i.e. the activation dtype it serves.
        `.to(torch.bfloat16)` is read as a dtype, as torch.Tensor.to reads it (the integer tensors keep theirs)."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        if dtype is not None and dtype not in SCALE_DTYPES:
            raise TypeError(f"dtype must be float16, bfloat16 or float32 (the scales' dtype), got {dtype}")
        mv = (lambda t: None if t is None else t.to(device))  # noqa: E731
        return QuantizedWeight(mv(self.qweight), mv(self.scales).to(dtype or self.dtype), mv(self.zeros),
                               bits=self.bits, group_size=self.group_size, in_features=self.in_features,
                               out_features=self.out_features, perm=mv(self.perm))

    @classmethod
    def from_codes(cls, q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, *, bits: int, group_size: int,
                   g_idx: Optional[torch.Tensor] = None) -> "QuantizedWeight":
        """From unpacked codes q (N, K), zeros (G, N) and scales (G, N), with an optional act-order g_idx (K,)."""
        n, k = q.shape
        check_bits_group(bits, group_size, k)
        check_out_features(n)
        if int(q.min()) < 0 or int(q.max()) >= 2 ** bits:
            raise ValueError(f"codes must lie in [0, {2 ** bits}) for bits={bits}")
        check_finite_scales("scales", scales)
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
        check_bits_group(bits, group_size, k)
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
        check_bits_group(4, group_size, k)
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

    Scales are stored in the weight's dtype (fp16, bf16 or fp32): the activation dtype the result multiplies, so a
    float32 model (the usual dtype on a CPU) runs in float32. Every element's exact dequantized value (q - z) * s
    (`dequantize(torch.float64)`) is within half a quantization step (its scale / 2) of the original;
    `dequantize()` in a 16-bit scales dtype adds that dtype's rounding of the product (int8 bf16: up to about 0.9
    step: bf16 keeps 8 significant bits, int8 codes need up to 8).
    """
    _utils.check_tensor("weight", weight, ndim=2, dtypes=_utils.FLOAT_DTYPES)
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {symmetric!r}")
    check_bits_group(bits, group_size, weight.shape[1])
    check_out_features(weight.shape[0])
    if not torch.isfinite(weight).all():
        raise ValueError("weight must be finite (it has inf or nan)")
    q, zeros, scales = reference.quantize_rtn(weight.detach(), bits=bits, group_size=group_size, symmetric=symmetric,
                                              scale_dtype=weight.dtype)
    return QuantizedWeight.from_codes(q, zeros, scales, bits=bits, group_size=group_size)


# ----------------------------------------------------------------------------------------------- packing helpers
def check_bits_group(bits, group_size, in_features: Optional[int]) -> None:
    """ValueError unless bits and group_size are supported and in_features (None: not checked) packs into them."""
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


def check_out_features(out_features: int) -> None:
    """ValueError for a weight with no output rows (nn.Linear(k, 0)): there is nothing to quantize."""
    if out_features < 1:
        raise ValueError(f"out_features must be >= 1 (a weight with no rows has nothing to quantize), got "
                         f"{out_features}")


def check_finite_scales(name: str, scales: torch.Tensor) -> None:
    """ValueError unless every scale is finite (one device sync). Every conversion to the packed format (from_codes,
    so quantize_weight, from_gptq and from_awq too) and QuantLinear's state-dict loading check it; the QuantizedWeight
    constructor does not (no sync per call). Zero, subnormal, negative and huge finite scales are used as they are,
    w = (q - z) * s; where the terms of an output (sum_k |x_k w_nk|) pass the float range, its partial sums may
    overflow to inf or NaN, as any float computation of the product can. (An inf scale would give inf or NaN
    depending on the order of the multiplications.)"""
    if not bool(torch.isfinite(scales).all()):
        raise ValueError(f"{name} must be finite (a quantization scale is inf or NaN)")


def check_permutation(name: str, perm: torch.Tensor) -> None:
    """ValueError unless `perm`, (K,) or (E, K), is a permutation of range(K) (each row of it; one device sync). The
    act-order kernels gather x's columns through it (x[:, perm[j]]), so an index outside [0, K) would read outside x.
    The QuantizedWeight and QuantizedExperts constructors (given a perm) and QuantLinear's state-dict loading check it;
    torch.ops.llmkern.quant_matmul / fused_moe called directly check perm's shape, dtype and device only (no sync per
    call)."""
    k = perm.shape[-1]
    p = perm.long().reshape(-1, k)
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= k
                      or not bool(torch.zeros(p.shape, dtype=torch.bool, device=p.device).scatter_(1, p, True).all())):
        raise ValueError(f"{name} must be a permutation of range({k})" + (" in every row" if perm.dim() > 1 else ""))


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

