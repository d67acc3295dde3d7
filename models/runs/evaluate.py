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
"""

from __future__ import annotations

import dataclasses
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
  ConfigError,
  Eta,
  chat_responder,
  check,
  format_list,
  int_list,
  one_of,
  positive_int,
  save_artifact,
  start,
  str_list,
)

import kvtpu
from kvtpu import reports
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
        kv_formats=("int8", "fp8_e4m3", "int4", "fp8_e5m2"), calibrate_formats=("int4",),
        calibration_workloads=("prose", "code"), calibration_method="mse",
        calibration_tokens=2048, eval_workloads=("prose", "code"), contexts=(256, 2048),
        batches=(2,), prefill=128, chunk=128, passkey_lengths=(1024,), passkey_depths=(0.5,),
        passkey_samples=2, passkey_formats=("int8",)),
    "full": dict(
        kv_formats=("int8", "fp8_e4m3", "fp8_e5m2", "int4", "int4-g32", "int8-asym", "k8v4",
                    "int4-asym-g32"),
        calibrate_formats=("int8", "fp8_e4m3", "int4", "int8-channel", "k=int8-channel,v=int8"),
        calibration_workloads=("prose", "code", "chat"), calibration_method="mse",
        calibration_tokens=32768, eval_workloads=("prose", "code", "chat"),
        contexts=(512, 1024, 2048, 4096, 8192), batches=(1, 8), prefill=512, chunk=64,
        passkey_lengths=(1024, 2048, 4096, 8192), passkey_depths=(0.1, 0.3, 0.5, 0.7, 0.9),
        passkey_samples=8, passkey_formats=("int8", "fp8_e4m3", "int4", "fp8_e5m2")),
    "none": {},
}
_METHODS = ("absmax", "percentile", "mse", "learned")
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
      prompt lengths, relative depths in [0, 1], keys per (length, depth), and the dynamic
      formats to run it for.
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
    check(isinstance(self.model, str) and bool(self.model.strip()), "model",
          f"expected a model name or path, got {self.model!r}")
    setattr_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
    setattr_("kv_formats", format_list("kv_formats", self.kv_formats, allow_empty=True,
                                       dynamic_only=_STATIC_ADVICE))
    setattr_("calibrate_formats", format_list("calibrate_formats", self.calibrate_formats,
                                              allow_empty=True))
    setattr_("calibration_workloads", str_list("calibration_workloads",
                                               self.calibration_workloads, allow_empty=True))
    check(not self.calibrate_formats or bool(self.calibration_workloads),
          "calibration_workloads", "calibrate_formats needs at least one calibration workload")
    one_of("calibration_method", self.calibration_method, _METHODS)
    setattr_("calibration_tokens", positive_int("calibration_tokens", self.calibration_tokens))
    setattr_("artifacts", str_list("artifacts", self.artifacts, allow_empty=True))
    check(bool(self.kv_formats or self.calibrate_formats or self.artifacts), "kv_formats",
          "nothing to evaluate: give kv_formats, calibrate_formats or artifacts")
    setattr_("eval_workloads", str_list("eval_workloads", self.eval_workloads))
    setattr_("contexts", int_list("contexts", self.contexts, low=2))
    setattr_("batches", int_list("batches", self.batches))
    setattr_("prefill", positive_int("prefill", self.prefill))
    setattr_("chunk", positive_int("chunk", self.chunk))
    setattr_("reference", format_list("reference", [self.reference],
                                      dynamic_only="the reference must need no calibration")[0])
    setattr_("passkey_lengths", int_list("passkey_lengths", self.passkey_lengths,
                                         allow_empty=True))
    try:
      depths = tuple(float(d) for d in self.passkey_depths)
    except (TypeError, ValueError):
      raise ConfigError("passkey_depths", f"expected numbers, got {list(self.passkey_depths)}"
                        ) from None
    check(all(0 <= d <= 1 for d in depths), "passkey_depths",
          f"expected numbers in [0, 1], got {list(depths)}")
    check(bool(depths) or not self.passkey_lengths, "passkey_depths",
          "passkey_lengths needs at least one depth")
    setattr_("passkey_depths", depths)
    setattr_("passkey_samples", positive_int("passkey_samples", self.passkey_samples))
    setattr_("passkey_formats", format_list("passkey_formats", self.passkey_formats,
                                            allow_empty=True, dynamic_only=_STATIC_ADVICE))
    setattr_("seed", positive_int("seed", self.seed, low=0))
    one_of("impl", self.impl, kvtpu.attention.IMPLS)

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


# Accuracy targets for dynamic per-token-head scales (SmolLM2, prose and code, 2048 tokens):
# metric -> (bound, "max" | "min"); ppl_rel_change bounds |change|. Bounds are fractions,
# as the rows hold them; the targets table shows them in percent where the metric is one.
TARGETS = {
    "int8": {"ppl_rel_change": (1e-3, "max"), "kl_mean": (1e-3, "max"),
             "top1_agreement": (0.99, "min")},
    "fp8_e4m3": {"ppl_rel_change": (5e-3, "max")},
}


def targets_markdown(rows: list[dict], context: int = 2048) -> str:
  """Each target against the dynamic rows at `context`: measured value, met or missed."""
  body = []
  for fmt, targets in TARGETS.items():
    for r in rows:
      if (r["kind"], r["kv_format"], r["calibration"], r["context"]) != (
          "score", fmt, "dynamic", context):
        continue
      for metric, (bound, kind) in targets.items():
        value = r["metrics"][metric]
        ok = abs(value) <= bound if metric == "ppl_rel_change" else (
            value <= bound if kind == "max" else value >= bound)
        _, unit, factor, _ = report_lib.METRICS[metric]
        op = "abs <=" if metric == "ppl_rel_change" else ("<=" if kind == "max" else ">=")
        body.append([fmt, f"{r['eval_workload']['name']} x{r['batch']}",
                     f"{metric} ({unit})", f"{op} {bound * factor:g}",
                     f"{value * factor:.4g}", "yes" if ok else "**no**"])
  for r in rows:
    if r["kind"] == "passkey" and r["kv_format"] == "int8":
      m = r["metrics"]
      body.append(["int8", f"passkey @{r['context']} depth {r['depth']:g}",
                   "accuracy (%) = bf16", "equal",
                   f"{reports.percent(m['accuracy'], '{:.0f}')} vs "
                   f"{reports.percent(m['accuracy_ref'], '{:.0f}')}",
                   "yes" if m["accuracy"] == m["accuracy_ref"] else "**no**"])
  if not body:
    body.append(["-", "-", "-", "-", "no matching rows in this run", "-"])
  return (f"## Targets (dynamic per-token-head scales, context {context})\n\n"
          + reports.markdown_table(["format", "evaluated on", "metric (unit)", "target",
                                    "measured", "met"], body))


def run(config: EvaluateConfig, workdir: str | os.PathLike) -> EvaluateResult:
  """Runs the evaluation matrix of `config`, writing to `workdir` (see the module docstring).

  Returns:
    The rows, the report markdown and the paths of results.jsonl and report.md.
  """
  workdir = start(workdir, config)
  model, tokenizer = load_pretrained(config.model, param_dtype=jnp.float32)
  logging.info("model %s; weights: %s", model.cfg.name, model.weight_precision)
  respond = chat_responder(model, tokenizer)
  loaded: dict[str, workloads_lib.Workload] = {}

  def workload(spec):
    if spec not in loaded:
      loaded[spec] = workloads_lib.load(spec, tokenizer, seed=config.seed, respond=respond)
      logging.info("workload %s: %d tokens", loaded[spec].name, loaded[spec].num_tokens)
    return loaded[spec]

  configs = [CacheConfig(f) for f in config.kv_formats]
  for path in config.artifacts:
    art = CalibrationArtifact.load(path)
    configs.append(CacheConfig(art.fmt, art))
  for fmt in config.calibrate_formats:
    for spec in config.calibration_workloads:
      w = workload(spec)
      tokens = min(config.calibration_tokens, w.num_tokens)
      batch = max(1, min(4, tokens // 512))
      begin = time.perf_counter()
      art, _ = calibrate(model, [w], fmt, method=config.calibration_method, seq_len=512,
                         batch=batch, num_tokens=tokens, impl=config.impl)
      path = save_artifact(art, workdir / "calibration" / f"{fmt}@{w.name}".replace("/", "_"))
      logging.info("calibrated %s on %s (%s) in %.0f s: %s", fmt, w.name, art.method,
                   time.perf_counter() - begin, path)
      configs.append(CacheConfig(fmt, art))

  protocol = Protocol(prefill=config.prefill, chunk=config.chunk, impl=config.impl,
                      reference=config.reference)
  evals = [workload(s) for s in config.eval_workloads]
  # Token forwards per (workload, context, batch): the reference and every config.
  plan = [(w, c, b, (1 + len(configs)) * int(sum(ragged_lengths(c, b))))
          for w in evals for b in config.batches for c in config.contexts]
  eta = Eta(sum(p[-1] for p in plan))
  log = reports.RowLog(workdir / "results.jsonl", report_lib.check_row)
  # One cache size for all contexts: every context's chunks share one compiled step.
  max_len = max(config.contexts)
  for w, context, batch, forwards in plan:
    done = score_workload(model, w, configs, context=context, batch=batch, max_len=max_len,
                          protocol=protocol)
    log.extend(done)
    eta.add(forwards, f"{w.name} @{context} x{batch}: " + ", ".join(
        f"{r['kv_format']}|{r['calibration_name']} KL {r['metrics']['kl_mean']:.2e}"
        for r in done))
  if config.passkey_formats and config.passkey_lengths:
    log.extend(passkey_rows(
        model, tokenizer, [CacheConfig(f) for f in config.passkey_formats],
        lengths=config.passkey_lengths, depths=config.passkey_depths,
        num_samples=config.passkey_samples, seed=config.seed, reference=config.reference,
        impl=config.impl, progress=lambda msg: logging.info("%s", msg)))
  report = report_lib.write_report(
      log.rows, workdir, title=f"KV-cache precision evaluation: {model.cfg.name}",
      extra_sections=[targets_markdown(log.rows, max(config.contexts))])
  return EvaluateResult(log.rows, report, {"results": workdir / "results.jsonl",
                                           "report": workdir / "report.md"})
