"""protdiff_fast: kernel-accelerated ProtDiff (DDPM over C-alpha coordinates with a fused EGNN)."""
from protdiff_fast import backends
from protdiff_fast._mkl_warmup import warm_up_vml
from protdiff_fast.diffusion import NoiseSchedule
from protdiff_fast.nn import EGNN, EGNNLayer
from protdiff_fast.ops import ddpm_step, egnn_pair_aggregate, remove_center_of_mass

warm_up_vml()  # before any parallel torch math of ours (see _mkl_warmup)

__version__ = "0.1.0"

__all__ = [
    "EGNN",
    "EGNNLayer",
    "NoiseSchedule",
    "backends",
    "ddpm_step",
    "egnn_pair_aggregate",
    "remove_center_of_mass",
    "__version__",
]
