"""Where the fused backward's time goes, for a GPU lease: a kernel-time table of one forward + backward,
then the backward's tunables swept, in one call.

The first H200 run (results/h200-2026-12-04/NOTES.md) found the backward ~34x the forward at B=8 N=512
H=128 bf16 (45 ms against 1.3 ms) for ~3x its arithmetic. This script answers, for the next lease:
which kernels take that time (torch.profiler's CUDA time per kernel name), and how the backward's
time moves with its block shape (PROTDIFF_FAST_TRITON_BLOCKS = BI,BJ,warps), its passes
(PROTDIFF_FAST_TRITON_BWD_PASSES), its weight-gradient staging (PROTDIFF_FAST_TRITON_DW_STAGE) and the
chunked kernel's chunks and pipelining (PROTDIFF_FAST_TRITON_BWD_CHUNKS, _BWD_STAGES), and the row-slab
scheme (PROTDIFF_FAST_TRITON_BWD=slab). Every
variant runs in its own process (the settings are read when kernels launch); they are compiled first,
JOBS at a time, then timed one at a time (triton.testing.do_bench, median; the same seeded random inputs
for every variant, so their gradients compare; ProtDiff's flags: offset table K = 64, normalize). Each
variant's gradients are checked against the default variant's (worst relative norm error over the
inputs); one beyond AGREE_TOL of its dtype is marked DISAGREES and not timed.

    python3 benchmarks/gpu_profile_bwd.py                     # profile + sweep, ~3-5 min on an H200
    python3 benchmarks/gpu_profile_bwd.py --only profile
    python3 benchmarks/gpu_profile_bwd.py --device cpu --sizes 1,20,16 --variants default   # smoke test (interpreter)
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]

# name -> environment; the backward's blocks go with the forward's (one variable): compare "bwd" columns
VARIANTS = {
    "default": {},
    # the row-slab scheme (protdiff_fast/ops/egnn_triton_slab.py): a pair map with no read-modify-writes, then
    # cuBLAS GEMMs for dW2 / dW3; whole weights at H <= 128 bf16, by chunks at H = 256 ("slab-chunked": chunks
    # at H = 128 too, 22 KB of shared memory instead of 136 KB)
    "slab": {"PROTDIFF_FAST_TRITON_BWD": "slab"},
    "slab-tiles-1": {"PROTDIFF_FAST_TRITON_BWD": "slab", "PROTDIFF_FAST_TRITON_SLAB_TILES": "1"},
    "slab-2^18": {"PROTDIFF_FAST_TRITON_BWD": "slab", "PROTDIFF_FAST_TRITON_SLAB_PAIRS": "262144"},
    "slab-chunked": {"PROTDIFF_FAST_TRITON_BWD": "slab", "PROTDIFF_FAST_TRITON_SLAB_CHUNKS": "64,64"},
    # the chunked kernel's loops (H = 128 / 256 default): the H200 run timed the unchunked one-pass kernel at
    # H = 256 (4x the products per pair, ~1 KB spilled) at 52.7 ms against the chunked kernel's 45.7 ms at
    # H = 128, so the chunk loops look latency-bound: unchunked, pipelined (num_stages 2), wider K chunks
    "unchunked": {"PROTDIFF_FAST_TRITON_BWD_CHUNKS": "{H},{H}"},
    "stages-2": {"PROTDIFF_FAST_TRITON_BWD_STAGES": "2"},
    "chunks-32x32": {"PROTDIFF_FAST_TRITON_BWD_CHUNKS": "32,32"},
    "chunks-32x32-st2": {"PROTDIFF_FAST_TRITON_BWD_CHUNKS": "32,32", "PROTDIFF_FAST_TRITON_BWD_STAGES": "2"},
    "two-pass": {"PROTDIFF_FAST_TRITON_BWD_PASSES": "2"},
    "two-pass-rmw": {"PROTDIFF_FAST_TRITON_BWD_PASSES": "2", "PROTDIFF_FAST_TRITON_DW_STAGE": "1"},
    "stage-16": {"PROTDIFF_FAST_TRITON_DW_STAGE": "16"},
    "blocks-1x16x4": {"PROTDIFF_FAST_TRITON_BLOCKS": "1,16,4"},
    "blocks-1x32x8": {"PROTDIFF_FAST_TRITON_BLOCKS": "1,32,8"},
    "blocks-2x16x8": {"PROTDIFF_FAST_TRITON_BLOCKS": "2,16,8"},
    "blocks-4x16x8": {"PROTDIFF_FAST_TRITON_BLOCKS": "4,16,8"},
}
# variants that do not apply above this H (they would time the default again or repeat a row): skipped there
VARIANT_MAX_H = {"slab-tiles-1": 128, "slab-2^18": 128, "slab-chunked": 128}


def problem(B, N, H, dtype, device, seed=0, K=64):
    import torch

    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_(True)

    args = [r(B, N, 3), r(B, N, H), r(B, N, H), r(H, scale=0.1), r(H, H, scale=H ** -0.5), r(H),
            r(H, H, scale=H ** -0.5), r(H), r(H, scale=H ** -0.5)]
    rel = r(2 * K + 1, H)
    up = (torch.randn(B, N, H, generator=g).to(device), torch.randn(B, N, 3, generator=g).to(device))
    return args, rel, up


# a different reduction order moves the gradients by a few roundings of the dtype; a wrong kernel by far more
AGREE_TOL = {"float32": 1e-3, "bfloat16": 3e-2, "float16": 1e-2}


def disagrees(agree, dtype: str) -> bool:
    """True when a variant's gradients are further from the default's than its dtype allows (NaN too);
    None (nothing to compare with) is not a disagreement."""
    return agree is not None and not agree <= AGREE_TOL.get(dtype, 1e-3)


def one(spec: dict) -> dict:
    """Run in a child process with the variant's environment: time fwd and fwd+bwd, return the gradients'
    norms file for the agreement check."""
    import torch

    from protdiff_fast._checks import skip_value_checks
    from protdiff_fast.ops import egnn_pair_aggregate

    B, N, H = spec["size"]
    dtype = getattr(torch, spec["dtype"])
    device = spec["device"]
    args, rel, up = problem(B, N, H, dtype, device)
    leaves = args + [rel]

    def fwd():
        return egnn_pair_aggregate(*args, rel=rel, normalize=True, backend="triton")

    def fwdbwd():
        m, dx = fwd()
        return torch.autograd.grad((m, dx), leaves, (up[0].to(m.dtype), up[1].to(dx.dtype)))

    grads = fwdbwd()  # compiles
    out = {"name": spec["name"], "size": spec["size"]}
    if spec.get("save"):
        torch.save([g.float().cpu() for g in grads], spec["save"])
    if spec.get("warm_only"):
        return out
    if device == "cuda":
        from triton.testing import do_bench

        out["fwd_ms"] = do_bench(fwd, warmup=100, rep=500, return_mode="median")
        with skip_value_checks():  # the per-call host reads of the input checks (NOTES: the ~0.5-1 ms floor)
            out["fwd_nochecks_ms"] = do_bench(fwd, warmup=100, rep=500, return_mode="median")
        out["fwdbwd_ms"] = do_bench(fwdbwd, warmup=100, rep=1000, return_mode="median")
    else:
        t0 = time.perf_counter()
        fwd()
        out["fwd_ms"] = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        with skip_value_checks():
            fwd()
        out["fwd_nochecks_ms"] = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        fwdbwd()
        out["fwdbwd_ms"] = (time.perf_counter() - t0) * 1e3
    out["bwd_ms"] = out["fwdbwd_ms"] - out["fwd_ms"]
    if spec.get("profile") and device == "cuda":
        from torch.profiler import ProfilerActivity, profile

        for _ in range(3):
            fwdbwd()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                fwdbwd()
            torch.cuda.synchronize()
        out["profile"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)
    return out


def variant_env(env_extra: dict, size) -> dict:
    """A variant's environment for one B, N, H: "{H}" in a value stands for the size's H."""
    return {k: v.format(H=size[2]) for k, v in env_extra.items()}


def child(spec: dict, env_extra: dict, timeout: float) -> dict:
    env = dict(os.environ, **variant_env(env_extra, spec["size"]))
    env["PYTHONPATH"] = str(_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                              env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(name=spec["name"], size=spec["size"], error=f"over {timeout:.0f} s")
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return dict(name=spec["name"], size=spec["size"], error=(proc.stderr or "no output")[-400:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--sizes", default="8,512,128;8,512,256;4,128,256",
                    help="B,N,H;... (default: the issue's target row, the same at H = 256, ProtDiff's training step)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    ap.add_argument("--only", choices=["profile", "sweep"], default=None)
    ap.add_argument("--jobs", type=int, default=8, help="variants compiled at once")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds per child process")
    ap.add_argument("--out", default=None, help="write results.json here")
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(one(json.loads(args.child))), flush=True)
        return 0
    sizes = [tuple(int(v) for v in s.split(",")) for s in args.sizes.split(";")]
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    results, tmp = [], Path(os.environ.get("TMPDIR", "/tmp")) / f"bwd_grads_{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    base = dict(device=args.device, dtype=args.dtype)

    def save():  # after every row: a stage cut by its time limit keeps what it measured
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(dict(device=args.device, dtype=args.dtype, variants=VARIANTS,
                                                      results=results, partial=True), indent=1))

    if args.only != "sweep":
        r = child(dict(base, name="default", size=sizes[0], profile=True), {}, args.timeout)
        print(f"# kernel times, default variant, B,N,H = {sizes[0]} {args.dtype}, 5 x fwd+bwd", flush=True)
        print(r.get("profile") or r.get("error") or "(no profile on this device)", flush=True)
        results.append({k: v for k, v in r.items() if k != "profile"} | {"profile_table": r.get("profile")})
        save()
    if args.only != "profile":
        import torch

        print(f"{'variant':<16} {'B,N,H':<12} {'fwd ms':>8} {'no checks':>9} {'fwd+bwd ms':>11} {'bwd ms':>8} "
              f"{'grads vs default':>17}", flush=True)
        for size in sizes:  # size by size (the target row first), so a cut loses the last sizes only
            specs = [(dict(base, name=n, size=size, save=str(tmp / f"{n}_{'x'.join(map(str, size))}.pt")), VARIANTS[n])
                     for n in names if size[2] <= VARIANT_MAX_H.get(n, size[2])]
            t0 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # compile (and save the gradients) in parallel
                warm = list(pool.map(lambda sv: child(dict(sv[0], warm_only=True), sv[1], args.timeout), specs))
            print(f"# compiled {len(specs)} variants at B,N,H = {size}, {args.jobs} at a time, in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            for (spec, env), w in zip(specs, warm):
                if "error" in w:
                    r = w
                else:
                    ref_path = tmp / f"default_{'x'.join(map(str, spec['size']))}.pt"
                    agree = None
                    if Path(spec["save"]).exists() and ref_path.exists():
                        mine, ref = torch.load(spec["save"]), torch.load(ref_path)
                        agree = max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(mine, ref))
                    if disagrees(agree, args.dtype):
                        r = dict(name=spec["name"], size=spec["size"], disagrees=True,
                                 error=f"DISAGREES: gradients {agree:.1e} from the default's (> "
                                       f"{AGREE_TOL.get(args.dtype, 1e-3):g}); not timed")
                    else:
                        r = child(dict(spec, save=None), env, args.timeout)
                    r["grads_vs_default"] = agree
                results.append(r)
                save()
                label = ",".join(map(str, spec["size"]))
                if "error" in r:
                    print(f"{spec['name']:<16} {label:<12} error: {r['error'][-200:]}", flush=True)
                    continue
                ag = r.get("grads_vs_default")
                print(f"{spec['name']:<16} {label:<12} {r['fwd_ms']:8.2f} {r['fwd_nochecks_ms']:9.2f} "
                      f"{r['fwdbwd_ms']:11.2f} {r['bwd_ms']:8.2f} {'-' if ag is None else f'{ag:.1e}':>17}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(device=args.device, dtype=args.dtype, variants=VARIANTS,
                                                  results=results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
