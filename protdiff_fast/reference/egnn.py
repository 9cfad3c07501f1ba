r"""The EGNN layer and its fused pair aggregation, in plain torch (the ground truth).

The EGNN layer (Satorras, Hoogeboom & Welling 2021, eqs. 3-6), as used by ProtDiff:

    m_ij  = phi_e(h_i, h_j, ||x_i - x_j||^2, a_ij)
    x_i'  = x_i + C * sum_{j != i} (x_i - x_j) * phi_x(m_ij)
    m_i   = sum_{j != i} m_ij
    h_i'  = h_i + phi_h(h_i, m_i)

    phi_e: Linear(2H + 1 + E -> H), SiLU, Linear(H -> H), SiLU     (input order [h_i, h_j, d2_ij, a_ij])
    phi_x: Linear(H -> H), SiLU, Linear(H -> 1, no bias, xavier gain 0.001) [, tanh]
    phi_h: Linear(2H -> H), SiLU, Linear(H -> H)
    attention (optional): m_ij <- m_ij * sigmoid(w_att . m_ij + b_att)
    normalize (optional): (x_i - x_j) <- (x_i - x_j) / (stopgrad ||x_i - x_j|| + eps)

Sums run over the real nodes j != i of the same sample (mask (B, N)). C = 1 / (n_b - 1) with
n_b the number of real nodes of sample b (``coords_agg="mean"``), or C = 1 (``"sum"``).
Padding nodes contribute nothing, and their outputs are zero.

Deliberate differences from other EGNN codes: the self pair i == j is excluded (the official
dense ProtDiff code includes m_ii in the node sum and divides by n_b); the distance feature is
the squared distance of the raw coordinates, also under ``normalize``; C counts real nodes only.

Edge features a_ij are either dense, (B, N, N, E), or a relative sequence-offset table
(2K + 1, E) read at row clip(j - i, -K, K) + K for the pair (i, j) (the same for every sample).

The fused-op contract (``egnn_pair_aggregate``)
-----------------------------------------------
phi_e's first layer is linear in the concatenation, so it splits into per-node halves that
are computed outside the op with GEMMs: W1 [h_i, h_j, d2, a] + b1 = p_i + q_j + w_d d2 + a W_e with

    p = h @ W_src + b1   (B, N, H)      q = h @ W_dst   (B, N, H)

Every backend implements, with weights in (in, out) layout (``y = x @ W + b``) and three widths
that need not agree: H_e (phi_e's hidden layer), M (the messages), H_x (phi_x's hidden layer);
EGNNLayer uses H_e = M = H_x = H, egnn-pytorch's layer (``protdiff_fast.nn.compat``) does not:

    inputs   x (B, N, 3); p, q (B, N, H_e); w_d (H_e,)
             edge term, one of: none | edge_attr (B, N, N, E) with W_e (E, H_e) | rel (2K+1, H_e)
             W2 (H_e, M), b2 (M,); optional attention w_att (M,), b_att ()
             W3 (M, H_x), b3 (H_x,), w4 (H_x,)
             mask (B, N) bool or None; flags normalize, tanh, coords_agg in {"mean", "sum"}; eps
    per pair z_ij   = p_i + q_j + w_d * d2_ij + e_ij,  d2_ij = ||x_i - x_j||^2
                    e_ij = edge_attr_ij @ W_e | rel[clip(j - i, -K, K) + K] | 0
             m_ij   = silu(silu(z_ij) @ W2 + b2)          [* sigmoid(m_ij . w_att + b_att)]
             phi_ij = silu(m_ij @ W3 + b3) . w4             [tanh]
    outputs  m_i  = sum_{j != i, real} m_ij                                (B, N, M)
             dx_i = C * sum_{j != i, real} u_ij * phi_ij                    (B, N, 3)
                    u_ij = x_i - x_j                                         normalize=False
                           (x_i - x_j) / (stopgrad sqrt(d2_ij) + eps)        normalize=True
                           (x_i - x_j) / max(sqrt(d2_ij), eps)               normalize="clamp"
                    ("clamp" is egnn-pytorch's CoorsNorm without its scale: no stopgrad, the
                    gradient flows through the length where it exceeds eps)
             rows of padding nodes are zero.
    dtypes   every input in one dtype, except that x may be float32 when the rest is bfloat16 or
             float16 ("fp32 coordinates": u_ij, d2_ij and dx_i stay float32, d2_ij enters z_ij in
             the low precision, m_i comes out in it): what EGNNLayer passes under autocast, since
             coordinates of tens of Angstrom lose a tenth of an Angstrom in bf16.

Backends may run only certain widths (triton: a square S in {16, ..., 256}, or M rounded up to
a power of two and H_e, H_x to multiples of 16): the dispatcher
``protdiff_fast.ops.egnn_pair_aggregate`` pads with zeros for them (exact, since silu(0) = 0);
see :mod:`protdiff_fast.ops._padding`.

The rest of the layer (the GEMMs for p and q, phi_h, residuals) is plain torch around the op.
This reference materializes the (B, N, N, H) message tensor: that is what it is for.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from protdiff_fast._checks import check_all_finite, check_mask, check_tensor

COORDS_AGG = ("mean", "sum")
NORMALIZE = (False, True, "clamp")


def relative_offset_index(num_nodes: int, max_offset: int, device: torch.device) -> torch.Tensor:
    """(N, N) long tensor with entry [i, j] = clip(j - i, -K, K) + K, the row of the offset table."""
    idx = torch.arange(num_nodes, device=device)
    return (idx[None, :] - idx[:, None]).clamp(-max_offset, max_offset) + max_offset


def _pair_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, N, N) bool: both nodes real and i != j."""
    n = mask.shape[1]
    not_self = ~torch.eye(n, dtype=torch.bool, device=mask.device)
    return mask[:, :, None] & mask[:, None, :] & not_self


