"""Large-batch sampling of backbones of mixed lengths.

``sample(model, lengths, ...)`` sorts the designs by length, cuts them into padded batches with
masks (so a batch wastes little on padding), runs the reverse diffusion for each batch, and returns
the backbones in Angstrom (or streams them to PDB files). Every design d has its own seed,
SplitMix64(run seed, d): its starting noise comes from a generator seeded with it, and on the C++
backend the noise of every step too (Philox keyed by the design seed and t; strided sampling draws
the same stream on the host whenever the C++ extension is built, and centres in C++ on CPU), and on
CPU the model's node-wise products run shape-independently (``batch_invariant``), so a design comes
out the same, bit for bit, whatever batch it shares (same device and backend; the fused EGNN
backends; on CUDA up to the GEMMs' rounding until measured there). Elsewhere (the reference step
at full length, or no C++ extension) step noise comes from one generator per batch: reproducible
for the same lengths, batch size and seed, but not per design.

Output folders: one file per design (PDB or mmCIF, optionally gzipped), optional trajectories
(multi-model mmCIF), and a manifest (JSON and CSV) rewritten atomically after every batch. The
manifest's ``run`` entry (model fingerprint, lengths, seed, schedule, formats) identifies the run:
a folder holding another run is refused, naming what differs, unless ``overwrite``.
"""
from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import math
import numbers
import sys
import time
import warnings
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from protdiff_fast._checks import check_device
from protdiff_fast.backends import cpu_extension
from protdiff_fast.diffusion.graphs import DenoiseStep
from protdiff_fast.diffusion.scheduler import DDPMScheduler
from protdiff_fast.io.dataset import SCALE_A
from protdiff_fast.nn.batch_invariant import batch_invariant as invariant_products
from protdiff_fast.ops.ddpm_cpu import per_sample_seeds
from protdiff_fast.reference.com import remove_center_of_mass_reference
from protdiff_fast.io.jsonio import dumps_strict

EpsModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class SamplingError(RuntimeError):
    """The model produced something unusable (NaN/Inf) at a given step and sample."""


class OutputError(OSError):
    """Writing the run's files failed (disk full, permissions); finished designs stay listed."""


FORMATS = ("pdb", "cif")


