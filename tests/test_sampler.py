"""Scheduler (diffusers-shaped) and the large-batch sampler: exact Gaussian sampling through the
public API with mixed lengths, strided DDIM, per-design reproducibility, bad input."""
import json
import math
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from protdiff_fast import backends
from protdiff_fast.diffusion import DDPMScheduler, NoiseSchedule
from protdiff_fast.diffusion.sampler import SamplingError, sample
from protdiff_fast.io import read_backbones
from protdiff_fast.ops import ddpm_step
from protdiff_fast.reference.com import remove_center_of_mass_reference
from helpers import assert_close_rel, random_mask

F64 = torch.float64
HAS_CPU = backends.cpu_extension() is not None


class ExactGaussianEps:
    """The exact eps predictor for x_0 = P y, y ~ N(0, s2 I): eps_hat = sqrt(1 - ab) / (ab s2 + 1 - ab) x_t."""

    def __init__(self, schedule, data_var, max_length=None):
        self.schedule, self.data_var, self.calls = schedule, data_var, 0
        if max_length is not None:
            self.max_length = max_length

    def __call__(self, x_t, t, mask):
        self.calls += 1
        ab = self.schedule.coef("alpha_bars", t, x_t)
        return (1 - ab).sqrt() / (ab * self.data_var + 1 - ab) * x_t


def test_set_timesteps():
    s = DDPMScheduler(1000)
    assert s.timesteps[0] == 1000 and s.timesteps[-1] == 1 and len(s.timesteps) == 1000 and not s.strided
    s.set_timesteps(50)
    ts = s.timesteps
    assert len(ts) == 50 and ts[0] == 1000 and ts[-1] == 1 and bool((ts[:-1] > ts[1:]).all()) and s.strided
    with pytest.raises(ValueError, match=r"num_inference_steps must lie in \[1, 1000\]"):
        s.set_timesteps(0)
    with pytest.raises(ValueError, match="eta"):
        DDPMScheduler(eta=2.0)
    for K in (1, 2, 3, 7):  # every sequence starts at T: K = 1 is one step from x_T (it was t = 1 alone)
        s.set_timesteps(K)
        assert s.timesteps[0] == 1000 and s.timesteps[-1] == (1000 if K == 1 else 1) and len(s.timesteps) == K
    for bad in (1.7, "10", True):
        with pytest.raises(ValueError, match="num_inference_steps: an integer"):
            s.set_timesteps(bad)
    s.set_timesteps(5, device="cpu")  # diffusers' signature
    assert s.timesteps.device.type == "cpu" and len(s.timesteps) == 5
    for bad in (2.5, "10", 0, True):  # named as the caller spelled it (was a linspace TypeError / '<' on str)
        with pytest.raises(ValueError, match="num_train_timesteps must be an integer >= 1"):
            DDPMScheduler(bad)
    with pytest.raises(ValueError, match=r"beta_schedule: expected one of \('linear', 'cosine'\)"):
        DDPMScheduler(beta_schedule="squaredcos_cap_v2")


def test_step_return_dict_false_gives_diffusers_tuple():
    s = DDPMScheduler(20)
    g = torch.Generator().manual_seed(0)
    x, eps, z = (torch.randn(2, 5, 3, generator=g) for _ in range(3))
    out = s.step(eps, 7, x, noise=z)
    tup = s.step(eps, 7, x, noise=z, return_dict=False)
    assert type(tup) is tuple and len(tup) == 2
    assert torch.equal(tup[0], out.prev_sample) and torch.equal(tup[1], out.pred_original_sample)


def test_eta_and_variance_are_used_or_refused():
    """eta < 1 with all T steps runs DDIM (it was ignored: the fused ancestral step ran); fixed_large,
    the ancestral sampler's variance, is refused where DDIM's sigma runs (it was ignored there)."""
    s = DDPMScheduler(50, eta=0.0)
    assert s.strided and len(s.timesteps) == 50
    model = ExactGaussianEps(s.schedule, 4.0)
    a = sample(model, [5, 6], seed=3, scheduler=s, progress=False)
    b = sample(model, [5, 6], seed=3, scheduler=DDPMScheduler(50, eta=0.0), progress=False)
    ancestral = sample(model, [5, 6], seed=3, scheduler=DDPMScheduler(50), progress=False)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not any(np.allclose(u, v) for u, v in zip(a, ancestral))
    # deterministic given x_T: the per-step noise is not drawn (x_T alone depends on the seed)
    x_T = torch.randn(2, 6, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    x_T = remove_center_of_mass_reference(x_T, None)
    eps = model(x_T, torch.tensor([50, 50]), None)
    assert torch.equal(s.step(eps, 50, x_T, seed=1).prev_sample, s.step(eps, 50, x_T, seed=2).prev_sample)
    with pytest.raises(ValueError, match="fixed_large.*fixed_small"):
        DDPMScheduler(50, eta=0.5, variance_type="fixed_large")
    large = DDPMScheduler(50, variance_type="fixed_large")
    with pytest.raises(ValueError, match="fixed_large.*10 of 50 steps"):
        large.set_timesteps(10)


@pytest.mark.parametrize("steps", [None, 50])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_sampling_keeps_the_data_moments(dtype, steps):
    """bf16 / fp16 samples are stepped in float32 (coefficients like 1 / sqrt(alpha_t) ~ 1 + 5e-5 round
    to 1 in bf16: the reference step's chain variance ran to ~29 against 3.3, and DDIM's sigma was
    0 / 0 = NaN near t = 1). Compared with the same run in float32: the same draws up to rounding."""
    sched = DDPMScheduler(1000, backend="reference")
    model = ExactGaussianEps(sched.schedule, 4.0)
    kw = dict(num_samples=300, batch_size=300, seed=5, scheduler=sched, progress=False, scale=1.0,
              num_inference_steps=steps)
    low = sample(model, [6], dtype=dtype, **kw)
    ref = sample(model, [6], dtype=torch.float32, **kw)
    var_low = float(np.mean([np.mean(o.astype(np.float64) ** 2) for o in low]))
    var_ref = float(np.mean([np.mean(o.astype(np.float64) ** 2) for o in ref]))
    assert all(np.isfinite(o).all() for o in low)
    assert abs(var_low / var_ref - 1) < 0.05, (var_low, var_ref)


@pytest.mark.parametrize("backend", ["reference"] + (["cpu"] if HAS_CPU else []))
def test_step_matches_the_fused_op(backend):
    s = DDPMScheduler(1000, backend=backend)
    g = torch.Generator().manual_seed(0)
    mask = random_mask(3, 9, generator=g, min_real=2)
    x = remove_center_of_mass_reference(torch.randn(3, 9, 3, generator=g, dtype=F64), mask)
    eps, noise = torch.randn(3, 9, 3, generator=g, dtype=F64), torch.randn(3, 9, 3, generator=g, dtype=F64)
    t = torch.tensor([1000, 20, 1])
    got = s.step(eps, t, x, mask=mask, noise=noise)
    want = ddpm_step(s.schedule, x, eps, t, mask=mask, noise=noise, backend="reference")
    assert_close_rel(got.prev_sample, want.prev_sample, 1e-12, "prev")
    assert_close_rel(got.pred_original_sample, want.pred_original_sample, 1e-12, "x0")


def test_ddim_with_every_step_and_eta_1_is_ancestral_sampling():
    s = DDPMScheduler(1000)
    s.strided = True  # force the DDIM update on the full sequence
    g = torch.Generator().manual_seed(1)
    mask = random_mask(4, 7, generator=g, min_real=2)
    x = remove_center_of_mass_reference(torch.randn(4, 7, 3, generator=g, dtype=F64), mask)
    eps, noise = torch.randn(4, 7, 3, generator=g, dtype=F64), torch.randn(4, 7, 3, generator=g, dtype=F64)
    t = torch.tensor([1000, 500, 2, 1])
    ddim = s.step(eps, t, x, mask=mask, noise=noise)
    ddpm = ddpm_step(s.schedule, x, eps, t, mask=mask, noise=noise, backend="reference")
    assert_close_rel(ddim.prev_sample, ddpm.prev_sample, 1e-10, "DDIM(eta=1, stride 1) vs DDPM")
    with pytest.raises(ValueError, match="not in the sequence"):
        s.set_timesteps(10)
        s.step(eps, t, x, mask=mask)


def _covariance_error(samples, n, data_var):
    x = torch.from_numpy(np.stack(samples))
    flat = x.permute(0, 2, 1).reshape(-1, n)
    cov = flat.T @ flat / flat.shape[0]
    want = data_var * (torch.eye(n, dtype=F64) - 1.0 / n)
    return float((cov - want).norm() / want.norm())


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference"] + (["cpu"] if HAS_CPU else []))
def test_sampler_reproduces_gaussian_data_for_mixed_lengths(backend):
    sched = DDPMScheduler(1000, backend=backend)
    data_var, per_len = 4.0, 1500
    model = ExactGaussianEps(sched.schedule, data_var)
    lengths = [5, 12, 8]
    out = sample(model, lengths, num_samples=per_len, batch_size=1000, seed=3, scheduler=sched, dtype=F64,
                 progress=False, scale=1.0)
    assert len(out) == 3 * per_len
    tol = 6 * math.sqrt(2 / (3 * per_len)) + 0.01  # Monte Carlo error + the sampler's discretisation bias
    for k, n in enumerate(lengths):
        group = out[k * per_len:(k + 1) * per_len]
        assert all(g.shape == (n, 3) for g in group)
        err = _covariance_error(group, n, data_var)
        assert err < tol, f"length {n}: covariance off by {err:.3f} (tol {tol:.3f})"


@pytest.mark.slow
def test_strided_sampling_reproduces_gaussian_data():
    sched = DDPMScheduler(1000)
    model = ExactGaussianEps(sched.schedule, 4.0)
    out = sample(model, 6, num_samples=3000, batch_size=3000, seed=5, scheduler=sched, num_inference_steps=100,
                 dtype=F64, progress=False, scale=1.0)
    assert model.calls == 100
    assert _covariance_error(out, 6, 4.0) < 6 * math.sqrt(2 / 9000) + 0.03
    sched_det = DDPMScheduler(1000, eta=0.0)  # DDIM: deterministic given x_T
    a = sample(model, [6, 9], seed=1, scheduler=sched_det, num_inference_steps=20, progress=False)
    b = sample(model, [6, 9], seed=1, scheduler=sched_det, num_inference_steps=20, progress=False)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))


