"""TPU self-check: the compiled kernels against the references, on a TPU VM.

Runs every kernel compiled, per cache format and head dim, at the edge lengths of its
KV block in a ragged batch, against the XLA reference and interpret mode; then the
kernel_bench table with each point's fraction of the HBM roofline; then a short
SmolLM2 evaluation with the kernels and with the XLA reference. Prints one verdict
line per check (PASS / FAIL) and, last, the summary and where the report is; exits 1
if any check failed. Off TPU it says so and exits 2 without running anything
(`kvtpu.models.runs.tpu_check`).

  make tpu-check                                   # on a TPU VM
  python -m kvtpu.experiments.tpu_check --workdir=workdir/tpu_check --noevaluate
"""

from __future__ import annotations

import dataclasses
import sys

from absl import flags
from kvtpu.experiments.common import (
  check_argv,
  define_workdir_flags,
  format_names,
  run_main,
  usage_errors,
  workdir_options,
)
from kvtpu.models.runs import tpu_check as tpu_check_run

FLAGS = flags.FLAGS
_DEFAULTS = tpu_check_run.TpuCheckConfig()


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
  """The binary's flags, on `fv`: one per `TpuCheckConfig` field, and the workdir flags."""
  d = _DEFAULTS
  define_workdir_flags(fv, "workdir/tpu_check")
  flags.DEFINE_list("formats", list(d.formats), "Cache formats of the kernel checks.",
                    flag_values=fv)
  flags.DEFINE_list("head_dims", [str(h) for h in d.head_dims], "Head dims of the kernel checks.",
                    flag_values=fv)
  flags.DEFINE_string("impl", d.impl, "The implementation checked: pallas (compiled, needs a "
                      "TPU) or interpret.", flag_values=fv)
  flags.DEFINE_boolean("interpret", d.interpret, "Also compare the compiled kernels with "
                       "interpret mode.", flag_values=fv)
  flags.DEFINE_boolean("kernel_bench", d.kernel_bench, "Run the kernel_bench table.",
                       flag_values=fv)
  flags.DEFINE_boolean("evaluate", d.evaluate, "Run the short SmolLM2 evaluation, kernels "
                       "vs the XLA reference.", flag_values=fv)
  flags.DEFINE_float("rtol", d.rtol, "Kernel bound, relative to the largest |output|.",
                     flag_values=fv)
  flags.DEFINE_float("eval_rtol", d.eval_rtol, "Bound on the relative perplexity difference.",
                     flag_values=fv)


def config_from_flags(fv: flags.FlagValues = FLAGS) -> tpu_check_run.TpuCheckConfig:
  """The config the flags describe; an invalid one is a UsageError naming the flag."""
  fields = {f.name: fv[f.name].value for f in dataclasses.fields(tpu_check_run.TpuCheckConfig)}
  fields["formats"] = format_names(fields["formats"])
  with usage_errors():
    return tpu_check_run.TpuCheckConfig(**fields)


def main(argv, fv: flags.FlagValues = FLAGS) -> None:
  check_argv(argv)
  config = config_from_flags(fv)
  try:
    with usage_errors():
      result = tpu_check_run.run(config, fv["workdir"].value, **workdir_options(fv))
  except tpu_check_run.NotOnTpu as e:
    sys.stderr.write(f"tpu_check: {e}\n")
    sys.exit(2)
  sys.exit(0 if result.passed else 1)


if __name__ == "__main__":
  run_main(main, define_flags)
