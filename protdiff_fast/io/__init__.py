"""Structures in and out (gemmi), and the cached training set."""
from protdiff_fast.io.structure import (
    CHAIN_BREAK_A,
    Backbone,
    StructureError,
    backbone_structure,
    find_chain_breaks,
    find_structure_files,
    read_backbones,
    read_structure,
    write_backbone,
)

__all__ = [
    "Backbone", "CHAIN_BREAK_A", "StructureError", "backbone_structure", "find_chain_breaks",
    "find_structure_files", "read_backbones", "read_structure", "write_backbone",
]
