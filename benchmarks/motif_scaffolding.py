"""Motif scaffolding with the shipped model: replacement vs SMCDiff vs fixed motif on a few targets.

    nice -n 10 python benchmarks/motif_scaffolding.py --out benchmarks/results/motif_scaffolding_cpu.md

Each (target, method) is one ``protdiff-fast scaffold`` run (same seed, hence the same layouts per
target across methods); the per-run folders go to a scratch directory (--work).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MOTIFS = Path("/work/shared/data/motifs/genie2_design25")  # ../shared/data/motifs (RFdiffusion benchmark)
TARGETS = [  # problem, file, contig, total length (motif_specs.tsv)
    ("5TPN", "5tpn.pdb", "10-40,A163-181,10-40", "50-75"),
    ("6E6R_short", "6e6r_short.pdb", "0-35,A23-35,0-35", "48"),
    ("5TRV_short", "5trv_short.pdb", "0-35,A45-65,0-35", "56"),
]
METHODS = ("replacement", "fixed", "smc")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/motif_scaffolding_cpu.md")
    ap.add_argument("--work", default=None)
    ap.add_argument("--num", type=int, default=8)
    ap.add_argument("--particles", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--redenoise-t", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="motif-bench-"))
    rows = []
    for name, fname, contig, length in TARGETS:
        for method in METHODS:
            out = work / f"{name}-{method}"
            cmd = [sys.executable, "-m", "protdiff_fast.cli", "scaffold", "--pdb", str(MOTIFS / fname), "--contig",
                   contig, "--length", length, "--num", str(args.num), "--particles", str(args.particles),
                   "--method", method, "--steps", str(args.steps), "--redenoise-t", str(args.redenoise_t),
                   "--seed", str(args.seed), "--out", str(out), "--no-progress"]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            s = json.loads((out / "summary.json").read_text())["summary"]
            rows.append((name, method, s, time.perf_counter() - t0))
            print(f"{name} {method}: redenoised motif RMSD {s['mean_redenoise_motif_rmsd']:.2f} A", flush=True)
    from protdiff_fast.cli import shipped_checkpoint
    from protdiff_fast.diffusion.sampler import model_fingerprint
    from protdiff_fast.train import load_model

    model = load_model(str(shipped_checkpoint()), device="cpu")
    params = sum(p.numel() for p in model.parameters())
    commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "unknown (not a git checkout)"
    lines = [
        "# Motif scaffolding with the shipped model (CPU)",
        "",
        f"Date {time.strftime('%Y-%m-%d')}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f} at the end; torch {torch.__version__}; commit {commit}; model "
        f"`protdiff_fast/data/protdiff_small.pt` ({params / 1e3:.0f}k parameters, fingerprint "
        f"{model_fingerprint(model).split(':')[-1][:12]}; its unconditional samples: `benchmarks/results/protdiff_small_eval.md`).",
        "",
        "Command:",
        "",
        "```bash",
        "python benchmarks/motif_scaffolding.py " + " ".join(sys.argv[1:]),
        "```",
        "",
        f"Per target and method: {args.num} designs, seed {args.seed}, {args.steps} strided reverse steps "
        f"(DDIM eta = 1 over T = 1024), SMCDiff with {args.particles} particles per design (systematic "
        "resampling at ESS < K/2; all particles of all designs in one batch), replacement and fixed with one "
        "sample per design. Same seed, hence the same layouts for the three methods. Targets from the RFdiffusion "
        "benchmark (`../shared/data/motifs/genie2_design25`).",
        "",
        "- **motif RMSD**: Kabsch RMSD (A) of the design's motif residues to the real motif. The motif is "
        "imposed down to t = 1, so this is near zero for every method by construction (a consistency check).",
        f"- **re-denoised motif RMSD**: each design re-noised to t = {args.redenoise_t} (noise sd about 1.7 A per "
        "coordinate) and denoised by the *unconditional* model; the motif RMSD after that says whether the "
        "scaffold holds the motif in place on its own (a folding-model-free stand-in for designability). "
        "Success = RMSD < 1 A.",
        "",
        "| target | method | motif RMSD (A) | success | re-denoised motif RMSD (A) | success | CA-CA dev (A) | clash frac. | resamplings | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, method, s, secs in rows:
        lines.append(f"| {name} | {method} | {s['mean_motif_rmsd']:.2f} | {s['success_rate']:.0%} | "
                     f"{s['mean_redenoise_motif_rmsd']:.2f} | {s['redenoise_success_rate']:.0%} | "
                     f"{s['backbone']['ca_ca_dev']:.2f} | {s['backbone']['clash_fraction']:.3f} | "
                     f"{s.get('resampling_events', '-')} | {secs:.0f} |")
    lines += ["", "Means over the designs of each run. With 8 designs per cell, differences of a few tenths of an "
              "A between methods are within design-to-design spread; see the per-design `summary.json` files."]
    from protdiff_fast.io.structure import _atomic_write

    _atomic_write(Path(args.out), lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    print(f"wrote {args.out} (runs in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
