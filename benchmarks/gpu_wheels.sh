#!/usr/bin/env bash
# Run here (a machine that reaches PyPI), before a device call: downloads into .whl/ the packages the
# GPU stages use that the lent machine's image lacks (benchmarks/gpu.sh installs them from there).
# Name .whl in the device call's carry list. egnn-pytorch is pure Python (the dense baseline of the
# egnn rows; its einops and numba are in the image).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl egnn-pytorch==0.2.8
ls -l .whl
