"""Triton device helpers shared by several op families: rounding an fp32 result to the output dtype (16-bit, or fp8
for the fp8 KV cache).

Device code only, like every module of llmkern.kernels.
"""
import triton
import triton.language as tl


@triton.constexpr_function
def fp8_format(dtype):
    """(mantissa bits, smallest normal exponent, largest exponent, largest finite value) of an fp8 dtype, or None for
    any other dtype. The OCP 8-bit formats (torch.float8_e4m3fn, torch.float8_e5m2): both top out at 1.75 * 2^emax,
    e4m3fn because its all-ones pattern is NaN (448), e5m2 because its top exponent is inf/NaN (57344)."""
    if dtype == tl.float8e4nv:
        return (3, -6, 8, 448.0)
    if dtype == tl.float8e5:
        return (2, -14, 15, 57344.0)
    return None


@triton.jit
def _round_to_grid(x, MANT: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr):
    """x (fp32) rounded to nearest even on the grid of a float format with MANT mantissa bits and exponents
    EMIN..EMAX (subnormals below 2^EMIN), still as fp32. At x's exponent e the grid step is 2^q, q = max(e, EMIN) -
    MANT; adding c = 1.5 * 2^(q + 23) puts x's bits below 2^q out of the fp32 sum, which the hardware rounds to
    nearest even, and subtracting c again is exact. A zero result keeps x's sign (as a cast would)."""
    e = ((x.to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.int32) - 127
    q = tl.minimum(tl.maximum(e, EMIN), EMAX) - MANT
    c = (((q + 150) << 23) | (1 << 22)).to(tl.float32, bitcast=True)
    r = (x + c) - c
    return tl.where(r == 0.0, x * 0.0, r)


@triton.jit
def round_to(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """x (fp32) rounded to DTYPE, to nearest even, as the compiled kernels do (`cvt.rn.bf16.f32` / `cvt.rn.f16.f32`).

    Triton's interpreter truncates fp32 -> bf16 casts instead of rounding, so there bf16 rounding is done on the
    bits: add half an ulp of bf16 (0x7FFF, plus the lowest kept bit for ties to even), clear the 16 dropped bits,
    and the cast that follows is exact. (NaN and inf pass unchanged: a NaN keeps a mantissa bit, inf has none.)
    fp8 (e4m3fn, e5m2): x must lie within the format's range (callers saturate); it is rounded on the fp8 grid first
    (_round_to_grid) on every backend, so the cast only converts an exact value: the interpreter's fp32 -> fp8 cast
    rounds wrongly (124.7 becomes 64, not 128; NaN becomes 384), and GPUs before sm_89 have no fp8 conversion
    instruction. NaN stays NaN (0x7F, a NaN in both formats).
    """
    if INTERPRET and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    FP8: tl.constexpr = fp8_format(DTYPE)
    if FP8 is not None:
        x = _round_to_grid(x, FP8[0], FP8[1], FP8[2])
        if INTERPRET:
            return tl.where(x != x, tl.full(x.shape, 0x7F, tl.uint8).to(DTYPE, bitcast=True), x.to(DTYPE))
    return x.to(DTYPE)
