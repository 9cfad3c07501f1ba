"""The setup the evaluation scripts share: a checkpoint, the held-out chains of a split, and the lengths
to sample (those chains' lengths, ``--repeats`` designs each, in the same order everywhere, so that design
k and its seed are the same design in ``evaluate_checkpoint.py``, ``clash_pairs.py`` and ``trace_design.py``)."""
import argparse

from protdiff_fast.diffusion import DDPMScheduler
from protdiff_fast.io import BackboneDataset
from protdiff_fast.train import load_model


def heldout_parser(description: str, repeats: int = 1) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("ckpt")
    ap.add_argument("data")
    ap.add_argument("--split", default="test")
    ap.add_argument("--num", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=repeats, help="designs per held-out length")
    return ap


def load_heldout(args: argparse.Namespace):
    """(model, held-out dataset, lengths to sample, the model's own DDPM scheduler)."""
    model = load_model(args.ckpt)
    cfg = model.config
    held = BackboneDataset.from_npz(args.data, split=args.split, max_length=cfg.max_length)
    lengths = [len(c) for c in held.coords][: args.num] * args.repeats
    return model, held, lengths, DDPMScheduler(cfg.num_timesteps, cfg.beta_start, cfg.beta_end)
