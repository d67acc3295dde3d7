"""The model_bench binary end to end (subprocess, once, `--model=tiny`) and its flag errors
(in process, each raised before the model loads or anything compiles)."""

import json

import pytest
from absl import app
from kvtpu.experiments import model_bench as model_bench_binary
from kvtpu.experiments.common import parse_flags
from kvtpu.models.runs import model_bench as model_bench_run

from tests.helpers import run_binary
from tests.run_support import forbid


@pytest.mark.slow
def test_model_bench_tiny(tmp_path):
  proc = run_binary("kvtpu.experiments.model_bench", "--model=tiny", "--kv_formats=bf16,int8",
                    "--contexts=128", "--batch=2", "--decode_tokens=4", "--impl=xla",
                    workdir=tmp_path, timeout=300)
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
  assert proc.stdout.strip().splitlines()[-1].startswith("model_bench: 2 points (tiny, xla on cpu)")


@pytest.mark.parametrize("args,message", [
    (["--contexts=32", "--decode_tokens=32"], "--contexts: expected contexts > decode_tokens=32"),
    (["--kv_formats=int8,bogus"], "--kv_formats: invalid KV format name='bogus'"),
    (["--batch=0"], "--batch: expected an integer >= 1, got 0"),
    (["--param_dtype=int8"], "--param_dtype: expected one of ['float32', 'bfloat16']"),
])
def test_flag_errors_name_the_flag(args, message):
  with pytest.raises(app.UsageError) as e:
    model_bench_binary.config_from_flags(parse_flags(model_bench_binary.define_flags, args))
  assert str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize("args,message", [
    (["--model=no/such/model"], "--model: 'no/such/model' is no known model name (tiny, "
                                "smollm2-135m)"),
    (["--kv_formats=int8,bf16,int8"], "--kv_formats: int8 listed more than once"),
    (["--impl=pallas"], "--impl: pallas compiles the TPU kernels, but jax runs on cpu"),
    (["--workdir={earlier}"], "--workdir: {earlier} already holds an earlier run's outputs "
                              "(results.jsonl): give a new workdir, or --overwrite"),
])
def test_bad_flags_fail_before_the_model_loads(monkeypatch, tmp_path, args, message):
  forbid(monkeypatch, model_bench_run, "load_model", "generate")
  earlier = tmp_path / "earlier"
  earlier.mkdir()
  (earlier / "results.jsonl").write_text("")
  args = [a.format(earlier=earlier) for a in args]
  fv = parse_flags(model_bench_binary.define_flags, [f"--workdir={tmp_path / 'out'}", *args])
  with pytest.raises(app.UsageError) as e:
    model_bench_binary.main(["model_bench"], fv)
  assert str(e.value).startswith(message.format(earlier=earlier)), str(e.value)
  assert not (tmp_path / "out").exists()


def test_formats_are_checked_against_the_model_before_anything_compiles(monkeypatch, tmp_path):
  forbid(monkeypatch, model_bench_run, "generate")
  fv = parse_flags(model_bench_binary.define_flags, [
      "--model=tiny", "--kv_formats=int8,int4-g32", "--contexts=64", "--decode_tokens=4",
      f"--workdir={tmp_path / 'out'}"])
  with pytest.raises(app.UsageError, match="^--kv_formats: int4-g32 groups 32 channels, which "
                     "does not divide head_dim=16 of model tiny"):
    model_bench_binary.main(["model_bench"], fv)
  assert not (tmp_path / "out").exists()
