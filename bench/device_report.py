"""Reading a GPU-day run back: llmkern against its best peer per shape, the test and sanitizer outcome, the final
table, the markdown summary and the roofline figure. Pure functions of the run's files; bench/device_run.py writes
them and bench/results_table.py turns committed runs into the README's table with the same comparison.

A record is "ours" when its impl names llmkern (llmkern, llmkern_int4_g128, transformers_llmkern, ...); its peers
are the other impls of the same op and shape (shape keys that only describe the weight format, bits and group, are
left out, so int4 and bf16 matmuls of one shape compare). Speedup = best peer's time / ours (> 1: llmkern faster).
"""
from __future__ import annotations

import math
import re
import statistics
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from llmkern.bench.pytest_deadline import SKIP_REASON

FORMAT_KEYS = ("bits", "group")      # describe an implementation's weights, not the problem
TABLE_LIMIT = 10_000                 # characters: the final table must fit the device tool's reply


def is_ours(impl: str) -> bool:
    return "llmkern" in impl


def problem_key(r: dict[str, Any]) -> tuple:
    return (r["op"],) + tuple(sorted((k, str(v)) for k, v in r["shape"].items() if k not in FORMAT_KEYS))


@dataclass
class Row:
    """One llmkern record against the fastest peer of the same problem."""
    suite: str
    op: str
    shape: str
    impl: str
    ms: float
    peer: str | None
    peer_ms: float | None
    pct_measured: float | None
    pct_datasheet: float | None

    @property
    def speedup(self) -> float | None:
        return self.peer_ms / self.ms if self.peer_ms else None


def _varying_keys(records: Sequence[dict]) -> list[str]:
    """Shape keys whose values differ within these records: the ones worth printing."""
    keys: dict[str, set] = {}
    for r in records:
        for k, v in r["shape"].items():
            keys.setdefault(k, set()).add(str(v))
    return [k for k, vals in keys.items() if len(vals) > 1 and k not in FORMAT_KEYS]


def compare(records: Sequence[dict]) -> list[Row]:
    """A Row per llmkern record, in record order, each with its best peer (None when no peer ran)."""
    peers: dict[tuple, dict] = {}
    for r in records:
        if not is_ours(r["impl"]):
            key = problem_key(r)
            if key not in peers or r["median_ms"] < peers[key]["median_ms"]:
                peers[key] = r
    by_suite: dict[str, list[dict]] = {}
    for r in records:
        by_suite.setdefault(r.get("suite", r["op"]), []).append(r)
    rows = []
    for suite, recs in by_suite.items():
        shown = _varying_keys(recs)
        for r in recs:
            if not is_ours(r["impl"]):
                continue
            peer = peers.get(problem_key(r))
            shape = " ".join(f"{k}={r['shape'][k]}" for k in shown if k in r["shape"])
            rows.append(Row(suite, r["op"], shape, r["impl"], r["median_ms"], peer and peer["impl"],
                            peer and peer["median_ms"], r.get("pct_measured_roof"), r.get("pct_roofline")))
    return rows


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}%"


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


# --------------------------------------------------------------------------------------------- tests, sanitizer
def junit_outcome(path: str, log_text: str = "") -> dict[str, Any]:
    """Counts and failed test ids from a pytest junit XML; `collected` from the pytest log's "[N items]" (xdist)
    or "collected N items", so tests cut off by the time cap show as not run."""
    out: dict[str, Any] = {"collected": None}
    m = re.search(r"\[(\d+) items?\]", log_text) or re.search(r"collected (\d+) items?", log_text)
    if m:
        out["collected"] = int(m.group(1))
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        out["error"] = f"no junit report ({type(e).__name__})"
        return out
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    for key in ("tests", "failures", "errors", "skipped"):
        out[key] = sum(int(s.get(key, 0)) for s in suites)
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    out["not_run"] = sum(SKIP_REASON in (s.get("message") or "") for s in root.iter("skipped"))
    failed = []
    for case in root.iter("testcase"):
        bad = case.find("failure")
        bad = bad if bad is not None else case.find("error")
        if bad is not None:
            test_id = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
            failed.append({"test": test_id, "message": (bad.get("message") or "").strip().splitlines()[:1]})
    out["failed"] = failed
    return out


