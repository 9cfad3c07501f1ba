"""Backbone metrics on geometries with known answers and on real proteins."""
import math
import re
from pathlib import Path

import numpy as np
import pytest

from protdiff_fast.cli import main
from protdiff_fast.io import read_backbones
from protdiff_fast.metrics import backbone_metrics, clashes, format_table, secondary_structure, summarize, tm_diversity

DATA = Path(__file__).parent / "data"


def ideal_helix(n, radius=2.3, rise=1.5, turn_deg=100.0):
    k = np.arange(n)
    a = np.radians(turn_deg) * k
    return np.stack([radius * np.cos(a), radius * np.sin(a), rise * k], axis=1)


def test_ideal_helix():
    ca = ideal_helix(40)
    m = backbone_metrics(ca)
    assert m["ca_ca_dev"] < 0.05 and m["ca_ca_valid"] == 1.0
    assert m["clash_pairs"] == 0
    assert m["helix"] >= 0.9 and m["strand"] == 0.0


def test_straight_chain():
    L, d = 30, 3.8
    ca = np.stack([np.arange(L) * d, np.zeros(L), np.zeros(L)], axis=1)
    m = backbone_metrics(ca)
    assert m["ca_ca_dev"] < 1e-12 and m["ca_ca_valid"] == 1.0 and m["clash_pairs"] == 0
    assert math.isclose(m["rg"], d * math.sqrt((L * L - 1) / 12), rel_tol=1e-12)
    assert math.isclose(m["rg_ratio"], m["rg"] / (2.2 * L ** 0.38), rel_tol=1e-12)
    assert m["helix"] == 0.0 and m["strand"] == 0.0  # a straight line is neither


def test_overlapping_atoms_clash():
    ca = ideal_helix(12)
    ca[8] = ca[2] + 0.1  # non-adjacent pair almost on top of each other
    c = clashes(ca)
    assert c["clash_pairs"] >= 1 and c["clash_fraction"] > 0
    adjacent = np.array([[0.0, 0, 0], [2.0, 0, 0], [5.8, 0, 0]])  # |i - j| = 1 never counts as a clash
    assert clashes(adjacent)["clash_pairs"] == 0
    assert clashes(adjacent, threshold=6.0)["clash_pairs"] == 1


@pytest.mark.parametrize("name, helix, strand", [("1crn.pdb", (0.3, 0.7), (0.05, 0.4)),
                                                 ("1TEN_A.pdb", (0.0, 0.1), (0.35, 0.7)),
                                                 ("1qys.pdb", (0.25, 0.6), (0.3, 0.6))])
def test_real_proteins_score_as_real_proteins(name, helix, strand):
    ca = read_backbones(DATA / name)[0].ca
    m = backbone_metrics(ca)
    assert m["ca_ca_dev"] < 0.1 and m["ca_ca_valid"] > 0.9
    assert m["clash_pairs"] == 0
    assert 0.85 < m["rg_ratio"] < 1.2
    assert helix[0] <= m["helix"] <= helix[1] and strand[0] <= m["strand"] <= strand[1], secondary_structure(ca)


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match=r"ca: expected shape \(L, 3\)"):
        backbone_metrics(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="NaN"):
        backbone_metrics(np.full((4, 3), np.nan))
    with pytest.raises(ValueError, match=r"ca: no residues"):  # was a ZeroDivisionError
        backbone_metrics(np.zeros((0, 3)))


