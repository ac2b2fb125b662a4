"""Registers and spills of every kernel build, now against a baseline commit: `llmkern check-compile` records matched
config by config (issue 10: the shared attention core must cost no registers or spills).

    git worktree add /tmp/base <commit>      # then a venv there with llmkern installed editable from it
    /tmp/base/.venv/bin/llmkern check-compile --arch sm_80,sm_90 --json base.json
    .venv/bin/llmkern check-compile --arch sm_80,sm_90 --json cur.json
    python bench/compare_compile.py base.json cur.json [--markdown OUT.md] [--same-warps]

A config is matched by its kernel role, dtype, head dim, GQA group, flags and arch. Kernels renamed since the
baseline (the house-core merge, 814b9aa, is compared with its first parent eba4b49) are mapped in `match_key`:
  * paged_decode (GROUP_PAD rows, SPLIT constexpr) -> paged_attention's decode tiles (BLOCK_Q 1): the same rows,
    BLOCK_N and head dim; the unified kernel compiles both epilogues (split partials and direct output) into every
    build, so "g4 d128" is compared with the old split build and "g4 d128 softcap+window" with the old direct one
    (the only old builds of each).
  * paged_prefill (one query head, BLOCK_M tokens) -> paged_attention's prefill tiles at every group: BLOCK_M rows
    are BLOCK_M // group tokens x group heads, the same row and key tile sizes as the old kernel's; "softcap+window"
    is compared with the old "full softcap+window" build (the new one also has the right bound: causal).
  * paged_decode_reduce -> paged_attention_reduce.
Builds with a feature the baseline lacks (fp8 cache, ALiBi, sinks, MLA, new kernels) have no baseline: they must not
spill (check-compile fails them otherwise) and are listed as new.

Where the number of warps changed, registers per thread are not comparable on their own: the table also gives
resident warps per SM as the register file allows (64K 32-bit registers and at most 64 warps an SM on sm_80 and
sm_90; registers are allocated per warp in units of 256, i.e. per thread rounded up to 8: CUDA occupancy
calculator). --same-warps rebuilds, in this checkout, each matched current build whose warp count differs from its
baseline's at the baseline's warps, and prints both (like-for-like: the same tile, the same warps).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys

REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64


def resident_warps(regs: int, warps: int) -> int:
    """Warps an SM can hold for a kernel of `regs` registers per thread and `warps` warps a block, as the register
    file allows (whole blocks only)."""
    per_warp = -(-regs // 8) * 8 * 32
    blocks = REGS_PER_SM // (per_warp * warps)
    return min(blocks * warps, MAX_WARPS_PER_SM // warps * warps)


def _warps(config: str) -> int | None:
    m = re.search(r"(?<![a-z])w(\d+)", config)
    return int(m.group(1)) if m else None


def match_key(rec: dict) -> tuple[str, str] | None:
    """(role, config without tile sizes) of a record, equal for a baseline build and its current counterpart; None
    for a current build with a feature no baseline has."""
    kernel, config = rec["kernel"], rec["config"]
    if kernel == "paged_decode":
        m = re.match(r"(\w+) g(\d+) d(\d+) (?:split|direct)( softcap\+window)? GP", config)
        return "paged decode tiles", f"{m[1]} g{m[2]} d{m[3]}{m[4] or ''}"
    if kernel == "paged_prefill":
        m = re.match(r"(\w+) d(\d+) (?:causal|full)( softcap\+window)? BM", config)
        return "paged prefill tiles", f"{m[1]} d{m[2]}{m[3] or ''}"
    if kernel == "paged_attention":
        if "<-" in config or "alibi" in config or "sinks" in config:
            return None
        m = re.match(r"(\w+) g(\d+) d(\d+) (decode|prefill)( softcap\+window)? BM", config)
        if m[4] == "decode":
            return "paged decode tiles", f"{m[1]} g{m[2]} d{m[3]}{m[5] or ''}"
        return "paged prefill tiles", f"{m[1]} d{m[3]}{m[5] or ''}"   # every group: the same 64 (fp32: 32) rows
    if kernel in ("paged_decode_reduce", "paged_attention_reduce"):
        return ("paged reduce", config) if "sinks" not in config else None
    if kernel == "attention_fwd" and ("alibi" in config or "sinks" in config):
        return None
    return kernel, config


def compare(base: list[dict], cur: list[dict]) -> list[dict]:
    """One row per current record: its baseline record (or None) and what got worse (registers, spills). MMA counts
    are listed, not judged: the SASS count is per warp, so it halves when the warps double, and it drops when a
    layout stops repeating a tile's MMAs in several warps."""
    by_key = {}
    for r in base:
        key = match_key(r)
        by_key[key + (r["arch"],)] = r
    rows = []
    for r in cur:
        key = match_key(r)
        b = by_key.get(key + (r["arch"],)) if key else None
        worse = []
        if b and r["regs"] is not None and b["regs"] is not None:
            if r["regs"] > b["regs"]:
                worse.append(f"regs +{r['regs'] - b['regs']}")
            if r["spill_bytes"] > b["spill_bytes"]:
                worse.append(f"spills +{r['spill_bytes'] - b['spill_bytes']} B")
        rows.append({"cur": r, "base": b, "worse": worse})
    return rows


