"""The evaluate run on a tiny random model (SmolLM2's tokenizer) in process, its config and
flag errors (each raised before the work it guards), an interrupted run resumed, and the
binary end to end once (subprocess)."""

import dataclasses
import json

import pytest
from absl import app
from kvtpu.experiments import evaluate as evaluate_binary
from kvtpu.experiments.common import format_names, parse_flags
from kvtpu.models import calibrate as calibrate_lib
from kvtpu.models.runs import evaluate as evaluate_run
from kvtpu.models.runs.common import ConfigError

import kvtpu
from kvtpu.eval import report
from tests.helpers import TINY, run_binary
from tests.run_support import fake_pretrained, forbid, save_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.mark.slow
def test_evaluate_tiny_matrix(tiny_checkpoint, tmp_path):
  config = evaluate_run.EvaluateConfig.from_preset(
      "none", model=str(tiny_checkpoint), kv_formats=["int8", "fp8_e4m3"],
      calibrate_formats=["int4", "k=int8-head,v=int8"], calibration_workloads=["prose", "code"],
      calibration_method="absmax", calibration_tokens=1024, eval_workloads=["prose", "code"],
      contexts=["32", "64"], batches=[2], prefill=16, chunk=8, passkey_lengths=[96],
      passkey_depths=["0.5"], passkey_samples=2, passkey_formats=["int8", "int4"], impl="xla")
  assert config.contexts == (32, 64) and config.passkey_depths == (0.5,)  # flag strings parsed
  result = evaluate_run.run(config, tmp_path)
  rows = report.read_jsonl(tmp_path / "results.jsonl")  # schema-checked on read
  assert rows == result.rows
  scores = [r for r in rows if r["kind"] == "score"]
  labels = {(r["kv_format"], r["calibration_name"]) for r in scores}
  assert labels == {("int8", "dynamic"), ("fp8_e4m3", "dynamic"), ("int4", "prose"),
                    ("int4", "code"), ("k=int8-head,v=int8", "prose"),
                    ("k=int8-head,v=int8", "code")}
  assert len(scores) == 6 * 2 * 2  # configs x eval workloads x contexts
  for r in scores:
    assert r["weight_precision"] == "random init (float32)" and r["model"] == "tiny-smollm-vocab"
    assert r["protocol"]["prefill"] == 16 and r["protocol"]["chunk"] == 8
    # The bf16 reference: 2 layers x 2 kv heads x 16 channels x K and V x 2 bytes.
    assert r["reference_bytes_per_token"] == 2 * 2 * 16 * 2 * 2
    if r["calibration"] != "dynamic":
      w = r["calibration"]["workloads"][0]
      assert w["name"] == r["calibration_name"] and w["tokens_used"] == 1024
  passkey = [r for r in rows if r["kind"] == "passkey"]
  # A passkey format runs with dynamic scales and with each calibration made of it.
  assert [(r["kv_format"], r["calibration_name"], r["context"], r["depth"]) for r in passkey] == [
      ("int8", "dynamic", 96, 0.5), ("int4", "dynamic", 96, 0.5), ("int4", "prose", 96, 0.5),
      ("int4", "code", 96, 0.5)]
  text = (tmp_path / "report.md").read_text()
  assert text == result.report
  for part in ("random init (float32)", "Calibration transfer", "Passkey", "kl_mean",
               "## Targets (per-token scales, dynamic or with calibrated clip ratios, context 64)", "| int8 | prose x2 |",
               "| top1_agreement (%) | >= 99 |", "prose @64 x2 (%)"):
    assert part in text, part
  for png in ("kl_vs_context.png", "top1_vs_context.png", "ppl_vs_bits.png", "kl_vs_bits.png"):
    assert (tmp_path / png).stat().st_size > 1000
    assert f"]({png})\n\n*" in text  # each plot with its caption
  assert (tmp_path / "calibration" / "int4@prose" / "kvtpu_calibration.json").is_file()
  config_json = json.loads((tmp_path / "config.json").read_text())
  assert config_json["contexts"] == [32, 64] and config_json["preset"] == "none"
  assert not list(tmp_path.glob(".*tmp"))


