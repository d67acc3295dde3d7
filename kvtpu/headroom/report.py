"""Memory-headroom results: the row schema, its check, and the markdown/PNG report.

A headroom sweep asks, for each KV-cache format, how long a context fits at a given
concurrency (`kind` "max_context") and how many sequences fit at a given context
(`kind` "max_concurrency") before HBM runs out. The solver writes one row per solved point
and, next to each maximum, the first point past it (`oom` true: it does not fit), so a
reader sees both sides of the boundary.

Row fields (all required, see `REQUIRED_FIELDS`; bytes are per device):

  model, weight_dtype, accelerator, chip, mesh, kv_format, calibration   str
  num_devices                  int > 0
  strategy                     "heads" | "replicate" | "sequence"
  mode                         "analytic" | "aot" | "live" (how the bytes were obtained)
  kind                         "max_context" | "max_concurrency"
  concurrency                  asked (max_context) or found maximum (max_concurrency)
  context                      asked (max_concurrency) or found maximum max_len (max_context)
  batch                        sequences allocated: concurrency rounded up to the data axis
  max_len, tokens              cache length per sequence; tokens = batch * max_len
  oom                          bool: the first point past the maximum
  hbm_per_device, budget_per_device, weights_per_device, cache_per_device,
  temp_per_device, other_per_device, total_per_device                   int bytes
  reserve_fraction             number in [0, 1)
  model_max_position           int > 0: the model's trained context
  note                         optional str
  effective_bits               optional number > 0: bits per stored K/V value at 8K context
                               (`kvtpu.memory.effective_bits`)

A maximum of 0 (max_len 0 for max_context, batch 0 for max_concurrency) means nothing fits.

  write_report(rows, workdir, title=..., header_lines=...)   results.jsonl, report.md, PNG
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from kvtpu import reports
from kvtpu.reports import is_int, is_nonneg_int, is_num, is_pos_int, is_str, require

__all__ = [
    "KINDS", "MODES", "REQUIRED_FIELDS", "STRATEGIES", "agreement_table", "breakdown_table",
    "MODE_TEXT", "capacity_table", "check_row", "check_rows", "context_label", "found_cell",
    "maxima", "token_capacity",
    "plot_context_vs_concurrency", "read_jsonl", "write_jsonl", "write_report",
]

MODES: tuple[str, ...] = ("analytic", "aot", "live")
KINDS: tuple[str, ...] = ("max_context", "max_concurrency")
STRATEGIES: tuple[str, ...] = ("heads", "replicate", "sequence")
REQUIRED_FIELDS: tuple[str, ...] = (
    "model", "weight_dtype", "accelerator", "chip", "num_devices", "mesh", "strategy", "mode",
    "kv_format", "kind", "concurrency", "context", "batch", "max_len", "tokens", "oom",
    "hbm_per_device", "budget_per_device", "weights_per_device", "cache_per_device",
    "temp_per_device", "other_per_device", "total_per_device", "reserve_fraction",
    "model_max_position", "calibration",
)
# Which mode's maxima the plot shows, most preferred first.
_PLOT_MODES = ("aot", "live", "analytic")
_STR_FIELDS = ("model", "weight_dtype", "accelerator", "chip", "mesh", "kv_format", "calibration")
_COUNT_FIELDS = ("concurrency", "context", "batch", "max_len", "tokens")
_BYTE_FIELDS = ("budget_per_device", "weights_per_device", "cache_per_device",
                "temp_per_device", "total_per_device")
_GIB = 2**30
_MIB = 2**20
_FOOTNOTE_MARK = "*"

# --------------------------------------------------------------------------------------
# Schema check and JSONL.


def check_row(row: Any) -> None:
  """Checks one headroom row against the schema (see the module docstring).

  Besides types, it checks that `tokens` is `batch * max_len`, that `batch` is at least
  `concurrency`, and that a max_context row's `context` is its `max_len`.

  Raises:
    ValueError: naming the first missing or invalid field.
  """
  reports.require_fields(row, REQUIRED_FIELDS)
  for field in _STR_FIELDS:
    require(row, field, is_str, "a non-empty str")
  require(row, "num_devices", is_pos_int, "an int > 0")
  require(row, "strategy", lambda x: x in STRATEGIES, f"one of {STRATEGIES}")
  require(row, "mode", lambda x: x in MODES, f"one of {MODES}")
  require(row, "kind", lambda x: x in KINDS, f"one of {KINDS}")
  for field in _COUNT_FIELDS:
    require(row, field, is_nonneg_int, "an int >= 0")
  require(row, "oom", lambda x: isinstance(x, bool), "a bool")
  require(row, "hbm_per_device", is_pos_int, "an int > 0")
  for field in _BYTE_FIELDS:
    require(row, field, is_nonneg_int, "an int >= 0 (bytes)")
  require(row, "other_per_device", is_int, "an int (bytes)")
  require(row, "reserve_fraction", lambda x: is_num(x) and 0 <= x < 1,
           "a number in [0, 1)")
  require(row, "model_max_position", is_pos_int, "an int > 0")
  if "note" in row:
    require(row, "note", lambda x: isinstance(x, str), "a str")
  if "effective_bits" in row:
    require(row, "effective_bits", lambda x: is_num(x) and x > 0, "a number > 0")
  if row["tokens"] != row["batch"] * row["max_len"]:
    raise ValueError(f"result row field 'tokens' must be batch * max_len = "
                     f"{row['batch'] * row['max_len']}, got {row['tokens']}")
  if row["batch"] < row["concurrency"]:
    raise ValueError(f"result row field 'batch' must be >= concurrency {row['concurrency']}, "
                     f"got {row['batch']}")
  if row["kind"] == "max_context" and row["context"] != row["max_len"]:
    raise ValueError(f"result row field 'context' of a max_context row must be its max_len "
                     f"{row['max_len']}, got {row['context']}")


def check_rows(rows: Iterable[Any]) -> None:
  """Checks every row; the error message starts with the failing row's index."""
  reports.check_rows(rows, check_row)


