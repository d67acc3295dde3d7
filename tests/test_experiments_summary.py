"""The summary run (in process) on small evaluate and headroom results written from real rows:
the joined numbers equal the inputs', the Pareto front, the model check, formats in one
input only, and configuration errors (each raised before anything is written); the binary
once through its flags (in process)."""

from __future__ import annotations

import copy
import json
import pathlib
import re

import pytest
from absl import app
from kvtpu.experiments import summary as summary_binary
from kvtpu.experiments.common import parse_flags
from kvtpu.models.runs.common import ConfigError
from kvtpu.models.runs.summary import SummaryConfig, run

from kvtpu import reports
from kvtpu.formats import KVFormat, LayerPlan

# A score row and a passkey row of `python -m kvtpu.experiments.evaluate --preset=quick`
# (SmolLM2-135M), trimmed: per-layer lists cut to 2 layers, descriptions shortened.
_PROSE = {"name": "prose", "description": "English prose", "num_tokens": 63789,
          "num_documents": 65, "token_sha256": "8e5bc8100ad57d443e78ca6f3e9e0a505f138c39514f0bbc"
          "04350055f4d95778", "seed": 0}
_CODE = {"name": "code", "description": "Python source", "num_tokens": 111317,
         "num_documents": 23, "token_sha256": "d4be3145239f76ba7a9ef04fe3fa7bf89328c04bdf0c6266"
         "8e5bc8100ad57d44", "seed": 0}
# The fields every evaluate row of the int8 cache starts with.
_INT8_HEADER = {
    "model": "smollm2-135m",
    "weight_precision": "GGUF Q4_1 x210, F32 x61, Q8_0 x1; dequantized to float32",
    "kv_format": "int8", "kv_precision": KVFormat.parse("int8").to_dict(),
    "kv_bytes_per_token": 12240.0, "kv_effective_bits": 8.5, "calibration": "dynamic",
    "calibration_name": "dynamic", "reference_bytes_per_token": 23040.0}
SCORE_ROW = {
    "kind": "score", **_INT8_HEADER,
    "eval_workload": _PROSE, "context": 2048, "batch": 2, "lengths": [2048, 1536],
    "protocol": {"prefill": 128, "chunk": 128, "impl": "auto", "reference": "bf16"},
    "metrics": {"ppl": 16.610363633472176, "ppl_ref": 16.625646492118484,
                "ppl_rel_change": -0.0009192339469958899, "kl_mean": 0.000650986901499662,
                "kl_p99": 0.004098463682457822, "top1_agreement": 0.9857621440536013,
                "scored_tokens": 3582, "attn_rel_error": [0.0095, 0.0176],
                "saturation_k": [0.0, 0.0], "saturation_v": [0.0, 0.0]}}
PASSKEY_ROW = {
    "kind": "passkey", **_INT8_HEADER,
    "eval_workload": {"name": "passkey:length=1024,depth=0.5,num_samples=2",
                      "description": "passkey retrieval", "num_tokens": 2048,
                      "num_documents": 2, "token_sha256": "2ab81eef83d0750449f7ddde3fd57659f6"
                      "53fad5b1c37ee55a1aef0296ac16be", "seed": 0},
    "context": 1024, "batch": 2, "depth": 0.5, "prompt_tokens": 1024,
    "protocol": {"decoding": "greedy", "max_new_tokens": 8, "reference": "bf16",
                 "impl": "auto"},
    "metrics": {"accuracy": 1.0, "accuracy_ref": 1.0, "num_samples": 2}}
CALIBRATION = {"method": "mse", "method_options": {}, "workloads": [
    dict(_PROSE, tokens_used=2048, seq_len=512, batch=4)], "kvtpu_version": "0.1.0"}
