"""pytest-benchmark suite for the fused EGNN op and the DDPM step, one provider per id.

    pytest benchmarks/ --benchmark-only --benchmark-group-by=param:case
    pytest benchmarks/ --benchmark-only --benchmark-json=out.json

The full grid with peak memory, FLOP/s against this machine's measured matmul rate, OOM rows,
markdown and plots is ``protdiff-fast bench`` (protdiff_fast/bench/runner.py); this file is the
quick side-by-side view in pytest-benchmark's own format.
"""
import pytest
import torch

from protdiff_fast import backends, ddpm_step
from protdiff_fast.bench.egnn import LAYER_PROVIDERS, egnn_pytorch_available, layer_flops, make_case, row_flops
from protdiff_fast.diffusion import NoiseSchedule

PROVIDERS = ["reference"]
if backends.cpu_extension() is not None:
    PROVIDERS.append("cpu")
if egnn_pytorch_available():  # layer against layer: egnn-pytorch and our drop-in for it (on the C++ kernels)
    PROVIDERS += ["egnn-pytorch"] + (["compat"] if backends.cpu_extension() is not None else [])

CASES = [(1, 128, 64), (4, 256, 64), (1, 512, 128)]


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("case", CASES, ids=[f"B{b}-N{n}-H{h}" for b, n, h in CASES])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_egnn_pair_aggregate(benchmark, provider, case, mode):
    B, N, H = case
    run = make_case(provider, B, N, H, mode, torch.float32, "cpu")
    # the layer rows compute egnn-pytorch's wider layer (about 8x the op's pair products): their own group
    benchmark.group = f"egnn {'layer' if provider in LAYER_PROVIDERS else 'op'} {mode} B={B} N={N} H={H}"
    benchmark.extra_info["gflop"] = row_flops(provider, B, N, H, mode) / 1e9
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.pedantic(run, warmup_rounds=1, rounds=10, iterations=1)


DEFAULT_M_CASES = [(1, 256, 64), (4, 256, 64), (1, 512, 128)]


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("case", DEFAULT_M_CASES, ids=[f"B{b}-N{n}-dim{h}" for b, n, h in DEFAULT_M_CASES])
@pytest.mark.parametrize("provider", [p for p in PROVIDERS if p in LAYER_PROVIDERS])
def test_egnn_layer_at_egnn_pytorch_defaults(benchmark, provider, case, mode):
    """egnn-pytorch's layer at its own default m_dim = 16 (the rows above use m_dim = dim), and our
    drop-in for it: widths (4 dim + 2, 16, 64), the edge MLP's first layer dominating egnn-pytorch's pairs."""
    B, N, H = case
    run = make_case(provider, B, N, H, mode, torch.float32, "cpu", m_dim=16)
    benchmark.group = f"egnn layer m_dim=16 {mode} B={B} N={N} dim={H}"
    benchmark.extra_info["gflop"] = layer_flops(B, N, H, mode, m_dim=16) / 1e9
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.pedantic(run, warmup_rounds=1, rounds=10, iterations=1)


@pytest.mark.parametrize("provider", [p for p in PROVIDERS if p not in LAYER_PROVIDERS])
def test_ddpm_step(benchmark, provider):
    schedule = NoiseSchedule(1000)
    B, N = 256, 128
    x = torch.randn(B, N, 3)
    eps = torch.randn(B, N, 3)
    t = torch.randint(2, 1001, (B,))
    benchmark.group = f"ddpm step B={B} N={N}"
    benchmark(lambda: ddpm_step(schedule, x, eps, t, seed=0, backend=provider))
