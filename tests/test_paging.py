"""The paged cache and its host-side allocator.

A paged cache must hold exactly what a contiguous cache holds for the same writes,
whatever pages the allocator hands out (scattered over a NaN-poisoned pool), read
through the XLA reference and the Pallas kernels alike; writes past the pages a
sequence holds are dropped and flagged; the allocator never gives a page to two
sequences, never gives the null page, and refuses what it cannot give without
changing anything.
"""

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvtpu
from kvtpu import OutOfPages, PageAllocator, memory
from tests.helpers import assert_close, kv_with_outliers, poison, slow_unless
from tests.pallas_kernels.cases import KERNEL_RTOL, tpu_device

B, K, H, L, PAGE = 4, 2, 128, 2, 128
STATIC_FMT = "k=int8-head,v=int8-head"
MAX_LEN = 4 * PAGE


def make(fmt, *, num_pages=None, page=PAGE):
  kw = {} if num_pages is None else dict(page_len=page, num_pages=num_pages)
  return poison(kvtpu.KVCache.init(fmt, num_layers=L, batch=B, kv_heads=K, max_len=MAX_LEN,
                                   head_dim=H, **kw))


# valid_len per sequence of each chunk (a chunk over pages, decode steps, a chunk within
# a page); every chunk but the last is advanced. The chunks are WIDTH wide (one compiled
# write serves them all; the counts make them ragged), the last one's QUERY_T queries
# go through the decode kernel (impl="interpret").
STEPS = [[40, 0, 17, 1], [0, 128, 130, 127], [1, 1, 0, 1], [8, 3, 8, 1]]
WIDTH, QUERY_T = 130, 8


def run_steps(cache, rng, allocator=None, impl="xla"):
  """Writes `STEPS` into layer 1 (reserving pages first when paged), then attends with
  the last chunk's queries; returns the cache and the output."""
  held = np.zeros(B, np.int64)
  out = None
  order = np.random.default_rng(11)  # Apart from `rng`: the data must not depend on paging.
  for i, valid in enumerate(STEPS):
    k = jnp.asarray(kv_with_outliers(rng, (B, WIDTH, K, H)))
    v = jnp.asarray(rng.standard_normal((B, WIDTH, K, H)), jnp.float32)
    valid = np.asarray(valid)
    if allocator is not None:
      # Reserve in an order that interleaves the sequences' pages over the pool.
      for b in order.permutation(B):
        allocator.reserve(int(b), int(held[b] + valid[b]))
      allocator.check()
      cache = cache.with_page_table(allocator.table)
    cache = cache.update(1, k, v, valid_len=valid)
    if i < len(STEPS) - 1:
      cache = cache.advance(valid)
      held += valid
    else:
      q = jnp.asarray(rng.standard_normal((B, QUERY_T, 4, H)) * 0.2, jnp.float32)
      out = kvtpu.attend(q, cache, 1, valid_len=valid, impl=impl)
  return cache, out


FORMATS = ["int8", "int4-sbf16-rot+sink4+recent252", "k=int2-asym-c16,v=int4-c16-sbf16+recent16",
           "int2-nu-sbf16-rot+sink4+recent252", "bf16", "k8v4"]


# int2 pools take pages of 64 positions (half its slabs' multiple of 128).
@pytest.mark.parametrize("fmt,page", [pytest.param(f, PAGE, marks=slow_unless(f == FORMATS[1]))
                                      for f in FORMATS] + [("int2-asym", 64)])
def test_paged_cache_holds_what_the_contiguous_one_does(fmt, page):
  contiguous, want = run_steps(make(fmt), np.random.default_rng(7))
  per_seq = MAX_LEN // page
  allocator = PageAllocator(num_pages=1 + B * per_seq + 2, page_len=page, batch=B,
                            pages_per_sequence=per_seq)
  paged, got = run_steps(make(fmt, num_pages=1 + B * per_seq + 2, page=page),
                         np.random.default_rng(7), allocator)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # The same reference math.
  np.testing.assert_array_equal(paged.lengths, contiguous.lengths)
  held = np.asarray(contiguous.lengths) + np.asarray(STEPS[-1])
  for which in ("k", "v"):
    a = np.asarray(paged.dequantized(1, which, held=held))
    b = np.asarray(contiguous.dequantized(1, which, held=held))
    for s in range(B):
      np.testing.assert_array_equal(a[s, :, : held[s]], b[s, :, : held[s]])
  for name, count in paged.counts().items():
    np.testing.assert_array_equal(count, contiguous.counts()[name], err_msg=name)