@pytest.mark.skipif(not HAS_CPU, reason="per-design noise needs the C++ step")
def test_a_design_is_the_same_alone_or_in_a_big_run():
    sched = DDPMScheduler(200, backend="cpu")
    model = ExactGaussianEps(sched.schedule, 2.0)
    lengths = [7, 7, 5, 7, 6, 7]
    big = sample(model, lengths, batch_size=6, seed=11, scheduler=sched, progress=False)
    again = sample(model, lengths, batch_size=2, seed=11, scheduler=sched, progress=False)
    for a, b in zip(big, again):
        np.testing.assert_array_equal(a, b)
    other = sample(model, lengths, batch_size=6, seed=12, scheduler=sched, progress=False)
    assert not np.allclose(big[0], other[0])


def test_sampler_writes_pdb_files_and_shows_progress(tmp_path, capsys):
    sched = DDPMScheduler(50)
    model = ExactGaussianEps(sched.schedule, 1.0)
    out = sample(model, [10, 12], seed=0, scheduler=sched, out_dir=tmp_path / "designs", progress=True)
    files = sorted((tmp_path / "designs").glob("design_*.pdb"))
    assert [f.name for f in files] == ["design_000000.pdb", "design_000001.pdb"]
    manifest = json.loads((tmp_path / "designs" / "manifest.json").read_text())
    assert sorted(manifest["designs"]) == ["0", "1"] and manifest["run"]["lengths"] == [10, 12]
    back = read_backbones(files[1])[0]
    np.testing.assert_allclose(back.ca, out[1], atol=2e-3)  # written in Angstrom
    err = capsys.readouterr().err
    assert "sampling: 2/2 designs (100%)" in err and "backbones/s" in err and "\r" not in err
    with pytest.raises(ValueError, match="holds a different sampling run .*lengths: 2 designs in the folder vs 1"):
        sample(model, [10], scheduler=sched, out_dir=tmp_path / "designs", progress=False)
    with pytest.raises(FileExistsError, match="holds this run with 2 of 2 designs finished; pass --resume"):
        sample(model, [10, 12], seed=0, scheduler=sched, out_dir=tmp_path / "designs", progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        sample(model, [10], scheduler=sched, out_dir=tmp_path / "other", progress=False)


def test_sampler_bad_input_and_nan_model():
    sched = DDPMScheduler(20)
    model = ExactGaussianEps(sched.schedule, 1.0, max_length=64)
    with pytest.raises(ValueError, match=r"lengths: \[0\] outside the allowed range \[1, 64\]"):
        sample(model, [5, 0], scheduler=sched, progress=False)
    with pytest.raises(ValueError, match=r"\[65\] outside"):
        sample(model, 65, scheduler=sched, progress=False)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
        sample(model, 10, num_samples=0, scheduler=sched, progress=False)
    if not torch.cuda.is_available():  # the device named (it said "backend 'cpu' cannot run ddpm_step here")
        with pytest.raises(ValueError, match="device: 'cuda', but torch sees no CUDA GPU"):
            sample(model, 10, scheduler=sched, progress=False, device="cuda")
    with pytest.raises(ValueError, match="device: 'gpu' is not a device torch knows"):
        sample(model, 10, scheduler=sched, progress=False, device="gpu")
    # not silently coerced: "12" ran lengths 1 and 2, [2.7] length 2, True length 1, seed 1.5 seed 1
    for kw, match in ((dict(lengths="12"), "lengths: an integer or a sequence of integers, got '12'"),
                      (dict(lengths=[2.7]), r"lengths: an integer or a sequence of integers, got \[2.7\]"),
                      (dict(lengths=True), "lengths: an integer or a sequence"),
                      (dict(lengths=[5], seed=1.5), "seed: an integer, got 1.5"),
                      (dict(lengths=[5], seed=None), "seed: an integer, got None"),
                      (dict(lengths=[5], num_samples=2.5), "num_samples must be an integer >= 1, got 2.5"),
                      (dict(lengths=[5], batch_size=1.5), "batch_size must be an integer >= 1, got 1.5")):
        with pytest.raises(ValueError, match=match):
            sample(model, scheduler=sched, progress=False, **kw)
    assert [a.shape for a in sample(model, np.int64(5), scheduler=sched, progress=False)] == [(5, 3)]

    def broken(x, t, mask):
        eps = torch.zeros_like(x)
        if int(t[0]) == 7:
            eps[1, 0, 0] = float("nan")
        return eps

    with pytest.raises(SamplingError, match=r"NaN/Inf at t=7 for design \d \(length 9"):
        sample(broken, [9, 9, 9], scheduler=sched, progress=False)

    def exploding(x, t, mask):  # finite but huge outputs for design 2 from t = 500 on: x grows without bound
        eps = torch.zeros_like(x)
        if int(t[0]) <= 500:
            eps[2] = -1e6 * x[2]
        return eps

    with pytest.raises(SamplingError, match=r"diverged \(coordinates beyond 1e\+04 model units, or Inf/NaN\) after "
                                            r"the step at t=\d+ for design 2 \(length 9"):
        sample(exploding, [9, 9, 9], scheduler=sched, progress=False)


class FailsOnDesigns(ExactGaussianEps):
    """The exact predictor, except for designs whose x_T has x[0, 0] > x[1, 0] (about half, decided by
    each design's own noise, so whatever its batch): from ``t_fail`` down their eps is NaN (``"nan"``)
    or -1e6 x, which drives x past DIVERGED_UNITS (``"explode"``)."""

    def __init__(self, schedule, data_var, how, t_fail, max_length=None):
        super().__init__(schedule, data_var, max_length)
        self.how, self.t_fail, self.marked = how, t_fail, None

    def __call__(self, x_t, t, mask):
        eps = super().__call__(x_t, t, mask)
        if int(t[0]) == self.schedule.num_timesteps:  # x_T: mark the designs that will fail
            self.marked = x_t[:, 0, 0] > x_t[:, 1, 0]
        rows = (self.marked & (t <= self.t_fail)).view(-1, 1, 1)
        bad = torch.full_like(eps, float("nan")) if self.how == "nan" else -1e6 * x_t
        return torch.where(rows, bad, eps)


@pytest.mark.parametrize("backend, how", [("reference", "nan"), ("reference", "explode"), ("triton", "nan")] +
                         ([("cpu", "nan"), ("cpu", "explode")] if HAS_CPU else []))
def test_on_diverge_skip_sets_failed_designs_aside_and_the_others_come_out_unchanged(tmp_path, backend, how,
                                                                                       capsys):
    T, t_fail = (8, 4) if backend == "triton" else (30, 12)  # the interpreter: few steps
    sched = DDPMScheduler(T, backend=backend)
    lengths = [9, 7, 9, 8, 9, 6, 9, 9]
    failing = FailsOnDesigns(sched.schedule, 1.0, how, t_fail=t_fail)
    with pytest.raises(SamplingError, match=rf"at t={t_fail} for design \d \(length \d" if how == "nan" else
                       rf"diverged .* after the step at t={t_fail} for design \d .*--on-diverge skip"):
        sample(failing, lengths, seed=3, scheduler=sched, batch_size=4, progress=False)
    clean = sample(ExactGaussianEps(sched.schedule, 1.0), lengths, seed=3, scheduler=sched, batch_size=4,
                   progress=False)
    folder = tmp_path / "run"
    got = sample(failing, lengths, seed=3, scheduler=sched, batch_size=4, progress=False, out_dir=folder,
                 on_diverge="skip")
    failed = [i for i, x in enumerate(got) if x is None]
    assert 0 < len(failed) < len(lengths), failed  # this seed fails some designs, not all
    for i, x in enumerate(got):  # the others: exactly what they are when nothing fails
        if x is not None:
            np.testing.assert_array_equal(x, clean[i])
            assert np.isfinite(x).all()
    err = capsys.readouterr().err
    assert "design(s) diverged and were set aside" in err
    assert all(f"{i} (length {lengths[i]}, t={t_fail})" in err for i in failed)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(int(i) for i in manifest["designs"]) == [i for i in range(8) if i not in failed]
    assert sorted(int(i) for i in manifest["failed"]) == failed
    for i in failed:
        entry = manifest["failed"][str(i)]
        assert entry["t"] == t_fail and entry["length"] == lengths[i] and entry["index"] == i
        assert entry["reason"].startswith("model output is NaN/Inf" if how == "nan" else "coordinates beyond 1e+04")
        assert not list(folder.glob(f"design_{i:06d}.*"))
    with open(folder / "manifest.csv") as f:
        import csv

        rows = {int(r["index"]): r for r in csv.DictReader(f)}
    assert sorted(rows) == list(range(8))
    assert all(rows[i]["status"].startswith(f"failed at t={t_fail}") and rows[i]["file"] == "" for i in failed)
    assert all(rows[i]["status"] == "finished" for i in rows if i not in failed)
    # resume does not retry a failed design (it would fail again): nothing left to do
    calls = failing.calls
    again = sample(failing, lengths, seed=3, scheduler=sched, batch_size=4, progress=False, out_dir=folder,
                   on_diverge="skip", resume=True)
    assert failing.calls == calls and all(x is None for x in again)
    with pytest.raises(ValueError, match="on_diverge: 'raise' or 'skip'"):
        sample(failing, lengths, scheduler=sched, progress=False, on_diverge="ignore")


def test_a_run_where_nothing_fails_keeps_its_manifest_and_csv_shape(tmp_path):
    sched = DDPMScheduler(10)
    sample(ExactGaussianEps(sched.schedule, 1.0), [5, 6], scheduler=sched, progress=False, out_dir=tmp_path / "d",
           on_diverge="skip")
    assert "failed" not in json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert "status" not in (tmp_path / "d" / "manifest.csv").read_text().splitlines()[0]


@pytest.mark.skipif(not HAS_CPU, reason="the shipped model on the cpu backend")
def test_cli_on_diverge_skip(tmp_path, monkeypatch, capsys):
    """sample --on-diverge skip with the shipped model made to fail on some designs: exit 0, the failed
    designs named on stdout and in metrics.json; the default stops with exit 1 and names the design."""
    import protdiff_fast.train as train
    from protdiff_fast.cli import main

    real_load = train.load_model

    def load_failing(*args, **kwargs):
        model = real_load(*args, **kwargs)
        forward = model.forward

        def failing_forward(x, t, mask):
            eps = forward(x, t, mask)
            rows = (mask.sum(1) == 41).view(-1, 1, 1)  # every design of length 41 breaks
            return torch.where(rows, torch.full_like(eps, float("nan")), eps)

        model.forward = failing_forward
        return model

    monkeypatch.setattr(train, "load_model", load_failing)
    args = ["sample", "--length", "40,41", "--num", "6", "--steps", "10", "--seed", "2", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "stop")]) == 1
    assert "model output is NaN/Inf at t=1024 for design" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "skip"), "--on-diverge", "skip"]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "skip" / "metrics.json").read_text())
    manifest = json.loads((tmp_path / "skip" / "manifest.json").read_text())
    failed = sorted(int(i) for i in manifest["failed"])
    assert failed and all(manifest["failed"][str(i)]["length"] == 41 for i in failed)
    assert all(e["length"] == 40 for e in manifest["designs"].values()) and len(manifest["designs"]) == 6 - len(failed)
    assert f"{len(failed)} design(s) diverged and have no file" in out
    assert [e["index"] for e in metrics["failed"]] == failed and metrics["summary"]["count"] == 6 - len(failed)


