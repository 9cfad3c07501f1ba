r"""The fused EGNN backward by row slabs: a Triton pair map per slab, then tensor-core GEMMs and reductions.

An alternative to the one-pass backward of :mod:`protdiff_fast.ops.egnn_triton` (same gradients, same
contract), chosen with ``PROTDIFF_FAST_TRITON_BWD=slab``. Why it exists: the first H200 run timed the
one-pass backward at ~34x the forward for ~3x its arithmetic (B=8 N=512 H=128 bf16: 45 ms against 1.3
ms), and its H = 256 unchunked variant (4x the products per pair) barely slower than H = 128 chunked:
the time goes to each 16-pair tile's serial chain of read-modify-writes of per-program partials,
barriers and weight-gradient staging, not to arithmetic. This scheme has no cross-program reduction
inside a kernel at all.

For each slab of SI rows i (all N columns j, all B samples; S = B SI N pairs), one kernel maps every
pair tile, recomputing the forward and running the chain backwards in registers:

    z_ij = p_i + q_j + w_d d2_ij + e_ij       a = silu(z)          r = a W2 + b2      m0 = silu(r)
    g = sigmoid(m0 . w_att + b_att)           m = m0 g             t = m W3 + b3      phi = silu(t) . w4 [tanh]
    d_phi = C v inv (gdx_i . u_ij) [(1 - phi^2)]                   d_t = d_phi w4 silu'(t)
    d_m = d_t W3^T + v gm_i                   (gate: d_m0 = d_m g + d_gate w_att)      d_r = d_m0 silu'(r)
    d_z = (d_r W2^T) silu'(z)

and stores the slab's a, m, d_t, d_r, d_z ([S, H] each, the weights' dtype), plus per-program sums of
the vector gradients (b2, b3, w4, w_d, w_att, b_att) and of dx (du_ij = C v inv phi gdx_i + 2 (d_z . w_d)
u_ij: the i side summed over the program's columns, the j side over its rows). Torch then finishes the
slab with dense ops:

    dW2 += a^T d_r,  dW3 += m^T d_t           two [H, S] x [S, H] GEMMs (cuBLAS; fp32 accumulation)
    d_p[slab] = sum_j d_z,  d_q += sum_i d_z  reductions of d_z
    d_rel  += d_z summed per offset j - i     (a skewed view: no atomics), dW_e += e^T d_z, d_e = d_z W_e^T
    dx     += the programs' partials of dx, summed

Where whole weights do not fit in shared memory (H = 256 in bf16, H = 128 in fp32: SLAB_MAX_HIDDEN,
_SLAB_CHUNKS) the pair map loads W2 by rows and W3 by columns inside its products
(_egnn_bwd_slab_chunked_kernel, one more H x H product per pair: t is recomputed). fp32 at H = 256 keeps
the default scheme.

Memory: the slab workspace is 5 S H elements; SI is chosen so that S is about SLAB_PAIRS (at least one
row per sample), so extra memory stays O(B N H) (plus a constant), never O(N^2). Every reduction is
a fixed-order torch op or a program-owned partial row: deterministic.

Not timed on a GPU yet: ``benchmarks/gpu_profile_bwd.py``'s variant ``slab`` compares it with the
default on the next lease.
"""
from __future__ import annotations

import os
from typing import Tuple

import torch
import triton
import triton.language as tl

from protdiff_fast.ops.egnn_triton import (_accumulate, _cast, _chunks_from_env, _direction_scale_grad,
                                           _dsilu, _fast_sigmoid, _interpreting,
                                           _load_rows, _load_xyz, _mm, _precision, _preact_cols, _sigmoid,
                                           _silu_parts, fold_offset_sums)

# pairs per slab (B * SI * N): ~1K tiles of 64 pairs, enough to fill a GPU; workspace 5 x 2^16 x H
# elements (84 MB at H = 128 in bf16)
SLAB_PAIRS = 1 << 16
# j-blocks of BLOCK_J columns per program (slab_tiles)
SLAB_TILES = 8
# H -> (BLOCK_I, BLOCK_J, num_warps) of the pair map, from sm_90a compiles (scripts/compile_egnn_triton.py,
# kernel "slab", ProtDiff's flags): H = 128 bf16 1 x 16 x 8 253 registers, 0 B spilled, 136 KB shared (W2, W3
# and their transposes, held across the program's tiles); 2 x 16 x 8 504 B, 1 x 32 x 8 252 B, 1 x 16 x 4 204 B.
# H = 64 bf16 / fp32 1 x 16 x 8 0 B (2 x 16 x 8 0 / 92 B); H = 32 1 x 16 x 4 0 B. Larger tiles spill: the
# [M, H] fp32 tiles r, t, d_t, d_m live at once.
_SLAB_BLOCKS = {16: (1, 16, 4), 32: (1, 16, 4), 64: (1, 16, 8), 128: (1, 16, 8), 256: (1, 16, 8)}
# (H, fp32?) -> (K_CHUNK, N_CHUNK) of the chunked pair map (slab_chunks), where whole weights do not fit.
# sm_90a, 1 x 16 x 8, ProtDiff's flags: H = 256 bf16 (64, 64) 241 registers, 0 B, 42 KB shared ((16, 64),
# (32, 32), (32, 64) 0 B too; 2 x 16 x 8 spills 0.6 KB); fp32 H = 128 (32, 32) 0 B ((16, 32) 84 B); fp32
# H = 256 spills 0.6-1 KB at every chunking tried: not supported
_SLAB_CHUNKS = {(256, False): (64, 64), (128, True): (32, 32)}
# (H, fp32?) of the chunked pair map that spill with attention on sm_90a (the gate keeps one more [M, H]
# tile live): H = 256 bf16 24-136 B at every chunking tried ((64, 64): 136 / 112 B for attention with the
# offset table / dense edges), fp32 H = 128 12-20 B at (32, 32); ProtDiff's flags and no flags: 0 B
SLAB_KNOWN_SPILLS = {(256, False), (128, True)}
# the largest H per weight dtype. Whole W2, W3 (and transposes) in shared memory need 540 KB for fp32 at
# H = 128 and 536 KB for bf16 at H = 256, over the 227 KB an H100 block may use: there the weights are
# loaded by chunks (_SLAB_CHUNKS, _egnn_bwd_slab_chunked_kernel); fp32 at H = 256 spills even so
SLAB_MAX_HIDDEN = {torch.float32: 128, torch.bfloat16: 256, torch.float16: 256}


