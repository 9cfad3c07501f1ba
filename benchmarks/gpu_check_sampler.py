"""The sampling issue's checks that need a GPU: the Triton DDPM step on CUDA tensors against the float64
reference (explicit noise), its in-kernel Philox noise statistically, and CUDA graph capture of the
whole reverse step (model + step) giving exactly what the uncaptured loop gives, with the shipped model,
in float32 and under bf16 autocast; and ``on_diverge="skip"`` under capture (designs whose model output
turns NaN set aside, the others unchanged). Prints one line per check and exits 1 on a failure.

    python3 benchmarks/gpu_check_sampler.py     # under a minute, most of it kernel compiles
    python3 benchmarks/gpu_check_sampler.py --device cpu --backend cpu --quick   # smoke test of the script
"""
import argparse
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))

from protdiff_fast import ddpm_step  # noqa: E402
from protdiff_fast.diffusion import DDPMScheduler, NoiseSchedule  # noqa: E402
from protdiff_fast.diffusion.graphs import DenoiseStep  # noqa: E402
from protdiff_fast.diffusion.sampler import sample  # noqa: E402
from protdiff_fast.models.protdiff import ProtDiff  # noqa: E402
from protdiff_fast.reference.com import remove_center_of_mass_reference  # noqa: E402
from protdiff_fast.train import load_model  # noqa: E402

F64 = torch.float64
CUDA = torch.device("cuda")  # replaced by --device
BACKEND = "triton"  # replaced by --backend
QUICK = False  # --quick: a tiny random model with 20 steps instead of the shipped one (smoke test)
failed = []


