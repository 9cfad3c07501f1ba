"""Training ProtDiff: L_simple per real residue, Adam(W), gradient clipping, EMA, atomic checkpoints,
bit-for-bit resume, and PyTorch DDP (torchrun) for several processes or GPUs.

Determinism: the data order comes from (seed, epoch), the timesteps and noise of a step from a
generator whose state is checkpointed, so ``resume`` continues exactly where the run stopped (on
the same device, backend and thread count; ``protdiff_fast._mkl_warmup`` keeps a process's first
parallel torch math call from running a low-accuracy MKL kernel, which once made a resumed run
differ in the last bits). Under DDP every rank draws the timesteps and noise of the whole global
batch from the same generator and keeps its slice, and the loss is normalised
by the global number of real residues: the gradient equals the one-process gradient of the same
global batch (up to the order of the floating-point sums).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from protdiff_fast._checks import check_device
from protdiff_fast.diffusion.schedule import NoiseSchedule
from protdiff_fast.io.dataset import SCALE_A, BackboneDataset
from protdiff_fast.io.structure import _atomic_write
from protdiff_fast.models.protdiff import MAX_LENGTH, ProtDiff, ProtDiffConfig
from protdiff_fast.reference.ddpm import add_noise, predict_x0_from_eps, sample_noise

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    data: str = ""  # a .npz (backbones format) or a folder / file of structures
    out_dir: str = "runs/protdiff"
    steps: int = 1000
    batch_size: int = 8  # the global batch (split across DDP ranks)
    lr: float = 1e-4
    weight_decay: float = 0.0  # AdamW's decoupled decay (0: Adam)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    # EMA warm-up: the k-th update (k = step, 0-based) uses min(ema_decay, (1 + k) / (10 + k)), so the
    # average forgets a random initialisation within tens of steps instead of ~1 / (1 - ema_decay)
    # (diffusers' EMAModel does the same); off by default: the shipped model's runs had none
    ema_warmup: bool = False
    # linear learning-rate warm-up over the first warmup_steps steps ((k + 1) / warmup_steps of the
    # schedule's value); a cosine schedule then decays over the remaining steps
    warmup_steps: int = 0
    ckpt_every: int = 200
    # validation: L_simple of the EMA weights (what load_model samples with, not the raw ones) on the first
    # val_batches batches of the val split, the same t and noise every time, t from 1..T; 0: never
    val_every: int = 200
    val_batches: int = 4
    # a dataset without a 'val' split (prepare's, a folder of structures): hold out this fraction of its
    # whole chains of min_length..max_length for validation (0: none, and no validation loss), chosen by a
    # hash of their sequence (``held_out_chains``), so every run and every DDP rank holds out the same ones
    val_fraction: float = 0.0
    seed: int = 0
    rotate: bool = True
    min_length: int = 40
    max_length: int = 128
    # crop: also train on chains longer than max_length, one random break-free window of max_length
    # residues per chain and epoch (more data and more local structure than the short chains alone)
    crop: bool = False
    # each training chain (or crop window) of at most short_max_length residues appears short_repeat
    # times per epoch (1: once, as before): with --crop, chains of <= 50 residues are 1.5% of the mix
    short_repeat: int = 1
    short_max_length: int = 64
    lr_schedule: str = "constant"  # or "cosine": lr * (f + (1 - f) (1 + cos(pi step / steps)) / 2), f = 0.02
    init: str = ""  # start from these weights (a checkpoint's model/EMA or a shipped file), fresh optimizer
    # a fraction of the training timesteps drawn from 1..low_t_max instead of 1..T: the same L_simple
    # at each t, weighted towards the last steps of sampling, where the local geometry (bond angles,
    # clashes) is settled; validation always draws t from 1..T
    low_t_fraction: float = 0.0
    low_t_max: int = 128
    # an auxiliary loss on the distances of the predicted x_0 (``structure_loss``) for the designs
    # whose t <= structure_max_t, weighted by structure_weight (0: L_simple alone, as before)
    structure_weight: float = 0.0
    structure_max_t: int = 256
    structure_cutoff: float = 0.6  # model units (6 A)
    # a repulsive term (``clash_loss``) on the same predicted x_0 for the designs whose t <= clash_max_t
    # (None: structure_max_t): pairs |i - j| >= 2 closer than clash_distance, weighted by clash_weight
    clash_weight: float = 0.0
    clash_distance: float = 0.38  # model units (3.8 A)
    clash_max_t: Optional[int] = None
    # input perturbation (DDPM-IP, Ning et al. 2023): the network sees x_t built from eps + gamma * xi
    # (xi a second CoM-free Gaussian draw) while L_simple's target stays eps, so it learns to correct the
    # off-distribution x_t its own earlier steps produce when sampling (exposure bias); 0: off
    input_perturbation: float = 0.0
    # states of the model's own sampling (``scripts/own_states.py``: the x_t its reverse steps at t <=
    # own_max_t started from): own_clash_weight times ``clash_loss`` of the predicted x_0 on own_batch of
    # them per step (target clash_distance, no data behind a state), weighted as the clash term. L_simple
    # on noised real chains never shows the model the tight packings its own earlier steps produce
    own_states: str = ""
    own_clash_weight: float = 0.0
    own_batch: int = 8
    own_max_t: int = 128
    # a second pool of own states, at high t (``scripts/own_states.py --min-t``): own_extent_weight times
    # ``extent_loss`` of the predicted x_0 (residues further from the centre than own_extent_factor x
    # 2.2 N^0.38 A, which no protein chain has) on own_batch of them with t >= own_extent_min_t, SNR-weighted.
    # Against the runaway of short chains at t ~ 700 (|eps_hat| 40 where the noise has |eps| ~ 2)
    own_extent_states: str = ""
    own_extent_weight: float = 0.0
    own_extent_min_t: int = 512
    own_extent_factor: float = 3.5
    backend: str = "auto"
    device: str = "cpu"
    model: Dict = field(default_factory=dict)  # ProtDiffConfig overrides


LR_FLOOR = 0.02
NO_MAX_LENGTH = 1 << 30
# short_repeat's bound: every repeat is an item of each epoch's list of batches, built when the epoch starts
# (K = 10000 on the 64 demo chains took a minute for one step; 1000, 5 s)
MAX_SHORT_REPEAT = 1000
# seed's bound: it is combined with epochs and steps (seed * 1000003 + step + 2^40) into 64-bit torch seeds
MAX_SEED = (1 << 32) - 1

# the integer options of TrainConfig: (field, least, most or None, why the most)
INT_OPTIONS = (
    ("steps", 0, None, ""), ("batch_size", 1, None, ""), ("warmup_steps", 0, None, ""),
    ("ckpt_every", 0, None, ""), ("val_every", 0, None, ""), ("val_batches", 1, None, ""),
    ("seed", 0, MAX_SEED, "it is combined with steps into 64-bit torch seeds"),
    ("min_length", 1, None, ""),
    ("max_length", 1, MAX_LENGTH, "the model's residue-index and offset tables grow with it; no protein chain is "
                                  "that long"),
    ("low_t_max", 1, None, ""), ("structure_max_t", 1, None, ""), ("clash_max_t", 1, None, ""),
    ("own_batch", 1, None, ""), ("own_max_t", 1, None, ""), ("own_extent_min_t", 1, None, ""),
    ("short_repeat", 1, MAX_SHORT_REPEAT, "each repeat is an item of every epoch's list of batches"),
    ("short_max_length", 1, None, ""),
)
# the float options: (field, interval), with "[" / "(" a closed / open end; inf only where the interval says so
FLOAT_OPTIONS = (
    ("lr", "(0, inf)"), ("weight_decay", "[0, inf)"),
    ("grad_clip", "(0, inf]"),  # inf: no clipping (the norm is still checked for NaN)
    ("ema_decay", "[0, 1)"), ("low_t_fraction", "[0, 1]"), ("val_fraction", "[0, 1)"),
    ("structure_weight", "[0, inf)"), ("structure_cutoff", "(0, inf)"),
    ("clash_weight", "[0, inf)"), ("clash_distance", "(0, inf)"),
    ("input_perturbation", "[0, inf)"), ("own_clash_weight", "[0, inf)"),
    ("own_extent_weight", "[0, inf)"), ("own_extent_factor", "(0, inf)"),
)


def check_option_ranges(values: Dict, name=lambda field: field) -> None:
    """Refuse an integer option out of its range and a float option that is not a finite number in its
    range (NaN and inf trained to a FloatingPointError, or to nothing), naming it as ``name(field)``.
    ``values``: the options by TrainConfig field name (missing or None ones are not checked)."""
    for field_name, least, most, why in INT_OPTIONS:
        v = values.get(field_name)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < least or (most is not None and v > most):
            span = f">= {least}" if most is None else f"from {least} to {most}" + (f" ({why})" if why else "")
            raise ValueError(f"{name(field_name)} must be an integer {span}, got {v!r}")
    for field_name, interval in FLOAT_OPTIONS:
        v = values.get(field_name)
        if v is None:
            continue
        lo, hi = (float(b) for b in interval[1:-1].split(","))
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and \
            (lo <= v if interval[0] == "[" else lo < v) and (v <= hi if interval[-1] == "]" else v < hi)
        if not ok:  # (NaN fails every comparison)
            what = "a number" if interval.endswith("inf]") else "a finite number"
            span = f"{'>=' if interval[0] == '[' else '>'} {lo:g}" if math.isinf(hi) else f"in {interval}"
            raise ValueError(f"{name(field_name)} must be {what} {span}"
                             + (" (inf: no clipping)" if field_name == "grad_clip" else "") + f", got {v!r}")


def _sequence_key(data: BackboneDataset, i: int) -> str:
    """What ``held_out_chains`` groups chains by: the sequence, or the name of a chain without one."""
    return f"seq:{data.sequences[i]}" if data.sequences[i] else f"name:{data.names[i]}"


def held_out_chains(data: BackboneDataset, fraction: float, min_length: int, max_length: int) -> List[int]:
    """Indices of the chains of ``data`` that ``--val-fraction fraction`` holds out for validation.

    The candidates are the whole chains of ``min_length..max_length`` residues (what validation reads);
    ceil(fraction x their number) of them are held out, taken group by group in the order of the SHA-256
    of the group's key: its sequence (or, for a chain without one, its name). So the choice depends on
    the chains alone, not on file order, and a sequence is never on both sides: every chain of a
    held-out sequence is held out (``load_data`` keeps its longer chains out of training too)."""
    lengths = data.lengths
    candidates = [i for i in range(len(data)) if min_length <= lengths[i] <= max_length]
    want = math.ceil(fraction * len(candidates)) if fraction > 0 else 0
    groups: Dict[str, List[int]] = {}
    for i in candidates:
        groups.setdefault(_sequence_key(data, i), []).append(i)
    held: List[int] = []
    for k in sorted(groups, key=lambda k: (hashlib.sha256(k.encode()).hexdigest(), k)):
        if len(held) >= want:
            break
        held += groups[k]
    return sorted(held)


def _read_chains(cfg: TrainConfig, split: Optional[str], max_length: int) -> BackboneDataset:
    """The chains of ``cfg.data``'s ``split`` of min_length..``max_length`` residues."""
    path = Path(cfg.data)
    if path.suffix == ".npz" or _is_zip(path):  # also prepare's output saved under another name
        return BackboneDataset.from_npz(path, split=split, min_length=cfg.min_length, max_length=max_length)
    if split not in (None, "train"):
        return BackboneDataset([], [])
    return BackboneDataset.from_structures(path, min_length=cfg.min_length, max_length=max_length,
                                           cache=Path(cfg.out_dir) / ("dataset_cache_crop.npz"
                                                                      if max_length == NO_MAX_LENGTH else
                                                                      "dataset_cache.npz"))


