"""A DDPM scheduler in the shape diffusers users know: ``set_timesteps``, ``step``, ``add_noise``.

Differences from diffusers, on purpose: timesteps run 1..T as in the DDPM paper; ``t`` may be a
(B,) tensor (every sample its own step); noise comes from an explicit tensor, a seed (an int, or
one seed per sample), or a torch.Generator (with none of them, torch's global RNG, as diffusers; the
sampler always passes per-design seeds); no clipping of x_0 (our
coordinates exceed 1); every sample lives in the zero-centre-of-mass subspace of its real nodes.
``step(model_output, timestep, sample, generator=None, return_dict=True)`` takes diffusers' two
positional arguments in diffusers' places; ours (mask, noise, seed) are keyword-only.
``init_noise_sigma`` (1.0), ``order`` (1) and ``scale_model_input(sample, timestep)`` (``sample``
unchanged) are there too, so a sampling loop written for diffusers runs as is (draw x_T zero-CoM
over the real nodes, as :func:`~protdiff_fast.diffusion.sampler.sample` does).

``set_timesteps(K)`` keeps round(linspace(1, T, K)): both ends, T and 1, evenly spaced between them.
That is improved DDPM's even respacing (Nichol & Dhariwal 2021) and diffusers'
``timestep_spacing="linspace"`` shifted to our 1-based t; not diffusers' DDPM default "leading"
(1 + k (T // K) in our t: it never starts at T) nor "trailing" (T, T - T/K, ..., T/K: it stops short
of t = 1).
The respaced chain's betas are 1 - alpha_bar_t / alpha_bar_{t_prev} over the kept steps (improved
DDPM's respacing): the DDIM update below uses the kept alpha_bars directly, which at eta = 1 is
exactly the ancestral step of that respaced chain with its beta_tilde as variance.

Full-length sampling (``set_timesteps(None)`` or ``T``) runs the fused ancestral step of the chosen
backend (:func:`protdiff_fast.ops.ddpm_step`). Strided sampling (``set_timesteps(K)`` with K < T)
uses the generalized DDIM update (Song et al. 2021, eq. 12) on the sub-sequence
tau_K > ... > tau_1, with sigma = eta * sqrt((1 - ab_prev) / (1 - ab_t)) * sqrt(1 - ab_t / ab_prev):
eta = 1 is ancestral sampling of the respaced chain, eta = 0 is deterministic DDIM.

``noise_scale`` (default 1: the DDPM sampler) scales the noise each step adds:
x_{t_prev} = mean + noise_scale * sigma_t z, the "noise scale" knob of protein samplers such as
RFdiffusion's (`denoiser.noise_scale_ca`). Below 1 it trades diversity for fewer clashes and more
compact chains; it is no longer a sample of the model's distribution. Applied after the backend's
step as mean + noise_scale (prev - mean) (prev - mean = sigma_t z, projected), so every backend and
the CUDA-graph path get it unchanged.

``clash_guidance`` (a :class:`~protdiff_fast.diffusion.guidance.ClashGuidance`, default None) pushes
CA pairs closer than its ``min_distance`` apart in the predicted x_0 over the last ``max_timestep``
steps, before the step of any backend (:mod:`protdiff_fast.diffusion.guidance`); also not a sample of
the model's distribution, and recorded in ``config`` (a run's identity).
"""
from __future__ import annotations

import numbers
from typing import NamedTuple, Optional, Union

import torch

from protdiff_fast.backends import check_backend_name
from protdiff_fast.diffusion.guidance import ClashGuidance
from protdiff_fast.diffusion.schedule import SCHEDULES, NoiseSchedule
from protdiff_fast.ops import ddpm_step, remove_center_of_mass
from protdiff_fast.reference.ddpm import VARIANCES, add_noise, check_seed, check_step_inputs


class SchedulerOutput(NamedTuple):
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor
    mean: torch.Tensor


