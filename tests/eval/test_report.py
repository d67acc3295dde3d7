"""Result rows: the schema check, JSONL round trip, markdown tables, plots and the report."""

from __future__ import annotations

import copy
import json
import math
import re

import numpy as np
import pytest

from kvtpu import reports
from kvtpu.eval import report as rp
from kvtpu.formats import KVFormat, LayerPlan

SHA_PROSE = "0123456789abcdef" + "f" * 48
SHA_CODE = "fedcba9876543210" + "e" * 48
SHA_CAL = "aaaabbbbccccdddd" + "1" * 48
BYTES = {"bf16": 9216.0, "int8": 4896.0, "k8v4": 3744.0, "int4": 2736.0}


def make_row(kind="score", *, kv_format="int8", cal=None, workload="prose", context=2048, batch=4,
             model="smollm2-135m", depth=0.5, **metrics):
  """A valid result row; `cal` is None (dynamic) or a calibration workload name."""
  row = {
      "kind": kind, "model": model,
      "weight_precision": "GGUF Q4_1 x210, F32 x61, Q8_0 x1; dequantized to float32",
      "kv_format": kv_format, "kv_precision": LayerPlan.config(kv_format).to_dict(),
      "kv_bytes_per_token": BYTES.get(kv_format, 1000.0),
      "calibration": "dynamic" if cal is None else {
          "method": "absmax-p99.9",
          "workloads": [{"name": cal, "num_tokens": 65536, "tokens_used": 16384,
                         "token_sha256": SHA_CAL}]},
      "calibration_name": "dynamic" if cal is None else cal,
      "eval_workload": {"name": workload, "num_tokens": 64000,
                        "token_sha256": SHA_PROSE if workload == "prose" else SHA_CODE},
      "context": context, "batch": batch,
      "protocol": {"prefill": 512, "chunk": 128, "impl": "auto", "reference": "bf16"},
  }
  if kind == "score":
    row["metrics"] = {"ppl": 20.0, "ppl_ref": 19.0, "ppl_rel_change": 0.05, "kl_mean": 0.01,
                      "kl_p99": 0.1, "top1_agreement": 0.97, "scored_tokens": 4096,
                      "attn_rel_error": [0.01, 0.03, 0.02], "saturation_k": [0.0, 0.5],
                      "saturation_v": [0.25, 0.0]}
  else:
    row["metrics"] = {"accuracy": 1.0, "accuracy_ref": 1.0, "num_samples": 10}
    row["depth"] = depth
  row["metrics"].update(metrics)
  return row