def load_data(cfg: TrainConfig, split: Optional[str]) -> BackboneDataset:
    """The chains of ``split``; with ``cfg.crop`` the training chains of any length >= min_length
    that have a break-free window of ``max_length`` residues (validation keeps whole chains). With
    ``cfg.val_fraction`` > 0 the 'val' split is the chains ``held_out_chains`` picks from the training
    chains of a dataset without one, and 'train' the rest (a dataset with a 'val' split is refused)."""
    crop = cfg.crop and split in (None, "train")
    if cfg.val_fraction > 0:
        labels = _split_labels(Path(cfg.data))
        if labels and "val" in labels:
            raise ValueError(f"--val-fraction: {cfg.data} has a 'val' split of its own, which validation reads; "
                             "drop --val-fraction (or give a dataset without one)")
        data = _read_chains(cfg, "train", NO_MAX_LENGTH)
        held = held_out_chains(data, cfg.val_fraction, cfg.min_length, cfg.max_length)
        if split == "val":
            data = data.subset(held)
        else:  # a sequence held out stays out of training at every length (crop windows included)
            held_keys = {_sequence_key(data, i) for i in held}
            data = data.subset([i for i in range(len(data)) if _sequence_key(data, i) not in held_keys
                                and (crop or data.lengths[i] <= cfg.max_length)])
    else:
        data = _read_chains(cfg, split, NO_MAX_LENGTH if crop else cfg.max_length)
    if crop:
        data = data.subset([i for i in range(len(data)) if len(data.crop_starts(i, cfg.max_length))])
    if cfg.short_repeat > 1 and split in (None, "train"):
        # copies sit next to the original (same index order), so the epoch's draw differs from a run
        # without the option only in which items exist; each copy gets its own rotation, t and noise
        served = np.minimum(data.lengths, cfg.max_length) if crop else data.lengths
        data = data.subset([i for i in range(len(data))
                            for _ in range(cfg.short_repeat if served[i] <= cfg.short_max_length else 1)])
    return data


