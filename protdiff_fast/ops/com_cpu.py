"""Masked centre-of-mass projection on the C++ backend (``protdiff_fast._C.center_masked_``).

Same math and contract as :func:`protdiff_fast.reference.com.remove_center_of_mass_reference`.
The kernel works in place on a zero-copy numpy view of a fresh contiguous copy of x; the
projector is self-adjoint, so backward runs the same kernel on the incoming gradient.
float32 and float64 run in C++; other dtypes are upcast to float32 and cast back.
"""
from __future__ import annotations

from typing import Optional

import torch

from protdiff_fast._checks import check_mask, check_tensor
from protdiff_fast.backends import cpu_extension


def _project_(buffer: torch.Tensor, mask_u8: torch.Tensor) -> torch.Tensor:
    ext = cpu_extension()
    if ext is None:
        raise RuntimeError("the cpu backend needs the C++ extension protdiff_fast._C, which is not built")
    ext.center_masked_(buffer.numpy(), mask_u8.numpy())
    return buffer


def _kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class _RemoveCenterOfMass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, mask_u8: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(mask_u8)
        buffer = x.detach().to(_kernel_dtype(x.dtype), copy=True).contiguous()
        return _project_(buffer, mask_u8).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        # the projection is linear and self-adjoint: its gradient is the projection of grad_out, through
        # this Function again so that create_graph (second derivatives) differentiates it too
        (mask_u8,) = ctx.saved_tensors
        return _RemoveCenterOfMass.apply(grad_out, mask_u8), None


def remove_center_of_mass_cpu(x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    check_tensor("x", x, (None, None, None))
    if x.device.type != "cpu":
        raise ValueError(f"x: the cpu backend takes CPU tensors, got device {x.device}")
    mask = check_mask(mask, x.shape[0], x.shape[1], x.device)
    return _RemoveCenterOfMass.apply(x, mask.to(torch.uint8).contiguous())
