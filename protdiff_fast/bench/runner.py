"""Benchmark runner: the grid, the machine's own rates, one subprocess per row, results on disk.

Every row of one run is measured on the same machine in the same session, next to the device's
measured fp32 matmul rate and copy bandwidth, so ratios between rows (and against the limits)
are side by side by construction. Rows that run out of memory or time are kept as OOM / timeout.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from protdiff_fast.bench.egnn import (DEFAULT_M_PROVIDERS, LAYER_PROVIDERS, PROVIDERS, layer_spec, SAMPLER_MIXED_BATCH, SAMPLER_MIXED_STEPS, SAMPLER_STEPS,
                                     ddpm_step_bytes, egnn_pytorch_available, row_flops, train_step_flops)


def _git_commit() -> str:
    """$PROTDIFF_FAST_COMMIT if set (benchmarks/gpu.sh sets it: a device machine gets the working tree, and a
    .git there can be an older commit), else HEAD (+dirty), else 'unknown'."""
    fallback = "unknown"
    if os.environ.get("PROTDIFF_FAST_COMMIT", "").strip():
        return os.environ["PROTDIFF_FAST_COMMIT"].strip()
    try:
        here = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else fallback
    except (OSError, subprocess.SubprocessError):
        return fallback


def source_digest(package: Optional[Path] = None) -> str:
    """sha256 over the package's Python sources (relative path and bytes, sorted): what ran, even where
    the recorded commit cannot be checked (a device machine gets a working tree, perhaps with edits).
    Compare with the same function on a checkout of the recorded commit."""
    import hashlib

    package = Path(package) if package is not None else Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(package.rglob("*.py")):
        if "__pycache__" in f.parts:
            continue
        h.update(f.relative_to(package).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: str, threads: int) -> Dict:
    import protdiff_fast
    from protdiff_fast import backends

    env = dict(date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), commit=_git_commit(),
               source_sha256=source_digest(), load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
               thread_env={k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
               protdiff_fast=protdiff_fast.__version__, python=platform.python_version(), torch=torch.__version__,
               cpu=_cpu_model(), cpu_count=os.cpu_count(), threads=threads, device=device)
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    ext = backends.cpu_extension()
    if ext is not None:
        env["cpp_extension"] = dict(compiler=ext.compiler, build=ext.build_type, openmp=ext.has_openmp,
                                    simd=ext.simd_isa(), native=ext.native_arch)
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    # kernel overrides set for A/B runs (PROTDIFF_FAST_TRITON_DW_STAGE, _BLOCKS, PROTDIFF_FAST_AMX, ...)
    env["overrides"] = {k: v for k, v in sorted(os.environ.items())
                        if k.startswith("PROTDIFF_FAST_") and k != "PROTDIFF_FAST_COMMIT"}
    return env


def _time_it(fn, reps: int, sync) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def device_rates(device: str, H: int = 64) -> Dict:
    """This device's fp32 matmul rate (square, and the pair-MLP shape [M, H] x [H, H]) and copy bandwidth."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    n = 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    square = 2 * n ** 3 / _time_it(lambda: a @ b, 5, sync)
    M = 1 << 18
    x, w = torch.randn(M, H, device=device), torch.randn(H, H, device=device)
    skinny = 2 * M * H * H / _time_it(lambda: x @ w, 5, sync)
    src = torch.randn(1 << 26, device=device)  # 256 MB
    dst = torch.empty_like(src)
    copy = 2 * src.numel() * 4 / _time_it(lambda: dst.copy_(src), 5, sync)
    rates = dict(mm_fp32_square_flops=square, mm_fp32_pair_shape_flops=skinny, pair_shape_H=H, copy_bytes_per_s=copy)
    if device.startswith("cuda") or cpu_has_amx():  # the bf16 rate (tensor cores / AMX) bf16 rows are held to
        n = 8192 if device.startswith("cuda") else 2048
        a16, b16 = a.new_empty(n, n, dtype=torch.bfloat16).normal_(), a.new_empty(n, n, dtype=torch.bfloat16).normal_()
        rates["mm_bf16_square_flops"] = 2 * n ** 3 / _time_it(lambda: a16 @ b16, 10, sync)
        rates["mm_bf16_square_n"] = n
        del a16, b16
    if device.startswith("cuda"):  # ~1 GB of probes: cached by this process, it was missing to every row's worker
        del a, b, x, w, src, dst
        torch.cuda.empty_cache()
    return rates


# float32 tensors under torch.set_float32_matmul_precision("medium"): on an AMX CPU the cpu
# backend's pair products (and torch's own matmuls, where oneDNN allows it) run in bf16
MEDIUM = "float32-medium"
AUTOCAST = "bfloat16-autocast"  # float32 model and coordinates, the model under torch.autocast(bf16) (sampler, train-step)
SAMPLER_LAYERS, TARGET_STEPS = 4, 1024  # the sampler suite's model depth; the full schedule


def pair_mlp_flops_per_backbone(N: int, H: int, steps: int = TARGET_STEPS, layers: int = SAMPLER_LAYERS) -> float:
    """The two H x H products per ordered pair (i != j), every layer, every reverse step: 17.45 TFLOP for
    N = 128, H = 256, 4 layers, 1024 steps (the sampling issue's 17.6 counts N^2 pairs)."""
    return float(steps * layers * N * (N - 1) * 4 * H * H)


def cpu_has_amx() -> bool:
    try:
        from protdiff_fast.ops.egnn_cpu import amx_status

        return amx_status()[0]
    except Exception:  # noqa: BLE001 - no extension: no AMX rows
        return False


# egnn-pytorch's dense layer runs at a few GFLOP/s on a CPU: larger rows would take many minutes each
EGNN_PYTORCH_MAX_BN = 1024