@pytest.mark.skipif(not HAS_CPU, reason="the shipped model on the cpu backend")
def test_demo_reports_a_diverged_design_and_shows_the_others(tmp_path, monkeypatch, capsys):
    """The README's main command: a design that diverges is named and left out of the table, the
    others are written and summarised; nothing left prints no table and exits 1."""
    import protdiff_fast.train as train
    from protdiff_fast.cli import main

    real_load = train.load_model
    broken_length = {"n": 41}

    def load_failing(*args, **kwargs):
        model = real_load(*args, **kwargs)
        cfg = model.config
        exact = ExactGaussianEps(NoiseSchedule(cfg.num_timesteps, cfg.beta_start, cfg.beta_end), 1.0)

        def failing_forward(x, t, mask):  # cheap (the demo's 1024 steps), NaN for one length
            rows = (mask.sum(1) == broken_length["n"]).view(-1, 1, 1)
            return torch.where(rows, torch.full_like(x, float("nan")), exact(x, t, mask))

        model.forward = failing_forward
        return model

    monkeypatch.setattr(train, "load_model", load_failing)
    args = ["demo", "--num", "4", "--min-length", "40", "--max-length", "41", "--seed", "1"]
    assert main(args + ["--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    failed = sorted(int(i) for i in manifest["failed"])
    assert failed and len(manifest["designs"]) == 4 - len(failed)
    assert f"{4 - len(failed)} backbones in" in out and f"{len(failed)} design(s) diverged and were left out" in out
    assert "ca_ca_dev" in out
    broken_length["n"] = 40
    args = ["demo", "--num", "2", "--min-length", "40", "--max-length", "40", "--seed", "1"]
    assert main(args + ["--out", str(tmp_path / "e")]) == 1
    out = capsys.readouterr().out
    assert "0 backbones in" in out and "ca_ca_dev" not in out


def _sample_cmd(out, extra=()):
    return [sys.executable, "-m", "protdiff_fast.cli", "sample", "--length", "40..44", "--num-designs", "6",
            "--batch-size", "2", "--steps", "128", "--seed", "5", "--out", str(out), "--no-progress", *extra]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CPU, reason="per-design noise (resume = identical designs) needs the C++ step")
def test_killed_sampling_run_resumes_without_duplicates(tmp_path):
    full = subprocess.run(_sample_cmd(tmp_path / "full"), capture_output=True, text=True)
    assert full.returncode == 0, full.stderr
    proc = subprocess.Popen(_sample_cmd(tmp_path / "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = tmp_path / "killed" / "manifest.json"
    deadline = time.time() + 120
    while not manifest.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = len(json.loads(manifest.read_text())["designs"])
    assert 0 < done_at_kill < 6, "the run finished before it could be killed"
    with pytest.raises(subprocess.CalledProcessError):  # a non-empty folder is never reused silently
        subprocess.run(_sample_cmd(tmp_path / "killed"), check=True, capture_output=True)
    res = subprocess.run(_sample_cmd(tmp_path / "killed", ["--resume"]), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    a = sorted(p.name for p in (tmp_path / "full").glob("design_*.pdb"))
    b = sorted(p.name for p in (tmp_path / "killed").glob("design_*.pdb"))
    assert a == b and len(a) == 6
    for name in a:
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "killed" / name).read_bytes(), name
    one = subprocess.run(_sample_cmd(tmp_path / "one", ["--design-index", "3"]), capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    assert [p.name for p in (tmp_path / "one").glob("design_*.pdb")] == ["design_000003.pdb"]
    assert (tmp_path / "one" / "design_000003.pdb").read_bytes() == (tmp_path / "full" / "design_000003.pdb").read_bytes()
    other = subprocess.run([*_sample_cmd(tmp_path / "killed", ["--resume"])[:-2], "--seed", "6", "--resume"],
                           capture_output=True, text=True)
    assert other.returncode == 2 and "holds a different sampling run" in other.stderr
    assert "seed: 5 in the folder vs 6 now" in other.stderr


class OOMAbove:
    """Wraps a model and raises torch's out-of-memory error for batches larger than `limit`."""

    def __init__(self, inner, limit):
        self.inner, self.limit, self.max_length = inner, limit, 64

    def __call__(self, x, t, mask):
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return self.inner(x, t, mask)


@pytest.mark.skipif(not HAS_CPU, reason="per-design noise (same designs whatever the batching) needs the C++ step")
def test_out_of_memory_halves_the_batch_and_keeps_the_designs(capsys):
    sched = DDPMScheduler(60, backend="cpu")
    inner = ExactGaussianEps(sched.schedule, 1.0)
    lengths = [9, 11, 9, 10, 12, 8, 9, 11, 10, 12]
    want = sample(inner, lengths, batch_size=2, seed=4, scheduler=sched, progress=False)
    got = sample(OOMAbove(inner, 3), lengths, batch_size=8, seed=4, scheduler=sched, progress=False)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    err = capsys.readouterr().err
    assert "out of memory with a batch of 8" in err and "retrying as 4 + 4" in err

    def broken(x, t, mask):
        raise RuntimeError("something else went wrong")

    with pytest.raises(RuntimeError, match="something else"):  # only OOM is retried
        sample(broken, [5, 5], batch_size=2, scheduler=sched, progress=False)
    with pytest.raises(torch.OutOfMemoryError):  # a single design that does not fit is an error
        sample(OOMAbove(inner, 0), [5], batch_size=1, scheduler=sched, progress=False)


def test_automatic_batch_size_is_reported(capsys):
    from protdiff_fast.diffusion.sampler import auto_batch_size
    from protdiff_fast.models import ProtDiff

    model = ProtDiff(hidden_dim=16, edge_dim=8, num_layers=2, num_timesteps=30)
    small, large = auto_batch_size(model, 32, torch.device("cpu")), auto_batch_size(model, 128, torch.device("cpu"))
    assert 1 <= large <= small <= 256
    huge = ProtDiff(hidden_dim=64, edge_dim=64, num_layers=2, num_timesteps=30)
    assert auto_batch_size(huge, 128, torch.device("cpu"), safety=1e-6) == 1
    sched = DDPMScheduler(30)
    sample(ExactGaussianEps(sched.schedule, 1.0), [6, 7], scheduler=sched, progress=False)
    assert "sample: batch size" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CPU, reason="per-design noise (same designs whatever the rank) needs the C++ step")
def test_torchrun_sharded_sampling_matches_one_process(tmp_path):
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run(_sample_cmd(tmp_path / "one"), capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr
    with_progress = [a for a in _sample_cmd(tmp_path / "two")[1:] if a != "--no-progress"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(30500 + os.getpid() % 1000), *with_progress],
                         capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    # one progress line for the whole run: rank 0 counts all 6 designs (the others' from their
    # manifests), rank 1 stays quiet
    lines = [ln for ln in two.stderr.splitlines() if "designs (" in ln]
    assert lines and all(ln.startswith("sampling: ") and "/6 designs" in ln for ln in lines), two.stderr[-2000:]
    assert "[rank 1/2]" not in two.stderr
    names = sorted(p.name for p in (tmp_path / "one").glob("design_*.pdb"))
    assert names == sorted(p.name for p in (tmp_path / "two").glob("design_*.pdb")) and len(names) == 6
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    shards = [json.loads((tmp_path / "two" / f"manifest.rank{r}.json").read_text())["designs"] for r in (0, 1)]
    assert set(shards[0]).isdisjoint(shards[1]) and set(shards[0]) | set(shards[1]) == {str(i) for i in range(6)}
    summary = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert summary["summary"]["count"] == 6  # rank 0's combined summary over every rank's files


# ---- output formats, manifests, trajectories, progress, bad output folders ----------------------------------

def test_formats_manifest_and_trajectory(tmp_path):
    import csv
    import gemmi

    sched = DDPMScheduler(12)
    model = ExactGaussianEps(sched.schedule, 1.0)
    out = sample(model, [8, 11, 9], seed=2, scheduler=sched, out_dir=tmp_path / "d", progress=False, batch_size=2,
                 file_format="cif", compress=True, trajectory_every=5)
    names = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert names == sorted([f"design_{i:06d}.cif.gz" for i in range(3)] + [f"design_{i:06d}.traj.cif.gz" for i in range(3)]
                           + ["manifest.json", "manifest.csv"])
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    from protdiff_fast import __version__
    from protdiff_fast.diffusion.sampler import design_seeds
    from protdiff_fast.metrics import backbone_metrics

    for i, n in enumerate([8, 11, 9]):
        e = manifest["designs"][str(i)]
        assert e["index"] == i and e["length"] == n and e["file"] == f"design_{i:06d}.cif.gz"
        assert e["seed"] == int(design_seeds(2, 3)[i]) and e["version"] == __version__ and e["device"] == "cpu"
        assert e["backend"]["ddpm_step"] in ("cpu", "reference")
        want = backbone_metrics(out[i])
        assert e["metrics"]["rg"] == pytest.approx(want["rg"]) and e["metrics"]["clash_pairs"] == want["clash_pairs"]
        st = gemmi.read_structure(str(tmp_path / "d" / e["file"]))
        got = np.array([[a.pos.x, a.pos.y, a.pos.z] for r in st[0]["A"] for a in r])
        np.testing.assert_allclose(got, out[i], atol=1e-6)
        # x_T, after steps 5 and 10 (t = 7, 2), and x_0 after the last step
        traj = gemmi.read_structure(str(tmp_path / "d" / e["trajectory"]))
        assert len(traj) == 4 and all(m.count_atom_sites() == n for m in traj)
        block = gemmi.cif.read(str(tmp_path / "d" / e["trajectory"])).sole_block()
        assert list(block.find_loop("_protdiff_fast_frame.timestep")) == ["12", "7", "2", "0"]
        last = np.array([[a.pos.x, a.pos.y, a.pos.z] for r in traj[3]["A"] for a in r])
        np.testing.assert_allclose(last, out[i], atol=6e-4)  # the final frame is the design
    assert manifest["run"]["format"] == "cif" and manifest["run"]["gzip"] and manifest["run"]["trajectory_every"] == 5
    with open(tmp_path / "d" / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["index"]) for r in rows] == [0, 1, 2] and rows[1]["length"] == "11"
    assert float(rows[2]["rg"]) == pytest.approx(manifest["designs"]["2"]["metrics"]["rg"])
    # PDB (default) without trajectories: no trajectory files
    sample(model, [8], seed=2, scheduler=sched, out_dir=tmp_path / "p", progress=False)
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["design_000000.pdb", "manifest.csv", "manifest.json"]
    with pytest.raises(ValueError, match="file_format: 'xyz'"):
        sample(model, [8], scheduler=sched, out_dir=tmp_path / "x", progress=False, file_format="xyz")
    with pytest.raises(ValueError, match="trajectory_every must be >= 1"):
        sample(model, [8], scheduler=sched, progress=False, trajectory_every=0)


def test_resume_samples_again_a_finished_design_whose_file_was_deleted(tmp_path, capsys):
    sched = DDPMScheduler(20)
    model = ExactGaussianEps(sched.schedule, 1.0)
    folder = tmp_path / "run"
    sample(model, [6, 7, 8], seed=4, scheduler=sched, out_dir=folder, progress=False)
    before = (folder / "design_000001.pdb").read_bytes()
    (folder / "design_000001.pdb").unlink()
    capsys.readouterr()
    out = sample(model, [6, 7, 8], seed=4, scheduler=sched, out_dir=folder, progress=False, resume=True)
    assert "1 finished design(s) missing or unreadable" in capsys.readouterr().err
    assert (folder / "design_000001.pdb").read_bytes() == before and out[1] is not None
    assert sorted(json.loads((folder / "manifest.json").read_text())["designs"]) == ["0", "1", "2"]
    # a file cut short since (a full disk, an interrupted copy) is not a finished design either
    kept = (folder / "design_000000.pdb").read_bytes()
    (folder / "design_000002.pdb").write_bytes((folder / "design_000002.pdb").read_bytes()[:100])
    out = sample(model, [6, 7, 8], seed=4, scheduler=sched, out_dir=folder, progress=False, resume=True)
    assert "1 finished design(s) missing or unreadable in" in capsys.readouterr().err
    assert len(read_backbones(folder / "design_000002.pdb")[0].ca) == 8 and out[2] is not None
    assert (folder / "design_000000.pdb").read_bytes() == kept and out[0] is None


def test_folder_of_a_different_run_is_refused_unless_overwrite(tmp_path):
    from protdiff_fast.models import ProtDiff

    torch.manual_seed(0)
    net = ProtDiff(hidden_dim=8, edge_dim=4, num_layers=1, num_timesteps=6, max_length=32)
    sched = DDPMScheduler(6)
    folder = tmp_path / "d"
    with torch.no_grad():
        sample(net, [7, 9, 8], seed=1, scheduler=sched, out_dir=folder, progress=False)
    (folder / "notes.txt").write_text("mine")
    with torch.no_grad():
        net.blocks[0].embedding_in.bias.add_(1.0)  # a different model: same shapes, other weights
    cases = [(dict(), r"model: \"sha256:[0-9a-f]+\" in the folder vs \"sha256:[0-9a-f]+\" now"),
             (dict(seed=2), r"seed: 1 in the folder vs 2 now"),
             (dict(file_format="cif"), r"format: \"pdb\" in the folder vs \"cif\" now"),
             (dict(num_inference_steps=3), r"num_inference_steps: 6 in the folder vs 3 now")]
    for kw, match in cases:
        kw = dict(dict(seed=1), **kw)
        with pytest.raises(ValueError, match=r"holds a different sampling run \(manifest.json: .*" + match):
            with torch.no_grad():
                sample(net, [7, 9], scheduler=DDPMScheduler(6), out_dir=folder, progress=False, resume=True, **kw)
    assert sorted(p.name for p in folder.iterdir()) == ["design_000000.pdb", "design_000001.pdb", "design_000002.pdb",
                                                        "manifest.csv", "manifest.json", "notes.txt"]
    with torch.no_grad():
        sample(net, [7, 9], seed=1, scheduler=DDPMScheduler(6), out_dir=folder, progress=False, overwrite=True)
    # the old run's files are gone (design 2 has no counterpart now), unrelated files stay
    assert sorted(p.name for p in folder.iterdir()) == ["design_000000.pdb", "design_000001.pdb", "manifest.csv",
                                                        "manifest.json", "notes.txt"]
    assert sorted(json.loads((folder / "manifest.json").read_text())["designs"]) == ["0", "1"]
    with pytest.raises(ValueError, match="resume and overwrite exclude each other"):
        sample(net, [7], scheduler=sched, out_dir=folder, progress=False, resume=True, overwrite=True)
    # a folder of the user's own files (no manifest): overwrite has no run to replace and replaces nothing
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "design_000000.pdb").write_text("my own design")
    with pytest.raises(FileExistsError, match="holds files but no sampling run"), torch.no_grad():
        sample(net, [7], seed=1, scheduler=DDPMScheduler(6), out_dir=mine, progress=False, overwrite=True)
    assert (mine / "design_000000.pdb").read_text() == "my own design"


def test_a_design_that_overflows_pdb_columns_names_itself_and_the_fix(tmp_path):
    sched = DDPMScheduler(5)
    model = ExactGaussianEps(sched.schedule, 1.0)
    with pytest.raises(ValueError, match=r"design 0 \(seed \d+\): ca: coordinate .* does not fit the PDB format's "
                                         r"%8.3f columns.*0 finished designs .* --format cif"):
        sample(model, [6, 7], scheduler=sched, out_dir=tmp_path / "d", progress=False, batch_size=1,
               scale=1e6)  # designs in units of 1e6 A: far beyond PDB's fixed-width columns
    out = sample(model, [6, 7], scheduler=sched, out_dir=tmp_path / "c", progress=False, scale=1e6,
                 file_format="cif")
    from protdiff_fast.io import read_backbones

    np.testing.assert_allclose(read_backbones(tmp_path / "c" / "design_000001.cif")[0].ca, out[1], atol=0.01)  # 1e-8 relative


def test_design_index_out_of_range_is_refused_before_anything_is_written(tmp_path):
    sched = DDPMScheduler(10)
    model = ExactGaussianEps(sched.schedule, 1.0)
    for bad in (3, -1):
        with pytest.raises(ValueError, match=rf"design_indices: \[{bad}\] outside \[0, 2\] \(this run has 3 designs\)"):
            sample(model, [5, 6, 7], scheduler=sched, out_dir=tmp_path / "d", progress=False, design_indices=[bad])
    assert not (tmp_path / "d").exists()
    from protdiff_fast.cli import main

    assert main(["sample", "--length", "10", "--num", "3", "--design-index", "3", "--out", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "c").exists()


class FailingWriter:
    """Stands in for io.structure._atomic_write: the `fail_at`-th call raises ENOSPC (a full disk)."""

    def __init__(self, real, fail_at):
        self.real, self.fail_at, self.calls = real, fail_at, 0

    def __call__(self, path, write):
        import errno
        import os

        self.calls += 1
        if self.calls == self.fail_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return self.real(path, write)


@pytest.mark.skipif(not HAS_CPU, reason="identical designs after a resume need the per-design noise of the C++ step")
@pytest.mark.parametrize("fail_at", [6, 7, 8])  # a design file of batch 2, its manifest, its CSV
def test_full_disk_fails_cleanly_and_resume_continues(tmp_path, monkeypatch, fail_at):
    import protdiff_fast.io.structure as structure
    from protdiff_fast.diffusion.sampler import OutputError

    sched = DDPMScheduler(15, backend="cpu")
    model = ExactGaussianEps(sched.schedule, 1.0)
    lengths = [9, 10, 11, 12, 13, 14]
    want = sample(model, lengths, seed=3, scheduler=sched, batch_size=2, out_dir=tmp_path / "full", progress=False)
    monkeypatch.setattr(structure, "_atomic_write", FailingWriter(structure._atomic_write, fail_at))
    # each batch of 2 writes: 2 design files, manifest.json, manifest.csv
    with pytest.raises(OutputError, match=r"failed: the disk is full\. (2|4) finished designs are on disk and listed "
                                          r"in .*manifest.json; free space .* --resume"):
        sample(model, lengths, seed=3, scheduler=sched, batch_size=2, out_dir=tmp_path / "run", progress=False)
    monkeypatch.undo()
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())  # still valid JSON
    listed = sorted(int(i) for i in manifest["designs"])
    assert listed == ([0, 1] if fail_at < 8 else [0, 1, 2, 3])
    for i in listed:  # what the manifest lists is complete and final
        name = f"design_{i:06d}.pdb"
        assert (tmp_path / "run" / name).read_bytes() == (tmp_path / "full" / name).read_bytes()
    assert not list((tmp_path / "run").glob(".*.tmp"))  # no temporary files left behind
    sample(model, lengths, seed=3, scheduler=sched, batch_size=2, out_dir=tmp_path / "run", progress=False,
           resume=True)
    names = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "run").iterdir())
    for name in names:
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "run" / name).read_bytes(), name
    assert len(want) == 6


