"""Autotuned kernels: one autotuner per tuning key, and the winning configs shipped per GPU as JSON.

An op that autotunes declares a `TunedKernel` and, at launch, asks it for the kernel of its tuning key:

    _TUNED = tuning.TunedKernel("attention_fwd", attention_fwd_kernel, configs=..., spec=..., buckets=("seqlen_q",))
    kernel = _TUNED.get(q.device, head_dim=128, dtype=torch.bfloat16, ..., seqlen_q=max_seqlen_q)
    _utils.launch(kernel, grid, ...)

The tuning key holds what changes the best tile. Sizes that change from call to call (a prompt's length, a GEMM's
M) enter it bucketed to the next power of two (`buckets`), so a 100-token prompt and a 10k-token one each get their
own tile, yet a new length does not re-run the tuner every call (the scheme of gemlite and Hugging Face's kernels).
Each key gets its own `triton.autotune` wrapper, created on first use (`_utils.autotune`: the interpreter runs the
first config of the list).

Shipped configs. `llmkern bench --tuned-configs PATH` autotunes afresh and writes the winner of every tuning key it
met to one JSON file per GPU, named after the GPU (`NVIDIA_H100_80GB_HBM3.json`):

    {"device": "NVIDIA H100 80GB HBM3", "arch": "sm_90", "triton": "3.6.0",
     "kernels": {"attention_fwd": [{"key": {"head_dim": 128, "dtype": "bfloat16", "varlen": false, "softcap": false,
                                            "lse": false, "seqlen_q": 1024},
                                    "config": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}}]}}

Key values are ints, bools, or dtype names (for the field "dtype"); a config holds the kernel's tile constexprs plus
num_warps and num_stages. At import llmkern reads every file in SHIPPED_DIR (python/llmkern/configs/) and in the
files or folders listed in LLMKERN_TUNED_CONFIGS (os.pathsep-separated); a key found for the launching GPU (by its
torch.cuda.get_device_name) runs that one config instead of autotuning. `llmkern check-compile` compiles every
entry of those files for its file's arch (sm_80 for any arch below sm_90, else sm_90: the two it checks).
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import re
from typing import Any, Callable, Iterable

import torch
import triton

from llmkern import _utils, compile_check

SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
_LAUNCH_OPTIONS = ("num_warps", "num_stages")


def bucket(n: int) -> int:
    """The bucket of a size that changes every call: the next power of two (1 for n <= 1)."""
    return triton.next_power_of_2(max(1, int(n)))


def file_name(device_name: str) -> str:
    """The shipped file of a GPU: its reported name with every run of other characters than [A-Za-z0-9_-] as '_'."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", device_name).strip("_") + ".json"


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(device: torch.device) -> str:
    """The name configs are filed under: torch.cuda.get_device_name for CUDA devices, the device type otherwise."""
    if device.type != "cuda":
        return device.type
    return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())


# ----------------------------------------------------------------------------------------------- keys and configs
Key = tuple  # a tuning key in canonical form: sorted (field, value) pairs, dtypes as torch.dtype


def _canonical(key: dict[str, Any]) -> Key:
    return tuple(sorted(key.items()))


def _key_to_json(key: Key) -> dict[str, Any]:
    return {k: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v for k, v in key}


