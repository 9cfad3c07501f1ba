"""The row-slab backward (PROTDIFF_FAST_TRITON_BWD=slab, protdiff_fast/ops/egnn_triton_slab.py) interpreted
on the CPU against the float64 reference: every gradient, every edge term and flag, masks, odd sizes,
many slabs with a partial last one, the offset table clipped and not, fp32 / bf16 / float32 coordinates."""
import pytest
import torch

from test_egnn_cpu import FLAG_SETS, NAMES, flag_id, make_problem, run

triton = pytest.importorskip("triton")
egnn_triton = pytest.importorskip("protdiff_fast.ops.egnn_triton")
slab = pytest.importorskip("protdiff_fast.ops.egnn_triton_slab")
from test_egnn_triton import compare  # noqa: E402

F64 = torch.float64


def spy_on_kernel(monkeypatch, name):
    """Record the grid of every launch of slab.<name> (a backward that silently took other kernels would
    pass the comparisons without testing this one)."""
    launched = []
    kernel = getattr(slab, name)

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return kernel[grid]

    monkeypatch.setattr(slab, name, Spy())
    return launched


@pytest.fixture
def slab_backward(monkeypatch):
    """Select the slab scheme; the launches of its whole-weight kernel."""
    monkeypatch.setenv("PROTDIFF_FAST_TRITON_BWD", "slab")
    return spy_on_kernel(monkeypatch, "_egnn_bwd_slab_kernel")


@pytest.mark.parametrize("edge_mode", ["none", "dense", "offset"])
@pytest.mark.parametrize("flags", FLAG_SETS, ids=flag_id)
def test_slab_backward_every_flag_and_edge_term(slab_backward, edge_mode, flags):
    compare(3, 33, 16, 5, edge_mode, flags, torch.float32, seed=11)
    assert slab_backward


@pytest.mark.parametrize("N", [1, 2, 7])
def test_slab_backward_odd_sizes_and_single_node(slab_backward, N):
    compare(1, N, 16, 3, "offset", FLAG_SETS[4], torch.float32, seed=N, K=3)
    compare(3, N, 16, 3, "dense", FLAG_SETS[5], torch.float32, seed=N + 50)


def test_slab_backward_one_row_offset_table(slab_backward):
    """K = 0: the one-row table's gradient must sum the pairs of every offset (the fold of the clipped
    ends once overwrote the offsets < 0 with those >= 0)."""
    compare(2, 5, 16, 3, "offset", FLAG_SETS[0], torch.float32, seed=65, K=0)
    assert slab_backward


@pytest.mark.parametrize("edge_mode,K", [("none", None), ("dense", None), ("offset", None), ("offset", 4)])
def test_slab_backward_over_many_slabs(slab_backward, monkeypatch, edge_mode, K):
    """B = 2, N = 45, 200 pairs per slab: SI = 2 rows, 23 slabs, the last of one row; the offset table
    full (K = N - 1) and clipped (K = 4, most pairs folded into its end rows)."""
    monkeypatch.setenv("PROTDIFF_FAST_TRITON_SLAB_PAIRS", "200")
    assert slab.slab_rows(2, 45) == 2
    compare(2, 45, 16, 3, edge_mode, FLAG_SETS[4], torch.float32, seed=31, K=K)
    assert len(slab_backward) == 23 and slab_backward[-1][1] == 1


@pytest.mark.parametrize("edge_mode", ["none", "dense", "offset"])
@pytest.mark.parametrize("flags", [FLAG_SETS[0], FLAG_SETS[4]], ids=flag_id)
def test_slab_backward_bf16_within_reference_error(slab_backward, edge_mode, flags):
    compare(2, 21, 32, 6, edge_mode, flags, torch.bfloat16, seed=200)


def test_slab_backward_bf16_with_float32_coordinates_and_hidden_64(slab_backward):
    compare(2, 19, 64, 4, "offset", dict(normalize=True), torch.bfloat16, seed=64, x_dtype=torch.float32)
    compare(2, 19, 64, 4, "offset", FLAG_SETS[4], torch.float32, seed=65)


def test_slab_backward_one_tile_per_program_and_fp32_backward_products(slab_backward, monkeypatch):
    """SLAB_TILES = 1: one program per j-block (several programs per row); bf16 with the backward
    products on fp32 operands (SLAB_LOWP = 0) instead of bf16 ones."""
    monkeypatch.setenv("PROTDIFF_FAST_TRITON_SLAB_TILES", "1")
    monkeypatch.setenv("PROTDIFF_FAST_TRITON_SLAB_LOWP", "0")
    compare(2, 70, 32, 3, "offset", FLAG_SETS[4], torch.bfloat16, seed=93)
    assert slab_backward[0][0] == 3  # 70 columns in blocks of 32


def test_slab_backward_falls_back_where_it_does_not_fit(slab_backward):
    """fp32 at H = 256 (spills at every chunking on sm_90a): the default scheme."""
    assert not slab.use_slab_backward(256, torch.float32) and slab.use_slab_backward(128, torch.float32)
    assert slab.use_slab_backward(256, torch.bfloat16)
    compare(1, 5, 256, 3, "offset", dict(normalize=True), torch.float32, seed=3)
    assert not slab_backward


@pytest.fixture
def chunked_spy(monkeypatch):
    """The launches of the chunked kernel."""
    return spy_on_kernel(monkeypatch, "_egnn_bwd_slab_chunked_kernel")


