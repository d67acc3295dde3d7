"""Evaluation results: the row schema, its check, and the markdown/PNG report.

`results.jsonl` holds one JSON object per line, of two kinds:

  score    quality of one KV config on one evaluation workload at one context and batch,
           against a reference cache (`metrics`: ppl, ppl_ref, ppl_rel_change, kl_mean,
           kl_p99, top1_agreement, scored_tokens, and per-layer lists attn_rel_error,
           saturation_k, saturation_v)
  passkey  passkey retrieval at one context and relative `depth` (`metrics`: accuracy,
           accuracy_ref, num_samples)

Every row records the model, how its weights were loaded (`weight_precision`), and,
separately, the KV format and precision, the calibration (with workload hashes), the
evaluation workload (with hashes) and the protocol. `check_row` rejects a row that lacks any
of them, so a report never silently omits what was measured under which precision. A row
may also carry `reference_bytes_per_token` (the reference cache's bytes per token), which
the bytes plots draw as the baseline.

Rows hold fractions (`top1_agreement` 0.9858); report tables and plots show them in percent
with the unit in the header (`METRICS` says which metric is shown how).

  write_report(rows, workdir, title=...)   results.jsonl, report.md and PNG plots
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kvtpu import reports
from kvtpu.formats import KVFormat, LayerPlan, QuantSpec
from kvtpu.reports import is_num, is_pos_int, is_str, require

__all__ = [
    "LIST_METRICS", "METRICS", "PASSKEY_METRICS", "REQUIRED_FIELDS", "SCORE_METRICS",
    "check_row", "check_rows", "config_label", "header_markdown", "metric_table",
    "passkey_table", "plot_vs_bits", "plot_vs_context", "read_jsonl", "shown_value",
    "transfer_table", "write_jsonl", "write_report",
]

REQUIRED_FIELDS: tuple[str, ...] = (
    "kind", "model", "weight_precision", "kv_format", "kv_precision", "kv_bytes_per_token",
    "calibration", "calibration_name", "eval_workload", "context", "batch", "protocol",
    "metrics",
)
SCORE_METRICS: tuple[str, ...] = (
    "ppl", "ppl_ref", "ppl_rel_change", "kl_mean", "kl_p99", "top1_agreement", "scored_tokens")
LIST_METRICS: tuple[str, ...] = ("attn_rel_error", "saturation_k", "saturation_v")
PASSKEY_METRICS: tuple[str, ...] = ("accuracy", "accuracy_ref", "num_samples")
# How reports show a metric: (description, unit, factor from the row's value, the
# reference cache's own value of it). Fractions are shown in percent.
METRICS: dict[str, tuple[str, str, float, float | None]] = {
    "ppl_rel_change": ("perplexity change vs the reference cache", "%", 100.0, 0.0),
    "kl_mean": ("mean per-token KL divergence from the reference", "nats", 1.0, 0.0),
    "kl_p99": ("p99 per-token KL divergence from the reference", "nats", 1.0, 0.0),
    "top1_agreement": ("top-1 agreement with the reference", "%", 100.0, 100.0),
    "ppl": ("perplexity", "", 1.0, None),
    "attn_rel_error": ("attention-output relative error", "%", 100.0, 0.0),
    "saturation_k": ("K values clipped (saturation rate)", "%", 100.0, 0.0),
    "saturation_v": ("V values clipped (saturation rate)", "%", 100.0, 0.0),
}
_CALIBRATION_WHAT = "'dynamic' or a disclosure dict with method and workloads"

# --------------------------------------------------------------------------------------
# Schema check.


def _check_disclosure(d: dict, path: str) -> None:
  require(d, "name", is_str, "a non-empty str", path=f"{path}.name")
  require(d, "num_tokens", is_pos_int, "an int > 0", path=f"{path}.num_tokens")
  require(d, "token_sha256", is_str, "a non-empty str", path=f"{path}.token_sha256")


def check_row(row: Any) -> None:
  """Checks one result row against the schema (see the module docstring).

  Raises:
    ValueError: naming the first missing or invalid field.
  """
  reports.require_fields(row, REQUIRED_FIELDS)
  kind = require(row, "kind", lambda x: x in ("score", "passkey"), "'score' or 'passkey'")
  for field in ("model", "weight_precision", "kv_format", "calibration_name"):
    require(row, field, is_str, "a non-empty str")
  try:
    fmt = LayerPlan.config(row["kv_format"])
  except ValueError as e:
    raise ValueError(f"result row field 'kv_format' is not a kvtpu format or layer plan: "
                     f"{e}") from None
  try:
    d = row["kv_precision"]
    precision = (LayerPlan.from_dict(d) if isinstance(d, dict) and "overrides" in d
                 else KVFormat.from_dict(d))
  except (ValueError, TypeError, KeyError) as e:
    raise ValueError(f"result row field 'kv_precision' is not `KVFormat.to_dict()` or "
                     f"`LayerPlan.to_dict()`: {e}") from None
  if precision != fmt:
    raise ValueError(f"result row field 'kv_precision' describes {precision.name}, but "
                     f"'kv_format' is {fmt.name}")
  require(row, "kv_bytes_per_token", lambda x: is_num(x) and x > 0, "a number > 0")
  if "reference_bytes_per_token" in row:
    require(row, "reference_bytes_per_token", lambda x: is_num(x) and x > 0, "a number > 0")
  if "kv_effective_bits" in row:
    require(row, "kv_effective_bits", lambda x: is_num(x) and x > 0, "a number > 0")
  cal = row["calibration"]
  if cal != "dynamic":
    ok = (isinstance(cal, dict) and is_str(cal.get("method"))
          and isinstance(cal.get("workloads"), list) and cal["workloads"]
          and all(isinstance(w, dict) for w in cal["workloads"]))
    if not ok:
      raise ValueError(f"result row field 'calibration' must be {_CALIBRATION_WHAT}, "
                       f"got {repr(cal)[:80]}")
    for i, w in enumerate(cal["workloads"]):
      _check_disclosure(w, f"calibration.workloads[{i}]")
  if (cal == "dynamic") != (row["calibration_name"] == "dynamic"):
    raise ValueError("result row field 'calibration_name' must be 'dynamic' exactly when "
                     f"'calibration' is 'dynamic', got {row['calibration_name']!r}")
  require(row, "eval_workload", lambda x: isinstance(x, dict), "a dict")
  _check_disclosure(row["eval_workload"], "eval_workload")
  require(row, "context", is_pos_int, "an int > 0")
  require(row, "batch", is_pos_int, "an int > 0")
  require(row, "protocol", lambda x: isinstance(x, dict) and x, "a non-empty dict")
  metrics = require(row, "metrics", lambda x: isinstance(x, dict), "a dict")
  if kind == "score":
    for m in SCORE_METRICS:
      require(metrics, m, is_num, "a finite number", path=f"metrics.{m}")
    for m in LIST_METRICS:
      require(metrics, m, lambda x: isinstance(x, list) and x and all(is_num(v) for v in x),
              "a non-empty list of finite numbers (one per layer)", path=f"metrics.{m}")
  else:
    for m in PASSKEY_METRICS:
      require(metrics, m, is_num, "a finite number", path=f"metrics.{m}")
    require(row, "depth", lambda x: is_num(x) and 0 <= x <= 1, "a number in [0, 1]")


def check_rows(rows: Iterable[Any], check: Callable[[Any], None] | None = None) -> None:
  """Checks every row (with `check`, default this schema's `check_row`); the error
  message starts with the failing row's index."""
  reports.check_rows(rows, check or check_row)


def write_jsonl(rows: Sequence[dict], path: str | Path,
                check: Callable[[Any], None] | None = None) -> None:
  """Checks the rows (`check` as in `check_rows`), then writes them to `path` (atomically),
  one JSON object per line."""
  reports.write_jsonl(rows, path, check or check_row)


def read_jsonl(path: str | Path, check: Callable[[Any], None] | None = None) -> list[dict]:
  """Reads and checks (`check` as in `check_rows`) the rows of a results.jsonl file
  (blank lines are skipped)."""
  return reports.read_jsonl(path, check or check_row)


# --------------------------------------------------------------------------------------
# Tables.


def config_label(row: dict) -> str:
  """The KV config of a row: format and calibration, e.g. "int8 | dynamic", "int4 | cal: prose".

  An unquantized format (bf16, f32) has no scales to calibrate: its label is the format alone.
  """
  if row["calibration"] == "dynamic" and not LayerPlan.config(row["kv_format"]).quantized:
    return row["kv_format"]
  if row["calibration"] == "dynamic":
    return f"{row['kv_format']} | dynamic"
  return f"{row['kv_format']} | cal: {row['calibration_name']}"


def _labeler(rows: Sequence[dict]) -> Callable[[dict], str]:
  """`config_label`, prefixed with the model when the rows hold more than one model."""
  if len({r["model"] for r in rows}) > 1:
    return lambda r: f"{r['model']}: {config_label(r)}"
  return config_label


def shown_value(row: dict, metric: str) -> float:
  """A row's metric as reports show it: in the unit of `METRICS` (percent for fractions);
  per-layer metrics as their max over layers."""
  v = row["metrics"].get(metric, math.nan)
  v = float(max(v)) if isinstance(v, list) else float(v)
  return v * METRICS.get(metric, ("", "", 1.0, None))[2]


def _unit(metric: str) -> str:
  unit = METRICS.get(metric, ("", "", 1.0, None))[1]
  return f" ({unit})" if unit else ""


def _describe(metric: str) -> str:
  what, unit, _, _ = METRICS.get(metric, (metric, "", 1.0, None))
  return f"{what}, in {unit}" if unit else what


def _config_order(rows: Sequence[dict], label: Callable[[dict], str]) -> list[str]:
  """Labels: per model, bf16 first, then by bytes per token descending, dynamic first."""
  keys = {}
  for r in rows:
    keys.setdefault(label(r), (r["model"], r["kv_format"] != "bf16", -r["kv_bytes_per_token"],
                               r["kv_format"], r["calibration"] != "dynamic"))
  return sorted(keys, key=lambda lab: (*keys[lab], lab))


def _grid(rows, row_key, col_key, cell, row_order, col_order, empty="-") -> list[list[str]]:
  groups = defaultdict(list)
  for r in rows:
    groups[row_key(r), col_key(r)].append(r)
  return [[rk] + [cell(groups[rk, ck]) if groups[rk, ck] else empty for ck in col_order]
          for rk in row_order]


def _scores(rows: Iterable[dict]) -> list[dict]:
  return [r for r in rows if r["kind"] == "score"]


def _layers_note(metric: str) -> str:
  return "; cells: max over layers" if metric in LIST_METRICS else ""


def metric_table(rows: Sequence[dict], metric: str, *, fmt: str = "{:.4g}") -> str:
  """A markdown table of one metric over the score rows, in the unit of `METRICS`.

  Rows are KV configs (`config_label`), columns are "workload @context xbatch (unit)"; a cell
  is the mean of its rows (for per-layer metrics, each row's max over layers).
  """
  scores = _scores(rows)
  caption = (f"**{metric}**: {_describe(metric)} (rows: KV config; columns: evaluated on "
             f"@ context x batch{_layers_note(metric)})")
  if not scores:
    return caption + "\n\n_no score rows_"
  label = _labeler(scores)
  col = lambda r: (r["eval_workload"]["name"], r["context"], r["batch"])  # noqa: E731
  cols = sorted({col(r) for r in scores})
  body = _grid(scores, label, col,
               lambda g: fmt.format(np.mean([shown_value(r, metric) for r in g])),
               _config_order(scores, label), cols)
  head = ["config"] + [f"{w} @{c} x{b}{_unit(metric)}" for w, c, b in cols]
  return caption + "\n\n" + reports.markdown_table(head, body)


def transfer_table(rows: Sequence[dict], metric: str, *, kv_format: str, context: int | None = None,
                   batch: int | None = None, fmt: str = "{:.4g}") -> str:
  """The calibration-transfer table of one KV format: calibrated on (rows) x evaluated on.

  A cell is the mean of the metric (in the unit of `METRICS`) over the matching score rows
  (all contexts and batches unless `context` / `batch` select one).
  """
  sel = [r for r in _scores(rows) if r["kv_format"] == kv_format
         and context in (None, r["context"]) and batch in (None, r["batch"])]
  where = "".join(f", {k} {v}" for k, v in (("context", context), ("batch", batch)) if v)
  if not where:
    where = ", mean over contexts and batches"
  caption = (f"**{kv_format}**: {metric} ({_describe(metric)}), rows: calibrated on, columns: "
             f"evaluated on{where}{_layers_note(metric)}")
  if not sel:
    return caption + "\n\n_no matching score rows_"
  multi = len({r["model"] for r in sel}) > 1
  name = lambda r: f"{r['model']}: {r['calibration_name']}" if multi else r["calibration_name"]  # noqa: E731
  keys = {name(r): (r["model"], r["calibration"] != "dynamic", r["calibration_name"]) for r in sel}
  order = sorted(keys, key=keys.get)
  cols = sorted({r["eval_workload"]["name"] for r in sel})
  body = _grid(sel, name, lambda r: r["eval_workload"]["name"],
               lambda g: fmt.format(np.mean([shown_value(r, metric) for r in g])), order, cols)
  return caption + "\n\n" + reports.markdown_table(
      ["calibrated on"] + [f"{c}{_unit(metric)}" for c in cols], body)


def passkey_table(rows: Sequence[dict]) -> str:
  """Passkey retrieval: config (rows) x context (columns), "accuracy (reference accuracy)"
  in percent.

  A cell averages over depths (and workloads), weighted by the number of samples.
  """
  keys = [r for r in rows if r["kind"] == "passkey"]
  if not keys:
    return "_no passkey rows_"
  depths = sorted({r["depth"] for r in keys})
  caption = ("**passkey retrieval**: accuracy in % (the reference cache's accuracy in %, on "
             "the same prompts), mean over depths " + ", ".join(f"{d:g}" for d in depths))
  label = _labeler(keys)

  def cell(group):
    w = [r["metrics"]["num_samples"] for r in group]
    acc, ref = (np.average([r["metrics"][m] for r in group], weights=w)
                for m in ("accuracy", "accuracy_ref"))
    return f"{reports.percent(acc, '{:.0f}')} ({reports.percent(ref, '{:.0f}')})"

  contexts = sorted({r["context"] for r in keys})
  body = _grid(keys, label, lambda r: r["context"], cell, _config_order(keys, label), contexts)
  return caption + "\n\n" + reports.markdown_table(
      ["config"] + [f"{c} tokens (%)" for c in contexts], body)


def _unique(items: Iterable[Any]) -> list[Any]:
  seen, out = set(), []
  for x in items:
    key = json.dumps(x, sort_keys=True)
    if key not in seen:
      seen.add(key)
      out.append(x)
  return out


def _workload(w: dict) -> str:
  """A workload's name, tokens and hash; for calibration data, the tokens used of those
  available."""
  n = (f"{w['num_tokens']:,} tokens" if "tokens_used" not in w else
       f"{w['tokens_used']:,} tokens used of {w['num_tokens']:,} available")
  return f"`{w['name']}` ({n}, token_sha256 `{w['token_sha256'][:16]}`)"


def header_markdown(rows: Sequence[dict], *, title: str) -> str:
  """The report header: model and weight precision, then KV precision, calibration, data, protocol."""
  parts = [f"# {title}", "## Model and weight precision"]
  parts.append("\n".join(f"- `{m}`: weights {w}" for m, w in
                         _unique((r["model"], r["weight_precision"]) for r in rows)))
  parts.append("## KV-cache precision (separate from the weight precision)")

  def spec(p, which):
    if "overrides" in p:  # A layer plan: its formats are in its name.
      return "per layer"
    return QuantSpec.from_dict(p[which]).description

  kv = _unique((r["model"], r["kv_format"], r["kv_precision"], r["kv_bytes_per_token"],
                r.get("kv_effective_bits")) for r in rows)
  kv.sort(key=lambda x: (x[0], x[1] != "bf16", -x[3], x[1]))
  bits = any(e is not None for *_, e in kv)
  parts.append(reports.markdown_table(
      ["model", "KV format", "K", "V", "bytes/token (all layers)"]
      + (["effective bits @ 8K"] if bits else []),
      [(m, f, spec(p, "k"), spec(p, "v"), f"{b:,.6g}") + ((f"{e:.4g}" if e else "-",) if bits
                                                          else ())
       for m, f, p, b, e in kv]))
  if any(LayerPlan.config(r["kv_format"]).windowed for r in rows):
    parts.append("Bytes per token leave out the windows, which cost the same per sequence "
                 "whatever its length; effective bits (per stored K/V value of one sequence at "
                 "8K context, `kvtpu.memory.effective_bits`) include them.")
  parts.append("## Calibration")
  lines = []
  label = _labeler(rows)
  order = {lab: i for i, lab in enumerate(_config_order(rows, label))}
  configs = sorted(_unique((label(r), r["kv_format"], r["calibration"]) for r in rows),
                   key=lambda x: order[x[0]])
  for lab, fmt, cal in configs:
    if cal == "dynamic" and not LayerPlan.config(fmt).quantized:
      lines.append(f"- {lab}: not quantized (nothing to calibrate)")
    elif cal == "dynamic":
      lines.append(f"- {lab}: dynamic scales, computed when written (no calibration)")
    else:
      lines.append(f"- {lab}: {cal['method']} on " + "; ".join(map(_workload, cal["workloads"])))
  parts.append("\n".join(lines))
  parts.append("## Evaluation workloads")
  parts.append("\n".join(f"- {_workload(w)}" for w in _unique(
      {k: r["eval_workload"][k] for k in ("name", "num_tokens", "token_sha256")} for r in rows)))
  parts.append("## Protocol")
  lines = [f"- {', '.join(f'{k}={v}' for k, v in p.items())}"
           for p in _unique(r["protocol"] for r in rows)]
  lines.append(f"- contexts: {', '.join(map(str, sorted({r['context'] for r in rows})))}; "
               f"batches: {', '.join(map(str, sorted({r['batch'] for r in rows})))}")
  parts.append("\n".join(lines))
  return "\n\n".join(parts)


# --------------------------------------------------------------------------------------
# Plots and the report.


def _style(row: dict) -> reports.Style:
  """A config's plot style: colour by KV format, shade and marker by calibration."""
  return reports.style_of(row["kv_format"], row["calibration_name"])


def _axis_label(metric: str) -> str:
  what = METRICS.get(metric, (metric, "", 1.0, None))[0]
  return f"{what}{_unit(metric)}" + (", max over layers" if metric in LIST_METRICS else "")


def _baseline(rows: Sequence[dict], metric: str, x: float | None = None
              ) -> reports.Baseline | None:
  """The reference cache, at its own value of `metric` (and at `x`, its bits, if given)."""
  refs = sorted({str(r["protocol"].get("reference", "")) for r in rows} - {""})
  value = METRICS.get(metric, ("", "", 1.0, None))[3]
  if value is None and x is None:
    return None
  name = "/".join(refs) or "reference"
  text = f"{name} reference cache"
  if value is not None:
    text += f": {metric} {value:g}{METRICS[metric][1] and ' ' + METRICS[metric][1]} by definition"
  if x is not None:
    text += f"; {x:g} bits"
  return reports.Baseline(text, y=value, x=x)


def _over(rows: Sequence[dict], *, contexts: bool) -> str:
  """What a point averages over, for a caption."""

  def named(what: str, values) -> str:
    values = sorted(values)
    return f"{what}{'s' if len(values) > 1 else ''} {', '.join(map(str, values))}"

  parts = [named("evaluation workload", {r["eval_workload"]["name"] for r in rows}),
           named("batch size", {r["batch"] for r in rows})]
  if contexts:
    parts.append(named("context", {r["context"] for r in rows}))
  return ", ".join(parts[:-1]) + " and " + parts[-1]


def plot_vs_context(rows: Sequence[dict], metric: str, path: str | Path) -> reports.Figure:
  """PNG: the metric against context, one line per KV config, each point the mean over
  evaluation workloads and batches; the reference cache as the baseline.

  Returns:
    The figure; its `markdown(alt, caption)` under a caption from `plot_caption`.
  """
  scores = _scores(rows)
  label = _labeler(scores)
  series = []
  for lab in _config_order(scores, label):
    mine = [r for r in scores if label(r) == lab]
    by_ctx = defaultdict(list)
    for r in mine:
      by_ctx[r["context"]].append(shown_value(r, metric))
    xs = sorted(by_ctx)
    series.append(reports.Series(lab, xs, [float(np.mean(by_ctx[x])) for x in xs],
                                 style=_style(mine[0])))
  contexts = sorted({r["context"] for r in scores})
  return reports.plot_series(
      path, series, title=f"{metric} vs context", xlabel="context (tokens)",
      ylabel=_axis_label(metric), xscale="log2" if len(contexts) > 1 else "linear",
      xticks=contexts or None, xtick_label=lambda c: f"{c:g}",
      baseline=_baseline(scores, metric))


# Metrics where a larger value is better; for the others a smaller one is, and for a
# relative change a smaller magnitude (targets bound |change|).
_HIGHER_IS_BETTER = ("top1_agreement",)
_SIGNED_CHANGES = ("ppl_rel_change",)


def _reference_bits(rows: Sequence[dict]) -> float | None:
  """Effective bits of the (single, unquantized) reference cache: its dtype's bits."""
  refs = {str(r["protocol"].get("reference", "")) for r in rows}
  if len(refs) != 1:
    return None
  try:
    fmt = KVFormat.parse(refs.pop())
  except ValueError:
    return None
  return None if fmt.quantized else float(fmt.k.dtype.bits)


def plot_vs_bits(rows: Sequence[dict], metric: str, path: str | Path) -> reports.Figure:
  """PNG: the metric (mean over a config's rows) against effective bits per stored value
  (`kv_effective_bits`; rows without it are left out), one point per config, the
  Pareto front (no other config has at most its bits and a value at least as good,
  better on one) named in the legend and joined by a dotted line; the reference cache
  as the baseline at its bits."""
  scores = [r for r in _scores(rows) if "kv_effective_bits" in r]
  label = _labeler(scores)
  groups = defaultdict(list)
  for r in scores:
    groups[label(r)].append(r)
  labels = _config_order(scores, label)
  points = [(float(np.mean([r["kv_effective_bits"] for r in groups[lab]])),
             float(np.mean([shown_value(r, metric) for r in groups[lab]]))) for lab in labels]
  def cost(y: float) -> float:
    return -y if metric in _HIGHER_IS_BETTER else abs(y) if metric in _SIGNED_CHANGES else y

  front = reports.pareto_front([(-x, cost(y)) for x, y in points])
  series = [reports.Series(lab + (" (Pareto front)" if on else ""), [x], [y],
                           style=_style(groups[lab][0]))
            for lab, (x, y), on in zip(labels, points, front, strict=True)]
  line = reports.pareto_line([p for p, on in zip(points, front, strict=True) if on])
  if line is not None:
    series.append(line)
  return reports.plot_series(
      path, series, title=f"{metric} vs effective bits per value", kind="points",
      xlabel="effective bits per stored K/V value at 8K context (scales, windows included)",
      ylabel=_axis_label(metric), xscale="linear",
      baseline=_baseline(scores, metric, _reference_bits(scores)))


def plot_caption(rows: Sequence[dict], metric: str, *, vs: str) -> str:
  """What a point of `plot_vs_context` (vs="context") or `plot_vs_bits` (vs="bits")
  shows and averages."""
  scores = _scores(rows)
  what = _axis_label(metric)
  what = what[:1].upper() + what[1:]
  if vs == "context":
    return (f"{what} against context. Each point: the mean over {_over(scores, contexts=False)}"
            f" of one KV config's rows at one context ({len(scores)} rows in all).")
  placed = [r for r in scores if "kv_effective_bits" in r]
  left_out = len(scores) - len(placed)
  if not placed:
    return f"{what} against effective bits per stored value: no row carries effective bits."
  better = ("a higher" if metric in _HIGHER_IS_BETTER else "a smaller absolute"
            if metric in _SIGNED_CHANGES else "a lower")
  skipped = f"; {left_out} without effective bits left out" if left_out else ""
  return (f"{what} against effective bits per stored value at 8K context. Each point: the "
          f"mean over {_over(placed, contexts=True)} of one KV config's rows ({len(placed)} "
          f"in all{skipped}). Pareto front: the configs for which no other has at most their "
          f"bits and at least as good a value, with fewer bits or {better} value.")


_REPORT_METRICS = ("ppl_rel_change", "kl_mean", "kl_p99", "top1_agreement", "ppl",
                   "attn_rel_error", "saturation_k", "saturation_v")
_PLOTS = (("kl_vs_context.png", "context", "kl_mean"),
          ("top1_vs_context.png", "context", "top1_agreement"),
          ("ppl_vs_bits.png", "bits", "ppl_rel_change"),
          ("kl_vs_bits.png", "bits", "kl_mean"))


def write_report(rows: Sequence[dict], workdir: str | Path, *, title: str,
                 transfer_formats: Sequence[str] | None = None,
                 extra_sections: Sequence[str] = ()) -> str:
  """Checks the rows and writes results.jsonl, the PNG plots and report.md to `workdir`
  (each file atomically).

  Args:
    rows: result rows (see the module docstring).
    workdir: output folder (created if needed).
    title: the report's title.
    transfer_formats: KV formats to give calibration-transfer tables; default: every format
      with at least one calibrated (non-dynamic) score row.
    extra_sections: markdown appended before the plots.

  Returns:
    The report markdown (also written to `workdir/report.md`).
  """
  check_rows(rows)
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  write_jsonl(rows, workdir / "results.jsonl")
  scores = _scores(rows)
  parts = [header_markdown(rows, title=title)]
  if scores:
    parts.append("## Quality against the reference cache")
    parts += [metric_table(scores, m) for m in _REPORT_METRICS]
    if transfer_formats is None:
      transfer_formats = sorted({r["kv_format"] for r in scores if r["calibration"] != "dynamic"})
    if transfer_formats:
      parts.append("## Calibration transfer")
      parts += [transfer_table(scores, m, kv_format=f) for f in transfer_formats
                for m in ("ppl_rel_change", "kl_mean")]
  if any(r["kind"] == "passkey" for r in rows):
    parts += ["## Passkey retrieval", passkey_table(rows)]
  parts += list(extra_sections)
  if scores:
    parts.append("## Plots")
    parts.append("Colours: one per KV format, the same in every plot; a calibrated config is "
                 "a shade of its format's colour with its own marker.")
    has_bits = any("kv_effective_bits" in r for r in scores)
    for name, vs, metric in _PLOTS:
      if vs == "bits" and not has_bits:
        continue
      plot = plot_vs_context if vs == "context" else plot_vs_bits
      figure = plot(scores, metric, workdir / name)
      what = "context" if vs == "context" else "effective bits"
      parts.append(figure.markdown(f"{metric} vs {what}", plot_caption(scores, metric, vs=vs)))
  report = "\n\n".join(parts) + "\n"
  reports.write_text(workdir / "report.md", report)
  return report