def target_rows(device: str) -> List[Dict]:
    """The rows the kernel issues set targets on (speed-up, memory, long sequences, the fused step)."""
    rows = []
    base = ["reference", "cpu" if not device.startswith("cuda") else "triton"]
    # layer against layer: egnn-pytorch and our drop-in for it (the op rows' speed-up is not the drop-in's)
    extra = list(LAYER_PROVIDERS) if egnn_pytorch_available() else []
    extra_m16 = list(DEFAULT_M_PROVIDERS) if extra else []  # and both at egnn-pytorch's default m_dim = 16
    for mode in ("fwd", "fwdbwd"):
        for p in base + extra + extra_m16:
            rows.append(dict(suite="egnn", provider=p, B=4, N=256, H=64, mode=mode, dtype="float32"))
    for p in base:
        rows.append(dict(suite="egnn", provider=p, B=1, N=1024, H=64, mode="fwdbwd", dtype="float32"))
        rows.append(dict(suite="egnn", provider=p, B=1, N=4096, H=64, mode="fwdbwd", dtype="float32"))
    if device.startswith("cuda"):  # the GPU targets of the Triton kernel issue: B=8, N=512, H=128, and N=8192
        for mode in ("fwd", "fwdbwd"):
            for p in ["reference", "triton"] + (["triton-slab"] if mode == "fwdbwd" else []) + extra:
                rows.append(dict(suite="egnn", provider=p, B=8, N=512, H=128, mode=mode, dtype="bfloat16"))
        # the references (reference, egnn-pytorch): OOM expected; the drop-in (compat, fused at its rectangular
        # widths since 2026-12-07) should run where egnn-pytorch cannot
        for p in ["reference", "triton", "triton-slab"] + extra:
            rows.append(dict(suite="egnn", provider=p, B=1, N=8192, H=128, mode="fwdbwd", dtype="bfloat16"))
        for mode in ("fwd", "fwdbwd"):  # the layers at egnn-pytorch's default m_dim = 16 (widths (4H + 2, 16, 64))
            for p in extra_m16:
                rows.append(dict(suite="egnn", provider=p, B=8, N=512, H=128, mode=mode, dtype="bfloat16"))
    for N in (64, 128, 256):
        for p in ("reference", "cpu" if not device.startswith("cuda") else "triton"):
            rows.append(dict(suite="ddpm-step", provider=p, B=256, N=N, H=0, mode="fwd", dtype="float32"))
    if device.startswith("cuda"):  # the step's bandwidth target: large B*N (63 MB moved), kernels alone (graphs)
        rows.append(dict(suite="ddpm-step", provider="reference", B=4096, N=256, H=0, mode="fwd", dtype="float32"))
        for mode in ("fwd", "graphs"):
            rows.append(dict(suite="ddpm-step", provider="triton", B=4096, N=256, H=0, mode=mode, dtype="float32"))
    for N in (64, 128):  # whole reverse steps (model + fused step) of a small fixed model
        for p in base:
            rows.append(dict(suite="sampler", provider=p, B=16, N=N, H=64, mode="fwd", dtype="float32"))
        if device.startswith("cuda"):
            rows.append(dict(suite="sampler", provider="triton", B=16, N=N, H=64, mode="graphs", dtype="float32"))
    for B in (1, 4):  # the ProtDiff model at its published size: H = 256, 4 layers, 256-d offset edges
        for p in base:
            rows.append(dict(suite="train-step", provider=p, B=B, N=128, H=256, mode="fwdbwd", dtype="float32"))
    if device.startswith("cuda"):
        for B in (4, 32):  # the model issue's GPU target: a training step as `train` runs it there (bf16 autocast)
            for p in base + ["triton-slab"]:
                rows.append(dict(suite="train-step", provider=p, B=B, N=128, H=256, mode="fwdbwd", dtype=AUTOCAST))
        # the sampling issue's GPU target: the ProtDiff-size model (H = 256, 4 layers) at length 128, bf16,
        # backbones/s at T = 1024 against the bf16 pair-MLP limit (20/s wanted of ~45/s on an H100)
        rows.append(dict(suite="sampler", provider="reference", B=64, N=128, H=256, mode="fwd", dtype=AUTOCAST))
        for B in (64, 256):
            for mode in ("fwd", "graphs"):
                rows.append(dict(suite="sampler", provider="triton", B=B, N=128, H=256, mode=mode, dtype=AUTOCAST))
    if device.startswith("cuda"):
        # the rows the issues set GPU targets on first, so a run stopped at a device call's limit keeps them
        rows.sort(key=lambda r: 0 if (r["dtype"] in ("bfloat16", AUTOCAST) or r["N"] >= 8192
                                      or r["suite"] == "ddpm-step") else 1)
    if not device.startswith("cuda") and cpu_has_amx():  # the same rows with bf16 pair products on AMX
        for mode in ("fwd", "fwdbwd"):
            for p in base:
                rows.append(dict(suite="egnn", provider=p, B=4, N=256, H=64, mode=mode, dtype=MEDIUM))
        for N in (64, 128):
            for p in base:
                rows.append(dict(suite="sampler", provider=p, B=16, N=N, H=64, mode="fwd", dtype=MEDIUM))
        for B in (1, 4):
            for p in base:
                rows.append(dict(suite="train-step", provider=p, B=B, N=128, H=256, mode="fwdbwd", dtype=MEDIUM))
    return rows


