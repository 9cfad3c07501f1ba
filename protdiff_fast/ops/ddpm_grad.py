"""Gradients of the fused DDPM step, shared by its cpu and triton backends.

The step is linear in its inputs (math in :mod:`protdiff_fast.reference.ddpm`):

    mean = P( c1 (x_t - c2 eps_hat) ),   x_{t-1} = mean + sigma P z,   x0 = M( x0_a x_t - x0_b eps_hat )

with P the masked zero-centre-of-mass projection (symmetric, so its own adjoint) and M the padding
mask. The kernels write the three outputs from detached buffers; this autograd.Function gives them
the adjoint of that map, so a fused step propagates gradients exactly as the reference step does
(before, the cpu and triton steps silently cut the graph at x_t and eps_hat).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from protdiff_fast.reference.com import remove_center_of_mass_reference
from protdiff_fast.reference.ddpm import DDPMStepOutput, step_coefficients


def needs_step_gradients(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class FusedStepFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_t, eps_hat, noise, run: Callable[..., DDPMStepOutput], schedule, t, mask, variance):
        out = run(x_t, eps_hat, noise)  # the fused kernel on these (detached) buffers
        coef = step_coefficients(schedule, t, variance)
        ctx.save_for_backward(torch.stack([coef[k] for k in ("c1", "c2", "sigma", "x0_a", "x0_b")], dim=1).to(x_t.device), mask)
        ctx.has_noise = noise is not None
        return tuple(out)

    @staticmethod
    def backward(ctx, g_prev, g_x0, g_mean):
        coef, mask = ctx.saved_tensors
        c1, c2, sigma, x0_a, x0_b = (c.to(g_prev.dtype).view(-1, 1, 1) for c in coef.unbind(1))
        g = remove_center_of_mass_reference(g_prev + g_mean, mask)  # P^T = P
        g_x0 = torch.where(mask.unsqueeze(-1), g_x0, torch.zeros_like(g_x0))
        grad_x = c1 * g + x0_a * g_x0
        grad_eps = -(c1 * c2) * g - x0_b * g_x0
        grad_noise = sigma * remove_center_of_mass_reference(g_prev, mask) if ctx.has_noise else None
        return grad_x, grad_eps, grad_noise, None, None, None, None, None


def step_with_gradients(step: Callable[..., DDPMStepOutput], schedule, x_t, eps_hat, t, mask, noise, variance,
                        **kwargs) -> DDPMStepOutput:
    """``step`` (a fused backend's ddpm_step) on detached inputs, its outputs tied to x_t, eps_hat and
    noise by the step's adjoint. ``t`` (B,) and ``mask`` (B, N) bool as validated by the caller."""
    def run(x, e, z):
        return step(schedule, x.detach(), e.detach(), t, mask=mask, noise=None if z is None else z.detach(),
                    variance=variance, **kwargs)

    out = FusedStepFunction.apply(x_t, eps_hat, noise, run, schedule, t, mask, variance)
    return DDPMStepOutput(*out)