def test_cli_reports_a_full_disk_and_resumes(tmp_path, monkeypatch, capsys):
    import protdiff_fast.io.structure as structure
    from protdiff_fast.cli import main

    args = ["sample", "--length", "40..44", "--num", "4", "--steps", "20", "--batch-size", "2", "--seed", "1",
            "--out", str(tmp_path / "d"), "--no-progress", "--format", "cif", "--gzip"]
    monkeypatch.setattr(structure, "_atomic_write", FailingWriter(structure._atomic_write, 5))
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "protdiff-fast sample: error: writing" in err and "the disk is full" in err and "--resume" in err
    monkeypatch.undo()
    assert main(args) == 2  # the folder holds this run: refused without --resume
    assert "pass --resume to continue it" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0
    metrics = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert metrics["summary"]["count"] == 4
    assert sorted(r["design"] for r in metrics["designs"]) == [f"design_{i:06d}.cif.gz" for i in range(4)]


def test_progress_line_on_a_terminal_and_in_a_log():
    import io

    from protdiff_fast.diffusion.sampler import RunProgress

    class Clock:
        now = 0.0

        def __call__(self):
            return self.now

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    clock, log = Clock(), io.StringIO()
    p = RunProgress(10, 4, stream=log, interval=10.0, clock=clock)
    p.start()
    for batch in range(5):  # 5 batches of 2 designs, 4 steps each, 1 s per step
        for _ in range(4):
            clock.now += 1.0
            p.advance(2)
        p.finished(2)
        if batch == 0:
            assert p.line() == "sampling: 2/10 designs (20%) | 0.5 backbones/s | ETA 16s"
    p.close()
    lines = log.getvalue().splitlines(keepends=True)
    assert "\r" not in log.getvalue() and all(line.endswith("\n") for line in lines)
    # the start, a line per 10 s of wall time (not one per step or batch), and the end
    assert [line.split(" | ")[0] for line in lines] == ["sampling: 0/10 designs (0%)", "sampling: 4/10 designs (40%)",
                                                        "sampling: 8/10 designs (80%)", "sampling: 10/10 designs (100%)"]
    assert lines[-1].strip() == "sampling: 10/10 designs (100%) | 0.5 backbones/s | done in 20s"
    clock, term = Clock(), Terminal()
    p = RunProgress(3, 2, stream=term, clock=clock, prefix="sampling [rank 1/2]")
    p.start()
    for _ in range(3):
        clock.now += 1.0
        p.advance(1)
        clock.now += 1.0
        p.advance(1)
        p.finished(1)
    p.close()
    text = term.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n") and text.count("\r") == 1 + 3 * 2 + 1
    assert text.rstrip().split("\r")[-1].strip() == "sampling [rank 1/2]: 3/3 designs (100%) | 0.5 backbones/s | done in 6s"