def grid(device: str, quick: bool, suites: Iterable[str], which: str = "full") -> List[Dict]:
    if which == "targets":
        return target_rows(device)
    rows = []
    if "egnn" in suites:
        if quick:
            Bs, Ns, Hs, modes = [1, 4], [64, 256], [64], ["fwd", "fwdbwd"]
        elif device.startswith("cuda"):  # square H <= 256; compat's (4H + 2, H, 4H) rectangular, chunked
            Bs, Ns, Hs, modes = [1, 8], [128, 256, 512, 1024, 2048, 4096, 8192], [64, 128, 256], ["fwd", "fwdbwd"]
        else:
            Bs, Ns, Hs, modes = [1, 8], [64, 128, 256, 512, 1024], [64, 128], ["fwd", "fwdbwd"]
        providers = ["reference", "cpu"] if not device.startswith("cuda") else ["reference", "triton"]
        if egnn_pytorch_available():
            providers += list(LAYER_PROVIDERS)
            if not device.startswith("cuda"):  # on a GPU they are target rows (B=8 N=512 H=128 bf16)
                providers += list(DEFAULT_M_PROVIDERS)
        dtypes = ["float32"] if not device.startswith("cuda") else ["float32", "bfloat16"]
        for dtype in dtypes:
            for mode in modes:
                for H in Hs:
                    for B in Bs:
                        for N in Ns:
                            for p in providers:
                                if layer_spec(p) is not None and B * N > EGNN_PYTORCH_MAX_BN and not quick \
                                        and not device.startswith("cuda"):
                                    continue  # minutes per row at ~1% of this machine's matmul rate
                                if N > 4096 and p != "triton":
                                    continue  # O(N^2 H) memory: one row at N = 8192 is in the targets
                                if N > 4096 and B > 1:
                                    continue
                                rows.append(dict(suite="egnn", provider=p, B=B, N=N, H=H, mode=mode, dtype=dtype))
        if not quick and not device.startswith("cuda"):  # the long-sequence row: bounded memory at N = 4096
            rows.append(dict(suite="egnn", provider="cpu", B=1, N=4096, H=64, mode="fwdbwd", dtype="float32"))
            rows.append(dict(suite="egnn", provider="reference", B=1, N=4096, H=64, mode="fwdbwd", dtype="float32"))
    if "sampler" in suites:
        fused = "cpu" if not device.startswith("cuda") else "triton"
        for N in ([64] if quick else [64, 128]):
            for B in ([16] if quick else [16, 64]):
                for p in ("reference", fused):
                    rows.append(dict(suite="sampler", provider=p, B=B, N=N, H=64, mode="fwd", dtype="float32"))
                if device.startswith("cuda"):  # the same steps replayed as one CUDA graph per step
                    rows.append(dict(suite="sampler", provider=fused, B=B, N=N, H=64, mode="graphs",
                                     dtype="float32"))
    if "sampler-mixed" in suites:  # whole runs: B designs of lengths N/2..N, written (and not, for the fused one)
        fused = "cpu" if not device.startswith("cuda") else "triton"
        # lengths within the shipped model's training range (40..128): much shorter chains can diverge
        for B, N in ([(8, 80)] if quick else [(24, 80)] if not device.startswith("cuda") else [(256, 128)]):
            rows.append(dict(suite="sampler-mixed", provider="reference", B=B, N=N, H=64, mode="write",
                             dtype="float32"))
            for mode in ("write", "memory"):
                rows.append(dict(suite="sampler-mixed", provider=fused, B=B, N=N, H=64, mode=mode, dtype="float32"))
    if "train-step" in suites:
        dtypes = ["float32"] + ([MEDIUM] if not device.startswith("cuda") and cpu_has_amx() else [])
        for dtype in dtypes:
            for B in ([1] if quick else [1, 4]):
                for p in (["reference", "cpu"] if not device.startswith("cuda") else ["reference", "triton"]):
                    rows.append(dict(suite="train-step", provider=p, B=B, N=128, H=256 if not quick else 64,
                                     mode="fwdbwd", dtype=dtype))
    if "ddpm-step" in suites:
        providers = ["reference", "cpu"] if not device.startswith("cuda") else ["reference", "triton"]
        for B in ([256] if quick else [64, 256, 1024]):
            for N in ([128] if quick else [64, 128, 256]):
                for p in providers:
                    rows.append(dict(suite="ddpm-step", provider=p, B=B, N=N, H=0, mode="fwd", dtype="float32"))
                if device.startswith("cuda"):
                    rows.append(dict(suite="ddpm-step", provider="triton", B=B, N=N, H=0, mode="graphs",
                                     dtype="float32"))
    return rows


# providers that run another one's backend under settings of theirs: name -> (backend, environment).
# triton-slab: the row-slab backward (protdiff_fast/ops/egnn_triton_slab.py), opt-in until a GPU has timed it
PROVIDER_VARIANTS = {"triton-slab": ("triton", {"PROTDIFF_FAST_TRITON_BWD": "slab"})}


def worker_command(spec: Dict) -> Tuple[List[str], Dict[str, str]]:
    """The worker process's command line and environment for a row spec (a provider variant runs its
    backend with its settings)."""
    backend, extra = PROVIDER_VARIANTS.get(spec["provider"], (spec["provider"], {}))
    spec = dict(spec, provider=backend)
    return [sys.executable, "-m", "protdiff_fast.bench.worker", json.dumps(spec)], dict(os.environ, **extra)


def _died(returncode: int, stderr: str) -> Dict:
    """The row of a worker that printed no result. Only SIGKILL (-9, or 137 from a shell) is taken for
    the system's out-of-memory killer; another signal (a segfault or abort in a kernel) is a crash and
    an exit code an error, never OOM (the worker itself reports failed allocations as OOM)."""
    import signal

    tail = stderr[-300:]
    if returncode in (-signal.SIGKILL, 128 + signal.SIGKILL):
        return dict(status="OOM", error="killed by SIGKILL (most likely the out-of-memory killer) " + tail)
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return dict(status="crash", error=f"{name} " + tail)
    return dict(status="error", error=f"exit code {returncode} " + tail)


def not_available(device: str) -> List[str]:
    """Providers this machine cannot run, and why: their rows are left out of the grid (grid() for the
    egnn-pytorch layers, run() for cpu) and named in results.md."""
    from protdiff_fast import backends

    missing = []
    if not egnn_pytorch_available():
        missing.append("egnn-pytorch and compat (egnn-pytorch is not installed: pip install egnn-pytorch)")
    if not device.startswith("cuda") and backends.cpu_extension() is None:
        missing.append("cpu and compat (the C++ extension is not built)")
    return missing


