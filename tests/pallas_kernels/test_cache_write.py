"""The in-place cache-write kernel, in TPU interpret mode, against a numpy oracle.

The kernel moves bits: every stored dtype (f32, bf16, int8, fp8, int4, int2 values
with positions in sublanes; f32 and bf16 scales with positions in lanes) must hold
exactly the oracle's bytes, NaN payloads included, with writes starting and ending at
tile edges (0, 1, tile-1, tile, tile+1, capacity), chunks longer than a tile, empty
writes and a store poisoned with NaN where it is not written.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kvtpu.pallas_kernels.cache_write import (
  cache_write,
  layout_error,
  ref_cache_write,
  tile_positions,
  tiles_touched,
)

from tests.helpers import bits, slow_unless
from tests.pallas_kernels.cases import INTERPRET, tpu_device

NUM_LAYERS, KV_HEADS = 2, 2


def oracle(store, new, layer, lo, hi, seq_axis):
  """The expected bits, one position at a time."""
  out = bits(store).copy()
  src = bits(jnp.asarray(new).astype(store.dtype))
  for b in range(store.shape[1]):
    for t in range(new.shape[1]):
      p = lo[b] + t
      if p < min(hi[b], store.shape[seq_axis]):
        if seq_axis == 3:
          out[layer, b, :, p, :] = src[b, t]
        else:
          out[layer, b, :, :, p] = src[b, t]
  return out


def make_store(rng, dtype, shape):
  if jnp.issubdtype(dtype, jnp.floating):
    x = rng.standard_normal(shape).astype(np.float32) * 3
    x[..., ::3] = np.nan  # Poisoned: bytes the write must leave alone.
    return jnp.asarray(x).astype(dtype)
  info = jnp.iinfo(dtype)
  return jnp.asarray(rng.integers(info.min, info.max + 1, shape), np.int8).astype(dtype)


def make_chunk(rng, dtype, shape):
  if jnp.issubdtype(dtype, jnp.floating):
    x = rng.standard_normal(shape).astype(np.float32) * 3
    x[:, :, 0, 0] *= 100  # An outlier per token, and a NaN that must be stored as it is.
    x[0, 0, 0, -1] = np.nan
    return jnp.asarray(x).astype(dtype)
  info = jnp.iinfo(dtype)
  codes = jnp.asarray(rng.integers(info.min, info.max + 1, shape), jnp.int8)
  return codes if dtype == jnp.int2 else codes.astype(dtype)  # int2 codes travel as int8.


VALUE_DTYPES = (jnp.float32, jnp.bfloat16, jnp.int8, jnp.float8_e4m3fn, jnp.int4, jnp.int2)
CASES = [(d, 3) for d in VALUE_DTYPES] + [(d, 4) for d in (jnp.float32, jnp.bfloat16)]


@pytest.mark.parametrize("dtype,seq_axis", [
    pytest.param(*c, marks=slow_unless(c in ((jnp.int4, 3), (jnp.bfloat16, 4)))) for c in CASES],
    ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("t_kind", ["one", "tile+1"])
def test_writes_exactly_the_chunk(dtype, seq_axis, t_kind, rng):
  minor = 128 if dtype == jnp.int2 else 64  # int2 rows need whole 128-lane tiles.
  tile = tile_positions(dtype, seq_axis == 4, 1 << 20)
  s = 3 * tile
  t = 1 if t_kind == "one" else tile + 1
  # Starts at and around tile edges, at the last position and at capacity (nothing
  # fits); valid lengths 0, 1, T, and past the end.
  lo = np.array([0, 1, tile - 1, tile, tile + 1, s - 1, s, 2 * tile - 1], np.int32)
  valid = np.array([t, 1, t, 0, t, t, t, max(t - 2, 1)], np.int32)
  hi = np.minimum(lo + valid, s).astype(np.int32)
  b = len(lo)
  shape = ((NUM_LAYERS, b, KV_HEADS, s, minor) if seq_axis == 3
           else (NUM_LAYERS, b, KV_HEADS, 2, s))
  store = make_store(rng, dtype, shape)
  new = make_chunk(rng, dtype, (b, t, KV_HEADS, shape[7 - seq_axis]))
  expected = oracle(store, new, 1, lo, hi, seq_axis)
  assert not np.array_equal(expected, bits(store)), "the case writes nothing"
  by_ref = ref_cache_write(store, new, 1, jnp.asarray(lo), jnp.asarray(hi), seq_axis=seq_axis)
  np.testing.assert_array_equal(bits(by_ref), expected)
  out = cache_write(store, new, jnp.int32(1), jnp.asarray(lo), jnp.asarray(hi),
                    seq_axis=seq_axis, interpret=INTERPRET)
  assert out.dtype == store.dtype and out.shape == store.shape
  np.testing.assert_array_equal(bits(out), expected)


def test_a_short_store_is_one_tile_and_hi_past_the_chunk_is_clamped(rng):
  # max_len below one tile: the block is the whole axis. hi beyond lo + T writes T.
  store = make_store(rng, jnp.int8, (1, 3, 1, 20, 16))
  new = make_chunk(rng, jnp.int8, (3, 4, 1, 16))
  lo, hi = np.array([0, 17, 20], np.int32), np.array([20, 20, 20], np.int32)
  expected = oracle(store, new, 0, lo, np.minimum(hi, lo + 4), 3)
  out = cache_write(store, new, 0, jnp.asarray(lo), jnp.asarray(hi), seq_axis=3,
                    interpret=INTERPRET)
  np.testing.assert_array_equal(bits(out), expected)


def test_tiles_touched_is_the_most_a_chunk_spans():
  for tile, s in ((8, 64), (32, 96), (128, 128)):
    for t in range(0, 2 * tile + 3):
      most = max((min(p + max(t, 1), s) - 1) // tile - p // tile + 1 for p in range(s))
      assert tiles_touched(t, tile, s) == most, (tile, s, t)


def test_refusals_name_the_layout(rng):
  assert layout_error((2, 1, 1, 96, 64), jnp.int8, 3) is None
  assert "multiple of 32" in layout_error((2, 1, 1, 48, 64), jnp.int8, 3)
  assert "multiple of 128" in layout_error((2, 1, 1, 1, 200), jnp.float32, 4)
  assert "128 lanes" in layout_error((2, 1, 1, 128, 64), jnp.int2, 3)
  assert "seq_axis=2" in layout_error((2, 1, 1, 128, 64), jnp.int8, 2)
  store = make_store(rng, jnp.int8, (2, 2, 1, 48, 8))
  lohi = jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match="max_len a multiple of 32"):
    cache_write(store, jnp.zeros((2, 1, 1, 8), jnp.int8), 0, lohi, lohi, seq_axis=3,
                interpret=INTERPRET)
  store = make_store(rng, jnp.int8, (2, 2, 1, 64, 8))
  with pytest.raises(ValueError, match=r"new must be \[B=2, T, K=1, 8\]"):
    cache_write(store, jnp.zeros((2, 1, 1, 4), jnp.int8), 0, lohi, lohi, seq_axis=3,
                interpret=INTERPRET)


def paged_oracle(pool, new, layer, lo, hi, table, seq_axis):
  out = bits(pool).copy()
  src = bits(jnp.asarray(new).astype(pool.dtype))
  z = pool.shape[seq_axis]
  for b in range(new.shape[0]):
    for t in range(new.shape[1]):
      p = lo[b] + t
      if p < min(hi[b], table.shape[1] * z):
        page, offset = table[b, p // z], p % z
        if seq_axis == 3:
          out[layer, page, :, offset, :] = src[b, t]
        else:
          out[layer, page, :, :, offset] = src[b, t]
  return out


@pytest.mark.parametrize("dtype,seq_axis,pages_of", [
    (jnp.int8, 3, 2), pytest.param(jnp.int4, 3, 1, marks=pytest.mark.slow),
    pytest.param(jnp.bfloat16, 4, 1, marks=pytest.mark.slow),
    pytest.param(jnp.float32, 3, 0.5, marks=pytest.mark.slow)])
def test_writes_pages_through_the_page_table(dtype, seq_axis, pages_of, rng):
  # A pool of pages of Z = pages_of tiles (half a tile: one block is the page), page 0
  # the null page. Each sequence owns the pages its positions need, scattered over the
  # pool; the rest of its table row is unallocated (-1, or a page another sequence owns:
  # a stale entry), which a sequence that writes nothing must not touch.
  tile = tile_positions(dtype, seq_axis == 4, 1 << 20)
  z = int(tile * pages_of)
  width = 6  # pages per sequence: capacity 6 Z.
  lo = np.array([0, z - 1, z, 3 * z + 1, 6 * z - 1, 6 * z, 2 * z], np.int32)
  t = z + 2
  hi = np.minimum(lo + np.array([t, t, 1, t, t, t, 0]), width * z).astype(np.int32)
  b = len(lo)
  needs = [list(range(a // z, -(-e // z))) if e > a else [] for a, e in zip(lo, hi, strict=True)]
  num_pages = 1 + sum(len(n) for n in needs) + 3  # null page, owned pages, 3 free.
  order = rng.permutation(np.arange(1, num_pages))
  table = np.full((b, width), -1, np.int32)
  k = 0
  for i, need in enumerate(needs):
    for p in need:
      table[i, p] = order[k]
      k += 1
  table[6, 2] = table[0, 0]  # A stale entry of a sequence that writes nothing.
  minor = 64
  shape = ((NUM_LAYERS, num_pages, KV_HEADS, z, minor) if seq_axis == 3
           else (NUM_LAYERS, num_pages, KV_HEADS, 2, z))
  pool = make_store(rng, dtype, shape)
  new = make_chunk(rng, dtype, (b, t, KV_HEADS, shape[7 - seq_axis]))
  expected = paged_oracle(pool, new, 1, lo, hi, table, seq_axis)
  by_ref = ref_cache_write(pool, new, 1, jnp.asarray(lo), jnp.asarray(hi), seq_axis=seq_axis,
                           page_table=jnp.asarray(table))
  np.testing.assert_array_equal(bits(by_ref), expected)
  out = cache_write(pool, new, 1, jnp.asarray(lo), jnp.asarray(hi), seq_axis=seq_axis,
                    page_table=jnp.asarray(table), interpret=INTERPRET)
  np.testing.assert_array_equal(bits(out), expected)
  with pytest.raises(ValueError, match=r"page_table must be an integer \[B=7"):
    cache_write(pool, new, 1, jnp.asarray(lo), jnp.asarray(hi), seq_axis=seq_axis,
                page_table=jnp.asarray(table[:3]), interpret=INTERPRET)


@pytest.mark.parametrize("dtype,generation", [
    (jnp.int4, "v5e"), pytest.param(jnp.int8, "v6e", marks=pytest.mark.slow),
    pytest.param(jnp.int2, "v5e", marks=pytest.mark.slow)])
def test_paged_write_compiles_in_place_for_tpu(dtype, generation):
  # Mosaic takes the table-driven index map, and with the pool donated the write holds
  # no copy of it: temporaries stay at the placed rows' size.
  b, t, z, pages, heads, h = 16, 8, tile_positions(dtype, False, 1 << 20), 513, 8, 128
  sharding = jax.sharding.SingleDeviceSharding(tpu_device(generation))
  on_tpu = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)  # noqa: E731
  pool = on_tpu((2, pages, heads, z, h), dtype)
  new = on_tpu((b, t, heads, h), jnp.int8 if dtype == jnp.int2 else dtype)
  vec = on_tpu((b,), jnp.int32)
  table = on_tpu((b, 32), jnp.int32)
  step = jax.jit(lambda pool, new, lo, hi, table: cache_write(
      pool, new, 1, lo, hi, seq_axis=3, page_table=table), donate_argnums=0)
  stats = step.lower(pool, new, vec, vec, table).compile().memory_analysis()
  pool_bytes = 2 * pages * heads * z * h * jnp.iinfo(dtype).bits // 8
  assert stats.alias_size_in_bytes >= pool_bytes
  assert stats.temp_size_in_bytes < pool_bytes / 50, stats.temp_size_in_bytes


@pytest.mark.parametrize("z,t", [(64, 20), pytest.param(32, 70, marks=pytest.mark.slow)])
def test_scale_pages_shorter_than_a_lane_tile_compile_for_tpu(z, t):
  # Per-token scale pools [L, P, K, G, Z] hold positions in lanes: with pages of fewer than
  # 128 positions a chunk spanning several pages still gives Mosaic whole minor blocks.
  b, pages, heads, groups = 4, 65, 8, 2
  sharding = jax.sharding.SingleDeviceSharding(tpu_device("v5e"))
  on_tpu = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)  # noqa: E731
  pool = on_tpu((2, pages, heads, groups, z), jnp.float32)
  new = on_tpu((b, t, heads, groups), jnp.float32)
  vec = on_tpu((b,), jnp.int32)
  table = on_tpu((b, 2048 // z), jnp.int32)
  step = jax.jit(lambda pool, new, lo, hi, table: cache_write(
      pool, new, 1, lo, hi, seq_axis=4, page_table=table), donate_argnums=0)
  stats = step.lower(pool, new, vec, vec, table).compile().memory_analysis()
  assert stats.alias_size_in_bytes >= 2 * pages * heads * groups * z * 4