class RunProgress:
    """One progress line for a whole sampling run: designs done / total, backbones/s, ETA.

    Work is counted in design-steps (a batch of B designs advances B per reverse step), so the
    rate and ETA move inside long batches too; "backbones/s" is design-steps / steps per design
    per second of wall time, writing included. On a terminal the line is redrawn in place
    (carriage return, at most every ``interval`` s, default 0.2); in a log (not a TTY) a plain
    line is printed at most every ``interval`` s (default 30) and at the end, so logs stay short.
    """

    def __init__(self, total_designs: int, steps_per_design: int, stream=None, interval: Optional[float] = None,
                 prefix: str = "sampling", clock: Callable[[], float] = time.monotonic,
                 others: Optional[Callable[[], int]] = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty()) if isatty is not None else False
        self.interval = interval if interval is not None else (0.2 if self.tty else 30.0)
        self.total, self.steps = int(total_designs), max(1, int(steps_per_design))
        self.prefix, self.clock = prefix, clock
        self.done = 0  # finished (written) designs
        self.units = 0  # design-steps computed, for the rate
        self.started = clock()
        self.last_emit = None
        self.width = 0
        # designs finished elsewhere (other torchrun ranks), polled at most every 2 s
        self.others, self.others_done, self.others_polled = others, 0, None

    def advance(self, designs_in_batch: int) -> None:
        """One reverse step of a batch."""
        self.units += designs_in_batch
        self._maybe_emit()

    def undo(self, units: int) -> None:
        """A batch that failed (out of memory) and will be redone: its steps do not count."""
        self.units -= units

    def finished(self, n: int) -> None:
        self.done += n
        self.units = max(self.units, self.done * self.steps)
        self._maybe_emit()

    def line(self) -> str:
        now = self.clock()
        if self.others is not None and (self.others_polled is None or now - self.others_polled >= 2.0):
            self.others_done, self.others_polled = self.others(), now
        elapsed = max(now - self.started, 1e-9)
        done = self.done + self.others_done
        units = self.units + self.others_done * self.steps
        rate = units / self.steps / elapsed
        remaining = self.total * self.steps - units
        if done >= self.total:
            eta = f"done in {_fmt_duration(elapsed)}"
        elif units > 0:
            eta = f"ETA {_fmt_duration(remaining / (units / elapsed))}"
        else:
            eta = "ETA ?"
        pct = 100.0 * done / self.total if self.total else 100.0
        return f"{self.prefix}: {done}/{self.total} designs ({pct:.0f}%) | {rate:.3g} backbones/s | {eta}"

    def _maybe_emit(self, force: bool = False) -> None:
        now = self.clock()
        if not force and self.last_emit is not None and now - self.last_emit < self.interval:
            return
        self.last_emit = now
        text = self.line()
        if self.tty:  # redraw in place; pad over a longer previous line
            self.stream.write("\r" + text.ljust(self.width))
            self.width = max(self.width, len(text))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def start(self) -> None:
        self._maybe_emit(force=True)

    def close(self) -> None:
        self._maybe_emit(force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def model_fingerprint(model) -> str:
    """sha256 of a module's parameters and buffers (names, shapes, dtypes, bytes), or its type name.

    Identifies "the same model" across processes and checkpoint paths: a resumed run must use it.
    """
    state = getattr(model, "state_dict", None)
    if state is None:
        return f"{type(model).__module__}.{type(model).__qualname__}"
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if getattr(cfg, "tanh", False):  # parameter-free switches of the function
        h.update(f"tanh:{float(getattr(cfg, 'coords_range', 1.0))!r};".encode())
    # the sinusoidal tables are buffers outside the state_dict, built from max_length (the index embedding's
    # base) and seed (the time embedding's rotation): the same weights under another of them are another
    # function. Hashed only away from the defaults (128, 0), so fingerprints of earlier runs stay as they were.
    for name, default in (("max_length", 128), ("seed", 0)):
        value = getattr(cfg, name, default)
        if value != default:
            h.update(f"{name}:{int(value)};".encode())
    for name, tensor in sorted(state().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def _backends(model, scheduler, device) -> Dict[str, str]:
    from protdiff_fast.backends import resolve

    out = {"ddpm_step": resolve("ddpm_step", scheduler.backend, device)}
    egnn = getattr(model, "backend", None)
    if isinstance(egnn, str):
        out["egnn"] = resolve("egnn_pair_aggregate", egnn, device)
    return out


def _run_differences(saved: Dict, now: Dict, prefix: str = "") -> List[str]:
    """What differs between the run recorded in a folder and this one, in words (a nested dict such as
    the scheduler's config by its own keys: "scheduler.eta: ...")."""
    diffs = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key, "<not recorded>"), now.get(key, "<not recorded>")
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.extend(_run_differences(a, b, prefix=f"{prefix}{key}."))
        elif key == "lengths" and isinstance(a, list) and isinstance(b, list):
            first = next((i for i, (u, v) in enumerate(zip(a, b)) if u != v), min(len(a), len(b)))
            diffs.append(f"lengths: {len(a)} designs in the folder vs {len(b)} now, first difference at design "
                         f"{first}")
        else:
            diffs.append(f"{prefix}{key}: {json.dumps(a, sort_keys=True)} in the folder vs "
                         f"{json.dumps(b, sort_keys=True)} now")
    return diffs


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


# how an allocation failure reads when it is not a torch.OutOfMemoryError: CUDA's "out of memory", and torch's
# CPU allocator, which raises a plain RuntimeError ("DefaultCPUAllocator: can't allocate memory: you tried to
# allocate ..." in torch 2.x, "... not enough memory ..." before)
OOM_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory")


def _is_oom(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or any(m in text for m in OOM_MESSAGES)


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


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _expand_lengths(lengths: Union[int, Sequence[int]], num_samples: Optional[int], max_length: Optional[int]):
    if isinstance(lengths, torch.Tensor) and lengths.dim() <= 1:  # its items are 0-d tensors, not integers
        lengths = lengths.tolist()
    if _is_int(lengths):
        lengths = [lengths]
    if not isinstance(lengths, (str, bytes)) and isinstance(lengths, Iterable):
        try:  # read once: a generator checked and then read again came back empty ("nothing to sample")
            lengths = list(lengths)
        except TypeError:  # an iterable that cannot be iterated (a 0-d array)
            pass
    if isinstance(lengths, (str, bytes)) or not isinstance(lengths, list) or not all(map(_is_int, lengths)):
        shown = lengths if isinstance(lengths, (str, bytes, numbers.Number)) else list(lengths)[:5]
        raise ValueError(f"lengths: an integer or a sequence of integers, got {shown!r}")
    lengths = [int(n) for n in lengths]
    if num_samples is not None:
        if not _is_int(num_samples) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        lengths = [n for n in lengths for _ in range(num_samples)]
    if not lengths:
        raise ValueError("lengths: nothing to sample")
    bad = [n for n in lengths if n < 1 or (max_length is not None and n > max_length)]
    if bad:
        limit = f"[1, {max_length}]" if max_length is not None else ">= 1"
        raise ValueError(f"lengths: {sorted(set(bad))[:5]} outside the allowed range {limit}")
    return lengths


def _scheduler_for(model, scheduler: Optional[DDPMScheduler]) -> DDPMScheduler:
    """The model's own noise schedule when none is given; a given one must match it (T and betas): the
    eps a model predicts is only meaningful under the schedule it was trained with."""
    cfg = getattr(model, "config", None)
    trained = None
    if cfg is not None and all(hasattr(cfg, k) for k in ("num_timesteps", "beta_start", "beta_end")):
        trained = dict(num_train_timesteps=int(cfg.num_timesteps), beta_start=float(cfg.beta_start),
                       beta_end=float(cfg.beta_end))
    if scheduler is None:
        return DDPMScheduler(**trained) if trained else DDPMScheduler()
    if trained:
        given = {k: scheduler.config[k] for k in trained}
        if scheduler.config.get("beta_schedule", "linear") != "linear" or any(
                not math.isclose(float(given[k]), float(v), rel_tol=1e-9) for k, v in trained.items()):
            raise ValueError(f"scheduler: {given} (schedule {scheduler.config.get('beta_schedule')!r}) differs from "
                             f"the schedule this model was trained with ({trained}, linear)")
    return scheduler


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
    file_format: str = "pdb",
    compress: bool = False,
    trajectory_every: Optional[int] = None,
    overwrite: bool = False,
    metrics: bool = True,
    progress_interval: Optional[float] = None,
    progress_stream=None,
    cuda_graphs: Optional[bool] = None,
    autocast: Optional[torch.dtype] = None,
    batch_invariant: Optional[bool] = None,
    on_diverge: str = "raise",
) -> List[Optional[np.ndarray]]:
    """Sample one backbone per entry of ``lengths`` (times ``num_samples`` when given, each length that many
    times in a row: ``[50, 60]`` with 2 is designs 50, 50, 60, 60, indexed 0..3).

    ``model(x_t, t, mask) -> eps_hat`` works in model units (1 unit = ``scale`` A); the results are
    returned in Angstrom, in the order of ``lengths``.

    With ``out_dir`` each design is written to ``design_<index>.<file_format>`` (``"pdb"`` or
    ``"cif"``; ``.gz`` added with ``compress``) and recorded in ``manifest.json`` and
    ``manifest.csv`` (index, file, length, seed, backbone metrics, backends, device, library
    version), rewritten atomically after every batch. ``trajectory_every=k`` also writes every k-th
    reverse step (and x_T and x_0) of each design to ``design_<index>.traj.cif[.gz]``, one model
    per frame; this keeps B x (steps / k) frames of a batch in memory until it is written.

    The folder must be new or empty. A folder holding a manifest of another run (other model,
    lengths, seed, schedule or formats) is refused with a message naming what differs, unless
    ``overwrite``: then that run's files are deleted first (other files are left alone). With
    ``resume`` the designs the folder's manifests list as finished are skipped (their entries in
    the result are None). ``design_indices`` samples only those designs (e.g. one design of a large
    run, alone: on the fused backends it comes out identical to its copy in the big run).

    ``cuda_graphs`` (default: on for CUDA devices) captures each batch's reverse step (model + fused
    step) once as a CUDA graph and replays it (:mod:`protdiff_fast.diffusion.graphs`); results are
    the same as without. It needs the fused step's per-design seeds (not the strided scheduler).

    ``batch_invariant`` (default: on for CPU devices with the fused step) runs the model's node-wise
    linears and centring shape-independently (:mod:`protdiff_fast.nn.batch_invariant`): without it
    a BLAS picks its kernel by the batch's shape and a design can differ in the last bit from its
    copy in another batch, which a chaotic trajectory amplifies. On CUDA it is off by default (not
    yet measured there): designs then match their copies in other batches up to that rounding.

    ``autocast`` (torch.bfloat16 or torch.float16) runs the model under ``torch.autocast`` with that
    dtype: its GEMMs and the fused EGNN pair op in low precision (the op with float32 coordinates),
    the coordinates and the DDPM step in ``dtype``; part of the run's identity. On a GPU this is what
    reaches the bf16 tensor-core rate; designs differ from a float32 run by bf16 rounding.

    ``on_diverge``: what a design that diverges (the model's output NaN/Inf, or coordinates beyond
    ``DIVERGED_UNITS``) does to the run. ``"raise"`` (default): SamplingError naming the step and
    design; the designs of earlier batches stay on disk. ``"skip"``: the design is set aside (its
    entry in the result is None), listed under ``"failed"`` in the manifest with the step and reason
    (and in the CSV with its status), and the others go on. With per-design noise they come out as
    they would without it (every op of a step is per design). ``resume`` does not retry a failed
    design: with the same model, seed and steps it fails again.

    Under torchrun (process group initialised) rank r samples the designs with index % world == r
    and keeps its own ``manifest.rank<r>.json``. A write that fails (disk full) raises OutputError
    after the designs finished so far are on disk and in the manifest; ``resume`` continues.
    """
    scheduler = _scheduler_for(model, scheduler)
    # None: the steps the scheduler was set to (all T unless its set_timesteps was called), not a reset
    scheduler.set_timesteps(num_inference_steps if num_inference_steps is not None
                            else scheduler.num_inference_steps)
    device = check_device(device)
    lengths = _expand_lengths(lengths, num_samples, getattr(model, "max_length", None))
    shortest_trained = getattr(model, "min_training_length", None)
    if shortest_trained is not None and min(lengths) < shortest_trained:
        warnings.warn(f"lengths: {sorted({n for n in lengths if n < shortest_trained})[:5]} are shorter than any chain "
                      f"this model was trained on ({shortest_trained}..): expect poor samples, or a diverging run "
                      "with few steps", UserWarning, stacklevel=2)
    if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not _is_int(seed):
        raise ValueError(f"seed: an integer, got {seed!r}")
    if file_format not in FORMATS:
        raise ValueError(f"file_format: {file_format!r}; choose one of {', '.join(FORMATS)}")
    if trajectory_every is not None and (not _is_int(trajectory_every) or trajectory_every < 1):
        # (2.5 kept every 5th step, True every step: a count of steps is an integer)
        raise ValueError(f"trajectory_every must be >= 1 (an integer: a count of steps), got {trajectory_every!r}")
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: resume keeps the folder's designs, "
                         "overwrite deletes them")
    if design_indices is None:
        wanted = set(range(len(lengths)))
    else:
        if _is_int(design_indices):
            design_indices = [design_indices]
        if isinstance(design_indices, (str, bytes)) or not isinstance(design_indices, Iterable):
            raise ValueError(f"design_indices: a sequence of design indices (integers), got {design_indices!r}")
        design_indices = list(design_indices)
        if not design_indices:  # (it returned every design as None: "all failed", with nothing run)
            raise ValueError("design_indices: empty; give the designs to sample, or None for all")
        not_int = [i for i in design_indices if not _is_int(i)]
        if not_int:  # int() would have sampled design 1 for 1.7 (and design 1 for True)
            raise ValueError(f"design_indices: integers, got {not_int[:5]!r}")
        wanted = {int(i) for i in design_indices}
    out_of_range = sorted(i for i in wanted if i < 0 or i >= len(lengths))
    if out_of_range:
        raise ValueError(f"design_indices: {out_of_range[:5]} outside [0, {len(lengths) - 1}] "
                         f"(this run has {len(lengths)} designs)")
    if on_diverge not in ("raise", "skip"):
        raise ValueError(f"on_diverge: 'raise' or 'skip', got {on_diverge!r}")
    if autocast is not None and autocast not in (torch.bfloat16, torch.float16):
        raise ValueError(f"autocast: torch.bfloat16 or torch.float16 (or None), got {autocast!r}")
    from protdiff_fast.models.protdiff import ProtDiff

    # ProtDiff takes x_t only in its weights' dtype (a wrapper module may cast: not checked), and its own
    # message would tell the caller of sample() to convert x_t, which they do not hold
    weights = next((p.dtype for p in model.parameters() if p.is_floating_point()), None) \
        if isinstance(model, ProtDiff) else None
    if weights is not None and weights != dtype:
        raise ValueError(f"dtype: {dtype}, but the model's weights are {weights}: pass dtype={weights}, or "
                         f"convert the model (model.to({dtype})); for low precision use autocast instead")
    seeds = design_seeds(seed, len(lengths))
    from protdiff_fast import __version__

    backends_used = _backends(model, scheduler, device)
    run_info = dict(lengths=lengths, seed=int(seed), num_inference_steps=scheduler.num_inference_steps,
                    scheduler=scheduler.config, scale=scale, model=model_fingerprint(model),
                    format=file_format, gzip=bool(compress), trajectory_every=trajectory_every)
    if autocast is not None:  # only then: manifests of float32 runs stay as they were
        run_info["autocast"] = str(autocast).replace("torch.", "")
    run_info = json.loads(json.dumps(run_info))  # the form it has when read back from the manifest
    finished: Dict[str, Dict] = {}  # this process's manifest
    failed_so_far: Dict[str, Dict] = {}  # designs set aside (on_diverge="skip"), this process's manifest
    finished_any: set = set()  # finished by any process of this run (resume)
    rank, world = _distributed()
    if out_dir is not None:
        out_dir = Path(out_dir)
        manifest = out_dir / (MANIFEST if world == 1 else f"manifest.rank{rank}.json")
        finished, finished_any, failed_so_far = _prepare_folder(out_dir, manifest, run_info, resume, overwrite, rank,
                                                                world)
    # under torchrun every rank takes every world-th design: no overlap, similar lengths per rank
    todo = [i for i in sorted(wanted) if i not in finished_any and i % world == rank]
    # the fused steps key their noise by (design seed, t): a design does not depend on its batch
    # (the strided step: the C++ step's Philox stream, drawn on the host, when the extension is there)
    per_design_noise = (backends_used["ddpm_step"] in ("cpu", "triton") if not scheduler.strided
                        else cpu_extension() is not None)
    if cuda_graphs is None:
        cuda_graphs = device.type == "cuda"
    if batch_invariant is None:
        batch_invariant = per_design_noise and device.type == "cpu"
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
    # under torchrun with an output folder, rank 0 shows the whole run (the other ranks' progress read
    # from their manifests) and the other ranks stay quiet; without a folder each rank shows its share
    whole_run = world > 1 and out_dir is not None
    if progress and (rank == 0 or not whole_run):
        run_todo = {i for i in wanted if i not in finished_any} if whole_run else set(todo)
        if finished_any:
            print(f"sample: resuming: {len(finished_any)} designs already done (finished, or set aside as diverged), "
                  f"{len(run_todo)} to go",
                  file=progress_stream or sys.stderr)
        others = None
        if whole_run:
            def others() -> int:  # designs of this run finished by the other ranks so far
                done = 0
                for r in range(1, world):
                    path = out_dir / f"manifest.rank{r}.json"
                    try:
                        saved = json.loads(path.read_text())
                        keys = list(saved["designs"]) + list(saved.get("failed") or {})
                    except (OSError, ValueError, KeyError):
                        continue  # not written yet (or being replaced): count it next time
                    done += sum(1 for key in keys if int(key) in run_todo)
                return done
        bar = RunProgress(len(run_todo), len(steps), stream=progress_stream, interval=progress_interval,
                          prefix="sampling" if whole_run or world == 1 else f"sampling [rank {rank}/{world}]",
                          others=others)
        bar.start()
    version = __version__
    suffix = "." + file_format + (".gz" if compress else "")
    while batches:
        idx = batches.popleft()
        units_before = bar.units if bar is not None else 0
        try:
            with invariant_products(batch_invariant):
                x, frames, failed = _denoise_batch(model, scheduler, idx, lengths, seeds, steps, per_design_noise,
                                                   device, dtype, bar, trajectory_every, cuda_graphs, autocast,
                                                   on_diverge)
        except (RuntimeError, MemoryError) as err:  # out of memory: halve the batch and retry, never lose the run
            if not _is_oom(err) or len(idx) == 1:
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            half = len(idx) // 2
            print(f"sample: out of memory with a batch of {len(idx)} (length {lengths[idx[-1]]}); "
                  f"retrying as {half} + {len(idx) - half}", file=sys.stderr)
            batches.extendleft([idx[half:], idx[:half]])
            if bar is not None:
                bar.undo(bar.units - units_before)  # the failed steps are redone
            continue
        for k, i in enumerate(idx):
            if int(i) not in failed:
                results[int(i)] = x[k, : lengths[i]].double().cpu().numpy() * scale
        if failed:
            print(f"sample: {len(failed)} design(s) diverged and were set aside: " +
                  ", ".join(f"{i} (length {lengths[i]}, t={f['t']})" for i, f in sorted(failed.items())),
                  file=progress_stream or sys.stderr)
        if out_dir is not None:
            _write_batch(out_dir, manifest, idx, results, frames, finished, run_info, lengths, seeds, suffix,
                         scale, metrics, dict(backend=backends_used, device=str(device), version=version),
                         failed, failed_so_far)
        failed_so_far.update({str(i): dict(index=int(i), length=int(lengths[i]), seed=int(seeds[i]), **f)
                              for i, f in failed.items()})
        if bar is not None:
            bar.finished(len(idx))
    if bar is not None:
        bar.close()
    return [results.get(i) for i in range(len(lengths))]


