"""What every benchmark suite shares: the case description, timing, records, and the JSON file.

A suite is a module in this package with a function

    cases(device: torch.device, quick: bool) -> Iterable[Case]

yielding one `Case` per (op, shape, implementation). A case builds its inputs lazily (`make`), so listing the cases
allocates nothing, and a case whose peer library is missing is simply not yielded. `run_suite` times each case and
turns it into a record; `llmkern bench` and the pytest-benchmark entry (`bench/test_benchmarks.py`) both use it.

Timing: on CUDA, `triton.testing.do_bench` (warm-up, L2 flush between runs, median of the measured runs). On CPU,
the median of wall-clock runs after one warm-up (at least 5, more for calls under 20 ms: `time_ms`): the CPU path is the C++ backend (llmkern.cpu) when it builds, else
the PyTorch reference, against PyTorch's own CPU paths in the same run.

Roofs: a GPU's come from its datasheet (llmkern.perf.DEVICES); a CPU has no such entry, so its records use the roof
measured on the machine itself at the start of the run (`measured_cpu_peak`), and say so in their "roof" field.
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from llmkern import cpu, measure, perf


@dataclass
class Case:
    op: str                                  # e.g. "attention_prefill"
    impl: str                                # e.g. "llmkern", "torch_sdpa", "flash_attn"
    shape: dict[str, Any]                    # the parameters that define the problem
    flops: float                             # from llmkern.perf
    nbytes: float                            # from llmkern.perf
    make: Callable[[], Callable[[], Any]]    # builds the inputs, returns the function to time
    tensor_cores: bool = True                # which compute peak bounds this op
    note: str = ""
    # More measurements of the timed function (e.g. host time per call), taken after the timing and merged into
    # the record: metrics(fn, device) -> {name: value}
    metrics: Callable[[Callable[[], Any], torch.device], dict[str, Any]] | None = None

    @property
    def label(self) -> str:
        shape = ",".join(f"{k}={v}" for k, v in self.shape.items())
        return f"{self.op}[{shape}]/{self.impl}"


def bench_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def time_ms(fn: Callable[[], Any], device: torch.device, *, cpu_reps: int = 5, cpu_budget_ms: float = 100.0,
            cpu_max_reps: int = 200) -> float:
    """Median milliseconds per call.

    On CPU: one warm-up call, then at least `cpu_reps` timed calls, more while they sum to less than `cpu_budget_ms`
    (at most `cpu_max_reps`). Short calls need the extra runs: the first calls that allocate a large output take the
    allocator's fresh-mmap path (a page fault per 4 KiB, about 1 ms for an 8 MB tensor) until glibc's adaptive mmap
    threshold rises, and on a shared machine a single descheduled call moves a median of 5."""
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()  # warm-up
    times: list[float] = []
    while len(times) < cpu_reps or (sum(times) < cpu_budget_ms and len(times) < cpu_max_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@functools.lru_cache(maxsize=None)
def measured_cpu_peak() -> perf.DevicePeak:
    """This CPU's roof, measured once per process by llmkern.measure (the same figures `llmkern roofline --measure`
    prints): STREAM read bandwidth over all threads (C++; a torch copy without the C++ backend) as the memory roof,
    and the fp32 torch.mm rate as the compute roof."""
    return measure.measure_roofs("cpu").as_peak()


def device_roof(device: torch.device) -> perf.DevicePeak | None:
    """The roof records on `device` are held to: the datasheet's for a known GPU, the measured one on CPU."""
    return perf.device_peak(device) or (measured_cpu_peak() if device.type == "cpu" else None)


def to_record(case: Case, ms: float, device: torch.device) -> dict[str, Any]:
    peak = device_roof(device)
    seconds = ms * 1e-3
    rec = {
        "op": case.op, "impl": case.impl, "shape": case.shape, "device": device_name(device),
        "median_ms": ms, "flops": case.flops, "bytes": case.nbytes,
        "tflops": case.flops / seconds / 1e12 if case.flops else 0.0,
        "gbps": case.nbytes / seconds / 1e9,
        "tensor_cores": case.tensor_cores, "roofline_ms": None, "pct_roofline": None, "bound": None,
    }
    if peak is not None:
        roof = perf.roofline(case.flops, case.nbytes, peak, tensor_cores=case.tensor_cores)
        rec["roofline_ms"] = roof.time_s * 1e3
        rec["pct_roofline"] = 100.0 * roof.time_s / seconds
        rec["bound"] = roof.bound
        rec["roof"] = peak.source
    if case.note:
        rec["note"] = case.note
    return rec


