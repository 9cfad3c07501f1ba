"""The benchmark runner works end to end on tiny rows (speed itself is measured by the benchmarks, not here)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from protdiff_fast.bench import runner


def test_runner_rows_results_and_compare(tmp_path, monkeypatch, capsys):
    rows = [dict(suite="egnn", provider=p, B=1, N=12, H=8, mode="fwdbwd", dtype="float32")
            for p in ("reference", "cpu")]
    rows += [dict(suite="ddpm-step", provider="cpu", B=4, N=10, H=0, mode="fwd", dtype="float32"),
             dict(suite="train-step", provider="reference", B=1, N=10, H=8, mode="fwdbwd", dtype="float32")]
    monkeypatch.setattr(runner, "grid", lambda device, quick, suites, which="full": rows)
    monkeypatch.setattr(runner, "device_rates", lambda device: dict(mm_fp32_square_flops=1e11, mm_fp32_pair_shape_flops=5e10,
                                                                   pair_shape_H=64, copy_bytes_per_s=1e10))
    result = runner.run(["egnn"], "cpu", True, str(tmp_path / "a"), 120, None, "test")
    assert [r["status"] for r in result["rows"]] == ["ok"] * 4, result["rows"]
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["environment"]["commit"] and saved["environment"]["torch"]
    assert all(r["median_s"] > 0 and r["reps"] >= 2 for r in saved["rows"])
    assert saved["rows"][0]["peak_mem_bytes"] is not None
    md = (tmp_path / "a" / "results.md").read_text()
    assert "| egnn | fwdbwd | float32 | 8 | 1 | 12 | cpu |" in md and "speed-up" in md
    print(runner.compare(str(tmp_path / "a" / "results.json"), result))
    assert "x)" in capsys.readouterr().out


def test_cpu_memory_counts_what_the_op_allocates_and_keeps():
    """Peak memory of a row: one run after the heap is trimmed, plus the C++ workspace kept between
    calls. The reference's pair tensors (B N^2 H floats, several of them) must show in full, and the
    fused backward's kept workspace must be counted, not hidden by the warm-up."""
    B, N, H = 2, 96, 64
    ref = runner.run_row(dict(suite="egnn", provider="reference", B=B, N=N, H=H, mode="fwdbwd", dtype="float32"),
                         "cpu", 1, 120, 0.1, mem_limit=None)
    cpu = runner.run_row(dict(suite="egnn", provider="cpu", B=B, N=N, H=H, mode="fwdbwd", dtype="float32"),
                         "cpu", 1, 120, 0.1, mem_limit=None)
    assert ref["status"] == cpu["status"] == "ok", (ref, cpu)
    pair_tensor = B * N * (N - 1) * H * 4
    assert ref["peak_mem_bytes"] >= 3 * pair_tensor, ref
    assert cpu["kept_bytes"] > 0 and cpu["peak_mem_bytes"] >= cpu["kept_bytes"], cpu
    assert cpu["peak_mem_bytes"] < pair_tensor, cpu


def test_oom_rows_are_kept(tmp_path):
    row = dict(suite="egnn", provider="reference", B=64, N=2048, H=64, mode="fwd", dtype="float32")
    out = runner.run_row(row, "cpu", 1, 120, 0.1, mem_limit=3 * 2 ** 30)
    assert out["status"] == "OOM" and out["N"] == 2048


def test_sampler_mixed_row_measures_a_whole_run(tmp_path, monkeypatch):
    from protdiff_fast.bench.egnn import sampler_mixed_lengths

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the worker's scratch folders: none may be left behind

    lengths = sampler_mixed_lengths(5, 12)
    assert sorted(lengths) == [6, 8, 9, 10, 12] and lengths != sorted(lengths)  # mixed, not pre-sorted
    # lengths the shipped model was trained on (40..128); much shorter chains can diverge in 50 steps
    row = dict(suite="sampler-mixed", provider="cpu", B=2, N=80, H=64, mode="write", dtype="float32")
    out = runner.run_row(row, "cpu", 1, 300, 0.1, mem_limit=None)
    assert out["status"] == "ok", out
    assert out["backbones_per_s"] == 2 / out["median_s"] and out["reps"] >= 2
    assert not list(tmp_path.glob("protdiff-bench-*"))  # the last repetition's designs were left in /tmp
    md = runner.markdown(dict(environment=dict(date="d", cpu="c", threads=1, torch="t", commit="x"),
                              rates=dict(mm_fp32_square_flops=1.0, mm_fp32_pair_shape_flops=1.0, pair_shape_H=64,
                                         copy_bytes_per_s=1.0), command="cmd", rows=[out]))
    assert "| sampler-mixed | write, 50 steps, batch 8 | float32 | 64 | 2 designs | 40..80 | cpu |" in md


def _synthetic(provider, N, time_exp, mem_exp, suite="egnn"):
    return dict(suite=suite, provider=provider, B=1, N=N, H=64, mode="fwd", dtype="float32", status="ok",
                median_s=1e-6 * N ** time_exp, peak_mem_bytes=int(2 ** 20 * (N / 64) ** mem_exp))


def test_scaling_fits_exponents_and_flags_a_memory_regression():
    rows = [_synthetic("reference", N, 2.0, 2.0) for N in (64, 128, 256, 512, 1024)]
    rows += [_synthetic("cpu", N, 2.0, 1.0) for N in (128, 256, 512, 1024)]
    fits = {f["provider"]: f for f in runner.scaling(dict(rows=rows))}
    assert abs(fits["reference"]["time_exponent"] - 2) < 1e-6 and abs(fits["reference"]["memory_exponent"] - 2) < 1e-3
    assert fits["reference"]["n_min"] == 128  # small N left out of the fit
    assert abs(fits["cpu"]["memory_exponent"] - 1) < 1e-3 and not fits["cpu"]["memory_regression"]
    assert not fits["reference"]["memory_regression"]  # the reference may be quadratic
    bad = [_synthetic("cpu", N, 2.0, 1.5) for N in (128, 256, 512)]
    (fit,) = runner.scaling(dict(rows=bad))
    assert fit["memory_regression"]
    assert "REGRESSION" in runner.scaling_markdown([fit])
    assert runner.scaling(dict(rows=rows[:2])) == []  # fewer than 3 sizes: no fit
    noisy = [dict(_synthetic("cpu", N, 2.0, 1.0), peak_mem_bytes=m) for N, m in ((128, 4096), (256, 16384),
                                                                                   (512, 300000))]
    (fit,) = runner.scaling(dict(rows=noisy))  # KB-sized peaks are allocator noise: no memory exponent
    assert fit["memory_exponent"] is None and not fit["memory_regression"]


