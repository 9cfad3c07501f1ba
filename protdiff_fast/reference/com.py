"""Masked centre-of-mass projection (plain torch reference).

DDPM over C-alpha coordinates lives in the zero-centre-of-mass subspace: translations carry no
information, so noise, samples and model outputs are all projected onto it. For sample b with
real nodes R_b (mask) and n_b = |R_b|:

    (P x)_i = x_i - (1 / n_b) sum_{j in R_b} x_j    for i in R_b
    (P x)_i = 0                                      for padding nodes

P is linear and symmetric (an orthogonal projector on the real nodes), so it is its own adjoint:
the gradient of P x is P applied to the incoming gradient.
"""
from __future__ import annotations

from typing import Optional

import torch

from protdiff_fast._checks import check_mask, check_tensor


def remove_center_of_mass_reference(x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """P x for x (B, N, D) and mask (B, N); padding rows come out exactly zero."""
    check_tensor("x", x, (None, None, None))
    mask = check_mask(mask, x.shape[0], x.shape[1], x.device)
    keep = mask.unsqueeze(-1)  # (B, N, 1)
    x = torch.where(keep, x, torch.zeros_like(x))  # not x * mask: padding may hold NaN (NaN * 0 = NaN)
    n_real = keep.to(x.dtype).sum(dim=1, keepdim=True)  # (B, 1, 1)
    centroid = x.sum(dim=1, keepdim=True) / n_real  # (B, 1, D)
    return torch.where(keep, x - centroid, torch.zeros_like(x))
