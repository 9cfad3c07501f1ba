"""The ``protdiff-fast`` command line."""
from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
from typing import List, Optional

AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}  # sample --autocast: torch dtype names


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    import protdiff_fast
    from protdiff_fast import backends

    print(f"protdiff_fast {protdiff_fast.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    ext = backends.cpu_extension()
    if ext is not None:
        print(f"C++ extension: {ext.compiler}, {ext.build_type}, OpenMP {'on' if ext.has_openmp else 'off'} "
              f"({ext.max_threads()} threads), -march=native {'on' if ext.native_arch else 'off'}")
        from protdiff_fast.ops.egnn_cpu import amx_status

        usable, why = amx_status()
        print("bf16 pair products on AMX: " + ("available (bf16 inputs, or float32 with --matmul-precision medium)"
                                                if usable else f"not available ({why})"))
    print(backends.describe(args.device))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from protdiff_fast.bench import runner

    if args.targets and args.quick:
        raise ValueError("--targets runs the target rows as they are; --quick makes a small grid: give one")
    device = args.device or ("cuda" if __import__("torch").cuda.is_available() else "cpu")
    suites = ["egnn", "ddpm-step", "sampler", "sampler-mixed", "train-step"] if args.suite == "all" else [args.suite]
    command = shlex.join(["protdiff-fast", *args.argv])  # as parsed: also right for python -m protdiff_fast.bench
    result = runner.run(suites, device, args.quick, args.out, args.timeout, args.compare, command,
                        providers=args.providers.split(",") if args.providers else None,
                        which="targets" if args.targets else "full",
                        dtypes=args.dtypes.split(",") if args.dtypes else None,
                        hidden=_int_list("--hidden", args.hidden) if args.hidden else None,
                        max_n=args.max_n, warm_jobs=args.warm_jobs, runs=args.runs)
    print(f"wrote {args.out}/results.json, {args.out}/results.md" +
          (" (no plots: matplotlib missing)" if result["plots"] is None else f" and {len(result['plots'])} plots"))
    return 1 if result["regressions"] else 0


def _metric_rows(paths, clash_threshold):
    from protdiff_fast.io import StructureError, find_structure_files, read_backbones
    from protdiff_fast.io.dataset import chain_fingerprint
    from protdiff_fast.metrics import backbone_metrics
    from protdiff_fast.metrics.backbone import chain_breaks

    rows, cas, skipped, seen = [], [], [], {}
    for f in find_structure_files(paths):
        try:
            for bb in read_backbones(f):  # missing residues (a numbering jump and a long bond): not bad bonds
                # one chain twice (1crn.pdb beside 1CRN.cif) would weigh twice in the set's means: counted once,
                # as prepare keeps it once
                fingerprint = chain_fingerprint(bb.ca, bb.sequence)
                if fingerprint in seen:
                    skipped.append(f"{f}: chain {bb.chain_id}: duplicate: the same CA trace and sequence as "
                                   f"{seen[fingerprint]} (counted once)")
                    continue
                seen[fingerprint] = f"{f} chain {bb.chain_id}"
                rows.append(backbone_metrics(bb.ca, clash_threshold, chain_breaks(bb.ca, bb.resnums)))
                cas.append(bb.ca)
        except StructureError as err:
            skipped.append(str(err))
    return rows, cas, skipped


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from protdiff_fast.metrics import format_table, plot_metrics, summarize, tm_diversity
    from protdiff_fast.metrics.backbone import check_plot_path

    if args.plot:
        check_plot_path(args.plot)  # before the work: a path it would refuse is named first
    if not (args.clash_threshold > 0 and math.isfinite(args.clash_threshold)):
        raise ValueError(f"--clash-threshold: a distance in A > 0, got {args.clash_threshold}")
    sets = {"samples": args.paths}
    if args.reference:
        sets["reference"] = args.reference
    columns, all_rows = {}, {}
    for name, paths in sets.items():
        rows, cas, skipped = _metric_rows(paths, args.clash_threshold)
        for msg in skipped:
            print(f"skipped: {msg}")
        if not rows:
            print(f"error: no readable structures in {name} ({', '.join(map(str, paths))})")
            return 2
        columns[name] = summarize(rows)
        if args.tm:
            columns[name]["tm_diversity"] = tm_diversity(cas)
        all_rows[name] = rows
    print(f"clash: non-adjacent CA pairs closer than {args.clash_threshold} A; CA-CA ideal 3.80 A; "
          "rg_ratio: Rg / (2.2 N^0.38 A)")
    print(format_table(columns))
    if args.plot:
        written = plot_metrics(all_rows, args.plot)
        print(f"plot: {written}" if written else "no plot: matplotlib is not installed (pip install matplotlib)")
    return 0


def _check_prepare_options(args: argparse.Namespace):
    """prepare's options and --out, named before any file is read; returns --out as a Path."""
    from protdiff_fast.io.dataset import check_cache_file
    from protdiff_fast.io.structure import check_output_file

    if args.min_length < 1:
        raise ValueError(f"--min-length: at least 1 residue, got {args.min_length}")
    if args.max_length < args.min_length:
        raise ValueError(f"--max-length {args.max_length} is below --min-length {args.min_length}: no chain could be kept")
    if args.max_breaks is not None and args.max_breaks < 0:
        raise ValueError(f"--max-breaks: a number of chain breaks >= 0, got {args.max_breaks}")
    if args.show_skipped < 0:
        raise ValueError(f"--show-skipped: a number of entries >= 0, got {args.show_skipped}")
    out = check_output_file(args.out, "--out")  # a folder, or a place where nothing can be written
    if out.suffix != ".npz":  # train --data reads X.npz as a dataset, any other name as structure files
        raise ValueError(f"--out {out}: the dataset is an .npz file (train --data takes a name ending in .npz as "
                         f"a prepared dataset): name it e.g. {out.stem if out.suffix else out.name}.npz")
    check_cache_file(out)  # an existing file that prepare did not write is never replaced, --overwrite or not
    return out


def _cmd_prepare(args: argparse.Namespace) -> int:
    from protdiff_fast.io import BackboneDataset, find_structure_files

    _check_prepare_options(args)
    if not find_structure_files(args.paths):
        raise ValueError(f"no structure files (.pdb, .ent, .cif, .mmcif, optionally .gz) in {', '.join(args.paths)}: "
                         "nothing written")
    # --out is also the cache: an up-to-date dataset of the same files and filter is reused (nothing written);
    # one built from other files or another filter is replaced only with --overwrite
    ds = BackboneDataset.from_structures(args.paths, min_length=args.min_length, max_length=args.max_length,
                                         monomers_only=not args.all_chains, max_breaks=args.max_breaks,
                                         cache=args.out, overwrite=args.overwrite)
    lengths = ds.lengths
    print(f"{len(ds)} chains" + (f", lengths {lengths.min()}..{lengths.max()}" if len(ds) else "") +
          f" -> {args.out}" + (" (cache was up to date)" if ds.cache_hit else ""))
    print(ds.skipped)
    for what, reason in ds.skipped.skipped[: args.show_skipped]:
        print(f"  {what}: {reason}")
    return 0 if len(ds) else 2


def _int_list(option: str, text: str):
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{option}: comma-separated integers, got {text!r}") from None


def _check_device_and_backend(args: argparse.Namespace) -> None:
    """--device and --backend named before any work: 'bogus', a CUDA device on a machine without one, or
    --backend triton on the CPU were tracebacks (or errors at the first reverse step)."""
    from protdiff_fast import backends
    from protdiff_fast._checks import check_device

    device = getattr(args, "device", None)
    try:
        dev = check_device(device if device is not None else "cpu")  # (demo runs on the cpu)
    except ValueError as err:
        raise ValueError(f"--device: {str(err).split(': ', 1)[1]}") from None
    backend = getattr(args, "backend", None)
    if backend not in (None, "auto"):
        for op in ("egnn_pair_aggregate", "ddpm_step") if args.command != "train" else ("egnn_pair_aggregate",):
            try:
                backends.resolve(op, backend, dev)
            except (RuntimeError, NotImplementedError) as err:
                raise ValueError(f"--backend {backend}: {err}") from None


def _parse_lengths(spec: str, most: int = 65536):  # (the models' MAX_LENGTH)
    """'100' -> [100]; '64..128' -> 64..128 inclusive; '50,60,70' -> those."""
    out = []
    for part in spec.split(","):
        try:
            bounds = [int(v) for v in part.strip().split("..")]
        except ValueError:
            bounds = []
        if len(bounds) not in (1, 2):
            raise ValueError(f"--length: {part!r} is not a length N or a range LO..HI (e.g. 64, 64..128 or "
                             f"50,60,70), in {spec!r}")
        lo, hi = bounds[0], bounds[-1]
        if lo > hi:
            raise ValueError(f"--length: empty range {part}")
        if lo < 1:  # (a range from 0 ran whenever the draw missed the 0)
            raise ValueError(f"--length: lengths start at 1, got {part.strip()!r} in {spec!r}")
        if hi > most:
            raise ValueError(f"--length: {hi} is beyond any model's length (up to {most})")
        out.extend(range(lo, hi + 1))
    return out


def _check_train_args(args: argparse.Namespace) -> None:
    """train's options named before anything is read, allocated or created (a huge --max-length was OOM-killed
    after minutes, --layers 0 / --hidden -4 / --seed 1e20 failed in torch, --ckpt-every -1 checkpointed every step)."""
    from protdiff_fast.train import check_option_ranges

    check_option_ranges(vars(args), lambda field: "--" + field.replace("_", "-"))
    # the most: far beyond any useful model (the shipped one: 64 wide, 4 layers), before the allocation
    # (--hidden 1000000 asked for 8 TB) or the construction (--layers 1000000 ran for minutes) fails
    for option, value, least, most in (("--hidden", args.hidden, 2, 8192), ("--edge-dim", args.edge_dim, 2, 8192),
                                       ("--layers", args.layers, 1, 1024), ("--embed-dim", args.embed_dim, 2, 8192)):
        if value is not None and (not least <= value <= most or (least == 2 and value % 2)):
            raise ValueError(f"{option} must be an integer from {least} to {most}"
                             + (", even (sin/cos pairs)" if least == 2 else "") + f", got {value}")
    if args.coords_range is not None and not (math.isfinite(args.coords_range) and args.coords_range > 0):
        raise ValueError(f"--coords-range must be a finite number > 0, got {args.coords_range}")
    if args.min_length > args.max_length and not args.crop:
        raise ValueError(f"--min-length {args.min_length} > --max-length {args.max_length}: no chain fits (or give "
                         "--crop to train on windows of --max-length residues of the longer chains)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out: {args.out} is a file, not a folder")


def _cmd_train(args: argparse.Namespace) -> int:
    _check_train_args(args)
    created, rc = not os.path.exists(args.out), 1
    try:
        rc = _run_train(args)
        return rc
    finally:  # a failed run leaves no folder of its own behind with nothing in it but its dataset cache
        if rc != 0 and created and os.path.isdir(args.out):
            try:
                left = set(os.listdir(args.out))
                if left <= {"dataset_cache.npz", "dataset_cache_crop.npz"}:
                    for name in left:
                        os.unlink(os.path.join(args.out, name))
                    os.rmdir(args.out)
            except OSError:  # another process (a DDP rank) wrote to it or removed it meanwhile
                pass


def _run_train(args: argparse.Namespace) -> int:
    from protdiff_fast.train import TrainConfig, train

    model = dict(hidden_dim=args.hidden, edge_dim=args.edge_dim or args.hidden, num_layers=args.layers)
    if args.embed_dim is not None:  # only when asked: configs of runs without it stay as before
        model["embed_dim"] = args.embed_dim
    if args.coords_range is not None and not args.tanh:
        raise ValueError("--coords-range is the bound of --tanh; give --tanh too")
    if args.tanh:  # only when asked: configs (and checkpoints) of runs without it stay as before
        model["tanh"] = True
        if args.coords_range is not None:
            model["coords_range"] = args.coords_range
    cfg = TrainConfig(data=args.data, out_dir=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, ema_warmup=args.ema_warmup,
                      grad_clip=args.grad_clip, ema_decay=args.ema_decay, ckpt_every=args.ckpt_every,
                      val_every=args.val_every, val_fraction=args.val_fraction, seed=args.seed, max_length=args.max_length,
                      min_length=args.min_length, backend=args.backend, device=args.device, model=model,
                      crop=args.crop, lr_schedule=args.lr_schedule, init=args.init or "",
                      low_t_fraction=args.low_t_fraction, low_t_max=args.low_t_max,
                      structure_weight=args.structure_weight, structure_max_t=args.structure_max_t,
                      structure_cutoff=args.structure_cutoff / 10.0, clash_weight=args.clash_weight,
                      clash_distance=args.clash_distance / 10.0, clash_max_t=args.clash_max_t,
                      input_perturbation=args.input_perturbation, own_states=args.own_states or "",
                      own_clash_weight=args.own_clash_weight, own_batch=args.own_batch, own_max_t=args.own_max_t,
                      own_extent_states=args.own_extent_states or "", own_extent_weight=args.own_extent_weight,
                      own_extent_min_t=args.own_extent_min_t, own_extent_factor=args.own_extent_factor,
                      short_repeat=args.short_repeat, short_max_length=args.short_max_length)
    try:
        result = train(cfg, resume=args.resume, progress=not args.no_progress)
    except FloatingPointError as err:  # a diverging run: what happened and where the last checkpoint is
        print(f"protdiff-fast train: error: {err}", file=sys.stderr)
        return 1
    if result["step"] == result["start_step"] and args.resume and result["step"]:
        print(f"nothing to train: {result['checkpoint']} is already at step {result['step']} >= --steps {args.steps} "
              "(give a larger --steps to continue it)")
        return 0
    if result["train_loss"] is None:  # --steps 0: the initial (--init) weights
        print(f"step {result['step']}: no training step (--steps 0); checkpoint {result['checkpoint']} holds the "
              + ("--init weights" if args.init else "initial weights"))
        return 0
    print(f"step {result['step']}: train loss {result['train_loss']:.4f}"
          + (f", val loss {result['val_loss']:.4f}" if result["val_loss"] is not None else "")
          + f"; checkpoint {result['checkpoint']}")
    return 0


CLASH_DISTANCE_A, CLASH_GUIDANCE_STEPS = 3.8, 200  # sample / scaffold --clash-guidance defaults


def _clash_guidance(args: argparse.Namespace):
    from protdiff_fast.diffusion import ClashGuidance

    if args.clash_guidance is None:
        given = [f"--clash-distance {args.clash_distance}" if args.clash_distance != CLASH_DISTANCE_A else "",
                 f"--clash-guidance-steps {args.clash_guidance_steps}"
                 if args.clash_guidance_steps != CLASH_GUIDANCE_STEPS else ""]
        if any(given):  # (silently ignored before: a run the user believed guided was not)
            raise ValueError(f"{' and '.join(g for g in given if g)}: only with --clash-guidance [STRENGTH], "
                             "which is off")
        return None
    return ClashGuidance(strength=args.clash_guidance, min_distance=args.clash_distance,
                         max_timestep=args.clash_guidance_steps)


def _add_clash_guidance_arguments(parser: argparse.ArgumentParser, extra_help: str = "") -> None:
    parser.add_argument("--clash-guidance", type=float, nargs="?", const=0.5, default=None, metavar="STRENGTH",
                        help="push CA pairs closer than --clash-distance apart in the predicted x_0 for t <= "
                             "--clash-guidance-steps (strength 0..1, 0.5 if given alone; default off)"
                             + extra_help)
    parser.add_argument("--clash-distance", type=float, default=CLASH_DISTANCE_A,
                        help=f"A, for --clash-guidance (default {CLASH_DISTANCE_A})")
    parser.add_argument("--clash-guidance-steps", type=int, default=CLASH_GUIDANCE_STEPS,
                        help="the guidance acts for t <= this (default 200 of 1024)")


def _cmd_sample(args: argparse.Namespace) -> int:
    import random

    from protdiff_fast.diffusion import DDPMScheduler
    from protdiff_fast.diffusion.sampler import sample
    from protdiff_fast.metrics import format_table, summarize
    from pathlib import Path as _Path

    from protdiff_fast.train import load_model

    import torch.distributed as dist

    from protdiff_fast.train import init_distributed

    if args.num < 1:
        raise ValueError(f"--num: the number of backbones to sample, at least 1, got {args.num}")
    lengths = _parse_lengths(args.length)  # bad options are named before anything is loaded
    init_distributed(args.device)  # under torchrun: each rank samples its share of the designs
    rank = dist.get_rank() if dist.is_initialized() else 0
    ckpt = args.ckpt or str(shipped_checkpoint())
    model = load_model(ckpt, backend=args.backend, device=args.device)
    cfg = model.config
    rng = random.Random(args.seed)
    chosen = [rng.choice(lengths) for _ in range(args.num)] if len(lengths) > 1 else lengths * args.num
    scheduler = DDPMScheduler(cfg.num_timesteps, cfg.beta_start, cfg.beta_end, backend=args.backend,
                              noise_scale=args.noise_scale, eta=args.eta, variance_type=args.variance,
                              clash_guidance=_clash_guidance(args))
    from protdiff_fast.diffusion.sampler import OutputError, read_manifests

    if args.design_index is not None and not 0 <= args.design_index < len(chosen):
        raise ValueError(f"--design-index {args.design_index}: this run has designs 0..{len(chosen) - 1} "
                         f"(--num {len(chosen)})")
    if args.design_index is not None and args.overwrite:
        try:
            others = sorted(set(read_manifests(args.out)) - {args.design_index})
        except (OSError, ValueError):
            others = []
        if others:  # --overwrite deletes the folder's run: here, designs the user did not ask to redo
            raise ValueError(f"--design-index {args.design_index} --overwrite: {args.out} holds other designs of "
                             f"a run ({others[:5]}{' ...' if len(others) > 5 else ''}) that --overwrite would "
                             "delete; write the one design to a new folder")
    try:
        with __import__("torch").no_grad():
            sample(model, chosen, batch_size=args.batch_size, seed=args.seed, scheduler=scheduler,
                   num_inference_steps=args.steps, device=args.device, out_dir=args.out,
                   progress=not args.no_progress, resume=args.resume,
                   design_indices=None if args.design_index is None else [args.design_index],
                   file_format=args.format, compress=args.gzip, trajectory_every=args.trajectory_every,
                   overwrite=args.overwrite, cuda_graphs=False if args.no_cuda_graphs else None,
                   autocast=getattr(__import__("torch"), AUTOCAST_DTYPES[args.autocast]) if args.autocast else None,
                   on_diverge="skip" if args.on_diverge == "skip" else "raise")
    except OutputError as err:  # disk full: what is finished stays; say how to continue
        print(f"protdiff-fast sample: error: {err.strerror}", file=sys.stderr)
        return 3
    if dist.is_initialized():
        dist.barrier()  # every rank's files are written
        if rank != 0:
            return 0
    # every finished design of the folder (all ranks, earlier resumed runs) with its metrics
    finished = read_manifests(args.out)
    rows = [dict(design=e["file"], length=e["length"],
                 **{k: float("nan") if v is None else v for k, v in (e.get("metrics") or {}).items()})
            for _, e in sorted(finished.items())]
    designs = rows
    failed = read_manifests(args.out, section="failed")
    summary = summarize(rows)

    from protdiff_fast.io.jsonio import dumps_strict
    from protdiff_fast.io.structure import _atomic_write

    _atomic_write(_Path(args.out) / "metrics.json",
                  lambda tmp: _Path(tmp).write_text(dumps_strict(dict(
                      checkpoint=ckpt, summary=summary, designs=rows,
                      **({"failed": [failed[i] for i in sorted(failed)]} if failed else {})), indent=1)))
    print(f"{len(designs)} backbones -> {args.out} (checkpoint {ckpt})")
    if failed:
        print(f"{len(failed)} design(s) diverged and have no file (listed under 'failed' in manifest.json and "
              f"metrics.json): " + ", ".join(f"{i} (length {e['length']}, t={e['t']})" for i, e in
                                              sorted(failed.items())[:10]) + (" ..." if len(failed) > 10 else ""))
    print(format_table({"samples": summary}))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import time as _time

    import numpy as np
    import torch

    from protdiff_fast.diffusion import DDPMScheduler
    from protdiff_fast.diffusion.sampler import sample
    from protdiff_fast.io import demo_data_path

    if args.seed < 0:  # (numpy's "expected non-negative integer" named no option)
        raise ValueError(f"--seed: a non-negative integer, got {args.seed}")
    from protdiff_fast.metrics import backbone_metrics, format_table, summarize
    from protdiff_fast.train import load_model

    if args.num < 1:
        raise ValueError(f"--num: the number of backbones to sample, at least 1, got {args.num}")
    if not 1 <= args.min_length <= args.max_length:
        raise ValueError(f"--min-length {args.min_length} / --max-length {args.max_length}: need "
                         "1 <= min <= max")
    ckpt = shipped_checkpoint()
    if not ckpt.is_file():
        print(f"error: the shipped checkpoint {ckpt} is missing (reinstall the package)")
        return 2
    model = load_model(ckpt, backend=args.backend)
    cfg = model.config
    out = args.out or f"protdiff-demo-{_time.strftime('%Y%m%d-%H%M%S')}"
    rng = np.random.default_rng(args.seed)
    lengths = [int(v) for v in rng.integers(args.min_length, args.max_length + 1, size=args.num)]
    print(f"ProtDiff ({sum(p.numel() for p in model.parameters())} parameters, H={cfg.hidden_dim}, "
          f"{cfg.num_layers} layers, T={cfg.num_timesteps}), backend {model.blocks[0].egnn.backend_for('cpu')}: "
          f"sampling {args.num} backbones of lengths {lengths}")
    scheduler = DDPMScheduler(cfg.num_timesteps, cfg.beta_start, cfg.beta_end, backend=args.backend)
    t0 = _time.perf_counter()
    from pathlib import Path

    if Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())):
        # (the sampler's own message suggests --resume / --overwrite, which are sample's options, not demo's)
        raise FileExistsError(f"--out {out}: exists and is not empty; the demo writes a new folder (leave --out "
                              "out for a fresh protdiff-demo-<time>/), nothing is overwritten")
    with torch.no_grad():
        # a design that diverges is reported, not allowed to end the demo
        designs = sample(model, lengths, seed=args.seed, scheduler=scheduler, out_dir=out, progress=True,
                         on_diverge="skip")
    failed = [i for i, ca in enumerate(designs) if ca is None]
    designs = [ca for ca in designs if ca is not None]
    print(f"{len(designs)} backbones in {_time.perf_counter() - t0:.1f} s -> {out}/design_*.pdb")
    if failed:
        print(f"{len(failed)} design(s) diverged and were left out: {failed} (see {out}/manifest.json, 'failed')")
    if not designs:
        return 1
    real = np.load(demo_data_path(), allow_pickle=False)
    held_out = [real["ca"][real["offsets"][i]:real["offsets"][i + 1]] for i in np.where(real["split"] == "val")[0]]
    columns = {"samples": summarize([backbone_metrics(ca) for ca in designs]),
               "real (held out)": summarize([backbone_metrics(ca) for ca in held_out])}
    print("clash: non-adjacent CA pairs < 3.0 A; ideal CA-CA 3.80 A; rg_ratio: Rg / (2.2 N^0.38 A)")
    print(format_table(columns))
    return 0


