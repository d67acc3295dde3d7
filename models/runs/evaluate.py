"""The evaluate run: accuracy of each KV-cache precision under deployment-shaped workloads.

For a model and its weights as loaded, and apart from them: how much does each cache
format change the model's output, on which workload, at which context length and
concurrency, with scales calibrated on which workload? Writes to the workdir:

  config.json                        the config, software and devices (first)
  calibration/<format>@<workload>/   the calibration artifacts made for this run
  results.jsonl                      one schema-checked row per result (`kvtpu.eval.report`),
                                     appended as each finishes
  report.md, *.png                   header (model, weight precision; KV precision;
                                     calibration and evaluation workloads with hashes),
                                     tables per metric, calibration-transfer tables,
                                     passkey table, targets, plots

The matrix: every `kv_formats` format with dynamic scales, plus every `calibrate_formats`
format calibrated on each `calibration_workloads` workload (`kvtpu.models.calibrate`,
`calibration_method`), plus the `artifacts` given, scored on every `eval_workloads`
workload at every `contexts` length and `batches` size (ragged:
`kvtpu.eval.protocol.ragged_lengths`) against the `reference` cache, by teacher forcing
through the cache (`prefill`, then `chunk`-token chunks; 1 is pure decode). Passkey
retrieval runs at `passkey_lengths` x `passkey_depths` for the `passkey_formats`.

`EvaluateConfig.from_preset(name, **fields)`: "quick" (SmolLM2 on 2 CPU cores in under
15 minutes, what `make run` runs), "full" (the whole matrix, for a TPU VM) or "none"
(every matrix field given).

The work is done item by item: each calibration (its artifact saved as it is made),
each (eval workload, context, batch) point with a row per cache config, each passkey
(length, depth) point; the rows of an item are appended to results.jsonl when it
finishes and progress is logged with an ETA. `run(..., resume=True)` continues an
interrupted run in its workdir, computing only the missing items (`run`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from absl import logging
from kvtpu.models.calibrate import calibrate
from kvtpu.models.evaluate import CacheConfig, passkey_rows, score_workload
from kvtpu.models.pretrained import load_pretrained
from kvtpu.models.runs.common import (
  FOUR_BIT_NU_SCHEME,
  FOUR_BIT_SCHEME,
  TWO_BIT_SCHEME,
  ConfigError,
  Progress,
  calibration_progress,
  chat_responder,
  check,
  check_head_dim,
  check_plan_layers,
  check_workdir,
  done_items,
  format_list,
  impl_choice,
  int_list,
  model_name,
  one_of,
  positive_int,
  save_artifact,
  start,
  str_list,
  workload_list,
)

import kvtpu
from kvtpu import reports
from kvtpu.calibration import layer_plan
from kvtpu.calibration.artifact import CalibrationArtifact
from kvtpu.eval import report as report_lib
from kvtpu.eval import workloads as workloads_lib
from kvtpu.eval.protocol import Protocol, ragged_lengths

__all__ = ["EvaluateConfig", "EvaluateResult", "MATRIX_FIELDS", "PRESETS", "TARGETS", "run",
           "targets_markdown"]

# The fields a preset sets (those not given explicitly).
MATRIX_FIELDS = ("kv_formats", "calibrate_formats", "calibration_workloads", "calibration_method",
                 "calibration_tokens", "eval_workloads", "contexts", "batches", "prefill",
                 "chunk", "passkey_lengths", "passkey_depths", "passkey_samples",
                 "passkey_formats")
PRESETS: dict[str, dict[str, Any]] = {
    "quick": dict(
        kv_formats=("int8", "fp8_e4m3", "int4", "fp8_e5m2", "int8-rot", FOUR_BIT_SCHEME,
                    FOUR_BIT_NU_SCHEME, TWO_BIT_SCHEME),
        calibrate_formats=(FOUR_BIT_SCHEME,),
        calibration_workloads=("prose", "code"), calibration_method="mse",
        calibration_tokens=2048, eval_workloads=("prose", "code"), contexts=(256, 2048),
        batches=(2,), prefill=128, chunk=128, passkey_lengths=(1024,), passkey_depths=(0.5,),
        passkey_samples=2, passkey_formats=("int8", FOUR_BIT_SCHEME, FOUR_BIT_NU_SCHEME,
                                            TWO_BIT_SCHEME)),
    "full": dict(
        kv_formats=("int8", "fp8_e4m3", "fp8_e5m2", "int4", "int4-g32", "int8-asym", "k8v4",
                    "int4-asym-g32", "int8-rot", "fp8_e4m3-rot", "int4-rot", "int4-asym-rot",
                    "int4+recent256", "int4-asym-rot+recent128", FOUR_BIT_SCHEME,
                    FOUR_BIT_NU_SCHEME, TWO_BIT_SCHEME),
        calibrate_formats=("int8", "fp8_e4m3", "int4", "int8-channel", "k=int8-channel,v=int8",
                           "fp8_e4m3-rot", FOUR_BIT_SCHEME),
        calibration_workloads=("prose", "code", "chat"), calibration_method="mse",
        calibration_tokens=32768, eval_workloads=("prose", "code", "chat"),
        contexts=(512, 1024, 2048, 4096, 8192), batches=(1, 8), prefill=512, chunk=64,
        passkey_lengths=(1024, 2048, 4096, 8192), passkey_depths=(0.1, 0.3, 0.5, 0.7, 0.9),
        passkey_samples=8, passkey_formats=("int8", "fp8_e4m3", "int4", "fp8_e5m2",
                                            FOUR_BIT_SCHEME, FOUR_BIT_NU_SCHEME, TWO_BIT_SCHEME)),
    "none": {},
}
_METHODS = ("absmax", "percentile", "mse", "learned")
# Tokens per calibration window (seq_len) of the calibrations a run makes.
CALIBRATION_WINDOW = 512
_STATIC_ADVICE = "list it in calibrate_formats (static scales need calibration)"


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
  """An evaluation run (each field is the evaluate binary's flag of the same name).

  Attributes:
    preset: the preset that filled the matrix fields not given ("quick", "full", "none").
    model: `load_pretrained` name or path.
    kv_formats: formats scored with dynamic scales.
    calibrate_formats: formats calibrated on each calibration workload (static scales, or
      the clip ratios of dynamic formats).
    calibration_workloads: workloads (names or files) to calibrate on.
    calibration_method: "absmax", "percentile", "mse" or "learned".
    calibration_tokens: calibration tokens per workload.
    artifacts: existing calibration artifacts (paths) to score too.
    eval_workloads: workloads to evaluate on.
    contexts: context lengths (tokens, >= 2).
    batches: batch sizes (concurrent ragged sequences).
    prefill, chunk: tokens of the first chunk and of each later one (1: pure decode).
    reference: the reference cache format.
    passkey_lengths, passkey_depths, passkey_samples, passkey_formats: passkey retrieval
      prompt lengths, relative depths in [0, 1], keys per (length, depth), and the
      formats to run it for (with dynamic scales, and with each calibration of the
      format made for `calibrate_formats`).
    seed: workload seed.
    impl: attention implementation.
  """

  preset: str = "none"
  model: str = "smollm2-135m"
  kv_formats: tuple[str, ...] = ()
  calibrate_formats: tuple[str, ...] = ()
  calibration_workloads: tuple[str, ...] = ()
  calibration_method: str = "mse"
  calibration_tokens: int = 2048
  artifacts: tuple[str, ...] = ()
  eval_workloads: tuple[str, ...] = ()
  contexts: tuple[int, ...] = ()
  batches: tuple[int, ...] = ()
  prefill: int = 128
  chunk: int = 128
  reference: str = "bf16"
  passkey_lengths: tuple[int, ...] = ()
  passkey_depths: tuple[float, ...] = ()
  passkey_samples: int = 2
  passkey_formats: tuple[str, ...] = ()
  seed: int = 0
  impl: str = "auto"

  def __post_init__(self):
    one_of("preset", self.preset, PRESETS)
    model_name("model", self.model)
    setattr_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
    setattr_("seed", positive_int("seed", self.seed, low=0))
    setattr_("kv_formats", format_list("kv_formats", self.kv_formats, allow_empty=True,
                                       dynamic_only=_STATIC_ADVICE, plans=True))
    setattr_("calibrate_formats", format_list("calibrate_formats", self.calibrate_formats,
                                              allow_empty=True))
    for name in self.calibrate_formats:
      fmt = kvtpu.KVFormat.parse(name)
      check(fmt.k.calibrated or fmt.v.calibrated, "calibrate_formats",
            f"{name} has nothing to calibrate (unquantized, non-uniform codes scaled by each "
            "token's RMS, or per-channel scales over groups of positions): list it in kv_formats")
    setattr_("calibration_workloads", workload_list(
        "calibration_workloads", self.calibration_workloads, allow_empty=True, seed=self.seed))
    check(not self.calibrate_formats or bool(self.calibration_workloads),
          "calibration_workloads", "calibrate_formats needs at least one calibration workload")
    one_of("calibration_method", self.calibration_method, _METHODS)
    setattr_("calibration_tokens", positive_int("calibration_tokens", self.calibration_tokens))
    check(not self.calibrate_formats or self.calibration_tokens >= CALIBRATION_WINDOW,
          "calibration_tokens", f"expected at least one calibration window of "
          f"{CALIBRATION_WINDOW} tokens, got {self.calibration_tokens}")
    setattr_("artifacts", str_list("artifacts", self.artifacts, allow_empty=True, distinct=True))
    for path in self.artifacts:
      check(Path(path).is_dir(), "artifacts", f"no calibration artifact at {path} (no such "
            "folder)")
    check(bool(self.kv_formats or self.calibrate_formats or self.artifacts), "kv_formats",
          "nothing to evaluate: give kv_formats, calibrate_formats or artifacts")
    setattr_("eval_workloads", workload_list("eval_workloads", self.eval_workloads,
                                             seed=self.seed))
    setattr_("contexts", int_list("contexts", self.contexts, low=2))
    setattr_("batches", int_list("batches", self.batches))
    setattr_("prefill", positive_int("prefill", self.prefill))
    setattr_("chunk", positive_int("chunk", self.chunk))
    setattr_("reference", format_list("reference", [self.reference],
                                      dynamic_only="the reference must need no calibration")[0])
    setattr_("passkey_lengths", int_list("passkey_lengths", self.passkey_lengths,
                                         allow_empty=True))
    depths = _sequence_of_numbers("passkey_depths", self.passkey_depths)
    check(all(0 <= d <= 1 for d in depths), "passkey_depths",
          f"expected numbers in [0, 1], got {list(depths)}")
    check(len(set(depths)) == len(depths), "passkey_depths",
          f"expected distinct depths, got {list(depths)}")
    check(bool(depths) or not self.passkey_lengths, "passkey_depths",
          "passkey_lengths needs at least one depth")
    setattr_("passkey_depths", depths)
    setattr_("passkey_samples", positive_int("passkey_samples", self.passkey_samples))
    setattr_("passkey_formats", format_list("passkey_formats", self.passkey_formats,
                                            allow_empty=True, dynamic_only=_STATIC_ADVICE,
                                            plans=True))
    setattr_("impl", impl_choice("impl", self.impl))

  @classmethod
  def from_preset(cls, preset: str = "quick", **fields: Any) -> EvaluateConfig:
    """The preset's matrix fields, overridden by `fields` (with preset "none" every matrix
    field must be given).

    Raises:
      ConfigError: for an unknown preset, a matrix field missing under "none", or an
        invalid field.
    """
    one_of("preset", preset, PRESETS)
    values = {**PRESETS[preset], **fields}
    for name in MATRIX_FIELDS:
      check(values.get(name) is not None, name, f"required with preset={preset}")
    return cls(preset=preset, **values)


@dataclasses.dataclass(frozen=True)
class EvaluateResult:
  """What an evaluation run made: the rows, the report text and the paths written."""

  rows: list[dict]
  report: str
  paths: dict[str, Path]


# Accuracy targets for per-token scales, dynamic or with calibrated clip ratios (SmolLM2,
# prose and code, 2048 tokens):
# metric -> (bound, "max" | "min"); ppl_rel_change bounds |change|. Bounds are fractions,
# as the rows hold them; the targets table shows them in percent where the metric is one.
TARGETS = {
    "int8": {"ppl_rel_change": (1e-3, "max"), "kl_mean": (1e-3, "max"),
             "top1_agreement": (0.99, "min")},
    "fp8_e4m3": {"ppl_rel_change": (5e-3, "max")},
    "int8-rot": {"top1_agreement": (0.99, "min")},
    "fp8_e4m3-rot": {"ppl_rel_change": (5e-3, "max")},
    FOUR_BIT_SCHEME: {"ppl_rel_change": (5e-3, "max"), "kl_mean": (5e-3, "max")},
    FOUR_BIT_NU_SCHEME: {"ppl_rel_change": (5e-3, "max"), "kl_mean": (5e-3, "max")},
    TWO_BIT_SCHEME: {"ppl_rel_change": (0.1, "max")},
}
# Passkey targets: retrieval equal to the bf16 cache's ("bf16"), or at least a fraction
# of the samples.
PASSKEY_TARGETS = {"int8": "bf16", FOUR_BIT_SCHEME: "bf16", FOUR_BIT_NU_SCHEME: "bf16",
                   TWO_BIT_SCHEME: 0.8}


def targets_markdown(rows: list[dict], context: int = 2048) -> str:
  """Each target against the rows at `context` with per-token scales (dynamic, or with
  clip ratios calibrated on a named workload): measured value, met or missed."""
  body = []
  for fmt, targets in TARGETS.items():
    for r in rows:
      if (r["kind"], r["kv_format"], r["context"]) != ("score", fmt, context):
        continue
      config = fmt if r["calibration"] == "dynamic" else f"{fmt}, clip on {r['calibration_name']}"
      for metric, (bound, kind) in targets.items():
        value = r["metrics"][metric]
        ok = abs(value) <= bound if metric == "ppl_rel_change" else (
            value <= bound if kind == "max" else value >= bound)
        _, unit, factor, _ = report_lib.METRICS[metric]
        op = "abs <=" if metric == "ppl_rel_change" else ("<=" if kind == "max" else ">=")
        body.append([config, f"{r['eval_workload']['name']} x{r['batch']}",
                     f"{metric} ({unit})", f"{op} {bound * factor:g}",
                     f"{value * factor:.4g}", "yes" if ok else "**no**"])
  for r in rows:
    target = PASSKEY_TARGETS.get(r["kv_format"])
    if r["kind"] != "passkey" or target is None:
      continue
    m = r["metrics"]
    config = (r["kv_format"] if r["calibration"] == "dynamic"
              else f"{r['kv_format']}, clip on {r['calibration_name']}")
    measured = (f"{reports.percent(m['accuracy'], '{:.0f}')} vs "
                f"{reports.percent(m['accuracy_ref'], '{:.0f}')}")
    if target == "bf16":
      body.append([config, f"passkey @{r['context']} depth {r['depth']:g}",
                   "accuracy (%) = bf16", "equal", measured,
                   "yes" if m["accuracy"] == m["accuracy_ref"] else "**no**"])
    else:
      body.append([config, f"passkey @{r['context']} depth {r['depth']:g}",
                   "accuracy (%) vs bf16", f">= {target * 100:g}", measured,
                   "yes" if m["accuracy"] >= target else "**no**"])
  if not body:
    body.append(["-", "-", "-", "-", "no matching rows in this run", "-"])
  return (f"## Targets (per-token scales, dynamic or with calibrated clip ratios, context "
          f"{context})\n\n"
          + reports.markdown_table(["format", "evaluated on", "metric (unit)", "target",
                                    "measured", "met"], body))


def _sequence_of_numbers(field: str, values: Any) -> tuple[float, ...]:
  try:
    out = tuple(float(v) for v in values)
  except (TypeError, ValueError):
    raise ConfigError(field, f"expected numbers, got {values!r}") from None
  check(all(math.isfinite(v) for v in out), field, f"expected finite numbers, got {list(out)}")
  return out


def _row_key(row: dict) -> tuple:
  """The item a result row belongs to: ("score", eval workload, context, batch) or
  ("passkey", length, depth)."""
  if row["kind"] == "score":
    return "score", row["eval_workload"]["name"], row["context"], row["batch"]
  return "passkey", row["context"], float(row["depth"])


def _load_workloads(config: EvaluateConfig, model, tokenizer) -> dict[str, Any]:
  """Every calibration and evaluation workload, by spec; a spec that fails to build is a
  ConfigError naming its field."""
  respond = chat_responder(model, tokenizer)
  loaded: dict[str, workloads_lib.Workload] = {}
  for field in ("calibration_workloads", "eval_workloads"):
    for spec in getattr(config, field):
      if spec not in loaded:
        try:
          loaded[spec] = workloads_lib.load(spec, tokenizer, seed=config.seed, respond=respond)
        except ValueError as e:
          raise ConfigError(field, f"{spec}: {e}") from None
        logging.info("workload %s: %d tokens", loaded[spec].name, loaded[spec].num_tokens)
  return loaded


def _check_data(config: EvaluateConfig, model, tokenizer, loaded: dict, given: list) -> None:
  """What needs the model or the workloads, checked before any calibration or scoring."""
  cfg = model.cfg
  where = f"of model {cfg.name}"
  for field in ("kv_formats", "calibrate_formats", "passkey_formats", "reference"):
    names = getattr(config, field)
    names = [names] if isinstance(names, str) else names
    check_head_dim(field, names, cfg.head_dim, where)
    check_plan_layers(field, names, cfg.num_layers, cfg.name)
  for c in given:
    try:
      c.calibration.check_compatible(num_layers=cfg.num_layers, kv_heads=cfg.num_kv_heads,
                                     head_dim=cfg.head_dim, model_name=cfg.name)
    except ValueError as e:
      raise ConfigError("artifacts", str(e)) from None
  for spec in config.calibration_workloads:
    w = loaded[spec]
    check(w.num_tokens >= CALIBRATION_WINDOW, "calibration_workloads",
          f"workload {w.name} has {w.num_tokens} tokens, fewer than one calibration window "
          f"of {CALIBRATION_WINDOW}")
  for spec in config.eval_workloads:
    w = loaded[spec]
    for context in config.contexts:
      for batch in config.batches:
        check(w.num_tokens >= context * batch, "eval_workloads",
              f"workload {w.name} has {w.num_tokens} tokens; context {context} x batch "
              f"{batch} needs {context * batch}: give a longer workload, or shorter contexts "
              "or batches")
  if config.passkey_formats:
    for length in config.passkey_lengths:
      try:
        workloads_lib.passkey(tokenizer, length=length, depth=0.0, seed=config.seed)
      except ValueError as e:
        raise ConfigError("passkey_lengths", str(e)) from None
  labels = [c.label for c in given] + [
      f"{kvtpu.KVFormat.parse(f).name} | {loaded[s].name}"
      for f in config.calibrate_formats for s in config.calibration_workloads]
  labels += [f"{f} | dynamic" for f in config.kv_formats]
  repeated = sorted({label for label in labels if labels.count(label) > 1})
  check(not repeated, "artifacts", f"several configs would be labelled {repeated} (format | "
        "calibration workloads): give each artifact once, and none that repeats a "
        "calibrate_formats x calibration_workloads pair")


def run(config: EvaluateConfig, workdir: str | os.PathLike, *, resume: bool = False,
        overwrite: bool = False) -> EvaluateResult:
  """Runs the evaluation matrix of `config`, writing to `workdir` (see the module docstring).

  Every check that does not need the model runs first (the config's own, the workdir rule
  of `kvtpu.models.runs.common`, loading `artifacts`); then the model and the workloads
  load, and what needs them is checked (workload lengths, passkey lengths, group sizes
  against the head dim, artifacts against the model) before anything is calibrated or
  scored.

  Result rows are appended to results.jsonl as each item finishes: an item is an
  (eval workload, context, batch) point with a row per cache config, or a passkey
  (length, depth) point. With `resume`, the items already in results.jsonl (and the
  calibration artifacts already saved) are kept and only the others are computed;
  the workdir's config.json must record the same config (`check_workdir`) and its rows
  the same model.

  Returns:
    The rows, the report markdown and the paths of results.jsonl and report.md.

  Raises:
    ConfigError: naming the field (the binary's flag) of any failed check.
  """
  workdir = check_workdir(workdir, config, resume=resume, overwrite=overwrite, resumable=True,
                          not_compared=("preset",))
  given = []
  for path in config.artifacts:
    try:
      if (Path(path) / layer_plan.ARTIFACT_FILE).exists():
        plan_art = layer_plan.LayerPlanArtifact.load(path)
        given.append(CacheConfig(plan_art.plan, plan_art))
        continue
      art = CalibrationArtifact.load(path)
    except (ValueError, OSError) as e:
      raise ConfigError("artifacts", f"{path}: {e}") from None
    given.append(CacheConfig(art.fmt, art))
  model, tokenizer = load_pretrained(config.model, param_dtype=jnp.float32)
  logging.info("model %s; weights: %s", model.cfg.name, model.weight_precision)
  loaded = _load_workloads(config, model, tokenizer)
  _check_data(config, model, tokenizer, loaded, given)
  log = reports.RowLog(workdir / "results.jsonl", report_lib.check_row, resume=resume)
  for row in log.rows:
    check((row["model"], row["weight_precision"]) == (model.cfg.name, model.weight_precision),
          "model", f"{log.path} holds rows of {row['model']} ({row['weight_precision']}), not "
          f"of {model.cfg.name} ({model.weight_precision}): start a new workdir")
  start(workdir, config)

  configs = [CacheConfig(f) for f in config.kv_formats] + given
  for fmt in config.calibrate_formats:
    for spec in config.calibration_workloads:
      configs.append(CacheConfig(fmt, _calibration(config, model, loaded[spec], fmt, workdir,
                                                   resume=resume)))
  labels = {(c.fmt.name, c.calibration_name) for c in configs}
  # Passkey: each passkey format with dynamic scales, and with each calibration it has.
  passkey_names = {kvtpu.LayerPlan.config(f).name for f in config.passkey_formats}
  passkey_configs = [CacheConfig(f) for f in config.passkey_formats] + [
      c for c in configs if c.calibration is not None and c.fmt.name in passkey_names]
  passkey_labels = {(c.fmt.name, c.calibration_name) for c in passkey_configs}
  done = done_items(log, _row_key, lambda key, rows: {
      (r["kv_format"], r["calibration_name"]) for r in rows} == (
          labels if key[0] == "score" else passkey_labels)) if resume else set()

  protocol = Protocol(prefill=config.prefill, chunk=config.chunk, impl=config.impl,
                      reference=config.reference)
  # Token forwards per (workload, context, batch): the reference and every config.
  plan = [(loaded[s], c, b, (1 + len(configs)) * int(sum(ragged_lengths(c, b))))
          for s in config.eval_workloads for b in config.batches for c in config.contexts]
  plan = [p for p in plan if ("score", p[0].name, p[1], p[2]) not in done]
  progress = Progress("evaluation", sum(p[-1] for p in plan), "token forwards")
  # One cache size for all contexts: every context's chunks share one compiled step.
  max_len = max(config.contexts)
  for i, (w, context, batch, forwards) in enumerate(plan):
    item = f"{w.name} @{context} x{batch} (item {i + 1} of {len(plan)})"

    def chunk_done(chunks, total, seconds, item=item, forwards=forwards, before=progress.done):
      progress.update(before + forwards * chunks / total, f"{item}: chunk {chunks}/{total}",
                      throttle=True)

    rows = score_workload(model, w, configs, context=context, batch=batch, max_len=max_len,
                          protocol=protocol, progress=chunk_done)
    log.extend(rows)
    progress.update(sum(p[-1] for p in plan[:i + 1]), f"{item}: " + ", ".join(
        f"{r['kv_format']}|{r['calibration_name']} KL {r['metrics']['kl_mean']:.2e}"
        for r in rows))
  if config.passkey_formats and config.passkey_lengths:
    points = [(n, d) for n in config.passkey_lengths for d in config.passkey_depths
              if ("passkey", n, d) not in done]
    passkey_progress = Progress("passkey", len(points), "points")
    for length, depth in points:
      log.extend(passkey_rows(
          model, tokenizer, passkey_configs, lengths=[length],
          depths=[depth], num_samples=config.passkey_samples, seed=config.seed,
          reference=config.reference, impl=config.impl,
          progress=lambda msg: passkey_progress.add(1, msg)))
  report = report_lib.write_report(
      log.rows, workdir, title=f"KV-cache precision evaluation: {model.cfg.name}",
      extra_sections=[targets_markdown(log.rows, max(config.contexts))])
  return EvaluateResult(log.rows, report, {"results": workdir / "results.jsonl",
                                           "report": workdir / "report.md"})


def _calibration(config: EvaluateConfig, model, w, fmt: str, workdir: Path, *,
                 resume: bool) -> CalibrationArtifact:
  """The artifact of `fmt` calibrated on `w`: made and saved under workdir/calibration/,
  or, resuming, loaded from there when an earlier run saved it."""
  path = workdir / "calibration" / f"{fmt}@{w.name}".replace("/", "_")
  if resume and path.exists():
    try:
      art = CalibrationArtifact.load(path)
    except (ValueError, OSError) as e:
      raise ValueError(f"cannot resume with the calibration artifact {path} ({e}): delete it "
                       "to calibrate again") from None
    logging.info("calibration %s on %s: reusing %s", fmt, w.name, path)
    return art
  tokens = min(config.calibration_tokens, w.num_tokens)
  batch = max(1, min(4, tokens // CALIBRATION_WINDOW))
  used = w.num_batches(CALIBRATION_WINDOW, batch=batch, num_tokens=tokens) * batch
  progress = calibration_progress(f"calibration {fmt} on", {w.name: used * CALIBRATION_WINDOW})
  begin = time.perf_counter()
  art, _ = calibrate(model, [w], fmt, method=config.calibration_method,
                     seq_len=CALIBRATION_WINDOW, batch=batch, num_tokens=tokens,
                     impl=config.impl, progress=progress)
  save_artifact(art, path)
  logging.info("calibrated %s on %s (%s) in %.0f s: %s", fmt, w.name, art.method,
               time.perf_counter() - begin, path)
  return art
