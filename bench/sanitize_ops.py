"""Call every public llmkern op once at shapes that hit the edges, for compute-sanitizer's memcheck.

    compute-sanitizer --tool memcheck python -m llmkern.bench.sanitize_ops        (bench/device_run.sh does this)

Memcheck reports any device access outside an allocation. PyTorch's caching allocator carves many tensors out of
one large cudaMalloc, so a read past a tensor's end may land inside the same allocation and go unseen: run with
PYTORCH_NO_CUDA_MEMORY_CACHING=1 (the script does) so each tensor is its own allocation. The edges: lengths that
are not a multiple of any tile (77, 300, 1001), one-token sequences, GQA 8:1, head_dim 80 (padded to a power of
two inside the kernels), scattered and non-monotone block tables, a slot mapping with skipped (-1) slots, forced
split-KV, the three quant matmul paths (M = 1, 5, 33). Autotuned kernels run every config of their list once
(the autotuner times each), so each config is checked too.

Without CUDA the same calls run on CPU in fp16 with fewer heads (the CPU path; the Triton interpreter when
TRITON_INTERPRET=1): the dry run's check that this driver still matches the API. Prints one line per op and exits 0 when every call returned a finite result.
"""
from __future__ import annotations

import sys
import time

import torch

import llmkern

GEN = torch.Generator().manual_seed(0)


def _randn(*shape, dtype, device):
    return torch.randn(*shape, generator=GEN).to(dtype=dtype, device=device)