def parse_table(md: str) -> dict[str, dict[str, str]]:
  """The first markdown table in `md` as {first cell: {column header: cell}}."""
  lines = md[md.index("\n|") + 1:].split("\n\n")[0].splitlines()
  split = lambda ln: [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", ln)[1:-1]]  # noqa: E731
  head = split(lines[0])
  return {cells[0]: dict(zip(head[1:], cells[1:], strict=True)) for cells in map(split, lines[2:])}


def row_order(md: str) -> list[str]:
  return list(parse_table(md))


# --------------------------------------------------------------------------------------
# Schema.


def test_valid_rows_pass():
  rp.check_rows([make_row(), make_row(kv_format="int4", cal="prose"), make_row("passkey")])


@pytest.mark.parametrize("field", rp.REQUIRED_FIELDS)
def test_missing_required_field_is_named(field):
  row = make_row()
  del row[field]
  with pytest.raises(ValueError, match=f"result row lacks '{field}'"):
    rp.check_row(row)


def test_missing_weight_precision_message():
  row = make_row()
  del row["weight_precision"]
  with pytest.raises(ValueError) as e:
    rp.check_row(row)
  assert str(e.value) == "result row lacks 'weight_precision'"


@pytest.mark.parametrize("field,value,match", [
    ("kind", "ppl", "'kind' must be 'score' or 'passkey'"),
    ("weight_precision", "  ", "'weight_precision' must be a non-empty str"),
    ("model", 3, "'model' must be a non-empty str"),
    ("kv_format", "int7", "'kv_format' is not a kvtpu format"),
    ("kv_bytes_per_token", 0, "'kv_bytes_per_token' must be a number > 0"),
    ("kv_bytes_per_token", True, "'kv_bytes_per_token'"),
    ("context", True, "'context' must be an int > 0"),
    ("context", 2048.0, "'context' must be an int > 0"),
    ("batch", 0, "'batch' must be an int > 0"),
    ("protocol", {}, "'protocol' must be a non-empty dict"),
    ("metrics", [], "'metrics' must be a dict"),
    ("eval_workload", "prose", "'eval_workload' must be a dict"),
])
def test_invalid_top_level_fields(field, value, match):
  row = make_row()
  row[field] = value
  with pytest.raises(ValueError, match=re.escape(match)):
    rp.check_row(row)


def test_kv_precision_fields():
  # kv_precision is KVFormat.to_dict() (or LayerPlan.to_dict()) of kv_format, checked by
  # KVFormat.from_dict (LayerPlan.from_dict).
  prefix = "result row field 'kv_precision' is not `KVFormat.to_dict()` or `LayerPlan.to_dict()`: "
  for edit, match in [
      (lambda p: p.pop("v"), "a KVFormat dict has keys 'k', 'v'"),
      (lambda p: p["k"].pop("dtype"), "missing 1 required positional argument: 'dtype'"),
      (lambda p: p["v"].update(symmetric="sym"), "symmetric must be a bool"),
      (lambda p: p["k"].update(scheme="symmetric"), "unknown QuantSpec field(s) ['scheme']"),
      (lambda p: p["k"].update(granularity="group", group_size=0), "positive integer group_size"),
  ]:
    row = make_row()
    edit(row["kv_precision"])
    with pytest.raises(ValueError, match=re.escape(prefix) + ".*" + re.escape(match)):
      rp.check_row(row)
  plan = make_row(kv_format="int4|int8@1")
  rp.check_row(plan)
  plan["kv_precision"]["overrides"][0]["layers"] = [2]
  with pytest.raises(ValueError, match=r"LayerPlan dict names 'int4\|int8@1' but its formats are "
                                       r"'int4\|int8@2'"):
    rp.check_row(plan)
  row = make_row(kv_format="int4")
  row["kv_precision"] = KVFormat.parse("int4-asym-g32").to_dict()
  with pytest.raises(ValueError, match="describes int4-asym-g32, but 'kv_format' is int4"):
    rp.check_row(row)


@pytest.mark.parametrize("cal", ["static", {"workloads": [{}]}, {"method": "x", "workloads": []},
                                 {"method": "x"}, None])
def test_invalid_calibration(cal):
  row = make_row(cal="prose")
  row["calibration"] = cal
  with pytest.raises(ValueError, match=re.escape(
      "result row field 'calibration' must be 'dynamic' or a disclosure dict with method and "
      "workloads")):
    rp.check_row(row)


def test_calibration_workload_needs_hash_and_name_must_match():
  row = make_row(cal="prose")
  del row["calibration"]["workloads"][0]["token_sha256"]
  with pytest.raises(ValueError, match=re.escape("lacks 'calibration.workloads[0].token_sha256'")):
    rp.check_row(row)
  row = make_row(cal="prose")
  row["calibration_name"] = "dynamic"
  with pytest.raises(ValueError, match="'calibration_name' must be 'dynamic' exactly when"):
    rp.check_row(row)
  row = make_row()
  row["calibration_name"] = "prose"
  with pytest.raises(ValueError, match="'calibration_name'"):
    rp.check_row(row)


def test_eval_workload_fields():
  row = make_row()
  row["eval_workload"]["num_tokens"] = -1
  with pytest.raises(ValueError, match=re.escape("'eval_workload.num_tokens' must be an int > 0")):
    rp.check_row(row)


@pytest.mark.parametrize("metric,value", [("kl_mean", math.nan), ("ppl", math.inf),
                                          ("ppl_rel_change", math.nan), ("top1_agreement", "0.9"),
                                          ("scored_tokens", True)])
def test_bad_score_metric_is_named(metric, value):
  with pytest.raises(ValueError, match=re.escape(f"'metrics.{metric}' must be a finite number")):
    rp.check_row(make_row(**{metric: value}))


def test_missing_and_bad_list_metrics():
  row = make_row()
  del row["metrics"]["kl_p99"]
  with pytest.raises(ValueError, match=re.escape("lacks 'metrics.kl_p99'")):
    rp.check_row(row)
  for bad in ([], [0.1, math.nan], 0.1):
    with pytest.raises(ValueError, match=re.escape("'metrics.saturation_k' must be a non-empty")):
      rp.check_row(make_row(saturation_k=bad))


def test_passkey_rows_need_depth_and_accuracy():
  row = make_row("passkey")
  del row["depth"]
  with pytest.raises(ValueError, match="lacks 'depth'"):
    rp.check_row(row)
  with pytest.raises(ValueError, match=re.escape("'depth' must be a number in [0, 1]")):
    rp.check_row(make_row("passkey", depth=1.5))
  row = make_row("passkey")
  del row["metrics"]["accuracy_ref"]
  with pytest.raises(ValueError, match="lacks 'metrics.accuracy_ref'"):
    rp.check_row(row)
  rp.check_row(make_row("passkey", depth=0))  # an int depth in range is fine
  # A passkey row does not need the score metrics, and a score row does not need depth.
  assert "ppl" not in make_row("passkey")["metrics"] and "depth" not in make_row()


def test_check_rows_names_the_index():
  rows = [make_row(), make_row(), make_row(kl_mean=math.nan)]
  with pytest.raises(ValueError, match=re.escape("row 2: result row field 'metrics.kl_mean'")):
    rp.check_rows(rows)
  with pytest.raises(ValueError, match="row 0: a result row must be a dict"):
    rp.check_rows([["kind", "score"]])


# --------------------------------------------------------------------------------------
# JSONL.


def test_jsonl_round_trip(tmp_path):
  rows = [make_row(), make_row("passkey", depth=0.25), make_row(kv_format="int4", cal="code")]
  path = tmp_path / "results.jsonl"
  rp.write_jsonl(rows, path)
  lines = path.read_text().splitlines()
  assert len(lines) == 3 and json.loads(lines[1])["depth"] == 0.25
  assert rp.read_jsonl(path) == rows


def test_write_jsonl_checks_before_writing(tmp_path):
  bad = make_row()
  del bad["kv_precision"]
  with pytest.raises(ValueError, match="row 1: result row lacks 'kv_precision'"):
    rp.write_jsonl([make_row(), bad], tmp_path / "r.jsonl")
  assert not (tmp_path / "r.jsonl").exists()


def test_read_jsonl_names_the_line(tmp_path):
  bad = make_row()
  del bad["weight_precision"]
  path = tmp_path / "r.jsonl"
  path.write_text(json.dumps(make_row()) + "\n\n" + json.dumps(bad) + "\n")
  with pytest.raises(ValueError, match=r"r\.jsonl:3: result row lacks 'weight_precision'"):
    rp.read_jsonl(path)
  path.write_text("{not json\n")
  with pytest.raises(ValueError, match=r"r\.jsonl:1:"):
    rp.read_jsonl(path)


# --------------------------------------------------------------------------------------
# Tables.


def test_config_label():
  assert rp.config_label(make_row()) == "int8 | dynamic"
  assert rp.config_label(make_row(kv_format="int4", cal="prose")) == "int4 | cal: prose"
  assert rp.config_label(make_row(kv_format="bf16")) == "bf16"
  assert rp.config_label(make_row(kv_format="f32")) == "f32"


def test_metric_table_cells_and_order():
  rows = [
      make_row(kv_format="int4", kl_mean=0.5),
      make_row(kv_format="bf16", kl_mean=0.0),
      make_row(kv_format="int8", kl_mean=0.02, context=512),
      make_row(kv_format="int8", kl_mean=0.03, workload="code"),
      make_row(kv_format="k8v4", kl_mean=0.125),
      make_row(kv_format="k8v4", kl_mean=0.375),  # same cell: the mean is shown
      make_row("passkey"),  # ignored
  ]
  md = rp.metric_table(rows, "kl_mean")
  assert md.splitlines()[0].startswith("**kl_mean**: mean per-token KL divergence from the "
                                       "reference, in nats")
  assert "int8 \\| dynamic" in md  # pipes in labels are escaped
  table = parse_table(md)
  assert row_order(md) == ["bf16", "int8 | dynamic", "k8v4 | dynamic", "int4 | dynamic"]
  assert list(table["int8 | dynamic"]) == ["code @2048 x4 (nats)", "prose @512 x4 (nats)",
                                           "prose @2048 x4 (nats)"]
  assert table["int8 | dynamic"] == {"code @2048 x4 (nats)": "0.03", "prose @512 x4 (nats)": "0.02",
                                     "prose @2048 x4 (nats)": "-"}
  assert table["k8v4 | dynamic"]["prose @2048 x4 (nats)"] == "0.25"
  assert table["int4 | dynamic"]["prose @2048 x4 (nats)"] == "0.5"
  assert table["bf16"]["prose @2048 x4 (nats)"] == "0"


def test_metric_table_shows_fractions_in_percent():
  # Rows hold fractions; tables show percent with the unit in the column header.
  rows = [make_row(top1_agreement=0.9858, ppl_rel_change=-0.0009192, saturation_k=[0.0, 0.0125])]
  top1 = parse_table(rp.metric_table(rows, "top1_agreement"))
  assert top1["int8 | dynamic"] == {"prose @2048 x4 (%)": "98.58"}
  ppl = parse_table(rp.metric_table(rows, "ppl_rel_change"))
  assert ppl["int8 | dynamic"] == {"prose @2048 x4 (%)": "-0.09192"}
  sat = parse_table(rp.metric_table(rows, "saturation_k"))
  assert sat["int8 | dynamic"] == {"prose @2048 x4 (%)": "1.25"}
  ppl_abs = parse_table(rp.metric_table(rows, "ppl"))  # not a fraction: as is, no unit
  assert ppl_abs["int8 | dynamic"] == {"prose @2048 x4": "20"}
  assert rp.shown_value(rows[0], "top1_agreement") == pytest.approx(98.58)


def test_config_order_puts_dynamic_first_within_a_format():
  rows = [make_row(kv_format="int4", cal="code"), make_row(kv_format="int4"),
          make_row(kv_format="int4", cal="prose"), make_row(kv_format="int8", cal="chat")]
  assert row_order(rp.metric_table(rows, "ppl")) == [
      "int8 | cal: chat", "int4 | dynamic", "int4 | cal: code", "int4 | cal: prose"]


def test_metric_table_list_metric_shows_max_over_layers():
  md = rp.metric_table([make_row(attn_rel_error=[0.1, 0.7, 0.3])], "attn_rel_error")
  assert "max over layers" in md.splitlines()[0]
  assert parse_table(md)["int8 | dynamic"]["prose @2048 x4 (%)"] == "70"
  assert "max over layers" not in rp.metric_table([make_row()], "kl_mean")


def test_metric_table_fmt_and_no_scores():
  md = rp.metric_table([make_row(ppl=19.123456)], "ppl", fmt="{:.2f}")
  assert parse_table(md)["int8 | dynamic"]["prose @2048 x4"] == "19.12"
  assert "no score rows" in rp.metric_table([make_row("passkey")], "ppl")


def test_metric_table_separates_models():
  rows = [make_row(model="a", kl_mean=1.0), make_row(model="b", kl_mean=2.0)]
  table = parse_table(rp.metric_table(rows, "kl_mean"))
  assert table["a: int8 | dynamic"]["prose @2048 x4 (nats)"] == "1"
  assert table["b: int8 | dynamic"]["prose @2048 x4 (nats)"] == "2"


def transfer_rows():
  return [
      make_row(kv_format="int4", cal="prose", workload="prose", ppl_rel_change=0.01),
      make_row(kv_format="int4", cal="prose", workload="code", ppl_rel_change=0.08),
      make_row(kv_format="int4", cal="code", workload="prose", ppl_rel_change=0.06),
      make_row(kv_format="int4", cal="code", workload="code", ppl_rel_change=0.02),
      make_row(kv_format="int4", cal="code", workload="code", ppl_rel_change=0.04, context=512),
      make_row(kv_format="int4", workload="code", ppl_rel_change=0.3),
      make_row(kv_format="int8", cal="prose", workload="code", ppl_rel_change=9.0),  # other format
  ]


def test_transfer_table_cells():
  md = rp.transfer_table(transfer_rows(), "ppl_rel_change", kv_format="int4")
  assert md.splitlines()[0].startswith(
      "**int4**: ppl_rel_change (perplexity change vs the reference cache, in %), rows: "
      "calibrated on, columns: evaluated on")
  table = parse_table(md)
  assert row_order(md) == ["dynamic", "code", "prose"]
  # Percent: a relative change of 0.08 is 8 %.
  assert table["prose"] == {"code (%)": "8", "prose (%)": "1"}
  assert table["code"] == {"code (%)": "3", "prose (%)": "6"}  # mean over contexts 512, 2048
  assert table["dynamic"] == {"code (%)": "30", "prose (%)": "-"}


def test_transfer_table_selects_context():
  md = rp.transfer_table(transfer_rows(), "ppl_rel_change", kv_format="int4", context=512)
  assert "context 512" in md.splitlines()[0]
  assert parse_table(md) == {"code": {"code (%)": "4"}}
  md = rp.transfer_table(transfer_rows(), "ppl_rel_change", kv_format="int4", batch=8)
  assert "no matching score rows" in md


def test_passkey_table():
  rows = [
      make_row("passkey", depth=0.0, accuracy=1.0, accuracy_ref=1.0, num_samples=10),
      make_row("passkey", depth=1.0, accuracy=0.5, accuracy_ref=1.0, num_samples=10),
      make_row("passkey", depth=0.5, accuracy=0.25, accuracy_ref=0.75, num_samples=10,
               context=4096),
      make_row("passkey", kv_format="bf16", depth=0.5, context=4096),
      make_row(),  # a score row: ignored
  ]
  md = rp.passkey_table(rows)
  assert "accuracy in % (the reference cache's accuracy in %" in md.splitlines()[0]
  table = parse_table(md)
  assert row_order(md) == ["bf16", "int8 | dynamic"]
  assert table["int8 | dynamic"] == {"2048 tokens (%)": "75 (100)", "4096 tokens (%)": "25 (75)"}
  assert table["bf16"] == {"2048 tokens (%)": "-", "4096 tokens (%)": "100 (100)"}
  assert rp.passkey_table([make_row()]) == "_no passkey rows_"


def test_passkey_table_weights_by_samples():
  rows = [make_row("passkey", depth=0.0, accuracy=1.0, num_samples=30),
          make_row("passkey", depth=1.0, accuracy=0.0, num_samples=10)]
  assert parse_table(rp.passkey_table(rows))["int8 | dynamic"]["2048 tokens (%)"] == "75 (100)"


def test_header_gives_effective_bits_and_says_what_bytes_per_token_leave_out():
  rows = [dict(make_row(kv_format=f), kv_effective_bits=b)
          for f, b in (("int8", 8.25), ("int4-asym-rot+recent128", 4.75))]
  md = rp.header_markdown(rows, title="t")
  table = [t for t in md.split("\n\n") if t.startswith("| model | KV format")][0]
  assert "| effective bits @ 8K |" in table.splitlines()[0]
  assert "| 8.25 |" in table and "| 4.75 |" in table
  assert "Bytes per token leave out the windows" in md
  assert "leave out the windows" not in rp.header_markdown(rows[:1], title="t")
  with pytest.raises(ValueError, match="'kv_effective_bits' must be a number > 0"):
    rp.check_row(dict(rows[0], kv_effective_bits=0))


def test_header_discloses_weights_kv_calibration_workloads_and_protocol():
  rows = [make_row(kv_format="bf16"), make_row(kv_format="int4", cal="prose"),
          make_row(workload="code", context=512)]
  md = rp.header_markdown(rows, title="SmolLM2 KV quantization")
  assert md.startswith("# SmolLM2 KV quantization")
  assert "`smollm2-135m`: weights GGUF Q4_1 x210, F32 x61, Q8_0 x1; dequantized to float32" in md
  kv = md[md.index("## KV-cache precision"):md.index("## Calibration")]
  table = parse_table(kv)
  assert table["smollm2-135m"]  # one model column per row
  lines = [ln for ln in kv.splitlines() if ln.startswith("| smollm2")]
  assert "| int4 | int4, token_head, symmetric | int4, token_head, symmetric | 2,736 |" in lines[2]
  assert "| bf16 | bf16, unscaled | bf16, unscaled | 9,216 |" in lines[0]
  assert "| int8 | int8, token_head, symmetric | int8, token_head, symmetric | 4,896 |" in lines[1]
  cal = md[md.index("## Calibration"):md.index("## Evaluation")]
  assert "int8 \\| dynamic" not in cal and "int8 | dynamic: dynamic scales" in cal
  assert "- bf16: not quantized" in cal
  assert cal.index("- bf16:") < cal.index("- int8 | dynamic:") < cal.index("- int4 | cal: prose:")
  assert "int4 | cal: prose: absmax-p99.9 on `prose` (16,384 tokens used of 65,536 available" in cal
  assert f"`{SHA_CAL[:16]}`" in cal and SHA_CAL[:17] not in cal
  ev = md[md.index("## Evaluation"):md.index("## Protocol")]
  assert f"`prose` (64,000 tokens, token_sha256 `{SHA_PROSE[:16]}`)" in ev
  assert f"`code` (64,000 tokens, token_sha256 `{SHA_CODE[:16]}`)" in ev
  assert ev.count("`prose`") == 1
  proto = md[md.index("## Protocol"):]
  assert "prefill=512, chunk=128, impl=auto, reference=bf16" in proto
  assert "contexts: 512, 2048; batches: 4" in proto


# --------------------------------------------------------------------------------------
# Plots and the report.

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("plot,metric", [(rp.plot_vs_context, "kl_mean"),
                                         (rp.plot_vs_context, "saturation_v"),
                                         (rp.plot_vs_bits, "ppl_rel_change")])
def test_plots_with_a_single_point(tmp_path, plot, metric):
  path = tmp_path / "p.png"
  plot([dict(make_row(), kv_effective_bits=8.5)], metric, path)
  data = path.read_bytes()
  assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_plots_with_several_configs(tmp_path):
  rows = [make_row(kv_format=f, context=c, kl_mean=k)
          for f, k in (("int8", 0.01), ("int4", 0.2)) for c in (512, 2048)]
  rows.append(make_row(kv_format="bf16", kl_mean=0.0))  # a zero: linear y scale
  for r in rows:
    r["kv_effective_bits"] = {"int8": 8.5, "int4": 4.5, "bf16": 16.0}[r["kv_format"]]
  for plot, name in ((rp.plot_vs_context, "a.png"), (rp.plot_vs_bits, "b.png")):
    plot(rows, "kl_mean", tmp_path / name)
    assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC)


