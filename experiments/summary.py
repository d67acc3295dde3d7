"""What context length, at what concurrency, each KV-cache precision supports before the
accelerator runs out of memory, and what it costs in accuracy: one table.

Joins the results.jsonl of an evaluate run (`--evaluate_dir`, accuracy against the reference
cache) and of a headroom run of the same model (`--headroom_dir`, the maxima that fit) on
the KV format, and writes config.json, results.jsonl (one row per KV config),
report.md (the table under a header stating model, weights, accelerator, mesh, headroom
mode, evaluation workloads and context, calibration) and capacity_vs_ppl.png (token
capacity against perplexity change, with the Pareto front) to `--workdir`
(`kvtpu.models.runs.summary`). Nothing is measured: it runs in seconds, without a model.

  python -m kvtpu.experiments.summary --evaluate_dir=workdir/evaluate \\
      --headroom_dir=workdir/headroom-smollm2 --workdir=workdir/summary
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
from kvtpu.models.runs import summary as summary_run

FLAGS = flags.FLAGS
_FIELDS = summary_run.SummaryConfig.__dataclass_fields__


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
  """The binary's flags, on `fv`: one per `SummaryConfig` field, and the workdir flags."""
  define_workdir_flags(fv, "workdir/summary")
  flags.DEFINE_string("evaluate_dir", None, "Workdir of an evaluate run (its results.jsonl).",
                      flag_values=fv)
  flags.DEFINE_string("headroom_dir", None, "Workdir of a headroom run of the same model (its "
                      "results.jsonl).", flag_values=fv)
  flags.DEFINE_string("headroom_mode", _FIELDS["headroom_mode"].default,
                      "Whose maxima to show: analytic, aot or live (a mode of the headroom run).",
                      flag_values=fv)
  flags.DEFINE_integer("eval_context", _FIELDS["eval_context"].default,
                       "Evaluation context whose scores to show; 0: the longest scored.",
                       flag_values=fv)
  flags.DEFINE_boolean("allow_model_mismatch", _FIELDS["allow_model_mismatch"].default,
                       "Join runs of different models, stating both in the header, instead of "
                       "refusing.", flag_values=fv)


def config_from_flags(fv: flags.FlagValues = FLAGS) -> summary_run.SummaryConfig:
  """The config the flags describe; an invalid one is a UsageError naming the flag."""
  with usage_errors():
    return summary_run.SummaryConfig(
        **{name: fv[name].value for name in _FIELDS})


def main(argv, fv: flags.FlagValues = FLAGS) -> None:
  check_argv(argv)
  config = config_from_flags(fv)
  with usage_errors():
    result = summary_run.run(config, fv["workdir"].value, **workdir_options(fv))
  print(result.table)
  front = [r["label"] for r in result.rows if r["pareto"]]
  first = result.rows[0] if result.rows else {}
  print(f"Summary: {len(result.rows)} KV configs of {first.get('model', '-')} on "
        f"{first.get('accelerator', '-')} ({config.headroom_mode} headroom; accuracy at context "
        f"{first.get('eval_context', '-')}); Pareto front: {', '.join(front) or '-'}; "
        f"{result.seconds:.1f} s; report: {result.paths['report']} (rows in results.jsonl, "
        f"plot {result.paths['plot'].name}, config in config.json)")


if __name__ == "__main__":
  run_main(main, define_flags)