def test_scaling_exempts_only_the_documented_reference_backward(monkeypatch):
    """Triton's fp32 gradients at H = 256 go through the reference by design (O(N^2) memory) with the
    two-pass backward: not a regression there, while the same growth of a fused backward (the default
    one-pass chunked kernel at fp32 256, bf16 at 256, any dtype at 128) is."""
    def rows(dtype, H, mode="fwdbwd"):
        return [dict(_synthetic("triton", N, 2.0, 2.0), dtype=dtype, H=H, mode=mode) for N in (256, 512, 1024)]

    (fused,) = runner.scaling(dict(rows=rows("float32", 256)))
    assert fused["memory_regression"] and fused["fused_backward"]
    monkeypatch.setenv("PROTDIFF_FAST_TRITON_BWD_PASSES", "2")
    (fp32_256,) = runner.scaling(dict(rows=rows("float32", 256)))
    assert not fp32_256["memory_regression"] and not fp32_256["fused_backward"]
    assert "by design" in runner.scaling_markdown([fp32_256])
    for dtype, H, mode in (("bfloat16", 256, "fwdbwd"), ("float32", 128, "fwdbwd"), ("float32", 256, "fwd")):
        (fit,) = runner.scaling(dict(rows=rows(dtype, H, mode)))
        assert fit["memory_regression"], (dtype, H, mode)


