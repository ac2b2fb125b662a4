"""Measured roofs: the memory bandwidth and matmul rate this machine actually reaches, next to the datasheet's.

Datasheet peaks (llmkern.perf.DEVICES) are what a vendor promises; the roofs an op can approach are what a plain,
well-tuned library reaches on the same machine. On an H200 of our GPU lender a device-to-device copy moved about
4.3 TB/s counting bytes read and written (datasheet: 4.8) and an 8192^3 bf16 matmul ran at about 790 TFLOP/s on
random data (datasheet: 989.5 dense). `measure_roofs` measures both, the way METHOD notes for such machines advise:

  * copy, on CUDA: one large `dst.copy_(src)` of random float32 data, far larger than any cache; bytes = read +
    written (2 x the buffer), time = median of the timed copies after warm-up;
  * memory, on CPU: McCalpin's STREAM read / copy / triad over all of torch's threads, in C++ (csrc/roofline.cpp,
    llmkern.cpu.measure_stream; best of the repetitions, as STREAM reports). The read rate is the memory roof of
    the CPU records (decode attention, weight-only matmuls and sampling read far more than they write; it is a
    strict roof for ops that write as much as they read). Without the C++ backend: the copy above, on CPU;
  * matmul: `torch.mm` of two random n x n matrices (never zeros: they run faster than real data), FLOPs = 2 n^3;
    on CUDA in bf16 (the tensor-core roof, cuBLAS) and in fp32 with TF32 off (the CUDA-core roof); on CPU in fp32.

`annotate` then adds to benchmark records (bench.common's format) the floor and the "% of measured roof" computed
with the same formula as the datasheet's (llmkern.perf.roofline), so the two percentages sit side by side.
`llmkern roofline --measure`, `llmkern bench` on CPU (bench.common.device_roof: a CPU has no datasheet entry) and
the GPU-day run (bench/device_run.sh) share this module.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import torch

from llmkern import cpu, perf

# Sizes for a full measurement. CUDA: a 2 GiB buffer (8.6 GB read+written per copy pair, far past the H200's 60 MB
# L2) and 8192^3 matmuls (1.1 TFLOP, ~1.4 ms in bf16 on an H200: long enough that launch overhead is noise).
# CPU: STREAM arrays of 4x the last-level cache (llmkern.cpu.measure_stream; without the C++ backend a 256 MiB copy,
# past the L3 of any one CPU) and 2048^3 fp32 (17 GFLOP, a fraction of a second on 2 cores).
CUDA_COPY_BYTES, CUDA_MATMUL_N = 2 << 30, 8192
CPU_COPY_BYTES, CPU_MATMUL_N = 256 << 20, 2048


@dataclass(frozen=True)
class MeasuredRoof:
    """What one machine reached: copy bandwidth (read + write) and dense matmul rates, with how they were taken."""
    device: str
    copy_gbps: float              # bytes read + bytes written per second / 1e9
    matmul_tflops: float          # the dense matmul rate in `matmul_dtype` (the "tensor" roof of the records)
    matmul_dtype: str             # "bfloat16" on CUDA, "float32" on CPU
    fp32_tflops: float            # fp32 matmul rate (CUDA: TF32 off; CPU: the same as matmul_tflops)
    copy_bytes: int               # size of the copied buffer (CPU STREAM: of each array)
    matmul_n: int
    method: str
    read_gbps: float | None = None   # CPU STREAM read (bytes read per second / 1e9); None where not measured
    triad_gbps: float | None = None  # CPU STREAM triad (2 arrays read, 1 written)

    @property
    def memory_gbps(self) -> float:
        """The memory roof: the read rate where it was measured (CPU STREAM), else the copy rate."""
        return self.read_gbps if self.read_gbps is not None else self.copy_gbps

    def as_peak(self) -> perf.DevicePeak:
        """The measured roofs as a DevicePeak, for perf.roofline, `llmkern roofline --measure` and the plot."""
        return perf.DevicePeak(f"{self.device} (measured)", self.memory_gbps, self.matmul_tflops, self.fp32_tflops,
                               self.method)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MeasuredRoof":
        """The inverse of to_dict; fields added later (read_gbps, triad_gbps) may be absent from an older file."""
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def describe(self) -> str:
        """One line with every measured figure, for reports."""
        mem = (f"STREAM read {self.read_gbps:.1f} GB/s, copy {self.copy_gbps:.1f}, triad {self.triad_gbps:.1f}"
               if self.read_gbps is not None and self.triad_gbps is not None
               else f"copy {self.copy_gbps:.4g} GB/s (read + write)")
        return (f"{self.device}: {mem}; {self.matmul_dtype} matmul {self.matmul_tflops:.4g} TFLOP/s"
                + (f", fp32 {self.fp32_tflops:.4g}" if self.matmul_dtype != "float32" else ""))


def _median_ms(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int = 3) -> float:
    """Median milliseconds of one call: CUDA events around each call (the work is asynchronous), else wall clock."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _matmul_tflops(n: int, dtype: torch.dtype, device: torch.device, reps: int) -> float:
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    c = torch.empty(n, n, device=device, dtype=dtype)
    ms = _median_ms(lambda: torch.mm(a, b, out=c), device, reps)
    return 2.0 * n ** 3 / (ms * 1e-3) / 1e12