def _key_from_json(fields: dict[str, Any], where: str) -> Key:
    if not isinstance(fields, dict):
        raise ValueError(f"{where}: a key must be an object of field: value, got {fields!r}")
    out = dict(fields)
    if "dtype" in out:
        dtype = getattr(torch, str(out["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{where}: unknown dtype {out['dtype']!r}")
        out["dtype"] = dtype
    return _canonical(out)


def config_to_json(cfg: triton.Config) -> dict[str, int]:
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def config_from_json(fields: dict[str, Any], where: str) -> triton.Config:
    if not isinstance(fields, dict) or not all(isinstance(v, int) for v in fields.values()):
        raise ValueError(f"{where}: a config must be an object of name: int, got {fields!r}")
    tiles = {k: v for k, v in fields.items() if k not in _LAUNCH_OPTIONS}
    return triton.Config(tiles, **{k: fields[k] for k in _LAUNCH_OPTIONS if k in fields})


@dataclasses.dataclass
class _Entry:
    config: triton.Config
    source: str   # the file it came from (for error messages)


class TunedConfigs:
    """Tuned configs read from JSON files: device name -> kernel name -> tuning key -> config, plus each device's
    arch (compute capability as an int, e.g. 90)."""

    def __init__(self) -> None:
        self.table: dict[str, dict[str, dict[Key, _Entry]]] = {}
        self.arch: dict[str, int] = {}

    def load_file(self, path: str) -> None:
        """Add one file's entries (later files override earlier ones key by key). ValueError on a malformed file."""
        with open(path) as f:
            data = json.load(f)
        device, arch = data.get("device"), str(data.get("arch", ""))
        if not isinstance(device, str) or not re.fullmatch(r"sm_\d+", arch):
            raise ValueError(f"{path}: needs a \"device\" name and an \"arch\" like \"sm_90\"")
        kernels = self.table.setdefault(device, {})
        self.arch[device] = int(arch[3:])
        for kernel, entries in data.get("kernels", {}).items():
            for i, entry in enumerate(entries):
                where = f"{path}: kernels.{kernel}[{i}]"
                kernels.setdefault(kernel, {})[_key_from_json(entry.get("key"), where)] = _Entry(
                    config_from_json(entry.get("config"), where), path)

    def load(self, paths: Iterable[str]) -> None:
        """Load files, and every *.json file of the folders among `paths`."""
        for path in paths:
            files = sorted(glob.glob(os.path.join(path, "*.json"))) if os.path.isdir(path) else [path]
            for f in files:
                self.load_file(f)

    def lookup(self, device: str, kernel: str, key: dict[str, Any]) -> _Entry | None:
        """The entry of a tuning key (its fields as `TunedKernel.get` takes them, sizes bucketed), or None."""
        return self.table.get(device, {}).get(kernel, {}).get(_canonical(key))

    def entries(self) -> Iterable[tuple[str, str, Key, _Entry]]:
        for device, kernels in self.table.items():
            for kernel, entries in kernels.items():
                for key, entry in entries.items():
                    yield device, kernel, key, entry


SHIPPED = TunedConfigs()
SHIPPED.load([SHIPPED_DIR] + [p for p in os.environ.get("LLMKERN_TUNED_CONFIGS", "").split(os.pathsep) if p])
_use_shipped = True


def use_shipped(on: bool) -> None:
    """Whether launches take shipped configs (on by default). `llmkern bench --tuned-configs` turns it off to tune
    afresh. Applies to tuning keys met from now on (it forgets the autotuners made so far)."""
    global _use_shipped
    _use_shipped = on
    for tuned in KERNELS.values():
        tuned.tuners.clear()


# ----------------------------------------------------------------------------------------------- tuned kernels
KERNELS: dict[str, "TunedKernel"] = {}


class TunedKernel:
    """An autotuned Triton kernel: its config list per tuning key, and one autotuner per key (module docstring).

    name: the kernel's name in the JSON files. configs(key) -> the candidate configs for that key (dict of the
    fields given to `get`, sizes already bucketed). spec(key, config) -> the CompileSpec of that config for that key
    (check-compile builds one per shipped entry). buckets: the key fields that are sizes, bucketed by `bucket`.
    """

    def __init__(self, name: str, kernel: Any, *, configs: Callable[[dict], list[triton.Config]],
                 spec: Callable[[dict, triton.Config], compile_check.CompileSpec], buckets: Iterable[str] = ()):
        self.name, self.kernel, self.configs, self.spec = name, kernel, configs, spec
        self.buckets = frozenset(buckets)
        self.tuners: dict[tuple[str, Key], Any] = {}
        KERNELS[name] = self

    def get(self, device: torch.device, **key: Any) -> Any:
        """The kernel to launch (with _utils.launch) for this tuning key on `device`."""
        return self.get_for(device_name(device), **key)

    def get_for(self, device: str, **key: Any) -> Any:
        """`get` by device name (as torch.cuda.get_device_name reports it)."""
        fields = {k: bucket(v) if k in self.buckets else v for k, v in key.items()}
        canon = _canonical(fields)
        tuner = self.tuners.get((device, canon))
        if tuner is None:
            entry = SHIPPED.lookup(device, self.name, fields) if _use_shipped else None
            candidates = self.configs(fields) if entry is None else [self.shipped_config(canon, entry)]
            tuner = self.tuners[(device, canon)] = _utils.autotune(candidates, key=[])(self.kernel)
        return tuner

    def shipped_config(self, canon: Key, entry: _Entry) -> triton.Config:
        """A shipped entry's config, once it is known to set exactly the tile names of this kernel's configs."""
        expected = set(self.configs(dict(canon))[0].kwargs)
        if set(entry.config.kwargs) != expected:
            raise ValueError(f"{entry.source}: the {self.name} config for {_key_to_json(canon)} sets "
                             f"{sorted(entry.config.kwargs)}, expected {sorted(expected)}")
        return entry.config

    def winners(self, device: str) -> dict[Key, triton.Config]:
        """The config each autotuner of `device` chose, by tuning key (keys with a single candidate never tune)."""
        # Each autotuner serves one tuning key, which includes the dtype, so its cache holds at most one entry.
        return {canon: next(iter(tuner.cache.values())) for (dev, canon), tuner in self.tuners.items()
                if dev == device and getattr(tuner, "cache", None)}


def write_winners(path: str, device: torch.device) -> tuple[str, int]:
    """Write the configs the autotuners of `device` chose (see save_winners); nothing for a non-CUDA device."""
    if device.type != "cuda":
        return path, 0
    major, minor = torch.cuda.get_device_capability(device)
    return save_winners(path, device_name(device), f"sm_{major}{minor}")


def save_winners(path: str, device: str, arch: str) -> tuple[str, int]:
    """Write the configs the autotuners of the GPU named `device` chose to `path` (a JSON file, or a folder: then
    file_name(device) in it), merged over the entries already in that file. Returns (file, entries written); writes
    nothing when no autotuner of that GPU ran."""
    found = {tuned.name: tuned.winners(device) for tuned in KERNELS.values()}
    count = sum(len(w) for w in found.values())
    target = os.path.join(path, file_name(device)) if os.path.isdir(path) else path
    if count == 0:
        return target, 0
    data = {"kernels": {}}
    if os.path.exists(target):
        with open(target) as f:
            data = json.load(f)
    data.update(device=device, arch=arch, triton=triton.__version__)
    for kernel, winners in found.items():
        merged = {_key_from_json(e["key"], target): e for e in data["kernels"].get(kernel, [])}
        merged.update({canon: {"key": _key_to_json(canon), "config": config_to_json(cfg)}
                       for canon, cfg in winners.items()})
        if merged:
            data["kernels"][kernel] = list(merged.values())
    with open(target, "w") as f:
        json.dump(data, f, indent=1)
    return target, count


@compile_check.register
def compile_specs():
    """Every shipped entry, for the arch check-compile covers nearest its device's (sm_80 below sm_90, else sm_90)."""
    for device, kernel, key, entry in SHIPPED.entries():
        if kernel not in KERNELS:
            raise KeyError(f"{entry.source}: no autotuned kernel is named {kernel!r} (known: {sorted(KERNELS)})")
        tuned = KERNELS[kernel]
        spec = tuned.spec(dict(key), tuned.shipped_config(key, entry))
        yield dataclasses.replace(spec, config=f"{spec.config},tuned:{file_name(device)[:-5]}",
                                  archs=(90 if SHIPPED.arch[device] >= 90 else 80,))
