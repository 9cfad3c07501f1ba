"""Follow-ups of a mutation-testing pass over the Triton EGNN op (protdiff_fast/ops/egnn_triton.py,
egnn_triton_slab.py): configurations the GPU takes that no other interpreted test ran, forced here at
small sizes against the float64 reference, and the GPU's launch plan (block shapes, chunks, precision and
sigmoid flags) checked on the CPU without running a kernel."""

import pytest
import torch

from helpers import assert_close_rel
from test_egnn_cpu import FLAG_SETS, NAMES, make_problem, run

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
egnn_triton = pytest.importorskip("protdiff_fast.ops.egnn_triton")
slab = pytest.importorskip("protdiff_fast.ops.egnn_triton_slab")
from test_egnn_triton import compare  # noqa: E402

F64 = torch.float64
KERNELS = ("_egnn_fwd_kernel", "_egnn_bwd_kernel", "_egnn_bwd_chunked_kernel", "_rel_windows_kernel")
SLAB_KERNELS = ("_egnn_bwd_slab_kernel", "_egnn_bwd_slab_chunked_kernel")


class _Spy:
    """Records (kernel name, grid, constexpr keywords) of every launch; launches it unless ``record_only``."""

    def __init__(self, name, kernel, launches, record_only=False):
        self.name, self.kernel, self.launches, self.record_only = name, kernel, launches, record_only

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.launches.append((self.name, tuple(grid), kw))
            if not self.record_only:
                return self.kernel[grid](*args, **kw)
        return launch


def spy_all(monkeypatch, record_only=False):
    launches = []
    for mod, names in ((egnn_triton, KERNELS), (slab, SLAB_KERNELS)):
        for name in names:
            monkeypatch.setattr(mod, name, _Spy(name, getattr(mod, name), launches, record_only))
    return launches


def compare_eps(B, N, H, E, edge_mode, flags, dtype, eps, seed, K=None, tol=1e-4):
    """fp32 forward and every gradient against float64 with the op's eps set (compare() keeps 1e-8)."""
    args, kw = make_problem(B, N, H, E, edge_mode, flags, seed, K=K)
    kw["eps"] = eps
    g = torch.Generator().manual_seed(seed + 1)
    M = args[4].shape[1]
    upstream = (torch.randn(B, N, M, generator=g, dtype=F64), torch.randn(B, N, 3, generator=g, dtype=F64))
    want = run("reference", args, kw, F64, upstream)
    got = run("triton", args, kw, dtype, upstream)
    extra = [k for k, v in kw.items() if torch.is_tensor(v) and v.dtype.is_floating_point]
    for name, a, w in zip(NAMES + extra, got, want):
        assert_close_rel(a, w, tol, f"{name} (eps = {eps}, {edge_mode}, {flags})")


# ---------------------------------------------------------------------------------------------
# the GPU's launch plan, on the CPU
# ---------------------------------------------------------------------------------------------
def gpu_launch_plan(monkeypatch, widths, dtype, edge_mode, flags, B=2, N=40, x_dtype=None):
    """(kernel, grid, constexprs) of every launch of one forward and backward as a GPU would run them:
    _interpreting() patched to False (the GPU's block shapes, chunks, tanh.approx sigmoids, no upcast),
    the kernels replaced by recorders (nothing runs; the outputs are left as allocated)."""
    for mod in (egnn_triton, slab):
        monkeypatch.setattr(mod, "_interpreting", lambda: False)
    launches = spy_all(monkeypatch, record_only=True)
    args, kw = make_problem(B, N, widths, 3, edge_mode, flags, seed=1, K=5)
    leaves = [a.to(x_dtype if k == 0 and x_dtype is not None else dtype).requires_grad_(True)
              for k, a in enumerate(args)]
    opt = {k: (v.to(dtype).requires_grad_(True) if torch.is_tensor(v) and v.dtype.is_floating_point else v)
           for k, v in kw.items()}
    mask = opt["mask"]
    scale = egnn_triton._coord_scale(mask, opt["coords_agg"], torch.float32).reshape(-1).contiguous()
    op_flags = dict(normalize=egnn_triton.NORMALIZE_MODES[opt["normalize"]], tanh=opt["tanh"], eps=1e-8,
                    coords_agg=opt["coords_agg"])
    extra = [opt.get(k) for k in ("edge_attr", "W_e", "rel", "w_att", "b_att")]
    m, dx = egnn_triton._EgnnPairAggregateTriton.apply(*leaves, *extra, mask.to(torch.uint8).contiguous(), scale,
                                                       op_flags)
    wrt = leaves + [t for t in extra if t is not None]
    torch.autograd.grad((m.float().sum() + dx.float().sum()), wrt, allow_unused=True)
    return launches


