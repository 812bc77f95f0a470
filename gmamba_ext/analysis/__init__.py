"""Global-perception analysis (GSSM_SPEC.md, "Global perception"): influence maps
I_pq(i, j) = || dY[p,q,:] / dX[i,j,:] ||_F of any module mapping (B, C, H, W) or (B, H, W, C) to the same
shape, the axiom's constant tau, and the causal-scan order check. See docs/ANALYSIS.md.

- exact_influence / estimated_influence: the maps (vector-Jacobian products; Gaussian projections with
  the error bound of `bounds`: projection_bound, projections_needed).
- tau, tau_argmin, max_influence_beyond_lookahead, beyond_lookahead_mask, lookahead, sample_positions.
- perception_report: maps plus all those numbers for one module.
- WindowAttention, ConvStack, TokenMixer, comparison_modules: the baselines of the CLI
  (`python -m gmamba_ext.analysis`).
"""
from .bounds import projection_bound, projections_needed
from .influence import estimated_influence, exact_influence
from .metrics import (beyond_lookahead_mask, lookahead, max_influence_beyond_lookahead, sample_positions,
                      scan_d_conv, tau, tau_argmin)
from .report import perception_report
from .window_attention import WindowAttention
from .zoo import Candidate, ConvStack, TokenMixer, comparison_modules

__all__ = ["exact_influence", "estimated_influence", "projection_bound", "projections_needed", "tau",
           "tau_argmin", "lookahead", "beyond_lookahead_mask", "max_influence_beyond_lookahead",
           "sample_positions", "scan_d_conv", "perception_report", "WindowAttention", "ConvStack",
           "TokenMixer", "Candidate", "comparison_modules"]
