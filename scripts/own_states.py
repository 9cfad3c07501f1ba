"""A pool of a model's own low-t sampling states: sample designs of training-set lengths and keep the
x_t each reverse step at t <= --max-t starts from (the states its own earlier steps produced, which
L_simple on noised real chains never shows it), for ``train --own-states``.

    python scripts/own_states.py CKPT DATA.npz --out runs/own_states.npz --num 64 --seed 1000
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt")
    parser.add_argument("data")
    parser.add_argument("--out", required=True)
    parser.add_argument("--num", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--max-t", type=int, default=128)
    args = parser.parse_args()
    model = load_model(args.ckpt)
    cfg = model.config
    train = BackboneDataset.from_npz(args.data, split="train", min_length=40, max_length=cfg.max_length)
    rng = np.random.default_rng(args.seed)
    lengths = sorted(int(len(train.coords[i])) for i in rng.integers(0, len(train), args.num))
    scheduler = DDPMScheduler(cfg.num_timesteps, cfg.beta_start, cfg.beta_end)
    states = []
    base = sampler_module.DenoiseStep

    class Recording(base):
        def __call__(self, x, t):
            if int(t[0]) <= args.max_t:
                states.append((int(t[0]), x.clone()))
            return super().__call__(x, t)

    sampler_module.DenoiseStep = Recording
    try:
        with torch.no_grad():
            designs = sampler_module.sample(model, lengths, seed=args.seed, scheduler=scheduler,
                                            batch_size=len(lengths), progress=False)
    finally:
        sampler_module.DenoiseStep = base
    n_max = max(lengths)
    x = np.zeros((len(states), len(lengths), n_max, 3), np.float32)
    for s, (_, xt) in enumerate(states):  # rows in length order = the order of ``lengths`` (sorted)
        x[s, :, : xt.shape[1]] = xt.numpy()
    clashed = 0
    for ca in designs:
        i, j = np.triu_indices(len(ca), 2)
        clashed += bool((np.linalg.norm(ca[i] - ca[j], axis=1) < CLASH_A).any())
    print(f"{len(lengths)} designs, {clashed} with a clash; {len(states)} steps kept (t <= {args.max_t})")
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a bare name
            np.savez(f, x=x, t=np.array([s[0] for s in states]), lengths=np.array(lengths), clashed=clashed)

    _atomic_write(Path(args.out), write)


if __name__ == "__main__":
    main()
