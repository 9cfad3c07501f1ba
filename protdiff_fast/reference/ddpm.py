r"""DDPM over C-alpha coordinates, in plain torch (the ground truth for the fused step).

Ho, Jain & Abbeel (2020), with ProtDiff's restriction to the zero-centre-of-mass subspace:
every Gaussian below is over the real nodes of a sample and projected by P (see
:mod:`protdiff_fast.reference.com`); padding rows stay exactly zero. t runs over 1..T.

    q(x_t | x_0)            = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) P)                 (eq. 4)
    x_t                     = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,  eps = P z
    q(x_{t-1} | x_t, x_0)   = N(mu_tilde, beta_tilde_t P)                                    (eqs. 6-7)
    mu_tilde(x_t, x_0)      = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0
                              + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t
    x_0(x_t, eps)           = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)           (eq. 15)
    mu_theta(x_t, eps_hat)  = 1 / sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_hat)  (eq. 11)
    L_simple                = E || eps - eps_hat(x_t, t) ||^2                                (eq. 14)

Ancestral step (Algorithm 2), per sample b with its own t_b:

    x_{t-1} = P( mu_theta(x_t, eps_hat) + sigma_t z ),  z = P z',  z' ~ N(0, I),  z = 0 at t = 1
    sigma_t^2 = beta_tilde_t ("fixed_small") or beta_t ("fixed_large")
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import numpy as np
import torch

from protdiff_fast._checks import check_finite, check_mask, check_tensor
from protdiff_fast.diffusion.schedule import NoiseSchedule
from protdiff_fast.reference.com import remove_center_of_mass_reference

VARIANCES = ("fixed_small", "fixed_large")
Timesteps = Union[int, torch.Tensor]


class DDPMStepOutput(NamedTuple):
    prev_sample: torch.Tensor  # x_{t-1}
    pred_original_sample: torch.Tensor  # x_0(x_t, eps_hat)
    mean: torch.Tensor  # mu_theta(x_t, eps_hat), projected (SMCDiff weights need it)


def _check_coords(name: str, x: torch.Tensor, like: Optional[torch.Tensor] = None, values: bool = True) -> torch.Tensor:
    if like is None:
        check_tensor(name, x, (None, None, 3))
    else:
        check_tensor(name, x, tuple(like.shape), dtype=like.dtype, device=like.device)
    if values:
        check_finite(name, x)
    return x


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.unsqueeze(-1), x, torch.zeros_like(x))


def sample_noise(
    like: torch.Tensor, mask: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """eps = P z, z ~ N(0, I) with the shape, dtype and device of ``like`` (B, N, 3)."""
    check_tensor("like", like, (None, None, 3))
    z = torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    return remove_center_of_mass_reference(z, mask)


def add_noise(
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: Timesteps,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (eq. 4); padding rows zero."""
    _check_coords("x0", x0)
    _check_coords("noise", noise, x0)
    t = schedule.check_timesteps(t, x0.shape[0], x0.device)
    mask = check_mask(mask, x0.shape[0], x0.shape[1], x0.device)
    x_t = schedule.coef("sqrt_alpha_bars", t, x0) * x0 + schedule.coef("sqrt_one_minus_alpha_bars", t, x0) * noise
    return _masked(x_t, mask)


q_sample = add_noise


