#!/usr/bin/env bash
# The --wheels folder for bench/gpu/check.sh: run it where there is network, carry DIR to the GPU
# machine, then `bash bench/gpu/check.sh --wheels DIR` installs what that image lacks, offline.
#
#   bash bench/gpu/wheels.sh DIR        # PYTHON=python3.x to choose the pip that downloads
#
# Every requirement of bench/gpu/wheels.txt with its dependencies, as wheels for CPython 3.12 on
# manylinux x86_64 (the image's Python), then numpy, torch, triton and torch's nvidia-* CUDA
# libraries are removed: the image has them and they must never be replaced. The folder must stay
# within 64 MiB; the size is printed last (docs/gpu.md, "Wheels", has the measured one).
set -euo pipefail
dir=${1:?usage: bash bench/gpu/wheels.sh DIR}
cd "$(dirname "$0")/../.."
"${PYTHON:-python3}" -m pip download --disable-pip-version-check -q --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$dir" -r bench/gpu/wheels.txt
rm -f "$dir"/numpy-*.whl "$dir"/torch-*.whl "$dir"/triton-*.whl "$dir"/nvidia_*.whl
ls "$dir" | wc -l | xargs echo "wheels:"
du -sb "$dir" | awk '{printf "size: %.1f MiB\n", $1 / 1048576}'
