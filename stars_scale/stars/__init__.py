"""STARS: depth sampling and the Jacobian spectral-radius regulariser."""
from stars_scale.stars.depth import Depth, DepthSampler
from stars_scale.stars.jacobian import (SpectralEstimate, estimate_spectral_radius, normalize_direction,
                                        spectral_penalty)
from stars_scale.stars.regularizer import combine_loss, core_map_penalty

__all__ = ["Depth", "DepthSampler", "SpectralEstimate", "estimate_spectral_radius", "spectral_penalty",
           "normalize_direction", "core_map_penalty", "combine_loss"]
