r"""Motif specifications: contig strings, motif residues from a structure file, per-design layouts.

A contig lists the segments of a design from N- to C-terminus, comma separated, in the notation
RFdiffusion users know:

    "10-20,A15-30,5-15"   10..20 free (scaffold) residues, residues 15..30 of chain A, 5..15 free
    "A1-7,20,A28-79"      a motif segment, exactly 20 free residues, another motif segment
    "B19"                 a single motif residue (19 of chain B)

A scaffold token is ``LO-HI`` or ``N`` (lengths, 0 allowed); a motif token is a chain id followed
by ``FIRST-LAST`` or ``NUM`` (author residue numbers, negative ones allowed, e.g. ``A-3-10``;
an end may carry an insertion code, ``H52A-56``). A range is the stretch of the chain from its
first to its last residue as the file lists it, so ``H50-56`` includes 52A, 52B when the file
has them (antibody numbering); a missing residue number inside a range is an error.
Together with a total-length range ``MIN-MAX`` it defines a set of layouts; every design draws
one (:meth:`MotifSpec.sample_layout`) from its own seed, so designs are reproducible one by one.

The motif's C-alpha coordinates are centred on their own centroid and divided by 10 A, like the
training data (:data:`protdiff_fast.io.dataset.SCALE_A`); the motif is only known up to a rigid
motion, and :mod:`protdiff_fast.motif.scaffold` conditions on exactly that.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from protdiff_fast.io.dataset import SCALE_A

_SCAFFOLD = re.compile(r"^(\d+)(?:-(\d+))?$")
_MOTIF = re.compile(r"^([A-Za-z][A-Za-z0-9]*?)(-?\d+)([A-Za-z]?)(?:-(-?\d+)([A-Za-z]?))?$")


class ContigError(ValueError):
    """A contig, length range or motif that cannot be used; the message names the problem."""


@dataclass(frozen=True)
class ScaffoldSegment:
    min_length: int
    max_length: int

    def __str__(self) -> str:
        return f"{self.min_length}-{self.max_length}"


@dataclass(frozen=True)
class MotifSegment:
    chain: str
    first: int  # author residue numbers, inclusive
    last: int
    first_icode: str = ""  # insertion codes of the end residues ("" for none)
    last_icode: str = ""
    count: Optional[int] = None  # residues in the structure from first to last (set by motif_spec)

    @property
    def length(self) -> int:
        if self.count is not None:
            return self.count
        if self.first_icode or self.last_icode:
            raise ContigError(f"motif segment {self}: its length depends on the structure's insertion codes; "
                              "read it with motif_spec")
        return self.last - self.first + 1

    def __str__(self) -> str:
        first, last = f"{self.first}{self.first_icode}", f"{self.last}{self.last_icode}"
        return f"{self.chain}{first}-{last}"


Segment = Union[ScaffoldSegment, MotifSegment]


def parse_contig(contig: str) -> List[Segment]:
    """Segments of a contig string, in order; ContigError for a malformed or overlapping contig."""
    if not isinstance(contig, str) or not contig.strip():
        raise ContigError("contig: empty; expected e.g. '10-20,A15-30,5-15'")
    segments: List[Segment] = []
    for raw in contig.split(","):
        # blanks around a segment are layout; blanks inside one are an error: removing them joined
        # "5 10" into a 510-residue scaffold and read "A15-30 5-15" as chain 'A15', residues -305..15
        raw = raw.strip()
        if not raw:
            raise ContigError(f"contig {contig!r}: empty segment (two commas in a row, or a trailing comma)")
        if any(c.isspace() for c in raw):
            raise ContigError(f"contig {contig!r}: segment {raw!r} contains a space; separate segments with "
                              "commas, e.g. '10-20,A15-30,5-15'")
        m = _SCAFFOLD.match(raw)
        if m:
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            if lo > hi:
                raise ContigError(f"contig {contig!r}: scaffold segment {raw!r} has min {lo} > max {hi}")
            segments.append(ScaffoldSegment(lo, hi))
            continue
        m = _MOTIF.match(raw)
        if m:
            first, first_icode = int(m.group(2)), m.group(3).upper()
            last, last_icode = (int(m.group(4)), m.group(5).upper()) if m.group(4) is not None else (first, first_icode)
            # insertion codes run in file order (1C, 1B, 1A, 1 in thrombin numbering), not alphabetically:
            # between codes of one number the file decides (_segment_rows), here only the numbers
            if first > last:
                raise ContigError(f"contig {contig!r}: motif segment {raw!r} runs backwards "
                                  f"({first}{first_icode} > {last}{last_icode})")
            segments.append(MotifSegment(m.group(1), first, last, first_icode, last_icode))
            continue
        raise ContigError(f"contig {contig!r}: cannot read segment {raw!r}; expected a length range like "
                          "'10-20' or '5', or a motif segment like 'A15-30' or 'A15'")
    motifs = [s for s in segments if isinstance(s, MotifSegment)]
    if not motifs:
        raise ContigError(f"contig {contig!r}: names no motif segment (e.g. 'A15-30')")
    for i, a in enumerate(motifs):
        for b in motifs[i + 1:]:
            if a.chain == b.chain and not (a.first_icode or a.last_icode or b.first_icode or b.last_icode) \
                    and a.first <= b.last and b.first <= a.last:  # with insertion codes: motif_spec's file-order check
                raise ContigError(f"contig {contig!r}: motif segments {a} and {b} overlap")
    return segments


def parse_length_range(spec: Union[str, int, Tuple[int, int], None]) -> Optional[Tuple[int, int]]:
    """'60-80' -> (60, 80), '70' or 70 -> (70, 70), None -> None (no limit beyond the contig)."""
    if spec is None:
        return None
    if isinstance(spec, tuple):
        lo, hi = spec
    elif isinstance(spec, int):
        lo = hi = spec
    else:
        m = _SCAFFOLD.match(str(spec).strip().replace("..", "-"))
        if not m:
            raise ContigError(f"length: cannot read {spec!r}; expected 'MIN-MAX' or 'N'")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
    if lo < 1 or lo > hi:
        raise ContigError(f"length: need 1 <= MIN <= MAX, got {lo}-{hi}")
    return int(lo), int(hi)


@dataclass(frozen=True, eq=False)  # eq on numpy arrays is ambiguous; compare fields explicitly
class Layout:
    """One concrete design: its length and where each motif residue sits (0-based positions)."""

    length: int
    motif_positions: np.ndarray  # (M,) int64, in the order of MotifSpec.motif_ca
    scaffold_lengths: Tuple[int, ...]  # the drawn length of each scaffold segment, in contig order

    def contig(self, segments: Sequence[Segment]) -> str:
        """The concrete contig of this layout, e.g. '14,A15-30,7'."""
        it = iter(self.scaffold_lengths)
        return ",".join(str(next(it)) if isinstance(s, ScaffoldSegment) else str(s) for s in segments)

    @property
    def motif_mask(self) -> np.ndarray:
        mask = np.zeros(self.length, dtype=bool)
        mask[self.motif_positions] = True
        return mask


@dataclass
class MotifSpec:
    """A parsed contig with the motif's coordinates; draws layouts within the length limits."""

    segments: List[Segment]
    motif_ca: np.ndarray  # (M, 3) Angstrom, in the frame of the source file
    min_length: int
    max_length: int
    source: str = ""
    contig: str = ""
    sequence: str = ""  # one-letter codes of the motif residues

    @property
    def num_motif(self) -> int:
        return int(self.motif_ca.shape[0])

    def motif_model_units(self) -> np.ndarray:
        """The motif centred on its centroid, in model units (A / 10) like the training data."""
        ca = np.asarray(self.motif_ca, dtype=np.float64)
        return (ca - ca.mean(0)) / SCALE_A

    def sample_layout(self, seed: int) -> Layout:
        """A layout drawn from this design's ``seed``: a total length uniform over the feasible
        totals, then each scaffold segment uniform over the lengths that keep the total reachable
        (so every draw is valid; no rejection loop)."""
        rng = np.random.default_rng(int(seed) & ((1 << 63) - 1))
        scaffolds = [s for s in self.segments if isinstance(s, ScaffoldSegment)]
        total = int(rng.integers(self.min_length, self.max_length + 1))
        free = total - self.num_motif
        lo_rest = sum(s.min_length for s in scaffolds)
        hi_rest = sum(s.max_length for s in scaffolds)
        lengths = []
        for s in scaffolds:
            lo_rest -= s.min_length
            hi_rest -= s.max_length
            lo = max(s.min_length, free - hi_rest)
            hi = min(s.max_length, free - lo_rest)
            n = int(rng.integers(lo, hi + 1))
            lengths.append(n)
            free -= n
        assert free == 0, "layout sampling left residues unplaced"  # guaranteed by the feasible range
        positions, pos, it = [], 0, iter(lengths)
        for s in self.segments:
            if isinstance(s, ScaffoldSegment):
                pos += next(it)
            else:
                positions.extend(range(pos, pos + s.length))
                pos += s.length
        return Layout(length=pos, motif_positions=np.asarray(positions, dtype=np.int64),
                      scaffold_lengths=tuple(lengths))


