"""Structure I/O: real files, altlocs, insertion codes, models, gzip, chain breaks, round trips, bad files."""
import gzip
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from protdiff_fast.io import StructureError, find_structure_files, read_backbones, write_backbone

DATA = Path(__file__).parent / "data"


def atom_line(serial, name, resname, chain, resnum, xyz, altloc=" ", icode=" ", occ=1.0, record="ATOM",
              element="C"):
    return (f"{record:<6}{serial:>5} {name:^4}{altloc}{resname:>3} {chain}{resnum:>4}{icode}   "
            f"{xyz[0]:8.3f}{xyz[1]:8.3f}{xyz[2]:8.3f}{occ:6.2f}{20.0:6.2f}          {element:>2}")


def write_pdb(path, residues, chain="A", extra=()):
    """residues: list of (resname, resnum, icode, [(atom, xyz, altloc, occ), ...])."""
    lines, serial = [], 1
    for resname, resnum, icode, atoms in residues:
        for name, xyz, altloc, occ in atoms:
            lines.append(atom_line(serial, name, resname, chain, resnum, xyz, altloc, icode, occ,
                                   element=name[0]))
            serial += 1
    lines += list(extra)
    Path(path).write_text("\n".join(lines + ["END", ""]))
    return path


def chain_of(n, spacing=3.8, gap_after=None):
    pts, x = [], 0.0
    for i in range(n):
        pts.append((x, 0.3 * (i % 2), 0.0))
        x += spacing if i != gap_after else 6.5
    return [("ALA", i + 1, " ", [("N", (p[0] - 1, p[1], 0), " ", 1.0), ("CA", p, " ", 1.0)]) for i, p in enumerate(pts)]


def test_real_files_pdb_and_gzipped_mmcif_agree():
    pdb = read_backbones(DATA / "1crn.pdb")
    cif = read_backbones(DATA / "1CRN.cif.gz")
    assert len(pdb) == len(cif) == 1
    a, b = pdb[0], cif[0]
    assert len(a) == 46 and a.sequence == b.sequence and a.sequence.startswith("TTCCPSIVARSNFNVCRLPGTPEA")
    np.testing.assert_allclose(a.ca, b.ca, atol=1e-3)
    assert a.n_breaks == 0 and list(a.resnums[:3]) == [1, 2, 3]
    d = np.linalg.norm(np.diff(a.ca, axis=0), axis=1)
    assert 3.7 < d.min() and d.max() < 3.9


def test_modified_residues_waters_and_chains():
    top7 = read_backbones(DATA / "1qys.pdb")[0]
    assert len(top7) == 92 and "X" not in top7.sequence and "M" in top7.sequence  # MSE read as M
    both = read_backbones(DATA / "1CKB.pdb")
    assert [(bb.chain_id, len(bb)) for bb in both] == [("A", 57), ("B", 8)]  # waters and ions ignored
    assert read_backbones(DATA / "1CKB.pdb", chain="B")[0].sequence == "PPPVPPRR"
    with pytest.raises(StructureError, match=r"1CKB.pdb: no chain 'Z' \(chains: A, B"):
        read_backbones(DATA / "1CKB.pdb", chain="Z")
    # a residue with only C and O (no CA) is left out, not an error
    ten = read_backbones(DATA / "1TEN_A.pdb")[0]
    assert len(ten) == 89 and ten.resnums[0] == 803


def test_altloc_highest_occupancy_and_insertion_codes(tmp_path):
    residues = [
        ("GLY", 10, " ", [("CA", (0.0, 0.0, 0.0), " ", 1.0)]),
        ("SER", 11, " ", [("CA", (3.0, 2.0, 0.0), "A", 0.30), ("CA", (3.8, 0.0, 0.0), "B", 0.70)]),
        ("ALA", 11, "A", [("CA", (7.6, 0.0, 0.0), " ", 1.0)]),
        ("LYS", 12, " ", [("CA", (11.4, 0.0, 0.0), " ", 1.0)]),
    ]
    bb = read_backbones(write_pdb(tmp_path / "alt.pdb", residues))[0]
    np.testing.assert_allclose(bb.ca[1], [3.8, 0.0, 0.0], atol=1e-3)  # altloc B: occupancy 0.70
    assert bb.sequence == "GSAK" and list(bb.resnums) == [10, 11, 11, 12] and bb.icodes == ["", "", "A", ""]


def test_first_model_of_a_multi_model_file(tmp_path):
    one = [atom_line(i + 1, "CA", "ALA", "A", i + 1, (3.8 * i, 0, 0)) for i in range(5)]
    two = [atom_line(i + 1, "CA", "ALA", "A", i + 1, (3.8 * i, 9.0, 0)) for i in range(5)]
    text = "\n".join(["MODEL        1", *one, "ENDMDL", "MODEL        2", *two, "ENDMDL", "END", ""])
    (tmp_path / "nmr.pdb").write_text(text)
    bb = read_backbones(tmp_path / "nmr.pdb")[0]
    assert np.allclose(bb.ca[:, 1], 0.0)


def test_chain_breaks_are_flagged(tmp_path):
    bb = read_backbones(write_pdb(tmp_path / "gap.pdb", chain_of(10, gap_after=4)))[0]
    assert bb.n_breaks == 1 and bool(bb.chain_breaks[5]) and not bb.chain_breaks[:5].any()


