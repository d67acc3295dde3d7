"""Times decode and prefill attention per cache format, context length and batch.

On a TPU the Pallas kernels run compiled (`--impl=auto`) and each row reports the
HBM bytes the kernel moves (its exact account), that figure over the minimum, and
the achieved bandwidth in % of the chip's HBM roofline. On CPU the XLA reference is
timed and bytes are the minimum. Writes config.json, results.jsonl, traffic.jsonl and
report.md to --workdir (`kvtpu.models.runs.kernel_bench`).

  python -m kvtpu.experiments.kernel_bench --workdir=workdir/kernel_bench
  python -m kvtpu.experiments.kernel_bench --contexts=2048,32768 --batches=1,8,32   # TPU VM
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
from kvtpu.models.runs import kernel_bench as kernel_bench_run

FLAGS = flags.FLAGS
_DEFAULTS = kernel_bench_run.KernelBenchConfig()


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
  """The binary's flags, on `fv`: one per `KernelBenchConfig` field, and the workdir flags."""
  d = _DEFAULTS
  define_workdir_flags(fv, "workdir/kernel_bench")
  flags.DEFINE_list("formats", list(d.formats), "KV formats (dynamic scales).", flag_values=fv)
  flags.DEFINE_list("contexts", [str(c) for c in d.contexts], "Context lengths (cache max_len).",
                    flag_values=fv)
  flags.DEFINE_list("batches", [str(b) for b in d.batches], "Batch sizes.", flag_values=fv)
  flags.DEFINE_integer("head_dim", d.head_dim, "Head dimension.", flag_values=fv)
  flags.DEFINE_integer("kv_heads", d.kv_heads, "KV heads.", flag_values=fv)
  flags.DEFINE_integer("q_heads", d.q_heads, "Query heads (a multiple of kv_heads).",
                       flag_values=fv)
  flags.DEFINE_integer("prefill_chunk", d.prefill_chunk, "Query tokens of the prefill phase.",
                       flag_values=fv)
  flags.DEFINE_string("impl", d.impl, "attend implementation (auto, xla, pallas, interpret).",
                      flag_values=fv)
  flags.DEFINE_integer("iters", d.iters, "Timed runs per point (median reported).",
                       flag_values=fv)


def config_from_flags(fv: flags.FlagValues = FLAGS) -> kernel_bench_run.KernelBenchConfig:
  """The config the flags describe; an invalid one is a UsageError naming the flag."""
  fields = {f.name: fv[f.name].value
            for f in dataclasses.fields(kernel_bench_run.KernelBenchConfig)}
  fields["formats"] = format_names(fields["formats"])
  with usage_errors():
    return kernel_bench_run.KernelBenchConfig(**fields)


def main(argv, fv: flags.FlagValues = FLAGS) -> None:
  check_argv(argv)
  config = config_from_flags(fv)
  with usage_errors():
    result = kernel_bench_run.run(config, fv["workdir"].value, **workdir_options(fv))
  impl = result.rows[0]["impl"] if result.rows else config.impl
  print(result.tables)
  print(f"kernel_bench: timed {len(result.rows)} points ({impl} on {jax.default_backend()}); "
        f"report: {result.paths['report']}")


if __name__ == "__main__":
  run_main(main, define_flags)
