from protdiff_fast.nn import compat
from protdiff_fast.nn.egnn import EGNN, EGNNLayer

__all__ = ["EGNN", "EGNNLayer", "compat"]
