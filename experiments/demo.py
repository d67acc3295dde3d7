"""A short demo of kvtpu: cache formats, bytes saved, attention error per format.

For each format and head_dim it writes one row to `<workdir>/results.jsonl` (bytes
per token per layer and the ratio to bf16, attention-output error against a bf16
cache on synthetic K/V with outliers), the two tables to `<workdir>/report.md`, and
the flags to `<workdir>/config.json`. The logic lives in `experiments/format_bench.py`.

  python -m kvtpu.experiments.demo --workdir=workdir/demo
  python -m kvtpu.experiments.demo --workdir=/tmp/d --formats=int8,k8v4 --head_dims=128
"""

from __future__ import annotations

import json
import os
import time

import jax
from absl import app, flags, logging
from kvtpu.experiments import format_bench

import kvtpu

_WORKDIR = flags.DEFINE_string("workdir", "workdir/demo", "Output directory.")
_HEAD_DIMS = flags.DEFINE_list("head_dims", ["64", "128"], "Head dimensions to compare.")
_CONTEXT = flags.DEFINE_integer("context", 1024, "Cache max_len; the longest sequence fills it.")
_BATCH = flags.DEFINE_integer("batch", 2, "Sequences, with ragged lengths.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic q/k/v.")
_FORMATS = flags.DEFINE_string(
    "formats", ",".join(kvtpu.PRESETS),
    "Comma-separated KV format names (dynamic-scale formats; `k=<spec>,v=<spec>` allowed).")


def _parse_flags() -> tuple[list, list[int]]:
  """Validated formats and head_dims; a bad flag is a UsageError naming it."""
  try:
    fmts = format_bench.check_formats(format_bench.split_formats(_FORMATS.value))
  except ValueError as e:
    raise app.UsageError(f"--formats: {e}") from None
  try:
    head_dims = [int(h) for h in _HEAD_DIMS.value]
    format_bench.bytes_table(fmts, head_dims)  # Checks them against the group sizes.
  except ValueError as e:
    raise app.UsageError(f"--head_dims={','.join(_HEAD_DIMS.value)}: {e}") from None
  try:
    format_bench.schedule(_CONTEXT.value, _BATCH.value)
  except ValueError as e:
    raise app.UsageError(f"--context/--batch: {e}") from None
  return fmts, head_dims


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  fmts, head_dims = _parse_flags()
  logging.info("jax %s, devices: %s", jax.__version__, jax.devices())
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  config = {name: flags.FLAGS[name].value for name in
            ("workdir", "head_dims", "context", "batch", "seed", "formats")}
  config.update(
      formats_parsed=[f.name for f in fmts], head_dims=head_dims, jax_version=jax.__version__,
      kvtpu_version=kvtpu.__version__, devices=[str(d) for d in jax.devices()],
      kv_heads=format_bench.KV_HEADS, q_heads=format_bench.Q_HEADS,
      num_layers=format_bench.NUM_LAYERS, weight_precision=format_bench.WEIGHT_PRECISION)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config, f, indent=2)

  start = time.perf_counter()
  byte_rows = format_bench.bytes_table(fmts, head_dims)
  error_rows = format_bench.attention_error_rows(
      fmts, head_dims, context=_CONTEXT.value, batch=_BATCH.value, seed=_SEED.value,
      log=logging.info)
  rows = format_bench.merge_rows(byte_rows, error_rows)
  with open(os.path.join(workdir, "results.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  tables = format_bench.render_markdown(rows)
  report = os.path.join(workdir, "report.md")
  with open(report, "w") as f:
    f.write(f"# kvtpu demo: cache formats\n\nWeights: {format_bench.WEIGHT_PRECISION}. "
            f"Scales: {format_bench.DYNAMIC_CALIBRATION}. jax {jax.__version__} on "
            f"{jax.devices()[0].platform}.\n\n{tables}")
  print(tables)
  print(f"Demo: compared {len(fmts)} KV-cache formats at head_dims {head_dims} (bytes per token "
        f"vs bf16, attention error vs a bf16 cache at context {_CONTEXT.value}, batch "
        f"{_BATCH.value}, synthetic K/V) in {time.perf_counter() - start:.1f} s; report: {report} "
        "(rows in results.jsonl, flags in config.json)")


if __name__ == "__main__":
  app.run(main)