def run_case(case: Case, device: torch.device) -> dict[str, Any]:
    fn = case.make()
    try:
        ms = time_ms(fn, device)
        extra = case.metrics(fn, device) if case.metrics is not None else {}
    finally:
        del fn
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {**to_record(case, ms, device), **extra}


def run_suite(cases: Iterable[Case], device: torch.device, *, log: Callable[[str], None] = print) -> list[dict]:
    records = []
    for case in cases:
        try:
            rec = run_case(case, device)
        except (torch.cuda.OutOfMemoryError, MemoryError):  # a shape too big for this device
            log(f"  {case.label}: skipped, out of memory on this device")
            continue
        records.append(rec)
        log("  " + format_record(rec))
    return records


def format_record(r: dict[str, Any]) -> str:
    shape = " ".join(f"{k}={v}" for k, v in r["shape"].items())
    pct = "" if r["pct_roofline"] is None else f" {r['pct_roofline']:5.1f}% of {r['bound']} roofline"
    return (f"{r['op']:<22} {r['impl']:<18} {shape:<60} {r['median_ms']:9.4f} ms "
            f"{r['tflops']:8.2f} TFLOP/s {r['gbps']:8.1f} GB/s{pct}")


def summary_table(records: Iterable[dict], device: str | perf.DevicePeak | None = None) -> str:
    """A roofline summary of records (op, impl, device, median_ms, flops, bytes, tensor_cores): achieved TFLOP/s and
    GB/s, the roof that binds, the lowest time the device allows and the percentage of it reached.

    The peak comes from `device` (a perf.DEVICES key/alias or a DevicePeak), else from each record's device name;
    with no known peak (a CPU record, unless its measured roof is passed) the roofline columns show '-'. `llmkern
    bench` ends with this table, on a CPU with the measured roof (device_roof).
    """
    fixed = perf.resolve_device(device) if isinstance(device, str) else device
    head = (f"{'op':<22} {'impl':<22} {'ms':>10} {'TFLOP/s':>8} {'GB/s':>8} {'FLOP/B':>8} {'bound':>8} "
            f"{'floor ms':>10} {'% roof':>7}")
    lines = [head, "-" * len(head)]
    for r in records:
        peak = fixed or perf.match_device_name(str(r.get("device", "")))
        ms = float(r["median_ms"])
        flops, nbytes = float(r.get("flops") or 0.0), float(r.get("bytes") or 0.0)
        ai = flops / nbytes if nbytes else float("nan")
        tflops = flops / (ms * 1e-3) / 1e12 if ms > 0 else 0.0
        gbps = nbytes / (ms * 1e-3) / 1e9 if ms > 0 else 0.0
        if peak is not None and (flops or nbytes):
            roof = perf.roofline(flops, nbytes, peak, tensor_cores=r.get("tensor_cores", True))
            bnd, floor = roof.bound, f"{roof.time_s * 1e3:>10.4f} {100 * roof.time_s / (ms * 1e-3):>6.1f}%"
        else:
            bnd, floor = "-", f"{'-':>10} {'-':>7}"
        lines.append(f"{str(r.get('op', '?'))[:22]:<22} {str(r.get('impl', '?'))[:22]:<22} {ms:>10.4f} "
                     f"{tflops:>8.2f} {gbps:>8.1f} {ai:>8.2f} {bnd:>8} {floor}")
    return "\n".join(lines)


def environment(device: torch.device) -> dict[str, Any]:
    import triton
    env = {
        "device": device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
    }
    peak = device_roof(device)
    if peak is not None:
        env["peak"] = {"name": peak.name, "hbm_gbps": peak.hbm_gbps, "tensor_tflops": peak.tensor_tflops,
                       "fp32_tflops": peak.fp32_tflops, "source": peak.source}
    if device.type == "cpu":
        env["cpu_backend"] = cpu.build_info() if cpu.load() else "unavailable: the CPU ops ran llmkern.reference"
        # the vector ISA torch's own CPU kernels use (ATEN_CPU_CAPABILITY lowers it), the threads, and how busy the
        # machine was when the records were written (a shared machine's other load slows every implementation)
        env["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        env["threads"] = torch.get_num_threads()
        env["load_average"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        env["isa_env"] = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "LLMKERN_CPU_ISA",
                                                     "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
                          if k in os.environ}
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                           check=True).stdout.strip()
    except Exception:
        env["git_commit"] = None
    for mod in ("flash_attn", "flashinfer", "torchao", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            pass
    return env


def write_json(path: str, records: list[dict], device: torch.device, suites: list[str]) -> None:
    with open(path, "w") as f:
        json.dump({"environment": environment(device), "suites": suites, "records": records}, f, indent=1)


def optional_import(name: str):
    """A peer library if installed (and importable), else None."""
    try:
        return __import__(name, fromlist=["_"])
    except Exception:
        return None
