"""Accuracy of each KV-cache precision under deployment-shaped workloads.

For a model and its weights as loaded, and apart from them: how much does each cache
format change the model's output, on which workload, at which context length and
concurrency, with scales calibrated on which workload? Writes to `--workdir`:

  calibration/<format>@<workload>/   the calibration artifacts made for this run
  results.jsonl                      one schema-checked row per result
                                     (`kvtpu.eval.report`)
  report.md, *.png                   header (model, weight precision; KV precision;
                                     calibration and evaluation workloads with hashes),
                                     tables per metric, calibration-transfer tables,
                                     passkey table, plots
  config.json                        the flags and versions

The matrix: every `--kv_formats` format with dynamic scales, plus every
`--calibrate_formats` format calibrated on each `--calibration_workloads` workload
(`kvtpu.models.calibrate.calibrate`, `--calibration_method`), scored on every
`--eval_workloads` workload at every `--contexts` length and `--batches` size
(ragged: `kvtpu.eval.protocol.ragged_lengths`) against the `--reference` cache, by
teacher forcing through the cache (`--prefill`, then `--chunk`-token chunks; 1 is
pure decode). Passkey retrieval runs at `--passkey_lengths` x `--passkey_depths`
for the `--passkey_formats`.

Presets set every flag not given on the command line:
  quick  SmolLM2 on 2 CPU cores in under 15 minutes (what `make run` runs)
  full   the whole matrix, for a TPU VM

  python -m kvtpu.experiments.evaluate --preset=quick --workdir=workdir/evaluate
"""

from __future__ import annotations

import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from kvtpu.experiments.common import chat_responder, format_names
from kvtpu.models.calibrate import calibrate
from kvtpu.models.evaluate import CacheConfig, passkey_rows, score_workload
from kvtpu.models.pretrained import load_pretrained

import kvtpu
from kvtpu.calibration.artifact import CalibrationArtifact
from kvtpu.eval import report as report_lib
from kvtpu.eval import workloads as workloads_lib
from kvtpu.eval.protocol import Protocol, ragged_lengths

PRESETS = {
    "quick": dict(
        kv_formats=["int8", "fp8_e4m3", "int4", "fp8_e5m2"], calibrate_formats=["int4"],
        calibration_workloads=["prose", "code"], calibration_method="mse",
        calibration_tokens=2048, eval_workloads=["prose", "code"], contexts=[256, 2048],
        batches=[2], prefill=128, chunk=128, passkey_lengths=[1024], passkey_depths=[0.5],
        passkey_samples=2, passkey_formats=["int8"]),
    "full": dict(
        kv_formats=["int8", "fp8_e4m3", "fp8_e5m2", "int4", "int4-g32", "int8-asym", "k8v4",
                    "int4-asym-g32"],
        calibrate_formats=["int8", "fp8_e4m3", "int4", "int8-channel", "k=int8-channel,v=int8"],
        calibration_workloads=["prose", "code", "chat"], calibration_method="mse",
        calibration_tokens=32768, eval_workloads=["prose", "code", "chat"],
        contexts=[512, 1024, 2048, 4096, 8192], batches=[1, 8], prefill=512, chunk=64,
        passkey_lengths=[1024, 2048, 4096, 8192], passkey_depths=[0.1, 0.3, 0.5, 0.7, 0.9],
        passkey_samples=8, passkey_formats=["int8", "fp8_e4m3", "int4", "fp8_e5m2"]),
}

# The accuracy targets for dynamic per-token-head scales (SmolLM2, prose and
# code, 2048 tokens): metric -> (bound, "max" | "min"); ppl_rel_change bounds |change|.
TARGETS = {
    "int8": {"ppl_rel_change": (1e-3, "max"), "kl_mean": (1e-3, "max"),
             "top1_agreement": (0.99, "min")},
    "fp8_e4m3": {"ppl_rel_change": (5e-3, "max")},
}


def targets_markdown(rows: list[dict], context: int = 2048) -> str:
  """Each target against the dynamic rows at `context`: measured value, met or missed."""
  lines = [f"## Targets (dynamic per-token-head scales, context {context})", "",
           "| format | evaluated on | metric | target | measured | met |", "|---|---|---|---|---|---|"]
  for fmt, targets in TARGETS.items():
    for r in rows:
      if (r["kind"], r["kv_format"], r["calibration"], r["context"]) != (
          "score", fmt, "dynamic", context):
        continue
      for metric, (bound, kind) in targets.items():
        value = r["metrics"][metric]
        ok = abs(value) <= bound if metric == "ppl_rel_change" else (
            value <= bound if kind == "max" else value >= bound)
        target = (f"abs <= {bound:g}" if metric == "ppl_rel_change" else
                  f"{'<=' if kind == 'max' else '>='} {bound:g}")
        lines.append(f"| {fmt} | {r['eval_workload']['name']} x{r['batch']} | {metric} | "
                     f"{target} | {value:.4g} | {'yes' if ok else '**no**'} |")
  passkey = [r for r in rows if r["kind"] == "passkey" and r["kv_format"] == "int8"]
  for r in passkey:
    m = r["metrics"]
    lines.append(f"| int8 | passkey @{r['context']} depth {r['depth']:g} | accuracy = bf16 | "
                 f"equal | {m['accuracy']:.2f} vs {m['accuracy_ref']:.2f} | "
                 f"{'yes' if m['accuracy'] == m['accuracy_ref'] else '**no**'} |")
  if len(lines) == 4:
    lines.append("| - | - | - | - | no matching rows in this run | - |")
  return "\n".join(lines)