def _cmd_scaffold(args: argparse.Namespace) -> int:
    from protdiff_fast.metrics import format_table
    from protdiff_fast.motif.run import run_scaffold

    from protdiff_fast.motif.scaffold import ScaffoldingError

    command = shlex.join(["protdiff-fast", *args.argv])
    if args.method != "smc":  # SMCDiff's options do nothing for the other methods: say so, not silently
        unused = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k, default in
                  (("particles", 64), ("resampler", "systematic"), ("ess_threshold", 0.5)) if getattr(args, k) != default]
        if unused:
            print(f"protdiff-fast scaffold: note: {', '.join(unused)}: only for --method smc; ignored by "
                  f"--method {args.method}", file=sys.stderr)
    try:
        result = run_scaffold(args.pdb, args.contig, args.out, length=args.length, num=args.num, particles=args.particles,
                              method=args.method, steps=args.steps, seed=args.seed, ckpt=args.ckpt,
                              backend=args.backend, device=args.device, resampler=args.resampler,
                              ess_threshold=args.ess_threshold, redenoise_t=args.redenoise_t,
                              progress=not args.no_progress, command=command,
                              autocast=AUTOCAST_DTYPES[args.autocast] if args.autocast else None,
                              clash_guidance=_clash_guidance(args))
    except ScaffoldingError as err:  # NaN model output or degenerate weights: a message, no partial files
        print(f"protdiff-fast scaffold: error: {err}", file=sys.stderr)
        return 3
    s = result["summary"]
    print(f"{s['num_designs']} designs ({s['method']}, {s['particles']} particle(s) each, {s['steps']} steps, "
          f"{s['seconds']:.1f} s) -> {args.out}/design_*.pdb, summary.json, summary.csv")
    # the designs' own motif RMSD is near 0 for every method (the motif is imposed down to t = 1): the
    # re-denoised one is the success measure that tells methods apart
    line = f"motif RMSD of the designs (motif imposed to t = 1): mean {s['mean_motif_rmsd']:.2f} A"
    if "mean_redenoise_motif_rmsd" in s:
        line += (f"; after re-denoising from t={s['redenoise_t']}: mean {s['mean_redenoise_motif_rmsd']:.2f} A, "
                 f"success (< 1 A) {s['redenoise_success_rate']:.0%}")
    if "resampling_events" in s:
        line += f"; {s['resampling_events']} resampling events"
    print(line)
    print(format_table({"designs": s["backbone"]}))
    return 0


