"""Calibrates KV-cache scales of a model on named workloads, and reports outliers.

Loads the model (`kvtpu.models.load_pretrained`), builds each workload
(`kvtpu.eval.workloads.load`: prose, code, chat, passkey:..., repeat, random, or a
.txt/.jsonl file of your own traffic), streams `[batch, seq_len]` windows through the
model collecting per-layer / kv-head / channel statistics of keys (before and after
RoPE) and values, computes the format's static scales (tensor/head/channel specs) or
clip ratios (dynamic per-token specs: int8, int4-g32, fp8_e4m3, ...) with `--method`,
and writes to `--workdir`:

  artifact/     the calibration artifact (scales + disclosure; `KVCache.init(...,
                calibration=CalibrationArtifact.load(path))`)
  stats.json    the statistics summary per kind, layer, head and channel
  report.md     the disclosure and the per-layer outlier table
  magnitudes.png  per-layer, per-channel absmax of K (pre/post RoPE) and V
  config.json, results.jsonl (one row per layer and kind)

  python -m kvtpu.experiments.calibrate --model=smollm2-135m --workloads=prose,code \\
      --kv_format=int8-channel --method=percentile --num_tokens=16384
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from kvtpu.experiments.common import chat_responder
from kvtpu.models.calibrate import KINDS, calibrate
from kvtpu.models.pretrained import load_pretrained

import kvtpu
from kvtpu.calibration import stats as kv_stats
from kvtpu.eval import workloads as workloads_lib

_MODEL = flags.DEFINE_string("model", "smollm2-135m", "load_pretrained name or path.")
_WORKLOADS = flags.DEFINE_list("workloads", ["prose", "code"],
                               "Workload names or .txt/.jsonl files, comma-separated.")
_KV_FORMAT = flags.DEFINE_string("kv_format", "int8-channel",
                                 "Cache format: static specs (int8-channel, int8-head, ...) get "
                                 "scales, dynamic ones (int8, int4-g32, ...) clip ratios.")
_METHOD = flags.DEFINE_enum("method", "percentile", ["absmax", "percentile", "mse", "learned"],
                            "Scale method.")
_PERCENTILE = flags.DEFINE_float("percentile", 99.99, "Clip percentile (method=percentile).")
_NUM_TOKENS = flags.DEFINE_integer("num_tokens", 16384, "Tokens per workload (whole batches).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "Tokens per calibration window.")
_BATCH = flags.DEFINE_integer("batch", 4, "Windows per batch.")
_LEARN_STEPS = flags.DEFINE_integer("learn_steps", 100, "Optimizer steps per layer (learned).")
_SEED = flags.DEFINE_integer("seed", 0, "Workload seed.")
_IMPL = flags.DEFINE_enum("impl", "auto", list(kvtpu.attention.IMPLS), "attend implementation.")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/calibrate", "Output directory.")


def outlier_markdown(art) -> str:
  """Per layer: largest channel/median ratio per head and the top channels, per kind."""
  lines = ["| layer | " + " | ".join(f"{k}: max/median (head), top channels" for k in KINDS) + " |",
           "|---|" + "---|" * len(KINDS)]
  table = art.summary
  layers = len(np.asarray(table[KINDS[0]]["outlier_ratio"]))
  for layer in range(layers):
    cells = []
    for kind in KINDS:
      ratio = np.asarray(table[kind]["outlier_ratio"])[layer]
      top = np.asarray(table[kind]["top_channels"])[layer]
      head = int(np.argmax(ratio))
      cells.append(f"{ratio.max():.1f} (h{head}), ch {', '.join(map(str, top[head][:3]))}")
    lines.append(f"| {layer} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def disclosure_markdown(art) -> str:
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


def clip_markdown(art) -> str:
  """Per layer, the calibrated clip ratios of the dynamic specs (one per kv head)."""
  clips = {w: d["clip"] for w, d in art.scales.items() if "clip" in d}
  lines = ["## Clip ratios of the dynamic specs (per kv head)\n",
           "| layer | " + " | ".join(w.upper() for w in clips) + " |",
           "|---|" + "---|" * len(clips)]
  for layer in range(art.model["num_layers"]):
    lines.append(f"| {layer} | " + " | ".join(
        ", ".join(f"{c:.3f}" for c in clip[layer]) for clip in clips.values()) + " |")
  return "\n".join(lines)


def plot_magnitudes(summaries: dict, path: str) -> None:
  """Heat maps of per-channel absmax (kv heads' channels laid side by side), from
  `kv_stats.summary` per kind."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  kinds = [k for k in KINDS if k in summaries]
  fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 5), squeeze=False)
  for ax, kind in zip(axes[0], kinds, strict=True):
    absmax = np.asarray(summaries[kind]["absmax"])  # [L, K, H]
    grid = absmax.reshape(absmax.shape[0], -1)
    im = ax.imshow(np.log10(np.maximum(grid, 1e-6)), aspect="auto", cmap="magma")
    ax.set_title(f"{kind}: log10 |x| max per channel")
    ax.set_xlabel("kv head x channel")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  logging.info("jax %s, devices: %s", jax.__version__, jax.devices())
  try:
    fmt = kvtpu.KVFormat.parse(_KV_FORMAT.value)
  except ValueError as e:
    raise app.UsageError(f"--kv_format: {e}") from None
  model, tokenizer = load_pretrained(_MODEL.value, param_dtype=jnp.float32)
  respond = chat_responder(model, tokenizer)
  loaded = []
  for spec in _WORKLOADS.value:
    loaded.append(workloads_lib.load(spec, tokenizer, seed=_SEED.value, respond=respond))
    logging.info("workload %s: %d tokens (%s)", loaded[-1].name, loaded[-1].num_tokens,
                 loaded[-1].description)
  budget = _NUM_TOKENS.value
  window = _SEQ_LEN.value * _BATCH.value
  for w in loaded:
    if w.num_tokens < window:
      raise app.UsageError(f"workload {w.name} has {w.num_tokens} tokens, fewer than one batch "
                           f"of {_BATCH.value} x {_SEQ_LEN.value}")

  def progress(name, tokens, seconds):
    logging.info("%s: %d tokens, %.0f tokens/s", name, tokens, tokens / seconds)

  options = {"percentile": _PERCENTILE.value} if _METHOD.value == "percentile" else {}
  per_workload = min([budget] + [w.num_tokens for w in loaded])
  art, stats = calibrate(model, loaded, fmt, method=_METHOD.value, seq_len=_SEQ_LEN.value,
                         batch=_BATCH.value, num_tokens=per_workload, method_options=options,
                         learn_steps=_LEARN_STEPS.value, impl=_IMPL.value, progress=progress)
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  art.save(os.path.join(workdir, "artifact"))
  summaries = {kind: kv_stats.summary(st) for kind, st in stats.items()}
  with open(os.path.join(workdir, "stats.json"), "w") as f:
    json.dump({kind: {k: np.asarray(v).tolist() for k, v in s.items()}
               for kind, s in summaries.items()}, f)
  config = {name: flags.FLAGS[name].value for name in (
      "model", "workloads", "kv_format", "method", "percentile", "num_tokens", "seq_len", "batch",
      "learn_steps", "seed", "impl", "workdir")}
  config.update(jax_version=jax.__version__, kvtpu_version=kvtpu.__version__,
                devices=[str(d) for d in jax.devices()])
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  with open(os.path.join(workdir, "results.jsonl"), "w") as f:
    for kind in KINDS:
      table = art.summary[kind]
      for layer in range(model.cfg.num_layers):
        row = {"kind": kind, "layer": layer, "model": model.cfg.name,
               "weight_precision": model.weight_precision, "kv_format": fmt.name,
               "method": art.method, "calibration": art.workload_names(),
               "outlier_ratio": np.asarray(table["outlier_ratio"])[layer].tolist(),
               "top_channels": np.asarray(table["top_channels"])[layer].tolist(),
               "head_absmax": np.asarray(table["head_absmax"])[layer].tolist()}
        if kind in art.clip_fraction:  # The stored tensors: "k" (after RoPE) and "v".
          row["calibration_clip_fraction"] = float(art.clip_fraction[kind][layer])
        if "clip" in art.scales.get(kind, {}):
          row["clip_ratio"] = art.scales[kind]["clip"][layer].tolist()
        f.write(json.dumps(row) + "\n")
  plot_magnitudes(summaries, os.path.join(workdir, "magnitudes.png"))
  report = "\n\n".join([
      f"# KV calibration: {model.cfg.name}, {fmt.name}, {art.method}",
      disclosure_markdown(art),
      "## Outliers per layer\n\nLargest channel absmax over the head's median channel "
      "absmax (the head where it is largest), and that head's top channels by absmax.",
      outlier_markdown(art),
      "## Clip rate of the calibrated scales on the calibration data\n\n" + "\n".join(
          f"- {which.upper()}: mean {np.mean(frac):.2e}, max {np.max(frac):.2e} (layer "
          f"{int(np.argmax(frac))})" for which, frac in art.clip_fraction.items()),
      *([clip_markdown(art)] if any("clip" in d for d in art.scales.values()) else []),
      "![per-channel magnitudes](magnitudes.png)"]) + "\n"
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(report)
  print(report)
  print(f"Calibration artifact: {os.path.join(workdir, 'artifact')}; report: "
        f"{os.path.join(workdir, 'report.md')}")


if __name__ == "__main__":
  app.run(main)
