"""gmamba_ext: fused CPU/CUDA kernels for GMamba's global state-space module."""
from . import gssm_reference, nn, reference
from .gssm import gssm
from .gssm_reference import GSSMConfig, GSSMParams
from .ops import HAS_EXTENSION, selective_scan, selective_scan_channels_last
from . import flop_counts  # noqa: E402  (FLOP formulas for the ops, registered on import)

__version__ = "0.1.0"
__all__ = ["gssm", "GSSMConfig", "GSSMParams", "selective_scan", "selective_scan_channels_last", "nn", "reference", "gssm_reference", "HAS_EXTENSION", "__version__"]
