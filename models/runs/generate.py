"""The generate run: completions of prompts on a quantized KV cache, and their throughput.

Encodes each prompt (as a user turn of the model's chat template unless `chat` is off),
generates a ragged batch with `kvtpu.models.generate`, prints each completion and one
line of figures: model, weight precision, KV format, prompt and generated tokens, prefill
and decode tokens/s. The figures come from a second call with the same shapes after a
warm-up call (compile excluded); without the warm-up they include compiling, and the line
says so. With a workdir it also writes config.json, results.jsonl (a row per prompt) and
report.md.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from kvtpu.models.generation import Generation, Sampling, generate
from kvtpu.models.pretrained import load_pretrained
from kvtpu.models.runs.common import (
  check,
  check_head_dim,
  check_workdir,
  format_list,
  impl_choice,
  model_name,
  one_of,
  positive_int,
  sampling,
  start,
  str_list,
)

from kvtpu import reports

__all__ = ["GenerateConfig", "GenerateResult", "encode_prompts", "generate_and_report", "run",
           "summary_line"]


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  """A generation run (each field is the generate binary's flag of the same name).

  Attributes:
    model: `load_pretrained` name, .gguf file or checkpoint folder.
    prompt: the prompts, one sequence each (a ragged batch).
    max_new_tokens: most tokens generated per prompt.
    kv_format: KV-cache format (dynamic scales).
    chat: wrap each prompt in the chat template as a user turn.
    temperature, top_p, top_k: sampling (`kvtpu.models.Sampling`; temperature 0: greedy).
    seed: seed of the sampling key (the warm-up call uses the same key).
    impl: attend implementation.
    param_dtype: dtype the weights are converted to (and computed in).
    warmup: time a second, warm call (compile excluded) after a warm-up call.
  """

  model: str = "smollm2-135m"
  prompt: tuple[str, ...] = ("What is the capital of France?",)
  max_new_tokens: int = 64
  kv_format: str = "int8"
  chat: bool = True
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int | None = None
  seed: int = 0
  impl: str = "auto"
  param_dtype: str = "float32"
  warmup: bool = True

  def __post_init__(self):
    model_name("model", self.model)
    prompts = tuple(self.prompt) if not isinstance(self.prompt, str) else (self.prompt,)
    check(all(isinstance(p, str) and p for p in prompts), "prompt",
          f"expected non-empty prompts, got {list(prompts)}")
    object.__setattr__(self, "prompt", str_list("prompt", prompts))
    object.__setattr__(self, "max_new_tokens", positive_int("max_new_tokens",
                                                            self.max_new_tokens))
    object.__setattr__(self, "kv_format", format_list(
        "kv_format", [self.kv_format], dynamic_only="generate runs dynamic-scale caches")[0])
    sampling(self.temperature, self.top_p, self.top_k)
    object.__setattr__(self, "seed", positive_int("seed", self.seed, low=0))
    object.__setattr__(self, "impl", impl_choice("impl", self.impl))
    one_of("param_dtype", self.param_dtype, ("float32", "bfloat16"))

  @property
  def sampling(self) -> Sampling:
    return sampling(self.temperature, self.top_p, self.top_k)


@dataclasses.dataclass(frozen=True)
class GenerateResult:
  """The completions, one row per prompt, the summary line and the `Generation`."""

  completions: list[str]
  rows: list[dict]
  summary: str
  generation: Generation


def encode_prompts(tokenizer, prompts: Sequence[str], *, chat: bool) -> list[list[int]]:
  """Token ids of each prompt: a user turn of the chat template, or the plain text."""
  if chat:
    return [tokenizer.encode_chat([{"role": "user", "content": p}], add_generation_prompt=True)
            for p in prompts]
  return [tokenizer.encode(p) for p in prompts]


def summary_line(model, fmt: str, result: Generation) -> str:
  """One line: model, weight precision, KV format, token counts, prefill/decode tokens/s."""
  timing = ("compile included: first call with these shapes" if result.compiled
            else "warm call, compile excluded")
  return (f"model={model.cfg.name} weights={model.weight_precision!r} kv_format={fmt} "
          f"prompt_tokens={sum(result.prompt_lengths)} "
          f"generated_tokens={sum(len(t) for t in result.tokens)} "
          f"prefill={result.prefill_tokens_per_s:.1f} tok/s "
          f"decode={result.decode_tokens_per_s:.1f} tok/s "
          f"({timing}; {jax.default_backend()})")


def generate_and_report(model, tokenizer, config: GenerateConfig,
                        workdir: str | os.PathLike | None = None,
                        out: Callable[[str], Any] = print) -> GenerateResult:
  """Generates completions of `config.prompt` with a loaded model and tokenizer, prints them
  and the summary line with `out`, and writes results.jsonl and report.md to `workdir`
  when given.

  Args:
    model: a `kvtpu.models.llama.Llama` with `cfg.name` and `weight_precision`.
    tokenizer: with `encode`, `encode_chat`, `decode`, `stop_ids` and `pad_id`.
    config: the run (its `model` and `param_dtype` are not used: the model is given).
    workdir: where to write the rows and the report (None: nowhere).
    out: where the completions and the summary line go.
  """
  fmt = config.kv_format
  sampling = config.sampling
  ids = encode_prompts(tokenizer, config.prompt, chat=config.chat)
  kwargs = dict(max_new_tokens=config.max_new_tokens, kv_format=fmt,
                stop_ids=sorted(tokenizer.stop_ids), sampling=sampling,
                key=jax.random.key(config.seed), impl=config.impl, pad_id=tokenizer.pad_id)
  if config.warmup:
    generate(model, ids, **kwargs)
  result = generate(model, ids, **kwargs)
  completions = [tokenizer.decode(t, skip_special_tokens=True) for t in result.tokens]
  for i, (prompt, text) in enumerate(zip(config.prompt, completions, strict=True)):
    out(f"--- [{i}] {prompt}\n{text}\n")
  summary = summary_line(model, fmt, result)
  out(summary)

  common = dict(model=model.cfg.name, weight_precision=model.weight_precision, kv_format=fmt,
                impl=config.impl, backend=jax.default_backend(), chat=config.chat,
                temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                seed=config.seed, max_new_tokens=config.max_new_tokens,
                warm=not result.compiled, prefill_tokens_per_s=result.prefill_tokens_per_s,
                decode_tokens_per_s=result.decode_tokens_per_s,
                prefill_seconds=result.prefill_seconds, decode_seconds=result.decode_seconds,
                decode_steps=result.decode_steps)
  rows = [dict(common, prompt=p, completion=c, prompt_tokens=n, generated_tokens=len(t),
               tokens=t, stopped=s)
          for p, c, n, t, s in zip(config.prompt, completions, result.prompt_lengths,
                                   result.tokens, result.stopped, strict=True)]
  if workdir is not None:
    _write(Path(workdir), rows, summary)
  return GenerateResult(completions, rows, summary, result)


def _write(workdir: Path, rows: list[dict], summary: str) -> None:
  reports.write_jsonl(rows, workdir / "results.jsonl")
  body = [[i, r["prompt"], r["prompt_tokens"], r["generated_tokens"],
           "yes" if r["stopped"] else "no", r["completion"]] for i, r in enumerate(rows)]
  reports.write_text(workdir / "report.md", "\n".join([
      f"# Generation: {rows[0]['model']}\n",
      f"Weights: {rows[0]['weight_precision']}. KV cache: {rows[0]['kv_format']}. impl "
      f"{rows[0]['impl']} on {rows[0]['backend']}.\n", f"`{summary}`\n",
      reports.markdown_table(["#", "prompt", "prompt tokens", "generated", "stopped",
                              "completion"], body)]) + "\n")


def run(config: GenerateConfig, workdir: str | os.PathLike | None = None,
        out: Callable[[str], Any] = print, *, overwrite: bool = False) -> GenerateResult:
  """Loads `config.model` and runs `generate_and_report`; with a workdir, config.json first.

  The workdir rule (`kvtpu.models.runs.common.check_workdir`; `overwrite` replaces an
  earlier run's outputs) is checked before the model loads, the format's groups against
  its head dim before anything compiles.
  """
  if workdir is not None:
    workdir = check_workdir(workdir, config, overwrite=overwrite)
  model, tokenizer = load_pretrained(config.model, param_dtype=jnp.dtype(config.param_dtype))
  check_head_dim("kv_format", [config.kv_format], model.cfg.head_dim,
                 f"of model {model.cfg.name}")
  if workdir is not None:
    workdir = start(workdir, config, weight_precision=model.weight_precision)
  return generate_and_report(model, tokenizer, config, workdir, out=out)
