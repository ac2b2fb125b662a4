"""FlashAttention's tolerance rule, shared by the kernel tests.

Our error against a float64 reference must be at most `factor` times the error that the same PyTorch computation
makes in the input dtype, plus a small floor (so that exact-ish fp32 cases do not demand bit-exactness).
"""
from __future__ import annotations

import torch

# Floors per dtype: a few units in the last place of a unit-scale output.
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    both_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    d = (a - b).abs().masked_fill(both_inf, 0.0)
    return float(d.max()) if d.numel() else 0.0


def assert_fa_close(out: torch.Tensor, ref64: torch.Tensor, torch_lowp: torch.Tensor, *, factor: float = 2.0,
                    floor: float | None = None, what: str = "output") -> None:
    """out: ours; ref64: float64 ground truth; torch_lowp: PyTorch's own result computed in the input dtype."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    if floor is None:
        floor = FLOOR.get(out.dtype, 1e-5)
    ours = max_err(out, ref64)
    baseline = max_err(torch_lowp, ref64)
    assert ours <= factor * baseline + floor, (
        f"{what}: max error {ours:.3e} vs float64 exceeds {factor} x PyTorch's own {out.dtype} error "
        f"{baseline:.3e} + {floor:.1e}")
