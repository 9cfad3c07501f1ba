"""The plain-torch EGNN reference: conventions, the fused-op split, symmetries, masks, bad input."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close_rel, random_mask, random_orthogonal, rel_err
from protdiff_fast.nn import EGNN, EGNNLayer
from protdiff_fast.reference.egnn import egnn_layer_reference, egnn_pair_aggregate_reference

F64 = torch.float64
FLAGS = [dict(attention=a, normalize=n, tanh=t, coords_agg=c)
         for a, n, t, c in itertools.product([False, True], [False, True], [False, True], ["mean", "sum"])]
EDGE_MODES = ["none", "dense", "offset"]


def flag_id(f):
    return "-".join(k for k in ("attention", "normalize", "tanh") if f[k]) + f"-{f['coords_agg']}"


def make_layer(H=8, E=0, dtype=F64, coord_init_gain=1.0, **flags):
    # gain 1 (not the default 0.001) so the coordinate update is O(1) and every check sees it
    layer = EGNNLayer(H, E, coord_init_gain=coord_init_gain, backend="reference", **flags).to(dtype)
    if flags.get("attention"):
        with torch.no_grad():  # keep the gate away from saturation so it matters
            layer.att[0].weight.mul_(0.3)
    return layer


def make_edges(mode, B, N, E, dtype=F64, K=None):
    if mode == "none":
        return None
    if mode == "dense":
        return torch.randn(B, N, N, E, dtype=dtype)
    K = K if K is not None else max(N - 1, 1)
    return torch.randn(2 * K + 1, E, dtype=dtype)


def make_inputs(B, N, H, dtype=F64):
    return torch.randn(B, N, H, dtype=dtype), 1.5 * torch.randn(B, N, 3, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Conventions: a scalar loop over pairs, written independently of both tensor implementations
# ----------------------------------------------------------------------------------------------
def naive_layer(layer, h, x, edge_attr, mask):
    B, N, H = h.shape
    h_out, x_out = torch.zeros_like(h), torch.zeros_like(x)
    for b in range(B):
        real = [i for i in range(N) if mask[b, i]]
        n = len(real)
        for i in real:
            m_i = torch.zeros(H, dtype=h.dtype)
            dx = torch.zeros(3, dtype=h.dtype)
            for j in real:
                if j == i:
                    continue
                diff = x[b, i] - x[b, j]
                d2 = (diff * diff).sum().reshape(1)
                feats = [h[b, i], h[b, j], d2]
                if edge_attr is not None:
                    if edge_attr.dim() == 2:
                        K = edge_attr.shape[0] // 2
                        feats.append(edge_attr[min(max(j - i, -K), K) + K])
                    else:
                        feats.append(edge_attr[b, i, j])
                m_ij = layer.phi_e(torch.cat(feats))
                if layer.att is not None:
                    m_ij = m_ij * layer.att(m_ij)
                phi = layer.phi_x(m_ij)
                if layer.normalize:
                    diff = diff / (d2.sqrt() + layer.eps)
                m_i = m_i + m_ij
                dx = dx + diff * phi
            C = 1.0 / max(n - 1, 1) if layer.coords_agg == "mean" else 1.0
            x_out[b, i] = x[b, i] + C * dx
            h_out[b, i] = h[b, i] + layer.phi_h(torch.cat([h[b, i], m_i]))
    return h_out, x_out


@pytest.mark.parametrize("edge_mode", EDGE_MODES)
@pytest.mark.parametrize("flags", FLAGS[::3] + [FLAGS[-1]], ids=flag_id)
def test_reference_layer_matches_scalar_loop(edge_mode, flags):
    B, N, H, E = 2, 5, 6, 3
    layer = make_layer(H, E if edge_mode != "none" else 0, **flags)
    h, x = make_inputs(B, N, H)
    # offset table with K < N - 1, so the clipping is exercised
    edges = make_edges(edge_mode, B, N, E, K=2)
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 0, 1, 1, 0]], dtype=torch.bool)
    with torch.no_grad():
        want_h, want_x = naive_layer(layer, h, x, edges, mask)
        got_h, got_x = egnn_layer_reference(layer, h, x, edges, mask)
        split_h, split_x = layer(h, x, edges, mask)
    for got, want, what in ((got_h, want_h, "h literal"), (got_x, want_x, "x literal"),
                            (split_h, want_h, "h split"), (split_x, want_x, "x split")):
        assert_close_rel(got, want, 1e-12, what)


# ----------------------------------------------------------------------------------------------
# The fused-op split (p, q, w_d, W_e / rel) equals the literal layer, forward and backward
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("N", [1, 2, 7, 33])
@pytest.mark.parametrize("edge_mode", EDGE_MODES)
@pytest.mark.parametrize("flags", FLAGS, ids=flag_id)
def test_split_layer_matches_literal_layer_fwd_bwd(N, edge_mode, flags):
    B, H, E = 3, 8, 4
    layer = make_layer(H, E if edge_mode != "none" else 0, **flags)
    h, x = make_inputs(B, N, H)
    edges = make_edges(edge_mode, B, N, E)
    mask = random_mask(B, N)
    inputs = [t for t in (h, x, edges) if t is not None]
    for t in inputs:
        t.requires_grad_(True)
    params = list(layer.parameters())

    def run(fn):
        out_h, out_x = fn(h, x, edges, mask)
        # a random linear functional of both outputs exercises every gradient path
        g = torch.Generator().manual_seed(1)
        loss = (out_h * torch.randn(out_h.shape, generator=g, dtype=F64)).sum() + \
               (out_x * torch.randn(out_x.shape, generator=g, dtype=F64)).sum()
        grads = torch.autograd.grad(loss, inputs + params, allow_unused=True)
        return out_h, out_x, grads

    ref = run(lambda *a: egnn_layer_reference(layer, *a))
    got = run(layer)
    assert_close_rel(got[0], ref[0], 1e-12, "h")
    assert_close_rel(got[1], ref[1], 1e-12, "x")
    names = ["h", "x", "edge_attr"][: len(inputs)] + [n for n, _ in layer.named_parameters()]
    for name, g_got, g_ref in zip(names, got[2], ref[2]):
        if g_ref is None:
            assert g_got is None or float(g_got.abs().max()) == 0.0, name
            continue
        assert_close_rel(g_got, g_ref, 1e-10, f"grad {name}")


def test_pair_aggregate_gradcheck_float64():
    B, N, H, E = 2, 4, 3, 2
    g = torch.Generator().manual_seed(3)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=F64, requires_grad=True)

    args = (r(B, N, 3), r(B, N, H), r(B, N, H), r(H), r(H, H), r(H), r(H, H), r(H), r(H))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    for extra in (dict(edge_attr=r(B, N, N, E), W_e=r(E, H)), dict(rel=r(5, H)),
                  dict(w_att=r(H), b_att=r(()), tanh=True, coords_agg="sum")):
        def fn(*a, extra=extra):
            return egnn_pair_aggregate_reference(*a[:9], mask=mask, **dict(zip(extra, a[9:])),
                                                 **{k: v for k, v in extra.items() if not torch.is_tensor(v)})
        tensors = tuple(v for v in extra.values() if torch.is_tensor(v))
        assert torch.autograd.gradcheck(fn, args + tensors, eps=1e-6, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# E(3) and permutation equivariance, mask invariance, C = 1/(n - 1)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reflect", [False, True], ids=["rotation", "reflection"])
@pytest.mark.parametrize("edge_mode", EDGE_MODES)
@pytest.mark.parametrize("flags", FLAGS[::2], ids=flag_id)
def test_e3_equivariance(reflect, edge_mode, flags):
    B, N, H, E = 2, 9, 8, 3
    layer = make_layer(H, E if edge_mode != "none" else 0, **flags)
    h, x = make_inputs(B, N, H)
    edges = make_edges(edge_mode, B, N, E)
    mask = random_mask(B, N, min_real=3)
    Q = random_orthogonal(reflect)
    shift = torch.randn(1, 1, 3, dtype=F64) * 5
    with torch.no_grad():
        h1, x1 = layer(h, x, edges, mask)
        h2, x2 = layer(h, x @ Q.T + shift, edges, mask)
    keep = mask.unsqueeze(-1).to(F64)
    assert_close_rel(h2, h1, 1e-12, "h must be invariant")
    assert_close_rel(x2, (x1 @ Q.T + shift) * keep, 1e-12, "x must be equivariant")
    # the update itself, not only x + small: it must be a real O(1) vector that rotates
    dx1, dx2 = (x1 - x) * keep, (x2 - (x @ Q.T + shift)) * keep
    assert float(dx1.norm()) > 1e-3 * float((x * keep).norm())
    assert_close_rel(dx2, dx1 @ Q.T, 1e-11, "dx must rotate")


@pytest.mark.parametrize("edge_mode", ["none", "dense"])
@pytest.mark.parametrize("flags", FLAGS[::3], ids=flag_id)
def test_permutation_equivariance(edge_mode, flags):
    B, N, H, E = 2, 11, 8, 3
    layer = make_layer(H, E if edge_mode != "none" else 0, **flags)
    h, x = make_inputs(B, N, H)
    edges = make_edges(edge_mode, B, N, E)
    mask = random_mask(B, N, min_real=2)
    perm = torch.randperm(N)
    with torch.no_grad():
        h1, x1 = layer(h, x, edges, mask)
        edges_p = None if edges is None else edges[:, perm][:, :, perm]
        h2, x2 = layer(h[:, perm], x[:, perm], edges_p, mask[:, perm])
    assert_close_rel(h2, h1[:, perm], 1e-12, "h")
    assert_close_rel(x2, x1[:, perm], 1e-12, "x")


@pytest.mark.parametrize("edge_mode", EDGE_MODES)
@pytest.mark.parametrize("flags", FLAGS[::3], ids=flag_id)
def test_padding_changes_nothing(edge_mode, flags):
    H, E, n = 8, 3, 7
    layer = make_layer(H, E if edge_mode != "none" else 0, **flags)
    h, x = make_inputs(1, n, H)
    # sequence-offset edges depend on index gaps, so there padding goes at the end only
    N = 12
    real_pos = torch.arange(n) if edge_mode == "offset" else torch.sort(torch.randperm(N)[:n]).values
    mask = torch.zeros(1, N, dtype=torch.bool)
    mask[0, real_pos] = True
    hp, xp = torch.randn(1, N, H, dtype=F64) * 100, torch.randn(1, N, 3, dtype=F64) * 100  # garbage
    hp[:, real_pos], xp[:, real_pos] = h, x
    if edge_mode == "dense":
        edges = torch.randn(1, n, n, E, dtype=F64)
        edges_p = torch.randn(1, N, N, E, dtype=F64) * 100
        edges_p[:, real_pos[:, None], real_pos[None, :]] = edges
    else:
        edges = edges_p = make_edges(edge_mode, 1, N, E)
    with torch.no_grad():
        h1, x1 = layer(h, x, edges, None)
        h2, x2 = layer(hp, xp, edges_p, mask)
    assert_close_rel(h2[:, real_pos], h1, 1e-12, "h real")
    assert_close_rel(x2[:, real_pos], x1, 1e-12, "x real")
    assert float(h2[~mask].abs().max()) == 0.0 and float(x2[~mask].abs().max()) == 0.0, "padding rows must be zero"


def test_coordinate_scale_counts_real_nodes_only():
    B, N, H = 2, 9, 6
    g = torch.Generator().manual_seed(5)
    args = [torch.randn(*s, generator=g, dtype=F64) for s in
            ((B, N, 3), (B, N, H), (B, N, H), (H,), (H, H), (H,), (H, H), (H,), (H,))]
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[0, :4] = True  # n = 4  -> C = 1/3
    mask[1, ::2] = True  # n = 5 -> C = 1/4
    _, dx_sum = egnn_pair_aggregate_reference(*args, mask=mask, coords_agg="sum")
    _, dx_mean = egnn_pair_aggregate_reference(*args, mask=mask, coords_agg="mean")
    assert float(dx_sum.norm()) > 1e-3
    assert_close_rel(dx_mean[0], dx_sum[0] / 3, 1e-14, "sample 0")
    assert_close_rel(dx_mean[1], dx_sum[1] / 4, 1e-14, "sample 1")
    # two real nodes: dx_0 = (x_0 - x_1) phi_01 exactly, dx_1 = (x_1 - x_0) phi_10
    x, p, q, w_d, W2, b2, W3, b3, w4 = args
    two = torch.zeros(B, N, dtype=torch.bool)
    two[:, :2] = True
    _, dx = egnn_pair_aggregate_reference(*args, mask=two)
    d2 = (x[:, 0] - x[:, 1]).pow(2).sum(-1, keepdim=True)
    m01 = F.silu(F.silu(p[:, 0] + q[:, 1] + d2 * w_d) @ W2 + b2)
    phi01 = F.silu(m01 @ W3 + b3) @ w4
    assert_close_rel(dx[:, 0], (x[:, 0] - x[:, 1]) * phi01[:, None], 1e-13, "two-node update")
    assert float(dx[:, 2:].abs().max()) == 0.0


def test_offset_table_direction_is_j_minus_i():
    # Only offset +1 has a non-zero row: node i receives a message from j = i + 1 only.
    B, N, H = 1, 4, 5
    layer = make_layer(H, 2)
    table = torch.zeros(2 * 3 + 1, 2, dtype=F64)
    table[3 + 1] = torch.tensor([3.0, -2.0], dtype=F64)
    h, x = make_inputs(B, N, H)
    W1 = layer.phi_e[0].weight
    rel = (table @ W1[:, 2 * H + 1:].t()).detach()
    assert float(rel[3 + 1].abs().max()) > 0 and float(rel[3].abs().max()) == 0
    with torch.no_grad():
        got = egnn_layer_reference(layer, h, x, table, None)
        want = naive_layer(layer, h, x, table, torch.ones(B, N, dtype=torch.bool))
    assert_close_rel(got[0], want[0], 1e-12, "h")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offset_table_gradient_is_the_same_bits_every_call(dtype):
    """The table row of offset o receives the sum of N - |o| pair gradients per sample; with 2+ threads
    that sum must not depend on the threads' timing (rel[index]'s backward, index_put_ with accumulate,
    gave a different float32 result on 6 of 8 calls of this test before F.embedding replaced it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        g = torch.Generator().manual_seed(3)
        B, N, H = 3, 61, 16
        x = torch.randn(B, N, 3, generator=g)
        p, q = (torch.randn(B, N, H, generator=g).to(dtype) for _ in range(2))
        w_d, b2, b3, w4 = (0.3 * torch.randn(H, generator=g).to(dtype) for _ in range(4))
        W2, W3 = (0.3 * torch.randn(H, H, generator=g).to(dtype) for _ in range(2))
        rel = torch.randn(2 * N - 1, H, generator=g).to(dtype).requires_grad_()
        grad_m = torch.randn(B, N, H, generator=g).to(dtype)
        grads = []
        for _ in range(6):
            m, dx = egnn_pair_aggregate_reference(x, p, q, w_d, W2, b2, W3, b3, w4, rel=rel, normalize=True)
            (grad,) = torch.autograd.grad((m * grad_m).float().sum() + dx.sum(), rel)
            assert bool(torch.isfinite(grad).all()) and float(grad.abs().max()) > 0
            grads.append(grad)
        assert all(torch.equal(grads[0], other) for other in grads[1:])
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# Low precision: the reference runs in bf16 with bounded error (the baseline fast paths are held to)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_low_precision_error_is_bounded(dtype):
    B, N, H, E = 2, 17, 16, 4
    layer = make_layer(H, E, attention=True, normalize=True)
    h, x = make_inputs(B, N, H)
    table = make_edges("offset", B, N, E)
    mask = random_mask(B, N, min_real=2)
    with torch.no_grad():
        h64, x64 = layer(h, x, table, mask)
        low = make_layer(H, E, dtype=dtype, attention=True, normalize=True)
        low.load_state_dict({k: v.to(dtype) for k, v in layer.state_dict().items()})
        hl, xl = low(h.to(dtype), x.to(dtype), table.to(dtype), mask)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert_close_rel(hl, h64, tol, f"h {dtype}")
    assert_close_rel(xl, x64, tol, f"x {dtype}")


