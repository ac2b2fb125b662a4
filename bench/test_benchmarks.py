"""The benchmark suites under pytest-benchmark, for users who keep benchmarks in pytest:

    pytest bench/ --benchmark-json PATH

Never part of the test command (tests/ is). Each case of each suite becomes one benchmark; the record llmkern's
own runner would write (FLOPs, bytes, % of roofline) is attached as extra_info.
"""
from __future__ import annotations

import importlib

import pytest

from llmkern.bench import SUITES, common

_DEVICE = common.bench_device()


def _all_cases():
    for name in SUITES:
        suite = importlib.import_module(f"llmkern.bench.{name}")
        for case in suite.cases(_DEVICE, quick=True):
            yield pytest.param(case, id=case.label)


@pytest.mark.parametrize("case", list(_all_cases()))
def test_benchmark(benchmark, case: common.Case):
    fn = case.make()
    if _DEVICE.type == "cuda":
        import torch

        def timed():
            fn()
            torch.cuda.synchronize()
        benchmark(timed)
    else:
        benchmark(fn)
    if benchmark.stats is not None:  # None under --benchmark-disable (the case then just runs once, as a smoke test)
        ms = benchmark.stats.stats.median * 1e3
        benchmark.extra_info.update(common.to_record(case, ms, _DEVICE))
