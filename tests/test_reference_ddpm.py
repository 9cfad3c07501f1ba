"""DDPM reference: schedule tables, identities in float64, the ancestral step, and an exact sampling check."""
import math

import pytest
import torch

from helpers import assert_close_rel, random_mask
from protdiff_fast.diffusion import NoiseSchedule
from protdiff_fast.reference.com import remove_center_of_mass_reference
from protdiff_fast.reference.ddpm import (
    add_noise,
    ddpm_step_reference,
    eps_mean,
    l_simple,
    predict_x0_from_eps,
    q_posterior,
    sample_noise,
)

F64 = torch.float64


# ----------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------
def test_linear_schedule_tables():
    s = NoiseSchedule(1000)
    b, ab = s.tables["betas"], s.tables["alpha_bars"]
    assert b.dtype == F64 and b.shape == (1001,)
    assert b[0] == 0 and ab[0] == 1
    assert math.isclose(float(b[1]), 1e-4, rel_tol=1e-12) and math.isclose(float(b[1000]), 0.02, rel_tol=1e-12)
    assert bool((b[2:] > b[1:-1]).all()) and bool((ab[1:] < ab[:-1]).all())
    t = 437
    assert math.isclose(float(ab[t]), math.prod(1 - float(b[k]) for k in range(1, t + 1)), rel_tol=1e-12)
    bt = s.tables["beta_tilde"]
    assert float(bt[1]) == 0.0
    assert math.isclose(float(bt[t]), (1 - float(ab[t - 1])) / (1 - float(ab[t])) * float(b[t]), rel_tol=1e-12)
    assert float(ab[1000]) < 1e-4  # the forward process ends near N(0, I)


def test_cosine_schedule_tables():
    T, s_ = 200, 0.008
    s = NoiseSchedule(T, kind="cosine", cosine_s=s_)
    f = lambda t: math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2  # noqa: E731
    for t in (1, 50, 150):
        assert math.isclose(float(s.alpha_bars[t]), f(t) / f(0), rel_tol=1e-9)
    assert float(s.betas.max()) <= 0.999 and float(s.betas[1:].min()) > 0


def test_schedule_rejects_bad_config_and_timesteps():
    with pytest.raises(ValueError, match="kind"):
        NoiseSchedule(kind="quadratic")
    with pytest.raises(ValueError, match="beta_start <= beta_end"):
        NoiseSchedule(beta_start=0.1, beta_end=0.01)
    s = NoiseSchedule(100)
    with pytest.raises(ValueError, match=r"t: timesteps must lie in \[1, 100\], got values in \[0, 5\]"):
        s.check_timesteps(torch.tensor([0, 5]), 2, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"\[1, 100\]"):
        s.check_timesteps(101, 3, torch.device("cpu"))
    with pytest.raises(TypeError, match="integer tensor"):
        s.check_timesteps(torch.tensor([1.0, 2.0]), 2, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"t: expected shape \(3,\)"):
        s.check_timesteps(torch.tensor([1, 2]), 3, torch.device("cpu"))


# ----------------------------------------------------------------------------------------------
# Identities in float64
# ----------------------------------------------------------------------------------------------
def test_forward_closed_form_matches_composed_steps():
    """q(x_t | x_0) in closed form vs composing q(x_s | x_{s-1}) for s = 1..t, by Monte Carlo moments."""
    s = NoiseSchedule(1000)
    M, n = 4000, 6
    g = torch.Generator().manual_seed(11)
    x0 = remove_center_of_mass_reference(torch.randn(1, n, 3, generator=g, dtype=F64) * 2)
    x = x0.expand(M, n, 3).clone()
    checkpoints = {1, 10, 100, 400, 1000}
    # in the zero-CoM subspace the per-coordinate variance of P z is (1 - 1/n)
    proj_var = 1 - 1 / n
    for t in range(1, 1001):
        beta = float(s.betas[t])
        x = math.sqrt(1 - beta) * x + math.sqrt(beta) * sample_noise(x, generator=g)
        if t in checkpoints:
            ab = float(s.alpha_bars[t])
            want_mean, want_var = math.sqrt(ab) * x0[0], (1 - ab) * proj_var
            mean, var = x.mean(0), x.var(0)
            se_mean = math.sqrt(want_var / M)
            assert float((mean - want_mean).abs().max()) < 5 * se_mean, f"mean at t={t}"
            se_var = want_var * math.sqrt(2 / (M - 1))
            assert float((var - want_var).abs().max()) < 5 * se_var, f"variance at t={t}"
            # and the closed form gives the same moments
            xt = add_noise(s, x0.expand(M, n, 3), sample_noise(x, generator=g), t)
            assert float((xt.mean(0) - want_mean).abs().max()) < 5 * se_mean
            assert float((xt.var(0) - want_var).abs().max()) < 5 * se_var


