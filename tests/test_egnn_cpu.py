"""The C++ EGNN backend against the float64 reference: forward, every gradient, masks, odd sizes,
every edge term and flag, fp32/bf16 error bounds, every SIMD build, threads, determinism."""
import itertools

import numpy as np
import pytest
import torch

from helpers import assert_close_rel, random_mask, rel_err
from protdiff_fast import backends
from protdiff_fast.nn import EGNNLayer
from protdiff_fast.ops import egnn_pair_aggregate
from protdiff_fast.reference.egnn import egnn_pair_aggregate_reference

_C = backends.cpu_extension()
pytestmark = pytest.mark.skipif(_C is None, reason="C++ extension not built (test_cpu_extension fails for that)")

F64 = torch.float64
FLAG_SETS = [
    dict(),
    dict(attention=True),
    dict(tanh=True),
    dict(normalize=True),
    dict(attention=True, tanh=True, normalize=True),
    dict(attention=True, tanh=True, normalize=True, coords_agg="sum"),
]


def flag_id(f):
    return "+".join(f"{k}" if v is True else f"{v}" for k, v in f.items()) or "plain"


def make_problem(B, N, H, E, edge_mode, flags, seed=0, K=None):
    """Random contract inputs in float64 (weights scaled so activations stay O(1)). ``H``: one width, or
    (H_e, M, H_x) for rectangular weights (egnn-pytorch's layer: H_e = 4M + 2, H_x = 4M)."""
    g = torch.Generator().manual_seed(seed)
    He, M, Hx = (H, H, H) if isinstance(H, int) else H

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=F64) * scale

    args = [r(B, N, 3, scale=1.5), r(B, N, He), r(B, N, He), r(He, scale=0.3), r(He, M, scale=max(He, 1) ** -0.5),
            r(M), r(M, Hx, scale=max(M, 1) ** -0.5), r(Hx), r(Hx, scale=max(Hx, 1) ** -0.5)]
    H = He
    kw = dict(mask=random_mask(B, N, generator=g), normalize=flags.get("normalize", False),
              tanh=flags.get("tanh", False), coords_agg=flags.get("coords_agg", "mean"))
    if edge_mode == "dense":
        kw.update(edge_attr=r(B, N, N, E), W_e=r(E, H, scale=E ** -0.5))
    elif edge_mode == "offset":
        K = K if K is not None else max(N // 2, 1)  # clipped for the far pairs
        kw.update(rel=r(2 * K + 1, H))
    if flags.get("attention"):
        kw.update(w_att=r(M, scale=max(M, 1) ** -0.5), b_att=r(()))
    return args, kw


def tensor_inputs(args, kw):
    return list(args) + [v for k, v in kw.items() if torch.is_tensor(v) and v.dtype.is_floating_point]


def run(backend, args, kw, dtype, upstream, x_dtype=None):
    """Outputs and the gradients of <outputs, upstream> for every floating input, cast to dtype (x to
    ``x_dtype`` if given: float32 coordinates next to low-precision features)."""
    leaves = [t.detach().to(x_dtype if k == 0 and x_dtype is not None else dtype).requires_grad_(True)
              for k, t in enumerate(tensor_inputs(args, kw))]
    n = len(args)
    kw_low = dict(kw)
    for (k, v), leaf in zip([(k, v) for k, v in kw.items() if torch.is_tensor(v) and v.dtype.is_floating_point],
                            leaves[n:]):
        kw_low[k] = leaf
    m, dx = egnn_pair_aggregate(*leaves[:n], backend=backend, **kw_low)
    loss = (m.double() * upstream[0]).sum() + (dx.double() * upstream[1]).sum()
    grads = torch.autograd.grad(loss, leaves)
    return [m, dx, *grads]


def rounded_upstream(upstream, dtype, x_dtype=None):
    """The upstream gradients as a low-precision run receives them: autograd hands m_i's and dx_i's
    backward the float64 upstream cast to their dtypes, and a float64 baseline for the rounded inputs
    should be handed the same rounded gradients."""
    return (upstream[0].to(dtype).double(), upstream[1].to(x_dtype or dtype).double())


NAMES = ["m_i", "dx_i", "x", "p", "q", "w_d", "W2", "b2", "W3", "b3", "w4"]


def compare(B, N, H, E, edge_mode, flags, dtype, seed=0):
    args, kw = make_problem(B, N, H, E, edge_mode, flags, seed)
    compare_problem(args, kw, dtype, seed, f"N={N}, {edge_mode}, {flag_id(flags)}")


def compare_problem(args, kw, dtype, seed, what):
    """Outputs and every gradient of the cpu backend in dtype against float64 (see compare)."""
    B, N, _ = args[0].shape
    g = torch.Generator().manual_seed(seed + 1)
    M = args[4].shape[1]
    upstream = (torch.randn(B, N, M, generator=g, dtype=F64), torch.randn(B, N, 3, generator=g, dtype=F64))
    want = run("reference", args, kw, F64, upstream)
    got = run("cpu", args, kw, dtype, upstream)
    low_ref = rounded = None
    if dtype != F64:
        low_ref = run("reference", args, kw, dtype, upstream)
        # the float64 answer for the inputs rounded to dtype: what input quantization alone costs
        r_args = [a.to(dtype).double() for a in args]
        r_kw = {k: (v.to(dtype).double() if torch.is_tensor(v) and v.dtype.is_floating_point else v)
                for k, v in kw.items()}
        rounded = run("reference", r_args, r_kw, F64, rounded_upstream(upstream, dtype))
    extra = [k for k, v in kw.items() if torch.is_tensor(v) and v.dtype.is_floating_point]
    for k, (name, a, w) in enumerate(zip(NAMES + extra, got, want)):
        assert a.dtype == dtype, name
        assert bool(torch.isfinite(a).all()), f"{name}: non-finite values"
        if dtype == F64:
            tol = 1e-10
        else:  # within a small factor of the same-precision reference's own error (or of input rounding)
            base = max(rel_err(low_ref[k], w), rel_err(rounded[k], w))
            # floor: one rounding of the output to dtype (a lone scalar like b_att shows it whole)
            tol = 2 * base + max(5e-6, torch.finfo(dtype).eps / 2)
        assert_close_rel(a, w, tol, f"{name} ({dtype}, {what})")


@pytest.mark.parametrize("N", [1, 2, 7, 33, 100])
@pytest.mark.parametrize("edge_mode", ["none", "dense", "offset"])
@pytest.mark.parametrize("flags", FLAG_SETS, ids=flag_id)
def test_cpu_matches_reference_float64(N, edge_mode, flags):
    compare(3, N, 20, 5, edge_mode, flags, F64, seed=N)


@pytest.mark.parametrize("N", [7, 33])
@pytest.mark.parametrize("edge_mode", ["none", "dense", "offset"])
@pytest.mark.parametrize("flags", [FLAG_SETS[0], FLAG_SETS[4]], ids=flag_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpu_low_precision_within_reference_error(N, edge_mode, flags, dtype):
    compare(2, N, 64, 6, edge_mode, flags, dtype, seed=N + 100)


@pytest.mark.parametrize("H", [1, 3, 16, 17, 64, 96])
def test_cpu_hidden_sizes_not_multiple_of_the_vector_width(H):
    compare(2, 11, H, 3, "offset", FLAG_SETS[4], F64, seed=H)


# rectangular widths (H_e, M, H_x): egnn-pytorch's EGNN(dim=16) through nn/compat.py, widths that are
# and are not multiples of the vector width, and H_x < M < H_e orders
RECT_WIDTHS = [(66, 16, 64), (5, 3, 4), (24, 40, 8), (130, 32, 129)]


@pytest.mark.parametrize("N", [1, 7, 33])
@pytest.mark.parametrize("edge_mode", ["none", "dense", "offset"])
@pytest.mark.parametrize("flags", FLAG_SETS, ids=flag_id)
@pytest.mark.parametrize("widths", RECT_WIDTHS, ids=lambda w: "x".join(map(str, w)))
def test_cpu_rectangular_widths_match_reference_float64(N, edge_mode, flags, widths):
    """The kernels run H_e, M, H_x as given (each padded to the column chunk), not padded to one
    square width by the dispatcher (which cost egnn-pytorch's layer ~5x the products)."""
    compare(2, N, widths, 3, edge_mode, flags, F64, seed=N + sum(widths))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("edge_mode", ["dense", "offset"])
def test_cpu_rectangular_widths_low_precision_within_reference_error(dtype, edge_mode):
    compare(3, 29, (66, 16, 65), 4, edge_mode, FLAG_SETS[4], dtype, seed=5)


def test_cpu_does_not_pad_rectangular_widths_to_a_square():
    """The dispatcher hands the cpu kernels the widths as they are (it zero-padded them to the widest
    before, 25x the per-pair products for egnn-pytorch's layer at dim = 64)."""
    from protdiff_fast.ops import _padding

    assert _padding.padded_widths("cpu") is None
    args, kw = make_problem(1, 5, (66, 16, 64), 0, "none", FLAG_SETS[0])
    seen = {}
    import protdiff_fast.ops.egnn_cpu as egnn_cpu

    real = egnn_cpu._EgnnPairAggregateCPU.apply

    def spy(*a):
        seen["W2"], seen["W3"] = tuple(a[4].shape), tuple(a[6].shape)
        return real(*a)

    egnn_cpu._EgnnPairAggregateCPU.apply = spy
    try:
        egnn_pair_aggregate(*args, backend="cpu", **kw)
    finally:
        egnn_cpu._EgnnPairAggregateCPU.apply = real
    assert seen == {"W2": (66, 16), "W3": (16, 64)}


def test_every_simd_build_matches_reference():
    before = _C.simd_isa()
    try:
        for isa in _C.supported_simd_isas().split(","):
            _C.set_simd_isa(isa)
            for dtype in (F64, torch.float32):
                compare(2, 19, 24, 4, "dense", FLAG_SETS[4], dtype, seed=7)
                compare(2, 19, 24, 4, "offset", FLAG_SETS[1], dtype, seed=8)
                compare(2, 19, (34, 8, 33), 4, "dense", FLAG_SETS[5], dtype, seed=9)
    finally:
        _C.set_simd_isa(before)
    with pytest.raises(ValueError, match="unknown instruction set"):
        _C.set_simd_isa("neon9")


def test_gradcheck_float64_through_cpp():
    args, kw = make_problem(2, 5, 4, 2, "offset", FLAG_SETS[4], seed=3, K=2)
    names = [k for k, v in kw.items() if torch.is_tensor(v) and v.dtype.is_floating_point]
    leaves = [t.clone().requires_grad_(True) for t in tensor_inputs(args, kw)]
    # normalize divides by a detached distance, which finite differences do see: test it off here
    flags = {k: v for k, v in kw.items() if not (torch.is_tensor(v) and v.dtype.is_floating_point)}
    flags["normalize"] = False

    def fn(*t):
        return egnn_pair_aggregate(*t[:9], backend="cpu", **flags, **dict(zip(names, t[9:])))

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)
    args, kw = make_problem(1, 4, 3, 2, "dense", FLAG_SETS[2], seed=4)
    names = [k for k, v in kw.items() if torch.is_tensor(v) and v.dtype.is_floating_point]
    leaves = [t.clone().requires_grad_(True) for t in tensor_inputs(args, kw)]
    flags = {k: v for k, v in kw.items() if not (torch.is_tensor(v) and v.dtype.is_floating_point)}
    assert torch.autograd.gradcheck(lambda *t: egnn_pair_aggregate(*t[:9], backend="cpu", **flags,
                                                                   **dict(zip(names, t[9:]))), leaves)


def _forward_backward_bits(args, kw):
    g = torch.Generator().manual_seed(9)
    up = (torch.randn(*args[1].shape, generator=g), torch.randn(*args[0].shape, generator=g))
    out = run("cpu", args, kw, torch.float32, (up[0].double(), up[1].double()))
    return [t.detach().clone() for t in out]


def test_same_bits_for_any_thread_count_and_repeated_runs():
    args, kw = make_problem(2, 70, 32, 3, "offset", FLAG_SETS[4], seed=5)
    before = _C.max_threads()
    try:
        _C.set_num_threads(1)
        one = _forward_backward_bits(args, kw)
        _C.set_num_threads(2)
        two = _forward_backward_bits(args, kw)
        again = _forward_backward_bits(args, kw)
        _C.set_num_threads(3)  # more threads than cores: still the same partition of the work
        three = _forward_backward_bits(args, kw)
    finally:
        _C.set_num_threads(before)
    for name, a, b, c, d in zip(NAMES + ["rel", "w_att", "b_att"], one, two, again, three):
        assert torch.equal(a, b) and torch.equal(b, c) and torch.equal(c, d), name


def test_backward_workspace_reused_across_calls_and_threads():
    """The backward's partial buffers live in a per-thread workspace kept between calls: a call after
    a larger one (stale partials left in it), and calls from several Python threads at once, give
    the bits of a lone call."""
    from concurrent.futures import ThreadPoolExecutor

    small = make_problem(2, 21, 32, 3, "offset", FLAG_SETS[4], seed=11)
    large = make_problem(3, 45, 64, 4, "dense", FLAG_SETS[2], seed=12)
    first = _forward_backward_bits(*small)
    _forward_backward_bits(*large)
    after_large = _forward_backward_bits(*small)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_forward_backward_bits, *(small if k % 2 else large)) for k in range(8)]
        results = [f.result() for f in futures]
    for name, a, b in zip(NAMES, first, after_large):
        assert torch.equal(a, b), name
    for res in results[1::2]:
        for name, a, b in zip(NAMES, first, res):
            assert torch.equal(a, b), name
    large_again = _forward_backward_bits(*large)
    for res in results[0::2]:
        for name, a, b in zip(NAMES, large_again, res):
            assert torch.equal(a, b), name