def zero_padding(mask: torch.Tensor, x, p, q, edge_attr=None):
    """x, p, q (and edge_attr on pairs with a padding node) with padding rows set to zero.

    Padding contributes nothing, whatever finite values it holds (NaN/Inf anywhere is refused by the
    checks): masking the sums alone would not do, as padding coordinates of 1e20 (300 in float16)
    overflow d2 and inf * 0 = NaN."""
    keep = mask.unsqueeze(-1)
    x, p, q = (torch.where(keep, v, torch.zeros((), dtype=v.dtype, device=v.device)) for v in (x, p, q))
    if edge_attr is not None:
        pairs = (mask[:, :, None] & mask[:, None, :]).unsqueeze(-1)
        edge_attr = torch.where(pairs, edge_attr, torch.zeros((), dtype=edge_attr.dtype, device=edge_attr.device))
    return x, p, q, edge_attr


def _coord_scale(mask: torch.Tensor, coords_agg: str, dtype: torch.dtype) -> torch.Tensor:
    """C per sample, (B, 1, 1): 1/(n_b - 1) over real nodes for "mean" (1 when n_b = 1), 1 for "sum"."""
    if coords_agg == "sum":
        return torch.ones(mask.shape[0], 1, 1, dtype=dtype, device=mask.device)
    n_real = mask.sum(dim=1).to(dtype)
    return (1.0 / (n_real - 1).clamp(min=1)).view(-1, 1, 1)


def check_normalize(normalize) -> None:
    """``normalize`` is False, True (stopgrad length + eps) or "clamp" (max(length, eps), no stopgrad)."""
    if not any(normalize is v or (isinstance(v, str) and normalize == v) for v in NORMALIZE):
        raise ValueError(f"normalize: expected one of {NORMALIZE}, got {normalize!r}")


def _check_flags(coords_agg: str, eps: float) -> None:
    if coords_agg not in COORDS_AGG:
        raise ValueError(f"coords_agg: expected one of {COORDS_AGG}, got {coords_agg!r}")
    if not eps > 0:
        raise ValueError(f"eps: must be > 0, got {eps}")


LOW_PRECISION = (torch.bfloat16, torch.float16)


def compute_dtype(x: torch.Tensor, p) -> torch.dtype:
    """The dtype of the op's features and weights: p's where x is float32 and p low-precision (fp32
    coordinates, see the contract), else x's (and every other input must match it)."""
    if x.dtype == torch.float32 and isinstance(p, torch.Tensor) and p.dtype in LOW_PRECISION:
        return p.dtype
    return x.dtype


