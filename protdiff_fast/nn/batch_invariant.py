"""Batch-invariant node-wise products: a design's numbers must not depend on its batch mates.

A BLAS picks its GEMM kernel (and blocking) by the matrix shape, so row r of ``x @ W.T`` can
differ in the last bit depending on how many rows share the call: a design sampled alone
(``B x N = 1 x 10`` rows) and the same design padded into a batch (``2 x 12``) get 1-ulp different
node features. The reverse diffusion of a chain that is still finding its shape is chaotic, and 1
ulp at the first step became 0.0008 A at the end (shipped model, a 10-residue design, 1024 steps).
The sampler promises that a design comes out the same whatever batch it shares, so under
:func:`batch_invariant` the model's node-wise linears run as a batch of fixed ``ROWS`` x K
products (rows padded with zeros): every row goes through the same kernel at the same shape, at
any batch size, padding or position (tested on CPU). The centre-of-mass projection takes a
sequential sum (:func:`center`), which trailing padding leaves unchanged.

Cost: about 2x the time of the node-wise linears on CPU (these are a small part of a model whose
bulk is the N^2 pair op). Not measured on a GPU, where it is off by default.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

ROWS = 16  # rows per product: one shape for every call

_STATE = threading.local()


def is_batch_invariant() -> bool:
    return getattr(_STATE, "enabled", False)


@contextmanager
def batch_invariant(enabled: bool = True) -> Iterator[None]:
    """Within the block (this thread), :func:`linear` and :func:`center` are batch-invariant."""
    before = is_batch_invariant()
    _STATE.enabled = bool(enabled)
    try:
        yield
    finally:
        _STATE.enabled = before


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight, bias); under :func:`batch_invariant`, by products of ROWS rows."""
    if not is_batch_invariant():
        return F.linear(x, weight, bias)
    lead, K = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, K)
    R = rows.shape[0]
    chunks = F.pad(rows, (0, 0, 0, (-R) % ROWS)).view(-1, ROWS, K)
    w = weight.t().to(chunks.dtype).expand(chunks.shape[0], -1, -1)
    if bias is None:
        out = torch.bmm(chunks, w)
    else:
        out = torch.baddbmm(bias.to(chunks.dtype).expand(chunks.shape[0], ROWS, -1), chunks, w)
    return out.reshape(-1, weight.shape[0])[:R].reshape(*lead, weight.shape[0])


def sequential(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for an nn.Linear or an nn.Sequential of Linears and elementwise layers, with
    the Linears through :func:`linear`."""
    if isinstance(module, nn.Linear):
        return linear(x, module.weight, module.bias)
    if not is_batch_invariant():
        return module(x)
    for layer in module:
        x = linear(x, layer.weight, layer.bias) if isinstance(layer, nn.Linear) else layer(x)
    return x


def center(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The masked centre-of-mass projection; under :func:`batch_invariant` on CPU the C++ kernel's
    sequential float64 sum over the real nodes (independent of trailing padding), elsewhere torch's."""
    from protdiff_fast.backends import cpu_extension
    from protdiff_fast.reference.com import remove_center_of_mass_reference

    if is_batch_invariant() and x.device.type == "cpu" and cpu_extension() is not None:
        from protdiff_fast.ops.com_cpu import remove_center_of_mass_cpu

        return remove_center_of_mass_cpu(x, mask)
    return remove_center_of_mass_reference(x, mask)
