"""Large-batch sampling of backbones of mixed lengths.

``sample(model, lengths, ...)`` sorts the designs by length, cuts them into padded batches with
masks (so a batch wastes little on padding), runs the reverse diffusion for each batch, and returns
the backbones in Angstrom (or streams them to PDB files). Every design d has its own seed,
SplitMix64(run seed, d): its starting noise comes from a generator seeded with it, and on the C++
backend the noise of every step too (Philox keyed by the design seed and t), so a design comes out
the same whatever batch it shares (same device and backend). Elsewhere (the reference step,
strided sampling) step noise comes from one generator per batch: reproducible for the same
lengths, batch size and seed, but not per design.
"""
from __future__ import annotations

import json
import sys
import time
from collections import deque
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from protdiff_fast.diffusion.scheduler import DDPMScheduler
from protdiff_fast.io.dataset import SCALE_A
from protdiff_fast.ops.ddpm_cpu import per_sample_seeds
from protdiff_fast.reference.com import remove_center_of_mass_reference

EpsModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class SamplingError(RuntimeError):
    """The model produced something unusable (NaN/Inf) at a given step and sample."""


def design_seeds(seed: int, num_designs: int) -> np.ndarray:
    return per_sample_seeds(int(seed), num_designs)


def initial_noise(seeds: Sequence[int], max_len: int, mask: torch.Tensor, dtype, device) -> torch.Tensor:
    """x_T = P z for each design from its own generator, so it does not depend on the batch."""
    z = torch.zeros(len(seeds), max_len, 3, dtype=torch.float64)
    for k, s in enumerate(seeds):
        g = torch.Generator().manual_seed(int(s) & ((1 << 63) - 1))
        n = int(mask[k].sum())
        z[k, :n] = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return remove_center_of_mass_reference(z, mask.cpu()).to(dtype=dtype, device=device)


