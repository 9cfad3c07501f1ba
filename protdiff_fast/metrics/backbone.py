"""Quality metrics of C-alpha backbones (coordinates in Angstrom), for samples and real structures.

- CA-CA bond: mean |d(i, i+1) - 3.80 A| and the fraction of bonds within 0.1 A of 3.80 A on either
  side, |d - 3.80| < 0.1 (after FrameDiff's ca_ca_deviation / ca_ca_valid_percent, Yim et al. 2023,
  but not equal to them: FrameDiff's "valid" is one-sided, d < 3.8021 + 0.1, so a too-short bond
  counts as valid there and not here; its ideal is 3.8021 A, ours 3.80 A).
- Clashes: CA pairs with |i - j| >= 2 closer than 3.0 A (threshold configurable); reported as
  the number of such pairs and their fraction of all |i - j| >= 2 pairs. (FrameDiff's
  num_ca_ca_clashes counts pairs under 1.0 A instead.)
- Radius of gyration over the CA atoms, and its ratio to Rg = 2.2 N^0.38 A, the empirical law for
  a compact globular region of N residues (Kuszewski, Gronenborn & Clore 1999, J. Am. Chem. Soc.
  121:2337, the radius-of-gyration restraint of Xplor-NIH). Crambin, 1TEN and Top7 score 1.00-1.06.
- Secondary structure from CA geometry: the virtual bond angle theta_i (i-1, i, i+1) and the
  virtual torsion tau_i (i-1, i, i+1, i+2). Helix: theta 89 +/- 12 deg and tau 50 +/- 20 deg over
  at least 3 consecutive torsions; strand: theta 124 +/- 14 deg and tau -170 +/- 45 deg over at
  least 2. These are the angle criteria of P-SEA (Labesse et al. 1997, CABIOS 13:291) alone: its
  CA(i, i+2/3/4) distance criteria, minimum element lengths and strand pairing are not applied, so
  the fractions are close to but not P-SEA's (nor DSSP's). Fractions of H, E and coil.
- Optional: mean pairwise TM-score of a set (diversity), when ``tmtools`` is installed.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np

IDEAL_CA_CA = 3.80
CLASH_A = 3.0


def _check(ca: np.ndarray) -> np.ndarray:
    ca = np.asarray(ca, dtype=np.float64)
    if ca.ndim != 2 or ca.shape[1] != 3:
        raise ValueError(f"ca: expected shape (L, 3), got {ca.shape}")
    if len(ca) == 0:
        raise ValueError("ca: no residues (shape (0, 3)): a structure needs at least one")
    if not np.isfinite(ca).all():
        raise ValueError("ca: contains NaN or Inf")
    return ca


def _breaks(ca: np.ndarray, breaks: Optional[np.ndarray]) -> np.ndarray:
    """The (L - 1,) bool mask of chain breaks (bond i joins residues i and i + 1), all False if None."""
    if breaks is None:
        return np.zeros(max(len(ca) - 1, 0), dtype=bool)
    breaks = np.asarray(breaks, dtype=bool)
    if breaks.shape != (max(len(ca) - 1, 0),):
        raise ValueError(f"breaks: expected one flag per CA-CA bond, shape ({max(len(ca) - 1, 0)},), got {breaks.shape}")
    return breaks


def chain_breaks(ca: np.ndarray, resnums: Optional[np.ndarray], max_bond: float = 4.2) -> np.ndarray:
    """Bonds of a real chain that span missing residues: the residue number jumps by more than one and
    the CA-CA distance exceeds ``max_bond`` A (both: renumbered chains and insertion codes are no break,
    and a design's long bond, with contiguous numbers, is a bad bond, not a break)."""
    ca = _check(ca)
    if resnums is None:
        return np.zeros(max(len(ca) - 1, 0), dtype=bool)
    resnums = np.asarray(resnums)
    # one number per residue: a shorter list broadcast against the bonds and flagged the wrong ones
    if resnums.shape != (len(ca),):
        raise ValueError(f"resnums: expected one residue number per CA, shape ({len(ca)},), got {resnums.shape}")
    if len(ca) < 2:
        return np.zeros(0, dtype=bool)
    jump = np.diff(resnums.astype(np.int64)) > 1
    return jump & (np.linalg.norm(np.diff(ca, axis=0), axis=1) > max_bond)


def ca_ca_bonds(ca: np.ndarray, breaks: Optional[np.ndarray] = None) -> Dict[str, float]:
    """CA-CA bond deviation and validity over the bonds that are not chain ``breaks``."""
    ca = _check(ca)
    keep = ~_breaks(ca, breaks)
    if len(ca) < 2 or not keep.any():
        return dict(ca_ca_dev=float("nan"), ca_ca_valid=float("nan"))
    d = np.linalg.norm(np.diff(ca, axis=0), axis=1)[keep]
    dev = np.abs(d - IDEAL_CA_CA)
    return dict(ca_ca_dev=float(dev.mean()), ca_ca_valid=float((dev < 0.1).mean()))


def clashes(ca: np.ndarray, threshold: float = CLASH_A, breaks: Optional[np.ndarray] = None) -> Dict[str, float]:
    """CA pairs closer than ``threshold``: every pair but bonded neighbours (|i - j| = 1), whose bond is
    the bond metrics' business; neighbours across a chain break (``breaks``) are not bonded and count."""
    ca = _check(ca)
    # NaN or a distance <= 0 counted no clash at all, silently
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.number)) \
            or not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold: a clash distance in A > 0, got {threshold!r}")
    L = len(ca)
    first, second = np.triu_indices(L, k=2)
    across = np.flatnonzero(_breaks(ca, breaks))
    first, second = np.concatenate([first, across]), np.concatenate([second, across + 1])
    if len(first) == 0:
        return dict(clash_pairs=0, clash_fraction=0.0)
    d = np.linalg.norm(ca[first] - ca[second], axis=1)
    n = int((d < threshold).sum())
    return dict(clash_pairs=n, clash_fraction=n / len(d))


