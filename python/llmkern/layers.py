"""RMSNorm (with an optional fused residual add), rotary position embedding and a dense linear layer: the
host side.

    rms_norm(x, weight, eps=1e-6, *, offset=0.0, casting="llama")                      -> y
    add_rms_norm(x, residual, weight, eps=1e-6, *, offset=0.0, casting="llama")         -> (y, new_residual)
    apply_rope(q, k, positions=None, *, cos=None, sin=None, theta=10000.0, inplace=False) -> (q_rot, k_rot)
    linear(x, weight, bias=None)                                                        -> F.linear's output

RMSNorm follows Hugging Face exactly (float32 statistics): casting="llama" rounds x * rstd to the input dtype and
then multiplies by the weight (LlamaRMSNorm, Mistral, Qwen2); casting="gemma" multiplies in float32 and rounds once
(Gemma2RMSNorm), where Gemma also uses offset=1.0 (its weight is stored as w - 1).

RoPE uses the rotate-half convention of Hugging Face Llama/Mistral/Qwen2/Gemma (GPT-NeoX style: the two halves of a
head are the pair rotated together). The angles come either from `positions` and `theta`, or from the caller's
cos/sin tables exactly as Hugging Face's rotary embedding module returns them.

Dispatch (llmkern._dispatch): CUDA -> Triton; CPU -> the same Triton kernel under TRITON_INTERPRET, else the C++
CPU backend when built, else llmkern.reference.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from llmkern import _dispatch, _utils, compile_check, reference
from llmkern.compile_check import CompileSpec
from llmkern.kernels import layers as kernels

_CASTINGS = ("llama", "gemma")

# ----------------------------------------------------------------------------------------------------- RMSNorm
# One program per row; the row is one tile of BLOCK columns when it fits (hidden sizes of real models: 2048-8192),
# otherwise BLOCK-wide chunks in two passes. 8192 is the widest tile kept in registers: at 16 warps it is 16 fp32
# values per thread per live tensor, well under the 255-register limit (check-compile confirms no spills).
_RMS_BLOCKS = (256, 512, 1024, 2048, 4096, 8192)
_RMS_MAX_BLOCK = _RMS_BLOCKS[-1]


def _rms_block(n: int) -> int:
    return next(b for b in _RMS_BLOCKS if b >= min(n, _RMS_MAX_BLOCK))


def _rms_warps(block: int) -> int:
    # About 8 columns per thread up to 2048 columns, then more warps so each thread keeps <= 16 values (the
    # sizing Triton's layer-norm tutorial and Liger-Kernel use: 4 warps small rows, 8 mid, 16 for the widest).
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def _check_rms_args(x, weight, eps, offset, casting, residual=None):
    _utils.check_tensor("x", x, dtypes=_utils.FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have at least 1 dimension and a non-empty last (hidden) dim, got {tuple(x.shape)}")
    _utils.check_tensor("weight", weight, ndim=1, dtypes=_utils.FLOAT_DTYPES)
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must have shape ({x.shape[-1]},) to match x's hidden dim, got {tuple(weight.shape)}")
    _utils.check_same(("x", "weight"), (x, weight), dtype=False)
    if residual is not None:
        _utils.check_tensor("residual", residual, dtypes=_utils.FLOAT_DTYPES)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        _utils.check_same(("x", "residual"), (x, residual))
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        raise TypeError(f"eps must be a float, got {eps!r}")
    if not (eps == 0 or _utils.F32_TINY <= eps <= _utils.F32_MAX):
        raise ValueError(f"eps must be 0 or a normal float32 in [2**-126, 3.4e38] (GPUs may flush a subnormal one "
                         f"to 0), got {eps!r}")
    if not isinstance(offset, (int, float)) or isinstance(offset, bool):
        raise TypeError(f"offset must be a float (0.0 for Llama, 1.0 for Gemma), got {offset!r}")
    if not abs(offset) <= _utils.F32_MAX:
        raise ValueError(f"offset must be finite in float32, |offset| <= 3.4e38 (0.0 for Llama, 1.0 for Gemma), "
                         f"got {offset!r}")
    if casting not in _CASTINGS:
        raise ValueError(f"casting must be one of {_CASTINGS}, got {casting!r}")


# The ops' checks (a direct torch.ops.llmkern call gets the public function's), once per argument signature; the
# public functions call the same cached checks, so the op's own check is then a cache hit.
_check_rms_norm = _dispatch.signature_checked(_check_rms_args)


@_dispatch.signature_checked
def _check_add_rms_norm(x, residual, weight, eps, offset, casting):
    _check_rms_args(x, weight, eps, offset, casting, residual=residual)


def _rows(name: str, t: torch.Tensor) -> torch.Tensor:
    """(rows, hidden) view with a contiguous hidden dim (reshape copies only when no such view exists)."""
    t = _utils.last_dim_contiguous(name, t)
    return t.reshape(-1, t.shape[-1])


def _launch_rmsnorm(x2, r2, weight, y2, ro2, eps, offset, casting):
    rows, n = x2.shape
    if rows == 0:
        return
    block = _rms_block(n)
    has_res = r2 is not None
    kernels._rmsnorm_kernel[(rows,)](
        x2, r2 if has_res else x2, weight, y2, ro2 if has_res else y2,
        x2.stride(0), r2.stride(0) if has_res else 0, y2.stride(0), ro2.stride(0) if has_res else 0,
        n, float(eps), float(offset),
        HAS_RESIDUAL=has_res, CAST_BEFORE_WEIGHT=(casting == "llama"), BLOCK=block, INTERPRET=_utils.INTERPRET,
        num_warps=_rms_warps(block),
    )


def _rms_norm_reference(x, weight, eps, offset, casting):
    return reference.rms_norm(x, weight, eps, offset=offset, casting=casting).contiguous()  # as register_fake


@_dispatch.custom_op("rms_norm", mutates_args=(), reference=_rms_norm_reference, check=_check_rms_norm,
                     contiguous=("weight",))
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, casting: str) -> torch.Tensor:
    x2 = _rows("x", x)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch_rmsnorm(x2, None, weight, y.view(-1, x.shape[-1]), None, eps, offset, casting)
    return y


@_rms_norm_op.register_fake
def _(x, weight, eps, offset, casting):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _add_rms_norm_reference(x, residual, weight, eps, offset, casting):
    y, r = reference.add_rms_norm(x, residual, weight, eps, offset=offset, casting=casting)
    return y.contiguous(), r.contiguous()


@_dispatch.custom_op("add_rms_norm", mutates_args=(), reference=_add_rms_norm_reference, check=_check_add_rms_norm,
                     contiguous=("weight",))
def _add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, offset: float,
                     casting: str) -> tuple[torch.Tensor, torch.Tensor]:
    x2, r2 = _rows("x", x), _rows("residual", residual)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    r_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n = x.shape[-1]
    _launch_rmsnorm(x2, r2, weight, y.view(-1, n), r_out.view(-1, n), eps, offset, casting)
    return y, r_out


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps, offset, casting):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, offset: float = 0.0,
             casting: str = "llama") -> torch.Tensor:
    """RMSNorm over the last dim of x (any leading shape): y = x / sqrt(mean(x^2) + eps) * (offset + weight).

    Statistics in float32; output in x's dtype. casting="llama" (LlamaRMSNorm, Mistral, Qwen2) rounds the normalized
    x to x's dtype before the weight multiply; casting="gemma" (Gemma2RMSNorm, with offset=1.0) rounds once at the end.
    weight: (hidden,), any float dtype and strides. eps: 0 or a normal float32, [2**-126, 3.4e38] (subnormals are
    refused: GPUs may flush them to 0); eps = 0 is the plain RMS (an all-zero row then gives 0/0 = NaN, as Hugging
    Face's modules do). offset: finite in float32 (|offset| <= 3.4e38). Both are used as float32. TypeError /
    ValueError name the bad argument.
    """
    _check_rms_norm(x, weight, eps, offset, casting)
    return _rms_norm_op(x, weight, float(eps), float(offset), casting)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
                 offset: float = 0.0, casting: str = "llama") -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + RMSNorm: r = x + residual (rounded to x's dtype); returns (rms_norm(r), r).

    This is a pre-norm transformer's `hidden = residual + block_out; residual = hidden; hidden = norm(hidden)` in one
    pass over memory. Both outputs are new tensors (the inputs are not modified).
    """
    _check_add_rms_norm(x, residual, weight, eps, offset, casting)
    return _add_rms_norm_op(x, residual, weight, float(eps), float(offset), casting)


# -------------------------------------------------------------------------------------------------------- RoPE
# A program rotates all heads of one token, BLOCK_H heads at a time on a (BLOCK_H, HALF_P2) tile of 2048 elements:
# 2 halves x 2048 fp32 / 128 threads = 32 live values per thread, far from spilling. The tile width follows head_dim
# (head_dim 32..256 -> HALF_P2 16..128), so the config set is one per HALF_P2.
_ROPE_TILE = 2048
_ROPE_HALVES = (16, 32, 64, 128)
_ROPE_WARPS = 4


def _rope_config(head_dim: int) -> tuple[int, int]:
    half_p2 = _utils.pow2_at_least(head_dim // 2, 16)
    return half_p2, _ROPE_TILE // half_p2


def _check_pair(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """ValueError unless a and b share their leading (batch, seq) or (tokens,) dims."""
    if a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"{name_b} must have leading dims {tuple(a.shape[:-2])} like {name_a}, "
                         f"got {tuple(b.shape[:-2])}")


def _table_view(name: str, t: torch.Tensor, batch: int, seqlen: int, head_dim: int) -> torch.Tensor:
    """A cos/sin table as a (batch or 1, seqlen, >= head_dim/2) tensor with a contiguous last dim."""
    _utils.check_tensor(name, t, dtypes=_utils.FLOAT_DTYPES)
    if t.shape[-1] not in (head_dim, head_dim // 2):
        raise ValueError(f"{name}'s last dim must be head_dim ({head_dim}, Hugging Face's cat(freqs, freqs)) or "
                         f"head_dim/2 ({head_dim // 2}), got {t.shape[-1]}")
    view = t.unsqueeze(0) if t.dim() == 2 else t
    if view.dim() != 3 or view.shape[1] != seqlen or view.shape[0] not in (1, batch):
        raise ValueError(f"{name} must have shape (seq, d), (1, seq, d) or (batch, seq, d) with batch={batch}, "
                         f"seq={seqlen}, got {tuple(t.shape)}")     # the caller's shape, not the view's
    return _utils.last_dim_contiguous(name, view)


def _positions_view(positions: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    _utils.check_tensor("positions", positions, dtypes=(torch.int32, torch.int64))
    view = positions.unsqueeze(0) if positions.dim() == 1 else positions
    if view.dim() != 2 or view.shape[1] != seqlen or view.shape[0] not in (1, batch):
        raise ValueError(f"positions must have shape (seq,), (1, seq) or (batch, seq) with batch={batch}, "
                         f"seq={seqlen}, got {tuple(positions.shape)}")     # the caller's shape, not the view's
    return view


@_dispatch.signature_checked
def _check_rope(q, k, positions, cos, sin, theta) -> None:
    """apply_rope's argument checks (its docstring), also the ops' (a direct torch.ops.llmkern call): shapes, dtypes
    and devices of q, k and the angles' source, and theta; once per argument signature, no sync."""
    _utils.check_tensor("q", q, dtypes=_utils.FLOAT_DTYPES)
    _utils.check_tensor("k", k, dtypes=_utils.FLOAT_DTYPES)
    if q.dim() not in (3, 4):
        raise ValueError(f"q must be (batch, seq, heads, head_dim) or (tokens, heads, head_dim), got {tuple(q.shape)}")
    if k.dim() != q.dim():
        raise ValueError(f"k must have q's rank {q.dim()}, got shape {tuple(k.shape)}")
    _check_pair("q", q, "k", k)
    _utils.check_same(("q", "k"), (q, k))
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim:
        raise ValueError(f"k's head_dim must equal q's ({head_dim}), got {k.shape[-1]}")
    if head_dim % 2 or not (2 <= head_dim <= 2 * _ROPE_HALVES[-1]):
        raise ValueError(f"q: head_dim must be even and in [2, {2 * _ROPE_HALVES[-1]}], got {head_dim}")
    batch, seqlen = (1, q.shape[0]) if q.dim() == 3 else (q.shape[0], q.shape[1])
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must be given together")
    if cos is not None:
        if positions is not None:
            raise ValueError("give either positions or cos/sin tables, not both")
        _table_view("cos", cos, batch, seqlen, head_dim)
        _table_view("sin", sin, batch, seqlen, head_dim)
        _utils.check_same(("q", "cos", "sin"), (q, cos, sin), dtype=False)
    else:
        if positions is None:
            raise ValueError("apply_rope needs positions (with theta) or cos/sin tables")
        _positions_view(positions, batch, seqlen)
        _utils.check_same(("q", "positions"), (q, positions), dtype=False)
        if not isinstance(theta, (int, float)) or isinstance(theta, bool):
            raise TypeError(f"theta must be a float, got {theta!r}")
        if not (theta > 1 and math.isfinite(theta)):
            raise ValueError(f"theta must be a finite float > 1, got {theta!r}")


def _as4d(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(0) if t.dim() == 3 else t


def _launch_rope(q, k, q_out, k_out, positions, cos, sin, theta):
    """q/k/q_out/k_out are 4-D (batch, seq, heads, head_dim) views; tables/positions already checked."""
    batch, seqlen, num_heads, head_dim = q.shape
    if batch * seqlen == 0:
        return
    half_p2, block_h = _rope_config(head_dim)
    use_table = cos is not None
    if use_table:
        cos = _table_view("cos", cos, batch, seqlen, head_dim)
        sin = _table_view("sin", sin, batch, seqlen, head_dim)
        # A table with batch 1 serves every sequence: stride 0 over the batch.
        c_strides = (cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1))
        s_strides = (sin.stride(0) if sin.shape[0] > 1 else 0, sin.stride(1))
        pos, p_strides = q, (0, 0)  # not read when USE_TABLE
    else:
        pos = _positions_view(positions, batch, seqlen)
        p_strides = (pos.stride(0) if pos.shape[0] > 1 else 0, pos.stride(1))
        cos = sin = q  # not read without USE_TABLE
        c_strides = s_strides = (0, 0)
    kernels._rope_kernel[(batch * seqlen,)](
        q, k, q_out, k_out, pos, cos, sin,
        seqlen,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        p_strides[0], p_strides[1], c_strides[0], c_strides[1], s_strides[0], s_strides[1],
        num_heads, k.shape[2], float(math.log2(theta)),
        HALF=head_dim // 2, HALF_P2=half_p2, USE_TABLE=use_table, BLOCK_H=block_h, INTERPRET=_utils.INTERPRET,
        num_warps=_ROPE_WARPS,
    )


def _rope_reference(q, k, positions, cos, sin, theta):
    q_rot, k_rot = reference.apply_rope(q, k, positions, cos=cos, sin=sin, theta=theta)
    return q_rot.contiguous(), k_rot.contiguous()


def _rope_inplace_reference(q, k, positions, cos, sin, theta):
    q_rot, k_rot = reference.apply_rope(q, k, positions, cos=cos, sin=sin, theta=theta)
    q.copy_(q_rot)
    k.copy_(k_rot)


@_dispatch.custom_op("rope", mutates_args=(), reference=_rope_reference, check=_check_rope)
def _rope_op(q: torch.Tensor, k: torch.Tensor, positions: Optional[torch.Tensor], cos: Optional[torch.Tensor],
             sin: Optional[torch.Tensor], theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    q_in, k_in = _utils.last_dim_contiguous("q", q), _utils.last_dim_contiguous("k", k)
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype,
                                                                                   device=k.device)
    _launch_rope(_as4d(q_in), _as4d(k_in), _as4d(q_out), _as4d(k_out), positions, cos, sin, theta)
    return q_out, k_out


@_rope_op.register_fake
def _(q, k, positions, cos, sin, theta):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format))


def _check_inplace(q, k, positions, cos, sin, theta) -> None:
    """What rotating q and k in place needs (no sync; the op's check, so a direct call of llmkern::rope_ gets it too):
    apply_rope's checks, a contiguous head_dim (the kernel's only unit-stride dim), no element at two indices, q and
    k apart (these read data pointers: not cached)."""
    _check_rope(q, k, positions, cos, sin, theta)
    for name, t in (("q", q), ("k", k)):
        if t.stride(-1) != 1:
            raise ValueError(f"inplace=True needs {name} with a contiguous last dim, got strides {t.stride()}")
        _utils.check_writable(name, t)
    if _overlap(q, k):
        raise ValueError("inplace=True needs q and k not to overlap in memory")


@_dispatch.custom_op("rope_", mutates_args=("q", "k"), reference=_rope_inplace_reference, check=_check_inplace)
def _rope_inplace_op(q: torch.Tensor, k: torch.Tensor, positions: Optional[torch.Tensor],
                     cos: Optional[torch.Tensor], sin: Optional[torch.Tensor], theta: float) -> None:
    _launch_rope(_as4d(q), _as4d(k), _as4d(q), _as4d(k), positions, cos, sin, theta)


@_rope_inplace_op.register_fake
def _(q, k, positions, cos, sin, theta):
    return None


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor | None = None, *,
               cos: torch.Tensor | None = None, sin: torch.Tensor | None = None, theta: float = 10000.0,
               inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of q and k in one launch (rotate-half convention, as Hugging Face Llama).

    q: (batch, seq, num_heads, head_dim) or (tokens, num_heads, head_dim); k: the same leading dims, num_kv_heads.
    Angles, one of:
      positions: int32/int64 (batch, seq), (seq,) or (tokens,): angle_i = position * theta^(-2i/head_dim);
      cos, sin: tables of shape (batch or 1, seq, head_dim) or (seq, head_dim), as Hugging Face's rotary embedding
        returns them (its cat(freqs, freqs) layout: only the first head_dim/2 columns are read), or with a last dim
        of head_dim/2. For (tokens, ...) inputs, seq = tokens.
    Any strides with a contiguous head_dim. inplace=False returns new tensors; inplace=True rotates q and k in place
    (they must then have a contiguous last dim, and must not overlap each other or themselves) and returns them.
    theta: 1 < theta < inf (ValueError otherwise; used through log2(theta), so any finite value works).
    """
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {inplace!r}")
    _check_rope(q, k, positions, cos, sin, theta)
    if inplace:
        _rope_inplace_op(q, k, positions, cos, sin, float(theta))
        return q, k
    return _rope_op(q, k, positions, cos, sin, float(theta))


def _overlap(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether q and k may share elements (conservative). Disjoint byte spans never do; neither do q and k sliced
    from one fused qkv buffer (same strides, k's heads after q's within each token's row), the common in-place case.
    """
    def span(t):
        start = t.data_ptr()
        return start, start + (sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1) * t.element_size()
    (q0, q1), (k0, k1) = span(q), span(k)
    if not (q0 < k1 and k0 < q1):
        return False
    if q.stride() == k.stride() and q.dtype == k.dtype and q.dim() >= 3:
        delta = (k.data_ptr() - q.data_ptr()) // q.element_size()
        heads_end_q = q.shape[-2] * q.stride(-2)        # elements q uses in one token's row
        heads_end_k = delta + k.shape[-2] * k.stride(-2)
        if not (q.stride(-2) >= q.shape[-1] and delta >= heads_end_q):
            return True
        # Disjoint when any two token rows start at least heads_end_k elements apart: the leading dims (size > 1),
        # by stride, each step past everything the smaller ones reach, plus heads_end_k.
        reach = 0
        for stride, size in sorted((st, sz) for sz, st in zip(q.shape[:-2], q.stride()[:-2]) if sz > 1):
            if stride < reach + heads_end_k:
                return True
            reach += stride * (size - 1)
        return False
    return True


# ------------------------------------------------------------------------------------------------------ Linear
# A dense linear layer as an llmkern:: op, for the one place torch's own path leaves a CPU idle: at decode shapes
# (a few rows of x) torch's CPU F.linear runs MKL's GEMV on one thread, so a decode step reads its weights at one
# core's bandwidth (csrc/linear.cpp says what was measured). CUDA and larger M keep F.linear (cuBLAS, BLAS GEMM).


@_dispatch.signature_checked
def _check_linear(x, weight, bias) -> None:
    """linear()'s argument checks (no sync), also the op's."""
    _utils.check_tensor("x", x, dtypes=_utils.FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension (..., in_features), got {tuple(x.shape)}")
    _utils.check_tensor("weight", weight, ndim=2, dtypes=_utils.FLOAT_DTYPES)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be (out_features, {x.shape[-1]}) to match x's last dim, got "
                         f"{tuple(weight.shape)}")
    _utils.check_same(("x", "weight"), (x, weight))
    if bias is not None:
        _utils.check_tensor("bias", bias, ndim=1, dtypes=_utils.FLOAT_DTYPES)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must be ({weight.shape[0]},) (out_features), got {tuple(bias.shape)}")
        _utils.check_same(("x", "bias"), (x, bias))


def _linear_reference(x, weight, bias):
    # contiguous copies of strided operands (none for the usual ones): torch's BLAS sums in another order for
    # another layout, and an op's result must not depend on its arguments' strides
    return torch.nn.functional.linear(x.contiguous(), weight.contiguous(), bias)


@_dispatch.custom_op("linear", mutates_args=(), reference=_linear_reference, check=_check_linear,
                     contiguous=("bias",))
def _linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    # CUDA (and the interpreter's CPU slot): F.linear itself (as the reference runs it). cuBLAS is the GPU's GEMV
    # and GEMM; there is no Triton kernel to run here, the op exists for the CPU kernel.
    return _linear_reference(x, weight, bias)


@_linear_op.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """torch.nn.functional.linear: x (..., in_features) @ weight.T + bias, weight (out_features, in_features), bias
    (out_features,) or None, all in one float dtype (float32, bfloat16, float16) on one device; returns a new
    contiguous (..., out_features) tensor in that dtype. Any strides.

    On CPU with the C++ backend, x of at most llmkern.cpu.LINEAR_MAX_ROWS (16) rows (leading dims flattened: decode) runs
    csrc/linear.cpp's kernel, which splits the weight's rows over torch's threads (fp32 accumulation, one rounding);
    everything else is F.linear. TypeError/ValueError name the bad argument.
    """
    _check_linear(x, weight, bias)
    return _linear_op(x, weight, bias)


# ------------------------------------------------------------------------------------------------ compile specs
def _sig(dtype: str, names: list[str], ints: list[str], floats: list[str] = ()) -> dict[str, str]:
    sig = {n: f"*{dtype}:16" for n in names}
    sig.update({n: "i32" for n in ints})
    sig.update({n: "fp32" for n in floats})
    return sig


@compile_check.register
def _compile_specs():
    """Every (BLOCK, num_warps) the RMSNorm dispatcher can pick, with and without the residual, in bf16 (plus fp32 at
    the widest tile, the most registers); every RoPE tile config, from tables and from positions."""
    rms_ints = ["stride_x", "stride_r", "stride_y", "stride_ro", "N"]
    for has_res in (False, True):
        name = "layers_add_rmsnorm" if has_res else "layers_rmsnorm"
        for block in _RMS_BLOCKS:
            for dt in (("bf16", "fp32") if block == _RMS_MAX_BLOCK else ("bf16",)):
                yield CompileSpec(
                    kernels._rmsnorm_kernel, name, f"BLOCK={block} warps={_rms_warps(block)} {dt}",
                    _sig(dt, ["X", "R", "W", "Y", "R_OUT"], rms_ints, ["eps", "offset"]),
                    {"HAS_RESIDUAL": has_res, "CAST_BEFORE_WEIGHT": True, "BLOCK": block, "INTERPRET": False},
                    num_warps=_rms_warps(block))
    rope_ints = ["seqlen", "stride_qb", "stride_qs", "stride_qh", "stride_kb", "stride_ks", "stride_kh",
                 "stride_qob", "stride_qos", "stride_qoh", "stride_kob", "stride_kos", "stride_koh",
                 "stride_pb", "stride_ps", "stride_cb", "stride_cs", "stride_sb", "stride_ss",
                 "num_heads", "num_kv_heads"]
    for half_p2 in _ROPE_HALVES:
        block_h = _ROPE_TILE // half_p2
        for use_table in (True, False):
            sig = _sig("bf16", ["Q", "K", "Q_OUT", "K_OUT", "COS", "SIN"], rope_ints, ["log2_theta"])
            sig["POS"] = "*i64:16"
            yield CompileSpec(
                kernels._rope_kernel, "layers_rope",
                f"HALF={half_p2} BLOCK_H={block_h} {'table' if use_table else 'pos'}", sig,
                {"HALF": half_p2, "HALF_P2": half_p2, "USE_TABLE": use_table, "BLOCK_H": block_h, "INTERPRET": False},
                num_warps=_ROPE_WARPS)
