"""The `llmkern` command: argument parsing for each subcommand, which then calls the module that does the work.

  llmkern bench [SUITE ...] [--quick] [--json PATH] [--tuned-configs PATH]
        time the suites on the present device (CUDA if there is one)                     llmkern.bench
  llmkern check-compile [--arch sm_80,sm_90] [--json PATH] [--filter NAME] [--jobs N]
        compile every kernel config for real GPUs, with no GPU                           llmkern.compile_check
  llmkern roofline [--model M] [--device D | --measure] [--batch B] [--context C] [--bits 4|8|16] [--group-size G]
                   [--kv-dtype bf16|fp16|fp8]
                   [--plot PATH [--bench-json FILE]]
        the lowest possible prefill/decode step time of a model on a device              llmkern.roofline
        (--measure: on this machine's measured roofs, CPU included)                      llmkern.measure
  llmkern build-ext [--verbose]
        build the C++ CPU backend (csrc/) now and print where it went                    llmkern.cpu
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from typing import Callable

from llmkern import compile_check, cpu, measure, perf, quant_weight, roofline, tuning
from llmkern.bench import SUITES, common
from llmkern.models import MODELS, get_model


def _missing_folder(flag: str, path: str | None, folder_ok: bool = False) -> str | None:
    """The error for an output path whose folder does not exist (checked before a run, so that a typo does not lose
    the run's results at the end), else None; with folder_ok an existing folder is itself a valid path."""
    if path is None or (folder_ok and os.path.isdir(path)) or os.path.isdir(os.path.dirname(os.path.abspath(path))):
        return None
    return f"{flag}: the folder of {path} does not exist"


# --------------------------------------------------------------------------------------------------------- bench
def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("suites", nargs="*", metavar="SUITE", help=f"suites to run (default: all of {', '.join(SUITES)})")
    p.add_argument("--quick", action="store_true", help="a few shapes per suite (a smoke run)")
    p.add_argument("--json", metavar="PATH", help="write the records and the environment to PATH")
    p.add_argument("--tuned-configs", metavar="PATH",
                   help="autotune every autotuned kernel afresh (ignoring shipped configs) and write the winning "
                        "config of each tuning key to PATH, a JSON file, or a folder to get PATH/<GPU name>.json "
                        f"(ship it in {tuning.SHIPPED_DIR} to use it by default)")


def _bench_run(args: argparse.Namespace) -> int:
    names = args.suites or SUITES
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        print(f"unknown suite(s): {', '.join(unknown)}; available: {', '.join(SUITES)}", file=sys.stderr)
        return 2
    for err in (_missing_folder("--json", args.json), _missing_folder("--tuned-configs", args.tuned_configs, True)):
        if err:
            print(f"llmkern bench: {err}", file=sys.stderr)
            return 2
    device = common.bench_device()
    env = common.environment(device)
    print(f"llmkern bench on {env['device']} (torch {env['torch']}, triton {env['triton']})")
    if device.type == "cpu":
        print(f"No CUDA device: CPU shapes on the CPU path ({env['cpu_backend']}), against PyTorch's CPU paths; "
              f"roofs {env['peak']['source'] if 'peak' in env else 'unknown'}.")
    if args.tuned_configs:
        tuning.use_shipped(False)
    records = []
    for name in names:
        suite = importlib.import_module(f"llmkern.bench.{name}")
        print(f"\n== {name} ==")
        run = getattr(suite, "run_suite", common.run_suite)   # a suite may time its cases its own way (host)
        suite_records = run(suite.cases(device, args.quick), device)
        for r in suite_records:
            r["suite"] = name
        records += suite_records
        summarize = getattr(suite, "summarize", None)  # an optional per-suite table (e.g. speedups vs peers)
        if summarize is not None:
            print(summarize(suite_records))
    # The main job ends with the roofline view of llmkern's own kernels: how far each is from the device's bound.
    ours = [r for r in records if str(r["impl"]).startswith("llmkern") and (r["flops"] or r["bytes"])]
    if ours:
        print("\n== roofline summary (llmkern kernels) ==")
        print(common.summary_table(ours, common.device_roof(device)))
    if args.json:
        common.write_json(args.json, records, device, names)
        print(f"\nwrote {len(records)} records to {args.json}")
    if args.tuned_configs:
        path, count = tuning.write_winners(args.tuned_configs, device)
        print(f"\nwrote {count} tuned configs to {path}" if count else
              "\nno autotuned kernel ran on a GPU: no tuned configs to write")
    return 0


# ------------------------------------------------------------------------------------------------- check-compile
def _check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="sm_80,sm_90", help="comma-separated CUDA archs (default: sm_80,sm_90)")
    p.add_argument("--json", metavar="PATH", help="write a list of {kernel, config, arch, regs, spill_bytes, "
                                                  "smem_bytes, mma} records")
    p.add_argument("--filter", metavar="NAME", help="only kernels whose name contains NAME")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: all cores)")


