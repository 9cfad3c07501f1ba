"""A pool of a model's own sampling states: sample designs of training-set lengths (or of --lengths
LO..HI) and keep the x_t each reverse step at --min-t <= t <= --max-t starts from (the states its own
earlier steps produced, which L_simple on noised real chains never shows it), for ``train --own-states``
(low t: the clash term) or ``train --own-extent-states`` (high t: the extent term). A design that
diverges is set aside by the sampler (its later states are not drawn), and so are a design's states
from the first one with a coordinate beyond --far model units (the ``valid`` mask of the file).

    python scripts/own_states.py CKPT DATA.npz --out runs/own_states.npz --num 64 --seed 1000
    python scripts/own_states.py CKPT DATA.npz --out runs/own_high.npz --lengths 40..64 --min-t 512 --max-t 1024
"""
import argparse
from pathlib import Path

import numpy as np
import torch

import protdiff_fast.diffusion.sampler as sampler_module
from protdiff_fast.diffusion import DDPMScheduler
from protdiff_fast.io import BackboneDataset
from protdiff_fast.io.structure import _atomic_write
from protdiff_fast.metrics.backbone import CLASH_A
from protdiff_fast.train import load_model


def valid_states(x: np.ndarray, far: float):
    """(steps, designs) mask of the states to draw, and the number of designs that diverged: a design's
    states up to (not from) the first with a coordinate beyond ``far``. One that diverged is held at its
    x_T by the sampler from then on: that jump back (a coordinate moving > 1 unit in one step; a reverse
    step moves it by ~sqrt(beta_t) <= 0.15 units, a runaway's by < 1) ends its states too."""
    out = np.abs(x).max(axis=(2, 3)) > far
    jump = np.zeros_like(out)
    jump[1:] = np.abs(np.diff(x, axis=0)).max(axis=(2, 3)) > 1.0
    return np.cumsum(out | jump, axis=0) == 0, int(jump.any(0).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt")
    parser.add_argument("data")
    parser.add_argument("--out", required=True)
    parser.add_argument("--num", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--max-t", type=int, default=128)
    parser.add_argument("--min-t", type=int, default=1)
    parser.add_argument("--lengths", default=None, metavar="LO..HI",
                        help="draw the lengths uniformly from LO..HI (default: those of training chains)")
    parser.add_argument("--far", type=float, default=30.0,
                        help="a design's states from the first with |x| beyond this (model units) are not drawn")
    args = parser.parse_args()
    model = load_model(args.ckpt)
    cfg = model.config
    train = BackboneDataset.from_npz(args.data, split="train", min_length=40, max_length=cfg.max_length)
    rng = np.random.default_rng(args.seed)
    if args.lengths:
        lo, hi = (int(v) for v in args.lengths.split(".."))
        lengths = sorted(int(v) for v in rng.integers(lo, hi + 1, args.num))
    else:
        lengths = sorted(int(len(train.coords[i])) for i in rng.integers(0, len(train), args.num))
    scheduler = DDPMScheduler(cfg.num_timesteps, cfg.beta_start, cfg.beta_end)
    states = []
    base = sampler_module.DenoiseStep

    class Enough(Exception):
        pass

    class Recording(base):
        def __call__(self, x, t):
            if int(t[0]) < args.min_t:  # a high-t pool: the steps below it are not needed
                raise Enough
            if int(t[0]) <= args.max_t:
                states.append((int(t[0]), x.clone()))
            return super().__call__(x, t)

    sampler_module.DenoiseStep = Recording
    designs = None  # the finished designs, when sampled to the end (--min-t 1)
    try:
        with torch.no_grad():
            designs = sampler_module.sample(model, lengths, seed=args.seed, scheduler=scheduler,
                                            batch_size=len(lengths), progress=False, on_diverge="skip")
    except Enough:
        pass
    finally:
        sampler_module.DenoiseStep = base
    n_max = max(lengths)
    x = np.zeros((len(states), len(lengths), n_max, 3), np.float32)
    for s, (_, xt) in enumerate(states):  # rows in length order = the order of ``lengths`` (sorted)
        x[s, :, : xt.shape[1]] = xt.numpy()
    valid, diverged = valid_states(x, args.far)
    clashed = -1  # not known when the sampling stopped at --min-t
    if designs is not None:
        clashed = 0
        for ca in (ca for ca in designs if ca is not None):
            i, j = np.triu_indices(len(ca), 2)
            clashed += bool((np.linalg.norm(ca[i] - ca[j], axis=1) < CLASH_A).any())
    print(f"{len(lengths)} designs, {clashed if clashed >= 0 else 'n/a'} with a clash, {diverged} diverged; "
          f"{len(states)} steps kept "
          f"({args.min_t} <= t <= {args.max_t}); {int((~valid).sum())} states beyond --far {args.far:g} or after a "
          "divergence are not drawn")
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a bare name
            np.savez(f, x=x, t=np.array([s[0] for s in states]), lengths=np.array(lengths), clashed=clashed,
                     valid=valid)

    _atomic_write(Path(args.out), write)


if __name__ == "__main__":
    main()
