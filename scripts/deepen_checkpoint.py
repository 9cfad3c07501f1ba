"""Grow a trained ProtDiff by identity blocks: the deeper model computes the same eps_hat at the start.

    python scripts/deepen_checkpoint.py protdiff_fast/data/protdiff_small.pt runs/deep6.pt --add 2
    protdiff-fast train ... --layers 6 --init runs/deep6.pt

The new blocks go before the last one (the last block only moves x). Each starts as the identity on
(h, x): embedding_in = I; phi_h's and phi_x's output layers zero, so the EGNN layer returns (h, x)
unchanged; embedding_out undoes the previous block's LayerNorm affine, y -> (y - beta) / gamma, which
gives back the normalised vector, and the new LayerNorm carries the same gamma and beta, so it returns
y (up to LayerNorm's eps). Their hidden layers (phi_e, phi_x[0], phi_h[0]) keep the model's own random
initialisation, so fine-tuning has something to grow from: the zero output layers get gradients at the
first step, the hidden layers from the second on.
"""
from __future__ import annotations

import argparse
import os

import torch

from protdiff_fast.models import ProtDiff, ProtDiffConfig


def deepen(state: dict, add: int, seed: int = 0) -> dict:
    """A slim checkpoint (model_config + ema, as shipped) with ``add`` identity blocks before the last."""
    if add < 1:
        raise ValueError("add: at least one block")
    config = dict(state["model_config"])
    old_layers = config["num_layers"]
    if old_layers < 2:
        raise ValueError("deepen: the model needs a block with a LayerNorm before its last block")
    weights = state["ema"] if "ema" in state else state["model"]
    config["num_layers"] = old_layers + add
    torch.manual_seed(seed)
    grown = ProtDiff(ProtDiffConfig(**config), backend="reference").state_dict()
    last_old, first_new = old_layers - 1, old_layers - 1  # new blocks take indices first_new .. first_new+add-1
    out = {}
    for key, value in weights.items():
        k = int(key.split(".")[1])
        rest = key.split(".", 2)[2]
        new_k = k if k < last_old else k + add
        out[f"blocks.{new_k}.{rest}"] = value.clone()
    gamma = weights[f"blocks.{last_old - 1}.norm.weight"]
    beta = weights[f"blocks.{last_old - 1}.norm.bias"]
    if bool((gamma.abs() < 1e-3).any()):
        raise ValueError("deepen: a LayerNorm weight is ~0, so its affine cannot be undone")
    H = gamma.numel()
    for k in range(first_new, first_new + add):
        new = {rest: grown[f"blocks.{k}.{rest}"].clone() for rest in
               (key.split(".", 2)[2] for key in grown if key.startswith(f"blocks.{k}."))}
        new["embedding_in.weight"] = torch.eye(H)
        new["embedding_in.bias"] = torch.zeros(H)
        new["egnn.phi_h.2.weight"].zero_()
        new["egnn.phi_h.2.bias"].zero_()
        new["egnn.phi_x.2.weight"].zero_()
        new["embedding_out.weight"] = torch.diag(1.0 / gamma)
        new["embedding_out.bias"] = -beta / gamma
        new["norm.weight"] = gamma.clone()
        new["norm.bias"] = beta.clone()
        for rest, value in new.items():
            out[f"blocks.{k}.{rest}"] = value
    missing = set(grown) - set(out)
    if missing or set(out) - set(grown):
        raise RuntimeError(f"deepen: key mismatch {sorted(missing)[:4]} {sorted(set(out) - set(grown))[:4]}")
    note = f"deepened from {old_layers} to {old_layers + add} blocks (identity blocks before the last)"
    trained = dict(state.get("trained") or {})
    trained["note"] = (trained.get("note", "") + "; " + note).lstrip("; ")
    return dict(model_config=config, ema=out, version=state.get("version"), trained=trained)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="checkpoint or shipped .pt")
    ap.add_argument("dst")
    ap.add_argument("--add", type=int, default=2, help="blocks to add (default 2)")
    ap.add_argument("--seed", type=int, default=0, help="initialisation of the new blocks' hidden layers")
    args = ap.parse_args()
    state = torch.load(args.src, map_location="cpu", weights_only=False)
    grown = deepen(state, args.add, args.seed)
    tmp = args.dst + ".tmp"
    torch.save(grown, tmp)
    os.replace(tmp, args.dst)
    print(f"{args.dst}: {grown['model_config']['num_layers']} blocks, "
          f"{sum(v.numel() for v in grown['ema'].values())} parameters")


if __name__ == "__main__":
    main()
