"""Report output shared by every report: tables, result rows, files and plots.

Every binary writes its outputs through this module, so that all reports read alike:

  Tables   markdown_table(head, body)        cells escaped ("|", newlines)
           percent(fraction)                 a fraction as a number of percent; the
                                             unit goes in the column header ("(%)")
  Schema   is_int, is_num, is_str, is_pos_int, is_nonneg_int   field predicates
           require(row, key, ok, what)       one field, or a ValueError naming it
           require_fields(row, fields)       every field present
           check_rows(rows, check)           every row; the error names the row index
  Files    atomic_path(path)                 write to a temporary name, then rename
           write_text, write_json            atomic
  Rows     write_jsonl(rows, path, check)    checked, atomic, one JSON object per line
           read_jsonl(path, check)           checked; errors name file and line
           RowLog(path, check, resume)       appends each row as it finishes (fsync'd),
                                             so an interrupted sweep keeps what it
                                             measured and a resumed one continues it
  Plots    style_of(name, variant)           a configuration's colour, marker and line
                                             style: the same in every plot and report
           plot_series(path, series, ...)    lines or points; coincident series drawn
                                             both visibly and named in the legend and
                                             the caption notes; legend outside the
                                             axes; log axes where values span decades;
                                             an optional baseline
           plot_heatmaps(path, panels, ...)  2-D maps with a log colour scale
           pareto_front(points)              which (benefit, cost) points no other
                                             beats on both; pareto_line(points) draws it

Plot functions return a `Figure`: the path and the notes (coincident series, points a
log axis cannot show) that a report prints under the image beside its own statement
of what each point averages (`Figure.markdown`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import textwrap
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Baseline", "Figure", "RowLog", "Series", "Style", "atomic_path", "auto_scale",
    "check_rows", "coincident_groups", "is_int", "is_nonneg_int", "is_num", "is_pos_int",
    "is_str", "markdown_table", "pareto_front", "pareto_line", "percent", "plot_heatmaps",
    "plot_series", "read_jsonl",
    "require", "require_fields", "style_of", "write_json", "write_jsonl", "write_text",
]

# --------------------------------------------------------------------------------------
# Tables.


def _cell(text: Any) -> str:
  return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(head: Sequence[Any], body: Iterable[Sequence[Any]]) -> str:
  """A markdown table; "|" in cells is escaped and newlines become spaces.

  Raises:
    ValueError: for a body line whose length differs from the header's.
  """
  head = list(head)
  lines = ["| " + " | ".join(_cell(h) for h in head) + " |", "|" + "---|" * len(head)]
  for i, line in enumerate(body):
    line = list(line)
    if len(line) != len(head):
      raise ValueError(f"table line {i} has {len(line)} cells for {len(head)} columns")
    lines.append("| " + " | ".join(_cell(c) for c in line) + " |")
  return "\n".join(lines)


def percent(fraction: float, fmt: str = "{:.4g}", *, signed: bool = False) -> str:
  """`fraction` as a number of percent, without the unit (the column header carries "%").

  `percent(0.9858) == "98.58"`, `percent(-0.0009192) == "-0.09192"`,
  `percent(0.0052, signed=True) == "+0.52"`; NaN is "nan".
  """
  value = 100.0 * float(fraction)
  if not math.isfinite(value):
    return str(value)
  text = fmt.format(value)
  if text.startswith("-") and float(text) == 0:
    text = text[1:]  # -0 reads as a sign where there is none.
  return "+" + text if signed and value > 0 else text


# --------------------------------------------------------------------------------------
# Row schema helpers.


def is_int(x: Any) -> bool:
  """An int that is not a bool."""
  return isinstance(x, int) and not isinstance(x, bool)


def is_num(x: Any) -> bool:
  """A finite int or float that is not a bool."""
  return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def is_str(x: Any) -> bool:
  """A str with a non-space character."""
  return isinstance(x, str) and bool(x.strip())


def is_pos_int(x: Any) -> bool:
  return is_int(x) and x > 0


def is_nonneg_int(x: Any) -> bool:
  return is_int(x) and x >= 0


def require(row: dict, key: str, ok: Callable[[Any], bool], what: str, *,
            path: str | None = None) -> Any:
  """`row[key]`, or a ValueError naming the field (`path`, default `key`) and `what` it
  must be."""
  path = key if path is None else path
  if key not in row:
    raise ValueError(f"result row lacks {path!r}")
  if not ok(row[key]):
    raise ValueError(f"result row field {path!r} must be {what}, got {repr(row[key])[:80]}")
  return row[key]


def require_fields(row: Any, fields: Iterable[str]) -> None:
  """A dict holding every one of `fields`, or a ValueError naming the first missing."""
  if not isinstance(row, dict):
    raise ValueError(f"a result row must be a dict, got {type(row).__name__}")
  for field in fields:
    if field not in row:
      raise ValueError(f"result row lacks {field!r}")


def check_rows(rows: Iterable[Any], check: Callable[[Any], None]) -> None:
  """`check(row)` on every row; a ValueError starts with the failing row's index."""
  for i, row in enumerate(rows):
    try:
      check(row)
    except ValueError as e:
      raise ValueError(f"row {i}: {e}") from None


