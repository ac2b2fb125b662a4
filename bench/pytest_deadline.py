"""A pytest plugin for time-boxed runs (bench/device_run.sh's test stage):

    LLMKERN_TEST_DEADLINE=<unix time> python -m pytest -p llmkern.bench.pytest_deadline ...

Every test that would start after the deadline is skipped with the reason SKIP_REASON instead of run, so the session
drains in seconds and ends on its own, junit XML written, before an outer `timeout` has to kill it (a killed pytest
writes no report). xdist workers read the same variable. The run's report counts these skips as "not run (time
cap)", apart from the suite's own skips. Without the variable the plugin does nothing.
"""
import os
import time

SKIP_REASON = "not run: the time cap of a time-boxed run (LLMKERN_TEST_DEADLINE)"


def pytest_runtest_setup(item):
    deadline = os.environ.get("LLMKERN_TEST_DEADLINE")
    if deadline and time.time() > float(deadline):
        import pytest        # here, so that reading SKIP_REASON (bench/device_report.py) needs no pytest
        pytest.skip(SKIP_REASON)
