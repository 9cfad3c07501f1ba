"""The ``protdiff-fast scaffold`` command: designs, their PDB files, and a summary with motif RMSDs.

Output folder (must be new or empty; every file is written atomically):

- ``design_<i>.pdb``: the reported backbone of design i (CA only). Motif residues carry their
  real residue names and B-factor 1.00, scaffold residues are GLY with B-factor 0.00; REMARK 999
  lines give the method, the concrete contig and the motif positions.
- ``summary.json`` / ``summary.csv``: per design its length, contig, motif positions, motif RMSD
  (the design itself), re-denoised motif RMSD (see :func:`protdiff_fast.motif.scaffold.redenoise`),
  backbone metrics and, for SMCDiff, the reported particle's weight; the run's success rates at
  motif RMSD < 1 A (``success_rate`` of the designs themselves is near 1 for every method, since the
  motif is imposed down to t = 1; ``redenoise_success_rate`` is the one that compares methods); for
  SMCDiff the ESS per step and every resampling event.
"""
from __future__ import annotations

import csv
import io
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from protdiff_fast.io.dataset import SCALE_A
from protdiff_fast.metrics.motif import SUCCESS_RMSD_A, motif_rmsd, success_rate
from protdiff_fast.io.jsonio import dumps_strict

LAYOUT_SALT = 0x5CAFF01D  # layouts draw from their own stream, independent of the sampler's


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _design_structure(ca_a: np.ndarray, positions: np.ndarray, motif_seq: str, remarks: List[str]):
    from protdiff_fast.io.structure import backbone_structure

    seq = ["G"] * len(ca_a)
    for p, aa in zip(positions.tolist(), motif_seq):
        seq[p] = aa if aa in "ACDEFGHIKLMNPQRSTVWY" else "G"
    st = backbone_structure(ca_a, sequence="".join(seq))
    motif = set(positions.tolist())
    for i, res in enumerate(st[0][0]):
        res[0].b_iso = 1.0 if i in motif else 0.0  # B-factor marks the motif residues
    st.raw_remarks = [line for text in remarks for line in _remark_lines(text)]
    return st


def _remark_lines(text: str, width: int = 80) -> List[str]:
    """``text`` as REMARK 999 records of at most ``width`` columns, broken after a comma or at a space
    (continuation lines indented two spaces). Cutting at column 80 turned a motif list "...,81,91" into
    "...,81,9": a wrong residue, not merely a short line."""
    head, lines, rest = "REMARK 999 ", [], text
    while True:
        indent = "  " if lines else ""
        room = width - len(head) - len(indent)
        if len(rest) <= room:
            lines.append(head + indent + rest)
            return lines
        cut = max(rest.rfind(",", 0, room) + 1, rest.rfind(" ", 0, room + 1))
        if cut <= 0:  # one token longer than a line (a long file name): split it
            cut = room
        lines.append(head + indent + rest[:cut].rstrip())
        rest = rest[cut:].lstrip()


