#!/usr/bin/env bash
# Download into .whl/ (git-ignored) the wheels of the benchmark peers that can travel to the GPU machine, which has
# no package registry: Python 3.12, x86-64 manylinux or pure-Python wheels, nothing to build, every requirement
# already on the machine's image, and the working tree plus .whl/ under the device tool's 64 MiB.
#
#   bash bench/fetch_peer_wheels.sh          (on a machine with pip and a registry; then carry .whl, see README)
#
# bench/device_run.sh installs whatever it finds in .whl/ with `pip install --no-index --no-deps --target` into a
# folder put on PYTHONPATH; the suites pick a peer up when it imports (bench.common.optional_import).
#
# Peers that cannot travel (checked 2026-11-30; README "GPU day" says more):
#   flashinfer-python 0.7.4: its py3-none-any wheel alone is 101.3 MB (over the 64 MiB limit), it needs packages
#     the image lacks (apache-tvm-ffi, cuda-tile, nccl4py, nccl-extensions, nvidia-cudnn-frontend,
#     nvidia-cutlass-dsl), and it compiles its kernels with nvcc at first use;
#   flash-attn 2.8.3.post2: PyPI has a source distribution only (a CUDA build of about an hour); Dao-AILab publishes
#     no wheel for torch 2.11 + CUDA 13 (flash-attention issue #2442 points to a community build on GitHub).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
LIMIT_MIB=64

# name==version (pinned, so every GPU day measures the same peer)       what it is a peer for
PEERS=(
    liger-kernel==0.8.5     # RMSNorm, fused add + RMSNorm, RoPE (bench/layers.py); needs torch and triton only
    torchao==0.18.0         # int4 weight-only linear (bench/quant.py); built for torch >= 2.11, needs nothing else
)
# Requirements the GPU machine's image already satisfies (from the device tool's KINDS.md package list).
ON_DEVICE="torch triton numpy packaging pyyaml safetensors huggingface-hub transformers tqdm requests"

rm -rf .whl
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "${PEERS[@]}"

# Check each wheel's requirements and the size of what travels: tracked and untracked-not-ignored files + .whl.
"$PY" - "$LIMIT_MIB" "$ON_DEVICE" <<'EOF'
import glob, os, re, subprocess, sys, zipfile

limit_mib, on_device = int(sys.argv[1]), set(sys.argv[2].split())
bad = []
for path in sorted(glob.glob(".whl/*.whl")):
    with zipfile.ZipFile(path) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    reqs = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    needed = [r for r in reqs if "extra ==" not in r]
    names = [re.split(r"[ <>=!~;\[(]", r, maxsplit=1)[0].lower().replace("_", "-") for r in needed]
    missing = [n for n in names if n not in on_device]
    print(f"{os.path.basename(path)}: {os.path.getsize(path) / 2**20:.2f} MiB, needs {names or 'nothing'}"
          + (f"; NOT on the GPU machine: {missing}" if missing else ""))
    bad += missing
files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], capture_output=True,
                       check=True).stdout.decode().split("\0")
tree = sum(os.path.getsize(f) for f in files if f and os.path.isfile(f))
wheels = sum(os.path.getsize(f) for f in glob.glob(".whl/*.whl"))
total = (tree + wheels) / 2**20
print(f"travels: tree {tree / 2**20:.1f} MiB + .whl {wheels / 2**20:.1f} MiB = {total:.1f} MiB of {limit_mib} MiB")
if bad or total > limit_mib:
    sys.exit("fetch_peer_wheels: " + ("requirements missing on the GPU machine: carry their wheels too"
                                      if bad else "over the device tool's size limit"))
EOF
