"""The summary run: what context length, at what concurrency, each KV-cache precision
supports before the accelerator runs out of memory, and what it costs in accuracy.

It measures nothing: it joins the results.jsonl of two earlier runs on the KV format, for one
stated model,

  evaluate  accuracy against the reference cache (`kvtpu.models.runs.evaluate`): per KV
            config (format and calibration) the perplexity change and mean KL on each
            evaluation workload at one context (`eval_context`), and passkey retrieval
  headroom  the maxima that fit (`kvtpu.models.runs.headroom`): per KV format the longest
            context at each concurrency and the most sequences at each context, in one mode
            (`headroom_mode`), and the token capacity over bf16

and writes one table with a row per KV config: effective bits @ 8K, the longest context at
each concurrency the headroom run answered, the most sequences at each context it answered,
token capacity over bf16, then perplexity change (%) and mean KL (nats) per evaluation
workload and passkey accuracy per length. A calibration changes a format's accuracy, not its
memory, so every calibration variant of a format has that format's capacity. The reference
cache of the evaluation (bf16) is a row of its own: capacity 1.00x, accuracy changes 0 by
definition, its passkey cell the reference's own accuracy. Formats found in only one of the
two runs are named in a note under the table.

Outputs in the workdir: config.json, results.jsonl (one row per KV config, every joined
field), report.md (the header, the table, notes, the plot) and capacity_vs_ppl.png (token
capacity against the worst perplexity change over the workloads, the largest in
magnitude, one point per KV config, with the Pareto front: the configs no other beats on
both, perplexity changes compared by magnitude).

Answer rows are picked as the headroom report picks them (`kvtpu.headroom.report`): the
non-oom row of each (format, kind, asked concurrency or context); the oom rows beside them
are the first points past each maximum.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from kvtpu.models.runs.common import ConfigError, check, check_workdir, one_of, positive_int, start

from kvtpu import reports
from kvtpu.eval import report as eval_report
from kvtpu.formats import LayerPlan
from kvtpu.headroom import report as headroom_report

__all__ = ["SummaryConfig", "SummaryResult", "header_lines",
           "plot_capacity_vs_ppl", "run", "summarize", "summary_table"]

RESULTS = "results.jsonl"
# The format capacities are compared with, and the evaluation's usual reference cache.
BASE_FORMAT = "bf16"
PLOT = "capacity_vs_ppl.png"
_FOOTNOTE_MARK = "*"


@dataclasses.dataclass(frozen=True)
class SummaryConfig:
  """A summary run (each field is the summary binary's flag of the same name).

  Attributes:
    evaluate_dir: the workdir of an evaluate run (its results.jsonl is read).
    headroom_dir: the workdir of a headroom run of the same model (its results.jsonl).
    headroom_mode: whose maxima to show: analytic, aot or live (present in the headroom
      rows).
    eval_context: the evaluation context whose scores to show; 0: the longest scored.
    allow_model_mismatch: join runs of two different models, stating both in the header,
      instead of refusing.
  """

  evaluate_dir: str = ""
  headroom_dir: str = ""
  headroom_mode: str = "analytic"
  eval_context: int = 0
  allow_model_mismatch: bool = False

  def __post_init__(self):
    for field, binary in (("evaluate_dir", "evaluate"), ("headroom_dir", "headroom")):
      value = getattr(self, field)
      check(reports.is_str(value), field,
            f"expected the workdir of a `python -m kvtpu.experiments.{binary}` run, got "
            f"{value!r}")
      path = Path(value) / RESULTS
      check(path.is_file(), field, f"{path} does not exist: give the workdir of a "
            f"`python -m kvtpu.experiments.{binary}` run")
      with open(path) as f:
        empty = not any(line.strip() for line in f)
      check(not empty, field, f"{path} is empty: the {binary} run wrote no result rows")
    one_of("headroom_mode", self.headroom_mode, headroom_report.MODES)
    object.__setattr__(self, "eval_context", positive_int("eval_context", self.eval_context,
                                                          low=0))
    check(isinstance(self.allow_model_mismatch, bool), "allow_model_mismatch",
          f"expected a bool, got {self.allow_model_mismatch!r}")

  @property
  def evaluate_results(self) -> Path:
    return Path(self.evaluate_dir) / RESULTS

  @property
  def headroom_results(self) -> Path:
    return Path(self.headroom_dir) / RESULTS


@dataclasses.dataclass(frozen=True)
class SummaryResult:
  """What a summary run made: its rows, the table, the whole report, the seconds it took,
  the paths written."""

  rows: list[dict]
  table: str
  report: str
  seconds: float
  paths: dict[str, Path]


# --------------------------------------------------------------------------------------
# Reading the two runs.


def _read(path: Path, field: str, read) -> list[dict]:
  try:
    return read(path)
  except (ValueError, OSError) as e:
    raise ConfigError(field, f"{path} is not a valid results file: {e}") from None


def _unique(values: Iterable[Any]) -> list[Any]:
  return list(dict.fromkeys(values))


def _variant(row: dict) -> tuple[str, str]:
  return row["kv_format"], row["calibration_name"]


def _label(fmt: str, calibration_name: str, *, reference: bool = False,
           method: str | None = None) -> str:
  """A KV config's name: the format (or layer plan), then "dynamic" (per-token scales),
  "clip on <workload>" (the clip ratios of per-token scales calibrated there), "scales on
  <workload>" (static scales) or "plan on <workload>" (a layer plan chosen there, method
  `layer_plan`); an unquantized format (or the reference) alone."""
  parsed = LayerPlan.config(fmt)
  if reference or (calibration_name == "dynamic" and not parsed.quantized):
    return fmt
  if calibration_name == "dynamic":
    return f"{fmt} | dynamic"
  if isinstance(parsed, LayerPlan) or method == "layer_plan":
    return f"{fmt} | plan on {calibration_name}"
  return f"{fmt} | {'scales' if parsed.static else 'clip'} on {calibration_name}"


def _weighted(rows: Sequence[dict], metric: str) -> float:
  weights = [r["metrics"]["num_samples"] for r in rows]
  return sum(w * r["metrics"][metric] for w, r in zip(weights, rows, strict=True)) / sum(weights)


def _passkey(rows: Sequence[dict], metric: str = "accuracy") -> list[dict]:
  """Passkey rows per length: `metric` averaged over depths, weighted by samples."""
  by_length = defaultdict(list)
  for r in rows:
    by_length[r["context"]].append(r)
  return [{"length": n, "accuracy": _weighted(g, metric),
           "accuracy_ref": _weighted(g, "accuracy_ref"),
           "num_samples": sum(r["metrics"]["num_samples"] for r in g),
           "depths": sorted({float(r["depth"]) for r in g})}
          for n, g in sorted(by_length.items())]


def _evaluation(rows: list[dict], config: SummaryConfig) -> dict[str, Any]:
  """The evaluate run at the chosen context: per KV config its metrics per workload."""
  path = config.evaluate_results
  models = _unique(r["model"] for r in rows)
  check(len(models) == 1, "evaluate_dir",
        f"{path} holds rows of several models ({', '.join(models)}): give the workdir of one "
        "evaluate run")
  scores = [r for r in rows if r["kind"] == "score"]
  contexts = sorted({r["context"] for r in scores})
  check(bool(scores), "evaluate_dir", f"{path} holds no score rows (kind 'score')")
  context = config.eval_context or contexts[-1]
  check(context in contexts, "eval_context",
        f"{path} holds no score rows at context {context}; it scored contexts "
        f"{', '.join(map(str, contexts))} (0 picks the longest)")
  at = [r for r in scores if r["context"] == context]
  passkeys = [r for r in rows if r["kind"] == "passkey"]
  workloads = _unique(r["eval_workload"]["name"] for r in at)
  refs = _unique(str(r["protocol"].get("reference", BASE_FORMAT)) for r in rows)
  check(len(refs) == 1, "evaluate_dir",
        f"{path} mixes rows against several reference caches ({', '.join(refs)})")
  variants: dict[tuple[str, str], dict] = {}
  for r in at + passkeys:
    v = variants.setdefault(_variant(r), {
        "kv_format": r["kv_format"], "calibration": r["calibration"],
        "calibration_name": r["calibration_name"], "scores": defaultdict(list),
        "passkey_rows": [], "kv_bytes_per_token": r["kv_bytes_per_token"],
        "kv_effective_bits": r.get("kv_effective_bits")})
    if r["kind"] == "score":
      v["scores"][r["eval_workload"]["name"]].append(r)
    else:
      v["passkey_rows"].append(r)
  for v in variants.values():
    scored = v.pop("scores")
    for metric in ("ppl_rel_change", "kl_mean", "top1_agreement"):
      # The mean over the batches scored at this context.
      v[metric] = {w: sum(r["metrics"][metric] for r in scored[w]) / len(scored[w])
                   for w in workloads if scored.get(w)}
    v["passkey"] = _passkey(v.pop("passkey_rows"))
  return {
      "path": path, "model": models[0], "context": context, "contexts": contexts,
      "workloads": workloads, "reference": refs[0], "variants": variants,
      "batches": sorted({r["batch"] for r in at}),
      "weight_precision": _unique(r["weight_precision"] for r in rows),
      "workload_rows": _unique((r["eval_workload"]["name"], r["eval_workload"]["num_tokens"])
                               for r in at),
      "reference_passkey": _passkey(passkeys, "accuracy_ref"),
  }


def _answers(rows: Iterable[dict], path: Path) -> dict[tuple[str, str, int], dict]:
  """The non-oom row of each point (format, kind, asked concurrency or context), as the
  headroom report picks its maxima."""
  try:
    return headroom_report.maxima(rows)
  except ValueError as e:
    raise ConfigError("headroom_dir", f"{path}: {e}") from None


def _headroom(rows: list[dict], config: SummaryConfig) -> dict[str, Any]:
  """The headroom run in the chosen mode: its answers, deployment and capacities."""
  path = config.headroom_results
  modes = _unique(r["mode"] for r in rows)
  check(config.headroom_mode in modes, "headroom_mode",
        f"{path} holds no {config.headroom_mode} rows; the modes present: {', '.join(modes)}")
  sel = [r for r in rows if r["mode"] == config.headroom_mode]
  models = _unique(r["model"] for r in sel)
  check(len(models) == 1, "headroom_dir",
        f"{path} holds rows of several models ({', '.join(models)}): give the workdir of one "
        "headroom sweep")
  answers = _answers(sel, path)
  formats = sorted(_unique(r["kv_format"] for r in sel), key=lambda f: f != BASE_FORMAT)
  concurrencies = sorted({k[2] for k in answers if k[1] == "max_context"})
  contexts = sorted({k[2] for k in answers if k[1] == "max_concurrency"})
  capacity = {fmt: headroom_report.token_capacity(answers, fmt) for fmt in formats}

  def facts(field: str) -> str:
    return ", ".join(map(str, _unique(r[field] for r in sel)))

  return {
      "path": path, "model": models[0], "mode": config.headroom_mode, "modes": modes,
      "answers": answers, "formats": formats, "concurrencies": concurrencies,
      "contexts": contexts, "capacity": capacity,
      "effective_bits": {r["kv_format"]: r["effective_bits"] for r in sel
                         if "effective_bits" in r},
      "trained": min(r["model_max_position"] for r in sel),
      **{f: facts(f) for f in ("accelerator", "chip", "mesh", "num_devices", "strategy",
                               "weight_dtype")},
      "hbm": min(r["hbm_per_device"] for r in sel),
      "budget": min(r["budget_per_device"] for r in sel),
      "reserve": max(r["reserve_fraction"] for r in sel),
  }


# --------------------------------------------------------------------------------------
# The join.


def _same_model(ev: dict, hr: dict) -> bool:
  return ev["model"].strip().lower() == hr["model"].strip().lower()


def _sort_key(row: dict) -> tuple:
  bits = row["effective_bits"]
  return (not row["is_reference"], -(bits if bits is not None else math.inf),
          row["kv_format"], row["calibration_name"] != "dynamic", row["calibration_name"])


def _joined_row(fmt: str, variant: dict | None, ev: dict, hr: dict) -> dict:
  """One KV config's row of results.jsonl: the evaluation (None for the reference) joined
  with its format's headroom answers."""
  reference = variant is None
  answers = hr["answers"]
  capacity, at = hr["capacity"].get(fmt, (None, None))
  bits = hr["effective_bits"].get(fmt)
  if bits is None and variant is not None:
    bits = variant["kv_effective_bits"]
  row = {
      "label": _label(fmt, "dynamic" if reference else variant["calibration_name"],
                      reference=reference, method=None if reference or variant["calibration"]
                      == "dynamic" else variant["calibration"]["method"]),
      "kv_format": fmt, "is_reference": reference,
      "calibration": "none (the reference cache)" if reference else variant["calibration"],
      "calibration_name": "dynamic" if reference else variant["calibration_name"],
      "model": ev["model"], "headroom_model": hr["model"],
      "weight_precision": "; ".join(ev["weight_precision"]), "weight_dtype": hr["weight_dtype"],
      "accelerator": hr["accelerator"], "chip": hr["chip"], "mesh": hr["mesh"],
      "strategy": hr["strategy"], "headroom_mode": hr["mode"],
      "model_max_position": hr["trained"], "effective_bits": bits,
      "kv_bytes_per_token": None if reference else variant["kv_bytes_per_token"],
      "max_context": [
          {"concurrency": c, "context": a["context"], "batch": a["batch"]}
          for c in hr["concurrencies"] if (a := answers.get((fmt, "max_context", c)))],
      "max_concurrency": [
          {"context": c, "concurrency": a["concurrency"], "batch": a["batch"]}
          for c in hr["contexts"] if (a := answers.get((fmt, "max_concurrency", c)))],
      "token_capacity_vs_bf16": capacity, "capacity_at_concurrency": at,
      "reference": ev["reference"], "eval_context": ev["context"],
      "eval_batches": ev["batches"],
  }
  if reference:
    row["ppl_rel_change"] = {w: 0.0 for w in ev["workloads"]}
    row["kl_mean"] = {w: 0.0 for w in ev["workloads"]}
    row["top1_agreement"] = {w: 1.0 for w in ev["workloads"]}
    row["passkey"] = ev["reference_passkey"]
  else:
    for metric in ("ppl_rel_change", "kl_mean", "top1_agreement", "passkey"):
      row[metric] = variant[metric]
  changes = list(row["ppl_rel_change"].values())
  # The worst: the largest in magnitude (the targets bound |change|), its sign kept.
  row["worst_ppl_rel_change"] = max(changes, key=abs) if changes else None
  return row


