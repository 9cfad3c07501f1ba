#!/usr/bin/env bash
# What a lent GPU machine runs, in stages that each fit one 10-minute device call (see benchmarks/README.md):
#   bash benchmarks/gpu.sh check     # Triton kernels vs the float64 reference on CUDA (fwd + grads), determinism
#   bash benchmarks/gpu.sh targets   # the rows the issues set targets on (B=8 N=512 H=128 bf16; N=8192; steps)
#   bash benchmarks/gpu.sh grid      # the full egnn grid (time and memory vs N, plots, scaling exponents)
# Results (JSON + markdown + plots, with GPU name, versions and commit) go to $OUT (device tool) or
# benchmarks/results/gpu-<date>/; commit that folder.
set -euo pipefail
stage="${1:-check}"
dest="${OUT:-benchmarks/results}/gpu-$(date +%Y-%m-%d)"
mkdir -p "$dest"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv > "$dest/gpu.txt"
git rev-parse HEAD > "$dest/commit.txt" 2>/dev/null || true
case "$stage" in
  check)   python benchmarks/gpu_check.py 2>&1 | tee "$dest/gpu_check.txt" ;;
  targets) protdiff-fast bench all --targets --out "$dest/targets" ;;
  grid)    protdiff-fast bench egnn --out "$dest/egnn-grid" ;;
  *) echo "unknown stage $stage (check | targets | grid)" >&2; exit 2 ;;
esac
echo "results in $dest"