def report(ok: bool, what: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {what}", flush=True)
    if not ok:
        failed.append(what)


def rel(a, w) -> float:
    return float((a.double() - w.double()).norm() / w.double().norm().clamp_min(1e-300))


def random_mask(B, N, g, min_real=1):
    lengths = torch.randint(min_real, N + 1, (B,), generator=g)
    lengths[0] = N
    return torch.arange(N).unsqueeze(0) < lengths.unsqueeze(1)


def check_step_against_reference() -> None:
    s = NoiseSchedule(1000)
    for N in (1, 97, 513, 1000):
        for variance in ("fixed_small", "fixed_large"):
            g = torch.Generator().manual_seed(N)
            B = 6
            mask = random_mask(B, N, g)
            x = remove_center_of_mass_reference(torch.randn(B, N, 3, generator=g, dtype=F64), mask)
            eps, z = torch.randn(B, N, 3, generator=g, dtype=F64), torch.randn(B, N, 3, generator=g, dtype=F64)
            t = torch.tensor([1, 2, 333, 640, 999, 1000])
            want = ddpm_step(s, x, eps, t, mask=mask, noise=z, variance=variance, backend="reference")
            low = ddpm_step(s, x.float().to(CUDA), eps.float().to(CUDA), t.to(CUDA), mask=mask.to(CUDA),
                            noise=z.float().to(CUDA), variance=variance, backend="reference")
            got = ddpm_step(s, x.float().to(CUDA), eps.float().to(CUDA), t.to(CUDA), mask=mask.to(CUDA),
                            noise=z.float().to(CUDA), variance=variance, backend=BACKEND)
            worst, pad_zero, finite = 0.0, True, True
            # errors relative to the step's operands, not to the result: with one real node every centred
            # output is exactly 0, which the GPU's contracted (FMA) centring misses by ~1e-9 (seen on the
            # H200, 2026-12-04), a rounding error of the operands' size, not a relative one of 0's
            scale = float(x.norm() + eps.norm() + z.norm())
            for name in ("prev_sample", "mean", "pred_original_sample"):
                a, w, r = getattr(got, name).cpu(), getattr(want, name), getattr(low, name).cpu()
                err = float((a.double() - w).norm()) / max(float(w.norm()), scale)
                own = float((r.double() - w).norm()) / max(float(w.norm()), scale)
                worst = max(worst, err / max(own, 1e-7))
                pad_zero &= bool((a[~mask] == 0).all())
                finite &= bool(torch.isfinite(a).all())
            report(worst <= 3 and pad_zero and finite,
                   f"ddpm step triton vs float64 reference N={N} {variance}: error / torch fp32's own {worst:.2f}, "
                   f"padding zero {pad_zero}")


def check_in_kernel_noise() -> None:
    s = NoiseSchedule(1000)
    g = torch.Generator().manual_seed(3)
    B, N = 512, 128
    mask = random_mask(B, N, g, min_real=10).to(CUDA)
    zero = torch.zeros(B, N, 3, device=CUDA)
    t = torch.full((B,), 500, device=CUDA)
    seeds = (torch.arange(B) * 7 + 1).to(CUDA)
    out = ddpm_step(s, zero, zero, t, mask=mask, seed=seeds, variance="fixed_large", backend=BACKEND)
    z = out.prev_sample.double() / math.sqrt(float(s.betas[500]))
    keep = mask.unsqueeze(-1)
    com = float(((z * keep).sum(1) / keep.sum(1)).abs().max())
    n_real = mask.sum(1).view(-1, 1, 1).double()
    unit = (z * torch.sqrt(n_real / (n_real - 1)))[mask]
    M = unit.numel()
    mean_ok = abs(float(unit.mean())) < 5 / math.sqrt(M)
    var_ok = abs(float(unit.var()) - 1) < 5 * math.sqrt(2 / M)
    again = ddpm_step(s, zero, zero, t, mask=mask, seed=seeds, variance="fixed_large", backend=BACKEND)
    other = ddpm_step(s, zero, zero, t, mask=mask, seed=seeds + 1, variance="fixed_large", backend=BACKEND)
    last = ddpm_step(s, zero, zero, torch.ones(B, dtype=torch.long, device=CUDA), mask=mask, seed=seeds,
                     backend=BACKEND)
    ok = (mean_ok and var_ok and com < 1e-5 and float(z[~mask].abs().max()) == 0.0
          and torch.equal(again.prev_sample, out.prev_sample) and not torch.allclose(other.prev_sample, out.prev_sample)
          and float(last.prev_sample.abs().max()) == 0.0)
    report(ok, f"in-kernel noise on {M} values: mean {float(unit.mean()):+.4f}, var {float(unit.var()):.4f}, "
               f"max |CoM| {com:.1e}, same seed repeats, other seeds differ, none at t=1")


def check_graph_capture(autocast) -> None:
    """DenoiseStep captured as a CUDA graph vs uncaptured, step by step over the full schedule's last 60
    steps and the first ones, bitwise; and sample() end to end with cuda_graphs on and off."""
    label = "bf16 autocast" if autocast else "float32"
    if QUICK:
        torch.manual_seed(0)
        model = ProtDiff(hidden_dim=16, edge_dim=16, num_layers=2, max_length=128, num_timesteps=20,
                         backend=BACKEND).to(CUDA).eval()
    else:
        model = load_model(_ROOT / "protdiff_fast" / "data" / "protdiff_small.pt", backend=BACKEND, device=CUDA)
    scheduler = DDPMScheduler(model.config.num_timesteps, backend=BACKEND)
    scheduler.set_timesteps(None)
    lengths = [50, 77, 64, 128, 41, 100]
    L = max(lengths)
    mask = (torch.arange(L).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).to(CUDA)
    seeds = torch.tensor([11, 12, 13, 14, 15, 16], device=CUDA)
    g = torch.Generator().manual_seed(0)
    x0 = remove_center_of_mass_reference(torch.randn(len(lengths), L, 3, generator=g), mask.cpu()).to(CUDA)
    results = {}
    for capture in (True, False):
        runner = DenoiseStep(model, scheduler, mask, seeds=seeds, capture=capture, autocast=autocast)
        x, traj = x0.clone(), []
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a failed capture warns and goes on uncaptured
            T = model.config.num_timesteps
            for step_t in list(range(T, max(T - 40, 3), -1)) + [3, 2, 1]:
                eps, x = runner(x, torch.full((len(lengths),), step_t, device=CUDA))
                traj.append((eps.clone(), x.clone()))
        results[capture] = (traj, runner.captured)
    same = all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(results[True][0], results[False][0]))
    finite = all(bool(torch.isfinite(x).all()) for _, x in results[True][0])
    report(results[True][1] and same and finite,
           f"DenoiseStep {label}: captured {results[True][1]}, {len(results[True][0])} steps bitwise equal to uncaptured {same}")

    kw = dict(seed=7, device=CUDA, progress=False, metrics=False, batch_size=8, autocast=autocast)
    lengths = [60, 45, 128, 90, 71, 110, 52, 84, 100, 66]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with_graphs = sample(model, lengths, cuda_graphs=True, **kw)
    without = sample(model, lengths, cuda_graphs=False, **kw)
    same = all(np.array_equal(a, b) for a, b in zip(with_graphs, without))
    diff = max(float(np.abs(a - b).max()) for a, b in zip(with_graphs, without))
    finite = all(np.isfinite(a).all() for a in with_graphs)
    report(same and finite, f"sample() {label}, 10 designs x {model.config.num_timesteps} steps: graphs == no graphs bitwise {same} "
                            f"(max |diff| {diff:.2e} A)")
    # measured, not required: on a GPU the node-wise linears are batch-invariant only on request, and then
    # shape-independent rather than bit-exact (protdiff_fast/nn/batch_invariant.py)
    for invariant in (False, True):
        batch = sample(model, lengths, cuda_graphs=True, batch_invariant=invariant, **kw)
        alone = sample(model, lengths, cuda_graphs=True, batch_invariant=invariant, design_indices=[2],
                       **{**kw, "batch_size": 1})
        print(f"info sample() {label} batch_invariant={invariant}: design 2 (128 residues) alone vs in its batch "
              f"max |diff| {float(np.abs(alone[2] - batch[2]).max()):.2e} A", flush=True)


