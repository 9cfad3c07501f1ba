r"""Drop-in replacements for egnn-pytorch's ``EGNN`` layer and ``EGNN_Network`` (dense mode).

egnn-pytorch (PyPI ``egnn-pytorch`` 0.2.8, lucidrains) materializes the (B, N, N, H) pair tensors;
these modules have the same constructor arguments, submodules and parameter names (so
``load_state_dict`` works in both directions) and run the pair part through the fused op
``egnn_pair_aggregate``. Their layer, for real nodes i, j (both in the mask; j = i included):

    m_ij   = edge_mlp([h_i, h_j, d2_ij, e_ij])      Linear(D_in, H_e = 2 D_in), SiLU, Linear(H_e, M), SiLU
             [* edge_gate(m_ij)]                     soft_edges: sigmoid(Linear(M, 1))
    w_ij   = coors_mlp(m_ij)                         Linear(M, H_x = 4 M), SiLU, Linear(H_x, 1) (with bias b4)
    x_i'   = x_i + sum_j w_ij * coors_norm(x_i - x_j)        coors_norm: u / max(|u|, eps) * scale, or u
    m_i    = sum_j m_ij   (m_pool_method "mean": divided by the number of real nodes)
    h_i'   = h_i + node_mlp([node_norm(h_i), m_i])

with D_in = 2 dim + edge_dim + 1. How it maps onto the op (which excludes j = i and has no bias
after phi_x): p, q, w_d, W_e from edge_mlp's first layer as in :class:`protdiff_fast.nn.EGNNLayer`,
coords_agg="sum", soft_edges = the op's attention gate, norm_coors = normalize="clamp" times the
learnable scale; the self message m_ii = edge_mlp([h_i, h_i, 0, e_ii]) is added in O(N) outside
the op (its coordinate term is zero: x_i - x_i = 0); b4's coordinate term
sum_j b4 (x_i - x_j) = b4 (n x_i - sum_j x_j) is added in O(N) outside the op, and under norm_coors,
where it does not factor, b4 rides along inside phi_x as one extra hidden unit with constant
input (b3 entry 1, W3 column 0, w4 entry b4 / silu(1)). Nothing O(N^2 H) is materialized.

The widths (H_e, M, H_x) = (2 D_in, m_dim, 4 m_dim [+ 1]) are rectangular: the cpu kernels take them
as they are, the triton kernels with H_e and H_x padded to multiples of 16 and M to a power of two
(:func:`protdiff_fast.ops.egnn_triton.padded_widths`; m_dim up to 256), so a pair costs the layer's
own H_e M + M H_x products on either device.

Padding nodes (mask False): outputs equal egnn-pytorch's on every row, padding rows included
(there, x' = x and h' = h + node_mlp([node_norm(h), 0])). One difference: the op requires every
sample to have at least one real node, where egnn-pytorch accepts all-padding samples.

Options of egnn-pytorch that these modules do not support raise ValueError naming the option:
``fourier_features > 0`` (sin/cos of d2 inside the pair MLP), ``num_nearest_neighbors > 0``,
``only_sparse_neighbors``, ``valid_radius < inf`` (these three select sparse neighbourhoods;
egnn-pytorch ignores valid_radius in dense mode), ``coor_weights_clamp_value`` (a clamp after the
bias of phi_x, which the op cannot express), ``adj_mat`` in forward (ignored by egnn-pytorch in
dense mode), ``dropout > 0`` in training mode (fine in eval mode), and in ``EGNN_Network``
``num_adj_degrees`` and ``global_linear_attn_every > 0``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from protdiff_fast._checks import check_mask, check_tensor
from protdiff_fast.backends import check_backend_name
from protdiff_fast.ops import egnn_pair_aggregate

SILU_ONE = 1.0 / (1.0 + math.exp(-1.0))  # silu(1): the constant hidden unit that carries b4 under norm_coors


class CoorsNorm(nn.Module):
    """egnn-pytorch's CoorsNorm: u / max(|u|, eps) * scale (the scale is learnable)."""

    def __init__(self, eps: float = 1e-8, scale_init: float = 1.0) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.zeros(1).fill_(scale_init))

    def forward(self, coors: torch.Tensor) -> torch.Tensor:
        norm = coors.norm(dim=-1, keepdim=True)
        return coors / norm.clamp(min=self.eps) * self.scale


