"""Compare a trained ProtDiff with the same architecture untrained and with real held-out chains.

    python scripts/evaluate_checkpoint.py CKPT DATA.npz --split test --num 24 --out report.md

Samples the lengths of the held-out chains (all T steps, the default backend), computes the metrics
of protdiff_fast.metrics on the samples of both models and on the real chains, and writes a
markdown table with the command, machine and timings.
"""
import platform
import time

import numpy as np
import torch
from heldout import heldout_parser, load_heldout

from protdiff_fast.diffusion import ClashGuidance, DDPMScheduler
from protdiff_fast.diffusion.sampler import sample
from protdiff_fast.io.structure import CHAIN_BREAK_A
from protdiff_fast.metrics import backbone_metrics, format_table, summarize
from protdiff_fast.models import ProtDiff
from protdiff_fast.train import load_model


def main() -> None:
    ap = heldout_parser(__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--compare", default=None, help="another checkpoint to sample with the same seeds (a column)")
    ap.add_argument("--matmul-precision", default=None, choices=["highest", "high", "medium"])
    ap.add_argument("--skip-untrained", action="store_true", help="no untrained-model column")
    ap.add_argument("--noise-scale", type=float, default=1.0, help="DDPMScheduler(noise_scale=...) for every model")
    ap.add_argument("--clash-guidance", type=float, default=None, metavar="STRENGTH",
                    help="DDPMScheduler(clash_guidance=ClashGuidance(STRENGTH)) for every model")
    ap.add_argument("--steps", type=int, default=None, metavar="K",
                    help="sample with K respaced steps (set_timesteps(K)) instead of all T")
    ap.add_argument("--eta", type=float, default=1.0,
                    help="DDPMScheduler(eta=...): 1 ancestral (default), 0 deterministic DDIM")
    ap.add_argument("--variance", default="fixed_small", choices=["fixed_small", "fixed_large"],
                    help="DDPMScheduler(variance_type=...)")
    args = ap.parse_args()
    if args.matmul_precision:
        torch.set_float32_matmul_precision(args.matmul_precision)
    trained, held, lengths, _ = load_heldout(args)
    cfg = trained.config
    torch.manual_seed(1234)
    untrained = ProtDiff(cfg).eval()
    real = [c.double().numpy() * held.scale for c in held.coords][: args.num]
    scheduler = DDPMScheduler(cfg.num_timesteps, cfg.beta_start, cfg.beta_end, noise_scale=args.noise_scale,
                              eta=args.eta, variance_type=args.variance,
                              clash_guidance=None if args.clash_guidance is None else ClashGuidance(args.clash_guidance))
    # the .npz holds no residue numbers: a real CA-CA bond longer than 4.2 A spans missing residues (a
    # gap, not a bad bond); designs get no breaks, so a long bond of theirs stays a bad bond
    real_rows = [backbone_metrics(c, breaks=np.linalg.norm(np.diff(c, axis=0), axis=1) > CHAIN_BREAK_A) for c in real]
    columns, timing = {f"real ({args.split}, n={len(real)})": summarize(real_rows)}, {}
    models = [("this model", trained)]
    if args.compare:
        models.append(("--compare model", load_model(args.compare)))
    if not args.skip_untrained:
        models.append(("untrained model", untrained))
    for name, model in models:
        t0 = time.perf_counter()
        with torch.no_grad():
            designs = sample(model, lengths, seed=args.seed, scheduler=scheduler, batch_size=64, progress=False,
                             num_inference_steps=args.steps)
        timing[name] = time.perf_counter() - t0
        columns[name] = summarize([backbone_metrics(c) for c in designs])
    table = format_table(columns)
    text = "\n".join([
        f"# {args.ckpt}: samples vs real held-out chains", "",
        f"- command: `python scripts/evaluate_checkpoint.py {args.ckpt} {args.data} --split {args.split} "
        f"--num {args.num} --seed {args.seed} --repeats {args.repeats}"
        + (f" --compare {args.compare}" if args.compare else "")
        + (f" --matmul-precision {args.matmul_precision}" if args.matmul_precision else "")
        + (" --skip-untrained" if args.skip_untrained else "")
        + (f" --noise-scale {args.noise_scale:g}" if args.noise_scale != 1.0 else "")
        + (f" --clash-guidance {args.clash_guidance:g}" if args.clash_guidance is not None else "")
        + (f" --steps {args.steps}" if args.steps is not None else "")
        + (f" --eta {args.eta:g}" if args.eta != 1.0 else "")
        + (f" --variance {args.variance}" if args.variance != "fixed_small" else "") + "`",
        f"- machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; sampling time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timing.items()),
        f"- model: {sum(p.numel() for p in trained.parameters())} parameters, config {cfg.to_dict()}",
        f"- lengths sampled: those of the held-out chains ({min(lengths)}..{max(lengths)}), "
        f"{args.repeats} design(s) each ({len(lengths)} per model)", "",
        "```", table, "```", ""])
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