def run_row(row: Dict, device: str, threads: int, timeout_s: float, budget_s: float, mem_limit: Optional[int]) -> Dict:
    spec = dict(row, device=device, threads=threads, budget_s=budget_s, min_reps=3, max_reps=50,
                mem_limit_bytes=mem_limit)
    cmd, env = worker_command(spec)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return dict(row, status="timeout", error=f"over {timeout_s:.0f} s")
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            result = json.loads(line[len("BENCH_RESULT "):])
            break
    else:
        result = _died(proc.returncode, proc.stderr or "")
    out = dict(row, **result)
    if out.get("status") == "ok":
        if row["suite"] == "ddpm-step":
            out["bytes"] = ddpm_step_bytes(row["B"], row["N"])
            out["gbytes_per_s"] = out["bytes"] / out["median_s"] / 1e9
        elif row["suite"] == "sampler":
            per_step = out["median_s"] / SAMPLER_STEPS
            out["steps_per_s"] = 1.0 / per_step
            out["backbones_per_s_T1000"] = row["B"] / (per_step * 1000)  # derived from the measured step time
            out["backbones_per_s_T1024"] = row["B"] / (per_step * TARGET_STEPS)
            out["pair_mlp_tflops_per_s"] = (row["B"] * pair_mlp_flops_per_backbone(row["N"], row["H"], steps=1)
                                            / per_step / 1e12)
        elif row["suite"] == "sampler-mixed":
            out["backbones_per_s"] = row["B"] / out["median_s"]  # measured: the whole run, writing included
        elif row["suite"] == "train-step":
            out["flops"] = train_step_flops(row["B"], row["N"], row["H"])
            out["tflops_per_s"] = out["flops"] / out["median_s"] / 1e12
        else:
            out["flops"] = row_flops(row["provider"], row["B"], row["N"], row["H"], row["mode"])
            out["tflops_per_s"] = out["flops"] / out["median_s"] / 1e12
    return out


def repeated_row(row: Dict, device: str, threads: int, timeout_s: float, budget_s: float, mem_limit: Optional[int],
                 runs: int = 1) -> Dict:
    """``run_row`` ``runs`` times, each in a fresh process (METHOD.md: time the same version twice; a
    difference between versions smaller than this spread is noise). The row keeps the median of the runs'
    medians, each run's median (``run_medians_s``) and their spread (max / min - 1); any run not ok makes
    the row that run's result."""
    results = [run_row(row, device, threads, timeout_s, budget_s, mem_limit) for _ in range(max(1, runs))]
    bad = [r for r in results if r.get("status") != "ok"]
    if bad or len(results) == 1:
        return bad[0] if bad else results[0]
    import statistics

    medians = [r["median_s"] for r in results]
    middle = min(results, key=lambda r: abs(r["median_s"] - statistics.median(medians)))
    scale = statistics.median(medians) / middle["median_s"]
    out = dict(middle, run_medians_s=medians, run_spread=max(medians) / min(medians) - 1.0)
    for key in ("median_s", "p20_s", "p80_s"):
        out[key] = middle[key] * scale
    for key in ("gbytes_per_s", "tflops_per_s", "steps_per_s", "backbones_per_s", "backbones_per_s_T1000",
                "backbones_per_s_T1024", "pair_mlp_tflops_per_s"):
        if key in out:
            out[key] = middle[key] / scale
    return out


def _fmt_bytes(b) -> str:
    if b is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(b) < 1024:
            return f"{b:.0f} {unit}"
        b /= 1024
    return f"{b:.1f} TB"


def _pair_mlp_limit(row: Dict, rates: Dict) -> str:
    """For low-precision sampler rows where the bf16 matmul rate was measured: backbones/s at T = 1024
    and the fraction of the bf16 pair-MLP limit (that rate / the pair MLP's FLOP per backbone)."""
    bf16 = rates.get("mm_bf16_square_flops")
    if not bf16 or row["dtype"] not in ("bfloat16", AUTOCAST, MEDIUM) or "pair_mlp_tflops_per_s" not in row:
        return ""
    limit = bf16 / pair_mlp_flops_per_backbone(row["N"], row["H"])
    return (f"; {row['backbones_per_s_T1024']:.2f}/s at T=1024 = {100 * row['backbones_per_s_T1024'] / limit:.0f}% "
            f"of the bf16 pair-MLP limit {limit:.1f}/s ({row['pair_mlp_tflops_per_s']:.0f} TFLOP/s)")


def busy_warning(env: Dict) -> Optional[str]:
    """A warning when the machine was not idle at the start (1-minute load average above a quarter of the
    cores): other processes then share the cores, and with OpenMP's spinning threads rows ran 3-8x slower."""
    load, cores = env.get("load_average"), env.get("cpu_count")
    if not load or not cores or load[0] <= max(0.5, cores / 4):
        return None
    return (f"WARNING: load average {load[0]:.2f} on {cores} cores at the start: other processes share the CPU, "
            "so times are slower and noisier than on an idle machine (compare rows of this run only)")