def test_only_failed_allocations_become_oom_rows():
    import torch

    from protdiff_fast.bench.worker import _is_out_of_memory

    assert _is_out_of_memory(MemoryError())
    assert _is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert _is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"))
    assert not _is_out_of_memory(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not _is_out_of_memory(RuntimeError("shared memory size 262144 exceeds the device's limit"))


def test_results_json_is_written_after_every_row(tmp_path, monkeypatch):
    """A run stopped part way (a device call's time limit) keeps the rows it measured."""
    rows = [dict(suite="egnn", provider="cpu", B=1, N=n, H=8, mode="fwd", dtype="float32") for n in (6, 7)]
    monkeypatch.setattr(runner, "grid", lambda device, quick, suites, which="full": rows)
    monkeypatch.setattr(runner, "device_rates", lambda device: dict(mm_fp32_square_flops=1e11, mm_fp32_pair_shape_flops=5e10,
                                                                   pair_shape_H=64, copy_bytes_per_s=1e10))
    seen = []
    real = runner.run_row

    def spy(row, *a, **k):
        if (tmp_path / "r" / "results.json").exists():
            seen.append(len(json.loads((tmp_path / "r" / "results.json").read_text())["rows"]))
        return real(row, *a, **k)

    monkeypatch.setattr(runner, "run_row", spy)
    result = runner.run(["egnn"], "cpu", True, str(tmp_path / "r"), 120, None, "test", hidden=[8], max_n=7)
    assert seen == [1] and len(result["rows"]) == 2
    final = json.loads((tmp_path / "r" / "results.json").read_text())
    assert len(final["rows"]) == 2 and "partial" not in final


def test_plots_for_every_suite(tmp_path):
    import matplotlib  # noqa: F401 - pinned in requirements-dev: the plots are part of the product
    rows = [_synthetic(p, N, 2.0, 1.0) for p in ("reference", "cpu") for N in (128, 256)]
    rows += [_synthetic(p, 64, 1.0, 1.0, suite=s) for s in ("ddpm-step", "sampler", "train-step")
             for p in ("reference", "cpu")]
    rows.append(dict(_synthetic("reference", 128, 1.0, 1.0, suite="train-step"), status="OOM"))
    rows += [dict(_synthetic(p, N, 2.0, 1.0), dtype="bfloat16") for p in ("reference", "triton") for N in (128, 256)]
    result = dict(rows=rows, environment=dict(cpu="test cpu"))
    names = runner.plot(result, tmp_path)
    assert {"ddpm-step.png", "sampler.png", "train-step.png"} <= set(names)
    assert "egnn_fwd_B1_H64.png" in names
    assert "egnn_fwd_B1_H64_bfloat16.png" in names  # the GPU's bf16 target rows get their own figure
    assert all((tmp_path / n).stat().st_size > 1000 for n in names)


def test_pytest_benchmark_suites_run_once_as_smoke_tests():
    """`pytest benchmarks/ --benchmark-disable`: every pytest-benchmark case runs once and passes."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/",
                           "--benchmark-disable"], cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


def test_pytest_benchmark_json_records_threads_build_and_sources(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "bench.json"
    # a clean environment for the inner pytest: under xdist the outer worker's PYTEST_XDIST_* variables make
    # pytest-benchmark disable itself (no JSON)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           "benchmarks/", "-k", "B1-N128-H64 and fwdbwd and reference", f"--benchmark-json={out}"],
                          cwd=root, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    saved = json.loads(out.read_text())
    info = saved["machine_info"]["protdiff_fast"]
    assert info["threads"] >= 1 and len(info["source_sha256"]) == 64 and info["torch"]
    assert saved["benchmarks"] and saved["benchmarks"][0]["stats"]["rounds"] == 10
    assert saved["benchmarks"][0]["extra_info"]["threads"] == info["threads"]


def test_sampler_case_through_the_graph_runner_matches_the_plain_loop():
    """The sampler suite's "graphs" rows run the sampler's step runner (captured on CUDA); on a CPU
    it runs uncaptured and must compute what the plain loop computes."""
    import torch

    from protdiff_fast.bench import egnn as cases

    outs = {graphs: cases.make_sampler_case("cpu", 2, 10, 16, torch.float32, "cpu", graphs=graphs)()
            for graphs in (False, True)}
    assert bool(torch.isfinite(outs[True]).all()) and torch.equal(outs[True], outs[False])
    rows = runner.grid("cuda", quick=True, suites=["sampler"])
    assert any(r["mode"] == "graphs" and r["provider"] == "triton" for r in rows)
    assert not any(r["mode"] == "graphs" for r in runner.grid("cpu", quick=True, suites=["sampler"]))


def test_plots_without_egnn_rows(tmp_path):
    """A run of other suites only (e.g. `bench train-step`) still gets its plots."""
    import matplotlib  # noqa: F401

    rows = [_synthetic(p, 64, 1.0, 1.0, suite="train-step") for p in ("reference", "cpu")]
    names = runner.plot(dict(rows=rows, environment=dict(cpu="test cpu")), tmp_path)
    assert names == ["train-step.png"]


def test_autocast_rows_for_the_gpu_targets_run_and_report_the_pair_mlp_limit():
    """bfloat16-autocast rows (float32 model under torch.autocast, as `train` and `sample --autocast`
    run on a GPU): the GPU target rows exist (sampler H = 256 at N = 128 with graphs; train step),
    a row runs on the CPU, and a sampler row reports backbones/s at T = 1024 against the bf16
    pair-MLP limit (17.6 TFLOP per backbone at N = 128, H = 256)."""
    import torch

    from protdiff_fast.bench import egnn as cases

    targets = runner.target_rows("cuda")
    assert dict(suite="sampler", provider="triton", B=256, N=128, H=256, mode="graphs", dtype=runner.AUTOCAST) in targets
    assert any(r["suite"] == "train-step" and r["dtype"] == runner.AUTOCAST and r["provider"] == "triton"
               for r in targets)
    assert not any(r["dtype"] == runner.AUTOCAST for r in runner.target_rows("cpu"))
    assert abs(runner.pair_mlp_flops_per_backbone(128, 256) - 17.5e12) < 0.2e12
    plain = cases.make_sampler_case("cpu", 2, 10, 16, torch.float32, "cpu")()
    mixed = cases.make_sampler_case("cpu", 2, 10, 16, torch.float32, "cpu", autocast=torch.bfloat16)()
    assert mixed.dtype == torch.float32 and bool(torch.isfinite(mixed).all()) and not torch.equal(mixed, plain)
    row = dict(suite="sampler", provider="cpu", B=2, N=12, H=16, mode="fwd", dtype=runner.AUTOCAST)
    out = runner.run_row(row, "cpu", 1, 300, 0.1, mem_limit=None)
    assert out["status"] == "ok", out
    assert out["backbones_per_s_T1024"] == 2 / (out["median_s"] / cases.SAMPLER_STEPS * 1024)
    md = runner.markdown(dict(environment=dict(date="d", cpu="c", threads=1, torch="t", commit="x"),
                              rates=dict(mm_fp32_square_flops=1.0, mm_fp32_pair_shape_flops=1.0, pair_shape_H=64,
                                         copy_bytes_per_s=1.0, mm_bf16_square_flops=1e12), command="cmd", rows=[out]))
    assert "of the bf16 pair-MLP limit" in md
    step = runner.run_row(dict(suite="train-step", provider="cpu", B=1, N=12, H=16, mode="fwdbwd",
                               dtype=runner.AUTOCAST), "cpu", 1, 300, 0.1, mem_limit=None)
    assert step["status"] == "ok", step
    bad = runner.run_row(dict(suite="egnn", provider="cpu", B=1, N=12, H=16, mode="fwd", dtype=runner.AUTOCAST),
                         "cpu", 1, 300, 0.1, mem_limit=None)
    assert bad["status"] == "error" and "sampler and train-step suites only" in bad["error"]


def test_environment_records_kernel_overrides(monkeypatch):
    """An A/B run (PROTDIFF_FAST_TRITON_DW_STAGE=1 against the default) must say which side it is."""
    monkeypatch.delenv("PROTDIFF_FAST_TRITON_DW_STAGE", raising=False)
    monkeypatch.setenv("PROTDIFF_FAST_COMMIT", "abc123")
    assert "PROTDIFF_FAST_TRITON_DW_STAGE" not in runner.environment("cpu", 1)["overrides"]
    monkeypatch.setenv("PROTDIFF_FAST_TRITON_DW_STAGE", "1")
    overrides = runner.environment("cpu", 1)["overrides"]
    assert overrides["PROTDIFF_FAST_TRITON_DW_STAGE"] == "1" and "PROTDIFF_FAST_COMMIT" not in overrides


def test_warm_pass_runs_each_triton_row_once_untimed(capsys):
    """--warm-jobs: every triton row runs once (here under the interpreter), in parallel, and reports
    no timing; rows of other providers are left to the timed pass."""
    rows = [dict(suite="egnn", provider="triton", B=1, N=5, H=16, mode="fwd", dtype="float32"),
            dict(suite="ddpm-step", provider="triton", B=2, N=7, H=0, mode="fwd", dtype="float32"),
            dict(suite="egnn", provider="reference", B=1, N=5, H=16, mode="fwd", dtype="float32")]
    runner.warm_kernel_cache(rows, "cpu", 2, 300, jobs=2)
    assert "kernel cache warmed: 2 triton rows run once, 2 at a time" in capsys.readouterr().out
    spec = dict(rows[0], device="cpu", threads=1, budget_s=0.0, min_reps=0, max_reps=0, warm_only=True)
    proc = subprocess.run([sys.executable, "-m", "protdiff_fast.bench.worker", json.dumps(spec)],
                          capture_output=True, text=True, timeout=300)
    result = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT "))[13:])
    assert result["status"] == "warmed" and result["warm_s"] > 0 and "median_s" not in result


def test_triton_slab_provider_runs_the_triton_backend_with_the_slab_backward(monkeypatch):
    """The GPU target rows time the opt-in slab backward beside the default (speed and memory in one
    table); its worker gets backend "triton" and PROTDIFF_FAST_TRITON_BWD=slab, and a tiny row runs."""
    monkeypatch.delenv("PROTDIFF_FAST_TRITON_BWD", raising=False)
    cmd, env = runner.worker_command(dict(suite="egnn", provider="triton-slab", B=1, N=5, H=16, mode="fwdbwd"))
    assert json.loads(cmd[-1])["provider"] == "triton" and env["PROTDIFF_FAST_TRITON_BWD"] == "slab"
    assert "PROTDIFF_FAST_TRITON_BWD" not in runner.worker_command(dict(provider="triton"))[1]
    targets = runner.target_rows("cuda")
    assert dict(suite="egnn", provider="triton-slab", B=8, N=512, H=128, mode="fwdbwd", dtype="bfloat16") in targets
    assert any(r["suite"] == "train-step" and r["provider"] == "triton-slab" for r in targets)
    out = runner.run_row(dict(suite="egnn", provider="triton-slab", B=2, N=9, H=16, mode="fwdbwd", dtype="float32"),
                         "cpu", 1, 300, 0.1, mem_limit=None)
    assert out["status"] == "ok" and out["provider"] == "triton-slab", out


def test_gpu_target_rows_come_first():
    rows = runner.target_rows("cuda")
    first_other = next(k for k, r in enumerate(rows) if r["dtype"] == "float32" and r["suite"] != "ddpm-step"
                       and r["N"] < 8192)
    assert all(r["dtype"] == "float32" and r["suite"] != "ddpm-step" and r["N"] < 8192 for r in rows[first_other:])
    assert any(r["suite"] == "sampler" and r["H"] == 256 for r in rows[:first_other])


def test_commit_comes_from_the_environment_before_git(monkeypatch):
    """gpu.sh exports the tree's commit (.gpu-commit): a device machine's .git can be older than its tree."""
    monkeypatch.setenv("PROTDIFF_FAST_COMMIT", "e9da0c3 from .gpu-commit")
    assert runner._git_commit() == "e9da0c3 from .gpu-commit"
    monkeypatch.delenv("PROTDIFF_FAST_COMMIT")
    assert runner._git_commit() not in ("", "e9da0c3 from .gpu-commit")


def test_backward_profile_script_runs_its_variants_and_checks_them_against_the_default(tmp_path):
    """benchmarks/gpu_profile_bwd.py, the next lease's first look at the backward, here on the CPU (the
    interpreter, a tiny size): each variant in its own process, gradients compared with the default's."""
    out = tmp_path / "bwd.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_profile_bwd.py", "--device", "cpu", "--dtype", "float32",
                           "--sizes", "1,9,16", "--variants", "default,two-pass,unchunked,slab", "--jobs", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [r for r in json.loads(out.read_text())["results"] if "bwd_ms" in r and "profile_table" not in r]
    assert [r["name"] for r in rows] == ["default", "two-pass", "unchunked", "slab"]
    assert all(r["grads_vs_default"] is not None and r["grads_vs_default"] < 1e-5 for r in rows)
    assert all(r["fwd_nochecks_ms"] > 0 for r in rows)  # the forward without the host reads of the checks
    assert "two-pass" in proc.stdout and "grads vs default" in proc.stdout


