"""The Triton DDPM step: under TRITON_INTERPRET=1 against the reference (explicit noise) and its
in-kernel noise statistically; and a compile for sm_90 (no GPU needed) to catch what the
interpreter forgives."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

from helpers import assert_close_rel, random_mask  # noqa: E402
from protdiff_fast import ddpm_step  # noqa: E402
from protdiff_fast.diffusion import NoiseSchedule  # noqa: E402
from protdiff_fast.reference.com import remove_center_of_mass_reference  # noqa: E402

F64 = torch.float64
assert os.environ.get("TRITON_INTERPRET") == "1", "conftest sets TRITON_INTERPRET before triton is imported"


@pytest.mark.parametrize("N", [1, 7, 33, 100])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_triton_step_matches_reference(N, variance):
    s = NoiseSchedule(1000)
    g = torch.Generator().manual_seed(N)
    B = 4
    mask = random_mask(B, N, generator=g)
    x = remove_center_of_mass_reference(torch.randn(B, N, 3, generator=g, dtype=F64), mask)
    eps, noise = torch.randn(B, N, 3, generator=g, dtype=F64), torch.randn(B, N, 3, generator=g, dtype=F64)
    t = torch.tensor([1, 2, 640, 1000])
    want = ddpm_step(s, x, eps, t, mask=mask, noise=noise, variance=variance, backend="reference")
    low = ddpm_step(s, x.float(), eps.float(), t, mask=mask, noise=noise.float(), variance=variance,
                    backend="reference")
    got = ddpm_step(s, x.float(), eps.float(), t, mask=mask, noise=noise.float(), variance=variance,
                    backend="triton")
    for name in ("prev_sample", "mean", "pred_original_sample"):
        a, w, r = getattr(got, name), getattr(want, name), getattr(low, name)
        tol = 2 * float((r.double() - w).norm() / w.norm().clamp_min(1e-300)) + 1e-6
        assert_close_rel(a, w, tol, name)
        assert float(a[~mask].abs().max() if (~mask).any() else 0) == 0.0


def test_triton_in_kernel_noise():
    s = NoiseSchedule(1000)
    B, N = 32, 50
    mask = random_mask(B, N, min_real=10)
    zero = torch.zeros(B, N, 3)
    t = torch.full((B,), 500)
    seeds = torch.arange(B) * 7 + 1
    out = ddpm_step(s, zero, zero, t, mask=mask, seed=seeds, variance="fixed_large", backend="triton")
    z = out.prev_sample.double() / math.sqrt(float(s.betas[500]))
    keep = mask.unsqueeze(-1)
    assert float(z[~mask].abs().max()) == 0.0
    assert float(((z * keep).sum(1) / keep.sum(1)).abs().max()) < 1e-5
    n_real = mask.sum(1).view(-1, 1, 1).double()
    unit = (z * torch.sqrt(n_real / (n_real - 1)))[mask]
    M = unit.numel()
    assert abs(float(unit.mean())) < 5 / math.sqrt(M) and abs(float(unit.var()) - 1) < 5 * math.sqrt(2 / M)
    again = ddpm_step(s, zero, zero, t, mask=mask, seed=seeds, variance="fixed_large", backend="triton")
    other = ddpm_step(s, zero, zero, t, mask=mask, seed=seeds + 1, variance="fixed_large", backend="triton")
    later = ddpm_step(s, zero, zero, t + 1, mask=mask, seed=seeds, variance="fixed_large", backend="triton")
    assert torch.equal(again.prev_sample, out.prev_sample)
    assert not torch.allclose(other.prev_sample, out.prev_sample)
    assert not torch.allclose(later.prev_sample / later.prev_sample.norm(), out.prev_sample / out.prev_sample.norm())
    last = ddpm_step(s, zero, zero, torch.ones(B, dtype=torch.long), mask=mask, seed=seeds, backend="triton")
    assert float(last.prev_sample.abs().max()) == 0.0, "no noise at t = 1"


COMPILE_SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from protdiff_fast.ops.ddpm_triton import _ddpm_step_kernel
    sig = {name: ty for name, ty in zip(
        ["x_ptr", "eps_ptr", "noise_ptr", "mask_ptr", "c1_ptr", "c2_ptr", "sigma_ptr", "x0a_ptr", "x0b_ptr",
         "seed_ptr", "t_ptr", "prev_ptr", "mean_ptr", "x0_ptr", "N", "HAS_NOISE", "BLOCK_N"],
        ["*fp32", "*fp32", "*fp32", "*u8", "*fp32", "*fp32", "*fp32", "*fp32", "*fp32", "*i64", "*i64",
         "*fp32", "*fp32", "*fp32", "i32", "constexpr", "constexpr"])}
    for has_noise in (True, False):
        src = triton.compiler.ASTSource(fn=_ddpm_step_kernel, signature=sig,
                                        constexprs={"HAS_NOISE": has_noise, "BLOCK_N": 256})
        ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        assert "ptx" in ck.asm and ck.metadata.shared <= 232448, ck.metadata.shared
    print("COMPILED")
""")


def test_triton_step_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a real compile, not the interpreter
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.fail("the bundled ptxas is missing: " + proc.stderr[-500:])
    assert proc.returncode == 0 and "COMPILED" in proc.stdout, proc.stderr[-3000:]


