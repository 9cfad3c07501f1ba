#!/usr/bin/env bash
# What a lent GPU machine runs, in stages that each fit one 10-minute device call (benchmarks/README.md):
#   bash benchmarks/gpu.sh check      # Triton kernels vs the float64 reference on CUDA (fwd + grads), determinism
#   bash benchmarks/gpu.sh targets    # the rows the issues set targets on (B=8 N=512 H=128 bf16; N=8192; steps)
#   bash benchmarks/gpu.sh grid [--dtypes bfloat16 --hidden 128 ...]   # egnn grid rows (time, memory vs N)
#   bash benchmarks/gpu.sh lease      # check, then targets in the time left: one call for a 15-minute lease
#   bash benchmarks/gpu.sh bwd        # where the fused backward's time goes: kernel table + its tunables swept
# Every stage is self-contained (a device call may land on a fresh machine): nothing is installed, the
# package runs from this checkout (PYTHONPATH; the GPU paths need no C++ extension), wheels carried in
# .whl/ (benchmarks/gpu_wheels.sh: egnn-pytorch for the dense baseline) go to /tmp/site. A stage stops
# itself at STAGE_TIMEOUT seconds (default 540) and keeps what it measured (results.json is written
# after every row). Under the device tool everything is packed into one $OUT/gpu-<stage>-<date>.tgz
# (the tool returns at most 8 files); elsewhere results go to benchmarks/results/gpu-<date>/.
set -uo pipefail
stage="${1:-check}"
shift || true
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
py=python3
if compgen -G ".whl/*.whl" > /dev/null; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
# `git describe --always --dirty --abbrev=40 > .gpu-commit` before the call: a device machine gets the working
# tree, and a .git there (if any) can be the session's starting commit, not the tree's (seen 2026-12-04);
# "-dirty" says the tree had edits, and results.json's source_sha256 says which sources ran
commit="$(cat .gpu-commit 2>/dev/null || git rev-parse HEAD 2>/dev/null || echo unknown)"
export PROTDIFF_FAST_COMMIT="$commit"
day="$(date +%Y-%m-%d)"
if [ -n "${OUT:-}" ]; then work="$(mktemp -d)/gpu-$stage-$day"; else work="benchmarks/results/gpu-$day/$stage"; fi
# a second run of a stage the same day gets its own folder (bench refuses to overwrite results)
if [ -e "$work" ]; then n=2; while [ -e "$work-$n" ]; do n=$((n + 1)); done; work="$work-$n"; fi
mkdir -p "$work"
echo "$commit" > "$work/commit.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv > "$work/gpu.txt" 2>&1
$py -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  >> "$work/gpu.txt" 2>&1
limit="${STAGE_TIMEOUT:-540}"
jobs="${CHECK_JOBS:-13}"   # the egnn check's combinations in parallel processes: their kernels compile at once
started=$SECONDS
# never below 1: `timeout 0` means no limit at all (a stage past its time would run on until the device call
# is killed, and the archive with everything measured would never be packed); a negative one is refused
left() { local s=$(( limit - (SECONDS - started) )); [ "$s" -lt 1 ] && s=1; echo "$s"; }
check() {  # the egnn kernels and the sampling checks side by side (correctness only: nothing is timed)
  timeout "$1" $py benchmarks/gpu_check.py --jobs "$jobs" --time-limit $(( $1 - 15 )) > "$work/gpu_check.txt" 2>&1 &
  local egnn=$!
  timeout "$1" $py benchmarks/gpu_check_sampler.py > "$work/gpu_check_sampler.txt" 2>&1 &
  local sampler=$!
  wait $egnn; local rc_egnn=$?
  wait $sampler; local rc_sampler=$?
  cat "$work/gpu_check.txt" "$work/gpu_check_sampler.txt"
  [ "$rc_egnn" -ne 0 ] && return "$rc_egnn"
  return "$rc_sampler"
}
targets() {
  timeout "$1" $py -m protdiff_fast.cli bench all --targets --device cuda --timeout 90 --warm-jobs "$jobs" \
    --out "$work/targets" "${@:2}" 2>&1 | tee "$work/targets.log"
  return "${PIPESTATUS[0]}"
}
case "$stage" in
  check)   check "$limit"; rc=$? ;;
  targets) targets "$limit" "$@"; rc=$? ;;
  grid)    timeout "$limit" $py -m protdiff_fast.cli bench egnn --device cuda --timeout 60 --warm-jobs "$jobs" \
             --out "$work/grid" "$@" 2>&1 | tee "$work/grid.log"; rc=${PIPESTATUS[0]} ;;
  bwd)     timeout "$limit" $py benchmarks/gpu_profile_bwd.py --jobs "$jobs" --timeout 150 --out "$work/bwd/results.json" \
             "$@" 2>&1 | tee "$work/bwd.log"; rc=${PIPESTATUS[0]} ;;
  lease)   # one device call: the checks (at most CHECK_TIMEOUT s), then the target rows in the time left
    ct="${CHECK_TIMEOUT:-240}"; [ "$ct" -gt "$(left)" ] && ct="$(left)"   # within the stage's own limit
    check "$ct"; rc=$?
    targets "$(left)" "$@"; rc_t=$?
    [ "$rc" -eq 0 ] && rc=$rc_t ;;
  *) echo "unknown stage $stage (check | targets | grid | bwd | lease)" >&2; exit 2 ;;
esac
[ "$rc" -eq 124 ] && echo "stage $stage stopped at ${limit} s; what it measured is kept" | tee -a "$work/gpu.txt"
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/gpu-$stage-$day.tgz" -C "$(dirname "$work")" "$(basename "$work")"
  echo "results packed in \$OUT/gpu-$stage-$day.tgz (exit $rc)"
else
  echo "results in $work (exit $rc)"
fi
exit "$rc"
