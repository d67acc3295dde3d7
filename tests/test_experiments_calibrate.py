"""experiments/calibrate.py end to end on SmolLM2 with a small token budget (subprocess:
absl flags are process-global), then the artifact applied to a cache of the model."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from kvtpu.models import presets

from kvtpu import KVCache
from kvtpu.calibration.artifact import CalibrationArtifact

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_calibrate_smollm_writes_artifact_report_and_plot(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "kvtpu.experiments.calibrate", f"--workdir={tmp_path}",
       "--model=smollm2-135m", "--workloads=prose,random", "--kv_format=int8-channel",
       "--method=percentile", "--percentile=99.9", "--num_tokens=512", "--seq_len=128",
       "--batch=2"],
      cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
      timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "tokens/s" in proc.stderr  # Progress is logged with throughput.
  for name in ("config.json", "results.jsonl", "report.md", "stats.json", "magnitudes.png"):
    assert (tmp_path / name).is_file(), name
  report = (tmp_path / "report.md").read_text()
  assert "weight precision: GGUF Q4_1 x210, F32 x61, Q8_0 x1; dequantized to float32" in report
  assert "Workload `prose`: 512 of" in report and "KV precision: `int8-channel`" in report
  rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
  assert len(rows) == 3 * 30 and {r["kind"] for r in rows} == {"k_pre", "k", "v"}
  assert all(r["weight_precision"] and r["kv_format"] == "int8-channel" and r["calibration"]
             for r in rows)
  art = CalibrationArtifact.load(tmp_path / "artifact")
  assert [w["name"] for w in art.workloads] == ["prose", "random:vocab_size=49152,num_tokens=8192"]
  # ~0.1% of values beyond a p99.9 clip, per layer.
  assert 2e-4 < art.clip_fraction["k"].mean() < 5e-3, art.clip_fraction["k"]
  cfg = presets.get("smollm2-135m")
  cache = KVCache.init("int8-channel", num_layers=cfg.num_layers, batch=1,
                       kv_heads=cfg.num_kv_heads, max_len=16, head_dim=cfg.head_dim,
                       calibration=art)
  np.testing.assert_array_equal(cache.k.scale, art.scales["k"]["scale"])
  np.testing.assert_array_equal(cache.v.scale, art.scales["v"]["scale"])
  with pytest.raises(ValueError, match="format int8-channel, but the cache's format is int8-head"):
    KVCache.init("int8-head", num_layers=cfg.num_layers, batch=1, kv_heads=cfg.num_kv_heads,
                 max_len=16, head_dim=cfg.head_dim, calibration=art)
  with pytest.raises(ValueError, match="made on model 'smollm2-135m', not 'llama-3.1-8b'"):
    art.check_compatible(num_layers=30, kv_heads=3, head_dim=64, model_name="llama-3.1-8b")
