"""backend="auto" for egnn_pair_aggregate: a fast path that cannot run a call (a width the Triton
kernels lack, an option a backend does not implement) falls back to the reference with a warning,
never an error; an explicit backend still raises."""
import pytest
import torch

import protdiff_fast.ops as ops
from protdiff_fast.backends import get_impl
from protdiff_fast.ops import egnn_pair_aggregate
from test_egnn_cpu import FLAG_SETS, make_problem


def _runs_here(op, backend):
    from protdiff_fast.backends import resolve
    try:
        return resolve(op, backend, "cpu") == backend
    except (RuntimeError, NotImplementedError):
        return False


def _auto_picks_triton(monkeypatch):
    def fake(op, backend, device):
        return get_impl(op, "triton" if backend == "auto" else backend, device)
    monkeypatch.setattr(ops, "get_impl", fake)
    ops._warn_fallback.cache_clear()


def test_auto_falls_back_to_reference_for_a_width_triton_lacks(monkeypatch):
    _auto_picks_triton(monkeypatch)
    args, kw = make_problem(1, 6, 300, 2, "offset", FLAG_SETS[1], seed=2)  # H = 300 > 256
    args = [a.float() for a in args]
    kw = {k: (v.float() if torch.is_tensor(v) and v.dtype.is_floating_point else v) for k, v in kw.items()}
    with pytest.warns(RuntimeWarning, match="cannot run this call.*up to 256.*reference instead"):
        got = egnn_pair_aggregate(*args, backend="auto", **kw)
    want = egnn_pair_aggregate(*args, backend="reference", **kw)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(ValueError, match="up to 256"):
        egnn_pair_aggregate(*args, backend="triton", **kw)


def test_auto_uses_triton_when_it_can(monkeypatch):
    _auto_picks_triton(monkeypatch)
    picked = ops.get_impl
    ran = []

    def spy(op, backend, device):  # which implementation the dispatcher ends up calling
        name, fn = picked(op, backend, device)

        def call(*a, **k):
            ran.append(name)
            return fn(*a, **k)
        return name, call
    monkeypatch.setattr(ops, "get_impl", spy)
    args, kw = make_problem(1, 6, 20, 2, "none", {}, seed=2)  # padded to 32 by the dispatcher
    args = [a.float() for a in args]
    kw = {k: (v.float() if torch.is_tensor(v) and v.dtype.is_floating_point else v) for k, v in kw.items()}
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = egnn_pair_aggregate(*args, backend="auto", **kw)
    assert ran == ["triton"], f"auto ran {ran}, not the triton kernels (a silent fallback passed before)"
    want = egnn_pair_aggregate(*args, backend="reference", **kw)
    assert all(float((a - b).abs().max()) < 1e-5 for a, b in zip(got, want))


def test_auto_falls_back_to_reference_for_float64_on_triton(monkeypatch):
    _auto_picks_triton(monkeypatch)
    args, kw = make_problem(2, 5, 16, 2, "offset", FLAG_SETS[1], seed=3)  # float64
    assert args[0].dtype == torch.float64
    with pytest.warns(RuntimeWarning, match="float64 inputs.*reference instead"):
        got = egnn_pair_aggregate(*args, backend="auto", **kw)
    want = egnn_pair_aggregate(*args, backend="reference", **kw)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(TypeError, match="float64"):
        egnn_pair_aggregate(*args, backend="triton", **kw)


def test_backend_for_names_the_backend_that_will_run():
    from protdiff_fast.backends import resolve
    from protdiff_fast.nn import EGNNLayer

    fast_cuda = resolve("egnn_pair_aggregate", "auto", "cuda")  # what "auto" would pick on a GPU
    assert EGNNLayer(64).backend_for("cuda") == fast_cuda
    if fast_cuda == "triton":
        assert EGNNLayer(300).backend_for("cuda") == "reference"  # wider than the kernels
        assert EGNNLayer(64).double().backend_for("cuda") == "reference"
        assert EGNNLayer(64).backend_for("cuda", torch.bfloat16) == "triton"
    assert EGNNLayer(64, backend="reference").backend_for("cpu") == "reference"
    assert EGNNLayer(64, backend="triton").backend_for("cuda") == "triton"  # explicit: never swapped


