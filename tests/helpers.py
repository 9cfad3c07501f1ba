"""Shared test utilities: error norms, random rotations, random masks."""
from __future__ import annotations

import math

import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; NaN anywhere gives inf, so it never passes."""
    a, e = actual.detach().double(), expected.detach().double()
    if not bool(torch.isfinite(a).all()):
        return float("inf")
    denom = e.norm().clamp_min(1e-300)
    return float((a - e).norm() / denom)


def assert_close_rel(actual, expected, tol, what=""):
    # a tolerance made of a low-precision reference's own error is inf when that reference gave NaN:
    # then nothing would be checked
    assert math.isfinite(tol), f"{what}: the tolerance is {tol} (the reference it is made of is not finite)"
    err = rel_err(actual, expected)
    diff = (actual.detach().double() - expected.detach().double()).abs()
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e} (max abs diff {float(diff.max()):.3e})"


def random_orthogonal(reflect: bool, generator=None, dtype=torch.float64) -> torch.Tensor:
    """A random 3x3 orthogonal matrix with det -1 when ``reflect`` (else a rotation)."""
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=dtype))
    q = q * torch.sign(torch.diagonal(r))
    if (torch.det(q) < 0) != reflect:
        q[:, 0] = -q[:, 0]
    return q


def random_mask(batch: int, num_nodes: int, generator=None, min_real: int = 1) -> torch.Tensor:
    """(B, N) bool mask with a random number (>= min_real) of real nodes at random positions."""
    mask = torch.zeros(batch, num_nodes, dtype=torch.bool)
    for b in range(batch):
        n_real = int(torch.randint(min(min_real, num_nodes), num_nodes + 1, (1,), generator=generator))
        n_real = max(n_real, min(min_real, num_nodes))
        mask[b, torch.randperm(num_nodes, generator=generator)[:n_real]] = True
    return mask
