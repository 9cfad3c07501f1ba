"""``protdiff-fast scaffold`` end to end with the shipped model at tiny settings, and its bad-input messages."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import gemmi
import numpy as np
import pytest

from protdiff_fast.cli import main
from protdiff_fast.metrics.motif import motif_rmsd
from protdiff_fast.motif import motif_spec

DATA = Path(__file__).parent / "data"
PDB = DATA / "motif_5tpn.pdb"
CONTIG = "10-40,A163-181,10-40"


def _args(out, method="smc", *extra):
    return ["scaffold", "--pdb", str(PDB), "--contig", CONTIG, "--length", "50-60", "--num", "2", "--particles", "3",
            "--method", method, "--steps", "6", "--redenoise-t", "3", "--seed", "5", "--out", str(out),
            "--no-progress", *extra]


def test_scaffold_cli_writes_marked_designs_and_summary(tmp_path, capsys):
    out = tmp_path / "smc"
    assert main(_args(out)) == 0
    printed = capsys.readouterr()
    assert "2 designs (smc, 3 particle(s) each, 6 steps" in printed.out
    assert "min ESS" in printed.err  # the non-TTY progress log line
    content = json.loads((out / "summary.json").read_text())
    s = content["summary"]
    assert s["num_designs"] == 2 and s["particles"] == 3 and s["steps"] == 6
    spec = motif_spec(PDB, CONTIG, "50-60")
    for row in content["designs"]:
        assert 50 <= row["length"] <= 60
        st = gemmi.read_structure(str(out / row["design"]))
        res = list(st[0]["A"])
        assert len(res) == row["length"]
        pos = np.asarray(row["motif_positions"]) - 1  # 1-based in the summary
        marked = [i for i, r in enumerate(res) if r[0].b_iso == 1.0]
        assert marked == pos.tolist()  # B-factor marks exactly the motif residues
        assert "".join(gemmi.find_tabulated_residue(res[i].name).one_letter_code.upper() for i in pos) == spec.sequence
        assert any("MOTIF RESIDUES" in line for line in st.raw_remarks)
        ca = np.array([[r[0].pos.x, r[0].pos.y, r[0].pos.z] for r in res])
        # the summary's RMSD is the RMSD of the written file (PDB rounds to 1e-3 A)
        assert abs(float(motif_rmsd(ca[pos], spec.motif_ca)[0]) - row["motif_rmsd"]) < 5e-3
        assert np.isfinite(row["redenoise_motif_rmsd"]) and np.isfinite(row["log_weight"])
        assert row["ca_ca_dev"] >= 0
    # the summary's numbers are those of the rows, and the re-denoised RMSD is not the design's own
    raw = [r["motif_rmsd"] for r in content["designs"]]
    red = [r["redenoise_motif_rmsd"] for r in content["designs"]]
    assert s["success_rate"] == np.mean([v < 1.0 for v in raw]) and s["mean_motif_rmsd"] == pytest.approx(np.mean(raw))
    assert s["redenoise_success_rate"] == np.mean([v < 1.0 for v in red])
    assert s["mean_redenoise_motif_rmsd"] == pytest.approx(np.mean(red))
    assert all(abs(a - b) > 1e-3 for a, b in zip(red, raw)), (red, raw)  # noised and denoised again: it moved
    log = content["smc_log"]
    assert len(log["min_ess"]) == 6 and s["resampling_events"] == len(log["resampling_events"])
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["design"] for r in rows] == [r["design"] for r in content["designs"]]
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_scaffold_cli_is_reproducible_and_baselines_run(tmp_path, capsys):
    assert main(_args(tmp_path / "a", "replacement")) == 0
    # _args gives --particles 3, which only SMCDiff uses: said, not silently ignored
    assert "--particles 3: only for --method smc; ignored by --method replacement" in capsys.readouterr().err
    assert main(_args(tmp_path / "b", "replacement")) == 0
    assert (tmp_path / "a" / "design_0000.pdb").read_bytes() == (tmp_path / "b" / "design_0000.pdb").read_bytes()
    assert main(_args(tmp_path / "c", "fixed")) == 0
    s = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert s["summary"]["particles"] == 1 and s["smc_log"] is None


@pytest.mark.parametrize("change, words", [
    ({"--contig": "10-40,B163-181,10-40"}, "no chain 'B'"),
    ({"--contig": "10-40,A150-181,10-40"}, "no CA for residue"),
    ({"--length": "5-10"}, "more than the maximum length 10"),
    ({"--particles": "0"}, "--particles must be >= 1"),
    ({"--contig": "10-40,A163-181,A170-175"}, "overlap"),
    ({"--steps": "0"}, "--steps must lie in [1, T = 1024], got 0"),  # was the scheduler's num_inference_steps
])
def test_scaffold_cli_bad_input_is_a_message(tmp_path, capsys, change, words):
    args = _args(tmp_path / "x")
    for flag, value in change.items():
        args[args.index(flag) + 1] = value
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "protdiff-fast scaffold: error:" in err and words in err
    assert not (tmp_path / "x").exists()  # nothing written


def test_scaffold_cli_refuses_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    assert main(_args(tmp_path / "x")) == 2
    assert "not an empty folder" in capsys.readouterr().err


def test_scaffold_cli_autocast_runs_the_model_in_bf16_and_says_so(tmp_path, monkeypatch):
    """--autocast bf16: the model's calls run under torch.autocast, everything the SMC weights use stays
    float32, and the summary records it (float32 summaries carry no such key)."""
    import torch

    from protdiff_fast.models import ProtDiff

    seen = []
    forward = ProtDiff.forward

    def spy(self, x_t, t, mask=None):
        seen.append((torch.is_autocast_enabled(x_t.device.type), torch.get_autocast_dtype(x_t.device.type), x_t.dtype))
        return forward(self, x_t, t, mask)

    monkeypatch.setattr(ProtDiff, "forward", spy)
    assert main(_args(tmp_path / "f32")) == 0
    assert seen and not any(on for on, _, _ in seen)
    seen.clear()
    assert main(_args(tmp_path / "bf16", "smc", "--autocast", "bf16")) == 0
    assert seen and all(on and dt == torch.bfloat16 and x_dtype == torch.float32 for on, dt, x_dtype in seen)
    a = json.loads((tmp_path / "f32" / "summary.json").read_text())
    b = json.loads((tmp_path / "bf16" / "summary.json").read_text())
    assert "autocast" not in a["summary"] and b["summary"]["autocast"] == "bfloat16"
    for row in b["designs"]:
        assert np.isfinite(row["motif_rmsd"]) and np.isfinite(row["log_weight"])
    assert [r["length"] for r in a["designs"]] == [r["length"] for r in b["designs"]]  # same layouts


def test_autocast_eps_wrapper_returns_float32_and_refuses_other_dtypes():
    import torch

    from protdiff_fast.motif.scaffold import AutocastEps

    class Model:
        max_length = 77

        def __call__(self, x, t, mask=None):
            return (x @ torch.eye(3)).to(torch.bfloat16) if torch.is_autocast_enabled("cpu") else x

    wrapped = AutocastEps(Model(), torch.bfloat16)
    x = torch.randn(2, 5, 3)
    eps = wrapped(x, torch.zeros(2, dtype=torch.long))
    assert eps.dtype == torch.float32 and wrapped.max_length == 77
    assert torch.allclose(eps, x, rtol=1e-2, atol=1e-2) and not torch.equal(eps, x)  # it ran in bf16
    with pytest.raises(ValueError, match="autocast"):
        AutocastEps(Model(), torch.float64)


def test_scaffold_cli_clash_guidance_guides_the_designs_but_not_the_redenoising(tmp_path, monkeypatch, capsys):
    import importlib

    scaffold_mod = importlib.import_module("protdiff_fast.motif.scaffold")  # the package exports a function of that name

    guided_steps = []
    redenoise_schedulers = []
    real_redenoise = scaffold_mod.redenoise

    def spy_redenoise(*args, scheduler=None, **kw):
        redenoise_schedulers.append(scheduler)
        return real_redenoise(*args, scheduler=scheduler, **kw)

    monkeypatch.setattr(scaffold_mod, "redenoise", spy_redenoise)
    from protdiff_fast.diffusion.guidance import ClashGuidance

    real_call = ClashGuidance.__call__

    def spy_call(self, *args, **kw):
        guided_steps.append(1)
        return real_call(self, *args, **kw)

    monkeypatch.setattr(ClashGuidance, "__call__", spy_call)
    every_step = ["--clash-guidance", "1.0", "--clash-guidance-steps", "1024"]
    assert main(_args(tmp_path / "plain", "replacement")) == 0
    assert not guided_steps
    assert main(_args(tmp_path / "guided", "replacement", *every_step)) == 0
    assert guided_steps, "the designs' steps went through the guidance"
    assert redenoise_schedulers[-1].clash_guidance is None, "the re-denoising check runs the model alone"
    plain = json.loads((tmp_path / "plain" / "summary.json").read_text())["summary"]
    guided = json.loads((tmp_path / "guided" / "summary.json").read_text())["summary"]
    assert "clash_guidance" not in plain
    assert guided["clash_guidance"] == dict(strength=1.0, min_distance=3.8, max_timestep=1024, scale=10.0)
    assert (tmp_path / "plain" / "design_0000.pdb").read_bytes() != (tmp_path / "guided" / "design_0000.pdb").read_bytes()
    capsys.readouterr()
    assert main(_args(tmp_path / "smc", "smc", "--clash-guidance")) == 2
    err = capsys.readouterr().err
    assert "--clash-guidance: not with --method smc" in err and "replacement or fixed" in err
    assert not (tmp_path / "smc").exists()


def test_scaffold_warns_below_the_training_lengths(tmp_path):
    args = _args(tmp_path / "short", "fixed")
    args[args.index("--length") + 1] = "39-45"  # the shipped model saw chains of 40.. residues
    with pytest.warns(UserWarning, match=r"designs of 39\.\. residues, shorter than any chain this model was trained on"):
        assert main(args) == 0


def test_scaffold_cli_exits_3_naming_the_step_when_the_model_gives_nan(tmp_path, capsys, monkeypatch):
    import torch

    import protdiff_fast.train as train_module

    real = train_module.load_model

    def nan_model(*a, **kw):
        model = real(*a, **kw)
        model.forward = lambda x, t, mask=None: torch.full_like(x, float("nan"))
        return model

    monkeypatch.setattr(train_module, "load_model", nan_model)
    out = tmp_path / "nan"
    assert main(_args(out)) == 3
    err = capsys.readouterr().err
    assert "protdiff-fast scaffold: error:" in err and "NaN" in err and "t=" in err, err
    assert not out.exists() or not list(out.glob("design_*"))  # no partial designs


def test_scaffold_records_the_command_it_was_given(tmp_path):
    assert main(_args(tmp_path / "c", "fixed")) == 0
    s = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert s["summary"].get("command", s.get("command", "")).startswith("protdiff-fast scaffold --pdb ")


def test_long_remarks_are_wrapped_not_cut(tmp_path):
    """A motif of many segments: its residue list in REMARK 999 was cut at column 80, so "...,81,91" read
    "...,81,9" (a residue that is not in the motif). Wrapped at commas, the lines give the whole list back."""
    from protdiff_fast.motif.run import _design_structure, _ranges

    pos = np.arange(2, 200, 10)  # 20 single-residue segments: "3,13,23,...,193"
    ca = np.random.default_rng(0).standard_normal((200, 3)) * 10
    st = _design_structure(ca, pos, "A" * len(pos), ["MOTIF RESIDUES (B-FACTOR 1.00) " + _ranges(pos + 1)])
    st.write_pdb(str(tmp_path / "d.pdb"))
    remarks = [line for line in (tmp_path / "d.pdb").read_text().splitlines() if line.startswith("REMARK 999")]
    assert len(remarks) > 1 and all(len(line) <= 80 for line in remarks)
    text = "".join(line[len("REMARK 999 "):].strip() for line in remarks)
    listed = text.split("MOTIF RESIDUES (B-FACTOR 1.00) ", 1)[1]
    assert [int(v) for v in listed.split(",")] == (pos + 1).tolist()


def test_files_that_appear_during_the_run_are_not_overwritten(tmp_path, capsys, monkeypatch):
    """The folder is checked empty at the start; a second run with the same --out that finished first had
    its design_0000.pdb replaced by this run's (rename over it) without a word."""
    import protdiff_fast.train as train_module

    real = train_module.load_model
    out = tmp_path / "shared"

    def other_run_writes_meanwhile(*a, **kw):
        model = real(*a, **kw)
        forward = model.forward

        def forward_and_write(x, t, mask=None):
            if not (out / "design_0000.pdb").exists():
                (out / "design_0000.pdb").write_text("the other run's design\n")
            return forward(x, t, mask)

        model.forward = forward_and_write
        return model

    monkeypatch.setattr(train_module, "load_model", other_run_writes_meanwhile)
    assert main(_args(out, "fixed", "--redenoise-t", "0")) == 2
    err = capsys.readouterr().err
    assert "design_0000.pdb appeared while this run was sampling" in err, err
    assert (out / "design_0000.pdb").read_text() == "the other run's design\n"
    assert not (out / "summary.json").exists()