def fresh_allocator(num_pages=None, page=PAGE):
  per_seq = MAX_LEN // page
  return PageAllocator(num_pages=num_pages or 1 + B * per_seq, page_len=page, batch=B,
                       pages_per_sequence=per_seq)


@pytest.mark.parametrize("fmt,page", [("int8", PAGE), pytest.param(
    "int4-sbf16-rot+sink4+recent252", PAGE, marks=pytest.mark.slow), ("int2-asym", 64)])
def test_the_kernels_read_the_paged_cache(fmt, page):
  # The same writes and queries (same seed), read by the Pallas kernels over the pool
  # (interpret mode; the last chunk of 8 tokens goes through the decode kernel) and by
  # the reference.
  pool = 1 + B * MAX_LEN // page
  _, got = run_steps(make(fmt, num_pages=pool, page=page), np.random.default_rng(3),
                     fresh_allocator(page=page), impl="interpret")
  _, ref = run_steps(make(fmt, num_pages=pool, page=page), np.random.default_rng(3),
                     fresh_allocator(page=page))
  assert np.isfinite(np.asarray(got)).all(), "poisoned pages reached the output"
  assert_close(got, ref, atol=KERNEL_RTOL * float(jnp.max(jnp.abs(ref))), name=fmt)


def test_writes_past_the_held_pages_are_dropped_and_flagged():
  cache = make("int8", num_pages=8)
  allocator = PageAllocator.for_cache(cache)
  allocator.reserve(0, PAGE + 1)  # Two pages.
  allocator.reserve(2, 1)  # One page; sequences 1 and 3 hold none.
  cache = cache.with_page_table(allocator.table)
  np.testing.assert_array_equal(cache.capacity(), [2 * PAGE, 0, PAGE, 0])
  x = jnp.ones((B, 3 * PAGE, K, H))
  cache = cache.update(0, x, x).advance(3 * PAGE)
  np.testing.assert_array_equal(cache.lengths, [2 * PAGE, 0, PAGE, 0])
  np.testing.assert_array_equal(cache.overflow, [True, True, True, True])
  # Only the held positions were written (and counted); the null page kept its poison.
  assert cache.counts()["written"][0] == 3 * PAGE * K * H
  assert np.isnan(np.asarray(cache.k.scale[0, 0])).all()
  np.testing.assert_allclose(np.asarray(cache.dequantized(0, "k"))[0, :, :2 * PAGE], 1.0,
                             rtol=1e-6)


@pytest.mark.parametrize("fmt", ["int8", "int4-sbf16-rot+sink4+recent252",
                                 "k=int2-asym-c16,v=int4-c16-sbf16+recent16", STATIC_FMT])
def test_paged_bytes_are_counted_exactly(fmt):
  dims = dict(num_layers=3, batch=5, kv_heads=2, max_len=1024, head_dim=128, page_len=128,
              num_pages=23)
  kw = {}
  if fmt == STATIC_FMT:
    kw = dict(k_scale=np.ones((3, 2, 1)), v_scale=np.ones((3, 2, 1)))
  cache = kvtpu.KVCache.init(fmt, **dims, **kw)
  assert cache.nbytes == memory.cache_bytes(fmt, **dims)
  assert jax.eval_shape(lambda: cache).nbytes == cache.nbytes
  # The pool's positions replace the slabs': 23 x 128 positions instead of 5 x 1024.
  slabs = memory.cache_bytes(fmt, **{**dims, "page_len": None, "num_pages": None})
  per_position = memory.bytes_per_token(fmt, kv_heads=2, head_dim=128) * 3
  assert cache.nbytes - slabs == per_position * (23 * 128 - 5 * 1024) + 5 * 8 * 4


