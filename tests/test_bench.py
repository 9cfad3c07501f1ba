"""The benchmark runner works end to end on tiny rows (speed itself is measured by the benchmarks, not here)."""
import json

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


def test_oom_rows_are_kept(tmp_path):
    row = dict(suite="egnn", provider="reference", B=64, N=2048, H=64, mode="fwd", dtype="float32")
    out = runner.run_row(row, "cpu", 1, 120, 0.1, mem_limit=3 * 2 ** 30)
    assert out["status"] == "OOM" and out["N"] == 2048


def test_sampler_mixed_row_measures_a_whole_run():
    from protdiff_fast.bench.egnn import sampler_mixed_lengths

    lengths = sampler_mixed_lengths(5, 12)
    assert sorted(lengths) == [6, 8, 9, 10, 12] and lengths != sorted(lengths)  # mixed, not pre-sorted
    # lengths the shipped model was trained on (40..128); much shorter chains can diverge in 50 steps
    row = dict(suite="sampler-mixed", provider="cpu", B=2, N=40, H=64, mode="write", dtype="float32")
    out = runner.run_row(row, "cpu", 1, 300, 0.1, mem_limit=None)
    assert out["status"] == "ok", out
    assert out["backbones_per_s"] == 2 / out["median_s"] and out["reps"] >= 2
    md = runner.markdown(dict(environment=dict(date="d", cpu="c", threads=1, torch="t", commit="x"),
                              rates=dict(mm_fp32_square_flops=1.0, mm_fp32_pair_shape_flops=1.0, pair_shape_H=64,
                                         copy_bytes_per_s=1.0), command="cmd", rows=[out]))
    assert "| sampler-mixed | write, 50 steps, batch 8 | float32 | 64 | 2 designs | 20..40 | cpu |" in md