def test_backward_variants_name_valid_settings_for_every_swept_hidden_size(monkeypatch):
    """Every variant's environment, formatted for each H the sweep times, is one the launcher accepts
    (a bad value would be an error row on the GPU, found only during a lease)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu_profile_bwd as prof
    import torch

    from protdiff_fast.ops import egnn_triton as et
    from protdiff_fast.ops import egnn_triton_slab as slab

    assert prof.variant_env(prof.VARIANTS["unchunked"], (8, 512, 128)) == {"PROTDIFF_FAST_TRITON_BWD_CHUNKS": "128,128"}
    for H in (128, 256):
        for name, env in prof.VARIANTS.items():
            for key in ("BWD_CHUNKS", "BWD_STAGES", "BWD", "SLAB_TILES", "SLAB_PAIRS", "SLAB_CHUNKS", "BLOCKS",
                        "BWD_PASSES", "DW_STAGE"):
                monkeypatch.delenv(f"PROTDIFF_FAST_TRITON_{key}", raising=False)
            for key, value in prof.variant_env(env, (1, 64, H)).items():
                monkeypatch.setenv(key, value)
            et.bwd_chunks(H)
            assert et.bwd_chunked_stages() >= 1 and et.bwd_passes(H) in (1, 2), name
            assert slab.use_slab_backward(H, torch.bfloat16) == name.startswith("slab"), name
            assert slab.slab_tiles(4) >= 1 and slab.slab_rows(8, 512) >= 1, name
            assert min(slab.slab_chunks(H, torch.bfloat16)) >= 16, name
    monkeypatch.setenv("PROTDIFF_FAST_TRITON_BWD_STAGES", "0")
    with pytest.raises(ValueError, match="BWD_STAGES"):
        et.bwd_chunked_stages()


def test_ddpm_step_bandwidth_rows_on_gpu_and_graphs_refused_off_it():
    """The step's bandwidth target needs a large B*N and the kernel's time alone (a replayed graph): the
    GPU target rows have both; a graphs row elsewhere is an error row, not a silent plain timing."""
    rows = [r for r in runner.target_rows("cuda") if r["suite"] == "ddpm-step" and r["B"] == 4096]
    assert {(r["provider"], r["mode"]) for r in rows} == {("reference", "fwd"), ("triton", "fwd"), ("triton", "graphs")}
    assert runner.ddpm_step_bytes(4096, 256) > 60e6
    out = runner.run_row(dict(suite="ddpm-step", provider="triton", B=2, N=5, H=0, mode="graphs", dtype="float32"),
                         "cpu", 1, 120, 0.1, mem_limit=None)
    assert out["status"] == "error" and "CUDA only" in out["error"]


def test_layer_rows_compare_egnn_pytorch_with_our_drop_in_by_that_layers_own_flops(tmp_path, monkeypatch):
    """egnn-pytorch's EGNN(dim=H, m_dim=H) does ~8x the op's pair products: its rows are a layer, scored by
    that layer's FLOPs, and compared with our drop-in (compat), not with the op."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from protdiff_fast.bench.egnn import flops, layer_flops, make_case

    pytest.importorskip("egnn_pytorch", reason="pinned in requirements-dev.txt; missing only outside dev/CI")
    B, N, H = 1, 24, 16
    for mode in ("fwd", "fwdbwd"):
        run = make_case("egnn-pytorch", B, N, H, mode, torch.float32, "cpu")
        with FlopCounterMode(display=False) as counter:
            run()
        counted = counter.get_total_flops()
        assert 0.9 < counted / layer_flops(B, N, H, mode) < 1.1, (mode, counted, layer_flops(B, N, H, mode))
        assert layer_flops(B, N, H, mode) > 6 * flops(B, N, H, mode)
        # and at a message width other than H (egnn-pytorch's default 16), where M and H are told apart
        run = make_case("egnn-pytorch-m16", B, N, 48, mode, torch.float32, "cpu")
        with FlopCounterMode(display=False) as counter:
            run()
        counted, want = counter.get_total_flops(), layer_flops(B, N, 48, mode, m_dim=16)
        assert 0.9 < counted / want < 1.1, (mode, counted, want)
    rows = [dict(suite="egnn", provider=p, B=1, N=12, H=8, mode="fwd", dtype="float32")
            for p in ("reference", "cpu", "egnn-pytorch", "compat")]
    monkeypatch.setattr(runner, "grid", lambda device, quick, suites, which="full": rows)
    monkeypatch.setattr(runner, "device_rates", lambda device: dict(mm_fp32_square_flops=1e11, mm_fp32_pair_shape_flops=5e10,
                                                                   pair_shape_H=64, copy_bytes_per_s=1e10))
    result = runner.run(["egnn"], "cpu", True, str(tmp_path / "a"), 120, None, "test")
    by = {r["provider"]: r for r in result["rows"]}
    assert all(r["status"] == "ok" and r["reps"] >= 3 for r in by.values()), by
    assert by["compat"]["flops"] == by["egnn-pytorch"]["flops"] == layer_flops(1, 12, 8, "fwd")
    assert by["cpu"]["flops"] == flops(1, 12, 8, "fwd")
    md = {line.split("|")[7].strip(): line for line in (tmp_path / "a" / "results.md").read_text().splitlines()
          if line.startswith("| egnn |")}
    speed = lambda p: md[p].split("|")[-2].strip()  # noqa: E731 - the last column
    assert speed("egnn-pytorch") == ""  # another function than the reference's: no speed-up against it
    want = by["egnn-pytorch"]["median_s"] / by["compat"]["median_s"]
    assert speed("compat") == f"{want:.1f}x"  # the drop-in against the layer it replaces
    assert speed("cpu").endswith("x") and f"[{by['cpu']['reps']}]" in md["cpu"]