def test_summary_table_and_evaluate_cli(tmp_path, capsys):
    rows = [backbone_metrics(read_backbones(DATA / n)[0].ca) for n in ("1crn.pdb", "1qys.pdb")]
    s = summarize(rows)
    assert s["count"] == 2 and s["with_clash"] == 0.0
    assert "ca_ca_dev" in format_table({"real": s})
    plot = tmp_path / "m.png"
    assert main(["evaluate", str(DATA / "1qys.pdb"), str(DATA / "1TEN_A.pdb"), "--reference", str(DATA / "1crn.pdb"),
                 "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "samples" in out and "reference" in out and "rg_ratio" in out
    try:
        import matplotlib  # noqa: F401
        assert plot.is_file() and plot.stat().st_size > 1000
    except ImportError:
        assert "matplotlib" in out


def test_evaluate_plot_never_replaces_a_file_that_is_not_its_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    sample = str(DATA / "1qys.pdb")
    victim = tmp_path / "victim.pdb"
    victim.write_text("my structure")
    assert main(["evaluate", sample, "--plot", str(victim)]) == 2  # not an image name: refused, untouched
    assert "name a .png, .svg or .pdf file" in capsys.readouterr().err and victim.read_text() == "my structure"
    fake = tmp_path / "notes.png"
    fake.write_text("not a png")
    assert main(["evaluate", sample, "--plot", str(fake)]) == 2
    assert "exists and is not a png plot" in capsys.readouterr().err and fake.read_text() == "not a png"
    svg = tmp_path / "m.svg"
    for _ in range(2):  # the format follows the name, and a plot replaces the earlier plot
        assert main(["evaluate", sample, "--plot", str(svg)]) == 0
        assert svg.read_bytes().startswith(b"<?xml") and b"<svg" in svg.read_bytes()[:400]
    assert main(["evaluate", sample, "--plot", "", "--clash-threshold", "-1"]) == 2
    assert "--clash-threshold: a distance in A > 0" in capsys.readouterr().err


def test_missing_residues_are_a_chain_break_not_a_bad_bond(tmp_path, capsys):
    """A real chain with residues missing: the bond across the gap was counted as a 3.80 A bond (1qys
    without residues 60-65: deviation 0.014 -> 0.12 A). A numbering jump with a long bond is a break; a
    design's long bond (contiguous numbers) stays a bad bond."""
    from protdiff_fast.metrics.backbone import chain_breaks

    bb = read_backbones(DATA / "1qys.pdb")[0]
    keep = np.r_[0:59, 66:len(bb.ca)]
    ca, numbers = bb.ca[keep], bb.resnums[keep]
    breaks = chain_breaks(ca, numbers)
    assert breaks.sum() == 1 and breaks[58]
    whole, gapped = backbone_metrics(bb.ca), backbone_metrics(ca, breaks=breaks)
    assert abs(gapped["ca_ca_dev"] - whole["ca_ca_dev"]) < 0.005 and gapped["ca_ca_valid"] == 1.0
    assert backbone_metrics(ca)["ca_ca_dev"] > 0.1  # as a design (no breaks given) the gap is a bad bond
    assert not chain_breaks(ca, np.arange(len(ca))).any()  # contiguous numbers: no break
    with pytest.raises(ValueError, match="breaks: expected one flag per CA-CA bond"):
        backbone_metrics(ca, breaks=breaks[:-1])
    # evaluate reads the numbering from the file
    from protdiff_fast.io.structure import backbone_structure
    st = backbone_structure(ca)
    for res, n in zip(st[0]["A"], numbers):
        res.seqid.num = int(n)
    st.write_pdb(str(tmp_path / "gap.pdb"))
    assert main(["evaluate", str(tmp_path / "gap.pdb"), "--plot", ""]) == 0
    dev_line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("ca_ca_dev")][0]
    assert float(dev_line.split()[1]) < 0.05, dev_line


def test_neighbours_across_a_chain_break_are_checked_for_clashes():
    # a straight chain of 3.8 A bonds, residue 6 moved to 2.5 A of residue 5 (and > 3 A of everything else)
    ca = np.stack([np.arange(10) * 3.8, np.zeros(10), np.zeros(10)], axis=1)
    ca[6] = ca[5] + [0.0, 2.5, 0.0]
    breaks = np.zeros(9, dtype=bool)
    assert clashes(ca)["clash_pairs"] == 0  # bonded neighbours are the bond metrics' business
    breaks[5] = True  # residues 5 and 6 are not bonded: a pair like any other
    got = clashes(ca, breaks=breaks)
    assert got["clash_pairs"] == 1 and got["clash_fraction"] == pytest.approx(1 / (36 + 1))
    assert backbone_metrics(ca, breaks=breaks)["clash_pairs"] == 1


def test_tm_diversity():
    pytest.importorskip("tmtools", reason="tmtools is pinned in requirements-dev.txt; missing only outside dev/CI")
    crambin = read_backbones(DATA / "1crn.pdb")[0].ca
    top7 = read_backbones(DATA / "1qys.pdb")[0].ca
    ten = read_backbones(DATA / "1TEN_A.pdb")[0].ca
    rot = crambin @ np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0].T + 5.0
    assert tm_diversity([crambin, rot]) > 0.99  # the same fold, moved: TM-score 1
    assert tm_diversity([crambin, top7, ten]) < 0.5  # unrelated folds
    assert tm_diversity([crambin]) is None


