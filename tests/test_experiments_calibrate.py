"""The calibrate run on SmolLM2 with a small token budget (in process), the artifact applied
to a cache of the model, flag errors (in process), and the binary end to end once
(subprocess, on a tiny checkpoint)."""

import json

import numpy as np
import pytest
from absl import app
from kvtpu.experiments import calibrate as calibrate_binary
from kvtpu.experiments.common import parse_flags
from kvtpu.models import presets
from kvtpu.models.runs.calibrate import CalibrateConfig, run
from kvtpu.models.runs.common import ConfigError

from kvtpu import KVCache
from kvtpu.calibration.artifact import CalibrationArtifact
from tests.helpers import run_binary
from tests.run_support import save_tiny_checkpoint


@pytest.mark.slow
def test_calibrate_smollm_writes_artifact_report_and_plot(tmp_path):
  config = CalibrateConfig(model="smollm2-135m", workloads=("prose", "random"),
                           kv_format="int8-channel", method="percentile", percentile=99.9,
                           num_tokens=512, seq_len=128, batch=2)
  result = run(config, tmp_path)
  for name in ("config.json", "results.jsonl", "report.md", "stats.json", "magnitudes.png"):
    assert (tmp_path / name).is_file(), name
  assert not list(tmp_path.glob(".*tmp"))  # every output written under its own name
  report = (tmp_path / "report.md").read_text()
  assert report == result.report
  assert "weight precision: GGUF Q4_1 x210, F32 x61, Q8_0 x1; dequantized to float32" in report
  assert "Workload `prose`: 512 of" in report and "KV precision: `int8-channel`" in report
  # Clip rates in percent, the plot with its caption.
  assert "Values clipped, in % of the calibration values of each layer" in report
  assert "![per-channel magnitudes](magnitudes.png)\n\n*Largest |x| of each channel" in report
  rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
  assert len(rows) == 3 * 30 and {r["kind"] for r in rows} == {"k_pre", "k", "v"}
  assert all(r["weight_precision"] and r["kv_format"] == "int8-channel" and r["calibration"]
             for r in rows)
  config_json = json.loads((tmp_path / "config.json").read_text())
  assert config_json["workloads"] == ["prose", "random"] and config_json["percentile"] == 99.9
  assert config_json["jax_version"] and config_json["devices"]
  art = CalibrationArtifact.load(tmp_path / "artifact")
  assert [w["name"] for w in art.workloads] == ["prose", "random:vocab_size=49152,num_tokens=8192"]
  # ~0.1% of values beyond a p99.9 clip, per layer.
  assert 2e-4 < art.clip_fraction["k"].mean() < 5e-3, art.clip_fraction["k"]
  mean_pct = f"mean {100 * np.mean(art.clip_fraction['k']):.3g} %"
  assert f"- K: {mean_pct}" in report
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


@pytest.mark.parametrize("args,message", [
    (["--kv_format=bf16"], "--kv_format: bf16 stores K and V unquantized: nothing to calibrate"),
    (["--kv_format=int9"], "--kv_format: invalid KV format name='int9'"),
    (["--num_tokens=100"], "--num_tokens: expected at least one batch of batch x seq_len = 2048"),
    (["--percentile=0"], "--percentile: expected a number in (0, 100], got 0.0"),
    (["--impl=fast"], "--impl: expected one of ['auto', 'xla', 'pallas', 'interpret']"),
    (["--workloads="], "--workloads: expected at least one value"),
])
def test_flag_errors_name_the_flag(args, message):
  fv = parse_flags(calibrate_binary.define_flags, args)
  with pytest.raises(app.UsageError) as e:
    calibrate_binary.config_from_flags(fv)
  assert str(e.value).startswith(message), str(e.value)


def test_config_checks_fields_before_any_work(tmp_path):
  with pytest.raises(ConfigError, match="^method: expected one of") as e:
    CalibrateConfig(method="best")
  assert e.value.field == "method"
  with pytest.raises(app.UsageError, match="unexpected positional arguments: \\['stray'\\]"):
    calibrate_binary.main(["calibrate", "stray"])
  assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_calibrate_binary_end_to_end(tmp_path):
  # Clip ratios of a dynamic format on a tiny checkpoint: the binary parses its flags, runs,
  # logs throughput and prints where the artifact is.
  checkpoint = save_tiny_checkpoint(tmp_path / "ckpt")
  out = tmp_path / "out"
  proc = run_binary("kvtpu.experiments.calibrate", f"--model={checkpoint}", "--workloads=random",
                    "--kv_format=int4", "--method=absmax", "--num_tokens=256", "--seq_len=64",
                    "--batch=2", "--impl=xla", workdir=out, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "tokens/s" in proc.stderr  # Progress is logged with throughput.
  for name in ("config.json", "results.jsonl", "report.md", "stats.json", "magnitudes.png"):
    assert (out / name).is_file(), name
  art = CalibrationArtifact.load(out / "artifact")
  assert art.fmt.name == "int4" and (np.asarray(art.scales["k"]["clip"]) == 1).all()  # absmax
  assert "## Clip ratios of the dynamic specs (per kv head)" in proc.stdout
  assert proc.stdout.strip().splitlines()[-1] == (
      f"Calibration artifact: {out / 'artifact'}; report: {out / 'report.md'}")