def _prepare_folder(out_dir: Path, manifest: Path, run_info: Dict, resume: bool, overwrite: bool, rank: int,
                    world: int):
    """Check the output folder against this run; returns (own finished entries, finished or failed by
    any rank, own failed entries)."""
    saved = {}
    if out_dir.is_dir():
        for path in sorted(out_dir.glob("manifest*.json")):
            try:
                saved[path] = json.loads(path.read_text())
                saved[path]["run"], saved[path]["designs"]  # noqa: B018 (shape check)
            except (ValueError, KeyError, TypeError) as err:
                if not overwrite:
                    raise ValueError(f"{path}: not a readable sampling manifest ({err}); move it away or pass "
                                     "--overwrite") from None
                saved[path] = dict(run={}, designs={})
    diffs = {path: _run_differences(m["run"], run_info) for path, m in saved.items()}
    other = {path: d for path, d in diffs.items() if d}
    if other and not overwrite:
        path, d = next(iter(other.items()))
        raise ValueError(f"{out_dir}: holds a different sampling run ({path.name}: " + "; ".join(d) +
                         "); choose a new folder, or pass --overwrite to delete that run's files and start again")
    finished, finished_any, failed = {}, set(), {}
    if overwrite and not saved and out_dir.exists() and any(out_dir.iterdir()):
        # overwrite deletes an earlier run's files; files of no run (the user's own) are never replaced
        raise FileExistsError(f"{out_dir}: holds files but no sampling run (no manifest) for --overwrite to "
                              "replace; choose a new folder (nothing is overwritten)")
    if overwrite:
        if rank == 0:  # one process deletes; the others wait at the barrier below
            for path, m in saved.items():
                for entry in m["designs"].values():
                    for key in ("file", "trajectory"):
                        name = entry.get(key) if isinstance(entry, dict) else None
                        # only plain names inside the folder: a manifest never makes us delete elsewhere
                        if name and Path(name).name == name and (out_dir / name).is_file():
                            (out_dir / name).unlink()
                for stale in (path, path.with_suffix(".csv")):
                    if stale.exists():
                        stale.unlink()
            if saved and (out_dir / "metrics.json").is_file():
                (out_dir / "metrics.json").unlink()
    elif resume and saved:
        def on_disk(entry) -> bool:  # a design whose file was deleted since is sampled again (same seed)
            name = entry.get("file") if isinstance(entry, dict) else None
            return not name or _design_file_intact(out_dir / name, entry.get("length"))

        gone = sorted(int(i) for m in saved.values() for i, e in m["designs"].items() if not on_disk(e))
        if gone and rank == 0:
            print(f"resume: {len(gone)} finished design(s) missing or unreadable in {out_dir} ({gone[:5]}"
                  f"{' ...' if len(gone) > 5 else ''}): sampling them again", file=sys.stderr)
        for path, m in saved.items():  # a failed design is not retried: it would fail the same way
            finished_any.update(int(i) for i, e in m["designs"].items() if on_disk(e))
            finished_any.update(int(i) for i in (m.get("failed") or {}))
        if manifest in saved:
            finished = {i: e for i, e in saved[manifest]["designs"].items() if on_disk(e)}
            failed = dict(saved[manifest].get("failed") or {})
    elif out_dir.exists() and any(out_dir.iterdir()):
        what = (f"holds this run with {sum(len(m['designs']) for m in saved.values())} of "
                f"{len(run_info['lengths'])} designs finished; pass --resume to continue it or --overwrite to "
                "start again" if saved else "exists and is not empty; choose a new folder, or resume a run")
        raise FileExistsError(f"{out_dir}: {what} (nothing is overwritten)")
    if world > 1:  # every rank has checked the folder before any rank writes into it
        torch.distributed.barrier()
    out_dir.mkdir(parents=True, exist_ok=True)
    return finished, finished_any, failed


