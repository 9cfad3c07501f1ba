"""One reverse step of a padded batch (model call + scheduler step), captured as a CUDA graph on GPU.

At small proteins the ~10 kernel launches per EGNN layer and the step cost more in launch overhead
than in arithmetic; a CUDA graph replays the whole step (model + fused step) as one launch. The
graph is captured once per batch (its shape, mask and seeds are fixed for all of its steps) and
replayed with new x_t and t copied into its static input buffers.

Inside the step the library's value checks (NaN/Inf sweeps, mask contents, timestep range) are off:
each is a device-to-host sync, which a capture cannot contain. The sampler checks the inputs once
and every step's outputs itself. The same code runs uncaptured on CPU (``capture=False``), so the
tests exercise everything but the capture call; if a capture fails on a GPU, the runner warns once
and goes on uncaptured.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Tuple

import torch

from protdiff_fast._checks import skip_value_checks

_capture_failed = False  # after one failure, later batches do not try again


class DenoiseStep:
    """``step(x_t, t) -> (eps_hat, x_{t_prev})`` for one padded batch with fixed ``mask`` and per-design
    ``seeds`` (a (B,) int64 tensor on the batch's device), or a ``generator`` for the scheduler's noise."""

    def __init__(self, model: Callable, scheduler, mask: torch.Tensor, seeds: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None, capture: bool = False,
                 autocast: Optional[torch.dtype] = None, step_finite_rows: bool = False) -> None:
        self.model, self.scheduler, self.mask = model, scheduler, mask
        # a NaN/Inf model output: by default nothing steps (the caller stops); with step_finite_rows the
        # other designs step on (the bad rows' eps taken as 0) and the caller sets the bad ones aside
        self.step_finite_rows = step_finite_rows
        # the model call (not the step: x, eps and the DDPM update stay in x's dtype) under torch.autocast;
        # no cast cache: a captured graph must not hold casts made outside it
        self.autocast = autocast
        self.seeds, self.generator = seeds, generator
        # a CUDA graph replays fixed kernels: noise must come from the kernels' own Philox (seeds), and
        # the strided (DDIM-style) step gathers its coefficients on the host (t.cpu(), a sync): uncaptured
        self.capture = bool(capture and mask.device.type == "cuda" and seeds is not None and not _capture_failed
                            and not getattr(scheduler, "strided", False))
        self.graph = None
        self.captured = False

    def _step(self, x: torch.Tensor, t: torch.Tensor, check_eps: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        with skip_value_checks(), torch.no_grad():
            with torch.autocast(x.device.type, dtype=self.autocast or torch.bfloat16,
                                enabled=self.autocast is not None, cache_enabled=False):
                eps = self.model(x, t, self.mask)
            # padding is no design's: whatever a model leaves there (NaN from an unmasked op) is dropped, so
            # it neither fails the finite check nor reaches the step (ProtDiff's padding is 0: same bits)
            eps = eps.to(x.dtype).masked_fill(~self.mask.unsqueeze(-1), 0.0)
            used = eps
            if check_eps and not bool(torch.isfinite(eps).all()):
                if not self.step_finite_rows:
                    return eps, x  # the caller names the step and design; the step itself would refuse NaN
                finite = torch.isfinite(eps).flatten(1).all(1).view(-1, 1, 1)
                used = torch.where(finite, eps, torch.zeros_like(eps))
            out = self.scheduler.step(used, t, x, mask=self.mask, seed=self.seeds, generator=self.generator)
        return eps, out.prev_sample

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if not self.capture:
            return self._step(x, t, check_eps=True)
        if self.graph is None:
            try:
                self._capture(x, t)
            except Exception as err:  # noqa: BLE001 - any capture failure: run uncaptured, say so once
                global _capture_failed
                _capture_failed, self.capture, self.graph = True, False, None
                # a capture that failed inside torch.cuda.graph can raise again in its exit before the
                # previous stream is restored: go back to the device's default stream explicitly
                torch.cuda.set_stream(torch.cuda.default_stream(x.device))
                warnings.warn(f"protdiff_fast: CUDA graph capture of the sampling step failed ({err}); "
                              "sampling goes on without graphs", RuntimeWarning, stacklevel=2)
                torch.cuda.synchronize()
                return self._step(x, t, check_eps=True)
        self.x_in.copy_(x)
        self.t_in.copy_(t)
        self.graph.replay()
        return self.eps_out, self.x_out

    def _capture(self, x: torch.Tensor, t: torch.Tensor) -> None:
        self.x_in, self.t_in = x.clone(), t.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: kernel compiles, caches and allocations happen here
            for _ in range(2):
                self._step(self.x_in, self.t_in)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.eps_out, self.x_out = self._step(self.x_in, self.t_in)
        self.captured = True
