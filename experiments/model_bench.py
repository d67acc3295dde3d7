"""Times whole-model prefill and decode per KV-cache format and context length.

For each format and context C, a batch of random prompts of C - decode_tokens tokens
goes through `kvtpu.models.generate`: a warm-up call compiles, a second call with the
same shapes is timed (`kvtpu.models.runs.model_bench`). Writes config.json,
results.jsonl (weight precision and KV format as separate fields; an out-of-memory
point is a row with `oom: true`) and report.md to --workdir, and prints the table.

  python -m kvtpu.experiments.model_bench --workdir=workdir/model_bench
  python -m kvtpu.experiments.model_bench --kv_formats=bf16,int8,int4 --contexts=2048,8192 --batch=8
  python -m kvtpu.experiments.model_bench --model=tiny --contexts=128   # random weights, smoke test
"""

from __future__ import annotations

import dataclasses

import jax
from absl import flags
from kvtpu.experiments.common import (
  check_argv,
  define_workdir_flags,
  format_names,
  run_main,
  usage_errors,
  workdir_options,
)
from kvtpu.models.runs import model_bench as model_bench_run

FLAGS = flags.FLAGS
_DEFAULTS = model_bench_run.ModelBenchConfig()


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
  """The binary's flags, on `fv`: one per `ModelBenchConfig` field, and the workdir flags."""
  d = _DEFAULTS
  define_workdir_flags(fv, "workdir/model_bench")
  flags.DEFINE_string("model", d.model, "load_pretrained name, .gguf file or checkpoint folder; "
                      "`tiny`: a 1-layer random model.", flag_values=fv)
  flags.DEFINE_list("kv_formats", list(d.kv_formats), "KV-cache formats.", flag_values=fv)
  flags.DEFINE_list("contexts", [str(c) for c in d.contexts],
                    "Context lengths: prompt + decoded tokens per sequence.", flag_values=fv)
  flags.DEFINE_integer("batch", d.batch, "Sequences per batch.", flag_values=fv)
  flags.DEFINE_integer("decode_tokens", d.decode_tokens, "Tokens decoded per sequence.",
                       flag_values=fv)
  flags.DEFINE_string("impl", d.impl, "attend implementation (auto, xla, pallas, interpret).",
                      flag_values=fv)
  flags.DEFINE_string("param_dtype", d.param_dtype,
                      "dtype the weights are converted to (and computed in): float32, bfloat16.",
                      flag_values=fv)
  flags.DEFINE_integer("seed", d.seed, "Seed of the random prompts.", flag_values=fv)


def config_from_flags(fv: flags.FlagValues = FLAGS) -> model_bench_run.ModelBenchConfig:
  """The config the flags describe; an invalid one is a UsageError naming the flag."""
  fields = {f.name: fv[f.name].value
            for f in dataclasses.fields(model_bench_run.ModelBenchConfig)}
  fields["kv_formats"] = format_names(fields["kv_formats"])
  with usage_errors():
    return model_bench_run.ModelBenchConfig(**fields)


def main(argv, fv: flags.FlagValues = FLAGS) -> None:
  check_argv(argv)
  config = config_from_flags(fv)
  with usage_errors():
    result = model_bench_run.run(config, fv["workdir"].value, **workdir_options(fv))
  print(result.table)
  print(f"model_bench: {len(result.rows)} points ({result.rows[0]['model']}, {config.impl} on "
        f"{jax.default_backend()}); report: {result.paths['report']}")


if __name__ == "__main__":
  run_main(main, define_flags)