def test_posterior_mean_equals_eps_parameterised_mean():
    s = NoiseSchedule(1000)
    B, N = 5, 8
    x0 = remove_center_of_mass_reference(torch.randn(B, N, 3, dtype=F64))
    eps = sample_noise(x0)
    t = torch.tensor([1, 2, 10, 500, 1000])
    xt = add_noise(s, x0, eps, t)
    mu_tilde, _ = q_posterior(s, x0, xt, t)
    assert_close_rel(eps_mean(s, xt, t, eps), mu_tilde, 1e-12, "mu_tilde(x_t(x_0, eps), x_0) vs mu_theta(x_t, eps)")
    assert_close_rel(predict_x0_from_eps(s, xt, t, eps), x0, 1e-10, "x_0 from eps")


@pytest.mark.parametrize("t", [2, 3, 50, 999, 1000])
def test_posterior_is_bayes_rule(t):
    """log q(x_t | x_{t-1}) + log q(x_{t-1} | x_0) - log q(x_{t-1} | x_t, x_0) is constant in x_{t-1}."""
    s = NoiseSchedule(1000)
    x0, xt = torch.randn(1, 1, 3, dtype=F64), torch.randn(1, 1, 3, dtype=F64)
    mean, var = q_posterior(s, x0, xt, t)
    alpha, ab_prev = float(s.tables["alphas"][t]), float(s.tables["alpha_bars_prev"][t])
    beta = float(s.betas[t])

    def log_normal(v, mu, var_):
        return -0.5 * ((v - mu) ** 2 / var_ + torch.log(2 * math.pi * torch.as_tensor(var_, dtype=F64)))

    x_prev = torch.randn(64, 1, 3, dtype=F64) * 3  # many values of x_{t-1}
    log_joint = log_normal(xt, math.sqrt(alpha) * x_prev, beta) + log_normal(x_prev, math.sqrt(ab_prev) * x0, 1 - ab_prev)
    diff = log_joint - log_normal(x_prev, mean, var)
    assert float((diff - diff.mean(0)).abs().max()) < 1e-8 * float(diff.abs().max() + 1)


