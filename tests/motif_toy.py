"""The toy problem of the SMCDiff tests: correlated Gaussian "backbones" with an exact eps predictor.

x_0 = P z with z ~ N(0, Sigma (x) I_3) over N nodes (P: zero centre of mass), so x_0 ~ N(0, C_0 (x) I_3)
with C_0 = P Sigma P, in ProtDiff's zero-CoM subspace. Under q(x_t | x_0) = N(a x_0, s^2 P) (a^2 = ab_t,
s^2 = 1 - ab_t), x_t ~ N(0, C_t), C_t = a^2 C_0 + s^2 P, and the exact noise predictor is
E[eps | x_t] = s C_t^+ x_t. The motif is the first M nodes, known up to translation: y = A x_0 with
A = (I_M - 11^T / M) S_M. The exact conditional of x_0 given y is Gaussian:

    mean = C_0 A^T (A C_0 A^T)^+ y,     cov = C_0 - C_0 A^T (A C_0 A^T)^+ A C_0      (per axis)
"""
from __future__ import annotations

import numpy as np
import torch

from protdiff_fast.diffusion import DDPMScheduler

N_NODES, N_MOTIF = 6, 3


def make_problem(T: int = 200, beta_end: float = 0.1, length_scale: float = 3.0, seed: int = 0):
    idx = np.arange(N_NODES)
    sigma = 4.0 * np.exp(-np.abs(idx[:, None] - idx[None]) / length_scale)  # strongly correlated chain
    P = np.eye(N_NODES) - 1.0 / N_NODES
    C0 = P @ sigma @ P
    scheduler = DDPMScheduler(T, 1e-4, beta_end, backend="reference")
    ab = scheduler.schedule.alpha_bars.numpy()
    # eps_hat(x_t, t) = s_t C_t^+ x_t; row t of the table is that (N, N) matrix
    eps_mats = np.zeros((T + 1, N_NODES, N_NODES))
    for t in range(1, T + 1):
        Ct = ab[t] * C0 + (1 - ab[t]) * P
        eps_mats[t] = np.sqrt(1 - ab[t]) * np.linalg.pinv(Ct, rcond=1e-10, hermitian=True)
    eps_mats_t = torch.from_numpy(eps_mats)

    def model(x, t, mask):  # (B, N, 3), (B,), (B, N)
        return torch.einsum("bij,bjc->bic", eps_mats_t[t].to(x.dtype), x)

    rng = np.random.default_rng(seed)
    x0 = P @ np.linalg.cholesky(sigma) @ rng.standard_normal((N_NODES, 3))  # one draw: its motif is the condition
    motif = x0[:N_MOTIF] - x0[:N_MOTIF].mean(0)
    A = (np.eye(N_MOTIF) - 1.0 / N_MOTIF) @ np.eye(N_NODES)[:N_MOTIF]
    gain = C0 @ A.T @ np.linalg.pinv(A @ C0 @ A.T, rcond=1e-10, hermitian=True)
    cond_mean = gain @ motif  # (N, 3)
    cond_cov = C0 - gain @ A @ C0  # (N, N), the same for every axis
    return dict(model=model, scheduler=scheduler, motif=motif, cond_mean=cond_mean, cond_cov=cond_cov, C0=C0)


def weighted_moments(result, nodes):
    """Per-design weighted mean (D, n, 3) and covariance (D, n, n) (averaged over axes) of ``nodes``."""
    means, covs = [], []
    for d, parts in enumerate(result.particles):
        w = np.exp(result.log_weights[d])
        w = w / w.sum()
        xs = parts[:, nodes]  # (K, n, 3)
        m = np.einsum("k,knc->nc", w, xs)
        c = np.einsum("k,knc,kmc->nm", w, xs, xs) / 3.0
        means.append(m)
        covs.append(c)
    return np.stack(means), np.stack(covs)
