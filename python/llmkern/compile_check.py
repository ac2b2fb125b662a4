"""Compile every Triton kernel, in every config its dispatcher can pick, for real CUDA targets, with no GPU.

Each op module registers a function that yields `CompileSpec`s (one per kernel x config), next to the configs the
dispatcher uses, so a config cannot be added to an op without being compiled here. For each spec and arch we:

  1. build the kernel with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`;
  2. read the spill bytes from the `ptxas -v` log of that very build (Triton runs ptxas with -v; its log is printed
     when `knobs.nvidia.dump_ptxas_log` is set, and always_compile makes sure ptxas runs rather than a cache hit);
  3. read the cubin's resource usage with the `cuobjdump --dump-resource-usage` shipped in the Triton wheel
     (registers, stack frame, static shared memory) and add Triton's dynamic shared memory;
  4. count tensor-core instructions in the SASS from `nvdisasm` (HMMA on sm_80; HGMMA or HMMA on sm_90).

A spec fails when it spills registers, needs more shared memory than the arch allows a block, or expected tensor
cores and got none. A stack frame without spills is reported, not failed: CUDA's sin/cos keep a small local array
for the range reduction of large arguments (the RoPE kernel's position path has one), which is not a spill.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import triton

# Largest shared memory one block may opt into: A100 (sm_80) 163 KB, H100 (sm_90) 227 KB (CUDA C Programming
# Guide, "Technical Specifications per Compute Capability").
MAX_SMEM_BYTES = {80: 166912, 90: 232448}


@dataclass(frozen=True)
class CompileSpec:
    """One kernel in one configuration.

    signature: every non-constexpr argument's Triton type, e.g. {"Q": "*fp16:16", "stride_qb": "i64", "N": "i32"};
      ":16" marks an argument the runtime would see as 16-divisible (aligned pointers), as the launcher does.
    constexprs: every tl.constexpr argument's value.
    archs: the compute capabilities to build it for (None: every arch the run checks); a tuned config shipped for
      one GPU is built for that GPU's arch only.
    """
    kernel: Any
    name: str
    config: str
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 2
    expect_mma: bool = False
    archs: tuple[int, ...] | None = None


_REGISTRY: list[Callable[[], Iterable[CompileSpec]]] = []


def register(fn: Callable[[], Iterable[CompileSpec]]) -> Callable[[], Iterable[CompileSpec]]:
    """Decorator for an op module's spec generator."""
    _REGISTRY.append(fn)
    return fn


def all_specs() -> list[CompileSpec]:
    """Every registered spec. Importing any llmkern module runs the package's __init__ first, which imports every op
    module, and each registers its generator there, so the registry is complete by the time this runs."""
    specs: list[CompileSpec] = []
    for gen in _REGISTRY:
        specs.extend(gen())
    return specs


def _bin_dir() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _compile(spec: CompileSpec, cap: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = spec.kernel
    arg_names = fn.arg_names
    sig: dict[str, str] = {}
    attrs: dict[tuple[int], list] = {}
    for i, name in enumerate(arg_names):
        if name in spec.constexprs:
            sig[name] = "constexpr"
            continue
        if name not in spec.signature:
            raise KeyError(f"{spec.name}: no type given for argument {name!r}")
        ty = spec.signature[name]
        if ty.endswith(":16"):
            ty = ty[:-3]
            attrs[(i,)] = [["tt.divisibility", 16]]
        sig[name] = ty
    constexprs = {(arg_names.index(k),): v for k, v in spec.constexprs.items()}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", cap, 32)
    return triton.compile(src, target=target, options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})


_PTXAS_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _compile_with_ptxas_log(spec: CompileSpec, cap: int):
    """Compile, and return (compiled kernel, spill bytes) with the spills as ptxas reported them for this build."""
    from triton import knobs

    saved = (knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile)
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = _compile(spec, cap)
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
    found = _PTXAS_RE.findall(log.getvalue())
    if not found:
        raise RuntimeError(f"{spec.name}: no ptxas -v log captured; cannot tell spills")
    spill = max(max(int(stores), int(loads)) for _, stores, loads in found)
    return compiled, spill