def markdown(result: Dict) -> str:
    env, rates = result["environment"], result["rates"]
    busy = busy_warning(env)
    lines = [f"# Benchmark results ({env['date']})", "", *([f"**{busy}**", ""] if busy else []),
             f"- machine: {env.get('gpu') or env['cpu']}, {env['threads']} threads; torch {env['torch']}, "
             f"triton {env.get('triton')}, C++ {env.get('cpp_extension')}",
             f"- commit {env['commit']}" + (f" (package sources sha256 {env['source_sha256'][:16]})"
                                              if env.get("source_sha256") else "")
             + (f"; overrides {env['overrides']}" if env.get("overrides") else "")
             + (f"; load average at the start {', '.join(f'{v:.2f}' for v in env['load_average'])}"
                if env.get("load_average") else ""),
             f"- command: `{result['command']}`",
             f"- measured fp32 matmul: {rates['mm_fp32_square_flops'] / 1e9:.1f} GFLOP/s (2048^2), "
             f"{rates['mm_fp32_pair_shape_flops'] / 1e9:.1f} GFLOP/s ([2^18, {rates['pair_shape_H']}] x "
             f"[{rates['pair_shape_H']}, {rates['pair_shape_H']}], the pair-MLP shape); copy "
             f"{rates['copy_bytes_per_s'] / 1e9:.1f} GB/s" + (
                 f"; bf16 matmul {rates['mm_bf16_square_flops'] / 1e12:.1f} TFLOP/s ({rates.get('mm_bf16_square_n', 8192)}^2)"
                 if rates.get("mm_bf16_square_flops") else ""),
             f"- memory: {result.get('mem_method', '')}",
             f"- egnn-pytorch (dense baseline) and compat (our drop-in for it) rows only where B * N <= "
             f"{EGNN_PYTORCH_MAX_BN} on CPU. They are whole layers of egnn-pytorch's shape (edge MLP 4H + 2 wide, "
             "coordinate MLP 4H, all N^2 pairs: about 8x the op's pair products), with that layer's FLOPs: "
             "compare them with each other (compat's speed-up is against egnn-pytorch), not with the op rows",
             "- median of n timed repetitions (n in brackets), p20-p80 between them; the matmul and copy rates "
             "above are the best of 5 (a ceiling)"]
    if result.get("not_run"):
        lines.append("- not run on this machine: " + "; ".join(result["not_run"]))
    lines += ["",
              "| suite | mode | dtype | H | B | N | provider | median ms [n] (p20-p80) | GFLOP/s (egnn) or GB/s (step) "
              "| % of mm (square / pair shape) or of copy | peak extra memory | speed-up vs reference (compat: vs "
              "egnn-pytorch) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ref = {(r["suite"], r["mode"], r["dtype"], r["H"], r["B"], r["N"]): r for r in result["rows"]
           if r["provider"] == "reference" and r.get("status") == "ok"}
    # the drop-in's speed-up is against egnn-pytorch's layer of the same m_dim
    dense = {(r["provider"].replace("egnn-pytorch", "compat"), r["suite"], r["mode"], r["dtype"], r["H"], r["B"],
              r["N"]): r for r in result["rows"] if r["provider"] in ("egnn-pytorch", "egnn-pytorch-m16")
             and r.get("status") == "ok"}
    for r in result["rows"]:
        key = (r["suite"], r["mode"], r["dtype"], r["H"], r["B"], r["N"])
        provider = r["provider"]
        if r["suite"] == "egnn" and not _fused_backward(PROVIDER_VARIANTS.get(provider, (provider,))[0], r["mode"],
                                                       r["dtype"], r["H"]):
            provider += " (gradients through the reference)"
        if r.get("status") != "ok":
            lines.append(f"| {r['suite']} | {r['mode']} | {r['dtype']} | {r['H']} | {r['B']} | {r['N']} | "
                         f"{provider} | **{r['status']}** | | | | |")
            continue
        if layer_spec(r["provider"]):  # compat against egnn-pytorch (same m_dim); egnn-pytorch: no base
            base, base_key = dense, (r["provider"], *key)
        else:
            base, base_key = ref, key
        speed = f"{base[base_key]['median_s'] / r['median_s']:.1f}x" if base_key in base else ""
        reps = f"[{r['reps']}]" if "reps" in r else ""
        if "run_spread" in r:  # several runs of the row: their spread
            reps += f" ±{100 * r['run_spread'] / 2:.0f}% over {len(r['run_medians_s'])} runs"
        if r["suite"] == "sampler":
            lines.append(
                f"| {r['suite']} | {SAMPLER_STEPS} steps{', CUDA graphs' if r['mode'] == 'graphs' else ''} | {r['dtype']} | {r['H']} | {r['B']} | {r['N']} | {provider} | "
                f"{r['median_s'] * 1e3:.1f} {reps} ({r['p20_s'] * 1e3:.1f}-{r['p80_s'] * 1e3:.1f}) | "
                f"{r['steps_per_s']:.1f} steps/s | {r['backbones_per_s_T1000']:.3f} backbones/s at T=1000 (derived)"
                f"{_pair_mlp_limit(r, rates)} | {_fmt_bytes(r.get('peak_mem_bytes'))} | {speed} |")
            continue
        if r["suite"] == "sampler-mixed":
            lines.append(
                f"| {r['suite']} | {r['mode']}, {SAMPLER_MIXED_STEPS} steps, batch {SAMPLER_MIXED_BATCH} | {r['dtype']} | "
                f"{r['H']} | {r['B']} designs | {r['N'] // 2}..{r['N']} | {provider} | "
                f"{r['median_s'] * 1e3:.0f} {reps} ({r['p20_s'] * 1e3:.0f}-{r['p80_s'] * 1e3:.0f}) | "
                f"{r['backbones_per_s']:.2f} backbones/s (measured) | | {_fmt_bytes(r.get('peak_mem_bytes'))} | {speed} |")
            continue
        if r["suite"] == "ddpm-step":
            bw = r["bytes"] / r["median_s"]
            rate, frac = f"{bw / 1e9:.1f}", f"{100 * bw / rates['copy_bytes_per_s']:.0f}% of copy"
        else:
            gf = r["flops"] / r["median_s"]
            rate = f"{gf / 1e9:.1f}"
            frac = (f"{100 * gf / rates['mm_fp32_square_flops']:.0f}% / "
                    f"{100 * gf / rates['mm_fp32_pair_shape_flops']:.0f}%")
            if r["dtype"] in ("bfloat16", MEDIUM, AUTOCAST) and rates.get("mm_bf16_square_flops"):  # the bf16 rate
                frac = f"{100 * gf / rates['mm_bf16_square_flops']:.0f}% of bf16 mm"
        lines.append(
            f"| {r['suite']} | {r['mode']} | {r['dtype']} | {r['H']} | {r['B']} | {r['N']} | {provider} | "
            f"{r['median_s'] * 1e3:.3f} {reps} ({r['p20_s'] * 1e3:.3f}-{r['p80_s'] * 1e3:.3f}) | {rate} | {frac} | "
            f"{_fmt_bytes(r.get('peak_mem_bytes'))} | {speed} |")
    return "\n".join(lines) + "\n"


