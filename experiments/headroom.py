"""Memory headroom: the longest context and the most sequences each KV precision fits.

For a model (a `kvtpu.models.presets` name), its weight precision, an accelerator slice and
a (`data`, `model`) mesh, solves per KV format: the largest context at each
`--concurrencies` and the largest concurrency at each `--contexts`, with weights +
cache + the decode step's temporaries within each device's HBM less `--reserve`.

Modes (`--modes`, several allowed; they should agree):
  analytic  closed forms (`kvtpu.memory`, `kvtpu.sharding`): instant, any slice.
  aot       compiles the sharded decode step for the slice's TPU topology through
            libtpu (no TPU needed) and reads `memory_analysis()`; seeded with the
            analytic answers, so a consistent answer costs two compiles.
  live      allocates and runs the step on the present devices (a TPU VM; elsewhere
            with `--hbm_gib` as the capacity); out-of-memory is a data point.

Writes to `--workdir`: config.json, results.jsonl (each maximum and the first point
past it, `oom: true`), report.md (tables per mode, the per-device breakdown, the
agreement between modes) and context_vs_concurrency.png.

  python -m kvtpu.experiments.headroom --model=llama-3.1-8b --weight_dtype=bf16 \\
      --accelerator=v5e-8 --mesh=data:2,model:4 --kv_formats=bf16,int8,fp8_e4m3,int4 \\
      --modes=analytic,aot

On a multi-host TPU slice, run the same command on every host: it calls
`jax.distributed.initialize()` first (`--distributed=auto` detects the slice).
"""

from __future__ import annotations

import json
import os
import time

import jax
from absl import app, flags, logging
from kvtpu.experiments.common import format_names, maybe_initialize_distributed, positive_ints
from kvtpu.models import presets
from kvtpu.models.headroom import WEIGHT_DTYPES, AotMeasure, LiveMeasure, deployment, parse_mesh

import kvtpu
from kvtpu import accelerators, headroom, headroom_report
from kvtpu.sharding import STRATEGIES

_MODEL = flags.DEFINE_string("model", "llama-3.1-8b",
                             f"Model shape, one of {sorted(presets.PRESETS)}.")
_WEIGHT_DTYPE = flags.DEFINE_enum("weight_dtype", "bf16", sorted(WEIGHT_DTYPES),
                                  "Storage precision of the weights (reported separately from "
                                  "the KV precision).")
_ACCELERATOR = flags.DEFINE_string("accelerator", "v5e-8",
                                   "Slice: v5e-8, v6e-8, v5p-8, v5e-256, h100-8, ...")
_MESH = flags.DEFINE_string("mesh", "data:2,model:4",
                            "Mesh axis sizes; data x model = the slice's devices.")
_STRATEGY = flags.DEFINE_enum("strategy", "auto", list(STRATEGIES),
                              "kv heads over the model axis (kvtpu.sharding).")
_KV_FORMATS = flags.DEFINE_list("kv_formats", ["bf16", "int8", "fp8_e4m3", "int4"],
                                "KV-cache formats.")
_MODES = flags.DEFINE_list("modes", ["analytic"], "analytic, aot and/or live.")
flags.DEFINE_alias("mode", "modes")
_CONCURRENCIES = flags.DEFINE_list("concurrencies", ["1", "8", "32", "128"],
                                   "Concurrencies for the max-context question.")
_CONTEXTS = flags.DEFINE_list("contexts", ["8192", "32768", "131072"],
                              "Contexts for the max-concurrency question.")
_BLOCK = flags.DEFINE_integer("block", 128, "Context step (positions) of the search.")
_RESERVE = flags.DEFINE_float("reserve", headroom.DEFAULT_RESERVE,
                              "Fraction of HBM kept free.")
_HBM_GIB = flags.DEFINE_float("hbm_gib", None,
                              "Capacity per device for live mode on devices that do not report "
                              "one (CPU).")
_IMPL = flags.DEFINE_enum("impl", "auto", list(kvtpu.attention.IMPLS),
                          "attend implementation of the live step (aot: pallas).")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "yes", "no"],
                                 "jax.distributed.initialize(): auto = on a multi-host TPU slice.")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/headroom", "Output directory.")


def _live_capacity(devices) -> int:
  stats = devices[0].memory_stats() or {}
  if "bytes_limit" in stats:
    return int(stats["bytes_limit"])
  if _HBM_GIB.value is None:
    raise app.UsageError(f"--modes=live on {devices[0].platform} devices, which report no memory "
                         "capacity: give one with --hbm_gib")
  capacity = int(_HBM_GIB.value * 2**30)
  # Host memory backs these devices: a capacity beyond it would not raise an
  # out-of-memory error but get the process killed (or the machine swapping).
  host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
  if capacity * len(devices) > host // 2:
    raise app.UsageError(f"--hbm_gib={_HBM_GIB.value} x {len(devices)} devices is more than half "
                         f"of this host's free memory ({host / 2**30:.1f} GiB): live mode on "
                         "host-memory devices must stay well inside it")
  return capacity


