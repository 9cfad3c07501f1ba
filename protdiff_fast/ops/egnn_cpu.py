"""The fused EGNN pair aggregation on the C++ backend (``protdiff_fast._C.egnn_forward/backward``).

Same contract as :func:`protdiff_fast.reference.egnn.egnn_pair_aggregate_reference` (math and
shapes in that module's docstring). The kernels run in float64 for float64 inputs and in
float32 otherwise (bf16/fp16 inputs are upcast, the outputs cast back), on zero-copy numpy
views of contiguous CPU tensors. The backward recomputes the pair quantities (nothing
O(N^2) is saved) and is deterministic: the same bits for any thread count.

bf16 products on AMX: on CPUs with AMX-BF16 (Intel Sapphire Rapids and later) the forward runs
the two H x H products per pair (a W2, m W3) with bf16 operands and fp32 accumulation, the rest
in fp32, when the inputs are bf16, or when they are float32 and
``torch.get_float32_matmul_precision()`` is ``"medium"`` (torch's own switch for "bf16 inside
float32 matmuls"). The backward then runs its recomputed forward, the two products that carry
the gradient back through the pair MLP (dS W3^T, dY W2^T) and the weight gradients (a^T dY,
m^T dS) the same way. Where a bend reads a product's output (silu' in the backward, the
attention gate), its left operand a or m goes in as two bf16 parts, hi + lo (~16 bits, twice the
tile products for that one, sharing the weight's tiles): with silu saturated (p, q ~50,
coordinates ~100) a and m reach the thousands while a few columns of y, s cancel to O(10), and
one bf16 rounding moved them across the bend (gradients, and m_i with attention, at 3-4x the
bf16 reference's error). ``PROTDIFF_FAST_AMX=0`` turns it off. :func:`amx_status` says whether
and why (not).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from protdiff_fast._checks import first_order_backward
from protdiff_fast.backends import cpu_extension
from protdiff_fast.reference.egnn import check_egnn_pair_aggregate_inputs, check_normalize

# positions of the tensor inputs of _EgnnPairAggregateCPU.forward
_NAMES = ("x", "p", "q", "w_d", "W2", "b2", "W3", "b3", "w4", "edge_attr", "W_e", "rel", "w_att", "b_att")


def _ext():
    ext = cpu_extension()
    if ext is None:
        raise RuntimeError("the cpu backend needs the C++ extension protdiff_fast._C, which is not built")
    return ext


def amx_status() -> Tuple[bool, str]:
    """(usable, why not): whether the bf16 AMX products can run on this machine and build."""
    ext = cpu_extension()
    if ext is None:
        return False, "the C++ extension is not built"
    if os.environ.get("PROTDIFF_FAST_AMX", "1") == "0":
        return False, "turned off by PROTDIFF_FAST_AMX=0"
    if not ext.amx_available():
        return False, ext.amx_unavailable_reason()
    if ext.simd_isa() != "avx512":
        return False, f"the kernels run with {ext.simd_isa()}, the AMX path needs avx512"
    return True, ""


def uses_amx(dtype: torch.dtype) -> bool:
    """Whether a forward with inputs of ``dtype`` runs its pair products in bf16 on AMX."""
    wants_bf16 = dtype == torch.bfloat16 or (dtype == torch.float32
                                             and torch.get_float32_matmul_precision() == "medium")
    return wants_bf16 and amx_status()[0]


def _np(t: Optional[torch.Tensor]):
    return None if t is None else t.numpy()


class _EgnnPairAggregateCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p, q, w_d, W2, b2, W3, b3, w4, edge_attr, W_e, rel, w_att, b_att, mask_u8, flags):
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        inputs = [None if t is None else t.detach().to(compute).contiguous()
                  for t in (x, p, q, w_d, W2, b2, W3, b3, w4, edge_attr, W_e, rel, w_att)]
        B, N, _ = x.shape
        m_i = torch.empty(B, N, W2.shape[-1], dtype=compute)  # (B, N, M)
        dx_i = torch.empty(B, N, 3, dtype=compute)
        b_att_value = 0.0 if b_att is None else float(b_att)
        amx = uses_amx(p.dtype)
        _ext().egnn_forward(*[_np(t) for t in inputs], b_att=b_att_value, mask=_np(mask_u8), **flags,
                            m_out=m_i.numpy(), dx_out=dx_i.numpy(), amx=amx)
        ctx.save_for_backward(*[t for t in inputs if t is not None], mask_u8)
        ctx.present = [t is not None for t in inputs]
        ctx.b_att, ctx.flags, ctx.compute, ctx.amx = b_att_value, flags, compute, amx
        ctx.dtypes = [None if t is None else t.dtype for t in (x, p, q, w_d, W2, b2, W3, b3, w4, edge_attr, W_e,
                                                              rel, w_att, b_att)]
        ctx.b_att_shape = None if b_att is None else b_att.shape
        return m_i.to(p.dtype), dx_i.to(x.dtype)  # p's dtype: x may be float32 next to bf16 features

    @staticmethod
    @first_order_backward("cpu")
    def backward(ctx, grad_m, grad_dx):
        saved = list(ctx.saved_tensors)
        mask_u8 = saved.pop()
        it = iter(saved)
        inputs = [next(it) if present else None for present in ctx.present]
        x, W2 = inputs[0], inputs[4]
        compute = ctx.compute
        B, N, _ = x.shape
        M = W2.shape[-1]
        grad_m = torch.zeros(B, N, M, dtype=compute) if grad_m is None else grad_m.to(compute).contiguous()
        grad_dx = torch.zeros(B, N, 3, dtype=compute) if grad_dx is None else grad_dx.to(compute).contiguous()
        grads = [None if t is None else torch.empty_like(t) for t in inputs]
        if inputs[9] is not None and not ctx.needs_input_grad[9]:
            grads[9] = None  # the dense edge gradient is O(N^2 E): skip it when nobody asks
        d_b_att = torch.empty(1, dtype=compute) if inputs[12] is not None else None
        _ext().egnn_backward(
            *[_np(t) for t in inputs], b_att=ctx.b_att, mask=_np(mask_u8), **ctx.flags,
            grad_m=grad_m.numpy(), grad_dx=grad_dx.numpy(),
            d_x=grads[0].numpy(), d_p=grads[1].numpy(), d_q=grads[2].numpy(), d_w_d=grads[3].numpy(),
            d_W2=grads[4].numpy(), d_b2=grads[5].numpy(), d_W3=grads[6].numpy(), d_b3=grads[7].numpy(),
            d_w4=grads[8].numpy(), d_edge_attr=_np(grads[9]), d_W_e=_np(grads[10]), d_rel=_np(grads[11]),
            d_w_att=_np(grads[12]), d_b_att=_np(d_b_att), amx=ctx.amx,
        )
        grads.append(None if d_b_att is None else d_b_att.reshape(ctx.b_att_shape))
        out = []
        for k, (g, dtype) in enumerate(zip(grads, ctx.dtypes)):
            out.append(g.to(dtype) if g is not None and ctx.needs_input_grad[k] else None)
        return (*out, None, None)


def egnn_pair_aggregate_cpu(
    x: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    w_d: torch.Tensor,
    W2: torch.Tensor,
    b2: torch.Tensor,
    W3: torch.Tensor,
    b3: torch.Tensor,
    w4: torch.Tensor,
    *,
    mask: Optional[torch.Tensor] = None,
    edge_attr: Optional[torch.Tensor] = None,
    W_e: Optional[torch.Tensor] = None,
    rel: Optional[torch.Tensor] = None,
    w_att: Optional[torch.Tensor] = None,
    b_att: Optional[torch.Tensor] = None,
    normalize=False,
    tanh: bool = False,
    coords_agg: str = "mean",
    eps: float = 1e-8,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(m_i, dx_i) of the fused-op contract, computed by the C++ kernels, for any widths H_e, M, H_x
    (egnn-pytorch's layer: H_e = 4M + 2, H_x = 4M; the kernels pad each to their column chunk)."""
    check_normalize(normalize)
    if x.device.type != "cpu":
        raise ValueError(f"x: the cpu backend takes CPU tensors, got device {x.device}")
    mask, b_att = check_egnn_pair_aggregate_inputs(
        x, p, q, w_d, W2, b2, W3, b3, w4, mask=mask, edge_attr=edge_attr, W_e=W_e, rel=rel,
        w_att=w_att, b_att=b_att, coords_agg=coords_agg, eps=eps,
    )
    # the kernels' normalize mode: 0 none, 1 stopgrad length + eps, 2 "clamp" (max(length, eps), no stopgrad)
    flags = dict(normalize=2 if isinstance(normalize, str) else int(bool(normalize)), tanh=bool(tanh), mean_agg=coords_agg == "mean", eps=float(eps))
    mask_u8 = mask.to(torch.uint8).contiguous()
    return _EgnnPairAggregateCPU.apply(x, p, q, w_d, W2, b2, W3, b3, w4, edge_attr, W_e, rel, w_att, b_att,
                                       mask_u8, flags)

