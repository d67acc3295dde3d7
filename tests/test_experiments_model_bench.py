"""The model_bench binary end to end (subprocess, once, `--model=tiny`) and its flag errors
(in process)."""

import json

import pytest
from absl import app
from kvtpu.experiments import model_bench as model_bench_binary
from kvtpu.experiments.common import parse_flags

from tests.helpers import run_binary


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