def test_layer_trains_end_to_end_on_cpu_backend():
    torch.manual_seed(0)
    H, E, N = 32, 8, 23
    ref_layer = EGNNLayer(H, E, attention=True, normalize=True, coord_init_gain=1.0, backend="reference").double()
    cpu_layer = EGNNLayer(H, E, attention=True, normalize=True, coord_init_gain=1.0, backend="cpu").double()
    cpu_layer.load_state_dict(ref_layer.state_dict())
    auto_layer = EGNNLayer(H, E, backend="auto")
    assert auto_layer.backend_for("cpu") == "cpu"
    h, x = torch.randn(3, N, H, dtype=F64), torch.randn(3, N, 3, dtype=F64)
    table = torch.randn(2 * N - 1, E, dtype=F64)
    mask = random_mask(3, N)
    outs = []
    for layer in (ref_layer, cpu_layer):
        h_out, x_out = layer(h, x, table, mask)
        loss = h_out.pow(2).mean() + x_out.pow(2).mean()
        grads = torch.autograd.grad(loss, list(layer.parameters()))
        outs.append((h_out, x_out, grads))
    assert_close_rel(outs[1][0], outs[0][0], 1e-11, "h")
    assert_close_rel(outs[1][1], outs[0][1], 1e-11, "x")
    for (name, _), a, b in zip(cpu_layer.named_parameters(), outs[1][2], outs[0][2]):
        assert_close_rel(a, b, 1e-9, f"grad {name}")
    # and a few optimizer steps reduce a loss
    opt = torch.optim.Adam(cpu_layer.parameters(), lr=1e-2)
    target = torch.randn(3, N, H, dtype=F64)
    losses = []
    for _ in range(20):
        h_out, _ = cpu_layer(h, x, table, mask)
        loss = (h_out - target).pow(2)[mask].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]


