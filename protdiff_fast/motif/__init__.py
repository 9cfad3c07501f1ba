"""Motif scaffolding: contig parsing and motif specs (:mod:`.contig`), and the samplers (:mod:`.scaffold`):
replacement, a fixed-motif baseline and SMCDiff (Trippe et al. 2022)."""
from protdiff_fast.motif.contig import (
    ContigError,
    Layout,
    MotifSegment,
    MotifSpec,
    ScaffoldSegment,
    motif_spec,
    parse_contig,
    parse_length_range,
)
from protdiff_fast.motif.scaffold import (
    METHODS,
    ScaffoldingError,
    ScaffoldResult,
    effective_sample_size,
    motif_trajectory,
    replace_motif,
    residual_resample,
    scaffold,
    systematic_resample,
    systematic_resample_rows,
    transition_sigma,
)

__all__ = [
    "METHODS", "ContigError", "Layout", "MotifSegment", "MotifSpec", "ScaffoldResult", "ScaffoldSegment",
    "ScaffoldingError", "effective_sample_size", "motif_spec", "motif_trajectory", "parse_contig",
    "parse_length_range", "replace_motif", "residual_resample", "scaffold", "systematic_resample",
    "systematic_resample_rows", "transition_sigma",
]
