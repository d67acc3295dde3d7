"""The headroom run (in process) on its defaults, configuration errors (in process, each
raised before anything is measured), an interrupted sweep resumed, the binary end to end
once (subprocess), and multi-host start-up."""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import pytest
from absl import app
from kvtpu.experiments import common
from kvtpu.experiments import headroom as headroom_binary
from kvtpu.models import presets
from kvtpu.models.headroom import LiveMeasure
from kvtpu.models.runs import headroom as headroom_run
from kvtpu.models.runs.common import FOUR_BIT_SCHEME, TWO_BIT_SCHEME, ConfigError
from kvtpu.models.runs.headroom import HeadroomConfig, run

import kvtpu
from kvtpu import headroom, memory
from kvtpu.headroom import report as headroom_report
from tests.helpers import run_binary
from tests.run_support import forbid


def test_defaults_answer_the_capacity_targets(tmp_path):
  # The defaults: Llama-3.1-8B, bf16 weights, v5e-8, data:2 x model:4, analytic.
  result = run(HeadroomConfig(), tmp_path)
  for name in ("config.json", "results.jsonl", "report.md", "context_vs_concurrency.png"):
    assert (tmp_path / name).stat().st_size > 0, name
  rows = headroom_report.read_jsonl(tmp_path / "results.jsonl")
  assert rows == result.rows
  maxima = {(r["kv_format"], r["kind"], r["concurrency"] if r["kind"] == "max_context"
             else r["context"]): r for r in rows if not r["oom"]}
  assert len(maxima) == 6 * 7  # 6 formats x (4 concurrencies + 3 contexts).
  # Every maximum fits, its oom neighbour does not, and the bytes add up.
  for r in rows:
    assert r["total_per_device"] == (r["weights_per_device"] + r["cache_per_device"]
                                     + r["temp_per_device"] + r["other_per_device"])
    assert (r["total_per_device"] > r["budget_per_device"]) == r["oom"]
  # The cache of a maximum is the closed form for one device's block: batch/2 sequences,
  # 8/4 kv heads.
  r = maxima[("int8", "max_context", 8)]
  assert r["cache_per_device"] == memory.cache_bytes(
      "int8", num_layers=32, batch=4, kv_heads=2, max_len=r["max_len"], head_dim=128)
  # The capacity targets: token capacity over bf16.
  for c in (8, 32, 128):
    bf16 = maxima[("bf16", "max_context", c)]["tokens"]
    assert maxima[("int8", "max_context", c)]["tokens"] >= 1.9 * bf16
    assert maxima[("fp8_e4m3", "max_context", c)]["tokens"] >= 1.9 * bf16
    assert maxima[("int4", "max_context", c)]["tokens"] >= 3.6 * bf16
    # The 4-bit scheme: rotation and 256 bf16 window slots per sequence cost it a little.
    assert maxima[(FOUR_BIT_SCHEME, "max_context", c)]["tokens"] >= 3.4 * bf16
    assert maxima[(TWO_BIT_SCHEME, "max_context", c)]["tokens"] >= 5.5 * bf16  # Analytic.
  report = (tmp_path / "report.md").read_text()
  assert report == result.report
  assert "weight precision: bf16" in report
  assert f"KV precisions: bf16, int8, fp8_e4m3, int4, {FOUR_BIT_SCHEME}, {TWO_BIT_SCHEME}" in report
  # int8 and fp8_e4m3 store the same bytes: the plot draws both and its caption says so.
  assert "int8 and fp8_e4m3 coincide" in report
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["mesh"] == "data:2,model:4" and config["seconds"]["analytic"] >= 0
  assert config["topology"] == "v5e:2x4"
  # Paged: requests of lengths uniform in [1, 32K] each hold their own pages, so about
  # twice as many are in flight as 32K slabs fit (mean; fewer at the 99th percentile),
  # each format in proportion to its bytes.
  paged = [json.loads(line) for line in (tmp_path / "paged.jsonl").read_text().splitlines()]
  best = {(r["kv_format"], r["demand"]): r for r in paged if not r["oom"]}
  assert len(best) == 6 * 2 and all(r["lengths"] == "uniform:1:32768" for r in paged)
  for fmt in ("bf16", "int8", FOUR_BIT_SCHEME):
    slabs = maxima[(fmt, "max_concurrency", 32768)]["batch"]
    assert 1.9 * slabs <= best[(fmt, "mean")]["requests"] <= 2.1 * slabs + 2
    assert slabs < best[(fmt, "p99")]["requests"] < best[(fmt, "mean")]["requests"]
  for r in paged:
    assert (r["total_per_device"] > r["budget_per_device"]) == r["oom"]
  assert "## Paged cache" in report and "| `int8` | `uniform:1:32768` | mean | 88 |" in report


