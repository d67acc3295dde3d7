"""Accuracy of each KV-cache precision under deployment-shaped workloads.

For a model and its weights as loaded, and apart from them: how much does each cache
format change the model's output, on which workload, at which context length and
concurrency, with scales calibrated on which workload? Writes config.json, the
calibration artifacts made, results.jsonl (a row per result, appended as each item
finishes), report.md and PNG plots to `--workdir` (`kvtpu.models.runs.evaluate`, where
the matrix and the presets are described).

Presets set every matrix flag not given on the command line (--help shows each preset's
values beside each flag):
  quick  SmolLM2 on 2 CPU cores in under 15 minutes (what `make run` runs)
  full   the whole matrix, for a TPU VM
  none   every matrix flag given

--workdir must be new or empty; --resume continues an interrupted run there (only the
items missing from its results.jsonl are computed), --overwrite replaces its outputs.

  python -m kvtpu.experiments.evaluate --preset=quick --workdir=workdir/evaluate
"""

from __future__ import annotations

from absl import flags
from kvtpu.experiments.common import (
  check_argv,
  define_workdir_flags,
  format_names,
  run_main,
  usage_errors,
  workdir_options,
  workload_names,
)
from kvtpu.models.runs import evaluate as evaluate_run

FLAGS = flags.FLAGS
_FORMAT_FLAGS = ("kv_formats", "calibrate_formats", "passkey_formats")


def _with_presets(name: str, text: str) -> str:
  """A matrix flag's help: `text`, then the value each preset gives the flag."""
  def show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple | list) else str(value)
  values = "; ".join(f"{preset}: {show(fields[name])}"
                     for preset, fields in evaluate_run.PRESETS.items() if name in fields)
  return f"{text} Preset values (when not given) -- {values}."


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
  """The binary's flags, on `fv`: one per `EvaluateConfig` field, and the workdir flags."""
  d = evaluate_run.EvaluateConfig.__dataclass_fields__
  p = _with_presets
  flags.DEFINE_enum("preset", "quick", list(evaluate_run.PRESETS),
                    "Defaults for every matrix flag not given explicitly.", flag_values=fv)
  flags.DEFINE_string("model", d["model"].default, "load_pretrained name or path.",
                      flag_values=fv)
  flags.DEFINE_list("kv_formats", None, p("kv_formats", "Formats scored with dynamic scales."),
                    flag_values=fv)
  flags.DEFINE_list("calibrate_formats", None, p(
      "calibrate_formats", "Formats calibrated on each calibration workload (static scales or "
      "the clip ratios of dynamic formats)."), flag_values=fv)
  flags.DEFINE_list("calibration_workloads", None, p(
      "calibration_workloads", "Workloads (names or files) to calibrate on."), flag_values=fv)
  flags.DEFINE_string("calibration_method", None, p(
      "calibration_method", "Scale / clip method: absmax, percentile, mse or learned."),
      flag_values=fv)
  flags.DEFINE_integer("calibration_tokens", None, p(
      "calibration_tokens", "Calibration tokens per workload (at least one 512-token "
      "window)."), flag_values=fv)
  flags.DEFINE_list("artifacts", [], "Existing calibration artifacts to score too.",
                    flag_values=fv)
  flags.DEFINE_list("eval_workloads", None, p("eval_workloads", "Workloads to evaluate on."),
                    flag_values=fv)
  flags.DEFINE_list("contexts", None, p("contexts", "Context lengths (tokens)."), flag_values=fv)
  flags.DEFINE_list("batches", None, p("batches", "Batch sizes (concurrent ragged sequences)."),
                    flag_values=fv)
  flags.DEFINE_integer("prefill", None, p("prefill", "Tokens of the first chunk."),
                       flag_values=fv)
  flags.DEFINE_integer("chunk", None, p("chunk", "Tokens per later chunk (1: pure decode)."),
                       flag_values=fv)
  flags.DEFINE_string("reference", d["reference"].default, "Reference cache format.",
                      flag_values=fv)
  flags.DEFINE_list("passkey_lengths", None, p("passkey_lengths", "Passkey prompt lengths."),
                    flag_values=fv)
  flags.DEFINE_list("passkey_depths", None, p("passkey_depths", "Passkey relative depths."),
                    flag_values=fv)
  flags.DEFINE_integer("passkey_samples", None, p("passkey_samples",
                                                  "Keys per length and depth."), flag_values=fv)
  flags.DEFINE_list("passkey_formats", None, p(
      "passkey_formats", "Formats to run passkey retrieval for: with dynamic scales, and with "
      "each calibration of the format that --calibrate_formats makes."), flag_values=fv)
  flags.DEFINE_integer("seed", d["seed"].default, "Workload seed.", flag_values=fv)
  flags.DEFINE_string("impl", d["impl"].default,
                      "attend implementation (auto, xla, pallas, interpret).", flag_values=fv)
  define_workdir_flags(fv, "workdir/evaluate", resumable=True)


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
  for name in ("calibration_workloads", "eval_workloads"):
    if fields.get(name) is not None:
      fields[name] = workload_names(fields[name])
  with usage_errors():
    return evaluate_run.EvaluateConfig.from_preset(fv["preset"].value, **fields)


def main(argv, fv: flags.FlagValues = FLAGS) -> None:
  check_argv(argv)
  config = config_from_flags(fv)
  with usage_errors():
    result = evaluate_run.run(config, fv["workdir"].value, **workdir_options(fv))
  print(result.report)
  print(f"Report: {result.paths['report']}; results: {result.paths['results']}")


if __name__ == "__main__":
  run_main(main, define_flags)