def test_paged_init_refuses_what_does_not_fit():
  kw = dict(num_layers=1, batch=2, kv_heads=1, max_len=512, head_dim=128)
  with pytest.raises(ValueError, match="max_len=512 must be a multiple of page_len=96"):
    kvtpu.KVCache.init("int8", **kw, page_len=96, num_pages=4)
  with pytest.raises(ValueError, match="num_pages must be at least 2"):
    kvtpu.KVCache.init("int8", **kw, page_len=128, num_pages=1)
  with pytest.raises(ValueError, match="page_len must be a positive int"):
    kvtpu.KVCache.init("int8", **kw, num_pages=4)
  with pytest.raises(ValueError, match="int2 storage needs page_len a multiple of 64"):
    kvtpu.KVCache.init("int2", **{**kw, "max_len": 128}, page_len=32, num_pages=4)
  cache = kvtpu.KVCache.init("int8", **kw, page_len=128, num_pages=4)
  with pytest.raises(ValueError, match=r"page_table must be integers of shape \(2, 4\)"):
    cache.with_page_table(np.zeros((2, 3), np.int32))
  with pytest.raises(ValueError, match="is paged: pass its page_table"):
    cache.k.dequantize(0)
  with pytest.raises(ValueError, match="with_page_table is for paged caches"):
    kvtpu.KVCache.init("int8", **kw).with_page_table(np.zeros((2, 4), np.int32))


def test_donated_paged_step_writes_in_place():
  # int8: XLA's CPU backend widens a whole int4 array around a scatter (TPU writes go
  # through the in-place kernel, compiled for TPU in tests/pallas_kernels).
  cache = kvtpu.KVCache.init("int8", num_layers=2, batch=8, kv_heads=2, max_len=1024,
                             head_dim=128, page_len=128, num_pages=40)
  step = jax.jit(lambda c, k: c.update(1, k, k).advance(1), donate_argnums=0)
  stats = step.lower(cache, jnp.ones((8, 1, 2, 128))).compile().memory_analysis()
  assert stats.alias_size_in_bytes >= cache.k.values.nbytes
  assert stats.temp_size_in_bytes < cache.nbytes / 10


def test_out_of_pages_changes_nothing_and_release_recovers():
  allocator = PageAllocator(num_pages=6, page_len=16, batch=3, pages_per_sequence=4)
  assert allocator.usable_pages == 5
  assert allocator.reserve(0, 33) == 3
  before = allocator.table
  with pytest.raises(OutOfPages, match="needs 4 pages of pool block 0, which has 2 free") as info:
    allocator.reserve_many({1: 16, 2: 40})  # 1 + 3 pages: all or nothing.
  assert (info.value.shard, info.value.needed, info.value.free) == (0, 4, 2)
  np.testing.assert_array_equal(allocator.table, before)
  assert allocator.free_pages() == 2
  assert allocator.release(0) == 3
  assert allocator.reserve_many({1: 16, 2: 40}) == {1: 1, 2: 3}
  allocator.check()
  assert allocator.reserve(2, 10) == 0  # Never shrinks.
  with pytest.raises(ValueError, match=r"tokens for sequence 2 must be in \[0, max_len=64\]"):
    allocator.reserve(2, 65)
  with pytest.raises(ValueError, match=r"seq must be a sequence index in \[0, 3\)"):
    allocator.release(3)


