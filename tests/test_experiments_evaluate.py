"""experiments/evaluate.py end to end on a tiny random model (SmolLM2's tokenizer), in a temp dir."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest
from flax import nnx
from kvtpu.experiments.common import format_names
from kvtpu.models import loaders
from kvtpu.models.llama import Llama
from kvtpu.models.pretrained import load_pretrained

from kvtpu.eval import report
from tests.helpers import TINY

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  _, tokenizer = load_pretrained("smollm2-135m")
  cfg = dataclasses.replace(TINY, name="tiny-smollm-vocab", vocab_size=tokenizer.vocab_size,
                            max_position=2048)
  path = tmp_path_factory.mktemp("tiny") / "ckpt"
  loaders.save_checkpoint(Llama(cfg, rngs=nnx.Rngs(0)), path, tokenizer=tokenizer)
  return path


def test_evaluate_tiny_end_to_end(tiny_checkpoint, tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "kvtpu.experiments.evaluate", "--preset=none",
       f"--model={tiny_checkpoint}", f"--workdir={tmp_path}", "--kv_formats=int8,fp8_e4m3",
       "--calibrate_formats=int4,k=int8-head,v=int8", "--calibration_workloads=prose,code",
       "--calibration_method=absmax", "--calibration_tokens=1024",
       "--eval_workloads=prose,code", "--contexts=32,64", "--batches=2", "--prefill=16",
       "--chunk=8", "--passkey_lengths=96", "--passkey_depths=0.5", "--passkey_samples=2",
       "--passkey_formats=int8", "--impl=xla"],
      cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
      timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  rows = report.read_jsonl(tmp_path / "results.jsonl")  # schema-checked on read
  scores = [r for r in rows if r["kind"] == "score"]
  labels = {(r["kv_format"], r["calibration_name"]) for r in scores}
  assert labels == {("int8", "dynamic"), ("fp8_e4m3", "dynamic"), ("int4", "prose"),
                    ("int4", "code"), ("k=int8-head,v=int8", "prose"),
                    ("k=int8-head,v=int8", "code")}
  assert len(scores) == 6 * 2 * 2  # configs x eval workloads x contexts
  for r in scores:
    assert r["weight_precision"] == "random init (float32)" and r["model"] == "tiny-smollm-vocab"
    assert r["protocol"]["prefill"] == 16 and r["protocol"]["chunk"] == 8
    if r["calibration"] != "dynamic":
      w = r["calibration"]["workloads"][0]
      assert w["name"] == r["calibration_name"] and w["tokens_used"] == 1024
  passkey = [r for r in rows if r["kind"] == "passkey"]
  assert [(r["kv_format"], r["context"], r["depth"]) for r in passkey] == [("int8", 96, 0.5)]
  text = (tmp_path / "report.md").read_text()
  for part in ("random init (float32)", "Calibration transfer", "Passkey", "kl_mean",
               "## Targets (dynamic per-token-head scales, context 64)", "| int8 | prose x2 |"):
    assert part in text, part
  for png in ("kl_vs_context.png", "top1_vs_context.png", "ppl_vs_bytes.png"):
    assert (tmp_path / png).stat().st_size > 1000
  assert (tmp_path / "calibration" / "int4@prose" / "kvtpu_calibration.json").is_file()
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["contexts"] == [32, 64] and config["preset"] == "none"
  assert f"Report: {tmp_path / 'report.md'}" in proc.stdout


def test_evaluate_flag_errors(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "kvtpu.experiments.evaluate", "--preset=quick", "--kv_formats=int8-head",
       f"--workdir={tmp_path}"],
      cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode != 0
  assert "--kv_formats=int8-head has static scales" in proc.stderr


def test_format_names_rejoins_mixed_formats():
  assert format_names(["int8", "k=int8-channel", "v=int4", "k8v4", "v=int8"]) == [
      "int8", "k=int8-channel,v=int4", "k8v4", "v=int8"]
  assert format_names([]) == []