def _check_launch(name, grid, kw, dtype, N):
    """Invariants every GPU launch must keep (what the interpreter is lenient about, or never sees)."""
    fp32 = dtype == torch.float32
    if name == "_rel_windows_kernel":
        return
    assert kw["UPCAST"] is False, (name, "the interpreter's bf16 workaround on the GPU")
    assert kw["FAST"] == (not fp32), (name, "tanh.approx sigmoids are for bf16 / fp16 only")
    assert kw["PRECISION"] == ("tf32x3" if fp32 else "tf32"), (name, kw["PRECISION"])
    if "PRECISION_BWD" in kw:
        assert kw["PRECISION_BWD"] == ("tf32x3" if fp32 else "tf32"), (name, kw["PRECISION_BWD"])
    BI, BJ = kw["BI"], kw["BJ"]
    assert BI * BJ >= 16, (name, "tl.dot needs M >= 16 on the GPU")
    assert kw["EP"] >= 16 and kw["EP"] & (kw["EP"] - 1) == 0, (name, kw["EP"])
    if name in ("_egnn_fwd_kernel", "_egnn_bwd_chunked_kernel"):
        HE, HM, HX, KC, NC = kw["HE"], kw["HM"], kw["HX"], kw["K_CHUNK"], kw["N_CHUNK"]
        assert KC >= 16 and NC >= 16, (name, "tl.dot needs K >= 16 on the GPU", KC, NC)
        assert HE % KC == 0 and HX % NC == 0, (name, "chunks must divide the widths", HE, HX, KC, NC)
        if name == "_egnn_bwd_chunked_kernel" or kw.get("M_SCRATCH"):
            assert HM % KC == 0, (name, "K chunks over m's columns", HM, KC)
        if name == "_egnn_bwd_chunked_kernel":
            assert HX % kw["HX_CHUNK"] == 0 and kw["HX_CHUNK"] >= 16, (name, kw["HX_CHUNK"])
            assert HE % kw["FLUSH_ROWS"] == 0 and HM % kw["FLUSH_ROWS"] == 0, (name, kw["FLUSH_ROWS"])
            assert kw["W_REL"] >= BI + BJ - 1
    if name == "_egnn_fwd_kernel":
        assert grid[0] * BI >= N, (name, "every row i has a program", grid, BI)
    if name == "_egnn_bwd_kernel":
        H = kw["H"]
        assert H % kw["DW_CHUNK"] == 0 and H % kw["FLUSH_ROWS"] == 0 and kw["FLUSH_ROWS"] <= H, (name, kw)
        assert kw["W_REL"] >= BI + BJ - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("H", [16, 32, 64, 128, 256])