def use_slab_backward(H: int, dtype: torch.dtype) -> bool:
    """``PROTDIFF_FAST_TRITON_BWD`` = "slab" selects this scheme ("" or "default": the one-pass kernels) where
    it fits (H <= SLAB_MAX_HIDDEN[dtype]); larger H keep the default scheme."""
    env = os.environ.get("PROTDIFF_FAST_TRITON_BWD", "")
    if env not in ("", "default", "slab"):
        raise ValueError(f"PROTDIFF_FAST_TRITON_BWD: 'default' or 'slab', got {env!r}")
    return env == "slab" and H <= SLAB_MAX_HIDDEN[dtype]


def slab_rows(B: int, N: int) -> int:
    """SI, rows i per slab: S = B SI N pairs about SLAB_PAIRS (``PROTDIFF_FAST_TRITON_SLAB_PAIRS`` overrides)."""
    pairs = int(os.environ.get("PROTDIFF_FAST_TRITON_SLAB_PAIRS", SLAB_PAIRS))
    if pairs < 1:
        raise ValueError(f"PROTDIFF_FAST_TRITON_SLAB_PAIRS: a number of pairs >= 1, got {pairs}")
    return max(1, min(N, pairs // (B * N)))


def slab_bwd_lowp(dtype: torch.dtype) -> bool:
    """Whether the backward products d_t W3^T and d_r W2^T take d_t, d_r rounded to bf16 / fp16 (as the
    low-precision reference's autograd does) instead of fp32 operands on TF32: half the operand size.
    ``PROTDIFF_FAST_TRITON_SLAB_LOWP`` = 0 / 1 overrides it."""
    if dtype == torch.float32:
        return False
    env = os.environ.get("PROTDIFF_FAST_TRITON_SLAB_LOWP")
    if env not in (None, "", "0", "1"):
        raise ValueError(f"PROTDIFF_FAST_TRITON_SLAB_LOWP: 0 or 1, got {env!r}")
    return env != "0"


def slab_workspace_bytes(B: int, N: int, H: int, dtype: torch.dtype) -> int:
    """Bytes of the slab workspace: a, m, d_t, d_r, d_z in the weights' dtype per pair (the partials of dx and
    of the vector gradients, O(B N) and O(programs H), not counted)."""
    pairs = B * slab_rows(B, N) * N
    return pairs * 5 * H * torch.finfo(dtype).bits // 8


def slab_tiles(n_jb: int) -> int:
    """j-blocks per program (the weights are loaded once per program): SLAB_TILES, or fewer when the row
    has fewer blocks. ``PROTDIFF_FAST_TRITON_SLAB_TILES`` overrides it (sweeps)."""
    tiles = int(os.environ.get("PROTDIFF_FAST_TRITON_SLAB_TILES", SLAB_TILES))
    if tiles < 1:
        raise ValueError(f"PROTDIFF_FAST_TRITON_SLAB_TILES: a number of tiles >= 1, got {tiles}")
    return min(tiles, n_jb)


def slab_chunks(H: int, dtype: torch.dtype) -> Tuple[int, int]:
    """(K_CHUNK, N_CHUNK): W2's rows and W3's columns per chunk of the chunked pair map, (H, H) = whole
    weights (_egnn_bwd_slab_kernel). ``PROTDIFF_FAST_TRITON_SLAB_CHUNKS`` = "K,N" overrides it (tests run the
    chunked kernel at small H)."""
    env = _chunks_from_env("PROTDIFF_FAST_TRITON_SLAB_CHUNKS", H)
    if env:
        return env
    return _SLAB_CHUNKS.get((H, dtype == torch.float32), (H, H))


def slab_blocks(H: int) -> Tuple[int, int, int]:
    env = os.environ.get("PROTDIFF_FAST_TRITON_SLAB_BLOCKS")  # "BI,BJ,WARPS": sweeps, and tests of the GPU shape
    if env:
        bi, bj, w = (int(v) for v in env.split(","))
        return bi, bj, w
    if _interpreting():  # the interpreter's cost is per program: large tiles
        return 16, 32, 4
    return _SLAB_BLOCKS[H]


@triton.jit
def _slab_rows(mask_ptr, x_ptr, gdx_ptr, b, N, i0, SI, pid_i, BI: tl.constexpr):
    """The program's BI rows of the slab: local and global index, validity, mask, x_i, gdx_i."""
    li = pid_i * BI + tl.arange(0, BI)
    i = i0 + li
    i_ok = (li < SI) & (i < N)
    i_safe = tl.where(i_ok, i, N)  # rows past the slab read as padding (masked loads of row N)
    mi = (tl.load(mask_ptr + b * N + i_safe, mask=i_ok, other=0) != 0) & i_ok
    xi0, xi1, xi2 = _load_xyz(x_ptr, b * N * 3, i_safe, N)
    g0, g1, g2 = _load_xyz(gdx_ptr, b * N * 3, i_safe, N)
    return li, i, i_ok, i_safe, mi, xi0, xi1, xi2, g0, g1, g2


@triton.jit
def _slab_tile(mask_ptr, x_ptr, ea_ptr, b, N, E, SI, jb, li, i, i_ok, i_safe, mi, xi0, xi1, xi2,
               BI: tl.constexpr, BJ: tl.constexpr, EP: tl.constexpr, EDGE: tl.constexpr):
    """Tile (rows i, block jb of columns j): j, its validity, v_ij as floats [M], u_ij and d2_ij [BI, BJ],
    the dense edge features [M, EP] (EDGE 1), the pairs' workspace rows ((b SI + li) N + j, 64 bits) [M]
    and which of them are stored."""
    M: tl.constexpr = BI * BJ
    j = jb * BJ + tl.arange(0, BJ)
    j_ok = j < N
    mj = (tl.load(mask_ptr + b * N + j, mask=j_ok, other=0) != 0) & j_ok
    v = mi[:, None] & mj[None, :] & (i[:, None] != j[None, :])  # real pair, not the self pair
    vf = tl.reshape(v.to(tl.float32), (M,))
    xj0, xj1, xj2 = _load_xyz(x_ptr, b * N * 3, j, N)
    u0 = xi0[:, None] - xj0[None, :]  # u_ij = x_i - x_j
    u1 = xi1[:, None] - xj1[None, :]
    u2 = xi2[:, None] - xj2[None, :]
    d2 = u0 * u0 + u1 * u1 + u2 * u2
    e = tl.zeros((M, EP), dtype=tl.float32)
    if EDGE == 1:
        ecol = tl.arange(0, EP)
        pair_ok = i_ok[:, None] & j_ok[None, :]
        pair_off = i_safe[:, None] * N + j[None, :]
        e3 = tl.load(ea_ptr + b.to(tl.int64) * N * N * E + pair_off[:, :, None] * E + ecol[None, None, :],
                     mask=pair_ok[:, :, None] & (ecol < E)[None, None, :], other=0.0)
        e = tl.reshape(e3.to(tl.float32), (M, EP))
    rows = tl.reshape((b * SI + li[:, None]).to(tl.int64) * N + j[None, :], (M,))
    ok = tl.reshape(i_ok[:, None] & j_ok[None, :], (M,))
    return j, j_ok, vf, u0, u1, u2, d2, e, rows, ok


@triton.jit
def _slab_dx(coef_u, d_d2, u0, u1, u2, g0, g1, g2, dxj_ptr, pid_i, b, N, j, j_ok):
    """d u_ij = coef_u gdx_i + 2 d_d2 u_ij (+ to x_i, - to x_j): stores the tile's j side in the program's
    own rows, returns the i side summed over the tile's columns."""
    du0 = coef_u * g0[:, None] + 2.0 * d_d2 * u0
    du1 = coef_u * g1[:, None] + 2.0 * d_d2 * u1
    du2 = coef_u * g2[:, None] + 2.0 * d_d2 * u2
    dxj = dxj_ptr + ((pid_i * tl.num_programs(2) + b) * N + j) * 3
    tl.store(dxj + 0, -tl.sum(du0, axis=0), mask=j_ok)
    tl.store(dxj + 1, -tl.sum(du1, axis=0), mask=j_ok)
    tl.store(dxj + 2, -tl.sum(du2, axis=0), mask=j_ok)
    return tl.sum(du0, axis=1), tl.sum(du1, axis=1), tl.sum(du2, axis=1)


@triton.jit
def _egnn_bwd_slab_kernel(
    x_ptr, p_ptr, q_ptr, mask_ptr, scale_ptr,
    w_d_ptr, W2_ptr, b2_ptr, W3_ptr, b3_ptr, w4_ptr,
    ea_ptr, We_ptr, rel_ptr, watt_ptr, b_att,
    gm_ptr, gdx_ptr,  # (B, N, H), (B, N, 3) fp32 upstream gradients
    a_ptr, m_ptr, dt_ptr, dr_ptr, dz_ptr,  # (B, SI, N, H) each, the weights' dtype: the slab's GEMM operands and d_z
    dxi_ptr,  # (column groups, B, SI, 3) fp32: the i side of dx, sum over the program's columns j
    dxj_ptr,  # (row blocks, B, N, 3) fp32: the j side of dx, sum over the program's rows i
    pvec_ptr,  # (programs, 6, H) fp32: b2, b3, w4, w_d, w_att, b_att (column 0) per program
    N, E, K, eps, i0, SI, TILES,  # TILES: j-blocks per program
    H: tl.constexpr, EP: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr,
    EDGE: tl.constexpr, ATTENTION: tl.constexpr, TANH: tl.constexpr, NORMALIZE: tl.constexpr,
    PRECISION: tl.constexpr, PRECISION_BWD: tl.constexpr, UPCAST: tl.constexpr, FAST: tl.constexpr,
    BWD_LOWP: tl.constexpr,  # the two backward products with d_t / d_r rounded to the weights' dtype
):
    """One program: BI rows i of the slab x TILES blocks of BJ columns j, a tile at a time. Tiles share
    nothing but the weights (loaded once) and the program's vector-gradient sums: no read-modify-write."""
    M: tl.constexpr = BI * BJ
    pid_j = tl.program_id(0)
    pid_i = tl.program_id(1)
    b = tl.program_id(2)
    prog = (b * tl.num_programs(1) + pid_i) * tl.num_programs(0) + pid_j
    hcol = tl.arange(0, H)
    li, i, i_ok, i_safe, mi, xi0, xi1, xi2, g0, g1, g2 = _slab_rows(mask_ptr, x_ptr, gdx_ptr, b, N, i0, SI, pid_i, BI)
    C = tl.load(scale_ptr + b)
    w_d = tl.load(w_d_ptr + hcol).to(tl.float32)
    b2 = tl.load(b2_ptr + hcol).to(tl.float32)
    b3 = tl.load(b3_ptr + hcol).to(tl.float32)
    w4 = tl.load(w4_ptr + hcol).to(tl.float32)
    W2 = tl.load(W2_ptr + hcol[:, None] * H + hcol[None, :])
    W3 = tl.load(W3_ptr + hcol[:, None] * H + hcol[None, :])
    w_att = tl.zeros((H,), dtype=tl.float32)
    if ATTENTION:
        w_att = tl.load(watt_ptr + hcol).to(tl.float32)
    sum_b2 = tl.zeros((H,), dtype=tl.float32)
    sum_b3 = tl.zeros((H,), dtype=tl.float32)
    sum_w4 = tl.zeros((H,), dtype=tl.float32)
    sum_wd = tl.zeros((H,), dtype=tl.float32)
    sum_watt = tl.zeros((H,), dtype=tl.float32)
    sum_batt = tl.zeros((M,), dtype=tl.float32)
    dxi0 = tl.zeros((BI,), dtype=tl.float32)
    dxi1 = tl.zeros((BI,), dtype=tl.float32)
    dxi2 = tl.zeros((BI,), dtype=tl.float32)
    jb_stop = tl.minimum(pid_j * TILES + TILES, tl.cdiv(N, BJ))
    for jb in range(pid_j * TILES, jb_stop):
        j, j_ok, vf, u0, u1, u2, d2, e, rows, ok = _slab_tile(mask_ptr, x_ptr, ea_ptr, b, N, E, SI, jb, li, i, i_ok,
                                                             i_safe, mi, xi0, xi1, xi2, BI, BJ, EP, EDGE)
        # -- z (rebuilt again for silu'(z) at the end rather than kept live through both products)
        p_i = _load_rows(p_ptr + b * N * H, i_safe, N, hcol, H).to(tl.float32)
        q_j = _load_rows(q_ptr + b * N * H, j, N, hcol, H).to(tl.float32)
        z3 = p_i[:, None, :] + q_j[None, :, :] + d2[:, :, None] * w_d[None, None, :]
        if EDGE == 2:  # offset table row clip(j - i, -K, K) + K
            k = tl.minimum(tl.maximum(j[None, :] - i[:, None], -K), K) + K
            z3 += tl.load(rel_ptr + k[:, :, None] * H + hcol[None, None, :]).to(tl.float32)
        z = tl.reshape(z3, (M, H))
        if EDGE == 1:  # dense edge_attr through W_e
            ecol = tl.arange(0, EP)
            W_e = tl.load(We_ptr + ecol[:, None] * H + hcol[None, :], mask=(ecol < E)[:, None], other=0.0)
            z += _mm(e, W_e, PRECISION, UPCAST)
        a = z * _sigmoid(z, FAST)
        ws = rows[:, None] * H + hcol[None, :]
        tl.store(a_ptr + ws, _cast(a, a_ptr.dtype.element_ty, UPCAST), mask=ok[:, None])
        # -- forward recomputed: r, m, t, phi
        r = _mm(a, W2, PRECISION, UPCAST) + b2[None, :]
        m0, sig_r = _silu_parts(r, FAST)
        g = tl.full((M,), 1.0, tl.float32)
        if ATTENTION:
            g = _sigmoid(tl.sum(m0 * w_att[None, :], axis=1) + b_att, FAST)
        m = _cast(m0 * g[:, None], W3_ptr.dtype.element_ty, UPCAST)  # the W3 product's A operand, also dW3's
        tl.store(m_ptr + ws, _cast(m, m_ptr.dtype.element_ty, UPCAST), mask=ok[:, None])
        t = _mm(m, W3, PRECISION, UPCAST) + b3[None, :]
        s, sig_t = _silu_parts(t, FAST)
        phi = tl.sum(s * w4[None, :], axis=1)  # [M]
        if TANH:
            phi = 2.0 * _sigmoid(2.0 * phi, FAST) - 1.0
        # -- the coordinate update's gradient
        inv = tl.full((BI, BJ), 1.0, tl.float32)
        if NORMALIZE == 1:
            inv = 1.0 / (tl.sqrt(d2) + eps)  # the length is detached
        elif NORMALIZE == 2:
            inv = 1.0 / tl.maximum(tl.sqrt(d2), eps)
        coef = C * inv * tl.reshape(vf, (BI, BJ))
        d_phi = tl.reshape(coef * (g0[:, None] * u0 + g1[:, None] * u1 + g2[:, None] * u2), (M,))
        coef_u = coef * tl.reshape(phi, (BI, BJ))  # dx_i = sum_j coef_u u_ij: d u_ij = coef_u gdx_i
        if NORMALIZE == 2:  # dL/dd2 through s(d2) (added to the distance's share once d_z exists)
            d_d2_scale = coef_u * (g0[:, None] * u0 + g1[:, None] * u1 + g2[:, None] * u2) * \
                _direction_scale_grad(d2, eps) / inv
        if TANH:
            d_phi = d_phi * (1.0 - phi * phi)
        d_t = d_phi[:, None] * w4[None, :] * _dsilu(t, sig_t)
        tl.store(dt_ptr + ws, _cast(d_t, dt_ptr.dtype.element_ty, UPCAST), mask=ok[:, None])
        sum_b3 += tl.sum(d_t, axis=0)
        sum_w4 += tl.sum(s * d_phi[:, None], axis=0)
        # -- d_m = d_t W3^T + v gm_i, through the gate, then d_r
        gm_i = _load_rows(gm_ptr + b * N * H, i_safe, N, hcol, H)
        if BWD_LOWP:
            d_m = _mm(d_t, tl.trans(W3), PRECISION, UPCAST)
        else:
            d_m = _mm(d_t, tl.trans(W3).to(tl.float32), PRECISION_BWD, False)
        d_m += tl.reshape(gm_i[:, None, :] * tl.reshape(vf, (BI, BJ))[:, :, None], (M, H))
        if ATTENTION:
            d_gate = tl.sum(d_m * m0, axis=1) * g * (1.0 - g)
            d_m = d_m * g[:, None] + d_gate[:, None] * w_att[None, :]
            sum_watt += tl.sum(m0 * d_gate[:, None], axis=0)
            sum_batt += d_gate
        d_r = d_m * _dsilu(r, sig_r)
        tl.store(dr_ptr + ws, _cast(d_r, dr_ptr.dtype.element_ty, UPCAST), mask=ok[:, None])
        sum_b2 += tl.sum(d_r, axis=0)
        # -- d_z = (d_r W2^T) silu'(z), z rebuilt
        z3 = p_i[:, None, :] + q_j[None, :, :] + d2[:, :, None] * w_d[None, None, :]
        if EDGE == 2:
            k2 = tl.minimum(tl.maximum(j[None, :] - i[:, None], -K), K) + K
            z3 += tl.load(rel_ptr + k2[:, :, None] * H + hcol[None, None, :]).to(tl.float32)
        z = tl.reshape(z3, (M, H))
        if EDGE == 1:
            ecol2 = tl.arange(0, EP)
            W_e2 = tl.load(We_ptr + ecol2[:, None] * H + hcol[None, :], mask=(ecol2 < E)[:, None], other=0.0)
            z += _mm(e, W_e2, PRECISION, UPCAST)
        if BWD_LOWP:
            d_a = _mm(d_r, tl.trans(W2), PRECISION, UPCAST)
        else:
            d_a = _mm(d_r, tl.trans(W2).to(tl.float32), PRECISION_BWD, False)
        d_z = d_a * _dsilu(z, _sigmoid(z, FAST))
        tl.store(dz_ptr + ws, _cast(d_z, dz_ptr.dtype.element_ty, UPCAST), mask=ok[:, None])
        sum_wd += tl.sum(d_z * tl.reshape(d2, (M,))[:, None], axis=0)
        d_d2 = tl.reshape(tl.sum(d_z * w_d[None, :], axis=1), (BI, BJ))
        if NORMALIZE == 2:
            d_d2 += d_d2_scale
        di0, di1, di2 = _slab_dx(coef_u, d_d2, u0, u1, u2, g0, g1, g2, dxj_ptr, pid_i, b, N, j, j_ok)
        dxi0 += di0
        dxi1 += di1
        dxi2 += di2
    dxi = dxi_ptr + ((pid_j * tl.num_programs(2) + b) * SI + li) * 3
    tl.store(dxi + 0, dxi0, mask=li < SI)
    tl.store(dxi + 1, dxi1, mask=li < SI)
    tl.store(dxi + 2, dxi2, mask=li < SI)
    vec = pvec_ptr + prog * 6 * H
    tl.store(vec + 0 * H + hcol, sum_b2)
    tl.store(vec + 1 * H + hcol, sum_b3)
    tl.store(vec + 2 * H + hcol, sum_w4)
    tl.store(vec + 3 * H + hcol, sum_wd)
    tl.store(vec + 4 * H + hcol, sum_watt)
    tl.store(vec + 5 * H + hcol, tl.where(hcol == 0, tl.sum(sum_batt, axis=0), 0.0))


@triton.jit
def _egnn_bwd_slab_chunked_kernel(
    x_ptr, p_ptr, q_ptr, mask_ptr, scale_ptr,
    w_d_ptr, W2_ptr, b2_ptr, W3_ptr, b3_ptr, w4_ptr,
    ea_ptr, We_ptr, rel_ptr, watt_ptr, b_att,
    gm_ptr, gdx_ptr,
    a_ptr, m_ptr, dt_ptr, dr_ptr, dz_ptr,
    dxi_ptr, dxj_ptr,
    pvec_ptr,  # zeroed: rows b3, w4, w_d are added to by column chunk, tile after tile
    N, E, K, eps, i0, SI, TILES,
    H: tl.constexpr, EP: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr,
    EDGE: tl.constexpr, ATTENTION: tl.constexpr, TANH: tl.constexpr, NORMALIZE: tl.constexpr,
    PRECISION: tl.constexpr, PRECISION_BWD: tl.constexpr, UPCAST: tl.constexpr, FAST: tl.constexpr,
    BWD_LOWP: tl.constexpr, K_CHUNK: tl.constexpr, N_CHUNK: tl.constexpr,
):
    """_egnn_bwd_slab_kernel with the weights never whole (H = 256, fp32 at 128): W2 by rows kc (z's
    columns), W3 by columns nc, loaded inside the loops; only r, m, d_m, d_r are whole [M, H] tiles:

        r    = b2 + sum_kc silu(z[:, kc]) W2[kc, :]           a's columns stored per chunk
        phi  = sum_nc silu(m W3[:, nc] + b3[nc]) . w4[nc]
        d_m  = v gm_i + sum_nc d_t[:, nc] W3[:, nc]^T        t's chunks recomputed, d_t's stored
        d_z[:, kc] = (d_r W2[kc, :]^T) silu'(z[:, kc])       z's chunks rebuilt, stored

    Five H x H products per pair (the whole-weight kernel: four). The vector gradients of chunked
    quantities (b3, w4, w_d) are read-modify-written in the program's own zeroed rows, a barrier per tile."""
    M: tl.constexpr = BI * BJ
    pid_j = tl.program_id(0)
    pid_i = tl.program_id(1)
    b = tl.program_id(2)
    prog = (b * tl.num_programs(1) + pid_i) * tl.num_programs(0) + pid_j
    vec = pvec_ptr + prog * 6 * H
    hcol = tl.arange(0, H)
    li, i, i_ok, i_safe, mi, xi0, xi1, xi2, g0, g1, g2 = _slab_rows(mask_ptr, x_ptr, gdx_ptr, b, N, i0, SI, pid_i, BI)
    C = tl.load(scale_ptr + b)
    b2 = tl.load(b2_ptr + hcol).to(tl.float32)
    w_att = tl.zeros((H,), dtype=tl.float32)
    if ATTENTION:
        w_att = tl.load(watt_ptr + hcol).to(tl.float32)
    sum_b2 = tl.zeros((H,), dtype=tl.float32)
    sum_watt = tl.zeros((H,), dtype=tl.float32)
    sum_batt = tl.zeros((M,), dtype=tl.float32)
    dxi0 = tl.zeros((BI,), dtype=tl.float32)
    dxi1 = tl.zeros((BI,), dtype=tl.float32)
    dxi2 = tl.zeros((BI,), dtype=tl.float32)
    jb_stop = tl.minimum(pid_j * TILES + TILES, tl.cdiv(N, BJ))
    for jb in range(pid_j * TILES, jb_stop):
        j, j_ok, vf, u0, u1, u2, d2, e, rows, ok = _slab_tile(mask_ptr, x_ptr, ea_ptr, b, N, E, SI, jb, li, i, i_ok,
                                                             i_safe, mi, xi0, xi1, xi2, BI, BJ, EP, EDGE)
        # -- r by K chunks of z
        r = tl.zeros((M, H), dtype=tl.float32) + b2[None, :]
        for k0 in tl.range(0, H, K_CHUNK):
            kc = k0 + tl.arange(0, K_CHUNK)
            z_c = _preact_cols(b, i_safe, j, N, d2, e, kc, p_ptr, q_ptr, w_d_ptr, We_ptr, rel_ptr, E, K,
                               H, EP, EDGE, PRECISION, UPCAST)
            a_c = z_c * _sigmoid(z_c, FAST)
            tl.store(a_ptr + rows[:, None] * H + kc[None, :], _cast(a_c, a_ptr.dtype.element_ty, UPCAST),
                     mask=ok[:, None])
            r += _mm(a_c, tl.load(W2_ptr + kc[:, None] * H + hcol[None, :]), PRECISION, UPCAST)
        m0, sig_r = _silu_parts(r, FAST)
        g = tl.full((M,), 1.0, tl.float32)
        if ATTENTION:
            g = _sigmoid(tl.sum(m0 * w_att[None, :], axis=1) + b_att, FAST)
        m = _cast(m0 * g[:, None], W3_ptr.dtype.element_ty, UPCAST)
        tl.store(m_ptr + rows[:, None] * H + hcol[None, :], _cast(m, m_ptr.dtype.element_ty, UPCAST), mask=ok[:, None])
        # -- phi by column chunks of W3
        phi = tl.zeros((M,), dtype=tl.float32)
        for n0 in tl.range(0, H, N_CHUNK):
            nc = n0 + tl.arange(0, N_CHUNK)
            t_c = _mm(m, tl.load(W3_ptr + hcol[:, None] * H + nc[None, :]), PRECISION, UPCAST) + \
                tl.load(b3_ptr + nc).to(tl.float32)[None, :]
            phi += tl.sum(t_c * _sigmoid(t_c, FAST) * tl.load(w4_ptr + nc).to(tl.float32)[None, :], axis=1)
        if TANH:
            phi = 2.0 * _sigmoid(2.0 * phi, FAST) - 1.0
        inv = tl.full((BI, BJ), 1.0, tl.float32)
        if NORMALIZE == 1:
            inv = 1.0 / (tl.sqrt(d2) + eps)
        elif NORMALIZE == 2:
            inv = 1.0 / tl.maximum(tl.sqrt(d2), eps)
        coef = C * inv * tl.reshape(vf, (BI, BJ))
        d_phi = tl.reshape(coef * (g0[:, None] * u0 + g1[:, None] * u1 + g2[:, None] * u2), (M,))
        coef_u = coef * tl.reshape(phi, (BI, BJ))
        if NORMALIZE == 2:  # dL/dd2 through s(d2) (added to the distance's share once d_z exists)
            d_d2_scale = coef_u * (g0[:, None] * u0 + g1[:, None] * u1 + g2[:, None] * u2) * \
                _direction_scale_grad(d2, eps) / inv
        if TANH:
            d_phi = d_phi * (1.0 - phi * phi)
        # -- d_m by column chunks of W3, t recomputed; d_t's columns stored
        gm_i = _load_rows(gm_ptr + b * N * H, i_safe, N, hcol, H)
        d_m = tl.reshape(gm_i[:, None, :] * tl.reshape(vf, (BI, BJ))[:, :, None], (M, H))
        for n0 in tl.range(0, H, N_CHUNK):
            nc = n0 + tl.arange(0, N_CHUNK)
            t_c = _mm(m, tl.load(W3_ptr + hcol[:, None] * H + nc[None, :]), PRECISION, UPCAST) + \
                tl.load(b3_ptr + nc).to(tl.float32)[None, :]
            sig_t = _sigmoid(t_c, FAST)
            w4_c = tl.load(w4_ptr + nc).to(tl.float32)
            d_t = d_phi[:, None] * w4_c[None, :] * _dsilu(t_c, sig_t)
            tl.store(dt_ptr + rows[:, None] * H + nc[None, :], _cast(d_t, dt_ptr.dtype.element_ty, UPCAST),
                     mask=ok[:, None])
            _accumulate(vec + 1 * H, nc, tl.sum(d_t, axis=0))  # b3
            _accumulate(vec + 2 * H, nc, tl.sum(t_c * sig_t * d_phi[:, None], axis=0))  # w4
            W3T_c = tl.load(W3_ptr + hcol[None, :] * H + nc[:, None])  # [N_CHUNK, H]
            if BWD_LOWP:
                d_m += _mm(d_t, W3T_c, PRECISION, UPCAST)
            else:
                d_m += _mm(d_t, W3T_c.to(tl.float32), PRECISION_BWD, False)
        if ATTENTION:
            d_gate = tl.sum(d_m * m0, axis=1) * g * (1.0 - g)
            d_m = d_m * g[:, None] + d_gate[:, None] * w_att[None, :]
            sum_watt += tl.sum(m0 * d_gate[:, None], axis=0)
            sum_batt += d_gate
        d_r = d_m * _dsilu(r, sig_r)
        tl.store(dr_ptr + rows[:, None] * H + hcol[None, :], _cast(d_r, dr_ptr.dtype.element_ty, UPCAST),
                 mask=ok[:, None])
        sum_b2 += tl.sum(d_r, axis=0)
        # -- d_z by K chunks
        d_d2 = tl.zeros((M,), dtype=tl.float32)
        d2_flat = tl.reshape(d2, (M,))
        for k0 in tl.range(0, H, K_CHUNK):
            kc = k0 + tl.arange(0, K_CHUNK)
            z_c = _preact_cols(b, i_safe, j, N, d2, e, kc, p_ptr, q_ptr, w_d_ptr, We_ptr, rel_ptr, E, K,
                               H, EP, EDGE, PRECISION, UPCAST)
            W2T_c = tl.load(W2_ptr + kc[None, :] * H + hcol[:, None])  # [H, K_CHUNK]
            if BWD_LOWP:
                d_a = _mm(d_r, W2T_c, PRECISION, UPCAST)
            else:
                d_a = _mm(d_r, W2T_c.to(tl.float32), PRECISION_BWD, False)
            d_z = d_a * _dsilu(z_c, _sigmoid(z_c, FAST))
            tl.store(dz_ptr + rows[:, None] * H + kc[None, :], _cast(d_z, dz_ptr.dtype.element_ty, UPCAST),
                     mask=ok[:, None])
            _accumulate(vec + 3 * H, kc, tl.sum(d_z * d2_flat[:, None], axis=0))  # w_d
            d_d2 += tl.sum(d_z * tl.load(w_d_ptr + kc).to(tl.float32)[None, :], axis=1)
        d_d2 = tl.reshape(d_d2, (BI, BJ))
        if NORMALIZE == 2:
            d_d2 += d_d2_scale
        di0, di1, di2 = _slab_dx(coef_u, d_d2, u0, u1, u2, g0, g1, g2, dxj_ptr, pid_i, b, N, j, j_ok)
        dxi0 += di0
        dxi1 += di1
        dxi2 += di2
        tl.debug_barrier()  # the next tile's read-modify-writes of the vector rows
    dxi = dxi_ptr + ((pid_j * tl.num_programs(2) + b) * SI + li) * 3
    tl.store(dxi + 0, dxi0, mask=li < SI)
    tl.store(dxi + 1, dxi1, mask=li < SI)
    tl.store(dxi + 2, dxi2, mask=li < SI)
    tl.store(vec + 0 * H + hcol, sum_b2)
    tl.store(vec + 4 * H + hcol, sum_watt)
    tl.store(vec + 5 * H + hcol, tl.where(hcol == 0, tl.sum(sum_batt, axis=0), 0.0))


def _gemm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 accumulation and an fp32 result (cuBLAS's bf16 GEMM with out_dtype where torch has it)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            return (a @ b).float()
    return a.float() @ b.float()  # the products of the rounded operands, as the tensor cores compute them


def _skewed_offset_sums(dz_rows: torch.Tensor, i0: int) -> Tuple[torch.Tensor, int]:
    """sum over b and rows i of the slab of d_z[b, i, j] by offset o = j - i: ([SI + N - 1, H] fp32, o of row 0).

    Row r of the slab is written at columns (SI - 1 - r) + j of a zeroed [SI, SI + N - 1] buffer (an
    as_strided view with row stride SI + N - 2), so column c holds offset c - (SI - 1) - i0 for every row."""
    SI, N, H = dz_rows.shape
    W = SI + N - 1
    buf = torch.zeros(SI * W * H, dtype=torch.float32, device=dz_rows.device)
    view = buf.as_strided((SI, N, H), ((W - 1) * H, H, 1), (SI - 1) * H)
    view.copy_(dz_rows)
    return buf.view(SI, W, H).sum(0), -(SI - 1) - i0


def backward_slab(meta, grad_m, grad_dx, x, p, q, mask_u8, scale, w_d, W2, b2, W3, b3, w4, edge_attr, W_e, rel,
                  w_att, need_dea) -> dict:
    """The gradients of every input (the dict of egnn_triton._backward), slab by slab."""
    B, N, H, EP, K = (meta[k] for k in ("B", "N", "H", "EP", "K"))
    dev = x.device
    f32 = dict(dtype=torch.float32, device=dev)
    dtype = p.dtype
    wdt = W2.dtype
    BI, BJ, warps = slab_blocks(H)
    SI = slab_rows(B, N)
    ws = torch.empty(5, B * SI * N * H, dtype=wdt, device=dev)
    n_groups_max = triton.cdiv(triton.cdiv(N, BJ), slab_tiles(triton.cdiv(N, BJ)))
    dxi_buf = torch.empty(n_groups_max * B * SI * 3, **f32)
    dxj_buf = torch.empty(triton.cdiv(SI, BI) * B * N * 3, **f32)
    n_jb = triton.cdiv(N, BJ)
    tiles = slab_tiles(n_jb)
    n_prog = triton.cdiv(n_jb, tiles) * triton.cdiv(SI, BI) * B
    K_CHUNK, N_CHUNK = slab_chunks(H, wdt)
    chunked = (K_CHUNK, N_CHUNK) != (H, H)
    pvec = (torch.zeros if chunked else torch.empty)(n_prog, 6, H, **f32)
    dW2 = torch.zeros(H, H, **f32)
    dW3 = torch.zeros(H, H, **f32)
    vec = torch.zeros(6, H, **f32)
    d_p = torch.empty(B, N, H, **f32)
    d_q = torch.zeros(B, N, H, **f32)
    dx = torch.zeros(B, N, 3, **f32)
    by_offset = torch.zeros(2 * N - 1, H, **f32) if meta["EDGE"] == 2 else None  # row o + N - 1
    dW_e = torch.zeros(meta["E"], H, **f32) if meta["EDGE"] == 1 else None
    d_ea = torch.empty_like(edge_attr) if need_dea else None
    dummy = x
    consts = dict(H=H, EP=EP, BI=BI, BJ=BJ, EDGE=meta["EDGE"], ATTENTION=w_att is not None, TANH=meta["tanh"],
                  NORMALIZE=meta["normalize"], PRECISION=_precision(dtype),
                  PRECISION_BWD=_precision(torch.float32) if dtype == torch.float32 else "tf32",
                  UPCAST=_interpreting() and dtype != torch.float32, FAST=_fast_sigmoid(dtype),
                  BWD_LOWP=slab_bwd_lowp(dtype))
    for i0 in range(0, N, SI):
        rows = min(SI, N - i0)
        S = B * rows * N
        a, m, d_t, d_r, d_z = (ws[k, : S * H].view(S, H) for k in range(5))
        grid = (triton.cdiv(n_jb, tiles), triton.cdiv(rows, BI), B)
        dx_i_side = dxi_buf[: grid[0] * B * rows * 3].view(grid[0], B, rows, 3)
        dx_j_side = dxj_buf[: grid[1] * B * N * 3].view(grid[1], B, N, 3)
        args = (x, p, q, mask_u8, scale, w_d, W2, b2, W3, b3, w4,
                edge_attr if edge_attr is not None else dummy, W_e if W_e is not None else dummy,
                rel if rel is not None else dummy, w_att if w_att is not None else dummy, meta["b_att"],
                grad_m, grad_dx, a, m, d_t, d_r, d_z, dx_i_side, dx_j_side, pvec,
                N, meta["E"], K, meta["eps"], i0, rows, tiles)
        if chunked:
            _egnn_bwd_slab_chunked_kernel[grid](*args, K_CHUNK=K_CHUNK, N_CHUNK=N_CHUNK, num_warps=warps,
                                                num_stages=1, **consts)
        else:
            _egnn_bwd_slab_kernel[grid](*args, num_warps=warps, num_stages=1, **consts)
        n_used = grid[0] * grid[1] * grid[2]
        vec += pvec[:n_used].sum(0)
        if chunked:
            pvec.zero_()
        dW2 += _gemm_f32(a.t(), d_r)
        dW3 += _gemm_f32(m.t(), d_t)
        dz4 = d_z.view(B, rows, N, H)
        d_p[:, i0: i0 + rows] = dz4.sum(2, dtype=torch.float32)
        d_q += dz4.sum(1, dtype=torch.float32)
        if by_offset is not None:
            sums, o_first = _skewed_offset_sums(dz4.sum(0, dtype=torch.float32), i0)
            by_offset[o_first + N - 1: o_first + N - 1 + sums.shape[0]] += sums
        if meta["EDGE"] == 1:
            e_rows = edge_attr[:, i0: i0 + rows].reshape(S, -1)
            dW_e += _gemm_f32(e_rows.t().to(wdt), d_z)
            if need_dea:
                d_ea[:, i0: i0 + rows] = (d_z.float() @ W_e.float().t()).view(B, rows, N, -1).to(d_ea.dtype)
        dx[:, i0: i0 + rows] += dx_i_side.sum(0)
        dx += dx_j_side.sum(0)
    rel_grad = None
    if by_offset is not None:
        rel_grad = fold_offset_sums(by_offset, N, K)  # (clipped ends folded in; K = 0 a single row)
    return dict(x=dx, p=d_p, q=d_q, w_d=vec[3], W2=dW2, b2=vec[0], W3=dW3, b3=vec[1], w4=vec[2], w_att=vec[4],
                b_att=vec[5].sum(), W_e=dW_e, rel=rel_grad, edge_attr=d_ea)
