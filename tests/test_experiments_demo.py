"""The demo binary end to end on a tiny config (subprocess, once), its flag errors and
workdir rule (in process), and the bench functions of `kvtpu.format_bench`."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

import pytest
from absl import app
from kvtpu.experiments import demo as demo_binary
from kvtpu.experiments.common import parse_flags

from kvtpu import format_bench
from tests.helpers import run_binary
from tests.run_support import forbid

REQUIRED = ("kv_format", "k_dtype", "v_dtype", "granularity", "scale_dtype", "head_dim",
            "bytes_per_token_per_layer", "ratio_vs_bf16", "attention_rel_error",
            "attention_max_abs_error", "weight_precision", "calibration")


def _demo(*args: str, workdir: pathlib.Path):
  return run_binary("kvtpu.experiments.demo", *args, workdir=workdir, timeout=300)


@pytest.mark.slow
def test_demo_tiny_config(tmp_path):
  # One run checked by two helpers (one test, so that pytest-xdist runs the demo once).
  proc = _demo("--formats=bf16,int8,int4", "--head_dims=64,128", "--context=64", "--batch=2",
               workdir=tmp_path)
  assert proc.returncode == 0, f"demo failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
  _check_files(tmp_path, proc)
  _check_rows(tmp_path)


def _check_files(workdir: pathlib.Path, proc: subprocess.CompletedProcess) -> None:
  for name in ("config.json", "results.jsonl", "report.md"):
    assert (workdir / name).is_file(), f"{name} missing from {sorted(os.listdir(workdir))}"
  config = json.loads((workdir / "config.json").read_text())
  assert config["context"] == 64 and config["head_dims"] == [64, 128]
  assert config["jax_version"] and config["devices"]
  report = (workdir / "report.md").read_text()
  assert "bytes @ H=128" in report and "rel err (%) @ H=128" in report
  # Both tables on stdout, then one closing line naming the report.
  assert "| `int4` |" in proc.stdout
  last = proc.stdout.strip().splitlines()[-1]
  assert last.startswith("Demo: ") and str(workdir / "report.md") in last, last


def _check_rows(workdir: pathlib.Path) -> None:
  rows = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
  assert {(r["kv_format"], r["head_dim"]) for r in rows} == {
      (f, h) for f in ("bf16", "int8", "int4") for h in (64, 128)}
  for r in rows:
    missing = [k for k in REQUIRED if k not in r]
    assert not missing, f"row {r['kv_format']} @ {r['head_dim']} lacks {missing}"
    assert r["weight_precision"] == "n/a (synthetic K/V, no model)"
    assert r["k_saturated"] == r["v_saturated"] == 0, r  # Dynamic scales never clip.
    # Every prefill and decode token written once per layer, K*H values each.
    tokens = sum(r["prefill_lengths"]) + r["batch"] * r["decode_steps"]
    assert r["written"] == r["num_layers"] * tokens * r["kv_heads"] * r["head_dim"], r
  at = {(r["kv_format"], r["head_dim"]): r for r in rows}
  assert at["int8", 128]["ratio_vs_bf16"] <= 0.53, at["int8", 128]
  assert at["int4", 128]["ratio_vs_bf16"] <= 0.28, at["int4", 128]
  assert at["int8", 128]["meets_target"] and at["int4", 128]["meets_target"]
  assert at["int8", 128]["calibration"] == "dynamic per-token scales (no calibration workload)"
  for h in (64, 128):
    assert at["bf16", h]["attention_rel_error"] == 0.0
    assert at["bf16", h]["attention_max_abs_error"] == 0.0
    assert 0 < at["int8", h]["attention_rel_error"] < at["int4", h]["attention_rel_error"], (
        at["int8", h], at["int4", h])


@pytest.mark.parametrize("args, message", [
    (("--formats=int8,int9",), "--formats: invalid KV format name='int9'"),
    (("--formats=int8-channel",), "--formats: formats=['int8-channel']: static formats need "
                                  "scales calibrated"),
    (("--head_dims=48", "--formats=int4-g32"), "--head_dims: "),
    (("--context=3",), "--context: expected an integer >= 4, got 3"),
    (("--formats=",), "--formats: formats is empty"),
])
def test_demo_rejects_bad_arguments(args, message):
  fv = parse_flags(demo_binary.define_flags, args)
  with pytest.raises(app.UsageError) as e:
    demo_binary.config_from_flags(fv)
  assert str(e.value).startswith(message), str(e.value)


def test_demo_rejects_positional_arguments():
  with pytest.raises(app.UsageError, match=r"unexpected positional arguments: \['stray'\]"):
    demo_binary.main(["demo", "stray"])


def test_error_table_in_percent():
  row = {"kv_format": "int8", "head_dim": 128, "attention_rel_error": 0.0783,
         "attention_max_abs_error": 23.0, "decode_steps": 3, "num_layers": 2, "context": 1024,
         "batch": 2, "prefill_lengths": [1021, 681], "q_heads": 32, "kv_heads": 8}
  md = format_bench.error_markdown([row])
  assert "| format | rel err (%) @ H=128 | max abs err @ H=128 |" in md
  assert "| `int8` | 7.83 | 2.30e+01 |" in md


def test_split_formats_keeps_mixed_specs_whole():
  assert format_bench.split_formats("int8, k=int8-g32,v=int4 ,k8v4,") == [
      "int8", "k=int8-g32,v=int4", "k8v4"]


def test_bytes_table_targets():
  rows = {(r["kv_format"], r["head_dim"]): r
          for r in format_bench.bytes_table(["bf16", "int8", "fp8_e4m3", "int4", "k8v4"],
                                            [64, 128], kv_heads=8)}
  # bf16: 2 tensors * 8 heads * 128 channels * 2 bytes; int8 adds one f32 scale per head.
  assert rows["bf16", 128]["bytes_per_token_per_layer"] == 4096
  assert rows["int8", 128]["bytes_per_token_per_layer"] == 2 * 8 * (128 + 4)
  assert rows["int4", 128]["ratio_vs_bf16"] == pytest.approx(2 * 8 * (64 + 4) / 4096)
  assert rows["fp8_e4m3", 128]["meets_target"] is True
  assert rows["k8v4", 128]["target"] is None and rows["int8", 64]["target"] is None
  with pytest.raises(ValueError, match="not a multiple of group_size=32"):
    format_bench.bytes_table(["int4-g32"], [48])


def test_check_formats_rejects_static_and_empty():
  with pytest.raises(ValueError, match="static formats need scales calibrated on a model's K/V"):
    format_bench.check_formats(["int8", "k=int8-head,v=int8"])
  with pytest.raises(ValueError, match="formats is empty"):
    format_bench.check_formats([])


def test_an_earlier_runs_workdir_is_refused_before_anything_is_measured(monkeypatch, tmp_path):
  forbid(monkeypatch, format_bench, "attention_error_rows")
  (tmp_path / "report.md").write_text("# an earlier run\n")
  fv = parse_flags(demo_binary.define_flags, ["--formats=int8", f"--workdir={tmp_path}"])
  with pytest.raises(app.UsageError, match=r"^--workdir: .* already holds an earlier run's "
                     r"outputs \(report.md\): give a new workdir, or --overwrite"):
    demo_binary.main(["demo"], fv)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]
