"""Where a model's clashes are: sample the held-out lengths and list the CA pairs |i - j| >= 2 closer
than 3.0 A in each design, with a histogram of their sequence separations.

    python scripts/clash_pairs.py CKPT DATA.npz --seed 0      # the designs of evaluate_checkpoint.py --repeats 2
"""
import numpy as np
import torch
from heldout import heldout_parser, load_heldout

from protdiff_fast.diffusion.sampler import sample
from protdiff_fast.metrics.backbone import CLASH_A


def main() -> None:
    args = heldout_parser(__doc__.splitlines()[0], repeats=2).parse_args()
    model, _, lengths, scheduler = load_heldout(args)
    with torch.no_grad():
        designs = sample(model, lengths, seed=args.seed, scheduler=scheduler, batch_size=64, progress=False)
    separations = {}
    for k, ca in enumerate(designs):
        i, j = np.triu_indices(len(ca), 2)
        d = np.linalg.norm(ca[i] - ca[j], axis=1)
        bad = d < CLASH_A
        for s in (j - i)[bad]:
            separations[int(s)] = separations.get(int(s), 0) + 1
        if bad.any():
            pairs = ", ".join(f"({a}, {b}) {x:.2f} A" for a, b, x in zip(i[bad], j[bad], d[bad]))
            print(f"design {k} (length {len(ca)}): {pairs}")
    print("sequence separation: pairs", sorted(separations.items()))


if __name__ == "__main__":
    main()
