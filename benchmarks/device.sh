#!/bin/sh
# batchgen's GPU checks on a lent GPU machine (an H200 with no network), in one device call:
# benchmarks/sweep.py's SDXL and SD1.5 GPU workloads, then the GPU-marked tests. See
# benchmarks/README.md, "On a lent GPU machine".
#
#   here first:    make gpu-kit      (the wheels that machine lacks, into .whl/)
#   device tool:   command "sh benchmarks/device.sh", carry [".whl"], timeout_s 580
#
# Run from anywhere (it moves to the repo root). It installs .whl/*.whl into /tmp/site (and
# .whl/if-older/*.whl where the machine's copy is older or missing), imports batchgen from the
# source tree (PYTHONPATH=/tmp/site:<repo root>), prints the versions, then runs the steps in
# run_steps below, each under `timeout` and within an overall budget, going on past a failed
# step. Exit status: 0 when every step passed, 1 when one failed, 2/3 when setup failed (no
# kit, an install or import error, no CUDA).
#
# Files under $OUT (default /tmp/device-out; 8 files at most come back from the device tool):
#   setup.log         pip's output, versions, the GPU, unmet requirements of the kit
#   sweep-sdxl.md     SDXL 1024² fp16, batchgen against the plain loop
#   sweep-fast.md     SDXL again with --fast compile, two repeats
#   sweep-sd15.md     SD1.5 512² fp16, batchgen against the plain loop
#   pytest-gpu.log    the GPU-marked tests
#   stderr.log        each step's stderr (its last 200 lines), one after another
#   summary.txt       one line per step: name, exit status, seconds
#
# Environment:
#   OUT                   where the logs go (the device tool sets it)
#   DEVICE_SH_CPU=1       test the plumbing on a machine without a GPU: no CUDA check, and the
#                         sweeps are sdxl64 and tiny64 on the CPU (a minute or two on 2 cores)
#   DEVICE_SH_BUDGET_S    seconds for the whole script (default 540: the device tool's 10-minute
#                         command limit, less the machine's own start-up); a step gets at most
#                         what is left of it
#   DEVICE_SH_SITE        where the wheels are installed (default /tmp/site; emptied first)

set -u
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
OUT=${OUT:-/tmp/device-out}
CPU=${DEVICE_SH_CPU:-0}
BUDGET_S=${DEVICE_SH_BUDGET_S:-540}
SITE=${DEVICE_SH_SITE:-/tmp/site}
STARTED=$(date +%s)
DEADLINE=$((STARTED + BUDGET_S))
FAILED=0

# The steps: `step FILE TIMEOUT_S COMMAND...` runs COMMAND with its stdout in $OUT/FILE and its
# stderr in $OUT/<FILE less its suffix>.err. Timeouts in seconds, guessed before any run on a
# GPU: the tests about a minute (mostly imports); each sweep builds its random-weight model in
# /tmp/bench on the GPU (SDXL's 6.9 GB of fp16 files once, reused by the compile step).
run_steps() {
    if [ "$CPU" = 1 ]; then
        step sweep-sdxl.md 300 python3 benchmarks/sweep.py --only sdxl64 --repeat 1 \
            --work-dir /tmp/bench
        step sweep-fast.md 200 python3 benchmarks/sweep.py --only tiny64 --repeat 1 \
            --fast channels_last --work-dir /tmp/bench
    else
        # SDXL at 1024² against the plain loop first (issue 18), then again with batching and
        # compile, two repeats, the second finding torch's compile caches warm (the first
        # compiles the warm-up's and the batch's shapes inside its run: minutes, not measured
        # before); then SD1.5 at 512² (issue 9), each without compile, with what is left.
        step sweep-sdxl.md 170 python3 benchmarks/sweep.py --profile gpu --only sdxl \
            --repeat 1 --work-dir /tmp/bench
        step sweep-fast.md 240 python3 benchmarks/sweep.py --profile gpu --only sdxl \
            --repeat 2 --fast compile --work-dir /tmp/bench
        step sweep-sd15.md 120 python3 benchmarks/sweep.py --profile gpu --only sd15 \
            --repeat 1 --work-dir /tmp/bench
    fi
    # `-m` on the command line replaces addopts' `-m 'not slow'`: keep slow tests out here.
    step pytest-gpu.log 75 python3 -m pytest -q -p no:cacheprovider -m "gpu and not slow" tests
}

