"""Continuous batching on the paged cache: requests join and leave a running batch.

`Engine(model, kv_format=..., slots=B, num_pages=P, page_len=Z, chunk=C)` serves a
`kvtpu.eval.traffic.Trace`: a fixed batch of B slots over one paged cache of P pages,
a host-side scheduler, and one jitted step.

Each request's *context* is its prompt followed by the tokens generated so far; `fed`
of them are in the cache. A step feeds every live request the next
min(C, len(context) - fed) tokens of its context (a prompt chunk, or the one token
generated last: prefill and decode in the same step), and a request whose context is
then all in the cache takes the token the step sampled from its last position. So one
rule covers prefill, chunked prefill, decode and recompute after preemption.

The step has two shapes, `[B, C]` (some request is prefilling) and `[B, 1]` (every
live request decodes), each compiled once, when the engine is built
(`compiled_shapes`; engines of equal shapes share them), however many requests are
served and however the mix changes: rows without a request feed 0
tokens (nothing written, their cache row does not advance).

Scheduling, at each step on the engine's clock:

  * arrivals (`arrival_s <= clock`) queue in arrival order; when nothing is live or
    waiting the clock jumps to the next arrival;
  * the oldest waiting request takes a free slot (its row reset) if the free pages,
    after what the live requests' unfed contexts will take, hold its whole context
    (a sharded pool: the free pages of the blocks that slot draws from; of the slots
    that fit, the one with the most pages left);
  * before the step, every live request reserves pages for the tokens it is fed, in
    arrival order; when the pool (a block) runs out, the live request that arrived last
    among those holding pages there (of that data shard) is preempted, or the
    reserving request itself if it is the latest: its pages are freed and it waits at
    the head of the queue (in arrival order among the preempted), keeping the tokens it
    generated, which are recomputed from its context when it is readmitted (greedy
    outputs are unchanged by it);
  * a request finishes at a stop id (unless its budget is an exact output length) or
    at its budget; its pages and slot are freed at once.

The clock advances by each step's measured wall time (after `block_until_ready`;
both shapes are compiled before the first request arrives, so compiles are not
served time). Arrival times are thus honoured on any machine, and latencies are
those of this machine's steps.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from kvtpu.models.generation import Sampling, sample_logits
from kvtpu.models.sharding import param_shardings

import kvtpu
from kvtpu.attention import IMPLS
from kvtpu.eval.traffic import Request, Trace
from kvtpu.paging import OutOfPages, PageAllocator
from kvtpu.sharding import CacheSharding, per_device_bytes, resolve_strategy

__all__ = ["Engine", "Served", "StepRecord", "ServeResult", "TRACE_COUNTS", "compare_outputs",
           "lockstep", "pages_for_budget", "pool_blocks"]

# Traces of the step by its width: each is a compile (tests check the bound).
TRACE_COUNTS: collections.Counter[int] = collections.Counter()


@functools.partial(jax.jit, static_argnames=("graphdef", "impl", "cache_sharding"),
                   donate_argnames=("cache",))
def _step(graphdef, state, cache, table, reset, tokens, valid, key, draws, sampling, *, impl,
          cache_sharding):
  """Resets the `reset` rows, feeds `tokens[b, :valid[b]]`, samples each row's next token
  from its last fed position with the key `key` folded with `draws[b]` (its request and
  token index). Returns `(next i32[B], cache)`; a sharded cache stays in its layout."""
  TRACE_COUNTS[tokens.shape[1]] += 1
  model = nnx.merge(graphdef, state)
  cache = cache.with_page_table(table).reset(reset)
  logits, cache = model(tokens, cache, valid_len=valid, impl=impl,
                        logits_at=jnp.maximum(valid - 1, 0), cache_sharding=cache_sharding)
  if cache_sharding is not None:
    cache = jax.lax.with_sharding_constraint(cache, cache_sharding.shardings(cache))
  keys = jax.vmap(lambda d: jax.random.fold_in(jax.random.fold_in(key, d[0]), d[1]))(draws)
  nxt = jax.vmap(lambda x, k: sample_logits(x[None], k, sampling)[0])(logits[:, 0], keys)
  return nxt, cache


@dataclasses.dataclass
class Served:
  """One request's course through the engine (times on the engine's clock, seconds).

  Attributes:
    request: the trace's request.
    tokens: the generated ids (up to and including a stop id).
    stopped: ended at a stop id (False: at its budget).
    admitted_s: when it first took a slot; first_token_s: when its first token was
      sampled; finished_s: when its last was.
    preemptions: how often it lost its pages and was recomputed.
  """

  request: Request
  tokens: list[int] = dataclasses.field(default_factory=list)
  stopped: bool = False
  admitted_s: float | None = None
  first_token_s: float | None = None
  finished_s: float | None = None
  preemptions: int = 0

  @property
  def ttft_s(self) -> float:
    """Time to first token, from arrival."""
    return self.first_token_s - self.request.arrival_s

  @property
  def tpot_s(self) -> float | None:
    """Time per output token after the first (None for a single token)."""
    n = len(self.tokens)
    return None if n < 2 else (self.finished_s - self.first_token_s) / (n - 1)


@dataclasses.dataclass(frozen=True)
class StepRecord:
  """One step: its start on the clock, duration, width (C or 1), live requests, requests
  that had arrived but waited for a slot or pages, tokens fed (prompt or recomputed
  context, and decode), pages in use after reserving, and the requests preempted
  before it."""

  start_s: float
  seconds: float
  width: int
  live: int
  waiting: int
  prefill_tokens: int
  decode_tokens: int
  pages_in_use: int
  preempted: int


@dataclasses.dataclass
class ServeResult:
  """What `Engine.run` served: per request (trace order) and per step."""

  requests: list[Served]
  steps: list[StepRecord]
  compiled_shapes: int

  @property
  def duration_s(self) -> float:
    """From the first arrival to the end of the last step."""
    if not self.steps:
      return 0.0
    first = min(s.request.arrival_s for s in self.requests)
    return self.steps[-1].start_s + self.steps[-1].seconds - first

  @property
  def generated_tokens(self) -> int:
    return sum(len(s.tokens) for s in self.requests)

  @property
  def preemptions(self) -> int:
    return sum(s.preemptions for s in self.requests)

  def tokens_per_s(self) -> float:
    """Generated tokens per second from the first arrival to the end (idle gaps between
    arrivals included)."""
    return self.generated_tokens / self.duration_s

  def concurrency(self, window: str = "all") -> tuple[int, float]:
    """Peak live requests, and their mean over the steps' time (idle gaps excluded), over
    the steps of `window`:

      "all": every step.
      "saturated": the steps at whose start requests that had arrived were waiting
        (for a slot or for pages): what the cache sustains under the trace's load, the
        same window for every format whatever its preemptions.
      "before_preemption": the steps before the first that preempted (every step when
        none did).

    (0, 0.0) when the window holds no step.
    """
    steps = self.steps
    if window == "saturated":
      steps = [s for s in steps if s.waiting]
    elif window == "before_preemption":
      steps = steps[:next((i for i, s in enumerate(steps) if s.preempted), len(steps))]
    elif window != "all":
      raise ValueError(f"window must be 'all', 'saturated' or 'before_preemption', got "
                       f"{window!r}")
    busy = sum(s.seconds for s in steps)
    if not steps or busy <= 0:
      return 0, 0.0
    return max(s.live for s in steps), sum(s.live * s.seconds for s in steps) / busy

  def summary(self) -> dict[str, float | int | None]:
    """The figures a serving report gives, as one flat row."""
    ttft = [s.ttft_s for s in self.requests]
    tpot = [t for t in (s.tpot_s for s in self.requests) if t is not None]
    peak, mean = self.concurrency()
    peak_saturated, mean_saturated = self.concurrency("saturated")
    peak_before, mean_before = self.concurrency("before_preemption")
    q = lambda xs, p: float(np.percentile(xs, p)) if xs else None  # noqa: E731
    return {"requests": len(self.requests), "generated_tokens": self.generated_tokens,
            "duration_s": self.duration_s, "tokens_per_s": self.tokens_per_s(),
            "peak_concurrency": peak, "mean_concurrency": mean,
            "peak_concurrency_saturated": peak_saturated,
            "mean_concurrency_saturated": mean_saturated,
            "saturated_seconds": sum(s.seconds for s in self.steps if s.waiting),
            "peak_concurrency_before_preemption": peak_before,
            "mean_concurrency_before_preemption": mean_before,
            "preemptions": self.preemptions,
            "preempted_requests": sum(1 for s in self.requests if s.preemptions),
            "ttft_p50_s": q(ttft, 50), "ttft_p99_s": q(ttft, 99),
            "tpot_p50_s": q(tpot, 50), "tpot_p99_s": q(tpot, 99),
            "peak_pages": max(s.pages_in_use for s in self.steps), "steps": len(self.steps),
            "compiled_shapes": self.compiled_shapes}


def compare_outputs(reference: ServeResult, other: ServeResult) -> dict[str, object]:
  """How `other`'s outputs match `reference`'s, request by request (by id): the share
  identical token for token, and where each differing one first differs (its index in
  the output; a prefix of the other counts as differing at the shorter length)."""
  ref = {s.request.id: s.tokens for s in reference.requests}
  got = {s.request.id: s.tokens for s in other.requests}
  if ref.keys() != got.keys():
    raise ValueError("the two results served different requests: "
                     f"{sorted(ref.keys() ^ got.keys())[:5]}")
  first = {}
  for rid, want in ref.items():
    have = got[rid]
    if have != want:
      first[rid] = next((i for i, (a, b) in enumerate(zip(want, have, strict=False))
                         if a != b),
                        min(len(want), len(have)))
  return {"requests": len(ref), "identical": len(ref) - len(first),
          "share_identical": (len(ref) - len(first)) / len(ref),
          "first_difference": first,
          "median_first_difference": float(np.median(list(first.values()))) if first else None}


def pool_blocks(cache_sharding: CacheSharding | None, kv_heads: int) -> tuple[int, int]:
  """`(shards, model_shards)`: how a paged pool on this mesh splits into blocks, each
  with its own null page (`kvtpu.paging.PageAllocator`): one per data shard, times the
  model axis under `"sequence"`; `(1, 1)` unsharded."""
  if cache_sharding is None:
    return 1, 1
  sequence = cache_sharding.resolved(kv_heads) == "sequence"
  return cache_sharding.data, cache_sharding.model if sequence else 1


def lockstep(model, trace: Trace, *, kv_format, slots: int, page_len: int, max_len: int,
             cache_sharding: CacheSharding | None = None, **engine_args) -> ServeResult:
  """Serves `trace` in a schedule that depends on the trace alone: its requests in
  arrival order, in groups of `slots` that arrive together on a pool holding every
  request's whole context (no waiting, no preemption). Each group prefills in the same
  steps and decodes in lockstep, so two formats compute every token in the same step
  shapes and batch rows, and their outputs differ by the cache alone. (Under traffic,
  when a request shares a step with which others, and in which of the two shapes, follows
  step times; the step's float rounding then differs a little with the schedule.)

  `engine_args`: `Engine`'s other arguments (chunk, stop_ids, sampling, seed, impl,
  calibration). Sampled tokens are drawn with the keys serving gives them (each
  request's arrival index in the whole trace). The pool holds `slots` whole requests,
  whatever a served run's budget. The steps' times restart at 0 with each group: the
  result is for comparing outputs, not for its timing figures.
  """
  blocks = math.prod(pool_blocks(cache_sharding, model.cfg.num_kv_heads))
  engine = Engine(model, kv_format=kv_format, slots=slots, page_len=page_len, max_len=max_len,
                  num_pages=slots * (max_len // page_len) + blocks,
                  cache_sharding=cache_sharding, **engine_args)
  served, steps = [], []
  for start in range(0, len(trace.requests), slots):
    group = Trace(trace.name, trace.description, tuple(
        dataclasses.replace(r, arrival_s=0.0) for r in trace.requests[start:start + slots]))
    result = engine.run(group, first_order=start)  # Each group's clock starts at 0.
    served += result.requests
    steps += result.steps
  return ServeResult(served, steps, engine.compiled_shapes)


def check_trace(trace: Trace, *, max_len: int, page_len: int, num_pages: int,
                vocab_size: int, shards: int = 1, model_shards: int = 1) -> None:
  """Raises ValueError for a request an engine of these dimensions can never serve: a
  token id outside the vocabulary, more positions than max_len (prompt + budget), or
  more pages than the pool's usable ones (the last generated token is never written:
  prompt + budget - 1 positions). A pool split into `shards` x `model_shards` blocks
  (`kvtpu.paging.PageAllocator`) holds a request in one data shard's blocks, its
  positions' pages spread over the model shards' blocks in order."""
  blocks = shards * model_shards
  usable = num_pages // blocks - 1  # Per block.
  columns = (max_len // page_len) // model_shards  # Table columns per model shard.
  for r in trace.requests:
    if int(r.prompt.max()) >= vocab_size:
      raise ValueError(f"request {r.id!r} holds token id {int(r.prompt.max())}, outside the "
                       f"model's vocabulary of {vocab_size}")
    need = r.prompt_len + r.max_new_tokens
    if need > max_len:
      raise ValueError(f"request {r.id!r} needs {need} positions (prompt {r.prompt_len} + "
                       f"budget {r.max_new_tokens}), more than max_len={max_len}")
    pages = -(-(need - 1) // page_len)
    if min(pages, columns) > usable:  # The first block takes the most.
      where = "the pool's" if blocks == 1 else f"a pool block's (of {blocks})"
      raise ValueError(f"request {r.id!r} needs {min(pages, columns)} pages"
                       f"{'' if blocks == 1 else ' of one block'}, more than {where} {usable} "
                       "usable pages")


def pages_for_budget(fmt, cfg, *, cache_bytes: int, slots: int, page_len: int,
                     max_len: int, data: int = 1, model: int = 1, strategy: str = "auto") -> int:
  """The most pages (the null pages included) a paged cache of `fmt` for a model of
  `cfg` holds within `cache_bytes` per device: the slots' own arrays (windows, page
  tables, lengths) come first, the pool takes the rest (`kvtpu.memory.cache_bytes`,
  exact; `kvtpu.sharding.per_device_bytes` on a `data` x `model` mesh, where the pool is
  a multiple of its blocks: D, or D x M under `"sequence"`).

  Raises:
    ValueError: when the slots' arrays and two pages per block (the null page and one)
      do not fit.
  """
  blocks = data * (model if resolve_strategy(strategy, kv_heads=cfg.num_kv_heads,
                                             model=model) == "sequence" else 1)

  def size(n: int) -> int:  # n pages per block.
    return per_device_bytes(fmt, num_layers=cfg.num_layers, batch=slots,
                            kv_heads=cfg.num_kv_heads, max_len=max_len, head_dim=cfg.head_dim,
                            data=data, model=model, strategy=strategy, page_len=page_len,
                            num_pages=n * blocks)

  base = size(2)
  if base > cache_bytes:
    per = "" if blocks == 1 else " per block"
    raise ValueError(
        f"kv_format={kvtpu.KVFormat.parse(fmt).name}: {slots} slots and two pages{per} of "
        f"{page_len} positions take {base / 2**20:.1f} MiB (windows, tables and per-sequence "
        f"arrays included), more than the cache budget of {cache_bytes / 2**20:.1f} MiB")
  n = 2 + (cache_bytes - base) // (size(3) - base)
  while size(n) > cache_bytes:  # int4 arrays round up per tensor.
    n -= 1
  return int(n * blocks)


@dataclasses.dataclass
class _Live:
  served: Served
  context: list[int]
  order: int  # Arrival order: the latest-arrived live request is preempted first.
  slot: int = -1
  fed: int = 0
  reset: bool = True
  decoding: bool = False  # Its next fed token is the one generated last step.


class Engine:
  """A continuous-batching server of one model on one paged cache (see the module doc).

  Args:
    model: a `kvtpu.models.Llama`.
    kv_format: the cache's format (any `KVFormat` name or scheme).
    slots: B, requests in flight at most (the step's batch).
    num_pages, page_len: the pool (page 0 is the null page: P - 1 usable; sharded, each
      block's first page: P minus the blocks).
    max_len: positions per request at most (a multiple of page_len): prompt + budget
      of every request must fit.
    chunk: C, prompt tokens fed per request per step at most.
    stop_ids: ids that end a request (unless its budget is an exact length).
    sampling: `models.Sampling` (greedy by default); seed: its draws. A request's i-th
      token is drawn with the seed's key folded with (its arrival index, i), so sampled
      outputs do not depend on the schedule, the batch or preemption.
    impl: `kvtpu.attend` implementation.
    calibration: the `CalibrationArtifact` of a static format (made on this model).
    cache_sharding: serve on a mesh (`kvtpu.sharding.CacheSharding`): the cache in its
      sharded layout (slots over the data axis, each data shard with its own block of
      the pool; kv heads or, under `"sequence"`, positions over the model axis), the
      weights tensor-parallel over the model axis (`kvtpu.models.sharding`). A
      request's pages come from its slot's blocks, so admission picks a free slot whose
      blocks hold its context, and a block that runs out preempts the latest-arrived
      live request of its data shard. num_pages counts the whole pool (a multiple of
      the blocks).
  """

  def __init__(self, model, *, kv_format, slots: int, num_pages: int, page_len: int,
               max_len: int, chunk: int = 64, stop_ids: Sequence[int] = (),
               sampling: Sampling | None = None, seed: int = 0, impl: str = "auto",
               calibration=None, cache_sharding: CacheSharding | None = None):
    for name, value, low in (("slots", slots, 1), ("chunk", chunk, 1), ("page_len", page_len, 1),
                             ("num_pages", num_pages, 2), ("max_len", max_len, 1)):
      if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {name}={value!r}")
    if impl not in IMPLS:
      raise ValueError(f"impl must be one of {IMPLS}, got impl={impl!r}")
    if chunk > max_len:
      raise ValueError(f"chunk={chunk} must be <= max_len={max_len}")
    if max_len > model.cfg.max_position:
      raise ValueError(f"max_len={max_len} exceeds the model's {model.cfg.max_position} "
                       "positions")
    if cache_sharding is not None and not isinstance(cache_sharding, CacheSharding):
      raise TypeError("cache_sharding must be a kvtpu.sharding.CacheSharding or None, got "
                      f"{type(cache_sharding).__name__}")
    if cache_sharding is not None and jax.sharding.AxisType.Explicit in (
        cache_sharding.mesh.axis_types):
      raise ValueError("cache_sharding.mesh must have Auto axes (the model's layers leave "
                       "their shardings to the compiler), got axis_types="
                       f"{cache_sharding.mesh.axis_types}: build it with jax.make_mesh(..., "
                       "axis_types=(jax.sharding.AxisType.Auto,) * 2) or "
                       "kvtpu.models.headroom.make_mesh")
    self.model, self.impl, self.cache_sharding = model, impl, cache_sharding
    self.graphdef, self.state = nnx.split(model)
    self.slots, self.chunk = slots, chunk
    self.sampling = Sampling() if sampling is None else sampling
    self.key = jax.random.key(seed)
    self.stop_ids = frozenset(int(i) for i in stop_ids)
    cfg = model.cfg
    if calibration is not None:
      calibration.check_compatible(num_layers=cfg.num_layers, kv_heads=cfg.num_kv_heads,
                                   head_dim=cfg.head_dim, model_name=cfg.name)
    dims = dict(num_layers=cfg.num_layers, batch=slots, kv_heads=cfg.num_kv_heads,
                max_len=max_len, head_dim=cfg.head_dim, page_len=page_len,
                num_pages=num_pages, calibration=calibration)
    if cache_sharding is None:
      self.cache = kvtpu.KVCache.init(kv_format, **dims)
      self.allocator = PageAllocator.for_cache(self.cache)
    else:
      # The layout's checks (slots and pages divisible by the shards, the strategy's
      # fit) on the abstract cache, before anything is allocated or compiled.
      self.allocator = cache_sharding.allocator(jax.eval_shape(
          functools.partial(kvtpu.KVCache.init, kv_format, **dims)))
      self.cache = cache_sharding.init(kv_format, **dims)
      self.state = jax.device_put(self.state, param_shardings(self.state, cache_sharding.mesh,
                                                              model_axis=cache_sharding.model_axis))
    self.widths = sorted({chunk, 1})
    for width in self.widths:  # Every shape compiled before any request is served.
      self._run_step(np.zeros((slots, width), np.int32), np.zeros(slots, np.int32),
                     np.zeros(slots, bool), np.zeros((slots, 2), np.int32))

  @property
  def fmt(self) -> kvtpu.KVFormat:
    return self.cache.fmt

  def _run_step(self, tokens, valid, reset, draws) -> np.ndarray:
    nxt, self.cache = _step(self.graphdef, self.state, self.cache,
                            jnp.asarray(self.allocator.table), jnp.asarray(reset),
                            jnp.asarray(tokens), jnp.asarray(valid), self.key,
                            jnp.asarray(draws), self.sampling, impl=self.impl,
                            cache_sharding=self.cache_sharding)
    return np.asarray(jax.block_until_ready(nxt))

  @property
  def compiled_shapes(self) -> int:
    """The step's shapes: [B, C] and [B, 1] (one when C is 1)."""
    return len(self.widths)

  def check(self, trace: Trace) -> None:
    """Raises for a request the engine can never serve (`check_trace`)."""
    a = self.allocator
    check_trace(trace, max_len=self.cache.max_len, page_len=self.cache.page_len,
                num_pages=a.num_pages, vocab_size=self.model.cfg.vocab_size, shards=a.shards,
                model_shards=a.model_shards)

  def _blocks(self, slot: int, tokens: int) -> collections.Counter[int]:
    """Pages per pool block that `slot` needs, beyond those it holds, for `tokens`
    positions."""
    a = self.allocator
    return collections.Counter(a.block_of(slot, w)
                               for w in range(a.held(slot), a.pages_for(tokens)))

  def run(self, trace: Trace, *, check_pages: bool = False, first_order: int = 0
          ) -> ServeResult:
    """Serves every request of `trace` to its end.

    Args:
      check_pages: check the allocator's invariants, and that the pages in use are
        those the live requests hold, at every step (tests).
      first_order: the arrival index of the trace's first request (its sampling key's;
        a trace served in parts continues the count).
    """
    self.check(trace)
    a = self.allocator
    served = [Served(r) for r in trace.requests]
    arrivals = collections.deque(served)
    waiting: collections.deque[_Live] = collections.deque()
    live: dict[int, _Live] = {}  # slot -> request
    steps: list[StepRecord] = []
    clock, arrived = 0.0, first_order
    while arrivals or waiting or live:
      while arrivals and arrivals[0].request.arrival_s <= clock:
        s = arrivals.popleft()
        waiting.append(_Live(s, list(map(int, s.request.prompt)), arrived))
        arrived += 1
      if not live and not waiting:
        clock = arrivals[0].request.arrival_s
        continue
      # Admit the oldest waiting requests while a slot is free and the free pages hold
      # their whole contexts after the live requests' unfed contexts (output growth
      # beyond that is what preemption handles).
      # A sharded pool: a slot takes pages from its own blocks; of the free slots whose
      # blocks hold the context, the one with the most free pages left (the lowest index
      # among equals) is taken.
      free_slots = [b for b in range(self.slots) if b not in live]
      committed = collections.Counter()
      for b, w in live.items():
        committed.update(self._blocks(b, len(w.context)))
      while waiting and free_slots:
        best, room = None, -1
        for b in free_slots:
          need = self._blocks(b, len(waiting[0].context))
          left = min((a.free_pages(k) - committed[k] - n for k, n in need.items()), default=0)
          if left >= 0 and left > room:
            best, room = b, left
        if best is None:
          break
        w = waiting.popleft()
        free_slots.remove(best)
        w.slot, w.fed, w.reset, w.decoding = best, 0, True, False
        if w.served.admitted_s is None:
          w.served.admitted_s = clock
        live[w.slot] = w
        committed.update(self._blocks(best, len(w.context)))
      # Reserve this step's pages, oldest first; preempt the newest when they run out.
      preempted = 0
      for w in sorted(live.values(), key=lambda w: w.order):
        if w.slot not in live:
          continue  # Preempted below for an older request.
        while True:
          try:
            a.reserve(w.slot, w.fed + min(self.chunk, len(w.context) - w.fed))
            break
          except OutOfPages as e:
            # The latest-arrived request holding pages in the block that ran out, or
            # `w` itself.
            victim = max((v for v in live.values() if v is w or a.holds_in(v.slot, e.shard)),
                         key=lambda v: v.order)
            a.release(victim.slot)
            del live[victim.slot]
            victim.served.preemptions += 1
            victim.slot, victim.fed, victim.decoding = -1, 0, False
            # Back at the head of the queue, in arrival order among the preempted.
            at = next((i for i, q in enumerate(waiting) if q.order > victim.order), len(waiting))
            waiting.insert(at, victim)
            preempted += 1
            if victim is w:
              break
      if not live:  # Everything was preempted: an admission needs pages first.
        raise RuntimeError("no live request can reserve its next pages; the pool is too small "
                           "for one request's chunk")  # check() makes this unreachable.
      feed = {b: w.context[w.fed:w.fed + self.chunk] for b, w in live.items()}
      width = 1 if all(len(f) == 1 for f in feed.values()) else self.chunk
      tokens = np.zeros((self.slots, width), np.int32)
      valid = np.zeros(self.slots, np.int32)
      reset = np.zeros(self.slots, bool)
      draws = np.zeros((self.slots, 2), np.int32)  # (request, token index): its sample's key.
      for b, f in feed.items():
        w = live[b]
        tokens[b, :len(f)], valid[b], reset[b] = f, len(f), w.reset
        draws[b] = w.order, len(w.served.tokens)
      if check_pages:
        a.check()
        held = sum(a.held(b) for b in live)
        assert a.pages_in_use == held, (a.pages_in_use, held)
      begin = time.perf_counter()
      nxt = self._run_step(tokens, valid, reset, draws)
      seconds = time.perf_counter() - begin
      # Decode tokens: the one token generated last (recomputed context counts as prefill).
      decode = sum(1 for w in live.values() if w.decoding)
      steps.append(StepRecord(clock, seconds, width, len(live), len(waiting),
                              int(valid.sum()) - decode, decode, a.pages_in_use, preempted))
      clock += seconds
      for b, w in list(live.items()):
        w.fed += len(feed[b])
        w.reset = False
        if w.fed < len(w.context):
          continue  # Still prefilling (or recomputing).
        token = int(nxt[b])
        w.decoding = True
        s, r = w.served, w.served.request
        s.tokens.append(token)
        w.context.append(token)
        if s.first_token_s is None:
          s.first_token_s = clock
        s.stopped = not r.exact_length and token in self.stop_ids
        if s.stopped or len(s.tokens) == r.max_new_tokens:
          s.finished_s = clock
          a.release(b)
          del live[b]
    if check_pages:
      a.check()
      assert a.pages_in_use == 0
      # No write was dropped at a row's capacity, and no error bit was set.
      assert not np.asarray(self.cache.overflow).any()
      assert not any(v.any() for v in self.cache.error_flags().values())
    return ServeResult(served, steps, self.compiled_shapes)