def check_egnn_pair_aggregate_inputs(
    x, p, q, w_d, W2, b2, W3, b3, w4, *, mask, edge_attr, W_e, rel, w_att, b_att, coords_agg, eps
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Validate the contract's arguments (shapes, dtypes, devices, NaN); every backend calls this.

    Returns the bool (B, N) mask and b_att as a 0-d tensor (or None).
    """
    check_tensor("x", x, (None, None, 3))
    B, N, _ = x.shape
    dtype, device = compute_dtype(x, p), x.device
    check_tensor("p", p, (B, N, None), dtype=dtype, device=device)
    H_e = p.shape[2]
    check_tensor("q", q, (B, N, H_e), dtype=dtype, device=device)
    check_tensor("W2", W2, (H_e, None), dtype=dtype, device=device)
    M = W2.shape[1]
    check_tensor("W3", W3, (M, None), dtype=dtype, device=device)
    H_x = W3.shape[1]
    for name, t, shape in (("w_d", w_d, (H_e,)), ("b2", b2, (M,)), ("b3", b3, (H_x,)), ("w4", w4, (H_x,))):
        check_tensor(name, t, shape, dtype=dtype, device=device)
    _check_flags(coords_agg, eps)
    given = mask is not None
    mask = check_mask(mask, B, N, device, check_empty=False)  # its empty-sample check joins the read below
    if edge_attr is not None and rel is not None:
        raise ValueError("give at most one edge term: edge_attr (with W_e) or rel, not both")
    if (edge_attr is None) != (W_e is None):
        raise ValueError("edge_attr and W_e come together: the dense edge term is edge_attr @ W_e")
    if edge_attr is not None:
        check_tensor("edge_attr", edge_attr, (B, N, N, None), dtype=dtype, device=device)
        check_tensor("W_e", W_e, (edge_attr.shape[3], H_e), dtype=dtype, device=device)
    if rel is not None:
        check_tensor("rel", rel, (None, H_e), dtype=dtype, device=device)
        if rel.shape[0] % 2 != 1:
            raise ValueError(f"rel: expected 2K + 1 rows (offsets -K..K), got {rel.shape[0]}")
    if (w_att is None) != (b_att is None):
        raise ValueError("w_att and b_att come together (the attention gate sigmoid(m_ij . w_att + b_att))")
    if w_att is not None:
        check_tensor("w_att", w_att, (M,), dtype=dtype, device=device)
        if not isinstance(b_att, torch.Tensor) or b_att.numel() != 1:
            raise ValueError("b_att: expected a scalar tensor (shape () or (1,))")
        b_att = check_tensor("b_att", b_att.reshape(()), (), dtype=dtype, device=device)
    # the weights and the offset table too (one read for all): a NaN there made every output NaN silently
    check_all_finite((("x", x), ("p", p), ("q", q), ("edge_attr", edge_attr), ("rel", rel), ("w_d", w_d), ("W2", W2),
                      ("b2", b2), ("W3", W3), ("b3", b3), ("w4", w4), ("W_e", W_e), ("w_att", w_att),
                      ("b_att", b_att)),
                     mask=mask if given else None)
    return mask, b_att


def egnn_pair_aggregate_reference(
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
    """(m_i, dx_i) of the fused-op contract in the module docstring, dense over all pairs."""
    check_normalize(normalize)
    mask, b_att = check_egnn_pair_aggregate_inputs(
        x, p, q, w_d, W2, b2, W3, b3, w4, mask=mask, edge_attr=edge_attr, W_e=W_e, rel=rel,
        w_att=w_att, b_att=b_att, coords_agg=coords_agg, eps=eps,
    )
    B, N, _ = x.shape
    dtype, device = p.dtype, x.device  # x.dtype too, or float32 coordinates (then u, d2 and dx in float32)
    x, p, q, edge_attr = zero_padding(mask, x, p, q, edge_attr)

    d2 = (x[:, :, None, :] - x[:, None, :, :]).pow(2).sum(-1)  # (B, N, N)
    z = p[:, :, None, :] + q[:, None, :, :] + d2[..., None].to(dtype) * w_d  # (B, N, N, H)
    if edge_attr is not None:
        z = z + edge_attr @ W_e
    if rel is not None:
        # (N, N, H), the same for every sample; F.embedding, not rel[index]: the backward of advanced
        # indexing (index_put_ with accumulate) sums the duplicate rows in a thread-dependent order on CPU
        z = z + F.embedding(relative_offset_index(N, rel.shape[0] // 2, device), rel)

    m_ij = F.silu(F.silu(z) @ W2 + b2)  # (B, N, N, H)
    if w_att is not None:
        m_ij = m_ij * torch.sigmoid(m_ij @ w_att + b_att)[..., None]
    phi_ij = F.silu(m_ij @ W3 + b3) @ w4  # (B, N, N)
    if tanh:
        phi_ij = torch.tanh(phi_ij)

    u_ij = x[:, :, None, :] - x[:, None, :, :]  # (B, N, N, 3)
    if isinstance(normalize, str):  # "clamp": u / max(|u|, eps), the gradient through |u| where |u| > eps
        above = d2 > eps * eps
        length = torch.where(above, d2, torch.ones_like(d2)).sqrt()  # no sqrt'(0) = inf at i == j
        u_ij = u_ij / torch.where(above, length, torch.full_like(length, eps))[..., None]
    elif normalize:  # (the self pair's 0 / (0 + eps) is 0/0 where eps rounds to 0, as 1e-8 does in float16)
        u_ij = u_ij / torch.where(_pair_mask(mask), d2.detach().sqrt() + eps, torch.ones_like(d2))[..., None]
    pair = _pair_mask(mask).to(dtype)  # (B, N, N)
    m_i = (m_ij * pair[..., None]).sum(dim=2)
    dx_i = (u_ij * (phi_ij * pair).to(x.dtype)[..., None]).sum(dim=2) * _coord_scale(mask, coords_agg, x.dtype)
    return m_i, dx_i


def egnn_layer_reference(
    layer,
    h: torch.Tensor,
    x: torch.Tensor,
    edge_attr: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The whole EGNN layer, literally: phi_e applied to the concatenation [h_i, h_j, d2_ij, a_ij].

    ``layer`` supplies the MLPs and flags (an :class:`protdiff_fast.nn.EGNNLayer`); this function
    does not use the fused-op split, so comparing the two checks the split as well.
    """
    B, N, H = h.shape
    check_tensor("x", x, (B, N, 3), dtype=h.dtype, device=h.device)
    mask = check_mask(mask, B, N, h.device)
    u_ij = x[:, :, None, :] - x[:, None, :, :]  # (B, N, N, 3)
    d2 = u_ij.pow(2).sum(-1, keepdim=True)  # (B, N, N, 1)
    parts = [h[:, :, None, :].expand(B, N, N, H), h[:, None, :, :].expand(B, N, N, H), d2]
    if edge_attr is not None:
        if edge_attr.dim() == 2:  # relative-offset table (2K+1, E)
            a_ij = edge_attr[relative_offset_index(N, edge_attr.shape[0] // 2, h.device)]
            parts.append(a_ij.expand(B, N, N, edge_attr.shape[-1]))
        else:
            parts.append(edge_attr)
    m_ij = layer.phi_e(torch.cat(parts, dim=-1))  # (B, N, N, H)
    if layer.att is not None:
        m_ij = m_ij * layer.att(m_ij)
    phi_ij = layer.phi_x(m_ij)  # (B, N, N, 1)
    if layer.normalize:
        u_ij = u_ij / (d2.detach().sqrt() + layer.eps)
    pair = _pair_mask(mask).unsqueeze(-1).to(h.dtype)
    x_out = x + (u_ij * phi_ij * pair).sum(dim=2) * _coord_scale(mask, layer.coords_agg, h.dtype)
    m_i = (m_ij * pair).sum(dim=2)
    h_out = h + layer.phi_h(torch.cat([h, m_i], dim=-1)) if layer.phi_h is not None else h
    keep = mask.unsqueeze(-1).to(h.dtype)
    return h_out * keep, x_out * keep
