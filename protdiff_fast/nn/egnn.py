"""EGNNLayer and EGNN: thin modules around the fused op ``egnn_pair_aggregate``.

The math is in :mod:`protdiff_fast.reference.egnn`. The module owns the MLP weights in the
usual ``nn.Linear`` layout, computes the per-node halves of phi_e's first layer with GEMMs
(p = h W_src + b1, q = h W_dst), hands the all-pairs part to the chosen backend, and applies
phi_h and the residuals in plain torch.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from protdiff_fast._checks import check_tensor
from protdiff_fast.backends import check_backend_name, resolve
from protdiff_fast.nn import batch_invariant
from protdiff_fast.ops import cannot_run_egnn, egnn_pair_aggregate
from protdiff_fast.reference.egnn import COORDS_AGG, check_normalize


def _no_context():
    import contextlib

    return contextlib.nullcontext()


class EGNNLayer(nn.Module):
    """One E(n)-equivariant layer: ``forward(h, x, edge_attr=None, mask=None) -> (h', x')``.

    Args:
        hidden_dim: H, the width of h and of the messages m_ij.
        edge_dim: E, the width of the edge features a_ij (0 for none).
        attention: gate each message by sigmoid(w_att . m_ij + b_att).
        normalize: divide x_i - x_j by (its detached length + eps) in the coordinate update.
        tanh: bound phi_x with a tanh: each pair's coefficient becomes R tanh(phi_x / R), R = coords_range.
        coords_range: R of ``tanh`` (1: tanh(phi_x)). About phi_x itself where |phi_x| << R, so a model
            trained without the bound starts from nearly its own function; a layer then moves a node by at
            most R (``coords_agg="mean"``, ``normalize=True``).
        coords_agg: "mean" (C = 1/(n_b - 1) over real nodes) or "sum" (C = 1).
        eps: the epsilon of ``normalize``.
        coord_init_gain: xavier gain of phi_x's last layer (small, so early layers barely move x).
        update_h: compute h' with phi_h (False: h is returned as is and phi_h does not exist, for a
            last layer whose features nobody reads).
        backend: "auto", "reference", "triton" or "cpu" (see :mod:`protdiff_fast.backends`).

    ``edge_attr`` is either dense, (B, N, N, E), or a relative sequence-offset table (2K + 1, E)
    read at row clip(j - i, -K, K) + K for the pair (i, j); the table is projected through W_e
    once, (2K + 1, H), and never expanded to N x N. Padding nodes (mask False) change nothing
    for the real nodes, and their outputs are zero.

    Under ``torch.autocast`` the fused pair op runs in the autocast dtype (its two H x H products
    per pair are matmuls) with float32 coordinates; x and the returned x stay float32.
    """

    def __init__(
        self,
        hidden_dim: int,
        edge_dim: int = 0,
        *,
        attention: bool = False,
        normalize: bool = False,
        tanh: bool = False,
        coords_agg: str = "mean",
        eps: float = 1e-8,
        coord_init_gain: float = 0.001,
        update_h: bool = True,
        backend: str = "auto",
        coords_range: float = 1.0,
    ) -> None:
        super().__init__()
        if not (isinstance(coords_range, (int, float)) and coords_range > 0 and math.isfinite(coords_range)):
            raise ValueError(f"coords_range: a finite number > 0, got {coords_range!r}")
        if coords_range != 1.0 and not tanh:
            raise ValueError("coords_range: the bound of tanh's R tanh(phi_x / R); set tanh=True to use it")
        self.coords_range = float(coords_range)
        if coords_agg not in COORDS_AGG:
            raise ValueError(f"coords_agg: expected one of {COORDS_AGG}, got {coords_agg!r}")
        check_normalize(normalize)  # here, not at the first call: the triton backend took normalize=1 as True
        if hidden_dim < 1 or edge_dim < 0:
            raise ValueError(f"hidden_dim must be >= 1 and edge_dim >= 0, got {hidden_dim}, {edge_dim}")
        H, E = hidden_dim, edge_dim
        self.hidden_dim, self.edge_dim = H, E
        self.normalize, self.tanh, self.coords_agg, self.eps = normalize, tanh, coords_agg, eps
        self.backend = check_backend_name(backend)
        self.phi_e = nn.Sequential(nn.Linear(2 * H + 1 + E, H), nn.SiLU(), nn.Linear(H, H), nn.SiLU())
        coord_out = nn.Linear(H, 1, bias=False)
        nn.init.xavier_uniform_(coord_out.weight, gain=coord_init_gain)
        self.phi_x = nn.Sequential(nn.Linear(H, H), nn.SiLU(), coord_out, *([nn.Tanh()] if tanh else []))
        self.phi_h = nn.Sequential(nn.Linear(2 * H, H), nn.SiLU(), nn.Linear(H, H)) if update_h else None
        self.att = nn.Sequential(nn.Linear(H, 1), nn.Sigmoid()) if attention else None

    def extra_repr(self) -> str:
        return (f"hidden_dim={self.hidden_dim}, edge_dim={self.edge_dim}, attention={self.att is not None}, "
                f"normalize={self.normalize}, tanh={self.tanh}"
                f"{f', coords_range={self.coords_range:g}' if self.coords_range != 1.0 else ''}, "
                f"coords_agg={self.coords_agg!r}, "
                f"backend={self.backend!r}")

    def backend_for(self, device: torch.device | str, dtype: Optional[torch.dtype] = None) -> str:
        """The backend this layer's fused op runs on for tensors on ``device`` (of ``dtype``: default
        the layer's weights'; autocast runs the op in the autocast dtype). With backend "auto" that is
        the reference where the fast backend cannot run this layer's width, dtype or options."""
        name = resolve("egnn_pair_aggregate", self.backend, device)
        if self.backend == "auto" and name != "reference":
            dtype = dtype or self.phi_e[2].weight.dtype
            if cannot_run_egnn(name, self.hidden_dim, [dtype], self.normalize):
                return "reference"
        return name

    def _edge_kwargs(self, edge_attr: Optional[torch.Tensor], B: int, N: int, W_e: torch.Tensor,
                     dtype: Optional[torch.dtype] = None, name: str = "edge_attr") -> dict:
        E = self.edge_dim
        if edge_attr is None:
            if E:
                raise ValueError(f"edge_attr: this layer was built with edge_dim={E} and needs edge features")
            return {}
        if not E:
            raise ValueError("edge_attr: this layer was built with edge_dim=0; pass edge_dim to use edge features")
        if edge_attr.dim() == 2:  # relative-offset table (2K + 1, E)
            check_tensor(name, edge_attr, (None, E), dtype=dtype)  # (named as the caller passed it)
            if edge_attr.shape[0] % 2 != 1:
                raise ValueError(f"{name}: an offset table needs 2K + 1 rows, got {edge_attr.shape[0]}")
            return {"rel": batch_invariant.linear(edge_attr, W_e)}  # (2K + 1, H)
        check_tensor("edge_attr", edge_attr, (B, N, N, E), dtype=dtype)
        return {"edge_attr": edge_attr, "W_e": W_e.t()}

    def forward(
        self,
        h: torch.Tensor,
        x: torch.Tensor,
        edge_attr: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        rel_offsets: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """h (B, N, H), x (B, N, 3) -> (h', x'). Edge features: dense ``edge_attr`` (B, N, N, E), or
        a relative-offset table ``rel_offsets`` (2K + 1, E) (also accepted as a 2-D ``edge_attr``)."""
        if rel_offsets is not None:
            if edge_attr is not None:
                raise ValueError("give edge_attr (dense) or rel_offsets (offset table), not both: the layer "
                                 "has one edge projection W_e")
            if rel_offsets.dim() != 2:
                raise ValueError(f"rel_offsets: expected a (2K + 1, E) table, got shape {tuple(rel_offsets.shape)}")
            edge_attr = rel_offsets
        check_tensor("h", h, (None, None, self.hidden_dim))
        B, N, H = h.shape
        autocast = torch.is_autocast_enabled(h.device.type)
        # under autocast h may come in the autocast dtype while x stays float32: coordinates of tens of
        # Angstrom would lose a tenth of an Angstrom in bf16
        check_tensor("x", x, (B, N, 3), dtype=None if autocast else h.dtype, device=h.device)
        first = self.phi_e[0]
        if not autocast:
            check_weight_dtype("h", h, first.weight)
        W_src, W_dst = first.weight[:, :H], first.weight[:, H:2 * H]  # (H, H) each, nn.Linear layout
        w_d, W_e = first.weight[:, 2 * H], first.weight[:, 2 * H + 1:]  # (H,), (H, E)
        p = batch_invariant.linear(h, W_src, first.bias)  # (B, N, H): the h_i half of phi_e's first layer
        q = batch_invariant.linear(h, W_dst)  # (B, N, H): the h_j half
        attention = {}
        if self.att is not None:
            attention = {"w_att": self.att[0].weight[0], "b_att": self.att[0].bias[0]}
        pair_inputs = [x, p, q, w_d, self.phi_e[2].weight.t(), self.phi_e[2].bias, self.phi_x[0].weight.t(),
                       self.phi_x[0].bias, self.phi_x[2].weight[0] / self.coords_range if self.coords_range != 1.0
                       else self.phi_x[2].weight[0]]  # R tanh(phi / R): w4 / R in, dx times R out
        edge = self._edge_kwargs(edge_attr, B, N, W_e, None if autocast else W_e.dtype,
                                 "rel_offsets" if rel_offsets is not None else "edge_attr")
        if autocast:
            # The fused op is not an autocast-aware torch op, so the cast is made here: its bulk is two
            # H x H products per pair, so it runs in the autocast dtype like a matmul (bf16/fp16
            # products, fp32 accumulation in the fused backends), except the coordinates, which stay
            # float32 (the contract's "fp32 coordinates").
            low = torch.get_autocast_dtype(h.device.type)
            pair_inputs = [x.float()] + [t.to(low) for t in pair_inputs[1:]]
            edge = {k: v.to(low) for k, v in edge.items()}
            attention = {k: v.to(low) for k, v in attention.items()}
        with torch.autocast(h.device.type, enabled=False) if autocast else _no_context():
            try:
                m_i, dx_i = egnn_pair_aggregate(
                    *pair_inputs, mask=mask, normalize=self.normalize, tanh=self.tanh, coords_agg=self.coords_agg,
                    eps=self.eps, backend=self.backend, **attention, **edge,
                )
            except ValueError as err:  # name the layer's inputs, not the op's (p, q: h through phi_e's first layer)
                op_names = {"p": "h (or phi_e's first layer), through p = W_src h + b1",
                            "q": "h (or phi_e's first layer), through q = W_dst h",
                            "rel": "rel_offsets (or W_e), through rel = rel_offsets W_e^T"}
                name = str(err).split(":", 1)[0]
                if name in op_names and "contains" in str(err):
                    raise ValueError(f"{op_names[name]}: {str(err).split(': ', 1)[1]}") from err
                raise
        h_out = h + batch_invariant.sequential(self.phi_h, torch.cat([h, m_i.to(h.dtype)], dim=-1)) \
            if self.phi_h is not None else h
        x_out = x + (dx_i * self.coords_range if self.coords_range != 1.0 else dx_i).to(x.dtype)
        if mask is not None:
            keep = mask.unsqueeze(-1)
            h_out, x_out = h_out * keep.to(h_out.dtype), x_out * keep.to(x_out.dtype)
        return h_out, x_out


def check_weight_dtype(name: str, t: torch.Tensor, weight: torch.Tensor) -> None:
    if t.dtype != weight.dtype:
        raise TypeError(f"{name}: dtype {t.dtype}, but the module's weights are {weight.dtype}: convert one "
                        f"(module.to({t.dtype}) or {name}.to({weight.dtype})), or run under torch.autocast")


class EGNN(nn.Module):
    """Embedding in, ``num_layers`` EGNNLayers (optionally each followed by LayerNorm on h), embedding out.

    ``forward(h, x, edge_attr=None, mask=None) -> (h_out, x_out)`` with h (B, N, in_dim).
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: Optional[int] = None,
        num_layers: int = 4,
        edge_dim: int = 0,
        layer_norm: bool = False,
        **layer_kwargs,
    ) -> None:
        super().__init__()
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            # 0 layers returned x unchecked and unmasked: no EGNN at all, not an identity one
            raise ValueError(f"num_layers must be an integer >= 1, got {num_layers!r}")
        self.embedding_in = nn.Linear(in_dim, hidden_dim)
        self.layers = nn.ModuleList(EGNNLayer(hidden_dim, edge_dim, **layer_kwargs) for _ in range(num_layers))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden_dim) for _ in range(num_layers)) if layer_norm else None
        self.embedding_out = nn.Linear(hidden_dim, out_dim if out_dim is not None else in_dim)

    def forward(
        self,
        h: torch.Tensor,
        x: torch.Tensor,
        edge_attr: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        rel_offsets: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        check_tensor("h", h, (None, None, self.embedding_in.in_features))
        if not torch.is_autocast_enabled(h.device.type):
            check_weight_dtype("h", h, self.embedding_in.weight)
        h = self.embedding_in(h)
        for k, layer in enumerate(self.layers):
            h, x = layer(h, x, edge_attr, mask, rel_offsets)
            if self.norms is not None:
                h = self.norms[k](h)
        h = self.embedding_out(h)
        if mask is not None:
            h = h * mask.unsqueeze(-1).to(h.dtype)
        return h, x
