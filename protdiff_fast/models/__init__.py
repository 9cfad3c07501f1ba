from protdiff_fast.models.protdiff import ProtDiff, ProtDiffConfig, sinusoidal_embedding

__all__ = ["ProtDiff", "ProtDiffConfig", "sinusoidal_embedding"]
