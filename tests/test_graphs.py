"""The sampling step runner of protdiff_fast.diffusion.graphs: the loop that is captured as a CUDA
graph on GPU, run here uncaptured (value checks off inside, as under capture), must give exactly
what the plain model call + scheduler step give; and a design's result must not depend on its
batch on the fused backends (seeded in-kernel noise, padding-independent)."""
import numpy as np
import torch

from protdiff_fast.diffusion import DDPMScheduler
from protdiff_fast.diffusion.graphs import DenoiseStep
from protdiff_fast.diffusion.sampler import sample
from protdiff_fast.models.protdiff import ProtDiff


def _tiny(backend):
    torch.manual_seed(0)
    return ProtDiff(hidden_dim=16, edge_dim=16, num_layers=2, max_length=16, num_timesteps=10, backend=backend)


def test_runner_equals_model_call_and_step_bitwise():
    for backend in ("reference", "cpu", "triton"):
        model = _tiny(backend)
        scheduler = DDPMScheduler(10, backend=backend)
        scheduler.set_timesteps(None)
        mask = torch.zeros(3, 12, dtype=torch.bool)
        for b, n in enumerate((5, 12, 9)):
            mask[b, :n] = True
        seeds = torch.tensor([7, -3, 2 ** 40])
        x = torch.randn(3, 12, 3) * mask.unsqueeze(-1)
        x = x - x.sum(1, keepdim=True) / mask.sum(1).view(-1, 1, 1) * mask.unsqueeze(-1)
        runner = DenoiseStep(model, scheduler, mask, seeds=seeds, capture=True)  # CPU: never captured
        assert not runner.capture
        for step_t in (10, 4, 1):
            t = torch.full((3,), step_t)
            eps, x_next = runner(x, t)
            with torch.no_grad():
                eps_want = model(x, t, mask)
                want = scheduler.step(eps_want, t, x, mask=mask, seed=seeds).prev_sample
            assert torch.equal(eps, eps_want) and torch.equal(x_next, want), (backend, step_t)
            x = x_next


def test_triton_design_is_the_same_alone_and_in_a_batch():
    model = _tiny("triton")
    kw = dict(scheduler=DDPMScheduler(10, backend="triton"), seed=5, progress=False, metrics=False,
              cuda_graphs=True)
    lengths = [6, 11, 8, 14]
    batch = sample(model, lengths, batch_size=4, **kw)
    alone = sample(model, lengths, batch_size=1, design_indices=[1], **kw)
    assert alone[0] is None and np.array_equal(alone[1], batch[1])
    assert all(np.isfinite(b).all() for b in batch)


def test_capture_only_where_a_graph_can_hold_the_step():
    """Which batches the runner would capture on a GPU: seeded in-kernel noise and the full schedule
    only. The strided (DDIM-style) step gathers coefficients on the host, and a generator's noise is
    not replayable: those run uncaptured instead of failing a capture on every GPU run."""
    class CudaMask:  # only the device is read when deciding; no GPU needed
        device = torch.device("cuda")

    seeds = torch.zeros(2, dtype=torch.long)
    full, strided = DDPMScheduler(10), DDPMScheduler(10)
    full.set_timesteps(None)
    strided.set_timesteps(5)
    assert DenoiseStep(None, full, CudaMask(), seeds=seeds, capture=True).capture
    assert not DenoiseStep(None, strided, CudaMask(), seeds=seeds, capture=True).capture
    assert not DenoiseStep(None, full, CudaMask(), seeds=None, generator=torch.Generator(), capture=True).capture
    assert not DenoiseStep(None, full, CudaMask(), seeds=seeds, capture=False).capture


def test_runner_under_autocast_runs_the_model_in_bf16_and_the_step_in_float32(monkeypatch):
    """DenoiseStep(autocast=bf16): the model call sees autocast (the pair op gets bf16 features and
    float32 coordinates), the scheduler step does not; eps comes back in x's dtype and equals the
    model called under the same autocast."""
    import protdiff_fast.nn.egnn as nn_egnn

    seen, real = [], nn_egnn.egnn_pair_aggregate
    monkeypatch.setattr(nn_egnn, "egnn_pair_aggregate",
                        lambda *a, **k: seen.append((a[0].dtype, a[1].dtype)) or real(*a, **k))
    for backend in ("reference", "cpu", "triton"):
        model = _tiny(backend)
        scheduler = DDPMScheduler(10, backend=backend)
        scheduler.set_timesteps(None)
        mask = torch.ones(2, 9, dtype=torch.bool)
        seeds = torch.tensor([1, 2])
        x = torch.randn(2, 9, 3)
        x = x - x.mean(1, keepdim=True)
        seen.clear()
        steps = []
        real_step = scheduler.step
        scheduler.step = lambda eps, *a, **k: steps.append((eps.dtype, torch.is_autocast_enabled("cpu"))) or \
            real_step(eps, *a, **k)
        runner = DenoiseStep(model, scheduler, mask, seeds=seeds, autocast=torch.bfloat16)
        t = torch.full((2,), 7)
        eps, x_next = runner(x, t)
        assert seen and all(d == (torch.float32, torch.bfloat16) for d in seen), (backend, seen)
        assert steps == [(torch.float32, False)], backend
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            want = model(x, t, mask)
        assert eps.dtype == x_next.dtype == torch.float32 and torch.equal(eps, want.float()), backend
        assert float((eps - model(x, t, mask).detach()).abs().max()) > 0, "autocast changed nothing"


# gaps found by mutation testing (2)
def test_after_one_failed_capture_later_batches_run_uncaptured(monkeypatch):
    """One failed capture turns graphs off for the rest of the process (each later batch would fail its capture
    and warn again): a runner built after it does not capture, one built before it would."""
    import protdiff_fast.diffusion.graphs as graphs

    class CudaMask:
        device = torch.device("cuda")

    full = DDPMScheduler(10)
    full.set_timesteps(None)
    seeds = torch.zeros(2, dtype=torch.long)
    monkeypatch.setattr(graphs, "_capture_failed", False)
    assert DenoiseStep(None, full, CudaMask(), seeds=seeds, capture=True).capture
    monkeypatch.setattr(graphs, "_capture_failed", True)
    assert not DenoiseStep(None, full, CudaMask(), seeds=seeds, capture=True).capture