def _why_missing(path, chain: str, residue: str) -> str:
    """What the file has at ``residue`` of ``chain`` when the CA trace lacks it (error path only).

    The reasons follow the trace's own rules (io.structure._chain_residues), in its order: not an
    amino acid (waters too), a free amino acid (HETATM of a non-polymer entity, e.g. a bound ligand),
    no CA."""
    import gemmi

    from protdiff_fast.io.structure import StructureError, _is_amino_acid, read_structure

    try:
        model = read_structure(path)[0]  # (entities set up: entity_type below is gemmi's classification)
    except StructureError:
        return ""
    for ch in model:
        if ch.name != chain:
            continue
        for r in ch.first_conformer():
            if f"{r.seqid.num}{r.seqid.icode.strip()}" == residue:
                if not _is_amino_acid(r.name):
                    return f"residue {residue} is {r.name}, not an amino acid, so not part of the CA trace"
                if r.het_flag == "H" and r.entity_type != gemmi.EntityType.Polymer:
                    # it has a CA: "no CA atom" sent users looking for a missing atom
                    return (f"residue {residue} ({r.name}) is a HETATM non-polymer residue (a free amino acid, "
                            "e.g. a bound ligand, not bonded to the chain), so not part of the CA trace")
                return f"residue {residue} ({r.name}) has no CA atom"
    return f"the file has no residue {residue} in chain {chain}"