def measure_roofs(device: torch.device | str | None = None, *, copy_bytes: int | None = None,
                  matmul_n: int | None = None, reps: int = 10) -> MeasuredRoof:
    """Measure the copy bandwidth and matmul rates of `device` (default: CUDA if present, else CPU).

    copy_bytes / matmul_n default to CUDA_COPY_BYTES / CUDA_MATMUL_N on CUDA and CPU_COPY_BYTES / CPU_MATMUL_N on
    CPU (copy_bytes: each STREAM array there); smaller values give a quick but less faithful figure (the dry run
    uses tiny ones). Takes about a second on an H200 and several seconds on a 2-core CPU. Raises ValueError for
    non-positive sizes.
    """
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    stream_bytes = copy_bytes                                  # None: STREAM sizes its arrays from the cache
    copy_bytes = int((CUDA_COPY_BYTES if cuda else CPU_COPY_BYTES) if copy_bytes is None else copy_bytes)
    matmul_n = int((CUDA_MATMUL_N if cuda else CPU_MATMUL_N) if matmul_n is None else matmul_n)
    if copy_bytes < 4 or matmul_n < 1 or reps < 1:
        raise ValueError(f"copy_bytes, matmul_n and reps must be positive, got {copy_bytes}, {matmul_n}, {reps}")

    stream = None if cuda else _cpu_stream(stream_bytes, reps)
    if stream is not None:
        copy_gbps, copy_bytes = stream["copy_gbps"], stream["array_bytes"]
    else:
        src = torch.rand(copy_bytes // 4, device=dev, generator=torch.Generator(device=dev).manual_seed(0))
        dst = torch.empty_like(src)
        copy_ms = _median_ms(lambda: dst.copy_(src), dev, reps)
        copy_gbps = 2.0 * src.numel() * 4 / (copy_ms * 1e-3) / 1e9
        del src, dst

    if cuda:
        name = torch.cuda.get_device_name(dev)
        tensor = _matmul_tflops(matmul_n, torch.bfloat16, dev, reps)
        precision = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")          # plain fp32 FMA, no TF32 tensor cores
        try:
            fp32 = _matmul_tflops(matmul_n, torch.float32, dev, max(3, reps // 2))
        finally:
            torch.set_float32_matmul_precision(precision)
        mm_dtype, lib = "bfloat16", "cuBLAS"
    else:
        import platform
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        tensor = fp32 = _matmul_tflops(matmul_n, torch.float32, dev, reps)
        mm_dtype, lib = "float32", "torch CPU BLAS"
    memory = (f"STREAM in C++, best of {reps}, {stream['threads']} threads, 3 x {stream['array_bytes'] / 2**20:.0f} "
              f"MiB fp32 arrays: read {stream['read_gbps']:.1f} GB/s, copy {stream['copy_gbps']:.1f}, triad "
              f"{stream['triad_gbps']:.1f}" if stream is not None else
              f"median of {reps} {copy_bytes / 2**20:.0f} MiB copies (read + write): {copy_gbps:.4g} GB/s")
    method = (f"measured: {memory}; {matmul_n}^3 {mm_dtype} matmul ({lib}) {tensor:.4g} TFLOP/s; "
              f"torch {torch.__version__}")
    if cuda:
        torch.cuda.empty_cache()
    return MeasuredRoof(name, copy_gbps, tensor, mm_dtype, fp32, copy_bytes, matmul_n, method,
                        stream["read_gbps"] if stream else None, stream["triad_gbps"] if stream else None)


def _cpu_stream(array_bytes: int | None, reps: int) -> dict[str, float] | None:
    """llmkern.cpu.measure_stream with arrays of array_bytes (None: its default, 4x the last-level cache), or None
    when the C++ backend cannot be built or is switched off (LLMKERN_CPU_BACKEND=reference): the caller then times
    a torch copy."""
    if cpu.backend_choice() == "reference" or not cpu.load():
        return None
    return cpu.measure_stream(array_bytes, reps)


def annotate(records: Iterable[dict], roof: MeasuredRoof | None) -> None:
    """Add `measured_roof_ms` and `pct_measured_roof` to each record, in place.

    The floor is perf.roofline(flops, bytes).time_s with the measured roofs (the tensor roof for records with
    tensor_cores=True, the fp32 one otherwise), exactly as `pct_roofline` uses the datasheet. With no roof both
    fields are None.
    """
    peak = roof.as_peak() if roof is not None else None
    for r in records:
        r["measured_roof_ms"] = r["pct_measured_roof"] = None
        flops, nbytes, ms = float(r.get("flops") or 0.0), float(r.get("bytes") or 0.0), float(r["median_ms"])
        if peak is None or ms <= 0 or not (flops or nbytes):
            continue
        floor_s = perf.roofline(flops, nbytes, peak, tensor_cores=r.get("tensor_cores", True)).time_s
        r["measured_roof_ms"] = floor_s * 1e3
        r["pct_measured_roof"] = 100.0 * floor_s / (ms * 1e-3)