# ----------------------------------------------------------------------------------------------
# The ancestral step
# ----------------------------------------------------------------------------------------------
def _step_inputs(B=4, N=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = random_mask(B, N, generator=g, min_real=2)
    x = remove_center_of_mass_reference(torch.randn(B, N, 3, generator=g, dtype=F64), mask)
    eps_hat = torch.randn(B, N, 3, generator=g, dtype=F64)
    return x, eps_hat, mask


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_step_masks_centres_and_matches_the_formula(variance):
    s = NoiseSchedule(1000)
    x, eps_hat, mask = _step_inputs()
    t = torch.tensor([1000, 500, 2, 37])
    noise = torch.randn_like(x)
    out = ddpm_step_reference(s, x, eps_hat, t, mask=mask, noise=noise, variance=variance)
    keep = mask.unsqueeze(-1)
    assert float(out.prev_sample[~mask].abs().max()) == 0.0, "padding must stay exactly zero"
    com = (out.prev_sample * keep).sum(1) / keep.sum(1)
    assert float(com.abs().max()) < 1e-13, "result must have zero centre of mass over real nodes"
    # the formula, written out per sample
    for b in range(4):
        tb = int(t[b])
        alpha, beta, ab = (float(s.tables[k][tb]) for k in ("alphas", "betas", "alpha_bars"))
        var = float(s.tables["beta_tilde"][tb]) if variance == "fixed_small" else beta
        real = mask[b]
        z = noise[b, real] - noise[b, real].mean(0)
        mu = (x[b, real] - beta / math.sqrt(1 - ab) * eps_hat[b, real]) / math.sqrt(alpha)
        want = mu + math.sqrt(var) * z
        want = want - want.mean(0)
        assert_close_rel(out.prev_sample[b, real], want, 1e-12, f"sample {b}")
        assert_close_rel(out.mean[b, real], mu - mu.mean(0), 1e-12, f"mean {b}")
        x0 = (x[b, real] - math.sqrt(1 - ab) * eps_hat[b, real]) / math.sqrt(ab)
        assert_close_rel(out.pred_original_sample[b, real], x0, 1e-12, f"x0 {b}")


def test_step_per_sample_t_equals_separate_steps_and_no_noise_at_t1():
    s = NoiseSchedule(1000)
    x, eps_hat, mask = _step_inputs(B=3)
    t = torch.tensor([1, 640, 5])
    noise = torch.randn_like(x)
    together = ddpm_step_reference(s, x, eps_hat, t, mask=mask, noise=noise, variance="fixed_large").prev_sample
    for b in range(3):
        alone = ddpm_step_reference(s, x[b:b + 1], eps_hat[b:b + 1], int(t[b]), mask=mask[b:b + 1],
                                    noise=noise[b:b + 1], variance="fixed_large").prev_sample
        assert torch.equal(together[b:b + 1], alone)
    other = ddpm_step_reference(s, x, eps_hat, t, mask=mask, noise=torch.randn_like(x), variance="fixed_large")
    assert torch.equal(other.prev_sample[0], together[0]), "t = 1 adds no noise (even under fixed_large)"
    assert not torch.equal(other.prev_sample[1], together[1])


def test_step_is_reproducible_with_a_generator():
    s = NoiseSchedule(100)
    x, eps_hat, mask = _step_inputs()
    a = ddpm_step_reference(s, x, eps_hat, 50, mask=mask, generator=torch.Generator().manual_seed(7))
    b = ddpm_step_reference(s, x, eps_hat, 50, mask=mask, generator=torch.Generator().manual_seed(7))
    c = ddpm_step_reference(s, x, eps_hat, 50, mask=mask, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.prev_sample, b.prev_sample) and not torch.equal(a.prev_sample, c.prev_sample)


def test_l_simple_counts_real_residues_only():
    eps, eps_hat = torch.zeros(2, 4, 3, dtype=F64), torch.zeros(2, 4, 3, dtype=F64)
    eps_hat[0, 0] = torch.tensor([1.0, 2.0, 2.0], dtype=F64)  # squared norm 9
    eps_hat[1, 3] = 1000.0  # padding: ignored
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)
    assert math.isclose(float(l_simple(eps_hat, eps, mask)), 9 / 6, rel_tol=1e-14)


@pytest.mark.parametrize("case, error, match", [
    ("t zero", ValueError, r"t: timesteps must lie in \[1, 1000\]"),
    ("t above", ValueError, r"got values in \[1, 1001\]"),
    ("all padding", ValueError, r"no real nodes"),
    ("nan", ValueError, r"x_t: contains NaN"),
    ("eps shape", ValueError, r"eps_hat: expected shape \(4, 13, 3\)"),
    ("eps dtype", TypeError, r"eps_hat: expected dtype torch.float64"),
    ("noise device", ValueError, r"noise: is on device meta"),
    ("variance", ValueError, r"variance"),
])
def test_step_rejects_bad_input(case, error, match):
    s = NoiseSchedule(1000)
    x, eps_hat, mask = _step_inputs()
    kw, t = {"mask": mask}, 10
    if case == "t zero":
        t = torch.tensor([0, 1, 2, 3])
    elif case == "t above":
        t = torch.tensor([1, 1001, 2, 3])
    elif case == "all padding":
        kw["mask"] = mask.clone()
        kw["mask"][2] = False
    elif case == "nan":
        x = x.clone()
        x[0, 0, 0] = math.nan
    elif case == "eps shape":
        eps_hat = eps_hat[:, :-1]
    elif case == "eps dtype":
        eps_hat = eps_hat.float()
    elif case == "noise device":
        kw["noise"] = torch.empty(x.shape, dtype=F64, device="meta")
    elif case == "variance":
        kw["variance"] = "learned"
    with pytest.raises(error, match=match):
        ddpm_step_reference(s, x, eps_hat, t, **kw)