def test_a_crashed_worker_is_a_crash_not_an_oom_row():
    import signal

    assert runner._died(-signal.SIGSEGV, "boom")["status"] == "crash"
    assert "SIGSEGV" in runner._died(-signal.SIGSEGV, "")["error"]
    assert runner._died(-signal.SIGABRT, "")["status"] == "crash"
    assert runner._died(-signal.SIGKILL, "")["status"] == "OOM" and runner._died(137, "")["status"] == "OOM"
    assert runner._died(1, "Traceback")["status"] == "error"
    # end to end: a worker that segfaults (a kernel bug) is reported as such
    row = dict(suite="egnn", provider="cpu", B=1, N=4, H=8, mode="fwd", dtype="float32")
    real = runner.worker_command
    code = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    try:
        runner.worker_command = lambda spec: ([sys.executable, "-c", code], None)
        out = runner.run_row(row, "cpu", 1, 60, 0.1, mem_limit=None)
    finally:
        runner.worker_command = real
    assert out["status"] == "crash" and "SIGSEGV" in out["error"], out


def test_compare_shows_regressions_missing_rows_and_changed_settings(tmp_path):
    env = dict(commit="a", cpu="x", threads=2, torch="2.13.0", triton="3.6.0", overrides={})
    row = lambda p, status="ok", t=0.01: dict(suite="egnn", provider=p, mode="fwd", dtype="float32", H=8, B=1,  # noqa: E731
                                              N=12, status=status, median_s=t)
    old = dict(environment=env, rows=[row("reference"), row("cpu"), row("egnn-pytorch")])
    (tmp_path / "old.json").write_text(json.dumps(old))
    new = dict(environment=dict(env, threads=1, overrides={"PROTDIFF_FAST_AMX": "0"}),
               rows=[row("reference", t=0.02), dict(row("cpu", "error"), error="CUDA error"), row("compat")])
    text = runner.compare(str(tmp_path / "old.json"), new)
    assert "egnn/reference/fwd/float32/8/1/12: 10.00 ms -> 20.00 ms (0.50x)" in text
    assert "NOW error: egnn/cpu/fwd/float32/8/1/12 (was 10.00 ms) CUDA error" in text
    assert "MISSING here: egnn/egnn-pytorch" in text and "new here: egnn/compat" in text
    assert "WARNING: threads differs: 2 there, 1 here" in text and "WARNING: overrides differs" in text
    assert "1 rows compared of 3; 1 no longer ok" in text


def test_source_digest_follows_the_package_sources(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "sub" / "b.py").write_text("y = 2\n")
    first = runner.source_digest(pkg)
    (pkg / "sub" / "__pycache__").mkdir()
    (pkg / "sub" / "__pycache__" / "b.cpython.pyc").write_bytes(b"\0")
    assert runner.source_digest(pkg) == first  # bytecode is not source
    (pkg / "sub" / "b.py").write_text("y = 3\n")
    assert runner.source_digest(pkg) != first
    env = runner.environment("cpu", 1)
    assert env["source_sha256"] == runner.source_digest() and len(env["source_sha256"]) == 64


def test_bench_records_the_command_it_was_given(tmp_path, monkeypatch):
    """python -m protdiff_fast.bench egnn ... was recorded as 'protdiff-fast egnn ...' (no such command)."""
    seen = {}

    def fake_run(suites, device, quick, out_dir, timeout, compare_to, command, **kw):
        seen["command"] = command
        return dict(plots=None, regressions=[])

    monkeypatch.setattr(runner, "run", fake_run)
    from protdiff_fast.cli import main

    assert main(["bench", "egnn", "--quick", "--out", str(tmp_path / "o b")]) == 0
    assert seen["command"] == f"protdiff-fast bench egnn --quick --out '{tmp_path / 'o b'}'"


def test_profile_variants_that_disagree_are_not_timed():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_profile_bwd", Path(__file__).resolve().parents[1]
                                                  / "benchmarks" / "gpu_profile_bwd.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert not mod.disagrees(None, "bfloat16") and not mod.disagrees(1e-6, "float32")
    assert mod.disagrees(5e-3, "float32") and mod.disagrees(0.2, "bfloat16") and mod.disagrees(float("nan"), "float32")