# A row of `python -m kvtpu.experiments.headroom --model=smollm2-135m --accelerator=v5e-1`.
HEADROOM_ROW = {
    "accelerator": "v5e-1", "chip": "v5e", "num_devices": 1, "model": "smollm2-135m",
    "weight_dtype": "bf16", "mesh": "data:1,model:1", "model_max_position": 8192,
    "mode": "analytic", "kv_format": "bf16", "kind": "max_context", "strategy": "heads",
    "hbm_per_device": 17179869184, "budget_per_device": 16320875724, "reserve_fraction": 0.05,
    "calibration": "none (memory only: no calibration needed)", "effective_bits": 16.0,
    "batch": 1, "max_len": 696576, "tokens": 696576, "oom": False,
    "weights_per_device": 269100288, "cache_per_device": 16049112246, "temp_per_device": 196608,
    "other_per_device": 0, "total_per_device": 16318409142, "concurrency": 1,
    "context": 696576}
BITS = {"bf16": 16.0, "int8": 8.5, "int4": 4.5, "fp8_e4m3": 8.5}


def score(fmt: str, workload: dict, ppl: float, kl: float, *, context: int = 2048,
          calibration: dict | str = "dynamic", batch: int = 2) -> dict:
  row = copy.deepcopy(SCORE_ROW)
  row.update(kv_format=fmt, kv_precision=LayerPlan.config(fmt).to_dict(), context=context,
             kv_effective_bits=BITS.get(fmt, 4.5), eval_workload=workload, batch=batch,
             calibration=calibration, calibration_name=(
                 "dynamic" if calibration == "dynamic" else calibration["workloads"][0]["name"]))
  row["metrics"].update(ppl_rel_change=ppl, kl_mean=kl)
  return row


def passkey(fmt: str, length: int, accuracy: float, *, depth: float = 0.5,
            samples: int = 2) -> dict:
  row = copy.deepcopy(PASSKEY_ROW)
  row.update(kv_format=fmt, kv_precision=KVFormat.parse(fmt).to_dict(), context=length,
             depth=depth)
  row["metrics"].update(accuracy=accuracy, num_samples=samples)
  return row


def answer(fmt: str, kind: str, asked: int, found: int, *, mode: str = "analytic",
           model: str = "smollm2-135m") -> list[dict]:
  """The two rows of one headroom answer: the maximum and the first point past it."""
  rows = []
  for value, oom in ((found, False), (found + (128 if kind == "max_context" else 1), True)):
    row = dict(HEADROOM_ROW, kv_format=fmt, kind=kind, mode=mode, model=model, oom=oom,
               effective_bits=BITS[fmt])
    conc, ctx = (asked, value) if kind == "max_context" else (value, asked)
    row.update(concurrency=conc, context=ctx, batch=conc, max_len=ctx, tokens=conc * ctx)
    rows.append(row)
  return rows


def evaluate_rows() -> list[dict]:
  return [
      score("int8", _PROSE, -0.0009, 0.00065), score("int8", _CODE, 0.0007, 0.00083),
      score("int4", _PROSE, 0.31, 0.25), score("int4", _CODE, 0.42, 0.32),
      # Calibrated: better than dynamic int4 at the same bytes.
      score("int4", _PROSE, 0.01, 0.002, calibration=CALIBRATION),
      score("int4", _CODE, 0.02, 0.004, calibration=CALIBRATION),
      # A shorter context, not shown by default.
      score("int8", _PROSE, 0.5, 0.5, context=256), score("int4", _PROSE, 0.5, 0.5, context=256),
      passkey("int8", 1024, 1.0), passkey("int8", 2048, 0.5, depth=0.1, samples=2),
      passkey("int8", 2048, 1.0, depth=0.9, samples=6),
  ]


def headroom_rows(**kw) -> list[dict]:
  rows = []
  for fmt, scale in (("bf16", 1), ("int8", 2), ("int4", 4)):
    rows += answer(fmt, "max_context", 1, 100_000 * scale, **kw)
    rows += answer(fmt, "max_context", 8, 12_500 * scale, **kw)
    rows += answer(fmt, "max_concurrency", 8192, 12 * scale, **kw)
  return rows