def test_gzipped_pdb(tmp_path):
    with open(DATA / "1crn.pdb", "rb") as src, gzip.open(tmp_path / "1crn.pdb.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    assert len(read_backbones(tmp_path / "1crn.pdb.gz")[0]) == 46


@pytest.mark.parametrize("suffix", [".pdb", ".cif"])
def test_write_read_round_trip(tmp_path, suffix):
    src = read_backbones(DATA / "1qys.pdb")[0]
    out = write_backbone(tmp_path / f"sample{suffix}", src.ca, sequence=src.sequence)
    back = read_backbones(out)[0]
    np.testing.assert_allclose(back.ca, src.ca, atol=1e-3)
    assert back.sequence == src.sequence and len(back) == 92
    if suffix == ".pdb":
        assert out.read_text().splitlines()[0].startswith("CRYST1    1.000    1.000    1.000  90.00  90.00  90.00 P 1")
    # no sequence: glycines; existing files are never silently replaced; no temporary files left
    gly = write_backbone(tmp_path / f"gly{suffix}", src.ca)
    assert set(read_backbones(gly)[0].sequence) == {"G"}
    with pytest.raises(FileExistsError):
        write_backbone(out, src.ca)
    write_backbone(out, src.ca[:10], overwrite=True)
    assert len(read_backbones(out)[0]) == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"sample{suffix}", f"gly{suffix}"])


def test_write_rejects_bad_coordinates(tmp_path):
    with pytest.raises(ValueError, match=r"ca: expected shape \(L, 3\)"):
        write_backbone(tmp_path / "a.pdb", np.zeros((5, 2)))
    with pytest.raises(ValueError, match="NaN"):
        write_backbone(tmp_path / "a.pdb", np.full((5, 3), np.nan))
    with pytest.raises(ValueError, match="Angstrom"):
        write_backbone(tmp_path / "a.pdb", np.full((5, 3), 1e5))
    with pytest.raises(ValueError, match="unknown format"):
        write_backbone(tmp_path / "a.xyz", np.zeros((5, 3)))
    # were written: complex parts dropped, booleans as 0 / 1 A, lowercase letters as UNK; a chain id of
    # "" or "ABC" in PDB raised IndexError / a gemmi RuntimeError
    with pytest.raises(ValueError, match="ca: expected real coordinates, got dtype complex128"):
        write_backbone(tmp_path / "a.pdb", np.zeros((5, 3)) + 1j)
    with pytest.raises(ValueError, match="ca: expected real coordinates, got dtype bool"):
        write_backbone(tmp_path / "a.pdb", np.ones((5, 3), bool))
    with pytest.raises(ValueError, match=r"sequence: '\*1' are not one-letter amino acid codes"):
        write_backbone(tmp_path / "a.pdb", np.zeros((5, 3)), sequence="AC*D1")
    for bad in ("", "ABC", "A B", "\u00e9", "\u00b2"):  # non-ASCII: a corrupt PDB line, an unparsable mmCIF
        with pytest.raises(ValueError, match="chain_id: 1 letter or digit"):
            write_backbone(tmp_path / "a.pdb", np.zeros((5, 3)), chain_id=bad)
    with pytest.raises(ValueError, match=r"chain_id: 1 letter or digit \(up to 4 in mmCIF\) \(A-Z, a-z, 0-9\)"):
        write_backbone(tmp_path / "a.cif", np.zeros((5, 3)), chain_id="A\u00e9")
    assert not list(tmp_path.iterdir())
    written = write_backbone(tmp_path / "b.cif", np.arange(15.0).reshape(5, 3), sequence="acdxg", chain_id="AB")
    bb = read_backbones(written)[0]
    assert bb.sequence == "ACDXG" and bb.chain_id == "AB"


def test_non_finite_coordinates_name_the_file_chain_and_residue(tmp_path):
    path = write_pdb(tmp_path / "ok.pdb", chain_of(6))
    text = path.read_text().splitlines()
    ca_lines = [k for k, line in enumerate(text) if line[12:16].strip() == "CA"]
    line = text[ca_lines[3]]
    text[ca_lines[3]] = line[:30] + f"{'nan':>8}" + line[38:]  # residue 4's x
    bad = tmp_path / "nan.pdb"
    bad.write_text("\n".join(text))
    with pytest.raises(StructureError, match=r"nan.pdb: chain 'A' residue 4: CA coordinates are not finite"):
        read_backbones(bad)
    from protdiff_fast.io import BackboneDataset

    ds = BackboneDataset.from_structures([path, bad], min_length=2)  # prepare: skipped and reported
    assert len(ds) == 1 and "nan.pdb" in str(ds.skipped.skipped)


@pytest.mark.parametrize("field, shown", [("        ", "''"), ("   abc  ", "'abc'"), ("  1.2.3 ", "'1.2.3'"),
                                          ("  12-4.0", "'12-4.0'")])
