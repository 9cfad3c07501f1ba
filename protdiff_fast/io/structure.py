"""C-alpha traces in and out of PDB / mmCIF files (gemmi).

Reading keeps, for each protein chain of the first model, the amino-acid residues (standard or
modified, e.g. MSE read as M) that have a CA atom, in file order: one residue per sequence
position (microheterogeneity: the first), the CA altloc of highest occupancy, no waters, ligands
or ions. Chain breaks are flagged where consecutive CA atoms are more than 4.2 A apart.

Malformed input is refused with a StructureError naming the file (and chain, residue, value):
a truncated or corrupt gzip file, gzip data under a name without .gz, binary data, a file without
atom records; a CA coordinate that is NaN / Inf or beyond +-1e7 A (``MAX_COORD_A``: no real
structure comes near it, PDB's columns stop at 1e4 A; mmCIF has no limit, and ``sample`` writes
designs up to 1e4 model units there, i.e. 1e4 x its ``scale`` A; beyond 1e7 A float32, the
dataset's precision, no longer holds 1 A; the training set is stricter:
``dataset.MAX_TRAIN_COORD_A``); a residue number (with insertion code)
that occurs twice in a chain, unless as microheterogeneity (adjacent residues of different names
whose CA atoms carry alternate-location labels); a residue with several CA atoms that lack
distinct altloc labels.
HETATM records: an amino acid that gemmi classifies as a ligand (not bonded to the chain, e.g. a
bound glutamate after TER) is not part of the chain; a chain of HETATM records only is a protein
chain when every residue is a standard amino acid or a modified one with a known parent (MSE read
as M); otherwise (e.g. UNK) it is "not a protein chain".

Writing produces CA-only files (PDB with a CRYST1 record, or mmCIF; either gzipped when the name
ends in .gz) that gemmi and viewers read back; files are written to a temporary name and renamed,
so a crash never leaves half a file. PDB's fixed-width columns hold x, y, z as %8.3f, i.e. only
-999.999 .. 9999.999 A: a PDB write outside that range raises (mmCIF has no such limit, which is
why trajectories, whose early frames can be far out, are mmCIF only). Either format refuses what
reading would refuse (NaN / Inf, beyond +-``MAX_COORD_A``), naming the residue.
"""
from __future__ import annotations

import errno
import gzip
import os
import re
import secrets
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np

CHAIN_BREAK_A = 4.2
# what PDB's %8.3f coordinate columns (31-38, 39-46, 47-54) can hold, and its 4-column resSeq
PDB_COORD_MIN, PDB_COORD_MAX = -999.999, 9999.999
PDB_MAX_RESIDUES = 9999
# a CA coordinate beyond this (Angstrom) is a corrupt file, not a structure (e.g. 1e30 in an mmCIF field)
MAX_COORD_A = 1e7
PathLike = Union[str, os.PathLike]

THREE_LETTER = {
    "A": "ALA", "R": "ARG", "N": "ASN", "D": "ASP", "C": "CYS", "Q": "GLN", "E": "GLU", "G": "GLY", "H": "HIS",
    "I": "ILE", "L": "LEU", "K": "LYS", "M": "MET", "F": "PHE", "P": "PRO", "S": "SER", "T": "THR", "W": "TRP",
    "Y": "TYR", "V": "VAL",
}


class StructureError(ValueError):
    """A structure file that cannot give a C-alpha trace; the message names the file (and chain)."""


@dataclass
class Backbone:
    """One chain's C-alpha trace, in Angstrom, in the frame of its file."""

    name: str  # "<file stem>_<chain>"
    chain_id: str
    ca: np.ndarray  # (L, 3) float64
    resnums: np.ndarray  # (L,) int
    icodes: List[str]  # insertion codes ("" for none)
    sequence: str  # one-letter, X for unknown
    source: str = ""
    chain_breaks: np.ndarray = field(default=None)  # (L,) bool: gap before residue i

    def __post_init__(self) -> None:
        if self.chain_breaks is None:
            self.chain_breaks = find_chain_breaks(self.ca)

    def __len__(self) -> int:
        return self.ca.shape[0]

    @property
    def n_breaks(self) -> int:
        return int(self.chain_breaks.sum())


