"""Memory headroom: the longest context and the most sequences each KV precision fits.

For a model (a `kvtpu.models.presets` name), its weight precision, an accelerator slice and
a (`data`, `model`) mesh, solves per KV format: the largest context at each
`--concurrencies` and the largest concurrency at each `--contexts`, with weights +
cache + the decode step's temporaries within each device's HBM less `--reserve`.
Modes (`--modes`, alias `--mode`): analytic, aot, live (`kvtpu.models.runs.headroom`).

Writes to `--workdir`: config.json, results.jsonl (each maximum and the first point
past it, `oom: true`), report.md (tables per mode, the per-device breakdown, the
agreement between modes) and context_vs_concurrency.png. --workdir must be new or empty:
--resume continues an interrupted sweep there (the answers in its results.jsonl are
kept), --overwrite replaces its outputs. The aot and live modes log each answer with an
ETA (an aot answer costs a few compiles, tens of seconds each for Llama-3.1-8B on a
2-core CPU).

  python -m kvtpu.experiments.headroom --model=llama-3.1-8b --weight_dtype=bf16 \\
      --accelerator=v5e-8 --mesh=data:2,model:4 --kv_formats=bf16,int8,fp8_e4m3,int4 \\
      --modes=analytic,aot

On a multi-host TPU slice, run the same command on every host: it calls
`jax.distributed.initialize()` first (`--distributed=auto` detects the slice).
"""

from __future__ import annotations

import dataclasses

from absl import flags
from kvtpu.experiments.common import (
  check_argv,
  define_workdir_flags,
  format_names,
  maybe_initialize_distributed,
  run_main,
  usage_errors,
  workdir_options,
)
from kvtpu.models import presets
from kvtpu.models.runs import headroom as headroom_run

FLAGS = flags.FLAGS
_DEFAULTS = headroom_run.HeadroomConfig()


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
  """The binary's flags, on `fv`: one per `HeadroomConfig` field, --distributed and the
  workdir flags."""
  d = _DEFAULTS
  flags.DEFINE_string("model", d.model, f"Model shape, one of {sorted(presets.PRESETS)}.",
                      flag_values=fv)
  flags.DEFINE_string("weight_dtype", d.weight_dtype,
                      "Storage precision of the weights (reported separately from the KV "
                      "precision): bf16, f32, int8, fp8_e4m3, int4.", flag_values=fv)
  flags.DEFINE_string("accelerator", d.accelerator,
                      "Slice: v5e-8, v6e-8, v5p-8, v5e-256, h100-8, ...", flag_values=fv)
  flags.DEFINE_string("mesh", d.mesh, "Mesh axis sizes; data x model = the slice's devices.",
                      flag_values=fv)
  flags.DEFINE_string("strategy", d.strategy,
                      "kv heads over the model axis (kvtpu.sharding): auto, heads, replicate, "
                      "or sequence (paged questions only: each sequence's pages over the "
                      "model axis).",
                      flag_values=fv)
  flags.DEFINE_list("kv_formats", list(d.kv_formats),
                    "KV-cache formats, or layer plans (formats per layer; analytic mode only).",
                    flag_values=fv)
  flags.DEFINE_list("modes", list(d.modes), "analytic, aot and/or live.", flag_values=fv)
  flags.DEFINE_alias("mode", "modes", flag_values=fv)
  flags.DEFINE_list("concurrencies", [str(c) for c in d.concurrencies],
                    "Concurrencies for the max-context question.", flag_values=fv)
  flags.DEFINE_list("contexts", [str(c) for c in d.contexts],
                    "Contexts for the max-concurrency question.", flag_values=fv)
  flags.DEFINE_integer("block", d.block, "Context step (positions) of the search.",
                       flag_values=fv)
  flags.DEFINE_float("reserve", d.reserve, "Fraction of HBM kept free.", flag_values=fv)
  flags.DEFINE_float("hbm_gib", d.hbm_gib, "Capacity per device for live mode on devices that "
                     "do not report one (CPU).", flag_values=fv)
  flags.DEFINE_string("impl", d.impl,
                      "attend implementation of the live step (aot: pallas).", flag_values=fv)
  flags.DEFINE_list("paged_lengths", list(d.paged_lengths),
                    "Length distributions of requests for the paged-cache question: "
                    "fixed:<n>, uniform:<lo>:<hi>, histogram:<path> (JSON lengths/counts, or "
                    "CSV length,count); empty for none.", flag_values=fv)
  flags.DEFINE_integer("page_len", d.page_len, "Positions per page of the paged cache.",
                       flag_values=fv)
  flags.DEFINE_list("paged_demands", list(d.paged_demands),
                    "What the page pool is sized for: mean and/or p99 of the pages the "
                    "requests hold.", flag_values=fv)
  flags.DEFINE_enum("distributed", "auto", ["auto", "yes", "no"],
                    "jax.distributed.initialize(): auto = on a multi-host TPU slice.",
                    flag_values=fv)
  define_workdir_flags(fv, "workdir/headroom", resumable=True)


def config_from_flags(fv: flags.FlagValues = FLAGS) -> headroom_run.HeadroomConfig:
  """The config the flags describe; an invalid one is a UsageError naming the flag."""
  fields = {f.name: fv[f.name].value for f in dataclasses.fields(headroom_run.HeadroomConfig)}
  fields["kv_formats"] = format_names(fields["kv_formats"])
  with usage_errors():
    return headroom_run.HeadroomConfig(**fields)


def main(argv, fv: flags.FlagValues = FLAGS) -> None:
  check_argv(argv)
  maybe_initialize_distributed(fv["distributed"].value)  # Before jax starts its backend.
  config = config_from_flags(fv)
  with usage_errors():
    result = headroom_run.run(config, fv["workdir"].value, **workdir_options(fv))
  print(result.report)
  print(f"Report: {result.paths['report']}; results: {result.paths['results']}")


if __name__ == "__main__":
  run_main(main, define_flags)
