"""How often a model's designs of one length come apart: sample --num designs of --length and give each
one outcome: diverged (the sampler's 1e4-unit stop, at step t), apart (Rg / 2.2 N^0.38 above --apart;
the 8 real chains of 40-50 residues in ../shared/data: 0.96-1.49), or finished; plus the closest CA pair
|i - j| >= 2. The summary also counts the runaways: designs that diverged or whose Rg ratio is above
--runaway (a chain in pieces, not a somewhat extended one). A diverged design is dropped and the others
are sampled again (per-design noise: the same trajectories), so one runaway does not hide the rest.

    python scripts/length_outcomes.py CKPT --length 41 --num 48 --seed 7
"""
import argparse
import re

import numpy as np
import torch

import protdiff_fast.diffusion.sampler as sampler
from protdiff_fast.diffusion import DDPMScheduler
from protdiff_fast.train import load_model


def rg_ratio(x: np.ndarray) -> float:
    c = x - x.mean(0)
    return float(np.sqrt((c * c).sum(1).mean())) / (2.2 * len(x) ** 0.38)


def closest_nonlocal_pair(x: np.ndarray) -> float:
    i, j = np.triu_indices(len(x), 2)
    return float(np.linalg.norm(x[i] - x[j], axis=-1).min()) if len(i) else float("nan")


def outcomes(model, scheduler, length: int, num: int, seed: int, apart: float = 1.6, **sample_kw):
    """Per design: ("diverged", t, None, None) or ("apart" | "finished", None, rg ratio, closest pair in A)."""
    todo, result = list(range(num)), {}
    while todo:
        try:
            with torch.no_grad():
                coords = sampler.sample(model, [length] * num, seed=seed, scheduler=scheduler, design_indices=todo,
                                        progress=False, metrics=False, **sample_kw)
        except sampler.SamplingError as err:
            found = re.search(r"t=(\d+) for design (\d+)", str(err))
            if found is None or int(found.group(2)) not in todo:
                raise
            result[int(found.group(2))] = ("diverged", int(found.group(1)), None, None)
            todo.remove(int(found.group(2)))
            continue
        for i in todo:
            x = np.asarray(coords[i], dtype=np.float64)
            r = rg_ratio(x)
            result[i] = ("apart" if r > apart else "finished", None, r, closest_nonlocal_pair(x))
        todo = []
    return [result[i] for i in range(num)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--length", type=int, required=True)
    ap.add_argument("--num", type=int, default=48)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--apart", type=float, default=1.6, help="Rg ratio above which a design counts as apart")
    ap.add_argument("--runaway", type=float, default=3.0,
                    help="Rg ratio above which an apart design counts as a runaway (default 3)")
    ap.add_argument("--steps", type=int, default=None, help="strided sampling with this many steps (default: all)")
    args = ap.parse_args()
    if args.length < 3 or args.num < 1:
        ap.error(f"--length must be >= 3 and --num >= 1, got {args.length}, {args.num}")
    model = load_model(args.ckpt)
    cfg = model.config
    scheduler = DDPMScheduler(cfg.num_timesteps, cfg.beta_start, cfg.beta_end)
    rows = outcomes(model, scheduler, args.length, args.num, args.seed, args.apart, num_inference_steps=args.steps)
    for i, (kind, t, r, close) in enumerate(rows):
        print(f"design {i:3d}  " + (f"diverged at t={t}" if kind == "diverged" else
                                    f"{kind:8s}  rg_ratio {r:6.3f}  closest pair {close:5.2f} A"))
    done = [r for kind, _, r, _ in rows if kind != "diverged"]
    count = {k: sum(row[0] == k for row in rows) for k in ("diverged", "apart", "finished")}
    runaways = count["diverged"] + sum(1 for r in done if r > args.runaway)
    clashed = sum(1 for kind, _, _, close in rows if kind != "diverged" and close < 3.0)
    print(f"{args.num} designs of length {args.length} (seed {args.seed}): {count['diverged']} diverged, "
          f"{count['apart']} apart (rg_ratio > {args.apart}), {count['finished']} finished; {runaways} ran away "
          f"(diverged or rg_ratio > {args.runaway}); {clashed} with a CA pair under 3 A; rg_ratio max "
          f"{max(done) if done else float('nan'):.3f}, median {np.median(done) if done else float('nan'):.3f}")


if __name__ == "__main__":
    main()
