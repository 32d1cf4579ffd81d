#!/usr/bin/env bash
# One-call GPU validation of stars_scale, for a fresh single-GPU machine (H100/H200) with a CUDA
# torch, Triton and nvcc installed and no network. Builds csrc/ (JIT), runs tests/gpu, measures
# throughput of configs/looped_1b_1gpu.yaml with the kernels on and off (tokens/s, MFU against
# the measured bf16 matmul peak, peak memory) and writes everything to $OUT/gpu_check.json
# ($OUT, else ./gpu_check_out). Target: under 8 minutes. Options: bench/gpu/check.sh --help.
#
#   bash bench/gpu/check.sh                     # the check
#   bash bench/gpu/check.sh --wheels .whl       # first install the wheels in .whl offline
#
# Nothing here needs megatron-core, DeepSpeed, webdataset or MLflow. To carry them for the full
# trainer, make the wheel folder on a machine with network (docs/gpu.md, "Wheels").
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/gpu/check.py "$@"