def write_runs(tmp_path: pathlib.Path, ev: list[dict], hr: list[dict]) -> dict[str, str]:
  dirs = {"evaluate_dir": tmp_path / "evaluate", "headroom_dir": tmp_path / "headroom"}
  reports.write_jsonl(ev, dirs["evaluate_dir"] / "results.jsonl")
  reports.write_jsonl(hr, dirs["headroom_dir"] / "results.jsonl")
  return {k: str(v) for k, v in dirs.items()}


@pytest.fixture
def inputs(tmp_path) -> dict[str, str]:
  return write_runs(tmp_path, evaluate_rows(), headroom_rows())


def _line(report: str, label: str) -> list[str]:
  escaped = label.replace("|", "\\|")
  lines = [line for line in report.splitlines() if line.startswith(f"| {escaped} |")]
  assert len(lines) == 1, (label, report)
  return [c.strip() for c in lines[0].strip("|").split(" | ")]


def test_joined_table_holds_the_inputs_numbers(inputs, tmp_path):
  result = run(SummaryConfig(**inputs), tmp_path / "out")
  for name in ("config.json", "results.jsonl", "report.md", "capacity_vs_ppl.png"):
    assert (tmp_path / "out" / name).stat().st_size > 0, name
  assert reports.read_jsonl(tmp_path / "out" / "results.jsonl") == result.rows
  by = {r["label"]: r for r in result.rows}
  assert list(by) == ["bf16", "int8 | dynamic", "int4 | dynamic", "int4 | clip on prose"]
  # Memory side: the non-oom answers, per format (each variant has its format's).
  for label in ("int4 | dynamic", "int4 | clip on prose"):
    r = by[label]
    assert r["effective_bits"] == 4.5
    assert r["max_context"] == [{"concurrency": 1, "context": 400_000, "batch": 1},
                                {"concurrency": 8, "context": 50_000, "batch": 8}]
    assert r["max_concurrency"] == [{"context": 8192, "concurrency": 48, "batch": 48}]
    # Token capacity over bf16 at the largest common concurrency (8): 8 x 50,000 / 8 x 12,500.
    assert r["token_capacity_vs_bf16"] == 4.0 and r["capacity_at_concurrency"] == 8
  assert by["bf16"]["token_capacity_vs_bf16"] == 1.0
  assert by["int8 | dynamic"]["token_capacity_vs_bf16"] == 2.0
  # Accuracy side: the longest context (2048), not the 256 rows.
  assert by["int8 | dynamic"]["eval_context"] == 2048
  assert by["int8 | dynamic"]["ppl_rel_change"] == {"prose": -0.0009, "code": 0.0007}
  assert by["int4 | clip on prose"]["kl_mean"] == {"prose": 0.002, "code": 0.004}
  assert by["int4 | clip on prose"]["calibration"] == CALIBRATION
  assert by["int4 | dynamic"]["worst_ppl_rel_change"] == 0.42
  assert by["bf16"]["ppl_rel_change"] == {"prose": 0.0, "code": 0.0}
  # Passkey at 2048: depths weighted by samples, (2 x 0.5 + 6 x 1.0) / 8.
  assert [(p["length"], p["accuracy"]) for p in by["int8 | dynamic"]["passkey"]] == [
      (1024, 1.0), (2048, 0.875)]
  assert by["int4 | dynamic"]["passkey"] == []

  report = (tmp_path / "out" / "report.md").read_text()
  assert report == result.report and result.table in report
  head = _line(report, "KV config")
  assert head == ["KV config", "effective bits @ 8K", "max context @ conc 1",
                  "max context @ conc 8", "max sequences @ ctx 8K", "token capacity vs bf16",
                  "ppl change prose (%)", "ppl change code (%)", "KL prose (nats)",
                  "KL code (nats)", "passkey accuracy"]
  assert _line(report, "bf16") == ["bf16", "16", "100,000*", "12,500*", "12", "1.00x", "0",
                                   "0", "0", "0", "1.00 @ 1K, 1.00 @ 2K"]
  assert _line(report, "int8 | dynamic") == [
      "int8 \\| dynamic", "8.5", "200,000*", "25,000*", "24", "2.00x", "-0.09", "+0.07",
      "0.00065", "0.00083", "1.00 @ 1K, 0.88 @ 2K"]
  assert _line(report, "int4 | clip on prose") == [
      "int4 \\| clip on prose", "4.5", "400,000*", "50,000*", "48", "4.00x", "+1", "+2",
      "0.002", "0.004", "-"]
  # The header states what the numbers are of.
  for text in ("model: `smollm2-135m`", "headroom: bf16", "accelerator: v5e-1",
               "mesh: data:1,model:1", "headroom mode: analytic", "`prose` (63,789 tokens)",
               "at context 2,048, batch 2", "clip on prose: mse on `prose` (2,048 of 63,789"):
    assert text in report, text
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert config["evaluate_dir"] == inputs["evaluate_dir"] and config["eval_context_shown"] == 2048


