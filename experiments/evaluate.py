"""Accuracy of each KV-cache precision under deployment-shaped workloads.

For a model and its weights as loaded, and apart from them: how much does each cache
format change the model's output, on which workload, at which context length and
concurrency, with scales calibrated on which workload? Writes config.json, the
calibration artifacts made, results.jsonl, report.md and PNG plots to `--workdir`
(`kvtpu.models.runs.evaluate`, where the matrix and the presets are described).

Presets set every matrix flag not given on the command line:
  quick  SmolLM2 on 2 CPU cores in under 15 minutes (what `make run` runs)
  full   the whole matrix, for a TPU VM
  none   every matrix flag given

  python -m kvtpu.experiments.evaluate --preset=quick --workdir=workdir/evaluate
"""

from __future__ import annotations

from absl import app, flags
from kvtpu.experiments.common import check_argv, format_names, usage_errors
from kvtpu.models.runs import evaluate as evaluate_run

FLAGS = flags.FLAGS
_FORMAT_FLAGS = ("kv_formats", "calibrate_formats", "passkey_formats")


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
  """The binary's flags, on `fv`: one per `EvaluateConfig` field, and --workdir."""
  d = evaluate_run.EvaluateConfig.__dataclass_fields__
  flags.DEFINE_enum("preset", "quick", list(evaluate_run.PRESETS),
                    "Defaults for every matrix flag not given explicitly.", flag_values=fv)
  flags.DEFINE_string("model", d["model"].default, "load_pretrained name or path.",
                      flag_values=fv)
  flags.DEFINE_list("kv_formats", None, "Formats scored with dynamic scales.", flag_values=fv)
  flags.DEFINE_list("calibrate_formats", None,
                    "Formats calibrated on each calibration workload (static scales or the clip "
                    "ratios of dynamic formats).", flag_values=fv)
  flags.DEFINE_list("calibration_workloads", None, "Workloads (names or files) to calibrate on.",
                    flag_values=fv)
  flags.DEFINE_string("calibration_method", None, "Scale / clip method: absmax, percentile, mse "
                      "or learned.", flag_values=fv)
  flags.DEFINE_integer("calibration_tokens", None, "Calibration tokens per workload.",
                       flag_values=fv)
  flags.DEFINE_list("artifacts", [], "Existing calibration artifacts to score too.",
                    flag_values=fv)
  flags.DEFINE_list("eval_workloads", None, "Workloads to evaluate on.", flag_values=fv)
  flags.DEFINE_list("contexts", None, "Context lengths (tokens).", flag_values=fv)
  flags.DEFINE_list("batches", None, "Batch sizes (concurrent ragged sequences).",
                    flag_values=fv)
  flags.DEFINE_integer("prefill", None, "Tokens of the first chunk.", flag_values=fv)
  flags.DEFINE_integer("chunk", None, "Tokens per later chunk (1: pure decode).", flag_values=fv)
  flags.DEFINE_string("reference", d["reference"].default, "Reference cache format.",
                      flag_values=fv)
  flags.DEFINE_list("passkey_lengths", None, "Passkey prompt lengths.", flag_values=fv)
  flags.DEFINE_list("passkey_depths", None, "Passkey relative depths.", flag_values=fv)
  flags.DEFINE_integer("passkey_samples", None, "Keys per length and depth.", flag_values=fv)
  flags.DEFINE_list("passkey_formats", None, "Dynamic formats to run passkey retrieval for.",
                    flag_values=fv)
  flags.DEFINE_integer("seed", d["seed"].default, "Workload seed.", flag_values=fv)
  flags.DEFINE_string("impl", d["impl"].default,
                      "attend implementation (auto, xla, pallas, interpret).", flag_values=fv)
  flags.DEFINE_string("workdir", "workdir/evaluate", "Output directory.", flag_values=fv)


def config_from_flags(fv: flags.FlagValues = FLAGS) -> evaluate_run.EvaluateConfig:
  """The config the flags describe: the preset's matrix, overridden by the matrix flags
  given; an invalid one is a UsageError naming the flag."""
  fields = {name: fv[name].value for name in ("model", "artifacts", "reference", "seed", "impl")}
  for name in evaluate_run.MATRIX_FIELDS:
    if fv[name].present or fv["preset"].value == "none":
      fields[name] = fv[name].value
  for name in _FORMAT_FLAGS:
    if fields.get(name) is not None:
      fields[name] = format_names(fields[name])
  with usage_errors():
    return evaluate_run.EvaluateConfig.from_preset(fv["preset"].value, **fields)


def main(argv) -> None:
  check_argv(argv)
  config = config_from_flags()
  result = evaluate_run.run(config, FLAGS.workdir)
  print(result.report)
  print(f"Report: {result.paths['report']}; results: {result.paths['results']}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