@pytest.mark.parametrize("gz", [False, True, "upper"])
def test_pdb_coordinate_fields_that_are_not_numbers_are_refused(tmp_path, field, shown, gz):
    # gemmi reads a blank or non-numeric PDB coordinate as 0 (or its leading digits): a silently wrong atom
    path = write_pdb(tmp_path / "ok.pdb", chain_of(6))
    text = path.read_text().splitlines()
    ca_lines = [k for k, line in enumerate(text) if line[12:16].strip() == "CA"]
    line = text[ca_lines[2]]
    text[ca_lines[2]] = line[:38] + field + line[46:]  # residue 3's y
    name = {False: "bad.pdb", True: "bad.pdb.gz", "upper": "bad.PDB.GZ"}[gz]  # gemmi reads .GZ as gzip too
    bad = tmp_path / name
    data = ("\n".join(text) + "\n").encode()
    bad.write_bytes(gzip.compress(data) if gz else data)
    match = rf"{name}: line {ca_lines[2] + 1} \(CA of \w+ 3 chain A\): y coordinate \(columns 39-46\) is {shown}, not a number"
    with pytest.raises(StructureError, match=match):
        read_backbones(bad)
    assert read_backbones(path)[0].ca.shape == (6, 3)  # the well-formed file still reads


def test_pdb_coordinate_check_stops_at_end_as_gemmi_does(tmp_path):
    path = write_pdb(tmp_path / "ok.pdb", chain_of(4))
    text = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("END")]
    garbage = text[-1][:30] + "   abc  " + text[-1][38:]
    path.write_text("\n".join(text + ["END", garbage]) + "\n")  # after END: not part of the structure
    assert read_backbones(path)[0].ca.shape == (4, 3)


@pytest.mark.parametrize("case, match", [
    ("missing", r"missing.pdb: no such file"),
    ("empty", r"empty.pdb: empty file"),
    ("garbage", r"garbage.cif: cannot parse"),
    ("water only", r"water.pdb: no protein C-alpha trace \(chain 'W': not a protein chain\)"),
    ("no CA", r"noca.pdb: no protein C-alpha trace \(chain 'A': amino acids but no CA atoms\)"),
])
def test_malformed_files_name_the_problem(tmp_path, case, match):
    if case == "missing":
        path = tmp_path / "missing.pdb"
    elif case == "empty":
        path = tmp_path / "empty.pdb"
        path.write_text("")
    elif case == "garbage":
        path = tmp_path / "garbage.cif"
        path.write_text("data_x\nloop_\n_atom_site.id\n'unterminated\n")
    elif case == "water only":
        path = tmp_path / "water.pdb"
        path.write_text("\n".join(atom_line(i + 1, "O", "HOH", "W", i + 1, (i, 0, 0), record="HETATM", element="O")
                                  for i in range(3)) + "\nEND\n")
    else:
        path = write_pdb(tmp_path / "noca.pdb", [("ALA", i + 1, " ", [("N", (i * 3.8, 0, 0), " ", 1.0),
                                                                      ("C", (i * 3.8 + 1, 0, 0), " ", 1.0)])
                                                 for i in range(4)])
    with pytest.raises(StructureError, match=match):
        read_backbones(path)


def test_find_structure_files(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.pdb", "sub/b.cif.gz", "notes.txt", "sub/c.ent", "design_000000.traj.cif", "d.traj.cif.gz"):
        (tmp_path / name).write_text("x")
    # sample's trajectories (x_T first) are not designs: a folder search leaves them out, a named one is read
    assert [p.name for p in find_structure_files(tmp_path)] == ["a.pdb", "b.cif.gz", "c.ent"]
    assert [p.name for p in find_structure_files([tmp_path / "d.traj.cif.gz"])] == ["d.traj.cif.gz"]
    with pytest.raises(FileNotFoundError, match="nothere"):
        find_structure_files(tmp_path / "nothere")
    # one file under two spellings is one file
    twice = find_structure_files([tmp_path / "a.pdb", tmp_path / "sub" / ".." / "a.pdb", tmp_path])
    assert [p.name for p in twice] == ["a.pdb", "b.cif.gz", "c.ent"]
    with pytest.raises(StructureError, match="a folder, not a structure file"):
        read_backbones(tmp_path / "sub")


def test_prepare_names_a_folder_without_structures(tmp_path, capsys):
    from protdiff_fast.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["prepare", str(tmp_path / "empty"), "--out", str(tmp_path / "e.npz")]) == 2
    assert "no structure files" in capsys.readouterr().err and not (tmp_path / "e.npz").exists()


def _check_pdb_columns(text, ca):
    """Every ATOM record of a written PDB file against the format's column rules (1-based columns):
    serial 7-11, name 13-16, altLoc 17, resName 18-20, chainID 22, resSeq 23-26, x/y/z 31-38/39-46/47-54
    as %8.3f, occupancy 55-60, tempFactor 61-66, element 77-78; every line 80 characters."""
    atoms = [line for line in text.splitlines() if line.startswith("ATOM")]
    assert len(atoms) == len(ca)
    for line in text.splitlines():
        assert len(line) == 80, repr(line)
    for i, line in enumerate(atoms):
        assert line[0:6] == "ATOM  "
        assert line[6:11] == f"{i + 1:>5}" and line[11] == " "
        assert line[12:16] == " CA " and line[16] == " "
        assert line[17:20] == "GLY" and line[20] == " " and line[21] == "A"
        assert line[22:26] == f"{i + 1:>4}" and line[26] == " " and line[27:30] == "   "
        for k, (a, b) in enumerate(((30, 38), (38, 46), (46, 54))):
            field = line[a:b]
            # %8.3f of the value (gemmi prints -0.000 as 0.000): right-aligned, three decimals, no spill
            assert re.fullmatch(r" *-?\d+\.\d{3}", field), (line, k)
            assert field == f"{ca[i, k]:8.3f}".replace("-0.000", " 0.000"), (line, k)
        assert line[54:60] == "  1.00" and line[60:66] == "  0.00"
        assert line[66:76].strip() == "" and line[76:78] == " C"