def _design_file_intact(path: Path, length) -> bool:
    """The design file is there and reads back as one chain of its length (a file cut short since the
    run, e.g. by a full disk or a copy, is not a finished design)."""
    if not path.is_file():
        return False
    from protdiff_fast.io import read_backbones

    try:
        chains = read_backbones(path)
    except Exception:  # noqa: BLE001 - any reading error: not intact
        return False
    return len(chains) == 1 and (length is None or len(chains[0].ca) == int(length))


def _write_batch(out_dir, manifest, idx, results, frames, finished, run_info, lengths, seeds, suffix, scale,
                 with_metrics, provenance, failed=None, failed_before=None) -> None:
    """Files of one finished batch, then the manifest; a failed write becomes an OutputError. Designs
    in ``failed`` (set aside, {index: {"t", "reason"}}) get no file, only a manifest entry."""
    failed = failed or {}
    failed_all = dict(failed_before or {})
    failed_all.update({str(i): dict(index=int(i), length=int(lengths[i]), seed=int(seeds[i]), **f)
                       for i, f in failed.items()})
    from protdiff_fast.io.structure import write_backbone, write_trajectory
    from protdiff_fast.metrics.backbone import backbone_metrics

    current = None
    try:
        new = {}
        for k, i in enumerate(idx):
            i = int(i)
            if i in failed:
                continue
            name = f"design_{i:06d}{suffix}"
            current = out_dir / name
            try:
                write_backbone(current, results[i], overwrite=True)  # a resumed batch may have written it
            except ValueError as err:  # PDB's columns cannot hold it (e.g. an exploding sample)
                raise ValueError(f"design {i} (seed {int(seeds[i])}): {err}; {len(finished)} finished designs are "
                                 f"listed in {manifest}; sample again with --format cif (in a new folder)") from None
            entry = dict(index=i, file=name, length=int(lengths[i]), seed=int(seeds[i]), **provenance)
            if frames is not None:
                traj_name = f"design_{i:06d}.traj.cif" + (".gz" if suffix.endswith(".gz") else "")
                current = out_dir / traj_name
                write_trajectory(current, [f[k, : lengths[i]] * scale for _, f in frames],
                                 timesteps=[t for t, _ in frames], overwrite=True)
                entry["trajectory"] = traj_name
            if with_metrics:  # cheap per design (O(L^2) distances); NaN for undefined ones becomes null
                entry["metrics"] = {key: (None if isinstance(v, float) and not np.isfinite(v) else v)
                                    for key, v in backbone_metrics(results[i]).items() if key != "length"}
            new[str(i)] = entry
        current = manifest
        # the manifest lists a design only once its files are complete
        content = dict(run=run_info, designs={**finished, **new})
        if failed_all:  # only then: manifests of runs where nothing failed stay as they were
            content["failed"] = failed_all
        _write_manifest(manifest, content)
        finished.update(new)
        current = manifest.with_suffix(".csv")
        _write_manifest_csv(current, finished, failed_all)
    except OSError as err:
        done = len(finished)
        cause = ("the disk is full" if err.errno == errno.ENOSPC else
                 "the disk quota is exceeded" if err.errno == errno.EDQUOT else err.strerror or str(err))
        raise OutputError(err.errno, f"writing {current} failed: {cause}. {done} finished designs are on disk and "
                                     f"listed in {manifest}; free space (or fix the folder) and run again with "
                                     "--resume to continue") from err


