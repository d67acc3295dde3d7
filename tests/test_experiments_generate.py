"""experiments/generate.py (its `run`, on a tiny random model and a fake tokenizer) and
experiments/model_bench.py (the binary, `--model=tiny`)."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

from flax import nnx
from kvtpu.experiments import generate as generate_binary
from kvtpu.models.generation import Sampling
from kvtpu.models.llama import Llama

from tests.helpers import TINY

ROOT = pathlib.Path(__file__).resolve().parents[1]


class FakeTokenizer:
  """Characters to ids (mod the vocabulary), a chat template of two marker ids."""

  stop_ids = frozenset({3, 4})
  pad_id = 0

  def encode(self, text):
    return [10 + ord(c) % 80 for c in text]

  def encode_chat(self, messages, add_generation_prompt=True):
    assert add_generation_prompt and messages[-1]["role"] == "user"
    return [1] + self.encode(messages[-1]["content"]) + [2]

  def decode(self, ids, skip_special_tokens=True):
    return "".join("" if skip_special_tokens and i < 10 else chr(ord("a") + i % 26) for i in ids)


def test_run_prints_completions_and_writes_the_workdir(tmp_path):
  model = Llama(dataclasses.replace(TINY, num_layers=1), rngs=nnx.Rngs(0))
  printed = []
  out = generate_binary.run(
      model, FakeTokenizer(), ["What is the capital of France?", "Hi"], max_new_tokens=5,
      kv_format="int8", impl="xla", sampling=Sampling(temperature=0.5), seed=1,
      workdir=str(tmp_path), out=printed.append)
  result = out["generation"]
  assert not result.compiled  # The warm-up call compiled; the timed one did not.
  assert result.prompt_lengths == [32, 4]  # Chat markers around the text.
  assert len(out["completions"]) == 2 and printed[0].startswith("--- [0] What is the capital")
  summary = printed[-1]
  assert summary == out["summary"]
  for part in ("model=tiny", "weights='random init (float32)'", "kv_format=int8",
               "prompt_tokens=36", f"generated_tokens={sum(map(len, result.tokens))}",
               "prefill=", "decode=", "warm call, compile excluded"):
    assert part in summary, (part, summary)
  rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
  assert [r["prompt_tokens"] for r in rows] == [32, 4]
  assert all(r["kv_format"] == "int8" and r["weight_precision"] == "random init (float32)"
             and r["warm"] and r["decode_tokens_per_s"] > 0 for r in rows)
  for r, tokens, stopped in zip(rows, result.tokens, result.stopped, strict=True):
    assert r["tokens"] == tokens and r["stopped"] == stopped
    assert len(tokens) == 5 or tokens[-1] in FakeTokenizer.stop_ids
  assert "| 1 | Hi | 4 |" in (tmp_path / "report.md").read_text()

  # Plain text (no chat markers), same compiled shapes (prompts padded to 32 tokens):
  # warm without a warm-up call.
  plain = generate_binary.run(model, FakeTokenizer(), ["The capital of France is", "Hi"],
                              max_new_tokens=5,
                              kv_format="int8", impl="xla", chat=False, warmup=False,
                              out=lambda _: None)
  assert plain["generation"].prompt_lengths == [24, 2] and not plain["generation"].compiled


def test_model_bench_tiny(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "kvtpu.experiments.model_bench", f"--workdir={tmp_path}", "--model=tiny",
       "--kv_formats=bf16,int8", "--contexts=128", "--batch=2", "--decode_tokens=4",
       "--impl=xla"],
      cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
  assert [(r["kv_format"], r["context"], r["batch"]) for r in rows] == [
      ("bf16", 128, 2), ("int8", 128, 2)]
  for r in rows:
    assert not r["oom"] and r["warm"] and r["weight_precision"] == "random init (float32)"
    assert r["prompt_tokens"] == 124 and r["decode_steps"] == 4 and r["max_len"] == 128
    assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
    assert abs(r["ms_per_decode_step"] - 1e3 * r["decode_seconds"] / 4) < 1e-9
  assert rows[1]["cache_bytes"] < rows[0]["cache_bytes"]  # int8 vs bf16.
  assert "| random init (float32) | int8 | 128 | 2 |" in proc.stdout
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["model_name"] == "tiny" and config["kv_formats"] == ["bf16", "int8"]
  assert "ms / decode step" in (tmp_path / "report.md").read_text()