def test_evaluate_scores_layer_plans_with_and_without_their_artifact(tiny_checkpoint, tmp_path):
  """A plan by name (dynamic) and a plan artifact: rows carry the plan's bytes and
  effective bits, and the artifact's workloads as the calibration."""
  from kvtpu.calibration.layer_plan import LayerPlanArtifact, assign

  dims = dict(context=8192, kv_heads=2, head_dim=16)
  costs = [0.1, 0.5]  # Layer 1 first; 8 effective bits hold one int8 layer of two.
  plan = assign(costs, "int4", "int8", target_bits=8.0, **dims)
  assert plan.name == "int4|int8@1"
  LayerPlanArtifact(plan=plan, low="int4", high="int8", target_bits=8.0, context=8192,
                    costs=costs, model={"name": "tiny-smollm-vocab", "weight_precision": "w",
                                        "num_layers": 2, "kv_heads": 2, "head_dim": 16},
                    workloads=[{"name": "prose", "num_tokens": 10, "tokens_used": 8,
                                "token_sha256": "00"}]).save(tmp_path / "plan")
  config = evaluate_run.EvaluateConfig.from_preset(
      "none", model=str(tiny_checkpoint), kv_formats=["int4|int8@0"], calibrate_formats=[],
      calibration_workloads=[], calibration_method="absmax", calibration_tokens=1024,
      artifacts=[str(tmp_path / "plan")], eval_workloads=["prose"], contexts=["32"], batches=[2],
      prefill=16, chunk=8, passkey_lengths=[96], passkey_depths=["0.5"], passkey_samples=2,
      passkey_formats=["int4|int8@1"], impl="xla")
  result = evaluate_run.run(config, tmp_path / "run")
  rows = report.read_jsonl(tmp_path / "run" / "results.jsonl")
  assert {(r["kind"], r["kv_format"], r["calibration_name"]) for r in rows} == {
      ("score", "int4|int8@0", "dynamic"), ("score", "int4|int8@1", "prose"),
      ("passkey", "int4|int8@1", "dynamic"), ("passkey", "int4|int8@1", "prose")}
  for r in rows:
    # Per layer: int4 with float32 scales at head_dim 16 is 6 bits, int8 10.
    assert r["kv_effective_bits"] == pytest.approx(8.0)
    assert r["kv_bytes_per_token"] == 2 * 16 * 2 * (6 + 10) / 8
    assert kvtpu.LayerPlan.from_dict(r["kv_precision"]).name == r["kv_format"]
  cal = next(r for r in rows if r["calibration_name"] == "prose")["calibration"]
  assert cal["method"] == "layer_plan" and cal["method_options"]["high"] == "int8"
  assert "per layer" in result.report
  with pytest.raises(ConfigError, match=r"kv_formats: plan int4\|int8@5 gives layer 5 a format, "
                                        "but the model has 2 layers"):
    evaluate_run.run(dataclasses.replace(config, kv_formats=("int4|int8@5",), artifacts=()),
                     tmp_path / "bad")
  assert format_names(["int4|k=int8", "v=int4@1", "3-4", "int8"]) == ["int4|k=int8,v=int4@1,3-4",
                                                                      "int8"]
  with pytest.raises(ConfigError, match="calibrate_formats: int4.int8@1 is a layer plan"):
    evaluate_run.EvaluateConfig.from_preset("quick", calibrate_formats=["int4|int8@1"])


def test_targets_table_in_percent():
  row = {"kind": "score", "kv_format": "int8", "calibration": "dynamic", "context": 2048,
         "batch": 2, "eval_workload": {"name": "prose"},
         "metrics": {"ppl_rel_change": -0.0009192, "kl_mean": 0.000651, "top1_agreement": 0.9858}}
  md = evaluate_run.targets_markdown([row], 2048)
  lines = md.splitlines()
  assert lines[2] == "| format | evaluated on | metric (unit) | target | measured | met |"
  assert lines[4:] == [
      "| int8 | prose x2 | ppl_rel_change (%) | abs <= 0.1 | -0.09192 | yes |",
      "| int8 | prose x2 | kl_mean (nats) | <= 0.001 | 0.000651 | yes |",
      "| int8 | prose x2 | top1_agreement (%) | >= 99 | 98.58 | **no** |"]
  assert "no matching rows in this run" in evaluate_run.targets_markdown([row], 512)