def test_plot_styles_and_notes(tmp_path):
  # A config keeps its colour across plots (colour by format, shade by calibration), the
  # reference cache is the baseline, and configs with equal values are named as coinciding.
  rows = [make_row(kv_format=f, cal=cal, context=c, kl_mean=k, top1_agreement=t)
          for f, cal, k, t in (("int8", None, 0.001, 0.99), ("fp8_e4m3", None, 0.001, 0.99),
                               ("int4", None, 0.3, 0.75), ("int4", "prose", 0.2, 0.8))
          for c in (512, 2048)]
  for r in rows:
    r["kv_effective_bits"] = 4.5 if r["kv_format"] == "int4" else 8.5
    if r["kv_format"] == "fp8_e4m3":
      r["kv_bytes_per_token"] = BYTES["int8"]  # fp8_e4m3 stores what int8 stores
  rp.check_rows(rows)
  fig = rp.plot_vs_context(rows, "kl_mean", tmp_path / "kl.png")
  assert fig.path.read_bytes().startswith(PNG_MAGIC)
  assert [n for n in fig.notes if "coincide" in n] == [
      "fp8_e4m3 | dynamic and int8 | dynamic coincide (values within 0.4 % of the axis): drawn as "
      "one line, the later ones dashed over the first, with larger hollow markers."], fig.notes
  bits_fig = rp.plot_vs_bits(rows, "top1_agreement", tmp_path / "top1.png")
  assert any("coincide" in n for n in bits_fig.notes)  # int8 and fp8_e4m3: same bits, same y
  # The calibrated int4 config is drawn in its own shade of int4's colour in both plots.
  import matplotlib.image  # noqa: PLC0415

  shade = reports.style_of("int4", "prose").color
  assert shade != reports.style_of("int4").color
  rgb = np.array([int(shade[i:i + 2], 16) / 255 for i in (1, 3, 5)])
  for png in (fig.path, bits_fig.path):
    pixels = matplotlib.image.imread(png)[..., :3]
    assert (np.abs(pixels - rgb).max(axis=-1) < 0.02).any(), png
  caption = rp.plot_caption(rows, "kl_mean", vs="bits")
  assert caption.startswith("Mean per-token KL divergence from the reference (nats) against "
                            "effective bits per stored value at 8K context. Each point: the mean over")
  assert "mean over evaluation workload prose, batch size 4 and contexts 512, 2048" in caption
  assert "(8 in all)" in caption


