"""The calibrate run on SmolLM2 with a small token budget (in process), the artifact applied
to a cache of the model, flag errors (in process, each raised before the work it guards),
the workdir rule, and the binary end to end once (subprocess, on a tiny checkpoint)."""

import json
import logging
import re

import numpy as np
import pytest
from absl import app
from kvtpu.experiments import calibrate as calibrate_binary
from kvtpu.experiments.common import parse_flags
from kvtpu.models import calibrate as calibrate_lib
from kvtpu.models import presets
from kvtpu.models.runs import calibrate as calibrate_run
from kvtpu.models.runs.calibrate import CalibrateConfig, run
from kvtpu.models.runs.common import ConfigError

from kvtpu import KVCache
from kvtpu.calibration.artifact import CalibrationArtifact
from tests.helpers import run_binary
from tests.run_support import fake_pretrained, forbid, save_tiny_checkpoint


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
    (["--kv_format=bf16"], "--kv_format: bf16 has nothing to calibrate: K and V are unquantized"),
    (["--kv_format=int2-nu-rot"], "--kv_format: int2-nu-rot has nothing to calibrate"),
    (["--kv_format=int9"], "--kv_format: invalid KV format name='int9'"),
    (["--num_tokens=100"], "--num_tokens: expected at least one batch of batch x seq_len = 2048"),
    (["--percentile=0"], "--percentile: expected a finite number in (0, 100], got 0.0"),
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


def test_a_plan_run_gives_the_costliest_layers_the_dearer_format(monkeypatch, tmp_path):
  """plan_high: per-layer costs measured on the model, the plan within the budget, the
  artifact reproducible, and rows and report per layer."""
  from kvtpu.calibration.layer_plan import LayerPlanArtifact

  checkpoint = save_tiny_checkpoint(tmp_path / "ckpt")
  # The tiny model: 2 layers, head_dim 16: int4 is 6 effective bits, int8 10: 8 bits hold
  # one int8 layer.
  config = CalibrateConfig(model=str(checkpoint), workloads=("prose", "code"), kv_format="int4",
                           plan_high="int8", plan_bits=8.0, num_tokens=64, seq_len=32, batch=2,
                           impl="xla")
  result = run(config, tmp_path / "out")
  art = LayerPlanArtifact.load(tmp_path / "out" / "artifact")
  assert art.plan == result.artifact.plan and art.reassign() == art.plan
  hi = int(np.argmax(art.costs))
  assert art.plan.name == f"int4|int8@{hi}" and art.effective_bits == 8.0
  assert [w["name"] for w in art.workloads] == ["prose", "code"]
  assert all(w["tokens_used"] == 64 for w in art.workloads)
  rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
  assert [r["kv_format"] for r in rows] == ["int8" if i == hi else "int4" for i in range(2)]
  assert "| layer | cost | rank | format |" in result.report
  forbid(monkeypatch, calibrate_run, "plan_layers")  # The budget is checked before the work.
  with pytest.raises(ConfigError, match="plan_bits: target_bits=5.0 is below"):
    run(CalibrateConfig(model=str(checkpoint), workloads=("prose",), kv_format="int4",
                        plan_high="int8", plan_bits=5.0, num_tokens=64, seq_len=32, batch=2,
                        impl="xla"), tmp_path / "low")
  with pytest.raises(ConfigError, match="plan_high: int8-head has static scales"):
    CalibrateConfig(kv_format="int4", plan_high="int8-head", plan_bits=8.0)
  with pytest.raises(ConfigError, match="plan_high is kv_format"):
    CalibrateConfig(kv_format="int4", plan_high="int4", plan_bits=8.0)


@pytest.fixture
def no_work(monkeypatch):
  """The run's expensive steps fail the test: a flag error raised with them in place was
  raised before any of them."""
  forbid(monkeypatch, calibrate_run, "load_pretrained", "calibrate")


