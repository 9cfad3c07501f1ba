"""C++ EGNN kernels: cases the rest of the suite left open, found by mutation testing of csrc/cpu
(each test names the kernel change it catches). Float64 against the float64 reference, like
test_egnn_cpu.py, unless a test says otherwise."""
import numpy as np
import pytest
import torch

from helpers import assert_close_rel, rel_err
from protdiff_fast import backends
from protdiff_fast.reference.egnn import egnn_pair_aggregate_reference
from test_egnn_cpu import FLAG_SETS, compare_problem, make_problem

_C = backends.cpu_extension()
pytestmark = pytest.mark.skipif(_C is None, reason="C++ extension not built (test_cpu_extension fails for that)")

F64 = torch.float64


@pytest.mark.parametrize("N, K", [(5, 9), (8, 8), (12, 11)])
@pytest.mark.parametrize("edge_flags", [FLAG_SETS[0], FLAG_SETS[4]], ids=["plain", "all"])
def test_offset_table_wider_than_the_chain(N, K, edge_flags):
    """K >= N - 1 (a model's fixed table and a short chain): offsets j - i reach only rows
    K - (N - 1) .. K + (N - 1) of the table. The backward keeps just those rows (Kt = min(K, N - 1))
    and must put their gradients back at the right rows of d rel, zeros elsewhere. Every other test
    had K <= N - 1, where the window is the whole table: indexing the partial buffer with K instead
    of Kt, or copying it to d rel without the K - Kt shift, passed them all."""
    args, kw = make_problem(2, N, 12, 0, "offset", edge_flags, seed=N + K, K=K)
    assert kw["rel"].shape[0] == 2 * K + 1
    compare_problem(args, kw, F64, N + K, f"N={N}, K={K}")
    rel = kw["rel"].clone().requires_grad_(True)
    m, dx = _C_forward(args, {**kw, "rel": rel, "mask": None})  # every offset of the window occurs
    (g_rel,) = torch.autograd.grad(m.sum() + dx.square().sum(), rel)
    lo, hi = K - (N - 1), K + (N - 1)
    outside = torch.ones(2 * K + 1, dtype=torch.bool)
    outside[max(lo, 0):hi + 1] = False
    assert bool((g_rel[outside] == 0).all()), "d rel: rows no offset reaches must be exactly zero"
    assert bool((g_rel[max(lo, 0)].abs() > 0).any()) and bool((g_rel[hi].abs() > 0).any())


def _C_forward(args, kw):
    from protdiff_fast.ops import egnn_pair_aggregate

    return egnn_pair_aggregate(*args, backend="cpu", **kw)


@pytest.mark.parametrize("normalize, eps", [(True, 0.3), ("clamp", 1.0)])
@pytest.mark.parametrize("flags", [FLAG_SETS[0], FLAG_SETS[5]], ids=["plain", "all"])
def test_eps_reaches_the_kernels(normalize, eps, flags):
    """eps other than the default 1e-8 (every other test used the default): the binding must hand
    it to the kernels, where normalize=True adds it to the length and "clamp" floors the length at
    it (pairs on both sides of eps: clamped ones have no gradient through |u|)."""
    args, kw = make_problem(2, 11, 10, 0, "offset", {**flags, "normalize": normalize}, seed=3)
    kw["eps"] = eps
    args[0] = args[0] * 0.5
    d = torch.cdist(args[0], args[0])
    real_pair = kw["mask"][:, :, None] & kw["mask"][:, None, :] & ~torch.eye(11, dtype=torch.bool)
    if normalize == "clamp":
        assert bool((d < eps)[real_pair].any()) and bool((d > eps)[real_pair].any())
    compare_problem(args, kw, F64, 3, f"normalize={normalize}, eps={eps}")
    # and it is not the default's answer
    want = egnn_pair_aggregate_reference(*args, **kw)
    default = egnn_pair_aggregate_reference(*args, **{**kw, "eps": 1e-8})
    assert rel_err(want[1], default[1]) > 1e-3


# ------------------------------------------------------------------ bf16 products on AMX
from protdiff_fast.ops.egnn_cpu import amx_status, uses_amx  # noqa: E402
from test_egnn_cpu import NAMES, run  # noqa: E402

needs_amx = pytest.mark.skipif(_C is None or not amx_status()[0],
                               reason=f"no AMX here: {amx_status()[1] if _C is not None else 'no extension'}")