def test_ddpm_step_rows_rotate_input_sets_so_they_do_not_time_the_cache(monkeypatch):
    import torch

    import protdiff_fast.ops as ops
    from protdiff_fast.bench.egnn import MAX_INPUT_SETS, ROTATE_BYTES, input_sets, make_ddpm_step_case

    assert input_sets(ROTATE_BYTES) == 2 and input_sets(-(-ROTATE_BYTES // 3)) == 3 and input_sets(1) == MAX_INPUT_SETS
    seen = []
    monkeypatch.setattr(ops, "ddpm_step", lambda schedule, x, eps, t, **kw: seen.append((x.data_ptr(), float(x[0, 0, 0]))))
    run = make_ddpm_step_case("cpu", 4, 10, torch.float32, "cpu")
    for _ in range(MAX_INPUT_SETS + 2):
        run()
    ptrs = [p for p, _ in seen]
    assert len(set(ptrs)) == MAX_INPUT_SETS and ptrs[MAX_INPUT_SETS:] == ptrs[:2]  # every set, then round again
    assert len({v for _, v in seen}) == MAX_INPUT_SETS  # different data, not copies
    # the rows still run end to end through the worker
    out = runner.run_row(dict(suite="ddpm-step", provider="cpu", B=4, N=10, H=0, mode="fwd", dtype="float32"),
                         "cpu", 1, 120, 0.1, mem_limit=None)
    assert out["status"] == "ok" and out["reps"] >= 3, out


def test_rows_of_a_missing_cpu_extension_are_left_out_and_named(tmp_path, monkeypatch):
    from protdiff_fast import backends

    rows = [dict(suite="egnn", provider=p, B=1, N=12, H=8, mode="fwd", dtype="float32") for p in ("reference", "cpu")]
    monkeypatch.setattr(runner, "grid", lambda device, quick, suites, which="full": rows)
    monkeypatch.setattr(runner, "device_rates", lambda device: dict(mm_fp32_square_flops=1e11, mm_fp32_pair_shape_flops=5e10,
                                                                   pair_shape_H=64, copy_bytes_per_s=1e10))
    monkeypatch.setattr(backends, "cpu_extension", lambda: None)
    result = runner.run(["egnn"], "cpu", True, str(tmp_path / "a"), 120, None, "test")
    assert [r["provider"] for r in result["rows"]] == ["reference"]
    assert "not run on this machine: " in (tmp_path / "a" / "results.md").read_text()
    assert any(m.startswith("cpu ") for m in result["not_run"])


def test_unknown_providers_are_named_and_missing_ones_are_reported(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"--providers: unknown \['tritn'\]"):
        runner.run(["egnn"], "cpu", True, str(tmp_path / "a"), 60, None, "test", providers=["tritn"])
    monkeypatch.setattr(runner, "egnn_pytorch_available", lambda: False)
    assert any(m.startswith("egnn-pytorch and compat") for m in runner.not_available("cpu"))
    result = dict(command="c", environment=runner.environment("cpu", 1), not_run=runner.not_available("cpu"), rows=[],
                  rates=dict(mm_fp32_square_flops=1e11, mm_fp32_pair_shape_flops=5e10, pair_shape_H=64,
                             copy_bytes_per_s=1e10))
    assert "- not run on this machine: egnn-pytorch and compat" in runner.markdown(result)


def test_rows_timed_in_several_runs_report_their_spread(tmp_path, monkeypatch):
    medians = iter([0.010, 0.012, 0.011])
    monkeypatch.setattr(runner, "run_row", lambda row, *a: dict(row, status="ok", median_s=next(medians),
                                                                p20_s=0.009, p80_s=0.013, reps=5))
    row = dict(suite="egnn", provider="cpu", B=1, N=12, H=8, mode="fwd", dtype="float32")
    out = runner.repeated_row(row, "cpu", 1, 60, 0.1, None, runs=3)
    assert out["run_medians_s"] == [0.010, 0.012, 0.011] and out["median_s"] == pytest.approx(0.011)
    assert out["run_spread"] == pytest.approx(0.2)
    out["flops"], out["tflops_per_s"] = 1e9, 0.1
    md = runner.markdown(dict(command="c", environment=runner.environment("cpu", 1), rows=[out],
                              rates=dict(mm_fp32_square_flops=1e11, mm_fp32_pair_shape_flops=5e10, pair_shape_H=64,
                                         copy_bytes_per_s=1e10)))
    assert "11.000 [5] ±10% over 3 runs" in md
    failing = iter([dict(row, status="ok", median_s=0.01), dict(row, status="error", error="boom")])
    monkeypatch.setattr(runner, "run_row", lambda row, *a: next(failing))
    assert runner.repeated_row(row, "cpu", 1, 60, 0.1, None, runs=2)["status"] == "error"


def test_gpu_targets_run_the_drop_in_at_8192():
    """egnn-pytorch's layer and our drop-in at N = 8192 side by side (its O(N^2 H) tensors cannot fit;
    the drop-in runs its rectangular widths in the fused kernels)."""
    pytest.importorskip("egnn_pytorch")
    rows = runner.target_rows("cuda")
    for p in ("compat", "egnn-pytorch", "triton"):
        assert dict(suite="egnn", provider=p, B=1, N=8192, H=128, mode="fwdbwd", dtype="bfloat16") in rows


def test_layer_rows_at_egnn_pytorchs_default_m_dim():
    """egnn-pytorch-m16 / compat-m16: the layers at m_dim = 16 (its default), scored by that layer's FLOPs,
    and the drop-in's speed-up set against egnn-pytorch at the same m_dim (not the m_dim = H row)."""
    pytest.importorskip("egnn_pytorch")
    from protdiff_fast.bench import egnn as cases

    assert cases.layer_spec("compat-m16") == ("compat", 16) and cases.layer_spec("compat") == ("compat", None)
    assert cases.layer_spec("triton") is None
    assert cases.layer_flops(1, 8, 32, "fwd", m_dim=16) < cases.layer_flops(1, 8, 32, "fwd")
    targets = runner.target_rows("cuda")
    for p in ("compat-m16", "egnn-pytorch-m16"):
        assert dict(suite="egnn", provider=p, B=8, N=512, H=128, mode="fwdbwd", dtype="bfloat16") in targets
    rows = {}
    for p in ("egnn-pytorch", "compat", "egnn-pytorch-m16", "compat-m16"):
        rows[p] = runner.run_row(dict(suite="egnn", provider=p, B=1, N=9, H=16, mode="fwdbwd", dtype="float32"),
                                 "cpu", 1, 300, 0.1, mem_limit=None)
        assert rows[p]["status"] == "ok", rows[p]
    assert rows["compat-m16"]["flops"] == cases.layer_flops(1, 9, 16, "fwdbwd", m_dim=16) == rows["egnn-pytorch-m16"]["flops"]
    assert rows["compat"]["flops"] == cases.layer_flops(1, 9, 16, "fwdbwd")
    rows["egnn-pytorch"]["median_s"], rows["egnn-pytorch-m16"]["median_s"] = 3.0, 5.0
    rows["compat"]["median_s"] = rows["compat-m16"]["median_s"] = 1.0
    md = runner.markdown(dict(environment=dict(date="d", cpu="c", threads=1, torch="t", commit="x"),
                              rates=dict(mm_fp32_square_flops=1.0, mm_fp32_pair_shape_flops=1.0, pair_shape_H=64,
                                         copy_bytes_per_s=1.0), command="cmd", rows=list(rows.values())))
    line = {p: next(ln for ln in md.splitlines() if f"| {p} |" in ln) for p in rows}
    assert line["compat"].rstrip().endswith("| 3.0x |") and line["compat-m16"].rstrip().endswith("| 5.0x |")
    assert line["egnn-pytorch-m16"].rstrip().endswith("|  |")


def test_cpu_grid_and_targets_run_the_layers_at_m_dim_16_too():
    """The CPU grid and targets set the drop-in against egnn-pytorch at its default m_dim = 16 as well as at
    m_dim = H, under the same size cap as the m_dim = H rows; the GPU grid leaves them to its targets."""
    pytest.importorskip("egnn_pytorch")
    full = runner.grid("cpu", quick=False, suites=["egnn"])
    for p in ("compat-m16", "egnn-pytorch-m16"):
        sizes = {(r["B"], r["N"]) for r in full if r["provider"] == p}
        assert (1, 1024) in sizes and (8, 128) in sizes, sizes
        assert all(B * N <= runner.EGNN_PYTORCH_MAX_BN for B, N in sizes), sizes
        assert sizes == {(r["B"], r["N"]) for r in full if r["provider"] == layer_twin(p)}
        for mode in ("fwd", "fwdbwd"):
            assert dict(suite="egnn", provider=p, B=4, N=256, H=64, mode=mode, dtype="float32") \
                in runner.target_rows("cpu")
    assert not any(r["provider"].endswith("-m16") for r in runner.grid("cuda", quick=False, suites=["egnn"]))


def layer_twin(provider):
    return provider[: -len("-m16")]


def test_bench_options_and_outputs_are_checked_before_any_row_runs(tmp_path, monkeypatch, capsys):
    """Filters that leave nothing, impossible numbers, an unreadable --compare file and an --out holding an
    earlier run's results are named up front (0 rows ran with exit 0, --timeout 0 made every row a timeout,
    --compare failed after the whole run, an earlier results.json was overwritten)."""
    ran = []
    monkeypatch.setattr(runner, "repeated_row", lambda row, *a: ran.append(row) or dict(row, status="ok", median_s=1.0))

    def bench(**kw):
        args = dict(suites=["egnn"], device="cpu", quick=True, out_dir=str(tmp_path / "o"), timeout_s=60,
                    compare_to=None, command="test")
        return runner.run(**{**args, **kw})

    for kw, match in ((dict(dtypes=["float64"]), r"no benchmark rows left after the filters .*float32"),
                      (dict(max_n=0), "--max-n: the largest N to run, at least 1"),
                      (dict(timeout_s=0), "--timeout: seconds per row, a number > 0"),
                      (dict(timeout_s=float("nan")), "--timeout"), (dict(runs=0), "--runs must be >= 1"),
                      (dict(warm_jobs=-1), "--warm-jobs >= 0"), (dict(hidden=[0]), "--hidden: H values >= 1"),
                      (dict(compare_to=str(tmp_path / "none.json")), "--compare .*none.json: no such file")):
        with pytest.raises(ValueError, match=match):
            bench(**kw)
    (tmp_path / "text.json").write_text("not json")
    with pytest.raises(ValueError, match="--compare .*text.json: not a results.json"):
        bench(compare_to=str(tmp_path / "text.json"))
    assert ran == [] and not (tmp_path / "o").exists()
    monkeypatch.setattr(runner, "device_rates", lambda device: {})
    monkeypatch.setattr(runner, "markdown", lambda result: "")
    monkeypatch.setattr(runner, "plot", lambda result, out: None)
    bench(max_n=64, providers=["reference"])
    first = (tmp_path / "o" / "results.json").read_text()
    with pytest.raises(FileExistsError, match=r"--out .*o: holds the results of an earlier run"):
        bench(max_n=64, providers=["reference"])
    assert (tmp_path / "o" / "results.json").read_text() == first
    with pytest.raises(FileExistsError, match=r"--out .*o: holds the results of an earlier run"):  # its own baseline
        bench(max_n=64, providers=["reference"], compare_to=str(tmp_path / "o" / "results.json"))
    assert (tmp_path / "o" / "results.json").read_text() == first
    from protdiff_fast.cli import main

    assert main(["bench", "egnn", "--quick", "--hidden", "abc", "--out", str(tmp_path / "p")]) == 2
    assert "--hidden: comma-separated integers, got 'abc'" in capsys.readouterr().err


def test_egnn_fwd_rows_record_no_autograd_graph_for_any_provider():
    """"fwd" is inference for the op and the layers alike: egnn-pytorch's and compat's parameters required
    grad, so their forward kept every pair activation for a backward never run (egnn-pytorch's peak ~1.7x
    its inference peak at B=1 N=128 H=64), while the op rows' inputs required none: their memory ratio
    was inflated."""
    import torch

    from protdiff_fast.bench.egnn import make_case

    providers = ["reference", "cpu"] + (["egnn-pytorch", "compat", "compat-m16"] if _has_egnn_pytorch() else [])
    for provider in providers:
        run = make_case(provider, 1, 12, 16, "fwd", torch.float32, "cpu")
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            run()
        assert saved == [], (provider, sum(saved))


def _has_egnn_pytorch():
    from protdiff_fast.bench.egnn import egnn_pytorch_available

    return egnn_pytorch_available()


def test_egnn_fwdbwd_rows_do_not_accumulate_gradients_across_repetitions(monkeypatch):
    """Every timed repetition computes the gradients afresh and frees them, as the first does: nothing
    piles up in ``.grad`` (an extra read-modify-write per input and repetition, and gradient buffers held
    from the warm-up in the memory baseline)."""
    import torch

    import protdiff_fast.nn.compat as compat
    import protdiff_fast.ops as ops
    from protdiff_fast.bench.egnn import make_case

    seen = []
    real = ops.egnn_pair_aggregate
    monkeypatch.setattr(ops, "egnn_pair_aggregate", lambda *a, **k: seen.append((a, k)) or real(*a, **k))

    class Recorded(compat.EGNN):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen.append(((), dict(layer=self)))

    monkeypatch.setattr(compat, "EGNN", Recorded)
    for provider in ("reference", "cpu", "compat"):
        seen.clear()
        run = make_case(provider, 1, 10, 16, "fwdbwd", torch.float32, "cpu")
        run()
        run()
        tensors = [t for a, k in seen for t in (*a, *k.values()) if isinstance(t, torch.Tensor)]
        tensors += [p for a, k in seen if "layer" in k for p in k["layer"].parameters()]
        assert any(t.requires_grad for t in tensors), provider
        assert all(t.grad is None for t in tensors), provider


def test_results_files_get_the_permissions_of_a_plain_write(tmp_path, monkeypatch, capsys):
    """results.json / results.md were written through mkstemp and kept its 0600 (the plots beside them,
    and every other file a run writes, get 0666 less the umask); --quick prints its table as promised."""
    rows = [dict(suite="egnn", provider="reference", B=1, N=6, H=8, mode="fwd", dtype="float32")]
    monkeypatch.setattr(runner, "grid", lambda device, quick, suites, which="full": rows)
    monkeypatch.setattr(runner, "device_rates", lambda device: dict(mm_fp32_square_flops=1e11, mm_fp32_pair_shape_flops=5e10,
                                                                   pair_shape_H=64, copy_bytes_per_s=1e10))
    monkeypatch.setattr(runner, "repeated_row", lambda row, *a: dict(row, status="ok", median_s=1e-3, p20_s=1e-3,
                                                                     p80_s=1e-3, reps=3, flops=1e6, tflops_per_s=1e-6))
    monkeypatch.setattr(runner, "plot", lambda result, out: [])
    (tmp_path / "plain").write_text("")
    want = (tmp_path / "plain").stat().st_mode & 0o777
    runner.run(["egnn"], "cpu", True, str(tmp_path / "a"), 60, None, "test")
    for name in ("results.json", "results.md"):
        assert (tmp_path / "a" / name).stat().st_mode & 0o777 == want, name
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["results.json", "results.md"]  # no temporaries
    assert "| egnn | fwd | float32 | 8 | 1 | 6 | reference | 1.000 [3]" in capsys.readouterr().out


def test_train_step_rows_count_the_parameter_gradients_as_the_steps_own_memory(monkeypatch):
    """The step freed the previous repetition's gradients at its start: they sat in the worker's memory
    baseline (taken after the warm-up) and the step's peak left them out. Now each step frees its own
    at its end, so nothing is held between repetitions."""
    import torch

    import protdiff_fast.models as models
    from protdiff_fast.bench.egnn import make_train_step_case

    built = []

    class Recorded(models.ProtDiff):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            built.append(self)

    monkeypatch.setattr(models, "ProtDiff", Recorded)
    run = make_train_step_case("cpu", 1, 10, 16, torch.float32, "cpu")
    run()
    (model,) = built
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_compat_rows_run_the_fused_op_or_fail_never_the_reference_under_its_name(tmp_path, monkeypatch):
    """compat rows built the drop-in with backend="auto", which runs the reference, silently, wherever the
    fused backend cannot (here: no C++ extension): the row said "compat" and set the reference's time against
    egnn-pytorch's. Now they name the fused backend: such a row fails, and the runner leaves it out."""
    import torch

    from protdiff_fast import backends
    from protdiff_fast.bench.egnn import make_case

    monkeypatch.setattr(backends, "_load_cpu_extension",
                        lambda: (None, "the C++ extension protdiff_fast._C could not be imported (hidden)"))
    for provider in ("compat", "compat-m16"):
        run = make_case(provider, 1, 8, 16, "fwd", torch.float32, "cpu")
        with pytest.raises(RuntimeError, match="C\\+\\+ extension"):
            run()
    rows = [dict(suite="egnn", provider=p, B=1, N=12, H=8, mode="fwd", dtype="float32")
            for p in ("reference", "cpu", "egnn-pytorch", "compat", "compat-m16")]
    monkeypatch.setattr(runner, "grid", lambda device, quick, suites, which="full": rows)
    monkeypatch.setattr(runner, "device_rates", lambda device: {})
    monkeypatch.setattr(runner, "markdown", lambda result: "")
    monkeypatch.setattr(runner, "plot", lambda result, out: None)
    monkeypatch.setattr(runner, "repeated_row", lambda row, *a: dict(row, status="ok", median_s=1.0))
    result = runner.run(["egnn"], "cpu", True, str(tmp_path / "a"), 60, None, "test")
    assert [r["provider"] for r in result["rows"]] == ["reference", "egnn-pytorch"]
    assert any(m.startswith("cpu and compat") for m in result["not_run"])


def test_markdown_warns_when_the_machine_was_busy_at_the_start():
    from protdiff_fast.bench import runner

    def md(load, cores):
        env = dict(date="d", cpu="c", threads=1, torch="t", commit="x", load_average=load, cpu_count=cores)
        return runner.markdown(dict(environment=env, rates=dict(mm_fp32_square_flops=1.0, mm_fp32_pair_shape_flops=1.0,
                                                                pair_shape_H=64, copy_bytes_per_s=1.0),
                                    command="cmd", rows=[]))

    assert "WARNING: load average 2.90 on 2 cores at the start" in md((2.9, 3.4, 3.5), 2)
    assert "WARNING" not in md((0.1, 0.3, 0.4), 2) and "WARNING" not in md((3.0, 3.0, 3.0), 16)
    assert "WARNING" not in md(None, 2)  # no load average on this platform: nothing to say


def test_layer_rows_build_the_same_weights_in_every_run(monkeypatch):
    """egnn-pytorch's layer was built from the global RNG as it stood: a row's weights (and so how much of
    its SiLUs saturate) depended on what ran before it in the process."""
    if not _has_egnn_pytorch():
        pytest.skip("egnn-pytorch is not installed")
    import egnn_pytorch
    import torch

    from protdiff_fast.bench.egnn import make_case
    from protdiff_fast.nn import compat

    for module, name in ((egnn_pytorch, "EGNN"), (compat, "EGNN")):
        built = []
        cls = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _cls=cls, **k: built.append(_cls(*a, **k)) or built[-1])
        for burn in (0, 7):
            torch.manual_seed(burn)
            torch.randn(burn + 1)
            make_case("egnn-pytorch" if module is egnn_pytorch else "compat", 1, 5, 8, "fwd", torch.float32, "cpu")
        first, second = (dict(layer.state_dict()) for layer in built)
        assert first.keys() == second.keys() and first
        for key in first:
            assert torch.equal(first[key], second[key]), (module.__name__, key)
        monkeypatch.setattr(module, name, cls)
