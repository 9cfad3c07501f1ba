"""Widen a trained ProtDiff by unit replication (Net2WiderNet): the wider model computes the same eps_hat.

    python scripts/widen_checkpoint.py protdiff_fast/data/protdiff_small.pt runs/wide128.pt --factor 2
    protdiff-fast train ... --hidden 128 --edge-dim 64 --embed-dim 64 --init runs/wide128.pt

Every hidden unit of the h stream and of the EGNN's message / phi_x / phi_h layers is copied ``factor``
times (new unit n is old unit n mod H). A layer's rows (outputs) are copied; its columns (inputs) that read a
replicated vector are split among the copies with fractions that sum to 1, so each layer computes the copies
of its old outputs. SiLU acts unit by unit, the sum over j of m_ij keeps copies copies, and a LayerNorm over
``factor`` copies of each unit has the same mean and variance, so the normalised vector is the copies of the
old one (gamma, beta copied). The coordinate update reads phi_x's scalar and the unchanged x: the same.

The fractions are 1/factor +- a random spread, not 1/factor exactly: with equal fractions two copies get equal
gradients forever and the wider model can never use its width; with unequal ones their outgoing weights
differ, so their gradients do from the first step on (the function at the start is the same either way).

What stays narrow: the residue-index / timestep sinusoids (``embed_dim`` = the old hidden width, so the input
features are the same numbers; the first block's embedding_in maps them to the new width) and the offset
embedding (``edge_dim``, its columns of phi_e's first layer are copied like any other input of that layer's
rows).
"""
from __future__ import annotations

import argparse
import os

import torch

from protdiff_fast.models import ProtDiff, ProtDiffConfig


def _widen_linear(weight, bias, rows: bool, cols, factor: int, spread: float, gen: torch.Generator):
    """rows: copy the outputs ``factor`` times. cols: the input segments, (width, replicated) in order."""
    pieces, start = [], 0
    for width, replicated in cols:
        block = weight[:, start:start + width]
        start += width
        if not replicated:
            pieces.append(block)
            continue
        offsets = (torch.rand(factor, width, generator=gen, dtype=torch.float64) * 2 - 1) * spread
        fractions = 1.0 / factor + offsets - offsets.mean(0, keepdim=True)  # each column's copies sum to 1
        pieces.append(torch.cat([block * fractions[r].to(block.dtype) for r in range(factor)], dim=1))
    if start != weight.shape[1]:
        raise RuntimeError(f"widen: input segments cover {start} of {weight.shape[1]} columns")
    out = torch.cat(pieces, dim=1)
    if rows:
        out = out.repeat(factor, 1)
        bias = None if bias is None else bias.repeat(factor)
    return out, bias


def widen(state: dict, factor: int, spread: float = 0.25, seed: int = 0) -> dict:
    """A slim checkpoint (model_config + ema, as shipped) with every hidden width times ``factor``."""
    if not isinstance(factor, int) or factor < 2:
        raise ValueError(f"factor: an integer >= 2, got {factor!r}")
    if not 0 <= spread < 1.0 / factor:
        raise ValueError(f"spread: in [0, 1/factor) so every fraction stays positive, got {spread}")
    config = dict(state["model_config"])
    old = ProtDiffConfig(**config)
    H, E = old.hidden_dim, old.edge_dim
    weights = state["ema"] if "ema" in state else state["model"]
    gen = torch.Generator().manual_seed(seed)
    out = {}

    def linear(prefix, rows, cols):
        w, b = _widen_linear(weights[prefix + ".weight"], weights.get(prefix + ".bias"), rows, cols, factor, spread,
                             gen)
        out[prefix + ".weight"] = w
        if b is not None:
            out[prefix + ".bias"] = b

    for k in range(old.num_layers):
        p = f"blocks.{k}."
        last = k == old.num_layers - 1
        linear(p + "embedding_in", True, [(old.input_dim if k == 0 else H, k > 0)])
        linear(p + "egnn.phi_e.0", True, [(H, True), (H, True), (1, False), (E, False)])  # h_i, h_j, d^2, edge
        linear(p + "egnn.phi_e.2", True, [(H, True)])  # -> m_ij
        linear(p + "egnn.phi_x.0", True, [(H, True)])
        linear(p + "egnn.phi_x.2", False, [(H, True)])  # the scalar phi_x
        if not last:
            linear(p + "egnn.phi_h.0", True, [(H, True), (H, True)])  # [h_i, m_i]
            linear(p + "egnn.phi_h.2", True, [(H, True)])
            linear(p + "embedding_out", True, [(H, True)])
            out[p + "norm.weight"] = weights[p + "norm.weight"].repeat(factor)
            out[p + "norm.bias"] = weights[p + "norm.bias"].repeat(factor)
    config["hidden_dim"] = H * factor
    config["embed_dim"] = old.input_dim
    new_config = ProtDiffConfig(**config)
    expected = ProtDiff(new_config, backend="reference").state_dict()
    if set(expected) != set(out) or any(expected[k].shape != out[k].shape for k in out):
        bad = sorted(k for k in set(expected) | set(out) if k not in out or k not in expected
                     or expected[k].shape != out[k].shape)
        raise RuntimeError(f"widen: keys / shapes differ from the wider model's: {bad[:4]}")
    note = f"widened from hidden {H} to {H * factor} (unit replication, split fractions +- {spread}, seed {seed})"
    trained = dict(state.get("trained") or {})
    trained["note"] = (trained.get("note", "") + "; " + note).lstrip("; ")
    return dict(model_config=new_config.to_dict(), ema=out, version=state.get("version"), trained=trained)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="checkpoint or shipped .pt")
    ap.add_argument("dst")
    ap.add_argument("--factor", type=int, default=2, help="width multiplier (default 2)")
    ap.add_argument("--spread", type=float, default=0.25,
                    help="split fractions 1/factor +- this, so the copies can part (default 0.25)")
    ap.add_argument("--seed", type=int, default=0, help="draw of the split fractions")
    args = ap.parse_args()
    state = torch.load(args.src, map_location="cpu", weights_only=False)
    wide = widen(state, args.factor, args.spread, args.seed)
    tmp = args.dst + ".tmp"
    torch.save(wide, tmp)
    os.replace(tmp, args.dst)
    cfg = wide["model_config"]
    print(f"{args.dst}: hidden {cfg['hidden_dim']}, embed {cfg.get('embed_dim')}, edge {cfg['edge_dim']}, "
          f"{sum(v.numel() for v in wide['ema'].values())} parameters")


if __name__ == "__main__":
    main()