@pytest.mark.parametrize("args,message", [
    (["--mesh=data:4,model:4"], "--mesh: data:4,model:4 has 16 devices, but accelerator v5e-8 "
                                "has 8"),
    (["--accelerator=v9-8"], "--accelerator: unknown accelerator name='v9'"),
    (["--accelerator=v5e-6"], "--accelerator: accelerator='v5e-6': no v5e slice of 6 chips"),
    (["--mesh=data:2"], "--mesh: mesh='data:2': name both axes"),
    (["--model=gpt-5"], "--model: unknown model preset"),
    (["--accelerator=v5e-8", "--mesh=data:1,model:8", "--strategy=heads",
      "--model=smollm2-135m"], "--strategy: strategy='heads'"),
    (["--strategy=sequence", "--modes=analytic,live"], "--strategy: strategy=sequence shards "
     "the pages of paged caches: it answers the paged questions (--paged_lengths) of single "
     "formats in analytic and aot modes only"),
    (["--modes=analytic,guess"], "--modes: expected modes among"),
    (["--mode=guess"], "--modes: expected modes among"),  # --mode is an alias.
    (["--modes=aot,live"], "--modes: live sizes the present devices and aot"),
    (["--weight_dtype=fp16"], "--weight_dtype: expected one of"),
    (["--reserve=1"], "--reserve: expected a fraction of HBM in [0, 1), got 1.0"),
    (["--concurrencies=0"], "--concurrencies: expected integers >= 1, got [0]"),
    (["--paged_lengths=gauss:5"], "--paged_lengths: length distribution 'gauss:5': expected"),
    (["--page_len=32", "--kv_formats=int2"], "--page_len: int2 needs pages of a multiple of 64"),
    (["--paged_demands=p50"], "--paged_demands: expected demands among ['mean', 'p99']"),
    (["--kv_formats=int7"], "--kv_formats: invalid KV format name='int7'"),
    (["--kv_formats=int2|int4@1,3-5", "--modes=analytic,aot"],
     "--kv_formats: int2|int4@1,3-5 is a layer plan, which only --modes=analytic sizes: a "
     "layered cache (kvtpu.LayeredKVCache) is not sharded"),
    (["--kv_formats=int2|int4@1,3-5"], "--kv_formats: int2|int4@1,3-5 is a layer plan, sized "
                                       "on one device only (--mesh=data:1,model:1)"),
    (["--kv_formats=int2|int4@1,30", "--model=smollm2-135m", "--accelerator=v5e-1",
      "--mesh=data:1,model:1"], "--kv_formats: plan int2|int4@1,30 gives layer 30 a format, but "
                                "the model has 30 layers (model smollm2-135m)"),
])
def test_bad_configurations_are_clear_errors(args, message):
  fv = common.parse_flags(headroom_binary.define_flags, args)
  with pytest.raises(app.UsageError) as e:
    headroom_binary.config_from_flags(fv)
  assert str(e.value).startswith(message), str(e.value)


def test_sequence_strategy_answers_the_paged_questions_only(tmp_path):
  # Llama-3.1-8B's 8 kv heads on 16 chips: each sequence's pages split over the model
  # axis; the slab questions do not apply (no table, no plot), the paged rows say so.
  result = run(HeadroomConfig(accelerator="v5e-16", mesh="data:1,model:16",
                              strategy="sequence", kv_formats=("bf16", "int8"),
                              paged_demands=("mean",)), tmp_path)
  assert result.rows == [] and not (tmp_path / "context_vs_concurrency.png").exists()
  assert "_no contiguous-cache (slab) questions were asked_" in result.report
  assert "Sequence-sharded (`strategy=sequence`)" in result.report
  read = lambda path: [json.loads(line) for line in path.read_text().splitlines()]  # noqa: E731
  rows = {r["kv_format"]: r for r in read(tmp_path / "paged.jsonl") if not r["oom"]}
  assert {r["strategy"] for r in rows.values()} == {"sequence"}
  assert rows["int8"]["requests"] >= 1.9 * rows["bf16"]["requests"] > 0
  replicated = run(HeadroomConfig(accelerator="v5e-16", mesh="data:1,model:16",
                                  strategy="replicate", kv_formats=("int8",), concurrencies=(8,),
                                  contexts=(8192,), paged_demands=("mean",)), tmp_path / "rep")
  assert "replicate" in replicated.report
  rep_rows = [r for r in read(tmp_path / "rep" / "paged.jsonl") if not r["oom"]]
  assert rows["int8"]["requests"] > 4 * rep_rows[0]["requests"]