_PRESET = flags.DEFINE_enum("preset", "quick", ["quick", "full", "none"],
                            "Defaults for every flag not given explicitly.")
_MODEL = flags.DEFINE_string("model", "smollm2-135m", "load_pretrained name or path.")
_KV_FORMATS = flags.DEFINE_list("kv_formats", None, "Formats scored with dynamic scales.")
_CALIBRATE_FORMATS = flags.DEFINE_list(
    "calibrate_formats", None, "Formats calibrated on each calibration workload (static scales "
    "or the clip ratios of dynamic formats).")
_CALIBRATION_WORKLOADS = flags.DEFINE_list("calibration_workloads", None,
                                           "Workloads (names or files) to calibrate on.")
_CALIBRATION_METHOD = flags.DEFINE_enum("calibration_method", None,
                                        ["absmax", "percentile", "mse", "learned"],
                                        "Scale / clip method.")
_CALIBRATION_TOKENS = flags.DEFINE_integer("calibration_tokens", None,
                                           "Calibration tokens per workload.")
_ARTIFACTS = flags.DEFINE_list("artifacts", [], "Existing calibration artifacts to score too.")
_EVAL_WORKLOADS = flags.DEFINE_list("eval_workloads", None, "Workloads to evaluate on.")
_CONTEXTS = flags.DEFINE_list("contexts", None, "Context lengths (tokens).")
_BATCHES = flags.DEFINE_list("batches", None, "Batch sizes (concurrent ragged sequences).")
_PREFILL = flags.DEFINE_integer("prefill", None, "Tokens of the first chunk.")
_CHUNK = flags.DEFINE_integer("chunk", None, "Tokens per later chunk (1: pure decode).")
_REFERENCE = flags.DEFINE_string("reference", "bf16", "Reference cache format.")
_PASSKEY_LENGTHS = flags.DEFINE_list("passkey_lengths", None, "Passkey prompt lengths.")
_PASSKEY_DEPTHS = flags.DEFINE_list("passkey_depths", None, "Passkey relative depths.")
_PASSKEY_SAMPLES = flags.DEFINE_integer("passkey_samples", None, "Keys per length and depth.")
_PASSKEY_FORMATS = flags.DEFINE_list("passkey_formats", None,
                                     "Dynamic formats to run passkey retrieval for.")
_SEED = flags.DEFINE_integer("seed", 0, "Workload seed.")
_IMPL = flags.DEFINE_enum("impl", "auto", list(kvtpu.attention.IMPLS), "attend implementation.")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/evaluate", "Output directory.")

_AXES = ("kv_formats", "calibrate_formats", "calibration_workloads", "calibration_method",
         "calibration_tokens", "eval_workloads", "contexts", "batches", "prefill", "chunk",
         "passkey_lengths", "passkey_depths", "passkey_samples", "passkey_formats")


def settings() -> dict:
  """The run's axes: explicit flags, else the preset's values (validated)."""
  preset = PRESETS.get(_PRESET.value, {})
  out = {}
  for name in _AXES:
    flag = flags.FLAGS[name]
    value = flag.value if flag.present or name not in preset else preset[name]
    if value is None:
      raise app.UsageError(f"--{name} is required with --preset=none")
    out[name] = value

  def ints(name, low=1):
    try:
      vals = [int(v) for v in out[name]]
    except ValueError:
      raise app.UsageError(f"--{name} must be integers, got {out[name]}") from None
    if any(v < low for v in vals):
      raise app.UsageError(f"--{name} must be >= {low}, got {vals}")
    return vals

  out["contexts"], out["batches"] = ints("contexts", 2), ints("batches")
  out["passkey_lengths"] = ints("passkey_lengths")
  try:
    out["passkey_depths"] = [float(v) for v in out["passkey_depths"]]
  except ValueError:
    raise app.UsageError(f"--passkey_depths must be numbers, got {out['passkey_depths']}") from None
  if any(not 0 <= d <= 1 for d in out["passkey_depths"]):
    raise app.UsageError(f"--passkey_depths must be in [0, 1], got {out['passkey_depths']}")
  for name in ("kv_formats", "calibrate_formats", "passkey_formats"):
    out[name] = format_names(out[name])
    for f in out[name]:
      try:
        kvtpu.KVFormat.parse(f)
      except ValueError as e:
        raise app.UsageError(f"--{name}: {e}") from None
  for name in ("kv_formats", "passkey_formats"):
    for f in out[name]:
      if kvtpu.KVFormat.parse(f).static:
        raise app.UsageError(f"--{name}={f} has static scales: list it in --calibrate_formats")
  if out["calibrate_formats"] and not out["calibration_workloads"]:
    raise app.UsageError("--calibrate_formats needs --calibration_workloads")
  return out


