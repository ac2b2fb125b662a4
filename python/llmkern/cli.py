"""The `llmkern` command.

  llmkern bench [SUITE ...] [--quick] [--json PATH]    time the suites on the present device (CUDA if there is one)
  llmkern check-compile [--arch sm_80,sm_90] [--json PATH] [--filter NAME] [--jobs N]
                                                       compile every kernel config for real GPUs, with no GPU
  llmkern build-ext [--verbose]                        build the C++ CPU backend (csrc/) now, print where it went

Further subcommands register themselves through `SUBCOMMANDS` (name -> (add_arguments, run)).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Callable

SUBCOMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {}


def subcommand(name: str, help: str):
    def wrap(pair):
        add_args, run = pair
        SUBCOMMANDS[name] = (add_args, run, help)
        return pair
    return wrap


# --------------------------------------------------------------------------------------------------------- bench
def _bench_args(p: argparse.ArgumentParser) -> None:
    from llmkern.bench import SUITES
    p.add_argument("suites", nargs="*", metavar="SUITE", help=f"suites to run (default: all of {', '.join(SUITES)})")
    p.add_argument("--quick", action="store_true", help="a few shapes per suite (a smoke run)")
    p.add_argument("--json", metavar="PATH", help="write the records and the environment to PATH")


def _bench_run(args: argparse.Namespace) -> int:
    from llmkern.bench import SUITES
    from llmkern.bench import common

    names = args.suites or SUITES
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        print(f"unknown suite(s): {', '.join(unknown)}; available: {', '.join(SUITES)}", file=sys.stderr)
        return 2
    device = common.bench_device()
    env = common.environment(device)
    print(f"llmkern bench on {env['device']} (torch {env['torch']}, triton {env['triton']})")
    if device.type == "cpu":
        print("No CUDA device: running smaller shapes on the CPU path (PyTorch reference). These numbers say the "
              "suite runs; they are not GPU measurements.")
    records = []
    for name in names:
        suite = importlib.import_module(f"llmkern.bench.{name}")
        print(f"\n== {name} ==")
        suite_records = common.run_suite(suite.cases(device, args.quick), device)
        for r in suite_records:
            r["suite"] = name
        records += suite_records
        summarize = getattr(suite, "summarize", None)  # an optional per-suite table (e.g. speedups vs peers)
        if summarize is not None:
            print(summarize(suite_records))
    # The main job ends with the roofline view of llmkern's own kernels: how far each is from the device's bound.
    from llmkern.roofline import summary_table
    ours = [r for r in records if str(r["impl"]).startswith("llmkern")]
    if ours:
        print("\n== roofline summary (llmkern kernels) ==")
        print(summary_table(ours))
    if args.json:
        common.write_json(args.json, records, device, names)
        print(f"\nwrote {len(records)} records to {args.json}")
    return 0


subcommand("bench", "run benchmark suites on the present device")((_bench_args, _bench_run))


# ------------------------------------------------------------------------------------------------- check-compile
def _check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="sm_80,sm_90", help="comma-separated CUDA archs (default: sm_80,sm_90)")
    p.add_argument("--json", metavar="PATH", help="write a list of {kernel, config, arch, regs, spill_bytes, "
                                                  "smem_bytes, mma} records")
    p.add_argument("--filter", metavar="NAME", help="only kernels whose name contains NAME")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: all cores)")


def _check_run(args: argparse.Namespace) -> int:
    from llmkern import compile_check

    archs = []
    for a in args.arch.split(","):
        a = a.strip().lower().removeprefix("sm_")
        if a not in ("80", "90"):
            print(f"--arch: supported archs are sm_80 and sm_90, got {a!r}", file=sys.stderr)
            return 2
        archs.append(int(a))
    records = compile_check.run(archs, args.filter, jobs=args.jobs)
    print(compile_check.format_table(records))
    if args.json:
        keys = ("kernel", "config", "arch", "regs", "spill_bytes", "stack_bytes", "smem_bytes", "mma")
        with open(args.json, "w") as f:
            json.dump([{k: r[k] for k in keys} for r in records], f, indent=1)
    bad = [r for r in records if not r["ok"]]
    print(f"\n{len(records)} kernel builds, {len(bad)} failed")
    if not records:
        print("no kernels matched", file=sys.stderr)
        return 1
    return 1 if bad else 0


subcommand("check-compile", "compile every kernel config for sm_80/sm_90 and check spills, smem, MMA")(
    (_check_args, _check_run))


# ---------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    # Subcommands defined in other modules register on import.
    for mod in ("llmkern.roofline", "llmkern.cpu"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
    parser = argparse.ArgumentParser(prog="llmkern", description="llmkern: verified Triton kernels for LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, _, help_text) in SUBCOMMANDS.items():
        add_args(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    return SUBCOMMANDS[args.command][1](args)


if __name__ == "__main__":
    sys.exit(main())
