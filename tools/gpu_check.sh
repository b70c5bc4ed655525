#!/usr/bin/env bash
# The one-shot check of the CUDA path, for the day a GPU is lent (docs/how-to/gpu-check.md): pytest -m cuda,
# the loss benchmark in fp32/fp16/bf16, the demo's training step against torchvision's, 200 demo
# iterations with train.amp auto and bf16, and a two-process NCCL run where two GPUs are present. One
# table on stdout (exit 1 if a row failed or missed its target), JSON in runs/gpu_check.json after every
# step. Within 8 minutes on one GPU; one line and exit 2 where there is no CUDA device.
#
#   bash tools/gpu_check.sh                          # on the GPU machine, after tools/bootstrap.sh
#   bash tools/gpu_check.sh --json out.json          # any option of detfocal benchmark
#   bash tools/gpu_check.sh --device cpu --quick     # its dry run on a CPU: tiny sizes, no targets
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
# The check keeps its own deadline and kills a step that overruns; this outer limit only catches a hang
# outside the steps (a GPU that never initialises). Its TERM makes the check kill the running step too.
timeout --kill-after=30 540 "$PY" -m detfocal benchmark --cases gpu --json runs/gpu_check.json "$@"
status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "gpu check: stopped after 9 minutes; the JSON holds the steps that finished" >&2
fi
exit "$status"