def test_bits_plot_marks_the_pareto_front(tmp_path, monkeypatch):
  # (bits, KL): the rotated int4 has int4's bits and a lower KL, so plain and calibrated
  # int4 are off the front; int8 (more bits, lowest KL) and int2 (fewest bits) are on it.
  # Perplexity changes count by magnitude: int4's -40 % is worse than int4-rot's +5 %.
  rows = [dict(make_row(kv_format=f, cal=cal, kl_mean=k, top1_agreement=t, ppl_rel_change=p),
               kv_effective_bits=b)
          for f, cal, b, k, t, p in (("int8", None, 8.5, 0.001, 0.99, -0.001),
                                     ("int4", None, 4.5, 0.3, 0.75, -0.4),
                                     ("int4-rot", None, 4.5, 0.06, 0.86, 0.05),
                                     ("int4", "prose", 4.5, 0.2, 0.8, 0.2),
                                     ("int2-nu-rot", None, 2.25, 1.0, 0.5, 1.0))]
  rows.append(make_row(kv_format="bf16", kl_mean=0.0))  # No effective bits: left out.
  fig = rp.plot_vs_bits(rows, "kl_mean", tmp_path / "kl.png")
  assert fig.path.read_bytes().startswith(PNG_MAGIC)
  caption = rp.plot_caption(rows, "kl_mean", vs="bits")
  assert caption.endswith("(5 in all; 1 without effective bits left out). Pareto front: the "
                          "configs for which no other has at most their bits and at least as "
                          "good a value, with fewer bits or a lower value.")
  assert "fewer bits or a higher value." in rp.plot_caption(rows, "top1_agreement", vs="bits")
  assert "fewer bits or a smaller absolute value." in rp.plot_caption(rows, "ppl_rel_change",
                                                                      vs="bits")
  assert rp.plot_caption(rows[-1:], "kl_mean", vs="bits").endswith(
      "no row carries effective bits.")
  drawn = {}

  def capture(path, series, **kw):
    drawn[kw["title"]] = [s.name for s in series]
    return reports.Figure(path)

  monkeypatch.setattr(reports, "plot_series", capture)
  for metric in ("kl_mean", "top1_agreement", "ppl_rel_change"):
    rp.plot_vs_bits(rows, metric, tmp_path / "p.png")
  assert len(drawn) == 3
  for title, names in drawn.items():
    assert sorted(n for n in names if n.endswith("(Pareto front)")) == [
        "int2-nu-rot | dynamic (Pareto front)", "int4-rot | dynamic (Pareto front)",
        "int8 | dynamic (Pareto front)"], title
    assert names[-1] == "Pareto front"


