"""The fused DDPM ancestral step as one Triton kernel launch per step.

Same contract as :func:`protdiff_fast.reference.ddpm.ddpm_step_reference` (math in that module):
one program per sample b holds the sample's N x 3 coordinates, forms

    mean_b = P( c1[b] (x_t - c2[b] eps_hat) ),   x_{t-1} = P( mean_b + sigma[b] P z ),   x0 = x0_a[b] x_t - x0_b[b] eps_hat

with P the zero-centre-of-mass projection over the sample's real nodes (padding exactly zero) and
sigma[b] = 0 at t = 1. z is the explicit ``noise`` or ``tl.randn`` (Philox) keyed by the sample's
seed and counted by t_b * 3N + element, so the draw depends on the sample's seed and step only.
Coefficients are computed in float64 on the host and applied in float32.
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
import triton
import triton.language as tl

from protdiff_fast.diffusion.schedule import NoiseSchedule
from protdiff_fast.ops.ddpm_cpu import per_sample_seeds
from protdiff_fast.ops.ddpm_grad import needs_step_gradients, step_with_gradients
from protdiff_fast.ops.egnn_triton import _cast, _interpreting
from protdiff_fast.reference.ddpm import DDPMStepOutput, check_seed, check_step_inputs, step_coefficients

MAX_NODES = 16384  # one program holds a whole sample
STEP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NOISE_STRIDE = tl.constexpr(3 * MAX_NODES)  # noise counter per timestep: (t, node, column)


@triton.jit
def _masked_center(v, mf, n_real):
    """P v along the node axis: subtract the mean over real nodes, zero the padding."""
    return (v - tl.sum(v * mf, axis=0) / n_real) * mf


@triton.jit
def _ddpm_step_kernel(
    x_ptr, eps_ptr, noise_ptr, mask_ptr,  # (B, N, 3) x_t, eps_hat, optional noise; (B, N) uint8 mask
    c1_ptr, c2_ptr, sigma_ptr, x0a_ptr, x0b_ptr,  # (B,) float32 per-sample coefficients
    seed_ptr, t_ptr,  # (B,) int64 seeds and timesteps
    prev_ptr, mean_ptr, x0_ptr,  # (B, N, 3) outputs
    N,  # nodes per sample (padded length)
    HAS_NOISE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INTERPRETED: tl.constexpr = False,  # bf16 stores rounded by hand: the interpreter's casts truncate (_cast)
):
    b = tl.program_id(0)
    nodes = tl.arange(0, BLOCK_N)
    valid = nodes < N
    mf = ((tl.load(mask_ptr + b * N + nodes, mask=valid, other=0) != 0) & valid).to(tl.float32)
    n_real = tl.sum(mf, axis=0)
    c1 = tl.load(c1_ptr + b)
    c2 = tl.load(c2_ptr + b)
    sigma = tl.load(sigma_ptr + b)
    x0a = tl.load(x0a_ptr + b)
    x0b = tl.load(x0b_ptr + b)
    seed = tl.load(seed_ptr + b)
    t = tl.load(t_ptr + b)
    base = b * N * 3
    for c in tl.static_range(3):  # x, y, z columns of the (N, 3) block
        offs = base + nodes * 3 + c
        x_t = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        eps_hat = tl.load(eps_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        mean = _masked_center(c1 * (x_t - c2 * eps_hat), mf, n_real)  # mu_theta (DDPM eq. 11), projected
        if HAS_NOISE:
            z = tl.load(noise_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        else:
            # counted by (t, node, column) with a fixed stride, not the padded N: a sample's noise
            # does not depend on the length it is padded to, i.e. on its batch mates
            z = tl.randn(seed, (t * _NOISE_STRIDE + nodes * 3 + c).to(tl.int32))
        z = _masked_center(z, mf, n_real)
        prev = _masked_center(mean + sigma * z, mf, n_real)
        x0 = (x0a * x_t - x0b * eps_hat) * mf
        tl.store(prev_ptr + offs, _cast(prev, prev_ptr.dtype.element_ty, INTERPRETED), mask=valid)
        tl.store(mean_ptr + offs, _cast(mean, mean_ptr.dtype.element_ty, INTERPRETED), mask=valid)
        tl.store(x0_ptr + offs, _cast(x0, x0_ptr.dtype.element_ty, INTERPRETED), mask=valid)


def _seeds(seed, generator, batch: int, device) -> torch.Tensor:
    """(B,) int64 per-sample seeds, derived exactly as the C++ step derives them. A (B,) integer
    tensor already on the device is used as is (no host round trip: CUDA-graph safe)."""
    if isinstance(seed, torch.Tensor) and seed.device == torch.device(device) and seed.shape == (batch,) \
            and seed.dtype == torch.int64:
        return seed
    if seed is None:
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    return torch.from_numpy(per_sample_seeds(seed, batch).view(np.int64).copy()).to(device)


def _coefficient_tables(schedule: NoiseSchedule, variance: str, device) -> dict:
    """float32 tables (T + 1,) of the step coefficients on ``device``, indexed by t (row 0 unused),
    computed once in float64: per step a device gather instead of a host round trip."""
    key = ("ddpm_step_triton", variance, torch.device(device))
    tables = schedule._device_cache.get(key)
    if tables is None:
        ts = torch.arange(1, schedule.num_timesteps + 1)
        full = step_coefficients(schedule, ts, variance)
        tables = {k: torch.cat([v[:1], v]).to(device=device, dtype=torch.float32) for k, v in full.items()}
        schedule._device_cache[key] = tables
    return tables


def ddpm_step_triton(
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    eps_hat: torch.Tensor,
    t,
    *,
    mask: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    seed: Union[int, torch.Tensor, None] = None,
    generator: Optional[torch.Generator] = None,
    variance: str = "fixed_small",
) -> DDPMStepOutput:
    if x_t.dtype not in STEP_DTYPES:  # the kernel computes in float32: float64 would come back float32-exact only
        raise ValueError(f"x_t: the triton step runs float32, bfloat16 and float16, got {x_t.dtype} "
                         "(backend='auto' runs float64 on the reference)")
    t, mask = check_step_inputs(schedule, x_t, eps_hat, t, mask, noise, variance)
    seed = check_seed(seed, x_t.shape[0])
    if needs_step_gradients(x_t, eps_hat, noise):
        return step_with_gradients(ddpm_step_triton, schedule, x_t, eps_hat, t, mask, noise, variance, seed=seed,
                                   generator=generator)
    B, N, _ = x_t.shape
    if N > MAX_NODES:
        raise ValueError(f"x_t: the triton step holds a sample in one program; N = {N} > {MAX_NODES}")
    device = x_t.device
    if schedule.num_timesteps * MAX_NODES * 3 >= 2 ** 31:
        raise ValueError(f"schedule: the triton step counts noise in int32; T = {schedule.num_timesteps} is too long")
    coefs = {k: v[t] for k, v in _coefficient_tables(schedule, variance, device).items()}
    x = x_t.contiguous()
    e = eps_hat.contiguous()
    z = noise.contiguous() if noise is not None else x  # placeholder pointer when unused
    prev, mean, x0 = (torch.empty_like(x) for _ in range(3))
    _ddpm_step_kernel[(B,)](
        x, e, z, mask.to(torch.uint8).contiguous(),
        coefs["c1"], coefs["c2"], coefs["sigma"], coefs["x0_a"], coefs["x0_b"],
        _seeds(seed if noise is None else 0, generator, B, device), t.contiguous(),
        prev, mean, x0, N,
        HAS_NOISE=noise is not None, BLOCK_N=triton.next_power_of_2(max(N, 16)), INTERPRETED=_interpreting(),
    )
    return DDPMStepOutput(prev_sample=prev, pred_original_sample=x0, mean=mean)
