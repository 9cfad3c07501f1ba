"""Fused ops with a ``backend`` argument: ``"auto"`` (default), ``"reference"``, ``"triton"``, ``"cpu"``.

Each function here only resolves the backend (see :mod:`protdiff_fast.backends`) and calls it;
the math and the contract live in the reference implementation's docstring.
"""
from __future__ import annotations

import functools
import warnings
from typing import Optional, Tuple

import torch

from protdiff_fast._checks import check_tensor
from protdiff_fast.backends import get_impl
from protdiff_fast.ops import _padding
from protdiff_fast.ops._padding import CLAMP_NORMALIZE, bind_arguments, call_padded, padded_widths


def remove_center_of_mass(
    x: torch.Tensor, mask: Optional[torch.Tensor] = None, *, backend: str = "auto"
) -> torch.Tensor:
    """Masked zero-centre-of-mass projection; see :mod:`protdiff_fast.reference.com`."""
    check_tensor("x", x, (None, None, None))
    _, fn = get_impl("remove_center_of_mass", backend, x.device)
    return fn(x, mask)


def egnn_pair_aggregate(*args, backend: str = "auto", **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fused EGNN pair aggregation; contract in :mod:`protdiff_fast.reference.egnn`.

    The widths H_e (p, q), M (W2's columns) and H_x (W3's columns) may differ. A backend that runs
    only certain widths declares it in ``protdiff_fast.ops._padding.PADDED_WIDTHS`` with a function
    ``padded_widths(H_e, M, H_x) -> (H_e', M', H_x')`` (each >= its width, or ValueError naming its
    limits); this dispatcher then zero-pads each width to its target and slices m_i back to M
    (exact; :mod:`protdiff_fast.ops._padding`). Calling a backend's function directly skips the
    padding.
    """
    x = kwargs["x"] if "x" in kwargs else args[0] if args else None
    if not isinstance(x, torch.Tensor):  # (before the device lookup: a numpy array has a str .device)
        raise TypeError(f"x: expected a torch.Tensor (B, N, 3), got {type(x).__name__}")
    name, fn = get_impl("egnn_pair_aggregate", backend, x.device)
    if isinstance(x, torch.Tensor) and x.dim() == 3 and 0 in x.shape[:2] and name != "reference":
        # no pairs (B = 0 or N = 0): nothing to compute, and the fused kernels' grids would be empty
        name, fn = get_impl("egnn_pair_aggregate", "reference", x.device)
    if backend == "auto" and name != "reference":
        why = _cannot_run(name, args, kwargs)
        if why:  # "auto" never fails for lack of a fast path: the reference runs everything
            _warn_fallback(name, why)
            name, fn = get_impl("egnn_pair_aggregate", "reference", x.device)
    if isinstance(kwargs.get("normalize"), str) and name not in CLAMP_NORMALIZE:
        raise NotImplementedError(f"normalize={kwargs['normalize']!r} is not implemented by the {name!r} backend "
                                  f"(implemented by: {', '.join(CLAMP_NORMALIZE)})")
    padded = padded_widths(name)
    if padded is None:
        return fn(*args, **kwargs)
    return call_padded(fn, padded, args, kwargs)


# backends of egnn_pair_aggregate that run only some dtypes (x's and p's); the others run every float dtype
EGNN_DTYPES = {"triton": (torch.float32, torch.bfloat16, torch.float16)}


def cannot_run_egnn(name: str, width=None, dtypes=(), normalize=None) -> Optional[str]:
    """Why backend ``name`` cannot run egnn_pair_aggregate with these widths (one square width, or
    (H_e, M, H_x)), input dtypes and ``normalize`` option, or None. ``backend="auto"`` runs the
    reference where this gives a reason."""
    if isinstance(normalize, str) and name not in CLAMP_NORMALIZE:
        return f"normalize={normalize!r}"
    bad = [d for d in dtypes if name in EGNN_DTYPES and d not in EGNN_DTYPES[name]]
    if bad:
        runs = ", ".join(str(d).replace("torch.", "") for d in EGNN_DTYPES[name])
        return f"{str(bad[0]).replace('torch.', '')} inputs (it runs {runs})"
    padded = padded_widths(name)
    if padded is not None and width is not None:
        try:
            padded(*((width,) * 3 if isinstance(width, int) else width))
        except ValueError as err:
            return str(err)
    return None


def _cannot_run(name: str, args: tuple, kwargs: dict) -> Optional[str]:
    """Why backend ``name`` cannot run these arguments (unsupported width, dtype or option), or None."""
    try:
        named = bind_arguments(args, kwargs)
    except TypeError:
        return None  # let the backend's validator name the problem
    widths = _padding._widths(named)  # (-1, -1, -1) when malformed: the backend's validator names it
    dtypes = [t.dtype for t in (named["x"], named["p"]) if isinstance(t, torch.Tensor)]
    return cannot_run_egnn(name, widths if widths[0] >= 0 else None, dtypes, kwargs.get("normalize"))


@functools.lru_cache(maxsize=None)
def _warn_fallback(name: str, why: str) -> None:
    warnings.warn(f"protdiff_fast: egnn_pair_aggregate: backend 'auto' picked {name!r}, which cannot run this "
                  f"call ({why}); running the reference instead (O(N^2 H) memory)", RuntimeWarning, stacklevel=3)


def ddpm_step(schedule, x_t: torch.Tensor, eps_hat: torch.Tensor, t, *, backend: str = "auto", **kwargs):
    """One fused DDPM ancestral step; contract in :func:`protdiff_fast.reference.ddpm.ddpm_step_reference`.

    Keyword arguments: mask, noise (explicit z), seed (int, or (B,) per-sample seeds), generator, variance.
    """
    check_tensor("x_t", x_t, (None, None, 3))
    name, fn = get_impl("ddpm_step", backend, x_t.device)
    if backend == "auto" and name == "triton" and x_t.dtype == torch.float64:  # the kernel computes in float32
        _, fn = get_impl("ddpm_step", "reference", x_t.device)
    if x_t.shape[0] == 0 and name != "reference":  # an empty batch: no kernel grid to launch
        _, fn = get_impl("ddpm_step", "reference", x_t.device)
    return fn(schedule, x_t, eps_hat, t, **kwargs)