def write_jsonl(rows: Sequence[dict], path: str | Path) -> None:
  """Checks the rows, then writes them to `path` (atomically), one JSON object per line."""
  reports.write_jsonl(rows, path, check_row)


def read_jsonl(path: str | Path) -> list[dict]:
  """Reads and checks the rows of a headroom results.jsonl file (blank lines are skipped)."""
  return reports.read_jsonl(path, check_row)


# --------------------------------------------------------------------------------------
# Row helpers.


def _check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"unknown mode={mode!r}; known: {MODES}")


def _asked(row: dict) -> int:
  """What the point asked for: the concurrency of a max_context row, else the context."""
  return row["concurrency"] if row["kind"] == "max_context" else row["context"]


def _found(row: dict) -> int:
  """What the solver found: the max context of a max_context row, else the max concurrency."""
  return row["context"] if row["kind"] == "max_context" else row["concurrency"]


def _point(row: dict) -> tuple[str, str, int]:
  return row["kv_format"], row["kind"], _asked(row)


def _format_order(rows: Iterable[dict]) -> list[str]:
  """KV formats as first seen, bf16 first if present."""
  seen = list(dict.fromkeys(r["kv_format"] for r in rows))
  return sorted(seen, key=lambda f: f != "bf16")


def maxima(rows: Iterable[dict]) -> dict[tuple[str, str, int], dict]:
  """The non-oom row of each point.

  Raises:
    ValueError: when a point has several non-oom rows (rows of several sweeps mixed).
  """
  out = {}
  for r in rows:
    if r["oom"]:
      continue
    key = _point(r)
    if key in out:
      raise ValueError(f"several non-oom {r['mode']} rows for {key}: pass the rows of one sweep "
                       "(one model, accelerator, mesh and strategy)")
    out[key] = r
  return out


