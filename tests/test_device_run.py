"""The GPU-day run (bench/device_run.sh) without a GPU: its dry run end to end, the device sweep's selection, the
measured roofs, the run report, and the README's results table kept in sync with bench/results/."""
import json
import os
import shutil
import subprocess
import sys
import time
import types
from collections import Counter
from pathlib import Path

import pytest
import torch

from llmkern import measure, perf
from llmkern.bench import device, device_report, results_table
from llmkern.bench.pytest_deadline import SKIP_REASON

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = {"records.json", "summary.md", "roofline.png", "junit.xml", "pytest.log", "sanitizer.log", "run.log"}


@pytest.mark.skipif(shutil.which("timeout") is None or shutil.which("bash") is None, reason="needs bash and timeout")
@pytest.mark.skipif(torch.cuda.is_available(), reason="CI's check of the CPU dry run; on a GPU the real run is made")
def test_dry_run_runs_every_stage(tmp_path):
    """About 35 CPU-seconds: under a minute on 2 idle cores, inside the script's own 3-minute limit. On a machine
    oversubscribed by other processes (load average above twice the cores) the limits stretch by that factor: what
    is checked there is that every stage works, not how long a crowded machine takes."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    slack = min(4, max(1, int(os.getloadavg()[0] / (2 * (os.cpu_count() or 1)))))
    env.update(PYTHON=sys.executable, LLMKERN_DRY_RUN_SLACK=str(slack))
    res = subprocess.run(["bash", "bench/device_run.sh", "--dry-run", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=240 * slack)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    files = {p.name for p in tmp_path.iterdir()}
    assert OUTPUTS <= files and len(files) <= 8, files        # the device tool brings back at most 8 files
    run = json.loads((tmp_path / "records.json").read_text())
    assert [s["name"] for s in run["stages"]] == ["install", "env", "tests", "sanitizer", "bench"]
    assert all(s["status"] == "ok" for s in run["stages"]), run["stages"]
    assert run["tests"]["passed"] == 3 and run["tests"]["failed"] == []
    assert run["measured_roof"]["copy_gbps"] > 0 and run["measured_roof"]["matmul_tflops"] > 0
    assert {r["suite"] for r in run["records"]} == set(device.SUITES)
    assert not run["bench"]["errors"] and not run["bench"]["skipped"]
    assert run["bench"]["restarts"] == 1                       # the dry run's simulated lost CUDA context
    assert len({r["case"] for r in run["records"]}) == len(run["records"])   # the restart repeated no case
    assert all(r["pct_measured_roof"] is not None for r in run["records"] if r["bytes"])
    # the summary table is printed last, and fits the device tool's reply
    table = res.stdout[res.stdout.rindex("llmkern device run:"):]
    assert len(table) < device_report.TABLE_LIMIT and table.rstrip().endswith("datasheet roofs")
    assert "sanitize_ops" in (tmp_path / "sanitizer.log").read_text()


def test_tests_past_the_deadline_are_skipped_as_not_run(monkeypatch):
    from llmkern.bench import pytest_deadline
    monkeypatch.delenv("LLMKERN_TEST_DEADLINE", raising=False)
    pytest_deadline.pytest_runtest_setup(None)                 # no deadline: runs
    monkeypatch.setenv("LLMKERN_TEST_DEADLINE", str(time.time() + 60))
    pytest_deadline.pytest_runtest_setup(None)                 # before it: runs
    monkeypatch.setenv("LLMKERN_TEST_DEADLINE", str(time.time() - 1))
    with pytest.raises(pytest.skip.Exception, match="time cap"):
        pytest_deadline.pytest_runtest_setup(None)


def test_device_sweep_selects_the_issue_shapes(monkeypatch):
    """On CUDA the sweep keeps exactly the shapes it promises (listing cases allocates nothing)."""
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=141e9))
    cuda = torch.device("cuda")
    shapes = {name: Counter() for name in device.SUITES}
    for name in device.SUITES:
        for case in device.suite_cases(name, cuda):
            s = case.shape
            key = {"attention": lambda: (s["seqlen"], s["batch"]), "decode": lambda: (s.get("batch", case.op), s["context"]),
                   "quant": lambda: (s["M"], s["N"], s["K"]), "sampling": lambda: (s["batch"], s["vocab"]),
                   "layers": lambda: case.op, "e2e": lambda: (case.op, s["batch"])}[name]()
            shapes[name][key] += 1
    assert set(shapes["attention"]) == {(1024, 16), (4096, 4), (16384, 1)}
    assert set(shapes["decode"]) == {(b, c) for b in (1, 16, 64) for c in (1024, 8192, 32768)} | {
        ("mixed_attention", 2048)}
    mla = {(c.shape["heads"], c.shape["batch"]) for c in device.suite_cases("decode", cuda) if c.op == "mla_decode"}
    assert mla == {(h, b) for h in (128, 16) for b in (1, 64)}   # many heads (compute-bound) and few (memory-bound)
    assert {m for m, _, _ in shapes["quant"]} == {1, 16, 128} and len(shapes["quant"]) == 12
    assert set(shapes["sampling"]) == {(1, 128256), (64, 128256), (256, 128256)}
    assert set(shapes["layers"]) == {"rmsnorm", "add_rmsnorm", "rope"}
    assert set(shapes["e2e"]) == {("e2e_decode", 1), ("e2e_decode", 16)}
    impls = {c.impl for n in ("attention", "quant", "layers") for c in device.suite_cases(n, cuda)}
    assert {"torch_sdpa_flash", "torch_sdpa_cudnn", "torch_bf16", "torch_compile"} <= impls


def test_measured_roof_and_annotate():
    roof = measure.measure_roofs("cpu", copy_bytes=1 << 20, matmul_n=64, reps=2)
    assert roof.copy_gbps > 0 and roof.matmul_tflops > 0 and roof.matmul_dtype == "float32"
    assert measure.MeasuredRoof.from_dict(roof.to_dict()) == roof
    with pytest.raises(ValueError, match="matmul_n"):
        measure.measure_roofs("cpu", matmul_n=0)
    fixed = measure.MeasuredRoof("H", copy_gbps=4000.0, matmul_tflops=800.0, matmul_dtype="bfloat16",
                                 fp32_tflops=50.0, copy_bytes=1, matmul_n=1, method="test")
    recs = [{"median_ms": 2.0, "flops": 0.0, "bytes": 4e9},                           # 1 ms at 4000 GB/s
            {"median_ms": 2.0, "flops": 8e11, "bytes": 1e6, "tensor_cores": True},    # 1 ms at 800 TFLOP/s
            {"median_ms": 2.0, "flops": 5e10, "bytes": 1e6, "tensor_cores": False},   # 1 ms at 50 TFLOP/s
            {"median_ms": 1.0, "flops": 0.0, "bytes": 0.0}]
    measure.annotate(recs, fixed)
    assert [r["pct_measured_roof"] for r in recs[:3]] == pytest.approx([50.0, 50.0, 50.0])
    assert recs[3]["pct_measured_roof"] is None
    assert fixed.as_peak().hbm_gbps == 4000.0 and perf.roofline(0, 4e9, fixed.as_peak()).time_s == pytest.approx(1e-3)


def _rec(op, impl, ms, suite="s", **shape):
    return {"suite": suite, "op": op, "impl": impl, "shape": shape, "median_ms": ms, "flops": 1e9, "bytes": 1e6,
            "tflops": 1.0, "gbps": 1.0, "pct_roofline": 10.0, "pct_measured_roof": 12.0}


def test_report_compares_with_the_best_peer_and_fits_the_reply(tmp_path):
    recs = [_rec("mm", "torch_bf16", 2.0, M=1, bits=16), _rec("mm", "llmkern_int4_g128", 1.0, M=1, bits=4),
            _rec("mm", "torchao", 1.5, M=1, bits=4), _rec("mm", "llmkern_int4_g128", 1.0, M=2, bits=4)]
    rows = device_report.compare(recs)
    assert [(r.shape, r.peer, r.speedup) for r in rows] == [("M=1", "torchao", 1.5), ("M=2", None, None)]
    junit = tmp_path / "j.xml"
    junit.write_text('<testsuites><testsuite tests="4" failures="1" errors="0" skipped="2">'
                     '<testcase classname="tests.test_x" name="test_a"><failure message="boom"/></testcase>'
                     '<testcase classname="tests.test_x" name="test_b"><skipped message="no GPU"/></testcase>'
                     f'<testcase classname="tests.test_x" name="test_c"><skipped message="{SKIP_REASON}"/>'
                     '</testcase></testsuite></testsuites>')
    t = device_report.junit_outcome(str(junit), "8 workers [6 items]")
    assert (t["passed"], t["collected"], t["failed"][0]["test"]) == (1, 6, "tests/test_x.py::test_a")
    assert "1 skipped, 3 not run (time cap) of 6" in device_report.tests_line(t)   # 1 at the cap, 2 cut off
    assert device_report.sanitizer_outcome("========= Invalid __global__ read of size 2\n"
                                           "========= ERROR SUMMARY: 3 errors\n")["errors"] == 3
    many = [_rec("op", "llmkern", 1.0, n=i) for i in range(1000)]
    assert len(device_report.text_table({"records": many})) < device_report.TABLE_LIMIT


def test_readme_results_table_matches_committed_runs(tmp_path):
    assert results_table.main(["--check"]) == 0, "run: python bench/results_table.py --write"
    run_dir = tmp_path / "2026-12-03-h200"
    run_dir.mkdir()
    recs = [_rec("mm", "torch_bf16", 2.0, suite="quant", M=1), _rec("mm", "llmkern", 1.0, suite="quant", M=1)]
    (run_dir / "records.json").write_text(json.dumps({"environment": {"device": "NVIDIA H200"}, "records": recs}))
    text = results_table.table(results_table.load_runs(str(tmp_path)))
    assert "| 2026-12-03-h200 | quant | 1 | 2.00x (2.00 - 2.00) | 12.0% (12.0%) |" in text