def test_cpu_backend_bad_input():
    args, kw = make_problem(2, 5, 4, 2, "none", {}, seed=1)
    bad = list(args)
    bad[0] = bad[0].clone()
    bad[0][0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="x: contains NaN"):
        egnn_pair_aggregate(*bad, backend="cpu", **kw)
    with pytest.raises(ValueError, match=r"W3: expected shape \(4, \*\)"):  # (M, H_x)
        egnn_pair_aggregate(*args[:6], torch.randn(5, 4, dtype=F64), *args[7:], backend="cpu", **kw)
    with pytest.raises(RuntimeError, match="the cpu backend takes CPU tensors, got device meta"):
        egnn_pair_aggregate(args[0].to("meta"), *args[1:], backend="cpu")
    # the C++ layer checks buffer sizes itself too
    f32 = [a.float().numpy() for a in args]
    m_out, dx_out = np.empty((2, 5, 4), np.float32), np.empty((2, 5, 3), np.float32)
    with pytest.raises(ValueError, match=r"q: expected shape \(2, 5, 4\), got \(2, 4, 4\)"):
        _C.egnn_forward(f32[0], f32[1], f32[2][:, :4].copy(), *f32[3:], m_out=m_out, dx_out=dx_out)
    with pytest.raises(ValueError, match=r"m_out: expected shape"):
        _C.egnn_forward(*f32, m_out=np.empty((2, 5, 3), np.float32), dx_out=dx_out)
    with pytest.raises(TypeError):  # float64 buffers into float32 outputs: no overload, no conversion
        _C.egnn_forward(*[a.numpy() for a in args], m_out=m_out, dx_out=dx_out)