def _segment_rows(path, bb, seg: MotifSegment) -> List[int]:
    """Rows of ``bb`` (file order) from residue first[icode] to last[icode] of ``seg``, inclusive.

    A range covers the chain as it is in the file, so residues with insertion codes inside it
    (antibody numbering: 52, 52A, 52B, 53) belong to it: leaving them out would join residues
    that are not neighbours. Every plain number in the range must be present (a missing residue
    is an error, not a silent gap)."""
    # parse_contig reads insertion codes in upper case: a file's lower-case ones (52a) could not be named
    # at all ("the file has no residue 52A"), so they match case-blind, unless that makes two residues one
    folded = [ic.upper() for ic in bb.icodes]
    icodes = folded if len(set(zip(bb.resnums.tolist(), folded))) == len(folded) else list(bb.icodes)
    keys = [(int(n), ic) for n, ic in zip(bb.resnums, icodes)]
    have = f"{int(bb.resnums.min())}..{int(bb.resnums.max())}" if len(bb) else "none"
    present = set(keys)
    ends = [(seg.first, seg.first_icode)] + ([(seg.last, seg.last_icode)] if seg.last != seg.first
                                              or seg.last_icode != seg.first_icode else [])
    missing = [f"{n}{ic}" for n, ic in ends if (n, ic) not in present]
    # the numbers between the ends, clipped to the chain's numbering (+-10): a range end of 10^21 (a typo)
    # enumerated 10^21 numbers until the machine ran out of memory
    lo, hi = seg.first + 1, seg.last
    if len(bb):
        lo, hi = max(lo, int(bb.resnums.min()) - 10), min(hi, int(bb.resnums.max()) + 11)
    missing += [str(n) for n in range(lo, hi) if (n, "") not in present]
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        why = _why_missing(path, seg.chain, missing[0])
        raise ContigError(f"{path}: chain {seg.chain} has no CA for residue(s) {shown} of motif segment {seg} "
                          f"(chain {seg.chain} has residues {have}{'; ' + why if why else ''})")
    start, end = keys.index((seg.first, seg.first_icode)), keys.index((seg.last, seg.last_icode))
    rows = list(range(start, end + 1))
    strays = [f"{n}{ic}" for n, ic in (keys[r] for r in rows) if not seg.first <= n <= seg.last]
    if end < start or strays:
        raise ContigError(f"{path}: chain {seg.chain}: residues {seg.first}{seg.first_icode}..{seg.last}"
                          f"{seg.last_icode} are not in order in the file"
                          + (f" (between them: {', '.join(strays[:10])})" if strays else ""))
    return rows