_RES_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def check_one(spec: CompileSpec, cap: int) -> dict:
    """Compile one spec for one arch and return its record (with an `ok` flag and a `problem` string)."""
    rec = {"kernel": spec.name, "config": spec.config, "arch": f"sm_{cap}"}
    try:
        compiled, spill = _compile_with_ptxas_log(spec, cap)
    except Exception as e:  # a compile error is a failed check, reported, not a crash of the whole run
        first = str(e).strip().splitlines()
        return {**rec, "regs": None, "spill_bytes": None, "stack_bytes": None, "smem_bytes": None, "mma": None,
                "ok": False,
                "problem": f"compile error: {type(e).__name__}: {first[-1] if first else ''}"}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        res = subprocess.run([os.path.join(_bin_dir(), "cuobjdump"), "--dump-resource-usage", path],
                             capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(_bin_dir(), "nvdisasm"), path],
                              capture_output=True, text=True, check=True).stdout
    m = _RES_RE.search(res)
    if m is None:
        raise RuntimeError(f"could not read resource usage for {spec.name}:\n{res}")
    regs, stack, static_smem, local = (int(g) for g in m.groups())
    smem = int(compiled.metadata.shared) + static_smem
    mma = len(re.findall(r"\b(?:HGMMA|HMMA)\b", sass))
    problems = []
    if spill:
        problems.append(f"spills {spill} bytes of registers to local memory")
    if smem > MAX_SMEM_BYTES[cap]:
        problems.append(f"needs {smem} bytes of shared memory, sm_{cap} allows {MAX_SMEM_BYTES[cap]}")
    if spec.expect_mma and mma == 0:
        problems.append("expected tensor-core MMA instructions, found none")
    return {**rec, "regs": regs, "spill_bytes": spill, "stack_bytes": max(stack, local), "smem_bytes": smem, "mma": mma,
            "ok": not problems, "problem": "; ".join(problems)}


def run(archs: list[int], name_filter: str | None = None, jobs: int = 1) -> list[dict]:
    """Compile every selected spec for each of `archs`; records in spec order, each spec's archs together.

    Each arch compiles in processes of its own, forked from this one before it compiled anything: triton 3.6 keeps
    what it decided for one target within a process (after an sm_90 build, an e5m2 conversion for sm_80 was lowered
    to sm_89's cvt and ptxas refused it), so one process per arch checks what a GPU of that arch would build. Compiles
    are CPU-bound and independent: the pool uses `jobs` cores (CI has 2). JIT functions do not pickle, so each
    forked worker rebuilds the same spec list and picks its item by index."""
    import concurrent.futures as cf
    import multiprocessing as mp

    specs = _selected(name_filter)
    records: dict[tuple[int, int], dict] = {}
    for cap in archs:
        work = [(i, cap) for i, spec in enumerate(specs) if spec.archs is None or cap in spec.archs]
        with cf.ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=mp.get_context("fork")) as ex:
            records.update(zip(work, ex.map(_check_indexed, work, [name_filter] * len(work))))
    return [records[key] for key in sorted(records)]


def _selected(name_filter: str | None) -> list[CompileSpec]:
    return [s for s in all_specs() if name_filter is None or name_filter in s.name]


def _check_indexed(item: tuple[int, int], name_filter: str | None) -> dict:
    i, cap = item
    return check_one(_selected(name_filter)[i], cap)


def format_table(records: list[dict]) -> str:
    header = (f"{'kernel':<34} {'config':<44} {'arch':<6} {'regs':>5} {'spill':>6} {'stack':>6} {'smem':>7} "
              f"{'mma':>5}  status")
    lines = [header, "-" * len(header)]
    for r in records:
        status = "ok" if r["ok"] else "FAIL: " + r["problem"]
        fmt = lambda v: "-" if v is None else str(v)  # noqa: E731
        lines.append(f"{r['kernel']:<34} {r['config']:<44} {r['arch']:<6} {fmt(r['regs']):>5} "
                     f"{fmt(r['spill_bytes']):>6} {fmt(r['stack_bytes']):>6} {fmt(r['smem_bytes']):>7} "
                     f"{fmt(r['mma']):>5}  {status}")
    return "\n".join(lines)