def test_scaffold_cli_design_i_is_the_same_in_a_larger_run(tmp_path):
    # README: design i of --num 10 is design i of --num 100 (same seed and options), bit for bit
    rows = {}
    for num in (2, 5):
        out = tmp_path / f"n{num}"
        args = _args(out)
        args[args.index("--num") + 1] = str(num)
        assert main(args) == 0
        rows[num] = json.loads((out / "summary.json").read_text())["designs"]
    lengths = [r["length"] for r in rows[5]]
    assert max(lengths[2:]) > max(lengths[:2]), lengths  # the larger run pads further (seed 5's layouts)
    for a, b in zip(rows[2], rows[5][:2]):
        assert a == b
        assert (tmp_path / "n2" / a["design"]).read_bytes() == (tmp_path / "n5" / b["design"]).read_bytes()


def test_summary_rows_are_the_sampler_results_in_angstrom(tmp_path, monkeypatch):
    """Each row against the sampler's own ScaffoldResult and re-denoised designs (recorded by wrapping the
    two functions): the written file holds design d x 10 A (a wrong scale moved the file and its RMSD
    together, which the earlier check of one against the other could not see), the re-denoised RMSD is
    that of the re-denoised design in A, the reported particle's weight is that particle's, final_ess is
    1 / sum_k w_k^2, and the backbone metrics are those of the design in A."""
    import importlib

    from protdiff_fast.metrics import backbone_metrics

    sc = importlib.import_module("protdiff_fast.motif.scaffold")
    got = {}
    real_scaffold, real_redenoise = sc.scaffold, sc.redenoise

    def keep(name, fn):
        def wrapped(*a, **kw):
            got[name] = fn(*a, **kw)
            return got[name]
        return wrapped

    def scaffold_with_spread_weights(*a, **kw):  # the shipped model's last weighted step leaves one-hot weights
        res = real_scaffold(*a, **kw)  # (ESS 1, as 1 / sum w_k^2 and a wrong formula agree); these are spread
        res.log_weights = np.log(np.stack([np.roll([0.5, 0.3, 0.2], d) for d in range(len(res.chosen))]))
        return res

    monkeypatch.setattr(sc, "scaffold", keep("result", scaffold_with_spread_weights))
    def redenoise_two_blown_up(*a, **kw):  # designs 0 and 1 re-denoised 3x too large: those two fail
        red = real_redenoise(*a, **kw)
        return [r * 3.0 if d < 2 else r for d, r in enumerate(red)]

    monkeypatch.setattr(sc, "redenoise", keep("red", redenoise_two_blown_up))
    out = tmp_path / "rows"
    args = _args(out)
    args[args.index("--num") + 1] = "4"
    assert main(args) == 0
    res, red = got["result"], got["red"]
    content = json.loads((out / "summary.json").read_text())
    rows, summary = content["designs"], content["summary"]
    raw, again = [r["motif_rmsd"] for r in rows], [r["redenoise_motif_rmsd"] for r in rows]
    assert len(rows) == 4 and summary["mean_motif_rmsd"] == pytest.approx(sum(raw) / 4, abs=1e-12)  # mean, not median
    assert summary["mean_redenoise_motif_rmsd"] == pytest.approx(sum(again) / 4, abs=1e-12)
    # the two success rates, each of its own RMSDs (< 1 A), on a run where they differ
    assert summary["success_rate"] == 1.0 and all(v < 1.0 for v in raw)
    assert summary["redenoise_success_rate"] == 0.5 and again[0] > 1 and again[1] > 1 and max(again[2:]) < 1
    log = content["smc_log"]  # per step: the min and mean ESS over the designs
    weighted = [s for s, row in enumerate(res.ess) if not np.isnan(row).all()]  # the last step has no weighting
    assert weighted and log["min_ess"][-1] is None and log["mean_ess"][-1] is None
    for s in weighted:
        assert log["min_ess"][s] == pytest.approx(float(np.nanmin(res.ess[s])))
        assert log["mean_ess"][s] == pytest.approx(float(np.nanmean(res.ess[s])))
    assert any(log["mean_ess"][s] > log["min_ess"][s] + 1e-6 for s in weighted)  # the two differ somewhere
    spec = motif_spec(PDB, CONTIG, "50-60")
    assert any(int(c) != 0 for c in res.chosen), res.chosen  # the particle-weight check below needs one
    for d, row in enumerate(rows):
        pos = np.asarray(row["motif_positions"]) - 1
        np.testing.assert_array_equal(pos, res.motif_positions[d])
        design = res.design(d) * 10.0  # model units -> A
        st = gemmi.read_structure(str(out / row["design"]))
        ca = np.array([[r[0].pos.x, r[0].pos.y, r[0].pos.z] for r in st[0]["A"]])
        np.testing.assert_allclose(ca, design, atol=6e-4)  # PDB's 3 decimals
        remark = "".join(line[len("REMARK 999 "):].strip() for line in st.raw_remarks if line.startswith("REMARK 999"))
        listed = []  # "3-5,9" -> [3, 4, 5, 9]: the file's own list of motif residues, 1-based as its numbering
        for part in remark.split("MOTIF RESIDUES (B-FACTOR 1.00) ", 1)[1].split(","):
            lo, _, hi = part.partition("-")
            listed += list(range(int(lo), int(hi or lo) + 1))
        assert listed == row["motif_positions"] == [r.seqid.num for i, r in enumerate(st[0]["A"]) if i in set(pos)]
        assert row["motif_rmsd"] == pytest.approx(float(motif_rmsd(design[pos], spec.motif_ca)[0]), abs=1e-9)
        assert row["redenoise_motif_rmsd"] == pytest.approx(float(motif_rmsd(red[d][pos] * 10.0, spec.motif_ca)[0]),
                                                            abs=1e-9)
        w = np.exp(res.log_weights[d])
        assert row["particle"] == int(res.chosen[d])
        assert row["log_weight"] == pytest.approx(float(res.log_weights[d, res.chosen[d]]), abs=1e-12)
        assert row["log_weight"] != pytest.approx(float(res.log_weights[d, (res.chosen[d] + 1) % 3]), abs=1e-6)
        assert row["final_ess"] == pytest.approx(1.0 / float((w ** 2).sum()), rel=1e-9) == pytest.approx(1 / 0.38)
        want = backbone_metrics(design)
        for key in ("ca_ca_dev", "ca_ca_valid", "rg", "rg_ratio", "clash_pairs", "helix", "strand"):
            assert row[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key


def test_motif_residue_ranges_in_the_remarks():
    from protdiff_fast.motif.run import _ranges

    assert _ranges(np.array([3, 4, 5, 9])) == "3-5,9"
    assert _ranges(np.array([1, 3, 5])) == "1,3,5"  # a gap of one residue is a gap
    assert _ranges(np.array([7])) == "7" and _ranges(np.array([2, 3, 10, 11, 12, 20])) == "2-3,10-12,20"