@pytest.mark.parametrize("gz", [False, True])
def test_written_pdb_obeys_the_column_rules_and_gemmi_reads_it(tmp_path, gz):
    import gemmi

    g = np.random.default_rng(0)
    ca = np.cumsum(g.normal(size=(120, 3)) * 2.2, axis=0)
    ca[3] = (-999.999, 9999.999, 0.0)  # the extremes that %8.3f still holds
    ca[4] = (-999.9994, 9999.9994, -0.0004)  # ... and values that round onto them
    path = write_backbone(tmp_path / ("d.pdb.gz" if gz else "d.pdb"), ca)
    raw = path.read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == gz
    text = gzip.decompress(raw).decode() if gz else raw.decode()
    _check_pdb_columns(text, ca)
    st = gemmi.read_structure(str(path))
    got = np.array([[a.pos.x, a.pos.y, a.pos.z] for r in st[0]["A"] for a in r])
    np.testing.assert_allclose(got, ca, atol=5e-4)
    # gzip output is deterministic (no time stamp, no name): the same design gives the same bytes
    again = write_backbone(tmp_path / ("e.pdb.gz" if gz else "e.pdb"), ca)
    assert again.read_bytes() == raw


@pytest.mark.parametrize("value", [-1000.0, -1500.25, 10000.0, 1e7])
def test_pdb_refuses_coordinates_that_overflow_its_columns(tmp_path, value):
    ca = np.zeros((6, 3))
    ca[:, 0] = np.arange(6) * 3.8
    ca[2, 1] = value
    with pytest.raises(ValueError, match=rf"coordinate {value:.3f} A \(y of residue 3\) does not fit .*mmCIF"):
        write_backbone(tmp_path / "d.pdb", ca)
    assert not list(tmp_path.iterdir())  # nothing half-written
    # mmCIF has no fixed columns: the same coordinates round-trip there
    back = read_backbones(write_backbone(tmp_path / "d.cif.gz", ca))[0]
    np.testing.assert_allclose(back.ca, ca, atol=1e-6 * max(1.0, abs(value)))


@pytest.mark.parametrize("name", ["d.cif", "d.cif.gz", "d.pdb"])
@pytest.mark.parametrize("value, match", [
    (2.5e7, r"ca: coordinate 2.5e\+07 A \(z of residue 3\) is beyond \+-1e\+07 A, which read_backbones refuses"),
    (-1e30, r"ca: coordinate -1e\+30 A \(z of residue 3\) is beyond \+-1e\+07 A"),
    (np.nan, r"ca: contains NaN or Inf: z of residue 3 is nan \(1 residue\(s\)\)"),
    (-np.inf, r"ca: contains NaN or Inf: z of residue 3 is -inf"),
])
def test_writers_refuse_coordinates_the_reader_refuses_naming_the_residue(tmp_path, name, value, match):
    # mmCIF took a CA at 2.5e7 A and wrote a file that read_backbones then refused as corrupt
    from protdiff_fast.io import write_trajectory

    ca = np.stack([np.arange(5) * 3.8, np.zeros(5), np.zeros(5)], axis=1)
    ca[2, 2] = value
    with pytest.raises(ValueError, match=match):
        write_backbone(tmp_path / name, ca)
    if name != "d.pdb":
        with pytest.raises(ValueError, match="frames: frame 1: " + match):
            write_trajectory(tmp_path / f"t_{name}", [np.zeros((5, 3)), ca])
    assert not list(tmp_path.iterdir())  # nothing written, no temporary left
    # the reader's own bound is still writable, and reads back exactly
    ca[2, 2] = -1e7
    back = read_backbones(write_backbone(tmp_path / "edge.cif", ca))[0]
    assert back.ca[2, 2] == -1e7