def summarize(evaluate_rows: list[dict], headroom_rows: list[dict],
              config: SummaryConfig) -> dict[str, Any]:
  """Joins the two runs' rows (see the module docstring).

  Returns:
    {"rows": one joined row per KV config (reference first, then by effective bits
    descending), "evaluation": ..., "headroom": ..., "only_evaluated": formats evaluated but
    not in the headroom run, "only_headroom": formats in the headroom run but not evaluated}.

  Raises:
    ConfigError: on "headroom_mode" when the headroom rows hold none of that mode (naming
      the modes present); on "eval_context" when nothing was scored at it; on
      "headroom_dir" when the runs are of different models and not `allow_model_mismatch`,
      or when the rows mix several sweeps; on "evaluate_dir" when they mix models or
      reference caches.
  """
  hr = _headroom(headroom_rows, config)
  ev = _evaluation(evaluate_rows, config)
  if not _same_model(ev, hr):
    check(config.allow_model_mismatch, "headroom_dir",
          f"the evaluate run is of model {ev['model']!r} ({ev['path']}) and the headroom run "
          f"of model {hr['model']!r} ({hr['path']}): the summary answers for one stated model; "
          "give the workdirs of runs of the same model, or --allow_model_mismatch to join "
          "them anyway (the header then states both)")
  evaluated = _unique(v["kv_format"] for v in ev["variants"].values())
  rows = [_joined_row(fmt, variant, ev, hr) for (fmt, _), variant in ev["variants"].items()
          if fmt in hr["formats"]]
  if ev["reference"] in hr["formats"] and ev["reference"] not in evaluated:
    rows.append(_joined_row(ev["reference"], None, ev, hr))
  rows.sort(key=_sort_key)
  plotted = [r for r in rows if r["token_capacity_vs_bf16"] is not None
             and r["worst_ppl_rel_change"] is not None]
  front = reports.pareto_front([(r["token_capacity_vs_bf16"], abs(r["worst_ppl_rel_change"]))
                                for r in plotted])
  for r in rows:
    r["pareto"] = None  # Not plotted: no capacity or no perplexity to place it by.
  for r, on in zip(plotted, front, strict=True):
    r["pareto"] = on
  return {
      "rows": rows, "evaluation": ev, "headroom": hr,
      "only_evaluated": [f for f in evaluated if f not in hr["formats"]],
      "only_headroom": [f for f in hr["formats"]
                        if f not in evaluated and f != ev["reference"]],
  }


