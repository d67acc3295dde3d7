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
of them, so a report never silently omits what was measured under which precision.

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

from kvtpu.formats import KVFormat, QuantSpec

__all__ = [
    "LIST_METRICS", "PASSKEY_METRICS", "REQUIRED_FIELDS", "SCORE_METRICS", "check_row",
    "check_rows", "config_label", "header_markdown", "metric_table", "passkey_table",
    "plot_vs_bytes", "plot_vs_context", "read_jsonl", "transfer_table", "write_jsonl",
    "write_report",
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
_CALIBRATION_WHAT = "'dynamic' or a disclosure dict with method and workloads"

# --------------------------------------------------------------------------------------
# Schema check.


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
  return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _is_str(x: Any) -> bool:
  return isinstance(x, str) and bool(x.strip())


def _pos_int(x: Any) -> bool:
  return _is_int(x) and x > 0


def _require(d: dict, key: str, path: str, ok: Callable[[Any], bool], what: str) -> Any:
  if key not in d:
    raise ValueError(f"result row lacks {path!r}")
  if not ok(d[key]):
    got = repr(d[key])
    raise ValueError(f"result row field {path!r} must be {what}, got {got[:80]}")
  return d[key]


def _check_disclosure(d: dict, path: str) -> None:
  _require(d, "name", f"{path}.name", _is_str, "a non-empty str")
  _require(d, "num_tokens", f"{path}.num_tokens", _pos_int, "an int > 0")
  _require(d, "token_sha256", f"{path}.token_sha256", _is_str, "a non-empty str")


def _require_fields(row: Any, fields: Iterable[str]) -> None:
  """A dict holding every one of `fields`, or a ValueError naming the first missing."""
  if not isinstance(row, dict):
    raise ValueError(f"a result row must be a dict, got {type(row).__name__}")
  for field in fields:
    if field not in row:
      raise ValueError(f"result row lacks {field!r}")


def check_row(row: Any) -> None:
  """Checks one result row against the schema (see the module docstring).

  Raises:
    ValueError: naming the first missing or invalid field.
  """
  _require_fields(row, REQUIRED_FIELDS)
  kind = _require(row, "kind", "kind", lambda x: x in ("score", "passkey"), "'score' or 'passkey'")
  for field in ("model", "weight_precision", "kv_format", "calibration_name"):
    _require(row, field, field, _is_str, "a non-empty str")
  try:
    fmt = KVFormat.parse(row["kv_format"])
  except ValueError as e:
    raise ValueError(f"result row field 'kv_format' is not a kvtpu format: {e}") from None
  try:
    precision = KVFormat.from_dict(row["kv_precision"])
  except ValueError as e:
    raise ValueError(f"result row field 'kv_precision' is not `KVFormat.to_dict()`: {e}") from None
  if precision != fmt:
    raise ValueError(f"result row field 'kv_precision' describes {precision.name}, but "
                     f"'kv_format' is {fmt.name}")
  _require(row, "kv_bytes_per_token", "kv_bytes_per_token", lambda x: _is_num(x) and x > 0,
           "a number > 0")
  cal = row["calibration"]
  if cal != "dynamic":
    ok = (isinstance(cal, dict) and _is_str(cal.get("method"))
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
  _require(row, "eval_workload", "eval_workload", lambda x: isinstance(x, dict), "a dict")
  _check_disclosure(row["eval_workload"], "eval_workload")
  _require(row, "context", "context", _pos_int, "an int > 0")
  _require(row, "batch", "batch", _pos_int, "an int > 0")
  _require(row, "protocol", "protocol", lambda x: isinstance(x, dict) and x, "a non-empty dict")
  metrics = _require(row, "metrics", "metrics", lambda x: isinstance(x, dict), "a dict")
  if kind == "score":
    for m in SCORE_METRICS:
      _require(metrics, m, f"metrics.{m}", _is_num, "a finite number")
    for m in LIST_METRICS:
      _require(metrics, m, f"metrics.{m}",
               lambda x: isinstance(x, list) and x and all(_is_num(v) for v in x),
               "a non-empty list of finite numbers (one per layer)")
  else:
    for m in PASSKEY_METRICS:
      _require(metrics, m, f"metrics.{m}", _is_num, "a finite number")
    _require(row, "depth", "depth", lambda x: _is_num(x) and 0 <= x <= 1, "a number in [0, 1]")


def check_rows(rows: Iterable[Any], check: Callable[[Any], None] | None = None) -> None:
  """Checks every row (with `check`, default this schema's `check_row`); the error
  message starts with the failing row's index."""
  check = check or check_row
  for i, row in enumerate(rows):
    try:
      check(row)
    except ValueError as e:
      raise ValueError(f"row {i}: {e}") from None


def write_jsonl(rows: Sequence[dict], path: str | Path,
                check: Callable[[Any], None] | None = None) -> None:
  """Checks the rows (`check` as in `check_rows`), then writes them to `path`, one
  JSON object per line."""
  check_rows(rows, check)
  with open(path, "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows)


def read_jsonl(path: str | Path, check: Callable[[Any], None] | None = None) -> list[dict]:
  """Reads and checks (`check` as in `check_rows`) the rows of a results.jsonl file
  (blank lines are skipped)."""
  check = check or check_row
  rows = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if line.strip():
        try:
          row = json.loads(line)
          check(row)
        except ValueError as e:
          raise ValueError(f"{path}:{n}: {e}") from None
        rows.append(row)
  return rows


# --------------------------------------------------------------------------------------
# Tables.


def config_label(row: dict) -> str:
  """The KV config of a row: format and calibration, e.g. "int8 | dynamic", "int4 | cal: prose".

  An unquantized format (bf16, f32) has no scales to calibrate: its label is the format alone.
  """
  if row["calibration"] == "dynamic" and not KVFormat.parse(row["kv_format"]).quantized:
    return row["kv_format"]
  if row["calibration"] == "dynamic":
    return f"{row['kv_format']} | dynamic"
  return f"{row['kv_format']} | cal: {row['calibration_name']}"


def _labeler(rows: Sequence[dict]) -> Callable[[dict], str]:
  """`config_label`, prefixed with the model when the rows hold more than one model."""
  if len({r["model"] for r in rows}) > 1:
    return lambda r: f"{r['model']}: {config_label(r)}"
  return config_label


def _value(row: dict, metric: str) -> float:
  v = row["metrics"].get(metric, math.nan)
  return float(max(v)) if isinstance(v, list) else float(v)


def _config_order(rows: Sequence[dict], label: Callable[[dict], str]) -> list[str]:
  """Labels: per model, bf16 first, then by bytes per token descending, dynamic first."""
  keys = {}
  for r in rows:
    keys.setdefault(label(r), (r["model"], r["kv_format"] != "bf16", -r["kv_bytes_per_token"],
                               r["kv_format"], r["calibration"] != "dynamic"))
  return sorted(keys, key=lambda lab: (*keys[lab], lab))


def _esc(text: Any) -> str:
  return str(text).replace("|", "\\|")


def _table(head: Sequence[str], body: Iterable[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(_esc(h) for h in head) + " |", "|" + "---|" * len(head)]
  lines += ["| " + " | ".join(_esc(c) for c in line) + " |" for line in body]
  return "\n".join(lines)


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
  """A markdown table of one metric over the score rows.

  Rows are KV configs (`config_label`), columns are "workload @context xbatch"; a cell is the
  mean of its rows (for per-layer metrics, each row's max over layers).
  """
  scores = _scores(rows)
  caption = (f"**{metric}** (rows: KV config; columns: evaluated on @ context x batch"
             f"{_layers_note(metric)})")
  if not scores:
    return caption + "\n\n_no score rows_"
  label = _labeler(scores)
  col = lambda r: (r["eval_workload"]["name"], r["context"], r["batch"])  # noqa: E731
  cols = sorted({col(r) for r in scores})
  body = _grid(scores, label, col, lambda g: fmt.format(np.mean([_value(r, metric) for r in g])),
               _config_order(scores, label), cols)
  head = ["config"] + [f"{w} @{c} x{b}" for w, c, b in cols]
  return caption + "\n\n" + _table(head, body)


def transfer_table(rows: Sequence[dict], metric: str, *, kv_format: str, context: int | None = None,
                   batch: int | None = None, fmt: str = "{:.4g}") -> str:
  """The calibration-transfer table of one KV format: calibrated on (rows) x evaluated on.

  A cell is the mean of the metric over the matching score rows (all contexts and batches
  unless `context` / `batch` select one).
  """
  sel = [r for r in _scores(rows) if r["kv_format"] == kv_format
         and context in (None, r["context"]) and batch in (None, r["batch"])]
  where = "".join(f", {k} {v}" for k, v in (("context", context), ("batch", batch)) if v)
  if not where:
    where = ", mean over contexts and batches"
  caption = (f"**{kv_format}**: {metric}, rows: calibrated on, columns: evaluated on"
             f"{where}{_layers_note(metric)}")
  if not sel:
    return caption + "\n\n_no matching score rows_"
  multi = len({r["model"] for r in sel}) > 1
  name = lambda r: f"{r['model']}: {r['calibration_name']}" if multi else r["calibration_name"]  # noqa: E731
  keys = {name(r): (r["model"], r["calibration"] != "dynamic", r["calibration_name"]) for r in sel}
  order = sorted(keys, key=keys.get)
  cols = sorted({r["eval_workload"]["name"] for r in sel})
  body = _grid(sel, name, lambda r: r["eval_workload"]["name"],
               lambda g: fmt.format(np.mean([_value(r, metric) for r in g])), order, cols)
  return caption + "\n\n" + _table(["calibrated on"] + cols, body)


def passkey_table(rows: Sequence[dict]) -> str:
  """Passkey retrieval: config (rows) x context (columns), "accuracy (reference accuracy)".

  A cell averages over depths (and workloads), weighted by the number of samples.
  """
  keys = [r for r in rows if r["kind"] == "passkey"]
  if not keys:
    return "_no passkey rows_"
  depths = sorted({r["depth"] for r in keys})
  caption = ("**passkey retrieval**: accuracy (reference accuracy), mean over depths "
             + ", ".join(f"{d:g}" for d in depths))
  label = _labeler(keys)

  def cell(group):
    w = [r["metrics"]["num_samples"] for r in group]
    acc, ref = (np.average([r["metrics"][m] for r in group], weights=w)
                for m in ("accuracy", "accuracy_ref"))
    return f"{acc:.2f} ({ref:.2f})"

  contexts = sorted({r["context"] for r in keys})
  body = _grid(keys, label, lambda r: r["context"], cell, _config_order(keys, label), contexts)
  return caption + "\n\n" + _table(["config"] + [str(c) for c in contexts], body)


def _unique(items: Iterable[Any]) -> list[Any]:
  seen, out = set(), []
  for x in items:
    key = json.dumps(x, sort_keys=True)
    if key not in seen:
      seen.add(key)
      out.append(x)
  return out


def _workload(w: dict) -> str:
  n = w.get("tokens_used", w["num_tokens"])
  return f"`{w['name']}` ({n:,} tokens, token_sha256 `{w['token_sha256'][:16]}`)"


def header_markdown(rows: Sequence[dict], *, title: str) -> str:
  """The report header: model and weight precision, then KV precision, calibration, data, protocol."""
  parts = [f"# {title}", "## Model and weight precision"]
  parts.append("\n".join(f"- `{m}`: weights {w}" for m, w in
                         _unique((r["model"], r["weight_precision"]) for r in rows)))
  parts.append("## KV-cache precision (separate from the weight precision)")

  def spec(d):
    s = QuantSpec.from_dict(d)
    if not s.quantized:
      return f"{s.dtype.value}, unscaled"
    group = f", group {s.group_size}" if s.group_size is not None else ""
    scheme = "symmetric" if s.symmetric else "asymmetric"
    scales = ", bfloat16 scales" if s.scale_dtype == "bfloat16" else ""
    return f"{s.dtype.value}, {s.granularity.value}{group}, {scheme}{scales}"

  kv = _unique((r["model"], r["kv_format"], r["kv_precision"], r["kv_bytes_per_token"])
               for r in rows)
  kv.sort(key=lambda x: (x[0], x[1] != "bf16", -x[3], x[1]))
  parts.append(_table(["model", "KV format", "K", "V", "bytes/token (all layers)"],
                      [(m, f, spec(p["k"]), spec(p["v"]), f"{b:,.6g}") for m, f, p, b in kv]))
  parts.append("## Calibration")
  lines = []
  label = _labeler(rows)
  order = {lab: i for i, lab in enumerate(_config_order(rows, label))}
  configs = sorted(_unique((label(r), r["kv_format"], r["calibration"]) for r in rows),
                   key=lambda x: order[x[0]])
  for lab, fmt, cal in configs:
    if cal == "dynamic" and not KVFormat.parse(fmt).quantized:
      lines.append(f"- {lab}: not quantized (nothing to calibrate)")
    elif cal == "dynamic":
      lines.append(f"- {lab}: dynamic scales, computed per token when written (no calibration)")
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


def _figure(metric: str, ys: Iterable[float], xlabel: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  ys = [y for y in ys if math.isfinite(y)]
  if metric.startswith("kl") and ys and min(ys) > 0:
    ax.set_yscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(metric + (" (max over layers)" if metric in LIST_METRICS else ""))
  ax.grid(True, alpha=0.3)
  return plt, fig, ax


def _save(plt, fig, ax, path: str | Path, title: str) -> None:
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_vs_context(rows: Sequence[dict], metric: str, path: str | Path) -> None:
  """PNG: the metric against context, one line per KV config (mean over workloads and batches)."""
  scores = _scores(rows)
  label = _labeler(scores)
  plt, fig, ax = _figure(metric, [_value(r, metric) for r in scores], "context (tokens)")
  for lab in _config_order(scores, label):
    by_ctx = defaultdict(list)
    for r in scores:
      if label(r) == lab:
        by_ctx[r["context"]].append(_value(r, metric))
    xs = sorted(by_ctx)
    ax.plot(xs, [np.mean(by_ctx[x]) for x in xs], marker="o", label=lab)
  if len({r["context"] for r in scores}) > 1:
    ax.set_xscale("log", base=2)
  if scores:
    ax.legend(fontsize=8)
  _save(plt, fig, ax, path, f"{metric} vs context")


def plot_vs_bytes(rows: Sequence[dict], metric: str, path: str | Path) -> None:
  """PNG: the metric (mean over a config's rows) against KV bytes per token, one point per config."""
  scores = _scores(rows)
  label = _labeler(scores)
  groups = defaultdict(list)
  for r in scores:
    groups[label(r)].append(r)
  points = {lab: (np.mean([r["kv_bytes_per_token"] for r in g]),
                  np.mean([_value(r, metric) for r in g])) for lab, g in groups.items()}
  plt, fig, ax = _figure(metric, [y for _, y in points.values()], "KV bytes per token")
  for lab, (x, y) in points.items():
    ax.scatter([x], [y])
    ax.annotate(lab, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
  _save(plt, fig, ax, path, f"{metric} vs KV bytes per token")


_REPORT_METRICS = ("ppl_rel_change", "kl_mean", "kl_p99", "top1_agreement", "ppl",
                   "attn_rel_error", "saturation_k", "saturation_v")
_PLOTS = (("kl_vs_context.png", plot_vs_context, "kl_mean"),
          ("top1_vs_context.png", plot_vs_context, "top1_agreement"),
          ("ppl_vs_bytes.png", plot_vs_bytes, "ppl_rel_change"),
          ("kl_vs_bytes.png", plot_vs_bytes, "kl_mean"))


def write_report(rows: Sequence[dict], workdir: str | Path, *, title: str,
                 transfer_formats: Sequence[str] | None = None,
                 extra_sections: Sequence[str] = ()) -> str:
  """Checks the rows and writes results.jsonl, the PNG plots and report.md to `workdir`.

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
    for name, plot, metric in _PLOTS:
      plot(scores, metric, workdir / name)
      what = "context" if plot is plot_vs_context else "KV bytes per token"
      parts.append(f"![{metric} vs {what}]({name})")
  report = "\n\n".join(parts) + "\n"
  (workdir / "report.md").write_text(report)
  return report
