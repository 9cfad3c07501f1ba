"""--val-fraction: a validation split for data that has none (prepare's .npz, a folder of structures).

Before it, the main path of the README (prepare a folder, train on it) trained without a validation loss
and without a word: `train` reads split 'val', and prepare writes no split."""
import hashlib
import math
import random

import numpy as np
import pytest
import torch

from protdiff_fast.cli import main
from protdiff_fast.io import BackboneDataset, demo_data_path
from protdiff_fast.train import (TrainConfig, check_option_ranges, held_out_chains, load_data,
                                 resume_differences, train)

SMALL = dict(hidden_dim=16, edge_dim=8, num_layers=2, num_timesteps=100)


def helix(n, seed):
    """A CA trace of n residues (ideal-ish helix, 3.8 A steps) with a little noise."""
    k = np.arange(n)
    ca = np.stack([2.3 * np.cos(k * 1.745), 2.3 * np.sin(k * 1.745), 1.5 * k], 1)
    return ca + np.random.default_rng(seed).normal(0, 0.05, ca.shape)


def chains(spec):
    """BackboneDataset of (name, length, sequence) entries."""
    names, coords, seqs = zip(*[(n, helix(L, i), s) for i, (n, L, s) in enumerate(spec)])
    return BackboneDataset(list(names), list(coords), sequences=list(seqs))


def split_less_npz(tmp_path, spec, name="data.npz"):
    path = tmp_path / name
    chains(spec).save(path)  # prepare's format: no split array
    with np.load(path) as d:
        assert "split" not in d.files
    return path


def cfg(tmp_path, name, data, **kw):
    base = dict(data=str(data), out_dir=str(tmp_path / name), steps=2, batch_size=2, lr=1e-3, ckpt_every=1,
                val_every=1, val_batches=1, min_length=10, max_length=40, model=dict(SMALL), backend="auto")
    base.update(kw)
    return TrainConfig(**base)


def seq(i, n=20):
    return "".join("ACDEFGHIKLMNPQRSTVWY"[(i * 7 + k * 3) % 20] for k in range(n))


def test_held_out_chains_take_whole_sequence_groups_of_the_candidates_in_hash_order():
    spec = [(f"c{i}", 15 + i, seq(i)) for i in range(20)]
    spec += [("c3_copy", 30, seq(3)), ("c5_copy", 18, seq(5))]  # the same sequences as c3, c5
    spec += [("short", 5, seq(50)), ("long", 90, seq(51))]  # outside 10..40: never candidates
    spec += [("anon1", 25, ""), ("anon2", 25, "")]  # no sequence: grouped by name
    data = chains(spec)
    candidates = [i for i, L in enumerate(data.lengths) if 10 <= L <= 40]
    for fraction in (0.01, 0.1, 0.25, 0.5, 0.99):
        held = held_out_chains(data, fraction, 10, 40)
        names = {data.names[i] for i in held}
        want = math.ceil(fraction * len(candidates))
        assert want <= len(held) <= want + 1, (fraction, names)  # one group may hold two chains
        assert all(10 <= data.lengths[i] <= 40 for i in held)
        assert ("c3" in names) == ("c3_copy" in names) and ("c5" in names) == ("c5_copy" in names)
        # the same choice from the chains in another order
        order = list(range(len(spec)))
        random.Random(int(fraction * 100)).shuffle(order)
        again = chains([spec[i] for i in order])
        assert {again.names[i] for i in held_out_chains(again, fraction, 10, 40)} == names
    assert held_out_chains(data, 0.0, 10, 40) == []
    # growing the fraction only adds chains (hash order), and the first group is the least SHA-256 of its key
    small, large = (set(held_out_chains(data, f, 10, 40)) for f in (0.1, 0.5))
    assert small < large
    keys = {(f"seq:{s}" if s else f"name:{n}") for n, L, s in spec if 10 <= L <= 40}
    first = min(keys, key=lambda k: hashlib.sha256(k.encode()).hexdigest())
    held1 = held_out_chains(data, 0.01, 10, 40)
    assert {f"seq:{data.sequences[i]}" if data.sequences[i] else f"name:{data.names[i]}" for i in held1} == {first}