@needs_amx
def test_amx_saturated_silu_without_attention(monkeypatch):
    """test_egnn_cpu's saturated-silu case without attention: there the forward's y = a W2 + b2
    takes a as one bf16 operand (no bend reads it), and only the backward's recomputation must
    take a as hi + lo for silu'(y). Every saturated case there had attention (hi + lo in both),
    so a backward that recomputed y with one bf16 rounding passed them: q's gradient then came
    out at ~4x the error of the fp32 kernels on the same bf16 inputs (with this seed)."""
    assert uses_amx(torch.bfloat16)
    seed = 1
    args, kw = make_problem(2, 33, 64, 4, "none", FLAG_SETS[2], seed)  # tanh, no attention
    args[0] = args[0] * (100 / 1.5)
    args[1], args[2] = args[1] * 50, args[2] * 50
    g = torch.Generator().manual_seed(seed + 1)
    B, N, _ = args[0].shape
    upstream = (torch.randn(B, N, args[4].shape[1], generator=g, dtype=F64),
                torch.randn(B, N, 3, generator=g, dtype=F64))
    want = run("reference", args, kw, F64, upstream)
    got = run("cpu", args, kw, torch.bfloat16, upstream)
    monkeypatch.setenv("PROTDIFF_FAST_AMX", "0")
    fp32_kernels = run("cpu", args, kw, torch.bfloat16, upstream)
    assert any(not torch.equal(a, u) for a, u in zip(got, fp32_kernels)), "the AMX path did not run"
    extra = [k for k, v in kw.items() if torch.is_tensor(v) and v.dtype.is_floating_point]
    checked = 0
    for name, a, u, w in zip(NAMES + extra, got, fp32_kernels, want):
        tol = 1.5 * rel_err(u, w) + 1e-3
        if tol < 1:
            assert_close_rel(a, w, tol, f"{name} (AMX, saturated silu, no attention, against the fp32 kernels' error)")
            checked += 1
    assert checked >= 8, checked


# ------------------------------------------------------------------ the binding's own checks
def _raw_problem(edge_mode="none", B=1, N=5, H=4, E=2, K=2):
    args, kw = make_problem(B, N, H, E, edge_mode, FLAG_SETS[0], seed=7, K=K)
    f = [a.numpy() for a in args]
    extra = {k: kw[k].numpy() for k in ("edge_attr", "W_e", "rel") if k in kw}
    outs = dict(m_out=np.empty((B, N, H)), dx_out=np.empty((B, N, 3)))
    grads = dict(grad_m=np.ones((B, N, H)), grad_dx=np.ones((B, N, 3)),
                 **{f"d_{n}": np.empty_like(a) for n, a in zip(("x", "p", "q", "w_d", "W2", "b2", "W3", "b3", "w4"), f)})
    return f, extra, outs, grads


def test_cpp_binding_rejects_what_its_kernels_cannot_honour():
    """_C.egnn_forward/backward are public and check their buffers themselves (test_egnn_cpu checks
    sizes); these checks guard against silent wrong answers rather than crashes: an even offset
    table (no centre row), eps <= 0, two edge terms at once, a mask of the wrong shape, an edge term
    whose gradient buffer is missing (the kernel would skip it and leave d rel / d W_e unwritten)."""
    f, extra, outs, grads = _raw_problem("offset")
    with pytest.raises(ValueError, match=r"rel: expected 2K \+ 1 rows"):
        _C.egnn_forward(*f, rel=extra["rel"][:-1].copy(), **outs)
    with pytest.raises(ValueError, match="eps must be > 0"):
        _C.egnn_forward(*f, rel=extra["rel"], eps=0.0, normalize=1, **outs)
    with pytest.raises(ValueError, match="d_rel is required"):
        _C.egnn_backward(*f, rel=extra["rel"], **grads)
    with pytest.raises(ValueError, match="mask"):
        _C.egnn_forward(*f, mask=np.ones((1, 4), np.uint8), **outs)
    fd, extra_d, outs_d, grads_d = _raw_problem("dense")
    with pytest.raises(ValueError, match="at most one edge term"):
        _C.egnn_forward(*fd, edge_attr=extra_d["edge_attr"], W_e=extra_d["W_e"], rel=extra["rel"], **outs_d)
    with pytest.raises(ValueError, match="d_W_e is required"):
        _C.egnn_backward(*fd, edge_attr=extra_d["edge_attr"], W_e=extra_d["W_e"], **grads_d)
    # and the well-formed calls run (the checks above are not refusing everything)
    _C.egnn_forward(*f, rel=extra["rel"], eps=0.5, normalize=1, **outs)
    _C.egnn_backward(*f, rel=extra["rel"], d_rel=np.empty_like(extra["rel"]), **grads)
    _C.egnn_backward(*fd, edge_attr=extra_d["edge_attr"], W_e=extra_d["W_e"], d_W_e=np.empty_like(extra_d["W_e"]),
                     **grads_d)