# A step, bounded by its timeout and by what is left of the budget (10 s kept for `timeout -k`).
step() {
    file=$1 limit=$2
    shift 2
    name=${file%.*}
    left=$((DEADLINE - $(date +%s) - 10))
    if [ "$left" -lt 30 ]; then
        echo "== $name: skipped, only ${left}s of the budget left"
        echo "$name skipped 0s" >>"$OUT/summary.txt"
        FAILED=1
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (timeout ${limit}s): $*"
    begun=$(date +%s)
    timeout -k 10 "$limit" "$@" >"$OUT/$file" 2>"$OUT/$name.err"
    rc=$?
    seconds=$(($(date +%s) - begun))
    tail -c 6000 "$OUT/$file"
    if [ "$rc" -ne 0 ]; then
        FAILED=1
        [ "$rc" -eq 124 ] && echo "!! $name: timed out after ${limit}s"
        echo "!! $name: exit $rc; its stderr ends:"
        tail -n 25 "$OUT/$name.err"
    fi
    [ -s "$OUT/$name.err" ] || rm -f "$OUT/$name.err"
    echo "$name exit=$rc ${seconds}s" >>"$OUT/summary.txt"
    echo "== $name: exit $rc after ${seconds}s"
}

mkdir -p "$OUT" || exit 2
: >"$OUT/summary.txt"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DEVICE_SH_CPU="$CPU" DEVICE_SH_SITE="$SITE"
# A launcher's or Slurm's variables would shard batchgen's arm or move it to another GPU.
unset WORLD_SIZE RANK LOCAL_RANK SLURM_ARRAY_TASK_ID SLURM_ARRAY_TASK_COUNT SLURM_ARRAY_TASK_MIN

# Setup: the kit into $SITE. Wheels in .whl/if-older/ only where the machine has an older copy.
if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "no wheels in .whl/: run \`make gpu-kit\` here and carry .whl" | tee "$OUT/setup.log"
    exit 2
fi
rm -rf "$SITE"
newer=$(python3 - <<'EOF'
import glob
from importlib import metadata
from packaging.utils import parse_wheel_filename
from packaging.version import Version

for wheel in sorted(glob.glob(".whl/if-older/*.whl")):
    name, version, _, _ = parse_wheel_filename(wheel.rsplit("/", 1)[-1])
    try:
        if Version(metadata.version(name)) >= version:
            continue
    except metadata.PackageNotFoundError:
        pass
    print(wheel)
EOF
)
{
    echo "## pip install into $SITE: $(echo .whl/*.whl $newer)"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl $newer 2>&1
} >"$OUT/setup.log"
rc=$?
if [ "$rc" -ne 0 ]; then
    cat "$OUT/setup.log"
    echo "!! pip install failed: exit $rc"
    exit 2
fi
export PYTHONPATH="$SITE:$REPO"

# Versions, a CUDA check (not with DEVICE_SH_CPU=1), the imports batchgen's engine needs, and
# any requirement of the kit that the machine's packages do not meet.
{
    command -v nvidia-smi >/dev/null &&
        nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv
    python3 - <<'EOF'
import os
import sys
from importlib import metadata

from packaging.requirements import Requirement

import torch

cuda = torch.cuda.is_available()
print(f"python {sys.version.split()[0]} ({sys.executable})")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available: {cuda}")
if cuda:
    props = torch.cuda.get_device_properties(0)
    print(f"GPU {props.name}, {props.total_memory / 2**30:.0f} GiB, capability {props.major}.{props.minor}")
import batchgen.engine.img2img  # noqa: E402,F401
import diffusers  # noqa: E402
import pydantic  # noqa: E402,F401
from diffusers import StableDiffusionImg2ImgPipeline  # noqa: E402,F401

for name in ("diffusers", "transformers", "huggingface-hub", "tokenizers", "accelerate",
             "safetensors", "pydantic", "pydantic-core", "typing-extensions", "numpy"):
    print(f"{name} {metadata.version(name)}")
print(f"diffusers from {os.path.dirname(diffusers.__file__)}")
print(f"batchgen from {os.path.dirname(batchgen.__file__)}")

site = os.environ["DEVICE_SH_SITE"]
for dist in metadata.distributions(path=[site]):
    for text in dist.requires or []:
        requirement = Requirement(text)
        if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
            continue
        try:
            found = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            found = None
        if found is None or not requirement.specifier.contains(found, prereleases=True):
            print(f"unmet: {dist.metadata['Name']} needs {text}, found {found}")
if not cuda and os.environ["DEVICE_SH_CPU"] != "1":
    sys.exit("no CUDA GPU (DEVICE_SH_CPU=1 runs the CPU check instead)")
EOF
} >>"$OUT/setup.log" 2>&1
rc=$?
cat "$OUT/setup.log"
if [ "$rc" -ne 0 ]; then
    echo "!! setup failed: exit $rc"
    exit 3
fi
echo "== setup done after $(($(date +%s) - STARTED))s"

run_steps
# At most 8 files come back from the device tool: the steps' stderr travels as one.
for err in "$OUT"/*.err; do
    [ -e "$err" ] || continue
    { echo "== $(basename "$err")"; tail -n 200 "$err"; } >>"$OUT/stderr.log"
    rm -f "$err"
done
echo "== all done after $(($(date +%s) - STARTED))s (budget ${BUDGET_S}s); steps:"
cat "$OUT/summary.txt"
exit "$FAILED"