def find_chain_breaks(ca: np.ndarray, threshold: float = CHAIN_BREAK_A) -> np.ndarray:
    """(L,) bool, True at i when |CA_i - CA_{i-1}| > threshold."""
    breaks = np.zeros(len(ca), dtype=bool)
    if len(ca) > 1:
        breaks[1:] = np.linalg.norm(np.diff(ca, axis=0), axis=1) > threshold
    return breaks


def _one_letter(resname: str) -> str:
    import gemmi

    tab = gemmi.find_tabulated_residue(resname)
    code = tab.one_letter_code.upper() if tab is not None else ""
    return code if code.strip() and code != "?" else "X"


def _is_amino_acid(resname: str) -> bool:
    import gemmi

    tab = gemmi.find_tabulated_residue(resname)
    return tab is not None and tab.is_amino_acid()


def _best_ca(residue):
    """The CA atom of highest occupancy (first on ties), or None."""
    best = None
    for atom in residue:
        if atom.name == "CA" and (best is None or atom.occ > best.occ):
            best = atom
    return best


def _residue_label(residue) -> str:
    return f"{residue.seqid.num}{residue.seqid.icode.strip()} ({residue.name})"


def _chain_residues(chain, path: Path):
    """The residues of ``chain`` that make its CA trace, in file order (see the module docstring), or a
    StructureError naming a repeated residue number or a residue with CA atoms lacking altloc labels."""
    import gemmi

    kept, first_at = [], {}
    for residue in chain:
        if residue.is_water() or not _is_amino_acid(residue.name):
            continue
        if residue.het_flag == "H" and residue.entity_type != gemmi.EntityType.Polymer:
            continue  # a free amino acid (ligand), not bonded to the chain: gemmi's classification
        cas = [atom for atom in residue if atom.name == "CA"]
        if not cas:
            continue
        if len(cas) > 1 and (any(a.altloc == "\0" for a in cas) or len({a.altloc for a in cas}) < len(cas)):
            raise StructureError(
                f"{path}: chain {chain.name!r} residue {_residue_label(residue)}: {len(cas)} CA atoms without "
                "distinct alternate-location labels (a residue repeated in the file?): malformed file")
        key = (residue.seqid.num, residue.seqid.icode)
        if key in first_at:  # microheterogeneity: the next residue, another name, CA atoms with altlocs
            j, prev = first_at[key]
            micro = (j == len(kept) - 1 and prev.name != residue.name
                     and all(a.altloc != "\0" for r in (prev, residue) for a in r if a.name == "CA"))
            if not micro:
                raise StructureError(
                    f"{path}: chain {chain.name!r} residue {_residue_label(prev)} occurs twice (again as "
                    f"{residue.name}, not as alternate locations): malformed file (a residue number with "
                    "insertion code must be unique in a chain)")
            continue  # one residue per position: the first
        first_at[key] = (len(kept), residue)
        kept.append(residue)
    return kept


def _chain_trace(residues):
    ca, resnums, icodes, seq = [], [], [], []
    for residue in residues:
        atom = _best_ca(residue)
        ca.append((atom.pos.x, atom.pos.y, atom.pos.z))
        resnums.append(residue.seqid.num)
        icodes.append(residue.seqid.icode.strip())
        seq.append(_one_letter(residue.name))
    return np.asarray(ca, dtype=np.float64).reshape(-1, 3), np.asarray(resnums, dtype=np.int64), icodes, "".join(seq)


def _hetatm_only_problem(residues) -> Optional[str]:
    """Why a chain of HETATM records only is not a protein chain (residues that are not standard amino
    acids or modified ones with a known parent), or None."""
    if not residues or any(r.het_flag != "H" for r in residues):
        return None
    unknown = sorted({r.name for r in residues if _one_letter(r.name) == "X"})
    if not unknown:
        return None
    return (f"not a protein chain: HETATM records only, of residues that are not standard amino acids "
            f"({', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''})")