def test_report_without_effective_bits_leaves_the_bits_plots_out(tmp_path):
  rows = [make_row(kv_format="bf16", kl_mean=0.0), make_row(kl_mean=0.0123)]  # Older rows.
  md = rp.write_report(rows, tmp_path, title="Eval")
  assert (tmp_path / "kl_vs_context.png").exists() and not (tmp_path / "kl_vs_bits.png").exists()
  assert "kl_vs_bits.png" not in md


def report_rows():
  rows = [make_row(kv_format="bf16", kl_mean=0.0), make_row(kl_mean=0.0123),
          make_row(context=512), *transfer_rows(),
          make_row("passkey", depth=0.5, accuracy=0.9, accuracy_ref=1.0)]
  for r in rows:  # The evaluate binary's rows carry effective bits: the bits plots need them.
    r["kv_effective_bits"] = KVFormat.parse(r["kv_format"]).k.dtype.bits + 0.5
  return rows


def test_write_report(tmp_path):
  rows = report_rows()
  md = rp.write_report(rows, tmp_path / "out", title="Eval", extra_sections=["## Notes\n\nhi"])
  out = tmp_path / "out"
  assert (out / "report.md").read_text() == md
  assert rp.read_jsonl(out / "results.jsonl") == rows
  for name in ("kl_vs_context.png", "top1_vs_context.png", "ppl_vs_bits.png", "kl_vs_bits.png"):
    assert (out / name).read_bytes().startswith(PNG_MAGIC)
    assert f"]({name})" in md
  for metric in ("ppl_rel_change", "kl_mean", "kl_p99", "top1_agreement", "ppl", "attn_rel_error",
                 "saturation_k", "saturation_v"):
    assert f"**{metric}**: {rp.METRICS[metric][0]}" in md
  kl = md[md.index("**kl_mean**: "):]
  assert parse_table(kl)["int8 | dynamic"]["prose @2048 x4 (nats)"] == "0.0123"
  # Default transfer formats: those with a calibrated row (int4 and int8), both metrics.
  for fmt in ("int4", "int8"):
    for metric in ("ppl_rel_change", "kl_mean"):
      assert f"**{fmt}**: {metric} (" in md
  assert "**bf16**: " not in md
  t = md[md.index("**int4**: ppl_rel_change"):]
  assert parse_table(t)["prose"]["code (%)"] == "8"
  assert "## Passkey retrieval" in md and "90 (100)" in md
  # Each image is followed by its caption: what a point averages over.
  caption = md[md.index("](kl_vs_context.png)"):].split("\n\n")[1]
  assert caption.startswith("*Mean per-token KL divergence from the reference (nats) against "
                            "context. Each point: the mean over evaluation workloads code, prose "
                            "and batch size 4 of one KV config's rows at one context")
  assert md.index("## Notes\n\nhi") < md.index("## Plots")
  assert md.index("# Eval") < md.index("## Model and weight precision") < md.index("**ppl")


def test_write_report_transfer_formats_and_passkey_only(tmp_path):
  md = rp.write_report(report_rows(), tmp_path, title="t", transfer_formats=["int4"])
  assert "**int4**: kl_mean" in md and "**int8**: " not in md
  md = rp.write_report([make_row("passkey")], tmp_path / "pk", title="pk")
  assert "## Passkey retrieval" in md and "## Calibration transfer" not in md
  assert not list((tmp_path / "pk").glob("*.png"))


def test_write_report_rejects_bad_rows_before_writing(tmp_path):
  rows = report_rows()
  bad = copy.deepcopy(rows[1])
  del bad["weight_precision"]
  with pytest.raises(ValueError, match="row 3: result row lacks 'weight_precision'"):
    rp.write_report(rows[:3] + [bad], tmp_path / "w", title="t")
  assert not (tmp_path / "w").exists()