# --------------------------------------------------------------------------------------
# The report.


def summary_table(summary: dict[str, Any]) -> str:
  """The markdown table of `summarize`'s rows (columns from the data)."""
  ev, hr = summary["evaluation"], summary["headroom"]
  workloads = ev["workloads"]
  ats = {r["capacity_at_concurrency"] for r in summary["rows"]} - {None}
  label = headroom_report.context_label
  head = (["KV config", "effective bits @ 8K"]
          + [f"max context @ conc {c}" for c in hr["concurrencies"]]
          + [f"max sequences @ ctx {label(c)}" + (_FOOTNOTE_MARK if c > hr["trained"] else "")
             for c in hr["contexts"]]
          + ["token capacity vs bf16"]
          + [f"ppl change {w} (%)" for w in workloads]
          + [f"KL {w} (nats)" for w in workloads] + ["passkey accuracy"])
  body = []
  for r in summary["rows"]:
    fmt = r["kv_format"]
    line = [r["label"], "-" if r["effective_bits"] is None else f"{r['effective_bits']:.4g}"]
    for c in hr["concurrencies"]:
      a = hr["answers"].get((fmt, "max_context", c))
      line.append(headroom_report.found_cell(a) if a else "-")
    for c in hr["contexts"]:
      a = hr["answers"].get((fmt, "max_concurrency", c))
      line.append(headroom_report.found_cell(a) if a else "-")
    cap = r["token_capacity_vs_bf16"]
    line.append("n/a" if cap is None else f"{cap:.2f}x" + (
        f" @ conc {r['capacity_at_concurrency']}" if len(ats) > 1 else ""))
    line += [reports.percent(r["ppl_rel_change"][w], "{:.3g}", signed=True)
             if w in r["ppl_rel_change"] else "-" for w in workloads]
    line += [f"{r['kl_mean'][w]:.3g}" if w in r["kl_mean"] else "-" for w in workloads]
    line.append(", ".join(f"{p['accuracy']:.2f} @ {label(p['length'])}" for p in r["passkey"])
                or "-")
    body.append(line)
  return reports.markdown_table(head, body)


