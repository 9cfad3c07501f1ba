r"""Motif RMSD after optimal superposition (Kabsch 1976), batched in torch, and the success rate.

For a design's motif residues P (M, 3) and the reference motif Q (M, 3), both centred:

    H = P^T Q,   H = U S V^T (SVD),   d = sign(det(V U^T)),
    R = V diag(1, 1, d) U^T                     (a proper rotation: det R = +1, never a mirror)
    RMSD = sqrt( (1/M) sum_i || R p_i - q_i ||^2 )

The ``d`` correction matters: without it a mirror image of the motif (a chirality error, which a
C-alpha-only diffusion model can make) would superpose perfectly. The arithmetic runs in float64
whatever the input dtype; the RMSD is formed from the rotated coordinates (not from the singular
values), which stays accurate for near-zero RMSDs.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

SUCCESS_RMSD_A = 1.0


def kabsch_rotation(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """R (B, 3, 3) minimising sum ||R p_i - q_i||^2 over rotations, for centred P, Q (B, M, 3)."""
    H = P.transpose(1, 2) @ Q  # (B, 3, 3)
    U, _, Vh = torch.linalg.svd(H)
    V = Vh.transpose(1, 2)
    d = torch.sign(torch.det(V @ U.transpose(1, 2)))
    d = torch.where(d == 0, torch.ones_like(d), d)  # degenerate (collinear) motifs: any sign is optimal
    D = torch.diag_embed(torch.stack([torch.ones_like(d), torch.ones_like(d), d], dim=-1))
    return V @ D @ U.transpose(1, 2)


def motif_rmsd(pred: Union[torch.Tensor, np.ndarray], ref: Union[torch.Tensor, np.ndarray]) -> torch.Tensor:
    """Kabsch RMSD (B,) between pred (B, M, 3) (or (M, 3)) and ref (B, M, 3) or (M, 3) (broadcast).

    Units are those of the input (Angstrom for the success rate). Raises for NaN/Inf input, so a
    broken design can never count as a success.
    """
    pred = torch.as_tensor(pred).to(torch.float64)
    ref = torch.as_tensor(ref).to(torch.float64).to(pred.device)
    if pred.dim() == 2:
        pred = pred[None]
    if ref.dim() == 2 and pred.dim() == 3 and ref.shape == pred.shape[1:]:
        ref = ref[None].expand_as(pred)
    if pred.dim() != 3 or pred.shape[-1] != 3 or ref.shape != pred.shape:
        raise ValueError(f"motif_rmsd: expected pred (B, M, 3) and ref (B, M, 3) or (M, 3), got "
                         f"{tuple(pred.shape)} and {tuple(ref.shape)}")
    if pred.shape[1] == 0:
        raise ValueError("motif_rmsd: empty motif (M = 0)")
    if not bool(torch.isfinite(pred).all()) or not bool(torch.isfinite(ref).all()):
        raise ValueError("motif_rmsd: coordinates contain NaN or Inf")
    P = pred - pred.mean(1, keepdim=True)
    Q = ref - ref.mean(1, keepdim=True)
    R = kabsch_rotation(P, Q)
    diff = P @ R.transpose(1, 2) - Q  # (B, M, 3): R p_i - q_i
    return diff.pow(2).sum(-1).mean(-1).sqrt()


def success_rate(rmsds: Sequence[float], threshold: float = SUCCESS_RMSD_A) -> float:
    """Fraction of designs with motif RMSD < ``threshold`` (1 A by default); NaN counts as a failure."""
    r = np.asarray(list(rmsds), dtype=np.float64)
    if r.size == 0:
        raise ValueError("success_rate: no designs")
    return float(np.mean(np.where(np.isfinite(r), r < threshold, False)))