def radius_of_gyration(ca: np.ndarray) -> Dict[str, float]:
    ca = _check(ca)
    rg = float(np.sqrt(((ca - ca.mean(0)) ** 2).sum(1).mean()))
    return dict(rg=rg, rg_ratio=rg / (2.2 * len(ca) ** 0.38))


def _angles(a, b, c):
    u, v = a - b, c - b
    cos = (u * v).sum(1) / (np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1) + 1e-12)
    return np.degrees(np.arccos(np.clip(cos, -1, 1)))


def _dihedrals(a, b, c, d):
    b0, b1, b2 = a - b, c - b, d - c
    b1n = b1 / (np.linalg.norm(b1, axis=1, keepdims=True) + 1e-12)
    v = b0 - (b0 * b1n).sum(1, keepdims=True) * b1n
    w = b2 - (b2 * b1n).sum(1, keepdims=True) * b1n
    x = (v * w).sum(1)
    y = (np.cross(b1n, v) * w).sum(1)
    return np.degrees(np.arctan2(y, x))


def _mark_runs(flags: np.ndarray, min_run: int, labels: np.ndarray, code: str) -> None:
    """Label residues k..k+3 (the four CA atoms of the dihedral) of every torsion k inside a run of
    >= min_run flagged torsions: a run's label reaches one residue past its central ones at each end,
    which on real strands and hairpins calls more E than DSSP does (issue note 2026-12-07)."""
    k = 0
    while k < len(flags):
        if not flags[k]:
            k += 1
            continue
        end = k
        while end < len(flags) and flags[end]:
            end += 1
        if end - k >= min_run:
            labels[k:end + 3] = np.where(labels[k:end + 3] == "-", code, labels[k:end + 3])
        k = end


def secondary_structure(ca: np.ndarray, breaks: Optional[np.ndarray] = None) -> str:
    """A string of H (helix), E (strand) and - (coil), one letter per residue; a torsion whose four
    residues span a chain break (``breaks``, per bond) is neither."""
    ca = _check(ca)
    gap = _breaks(ca, breaks)
    L = len(ca)
    labels = np.array(["-"] * L)
    if L < 4:
        return "".join(labels)
    theta = _angles(ca[:-2], ca[1:-1], ca[2:])  # theta[k] at residue k + 1
    tau = _dihedrals(ca[:-3], ca[1:-2], ca[2:-1], ca[3:])  # tau[k] over residues k .. k + 3
    th1, th2 = theta[:-1], theta[1:]
    helix = (np.abs(th1 - 89) <= 12) & (np.abs(th2 - 89) <= 12) & (np.abs(tau - 50) <= 20)
    tau_e = (tau + 170 + 180) % 360 - 180  # angular distance to -170
    strand = (np.abs(th1 - 124) <= 14) & (np.abs(th2 - 124) <= 14) & (np.abs(tau_e) <= 45)
    if gap.any():  # torsion k spans bonds k, k + 1, k + 2
        spans = gap[:-2] | gap[1:-1] | gap[2:]
        helix, strand = helix & ~spans, strand & ~spans
    _mark_runs(helix, 3, labels, "H")
    _mark_runs(strand, 2, labels, "E")
    return "".join(labels)


def secondary_structure_fractions(ca: np.ndarray, breaks: Optional[np.ndarray] = None) -> Dict[str, float]:
    ss = secondary_structure(ca, breaks)
    L = max(len(ss), 1)
    return dict(helix=ss.count("H") / L, strand=ss.count("E") / L, coil=ss.count("-") / L)


def backbone_metrics(ca: np.ndarray, clash_threshold: float = CLASH_A,
                     breaks: Optional[np.ndarray] = None) -> Dict[str, float]:
    """All per-structure metrics of one CA trace (Angstrom). ``breaks`` (one flag per CA-CA bond, e.g.
    ``chain_breaks`` of a real chain with missing residues): those bonds are left out of the bond
    metrics and of the secondary structure (a gap is not a bad bond), and the residues either side of
    one are checked for a clash like any unbonded pair."""
    ca = _check(ca)
    out = dict(length=len(ca))
    out.update(ca_ca_bonds(ca, breaks))
    out.update(clashes(ca, clash_threshold, breaks))
    out.update(radius_of_gyration(ca))
    out.update(secondary_structure_fractions(ca, breaks))
    return out