def context_label(c: int) -> str:
  """A context for a header: 8K, 128K, 1M, else with thousands separators."""
  if c and c % 2**20 == 0:
    return f"{c // 2**20}M"
  if c and c % 1024 == 0:
    return f"{c // 1024}K"
  return f"{c:,}"


def _solved(row_or_point: dict | tuple[str, str, int]) -> str:
  _, kind, asked = row_or_point if isinstance(row_or_point, tuple) else _point(row_or_point)
  if kind == "max_context":
    return f"max context @ conc {asked}"
  return f"max concurrency @ ctx {context_label(asked)}"


def found_cell(row: dict) -> str:
  """The found maximum: "123,904", "(batch 2)" when batch != concurrency, "*" past training."""
  found = _found(row)
  if found == 0:
    return "0 (does not fit)"
  text = f"{found:,}"
  if row["kind"] == "max_context" and found > row["model_max_position"]:
    text += _FOOTNOTE_MARK
  if row["batch"] != row["concurrency"]:
    text += f" (batch {row['batch']})"
  return text


def _trained(rows: Iterable[dict]) -> int | None:
  values = {r["model_max_position"] for r in rows}
  return min(values) if values else None


def _footnote(trained: int) -> str:
  return (f"\\{_FOOTNOTE_MARK} beyond the model's trained context ({trained:,} tokens, "
          "`model_max_position`): it fits in memory, but the model was not trained that long.")


def _gib(n: int) -> str:
  return f"{n / _GIB:.2f}"


# --------------------------------------------------------------------------------------
# Tables.


def token_capacity(answers: dict[tuple[str, str, int], dict], fmt: str,
                   concurrencies: Sequence[int] | None = None
                   ) -> tuple[float | None, int | None]:
  """`fmt`'s tokens (batch x max context) over bf16's at the largest concurrency both
  answered (among `concurrencies`, if given) with bf16 fitting something, and that
  concurrency; `(None, None)` when there is none. `answers` as `maxima` returns them."""
  common = [c for (f, kind, c) in answers if f == fmt and kind == "max_context"
            and (concurrencies is None or c in concurrencies)
            and answers.get(("bf16", "max_context", c), {}).get("tokens", 0) > 0]
  if not common:
    return None, None
  c = max(common)
  mine, ref = (answers[f, "max_context", c]["tokens"] for f in (fmt, "bf16"))
  return mine / ref, c


