from protdiff_fast.metrics.backbone import (
    CLASH_A,
    IDEAL_CA_CA,
    backbone_metrics,
    ca_ca_bonds,
    clashes,
    format_table,
    plot_metrics,
    radius_of_gyration,
    secondary_structure,
    secondary_structure_fractions,
    summarize,
    tm_diversity,
)

__all__ = [
    "CLASH_A", "IDEAL_CA_CA", "backbone_metrics", "ca_ca_bonds", "clashes", "format_table", "plot_metrics",
    "radius_of_gyration", "secondary_structure", "secondary_structure_fractions", "summarize", "tm_diversity",
]