def test_a_layer_plan_is_sized_analytically_and_refused_by_the_compiled_measures(tmp_path):
  plan = "int4|int8@0-3,20"
  result = run(HeadroomConfig(model="smollm2-135m", accelerator="v5e-1", mesh="data:1,model:1",
                              weight_dtype="f32", kv_formats=("int4", plan, "int8"),
                              concurrencies=(8,), contexts=(8192,)), tmp_path)
  rows = {(r["kv_format"], r["kind"]): r for r in result.rows if not r["oom"]}
  assert {f for f, _ in rows} == {"int4", plan, "int8"}
  for kind, found in (("max_context", "max_len"), ("max_concurrency", "batch")):
    assert rows["int8", kind][found] < rows[plan, kind][found] < rows["int4", kind][found]
  bits = {f: rows[f, "max_context"]["effective_bits"] for f in ("int4", plan, "int8")}
  assert bits[plan] == pytest.approx((25 * bits["int4"] + 5 * bits["int8"]) / 30)
  assert "| int4\\|int8@0-3,20 | 5.17 |" in result.report  # The table's pipe escaped.
  with pytest.raises(ValueError, match=re.escape(f"fmt={plan} is a layer plan, which only the "
                                                 "analytic measure sizes")):
    LiveMeasure(presets.get("smollm2-135m"), weights="f32", devices=jax.devices()[:1], data=1,
                model=1)(kvtpu.LayerPlan.parse(plan), 8, 1024)


@pytest.mark.parametrize("fields,message", [
    (dict(modes=("live",)), "hbm_gib: modes=live on cpu devices, which report no memory "
                            "capacity: give one with hbm_gib"),
    (dict(modes=("live",), hbm_gib=100000.0), "more than half of this host's free memory"),
])
def test_live_mode_checks_the_present_devices_before_measuring(tmp_path, fields, message):
  # The 8 fake CPU devices of the test process cover the default mesh (data:2 x model:4).
  with pytest.raises(ConfigError, match=message):
    run(HeadroomConfig(**fields), tmp_path)
  assert not (tmp_path / "results.jsonl").exists()


@pytest.mark.slow
def test_headroom_binary_end_to_end(tmp_path):
  proc = run_binary("kvtpu.experiments.headroom", "--mode=analytic", "--kv_formats=bf16,int8",
                    "--concurrencies=8", "--contexts=8192", workdir=tmp_path)
  assert proc.returncode == 0, proc.stderr[-4000:]
  rows = headroom_report.read_jsonl(tmp_path / "results.jsonl")
  assert {(r["kv_format"], r["kind"], r["oom"]) for r in rows} == {
      (f, k, oom) for f in ("bf16", "int8") for k in ("max_context", "max_concurrency")
      for oom in (False, True)}
  assert (tmp_path / "context_vs_concurrency.png").stat().st_size > 1000
  assert "## Mode: analytic" in proc.stdout
  assert proc.stdout.strip().splitlines()[-1] == (
      f"Report: {tmp_path / 'report.md'}; results: {tmp_path / 'results.jsonl'}")


def test_distributed_initialize_only_on_a_multihost_slice(monkeypatch):
  calls = []
  monkeypatch.setattr("jax.distributed.initialize", lambda: calls.append(1))
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
  assert not common.maybe_initialize_distributed("auto")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.2")  # One host: nothing to join.
  assert not common.maybe_initialize_distributed("auto")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "WARNING: could not determine TPU worker hostnames "
                     "or IP addresses, please set env var `TPU_WORKER_HOSTNAMES` manually")
  assert not common.maybe_initialize_distributed("auto")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5")
  assert common.maybe_initialize_distributed("auto")
  assert not common.maybe_initialize_distributed("no")
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
  assert common.maybe_initialize_distributed("yes")
  assert calls == [1, 1]
  with pytest.raises(ValueError, match="mode must be 'auto', 'yes' or 'no'"):
    common.maybe_initialize_distributed("maybe")


