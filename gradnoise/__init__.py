"""gradnoise: measure gradient noise and curvature in PyTorch models.

Conventions (docs in each module): ``loss_fn(outputs, targets)`` is mean-reduced over the
batch; an example is one row of the leading batch dimension; measurements never change the
caller's model, ``.grad``, buffers, ``training`` flags or RNG state.
"""

from gradnoise import plots, tasks
from gradnoise.b_noise import BNoise, b_noise
from gradnoise.batch_size import BatchSizeSuggestion, per_example_memory, suggest_batch_size
from gradnoise.critical_batch import (
    CriticalBatchFit,
    SweepResult,
    critical_batch_sweep,
    fit_critical_batch,
)
from gradnoise.eigen import HessianEigen, hessian_eigenvalues
from gradnoise.hessian import HessianOperator, hessian_operator
from gradnoise.monitor import Monitor
from gradnoise.noise_law import NoiseLaw, noise_law
from gradnoise.noise_scale import (
    NoiseScale,
    NoiseScaleEMA,
    noise_scale,
    ratio_interval,
    two_batch,
    two_batch_stats,
)
from gradnoise.per_sample import per_sample_grads, per_sample_grads_loop
from gradnoise.rundir import read_run
from gradnoise.schedules import log_spaced
from gradnoise.sharpness import (
    EpsilonSharpness,
    Landscape,
    epsilon_sharpness,
    filter_normalized_direction,
    loss_along_line,
    random_slice,
)
from gradnoise.stats import GradientStats, LayerStats, StatsAccumulator, gradient_stats
from gradnoise.trace import TraceEstimate, hessian_trace

__version__ = "0.1.0"

__all__ = [
    "BNoise",
    "BatchSizeSuggestion",
    "CriticalBatchFit",
    "EpsilonSharpness",
    "GradientStats",
    "HessianEigen",
    "HessianOperator",
    "Landscape",
    "TraceEstimate",
    "LayerStats",
    "Monitor",
    "NoiseLaw",
    "NoiseScale",
    "NoiseScaleEMA",
    "StatsAccumulator",
    "SweepResult",
    "b_noise",
    "epsilon_sharpness",
    "filter_normalized_direction",
    "hessian_eigenvalues",
    "hessian_trace",
    "log_spaced",
    "loss_along_line",
    "random_slice",
    "read_run",
    "critical_batch_sweep",
    "fit_critical_batch",
    "gradient_stats",
    "hessian_operator",
    "noise_law",
    "noise_scale",
    "per_example_memory",
    "per_sample_grads",
    "per_sample_grads_loop",
    "plots",
    "ratio_interval",
    "suggest_batch_size",
    "tasks",
    "two_batch",
    "two_batch_stats",
]
