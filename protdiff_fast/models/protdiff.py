"""The ProtDiff noise model (Trippe et al. 2022): an EGNN that predicts eps from x_t.

Architecture, as in the original code: ``num_layers`` blocks, each a linear embedding in, one
EGNN layer (normalized coordinate differences, mean coordinate aggregation, sum node aggregation,
residual, SiLU, last coordinate layer initialised with xavier gain 0.001), a linear embedding out,
then LayerNorm on h.

- node features: sinusoidal embedding of the residue index + sinusoidal embedding of t, the
  latter rotated by a fixed random orthogonal matrix (a buffer) so the two are not aligned; of width
  ``embed_dim`` (default hidden_dim), which the first block's embedding_in maps to hidden_dim;
- edge features: sinusoidal embedding of the residue offset i - j, handed to the fused op as the
  relative-offset table (2 max_len - 1 rows): never a dense N x N x E tensor;
- eps_hat = x_out - x_in, masked and projected to zero centre of mass.

Coordinates are in model units (1 unit = 10 A). ``backend`` picks the fused EGNN backend.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Optional

import numpy as np
import torch
from torch import nn

from protdiff_fast._checks import check_mask, check_tensor, value_checks_enabled
from protdiff_fast.nn import batch_invariant
from protdiff_fast.nn.egnn import EGNNLayer


# the longest chain a model may be built for: its residue-index and offset tables grow with max_length
# (2 max_length - 1 rows) and a chain's pair work with its square; the longest known protein chain (titin)
# has ~35,000 residues. A larger value (a typo such as 100000000) would allocate gigabytes before failing.
MAX_LENGTH = 65536


@dataclass
class ProtDiffConfig:
    max_length: int = 128
    num_timesteps: int = 1024
    beta_start: float = 1e-4
    beta_end: float = 0.02
    hidden_dim: int = 256
    edge_dim: int = 256
    num_layers: int = 4
    seed: int = 0  # fixes the random orthogonal mixing of the timestep embedding
    # tanh on phi_x: each layer moves a node by at most one model unit (mean of unit vectors, normalize=True).
    # Off in the shipped model and every checkpoint saved before the option (their configs lack the key).
    tanh: bool = False
    coords_range: float = 1.0  # with tanh: R of R tanh(phi_x / R), a layer's largest move (EGNNLayer)
    # Width of the sinusoidal residue-index and timestep features, which the first block's embedding_in
    # maps to hidden_dim. None: hidden_dim (the original model). A model widened from a trained one
    # (scripts/widen_checkpoint.py) keeps the narrow model's features, so it can compute the same function.
    embed_dim: Optional[int] = None

    def to_dict(self) -> Dict:
        out = asdict(self)
        if out["embed_dim"] in (None, self.hidden_dim):  # one spelling per architecture, and the configs of
            del out["embed_dim"]                           # every checkpoint saved before the option stay equal
        return out

    @property
    def input_dim(self) -> int:
        return self.hidden_dim if self.embed_dim is None else self.embed_dim


def sinusoidal_embedding(positions: torch.Tensor, dim: int, base: float) -> torch.Tensor:
    """[sin(p pi / base^(2k/dim)), cos(p pi / base^(2k/dim))]_k for k < dim/2 (ProtDiff's index embedding).

    Computed with numpy, not torch: torch's float64 sin on CPU (MKL VML, split over threads) was measured
    to return values off by up to 7e-9 (relative) on one thread's half of the tensor in about 1 process in
    60, on the first call only (torch 2.13, 2 threads); the model's tables are built once per process, so
    that made a process's model differ in the last float32 bits and ``--resume`` not bit-for-bit.
    """
    k = np.arange(dim // 2, dtype=np.float64)
    angles = positions.detach().cpu().numpy().astype(np.float64)[..., None] * math.pi / base ** (2 * k / dim)
    return torch.from_numpy(np.concatenate([np.sin(angles), np.cos(angles)], axis=-1))


class EGNNBlock(nn.Module):
    """embedding in, EGNN layer, embedding out, LayerNorm. The last block's features are never read
    (eps comes from x only), so it has no h update, embedding out or norm: no dead parameters."""

    def __init__(self, hidden_dim: int, edge_dim: int, backend: str, last: bool = False, tanh: bool = False,
                 coords_range: float = 1.0, input_dim: Optional[int] = None) -> None:
        super().__init__()
        self.embedding_in = nn.Linear(input_dim or hidden_dim, hidden_dim)
        self.egnn = EGNNLayer(hidden_dim, edge_dim, normalize=True, coords_agg="mean", update_h=not last,
                              tanh=tanh, coords_range=coords_range, backend=backend)
        self.embedding_out = None if last else nn.Linear(hidden_dim, hidden_dim)
        self.norm = None if last else nn.LayerNorm(hidden_dim)

    def forward(self, h, x, rel_table, mask):
        keep = mask.unsqueeze(-1).to(h.dtype)
        h = batch_invariant.linear(h * keep, self.embedding_in.weight, self.embedding_in.bias)
        h, x = self.egnn(h, x, rel_table, mask)
        if self.embedding_out is None:
            return h, x
        h = batch_invariant.linear(h, self.embedding_out.weight, self.embedding_out.bias) * keep
        return self.norm(h), x


class ProtDiff(nn.Module):
    """eps_theta(x_t, t, mask): ``forward(x_t (B, N, 3), t (B,), mask (B, N)) -> eps_hat (B, N, 3)``.

    Slot k of a chain is residue index k (the index embedding and the offsets i - j are the slots'):
    padding belongs after the real residues, as the sampler and the training batches put it; a False
    slot between real ones is a missing residue. The sinusoidal tables are buffers built from the
    config (max_length, num_timesteps, seed, embed_dim) and not saved in the state_dict, which is the
    same on every backend: load a state_dict only into a model of the config it was trained with
    (``load_model`` does): under another max_length the same weights load without error and compute
    another function.
    """

    def __init__(self, config: Optional[ProtDiffConfig] = None, backend: str = "auto", **overrides) -> None:
        super().__init__()
        config = config or ProtDiffConfig()
        if overrides:
            config = ProtDiffConfig(**{**config.to_dict(), **overrides})
        if config.embed_dim is not None and (not isinstance(config.embed_dim, int) or isinstance(config.embed_dim, bool)
                                             or config.embed_dim < 2):
            raise ValueError(f"embed_dim must be an even int >= 2 or None (= hidden_dim), got {config.embed_dim!r}")
        for name, least in (("max_length", 1), ("num_timesteps", 1), ("hidden_dim", 2), ("edge_dim", 2),
                            ("num_layers", 1)):
            value = getattr(config, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        if config.max_length > MAX_LENGTH:
            raise ValueError(f"max_length must be at most {MAX_LENGTH} (the model's residue-index and offset tables "
                             f"grow with it; no protein chain is that long), got {config.max_length}")
        if not (isinstance(config.coords_range, (int, float)) and math.isfinite(config.coords_range)
                and config.coords_range > 0):
            raise ValueError(f"coords_range must be a finite number > 0, got {config.coords_range!r}")
        if config.hidden_dim % 2 or config.edge_dim % 2 or config.input_dim % 2:
            raise ValueError("hidden_dim, edge_dim and embed_dim must be even (sin/cos pairs)")
        self.config = config
        self.max_length = config.max_length
        H, E, L, D = config.hidden_dim, config.edge_dim, config.max_length, config.input_dim
        g = torch.Generator().manual_seed(config.seed)
        q, r = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
        rotation = q * torch.sign(torch.diagonal(r))
        time_table = sinusoidal_embedding(torch.arange(config.num_timesteps + 1), D, config.num_timesteps) @ rotation
        self.register_buffer("time_table", time_table.float(), persistent=False)  # (T + 1, D)
        self.register_buffer("index_table", sinusoidal_embedding(torch.arange(L), D, L).float(), persistent=False)
        # row o + (L - 1) embeds the offset i - j = -o of the pair (i, j = i + o), as the original
        offsets = torch.arange(-(L - 1), L)
        self.register_buffer("offset_table", sinusoidal_embedding(-offsets, E, L).float(), persistent=False)
        self.blocks = nn.ModuleList(EGNNBlock(H, E, backend, last=k == config.num_layers - 1, tanh=config.tanh,
                                              coords_range=config.coords_range, input_dim=D if k == 0 else H)
                                    for k in range(config.num_layers))

    @property
    def backend(self) -> str:
        return self.blocks[0].egnn.backend

    def set_backend(self, backend: str) -> "ProtDiff":
        for block in self.blocks:
            block.egnn.backend = backend
        return self

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_tensor("x_t", x_t, (None, None, 3))
        B, N, _ = x_t.shape
        if N > self.max_length:
            raise ValueError(f"x_t: {N} residues exceed the model's max_length {self.max_length}")
        check_tensor("t", t, (B,), device=x_t.device, floating=False)
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"t: integer timesteps 1..T (torch.long), got dtype {t.dtype}")
        weights = self.blocks[0].egnn.phi_e[0].weight.dtype
        if x_t.dtype != weights:  # (autocast casts inside, from float32 inputs and weights)
            raise TypeError(f"x_t: dtype {x_t.dtype}, but the model's weights are {weights}: convert one "
                            f"(model.to({x_t.dtype}) or x_t.to({weights})), or use torch.autocast")
        if value_checks_enabled() and bool(((t < 1) | (t > self.config.num_timesteps)).any()):  # one host read
            raise ValueError(f"t: timesteps must lie in [1, {self.config.num_timesteps}]")
        mask = check_mask(mask, B, N, x_t.device)
        dtype = x_t.dtype
        # t as long: a uint8 index is a boolean mask to torch (with B = T + 1 samples it picked table rows
        # 0..T in batch order, whatever t said), and int8 / int16 indices are refused
        h = self.index_table[:N].to(dtype)[None] + self.time_table[t.long()].to(dtype)[:, None]  # (B, N, D)
        L = self.max_length
        rel = self.offset_table[L - N: L + N - 1].to(dtype)  # offsets -(N-1) .. N-1: (2N - 1, E)
        x = x_t
        for k, block in enumerate(self.blocks):
            try:
                h, x = block(h, x, rel, mask)
            except ValueError as err:  # the op names its own argument x: say whose coordinates they are
                if not str(err).startswith("x: contains"):
                    raise
                whose = "x_t" if k == 0 else f"the coordinates after block {k - 1} (x_t was finite)"
                raise ValueError(f"{whose}: {str(err).split(': ', 1)[1]}") from err
        keep = mask.unsqueeze(-1)
        eps = torch.where(keep, x - x_t, torch.zeros_like(x))
        return batch_invariant.center(eps, mask)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
