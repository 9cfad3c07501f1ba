"""The Triton EGNN kernels on a real GPU against the float64 reference: forward and every gradient.

The interpreter tests (tests/test_egnn_triton.py) cannot see the real compiler, tensor cores, races or
TF32; this runs the same comparison on CUDA tensors for the configurations that matter (ProtDiff's
offset-table layer with every flag, and the dense edge term), with fresh random inputs and
odd sizes, and a repeat run for determinism. Prints one line per case and exits 1 on a failure.

    python3 benchmarks/gpu_check.py           # a few minutes, most of it compiling kernels
    python3 benchmarks/gpu_check.py --jobs 13 # each combination in its own process: compiles in parallel
"""
import sys
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))  # the package from this checkout, installed or not
sys.path.insert(0, str(_ROOT / "tests"))
from helpers import rel_err  # noqa: E402
from test_egnn_cpu import FLAG_SETS, make_problem  # noqa: E402

from protdiff_fast.ops import egnn_pair_aggregate  # noqa: E402

F64 = torch.float64
DEVICE = "cuda"  # --device cpu (with TRITON_INTERPRET=1): a smoke test of this script, not of the GPU
FULL_SIZES = ((3, 97), (1, 1), (2, 513))  # (B, N)
SIZES = FULL_SIZES  # --quick: small ones


def poison_allocator_cache() -> None:
    """Fill the CUDA caching allocator's free blocks with NaN (METHOD.md: poison outputs before each run):
    the op allocates its outputs with torch.empty, which reuses these blocks, so an element the kernels
    never write stays NaN and fails the finite check. Both pools: small (< 1 MB) and large blocks."""
    if DEVICE != "cuda":
        return
    torch.cuda.synchronize()
    # 0x7FC07FC0: a NaN as float32 and in each 16-bit half (bf16 and fp16 NaN), so bf16 outputs are
    # poisoned in every element (a float32 NaN read as bf16 is [0, NaN, 0, NaN, ...])
    blocks = [torch.empty(1 << 17, dtype=torch.int32, device=DEVICE).fill_(0x7FC07FC0) for _ in range(64)]
    blocks.append(torch.empty(1 << 26, dtype=torch.int32, device=DEVICE).fill_(0x7FC07FC0))  # 256 MB
    torch.cuda.synchronize()
    del blocks  # back to the cache, NaN-filled


def run(backend, args, kw, dtype, upstream, x_dtype=None):
    floats = [k for k, v in kw.items() if torch.is_tensor(v) and v.dtype.is_floating_point]
    leaves = [a.to(DEVICE, x_dtype if k == 0 and x_dtype else dtype).requires_grad_(True) for k, a in enumerate(args)] + \
             [kw[k].to(DEVICE, dtype).requires_grad_(True) for k in floats]
    kw2 = {k: (v.to(DEVICE) if torch.is_tensor(v) else v) for k, v in kw.items()}
    kw2.update(dict(zip(floats, leaves[len(args):])))
    poison_allocator_cache()
    out = egnn_pair_aggregate(*leaves[:len(args)], backend=backend, **kw2)
    loss = sum((o.double() * u).sum() for o, u in zip(out, upstream))
    return [o.detach() for o in out] + [g.detach() for g in torch.autograd.grad(loss, leaves)]


def combos():
    """(dtype, x dtype, H, edge, flags): fp32, bf16, and bf16 with float32 coordinates (EGNNLayer under
    autocast) for the ProtDiff-like cases; H = 256: the chunked forward and the chunked one-pass backward;
    H = (H_e, M, H_x): rectangular widths (egnn-pytorch's layer at dim 64 with norm_coors, m_dim 64, and at
    dim 16), the chunked kernels with HE, HM, HX."""
    cases = [(64, "offset", FLAG_SETS[4]), (128, "offset", FLAG_SETS[4]), (32, "dense", FLAG_SETS[5]),
             (16, "none", FLAG_SETS[0]), (256, "offset", FLAG_SETS[3]),
             (32, "dense", dict(attention=True, tanh=True, normalize="clamp")),  # egnn-pytorch's CoorsNorm
             ((258, 64, 257), "none", dict(normalize="clamp")), ((66, 16, 64), "dense", dict(attention=True))]
    return [(dtype, x_dtype, H, edge, flags)
            for dtype, x_dtype in ((torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32))
            for H, edge, flags in cases if (x_dtype is None or edge == "offset")
            and (SIZES == FULL_SIZES or H in (16, 32, (66, 16, 64)))]  # --quick: the small widths only


