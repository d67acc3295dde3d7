"""A short demo of kvtpu: cache formats, bytes saved, attention error per format.

For each format and head_dim it writes one row to `<workdir>/results.jsonl` (bytes
per token per layer and the ratio to bf16, attention-output error against a bf16
cache on synthetic K/V with outliers), the two tables to `<workdir>/report.md`, and
the config to `<workdir>/config.json` (`kvtpu.models.runs.demo`).

  python -m kvtpu.experiments.demo --workdir=workdir/demo
  python -m kvtpu.experiments.demo --workdir=/tmp/d --formats=int8,k8v4 --head_dims=128
"""

from __future__ import annotations

from absl import flags
from kvtpu.experiments.common import (
  check_argv,
  define_workdir_flags,
  run_main,
  usage_errors,
  workdir_options,
)
from kvtpu.models.runs import demo as demo_run

from kvtpu.format_bench import split_formats

FLAGS = flags.FLAGS
_DEFAULTS = demo_run.DemoConfig()


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
  """The binary's flags, on `fv`: one per `DemoConfig` field, and the workdir flags."""
  d = _DEFAULTS
  define_workdir_flags(fv, "workdir/demo")
  flags.DEFINE_list("head_dims", [str(h) for h in d.head_dims], "Head dimensions to compare.",
                    flag_values=fv)
  flags.DEFINE_integer("context", d.context, "Cache max_len; the longest sequence fills it.",
                       flag_values=fv)
  flags.DEFINE_integer("batch", d.batch, "Sequences, with ragged lengths.", flag_values=fv)
  flags.DEFINE_integer("seed", d.seed, "Seed of the synthetic q/k/v.", flag_values=fv)
  flags.DEFINE_string(
      "formats", ",".join(d.formats),
      "Comma-separated KV format names (dynamic-scale formats; `k=<spec>,v=<spec>` allowed).",
      flag_values=fv)


def config_from_flags(fv: flags.FlagValues = FLAGS) -> demo_run.DemoConfig:
  """The config the flags describe; an invalid one is a UsageError naming the flag."""
  with usage_errors():
    return demo_run.DemoConfig(formats=split_formats(fv["formats"].value),
                               head_dims=fv["head_dims"].value, context=fv["context"].value,
                               batch=fv["batch"].value, seed=fv["seed"].value)


def main(argv, fv: flags.FlagValues = FLAGS) -> None:
  check_argv(argv)
  config = config_from_flags(fv)
  with usage_errors():
    result = demo_run.run(config, fv["workdir"].value, **workdir_options(fv))
  print(result.tables)
  print(f"Demo: compared {len(config.formats)} KV-cache formats at head_dims "
        f"{list(config.head_dims)} (bytes per token vs bf16, attention error vs a bf16 cache at "
        f"context {config.context}, batch {config.batch}, synthetic K/V) in "
        f"{result.seconds:.1f} s; report: {result.paths['report']} (rows in results.jsonl, "
        "config in config.json)")


if __name__ == "__main__":
  run_main(main, define_flags)
