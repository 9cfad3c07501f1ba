"""Runs one benchmark row in a fresh process (so peak memory is this row's alone) and prints JSON.

Peak memory on CPU is measured in one more run after the timed ones: the heap's free memory is
handed back to the system first (malloc_trim), so every byte that run needs must be faulted in
again; the resident-set high-water mark of that run (VmHWM, reset through /proc/self/clear_refs)
minus the resident set before it is the extra memory the op needs, plus what the C++ backend
keeps between calls (its backward's workspace, reported by the extension). Without the trim, memory
that glibc kept after the warm-up went uncounted. On CUDA it is torch.cuda.max_memory_allocated minus the memory allocated before the run.
An address-space limit turns a run that would exhaust the machine into a clean OOM row.
"""
from __future__ import annotations

import gc
import json
import resource
import statistics
import sys
import time


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> bool:
    """Hand the C heap's free pages back to the system (glibc); False where there is no such call."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def _kept_bytes() -> int:
    """Bytes the C++ backend keeps between calls (0 without the extension)."""
    from protdiff_fast.backends import cpu_extension

    ext = cpu_extension()
    return int(ext.workspace_bytes()) if ext is not None and hasattr(ext, "workspace_bytes") else 0


def _is_out_of_memory(err: BaseException) -> bool:
    """An allocation that failed, and nothing else: "CUDA error: an illegal memory access" (a kernel
    bug) or any other error that merely mentions memory must not become an OOM row."""
    import torch

    if isinstance(err, MemoryError) or isinstance(err, getattr(torch, "OutOfMemoryError", ())):
        return True
    msg = str(err).lower()
    return "out of memory" in msg or "can't allocate memory" in msg or "cannot allocate memory" in msg \
        or "failed to allocate" in msg


def main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    if spec.get("mem_limit_bytes"):
        lim = int(spec["mem_limit_bytes"])
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    import torch

    from protdiff_fast.bench.egnn import (make_case, make_ddpm_step_case, make_sampler_case, make_sampler_mixed_case,
                                          make_train_step_case)

    torch.set_num_threads(spec["threads"])
    dtype_name = spec["dtype"]
    if dtype_name.endswith("-medium"):  # float32 tensors, bf16 products where the backend and torch allow it
        torch.set_float32_matmul_precision("medium")
        dtype_name = dtype_name[: -len("-medium")]
    autocast = None
    if dtype_name.endswith("-autocast"):  # float32 model and coordinates, the model under torch.autocast
        autocast = getattr(torch, dtype_name[: -len("-autocast")])
        dtype_name = "float32"
    dtype = getattr(torch, dtype_name)
    device = spec["device"]
    cuda = device.startswith("cuda")
    out = dict(status="ok")
    if autocast is not None and spec["suite"] not in ("sampler", "train-step"):
        raise ValueError(f"dtype {spec['dtype']!r}: autocast rows exist for the sampler and train-step suites only")
    graphs = spec["mode"] == "graphs"
    try:
        if spec["suite"] == "ddpm-step":
            run = make_ddpm_step_case(spec["provider"], spec["B"], spec["N"], dtype, device,
                                      graphs=spec["mode"] == "graphs")
        elif spec["suite"] == "sampler":
            run = make_sampler_case(spec["provider"], spec["B"], spec["N"], spec["H"], dtype, device,
                                    graphs=spec["mode"] == "graphs", autocast=autocast)
        elif spec["suite"] == "sampler-mixed":  # mode "write": files + manifest; "memory": results only
            run = make_sampler_mixed_case(spec["provider"], spec["B"], spec["N"], spec["H"], dtype, device,
                                          write=spec["mode"] == "write")
        elif spec["suite"] == "train-step":
            run = make_train_step_case(spec["provider"], spec["B"], spec["N"], spec["H"], dtype, device,
                                       autocast=autocast)
        else:
            run = make_case(spec["provider"], spec["B"], spec["N"], spec["H"], spec["mode"], dtype, device)
        if cuda:  # graph rows capture in the warm-up: their pool's allocations count from here (not inputs/weights)
            torch.cuda.synchronize()
            before_warm = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        t_warm = time.perf_counter()
        run()  # warm-up (and compilation; graph capture for "graphs" rows)
        t_warm = time.perf_counter() - t_warm
        if spec.get("warm_only"):  # the runner's parallel pass that fills the kernel cache: no timing
            print("BENCH_RESULT " + json.dumps(dict(status="warmed", warm_s=t_warm)))
            return
        if t_warm > spec["budget_s"]:  # slow rows: the fewest repetitions that still have a median (recorded)
            spec["min_reps"] = min(spec["min_reps"], 3)
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            if not graphs:
                torch.cuda.reset_peak_memory_stats()
        gc.collect()
        times = []
        deadline = time.perf_counter() + spec["budget_s"]
        while len(times) < spec["min_reps"] or (len(times) < spec["max_reps"] and time.perf_counter() < deadline):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
        if cuda and graphs:  # the graphs were captured in the warm-up: what their pools hold counts
            out["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - before_warm
            out["mem_method"] = ("torch.cuda.max_memory_allocated - allocated before the warm-up that captures the "
                                 "graphs (tensors in their pools included; inputs and weights not)")
        elif cuda:
            out["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - base
            out["mem_method"] = "torch.cuda.max_memory_allocated - allocated before"
        else:  # one more run, measured alone (module docstring)
            gc.collect()
            trimmed = _malloc_trim()
            base_rss = _status_kb("VmRSS")
            peak_reset = _reset_peak_rss()
            run()
            kept = _kept_bytes()
            # pages freed during the run can leave the high-water mark below the starting RSS: floor at 0
            out["peak_mem_bytes"] = (max(0, _status_kb("VmHWM") - base_rss) * 1024 + kept) if peak_reset else None
            out["kept_bytes"] = kept
            out["mem_method"] = ((f"VmHWM - VmRSS of one run after {'malloc_trim' if trimmed else 'gc'} "
                                  "(clear_refs reset) + C++ workspace kept between calls")
                                 if peak_reset else "unavailable")
        # "inclusive": percentiles within the measured range (the default extrapolates past it for few reps)
        q = statistics.quantiles(times, n=5, method="inclusive") if len(times) >= 2 else [times[0]] * 4
        out.update(median_s=statistics.median(times), p20_s=q[0], p80_s=q[3], reps=len(times))
    except (MemoryError, RuntimeError) as err:
        msg = str(err)
        out = dict(status="OOM" if _is_out_of_memory(err) else "error", error=msg[:300])
    print("BENCH_RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