def motif_spec(
    path: Union[str, Path],
    contig: str,
    length: Union[str, int, Tuple[int, int], None] = None,
    max_model_length: Optional[int] = None,
) -> MotifSpec:
    """Read the motif residues named by ``contig`` from a PDB/mmCIF file (also .gz).

    ``length`` limits the total design length (``'MIN-MAX'``); the contig's own segment ranges
    limit it too, and so does ``max_model_length`` (the model's maximum). Errors (ContigError, or
    StructureError for the file) name the missing chain or residues, overlapping segments, a motif
    longer than the maximum length, and length limits that no layout can meet.
    """
    from protdiff_fast.io.structure import read_backbones

    segments = parse_contig(contig)
    limits = parse_length_range(length)
    chains = {}
    ca_parts, seq_parts, resolved, used = [], [], [], {}
    for seg in segments:
        if not isinstance(seg, MotifSegment):
            resolved.append(seg)
            continue
        if seg.chain not in chains:
            chains[seg.chain] = read_backbones(path, chain=seg.chain)[0]  # StructureError names a missing chain
        bb = chains[seg.chain]
        rows = _segment_rows(path, bb, seg)
        for r in rows:
            if (seg.chain, r) in used:
                raise ContigError(f"contig {contig!r}: motif segments {used[(seg.chain, r)]} and {seg} overlap "
                                  f"(both contain residue {bb.resnums[r]}{bb.icodes[r]})")
            used[(seg.chain, r)] = seg
        resolved.append(dataclasses.replace(seg, count=len(rows)))
        ca_parts.append(bb.ca[rows])
        seq_parts.append("".join(bb.sequence[i] for i in rows))
    segments = resolved
    motif_ca = np.concatenate(ca_parts, axis=0)
    M = motif_ca.shape[0]
    scaffolds = [s for s in segments if isinstance(s, ScaffoldSegment)]
    lo = M + sum(s.min_length for s in scaffolds)
    hi = M + sum(s.max_length for s in scaffolds)
    want_lo, want_hi = limits if limits is not None else (lo, hi)
    if M > want_hi:
        raise ContigError(f"contig {contig!r}: the motif has {M} residues, more than the maximum length {want_hi}")
    if max_model_length is not None and M > max_model_length:
        raise ContigError(f"contig {contig!r}: the motif has {M} residues, more than the model's maximum "
                          f"length {max_model_length}")
    feasible_lo, feasible_hi = max(lo, want_lo), min(hi, want_hi)
    if max_model_length is not None:
        feasible_hi = min(feasible_hi, max_model_length)
    else:  # no model can take more; a contig end of 10^20 failed deep inside numpy's integer draw
        from protdiff_fast.models.protdiff import MAX_LENGTH

        feasible_hi = min(feasible_hi, MAX_LENGTH)
    if feasible_lo > feasible_hi:
        model = f", model maximum {max_model_length}" if max_model_length is not None else ""
        raise ContigError(f"contig {contig!r}: allows total lengths {lo}..{hi} ({M} motif residues), which "
                          f"cannot meet the requested length {want_lo}-{want_hi}{model}")
    return MotifSpec(segments=segments, motif_ca=motif_ca, min_length=feasible_lo, max_length=feasible_hi,
                     source=str(path), contig=contig, sequence="".join(seq_parts))