class Eta:
  """Logs progress over a known number of work units (token forwards) with an ETA."""

  def __init__(self, total: float):
    self.total, self.done, self.start = total, 0.0, time.perf_counter()

  def add(self, units: float, what: str) -> None:
    self.done += units
    elapsed = time.perf_counter() - self.start
    eta = elapsed / max(self.done, 1e-9) * (self.total - self.done)
    logging.info("[%5.1f%%] %s; elapsed %.0f s, ETA %.0f s", 100 * self.done / self.total, what,
                 elapsed, max(eta, 0.0))


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  cfg = settings()
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  logging.info("jax %s, devices: %s", jax.__version__, jax.devices())
  model, tokenizer = load_pretrained(_MODEL.value, param_dtype=jnp.float32)
  logging.info("model %s; weights: %s", model.cfg.name, model.weight_precision)
  respond = chat_responder(model, tokenizer)
  cache: dict = {}

  def workload(spec):
    if spec not in cache:
      cache[spec] = workloads_lib.load(spec, tokenizer, seed=_SEED.value, respond=respond)
      logging.info("workload %s: %d tokens", cache[spec].name, cache[spec].num_tokens)
    return cache[spec]

  configs = [CacheConfig(f) for f in cfg["kv_formats"]]
  for path in _ARTIFACTS.value:
    art = CalibrationArtifact.load(path)
    configs.append(CacheConfig(art.fmt, art))
  for fmt in cfg["calibrate_formats"]:
    for spec in cfg["calibration_workloads"]:
      w = workload(spec)
      tokens = min(cfg["calibration_tokens"], w.num_tokens)
      batch = max(1, min(4, tokens // 512))
      start = time.perf_counter()
      art, _ = calibrate(model, [w], fmt, method=cfg["calibration_method"], seq_len=512,
                         batch=batch, num_tokens=tokens, impl=_IMPL.value)
      path = os.path.join(workdir, "calibration",
                          f"{kvtpu.KVFormat.parse(fmt).name}@{w.name}".replace("/", "_"))
      if os.path.exists(path):  # A rerun in the same workdir recalibrates.
        shutil.rmtree(path)
      art.save(path)
      logging.info("calibrated %s on %s (%s) in %.0f s: %s", fmt, w.name, art.method,
                   time.perf_counter() - start, path)
      configs.append(CacheConfig(fmt, art))

  protocol = Protocol(prefill=cfg["prefill"], chunk=cfg["chunk"], impl=_IMPL.value,
                      reference=_REFERENCE.value)
  evals = [workload(s) for s in cfg["eval_workloads"]]
  # Token forwards per (workload, context, batch): the reference and every config.
  plan = [(w, c, b, (1 + len(configs)) * int(sum(ragged_lengths(c, b))))
          for w in evals for b in cfg["batches"] for c in cfg["contexts"]]
  eta = Eta(sum(p[-1] for p in plan))
  # One cache size for all contexts: every context's chunks share one compiled step.
  max_len = max(cfg["contexts"])
  rows = []
  for w, context, batch, forwards in plan:
    rows += score_workload(model, w, configs, context=context, batch=batch, max_len=max_len,
                           protocol=protocol)
    eta.add(forwards,
            f"{w.name} @{context} x{batch}: " + ", ".join(
                f"{r['kv_format']}|{r['calibration_name']} KL {r['metrics']['kl_mean']:.2e}"
                for r in rows[-len(configs):]))
  if cfg["passkey_formats"] and cfg["passkey_lengths"]:
    rows += passkey_rows(model, tokenizer, [CacheConfig(f) for f in cfg["passkey_formats"]],
                         lengths=cfg["passkey_lengths"],
                         depths=cfg["passkey_depths"], num_samples=cfg["passkey_samples"],
                         seed=_SEED.value, reference=_REFERENCE.value, impl=_IMPL.value,
                         progress=lambda msg: logging.info("%s", msg))
  config = {"preset": _PRESET.value, "model": _MODEL.value, "reference": _REFERENCE.value,
            "artifacts": _ARTIFACTS.value, "seed": _SEED.value, "impl": _IMPL.value, **cfg,
            "jax_version": jax.__version__, "kvtpu_version": kvtpu.__version__,
            "devices": [str(d) for d in jax.devices()]}
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  report = report_lib.write_report(
      rows, workdir, title=f"KV-cache precision evaluation: {model.cfg.name}",
      extra_sections=[targets_markdown(rows, max(cfg["contexts"]))])
  print(report)
  print(f"Report: {os.path.join(workdir, 'report.md')}; results: "
        f"{os.path.join(workdir, 'results.jsonl')}")


if __name__ == "__main__":
  app.run(main)