@pytest.mark.parametrize("shape", [(0, 4), (3, 0), (0, 0)])
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_no_pairs_forward_and_backward(backend, shape):
    """B = 0 or N = 0: empty outputs and gradients, not a crash (the C++ backward divided by B)."""
    from protdiff_fast.nn import EGNNLayer

    if not _runs_here("egnn_pair_aggregate", backend):
        pytest.skip(f"{backend} not available here")
    B, N = shape
    layer = EGNNLayer(16, 4, attention=True, backend=backend)
    h = torch.randn(B, N, 16, requires_grad=True)
    x = torch.randn(B, N, 3, requires_grad=True)
    h_out, x_out = layer(h, x, rel_offsets=torch.randn(5, 4))
    assert h_out.shape == (B, N, 16) and x_out.shape == (B, N, 3)
    (h_out.sum() + x_out.sum()).backward()
    assert h.grad.shape == h.shape and x.grad.shape == x.shape
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_fused_backward_refuses_create_graph(backend):
    """A second derivative through the fused op raises instead of treating the kernels' gradients as
    constants (which gave a silently wrong double backward); the reference runs it."""
    from protdiff_fast.nn import EGNNLayer

    if not _runs_here("egnn_pair_aggregate", backend):
        pytest.skip(f"{backend} not available here")
    layer = EGNNLayer(16, backend=backend)
    x = torch.randn(2, 5, 3, requires_grad=True)
    h = torch.randn(2, 5, 16)
    _, x_out = layer(h, x)
    with pytest.raises(RuntimeError, match=f"{backend} backend's gradients are first order only.*reference"):
        torch.autograd.grad((x_out ** 2).sum(), x, create_graph=True)
    layer.backend = "reference"
    _, x_out = layer(h, x)
    g, = torch.autograd.grad((x_out ** 2).sum(), x, create_graph=True)
    gg, = torch.autograd.grad(g.pow(2).sum(), x)
    assert torch.isfinite(gg).all() and gg.abs().sum() > 0