# model units (data and noise are O(1) there; 1e4 units is 1e5 A at the default scale): a sample this
# far out has diverged
DIVERGED_UNITS = 1e4


def _denoise_batch(model, scheduler, idx, lengths, seeds, steps, per_design_noise, device, dtype, bar,
                   trajectory_every=None, cuda_graphs=False, autocast=None, on_diverge="raise"):
    """All reverse steps of one padded batch; returns x_0 (B, L, 3) in model units, the trajectory
    frames [(timestep, (B, L, 3) cpu float32)] when ``trajectory_every`` is set, and the designs that
    diverged ({index: {"t", "reason"}}; with ``on_diverge="raise"`` the first one raises instead)."""
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
    x_start = x
    runner = DenoiseStep(model, scheduler, mask, seeds=None if step_seed is None else step_seed.to(device),
                         generator=None if per_design_noise else generator, capture=cuda_graphs, autocast=autocast,
                         step_finite_rows=on_diverge == "skip")
    frames = None
    if trajectory_every is not None:  # frame 0 is x_T; after step k the sample is x at the next timestep
        frames = [(int(steps[0]), x.detach().float().cpu().numpy().astype(np.float64))]
    failed: Dict[int, Dict] = {}  # design index -> {"t", "reason"} (on_diverge="skip")
    parked = None  # rows of failed designs, held at their x_T so the batch stays finite
    for k, step_t in enumerate(steps):
        t = torch.full((len(idx),), step_t, dtype=torch.long, device=device)
        eps, x = runner(x, t)  # model + step (a CUDA graph replay on GPU); outputs checked here
        # NaN/Inf from the model, or a diverging sample (e.g. too few strided steps, or lengths far
        # outside the training range): coordinates no protein has (NaN fails the comparison too)
        bad_eps = ~torch.isfinite(eps).flatten(1).all(1)
        bad = bad_eps | ~(x.abs().flatten(1).amax(1) <= DIVERGED_UNITS)
        if parked is not None:
            bad &= ~parked
        if bool(bad.any()):
            rows = bad.nonzero().flatten().tolist()
            first = int(idx[rows[0]])
            if bool(bad_eps[rows[0]]):
                reason = f"model output is NaN/Inf at t={step_t}"
            else:
                reason = (f"the sample diverged (coordinates beyond {DIVERGED_UNITS:.0e} model units, or Inf/NaN) "
                          f"after the step at t={step_t}")
            if on_diverge == "raise":
                hint = "" if bool(bad_eps[rows[0]]) else (
                    f"; {len(steps)} reverse steps may be too few for this model, or the length outside what it "
                    "was trained on (--on-diverge skip records such designs as failed and goes on)")
                raise SamplingError(f"{reason} for design {first} (length {lengths[first]}, seed {seeds[first]})"
                                    + hint)
            for r in rows:
                i = int(idx[r])
                why = ("model output is NaN/Inf" if bool(bad_eps[r]) else
                       f"coordinates beyond {DIVERGED_UNITS:.0e} model units, or Inf/NaN")
                failed[i] = dict(t=int(step_t), reason=why)
            parked = bad if parked is None else parked | bad
        if parked is not None:
            # the other designs never see these rows (every op is per design), but keep them finite
            x = torch.where(parked.view(-1, 1, 1), x_start, x)
        if frames is not None and ((k + 1) % trajectory_every == 0 or k == len(steps) - 1):
            t_now = int(steps[k + 1]) if k + 1 < len(steps) else 0
            frames.append((t_now, x.detach().cpu().numpy().astype(np.float64)))
        if bar is not None:
            bar.advance(len(idx))
    return x, frames, failed