def _calibrations(ev: dict) -> list[str]:
  lines = []
  for (fmt, name), v in ev["variants"].items():
    cal = v["calibration"]
    if cal == "dynamic":
      continue
    used = "; ".join(
        f"`{w['name']}`" + (f" ({w['tokens_used']:,} of {w['num_tokens']:,} tokens)"
                            if "tokens_used" in w else f" ({w['num_tokens']:,} tokens)")
        for w in cal["workloads"])
    lines.append(f"{_label(fmt, name, method=cal['method'])}: {cal['method']} on {used}")
  return lines


def header_lines(summary: dict[str, Any]) -> list[str]:
  """The header's bullets: model, weights, accelerator and mesh, headroom mode, evaluation
  workloads and context, calibration workloads."""
  ev, hr = summary["evaluation"], summary["headroom"]
  if _same_model(ev, hr):
    model = f"model: `{ev['model']}` (trained context {hr['trained']:,} tokens)"
  else:
    model = (f"models: accuracy of `{ev['model']}` (evaluate run), memory of `{hr['model']}` "
             f"(headroom run, trained context {hr['trained']:,} tokens), joined with "
             "--allow_model_mismatch: the capacity and the accuracy columns describe different "
             "models")
  passkey = ev["reference_passkey"]
  lines = [
      model,
      f"weight precision: evaluation: {'; '.join(ev['weight_precision'])}; headroom: "
      f"{hr['weight_dtype']}",
      f"accelerator: {hr['accelerator']} ({hr['num_devices']} x {hr['chip']}, "
      f"{hr['hbm'] / 2**30:.1f} GiB HBM each; budget {hr['budget'] / 2**30:.2f} GiB per device "
      f"after a {hr['reserve']:.0%} reserve); mesh: {hr['mesh']}; kv heads: {hr['strategy']}",
      f"headroom mode: {hr['mode']} ({headroom_report.MODE_TEXT.get(hr['mode'], hr['mode'])}; modes in the "
      f"run: {', '.join(hr['modes'])}) from {hr['path']}",
      "evaluation: "
      + ", ".join(f"`{name}` ({tokens:,} tokens)" for name, tokens in ev["workload_rows"])
      + f" at context {ev['context']:,}, batch {', '.join(map(str, ev['batches']))} "
        f"(contexts scored: {', '.join(map(str, ev['contexts']))}); reference cache "
        f"{ev['reference']}; from {ev['path']}",
  ]
  cals = _calibrations(ev)
  lines.append("calibration: " + ("; ".join(cals) if cals else
                                  "none (every format with dynamic per-token scales)"))
  if passkey:
    lengths = ", ".join(headroom_report.context_label(p["length"]) for p in passkey)
    lines.append(f"passkey: lengths {lengths}"
                 + ", depths " + ", ".join(f"{d:g}" for d in
                                           sorted({d for p in passkey for d in p["depths"]})))
  return lines


