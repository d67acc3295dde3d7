"""experiments/kernel_bench.py on a tiny config, and the traffic table it prints."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

from kvtpu import benchmark

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_kernel_bench_tiny_config(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "kvtpu.experiments.kernel_bench", f"--workdir={tmp_path}",
       "--formats=bf16,int8", "--contexts=256", "--batches=2", "--prefill_chunk=16",
       "--head_dim=64", "--kv_heads=2", "--q_heads=4", "--iters=1"],
      cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
  assert {(r["kv_format"], r["phase"]) for r in rows} == {
      ("bf16", "decode"), ("bf16", "prefill"), ("int8", "decode"), ("int8", "prefill")}
  for r in rows:
    assert r["impl"] == "xla" and not r["oom"] and r["seconds"] > 0
    assert r["bytes"] == r["min_bytes"]  # Off TPU: the minimum.
  # int8 K/V with f32 per-token scales: 2 * (64 + 4) bytes per token and head vs 2 * 128.
  by = {(r["kv_format"], r["phase"]): r for r in rows}
  assert by[("int8", "decode")]["bytes"] / by[("bf16", "decode")]["bytes"] == 136 / 256
  assert (tmp_path / "report.md").exists() and (tmp_path / "config.json").exists()
  assert "kernel_bench: timed 4 points" in proc.stdout


def test_traffic_rows_full_context_targets():
  rows = benchmark.traffic_rows(["int8", "int4", "fp8_e4m3"], [2048, 32768])
  for r in rows:
    if r["lengths"] == "full":
      assert r["over_min"] <= 1.05, r
      limit = {"bf16": 1.0, "int8": 0.53, "fp8_e4m3": 0.53, "int4": 0.28}[r["kv_format"]]
      assert r["vs_bf16"] <= limit, r
  assert np.isclose(min(r["vs_bf16"] for r in rows), 0.266, atol=0.002)