def test_triton_step_noise_of_a_sample_does_not_depend_on_its_padding():
    """Keyed by (seed, t) with a fixed stride per step: the same design padded to 9 or to 40 nodes
    (i.e. in another batch) draws the same noise on its real nodes."""
    from protdiff_fast.diffusion.schedule import NoiseSchedule
    from protdiff_fast.ops import ddpm_step

    s = NoiseSchedule(1000)
    zero_small, zero_big = torch.zeros(1, 9, 3), torch.zeros(1, 40, 3)
    mask_small = torch.ones(1, 9, dtype=torch.bool)
    mask_big = torch.zeros(1, 40, dtype=torch.bool)
    mask_big[0, :9] = True
    t, seeds = torch.tensor([700]), torch.tensor([123456789])
    small = ddpm_step(s, zero_small, zero_small, t, mask=mask_small, seed=seeds, backend="triton").prev_sample
    big = ddpm_step(s, zero_big, zero_big, t, mask=mask_big, seed=seeds, backend="triton").prev_sample
    assert float(small.abs().max()) > 0 and torch.equal(small[0], big[0, :9])
    assert float(big[0, 9:].abs().max()) == 0.0


@pytest.mark.parametrize("N", [1, 7, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_step_gradients_match_reference(N, dtype):
    from test_ddpm_cpu import check_fused_step_gradients

    check_fused_step_gradients("triton", N, "fixed_small", dtype)


def test_triton_step_refuses_float64_and_auto_runs_it_on_the_reference(monkeypatch):
    """The kernel computes in float32: float64 in, float32-exact out was a silent loss of precision."""
    import protdiff_fast.ops as ops
    from protdiff_fast.ops.ddpm_triton import ddpm_step_triton

    s = NoiseSchedule(20)
    g = torch.Generator().manual_seed(0)
    x, e, z = (torch.randn(2, 5, 3, generator=g, dtype=F64) for _ in range(3))
    with pytest.raises(ValueError, match="triton step runs float32.*float64"):
        ddpm_step(s, x, e, 7, noise=z, backend="triton")
    real = ops.get_impl
    monkeypatch.setattr(ops, "get_impl", lambda op, backend, device: ("triton", ddpm_step_triton)
                        if backend == "auto" else real(op, backend, device))  # auto as on a CUDA tensor
    got = ddpm_step(s, x, e, 7, noise=z, backend="auto")
    want = ddpm_step(s, x, e, 7, noise=z, backend="reference")
    assert got.prev_sample.dtype == F64 and torch.equal(got.prev_sample, want.prev_sample)


def test_triton_step_bf16_outputs_are_the_float32_results_rounded_to_nearest():
    """The kernel computes in float32 and stores bf16 as the GPU's cvt.rn does: under the interpreter its
    plain cast truncated (every stored value biased toward zero by ~2^-9), so the stores go through _cast."""
    s = NoiseSchedule(50)
    g = torch.Generator().manual_seed(3)
    x, e, z = (torch.randn(3, 11, 3, generator=g).bfloat16() for _ in range(3))
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[1, 8:] = False
    t = torch.tensor([40, 7, 1])
    low = ddpm_step(s, x, e, t, noise=z, mask=mask, backend="triton")
    full = ddpm_step(s, x.float(), e.float(), t, noise=z.float(), mask=mask, backend="triton")
    for name in ("prev_sample", "mean", "pred_original_sample"):
        got, want = getattr(low, name), getattr(full, name).bfloat16()
        assert got.dtype == torch.bfloat16 and torch.equal(got, want), name


# gaps found by mutation testing
def test_triton_step_on_one_schedule_follows_each_variance():
    """The device coefficient tables are cached on the schedule per variance: fixed_large after fixed_small on
    the same schedule (and back) must use beta_t's sigma, not the cached beta_tilde's."""
    s = NoiseSchedule(1000)
    g = torch.Generator().manual_seed(8)
    mask = random_mask(3, 9, generator=g, min_real=3)
    x = remove_center_of_mass_reference(torch.randn(3, 9, 3, generator=g, dtype=F64), mask)
    eps, noise = torch.randn(3, 9, 3, generator=g, dtype=F64), torch.randn(3, 9, 3, generator=g, dtype=F64)
    t = torch.tensor([3, 40, 1000])  # beta_tilde_3 = beta_3 / 1.9
    for variance in ("fixed_small", "fixed_large", "fixed_small"):
        want = ddpm_step(s, x, eps, t, mask=mask, noise=noise, variance=variance, backend="reference")
        got = ddpm_step(s, x.float(), eps.float(), t, mask=mask, noise=noise.float(), variance=variance,
                        backend="triton")
        assert_close_rel(got.prev_sample, want.prev_sample, 1e-6, variance)


def test_triton_step_draws_its_seeds_from_the_generator():
    """Without seed or noise the kernel's per-sample keys come from ``generator``: the same generator state
    gives the same draw, another one another draw (a fixed key ignored it)."""
    s = NoiseSchedule(1000)
    zero = torch.zeros(2, 8, 3)
    t = torch.full((2,), 300)

    def draw(g):
        return ddpm_step(s, zero, zero, t, generator=torch.Generator().manual_seed(g), backend="triton").prev_sample

    a, b, c = draw(1), draw(1), draw(2)
    assert torch.equal(a, b) and float((a - c).abs().max()) > 0.01
    assert float((a[0] - a[1]).abs().max()) > 0.01, "each sample its own stream"