def shipped_checkpoint():
    from pathlib import Path as _Path

    return _Path(__file__).resolve().parent / "data" / "protdiff_small.pt"


BACKEND_HELP = "auto (triton on CUDA, cpu on CPU tensors), reference, cpu or triton"
DEVICE_HELP = "cpu, cuda[:k], or auto (cuda where torch sees a GPU, else cpu); cpu unless given"


class _HelpWithDefaults(argparse.HelpFormatter):
    """Options show their default unless their help already names it (or it is None / a flag's False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.option_strings and action.default is not None and action.default is not False
                and action.default != argparse.SUPPRESS
                and "default" not in text and "%(default)" not in text):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="protdiff-fast", formatter_class=_HelpWithDefaults,
        description="Kernel-accelerated ProtDiff: diffusion over protein C-alpha backbones with a fused EGNN.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--matmul-precision", choices=["highest", "high", "medium"], default=None,
                        help="torch.set_float32_matmul_precision for this run: 'medium' runs the EGNN pair "
                             "products in bf16 on AMX CPUs (cpu backend) and lets GPUs use TF32/bf16; "
                             "default: torch's ('highest')")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="versions, the C++ build, and which backend 'auto' picks per op")
    info.add_argument("--device", default=None, help="device to resolve 'auto' for (default: cuda if present, else cpu)")
    info.set_defaults(func=_cmd_info)
    tr = sub.add_parser("train", help="train ProtDiff (torchrun --nproc-per-node K -m protdiff_fast.cli train ... for DDP)")
    tr.add_argument("--data", required=True, help="backbones .npz, or a folder/file of PDB/mmCIF structures")
    tr.add_argument("--out", required=True, help="run folder (checkpoint.pt, history.json)")
    tr.add_argument("--steps", type=int, default=1000,
                    help="optimizer steps in all (a resume continues to this count; 0: only write a checkpoint of "
                         "the initial or --init weights)")
    tr.add_argument("--batch-size", type=int, default=8, help="global batch, split across DDP processes")
    tr.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW)")
    tr.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay (default 0: Adam)")
    tr.add_argument("--warmup-steps", type=int, default=0, metavar="W",
                    help="linear learning-rate warm-up over the first W steps (a cosine decays over the rest)")
    tr.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this (inf: no clipping)")
    tr.add_argument("--ema-decay", type=float, default=0.999, help="decay of the EMA weights that validation, checkpoints' ema and sampling use")
    tr.add_argument("--ema-warmup", action="store_true",
                    help="EMA decay min(--ema-decay, (1 + step) / (10 + step)): forgets a random start quickly")
    tr.add_argument("--ckpt-every", type=int, default=200, help="write checkpoint.pt (atomically) every this many steps (0: at the end only)")
    tr.add_argument("--val-every", type=int, default=200, help="validation loss (EMA weights) every this many steps (0: never)")
    tr.add_argument("--val-fraction", type=float, default=0.0, metavar="F",
                    help="data without a 'val' split (prepare's, a folder): hold out this fraction of its chains "
                         "for the validation loss, chosen by sequence (the same chains every run; default 0: none)")
    tr.add_argument("--hidden", type=int, default=256, help="hidden size H of the EGNN layers (the shipped model: 64)")
    tr.add_argument("--edge-dim", type=int, default=None, help="offset embedding width (default: --hidden)")
    tr.add_argument("--layers", type=int, default=4, help="EGNN blocks")
    tr.add_argument("--embed-dim", type=int, default=None,
                    help="width of the residue-index / timestep sinusoids (default: --hidden; a model widened by "
                         "scripts/widen_checkpoint.py keeps the narrow model's)")
    tr.add_argument("--min-length", type=int, default=40, help="shortest training chain")
    tr.add_argument("--max-length", type=int, default=128, help="longest chain (with --crop: the window length), also the model's maximum (at most 65536)")
    tr.add_argument("--seed", type=int, default=0, help="initialisation, batches, timesteps and noise (0 .. 2^32 - 1)")
    tr.add_argument("--crop", action="store_true",
                    help="also use chains longer than --max-length: a random break-free window of that many residues")
    tr.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                    help="cosine: decay to 2%% of --lr at --steps")
    tr.add_argument("--init", default=None, help="start from these weights (checkpoint or shipped .pt), fresh optimizer")
    tr.add_argument("--low-t-fraction", type=float, default=0.0,
                    help="draw this fraction of the training timesteps from 1..--low-t-max instead of 1..T")
    tr.add_argument("--low-t-max", type=int, default=128, help="the low timesteps of --low-t-fraction: 1..this")
    tr.add_argument("--structure-weight", type=float, default=0.0,
                    help="add this times a distance loss on the predicted x_0 (bonds, angles, contacts, clashes) "
                         "for t <= --structure-max-t (0: L_simple alone)")
    tr.add_argument("--structure-max-t", type=int, default=256, help="--structure-weight applies to designs with t <= this")
    tr.add_argument("--structure-cutoff", type=float, default=6.0,
                    help="Angstrom: the pairs closer than this in the data or the prediction enter the loss")
    tr.add_argument("--tanh", action="store_true",
                    help="bound each layer's coordinate update (tanh on phi_x; experimental; --init from a model "
                         "without it works)")
    tr.add_argument("--coords-range", type=float, default=None, metavar="R",
                    help="with --tanh: each pair's coefficient is R tanh(phi / R) (default 1), about the unbounded "
                         "phi where |phi| << R, so --init from a model without --tanh starts near its function")
    tr.add_argument("--clash-weight", type=float, default=0.0,
                    help="add this times a repulsive loss on the predicted x_0 (CA pairs |i - j| >= 2 closer than "
                         "--clash-distance) for t <= --clash-max-t (0: none)")
    tr.add_argument("--clash-distance", type=float, default=3.8, help="Angstrom, for --clash-weight")
    tr.add_argument("--clash-max-t", type=int, default=None,
                    help="the clash term acts for t <= this (default: --structure-max-t)")
    tr.add_argument("--input-perturbation", type=float, default=0.0, metavar="GAMMA",
                    help="train on x_t built from eps + GAMMA * (a second noise draw), target eps (DDPM-IP, "
                         "against exposure bias; the paper uses 0.1; default 0: off)")
    tr.add_argument("--own-states", default=None, metavar="NPZ",
                    help="states of the model's own sampling at low t (scripts/own_states.py), for --own-clash-weight")
    tr.add_argument("--own-clash-weight", type=float, default=0.0,
                    help="add this times the clash loss (pairs |i - j| >= 2 closer than --clash-distance) of the "
                         "predicted x_0 on --own-batch of the --own-states per step (0: none)")
    tr.add_argument("--own-batch", type=int, default=8, help="own states per step for --own-clash-weight / --own-extent-weight")
    tr.add_argument("--own-max-t", type=int, default=128, help="use the own states with t <= this")
    tr.add_argument("--own-extent-states", default=None, metavar="NPZ",
                    help="states of the model's own sampling at high t (scripts/own_states.py --min-t), for "
                         "--own-extent-weight")
    tr.add_argument("--own-extent-weight", type=float, default=0.0,
                    help="add this times the extent loss (residues of the predicted x_0 further from the centre "
                         "than --own-extent-factor x 2.2 N^0.38 A) on --own-batch of the --own-extent-states per "
                         "step (0: none)")
    tr.add_argument("--own-extent-min-t", type=int, default=512, help="use the own extent states with t >= this")
    tr.add_argument("--own-extent-factor", type=float, default=3.5, help="--own-extent-weight bound: this times 2.2 N^0.38 A from the centre")
    tr.add_argument("--short-repeat", type=int, default=1, metavar="K",
                    help="each training chain of at most --short-max-length residues appears K times per epoch "
                         "(default 1: once; at most 1000, as every repeat is an item of each epoch's batches)")
    tr.add_argument("--short-max-length", type=int, default=64, help="chains (or windows) of at most this many residues count as short for --short-repeat")
    tr.add_argument("--backend", default="auto", help=BACKEND_HELP)
    tr.add_argument("--device", default="cpu", help=DEVICE_HELP)
    tr.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt, bit for bit")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.set_defaults(func=_cmd_train)
    demo = sub.add_parser("demo", help="sample a few backbones with the shipped model and compare them with real ones")
    demo.add_argument("--num", type=int, default=4, help="designs to sample")
    demo.add_argument("--min-length", type=int, default=50, help="shortest design")
    demo.add_argument("--max-length", type=int, default=80, help="longest design")
    demo.add_argument("--out", default=None, help="output folder (default: a new protdiff-demo-<time> folder)")
    demo.add_argument("--seed", type=int, default=0, help="sampling seed")
    demo.add_argument("--backend", default="auto", help=BACKEND_HELP)
    demo.set_defaults(func=_cmd_demo)
    sm = sub.add_parser("sample", help="sample backbones (default model: the shipped one); "
                                       "torchrun --nproc-per-node K -m protdiff_fast.cli sample ... shards the designs")
    sm.add_argument("--length", default="64..128", help="N, LO..HI (inclusive, drawn uniformly) or a,b,c")
    sm.add_argument("--num", "--num-designs", dest="num", type=int, default=8,
                    help="number of backbones (spell it --num-designs under torchrun, whose own parser "
                         "mistakes --num for its --numa-binding)")
    sm.add_argument("--out", required=True, help="new (or empty) folder for the design files, manifest.json/.csv "
                                                 "and metrics.json")
    sm.add_argument("--ckpt", default=None, help="checkpoint (default: the small model shipped in the package)")
    sm.add_argument("--steps", type=int, default=None, help="strided sampling with this many steps (default: all)")
    sm.add_argument("--batch-size", type=int, default=None, help="designs per batch (default: the largest estimated to fit)")
    sm.add_argument("--noise-scale", type=float, default=1.0,
                    help="scale of the noise added per step, 0..2 (default 1: the DDPM sampler; below 1: fewer "
                         "clashes, more compact chains, less diversity)")
    sm.add_argument("--eta", type=float, default=1.0,
                    help="DDIM's eta in [0, 1]: 1 (default) the ancestral sampler (respaced with --steps), 0 "
                         "deterministic DDIM (with the shipped model: worse bonds and more clashes)")
    sm.add_argument("--variance", choices=["fixed_small", "fixed_large"], default="fixed_small",
                    help="the ancestral step's variance: fixed_small (beta_tilde_t, default) or fixed_large "
                         "(beta_t, all T steps and eta 1 only)")
    _add_clash_guidance_arguments(sm)
    sm.add_argument("--autocast", choices=sorted(AUTOCAST_DTYPES), default=None,
                    help="run the model under torch.autocast in this dtype (GEMMs and the EGNN pair op in "
                         "bf16/fp16, coordinates and the step in float32): the GPU's tensor-core rate")
    sm.add_argument("--no-cuda-graphs", action="store_true",
                    help="on a GPU, run each step uncaptured (default: one CUDA graph per batch, same results)")
    sm.add_argument("--seed", type=int, default=0, help="run seed: design i gets its own seed from it, so a design is the same in any batch")
    sm.add_argument("--backend", default="auto", help=BACKEND_HELP)
    sm.add_argument("--device", default="cpu", help=DEVICE_HELP)
    sm.add_argument("--no-progress", action="store_true", help="no progress line (the batch-size note and errors still print)")
    sm.add_argument("--resume", action="store_true", help="continue a killed run in OUT: skip finished designs")
    sm.add_argument("--design-index", type=int, default=None, help="regenerate only this design of the run")
    sm.add_argument("--format", choices=["pdb", "cif"], default="pdb", help="one file per design: PDB or mmCIF")
    sm.add_argument("--gzip", action="store_true", help="gzip the design (and trajectory) files")
    sm.add_argument("--trajectory-every", type=int, default=None, metavar="K",
                    help="also write every K-th reverse step of each design to design_<i>.traj.cif (multi-model "
                         "mmCIF); off by default")
    sm.add_argument("--on-diverge", choices=["stop", "skip"], default="stop",
                    help="a design whose sample diverges (NaN, or coordinates far out): stop the run with an error "
                         "(default; finished designs stay), or skip: record it as failed in the manifest and go on")
    sm.add_argument("--overwrite", action="store_true",
                    help="OUT holds another run: delete that run's files and start again (default: refuse)")
    sm.set_defaults(func=_cmd_sample)
    prep = sub.add_parser("prepare", help="turn PDB/mmCIF files into a cached training set (.npz), reporting skips")
    prep.add_argument("paths", nargs="+", help="files or folders (searched recursively; .pdb/.cif/.ent, also .gz)")
    prep.add_argument("--out", required=True, help="the dataset cache (.npz); reused while inputs and filter match")
    prep.add_argument("--min-length", type=int, default=40, help="shortest chain kept")
    prep.add_argument("--max-length", type=int, default=128, help="longest chain kept")
    prep.add_argument("--all-chains", action="store_true", help="every protein chain, not only single-chain files")
    prep.add_argument("--max-breaks", type=int, default=None, help="drop chains with more CA-CA gaps > 4.2 A")
    prep.add_argument("--show-skipped", type=int, default=20, help="list this many skipped entries")
    prep.add_argument("--overwrite", action="store_true",
                      help="replace an --out dataset that prepare built from other files or another filter (default: "
                           "refuse; a file prepare did not write is never replaced)")
    prep.set_defaults(func=_cmd_prepare)
    ev = sub.add_parser("evaluate", help="backbone quality metrics of structures, side by side with a reference set")
    ev.add_argument("paths", nargs="+", help="PDB/mmCIF files or folders (searched recursively)")
    ev.add_argument("--reference", nargs="+", default=None, help="real structures to compare with")
    ev.add_argument("--plot", default="metrics.png", help="where to write the histogram plot ('' for none)")
    ev.add_argument("--clash-threshold", type=float, default=3.0, help="CA-CA clash distance in A (default 3.0)")
    ev.add_argument("--tm", action="store_true", help="mean pairwise TM-score per set (needs tmtools)")
    ev.set_defaults(func=_cmd_evaluate)
    sc = sub.add_parser("scaffold", help="motif scaffolding (SMCDiff, replacement or a fixed motif) with the shipped "
                                         "or a given model")
    sc.add_argument("--pdb", required=True, help="PDB/mmCIF file (also .gz) holding the motif residues")
    sc.add_argument("--contig", required=True, help="segments N- to C-terminal, e.g. '10-20,A15-30,5-15' "
                                                    "(scaffold length ranges, motif residues by chain and number)")
    sc.add_argument("--length", default=None, help="total length range MIN-MAX (default: what the contig allows)")
    sc.add_argument("--num", type=int, default=10, help="number of designs")
    sc.add_argument("--particles", type=int, default=64, help="SMCDiff particles per design (smc only)")
    sc.add_argument("--method", default="smc", choices=["smc", "replacement", "fixed"], help="smc: SMCDiff (particles weighted by the motif's likelihood); replacement: the motif's noised coordinates put in at every step; fixed: the motif held at its coordinates")
    sc.add_argument("--out", required=True, help="new (or empty) folder for design_*.pdb and summary.json/.csv")
    sc.add_argument("--steps", type=int, default=None, help="strided sampling with this many steps (default: all T)")
    sc.add_argument("--seed", type=int, default=0, help="run seed: design i draws its layout, noise and resampling from its own seed, so it is the same in a run of any --num")
    sc.add_argument("--ckpt", default=None, help="checkpoint (default: the small model shipped in the package)")
    sc.add_argument("--resampler", default="systematic", choices=["systematic", "residual"], help="SMC resampling scheme")
    sc.add_argument("--ess-threshold", type=float, default=0.5, help="resample when ESS < this fraction of the particles")
    sc.add_argument("--redenoise-t", type=int, default=50,
                    help="self-consistency check: re-noise each design to this t and denoise it unconditionally, "
                         "then measure the motif RMSD (0: skip)")
    sc.add_argument("--autocast", choices=sorted(AUTOCAST_DTYPES), default=None,
                    help="run the model under torch.autocast in this dtype (as sample --autocast); particles, "
                         "transition means and SMCDiff weights stay float32")
    _add_clash_guidance_arguments(sc, " (--method replacement or fixed only)")
    sc.add_argument("--backend", default="auto", help=BACKEND_HELP)
    sc.add_argument("--device", default="cpu", help=DEVICE_HELP)
    sc.add_argument("--no-progress", action="store_true", help="no progress bar (the per-step ESS lines of smc still print)")
    sc.set_defaults(func=_cmd_scaffold)
    bench = sub.add_parser("bench", help="benchmark suites: time, peak memory, FLOP/s against this device's own limits")
    bench.add_argument("suite", nargs="?", default="egnn",
                       choices=["egnn", "ddpm-step", "sampler", "sampler-mixed", "train-step", "all"],
                       help="which suite (sampler-mixed: a whole sampling run of mixed lengths, files included)")
    bench.add_argument("--targets", action="store_true",
                       help="only the rows the issues set targets on, every suite (the suite argument is ignored; "
                            "CPU: egnn B=4 N=256 and N=1024 / 4096, the DDPM step, sampler, train step; GPU adds "
                            "egnn B=8 N=512 H=128 bf16, N=8192 and the bf16-autocast rows); not with --quick")
    bench.add_argument("--quick", action="store_true", help="a small grid (48 rows on a CPU with egnn-pytorch, 16 without), its table printed")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    bench.add_argument("--out", default="bench-results", help="output folder for results.json / results.md / plots")
    bench.add_argument("--timeout", type=float, default=300.0, help="seconds per row before it is recorded as timeout")
    bench.add_argument("--providers", default=None,
                       help="comma-separated subset: reference,cpu,triton,triton-slab (the slab backward),egnn-pytorch,"
                            "compat (our drop-in for egnn-pytorch's layer, both at m_dim = H), egnn-pytorch-m16,"
                            "compat-m16 (the same at egnn-pytorch's default m_dim = 16)")
    bench.add_argument("--compare", default=None, metavar="OLD.json", help="print the change against an earlier results.json")
    bench.add_argument("--dtypes", default=None, help="comma-separated subset of the grid's dtypes: float32,bfloat16,...")
    bench.add_argument("--hidden", default=None, help="comma-separated subset of the grid's H values (egnn rows)")
    bench.add_argument("--max-n", type=int, default=None, help="leave out rows with N above this")
    bench.add_argument("--runs", type=int, default=1, metavar="K",
                       help="time each row K times, each in a fresh process: the row reports the median of the "
                            "runs' medians and their spread (a difference smaller than it is noise)")
    bench.add_argument("--warm-jobs", type=int, default=0,
                       help="GPU: before timing, run every triton row once, this many at a time, so kernels compile "
                            "in parallel (untimed)")
    bench.set_defaults(func=_cmd_bench)
    for command in sub.choices.values():  # subparsers do not inherit the formatter
        command.formatter_class = _HelpWithDefaults
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.version:
        from protdiff_fast import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 0
    if getattr(args, "device", None) == "auto":  # resolved here: runs, manifests and checkpoints name the device
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.matmul_precision is not None:
        import torch

        torch.set_float32_matmul_precision(args.matmul_precision)
    from protdiff_fast.diffusion.sampler import SamplingError

    try:
        _check_device_and_backend(args)
        return args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError) as err:  # bad input: a message, not a traceback
        print(f"protdiff-fast {args.command}: error: {err}", file=sys.stderr)
        return 2
    except SamplingError as err:  # e.g. a diverging model: the sampler's message, not a traceback
        print(f"protdiff-fast {args.command}: error: {err}", file=sys.stderr)
        return 1
    except (PermissionError, IsADirectoryError, NotADirectoryError) as err:  # a path we may not use
        print(f"protdiff-fast {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
