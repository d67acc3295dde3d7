"""The kernel_bench binary end to end on a tiny config (subprocess, once), its flag errors (in
process, each raised before anything compiles), and the traffic table it prints."""

import json

import numpy as np
import pytest
from absl import app
from kvtpu.experiments import kernel_bench as kernel_bench_binary
from kvtpu.experiments.common import parse_flags

from kvtpu import benchmark
from tests.helpers import run_binary
from tests.run_support import forbid


@pytest.mark.slow
def test_kernel_bench_tiny_config(tmp_path):
  proc = run_binary("kvtpu.experiments.kernel_bench", "--formats=bf16,int8", "--contexts=256",
                    "--batches=2", "--prefill_chunk=16", "--head_dim=64", "--kv_heads=2",
                    "--q_heads=4", "--iters=1", workdir=tmp_path, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
  assert {(r["kv_format"], r["phase"]) for r in rows} == {
      ("bf16", "decode"), ("bf16", "prefill"), ("int8", "decode"), ("int8", "prefill")}
  for r in rows:
    assert r["impl"] == "xla" and not r["oom"] and r["seconds"] > 0
    assert r["bytes"] == r["min_bytes"]  # Off TPU: the minimum.
  # int8 K/V with f32 per-token scales: 2 * (64 + 4) bytes per token and head vs 2 * 128,
  # over 2 sequences x 256 tokens x 2 kv heads; the same f32 queries and outputs (2 x 4 rows
  # of 64 floats) for both.
  by = {(r["kv_format"], r["phase"]): r for r in rows}
  q_out = 2 * 2 * 4 * 64 * 4
  assert by[("int8", "decode")]["bytes"] == 2 * 256 * 2 * 136 + q_out
  assert by[("bf16", "decode")]["bytes"] == 2 * 256 * 2 * 256 + q_out
  assert (tmp_path / "traffic.jsonl").exists() and (tmp_path / "config.json").exists()
  report = (tmp_path / "report.md").read_text()
  assert "| roofline (%) |" in report and "| `int8` | 256 | 2 | decode |" in report
  assert "kernel_bench: timed 4 points" in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["--formats=int8-channel"], "--formats: int8-channel has static scales"),
    (["--contexts=0"], "--contexts: expected integers >= 1, got [0]"),
    (["--q_heads=6"], "--q_heads: expected a multiple of kv_heads=8, got 6"),
    (["--impl=gpu"], "--impl: expected one of"),
])
def test_flag_errors_name_the_flag(args, message):
  with pytest.raises(app.UsageError) as e:
    kernel_bench_binary.config_from_flags(parse_flags(kernel_bench_binary.define_flags, args))
  assert str(e.value).startswith(message), str(e.value)


def test_markdown_table_shows_the_roofline_in_percent():
  row = dict(kv_format="int8", context=2048, batch=8, phase="decode", seconds=1e-4,
             bytes=4.0e7, bytes_over_min=1.008, gb_per_s=400.0, roofline_fraction=0.4884, oom=False)
  lines = benchmark.markdown_table([row, dict(row, oom=True, phase="prefill")]).splitlines()
  assert lines[0] == "| format | context | batch | phase | ms | MB moved | x min | GB/s | roofline (%) |"
  assert lines[2] == "| `int8` | 2048 | 8 | decode | 0.100 | 40.00 | 1.008 | 400.0 | 48.8 |"
  assert lines[3] == "| `int8` | 2048 | 8 | prefill | OOM |  |  |  |  |"


def test_traffic_rows_full_context_targets():
  rows = benchmark.traffic_rows(["int8", "int4", "fp8_e4m3"], [2048, 32768])
  for r in rows:
    if r["lengths"] == "full":
      assert r["over_min"] <= 1.05, r
      limit = {"bf16": 1.0, "int8": 0.53, "fp8_e4m3": 0.53, "int4": 0.28}[r["kv_format"]]
      assert r["vs_bf16"] <= limit, r
  assert np.isclose(min(r["vs_bf16"] for r in rows), 0.266, atol=0.002)


@pytest.mark.parametrize("args,message", [
    (["--formats=int4-g32", "--head_dim=48"], "--formats: int4-g32 groups 32 channels, which "
                                              "does not divide head_dim=48"),
    (["--iters=0"], "--iters: expected an integer >= 1, got 0"),
    (["--impl=pallas"], "--impl: pallas compiles the TPU kernels, but jax runs on cpu"),
    (["--formats=int8,k=int8,v=int4,k8v4"], "--formats: k8v4 listed more than once"),
    (["--contexts=256,256"], "--contexts: 256 listed more than once"),
    (["--workdir={earlier}"], "--workdir: {earlier} already holds an earlier run's outputs "
                              "(report.md): give a new workdir, or --overwrite"),
])
def test_bad_flags_fail_before_anything_compiles(monkeypatch, tmp_path, args, message):
  forbid(monkeypatch, benchmark, "attention_rows", "traffic_rows", "time_call")
  earlier = tmp_path / "earlier"
  earlier.mkdir()
  (earlier / "report.md").write_text("# an earlier run\n")
  args = [a.format(earlier=earlier) for a in args]
  fv = parse_flags(kernel_bench_binary.define_flags, [f"--workdir={tmp_path / 'out'}", *args])
  with pytest.raises(app.UsageError) as e:
    kernel_bench_binary.main(["kernel_bench"], fv)
  assert str(e.value).startswith(message.format(earlier=earlier)), str(e.value)
  assert not (tmp_path / "out").exists()
  assert (earlier / "report.md").read_text() == "# an earlier run\n"