def _occupancy(rec: dict) -> str:
    w = _warps(rec["config"])
    return "-" if w is None or rec["regs"] is None else str(resident_warps(rec["regs"], w))


def markdown(rows: list[dict]) -> str:
    matched = [x for x in rows if x["base"]]
    worse = [x for x in matched if x["worse"]]
    new = [x for x in rows if not x["base"]]
    fewer = [x for x in worse if _occupancy(x["cur"]) != "-" and _occupancy(x["base"]) != "-"
             and int(_occupancy(x["cur"])) < int(_occupancy(x["base"]))]
    lines = [f"{len(matched)} current builds matched to a baseline build, {len(worse)} with more registers or spills "
             f"({len(fewer)} of them with fewer resident warps per SM); {len(new)} builds without a baseline (new "
             f"features or kernels), {sum(1 for x in new if x['cur']['spill_bytes'])} of them spilling.", "",
             "| kernel | config (current) | arch | baseline config | regs | spills | resident warps/SM | MMAs | worse |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for x in matched:
        c, b = x["cur"], x["base"]
        lines.append(f"| {c['kernel']} | {c['config']} | {c['arch']} | {b['config']} | {b['regs']} -> {c['regs']} | "
                     f"{b['spill_bytes']} -> {c['spill_bytes']} | {_occupancy(b)} -> {_occupancy(c)} | "
                     f"{b['mma']} -> {c['mma']} | {', '.join(x['worse'])} |")
    return "\n".join(lines)


def same_warps(rows: list[dict]) -> list[str]:
    """Rebuild each matched current build whose warp count differs from its baseline's at the baseline's warps."""
    from llmkern import compile_check
    specs = {(s.name, s.config): s for s in compile_check.all_specs()}
    out = []
    for x in rows:
        c, b = x["cur"], x["base"]
        if not b or _warps(b["config"]) in (None, _warps(c["config"])):
            continue
        spec = specs[(c["kernel"], c["config"])]
        rec = compile_check.check_one(dataclasses.replace(spec, num_warps=_warps(b["config"])), int(c["arch"][3:]))
        out.append(f"{c['config']} {c['arch']}: at w{_warps(b['config'])} (baseline's) {rec['regs']} regs, "
                   f"{rec['spill_bytes']} B spilled (baseline {b['regs']}, {b['spill_bytes']}); "
                   f"at w{_warps(c['config'])} {c['regs']}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base")
    ap.add_argument("cur")
    ap.add_argument("--markdown", help="write the table to this file")
    ap.add_argument("--same-warps", action="store_true", help="rebuild changed-warp configs at the baseline's warps")
    args = ap.parse_args(argv)
    with open(args.base) as f, open(args.cur) as g:
        rows = compare(json.load(f), json.load(g))
    table = markdown(rows)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    print(table.splitlines()[0])
    for x in rows:
        if x["worse"]:
            print(f"  {x['cur']['kernel']} {x['cur']['config']} {x['cur']['arch']}: {', '.join(x['worse'])} "
                  f"(baseline {x['base']['config']}: {x['base']['regs']} regs)")
    if args.same_warps:
        print("\n".join(same_warps(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
