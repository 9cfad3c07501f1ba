"""When a model's clashes form: sample the held-out lengths (as evaluate_checkpoint.py --repeats 2),
record x_t and the predicted x_0 at every reverse step, and for every CA pair |i - j| >= 2 closer than
3.0 A in the final design print the last t at which that pair was still >= 3.8 A apart in x_t and in
x0_hat (after it, the pair stays closer than a real chain ever has it).

    python scripts/clash_onset.py CKPT DATA.npz --seed 0
"""
import numpy as np
import torch
from heldout import heldout_parser, load_heldout

import protdiff_fast.diffusion.sampler as sampler_module
from protdiff_fast.metrics.backbone import CLASH_A
from protdiff_fast.reference.ddpm import predict_x0_from_eps

REAL_MIN_A = 3.8


def main() -> None:
    args = heldout_parser(__doc__.splitlines()[0], repeats=2).parse_args()
    model, _, lengths, scheduler = load_heldout(args)
    scale = 10.0
    frames = []  # (t, x_t, x0_hat) per step, padded batch
    base = sampler_module.DenoiseStep

    class Recording(base):
        def __call__(self, x, t):
            eps, x_prev = super().__call__(x, t)
            x0 = predict_x0_from_eps(scheduler.schedule, x, t, eps)
            frames.append((int(t[0]), x.clone(), x0))
            return eps, x_prev

    sampler_module.DenoiseStep = Recording
    try:
        with torch.no_grad():
            designs = sampler_module.sample(model, lengths, seed=args.seed, scheduler=scheduler,
                                            batch_size=64, progress=False)
    finally:
        sampler_module.DenoiseStep = base
    ts = np.array([f[0] for f in frames])
    xt = torch.stack([f[1] for f in frames]).numpy() * scale  # (steps, B, N, 3) in A
    x0 = torch.stack([f[2] for f in frames]).numpy() * scale
    # the sampler batches the designs sorted by length (stable): design k is at row position[k]
    position = np.empty(len(lengths), dtype=int)
    position[np.argsort(np.asarray(lengths), kind="stable")] = np.arange(len(lengths))
    assert xt.shape[1] == len(lengths), "one batch expected (batch_size=64)"
    onset_xt, onset_x0 = [], []
    for k, ca in enumerate(designs):
        row = position[k]
        assert np.allclose(x0[-1, row, :len(ca)], ca, atol=1e-3), "row mapping"

        i, j = np.triu_indices(len(ca), 2)
        d = np.linalg.norm(ca[i] - ca[j], axis=1)
        for a, b, dist in zip(i[d < CLASH_A], j[d < CLASH_A], d[d < CLASH_A]):
            dt = np.linalg.norm(xt[:, row, a] - xt[:, row, b], axis=-1)
            d0 = np.linalg.norm(x0[:, row, a] - x0[:, row, b], axis=-1)
            far_t = ts[dt >= REAL_MIN_A]
            far_0 = ts[d0 >= REAL_MIN_A]
            last_t = int(far_t.min()) if len(far_t) else -1
            last_0 = int(far_0.min()) if len(far_0) else -1
            onset_xt.append(last_t)
            onset_x0.append(last_0)
            marks = " ".join(f"t{t}:{d0[ts == t][0]:.1f}" for t in (512, 256, 128, 64, 32, 16, 8, 1))
            print(f"design {k} (length {len(ca)}) pair ({a}, {b}) sep {b - a} final {dist:.2f} A; "
                  f"last t >= 3.8 A: x_t {last_t}, x0_hat {last_0}; x0_hat distance {marks}")
    print("onset (last t with the pair >= 3.8 A) in x_t:", sorted(onset_xt))
    print("onset in x0_hat:", sorted(onset_x0))


if __name__ == "__main__":
    main()