def test_dominated_config_is_off_the_front(inputs, tmp_path):
  result = run(SummaryConfig(**inputs), tmp_path / "out")
  front = {r["label"]: r["pareto"] for r in result.rows}
  # Dynamic int4 has the calibrated variant's capacity at a higher cost.
  assert front == {"bf16": True, "int8 | dynamic": True, "int4 | dynamic": False,
                   "int4 | clip on prose": True}
  assert ("Pareto front (no other config has at least the token capacity and a worst perplexity "
          "change at most as large in magnitude, better on one): bf16, int8 | dynamic, "
          "int4 | clip on prose.") in result.report


def test_perplexity_changes_enter_the_front_by_magnitude(tmp_path):
  # Calibrated int4 at -50 % on prose is worse than dynamic int4's +42 %, not better.
  ev = [r for r in evaluate_rows() if not (r["kv_format"] == "int4" and r["calibration"] !=
                                           "dynamic" and r["eval_workload"] is _PROSE)]
  ev.append(score("int4", _PROSE, -0.5, 0.002, calibration=CALIBRATION))
  result = run(SummaryConfig(**write_runs(tmp_path, ev, headroom_rows())), tmp_path / "out")
  by = {r["label"]: r for r in result.rows}
  assert by["int4 | clip on prose"]["worst_ppl_rel_change"] == -0.5
  assert by["int4 | clip on prose"]["pareto"] is False and by["int4 | dynamic"]["pareto"] is True


def test_a_layer_plan_from_an_artifact_is_summarized_as_a_plan(tmp_path):
  plan = "int4|int8@1"
  cal = {**CALIBRATION, "method": "layer_plan"}
  ev = evaluate_rows() + [score(plan, _PROSE, 0.03, 0.01, calibration=cal)]
  result = run(SummaryConfig(**write_runs(tmp_path, ev, headroom_rows())), tmp_path / "out")
  assert f"{plan} | plan on prose: layer_plan on `prose`" in result.report
  assert f"Evaluated but not in the headroom run (analytic), so not in the table: {plan}." in (
      result.report)


def test_model_mismatch_refused_unless_allowed(tmp_path):
  inputs = write_runs(tmp_path, evaluate_rows(), headroom_rows(model="llama-3.1-8b"))
  with pytest.raises(ConfigError, match=r"^headroom_dir: the evaluate run is of model "
                     r"'smollm2-135m' .* and the headroom run of model 'llama-3.1-8b'"):
    run(SummaryConfig(**inputs), tmp_path / "out")
  assert not (tmp_path / "out").exists()
  result = run(SummaryConfig(**inputs, allow_model_mismatch=True), tmp_path / "out")
  assert "models: accuracy of `smollm2-135m` (evaluate run), memory of `llama-3.1-8b`" in (
      result.report)
  assert result.rows[1]["model"] == "smollm2-135m"
  assert result.rows[1]["headroom_model"] == "llama-3.1-8b"


def test_formats_in_one_input_only_are_listed(tmp_path):
  ev = evaluate_rows() + [score("fp8_e5m2", _PROSE, 0.02, 0.019)]
  hr = headroom_rows() + answer("fp8_e4m3", "max_context", 8, 25_000)
  result = run(SummaryConfig(**write_runs(tmp_path, ev, hr)), tmp_path / "out")
  assert "Evaluated but not in the headroom run (analytic), so not in the table: fp8_e5m2." in (
      result.report)
  assert "In the headroom run but not evaluated, so not in the table: fp8_e4m3." in (
      result.report)
  assert {r["kv_format"] for r in result.rows} == {"bf16", "int8", "int4"}


