"""gradnoise: measure gradient noise and curvature in PyTorch models.

Conventions (docs in each module): ``loss_fn(outputs, targets)`` is mean-reduced over the
batch; an example is one row of the leading batch dimension; measurements never change the
caller's model, ``.grad``, buffers, ``training`` flags or RNG state.
"""

from gradnoise.per_sample import per_sample_grads, per_sample_grads_loop
from gradnoise.stats import GradientStats, LayerStats, StatsAccumulator, gradient_stats

__version__ = "0.1.0"

__all__ = [
    "GradientStats",
    "LayerStats",
    "StatsAccumulator",
    "gradient_stats",
    "per_sample_grads",
    "per_sample_grads_loop",
]