def test_secondary_structure_run_lengths_breaks_and_bond_validity_exactly():
    """Exact answers where the earlier tests had ranges (a helix minimum run of 6 instead of 3, a strand
    run of 1 instead of 2, torsions across a break kept, or a 0.5 A bond tolerance all passed them)."""
    from protdiff_fast.metrics.backbone import ca_ca_bonds

    assert secondary_structure(ideal_helix(6)) == "HHHHHH"  # 3 helical torsions: the shortest helix
    assert secondary_structure(ideal_helix(5)) == "-----"  # 2 torsions: none
    breaks = np.zeros(7, dtype=bool)
    breaks[3] = True  # every torsion of 8 residues spans bond 3: no helix across the gap
    assert secondary_structure(ideal_helix(8), breaks) == "--------"
    # a strand: theta ~124 deg, tau ~ -170 deg; one strand torsion is not a strand, two are
    k = np.arange(6)
    zig = np.stack([3.3 * k, 0.95 * (-1.0) ** k, np.zeros(6)], axis=1)  # flat zigzag: theta ~120, tau 180
    assert secondary_structure(zig[:4]) == "----" and secondary_structure(zig[:5]) == "EEEEE"
    # bond validity: within 0.1 A of 3.80 A
    line = lambda bonds: np.concatenate([[0.0], np.cumsum(bonds)])[:, None] * np.array([[1.0, 0.0, 0.0]])  # noqa: E731
    assert ca_ca_bonds(line([3.8, 3.85, 3.75]))["ca_ca_valid"] == 1.0
    assert ca_ca_bonds(line([4.0, 3.6, 4.0]))["ca_ca_valid"] == 0.0
    assert ca_ca_bonds(line([4.0, 3.6, 4.0]))["ca_ca_dev"] == pytest.approx(0.2)


def test_summary_is_the_mean_of_the_rows():
    straight = np.stack([np.arange(12) * 3.8, np.zeros(12), np.zeros(12)], axis=1)
    clashing = straight.copy()
    clashing[6] = clashing[2] + [0.0, 2.0, 0.0]
    rows = [backbone_metrics(ideal_helix(12)), backbone_metrics(straight), backbone_metrics(clashing)]
    s = summarize(rows)
    for key in ("helix", "strand", "rg_ratio", "ca_ca_dev", "ca_ca_valid", "clash_fraction"):
        assert s[key] == pytest.approx(np.mean([r[key] for r in rows])), key
    assert rows[0]["helix"] > 0.5 and rows[1]["helix"] == 0.0
    assert s["with_clash"] == pytest.approx(1 / 3) and s["count"] == 3


def test_tm_diversity_is_symmetric_for_chains_of_different_lengths():
    """The mean of the TM-scores normalised by either chain: a structure and a fragment of it score the same
    in either order (normalised by the first chain only, 0.6 one way and about 1 the other)."""
    pytest.importorskip("tmtools", reason="tmtools is pinned in requirements-dev.txt; missing only outside dev/CI")
    crambin = read_backbones(DATA / "1crn.pdb")[0].ca
    fragment = crambin[:30]
    forward, backward = tm_diversity([crambin, fragment]), tm_diversity([fragment, crambin])
    assert forward == pytest.approx(backward, abs=1e-6)
    assert 0.6 < forward < 0.95  # between the two normalisations