# ------------------------------------------------------------------ bf16 products on AMX
from protdiff_fast.ops.egnn_cpu import amx_status, uses_amx  # noqa: E402

needs_amx = pytest.mark.skipif(_C is None or not amx_status()[0],
                               reason=f"no AMX here: {amx_status()[1] if _C is not None else 'no extension'}")


@pytest.fixture
def medium_matmul_precision():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    yield
    torch.set_float32_matmul_precision(before)


def _forward(args, kw, dtype):
    cast = [a.to(dtype) for a in args]
    kw_c = {k: (v.to(dtype) if torch.is_tensor(v) and v.dtype.is_floating_point else v) for k, v in kw.items()}
    return egnn_pair_aggregate(*cast, backend="cpu", **kw_c)


@needs_amx
@pytest.mark.parametrize("N, H, edge_mode, flags", [
    (7, 20, "offset", FLAG_SETS[4]), (33, 64, "dense", FLAG_SETS[1]), (50, 128, "none", FLAG_SETS[0]),
    (19, 256, "offset", FLAG_SETS[5]), (23, (258, 64, 257), "none", FLAG_SETS[4]),
])
def test_amx_bf16_forward_within_bf16_reference_error(N, H, edge_mode, flags, monkeypatch):
    assert uses_amx(torch.bfloat16) and not uses_amx(torch.float32)
    args, kw = make_problem(3, N, H, 5, edge_mode, flags, seed=N + (H if isinstance(H, int) else sum(H)))
    want = egnn_pair_aggregate_reference(*args, **kw)
    bf16_args = [a.to(torch.bfloat16) for a in args]
    bf16_kw = {k: (v.to(torch.bfloat16) if torch.is_tensor(v) and v.dtype.is_floating_point else v)
               for k, v in kw.items()}
    low_ref = egnn_pair_aggregate_reference(*bf16_args, **bf16_kw)
    got = _forward(args, kw, torch.bfloat16)
    monkeypatch.setenv("PROTDIFF_FAST_AMX", "0")
    upcast = _forward(args, kw, torch.bfloat16)  # the fp32 kernels on the same bf16 inputs
    for name, a, lo, w, u in zip(("m_i", "dx_i"), got, low_ref, want, upcast):
        assert a.dtype == torch.bfloat16 and bool(torch.isfinite(a).all()), name
        tol = 2 * rel_err(lo, w) + torch.finfo(torch.bfloat16).eps / 2
        assert_close_rel(a, w, tol, f"{name} (AMX, N={N}, H={H}, {edge_mode}, {flag_id(flags)})")
    assert any(not torch.equal(a, u) for a, u in zip(got, upcast)), "the AMX path did not run"