def test_strided_step_with_per_sample_seeds_depends_on_each_sample_alone():
    s = DDPMScheduler(1000)
    s.set_timesteps(20)
    g = torch.Generator().manual_seed(4)
    x, eps = torch.randn(3, 6, 3, generator=g, dtype=F64), torch.randn(3, 6, 3, generator=g, dtype=F64)
    t = torch.full((3,), int(s.timesteps[3]))
    seeds = torch.tensor([11, 12, 13])
    batch = s.step(eps, t, x, seed=seeds).prev_sample
    alone = s.step(eps[1:2], t[1:2], x[1:2], seed=seeds[1:2]).prev_sample
    assert torch.equal(batch[1:2], alone), "a sample's draw must not depend on its batch mates"
    # nor on the length its batch is padded to (a batch mate's length): element k of the draw is
    # the same whatever N, so sampling alone and in a batch give the same design
    padded = torch.zeros(3, 11, 3, dtype=F64)
    mask = torch.zeros(3, 11, dtype=torch.bool)
    mask[:, :6] = True
    xp, ep = padded.clone(), padded.clone()
    xp[:, :6], ep[:, :6] = x, eps
    in_padded = s.step(ep, t, xp, mask=mask, seed=seeds).prev_sample
    assert torch.equal(in_padded[:, :6], batch) and float(in_padded[:, 6:].abs().max()) == 0.0
    again = s.step(eps, t, x, seed=seeds).prev_sample
    other = s.step(eps, t, x, seed=seeds + 1).prev_sample
    assert torch.equal(again, batch) and not torch.allclose(other, batch)
    # the noise is standard normal (zero-CoM projected): check its scale over many samples
    big = 2000
    xb, eb = torch.zeros(big, 6, 3, dtype=F64), torch.zeros(big, 6, 3, dtype=F64)
    tb = torch.full((big,), int(s.timesteps[3]))
    prev = s.step(eb, tb, xb, seed=torch.arange(big)).prev_sample
    ab, ab_prev = s.schedule.alpha_bars[tb[0]], s.schedule.alpha_bars[s._prev[tb[0]]]
    sigma = float(s.eta * ((1 - ab_prev) / (1 - ab)).sqrt() * (1 - ab / ab_prev).sqrt())
    var = float((prev / sigma).pow(2).sum() / (big * 5 * 3))  # 5 of 6 degrees of freedom per axis after centring
    assert abs(var - 1) < 0.05


def test_progress_line_counts_designs_finished_elsewhere():
    """Under torchrun rank 0's line adds the designs the other ranks finished (polled, at most every 2 s)."""
    import io

    from protdiff_fast.diffusion.sampler import RunProgress

    now = [0.0]
    polled = []

    def others():
        polled.append(now[0])
        return 2

    bar = RunProgress(6, 10, stream=io.StringIO(), interval=30, clock=lambda: now[0], others=others)
    bar.finished(1)
    now[0] = 10.0
    assert bar.line().startswith("sampling: 3/6 designs (50%)")
    now[0] = 11.0
    bar.line()
    assert polled == [0.0, 10.0], "polled at most every 2 s"


NOISE_BACKENDS = ["reference"] + (["cpu"] if HAS_CPU else []) + ["triton"]