FUSED_PROVIDERS = ("cpu", "triton", "triton-slab")
MEMORY_EXPONENT_LIMIT = 1.2  # our fused backends must stay O(N) in memory: fail loudly above this
SCALING_MIN_N = 128  # smaller N are dominated by fixed costs and would bend the fit
MEMORY_FIT_FLOOR = 1 << 20  # peaks under 1 MiB are page and allocator noise (CPU RSS), not the algorithm


def _slope(xs: List[float], ys: List[float]) -> float:
    """Least-squares slope of log(y) against log(x)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    var = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / var


def _fused_backward(provider: str, mode: str, dtype: str, H: int) -> bool:
    """False where a fused backend's gradients go through the reference by design (triton: fp32 at
    H = 256 with the two-pass backward, PROTDIFF_FAST_TRITON_BWD_PASSES=2, whose unchunked kernels
    would need 256 KB of shared memory): O(N^2) memory there is documented, not a regression."""
    if provider != "triton" or mode != "fwdbwd":
        return True
    from protdiff_fast.ops.egnn_triton import has_fused_backward

    return has_fused_backward(H, getattr(torch, dtype.replace("-medium", "").replace("-autocast", "")))


def scaling(result: Dict) -> List[Dict]:
    """Exponents of time and peak memory in N per (egnn mode, dtype, H, B, provider), from rows with
    N >= SCALING_MIN_N (at least 3 distinct N; for memory, at least 3 with peaks >= 1 MiB);
    ``memory_regression`` marks a fused backend whose memory grows faster than N^MEMORY_EXPONENT_LIMIT."""
    groups: Dict[tuple, List[Dict]] = {}
    for r in result["rows"]:
        if r["suite"] == "egnn" and r.get("status") == "ok" and r["N"] >= SCALING_MIN_N:
            groups.setdefault((r["mode"], r["dtype"], r["H"], r["B"], r["provider"]), []).append(r)
    fits = []
    for (mode, dtype, H, B, provider), rs in sorted(groups.items()):
        if len({r["N"] for r in rs}) < 3:
            continue
        ns = [r["N"] for r in rs]
        fit = dict(mode=mode, dtype=dtype, H=H, B=B, provider=provider, n_min=min(ns), n_max=max(ns),
                   time_exponent=_slope(ns, [r["median_s"] for r in rs]), memory_exponent=None)
        big = [r for r in rs if (r.get("peak_mem_bytes") or 0) >= MEMORY_FIT_FLOOR]
        if len({r["N"] for r in big}) >= 3:
            fit["memory_exponent"] = _slope([r["N"] for r in big], [r["peak_mem_bytes"] for r in big])
        fit["fused_backward"] = _fused_backward(provider, mode, dtype, H)
        fit["memory_regression"] = bool(provider in FUSED_PROVIDERS and fit["fused_backward"]
                                        and fit["memory_exponent"] is not None
                                        and fit["memory_exponent"] > MEMORY_EXPONENT_LIMIT)
        fits.append(fit)
    return fits


def scaling_markdown(fits: List[Dict]) -> str:
    if not fits:
        return ""
    lines = ["", "## Scaling in N (least-squares exponent of log time / log peak memory vs log N, "
             f"N >= {SCALING_MIN_N}; memory from peaks >= 1 MiB only)", "",
             "Expected: time ~2 for every backend (all pairs); memory ~1 for the fused backends, ~2 for the "
             f"references. A fused backend above {MEMORY_EXPONENT_LIMIT} in memory is a regression.", "",
             "| mode | dtype | H | B | provider | N range | time exponent | memory exponent |",
             "|---|---|---|---|---|---|---|---|"]
    for f in fits:
        mem = "n/a" if f["memory_exponent"] is None else f"{f['memory_exponent']:.2f}"
        if f["memory_regression"]:
            mem = f"**{mem} REGRESSION**"
        elif not f.get("fused_backward", True):
            mem += " (gradients through the reference here, by design)"
        lines.append(f"| {f['mode']} | {f['dtype']} | {f['H']} | {f['B']} | {f['provider']} | "
                     f"{f['n_min']}..{f['n_max']} | {f['time_exponent']:.2f} | {mem} |")
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    """The package's atomic write (protdiff_fast.io.structure): a new file gets a plain open()'s permissions
    (mkstemp's were 0600: results.json / results.md unreadable to the group, unlike the plots beside them),
    and a failed write leaves no temporary file behind."""
    from protdiff_fast.io.structure import _atomic_write as atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def plot(result: Dict, out_dir: Path) -> Optional[List[str]]:
    """The PNG files written into ``out_dir`` (None when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    written = []
    rows = [r for r in result["rows"] if r["suite"] == "egnn"]
    # one figure per mode, H, B and dtype (the GPU's bf16 target rows included)
    for mode, H, B, dtype in sorted({(r["mode"], r["H"], r["B"], r["dtype"]) for r in rows}):
        sel = [r for r in rows if r["mode"] == mode and r["H"] == H and r["B"] == B and r["dtype"] == dtype]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for provider in sorted({r["provider"] for r in sel}):
            pts = sorted((r for r in sel if r["provider"] == provider), key=lambda r: r["N"])
            ok = [r for r in pts if r.get("status") == "ok"]
            bad = [r for r in pts if r.get("status") != "ok"]
            line = axes[0].plot([r["N"] for r in ok], [r["median_s"] * 1e3 for r in ok], "o-", label=provider)
            if ok and ok[0].get("peak_mem_bytes") is not None:
                axes[1].plot([r["N"] for r in ok], [max(r["peak_mem_bytes"], 1) / 2 ** 20 for r in ok], "o-",
                             color=line[0].get_color(), label=provider)
            for r in bad:
                for ax in axes:
                    ax.axvline(r["N"], color=line[0].get_color(), ls=":", alpha=0.6)
                    ax.text(r["N"], ax.get_ylim()[1] if ok else 1, r["status"], rotation=90, fontsize=7)
        for ax, label in zip(axes, ("time (ms)", "peak extra memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (residues)")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"egnn {mode}, B={B}, H={H}, {dtype} ({result['environment'].get('gpu') or result['environment']['cpu']})")
        fig.tight_layout()
        name = f"egnn_{mode}_B{B}_H{H}.png" if dtype == "float32" else f"egnn_{mode}_B{B}_H{H}_{dtype}.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(name)
    written += _plot_other_suites(result, out_dir, plt)
    return written


def _plot_other_suites(result: Dict, out_dir: Path, plt) -> List[str]:
    """One bar chart per non-egnn suite: median time per configuration, one bar per provider
    (log scale; rows that did not finish are labelled with their status)."""
    written = []
    for suite in sorted({r["suite"] for r in result["rows"]} - {"egnn"}):
        rows = [r for r in result["rows"] if r["suite"] == suite]
        configs = sorted({(r["mode"], r["dtype"], r["H"], r["B"], r["N"]) for r in rows})
        providers = sorted({r["provider"] for r in rows})
        width = 0.8 / len(providers)
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(configs) * len(providers)), 4))
        for k, provider in enumerate(providers):
            for c, cfg in enumerate(configs):
                r = next((r for r in rows if r["provider"] == provider and
                          (r["mode"], r["dtype"], r["H"], r["B"], r["N"]) == cfg), None)
                if r is None:
                    continue
                xpos = c + (k - (len(providers) - 1) / 2) * width
                if r.get("status") == "ok":
                    ax.bar(xpos, r["median_s"] * 1e3, width, color=f"C{k}", label=provider if c == 0 else None)
                else:
                    ax.text(xpos, 1, r.get("status", "?"), rotation=90, fontsize=7, ha="center")
        ax.set_xticks(range(len(configs)))
        ax.set_xticklabels([f"{m}\nB={B} N={N}\nH={H} {d}" for m, d, H, B, N in configs], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("median time (ms)")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=8)
        env = result["environment"]
        ax.set_title(f"{suite} ({env.get('gpu') or env['cpu']})", fontsize=9)
        fig.tight_layout()
        name = f"{suite}.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


