"""Clash guidance: the repulsion is -grad U, equivariant, keeps the centre of mass and padding, acts only
for t <= t_max, removes clashes through the sampler API, and is part of a run's identity."""
import json

import numpy as np
import pytest
import torch

from helpers import random_mask, random_orthogonal, rel_err
from protdiff_fast import backends
from protdiff_fast.diffusion import ClashGuidance, DDPMScheduler
from protdiff_fast.diffusion.guidance import repulsion
from protdiff_fast.diffusion.sampler import sample
from protdiff_fast.metrics.backbone import clashes

F64 = torch.float64
HAS_CPU = backends.cpu_extension() is not None


def potential(x, mask, d_min):
    """U = 1/2 sum_{i < j - 1, both real} relu(d_min - d_ij)^2, pair by pair."""
    B, N, _ = x.shape
    total = (x * 0).sum()
    for b in range(B):
        for i in range(N):
            for j in range(i + 2, N):
                if mask[b, i] and mask[b, j]:
                    total = total + 0.5 * torch.relu(d_min - (x[b, i] - x[b, j]).norm()) ** 2
    return total


def clustered(B, N, spread, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, 3, generator=g, dtype=F64) * spread


# (1, 3): a draw whose lone non-adjacent pair (0, 2) overlaps (0.24 A < 0.38; seed 3 put it past d_min, so the
# force and the gradient were both zero there and a repulsion dropping |i - j| = 2 pairs passed that case)
@pytest.mark.parametrize("B,N,seed", [(1, 2, 2), (1, 3, 2), (3, 11, 11)])
def test_repulsion_is_minus_the_gradient_of_the_overlap_potential(B, N, seed):
    x = clustered(B, N, 0.3, seed=seed).requires_grad_(True)
    mask = random_mask(B, N, torch.Generator().manual_seed(N), min_real=N // 2) if B > 1 else \
        torch.ones(B, N, dtype=torch.bool)
    (grad,) = torch.autograd.grad(potential(x, mask, 0.38), x)
    force = repulsion(x.detach(), mask, 0.38)
    assert torch.isfinite(force).all()
    assert torch.allclose(force, -grad, rtol=1e-9, atol=1e-12)
    assert (force[~mask] == 0).all()  # padding is neither pushed nor pushes
    if N <= 2:
        assert (force == 0).all()  # chain neighbours never repel
    else:
        assert force.abs().max() > 0  # the check above was not vacuous


def test_coincident_atoms_give_no_nan():
    x = torch.zeros(1, 5, 3, dtype=F64)
    x[0, :, 0] = torch.tensor([0.0, 0.1, 0.0, 0.3, 0.0], dtype=F64)  # atoms 0, 2 and 4 coincide
    f = repulsion(x, torch.ones(1, 5, dtype=torch.bool), 0.38)
    assert torch.isfinite(f).all()


def guided_eps(guidance, x, eps, t, mask, T=100):
    sched = DDPMScheduler(T)
    return guidance(eps, t, x, mask, sched.schedule.coef("alpha_bars", t, x))


def test_guidance_is_equivariant_keeps_the_centre_of_mass_and_acts_only_for_small_t():
    B, N = 3, 13
    mask = random_mask(B, N, torch.Generator().manual_seed(2), min_real=8)
    x, eps = clustered(B, N, 0.25, seed=3) * mask[..., None], torch.randn(B, N, 3, dtype=F64) * mask[..., None]
    t = torch.tensor([5, 40, 90])
    gd = ClashGuidance(strength=0.5, min_distance=3.8, max_timestep=50)
    out = guided_eps(gd, x, eps, t, mask)
    assert torch.equal(out[2], eps[2])  # t = 90 > t_max: the model's eps, bit for bit
    assert not torch.allclose(out[:2], eps[:2])  # clustered at 2.5 A: the guidance pushes
    assert torch.equal(out[~mask], eps[~mask])
    # the pushes are antisymmetric: the real residues' centre of mass does not move
    shift = ((out - eps) * mask[..., None]).sum(1)
    assert shift.abs().max() < 1e-10
    for reflect in (False, True):
        Q = random_orthogonal(reflect, torch.Generator().manual_seed(4))
        c = torch.randn(1, 1, 3, dtype=F64)
        moved = guided_eps(gd, (x @ Q.T + c) * mask[..., None], eps @ Q.T, t, mask)
        assert torch.allclose(moved, out @ Q.T, atol=1e-9)
    assert torch.equal(guided_eps(ClashGuidance(strength=0.0), x, eps, t, mask), eps)


def test_guidance_removes_clashes_of_a_too_compact_distribution():
    """Exact sampling of a Gaussian 'protein' of 2 A spread: nearly every design has pairs < 3 A; guided,
    none has one below 3 A (d_min 3.8 A), and the spread stays what the data asks for."""
    from test_sampler import ExactGaussianEps

    T = 200
    plain = DDPMScheduler(T, beta_end=0.05)
    guided = DDPMScheduler(T, beta_end=0.05, clash_guidance=ClashGuidance(0.5, 3.8, 60))
    model = ExactGaussianEps(plain.schedule, 0.2 ** 2, max_length=20)
    lengths = [12, 9, 16, 12]
    a = sample(model, lengths, seed=0, scheduler=plain, progress=False, batch_size=4)
    b = sample(model, lengths, seed=0, scheduler=guided, progress=False, batch_size=4)
    n_plain = [clashes(c)["clash_pairs"] for c in a]
    n_guided = [clashes(c)["clash_pairs"] for c in b]
    assert sum(n_plain) > 10 and min(n_plain) > 0, n_plain
    assert sum(n_guided) == 0, n_guided
    rg = lambda cs: np.mean([np.sqrt(((c - c.mean(0)) ** 2).sum(1).mean()) for c in cs])  # noqa: E731
    assert rg(a) < rg(b) < 2 * rg(a)  # pushed apart, not blown up


def test_guidance_is_checked_part_of_the_run_and_refused_by_smc(tmp_path):
    for kw in (dict(strength=1.5), dict(strength=-0.1), dict(min_distance=float("nan")), dict(max_timestep=0),
               dict(max_timestep=2.5), dict(scale=0.0), dict(strength=True)):
        with pytest.raises(ValueError, match="clash guidance"):
            ClashGuidance(**kw)
    with pytest.raises(ValueError, match="clash_guidance: a ClashGuidance"):
        DDPMScheduler(clash_guidance=0.5)
    assert "clash_guidance" not in DDPMScheduler().config
    assert DDPMScheduler(clash_guidance=ClashGuidance()).config["clash_guidance"] == dict(
        strength=0.5, min_distance=3.8, max_timestep=200, scale=10.0)
    from test_sampler import ExactGaussianEps

    model = ExactGaussianEps(DDPMScheduler(20).schedule, 1.0, max_length=16)
    folder = tmp_path / "d"
    sample(model, [6, 8], seed=1, scheduler=DDPMScheduler(20), out_dir=folder, progress=False, scale=1.0)
    with pytest.raises(ValueError, match=r"holds a different sampling run .*clash_guidance"):
        sample(model, [6, 8], seed=1, scheduler=DDPMScheduler(20, clash_guidance=ClashGuidance()), out_dir=folder,
               progress=False, resume=True, scale=1.0)
    from protdiff_fast.motif.scaffold import scaffold

    with pytest.raises(ValueError, match="clash_guidance with method 'smc'"):
        scaffold(model, torch.randn(2, 3), [6], [[0, 1]], method="smc",
                 scheduler=DDPMScheduler(20, clash_guidance=ClashGuidance()))


@pytest.mark.skipif(not HAS_CPU, reason="the shipped model on the cpu backend")
def test_cli_clash_guidance(tmp_path):
    from protdiff_fast.cli import main

    out = tmp_path / "g"
    assert main(["sample", "--length", "40", "--num", "1", "--steps", "5", "--clash-guidance", "--no-progress",
                 "--clash-guidance-steps", "1000", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["run"]["scheduler"]["clash_guidance"] == dict(strength=0.5, min_distance=3.8, max_timestep=1000,
                                                                 scale=10.0)
    assert main(["sample", "--length", "40", "--num", "1", "--clash-guidance", "2", "--out", str(tmp_path / "m")]) == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_guided_step_in_low_precision_within_the_unguided_steps_error(dtype):
    """The guidance computes in float32 as the steps do: in bf16 1 - alpha_bar rounds to 0 for t <= 10, which
    gave eps' = inf ('x_t or eps_hat contains NaN or Inf', blaming the input) and 170x the error in fp16."""
    s = DDPMScheduler(1000, clash_guidance=ClashGuidance(0.5, 3.8, 200))
    plain = DDPMScheduler(1000)
    g = torch.Generator().manual_seed(5)
    x = clustered(2, 9, 0.12, seed=6).float()
    x = x - x.mean(1, keepdim=True)
    eps, z = torch.randn(2, 9, 3, generator=g) * 0.1, torch.randn(2, 9, 3, generator=g)
    for t in (1, 2, 5, 10, 50):
        for sched in (s, plain):
            want = sched.step(eps.double(), t, x.double(), noise=z.double()).prev_sample
            low = sched.step(eps.to(dtype), t, x.to(dtype), noise=z.to(dtype)).prev_sample
            if sched is plain:
                plain_err = rel_err(low, want)
            else:
                got, guided_want = low, want
        assert not torch.equal(guided_want, plain.step(eps.double(), t, x.double(), noise=z.double()).prev_sample)
        assert rel_err(got, guided_want) <= 3 * plain_err + 2 * torch.finfo(dtype).eps, (t, rel_err(got, guided_want))


def test_nan_in_padding_rows_never_reaches_the_real_rows():
    """Padding pairs have weight 0, but the repulsion's W @ x multiplied that 0 by a padding row's NaN (a model's
    unmasked output) and every real residue's eps' came out NaN."""
    B, N = 2, 9
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, 6:] = False
    x = clustered(B, N, 0.25, seed=7) * mask[..., None]
    eps = torch.randn(B, N, 3, generator=torch.Generator().manual_seed(8), dtype=F64) * mask[..., None]
    t = torch.tensor([10, 10])
    gd = ClashGuidance(strength=0.5, min_distance=3.8, max_timestep=50)
    clean = guided_eps(gd, x, eps, t, mask)
    dirty = guided_eps(gd, x, eps.masked_fill(~mask[..., None], float("nan")), t, mask)
    assert not torch.allclose(clean[mask], eps[mask])  # the guidance acts on these
    assert torch.equal(dirty[mask], clean[mask])
    assert dirty[~mask].isnan().all()  # padding gets the model's eps back, as it was


def test_strength_one_half_removes_an_isolated_overlap_exactly():
    """strength lambda moves each atom of a lone overlapping pair by lambda * overlap, so the pair's distance grows
    by 2 lambda * overlap: 0.5 puts it at d_min, 1 overshoots by the overlap (the docstring said lambda was the
    fraction of the overlap removed)."""
    x = torch.tensor([[[0.0, 0.0, 0.0], [0.1, 5.0, 0.0], [0.2, 0.0, 0.0]]], dtype=F64)  # 0 and 2 at 0.2
    mask = torch.ones(1, 3, dtype=torch.bool)
    d_min = 0.38
    for strength, want in ((0.5, d_min), (1.0, d_min + (d_min - 0.2)), (0.25, 0.2 + 0.5 * (d_min - 0.2))):
        moved = x + strength * repulsion(x, mask, d_min)
        assert float((moved[0, 2] - moved[0, 0]).norm()) == pytest.approx(want, rel=1e-12)
        assert torch.equal(moved[0, 1], x[0, 1])  # the chain neighbour of both is not pushed


def test_guidance_acts_at_t_max_itself_and_not_one_step_above():
    """'active for t <= t_max': the boundary step t = t_max is guided, t_max + 1 gets the model's eps back."""
    B, N = 3, 9
    mask = torch.ones(B, N, dtype=torch.bool)
    x = clustered(B, N, 0.25, seed=3)
    eps = torch.randn(B, N, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
    gd = ClashGuidance(strength=0.5, min_distance=3.8, max_timestep=50)
    out = guided_eps(gd, x, eps, torch.tensor([49, 50, 51]), mask)
    assert float((out[0] - eps[0]).abs().max()) > 1e-3 and float((out[1] - eps[1]).abs().max()) > 1e-3
    assert torch.equal(out[2], eps[2])


# gaps found by mutation testing (2)
def test_guided_eps_is_the_formula_written_out_with_its_strength_distance_and_scale():
    """eps' = (x_t - sqrt(ab) x0') / sqrt(1 - ab), x0' = x0_hat + lambda F(x0_hat), F the pairwise push below
    d_min / scale, written out pair by pair: a guidance that ignored ``strength`` (always 0.5) or the scale
    passed every other test of ClashGuidance itself."""
    B, N, T = 2, 8, 100
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 6:] = False
    x = clustered(B, N, 0.15, seed=21) * mask[..., None]
    eps = torch.randn(B, N, 3, generator=torch.Generator().manual_seed(22), dtype=F64) * mask[..., None] * 0.1
    t = torch.tensor([7, 30])
    ab = DDPMScheduler(T).schedule.coef("alpha_bars", t, x)
    for strength, d_min, scale in ((0.25, 3.0, 10.0), (0.9, 4.0, 8.0)):
        x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        force = torch.zeros_like(x0)
        for b in range(B):
            for i in range(N):
                for j in range(N):
                    if abs(i - j) >= 2 and mask[b, i] and mask[b, j]:
                        diff = x0[b, i] - x0[b, j]
                        d = diff.norm()
                        force[b, i] += torch.relu(d_min / scale - d) * diff / d
        want = (x - ab.sqrt() * (x0 + strength * force)) / (1 - ab).sqrt()
        want = torch.where(mask[..., None], want, eps)
        got = guided_eps(ClashGuidance(strength=strength, min_distance=d_min, max_timestep=50, scale=scale),
                         x, eps, t, mask, T=T)
        assert float(force.abs().max()) > 0.01  # pairs overlap: not vacuous
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-9), (strength, float((got - want).abs().max()))


def test_coincident_atoms_away_from_the_origin_push_nothing_along_each_other():
    """Atoms 0 and 2 coincide (d = 0 exactly: coordinates whose squares are exact) away from the origin: that
    pair contributes nothing, the others their written-out push (weighting d = 0 pairs by d_min / 1e-12 left a
    1e-4 cancellation error in x_i sum_j w_ij - (W x)_i, invisible for atoms at the origin)."""
    p = [1.0, 0.5, 0.25]
    x = torch.tensor([[p, [1.25, 0.5, 0.25], p, [1.0, 0.75, 0.25], [1.5, 0.5, 0.5]]], dtype=F64)
    mask = torch.ones(1, 5, dtype=torch.bool)
    d_min = 0.38
    want = torch.zeros_like(x)
    for i in range(5):
        for j in range(5):
            diff = x[0, i] - x[0, j]
            d = diff.norm()
            if abs(i - j) >= 2 and d > 0:
                want[0, i] += torch.relu(d_min - d) * diff / d
    got = repulsion(x, mask, d_min)
    assert float(want.abs().max()) > 0.01
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), float((got - want).abs().max())