def _check_run(args: argparse.Namespace) -> int:
    archs = []
    for a in args.arch.split(","):
        a = a.strip().lower().removeprefix("sm_")
        if a not in ("80", "90"):
            print(f"--arch: supported archs are sm_80 and sm_90, got {a!r}", file=sys.stderr)
            return 2
        archs.append(int(a))
    err = _missing_folder("--json", args.json)
    if err:
        print(f"llmkern check-compile: {err}", file=sys.stderr)
        return 2
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


# ------------------------------------------------------------------------------------------------------ roofline
def _positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def _roofline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="llama-3-8b",
                   help=f"model shape (default llama-3-8b; known: {', '.join(MODELS)})")
    p.add_argument("--device", help="device peaks from llmkern.perf.DEVICES (default h100 = "
                                    f"h100-sxm; known: {', '.join(perf.DEVICES)}); with --measure, the datasheet to "
                                    "print next to the measured roofs")
    p.add_argument("--measure", action="store_true",
                   help="measure this machine's roofs (the CUDA device if there is one, else the CPU: copy "
                        "bandwidth, STREAM on CPU, and the matmul rate; llmkern.measure), print them next to the "
                        "datasheet's, and use them for the step times")
    p.add_argument("--batch", type=_positive_int, default=16, help="sequences per step (default 16)")
    p.add_argument("--context", type=_positive_int, default=4096, help="tokens per sequence (default 4096)")
    p.add_argument("--bits", type=int, choices=(4, 8, 16), default=16,
                   help="weight bits of the decoder's linear layers (default 16 = bf16)")
    p.add_argument("--group-size", type=int, choices=quant_weight.SUPPORTED_GROUPS, default=None,
                   help=f"quantization group size with --bits 4/8, one quantize_weight supports (-1: one group per "
                        f"output channel; default {roofline.DEFAULT_GROUP})")
    p.add_argument("--kv-dtype", choices=tuple(roofline.KV_DTYPE_BYTES), default="bf16",
                   help="KV cache dtype (default bf16; fp8: PagedKVCache with float8_e4m3fn/e5m2, half the bytes)")
    p.add_argument("--plot", metavar="PATH", help="draw the roofline chart to PATH (needs matplotlib)")
    p.add_argument("--bench-json", metavar="FILE", help="with --plot: place each record of this `llmkern bench "
                                                        "--json` file as a measured point")