# one %8.3f-style number (exponents and nan/inf let through: the latter fail the finite check, which
# names the chain and residue)
_PDB_NUMBER = re.compile(r"\s*[-+]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)\s*", re.IGNORECASE)


def _check_pdb_coordinate_fields(path: Path) -> None:
    """Refuse ATOM/HETATM records whose x, y or z column is blank or not a number.

    gemmi reads such a field as 0 (blank, "abc") or as its leading digits ("1.2.3" as 1.2): a
    silently wrong atom, where mmCIF's parser gives NaN.
    """
    opener = gzip.open if path.name.lower().endswith(".gz") else open  # gemmi's test is case-insensitive too
    with opener(path, "rt", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if line.startswith("END") and not line[3:].strip():  # gemmi stops reading there
                break
            if not line.startswith(("ATOM  ", "HETATM")):
                continue
            for axis, start in (("x", 30), ("y", 38), ("z", 46)):
                field = line[start:start + 8]
                if not _PDB_NUMBER.fullmatch(field):
                    raise StructureError(
                        f"{path}: line {lineno} ({line[12:16].strip() or '?'} of {line[17:20].strip() or '?'} "
                        f"{line[22:27].strip() or '?'} chain {line[21:22].strip() or '?'}): {axis} coordinate "
                        f"(columns {start + 1}-{start + 8}) is {field.strip()!r}, not a number")


def _check_text_file(path: Path) -> None:
    """Refuse a truncated or corrupt gzip file and binary data before gemmi reads them (gemmi: "Would it
    be 100 -> 1062156419 bytes?" for a cut .gz; binary garbage in a .pdb read as a file with no chains)."""
    import zlib

    gz = path.name.lower().endswith(".gz")
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            head = f.read(1 << 16)
            if gz:
                while f.read(1 << 20):  # the whole stream: a cut file fails only at its end
                    pass
    except (EOFError, OSError, zlib.error) as err:  # BadGzipFile is an OSError
        if not gz or isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise StructureError(f"{path}: cannot read: {err}") from None
        raise StructureError(f"{path}: truncated or corrupt gzip file ({err})") from None
    if not gz and head.startswith(b"\x1f\x8b"):  # gemmi decompresses by the name only
        raise StructureError(f"{path}: gzip-compressed data in a file whose name does not end in .gz (rename it "
                             f"{path.name}.gz, or gunzip it)")
    if b"\0" in head:
        raise StructureError(f"{path}: binary data{' (after gunzip)' if gz else ''}, not a PDB or mmCIF text file")
    if gz and not head.strip():
        raise StructureError(f"{path}: empty file (after gunzip)")


def read_structure(path: PathLike):
    """gemmi.Structure of ``path`` (PDB, mmCIF, either gzipped), with StructureError on failure."""
    import gemmi

    path = Path(path)
    if path.is_dir():
        raise StructureError(f"{path}: a folder, not a structure file")
    if not path.is_file():
        raise StructureError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise StructureError(f"{path}: empty file")
    _check_text_file(path)
    try:
        st = gemmi.read_structure(str(path))
    except Exception as err:  # gemmi raises RuntimeError / ValueError with its own message
        raise StructureError(f"{path}: cannot parse as PDB/mmCIF: {err}") from None
    if len(st) == 0 or not any(len(ch) for ch in st[0]):
        raise StructureError(f"{path}: no models (no atom records: ATOM / HETATM in PDB, _atom_site in "
                             "mmCIF): not a structure file")
    if st.input_format == gemmi.CoorFormat.Pdb:
        _check_pdb_coordinate_fields(path)
    st.setup_entities()
    return st


def read_backbones(path: PathLike, chain: Optional[str] = None, min_length: int = 1) -> List[Backbone]:
    """C-alpha traces of the protein chains of the first model of ``path``.

    ``chain``: one chain id, or None for every protein chain. Raises StructureError (naming the
    file and chain) for an unreadable file, a missing chain, a chain without amino acids or CA
    atoms, or a file with no protein chain at all.
    """
    path = Path(path)
    st = read_structure(path)
    model = st[0]
    stem = path.name.split(".")[0]
    names = [ch.name for ch in model]
    if chain is not None and chain not in names:
        raise StructureError(f"{path}: no chain {chain!r} (chains: {', '.join(names) or 'none'})")
    out, problems = [], []
    for ch in model:
        if chain is not None and ch.name != chain:
            continue
        residues = _chain_residues(ch, path)
        ca, resnums, icodes, seq = _chain_trace(residues)
        bad = np.flatnonzero(~np.isfinite(ca).all(axis=1))
        if len(bad):  # "nan" in a PDB coordinate field, "?" in an mmCIF one: gemmi reads them as NaN
            raise StructureError(f"{path}: chain {ch.name!r} residue {resnums[bad[0]]}{icodes[bad[0]]}: CA "
                                 f"coordinates are not finite ({len(bad)} residue(s) of the chain)")
        far = np.flatnonzero((np.abs(ca) > MAX_COORD_A).any(axis=1))
        if len(far):  # e.g. 1e30 in a coordinate field: corrupt, and it would wreck every metric
            i = int(far[0])
            k = int(np.argmax(np.abs(ca[i])))
            raise StructureError(f"{path}: chain {ch.name!r} residue {resnums[i]}{icodes[i]} ({residues[i].name}): "
                                 f"CA {'xyz'[k]} coordinate {ca[i, k]:.6g} A is beyond +-{MAX_COORD_A:.0e} A "
                                 f"(a corrupt file?; {len(far)} residue(s) of the chain)")
        why = _hetatm_only_problem(residues)
        if why is not None:
            problems.append(f"chain {ch.name!r}: {why}")
            continue
        if len(ca) == 0:
            has_aa = any(_is_amino_acid(r.name) for r in ch)
            problems.append(f"chain {ch.name!r}: " + ("amino acids but no CA atoms" if has_aa else "not a protein chain"))
            continue
        if len(ca) < min_length:
            problems.append(f"chain {ch.name!r}: {len(ca)} residues < {min_length}")
            continue
        out.append(Backbone(name=f"{stem}_{ch.name}", chain_id=ch.name, ca=ca, resnums=resnums, icodes=icodes,
                            sequence=seq, source=str(path)))
    if not out:
        detail = "; ".join(problems) if problems else "no chains"
        raise StructureError(f"{path}: no protein C-alpha trace ({detail})")
    return out


def check_output_file(path: PathLike, label: str = "output") -> Path:
    """``path`` as a Path where a file can be written, checked before the work that produces it: not a
    folder, below a folder (existing or creatable: no file on the way) where a file can be created. A
    ValueError names ``label`` (e.g. "--out") and the user's path."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{label}: {path} is a folder; name a file")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{label}: {path}: {folder} is a file, not a folder")
    try:  # the real test (os.access says yes to root, also on read-only file systems such as /proc)
        fd, probe = tempfile.mkstemp(dir=folder, prefix="." + path.name + ".", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"{label}: cannot write {path}: folder {folder} is not writable "
                         f"({err.strerror or err})") from None
    return path


def _atomic_write(path: Path, write, durable: bool = False) -> None:
    """Write through ``write(tmp_path)`` to a temporary file beside ``path``, then rename it over.

    ``durable``: fsync the file before the rename and the folder after it, so a power cut leaves
    the old or the new file, never an empty one (used for checkpoints; a few ms per call). An
    OSError about the hidden temporary file is raised (same type) naming ``path`` instead."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_temporary_beside(path)
    except OSError as err:
        raise type(err)(err.errno, f"cannot write {path}: {err.strerror}") from None
    try:
        write(tmp)
        _keep_mode_of(path, tmp)
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            _fsync_folder(path.parent)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno is not None and tmp in (err.filename, err.filename2):
            try:
                named = type(err)(err.errno, f"cannot write {path}: {err.strerror}")
            except Exception:  # an OSError subclass with another constructor: as it was
                raise err from None
            raise named from None
        raise


def _keep_mode_of(path: Path, tmp: str) -> None:
    """Give ``tmp`` the permissions of the file it replaces, as an edit in place would keep them: a
    file a user made group-readable (or private) stays so when it is written again."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if stat.S_ISREG(st.st_mode):
        os.chmod(tmp, stat.S_IMODE(st.st_mode))


def _create_temporary_beside(path: Path) -> str:
    """Create an empty hidden file in ``path``'s folder (a new name, never an existing file) with the
    permissions a plain open() gives (0666 less the umask). mkstemp's 0600 needed a chmod, and
    reading the umask means setting it: for a moment the whole process, every thread and every
    child started then, would create files with umask 0 (world-writable)."""
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(errno.EEXIST, f"no unused temporary name beside {path}")


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory fds: the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_readable_coordinates(ca: np.ndarray) -> None:
    """Raise ValueError, naming the residue (1-based, as written) and axis, for a coordinate that
    ``read_backbones`` would refuse: NaN / Inf, or beyond +-``MAX_COORD_A``. A file holding one could
    be written (mmCIF has no column limit) but never read back."""
    ca = np.asarray(ca, dtype=np.float64)
    nonfinite = ~np.isfinite(ca)
    if nonfinite.any():
        i, k = (int(v) for v in np.argwhere(nonfinite)[0])
        raise ValueError(f"ca: contains NaN or Inf: {'xyz'[k]} of residue {i + 1} is {ca[i, k]} "
                         f"({int(nonfinite.any(axis=1).sum())} residue(s))")
    far = np.abs(ca) > MAX_COORD_A
    if far.any():
        i, k = (int(v) for v in np.argwhere(far)[0])
        raise ValueError(f"ca: coordinate {ca[i, k]:.6g} A ({'xyz'[k]} of residue {i + 1}) is beyond "
                         f"+-{MAX_COORD_A:.0e} A, which read_backbones refuses as a corrupt file "
                         f"({int(far.any(axis=1).sum())} residue(s)); are the coordinates in Angstrom?")


def check_pdb_coordinates(ca: np.ndarray) -> None:
    """Raise ValueError unless every coordinate fits PDB's %8.3f columns (and L fits resSeq)."""
    ca = np.asarray(ca, dtype=np.float64)
    # values that round to the limits still print in 8 characters
    bad = ~((ca > PDB_COORD_MIN - 0.0005) & (ca < PDB_COORD_MAX + 0.0005))
    if bad.any():
        i, k = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(f"ca: coordinate {ca[i, k]:.3f} A ({'xyz'[k]} of residue {i + 1}) does not fit the PDB "
                         f"format's %8.3f columns ({PDB_COORD_MIN} .. {PDB_COORD_MAX} A); are they in Angstrom? "
                         "Write mmCIF (.cif) for larger coordinates")
    if len(ca) > PDB_MAX_RESIDUES:
        raise ValueError(f"ca: {len(ca)} residues do not fit the PDB format's 4-column residue number; write mmCIF")


def backbone_structure(ca: np.ndarray, sequence: Optional[str] = None, chain_id: str = "A",
                       name: str = "protdiff_fast", pdb_range: bool = True):
    """A gemmi.Structure holding one CA-only chain (residues GLY unless a sequence is given).

    ``pdb_range``: refuse coordinates that PDB's fixed-width columns cannot hold (pass False for
    mmCIF-only use, e.g. trajectories).
    """
    import gemmi

    kind = np.asarray(ca).dtype.kind
    if kind not in "fiu":  # complex parts were dropped and booleans written as 0 / 1 A
        raise ValueError(f"ca: expected real coordinates, got dtype {np.asarray(ca).dtype}")
    ca = np.asarray(ca, dtype=np.float64)
    if ca.ndim != 2 or ca.shape[1] != 3 or len(ca) == 0:
        raise ValueError(f"ca: expected shape (L, 3) with L >= 1, got {ca.shape}")
    # ASCII only: str.isalnum() takes "é" or "²", which shift PDB's byte columns and made an mmCIF file
    # that gemmi cannot parse
    if not (isinstance(chain_id, str) and 1 <= len(chain_id) <= (1 if pdb_range else 4) and chain_id.isascii()
            and chain_id.isalnum()):
        raise ValueError(f"chain_id: 1 letter or digit{'' if pdb_range else ' (up to 4 in mmCIF)'} (A-Z, a-z, 0-9), "
                         f"got {chain_id!r}")
    if sequence is not None:
        unknown = sorted({c for c in sequence.upper() if c not in THREE_LETTER and c != "X"})
        if unknown:  # lowercase is read as uppercase, X is UNK; anything else is not a one-letter code
            raise ValueError(f"sequence: {''.join(unknown)[:10]!r} are not one-letter amino acid codes (or X)")
        sequence = sequence.upper()
    check_readable_coordinates(ca)
    if pdb_range:
        check_pdb_coordinates(ca)
    if sequence is not None and len(sequence) != len(ca):
        raise ValueError(f"sequence: length {len(sequence)} differs from {len(ca)} residues")
    st = gemmi.Structure()
    st.name = name
    st.cell = gemmi.UnitCell(1.0, 1.0, 1.0, 90.0, 90.0, 90.0)  # the customary cell of a non-crystal model
    st.spacegroup_hm = "P 1"
    model = gemmi.Model("1")
    chain = gemmi.Chain(chain_id)
    for i, xyz in enumerate(ca):
        res = gemmi.Residue()
        res.name = THREE_LETTER.get((sequence or "G")[i] if sequence else "G", "UNK")
        res.seqid = gemmi.SeqId(i + 1, " ")
        res.subchain = chain_id  # label_asym_id = auth chain (gemmi would invent "Axp")
        res.entity_type = gemmi.EntityType.Polymer
        atom = gemmi.Atom()
        atom.name = "CA"
        atom.element = gemmi.Element("C")
        atom.pos = gemmi.Position(*map(float, xyz))
        atom.occ = 1.0
        atom.b_iso = 0.0
        res.add_atom(atom)
        chain.add_residue(res)
    model.add_chain(chain)
    st.add_model(model)
    st.setup_entities()
    # the entity's sequence gives mmCIF a label_seq_id per residue (viewers number residues by it)
    st.entities[0].full_sequence = [res.name for res in st[0][0]]
    st.assign_label_seq_id()
    return st


def _format_of(path: Path):
    """('pdb' | 'cif', gzipped) from a name such as design.pdb, design.cif.gz."""
    gz = path.suffix.lower() == ".gz"  # case-blind, as the readers are: design.PDB is read, so it is written
    suffix = Path(path.stem).suffix if gz else path.suffix
    fmt = {".pdb": "pdb", ".cif": "cif", ".mmcif": "cif"}.get(suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown format {suffix!r}; use .pdb or .cif (optionally .gz)")
    return fmt, gz


def _write_text(tmp: str, text: str, gz: bool) -> None:
    if gz:  # mtime 0 and no name in the header: the same structure gives the same bytes
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as out:
            out.write(text.encode())
    else:
        with open(tmp, "w") as out:
            out.write(text)


def write_backbone(path: PathLike, ca: np.ndarray, sequence: Optional[str] = None, chain_id: str = "A",
                   overwrite: bool = False) -> Path:
    """Write a CA-only PDB (``.pdb``) or mmCIF (``.cif``) file atomically; coordinates in Angstrom.

    A name ending in ``.gz`` (``design.pdb.gz``) is gzipped. PDB refuses coordinates outside its
    %8.3f columns (ValueError naming the value; use mmCIF for those).
    """
    path = Path(path)
    fmt, gz = _format_of(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: exists (pass overwrite=True to replace it)")
    st = backbone_structure(ca, sequence, chain_id, name=path.name.split(".")[0], pdb_range=fmt == "pdb")
    text = _pdb_string(st) if fmt == "pdb" else st.make_mmcif_document().as_string()
    _atomic_write(path, lambda tmp: _write_text(tmp, text, gz))
    return path


def _pdb_string(st) -> str:
    import gemmi

    options = gemmi.PdbWriteOptions()
    options.seqres_records = False  # a poly-GLY placeholder sequence says nothing; CRYST1 comes first
    return st.make_pdb_string(options)


def write_trajectory(path: PathLike, frames: Sequence[np.ndarray], timesteps: Optional[Sequence[int]] = None,
                     chain_id: str = "A", overwrite: bool = False) -> Path:
    """Write CA frames (each (L, 3), Angstrom) as one multi-model mmCIF file (``.cif`` or ``.cif.gz``).

    Model k + 1 holds frame k. mmCIF only: early diffusion frames can lie far outside PDB's
    fixed-width columns. ``timesteps`` (one per frame) are stored in a ``_protdiff_fast_frame``
    loop (model number -> diffusion timestep t of that frame; t = 0 is the final sample).
    """
    import gemmi

    path = Path(path)
    fmt, gz = _format_of(path)
    if fmt != "cif":
        raise ValueError(f"{path}: trajectories are written as mmCIF (.cif or .cif.gz): early frames overflow "
                         "PDB's fixed-width coordinate columns")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: exists (pass overwrite=True to replace it)")
    if len(frames) == 0:
        raise ValueError("frames: nothing to write")
    if timesteps is not None and len(timesteps) != len(frames):
        raise ValueError(f"timesteps: {len(timesteps)} values for {len(frames)} frames")
    st = None
    for k, ca in enumerate(frames):
        ca = np.round(np.asarray(ca, dtype=np.float64), 3)  # PDB's precision; mmCIF would print 8+ digits
        try:
            one = backbone_structure(ca, chain_id=chain_id, name=path.name.split(".")[0], pdb_range=False)
        except ValueError as err:
            raise ValueError(f"frames: frame {k}: {err}") from None
        if st is None:
            st = one
            st[0].num = 1
        else:
            if len(ca) != len(frames[0]):
                raise ValueError(f"frames: frame {k} has {len(ca)} residues, frame 0 has {len(frames[0])}")
            model = one[0]
            model.num = k + 1
            st.add_model(model)
    doc = st.make_mmcif_document()
    if timesteps is not None:
        loop = doc[0].init_loop("_protdiff_fast_frame.", ["model_num", "timestep"])
        for k, t in enumerate(timesteps):
            loop.add_row([str(k + 1), str(int(t))])
    text = doc.as_string()
    _atomic_write(path, lambda tmp: _write_text(tmp, text, gz))
    return path


def find_structure_files(paths: Union[PathLike, Sequence[PathLike]]) -> List[Path]:
    """Structure files of a folder (recursively) or a list of files/folders, sorted. In a folder, the
    trajectories ``sample --trajectory-every`` writes beside its designs (``*.traj.cif[.gz]``: noise
    first) are not structures to read; a trajectory named as a file is read."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    exts = (".pdb", ".ent", ".cif", ".mmcif", ".pdb.gz", ".ent.gz", ".cif.gz", ".mmcif.gz")
    found, seen = [], set()
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(f for f in p.rglob("*") if f.is_file() and f.name.lower().endswith(exts)
                         and not f.name.lower().endswith((".traj.cif", ".traj.cif.gz")))
        elif p.exists():
            found.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    unique = []
    for f in sorted(set(found)):  # one file named twice (a/../b.pdb and b.pdb, a link) is read once
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique
