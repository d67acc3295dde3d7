"""Generates text with a pretrained model on a quantized KV cache, and times it.

Encodes each `--prompt` (as a user turn of the model's chat template unless --nochat),
generates a ragged batch with `kvtpu.models.generate`, prints each completion and one
line of figures: model, weight precision, KV format, prompt and generated tokens,
prefill and decode tokens/s (a warm call unless --nowarmup). With --workdir it also
writes config.json, results.jsonl (a row per prompt) and report.md
(`kvtpu.models.runs.generate`).

  python -m kvtpu.experiments.generate --model=smollm2-135m --kv_format=int8 \\
      --prompt="What is the capital of France?" --max_new_tokens=32
  python -m kvtpu.experiments.generate --prompt="Hi" --prompt="Name three colors." --temperature=0.7
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
)
from kvtpu.models.runs import generate as generate_run

FLAGS = flags.FLAGS
_DEFAULTS = generate_run.GenerateConfig()


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
  """The binary's flags, on `fv`: one per `GenerateConfig` field, and the workdir flags."""
  d = _DEFAULTS
  flags.DEFINE_string("model", d.model, "load_pretrained name, .gguf file or checkpoint folder.",
                      flag_values=fv)
  flags.DEFINE_multi_string("prompt", list(d.prompt),
                            "A prompt; repeat the flag for a (ragged) batch.", flag_values=fv)
  flags.DEFINE_integer("max_new_tokens", d.max_new_tokens, "Most tokens generated per prompt.",
                       flag_values=fv)
  flags.DEFINE_string("kv_format", d.kv_format, "KV-cache format (bf16, int8, k8v4, ...).",
                      flag_values=fv)
  flags.DEFINE_boolean("chat", d.chat, "Wrap each prompt in the chat template as a user turn.",
                       flag_values=fv)
  flags.DEFINE_float("temperature", d.temperature, "0: greedy; > 0: sampling.", flag_values=fv)
  flags.DEFINE_float("top_p", d.top_p, "Nucleus sampling mass, in (0, 1].", flag_values=fv)
  flags.DEFINE_integer("top_k", d.top_k, "Sample among the k most likely tokens only.",
                       flag_values=fv)
  flags.DEFINE_integer("seed", d.seed, "Seed of the sampling key.", flag_values=fv)
  flags.DEFINE_string("impl", d.impl, "attend implementation (auto, xla, pallas, interpret).",
                      flag_values=fv)
  flags.DEFINE_string("param_dtype", d.param_dtype,
                      "dtype the weights are converted to (and computed in): float32, bfloat16.",
                      flag_values=fv)
  flags.DEFINE_boolean("warmup", d.warmup,
                       "Time a second, warm call (compile excluded) after a warm-up call.",
                       flag_values=fv)
  define_workdir_flags(fv, None, what="Optional output directory")


def config_from_flags(fv: flags.FlagValues = FLAGS) -> generate_run.GenerateConfig:
  """The config the flags describe; an invalid one is a UsageError naming the flag."""
  with usage_errors():
    return generate_run.GenerateConfig(
        **{f.name: fv[f.name].value for f in dataclasses.fields(generate_run.GenerateConfig)})


def main(argv, fv: flags.FlagValues = FLAGS) -> None:
  check_argv(argv)
  config = config_from_flags(fv)
  with usage_errors():
    generate_run.run(config, fv["workdir"].value, **workdir_options(fv))


if __name__ == "__main__":
  run_main(main, define_flags)