def run_parallel(jobs: int, time_limit: float) -> int:
    """Each combination in its own process, ``jobs`` at a time (its kernels compile in parallel); their
    lines printed in the sequential order. A combination still running after ``time_limit`` seconds
    is stopped and counted as failed (the processes must not outlive a device call's stage)."""
    import subprocess
    import time
    from concurrent.futures import ThreadPoolExecutor

    deadline = time.monotonic() + time_limit

    def one(k):
        try:
            return subprocess.run([sys.executable, __file__, "--combo", str(k), "--device", DEVICE]
                                  + (["--quick"] if SIZES != FULL_SIZES else []), capture_output=True, text=True,
                                  timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired as err:
            out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
            return subprocess.CompletedProcess(err.cmd, -9, out, f"stopped after the {time_limit:.0f} s limit")

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        procs = list(pool.map(one, range(len(combos()))))
    worst, failed = 0.0, 0
    for k, p in enumerate(procs):
        lines = p.stdout.splitlines()
        for line in lines:
            if line.startswith(("ok", "FAIL", "     error")):
                print(line)
        summary = [ln for ln in lines if " failed; worst error / tolerance " in ln]
        if p.returncode not in (0, 1) or not summary:
            print(f"FAIL combination {k} crashed (exit {p.returncode}): {p.stderr[-1500:]}")
            failed += 1
            continue
        n, w = summary[-1].split(" failed; worst error / tolerance ")
        failed, worst = failed + int(n), max(worst, float(w))
    print(f"{failed} failed; worst error / tolerance {worst:.2f}")
    return 1 if failed else 0


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=1, help="run the combinations in this many processes at once")
    ap.add_argument("--combo", type=int, default=None, help="run one combination (by index) only")
    ap.add_argument("--time-limit", type=float, default=3600.0, help="with --jobs: stop combinations after this")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of the script (needs TRITON_INTERPRET=1)")
    ap.add_argument("--quick", action="store_true", help="small sizes (with --device cpu)")
    opts = ap.parse_args()
    global DEVICE, SIZES
    DEVICE = opts.device
    if opts.quick:
        SIZES = ((2, 9), (1, 1))
    if opts.jobs > 1 and opts.combo is None:
        return run_parallel(opts.jobs, opts.time_limit)
    print(torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE, "torch", torch.__version__, flush=True)
    worst, failed = 0.0, 0
    todo = combos() if opts.combo is None else [combos()[opts.combo]]
    for dtype, x_dtype, H, edge, flags in todo:
        for B, N in SIZES:
            args, kw = make_problem(B, N, H, 6, edge, flags, seed=(H if isinstance(H, int) else sum(H)) + N)
            g = torch.Generator().manual_seed(1)
            M = args[4].shape[1]
            up = [torch.randn(B, N, M, generator=g, dtype=F64).to(DEVICE),
                  torch.randn(B, N, 3, generator=g, dtype=F64).to(DEVICE)]
            want = run("reference", args, kw, F64, up)
            low = run("reference", args, kw, dtype, up, x_dtype)
            got = run("triton", args, kw, dtype, up, x_dtype)
            again = run("triton", args, kw, dtype, up, x_dtype)
            same = all(torch.equal(a, b) for a, b in zip(got, again))
            names = ["m_i", "dx_i", "d x", "d p", "d q", "d w_d", "d W2", "d b2", "d W3", "d b3", "d w4"] + \
                [f"d {k}" for k, v in kw.items() if torch.is_tensor(v) and v.dtype.is_floating_point]
            ratios, detail = [], []
            for a, w, r in zip(got, want, low):
                err, base = rel_err(a, w), rel_err(r, w)
                # tolerance: 3x torch's own error at this dtype, floored for fp32 (the kernels run 3xTF32
                # dots, ~2^-22 per product against fp32's 2^-24); for bf16 plus half a bf16 step, as in
                # tests/test_egnn_triton.py: a lone scalar (d b_att, d w_d) is one rounding to bf16, whose
                # error is whatever side of the rounding step the value falls (seen on the H200,
                # 2026-12-04: d b_att = -1559.3 came out as -1552, the bf16 reference's as -1560)
                tol = 3 * max(base, 1e-6) + (0.0 if dtype == torch.float32 else torch.finfo(dtype).eps / 2)
                ratios.append(err / tol)
                detail.append(f"{len(detail)}:{err:.2e}/{base:.2e}")
            worst_name = names[max(range(len(ratios)), key=ratios.__getitem__)]
            ok = same and max(ratios) <= 1.0 and all(bool(torch.isfinite(a).all()) for a in got)
            worst = max(worst, max(ratios))
            failed += not ok
            label = str(dtype) + ("+x32" if x_dtype else "")
            width = H if isinstance(H, int) else "x".join(map(str, H))
            print(f"{'ok  ' if ok else 'FAIL'} {label:<19} H={width:<4} {edge:<7} B={B} N={N:<4} "
                  f"m err {rel_err(got[0], want[0]):.1e} dx err {rel_err(got[1], want[1]):.1e} "
                  f"worst error / tolerance {max(ratios):.2f} ({worst_name}) deterministic {same}"
                  + ("" if ok else f"\n     error / torch's own, per output in order {' '.join(detail)}"), flush=True)
    print(f"{failed} failed; worst error / tolerance {worst:.2f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