def capacity_table(rows: Sequence[dict], *, mode: str,
                   concurrencies: Sequence[int] = (1, 8, 32, 128),
                   contexts: Sequence[int] = (8192, 32768, 131072)) -> str:
  """The capacity table of one mode: per KV format, the maxima that fit.

  Columns: the KV format; its effective bits per stored value at 8K context when the
  rows carry `effective_bits`; "max context @ conc N" for each N (tokens per sequence, from the
  non-oom max_context rows); "max concurrency @ ctx C" for each C (sequences, from the non-oom
  max_concurrency rows); "token capacity vs bf16": the format's tokens (batch * max_len) over
  bf16's at the largest of `concurrencies` where both have a max_context row and bf16 fits
  something ("n/a" without bf16). "-" marks a point not solved; contexts beyond the model's
  trained context carry a "*" footnote.

  Raises:
    ValueError: for an unknown mode, or several non-oom rows for one point.
  """
  _check_mode(mode)
  sel = [r for r in rows if r["mode"] == mode]
  caption = (f"**Capacity ({mode})**: the largest context (tokens per sequence) that fits at "
             "each concurrency, and the most sequences that fit at each context")
  if not sel:
    return caption + "\n\n_no rows in this mode_"
  answers = maxima(sel)
  trained = _trained(sel)
  formats = _format_order(sel)
  marked = False

  def ratio(fmt: str) -> tuple[str, int | None]:
    value, c = token_capacity(answers, fmt, concurrencies)
    return ("n/a", None) if value is None else (f"{value:.2f}x", c)

  ratios = {fmt: ratio(fmt) for fmt in formats}
  at = {c for _, c in ratios.values() if c is not None}
  bits = {r["kv_format"]: r["effective_bits"] for r in sel if "effective_bits" in r}
  body = []
  for fmt in formats:
    line = [fmt] + ([f"{bits[fmt]:.3g}" if fmt in bits else "-"] if bits else [])
    for c in concurrencies:
      row = answers.get((fmt, "max_context", c))
      line.append(found_cell(row) if row else "-")
      marked |= bool(row) and _FOOTNOTE_MARK in line[-1]
    for c in contexts:
      row = answers.get((fmt, "max_concurrency", c))
      line.append(found_cell(row) if row else "-")
    text, c = ratios[fmt]
    line.append(text if len(at) <= 1 or c is None else f"{text} @ conc {c}")
    body.append(line)
  head = ["KV format"] + (["effective bits @ 8K"] if bits else []) + [
      f"max context @ conc {c}" for c in concurrencies]
  for c in contexts:
    past = trained is not None and c > trained
    marked |= past
    head.append(f"max concurrency @ ctx {context_label(c)}" + (_FOOTNOTE_MARK if past else ""))
  head.append("token capacity vs bf16")
  notes = []
  if "bf16" in formats:
    where = f"concurrency {at.pop()}" if len(at) == 1 else "the concurrency shown"
    notes.append(f"Token capacity vs bf16: batch x max_len over bf16's, at {where} (the largest "
                 "concurrency in the table that both solved).")
  if any("(batch" in cell for line in body for cell in line):
    notes.append("(batch N): the concurrency rounded up to a multiple of the data axis, "
                 "which is what the cache allocates.")
  if marked:
    notes.append(_footnote(trained))
  return "\n\n".join([caption, reports.markdown_table(head, body), *notes])


def _sorted_maxima(rows: Iterable[dict]) -> list[dict]:
  answers = maxima(rows)
  order = {f: i for i, f in enumerate(_format_order(answers.values()))}
  return sorted(answers.values(),
                key=lambda r: (order[r["kv_format"]], KINDS.index(r["kind"]), _asked(r)))


def breakdown_table(rows: Sequence[dict], *, mode: str) -> str:
  """Per-device memory of each maximum (non-oom row) of one mode, in GiB.

  One line per (KV format, kind, asked concurrency or context): the allocated shape, then
  weights, cache, temporaries, other, total, the budget and HBM per device.

  Raises:
    ValueError: for an unknown mode, or several non-oom rows for one point.
  """
  _check_mode(mode)
  sel = _sorted_maxima(r for r in rows if r["mode"] == mode)
  caption = f"**Memory per device at each maximum ({mode})**, GiB (2^30 bytes)"
  if not sel:
    return caption + "\n\n_no rows in this mode_"
  head = ["KV format", "solved", "batch x max_len", "weights", "cache", "temporaries", "other",
          "total", "budget", "HBM"]
  body = [[r["kv_format"], _solved(r), f"{r['batch']} x {r['max_len']:,}"]
          + [_gib(r[f"{k}_per_device"]) for k in ("weights", "cache", "temp", "other", "total",
                                                  "budget", "hbm")]
          for r in sel]
  return caption + "\n\n" + reports.markdown_table(head, body)


def _rel(x: int, ref: int) -> float | None:
  return None if ref == 0 else (x - ref) / ref * 100


