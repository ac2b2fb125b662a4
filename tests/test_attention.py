"""Fused prefill attention against the float64 reference (FlashAttention's tolerance rule).

On a machine without a GPU every call runs the Triton kernel under the interpreter, whose first config per head_dim
class has BLOCK_M=64, BLOCK_N=32: the shapes below are chosen around those tiles (lengths not a multiple of them,
several tiles, interior tiles that take the unmasked path) while staying small enough for the interpreter.
"""
import pytest
import torch

import llmkern
from llmkern import reference
from tolerance import assert_fa_close


def _qkv(batch, seqlen_q, seqlen_k, num_heads, num_kv_heads, head_dim, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seqlen_q, num_heads, head_dim, generator=g).to(dtype).to(device)
    k = torch.randn(batch, seqlen_k, num_kv_heads, head_dim, generator=g).to(dtype).to(device)
    v = torch.randn(batch, seqlen_k, num_kv_heads, head_dim, generator=g).to(dtype).to(device)
    return q, k, v


def _check(q, k, v, **kw):
    """Ours vs float64, with PyTorch-in-the-input-dtype as the error baseline; lse checked too."""
    o, lse = llmkern.attention(q, k, v, return_lse=True, **kw)
    ref_o, ref_lse = reference.attention(q.double(), k.double(), v.double(), return_lse=True, **kw)
    base_o, base_lse = reference.attention(q, k, v, return_lse=True, compute_dtype=q.dtype, **kw)
    assert o.dtype == q.dtype and o.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert_fa_close(o.cpu(), ref_o.cpu(), base_o.cpu())
    assert_fa_close(lse.cpu(), ref_lse.cpu(), base_lse.cpu().float(), floor=1e-4, what="lse")
    return o, lse


@pytest.mark.parametrize("causal", [False, True])
def test_basic(device, causal):
    q, k, v = _qkv(2, 70, 70, 2, 2, 64, torch.float16, device)
    _check(q, k, v, causal=causal)