def _answers_by_question(answers) -> dict:
  """`sweep` guesses from answers: {(format, kind, asked): found}."""
  return {(f.name, a.kind, a.concurrency if a.kind == "max_context" else a.context):
          (a.max_len if a.kind == "max_context" else a.batch) for f, a in answers}


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  maybe_initialize_distributed(_DISTRIBUTED.value)
  modes = _MODES.value
  bad = [m for m in modes if m not in headroom_report.MODES]
  if bad or not modes:
    raise app.UsageError(f"--modes must be among {headroom_report.MODES}, got {modes}")
  try:
    cfg = presets.get(_MODEL.value)
    slice_ = accelerators.parse_slice(_ACCELERATOR.value)
    mesh = parse_mesh(_MESH.value)
    fmts = [kvtpu.KVFormat.parse(f) for f in format_names(_KV_FORMATS.value)]
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  data, model = mesh["data"], mesh["model"]
  if data * model != slice_.num_chips:
    raise app.UsageError(f"--mesh={_MESH.value} has {data * model} devices, but "
                         f"--accelerator={slice_.name} has {slice_.num_chips}: the mesh must "
                         "cover the slice")
  concurrencies = positive_ints("concurrencies", _CONCURRENCIES.value)
  contexts = positive_ints("contexts", _CONTEXTS.value)
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)

  hbm, labels = slice_.chip.hbm_bytes, dict(accelerator=slice_.name, chip=slice_.chip.name,
                                            num_devices=slice_.num_chips)
  if "live" in modes:  # Live sizes the present devices; analytic then sizes the same ones.
    if "aot" in modes:
      raise app.UsageError("--modes=live sizes the present devices and aot the --accelerator's "
                           "topology: run them separately")
    devices = jax.devices()
    if len(devices) != data * model:
      raise app.UsageError(f"--modes=live runs on the present {len(devices)} devices; "
                           f"--mesh={_MESH.value} must cover them")
    kind = accelerators.chip_name(devices[0].device_kind) or devices[0].platform
    hbm = _live_capacity(devices)
    labels = dict(accelerator=f"{kind}-{len(devices)} (present devices)", chip=kind,
                  num_devices=len(devices))
  try:
    dep = deployment(cfg, weights=_WEIGHT_DTYPE.value, hbm_per_device=hbm, data=data,
                     model=model, strategy=_STRATEGY.value, reserve=_RESERVE.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  labels.update(model=cfg.name, weight_dtype=_WEIGHT_DTYPE.value, mesh=_MESH.value,
                model_max_position=cfg.max_position)
  rows, guesses, seconds = [], {}, {}
  for mode in ["analytic"] + [m for m in modes if m != "analytic"]:
    start = time.perf_counter()
    if mode == "analytic":
      measure = lambda fmt, b, s: headroom.analytic_usage(dep, fmt, b, s)  # noqa: E731
    elif mode == "aot":
      measure = AotMeasure(cfg, weights=_WEIGHT_DTYPE.value, slice_=slice_, data=data,
                           model=model, strategy=_STRATEGY.value)
    else:
      measure = LiveMeasure(cfg, weights=_WEIGHT_DTYPE.value, devices=jax.devices(), data=data,
                            model=model, strategy=_STRATEGY.value, impl=_IMPL.value)

    def progress(answer, fmt, mode=mode):
      logging.info("%s %s %s: concurrency %d, context %d (%.1f GiB of %.1f GiB per device)",
                   mode, fmt.name, answer.kind, answer.concurrency, answer.context,
                   (answer.usage.total if answer.usage else 0) / 2**30, dep.budget / 2**30)

    answers = headroom.sweep(dep, fmts, measure, concurrencies=concurrencies,
                             contexts=contexts, block=_BLOCK.value, guesses=guesses,
                             progress=progress)
    if mode == "analytic":
      guesses = _answers_by_question(answers)
      if "analytic" not in modes:
        continue
    for fmt, answer in answers:
      rows += headroom.answer_rows(fmt, answer, dep, mode=mode, **labels)
    seconds[mode] = round(time.perf_counter() - start, 1)

  header = [
      f"model: {cfg.name} (L={cfg.num_layers}, kv heads={cfg.num_kv_heads}, "
      f"head_dim={cfg.head_dim}, trained context {cfg.max_position:,})",
      f"weight precision: {_WEIGHT_DTYPE.value} ({dep.weights_per_device / 2**30:.2f} GiB "
      f"per device, tensor-parallel over model:{model})",
      "KV precisions: " + ", ".join(f.name for f in fmts),
      f"accelerator: {labels['accelerator']} ({labels['num_devices']} x {labels['chip']}, "
      f"{hbm / 2**30:.1f} GiB HBM each)",
      f"mesh: {_MESH.value}; kv heads: {dep.resolved_strategy} (kvtpu.sharding)",
      f"reserve: {_RESERVE.value:.0%} of HBM; budget {dep.budget / 2**30:.2f} GiB per device",
      "modes: " + ", ".join(f"{m} ({seconds.get(m, 0):.0f} s)" for m in modes),
  ]
  config = {"model": cfg.name, "weight_dtype": _WEIGHT_DTYPE.value, "accelerator": slice_.name,
            "topology": slice_.topology, "mesh": _MESH.value, "strategy": _STRATEGY.value,
            "kv_formats": [f.name for f in fmts], "modes": modes,
            "concurrencies": concurrencies, "contexts": contexts, "block": _BLOCK.value,
            "reserve": _RESERVE.value, "seconds": seconds, "jax_version": jax.__version__,
            "kvtpu_version": kvtpu.__version__}
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  paths = headroom_report.write_report(
      rows, workdir, title=f"KV-cache memory headroom: {cfg.name} on {slice_.name}",
      header_lines=header)
  with open(paths["report"]) as f:
    print(f.read())
  print(f"Report: {paths['report']}; results: {paths['results']}")


if __name__ == "__main__":
  app.run(main)