def sanitizer_outcome(log_text: str) -> dict[str, Any]:
    """compute-sanitizer's "ERROR SUMMARY: N errors" and the first distinct error lines."""
    m = re.findall(r"ERROR SUMMARY: (\d+) error", log_text)
    errors = [ln.strip("= ").strip() for ln in log_text.splitlines()
              if re.match(r"=+ (Invalid|Program hit|Uninitialized|Race|Barrier|Leaked)", ln)]
    return {"errors": int(m[-1]) if m else None, "first": list(dict.fromkeys(errors))[:5]}


# ------------------------------------------------------------------------------------------------ text summary
def _stage_lines(stages: Sequence[dict]) -> list[str]:
    lines = [f"{'stage':<10} {'outcome':<10} {'s':>5}  note"]
    for s in stages:
        lines.append(f"{s['name']:<10} {s['status']:<10} {s['seconds']:>5}  {s.get('note', '')}"[:120].rstrip())
    return lines


def tests_line(t: dict[str, Any]) -> str:
    if "tests" not in t:
        return f"tests: {t.get('error', 'no report')}"
    not_run = t.get("not_run", 0) + max(0, (t.get("collected") or 0) - t["tests"])   # skipped at, or cut by, the cap
    return (f"tests: {t['passed']} passed, {t['failures']} failed, {t['errors']} errors, "
            f"{t['skipped'] - t.get('not_run', 0)} skipped, {not_run} not run (time cap) of "
            f"{t['collected'] or t['tests']}")


def sanitizer_line(s: dict[str, Any]) -> str:
    if s.get("note"):
        return f"sanitizer: {s['note']}"
    if s.get("errors") is None:
        return "sanitizer: no ERROR SUMMARY in its log (see sanitizer.log)"
    first = f"; first: {s['first'][0]}" if s.get("first") else ""
    return f"sanitizer: memcheck {s['errors']} errors{first}"


def roof_line(env: dict[str, Any], roof: dict[str, Any] | None) -> str:
    if not roof:
        return "measured roofs: none (the env+roofs stage failed)"
    peak = env.get("peak")
    sheet = ""
    if peak:
        sheet = (f" = {100 * roof['copy_gbps'] / peak['hbm_gbps']:.0f}% / "
                 f"{100 * roof['matmul_tflops'] / peak['tensor_tflops']:.0f}% of the datasheet's "
                 f"{peak['hbm_gbps']:.0f} GB/s / {peak['tensor_tflops']:g} TFLOP/s")
    return (f"measured roofs: copy {roof['copy_gbps']:.4g} GB/s (read+write), {roof['matmul_dtype']} matmul "
            f"{roof['matmul_tflops']:.4g} TFLOP/s, fp32 {roof['fp32_tflops']:.4g}{sheet}")


