"""The headroom run: the longest context and the most sequences each KV precision fits.

For a model (a `kvtpu.models.presets` name), its weight precision, an accelerator slice
and a (`data`, `model`) mesh, solves per KV format: the largest context at each
concurrency and the largest concurrency at each context, with weights + cache + the
decode step's temporaries within each device's HBM less the reserve.

Modes (several allowed; they should agree):
  analytic  closed forms (`kvtpu.memory`, `kvtpu.sharding`): instant, any slice.
  aot       compiles the sharded decode step for the slice's TPU topology through
            libtpu (no TPU needed) and reads `memory_analysis()`; seeded with the
            analytic answers, so a consistent answer costs two compiles.
  live      allocates and runs the step on the present devices (a TPU VM; elsewhere
            with `hbm_gib` as the capacity); out-of-memory is a data point.

Paged caches (`paged_lengths`): for each length distribution of requests, the most
requests in flight whose pages (of `page_len` positions, sized for each of
`paged_demands`: the mean pages they hold, or the 99th percentile) fit, per KV format
(`kvtpu.headroom.paged`), in analytic and aot modes (live mode sizes slabs only; layer
plans are not paged). With `strategy="sequence"` (each sequence's pages split over the
model axis, `kvtpu.sharding`) only these paged questions are answered.

Writes to the workdir: config.json (first; the seconds per mode added at the end),
results.jsonl (each maximum and the first point past it, `oom: true`, appended as each
answer is solved), paged.jsonl (the same for the paged questions), report.md (tables
per mode, the per-device breakdown, the agreement between modes, the paged tables) and
context_vs_concurrency.png.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

import jax
from kvtpu.models import presets
from kvtpu.models.headroom import (
  PLANS_ANALYTIC_ONLY,
  WEIGHT_DTYPES,
  AotMeasure,
  LiveMeasure,
  deployment,
  parse_mesh,
)
from kvtpu.models.runs.common import (
  FOUR_BIT_SCHEME,
  TWO_BIT_SCHEME,
  ConfigError,
  Progress,
  check,
  check_plan_layers,
  check_workdir,
  done_items,
  finite_number,
  format_list,
  impl_choice,
  int_list,
  one_of,
  positive_int,
  start,
  str_list,
  write_config,
)

import kvtpu
from kvtpu import accelerators, headroom, reports
from kvtpu.headroom import paged as paged_headroom
from kvtpu.headroom import report as headroom_report
from kvtpu.headroom.paged import DEMANDS, LengthDistribution
from kvtpu.sharding import STRATEGIES, resolve_strategy

__all__ = ["HeadroomConfig", "HeadroomResult", "run"]


@dataclasses.dataclass(frozen=True)
class HeadroomConfig:
  """A headroom sweep (each field is the headroom binary's flag of the same name).

  Attributes:
    model: a `kvtpu.models.presets` name (the model's shape).
    weight_dtype: storage precision of the weights (`WEIGHT_DTYPES`), reported apart from
      the KV precision.
    accelerator: the slice, e.g. "v5e-8", "v5p-8", "v5e-256", "h100-8".
    mesh: "data:<n>,model:<m>", covering the slice.
    strategy: kv heads over the model axis (`kvtpu.sharding.STRATEGIES`).
    kv_formats: KV-cache formats to size, or layer plans (formats per layer,
      `kvtpu.LayerPlan`; analytic mode only).
    modes: "analytic", "aot" and/or "live" ("aot" and "live" not together).
    concurrencies: concurrencies of the max-context question.
    contexts: contexts of the max-concurrency question.
    block: context step (positions) of the search.
    reserve: fraction of HBM kept free, in [0, 1).
    hbm_gib: capacity per device for live mode on devices that report none (CPU).
    impl: attend implementation of the live step (aot compiles the Pallas kernels).
    paged_lengths: length distributions of requests for the paged question
      (`LengthDistribution.parse`: fixed:<n>, uniform:<lo>:<hi>, histogram:<path>); empty
      for none.
    page_len: positions per page of the paged cache.
    paged_demands: what the pool is sized for (`kvtpu.headroom.paged.DEMANDS`).
  """

  model: str = "llama-3.1-8b"
  weight_dtype: str = "bf16"
  accelerator: str = "v5e-8"
  mesh: str = "data:2,model:4"
  strategy: str = "auto"
  kv_formats: tuple[str, ...] = ("bf16", "int8", "fp8_e4m3", "int4", FOUR_BIT_SCHEME,
                                 TWO_BIT_SCHEME)
  modes: tuple[str, ...] = ("analytic",)
  concurrencies: tuple[int, ...] = (1, 8, 32, 128)
  contexts: tuple[int, ...] = (8192, 32768, 131072)
  block: int = 128
  reserve: float = headroom.DEFAULT_RESERVE
  hbm_gib: float | None = None
  impl: str = "auto"
  paged_lengths: tuple[str, ...] = ("uniform:1:32768",)
  page_len: int = 128
  paged_demands: tuple[str, ...] = ("mean", "p99")

  def __post_init__(self):
    try:
      cfg = presets.get(self.model)
    except ValueError as e:
      raise ConfigError("model", str(e)) from None
    one_of("weight_dtype", self.weight_dtype, sorted(WEIGHT_DTYPES))
    try:
      slice_ = accelerators.parse_slice(self.accelerator)
    except ValueError as e:
      raise ConfigError("accelerator", str(e)) from None
    try:
      mesh = parse_mesh(self.mesh)
    except ValueError as e:
      raise ConfigError("mesh", str(e)) from None
    devices = mesh["data"] * mesh["model"]
    check(devices == slice_.num_chips, "mesh",
          f"{self.mesh} has {devices} devices, but accelerator {slice_.name} has "
          f"{slice_.num_chips}: the mesh must cover the slice")
    one_of("strategy", self.strategy, STRATEGIES)
    try:
      resolve_strategy(self.strategy, kv_heads=cfg.num_kv_heads, model=mesh["model"])
    except ValueError as e:
      raise ConfigError("strategy", f"{e} ({cfg.name} has {cfg.num_kv_heads} kv heads)"
                        ) from None
    object.__setattr__(self, "kv_formats", format_list("kv_formats", self.kv_formats, plans=True))
    modes = str_list("modes", self.modes)
    check(all(m in headroom_report.MODES for m in modes), "modes",
          f"expected modes among {list(headroom_report.MODES)}, got {list(modes)}")
    check(not {"aot", "live"} <= set(modes), "modes",
          "live sizes the present devices and aot the accelerator's topology: run them "
          "separately")
    object.__setattr__(self, "modes", tuple(dict.fromkeys(modes)))
    for plan in (kvtpu.LayerPlan.parse(f) for f in self.kv_formats):
      if not plan.overrides:
        continue
      check(self.modes == ("analytic",), "kv_formats",
            f"{plan.name} is a layer plan, which only --modes=analytic sizes: "
            f"{PLANS_ANALYTIC_ONLY}")
      check(devices == 1, "kv_formats",
            f"{plan.name} is a layer plan, sized on one device only (--mesh=data:1,model:1): "
            f"{PLANS_ANALYTIC_ONLY}")
    check_plan_layers("kv_formats", self.kv_formats, cfg.num_layers, cfg.name)
    object.__setattr__(self, "concurrencies", int_list("concurrencies", self.concurrencies))
    object.__setattr__(self, "contexts", int_list("contexts", self.contexts))
    object.__setattr__(self, "block", positive_int("block", self.block))
    check(reports.is_num(self.reserve) and 0 <= self.reserve < 1, "reserve",
          f"expected a fraction of HBM in [0, 1), got {self.reserve!r}")
    if self.hbm_gib is not None:
      object.__setattr__(self, "hbm_gib", finite_number("hbm_gib", self.hbm_gib, low=0,
                                                        low_open=True))
    one_of("impl", self.impl, kvtpu.attention.IMPLS)
    object.__setattr__(self, "paged_lengths", str_list("paged_lengths", self.paged_lengths))
    for text in self.paged_lengths:
      try:
        LengthDistribution.parse(text)
      except ValueError as e:
        raise ConfigError("paged_lengths", str(e)) from None
    object.__setattr__(self, "page_len", positive_int("page_len", self.page_len))
    for name in (f for f in self.kv_formats if self.paged_lengths
                 and not kvtpu.LayerPlan.parse(f).overrides):
      spec = kvtpu.KVFormat.parse(name)
      need = math.lcm(*(kvtpu.qtensor.QuantizedKV.max_len_multiple(x, paged=True)
                        for x in (spec.k, spec.v)))
      check(self.page_len % need == 0, "page_len",
            f"{name} needs pages of a multiple of {need} positions, got page_len={self.page_len}")
    demands = str_list("paged_demands", self.paged_demands)
    check(all(d in DEMANDS for d in demands), "paged_demands",
          f"expected demands among {sorted(DEMANDS)}, got {list(demands)}")
    object.__setattr__(self, "paged_demands", tuple(dict.fromkeys(demands)))
    if "live" in self.modes:  # aot compiles the Pallas kernels for the TPU, on any host.
      impl_choice("impl", self.impl)
    if resolve_strategy(self.strategy, kv_heads=cfg.num_kv_heads,
                        model=mesh["model"]) == "sequence":
      what = ("strategy=sequence shards the pages of paged caches: it answers the paged "
              "questions (--paged_lengths) of single formats in analytic and aot modes only")
      check("live" not in self.modes, "strategy", what)
      check(self.paged_lengths and any(not kvtpu.LayerPlan.parse(f).overrides
                                       for f in self.kv_formats), "strategy", what)

  @property
  def model_config(self):
    return presets.get(self.model)

  @property
  def slice(self) -> accelerators.Slice:
    return accelerators.parse_slice(self.accelerator)

  @property
  def mesh_axes(self) -> dict[str, int]:
    return parse_mesh(self.mesh)


@dataclasses.dataclass(frozen=True)
class HeadroomResult:
  """What a sweep made: its rows, the report text and the paths written."""

  rows: list[dict]
  report: str
  paths: dict[str, Path]


def _live_capacity(config: HeadroomConfig, devices) -> int:
  stats = devices[0].memory_stats() or {}
  if "bytes_limit" in stats:
    return int(stats["bytes_limit"])
  check(config.hbm_gib is not None, "hbm_gib",
        f"modes=live on {devices[0].platform} devices, which report no memory capacity: give "
        "one with hbm_gib")
  capacity = int(config.hbm_gib * 2**30)
  # Host memory backs these devices: a capacity beyond it would not raise an
  # out-of-memory error but get the process killed (or the machine swapping).
  host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
  check(capacity * len(devices) <= host // 2, "hbm_gib",
        f"{config.hbm_gib} x {len(devices)} devices is more than half of this host's free "
        f"memory ({host / 2**30:.1f} GiB): live mode on host-memory devices must stay well "
        "inside it")
  return capacity


def _row_key(row: dict) -> tuple[str, str, str, int]:
  """The answer a result row belongs to: (mode, format, kind, asked)."""
  asked = row["concurrency"] if row["kind"] == "max_context" else row["context"]
  return row["mode"], row["kv_format"], row["kind"], asked


def _compile_summary(timings) -> str:
  """`AotMeasure.compile_seconds` as the range of seconds per batch, smallest batch first."""
  by_batch: dict[int, list[float]] = {}
  for _, batch, _, s in timings:
    by_batch.setdefault(batch, []).append(s)
  return "; ".join(f"batch {b}: {min(v):.1f}-{max(v):.1f} s ({len(v)})"
                   for b, v in sorted(by_batch.items()))


def run(config: HeadroomConfig, workdir: str | os.PathLike, *, resume: bool = False,
        overwrite: bool = False) -> HeadroomResult:
  """Solves the sweep of `config` in each of its modes, writing to `workdir` (see the module
  docstring).

  The workdir rule (`kvtpu.models.runs.common.check_workdir`) and, in live mode, the
  present devices are checked before anything is measured. Each answer's rows are
  appended to results.jsonl as it is solved; with `resume`, the answers already there are
  kept and only the others are solved (the analytic answers seed the aot and live
  searches: from their saved rows, or solved again when analytic mode is not recorded).

  Raises:
    ConfigError: the workdir rule; live mode on devices the mesh does not cover, or
      without a capacity.
  """
  workdir = check_workdir(workdir, config, resume=resume, overwrite=overwrite, resumable=True)
  cfg, slice_, mesh = config.model_config, config.slice, config.mesh_axes
  data, model = mesh["data"], mesh["model"]
  hbm, labels = slice_.chip.hbm_bytes, dict(accelerator=slice_.name, chip=slice_.chip.name,
                                            num_devices=slice_.num_chips)
  tpu = slice_.topology is not None
  if "live" in config.modes:  # Live sizes the present devices; analytic then sizes the same.
    devices = jax.devices()
    check(len(devices) == data * model, "mesh",
          f"modes=live runs on the present {len(devices)} devices; mesh={config.mesh} must "
          "cover them")
    kind = accelerators.chip_name(devices[0].device_kind) or devices[0].platform
    hbm = _live_capacity(config, devices)
    tpu = devices[0].platform == "tpu"
    labels = dict(accelerator=f"{kind}-{len(devices)} (present devices)", chip=kind,
                  num_devices=len(devices))
  dep = deployment(cfg, weights=config.weight_dtype, hbm_per_device=hbm, data=data,
                   model=model, strategy=config.strategy, reserve=config.reserve, tpu=tpu)
  labels.update(model=cfg.name, weight_dtype=config.weight_dtype, mesh=config.mesh,
                model_max_position=cfg.max_position)
  extra = dict(topology=slice_.topology)
  log = reports.RowLog(workdir / "results.jsonl", headroom_report.check_row, resume=resume)
  done = done_items(log, _row_key) if resume else set()
  paged_log = reports.RowLog(workdir / "paged.jsonl", paged_headroom.check_row, resume=resume)
  paged_done = done_items(paged_log, _paged_key) if resume else set()
  workdir = start(workdir, config, **extra)
  # Sequence-sharded caches are paged: the slab questions do not apply to them.
  questions = [] if dep.resolved_strategy == "sequence" else [
      (fmt, kind, asked) for fmt in config.kv_formats
      for kind, points in (("max_context", config.concurrencies),
                           ("max_concurrency", config.contexts)) for asked in points]
  # Seeds of the aot and live searches: the analytic answers (those a resumed run kept
  # are read from their rows).
  guesses = {(r["kv_format"], r["kind"], _row_key(r)[3]): r["max_len" if r["kind"] ==
             "max_context" else "batch"] for r in log.rows
             if r["mode"] == "analytic" and not r["oom"]}
  seconds, compile_line = {}, None
  for mode in ["analytic"] + [m for m in config.modes if m != "analytic"]:
    begin = time.perf_counter()
    record = mode in config.modes
    if mode == "analytic":
      measure = lambda fmt, b, s: headroom.analytic_usage(dep, fmt, b, s)  # noqa: E731
    elif mode == "aot":
      measure = AotMeasure(cfg, weights=config.weight_dtype, slice_=slice_, data=data,
                           model=model, strategy=config.strategy)
    else:
      measure = LiveMeasure(cfg, weights=config.weight_dtype, devices=jax.devices(), data=data,
                            model=model, strategy=config.strategy, impl=config.impl)
    todo = [q for q in questions if (mode, *q) not in done]
    progress = Progress(f"headroom {mode}", len(todo), "answers")
    for fmt_name, kind, asked in todo:
      fmt = kvtpu.LayerPlan.config(fmt_name)
      guess = guesses.get((fmt.name, kind, asked))
      if kind == "max_context":
        answer = headroom.max_context(dep, fmt, asked, measure, block=config.block, guess=guess)
        found = answer.max_len
      else:
        answer = headroom.max_concurrency(dep, fmt, asked, measure, guess=guess)
        found = answer.batch
      if mode == "analytic":
        guesses[(fmt.name, kind, asked)] = found
      if record:
        log.extend(headroom.answer_rows(fmt, answer, dep, mode=mode, **labels))
      progress.add(1, f"{fmt.name} {kind}: concurrency {answer.concurrency}, context "
                   f"{answer.context} ({(answer.usage.total if answer.usage else 0) / 2**30:.1f} "
                   f"GiB of {dep.budget / 2**30:.1f} GiB per device)")
    if mode != "live":
      _solve_paged(config, dep, mode, measure, paged_log, paged_done, record, labels)
    if record:
      seconds[mode] = round(time.perf_counter() - begin, 1)
    if mode == "aot" and measure.compile_seconds:
      compile_line = "aot compile time per step: " + _compile_summary(measure.compile_seconds)
  write_config(workdir, config, **extra, seconds=seconds)

  header = [
      f"model: {cfg.name} (L={cfg.num_layers}, kv heads={cfg.num_kv_heads}, "
      f"head_dim={cfg.head_dim}, trained context {cfg.max_position:,})",
      f"weight precision: {config.weight_dtype} ({dep.weights_per_device / 2**30:.2f} GiB "
      f"per device, tensor-parallel over model:{model})",
      "KV precisions: " + ", ".join(config.kv_formats),
      f"accelerator: {labels['accelerator']} ({labels['num_devices']} x {labels['chip']}, "
      f"{hbm / 2**30:.1f} GiB HBM each)",
      f"mesh: {config.mesh}; kv heads: {dep.resolved_strategy} (kvtpu.sharding)",
      f"reserve: {config.reserve:.0%} of HBM; budget {dep.budget / 2**30:.2f} GiB per device",
      "modes: " + ", ".join(f"{m} ({seconds.get(m, 0):.0f} s)" for m in config.modes),
  ] + ([compile_line] if compile_line else [])
  paths = headroom_report.write_report(
      log.rows, workdir, title=f"KV-cache memory headroom: {cfg.name} on {slice_.name}",
      header_lines=header)
  report = Path(paths["report"]).read_text()
  paged_rows = [r for r in paged_log.rows if r["mode"] in config.modes]
  if paged_rows:
    reports.write_jsonl(paged_rows, workdir / "paged.jsonl")
    text = _PAGED_TEXT.format(z=config.page_len)
    if dep.resolved_strategy == "sequence":
      text += _SEQUENCE_TEXT.format(m=model)
    report += "\n## Paged cache\n\n" + text + "\n\n" + (
        paged_headroom.markdown(paged_rows) + "\n")
    if "live" in config.modes:
      report += "\nLive mode sizes slab caches only; the paged rows are analytic and aot.\n"
    reports.write_text(paths["report"], report)
    paths["paged"] = workdir / "paged.jsonl"
  return HeadroomResult(log.rows, report, {name: Path(p) for name, p in paths.items()})


_PAGED_TEXT = (
    "How many requests can be in flight at once when the cache is paged (pages of {z} "
    "positions, `kvtpu.paging`): each request holds the pages its length needs, drawn from "
    "the length distribution, plus its windows and page table; each data shard one null "
    "page. \"mean\": the pool holds the mean pages of that many requests; \"p99\": their "
    "99th percentile (normal approximation), what a server needs to rarely preempt. Rows: "
    "paged.jsonl (the first point past each maximum has `oom` true).")
_SEQUENCE_TEXT = (
    " Sequence-sharded (`strategy=sequence`): each request's pages are split over the "
    "{m} model devices by position (device m holds its table's columns [m W/{m}, (m+1) "
    "W/{m})), so every device's pool is sized for the first device's share, each request's "
    "first W/{m} pages; windows and page tables are replicated over the model axis.")


def _paged_key(row: dict) -> tuple[str, str, str, str]:
  """The answer a paged row belongs to: (mode, format, lengths, demand)."""
  return row["mode"], row["kv_format"], row["lengths"], row["demand"]


def _solve_paged(config: HeadroomConfig, dep, mode: str, measure, log, done, record: bool,
                 labels: dict) -> None:
  """Answers the paged questions of `config` in `mode` (analytic or aot), appending
  their rows to `log` when `record`; the analytic answers seed the aot searches."""
  if mode == "analytic":
    measure = lambda f, b, s, z, p: paged_headroom.analytic_paged_usage(  # noqa: E731
        dep, f, b, s, z, p)
  fmts = [f for f in config.kv_formats if not kvtpu.LayerPlan.parse(f).overrides]
  todo = [(f, text, d) for f in fmts for text in config.paged_lengths
          for d in config.paged_demands if (mode, kvtpu.KVFormat.parse(f).name, text, d)
          not in done]
  progress = Progress(f"headroom paged {mode}", len(todo), "answers")
  for fmt_name, text, demand in todo:
    dist = LengthDistribution.parse(text)
    guess = next((r["requests"] for r in log.rows if r["mode"] == "analytic" and not r["oom"]
                  and _paged_key(r)[1:] == (kvtpu.KVFormat.parse(fmt_name).name, text,
                                            demand)), None)
    answer = paged_headroom.max_requests(dep, fmt_name, dist, measure, page_len=config.page_len,
                                         demand=demand, guess=guess)
    if record or mode == "analytic":
      rows = paged_headroom.answer_rows(answer, dist, dep, mode=mode, **labels)
      log.extend(rows)
    progress.add(1, f"{answer.fmt} {text} ({demand}): {answer.requests} requests, "
                 f"{answer.num_pages} pages")
