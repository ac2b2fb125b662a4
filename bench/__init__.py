"""llmkern benchmark suites (installed as llmkern.bench).

Each suite is a module here defining `cases(device, quick) -> Iterable[Case]` (see common.py). The CLI finds the
suites listed in SUITES, in this order.
"""
SUITES = ["attention", "quant", "e2e", "layers", "decode", "sampling", "moe", "host"]