# the fused op's argument -> what it is made of in EGNN (for its errors, e.g. a NaN in the inputs)
_OP_NAMES = {
    "x": "coors", "edge_attr": "edges",
    "p": "feats (or edge_mlp.0's weight or bias), through p = edge_mlp.0's feats_i part",
    "q": "feats (or edge_mlp.0.weight), through q = edge_mlp.0's feats_j part",
    "w_d": "edge_mlp.0.weight", "W_e": "edge_mlp.0.weight", "W2": "edge_mlp.3.weight", "b2": "edge_mlp.3.bias",
    "W3": "coors_mlp.0.weight", "b3": "coors_mlp.0.bias", "w4": "coors_mlp.3 (weight or bias)",
    "w_att": "edge_gate.0.weight",
}


def _unsupported(option: str, value, why: str) -> ValueError:
    return ValueError(f"{option}={value!r} is not supported by protdiff_fast.nn.compat ({why})")


class EGNN(nn.Module):
    """egnn-pytorch's ``EGNN`` layer, dense all-pairs mode, on the fused op.

    ``forward(feats, coors, edges=None, mask=None) -> (feats', coors')`` with feats (B, N, dim),
    coors (B, N, 3), edges (B, N, N, edge_dim), mask (B, N) bool. Same constructor arguments as
    egnn-pytorch 0.2.8 (see the module docstring for those that raise), plus ``backend``. Under
    ``torch.autocast`` the pair op runs in the autocast dtype with float32 coordinates, as in
    :class:`protdiff_fast.nn.EGNNLayer`.
    """

    def __init__(
        self,
        dim: int,
        edge_dim: int = 0,
        m_dim: int = 16,
        fourier_features: int = 0,
        num_nearest_neighbors: int = 0,
        dropout: float = 0.0,
        init_eps: float = 1e-3,
        norm_feats: bool = False,
        norm_coors: bool = False,
        norm_coors_scale_init: float = 1e-2,
        update_feats: bool = True,
        update_coors: bool = True,
        only_sparse_neighbors: bool = False,
        valid_radius: float = float("inf"),
        m_pool_method: str = "sum",
        soft_edges: bool = False,
        coor_weights_clamp_value: Optional[float] = None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if fourier_features > 0:
            raise _unsupported("fourier_features", fourier_features,
                               "sin/cos encodings of the distance inside the pair MLP; use 0")
        if num_nearest_neighbors > 0:
            raise _unsupported("num_nearest_neighbors", num_nearest_neighbors,
                               "dense all-pairs mode only; use 0")
        if only_sparse_neighbors:
            raise _unsupported("only_sparse_neighbors", only_sparse_neighbors, "dense all-pairs mode only")
        if valid_radius != float("inf"):
            raise _unsupported("valid_radius", valid_radius, "it selects sparse neighbourhoods, which are not "
                               "supported (egnn-pytorch ignores it in dense mode); use inf")
        if coor_weights_clamp_value is not None:
            raise _unsupported("coor_weights_clamp_value", coor_weights_clamp_value,
                               "the fused op has no clamp on the coordinate weights; use None")
        if m_pool_method not in ("sum", "mean"):
            raise ValueError(f"m_pool_method: must be 'sum' or 'mean', got {m_pool_method!r}")
        if not (update_feats or update_coors):
            raise ValueError("update_feats, update_coors: you must update features, coordinates, or both")
        if dim < 1 or edge_dim < 0 or m_dim < 1:
            raise ValueError(f"dim and m_dim must be >= 1 and edge_dim >= 0, got {dim}, {m_dim}, {edge_dim}")

        self.dim, self.edge_dim, self.m_dim = dim, edge_dim, m_dim
        self.fourier_features = 0
        self.dropout_p = float(dropout)
        self.m_pool_method = m_pool_method
        self.norm_coors = bool(norm_coors)
        self.backend = check_backend_name(backend)
        self.init_eps = init_eps

        edge_input_dim = 2 * dim + edge_dim + 1
        drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.edge_mlp = nn.Sequential(
            nn.Linear(edge_input_dim, edge_input_dim * 2), drop, nn.SiLU(), nn.Linear(edge_input_dim * 2, m_dim),
            nn.SiLU(),
        )
        self.edge_gate = nn.Sequential(nn.Linear(m_dim, 1), nn.Sigmoid()) if soft_edges else None
        self.node_norm = nn.LayerNorm(dim) if norm_feats else nn.Identity()
        self.coors_norm = CoorsNorm(scale_init=norm_coors_scale_init) if norm_coors else nn.Identity()
        self.node_mlp = nn.Sequential(
            nn.Linear(dim + m_dim, dim * 2), drop, nn.SiLU(), nn.Linear(dim * 2, dim),
        ) if update_feats else None
        self.coors_mlp = nn.Sequential(
            nn.Linear(m_dim, m_dim * 4), drop, nn.SiLU(), nn.Linear(m_dim * 4, 1),
        ) if update_coors else None
        self.apply(self._init)

    def _init(self, module: nn.Module) -> None:
        if type(module) is nn.Linear:  # egnn-pytorch's init: small normal weights, default biases
            nn.init.normal_(module.weight, std=self.init_eps)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, edge_dim={self.edge_dim}, m_dim={self.m_dim}, m_pool_method={self.m_pool_method!r}, "
                f"backend={self.backend!r}")

    def forward(
        self,
        feats: torch.Tensor,
        coors: torch.Tensor,
        edges: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        adj_mat: Optional[torch.Tensor] = None,
    ):
        if adj_mat is not None:
            raise _unsupported("adj_mat", "<tensor>", "it only selects sparse neighbourhoods, and egnn-pytorch "
                               "ignores it in dense mode; drop it")
        if self.training and self.dropout_p > 0:
            raise _unsupported("dropout", self.dropout_p, "no dropout inside the fused pair MLPs; call .eval() "
                               "or build with dropout=0 for training")
        check_tensor("feats", feats, (None, None, self.dim))
        B, N, D = feats.shape
        check_tensor("coors", coors, (B, N, 3), dtype=feats.dtype, device=feats.device)
        if self.edge_dim:
            if edges is None:
                raise ValueError(f"edges: this layer was built with edge_dim={self.edge_dim} and needs edges")
            check_tensor("edges", edges, (B, N, N, self.edge_dim), dtype=feats.dtype, device=feats.device)
        elif edges is not None:
            raise ValueError("edges: this layer was built with edge_dim=0")
        if mask is not None:
            mask = check_mask(mask, B, N, feats.device, check_empty=False)  # 0/1 values only (0.3 is no answer)

        first = self.edge_mlp[0]
        W = first.weight  # (H_e, 2D + 1 + E), input order [h_i, h_j, d2, e_ij]
        W_src, W_dst, w_d, W_e = W[:, :D], W[:, D:2 * D], W[:, 2 * D], W[:, 2 * D + 1:]
        p = F.linear(feats, W_src, first.bias)  # (B, N, H_e)
        q = F.linear(feats, W_dst)  # (B, N, H_e)
        second = self.edge_mlp[3]
        W2, b2 = second.weight.t(), second.bias  # (H_e, M), (M,)
        gate = {}
        if self.edge_gate is not None:
            gate = {"w_att": self.edge_gate[0].weight[0], "b_att": self.edge_gate[0].bias[0]}
        edge_kw = {} if edges is None else {"edge_attr": edges, "W_e": W_e.t()}

        normalize = False
        if self.coors_mlp is not None:
            W3, b3 = self.coors_mlp[0].weight.t(), self.coors_mlp[0].bias  # (M, H_x), (H_x,)
            w4, b4 = self.coors_mlp[3].weight[0], self.coors_mlp[3].bias[0]  # (H_x,), ()
            if self.norm_coors:
                normalize = "clamp"
                # b4 * sum_j u_ij / max(|u_ij|, eps) does not factor: carry b4 as a hidden unit with
                # constant input 1 (W3 column 0, b3 entry 1), silu(1) * b4 / silu(1) = b4
                W3 = F.pad(W3, (0, 1))
                b3 = torch.cat([b3, b3.new_ones(1)])
                w4 = torch.cat([w4, (b4 / SILU_ONE).reshape(1)])
        else:  # no coordinate update: a one-unit zero phi_x, its output is dropped
            W3, b3, w4 = W2.new_zeros(self.m_dim, 1), b2.new_zeros(1), b2.new_zeros(1)

        pair_inputs = [coors, p, q, w_d, W2, b2, W3, b3, w4]
        autocast = torch.is_autocast_enabled(feats.device.type) and p.dtype != coors.dtype
        if autocast:
            # as EGNNLayer: the fused op is no autocast-aware torch op (p and q came out of F.linear in the
            # autocast dtype, the weights are float32), so it runs in p's dtype, like the matmuls it stands
            # for, with float32 coordinates (the op's "fp32 coordinates"): it raised on W2's dtype before
            low = p.dtype
            pair_inputs = [coors.float()] + [t.to(low) for t in pair_inputs[1:]]
            gate = {k: v.to(low) for k, v in gate.items()}
            edge_kw = {k: v.to(low) for k, v in edge_kw.items()}
        with torch.autocast(feats.device.type, enabled=False) if autocast else contextlib.nullcontext():
            try:
                m_i, dx_i = egnn_pair_aggregate(
                    *pair_inputs, mask=mask, normalize=normalize, coords_agg="sum",
                    eps=getattr(self.coors_norm, "eps", 1e-8), backend=self.backend, **gate, **edge_kw,
                )  # (B, N, M), (B, N, 3): sums over j != i, real
            except ValueError as err:  # name this module's inputs and parameters, not the op's ("p: contains NaN")
                name, _, rest = str(err).partition(": ")
                if name in _OP_NAMES and rest.startswith("contains"):
                    raise ValueError(f"{_OP_NAMES[name]}: {rest}") from err
                raise
        dx_i = dx_i.to(coors.dtype)

        real = None if mask is None else mask.unsqueeze(-1).to(feats.dtype)  # (B, N, 1)
        if self.coors_mlp is not None:
            if self.norm_coors:
                dx_i = dx_i * self.coors_norm.scale
            else:  # b4's term: sum_{j real} b4 (x_i - x_j) = b4 (n x_i - sum_j x_j)
                if real is None:
                    n, total = float(N), coors.sum(dim=1, keepdim=True)
                else:  # padding rows through torch.where, not * 0: padding coordinates of 1e4 in float16
                    # overflowed n x_i to inf, and inf * 0 made those rows NaN instead of x' = x
                    coors_real = torch.where(mask.unsqueeze(-1), coors, coors.new_zeros(()))
                    n, total = real.sum(dim=1, keepdim=True), coors_real.sum(dim=1, keepdim=True)
                bias_term = b4 * (n * (coors if real is None else coors_real) - total)
                dx_i = dx_i + (bias_term if real is None else bias_term * real)
            coors_out = coors + dx_i
        else:
            coors_out = coors

        if self.node_mlp is None:
            return feats, coors_out
        # the self message m_ii = edge_mlp([h_i, h_i, 0, e_ii]), which the op leaves out
        z_ii = p + q  # (B, N, H_e)
        if edges is not None:
            z_ii = z_ii + F.linear(torch.diagonal(edges, dim1=1, dim2=2).transpose(1, 2), W_e)
        if mask is not None:  # (zeroed before the MLP, as the op zeroes padding: an overflow there was inf * 0)
            z_ii = torch.where(mask.unsqueeze(-1), z_ii, z_ii.new_zeros(()))
        m_ii = F.silu(F.linear(F.silu(z_ii), second.weight, b2))  # (B, N, M)
        if self.edge_gate is not None:
            m_ii = m_ii * self.edge_gate(m_ii)
        if real is not None:
            m_ii = m_ii * real
        m_i = m_i + m_ii
        if self.m_pool_method == "mean":  # over the real j of row i (padding rows are 0 either way)
            m_i = m_i / (float(N) if real is None else real.sum(dim=1, keepdim=True))
        node_out = self.node_mlp(torch.cat([self.node_norm(feats), m_i], dim=-1)) + feats
        return node_out, coors_out


