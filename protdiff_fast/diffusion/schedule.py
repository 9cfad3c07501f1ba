r"""Noise schedules for DDPM (Ho, Jain & Abbeel 2020), tables computed in float64.

Timesteps run t = 1..T as in the paper; every table has T + 1 entries and index 0 stands for
the clean data (beta_0 = 0, alpha_bar_0 = 1), so ``table[t - 1]`` is always defined.

    alpha_t      = 1 - beta_t
    alpha_bar_t  = prod_{s <= t} alpha_s                                     (DDPM eq. 4)
    beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t          (DDPM eq. 7)

``linear``: beta_t evenly spaced from beta_start (t = 1) to beta_end (t = T) (DDPM; ProtDiff
uses T = 1024 with the same endpoints). ``cosine``: alpha_bar_t = f(t) / f(0) with
f(t) = cos^2((t / T + s) / (1 + s) * pi / 2), beta_t clipped at max_beta (Nichol & Dhariwal 2021).
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, Tuple, Union

import numpy as np
import torch

from protdiff_fast._checks import value_checks_enabled

SCHEDULES = ("linear", "cosine")


class NoiseSchedule:
    """The beta/alpha tables of a DDPM, and per-sample lookups ``coef(name, t)``."""

    def __init__(
        self,
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        kind: str = "linear",
        cosine_s: float = 0.008,
        max_beta: float = 0.999,
    ) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"kind: expected one of {SCHEDULES}, got {kind!r}")
        if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, numbers.Integral) or num_timesteps < 1:
            raise ValueError(f"num_timesteps must be an integer >= 1, got {num_timesteps!r}")
        num_timesteps = int(num_timesteps)
        if kind == "linear" and not (0 < beta_start <= beta_end < 1):
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
        if kind == "cosine":
            # max_beta = 1 gives alpha_bar_T = 0 (x_0 = x_t / 0), 0 gives no noise at all, and s < 0 puts a
            # zero of f at or before t = 0 (alpha_bar = f / f(0) ran to 1e26): all were taken silently
            if not 0 < max_beta < 1:
                raise ValueError(f"max_beta: need 0 < max_beta < 1, got {max_beta}")
            if not (0 <= cosine_s < math.inf):
                raise ValueError(f"cosine_s: need a finite offset s >= 0, got {cosine_s}")
        self.num_timesteps, self.kind = num_timesteps, kind
        self.config = dict(num_timesteps=num_timesteps, beta_start=beta_start, beta_end=beta_end,
                           kind=kind, cosine_s=cosine_s, max_beta=max_beta)
        T = num_timesteps
        f64 = torch.float64
        if kind == "linear":
            betas = torch.linspace(beta_start, beta_end, T, dtype=f64)
        else:
            steps = torch.arange(T + 1, dtype=f64) / T
            f = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
            alpha_bar = f / f[0]
            betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)
        betas = torch.cat([torch.zeros(1, dtype=f64), betas])  # index 0: clean data
        alphas = 1 - betas
        alpha_bars = torch.cumprod(alphas, dim=0)
        alpha_bars_prev = torch.cat([torch.ones(1, dtype=f64), alpha_bars[:-1]])
        beta_tilde = torch.zeros_like(betas)
        beta_tilde[1:] = (1 - alpha_bars_prev[1:]) / (1 - alpha_bars[1:]) * betas[1:]
        self.tables: Dict[str, torch.Tensor] = {
            "betas": betas,
            "alphas": alphas,
            "alpha_bars": alpha_bars,
            "alpha_bars_prev": alpha_bars_prev,
            "beta_tilde": beta_tilde,
            "sqrt_alpha_bars": alpha_bars.sqrt(),
            "sqrt_one_minus_alpha_bars": (1 - alpha_bars).sqrt(),
            # mu_tilde(x_t, x_0) = coef_x0 * x_0 + coef_xt * x_t                  (DDPM eq. 7)
            "posterior_coef_x0": torch.where(betas > 0, betas * alpha_bars_prev.sqrt() / (1 - alpha_bars), 1.0),
            "posterior_coef_xt": torch.where(betas > 0, (1 - alpha_bars_prev) * alphas.sqrt() / (1 - alpha_bars), 0.0),
        }
        self._device_cache: Dict[Tuple[str, torch.device], torch.Tensor] = {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"NoiseSchedule({args})"

    @property
    def betas(self) -> torch.Tensor:
        return self.tables["betas"]

    @property
    def alpha_bars(self) -> torch.Tensor:
        return self.tables["alpha_bars"]

    def check_timesteps(self, t: Union[int, torch.Tensor], batch: int, device: torch.device) -> torch.Tensor:
        """t as a (B,) long tensor on ``device``; an int is broadcast. Raises outside [1, T]."""
        if isinstance(t, np.integer):  # a numpy scalar, as iterating over an array gives
            t = int(t)
        if isinstance(t, bool) or not isinstance(t, (int, torch.Tensor)):
            raise TypeError(f"t: expected an int or an integer tensor, got {type(t).__name__}")
        if isinstance(t, int):
            if not 1 <= t <= self.num_timesteps:  # also for an empty batch
                raise ValueError(f"t: timesteps must lie in [1, {self.num_timesteps}], got {t}")
            t = torch.full((batch,), t, dtype=torch.long, device=device)
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
            raise TypeError(f"t: expected an integer tensor, got dtype {t.dtype}")
        if t.dim() == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t: expected shape ({batch},) (one timestep per sample), got {tuple(t.shape)}")
        if t.device != torch.device(device):
            raise ValueError(f"t: is on device {t.device}, but the samples are on {device}")
        if not value_checks_enabled() or t.numel() == 0:
            return t.long()
        lo, hi = int(t.min()), int(t.max())
        if lo < 1 or hi > self.num_timesteps:
            raise ValueError(f"t: timesteps must lie in [1, {self.num_timesteps}], got values in [{lo}, {hi}]")
        return t.long()

    def coef(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table ``name`` at per-sample t, shaped (B, 1, ..., 1) to broadcast against ``like``."""
        key = (name, like.device)
        table = self._device_cache.get(key)
        if table is None:
            table = self._device_cache[key] = self.tables[name].to(like.device)
        values = table[t].to(like.dtype)
        return values.view(-1, *([1] * (like.dim() - 1)))