@pytest.mark.parametrize("args,message", [
    (["--model=no/such/model"], "--model: 'no/such/model' is no known model name"),
    (["--workloads=prose,novel"], "--workloads: unknown workload 'novel'; known: "),
    (["--workloads=prose,prose"], "--workloads: prose listed more than once"),
    (["--workloads=prose:colour=red"], "--workloads: workload spec 'prose:colour=red': unknown "
                                       "option 'colour'"),
    (["--percentile=nan"], "--percentile: expected a finite number in (0, 100], got nan"),
    (["--impl=pallas"], "--impl: pallas compiles the TPU kernels, but jax runs on cpu"),
])
def test_bad_flags_fail_before_the_model_loads(no_work, tmp_path, args, message):
  fv = parse_flags(calibrate_binary.define_flags, [*args, f"--workdir={tmp_path / 'out'}"])
  with pytest.raises(app.UsageError) as e:
    calibrate_binary.main(["calibrate"], fv)
  assert str(e.value).startswith(message), str(e.value)
  assert not (tmp_path / "out").exists()


_TINY_RUN = ["--workloads=random:num_tokens=256,seed=1", "--kv_format=int8-head",
             "--method=absmax", "--num_tokens=128", "--seq_len=32", "--batch=2", "--impl=xla"]


@pytest.mark.parametrize("args,message", [
    (["--kv_format=int4-g32"], "--kv_format: int4-g32 groups 32 channels, which does not "
                               "divide head_dim=16 of model tiny"),
    (["--workloads=random:num_tokens=50"], "--workloads: workload random:vocab_size=97,"
                                           "num_tokens=50 has 50 tokens, fewer than one batch"),
])
def test_what_needs_the_model_is_checked_before_calibrating(no_work, monkeypatch, tmp_path, args,
                                                            message):
  monkeypatch.setattr(calibrate_run, "load_pretrained", fake_pretrained())
  fv = parse_flags(calibrate_binary.define_flags,
                   [*_TINY_RUN, *args, f"--workdir={tmp_path / 'out'}"])
  with pytest.raises(app.UsageError) as e:
    calibrate_binary.main(["calibrate"], fv)
  assert str(e.value).startswith(message), str(e.value)
  assert not (tmp_path / "out").exists()


def test_a_second_run_is_refused_at_once_or_overwrites(monkeypatch, tmp_path, caplog, capsys):
  caplog.set_level(logging.INFO)
  monkeypatch.setattr(calibrate_run, "load_pretrained", fake_pretrained())
  out = tmp_path / "out"
  calibrate_binary.main(["calibrate"], parse_flags(calibrate_binary.define_flags,
                                                   [*_TINY_RUN, f"--workdir={out}"]))
  # Progress is logged per workload: tokens used of the tokens it will use, time, ETA.
  assert any(re.fullmatch(r"calibration random:vocab_size=97,num_tokens=256,seed=1: "
                          r"128/128 tokens, \d+ s, ETA 0 s; \d+ tokens/s", r.getMessage())
             for r in caplog.records), [r.getMessage() for r in caplog.records]
  first = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
  assert set(first) == {"config.json", "results.jsonl", "report.md", "stats.json",
                        "magnitudes.png"}
  # Into the same workdir: refused before the model loads, the earlier outputs untouched.
  forbid(monkeypatch, calibrate_run, "load_pretrained", "calibrate")
  with pytest.raises(app.UsageError, match=r"^--workdir: .* already holds an earlier run's "
                     "outputs .*: give a new workdir, or --overwrite to replace its outputs"):
    calibrate_binary.main(["calibrate"], parse_flags(
        calibrate_binary.define_flags, [*_TINY_RUN, "--method=percentile", f"--workdir={out}"]))
  assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == first
  # --overwrite: the new run's outputs replace them, each whole (no temporary files left).
  monkeypatch.setattr(calibrate_run, "load_pretrained", fake_pretrained())
  monkeypatch.setattr(calibrate_run, "calibrate", calibrate_lib.calibrate)
  calibrate_binary.main(["calibrate"], parse_flags(
      calibrate_binary.define_flags,
      [*_TINY_RUN, "--method=percentile", "--percentile=99", "--overwrite", f"--workdir={out}"]))
  assert json.loads((out / "config.json").read_text())["method"] == "percentile"
  assert CalibrationArtifact.load(out / "artifact").method == "percentile"
  assert "percentile" in (out / "report.md").read_text().splitlines()[0]
  assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
  assert capsys.readouterr().out.strip().splitlines()[-1] == (
      f"Calibration artifact: {out / 'artifact'}; report: {out / 'report.md'}")