@needs_amx
@pytest.mark.parametrize("H, edge_mode, flags, seed", [
    (64, "offset", FLAG_SETS[4], 0), (64, "none", FLAG_SETS[4], 1), (32, "offset", FLAG_SETS[4], 12),
])
def test_amx_bf16_saturated_silu_within_bf16_reference_error(H, edge_mode, flags, seed, monkeypatch):
    """p, q ~50 and coordinates ~100: z_ij in the thousands, silu saturated, and a few columns of
    y = a W2 + b2 cancel to O(10). One bf16 rounding of a before AMX's product moved those columns
    across silu's bend, where the backward's silu'(y) and the attention gate read them: b2's
    gradient came out at 4x the bf16 reference's error (the first case), q's at 3x (the second),
    m_i at 3.7x (the third), while the fp32 kernels on the same bf16 inputs (PROTDIFF_FAST_AMX=0)
    stayed at the rounded-input level.

    In this regime the whole-bf16 reference is off by 3x |w| for W3, b3 and w4 (first case), so
    compare_problem's bound for them is 6 and passes anything: the AMX path is also held to 2x the
    error of the fp32 kernels on the same bf16 inputs, for every gradient that bound can see (not
    d w_att and d b_att, ~1e-10: exactly 0 in fp32 arithmetic, the attention gate saturated)."""
    assert uses_amx(torch.bfloat16)
    args, kw = make_problem(2, 33, H, 4, edge_mode, flags, seed)
    args[0] = args[0] * (100 / 1.5)
    args[1], args[2] = args[1] * 50, args[2] * 50
    what = f"AMX, saturated silu, H={H}, {edge_mode}, {flag_id(flags)}"
    compare_problem(args, kw, torch.bfloat16, seed, what)
    g = torch.Generator().manual_seed(seed + 1)  # compare_problem's upstream gradients
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
        tol = 2 * rel_err(u, w) + torch.finfo(torch.bfloat16).eps / 2
        if tol < 1:  # else even zeros pass: nothing to check
            assert_close_rel(a, w, tol, f"{name} ({what}, against the fp32 kernels' error)")
            checked += 1
    assert checked >= len(NAMES) + len(extra) - 2, checked