def test_atomic_write_keeps_the_old_file_on_failure_and_never_sets_the_process_umask(tmp_path, monkeypatch):
    import os
    import stat

    from protdiff_fast.io import structure

    ca = np.stack([np.arange(4) * 3.8, np.zeros(4), np.zeros(4)], axis=1)
    old_umask = os.umask(0o027)
    try:
        set_to = []
        real_umask = os.umask
        monkeypatch.setattr(os, "umask", lambda mask: set_to.append(mask) or real_umask(mask))
        path = write_backbone(tmp_path / "d.pdb", ca)
        monkeypatch.undo()
    finally:
        os.umask(old_umask)
    # reading the umask by setting it to 0 left every thread (and child) of the process creating
    # world-writable files for that moment; the file still gets 0666 less the umask
    assert set_to == [] and stat.S_IMODE(path.stat().st_mode) == 0o640
    before = path.read_bytes()

    def half_then_fail(tmp, text, gz):
        Path(tmp).write_text(text[: len(text) // 2])
        raise OSError(28, "No space left on device", tmp)

    monkeypatch.setattr(structure, "_write_text", half_then_fail)
    with pytest.raises(OSError, match=r"cannot write .*d.pdb: No space left on device"):
        write_backbone(path, ca * 2, overwrite=True)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["d.pdb"]


def test_overwriting_a_file_keeps_its_permissions(tmp_path):
    import os
    import stat

    ca = np.stack([np.arange(4) * 3.8, np.zeros(4), np.zeros(4)], axis=1)
    path = write_backbone(tmp_path / "d.pdb", ca)
    for mode in (0o600, 0o644, 0o640):
        os.chmod(path, mode)  # a user made it private / readable by the group
        write_backbone(path, ca * (1 + mode % 7), overwrite=True)  # the temporary file got 0666 less the umask
        assert stat.S_IMODE(path.stat().st_mode) == mode and np.allclose(read_backbones(path)[0].ca, ca * (1 + mode % 7))


def test_mmcif_has_labels_viewers_use(tmp_path):
    import gemmi

    ca = np.stack([np.arange(5) * 3.8, np.zeros(5), np.zeros(5)], axis=1)
    doc = gemmi.cif.read(str(write_backbone(tmp_path / "d.cif", ca)))
    block = doc.sole_block()
    assert list(block.find_loop("_atom_site.label_seq_id")) == ["1", "2", "3", "4", "5"]
    assert set(block.find_loop("_atom_site.label_asym_id")) == {"A"}
    assert list(block.find_loop("_atom_site.Cartn_x")) == ["0", "3.8", "7.6", "11.4", "15.2"]


def test_trajectory_is_a_multi_model_mmcif(tmp_path):
    import gemmi

    from protdiff_fast.io import write_trajectory

    g = np.random.default_rng(1)
    frames = [g.normal(size=(9, 3)) * s for s in (3e4, 50.0, 4.0)]  # frame 0 overflows PDB by far
    path = write_trajectory(tmp_path / "t.cif.gz", frames, timesteps=[1000, 10, 0])
    st = gemmi.read_structure(str(path))
    assert len(st) == 3 and [m.num for m in st] == [1, 2, 3]
    for model, frame in zip(st, frames):
        got = np.array([[a.pos.x, a.pos.y, a.pos.z] for r in model["A"] for a in r])
        np.testing.assert_allclose(got, frame, atol=5e-4)
    block = gemmi.cif.read(str(path)).sole_block()
    assert list(block.find_loop("_protdiff_fast_frame.timestep")) == ["1000", "10", "0"]
    with pytest.raises(ValueError, match="mmCIF"):
        write_trajectory(tmp_path / "t.pdb", frames)
    with pytest.raises(ValueError, match="frame 1 has 8 residues"):
        write_trajectory(tmp_path / "u.cif", [frames[0], frames[1][:8]])
    with pytest.raises(FileExistsError):
        write_trajectory(path, frames)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.cif.gz"]


# ---------------------------------------------------------------- malformed input (audit of reading)
def _cif_text(tmp_path, n=4):
    ca = np.stack([np.arange(n) * 3.8, np.zeros(n), np.zeros(n)], axis=1)
    return write_backbone(tmp_path / "w.cif", ca).read_text()


@pytest.mark.parametrize("fmt", ["pdb", "cif"])
def test_absurd_coordinates_are_refused_naming_file_chain_residue_and_value(tmp_path, fmt):
    # only NaN / Inf were refused: a CA at 1e30 A gave evaluate a ca_ca_dev of 2e28 and stayed in prepare's set
    if fmt == "pdb":
        text = write_pdb(tmp_path / "ok.pdb", chain_of(6)).read_text().splitlines()
        k = [i for i, line in enumerate(text) if line[12:16].strip() == "CA"][1]
        text[k] = text[k][:38] + f"{'-1e30':>8}" + text[k][46:]  # residue 2's y
        bad = tmp_path / "far.pdb"
        bad.write_text("\n".join(text) + "\n")
        match = r"far.pdb: chain 'A' residue 2 \(ALA\): CA y coordinate -1e\+30 A is beyond \+-1e\+07 A"
    else:
        bad = tmp_path / "far.cif"
        bad.write_text(_cif_text(tmp_path).replace("ATOM 2 C CA . GLY A A 2 ? 3.8 0 0", "ATOM 2 C CA . GLY A A 2 ? 3.8 0 2.5e7"))
        match = r"far.cif: chain 'A' residue 2 \(GLY\): CA z coordinate 2.5e\+07 A is beyond \+-1e\+07 A"
    with pytest.raises(StructureError, match=match):
        read_backbones(bad)
    from protdiff_fast.cli import main
    from protdiff_fast.io import BackboneDataset

    ds = BackboneDataset.from_structures([bad], min_length=2)
    assert len(ds) == 0 and "beyond +-1e+07 A" in ds.skipped.skipped[0][1]
    assert main(["evaluate", str(bad), "--plot", ""]) == 2  # skipped (named), no table of 2e28
    # far out but below the reader's bound (sample writes designs up to 1e4 model units x its scale in
    # mmCIF): read, but never taken into a training set (a real chain stays within 1e4 A)
    near = write_backbone(tmp_path / "near.cif", np.array([[0.0, 0, 0], [3.8, 0, 0], [3.8, -2.5e5, 0]]))
    assert read_backbones(near)[0].ca[2, 1] == -2.5e5
    ds = BackboneDataset.from_structures([near], min_length=2)
    assert len(ds) == 0 and ds.skipped.skipped == [
        ("near_A", "coordinates out of range: CA y of residue 3 is -250000 A (beyond +-1e+05 A)")]


def _with_second_copy(tmp_path, name, second):
    residues = chain_of(6)
    residues = residues[:3] + [second] + residues[3:] if second[1] == 3 else residues + [second]
    return write_pdb(tmp_path / name, residues)


@pytest.mark.parametrize("case, match", [
    ("repeated later", r"rep.pdb: chain 'A' residue 3 \(ALA\): 2 CA atoms without distinct alternate-location labels"),
    ("repeated next", r"rep.pdb: chain 'A' residue 3 \(ALA\): 2 CA atoms without distinct alternate-location labels"),
    ("other name", r"rep.pdb: chain 'A' residue 3 \(ALA\) occurs twice \(again as GLY, not as alternate locations\)"),
    ("two CA", r"rep.pdb: chain 'A' residue 2 \(ALA\): 2 CA atoms without distinct alternate-location labels"),
    ("same altloc", r"rep.pdb: chain 'A' residue 2 \(ALA\): 2 CA atoms without distinct alternate-location labels"),
    ("cif repeated", r"rep.cif: chain 'A' residue 2 \(GLY\).*(2 CA atoms without distinct|occurs twice)"),
])
def test_repeated_residues_and_unlabelled_second_ca_are_malformed(tmp_path, case, match):
    # the first copy was kept silently (with the other copy's coordinates lost)
    other = [("N", (49.0, 0, 0), " ", 1.0), ("CA", (50.0, 0, 0), " ", 1.0)]
    if case == "repeated later":
        path = write_pdb(tmp_path / "rep.pdb", chain_of(6) + [("ALA", 3, " ", other)])
    elif case == "repeated next":
        path = write_pdb(tmp_path / "rep.pdb", chain_of(6)[:3] + [("ALA", 3, " ", other)] + chain_of(6)[3:])
    elif case == "other name":
        path = write_pdb(tmp_path / "rep.pdb", chain_of(6)[:3] + [("GLY", 3, " ", other)] + chain_of(6)[3:])
    elif case in ("two CA", "same altloc"):
        residues = chain_of(6)
        alt = "A" if case == "same altloc" else " "
        name, num, icode, atoms = residues[1]
        residues[1] = (name, num, icode, [(a, xyz, alt, 0.5) if a == "CA" else (a, xyz, l, o) for a, xyz, l, o in atoms]
                       + [("CA", (4.5, 1.0, 0.0), alt, 0.5)])
        path = write_pdb(tmp_path / "rep.pdb", residues)
    else:
        text = _cif_text(tmp_path)
        path = tmp_path / "rep.cif"
        path.write_text(text.replace("ATOM 4 C CA . GLY A A 4 ? 11.4 0 0 1 0 ? 4 A 1",
                                     "ATOM 4 C CA . GLY A A 4 ? 11.4 0 0 1 0 ? 4 A 1\n"
                                     "ATOM 5 C CA . GLY A A 2 ? 30 0 0 1 0 ? 2 A 1"))
    with pytest.raises(StructureError, match=match):
        read_backbones(path)
    from protdiff_fast.cli import main

    assert main(["evaluate", str(path), "--plot", ""]) == 2  # named as skipped, then no readable structure


def test_microheterogeneity_with_altlocs_is_still_read(tmp_path):
    # two residue types at one position, as PDB writes them (atoms with altloc labels): the first is kept
    residues = chain_of(5)
    residues = residues[:2] + [("SER", 3, " ", [("CA", (7.6, 0.0, 0.0), "A", 0.6)]),
                               ("GLY", 3, " ", [("CA", (7.7, 0.2, 0.0), "B", 0.4)])] + residues[3:]
    bb = read_backbones(write_pdb(tmp_path / "micro.pdb", residues))[0]
    assert bb.sequence == "AASAA" and list(bb.resnums) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(bb.ca[2], [7.6, 0.0, 0.0], atol=1e-3)


def test_hetatm_records_ligands_and_chains_of_unknown_residues(tmp_path):
    het = lambda i, name, num, xyz: atom_line(i, "CA", name, "A", num, xyz, record="HETATM")  # noqa: E731
    protein = [atom_line(i + 1, "CA", "ALA", "A", i + 1, (3.8 * i, 0, 0)) for i in range(6)]
    # a free glutamate after TER (a bound ligand) was appended to the chain as its 7th residue
    lig = tmp_path / "ligand.pdb"
    lig.write_text("\n".join(protein + ["TER", het(20, "GLU", 101, (30.0, 5.0, 0.0)), "END", ""]))
    assert read_backbones(lig)[0].sequence == "AAAAAA"
    # ... while a modified residue bonded to the chain (C-terminal MSE, HETATM) stays part of it
    mse = tmp_path / "mse.pdb"
    mse.write_text("\n".join(protein + [het(7, "MSE", 7, (3.8 * 6, 0, 0)), "TER", "END", ""]))
    assert read_backbones(mse)[0].sequence == "AAAAAAM"
    # HETATM records only: standard (or mapped modified) amino acids are a protein chain, others are not
    std = tmp_path / "het_std.pdb"
    std.write_text("\n".join([het(i + 1, "ALA" if i % 2 else "MSE", i + 1, (3.8 * i, 0, 0)) for i in range(6)] + ["END", ""]))
    assert read_backbones(std)[0].sequence == "MAMAMA"
    unk = tmp_path / "het_unk.pdb"
    unk.write_text("\n".join([het(i + 1, "UNK", i + 1, (3.8 * i, 0, 0)) for i in range(6)] + ["END", ""]))
    with pytest.raises(StructureError, match=r"het_unk.pdb: no protein C-alpha trace \(chain 'A': not a protein chain: "
                                             r"HETATM records only, of residues that are not standard amino acids \(UNK\)"):
        read_backbones(unk)
    from protdiff_fast.io import BackboneDataset

    ds = BackboneDataset.from_structures([unk, std], min_length=2)
    assert ds.names == ["het_std_A"] and "HETATM records only" in ds.skipped.skipped[0][1]
    # ATOM records of UNK (a motif file's unnamed residues) remain a protein chain
    atom_unk = tmp_path / "atom_unk.pdb"
    atom_unk.write_text("\n".join(atom_line(i + 1, "CA", "UNK", "A", i + 1, (3.8 * i, 0, 0)) for i in range(4)) + "\nEND\n")
    assert read_backbones(atom_unk)[0].sequence == "XXXX"


@pytest.mark.parametrize("case, match", [
    ("truncated gz", r"cut.cif.gz: truncated or corrupt gzip file"),
    ("not gzip", r"plain.pdb.gz: truncated or corrupt gzip file \(BadGzipFile: |plain.pdb.gz: truncated or corrupt gzip"),
    ("binary", r"binary.pdb: binary data, not a PDB or mmCIF text file"),
    ("binary in gz", r"binary.cif.gz: binary data \(after gunzip\), not a PDB or mmCIF text file"),
    # was "binary data, not a PDB or mmCIF text file"
    ("gzip without .gz", r"1CRN.cif: gzip-compressed data in a file whose name does not end in .gz \(rename it "
                         r"1CRN.cif.gz, or gunzip it\)"),
    ("no atoms", r"text.pdb: no models \(no atom records.*not a structure file"),
])
def test_corrupt_files_are_named_as_such(tmp_path, case, match):
    # a cut .cif.gz gave gemmi's "Would it be 100 -> 1062156419 bytes?"; binary garbage was "no chains"
    if case == "truncated gz":
        data = (DATA / "1CRN.cif.gz").read_bytes()
        path = tmp_path / "cut.cif.gz"
        path.write_bytes(data[: len(data) // 2])
    elif case == "not gzip":
        path = tmp_path / "plain.pdb.gz"
        path.write_bytes((DATA / "1crn.pdb").read_bytes())
    elif case == "binary":
        path = tmp_path / "binary.pdb"
        path.write_bytes(bytes(range(256)) * 8)
    elif case == "binary in gz":
        path = tmp_path / "binary.cif.gz"
        path.write_bytes(gzip.compress(bytes(range(256)) * 8))
    elif case == "gzip without .gz":
        path = tmp_path / "1CRN.cif"
        path.write_bytes((DATA / "1CRN.cif.gz").read_bytes())
    else:
        path = tmp_path / "text.pdb"
        path.write_text("HEADER    NOTES\nREMARK   1 nothing here\n")
    with pytest.raises(StructureError, match=match):
        read_backbones(path)


def _shared_structure_files():
    import os

    root = Path(os.environ.get("PROTDIFF_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not root.is_dir():
        return []
    return find_structure_files(root)


def test_every_real_structure_file_of_the_shared_data_reads():
    files = _shared_structure_files()
    if not files:
        pytest.skip("no ../shared/data here (set PROTDIFF_SHARED_DATA)")
    assert len(files) >= 90  # 94 files (PDB, mmCIF, gzipped) when this test was written
    for f in files:
        chains = read_backbones(f)
        assert chains and all(np.abs(bb.ca).max() < 1e4 for bb in chains), f


@pytest.mark.parametrize("name, fmt", [("design.PDB", "pdb"), ("design.CIF", "cif"), ("design.Pdb.GZ", "pdb"),
                                       ("design.cif.Gz", "cif")])
def test_upper_case_suffixes_are_written_as_they_are_read(tmp_path, name, fmt):
    """The readers take .PDB / .CIF.GZ case-blind; the writer refused them ("unknown format '.PDB'")."""
    ca = np.cumsum(np.full((6, 3), 2.2), axis=0)
    path = write_backbone(tmp_path / name, ca)
    raw = path.read_bytes()
    text = (gzip.decompress(raw) if name.lower().endswith(".gz") else raw).decode()
    assert text.startswith("CRYST1") if fmt == "pdb" else text.startswith("data_")
    np.testing.assert_allclose(read_backbones(path)[0].ca, ca, atol=1e-3)


def test_chain_break_is_a_ca_gap_over_4_2_angstrom(tmp_path):
    """find_chain_breaks' threshold: a 4.2 A bond is no break (strictly more is), 4.5 A is one."""
    xs = [0.0, 4.2, 8.0, 12.5, 16.3]  # bonds 4.2, 3.8, 4.5, 3.8
    residues = [("ALA", i + 1, " ", [("CA", (x, 0.0, 0.0), " ", 1.0)]) for i, x in enumerate(xs)]
    bb = read_backbones(write_pdb(tmp_path / "gaps.pdb", residues))[0]
    assert bb.chain_breaks.tolist() == [False, False, False, True, False] and bb.n_breaks == 1


def test_altlocs_of_equal_occupancy_take_the_first(tmp_path):
    residues = [
        ("GLY", 1, " ", [("CA", (0.0, 0.0, 0.0), " ", 1.0)]),
        ("SER", 2, " ", [("CA", (3.8, 0.0, 0.0), "A", 0.50), ("CA", (3.0, 2.0, 0.0), "B", 0.50)]),
        ("GLY", 3, " ", [("CA", (7.6, 0.0, 0.0), " ", 1.0)]),
    ]
    bb = read_backbones(write_pdb(tmp_path / "tie.pdb", residues))[0]
    np.testing.assert_allclose(bb.ca[1], [3.8, 0.0, 0.0], atol=1e-3)


def test_a_z_coordinate_that_is_not_a_number_is_refused(tmp_path):
    path = write_pdb(tmp_path / "ok.pdb", chain_of(5))
    text = path.read_text().splitlines()
    k = [i for i, line in enumerate(text) if line[12:16].strip() == "CA"][3]
    text[k] = text[k][:46] + "        " + text[k][54:]  # residue 4's z blank: gemmi reads 0
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(StructureError, match=r"z coordinate \(columns 47-54\) is '', not a number"):
        read_backbones(path)


def test_a_residue_repeated_away_from_its_first_copy_is_not_microheterogeneity(tmp_path):
    """Microheterogeneity is the *next* residue with the same number, another name and altloc-labelled CAs;
    the same number again later in the chain (even with altloc labels) is a repeated residue, refused."""
    residues = chain_of(6)
    first = ("SER", 3, " ", [("CA", (7.6, 0.0, 0.0), "A", 0.6)])
    later = ("GLY", 3, " ", [("CA", (30.0, 0.0, 0.0), "B", 0.4)])
    path = write_pdb(tmp_path / "later.pdb", residues[:2] + [first] + residues[3:5] + [later] + residues[5:])
    with pytest.raises(StructureError, match=r"residue 3 \(SER\) occurs twice \(again as GLY"):
        read_backbones(path)


def test_written_gzip_files_carry_no_timestamp_or_name(tmp_path):
    """RFC 1952 header: bytes 4-7 are MTIME, byte 3 the flags (FNAME = 8). Zero and no name: the same
    structure written twice, at any time, under any name, is the same bytes."""
    ca = read_backbones(DATA / "1crn.pdb")[0].ca
    a = write_backbone(tmp_path / "a.pdb.gz", ca).read_bytes()
    b = write_backbone(tmp_path / "other_name.pdb.gz", ca).read_bytes()
    assert a[:2] == b"\x1f\x8b" and a[4:8] == b"\0\0\0\0" and not a[3] & 0x08
    assert a == b


def test_trajectory_frame_loop_maps_model_numbers_to_timesteps(tmp_path):
    import gemmi

    from protdiff_fast.io import write_trajectory

    frames = [np.random.default_rng(k).normal(size=(5, 3)) for k in range(3)]
    path = write_trajectory(tmp_path / "t.cif", frames, timesteps=[900, 450, 0])
    block = gemmi.cif.read(str(path)).sole_block()
    table = block.find("_protdiff_fast_frame.", ["model_num", "timestep"])
    pairs = [(int(row[0]), int(row[1])) for row in table]
    assert pairs == [(1, 900), (2, 450), (3, 0)]
    st = gemmi.read_structure(str(path))
    last = np.array([[a.pos.x, a.pos.y, a.pos.z] for r in st[2]["A"] for a in r])
    assert st[2].num == 3 and np.allclose(last, frames[2], atol=5e-4)  # model 3 is t = 0, the last frame


def test_a_file_named_explicitly_is_taken_whatever_its_extension(tmp_path):
    """A folder is searched by extension; a file the user names is taken as named (then read, or refused
    with a message), not dropped without a word."""
    odd = tmp_path / "model.pdb1"
    odd.write_text("x")
    assert find_structure_files([odd]) == [odd]
    shutil.copy(DATA / "1crn.pdb", tmp_path / "crambin.txt")
    assert find_structure_files(tmp_path) == []  # not a structure name: left out of a folder search
    named = find_structure_files([tmp_path / "crambin.txt"])
    assert named == [tmp_path / "crambin.txt"]
    with pytest.raises(StructureError, match=r"crambin.txt: cannot parse as PDB/mmCIF"):  # said, not skipped
        read_backbones(named[0])