def test_each_simd_setting_runs_its_own_kernels():
    """set_simd_isa must switch the kernels that run, not just the name simd_isa() reports: the builds
    differ in vector width (hence summation order) and FMA, so their float32 bits differ. Dispatching
    avx2 to the baseline build passed test_every_simd_build_matches_reference (both are right)."""
    isas = _C.supported_simd_isas().split(",")
    if len(isas) < 2:
        pytest.skip("only one instruction set here")
    args, kw = make_problem(2, 19, 48, 0, "offset", FLAG_SETS[4], seed=13)
    cast = [a.float() for a in args]
    kw32 = {k: (v.float() if torch.is_tensor(v) and v.dtype.is_floating_point else v) for k, v in kw.items()}
    from protdiff_fast.ops import egnn_pair_aggregate

    before = _C.simd_isa()
    outs = {}
    try:
        for isa in isas:
            _C.set_simd_isa(isa)
            assert _C.simd_isa() == isa
            outs[isa] = egnn_pair_aggregate(*cast, backend="cpu", **kw32)
    finally:
        _C.set_simd_isa(before)
    want = egnn_pair_aggregate_reference(*args, **kw)
    for isa, (m, dx) in outs.items():
        assert_close_rel(m, want[0], 1e-5, f"m_i ({isa})")
        assert_close_rel(dx, want[1], 1e-5, f"dx_i ({isa})")
    for a, b in zip(isas, isas[1:]):
        assert not torch.equal(outs[a][0], outs[b][0]), f"{a} and {b} gave the same bits: the same kernels ran"


# ------------------------------------------------------------------ centre of mass (com_cpu.cpp)
def test_center_of_mass_sums_in_double_far_from_the_origin():
    """float32 coordinates far from the origin (a protein placed at ~1000 A) and many nodes: the centroid
    is summed in double, so the result is the float64 answer for the float32 inputs to about one
    float32 rounding. A float32 running sum loses ~1e-3 relative of the centred coordinates here."""
    from protdiff_fast import remove_center_of_mass
    from protdiff_fast.reference.com import remove_center_of_mass_reference
    from helpers import random_mask

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 4000, 3, generator=g, dtype=F64) + 1000.0).float()
    mask = random_mask(2, 4000, generator=g, min_real=3000)
    want = remove_center_of_mass_reference(x.double(), mask)
    got = remove_center_of_mass(x, mask, backend="cpu")
    assert_close_rel(got, want, 1e-6, "float32 far from the origin")


def test_center_of_mass_any_dimension_up_to_its_limit():
    """The kernel keeps the centroid in a fixed array of 16: D = 16 works (like any D <= 16), D = 17 is
    refused with a message, never run past the array."""
    from protdiff_fast import remove_center_of_mass
    from protdiff_fast.reference.com import remove_center_of_mass_reference
    from helpers import random_mask

    g = torch.Generator().manual_seed(1)
    mask = random_mask(3, 7, generator=g)
    for D in (1, 16):
        x = torch.randn(3, 7, D, generator=g, dtype=F64)
        assert_close_rel(remove_center_of_mass(x, mask, backend="cpu"), remove_center_of_mass_reference(x, mask),
                         1e-14, f"D={D}")
    with pytest.raises(ValueError, match="coordinate dimension must be <= 16, got 17"):
        remove_center_of_mass(torch.randn(3, 7, 17, dtype=F64), mask, backend="cpu")


def _between_bf16(w, frac):
    """float32 values `frac` of the way from their bf16 round-down to the next bf16 up."""
    bits = w.float().view(torch.int32) & ~0xFFFF
    lo, hi = bits.view(torch.float32), (bits + 0x10000).view(torch.float32)
    return (lo + frac * (hi - lo)).double()


@needs_amx
def test_amx_rounds_float32_weights_to_the_nearest_bf16():
    """float32 inputs under "medium": the packed weights are W rounded to the nearest bf16. Every weight
    here lies 3/4 of the way up between two bf16 values, so nearest rounds up and truncation down (by
    3x as much, all the same way). Against the float64 answer for the nearest-rounded weights the AMX
    path is then off by its activations' rounding only (~7e-4); with truncated weights ~8e-3. The
    existing AMX tests bound it by the all-bf16 reference's error, which truncation stayed inside."""
    args, kw = make_problem(2, 21, 64, 0, "none", FLAG_SETS[0], seed=3)
    args[4], args[6] = _between_bf16(args[4], 0.75), _between_bf16(args[6], 0.75)
    from protdiff_fast.ops import egnn_pair_aggregate

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        assert uses_amx(torch.float32)
        got = egnn_pair_aggregate(*[a.float() for a in args], backend="cpu", **kw)
    finally:
        torch.set_float32_matmul_precision(before)
    rounded = list(args)
    rounded[4], rounded[6] = args[4].bfloat16().double(), args[6].bfloat16().double()
    want = egnn_pair_aggregate_reference(*rounded, **kw)
    for name, a, w in zip(("m_i", "dx_i"), got, want):
        assert_close_rel(a, w, 2e-3, f"{name} (AMX, weights between two bf16 values)")
