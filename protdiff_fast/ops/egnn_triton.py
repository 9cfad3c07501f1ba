r"""The fused EGNN pair aggregation as Triton kernels, forward and backward, never storing O(N^2) data.

Same contract as :func:`protdiff_fast.reference.egnn.egnn_pair_aggregate_reference` (math, shapes
and the deliberate differences from other EGNN codes are in that module's docstring):

    z_ij   = p_i + q_j + w_d d2_ij + e_ij                 e_ij = edge_attr_ij W_e | rel[clip(j-i)+K] | 0
    a_ij   = silu(z_ij)                    r_ij = a_ij W2 + b2        m_ij = silu(r_ij) [* g_ij]
    g_ij   = sigmoid(m_ij . w_att + b_att) (attention only)
    t_ij   = m_ij W3 + b3                  s_ij = silu(t_ij)          phi_ij = s_ij . w4 [tanh]
    m_i    = sum_j v_ij m_ij               dx_i = C_b sum_j v_ij u_ij phi_ij

with v_ij = 1 for real pairs j != i of the same sample, else 0. Like FlashAttention, one program
owns a block of BLOCK_I rows i and loops over blocks of BLOCK_J columns j; the pair tile is
flattened to [BLOCK_I * BLOCK_J, H] so the two H x H products are ``tl.dot``s (tensor cores on
the GPU). Extra memory is O(B N H): m_i, dx_i and, in the backward, per-program partial sums of
the weight gradients.

Hidden sizes H in SUPPORTED_HIDDEN = (16, 32, 64, 128, 256) for square widths H_e = M = H_x = H.
Rectangular widths (egnn-pytorch's layer: H_e = 4 dim + 2, M = m_dim, H_x = 4 m_dim) run the chunked
kernels below with three widths HE, HM, HX: z by K chunks and t by column chunks (HE, HX multiples of
RECT_K_CHUNK up to RECT_MAX_WIDTH), m whole (HM a power of two up to 256), so a pair costs HE HM + HM HX
products instead of the square 2 S^2 (the dispatcher zero-pads to :func:`padded_widths`). At H = 256 the forward splits both H x H products into chunks
(:func:`fwd_chunks`): r = b2 + sum_c silu(z[:, c]) W2[c, :] over K chunks, z's columns rebuilt from
the inputs per chunk, and phi = sum_c silu(m W3[:, c] + b3[c]) . w4[c] over output-column chunks,
weight chunks loaded inside the loops; fp32 at H = 128 chunks them too (its 3xTF32 operand copies
spilled), and fp32 at H = 256 reads the second product's m back by K chunks from a per-program
scratch copy (``M_SCRATCH``); bf16 with float32 coordinates chunks at H = 128: on sm_90 every forward
is spill-free.
The one-pass backward at H = 128 and 256 (and fp32 at 64) runs with every H x H product in chunks too
(:func:`bwd_chunks`, ``_egnn_bwd_chunked_kernel``): sm_90 spills 0-104 B there where the unchunked
body spilled 0.6-1.1 KB at H = 256, and fp32 at H = 256 gets a fused backward at all (the unchunked
body's whole W2 / W3 operands needed 256 KB of shared memory, over the 227 KB limit; the two-pass
scheme there still falls back to recomputing through the reference, :func:`has_fused_backward`). Under
autocast EGNNLayer calls the op in bf16/fp16 with float32 coordinates (the contract allows x in
float32 next to low-precision features: x is read and dx written in float32, everything else runs as
in a bf16 call), so mixed-precision training at H = 256 takes the fused backward.

Backward (recomputing every pair quantity instead of storing it). One pass by default
(:func:`bwd_passes`): one program per square region of pairs (:func:`_regions`), tiles of 1 row i x
16 columns j; per tile dp_i, the i side of dx and the vector gradients as below, and the tile's dq_j
rows and j side of dx read-modify-written into the program's partial for its row chunk (no other
program writes it), both weight gradients staged (below): 6 H x H products per pair (recomputed a W2
and m W3, d_t W3^T, d_r W2^T, dW2, dW3). Two passes (``PROTDIFF_FAST_TRITON_BWD_PASSES=2``, the
earlier scheme: each pass recomputes the chain, 10 products per pair):

    pass "rows i"  (one program per i-block, loop over j): dp_i, the i-side of dx, and per-program
                   partial sums of dW2, db2, dw_d, dw_att, db_att, dW_e; d edge_attr_ij (each pair
                   written once). With the offset table the programs own square regions of pairs
                   instead (:func:`_regions`): d rel per region and offset j - i (a window of
                   2 chunk - 1 rows, not the whole table), dp_i per column chunk, both summed after
    pass "rows j"  (one program per j-block, loop over i): dq_j, the j-side of dx, and partial sums
                   of dW3, db3, dw4 (one [H, H] weight gradient per pass keeps registers in bounds)
    partials are summed afterwards in torch: no atomics, so the result is deterministic.

A third scheme, not the default until a GPU has timed it: ``PROTDIFF_FAST_TRITON_BWD=slab``
(:mod:`protdiff_fast.ops.egnn_triton_slab`) maps every pair of a slab of rows with no read-modify-write and
leaves dW2 / dW3 and the reductions over pairs to cuBLAS GEMMs and torch sums over an O(B N H) workspace.

Weight gradients: each program stages its tiles' operands (a and d_r for dW2, m and d_t for dW3; 2 x
16 x H in the weight dtype per tile) and every ``dw_stage`` tiles adds one [H, 16 T] x [16 T, H]
product to its fp32 partial (:func:`_flush_weight_gradient`, by ``flush_rows`` output rows). A read-
modify-write of the [H, H] partial per 16-pair tile (``PROTDIFF_FAST_TRITON_DW_STAGE=1``, the earlier
scheme: the product split into ``dw_chunk`` row chunks) moves 2 H^2 4 B per 16 pairs, about 20 FLOP
per byte of L2 traffic; T = 8 tiles cut the partial's traffic 8x for 4 x 16 H bytes of staging per
tile. Not yet timed on a GPU: the GPU run book A/Bs it.

Registers (sm_90, measured with scripts/compile_egnn_triton.py): the backward runs tiles of M = 16
pairs on mma.sync; d edge_attr is one column of W_e at a time, not a tl.dot. Configurations that
still spill are listed in ``KNOWN_SPILLS``.

Precision: elementwise math and all accumulations in fp32. fp32 inputs use 3xTF32 dots (about
fp32 accuracy on tensor cores) unless ``torch.backends.cuda.matmul.allow_tf32`` is set, in
which case plain TF32 (the trade PyTorch's own matmuls make under that flag); bf16/fp16 inputs
multiply in their own type with fp32 accumulation, and on the GPU their sigmoids (hence SiLUs) use
one tanh.approx each (relative error ~2^-11, below bf16's 2^-8; fp32 keeps tl.sigmoid). Under
``TRITON_INTERPRET=1`` low-precision operands are upcast before the dot: the interpreter's bf16 dot
is wrong (triton#11584), and the upcast of already-rounded values gives what the tensor cores
compute; its fp32 -> bf16 casts truncate where the GPU rounds to nearest even, so every bf16 cast of
the kernels goes through :func:`_cast`, which rounds by hand there. The sigmoids stay tl.sigmoid there
(no inline PTX), so the tanh.approx path is checked only on a GPU.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from protdiff_fast._checks import first_order_backward
from protdiff_fast.reference.egnn import (_coord_scale, check_egnn_pair_aggregate_inputs, egnn_pair_aggregate_reference,
                                         zero_padding)

SUPPORTED_HIDDEN = (16, 32, 64, 128, 256)  # H must be one of these (tl.dot needs K >= 16)
# hidden sizes of the fused backward kernels for every dtype; H = 256 too, one pass (chunked) for fp32
BACKWARD_HIDDEN = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


NORMALIZE_MODES = {False: 0, True: 1, "clamp": 2}  # the op's normalize option -> the kernels' NORMALIZE
NORMALIZE_OPTIONS = {mode: option for option, mode in NORMALIZE_MODES.items()}


def padded_hidden(h: int) -> int:
    """The square hidden size this backend runs a width-``h`` op at."""
    for size in SUPPORTED_HIDDEN:
        if h <= size:
            return size
    raise ValueError(f"the triton backend supports hidden sizes up to {SUPPORTED_HIDDEN[-1]}, got {h}")


# Rectangular widths (H_e, M, H_x not all one size after rounding up, e.g. egnn-pytorch's layer: H_e =
# 4 dim + 2, M = m_dim, H_x = 4 m_dim (+ 1 with norm_coors)) run the chunked kernels: z by K chunks and t
# by column chunks, H_e and H_x padded to multiples of RECT_K_CHUNK (up to RECT_MAX_WIDTH), m whole with M
# rounded up to a power of two in SUPPORTED_HIDDEN. Work per pair H_e M + M H_x instead of 2 S^2.
RECT_K_CHUNK = 16
RECT_MAX_WIDTH = 4096


def padded_widths(H_e: int, M: int, H_x: int) -> Tuple[int, int, int]:
    """(HE, HM, HX), the widths this backend runs an op of widths (H_e, M, H_x) at (each >= its width;
    the dispatcher zero-pads, exact). Square S (the tuned square kernels) when the three round up to
    the same power of two, else rectangular (the chunked kernels, :data:`RECT_K_CHUNK`). ValueError
    naming the limits when M exceeds 256 or H_e or H_x exceeds RECT_MAX_WIDTH."""
    rounded = [padded_hidden(w) if w <= SUPPORTED_HIDDEN[-1] else None for w in (H_e, M, H_x)]
    if rounded[0] is not None and rounded[0] == rounded[1] == rounded[2]:
        return rounded[0], rounded[0], rounded[0]
    if rounded[1] is None or max(H_e, H_x) > RECT_MAX_WIDTH:
        raise ValueError(f"the triton backend supports M up to {SUPPORTED_HIDDEN[-1]} and H_e, H_x up to "
                         f"{RECT_MAX_WIDTH}, got (H_e, M, H_x) = ({H_e}, {M}, {H_x})")
    # (a zero width, an op with no z or t columns, still gets one chunk: the kernels need one)
    return max(RECT_K_CHUNK, _round_up(H_e, RECT_K_CHUNK)), rounded[1], max(RECT_K_CHUNK, _round_up(H_x, RECT_K_CHUNK))


def _round_up(w: int, step: int) -> int:
    return -(-w // step) * step


def _dividing_chunk(width: int, most: int) -> int:
    """The largest power of two <= ``most`` that divides ``width`` (a multiple of RECT_K_CHUNK)."""
    chunk = most
    while width % chunk:
        chunk //= 2
    return chunk


def is_square(HE: int, HM: int, HX: int) -> bool:
    return HE == HM == HX


def _check_rect_widths(HE: int, HM: int, HX: int) -> None:
    """ValueError unless (HE, HM, HX) is a width triple the kernels run (padded_widths' outputs)."""
    if is_square(HE, HM, HX):
        if HE not in SUPPORTED_HIDDEN:
            raise ValueError(f"p: the triton kernels run square hidden sizes {SUPPORTED_HIDDEN}, got H = {HE} "
                             "(egnn_pair_aggregate pads other sizes with zeros; call it instead)")
        return
    if HM not in SUPPORTED_HIDDEN or any(w % RECT_K_CHUNK or not 0 < w <= RECT_MAX_WIDTH for w in (HE, HX)):
        raise ValueError(f"the triton kernels run rectangular widths with M in {SUPPORTED_HIDDEN} and H_e, H_x "
                         f"multiples of {RECT_K_CHUNK} up to {RECT_MAX_WIDTH}; got (H_e, M, H_x) = ({HE}, {HM}, {HX}) "
                         "(egnn_pair_aggregate pads other sizes with zeros; call it instead)")


# rectangular widths: (HM, fp32?) -> (BLOCK_I, BLOCK_J, num_warps) of the chunked forward, chosen with
# scripts/compile_egnn_triton.py --rect on sm_90a (RECT_WIDTHS x 4 flag sets: every forward spill-free; fp32
# at HM = 32 spilled 16-84 B at 8 x 16 x 4 warps, 0 at 8 x 16 x 8). HM = 128 / 256 are the square
# chunked forward's blocks, not swept at rectangular widths.
_RECT_FWD_BLOCKS = {(16, False): (8, 16, 4), (32, False): (8, 16, 4), (64, False): (8, 16, 8),
                    (128, False): (4, 16, 8), (256, False): (4, 16, 8),
                    (16, True): (8, 16, 4), (32, True): (8, 16, 8), (64, True): (8, 8, 8),
                    (128, True): (4, 16, 8), (256, True): (2, 8, 8)}
RECT_BWD_BLOCKS = (1, 16, 8)
# (HM, fp32?, kernel) of rectangular configurations that still spill on sm_90 (scripts/compile_egnn_triton.py
# --rect: RECT_WIDTHS x 4 flag sets, benchmarks/results/egnn_triton_sm90_compile_rect.md). The chunked
# one-pass backward in bf16 at HM = 64: 0-16 B at N_CHUNK 64 (4-32 B at 16, 12-44 B at 32); at HM = 256
# 20-40 B (bf16) and 0-12 B (fp32, dense edges with attention) at N_CHUNK 16. Every forward and every
# other backward: 0 B.
RECT_KNOWN_SPILLS = {(64, False, "bwd_i"), (256, False, "bwd_i"), (256, True, "bwd_i")}
# egnn-pytorch's widths as the dispatcher pads them (H_e = 4 dim + 2 and H_x = 4 m_dim [+ 1 with norm_coors] -> multiples
# of 16, M = m_dim): dim 16 / 32 / 64 / 128 at its default m_dim = 16, and m_dim = dim (swept by the compile script)
RECT_WIDTHS = ((80, 16, 64), (144, 16, 64), (144, 32, 144), (272, 16, 64), (272, 16, 80), (272, 64, 256), (272, 64, 272),
               (528, 16, 64), (528, 32, 128), (528, 128, 512), (528, 128, 528), (1040, 256, 1024), (1040, 256, 1040))


def rect_fwd_config(HM: int, HX: int, dtype: torch.dtype) -> Tuple[int, int, int, int, int]:
    """(BLOCK_I, BLOCK_J, num_warps, K_CHUNK, N_CHUNK) of the forward at rectangular widths."""
    if _interpreting():
        return (*(_blocks_from_env() or (32, 32, 4)), RECT_K_CHUNK, _dividing_chunk(HX, 64))
    BI, BJ, warps = _blocks_from_env() or _RECT_FWD_BLOCKS[(HM, dtype == torch.float32)]
    # fp32 at HM = 128: (528, 128, 512) spilled 8 B at 32 columns, 0 at 16
    n_chunk = 64 if dtype != torch.float32 else (16 if HM >= 128 else 32)
    return BI, BJ, warps, RECT_K_CHUNK, _dividing_chunk(HX, n_chunk)


def rect_bwd_config(HM: int, HX: int, dtype: torch.dtype) -> Tuple[int, int, int, int, int]:
    """(BLOCK_I, BLOCK_J, num_warps, K_CHUNK, N_CHUNK) of the chunked one-pass backward at rectangular
    widths (K_CHUNK also the K step over m's HM columns, so <= HM)."""
    BI, BJ, warps = _blocks_from_env() or ((32, 32, 4) if _interpreting() else RECT_BWD_BLOCKS)
    n_chunk = 64 if dtype != torch.float32 and HM == 64 else 16  # (RECT_KNOWN_SPILLS; HM = 128 bf16 spilled 12-24 B at 64)
    return BI, BJ, warps, RECT_K_CHUNK, _dividing_chunk(HX, n_chunk)


def hx_chunk(HX: int, n_chunk: int) -> int:
    """dW3's columns per product of a weight-gradient flush: HX whole when a power of two up to 256, else
    N_CHUNK (a [16, 1024] fp32 accumulator spilled 128-244 B at (1040, 256, 1024) in bf16)."""
    return HX if HX & (HX - 1) == 0 and HX <= SUPPORTED_HIDDEN[-1] else n_chunk


def rect_m_scratch(HM: int, dtype: torch.dtype) -> bool:
    """Whether the rectangular forward reads m back from scratch by K chunks for phi_x's product (as the
    square fp32 forward at H = 256: fp32 at HM = 256 spilled 0.5-0.6 KB with m whole in registers)."""
    return dtype == torch.float32 and HM >= 256


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# (H, fp32?, kernel) -> (BLOCK_I, BLOCK_J, num_warps), chosen with scripts/compile_egnn_triton.py
# (register spills on sm_90; notes in benchmarks/results/egnn_triton_spill_notes.md). M = BLOCK_I *
# BLOCK_J rows per tile: the [M, H] fp32 intermediates cost M * H / (32 * num_warps) registers per
# thread each, so big H gets small tiles. The backward runs M = 16 tiles (1 row of the program's
# own block x 16 of the other): mma.sync instead of wgmma, but each of its ~10 live [M, H] tiles
# costs a quarter of what it does at M = 64, and M = 64 spilled 0.1-13 KB at every size (2 x 8
# spilled a little more than 1 x 16 at H = 64-128).
_CONFIGS = {
    (16, False, "fwd"): (16, 16, 8), (16, True, "fwd"): (16, 16, 8),
    (32, False, "fwd"): (16, 16, 8), (32, True, "fwd"): (16, 16, 8),
    (64, False, "fwd"): (16, 8, 8), (64, True, "fwd"): (8, 16, 8),
    (128, False, "fwd"): (4, 32, 8), (128, True, "fwd"): (4, 16, 8),
    (256, False, "fwd"): (4, 16, 8), (256, True, "fwd"): (2, 8, 8),
    **{(H, fp32, "bwd_i"): (1, 16, 8) for H in BACKWARD_HIDDEN for fp32 in (False, True)},
    **{(H, fp32, "bwd_j"): (16, 1, 8) for H in BACKWARD_HIDDEN for fp32 in (False, True)},
    # H = 256 backward, bf16/fp16 only: the unchunked _pair_tile takes W2 and W3 whole as dot operands,
    # 144 KB of shared memory in bf16 but 256 KB in fp32 (over the 227 KB limit: a launch failure; ptxas
    # also spilled ~48 KB there)
    (256, False, "bwd_i"): (1, 16, 8), (256, False, "bwd_j"): (16, 1, 8),
    # fp32 at H = 256: the one-pass chunked backward only (bwd_chunks; W2 / W3 loaded by chunks)
    (256, True, "bwd_i"): (1, 16, 8),
}
# Where the edge term changes the register allocation enough: the configuration for calls with an
# edge term (offset table or dense), keyed like _CONFIGS. H = 128 bf16 forward: 4 x 32 spilled 36 B
# with the offset table and ProtDiff's flags (normalize, no attention, no tanh), 8 x 16 spills 0 B
# with every edge term and flag set but 8 B without an edge term, where 4 x 32 spills 0 B.
_EDGE_CONFIGS = {(128, False, "fwd"): (8, 16, 8)}
# chunked forwards: (H, fp32?) -> (K_CHUNK, N_CHUNK). Swept on sm_90a (spill bytes for the flag sets
# ProtDiff's / offset+all / none / dense; benchmarks/results/egnn_triton_spill_notes.md): H = 256 bf16 at
# 4 x 16 x 8 warps (32, 64) 0 B, 97 KB smem. fp32: the 3xTF32 hi / lo copies of the whole operands spilled
# 0.2-0.4 KB unchunked at H = 128 (2 x 8 x 8) and chunked at 256 (4 x 16 x 8, 224 KB smem). fp32 H = 128 at
# 4 x 16 x 8 (wgmma) (16, 32): 0 B everywhere, 112 KB smem ((32, 32) 0-20 B, (32, 64) 0-36 B; at 2 x 8 x 8
# (16, 32) - (64, 64) 0 B on mma.sync). fp32 H = 256 needs m read back by K chunks too (_FWD_M_SCRATCH):
# 2 x 8 x 8 (16, 32) 0 B, 18 KB smem ((32, 64) 0 B at 218-254 registers; 4 x 16 x 8 with the scratch still
# 88-256 B, without it at 2 x 8 x 8 196-332 B)
_FWD_CHUNKS = {(128, True): (16, 32), (256, False): (32, 64), (256, True): (16, 32)}
# ... for bf16 / fp16 features with float32 coordinates (autocast): H = 128 unchunked spilled 8 B with
# ProtDiff's flags at 8 x 16 x 8 (14 other blocks swept: none 0); chunked (16, 32) there 0 B for every flag
# set (also (32, 64) at 8 x 16 and 4 x 32)
_FWD_CHUNKS_X32 = {128: (16, 32)}
# software-pipelining depth of the j-loop, passed by the launchers and used by the compile script
NUM_STAGES = 2
# tiles per weight-gradient flush in the backward (dw_stage)
DW_STAGE_TILES = 8
# passes of the fused backward (bwd_passes)
BWD_PASSES = 1
# Configurations that still spill registers on sm_90 (scripts/compile_egnn_triton.py measures how
# much; benchmarks/results/egnn_triton_sm90_compile.md has the numbers).
KNOWN_SPILLS = {
    # the one-pass backward in chunks (bwd_chunks): fp32 at H = 256 16 B with dense edges (0 otherwise);
    # bf16 at H = 256 0-16 B (0 with ProtDiff's flags, checked by the compile test; 4 B with float32
    # coordinates). fp32 and bf16 at H = 128: 0 B
    (256, True, "bwd_i"), (256, False, "bwd_i"),
    # the two-pass scheme's rows-j pass (PROTDIFF_FAST_TRITON_BWD_PASSES=2, for GPU A/B runs): H = 128 bf16
    # 0-48 B, fp32 0.42-0.54 KB; H = 256 bf16 0.65-1.2 KB
    (128, False, "bwd_j"), (128, True, "bwd_j"), (256, False, "bwd_j"),
}


def _chunks_from_env(name: str, H: int) -> Optional[Tuple[int, int]]:
    """(K, N) from the environment variable ``name`` ("K,N": two divisors of H, each >= 16), or None."""
    env = os.environ.get(name)
    if not env:
        return None
    try:
        kc, nc = (int(v) for v in env.split(","))
    except ValueError:
        kc = nc = 0
    if not (kc >= 16 and nc >= 16 and H % kc == 0 and H % nc == 0):
        raise ValueError(f"{name}: two divisors of H = {H}, each >= 16, got {env!r}")
    return kc, nc


def fwd_chunks(H: int, dtype: torch.dtype = torch.bfloat16, x32: bool = False) -> Tuple[int, int]:
    """(K_CHUNK, N_CHUNK) of the forward: the first product's K and the second's output columns per
    chunk; (H, H) = unchunked. H = 256 needs both split (toolchain notes: 16-64 / 32-64 fit at M = 64,
    8 warps), fp32 at H = 128 (3xTF32), and low-precision features with float32 coordinates (``x32``)
    at H = 128; chosen with scripts/compile_egnn_triton.py.
    ``PROTDIFF_FAST_TRITON_FWD_CHUNKS`` = "K,N" overrides it (GPU A/B runs, sweeps)."""
    env = _chunks_from_env("PROTDIFF_FAST_TRITON_FWD_CHUNKS", H)
    if env:
        return env
    if x32 and dtype != torch.float32 and H in _FWD_CHUNKS_X32:
        return _FWD_CHUNKS_X32[H]
    return _FWD_CHUNKS.get((H, dtype == torch.float32), (H, H))


# (H, fp32?) of the chunked forwards whose phi_x product reads m back from per-program scratch (M_SCRATCH)
_FWD_M_SCRATCH = {(256, True)}


def fwd_m_scratch(H: int, dtype: torch.dtype = torch.bfloat16, x32: bool = False) -> bool:
    """Whether the chunked forward's second product takes m by K chunks from the program's own scratch
    copy (BI * BJ x H in the weights' dtype per program) instead of whole from registers.
    ``PROTDIFF_FAST_TRITON_FWD_M_SCRATCH`` = 0 / 1 overrides it (GPU A/B runs)."""
    env = os.environ.get("PROTDIFF_FAST_TRITON_FWD_M_SCRATCH")
    if env not in (None, "", "0", "1"):
        raise ValueError(f"PROTDIFF_FAST_TRITON_FWD_M_SCRATCH: 0 or 1, got {env!r}")
    want = env == "1" if env else (H, dtype == torch.float32) in _FWD_M_SCRATCH
    return want and fwd_chunks(H, dtype, x32) != (H, H)


# one-pass backward in chunks: (H, fp32?) -> (K_CHUNK, N_CHUNK) (bwd_chunks). Swept on sm_90a at 1 x 16 x 8
# warps, num_stages 1, flush rows 16 (spill bytes for the flag sets ProtDiff's / offset+all / none / dense):
# H = 256 bf16 (16, 64) 0/36/0/32, (16, 32) 8/16/12/92, (32, 32) 20/40/300/480, unchunked 1056/1096/1008/648;
# fp32 (16, 16) 0/32/0/104, (16, 32) 116-300; H = 128 bf16 (16, 64) 0/0/0/0 (unchunked 152/140/4/0), fp32
# (16, 32) 24/40/40/84 (unchunked 648/704/612/596); H = 64 fp32 (16, 64) 0 (unchunked 36/0/12/0). Smaller
# H, and H = 64 bf16, spill nothing unchunked and keep the kernel with fewer products. Since the flush's row
# loop is rolled (tl.range, session 10): H = 128 fp32 (16, 16) 0/0/0/0 ((16, 32) 0/16/0/48), H = 256 fp32
# (16, 16) 0/0/0/16, bf16 (16, 64) 0/16/8/16 ((16, 32) 0/16/16/92)
_BWD_CHUNKS = {(64, True): (16, 64), (128, False): (16, 64), (128, True): (16, 16), (256, False): (16, 64),
               (256, True): (16, 16)}
# the chunked kernel's software pipelining and weight-gradient flush rows (num_stages 2 spilled 80-240 B
# more at H = 256; flush rows 32 / 64: 16-20 B / 8-24 B where 16 rows gave 0-36 B)
BWD_CHUNKED_STAGES = 1
BWD_CHUNKED_FLUSH_ROWS = 16


def bwd_chunked_stages() -> int:
    """Software-pipelining depth (num_stages) of the chunked one-pass backward. 1 by default (spill-free
    at H = 256); ``PROTDIFF_FAST_TRITON_BWD_STAGES`` overrides it for GPU A/B runs: on sm_90a at H = 128
    bf16, 1 x 16 x 8 warps, ProtDiff's flags, chunks (16, 64) and (32, 32) compile spill-free at 2 as at 1
    (scripts/compile_egnn_triton.py, NUM_STAGES=2), and the first H200 run suggests the chunk loops are
    latency-bound (results/h200-2026-12-04/NOTES.md)."""
    env = os.environ.get("PROTDIFF_FAST_TRITON_BWD_STAGES")
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"PROTDIFF_FAST_TRITON_BWD_STAGES: a depth >= 1, got {env!r}")
        return int(env)
    return BWD_CHUNKED_STAGES


