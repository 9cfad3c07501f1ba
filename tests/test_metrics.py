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


# ------------------------------------------------------------------ exact answers on built geometries

def chain_from_angles(theta, tau, bond=3.8):
    """A CA trace with the given virtual bond angles theta (deg, at residues 1..L-2) and torsions tau (deg,
    over residues k..k+3, k = 0..L-4), by NeRF placement; checked against textbook formulas written here,
    independent of the module's own angle code."""
    theta, tau = np.asarray(theta, dtype=np.float64), np.asarray(tau, dtype=np.float64)
    L = len(theta) + 2
    assert len(tau) == L - 3
    t1 = np.radians(theta[0])
    pts = [np.zeros(3), np.array([bond, 0.0, 0.0]), np.array([bond - bond * np.cos(t1), bond * np.sin(t1), 0.0])]
    for j in range(3, L):
        a, b, c = pts[j - 3], pts[j - 2], pts[j - 1]
        th, to = np.radians(theta[j - 2]), np.radians(tau[j - 3])
        bc = (c - b) / np.linalg.norm(c - b)
        n = np.cross(b - a, bc)
        n /= np.linalg.norm(n)
        m = np.cross(n, bc)
        pts.append(c + bond * (-np.cos(th) * bc + np.sin(th) * np.cos(to) * m + np.sin(th) * np.sin(to) * n))
    ca = np.array(pts)
    # the construction's own check: bond angle from the dot product, IUPAC torsion (Blondel & Karplus 1996)
    for i in range(1, L - 1):
        u, v = ca[i - 1] - ca[i], ca[i + 1] - ca[i]
        got = np.degrees(np.arccos(u @ v / np.linalg.norm(u) / np.linalg.norm(v)))
        assert abs(got - theta[i - 1]) < 1e-6, (i, got)
    for k in range(L - 3):
        b1, b2, b3 = ca[k + 1] - ca[k], ca[k + 2] - ca[k + 1], ca[k + 3] - ca[k + 2]
        got = np.degrees(np.arctan2(np.linalg.norm(b2) * b1 @ np.cross(b2, b3), np.cross(b1, b2) @ np.cross(b2, b3)))
        assert abs((got - tau[k] + 180) % 360 - 180) < 1e-6, (k, got)
    return ca


@pytest.mark.parametrize("theta, tau, want", [
    # helix: theta 89 +/- 12, tau 50 +/- 20 (each end 1 deg inside and outside)
    (89, 50, "H"), (100, 50, "H"), (78, 50, "H"), (102, 50, "-"), (76, 50, "-"),
    (89, 69, "H"), (89, 31, "H"), (89, 71, "-"), (89, 29, "-"),
    # strand: theta 124 +/- 14, tau -170 +/- 45, measured across +-180
    (124, -170, "E"), (137, -170, "E"), (111, -170, "E"), (139, -170, "-"), (109, -170, "-"),
    (124, -126, "E"), (124, 146, "E"), (124, -124, "-"), (124, 144, "-"), (124, 180, "E"),
])
def test_secondary_structure_angle_windows_exactly(theta, tau, want):
    """P-SEA's angle windows at their edges: a uniform 8-residue chain is all helix / strand or all coil
    (a window of 89 +/- 20, a tau centre of 60, a strand tau window of 60 deg or no wrap-around all passed
    the earlier tests)."""
    ca = chain_from_angles([theta] * 6, [tau] * 5)
    assert secondary_structure(ca) == want * 8


def test_a_helical_torsion_needs_both_of_its_bond_angles():
    """Torsion k needs theta at residues k + 1 and k + 2: one bad angle at either end of an 8-residue helix
    removes the end torsion, whose run then stops a residue short."""
    angles = [89.0] * 6
    assert secondary_structure(chain_from_angles(angles, [50] * 5)) == "HHHHHHHH"
    last_bad = angles[:5] + [120.0]  # theta at residue 6: torsion 4 (residues 4..7) is not helical
    assert secondary_structure(chain_from_angles(last_bad, [50] * 5)) == "HHHHHHH-"
    first_bad = [120.0] + angles[1:]  # theta at residue 1: torsion 0
    assert secondary_structure(chain_from_angles(first_bad, [50] * 5)) == "-HHHHHHH"
    # just outside the window (89 + 16) at either end, where the other angle of the torsion is inside it
    assert secondary_structure(chain_from_angles([105.0] + angles[1:], [50] * 5)) == "-HHHHHHH"
    assert secondary_structure(chain_from_angles(angles[:5] + [105.0], [50] * 5)) == "HHHHHHH-"
    # the same for a strand (124 +/- 14; two torsions suffice): 142 at residue 1, then at residue 5
    strand = [124.0] * 5
    assert secondary_structure(chain_from_angles(strand, [-170] * 4)) == "EEEEEEE"
    assert secondary_structure(chain_from_angles([142.0] + strand[1:], [-170] * 4)) == "-EEEEEE"
    assert secondary_structure(chain_from_angles(strand[:4] + [142.0], [-170] * 4)) == "EEEEEE-"