@pytest.mark.parametrize("edge_mode", ["none", "dense", "offset"])
@pytest.mark.parametrize("flags", [FLAG_SETS[0], FLAG_SETS[4], FLAG_SETS[5]], ids=flag_id)
def test_chunked_slab_backward_every_edge_term(slab_backward, chunked_spy, monkeypatch, edge_mode, flags):
    """The chunked pair map (shipped at H = 256 bf16, fp32 128) forced at H = 32 with chunks of 16, over
    several slabs and tiles per program (the read-modify-written vector rows across tiles)."""
    monkeypatch.setenv("PROTDIFF_FAST_TRITON_SLAB_CHUNKS", "16,16")
    monkeypatch.setenv("PROTDIFF_FAST_TRITON_SLAB_PAIRS", "1000")  # 12 rows per slab: 4 slabs, the last of 4 rows
    compare(2, 40, 32, 4, edge_mode, flags, torch.float32, seed=41, K=5)
    assert chunked_spy and not slab_backward


def test_chunked_slab_backward_bf16_and_at_hidden_256(slab_backward, chunked_spy, monkeypatch):
    compare(1, 7, 256, 3, "offset", dict(normalize=True), torch.bfloat16, seed=5)  # its shipped configuration
    monkeypatch.setenv("PROTDIFF_FAST_TRITON_SLAB_CHUNKS", "16,32")
    compare(2, 21, 32, 6, "offset", FLAG_SETS[4], torch.bfloat16, seed=201)
    assert len(chunked_spy) >= 2 and not slab_backward


@pytest.mark.parametrize("chunks,B,H", [(None, 2, 16), ("16,16", 1, 32)])
def test_slab_backward_in_the_gpu_tile_shape(slab_backward, chunked_spy, monkeypatch, chunks, B, H):
    """The GPU's 1 x 16 tiles (one row i per program) under the interpreter, whole weights and by chunks;
    2 tiles per program over 3 column blocks (N = 33): the second group of programs has one tile."""
    monkeypatch.setenv("PROTDIFF_FAST_TRITON_SLAB_BLOCKS", "1,16,8")
    monkeypatch.setenv("PROTDIFF_FAST_TRITON_SLAB_TILES", "2")
    if chunks:
        monkeypatch.setenv("PROTDIFF_FAST_TRITON_SLAB_CHUNKS", chunks)
    compare(B, 33, H, 3, "offset", FLAG_SETS[4], torch.float32, seed=17, K=4)
    assert (chunked_spy if chunks else slab_backward)[0][:2] == (2, 33)  # 2 column groups, a program per row


def test_slab_workspace_is_o_n_h():
    """5 S H elements for S ~ SLAB_PAIRS pairs, at least one row of every sample: linear in N at large N."""
    sizes = [slab.slab_workspace_bytes(1, n, 128, torch.bfloat16) for n in (4096, 8192, 1 << 17, 1 << 18)]
    assert sizes[0] == sizes[1] == 5 * slab.SLAB_PAIRS * 128 * 2
    assert sizes[3] == 2 * sizes[2]


def test_slab_backward_repeats_bitwise_and_matches_the_default_scheme(monkeypatch):
    args, kw = make_problem(2, 40, 16, 3, "offset", FLAG_SETS[4], seed=6)
    g = torch.Generator().manual_seed(2)
    up = (torch.randn(2, 40, 16, generator=g, dtype=F64), torch.randn(2, 40, 3, generator=g, dtype=F64))
    default = run("triton", args, kw, torch.float32, up)
    monkeypatch.setenv("PROTDIFF_FAST_TRITON_BWD", "slab")
    monkeypatch.setenv("PROTDIFF_FAST_TRITON_SLAB_PAIRS", "300")
    first = run("triton", args, kw, torch.float32, up)
    second = run("triton", args, kw, torch.float32, up)
    for name, a, b, c in zip(NAMES + ["rel", "w_att", "b_att"], first, second, default):
        a, b, c = a.detach(), b.detach(), c.detach()
        assert torch.equal(a, b), name
        scale = c.double().norm().clamp_min(1e-30)
        assert float((a.double() - c.double()).norm() / scale) < 1e-5, name


def test_slab_settings_are_checked(monkeypatch):
    monkeypatch.setenv("PROTDIFF_FAST_TRITON_BWD", "slabs")
    with pytest.raises(ValueError, match="PROTDIFF_FAST_TRITON_BWD"):
        slab.use_slab_backward(32, torch.float32)
    for name in ("SLAB_TILES", "SLAB_LOWP"):
        monkeypatch.setenv(f"PROTDIFF_FAST_TRITON_{name}", "x" if name == "SLAB_LOWP" else "0")
        with pytest.raises(ValueError, match=name):
            slab.slab_tiles(4) if name == "SLAB_TILES" else slab.slab_bwd_lowp(torch.bfloat16)
    monkeypatch.setenv("PROTDIFF_FAST_TRITON_SLAB_PAIRS", "0")
    with pytest.raises(ValueError, match="SLAB_PAIRS"):
        slab.slab_rows(1, 10)
    monkeypatch.setenv("PROTDIFF_FAST_TRITON_SLAB_PAIRS", "100000")
    assert slab.slab_rows(2, 50) == 50  # never more rows than the sample has


@pytest.mark.parametrize("edge_mode", ["dense", "offset"])
def test_slab_backward_clamp_normalize(slab_backward, chunked_spy, monkeypatch, edge_mode):
    flags = dict(attention=True, tanh=True, normalize="clamp")
    compare(2, 19, 16, 3, edge_mode, flags, torch.float32, seed=71, K=3)
    assert slab_backward
    monkeypatch.setenv("PROTDIFF_FAST_TRITON_SLAB_CHUNKS", "16,16")
    compare(2, 19, 32, 3, edge_mode, flags, torch.float32, seed=72, K=3)
    assert chunked_spy