@needs_amx
def test_amx_fp32_inputs_under_medium_matmul_precision(medium_matmul_precision):
    args, kw = make_problem(2, 37, 64, 4, "offset", FLAG_SETS[4], seed=3)
    want = egnn_pair_aggregate_reference(*args, **kw)
    bf16_ref = egnn_pair_aggregate_reference(*[a.to(torch.bfloat16) for a in args],
                                             **{k: (v.to(torch.bfloat16) if torch.is_tensor(v) and
                                                    v.dtype.is_floating_point else v) for k, v in kw.items()})
    assert uses_amx(torch.float32)
    got = _forward(args, kw, torch.float32)
    torch.set_float32_matmul_precision("highest")
    exact = _forward(args, kw, torch.float32)
    for name, a, e, lo, w in zip(("m_i", "dx_i"), got, exact, bf16_ref, want):
        assert a.dtype == torch.float32
        assert_close_rel(a, w, 2 * rel_err(lo, w), f"{name} (fp32 inputs, bf16 products)")
        assert_close_rel(e, w, 1e-5, f"{name} (fp32 inputs, highest precision)")
        assert rel_err(a, w) > 10 * rel_err(e, w), "medium precision did not change the products"


@needs_amx
@pytest.mark.parametrize("N, H, edge_mode, flags", [(21, 32, "offset", FLAG_SETS[1]), (40, 128, "dense", FLAG_SETS[4]),
                                                    (17, (130, 32, 129), "dense", FLAG_SETS[5])])
def test_amx_gradients_within_bf16_reference_error(N, H, edge_mode, flags, medium_matmul_precision):
    """float32 inputs under 'medium': outputs and every gradient within 2x the error of the
    reference run in bf16 (the backward's products on AMX too), and not the fp32 answer."""
    args, kw = make_problem(2, N, H, 5, edge_mode, flags, seed=N)
    g = torch.Generator().manual_seed(N + 1)
    M = args[4].shape[1]
    upstream = (torch.randn(2, N, M, generator=g, dtype=F64), torch.randn(2, N, 3, generator=g, dtype=F64))
    want = run("reference", args, kw, F64, upstream)
    low_ref = run("reference", args, kw, torch.bfloat16, upstream)
    got = run("cpu", args, kw, torch.float32, upstream)
    torch.set_float32_matmul_precision("highest")
    exact = run("cpu", args, kw, torch.float32, upstream)
    extra = [k for k, v in kw.items() if torch.is_tensor(v) and v.dtype.is_floating_point]
    for name, a, lo, w, e in zip(NAMES + extra, got, low_ref, want, exact):
        assert bool(torch.isfinite(a).all()), name
        assert_close_rel(a, w, 2 * rel_err(lo, w) + 1e-6, f"{name} (medium precision, AMX)")
    changed = [n for n, a, e in zip(NAMES[2:], got[2:], exact[2:]) if not torch.equal(a, e)]
    assert {"x", "p", "q", "W2", "W3"} <= set(changed), f"the backward products did not run on AMX: {changed}"