def test_gpu_launch_plan_square(monkeypatch, H, dtype):
    for edge_mode, flags in (("offset", dict(normalize=True)), ("dense", FLAG_SETS[4]), ("none", FLAG_SETS[0])):
        launches = gpu_launch_plan(monkeypatch, H, dtype, edge_mode, flags)
        names = [n for n, _, _ in launches]
        assert names.count("_egnn_fwd_kernel") == 1, names
        assert "_egnn_bwd_kernel" in names or "_egnn_bwd_chunked_kernel" in names, \
            f"H = {H} {dtype}: the backward went through the reference: {names}"
        for name, grid, kw in launches:
            _check_launch(name, grid, kw, dtype, 40)
        fwd = launches[0][2]
        chunks = egnn_triton.fwd_chunks(H, dtype)
        assert (fwd["K_CHUNK"], fwd["N_CHUNK"]) == chunks and fwd["CHUNKED"] == (chunks != (H, H))
        assert fwd["M_SCRATCH"] == (H == 256 and dtype == torch.float32)
        # the one-pass backward at H = 128 / 256 (and fp32 64) runs by chunks, elsewhere whole
        chunked = "_egnn_bwd_chunked_kernel" in names
        assert chunked == (H >= 128 or (H == 64 and dtype == torch.float32)), names
        if edge_mode == "offset":
            assert "_rel_windows_kernel" in names


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("H", [128, 256])
def test_gpu_launch_plan_float32_coordinates(monkeypatch, H, dtype):
    """Autocast's call (low-precision features, float32 x) at ProtDiff's widths: the forward is chunked at
    H = 128 too (unchunked spilled on sm_90), the backward fused."""
    launches = gpu_launch_plan(monkeypatch, H, dtype, "offset", dict(normalize=True), x_dtype=torch.float32)
    fwd = [kw for n, _, kw in launches if n == "_egnn_fwd_kernel"]
    assert len(fwd) == 1 and fwd[0]["CHUNKED"] and fwd[0]["K_CHUNK"] < H, fwd
    assert any(n == "_egnn_bwd_chunked_kernel" for n, _, _ in launches)
    for name, grid, kw in launches:
        _check_launch(name, grid, kw, dtype, 40)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_launch_plan_rectangular(monkeypatch, dtype):
    """Every rectangular width triple the compile script sweeps (egnn-pytorch's layers): chunks dividing
    the widths at the GPU's chunk choices (the interpreter uses others)."""
    for widths in egnn_triton.RECT_WIDTHS:
        launches = gpu_launch_plan(monkeypatch, widths, dtype, "dense", FLAG_SETS[4], N=20)
        names = [n for n, _, _ in launches]
        assert names[:2] == ["_egnn_fwd_kernel", "_egnn_bwd_chunked_kernel"], (widths, names)
        for name, grid, kw in launches:
            assert (kw["HE"], kw["HM"], kw["HX"]) == widths
            _check_launch(name, grid, kw, dtype, 20)
        assert launches[0][2]["M_SCRATCH"] == (dtype == torch.float32 and widths[1] >= 256)


def test_gpu_launch_plan_two_passes_and_slab(monkeypatch):
    """The GPU A/B variants: two passes (PROTDIFF_FAST_TRITON_BWD_PASSES=2) at H = 128 run the unchunked
    two-pass kernels, never the one-pass chunked one; the slab scheme's pair maps by chunks where whole
    weights do not fit."""
    monkeypatch.setenv("PROTDIFF_FAST_TRITON_BWD_PASSES", "2")
    for dtype in (torch.float32, torch.bfloat16):
        launches = gpu_launch_plan(monkeypatch, 128, dtype, "offset", FLAG_SETS[4])
        bwd = [(n, kw) for n, _, kw in launches if n.startswith("_egnn_bwd")]
        assert [n for n, _ in bwd] == ["_egnn_bwd_kernel"] * 2, [n for n, _ in bwd]
        assert [kw["ROWS_ARE_I"] for _, kw in bwd] == [True, False]
        for name, grid, kw in launches:
            _check_launch(name, grid, kw, dtype, 40)
    monkeypatch.delenv("PROTDIFF_FAST_TRITON_BWD_PASSES")
    monkeypatch.setenv("PROTDIFF_FAST_TRITON_BWD", "slab")
    for H, dtype, kernel in [(64, torch.bfloat16, "_egnn_bwd_slab_kernel"), (128, torch.float32,
                             "_egnn_bwd_slab_chunked_kernel"), (256, torch.bfloat16, "_egnn_bwd_slab_chunked_kernel")]:
        launches = gpu_launch_plan(monkeypatch, H, dtype, "offset", FLAG_SETS[4])
        bwd = [kw for n, _, kw in launches if n == kernel]
        assert bwd and not any(n.startswith("_egnn_bwd_kernel") for n, _, _ in launches), [n for n, _, _ in launches]
        for kw in bwd:
            assert (kw["BI"], kw["BJ"]) == slab._SLAB_BLOCKS[H][:2] and kw["FAST"] == (dtype != torch.float32)
            assert kw["UPCAST"] is False and kw["BWD_LOWP"] == (dtype != torch.float32)
            if "K_CHUNK" in kw:
                assert H % kw["K_CHUNK"] == 0 and H % kw["N_CHUNK"] == 0 and kw["K_CHUNK"] >= 16