def test_helix_strand_junction_labels_and_fractions():
    """A helix (residues 0..7 helical angles) running into a strand: the helix's torsions 0..5 label residues
    0..8, the strand's 7..12 label 7..15; where they meet the helix keeps its residues (the strand fills only
    coil), so 9 H then 7 E, and the fractions are exactly those counts over 16."""
    from protdiff_fast.metrics.backbone import secondary_structure_fractions

    theta = [89.0] * 7 + [124.0] * 7  # residues 1..7, 8..14
    tau = [50.0] * 6 + [-170.0] * 7  # torsions 0..5, 6..12
    ca = chain_from_angles(theta, tau)
    assert secondary_structure(ca) == "H" * 9 + "E" * 7
    assert secondary_structure_fractions(ca) == pytest.approx(dict(helix=9 / 16, strand=7 / 16, coil=0.0))
    m = backbone_metrics(ca)
    assert (m["helix"], m["strand"], m["coil"]) == pytest.approx((9 / 16, 7 / 16, 0.0))


def test_a_break_removes_every_torsion_across_it_and_backbone_metrics_passes_it_on():
    """Torsion k spans bonds k, k + 1 and k + 2. An 8-residue helix broken at bond 4: torsions 2, 3, 4 span
    it, 0 and 1 are a run of 2, too short; counting only bonds k, k + 1 left torsion 2 and a helix of 6."""
    breaks = np.zeros(7, dtype=bool)
    breaks[4] = True
    ca = ideal_helix(8)
    assert secondary_structure(ca) == "HHHHHHHH"
    assert secondary_structure(ca, breaks) == "--------"
    m = backbone_metrics(ca, breaks=breaks)
    assert m["helix"] == 0.0 and m["coil"] == 1.0


def test_bond_validity_tolerance_is_0_1_angstrom():
    from protdiff_fast.metrics.backbone import ca_ca_bonds

    line = lambda bonds: np.concatenate([[0.0], np.cumsum(bonds)])[:, None] * np.array([[1.0, 0.0, 0.0]])  # noqa: E731
    got = ca_ca_bonds(line([3.8, 3.92, 3.68, 3.89]))  # deviations 0, 0.12, 0.12, 0.09
    assert got["ca_ca_valid"] == pytest.approx(0.5) and got["ca_ca_dev"] == pytest.approx(0.33 / 4)


def test_chain_break_needs_a_bond_longer_than_4_2_angstrom():
    """A numbering jump is a break only with a CA-CA distance over 4.2 A (exactly 4.2: no break)."""
    from protdiff_fast.metrics.backbone import chain_breaks

    ca = np.array([[0.0, 0, 0], [4.2, 0, 0], [8.7, 0, 0], [12.5, 0, 0]])  # bonds 4.2, 4.5, 3.8
    assert chain_breaks(ca, np.array([1, 3, 5, 9])).tolist() == [False, True, False]
    assert chain_breaks(ca, np.array([1, 3, 5, 9]), max_bond=4.6).tolist() == [False, False, False]


def test_a_clash_is_strictly_closer_than_the_threshold():
    ca = np.array([[0.0, 0, 0], [1.5, 3.0, 0], [3.0, 0, 0]])  # residues 0 and 2 exactly 3.0 A apart
    assert clashes(ca)["clash_pairs"] == 0
    assert clashes(ca, threshold=3.001) == dict(clash_pairs=1, clash_fraction=1.0)
    ca[2, 0] = 2.999
    assert clashes(ca)["clash_pairs"] == 1


def test_evaluate_counts_one_chain_in_two_files_once(tmp_path, capsys):
    """1crn.pdb and 1CRN.cif.gz hold the same chain: as a reference set it weighed twice in every mean (prepare
    keeps it once); now the copy is named and counted once, in either set. A chain moved by 0.01 A is another."""
    from protdiff_fast.io import write_backbone

    crn = read_backbones(DATA / "1crn.pdb")[0]
    moved = tmp_path / "moved.pdb"
    write_backbone(moved, crn.ca + np.array([0.01, 0.0, 0.0]), sequence=crn.sequence)
    assert main(["evaluate", str(DATA / "1qys.pdb"), "--reference", str(DATA / "1crn.pdb"), str(DATA / "1CRN.cif.gz"),
                 str(moved), "--plot", ""]) == 0
    out = capsys.readouterr().out
    assert re.search(r"skipped: \S*1crn\.pdb: chain A: duplicate: the same CA trace and sequence as \S*1CRN\.cif\.gz "
                     r"chain A \(counted once\)", out), out
    assert "moved.pdb: chain A: duplicate" not in out
    count = re.search(r"^count\s+(\S+)\s+(\S+)$", out, re.M)
    assert count and (float(count.group(1)), float(count.group(2))) == (1.0, 2.0), out
    # in the samples set too: one design copied under another name is one design
    copy = tmp_path / "copy_of_1qys.pdb"
    copy.write_bytes((DATA / "1qys.pdb").read_bytes())
    assert main(["evaluate", str(DATA / "1qys.pdb"), str(copy), str(DATA / "1crn.pdb"), "--plot", ""]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^count\s+2\.000$", out, re.M), out
