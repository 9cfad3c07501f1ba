"""The training set: filters, skip report, cache, centring and scale, bucketed batches, rotations."""
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from protdiff_fast.io import SCALE_A, BackboneDataset, demo_data_path, random_rotations, read_backbones

DATA = Path(__file__).parent / "data"


@pytest.fixture
def folder(tmp_path):
    for name in ("1crn.pdb", "1CRN.cif.gz", "1TEN_A.pdb", "1qys.pdb", "1CKB.pdb"):
        shutil.copy(DATA / name, tmp_path / name)
    (tmp_path / "broken.pdb").write_text("this is not a structure\n")
    (tmp_path / "empty.cif").write_text("")
    return tmp_path


def test_build_filters_and_reports(folder):
    ds = BackboneDataset.from_structures(folder)
    # 1crn.pdb and 1CRN.cif.gz are one structure in two formats: the first file's chain is kept (it counted
    # twice in every epoch before)
    assert sorted(ds.names) == ["1CRN_A", "1TEN_A_A", "1qys_A"]
    counts = ds.skipped.counts()
    assert counts == {"unreadable": 2, "not a monomer": 1, "duplicate": 1}, ds.skipped.skipped
    assert "broken.pdb" in str(ds.skipped.skipped) and "skipped 4" in str(ds.skipped)
    assert [r for n, r in ds.skipped.skipped if n == "1crn_A"] == [
        f"duplicate: the same CA trace and sequence as 1CRN_A ({folder / '1CRN.cif.gz'})"]
    short = BackboneDataset.from_structures(folder, min_length=50, monomers_only=False)
    assert "1crn_A" not in short.names and "1CKB_A" in short.names and "1CKB_B" not in short.names
    assert short.skipped.counts()["length out of range"] == 3  # two crambins and the peptide


def test_coordinates_are_centred_and_scaled(folder):
    ds = BackboneDataset.from_structures(folder / "1qys.pdb")
    ca = read_backbones(folder / "1qys.pdb")[0].ca
    item = ds[0]
    assert item["coords"].dtype == torch.float32 and item["length"] == 92
    assert float(item["coords"].double().mean(0).abs().max()) < 1e-6
    np.testing.assert_allclose(item["coords"].numpy() * SCALE_A, ca - ca.mean(0), atol=1e-4)


def test_cache_is_reused_and_invalidated(folder, tmp_path):
    cache = tmp_path / "cache" / "set.npz"
    first = BackboneDataset.from_structures(folder, cache=cache)
    assert cache.is_file() and not first.cache_hit
    second = BackboneDataset.from_structures(folder, cache=cache)
    assert second.cache_hit and second.names == first.names
    assert str(second.skipped) == str(first.skipped)
    for a, b in zip(first.coords, second.coords):
        assert torch.allclose(a, b, atol=1e-6)
    os.utime(folder / "1qys.pdb", ns=(1, 1))  # a changed file invalidates the cache
    assert not BackboneDataset.from_structures(folder, cache=cache).cache_hit
    assert not BackboneDataset.from_structures(folder, cache=cache, max_length=90).cache_hit  # so does the filter


def test_length_bucketed_padded_batches():
    ds = BackboneDataset.from_npz(demo_data_path())
    assert len(ds) == 64 and ds.lengths.min() >= 40 and ds.lengths.max() <= 128
    seen, pad = [], 0
    for batch in ds.batches(8, seed=3):
        c, m = batch["coords"], batch["mask"]
        assert c.shape[:2] == m.shape and c.shape[0] <= 8
        assert float(c[~m].abs().max() if (~m).any() else 0) == 0.0, "padding must be zero"
        assert bool(m[:, 0].all())
        pad += int((~m).sum())
        seen += batch["names"]
    assert sorted(seen) == sorted(ds.names)
    assert pad < 0.1 * sum(ds.lengths), "bucketing by length keeps padding small"
    again = [b["names"] for b in ds.batches(8, seed=3)]
    other = [b["names"] for b in ds.batches(8, seed=4)]
    assert again == [b["names"] for b in ds.batches(8, seed=3)] and again != other
    train = BackboneDataset.from_npz(demo_data_path(), split="val")
    assert len(train) == 8