def agreement_table(rows: Sequence[dict], modes: Sequence[str], *,
                    tolerance: float = 0.02) -> str:
  """How the modes agree: maxima side by side, and per-device bytes at the same shape.

  Points (KV format, kind, asked concurrency or context) solved by two or more of `modes`
  get their found maxima side by side (other modes with their difference from the reference
  mode in %). The reference is "analytic" when present, else the first mode present. Then, for
  each point solved by the reference and another mode, the per-device total bytes of the two
  rows with identical (batch, max_len) (the maxima when they agree, else a maximum of one and
  the oom row of the other, else any row of the same format and shape), with the relative
  difference in % and the itemized differences (other mode minus reference) in MiB.

  Args:
    rows: headroom rows (any modes; only `modes` are compared).
    modes: the modes to compare, in column order.
    tolerance: the relative difference of totals counted as agreement (0.02: 2 %).
  """
  for m in modes:
    _check_mode(m)
  modes = [m for m in dict.fromkeys(modes) if any(r["mode"] == m for r in rows)]
  if len(modes) < 2:
    return "_fewer than two modes with rows: nothing to compare_"
  ref = "analytic" if "analytic" in modes else modes[0]
  by_mode = {m: maxima(r for r in rows if r["mode"] == m) for m in modes}
  order = {f: i for i, f in enumerate(_format_order(r for r in rows if r["mode"] in modes))}
  points = sorted({p for m in modes for p in by_mode[m]},
                  key=lambda p: (order[p[0]], KINDS.index(p[1]), p[2]))
  points = [p for p in points if sum(p in by_mode[m] for m in modes) >= 2]
  caption = (f"**Agreement between modes** (reference: {ref}): found maxima side by side, "
             f"other modes with their difference from {ref}")
  if not points:
    return caption + "\n\n_no point solved by two modes_"

  def cell(m: str, p: tuple[str, str, int]) -> str:
    row = by_mode[m].get(p)
    if row is None:
      return "-"
    text = f"{_found(row):,}" if _found(row) else "0 (does not fit)"
    if m == ref or p not in by_mode[ref]:
      return text
    if _found(row) == _found(by_mode[ref][p]):
      return f"{text} (same)"
    rel = _rel(_found(row), _found(by_mode[ref][p]))
    return text if rel is None else f"{text} ({rel:+.1f} %)"

  found = reports.markdown_table(["KV format", "solved"] + [f"found: {m}" for m in modes],
                 [[p[0], _solved(p)] + [cell(m, p) for m in modes] for p in points])

  # Rows of each point (maxima first, then oom rows) and of each (format, batch, max_len).
  by_point: dict[str, dict] = {m: {} for m in modes}
  by_shape: dict[str, dict] = {m: {} for m in modes}
  for r in sorted(rows, key=lambda r: r["oom"]):
    if r["mode"] in by_point:
      by_point[r["mode"]].setdefault(_point(r), []).append(r)
      by_shape[r["mode"]].setdefault((r["kv_format"], r["batch"], r["max_len"]), r)

  def shape(r: dict) -> tuple[str, int, int]:
    return r["kv_format"], r["batch"], r["max_len"]

  def pair(m: str, p: tuple[str, str, int]) -> tuple[dict, dict] | None:
    mine, refs = by_point[m].get(p, []), by_point[ref].get(p, [])
    for a in refs:
      for o in mine:
        if shape(a) == shape(o):
          return a, o
    for a in refs:
      if shape(a) in by_shape[m]:
        return a, by_shape[m][shape(a)]
    for o in mine:
      if shape(o) in by_shape[ref]:
        return by_shape[ref][shape(o)], o
    return None

  tol = f"{tolerance * 100:g} %"
  head = ["KV format", "solved", "mode", "batch x max_len", f"total, {ref} (GiB)",
          "total, mode (GiB)", "difference", f"within {tol}", "Δ weights (MiB)", "Δ cache (MiB)",
          "Δ temporaries (MiB)", "Δ other (MiB)"]
  body, diffs, unmatched = [], [], 0
  for p in points:
    if p not in by_mode[ref]:
      continue
    for m in modes:
      if m == ref or p not in by_mode[m]:
        continue
      got = pair(m, p)
      if got is None:
        unmatched += 1
        body.append([p[0], _solved(p), m, "no common shape"] + ["-"] * (len(head) - 4))
        continue
      a, o = got
      rel = _rel(o["total_per_device"], a["total_per_device"])
      if rel is not None:
        diffs.append(rel)
      past = [name for name, r in ((ref, a), (m, o)) if r["oom"]]
      at = f"{a['batch']} x {a['max_len']:,}" + (f" ({', '.join(past)}: oom row)" if past else "")
      body.append(
          [p[0], _solved(p), m, at, _gib(a["total_per_device"]),
           _gib(o["total_per_device"]), "n/a" if rel is None else f"{rel:+.2f} %",
           "n/a" if rel is None else ("yes" if abs(rel) <= tolerance * 100 else "no")]
          + [f"{(o[f'{k}_per_device'] - a[f'{k}_per_device']) / _MIB:+.1f}"
             for k in ("weights", "cache", "temp", "other")])
  parts = [caption, found]
  if body:
    agree = sum(abs(d) <= tolerance * 100 for d in diffs)
    summary = (f"**Per-device bytes at the same (batch, max_len)**, {ref} vs each other mode: "
               f"{agree} of {len(diffs)} compared totals agree within {tol}")
    if diffs:
      summary += f"; the largest difference is {max(diffs, key=abs):+.2f} %"
    if unmatched:
      summary += (f"; {unmatched} point(s) have no rows of identical shape in both modes "
                  "(no common shape)")
    summary += (f". Δ: the other mode minus {ref}. \"(mode: oom row)\": that mode's row at "
                "this shape is its first point past the maximum.")
    parts += [summary, reports.markdown_table(head, body)]
  return "\n\n".join(parts)


