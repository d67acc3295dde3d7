"""Serves one request trace on each KV-cache precision with continuous batching.

Each format serves the same trace (a JSONL file, or seeded Poisson arrivals with named
prompt and output length distributions) on a paged cache of what `--hbm_gib` leaves
after the weights, and reports concurrency before and after the pool runs out,
preemptions, tokens/s, TTFT and TPOT percentiles, pages, and how many requests give
the first format's output token for token (`kvtpu.models.runs.serve`). Writes
config.json, results.jsonl, requests.jsonl, report.md and inflight.png.

  python -m kvtpu.experiments.serve --kv_formats=bf16,int8 --hbm_gib=0.6 \\
      --rate=50 --num_requests=32 --workdir=/tmp/serve
  python -m kvtpu.experiments.serve --trace=requests.jsonl --workdir=/tmp/serve-trace
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
from kvtpu.models.runs import serve as serve_run

FLAGS = flags.FLAGS
_DEFAULTS = serve_run.ServeConfig()


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
  """The binary's flags, on `fv`: one per `ServeConfig` field, and the workdir flags."""
  d = _DEFAULTS
  s, i, f, ls = flags.DEFINE_string, flags.DEFINE_integer, flags.DEFINE_float, flags.DEFINE_list
  s("model", d.model, "load_pretrained name, .gguf file or checkpoint folder.", flag_values=fv)
  ls("kv_formats", list(d.kv_formats),
     "KV-cache formats served, comma-separated; the first is the accuracy reference.",
     flag_values=fv)
  s("trace", d.trace, "A JSONL trace (kvtpu.eval.traffic); empty: the Poisson generator.",
    flag_values=fv)
  s("prompts", d.prompts, "Generator: chat (the chat workload's questions in the model's "
    "template, ending at a stop id or the output_len budget) or filler (prompt_len tokens "
    "of --filler, exact output lengths).", flag_values=fv)
  f("rate", d.rate, "Generator: requests per second (Poisson arrivals).", flag_values=fv)
  i("num_requests", d.num_requests, "Generator: requests.", flag_values=fv)
  s("prompt_len", d.prompt_len, "Generator: prompt length distribution (fixed:N, "
    "uniform:low=,high=, lognormal:median=,sigma=,max=).", flag_values=fv)
  s("output_len", d.output_len, "Generator: output length distribution (chat: the budget; "
    "filler: exact lengths).", flag_values=fv)
  i("seed", d.seed, "Seed of the generator, the filler workload and sampling.", flag_values=fv)
  s("filler", d.filler, "Workload whose tokens fill prompts given by length.", flag_values=fv)
  f("hbm_gib", d.hbm_gib, "Memory per device for weights, cache and workspace (GiB): a CPU "
    "run models a chip by it.", flag_values=fv)
  f("workspace_gib", d.workspace_gib, "Of --hbm_gib, kept for activations (GiB).",
    flag_values=fv)
  i("slots", d.slots, "Requests in flight at most.", flag_values=fv)
  i("page_len", d.page_len, "Positions per page.", flag_values=fv)
  i("chunk", d.chunk, "Prompt tokens per request per step at most.", flag_values=fv)
  i("max_len", d.max_len, "Positions per request at most (prompt + output).", flag_values=fv)
  f("temperature", d.temperature, "0: greedy; > 0: sampling.", flag_values=fv)
  f("top_p", d.top_p, "Nucleus sampling mass, in (0, 1].", flag_values=fv)
  i("top_k", d.top_k, "Sample among the k most likely tokens only.", flag_values=fv)
  s("impl", d.impl, "attend implementation (auto, xla, pallas, interpret).", flag_values=fv)
  s("param_dtype", d.param_dtype, "dtype of the weights: float32, bfloat16.", flag_values=fv)
  s("mesh", d.mesh, "data:<n>,model:<m>: slots over data, kv heads and weights over model "
    "(--hbm_gib is then per device).", flag_values=fv)
  s("strategy", d.strategy, "kv heads over the model axis: auto, heads, replicate, sequence.",
    flag_values=fv)
  flags.DEFINE_bool("exact_reference", d.exact_reference, "Also serve the trace on an f32 "
                    "cache and report each format's outputs identical to it.", flag_values=fv)
  define_workdir_flags(fv, "workdir/serve")


def config_from_flags(fv: flags.FlagValues = FLAGS) -> serve_run.ServeConfig:
  """The config the flags describe; an invalid one is a UsageError naming the flag."""
  with usage_errors():
    return serve_run.ServeConfig(
        **{f.name: fv[f.name].value for f in dataclasses.fields(serve_run.ServeConfig)})


def main(argv, fv: flags.FlagValues = FLAGS) -> None:
  check_argv(argv)
  config = config_from_flags(fv)
  with usage_errors():
    serve_run.run(config, fv["workdir"].value, **workdir_options(fv))


if __name__ == "__main__":
  run_main(main, define_flags)