def test_amx_needs_the_avx512_kernels():
    if _C is None or "avx2" not in _C.supported_simd_isas().split(","):
        pytest.skip("no avx2 build to switch to")
    before = _C.simd_isa()
    try:
        _C.set_simd_isa("avx2")
        # the reason names the ISA where the CPU has AMX, the CPU where it has none (then the ISA is moot)
        reason = amx_status()[1]
        assert not uses_amx(torch.bfloat16)
        assert ("avx512" in reason) if _C.amx_available() else (reason == _C.amx_unavailable_reason()), reason
        args, kw = make_problem(1, 5, 8, 2, "none", FLAG_SETS[0])
        out = [np.zeros((1, 5, 8), np.float32), np.zeros((1, 5, 3), np.float32)]
        with pytest.raises(ValueError, match="amx: (needs the avx512 kernels|this CPU|the kernel|this build)"):
            _C.egnn_forward(*[a.float().numpy() for a in args], m_out=out[0], dx_out=out[1], amx=True)
    finally:
        _C.set_simd_isa(before)


def test_cli_matmul_precision_flag(capsys):
    from protdiff_fast.cli import main

    before = torch.get_float32_matmul_precision()
    try:
        assert main(["--matmul-precision", "medium", "info", "--device", "cpu"]) == 0
        assert torch.get_float32_matmul_precision() == "medium"
        assert "bf16 pair products on AMX" in capsys.readouterr().out
    finally:
        torch.set_float32_matmul_precision(before)


