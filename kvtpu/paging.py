"""Host-side page allocation for a paged `KVCache`.

A paged cache stores K and V in a pool of P pages of Z positions; each sequence's
page table row lists the pages holding its positions `[0, Z)`, `[Z, 2Z)`, ... The
device never allocates: between steps the host decides which pages each sequence
holds and hands the table to the cache (`KVCache.with_page_table`). This module is
that host side: a free list per data shard (per block of the pool, sequence-sharded),
and a table the device reads.

Invariants (`check`): page 0 of each shard is the null page and is never given out;
every other page is either free or held by exactly one sequence; a sequence's held
pages are the leading entries of its row, the rest 0.

Sharded caches (`kvtpu.sharding`, pages over the data axis): shard s of D holds pool
pages `[s P/D, (s+1) P/D)` and the sequences `[s B/D, (s+1) B/D)`; table entries are
page ids local to the shard (the kernels on a device see only its block of the
pool), and each shard's local page 0 is its null page. Sequence-sharded caches
(`model_shards=M`): the pool is split into D x M blocks, and block `s M + m` holds the
pages of table columns `[m W/M, (m+1) W/M)` of the sequences of data shard s (W the
table's width); entries are ids local to that block.

Running out of pages is a normal serving condition, not a bug: `reserve` raises
`OutOfPages` and changes nothing, so the caller can preempt a sequence, `release` its
pages and try again.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping

import numpy as np

from kvtpu._shared import check_dims

__all__ = ["PageAllocator", "OutOfPages"]


class OutOfPages(RuntimeError):
  """Not enough free pages for a reservation; nothing was allocated.

  Attributes:
    shard: the pool block that ran out: `s M + m` for data shard s and model shard m
      (the data shard when the pool is not split over the model axis).
    needed, free: pages the reservation needed from that shard, and pages it had.
  """

  def __init__(self, shard: int, needed: int, free: int):
    super().__init__(f"out of pages: the reservation needs {needed} pages of pool block "
                     f"{shard}, which has {free} free; release a sequence's pages (preempt "
                     "it) and retry, or give the cache more pages")
    self.shard, self.needed, self.free = shard, needed, free


class PageAllocator:
  """Which pages each sequence of a paged cache holds.

  Args:
    num_pages: P, pages in the (global) pool, null pages included.
    page_len: Z, positions per page.
    batch: B, sequences (rows of the table).
    pages_per_sequence: the table's width (`max_len / Z`).
    shards: D, data shards (the data axis of a sharded cache; 1 unsharded); B must be
      a multiple of it, P of D x M, and each block's P/(D M) pages must include one to
      give. `kvtpu.sharding.CacheSharding.allocator` sets both for a sharded cache.
    model_shards: M, the model axis of a sequence-sharded cache (1 otherwise): each
      data shard's pages are split into M blocks, block m holding the sequences'
      pages of table columns `[m W/M, (m+1) W/M)`; W must be a multiple of M.
  """

  def __init__(self, *, num_pages: int, page_len: int, batch: int, pages_per_sequence: int,
               shards: int = 1, model_shards: int = 1):
    check_dims(num_pages=num_pages, page_len=page_len, batch=batch,
               pages_per_sequence=pages_per_sequence, shards=shards, model_shards=model_shards)
    if batch % shards:
      raise ValueError(f"batch={batch} must be a multiple of shards={shards}: each data "
                       "shard holds an equal block")
    blocks = shards * model_shards
    if num_pages % blocks:
      raise ValueError(f"num_pages={num_pages} must be a multiple of shards x model_shards="
                       f"{blocks}: each shard holds an equal block")
    if pages_per_sequence % model_shards:
      raise ValueError(f"pages_per_sequence={pages_per_sequence} must be a multiple of "
                       f"model_shards={model_shards}: each model shard holds an equal share "
                       "of a sequence's pages")
    if num_pages // blocks < 2:
      raise ValueError(f"each of the {blocks} shards needs its null page and at least one more: "
                       f"num_pages={num_pages} gives {num_pages // blocks} per shard")
    self.num_pages, self.page_len, self.batch = num_pages, page_len, batch
    self.pages_per_sequence, self.shards, self.model_shards = (pages_per_sequence, shards,
                                                               model_shards)
    self._local = num_pages // blocks
    self._free = [collections.deque(range(1, self._local)) for _ in range(blocks)]
    self._table = np.zeros((batch, pages_per_sequence), np.int32)
    self._held = np.zeros((batch,), np.int64)

  @classmethod
  def for_cache(cls, cache, shards: int = 1, model_shards: int = 1) -> PageAllocator:
    """An allocator for a paged `KVCache` (real or abstract), all pages free."""
    if not cache.paged:
      raise ValueError("PageAllocator.for_cache needs a paged cache (KVCache.init(..., "
                       "page_len=, num_pages=))")
    return cls(num_pages=cache.num_pages, page_len=cache.page_len, batch=cache.batch,
               pages_per_sequence=cache.page_table.shape[-1], shards=shards,
               model_shards=model_shards)

  # ------------------------------------------------------------------ reading
  @property
  def table(self) -> np.ndarray:
    """The page table `[B, pages_per_sequence]` int32 (a copy), for
    `KVCache.with_page_table`."""
    return self._table.copy()

  @property
  def max_len(self) -> int:
    return self.page_len * self.pages_per_sequence

  def shard_of(self, seq: int) -> int:
    """The data shard whose pages sequence `seq` holds."""
    return self._check_seq(seq) // (self.batch // self.shards)

  def block_of(self, seq: int, column: int) -> int:
    """The pool block (`shard M + model shard`) holding table column `column` of `seq`."""
    return (self.shard_of(seq) * self.model_shards
            + column // (self.pages_per_sequence // self.model_shards))

  def holds_in(self, seq: int, block: int) -> bool:
    """Whether sequence `seq` holds a page of pool block `block` (`block_of`): its
    columns `[0, held)` run through its data shard's blocks in order."""
    held = self.held(seq)
    return held > 0 and self.block_of(seq, 0) <= block <= self.block_of(seq, held - 1)

  def held(self, seq: int) -> int:
    """Pages sequence `seq` holds."""
    return int(self._held[self._check_seq(seq)])

  def capacity(self, seq: int) -> int:
    """Positions sequence `seq` can hold now."""
    return self.held(seq) * self.page_len

  def free_pages(self, shard: int | None = None) -> int:
    """Free pages of one block of the pool (`block_of`; the data shard when
    `model_shards` is 1), or of all."""
    if shard is None:
      return sum(len(f) for f in self._free)
    return len(self._free[shard])

  @property
  def pages_in_use(self) -> int:
    return int(self._held.sum())

  @property
  def usable_pages(self) -> int:
    """Pages that can be given out: P minus each block's null page."""
    return self.num_pages - len(self._free)

  def pages_for(self, tokens: int) -> int:
    """Pages that hold `tokens` positions."""
    return -(-int(tokens) // self.page_len)

  # ------------------------------------------------------------------ changing
  def reserve(self, seq: int, tokens: int) -> int:
    """Makes sequence `seq` hold pages for positions `[0, tokens)` (never fewer than it
    holds); returns the pages newly given.

    Raises:
      ValueError: `tokens` outside `[0, max_len]`, or a bad sequence index.
      OutOfPages: its shard has too few free pages (nothing changed).
    """
    return self.reserve_many({seq: tokens})[seq]

  def reserve_many(self, tokens: Mapping[int, int] | Iterable[tuple[int, int]]) -> dict[int, int]:
    """`reserve` for several sequences at once, all or nothing: either every sequence
    gets its pages or `OutOfPages` is raised and nothing changed."""
    requests = dict(tokens)
    need = {}
    per_shard = collections.Counter()
    for seq, n in requests.items():
      self._check_seq(seq)
      if not 0 <= int(n) <= self.max_len:
        raise ValueError(f"tokens for sequence {seq} must be in [0, max_len={self.max_len}], "
                         f"got {n}")
      need[seq] = max(self.pages_for(n) - int(self._held[seq]), 0)
      start = int(self._held[seq])
      for w in range(start, start + need[seq]):
        per_shard[self.block_of(seq, w)] += 1
    for shard, n in sorted(per_shard.items()):
      if n > len(self._free[shard]):
        raise OutOfPages(shard, n, len(self._free[shard]))
    for seq, n in need.items():
      start = int(self._held[seq])
      for w in range(start, start + n):
        self._table[seq, w] = self._free[self.block_of(seq, w)].popleft()
      self._held[seq] = start + n
    return need

  def release(self, seq: int) -> int:
    """Returns every page of sequence `seq` to its blocks' free lists (its row becomes
    0s); returns how many. The cache's sequence must be `reset` before it is reused."""
    self._check_seq(seq)
    n = int(self._held[seq])
    for w in range(n):
      self._free[self.block_of(seq, w)].append(int(self._table[seq, w]))
    self._table[seq] = 0
    self._held[seq] = 0
    return n

  # ------------------------------------------------------------------ checking
  def check(self) -> None:
    """Raises AssertionError unless the invariants in the module docstring hold."""
    owned = collections.defaultdict(list)
    for b in range(self.batch):
      assert not self._table[b, self._held[b]:].any(), f"sequence {b}: entries past its pages"
      for w in range(self._held[b]):
        owned[self.block_of(b, w)].append(int(self._table[b, w]))
    for shard, free in enumerate(self._free):
      free = list(free)
      assert 0 not in owned[shard] and 0 not in free, f"shard {shard}: the null page was given out"
      every = owned[shard] + free
      assert len(every) == len(set(every)), f"shard {shard}: a page is held twice or free twice"
      assert sorted(every) == list(range(1, self._local)), f"shard {shard}: pages lost"

  def _check_seq(self, seq) -> int:
    if not isinstance(seq, (int, np.integer)) or isinstance(seq, bool) or not (
        0 <= seq < self.batch):
      raise ValueError(f"seq must be a sequence index in [0, {self.batch}), got {seq!r}")
    return int(seq)
