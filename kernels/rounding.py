"""Triton device helpers shared by several op families: rounding an fp32 result to the output dtype.

Device code only, like every module of llmkern.kernels.
"""
import triton
import triton.language as tl


@triton.jit
def round_to(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """x (fp32) rounded to DTYPE, to nearest even, as the compiled kernels do (`cvt.rn.bf16.f32` / `cvt.rn.f16.f32`).

    Triton's interpreter truncates fp32 -> bf16 casts instead of rounding, so there bf16 rounding is done on the
    bits: add half an ulp of bf16 (0x7FFF, plus the lowest kept bit for ties to even), clear the 16 dropped bits,
    and the cast that follows is exact. (NaN and inf pass unchanged: a NaN keeps a mantissa bit, inf has none.)
    """
    if INTERPRET and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)
