"""SMCDiff on a problem with a known answer (tests/motif_toy.py): correlated Gaussian data with its
exact eps predictor, where p(x^S | motif) is Gaussian in closed form.

Each design draws its own motif trajectory; pooling the designs' weighted particles estimates
E over trajectories of p(x^S_0 | y_{0:T}) = p(x^S_0 | y_0). Tolerances come from the spread of the
per-design estimates (standard errors over independent designs), plus a small floor for the
time discretisation (T = 200), which also affects a perfect sampler.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from motif_toy import N_MOTIF, N_NODES, make_problem, weighted_moments
from protdiff_fast.motif import scaffold

SCAFFOLD_NODES = list(range(N_MOTIF, N_NODES))


@pytest.fixture(scope="module")
def problem():
    return make_problem(T=200, beta_end=0.1)


def _run(problem, method, K, R, seed=1, **kw):
    res = scaffold(problem["model"], problem["motif"], [N_NODES] * R, np.tile(np.arange(N_MOTIF), (R, 1)),
                   method=method, particles=K, scheduler=problem["scheduler"], seed=seed, dtype=torch.float64, **kw)
    m, c = weighted_moments(res, SCAFFOLD_NODES)  # (R, n, 3), (R, n, n)
    mean, se_mean = m.mean(0), m.std(0, ddof=1) / np.sqrt(R)
    S = SCAFFOLD_NODES
    target_mean = problem["cond_mean"][S]
    target_second = problem["cond_cov"][np.ix_(S, S)] + target_mean @ target_mean.T / 3  # E[x x^T] per axis
    second, se_second = c.mean(0), c.std(0, ddof=1) / np.sqrt(R)
    return dict(res=res, err_mean=np.abs(mean - target_mean), se_mean=se_mean,
                err_second=np.abs(second - target_second), se_second=se_second)


@pytest.fixture(scope="module")
def runs(problem):
    return {"replacement": _run(problem, "replacement", 1, 2048),
            "smc4": _run(problem, "smc", 4, 256),
            "smc128": _run(problem, "smc", 128, 32)}


def test_smcdiff_matches_the_exact_conditional(runs):
    r = runs["smc128"]
    assert np.all(r["err_mean"] <= 4 * r["se_mean"] + 0.02), (r["err_mean"], r["se_mean"])
    assert np.all(r["err_second"] <= 4 * r["se_second"] + 0.04), (r["err_second"], r["se_second"])
    assert len(r["res"].events) > 0  # the weights did degenerate and were resampled
    assert np.all(np.isfinite(r["res"].log_weights))


def test_replacement_is_biased_and_smcdiff_beats_it(runs):
    rep, smc = runs["replacement"], runs["smc128"]
    z = rep["err_mean"] / rep["se_mean"]
    assert np.nanmax(z) > 8, f"replacement's bias should be far outside its MC error, got z = {np.nanmax(z):.1f}"
    assert smc["err_mean"].max() < 0.4 * rep["err_mean"].max()


def test_smcdiff_error_shrinks_as_particles_grow(runs):
    assert runs["smc128"]["err_mean"].max() < runs["smc4"]["err_mean"].max()
    assert runs["smc4"]["err_mean"].max() < runs["replacement"]["err_mean"].max()


def test_residual_resampling_and_departure_criterion_also_converge(problem):
    r = _run(problem, "smc", 32, 32, seed=2, resampler="residual", resample_when="departure")
    assert np.all(r["err_mean"] <= 4 * r["se_mean"] + 0.02), (r["err_mean"], r["se_mean"])


def test_one_particle_smc_is_replacement(problem):
    """With K = 1 there is nothing to weigh: SMCDiff reduces to replacement, the same draws."""
    a = scaffold(problem["model"], problem["motif"], [N_NODES] * 4, np.tile(np.arange(N_MOTIF), (4, 1)),
                 method="smc", particles=1, scheduler=problem["scheduler"], seed=3, dtype=torch.float64)
    b = scaffold(problem["model"], problem["motif"], [N_NODES] * 4, np.tile(np.arange(N_MOTIF), (4, 1)),
                 method="replacement", particles=1, scheduler=problem["scheduler"], seed=3, dtype=torch.float64)
    for pa, pb in zip(a.particles, b.particles):
        np.testing.assert_array_equal(pa, pb)


def test_weights_are_reset_after_resampling(problem):
    """After a design's particles are resampled its weights start again uniform, so the next step's ESS
    is near K (one small increment); kept instead, they stay degenerate (measured: ESS ~0.45 K at the
    next step and 16x the resampling events), which the moment tests above do not catch."""
    K, R = 32, 64
    res = scaffold(problem["model"], problem["motif"], [N_NODES] * R, np.tile(np.arange(N_MOTIF), (R, 1)),
                   method="smc", particles=K, scheduler=problem["scheduler"], seed=1, dtype=torch.float64)
    ess, resampled = np.asarray(res.ess), np.asarray(res.resampled)
    next_ess = [ess[s + 1, d] / K for s, d in zip(*np.nonzero(resampled))
                if s + 1 < len(ess) and not np.isnan(ess[s + 1, d])]
    assert len(next_ess) >= 3, "the test needs resampling events followed by a weighted step"
    assert min(next_ess) > 0.9, sorted(next_ess)[:5]


@pytest.mark.parametrize("steps, variance, eta", [(None, "fixed_small", 1.0), (None, "fixed_large", 1.0),
                                                  (10, "fixed_small", 1.0), (10, "fixed_small", 0.5)])
def test_transition_sigma_is_the_noise_the_step_adds(steps, variance, eta):
    """SMCDiff's weights use transition_sigma as the std of p(x_{t'} | x_t): it must be what
    scheduler.step adds, for the full ancestral step and the strided (DDIM) one (whose sigma nothing
    else checked: a mutant dropping its sqrt((1 - ab') / (1 - ab)) factor passed every test)."""
    from protdiff_fast.diffusion import DDPMScheduler
    from protdiff_fast.motif.scaffold import transition_sigma
    from protdiff_fast.reference.com import remove_center_of_mass_reference as project

    sched = DDPMScheduler(100, 1e-3, 0.1, variance_type=variance, eta=eta, backend="reference")
    sched.set_timesteps(steps)
    ts = sched.timesteps.tolist() + [0]
    g = torch.Generator().manual_seed(0)
    x = project(torch.randn(2, 7, 3, generator=g, dtype=torch.float64))
    e = torch.randn(2, 7, 3, generator=g, dtype=torch.float64)
    z = torch.randn(2, 7, 3, generator=g, dtype=torch.float64)
    for t, t_prev in zip(ts[:-1], ts[1:]):
        out = sched.step(e, t, x, noise=z)
        sigma = transition_sigma(sched, t, t_prev)
        assert (sigma > 0) == (t_prev > 0)
        assert torch.allclose(out.prev_sample - out.mean, sigma * project(z), atol=1e-12), (t, t_prev)


def test_the_reported_particle_is_drawn_by_the_final_weights(problem):
    """ScaffoldResult.chosen: a draw from the final weights, so E[w_chosen] = E[sum_k w_k^2] (about 0.09
    here), not 1/K = 0.0625 as for a fixed or uniform pick."""
    R, K = 256, 16
    res = scaffold(problem["model"], problem["motif"], [N_NODES] * R, np.tile(np.arange(N_MOTIF), (R, 1)),
                   method="smc", particles=K, scheduler=problem["scheduler"], seed=2, dtype=torch.float64,
                   ess_threshold=1e-6)  # never resamples: the final weights stay spread
    w = np.exp(res.log_weights)
    picked, target = w[np.arange(R), res.chosen].mean(), (w ** 2).sum(1).mean()
    assert target > 1.3 / K and abs(picked - target) < 0.25 * (target - 1 / K), (picked, target)


def test_redenoise_noises_to_t_start_then_denoises(problem):
    """redenoise = q(x_t | x_0) then the reverse process. With the toy's exact eps predictor the mean
    output for a fixed input x is E[E[x_0 | x_t] | x] = a^2 C_0 C_t^+ x (a = sqrt(alpha_bar_t)); a version
    that skipped the noising (x_t = x) gives a C_0 C_t^+ x, twice that at a = 0.5, and passed every
    earlier test."""
    from protdiff_fast.motif.scaffold import redenoise

    ab = problem["scheduler"].schedule.alpha_bars.numpy()
    t = int(np.argmin(np.abs(np.sqrt(ab) - 0.5)))
    P = np.eye(N_NODES) - 1.0 / N_NODES
    C_t = ab[t] * problem["C0"] + (1 - ab[t]) * P
    x_in = 3.0 * (P @ np.random.default_rng(1).normal(size=(N_NODES, 3)))
    want = ab[t] * problem["C0"] @ np.linalg.pinv(C_t, hermitian=True) @ x_in
    out = np.stack(redenoise(problem["model"], [x_in] * 2000, t_start=t, scheduler=problem["scheduler"], seed=3,
                             dtype=torch.float64))
    assert np.linalg.norm(out.mean(0) - want) < 0.1 * np.linalg.norm(want)  # 0.03 measured; 1.0 without noising


def test_resampling_criteria_on_fixed_weights():
    from protdiff_fast.motif.scaffold import effective_sample_size, needs_resampling

    w = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.4, 0.3, 0.2, 0.1], [0.7, 0.1, 0.1, 0.1]],
                     dtype=torch.float64)
    ess = effective_sample_size(w.clamp_min(1e-300).log())
    assert ess.tolist() == pytest.approx([4.0, 1.0, 1 / 0.30, 1 / 0.52])
    # departure sum_k |4 w_k - 1|: 0, 6, 1.6, 3.6 against 3
    assert needs_resampling(w, ess, "departure", 0.5).tolist() == [False, True, False, True]
    # ESS (4, 1, 3.33, 1.92) < 0.5 K = 2: the second and last; < 0.9 K = 3.6: all but the uniform one
    assert needs_resampling(w, ess, "ess", 0.5).tolist() == [False, True, False, True]
    assert needs_resampling(w, ess, "ess", 0.9).tolist() == [False, True, True, True]