MANIFEST = "manifest.json"
CSV_FIRST = ["index", "file", "length", "seed", "device", "version", "backend", "trajectory"]


def _manifest_csv(designs: Dict[str, Dict], failed: Optional[Dict[str, Dict]] = None) -> str:
    """One row per design: the manifest's fields, metrics flattened, backends as egnn=cpu;ddpm_step=cpu;
    designs set aside (diverged) as rows with no file and a ``status`` column saying why."""
    failed = failed or {}
    rows = [designs[k] if k in designs else dict(failed[k], status=f"failed at t={failed[k]['t']}: "
                                                                   f"{failed[k]['reason']}")
            for k in sorted(set(designs) | set(failed), key=int)]
    metric_keys = sorted({m for r in rows for m in (r.get("metrics") or {})})
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    first = CSV_FIRST + (["status"] if failed else [])  # the column only when something failed
    writer.writerow(first + metric_keys)
    for r in rows:
        backend = r.get("backend")
        backend = ";".join(f"{k}={v}" for k, v in sorted(backend.items())) if isinstance(backend, dict) else backend
        base = dict(r, backend=backend)
        if failed and "status" not in base:
            base["status"] = "finished"
        writer.writerow([("" if base.get(c) is None else base.get(c)) for c in first] +
                        [("" if (r.get("metrics") or {}).get(m) is None else r["metrics"][m]) for m in metric_keys])
    return buf.getvalue()


def _write_manifest(path: Path, content: Dict) -> None:
    from protdiff_fast.io.structure import _atomic_write

    _atomic_write(path, lambda tmp: Path(tmp).write_text(dumps_strict(content, indent=1, sort_keys=True)))


def _write_manifest_csv(path: Path, designs: Dict[str, Dict], failed: Optional[Dict[str, Dict]] = None) -> None:
    """The CSV copy, written after the JSON (which resume trusts): it never lists more than the JSON."""
    from protdiff_fast.io.structure import _atomic_write

    text = _manifest_csv(designs, failed)
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_manifests(out_dir: Union[str, Path], section: str = "designs") -> Dict[int, Dict]:
    """Every finished design of a run folder (all ranks' manifests), by index; ``section="failed"``:
    the designs set aside because they diverged (``on_diverge="skip"``)."""
    designs: Dict[int, Dict] = {}
    for path in sorted(Path(out_dir).glob("manifest*.json")):
        for key, entry in (json.loads(path.read_text()).get(section) or {}).items():
            designs[int(key)] = entry
    return designs