def bwd_chunks(H: int, dtype: torch.dtype = torch.bfloat16) -> Tuple[int, int]:
    """(K_CHUNK, N_CHUNK) of the one-pass backward: W2's rows (z's columns) and W3's columns per chunk
    (_egnn_bwd_chunked_kernel); (H, H) = the unchunked _egnn_bwd_kernel. ``PROTDIFF_FAST_TRITON_BWD_CHUNKS``
    = "K,N" overrides it (tests run the chunked kernel at small H; sweeps)."""
    env = _chunks_from_env("PROTDIFF_FAST_TRITON_BWD_CHUNKS", H)
    if env:
        return env
    return _BWD_CHUNKS.get((H, dtype == torch.float32), (H, H))


def has_fused_backward(H: int, dtype: torch.dtype, widths: Optional[Tuple[int, int, int]] = None) -> bool:
    """Whether the fused backward kernels run (H, dtype); otherwise _backward_by_reference (fp32 at H = 256
    with two passes, which have no rows-j configuration there; rectangular ``widths`` (HE, HM, HX) with two
    passes: only the chunked one-pass kernel takes rectangular widths)."""
    if widths is not None and not is_square(*widths):
        return bwd_passes(widths[1], dtype) == 1
    fp32 = dtype == torch.float32
    return (H, fp32, "bwd_i") in _CONFIGS and (bwd_passes(H, dtype) == 1 or (H, fp32, "bwd_j") in _CONFIGS)


def dw_chunk(H: int, dtype: torch.dtype = torch.bfloat16, kernel: str = "bwd_i") -> int:
    """Rows of the pass's [H, H] weight gradient (dW2 in "bwd_i", dW3 in "bwd_j") per product; H: one product.

    A chunk of dW2's rows takes the matching columns of a, rebuilt from the inputs (elementwise); a
    chunk of dW3's rows takes rows of m^T, read back from the program's scratch copy of the m tile.
    Chosen with scripts/compile_egnn_triton.py (benchmarks/results/egnn_triton_spill_notes.md).
    """
    if kernel == "bwd_i":
        if dtype == torch.float32:
            return 16 if H >= 32 else H
        return 64 if H >= 128 else H
    return 16 if H >= 128 else H


def dw_stage(H: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Tiles of pairs per read-modify-write of a backward program's [H, H] weight-gradient partial.

    With 1 every 16-pair tile reads and writes the whole fp32 partial (2 H^2 4 B per tile: about 20
    FLOP per byte, L2-bound on an H100); with T > 1 each tile stores its A and G operands (a, d_r or
    m, d_t, 2 x 16 H in the weight dtype) to the program's stage and every T tiles one
    [H, 16 T] x [16 T, H] product is added to the partial (_flush_weight_gradient). Same math (the
    same rounded operands), another summation order. ``PROTDIFF_FAST_TRITON_DW_STAGE`` overrides it
    (for GPU A/B timing)."""
    env = os.environ.get("PROTDIFF_FAST_TRITON_DW_STAGE")
    if env:
        value = int(env)
        if value < 1:
            raise ValueError(f"PROTDIFF_FAST_TRITON_DW_STAGE: a number of tiles >= 1, got {env!r}")
        return value
    return DW_STAGE_TILES


def bwd_passes(H: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Passes of the fused backward. 2: rows-i (d_p, the i side of dx, dW2, ...) then rows-j (d_q, the j
    side, dW3, ...), each recomputing the pair chain: 5 H x H products per pair and pass. 1: one pass over
    square regions that also reads-modify-writes the tile's d_q rows and j side of dx into a partial per
    row chunk and stages both weight gradients: 6 products per pair in all instead of 10 (needs
    dw_stage > 1). ``PROTDIFF_FAST_TRITON_BWD_PASSES`` overrides it (GPU A/B)."""
    env = os.environ.get("PROTDIFF_FAST_TRITON_BWD_PASSES")
    if env:
        if env not in ("1", "2"):
            raise ValueError(f"PROTDIFF_FAST_TRITON_BWD_PASSES: 1 or 2, got {env!r}")
        passes = int(env)
    else:
        passes = BWD_PASSES
    return 1 if passes == 1 and dw_stage(H, dtype) > 1 else 2


def flush_rows(H: int) -> int:
    """Output rows per product of a weight-gradient flush (a [rows, H] fp32 accumulator; the staged G is
    read H / rows times, from L1 mostly). Swept on sm_90 with scripts/compile_egnn_triton.py: at H = 128
    16 rows spilled least (bf16 0-108 B against 116-332 B at 32-128 rows), at H = 256 64 rows (bf16
    0.9-1.3 KB, 1.1-1.2 KB at 16-32); H <= 64 spill the same at 16 and 64 rows."""
    return 64 if H >= 256 else min(H, 16)


def _blocks_from_env() -> Optional[Tuple[int, int, int]]:
    """(BLOCK_I, BLOCK_J, num_warps) from ``PROTDIFF_FAST_TRITON_BLOCKS`` = "BI,BJ,WARPS" (every kernel;
    tuning sweeps, and tests running the GPU's block shapes in the interpreter), or None."""
    env = os.environ.get("PROTDIFF_FAST_TRITON_BLOCKS")
    if not env:
        return None
    try:
        bi, bj, w = (int(v) for v in env.split(","))
    except ValueError:
        bi = bj = w = 0
    if not all(v > 0 and v & (v - 1) == 0 for v in (bi, bj, w)):
        raise ValueError(f"PROTDIFF_FAST_TRITON_BLOCKS: three powers of two 'BI,BJ,WARPS', got {env!r}")
    return bi, bj, w


def block_sizes(H: int, dtype: torch.dtype = torch.bfloat16, kernel: str = "fwd", edge: int = 0
                ) -> Tuple[int, int, int]:
    """(BLOCK_I, BLOCK_J, num_warps) for ``kernel`` in {"fwd", "bwd_i", "bwd_j"}; ``edge``: 0 none,
    1 dense edge_attr, 2 offset table."""
    env = _blocks_from_env()
    if env:
        return env
    if _interpreting():  # the interpreter's cost is per program and loop step: large blocks
        return 32, 32, 4
    key = (H, dtype == torch.float32, kernel)
    return _EDGE_CONFIGS[key] if edge and key in _EDGE_CONFIGS else _CONFIGS[key]


# --------------------------------------------------------------------------------------------
# jitted helpers named after the math
# --------------------------------------------------------------------------------------------
# NORMALIZE: 0 u_ij as is; 1 u_ij / (stopgrad |u_ij| + eps) (ProtDiff); 2 u_ij / max(|u_ij|, eps), the
# gradient through |u_ij| included (egnn-pytorch's CoorsNorm, normalize="clamp")
@triton.jit
def _direction_scale_grad(d2, eps):
    """ds/dd2 of NORMALIZE 2: -1/2 d2^(-3/2) where |u| > eps, else 0 (the clamp is flat there)."""
    r = tl.sqrt(d2)
    return tl.where(r > eps, -0.5 / tl.maximum(d2 * r, 1e-30), 0.0)


@triton.jit
def _sigmoid(x, FAST: tl.constexpr):
    """sigmoid(x); FAST: as 0.5 + 0.5 tanh(x / 2) with one tanh.approx (relative error ~2^-11, for
    bf16/fp16 inputs on the GPU; tl.sigmoid needs an exp and a division)."""
    if FAST:
        th = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [0.5 * x], dtype=tl.float32,
                                       is_pure=True, pack=1)
        return 0.5 + 0.5 * th
    return tl.sigmoid(x)