def _distributed():
    """(rank, world size) of a torchrun job that has joined its process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(err).lower()


def auto_batch_size(model, max_len: int, device: torch.device, safety: float = 0.5, cap: int = 1024) -> int:
    """The largest batch of length ``max_len`` that fits in ``safety`` of the free memory.

    Memory model of a no-grad reverse step with the fused EGNN (no N x N tensor): per design about
    4 bytes x N x (16 H + 4 E) per layer for the node activations, the per-node halves and the
    kernels' scratch, times the layers; a second value bounds CPU throughput (no gain past ~256).
    """
    cfg = getattr(model, "config", None)
    H = getattr(cfg, "hidden_dim", 256)
    E = getattr(cfg, "edge_dim", H)
    layers = getattr(cfg, "num_layers", 4)
    per_design = 4 * max_len * (16 * H + 4 * E) * layers + 4 * max_len * 3 * 8
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = 8 << 30
        try:
            with open("/proc/meminfo") as f:
                free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
        except (OSError, StopIteration):
            pass
        cap = min(cap, 256)
    return int(max(1, min(cap, safety * free // per_design)))


def _expand_lengths(lengths: Union[int, Sequence[int]], num_samples: Optional[int], max_length: Optional[int]):
    if isinstance(lengths, int):
        lengths = [lengths]
    lengths = [int(n) for n in lengths]
    if num_samples is not None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        lengths = [n for n in lengths for _ in range(num_samples)]
    if not lengths:
        raise ValueError("lengths: nothing to sample")
    bad = [n for n in lengths if n < 1 or (max_length is not None and n > max_length)]
    if bad:
        limit = f"[1, {max_length}]" if max_length is not None else ">= 1"
        raise ValueError(f"lengths: {sorted(set(bad))[:5]} outside the allowed range {limit}")
    return lengths


def sample(
    model: EpsModel,
    lengths: Union[int, Sequence[int]],
    num_samples: Optional[int] = None,
    *,
    batch_size: Optional[int] = None,
    seed: int = 0,
    scheduler: Optional[DDPMScheduler] = None,
    num_inference_steps: Optional[int] = None,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    out_dir: Optional[Union[str, Path]] = None,
    scale: float = SCALE_A,
    resume: bool = False,
    design_indices: Optional[Sequence[int]] = None,
) -> List[Optional[np.ndarray]]:
    """Sample one backbone per entry of ``lengths`` (times ``num_samples`` when given).

    ``model(x_t, t, mask) -> eps_hat`` works in model units (1 unit = ``scale`` A); the results are
    returned in Angstrom, in the order of ``lengths``. With ``out_dir`` each design is also written
    to ``design_<index>.pdb`` and recorded in ``manifest.json`` (rewritten atomically after every
    batch). The folder must be new or empty, unless ``resume``: then the designs the manifest lists
    as finished are skipped (their entries in the result are None) and the run must have the same
    lengths, seed and schedule. ``design_indices`` samples only those designs (e.g. one design of
    a large run, alone: on the fused backends it comes out identical to its copy in the big run).
    Under torchrun (process group initialised) rank r samples the designs with index % world == r
    and keeps its own ``manifest.rank<r>.json``.
    """
    scheduler = scheduler or DDPMScheduler()
    scheduler.set_timesteps(num_inference_steps)
    device = torch.device(device)
    lengths = _expand_lengths(lengths, num_samples, getattr(model, "max_length", None))
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    seeds = design_seeds(seed, len(lengths))
    run_info = dict(lengths=lengths, seed=int(seed), num_inference_steps=scheduler.num_inference_steps,
                    scheduler=scheduler.config, scale=scale)
    finished: Dict[str, Dict] = {}
    rank, world = _distributed()
    if out_dir is not None:
        out_dir = Path(out_dir)
        manifest = out_dir / (MANIFEST if world == 1 else f"manifest.rank{rank}.json")
        if resume and manifest.is_file():
            saved = json.loads(manifest.read_text())
            if saved["run"] != json.loads(json.dumps(run_info)):
                raise ValueError(f"{manifest}: written by a run with other lengths/seed/schedule; cannot resume it")
            finished = saved["designs"]
        elif out_dir.exists() and any(out_dir.iterdir()):
            raise FileExistsError(f"{out_dir}: exists and is not empty; choose a new folder, or resume a run "
                                  "(nothing is overwritten)")
        if world > 1:  # every rank has checked the folder before any rank writes into it
            torch.distributed.barrier()
        out_dir.mkdir(parents=True, exist_ok=True)
    wanted = set(range(len(lengths))) if design_indices is None else {int(i) for i in design_indices}
    if any(i < 0 or i >= len(lengths) for i in wanted):
        raise ValueError(f"design_indices: must lie in [0, {len(lengths) - 1}]")
    # under torchrun every rank takes every world-th design: no overlap, similar lengths per rank
    todo = [i for i in sorted(wanted) if str(i) not in finished and i % world == rank]
    # the fused C++ step keys its noise by (design seed, t): a design does not depend on its batch
    from protdiff_fast.backends import resolve

    per_design_noise = not scheduler.strided and resolve("ddpm_step", scheduler.backend, device) == "cpu"
    todo_arr = np.asarray(todo, dtype=np.int64)
    order = todo_arr[np.argsort(np.asarray([lengths[i] for i in todo]), kind="stable")] if todo else todo_arr
    if batch_size is None:
        batch_size = auto_batch_size(model, max(lengths), device)
        print(f"sample: batch size {batch_size} (estimated to fit {device} memory for length {max(lengths)}; "
              "--batch-size overrides)", file=sys.stderr)
    batches = deque(order[k:k + batch_size] for k in range(0, len(order), batch_size))
    steps = scheduler.timesteps.tolist()
    results: Dict[int, np.ndarray] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(batches) * len(steps), unit="step", desc="sampling", dynamic_ncols=True,
                   mininterval=0.1 if sys.stderr.isatty() else 15.0)  # logs: a line per 15 s
    started, done = time.perf_counter(), 0
    while batches:
        idx = batches.popleft()
        try:
            x = _denoise_batch(model, scheduler, idx, lengths, seeds, steps, per_design_noise, device, dtype, bar)
        except RuntimeError as err:  # out of memory: halve the batch and retry, never lose the run
            if not _is_oom(err) or len(idx) == 1:
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            half = len(idx) // 2
            print(f"sample: out of memory with a batch of {len(idx)} (length {lengths[idx[-1]]}); "
                  f"retrying as {half} + {len(idx) - half}", file=sys.stderr)
            batches.extendleft([idx[half:], idx[:half]])
            if bar is not None:
                bar.total += len(steps)  # the retried half-batches are extra steps
            continue
        done += len(idx)
        for k, i in enumerate(idx):
            ca = (x[k, : lengths[i]].double().cpu().numpy() * scale)
            results[int(i)] = ca
            if out_dir is not None:
                from protdiff_fast.io.structure import write_backbone

                name = f"design_{int(i):06d}.pdb"
                write_backbone(out_dir / name, ca, overwrite=True)  # a resumed batch may have written it
                finished[str(int(i))] = dict(file=name, length=lengths[i], seed=int(seeds[i]))
        if out_dir is not None:
            _write_manifest(manifest, dict(run=run_info, designs=finished))
        if bar is not None:
            elapsed = time.perf_counter() - started
            bar.set_postfix(backbones=done, backbones_per_s=f"{done / max(elapsed, 1e-9):.2f}")
    if bar is not None:
        bar.close()
    return [results.get(i) for i in range(len(lengths))]


def _denoise_batch(model, scheduler, idx, lengths, seeds, steps, per_design_noise, device, dtype, bar):
    """All reverse steps of one padded batch; returns x_0 (B, L, 3) in model units."""
    L = int(max(lengths[i] for i in idx))
    mask = torch.zeros(len(idx), L, dtype=torch.bool)
    for k, i in enumerate(idx):
        mask[k, : lengths[i]] = True
    mask = mask.to(device)
    batch_seeds = seeds[idx]
    if per_design_noise:
        step_seed = torch.from_numpy(batch_seeds.view(np.int64).copy())
    else:  # one generator per batch: reproducible for the same batching only
        step_seed = None
        generator = torch.Generator(device=device).manual_seed(int(batch_seeds[0]) & ((1 << 63) - 1))
    x = initial_noise(batch_seeds.tolist(), L, mask, dtype, device)
    for step_t in steps:
        t = torch.full((len(idx),), step_t, dtype=torch.long, device=device)
        eps = model(x, t, mask)
        bad = ~torch.isfinite(eps).flatten(1).all(1)
        if bool(bad.any()):
            first = int(idx[int(bad.nonzero()[0])])
            raise SamplingError(f"model output is NaN/Inf at t={step_t} for design {first} "
                                f"(length {lengths[first]}, seed {seeds[first]})")
        x = scheduler.step(eps, t, x, mask=mask, seed=step_seed,
                           generator=None if per_design_noise else generator).prev_sample
        if bar is not None:
            bar.update(1)
    return x


MANIFEST = "manifest.json"


def _write_manifest(path: Path, content: Dict) -> None:
    from protdiff_fast.io.structure import _atomic_write

    _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(content, indent=1, sort_keys=True)))