def check_on_diverge_skip() -> None:
    """sample(on_diverge="skip", cuda_graphs=True): designs of one length get a NaN model output from
    t = T - 3 on (inside the captured graph); they come back None and every other design is bitwise what
    a run without the failure gives."""
    torch.manual_seed(0)
    model = ProtDiff(hidden_dim=16, edge_dim=16, num_layers=2, max_length=128, num_timesteps=20,
                     backend=BACKEND).to(CUDA).eval()

    class Failing(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config
            self.backend = inner.backend

        def forward(self, x, t, mask):
            eps = self.inner(x, t, mask)
            rows = ((mask.sum(1) == 45) & (t <= self.config.num_timesteps - 3)).view(-1, 1, 1)
            return torch.where(rows, torch.full_like(eps, float("nan")), eps)

    lengths = [60, 45, 128, 90, 45, 110, 52, 45]
    kw = dict(seed=3, device=CUDA, progress=False, metrics=False, batch_size=4, cuda_graphs=True)
    clean = sample(model, lengths, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed capture warns and goes on uncaptured
        got = sample(Failing(model), lengths, on_diverge="skip", **kw)
    failed = [i for i, x in enumerate(got) if x is None]
    same = all(np.array_equal(a, b) for a, b in zip(got, clean) if a is not None)
    report(failed == [1, 4, 7] and same, f"sample(on_diverge='skip') with graphs: set aside {failed} (want [1, 4, 7]), "
                                         f"the others bitwise unchanged {same}")


def main() -> int:
    global CUDA, BACKEND, QUICK
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    CUDA, BACKEND, QUICK = torch.device(args.device), args.backend, args.quick
    print(torch.cuda.get_device_name() if CUDA.type == "cuda" else "cpu", "torch", torch.__version__, flush=True)
    for check in (check_step_against_reference, check_in_kernel_noise, lambda: check_graph_capture(None),
                  lambda: check_graph_capture(torch.bfloat16), check_on_diverge_skip):
        try:
            check()
        except Exception as err:  # noqa: BLE001 - report and go on: one device call must bring back everything
            report(False, f"{getattr(check, '__name__', 'check')} raised {type(err).__name__}: {err}")
    print(f"{len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