@pytest.mark.parametrize("model_shards", [1, 3])
def test_allocator_invariants_hold_under_random_traffic(model_shards):
  rng = np.random.default_rng(0)
  # Blocks of 12 (5) pages: 4 sequences of up to 6 (2 per model shard) pages run them dry.
  local = 12 if model_shards == 1 else 5
  allocator = PageAllocator(num_pages=2 * model_shards * local, page_len=8, batch=8,
                            pages_per_sequence=6, shards=2, model_shards=model_shards)
  held = np.zeros(8, np.int64)
  refused = 0
  for _ in range(400):
    seq = int(rng.integers(8))
    if rng.random() < 0.25:
      allocator.release(seq)
      held[seq] = 0
    else:
      want = min(held[seq] + int(rng.integers(1, 20)), allocator.max_len)
      try:
        allocator.reserve(seq, want)
        held[seq] = want
      except OutOfPages as e:
        refused += 1
        assert e.shard // model_shards == seq // 4 and e.needed > e.free
    allocator.check()
    for s in range(8):
      assert allocator.held(s) == allocator.pages_for(held[s])
      # Block-local ids: each block's pages are 1..local-1.
      assert allocator.table[s].max() < local
      blocks = range(2 * model_shards)
      assert [allocator.holds_in(s, k) for k in blocks] == [
          any(allocator.block_of(s, c) == k for c in range(allocator.held(s))) for k in blocks]
    assert allocator.pages_in_use + allocator.free_pages() == allocator.usable_pages
  assert refused > 0  # The traffic did run the pool dry.


def _layers(cache, k, v, q, valid, update, attend, advance):
  """One chunk through every layer (update, attend), then advance."""
  outs = []
  for layer in range(L):
    cache = update(cache, layer, k, v, valid)
    outs.append(attend(q, cache, layer, valid))
  return advance(cache, valid), jnp.stack(outs)


@pytest.mark.parametrize("fmt,shape", [("int8", (2, 4)), pytest.param(
    "int4-sbf16-rot+sink4+recent252", (4, 2), marks=pytest.mark.slow)])