@pytest.mark.parametrize("backend", NOISE_BACKENDS)
@pytest.mark.parametrize("steps", [None, 7])
def test_noise_scale_scales_the_added_noise_only(backend, steps):
    """noise_scale s: x_prev = mean + s sigma z, i.e. the unscaled step given the noise s z; padding
    stays exactly zero and the centre of mass zero; s = 1 is the plain step bit for bit; s = 0 the mean."""
    dtype = torch.float32 if backend == "triton" else F64
    g = torch.Generator().manual_seed(4)
    mask = random_mask(3, 11, generator=g, min_real=2)
    x = remove_center_of_mass_reference(torch.randn(3, 11, 3, generator=g, dtype=F64), mask).to(dtype)
    eps, z = (torch.randn(3, 11, 3, generator=g, dtype=F64).to(dtype) for _ in range(2))
    plain = DDPMScheduler(1000, backend=backend)
    plain.set_timesteps(steps)
    t = torch.tensor([int(plain.timesteps[0]), int(plain.timesteps[3]), 1])
    for s in (0.0, 0.5, 1.0, 1.3):
        scaled = DDPMScheduler(1000, backend=backend, noise_scale=s)
        scaled.set_timesteps(steps)
        got = scaled.step(eps, t, x, mask=mask, noise=z)
        want = plain.step(eps, t, x, mask=mask, noise=z * s)
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        assert_close_rel(got.prev_sample, want.prev_sample, tol, f"prev s={s}")
        assert torch.equal(got.mean, want.mean)
        assert bool((got.prev_sample[~mask] == 0).all())
        com = (got.prev_sample * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        assert float(com.abs().max()) < 10 * tol
        if s == 1.0:
            assert torch.equal(got.prev_sample, plain.step(eps, t, x, mask=mask, noise=z).prev_sample)
        if s == 0.0:
            assert torch.equal(got.prev_sample, got.mean)


def test_noise_scale_is_checked_and_part_of_the_run(tmp_path):
    for bad in (-0.1, 2.5, float("nan"), "1", True):
        with pytest.raises(ValueError, match="noise_scale must lie in"):
            DDPMScheduler(noise_scale=bad)
    assert "noise_scale" not in DDPMScheduler().config  # runs made before the option keep their identity
    assert DDPMScheduler(noise_scale=0.5).config["noise_scale"] == 0.5
    assert DDPMScheduler(noise_scale=np.float32(0.25)).noise_scale == 0.25
    model = ExactGaussianEps(DDPMScheduler(20).schedule, 1.0, max_length=16)
    folder = tmp_path / "d"
    sample(model, [6, 8], seed=1, scheduler=DDPMScheduler(20), out_dir=folder, progress=False, scale=1.0)
    with pytest.raises(ValueError, match=r"holds a different sampling run .*noise_scale"):
        sample(model, [6, 8], seed=1, scheduler=DDPMScheduler(20, noise_scale=0.5), out_dir=folder, progress=False,
               resume=True, scale=1.0)


@pytest.mark.skipif(not HAS_CPU, reason="the shipped model on the cpu backend")
def test_cli_noise_scale(tmp_path):
    from protdiff_fast.cli import main

    out = tmp_path / "n"
    assert main(["sample", "--length", "40", "--num", "1", "--steps", "5", "--noise-scale", "0.5", "--no-progress",
                 "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["run"]["scheduler"]["noise_scale"] == 0.5
    assert main(["sample", "--length", "40", "--num", "1", "--noise-scale", "3", "--out", str(tmp_path / "m")]) == 2


@pytest.mark.skipif(not HAS_CPU, reason="the shipped model on the cpu backend")
def test_sampling_under_autocast_is_close_to_float32_and_part_of_the_run(tmp_path):
    """sample(autocast=torch.bfloat16) with the shipped model: finite designs within bf16 rounding of
    the float32 run (same seeds, 10 strided steps); the folder records it, and a float32 resume of
    that folder is refused, naming autocast; other dtypes are refused."""
    from protdiff_fast.cli import shipped_checkpoint
    from protdiff_fast.train import load_model

    model = load_model(str(shipped_checkpoint()), backend="cpu")
    kw = dict(seed=3, progress=False, num_inference_steps=10, scheduler=DDPMScheduler(1024, backend="cpu"))
    want = sample(model, [48, 60], **kw)
    folder = tmp_path / "bf16"
    got = sample(model, [48, 60], autocast=torch.bfloat16, out_dir=folder, **kw)
    for a, w in zip(got, want):
        assert np.isfinite(a).all() and a.shape == w.shape
        rms = float(np.sqrt(((a - w) ** 2).sum(-1).mean()))
        assert 0 < rms < 0.3, rms  # Angstrom (0.03 measured over all 1024 steps): bf16 rounding, not another sample
    assert json.loads((folder / "manifest.json").read_text())["run"]["autocast"] == "bfloat16"
    with pytest.raises(ValueError, match=r"holds a different sampling run .*autocast"):
        sample(model, [48, 60], out_dir=folder, resume=True, **kw)
    with pytest.raises(ValueError, match="autocast: torch.bfloat16 or torch.float16"):
        sample(model, [48], autocast=torch.float64, **kw)


@pytest.mark.skipif(not HAS_CPU, reason="the shipped model on the cpu backend")
def test_cli_autocast(tmp_path):
    from protdiff_fast.cli import main

    out = tmp_path / "a"
    assert main(["sample", "--length", "40", "--num", "1", "--steps", "5", "--autocast", "bf16", "--no-progress",
                 "--out", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["run"]["autocast"] == "bfloat16"


def test_lengths_below_the_training_range_warn():
    import warnings

    from protdiff_fast.cli import shipped_checkpoint
    from protdiff_fast.train import load_model

    assert load_model(str(shipped_checkpoint()), backend="reference").min_training_length == 40
    sched = DDPMScheduler(20)
    model = ExactGaussianEps(sched.schedule, 1.0, max_length=16)
    model.min_training_length = 10
    with pytest.warns(UserWarning, match=r"lengths: \[6, 8\] are shorter than any chain this model was trained on \(10"):
        sample(model, [6, 12, 8], seed=0, scheduler=sched, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample(model, [10, 12], seed=0, scheduler=sched, progress=False)


def test_default_scheduler_is_the_models_own_and_a_mismatched_one_is_refused():
    """sample(model, ...) without a scheduler samples with the schedule the model was trained with (the
    shipped model: T = 1024, not the scheduler's default 1000); a scheduler that differs is an error."""
    from protdiff_fast.diffusion.sampler import _scheduler_for
    from protdiff_fast.models.protdiff import ProtDiff

    model = ProtDiff(hidden_dim=16, edge_dim=16, num_layers=1, max_length=16, num_timesteps=12, beta_end=0.05,
                     backend="reference")
    own = _scheduler_for(model, None)
    assert own.num_train_timesteps == 12 and own.config["beta_end"] == 0.05
    assert _scheduler_for(model, DDPMScheduler(12, beta_end=0.05)).num_train_timesteps == 12
    for wrong in (DDPMScheduler(), DDPMScheduler(12), DDPMScheduler(12, beta_end=0.05, beta_schedule="cosine")):
        with pytest.raises(ValueError, match="differs from the schedule this model was trained with"):
            sample(model, [5], scheduler=wrong, progress=False, metrics=False)
    out = sample(model, [5, 7], seed=1, progress=False, metrics=False)  # runs all 12 steps of its own schedule
    assert [a.shape for a in out] == [(5, 3), (7, 3)] and all(np.isfinite(a).all() for a in out)


def test_sample_keeps_the_steps_a_given_scheduler_was_set_to():
    """sample(scheduler=s) without num_inference_steps ran all T steps even after s.set_timesteps(K)."""
    sched = DDPMScheduler(100)
    sched.set_timesteps(10)
    model = ExactGaussianEps(sched.schedule, 1.0)
    sample(model, [5], seed=0, scheduler=sched, progress=False)
    assert model.calls == 10 and sched.num_inference_steps == 10
    sample(model, [5], seed=0, scheduler=sched, num_inference_steps=20, progress=False)  # an explicit K wins
    assert model.calls == 30 and sched.num_inference_steps == 20


def test_scheduler_from_model_takes_the_models_schedule_and_refuses_another():
    from protdiff_fast.cli import shipped_checkpoint
    from protdiff_fast.train import load_model

    model = load_model(shipped_checkpoint())
    sched = DDPMScheduler.from_model(model, noise_scale=0.5)
    cfg = model.config
    assert (sched.num_train_timesteps, sched.noise_scale) == (cfg.num_timesteps, 0.5)
    assert sched.config["beta_start"] == cfg.beta_start and sched.config["beta_end"] == cfg.beta_end
    out = sample(model, [41], seed=0, scheduler=sched, num_inference_steps=3, progress=False)
    assert out[0].shape == (41, 3)
    with pytest.raises(ValueError, match=r"from_model: \['num_train_timesteps'\] come from the model's config"):
        DDPMScheduler.from_model(model, num_train_timesteps=1000)
    with pytest.raises(ValueError, match="from_model: Linear has no config"):
        DDPMScheduler.from_model(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("eta, steps", [(0.5, 10), (0.3, None), (0.0, 25)])
def test_ddim_step_at_eta_between_0_and_1_follows_the_paper(eta, steps):
    """DDIM (Song et al. 2021, eq. 12 and 16) written out here, apart from the code: x0 = (x - sqrt(1 - ab) e)
    / sqrt(ab), sigma = eta sqrt((1 - ab') / (1 - ab)) sqrt(1 - ab / ab'), x' = sqrt(ab') x0 +
    sqrt(1 - ab' - sigma^2) e + sigma z. Only eta 0 and 1 ran before (an eta^2 mutant passed)."""
    from protdiff_fast.reference.com import remove_center_of_mass_reference as project

    sched = DDPMScheduler(200, 1e-4, 0.05, eta=eta, backend="reference")
    sched.set_timesteps(steps)
    ts = sched.timesteps.tolist()
    g = torch.Generator().manual_seed(11)
    x = project(torch.randn(3, 9, 3, generator=g, dtype=torch.float64))
    e = project(torch.randn(3, 9, 3, generator=g, dtype=torch.float64))
    z = torch.randn(3, 9, 3, generator=g, dtype=torch.float64)
    ab_table = sched.schedule.alpha_bars.double()
    for t, t_prev in zip(ts, ts[1:]):
        ab, ab_prev = float(ab_table[t]), float(ab_table[t_prev])
        x0 = (x - math.sqrt(1 - ab) * e) / math.sqrt(ab)
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab)) * math.sqrt(1 - ab / ab_prev)
        want = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev - sigma ** 2) * e + sigma * project(z)
        out = sched.step(e, t, x, noise=z)
        assert torch.allclose(out.prev_sample, want, atol=1e-10), (eta, t)
        assert torch.allclose(out.pred_original_sample, x0, atol=1e-10)


def test_a_models_nan_in_padding_is_not_a_design_failure():
    """Padding rows belong to no design: a model that leaves NaN there (an unmasked op) samples the same
    designs, bit for bit, as one that zeroes them; NaN on a real residue still stops the run."""
    sched = DDPMScheduler(20)
    model = ExactGaussianEps(sched.schedule, 1.0, max_length=64)

    def unmasked(x, t, mask):
        return model(x, t, mask).masked_fill(~mask.unsqueeze(-1), float("nan"))

    lengths = [5, 9, 7]  # one padded batch: 4 and 2 padding rows
    want = sample(model, lengths, scheduler=sched, seed=3, progress=False)
    got = sample(unmasked, lengths, scheduler=sched, seed=3, progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(got, want))

    def real_nan(x, t, mask):
        eps = model(x, t, mask)
        if int(t[0]) == 4:
            eps[0, 2, 1] = float("nan")  # a real residue of the first design (length 5)
        return eps

    with pytest.raises(SamplingError, match=r"NaN/Inf at t=4 for design 0 \(length 5"):
        sample(real_nan, lengths, scheduler=sched, seed=3, progress=False, batch_size=3)


def test_cli_eta_runs_ddim_records_it_and_refuses_a_resume_with_another(tmp_path, capsys):
    """`sample --eta 0` is deterministic DDIM after x_T, recorded in the manifest's scheduler config, so a
    resume with another eta is refused naming it; eta outside [0, 1] is a clear error."""
    from protdiff_fast.cli import main
    from protdiff_fast.io import read_backbones

    def run(out, *extra):
        return main(["sample", "--length", "40", "--num", "1", "--steps", "5", "--seed", "1",
                     "--out", str(tmp_path / out), "--no-progress", *extra])

    def ca(out):
        return read_backbones(tmp_path / out / "design_000000.pdb")[0].ca

    assert run("ddim", "--eta", "0") == 0 and run("ancestral") == 0
    assert json.loads((tmp_path / "ddim" / "manifest.json").read_text())["run"]["scheduler"]["eta"] == 0.0
    assert json.loads((tmp_path / "ancestral" / "manifest.json").read_text())["run"]["scheduler"]["eta"] == 1.0
    assert np.abs(ca("ddim") - ca("ancestral")).max() > 0.01  # same x_T, no noise after it: another design
    capsys.readouterr()
    assert run("ddim", "--eta", "1", "--resume") == 2
    assert "holds a different sampling run (manifest.json: scheduler.eta: 0.0 in the folder vs 1.0 now)" in \
        capsys.readouterr().err.replace("\n", " ")
    assert run("bad", "--eta", "1.5") == 2
    assert "eta must be a number in [0, 1], got 1.5" in capsys.readouterr().err


def test_cli_variance_fixed_large_is_recorded_and_refused_with_strided_steps(tmp_path, capsys):
    """`sample --variance fixed_large` runs beta_t as the step's variance (all T steps): recorded in the
    manifest, another design than fixed_small's with the same seed; with --steps below T it is refused,
    naming the option to use."""
    from protdiff_fast.cli import main
    from protdiff_fast.io import read_backbones

    def run(out, *extra):
        return main(["sample", "--length", "40", "--num", "1", "--seed", "3", "--out", str(tmp_path / out),
                     "--no-progress", *extra])

    assert run("large", "--variance", "fixed_large") == 0 and run("small") == 0
    run_info = json.loads((tmp_path / "large" / "manifest.json").read_text())["run"]
    assert run_info["scheduler"]["variance_type"] == "fixed_large" and run_info["num_inference_steps"] == 1024
    large, small = (read_backbones(tmp_path / d / "design_000000.pdb")[0].ca for d in ("large", "small"))
    assert np.isfinite(large).all() and np.abs(large - small).max() > 0.01
    capsys.readouterr()
    assert run("strided", "--variance", "fixed_large", "--steps", "8") == 2
    assert "variance_type='fixed_large' is the full-length ancestral sampler's" in capsys.readouterr().err


def test_design_index_with_overwrite_never_deletes_the_runs_other_designs(tmp_path, capsys):
    """`sample --out RUN --design-index 1 --overwrite` deleted designs 0 and 2 of RUN (--overwrite deletes the
    folder's run): refused when the folder holds designs other than the one asked for."""
    from protdiff_fast.cli import main

    base = ["sample", "--length", "40", "--num", "3", "--steps", "128", "--no-progress", "--out", str(tmp_path / "r")]
    assert main(base) == 0
    files = sorted(p.name for p in (tmp_path / "r").glob("design_*"))
    assert len(files) == 3
    assert main(base + ["--design-index", "1", "--overwrite"]) == 2
    assert "holds other designs of a run ([0, 2])" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "r").glob("design_*")) == files
    one = ["--out", str(tmp_path / "one"), "--design-index", "1"]
    assert main(base[:-2] + one) == 0
    assert main(base[:-2] + one + ["--overwrite", "--seed", "5"]) == 0  # its own folder: overwritten as asked


@pytest.mark.parametrize("steps", [None, 10])
def test_step_takes_diffusers_generator_and_return_dict_positionally(steps):
    """diffusers' step(model_output, timestep, sample, generator=None, return_dict=True): the 4th and 5th
    arguments in their places (a TypeError before: keyword-only); ours stay keyword-only, and a tensor in the
    4th place (a mask or noise given positionally) is refused naming the place, not taken for a generator."""
    s = DDPMScheduler(100)
    s.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 5, 3, generator=g, dtype=F64), torch.randn(2, 5, 3, generator=g, dtype=F64)
    t = int(s.timesteps[1])
    by_place = s.step(eps, t, x, torch.Generator().manual_seed(3))
    by_name = s.step(eps, t, x, generator=torch.Generator().manual_seed(3))
    other = s.step(eps, t, x, torch.Generator().manual_seed(4))
    assert torch.equal(by_place.prev_sample, by_name.prev_sample)
    assert not torch.allclose(by_place.prev_sample, other.prev_sample)  # the generator is used
    tup = s.step(eps, t, x, torch.Generator().manual_seed(3), False)
    assert type(tup) is tuple and torch.equal(tup[0], by_name.prev_sample)
    assert torch.equal(s.step(eps, t, x, None, True, seed=7).prev_sample, s.step(eps, t, x, seed=7).prev_sample)
    mask = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(TypeError, match=r"generator: expected a torch.Generator or None \(the 4th positional"):
        s.step(eps, t, x, mask)
    with pytest.raises(TypeError, match=r"return_dict: expected True or False"):
        s.step(eps, t, x, None, mask)
    with pytest.raises(TypeError):
        s.step(eps, t, x, None, True, mask)  # mask, noise, seed: by keyword only


def test_strided_step_checks_its_seed_as_the_full_step_does():
    """The DDIM branch took int(seed): 1.5, True and "3" ran as seeds 1, 1 and 3; the fused step refuses them."""
    s = DDPMScheduler(100)
    x, eps = torch.randn(2, 5, 3, dtype=F64), torch.randn(2, 5, 3, dtype=F64)
    for steps in (None, 10):
        s.set_timesteps(steps)
        for bad in (1.5, True, "3", torch.tensor([1.0, 2.0])):
            with pytest.raises(TypeError, match="seed: "):
                s.step(eps, 100, x, seed=bad)
        with pytest.raises(ValueError, match=r"seed: expected one seed per sample, shape \(2,\)"):
            s.step(eps, 100, x, seed=torch.tensor([1, 2, 3]))
    s.set_timesteps(10)
    assert torch.equal(s.step(eps, 100, x, seed=np.int64(5)).prev_sample, s.step(eps, 100, x, seed=5).prev_sample)


def test_strided_eta_1_is_the_ancestral_step_of_the_respaced_chain():
    """set_timesteps(K) keeps round(linspace(1, T, K)) (both ends, as improved DDPM's respacing), and at eta = 1
    its step is DDPM's Algorithm 2 on the respaced chain, written out here in DDPM's own form:
    beta' = 1 - ab_t / ab_prev, mu = (x - beta' / sqrt(1 - ab_t) e) / sqrt(1 - beta'), sigma^2 = beta_tilde' =
    (1 - ab_prev) / (1 - ab_t) beta' (and no noise into t = 0). An eta mix-up or the unrespaced beta_t fail it."""
    from protdiff_fast.reference.com import remove_center_of_mass_reference as project

    T, K = 1000, 7
    s = DDPMScheduler(T, backend="reference")
    s.set_timesteps(K)
    assert s.timesteps.tolist() == [1000, 834, 667, 500, 334, 168, 1]  # half-way 167.5 rounds to even
    g = torch.Generator().manual_seed(21)
    mask = random_mask(3, 8, generator=g, min_real=2)
    x = project(torch.randn(3, 8, 3, generator=g, dtype=F64), mask)
    e = torch.randn(3, 8, 3, generator=g, dtype=F64)
    z = torch.randn(3, 8, 3, generator=g, dtype=F64)
    ab_table = s.schedule.alpha_bars
    seq = s.timesteps.tolist() + [0]
    for t, t_prev in zip(seq, seq[1:]):
        ab, ab_prev = float(ab_table[t]), float(ab_table[t_prev])
        beta = 1 - ab / ab_prev
        beta_tilde = (1 - ab_prev) / (1 - ab) * beta
        mu = (x - beta / math.sqrt(1 - ab) * e) / math.sqrt(1 - beta)
        want = project(mu + math.sqrt(beta_tilde) * project(z, mask), mask)
        got = s.step(e, t, x, mask=mask, noise=z)
        assert_close_rel(got.prev_sample, want, 1e-10, f"t={t} -> {t_prev}")
        assert_close_rel(got.mean, project(mu, mask), 1e-10, f"mean t={t}")
    assert beta_tilde == 0.0  # the last step, into the data, adds no noise


@pytest.mark.skipif(not HAS_CPU, reason="per-design noise (same designs whatever the batching) needs the C++ step")
@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                 "tried to allocate 1125899906842624 bytes. Error code 12 (Cannot allocate memory)"),
    MemoryError()])