def test_train_and_val_sets_are_disjoint_by_sequence_and_cover_the_data(tmp_path):
    spec = [(f"c{i}", 12 + i, seq(i)) for i in range(24)] + [("c2_long", 70, seq(2)), ("c9_long", 80, seq(9))]
    data = split_less_npz(tmp_path, spec)
    for crop in (False, True):
        c = cfg(tmp_path, f"r{crop}", data, val_fraction=0.2, crop=crop)
        tr, va = load_data(c, "train"), load_data(c, "val")
        assert len(va) == math.ceil(0.2 * 24) and all(10 <= L <= 40 for L in va.lengths)
        assert not set(tr.sequences) & set(va.sequences)
        whole = {n for n, L, s in spec if L <= 40}
        assert set(va.names) | {n for n in tr.names if n in whole} == whole
        # with --crop the long chains train (as windows) unless their sequence is held out
        longs = {n for n in tr.names if n.endswith("_long")}
        assert longs == ({n for n, L, s in spec if L > 40 and s not in set(va.sequences)} if crop else set())
    # without --val-fraction: every chain trains, none validates
    c = cfg(tmp_path, "none", data)
    assert len(load_data(c, "val")) == 0 and len(load_data(c, "train")) == 24


def test_hold_out_from_a_long_chain_sharing_a_held_sequence_under_crop(tmp_path):
    """Name the held-out sequence first, then give a long chain that sequence: it must not train."""
    spec = [(f"c{i}", 12 + i, seq(i)) for i in range(10)]
    data = chains(spec)
    held = held_out_chains(data, 0.1, 10, 40)
    assert len(held) == 1
    spec.append(("twin_long", 60, data.sequences[held[0]]))
    path = split_less_npz(tmp_path, spec)
    tr = load_data(cfg(tmp_path, "x", path, val_fraction=0.1, crop=True), "train")
    assert "twin_long" not in tr.names and data.names[held[0]] not in tr.names and len(tr) == 9


def test_training_on_split_less_data_reports_a_val_loss_with_val_fraction(tmp_path, capsys):
    spec = [(f"c{i}", 12 + i, seq(i)) for i in range(10)]
    data = split_less_npz(tmp_path, spec)
    result = train(cfg(tmp_path, "plain", data), progress=False)
    err = capsys.readouterr().err
    assert result["val_loss"] is None
    assert "has no 'val' split" in err and "--val-fraction" in err, err
    result = train(cfg(tmp_path, "held", data, val_fraction=0.2), progress=False)
    err = capsys.readouterr().err
    assert result["val_loss"] is not None and math.isfinite(result["val_loss"])
    assert "holds out 2 chains" in err and "8 training items" in err, err
    # the validation loss is of the held-out chains: the same number as evaluating the EMA on them
    ckpt = torch.load(tmp_path / "held" / "checkpoint.pt", weights_only=False)
    assert ckpt["config"]["val_fraction"] == 0.2
    assert [h.get("val_loss") for h in ckpt["history"] if "val_loss" in h][-1] == result["val_loss"]
    # resume with another fraction would train on other chains: refused by name
    assert any(d.startswith("val_fraction: 0.2 there, 0.3 here")
               for d in resume_differences(ckpt["config"], cfg(tmp_path, "held", data, val_fraction=0.3)))
    with pytest.raises(ValueError, match="val_fraction"):
        train(cfg(tmp_path, "held", data, val_fraction=0.3, steps=3), resume=True, progress=False)


def test_val_fraction_refuses_a_dataset_with_its_own_val_split_and_a_fraction_that_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="has a 'val' split of its own"):
        load_data(cfg(tmp_path, "demo", demo_data_path(), val_fraction=0.1, max_length=128), "train")
    data = split_less_npz(tmp_path, [("a", 20, seq(1)), ("b", 20, seq(1)), ("c", 25, seq(1))])  # one sequence
    with pytest.raises(ValueError, match=r"--val-fraction 0.1 holds out all 3 chains"):
        train(cfg(tmp_path, "all", data, val_fraction=0.1), progress=False)


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), float("inf")])
def test_val_fraction_range(bad, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"val_fraction must be a finite number in \[0, 1\)"):
        check_option_ranges(dict(val_fraction=bad))
    data = split_less_npz(tmp_path, [(f"c{i}", 20, seq(i)) for i in range(4)])
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "r"), "--steps", "1",
                 "--val-fraction", str(bad), "--no-progress"])
    assert code != 0 and "--val-fraction must be a finite number in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_cli_val_fraction_on_a_folder_of_structures(tmp_path, capsys):
    from protdiff_fast.io import write_backbone

    folder = tmp_path / "pdbs"
    folder.mkdir()
    for i in range(6):
        write_backbone(folder / f"p{i}.pdb", helix(20 + i, i), sequence=seq(i, 20 + i))
    code = main(["train", "--data", str(folder), "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "2",
                 "--hidden", "16", "--edge-dim", "8", "--layers", "1", "--val-every", "1", "--min-length", "10",
                 "--val-fraction", "0.3", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "holds out 2 chains" in err and "4 training items" in err, err
    assert "val loss" in out, out