# ----------------------------------------------------------------------------------------------
# Bad input: a clear error naming the problem
# ----------------------------------------------------------------------------------------------
def _op_args(B=2, N=5, H=4, dtype=F64):
    return [torch.randn(*s, dtype=dtype) for s in
            ((B, N, 3), (B, N, H), (B, N, H), (H,), (H, H), (H,), (H, H), (H,), (H,))]


@pytest.mark.parametrize("case, error, match", [
    ("x 2-D", ValueError, r"x: expected shape \(\*, \*, 3\)"),
    ("x 4 coords", ValueError, r"x: expected shape"),
    ("q wrong N", ValueError, r"q: expected shape \(2, 5, 4\)"),
    ("W2 wrong", ValueError, r"W2: expected shape \(4, \*\)"),  # (H_e, M): M is free, H_e is p's
    ("int x", TypeError, r"x: expected a floating-point tensor"),
    ("mixed dtype", TypeError, r"p: expected dtype torch.float64"),
    ("meta device", ValueError, r"q: is on device meta"),
    ("all padding", ValueError, r"sample\(s\) \[1\] have no real nodes"),
    ("nan x", ValueError, r"x: contains NaN"),
    ("inf p", ValueError, r"p: contains Inf"),
    ("nan rel", ValueError, r"rel: contains NaN"),  # these three made every output NaN silently
    ("nan W2", ValueError, r"W2: contains NaN"),
    ("inf w4", ValueError, r"w4: contains Inf"),
    ("both edges", ValueError, r"at most one edge term"),
    ("edge without W_e", ValueError, r"edge_attr and W_e come together"),
    ("even rel", ValueError, r"rel: expected 2K \+ 1 rows"),
    ("bad agg", ValueError, r"coords_agg"),
    ("mask shape", ValueError, r"mask: expected shape \(2, 5\)"),
    ("mask values", ValueError, r"mask: expected booleans or 0/1"),
])
def test_pair_aggregate_rejects_bad_input(case, error, match):
    a = _op_args()
    kw = {}
    if case == "x 2-D":
        a[0] = a[0][0]
    elif case == "x 4 coords":
        a[0] = torch.randn(2, 5, 4, dtype=F64)
    elif case == "q wrong N":
        a[2] = torch.randn(2, 6, 4, dtype=F64)
    elif case == "W2 wrong":
        a[4] = torch.randn(5, 4, dtype=F64)
    elif case == "int x":
        a[0] = torch.ones(2, 5, 3, dtype=torch.long)
    elif case == "mixed dtype":
        a[1] = a[1].float()
    elif case == "meta device":
        a[2] = a[2].to("meta")
    elif case == "all padding":
        kw["mask"] = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    elif case == "nan x":
        a[0][1, 2, 0] = math.nan
    elif case == "inf p":
        a[1][0, 0, 0] = math.inf
    elif case == "nan rel":
        kw["rel"] = torch.randn(9, 4, dtype=F64)
        kw["rel"][3, 1] = math.nan
    elif case == "nan W2":
        a[4][1, 1] = math.nan
    elif case == "inf w4":
        a[8][0] = math.inf
    elif case == "both edges":
        kw.update(edge_attr=torch.randn(2, 5, 5, 2, dtype=F64), W_e=torch.randn(2, 4, dtype=F64),
                  rel=torch.randn(9, 4, dtype=F64))
    elif case == "edge without W_e":
        kw["edge_attr"] = torch.randn(2, 5, 5, 2, dtype=F64)
    elif case == "even rel":
        kw["rel"] = torch.randn(8, 4, dtype=F64)
    elif case == "bad agg":
        kw["coords_agg"] = "max"
    elif case == "mask shape":
        kw["mask"] = torch.ones(2, 4, dtype=torch.bool)
    elif case == "mask values":
        kw["mask"] = torch.full((2, 5), 2)
    with pytest.raises(error, match=match):
        egnn_pair_aggregate_reference(*a, **kw)


