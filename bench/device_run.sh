#!/usr/bin/env bash
# GPU day: one command that installs, checks and measures llmkern on a lent GPU machine, in under 9 minutes.
#
#   bash bench/device_run.sh [--dry-run] [OUT_DIR]
#
# Run from the root of the tree that travels to the GPU machine (the README's "GPU day" section gives the device
# tool's call: command, carry, timeout). Output goes to OUT_DIR, else $OUT (the device tool's folder), else
# out/device-run, as at most 8 files, which is all the device tool brings back:
#   records.json   environment, measured roofs, stage outcomes, test and sanitizer outcome, benchmark records
#   summary.md     the same as tables; roofline.png  every record placed against the datasheet and measured roofs
#   junit.xml, pytest.log   the test suite on CUDA;  sanitizer.log  compute-sanitizer memcheck;  run.log  this console
# The last thing printed is the summary table (under 10,000 characters, so the device tool's reply holds it).
#
# Time plan. The device call has timeout_s=600; this script ends by DEADLINE=515 s after its start (at worst 540 s,
# when a stage must be killed 20 s after its cap). The machine's start (1-2 min) happens before the command and
# counts only against the lease.
#   stage       cap (s)  what
#   install        60    pip install --no-build-isolation --no-deps -e . ; .whl/*.whl into $WORK/site (PYTHONPATH)
#   env            45    GPU, SMs, driver, clocks, versions; measured roofs: copy GB/s (read+write), bf16 and fp32
#                        matmul TFLOP/s
#   tests         150    pytest tests -n 8 on CUDA tensors (LLMKERN_TEST_DEVICE=cuda), junit XML; tests that would
#                        start in the cap's last 30 s are skipped as "not run: time cap", so pytest ends on its own
#   sanitizer      75    compute-sanitizer memcheck over bench/sanitize_ops.py (every public op once at edge
#                        shapes); without a usable sanitizer the driver runs plain, with a note
#   bench         240    the `device` sweep (bench/device.py), deadline-aware: it starts no case after its budget
#                        and resumes after a lost CUDA context
#   summary        25    records.json, summary.md, roofline.png, the final table (always runs: reserved time)
# Each stage runs under `timeout`, its cap cut to the time left before the deadline (less the summary's reserve),
# and a failing stage never stops the next (no `set -e`).
#
# --dry-run runs every stage on the CPU with tiny shapes, so the script cannot rot between GPU days (a test runs it
# in CI on 2 cores): install becomes `pip install --dry-run` (the tree is already installed there), the test stage
# runs the few tests in TESTS, the sanitizer driver runs plain on CPU tensors (its calls against the API; the
# kernels' CPU checks are the test suite's), the sweep runs each suite's CPU cases; caps scale down so it ends in
# well under 3 minutes.
set -u
cd "$(dirname "$0")/.."

DRY=0
DEST=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
        -*) echo "device_run.sh: unknown option $arg" >&2; exit 2 ;;
        *) DEST="$arg" ;;
    esac
done
OUT_DIR="${DEST:-${OUT:-out/device-run}}"
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/llmkern-device-run.XXXXXX")"
PY="${PYTHON:-python3}"
export DRY OUT_DIR WORK PY PYTHONUNBUFFERED=1
unset TRITON_INTERPRET          # compiled kernels on the GPU; the dry run asks for the interpreter where it wants it

if [ "$DRY" = 1 ]; then
    # ~35 CPU-seconds in all; the caps leave each stage room for a busy machine, the deadline bounds the sum.
    # LLMKERN_DRY_RUN_SLACK=N (an integer >= 1) multiplies every time limit, for a machine shared by many processes.
    k=${LLMKERN_DRY_RUN_SLACK:-1}
    DEADLINE=$((170 * k)) RESERVE=$((20 * k)) TEST_MARGIN=$((10 * k))
    CAP_INSTALL=$((30 * k)) CAP_ENV=$((45 * k)) CAP_TESTS=$((60 * k)) CAP_SANITIZER=$((60 * k)) CAP_BENCH=$((90 * k))
    CAP_SUMMARY=$((20 * k))
    export LLMKERN_TEST_DEVICE=cpu DRY_FLAG=--dry-run CUDA_VISIBLE_DEVICES=   # the CPU, also on a GPU machine
    # A few fast tests that still go through conftest and the junit report (in-process: -n 0); never the suite.
    # The [interpreter] variants: the C++ ones would build the extension, which is CI's own step, not this script's.
    TESTS="tests/test_layers.py::test_rms_norm_strides_and_edges[interpreter]
           tests/test_layers.py::test_rope_bad_input[interpreter] tests/test_roofline.py::test_llama3_8b_sizes -n 0"