def test_targets_cover_calibrated_clip_rows_and_the_four_bit_passkey():
  scheme = "int4-sbf16-rot+sink4+recent252"
  score = {"kind": "score", "kv_format": scheme, "calibration": {"method": "mse"},
           "calibration_name": "prose", "context": 2048, "batch": 2,
           "eval_workload": {"name": "code"}, "metrics": {"ppl_rel_change": 0.00206,
                                                          "kl_mean": 0.0042}}
  passkey = {"kind": "passkey", "kv_format": scheme, "context": 1024, "depth": 0.5,
             "calibration": "dynamic", "metrics": {"accuracy": 0.5, "accuracy_ref": 1.0}}
  # The 2-bit scheme's passkey target is a fraction of the samples.
  two = "int2-nu-sbf16-rot+sink4+recent252"
  two_passkey = {**passkey, "kv_format": two, "metrics": {"accuracy": 0.8, "accuracy_ref": 1.0}}
  lines = evaluate_run.targets_markdown([score, passkey, two_passkey], 2048).splitlines()[4:]
  assert lines == [
      f"| {scheme}, clip on prose | code x2 | ppl_rel_change (%) | abs <= 0.5 | 0.206 | yes |",
      f"| {scheme}, clip on prose | code x2 | kl_mean (nats) | <= 0.005 | 0.0042 | yes |",
      f"| {scheme} | passkey @1024 depth 0.5 | accuracy (%) = bf16 | equal | 50 vs 100 | **no** |",
      f"| {two} | passkey @1024 depth 0.5 | accuracy (%) vs bf16 | >= 80 | 80 vs 100 | yes |"]


def test_presets_and_explicit_fields():
  quick = evaluate_run.EvaluateConfig.from_preset("quick")
  assert quick.kv_formats == ("int8", "fp8_e4m3", "int4", "fp8_e5m2", "int8-rot",
                              "int4-sbf16-rot+sink4+recent252", "int4-nu-sbf16-rot+sink4+recent252",
                              "int2-nu-sbf16-rot+sink4+recent252")
  assert quick.contexts == (256, 2048)
  assert quick.calibrate_formats == ("int4-sbf16-rot+sink4+recent252",)
  over = evaluate_run.EvaluateConfig.from_preset("quick", contexts=[512])
  assert over.contexts == (512,) and over.batches == quick.batches
  with pytest.raises(ConfigError, match="^kv_formats: required with preset=none"):
    evaluate_run.EvaluateConfig.from_preset("none")


@pytest.mark.parametrize("args,message", [
    (["--kv_formats=int8-head"], "--kv_formats: int8-head has static scales: list it in "
                                 "calibrate_formats"),
    (["--contexts=1"], "--contexts: expected integers >= 2, got [1]"),
    (["--contexts=2k"], "--contexts: expected integers, got ['2k']"),
    (["--passkey_depths=1.5"], "--passkey_depths: expected numbers in [0, 1], got [1.5]"),
    (["--calibration_method=best"], "--calibration_method: expected one of"),
    (["--calibrate_formats=int4", "--calibration_workloads="],
     "--calibration_workloads: calibrate_formats needs at least one calibration workload"),
    (["--preset=none", "--kv_formats=int8"], "--calibrate_formats: required with preset=none"),
    (["--reference=int8-channel"], "--reference: int8-channel has static scales"),
    (["--calibrate_formats=int4-nu-sbf16-rot+recent64"],
     "--calibrate_formats: int4-nu-sbf16-rot+recent64 has nothing to calibrate"),
])
def test_flag_errors_name_the_flag(args, message):
  fv = parse_flags(evaluate_binary.define_flags, args)
  with pytest.raises(app.UsageError) as e:
    evaluate_binary.config_from_flags(fv)
  assert str(e.value).startswith(message), str(e.value)


def test_flags_fill_the_preset_and_rejoin_mixed_formats():
  fv = parse_flags(evaluate_binary.define_flags,
                   ["--calibrate_formats=int4,k=int8-channel,v=int8", "--batches=1,8"])
  config = evaluate_binary.config_from_flags(fv)
  assert config.calibrate_formats == ("int4", "k=int8-channel,v=int8")
  assert config.batches == (1, 8) and config.contexts == (256, 2048)  # the rest: quick
  assert format_names(["int8", "k=int8-channel", "v=int4", "k8v4", "v=int8"]) == [
      "int8", "k=int8-channel,v=int4", "k8v4", "v=int8"]
  assert format_names([]) == []


