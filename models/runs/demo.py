"""The demo run: cache formats side by side on synthetic K/V (no model).

Per format and head_dim, one row of results.jsonl (bytes per token per layer and the ratio
to bf16, attention-output error against a bf16 cache on synthetic K/V with outliers), the
two tables in report.md (relative errors in percent) and the config in config.json. The
measurements are `kvtpu.format_bench`'s.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import jax
from absl import logging
from kvtpu.models.runs.common import ConfigError, check_workdir, int_list, positive_int, start

import kvtpu
from kvtpu import format_bench, reports

__all__ = ["DemoConfig", "DemoResult", "run"]


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """A demo run (each field is the demo binary's flag of the same name).

  Attributes:
    formats: KV format names with dynamic scales (`k=<spec>,v=<spec>` allowed).
    head_dims: head dimensions to compare.
    context: cache max_len; the longest sequence fills it (>= 4).
    batch: sequences, with ragged lengths.
    seed: seed of the synthetic q/k/v.
  """

  formats: tuple[str, ...] = tuple(kvtpu.PRESETS)
  head_dims: tuple[int, ...] = (64, 128)
  context: int = 1024
  batch: int = 2
  seed: int = 0

  def __post_init__(self):
    try:
      fmts = format_bench.check_formats(self.formats)
    except ValueError as e:
      raise ConfigError("formats", str(e)) from None
    object.__setattr__(self, "formats", tuple(f.name for f in fmts))
    head_dims = int_list("head_dims", self.head_dims)
    try:
      format_bench.bytes_table(fmts, head_dims)  # Checks them against the group sizes.
    except ValueError as e:
      raise ConfigError("head_dims", str(e)) from None
    object.__setattr__(self, "head_dims", head_dims)
    object.__setattr__(self, "context", positive_int("context", self.context, low=4))
    object.__setattr__(self, "batch", positive_int("batch", self.batch))
    object.__setattr__(self, "seed", positive_int("seed", self.seed, low=0))


@dataclasses.dataclass(frozen=True)
class DemoResult:
  """What a demo run made: its rows, the two tables, the seconds it took, the paths."""

  rows: list[dict]
  tables: str
  seconds: float
  paths: dict[str, Path]


def run(config: DemoConfig, workdir: str | os.PathLike, *, overwrite: bool = False
        ) -> DemoResult:
  """Measures bytes per token and attention error of each format (see the module docstring);
  the workdir rule (`kvtpu.models.runs.common.check_workdir`) is checked first."""
  workdir = check_workdir(workdir, config, overwrite=overwrite)
  workdir = start(workdir, config, kv_heads=format_bench.KV_HEADS, q_heads=format_bench.Q_HEADS,
                  num_layers=format_bench.NUM_LAYERS,
                  weight_precision=format_bench.WEIGHT_PRECISION)
  begin = time.perf_counter()
  byte_rows = format_bench.bytes_table(config.formats, config.head_dims)
  error_rows = format_bench.attention_error_rows(
      config.formats, config.head_dims, context=config.context, batch=config.batch,
      seed=config.seed, log=logging.info)
  rows = format_bench.merge_rows(byte_rows, error_rows)
  tables = format_bench.render_markdown(rows)
  paths = {"results": workdir / "results.jsonl", "report": workdir / "report.md"}
  reports.write_jsonl(rows, paths["results"])
  reports.write_text(paths["report"], (
      f"# kvtpu demo: cache formats\n\nWeights: {format_bench.WEIGHT_PRECISION}. Scales: "
      f"{format_bench.DYNAMIC_CALIBRATION}. jax {jax.__version__} on "
      f"{jax.devices()[0].platform}.\n\n{tables}"))
  return DemoResult(rows, tables, time.perf_counter() - begin, paths)