# --------------------------------------------------------------------------------------
# Files.


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
  """Yields a temporary path beside `path`; renames it to `path` when the block succeeds.

  Readers see the old file or the whole new one, never a partial write; when the block
  raises, the temporary file is removed and `path` is untouched. The parent folder is
  created if needed.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def write_text(path: str | Path, text: str) -> Path:
  """Writes `text` to `path` atomically (`atomic_path`); returns the path."""
  with atomic_path(path) as tmp:
    tmp.write_text(text)
  return Path(path)


def write_json(path: str | Path, obj: Any, *, indent: int = 2) -> Path:
  """Writes `obj` as JSON to `path` atomically; returns the path."""
  return write_text(path, json.dumps(obj, indent=indent) + "\n")


def write_jsonl(rows: Sequence[dict], path: str | Path,
                check: Callable[[Any], None] | None = None) -> Path:
  """Checks every row (`check`, when given; nothing is written if one fails), then writes
  them to `path` atomically, one JSON object per line."""
  if check is not None:
    check_rows(rows, check)
  return write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: str | Path, check: Callable[[Any], None] | None = None) -> list[dict]:
  """The rows of a JSONL file (blank lines skipped), each checked with `check` when given.

  Raises:
    ValueError: "<path>:<line>: <reason>" for a line that is not JSON or fails the check.
  """
  with open(path) as f:
    return _parse_jsonl(f, path, check)


def _parse_jsonl(lines: Iterable[str], path: str | Path,
                 check: Callable[[Any], None] | None) -> list[dict]:
  rows = []
  for n, line in enumerate(lines, 1):
    if line.strip():
      try:
        row = json.loads(line)
        if check is not None:
          check(row)
      except ValueError as e:
        raise ValueError(f"{path}:{n}: {e}") from None
      rows.append(row)
  return rows


class RowLog:
  """A JSONL file that grows by one checked row as each point of a sweep finishes.

  Opening starts the file afresh (an empty file at `path`), or with `resume=True` keeps
  the rows already there (each checked; a missing file starts empty) and appends after
  them. `append` checks the row, writes its line and flushes it to disk (fsync), so an
  interrupted run keeps every finished row; `extend` writes its rows with one write,
  each line whole. `rows` holds the file's rows. The finished run usually rewrites the
  file with `write_jsonl` (same rows), which a reader may rely on being complete.

  A line is whole when it ends with a newline: a last line without one was cut short by
  an interrupted write, and `resume` drops it (`truncated` is then True, so the caller
  can also drop the other rows of the point that was being written).
  """

  def __init__(self, path: str | Path, check: Callable[[Any], None] | None = None, *,
               resume: bool = False):
    self.path, self.check = Path(path), check
    self.rows: list[dict] = []
    self.truncated = False
    if resume and self.path.exists():
      text = self.path.read_text()
      if text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]  # The line an interrupted write cut short.
        self.truncated = True
      self.rows = _parse_jsonl(text.splitlines(keepends=True), self.path, check)
      if self.truncated:
        write_text(self.path, text)
    else:
      write_text(self.path, "")

  def append(self, row: dict) -> None:
    """Checks (when the log has a check) and appends one row.

    Raises:
      ValueError: from the check; nothing is written.
    """
    self.extend([row])

  def extend(self, rows: Iterable[dict]) -> None:
    """Checks every row, then appends them all with one write and one fsync.

    Raises:
      ValueError: from the check ("row <index in the log>: ..."); nothing is written.
    """
    rows = list(rows)
    for i, row in enumerate(rows):
      if self.check is not None:
        try:
          self.check(row)
        except ValueError as e:
          raise ValueError(f"row {len(self.rows) + i}: {e}") from None
    if not rows:
      return
    text = "".join(json.dumps(row) + "\n" for row in rows)
    with open(self.path, "a") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    self.rows.extend(rows)

  def keep(self, keep: Callable[[dict], bool]) -> list[dict]:
    """Keeps only the rows for which `keep(row)` holds (the file rewritten atomically);
    returns the rows dropped."""
    dropped = [row for row in self.rows if not keep(row)]
    if dropped:
      self.rows = [row for row in self.rows if keep(row)]
      write_text(self.path, "".join(json.dumps(row) + "\n" for row in self.rows))
    return dropped


# --------------------------------------------------------------------------------------
# Plot styles: one per configuration, the same in every plot and report.


@dataclasses.dataclass(frozen=True)
class Style:
  """How a series is drawn: colour (hex), marker and line style (matplotlib names)."""

  color: str
  marker: str = "o"
  linestyle: str = "-"


# Formats that reports name most, each with its own colour (colour-blind-safe hues where
# possible; bf16, the baseline, in black). Other names get a colour from `_PALETTE` by a
# hash of the name, which is stable across runs, processes and reports.
FORMAT_COLORS: dict[str, str] = {
    "bf16": "#000000", "f32": "#7f7f7f", "int8": "#0072b2", "fp8_e4m3": "#e69f00",
    "int4": "#009e73", "fp8_e5m2": "#cc79a7", "k8v4": "#d55e00", "k4v8": "#56b4e9",
    "k8v16": "#8c564b", "k16v8": "#9467bd", "int8-asym": "#17becf", "int4-asym": "#bcbd22",
    "int4-g32": "#a6761d", "int4-asym-g32": "#666600",
    # The serving comparison's rotated schemes.
    "int8-rot": "#1f78b4", "int8-sbf16-rot": "#6a3d9a", "int4-sbf16-rot": "#33a02c",
    "int4-nu-sbf16-rot": "#e31a1c", "int4-asym-sbf16-rot": "#ff7f00",
}
_PALETTE = ("#1b9e77", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6cee3", "#b2df8a",
            "#fb9a99", "#fdbf6f", "#cab2d6", "#6a3d9a", "#b15928", "#1f78b4", "#33a02c",
            "#e31a1c", "#ff7f00")
# Variants of one configuration (e.g. the workloads scales were calibrated on): the
# base colour shaded, with its own marker and line style. Common names have fixed slots.
_VARIANT_SLOTS = {"prose": 1, "code": 2, "chat": 3}
_VARIANT_STYLES = (("o", "-", 0.0), ("s", "--", -0.4), ("^", "-.", 0.4), ("D", ":", -0.65),
                   ("v", (0, (5, 2, 1, 2)), 0.6), ("P", (0, (1, 1)), -0.2))


def _hash(text: str) -> int:
  return zlib.crc32(text.encode())


def _shade(color: str, amount: float) -> str:
  """`color` blended towards white (amount > 0) or black (amount < 0) by |amount|."""
  rgb = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)], np.float64)
  target = 255.0 if amount > 0 else 0.0
  mixed = rgb + (target - rgb) * abs(amount)
  return "#" + "".join(f"{int(round(c)):02x}" for c in mixed)


def style_of(name: str, variant: str | None = None) -> Style:
  """The style of configuration `name`, optionally one `variant` of it.

  A pure function of its arguments: a configuration has the same colour in every plot of
  every report. Known format names have fixed colours (`FORMAT_COLORS`), others one from a
  palette by a hash of the name. A variant other than None or "dynamic" (e.g. the workload
  that calibrated the scales) shades the base colour and changes marker and line style;
  "prose", "code" and "chat" take fixed, mutually distinct slots.
  """
  color = FORMAT_COLORS.get(name) or _PALETTE[_hash(name) % len(_PALETTE)]
  if variant in (None, "dynamic"):
    return Style(color)
  slot = _VARIANT_SLOTS.get(variant, len(_VARIANT_SLOTS) + 1
                            + _hash(variant) % (len(_VARIANT_STYLES) - len(_VARIANT_SLOTS) - 1))
  marker, linestyle, amount = _VARIANT_STYLES[slot]
  return Style(_shade(color, amount), marker, linestyle)


# --------------------------------------------------------------------------------------
# Line and point plots.


@dataclasses.dataclass(frozen=True)
class Series:
  """One named series of a plot.

  Attributes:
    name: its legend label.
    x, y: its points (equal lengths; NaN and inf are left out).
    style: how it is drawn; default `style_of(name)`.
  """

  name: str
  x: Sequence[float]
  y: Sequence[float]
  style: Style | None = None

  def __post_init__(self):
    if len(self.x) != len(self.y):
      raise ValueError(f"series {self.name!r}: {len(self.x)} x values for {len(self.y)} y")


@dataclasses.dataclass(frozen=True)
class Baseline:
  """The reference a plot compares against, drawn as a grey line.

  Attributes:
    label: its legend entry, e.g. "bf16 reference cache (KL 0 by definition)".
    y: draws a horizontal line at y (when the y axis can show it: a log axis cannot
      show y <= 0; the legend then says so).
    x: draws a vertical line at x.
  """

  label: str
  y: float | None = None
  x: float | None = None


@dataclasses.dataclass(frozen=True)
class Figure:
  """A written plot: its path and the notes a reader needs beside it."""

  path: Path
  notes: tuple[str, ...] = ()

  def markdown(self, alt: str, caption: str) -> str:
    """The image and, under it, `caption` (say what each point averages) and the notes."""
    text = " ".join([caption.rstrip(), *self.notes]).strip()
    return f"![{alt}]({self.path.name})\n\n*{text}*" if text else f"![{alt}]({self.path.name})"


def auto_scale(values: Iterable[float], *, decades: float = 1.0) -> str:
  """"log" when the finite values are positive and span at least `decades` decades,
  "symlog" when they include zero or both signs and their nonzero magnitudes span that
  much (beyond the zero), else "linear"."""
  v = np.asarray([x for x in values if math.isfinite(x)], np.float64)
  if v.size == 0:
    return "linear"
  nonzero = np.abs(v[v != 0])
  if nonzero.size == 0 or nonzero.max() / nonzero.min() < 10**decades:
    return "linear"
  return "log" if (v > 0).all() else "symlog"


def _transform(scale: str, v: np.ndarray, linthresh: float) -> np.ndarray:
  if scale in ("log", "log2"):
    return np.log10(v)
  if scale == "symlog":
    return np.sign(v) * np.log10(1 + np.abs(v) / linthresh)
  return v


def coincident_groups(series: Sequence[Series], *, xscale: str = "linear",
                      yscale: str = "linear", tolerance: float = 0.004) -> list[list[int]]:
  """Indices of series that would hide one another: the same x values and y values within
  `tolerance` of the y axis span (measured on the axis's scale) at every x.

  Returns:
    Groups of two or more indices, each in input order.
  """
  points = []
  for s in series:
    pairs = sorted((float(x), float(y)) for x, y in zip(s.x, s.y, strict=True)
                   if math.isfinite(x) and math.isfinite(y))
    points.append(pairs)
  ys = np.asarray([y for p in points for _, y in p], np.float64)
  if ys.size == 0:
    return []
  linthresh = _linthresh(ys)
  ok = ys > 0 if yscale in ("log", "log2") else np.ones_like(ys, bool)
  t = _transform(yscale, ys[ok], linthresh) if ok.any() else np.zeros(1)
  span = float(t.max() - t.min()) if t.size else 0.0
  tol = tolerance * span if span > 0 else 1e-12

  def same(a, b) -> bool:
    if not a or [x for x, _ in a] != [x for x, _ in b]:
      return False
    ya = np.asarray([y for _, y in a])
    yb = np.asarray([y for _, y in b])
    if yscale in ("log", "log2") and ((ya <= 0) | (yb <= 0)).any():
      return bool(np.array_equal(ya, yb))
    return bool(np.abs(_transform(yscale, ya, linthresh)
                       - _transform(yscale, yb, linthresh)).max() <= tol)

  groups: list[list[int]] = []
  placed: set[int] = set()
  for i in range(len(series)):
    if i in placed:
      continue
    group = [i] + [j for j in range(i + 1, len(series)) if j not in placed
                   and same(points[i], points[j])]
    if len(group) > 1:
      groups.append(group)
      placed.update(group)
  return groups


def _linthresh(values: np.ndarray) -> float:
  nonzero = np.abs(values[np.isfinite(values) & (values != 0)])
  if nonzero.size == 0:
    return 1.0
  return float(10 ** math.floor(math.log10(nonzero.min())))


def _names(names: Sequence[str]) -> str:
  names = list(names)
  return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _pyplot():
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  return plt


def _save(fig, path: Path) -> None:
  with atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def _inverse(scale: str, t: float, linthresh: float) -> float:
  if scale in ("log", "log2"):
    return 10**t
  if scale == "symlog":
    return math.copysign(linthresh * (10 ** abs(t) - 1), t)
  return t


def _limits(scale: str, values: np.ndarray, linthresh: float,
            margin: float = 0.06) -> tuple[float, float] | None:
  """Axis limits that show every drawable value with a margin on the axis's own scale
  (markers at the edge are never cut)."""
  v = values[np.isfinite(values)]
  if scale in ("log", "log2"):
    v = v[v > 0]
  if v.size == 0:
    return None
  t = _transform(scale, v, linthresh)
  lo, hi = float(t.min()), float(t.max())
  pad = margin * (hi - lo) if hi > lo else (0.5 if scale != "linear" else max(abs(lo), 1) * 0.1)
  return _inverse(scale, lo - pad, linthresh), _inverse(scale, hi + pad, linthresh)


def _set_scale(ax, axis: str, scale: str, values: np.ndarray, ticks: Sequence[float] | None,
               tick_label: Callable[[float], str] | None) -> None:
  from matplotlib.ticker import NullLocator  # noqa: PLC0415

  setter = ax.set_xscale if axis == "x" else ax.set_yscale
  if scale == "log2":
    setter("log", base=2)
  elif scale == "symlog":
    setter("symlog", linthresh=_linthresh(values))
  elif scale == "log":
    setter("log")
  if ticks is not None:
    ticks = list(ticks)
    if len(ticks) > 12:  # At most 12 labels: they never overprint.
      ticks = ticks[::math.ceil(len(ticks) / 12)]
    labels = [tick_label(t) if tick_label else f"{t:g}" for t in ticks]
    (ax.set_xticks if axis == "x" else ax.set_yticks)(ticks, labels=labels)
    (ax.xaxis if axis == "x" else ax.yaxis).set_minor_locator(NullLocator())


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
  """Which points are on the Pareto front of (benefit, cost): higher benefit and lower
  cost are better; a point is off the front when another is at least as good on both
  and better on one (equal points dominate neither).

  Args:
    points: (benefit, cost) pairs.

  Returns:
    One bool per point: True on the front; a point with a NaN or infinite coordinate is
    never on it (and dominates none).
  """
  finite = [math.isfinite(p[0]) and math.isfinite(p[1]) for p in points]

  def dominates(q, p) -> bool:
    return q[0] >= p[0] and q[1] <= p[1] and (q[0] > p[0] or q[1] < p[1])
  return [ok and not any(dominates(q, p) for q, q_ok in zip(points, finite, strict=True) if q_ok)
          for p, ok in zip(points, finite, strict=True)]


def pareto_line(points: Sequence[tuple[float, float]]) -> Series | None:
  """The front's (x, y) points joined by a dotted grey line, in x order; None for fewer
  than two points."""
  front = sorted(points)
  if len(front) < 2:
    return None
  return Series("Pareto front", [x for x, _ in front], [y for _, y in front],
                style=Style("#555555", "", ":"))


def plot_series(path: str | Path, series: Sequence[Series], *, title: str, xlabel: str,
                ylabel: str, kind: str = "line", xscale: str = "auto", yscale: str = "auto",
                baseline: Baseline | None = None, xticks: Sequence[float] | None = None,
                yticks: Sequence[float] | None = None,
                xtick_label: Callable[[float], str] | None = None,
                ytick_label: Callable[[float], str] | None = None) -> Figure:
  """Draws `series` as lines with markers (`kind="line"`) or markers only ("points") to a
  PNG at `path` (written atomically).

  Readability rules: each series has its `style` (default `style_of(name)`); series that
  coincide (`coincident_groups`) are all drawn, the later ones dashed over the first with
  larger hollow markers, and their legend entries and the returned notes name the
  coincidence; the legend sits outside the axes, so it never covers data; at most 12
  labelled ticks per axis; an axis whose values span a decade or more is logarithmic
  ("auto"; or give "linear", "log", "log2", "symlog"); a log axis leaves out values <= 0,
  and the notes say how many.

  Args:
    path: the PNG to write.
    series: what to draw, in legend order.
    title, xlabel, ylabel: texts (the title is wrapped to the figure's width).
    kind: "line" or "points" (then a series whose style has no marker, such as
      `pareto_line`, is still drawn as a line).
    xscale, yscale: axis scales.
    baseline: the reference, drawn as a grey line (`Baseline`).
    xticks, yticks, xtick_label, ytick_label: explicit ticks and their labels.

  Returns:
    The `Figure` (path and notes).
  """
  if kind not in ("line", "points"):
    raise ValueError(f"kind must be 'line' or 'points', got kind={kind!r}")
  path = Path(path)
  xs = np.asarray([x for s in series for x in s.x], np.float64)
  ys = np.asarray([y for s in series for y in s.y], np.float64)
  # The scales follow the data; the baseline is drawn where the axes can show it.
  xscale = auto_scale(xs) if xscale == "auto" else xscale
  yscale = auto_scale(ys) if yscale == "auto" else yscale
  groups = coincident_groups(series, xscale=xscale, yscale=yscale)
  under = {j: g[0] for g in groups for j in g[1:]}  # series -> the one it coincides with
  members = {g[0]: g for g in groups}

  plt = _pyplot()
  entries = len(series) + (baseline is not None)
  # Up to 12 legend entries fit beside the axes; more go below them, in two columns.
  below = entries > 12
  fig, ax = plt.subplots(figsize=(9.0, 4.5 + 0.13 * math.ceil(entries / 2)) if below
                         else (7.5, 4.5))
  ax.grid(True, which="major", alpha=0.3)
  notes = []
  hidden = 0
  for i, s in enumerate(series):
    style = s.style or style_of(s.name)
    pts = [(float(x), float(y)) for x, y in zip(s.x, s.y, strict=True)
           if math.isfinite(x) and math.isfinite(y)
           and (xscale not in ("log", "log2") or x > 0)
           and (yscale not in ("log", "log2") or y > 0)]
    hidden += len(s.x) - len(pts)
    label = s.name
    if i in members:
      label += f" (= {_names([series[j].name for j in members[i][1:]])})"
    elif i in under:
      how = "dashed" if kind == "line" else "drawn"
      label += f" (= {series[under[i]].name}, {how} over it)"
    rank = 0 if i not in under else members[under[i]].index(i)
    kwargs = dict(color=style.color, marker=style.marker, label=label,
                  markersize=6 + 3 * rank, zorder=2 + rank)
    if rank:
      kwargs.update(markerfacecolor="none", markeredgewidth=1.5)
    pts.sort()
    px = [p[0] for p in pts]
    py = [p[1] for p in pts]
    if kind == "line" or not style.marker:  # A markerless series is a guide line.
      linestyle = style.linestyle if not rank else (rank * 3, (4, 4))
      ax.plot(px, py, linestyle=linestyle, linewidth=1.8, **kwargs)
    else:
      ax.plot(px, py, linestyle="none", **kwargs)
  for g in groups:
    names = [series[j].name for j in g]
    notes.append(f"{_names(names)} coincide (values within 0.4 % of the axis): drawn "
                 f"{'as one line, the later ones dashed' if kind == 'line' else 'as one point'}"
                 " over the first, with larger hollow markers.")
  if hidden:
    notes.append(f"{hidden} point(s) with values a log axis cannot show (<= 0) are left out.")
  if baseline is not None:
    # One legend entry: on the horizontal line when there is one, else on the vertical.
    label = baseline.label
    y_shown = baseline.y is not None and not (yscale in ("log", "log2") and baseline.y <= 0)
    if baseline.y is not None and not y_shown:
      label += f" (y = {baseline.y:g} is not on the log axis)"
    if y_shown:
      ax.axhline(baseline.y, color="gray", linestyle="--", linewidth=1.2, label=label, zorder=1)
      label = None
    if baseline.x is not None:
      ax.axvline(baseline.x, color="gray", linestyle="-.", linewidth=1.2, label=label, zorder=1)
    elif label is not None:
      ax.plot([], [], color="gray", linestyle="--", label=label)
  _set_scale(ax, "x", xscale, xs, xticks, xtick_label)
  _set_scale(ax, "y", yscale, ys, yticks, ytick_label)
  drawn_y = ys if baseline is None or baseline.y is None else np.append(ys, baseline.y)
  limits = _limits(yscale, drawn_y, _linthresh(ys))
  if limits is not None:
    ax.set_ylim(*limits)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title("\n".join(textwrap.wrap(title, 70)), fontsize=10)
  if series or baseline is not None:
    if below:
      ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2,
                frameon=False)
    else:
      ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                frameon=False)
  if not series:
    ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center")
  _save(fig, path)
  plt.close(fig)
  return Figure(path, tuple(notes))


def plot_heatmaps(path: str | Path, panels: Sequence[tuple[str, np.ndarray]], *, title: str,
                  xlabel: str, ylabel: str, colorbar_label: str, log: bool = True,
                  floor: float = 1e-6, column_groups: int | None = None,
                  group_label: str = "g") -> Figure:
  """One heat map per `(panel title, [rows, columns] array)`, side by side, each with its
  colour bar; `log` colours by log10 of the values (values below `floor` at `floor`).
  `column_groups` columns form a group (e.g. one kv head's channels): groups are separated
  by white lines and labelled `group_label` + index. Written atomically to `path`."""
  path = Path(path)
  plt = _pyplot()
  n = max(len(panels), 1)
  fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.5), squeeze=False)
  for ax, (name, grid) in zip(axes[0], panels, strict=False):
    grid = np.asarray(grid, np.float64)
    shown = np.log10(np.maximum(grid, floor)) if log else grid
    im = ax.imshow(shown, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_title("\n".join(textwrap.wrap(name, 45)), fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if column_groups and grid.shape[1] > column_groups:
      n_groups = grid.shape[1] // column_groups
      for g in range(1, n_groups):
        ax.axvline(g * column_groups - 0.5, color="white", linewidth=1.0)
      step = math.ceil(n_groups / 12)  # at most 12 labels
      ax.set_xticks([(g + 0.5) * column_groups - 0.5 for g in range(0, n_groups, step)],
                    labels=[f"{group_label}{g}" for g in range(0, n_groups, step)])
    bar = fig.colorbar(im, ax=ax)
    bar.set_label(("log10 " if log else "") + colorbar_label)
  fig.suptitle("\n".join(textwrap.wrap(title, 100)), fontsize=11)
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)
  return Figure(path)
