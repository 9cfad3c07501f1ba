"""Write the slim checkpoint shipped in the package: EMA weights, model config and training facts.

    python scripts/ship_checkpoint.py runs/x/checkpoint.pt protdiff_fast/data/protdiff_small.pt --note "..."
"""
import argparse
import platform

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    state = torch.load(args.src, map_location="cpu", weights_only=False)
    slim = dict(model_config=state["model_config"], ema=state["ema"], version=state["version"],
                trained=dict(step=state["step"], config=state["config"], machine=platform.processor() or platform.machine(),
                             torch=torch.__version__, note=args.note,
                             last=state["history"][-1] if state.get("history") else None))
    torch.save(slim, args.dst)
    print(f"{args.dst}: step {state['step']}, {sum(v.numel() for v in state['ema'].values())} values")


if __name__ == "__main__":
    main()
