"""Headroom rows: the schema check, capacity/breakdown/agreement tables, the plot and report."""

from __future__ import annotations

import copy
import json

import pytest

from kvtpu.headroom import report as hr

GIB, MIB = 2**30, 2**20
# Cache bytes per token per device of each format (synthetic).
BPT = {"bf16": 16384, "int8": 8448, "int4": 4608}
TRAINED = 131072


def make_row(kv_format, kind, asked, found, *, mode="analytic", oom=False, data=2, **over):
  """A valid row; `asked`/`found` are concurrency/context (max_context) or the reverse.

  Bytes: weights 8 GiB, cache batch * max_len * BPT, temporaries 256 MiB (+100 MiB in aot),
  other 16 MiB, total their sum.
  """
  if kind == "max_context":
    concurrency, context, max_len = asked, found, found
  else:
    concurrency, context, max_len = found, asked, asked
  batch = -(-concurrency // data) * data
  weights, cache = 8 * GIB, batch * max_len * BPT[kv_format]
  temp, other = 256 * MIB + (100 * MIB if mode == "aot" else 0), 16 * MIB
  row = {
      "model": "llama-3.1-8b", "weight_dtype": "bf16", "accelerator": "v5e-8", "chip": "v5e",
      "num_devices": 8, "mesh": f"data:{data},model:{8 // data}", "strategy": "heads",
      "mode": mode, "kv_format": kv_format, "kind": kind, "concurrency": concurrency,
      "context": context, "batch": batch, "max_len": max_len, "tokens": batch * max_len,
      "oom": oom, "hbm_per_device": 16 * GIB, "budget_per_device": int(16 * GIB * 0.95),
      "weights_per_device": weights, "cache_per_device": cache, "temp_per_device": temp,
      "other_per_device": other, "total_per_device": weights + cache + temp + other,
      "reserve_fraction": 0.05, "model_max_position": TRAINED,
      "calibration": "none (memory only: no calibration needed)",
  }
  row.update(over)
  return row


# Maxima per mode: (format, kind, asked) -> found. Each maximum also gets an oom row past it.
ANALYTIC = {
    ("bf16", "max_context", 1): 200_000, ("bf16", "max_context", 8): 30_000,
    ("int8", "max_context", 1): 390_000, ("int8", "max_context", 8): 58_200,
    ("int4", "max_context", 1): 700_000, ("int4", "max_context", 8): 110_000,
    ("bf16", "max_concurrency", 8192): 40, ("bf16", "max_concurrency", 131072): 2,
    ("int8", "max_concurrency", 8192): 76, ("int8", "max_concurrency", 131072): 4,
    ("int4", "max_concurrency", 8192): 140, ("int4", "max_concurrency", 131072): 6,
}
# aot finds a little less for bf16 at conc 8 (its first failure is analytic's maximum).
AOT = {**ANALYTIC, ("bf16", "max_context", 8): 29_952}
AOT_OOM = {("bf16", "max_context", 8): 30_000}


def sweep(modes=("analytic", "aot")):
  rows = []
  for mode in modes:
    maxima = ANALYTIC if mode == "analytic" else AOT
    for (fmt, kind, asked), found in maxima.items():
      rows.append(make_row(fmt, kind, asked, found, mode=mode))
      step = 128 if kind == "max_context" else 2
      past = AOT_OOM.get((fmt, kind, asked), found + step) if mode == "aot" else found + step
      rows.append(make_row(fmt, kind, asked, past, mode=mode, oom=True))
  return rows


def parse_tables(md):
  """Every markdown table in `md` as a list of {header: cell} dicts."""
  tables, lines = [], md.splitlines()
  for i, line in enumerate(lines):
    if line.startswith("| ") and (i == 0 or not lines[i - 1].startswith("|")):
      head = [c.strip() for c in line.strip("|").split(" | ")]
      body = []
      for row in lines[i + 2:]:
        if not row.startswith("|"):
          break
        body.append(dict(zip(head, (c.strip() for c in row.strip("|").split(" | ")),
                             strict=True)))
      tables.append(body)
  return tables


def by_format(table):
  return {line["KV format"]: line for line in table}


# --------------------------------------------------------------------------------------
# Schema.


def test_valid_rows_pass():
  hr.check_rows(sweep())
  hr.check_row(make_row("int8", "max_context", 8, 1000, note="tile padding"))


@pytest.mark.parametrize("field", ["model", "kv_format", "mode", "oom", "total_per_device",
                                   "model_max_position", "calibration", "reserve_fraction"])
def test_missing_field_is_named(field):
  row = make_row("int8", "max_context", 8, 1000)
  del row[field]
  with pytest.raises(ValueError, match=f"lacks '{field}'"):
    hr.check_row(row)


@pytest.mark.parametrize(("field", "value"), [
    ("num_devices", "8"), ("num_devices", 0), ("oom", 0), ("batch", True), ("mode", "jit"),
    ("kind", "max_batch"), ("strategy", "auto"), ("model", ""), ("cache_per_device", 1.5),
    ("reserve_fraction", 1.0), ("note", 3), ("hbm_per_device", 0), ("other_per_device", None),
    ("effective_bits", 0), ("effective_bits", "4.5"),
])
def test_ill_typed_field_is_named(field, value):
  row = make_row("int8", "max_context", 8, 1000)
  row[field] = value
  with pytest.raises(ValueError, match=f"'{field}'"):
    hr.check_row(row)


def test_inconsistent_counts_are_named():
  row = make_row("int8", "max_context", 8, 1000)
  with pytest.raises(ValueError, match="'tokens'"):
    hr.check_row({**row, "tokens": row["tokens"] + 1})
  with pytest.raises(ValueError, match="'batch'"):
    hr.check_row({**row, "batch": 6, "tokens": 6000})
  with pytest.raises(ValueError, match="'context'"):
    hr.check_row({**row, "context": 1024})
  with pytest.raises(ValueError, match="row 1: .*'mode'"):
    hr.check_rows([row, {**row, "mode": "jit"}])
  with pytest.raises(ValueError, match="must be a dict"):
    hr.check_row([row])


def test_other_bytes_may_be_negative():
  hr.check_row(make_row("int8", "max_context", 8, 1000, other_per_device=-4096))


# --------------------------------------------------------------------------------------
# Capacity table.


def test_capacity_table_numbers_and_ratio():
  md = hr.capacity_table(sweep(), mode="analytic", concurrencies=(1, 8),
                         contexts=(8192, 131072))
  (table,) = parse_tables(md)
  assert list(table[0]) == ["KV format", "max context @ conc 1", "max context @ conc 8",
                            "max concurrency @ ctx 8K", "max concurrency @ ctx 128K",
                            "token capacity vs bf16"]
  rows = by_format(table)
  assert list(rows) == ["bf16", "int8", "int4"]
  # Concurrency 1 allocates batch 2 (data axis 2); contexts past 131072 get the footnote.
  assert rows["bf16"]["max context @ conc 1"] == "200,000* (batch 2)"
  assert rows["int8"]["max context @ conc 8"] == "58,200"
  assert rows["int4"]["max context @ conc 8"] == "110,000"
  assert rows["int8"]["max concurrency @ ctx 8K"] == "76"
  assert rows["bf16"]["max concurrency @ ctx 128K"] == "2"
  # At concurrency 8 (the largest both solved): 8 * 58,200 / (8 * 30,000) = 1.94.
  assert rows["bf16"]["token capacity vs bf16"] == "1.00x"
  assert rows["int8"]["token capacity vs bf16"] == "1.94x"
  assert rows["int4"]["token capacity vs bf16"] == "3.67x"  # 110,000 / 30,000
  assert "concurrency 8" in md
  assert "\\* beyond the model's trained context (131,072 tokens" in md


def test_capacity_table_shows_effective_bits_when_rows_carry_them():
  bits = {"bf16": 16.0, "int8": 8.25, "int4": 4.7578125}
  rows = [dict(r, effective_bits=bits[r["kv_format"]]) for r in sweep()]
  table = by_format(parse_tables(hr.capacity_table(rows, mode="analytic", concurrencies=(1,),
                                                   contexts=(8192,)))[0])
  assert list(table["int4"])[:2] == ["KV format", "effective bits @ 8K"]
  assert [table[f]["effective bits @ 8K"] for f in bits] == ["16", "8.25", "4.76"]


def test_capacity_table_excludes_oom_rows():
  rows = sweep()
  md = hr.capacity_table(rows, mode="aot", concurrencies=(1, 8), contexts=(8192,))
  cells = by_format(parse_tables(md)[0])
  assert cells["bf16"]["max context @ conc 8"] == "29,952"  # aot's oom row is at 30,000
  assert cells["int8"]["max context @ conc 8"] == "58,200"  # oom row at 58,328
  assert cells["int8"]["max concurrency @ ctx 8K"] == "76"  # oom row at 78
  assert "58,328" not in md and "78" not in md
  # 58,200 / 29,952 = 1.9431 (aot's own bf16).
  assert cells["int8"]["token capacity vs bf16"] == "1.94x"
  # Only oom rows of a point: "-".
  only_oom = [r for r in rows if not (r["mode"] == "aot" and r["kv_format"] == "int4"
                                      and r["kind"] == "max_context" and r["concurrency"] == 8
                                      and not r["oom"])]
  cells = by_format(parse_tables(hr.capacity_table(only_oom, mode="aot", concurrencies=(8,),
                                                   contexts=()))[0])
  assert cells["int4"]["max context @ conc 8"] == "-"
  assert cells["int4"]["token capacity vs bf16"] == "n/a"


def test_capacity_table_without_bf16_and_nothing_fits():
  rows = [make_row("int8", "max_context", 8, 58_200), make_row("int4", "max_context", 8, 0),
          make_row("int4", "max_concurrency", 262144, 0),
          make_row("int8", "max_concurrency", 262144, 2)]
  md = hr.capacity_table(rows, mode="analytic", concurrencies=(8,), contexts=(262144,))
  cells = by_format(parse_tables(md)[0])
  assert list(cells) == ["int8", "int4"]
  assert cells["int4"]["max context @ conc 8"] == "0 (does not fit)"
  assert cells["int4"]["max concurrency @ ctx 256K*"] == "0 (does not fit)"
  assert cells["int8"]["max concurrency @ ctx 256K*"] == "2"
  assert {c["token capacity vs bf16"] for c in cells.values()} == {"n/a"}
  assert "trained context" in md
  # bf16 seen last still comes first.
  rows.append(make_row("bf16", "max_context", 8, 30_000))
  md = hr.capacity_table(rows, mode="analytic", concurrencies=(8,), contexts=())
  assert list(by_format(parse_tables(md)[0])) == ["bf16", "int8", "int4"]
  assert "_no rows in this mode_" in hr.capacity_table(rows, mode="live")
  with pytest.raises(ValueError, match="mode"):
    hr.capacity_table(rows, mode="jit")


def test_several_maxima_for_one_point_raise():
  rows = [make_row("int8", "max_context", 8, 1000), make_row("int8", "max_context", 8, 2000)]
  with pytest.raises(ValueError, match="several non-oom"):
    hr.capacity_table(rows, mode="analytic")


# --------------------------------------------------------------------------------------
# Breakdown and agreement.


def test_breakdown_table():
  (table,) = parse_tables(hr.breakdown_table(sweep(), mode="analytic"))
  assert len(table) == len(ANALYTIC)  # one line per maximum, no oom rows
  line = next(t for t in table if t["KV format"] == "int8"
              and t["solved"] == "max context @ conc 8")
  assert line["batch x max_len"] == "8 x 58,200"
  # cache: 8 * 58,200 * 8448 B = 3.663 GiB; total 8 + 3.663 + 0.25 + 0.0156 GiB.
  assert line["weights"] == "8.00" and line["cache"] == "3.66" and line["temporaries"] == "0.25"
  assert line["other"] == "0.02" and line["total"] == "11.93"
  assert line["budget"] == "15.20" and line["HBM"] == "16.00"
  assert [t["solved"] for t in table[:4]] == [
      "max context @ conc 1", "max context @ conc 8", "max concurrency @ ctx 8K",
      "max concurrency @ ctx 128K"]


def test_agreement_table():
  md = hr.agreement_table(sweep(), ["analytic", "aot"])
  found, bytes_ = parse_tables(md)
  line = next(t for t in found if t["KV format"] == "bf16" and t["solved"].endswith("conc 8"))
  # (29,952 - 30,000) / 30,000 = -0.16 %.
  assert line["found: analytic"] == "30,000" and line["found: aot"] == "29,952 (-0.2 %)"
  assert len(bytes_) == len(ANALYTIC)
  assert sum("oom row" in t["batch x max_len"] for t in bytes_) == 1
  # bf16 @ conc 8: analytic's maximum (8 x 30,000) against aot's oom row of the same shape.
  # total = 8 GiB + 8 * 30,000 * 16384 + 256 MiB + 16 MiB = 12,807,307,264 B; aot adds
  # 100 MiB of temporaries: 104,857,600 / 12,807,307,264 = +0.8187 %.
  line = next(t for t in bytes_ if t["KV format"] == "bf16" and t["solved"].endswith("conc 8"))
  assert line["mode"] == "aot" and line["batch x max_len"] == "8 x 30,000 (aot: oom row)"
  assert line["total, analytic (GiB)"] == "11.93" and line["total, mode (GiB)"] == "12.03"
  assert line["difference"] == "+0.82 %" and line["within 2 %"] == "yes"
  assert line["Δ weights (MiB)"] == "+0.0" and line["Δ temporaries (MiB)"] == "+100.0"
  assert line["Δ cache (MiB)"] == "+0.0" and line["Δ other (MiB)"] == "+0.0"
  assert f"{len(ANALYTIC)} of {len(ANALYTIC)} compared totals agree within 2 %" in md
  strict = hr.agreement_table(sweep(), ["analytic", "aot"], tolerance=0.005)
  assert "0 of" in strict and "within 0.5 %" in strict
  assert "nothing to compare" in hr.agreement_table(sweep(("aot",)), ["analytic", "aot"])


def test_agreement_without_common_shape():
  rows = [make_row("int8", "max_context", 8, 1000), make_row("int8", "max_context", 8, 900,
                                                             mode="aot")]
  md = hr.agreement_table(rows, ["analytic", "aot"])
  assert "no common shape" in md and "0 of 0" in md


# --------------------------------------------------------------------------------------
# Plot and report.


def test_write_report(tmp_path):
  rows = sweep()
  rows[0]["note"] = "weights counted from the preset"
  header = ["model: llama-3.1-8b", "weights: bf16", "KV: bf16, int8, int4", "accelerator: v5e-8",
            "mesh: data:2,model:4", "strategy: heads", "reserve: 5 %", "modes: analytic, aot"]
  paths = hr.write_report(rows, tmp_path / "out", title="Headroom: llama-3.1-8b on v5e-8",
                          header_lines=header)
  assert set(paths) == {"results", "report", "plot"}
  with open(paths["plot"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert hr.read_jsonl(paths["results"]) == rows
  report = open(paths["report"]).read()
  assert report.startswith("# Headroom: llama-3.1-8b on v5e-8\n")
  assert "- mesh: data:2,model:4" in report
  assert "- calibration: none (memory only: no calibration needed)" in report
  assert report.index("## Mode: analytic") < report.index("## Mode: aot") < report.index(
      "## Agreement between modes")
  assert "![max context vs concurrency (aot)](context_vs_concurrency.png)" in report
  assert "weights counted from the preset" in report
  # Columns come from the rows: concurrencies 1, 8; contexts 8K, 128K.
  assert "max context @ conc 8 | max concurrency @ ctx 8K" in report
  # One mode: no agreement section.
  one = hr.write_report(sweep(("analytic",)), tmp_path / "one", title="t", header_lines=[])
  assert "Agreement" not in open(one["report"]).read()


def test_write_report_rejects_bad_rows(tmp_path):
  rows = sweep()
  bad = copy.deepcopy(rows)
  del bad[3]["cache_per_device"]
  with pytest.raises(ValueError, match="row 3: .*'cache_per_device'"):
    hr.write_report(bad, tmp_path, title="t", header_lines=[])
  assert not (tmp_path / "results.jsonl").exists()
  path = tmp_path / "results.jsonl"
  path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(bad[3]) + "\n")
  with pytest.raises(ValueError, match=":3: .*'cache_per_device'"):
    hr.read_jsonl(path)


def test_plot_without_points(tmp_path):
  path = tmp_path / "empty.png"
  hr.plot_context_vs_concurrency([make_row("int4", "max_context", 8, 0)], path, mode="analytic",
                                 title="nothing fits")
  assert path.read_bytes().startswith(b"\x89PNG")