def run_scaffold(
    pdb: str,
    contig: str,
    out: str,
    *,
    length: Optional[str] = None,
    num: int = 10,
    particles: int = 64,
    method: str = "smc",
    steps: Optional[int] = None,
    seed: int = 0,
    ckpt: Optional[str] = None,
    backend: str = "auto",
    device: str = "cpu",
    resampler: str = "systematic",
    ess_threshold: float = 0.5,
    redenoise_t: int = 50,
    progress: bool = True,
    command: str = "",
    autocast: Optional[str] = None,
    clash_guidance=None,
) -> Dict:
    """Scaffold the motif ``contig`` of ``pdb`` into ``num`` designs written to ``out`` (see the module
    docstring). ``clash_guidance`` (a :class:`protdiff_fast.diffusion.ClashGuidance`) guides the
    designs' sampling ('replacement' and 'fixed' only: SMCDiff's weights need the model's own
    transition); the re-denoising check always runs unguided, as the model alone would."""
    import warnings

    import torch

    from protdiff_fast.diffusion import DDPMScheduler
    from protdiff_fast.io.structure import _atomic_write
    from protdiff_fast.metrics import backbone_metrics, summarize
    from protdiff_fast.motif.contig import motif_spec
    from protdiff_fast.motif.scaffold import METHODS, redenoise, scaffold
    from protdiff_fast.ops.ddpm_cpu import per_sample_seeds
    from protdiff_fast.train import load_model

    if method not in METHODS:
        raise ValueError(f"--method: expected one of {METHODS}, got {method!r}")
    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")
    if particles < 1:
        raise ValueError(f"--particles must be >= 1, got {particles}")
    if redenoise_t < 0:
        raise ValueError(f"--redenoise-t must be >= 0 (0: skip), got {redenoise_t}")
    if clash_guidance is not None and method == "smc":
        raise ValueError("--clash-guidance: not with --method smc (SMCDiff's weights are the motif's likelihood "
                         "under the model's own reverse transition); use --method replacement or fixed")
    out_dir = Path(out)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir}: exists and is not an empty folder; choose a new one (nothing is overwritten)")
    if ckpt is None:
        from protdiff_fast.cli import shipped_checkpoint

        ckpt = str(shipped_checkpoint())
    model = load_model(ckpt, backend=backend, device=device)
    cfg = model.config
    eps_model = model
    if autocast is not None:  # "bfloat16" | "float16": the model under torch.autocast, all else float32
        if autocast not in ("bfloat16", "float16"):
            raise ValueError(f"autocast: 'bfloat16' or 'float16' (or None), got {autocast!r}")
        from protdiff_fast.motif.scaffold import AutocastEps
        eps_model = AutocastEps(model, getattr(torch, autocast))
    if redenoise_t > cfg.num_timesteps:
        raise ValueError(f"--redenoise-t must be <= T = {cfg.num_timesteps}, got {redenoise_t}")
    # here, not in the scheduler: its message names num_inference_steps, which no option is called
    if steps is not None and not 1 <= steps <= cfg.num_timesteps:
        raise ValueError(f"--steps must lie in [1, T = {cfg.num_timesteps}], got {steps}")
    spec = motif_spec(pdb, contig, length, max_model_length=model.max_length)
    shortest_trained = getattr(model, "min_training_length", None)
    if shortest_trained is not None and spec.min_length < shortest_trained:
        warnings.warn(f"length: designs of {spec.min_length}.. residues, shorter than any chain this model was "
                      f"trained on ({shortest_trained}..): expect poor scaffolds", UserWarning, stacklevel=2)
    layout_seeds = per_sample_seeds(int(seed) ^ LAYOUT_SALT, num)
    layouts = [spec.sample_layout(int(s)) for s in layout_seeds]
    K = particles if method == "smc" else 1  # replacement and fixed: one independent sample per design
    _log(f"scaffold: {spec.num_motif} motif residues from {pdb} ({contig}); {num} designs of lengths "
         f"{spec.min_length}..{spec.max_length}; method {method}, {K} particle(s) per design "
         f"({num * K} in one batch)")
    scheduler = DDPMScheduler(cfg.num_timesteps, cfg.beta_start, cfg.beta_end, backend=backend,
                              clash_guidance=clash_guidance)
    unguided = DDPMScheduler(cfg.num_timesteps, cfg.beta_start, cfg.beta_end, backend=backend)
    made = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)  # before the sampling: a folder it cannot make fails now
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            result = scaffold(eps_model, spec.motif_model_units(), [lay.length for lay in layouts],
                              np.stack([lay.motif_positions for lay in layouts]), method=method, particles=K,
                              scheduler=scheduler, num_inference_steps=steps, seed=seed, resampler=resampler,
                              ess_threshold=ess_threshold, device=device, progress=progress, log=_log)
            designs = [result.design(d) for d in range(num)]
            red = redenoise(eps_model, designs, t_start=redenoise_t, scheduler=unguided, seed=seed,
                            device=device) if redenoise_t > 0 else None
    except BaseException:
        if made and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # a failed run leaves no folder behind it made
        raise
    elapsed = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    # the folder was empty at the start, but the sampling takes minutes: a second run given the same
    # --out wrote its files meanwhile, and the renames below replaced them without a word
    taken = [n for n in [f"design_{d:04d}.pdb" for d in range(num)] + ["summary.json", "summary.csv"]
             if (out_dir / n).exists()]
    if taken:
        raise FileExistsError(f"{out_dir}: {', '.join(taken[:3])}{' ...' if len(taken) > 3 else ''} appeared while "
                              "this run was sampling (another run writing to the same folder?); nothing "
                              "overwritten, this run's designs not written")
    rows = []
    for d, lay in enumerate(layouts):
        ca = designs[d] * SCALE_A
        pos = lay.motif_positions
        row = dict(design=f"design_{d:04d}.pdb", length=lay.length, contig=lay.contig(spec.segments),
                   motif_positions=(pos + 1).tolist(),
                   motif_rmsd=float(motif_rmsd(ca[pos], spec.motif_ca)[0]))
        if red is not None:
            row["redenoise_motif_rmsd"] = float(motif_rmsd(red[d][pos] * SCALE_A, spec.motif_ca)[0])
        if method == "smc" and K > 1:
            row["particle"] = int(result.chosen[d])
            row["log_weight"] = float(result.log_weights[d, result.chosen[d]])
            row["final_ess"] = float(np.exp(-np.logaddexp.reduce(2 * result.log_weights[d])))
        row.update(backbone_metrics(ca))
        remarks = [f"PROTDIFF_FAST SCAFFOLD METHOD {method} PARTICLES {K} SEED {seed}",
                   f"CONTIG {row['contig']}", f"MOTIF FROM {Path(pdb).name} {contig}",
                   "MOTIF RESIDUES (B-FACTOR 1.00) " + _ranges(pos + 1)]
        st = _design_structure(ca, pos, spec.sequence, remarks)
        _atomic_write(out_dir / row["design"], lambda tmp, st=st: st.write_pdb(tmp))
        rows.append(row)
    rmsds = [r["motif_rmsd"] for r in rows]
    summary = dict(
        command=command, checkpoint=str(ckpt), pdb=str(pdb), contig=contig, length=f"{spec.min_length}-{spec.max_length}",
        method=method, particles=K, num_designs=num, steps=len(result.timesteps), seed=seed, seconds=round(elapsed, 2),
        motif_residues=spec.num_motif, success_threshold_A=SUCCESS_RMSD_A,
        mean_motif_rmsd=float(np.mean(rmsds)), success_rate=success_rate(rmsds),
        backbone=summarize(rows))
    if autocast is not None:  # only then: float32 summaries stay as they were
        summary["autocast"] = autocast
    if clash_guidance is not None:
        summary["clash_guidance"] = scheduler.config["clash_guidance"]
    if red is not None:
        rr = [r["redenoise_motif_rmsd"] for r in rows]
        summary.update(redenoise_t=redenoise_t, mean_redenoise_motif_rmsd=float(np.mean(rr)),
                       redenoise_success_rate=success_rate(rr))
    smc_log = None
    if method == "smc" and K > 1:
        ess = result.ess
        smc_log = dict(timesteps=result.timesteps,
                       min_ess=[None if np.isnan(r).all() else float(np.nanmin(r)) for r in ess],
                       mean_ess=[None if np.isnan(r).all() else float(np.nanmean(r)) for r in ess],
                       resampling_events=result.events)
        summary["resampling_events"] = len(result.events)
    content = dict(summary=summary, designs=rows, smc_log=smc_log)
    _atomic_write(out_dir / "summary.json", lambda tmp: Path(tmp).write_text(dumps_strict(content, indent=1)))
    buf = io.StringIO()
    keys = [k for k in rows[0] if k != "motif_positions"]
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    _atomic_write(out_dir / "summary.csv", lambda tmp: Path(tmp).write_text(buf.getvalue()))
    return content


def _ranges(positions: np.ndarray) -> str:
    """[3, 4, 5, 9] -> '3-5,9'."""
    out, start, prev = [], None, None
    for p in positions.tolist():
        if start is None:
            start = prev = p
        elif p == prev + 1:
            prev = p
        else:
            out.append(f"{start}-{prev}" if prev > start else str(start))
            start = prev = p
    out.append(f"{start}-{prev}" if prev > start else str(start))
    return ",".join(out)