def q_posterior(
    schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: Timesteps
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mu_tilde(x_t, x_0), beta_tilde_t) of q(x_{t-1} | x_t, x_0) (eqs. 6-7); the variance is (B, 1, 1)."""
    _check_coords("x0", x0)
    _check_coords("x_t", x_t, x0)
    t = schedule.check_timesteps(t, x0.shape[0], x0.device)
    mean = schedule.coef("posterior_coef_x0", t, x0) * x0 + schedule.coef("posterior_coef_xt", t, x0) * x_t
    return mean, schedule.coef("beta_tilde", t, x0)


def predict_x0_from_eps(schedule: NoiseSchedule, x_t: torch.Tensor, t: Timesteps, eps: torch.Tensor) -> torch.Tensor:
    """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t) (eq. 15)."""
    _check_coords("x_t", x_t)
    _check_coords("eps", eps, x_t)
    t = schedule.check_timesteps(t, x_t.shape[0], x_t.device)
    return (x_t - schedule.coef("sqrt_one_minus_alpha_bars", t, x_t) * eps) / schedule.coef("sqrt_alpha_bars", t, x_t)


def eps_mean(schedule: NoiseSchedule, x_t: torch.Tensor, t: Timesteps, eps: torch.Tensor) -> torch.Tensor:
    """mu_theta = 1 / sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) (eq. 11)."""
    _check_coords("x_t", x_t)
    _check_coords("eps", eps, x_t)
    t = schedule.check_timesteps(t, x_t.shape[0], x_t.device)
    beta = schedule.coef("betas", t, x_t)
    return (x_t - beta / schedule.coef("sqrt_one_minus_alpha_bars", t, x_t) * eps) / schedule.coef("alphas", t, x_t).sqrt()


def l_simple(eps_hat: torch.Tensor, eps: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over real residues of ||eps_i - eps_hat_i||^2 (eq. 14; summed over x, y, z)."""
    _check_coords("eps_hat", eps_hat)
    check_tensor("eps", eps, tuple(eps_hat.shape), dtype=eps_hat.dtype, device=eps_hat.device)
    mask = check_mask(mask, eps_hat.shape[0], eps_hat.shape[1], eps_hat.device)
    per_residue = (eps_hat - eps).pow(2).sum(-1)  # (B, N)
    return per_residue[mask].mean()