def _notes(summary: dict[str, Any]) -> list[str]:
  ev, hr, rows = summary["evaluation"], summary["headroom"], summary["rows"]
  notes = []
  if any(r["is_reference"] for r in rows):
    notes.append(f"{ev['reference']}: the evaluation's reference cache: perplexity change and "
                 "KL 0 by definition; its passkey cell is the reference's own accuracy on the "
                 "same prompts.")
  ats = {r["capacity_at_concurrency"] for r in rows} - {None}
  if BASE_FORMAT not in hr["formats"]:
    notes.append(f"The headroom run has no {BASE_FORMAT} rows: no token capacity to compare "
                 "with (n/a).")
  else:
    where = f"concurrency {next(iter(ats))}" if len(ats) == 1 else "the concurrency shown"
    notes.append(f"Token capacity vs {BASE_FORMAT}: batch x max_len over {BASE_FORMAT}'s at "
                 f"{where} (the largest concurrency both answered).")
  notes.append("Each calibration variant of a format has the format's capacity: calibration "
               "changes accuracy, not memory. Max context: tokens per sequence; max sequences: "
               "sequences of that context; \"(batch N)\": the concurrency rounded up to the "
               "data axis, which the cache allocates.")
  batches = ", ".join(map(str, ev["batches"]))
  batches = (f"the mean over batches {batches}" if len(ev["batches"]) > 1 else f"batch {batches}")
  notes.append(f"Perplexity change and KL: against the {ev['reference']} cache at context "
               f"{ev['context']:,}, {batches}; passkey: retrieval accuracy (fraction) at each "
               "length, averaged over depths.")
  if any(c > hr["trained"] for c in hr["contexts"]) or any(
      m["context"] > hr["trained"] for r in rows for m in r["max_context"]):
    notes.append(f"\\{_FOOTNOTE_MARK} beyond the model's trained context ({hr['trained']:,} "
                 "tokens): it fits in memory, but the model was not trained that long.")
  if summary["only_evaluated"]:
    notes.append(f"Evaluated but not in the headroom run ({hr['mode']}), so not in the table: "
                 + ", ".join(summary["only_evaluated"]) + ".")
  if summary["only_headroom"]:
    notes.append("In the headroom run but not evaluated, so not in the table: "
                 + ", ".join(summary["only_headroom"]) + ".")
  front = [r["label"] for r in rows if r["pareto"]]
  if front:
    notes.append("Pareto front (no other config has at least the token capacity and a worst "
                 "perplexity change at most as large in magnitude, better on one): "
                 + ", ".join(front) + ".")
  return notes