def test_unknown_headroom_mode_lists_the_modes_present(inputs, tmp_path):
  with pytest.raises(ConfigError, match=r"^headroom_mode: .*results.jsonl holds no aot rows; "
                     r"the modes present: analytic$"):
    run(SummaryConfig(**inputs, headroom_mode="aot"), tmp_path / "out")
  with pytest.raises(ConfigError, match=r"^headroom_mode: expected one of"):
    SummaryConfig(**inputs, headroom_mode="guess")
  assert not (tmp_path / "out").exists()


def test_missing_or_empty_results_name_the_flag(inputs, tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(ConfigError, match=rf"^evaluate_dir: {re.escape(str(missing))}/results"
                     r"\.jsonl does not exist"):
    SummaryConfig(evaluate_dir=str(missing), headroom_dir=inputs["headroom_dir"])
  (missing / "results.jsonl").parent.mkdir()
  (missing / "results.jsonl").write_text("\n")
  with pytest.raises(ConfigError, match=rf"^headroom_dir: {re.escape(str(missing))}/results"
                     r"\.jsonl is empty"):
    SummaryConfig(evaluate_dir=inputs["evaluate_dir"], headroom_dir=str(missing))


def test_other_input_errors(inputs, tmp_path):
  with pytest.raises(ConfigError, match=r"^eval_context: .* no score rows at context 4096; it "
                     r"scored contexts 256, 2048"):
    run(SummaryConfig(**inputs, eval_context=4096), tmp_path / "out")
  # The 256 rows on request.
  result = run(SummaryConfig(**inputs, eval_context=256), tmp_path / "out")
  assert result.rows[1]["ppl_rel_change"] == {"prose": 0.5}
  # The workdir may not be an input's: --overwrite would replace its results.
  with pytest.raises(ConfigError, match=r"^workdir: .* is the evaluate_dir"):
    run(SummaryConfig(**inputs), inputs["evaluate_dir"], overwrite=True)
  # A row that fails the evaluate schema.
  bad = tmp_path / "bad"
  reports.write_jsonl([{"kind": "score"}], bad / "results.jsonl")
  with pytest.raises(ConfigError, match=r"^evaluate_dir: .* is not a valid results file: .*"
                     "lacks 'model'"):
    run(SummaryConfig(evaluate_dir=str(bad), headroom_dir=inputs["headroom_dir"]),
        tmp_path / "out2")


def test_binary_prints_the_table_and_a_summary_line(inputs, tmp_path, capsys):
  out = tmp_path / "out"
  fv = parse_flags(summary_binary.define_flags, [
      f"--evaluate_dir={inputs['evaluate_dir']}", f"--headroom_dir={inputs['headroom_dir']}",
      f"--workdir={out}"])
  summary_binary.main(["summary"], fv)
  printed = capsys.readouterr().out.strip().splitlines()
  assert printed[0].startswith("| KV config | effective bits @ 8K |")
  assert printed[-1].startswith("Summary: 4 KV configs of smollm2-135m on v5e-1 (analytic "
                                "headroom; accuracy at context 2048)"), printed[-1]
  assert str(out / "report.md") in printed[-1]
  # Again without --overwrite: refused by the workdir rule.
  with pytest.raises(app.UsageError, match=r"^--workdir: .* already holds"):
    summary_binary.main(["summary"], fv)
  fv = parse_flags(summary_binary.define_flags, [f"--headroom_dir={inputs['headroom_dir']}"])
  with pytest.raises(app.UsageError, match=r"^--evaluate_dir: expected the workdir of a"):
    summary_binary.config_from_flags(fv)
  with pytest.raises(app.UsageError, match=r"unexpected positional arguments"):
    summary_binary.main(["summary", "stray"], fv)
