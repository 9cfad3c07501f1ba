"""Batch-invariant node-wise products: a design's numbers do not depend on its batch mates."""
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close_rel
from protdiff_fast import backends
from protdiff_fast.nn import batch_invariant as batch_invariant_module
from protdiff_fast.nn.batch_invariant import ROWS, batch_invariant, center, is_batch_invariant, linear, sequential
from protdiff_fast.reference.com import remove_center_of_mass_reference

HAS_CPU = backends.cpu_extension() is not None


@pytest.mark.skipif(not HAS_CPU, reason="the exact path is the C++ extension's")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_rows_do_not_depend_on_how_many_rows_share_the_call(dtype, monkeypatch):
    # the C++ row-by-row product. The fixed-shape BLAS products (the path with gradients or off the CPU)
    # failed this very check on MKL (K = 33, H = 7, 105 rows against 23) once the allocator's state had
    # changed: MKL's bits depend on alignment too, so they are not held to it
    calls = []
    real = batch_invariant_module._rowwise_linear_cpu
    monkeypatch.setattr(batch_invariant_module, "_rowwise_linear_cpu", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(0)
    for K, H in [(64, 64), (128, 64), (512, 256), (33, 7)]:
        W, b = torch.randn(H, K, generator=g).to(dtype), torch.randn(H, generator=g).to(dtype)
        X = torch.randn(700, K, generator=g).to(dtype)
        with batch_invariant():
            ref = linear(X[:23], W, b)
            for rows, offset in [(23, 0), (24, 0), (100, 5), (700 - 16, 16), (300, ROWS - 1)]:
                got = linear(torch.cat([torch.randn(offset, K, generator=g).to(dtype), X[:rows]]), W, b)
                assert torch.equal(got[offset:offset + 23], ref), (K, H, rows, offset)
            assert torch.equal(linear(X[:23].view(1, 23, K), W)[0], linear(X[:23], W))  # leading dims
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert_close_rel(ref, F.linear(X[:23], W, b), tol, "the same product as F.linear")
        assert torch.equal(linear(X[:23], W, b), F.linear(X[:23], W, b)), "outside the context: F.linear itself"
    assert calls


@pytest.mark.skipif(not HAS_CPU, reason="needs the C++ extension")
def test_rowwise_linear_is_the_same_at_any_thread_count_and_checks_its_buffers():
    ext = backends.cpu_extension()
    g = torch.Generator().manual_seed(3)
    x, W, b = torch.randn(301, 96, generator=g), torch.randn(80, 96, generator=g), torch.randn(80, generator=g)
    before = torch.get_num_threads()
    try:
        with batch_invariant():
            ext.set_num_threads(1)
            one = linear(x, W, b)
            ext.set_num_threads(2)
            two = linear(x, W, b)
    finally:
        ext.set_num_threads(before)
    assert torch.equal(one, two)
    assert_close_rel(one.double(), x.double() @ W.double().t() + b.double(), 1e-6, "against float64")
    out = np.empty((301, 80), np.float32)
    with pytest.raises(ValueError, match="wt: expected shape"):
        ext.rowwise_linear(x.numpy(), W.numpy(), b.numpy(), out)  # W untransposed
    with pytest.raises(ValueError, match="bias"):
        ext.rowwise_linear(x.numpy(), W.t().contiguous().numpy(), np.zeros(3, np.float32), out)


def test_linear_under_gradients_takes_the_fixed_shape_products_and_differentiates():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(37, 20, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(12, 20, generator=g, dtype=torch.float64, requires_grad=True)
    with batch_invariant():
        assert batch_invariant_module._rowwise_linear_cpu(x, W, None) is None
        gx, gw = torch.autograd.grad(linear(x, W).square().sum(), (x, W))
    wx, ww = torch.autograd.grad(F.linear(x, W).square().sum(), (x, W))
    assert_close_rel(gx, wx, 1e-12, "d x")
    assert_close_rel(gw, ww, 1e-12, "d W")


def test_the_context_nests_restores_and_is_per_thread():
    assert not is_batch_invariant()
    with batch_invariant():
        assert is_batch_invariant()
        with batch_invariant(False):
            assert not is_batch_invariant()
        assert is_batch_invariant()
        seen = []
        thread = threading.Thread(target=lambda: seen.append(is_batch_invariant()))
        thread.start()
        thread.join()
        assert seen == [False]
    assert not is_batch_invariant()
    with pytest.raises(RuntimeError):
        with batch_invariant():
            raise RuntimeError("boom")
    assert not is_batch_invariant()


def test_sequential_and_center_match_the_plain_modules():
    g = torch.Generator().manual_seed(1)
    mlp = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.SiLU(), torch.nn.Linear(16, 5))
    x = torch.randn(3, 9, 12, generator=g)
    with torch.no_grad(), batch_invariant():
        assert_close_rel(sequential(mlp, x), mlp(x), 1e-6, "Sequential")
        assert_close_rel(sequential(mlp[0], x), mlp[0](x), 1e-6, "Linear")
    pts = torch.randn(3, 9, 3, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 4:] = False
    with batch_invariant():
        assert_close_rel(center(pts, mask), remove_center_of_mass_reference(pts, mask), 1e-14, "centring")


@pytest.mark.skipif(not HAS_CPU, reason="the sequential centring sum is the C++ kernel's")
def test_center_ignores_trailing_padding_bit_for_bit():
    g = torch.Generator().manual_seed(2)
    for n in [3, 10, 37, 128]:
        x = torch.randn(1, n, 3, generator=g) * 30
        with batch_invariant():
            alone = center(x, torch.ones(1, n, dtype=torch.bool))
            for pad, batch in [(1, 1), (9, 3), (40, 5)]:
                xb = torch.randn(batch, n + pad, 3, generator=g) * 30
                xb[batch - 1, :n], xb[batch - 1, n:] = x[0], 0.0
                mask = torch.ones(batch, n + pad, dtype=torch.bool)
                mask[batch - 1, n:] = False
                assert torch.equal(center(xb, mask)[batch - 1, :n], alone[0]), (n, pad, batch)


@pytest.mark.skipif(not HAS_CPU, reason="the fused cpu backend (the reference pair op is not batch-invariant)")
def test_protdiff_on_the_cpu_backend_gives_a_design_the_same_eps_in_any_batch():
    from protdiff_fast.cli import shipped_checkpoint
    from protdiff_fast.train import load_model

    model = load_model(shipped_checkpoint(), backend="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(), batch_invariant():
        for _ in range(12):
            n = int(torch.randint(5, 60, (1,), generator=g))
            x = torch.randn(1, n, 3, generator=g) * 3
            t = torch.randint(1, 1025, (1,), generator=g)
            alone = model(x, t, torch.ones(1, n, dtype=torch.bool))
            B = int(torch.randint(1, 6, (1,), generator=g))
            N = n + int(torch.randint(0, 9, (1,), generator=g))
            pos = int(torch.randint(0, B, (1,), generator=g))
            xb = torch.randn(B, N, 3, generator=g)
            xb[pos], xb[pos, :n] = 0.0, x[0]
            mask = torch.ones(B, N, dtype=torch.bool)
            mask[pos, n:] = False
            tb = torch.randint(1, 1025, (B,), generator=g)
            tb[pos] = t
            assert torch.equal(model(xb, tb, mask)[pos, :n], alone[0]), (n, B, N, pos)


@pytest.mark.skipif(not HAS_CPU, reason="per-design noise needs the C++ step")
def test_a_design_of_the_shipped_model_is_the_same_alone_as_in_its_batch():
    """At 10 residues (below the training range) the shipped model's chains still wander at the end,
    and a 1-ulp difference in the first step's eps grew to 0.0008 A (this machine, before
    batch_invariant): exactness, not closeness, is what is checked."""
    from protdiff_fast.cli import shipped_checkpoint
    from protdiff_fast.diffusion import DDPMScheduler
    from protdiff_fast.diffusion.sampler import sample
    from protdiff_fast.train import load_model

    model = load_model(shipped_checkpoint(), backend="cpu")
    cfg = model.config

    def run(**kw):
        sched = DDPMScheduler(cfg.num_timesteps, cfg.beta_start, cfg.beta_end, backend="cpu")
        with torch.no_grad(), pytest.warns(UserWarning, match="shorter than any chain"):
            return sample(model, [10, 12], batch_size=2, seed=5, scheduler=sched, progress=False, **kw)

    together = run()
    alone = run(design_indices=[0])
    assert alone[1] is None
    np.testing.assert_array_equal(alone[0], together[0])


@pytest.mark.skipif(not HAS_CPU, reason="needs the C++ extension")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rowwise_linear_sums_in_index_order_in_its_blocks_and_remainders_alike(dtype):
    """Each output is bias + x0 w0 + x1 w1 + ... rounded after every product and sum, whether the row and
    column fall in a register block (4 rows x one 64-byte vector) or in the remainder loops, on every
    instruction-set clone: a row alone (R = 1: remainder only) has the bits it has in any batch."""
    ext = backends.cpu_extension()
    rng = np.random.default_rng(5)
    R, K, H = 9, 7, 37  # 2 row blocks + 1 row; 16 (float32) or 8 (float64) lanes per vector, then 5 columns
    x = (rng.standard_normal((R, K)) * 10.0 ** rng.uniform(-4, 4, (R, K))).astype(dtype)
    wt, b = rng.standard_normal((K, H)).astype(dtype), rng.standard_normal(H).astype(dtype)
    out = np.empty((R, H), dtype)
    ext.rowwise_linear(x, wt, b, out)
    want = b[None, :].repeat(R, 0).copy()
    for k in range(K):  # numpy's elementwise ops round each product and each sum, in this order
        want = want + x[:, k:k + 1] * wt[k][None, :]
    assert want.dtype == dtype and np.array_equal(out, want)
    for r in range(R):
        alone = np.empty((1, H), dtype)
        ext.rowwise_linear(x[r:r + 1].copy(), wt, b, alone)
        assert np.array_equal(alone[0], out[r])
    no_bias = np.empty((R, H), dtype)
    ext.rowwise_linear(x, wt, np.zeros(0, dtype), no_bias)
    want0 = np.zeros((R, H), dtype)
    for k in range(K):
        want0 = want0 + x[:, k:k + 1] * wt[k][None, :]
    assert np.array_equal(no_bias, want0)
