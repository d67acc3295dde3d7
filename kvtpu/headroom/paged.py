"""Paged headroom: how many concurrent requests of a length distribution fit.

A contiguous cache reserves `max_len` positions for every sequence, so its headroom
question is "how many sequences of the longest length fit". A paged cache
(`kvtpu.paging`) spends pages only on the tokens that exist, so the question becomes:
with requests whose lengths follow a distribution, how many can be in flight at
once? On every device

    weights + pool of pages + per-sequence arrays (windows, tables, lengths)
      + the decode step's temporaries + other <= HBM * (1 - reserve)

where the pool holds the pages the requests need: request i holds `ceil(len_i / Z)`
pages of Z positions, and each data shard one more, its null page. The pages a set of
n requests needs is random; `DEMANDS` says which figure is sized: its mean (n times
the mean pages per request), or its 99th percentile (the normal approximation of the
sum of n independent requests' pages, capped at n times the most pages one request
can hold), the pool a server needs to rarely preempt.

The measures are the contiguous solver's, given a paged layout: `analytic_paged_usage`
here (closed forms), and the compiled step (`kvtpu.models.headroom.AotMeasure` with
`page_len` and `num_pages`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kvtpu import reports
from kvtpu.formats import KVFormat, LayerPlan
from kvtpu.headroom.report import STRATEGIES
from kvtpu.headroom.solver import MAX_BATCH_LIMIT, Deployment, Usage, analytic_usage, max_fit

__all__ = ["LengthDistribution", "DEMANDS", "pool_pages", "analytic_paged_usage",
           "PagedMeasure", "PagedAnswer", "max_requests", "ROW_FIELDS", "answer_rows",
           "check_row", "markdown"]

# Which figure of the pages n requests hold the pool is sized for: the mean, or the
# 99th percentile (z = 2.326 of the normal approximation).
DEMANDS = {"mean": 0.0, "p99": 2.326}


@dataclasses.dataclass(frozen=True)
class LengthDistribution:
  """Tokens per request (prompt and output together, what a request's cache holds at
  its longest), as a discrete distribution.

  Attributes:
    name: how it was given (`parse`'s text; a histogram file's path).
    lengths: the distinct lengths, ascending, each >= 1.
    probs: their probabilities (sum 1).
  """

  name: str
  lengths: tuple[int, ...]
  probs: tuple[float, ...]

  def __post_init__(self):
    if not self.lengths or len(self.lengths) != len(self.probs):
      raise ValueError(f"a length distribution needs lengths and as many probabilities, got "
                       f"{len(self.lengths)} and {len(self.probs)}")
    if any(not isinstance(n, int) or n < 1 for n in self.lengths):
      raise ValueError(f"lengths must be ints >= 1, got {self.lengths[:8]}")
    if list(self.lengths) != sorted(set(self.lengths)):
      raise ValueError("lengths must be distinct and ascending")
    if any(not p >= 0 for p in self.probs) or not math.isclose(sum(self.probs), 1.0,
                                                              rel_tol=1e-9):
      raise ValueError(f"probabilities must be >= 0 and sum to 1, got sum {sum(self.probs)}")

  @classmethod
  def parse(cls, text: str) -> LengthDistribution:
    """`fixed:<n>`, `uniform:<lo>:<hi>` (every length in [lo, hi] equally likely), or
    `histogram:<path>`: a JSON file `{"lengths": [...], "counts": [...]}` (counts >= 0,
    not all 0) or a CSV file of `length,count` lines.

    Raises:
      ValueError: naming the text and what was expected.
    """
    kind, _, rest = text.partition(":")
    try:
      if kind == "fixed":
        n = int(rest)
        return cls(text, (n,), (1.0,))
      if kind == "uniform":
        lo, hi = (int(x) for x in rest.split(":"))
        if not 1 <= lo <= hi:
          raise ValueError(f"expected 1 <= lo <= hi, got lo={lo}, hi={hi}")
        return cls(text, tuple(range(lo, hi + 1)), (1.0 / (hi - lo + 1),) * (hi - lo + 1))
      if kind == "histogram":
        return cls.from_histogram(rest, name=text)
    except (ValueError, OSError) as e:
      raise ValueError(f"length distribution {text!r}: {e}") from None
    raise ValueError(f"length distribution {text!r}: expected fixed:<n>, uniform:<lo>:<hi> or "
                     "histogram:<path>")

  @classmethod
  def from_histogram(cls, path: str | Path, *, name: str | None = None) -> LengthDistribution:
    """A distribution from a histogram file (JSON or CSV, see `parse`)."""
    text = Path(path).read_text()
    if str(path).endswith(".json"):
      data = json.loads(text)
      lengths, counts = data["lengths"], data["counts"]
    else:
      rows = [line.split(",") for line in text.splitlines() if line.strip()
              and not line.startswith("#")]
      if rows and not rows[0][0].strip().isdigit():
        rows = rows[1:]  # A header line.
      lengths, counts = [int(r[0]) for r in rows], [float(r[1]) for r in rows]
    if len(lengths) != len(counts) or not lengths:
      raise ValueError(f"{path}: needs as many counts as lengths, at least one")
    merged: dict[int, float] = {}
    for n, c in zip(lengths, counts, strict=True):
      if not isinstance(n, int) or n < 1 or not c >= 0:
        raise ValueError(f"{path}: lengths must be ints >= 1 and counts >= 0, got {n}: {c}")
      merged[n] = merged.get(n, 0.0) + float(c)
    total = sum(merged.values())
    if total <= 0:
      raise ValueError(f"{path}: all counts are 0")
    keys = sorted(merged)
    return cls(name or f"histogram:{path}", tuple(keys), tuple(merged[n] / total for n in keys))

  @property
  def max_length(self) -> int:
    return self.lengths[-1]

  @property
  def mean_length(self) -> float:
    return float(np.dot(self.lengths, self.probs))

  @property
  def digest(self) -> str:
    """A short hash of the lengths and probabilities (reports record it)."""
    blob = json.dumps([self.lengths, [round(p, 12) for p in self.probs]]).encode()
    return hashlib.sha256(blob).hexdigest()[:12]

  def pages(self, page_len: int, cap: int | None = None) -> tuple[float, float]:
    """Mean and standard deviation of the pages one request holds, `ceil(len / Z)`, or
    of its first `cap` pages (what the first device of a sequence-sharded cache holds)."""
    pages = -(-np.asarray(self.lengths) // page_len)
    if cap is not None:
      pages = np.minimum(pages, cap)
    mean = float(np.dot(pages, self.probs))
    return mean, float(np.sqrt(max(np.dot(pages**2, self.probs) - mean**2, 0.0)))


def pool_pages(dist: LengthDistribution, page_len: int, requests: int, demand: str,
               cap: int | None = None) -> int:
  """Pages `requests` requests of `dist` hold at `demand` (`DEMANDS`), without null pages;
  with `cap`, of each request's first `cap` pages only."""
  if demand not in DEMANDS:
    raise ValueError(f"demand must be one of {sorted(DEMANDS)}, got demand={demand!r}")
  mean, std = dist.pages(page_len, cap)
  most = requests * min(-(-dist.max_length // page_len), cap or math.inf)
  return min(most, math.ceil(requests * mean + DEMANDS[demand] * math.sqrt(requests) * std))


def analytic_paged_usage(dep: Deployment, fmt: KVFormat | str, batch: int, max_len: int,
                         page_len: int, num_pages: int) -> Usage:
  """Closed-form bytes per device of a paged cache: weights as given, the cache block
  exactly (`sharding.per_device_bytes`: P/D pages (P/(D M) sequence-sharded), B/D
  sequences' windows, tables and
  lengths), and as temporaries the f32 logits of the device's sequences plus, on TPU,
  the copies of 16-bit per-token scales of its pages (`memory.tpu_layout_copy_bytes`)."""
  fmt = LayerPlan.config(fmt)
  if not isinstance(fmt, KVFormat):
    raise ValueError(f"paged headroom takes one format per cache, not the layer plan {fmt.name}")
  return analytic_usage(dep, fmt, batch, max_len, page_len=page_len, num_pages=num_pages)


# (format, batch, max_len, page_len, num_pages) -> Usage
PagedMeasure = Callable[[KVFormat, int, int, int, int], Usage]


@dataclasses.dataclass(frozen=True)
class PagedAnswer:
  """The most requests that fit, and the point just past it.

  Attributes:
    requests: the maximum (a multiple of the data axis; 0: none fits).
    num_pages: the pool at the maximum (null pages included, all shards).
    max_len: positions a request's table covers (the longest length, in whole pages).
    usage: bytes per device at the maximum (None when nothing fits).
    next_requests, next_num_pages, next_usage: the first point past it.
  """

  fmt: str
  lengths: str
  demand: str
  page_len: int
  requests: int
  num_pages: int
  max_len: int
  usage: Usage | None
  next_requests: int
  next_num_pages: int
  next_usage: Usage | None


def max_requests(dep: Deployment, fmt: KVFormat | str, dist: LengthDistribution,
                 measure: PagedMeasure, *, page_len: int, demand: str = "mean",
                 guess: int | None = None, limit: int = MAX_BATCH_LIMIT) -> PagedAnswer:
  """The most concurrent requests of `dist` (a multiple of the data axis, each data shard
  holding an equal share and its own pool) whose pages fit, sized for `demand`.

  Sequence-sharded caches (`dep.strategy == "sequence"`): model device m holds the
  pages of table columns `[m W/M, (m+1) W/M)` of every request (W, the table's width,
  rounded up to a multiple of M), and all devices' pools are equal, so each is sized
  for the first device's share: the requests' first W/M pages (later columns hold at
  most as many).

  Raises:
    ValueError: for a bad page_len or demand, or a format the page length does not fit
      (`KVCache.init`'s checks).
  """
  fmt = KVFormat.parse(fmt) if isinstance(fmt, str) else fmt
  if not isinstance(page_len, int) or page_len < 1:
    raise ValueError(f"page_len must be a positive int, got page_len={page_len!r}")
  pool_pages(dist, page_len, 1, demand)  # Checks the demand.
  width = -(-dist.max_length // page_len)
  blocks, cap = dep.data, None
  if dep.resolved_strategy == "sequence":
    width = -(-width // dep.model) * dep.model
    blocks, cap = dep.data * dep.model, width // dep.model
  max_len = width * page_len

  def shape(m: int) -> tuple[int, int]:
    """m requests per data shard -> (batch, pages of all shards)."""
    return m * dep.data, blocks * (1 + max(pool_pages(dist, page_len, m, demand, cap), 1))

  def usage(m: int) -> Usage:
    batch, pages = shape(m)
    return measure(fmt, batch, max_len, page_len, pages)

  m, at, m_next, at_next = max_fit(usage, dep.budget, guess=max(1, (guess or 1) // dep.data),
                                   limit=max(1, limit // dep.data))
  return PagedAnswer(fmt.name, dist.name, demand, page_len, m * dep.data,
                     shape(m)[1] if m else 0, max_len, at, m_next * dep.data, shape(m_next)[1],
                     at_next)


# ------------------------------------------------------------------ result rows

# Fields of a paged result row (bytes per device), besides the deployment's labels.
ROW_FIELDS = ("mode", "strategy", "kv_format", "lengths", "lengths_digest", "mean_length", "demand",
              "page_len", "requests", "batch", "num_pages", "max_len", "oom",
              "pages_per_request", "weights_per_device", "cache_per_device", "temp_per_device",
              "other_per_device", "total_per_device", "budget_per_device")


def answer_rows(answer: PagedAnswer, dist: LengthDistribution, dep: Deployment, *, mode: str,
                **labels) -> list[dict]:
  """The rows of one answer: the maximum, and the first point past it (`oom` true) when
  one was measured."""
  base = dict(labels, mode=mode, strategy=dep.resolved_strategy, kv_format=answer.fmt,
              lengths=dist.name,
              lengths_digest=dist.digest, mean_length=dist.mean_length, demand=answer.demand,
              page_len=answer.page_len, max_len=answer.max_len,
              pages_per_request=dist.pages(answer.page_len)[0], budget_per_device=dep.budget)

  def row(requests: int, num_pages: int, usage: Usage | None, oom: bool) -> dict:
    usage = usage or Usage(weights=dep.weights_per_device, cache=0, temp=0)
    return dict(base, requests=requests, batch=requests, num_pages=num_pages, oom=oom,
                weights_per_device=usage.weights, cache_per_device=usage.cache,
                temp_per_device=usage.temp, other_per_device=usage.other,
                total_per_device=usage.total)

  rows = [row(answer.requests, answer.num_pages, answer.usage, False)]
  if answer.next_usage is not None:
    rows.append(row(answer.next_requests, answer.next_num_pages, answer.next_usage, True))
  return rows


def check_row(row) -> None:
  """Raises ValueError for a row that lacks a field of `ROW_FIELDS` or breaks its types."""
  if not isinstance(row, dict):
    raise ValueError(f"a paged headroom row is a dict, got {type(row).__name__}")
  missing = [f for f in ROW_FIELDS if f not in row]
  if missing:
    raise ValueError(f"paged headroom row lacks {missing}")
  if row["strategy"] not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {row['strategy']!r}")
  if row["demand"] not in DEMANDS:
    raise ValueError(f"demand must be one of {sorted(DEMANDS)}, got {row['demand']!r}")
  for f in ("page_len", "max_len"):
    if not isinstance(row[f], int) or row[f] < 1:
      raise ValueError(f"{f} must be a positive int, got {row[f]!r}")
  for f in ("requests", "batch", "num_pages", "total_per_device"):
    if not isinstance(row[f], int) or row[f] < 0:
      raise ValueError(f"{f} must be an int >= 0, got {row[f]!r}")
  if not isinstance(row["oom"], bool):
    raise ValueError(f"oom must be a bool, got {row['oom']!r}")


def markdown(rows: list[dict]) -> str:
  """The maxima as one table per mode: requests in flight, the pool, and the ratio of
  requests to bf16's for the same lengths and demand."""
  maxima = [r for r in rows if not r["oom"]]
  if not maxima:
    return ""
  bf16 = {(r["mode"], r["lengths"], r["demand"]): r["requests"] for r in maxima
          if r["kv_format"] == "bf16"}
  out = []
  for mode in dict.fromkeys(r["mode"] for r in maxima):
    body = []
    for r in (r for r in maxima if r["mode"] == mode):
      ref = bf16.get((mode, r["lengths"], r["demand"]))
      body.append([f"`{r['kv_format']}`", f"`{r['lengths']}`", r["demand"], f"{r['requests']:,}",
                   f"{r['num_pages']:,} x {r['page_len']}",
                   f"{r['cache_per_device'] / 2**30:.2f}",
                   f"{r['requests'] / ref:.2f}x" if ref else "-"])
    out.append(f"**Concurrent requests, paged cache ({mode})**\n\n" + reports.markdown_table(
        ["KV format", "lengths", "pages sized for", "max requests", "pages (all shards) x Z",
         "cache GiB/device", "vs bf16"], body))
  return "\n\n".join(out)