class DDPMScheduler:
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        variance_type: str = "fixed_small",
        eta: float = 1.0,
        backend: str = "auto",
        noise_scale: float = 1.0,
        clash_guidance: Optional[ClashGuidance] = None,
    ) -> None:
        # named here as the caller spelled them (NoiseSchedule calls them num_timesteps and kind)
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, numbers.Integral) \
                or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be an integer >= 1, got {num_train_timesteps!r}")
        if beta_schedule not in SCHEDULES:
            raise ValueError(f"beta_schedule: expected one of {SCHEDULES}, got {beta_schedule!r}")
        if variance_type not in VARIANCES:
            raise ValueError(f"variance_type: expected one of {VARIANCES}, got {variance_type!r}")
        if isinstance(eta, bool) or not (isinstance(eta, numbers.Real) and 0.0 <= float(eta) <= 1.0):
            raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
        if eta != 1.0 and variance_type == "fixed_large":
            raise ValueError("variance_type='fixed_large' is the ancestral sampler's (eta = 1); eta < 1 runs "
                             "DDIM's sigma: use variance_type='fixed_small'")
        self.schedule = NoiseSchedule(num_train_timesteps, beta_start, beta_end, kind=beta_schedule)
        self.config = dict(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                           beta_schedule=beta_schedule, variance_type=variance_type, eta=eta)
        if isinstance(noise_scale, bool) or not (isinstance(noise_scale, numbers.Real)
                                                 and 0.0 <= float(noise_scale) <= 2.0):
            raise ValueError(f"noise_scale must lie in [0, 2] (1: the DDPM sampler), got {noise_scale!r}")
        self.noise_scale = float(noise_scale)
        if self.noise_scale != 1.0:  # only then: runs and manifests made before the option stay identical
            self.config["noise_scale"] = self.noise_scale
        if clash_guidance is not None and not isinstance(clash_guidance, ClashGuidance):
            raise ValueError(f"clash_guidance: a ClashGuidance (or None), got {type(clash_guidance).__name__}")
        self.clash_guidance = clash_guidance
        if clash_guidance is not None:  # only then, as noise_scale: a guided run is another run
            self.config["clash_guidance"] = clash_guidance.to_dict()
        self.variance_type, self.eta, self.backend = variance_type, eta, check_backend_name(backend)
        self.set_timesteps(None)

    @classmethod
    def from_model(cls, model, **kwargs) -> "DDPMScheduler":
        """The scheduler of ``model``'s own noise schedule (T, beta_start, beta_end of its config, which
        ``sample`` requires), with any other option given: ``DDPMScheduler.from_model(model, noise_scale=0.5)``."""
        cfg = getattr(model, "config", None)
        if cfg is None or not all(hasattr(cfg, k) for k in ("num_timesteps", "beta_start", "beta_end")):
            raise ValueError(f"from_model: {type(model).__name__} has no config with num_timesteps, beta_start and "
                             "beta_end (a ProtDiff has)")
        clash = {"num_train_timesteps", "beta_start", "beta_end"} & set(kwargs)
        if clash:
            raise ValueError(f"from_model: {sorted(clash)} come from the model's config; build DDPMScheduler(...) "
                             "directly for another schedule")
        return cls(cfg.num_timesteps, cfg.beta_start, cfg.beta_end, **kwargs)

    # diffusers' pipeline hooks: x_T ~ N(0, I) and an unscaled model input, as for DDPM (in our space x_T
    # must also be zero-CoM over the real nodes: draw it with ops.remove_center_of_mass, as sample() does)
    init_noise_sigma = 1.0
    order = 1

    def scale_model_input(self, sample: torch.Tensor, timestep: Union[int, torch.Tensor, None] = None) -> torch.Tensor:
        """``sample`` unchanged (DDPM's model input is x_t itself), for loops written against diffusers."""
        return sample

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def set_timesteps(self, num_inference_steps: Optional[int] = None,
                      device: Union[str, torch.device, None] = None) -> None:
        """Use all T steps (None or T), or K evenly spaced ones from T down to 1, round(linspace(1, T, K))
        ("linspace" spacing, both ends kept: see the module docstring; K = 1: T alone, one step from x_T
        to the predicted data). Below T steps, and at T with eta < 1, the step is DDIM's (``strided``).
        ``device``: where ``timesteps`` lives (as diffusers; default CPU)."""
        T = self.num_train_timesteps
        if num_inference_steps is not None and (isinstance(num_inference_steps, bool)
                                                or not isinstance(num_inference_steps, numbers.Integral)):
            raise ValueError(f"num_inference_steps: an integer in [1, {T}] (or None), got {num_inference_steps!r}")
        K = T if num_inference_steps is None else int(num_inference_steps)
        if not 1 <= K <= T:
            raise ValueError(f"num_inference_steps must lie in [1, {T}], got {num_inference_steps}")
        if K < T and self.variance_type == "fixed_large":
            raise ValueError(f"variance_type='fixed_large' is the full-length ancestral sampler's (beta_t); "
                             f"{K} of {T} steps use DDIM's sigma (eta): use variance_type='fixed_small'")
        steps = (torch.tensor([T]) if K == 1 else
                 torch.linspace(1, T, K, dtype=torch.float64).round().long().unique(sorted=True))
        self.timesteps = steps.flip(0).to(device if device is not None else "cpu")  # T .. 1, descending, as diffusers
        self.num_inference_steps = len(steps)
        # previous timestep of each t in the sequence (0 = the data)
        self._prev = torch.zeros(T + 1, dtype=torch.long)
        self._prev[steps[1:]] = steps[:-1]
        self._in_sequence = torch.zeros(T + 1, dtype=torch.bool)
        self._in_sequence[steps] = True
        # the DDIM update: fewer steps than T, or all T with eta < 1 (at eta = 1 and all T steps DDIM's
        # sigma is beta_tilde's and the fused ancestral step runs instead)
        self.strided = self.num_inference_steps < T or self.eta != 1.0

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: Union[int, torch.Tensor],
                  mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise (noise should be zero-CoM)."""
        return add_noise(self.schedule, original_samples, noise, timesteps, mask)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[int, torch.Tensor],
        sample: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
        *,
        mask: Optional[torch.Tensor] = None,
        noise: Optional[torch.Tensor] = None,
        seed: Union[int, torch.Tensor, None] = None,
    ) -> Union[SchedulerOutput, tuple]:
        """x_t -> x_{t_prev} given the predicted noise ``model_output`` (eps_hat); with ``clash_guidance``
        the step (and its pred_original_sample) uses the guided eps' instead (:mod:`.guidance`).
        ``generator`` and ``return_dict`` may be given positionally, 4th and 5th, as in diffusers'
        ``step(model_output, timestep, sample, generator=None, return_dict=True)``; mask, noise and seed
        only by keyword. ``return_dict=False`` gives the plain tuple (prev_sample, pred_original_sample),
        as diffusers' ``step(..., return_dict=False)[0]`` expects."""
        # the 4th place was keyword-only before: a mask or noise tensor given there must not be taken
        # for a generator (nor an int for a seed), so name what that place is
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None (the 4th positional argument, as in "
                            f"diffusers), got {type(generator).__name__}; pass mask=, noise=, seed= by keyword")
        if not isinstance(return_dict, bool):
            raise TypeError(f"return_dict: expected True or False (the 5th positional argument), got "
                            f"{type(return_dict).__name__}; pass mask=, noise=, seed= by keyword")
        out = self._step(model_output, timestep, sample, mask, noise, seed, generator)
        return out if return_dict else (out.prev_sample, out.pred_original_sample)

    def _step(self, model_output, timestep, sample, mask, noise, seed, generator) -> SchedulerOutput:
        if self.clash_guidance is not None:
            t_b, mask_b = check_step_inputs(self.schedule, sample, model_output, timestep, mask, noise, "fixed_small")
            like = sample if sample.dtype == torch.float64 else sample.float()  # alpha_bar not rounded to bf16
            model_output = self.clash_guidance(model_output, t_b, sample, mask_b,
                                               self.schedule.coef("alpha_bars", t_b, like))
        if not self.strided:
            out = SchedulerOutput(*ddpm_step(self.schedule, sample, model_output, timestep, mask=mask, noise=noise,
                                             seed=seed, generator=generator, variance=self.variance_type,
                                             backend=self.backend))
            return self._scale_noise(out)
        t, mask = check_step_inputs(self.schedule, sample, model_output, timestep, mask, noise, "fixed_small")
        seed = check_seed(seed, sample.shape[0])  # as the fused step does: 1.5 or "3" is no seed (int() took them)
        inside = self._in_sequence[t.cpu()]
        if not bool(inside.all()):
            raise ValueError(f"timestep: {sorted(set(t.cpu()[~inside].tolist()))[:5]} not in the sequence set by "
                             f"set_timesteps({self.num_inference_steps}) ({self.timesteps[:3].tolist()} ... 1)")
        t_prev = self._prev.to(t.device)[t]
        dtype = sample.dtype
        if dtype not in (torch.float32, torch.float64):  # bf16 / fp16: alpha_bar near 1 rounds to 1 (0 / 0)
            sample, model_output = sample.float(), model_output.float()
            noise = None if noise is None else noise.float()
        ab = self.schedule.coef("alpha_bars", t, sample)
        ab_prev = self.schedule.coef("alpha_bars", t_prev, sample)
        x0 = (sample - (1 - ab).sqrt() * model_output) / ab.sqrt()  # DDIM eq. 12, "predicted x_0"
        sigma = self.eta * ((1 - ab_prev) / (1 - ab)).sqrt() * (1 - ab / ab_prev).sqrt()
        if noise is None:
            if isinstance(seed, torch.Tensor):  # one stream per sample, keyed by (its seed, its t)
                noise = _per_sample_noise(seed, t, sample)
            else:
                if seed is not None:
                    generator = torch.Generator(device=sample.device).manual_seed(int(seed))
                noise = torch.randn(sample.shape, generator=generator, dtype=dtype, device=sample.device).to(
                    sample.dtype)
        # "auto": the C++ projection on CPU sums each centroid in index order, so a design's step
        # does not depend on the length its batch is padded to (torch's sums do, in the last bit)
        com_backend = "reference" if self.backend == "reference" else "auto"
        z = remove_center_of_mass(noise, mask, backend=com_backend)
        mean = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt() * model_output
        mean = remove_center_of_mass(mean, mask, backend=com_backend)
        prev = remove_center_of_mass(mean + sigma * z, mask, backend=com_backend)
        keep = mask.unsqueeze(-1)
        out = SchedulerOutput(prev, torch.where(keep, x0, torch.zeros_like(x0)), mean)
        return self._scale_noise(SchedulerOutput(*(v.to(dtype) for v in out)))

    def _scale_noise(self, out: SchedulerOutput) -> SchedulerOutput:
        """mean + noise_scale * (prev - mean): padding stays zero, the centre of mass stays zero."""
        if self.noise_scale == 1.0:
            return out
        return out._replace(prev_sample=torch.lerp(out.mean, out.prev_sample, self.noise_scale))