def _style(row: dict) -> reports.Style:
  return reports.style_of(row["kv_format"], None if row["is_reference"]
                          else row["calibration_name"])


def plot_capacity_vs_ppl(summary: dict[str, Any], path: str | Path) -> reports.Figure:
  """PNG: token capacity over bf16 (x) against the worst perplexity change over the
  evaluation workloads (y, %), one point per KV config, the Pareto front as a dotted line."""
  rows = [r for r in summary["rows"] if r["pareto"] is not None]
  series = [reports.Series(r["label"] + (" (Pareto front)" if r["pareto"] else ""),
                           [r["token_capacity_vs_bf16"]], [100 * r["worst_ppl_rel_change"]],
                           style=_style(r)) for r in rows]
  line = reports.pareto_line([(r["token_capacity_vs_bf16"], 100 * r["worst_ppl_rel_change"])
                              for r in rows if r["pareto"]])
  if line is not None:
    series.append(line)
  ev = summary["evaluation"]
  return reports.plot_series(
      path, series, title=f"Token capacity vs perplexity change: {ev['model']} on "
      f"{summary['headroom']['accelerator']} ({summary['headroom']['mode']})",
      xlabel=f"token capacity over {BASE_FORMAT} (x)",
      ylabel=f"perplexity change (%), worst of {', '.join(ev['workloads'])}",
      xscale="linear", baseline=reports.Baseline(
          f"{ev['reference']} reference cache: perplexity change 0 by definition", y=0.0))