def check_step_inputs(
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    eps_hat: torch.Tensor,
    t: Timesteps,
    mask: Optional[torch.Tensor],
    noise: Optional[torch.Tensor],
    variance: str,
    check_values: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validate the arguments of a step (every backend calls this); returns t (B,) and the bool mask.

    ``check_values=False`` skips the NaN/Inf sweep for kernels that check values in their own pass.
    """
    if variance not in VARIANCES:
        raise ValueError(f"variance: expected one of {VARIANCES}, got {variance!r}")
    _check_coords("x_t", x_t, values=check_values)
    _check_coords("eps_hat", eps_hat, x_t, values=check_values)
    if noise is not None:
        _check_coords("noise", noise, x_t)
    B, N, _ = x_t.shape
    if N == 0 and B > 0:  # (every backend says so alike; an empty batch B = 0 is a no-op)
        raise ValueError("x_t: samples have no nodes (N = 0)")
    t = schedule.check_timesteps(t, B, x_t.device)
    return t, check_mask(mask, B, N, x_t.device)


def check_seed(seed, batch: int):
    """The step's ``seed`` as every backend takes it: None, an int in [-2^63, 2^64) (a numpy integer too),
    or an integer tensor of shape (B,) (one seed per sample)."""
    if seed is None:
        return None
    if isinstance(seed, np.integer):
        seed = int(seed)
    if isinstance(seed, torch.Tensor):
        if seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
            raise TypeError(f"seed: per-sample seeds must be an integer tensor, got dtype {seed.dtype}")
        if seed.shape != (batch,):
            raise ValueError(f"seed: expected one seed per sample, shape ({batch},), got {tuple(seed.shape)}")
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int or an integer tensor, got {type(seed).__name__}")
    if not -(1 << 63) <= seed < (1 << 64):
        raise ValueError(f"seed: expected an integer in [-2^63, 2^64), got {seed}")
    return seed


def step_coefficients(schedule: NoiseSchedule, t: torch.Tensor, variance: str) -> dict:
    """Per-sample float64 (B,) coefficients of the fused step, from the schedule tables:

    c1 = 1/sqrt(alpha_t), c2 = beta_t/sqrt(1 - alpha_bar_t), sigma (0 at t = 1),
    x0_a = 1/sqrt(alpha_bar_t), x0_b = sqrt(1/alpha_bar_t - 1).
    """
    tab = schedule.tables
    tc = t.cpu()
    var = (tab["beta_tilde"] if variance == "fixed_small" else tab["betas"])[tc]
    return {
        "c1": 1.0 / tab["alphas"][tc].sqrt(),
        "c2": tab["betas"][tc] / tab["sqrt_one_minus_alpha_bars"][tc],
        "sigma": torch.where(tc > 1, var.sqrt(), torch.zeros_like(var)),
        "x0_a": 1.0 / tab["sqrt_alpha_bars"][tc],
        "x0_b": (1.0 / tab["alpha_bars"][tc] - 1.0).sqrt(),
    }


def ddpm_step_reference(
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    eps_hat: torch.Tensor,
    t: Timesteps,
    *,
    mask: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    seed: Union[int, torch.Tensor, None] = None,
    generator: Optional[torch.Generator] = None,
    variance: str = "fixed_small",
) -> DDPMStepOutput:
    """One ancestral step x_t -> x_{t-1} (Algorithm 2), per-sample t, zero-CoM over real nodes.

    ``noise`` (B, N, 3) replaces the draw of z' (it is projected like a drawn one), so backends
    can be compared on the same randomness; otherwise z' is drawn from ``generator``, from a
    generator seeded with an int ``seed``, or per sample from (seed[b], t[b]) for a (B,) ``seed``.
    bf16 / fp16 inputs are stepped in float32 and the outputs rounded, as the fused steps do: in bf16
    1 / sqrt(alpha_t) rounds to 1 and the chain's variance runs away.
    """
    t, mask = check_step_inputs(schedule, x_t, eps_hat, t, mask, noise, variance)
    seed = check_seed(seed, x_t.shape[0])
    if x_t.dtype not in (torch.float32, torch.float64):
        if noise is None and not isinstance(seed, torch.Tensor):  # the draw as before, in x_t's dtype
            if seed is not None:
                generator = torch.Generator(device=x_t.device).manual_seed(int(seed))
            noise = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype, device=x_t.device)
        out = ddpm_step_reference(schedule, x_t.float(), eps_hat.float(), t, mask=mask,
                                  noise=None if noise is None else noise.float(), seed=seed, variance=variance)
        return DDPMStepOutput(*(v.to(x_t.dtype) for v in out))
    if noise is None:
        if isinstance(seed, torch.Tensor):  # one seed per sample: each sample's noise from (seed_b, t_b)
            if seed.shape != t.shape:
                raise ValueError(f"seed: expected one seed per sample, shape {tuple(t.shape)}, got {tuple(seed.shape)}")
            noise = torch.stack([
                torch.randn(x_t.shape[1:], dtype=torch.float64,
                            generator=torch.Generator().manual_seed((int(sb) * 1000003 + int(tb)) % (1 << 63)))
                for sb, tb in zip(seed.tolist(), t.tolist())]).to(dtype=x_t.dtype, device=x_t.device)
        else:
            if seed is not None:
                generator = torch.Generator(device=x_t.device).manual_seed(int(seed))
            noise = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype, device=x_t.device)
    z = remove_center_of_mass_reference(noise, mask)
    var = schedule.coef("beta_tilde" if variance == "fixed_small" else "betas", t, x_t)
    sigma = torch.where(t.view(-1, 1, 1) > 1, var.sqrt(), torch.zeros_like(var))  # no noise at the last step
    mean = remove_center_of_mass_reference(eps_mean(schedule, x_t, t, eps_hat), mask)
    prev = remove_center_of_mass_reference(mean + sigma * z, mask)
    x0 = _masked(predict_x0_from_eps(schedule, x_t, t, eps_hat), mask)
    return DDPMStepOutput(prev_sample=prev, pred_original_sample=x0, mean=mean)
