"""The serve run: continuous batching of one request trace on each cache precision.

Each KV format serves the same trace (`kvtpu.eval.traffic`: a JSONL file, or Poisson
arrivals with named length distributions) through `kvtpu.models.Engine` on a paged
cache whose pool is what the HBM budget leaves after the weights
(`hbm_gib` - weights - `workspace_gib`, `serving.pages_for_budget`): the same bytes,
more pages for a cheaper precision. Per format it reports concurrency (peak and mean
while arrived requests wait for room: what the cache sustains under the load, the
headline and the ratio to the reference; also before the first preemption, and
overall), preemptions, completed
requests, tokens per second, time to first token and per output token (p50, p99) and
pages used; and how many requests produce the reference format's (the first one's,
bf16 by default) output token for token, and where the others first differ.

Outputs: config.json, results.jsonl (a row per format), requests.jsonl (a row per
format and request), report.md, inflight.png (requests in flight over time).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from kvtpu.models import serving
from kvtpu.models.generation import Sampling
from kvtpu.models.headroom import make_mesh, parse_mesh
from kvtpu.models.pretrained import load_pretrained
from kvtpu.models.runs.common import (
  ConfigError,
  check,
  check_head_dim,
  check_workdir,
  finite_number,
  format_list,
  impl_choice,
  model_name,
  one_of,
  positive_int,
  sampling,
  start,
)
from kvtpu.models.sharding import state_bytes_per_device

from kvtpu import reports
from kvtpu.eval import traffic, workloads
from kvtpu.eval.workloads import CHAT_QUESTIONS
from kvtpu.sharding import STRATEGIES, CacheSharding

# The serving comparison's precisions. Both rotate each head (`rot`), which spreads the
# keys' outlier channels over all channels: the 8-bit grid then keeps outputs far closer
# to bf16's at the same bytes. bf16 scales: the fewest bytes per token. No bf16 windows in
# the 4-bit scheme: a window is held per slot whether or not it is used, and at serving
# lengths (hundreds of positions) it costs more than the whole request's quantized pages
# save (docs/serving.md). `nu`: a 16-level code scaled by each token's RMS.
SERVING_INT8 = "int8-sbf16-rot"
SERVING_FOUR_BIT = "int4-nu-sbf16-rot"

# The unquantized cache outputs are also compared with (ServeConfig.exact_reference).
EXACT = "f32"

# The generators' prompts (ServeConfig.prompts).
PROMPTS = ("chat", "filler")

__all__ = ["PROMPTS", "SERVING_FOUR_BIT", "SERVING_INT8", "ServeConfig", "run", "serve_formats", "load_trace", "cache_sharding"]


@dataclasses.dataclass(frozen=True)
class ServeConfig:
  """A serving comparison (each field is the serve binary's flag of the same name).

  Attributes:
    model: `load_pretrained` name, .gguf file or checkpoint folder.
    kv_formats: the cache formats served; the first is the accuracy reference.
    trace: a JSONL trace file (`kvtpu.eval.traffic.load_jsonl`); empty: a generator.
    prompts: the generator's prompts: "chat" (`traffic.chat`: the chat workload's
      questions in the model's template, each ending at a stop id or its budget) or
      "filler" (`traffic.poisson`: `prompt_len` tokens of `filler`, exact output lengths).
    rate, num_requests, prompt_len, output_len, seed: the generator's arrivals per second,
      requests, length distributions (`traffic.Distribution` specs; `output_len` is the
      chat budget) and seed.
    filler: the workload whose tokens fill length-only prompts.
    hbm_gib: memory per device for weights, cache and workspace, GiB.
    workspace_gib: of it, kept for activations and temporaries.
    slots: requests in flight at most; page_len: positions per page; chunk: prompt
      tokens per request per step; max_len: positions per request at most.
    temperature, top_p, top_k: sampling (temperature 0: greedy).
    impl: attend implementation; param_dtype: the weights' dtype.
    mesh: "data:<n>,model:<m>": slots over `data`, kv heads (or positions, `strategy`)
      and weights over `model` (`kvtpu.sharding`); hbm_gib is then per device.
    strategy: kv heads over the model axis (`kvtpu.sharding.STRATEGIES`).
    exact_reference: also serve the trace on an f32 cache (in lockstep) and report how
      many outputs each format shares with it: the bf16 reference's own distance from
      exact K/V, against which the others' is read.
  """

  model: str = "smollm2-135m"
  kv_formats: tuple[str, ...] = ("bf16", SERVING_INT8, SERVING_FOUR_BIT)
  trace: str = ""
  prompts: str = "chat"
  rate: float = 50.0
  num_requests: int = 40
  prompt_len: str = "lognormal:median=96,sigma=0.4,max=192"
  output_len: str = "fixed:64"
  seed: int = 0
  filler: str = "prose"
  hbm_gib: float = 0.51
  workspace_gib: float = 0.0
  slots: int = 40
  page_len: int = 32
  chunk: int = 32
  max_len: int = 256
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int | None = None
  impl: str = "auto"
  param_dtype: str = "float32"
  mesh: str = "data:1,model:1"
  strategy: str = "auto"
  exact_reference: bool = True

  def __post_init__(self):
    model_name("model", self.model)
    object.__setattr__(self, "kv_formats", format_list(
        "kv_formats", self.kv_formats, dynamic_only="serve runs dynamic-scale caches"))
    check(isinstance(self.trace, str), "trace", f"expected a path or '', got {self.trace!r}")
    check(not self.trace or Path(self.trace).is_file(), "trace", f"{self.trace} is not a file")
    one_of("prompts", self.prompts, PROMPTS)
    finite_number("rate", self.rate, low=0, low_open=True)
    for name in ("num_requests", "slots", "page_len", "chunk", "max_len"):
      object.__setattr__(self, name, positive_int(name, getattr(self, name)))
    object.__setattr__(self, "seed", positive_int("seed", self.seed, low=0))
    check(self.trace or self.prompts != "chat" or self.num_requests <= len(CHAT_QUESTIONS),
          "num_requests", f"expected at most the {len(CHAT_QUESTIONS)} chat questions "
          f"(--prompts=chat), got {self.num_requests}")
    for name in ("prompt_len", "output_len"):
      try:
        traffic.Distribution.parse(getattr(self, name))
      except ValueError as e:
        raise ConfigError(name, str(e)) from None
    finite_number("hbm_gib", self.hbm_gib, low=0, low_open=True)
    finite_number("workspace_gib", self.workspace_gib, low=0)
    check(self.max_len % self.page_len == 0, "max_len",
          f"expected a multiple of page_len={self.page_len}, got {self.max_len}")
    check(self.chunk <= self.max_len, "chunk",
          f"expected at most max_len={self.max_len}, got {self.chunk}")
    sampling(self.temperature, self.top_p, self.top_k)
    object.__setattr__(self, "impl", impl_choice("impl", self.impl))
    one_of("param_dtype", self.param_dtype, ("float32", "bfloat16"))
    try:
      mesh = parse_mesh(self.mesh)
    except ValueError as e:
      raise ConfigError("mesh", str(e)) from None
    one_of("strategy", self.strategy, STRATEGIES)
    check(self.slots % mesh["data"] == 0, "slots",
          f"expected a multiple of the mesh's data axis ({mesh['data']}), got {self.slots}")

  @property
  def mesh_axes(self) -> dict[str, int]:
    return parse_mesh(self.mesh)

  @property
  def sampling(self) -> Sampling:
    return sampling(self.temperature, self.top_p, self.top_k)


def cache_sharding(config: ServeConfig, cfg) -> CacheSharding | None:
  """The config's mesh over this process's first D x M devices (None for one device)."""
  axes = config.mesh_axes
  n = axes["data"] * axes["model"]
  if n == 1:
    return None
  devices = jax.devices()
  check(len(devices) >= n, "mesh",
        f"{config.mesh} needs {n} devices, {len(devices)} are present (on a CPU, set "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before starting)")
  sharding = CacheSharding(make_mesh(devices[:n], axes["data"], axes["model"]),
                           strategy=config.strategy)
  try:
    strategy = sharding.resolved(cfg.num_kv_heads)
  except ValueError as e:
    raise ConfigError("strategy", f"{e} ({cfg.name} has {cfg.num_kv_heads} kv heads)") from None
  pages_per_sequence = config.max_len // config.page_len
  check(strategy != "sequence"
        or pages_per_sequence % axes["model"] == 0, "max_len",
        f"strategy=sequence splits each request's {pages_per_sequence} pages over "
        f"{axes['model']} model devices: expected max_len / page_len to be a multiple of "
        f"{axes['model']}")
  return sharding


def load_trace(config: ServeConfig, tokenizer) -> traffic.Trace:
  """The config's trace: its JSONL file, or a generator's."""
  if config.prompts == "chat" and not config.trace:
    try:
      return traffic.chat(tokenizer, rate=config.rate, num_requests=config.num_requests,
                          output_len=config.output_len, max_context=config.max_len,
                          seed=config.seed)
    except ValueError as e:  # The longest question plus the largest budget.
      raise ConfigError("max_len", str(e)) from None
  filler = workloads.load(config.filler, tokenizer, seed=config.seed)
  try:
    if config.trace:
      return traffic.load_jsonl(config.trace, tokenizer, max_context=config.max_len,
                                filler=filler)
    return traffic.poisson(rate=config.rate, num_requests=config.num_requests,
                           prompt_len=config.prompt_len, output_len=config.output_len,
                           max_context=config.max_len, filler=filler, seed=config.seed)
  except ValueError as e:
    # The generator's one error past the config's checks: the two distributions' largest
    # draws exceed max_len (a prompt longer than the filler names prompt_len too).
    raise ConfigError("trace" if config.trace else "prompt_len", str(e)) from None


def serve_formats(model, tokenizer, trace: traffic.Trace, config: ServeConfig,
                  out: Callable[[str], Any] = print
                  ) -> tuple[list[dict], dict[str, Any], dict[str, Any]]:
  """Serves `trace` on each of `config.kv_formats`; returns the per-format rows, the
  per-format `ServeResult`s as served, and those of `serving.lockstep`."""
  axes = config.mesh_axes
  sharding = cache_sharding(config, model.cfg)
  weights = state_bytes_per_device(nnx.state(model, nnx.Param), model=axes["model"])
  budget = int((config.hbm_gib - config.workspace_gib) * 2**30) - weights
  check(budget > 0, "hbm_gib",
        f"{config.hbm_gib:g} GiB leaves no room for a cache after the weights "
        f"({weights / 2**20:.2f} MiB per device) and the workspace "
        f"({config.workspace_gib:g} GiB)")
  shards, model_shards = serving.pool_blocks(sharding, model.cfg.num_kv_heads)
  blocks = shards * model_shards
  engine_args = dict(page_len=config.page_len, max_len=config.max_len, chunk=config.chunk,
                     stop_ids=sorted(tokenizer.stop_ids), sampling=config.sampling,
                     seed=config.seed, impl=config.impl, cache_sharding=sharding)
  # Outputs compared in one schedule that depends on the trace alone (serving.lockstep):
  # differences are the cache's, not when requests shared steps.
  lockstep = functools.partial(serving.lockstep, model, trace, slots=config.slots,
                               **engine_args)
  pools = {}
  for fmt in config.kv_formats:  # Every format's pool checked before anything is served.
    try:
      pages = serving.pages_for_budget(fmt, model.cfg, cache_bytes=budget, slots=config.slots,
                                       page_len=config.page_len, max_len=config.max_len,
                                       data=axes["data"], model=axes["model"],
                                       strategy=config.strategy)
    except ValueError as e:
      raise ConfigError("hbm_gib", str(e)) from None
    try:  # Before the engine compiles its step.
      serving.check_trace(trace, max_len=config.max_len, page_len=config.page_len,
                          num_pages=pages, vocab_size=model.cfg.vocab_size,
                          shards=shards, model_shards=model_shards)
    except ValueError as e:
      raise ConfigError("hbm_gib" if "pages" in str(e) else "trace",
                        f"kv_format={fmt}: {e}") from None
    pools[fmt] = pages
  exact = lockstep(kv_format=EXACT) if config.exact_reference else None
  rows, results, locked = [], {}, {}
  for fmt, pages in pools.items():
    engine = serving.Engine(model, kv_format=fmt, slots=config.slots, num_pages=pages,
                            **engine_args)
    result = engine.run(trace)
    results[fmt] = result
    # An f32 format among kv_formats is the exact reference's run: not served twice.
    locked[fmt] = exact if fmt == EXACT and exact is not None else lockstep(kv_format=fmt)
    ref = config.kv_formats[0]
    match = serving.compare_outputs(locked[ref], locked[fmt])
    served = serving.compare_outputs(results[ref], result)
    vs_exact = serving.compare_outputs(exact, locked[fmt]) if exact is not None else None
    row = dict(kv_format=fmt, model=model.cfg.name, weight_precision=model.weight_precision,
               backend=jax.default_backend(), impl=config.impl, mesh=config.mesh,
               strategy=None if sharding is None else sharding.resolved(model.cfg.num_kv_heads),
               trace=trace.name,
               trace_sha256=trace.sha256, weight_bytes=weights, cache_budget_bytes=budget,
               num_pages=pages, usable_pages=pages - blocks, page_len=config.page_len,
               slots=config.slots,
               cache_bytes=engine.cache.nbytes, cache_bytes_per_device=(
                   engine.cache.nbytes if sharding is None
                   else sharding.per_device_bytes(engine.cache)), **result.summary(),
               reference=ref, identical=match["identical"],
               share_identical=match["share_identical"],
               median_first_difference=match["median_first_difference"],
               served_identical=served["identical"],
               served_share_identical=served["share_identical"],
               exact_reference=EXACT if exact is not None else None,
               identical_to_exact=None if vs_exact is None else vs_exact["identical"],
               share_identical_to_exact=None if vs_exact is None else vs_exact["share_identical"])
    rows.append(row)
    n = match["requests"]
    out(f"serve {fmt}: {pages - blocks} pages, {row['mean_concurrency_saturated']:.2f} requests "
        f"in flight on average while requests waited (peak "
        f"{row['peak_concurrency_saturated']}), preemptions {row['preemptions']}, "
        f"{row['tokens_per_s']:.1f} tok/s, TTFT p50 {row['ttft_p50_s']:.2f} s; outputs "
        f"identical to {ref}'s: {match['identical']}/{n} in lockstep, {served['identical']}/{n} "
        "as served" + ("" if vs_exact is None else
                       f"; to the {EXACT} cache's: {vs_exact['identical']}/{n}"))
  base = rows[0]["mean_concurrency_saturated"]
  for row in rows:
    row["concurrency_vs_reference"] = (row["mean_concurrency_saturated"] / base if base
                                       else None)
  return rows, results, locked


def _write(workdir: Path, config: ServeConfig, trace: traffic.Trace, rows: list[dict],
           results: dict[str, Any], locked: dict[str, Any]) -> None:
  reports.write_jsonl(rows, workdir / "results.jsonl")
  per_request = [dict(kv_format=fmt, id=s.request.id, arrival_s=s.request.arrival_s,
                      prompt_tokens=s.request.prompt_len, tokens=s.tokens, stopped=s.stopped,
                      admitted_s=s.admitted_s, first_token_s=s.first_token_s,
                      finished_s=s.finished_s, preemptions=s.preemptions,
                      lockstep_tokens=q.tokens)
                 for fmt, r in results.items()
                 for s, q in zip(r.requests, locked[fmt].requests, strict=True)]
  reports.write_jsonl(per_request, workdir / "requests.jsonl")
  # One point per step: lines without markers.
  series = [reports.Series(fmt, [s.start_s for s in r.steps], [s.live for s in r.steps],
                           style=dataclasses.replace(reports.style_of(fmt), marker=""))
            for fmt, r in results.items()]
  figure = reports.plot_series(workdir / "inflight.png", series, kind="line",
                               title=f"Requests in flight, {rows[0]['model']}",
                               xlabel="time (s, this machine's steps)",
                               ylabel="requests in flight", xscale="linear", yscale="linear")
  ref = config.kv_formats[0]
  ms = lambda x: "-" if x is None else f"{x * 1e3:.0f}"  # noqa: E731
  ratio = lambda x: "-" if x is None else f"{x:.2f}x"  # noqa: E731
  share = lambda k, n: "-" if k is None else f"{k}/{n} ({100 * k / n:.0f}%)"  # noqa: E731
  capacity = [[r["kv_format"], r["usable_pages"], f"{r['mean_concurrency_saturated']:.2f}",
               ratio(r["concurrency_vs_reference"]),
               f"{r['mean_concurrency_before_preemption']:.2f}", r["peak_concurrency"],
               r["preemptions"], f"{r['tokens_per_s']:.1f}",
               f"{ms(r['ttft_p50_s'])} / {ms(r['ttft_p99_s'])}",
               f"{ms(r['tpot_p50_s'])} / {ms(r['tpot_p99_s'])}", r["peak_pages"]]
              for r in rows]
  outputs = [[r["kv_format"], share(r["identical"], r["requests"]),
              "-" if r["median_first_difference"] is None else r["median_first_difference"],
              share(r["served_identical"], r["requests"]),
              share(r["identical_to_exact"], r["requests"])] for r in rows]
  d = trace.disclosure()
  text = [
      f"# Serving: {rows[0]['model']}\n",
      f"Weights: {rows[0]['weight_precision']} ({rows[0]['weight_bytes'] / 2**20:.3f} MiB). "
      f"KV cache: each format below, on a pool of what {config.hbm_gib:g} GiB leaves after "
      f"the weights and {config.workspace_gib:g} GiB of workspace "
      f"({rows[0]['cache_budget_bytes'] / 2**20:.3f} MiB), pages of {config.page_len} "
      f"positions, {config.slots} slots, prompt chunks of {config.chunk}; impl "
      f"{config.impl} on {rows[0]['backend']}"
      + ("" if rows[0]["strategy"] is None else
         f", mesh {config.mesh} (kv heads: {rows[0]['strategy']}; budgets per device)")
      + f". Greedy: {config.sampling.temperature == 0}.\n",
      f"Trace: {d['description']} (`{d['name']}`, sha256 `{d['sha256'][:16]}`, "
      f"{d['prompt_tokens']} prompt tokens"
      + (f"; filler {d['filler']['name']}, token sha256 "
         f"`{d['filler']['token_sha256'][:16]}`" if d.get("filler") else "") + ").\n",
      "## Capacity under the trace\n",
      "Concurrency is time-weighted over steps: while requests waited for a slot or pages "
      "(what the pool sustains under the load), and before the first preemption.\n",
      reports.markdown_table(
          ["kv format", "usable pages", "mean in flight while requests wait", f"vs {ref}",
           "mean before first preemption", "peak", "preemptions", "tok/s",
           "TTFT p50 / p99 (ms)", "TPOT p50 / p99 (ms)", "peak pages"], capacity),
      "\nTimes are on this machine's clock: each step advances it by its measured time "
      "(compiles excluded), so the latencies are this machine's, not a TPU's.\n",
      figure.markdown("requests in flight", "Requests in flight at each step, per format."),
      "\n## Outputs\n",
      f"Requests whose output equals {ref}'s token for token, served in lockstep "
      "(`kvtpu.models.serving.lockstep`: a schedule that depends on the trace alone, so the "
      "difference is the cache's) and as served under the trace (where the step's float "
      "rounding also follows the schedule), and equals an "
      f"{EXACT} cache's in lockstep (the reference's own distance from exact K/V). The "
      "first difference is the output index where a differing request first departs, "
      "median over those.\n",
      reports.markdown_table(
          ["kv format", f"identical to {ref}", "median first difference",
           f"identical to {ref} as served", f"identical to {EXACT}"], outputs),
  ]
  reports.write_text(workdir / "report.md", "\n".join(text) + "\n")


def run(config: ServeConfig, workdir: str | os.PathLike | None = None,
        out: Callable[[str], Any] = print, *, overwrite: bool = False) -> list[dict]:
  """Loads the model, builds the trace, serves it on each format and writes the workdir."""
  if workdir is not None:
    workdir = check_workdir(workdir, config, overwrite=overwrite)
  model, tokenizer = load_pretrained(config.model, param_dtype=jnp.dtype(config.param_dtype))
  check_head_dim("kv_formats", config.kv_formats, model.cfg.head_dim,
                 f"of model {model.cfg.name}")
  check(config.max_len <= model.cfg.max_position, "max_len",
        f"{config.max_len} exceeds model {model.cfg.name}'s {model.cfg.max_position} positions")
  trace = load_trace(config, tokenizer)
  if workdir is not None:
    workdir = start(workdir, config, weight_precision=model.weight_precision,
                    trace=trace.disclosure())
  rows, results, locked = serve_formats(model, tokenizer, trace, config, out=out)
  if workdir is not None:
    _write(Path(workdir), config, trace, rows, results, locked)
  ref = rows[0]["kv_format"]
  out(f"serve: requests in flight while requests waited, vs {ref}: "
      + ", ".join(f"{r['kv_format']} {r['concurrency_vs_reference']:.2f}x" for r in rows[1:]
                  if r["concurrency_vs_reference"] is not None)
      + f"; outputs identical to {ref}'s in lockstep: "
      + ", ".join(f"{r['kv_format']} {100 * r['share_identical']:.0f}%" for r in rows[1:])
      + ("" if workdir is None else f"; report: {Path(workdir) / 'report.md'}"))
  return rows
