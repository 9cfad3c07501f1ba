"""|phi_ij|, the per-pair coefficient of the coordinate update (phi_x), of a ProtDiff checkpoint on real
chains noised to several t: the size a bound on it (``train --tanh --coords-range R``) would have to allow.

    python scripts/pair_coefficients.py CKPT DATA.npz [--split test] [--t 8,64,256,768,1024]

Runs the reference backend and reads phi_ij where the reference op would apply its tanh (the model's
layers are switched to tanh=True with torch.tanh replaced by a recorder that returns its input, so the
function is the checkpoint's own). Prints quantiles over every layer, pair and chain.
"""
import argparse

import torch

from protdiff_fast.diffusion import NoiseSchedule
from protdiff_fast.io.dataset import BackboneDataset
from protdiff_fast.reference.com import remove_center_of_mass_reference
from protdiff_fast.train import load_model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("data")
    ap.add_argument("--split", default="test")
    ap.add_argument("--t", default="8,64,256,768,1024")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    model = load_model(args.ckpt, backend="reference").double()
    if model.config.tanh:
        raise SystemExit("this checkpoint already bounds phi (tanh=True): nothing to measure")
    for block in model.blocks:
        block.egnn.tanh = True  # the reference op then calls torch.tanh(phi_ij): recorded below, not applied
    schedule = NoiseSchedule(model.config.num_timesteps, model.config.beta_start, model.config.beta_end)
    data = BackboneDataset.from_npz(args.data, split=args.split, min_length=2, max_length=model.max_length)
    if len(data) == 0:
        raise SystemExit(f"{args.data}: no chains of split {args.split!r} up to {model.max_length} residues")
    seen, real_tanh = [], torch.tanh

    def record(t):
        seen.append(t.detach().abs().flatten())
        return t

    for t_val in (int(v) for v in args.t.split(",")):
        seen.clear()
        for k in range(len(data)):
            x0 = torch.as_tensor(data[k]["coords"], dtype=torch.float64)[None]
            mask = torch.ones(1, x0.shape[1], dtype=torch.bool)
            x0 = remove_center_of_mass_reference(x0, mask)
            ab = float(schedule.alpha_bars[t_val])
            x_t = ab ** 0.5 * x0 + (1 - ab) ** 0.5 * remove_center_of_mass_reference(torch.randn_like(x0), mask)
            torch.tanh = record
            try:
                with torch.no_grad():
                    model(x_t, torch.tensor([t_val]), mask)
            finally:
                torch.tanh = real_tanh
        phi = torch.cat(seen)
        sample = phi[torch.randperm(phi.numel())[:1_000_000]].float()
        q = torch.quantile(sample, torch.tensor([0.5, 0.9, 0.99, 0.999]))
        print(f"t={t_val:5d}  |phi| median {q[0]:.2f}  p90 {q[1]:.2f}  p99 {q[2]:.2f}  p99.9 {q[3]:.2f}  "
              f"max {float(phi.max()):.1f}  ({phi.numel()} pair coefficients, {len(data)} chains)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
