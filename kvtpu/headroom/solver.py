"""Memory headroom: the longest context and the most concurrent sequences that fit.

For a deployment (model shape, weights per device, chip, mesh) and each KV format
(or layer plan: formats per layer, `kvtpu.LayerPlan`), the solver finds the largest
`max_len` (in steps of `block` positions) at a given concurrency, and the largest
batch (in steps of the data axis) at a given context, such that on every device

    weights + KV cache + the decode step's temporaries + other <= HBM * (1 - reserve)

How a point is measured is a `Measure`: `analytic` here (closed forms:
`sharding.per_device_bytes` for the cache, the weights the caller counted, and the
logits as the decode step's one large temporary), or the compiled (`aot`) and
executed (`live`) decode steps of `kvtpu.models.headroom`. The search needs only that the
bytes grow with the searched quantity; it interpolates from measured points, so an
expensive measure (a compile, a run) is called a handful of times per answer, and
every answer comes with the point just past it that does not fit (`oom`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

from kvtpu import memory, sharding
from kvtpu.formats import KVFormat, LayerPlan

__all__ = ["EFFECTIVE_BITS_CONTEXT", "Usage", "Deployment", "Measure", "analytic_usage", "max_fit", "Answer", "max_context",
           "answer_rows", "max_concurrency", "padded_batch", "sweep", "DEFAULT_RESERVE",
           "MAX_CONTEXT_LIMIT", "MAX_BATCH_LIMIT"]

DEFAULT_RESERVE = 0.05  # of HBM, for the runtime, fragmentation and anything unaccounted.
MAX_CONTEXT_LIMIT = 1 << 24  # positions: the search stops here (16M tokens).
MAX_BATCH_LIMIT = 1 << 16  # sequences.
# Result rows give each format's effective bits per stored value at this context
# (`memory.effective_bits`: values, per-token scales and zero points, windows; a layer
# plan's mean over its layers, `memory.plan_effective_bits`).
EFFECTIVE_BITS_CONTEXT = 8192


@dataclasses.dataclass(frozen=True)
class Usage:
  """Bytes one device needs for a decode step (the most loaded device).

  Attributes:
    weights, cache: the step's weight and KV-cache arguments.
    temp: the step's temporaries.
    other: the rest (program code, padding of arguments, small inputs and outputs).
    oom: the measure itself ran out of memory (a compile or an allocation failed);
      the byte figures are then what it reported needing, or lower bounds.
  """

  weights: int
  cache: int
  temp: int
  other: int = 0
  oom: bool = False

  @property
  def total(self) -> int:
    return self.weights + self.cache + self.temp + self.other


@dataclasses.dataclass(frozen=True)
class Deployment:
  """What the headroom depends on besides the KV format.

  Attributes:
    num_layers, kv_heads, head_dim, vocab_size: the model's shape.
    weights_per_device: bytes of weights each device holds (sharded as deployed).
    hbm_per_device: HBM of one device, bytes.
    data, model: mesh axis sizes (batch over data, kv heads over model).
    strategy: kv-head strategy (`kvtpu.sharding`).
    reserve: fraction of HBM kept free.
    logits_bytes: bytes per logit of the decode step's output projection (f32: 4).
    tpu: whether the step runs on TPU, whose layouts make it copy 16-bit per-token
      scales (`memory.tpu_layout_copy_bytes`, counted as temporaries).
  """

  num_layers: int
  kv_heads: int
  head_dim: int
  vocab_size: int
  weights_per_device: int
  hbm_per_device: int
  data: int = 1
  model: int = 1
  strategy: str = "auto"
  reserve: float = DEFAULT_RESERVE
  logits_bytes: int = 4
  tpu: bool = True

  def __post_init__(self):
    for name in ("num_layers", "kv_heads", "head_dim", "vocab_size", "hbm_per_device", "data",
                 "model"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
    if not isinstance(self.weights_per_device, int) or self.weights_per_device < 0:
      raise ValueError(f"weights_per_device must be an int >= 0, got {self.weights_per_device!r}")
    if not 0 <= self.reserve < 1:
      raise ValueError(f"reserve must be a fraction of HBM in [0, 1), got reserve={self.reserve!r}")
    if not isinstance(self.tpu, bool):
      raise ValueError(f"tpu must be a bool, got tpu={self.tpu!r}")
    sharding.resolve_strategy(self.strategy, kv_heads=self.kv_heads, model=self.model)

  @property
  def budget(self) -> int:
    """Bytes a device may use: HBM less the reserve."""
    return int(self.hbm_per_device * (1 - self.reserve))

  @property
  def resolved_strategy(self) -> str:
    return sharding.resolve_strategy(self.strategy, kv_heads=self.kv_heads, model=self.model)


# (format or layer plan, batch, max_len) -> Usage
Measure = Callable[[KVFormat | LayerPlan, int, int], Usage]


def analytic_usage(dep: Deployment, fmt: KVFormat | LayerPlan | str, batch: int,
                   max_len: int, page_len: int | None = None,
                   num_pages: int | None = None) -> Usage:
  """Closed-form bytes per device: weights as given, the cache block exactly
  (`sharding.per_device_bytes`; for a layer plan, the sum over its layer groups, each
  a cache of its own as in `kvtpu.LayeredKVCache`), and as temporaries the f32 logits
  of the step's output projection for this device's sequences (the vocabulary split
  over the model axis when it divides it), the one temporary that grows with the
  batch, plus on TPU the copies of 16-bit per-token scales
  (`memory.tpu_layout_copy_bytes`). With `page_len` and `num_pages`, a paged cache
  (`kvtpu.headroom.paged`): the device's P/D pages (P/(D M) under the sequence
  strategy) stand for its sequences' slabs."""
  groups = [(f, len(layers)) for f, layers in LayerPlan.parse(fmt).groups(dep.num_layers)]
  cache = sum(sharding.per_device_bytes(
      f, num_layers=n, batch=batch, kv_heads=dep.kv_heads, max_len=max_len,
      head_dim=dep.head_dim, data=dep.data, model=dep.model, strategy=dep.strategy,
      page_len=page_len, num_pages=num_pages)
      for f, n in groups)
  vocab = dep.vocab_size // dep.model if dep.vocab_size % dep.model == 0 else dep.vocab_size
  temp = (batch // dep.data) * vocab * dep.logits_bytes
  if dep.tpu:
    b, k = sharding.per_device_dims(batch=batch, kv_heads=dep.kv_heads, data=dep.data,
                                    model=dep.model, strategy=dep.strategy)
    if num_pages is not None:  # The scale arrays hold pages of page_len positions.
      shards = dep.data * (dep.model if dep.resolved_strategy == "sequence" else 1)
      b, max_len = num_pages // shards, page_len
    temp += sum(memory.tpu_layout_copy_bytes(f, num_layers=n, batch=b, kv_heads=k,
                                             max_len=max_len, head_dim=dep.head_dim)
                for f, n in groups)
  return Usage(weights=dep.weights_per_device, cache=cache, temp=temp)


def max_fit(total_at: Callable[[int], Usage], budget: int, *, guess: int = 1,
            limit: int) -> tuple[int, Usage | None, int, Usage | None]:
  """The largest integer `m` in [1, limit] whose usage fits `budget`.

  `total_at(m)` must grow with m. Starting from `guess`, the search interpolates
  linearly between measured points (usage is affine in the context and in the
  batch), falling back to doubling and bisection, so a handful of measurements
  suffice.

  Returns:
    `(m, usage at m, m + 1, usage at m + 1)`; m = 0 (usage None) when even m = 1 does
    not fit; `m + 1` beyond `limit` has usage None.
  """
  if limit < 1:
    raise ValueError(f"limit must be >= 1, got limit={limit}")
  seen: dict[int, Usage] = {}

  def fits(m: int) -> bool:
    if m not in seen:
      seen[m] = total_at(m)
    u = seen[m]
    return not u.oom and u.total <= budget

  lo, hi = 0, limit + 1  # fits(lo) (or lo = 0), not fits(hi) (or hi = limit + 1).
  m = min(max(guess, 1), limit)
  while hi - lo > 1:
    if fits(m):
      lo = m
    else:
      hi = m
    if hi - lo <= 1:
      break
    m = _next_probe(lo, hi, seen, budget, limit)
  if lo == 0:
    return 0, None, 1, seen.get(1)
  if hi <= limit and hi not in seen:
    fits(hi)
  return lo, seen[lo], hi, seen.get(hi)


def _next_probe(lo: int, hi: int, seen: dict[int, Usage], budget: int, limit: int) -> int:
  """Next m strictly between lo and hi (lo fits or is 0; hi does not or is limit + 1).

  Usage is affine in m, so the line through the two measured points nearest the
  budget says where it crosses (from a single point, its neighbour gives the slope);
  when that lands outside [lo, hi) (the line is off; it may land on lo itself: then
  lo + 1 is next), double (no failing point yet) or bisect.
  """
  points = sorted(((m, u.total) for m, u in seen.items() if not u.oom),
                  key=lambda p: abs(p[1] - budget))
  estimate = None
  if len(points) >= 2:
    (m0, t0), (m1, t1) = sorted(points[:2])
    if t1 > t0:
      estimate = m0 + math.floor((budget - t0) * (m1 - m0) / (t1 - t0))
  elif len(points) == 1:
    m0 = points[0][0]
    estimate = m0 + 1 if m0 == lo else m0 - 1
  if estimate is not None:
    # The line puts the last fitting m at `estimate`: at lo, check lo + 1; past an
    # unmeasured end (0 or limit + 1), check that end. Anywhere else outside (lo, hi) it
    # contradicts a measured point: clamping it to a neighbour of lo or hi would walk
    # one m per measurement (step-shaped usage), so double or bisect instead.
    if hi == limit + 1:
      estimate = min(estimate, limit)
    if lo == 0:
      estimate = max(estimate, 1)
    if estimate == lo:
      estimate = lo + 1
    if lo < estimate < hi and estimate not in seen:
      return estimate
  if hi == limit + 1:
    return min(limit, max(2 * lo, lo + 1))
  return (lo + hi) // 2


def padded_batch(concurrency: int, data: int) -> int:
  """Sequences to allocate for `concurrency`: a multiple of the data axis, at least one
  sequence per data shard."""
  return max(data, math.ceil(concurrency / data) * data)


@dataclasses.dataclass(frozen=True)
class Answer:
  """One solved question, and the point just past it."""

  kind: str  # "max_context" or "max_concurrency"
  concurrency: int  # asked (max_context) or found (max_concurrency)
  context: int  # found (max_context) or asked (max_concurrency)
  batch: int
  max_len: int
  usage: Usage | None
  next_batch: int
  next_max_len: int
  next_usage: Usage | None


def max_context(dep: Deployment, fmt, concurrency: int, measure: Measure, *, block: int = 128,
                guess: int | None = None, limit: int = MAX_CONTEXT_LIMIT) -> Answer:
  """The largest max_len (a multiple of `block`) that fits at `concurrency` sequences."""
  fmt = LayerPlan.config(fmt)
  if block < 1:
    raise ValueError(f"block must be a positive int, got block={block}")
  batch = padded_batch(concurrency, dep.data)
  m, usage, m_next, usage_next = max_fit(
      lambda m: measure(fmt, batch, m * block), dep.budget,
      guess=max(1, (guess or block) // block), limit=limit // block)
  return Answer("max_context", concurrency, m * block, batch, m * block, usage, batch,
                m_next * block, usage_next)


def max_concurrency(dep: Deployment, fmt, context: int, measure: Measure, *,
                    guess: int | None = None, limit: int = MAX_BATCH_LIMIT) -> Answer:
  """The largest batch (a multiple of the data axis) that fits at max_len `context`."""
  fmt = LayerPlan.config(fmt)
  m, usage, m_next, usage_next = max_fit(
      lambda m: measure(fmt, m * dep.data, context), dep.budget,
      guess=max(1, (guess or dep.data) // dep.data), limit=limit // dep.data)
  return Answer("max_concurrency", m * dep.data, context, m * dep.data, context, usage,
                m_next * dep.data, context, usage_next)


def sweep(dep: Deployment, fmts: Sequence, measure: Measure, *,
          concurrencies: Sequence[int] = (1, 8, 32, 128),
          contexts: Sequence[int] = (8192, 32768, 131072), block: int = 128,
          guesses: dict | None = None,
          progress: Callable[[Answer, KVFormat | LayerPlan], None] | None = None,
          ) -> list[tuple[KVFormat | LayerPlan, Answer]]:
  """Every (format or layer plan, question): max context at each concurrency, max
  concurrency at each context. `guesses[(fmt.name, kind, asked)]` seeds expensive
  measures (e.g. with the analytic answers)."""
  guesses = guesses or {}
  out = []
  for fmt in fmts:
    fmt = LayerPlan.config(fmt)
    for c in concurrencies:
      a = max_context(dep, fmt, c, measure, block=block,
                      guess=guesses.get((fmt.name, "max_context", c)))
      out.append((fmt, a))
      if progress:
        progress(a, fmt)
    for ctx in contexts:
      a = max_concurrency(dep, fmt, ctx, measure,
                          guess=guesses.get((fmt.name, "max_concurrency", ctx)))
      out.append((fmt, a))
      if progress:
        progress(a, fmt)
  return out


def _effective_bits(dep: Deployment, fmt: KVFormat | LayerPlan) -> float:
  dims = dict(context=EFFECTIVE_BITS_CONTEXT, kv_heads=dep.kv_heads, head_dim=dep.head_dim)
  if isinstance(fmt, KVFormat):
    return memory.effective_bits(fmt, **dims)
  return memory.plan_effective_bits(fmt, num_layers=dep.num_layers, **dims)


def answer_rows(fmt: KVFormat | LayerPlan, answer: Answer, dep: Deployment, *, mode: str,
                **fields) -> list[dict]:
  """The result rows of one answer (`kvtpu.headroom.report` schema): the maximum, and
  the first point past it (`oom` true) when one was measured. `fields` holds the
  deployment's labels (model, weight_dtype, accelerator, chip, num_devices, mesh,
  model_max_position, ...)."""
  base = dict(fields, mode=mode, kv_format=fmt.name, kind=answer.kind,
              strategy=dep.resolved_strategy, hbm_per_device=dep.hbm_per_device,
              budget_per_device=dep.budget, reserve_fraction=dep.reserve,
              calibration="none (memory only: no calibration needed)",
              effective_bits=_effective_bits(dep, fmt))

  def row(batch: int, max_len: int, usage: Usage | None, oom: bool) -> dict:
    usage = usage or Usage(weights=dep.weights_per_device, cache=0, temp=0)
    out = dict(base, batch=batch, max_len=max_len, tokens=batch * max_len, oom=oom,
               weights_per_device=usage.weights, cache_per_device=usage.cache,
               temp_per_device=usage.temp, other_per_device=usage.other,
               total_per_device=usage.total)
    if answer.kind == "max_context":
      out.update(concurrency=answer.concurrency, context=max_len)
    else:
      out.update(concurrency=batch, context=answer.context)
    if usage.oom:
      out["note"] = f"{mode}: the measure itself ran out of memory (bytes are lower bounds)"
    return out

  rows = [row(answer.batch, answer.max_len, answer.usage, False)]
  if answer.next_usage is not None:
    rows.append(row(answer.next_batch, answer.next_max_len, answer.next_usage, True))
  return rows