else
    DEADLINE=515 RESERVE=25 TEST_MARGIN=30
    CAP_INSTALL=60 CAP_ENV=45 CAP_TESTS=150 CAP_SANITIZER=75 CAP_BENCH=240 CAP_SUMMARY=25
    export LLMKERN_TEST_DEVICE=cuda DRY_FLAG=
    TESTS="tests -n 8"
fi
START=$(date +%s)
: > "$WORK/stages.tsv"

# capped CAP: CAP cut to the time left before the deadline, less the summary's reserve.
capped() {
    local left=$((DEADLINE - RESERVE - ($(date +%s) - START)))
    echo $(( $1 < left ? $1 : left ))
}

# stage NAME CAP COMMAND...: run under timeout (SIGINT first, so Python and pytest can write what they have, then
# SIGKILL 20 s later), the cap cut to the time left; record the outcome in $WORK/stages.tsv.
stage() {
    local name=$1 cap=$2
    shift 2
    [ "$name" = summary ] || cap=$(capped "$cap")
    if [ "$cap" -lt 5 ]; then
        printf '%s\tskipped\t0\tno time left before the deadline\n' "$name" >> "$WORK/stages.tsv"
        echo "== $name: skipped, no time left"
        return 0
    fi
    echo "== $name (cap ${cap} s, $(( $(date +%s) - START )) s into the run)"
    local t0=$(date +%s)
    timeout -s INT -k 20 "$cap" "$@"
    local rc=$? status note=""
    case $rc in
        0) status=ok ;;
        124|137) status=timeout; note="cut at its ${cap} s cap" ;;
        *) status=FAILED; note="exit code $rc" ;;
    esac
    [ -s "$WORK/$name.note" ] && note="${note:+$note; }$(head -c 300 "$WORK/$name.note" | tr '\t' ' ' | paste -sd';' -)"
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$note" >> "$WORK/stages.tsv"
    # the summary's table stays the last thing printed
    [ "$name" = summary ] || echo "== $name: $status in $(( $(date +%s) - t0 )) s${note:+ ($note)}"
}