def test_layer_rejects_bad_input():
    layer = make_layer(8, 3)
    h, x = make_inputs(2, 5, 8)
    h_inf = h.clone()
    h_inf[1, 2, 0] = math.inf
    with pytest.raises(ValueError, match=r"^h \(or phi_e's first layer\), through p = W_src h \+ b1: contains Inf"):
        layer(h_inf, x, rel_offsets=torch.randn(5, 3, dtype=h.dtype))
    with pytest.raises(ValueError, match=r"^rel_offsets \(or W_e\), through rel = rel_offsets W_e\^T: contains NaN"):
        layer(h, x, rel_offsets=torch.full((5, 3), math.nan, dtype=h.dtype))
    with pytest.raises(ValueError, match="needs edge features"):
        layer(h, x)
    with pytest.raises(ValueError, match=r"h: expected shape \(\*, \*, 8\)"):
        layer(torch.randn(2, 5, 7, dtype=F64), x, torch.randn(9, 3, dtype=F64))
    with pytest.raises(ValueError, match=r"x: expected shape \(2, 5, 3\)"):
        layer(h, x[:, :4], torch.randn(9, 3, dtype=F64))
    with pytest.raises(ValueError, match="offset table needs 2K \\+ 1 rows"):
        layer(h, x, torch.randn(8, 3, dtype=F64))
    with pytest.raises(ValueError, match=r"edge_attr: expected shape \(2, 5, 5, 3\)"):
        layer(h, x, torch.randn(2, 5, 4, 3, dtype=F64))
    with pytest.raises(ValueError, match="edge_dim=0"):
        make_layer(8, 0)(h, x, torch.randn(9, 3, dtype=F64))
    with pytest.raises(ValueError, match="coords_agg"):
        EGNNLayer(8, coords_agg="max")
    # dtypes against the weights, named (were torch's "mat1 and mat2 must have the same dtype")
    with pytest.raises(TypeError, match=r"h: dtype torch.float32, but the module's weights are torch.float64"):
        layer(h.float(), x.float(), torch.randn(9, 3, dtype=F64))
    with pytest.raises(TypeError, match=r"edge_attr: expected dtype torch.float64 .* got torch.float32"):
        layer(h, x, torch.randn(9, 3))
    with pytest.raises(TypeError, match=r"edge_attr: expected dtype torch.float64 .* got torch.float32"):
        layer(h, x, torch.randn(2, 5, 5, 3))
    stack = EGNN(8, 16, num_layers=1).double()
    with pytest.raises(ValueError, match=r"h: expected shape \(\*, \*, 8\)"):
        stack(torch.randn(2, 5, 7, dtype=F64), x)
    with pytest.raises(TypeError, match=r"h: dtype torch.float32, but the module's weights are torch.float64"):
        stack(h.float(), x)
