"""Calibration of K/V scales: static scales, and clip ratios of dynamic (per-token) ones.

  stats      streaming per layer/head/channel statistics under jit: `init_stats`,
             `observe`, `merge`, `percentile`, `summary` (`TensorStats`).
  methods    static scales from the statistics: `compute_scales` (absmax,
             percentile, mse), `learn_scales` (attention-output error, optax),
             `clip_fraction` (the drift baseline).
  clipping   clip ratios of dynamic specs from sample tokens: `compute_clip`
             (absmax, percentile, mse), `learn_clip`, `clip_fraction`.
  objective  what `learn_scales` and `learn_clip` share: the attention-output error
             with K or V fake-quantized (`quant.fake_quantize`), and one Adam loop.
  artifact   the calibration artifact: scales plus their disclosure, saved with content
             hashes that `CalibrationArtifact.load` verifies (`IntegrityError`).
  drift      run-time clip rates against the calibration baseline.
"""

from kvtpu.calibration.artifact import CalibrationArtifact, IntegrityError
from kvtpu.calibration.methods import (
    METHODS,
    LearnedScale,
    attention_error,
    clip_fraction,
    compute_scales,
    learn_scales,
)
from kvtpu.calibration.stats import (
    TensorStats,
    init_stats,
    merge,
    observe,
    percentile,
    stats_nbytes,
    summary,
)

__all__ = ["TensorStats", "init_stats", "observe", "merge", "percentile", "summary",
           "stats_nbytes", "METHODS", "compute_scales", "clip_fraction", "learn_scales",
           "attention_error", "LearnedScale", "CalibrationArtifact", "IntegrityError"]