def _check_outputs_apart(workdir: Path, config: SummaryConfig) -> None:
  for field in ("evaluate_dir", "headroom_dir"):
    same = workdir.resolve() == Path(getattr(config, field)).resolve()
    check(not same, "workdir", f"{workdir} is the {field}: the summary would replace that "
          "run's results.jsonl and report.md; give another workdir")


def run(config: SummaryConfig, workdir: str | os.PathLike, *, overwrite: bool = False
        ) -> SummaryResult:
  """Joins the two runs (see the module docstring) and writes the summary. The workdir
  rule (`kvtpu.models.runs.common.check_workdir`) and every input are checked before
  anything is written.

  Raises:
    ConfigError: naming the field (the flag) of the first problem: a refused workdir (or one
      that is an input's), an input that is not a valid results file, and `summarize`'s.
  """
  begin = time.perf_counter()
  _check_outputs_apart(Path(workdir), config)
  workdir = check_workdir(workdir, config, overwrite=overwrite)
  evaluate_rows = _read(config.evaluate_results, "evaluate_dir", eval_report.read_jsonl)
  headroom_rows = _read(config.headroom_results, "headroom_dir", headroom_report.read_jsonl)
  summary = summarize(evaluate_rows, headroom_rows, config)
  ev, hr = summary["evaluation"], summary["headroom"]
  workdir = start(workdir, config, evaluate_model=ev["model"], headroom_model=hr["model"],
                  eval_context_shown=ev["context"], num_rows=len(summary["rows"]))
  paths = {"results": workdir / RESULTS, "report": workdir / "report.md", "plot": workdir / PLOT}
  reports.write_jsonl(summary["rows"], paths["results"])
  figure = plot_capacity_vs_ppl(summary, paths["plot"])
  table = summary_table(summary)
  title = (f"KV-cache precision summary: {ev['model']} on {hr['accelerator']}"
           if _same_model(ev, hr) else
           f"KV-cache precision summary: {ev['model']} (accuracy) and {hr['model']} (memory) "
           f"on {hr['accelerator']}")
  report = "\n\n".join([
      f"# {title}",
      "\n".join(f"- {line}" for line in header_lines(summary)),
      "What context length, at what concurrency, does each cache precision support before "
      "the accelerator runs out of memory, and what does it cost in accuracy?",
      table,
      "\n".join(f"- {n}" for n in _notes(summary)),
      "## Capacity against accuracy",
      figure.markdown("token capacity vs perplexity change", (
          "Token capacity over bf16 against the worst perplexity change over the evaluation "
          "workloads (the largest in magnitude, signed, in %). Each point: one KV config; the dotted line joins the "
          "Pareto front (marked in the legend).")),
  ]) + "\n"
  reports.write_text(paths["report"], report)
  return SummaryResult(summary["rows"], table, report, time.perf_counter() - begin, paths)