def text_table(run: dict[str, Any], limit: int = TABLE_LIMIT) -> str:
    """The table printed last: stages, tests, sanitizer, roofs, then llmkern vs its best peer per shape."""
    env = run.get("environment", {})
    head = [f"llmkern device run: {env.get('device', '?')} | torch {env.get('torch', '?')} triton "
            f"{env.get('triton', '?')} | {env.get('date', '?')} | commit {str(env.get('git_commit'))[:12]}"]
    if not env.get("sm_count"):
        head.append("no GPU: the numbers below show that every stage runs, not how fast llmkern is")
    head += _stage_lines(run.get("stages", []))
    head += [tests_line(run.get("tests", {})), sanitizer_line(run.get("sanitizer", {})),
             roof_line(env, run.get("measured_roof"))]
    failed = run.get("tests", {}).get("failed", [])
    head += [f"  FAILED {f['test']}"[:120] for f in failed[:8]] + ([f"  ... {len(failed) - 8} more"] if failed[8:] else [])
    bench = run.get("bench", {})
    head.append(f"bench: {len(run.get('records', []))} records, {len(bench.get('errors', []))} errors, "
                f"{len(bench.get('skipped', []))} skipped (time budget)")
    head += [f"  ERROR {e['case']}: {e['error']}"[:120] for e in bench.get("errors", [])[:5]]
    head += ["", f"{'suite':<10} {'llmkern records':>15}  {'vs best peer: geomean (min - max)':<36} "
                 f"% of measured roof: median (best)"]
    for s in suite_summary(run.get("records", [])):
        spread = f"{_x(s['geomean'])} ({_x(s['min'])} - {_x(s['max'])})"
        head.append(f"{s['suite']:<10} {s['rows']:>15}  {spread:<36} {_pct(s['pct_median'])} ({_pct(s['pct_max'])})")
    cols = f"{'op':<17} {'shape':<22} {'impl':<20} {'ms':>9} {'best peer':<17} {'x':>6} {'%meas':>6} {'%sheet':>6}"
    lines = head + ["", cols]
    for r in compare(run.get("records", [])):
        lines.append(f"{r.op[:17]:<17} {r.shape[:22]:<22} {r.impl[:20]:<20} {r.ms:>9.4f} {str(r.peer or '-')[:17]:<17} "
                     f"{_x(r.speedup):>6} {_pct(r.pct_measured):>6} {_pct(r.pct_datasheet):>6}")
    lines.append("x = best peer's time / llmkern's (> 1: llmkern faster); %meas / %sheet = roofline floor / time "
                 "with the measured / datasheet roofs")
    text, out = "", []
    for i, ln in enumerate(lines):
        if len(text) + len(ln) + 80 > limit:
            out.append(f"... {len(lines) - i} more lines in summary.md")
            break
        out.append(ln)
        text += ln + "\n"
    return "\n".join(out)


# -------------------------------------------------------------------------------------------------- markdown
def _md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def markdown(run: dict[str, Any]) -> str:
    env = run.get("environment", {})
    md = [f"# llmkern device run: {env.get('device', '?')}", "",
          f"{env.get('date', '?')}, commit `{env.get('git_commit')}`; python {env.get('python')}, torch "
          f"{env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, driver {env.get('driver', '?')}, "
          f"{env.get('sm_count', '?')} SMs; peers: {env.get('peers', {})}", "", "## Stages", ""]
    md += _md_table(["stage", "outcome", "seconds", "note"],
                    [(s["name"], s["status"], s["seconds"], s.get("note", "")) for s in run.get("stages", [])])
    md += ["", f"- {tests_line(run.get('tests', {}))}", f"- {sanitizer_line(run.get('sanitizer', {}))}",
           f"- {roof_line(env, run.get('measured_roof'))}", ""]
    failed = run.get("tests", {}).get("failed", [])
    if failed:
        md += ["## Failed tests", ""] + [f"- `{f['test']}`: {' '.join(f['message'])}" for f in failed] + [""]
    md += ["## llmkern against the best peer", ""]
    md += _md_table(["suite", "op", "shape", "impl", "ms", "best peer", "peer ms", "speedup", "% measured roof",
                     "% datasheet roof"],
                    [(r.suite, r.op, r.shape, r.impl, f"{r.ms:.4f}", r.peer or "-",
                      "-" if r.peer_ms is None else f"{r.peer_ms:.4f}", _x(r.speedup), _pct(r.pct_measured),
                      _pct(r.pct_datasheet)) for r in compare(run.get("records", []))])
    md += ["", "## Every record", ""]
    md += _md_table(["suite", "op", "impl", "shape", "ms", "TFLOP/s", "GB/s", "bound", "% measured", "% datasheet",
                     "note"],
                    [(r.get("suite"), r["op"], r["impl"], " ".join(f"{k}={v}" for k, v in r["shape"].items()),
                      f"{r['median_ms']:.4f}", f"{r['tflops']:.2f}", f"{r['gbps']:.1f}", r.get("bound") or "-",
                      _pct(r.get("pct_measured_roof")), _pct(r.get("pct_roofline")), r.get("note", ""))
                     for r in run.get("records", [])])
    bench = run.get("bench", {})
    if bench.get("errors") or bench.get("skipped"):
        md += ["", "## Cases that did not produce a record", ""]
        md += [f"- error: `{e['case']}`: {e['error']}" for e in bench.get("errors", [])]
        md += [f"- skipped (time budget): `{c}`" for c in bench.get("skipped", [])]
    return "\n".join(md) + "\n"