def test_cpu_centre_of_mass_second_derivative_matches_the_reference():
    from protdiff_fast.ops import remove_center_of_mass

    if not _runs_here("remove_center_of_mass", "cpu"):
        pytest.skip("no C++ extension")
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    results = []
    for backend in ("cpu", "reference"):
        x = torch.randn(2, 6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5),
                        requires_grad=True)
        y = remove_center_of_mass(x * x, mask, backend=backend)
        g, = torch.autograd.grad((y ** 3).sum(), x, create_graph=True)
        gg, = torch.autograd.grad(g.sum(), x)
        results.append((g.detach(), gg))
    (g_cpu, gg_cpu), (g_ref, gg_ref) = results
    assert torch.allclose(g_cpu, g_ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(gg_cpu, gg_ref, rtol=1e-12, atol=1e-12) and gg_ref.abs().sum() > 0


def test_cpu_kernels_called_directly_with_an_empty_batch():
    """The C++ backward's work split divided by B: B = 0 killed the process (SIGFPE)."""
    if not _runs_here("egnn_pair_aggregate", "cpu"):
        pytest.skip("no C++ extension")
    from protdiff_fast.ops.egnn_cpu import egnn_pair_aggregate_cpu

    args, kw = make_problem(0, 5, 16, 2, "offset", FLAG_SETS[1], seed=3)
    args = [a.float().requires_grad_() if a.is_floating_point() else a for a in args]
    kw = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
    m_i, dx_i = egnn_pair_aggregate_cpu(*args, **kw)
    (m_i.sum() + dx_i.sum()).backward()
    assert m_i.shape == (0, 5, 16) and args[0].grad.shape == (0, 5, 3)
    assert torch.equal(args[4].grad, torch.zeros_like(args[4]))  # W2: no pairs, no gradient


def test_a_backend_typo_fails_when_the_module_is_built():
    from protdiff_fast.diffusion import DDPMScheduler
    from protdiff_fast.nn import EGNN, EGNNLayer
    from protdiff_fast.nn.compat import EGNN as CompatEGNN

    for build in (lambda: EGNNLayer(16, backend="trition"), lambda: EGNN(4, 16, 3, num_layers=1, backend="trition"),
                  lambda: CompatEGNN(dim=8, backend="trition"), lambda: DDPMScheduler(10, backend="trition")):
        with pytest.raises(ValueError, match=r"unknown backend 'trition'; choose one of \('auto', 'reference'"):
            build()


@pytest.mark.parametrize("edge_mode", ["none", "dense"])
@pytest.mark.parametrize("backend,dtype", [("reference", torch.float32), ("reference", torch.float16),
                                           ("cpu", torch.float32), ("triton", torch.float32),
                                           ("triton", torch.float16)])
def test_padding_contents_never_reach_real_rows(backend, dtype, edge_mode):
    """Padding rows holding 1e4 (float16 squares overflow at 256) or 1e20 give the outputs and real rows'
    gradients of zero padding: the reference and triton masked the pair sums only, and inf * 0 = NaN.
    NaN in padding is refused by every backend alike."""
    if not _runs_here("egnn_pair_aggregate", backend):
        pytest.skip(f"{backend} not available here")
    args, kw = make_problem(2, 7, 16, 4, edge_mode, dict(normalize=True))
    mask = kw["mask"]
    pad = ~mask
    assert bool(pad.any())

    def run(fill):
        x, p, q = (a.clone() for a in args[:3])
        ea = kw.get("edge_attr")
        x[pad], p[pad], q[pad] = fill, fill, -fill
        if ea is not None:
            ea = ea.clone()
            ea[pad] = fill
        leaves = [v.to(dtype).requires_grad_(True) for v in (x, p, q)]
        kw2 = dict(kw, **({"edge_attr": ea.to(dtype), "W_e": kw["W_e"].to(dtype)} if ea is not None else {}))
        m, dx = egnn_pair_aggregate(*leaves, *(a.to(dtype) for a in args[3:]), backend=backend, **kw2)
        grads = torch.autograd.grad((m.float().sum() + dx.float().pow(2).sum()), leaves)
        return [m, dx] + [gr[mask] for gr in grads]

    clean = run(0.0)
    assert all(bool(torch.isfinite(v).all()) for v in clean)
    for a, b in zip(run(1e4 if dtype == torch.float16 else 1e20), clean):
        assert torch.equal(a, b), "large padding values changed the result"
    with pytest.raises(ValueError, match="contains NaN"):
        run(float("nan"))


def test_dispatchers_name_a_non_tensor_input():
    """A numpy array, a list or nothing as x: a TypeError naming x (was AttributeError on .device / IndexError)."""
    import numpy as np

    from protdiff_fast.diffusion import NoiseSchedule

    for bad in (np.zeros((1, 3, 3)), [[0.0, 0.0, 0.0]]):
        with pytest.raises(TypeError, match=r"x: expected a torch.Tensor"):
            egnn_pair_aggregate(bad)
        with pytest.raises(TypeError, match=r"x_t: expected a torch.Tensor"):
            ops.ddpm_step(NoiseSchedule(5), bad, bad, 2)
        with pytest.raises(TypeError, match=r"x: expected a torch.Tensor"):
            ops.remove_center_of_mass(bad)
    with pytest.raises(TypeError, match=r"x: expected a torch.Tensor"):
        egnn_pair_aggregate()


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_ddpm_step_empty_batch_and_no_nodes_alike_on_every_backend(backend):
    import numpy as np

    from protdiff_fast.diffusion import DDPMScheduler, NoiseSchedule

    if not _runs_here("ddpm_step", backend):
        pytest.skip(f"{backend} not available here")
    s = NoiseSchedule(10)
    out = ops.ddpm_step(s, torch.zeros(0, 4, 3), torch.zeros(0, 4, 3), 5, backend=backend)
    assert out.prev_sample.shape == (0, 4, 3)
    with pytest.raises(ValueError, match=r"t: timesteps must lie in \[1, 10\], got 11"):
        ops.ddpm_step(s, torch.zeros(0, 4, 3), torch.zeros(0, 4, 3), 11, backend=backend)
    with pytest.raises(ValueError, match=r"x_t: samples have no nodes \(N = 0\)"):
        ops.ddpm_step(s, torch.zeros(2, 0, 3), torch.zeros(2, 0, 3), 5, backend=backend)
    sched = DDPMScheduler(10, backend=backend)
    assert sched.step(torch.zeros(0, 4, 3), 5, torch.zeros(0, 4, 3)).prev_sample.shape == (0, 4, 3)
    assert sched.add_noise(torch.zeros(0, 4, 3), torch.zeros(0, 4, 3), 5).shape == (0, 4, 3)
    x = torch.randn(1, 4, 3)
    want = sched.step(x, 5, x, noise=x).prev_sample
    assert torch.equal(sched.step(x, np.int64(5), x, noise=x).prev_sample, want)  # a numpy integer timestep


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_ddpm_step_seed_checked_alike_on_every_backend(backend):
    """A float seed tensor was taken by the reference and refused by the fused steps; 2**64 + 5 the other way
    round; a numpy integer seed only by the reference."""
    import numpy as np

    from protdiff_fast.diffusion import NoiseSchedule

    if not _runs_here("ddpm_step", backend):
        pytest.skip(f"{backend} not available here")
    s = NoiseSchedule(10)
    x = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))

    def step(seed):
        return ops.ddpm_step(s, x, x, 5, seed=seed, backend=backend).prev_sample

    assert torch.equal(step(np.int64(3)), step(3))
    assert not torch.equal(step(3), step(4))
    assert torch.equal(step(torch.tensor([3, 4], dtype=torch.int32)), step(torch.tensor([3, 4])))
    with pytest.raises(TypeError, match="seed: per-sample seeds must be an integer tensor"):
        step(torch.tensor([3.0, 4.0]))
    with pytest.raises(ValueError, match=r"seed: expected one seed per sample, shape \(2,\)"):
        step(torch.tensor([3, 4, 5]))
    with pytest.raises(ValueError, match=r"seed: expected an integer in \[-2\^63, 2\^64\)"):
        step(2 ** 64 + 5)
    for bad in (True, 1.5, "3"):
        with pytest.raises(TypeError, match="seed: expected an int or an integer tensor"):
            step(bad)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_a_nan_attention_bias_is_refused_by_name(backend):
    """b_att was the one weight outside the finiteness check: a NaN there made every output NaN silently."""
    if not _runs_here("egnn_pair_aggregate", backend):
        pytest.skip(f"{backend} not available here")
    args, kw = make_problem(2, 5, 16, 2, "none", dict(attention=True), seed=3)
    args, kw = [a.float() for a in args], {k: v.float() if torch.is_tensor(v) else v for k, v in kw.items()}
    m_i, _ = egnn_pair_aggregate(*args, backend=backend, **kw)
    assert bool(torch.isfinite(m_i).all())
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="b_att: contains (NaN|Inf)"):
            egnn_pair_aggregate(*args, backend=backend, **dict(kw, b_att=torch.tensor(bad)))