def _is_zip(path: Path) -> bool:
    """Whether ``path`` is a file that starts as a zip archive (an .npz) does."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:  # a folder, a missing or unreadable file: the structure reader says what it is
        return False


def _split_labels(path: Path) -> Optional[set]:
    """The labels of a dataset .npz's ``split`` array (None: no such array, or no .npz)."""
    if not (path.suffix == ".npz" or _is_zip(path)):
        return None
    with np.load(path, allow_pickle=False) as d:
        if "split" not in d:
            return None
        split = d["split"]
        return {v.decode() if isinstance(v, bytes) else str(v) for v in split.tolist()}


def _no_chains_reason(cfg: TrainConfig, data: BackboneDataset) -> str:
    """Why ``load_data`` found no training chain in ``cfg.data`` (a garbage or unreadable file, a folder
    without structures, chains of other lengths), for the error message."""
    skipped = getattr(data, "skipped", None)
    if skipped is not None and skipped.skipped:
        unreadable = [reason.split(": ", 1)[-1] for _, reason in skipped.skipped if reason.startswith("unreadable")]
        if unreadable and len(unreadable) == len(skipped.skipped):
            if Path(cfg.data).is_file():
                why = unreadable[0]
                why = why[len(str(cfg.data)) + 2:] if why.startswith(f"{cfg.data}: ") else why
                return (f": it is neither a structure file nor a dataset .npz of `protdiff-fast prepare` "
                        f"({why[:300]})")
            return f": none of its {len(unreadable)} structure files could be read (the first: {unreadable[0][:300]})"
        return f" ({skipped}; the first: {skipped.skipped[0][0]}: {skipped.skipped[0][1][:300]})"
    if Path(cfg.data).is_dir():
        return ": the folder holds no .pdb / .ent / .cif / .mmcif file"
    return ""


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The learning rate of step ``step`` (0-based), a pure function of the step so resume is exact."""
    warmup = cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        lr = cfg.lr
    elif cfg.lr_schedule == "cosine":
        span = max(cfg.steps - warmup, 1)
        progress = min(max(step - warmup, 0), span) / span
        lr = cfg.lr * (LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress)))
    else:
        raise ValueError(f"lr_schedule: unknown schedule {cfg.lr_schedule!r} (constant or cosine)")
    return lr * (step + 1) / warmup if step < warmup else lr


def ema_decay_at(cfg: TrainConfig, step: int) -> float:
    """The EMA decay of the update after step ``step`` (0-based): ema_decay, or its warm-up."""
    return min(cfg.ema_decay, (1 + step) / (10 + step)) if cfg.ema_warmup else cfg.ema_decay


def check_optimizer_options(cfg: TrainConfig) -> None:
    """Refuse optimisation options that would fail late or train nothing, naming them."""
    # steps 0 is allowed: it writes a checkpoint of the initial (--init) weights
    if not (isinstance(cfg.steps, int) and cfg.steps >= 0 and isinstance(cfg.batch_size, int) and cfg.batch_size >= 1):
        raise ValueError(f"steps must be an integer >= 0 and batch_size one >= 1, got {cfg.steps!r}, {cfg.batch_size!r}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {cfg.lr}")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {cfg.weight_decay}")
    if not cfg.grad_clip > 0:  # inf is allowed: no clipping, the norm still checked for NaN
        raise ValueError(f"grad_clip must be > 0 (inf: no clipping), got {cfg.grad_clip}")
    if not 0 <= cfg.ema_decay < 1:
        raise ValueError(f"ema_decay must lie in [0, 1) (1 would keep the initial weights), got {cfg.ema_decay}")
    if not (isinstance(cfg.warmup_steps, int) and cfg.warmup_steps >= 0):
        raise ValueError(f"warmup_steps must be an integer >= 0, got {cfg.warmup_steps!r}")
    if cfg.lr_schedule == "cosine" and cfg.warmup_steps and cfg.warmup_steps >= cfg.steps:
        raise ValueError(f"warmup_steps {cfg.warmup_steps} must be fewer than steps {cfg.steps} with the cosine "
                         "schedule (it decays over the steps after the warm-up)")
    learning_rate(cfg, 0)  # an unknown schedule is named here, before any file is written


def _dist_info():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str) -> None:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")


_EPOCH_CACHE: Dict = {}


def training_batch(dataset: BackboneDataset, cfg: TrainConfig, step: int):
    """The global batch of ``step``: epoch e = step // batches_per_epoch, shuffled with (seed, e)."""
    per_epoch = max(1, len(dataset) // cfg.batch_size)
    epoch, k = divmod(step, per_epoch)
    key = (cfg.batch_size, cfg.seed, cfg.rotate, cfg.crop, cfg.max_length, epoch)
    # one epoch's batches at a time, rebuilt identically on resume; the dataset itself is held and
    # compared (its id() alone could be reused by the next dataset once this one is freed)
    if _EPOCH_CACHE.get("key") != key or _EPOCH_CACHE.get("dataset") is not dataset:
        _EPOCH_CACHE.clear()
        _EPOCH_CACHE["key"], _EPOCH_CACHE["dataset"] = key, dataset
        _EPOCH_CACHE["batches"] = list(dataset.batches(cfg.batch_size, seed=cfg.seed * 100003 + epoch,
                                                       rotate=cfg.rotate, drop_last=len(dataset) >= cfg.batch_size,
                                                       crop=cfg.max_length if cfg.crop else None))
    return _EPOCH_CACHE["batches"][k]


def training_timesteps(schedule: NoiseSchedule, batch_size: int, generator, low_t_fraction: float = 0.0,
                       low_t_max: int = 128) -> torch.Tensor:
    """t ~ U{1..T}, or with probability ``low_t_fraction`` t ~ U{1..low_t_max} (fraction 0 draws
    exactly what runs made before the option drew)."""
    T = schedule.num_timesteps
    t = torch.randint(1, T + 1, (batch_size,), generator=generator)
    if low_t_fraction > 0:
        low = torch.randint(1, min(low_t_max, T) + 1, (batch_size,), generator=generator)
        t = torch.where(torch.rand(batch_size, generator=generator) < low_t_fraction, low, t)
    return t


def structure_loss(x0_hat: torch.Tensor, x0: torch.Tensor, mask: torch.Tensor, cutoff: float = 0.6) -> torch.Tensor:
    """Per design b, the mean of (d^_ij - d_ij)^2 over the pairs i < j of real residues that are
    close in the data or in the prediction (d_ij < cutoff or d^_ij < cutoff), where d_ij = |x0_i - x0_j|
    and d^_ij = |x0^_i - x0^_j|: bonds, virtual bond angles (i, i+2), contacts, and clashes (pairs the
    prediction puts close that are far apart in the data). FrameDiff's pairwise distance loss,
    made symmetric so that clashes count too. Returns (B,); 0 for a design with no such pair.
    """
    d = torch.cdist(x0.double(), x0.double()).to(x0_hat.dtype)
    diff = x0_hat.unsqueeze(2) - x0_hat.unsqueeze(1)
    d_hat = torch.sqrt((diff * diff).sum(-1) + 1e-10)  # + eps: a finite gradient at coincident points
    N = x0.shape[1]
    upper = torch.ones(N, N, dtype=torch.bool, device=x0.device).triu(1)
    pairs = upper & mask.unsqueeze(2) & mask.unsqueeze(1) & ((d < cutoff) | (d_hat.detach() < cutoff))
    sq = torch.where(pairs, (d_hat - d) ** 2, torch.zeros_like(d_hat)).sum((1, 2))
    return sq / pairs.sum((1, 2)).clamp(min=1)


def clash_loss(x0_hat: torch.Tensor, x0: Optional[torch.Tensor], mask: torch.Tensor, d_min: float = 0.38) -> torch.Tensor:
    """Per design b, sum over the pairs i < j of real residues with |i - j| >= 2 of
    relu(min(d_min, d_ij) - d^_ij)^2, divided by the design's real residues (d as in
    ``structure_loss``). The same potential as sampling's clash guidance, learned instead of imposed;
    the target is capped by the data's own distance so that a real close contact costs nothing.
    Summed, not averaged over the close pairs as ``structure_loss`` is, so one clash among the ~5 N
    close pairs of a chain is not diluted by them. With ``x0`` None (a state of the model's own
    sampling: no data behind it) the target is d_min for every pair. Returns (B,).
    """
    diff = x0_hat.unsqueeze(2) - x0_hat.unsqueeze(1)
    d_hat = torch.sqrt((diff * diff).sum(-1) + 1e-10)
    target = d_min if x0 is None else torch.clamp(torch.cdist(x0.double(), x0.double()).to(x0_hat.dtype), max=d_min)
    N = x0_hat.shape[1]
    idx = torch.arange(N, device=x0_hat.device)
    nonlocal_pairs = (idx.unsqueeze(0) - idx.unsqueeze(1)) >= 2  # i < j - 1: each unordered pair once
    pairs = nonlocal_pairs & mask.unsqueeze(2) & mask.unsqueeze(1)
    overlap = torch.relu(target - d_hat)
    sq = torch.where(pairs, overlap * overlap, torch.zeros_like(d_hat)).sum((1, 2))
    return sq / mask.sum(1).clamp(min=1).to(sq.dtype)


class OwnStates:
    """A pool of the model's own sampling states (x_t, t, mask) from ``scripts/own_states.py``'s .npz."""

    def __init__(self, path, max_t: int, max_length: int, min_t: int = 1) -> None:
        try:
            with np.load(path) as f:
                x, t, lengths = f["x"], f["t"], f["lengths"]
                # optional (steps, designs) mask: states to draw (e.g. not those of a chain already far out)
                valid = f["valid"] if "valid" in f.files else np.ones(x.shape[:2], bool)
        except (OSError, KeyError, ValueError, EOFError, TypeError, zipfile.BadZipFile) as e:  # (a .npy: TypeError)
            raise ValueError(f"own_states {path}: not a states file of scripts/own_states.py ({e})") from None
        if x.ndim != 4 or x.shape[:2] != (len(t), len(lengths)) or x.shape[3] != 3 or x.shape[2] < lengths.max():
            raise ValueError(f"own_states {path}: x has shape {x.shape}, expected (steps={len(t)}, "
                             f"designs={len(lengths)}, >= {lengths.max()}, 3)")
        if lengths.max() > max_length:
            raise ValueError(f"own_states {path}: designs of length {lengths.max()} > the model's max_length {max_length}")
        if valid.shape != x.shape[:2] or valid.dtype != bool:
            raise ValueError(f"own_states {path}: valid has shape {valid.shape} ({valid.dtype}), expected "
                             f"{x.shape[:2]} (bool)")
        if not np.isfinite(x[valid]).all():
            raise ValueError(f"own_states {path}: x holds NaN or inf")
        keep = np.flatnonzero((t <= max_t) & (t >= min_t))
        if not len(keep) or not valid[keep].any():
            within = f"t <= {max_t}" + (f" and t >= {min_t}" if min_t > 1 else "")
            raise ValueError(f"own_states {path}: no state to draw with {within} (t {t.min()}..{t.max()})")
        self.x = torch.from_numpy(np.ascontiguousarray(x[keep], dtype=np.float32))
        self.t = torch.from_numpy(t[keep].astype(np.int64))
        self.lengths = torch.from_numpy(lengths.astype(np.int64))
        self.cells = torch.from_numpy(np.flatnonzero(valid[keep]))  # flat (step, design) indices to draw from

    def __len__(self) -> int:
        return len(self.cells)

    def batch(self, size: int, seed: int):
        """``size`` states drawn uniformly with ``seed``: (x_t, t, mask), padded to the longest drawn."""
        g = torch.Generator().manual_seed(seed)
        pick = self.cells[torch.randint(0, len(self), (size,), generator=g)]
        step, design = pick // self.x.shape[1], pick % self.x.shape[1]
        lengths = self.lengths[design]
        n = int(lengths.max())
        mask = torch.arange(n).unsqueeze(0) < lengths.unsqueeze(1)
        return self.x[step, design, :n], self.t[step], mask


def _own_x0_hat(model, schedule: NoiseSchedule, states: OwnStates, size: int, seed: int, rank: int, world: int,
                device):
    """This rank's slice of ``size`` own states drawn with ``seed``: (predicted x_0, mask, the SNR
    alpha_bar_t / (1 - alpha_bar_t) per state)."""
    x_t, t, mask = states.batch(size, seed)
    mine = slice(rank * size // world, (rank + 1) * size // world)
    x_t, t, mask = x_t[mine].to(device), t[mine].to(device), mask[mine].to(device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=str(device).startswith("cuda")):
        eps_hat = model(x_t, t, mask)
    x0_hat = predict_x0_from_eps(schedule, x_t, t, eps_hat.float())
    alpha_bar = schedule.coef("alpha_bars", t, x0_hat).view(-1)
    return x0_hat, mask, alpha_bar / (1 - alpha_bar)


def own_clash_loss(model, schedule: NoiseSchedule, states: OwnStates, size: int, seed: int, rank: int, world: int,
                   device, clash_distance: float = 0.38) -> torch.Tensor:
    """The mean over ``size`` own states of alpha_bar_t / (1 - alpha_bar_t) ``clash_loss`` (x0 None) of
    the predicted x_0, on this rank's slice (the global mean once DDP averages the ranks)."""
    x0_hat, mask, snr = _own_x0_hat(model, schedule, states, size, seed, rank, world, device)
    return (snr * clash_loss(x0_hat, None, mask, clash_distance)).sum() / size


def extent_loss(x0_hat: torch.Tensor, mask: torch.Tensor, factor: float = 3.5) -> torch.Tensor:
    """Per design b of N real residues, the mean over them of relu(|x0_i - c| - R)^2 with c their centre
    and R = factor x 2.2 N^0.38 A (in model units): real chains have Rg ~ 2.2 N^0.38 A (ratio 0.9-1.5 for
    the chains of ../shared/data) and no residue more than ~3 Rg from the centre. Returns (B,)."""
    n = mask.sum(1).clamp(min=1).to(x0_hat.dtype)
    m = mask.unsqueeze(-1).to(x0_hat.dtype)
    centre = (x0_hat * m).sum(1, keepdim=True) / n.view(-1, 1, 1)
    r = torch.sqrt((((x0_hat - centre) * m) ** 2).sum(-1) + 1e-12)
    bound = factor * 2.2 * n.pow(0.38) / SCALE_A
    over = torch.relu(r - bound.view(-1, 1)) * mask
    return (over * over).sum(1) / n


def own_extent_loss(model, schedule: NoiseSchedule, states: OwnStates, size: int, seed: int, rank: int, world: int,
                    device, factor: float = 3.5) -> torch.Tensor:
    """The mean over ``size`` own states of alpha_bar_t / (1 - alpha_bar_t) ``extent_loss`` of the
    predicted x_0 (the squared error in eps units that the overshoot costs), on this rank's slice."""
    x0_hat, mask, snr = _own_x0_hat(model, schedule, states, size, seed, rank, world, device)
    return (snr * extent_loss(x0_hat, mask, factor)).sum() / size


def diffusion_loss(model, schedule: NoiseSchedule, coords, mask, generator, rank: int, world: int, device,
                   low_t_fraction: float = 0.0, low_t_max: int = 128, structure_weight: float = 0.0,
                   structure_max_t: int = 256, structure_cutoff: float = 0.6, clash_weight: float = 0.0,
                   clash_distance: float = 0.38, clash_max_t: Optional[int] = None,
                   input_perturbation: float = 0.0):
    """L_simple on this rank's slice of the global batch, normalised by the global residue count,
    plus ``structure_weight`` times the mean over the global batch of ``structure_loss`` of the
    predicted x_0 times alpha_bar_t / (1 - alpha_bar_t) (designs with t > structure_max_t contribute 0),
    plus ``clash_weight`` times the same mean of ``clash_loss`` with the same factor, for the designs
    with t <= ``clash_max_t`` (None: ``structure_max_t``). With ``input_perturbation`` gamma > 0 the model
    input is x_t of eps + gamma xi (xi drawn after eps from the same generator, so t and eps are those of a
    run without it) and the target is still eps (DDPM-IP).

    The factor puts the distance loss in the units of L_simple at every t: an x_0 error is the eps
    error times sqrt((1 - alpha_bar_t) / alpha_bar_t), so without it the loss would vanish at the
    small t where clashes are settled (measured on the shipped model: its gradient is then about as
    large as L_simple's at every t up to 256, instead of 100x smaller at t <= 64).
    """
    B = coords.shape[0]
    t = training_timesteps(schedule, B, generator, low_t_fraction, low_t_max)
    noise = sample_noise(coords.double(), mask, generator=generator).float()
    mine = slice(rank * B // world, (rank + 1) * B // world)
    x0, m, tt, eps = coords[mine].to(device), mask[mine].to(device), t[mine].to(device), noise[mine].to(device)
    if input_perturbation > 0:
        xi = sample_noise(coords.double(), mask, generator=generator).float()[mine].to(device)
        x_t = add_noise(schedule, x0, eps + input_perturbation * xi, tt, m)
    else:
        x_t = add_noise(schedule, x0, eps, tt, m)
    use_autocast = str(device).startswith("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
        eps_hat = model(x_t, tt, m)
    sq = ((eps_hat.float() - eps) ** 2).sum(-1)[m].sum()
    loss = sq / int(mask.sum())
    if clash_max_t is None:
        clash_max_t = structure_max_t
    if structure_weight > 0 or clash_weight > 0:
        max_t = max(structure_max_t if structure_weight > 0 else 0, clash_max_t if clash_weight > 0 else 0)
        low = tt <= max_t
        if bool(low.any()):
            x0_hat = predict_x0_from_eps(schedule, x_t[low], tt[low], eps_hat[low].float())
            alpha_bar = schedule.coef("alpha_bars", tt[low], x0_hat).view(-1)
            snr = alpha_bar / (1 - alpha_bar)
            if structure_weight > 0:
                weight = torch.where(tt[low] <= structure_max_t, snr, torch.zeros_like(snr))
                aux = (weight * structure_loss(x0_hat, x0[low], m[low], structure_cutoff)).sum() / B
                loss = loss + structure_weight * aux
            if clash_weight > 0:
                weight = torch.where(tt[low] <= clash_max_t, snr, torch.zeros_like(snr))
                aux = (weight * clash_loss(x0_hat, x0[low], m[low], clash_distance)).sum() / B
                loss = loss + clash_weight * aux
    return loss, int(m.sum())


# options a resumed run may change: where things are and run on, how often it checkpoints and validates,
# the weights it started from (the checkpoint has its own now),
# and (under a constant learning rate) how many steps it runs; every other option shapes the updates
RESUMABLE_CHANGES = ("data", "out_dir", "ckpt_every", "val_every", "val_batches", "backend", "device", "init")


def resume_differences(saved: Dict, cfg: TrainConfig) -> List[str]:
    """The options of ``cfg`` that differ from a checkpoint's saved config and would change the run
    (fields an older checkpoint lacks count at their defaults)."""
    ours, defaults = asdict(cfg), asdict(TrainConfig())
    allowed = set(RESUMABLE_CHANGES) | ({"steps"} if cfg.lr_schedule == "constant" else set())
    return [f"{k}: {saved.get(k, defaults[k])!r} there, {v!r} here" for k, v in ours.items()
            if k not in allowed and k != "model" and saved.get(k, defaults[k]) != v]


def read_checkpoint(path, device, what: str) -> Dict:
    """The contents of a protdiff_fast checkpoint or shipped weights file, or a ValueError naming the
    file and what is wrong with it (not torch's unpickling traceback). Loading unpickles: read only
    checkpoints you trust."""
    path, device = Path(path), check_device(device)
    if not path.is_file():
        raise ValueError(f"{what}: no such file {path}" + (" (a folder)" if path.is_dir() else ""))
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as err:  # noqa: BLE001 - unpickling a stray file raises anything (pickle, zip, EOF, key errors)
        raise ValueError(f"{what}: {path} is not a protdiff_fast checkpoint (torch.load: {type(err).__name__}: "
                         f"{str(err)[:200]})") from err
    if not isinstance(state, dict) or "model_config" not in state or ("ema" not in state and "model" not in state):
        raise ValueError(f"{what}: {path} is not a protdiff_fast checkpoint (no model_config / weights)")
    return state


def initial_weights(path, model_cfg: ProtDiffConfig, device) -> Dict:
    """The weights to start from (a checkpoint's EMA weights, else its model's), refused when the
    architecture differs (every ProtDiffConfig field but tanh / coords_range, which have no parameters: a
    model with the bounded coordinate update can start from one without; max_length is the base of the
    residue-index and offset sinusoids, so other weights compute another function there)."""
    state = read_checkpoint(path, device, "init")
    free = ("tanh", "coords_range")
    theirs = {k: v for k, v in state["model_config"].items() if k not in free}
    ours = {k: v for k, v in model_cfg.to_dict().items() if k not in free}
    if theirs != ours:
        diff = ", ".join(f"{k}: {theirs.get(k)} there, {ours.get(k)} here" for k in sorted(set(theirs) | set(ours))
                         if theirs.get(k) != ours.get(k))
        raise ValueError(f"init: {path} has another architecture ({diff})")
    return state["ema" if "ema" in state else "model"]


def save_checkpoint(path: Path, state: Dict) -> None:
    _atomic_write(path, lambda tmp: torch.save(state, tmp), durable=True)


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, stop_after: Optional[int] = None) -> Dict:
    """Train (or resume) and return {"step", "train_loss", "val_loss", "checkpoint"}."""
    import protdiff_fast

    check_optimizer_options(cfg)
    if not 0.0 <= cfg.low_t_fraction <= 1.0 or cfg.low_t_max < 1:
        raise ValueError(f"low_t_fraction must lie in [0, 1] and low_t_max be >= 1, got {cfg.low_t_fraction}, "
                         f"{cfg.low_t_max}")
    if not (cfg.structure_weight >= 0 and cfg.structure_max_t >= 1 and cfg.structure_cutoff > 0):
        raise ValueError(f"structure_weight must be >= 0, structure_max_t >= 1 and structure_cutoff > 0, got "
                         f"{cfg.structure_weight}, {cfg.structure_max_t}, {cfg.structure_cutoff}")
    if not (cfg.clash_weight >= 0 and cfg.clash_distance > 0):
        raise ValueError(f"clash_weight must be >= 0 and clash_distance > 0, got {cfg.clash_weight}, "
                         f"{cfg.clash_distance}")
    if not cfg.input_perturbation >= 0:
        raise ValueError(f"input_perturbation must be >= 0, got {cfg.input_perturbation}")
    if cfg.clash_max_t is not None and cfg.clash_max_t < 1:
        raise ValueError(f"clash_max_t must be >= 1 (or None: structure_max_t), got {cfg.clash_max_t}")
    if not (cfg.own_clash_weight >= 0 and cfg.own_batch >= 1 and cfg.own_max_t >= 1):
        raise ValueError(f"own_clash_weight must be >= 0, own_batch and own_max_t >= 1, got {cfg.own_clash_weight}, "
                         f"{cfg.own_batch}, {cfg.own_max_t}")
    if cfg.short_repeat < 1 or cfg.short_max_length < 1:
        raise ValueError(f"short_repeat and short_max_length must be >= 1, got {cfg.short_repeat}, "
                         f"{cfg.short_max_length}")
    if cfg.own_clash_weight > 0 and not cfg.own_states:
        raise ValueError("own_clash_weight > 0 needs own_states (a file of scripts/own_states.py)")
    if not (cfg.own_extent_weight >= 0 and cfg.own_extent_min_t >= 1 and cfg.own_extent_factor > 0):
        raise ValueError(f"own_extent_weight must be >= 0, own_extent_min_t >= 1 and own_extent_factor > 0, got "
                         f"{cfg.own_extent_weight}, {cfg.own_extent_min_t}, {cfg.own_extent_factor}")
    if cfg.own_extent_weight > 0 and not cfg.own_extent_states:
        raise ValueError("own_extent_weight > 0 needs own_extent_states (a file of scripts/own_states.py --min-t)")
    check_option_ranges(asdict(cfg))
    init_distributed(cfg.device)
    rank, world = _dist_info()
    device = check_device(cfg.device)
    if cfg.device.startswith("cuda") and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    out = Path(cfg.out_dir)
    ckpt_path = out / CHECKPOINT
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir: {out} is a file, not a folder")
    if not resume and ckpt_path.is_file():
        raise FileExistsError(f"{out} holds the checkpoint of an earlier run ({ckpt_path.name}): continue it with "
                              "--resume, or give another --out (nothing was changed)")
    if not ckpt_path.is_file() and (out / "history.json").exists():  # a run writes its history after a checkpoint
        raise FileExistsError(f"{out} holds a history.json but no {CHECKPOINT}: not a run to continue (or its "
                              "checkpoint was removed), and a new run would overwrite the file; give another --out "
                              "(nothing was changed)")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the {world} processes")
    train_set, val_set = load_data(cfg, "train"), load_data(cfg, "val")
    if len(train_set) == 0:
        if cfg.val_fraction > 0 and len(val_set):
            raise ValueError(f"{cfg.data}: --val-fraction {cfg.val_fraction:g} holds out all {len(val_set)} chains "
                             "(or every sequence) it could train on: give a smaller fraction or more chains")
        raise ValueError(f"{cfg.data}: no training chains of length {cfg.min_length}..{cfg.max_length}"
                         + _no_chains_reason(cfg, train_set))
    if cfg.val_fraction > 0 and rank == 0:
        print(f"train: --val-fraction {cfg.val_fraction:g} holds out {len(val_set)} chain{'s' if len(val_set) != 1 else ''} of "
              f"{cfg.min_length}..{cfg.max_length} residues for validation (by sequence), "
              f"{len(train_set)} training items", file=sys.stderr)
    if len(val_set) == 0 and cfg.val_every > 0 and rank == 0:
        # said, not silent: a file labelling its held-out chains "validation" or "valid" gave no val loss,
        # and one without any split (prepare's, a folder) none either
        labels = _split_labels(Path(cfg.data))
        if labels:
            print(f"train: no validation chains of length {cfg.min_length}..{cfg.max_length} in {cfg.data} (its "
                  f"split labels: {', '.join(sorted(labels)[:10])}; validation reads split 'val'): no val_loss",
                  file=sys.stderr)
        elif cfg.val_fraction == 0:
            print(f"train: {cfg.data} has no 'val' split (prepare and folders of structures have none): no "
                  "validation loss; hold out chains for it with --val-fraction (e.g. 0.05)", file=sys.stderr)
    model_cfg = ProtDiffConfig(**{**ProtDiffConfig(max_length=cfg.max_length).to_dict(), **cfg.model})
    own_states = None
    if cfg.own_clash_weight > 0:
        if cfg.own_batch % world:
            raise ValueError(f"own_batch {cfg.own_batch} must be divisible by the {world} processes")
        own_states = OwnStates(cfg.own_states, cfg.own_max_t, model_cfg.max_length)
    extent_states = None
    if cfg.own_extent_weight > 0:
        if cfg.own_batch % world:
            raise ValueError(f"own_batch {cfg.own_batch} must be divisible by the {world} processes")
        extent_states = OwnStates(cfg.own_extent_states, model_cfg.num_timesteps, model_cfg.max_length,
                                  min_t=cfg.own_extent_min_t)
    torch.manual_seed(cfg.seed)  # parameter initialisation
    model = ProtDiff(model_cfg, backend=cfg.backend).to(device)
    schedule = NoiseSchedule(model_cfg.num_timesteps, model_cfg.beta_start, model_cfg.beta_end)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = copy.deepcopy(model).requires_grad_(False)
    generator = torch.Generator().manual_seed(cfg.seed)
    step, history = 0, []
    saved_step = None  # the step of the checkpoint in out (None: there is none)
    if resume and ckpt_path.is_file():
        state = read_checkpoint(ckpt_path, device, "resume")
        changed = resume_differences(state.get("config") or {}, cfg)
        if changed:
            raise ValueError(f"resume: {ckpt_path} was trained with other options ({'; '.join(changed)}): resume "
                             "with the options it was started with, or start a new run (--init from it)")
        if state["model_config"] != model_cfg.to_dict() or not {"ema", "optimizer", "generator"} <= set(state):
            theirs, ours = state["model_config"], model_cfg.to_dict()
            diff = ", ".join(f"{k}: {theirs.get(k)} there, {ours.get(k)} here" for k in sorted(set(theirs) | set(ours))
                             if theirs.get(k) != ours.get(k)) or "no optimizer / EMA / generator state"
            raise ValueError(f"resume: {ckpt_path} is not a checkpoint of this run's model ({diff}); resume with "
                             "the options it was started with")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        step, history = state["step"], state.get("history", [])
        saved_step = step
    else:
        if resume and rank == 0:
            print(f"no checkpoint at {ckpt_path}: starting from step 0")
        if cfg.init:
            initial = initial_weights(cfg.init, model_cfg, device)
            model.load_state_dict(initial)
            ema.load_state_dict(initial)
    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    def checkpoint() -> None:
        nonlocal saved_step
        saved_step = step
        if rank == 0:
            save_checkpoint(ckpt_path, dict(model=model.state_dict(), ema=ema.state_dict(), optimizer=opt.state_dict(),
                                            generator=generator.get_state(), step=step, history=history,
                                            config=asdict(cfg), model_config=model_cfg.to_dict(),
                                            version=protdiff_fast.__version__))

    def validation_loss() -> Optional[float]:
        if len(val_set) == 0:
            return None
        g = torch.Generator().manual_seed(cfg.seed + 7)  # the same t and noise at every validation
        total, count = 0.0, 0
        with torch.no_grad():
            for k, batch in enumerate(val_set.batches(cfg.batch_size, shuffle=False)):
                if k >= cfg.val_batches:
                    break
                loss, _ = diffusion_loss(ema, schedule, batch["coords"], batch["mask"], g, 0, 1, device)
                n = int(batch["mask"].sum())
                total, count = total + float(loss) * n, count + n
        return total / count

    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc="training", unit="step", dynamic_ncols=True,
                   mininterval=0.1 if sys.stderr.isatty() else 15.0)  # logs: a line per 15 s
    last_val = history[-1].get("val_loss") if history else None
    residues, t0, start_step = 0, time.perf_counter(), step
    end = cfg.steps if stop_after is None else min(cfg.steps, step + stop_after)
    while step < end:
        batch = training_batch(train_set, cfg, step)
        loss, n_local = diffusion_loss(ddp_model, schedule, batch["coords"], batch["mask"], generator, rank, world,
                                       device, cfg.low_t_fraction, cfg.low_t_max, cfg.structure_weight,
                                       cfg.structure_max_t, cfg.structure_cutoff, cfg.clash_weight,
                                       cfg.clash_distance, cfg.clash_max_t, cfg.input_perturbation)
        if own_states is not None:  # its own draw per step (not the main generator's): resume stays exact
            # the bare module: DDP runs one forward per backward; the gradients of both terms reach each
            # parameter's accumulator together, so its all-reduce hook still fires once per step
            loss = loss + cfg.own_clash_weight * own_clash_loss(model, schedule, own_states, cfg.own_batch,
                                                                cfg.seed * 1000003 + step, rank, world, device,
                                                                cfg.clash_distance)
        if extent_states is not None:  # a draw of its own too, from a stream apart from the clash pool's
            loss = loss + cfg.own_extent_weight * own_extent_loss(model, schedule, extent_states, cfg.own_batch,
                                                                  cfg.seed * 1000003 + step + (1 << 40), rank, world,
                                                                  device, cfg.own_extent_factor)
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, step)
        opt.zero_grad(set_to_none=True)
        (loss * world).backward()  # DDP averages over ranks; loss is already over the global residue count
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if not math.isfinite(float(grad_norm)):  # before the update: the weights (and checkpoints) stay good
            remedy = ("a lower --lr or --grad-clip, or smaller weights of the auxiliary losses or "
                      "--input-perturbation")
            if saved_step is not None:
                advice = f"The last checkpoint {ckpt_path} (step {saved_step}) is intact: resume from it with {remedy}"
            else:  # (a checkpoint of another run is refused at the start, so out holds none)
                due = min(cfg.ckpt_every or cfg.steps, cfg.steps)
                advice = f"No checkpoint was written (the first was due at step {due}): start again with {remedy}"
            raise FloatingPointError(
                f"training step {step + 1}: the gradient is {float(grad_norm)} (loss {float(loss.detach()) * world}); "
                f"the weights were not updated. {advice}")
        opt.step()
        with torch.no_grad():
            decay = ema_decay_at(cfg, step)
            for pe, p in zip(ema.parameters(), model.parameters()):
                pe.lerp_(p, 1 - decay)
        step += 1
        loss_value = float(loss.detach()) * world
        if world > 1:
            t_loss = torch.tensor([loss_value / world], device=device)
            dist.all_reduce(t_loss)
            loss_value = float(t_loss)
        residues += int(batch["mask"].sum())
        record = dict(step=step, loss=loss_value, grad_norm=float(grad_norm))
        if cfg.val_every and step % cfg.val_every == 0 and rank == 0:
            last_val = record["val_loss"] = validation_loss()
        history.append(record)
        if bar is not None:
            rate = residues / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{loss_value:.4f}", val=f"{last_val:.4f}" if last_val is not None else "-",
                            residues_per_s=f"{rate:.0f}", refresh=False)
            bar.update(1)
        if cfg.ckpt_every and step % cfg.ckpt_every == 0:
            checkpoint()
    if step == cfg.steps or stop_after is not None:
        checkpoint()
    if bar is not None:
        bar.close()
    if world > 1:
        dist.barrier()
    if rank == 0:
        text = json.dumps(history[-1000:])
        _atomic_write(out / "history.json", lambda tmp: Path(tmp).write_text(text))
    return dict(step=step, train_loss=history[-1]["loss"] if history else None, val_loss=last_val,
                checkpoint=str(ckpt_path), model=model, ema=ema, start_step=start_step)


def load_model(path, backend: str = "auto", use_ema: bool = True, device: str = "cpu") -> ProtDiff:
    """A ProtDiff from a training checkpoint (EMA weights by default) or a shipped weights file."""
    state = read_checkpoint(path, device, "checkpoint")
    try:
        model = ProtDiff(ProtDiffConfig(**state["model_config"]), backend=backend).to(device)
        model.load_state_dict(state["ema" if use_ema and "ema" in state else "model"])
    except (TypeError, RuntimeError, KeyError) as err:  # another version's config, or weights of another shape
        raise ValueError(f"checkpoint: {path}: its model config and weights do not fit together "
                         f"({type(err).__name__}: {str(err)[:200]})") from err
    trained_on = state.get("config") or (state.get("trained") or {}).get("config") or {}
    if "min_length" in trained_on:  # the sampler warns below it (such chains were never seen)
        model.min_training_length = int(trained_on["min_length"])
    return model.eval()
