"""Generates text with a pretrained model on a quantized KV cache, and times it.

Loads the model and tokenizer with `kvtpu.models.pretrained.load_pretrained`, encodes each
`--prompt` (as a user turn of the model's chat template unless --nochat), generates
a ragged batch with `kvtpu.models.generate`, prints each completion and one line
of figures: model, weight precision, KV format, prompt and generated tokens, prefill
and decode tokens/s. The figures come from a second call with the same shapes after
a warm-up call (compile excluded); with --nowarmup they include compiling, and the
line says so. With --workdir it also writes config.json, results.jsonl (a row per
prompt) and report.md.

  python -m kvtpu.experiments.generate --model=smollm2-135m --kv_format=int8 \\
      --prompt="What is the capital of France?" --max_new_tokens=32
  python -m kvtpu.experiments.generate --prompt="Hi" --prompt="Name three colors." --temperature=0.7
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from kvtpu.models.generation import Generation, Sampling, generate
from kvtpu.models.pretrained import load_pretrained

import kvtpu

_MODEL = flags.DEFINE_string("model", "smollm2-135m",
                             "load_pretrained name, .gguf file or checkpoint folder.")
_PROMPT = flags.DEFINE_multi_string("prompt", ["What is the capital of France?"],
                                    "A prompt; repeat the flag for a (ragged) batch.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Most tokens generated per prompt.")
_KV_FORMAT = flags.DEFINE_string("kv_format", "int8", "KV-cache format (bf16, int8, k8v4, ...).")
_CHAT = flags.DEFINE_boolean("chat", True, "Wrap each prompt in the chat template as a user turn.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy; > 0: sampling.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass, in (0, 1].")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample among the k most likely tokens only.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the sampling key.")
_IMPL = flags.DEFINE_enum("impl", "auto", list(kvtpu.attention.IMPLS), "attend implementation.")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"],
                                 "dtype the weights are converted to (and computed in).")
_WARMUP = flags.DEFINE_boolean("warmup", True,
                               "Time a second, warm call (compile excluded) after a warm-up call.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Optional output directory.")


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


def run(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
        kv_format: str = "int8", chat: bool = True, sampling: Sampling | None = None,
        seed: int = 0, impl: str = "auto", warmup: bool = True, workdir: str | None = None,
        out: Callable[[str], Any] = print) -> dict[str, Any]:
  """Generates completions of `prompts` and reports them; what `main` does after loading.

  Args:
    model: a `kvtpu.models.llama.Llama` with `cfg.name` and `weight_precision`.
    tokenizer: with `encode`, `encode_chat`, `decode`, `stop_ids` and `pad_id`.
    prompts: texts, one sequence each.
    max_new_tokens, sampling, impl: as `kvtpu.models.generate` (default greedy).
    kv_format: KV-cache format name.
    chat: encode each prompt as a user turn of the chat template.
    seed: the sampling key's seed (the warm-up call uses the same key).
    warmup: run once untimed before the timed call.
    workdir: if given, write config.json, results.jsonl and report.md there.
    out: where the completions and the summary line go.

  Returns:
    `{"completions": [...], "rows": [...], "summary": str, "generation": Generation}`.
  """
  fmt = kvtpu.KVFormat.parse(kv_format).name
  sampling = Sampling() if sampling is None else sampling
  ids = encode_prompts(tokenizer, prompts, chat=chat)
  kwargs = dict(max_new_tokens=max_new_tokens, kv_format=fmt, stop_ids=sorted(tokenizer.stop_ids),
                sampling=sampling, key=jax.random.key(seed), impl=impl, pad_id=tokenizer.pad_id)
  if warmup:
    generate(model, ids, **kwargs)
  result = generate(model, ids, **kwargs)
  completions = [tokenizer.decode(t, skip_special_tokens=True) for t in result.tokens]
  for i, (prompt, text) in enumerate(zip(prompts, completions, strict=True)):
    out(f"--- [{i}] {prompt}\n{text}\n")
  summary = summary_line(model, fmt, result)
  out(summary)

  common = dict(model=model.cfg.name, weight_precision=model.weight_precision, kv_format=fmt,
                impl=impl, backend=jax.default_backend(), chat=chat,
                temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                seed=seed, max_new_tokens=max_new_tokens, warm=not result.compiled,
                prefill_tokens_per_s=result.prefill_tokens_per_s,
                decode_tokens_per_s=result.decode_tokens_per_s,
                prefill_seconds=result.prefill_seconds, decode_seconds=result.decode_seconds,
                decode_steps=result.decode_steps)
  rows = [dict(common, prompt=p, completion=c, prompt_tokens=n, generated_tokens=len(t),
               tokens=t, stopped=s)
          for p, c, n, t, s in zip(prompts, completions, result.prompt_lengths, result.tokens,
                                   result.stopped, strict=True)]
  if workdir:
    _write(workdir, rows, summary)
  return {"completions": completions, "rows": rows, "summary": summary, "generation": result}


def _write(workdir: str, rows: list[dict], summary: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "results.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  lines = [f"# Generation: {rows[0]['model']}\n", f"Weights: {rows[0]['weight_precision']}. "
           f"KV cache: {rows[0]['kv_format']}. impl {rows[0]['impl']} on {rows[0]['backend']}.\n",
           f"`{summary}`\n", "| # | prompt | prompt tokens | generated | stopped | completion |",
           "|---|---|---|---|---|---|"]
  for i, r in enumerate(rows):
    cells = [str(i), r["prompt"], str(r["prompt_tokens"]), str(r["generated_tokens"]),
             "yes" if r["stopped"] else "no", r["completion"]]
    lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  try:
    sampling = Sampling(temperature=_TEMPERATURE.value, top_p=_TOP_P.value, top_k=_TOP_K.value)
  except ValueError as e:
    raise app.UsageError(f"--temperature/--top_p/--top_k: {e}") from None
  try:
    kvtpu.KVFormat.parse(_KV_FORMAT.value)
  except ValueError as e:
    raise app.UsageError(f"--kv_format: {e}") from None
  if _MAX_NEW.value < 1:
    raise app.UsageError(f"--max_new_tokens must be >= 1, got {_MAX_NEW.value}")
  if not all(_PROMPT.value):
    raise app.UsageError("--prompt must not be empty")
  logging.info("jax %s, devices: %s", jax.__version__, jax.devices())
  model, tokenizer = load_pretrained(_MODEL.value, param_dtype=jnp.dtype(_PARAM_DTYPE.value))
  if _WORKDIR.value:
    os.makedirs(_WORKDIR.value, exist_ok=True)
    config = {name: flags.FLAGS[name].value for name in
              ("model", "prompt", "max_new_tokens", "kv_format", "chat", "temperature", "top_p",
               "top_k", "seed", "impl", "param_dtype", "warmup", "workdir")}
    config.update(jax_version=jax.__version__, kvtpu_version=kvtpu.__version__,
                  devices=[str(d) for d in jax.devices()],
                  weight_precision=model.weight_precision)
    with open(os.path.join(_WORKDIR.value, "config.json"), "w") as f:
      json.dump(config, f, indent=2)
  run(model, tokenizer, _PROMPT.value, max_new_tokens=_MAX_NEW.value, kv_format=_KV_FORMAT.value,
      chat=_CHAT.value, sampling=sampling, seed=_SEED.value, impl=_IMPL.value,
      warmup=_WARMUP.value, workdir=_WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