@pytest.mark.slow
def test_evaluate_binary_end_to_end(tiny_checkpoint, tmp_path):
  proc = run_binary(
      "kvtpu.experiments.evaluate", "--preset=none", f"--model={tiny_checkpoint}",
      "--kv_formats=int8", "--calibrate_formats=", "--calibration_workloads=",
      "--calibration_method=absmax", "--calibration_tokens=512", "--eval_workloads=prose",
      "--contexts=32", "--batches=1", "--prefill=16", "--chunk=16", "--passkey_lengths=",
      "--passkey_depths=", "--passkey_samples=1", "--passkey_formats=", "--impl=xla",
      workdir=tmp_path, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  rows = report.read_jsonl(tmp_path / "results.jsonl")
  assert [(r["kind"], r["kv_format"], r["context"]) for r in rows] == [("score", "int8", 32)]
  for name in ("config.json", "report.md", "kl_vs_context.png"):
    assert (tmp_path / name).is_file(), name
  assert "ETA" in proc.stderr  # progress is logged
  assert proc.stdout.strip().splitlines()[-1] == (
      f"Report: {tmp_path / 'report.md'}; results: {tmp_path / 'results.jsonl'}")


@pytest.fixture
def no_work(monkeypatch):
  """The run's expensive steps fail the test: a flag error raised with them in place was
  raised before any of them."""
  forbid(monkeypatch, evaluate_run, "load_pretrained", "calibrate", "score_workload",
         "passkey_rows")


@pytest.mark.parametrize("args,message", [
    (["--model=no/such/model"], "--model: 'no/such/model' is no known model name"),
    (["--eval_workloads=prose,novel"], "--eval_workloads: unknown workload 'novel'; known: "),
    (["--calibration_workloads=prose:colour=red"],
     "--calibration_workloads: workload spec 'prose:colour=red': unknown option 'colour'"),
    (["--eval_workloads=missing.txt"], "--eval_workloads: cannot read "),
    (["--calibration_tokens=100"], "--calibration_tokens: expected at least one calibration "
                                   "window of 512 tokens, got 100"),
    (["--artifacts=/no/such/artifact"], "--artifacts: no calibration artifact at "
                                        "/no/such/artifact"),
    (["--kv_formats=int8,fp8_e4m3,int8"], "--kv_formats: int8 listed more than once"),
    (["--contexts=256,256"], "--contexts: 256 listed more than once"),
    (["--passkey_depths=0.5,0.5"], "--passkey_depths: expected distinct depths"),
    (["--impl=pallas"], "--impl: pallas compiles the TPU kernels, but jax runs on cpu: use "
                        "interpret"),
    (["--chunk=0"], "--chunk: expected an integer >= 1, got 0"),
    (["--prefill=-1"], "--prefill: expected an integer >= 1, got -1"),
    (["--reference=int8-head"], "--reference: int8-head has static scales"),
    (["--passkey_samples=0"], "--passkey_samples: expected an integer >= 1, got 0"),
    (["--resume", "--overwrite"], "--resume: give resume (continue the earlier run) or "
                                  "overwrite (replace its outputs), not both"),
])
def test_bad_flags_fail_before_the_model_loads(no_work, tmp_path, args, message):
  fv = parse_flags(evaluate_binary.define_flags, [*args, f"--workdir={tmp_path / 'out'}"])
  with pytest.raises(app.UsageError) as e:
    evaluate_binary.main(["evaluate"], fv)
  assert str(e.value).startswith(message), str(e.value)
  assert not (tmp_path / "out").exists()


def test_an_earlier_runs_workdir_is_refused_before_the_model_loads(no_work, tmp_path):
  (tmp_path / "results.jsonl").write_text('{"kind": "score"}\n')
  fv = parse_flags(evaluate_binary.define_flags, [f"--workdir={tmp_path}"])
  with pytest.raises(app.UsageError, match=r"^--workdir: .* already holds an earlier run's "
                     r"outputs \(results.jsonl\): give a new workdir, or --resume to continue "
                     "it or --overwrite to replace its outputs"):
    evaluate_binary.main(["evaluate"], fv)
  assert (tmp_path / "results.jsonl").read_text() == '{"kind": "score"}\n'  # untouched


# A matrix on TINY (head dim 16, a 97-token vocabulary) and the fake tokenizer: 4 items
# (2 workloads x 2 contexts) of 2 configs each, one compiled shape.
_TINY_MATRIX = ["--preset=none", "--kv_formats=int8", "--calibrate_formats=int8-head",
                "--calibration_workloads=random:num_tokens=1024", "--calibration_method=absmax",
                "--calibration_tokens=512", "--eval_workloads=random:num_tokens=256,seed=1,"
                "random:num_tokens=256,seed=2", "--contexts=16,32", "--batches=2", "--prefill=8",
                "--chunk=8", "--passkey_lengths=", "--passkey_depths=", "--passkey_samples=1",
                "--passkey_formats=", "--impl=xla"]


@pytest.mark.parametrize("args,message", [
    (["--contexts=16,200"], "--eval_workloads: workload random:vocab_size=97,num_tokens=256,"
                            "seed=1 has 256 tokens; context 200 x batch 2 needs 400"),
    (["--calibration_workloads=random:num_tokens=300"],
     "--calibration_workloads: workload random:vocab_size=97,num_tokens=300 has 300 tokens, "
     "fewer than one calibration window of 512"),
    (["--kv_formats=int4-g32"], "--kv_formats: int4-g32 groups 32 channels, which does not "
                                "divide head_dim=16 of model tiny"),
    (["--passkey_formats=int8", "--passkey_lengths=10", "--passkey_depths=0.5"],
     "--passkey_lengths: passkey: length=10 is too small"),
])
def test_what_needs_the_model_is_checked_before_calibrating_or_scoring(
    no_work, monkeypatch, tmp_path, args, message):
  monkeypatch.setattr(evaluate_run, "load_pretrained", fake_pretrained())
  fv = parse_flags(evaluate_binary.define_flags,
                   [*_TINY_MATRIX, *args, f"--workdir={tmp_path / 'out'}"])
  with pytest.raises(app.UsageError) as e:
    evaluate_binary.main(["evaluate"], fv)
  assert str(e.value).startswith(message), str(e.value)
  assert not (tmp_path / "out" / "results.jsonl").exists()


def _without_created(rows):
  """Rows with the calibration's creation time left out (it differs between two runs)."""
  out = []
  for r in rows:
    r = json.loads(json.dumps(r))
    if isinstance(r["calibration"], dict):
      del r["calibration"]["created"]
    out.append(r)
  return out


def test_interrupted_evaluation_keeps_finished_items_and_resumes(monkeypatch, tmp_path):
  monkeypatch.setattr(evaluate_run, "load_pretrained", fake_pretrained())
  config = evaluate_binary.config_from_flags(parse_flags(evaluate_binary.define_flags,
                                                         _TINY_MATRIX))
  assert config.eval_workloads == ("random:num_tokens=256,seed=1", "random:num_tokens=256,seed=2")
  score, scored = evaluate_run.score_workload, []

  def failing_at_item_3(model, w, configs, *, context, batch, **kwargs):
    if len(scored) == 2 and fail:
      raise RuntimeError("injected failure at item 3")
    scored.append((w.name[-6:], context))
    return score(model, w, configs, context=context, batch=batch, **kwargs)

  monkeypatch.setattr(evaluate_run, "score_workload", failing_at_item_3)
  fail = True
  with pytest.raises(RuntimeError, match="injected failure at item 3"):
    evaluate_run.run(config, tmp_path / "run")
  kept = report.read_jsonl(tmp_path / "run" / "results.jsonl")
  # Items 1 and 2 (the first workload at both contexts), a row per config each, are on disk.
  calibrated = "random:vocab_size=97,num_tokens=1024"
  assert [(r["eval_workload"]["name"][-6:], r["context"], r["kv_format"], r["calibration_name"])
          for r in kept] == [("seed=1", 16, "int8", "dynamic"),
                             ("seed=1", 16, "int8-head", calibrated),
                             ("seed=1", 32, "int8", "dynamic"),
                             ("seed=1", 32, "int8-head", calibrated)]

  # Resuming computes items 3 and 4 only, with the saved calibration artifact.
  fail, scored[:] = False, []
  forbid(monkeypatch, evaluate_run, "calibrate")
  resumed = evaluate_run.run(config, tmp_path / "run", resume=True)
  assert scored == [("seed=2", 16), ("seed=2", 32)]
  assert resumed.rows[:4] == kept and len(resumed.rows) == 8
  assert report.read_jsonl(tmp_path / "run" / "results.jsonl") == resumed.rows
  assert "| random:vocab_size=97,num_tokens=256,seed=2 @32 x2 (%) |" in resumed.report

  # The same rows as one uninterrupted run (calibrated afresh: the same scales).
  monkeypatch.setattr(evaluate_run, "calibrate", calibrate_lib.calibrate)
  whole = evaluate_run.run(config, tmp_path / "whole")
  assert _without_created(resumed.rows) == _without_created(whole.rows)

  # A resume with a flag that changes results, or onto another model, is refused first.
  forbid(monkeypatch, evaluate_run, "load_pretrained")
  other = dataclasses.replace(config, chunk=4)
  with pytest.raises(ConfigError, match=r"^chunk: .*config.json records chunk=8 and this run "
                     "has 4"):
    evaluate_run.run(other, tmp_path / "run", resume=True)
  monkeypatch.setattr(evaluate_run, "load_pretrained",
                      fake_pretrained(dataclasses.replace(TINY, name="other")))
  with pytest.raises(ConfigError, match=r"^model: .*results.jsonl holds rows of tiny "):
    evaluate_run.run(config, tmp_path / "run", resume=True)
