"""Zero-padding of egnn_pair_aggregate's three widths to the square width a backend runs.

The contract (:mod:`protdiff_fast.reference.egnn`) allows rectangular widths: p, q (B, N, H_e),
W2 (H_e, M), W3 (M, H_x). Some backends run only H_e = M = H_x = S with S from a fixed set
(:func:`protdiff_fast.backends.square_hidden`). Padding every width to S with zeros is exact:

    z's extra columns are 0 (p, q, w_d, W_e / rel padded with zero columns) -> silu(0) = 0,
    and W2's extra rows are 0, so the real y = silu(z) @ W2 + b2 is unchanged;
    y's extra columns are 0 (W2's extra columns and b2's extra entries are 0) -> m's are silu(0) = 0,
    so the attention logit (w_att padded with 0) and s = m @ W3 + b3 are unchanged;
    s's extra columns are 0 -> silu(0) = 0, and w4's extra entries are 0, so phi_ij is unchanged.

m_i comes back sliced to (B, N, M). F.pad and slicing are differentiable, so the gradients of
the real entries are the backend's and those of the padding are dropped. Cost: the backend's
work grows to S^2 per pair instead of H_e*M + M*H_x.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

# Backends whose egnn_pair_aggregate runs only square widths H_e = M = H_x = S, of certain sizes:
# backend -> "module:function" of ``square_hidden(w) -> S``, the square width it runs for inputs
# whose widest width is w (S >= w), raising ValueError naming its supported sizes when w is too
# large. The dispatcher zero-pads to S. Backends not listed ("reference") take any widths.
SQUARE_HIDDEN: Dict[str, str] = {
    "triton": "protdiff_fast.ops.egnn_triton:padded_hidden",  # 16, 32, 64, 128, 256
}
# Backends whose kernels implement normalize="clamp" (egnn-pytorch's CoorsNorm); the dispatcher
# refuses it for the others rather than let them read it as normalize=True.
CLAMP_NORMALIZE = ("reference", "cpu", "triton")


def square_hidden(backend: str) -> Optional[Callable[[int], int]]:
    """The square-width function of ``backend``'s egnn_pair_aggregate, or None (takes any widths)."""
    if backend not in SQUARE_HIDDEN:
        return None
    module_name, fn_name = SQUARE_HIDDEN[backend].split(":")
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


def call_padded(fn: Callable, square: Callable[[int], int], args: tuple, kwargs: dict):
    """Call ``fn`` (a backend of egnn_pair_aggregate) with every width zero-padded to
    S = square(max(H_e, M, H_x)), and return (m_i[..., :M], dx_i). No copies when already square S."""
    named = bind_arguments(args, kwargs)
    H_e, M, H_x = _widths(named)
    if H_e < 0:
        return fn(**named)  # malformed: let the backend's validator name the problem
    S = square(max(H_e, M, H_x))
    if H_e == M == H_x == S:
        return fn(**named)
    last = {"q": H_e, "w_d": H_e, "b2": M, "b3": H_x, "w4": H_x, "W_e": H_e, "rel": H_e, "w_att": M}
    if named["W2"].shape[0] != H_e or named["W3"].shape[0] != M or any(
            isinstance(named.get(k), torch.Tensor) and (named[k].dim() == 0 or named[k].shape[-1] != w)
            for k, w in last.items()) or not all(isinstance(named[k], torch.Tensor) for k in POSITIONAL):
        return fn(**named)  # inconsistent widths: unpadded, so the backend's validator names the argument
    padded = dict(named)
    for key in ("p", "q", "w_d", "b2", "b3", "w4"):
        padded[key] = _pad_last(named[key], S)
    for key in ("W_e", "rel", "w_att"):  # the optional ones
        if isinstance(named.get(key), torch.Tensor):
            padded[key] = _pad_last(named[key], S)
    padded["W2"] = _pad_matrix(named["W2"], S, S)
    padded["W3"] = _pad_matrix(named["W3"], S, S)
    m_i, dx_i = fn(**padded)
    return m_i[..., :M], dx_i