def test_rotation_augmentation_preserves_shape():
    ds = BackboneDataset.from_npz(demo_data_path())
    plain = {n: c for b in ds.batches(4, seed=0) for n, c in zip(b["names"], b["coords"])}
    for b in ds.batches(4, seed=0, rotate=True):
        for name, c, m in zip(b["names"], b["coords"], b["mask"]):
            ref = plain[name][m]
            got = c[m]
            assert not torch.allclose(got, ref, atol=1e-3)
            dist = lambda v: (v[:, None] - v[None]).norm(dim=-1)  # noqa: E731 (cdist's matmul trick is too coarse)
            assert torch.allclose(dist(got), dist(ref), atol=1e-5)
    R = random_rotations(500, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(500, 3, 3), atol=1e-12)
    assert torch.allclose(torch.det(R), torch.ones(500, dtype=torch.float64))
    assert float(R.mean(0).abs().max()) < 0.1  # uniform: no preferred direction


def test_bad_dataset_input(tmp_path):
    with pytest.raises(FileNotFoundError):
        BackboneDataset.from_structures(tmp_path / "missing")
    with pytest.raises(ValueError, match="batch_size"):
        next(BackboneDataset.from_npz(demo_data_path()).batches(0))
    with pytest.raises(ValueError, match="finite"):
        BackboneDataset(["x"], [np.full((4, 3), np.nan)])