# --------------------------------------------------------------------------------------
# Plot and the report.


def plot_context_vs_concurrency(rows: Sequence[dict], path: str | Path, *, mode: str,
                                title: str) -> reports.Figure:
  """PNG: max context (log2) against concurrency (log2), one line per KV format.

  From the non-oom max_context rows of `mode`; a maximum of 0 (nothing fits) has no place on
  a log axis and is left out. bf16, the baseline of every other format, is a line of its own
  (black) when the rows have it; a dashed line marks the model's trained context. Formats
  with identical maxima (int8 and fp8_e4m3 store the same bytes) are drawn over one another
  visibly and named in the legend and the returned notes.
  """
  _check_mode(mode)
  sel = [r for r in _sorted_maxima(r for r in rows if r["mode"] == mode)
         if r["kind"] == "max_context"]
  series = []
  for fmt in _format_order(sel):
    points = sorted((r["concurrency"], r["context"]) for r in sel
                    if r["kv_format"] == fmt and r["context"] > 0 and r["concurrency"] > 0)
    if points:
      series.append(reports.Series(fmt, [c for c, _ in points], [x for _, x in points]))
  trained = _trained(sel)
  shown = [r for r in sel if r["context"] > 0 and r["concurrency"] > 0]
  concs = sorted({r["concurrency"] for r in shown})
  yticks = None
  if shown:
    ys = [r["context"] for r in shown] + ([trained] if trained is not None else [])
    lo, hi = math.floor(math.log2(min(ys))), math.ceil(math.log2(max(ys)))
    step = -(-(hi - lo + 1) // 12)  # at most 12 labels
    yticks = [2**e for e in range(lo, hi + 1, step)]
  baseline = None if trained is None else reports.Baseline(
      f"model's trained context ({trained:,} tokens)", y=trained)
  return reports.plot_series(
      path, series, title=title, xlabel="concurrency (sequences)",
      ylabel="max context (tokens per sequence)", xscale="log2", yscale="log2",
      baseline=baseline, xticks=concs or None, xtick_label=lambda c: f"{c:g}",
      yticks=yticks, ytick_label=lambda t: context_label(int(t)))


MODE_TEXT = {
    "analytic": "bytes from closed forms (weights, cache layout, estimated temporaries); "
                "nothing compiled",
    "aot": "bytes from XLA's memory analysis of the step compiled ahead of time for the chip",
    "live": "bytes measured on the devices",
}


def _notes(rows: Sequence[dict]) -> list[str]:
  lines = []
  for r in rows:
    if r.get("note"):
      where = f"{r['kv_format']}, {_solved(r)} ({r['mode']}{', oom' if r['oom'] else ''})"
      lines.append(f"- {where}: {r['note']}")
  return list(dict.fromkeys(lines))


def write_report(rows: Sequence[dict], workdir: str | Path, *, title: str,
                 header_lines: Sequence[str]) -> dict[str, str]:
  """Checks the rows and writes results.jsonl, report.md and context_vs_concurrency.png.

  report.md: the title, `header_lines` as bullets (model, weight precision, KV precisions,
  accelerator, mesh, strategy, reserve, modes: the caller's), the calibration, then per mode
  (analytic, aot, live, those present) a capacity table over the concurrencies and contexts
  the rows solved and a breakdown table, then the agreement table when several modes are
  present, the plot and any notes. The plot shows the aot maxima if present, else live, else
  analytic.

  Args:
    rows: headroom rows (see the module docstring).
    workdir: output folder (created if needed).
    title: the report's title.
    header_lines: the sweep's settings, one bullet each.

  Returns:
    {"results": ..., "report": ..., "plot": ...}: the paths written (no plot without rows).

  Raises:
    ValueError: for an invalid row (naming its index and field), or several non-oom rows for
      one point in a mode.
  """
  check_rows(rows)
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  paths = {"results": workdir / "results.jsonl", "report": workdir / "report.md",
           "plot": workdir / "context_vs_concurrency.png"}
  write_jsonl(rows, paths["results"])
  modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
  header = [f"- {line}" for line in header_lines]
  header += [f"- calibration: {c}" for c in dict.fromkeys(r["calibration"] for r in rows)]
  if not rows:  # No slab questions (e.g. a sequence-sharded sweep of paged caches only).
    del paths["plot"]
    reports.write_text(paths["report"], "\n\n".join([
        f"# {title}", "\n".join(header) or "_no settings given_",
        "_no contiguous-cache (slab) questions were asked_"]) + "\n")
    return {name: str(p) for name, p in paths.items()}
  plot_mode = next((m for m in _PLOT_MODES if m in modes), "analytic")
  figure = plot_context_vs_concurrency(rows, paths["plot"], mode=plot_mode,
                                       title=f"max context vs concurrency ({plot_mode})")
  parts = [f"# {title}", "\n".join(header) or "_no settings given_",
           "Each table holds the largest point that fits in the per-device budget (HBM less "
           "the reserve). The first point past each maximum, which does not fit, is in "
           "results.jsonl with `oom` true. \"0 (does not fit)\": not even the smallest point "
           "fits (e.g. the weights alone exceed the budget)."]
  for m in modes:
    sel = [r for r in rows if r["mode"] == m]
    concs = sorted({r["concurrency"] for r in sel if r["kind"] == "max_context"})
    ctxs = sorted({r["context"] for r in sel if r["kind"] == "max_concurrency"})
    parts += [f"## Mode: {m}", f"{m}: {MODE_TEXT[m]}.",
              capacity_table(sel, mode=m, concurrencies=concs, contexts=ctxs),
              breakdown_table(sel, mode=m)]
  if len(modes) > 1:
    parts += ["## Agreement between modes",
              "The same points solved by different modes: do the modes find the same maxima, "
              "and do they count the same bytes for the same cache shape?",
              agreement_table(rows, modes)]
  parts += ["## Plot", figure.markdown(
      f"max context vs concurrency ({plot_mode})",
      f"Max context against concurrency, {plot_mode} maxima (log scales, one line per KV "
      "format, bf16 the baseline). Each point is one solved maximum, not an average; a "
      "concurrency below the data axis allocates one sequence per data shard.")]
  notes = _notes(rows)
  if notes:
    parts += ["## Notes", "\n".join(notes)]
  reports.write_text(paths["report"], "\n\n".join(parts) + "\n")
  return {name: str(p) for name, p in paths.items()}