def _scattered_tables(seq_lens: list[int], block_size: int, num_blocks: int, device) -> torch.Tensor:
    """int32 tables whose block ids are a random permutation of the cache (non-monotone, far apart); the padding
    past a sequence's last block is -1 garbage the kernels must not read."""
    width = max(-(-n // block_size) for n in seq_lens)
    ids = torch.randperm(num_blocks, generator=GEN)[: len(seq_lens) * width].view(len(seq_lens), width)
    for b, n in enumerate(seq_lens):
        ids[b, -(-n // block_size):] = -1
    return ids.to(torch.int32).to(device)


def calls(device: torch.device, dtype: torch.dtype):
    """(name, thunk) for every public op at its edge shapes (fewer heads on CPU, where the interpreter is slow)."""
    h, hk, b = (16, 2, 2) if device.type == "cuda" else (8, 1, 1)   # GQA 8:1
    q = _randn(b, 77, h, 128, dtype=dtype, device=device)
    k = _randn(b, 77, hk, 128, dtype=dtype, device=device)
    v = _randn(b, 77, hk, 128, dtype=dtype, device=device)
    yield "attention causal GQA 8:1 s=77 lse", lambda: llmkern.attention(q, k, v, causal=True, return_lse=True)[0]
    q1 = _randn(1, 1, h, 80, dtype=dtype, device=device)
    k1 = _randn(1, 77, hk, 80, dtype=dtype, device=device)
    yield ("attention one query, d=80, window+softcap",
           lambda: llmkern.attention(q1, k1, k1, causal=True, window=(31, 0), softcap=30.0))
    cu = torch.tensor([0, 1, 78, 100], dtype=torch.int32, device=device)       # lengths 1, 77, 22
    qv = _randn(100, h, 128, dtype=dtype, device=device)
    kv = _randn(100, hk, 128, dtype=dtype, device=device)
    yield "attention_varlen lengths 1/77/22", lambda: llmkern.attention_varlen(qv, kv, kv, cu, cu, 77, 77, causal=True)

    block_size, num_blocks = 16, 64
    kc = _randn(num_blocks, block_size, hk, 128, dtype=dtype, device=device)
    vc = _randn(num_blocks, block_size, hk, 128, dtype=dtype, device=device)
    slots = torch.tensor([5, -1, 1023, 17, -1], dtype=torch.int64, device=device)   # last slot of the cache, skips
    kn, vn = _randn(5, hk, 128, dtype=dtype, device=device), _randn(5, hk, 128, dtype=dtype, device=device)

    def write():
        llmkern.paged_kv_write(kn, vn, kc, vc, slots)
        return kc
    yield "paged_kv_write with skipped slots", write
    lens = [1, 17, 300]
    tables = _scattered_tables(lens, block_size, num_blocks, device)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    qd = _randn(3, h, 128, dtype=dtype, device=device)
    yield "paged_decode lengths 1/17/300", lambda: llmkern.paged_decode_attention(qd, kc, vc, tables, seq_lens)
    yield ("paged_decode split-KV x4, softcap",
           lambda: llmkern.paged_decode_attention(qd, kc, vc, tables, seq_lens, num_splits=4, softcap=30.0))
    cu_q = torch.tensor([0, 1, 8, 20], dtype=torch.int32, device=device)       # 1, 7 and 12 new tokens
    qp = _randn(20, h, 128, dtype=dtype, device=device)
    prefill_lens = torch.tensor([1, 17, 300], dtype=torch.int32, device=device)
    yield ("paged_prefill q lens 1/7/12 over prefixes 0/10/288",
           lambda: llmkern.paged_prefill_attention(qp, kc, vc, tables, cu_q, prefill_lens))

    logits = _randn(3, 1001, dtype=dtype, device=device) * 3
    params = dict(temperature=torch.tensor([0.7, 0.0, 1.0], device=device),
                  top_k=torch.tensor([50, 0, 1001], device=device), top_p=torch.tensor([0.9, 1.0, 0.5], device=device))
    yield "sample vocab 1001, greedy row", lambda: llmkern.sample(logits, seed=torch.arange(3, device=device),
                                                                  min_p=0.05, **params).float()
    yield "sampling_probs vocab 1001", lambda: llmkern.sampling_probs(logits, **params)

    w = _randn(200, 256, dtype=dtype, device=device) * 0.05           # N = 200: not a multiple of any tile
    for bits, group in ((4, 128), (8, -1)):
        qw = llmkern.quantize_weight(w, bits=bits, group_size=group)
        for m in (1, 5, 33):                                          # GEMV, 16-row decode kernel, tiled GEMM
            x = _randn(m, 256, dtype=dtype, device=device)
            yield f"quant_matmul int{bits} g{group} M={m}", (lambda x=x, qw=qw: llmkern.quant_matmul(x, qw))

    xs = _randn(3, 1000, dtype=dtype, device=device)
    res = _randn(3, 1000, dtype=dtype, device=device)
    wn = _randn(1000, dtype=dtype, device=device)
    yield "rms_norm hidden 1000", lambda: llmkern.rms_norm(xs, wn, 1e-5)
    yield "add_rms_norm hidden 1000", lambda: llmkern.add_rms_norm(xs, res, wn, 1e-5)[0]
    qr, kr = _randn(2, 5, h, 128, dtype=dtype, device=device), _randn(2, 5, hk, 128, dtype=dtype, device=device)
    pos = torch.tensor([[0, 1, 2, 3, 4], [4000, 4001, 4002, 4003, 4004]], device=device)
    yield "apply_rope positions", lambda: llmkern.apply_rope(qr, kr, pos, theta=500000.0)[0]


def main() -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16   # quant_matmul takes fp16/bf16 only
    print(f"sanitize_ops on {device} ({dtype}), torch {torch.__version__}", flush=True)
    bad = 0
    for name, thunk in calls(device, dtype):
        t0 = time.perf_counter()
        out = thunk()
        if device.type == "cuda":
            torch.cuda.synchronize()          # a fault is reported against the op that caused it
        finite = bool(torch.isfinite(out.float()).all())
        bad += not finite
        print(f"  {name:<52} {'ok' if finite else 'NON-FINITE OUTPUT'} ({time.perf_counter() - t0:.1f} s)",
              flush=True)
    print(f"{bad} of the calls returned non-finite values" if bad else "every call returned finite values")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
