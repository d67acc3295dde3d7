"""The generate run in process (a tiny random model and a fake tokenizer), its flag errors (in
process, each raised before the model loads or anything compiles), and the binary end to end
once (subprocess, on a tiny checkpoint)."""

import dataclasses
import json

import pytest
from absl import app
from flax import nnx
from kvtpu.experiments import generate as generate_binary
from kvtpu.experiments.common import parse_flags
from kvtpu.models.llama import Llama
from kvtpu.models.runs import generate as generate_run
from kvtpu.models.runs.generate import GenerateConfig, generate_and_report

from tests.helpers import TINY, run_binary
from tests.run_support import FakeTokenizer, fake_pretrained, forbid, save_tiny_checkpoint


def test_run_prints_completions_and_writes_the_workdir(tmp_path):
  model = Llama(dataclasses.replace(TINY, num_layers=1), rngs=nnx.Rngs(0))
  printed = []
  # The config's model is not used: generate_and_report takes the model.
  config = GenerateConfig(prompt=("What is the capital of France?", "Hi"), max_new_tokens=5,
                          kv_format="int8", impl="xla", temperature=0.5, seed=1)
  out = generate_and_report(model, FakeTokenizer(), config, workdir=tmp_path, out=printed.append)
  result = out.generation
  assert not result.compiled  # The warm-up call compiled; the timed one did not.
  assert result.prompt_lengths == [32, 4]  # Chat markers around the text.
  assert len(out.completions) == 2 and printed[0].startswith("--- [0] What is the capital")
  summary = printed[-1]
  assert summary == out.summary
  for part in ("model=tiny", "weights='random init (float32)'", "kv_format=int8",
               "prompt_tokens=36", f"generated_tokens={sum(map(len, result.tokens))}",
               "prefill=", "decode=", "warm call, compile excluded"):
    assert part in summary, (part, summary)
  rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
  assert rows == out.rows and [r["prompt_tokens"] for r in rows] == [32, 4]
  assert all(r["kv_format"] == "int8" and r["weight_precision"] == "random init (float32)"
             and r["warm"] and r["decode_tokens_per_s"] > 0 for r in rows)
  for r, tokens, stopped in zip(rows, result.tokens, result.stopped, strict=True):
    assert r["tokens"] == tokens and r["stopped"] == stopped
    assert len(tokens) == 5 or tokens[-1] in FakeTokenizer.stop_ids
  assert "| 1 | Hi | 4 |" in (tmp_path / "report.md").read_text()

  # Plain text (no chat markers), same compiled shapes (prompts padded to 32 tokens):
  # warm without a warm-up call.
  plain = generate_and_report(
      model, FakeTokenizer(),
      dataclasses.replace(config, prompt=("The capital of France is", "Hi"), chat=False,
                          warmup=False, temperature=0.0),
      out=lambda _: None)
  assert plain.generation.prompt_lengths == [24, 2] and not plain.generation.compiled


@pytest.mark.parametrize("args,message", [
    (["--kv_format=int8-channel"], "--kv_format: int8-channel has static scales"),
    (["--max_new_tokens=0"], "--max_new_tokens: expected an integer >= 1, got 0"),
    (["--top_p=1.5"], "--top_p: top_p must be in (0, 1]"),
    (["--temperature=-1"], "--temperature: temperature must be a finite number >= 0"),
    (["--top_k=0"], "--top_k: top_k must be None or an int >= 1"),
    (["--prompt="], "--prompt: expected non-empty prompts"),
    (["--param_dtype=float16"], "--param_dtype: expected one of ['float32', 'bfloat16']"),
])
def test_flag_errors_name_the_flag(args, message):
  with pytest.raises(app.UsageError) as e:
    generate_binary.config_from_flags(parse_flags(generate_binary.define_flags, args))
  assert str(e.value).startswith(message), str(e.value)


@pytest.mark.slow
def test_generate_binary_end_to_end(tmp_path):
  checkpoint = save_tiny_checkpoint(tmp_path / "ckpt")
  out = tmp_path / "out"
  proc = run_binary("kvtpu.experiments.generate", f"--model={checkpoint}", "--prompt=Hi",
                    "--prompt=Name three colors.", "--max_new_tokens=3", "--nowarmup",
                    "--impl=xla", workdir=out, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  last = proc.stdout.strip().splitlines()[-1]
  assert last.startswith("model=tiny-smollm-vocab weights='random init (float32)' "
                         "kv_format=int8 ") and "compile included" in last, last
  rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
  assert [r["prompt"] for r in rows] == ["Hi", "Name three colors."]
  assert json.loads((out / "config.json").read_text())["prompt"] == ["Hi", "Name three colors."]
  assert (out / "report.md").is_file()


@pytest.mark.parametrize("args,message", [
    (["--model=no/such/model"], "--model: 'no/such/model' is no known model name"),
    (["--impl=pallas"], "--impl: pallas compiles the TPU kernels, but jax runs on cpu"),
    (["--workdir={earlier}"], "--workdir: {earlier} already holds an earlier run's outputs "
                              "(report.md): give a new workdir, or --overwrite"),
])
def test_bad_flags_fail_before_the_model_loads(monkeypatch, tmp_path, args, message):
  forbid(monkeypatch, generate_run, "load_pretrained", "generate")
  earlier = tmp_path / "earlier"
  earlier.mkdir()
  (earlier / "report.md").write_text("# an earlier run\n")
  fv = parse_flags(generate_binary.define_flags, [a.format(earlier=earlier) for a in args])
  with pytest.raises(app.UsageError) as e:
    generate_binary.main(["generate"], fv)
  assert str(e.value).startswith(message.format(earlier=earlier)), str(e.value)
  assert (earlier / "report.md").read_text() == "# an earlier run\n"


def test_format_is_checked_against_the_model_before_anything_compiles(monkeypatch, tmp_path):
  forbid(monkeypatch, generate_run, "generate")
  monkeypatch.setattr(generate_run, "load_pretrained", fake_pretrained())
  fv = parse_flags(generate_binary.define_flags, ["--kv_format=int4-g32"])
  with pytest.raises(app.UsageError, match="^--kv_format: int4-g32 groups 32 channels, which "
                     "does not divide head_dim=16 of model tiny"):
    generate_binary.main(["generate"], fv)
