"""Follow one design through the reverse process: per step, max |x|, max |eps_hat| and the closest CA pair
|i - j| >= 2 (A). The design is sampled alone with its own noise (the CPU / Triton steps' per-design
seeds), so it is the same trajectory as in the batch of ``evaluate_checkpoint.py`` (up to the last bits).

    python scripts/trace_design.py CKPT DATA.npz --seed 1 --design 20
"""
import torch
from heldout import heldout_parser, load_heldout

import protdiff_fast.diffusion.sampler as sampler
from protdiff_fast.io.dataset import SCALE_A


def main() -> None:
    ap = heldout_parser(__doc__.splitlines()[0], repeats=2)
    ap.add_argument("--design", type=int, required=True)
    ap.add_argument("--every", type=int, default=64, help="print every this many steps (and every unusual one)")
    args = ap.parse_args()
    model, _, lengths, scheduler = load_heldout(args)
    if not 0 <= args.design < len(lengths):
        ap.error(f"--design: {args.design} is not one of the {len(lengths)} designs (0..{len(lengths) - 1})")
    log = []

    class Tracing(sampler.DenoiseStep):
        def __call__(self, x, t):
            eps, x_next = super().__call__(x, t)
            n = int(self.mask[0].sum())
            xs = x_next[0, :n]
            i, j = torch.triu_indices(n, n, 2)
            closest = float(torch.linalg.norm(xs[i] - xs[j], dim=-1).min()) if len(i) else float("nan")
            log.append((int(t[0]), float(x_next.abs().amax()), float(eps.abs().amax()), closest * SCALE_A))
            return eps, x_next

    sampler.DenoiseStep = Tracing
    error = None
    try:
        with torch.no_grad():
            sampler.sample(model, lengths, seed=args.seed, scheduler=scheduler, design_indices=[args.design],
                           progress=False)
    except sampler.SamplingError as e:
        error = e
    for t, x_max, eps_max, closest in log:
        if t % args.every == 0 or t <= 4 or eps_max > 5:
            print(f"t={t:5d}  max|x| {x_max:9.3g}  max|eps_hat| {eps_max:9.3g}  closest pair {closest:7.2f} A")
    if error is not None:
        print(f"SamplingError: {error}")


if __name__ == "__main__":
    main()
