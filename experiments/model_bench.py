"""Times whole-model prefill and decode per KV-cache format and context length.

For each format and context C, a batch of random prompts of C - decode_tokens tokens
goes through `kvtpu.models.generate` (cache max_len: C rounded up to 128; no stop
ids, so every row decodes `decode_tokens` tokens): a warm-up call compiles, a second
call with the same shapes is timed. Each row of `<workdir>/results.jsonl` has the
weight precision and the KV format as separate fields, prefill and decode tokens/s
and ms per decode step; an out-of-memory point is a row with `oom: true`. Also writes
config.json and report.md, and prints the table.

  python -m kvtpu.experiments.model_bench --workdir=workdir/model_bench
  python -m kvtpu.experiments.model_bench --kv_formats=bf16,int8,int4 --contexts=2048,8192 --batch=8
  python -m kvtpu.experiments.model_bench --model=tiny --contexts=128   # random weights, smoke test
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx
from kvtpu.experiments.common import positive_ints
from kvtpu.models.config import ModelConfig
from kvtpu.models.generation import generate
from kvtpu.models.llama import Llama
from kvtpu.models.pretrained import load_pretrained

import kvtpu

_WORKDIR = flags.DEFINE_string("workdir", "workdir/model_bench", "Output directory.")
_MODEL = flags.DEFINE_string(
    "model", "smollm2-135m",
    "load_pretrained name, .gguf file or checkpoint folder; `tiny`: a 1-layer random model.")
_KV_FORMATS = flags.DEFINE_list("kv_formats", ["bf16", "int8"], "KV-cache formats.")
_CONTEXTS = flags.DEFINE_list("contexts", ["512", "4096"],
                              "Context lengths: prompt + decoded tokens per sequence.")
_BATCH = flags.DEFINE_integer("batch", 1, "Sequences per batch.")
_DECODE_TOKENS = flags.DEFINE_integer("decode_tokens", 32, "Tokens decoded per sequence.")
_IMPL = flags.DEFINE_enum("impl", "auto", list(kvtpu.attention.IMPLS), "attend implementation.")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"],
                                 "dtype the weights are converted to (and computed in).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random prompts.")

# `--model=tiny`: tests/models/test_llama.py's TINY with one layer, random weights (a
# smoke test of the binary; its figures mean nothing).
TINY = ModelConfig("tiny", vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=1,
                   num_heads=6, num_kv_heads=2, head_dim=16, tie_embeddings=True,
                   max_position=8192)


def load_model(name: str, param_dtype) -> Llama:
  """`tiny` (random weights) or a `load_pretrained` model."""
  if name == "tiny":
    dtype = jnp.dtype(param_dtype)
    return Llama(TINY, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype,
                 weight_precision=f"random init ({dtype.name})")
  return load_pretrained(name, param_dtype=param_dtype)[0]


def _is_oom(e: Exception) -> bool:
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def measure(model, kv_formats: Sequence[str], contexts: Sequence[int], *, batch: int,
            decode_tokens: int, impl: str = "auto", seed: int = 0,
            log: Callable[..., Any] = logging.info) -> list[dict[str, Any]]:
  """One row per (format, context): warm prefill and decode throughput of `generate`.

  Raises:
    ValueError: for a context <= decode_tokens.
  """
  rows = []
  for context in contexts:
    if context <= decode_tokens:
      raise ValueError(f"context={context} must exceed decode_tokens={decode_tokens}")
  rng = np.random.default_rng(seed)
  for context in contexts:
    prompts = rng.integers(0, model.cfg.vocab_size, (batch, context - decode_tokens)).tolist()
    for fmt in kv_formats:
      row: dict[str, Any] = dict(
          model=model.cfg.name, weight_precision=model.weight_precision,
          kv_format=kvtpu.KVFormat.parse(fmt).name, impl=impl, backend=jax.default_backend(),
          context=context, batch=batch, prompt_tokens=context - decode_tokens,
          decode_tokens=decode_tokens, oom=False)
      try:
        kwargs = dict(max_new_tokens=decode_tokens, kv_format=fmt, impl=impl)
        generate(model, prompts, **kwargs)  # Warm-up: compiles.
        result = generate(model, prompts, **kwargs)
      except Exception as e:  # An out-of-memory point is data; anything else is a bug.
        if not _is_oom(e):
          raise
        row.update(oom=True, error=str(e).splitlines()[0][:300])
        log("%s context %d batch %d: out of memory", fmt, context, batch)
        rows.append(row)
        continue
      row.update(
          prefill_seconds=result.prefill_seconds, decode_seconds=result.decode_seconds,
          decode_steps=result.decode_steps,
          prefill_tokens_per_s=result.prefill_tokens_per_s,
          decode_tokens_per_s=result.decode_tokens_per_s,
          ms_per_decode_step=1e3 * result.decode_seconds / max(result.decode_steps, 1),
          cache_bytes=result.cache.nbytes, max_len=result.cache.max_len,
          warm=not result.compiled)
      log("%s context %d batch %d: prefill %.1f tok/s, decode %.1f tok/s, %.2f ms/step", fmt,
          context, batch, row["prefill_tokens_per_s"], row["decode_tokens_per_s"],
          row["ms_per_decode_step"])
      rows.append(row)
  return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
  """The rows as a markdown table; weight precision and KV format in separate columns."""
  lines = ["| weights | KV format | context | batch | prefill tok/s | decode tok/s | "
           "ms / decode step | cache MiB |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if r["oom"]:
      figures = ["OOM"] * 4
    else:
      figures = [f"{r['prefill_tokens_per_s']:.1f}", f"{r['decode_tokens_per_s']:.1f}",
                 f"{r['ms_per_decode_step']:.2f}", f"{r['cache_bytes'] / 2**20:.2f}"]
    lines.append("| " + " | ".join([r["weight_precision"], r["kv_format"], str(r["context"]),
                                     str(r["batch"]), *figures]) + " |")
  return "\n".join(lines)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  contexts = positive_ints("contexts", _CONTEXTS.value)
  if _BATCH.value < 1 or _DECODE_TOKENS.value < 1:
    raise app.UsageError(f"--batch and --decode_tokens must be >= 1, got {_BATCH.value}, "
                         f"{_DECODE_TOKENS.value}")
  if min(contexts) <= _DECODE_TOKENS.value:
    raise app.UsageError(f"--contexts must exceed --decode_tokens={_DECODE_TOKENS.value}, got "
                         f"{contexts}")
  try:
    formats = [kvtpu.KVFormat.parse(f).name for f in _KV_FORMATS.value]
  except ValueError as e:
    raise app.UsageError(f"--kv_formats: {e}") from None
  logging.info("jax %s, devices: %s", jax.__version__, jax.devices())
  model = load_model(_MODEL.value, jnp.dtype(_PARAM_DTYPE.value))
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  config = {name: flags.FLAGS[name].value for name in
            ("model", "kv_formats", "contexts", "batch", "decode_tokens", "impl", "param_dtype",
             "seed", "workdir")}
  config.update(jax_version=jax.__version__, kvtpu_version=kvtpu.__version__,
                devices=[str(d) for d in jax.devices()], model_name=model.cfg.name,
                weight_precision=model.weight_precision)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  rows = measure(model, formats, contexts, batch=_BATCH.value,
                 decode_tokens=_DECODE_TOKENS.value, impl=_IMPL.value, seed=_SEED.value)
  with open(os.path.join(workdir, "results.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  table = markdown_table(rows)
  report = os.path.join(workdir, "report.md")
  with open(report, "w") as f:
    f.write(f"# Model throughput: {model.cfg.name} ({_IMPL.value} on {jax.default_backend()})\n\n"
            f"Weights: {model.weight_precision}. KV precision per row; dynamic per-token "
            f"scales. Random prompts of context - {_DECODE_TOKENS.value} tokens, then "
            f"{_DECODE_TOKENS.value} decoded tokens per sequence; timed on a second, warm "
            "call (compile excluded). Decode tok/s counts every generated token once "
            "(the step that writes it to the cache).\n\n" + table + "\n")
  print(table)
  print(f"model_bench: {len(rows)} points ({model.cfg.name}, {_IMPL.value} on "
        f"{jax.default_backend()}); report: {report}")


if __name__ == "__main__":
  app.run(main)
