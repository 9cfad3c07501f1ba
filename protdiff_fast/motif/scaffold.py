r"""Motif scaffolding with an unconditional DDPM: replacement, a fixed-motif baseline, and SMCDiff.

Notation: x_t (N, 3) a backbone at diffusion time t, M the motif positions, S the rest (scaffold),
D the operator that centres the motif rows on their own centroid, y_0 = D x^M_0 the motif, as
known: its shape only, since a motif is given up to a rigid motion (the EGNN is rotation
equivariant, so a fixed orientation costs nothing; the translation is handled below).

**The motif trajectory.** ProtDiff's forward process lives in the zero-centre-of-mass subspace:
x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) P eps. Since D P = D (centring the motif removes any common
translation), y_t = D x^M_t = sqrt(ab_t) y_0 + sqrt(1 - ab_t) D eps: the motif's shape follows the
same DDPM in the motif-centred subspace. Each design draws one forward trajectory of it, as a
Markov chain over the sampler's timesteps tau_0 = 0 < tau_1 < ... < tau_S (so consecutive values
are consistent, which the SMCDiff weights need):

    y_{tau_i} = sqrt(ab_{tau_i} / ab_{tau_{i-1}}) y_{tau_{i-1}} + sqrt(1 - ab_{tau_i} / ab_{tau_{i-1}}) D eps_i

and all particles of the design share it (SMCDiff, Trippe et al. 2022, Algorithm 1, line 2).

**Replacement** (SMCDiff paper, Section 3.1, "replacement method"): before every model call the
motif rows of x_t are overwritten with y_t *plus the particle's current motif centroid*:
x^M_t <- y_t + mean(x^M_t). Only the motif's shape is imposed, so the overall centre of mass stays
0 (the model's input stays in its training subspace) and the scaffold keeps its freedom to sit
anywhere around the motif. Overwriting absolute coordinates instead would shift the whole frame at
every step. **Fixed** (a baseline): the same with y_0 at every step (motif held at the data).

**SMCDiff** (Algorithm 1): K particles per design run the replacement sampler; after each step
t -> t', the particle's weight is multiplied by the likelihood of the motif's next state under the
model's reverse transition p_theta(x_{t'} | x_t) = N(mu_theta(x_t), sigma_t^2 P), restricted to the
motif shape:

    log w_k += -1/2 || y_{t'} - D mu_theta^M(x_t^k) ||^2 / sigma_t^2          (Algorithm 1, line 7)

(the original code's ``log_impt_weights``, with D added for the translation). Weights are kept as
float64 log-weights normalised per design with logsumexp (no underflow to an all-zero set). When a
design's effective sample size ESS = 1 / sum_k w_k^2 falls below ``ess_threshold * K`` (or, with
``resample_when="departure"``, when sum_k |K w_k - 1| > 0.75 K as in the original code), its
particles are resampled (systematic or residual resampling, both unbiased: E[copies of k] = K w_k)
and its weights reset to 1/K. No weight is applied on the last step (sigma = 0).

Resampling reuses the fused step's output: the step returns x_{t'} = P(mu + sigma z) and mu, so
the slot k that takes ancestor a gets mu_a + (x_{t'}^k - mu_k): the ancestor's mean with slot k's
own fresh noise. Duplicated particles therefore diverge at once, and one fused step per reverse
step serves all K x D particles, run as one batch through the model.

Every random draw of design d (its motif trajectory, its particles' noise, keyed by particle seed
and t as sample()'s steps, its resampling) comes from streams of SplitMix64(seed, d): design d of
a run is design d of a larger run with the same seed and options.

The returned designs are the model's own final x_0 (the motif rows are *not* pasted over at the
end), so the motif RMSD of a design measures where the model put the motif.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from protdiff_fast._checks import check_device
from protdiff_fast.diffusion.scheduler import DDPMScheduler
from protdiff_fast.diffusion.sampler import DIVERGED_UNITS, _scheduler_for, initial_noise
from protdiff_fast.diffusion.scheduler import _per_sample_noise
from protdiff_fast.nn.batch_invariant import batch_invariant as invariant_products
from protdiff_fast.ops.ddpm_cpu import per_sample_seeds
from protdiff_fast.reference.com import remove_center_of_mass_reference

METHODS = ("smc", "replacement", "fixed")
RESAMPLERS = ("systematic", "residual")
RESAMPLE_WHEN = ("ess", "departure")

EpsModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class AutocastEps:
    """``model`` called under ``torch.autocast(dtype)`` (GEMMs and the EGNN pair op in bf16/fp16, the
    coordinates in float32), its eps returned in x's dtype: the particles, the motif trajectory, the
    reverse-transition means and the SMCDiff log-weights stay float32. No autocast cast cache (like the
    sampler's DenoiseStep). Other attributes (``max_length``) are the model's."""

    def __init__(self, model: EpsModel, dtype: torch.dtype) -> None:
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"autocast: torch.bfloat16 or torch.float16, got {dtype!r}")
        self.model, self.dtype = model, dtype

    def __call__(self, x: torch.Tensor, t: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype, cache_enabled=False):
            eps = self.model(x, t, mask)
        return eps.to(x.dtype)

    def __getattr__(self, name):
        return getattr(self.__dict__["model"], name)


class ScaffoldingError(RuntimeError):
    """The run cannot go on (NaN/Inf model output or weights); the message names step and design."""


# ---------------------------------------------------------------------------------------------
# resampling


def _check_weights(weights: torch.Tensor) -> torch.Tensor:
    w = torch.as_tensor(weights, dtype=torch.float64)
    if w.dim() != 1 or w.numel() < 1:
        raise ValueError(f"weights: expected a non-empty 1-D tensor, got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError("weights: must be finite, non-negative and not all zero")
    return w / w.sum()


def systematic_resample(weights: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Ancestor indices (K,) by systematic resampling: one uniform u, points (u + k) / K.

    Particle i gets floor(K w_i) or ceil(K w_i) copies, with E[copies] = K w_i (Kitagawa 1996).
    """
    return systematic_resample_rows(_check_weights(weights)[None], generator)[0]


def systematic_resample_rows(weights: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Systematic resampling of every row of normalised weights (D, K) at once: ancestors (D, K)."""
    D, K = weights.shape
    u = (torch.rand(D, 1, generator=generator, dtype=torch.float64) + torch.arange(K, dtype=torch.float64)) / K
    cdf = torch.cumsum(weights.to(torch.float64), 1)
    cdf[:, -1] = 1.0  # rounding must not leave the last point past the end
    return torch.searchsorted(cdf, u, right=True).clamp_(max=K - 1)


def residual_resample(weights: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Ancestor indices (K,) by residual resampling (Liu & Chen 1998; the original SMCDiff code's choice).

    floor(K w_i) copies of each particle, then the R = K - sum floor(K w_i) remaining slots drawn
    with probabilities proportional to the residuals K w_i - floor(K w_i): E[copies] = K w_i.
    """
    w = _check_weights(weights)
    K = w.numel()
    Kw = K * w
    counts = torch.floor(Kw)
    residual = Kw - counts
    R = K - int(counts.sum())
    while R < 0:  # rounding pushed a floor one too high: take it back from the largest
        counts[int(torch.argmax(counts))] -= 1
        R += 1
    if R > 0:
        if float(residual.sum()) <= 0:
            residual = w.clone()
        draws = torch.multinomial(residual / residual.sum(), R, replacement=True, generator=generator)
        counts += torch.bincount(draws, minlength=K).to(counts.dtype)
    return torch.repeat_interleave(torch.arange(K), counts.long())


RESAMPLE_FNS = {"systematic": systematic_resample, "residual": residual_resample}


def effective_sample_size(log_weights: torch.Tensor) -> torch.Tensor:
    """ESS = 1 / sum_k w_k^2 over the last dimension of normalised log-weights."""
    return torch.exp(-torch.logsumexp(2 * log_weights, dim=-1))


# ---------------------------------------------------------------------------------------------
# the sampler


@dataclass
class ScaffoldResult:
    """Final particles of every design, with their weights and the run's SMC log."""

    particles: List[np.ndarray]  # per design: (K, length_d, 3) final x_0, model units
    log_weights: np.ndarray  # (D, K) normalised final log-weights (uniform for replacement/fixed)
    chosen: np.ndarray  # (D,) the particle reported per design (drawn by the final weights for smc)
    motif_positions: np.ndarray  # (D, M) 0-based positions of the motif residues in each design
    timesteps: List[int]  # the reverse steps run, descending
    ess: np.ndarray  # (S, D) ESS after each step's weighting (NaN where no weighting happened)
    resampled: np.ndarray  # (S, D) bool: design resampled at that step
    events: List[Dict] = field(default_factory=list)  # one dict per resampling: step, t, design, ess

    def design(self, d: int) -> np.ndarray:
        """The reported backbone of design d, model units (L_d, 3)."""
        return self.particles[d][int(self.chosen[d])]


def needs_resampling(w: torch.Tensor, ess: torch.Tensor, resample_when: str, ess_threshold: float) -> torch.Tensor:
    """Which designs resample now, from their normalised weights ``w`` (D, K) and ESS (D,): ESS below
    ess_threshold K ("ess"), or the original code's total departure from uniform weights,
    sum_k |K w_k - 1| > 3/4 K ("departure")."""
    K = w.shape[1]
    if resample_when == "ess":
        # uniform weights' ESS comes out 1e-15 relative under K for most K (5, 7, 8, 16, 64): at
        # ess_threshold 1 ("resample whenever the weights are not uniform") they would be resampled
        return ess < ess_threshold * K * (1 - 1e-9)
    return (K * w - 1).abs().sum(1) > 0.75 * K


def transition_sigma(scheduler: DDPMScheduler, t: int, t_prev: int) -> float:
    """The standard deviation of p_theta(x_{t_prev} | x_t) that ``scheduler.step`` uses (0 on the last step)."""
    tab = scheduler.schedule.tables
    if t_prev == 0:
        return 0.0
    if not scheduler.strided:  # the fused ancestral step: fixed_small or fixed_large (DDPM Section 3.2)
        var = tab["beta_tilde" if scheduler.variance_type == "fixed_small" else "betas"][t]
        return float(var.sqrt())
    ab, ab_prev = float(tab["alpha_bars"][t]), float(tab["alpha_bars"][t_prev])  # DDIM eq. 16
    return scheduler.eta * math.sqrt((1 - ab_prev) / (1 - ab)) * math.sqrt(1 - ab / ab_prev)


def _centre(y: torch.Tensor) -> torch.Tensor:
    return y - y.mean(dim=-2, keepdim=True)


def motif_trajectory(scheduler: DDPMScheduler, motif: torch.Tensor, generators: Sequence[torch.Generator],
                     ascending: Sequence[int]) -> torch.Tensor:
    """One forward trajectory of the motif shape per design: (len(ascending), D, M, 3) float64.

    ``ascending`` = [0, tau_1, ..., tau_S]; row 0 is y_0 (centred ``motif``, (D, M, 3)); row i is
    y_{tau_i}, drawn from q(y_{tau_i} | y_{tau_{i-1}}) with each design's own generator.
    """
    ab = scheduler.schedule.tables["alpha_bars"]
    D, M, _ = motif.shape
    noise = torch.stack([torch.randn(len(ascending) - 1, M, 3, generator=g, dtype=torch.float64)
                         for g in generators], dim=1)  # (S, D, M, 3)
    traj = torch.empty(len(ascending), D, M, 3, dtype=torch.float64)
    traj[0] = _centre(motif.to(torch.float64))
    for i in range(1, len(ascending)):
        ratio = float(ab[ascending[i]] / ab[ascending[i - 1]])
        traj[i] = math.sqrt(ratio) * traj[i - 1] + math.sqrt(1 - ratio) * _centre(noise[i - 1])
    return traj


def replace_motif(x: torch.Tensor, motif_index: torch.Tensor, motif_shape: torch.Tensor) -> torch.Tensor:
    """x with its motif rows set to ``motif_shape`` (centred, (B, M, 3)) + the rows' current centroid.

    x (B, N, 3), motif_index (B, M) positions. The motif rows' centroid, hence the overall centre
    of mass, is unchanged.
    """
    idx3 = motif_index.unsqueeze(-1).expand(-1, -1, 3)
    centroid = x.gather(1, idx3).mean(1, keepdim=True)  # (B, 1, 3)
    return x.scatter(1, idx3, (motif_shape.to(x.dtype) + centroid))


@torch.no_grad()  # sampling: no graph over the steps (SMC weights go through numpy, which refuses one)
def scaffold(
    model: EpsModel,
    motif: Union[torch.Tensor, np.ndarray],
    lengths: Sequence[int],
    motif_positions: Union[torch.Tensor, np.ndarray],
    *,
    method: str = "smc",
    particles: int = 64,
    scheduler: Optional[DDPMScheduler] = None,
    num_inference_steps: Optional[int] = None,
    seed: int = 0,
    resampler: str = "systematic",
    resample_when: str = "ess",
    ess_threshold: float = 0.5,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    log: Optional[Callable[[str], None]] = None,
) -> ScaffoldResult:
    """Scaffold ``motif`` (M, 3) or (D, M, 3), model units, into D designs of the given ``lengths``.

    ``motif_positions`` (D, M): where motif row m sits in design d. ``model(x_t, t, mask) -> eps``.
    All K = ``particles`` particles of all D designs form one batch of D K samples (padded to the
    longest design). ``log`` receives progress lines that also read well in a non-TTY log.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if resampler not in RESAMPLERS:
        raise ValueError(f"resampler: expected one of {RESAMPLERS}, got {resampler!r}")
    if resample_when not in RESAMPLE_WHEN:
        raise ValueError(f"resample_when: expected one of {RESAMPLE_WHEN}, got {resample_when!r}")
    if isinstance(particles, bool) or not isinstance(particles, (int, np.integer)) or particles < 1:
        raise ValueError(f"particles must be an integer >= 1, got {particles!r}")
    if not 0.0 < ess_threshold <= 1.0:
        raise ValueError(f"ess_threshold must lie in (0, 1], got {ess_threshold}")
    if method == "smc" and dtype not in (torch.float32, torch.float64):
        # the weights compare the motif with each particle's mean on the scale of sigma_t (~0.01 model
        # units near t = 1): bf16 means are off by more than that, and the resampling follows the noise
        raise ValueError(f"dtype: SMCDiff's particles and weights need float32 or float64, got {dtype}; for a "
                         "low-precision model wrap it as AutocastEps(model, torch.bfloat16) (the CLI's --autocast)")
    K = int(particles)
    device = check_device(device)
    # integers only: int() / a long cast truncated 10.7 to 10 and a position 2.5 to 2 without a word
    bad = [n for n in lengths if isinstance(n, bool) or not float(n).is_integer()]
    if bad:
        raise ValueError(f"lengths: whole numbers expected, got {bad[:5]}")
    lengths = [int(n) for n in lengths]
    D = len(lengths)
    if D < 1:
        raise ValueError("lengths: no designs")
    positions = np.asarray(motif_positions.cpu() if isinstance(motif_positions, torch.Tensor) else motif_positions)
    if positions.size and not (np.issubdtype(positions.dtype, np.integer)
                               or (np.issubdtype(positions.dtype, np.floating)
                                   and bool(np.all(np.isfinite(positions) & (positions == np.round(positions)))))):
        raise ValueError(f"motif_positions: integer positions expected, got {positions.dtype} "
                         f"{positions.ravel()[:10].tolist()}")
    positions = torch.as_tensor(positions.astype(np.int64))
    motif = torch.as_tensor(np.asarray(motif) if not isinstance(motif, torch.Tensor) else motif).to(torch.float64)
    if motif.dim() == 2:
        motif = motif.unsqueeze(0).expand(D, -1, -1)
    if motif.dim() != 3 or motif.shape[0] != D or motif.shape[-1] != 3 or motif.shape[1] < 1:
        raise ValueError(f"motif: expected (M, 3) or ({D}, M, 3) with M >= 1, got {tuple(motif.shape)}")
    M = motif.shape[1]
    if not bool(torch.isfinite(motif).all()):
        raise ValueError("motif: contains NaN or Inf")
    if positions.shape != (D, M):
        raise ValueError(f"motif_positions: expected shape ({D}, {M}), got {tuple(positions.shape)}")
    for d in range(D):
        p = positions[d]
        if int(p.min()) < 0 or int(p.max()) >= lengths[d] or len(set(p.tolist())) != M:
            raise ValueError(f"motif_positions: design {d} needs {M} distinct positions in [0, {lengths[d]}), "
                             f"got {p.tolist()[:10]}")
    max_length = getattr(model, "max_length", None)
    if max_length is not None and max(lengths) > max_length:
        raise ValueError(f"lengths: {max(lengths)} exceeds the model's max_length {max_length}")

    # the model's own noise schedule when none is given, and a given one must match it (as sample()):
    # the default DDPMScheduler() is T = 1000, the shipped model's is T = 1024
    scheduler = _scheduler_for(model, scheduler)
    if method == "smc" and getattr(scheduler, "eta", 1.0) != 1.0:
        raise ValueError(f"scheduler: eta={scheduler.eta} with method 'smc': the SMCDiff weights need the ancestral "
                         "reverse transition (eta 1), whose motif trajectory is the forward chain's (at eta 0 sigma "
                         "is 0 and no weighting happens)")
    if method == "smc" and getattr(scheduler, "noise_scale", 1.0) != 1.0:
        raise ValueError(f"scheduler: noise_scale={scheduler.noise_scale} with method 'smc': the SMCDiff weights are "
                         "the motif's likelihood under the model's reverse transition (noise_scale 1)")
    if method == "smc" and getattr(scheduler, "clash_guidance", None) is not None:
        raise ValueError("scheduler: clash_guidance with method 'smc': the SMCDiff weights are the motif's "
                         "likelihood under the model's own reverse transition; use it with 'replacement'")
    # None: the steps the scheduler was set to (all T unless its set_timesteps was called), not a reset
    scheduler.set_timesteps(num_inference_steps if num_inference_steps is not None
                            else scheduler.num_inference_steps)
    steps = [int(t) for t in scheduler.timesteps.tolist()]  # descending
    ascending = [0] + steps[::-1]
    seeds = per_sample_seeds(int(seed), D)

    def gen(s: int, salt: int) -> torch.Generator:  # independent streams per design and purpose
        return torch.Generator().manual_seed(int(per_sample_seeds(int(s) ^ salt, 1)[0]) & ((1 << 63) - 1))

    # every random draw of design d comes from streams of its own seed: design d of a run is design d of
    # a larger run with the same seed (as sample()), and no design depends on the others or on K of them
    traj_gens = [gen(s, 0x11) for s in seeds]  # the motif trajectory
    resample_gens = [gen(s, 0x44) for s in seeds]  # resampling and the final draw
    particle_seeds = np.concatenate([per_sample_seeds(int(s) ^ 0x33, K) for s in seeds])  # (D K,)
    traj = motif_trajectory(scheduler, motif, traj_gens, ascending)  # (S + 1, D, M, 3) float64
    if method == "fixed":  # the motif held at the data at every step
        traj = traj[:1].expand_as(traj)

    B, L = D * K, max(lengths)
    design_of = torch.arange(B) // K
    mask = torch.zeros(B, L, dtype=torch.bool)
    for d in range(D):
        mask[d * K:(d + 1) * K, : lengths[d]] = True
    motif_index = positions[design_of].to(device)  # (B, M)
    mask = mask.to(device)

    step_seeds = torch.from_numpy(particle_seeds.view(np.int64).copy())
    invariant = device.type == "cpu"  # as sample(): BLAS's shape-picked kernels would tie a design to its batch

    def particle_noise(tt: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # z' ~ N(0, I) keyed by (particle seed, t) as sample()'s steps; padding is zeroed by the masked ops
        return _per_sample_noise(step_seeds, tt, x)

    x = initial_noise(particle_seeds.tolist(), L, mask, dtype, device)  # x_T = P z per particle
    x = replace_motif(x, motif_index, traj[-1][design_of].to(device))
    log_w = torch.full((D, K), -math.log(K), dtype=torch.float64)
    S = len(steps)
    ess_log = np.full((S, D), np.nan)
    resampled_log = np.zeros((S, D), dtype=bool)
    events: List[Dict] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=S, unit="step", desc=f"scaffold ({method}, {D}x{K})", dynamic_ncols=True,
                   mininterval=0.1 if sys.stderr.isatty() else 15.0)
    pending_events = 0
    for s, t in enumerate(steps):
        i = len(ascending) - 1 - s  # ascending[i] == t
        t_prev = ascending[i - 1]
        tt = torch.full((B,), t, dtype=torch.long, device=device)
        with invariant_products(invariant):
            eps = model(x, tt, mask)
        bad = ~torch.isfinite(eps).flatten(1).all(1)
        if bool(bad.any()):
            b = int(bad.nonzero()[0])
            raise ScaffoldingError(f"model output is NaN/Inf at t={t} for design {b // K} (particle {b % K})")
        out = scheduler.step(eps, tt, x, mask=mask, noise=particle_noise(tt, x))
        prev, mean = out.prev_sample, out.mean
        sigma = transition_sigma(scheduler, t, t_prev)
        if method == "smc" and sigma > 0 and K > 1:
            idx3 = motif_index.unsqueeze(-1).expand(-1, -1, 3)
            mu_motif = _centre(mean.gather(1, idx3).to(torch.float64)).cpu()  # D mu_theta^M, (B, M, 3)
            y_prev = traj[i - 1][design_of]
            increment = -0.5 * (y_prev - mu_motif).pow(2).sum((1, 2)) / sigma ** 2  # Algorithm 1, line 7
            log_w = log_w + increment.view(D, K)
            log_w = log_w - torch.logsumexp(log_w, dim=1, keepdim=True)
            finite = torch.isfinite(log_w).all(1)
            if not bool(finite.all()):
                d = int((~finite).nonzero()[0])
                raise ScaffoldingError(
                    f"SMC weights of design {d} are NaN/Inf at t={t} (all {K} particles degenerate: the motif "
                    "likelihood overflowed, e.g. from exploding coordinates); nothing to resample from")
            ess = effective_sample_size(log_w)  # (D,)
            ess_log[s] = ess.numpy()
            w = log_w.exp()
            need = needs_resampling(w, ess, resample_when, ess_threshold)
            if bool(need.any()):
                chosen_designs = need.nonzero().flatten()
                resample = systematic_resample if resampler == "systematic" else residual_resample
                local = torch.stack([resample(w[d], resample_gens[d]) for d in chosen_designs.tolist()])
                ancestors = torch.arange(B).view(D, K)
                ancestors[chosen_designs] = chosen_designs.view(-1, 1) * K + local
                ancestors = ancestors.flatten()
                for d in chosen_designs.tolist():
                    events.append(dict(step=s, t=t, design=d, ess=float(ess[d])))
                resampled_log[s, chosen_designs.numpy()] = True
                log_w[chosen_designs] = -math.log(K)  # weights reset after resampling
                # slot k takes ancestor a's mean with its own noise: duplicates diverge at once. Only the
                # resampled designs' rows: mean + (prev - mean) is not prev in floating point, and the other
                # designs must not depend on whether a batch mate resampled
                rows = torch.isin(design_of, chosen_designs).nonzero().flatten()
                anc, rows = ancestors[rows].to(device), rows.to(device)
                prev = prev.index_copy(0, rows, mean[anc] + (prev[rows] - mean[rows]))
                pending_events += int(need.sum())
        if t_prev > 0:
            x = replace_motif(prev, motif_index, traj[i - 1][design_of].to(device))
        else:
            x = prev  # the model's own x_0: the motif is not pasted over at the end
        gone = ~(x.abs().flatten(1).amax(1) <= DIVERGED_UNITS)  # NaN compares False: caught too
        if bool(gone.any()):  # as sample(): named here, not as a NaN inside the model at the next step
            b = int(gone.nonzero()[0])
            raise ScaffoldingError(f"design {b // K} (particle {b % K}, length {lengths[b // K]}) diverged after the "
                                   f"step at t={t} (coordinates beyond {DIVERGED_UNITS:g} model units, or NaN/Inf): "
                                   "too short for this model, or too few steps")
        if bar is not None:
            bar.update(1)
            if method == "smc" and K > 1:
                bar.set_postfix(min_ess=f"{np.nanmin(ess_log[s]):.1f}/{K}" if not np.isnan(ess_log[s]).all() else "-",
                                resamplings=len(events))
        if log is not None and method == "smc" and K > 1 and (s % 100 == 99 or s == S - 1):
            row = ess_log[s]
            ess_text = f"{np.nanmin(row):.1f}/{K}" if not np.isnan(row).all() else "n/a"
            log(f"step {s + 1}/{S} (t={t}): min ESS {ess_text}, {pending_events} resamplings since the last line, "
                f"{len(events)} in all")
            pending_events = 0
    if bar is not None:
        bar.close()

    x = x.detach().to(torch.float64).cpu()
    if not bool(torch.isfinite(x).all()):
        raise ScaffoldingError("final coordinates contain NaN/Inf")
    chosen = np.zeros(D, dtype=np.int64)
    if method == "smc" and K > 1:  # report a particle drawn by the final weights (a draw from the SMC target)
        for d in range(D):
            chosen[d] = int(torch.multinomial(log_w[d].exp(), 1, generator=resample_gens[d]))
    result_particles = [x[d * K:(d + 1) * K, : lengths[d]].numpy() for d in range(D)]
    return ScaffoldResult(particles=result_particles, log_weights=log_w.numpy(), chosen=chosen,
                          motif_positions=positions.numpy(), timesteps=steps, ess=ess_log,
                          resampled=resampled_log, events=events)


@torch.no_grad()  # as scaffold(): called with gradients on, it kept a graph over all t_start steps
def redenoise(
    model: EpsModel,
    designs: Sequence[np.ndarray],
    *,
    t_start: int,
    scheduler: Optional[DDPMScheduler] = None,
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
) -> List[np.ndarray]:
    """Partial diffusion of finished designs (model units): noise each to t_start with q(x_t | x_0),
    then denoise with the unconditional model through every step t_start, ..., 1; one batch.

    A self-consistency test without a folding model: the motif RMSD of the result says whether the
    scaffold, on its own, holds the motif in place under the model (the raw designs' motif RMSD is
    near zero by construction, since the motif is imposed down to t = 1).
    """
    scheduler = _scheduler_for(model, scheduler)  # the model's own schedule, or a matching one
    T = scheduler.num_train_timesteps
    if not 1 <= t_start <= T:
        raise ValueError(f"t_start must lie in [1, {T}], got {t_start}")
    scheduler.set_timesteps(None)
    device = check_device(device)
    lengths = [len(ca) for ca in designs]
    B, L = len(designs), max(lengths)
    mask = torch.zeros(B, L, dtype=torch.bool)
    x0 = torch.zeros(B, L, 3, dtype=torch.float64)
    for b, ca in enumerate(designs):
        mask[b, : lengths[b]] = True
        x0[b, : lengths[b]] = torch.as_tensor(np.asarray(ca, dtype=np.float64))
    x0 = remove_center_of_mass_reference(x0, mask)
    # design b's noise from its own seed: it does not depend on the other designs of the batch
    design_seeds = per_sample_seeds(int(seed) ^ 0x55, B)
    eps = initial_noise(design_seeds.tolist(), L, mask, torch.float64, "cpu")
    x = scheduler.add_noise(x0, eps, t_start, mask).to(dtype=dtype, device=device)
    mask = mask.to(device)
    step_seeds = torch.from_numpy(design_seeds.view(np.int64).copy())
    for t in range(t_start, 0, -1):
        tt = torch.full((B,), t, dtype=torch.long, device=device)
        with invariant_products(device.type == "cpu"):
            e = model(x, tt, mask)
        if not bool(torch.isfinite(e).all()):
            raise ScaffoldingError(f"model output is NaN/Inf at t={t} while re-denoising")
        x = scheduler.step(e, tt, x, mask=mask, noise=_per_sample_noise(step_seeds, tt, x)).prev_sample
    x = x.detach().to(torch.float64).cpu().numpy()
    return [x[b, : lengths[b]] for b in range(B)]
