"""The kernel_bench run: attention timing and HBM traffic per cache format, context and batch.

On a TPU the Pallas kernels run compiled (`impl="auto"`) and each row reports the HBM
bytes the kernel moves (its exact account), that figure over the minimum, and the
achieved bandwidth in % of the chip's HBM roofline. On CPU the XLA reference is timed
and bytes are the minimum (`kvtpu.benchmark`). Writes config.json, results.jsonl (a row
per point, appended as it is timed), traffic.jsonl and report.md.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
from absl import logging
from kvtpu.models.runs import common
from kvtpu.models.runs.common import (
  check,
  check_head_dim,
  format_list,
  impl_choice,
  int_list,
  positive_int,
)

from kvtpu import benchmark, reports

__all__ = ["KernelBenchConfig", "KernelBenchResult", "run"]


@dataclasses.dataclass(frozen=True)
class KernelBenchConfig:
  """A kernel benchmark (each field is the kernel_bench binary's flag of the same name).

  Attributes:
    formats: KV formats (dynamic scales).
    contexts: context lengths (cache max_len).
    batches: batch sizes.
    head_dim, kv_heads, q_heads: H, K and N (a multiple of K).
    prefill_chunk: query tokens of the prefill phase.
    impl: attend implementation.
    iters: timed runs per point (the median is reported).
  """

  formats: tuple[str, ...] = ("bf16", "int8", "int4", "fp8_e4m3", "k8v4")
  contexts: tuple[int, ...] = (1024, 4096)
  batches: tuple[int, ...] = (1, 4)
  head_dim: int = 128
  kv_heads: int = 8
  q_heads: int = 32
  prefill_chunk: int = 256
  impl: str = "auto"
  iters: int = 5

  def __post_init__(self):
    object.__setattr__(self, "formats", format_list(
        "formats", self.formats, dynamic_only="kernel_bench times dynamic-scale caches"))
    object.__setattr__(self, "contexts", int_list("contexts", self.contexts))
    object.__setattr__(self, "batches", int_list("batches", self.batches))
    for name in ("head_dim", "kv_heads", "q_heads", "prefill_chunk", "iters"):
      object.__setattr__(self, name, positive_int(name, getattr(self, name)))
    check(self.q_heads % self.kv_heads == 0, "q_heads",
          f"expected a multiple of kv_heads={self.kv_heads}, got {self.q_heads}")
    check_head_dim("formats", self.formats, self.head_dim)
    object.__setattr__(self, "impl", impl_choice("impl", self.impl))


@dataclasses.dataclass(frozen=True)
class KernelBenchResult:
  """What a kernel benchmark made: timing rows, traffic rows, the tables, the paths."""

  rows: list[dict]
  traffic: list[dict]
  tables: str
  paths: dict[str, Path]


def run(config: KernelBenchConfig, workdir: str | os.PathLike, *,
        overwrite: bool = False) -> KernelBenchResult:
  """Times every (format, context, batch, phase) and accounts the decode kernel's traffic;
  the workdir rule (`kvtpu.models.runs.common.check_workdir`) is checked first."""
  workdir = common.check_workdir(workdir, config, overwrite=overwrite)
  workdir = common.start(workdir, config)
  paths = {name: workdir / f"{name}.{ext}" for name, ext in
           (("results", "jsonl"), ("traffic", "jsonl"), ("report", "md"))}
  log = reports.RowLog(paths["results"])
  rows = benchmark.attention_rows(
      list(config.formats), config.contexts, config.batches, head_dim=config.head_dim,
      kv_heads=config.kv_heads, q_heads=config.q_heads, prefill_chunk=config.prefill_chunk,
      impl=config.impl, iters=config.iters, log=logging.info, on_row=log.append)
  traffic = benchmark.traffic_rows(list(config.formats), sorted({2048, 32768, *config.contexts}),
                                   head_dim=config.head_dim, kv_heads=config.kv_heads,
                                   q_heads=config.q_heads)
  reports.write_jsonl(traffic, paths["traffic"])
  tables = (benchmark.markdown_table(rows) + "\n\nDecode kernel HBM bytes per step (its exact "
            "account, batch 8) vs the minimum and vs bf16:\n\n"
            + benchmark.traffic_markdown(traffic))
  impl = rows[0]["impl"] if rows else config.impl
  reports.write_text(paths["report"], (
      f"# Attention timing ({impl} on {jax.default_backend()})\n\nWeights: none (random cache "
      "contents). KV precision per row; scales dynamic per token. Each time is the median of "
      f"{config.iters} runs.\n\n{tables}\n"))
  return KernelBenchResult(rows, traffic, tables, paths)
