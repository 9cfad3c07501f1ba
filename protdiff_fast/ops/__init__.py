"""Fused ops with a ``backend`` argument: ``"auto"`` (default), ``"reference"``, ``"triton"``, ``"cpu"``.

Each function here only resolves the backend (see :mod:`protdiff_fast.backends`) and calls it;
the math and the contract live in the reference implementation's docstring.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from protdiff_fast.backends import get_impl
from protdiff_fast.ops._padding import CLAMP_NORMALIZE, call_padded, square_hidden


def remove_center_of_mass(
    x: torch.Tensor, mask: Optional[torch.Tensor] = None, *, backend: str = "auto"
) -> torch.Tensor:
    """Masked zero-centre-of-mass projection; see :mod:`protdiff_fast.reference.com`."""
    _, fn = get_impl("remove_center_of_mass", backend, x.device)
    return fn(x, mask)


def egnn_pair_aggregate(*args, backend: str = "auto", **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fused EGNN pair aggregation; contract in :mod:`protdiff_fast.reference.egnn`.

    The widths H_e (p, q), M (W2's columns) and H_x (W3's columns) may differ. A backend that runs
    only square widths of certain sizes declares it in ``protdiff_fast.ops._padding.SQUARE_HIDDEN``
    with a function ``square_hidden(w) -> S`` (S >= w, or ValueError naming its sizes); this
    dispatcher then zero-pads every width to S = square_hidden(max(H_e, M, H_x)) and slices m_i
    back to M (exact; :mod:`protdiff_fast.ops._padding`). Calling a backend's function directly
    skips the padding.
    """
    x = kwargs["x"] if "x" in kwargs else args[0]
    name, fn = get_impl("egnn_pair_aggregate", backend, x.device)
    if isinstance(kwargs.get("normalize"), str) and name not in CLAMP_NORMALIZE:
        raise NotImplementedError(f"normalize={kwargs['normalize']!r} is not implemented by the {name!r} backend "
                                  f"(implemented by: {', '.join(CLAMP_NORMALIZE)})")
    square = square_hidden(name)
    if square is None:
        return fn(*args, **kwargs)
    return call_padded(fn, square, args, kwargs)


def ddpm_step(schedule, x_t: torch.Tensor, eps_hat: torch.Tensor, t, *, backend: str = "auto", **kwargs):
    """One fused DDPM ancestral step; contract in :func:`protdiff_fast.reference.ddpm.ddpm_step_reference`.

    Keyword arguments: mask, noise (explicit z), seed (int, or (B,) per-sample seeds), generator, variance.
    """
    _, fn = get_impl("ddpm_step", backend, x_t.device)
    return fn(schedule, x_t, eps_hat, t, **kwargs)
