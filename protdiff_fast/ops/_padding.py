"""Zero-padding of egnn_pair_aggregate's three widths to the widths a backend runs.

The contract (:mod:`protdiff_fast.reference.egnn`) allows rectangular widths: p, q (B, N, H_e),
W2 (H_e, M), W3 (M, H_x). Some backends run only certain widths (the triton kernels: a square
S in {16, ..., 256}, or M rounded up to a power of two and H_e, H_x to multiples of 16). Padding each width with zeros is exact:

    z's extra columns are 0 (p, q, w_d, W_e / rel padded with zero columns) -> silu(0) = 0,
    and W2's extra rows are 0, so the real y = silu(z) @ W2 + b2 is unchanged;
    y's extra columns are 0 (W2's extra columns and b2's extra entries are 0) -> m's are silu(0) = 0,
    so the attention logit (w_att padded with 0) and s = m @ W3 + b3 are unchanged;
    s's extra columns are 0 -> silu(0) = 0, and w4's extra entries are 0, so phi_ij is unchanged.

m_i comes back sliced to (B, N, M). F.pad and slicing are differentiable, so the gradients of
the real entries are the backend's and those of the padding are dropped.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

# Backends whose egnn_pair_aggregate runs only some widths: backend -> "module:function" of
# ``padded_widths(H_e, M, H_x) -> (H_e', M', H_x')``, the widths (each >= its own) it runs inputs of
# these widths at, raising ValueError naming its limits when a width is too large. The dispatcher
# zero-pads to them. Backends not listed ("reference", "cpu") take any widths.
PADDED_WIDTHS: Dict[str, str] = {
    "triton": "protdiff_fast.ops.egnn_triton:padded_widths",
}
# Backends whose kernels implement normalize="clamp" (egnn-pytorch's CoorsNorm); the dispatcher
# refuses it for the others rather than let them read it as normalize=True.
CLAMP_NORMALIZE = ("reference", "cpu", "triton")

Widths = Tuple[int, int, int]


def padded_widths(backend: str) -> Optional[Callable[[int, int, int], Widths]]:
    """The width-padding function of ``backend``'s egnn_pair_aggregate, or None (takes any widths)."""
    if backend not in PADDED_WIDTHS:
        return None
    module_name, fn_name = PADDED_WIDTHS[backend].split(":")
    return getattr(importlib.import_module(module_name), fn_name)

# positional order of the op's tensor arguments (protdiff_fast.reference.egnn)
POSITIONAL = ("x", "p", "q", "w_d", "W2", "b2", "W3", "b3", "w4")


def bind_arguments(args: tuple, kwargs: dict) -> Dict[str, object]:
    """The op's arguments by name, however they were passed."""
    if len(args) > len(POSITIONAL):
        raise TypeError(f"egnn_pair_aggregate takes at most {len(POSITIONAL)} positional arguments "
                        f"({', '.join(POSITIONAL)}), got {len(args)}")
    named = dict(zip(POSITIONAL, args))
    for key, value in kwargs.items():
        if key in named:
            raise TypeError(f"egnn_pair_aggregate got multiple values for argument {key!r}")
        named[key] = value
    missing = [k for k in POSITIONAL if k not in named]
    if missing:
        raise TypeError(f"egnn_pair_aggregate missing argument(s): {', '.join(missing)}")
    return named


def _widths(named: Dict[str, object]) -> Tuple[int, int, int]:
    """(H_e, M, H_x) as the contract reads them; shape errors are left to the backend's validator."""
    p, W2, W3 = named["p"], named["W2"], named["W3"]
    if not all(isinstance(t, torch.Tensor) for t in (p, W2, W3)) or p.dim() != 3 or W2.dim() != 2 or W3.dim() != 2:
        return -1, -1, -1
    return p.shape[2], W2.shape[1], W3.shape[1]


def _pad_last(t, size: int):
    return t if t is None or t.shape[-1] == size else F.pad(t, (0, size - t.shape[-1]))


def _pad_matrix(t, rows: int, cols: int):
    if t.shape == (rows, cols):
        return t
    return F.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]))


def call_padded(fn: Callable, padded: Callable[[int, int, int], Widths], args: tuple, kwargs: dict):
    """Call ``fn`` (a backend of egnn_pair_aggregate) with its widths zero-padded to
    padded(H_e, M, H_x), and return (m_i[..., :M], dx_i). No copies when nothing needs padding."""
    named = bind_arguments(args, kwargs)
    H_e, M, H_x = _widths(named)
    if H_e < 0:
        return fn(**named)  # malformed: let the backend's validator name the problem
    Pe, Pm, Px = padded(H_e, M, H_x)
    if (Pe, Pm, Px) == (H_e, M, H_x):
        return fn(**named)
    last = {"q": H_e, "w_d": H_e, "b2": M, "b3": H_x, "w4": H_x, "W_e": H_e, "rel": H_e, "w_att": M}
    if named["W2"].shape[0] != H_e or named["W3"].shape[0] != M or any(
            isinstance(named.get(k), torch.Tensor) and (named[k].dim() == 0 or named[k].shape[-1] != w)
            for k, w in last.items()) or not all(isinstance(named[k], torch.Tensor) for k in POSITIONAL):
        return fn(**named)  # inconsistent widths: unpadded, so the backend's validator names the argument
    target = {"p": Pe, "q": Pe, "w_d": Pe, "W_e": Pe, "rel": Pe, "b2": Pm, "w_att": Pm, "b3": Px, "w4": Px}
    padded_args = dict(named)
    for key, size in target.items():
        if isinstance(named.get(key), torch.Tensor):  # (W_e, rel, w_att are optional)
            padded_args[key] = _pad_last(named[key], size)
    padded_args["W2"] = _pad_matrix(named["W2"], Pe, Pm)
    padded_args["W3"] = _pad_matrix(named["W3"], Pm, Px)
    m_i, dx_i = fn(**padded_args)
    return m_i[..., :M], dx_i