@pytest.fixture
def no_work(monkeypatch):
  """The run's measures fail the test: a flag error raised with them in place was raised
  before any of them."""
  forbid(monkeypatch, headroom_run, "deployment", "AotMeasure", "LiveMeasure")


@pytest.mark.parametrize("args,message", [
    (["--kv_formats="], "--kv_formats: expected at least one value, got none"),
    (["--kv_formats=int8,bf16,int8"], "--kv_formats: int8 listed more than once"),
    (["--hbm_gib=nan"], "--hbm_gib: expected a finite number > 0, got nan"),
    (["--hbm_gib=inf"], "--hbm_gib: expected a finite number > 0, got inf"),
    (["--modes=live", "--impl=pallas"], "--impl: pallas compiles the TPU kernels, but jax runs "
                                        "on cpu"),
    (["--contexts=8192,8192"], "--contexts: 8192 listed more than once"),
    (["--resume", "--overwrite"], "--resume: give resume (continue the earlier run) or "
                                  "overwrite (replace its outputs), not both"),
])
def test_bad_flags_fail_before_anything_is_measured(no_work, tmp_path, args, message):
  fv = common.parse_flags(headroom_binary.define_flags, [*args, f"--workdir={tmp_path / 'out'}"])
  with pytest.raises(app.UsageError) as e:
    headroom_binary.main(["headroom"], fv)
  assert str(e.value).startswith(message), str(e.value)
  assert not (tmp_path / "out").exists()


def test_interrupted_sweep_keeps_finished_answers_and_resumes(monkeypatch, tmp_path):
  config = HeadroomConfig(kv_formats=("bf16", "int8"), concurrencies=(1, 8), contexts=(8192,))
  solved = []

  def counted(solve):
    def wrapper(dep, fmt, asked, measure, **kwargs):
      if fail and len(solved) == 4:
        raise RuntimeError("injected failure at answer 5")
      solved.append((fmt.name, solve.__name__, asked))
      return solve(dep, fmt, asked, measure, **kwargs)
    return wrapper

  for name in ("max_context", "max_concurrency"):
    monkeypatch.setattr(headroom, name, counted(getattr(headroom, name)))
  fail = True
  with pytest.raises(RuntimeError, match="injected failure at answer 5"):
    run(config, tmp_path / "run")
  kept = headroom_report.read_jsonl(tmp_path / "run" / "results.jsonl")
  # Answers 1-4 (bf16's three, int8 at concurrency 1), each a maximum and its oom neighbour.
  assert [(r["kv_format"], r["kind"], r["concurrency"], r["oom"]) for r in kept][::2] == [
      ("bf16", "max_context", 1, False), ("bf16", "max_context", 8, False),
      ("bf16", "max_concurrency", 90, False), ("int8", "max_context", 1, False)]
  assert all(r["oom"] for r in kept[1::2]) and len(kept) == 8

  # An existing workdir is refused unless resumed; resuming solves answers 5 and 6 only.
  with pytest.raises(ConfigError, match="^workdir: .* or --resume to continue it"):
    run(config, tmp_path / "run")
  fail, solved[:] = False, []
  resumed = run(config, tmp_path / "run", resume=True)
  assert solved == [("int8", "max_context", 8), ("int8", "max_concurrency", 8192)]
  assert resumed.rows[:8] == kept
  assert resumed.rows == run(config, tmp_path / "whole").rows  # as one uninterrupted sweep
  assert headroom_report.read_jsonl(tmp_path / "run" / "results.jsonl") == resumed.rows
  assert "| int8 |" in resumed.report
  with pytest.raises(ConfigError, match=r"^reserve: .* records reserve=0.05 and this run has "
                     "0.1"):
    run(dataclasses.replace(config, reserve=0.1), tmp_path / "run", resume=True)


def test_compile_times_are_summarized_per_batch():
  timings = [("int8", 256, 4096, 20.44), ("int8", 8, 4096, 18.6), ("int4", 8, 2048, 16.0)]
  assert headroom_run._compile_summary(timings) == (
      "batch 8: 16.0-18.6 s (2); batch 256: 20.4-20.4 s (1)")