def _roofline_run(args: argparse.Namespace) -> int:
    try:
        model = get_model(args.model)
        datasheet = perf.resolve_device(args.device or "h100") if args.device or not args.measure else None
    except ValueError as e:
        print(f"llmkern roofline: {e}", file=sys.stderr)
        return 2
    bits = None if args.bits == 16 else args.bits
    if args.group_size is None:
        args.group_size = roofline.DEFAULT_GROUP
    elif bits is None:
        print("llmkern roofline: --group-size needs --bits 4 or 8 (16-bit weights have no groups)", file=sys.stderr)
        return 2
    peak = datasheet
    if args.measure:
        measured = measure.measure_roofs()
        datasheet = datasheet or perf.device_peak(common.bench_device())
        print(f"measured roofs: {measured.describe()}\n  ({measured.method})")
        print("datasheet: " + (f"{datasheet.name}: {datasheet.hbm_gbps:.0f} GB/s, {datasheet.tensor_tflops:.1f} dense "
                               f"bf16 tensor TFLOP/s, fp32 {datasheet.fp32_tflops:.1f} ({datasheet.source})"
                               if datasheet else "none (a CPU has no datasheet entry in llmkern.perf.DEVICES)") + "\n")
        peak = measured.as_peak()
    try:   # the plot's inputs are checked before the report is printed: a bad one is a one-line error
        records = _plot_records(args)
    except ValueError as e:
        print(f"llmkern roofline: {e}", file=sys.stderr)
        return 2
    kv_elem = roofline.KV_DTYPE_BYTES[args.kv_dtype]
    print(roofline.report(model, peak, args.batch, args.context, bits, args.group_size, args.kv_dtype))
    if args.plot:
        steps = [(f"{model.name} prefill", roofline.prefill_step(model, args.batch, args.context, bits,
                                                                 args.group_size, kv_elem)),
                 (f"{model.name} decode", roofline.decode_step(model, args.batch, args.context, bits,
                                                               args.group_size, kv_elem))]
        try:
            placed = roofline.plot(args.plot, peak, steps, records)
        except (RuntimeError, OSError) as e:
            print(f"llmkern roofline: {e}", file=sys.stderr)
            return 2
        skipped = len(records) - placed
        note = f" ({skipped} records without FLOPs not placed)" if skipped else ""
        print(f"\nwrote {args.plot}: roofline with {len(steps)} model steps and {placed} measured points{note}")
    return 0


def _plot_records(args: argparse.Namespace) -> list[dict]:
    """The `llmkern bench --json` records to place on the --plot chart (none without --bench-json). ValueError for
    --bench-json without --plot, a --plot path whose folder does not exist, or a file that is not a bench JSON (an
    object whose "records" is a list of objects)."""
    if args.bench_json and not args.plot:
        raise ValueError("--bench-json needs --plot PATH")
    err = _missing_folder("--plot", args.plot)
    if err:
        raise ValueError(err)
    if not args.bench_json:
        return []
    try:
        with open(args.bench_json) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"--bench-json: cannot read {args.bench_json}: {e}") from None
    records = data.get("records") if isinstance(data, dict) else None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"--bench-json: {args.bench_json} is not an `llmkern bench --json` file (no list of records)")
    return records


# ----------------------------------------------------------------------------------------------------- build-ext
def _build_ext_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true", help="show the compiler commands and output")


def _build_ext_run(args: argparse.Namespace) -> int:
    cached = cpu.plan().done.is_file()
    t0 = time.perf_counter()
    try:
        b = cpu.build(verbose=args.verbose)
    except cpu.BuildError as e:
        print(f"llmkern build-ext: the C++ CPU backend could not be built: {e.cause}", file=sys.stderr)
        if e.log is not None:
            print(f"  build log: {e.log}", file=sys.stderr)
        return 1
    what = "already built (cached)" if cached else f"built in {time.perf_counter() - t0:.1f} s"
    print(f"llmkern C++ CPU backend {what}\n  library:   {b.library}\n  compiled:  {cpu.build_info()}\n"
          f"  flags:     {' '.join(b.cflags)}\n  build log: {b.log}")
    return 0


# ---------------------------------------------------------------------------------------------------------- main
# name -> (add its arguments, run it, help line)
SUBCOMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {
    "bench": (_bench_args, _bench_run, "run benchmark suites on the present device"),
    "check-compile": (_check_args, _check_run, "compile every kernel config for sm_80/sm_90 and check spills, smem, "
                                               "MMA"),
    "roofline": (_roofline_args, _roofline_run, "lowest possible prefill/decode time of a model on a device, and the "
                                                "bound that sets it"),
    "build-ext": (_build_ext_args, _build_ext_run, "build the C++ CPU backend now (it is otherwise built on first use) "
                                                   "and say where"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmkern", description="llmkern: verified Triton kernels for LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, _, help_text) in SUBCOMMANDS.items():
        add_args(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    return SUBCOMMANDS[args.command][1](args)


if __name__ == "__main__":
    sys.exit(main())