# ----------------------------------------------------------------------------------------------
# Sampling with the exact eps predictor of centred Gaussian data (no training needed)
# ----------------------------------------------------------------------------------------------
# Data x_0 = P y, y ~ N(0, s2 I). Then x_t = sqrt(ab) x_0 + sqrt(1 - ab) P z is N(0, v_t P) with
# v_t = ab s2 + 1 - ab, and E[eps | x_t] = sqrt(1 - ab) / v_t * x_t exactly. Every step of the
# sampler is then linear, x_{t-1} = a_t x_t + sigma_t z, so the variance of its output follows
# the scalar recursion v <- a_t^2 v + sigma_t^2 from v_T = 1.
def exact_eps(schedule, data_var):
    def predict(x_t, t):
        ab = schedule.coef("alpha_bars", t, x_t)
        return (1 - ab).sqrt() / (ab * data_var + 1 - ab) * x_t
    return predict


def analytic_output_variance(schedule, data_var, variance):
    v = 1.0
    for t in range(schedule.num_timesteps, 0, -1):
        alpha, beta, ab = (float(schedule.tables[k][t]) for k in ("alphas", "betas", "alpha_bars"))
        k_t = math.sqrt(1 - ab) / (ab * data_var + 1 - ab)
        a_t = (1 - beta / math.sqrt(1 - ab) * k_t) / math.sqrt(alpha)
        var = float(schedule.tables["beta_tilde"][t]) if variance == "fixed_small" else beta
        v = a_t * a_t * v + (var if t > 1 else 0.0)
    return v


def run_sampler(sample_schedule, predict, M, n, variance, seed, sign=1.0):
    g = torch.Generator().manual_seed(seed)
    x = sample_noise(torch.empty(M, n, 3, dtype=F64), generator=g)
    for t in range(sample_schedule.num_timesteps, 0, -1):
        tt = torch.full((M,), t, dtype=torch.long)
        x = ddpm_step_reference(sample_schedule, x, sign * predict(x, tt), tt, generator=g, variance=variance).prev_sample
    return x


def covariance_matches(x, data_var, n, rel_tol):
    """Sample covariance over nodes (pooled over x, y, z) vs data_var * P; relative Frobenius error."""
    M = x.shape[0]
    flat = x.permute(0, 2, 1).reshape(M * 3, n)
    cov = flat.T @ flat / (M * 3)
    want = data_var * (torch.eye(n, dtype=F64) - 1.0 / n)
    return rel_err_f(cov, want) < rel_tol, rel_err_f(cov, want)