@triton.jit
def _silu_parts(x, FAST: tl.constexpr):
    """(silu(x), sigmoid(x))."""
    sig = _sigmoid(x, FAST)
    return x * sig, sig


@triton.jit
def _dsilu(x, sig):
    """d silu / dx from x and sigmoid(x)."""
    return sig * (1.0 + x * (1.0 - sig))


@triton.jit
def _cast(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """x (fp32) cast to ``dtype``, rounded to nearest even as on the GPU (cvt.rn). Under the interpreter
    (UPCAST) triton 3.6 casts fp32 to bf16 by truncation (toward zero, with or without
    fp_downcast_rounding="rtne"; its fp16 casts round to nearest): a bias of 2^-9 relative on average on
    every dot operand, staged weight-gradient operand and stored output, which summed over pairs gave
    bf16 errors up to ~5x the bf16 reference's (and it mangles fp32 subnormals). There the rounding is
    done on the bits, and the top 16 bits reinterpreted as bf16. The GPU (UPCAST off) compiles the plain
    cast."""
    if UPCAST and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16  # (finite inputs: the checks refuse NaN)
        y = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with a cast to b's type (fp32 accumulation)."""
    a = _cast(a, b.dtype, UPCAST)
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _load_rows(ptr, rows, n_rows, cols, COLS: tl.constexpr):
    """[len(rows), COLS] block of a row-major (n_rows, COLS) matrix, zero outside."""
    return tl.load(ptr + rows[:, None] * COLS + cols[None, :], mask=(rows < n_rows)[:, None], other=0.0)


@triton.jit
def _load_xyz(x_ptr, base, nodes, N):
    ok = nodes < N
    x0 = tl.load(x_ptr + base + nodes * 3 + 0, mask=ok, other=0.0).to(tl.float32)
    x1 = tl.load(x_ptr + base + nodes * 3 + 1, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + base + nodes * 3 + 2, mask=ok, other=0.0).to(tl.float32)
    return x0, x1, x2


@triton.jit
def _pair_tile(
    b, i, j, N,  # sample, row indices [BI], column indices [BJ], nodes per sample
    xi0, xi1, xi2, xj0, xj1, xj2, p_i, q_j, mi, mj,  # coordinates, p_i [BI,H], q_j [BJ,H], masks
    w_d_ptr, W2_ptr, b2_ptr, W3_ptr, b3_ptr, w4_ptr, ea_ptr, We_ptr, rel_ptr, watt_ptr, b_att,
    E, K,  # edge width, offset-table half width
    H: tl.constexpr, EP: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr,
    EDGE: tl.constexpr, ATTENTION: tl.constexpr, TANH: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, FAST: tl.constexpr,
):
    """Every pair quantity of the tile (i, j), flattened to M = BI * BJ rows."""
    M: tl.constexpr = BI * BJ
    hcol = tl.arange(0, H)
    u0 = xi0[:, None] - xj0[None, :]  # u_ij = x_i - x_j, [BI, BJ]
    u1 = xi1[:, None] - xj1[None, :]
    u2 = xi2[:, None] - xj2[None, :]
    d2 = u0 * u0 + u1 * u1 + u2 * u2
    w_d = tl.load(w_d_ptr + hcol).to(tl.float32)
    z3 = p_i[:, None, :] + q_j[None, :, :] + d2[:, :, None] * w_d[None, None, :]  # [BI, BJ, H]
    if EDGE == 2:  # offset table row clip(j - i, -K, K) + K
        k = tl.minimum(tl.maximum(j[None, :] - i[:, None], -K), K) + K
        z3 += tl.load(rel_ptr + k[:, :, None] * H + hcol[None, None, :]).to(tl.float32)
    z = tl.reshape(z3, (M, H))
    e = tl.zeros((M, EP), dtype=tl.float32)
    if EDGE == 1:  # dense edge_attr (B, N, N, E) through W_e
        ecol = tl.arange(0, EP)
        in_range = (i[:, None] < N) & (j[None, :] < N)
        pair_off = i[:, None] * N + j[None, :]  # within the sample; the sample's base in 64 bits (B N^2 E > 2^31)
        e3 = tl.load(ea_ptr + b.to(tl.int64) * N * N * E + pair_off[:, :, None] * E + ecol[None, None, :],
                     mask=in_range[:, :, None] & (ecol < E)[None, None, :], other=0.0)
        e = tl.reshape(e3.to(tl.float32), (M, EP))
        W_e = tl.load(We_ptr + ecol[:, None] * H + hcol[None, :], mask=(ecol < E)[:, None], other=0.0)
        z += _mm(e, W_e, PRECISION, UPCAST)
    a, sig_z = _silu_parts(z, FAST)  # phi_e's first SiLU
    W2 = tl.load(W2_ptr + hcol[:, None] * H + hcol[None, :])
    r = _mm(a, W2, PRECISION, UPCAST) + tl.load(b2_ptr + hcol).to(tl.float32)[None, :]
    m0, sig_r = _silu_parts(r, FAST)  # m_ij before the gate
    g = tl.full((M,), 1.0, tl.float32)
    w_att = tl.zeros((H,), dtype=tl.float32)
    if ATTENTION:
        w_att = tl.load(watt_ptr + hcol).to(tl.float32)
        g = _sigmoid(tl.sum(m0 * w_att[None, :], axis=1) + b_att, FAST)
    m = m0 * g[:, None]
    W3 = tl.load(W3_ptr + hcol[:, None] * H + hcol[None, :])
    t = _mm(m, W3, PRECISION, UPCAST) + tl.load(b3_ptr + hcol).to(tl.float32)[None, :]
    s, sig_t = _silu_parts(t, FAST)  # phi_x's hidden layer
    w4 = tl.load(w4_ptr + hcol).to(tl.float32)
    phi = tl.sum(s * w4[None, :], axis=1)  # [M]
    if TANH:
        phi = 2.0 * _sigmoid(2.0 * phi, FAST) - 1.0
    v = mi[:, None] & mj[None, :] & (i[:, None] != j[None, :])  # real pair, not the self pair
    return u0, u1, u2, d2, z, sig_z, e, a, r, sig_r, m0, g, w_att, m, t, sig_t, s, w4, phi, v


@triton.jit
def _preact_cols(
    b, i, j, N, d2, e, cols,  # sample, rows [BI], columns [BJ], nodes, d2 [BI, BJ], e [M, EP], z's columns [C]
    p_ptr, q_ptr, w_d_ptr, We_ptr, rel_ptr, E, K,
    HE: tl.constexpr, EP: tl.constexpr, EDGE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Columns ``cols`` of z (phi_e's pre-activation, HE wide: the row length of p, q, rel and W_e),
    rebuilt from the inputs: [M, C]."""
    M: tl.constexpr = i.shape[0] * j.shape[0]
    p_c = _load_rows(p_ptr + b * N * HE, i, N, cols, HE).to(tl.float32)
    q_c = _load_rows(q_ptr + b * N * HE, j, N, cols, HE).to(tl.float32)
    w_d = tl.load(w_d_ptr + cols).to(tl.float32)
    z3 = p_c[:, None, :] + q_c[None, :, :] + d2[:, :, None] * w_d[None, None, :]
    if EDGE == 2:
        k = tl.minimum(tl.maximum(j[None, :] - i[:, None], -K), K) + K
        z3 += tl.load(rel_ptr + k[:, :, None] * HE + cols[None, None, :]).to(tl.float32)
    z = tl.reshape(z3, (M, cols.shape[0]))
    if EDGE == 1:
        ecol = tl.arange(0, EP)
        W_e = tl.load(We_ptr + ecol[:, None] * HE + cols[None, :], mask=(ecol < E)[:, None], other=0.0)
        z += _mm(e, W_e, PRECISION, UPCAST)
    return z


@triton.jit
def _pair_m_chunked(
    b, i, j, N,  # sample, row indices [BI], column indices [BJ], nodes per sample
    xi0, xi1, xi2, xj0, xj1, xj2, mi, mj,  # coordinates, masks
    p_ptr, q_ptr, w_d_ptr, W2_ptr, b2_ptr, ea_ptr, We_ptr, rel_ptr, watt_ptr, b_att,
    E, K,
    HE: tl.constexpr, HM: tl.constexpr, EP: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr,
    K_CHUNK: tl.constexpr,
    EDGE: tl.constexpr, ATTENTION: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, FAST: tl.constexpr,
):
    """The forward's pair quantities (u, d2, m, v) of the tile (i, j) with phi_e's HE x HM product split
    into K chunks, for the large widths where neither a whole [M, HE] pre-activation tile next to r nor a
    resident W2 fits in registers (toolchain notes: spills or "register allocation failed"), and for
    rectangular widths (HE need only be a multiple of K_CHUNK):

        r = b2 + sum_c silu(z[:, c]) W2[c, :]      over K chunks c: z's columns rebuilt from the inputs

    W2's chunks are loaded inside the loop (from L2 on the GPU), never held whole."""
    M: tl.constexpr = BI * BJ
    hcol = tl.arange(0, HM)
    u0 = xi0[:, None] - xj0[None, :]  # u_ij = x_i - x_j, [BI, BJ]
    u1 = xi1[:, None] - xj1[None, :]
    u2 = xi2[:, None] - xj2[None, :]
    d2 = u0 * u0 + u1 * u1 + u2 * u2
    e = tl.zeros((M, EP), dtype=tl.float32)
    if EDGE == 1:  # dense edge_attr (B, N, N, E), [M, EP]: small, kept for every K chunk
        ecol = tl.arange(0, EP)
        in_range = (i[:, None] < N) & (j[None, :] < N)
        pair_off = i[:, None] * N + j[None, :]  # within the sample; the sample's base in 64 bits (B N^2 E > 2^31)
        e3 = tl.load(ea_ptr + b.to(tl.int64) * N * N * E + pair_off[:, :, None] * E + ecol[None, None, :],
                     mask=in_range[:, :, None] & (ecol < E)[None, None, :], other=0.0)
        e = tl.reshape(e3.to(tl.float32), (M, EP))
    r = tl.zeros((M, HM), dtype=tl.float32) + tl.load(b2_ptr + hcol).to(tl.float32)[None, :]
    for k0 in tl.range(0, HE, K_CHUNK):
        kc = k0 + tl.arange(0, K_CHUNK)
        z_c = _preact_cols(b, i, j, N, d2, e, kc, p_ptr, q_ptr, w_d_ptr, We_ptr, rel_ptr, E, K,
                           HE, EP, EDGE, PRECISION, UPCAST)
        a_c = z_c * _sigmoid(z_c, FAST)  # phi_e's first SiLU, K_CHUNK columns
        W2_c = tl.load(W2_ptr + kc[:, None] * HM + hcol[None, :])  # rows kc of W2
        r += _mm(a_c, W2_c, PRECISION, UPCAST)
    m = r * _sigmoid(r, FAST)  # m_ij before the gate
    if ATTENTION:
        w_att = tl.load(watt_ptr + hcol).to(tl.float32)
        m = m * _sigmoid(tl.sum(m * w_att[None, :], axis=1) + b_att, FAST)[:, None]
    v = mi[:, None] & mj[None, :] & (i[:, None] != j[None, :])  # real pair, not the self pair
    return u0, u1, u2, d2, m, v


@triton.jit
def _phi_chunked(
    m, m_rows,  # m [M, HM] in registers, or (M_SCRATCH) the program's row-major [M, HM] copy of it, read back
    W3_ptr, b3_ptr, w4_ptr, M: tl.constexpr, HM: tl.constexpr, HX: tl.constexpr, K_CHUNK: tl.constexpr,
    N_CHUNK: tl.constexpr, M_SCRATCH: tl.constexpr, TANH: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, FAST: tl.constexpr,
):
    """phi = sum_c silu(m W3[:, c] + b3[c]) . w4[c] over output-column chunks c of phi_x's hidden layer
    (HX wide; exact: silu is elementwise, so s's columns are independent), [M]. M_SCRATCH: m's K chunks
    are read back from m_rows (_scratch_times_weight), so the product's A operand is never whole in
    registers: in fp32 its 3xTF32 hi / lo copies of a whole [M, H] m spilled 0.2-0.4 KB at H = 128 / 256."""
    hcol = tl.arange(0, HM)
    m_op = _cast(m, W3_ptr.dtype.element_ty, UPCAST)  # the product's A operand, cast once
    phi = tl.zeros((M,), dtype=tl.float32)
    for n0 in tl.range(0, HX, N_CHUNK):
        nc = n0 + tl.arange(0, N_CHUNK)
        if M_SCRATCH:
            t_c = _scratch_times_weight(m_rows, W3_ptr, nc, M, HM, HM, HX, K_CHUNK, False,
                                        W3_ptr.dtype.element_ty == tl.float32, PRECISION, UPCAST)
        else:
            W3_c = tl.load(W3_ptr + hcol[:, None] * HX + nc[None, :])  # columns nc of W3
            t_c = _mm(m_op, W3_c, PRECISION, UPCAST)
        t_c += tl.load(b3_ptr + nc).to(tl.float32)[None, :]
        s_c = t_c * _sigmoid(t_c, FAST)  # phi_x's hidden layer, N_CHUNK columns
        phi += tl.sum(s_c * tl.load(w4_ptr + nc).to(tl.float32)[None, :], axis=1)
    if TANH:
        phi = 2.0 * _sigmoid(2.0 * phi, FAST) - 1.0
    return phi


@triton.jit
def _egnn_fwd_kernel(
    x_ptr, p_ptr, q_ptr, mask_ptr, scale_ptr,  # (B,N,3), (B,N,HE) x2, (B,N) uint8, (B,) C_b fp32
    w_d_ptr, W2_ptr, b2_ptr, W3_ptr, b3_ptr, w4_ptr,  # phi_e / phi_x weights, (in, out) layout
    ea_ptr, We_ptr, rel_ptr, watt_ptr, b_att,  # edge term, attention (unused ones: any pointer)
    m_out_ptr, dx_out_ptr,  # (B,N,HM) fp32 zeroed, (B,N,3) outputs
    scratch_ptr,  # M_SCRATCH: per program (BI * BJ, HM) in W3's dtype, the m tile read back by K chunks
    N, E, K, eps,
    HE: tl.constexpr, HM: tl.constexpr, HX: tl.constexpr,  # widths of z (p, q), m (W2's columns), W3's columns
    EP: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr,
    EDGE: tl.constexpr, ATTENTION: tl.constexpr, TANH: tl.constexpr, NORMALIZE: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, FAST: tl.constexpr,
    K_CHUNK: tl.constexpr, N_CHUNK: tl.constexpr,  # < HE / HX: the products split into chunks (fwd_chunks)
    M_SCRATCH: tl.constexpr,  # (chunked only) phi_x's product reads m back from scratch by K chunks
    CHUNKED: tl.constexpr,  # the chunked products (either split, or rectangular widths); else one square H
):
    M: tl.constexpr = BI * BJ
    H: tl.constexpr = HM  # the unchunked path's one width (square: HE = HM = HX)
    if not CHUNKED:
        tl.static_assert(HE == HM and HM == HX, "the unchunked forward runs square widths only")
    pid_i = tl.program_id(0)
    b = tl.program_id(1)
    m_copy = scratch_ptr + (b * tl.num_programs(0) + pid_i).to(tl.int64) * M * HM
    srow = tl.arange(0, M)
    hcol = tl.arange(0, HM)
    i = pid_i * BI + tl.arange(0, BI)
    mi = (tl.load(mask_ptr + b * N + i, mask=i < N, other=0) != 0) & (i < N)
    xi0, xi1, xi2 = _load_xyz(x_ptr, b * N * 3, i, N)
    if not CHUNKED:
        p_i = _load_rows(p_ptr + b * N * H, i, N, hcol, H).to(tl.float32)
    m_rows = m_out_ptr + (b * N + i[:, None]) * HM + hcol[None, :]  # fp32, zeroed by the launcher
    dx0 = tl.zeros((BI,), dtype=tl.float32)  # sum_j u_ij phi_ij
    dx1 = tl.zeros((BI,), dtype=tl.float32)
    dx2 = tl.zeros((BI,), dtype=tl.float32)
    for jb in range(0, tl.cdiv(N, BJ)):
        j = jb * BJ + tl.arange(0, BJ)
        mj = (tl.load(mask_ptr + b * N + j, mask=j < N, other=0) != 0) & (j < N)
        xj0, xj1, xj2 = _load_xyz(x_ptr, b * N * 3, j, N)
        if CHUNKED:
            u0, u1, u2, d2, m, v = _pair_m_chunked(
                b, i, j, N, xi0, xi1, xi2, xj0, xj1, xj2, mi, mj,
                p_ptr, q_ptr, w_d_ptr, W2_ptr, b2_ptr, ea_ptr, We_ptr, rel_ptr, watt_ptr,
                b_att, E, K, HE, HM, EP, BI, BJ, K_CHUNK, EDGE, ATTENTION, PRECISION, UPCAST, FAST)
            if not M_SCRATCH:
                phi = _phi_chunked(m, m_copy, W3_ptr, b3_ptr, w4_ptr, M, HM, HX, K_CHUNK, N_CHUNK, False, TANH,
                                   PRECISION, UPCAST, FAST)
        else:
            q_j = _load_rows(q_ptr + b * N * H, j, N, hcol, H).to(tl.float32)
            u0, u1, u2, d2, z, sig_z, e, a, r, sig_r, m0, g, w_att, m, t, sig_t, s, w4, phi, v = _pair_tile(
                b, i, j, N, xi0, xi1, xi2, xj0, xj1, xj2, p_i, q_j, mi, mj,
                w_d_ptr, W2_ptr, b2_ptr, W3_ptr, b3_ptr, w4_ptr, ea_ptr, We_ptr, rel_ptr, watt_ptr, b_att, E, K,
                H, EP, BI, BJ, EDGE, ATTENTION, TANH, PRECISION, UPCAST, FAST)
        vf = v.to(tl.float32)
        # m_i: each tile's partial sum is added into the program's own rows of the output instead of a
        # loop-carried [BI, HM] register accumulator (whose layout costs registers and spills at H = 128)
        m_part = tl.sum(tl.reshape(m, (BI, BJ, HM)) * vf[:, :, None], axis=1)
        tl.store(m_rows, tl.load(m_rows, mask=(i < N)[:, None], other=0.0) + m_part, mask=(i < N)[:, None])
        tl.debug_barrier()  # (also: the last tile's reads of m_copy are done before it is overwritten)
        if CHUNKED and M_SCRATCH:
            tl.store(m_copy + srow[:, None] * HM + hcol[None, :], _cast(m, W3_ptr.dtype.element_ty, UPCAST))
            tl.debug_barrier()  # other threads' rows are read back
            phi = _phi_chunked(m, m_copy, W3_ptr, b3_ptr, w4_ptr, M, HM, HX, K_CHUNK, N_CHUNK, True, TANH,
                               PRECISION, UPCAST, FAST)
        coef = tl.reshape(phi, (BI, BJ)) * vf
        if NORMALIZE == 1:  # (the same expression as before NORMALIZE 2: a reciprocal here spilled 20 B)
            coef = coef / (tl.sqrt(d2) + eps)
        elif NORMALIZE == 2:
            coef = coef / tl.maximum(tl.sqrt(d2), eps)
        dx0 += tl.sum(u0 * coef, axis=1)
        dx1 += tl.sum(u1 * coef, axis=1)
        dx2 += tl.sum(u2 * coef, axis=1)
    C = tl.load(scale_ptr + b)
    rows = i < N
    tl.store(dx_out_ptr + (b * N + i) * 3 + 0, _cast(C * dx0, dx_out_ptr.dtype.element_ty, UPCAST), mask=rows)
    tl.store(dx_out_ptr + (b * N + i) * 3 + 1, _cast(C * dx1, dx_out_ptr.dtype.element_ty, UPCAST), mask=rows)
    tl.store(dx_out_ptr + (b * N + i) * 3 + 2, _cast(C * dx2, dx_out_ptr.dtype.element_ty, UPCAST), mask=rows)


@triton.jit
def _accumulate(ptr, cols, value):
    """ptr[cols] += value (a program's own partial row: no other program touches it)."""
    tl.store(ptr + cols, tl.load(ptr + cols) + value)


@triton.jit
def _flush_weight_gradient(
    stage, n_rows, pW_ptr,  # stage: (2, STAGE_ROWS, HS) staged A then G; the first n_rows rows of each are live
    HA: tl.constexpr, HG: tl.constexpr, HS: tl.constexpr,  # A's and G's widths, the stage's row length
    G_CHUNK: tl.constexpr,  # G's columns per product: HG (a power of two), or a power of two dividing it
    STAGE_ROWS: tl.constexpr, ROWS: tl.constexpr, STEP: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """pW[HA, HG] += A^T G over the staged pairs (A = a or m, G = d_r or d_t, in the weight dtype): one read-
    modify-write of the program's partial per DW_STAGE tiles instead of per tile. By ROWS output rows at a
    time (a [ROWS, G_CHUNK] fp32 accumulator), K = the staged pairs in steps of STEP."""
    g_base = stage + STAGE_ROWS * HS
    if G_CHUNK == HG:  # G whole (every square width)
        gcol = tl.arange(0, HG)
        # a rolled loop: unrolled (static_range), ptxas overlapped the row blocks and spilled 4-104 B more
        for c0 in tl.range(0, HA, ROWS):
            cols = c0 + tl.arange(0, ROWS)
            acc = tl.zeros((ROWS, HG), dtype=tl.float32)
            for k0 in range(0, n_rows, STEP):
                kk = k0 + tl.arange(0, STEP)
                A_k = tl.load(stage + kk[:, None] * HS + cols[None, :])  # [STEP, ROWS]
                G_k = tl.load(g_base + kk[:, None] * HS + gcol[None, :])  # [STEP, HG]
                acc += _mm(tl.trans(A_k), G_k, PRECISION, UPCAST)
            addr = pW_ptr + cols[:, None] * HG + gcol[None, :]
            tl.store(addr, tl.load(addr) + acc)
    else:  # HG not a power of two (a rectangular H_x): by column chunks too
        for c0 in tl.range(0, HA, ROWS):
            cols = c0 + tl.arange(0, ROWS)
            for g0 in tl.range(0, HG, G_CHUNK):
                gcol = g0 + tl.arange(0, G_CHUNK)
                acc = tl.zeros((ROWS, G_CHUNK), dtype=tl.float32)
                for k0 in range(0, n_rows, STEP):
                    kk = k0 + tl.arange(0, STEP)
                    A_k = tl.load(stage + kk[:, None] * HS + cols[None, :])
                    G_k = tl.load(g_base + kk[:, None] * HS + gcol[None, :])
                    acc += _mm(tl.trans(A_k), G_k, PRECISION, UPCAST)
                addr = pW_ptr + cols[:, None] * HG + gcol[None, :]
                tl.store(addr, tl.load(addr) + acc)


@triton.jit
def _egnn_bwd_kernel(
    x_ptr, p_ptr, q_ptr, mask_ptr, scale_ptr,
    w_d_ptr, W2_ptr, b2_ptr, W3_ptr, b3_ptr, w4_ptr,
    ea_ptr, We_ptr, rel_ptr, watt_ptr, b_att,
    gm_ptr, gdx_ptr,  # (B,N,H), (B,N,3) fp32 upstream gradients
    dnode_ptr, dx_part_ptr,  # (B,N,H) dp (ROWS_ARE_I) or dq; (B,N,3) this side's share of dx
    dnode2_ptr, dx2_part_ptr,  # BOTH: (n_own_chunks, B, N, H) dq and (n_own_chunks, B, N, 3) the j side of dx
    dea_ptr,  # (B,N,N,E) d edge_attr (ROWS_ARE_I and NEED_DEA)
    pW2_ptr, pW3_ptr, pvec_ptr, pWe_ptr,  # per-program partials: (P,H,H) x2, (P,6,H), (P,EP,H)
    prel_ptr,  # (B, n_regions, own_chunk + other_chunk - 1, H): d_rel per region and unclipped offset (_rel_windows)
    stage_ptr,  # weight dtype, per program: (M, H) m for a chunked dW3 (DW_STAGE = 1), else (2, DW_STAGE M, H)
    N, E, K, eps,
    own_chunk, other_chunk, n_other_chunks, n_regions,  # SPLIT_OTHER: regions of own_chunk x other_chunk nodes
    H: tl.constexpr, EP: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, W_REL: tl.constexpr,
    EDGE: tl.constexpr, ATTENTION: tl.constexpr, TANH: tl.constexpr, NORMALIZE: tl.constexpr,
    ROWS_ARE_I: tl.constexpr, NEED_DEA: tl.constexpr, DW_CHUNK: tl.constexpr,
    PRECISION: tl.constexpr, PRECISION_BWD: tl.constexpr, UPCAST: tl.constexpr, FAST: tl.constexpr,
    DW_STAGE: tl.constexpr = 1,  # tiles per weight-gradient flush (dw_stage): 1 = read-modify-write per tile
    FLUSH_ROWS: tl.constexpr = 16,  # output rows per product of a flush (DW_STAGE > 1)
    BOTH: tl.constexpr = False,  # one pass for both sides (rows-i regions, DW_STAGE > 1): see bwd_passes
):
    M: tl.constexpr = BI * BJ
    STAGE_ROWS: tl.constexpr = DW_STAGE * M
    pid = tl.program_id(0)
    b = tl.program_id(1)
    P = tl.num_programs(0)
    hcol = tl.arange(0, H)
    C = tl.load(scale_ptr + b)
    # per-program weight-gradient partials (pass 1 only)
    acc_b2 = tl.zeros((H,), dtype=tl.float32)
    acc_b3 = tl.zeros((H,), dtype=tl.float32)
    acc_w4 = tl.zeros((H,), dtype=tl.float32)
    acc_wd = tl.zeros((H,), dtype=tl.float32)
    acc_watt = tl.zeros((H,), dtype=tl.float32)
    acc_batt = tl.zeros((H,), dtype=tl.float32)  # db_att, spread over H lanes (summed on the host)
    # BOTH: these six vectors are added to the program's (zeroed) partial rows per tile instead of carried
    # in registers through the loops (the one-pass body has the least registers to spare)
    vec = pvec_ptr + (b * P + pid) * 6 * H
    prog = b * P + pid
    hh = hcol[:, None] * H + hcol[None, :]
    # a bounded number of programs per sample (the launcher's grid): the weight-gradient partials are
    # O(programs * H^2), independent of N. Each program loops over its share of the own blocks (grid-
    # stride), against all other blocks; with SPLIT_OTHER (the offset table's rows-i pass) a program
    # owns one region of own_chunk x other_chunk nodes instead (_regions), so that its d_rel window is
    # narrow, and d_node and this side's dx are partials per other chunk. The other passes keep the
    # plain loops: region bookkeeping there cost 10-20 registers (sm_90 compile).
    OWN_B: tl.constexpr = BI if ROWS_ARE_I else BJ
    OTHER_B: tl.constexpr = BJ if ROWS_ARE_I else BI
    SPLIT_OTHER: tl.constexpr = ROWS_ARE_I and (EDGE == 2 or BOTH)
    N_STAGED: tl.constexpr = 4 if BOTH else 2  # staged operands per tile: (a, d_r[, m, d_t]) or (m, d_t)
    W3_AT: tl.constexpr = 2 * STAGE_ROWS if BOTH else 0  # stage row of dW3's A operand (m)
    if SPLIT_OTHER:
        region = pid  # n_regions programs per sample
        own_lo = region // n_other_chunks * own_chunk  # the region's first own node
        blk_start = own_lo // OWN_B
        blk_stop = tl.minimum(tl.cdiv(N, OWN_B), (own_lo + own_chunk) // OWN_B)
        blk_step = 1
    else:
        region = 0
        blk_start = pid
        blk_stop = tl.cdiv(N, OWN_B)
        blk_step = P
    staged = pid * 0  # tiles in the stage (DW_STAGE > 1)
    stage = stage_ptr + prog.to(tl.int64) * (N_STAGED * STAGE_ROWS * H)
    srow = tl.arange(0, M)
    for blk in range(blk_start, blk_stop, blk_step):
        # the program's own block: rows i (pass 1) or columns j (pass 2); the tile is always (i, j)
        own = blk * OWN_B + tl.arange(0, OWN_B)
        m_own = (tl.load(mask_ptr + b * N + own, mask=own < N, other=0) != 0) & (own < N)
        xo0, xo1, xo2 = _load_xyz(x_ptr, b * N * 3, own, N)
        if ROWS_ARE_I:
            node_own = _load_rows(p_ptr + b * N * H, own, N, hcol, H).to(tl.float32)
        else:
            node_own = _load_rows(q_ptr + b * N * H, own, N, hcol, H).to(tl.float32)
        d_node = tl.zeros((OWN_B, H), dtype=tl.float32)
        dxo0 = tl.zeros((OWN_B,), dtype=tl.float32)
        dxo1 = tl.zeros((OWN_B,), dtype=tl.float32)
        dxo2 = tl.zeros((OWN_B,), dtype=tl.float32)
        if SPLIT_OTHER:
            ob_start = region % n_other_chunks * (other_chunk // OTHER_B)
            ob_stop = ob_start + other_chunk // OTHER_B  # the last chunk's blocks past N are masked
        else:
            ob_start = 0
            ob_stop = tl.cdiv(N, OTHER_B)
        for ob in range(ob_start, ob_stop):
            other = ob * OTHER_B + tl.arange(0, OTHER_B)
            m_oth = (tl.load(mask_ptr + b * N + other, mask=other < N, other=0) != 0) & (other < N)
            xt0, xt1, xt2 = _load_xyz(x_ptr, b * N * 3, other, N)
            if ROWS_ARE_I:
                i, j, mi, mj = own, other, m_own, m_oth
                xi0, xi1, xi2, xj0, xj1, xj2 = xo0, xo1, xo2, xt0, xt1, xt2
                p_i = node_own
                q_j = _load_rows(q_ptr + b * N * H, other, N, hcol, H).to(tl.float32)
            else:
                i, j, mi, mj = other, own, m_oth, m_own
                xi0, xi1, xi2, xj0, xj1, xj2 = xt0, xt1, xt2, xo0, xo1, xo2
                p_i = _load_rows(p_ptr + b * N * H, other, N, hcol, H).to(tl.float32)
                q_j = node_own
            u0, u1, u2, d2, z, _sig_z, e, _a, r, _sig_r, _m0, g, w_att, _m, t, sig_t, _s, w4, phi, v = _pair_tile(
                b, i, j, N, xi0, xi1, xi2, xj0, xj1, xj2, p_i, q_j, mi, mj,
                w_d_ptr, W2_ptr, b2_ptr, W3_ptr, b3_ptr, w4_ptr, ea_ptr, We_ptr, rel_ptr, watt_ptr, b_att, E, K,
                H, EP, BI, BJ, EDGE, ATTENTION, TANH, PRECISION, UPCAST, FAST)
            if DW_STAGE > 1:  # this tile's A operand of the pass's weight gradient: a (dW2) or m (dW3)
                if ROWS_ARE_I:
                    a_or_m = _a
                else:
                    a_or_m = _m
                tl.store(stage + (staged * M + srow)[:, None] * H + hcol[None, :],
                         _cast(a_or_m, stage_ptr.dtype.element_ty, UPCAST))
                if BOTH:
                    tl.store(stage + (W3_AT + staged * M + srow)[:, None] * H + hcol[None, :],
                             _cast(_m, stage_ptr.dtype.element_ty, UPCAST))
            vf = v.to(tl.float32)
            # upstream gradients of the tile's rows i
            gm_i = _load_rows(gm_ptr + b * N * H, i, N, hcol, H)
            g0, g1, g2 = _load_xyz(gdx_ptr, b * N * 3, i, N)
            inv = tl.full((BI, BJ), 1.0, tl.float32)
            if NORMALIZE == 1:
                inv = 1.0 / (tl.sqrt(d2) + eps)  # the length is detached: no gradient through inv
            elif NORMALIZE == 2:
                inv = 1.0 / tl.maximum(tl.sqrt(d2), eps)
            d_phi = C * vf * inv * (g0[:, None] * u0 + g1[:, None] * u1 + g2[:, None] * u2)  # dL/dphi_ij
            # dL/du_ij = C v inv phi_ij g_i (through the update) + 2 u_ij dL/dd2_ij (through the distance):
            # the first part now, so g, phi and inv need not stay live until d_z exists
            coef_u = C * vf * inv * tl.reshape(phi, (BI, BJ))
            if NORMALIZE == 2:  # dL/dd2 through s(d2) (added to the distance's share once d_z exists)
                d_d2_scale = coef_u * (g0[:, None] * u0 + g1[:, None] * u1 + g2[:, None] * u2) * \
                    _direction_scale_grad(d2, eps) / inv
            if ROWS_ARE_I:
                dxo0 += tl.sum(coef_u, axis=1) * g0
                dxo1 += tl.sum(coef_u, axis=1) * g1
                dxo2 += tl.sum(coef_u, axis=1) * g2
                if BOTH:  # the tile's columns j: their share of dx, added to the partial below
                    dxj0 = -tl.sum(coef_u * g0[:, None], axis=0)
                    dxj1 = -tl.sum(coef_u * g1[:, None], axis=0)
                    dxj2 = -tl.sum(coef_u * g2[:, None], axis=0)
            else:
                dxo0 -= tl.sum(coef_u * g0[:, None], axis=0)
                dxo1 -= tl.sum(coef_u * g1[:, None], axis=0)
                dxo2 -= tl.sum(coef_u * g2[:, None], axis=0)
            d_phi = tl.reshape(d_phi, (M,))
            if TANH:
                d_phi = d_phi * (1.0 - phi * phi)
            d_t = d_phi[:, None] * w4[None, :] * _dsilu(t, sig_t)  # [M, H]
            W3T = tl.load(W3_ptr + hcol[None, :] * H + hcol[:, None])
            # weight gradients as early as their operands exist, read-modify-writing the program's own
            # partial (a loop-carried [H, H] register accumulator spills), and from recomputed
            # activations (a = silu(z), m = silu(r) g, s = silu(t)) so fewer [M, H] tiles stay live
            if not ROWS_ARE_I or BOTH:  # phi_x's weights in this pass, phi_e's in the other (or both here)
                if DW_STAGE > 1:
                    tl.store(stage + (W3_AT + STAGE_ROWS + staged * M + srow)[:, None] * H + hcol[None, :],
                             _cast(d_t, stage_ptr.dtype.element_ty, UPCAST))
                elif DW_CHUNK == H:
                    m_re = r * _sigmoid(r, FAST) * g[:, None]
                    tl.store(pW3_ptr + prog * H * H + hh,
                             tl.load(pW3_ptr + prog * H * H + hh) + _mm(tl.trans(m_re), _cast(d_t, W3T.dtype, UPCAST),
                                                                        PRECISION, UPCAST))
                else:  # dW3 = m^T d_t by rows of m^T, read back from this program's scratch copy of m (a
                    # register tile cannot be sliced; recomputing m's columns as a W2[:, cols] spilled more)
                    m_stage = stage_ptr + prog * M * H
                    mrow = tl.arange(0, M)
                    tl.store(m_stage + mrow[:, None] * H + hcol[None, :],
                             _cast(r * _sigmoid(r, FAST) * g[:, None], stage_ptr.dtype.element_ty, UPCAST))
                    tl.debug_barrier()
                    for c0 in tl.static_range(0, H, DW_CHUNK):
                        cols = c0 + tl.arange(0, DW_CHUNK)
                        mT_c = tl.load(m_stage + mrow[None, :] * H + cols[:, None])  # [C, M]
                        addr = pW3_ptr + prog * H * H + cols[:, None] * H + hcol[None, :]
                        tl.store(addr, tl.load(addr) + _mm(mT_c, _cast(d_t, W3T.dtype, UPCAST), PRECISION, UPCAST))
                if BOTH:
                    _accumulate(vec + 1 * H, hcol, tl.sum(d_t, axis=0))
                else:
                    acc_b3 += tl.sum(d_t, axis=0)
                if BOTH:
                    _accumulate(vec + 2 * H, hcol, tl.sum(t * sig_t * d_phi[:, None], axis=0))
                else:
                    acc_w4 += tl.sum(t * sig_t * d_phi[:, None], axis=0)
            # the chain d_t -> d_m -> d_r -> d_z multiplies in fp32 (TF32 or 3xTF32 on tensor cores) even for
            # bf16/fp16 inputs: rounding these gradients to 8 bits made e.g. d b_att twice as bad as torch's
            d_m = tl.reshape(gm_i[:, None, :] * vf[:, :, None], (M, H)) + _mm(d_t, W3T.to(tl.float32), PRECISION_BWD,
                                                                              False)
            sig_r = _sigmoid(r, FAST)
            d_gate = tl.zeros((M,), dtype=tl.float32)
            if ATTENTION:
                d_gate = tl.sum(d_m * r * sig_r, axis=1) * g * (1.0 - g)  # dL/d(w_att . m0 + b_att)
                d_m0 = d_m * g[:, None] + d_gate[:, None] * w_att[None, :]
            else:
                d_m0 = d_m
            d_r = d_m0 * _dsilu(r, sig_r)
            W2T = tl.load(W2_ptr + hcol[None, :] * H + hcol[:, None])
            if ROWS_ARE_I:
                if DW_STAGE > 1:
                    tl.store(stage + (STAGE_ROWS + staged * M + srow)[:, None] * H + hcol[None, :],
                             _cast(d_r, stage_ptr.dtype.element_ty, UPCAST))
                elif DW_CHUNK == H:
                    a_re = z * _sigmoid(z, FAST)
                    tl.store(pW2_ptr + prog * H * H + hh,
                             tl.load(pW2_ptr + prog * H * H + hh) + _mm(tl.trans(a_re), _cast(d_r, W2T.dtype, UPCAST),
                                                                        PRECISION, UPCAST))
                else:  # dW2 = a^T d_r by rows: a's columns rebuilt from the inputs (an [H, H] product held
                    # H^2 / threads registers on top of the tile: ~300 B of spills at H = 128)
                    for c0 in tl.static_range(0, H, DW_CHUNK):
                        cols = c0 + tl.arange(0, DW_CHUNK)
                        z_c = _preact_cols(b, i, j, N, d2, e, cols, p_ptr, q_ptr, w_d_ptr, We_ptr, rel_ptr, E, K,
                                           H, EP, EDGE, PRECISION, UPCAST)
                        a_c = z_c * _sigmoid(z_c, FAST)
                        addr = pW2_ptr + prog * H * H + cols[:, None] * H + hcol[None, :]
                        tl.store(addr, tl.load(addr) + _mm(tl.trans(a_c), _cast(d_r, W2T.dtype, UPCAST), PRECISION,
                                                           UPCAST))
                if BOTH:
                    _accumulate(vec + 0 * H, hcol, tl.sum(d_r, axis=0))
                else:
                    acc_b2 += tl.sum(d_r, axis=0)
                if ATTENTION:
                    if BOTH:
                        _accumulate(vec + 4 * H, hcol, tl.sum(r * sig_r * d_gate[:, None], axis=0))
                    else:
                        acc_watt += tl.sum(r * sig_r * d_gate[:, None], axis=0)
                    if BOTH:
                        _accumulate(vec + 5 * H, hcol, tl.where(hcol == 0, tl.sum(d_gate, axis=0), 0.0))
                    else:
                        acc_batt += tl.where(hcol == 0, tl.sum(d_gate, axis=0), 0.0)
            # z again from the inputs instead of keeping the tile live through the chain above (fewer spills
            # at H = 64-128 for a reload of p_i, q_j, rel rows and e W_e)
            z = _preact_cols(b, i, j, N, d2, e, hcol, p_ptr, q_ptr, w_d_ptr, We_ptr, rel_ptr, E, K,
                             H, EP, EDGE, PRECISION, UPCAST)
            sig_z = _sigmoid(z, FAST)
            d_z = _mm(d_r, W2T.to(tl.float32), PRECISION_BWD, False) * _dsilu(z, sig_z)  # [M, H]
            d_z3 = tl.reshape(d_z, (BI, BJ, H))
            w_d = tl.load(w_d_ptr + hcol).to(tl.float32)
            d_d2 = tl.reshape(tl.sum(d_z * w_d[None, :], axis=1), (BI, BJ))  # dL/dd2_ij
            if NORMALIZE == 2:
                d_d2 += d_d2_scale
            du0 = 2.0 * u0 * d_d2  # the distance part of dL/du_ij
            du1 = 2.0 * u1 * d_d2
            du2 = 2.0 * u2 * d_d2
            if ROWS_ARE_I:
                d_node += tl.sum(d_z3, axis=1)
                dxo0 += tl.sum(du0, axis=1)
                dxo1 += tl.sum(du1, axis=1)
                dxo2 += tl.sum(du2, axis=1)
                if BOTH:
                    _accumulate(vec + 3 * H, hcol, tl.sum(d_z * tl.reshape(d2, (M,))[:, None], axis=0))
                else:
                    acc_wd += tl.sum(d_z * tl.reshape(d2, (M,))[:, None], axis=0)
                if BOTH:  # dq_j and the j side of dx: read-modify-written in this own chunk's partial
                    jrow = ((region // n_other_chunks) * tl.num_programs(1) + b) * N + j
                    jok = j < N
                    addr_q = dnode2_ptr + jrow[:, None] * H + hcol[None, :]
                    tl.store(addr_q, tl.load(addr_q, mask=jok[:, None], other=0.0) + tl.sum(d_z3, axis=0),
                             mask=jok[:, None])
                    tl.store(dx2_part_ptr + jrow * 3 + 0,
                             tl.load(dx2_part_ptr + jrow * 3 + 0, mask=jok, other=0.0) + dxj0 - tl.sum(du0, axis=0), mask=jok)
                    tl.store(dx2_part_ptr + jrow * 3 + 1,
                             tl.load(dx2_part_ptr + jrow * 3 + 1, mask=jok, other=0.0) + dxj1 - tl.sum(du1, axis=0), mask=jok)
                    tl.store(dx2_part_ptr + jrow * 3 + 2,
                             tl.load(dx2_part_ptr + jrow * 3 + 2, mask=jok, other=0.0) + dxj2 - tl.sum(du2, axis=0), mask=jok)
                if EDGE == 1:
                    ecol = tl.arange(0, EP)
                    addr_We = pWe_ptr + (prog * EP + ecol[:, None]) * H + hcol[None, :]
                    tl.store(addr_We, tl.load(addr_We) + tl.dot(tl.trans(e), d_z, input_precision=PRECISION_BWD))
                    if NEED_DEA:  # d edge_attr_ij = W_e d_z_ij, one column at a time: a tl.dot here (N = EP) would
                        # impose its operand layout on the whole d_z chain and spill
                        pair = tl.arange(0, M)
                        i_m = blk * BI + pair // BJ
                        j_m = ob * BJ + pair % BJ
                        ok = (i_m < N) & (j_m < N)
                        dea_row = dea_ptr + b.to(tl.int64) * N * N * E + (i_m * N + j_m) * E  # sample base in 64 bits
                        for c in range(0, E):
                            We_c = tl.load(We_ptr + c * H + hcol).to(tl.float32)
                            tl.store(dea_row + c, _cast(tl.sum(d_z * We_c[None, :], axis=1), dea_ptr.dtype.element_ty,
                                                        UPCAST), mask=ok)
                if EDGE == 2:
                    # sum d_z over the tile's pairs with equal offset j - i into the region's window, row
                    # (j - other_lo) - (i - own_lo) + own_chunk - 1 (unclipped: the launcher folds the
                    # clipped ends), as a one-hot product: rows [k_lo, k_lo + W_REL) are those the tile touches
                    o_lo = ob * BJ - (blk * BI + BI - 1)  # the tile's smallest offset j - i
                    w = tl.arange(0, W_REL)
                    onehot = (tl.reshape(j[None, :] - i[:, None] - o_lo, (M,))[None, :] == w[:, None]).to(tl.float32)
                    d_rel = tl.dot(onehot, d_z, input_precision="ieee")  # [W_REL, H]; exact (a gather-sum) and lighter than 3xTF32
                    # window row of offset o: o - (other_lo - own_lo) + own_chunk - 1, so [0, 2 chunk - 1)
                    rows = o_lo + w - (region % n_other_chunks * other_chunk) + own_lo + own_chunk - 1
                    win_rows = own_chunk + other_chunk - 1
                    ok = (rows < win_rows)[:, None]
                    addr = prel_ptr + (b.to(tl.int64) * n_regions + region) * win_rows * H + rows[:, None] * H + hcol[None, :]
                    tl.store(addr, tl.load(addr, mask=ok, other=0.0) + d_rel, mask=ok)
            else:
                d_node += tl.sum(d_z3, axis=0)
                dxo0 -= tl.sum(du0, axis=0)
                dxo1 -= tl.sum(du1, axis=0)
                dxo2 -= tl.sum(du2, axis=0)
            if DW_STAGE > 1:
                staged += 1
                if staged == DW_STAGE:
                    tl.debug_barrier()  # the stage rows were written by other threads
                    _flush_weight_gradient(stage, STAGE_ROWS, pW2_ptr + prog * H * H if ROWS_ARE_I else
                                           pW3_ptr + prog * H * H, H, H, H, H, STAGE_ROWS, FLUSH_ROWS, M, PRECISION,
                                           UPCAST)
                    if BOTH:
                        _flush_weight_gradient(stage + W3_AT * H, STAGE_ROWS, pW3_ptr + prog * H * H, H, H, H, H, STAGE_ROWS,
                                               FLUSH_ROWS, M, PRECISION, UPCAST)
                    staged = 0
            tl.debug_barrier()  # the next tile's read-modify-writes (and stage rows) may touch rows other threads wrote
        ok = own < N
        row = b * N + own  # this node's row of d_node / dx
        if SPLIT_OTHER:
            row += region % n_other_chunks * tl.num_programs(1) * N  # the other chunk's partial
        tl.store(dnode_ptr + row[:, None] * H + hcol[None, :], d_node, mask=ok[:, None])
        tl.store(dx_part_ptr + row * 3 + 0, dxo0, mask=ok)
        tl.store(dx_part_ptr + row * 3 + 1, dxo1, mask=ok)
        tl.store(dx_part_ptr + row * 3 + 2, dxo2, mask=ok)
    if DW_STAGE > 1:
        if staged > 0:  # the last, partly filled stage
            _flush_weight_gradient(stage, staged * M, pW2_ptr + prog * H * H if ROWS_ARE_I else pW3_ptr + prog * H * H,
                                   H, H, H, H, STAGE_ROWS, FLUSH_ROWS, M, PRECISION, UPCAST)
            if BOTH:
                _flush_weight_gradient(stage + W3_AT * H, staged * M, pW3_ptr + prog * H * H, H, H, H, H, STAGE_ROWS,
                                       FLUSH_ROWS, M, PRECISION, UPCAST)
    base = prog * 6 * H
    if ROWS_ARE_I and not BOTH:
        tl.store(pvec_ptr + base + 0 * H + hcol, acc_b2)
        tl.store(pvec_ptr + base + 3 * H + hcol, acc_wd)
        tl.store(pvec_ptr + base + 4 * H + hcol, acc_watt)
        tl.store(pvec_ptr + base + 5 * H + hcol, acc_batt)
    if not ROWS_ARE_I:
        tl.store(pvec_ptr + base + 1 * H + hcol, acc_b3)
        tl.store(pvec_ptr + base + 2 * H + hcol, acc_w4)


@triton.jit
def _scratch_times_weight(a_ptr, W_ptr, cols, M: tl.constexpr, KD: tl.constexpr, A_STRIDE: tl.constexpr,
                          W_STRIDE: tl.constexpr, K_CHUNK: tl.constexpr, TRANS_W: tl.constexpr, F32: tl.constexpr,
                          PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """A W[:, cols] (TRANS_W: A W[cols, :]^T) for the program's own [M, KD] scratch tile A (rows A_STRIDE
    apart; W's rows W_STRIDE long), by K chunks read back from it: [M, len(cols)] fp32. An mma.sync at
    M = 16 gives every warp the whole A operand, [16, KD] in registers per product (128 registers at
    KD = 256 in TF32); a K chunk of it is [16, K_CHUNK]. F32: TF32 (or 3xTF32) products of fp32
    operands, else in the weight dtype."""
    srow = tl.arange(0, M)
    acc = tl.zeros((M, cols.shape[0]), dtype=tl.float32)
    for k0 in tl.range(0, KD, K_CHUNK):
        kk = k0 + tl.arange(0, K_CHUNK)
        a = tl.load(a_ptr + srow[:, None] * A_STRIDE + kk[None, :])
        if TRANS_W:
            w = tl.load(W_ptr + cols[None, :] * W_STRIDE + kk[:, None])  # W[cols, kk]^T: [K_CHUNK, C]
        else:
            w = tl.load(W_ptr + kk[:, None] * W_STRIDE + cols[None, :])  # W[kk, cols]
        if F32:
            acc += _mm(a.to(tl.float32), w.to(tl.float32), PRECISION, False)
        else:
            acc += _mm(a, w, PRECISION, UPCAST)
    return acc


@triton.jit
def _egnn_bwd_chunked_kernel(
    x_ptr, p_ptr, q_ptr, mask_ptr, scale_ptr,
    w_d_ptr, W2_ptr, b2_ptr, W3_ptr, b3_ptr, w4_ptr,
    ea_ptr, We_ptr, rel_ptr, watt_ptr, b_att,
    gm_ptr, gdx_ptr,  # (B,N,HM), (B,N,3) fp32 upstream gradients
    dnode_ptr, dx_part_ptr,  # (n_chunks, B, N, HE) d_p (zeroed: added to by column chunks), (n_chunks, B, N, 3) i side of dx
    dnode2_ptr, dx2_part_ptr,  # (n_chunks, B, N, HE) d_q and (n_chunks, B, N, 3) the j side of dx, zeroed
    dea_ptr,  # (B,N,N,E) d edge_attr (NEED_DEA)
    pW2_ptr, pW3_ptr, pvec_ptr, pWe_ptr,  # per-program partials: (P,HE,HM), (P,HM,HX), (P,6,HS), (P,EP,HE), zeroed
    prel_ptr,  # (B, n_regions, 2 chunk - 1, HE) d_rel per region and unclipped offset, zeroed
    stage_ptr,  # weight dtype, per program: (4, DW_STAGE M, HS): a, d_r, m, d_t
    scratch_ptr,  # fp32, per program: (M, HM) d_r, the A operand of d_z = d_r W2^T read back by K chunks
    N, E, K, eps,
    own_chunk, other_chunk, n_other_chunks, n_regions,
    HE: tl.constexpr, HM: tl.constexpr, HX: tl.constexpr,  # widths of z (p, q), m (W2's columns), W3's columns
    HS: tl.constexpr,  # row length of the stage and of the vector partials: max(HE, HM, HX)
    HX_CHUNK: tl.constexpr,  # dW3's columns per flush product: HX when a power of two, else N_CHUNK
    EP: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, W_REL: tl.constexpr,
    EDGE: tl.constexpr, ATTENTION: tl.constexpr, TANH: tl.constexpr, NORMALIZE: tl.constexpr,
    NEED_DEA: tl.constexpr, PRECISION: tl.constexpr, PRECISION_BWD: tl.constexpr, UPCAST: tl.constexpr,
    FAST: tl.constexpr, DW_STAGE: tl.constexpr, FLUSH_ROWS: tl.constexpr,
    K_CHUNK: tl.constexpr, N_CHUNK: tl.constexpr,
):
    """The one-pass backward (_egnn_bwd_kernel with BOTH) with every product split into column chunks,
    for H = 256, where the unchunked body keeps about a dozen [M, H] fp32 tiles live and spilled ~1 KB
    per thread, and for rectangular widths (z HE wide, a multiple of K_CHUNK; m HM; t HX, a multiple
    of N_CHUNK). Only r, m and d_m (then d_r), HM wide, stay whole; per tile of pairs:

        r    = b2 + sum_c silu(z[:, c]) W2[c, :]        z's K chunks rebuilt from the inputs; a's columns staged
        phi  = sum_c silu(m W3[:, c] + b3[c]) . w4[c]   output-column chunks of W3
        d_m  = gm v + sum_c d_t[:, c] W3[:, c]^T        t's chunks recomputed (+1 H x H product per pair:
                                                        7 in all), d_t's columns staged for dW3
        d_r  = (d_m g + d_gate w_att) silu'(r)          whole, staged for dW2
        d_z[:, c] = (d_r W2[c, :]^T) silu'(z[:, c])     by K chunks: d_p, d_q, w_d, the edge term and
                                                        d2's gradient added to per chunk

    d_p, d_q, the vector gradients, the offset-table windows and W_e's gradient are read-modify-written by
    column chunk in the program's own (zeroed) partials; the weight gradients are staged and flushed every
    DW_STAGE tiles as in _egnn_bwd_kernel. Rows i are the program's own (a region of own_chunk x
    other_chunk nodes, _regions)."""
    M: tl.constexpr = BI * BJ
    STAGE_ROWS: tl.constexpr = DW_STAGE * M
    pid = tl.program_id(0)
    b = tl.program_id(1)
    P = tl.num_programs(0)
    hcol = tl.arange(0, HM)
    C = tl.load(scale_ptr + b)
    prog = b * P + pid
    vec = pvec_ptr + prog * 6 * HS
    region = pid
    own_lo = region // n_other_chunks * own_chunk
    other_part = region % n_other_chunks  # d_p and the i side of dx: a partial per other chunk
    own_part = region // n_other_chunks  # d_q and the j side: a partial per own chunk
    blk_start = own_lo // BI
    blk_stop = tl.minimum(tl.cdiv(N, BI), (own_lo + own_chunk) // BI)
    staged = pid * 0
    stage = stage_ptr + prog.to(tl.int64) * (4 * STAGE_ROWS * HS)
    W2_STAGE: tl.constexpr = 0  # stage rows: a, then d_r, then m, then d_t
    W3_STAGE: tl.constexpr = 2 * STAGE_ROWS
    srow = tl.arange(0, M)
    b2 = tl.load(b2_ptr + hcol).to(tl.float32)
    for blk in range(blk_start, blk_stop):
        i = blk * BI + tl.arange(0, BI)
        mi = (tl.load(mask_ptr + b * N + i, mask=i < N, other=0) != 0) & (i < N)
        xi0, xi1, xi2 = _load_xyz(x_ptr, b * N * 3, i, N)
        dxi0 = tl.zeros((BI,), dtype=tl.float32)
        dxi1 = tl.zeros((BI,), dtype=tl.float32)
        dxi2 = tl.zeros((BI,), dtype=tl.float32)
        i_rows = (other_part * tl.num_programs(1) + b) * N + i  # this region's partial rows of d_p / dx
        ob_start = other_part * (other_chunk // BJ)
        for ob in range(ob_start, ob_start + other_chunk // BJ):  # the last chunk's blocks past N are masked
            j = ob * BJ + tl.arange(0, BJ)
            mj = (tl.load(mask_ptr + b * N + j, mask=j < N, other=0) != 0) & (j < N)
            xj0, xj1, xj2 = _load_xyz(x_ptr, b * N * 3, j, N)
            u0 = xi0[:, None] - xj0[None, :]  # u_ij = x_i - x_j, [BI, BJ]
            u1 = xi1[:, None] - xj1[None, :]
            u2 = xi2[:, None] - xj2[None, :]
            d2 = u0 * u0 + u1 * u1 + u2 * u2
            e = tl.zeros((M, EP), dtype=tl.float32)
            if EDGE == 1:
                ecol = tl.arange(0, EP)
                in_range = (i[:, None] < N) & (j[None, :] < N)
                pair_off = i[:, None] * N + j[None, :]
                e3 = tl.load(ea_ptr + b.to(tl.int64) * N * N * E + pair_off[:, :, None] * E + ecol[None, None, :],
                             mask=in_range[:, :, None] & (ecol < E)[None, None, :], other=0.0)
                e = tl.reshape(e3.to(tl.float32), (M, EP))
            # -- recompute: r by K chunks of z (a's columns staged for dW2), m, phi by chunks of W3's columns
            w_att = tl.zeros((HM,), dtype=tl.float32)
            r = tl.zeros((M, HM), dtype=tl.float32) + b2[None, :]
            for k0 in tl.range(0, HE, K_CHUNK):
                kc = k0 + tl.arange(0, K_CHUNK)
                z_c = _preact_cols(b, i, j, N, d2, e, kc, p_ptr, q_ptr, w_d_ptr, We_ptr, rel_ptr, E, K,
                                   HE, EP, EDGE, PRECISION, UPCAST)
                a_c = z_c * _sigmoid(z_c, FAST)
                tl.store(stage + (W2_STAGE + staged * M + srow)[:, None] * HS + kc[None, :],
                         _cast(a_c, stage_ptr.dtype.element_ty, UPCAST))
                r += _mm(a_c, tl.load(W2_ptr + kc[:, None] * HM + hcol[None, :]), PRECISION, UPCAST)
            m0 = r * _sigmoid(r, FAST)  # sigmoid(r) is recomputed for d_r rather than kept live through d_m
            g = tl.full((M,), 1.0, tl.float32)
            if ATTENTION:
                w_att = tl.load(watt_ptr + hcol).to(tl.float32)
                g = _sigmoid(tl.sum(m0 * w_att[None, :], axis=1) + b_att, FAST)
            m_op = _cast(m0 * g[:, None], W3_ptr.dtype.element_ty, UPCAST)  # m_ij, the A operand of t = m W3
            m_rows = stage + (W3_STAGE + staged * M) * HS  # m, staged for dW3, read back by K chunks for t = m W3
            tl.store(m_rows + srow[:, None] * HS + hcol[None, :], _cast(m_op, stage_ptr.dtype.element_ty, UPCAST))
            tl.debug_barrier()
            phi = tl.zeros((M,), dtype=tl.float32)
            for n0 in tl.range(0, HX, N_CHUNK):
                nc = n0 + tl.arange(0, N_CHUNK)
                t_c = _scratch_times_weight(m_rows, W3_ptr, nc, M, HM, HS, HX, K_CHUNK, False, False, PRECISION,
                                            UPCAST) + \
                    tl.load(b3_ptr + nc).to(tl.float32)[None, :]
                phi += tl.sum(t_c * _sigmoid(t_c, FAST) * tl.load(w4_ptr + nc).to(tl.float32)[None, :], axis=1)
            if TANH:
                phi = 2.0 * _sigmoid(2.0 * phi, FAST) - 1.0
            v = mi[:, None] & mj[None, :] & (i[:, None] != j[None, :])
            vf = v.to(tl.float32)
            # -- the coordinate update's gradients
            g0, g1, g2 = _load_xyz(gdx_ptr, b * N * 3, i, N)
            inv = tl.full((BI, BJ), 1.0, tl.float32)
            if NORMALIZE == 1:
                inv = 1.0 / (tl.sqrt(d2) + eps)  # the length is detached
            elif NORMALIZE == 2:
                inv = 1.0 / tl.maximum(tl.sqrt(d2), eps)
            d_phi = C * vf * inv * (g0[:, None] * u0 + g1[:, None] * u1 + g2[:, None] * u2)
            coef_u = C * vf * inv * tl.reshape(phi, (BI, BJ))
            if NORMALIZE == 2:  # dL/dd2 through s(d2) (added to the distance's share once d_z exists)
                d_d2_scale = coef_u * (g0[:, None] * u0 + g1[:, None] * u1 + g2[:, None] * u2) * \
                    _direction_scale_grad(d2, eps) / inv
            dxi0 += tl.sum(coef_u, axis=1) * g0
            dxi1 += tl.sum(coef_u, axis=1) * g1
            dxi2 += tl.sum(coef_u, axis=1) * g2
            dxj0 = -tl.sum(coef_u * g0[:, None], axis=0)
            dxj1 = -tl.sum(coef_u * g1[:, None], axis=0)
            dxj2 = -tl.sum(coef_u * g2[:, None], axis=0)
            d_phi = tl.reshape(d_phi, (M,))
            if TANH:
                d_phi = d_phi * (1.0 - phi * phi)
            # -- d_m = gm v + d_t W3^T by chunks of W3's columns, t recomputed; d_t's columns staged for dW3
            d_m = tl.zeros((M, HM), dtype=tl.float32)
            for n0 in tl.range(0, HX, N_CHUNK):
                nc = n0 + tl.arange(0, N_CHUNK)
                t_c = _scratch_times_weight(m_rows, W3_ptr, nc, M, HM, HS, HX, K_CHUNK, False, False, PRECISION,
                                            UPCAST) + \
                    tl.load(b3_ptr + nc).to(tl.float32)[None, :]
                sig_t = _sigmoid(t_c, FAST)
                d_t = d_phi[:, None] * tl.load(w4_ptr + nc).to(tl.float32)[None, :] * _dsilu(t_c, sig_t)
                tl.store(stage + (W3_STAGE + STAGE_ROWS + staged * M + srow)[:, None] * HS + nc[None, :],
                         _cast(d_t, stage_ptr.dtype.element_ty, UPCAST))
                _accumulate(vec + 1 * HS, nc, tl.sum(d_t, axis=0))  # b3
                _accumulate(vec + 2 * HS, nc, tl.sum(t_c * sig_t * d_phi[:, None], axis=0))  # w4
                W3T_c = tl.load(W3_ptr + hcol[None, :] * HX + nc[:, None]).to(tl.float32)  # [N_CHUNK, HM]
                d_m += _mm(d_t, W3T_c, PRECISION_BWD, False)
            gm_i = _load_rows(gm_ptr + b * N * HM, i, N, hcol, HM)
            d_m += tl.reshape(gm_i[:, None, :] * vf[:, :, None], (M, HM))  # through m_i = sum_j v_ij m_ij
            sig_r = _sigmoid(r, FAST)
            if ATTENTION:
                d_gate = tl.sum(d_m * r * sig_r, axis=1) * g * (1.0 - g)
                d_m = d_m * g[:, None] + d_gate[:, None] * w_att[None, :]
                _accumulate(vec + 4 * HS, hcol, tl.sum(r * sig_r * d_gate[:, None], axis=0))
                _accumulate(vec + 5 * HS, hcol, tl.where(hcol == 0, tl.sum(d_gate, axis=0), 0.0))
            d_r = d_m * _dsilu(r, sig_r)
            tl.store(stage + (W2_STAGE + STAGE_ROWS + staged * M + srow)[:, None] * HS + hcol[None, :],
                     _cast(d_r, stage_ptr.dtype.element_ty, UPCAST))
            d_r_rows = scratch_ptr + prog.to(tl.int64) * M * HM  # fp32: the d_r -> d_z product stays TF32
            tl.store(d_r_rows + srow[:, None] * HM + hcol[None, :], d_r)
            tl.debug_barrier()
            _accumulate(vec + 0 * HS, hcol, tl.sum(d_r, axis=0))  # b2
            # -- d_z by K chunks, and everything that reads it
            d_d2 = tl.zeros((M,), dtype=tl.float32)
            d2_flat = tl.reshape(d2, (M,))
            j_rows = (own_part * tl.num_programs(1) + b) * N + j
            i_ok = i < N
            j_ok = j < N
            d_e = tl.zeros((M, EP), dtype=tl.float32)  # d edge_attr (NEED_DEA)
            for k0 in tl.range(0, HE, K_CHUNK):
                kc = k0 + tl.arange(0, K_CHUNK)
                z_c = _preact_cols(b, i, j, N, d2, e, kc, p_ptr, q_ptr, w_d_ptr, We_ptr, rel_ptr, E, K,
                                   HE, EP, EDGE, PRECISION, UPCAST)
                d_z = _scratch_times_weight(d_r_rows, W2_ptr, kc, M, HM, HM, HM, K_CHUNK, True, True, PRECISION_BWD,
                                            False) * \
                    _dsilu(z_c, _sigmoid(z_c, FAST))  # d_r W2[kc, :]^T silu'(z[:, kc]), [M, K_CHUNK]
                d_z3 = tl.reshape(d_z, (BI, BJ, K_CHUNK))
                d_d2 += tl.sum(d_z * tl.load(w_d_ptr + kc).to(tl.float32)[None, :], axis=1)
                _accumulate(vec + 3 * HS, kc, tl.sum(d_z * d2_flat[:, None], axis=0))  # w_d
                addr_p = dnode_ptr + i_rows[:, None] * HE + kc[None, :]
                tl.store(addr_p, tl.load(addr_p, mask=i_ok[:, None], other=0.0) + tl.sum(d_z3, axis=1),
                         mask=i_ok[:, None])
                addr_q = dnode2_ptr + j_rows[:, None] * HE + kc[None, :]
                tl.store(addr_q, tl.load(addr_q, mask=j_ok[:, None], other=0.0) + tl.sum(d_z3, axis=0),
                         mask=j_ok[:, None])
                if EDGE == 1:
                    ecol = tl.arange(0, EP)
                    addr_We = pWe_ptr + (prog * EP + ecol[:, None]) * HE + kc[None, :]
                    tl.store(addr_We, tl.load(addr_We) + tl.dot(tl.trans(e), d_z, input_precision=PRECISION_BWD))
                    if NEED_DEA:  # d edge_attr = d_z W_e^T, K chunk by K chunk into a [M, EP] accumulator
                        We_cT = tl.load(We_ptr + ecol[None, :] * HE + kc[:, None], mask=(ecol < E)[None, :], other=0.0)
                        d_e += tl.dot(d_z, We_cT.to(tl.float32), input_precision=PRECISION_BWD)
                if EDGE == 2:  # d_rel: the tile's pairs of equal offset summed into the region's window
                    o_lo = ob * BJ - (blk * BI + BI - 1)
                    w = tl.arange(0, W_REL)
                    onehot = (tl.reshape(j[None, :] - i[:, None] - o_lo, (M,))[None, :] == w[:, None]).to(tl.float32)
                    d_rel = tl.dot(onehot, d_z, input_precision="ieee")  # [W_REL, K_CHUNK], exact
                    rows = o_lo + w - other_part * other_chunk + own_lo + own_chunk - 1
                    win_rows = own_chunk + other_chunk - 1
                    ok = (rows < win_rows)[:, None]
                    addr = prel_ptr + (b.to(tl.int64) * n_regions + region) * win_rows * HE + rows[:, None] * HE + \
                        kc[None, :]
                    tl.store(addr, tl.load(addr, mask=ok, other=0.0) + d_rel, mask=ok)
            if EDGE == 1 and NEED_DEA:
                pair = tl.arange(0, M)
                i_m = blk * BI + pair // BJ
                j_m = ob * BJ + pair % BJ
                ok = (i_m < N) & (j_m < N)
                ecol = tl.arange(0, EP)
                dea_rows = dea_ptr + b.to(tl.int64) * N * N * E + (i_m * N + j_m)[:, None] * E + ecol[None, :]
                tl.store(dea_rows, _cast(d_e, dea_ptr.dtype.element_ty, UPCAST), mask=ok[:, None] & (ecol < E)[None, :])
            d_d2 = tl.reshape(d_d2, (BI, BJ))
            if NORMALIZE == 2:
                d_d2 += d_d2_scale
            du0 = 2.0 * u0 * d_d2
            du1 = 2.0 * u1 * d_d2
            du2 = 2.0 * u2 * d_d2
            dxi0 += tl.sum(du0, axis=1)
            dxi1 += tl.sum(du1, axis=1)
            dxi2 += tl.sum(du2, axis=1)
            tl.store(dx2_part_ptr + j_rows * 3 + 0,
                     tl.load(dx2_part_ptr + j_rows * 3 + 0, mask=j_ok, other=0.0) + dxj0 - tl.sum(du0, axis=0), mask=j_ok)
            tl.store(dx2_part_ptr + j_rows * 3 + 1,
                     tl.load(dx2_part_ptr + j_rows * 3 + 1, mask=j_ok, other=0.0) + dxj1 - tl.sum(du1, axis=0), mask=j_ok)
            tl.store(dx2_part_ptr + j_rows * 3 + 2,
                     tl.load(dx2_part_ptr + j_rows * 3 + 2, mask=j_ok, other=0.0) + dxj2 - tl.sum(du2, axis=0), mask=j_ok)
            staged += 1
            if staged == DW_STAGE:
                tl.debug_barrier()  # the stage rows were written by other threads
                _flush_weight_gradient(stage + W2_STAGE * HS, STAGE_ROWS, pW2_ptr + prog * HE * HM, HE, HM, HS, HM,
                                       STAGE_ROWS, FLUSH_ROWS, M, PRECISION, UPCAST)
                _flush_weight_gradient(stage + W3_STAGE * HS, STAGE_ROWS, pW3_ptr + prog * HM * HX, HM, HX, HS, HX_CHUNK,
                                       STAGE_ROWS, FLUSH_ROWS, M, PRECISION, UPCAST)
                staged = 0
            tl.debug_barrier()  # the next tile's read-modify-writes may touch what other threads wrote
        i_ok = i < N
        tl.store(dx_part_ptr + i_rows * 3 + 0, dxi0, mask=i_ok)
        tl.store(dx_part_ptr + i_rows * 3 + 1, dxi1, mask=i_ok)
        tl.store(dx_part_ptr + i_rows * 3 + 2, dxi2, mask=i_ok)
    if staged > 0:  # the last, partly filled stage
        _flush_weight_gradient(stage + W2_STAGE * HS, staged * M, pW2_ptr + prog * HE * HM, HE, HM, HS, HM, STAGE_ROWS,
                               FLUSH_ROWS, M, PRECISION, UPCAST)
        _flush_weight_gradient(stage + W3_STAGE * HS, staged * M, pW3_ptr + prog * HM * HX, HM, HX, HS, HX_CHUNK, STAGE_ROWS,
                               FLUSH_ROWS, M, PRECISION, UPCAST)


@triton.jit
def _rel_windows_kernel(
    win_ptr,  # (B, n_regions, own_chunk + other_chunk - 1, HE) fp32: d_rel per region by offset (rows-i pass)
    out_ptr,  # (2N - 1, HE) fp32: d_rel by unclipped offset o = j - i, row o + N - 1
    B, N, own_chunk, other_chunk, n_other_chunks, n_regions,
    H: tl.constexpr, BLOCK_O: tl.constexpr,  # H: the columns per program (a power of two dividing HE)
    HE: tl.constexpr,  # row length of the windows and the output
):
    """Sums the regions' windows of offsets into one row per offset, in a fixed order (deterministic, no
    atomics): row k of region (oc, tc)'s window is the offset o = k + tc other_chunk - oc own_chunk -
    own_chunk + 1, so for a block of offsets only the few tc whose windows overlap it are read. Columns
    by blocks of H along the grid's second axis."""
    rows = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)  # output rows
    hcol = tl.program_id(1) * H + tl.arange(0, H)
    o = rows - (N - 1)
    o_lo = tl.program_id(0) * BLOCK_O - (N - 1)
    o_hi = o_lo + BLOCK_O - 1
    n_own_chunks = n_regions // n_other_chunks
    win_rows = own_chunk + other_chunk - 1
    acc = tl.zeros((BLOCK_O, H), dtype=tl.float32)
    for b in range(0, B):
        for oc in range(0, n_own_chunks):
            # tc with tc other_chunk in [o_lo + oc own_chunk - other_chunk + 1, o_hi + oc own_chunk + own_chunk - 1]
            tc_lo = tl.cdiv(tl.maximum(o_lo + oc * own_chunk - other_chunk + 1, 0), other_chunk)
            top = o_hi + oc * own_chunk + own_chunk - 1
            tc_hi = tl.minimum(tl.where(top >= 0, top // other_chunk + 1, 0), n_other_chunks)
            for tc in range(tc_lo, tc_hi):
                k = o - tc * other_chunk + oc * own_chunk + own_chunk - 1
                ok = (k >= 0) & (k < win_rows)
                base = win_ptr + ((b * n_regions + oc * n_other_chunks + tc).to(tl.int64) * win_rows) * HE
                acc += tl.load(base + k[:, None] * HE + hcol[None, :], mask=ok[:, None], other=0.0)
    tl.store(out_ptr + rows[:, None] * HE + hcol[None, :], acc, mask=(rows < 2 * N - 1)[:, None])


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def _precision(dtype: torch.dtype) -> str:
    if dtype != torch.float32:
        return "tf32"  # ignored for bf16/fp16 operands
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def _fast_sigmoid(dtype: torch.dtype) -> bool:
    """tanh.approx sigmoids: for bf16/fp16 inputs on the GPU (the interpreter has no inline PTX)."""
    return dtype != torch.float32 and not _interpreting()


def _edge_mode(edge_attr, rel) -> int:
    return 1 if edge_attr is not None else (2 if rel is not None else 0)


def _launch_meta(x, p, W2, W3, edge_attr, rel, flags):
    B, N, _ = x.shape
    HE, HM, HX = p.shape[-1], W2.shape[1], W3.shape[1]
    dtype = p.dtype  # the compute dtype (x may be float32 next to bf16/fp16 features: fp32 coordinates)
    E = edge_attr.shape[-1] if edge_attr is not None else 0
    K = rel.shape[0] // 2 if rel is not None else 0
    meta = dict(B=B, N=N, HE=HE, HM=HM, HX=HX, square=is_square(HE, HM, HX), dtype=dtype, E=E,
                EP=max(16, triton.next_power_of_2(max(E, 1))), K=K, EDGE=_edge_mode(edge_attr, rel), **flags)
    if meta["square"]:
        H = HE
        BI, BJ, warps = block_sizes(H, dtype, "fwd", _edge_mode(edge_attr, rel))
        K_CHUNK, N_CHUNK = fwd_chunks(H, dtype, x32=x.dtype == torch.float32)
        meta.update(H=H, BI=BI, BJ=BJ, warps=warps, K_CHUNK=K_CHUNK, N_CHUNK=N_CHUNK,
                    M_SCRATCH=fwd_m_scratch(H, dtype, x.dtype == torch.float32), CHUNKED=K_CHUNK * N_CHUNK < H * H)
    else:  # rectangular: the chunked forward always
        BI, BJ, warps, K_CHUNK, N_CHUNK = rect_fwd_config(HM, HX, dtype)
        meta.update(H=None, BI=BI, BJ=BJ, warps=warps, K_CHUNK=K_CHUNK, N_CHUNK=N_CHUNK,
                    M_SCRATCH=rect_m_scratch(HM, dtype), CHUNKED=True)
    return meta


def _forward(meta, x, p, q, mask_u8, scale, w_d, W2, b2, W3, b3, w4, edge_attr, W_e, rel, w_att):
    B, N, HE, HM, HX = meta["B"], meta["N"], meta["HE"], meta["HM"], meta["HX"]
    m_i = torch.zeros(B, N, HM, dtype=torch.float32, device=x.device)  # accumulated in place
    dx_i = torch.empty(B, N, 3, dtype=x.dtype, device=x.device)
    dummy = x
    grid = (triton.cdiv(N, meta["BI"]), B)
    # M_SCRATCH: O(B N BJ HM), BJ x the size of m_i (a [BI * BJ, HM] tile per program of BI rows)
    scratch = torch.empty(grid[0] * B, meta["BI"] * meta["BJ"], HM, dtype=W3.dtype, device=x.device) \
        if meta["M_SCRATCH"] else dummy
    _egnn_fwd_kernel[grid](
        x, p, q, mask_u8, scale, w_d, W2, b2, W3, b3, w4,
        edge_attr if edge_attr is not None else dummy, W_e if W_e is not None else dummy,
        rel if rel is not None else dummy, w_att if w_att is not None else dummy, meta["b_att"],
        m_i, dx_i, scratch, N, meta["E"], meta["K"], meta["eps"],
        HE=HE, HM=HM, HX=HX, EP=meta["EP"], BI=meta["BI"], BJ=meta["BJ"], EDGE=meta["EDGE"],
        ATTENTION=w_att is not None, TANH=meta["tanh"], NORMALIZE=meta["normalize"], PRECISION=_precision(p.dtype),
        UPCAST=_interpreting() and p.dtype != torch.float32, FAST=_fast_sigmoid(p.dtype),
        K_CHUNK=meta["K_CHUNK"], N_CHUNK=meta["N_CHUNK"], M_SCRATCH=meta["M_SCRATCH"], CHUNKED=meta["CHUNKED"],
        num_warps=meta["warps"], num_stages=NUM_STAGES,
    )
    return m_i.to(p.dtype), dx_i


BACKWARD_PROGRAMS = 512  # per backward pass over all samples: partials (512, H, H) fp32 = 32 MB at H = 128


def _regions(N: int, B: int, block: int) -> Tuple[int, int]:
    """(chunk, n_chunks) of the offset table's rows-i pass: each sample's N x N pairs are cut into
    n_chunks^2 square regions of chunk x chunk nodes, one program each (at most BACKWARD_PROGRAMS // 2B
    per sample). A region's pairs have 2 chunk - 1 distinct offsets j - i, so its d_rel window is
    (2 chunk - 1) x H and all windows together O(n_chunks N H) per sample, where one (2K + 1) x H
    partial table per program was O(programs N H) for ProtDiff's K = N - 1 (8.6 GB at N = 8192,
    H = 256); the price is one partial of d_p and dx per column chunk (O(n_chunks N H)), summed
    afterwards. ``chunk`` is a multiple of ``block`` (both block sizes), so no tile straddles regions.
    The kernel runs the last column chunk's masked tiles past N (112 x 5 = 560 columns at N = 512 would
    waste 9% of the pass), so the most chunks from n_max down to n_max / 2 whose overhang is at most
    N / 32 are taken, else the least overhang."""
    n_max = max(1, math.isqrt(max(1, BACKWARD_PROGRAMS // B) // 2))
    options = []
    for n in range(n_max, max(1, n_max // 2) - 1, -1):
        chunk = triton.cdiv(triton.cdiv(N, n), block) * block
        options.append((chunk, triton.cdiv(N, chunk)))
    for chunk, n_chunks in options:
        if n_chunks * chunk - N <= N / 32:
            return chunk, n_chunks
    return min(options, key=lambda o: o[0] * o[1] - N)


def _sum_partials(t: torch.Tensor) -> torch.Tensor:
    return t[0] if t.shape[0] == 1 else t.sum(0)


# _rel_windows_kernel's offsets per program and warps (sm_90a: 0 spills at every H; 4 warps spilled 20 B at 256)
REL_SUM_BLOCK, REL_SUM_WARPS = 16, 8


def _rel_gradient(windows: torch.Tensor, N: int, K: int, own_chunk: int, other_chunk: int, n_other_chunks: int
                  ) -> torch.Tensor:
    """d rel, (2K + 1, H), from the rows-i pass's per-region windows: summed per unclipped offset o = j - i
    by _rel_windows_kernel, then folded like the forward's clip(o, -K, K) + K (every o <= -K into row 0,
    every o >= K into row 2K)."""
    B, n_regions, _, H = windows.shape
    by_offset = torch.empty(2 * N - 1, H, dtype=torch.float32, device=windows.device)
    cols = H if H in SUPPORTED_HIDDEN else RECT_K_CHUNK  # columns per program (rectangular H_e: by chunks)
    _rel_windows_kernel[(triton.cdiv(2 * N - 1, REL_SUM_BLOCK), H // cols)](
        windows, by_offset, B, N, own_chunk, other_chunk, n_other_chunks, n_regions, H=cols, BLOCK_O=REL_SUM_BLOCK,
        HE=H, num_warps=REL_SUM_WARPS, num_stages=NUM_STAGES)
    return fold_offset_sums(by_offset, N, K)


def fold_offset_sums(by_offset: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """d rel, (2K + 1, H), from d_z summed per unclipped offset o = j - i ((2N - 1, H), row o + N - 1),
    folded like the forward's row clip(o, -K, K) + K: every o <= -K into row 0, every o >= K into row 2K."""
    H = by_offset.shape[1]
    if K >= N - 1:  # no pair is clipped: offsets -(N-1)..N-1 are rows K-(N-1)..K+N-1
        table = torch.zeros(2 * K + 1, H, dtype=by_offset.dtype, device=by_offset.device)
        table[K - (N - 1): K + N] = by_offset
        return table
    if K == 0:  # a one-row table: rows 0 and 2K are the same row, every offset lands in it
        return by_offset.sum(0, keepdim=True)
    table = by_offset[N - 1 - K: N + K].clone()  # offsets -K..K
    table[0] = by_offset[: N - K].sum(0)
    table[2 * K] = by_offset[N - 1 + K:].sum(0)
    return table


def _backward_grid(B: int, N: int, H: int, dtype: torch.dtype, edge: int, widths: Optional[Tuple[int, int, int]] = None
                   ) -> Tuple[int, int, int, int]:
    """(programs per sample of the rows-i pass, of the rows-j pass (0: one pass), region chunk, n_chunks).
    ``widths``: (HE, HM, HX) when rectangular (the chunked one-pass kernel; H ignored)."""
    if widths is not None and not is_square(*widths):
        BI1, BJ1 = rect_bwd_config(widths[1], widths[2], dtype)[:2]
        chunk, n_chunks = _regions(N, B, max(BI1, BJ1))
        return n_chunks * n_chunks, 0, chunk, n_chunks
    BI1, BJ1, _ = block_sizes(H, dtype, "bwd_i")
    if bwd_passes(H, dtype) == 1:  # one pass over square regions, whatever the edge term
        chunk, n_chunks = _regions(N, B, max(BI1, BJ1))
        return n_chunks * n_chunks, 0, chunk, n_chunks
    BJ2 = block_sizes(H, dtype, "bwd_j")[1]
    n_ib = min(triton.cdiv(N, BI1), max(1, BACKWARD_PROGRAMS // B))
    n_jb = min(triton.cdiv(N, BJ2), max(1, BACKWARD_PROGRAMS // B))
    if edge != 2:
        return n_ib, n_jb, N, 1
    chunk, n_chunks = _regions(N, B, max(BI1, BJ1))
    return n_chunks * n_chunks, n_jb, chunk, n_chunks  # one program per region


def backward_workspace(B: int, N: int, H: int, dtype: torch.dtype, edge: int, EP: int = 16,
                       widths: Optional[Tuple[int, int, int]] = None) -> dict:
    """name -> (shape, zero-initialised?) of the fp32 buffers the fused backward allocates (besides the
    gradients themselves, d edge_attr and, in the weight dtype, the weight-gradient stage of
    programs x 2 x dw_stage x 16 x H: 64 MB at H = 256 bf16 with 512 programs): per-program
    weight-gradient partials (O(programs H^2), bounded), per-chunk partials of d_p / dx and the
    offset table's per-region windows (O(n_chunks B N H), no N^2 term and no (2K + 1) table per
    program). ``edge``: 0 none, 1 dense edge_attr, 2 offset table. ``widths``: (HE, HM, HX) when
    rectangular (H ignored): d_p / d_q / windows HE wide, pW2 (HE, HM), pW3 (HM, HX)."""
    HE, HM, HX = widths if widths is not None else (H, H, H)
    square = is_square(HE, HM, HX)
    n_ib, n_jb, chunk, n_chunks = _backward_grid(B, N, H, dtype, edge, None if square else widths)
    P, P2 = B * n_ib, B * n_jb
    one_pass = n_jb == 0
    chunked = one_pass and (not square or bwd_chunks(H, dtype) != (H, H))  # d_p added to by column chunks
    HS = max(HE, HM, HX)
    shapes = dict(d_p=((n_chunks, B, N, HE), chunked), dx_i_side=((n_chunks, B, N, 3), False),
                  # one pass: d_q and the j side of dx read-modify-written per tile, a partial per row chunk
                  d_q=((n_chunks, B, N, HE), True) if one_pass else ((1, B, N, HE), False),
                  dx_j_side=((n_chunks, B, N, 3), True) if one_pass else ((1, B, N, 3), False),
                  pW2=((P, HE, HM), True), pW3=((P if one_pass else P2, HM, HX), True),  # added to per dw_stage tiles
                  pvec=((P, 6, HS), one_pass), pvec2=((P2, 6, HS), False))  # one pass: added to per tile
    if chunked:  # the chunked kernel's per-program fp32 copy of d_r (read back by K chunks for d_r W2^T)
        BI1, BJ1 = (block_sizes(H, dtype, "bwd_i") if square else rect_bwd_config(HM, HX, dtype))[:2]
        shapes["scratch"] = ((P, BI1 * BJ1, HM), False)
    if edge == 1:
        shapes["pWe"] = ((P, EP, HE), True)
    if edge == 2:
        shapes["rel_windows"] = ((B, n_ib, 2 * chunk - 1, HE), True)  # d rel per region and offset
    return shapes


def _backward(meta, grad_m, grad_dx, x, p, q, mask_u8, scale, w_d, W2, b2, W3, b3, w4, edge_attr, W_e, rel,
              w_att, need_dea):
    from protdiff_fast.ops.egnn_triton_slab import backward_slab, use_slab_backward

    square = meta["square"]
    if square and use_slab_backward(meta["H"], W2.dtype):  # PROTDIFF_FAST_TRITON_BWD=slab: the row-slab scheme
        return backward_slab(meta, grad_m, grad_dx, x, p, q, mask_u8, scale, w_d, W2, b2, W3, b3, w4, edge_attr,
                             W_e, rel, w_att, need_dea)
    B, N, EP, K = (meta[k] for k in ("B", "N", "EP", "K"))
    HE, HM, HX = meta["HE"], meta["HM"], meta["HX"]
    H = meta["H"] if square else HM  # (rectangular: the key of the width-independent choices below)
    dev = x.device
    f32 = dict(dtype=torch.float32, device=dev)
    dtype = p.dtype  # the compute dtype (x may be float32 next to bf16/fp16 features)
    if square:
        BI1, BJ1, warps1 = block_sizes(H, dtype, "bwd_i")
        K_CHUNK, N_CHUNK = bwd_chunks(H, dtype)
    else:  # the chunked one-pass kernel (has_fused_backward)
        BI1, BJ1, warps1, K_CHUNK, N_CHUNK = rect_bwd_config(HM, HX, dtype)
    BI2, BJ2, warps2 = block_sizes(H, dtype, "bwd_j") if bwd_passes(H, dtype) == 2 else (BI1, BJ1, warps1)
    # programs per sample: enough to fill a GPU, few enough that the per-program (H, H) partials stay
    # small; each program loops over its share of the blocks (grid-stride), or owns one region of the
    # offset table's rows-i pass
    widths = (HE, HM, HX)
    n_ib, n_jb, chunk, n_chunks = _backward_grid(B, N, H, dtype, meta["EDGE"], widths)
    P, P2 = B * n_ib, B * n_jb
    shapes = backward_workspace(B, N, H, dtype, meta["EDGE"], EP, widths)
    ws = {name: (torch.zeros if zeroed else torch.empty)(shape, **f32) for name, (shape, zeroed) in shapes.items()}
    d_p, dx_i_side, d_q, dx_j_side = ws["d_p"], ws["dx_i_side"], ws["d_q"], ws["dx_j_side"]
    pW2, pW3, pvec, pvec2 = ws["pW2"], ws["pW3"], ws["pvec"], ws["pvec2"]
    pWe = ws.get("pWe", pvec)
    windows = ws.get("rel_windows", pvec)
    d_ea = torch.empty_like(edge_attr) if need_dea else x
    chunk_i, chunk_j = dw_chunk(H, dtype, "bwd_i"), dw_chunk(H, dtype, "bwd_j")
    T = dw_stage(H, dtype)
    one_pass = n_jb == 0
    HS = max(HE, HM, HX)  # the stage's row length
    if T > 1:  # the A and G operands, T tiles per program (two passes run one after the other, one stage)
        stage = torch.empty(max(P * BI1 * BJ1 * (4 if one_pass else 2), P2 * BI2 * BJ2 * 2) * T * HS,
                            dtype=W3.dtype, device=dev)
    else:  # rows-j scratch for a chunked dW3
        stage = torch.empty(P2, BI2 * BJ2, H, dtype=W3.dtype, device=dev) if chunk_j < H else x
    dummy = x
    common = (x, p, q, mask_u8, scale, w_d, W2, b2, W3, b3, w4,
              edge_attr if edge_attr is not None else dummy, W_e if W_e is not None else dummy,
              rel if rel is not None else dummy, w_att if w_att is not None else dummy, meta["b_att"],
              grad_m, grad_dx)
    chunked = one_pass and (not square or (K_CHUNK, N_CHUNK) != (H, H))
    consts = dict(EP=EP, EDGE=meta["EDGE"],
                  ATTENTION=w_att is not None, TANH=meta["tanh"], NORMALIZE=meta["normalize"],
                  NEED_DEA=need_dea, PRECISION=_precision(dtype),
                  PRECISION_BWD=_precision(torch.float32) if dtype == torch.float32 else "tf32",
                  UPCAST=_interpreting() and dtype != torch.float32, FAST=_fast_sigmoid(dtype),
                  DW_STAGE=T, FLUSH_ROWS=BWD_CHUNKED_FLUSH_ROWS if chunked else flush_rows(H))
    if chunked:
        _egnn_bwd_chunked_kernel[(n_ib, B)](*common, d_p, dx_i_side, d_q, dx_j_side, d_ea, pW2, pW3, pvec, pWe,
                                            windows, stage, ws["scratch"],
                                            N, meta["E"], K, meta["eps"], chunk, chunk, n_chunks, n_ib,
                                            HE=HE, HM=HM, HX=HX, HS=HS, HX_CHUNK=hx_chunk(HX, N_CHUNK),
                                            BI=BI1, BJ=BJ1, W_REL=triton.next_power_of_2(BI1 + BJ1 - 1),
                                            K_CHUNK=K_CHUNK, N_CHUNK=N_CHUNK, num_warps=warps1,
                                            num_stages=bwd_chunked_stages(), **consts)
    else:
        _egnn_bwd_kernel[(n_ib, B)](*common, d_p, dx_i_side, d_q, dx_j_side, d_ea, pW2, pW3, pvec, pWe, windows,
                                    stage if T > 1 else x,
                                    N, meta["E"], K, meta["eps"], chunk, chunk, n_chunks, n_ib,
                                    H=H, ROWS_ARE_I=True, BI=BI1, BJ=BJ1,
                                    W_REL=triton.next_power_of_2(BI1 + BJ1 - 1), DW_CHUNK=chunk_i,
                                    num_warps=warps1, num_stages=NUM_STAGES, BOTH=one_pass, **consts)
    if not one_pass:
        _egnn_bwd_kernel[(n_jb, B)](*common, d_q, dx_j_side, d_q, dx_j_side, d_ea, pW2, pW3, pvec2, pWe, windows, stage,
                                    N, meta["E"], K, meta["eps"], N, N, 1, n_jb,
                                    H=H, ROWS_ARE_I=False, BI=BI2, BJ=BJ2,
                                    W_REL=triton.next_power_of_2(BI2 + BJ2 - 1), DW_CHUNK=chunk_j,
                                    num_warps=warps2, num_stages=NUM_STAGES, **consts)
    vec = pvec.sum(0)
    vec2 = vec if one_pass else pvec2.sum(0)
    return dict(
        x=_sum_partials(dx_i_side) + _sum_partials(dx_j_side), p=_sum_partials(d_p), q=_sum_partials(d_q),
        w_d=vec[3, :HE], W2=pW2.sum(0), b2=vec[0, :HM],
        W3=pW3.sum(0), b3=vec2[1, :HX], w4=vec2[2, :HX], w_att=vec[4, :HM], b_att=vec[5].sum(),
        W_e=pWe.sum(0)[: meta["E"]] if meta["EDGE"] == 1 else None,
        rel=_rel_gradient(windows, N, K, chunk, chunk, n_chunks) if meta["EDGE"] == 2 else None,
        edge_attr=d_ea if need_dea else None,
    )


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------
_INPUTS = ("x", "p", "q", "w_d", "W2", "b2", "W3", "b3", "w4", "edge_attr", "W_e", "rel", "w_att", "b_att")


class _EgnnPairAggregateTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p, q, w_d, W2, b2, W3, b3, w4, edge_attr, W_e, rel, w_att, b_att, mask_u8, scale, flags):
        meta = _launch_meta(x, p, W2, W3, edge_attr, rel, flags)
        meta["b_att"] = 0.0 if b_att is None else float(b_att)
        tensors = [None if t is None else t.detach().contiguous()
                   for t in (x, p, q, w_d, W2, b2, W3, b3, w4, edge_attr, W_e, rel, w_att)]
        m_i, dx_i = _forward(meta, tensors[0], tensors[1], tensors[2], mask_u8, scale, *tensors[3:])
        ctx.save_for_backward(*[t for t in tensors if t is not None], mask_u8, scale)
        ctx.present = [t is not None for t in tensors]
        ctx.meta = meta
        ctx.b_att_like = b_att
        return m_i, dx_i

    @staticmethod
    @first_order_backward("triton")
    def backward(ctx, grad_m, grad_dx):
        saved = list(ctx.saved_tensors)
        scale, mask_u8 = saved.pop(), saved.pop()
        it = iter(saved)
        t = [next(it) if present else None for present in ctx.present]
        x, p = t[0], t[1]
        B, N, _ = x.shape
        meta = ctx.meta
        f32 = dict(dtype=torch.float32, device=x.device)
        grad_m = torch.zeros(B, N, meta["HM"], **f32) if grad_m is None else grad_m.to(torch.float32).contiguous()
        grad_dx = torch.zeros(B, N, 3, **f32) if grad_dx is None else grad_dx.to(torch.float32).contiguous()
        need_dea = t[9] is not None and ctx.needs_input_grad[9]  # O(N^2 E): only when asked
        if not has_fused_backward(meta["HE"], p.dtype, (meta["HE"], meta["HM"], meta["HX"])):
            return (*_backward_by_reference(ctx, t, mask_u8, grad_m, grad_dx), None, None, None)
        grads = _backward(ctx.meta, grad_m, grad_dx, x, p, t[2], mask_u8, scale, *t[3:], need_dea=need_dea)
        out = []
        for k, name in enumerate(_INPUTS):
            g = grads.get(name)
            like = ctx.b_att_like if name == "b_att" else t[k]
            if g is None or like is None or not ctx.needs_input_grad[k]:
                out.append(None)
            else:
                out.append(g.to(like.dtype).reshape(like.shape))
        return (*out, None, None, None)


def _backward_by_reference(ctx, t, mask_u8, grad_m, grad_dx):
    """The gradients where the fused backward does not run (fp32 at H = 256 with the two-pass scheme,
    PROTDIFF_FAST_TRITON_BWD_PASSES=2: its whole W2 / W3 operands need 256 KB of shared memory): recompute the forward through the reference implementation in fp32
    on the saved inputs and differentiate it. Correct, but O(B N^2 H) memory and time like the
    reference itself: fp32 training at H = 256 is memory-bound this way (bf16 is fused)."""
    meta = ctx.meta
    like = list(t) + [ctx.b_att_like]
    with torch.enable_grad():
        leaves = [None if v is None else v.detach().to(torch.float32).requires_grad_(bool(ctx.needs_input_grad[k]))
                  for k, v in enumerate(like)]
        m_i, dx_i = egnn_pair_aggregate_reference(
            *leaves[:9], mask=mask_u8.bool(), edge_attr=leaves[9], W_e=leaves[10], rel=leaves[11],
            w_att=leaves[12], b_att=leaves[13], normalize=NORMALIZE_OPTIONS[meta["normalize"]], tanh=meta["tanh"],
            coords_agg=meta["coords_agg"], eps=meta["eps"])
        wanted = [k for k, leaf in enumerate(leaves) if leaf is not None and leaf.requires_grad]
        grads = torch.autograd.grad((m_i, dx_i), [leaves[k] for k in wanted], (grad_m, grad_dx), allow_unused=True)
    out = [None] * len(_INPUTS)
    for k, g in zip(wanted, grads):
        out[k] = torch.zeros_like(like[k]) if g is None else g.to(like[k].dtype).reshape(like[k].shape)
    return out


def _check_int32_offsets(B: int, N: int, HE: int, HM: int, HX: int, dtype: torch.dtype, edge: int,
                         backward: bool) -> None:
    """ValueError where a buffer the kernels index with 32-bit offsets would pass 2^31 elements (p, q, m_i,
    and the backward's per-chunk partials of d_p / d_q and offset windows): silent garbage otherwise."""
    widths = (HE, HM, HX)
    limit = B * N * max(widths)
    where = f"B N max(H_e, M, H_x) = {limit}"
    if backward and has_fused_backward(HE, dtype, widths):
        H = HE if is_square(*widths) else None
        _, _, chunk, n_chunks = _backward_grid(B, N, H, dtype, edge, None if H else widths)
        if n_chunks * B * N * HE > limit:
            limit, where = n_chunks * B * N * HE, f"the backward's partials, {n_chunks} x B N H_e = {n_chunks * B * N * HE}"
    if limit >= 2 ** 31:
        raise ValueError(f"the triton kernels index with 32-bit offsets, and {where} elements pass 2^31 "
                         f"(B = {B}, N = {N}, widths {widths}); use a smaller batch or narrower widths")


def egnn_pair_aggregate_triton(
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
    normalize: bool = False,
    tanh: bool = False,
    coords_agg: str = "mean",
    eps: float = 1e-8,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(m_i, dx_i) of the fused-op contract, computed by the Triton kernels (differentiable)."""
    if x.device.type != "cuda" and not _interpreting():
        raise ValueError(f"x: the triton backend needs CUDA tensors (or TRITON_INTERPRET=1), got device {x.device}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x: the triton backend runs float32, bfloat16 or float16, got {x.dtype} "
                        "(use backend='cpu' or 'reference' for float64)")
    N = x.shape[1] if x.dim() == 3 else 0
    if edge_attr is not None and N * N * edge_attr.shape[-1] >= 2 ** 31:  # in-sample offsets are int32
        raise ValueError(f"edge_attr: N^2 E = {N * N * edge_attr.shape[-1]} elements per sample exceed the triton "
                         "kernels' 2^31 limit; use the relative-offset table (rel=) or fewer edge features")
    given = mask is not None
    mask, b_att = check_egnn_pair_aggregate_inputs(
        x, p, q, w_d, W2, b2, W3, b3, w4, mask=mask, edge_attr=edge_attr, W_e=W_e, rel=rel,
        w_att=w_att, b_att=b_att, coords_agg=coords_agg, eps=eps,
    )
    if given:  # the kernels mask the pair sums; padding rows of 1e20 or NaN would still reach them
        x, p, q, edge_attr = zero_padding(mask, x, p, q, edge_attr)
    _check_rect_widths(p.shape[-1], W2.shape[1], W3.shape[1])  # (the shapes agree: checked above)
    _check_int32_offsets(x.shape[0], N, p.shape[-1], W2.shape[1], W3.shape[1], p.dtype, _edge_mode(edge_attr, rel),
                         backward=torch.is_grad_enabled() and any(
                             t is not None and t.requires_grad
                             for t in (x, p, q, w_d, W2, b2, W3, b3, w4, edge_attr, W_e, rel, w_att, b_att)))
    if normalize not in (True, False, "clamp"):
        raise ValueError(f"normalize: the triton kernels implement True, False and 'clamp', got {normalize!r}")
    # the kernels' NORMALIZE: 0 none, 1 stopgrad length + eps, 2 "clamp" (max(length, eps), no stopgrad)
    flags = dict(normalize=NORMALIZE_MODES[normalize], tanh=bool(tanh), eps=float(eps), coords_agg=coords_agg)
    scale = _coord_scale(mask, coords_agg, torch.float32).reshape(-1).contiguous()
    mask_u8 = mask.to(torch.uint8).contiguous()
    return _EgnnPairAggregateTriton.apply(x, p, q, w_d, W2, b2, W3, b3, w4, edge_attr, W_e, rel, w_att, b_att,
                                          mask_u8, scale, flags)