def _per_sample_noise(seeds: torch.Tensor, t: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """(B, N, 3) standard normals, sample b's keyed by (seed_b, t_b) only, never by what else is in
    the batch: with the C++ extension the fused CPU step's own stream (Philox4x32-10, key seed_b,
    counter (element / 4, t_b): element k is the same whatever N the batch is padded to), drawn on
    the host; without it one torch generator per sample seeded by SplitMix64(seed_b, t_b), whose
    draw depends on the padded N too (torch's vectorised normals fill the tail of a tensor by a
    different path), so a design then matches itself only in batches of the same padded length."""
    import numpy as np

    from protdiff_fast.backends import cpu_extension
    from protdiff_fast.ops.ddpm_cpu import per_sample_seeds, splitmix64

    B = sample.shape[0]
    base = per_sample_seeds(seeds, B)  # validates shape and dtype
    C = cpu_extension()
    if C is not None:
        host = np.empty(tuple(sample.shape), dtype=np.float64 if sample.dtype == torch.float64 else np.float32)
        C.philox_normal(base, t.cpu().numpy().astype(np.int64), host)
        return torch.from_numpy(host).to(device=sample.device, dtype=sample.dtype)
    with np.errstate(over="ignore"):
        keys = splitmix64(base ^ (t.cpu().numpy().astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)))
    out = torch.empty(sample.shape, dtype=sample.dtype, device=sample.device)
    for b in range(B):
        gen = torch.Generator(device=sample.device).manual_seed(int(keys[b] & np.uint64(0x7FFFFFFFFFFFFFFF)))
        out[b] = torch.randn(sample.shape[1:], generator=gen, dtype=sample.dtype, device=sample.device)
    return out