def rel_err_f(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.slow
def test_ancestral_sampling_reproduces_gaussian_data():
    s, data_var, n, M = NoiseSchedule(1000), 4.0, 6, 3000
    predict = exact_eps(s, data_var)
    # the discretisation error of the sampler itself is small for T = 1000 with beta_tilde
    v_small = analytic_output_variance(s, data_var, "fixed_small")
    assert abs(v_small - data_var) / data_var < 0.01, v_small
    x = run_sampler(s, predict, M, n, "fixed_small", seed=1)
    # Monte Carlo error of the covariance estimate: about sqrt(2 / (3M)) per entry; n^2 entries
    tol = 6 * math.sqrt(2 / (3 * M))
    ok, err = covariance_matches(x, data_var, n, tol)
    assert ok, f"sampled covariance off by {err:.3f} (tol {tol:.3f})"
    assert float(x.mean(1).abs().max()) < 1e-10, "samples must keep zero centre of mass"
    # fixed_large: its own analytic variance (it is not data_var for s2 != 1), checked by Monte Carlo
    v_large = analytic_output_variance(s, data_var, "fixed_large")
    x = run_sampler(s, predict, M, n, "fixed_large", seed=2)
    ok, err = covariance_matches(x, v_large, n, tol)
    assert ok, f"fixed_large covariance off by {err:.3f} from its analytic value"


@pytest.mark.slow
@pytest.mark.parametrize("defect", ["sign", "schedule"])
def test_gaussian_sampling_check_catches_a_broken_sampler(defect):
    s, data_var, n, M = NoiseSchedule(1000), 4.0, 6, 3000
    tol = 6 * math.sqrt(2 / (3 * M))
    if defect == "sign":
        x = run_sampler(s, exact_eps(s, data_var), M, n, "fixed_small", seed=3, sign=-1.0)
    else:  # sample with a schedule the eps predictor was not derived for
        x = run_sampler(NoiseSchedule(1000, beta_end=0.01), exact_eps(s, data_var), M, n, "fixed_small", seed=3)
    ok, err = covariance_matches(x, data_var, n, tol)
    assert not ok, f"a broken sampler passed the check (error {err:.3f}, tol {tol:.3f})"


def test_cosine_schedule_rejects_an_offset_or_clip_that_breaks_it():
    """max_beta = 1 made alpha_bar_T = 0 (x_0 = x_t / 0), max_beta = 0 a chain without noise, cosine_s < 0 an
    alpha_bar of 1e26, NaN a table of NaN: all were built without a word."""
    for kw, match in ((dict(max_beta=1.0), "max_beta"), (dict(max_beta=0.0), "max_beta"),
                      (dict(max_beta=math.nan), "max_beta"), (dict(cosine_s=-0.5), "cosine_s"),
                      (dict(cosine_s=math.nan), "cosine_s"), (dict(cosine_s=math.inf), "cosine_s")):
        with pytest.raises(ValueError, match=match):
            NoiseSchedule(100, kind="cosine", **kw)
    s = NoiseSchedule(100, kind="cosine", cosine_s=0.0, max_beta=0.5)  # s = 0 is a valid cosine schedule
    assert float(s.betas.max()) == 0.5 and bool(s.alpha_bars.isfinite().all()) and float(s.alpha_bars[-1]) > 0


# ----------------------------------------------------------------------------------------------
# Gaps found by mutation testing: each test below fails on a small change of the code it names
# ----------------------------------------------------------------------------------------------
def test_int_timestep_is_checked_and_a_0d_tensor_is_broadcast():
    """An int t = 0 (the data, beta_0 = 0: c2 = 0 / 0) is refused as a tensor 0 is; a 0-d tensor t is every
    sample's t, not some other step."""
    s = NoiseSchedule(100)
    cpu = torch.device("cpu")
    for bad in (0, -1, 101):
        with pytest.raises(ValueError, match=r"t: timesteps must lie in \[1, 100\], got " + str(bad)):
            s.check_timesteps(bad, 3, cpu)
    assert s.check_timesteps(1, 2, cpu).tolist() == [1, 1] and s.check_timesteps(100, 2, cpu).tolist() == [100, 100]
    assert s.check_timesteps(torch.tensor(37), 3, cpu).tolist() == [37, 37, 37]
    x, eps_hat, mask = _step_inputs()
    with pytest.raises(ValueError, match=r"\[1, 100\]"):
        ddpm_step_reference(s, x, eps_hat, 0, mask=mask)


def test_step_refuses_samples_without_nodes_but_runs_an_empty_batch():
    s = NoiseSchedule(100)
    empty_nodes = torch.zeros(2, 0, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"x_t: samples have no nodes \(N = 0\)"):
        ddpm_step_reference(s, empty_nodes, empty_nodes, 5)
    none = torch.zeros(0, 4, 3, dtype=F64)
    assert ddpm_step_reference(s, none, none, 5).prev_sample.shape == (0, 4, 3)


def test_seed_range_is_checked():
    from protdiff_fast.reference.ddpm import check_seed

    for ok in (0, -(1 << 63), (1 << 64) - 1):
        assert check_seed(ok, 2) == ok
    for bad in ((1 << 64), -(1 << 63) - 1):
        with pytest.raises(ValueError, match=r"seed: expected an integer in \[-2\^63, 2\^64\)"):
            check_seed(bad, 2)


def test_add_noise_keeps_padding_zero_and_follows_eq_4_per_sample():
    """x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps on real rows, padding exactly zero (also where x_0 and eps are not)."""
    s = NoiseSchedule(1000)
    g = torch.Generator().manual_seed(5)
    mask = random_mask(3, 9, generator=g, min_real=2)
    x0, eps = torch.randn(3, 9, 3, generator=g, dtype=F64), torch.randn(3, 9, 3, generator=g, dtype=F64)
    t = torch.tensor([1, 300, 1000])
    xt = add_noise(s, x0, eps, t, mask)
    assert float(xt[~mask].abs().max()) == 0.0
    for b in range(3):
        ab = float(s.alpha_bars[int(t[b])])
        want = math.sqrt(ab) * x0[b] + math.sqrt(1 - ab) * eps[b]
        assert_close_rel(xt[b][mask[b]], want[mask[b]], 1e-14, f"sample {b}")


def test_per_sample_seeds_key_the_reference_noise_by_seed_and_step():
    """With a (B,) seed each sample's z' comes from (seed_b, t_b): the same pair gives the same draw in any
    batch position, another step or another seed another draw (a draw keyed by the seed alone repeats the
    same z at every step of the chain)."""
    s = NoiseSchedule(1000)
    zero = torch.zeros(3, 6, 3, dtype=F64)

    def z_of(seeds, t):  # x_t = eps_hat = 0: prev = sigma_t P z'
        tt = torch.tensor(t)
        out = ddpm_step_reference(s, zero, zero, tt, seed=torch.tensor(seeds), variance="fixed_large")
        return out.prev_sample / s.betas[tt].sqrt().view(-1, 1, 1)

    a = z_of([4, 9, 4], [50, 50, 50])
    assert torch.equal(a[0], a[2]) and not torch.allclose(a[0], a[1])
    later = z_of([4, 9, 4], [51, 51, 50])
    assert torch.equal(later[2], a[2])
    for b in (0, 1):
        assert float((later[b] - a[b]).abs().max()) > 0.1, "another step must draw other noise"
    moved = z_of([9, 4, 7], [50, 50, 50])
    assert torch.equal(moved[0], a[1]) and torch.equal(moved[1], a[0])


def test_schedule_needs_at_least_one_step():
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="num_timesteps must be an integer >= 1"):
            NoiseSchedule(bad)
    one = NoiseSchedule(1)
    assert one.betas.tolist() == [0.0, 1e-4]


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_step_is_the_float32_step_rounded(variance, dtype):
    """bf16 / fp16 are stepped in float32 with the variance asked for, and the outputs rounded to the input's
    dtype: the same bits as the float32 step's outputs rounded."""
    s = NoiseSchedule(1000)
    g = torch.Generator().manual_seed(12)
    mask = random_mask(3, 8, generator=g, min_real=2)
    x, eps_hat, noise = (torch.randn(3, 8, 3, generator=g).to(dtype) for _ in range(3))
    t = torch.tensor([3, 200, 1000])  # beta_3 = 1.9 beta_tilde_3
    low = ddpm_step_reference(s, x, eps_hat, t, mask=mask, noise=noise, variance=variance)
    full = ddpm_step_reference(s, x.float(), eps_hat.float(), t, mask=mask, noise=noise.float(), variance=variance)
    for name in ("prev_sample", "mean", "pred_original_sample"):
        got, want = getattr(low, name), getattr(full, name).to(dtype)
        assert got.dtype == dtype and torch.equal(got, want), name