COMPARED_ENVIRONMENT = ("threads", "torch", "triton", "overrides", "cpp_extension")


def _read_results(path: str) -> Dict:
    """An earlier run's results.json, or a ValueError naming the file and what is wrong with it."""
    try:
        old = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"--compare {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--compare {path}: not a results.json of protdiff-fast bench ({err})") from None
    if not isinstance(old, dict) or not isinstance(old.get("rows"), list) or "environment" not in old:
        raise ValueError(f"--compare {path}: not a results.json of protdiff-fast bench (no rows / environment)")
    return old


def compare(old_path: str, new: Dict, old: Optional[Dict] = None) -> str:
    """Row-by-row change against an earlier results.json: the time ratio of rows ok in both, then every
    row that was ok and is not now (a regression shown, not dropped), rows only one run has, and the
    settings that differ between the runs (machine, threads, versions, kernel overrides)."""
    old = old if old is not None else _read_results(old_path)
    key = lambda r: (r["suite"], r["provider"], r["mode"], r["dtype"], r["H"], r["B"], r["N"])  # noqa: E731
    name = lambda r: "/".join(str(v) for v in key(r))  # noqa: E731
    old_rows, new_rows = {key(r): r for r in old["rows"]}, {key(r): r for r in new["rows"]}
    env_old, env_new = old["environment"], new["environment"]
    lines = [f"compare with {old_path} (commit {env_old['commit']}, {env_old.get('gpu') or env_old['cpu']})"]
    if (env_old.get("gpu") or env_old["cpu"]) != (env_new.get("gpu") or env_new["cpu"]):
        lines.append("WARNING: different devices; ratios below compare different machines")
    for field in COMPARED_ENVIRONMENT:
        if env_old.get(field) != env_new.get(field):
            lines.append(f"WARNING: {field} differs: {env_old.get(field)!r} there, {env_new.get(field)!r} here")
    compared, worse = 0, []
    for k, r in new_rows.items():
        o = old_rows.get(k)
        if o is None:
            continue
        if o.get("status") == "ok" and r.get("status") == "ok":
            compared += 1
            lines.append(f"{name(r)}: {o['median_s'] * 1e3:.2f} ms -> {r['median_s'] * 1e3:.2f} ms "
                         f"({o['median_s'] / r['median_s']:.2f}x)")
        elif o.get("status") == "ok":
            worse.append(f"NOW {r.get('status')}: {name(r)} (was {o['median_s'] * 1e3:.2f} ms) {r.get('error', '')[:120]}")
        elif r.get("status") == "ok":
            lines.append(f"{name(r)}: {o.get('status')} -> {r['median_s'] * 1e3:.2f} ms")
    lines += worse
    lines += [f"MISSING here: {name(o)} (was {o.get('status')})" for k, o in old_rows.items() if k not in new_rows]
    lines += [f"new here: {name(r)} ({r.get('status')})" for k, r in new_rows.items() if k not in old_rows]
    lines.append(f"{compared} rows compared of {len(new_rows)}; {len(worse)} no longer ok")
    return "\n".join(lines)