class EGNN_Network(nn.Module):  # noqa: N801 (egnn-pytorch's name)
    """egnn-pytorch's ``EGNN_Network`` (dense layers, norm_feats=True in every layer) on the fused op.

    Supports token, position and edge-token embeddings; ``num_adj_degrees`` and global linear
    attention raise. ``forward(feats, coors, adj_mat=None, edges=None, mask=None,
    return_coor_changes=False)``; ``adj_mat`` must be None (see :class:`EGNN`).
    """

    def __init__(
        self,
        *,
        depth: int,
        dim: int,
        num_tokens: Optional[int] = None,
        num_edge_tokens: Optional[int] = None,
        num_positions: Optional[int] = None,
        edge_dim: int = 0,
        num_adj_degrees: Optional[int] = None,
        adj_dim: int = 0,
        global_linear_attn_every: int = 0,
        global_linear_attn_heads: int = 8,
        global_linear_attn_dim_head: int = 64,
        num_global_tokens: int = 4,
        **kwargs,
    ) -> None:
        super().__init__()
        if num_adj_degrees is not None:
            raise _unsupported("num_adj_degrees", num_adj_degrees, "adjacency-degree edge embeddings need adj_mat")
        if global_linear_attn_every > 0:
            raise _unsupported("global_linear_attn_every", global_linear_attn_every,
                               "global linear attention layers are not mirrored")
        self.num_positions = num_positions
        self.token_emb = nn.Embedding(num_tokens, dim) if num_tokens is not None else None
        self.pos_emb = nn.Embedding(num_positions, dim) if num_positions is not None else None
        self.edge_emb = nn.Embedding(num_edge_tokens, edge_dim) if num_edge_tokens is not None else None
        self.has_edges = edge_dim > 0
        self.num_adj_degrees = None
        self.adj_emb = None
        self.global_tokens = None
        edge_dim = edge_dim if self.has_edges else 0
        self.layers = nn.ModuleList(
            nn.ModuleList([None, EGNN(dim=dim, edge_dim=edge_dim, norm_feats=True, **kwargs)]) for _ in range(depth)
        )

    def forward(self, feats, coors, adj_mat=None, edges=None, mask=None, return_coor_changes=False):
        if adj_mat is not None:
            raise _unsupported("adj_mat", "<tensor>", "egnn-pytorch's dense layers ignore it; drop it")
        if self.token_emb is not None:
            feats = self.token_emb(feats)
        if self.pos_emb is not None:
            n = feats.shape[1]
            if n > self.num_positions:
                raise ValueError(f"given sequence length {n} must be less than the number of positions "
                                 f"{self.num_positions} set at init")
            feats = feats + self.pos_emb(torch.arange(n, device=feats.device))[None]  # not in place, unlike theirs
        if edges is not None and self.edge_emb is not None:
            edges = self.edge_emb(edges)
        coor_changes = [coors]
        for _, egnn in self.layers:
            feats, coors = egnn(feats, coors, edges=edges, mask=mask)
            coor_changes.append(coors)
        if return_coor_changes:
            return feats, coors, coor_changes
        return feats, coors