def test_evaluate_checks_the_plot_location_before_the_work(tmp_path, capsys):
    # --plot /proc/x.png printed the whole table, then failed naming a hidden /proc/.x.png.<random>.tmp
    sample = str(DATA / "1qys.pdb")
    (tmp_path / "a_folder.png").mkdir()
    (tmp_path / "file").write_text("x")
    for plot, match in (("/proc/x.png", "plot: cannot write /proc/x.png: folder /proc is not writable"),
                        (str(tmp_path / "file" / "x.png"), r"plot: .*file/x.png: .*file is a file, not a folder"),
                        (str(tmp_path / "a_folder.png"), r"a_folder.png exists and is not a png plot")):
        assert main(["evaluate", sample, "--plot", plot]) == 2
        captured = capsys.readouterr()
        assert "ca_ca_dev" not in captured.out and re.search(match, captured.err) and ".tmp" not in captured.err
    # a write that fails anyway names the user's path, not the hidden temporary file
    from protdiff_fast.io.structure import _atomic_write

    with pytest.raises(OSError, match=r"cannot write /proc/x.png") as info:
        _atomic_write(Path("/proc/x.png"), lambda tmp: Path(tmp).write_text("x"))
    assert ".tmp" not in str(info.value)
    with pytest.raises(IsADirectoryError, match=r"cannot write .*a_folder.png: Is a directory"):
        _atomic_write(tmp_path / "a_folder.png", lambda tmp: Path(tmp).write_text("x"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_folder.png", "file"]


def test_one_residue_chain_has_no_bond_metrics_and_no_numpy_warning(tmp_path, capsys):
    import warnings

    from protdiff_fast.io import write_backbone

    one = write_backbone(tmp_path / "one.pdb", np.zeros((1, 3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "Mean of empty slice" RuntimeWarning was printed
        assert main(["evaluate", str(one), "--plot", ""]) == 0
        s = summarize([backbone_metrics(np.zeros((1, 3)))])
    assert math.isnan(s["ca_ca_dev"]) and math.isnan(s["ca_ca_valid"]) and s["count"] == 1
    lines = {ln.split()[0]: ln.split()[1:] for ln in capsys.readouterr().out.splitlines()[1:] if ln.strip()}
    assert lines["ca_ca_dev"] == ["n/a"] and lines["ca_ca_valid"] == ["n/a"] and lines["length"] == ["1.000"]
    # with a longer chain in the set, the mean is over the chains that have bonds
    both = summarize([backbone_metrics(np.zeros((1, 3))), backbone_metrics(np.array([[0, 0, 0], [3.9, 0, 0]]))])
    assert both["ca_ca_dev"] == pytest.approx(0.1)


def test_table_cells_never_overflow_their_column():
    table = format_table({"samples": {"rg": 2.2e28, "length": 50.0}, "reference": {"rg": -3.5e12, "length": 60.0}})
    widths = {len(line) for line in table.splitlines()}
    assert len(widths) == 1, table  # columns aligned: every line equally long
    assert "2.200e+28" in table and "-3.500e+12" in table and "50.000" in table


def test_chain_breaks_needs_one_residue_number_per_residue():
    """A resnums list one short broadcast against the bonds: 3 residues numbered [1, 5] flagged bond 1 (the
    long one) as a break, without a word; it names the mismatch now."""
    from protdiff_fast.metrics.backbone import chain_breaks

    ca = np.array([[0.0, 0, 0], [3.8, 0, 0], [13.8, 0, 0]])
    for bad in ([1, 5], [1, 2, 3, 9], [[1, 2, 3]]):
        with pytest.raises(ValueError, match=r"resnums: expected one residue number per CA, shape \(3,\)"):
            chain_breaks(ca, np.array(bad))
    assert chain_breaks(ca, np.array([1, 2, 9])).tolist() == [False, True]
    assert chain_breaks(ca[:1], np.array([4])).shape == (0,)


def test_clash_threshold_must_be_a_positive_distance():
    ca = ideal_helix(12)
    ca[8] = ca[2] + 0.1
    for bad in (float("nan"), 0.0, -3.0, float("inf"), "3", True):  # NaN and <= 0 counted no clash, silently
        with pytest.raises(ValueError, match="threshold: a clash distance in A > 0"):
            clashes(ca, threshold=bad)
    assert clashes(ca, threshold=np.float32(3.0))["clash_pairs"] >= 1
