r"""Clash guidance: a repulsive potential on the predicted x_0 over the last reverse steps.

A small model's samples come out with a few CA atoms closer than real chains allow (the
``clash_fraction`` / ``with_clash`` metrics). Like the auxiliary potentials of other protein
samplers, this pushes such pairs apart during sampling, on the model's prediction of the data:

    x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t)
    U(x)   = 1/2 sum_{i < j - 1, both real} relu(d_min - |x_i - x_j|)^2
    x0'    = x0_hat - lambda grad U(x0_hat)
    eps'   = (x_t - sqrt(alpha_bar_t) x0') / sqrt(1 - alpha_bar_t)          for t <= t_max

and the step goes on with eps' (any step backend). -grad_i U = sum_j relu(d_min - d_ij) (x_i - x_j) / d_ij
is antisymmetric in (i, j), so the centre of mass does not move; it is E(3)-equivariant (distances
and differences only), and pairs with padding or chain neighbours (|i - j| = 1, bonded at 3.8 A)
never contribute. Units: d_min is ``min_distance`` / ``scale`` model units (Angstrom / Angstrom per
unit); lambda = ``strength`` is dimensionless. Memory O(B N^2) scalars (no (B, N, N, 3) tensor). The
samples are then no longer the model's own: a run records the guidance in its manifest (the
scheduler's config).
"""
from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass
from typing import Dict, Optional

import torch

from protdiff_fast.io.dataset import SCALE_A


@dataclass(frozen=True)
class ClashGuidance:
    # lambda: each atom of an isolated overlapping pair moves lambda * overlap along the pair, so the pair's
    # distance in x0_hat grows by 2 lambda * overlap: 0.5 removes the overlap, 1 overshoots it by as much
    strength: float = 0.5
    min_distance: float = 3.8  # d_min in Angstrom (the clash metric counts pairs below 3.0 A)
    max_timestep: int = 200  # t_max: active for t <= t_max (the steps that settle local geometry)
    scale: float = SCALE_A  # Angstrom per model unit

    def __post_init__(self) -> None:
        for name in ("strength", "min_distance", "scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value) >= 0:
                raise ValueError(f"clash guidance: {name} must be a number >= 0, got {value!r}")
        if not 0 <= float(self.strength) <= 1:
            raise ValueError(f"clash guidance: strength must lie in [0, 1], got {self.strength!r}")
        if float(self.scale) <= 0:
            raise ValueError(f"clash guidance: scale must be > 0, got {self.scale!r}")
        if isinstance(self.max_timestep, bool) or not isinstance(self.max_timestep, numbers.Integral) \
                or self.max_timestep < 1:
            raise ValueError(f"clash guidance: max_timestep must be an integer >= 1, got {self.max_timestep!r}")

    def to_dict(self) -> Dict:
        return {k: (float(v) if isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral) else int(v))
                for k, v in asdict(self).items()}

    def __call__(self, eps_hat: torch.Tensor, t: torch.Tensor, x_t: torch.Tensor, mask: torch.Tensor,
                 alpha_bar: torch.Tensor) -> torch.Tensor:
        """eps' for (B, N, 3) ``eps_hat`` and ``x_t``, (B,) ``t``, (B, N) bool ``mask``, (B, 1, 1) ``alpha_bar``
        (float32 or float64: in bf16 it rounds to 1 near t = 0).

        Samples with t > t_max and padding rows get ``eps_hat`` back unchanged. No host synchronisation
        (the t <= t_max choice is a per-sample select): capturable in a CUDA graph.
        """
        if self.strength == 0:
            return eps_hat
        # in float32 at least, as the steps are: in bf16 1 - alpha_bar rounds to 0 for t <= 10 (eps' = inf)
        work = torch.promote_types(eps_hat.dtype, torch.float32)
        e, x, ab = eps_hat.to(work), x_t.to(work), alpha_bar.to(work)
        sqrt_ab, sqrt_1mab = ab.sqrt(), (1 - ab).sqrt()
        x0_hat = (x - sqrt_1mab * e) / sqrt_ab
        # padding rows are zeroed: their pairs get weight 0 in repulsion, but 0 * NaN (a model's unmasked
        # padding) is NaN in its W @ x and would reach every real row
        x0_hat = torch.where(mask.unsqueeze(-1), x0_hat, torch.zeros_like(x0_hat))
        x0_new = x0_hat + self.strength * repulsion(x0_hat, mask, self.min_distance / self.scale)
        guided = ((x - sqrt_ab * x0_new) / sqrt_1mab).to(eps_hat.dtype)
        return torch.where((t <= self.max_timestep).view(-1, 1, 1) & mask.unsqueeze(-1), guided, eps_hat)


def repulsion(x: torch.Tensor, mask: Optional[torch.Tensor], min_distance: float) -> torch.Tensor:
    """-grad U(x): sum_j relu(d_min - d_ij) (x_i - x_j) / d_ij over real pairs with |i - j| >= 2."""
    B, N, _ = x.shape
    idx = torch.arange(N, device=x.device)
    pairs = (idx[:, None] - idx[None, :]).abs() >= 2
    if mask is not None:
        pairs = pairs & mask[:, :, None] & mask[:, None, :]
    sq = x.square().sum(-1)  # |x_i|^2 + |x_j|^2 - 2 x_i.x_j: no (B, N, N, 3) temporary
    d = (sq.unsqueeze(2) + sq.unsqueeze(1) - 2 * x @ x.transpose(1, 2)).clamp(min=0).sqrt()
    # coincident atoms (d = 0) have no direction to be pushed along: they get none (not NaN)
    w = torch.where(pairs & (d > 0), (min_distance - d).clamp(min=0) / d.clamp(min=1e-12), torch.zeros_like(d))
    # sum_j w_ij (x_i - x_j) = x_i sum_j w_ij - (W x)_i
    return x * w.sum(-1, keepdim=True) - w @ x

