"""The C++ DDPM step: against the reference with explicit noise, its Philox noise (known answers,
statistics, reproducibility per sample seed), and exact Gaussian sampling through it."""
import math

import numpy as np
import pytest
import torch

from helpers import assert_close_rel, random_mask, rel_err
from protdiff_fast import backends, ddpm_step
from protdiff_fast.diffusion import NoiseSchedule
from protdiff_fast.reference.com import remove_center_of_mass_reference
from test_reference_ddpm import analytic_output_variance, covariance_matches, exact_eps

_C = backends.cpu_extension()
pytestmark = pytest.mark.skipif(_C is None, reason="C++ extension not built (test_cpu_extension fails for that)")
F64 = torch.float64


def test_philox_known_answers():
    # Random123's published Philox4x32-10 test vectors
    assert _C.philox4x32([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert _C.philox4x32([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert _C.philox4x32([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]) == \
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def _inputs(B, N, dtype=F64, seed=0, min_real=1):
    g = torch.Generator().manual_seed(seed)
    mask = random_mask(B, N, generator=g, min_real=min_real)
    x = remove_center_of_mass_reference(torch.randn(B, N, 3, generator=g, dtype=F64), mask).to(dtype)
    eps = torch.randn(B, N, 3, generator=g, dtype=F64).to(dtype)
    noise = torch.randn(B, N, 3, generator=g, dtype=F64).to(dtype)
    t = torch.randint(1, 1001, (B,), generator=g)
    t[0] = 1  # the last step: no noise
    return x, eps, noise, t, mask


@pytest.mark.parametrize("N", [1, 2, 7, 33, 100])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_cpu_step_matches_reference_with_explicit_noise(N, variance, dtype):
    s = NoiseSchedule(1000)
    x, eps, noise, t, mask = _inputs(5, N, F64, seed=N)
    want = ddpm_step(s, x, eps, t, mask=mask, noise=noise, variance=variance, backend="reference")
    got = ddpm_step(s, x.to(dtype), eps.to(dtype), t, mask=mask, noise=noise.to(dtype), variance=variance,
                    backend="cpu")
    low = ddpm_step(s, x.to(dtype), eps.to(dtype), t, mask=mask, noise=noise.to(dtype), variance=variance,
                    backend="reference")
    for name in ("prev_sample", "mean", "pred_original_sample"):
        a, w, r = getattr(got, name), getattr(want, name), getattr(low, name)
        assert a.dtype == dtype
        if dtype == F64:
            tol = 1e-12
        else:
            tol = 2 * float((r.double() - w).norm() / w.norm().clamp_min(1e-300)) + torch.finfo(dtype).eps
        assert_close_rel(a, w, tol, f"{name} {dtype}")
        assert float(a[~mask].abs().max() if (~mask).any() else 0) == 0.0, "padding must be exactly zero"


def test_cpu_step_noise_statistics_and_projection():
    s = NoiseSchedule(1000)
    B, N = 400, 50
    mask = random_mask(B, N, min_real=10)
    zero = torch.zeros(B, N, 3, dtype=F64)
    t = torch.full((B,), 500)
    out = ddpm_step(s, zero, zero, t, mask=mask, seed=123, variance="fixed_large", backend="cpu")
    sigma = math.sqrt(float(s.betas[500]))
    z = out.prev_sample / sigma  # = P z'
    keep = mask.unsqueeze(-1)
    assert float(z[~mask].abs().max()) == 0.0
    com = (z * keep).sum(1) / keep.sum(1)
    assert float(com.abs().max()) < 1e-12, "noise must have zero centre of mass per sample"
    n_real = mask.sum(1, keepdim=True).unsqueeze(-1).double()
    # per real coordinate, P z' has variance (1 - 1/n): rescale to unit variance and test moments
    unit = (z * torch.sqrt(n_real / (n_real - 1)))[mask]
    M = unit.numel()
    assert abs(float(unit.mean())) < 5 / math.sqrt(M)
    assert abs(float(unit.var()) - 1) < 5 * math.sqrt(2 / M)
    # the raw draw: standard normal moments, including the tails
    raw = torch.empty(64, 4096, dtype=F64)
    _C.philox_normal(np.arange(64, dtype=np.uint64), np.full(64, 7, np.int64), raw.numpy())
    assert abs(float(raw.mean())) < 5 / math.sqrt(raw.numel())
    assert abs(float(raw.var()) - 1) < 5 * math.sqrt(2 / raw.numel())
    assert abs(float((raw.abs() > 1.96).double().mean()) - 0.05) < 5 * math.sqrt(0.05 * 0.95 / raw.numel())
    assert abs(float((raw ** 3).mean())) < 5 * math.sqrt(15 / raw.numel())


def test_cpu_step_noise_is_reproducible_per_sample_seed():
    s = NoiseSchedule(1000)
    x, eps, _, t, mask = _inputs(6, 21, torch.float32, seed=3, min_real=3)  # n = 1 has no noise
    t = t.clamp(min=2)
    a = ddpm_step(s, x, eps, t, mask=mask, seed=42, backend="cpu").prev_sample
    b = ddpm_step(s, x, eps, t, mask=mask, seed=42, backend="cpu").prev_sample
    c = ddpm_step(s, x, eps, t, mask=mask, seed=43, backend="cpu").prev_sample
    assert torch.equal(a, b)
    assert all(not torch.equal(a[k], c[k]) for k in range(6)), "another seed must change every sample"
    # per-sample seeds: a sample's noise depends on its own seed and t only, not on its batch
    seeds = torch.tensor([11, 22, 33, 44, 55, 66])
    full = ddpm_step(s, x, eps, t, mask=mask, seed=seeds, backend="cpu").prev_sample
    for k in (0, 3, 5):
        alone = ddpm_step(s, x[k:k + 1], eps[k:k + 1], t[k:k + 1], mask=mask[k:k + 1], seed=seeds[k:k + 1],
                          backend="cpu").prev_sample
        assert torch.equal(alone[0], full[k])
    # and the same for any thread count
    before = _C.max_threads()
    try:
        _C.set_num_threads(1)
        one = ddpm_step(s, x, eps, t, mask=mask, seed=seeds, backend="cpu").prev_sample
    finally:
        _C.set_num_threads(before)
    assert torch.equal(one, full)
    # different steps draw different noise
    other_t = ddpm_step(s, x, eps, t + 1, mask=mask, seed=seeds, backend="cpu")
    ref_t = ddpm_step(s, x, eps, t + 1, mask=mask, noise=torch.zeros_like(x), backend="cpu")
    same_t = ddpm_step(s, x, eps, t, mask=mask, noise=torch.zeros_like(x), backend="cpu")
    z_t = (full - same_t.prev_sample)
    z_t1 = (other_t.prev_sample - ref_t.prev_sample)
    assert not torch.allclose(z_t / z_t.norm(), z_t1 / z_t1.norm())


@pytest.mark.slow
def test_exact_gaussian_sampling_through_the_cpu_step():
    s, data_var, n, M = NoiseSchedule(1000), 4.0, 6, 3000
    predict = exact_eps(s, data_var)
    x = remove_center_of_mass_reference(torch.randn(M, n, 3, dtype=F64, generator=torch.Generator().manual_seed(0)))
    seeds = torch.arange(M)
    for t in range(1000, 0, -1):
        tt = torch.full((M,), t)
        x = ddpm_step(s, x, predict(x, tt), tt, seed=seeds, backend="cpu").prev_sample
    tol = 6 * math.sqrt(2 / (3 * M))
    ok, err = covariance_matches(x, analytic_output_variance(s, data_var, "fixed_small"), n, tol)
    assert ok, f"covariance off by {err:.3f} (tol {tol:.3f})"


def test_cpu_step_bad_input():
    s = NoiseSchedule(100)
    x, eps, noise, t, mask = _inputs(3, 5, seed=1)
    with pytest.raises(ValueError, match=r"t: timesteps must lie in \[1, 100\]"):
        ddpm_step(s, x, eps, t, mask=mask, backend="cpu")
    t = t.clamp(max=100)
    bad = x.clone()
    bad[1, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="x_t or eps_hat: contains NaN or Inf in sample 1"):
        ddpm_step(s, bad, eps, t, mask=mask, backend="cpu")
    bad_eps = eps.clone()
    bad_eps[2, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="contains NaN or Inf in sample 2"):
        ddpm_step(s, x, bad_eps, t, mask=mask, seed=0, backend="cpu")
    with pytest.raises(ValueError, match=r"seed: expected one seed per sample, shape \(3,\)"):
        ddpm_step(s, x, eps, t, mask=mask, seed=torch.tensor([1, 2]), backend="cpu")
    with pytest.raises(ValueError, match="no real nodes"):
        m = mask.clone()
        m[2] = False
        ddpm_step(s, x, eps, t, mask=m, seed=1, backend="cpu")


def test_philox_normals_are_box_muller_of_the_philox_stream():
    """The in-kernel normals (polynomial log and sincos, vectorized) against float64 Box-Muller
    of the same Philox4x32-10 words (from the known-answer-tested block function)."""
    seeds, t, per = np.array([0, 7, 2 ** 40 + 3], dtype=np.uint64), np.array([1, 500, 1024], np.int64), 1030
    got = np.zeros((3, per), np.float64)
    _C.philox_normal(seeds, t, got)
    for b in range(3):
        key = [int(seeds[b]) & 0xFFFFFFFF, int(seeds[b]) >> 32]
        want = []
        for block in range((per + 3) // 4):
            words = _C.philox4x32([block & 0xFFFFFFFF, block >> 32, int(t[b]) & 0xFFFFFFFF, int(t[b]) >> 32], key)
            u = [((w >> 8) + 0.5) * 2.0 ** -24 for w in words]
            for u1, u2 in ((u[0], u[1]), (u[2], u[3])):
                r = math.sqrt(-2 * math.log(u1))
                want += [r * math.cos(2 * math.pi * u2), r * math.sin(2 * math.pi * u2)]
        want = np.array(want[:per])
        assert np.abs(got[b] - want).max() < 5e-6 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_cached_coefficient_table_equals_step_coefficients(variance, kind):
    """The cpu step gathers its per-sample coefficients from a table cached on the schedule: the
    same float64 bits as step_coefficients computes for those t, for every t (also t = 1, sigma 0)."""
    from protdiff_fast.ops.ddpm_cpu import _COEFFICIENTS, _coefficient_table
    from protdiff_fast.reference.ddpm import step_coefficients

    schedule = NoiseSchedule(200, kind=kind)
    t = torch.cat([torch.arange(1, 201), torch.randint(1, 201, (57,))])
    expected = step_coefficients(schedule, t, variance)
    table = _coefficient_table(schedule, variance)
    assert table is _coefficient_table(schedule, variance)  # computed once per schedule and variance
    for row, name in zip(table, _COEFFICIENTS):
        assert np.array_equal(row[t.numpy()], expected[name].numpy()), name
    assert table[_COEFFICIENTS.index("sigma"), 1] == 0.0


def step_gradients(backend, s, x, eps, noise, t, mask, variance, dtype):
    """d/d(x_t, eps_hat, noise) of <prev, g1> + <x0, g2> + <mean, g3> for fixed random g's."""
    leaves = [v.detach().to(dtype).requires_grad_(True) for v in (x, eps, noise)]
    out = ddpm_step(s, *leaves[:2], t, mask=mask, noise=leaves[2], variance=variance, backend=backend)
    g = torch.Generator().manual_seed(7)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=F64)).sum() for o in out)
    loss.backward()
    return [v.grad for v in leaves]


def check_fused_step_gradients(backend, N, variance, dtype):
    """A fused step's gradients against the float64 reference step's (a low precision within 2x the
    reference's own error in that precision); they once were silently cut at x_t and eps_hat."""
    s = NoiseSchedule(1000)
    x, eps, noise, t, mask = _inputs(4, N, F64, seed=100 + N)
    want = step_gradients("reference", s, x, eps, noise, t, mask, variance, F64)
    got = step_gradients(backend, s, x, eps, noise, t, mask, variance, dtype)
    low = step_gradients("reference", s, x, eps, noise, t, mask, variance, dtype)
    for name, a, w, r in zip(("x_t", "eps_hat", "noise"), got, want, low):
        assert a is not None and a.dtype == dtype, name
        tol = 1e-12 if dtype == F64 else 2 * rel_err(r, w) + torch.finfo(dtype).eps
        assert_close_rel(a, w, tol, f"grad {name} {dtype}")
        assert float(a[~mask].abs().max() if (~mask).any() else 0) == 0.0, "padding gets no gradient"


@pytest.mark.parametrize("N", [1, 7, 33])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_cpu_step_gradients_match_reference(N, variance, dtype):
    check_fused_step_gradients("cpu", N, variance, dtype)


def test_cpu_step_gradcheck_and_no_graph_without_grad():
    s = NoiseSchedule(50)
    x, eps, noise, t, mask = _inputs(2, 5, F64, seed=3)
    t = torch.tensor([1, 37])

    def f(a, b, c):
        return tuple(ddpm_step(s, a, b, t, mask=mask, noise=c, backend="cpu"))

    assert torch.autograd.gradcheck(f, tuple(v.clone().requires_grad_(True) for v in (x, eps, noise)))
    with torch.no_grad():
        out = ddpm_step(s, x.requires_grad_(True), eps, t, mask=mask, noise=noise, backend="cpu")
    assert out.prev_sample.grad_fn is None


# gaps found by mutation testing
def test_cpu_step_on_one_schedule_follows_each_variance():
    """The coefficient table is cached on the schedule per variance: a fixed_large step after a fixed_small one
    on the same schedule (and back) uses beta_t, not the cached beta_tilde's sigma (a cache keyed without the
    variance passed every test, each of which built a fresh schedule)."""
    s = NoiseSchedule(1000)
    x, eps, noise, t, mask = _inputs(4, 9, F64, seed=7, min_real=3)
    t = torch.tensor([3, 40, 600, 1000])  # beta_tilde and beta differ most at small t (1.9x at t = 3)
    for variance in ("fixed_small", "fixed_large", "fixed_small"):
        got = ddpm_step(s, x, eps, t, mask=mask, noise=noise, variance=variance, backend="cpu")
        want = ddpm_step(s, x, eps, t, mask=mask, noise=noise, variance=variance, backend="reference")
        assert_close_rel(got.prev_sample, want.prev_sample, 1e-12, variance)


def test_cpu_step_draws_from_the_generator_and_gives_each_sample_its_own_noise():
    """Without seed or noise the step's key comes from ``generator`` (a fixed key ignored it: every call drew
    the same noise); one int seed gives every sample of the batch its own stream."""
    s = NoiseSchedule(1000)
    B, N = 4, 8
    zero = torch.zeros(B, N, 3, dtype=F64)
    t = torch.full((B,), 300)

    def draw(**kw):
        return ddpm_step(s, zero, zero, t, backend="cpu", **kw).prev_sample

    a, b = draw(generator=torch.Generator().manual_seed(1)), draw(generator=torch.Generator().manual_seed(1))
    c = draw(generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and float((a - c).abs().max()) > 0.01
    assert float(draw().sub(draw()).abs().max()) > 0.01, "no seed, no generator: a fresh draw each call"
    one = draw(seed=5)
    for i in range(B):
        for j in range(i):
            assert float((one[i] - one[j]).abs().max()) > 0.01, f"samples {i} and {j} drew the same noise"


# gaps found by mutation testing (2)
def test_philox_normals_in_the_far_tail_follow_the_open_uniform():
    """The tail of the in-kernel normals (radius > 4.1, u1 < 2e-4, ~40 pairs of 400k normals) against float64
    Box-Muller of the same Philox words, u = ((w >> 8) + 0.5) 2^-24: there a small offset of u (u = (w >> 8)
    2^-24, which reaches u = 0 and a finite -88 'log' once in 2^24 pairs) moves the radius by ~0.5 / (k r) and is
    seen; the 1030 normals of the Box-Muller test above held no such pair."""
    per, seed, t = 400_000, 2 ** 33 + 17, 321
    got = np.zeros((1, per), np.float64)
    _C.philox_normal(np.array([seed], np.uint64), np.array([t], np.int64), got)
    pairs = got[0].reshape(-1, 2)
    radius = np.hypot(pairs[:, 0], pairs[:, 1])
    tail = np.flatnonzero(radius > 4.1)
    assert 15 <= len(tail) <= 80, len(tail)  # ~ 200k * exp(-4.1^2 / 2) = 44
    key = [seed & 0xFFFFFFFF, seed >> 32]
    for p in tail:
        block, half = divmod(int(p), 2)
        words = _C.philox4x32([block & 0xFFFFFFFF, block >> 32, t, 0], key)[2 * half:2 * half + 2]
        u1, u2 = (((w >> 8) + 0.5) * 2.0 ** -24 for w in words)
        r = math.sqrt(-2 * math.log(u1))
        want = np.array([r * math.cos(2 * math.pi * u2), r * math.sin(2 * math.pi * u2)])
        assert np.abs(pairs[p] - want).max() < 2e-6 * r, (p, pairs[p], want)


def test_one_int_seed_gives_splitmix64_of_the_seed_and_sample_index():
    """per_sample_seeds(seed, B)[b] = SplitMix64(seed * 0x100000001B3 + b) (mod 2^64), SplitMix64 checked against
    its published first output for state 0; without the finalizer (seed * P + b, every sample still distinct)
    every test passed, and a run's designs changed."""
    from protdiff_fast.ops.ddpm_cpu import per_sample_seeds, splitmix64

    assert int(splitmix64(np.array([0], np.uint64))[0]) == 0xE220A8397B1DCDAF

    def mix(z):
        m = (1 << 64) - 1
        z = (z + 0x9E3779B97F4A7C15) & m
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        return z ^ (z >> 31)

    for seed in (0, 5, 2 ** 40 + 7, -3):
        got = per_sample_seeds(seed, 4)
        want = [mix(((seed & ((1 << 64) - 1)) * 0x100000001B3 + b) & ((1 << 64) - 1)) for b in range(4)]
        assert [int(v) for v in got] == want, seed