def test_resampled_duplicates_take_their_own_noise(problem):
    """After resampling, slot k continues from its ancestor's mean plus its own noise: duplicates diverge at
    once. Resampling at every step up to t = 2 (the last step adds no noise): copies made there would
    still be identical at the end if they shared their ancestor's noise."""
    R, K = 4, 8
    res = scaffold(problem["model"], problem["motif"], [N_NODES] * R, np.tile(np.arange(N_MOTIF), (R, 1)),
                   method="smc", particles=K, scheduler=problem["scheduler"], seed=5, dtype=torch.float64,
                   ess_threshold=1.0)  # ESS < K: practically every step
    assert res.resampled[-2].all()  # the step t = 2 -> 1 resampled every design
    for parts in res.particles:
        flat = parts.reshape(K, -1)
        gaps = np.abs(flat[:, None] - flat[None]).max(-1) + np.eye(K)
        assert gaps.min() > 1e-6  # no two final particles are copies


def test_resampling_criteria_at_their_thresholds():
    """Departure sum_k |K w_k - 1| > 3/4 K (strictly), ESS < threshold K (strictly): K = 4 weights whose
    departure (2.4) lies between K / 2 and 3/4 K, and uniform weights (ESS exactly 4) at threshold 1."""
    from protdiff_fast.motif.scaffold import effective_sample_size, needs_resampling

    w = torch.tensor([[0.55, 0.15, 0.15, 0.15], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    ess = effective_sample_size(w.log())
    assert ess.tolist() == pytest.approx([1 / 0.37, 4.0]) and float(ess[1]) == 4.0
    assert needs_resampling(w, ess, "departure", 0.5).tolist() == [False, False]  # 2.4 <= 3
    assert needs_resampling(w, ess, "ess", 1.0).tolist() == [True, False]  # uniform: ESS = K, not below it


@pytest.mark.parametrize("K", [3, 5, 7, 8, 16, 64, 1000])
def test_uniform_weights_are_not_resampled_at_threshold_one(K):
    """ess_threshold 1 resamples whenever the weights are not uniform: uniform log-weights -log K give an
    ESS a rounding under K for most K (5, 7, 8, 16, 64), which resampled them; one weight 10% off is not
    uniform and is resampled."""
    import math

    from protdiff_fast.motif.scaffold import effective_sample_size, needs_resampling

    log_w = torch.full((2, K), -math.log(K), dtype=torch.float64)
    log_w[1, 0] += 0.1
    log_w = log_w - torch.logsumexp(log_w, dim=1, keepdim=True)
    ess = effective_sample_size(log_w)
    assert needs_resampling(log_w.exp(), ess, "ess", 1.0).tolist() == [False, True]


def test_resampled_copies_enter_the_next_step_apart(problem):
    """After resampling, slot k continues from its ancestor's mean plus its own noise, so no two particles of
    a design are ever equal at a model call, copies included. At ess_threshold 1 a design resamples at almost
    every step (771 times here); a copy is rare for weights near uniform, but some are made. The earlier
    test looks for copies only at the end, where there were none: slots that took their ancestor's own
    x_{t'} (its noise included) passed it; here the first call after such a copy sees two equal particles."""
    R, K, calls = 4, 8, []

    def recording(x, t, mask):
        calls.append(x.clone())
        return problem["model"](x, t, mask)

    res = scaffold(recording, problem["motif"], [N_NODES] * R, np.tile(np.arange(N_MOTIF), (R, 1)),
                   method="smc", particles=K, scheduler=problem["scheduler"], seed=4, dtype=torch.float64,
                   ess_threshold=1.0)  # resampled whenever the weights are not uniform
    assert len(res.events) > 500
    for x in calls:
        x = x.reshape(R, K, -1)
        gaps = (x[:, :, None] - x[:, None]).abs().amax(-1) + torch.eye(K, dtype=x.dtype)
        assert float(gaps.min()) > 1e-6, float(gaps.min())


def test_redenoise_starts_from_q_of_x_t_given_the_design(problem):
    """redenoise's first model call sees x_t ~ q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) P) (P: the
    centre-of-mass projection, per axis), checked by moments over 2000 copies of one design. The test
    above checks the mean of the output only, which does not see the noise's scale: noise of half the
    size passed it."""
    from protdiff_fast.motif.scaffold import redenoise

    ab = problem["scheduler"].schedule.alpha_bars.numpy()
    t, n = 50, 2000
    first = []

    class Seen(Exception):
        pass

    def recording(x, tt, mask):  # the first call is all this test needs
        first.append((x.clone(), tt.clone()))
        raise Seen

    P = np.eye(N_NODES) - 1.0 / N_NODES
    x_in = 3.0 * (P @ np.random.default_rng(2).normal(size=(N_NODES, 3)))
    with pytest.raises(Seen):
        redenoise(recording, [x_in] * n, t_start=t, scheduler=problem["scheduler"], seed=5, dtype=torch.float64)
    x, tt = first[0]
    assert tt.tolist() == [t] * n
    resid = x.numpy() - np.sqrt(ab[t]) * x_in  # (n, N, 3)
    assert np.abs(resid.mean(0)).max() < 5 * np.sqrt((1 - ab[t]) / n)
    cov = np.einsum("bic,bjc->ij", resid, resid) / (3 * n)
    assert np.abs(cov - (1 - ab[t]) * P).max() < 0.1 * (1 - ab[t]), np.abs(cov - (1 - ab[t]) * P).max()


def test_the_reported_particle_is_drawn_from_the_runs_seed_not_torchs_global_rng(problem):
    """Every random draw of a design comes from streams of the run's seed, the final pick of the reported
    particle too: the same seed reports the same particles whatever torch's global generator holds. (A pick
    from the global generator passed every test: the pick is a fair draw from the weights either way.)"""
    R, K = 8, 8
    chosen = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        res = scaffold(problem["model"], problem["motif"], [N_NODES] * R, np.tile(np.arange(N_MOTIF), (R, 1)),
                       method="smc", particles=K, scheduler=problem["scheduler"], seed=6, dtype=torch.float64,
                       ess_threshold=1e-6)  # never resamples: the final weights stay spread
        assert (np.exp(res.log_weights).max(1) < 0.9).sum() >= R // 2  # the pick is a real draw for most designs
        chosen.append(res.chosen.tolist())
    assert chosen[0] == chosen[1]


def test_a_design_resamples_from_its_own_particles_only(problem):
    """Resampling design d draws its ancestors among design d's K particles (rows d K .. d K + K - 1): design
    1 of a run is the same bits whatever design 0's motif is. Ancestor indices without the design's offset
    (every design copying design 0's particles) passed the other tests, whose designs all share one motif,
    so the copies looked like valid draws."""
    K = 8
    motif = torch.as_tensor(problem["motif"], dtype=torch.float64)
    kw = dict(method="smc", particles=K, scheduler=problem["scheduler"], seed=3, dtype=torch.float64,
              ess_threshold=1.0)  # design 1 resamples at almost every step
    runs = [scaffold(problem["model"], torch.stack([first, motif]), [N_NODES] * 2, np.tile(np.arange(N_MOTIF), (2, 1)),
                     **kw) for first in (motif, 1.5 * motif)]
    assert sum(e["design"] == 1 for e in runs[0].events) > 50
    assert not np.allclose(runs[0].particles[0], runs[1].particles[0])
    np.testing.assert_array_equal(runs[0].particles[1], runs[1].particles[1])
    np.testing.assert_array_equal(runs[0].log_weights[1], runs[1].log_weights[1])
