"""Drift monitoring: does run-time traffic leave the range the scales were calibrated on?

A calibration artifact stores, per layer, the fraction of calibration values its
scales clip (static scales, or the clip ratios of dynamic ones). At run time the cache counts the values it clips
(`KVCache.counts()["k_saturated"]`, per layer). Comparing the two per layer says
whether traffic still looks like the calibration workload: a layer whose run-time
clip rate exceeds its calibration rate by `factor` is flagged.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["drift_summary", "drift_markdown"]


def drift_summary(artifact, cache, *, factor: float = 2.0,
                  min_written: int = 1) -> list[dict[str, Any]]:
  """Per layer and calibrated tensor (K and/or V): calibration vs run-time clip rate.

  Args:
    artifact: the `CalibrationArtifact` whose scales the cache uses.
    cache: a `KVCache` made with `calibration=artifact`, after serving traffic.
    factor: flag a layer when `runtime_rate > factor * calibration_rate` (a layer
      that clipped nothing in calibration is flagged as soon as it clips anything).
    min_written: layers that saw fewer values than this are reported, not flagged.

  Returns:
    One row per (tensor, layer): `tensor`, `layer`, `calibration_rate`,
    `runtime_rate`, `runtime_clipped`, `written`, `ratio` (runtime / calibration; inf
    when calibration clipped nothing and run time did), `flagged`.

  Raises:
    ValueError: for factor < 1, or a cache that does not match the artifact.
  """
  if not factor >= 1:
    raise ValueError(f"factor must be >= 1 (a run-time rate that many times the "
                     f"calibration rate is drift), got factor={factor}")
  artifact.check_compatible(num_layers=cache.num_layers, kv_heads=cache.kv_heads,
                            head_dim=cache.head_dim, fmt=cache.fmt)
  counts = cache.counts()
  written = counts["written"]
  rows = []
  for which, calib in sorted(artifact.clip_fraction.items()):
    clipped = counts[f"{which}_saturated"]
    for layer in range(cache.num_layers):
      n = int(written[layer])
      runtime = float(clipped[layer]) / n if n else 0.0
      base = float(calib[layer])
      ratio = runtime / base if base > 0 else (float("inf") if runtime > 0 else 0.0)
      rows.append({"tensor": which, "layer": layer, "calibration_rate": base,
                   "runtime_rate": runtime, "runtime_clipped": int(clipped[layer]),
                   "written": n, "ratio": ratio,
                   "flagged": bool(n >= min_written and runtime > factor * base)})
  return rows


def drift_markdown(rows: list[dict[str, Any]], *, only_flagged: bool = False) -> str:
  """The rows of `drift_summary` as a markdown table."""
  lines = ["| tensor | layer | calibration clip rate | run-time clip rate | ratio | flagged |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    if only_flagged and not r["flagged"]:
      continue
    ratio = "inf" if np.isinf(r["ratio"]) else f"{r['ratio']:.2f}"
    lines.append(f"| {r['tensor'].upper()} | {r['layer']} | {r['calibration_rate']:.2e} | "
                 f"{r['runtime_rate']:.2e} | {ratio} | {'**yes**' if r['flagged'] else 'no'} |")
  return "\n".join(lines)