@needs_amx
def test_torch_amx_matmuls_stay_correct_around_ours(medium_matmul_precision):
    """torch's bf16 matmuls (oneDNN, AMX tiles on this CPU) share the threads' tile configuration
    with our products: each side must set its own, so results before and after ours agree."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 256, generator=g).bfloat16(), torch.randn(256, 200, generator=g).bfloat16()
    want = a.double() @ b.double()
    first = a @ b
    args, kw = make_problem(2, 40, 128, 3, "offset", FLAG_SETS[1], seed=9)
    for _ in range(3):
        _forward(args, kw, torch.float32)
        again = a @ b
        assert torch.equal(again, first)
    assert rel_err(first.double(), want) < 1e-2


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_float32_coordinates_are_at_least_as_accurate_as_bf16_coordinates(backend):
    """The mixed contract on the other backends: with protein-sized coordinates (tens of units),
    float32 x keeps dx_i and d x at least as accurate as an all-bf16 call (bf16 x alone costs ~1e-3),
    m_i comes out in bf16, dx_i and d x in float32."""
    args, kw = make_problem(2, 25, 16, 3, "offset", FLAG_SETS[3], seed=5)
    args[0] = args[0] * 8
    g = torch.Generator().manual_seed(6)
    up = (torch.randn(2, 25, 16, generator=g, dtype=F64), torch.randn(2, 25, 3, generator=g, dtype=F64))
    want = run("reference", args, kw, F64, up)
    low = run(backend, args, kw, torch.bfloat16, up)
    mixed = run(backend, args, kw, torch.bfloat16, up, x_dtype=torch.float32)
    assert mixed[0].dtype == torch.bfloat16 and mixed[1].dtype == mixed[2].dtype == torch.float32
    for k, name in ((1, "dx_i"), (2, "x")):
        assert rel_err(mixed[k], want[k]) <= rel_err(low[k], want[k]), name
    assert rel_err(mixed[1], want[1]) < 0.75 * rel_err(low[1], want[1])  # dx_i: x rounded to bf16 is a large part of it
    assert rel_err(mixed[0], want[0]) <= 2 * rel_err(low[0], want[0]) + 1e-3


@needs_amx
@pytest.mark.parametrize("widths", [(0, 4, 4), (4, 0, 4), (4, 4, 0)], ids=lambda w: "x".join(map(str, w)))
def test_amx_with_an_empty_width_does_not_crash(widths, medium_matmul_precision):
    """A zero width left the AMX scratch unallocated (it was keyed on the packed W2's size): a null write
    (SEGV) once the kernels took rectangular widths. Degenerate, but it must compute what the reference does."""
    args, kw = make_problem(2, 9, widths, 0, "none", FLAG_SETS[1] if widths[1] else FLAG_SETS[0], seed=4)
    want = egnn_pair_aggregate_reference(*args, **kw)
    got = _forward(args, kw, torch.float32)
    for a, w in zip(got, want):
        assert a.shape == w.shape and bool(torch.isfinite(a).all())
        if w.numel():  # m_i is (B, N, 0) when M = 0
            assert float((a.double() - w).abs().max()) <= 1e-2 * (1 + float(w.abs().max()))


# ------------------------------------------------------------------ wrapper plumbing (mutation-testing gaps)
@pytest.mark.parametrize("edge_mode", ["none", "dense", "offset"])
@pytest.mark.parametrize("flags", [dict(normalize="clamp"), dict(normalize="clamp", attention=True, tanh=True,
                                                                  coords_agg="sum")], ids=flag_id)
def test_cpu_clamp_normalize_matches_reference_float64(edge_mode, flags):
    """normalize="clamp" reaches the kernels as their mode 2 (max(length, eps), the gradient through the
    length), not as True's stopgrad length: the x gradients differ."""
    compare(2, 9, 8, 3, edge_mode, flags, F64, seed=21)


def test_cpu_dense_edge_gradient_only_when_asked(monkeypatch):
    """The O(N^2 E) edge_attr gradient is computed only when edge_attr needs one, decided by its own
    needs_input_grad (not W_e's); the gradients that are asked for match the reference either way."""
    import protdiff_fast.ops.egnn_cpu as egnn_cpu

    args, kw = make_problem(2, 7, 6, 3, "dense", FLAG_SETS[1], seed=31)
    asked = []
    real_ext = egnn_cpu._ext()

    class Spy:
        def __getattr__(self, name):
            return getattr(real_ext, name)

        def egnn_backward(self, *a, **k):
            asked.append(k["d_edge_attr"] is not None)
            return real_ext.egnn_backward(*a, **k)

    monkeypatch.setattr(egnn_cpu, "_ext", lambda: Spy())
    for edge_grad, W_e_grad in [(False, True), (True, False), (True, True)]:
        got = []
        for backend in ("reference", "cpu"):
            x = args[0].clone().requires_grad_(True)
            ea = kw["edge_attr"].clone().requires_grad_(edge_grad)
            We = kw["W_e"].clone().requires_grad_(W_e_grad)
            m, dx = egnn_pair_aggregate(x, *args[1:], backend=backend, **{**kw, "edge_attr": ea, "W_e": We})
            leaves = [x] + [t for t in (ea, We) if t.requires_grad]
            got.append(torch.autograd.grad(m.sum() + dx.pow(2).sum(), leaves))
        for a, b in zip(got[1], got[0]):
            assert_close_rel(a, b, 1e-10, f"edge_attr grad {edge_grad}, W_e grad {W_e_grad}")
    assert asked == [False, True, True]


def test_cpu_wrapper_refuses_non_cpu_tensors_itself():
    """Called directly (not through the dispatcher), the cpu backend names a non-CPU device."""
    from protdiff_fast.ops.egnn_cpu import egnn_pair_aggregate_cpu

    args, kw = make_problem(1, 4, 3, 2, "none", {}, seed=2)
    meta = [a.to("meta") for a in args]
    with pytest.raises(ValueError, match="the cpu backend takes CPU tensors, got device meta"):
        egnn_pair_aggregate_cpu(*meta, mask=None)