@pytest.mark.parametrize("op", ["egnn_pair_aggregate", "ddpm_step", "remove_center_of_mass"])
def test_auto_picks_cpu_for_cpu_tensors_triton_for_cuda_else_the_reference(op, monkeypatch):
    """backends' rule, written out: "auto" picks the C++ extension for CPU tensors (even where the Triton
    interpreter could run them), triton for CUDA tensors, and the reference where the preferred backend
    is unavailable or lacks the op. (auto picking triton on CPU under TRITON_INTERPRET=1, or the preferred
    backend without asking whether it loads, passed every other test.)"""
    from protdiff_fast import backends

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # triton usable on CPU tensors too: auto must still say cpu
    monkeypatch.setattr(backends, "_load_cpu_extension", lambda: (object(), "C++ extension loaded"))
    monkeypatch.setattr(backends, "_triton_status", lambda: (True, "triton (faked)"))
    assert backends.resolve(op, "auto", "cpu") == "cpu"
    assert backends.resolve(op, "auto", "cuda") == ("triton" if "triton" in backends.implemented(op) else "reference")
    monkeypatch.setattr(backends, "_load_cpu_extension", lambda: (None, "no extension (faked)"))
    monkeypatch.setattr(backends, "_triton_status", lambda: (False, "no triton (faked)"))
    assert backends.resolve(op, "auto", "cpu") == "reference"
    assert backends.resolve(op, "auto", "cuda") == "reference"
    with pytest.raises(backends.BackendUnavailableError, match="backend 'cpu' cannot run"):
        backends.resolve(op, "cpu", "cpu")
