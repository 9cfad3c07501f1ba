"""The training set: C-alpha traces centred on their centroid and scaled to ProtDiff's units.

ProtDiff's units: 1 unit = 10 A (``SCALE_A``). A dataset is built from structure files (a folder
or a list) or from the project's ``backbones.npz`` format, filtered (single-chain monomers of
40..128 residues by default, ProtDiff's filter), cached in one ``.npz`` keyed by the files' sizes
and modification times and the filter, and served as length-bucketed padded batches with masks.
Files that cannot be used are skipped with a reason, never fatal.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from protdiff_fast.io.structure import Backbone, StructureError, _atomic_write, find_structure_files, read_backbones

SCALE_A = 10.0
# a training chain with a CA coordinate beyond this (A) is skipped: no real structure comes near it (PDB's
# columns stop at 1e4 A), and one such residue would dominate every batch it is in
MAX_TRAIN_COORD_A = 1e5


@dataclass
class SkipReport:
    """What a dataset build left out, and why."""

    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (file or chain, reason)

    def add(self, what: str, reason: str) -> None:
        self.skipped.append((what, reason))

    def counts(self) -> Dict[str, int]:
        return dict(Counter(reason.split(":")[0] for _, reason in self.skipped))

    def __str__(self) -> str:
        if not self.skipped:
            return "nothing skipped"
        return f"skipped {len(self.skipped)}: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.counts().items()))


CACHE_ARRAYS = ("key", "ids", "seqs", "offsets", "ca", "skipped")  # what ``save`` writes


def check_cache_file(path: Union[str, os.PathLike], key: Optional[str] = None) -> None:
    """Refuse to replace ``path`` (nothing to do when it does not exist): ValueError, naming it, when it
    is not a dataset cache that ``save`` wrote (a folder, not an .npz archive, another kind of .npz
    such as the project's backbones.npz: never read as a cache nor replaced); with ``key``,
    FileExistsError when the cache was built from other files or another filter."""
    import zipfile

    path = Path(path)
    if not path.exists():
        return
    if path.is_dir():
        raise ValueError(f"{path}: a folder, not a dataset cache (.npz)")
    try:
        d = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:  # numpy's ValueError: "pickled data"
        why = "" if isinstance(err, ValueError) else f" ({type(err).__name__}: {str(err)[:200]})"
        raise ValueError(f"{path}: exists and is not an .npz archive{why}: not a dataset written by prepare, so not "
                         "replaced; choose another --out (or delete the file)") from None
    files = list(getattr(d, "files", ()))
    missing = [k for k in CACHE_ARRAYS if k not in files]
    try:
        if missing:
            kind = f"an .npz with arrays {', '.join(files[:8]) or 'none'}" if hasattr(d, "files") else "an .npy array"
            raise ValueError(f"{path}: exists and is {kind}, not a dataset written by prepare (no "
                             f"{', '.join(missing)}), so not replaced; choose another --out (a backbones.npz is "
                             "read directly by train --data)")
        if key is not None and str(d["key"]) != key:
            raise FileExistsError(f"{path}: holds a dataset prepared from other files, another filter or another "
                                  f"version of protdiff_fast "
                                  f"({len(d['ids'])} chains): not replaced (prepare --overwrite, or "
                                  "overwrite=True, replaces it)")
    finally:
        if hasattr(d, "close"):
            d.close()


def _cache_key(files: Sequence[Path], config: Dict) -> str:
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def chain_fingerprint(ca: np.ndarray, sequence: str) -> bytes:
    """What makes two chains the same chain (a file in two formats, a copy in another folder): the CA
    trace at PDB's precision (0.001 A, which both formats hold) and the sequence."""
    return hashlib.sha256(np.round(np.asarray(ca, np.float64), 3).tobytes() + sequence.encode()).digest()


def random_rotations(n: int, generator: Optional[torch.Generator] = None, dtype=torch.float32) -> torch.Tensor:
    """(n, 3, 3) uniformly random proper rotations (QR of Gaussian matrices, sign-fixed)."""
    q, r = torch.linalg.qr(torch.randn(n, 3, 3, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    det = torch.det(q)
    q[:, :, 0] = q[:, :, 0] * det.unsqueeze(-1)  # flip one axis where det = -1
    return q.to(dtype)


NOT_A_DATASET = "is not a dataset written by `protdiff-fast prepare` (a backbones .npz)"


@contextlib.contextmanager
def _open_npz(path):
    """np.load of a dataset .npz (no pickles), its arrays read inside; a file that is not one, or lacks
    ``ids`` / ``offsets`` / ``ca``, is a ValueError naming it (not zipfile's, numpy's or a KeyError)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a dataset .npz")
    try:
        d = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except PermissionError:
        raise PermissionError(f"{path}: permission denied (it cannot be read)") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:  # text, a PDB, a truncated archive
        why = "not an .npz archive" if isinstance(err, ValueError) and "pickle" in str(err) else \
            f"{type(err).__name__}: {str(err)[:200]}"
        raise ValueError(f"{path} {NOT_A_DATASET}: {why}") from None
    if not isinstance(d, np.lib.npyio.NpzFile):  # a bare .npy array
        raise ValueError(f"{path} {NOT_A_DATASET}: a single array, not an .npz archive")
    with d:
        missing = [k for k in ("ids", "offsets", "ca") if k not in d.files]
        if missing:
            raise ValueError(f"{path} {NOT_A_DATASET}: it lacks the array(s) {', '.join(missing)} "
                             f"(it has: {', '.join(d.files) or 'none'})")
        try:
            yield d
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:  # an array's bytes are damaged
            if str(path) in str(err):
                raise
            raise ValueError(f"{path} {NOT_A_DATASET}: {type(err).__name__}: {str(err)[:200]}") from None


def _as_text(array: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """A bytes array (dtype S, e.g. written from h5py) as str: str(b"train") is "b'train'", which
    matched no split and made every name "b'...'"."""
    if array is not None and array.dtype.kind == "S":
        return np.char.decode(array, "utf-8")
    return array


def _check_arrays(path, ids, offsets, ca, splits, seqs, lengths=None) -> None:
    """The arrays of a dataset .npz fit together (else chains would be cut wrongly, or an IndexError):
    offsets run from 0 to exactly the residues of ``ca`` (residues past the last offset belong to no
    chain: a file whose last chain lost its offset), and agree with ``lengths`` where there is one."""
    n = len(ids) if ids.ndim == 1 else -1
    problem = None
    if n < 0:
        problem = f"ids has shape {ids.shape}, expected (chains,)"
    elif ca.ndim != 2 or ca.shape[1] != 3 or not np.issubdtype(ca.dtype, np.number):
        problem = f"ca has shape {ca.shape} ({ca.dtype}), expected (residues, 3) numbers"
    elif offsets.shape != (n + 1,) or not np.issubdtype(offsets.dtype, np.integer):
        problem = f"offsets has shape {offsets.shape} ({offsets.dtype}), expected ({n + 1},) integers"
    elif offsets[0] != 0 or (np.diff(offsets) < 0).any() or offsets[-1] != len(ca):
        problem = (f"offsets are not increasing from 0 to the {len(ca)} residues of ca (they run from "
                   f"{offsets[0]} to {offsets[-1]})")
    elif lengths is not None and (lengths.shape != (n,) or not np.issubdtype(lengths.dtype, np.integer)):
        problem = f"lengths has shape {lengths.shape} ({lengths.dtype}), expected ({n},) integers"
    elif lengths is not None and (lengths != np.diff(offsets)).any():
        bad = np.flatnonzero(lengths != np.diff(offsets))
        problem = (f"lengths disagree with offsets for {len(bad)} chain(s), e.g. {ids[bad[0]]}: length "
                   f"{lengths[bad[0]]}, offsets give {offsets[bad[0] + 1] - offsets[bad[0]]}")
    elif splits is not None and splits.shape != (n,):
        problem = f"split has shape {splits.shape}, expected ({n},)"
    elif seqs is not None and seqs.shape != (n,):
        problem = f"seqs has shape {seqs.shape}, expected ({n},)"
    elif len(set(ids.tolist())) != n:
        # an id names a chain in every report and split; two chains under one name cannot both be meant
        twice = [k for k, c in Counter(ids.tolist()).items() if c > 1]
        problem = f"ids are not unique: {len(twice)} id(s) name more than one chain, e.g. {twice[0]!r}"
    if problem:
        raise ValueError(f"{path} {NOT_A_DATASET}: {problem}")
    if splits is not None:
        _warn_shared_chains(path, ids, offsets, ca, splits)


def _warn_shared_chains(path, ids, offsets, ca, splits) -> None:
    """Warn when one CA trace (to 0.001 A) stands in two splits under different ids: a held-out chain
    that is also a training chain makes every validation number optimistic."""
    first_seen: Dict[bytes, int] = {}
    shared = []
    for i in range(len(ids)):
        trace = np.round(np.asarray(ca[offsets[i]:offsets[i + 1]], dtype=np.float64), 3)
        fingerprint = hashlib.sha256(trace.tobytes()).digest()
        k = first_seen.setdefault(fingerprint, i)
        if k != i and str(splits[k]) != str(splits[i]):
            shared.append((k, i))
    if shared:
        k, i = shared[0]
        warnings.warn(f"{path}: {len(shared)} chain(s) stand in two splits under different ids (the same CA "
                      f"trace to 0.001 A), e.g. {ids[k]} ({splits[k]}) and {ids[i]} ({splits[i]}): "
                      f"validation on such a split is not held out", stacklevel=4)


class BackboneDataset(torch.utils.data.Dataset):
    """Centred, scaled C-alpha traces: item i is a dict with ``coords`` (L, 3), ``name``, ``length``."""

    def __init__(self, names: Sequence[str], coords: Sequence[np.ndarray], scale: float = SCALE_A,
                 sequences: Optional[Sequence[str]] = None) -> None:
        if len(names) != len(coords):
            raise ValueError("names and coords differ in length")
        self.names = list(names)
        self.scale = scale
        self.sequences = list(sequences) if sequences is not None else [""] * len(names)
        self.coords = []
        for name, ca in zip(self.names, coords):
            ca = np.asarray(ca, dtype=np.float64)
            if ca.ndim != 2 or ca.shape[1] != 3 or len(ca) == 0 or not np.isfinite(ca).all():
                raise ValueError(f"{name}: expected finite (L, 3) coordinates, got shape {ca.shape}")
            self.coords.append(torch.from_numpy(((ca - ca.mean(0)) / scale).astype(np.float32)))
        self.skipped = SkipReport()

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, i: int) -> Dict:
        return dict(coords=self.coords[i], name=self.names[i], length=len(self.coords[i]))

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(c) for c in self.coords], dtype=np.int64)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_structures(
        cls,
        paths: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
        *,
        min_length: int = 40,
        max_length: int = 128,
        monomers_only: bool = True,
        max_breaks: Optional[int] = None,
        cache: Optional[Union[str, os.PathLike]] = None,
        scale: float = SCALE_A,
        overwrite: bool = True,
    ) -> "BackboneDataset":
        """Parse PDB/mmCIF files (folders are searched recursively) into a dataset.

        ``monomers_only``: keep files whose first model has exactly one protein chain (ProtDiff's
        single-chain monomers); otherwise every protein chain is an entry. ``max_breaks``: drop
        chains with more CA-CA gaps (> 4.2 A). ``cache``: an .npz path reused while neither the
        files nor the filter change. Unusable files are counted in ``dataset.skipped``.
        ``overwrite=False`` (prepare without --overwrite): a file at ``cache`` that is not this
        build's cache is refused before any file is parsed (``check_cache_file``).
        """
        files = find_structure_files(paths)
        config = dict(min_length=min_length, max_length=max_length, monomers_only=monomers_only,
                      max_breaks=max_breaks, version=3)  # 2: stricter reading (malformed files refused); 3: duplicates
        key = _cache_key(files, config)
        if cache is not None and not overwrite:
            check_cache_file(cache, key)
        if cache is not None and Path(cache).is_file():
            try:
                with np.load(cache, allow_pickle=False) as d:
                    if str(d["key"]) == key:
                        ds = cls._from_arrays(d, scale)
                        ds.skipped = SkipReport([tuple(s.split("\t", 1)) for s in d["skipped"].tolist()])
                        ds.cache_hit = True
                        return ds
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # a damaged cache: rebuilt
                pass
        report = SkipReport()
        kept: List[Backbone] = []
        # the same chain twice (1crn.pdb beside 1CRN.cif.gz, a copy in another folder) would count twice in
        # every epoch: the first file's copy is kept. Compared at PDB's precision (0.001 A), which both formats hold
        seen: Dict[bytes, str] = {}
        for f in files:
            try:
                chains = read_backbones(f)
            except StructureError as err:
                report.add(str(f), f"unreadable: {err}")
                continue
            if monomers_only and len(chains) != 1:
                report.add(str(f), f"not a monomer: {len(chains)} protein chains")
                continue
            for bb in chains:
                if not (min_length <= len(bb) <= max_length):
                    report.add(bb.name, f"length out of range: {len(bb)} not in [{min_length}, {max_length}]")
                elif max_breaks is not None and bb.n_breaks > max_breaks:
                    report.add(bb.name, f"chain breaks: {bb.n_breaks} > {max_breaks}")
                elif np.abs(bb.ca).max() > MAX_TRAIN_COORD_A:
                    i, k = np.unravel_index(int(np.abs(bb.ca).argmax()), bb.ca.shape)
                    report.add(bb.name, f"coordinates out of range: CA {'xyz'[k]} of residue {bb.resnums[i]}"
                                        f"{bb.icodes[i]} is {bb.ca[i, k]:.6g} A (beyond +-{MAX_TRAIN_COORD_A:.0e} A)")
                else:
                    fingerprint = chain_fingerprint(bb.ca, bb.sequence)
                    if fingerprint in seen:
                        report.add(bb.name, f"duplicate: the same CA trace and sequence as {seen[fingerprint]}")
                        continue
                    seen[fingerprint] = f"{bb.name} ({f})"
                    kept.append(bb)
        ds = cls([bb.name for bb in kept], [bb.ca for bb in kept], scale, [bb.sequence for bb in kept])
        ds.skipped = report
        ds.cache_hit = False
        if cache is not None:
            ds.save(cache, key=key)
        return ds

    @classmethod
    def from_npz(cls, path: Union[str, os.PathLike], *, split: Optional[str] = None, min_length: int = 40,
                 max_length: int = 128, scale: float = SCALE_A) -> "BackboneDataset":
        """Chains of a ``backbones.npz`` (``ids``, ``offsets``, ``ca`` in A; optional ``split``). A file
        without ``split`` (``prepare``'s) is all training chains: ``split="train"`` takes every chain,
        any other split none. A file that is no such dataset (arrays that do not fit, ids not unique) is a
        ValueError naming it and what is wrong; one CA trace in two splits under different ids is a warning."""
        with _open_npz(path) as d:
            ids, offsets, ca = _as_text(d["ids"]), d["offsets"], d["ca"]
            splits = _as_text(d["split"]) if "split" in d else None
            seqs = _as_text(d["seqs"]) if "seqs" in d else None
            lengths = d["lengths"] if "lengths" in d else None
            _check_arrays(path, ids, offsets, ca, splits, seqs, lengths)
            names, coords, sequences = [], [], []
            for i, name in enumerate(ids):
                s, e = int(offsets[i]), int(offsets[i + 1])
                if split is not None and (str(splits[i]) != split if splits is not None else split != "train"):
                    continue
                if min_length <= e - s <= max_length:
                    names.append(str(name))
                    coords.append(ca[s:e])
                    sequences.append(str(seqs[i]) if seqs is not None else "")
        ds = cls(names, coords, scale, sequences)
        ds.cache_hit = False
        return ds

    @classmethod
    def _from_arrays(cls, d, scale: float) -> "BackboneDataset":
        offsets = d["offsets"]
        coords = [d["ca"][offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
        return cls([str(n) for n in d["ids"]], coords, scale, [str(s) for s in d["seqs"]])

    def save(self, path: Union[str, os.PathLike], key: str = "") -> None:
        """Write the dataset (coordinates in A, as read) to one .npz, atomically."""
        ca = [c.double().numpy() * self.scale for c in self.coords]
        offsets = np.concatenate([[0], np.cumsum([len(c) for c in ca])]).astype(np.int64)
        arrays = dict(ids=np.array(self.names, dtype=str), seqs=np.array(self.sequences, dtype=str),
                      offsets=offsets, ca=np.concatenate(ca).astype(np.float32) if ca else np.zeros((0, 3), np.float32),
                      key=np.array(key), skipped=np.array([f"{a}\t{b}" for a, b in self.skipped.skipped], dtype=str))

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        _atomic_write(Path(path), write)

    # ------------------------------------------------------------------ batches
    def subset(self, indices: Sequence[int]) -> "BackboneDataset":
        """The dataset of the chains at ``indices`` (same coordinates, same skip report)."""
        sub = copy.copy(self)
        sub.names = [self.names[i] for i in indices]
        sub.coords = [self.coords[i] for i in indices]
        sub.sequences = [self.sequences[i] for i in indices]
        sub.__dict__.pop("_crop_cache", None)
        return sub

    def crop_starts(self, i: int, crop: int) -> np.ndarray:
        """Start residues of the ``crop``-residue windows of chain i that contain no chain break
        (CA-CA gap > 4.2 A); ``[0]`` for a chain of at most ``crop`` residues."""
        from protdiff_fast.io.structure import find_chain_breaks

        L = len(self.coords[i])
        if L <= crop:
            return np.zeros(1, dtype=np.int64)
        gaps = find_chain_breaks(self.coords[i].double().numpy() * self.scale)  # gap before residue k
        # window [s, s + crop) is whole when no gap lies at k in (s, s + crop)
        inside = np.concatenate([[0], np.cumsum(gaps[1:].astype(np.int64))])  # gaps at 1..k
        starts = np.arange(L - crop + 1)
        return starts[inside[starts + crop - 1] - inside[starts] == 0]

    def batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0, rotate: bool = False,
                drop_last: bool = False, crop: Optional[int] = None) -> Iterator[Dict]:
        """Length-bucketed padded batches: ``coords`` (B, L_max, 3) with zero padding, ``mask`` (B, L_max).

        Items are sorted by length (ties and batch order shuffled with ``seed``), so a batch pads
        little; ``rotate`` applies an independent uniformly random rotation to each item.
        ``crop``: a chain longer than ``crop`` residues is served as one window of ``crop``
        consecutive residues without a chain break, drawn uniformly with ``seed`` and re-centred
        (chains with no such window are left out: see ``crop_starts``).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if crop is not None and crop < 1:
            raise ValueError(f"crop must be >= 1 residues, got {crop}")
        g = torch.Generator().manual_seed(seed)
        n = len(self)
        lengths = self.lengths
        window = {}
        if crop is not None:
            if getattr(self, "_crop_cache", (None,))[0] != crop:
                self._crop_cache = (crop, [self.crop_starts(i, crop) for i in range(n)])
            starts = self._crop_cache[1]
            picks = torch.rand(n, generator=g).numpy()
            for i in range(n):
                if lengths[i] > crop and len(starts[i]):
                    window[i] = int(starts[i][min(int(picks[i] * len(starts[i])), len(starts[i]) - 1)])
            usable = np.array([lengths[i] <= crop or i in window for i in range(n)], dtype=bool)
            lengths = np.minimum(lengths, crop)
        else:
            usable = np.ones(n, dtype=bool)
        jitter = torch.rand(n, generator=g).numpy() if shuffle else np.zeros(n)
        order = np.lexsort((jitter, lengths))
        order = order[usable[order]]
        chunks = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
        if drop_last and chunks and len(chunks[-1]) < batch_size:
            chunks = chunks[:-1]
        if shuffle:
            chunks = [chunks[k] for k in torch.randperm(len(chunks), generator=g).tolist()]
        for idx in chunks:
            L = int(max(lengths[i] for i in idx))
            coords = torch.zeros(len(idx), L, 3)
            mask = torch.zeros(len(idx), L, dtype=torch.bool)
            rots = random_rotations(len(idx), g) if rotate else None
            for k, i in enumerate(idx):
                c = self.coords[i]
                if i in window:
                    c = c[window[i]: window[i] + crop]
                    c = c - c.mean(0)
                coords[k, : len(c)] = c @ rots[k].T if rotate else c
                mask[k, : len(c)] = True
            names = [self.names[i] if i not in window else f"{self.names[i]}:{window[i] + 1}-{window[i] + crop}"
                     for i in idx]
            yield dict(coords=coords, mask=mask, names=names)


def demo_data_path() -> Path:
    """The 64 real chains shipped for the demo and the tests (see protdiff_fast/data/README.md)."""
    return Path(__file__).resolve().parent.parent / "data" / "demo_backbones.npz"
