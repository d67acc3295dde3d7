"""Times decode and prefill attention per cache format, context length and batch.

On a TPU the Pallas kernels run compiled (`--impl=auto`) and each row reports the
HBM bytes the kernel moves (its exact account), that figure over the minimum, and
the achieved bandwidth as a fraction of the chip's HBM roofline. On CPU the XLA
reference is timed and bytes are the minimum. Writes config.json, results.jsonl
and report.md to --workdir.

  python -m kvtpu.experiments.kernel_bench --workdir=workdir/kernel_bench
  python -m kvtpu.experiments.kernel_bench --contexts=2048,32768 --batches=1,8,32   # TPU VM
"""

from __future__ import annotations

import json
import os

import jax
from absl import app, flags, logging
from kvtpu.experiments.common import positive_ints

import kvtpu
from kvtpu import benchmark

_WORKDIR = flags.DEFINE_string("workdir", "workdir/kernel_bench", "Output directory.")
_FORMATS = flags.DEFINE_list("formats", ["bf16", "int8", "int4", "fp8_e4m3", "k8v4"],
                             "KV formats (dynamic scales).")
_CONTEXTS = flags.DEFINE_list("contexts", ["1024", "4096"], "Context lengths (cache max_len).")
_BATCHES = flags.DEFINE_list("batches", ["1", "4"], "Batch sizes.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dimension.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 8, "KV heads.")
_Q_HEADS = flags.DEFINE_integer("q_heads", 32, "Query heads (a multiple of kv_heads).")
_CHUNK = flags.DEFINE_integer("prefill_chunk", 256, "Query tokens of the prefill phase.")
_IMPL = flags.DEFINE_enum("impl", "auto", list(kvtpu.attention.IMPLS), "attend implementation.")
_ITERS = flags.DEFINE_integer("iters", 5, "Timed runs per point (median reported).")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  contexts = positive_ints("contexts", _CONTEXTS.value)
  batches = positive_ints("batches", _BATCHES.value)
  try:
    formats = [kvtpu.KVFormat.parse(f) for f in _FORMATS.value]
  except ValueError as e:
    raise app.UsageError(f"--formats: {e}") from None
  logging.info("jax %s, devices: %s", jax.__version__, jax.devices())
  os.makedirs(_WORKDIR.value, exist_ok=True)
  config = {name: flags.FLAGS[name].value for name in
            ("formats", "contexts", "batches", "head_dim", "kv_heads", "q_heads",
             "prefill_chunk", "impl", "iters")}
  config.update(jax_version=jax.__version__, devices=[str(d) for d in jax.devices()])
  with open(os.path.join(_WORKDIR.value, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  rows = benchmark.attention_rows(
      [f.name for f in formats], contexts, batches, head_dim=_HEAD_DIM.value,
      kv_heads=_KV_HEADS.value, q_heads=_Q_HEADS.value, prefill_chunk=_CHUNK.value,
      impl=_IMPL.value, iters=_ITERS.value, log=logging.info)
  with open(os.path.join(_WORKDIR.value, "results.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  traffic = benchmark.traffic_rows([f.name for f in formats], sorted({2048, 32768, *contexts}),
                                   head_dim=_HEAD_DIM.value, kv_heads=_KV_HEADS.value,
                                   q_heads=_Q_HEADS.value)
  with open(os.path.join(_WORKDIR.value, "traffic.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in traffic)
  table = (benchmark.markdown_table(rows) + "\n\nDecode kernel HBM bytes per step (its exact "
           "account, batch 8) vs the minimum and vs bf16:\n\n" + benchmark.traffic_markdown(traffic))
  report = os.path.join(_WORKDIR.value, "report.md")
  impl = rows[0]["impl"] if rows else _IMPL.value
  with open(report, "w") as f:
    f.write(f"# Attention timing ({impl} on {jax.default_backend()})\n\nWeights: none "
            "(random cache contents). KV precision per row; scales dynamic per token.\n\n"
            f"{table}\n")
  print(table)
  print(f"kernel_bench: timed {len(rows)} points ({impl} on {jax.default_backend()}); "
        f"report: {report}")


if __name__ == "__main__":
  app.run(main)