def tm_diversity(cas: Sequence[np.ndarray], max_pairs: int = 2000, seed: int = 0) -> Optional[float]:
    """Mean pairwise TM-score of a set (lower = more diverse); None without ``tmtools``."""
    try:
        from tmtools import tm_align
    except ImportError:
        return None
    pairs = [(i, j) for i in range(len(cas)) for j in range(i + 1, len(cas))]
    if not pairs:
        return None
    rng = np.random.default_rng(seed)
    if len(pairs) > max_pairs:
        pairs = [pairs[k] for k in rng.choice(len(pairs), max_pairs, replace=False)]
    scores = []
    for i, j in pairs:
        a, b = np.asarray(cas[i], np.float64), np.asarray(cas[j], np.float64)
        res = tm_align(a, b, "G" * len(a), "G" * len(b))
        scores.append(0.5 * (res.tm_norm_chain1 + res.tm_norm_chain2))
    return float(np.mean(scores))


SUMMARY_KEYS = ("length", "ca_ca_dev", "ca_ca_valid", "clash_fraction", "rg", "rg_ratio", "helix", "strand", "coil")


def _mean_of_defined(values) -> float:
    """Mean of the values that are not NaN; NaN (no numpy warning) when there are none."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else float("nan")


def summarize(rows: List[Dict[str, float]]) -> Dict[str, float]:
    """Mean of each metric over structures, plus the fraction of structures with any clash. A metric a
    structure does not have (the bond metrics of a one-residue chain, which has no bond: NaN) is left out
    of its mean; with no structure that has it the mean is NaN, which ``format_table`` shows as n/a."""
    out = {k: _mean_of_defined([r[k] for r in rows]) for k in SUMMARY_KEYS} if rows else {}
    if rows:
        out["with_clash"] = float(np.mean([r["clash_pairs"] > 0 for r in rows]))
        out["count"] = len(rows)
    return out


def _cell(v, width: int) -> str:
    """A value as the table shows it: n/a for None / NaN, %.3f, or %.3e where %.3f would not fit."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    text = f"{v:.3f}"
    return text if len(text) <= width else f"{v:.3e}"


def format_table(columns: Dict[str, Dict[str, float]]) -> str:
    """A plain-text table: one row per metric, one column per set."""
    names = list(columns)
    keys = [k for k in (*SUMMARY_KEYS, "with_clash", "tm_diversity", "count") if any(k in c for c in columns.values())]
    width = max(12, *(len(n) for n in names))
    lines = [f"{'metric':<16}" + "".join(f"{n:>{width + 2}}" for n in names)]
    for k in keys:
        cells = []
        for n in names:
            v = columns[n].get(k)
            cells.append(f"{_cell(v, width):>{width + 2}}")
        lines.append(f"{k:<16}" + "".join(cells))
    return "\n".join(lines)


# plot formats by extension, with the bytes an earlier plot of that format starts with (the file a plot
# may replace: anything else at ``path`` is the user's and is never overwritten)
PLOT_FORMATS = {".png": (b"\x89PNG",), ".svg": (b"<?xml", b"<svg"), ".pdf": (b"%PDF",)}


def check_plot_path(path):
    """``path`` as a Path where a plot may be written, or a ValueError (not .png / .svg / .pdf; an
    existing file that is not a plot of that format; a folder, or a place where no file can be
    written: checked with a probe file, so ``evaluate`` names it before the work)."""
    from pathlib import Path

    from protdiff_fast.io.structure import check_output_file

    path = Path(path)
    fmt = PLOT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"plot: {path}: name a .png, .svg or .pdf file")
    if path.is_dir() or (path.exists() and not path.read_bytes()[:16].lstrip().startswith(fmt)):
        raise ValueError(f"plot: {path} exists and is not a {path.suffix.lower()[1:]} plot: not overwritten "
                         "(choose another --plot)")
    return check_output_file(path, "plot")


def plot_metrics(sets: Dict[str, List[Dict[str, float]]], path) -> Optional[str]:
    """Histograms of each metric, one colour per set, written atomically to ``path`` (.png, .svg or
    .pdf: the format follows the name); None when matplotlib is missing. An existing file at ``path``
    is replaced only when it is a plot of that format (a ValueError names any other)."""
    path = check_plot_path(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = ["ca_ca_dev", "ca_ca_valid", "clash_fraction", "rg_ratio", "helix", "strand"]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    for ax, key in zip(axes.flat, keys):
        for name, rows in sets.items():
            vals = [r[key] for r in rows if not math.isnan(r[key])]
            if vals:
                ax.hist(vals, bins=20, alpha=0.5, label=f"{name} (n={len(vals)})", density=True)
        ax.set_title(key)
        ax.legend(fontsize=7)
    fig.tight_layout()
    from protdiff_fast.io.structure import _atomic_write

    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format=path.suffix.lower()[1:]))
    plt.close(fig)
    return str(path)
