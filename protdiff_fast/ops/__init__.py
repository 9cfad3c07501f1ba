"""Fused ops with a ``backend`` argument: ``"auto"`` (default), ``"reference"``, ``"triton"``, ``"cpu"``.

Each function here only resolves the backend (see :mod:`protdiff_fast.backends`) and calls it;
the math and the contract live in the reference implementation's docstring.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from protdiff_fast.backends import get_impl


def remove_center_of_mass(
    x: torch.Tensor, mask: Optional[torch.Tensor] = None, *, backend: str = "auto"
) -> torch.Tensor:
    """Masked zero-centre-of-mass projection; see :mod:`protdiff_fast.reference.com`."""
    _, fn = get_impl("remove_center_of_mass", backend, x.device)
    return fn(x, mask)


def egnn_pair_aggregate(*args, backend: str = "auto", **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fused EGNN pair aggregation; contract in :mod:`protdiff_fast.reference.egnn`."""
    x = kwargs["x"] if "x" in kwargs else args[0]
    _, fn = get_impl("egnn_pair_aggregate", backend, x.device)
    return fn(*args, **kwargs)


def ddpm_step(schedule, x_t: torch.Tensor, eps_hat: torch.Tensor, t, *, backend: str = "auto", **kwargs):
    """One fused DDPM ancestral step; contract in :func:`protdiff_fast.reference.ddpm.ddpm_step_reference`.

    Keyword arguments: mask, noise (explicit z), seed (int, or (B,) per-sample seeds), generator, variance.
    """
    _, fn = get_impl("ddpm_step", backend, x_t.device)
    return fn(schedule, x_t, eps_hat, t, **kwargs)