def test_sharded_paged_cache_equals_the_contiguous_one(fmt, shape):
  # Pages over the data axis with their sequences, shard-local page ids from a sharded
  # allocator; every device runs the single-device paged code on its block.
  from kvtpu.sharding import CacheSharding

  data, _ = shape
  sh = CacheSharding(jax.make_mesh(shape, ("data", "model")))
  b, kh, page, width = 8, 8, 16, 4
  dims = dict(num_layers=L, batch=b, kv_heads=kh, max_len=page * width, head_dim=H)
  num_pages = data * (1 + (b // data) * width)
  paged = sh.init(fmt, **dims, page_len=page, num_pages=num_pages)
  assert paged.k.values.sharding.spec[1] == "data"
  # Each device holds exactly its block: P/D pages, B/D sequences and tables.
  for i in range(8):
    assert sum(memory.array_nbytes(leaf.addressable_shards[i].data.shape, leaf.dtype)
               for leaf in jax.tree.leaves(paged)) == sh.per_device_bytes(paged)
  allocator = PageAllocator.for_cache(paged, shards=data)
  ref = kvtpu.KVCache.init(fmt, **dims)
  rng = np.random.default_rng(5)
  sharded = jax.jit(functools.partial(
      _layers, update=lambda c, i, k, v, n: sh.update(c, i, k, v, valid_len=n),
      attend=lambda q, c, i, n: sh.attend(q, c, i, valid_len=n, impl="xla"),
      advance=sh.advance))
  single = jax.jit(functools.partial(
      _layers, update=lambda c, i, k, v, n: c.update(i, k, v, valid_len=n),
      attend=lambda q, c, i, n: kvtpu.attend(q, c, i, valid_len=n, impl="xla"),
      advance=lambda c, n: c.advance(n)))
  held = np.zeros(b, np.int64)
  t = 20  # Chunks of one width (one compiled step each way), ragged by their counts.
  for valid in ([20, 0, 17, 1, 33 - 13, 5, 16, 2], [1] * 8, [8, 3, 0, 8, 1, 8, 8, 8]):
    valid = np.asarray(valid, np.int32)
    for s in range(b):
      allocator.reserve(s, int(held[s] + valid[s]))
    allocator.check()
    paged = paged.with_page_table(jax.device_put(allocator.table, paged.page_table.sharding))
    k = jnp.asarray(kv_with_outliers(rng, (b, t, kh, H)))
    v = jnp.asarray(rng.standard_normal((b, t, kh, H)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((b, t, 2 * kh, H)) * 0.2, jnp.float32)
    paged, got = sharded(paged, k, v, q, valid)
    ref, want = single(ref, k, v, q, valid)
    assert_close(got, want, atol=1e-6, rtol=1e-6, name=f"chunk {valid.tolist()}")
    held += valid
  np.testing.assert_array_equal(paged.lengths, ref.lengths)
  for name, count in ref.counts().items():
    np.testing.assert_array_equal(paged.counts()[name], count, err_msg=name)
  # The pool holds what the slabs hold: read through global page ids.
  local = num_pages // data
  offsets = (np.arange(b) // (b // data) * local)[:, None]
  table = np.where(allocator.table > 0, allocator.table + offsets, 0)
  whole = jax.device_get(paged).with_page_table(table)
  for which in ("k", "v"):
    a, c = (np.asarray(x.dequantized(1, which)) for x in (whole, jax.device_get(ref)))
    for s in range(b):
      np.testing.assert_array_equal(a[s, :, :held[s]], c[s, :, :held[s]])


# The last chunk finds sequence 1 holding only the 2 pages (32 positions) of model device
# 0: its tokens are dropped at the boundary of device 1's span and it overflows.
# Chunks of one width (one compiled step each way), ragged by their counts.
SEQUENCE_STEPS = [[40, 0, 33, 1], [1, 1, 1, 0], [50, 31, 50, 50], [5, 5, 5, 5]]
SEQUENCE_WIDTH = 50


@pytest.mark.parametrize("fmt,shape,impl", [
    ("int8", (2, 4), "xla"),
    pytest.param("int4-sbf16-rot+sink4+recent252", (2, 4), "xla", marks=pytest.mark.slow),
    pytest.param("k=int4-asym-c16,v=int8-c16-sbf16+recent16", (4, 2), "xla",
                 marks=pytest.mark.slow)])
def test_sequence_sharded_cache_equals_the_unsharded_one(fmt, shape, impl):
  # Fewer kv heads (2) than model devices: each model device holds a quarter (half) of
  # every sequence's pages, NaN-poisoned elsewhere, and the partial attentions over its
  # span merge across devices. Lengths cross the devices' boundaries (32, 64, 96) and end
  # on one (32).
  from kvtpu.sharding import CacheSharding

  data, model = shape
  sh = CacheSharding(jax.make_mesh(shape, ("data", "model")), strategy="sequence")
  b, page, width = 4, 16, 8
  dims = dict(num_layers=L, batch=b, kv_heads=K, max_len=page * width, head_dim=H)
  blocks, local = data * model, 1 + (b // data) * (width // model)
  paged = sh.put(poison(kvtpu.KVCache.init(fmt, **dims, page_len=page,
                                           num_pages=blocks * local)))
  assert paged.k.values.sharding.spec[1] == ("data", "model")
  for i in range(blocks):  # Each device holds exactly its block.
    assert sum(memory.array_nbytes(leaf.addressable_shards[i].data.shape, leaf.dtype)
               for leaf in jax.tree.leaves(paged)) == sh.per_device_bytes(paged)
  allocator = sh.allocator(paged)
  assert (allocator.shards, allocator.model_shards) == (data, model)
  ref = make(fmt, num_pages=1 + b * width, page=page)
  ref_allocator = PageAllocator.for_cache(ref)
  rng = np.random.default_rng(6)
  # The kernels' spans and log-sum-exps are tested in tests/pallas_kernels/test_spans.py
  # and through `attend` in tests/test_attention.py; under shard_map they compile for
  # TPU below. (The interpreter takes minutes for these steps under shard_map.)
  sharded = jax.jit(lambda c, k, v, q, n: _layers(
      c, k, v, q, n, lambda c, i, k, v, n: sh.update(c, i, k, v, valid_len=n),
      lambda q, c, i, n: sh.attend(q, c, i, valid_len=n, impl=impl), sh.advance))
  single = jax.jit(lambda c, k, v, q, n: _layers(
      c, k, v, q, n, lambda c, i, k, v, n: c.update(i, k, v, valid_len=n),
      lambda q, c, i, n: kvtpu.attend(q, c, i, valid_len=n, impl=impl),
      lambda c, n: c.advance(n)))
  held = np.zeros(b, np.int64)
  t = SEQUENCE_WIDTH
  for i, valid in enumerate(SEQUENCE_STEPS):
    valid = np.asarray(valid, np.int32)
    for s in range(b):
      want = held[s] + (0 if (i, s) == (len(SEQUENCE_STEPS) - 1, 1) else valid[s])
      allocator.reserve(s, int(want))
      ref_allocator.reserve(s, int(want))
    allocator.check()
    paged = paged.with_page_table(jax.device_put(allocator.table, paged.page_table.sharding))
    ref = ref.with_page_table(ref_allocator.table)
    k = jnp.asarray(kv_with_outliers(rng, (b, t, K, H)))
    v = jnp.asarray(rng.standard_normal((b, t, K, H)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((b, t, 2 * K, H)) * 0.2, jnp.float32)
    if i == 2:  # A NaN query row stays NaN, as unsharded (the merge must not hide it).
      q = q.at[2, 7, 1, 5].set(jnp.nan)
    paged, got = sharded(paged, k, v, q, valid)
    ref, want = single(ref, k, v, q, valid)
    got, want = np.array(got), np.array(want)
    if i == 2:
      assert np.isnan(got[:, 2, 7, 1]).all() and np.isnan(want[:, 2, 7, 1]).all()
      got[:, 2, 7, 1] = want[:, 2, 7, 1] = 0
    if i == len(SEQUENCE_STEPS) - 1:  # Sequence 1's queries read positions never stored.
      got, want = (np.delete(x, 1, axis=1) for x in (got, want))
    assert np.isfinite(got).all()
    assert_close(got, want, atol=2e-6, rtol=2e-6, name=f"chunk {i}")
    held = np.asarray(ref.lengths)
  np.testing.assert_array_equal(paged.lengths, ref.lengths)
  assert held[1] == 32 and np.asarray(paged.overflow).tolist() == [False, True, False, False]
  np.testing.assert_array_equal(paged.overflow, ref.overflow)
  for name, count in ref.counts().items():
    np.testing.assert_array_equal(paged.counts()[name], count, err_msg=name)

  # Block s M + m of the pool holds the pages of columns [m W/M, (m+1) W/M): read through
  # global page ids, the pool holds what the unsharded one holds.
  columns = np.arange(width)[None, :]
  blocks_of = (np.arange(b)[:, None] // (b // data)) * model + columns // (width // model)
  table = np.where(allocator.table > 0, allocator.table + blocks_of * local, 0)
  whole = jax.device_get(paged).with_page_table(table)
  for which in ("k", "v"):
    a, c = (np.asarray(x.dequantized(1, which)) for x in (whole, jax.device_get(ref)))
    for s in range(b):
      np.testing.assert_array_equal(a[s, :, :held[s]], c[s, :, :held[s]])


def test_sequence_sharding_refuses_what_it_cannot_split():
  from kvtpu.sharding import CacheSharding, per_device_bytes

  sh = CacheSharding(jax.make_mesh((2, 4), ("data", "model")), strategy="sequence")
  dims = dict(num_layers=1, batch=4, kv_heads=2, head_dim=H)
  with pytest.raises(ValueError, match="strategy='sequence' .* use a paged cache"):
    sh.init("int8", **dims, max_len=64)
  with pytest.raises(ValueError, match=r"max_len / page_len=6 must be a multiple of 4"):
    sh.init("int8", **dims, max_len=96, page_len=16, num_pages=80)
  with pytest.raises(ValueError, match=r"num_pages=20 must be a multiple of the number of "
                     r"devices \(data x model\) 8"):
    sh.init("int8", **dims, max_len=64, page_len=16, num_pages=20)
  with pytest.raises(ValueError, match="use a paged cache"):
    per_device_bytes("int8", **dims, max_len=64, data=2, model=4, strategy="sequence")
  with pytest.raises(ValueError, match="pages_per_sequence=6 must be a multiple of model_shards=4"):
    PageAllocator(num_pages=16, page_len=8, batch=2, pages_per_sequence=6, model_shards=4)
  cache = make("int8", num_pages=9, page=PAGE)
  with pytest.raises(ValueError, match="kv_span is for paged caches"):
    make("int8").update(0, *(jnp.zeros((B, 1, K, H)),) * 2, kv_span=(0, PAGE))
  with pytest.raises(ValueError, match=f"kv_span's stop must be a multiple of page_len={PAGE}"):
    cache.update(0, *(jnp.zeros((B, 1, K, H)),) * 2, kv_span=(0, 100))


@pytest.mark.tpu_compile
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
@pytest.mark.parametrize("fmt,t,generation", [
    ("int2-asym", 20, "v5e"), pytest.param("int8", 20, "v6e", marks=pytest.mark.slow),
    pytest.param("k=int2-asym-c16,v=int2-nu-sbf16-rot+sink4+recent32", 64, "v5e",
                 marks=pytest.mark.slow)])
def test_steps_over_pages_of_64_compile_for_tpu(fmt, t, generation):
  # A chunk spanning pages shorter than a TPU tile of their scales (positions in lanes)
  # and int2 pools of 64-position pages: update and attend through the Pallas kernels.
  sharding = jax.sharding.SingleDeviceSharding(tpu_device(generation))
  on_tpu = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)  # noqa: E731
  cache = jax.tree.map(on_tpu, jax.eval_shape(lambda: kvtpu.KVCache.init(
      fmt, num_layers=2, batch=B, kv_heads=K, max_len=2048, head_dim=H, page_len=64,
      num_pages=1 + B * 32)))
  kv = on_tpu(jax.ShapeDtypeStruct((B, t, K, H), jnp.float32))
  q = on_tpu(jax.ShapeDtypeStruct((B, t, 4 * K, H), jnp.float32))

  def step(cache, k, v, q):
    cache = cache.update(1, k, v)
    return kvtpu.attend(q, cache, 1, impl="pallas"), cache.advance(t)

  jax.jit(step, donate_argnums=0).lower(cache, kv, kv, q).compile()  # Raises if rejected.


@pytest.mark.tpu_compile
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
@pytest.mark.parametrize("fmt,t", [("int8", 1), pytest.param(
    "int4-sbf16-rot+sink4+recent252", 64, marks=pytest.mark.slow)])
def test_sequence_sharded_step_compiles_for_tpu_in_place(fmt, t):
  # 2 kv heads on 4 chips of a v5e 2x2: every chip holds a quarter of each sequence's
  # pages; the write kernel, the attention kernel over the chip's span, and the merge
  # across chips compile under shard_map, with the pool updated in place.
  from jax.experimental import topologies
  from jax.sharding import Mesh

  from kvtpu.sharding import CacheSharding

  devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
  sh = CacheSharding(Mesh(np.array(devices).reshape(1, 4), ("data", "model")),
                     strategy="sequence")
  b, width = 8, 32
  cache = jax.eval_shape(lambda: kvtpu.KVCache.init(
      fmt, num_layers=2, batch=b, kv_heads=K, max_len=64 * width, head_dim=H, page_len=64,
      num_pages=4 * (1 + b * width // 4)))
  typed = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
  cache = jax.tree.map(typed, cache, sh.shardings(cache))
  kv = jax.ShapeDtypeStruct((b, t, K, H), jnp.float32)
  q = jax.ShapeDtypeStruct((b, t, 4 * K, H), jnp.float32)

  def step(cache, k, v, q):
    cache = sh.update(cache, 1, k, v)
    return sh.attend(q, cache, 1, impl="pallas"), sh.advance(cache, t)

  compiled = jax.jit(step, donate_argnums=0).lower(cache, kv, kv, q).compile()
  # The pool is updated in place: temporaries are a small fraction of the device's cache.
  assert compiled.memory_analysis().temp_size_in_bytes < sh.per_device_bytes(cache) / 4
