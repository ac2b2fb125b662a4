"""The README's "What was measured" table, made from the runs committed under bench/results/, so every published
number comes from a committed record.

    python bench/results_table.py            print the table (markdown)
    python bench/results_table.py --write    put it into README.md between the results-table markers
    python bench/results_table.py --check    exit 1 when README.md's table differs from the committed runs

Each run is a folder bench/results/<date>-<gpu>/ holding the records.json that bench/device_run.sh wrote. Per run:
the device, commit, test and sanitizer outcome and measured roofs; per suite: how many llmkern records, llmkern's
speedup over the best peer of the same shape (geometric mean, min and max; bench/device_report.py's comparison),
and the median and best % of the measured roof.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from llmkern.bench import device_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
README = os.path.join(ROOT, "README.md")
BEGIN, END = "<!-- results-table:begin -->", "<!-- results-table:end -->"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def load_runs(results: str = RESULTS) -> list[tuple[str, dict]]:
    """(folder name, records.json content) of every committed run, oldest first."""
    runs = []
    for path in sorted(glob.glob(os.path.join(results, "*", "records.json"))):
        with open(path) as f:
            runs.append((os.path.basename(os.path.dirname(path)), json.load(f)))
    return runs


def table(runs: list[tuple[str, dict]]) -> str:
    if not runs:
        return "No run has been committed to `bench/results/` yet: no GPU numbers to quote."
    out = ["| run | device | commit | tests | sanitizer | measured copy GB/s | measured matmul TFLOP/s |",
           "|---|---|---|---|---|---|---|"]
    for name, run in runs:
        env, roof = run.get("environment", {}), run.get("measured_roof") or {}
        tests = device_report.tests_line(run.get("tests", {})).removeprefix("tests: ")
        san = device_report.sanitizer_line(run.get("sanitizer", {})).removeprefix("sanitizer: ")
        out.append(f"| [{name}](bench/results/{name}/summary.md) | {env.get('device', '?')} | "
                   f"`{str(env.get('git_commit'))[:10]}` | {tests} | {san} | {_num(roof.get('copy_gbps'), '.0f')} | "
                   f"{_num(roof.get('matmul_tflops'), '.1f')} {roof.get('matmul_dtype', '')} |")
    out += ["", "| run | suite | llmkern records | vs best peer: geomean (min - max) | % of measured roof: median (best) |",
            "|---|---|---|---|---|"]
    for name, run in runs:
        for s in device_report.suite_summary(run.get("records", [])):
            spread = f"{_num(s['geomean'], '.2f')}x ({_num(s['min'], '.2f')} - {_num(s['max'], '.2f')})"
            out.append(f"| {name} | {s['suite']} | {s['rows']} | {spread} | {_num(s['pct_median'], '.1f')}% "
                       f"({_num(s['pct_max'], '.1f')}%) |")
    return "\n".join(out)


def with_table(readme: str, new: str) -> str:
    """README.md's text with the table between the markers replaced by `new`."""
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    return readme[:start] + "\n" + new + "\n" + readme[end:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help="write the table into README.md")
    g.add_argument("--check", action="store_true", help="fail when README.md's table is stale")
    args = p.parse_args(argv)
    new = table(load_runs())
    if not (args.write or args.check):
        print(new)
        return 0
    with open(README) as f:
        text = f.read()
    updated = with_table(text, new)
    if args.check:
        if updated != text:
            print("README.md's results table differs from bench/results/: run python bench/results_table.py --write",
                  file=sys.stderr)
            return 1
        return 0
    with open(README, "w") as f:
        f.write(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
