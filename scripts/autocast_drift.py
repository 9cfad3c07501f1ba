"""How far `sample --autocast bf16` moves designs against float32: the same designs (same seeds, same
per-design noise) sampled twice with a checkpoint, once in float32 and once with the model under
torch.autocast(bf16) (coordinates and the DDPM step in float32), compared per design by the RMS of the
coordinate differences (same frame: no superposition), the Kabsch RMSD, and the largest CA move.
Writes a markdown table with the command, machine and commit (atomically) when --out is given.

    python scripts/autocast_drift.py --lengths 48 60 75 100 --seed 3 --out benchmarks/results/sample_autocast_cpu.md
"""
import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from protdiff_fast.diffusion.sampler import sample
from protdiff_fast.io.structure import _atomic_write
from protdiff_fast.metrics.motif import motif_rmsd
from protdiff_fast.train import load_model


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=None, help="checkpoint (default: the shipped model)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[48, 60])
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="strided steps (default: all T)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--out", default=None, help="markdown file to write")
    args = ap.parse_args(argv)
    if args.ckpt is None:
        from protdiff_fast.cli import shipped_checkpoint

        args.ckpt = str(shipped_checkpoint())
    model = load_model(args.ckpt, backend=args.backend, device="cpu")
    from protdiff_fast.diffusion import DDPMScheduler

    designs, seconds = {}, {}
    for name, autocast in (("float32", None), ("bf16 autocast", torch.bfloat16)):
        scheduler = DDPMScheduler.from_model(model)
        scheduler.set_timesteps(args.steps)
        t0 = time.perf_counter()
        with torch.no_grad():
            designs[name] = sample(model, args.lengths, seed=args.seed, scheduler=scheduler, autocast=autocast,
                                   progress=False, metrics=False)
        seconds[name] = time.perf_counter() - t0
    rows = []
    for i, n in enumerate(args.lengths):
        a, b = designs["float32"][i], designs["bf16 autocast"][i]
        d = np.linalg.norm(a - b, axis=-1)
        rows.append((i, n, float(np.sqrt((d ** 2).mean())), float(motif_rmsd(b, a)[0]), float(d.max())))
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True,
                                text=True, cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    steps = args.steps or model.config.num_timesteps
    lines = [
        "# `sample --autocast bf16` against float32, same designs",
        "",
        f"Command: `python {' '.join(['scripts/autocast_drift.py'] + (argv if argv is not None else sys.argv[1:]))}`",
        f"Checkpoint: {args.ckpt}; backend {args.backend}; {steps} steps; seed {args.seed}.",
        f"Machine: {_cpu_name()}, {torch.get_num_threads()} threads; "
        f"torch {torch.__version__}; commit {commit}.",
        f"Time: float32 {seconds['float32']:.1f} s, bf16 autocast {seconds['bf16 autocast']:.1f} s "
        "(whole runs, this machine; not a benchmark).",
        "",
        "| design | length | RMS of CA moves (A) | Kabsch RMSD (A) | largest CA move (A) |",
        "|---:|---:|---:|---:|---:|",
    ] + [f"| {i} | {n} | {rms:.4f} | {kabsch:.4f} | {mx:.4f} |" for i, n, rms, kabsch, mx in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        _atomic_write(out, lambda tmp: Path(tmp).write_text(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