def test_gpu_fp32_precision_follows_allow_tf32(monkeypatch):
    """fp32 runs 3xTF32 dots unless torch's allow_tf32 is set (under the interpreter every fp32 dot is exact,
    so only the flag the launcher passes can be checked)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        launches = gpu_launch_plan(monkeypatch, 32, torch.float32, "none", FLAG_SETS[0])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert {kw["PRECISION"] for _, _, kw in launches if "PRECISION" in kw} == {"tf32"}


# ---------------------------------------------------------------------------------------------
# configurations no other interpreted test runs, forced at small sizes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("edge_mode", ["dense", "offset"])
def test_two_passes_ignore_the_one_pass_chunks(monkeypatch, edge_mode):
    """GPU: PROTDIFF_FAST_TRITON_BWD_PASSES=2 at H = 128 / 256, where bwd_chunks is not (H, H) (the A/B
    run book's "two-pass" variant). The chunks are the one-pass kernel's: two passes run the unchunked
    kernels only (the chunked kernel on top of them would count every gradient twice)."""
    monkeypatch.setenv("PROTDIFF_FAST_TRITON_BWD_PASSES", "2")
    monkeypatch.setenv("PROTDIFF_FAST_TRITON_BWD_CHUNKS", "16,16")
    launches = spy_all(monkeypatch)
    compare(2, 13, 32, 3, edge_mode, FLAG_SETS[4], torch.float32, seed=5, K=3)
    assert [n for n, _, _ in launches if n.startswith("_egnn_bwd")] == ["_egnn_bwd_kernel"] * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("H,chunk", [(16, None), (32, 16)])
def test_read_modify_write_weight_gradients_per_tile(monkeypatch, H, chunk, dtype):
    """PROTDIFF_FAST_TRITON_DW_STAGE=1 (the earlier scheme, a GPU A/B setting; two passes): each tile adds
    its dW2 / dW3 product straight to the program's partial, whole (H = 16) or by dw_chunk row chunks (the
    GPU's dw_chunk at H >= 128: dW3's rows read back from the program's scratch copy of m, never run by
    another test), with attention so that the gate enters m. One program per sample walks 2 x 2 tiles
    (N = 40, interpreter blocks of 32): each tile adds to what the earlier ones left in the partial."""
    monkeypatch.setenv("PROTDIFF_FAST_TRITON_DW_STAGE", "1")
    monkeypatch.setattr(egnn_triton, "BACKWARD_PROGRAMS", 1)
    if chunk:
        monkeypatch.setattr(egnn_triton, "dw_chunk", lambda H, dtype=None, kernel="bwd_i": chunk)
    launches = spy_all(monkeypatch)
    compare(2, 40, H, 3, "dense", FLAG_SETS[4], dtype, seed=7)
    bwd = [kw for n, _, kw in launches if n == "_egnn_bwd_kernel"]
    assert [kw["DW_STAGE"] for kw in bwd] == [1, 1] and {kw["DW_CHUNK"] for kw in bwd} == {chunk or H}


@pytest.mark.parametrize("variant", ["default", "chunked", "two-pass", "slab"])
def test_normalize_with_a_large_eps(monkeypatch, variant):
    """normalize=True divides by |u| + eps (the length detached): with eps = 1e-8 that is |u| to 8 digits,
    so a kernel dividing by sqrt(d2 + eps) or max(|u|, eps) passed every test; eps = 0.7 tells them apart."""
    if variant == "chunked":
        monkeypatch.setenv("PROTDIFF_FAST_TRITON_FWD_CHUNKS", "16,16")
        monkeypatch.setenv("PROTDIFF_FAST_TRITON_BWD_CHUNKS", "16,16")
    elif variant == "two-pass":
        monkeypatch.setenv("PROTDIFF_FAST_TRITON_BWD_PASSES", "2")
    elif variant == "slab":
        monkeypatch.setenv("PROTDIFF_FAST_TRITON_BWD", "slab")
    H = 32 if variant == "chunked" else 16
    compare_eps(2, 11, H, 3, "offset", dict(normalize=True, attention=True), torch.float32, eps=0.7, seed=3, K=3)


@pytest.mark.parametrize("variant", ["default", "chunked", "slab"])
def test_dense_edges_wider_than_16_features(monkeypatch, variant):
    """E = 20 edge features: the kernels' edge width EP is padded to 32 (a power of two), not 16 or E."""
    if variant == "chunked":
        monkeypatch.setenv("PROTDIFF_FAST_TRITON_FWD_CHUNKS", "16,16")
        monkeypatch.setenv("PROTDIFF_FAST_TRITON_BWD_CHUNKS", "16,16")
    elif variant == "slab":
        monkeypatch.setenv("PROTDIFF_FAST_TRITON_BWD", "slab")
    compare(2, 9, 32 if variant == "chunked" else 16, 20, "dense", FLAG_SETS[4], torch.float32, seed=20)


