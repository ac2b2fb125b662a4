"""The Python stages of the GPU-day run; bench/device_run.sh runs each in its own process, under its own timeout:

    python -m llmkern.bench.device_run env     --work W [--dry-run]
    python -m llmkern.bench.device_run sweep   --work W --out OUT --budget-s S [--dry-run]
    python -m llmkern.bench.device_run summary --work W --out OUT

env      environment (GPU, SM count, driver, clocks, versions, peers present) and the measured roofs
         (llmkern.measure), to W/env.json. Dry run: tiny roof measurements.
sweep    the `device` sweep (llmkern.bench.device) on the present device, OUT/records.json rewritten after every
         case, so whatever finished survives a kill. A case that raises is recorded as an error and the sweep goes
         on; cases left when the budget runs out are listed as skipped. A fault that poisons the CUDA context
         (illegal address, launch failure) ends the process with exit code 3, and the shell script starts it again
         with the finished cases kept (`--resume`); the dry run leaves that way once, after its first decode
         record, so the restart is exercised too.
summary  merges the stage outcomes (W/stages.tsv), the junit XML, the sanitizer log and the records into
         OUT/records.json, writes OUT/summary.md and OUT/roofline.png, and prints the final table last.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from typing import Any

import torch

from llmkern import measure
from llmkern.bench import common, device as device_sweep, device_report

RECORDS = "records.json"
CONTEXT_LOST = 3                     # exit code: the CUDA context is gone, restart the sweep with --resume
# Messages after which every later CUDA call fails in this process (CUDA's sticky errors).
STICKY = ("illegal memory access", "illegal address", "unspecified launch failure", "misaligned address",
          "device-side assert", "an illegal instruction")
DRY_ROOF = dict(copy_bytes=8 << 20, matmul_n=256, reps=3)
PEERS = ("liger-kernel", "torchao", "flash-attn", "flashinfer-python")


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _write_json(path: str, data: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)      # never a half-written file, whenever the process is killed


def _nvidia_smi() -> dict[str, str]:
    fields = "driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout.strip().splitlines()[0]
    except Exception:
        return {}
    return dict(zip(["driver", "sm_clock", "mem_clock", "temperature", "power", "memory_used"],
                    (v.strip() for v in out.split(","))))


def _peer_versions() -> dict[str, str]:
    from importlib import metadata
    found = {}
    for name in PEERS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


# ---------------------------------------------------------------------------------------------------------- env
def env_stage(args: argparse.Namespace) -> int:
    dev = common.bench_device()
    env = common.environment(dev)
    env["git_commit"] = env.get("git_commit") or os.environ.get("LLMKERN_COMMIT")
    env["peers"] = _peer_versions()
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        env.update(sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1),
                   l2_mb=round(getattr(props, "L2_cache_size", 0) / 1e6, 1), **_nvidia_smi())
    else:
        env.update(sm_count=None, cpu_threads=torch.get_num_threads())
    for k in ("device", "sm_count", "capability", "memory_gib", "l2_mb", "driver", "sm_clock", "mem_clock",
              "temperature", "power", "python", "torch", "triton", "cuda", "transformers", "git_commit", "peers"):
        if env.get(k) is not None:
            print(f"  {k:<13} {env[k]}")
    out = {"environment": env, "measured_roof": None}
    _write_json(os.path.join(args.work, "env.json"), out)       # the environment survives a failed measurement
    roof = measure.measure_roofs(dev, **(DRY_ROOF if args.dry_run else {}))
    out["measured_roof"] = roof.to_dict()
    _write_json(os.path.join(args.work, "env.json"), out)
    print("  " + device_report.roof_line(env, out["measured_roof"]))
    return 0


# -------------------------------------------------------------------------------------------------------- sweep
def _case_error(data: dict, suite: str, label: str, e: BaseException) -> bool:
    """Record a failed case; True when the error leaves the CUDA context unusable."""
    msg = f"{type(e).__name__}: {e}".strip().replace("\n", " ")[:400]
    data["bench"]["errors"].append({"suite": suite, "case": label, "error": msg})
    print(f"  {label}: ERROR {msg}", flush=True)
    return any(s in msg.lower() for s in STICKY)


def sweep_stage(args: argparse.Namespace) -> int:
    dev = common.bench_device()
    path = os.path.join(args.out, RECORDS)
    envs = _read_json(os.path.join(args.work, "env.json"))
    data = _read_json(path) if args.resume else {}
    data.setdefault("environment", envs.get("environment") or common.environment(dev))
    data.setdefault("measured_roof", envs.get("measured_roof"))
    data.setdefault("suites", device_sweep.SUITES)
    data.setdefault("records", [])
    data.setdefault("bench", {"errors": [], "skipped": [], "restarts": 0})
    if args.resume:
        data["bench"]["restarts"] += 1
    done = {r["case"] for r in data["records"]} | {e["case"] for e in data["bench"]["errors"]}
    roof = measure.MeasuredRoof.from_dict(data["measured_roof"]) if data["measured_roof"] else None
    t_end = time.monotonic() + args.budget_s
    print(f"device sweep on {common.device_name(dev)}, budget {args.budget_s:.0f} s"
          f"{', resumed after a lost CUDA context' if args.resume else ''}", flush=True)
    try:
        for name in device_sweep.SUITES:
            print(f"\n== {name} ==", flush=True)
            t_suite, ours = time.monotonic(), []
            try:
                for case in device_sweep.suite_cases(name, dev):
                    if case.label in done:
                        continue
                    if time.monotonic() > t_end:
                        data["bench"]["skipped"].append(case.label)
                        continue
                    try:
                        rec = common.run_case(case, dev)
                    except Exception as e:             # one failing case never stops the sweep
                        lost = _case_error(data, name, case.label, e)
                        _write_json(path, data)
                        if lost:
                            print("the CUDA context is lost: restarting the sweep", flush=True)
                            return CONTEXT_LOST
                        continue
                    rec["suite"], rec["case"] = name, case.label
                    measure.annotate([rec], roof)
                    data["records"].append(rec)
                    ours.append(rec)
                    pct = rec["pct_measured_roof"]
                    print("  " + common.format_record(rec) + ("" if pct is None else f" | {pct:5.1f}% of measured"),
                          flush=True)
                    _write_json(path, data)
                    if args.dry_run and not args.resume and name == "decode":
                        print("dry run: leaving as if the CUDA context were lost, to exercise the restart", flush=True)
                        return CONTEXT_LOST
            except Exception as e:                     # listing the suite's cases failed
                lost = _case_error(data, name, f"{name}: listing its cases", e)
                _write_json(path, data)
                if lost:
                    return CONTEXT_LOST
            summarize = getattr(importlib.import_module(f"llmkern.bench.{name}"), "summarize", None)
            if summarize is not None and ours:
                try:
                    print(summarize(ours))
                except Exception as e:                 # a table is not worth losing the sweep over
                    print(f"  ({name} summary failed: {type(e).__name__}: {e})")
            print(f"  ({name}: {len(ours)} records in {time.monotonic() - t_suite:.0f} s)", flush=True)
    except KeyboardInterrupt:                          # the stage's timeout: keep what finished
        data["bench"]["interrupted"] = True
        _write_json(path, data)
        raise
    _write_json(path, data)
    errors, skipped = len(data["bench"]["errors"]), len(data["bench"]["skipped"])
    print(f"\n{len(data['records'])} records, {errors} errors, {skipped} skipped for time -> {path}")
    return 0


# ------------------------------------------------------------------------------------------------------ summary
def _read_text(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _stages(work: str) -> list[dict[str, Any]]:
    stages = []
    for line in _read_text(os.path.join(work, "stages.tsv")).splitlines():
        name, status, seconds, note = (line.split("\t") + ["", "", "", ""])[:4]
        stages.append({"name": name, "status": status, "seconds": int(seconds or 0), "note": note})
    return stages


def summary_stage(args: argparse.Namespace) -> int:
    path = os.path.join(args.out, RECORDS)
    run = _read_json(path)
    envs = _read_json(os.path.join(args.work, "env.json"))
    run.setdefault("environment", envs.get("environment", {}))
    run.setdefault("measured_roof", envs.get("measured_roof"))
    run.setdefault("records", [])
    run["stages"] = _stages(args.work)
    run["tests"] = device_report.junit_outcome(os.path.join(args.out, "junit.xml"),
                                               _read_text(os.path.join(args.out, "pytest.log")))
    run["sanitizer"] = device_report.sanitizer_outcome(_read_text(os.path.join(args.out, "sanitizer.log")))
    note = _read_text(os.path.join(args.work, "sanitizer.note")).strip()
    if note:
        run["sanitizer"]["note"] = note
    _write_json(path, run)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(device_report.markdown(run))
    try:
        placed = device_report.plot(os.path.join(args.out, "roofline.png"), run)
        print(f"roofline.png: {placed} records placed")
    except Exception as e:                             # matplotlib missing or broken: the table still prints
        print(f"roofline.png not written: {type(e).__name__}: {e}")
    print("\n" + device_report.text_table(run))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmkern.bench.device_run", description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=("env", "sweep", "summary"))
    p.add_argument("--work", required=True, help="the run's scratch folder (stage outcomes, env.json)")
    p.add_argument("--out", help="the output folder (records.json, summary.md, ...)")
    p.add_argument("--budget-s", type=float, default=240.0, help="sweep: start no case after this many seconds")
    p.add_argument("--dry-run", action="store_true", help="tiny roof measurements (the CPU dry run)")
    p.add_argument("--resume", action="store_true", help="sweep: keep the finished cases of OUT/records.json")
    args = p.parse_args(argv)
    if args.stage != "env" and not args.out:
        p.error(f"{args.stage} needs --out")
    return {"env": env_stage, "sweep": sweep_stage, "summary": summary_stage}[args.stage](args)


if __name__ == "__main__":
    sys.exit(main())