def suite_summary(records: Sequence[dict]) -> list[dict[str, Any]]:
    """Per suite: shapes compared, geometric-mean / min / max speedup over the best peer, median and max % of the
    measured roof (the README's "What was measured" table)."""
    out = []
    by_suite: dict[str, list[Row]] = {}
    for row in compare(records):
        by_suite.setdefault(row.suite, []).append(row)
    for suite, rows in by_suite.items():
        speedups = [r.speedup for r in rows if r.speedup]
        pcts = [r.pct_measured for r in rows if r.pct_measured is not None]
        out.append({"suite": suite, "rows": len(rows),
                    "geomean": math.exp(statistics.fmean(math.log(s) for s in speedups)) if speedups else None,
                    "min": min(speedups, default=None), "max": max(speedups, default=None),
                    "pct_median": statistics.median(pcts) if pcts else None, "pct_max": max(pcts, default=None)})
    return out


# ---------------------------------------------------------------------------------------------------- figure
def plot(path: str, run: dict[str, Any]) -> int:
    """Two panels. Left: the roofline (FLOP/byte vs TFLOP/s), datasheet roofs solid, measured roofs dashed, every
    record that does FLOPs placed at its achieved rate. Right: the records with no FLOPs to speak of (norms, RoPE,
    sampling), achieved GB/s against the measured copy bandwidth and the datasheet's. llmkern filled, peers hollow,
    one colour per suite. Returns the number of records placed (all of them)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = run.get("records", [])
    env, roof = run.get("environment", {}), run.get("measured_roof")
    roofs = []   # (label, GB/s, tensor TFLOP/s, style)
    if env.get("peak"):
        p = env["peak"]
        roofs.append((f"datasheet ({p['name']})", p["hbm_gbps"], p["tensor_tflops"], "-"))
    if roof:
        roofs.append(("measured", roof["copy_gbps"], roof["matmul_tflops"], "--"))
    suites = list(dict.fromkeys(r.get("suite", r["op"]) for r in records))
    colour = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(suites)}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 6), gridspec_kw={"width_ratios": [3, 2]})

    compute = [r for r in records if r["flops"] > 0 and r["bytes"] > 0]
    memory = [r for r in records if not (r["flops"] > 0 and r["bytes"] > 0)]
    xs = [r["flops"] / r["bytes"] for r in compute] or [1.0]
    lo, hi = min(xs) / 4, max(xs + [1e3]) * 4
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    for label, gbps, tflops, style in roofs:
        ax.plot(grid, [min(tflops, x * gbps / 1e3) for x in grid], style, color="black", lw=1.2,
                label=f"{label}: {gbps:.4g} GB/s, {tflops:.4g} TFLOP/s")
    seen = set()
    for r in compute:
        s, ours = r.get("suite", r["op"]), is_ours(r["impl"])
        key = (s, ours)
        ax.scatter(r["flops"] / r["bytes"], r["tflops"], s=36, color=colour[s], edgecolors=colour[s],
                   facecolors=colour[s] if ours else "none", label=None if key in seen else
                   f"{s}: {'llmkern' if ours else 'peers'}")
        seen.add(key)
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP / byte)", ylabel="TFLOP/s",
           title=f"Roofline: {env.get('device', '?')}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")

    for i, r in enumerate(memory):
        s, ours = r.get("suite", r["op"]), is_ours(r["impl"])
        bx.scatter(i, r["gbps"], s=36, color=colour[s], facecolors=colour[s] if ours else "none",
                   label=None if (s, ours) in seen else f"{s}: {'llmkern' if ours else 'peers'}")
        seen.add((s, ours))
    for label, gbps, _, style in roofs:
        bx.axhline(gbps, linestyle=style, color="black", lw=1.2, label=f"{label}: {gbps:.4g} GB/s")
    bx.set(yscale="log", xlabel="record (norms, RoPE, sampling: no FLOPs counted)", ylabel="GB/s",
           title="Memory-bound ops: achieved bandwidth")
    bx.grid(True, which="both", alpha=0.3)
    if memory or roofs:
        bx.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return len(compute) + len(memory)
