"""The report helpers: tables, percent, schema checks, atomic files, row logs and plots."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from kvtpu import reports

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# --------------------------------------------------------------------------------------
# Tables and percent.


def test_markdown_table_escapes_and_checks_widths():
  md = reports.markdown_table(["config", "top-1 (%)"], [["int8 | dynamic", "98.58"],
                                                        ["two\nlines", 1]])
  assert md.splitlines() == ["| config | top-1 (%) |", "|---|---|",
                             "| int8 \\| dynamic | 98.58 |", "| two lines | 1 |"]
  with pytest.raises(ValueError, match="table line 0 has 1 cells for 2 columns"):
    reports.markdown_table(["a", "b"], [["x"]])


@pytest.mark.parametrize("fraction,kwargs,text", [
    (0.9858, {}, "98.58"),
    (-0.0009192, {}, "-0.09192"),
    (0.0052, {"signed": True}, "+0.52"),
    (-0.0052, {"signed": True}, "-0.52"),
    (0.0, {"signed": True}, "0"),
    (1.0, {"fmt": "{:.0f}"}, "100"),
    (0.08, {}, "8"),
    (1.2e-7, {}, "1.2e-05"),
    (-1e-9, {"fmt": "{:.2f}"}, "0.00"),  # no "-0.00"
    (math.nan, {}, "nan"),
])
def test_percent(fraction, kwargs, text):
  assert reports.percent(fraction, **kwargs) == text


# --------------------------------------------------------------------------------------
# Schema helpers.


def test_predicates():
  assert reports.is_int(3) and not reports.is_int(True) and not reports.is_int(3.0)
  assert reports.is_num(2.5) and reports.is_num(-1) and not reports.is_num(math.inf)
  assert not reports.is_num(math.nan) and not reports.is_num(False) and not reports.is_num("1")
  assert reports.is_str("a") and not reports.is_str("  ") and not reports.is_str(None)
  assert reports.is_pos_int(1) and not reports.is_pos_int(0)
  assert reports.is_nonneg_int(0) and not reports.is_nonneg_int(-1)


def test_require_names_the_field_and_what_it_must_be():
  row = {"batch": 0, "metrics": {"kl": "x"}}
  assert reports.require({"batch": 2}, "batch", reports.is_pos_int, "an int > 0") == 2
  with pytest.raises(ValueError, match=r"^result row field 'batch' must be an int > 0, got 0$"):
    reports.require(row, "batch", reports.is_pos_int, "an int > 0")
  with pytest.raises(ValueError, match=r"^result row lacks 'context'$"):
    reports.require(row, "context", reports.is_pos_int, "an int > 0")
  with pytest.raises(ValueError, match=r"'metrics\.kl' must be a finite number, got 'x'"):
    reports.require(row["metrics"], "kl", reports.is_num, "a finite number", path="metrics.kl")
  with pytest.raises(ValueError, match="lacks 'b'"):
    reports.require_fields({"a": 1}, ["a", "b"])
  with pytest.raises(ValueError, match="must be a dict, got list"):
    reports.require_fields([], ["a"])


def test_check_rows_names_the_row():
  def check(row):
    reports.require(row, "n", reports.is_int, "an int")

  reports.check_rows([{"n": 1}, {"n": 2}], check)
  with pytest.raises(ValueError, match=r"^row 1: result row field 'n' must be an int"):
    reports.check_rows([{"n": 1}, {"n": "2"}], check)


# --------------------------------------------------------------------------------------
# Atomic files and JSONL.


def test_atomic_write_replaces_whole_files_and_keeps_the_old_one_on_failure(tmp_path):
  path = tmp_path / "sub" / "report.md"
  reports.write_text(path, "old\n")
  assert path.read_text() == "old\n"
  with pytest.raises(RuntimeError, match="boom"):
    with reports.atomic_path(path) as tmp:
      tmp.write_text("half a rep")
      assert tmp.parent == path.parent and tmp != path
      raise RuntimeError("boom")
  assert path.read_text() == "old\n"  # untouched
  assert sorted(p.name for p in path.parent.iterdir()) == ["report.md"]  # no temporary left
  reports.write_json(tmp_path / "c.json", {"a": [1, 2]})
  assert json.loads((tmp_path / "c.json").read_text()) == {"a": [1, 2]}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "sub"]


def test_jsonl_round_trip_and_checks(tmp_path):
  def check(row):
    reports.require(row, "n", reports.is_int, "an int")

  path = tmp_path / "results.jsonl"
  reports.write_jsonl([{"n": 1}, {"n": 2}], path, check)
  assert path.read_text() == '{"n": 1}\n{"n": 2}\n'
  assert reports.read_jsonl(path, check) == [{"n": 1}, {"n": 2}]
  with pytest.raises(ValueError, match="row 1: .*'n'"):
    reports.write_jsonl([{"n": 3}, {"n": "x"}], path, check)
  assert reports.read_jsonl(path) == [{"n": 1}, {"n": 2}]  # a failed check writes nothing
  path.write_text('{"n": 1}\n\n{"n": "x"}\n')
  with pytest.raises(ValueError, match=r"results\.jsonl:3: .*'n'"):
    reports.read_jsonl(path, check)
  path.write_text("{oops\n")
  with pytest.raises(ValueError, match=r"results\.jsonl:1:"):
    reports.read_jsonl(path)


def test_row_log_appends_as_rows_finish(tmp_path):
  def check(row):
    reports.require(row, "n", reports.is_int, "an int")

  path = tmp_path / "results.jsonl"
  path.write_text('{"n": 99}\n')  # a previous run's rows: a new log starts afresh
  log = reports.RowLog(path, check)
  assert path.read_text() == ""
  log.append({"n": 1})
  assert reports.read_jsonl(path) == [{"n": 1}]  # on disk before the next row
  log.extend([{"n": 2}, {"n": 3}])
  with pytest.raises(ValueError, match="row 3: .*'n'"):
    log.append({"n": "four"})
  assert reports.read_jsonl(path) == log.rows == [{"n": 1}, {"n": 2}, {"n": 3}]


# --------------------------------------------------------------------------------------
# Styles and plots.


def _has_color(png, color: str, tol: float = 0.02) -> bool:
  import matplotlib.image  # noqa: PLC0415

  img = matplotlib.image.imread(png)[..., :3]
  rgb = np.array([int(color[i:i + 2], 16) / 255 for i in (1, 3, 5)])
  return bool((np.abs(img - rgb).max(axis=-1) < tol).any())


def test_style_of_is_stable_and_distinct():
  assert reports.style_of("int8") == reports.style_of("int8")
  assert reports.style_of("int8").color == reports.FORMAT_COLORS["int8"]
  assert reports.style_of("bf16").color == "#000000"  # the baseline in black
  named = {reports.style_of(n).color for n in reports.FORMAT_COLORS}
  assert len(named) == len(reports.FORMAT_COLORS)
  # A name outside the table: a palette colour, the same on every call.
  assert reports.style_of("k=int8-channel,v=int8") == reports.style_of("k=int8-channel,v=int8")
  # Variants of one format: shades with their own marker and line style, all different.
  variants = [reports.style_of("int4", v) for v in ("dynamic", "prose", "code", "chat", "mine")]
  assert variants[0] == reports.style_of("int4")
  assert len({s.color for s in variants}) == len({s.marker for s in variants}) == 5


def test_a_configuration_keeps_its_colour_across_plots(tmp_path):
  a = reports.plot_series(tmp_path / "a.png", [
      reports.Series("int8", [1, 2], [1.0, 2.0]), reports.Series("int4", [1, 2], [3.0, 5.0])],
      title="a", xlabel="x", ylabel="y")
  b = reports.plot_series(tmp_path / "b.png", [
      reports.Series("fp8_e5m2", [10], [0.5]), reports.Series("int8", [10], [0.7])],
      title="b", xlabel="x", ylabel="y", kind="points")
  for fig in (a, b):
    assert fig.path.read_bytes().startswith(PNG_MAGIC)
    assert _has_color(fig.path, reports.FORMAT_COLORS["int8"])
  assert _has_color(a.path, reports.FORMAT_COLORS["int4"])
  assert not _has_color(b.path, reports.FORMAT_COLORS["int4"])


def test_coincident_series_are_found_drawn_and_named(tmp_path):
  series = [reports.Series("bf16", [1, 8, 32], [1e6, 1.2e5, 3e4]),
            reports.Series("int8", [1, 8, 32], [2e6, 2.4e5, 6e4]),
            reports.Series("fp8_e4m3", [32, 1, 8], [6e4, 2e6, 2.4e5]),  # same points, any order
            reports.Series("int4", [1, 8, 32], [4e6, 4.8e5, 1.2e5])]
  assert reports.coincident_groups(series, yscale="log") == [[1, 2]]
  # Within 0.4 % of the (log) axis span is coincident; 2 % is not.
  near = reports.Series("near", [1, 8, 32], [2.01e6, 2.4e5, 6e4])
  apart = reports.Series("apart", [1, 8, 32], [2.4e6, 2.4e5, 6e4])
  assert reports.coincident_groups([series[1], near, apart], yscale="log") == [[0, 1]]
  assert reports.coincident_groups([series[1], reports.Series("x", [1, 8], [2e6, 2.4e5])]) == []
  fig = reports.plot_series(tmp_path / "h.png", series, title="t", xlabel="x", ylabel="y",
                            xscale="log2", yscale="log2")
  assert fig.notes == ("int8 and fp8_e4m3 coincide (values within 0.4 % of the axis): drawn as "
                       "one line, the later ones dashed over the first, with larger hollow "
                       "markers.",)
  # Both colours are on the image: the later series is drawn over, not hidden under.
  assert _has_color(fig.path, reports.FORMAT_COLORS["int8"])
  assert _has_color(fig.path, reports.FORMAT_COLORS["fp8_e4m3"])
  assert "coincide" in fig.markdown("alt", "Each point: one maximum.")


def test_auto_scale_and_log_axes(tmp_path):
  assert reports.auto_scale([0.5, 0.9]) == "linear"
  assert reports.auto_scale([6e-4, 0.3]) == "log"
  assert reports.auto_scale([-0.09, 0.0, 42.0]) == "symlog"
  assert reports.auto_scale([0.0, 0.0]) == "linear"
  assert reports.auto_scale([]) == "linear"
  fig = reports.plot_series(tmp_path / "l.png", [reports.Series("int8", [1, 2, 3], [0.0, 1e-3, 1.0])],
                            title="t", xlabel="x", ylabel="y", yscale="log",
                            baseline=reports.Baseline("bf16 reference (0)", y=0.0))
  assert fig.notes == ("1 point(s) with values a log axis cannot show (<= 0) are left out.",)


def test_figure_markdown_puts_the_caption_under_the_image(tmp_path):
  fig = reports.Figure(tmp_path / "kl.png", ("note one.",))
  assert fig.markdown("KL", "Each point: the mean over workloads.") == (
      "![KL](kl.png)\n\n*Each point: the mean over workloads. note one.*")
  assert reports.Figure(tmp_path / "x.png").markdown("x", "") == "![x](x.png)"


def test_plot_errors_and_empty_plots(tmp_path):
  with pytest.raises(ValueError, match="kind must be 'line' or 'points'"):
    reports.plot_series(tmp_path / "p.png", [], title="t", xlabel="x", ylabel="y", kind="bars")
  with pytest.raises(ValueError, match="2 x values for 1 y"):
    reports.Series("int8", [1, 2], [1.0])
  fig = reports.plot_series(tmp_path / "e.png", [], title="nothing", xlabel="x", ylabel="y")
  assert fig.path.read_bytes().startswith(PNG_MAGIC)


def test_heatmaps(tmp_path):
  grid = np.abs(np.random.default_rng(0).standard_normal((4, 12))) + 1e-3
  fig = reports.plot_heatmaps(tmp_path / "m.png", [("K", grid), ("V", grid * 10)], title="|x| max",
                              xlabel="channel", ylabel="layer", colorbar_label="|x| max")
  assert fig.path.read_bytes().startswith(PNG_MAGIC) and fig.notes == ()


def test_pareto_front_leaves_out_dominated_points():
  # (benefit, cost): (2, 1) is beaten by (2, 0.5); (1.5, 2) by (2, 0.5) on both.
  points = [(1.0, 0.0), (2.0, 1.0), (2.0, 0.5), (4.0, 5.0), (1.5, 2.0)]
  assert reports.pareto_front(points) == [True, False, True, True, False]
  assert reports.pareto_front([(1.0, 0.0), (1.0, 0.0)]) == [True, True]  # Ties dominate neither.
  # A NaN metric places no point: off the front, dominating none.
  assert reports.pareto_front([(1.0, math.nan), (2.0, 1.0), (math.inf, 0.0)]) == [False, True, False]
  line = reports.pareto_line([(4.0, 5.0), (1.0, 0.0), (2.0, 0.5)])
  assert (list(line.x), list(line.y)) == ([1.0, 2.0, 4.0], [0.0, 0.5, 5.0])
  assert reports.pareto_line([(1.0, 0.0)]) is None