def test_cpu_out_of_memory_halves_the_batch_too(error, capsys):
    """torch's CPU allocator raises a plain RuntimeError that does not say "out of memory" (torch 2.13, as
    above), and numpy a MemoryError: both are out of memory, retried in halves, not a lost run."""
    sched = DDPMScheduler(20, backend="cpu")
    inner = ExactGaussianEps(sched.schedule, 1.0)

    def cpu_oom_above_2(x, t, mask):
        if x.shape[0] > 2:
            raise error
        return inner(x, t, mask)

    lengths = [9, 11, 9, 10, 12]
    want = sample(inner, lengths, batch_size=2, seed=4, scheduler=sched, progress=False)
    got = sample(cpu_oom_above_2, lengths, batch_size=5, seed=4, scheduler=sched, progress=False)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    assert "out of memory with a batch of 5" in capsys.readouterr().err


def test_lengths_from_a_generator_or_a_tensor_are_read_once():
    """A generator of lengths was checked (consuming it) and then read again: "lengths: nothing to sample";
    an integer tensor was refused (its items are 0-d tensors)."""
    sched = DDPMScheduler(10)
    model = ExactGaussianEps(sched.schedule, 1.0)
    got = sample(model, (n for n in (5, 7)), num_samples=2, scheduler=sched, progress=False, batch_size=4)
    assert [g.shape for g in got] == [(5, 3), (5, 3), (7, 3), (7, 3)]
    from_tensor = sample(model, torch.tensor([5, 7]), num_samples=2, scheduler=sched, progress=False, batch_size=4)
    assert all(np.array_equal(a, b) for a, b in zip(got, from_tensor))
    with pytest.raises(ValueError, match=r"lengths: an integer or a sequence of integers, got \[5, 2.5\]"):
        sample(model, (n for n in (5, 2.5)), scheduler=sched, progress=False)
    with pytest.raises(ValueError, match=r"lengths: an integer or a sequence of integers, got \[5.0\]"):
        sample(model, torch.tensor([5.0]), scheduler=sched, progress=False)


