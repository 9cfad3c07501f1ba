"""Structures in and out (gemmi), and the cached training set."""
from protdiff_fast.io.dataset import SCALE_A, BackboneDataset, SkipReport, demo_data_path, random_rotations
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
    write_trajectory,
)

__all__ = [
    "BackboneDataset", "SCALE_A", "SkipReport", "demo_data_path", "random_rotations",
    "Backbone", "CHAIN_BREAK_A", "StructureError", "backbone_structure", "find_chain_breaks",
    "find_structure_files", "read_backbones", "read_structure", "write_backbone",
    "write_trajectory",
]
