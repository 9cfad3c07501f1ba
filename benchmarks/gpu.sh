#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one call (see the device tool's METHOD.md):
#   1. the Triton kernels against the float64 reference on CUDA tensors (fresh random inputs),
#   2. the benchmark suites with the issue targets (B=8 N=512 H=128 bf16; N=8192),
#   3. the sm_90 compile report, for comparison with what ran.
# Results (JSON + markdown + plots, with GPU name, versions and commit) land in $OUT (or
# benchmarks/results/gpu-<date>); commit that folder.
#   bash benchmarks/gpu.sh            # from the repository root, with the package installed
set -euo pipefail
OUT_DIR="${OUT:-benchmarks/results}/gpu-$(date +%Y-%m-%d)"
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT_DIR/gpu.txt"
python - <<'PY' 2>&1 | tee "$OUT_DIR/triton_vs_reference.txt"
# the interpreter tests, rerun on CUDA tensors: same problems, the real compiler and tensor cores
import sys, torch
sys.path.insert(0, "tests")
from helpers import rel_err
from test_egnn_cpu import FLAG_SETS, make_problem
from protdiff_fast.ops import egnn_pair_aggregate
worst = 0.0
for dtype in (torch.float32, torch.bfloat16):
    for H in (16, 32, 64, 128):
        for edge in ("none", "dense", "offset"):
            for flags in (FLAG_SETS[0], FLAG_SETS[4], FLAG_SETS[5]):
                args, kw = make_problem(3, 97, H, 6, edge, flags, seed=H)
                cuda = lambda t, d: t.to("cuda", d) if torch.is_tensor(t) and t.dtype.is_floating_point else (t.cuda() if torch.is_tensor(t) else t)
                want = egnn_pair_aggregate(*[cuda(a, torch.float64) for a in args], backend="reference",
                                           **{k: cuda(v, torch.float64) for k, v in kw.items()})
                ref_low = egnn_pair_aggregate(*[cuda(a, dtype) for a in args], backend="reference",
                                              **{k: cuda(v, dtype) for k, v in kw.items()})
                got = egnn_pair_aggregate(*[cuda(a, dtype) for a in args], backend="triton",
                                          **{k: cuda(v, dtype) for k, v in kw.items()})
                errs = [rel_err(g, w) for g, w in zip(got, want)]
                base = [rel_err(r, w) for r, w in zip(ref_low, want)]
                ratio = max(e / max(b, 1e-7) for e, b in zip(errs, base))
                worst = max(worst, ratio)
                print(f"{str(dtype):<15} H={H:<4} {edge:<7} {str(flags):<60} err m {errs[0]:.1e} dx {errs[1]:.1e} "
                      f"(torch same dtype: {base[0]:.1e} {base[1]:.1e})")
print(f"worst ratio of triton error to torch's own error at that dtype: {worst:.2f}")
PY
protdiff-fast bench all --targets --out "$OUT_DIR/targets"
protdiff-fast bench egnn --out "$OUT_DIR/egnn-grid"
python scripts/compile_egnn_triton.py --markdown "$OUT_DIR/compile_sm90.md" > /dev/null || true
echo "results in $OUT_DIR"
