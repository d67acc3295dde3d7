"""The model_bench run: whole-model prefill and decode throughput per KV format and context.

For each format and context C, a batch of random prompts of C - decode_tokens tokens
goes through `kvtpu.models.generate` (cache max_len: C rounded up to 128; no stop ids,
so every row decodes `decode_tokens` tokens): a warm-up call compiles, a second call
with the same shapes is timed. Each row of results.jsonl (appended as it is measured)
has the weight precision and the KV format as separate fields, prefill and decode
tokens/s and ms per decode step; an out-of-memory point is a row with `oom: true`.
Also writes config.json and report.md.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from kvtpu.models.config import ModelConfig
from kvtpu.models.generation import generate
from kvtpu.models.llama import Llama
from kvtpu.models.pretrained import load_pretrained
from kvtpu.models.runs.common import (
  check,
  check_head_dim,
  check_workdir,
  format_list,
  impl_choice,
  int_list,
  model_name,
  one_of,
  positive_int,
  start,
)

import kvtpu
from kvtpu import reports

__all__ = ["ModelBenchConfig", "ModelBenchResult", "TINY", "load_model", "markdown_table",
           "measure", "run"]

# `model="tiny"`: a 1-layer Llama with random weights (a smoke test; its figures mean nothing).
TINY = ModelConfig("tiny", vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=1,
                   num_heads=6, num_kv_heads=2, head_dim=16, tie_embeddings=True,
                   max_position=8192)
PARAM_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelBenchConfig:
  """A model benchmark (each field is the model_bench binary's flag of the same name).

  Attributes:
    model: `load_pretrained` name or path; "tiny": a 1-layer random model.
    kv_formats: KV-cache formats.
    contexts: prompt + decoded tokens per sequence (each > decode_tokens).
    batch: sequences per batch.
    decode_tokens: tokens decoded per sequence.
    impl: attend implementation.
    param_dtype: dtype the weights are converted to (and computed in).
    seed: seed of the random prompts.
  """

  model: str = "smollm2-135m"
  kv_formats: tuple[str, ...] = ("bf16", "int8")
  contexts: tuple[int, ...] = (512, 4096)
  batch: int = 1
  decode_tokens: int = 32
  impl: str = "auto"
  param_dtype: str = "float32"
  seed: int = 0

  def __post_init__(self):
    model_name("model", self.model, also=("tiny",))
    object.__setattr__(self, "kv_formats", format_list(
        "kv_formats", self.kv_formats, dynamic_only="model_bench runs dynamic-scale caches"))
    object.__setattr__(self, "batch", positive_int("batch", self.batch))
    object.__setattr__(self, "decode_tokens", positive_int("decode_tokens", self.decode_tokens))
    contexts = int_list("contexts", self.contexts)
    check(min(contexts) > self.decode_tokens, "contexts",
          f"expected contexts > decode_tokens={self.decode_tokens}, got {list(contexts)}")
    object.__setattr__(self, "contexts", contexts)
    object.__setattr__(self, "impl", impl_choice("impl", self.impl))
    one_of("param_dtype", self.param_dtype, PARAM_DTYPES)
    object.__setattr__(self, "seed", positive_int("seed", self.seed, low=0))


@dataclasses.dataclass(frozen=True)
class ModelBenchResult:
  """What a model benchmark made: its rows, the table and the paths written."""

  rows: list[dict]
  table: str
  paths: dict[str, Path]


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
            log: Callable[..., Any] = logging.info,
            on_row: Callable[[dict], None] | None = None) -> list[dict[str, Any]]:
  """One row per (format, context): warm prefill and decode throughput of `generate`;
  `on_row(row)` is called as each row is measured.

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
      else:
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
      if on_row is not None:
        on_row(row)
  return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
  """The rows as a markdown table; weight precision and KV format in separate columns."""
  body = []
  for r in rows:
    if r["oom"]:
      figures = ["OOM"] * 4
    else:
      figures = [f"{r['prefill_tokens_per_s']:.1f}", f"{r['decode_tokens_per_s']:.1f}",
                 f"{r['ms_per_decode_step']:.2f}", f"{r['cache_bytes'] / 2**20:.2f}"]
    body.append([r["weight_precision"], r["kv_format"], r["context"], r["batch"], *figures])
  return reports.markdown_table(["weights", "KV format", "context", "batch", "prefill tok/s",
                                 "decode tok/s", "ms / decode step", "cache MiB"], body)


def run(config: ModelBenchConfig, workdir: str | os.PathLike, *,
        overwrite: bool = False) -> ModelBenchResult:
  """Measures every (format, context) of `config` (see the module docstring). The workdir
  rule (`kvtpu.models.runs.common.check_workdir`) is checked before the model loads, the
  formats' groups against its head dim before anything compiles."""
  workdir = check_workdir(workdir, config, overwrite=overwrite)
  model = load_model(config.model, jnp.dtype(config.param_dtype))
  check_head_dim("kv_formats", config.kv_formats, model.cfg.head_dim,
                 f"of model {model.cfg.name}")
  workdir = start(workdir, config, model_name=model.cfg.name,
                  weight_precision=model.weight_precision)
  paths = {"results": workdir / "results.jsonl", "report": workdir / "report.md"}
  log = reports.RowLog(paths["results"])
  rows = measure(model, config.kv_formats, config.contexts, batch=config.batch,
                 decode_tokens=config.decode_tokens, impl=config.impl, seed=config.seed,
                 on_row=log.append)
  table = markdown_table(rows)
  n = config.decode_tokens
  reports.write_text(paths["report"], (
      f"# Model throughput: {model.cfg.name} ({config.impl} on {jax.default_backend()})\n\n"
      f"Weights: {model.weight_precision}. KV precision per row; dynamic per-token scales. "
      f"Random prompts of context - {n} tokens, then {n} decoded tokens per sequence; timed "
      "on a second, warm call (compile excluded). Decode tok/s counts every generated token "
      "once (the step that writes it to the cache).\n\n" + table + "\n"))
  return ModelBenchResult(rows, table, paths)
