"""Calibrates KV-cache scales of a model on named workloads, and reports outliers.

Loads the model (`kvtpu.models.load_pretrained`), builds each workload
(`kvtpu.eval.workloads.load`: prose, code, chat, passkey:..., repeat, random, or a
.txt/.jsonl file of your own traffic), streams `[batch, seq_len]` windows through the
model collecting per-layer / kv-head / channel statistics of keys (before and after
RoPE) and values, computes the format's static scales (tensor/head/channel specs) or
clip ratios (dynamic per-token specs: int8, int4-g32, fp8_e4m3, ...) with `--method`,
and writes config.json, artifact/, stats.json, results.jsonl, magnitudes.png and
report.md to `--workdir` (`kvtpu.models.runs.calibrate`), which must be new or empty
(--overwrite replaces an earlier run's outputs). Every flag and the workdir are checked
before the model loads; progress is logged per workload with an ETA.

  python -m kvtpu.experiments.calibrate --model=smollm2-135m --workloads=prose,code \\
      --kv_format=int8-channel --method=percentile --num_tokens=16384

With --plan_high it chooses formats per layer instead (`kvtpu.models.runs.calibrate`):

  python -m kvtpu.experiments.calibrate --workloads=prose,code --seq_len=512 --batch=1 \\
      --kv_format=int2-nu-sbf16-rot+sink4+recent124 --plan_bits=2.75 \\
      --plan_high=k=int4-nu-sbf16-rot,v=int2-nu-sbf16-rot+sink4+recent124
"""

from __future__ import annotations

import dataclasses

from absl import flags
from kvtpu.experiments.common import (
  check_argv,
  define_workdir_flags,
  run_main,
  usage_errors,
  workdir_options,
  workload_names,
)
from kvtpu.models.runs import calibrate as calibrate_run

FLAGS = flags.FLAGS
_DEFAULTS = calibrate_run.CalibrateConfig()


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
  """The binary's flags, on `fv`: one per `CalibrateConfig` field, and the workdir flags."""
  d = _DEFAULTS
  flags.DEFINE_string("model", d.model, "load_pretrained name or path.", flag_values=fv)
  flags.DEFINE_list("workloads", list(d.workloads),
                    "Workload names or .txt/.jsonl files, comma-separated.", flag_values=fv)
  flags.DEFINE_string("kv_format", d.kv_format,
                      "Cache format: static specs (int8-channel, int8-head, ...) get scales, "
                      "dynamic ones (int8, int4-g32, ...) clip ratios.", flag_values=fv)
  flags.DEFINE_enum("method", d.method, list(calibrate_run.METHODS), "Scale method.",
                    flag_values=fv)
  flags.DEFINE_float("percentile", d.percentile, "Clip percentile (method=percentile).",
                     flag_values=fv)
  flags.DEFINE_integer("num_tokens", d.num_tokens, "Tokens per workload (whole batches).",
                       flag_values=fv)
  flags.DEFINE_integer("seq_len", d.seq_len, "Tokens per calibration window.", flag_values=fv)
  flags.DEFINE_integer("batch", d.batch, "Windows per batch.", flag_values=fv)
  flags.DEFINE_integer("learn_steps", d.learn_steps, "Optimizer steps per layer (learned).",
                       flag_values=fv)
  flags.DEFINE_integer("seed", d.seed, "Workload seed.", flag_values=fv)
  flags.DEFINE_string("impl", d.impl, "attend implementation (auto, xla, pallas, interpret).",
                      flag_values=fv)
  flags.DEFINE_string("plan_high", d.plan_high,
                      "Choose formats per layer: the dearer format, given to the layers whose "
                      "attention loses most in --kv_format (the cheaper one); empty: calibrate "
                      "--kv_format.", flag_values=fv)
  flags.DEFINE_float("plan_bits", d.plan_bits,
                     "The per-layer plan's budget: effective bits per stored value.",
                     flag_values=fv)
  flags.DEFINE_integer("plan_context", d.plan_context,
                       "Context (tokens) at which the plan's effective bits are counted.",
                       flag_values=fv)
  define_workdir_flags(fv, "workdir/calibrate")


def config_from_flags(fv: flags.FlagValues = FLAGS) -> calibrate_run.CalibrateConfig:
  """The config the flags describe; an invalid one is a UsageError naming the flag."""
  fields = {f.name: fv[f.name].value for f in dataclasses.fields(calibrate_run.CalibrateConfig)}
  fields["workloads"] = workload_names(fields["workloads"])
  with usage_errors():
    return calibrate_run.CalibrateConfig(**fields)


def main(argv, fv: flags.FlagValues = FLAGS) -> None:
  check_argv(argv)
  config = config_from_flags(fv)
  with usage_errors():
    result = calibrate_run.run(config, fv["workdir"].value, **workdir_options(fv))
  print(result.report)
  print(f"Calibration artifact: {result.paths['artifact']}; report: {result.paths['report.md']}")


if __name__ == "__main__":
  run_main(main, define_flags)
