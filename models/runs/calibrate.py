"""The calibrate run: scales (static specs) or clip ratios (dynamic specs) of one KV format,
calibrated on named workloads, with the outlier report.

Writes to the workdir:

  config.json     the config, software and devices (first)
  artifact/       the calibration artifact (`KVCache.init(..., calibration=
                  CalibrationArtifact.load(path))`)
  stats.json      the statistics summary per kind, layer, head and channel
  results.jsonl   one row per tensor kind and layer (outlier indicators, clip fraction,
                  clip ratios)
  magnitudes.png  per-layer, per-channel absmax of K (pre/post RoPE) and V
  report.md       the disclosure, the outlier table, clip rates (in %) and clip ratios

With `plan_high` set, the run instead chooses formats per layer
(`kvtpu.calibration.layer_plan`): `kv_format` in every layer but the costliest ones,
which get `plan_high`, within `plan_bits` effective bits per value at `plan_context`
tokens. It writes config.json, artifact/ (a `LayerPlanArtifact`, which the evaluate
binary takes in `--artifacts`), results.jsonl (one row per layer: its cost and
format) and report.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from absl import logging
from kvtpu.models.calibrate import KINDS, calibrate, plan_layers
from kvtpu.models.pretrained import load_pretrained
from kvtpu.models.runs.common import (
  ConfigError,
  calibration_progress,
  chat_responder,
  check,
  check_head_dim,
  check_workdir,
  finite_number,
  impl_choice,
  model_name,
  one_of,
  positive_int,
  save_artifact,
  start,
  workload_list,
)

import kvtpu
from kvtpu import reports
from kvtpu.calibration import layer_plan
from kvtpu.calibration import stats as kv_stats
from kvtpu.calibration.artifact import CalibrationArtifact
from kvtpu.eval import workloads as workloads_lib

__all__ = ["CalibrateConfig", "CalibrateResult", "METHODS", "run", "outlier_markdown",
           "disclosure_markdown", "clip_markdown", "plot_magnitudes"]

METHODS = ("absmax", "percentile", "mse", "learned")


@dataclasses.dataclass(frozen=True)
class CalibrateConfig:
  """A calibration run (each field is the calibrate binary's flag of the same name).

  Attributes:
    model: `load_pretrained` name or path.
    workloads: workload names or .txt/.jsonl files (`kvtpu.eval.workloads.load`).
    kv_format: the cache format; static specs get scales, dynamic ones clip ratios.
    method: "absmax", "percentile", "mse" or "learned".
    percentile: the clip percentile of method "percentile", in (0, 100].
    num_tokens: calibration tokens per workload (whole batches).
    seq_len, batch: the calibration windows `[batch, seq_len]`.
    learn_steps: optimizer steps per layer of method "learned".
    seed: workload seed.
    impl: attention implementation of the forward passes.
    plan_high: the dearer format of a per-layer plan ("": calibrate `kv_format`);
      `kv_format` is then the cheaper one, and both take no calibration.
    plan_bits: the plan's budget, effective bits per value (with `plan_high`).
    plan_context: the context the budget's effective bits are counted at.
  """

  model: str = "smollm2-135m"
  workloads: tuple[str, ...] = ("prose", "code")
  kv_format: str = "int8-channel"
  method: str = "percentile"
  percentile: float = 99.99
  num_tokens: int = 16384
  seq_len: int = 512
  batch: int = 4
  learn_steps: int = 100
  seed: int = 0
  impl: str = "auto"
  plan_high: str = ""
  plan_bits: float = 0.0
  plan_context: int = 8192

  def __post_init__(self):
    model_name("model", self.model)
    object.__setattr__(self, "seed", positive_int("seed", self.seed, low=0))
    object.__setattr__(self, "workloads", workload_list("workloads", self.workloads,
                                                        seed=self.seed))
    try:
      fmt = kvtpu.KVFormat.parse(self.kv_format)
    except ValueError as e:
      raise ConfigError("kv_format", str(e)) from None
    if self.plan_high:
      try:
        high = kvtpu.KVFormat.parse(self.plan_high)
      except ValueError as e:
        raise ConfigError("plan_high", str(e)) from None
      for field, f in (("kv_format", fmt), ("plan_high", high)):
        check(not f.static, field, f"{f.name} has static scales: a layer plan's formats are "
              "dynamic or unquantized")
      check(high != fmt, "plan_high", f"plan_high is kv_format ({fmt.name}): nothing to choose")
      object.__setattr__(self, "plan_high", high.name)
      object.__setattr__(self, "plan_bits", finite_number("plan_bits", self.plan_bits, low=0,
                                                          low_open=True))
      object.__setattr__(self, "plan_context", positive_int("plan_context", self.plan_context))
    else:
      check(fmt.k.calibrated or fmt.v.calibrated, "kv_format",
            f"{fmt.name} has nothing to calibrate: K and V are unquantized, non-uniform codes "
            "scaled by each token's RMS, or scaled per channel over groups of positions (c<N>) "
            "(or give plan_high to choose formats per layer)")
    object.__setattr__(self, "kv_format", fmt.name)
    one_of("method", self.method, METHODS)
    object.__setattr__(self, "percentile", finite_number("percentile", self.percentile, low=0,
                                                         high=100, low_open=True))
    for name in ("num_tokens", "seq_len", "batch", "learn_steps"):
      object.__setattr__(self, name, positive_int(name, getattr(self, name)))
    check(self.num_tokens >= self.seq_len * self.batch, "num_tokens",
          f"expected at least one batch of batch x seq_len = {self.batch * self.seq_len} "
          f"tokens, got {self.num_tokens}")
    object.__setattr__(self, "impl", impl_choice("impl", self.impl))

  @property
  def method_options(self) -> dict[str, Any]:
    return {"percentile": float(self.percentile)} if self.method == "percentile" else {}


@dataclasses.dataclass(frozen=True)
class CalibrateResult:
  """What a calibration run made: the artifact (a `LayerPlanArtifact` for a plan), the
  report text and the paths written."""

  artifact: Any
  report: str
  paths: dict[str, Path]


def outlier_markdown(art: CalibrationArtifact) -> str:
  """Per layer: largest channel/median ratio per head and the top channels, per kind."""
  table = art.summary
  kinds = [k for k in KINDS if k in table]
  layers = len(np.asarray(table[kinds[0]]["outlier_ratio"]))
  body = []
  for layer in range(layers):
    cells = [str(layer)]
    for kind in kinds:
      ratio = np.asarray(table[kind]["outlier_ratio"])[layer]
      top = np.asarray(table[kind]["top_channels"])[layer]
      head = int(np.argmax(ratio))
      cells.append(f"{ratio.max():.1f} (h{head}), ch {', '.join(map(str, top[head][:3]))}")
    body.append(cells)
  return reports.markdown_table(
      ["layer"] + [f"{k}: max/median (head), top channels" for k in kinds], body)


def disclosure_markdown(art: CalibrationArtifact) -> str:
  """The artifact's disclosure: model and weight precision, KV precision, method, workloads."""
  d = art.disclosure()
  lines = [f"- Model: `{d['model']['name']}`; weight precision: {d['model']['weight_precision']}",
           f"- KV precision: `{d['kv_format']}` (K: {art.fmt.k.name}, V: {art.fmt.v.name}); "
           f"method: {d['method']} {json.dumps(d['method_options'])}",
           f"- kvtpu {d['kvtpu_version']}, {d['created']}"]
  for w in d["workloads"]:
    lines.append(f"- Workload `{w['name']}`: {w['tokens_used']} of {w['num_tokens']} tokens "
                 f"(windows {w['batch']} x {w['seq_len']}), tokens sha256 "
                 f"`{w['token_sha256'][:16]}`, source sha256 `{w['source_sha256'][:16]}`; "
                 f"{w['description']}")
  return "\n".join(lines)


def clip_rate_markdown(art: CalibrationArtifact) -> str:
  """Per stored tensor, the fraction of calibration values its scales clip, in percent."""
  lines = ["## Clip rate of the calibrated scales on the calibration data",
           "Values clipped, in % of the calibration values of each layer: mean and largest "
           "over layers."]
  for which, frac in art.clip_fraction.items():
    frac = np.asarray(frac)
    lines.append(f"- {which.upper()}: mean {reports.percent(np.mean(frac), '{:.3g}')} %, max "
                 f"{reports.percent(np.max(frac), '{:.3g}')} % (layer {int(np.argmax(frac))})")
  return "\n\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:])


def clip_markdown(art: CalibrationArtifact) -> str:
  """Per layer, the calibrated clip ratios of the dynamic specs (one per kv head): the
  fraction of each token's range a scale covers."""
  clips = {w: d["clip"] for w, d in art.scales.items() if "clip" in d}
  body = [[str(layer)] + [", ".join(f"{c:.3f}" for c in clip[layer]) for clip in clips.values()]
          for layer in range(art.model["num_layers"])]
  return ("## Clip ratios of the dynamic specs (per kv head)\n\nEach scale covers this fraction "
          "of its token's range (1: no clipping).\n\n"
          + reports.markdown_table(["layer"] + [f"{w.upper()} clip ratio" for w in clips], body))


def plot_magnitudes(summaries: dict, path: str | os.PathLike) -> reports.Figure:
  """Heat maps of per-channel absmax (kv heads' channels side by side, layers down), from
  `kv_stats.summary` per kind, on a log colour scale."""
  kinds = [k for k in KINDS if k in summaries]
  panels, head_dim = [], None
  for kind in kinds:
    absmax = np.asarray(summaries[kind]["absmax"])  # [L, K, H]
    head_dim = absmax.shape[-1]
    panels.append((f"{kind}: |x| max per channel", absmax.reshape(absmax.shape[0], -1)))
  return reports.plot_heatmaps(path, panels, title="Per-channel magnitudes of K and V",
                               xlabel="kv head (its channels left to right)", ylabel="layer",
                               colorbar_label="|x| max", column_groups=head_dim,
                               group_label="head ")


def _result_rows(model, art: CalibrationArtifact) -> list[dict]:
  rows = []
  for kind in KINDS:
    table = art.summary[kind]
    for layer in range(model.cfg.num_layers):
      row = {"kind": kind, "layer": layer, "model": model.cfg.name,
             "weight_precision": model.weight_precision, "kv_format": art.fmt.name,
             "method": art.method, "calibration": art.workload_names(),
             "outlier_ratio": np.asarray(table["outlier_ratio"])[layer].tolist(),
             "top_channels": np.asarray(table["top_channels"])[layer].tolist(),
             "head_absmax": np.asarray(table["head_absmax"])[layer].tolist()}
      if kind in art.clip_fraction:  # The stored tensors: "k" (after RoPE) and "v".
        row["calibration_clip_fraction"] = float(art.clip_fraction[kind][layer])
      if "clip" in art.scales.get(kind, {}):
        row["clip_ratio"] = np.asarray(art.scales[kind]["clip"][layer]).tolist()
      rows.append(row)
  return rows


def run(config: CalibrateConfig, workdir: str | os.PathLike, *,
        overwrite: bool = False) -> CalibrateResult:
  """Calibrates `config.kv_format` of `config.model` on `config.workloads`; writes the
  artifact, statistics, rows, plot and report to `workdir` (see the module docstring).

  The workdir rule (`kvtpu.models.runs.common.check_workdir`; `overwrite` replaces an
  earlier run's outputs) is checked first; what needs the model or the workloads (the
  format's groups against the head dim, a workload shorter than one batch) is checked
  after they load, before calibrating.

  Raises:
    ConfigError: naming the field (the binary's flag) of a failed check.
  """
  workdir = check_workdir(workdir, config, overwrite=overwrite)
  model, tokenizer = load_pretrained(config.model, param_dtype=jnp.float32)
  logging.info("model %s; weights: %s", model.cfg.name, model.weight_precision)
  for field in ("kv_format", "plan_high"):
    if getattr(config, field):
      check_head_dim(field, [getattr(config, field)], model.cfg.head_dim,
                     f"of model {model.cfg.name}")
  if config.plan_high:
    try:
      layer_plan.check_budget(config.kv_format, config.plan_high, target_bits=config.plan_bits,
                              context=config.plan_context, num_layers=model.cfg.num_layers,
                              kv_heads=model.cfg.num_kv_heads, head_dim=model.cfg.head_dim)
    except ValueError as e:
      raise ConfigError("plan_high" if "more bits" in str(e) else "plan_bits", str(e)) from None
  respond = chat_responder(model, tokenizer)
  loaded = []
  for spec in config.workloads:
    try:
      loaded.append(workloads_lib.load(spec, tokenizer, seed=config.seed, respond=respond))
    except ValueError as e:
      raise ConfigError("workloads", f"{spec}: {e}") from None
    logging.info("workload %s: %d tokens (%s)", loaded[-1].name, loaded[-1].num_tokens,
                 loaded[-1].description)
  window = config.seq_len * config.batch
  for w in loaded:
    check(w.num_tokens >= window, "workloads",
          f"workload {w.name} has {w.num_tokens} tokens, fewer than one batch of "
          f"{config.batch} x {config.seq_len}")
  workdir = start(workdir, config)
  if config.plan_high:
    return _plan(config, model, loaded, workdir)
  per_workload = min([config.num_tokens] + [w.num_tokens for w in loaded])
  progress = calibration_progress("calibration", {
      w.name: w.num_batches(config.seq_len, batch=config.batch, num_tokens=per_workload) * window
      for w in loaded})
  art, stats = calibrate(model, loaded, config.kv_format, method=config.method,
                         seq_len=config.seq_len, batch=config.batch, num_tokens=per_workload,
                         method_options=config.method_options, learn_steps=config.learn_steps,
                         impl=config.impl, progress=progress)
  paths = {name: workdir / name for name in ("artifact", "stats.json", "results.jsonl",
                                             "magnitudes.png", "report.md")}
  save_artifact(art, paths["artifact"])
  summaries = {kind: kv_stats.summary(st) for kind, st in stats.items()}
  reports.write_text(paths["stats.json"], json.dumps(
      {kind: {k: np.asarray(v).tolist() for k, v in s.items()} for kind, s in summaries.items()}))
  reports.write_jsonl(_result_rows(model, art), paths["results.jsonl"])
  figure = plot_magnitudes(summaries, paths["magnitudes.png"])
  tokens = sum(w["tokens_used"] for w in art.workloads)
  report = "\n\n".join([
      f"# KV calibration: {model.cfg.name}, {art.fmt.name}, {art.method}",
      disclosure_markdown(art),
      "## Outliers per layer\n\nLargest channel absmax over the head's median channel "
      "absmax (the head where it is largest), and that head's top channels by absmax.",
      outlier_markdown(art),
      clip_rate_markdown(art),
      *([clip_markdown(art)] if any("clip" in d for d in art.scales.values()) else []),
      "## Magnitudes",
      figure.markdown("per-channel magnitudes",
                      f"Largest |x| of each channel (kv heads side by side) per layer, over all "
                      f"{tokens:,} calibration tokens (no averaging), log colour scale."),
  ]) + "\n"
  reports.write_text(paths["report.md"], report)
  return CalibrateResult(art, report, paths)


def _plan(config: CalibrateConfig, model, loaded, workdir: Path) -> CalibrateResult:
  """The per-layer plan of a run with `plan_high` (module docstring)."""
  art = plan_layers(model, loaded, config.kv_format, config.plan_high,
                    target_bits=config.plan_bits, context=config.plan_context,
                    seq_len=config.seq_len, batch=config.batch, impl=config.impl)
  paths = {name: workdir / name for name in ("artifact", "results.jsonl", "report.md")}
  art.save(paths["artifact"])
  formats = art.plan.formats(model.cfg.num_layers)
  rank = {int(i): r for r, i in enumerate(np.argsort(-art.costs, kind="stable"))}
  rows = [{"kind": "layer_plan", "model": model.cfg.name,
           "weight_precision": model.weight_precision, "layer": layer,
           "cost": float(art.costs[layer]), "rank": rank[layer], "kv_format": formats[layer].name,
           "plan": art.plan.name, "workloads": [w["name"] for w in art.workloads]}
          for layer in range(model.cfg.num_layers)]
  reports.write_jsonl(rows, paths["results.jsonl"])
  report = "\n\n".join([
      f"# KV precision per layer: {model.cfg.name}",
      f"Plan `{art.plan.name}`: {art.effective_bits:.4f} effective bits per value at "
      f"{art.context:,} tokens, within the budget of {art.target_bits:g} (cheaper format "
      f"`{art.low.name}`, dearer `{art.high.name}`; KV precision only, weights: "
      f"{model.weight_precision}).",
      "Cost of a layer: the relative squared error of its attention output with the cheaper "
      "cache minus that with the dearer one, against exact float32 attention, on the first "
      f"[{config.batch}, {config.seq_len}] window batch of each workload, chunks of "
      f"{art.method['chunk']}; the layers of highest cost get the dearer format. Workloads: "
      + "; ".join(f"`{w['name']}` ({w['tokens_used']:,} tokens used of {w['num_tokens']:,}, "
                  f"token_sha256 `{w['token_sha256'][:16]}`)" for w in art.workloads) + ".",
      reports.markdown_table(["layer", "cost", "rank", "format"],
                             [[r["layer"], f"{r['cost']:.4g}", r["rank"], f"`{r['kv_format']}`"]
                              for r in rows]),
  ]) + "\n"
  reports.write_text(paths["report.md"], report)
  return CalibrateResult(art, report, paths)