# ---------------------------------------------------------------------------------------------------- install
install_stage() {
    "$PY" -m pip install -q --no-build-isolation --no-deps $DRY_FLAG -e . || {
        # Fallback: the package tree the install would map (setup.py's package_dir) as symlinks on PYTHONPATH.
        echo "pip install failed; using a symlinked package tree" | tee -a "$WORK/install.note"
        mkdir -p "$WORK/tree/llmkern" && ln -sf "$PWD"/python/llmkern/* "$WORK/tree/llmkern/" &&
            ln -sfn "$PWD/kernels" "$WORK/tree/llmkern/kernels" && ln -sfn "$PWD/bench" "$WORK/tree/llmkern/bench"
    }
    local wheels
    wheels=$(ls .whl/*.whl 2>/dev/null)
    if [ -z "$wheels" ]; then
        echo "no peer wheels in .whl/" >> "$WORK/install.note"
        return 0
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
        $wheels && echo "peer wheels: $(cd .whl && echo *.whl)" >> "$WORK/install.note"
}

# -------------------------------------------------------------------------------------------------- tests
# tests_stage CAP: tests that would start in the cap's last TEST_MARGIN s are skipped as "not run: time cap"
# (bench/pytest_deadline.py), so pytest ends on its own with its junit written; a test hung past 90 s fails
# (pytest-timeout, where installed); the cap's SIGINT is the last resort.
tests_stage() {
    local extra=
    "$PY" -c "import pytest_timeout" 2>/dev/null && extra="--timeout 90"
    # tee -i: the cap's SIGINT must reach pytest (which then writes its junit), not cut its output pipe
    LLMKERN_TEST_DEADLINE=$(( $(date +%s) + $1 - TEST_MARGIN )) "$PY" -m pytest $TESTS -q -rfE --durations=10 \
        -p no:cacheprovider -p no:benchmark -p llmkern.bench.pytest_deadline $extra \
        --junitxml="$OUT_DIR/junit.xml" 2>&1 | tee -i "$OUT_DIR/pytest.log"
    return "${PIPESTATUS[0]}"
}

# -------------------------------------------------------------------------------------------------- sanitizer
sanitizer_stage() {
    local san
    san="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer \
        /usr/local/cuda*/compute-sanitizer/compute-sanitizer 2>/dev/null | head -1)"
    if [ "$DRY" = 1 ] || [ -z "$san" ]; then
        echo "compute-sanitizer ${san:+not used in the dry run}${san:-not found}: the driver ran without it" \
            > "$WORK/sanitizer.note"
        "$PY" -m llmkern.bench.sanitize_ops 2>&1 | tee -i "$OUT_DIR/sanitizer.log"
        return "${PIPESTATUS[0]}"
    fi
    # Each tensor its own cudaMalloc, so a read past a tensor's end is outside an allocation (see sanitize_ops.py).
    # API errors are not reported: PyTorch probes the driver with calls that fail by design; a failing launch
    # raises in Python anyway. Memory access errors are what this stage looks for.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$san" --tool memcheck --target-processes application-only \
        --report-api-errors no --print-limit 20 --error-exitcode 17 "$PY" -m llmkern.bench.sanitize_ops 2>&1 |
        tee -i "$OUT_DIR/sanitizer.log"
    local rc=${PIPESTATUS[0]}
    if grep -q -E "Device not supported|Unable to (find|load|initialize)" "$OUT_DIR/sanitizer.log"; then
        echo "compute-sanitizer cannot run here (see sanitizer.log): the driver ran without it" > "$WORK/sanitizer.note"
        "$PY" -m llmkern.bench.sanitize_ops 2>&1 | tee -i -a "$OUT_DIR/sanitizer.log"
        return "${PIPESTATUS[0]}"
    fi
    return "$rc"
}

# -------------------------------------------------------------------------------------------------- bench sweep
# bench_stage CAP: the sweep's own budget leaves 20 s of the cap for the case in flight. Exit code 3 = the CUDA
# context was lost: start again with the finished cases kept (at most 3 restarts).
bench_stage() {
    local end=$(( $(date +%s) + $1 )) budget=$(( $1 - 20 )) resume= rc
    for attempt in 0 1 2 3; do
        [ "$budget" -lt 10 ] && budget=10
        "$PY" -m llmkern.bench.device_run sweep --work "$WORK" --out "$OUT_DIR" --budget-s "$budget" $DRY_FLAG \
            $resume
        rc=$?
        [ "$rc" -ne 3 ] && return "$rc"
        echo "restarted after a lost CUDA context" >> "$WORK/bench.note"
        resume=--resume
        budget=$(( end - $(date +%s) - 20 ))
    done
    return 3
}
export -f install_stage tests_stage sanitizer_stage bench_stage
export TESTS TEST_MARGIN

run_all() {
    stage install "$CAP_INSTALL" bash -c install_stage
    [ -d "$WORK/site" ] && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    [ -d "$WORK/tree" ] && export PYTHONPATH="$WORK/tree${PYTHONPATH:+:$PYTHONPATH}"
    stage env "$CAP_ENV" "$PY" -m llmkern.bench.device_run env --work "$WORK" $DRY_FLAG
    stage tests "$(capped "$CAP_TESTS")" bash -c "tests_stage $(capped "$CAP_TESTS")"
    stage sanitizer "$CAP_SANITIZER" bash -c sanitizer_stage
    stage bench "$(capped "$CAP_BENCH")" bash -c "bench_stage $(capped "$CAP_BENCH")"
    stage summary "$CAP_SUMMARY" "$PY" -m llmkern.bench.device_run summary --work "$WORK" --out "$OUT_DIR"
    # exit status: 0 when every stage came out ok
    ! cut -f2 "$WORK/stages.tsv" | grep -q -v '^ok$'
}

# Everything printed also goes to run.log; the pipeline (not a background tee) so the last line is out before exit.
run_all 2>&1 | tee -a "$OUT_DIR/run.log"
rc=${PIPESTATUS[0]}
rm -rf "$WORK"
exit "$rc"