def test_design_indices_and_trajectory_every_must_be_integers(tmp_path):
    """int() took design 1 for 1.7 (and for True); trajectory_every 2.5 kept every 5th step, True every step."""
    sched = DDPMScheduler(10)
    model = ExactGaussianEps(sched.schedule, 1.0)
    for bad in ([1.7], [True], ["1"], "1", []):  # [] returned every design as None, nothing run
        with pytest.raises(ValueError, match="design_indices: "):
            sample(model, [5, 6], design_indices=bad, scheduler=sched, progress=False, batch_size=2)
    one = sample(model, [5, 6], design_indices=1, scheduler=sched, progress=False, batch_size=2)  # a bare int
    assert one[0] is None and one[1].shape == (6, 3)
    assert np.array_equal(one[1], sample(model, [5, 6], design_indices=np.array([1]), scheduler=sched,
                                         progress=False, batch_size=2)[1])
    for bad in (2.5, True, 0):
        with pytest.raises(ValueError, match=r"trajectory_every must be >= 1 \(an integer"):
            sample(model, [5], trajectory_every=bad, scheduler=sched, progress=False, batch_size=1,
                   out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_float64_run_of_a_float32_protdiff_names_the_dtype_option():
    """The model's own message said to convert x_t (which the caller of sample() does not hold)."""
    from protdiff_fast.models import ProtDiff

    model = ProtDiff(hidden_dim=8, edge_dim=4, num_layers=2, max_length=16, num_timesteps=10, backend="reference")
    with pytest.raises(ValueError, match=r"dtype: torch.float64, but the model's weights are torch.float32: pass "
                                         r"dtype=torch.float32"):
        sample(model, [5], dtype=F64, progress=False, batch_size=1)
    got = sample(model.to(F64), [5], dtype=F64, progress=False, batch_size=1)
    assert got[0].shape == (5, 3) and np.isfinite(got[0]).all()


def test_a_loop_written_for_diffusers_runs_unchanged():
    """diffusers' pipeline loop: x_T = randn * init_noise_sigma, model(scale_model_input(x, t), t), step(...,
    generator) per t in timesteps. init_noise_sigma is x_T's scale under this schedule (sqrt(1 - alpha_bar_T)
    ~ 1), scale_model_input leaves x_t as DDPM's model takes it, and the loop equals the same steps taken
    with our own keyword API."""
    s = DDPMScheduler(1000)
    x0 = torch.randn(3, 6, 3, dtype=F64) * 4
    noise = remove_center_of_mass_reference(torch.randn(3, 6, 3, dtype=F64), None)
    x_T = s.add_noise(x0, noise, torch.full((3,), 1000))
    assert s.init_noise_sigma == 1.0
    assert torch.linalg.vector_norm(x_T - s.init_noise_sigma * noise) < 0.05 * torch.linalg.vector_norm(noise)
    s.set_timesteps(20)

    def eps_model(x, t):
        return 0.1 * remove_center_of_mass_reference(x, None)

    def run(diffusers_shaped):
        g = torch.Generator().manual_seed(0)
        x = remove_center_of_mass_reference(torch.randn(3, 6, 3, generator=g, dtype=F64), None) * s.init_noise_sigma
        for t in s.timesteps:
            if diffusers_shaped:
                model_input = s.scale_model_input(x, t)
                assert model_input is x
                x = s.step(eps_model(model_input, t), t, x, g, False)[0]
            else:
                x = s.step(eps_model(x, t), int(t), x, generator=g).prev_sample
        return x

    a, b = run(True), run(False)
    assert torch.isfinite(a).all() and torch.equal(a, b)
    assert torch.allclose(a.mean(1), torch.zeros(3, 3, dtype=F64), atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Gaps found by mutation testing: each test below fails on a small change of the code it names
# ----------------------------------------------------------------------------------------------
def test_strided_step_keeps_padding_zero_in_every_output():
    """The DDIM branch's pred_original_sample, prev_sample and mean are exactly zero on padding rows, as the
    fused step's are, also where the model's output there is not (x0 = (0 - sqrt(1 - ab) eps) / sqrt(ab))."""
    s = DDPMScheduler(1000, eta=0.5)
    s.set_timesteps(10)
    g = torch.Generator().manual_seed(9)
    mask = random_mask(3, 10, generator=g, min_real=2)
    mask[0, -1] = False  # at least one padding row
    x = remove_center_of_mass_reference(torch.randn(3, 10, 3, generator=g, dtype=F64), mask)
    eps, z = torch.randn(3, 10, 3, generator=g, dtype=F64), torch.randn(3, 10, 3, generator=g, dtype=F64)
    out = s.step(eps, int(s.timesteps[2]), x, mask=mask, noise=z)
    for name in ("prev_sample", "pred_original_sample", "mean"):
        assert float(getattr(out, name)[~mask].abs().max()) == 0.0, name
    ab = float(s.schedule.alpha_bars[int(s.timesteps[2])])
    want_x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    assert_close_rel(out.pred_original_sample[mask], want_x0[mask], 1e-12, "x0 on real rows")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_strided_step_in_low_precision_returns_the_float32_step_rounded(dtype):
    """bf16 / fp16 are stepped in float32 and the outputs come back in the input's dtype, the float32 step's
    results rounded (not float32 tensors handed to a bf16 loop)."""
    s = DDPMScheduler(1000, eta=0.5)
    s.set_timesteps(20)
    g = torch.Generator().manual_seed(2)
    mask = random_mask(2, 7, generator=g, min_real=3)
    x, eps, z = (torch.randn(2, 7, 3, generator=g).to(dtype) for _ in range(3))
    t = int(s.timesteps[5])
    low = s.step(eps, t, x, mask=mask, noise=z)
    full = s.step(eps.float(), t, x.float(), mask=mask, noise=z.float())
    for name in ("prev_sample", "pred_original_sample", "mean"):
        got, want = getattr(low, name), getattr(full, name).to(dtype)
        assert got.dtype == dtype and torch.equal(got, want), name


@pytest.mark.skipif(not HAS_CPU, reason="the strided step's per-sample stream is the C++ step's")
def test_strided_per_sample_noise_is_keyed_by_the_step_too():
    """With per-sample seeds the DDIM branch's z comes from (seed_b, t_b): every step of the chain draws new
    noise (a draw keyed by the seed alone adds the same z at every step: sum of sigma_t z, not a random walk)."""
    s = DDPMScheduler(1000)
    s.set_timesteps(20)
    zero = torch.zeros(2, 6, 3, dtype=F64)
    seeds = torch.tensor([3, 4])

    def z_at(k):  # x_t = eps_hat = 0: prev = sigma P z
        t = torch.full((2,), int(s.timesteps[k]))
        ab, ab_prev = s.schedule.alpha_bars[t[0]], s.schedule.alpha_bars[s._prev[t[0]]]
        sigma = float(((1 - ab_prev) / (1 - ab)).sqrt() * (1 - ab / ab_prev).sqrt())
        return s.step(zero, t, zero, seed=seeds).prev_sample / sigma

    a, b = z_at(3), z_at(4)
    assert float(a.norm()) > 1 and float(b.norm()) > 1
    for k in range(2):
        assert float((a[k] - b[k]).abs().max()) > 0.1, f"sample {k}: the same noise at two steps"
    assert torch.equal(z_at(3), a)


@pytest.mark.parametrize("backend", ["reference"] + (["cpu"] if HAS_CPU else []))
def test_full_length_step_uses_the_schedulers_variance_type(backend):
    """variance_type='fixed_large' reaches the fused step (sigma^2 = beta_t, not beta_tilde_t; 1.9x apart at t = 3)."""
    g = torch.Generator().manual_seed(6)
    mask = random_mask(3, 8, generator=g, min_real=2)
    x = remove_center_of_mass_reference(torch.randn(3, 8, 3, generator=g, dtype=F64), mask)
    eps, noise = torch.randn(3, 8, 3, generator=g, dtype=F64), torch.randn(3, 8, 3, generator=g, dtype=F64)
    t = torch.tensor([3, 50, 1000])
    for variance in ("fixed_large", "fixed_small"):
        s = DDPMScheduler(1000, variance_type=variance, backend=backend)
        got = s.step(eps, t, x, mask=mask, noise=noise)
        want = ddpm_step(s.schedule, x, eps, t, mask=mask, noise=noise, variance=variance, backend="reference")
        assert_close_rel(got.prev_sample, want.prev_sample, 1e-12, variance)


def test_sampler_batches_designs_of_similar_length():
    """Designs are sorted by length before they are cut into batches: lengths [5, 40, 6, 41] in batches of 2 pad
    to 6 and 41 (not 40 and 41), and every design comes back in its own place with its own length."""
    seen = []

    def model(x_t, t, mask):
        seen.append((x_t.shape[1], tuple(mask.sum(1).tolist())))
        return torch.zeros_like(x_t)

    lengths = [5, 40, 6, 41]
    out = sample(model, lengths, batch_size=2, seed=0, scheduler=DDPMScheduler(3), progress=False)
    assert [o.shape for o in out] == [(n, 3) for n in lengths]
    assert sorted(set(seen)) == [(6, (5, 6)), (41, (40, 41))]


def test_reference_step_noise_of_a_run_depends_on_its_seed():
    """Where the step noise comes from one generator per batch (the reference step at full length), that
    generator is seeded from the run's design seeds: two runs with other seeds draw other step noise, not only
    another x_T. With eps_hat = 0 every step is x_{t-1} = x_t / sqrt(alpha_t) + sigma_t z_t (projected), so
    x_0 - x_T / sqrt(alpha_bar_T) is the steps' noise alone."""
    from protdiff_fast.diffusion.sampler import design_seeds, initial_noise

    sched = DDPMScheduler(4, beta_start=0.1, beta_end=0.3, backend="reference")

    def zero_eps(x_t, t, mask):
        return torch.zeros_like(x_t)

    step_noise = []
    for seed in (1, 2):
        out = sample(zero_eps, [7], seed=seed, scheduler=sched, progress=False, scale=1.0, dtype=F64)[0]
        x_T = initial_noise(design_seeds(seed, 1).tolist(), 7, torch.ones(1, 7, dtype=torch.bool), F64, "cpu")[0]
        step_noise.append(torch.from_numpy(out) - x_T / float(sched.schedule.alpha_bars[4]).__pow__(0.5))
    assert float(step_noise[0].norm()) > 0.3 and float(step_noise[1].norm()) > 0.3
    assert float((step_noise[0] - step_noise[1]).abs().max()) > 0.1, "another seed, the same step noise"


def test_num_samples_repeats_each_length_in_a_row():
    """lengths [5, 6] with num_samples 2 are designs 5, 5, 6, 6 (indexed 0..3), as documented, not 5, 6, 5, 6."""
    sched = DDPMScheduler(3)
    out = sample(ExactGaussianEps(sched.schedule, 1.0), [5, 6], num_samples=2, seed=0, scheduler=sched,
                 progress=False)
    assert [o.shape[0] for o in out] == [5, 5, 6, 6]


def test_initial_noise_is_zero_com_per_design_and_independent_of_the_batch():
    """x_T = P z over each design's real nodes (the model's first input and trajectory frame 0; an uncentred x_T
    passed every sampling test, whose models are translation-invariant), padding zero, a design's draw its own."""
    from protdiff_fast.diffusion.sampler import design_seeds, initial_noise

    seeds = design_seeds(7, 3).tolist()
    mask = torch.zeros(3, 9, dtype=torch.bool)
    for k, n in enumerate((4, 9, 6)):
        mask[k, :n] = True
    x = initial_noise(seeds, 9, mask, F64, "cpu")
    assert float(x[~mask].abs().max()) == 0.0
    com = (x * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    assert float(com.abs().max()) < 1e-14 and float(x[mask].std()) > 0.5
    alone = initial_noise(seeds[2:], 6, mask[2:, :6], F64, "cpu")
    assert_close_rel(alone[0], x[2, :6], 1e-14, "the same design alone (the centroid summed over another length)")


# gaps found by mutation testing (2)
class NaNForLength(ExactGaussianEps):
    """The exact predictor, except NaN for the designs of one length from ``t_fail`` down."""

    def __init__(self, schedule, length, t_fail):
        super().__init__(schedule, 1.0)
        self.length, self.t_fail = length, t_fail

    def __call__(self, x_t, t, mask):
        eps = super().__call__(x_t, t, mask)
        rows = ((mask.sum(1) == self.length) & (t <= self.t_fail)).view(-1, 1, 1)
        return torch.where(rows, torch.full_like(eps, float("nan")), eps)


def test_a_diverged_design_is_named_by_its_index_length_and_seed_not_its_batch_row():
    """Sorted by length, design 2 (length 9) is row 1 of its batch and design 1 row 0: the error names design 2
    with its own length and seed (naming the batch row, 'design 1 (length 6, ...)', passed every test, whose
    failing designs sat in rows equal to their indices or were matched by a pattern)."""
    from protdiff_fast.diffusion.sampler import design_seeds

    sched = DDPMScheduler(20)
    lengths = [12, 6, 9]
    seed_of_2 = int(design_seeds(4, 3)[2])
    with pytest.raises(SamplingError, match=rf"model output is NaN/Inf at t=15 for design 2 \(length 9, seed "
                                            rf"{seed_of_2}\)"):
        sample(NaNForLength(sched.schedule, 9, 15), lengths, seed=4, scheduler=sched, batch_size=3, progress=False)


def test_a_set_aside_design_is_recorded_with_its_own_seed(tmp_path):
    """on_diverge='skip': the manifest's failed entry of design 2 (row 1 of its batch) carries design 2's own seed
    and step (an entry with design 0's seed passed every test)."""
    from protdiff_fast.diffusion.sampler import design_seeds, read_manifests

    sched = DDPMScheduler(20)
    lengths = [12, 6, 9]
    seeds = design_seeds(4, 3)
    sample(NaNForLength(sched.schedule, 9, 15), lengths, seed=4, scheduler=sched, batch_size=3, progress=False,
           out_dir=tmp_path / "run", on_diverge="skip")
    failed = read_manifests(tmp_path / "run", "failed")
    assert list(failed) == [2] and failed[2]["seed"] == int(seeds[2]) and failed[2]["t"] == 15, failed
    assert sorted(read_manifests(tmp_path / "run")) == [0, 1]


def test_a_set_aside_design_is_held_at_its_x_T_for_the_rest_of_the_batch():
    """on_diverge='skip': after design 2's model output goes NaN at t = 15, its row is held at its x_T (finite),
    so the model is never handed the NaN sample again and the batch stays finite; letting the row run on
    passed every test (its file is never written)."""
    sched = DDPMScheduler(20)
    inner = NaNForLength(sched.schedule, 9, 15)
    seen = []

    def spy(x_t, t, mask):
        row = int((mask.sum(1) == 9).nonzero()[0])
        seen.append((int(t[row]), x_t[row].clone()))
        return inner(x_t, t, mask)

    out = sample(spy, [12, 6, 9], seed=4, scheduler=sched, batch_size=3, progress=False, on_diverge="skip")
    assert out[2] is None and out[0] is not None and out[1] is not None
    x_T = seen[0][1]
    after = [(t, x) for t, x in seen if t < 15]
    assert [t for t, _ in after] == list(range(14, 0, -1))
    for t, x in after:
        assert torch.equal(x, x_T), f"t={t}: the set-aside row is not its x_T"


def test_resume_drops_the_manifest_entry_of_a_design_whose_file_is_gone(tmp_path, capsys):
    """A design whose file was deleted is no longer finished: when a resume samples other designs (design_indices),
    the rewritten manifest no longer lists it (keeping the stale entry passed every test, where the deleted design
    was sampled again in the same run and its new entry replaced the old)."""
    from protdiff_fast.diffusion.sampler import read_manifests

    sched = DDPMScheduler(10)
    model = ExactGaussianEps(sched.schedule, 1.0)
    folder = tmp_path / "run"
    kw = dict(seed=2, scheduler=sched, progress=False, out_dir=folder, metrics=False)
    sample(model, [5, 6, 7], design_indices=[0, 1], **kw)
    assert sorted(read_manifests(folder)) == [0, 1]
    (folder / read_manifests(folder)[0]["file"]).unlink()
    sample(model, [5, 6, 7], design_indices=[2], resume=True, **kw)
    assert sorted(read_manifests(folder)) == [1, 2]
