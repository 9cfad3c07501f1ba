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