def warm_kernel_cache(rows: List[Dict], device: str, threads: int, timeout_s: float, jobs: int) -> None:
    """Run every Triton row once, ``jobs`` at a time, before the timed pass: each row's kernels are
    compiled into Triton's on-disk cache in parallel, so the timed rows (one at a time, each in a fresh
    process) load them instead of compiling one after another. Nothing from this pass is recorded."""
    from concurrent.futures import ThreadPoolExecutor

    todo = [r for r in rows if PROVIDER_VARIANTS.get(r["provider"], (r["provider"],))[0] == "triton"]
    t0 = time.perf_counter()

    def one(row):
        spec = dict(row, device=device, threads=max(1, threads // jobs), budget_s=0.0, min_reps=0, max_reps=0,
                    mem_limit_bytes=None, warm_only=True)
        cmd, env = worker_command(spec)
        try:
            subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        except subprocess.TimeoutExpired:
            pass

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, todo))
    print(f"kernel cache warmed: {len(todo)} triton rows run once, {jobs} at a time, in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)


def run(suites: List[str], device: str, quick: bool, out_dir: str, timeout_s: float, compare_to: Optional[str],
        command: str, providers: Optional[List[str]] = None, which: str = "full",
        dtypes: Optional[List[str]] = None, hidden: Optional[List[int]] = None, max_n: Optional[int] = None,
        warm_jobs: int = 0, runs: int = 1) -> Dict:
    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"--timeout: seconds per row, a number > 0, got {timeout_s!r}")
    if max_n is not None and max_n < 1:
        raise ValueError(f"--max-n: the largest N to run, at least 1, got {max_n}")
    if runs < 1 or warm_jobs < 0:
        raise ValueError(f"--runs must be >= 1 and --warm-jobs >= 0, got {runs} and {warm_jobs}")
    if hidden is not None and (not hidden or min(hidden) < 1):
        raise ValueError(f"--hidden: H values >= 1, got {hidden}")
    old_result = _read_results(compare_to) if compare_to else None  # a bad file named now, not after the run
    threads = torch.get_num_threads()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out_dir}: exists and is not a folder")
    if (out / "results.json").exists():
        # an earlier run's results are kept: a new run goes to a new folder (compare them with --compare; an
        # --out holding the --compare file itself was let through and replaced the baseline it compared against)
        raise FileExistsError(f"--out {out_dir}: holds the results of an earlier run (results.json); give a new "
                              "folder, and --compare OLD/results.json to see the change")
    mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    mem_limit = int(mem_total * 0.7) if not device.startswith("cuda") else None
    rows = grid(device, quick, suites, which)
    known = set(PROVIDERS) | set(PROVIDER_VARIANTS)
    if providers and set(providers) - known:
        raise ValueError(f"--providers: unknown {sorted(set(providers) - known)}; known: {', '.join(sorted(known))}")
    if providers:
        rows = [r for r in rows if r["provider"] in providers]
    missing = not_available(device)
    if any(m.startswith("cpu ") for m in missing):  # no C++ extension: its rows would only be error rows
        rows = [r for r in rows if r["provider"] != "cpu" and (layer_spec(r["provider"]) or ("",))[0] != "compat"]
    if dtypes:
        rows = [r for r in rows if r["dtype"] in dtypes]
    if hidden:
        rows = [r for r in rows if r["suite"] != "egnn" or r["H"] in hidden]
    if max_n:
        rows = [r for r in rows if r["N"] <= max_n]
    if not rows:
        raise ValueError(f"no benchmark rows left after the filters (--providers {providers}, --dtypes {dtypes}, "
                         f"--hidden {hidden}, --max-n {max_n}); the grid's dtypes here: "
                         f"{sorted({r['dtype'] for r in grid(device, quick, suites, which)})}")
    out.mkdir(parents=True, exist_ok=True)
    env = environment(device, threads)
    if busy_warning(env):
        print(busy_warning(env), file=sys.stderr, flush=True)
    result = dict(command=command, environment=env, rates=device_rates(device),
                  not_run=missing,
                  mem_method="peak resident set of one run after the timed ones, with the C heap's free pages "
                             "handed back first (malloc_trim), minus the resident set before it, plus what the C++ "
                             "backend keeps between calls (CPU); cuda.max_memory_allocated minus allocated before (GPU). Address space capped "
                             f"at {_fmt_bytes(mem_limit)} so an exhausting row becomes OOM" if mem_limit else
                             "torch.cuda.max_memory_allocated minus allocated before", rows=[])
    budget = 0.5 if quick else 2.0
    if warm_jobs > 1 and device.startswith("cuda"):
        warm_kernel_cache(rows, device, threads, timeout_s, warm_jobs)
    for k, row in enumerate(rows):
        res = repeated_row(row, device, threads, timeout_s, budget, mem_limit, runs)
        result["rows"].append(res)
        status = res.get("status")
        shown = f"{res['median_s'] * 1e3:9.2f} ms" if status == "ok" else f"{status:>12}"
        print(f"[{k + 1}/{len(rows)}] {row['suite']} {row['provider']:>12} {row['mode']:>6} {row['dtype']} "
              f"H={row['H']} B={row['B']} N={row['N']}: {shown}", flush=True)
        # after every row, so a run stopped part way (a device call's time limit) keeps what it measured
        _atomic_write(out / "results.json", json.dumps(dict(result, partial=f"{k + 1} of {len(rows)} rows"), indent=1))
    result["scaling"] = scaling(result)
    _atomic_write(out / "results.json", json.dumps(result, indent=1))
    _atomic_write(out / "results.md", markdown(result) + scaling_markdown(result["scaling"]))
    result["plots"] = plot(result, out)
    if quick:  # --quick promises its table on the terminal (the rows' one-line progress is not it)
        print(markdown(result), flush=True)
    if result["scaling"]:
        print(scaling_markdown(result["scaling"]))
    result["regressions"] = [f for f in result["scaling"] if f["memory_regression"]]
    for f in result["regressions"]:
        print(f"REGRESSION: {f['provider']} egnn {f['mode']} memory grows as N^{f['memory_exponent']:.2f} "
              f"(limit {MEMORY_EXPONENT_LIMIT}) at H={f['H']} B={f['B']} {f['dtype']}", flush=True)
    if compare_to:
        print(compare(compare_to, result, old=old_result))
    return result
