"""Batch-invariant node-wise products: a design's numbers must not depend on its batch mates.

A BLAS picks its GEMM kernel (and blocking) by the matrix shape, so row r of ``x @ W.T`` can
differ in the last bit depending on how many rows share the call: a design sampled alone
(``B x N = 1 x 10`` rows) and the same design padded into a batch (``2 x 12``) get 1-ulp different
node features. The reverse diffusion of a chain that is still finding its shape is chaotic, and 1
ulp at the first step became 0.0008 A at the end (shipped model, a 10-residue design, 1024 steps).
The sampler promises that a design comes out the same whatever batch it shares, so under
:func:`batch_invariant` the model's node-wise linears run, on CPU without gradients, through the
C++ extension's row-by-row product (``rowwise_linear``: every output summed over k in index order,
rows independent, no FMA contraction), whose bits for a row depend on that row alone. Elsewhere
(no extension, gradients, GPU) they run as a batch of fixed ``ROWS`` x K products (rows padded
with zeros), every row through the same BLAS kernel at the same shape: shape-independent, but not
bit-exact. That was the CPU path until it proved not enough: MKL gave row-different bits for
K = 33, H = 7 at 105 rows against 23 in a CI run, and on this machine once the allocator's state
had changed (its results depend on alignment too), and a sampled design differed by 0.001 A
between a batch of 2 and a run of it alone in another CI run. The centre-of-mass projection takes
a sequential sum (:func:`center`), which trailing padding leaves unchanged.

Cost: on CPU the row-by-row product runs at about BLAS's rate (4800 x 64 x 64: 0.24 ms against
MKL's 0.19 ms, 2 cores, AVX-512 clone), a few percent of a shipped-model call at B = 64, N = 75 (~15%
before its register blocking, 2026-12-07). Not measured on a GPU, where it is off by default.
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


def _rowwise_linear_cpu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The C++ extension's row-by-row linear (each output summed over k in index order), or None where
    it does not apply (no extension, not CPU, gradients wanted)."""
    from protdiff_fast.backends import cpu_extension

    ext = cpu_extension()
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if ext is None or not hasattr(ext, "rowwise_linear") or any(t.device.type != "cpu" for t in tensors) or (
            torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return None
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    rows = x.detach().reshape(-1, x.shape[-1]).to(dtype).contiguous()
    wt = weight.detach().t().to(dtype).contiguous()
    b = bias.detach().to(dtype).contiguous() if bias is not None else torch.empty(0, dtype=dtype)
    out = torch.empty(rows.shape[0], weight.shape[0], dtype=dtype)
    ext.rowwise_linear(rows.numpy(), wt.numpy(), b.numpy(), out.numpy())
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight, bias); under :func:`batch_invariant`, on CPU without gradients the C++
    extension's row-by-row product (every output summed in index order: a row's bits depend on that
    row alone), elsewhere by products of ROWS rows."""
    if not is_batch_invariant():
        return F.linear(x, weight, bias)
    out = _rowwise_linear_cpu(x, weight, bias)
    if out is not None:
        return out
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