def test_gpu_launch_plan_backward_pipelining_override(monkeypatch):
    """PROTDIFF_FAST_TRITON_BWD_STAGES (GPU A/B runs) reaches the chunked backward's launch; the interpreter
    ignores num_stages, so only the launch plan shows it."""
    stages = lambda: [kw["num_stages"] for n, _, kw in gpu_launch_plan(monkeypatch, 128, torch.bfloat16, "offset",
                                                                        dict(normalize=True))
                      if n == "_egnn_bwd_chunked_kernel"]
    assert stages() == [egnn_triton.BWD_CHUNKED_STAGES]
    monkeypatch.setenv("PROTDIFF_FAST_TRITON_BWD_STAGES", "3")
    assert stages() == [3]
    for bad in ("0", "two"):
        monkeypatch.setenv("PROTDIFF_FAST_TRITON_BWD_STAGES", bad)
        with pytest.raises(ValueError, match="PROTDIFF_FAST_TRITON_BWD_STAGES"):
            egnn_triton.bwd_chunked_stages()


@triton.jit
def _mm_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr, UPCAST: tl.constexpr):
    r = tl.arange(0, N)
    a = tl.load(a_ptr + r[:, None] * N + r[None, :])
    b = tl.load(b_ptr + r[:, None] * N + r[None, :])
    tl.store(c_ptr + r[:, None] * N + r[None, :], egnn_triton._mm(a, b, "tf32", UPCAST))


def test_interpreted_low_precision_product_rounds_its_fp32_operand():
    """_mm(a fp32, b bf16) multiplies a rounded to bf16, as the tensor cores do (the interpreter's upcast dot
    must not see the unrounded a: its bf16 results would be more accurate than the GPU's, and every bf16
    bound of the suite still passed without the rounding)."""
    g = torch.Generator().manual_seed(4)
    a = torch.randn(32, 32, generator=g)
    b = torch.randn(32, 32, generator=g).bfloat16()
    c = torch.empty(32, 32)
    _mm_kernel[(1,)](a, b, c, N=32, UPCAST=True)
    want = a.bfloat16().double() @ b.double()
    unrounded = a.double() @ b.double()
    assert float((want - unrounded).norm() / want.norm()) > 1e-3  # the rounding is visible at this size
    assert_close_rel(c, want, 1e-6, "_mm against the product of the bf16-rounded operands")