def test_prepare_command(folder, tmp_path, capsys):
    from protdiff_fast.cli import main

    out = tmp_path / "set.npz"
    assert main(["prepare", str(folder), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "3 chains, lengths 46..92" in text and "unreadable x2" in text and "not a monomer x1" in text
    assert "duplicate x1" in text
    assert main(["prepare", str(folder), "--out", str(out)]) == 0
    assert "cache was up to date" in capsys.readouterr().out
    assert main(["prepare", str(folder / "1CKB.pdb"), "--out", str(tmp_path / "none.npz")]) == 2


def _chain(length, gap_before=(), seed=0):
    """A random walk of CA-CA 3.8 A steps, with 8 A jumps before the residues in ``gap_before``."""
    rng = np.random.default_rng(seed)
    steps = rng.normal(size=(length, 3))
    steps *= (3.8 / np.linalg.norm(steps, axis=1))[:, None]
    for k in gap_before:
        steps[k] *= 8.0 / 3.8
    steps[0] = 0
    return np.cumsum(steps, axis=0)


def test_crop_starts_are_the_break_free_windows():
    ds = BackboneDataset(["short", "gappy", "hopeless"],
                         [_chain(30), _chain(100, gap_before=(20, 61)), _chain(50, gap_before=(10, 20, 30, 40))])
    crop = 35
    assert ds.crop_starts(0, crop).tolist() == [0]
    from protdiff_fast.io.structure import find_chain_breaks

    for i in (1, 2):
        L = len(ds.coords[i])
        gaps = find_chain_breaks(ds.coords[i].double().numpy() * SCALE_A)
        brute = [s for s in range(L - crop + 1) if not gaps[s + 1: s + crop].any()]
        assert ds.crop_starts(i, crop).tolist() == brute
    assert ds.crop_starts(1, crop).tolist() == list(range(20, 27)) + list(range(61, 66))  # gaps before 20 and 61
    assert len(ds.crop_starts(2, crop)) == 0


def test_cropped_batches_are_break_free_recentred_windows():
    long_chain = _chain(200, gap_before=(120,), seed=1)
    ds = BackboneDataset(["short", "long", "hopeless"], [_chain(40), long_chain, _chain(90, gap_before=(30, 60))])
    crop = 64
    seen = set()
    for seed in range(20):
        batches = list(ds.batches(3, seed=seed, crop=crop))
        assert sum(len(b["names"]) for b in batches) == 2, "the chain with no break-free window is left out"
        for b in batches:
            for k, name in enumerate(b["names"]):
                n = int(b["mask"][k].sum())
                c = b["coords"][k, :n].double()
                assert torch.allclose(c.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-5)
                if name == "short":
                    assert n == 40
                    continue
                assert name.startswith("long:") and n == crop
                first, last = (int(v) for v in name.split(":")[1].split("-"))
                assert last - first + 1 == crop and (last < 121 or first > 120)
                window = torch.from_numpy(long_chain[first - 1: last]) / SCALE_A
                assert torch.allclose(c, window - window.mean(0), atol=1e-5)  # the real residues, re-centred
                seen.add(first)
    assert len(seen) > 5, "windows are drawn at random"
    again = [b["names"] for b in ds.batches(3, seed=3, crop=crop)]
    assert again == [b["names"] for b in ds.batches(3, seed=3, crop=crop)]
    with pytest.raises(ValueError, match="crop must be >= 1"):
        next(ds.batches(3, crop=0))


# ---------------------------------------------------------------- prepare: --out and options (audit)
def _prepare(*argv):
    from protdiff_fast.cli import main

    return main(["prepare", *map(str, argv)])


def test_prepare_never_replaces_another_dataset_without_overwrite(tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    shutil.copy(DATA / "1crn.pdb", one / "1crn.pdb")
    shutil.copy(DATA / "1qys.pdb", two / "1qys.pdb")
    out = tmp_path / "set.npz"
    assert _prepare(one, "--out", out) == 0
    first = out.read_bytes()
    # the same files and filter: the cache is reused (nothing written); other files: refused, untouched
    assert _prepare(one, "--out", out) == 0 and "cache was up to date" in capsys.readouterr().out
    assert _prepare(two, "--out", out) == 2
    err = capsys.readouterr().err
    assert "set.npz: holds a dataset prepared from other files, another filter or another version" in err
    assert "(1 chains)" in err and "--overwrite" in err
    assert out.read_bytes() == first
    assert _prepare(one, "--out", out, "--max-length", "45") == 2 and out.read_bytes() == first  # another filter
    capsys.readouterr()
    assert _prepare(two, "--out", out, "--overwrite") == 0
    assert BackboneDataset.from_npz(out).names == ["1qys_A"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "set.npz", "two"]  # no temporary file left


def test_prepare_refuses_an_out_that_is_not_its_dataset_before_the_work(tmp_path, capsys, monkeypatch):
    shutil.copy(DATA / "1crn.pdb", tmp_path / "1crn.pdb")
    src = tmp_path / "1crn.pdb"
    parsed = []
    import protdiff_fast.io.dataset as dataset

    monkeypatch.setattr(dataset, "read_backbones", lambda f: parsed.append(f) or read_backbones(f))
    # another kind of .npz (the project's backbones.npz format): was KeyError 'key is not a file in the archive'
    other = tmp_path / "backbones.npz"
    np.savez(other, ids=np.array(["x"]), offsets=np.array([0, 1]), ca=np.zeros((1, 3), np.float32))
    text = tmp_path / "notes.npz"
    text.write_text("my notes")
    (tmp_path / "folder.npz").mkdir()
    for out, overwrite, match in (
            (other, False, r"backbones.npz: exists and is an .npz with arrays ids, offsets, ca, not a dataset written "
                           r"by prepare \(no key, seqs, skipped\), so not replaced"),
            (other, True, "not a dataset written by prepare"),  # --overwrite replaces only prepare's own datasets
            (text, True, r"notes.npz: exists and is not an .npz archive: not a dataset written by prepare"),
            (tmp_path / "folder.npz", False, r"--out: .*folder.npz is a folder; name a file"),
            (tmp_path / "notes.txt", False, r"--out .*notes.txt: the dataset is an .npz file .* name it e.g. notes.npz"),
            (src, False, r"--out .*1crn.pdb: the dataset is an .npz file"),
            (tmp_path / "cachefile", False, r"--out .*cachefile: the dataset is an .npz file .*e.g. cachefile.npz"),
            (src / "x.npz", False, r"--out: .*1crn.pdb/x.npz: .*1crn.pdb is a file, not a folder"),
            ("/proc/x.npz", False, r"--out: cannot write /proc/x.npz: folder /proc is not writable")):
        assert _prepare(src, "--out", out, *(["--overwrite"] if overwrite else [])) == 2, out
        err = capsys.readouterr().err
        assert re.search(match, err) and ".tmp" not in err, (out, err)
    assert parsed == []  # refused before any structure was read
    assert other.is_file() and text.read_text() == "my notes" and not (tmp_path / "cachefile").exists()
    with np.load(other) as d:
        assert sorted(d.files) == ["ca", "ids", "offsets"]


@pytest.mark.parametrize("options, match", [
    (["--min-length", "100", "--max-length", "50"], "--max-length 50 is below --min-length 100"),
    (["--max-length", "0"], "--max-length 0 is below --min-length 40"),
    (["--min-length", "0"], "--min-length: at least 1 residue, got 0"),
    (["--max-breaks", "-1"], "--max-breaks: a number of chain breaks >= 0, got -1"),
    (["--show-skipped", "-1"], "--show-skipped: a number of entries >= 0, got -1"),
])
def test_prepare_refuses_impossible_option_values_by_name(tmp_path, capsys, options, match):
    # every chain was reported out of range instead (or a negative count sliced the skip list)
    assert _prepare(DATA / "1crn.pdb", "--out", tmp_path / "s.npz", *options) == 2
    assert match in capsys.readouterr().err and not (tmp_path / "s.npz").exists()


def _two_chain_arrays(**overrides):
    ca = _chain(100).astype(np.float32)
    arrays = dict(ids=np.array(["x_A", "y_A"]), offsets=np.array([0, 50, 100]), ca=ca,
                  split=np.array(["train", "val"]), seqs=np.array(["A" * 50, "G" * 50]), lengths=np.array([50, 50]))
    arrays.update(overrides)
    return arrays


def test_npz_of_bytes_strings_reads_names_splits_and_sequences_as_text(tmp_path):
    # str(b"train") is "b'train'": no chain matched a split (an empty training set) and names read "b'x_A'"
    path = tmp_path / "bytes.npz"
    arrays = _two_chain_arrays()
    np.savez(path, **{k: v.astype(bytes) if v.dtype.kind == "U" else v for k, v in arrays.items()})
    ds = BackboneDataset.from_npz(path, min_length=1)
    assert ds.names == ["x_A", "y_A"] and ds.sequences == ["A" * 50, "G" * 50]
    assert BackboneDataset.from_npz(path, split="train", min_length=1).names == ["x_A"]
    assert BackboneDataset.from_npz(path, split="val", min_length=1).names == ["y_A"]


@pytest.mark.parametrize("overrides, match", [
    # the last chain's offset lost: chain y_A was served cut to 20 residues, 30 residues silently dropped
    (dict(offsets=np.array([0, 50, 70])), r"offsets are not increasing from 0 to the 100 residues of ca \(they run "
                                          r"from 0 to 70\)"),
    (dict(lengths=np.array([50, 40])), r"lengths disagree with offsets for 1 chain\(s\), e.g. y_A: length 40, "
                                       r"offsets give 50"),
    (dict(lengths=np.array([50])), r"lengths has shape \(1,\) \(int64\), expected \(2,\) integers"),
])
def test_npz_offsets_must_cover_ca_and_agree_with_lengths(tmp_path, overrides, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **_two_chain_arrays(**overrides))
    with pytest.raises(ValueError, match=r"bad.npz is not a dataset written by `protdiff-fast prepare` .*: " + match):
        BackboneDataset.from_npz(path, min_length=1)
    np.savez(path, **_two_chain_arrays())  # the consistent file reads
    assert BackboneDataset.from_npz(path, min_length=1).lengths.tolist() == [50, 50]


def test_npz_ids_must_be_unique(tmp_path):
    # two chains under one id: every report and split named them as one
    path = tmp_path / "twice.npz"
    np.savez(path, **_two_chain_arrays(ids=np.array(["x_A", "x_A"])))
    with pytest.raises(ValueError, match=r"twice.npz is not a dataset .*: ids are not unique: 1 id\(s\) name more "
                                         r"than one chain, e.g. 'x_A'"):
        BackboneDataset.from_npz(path, min_length=1)


def test_npz_warns_when_one_chain_stands_in_two_splits(tmp_path):
    import warnings

    path = tmp_path / "leak.npz"
    arrays = _two_chain_arrays()
    arrays["ca"] = np.concatenate([arrays["ca"][:50], arrays["ca"][:50]])  # y_A (val) is x_A (train) renamed
    np.savez(path, **arrays)
    with pytest.warns(UserWarning, match=r"1 chain\(s\) stand in two splits under different ids .* e.g. x_A "
                                         r"\(train\) and y_A \(val\)"):
        BackboneDataset.from_npz(path, split="val", min_length=1)
    np.savez(path, **_two_chain_arrays())  # distinct chains: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert BackboneDataset.from_npz(path, split="val", min_length=1).names == ["y_A"]


def test_model_units_are_ten_angstrom():
    """ProtDiff's unit is 10 A, a literal here: a check against SCALE_A itself passed with any value of it."""
    ca = _chain(60)
    ds = BackboneDataset(["c"], [ca])
    assert SCALE_A == 10.0
    np.testing.assert_allclose(ds[0]["coords"].double().numpy() * 10.0, ca - ca.mean(0), atol=1e-4)


def test_npz_without_split_is_all_training_chains(tmp_path):
    path = tmp_path / "nosplit.npz"
    arrays = _two_chain_arrays()
    del arrays["split"]
    np.savez(path, **arrays)
    assert BackboneDataset.from_npz(path, split="train", min_length=1).names == ["x_A", "y_A"]
    assert BackboneDataset.from_npz(path, split="val", min_length=1).names == []
    assert BackboneDataset.from_npz(path, min_length=1).names == ["x_A", "y_A"]
    # the length filter includes both ends
    assert BackboneDataset.from_npz(path, min_length=50, max_length=50).names == ["x_A", "y_A"]
    assert BackboneDataset.from_npz(path, min_length=51).names == []


def test_cache_is_invalidated_by_a_changed_file_with_its_old_mtime(folder, tmp_path):
    """A file replaced by another of a different size but given back its modification time (cp -p, tar,
    rsync -t): the cache key includes the size, so the cache is not reused with the old chains."""
    cache = tmp_path / "set.npz"
    target = folder / "1qys.pdb"
    first = BackboneDataset.from_structures(target, cache=cache)
    st = target.stat()
    shutil.copy(DATA / "1TEN_A.pdb", target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = BackboneDataset.from_structures(target, cache=cache)
    assert not again.cache_hit and again.lengths.tolist() == [89] and first.lengths.tolist() == [92]


def test_one_trace_twice_in_one_split_is_no_leak(tmp_path):
    import warnings

    path = tmp_path / "same_split.npz"
    arrays = _two_chain_arrays(split=np.array(["train", "train"]))
    arrays["ca"] = np.concatenate([arrays["ca"][:50], arrays["ca"][:50]])
    np.savez(path, **arrays)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing held out is involved: no warning
        assert BackboneDataset.from_npz(path, split="train", min_length=1).names == ["x_A", "y_A"]


def test_duplicates_are_the_same_trace_and_sequence_and_max_breaks_is_inclusive(tmp_path):
    """Two files with one CA trace but different sequences are two chains (a duplicate is the same trace *and*
    sequence); max_breaks=1 keeps a chain with exactly one break and drops one with two."""
    from protdiff_fast.io import write_backbone

    ca = _chain(50)
    write_backbone(tmp_path / "a.pdb", ca, sequence="A" * 50)
    write_backbone(tmp_path / "b.pdb", ca, sequence="G" * 50)
    write_backbone(tmp_path / "c.pdb", ca, sequence="A" * 50)
    ds = BackboneDataset.from_structures(tmp_path)
    assert sorted(ds.names) == ["a_A", "b_A"] and ds.skipped.counts() == {"duplicate": 1}
    gaps = tmp_path / "gaps"
    one, two = _chain(50, gap_before=(25,)), _chain(50, gap_before=(15, 35), seed=1)  # 8 A gaps
    write_backbone(gaps / "one.pdb", one)
    write_backbone(gaps / "two.pdb", two)
    kept = BackboneDataset.from_structures(gaps, max_breaks=1)
    assert kept.names == ["one_A"] and kept.skipped.skipped == [("two_A", "chain breaks: 2 > 1")]
