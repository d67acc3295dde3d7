"""Ahead-of-time TPU compilation of a decode step, through libtpu, on any machine.

Checks that every format compiles for real TPU generations and that the compiled
step's memory agrees with kvtpu's accounting: the donated cache is aliased in place
(no copy per step), the step's temporaries hold no copy of it, and its device bytes
equal `KVCache.nbytes` (int4 at half a byte) up to the tile padding of the small
per-sequence arrays.
"""

import functools
import importlib.util

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import topologies

import kvtpu
from tests.helpers import slow_unless

pytestmark = [
    pytest.mark.tpu_compile,
    pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                       reason="libtpu (the `tpu` extra) is not installed: no TPU compiler"),
]


@functools.cache
def tpu_device(topology: str):
  return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices[0]


def decode_step(cache, q, k, v):
  for layer in range(cache.num_layers):
    cache = cache.update(layer, k, v)
    q = kvtpu.attend(q, cache, layer, impl="pallas")
  return cache.advance(1), q


CASES = [("v5e:1x1", f) for f in ("bf16", "int8", "int4", "fp8_e4m3", "fp8_e5m2", "k8v4",
                                   "int4-asym-g32")]
CASES += [(t, f) for t in ("v4:1x1x1", "v5p:1x1x1", "v6e:1x1") for f in ("int8", "int4")]
CASES += [("v5e:1x1", "int2-asym"), ("v6e:1x1", "int2")]


@pytest.mark.parametrize("topology,fmt", [
    pytest.param(*c, marks=slow_unless(c == ("v5e:1x1", "int8"))) for c in CASES])
def test_decode_step_compiles_in_place_with_exact_bytes(topology, fmt):
  sharding = jax.sharding.SingleDeviceSharding(tpu_device(topology))
  # int2 writes place each chunk in a tile of 128 positions (int8 codes, 64 KiB per
  # sequence and kv head here): a longer cache keeps that below a quarter of it.
  max_len = 4096 if fmt.startswith("int2") else 1024
  dims = dict(num_layers=2, batch=4, kv_heads=4, max_len=max_len, head_dim=128)
  cache = jax.eval_shape(lambda: kvtpu.KVCache.init(fmt, **dims))
  nbytes = kvtpu.memory.cache_bytes(fmt, **dims)
  on_tpu = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)  # noqa: E731
  args = jax.tree.map(on_tpu, (cache, jax.ShapeDtypeStruct((4, 1, 16, 128), jnp.bfloat16),
                               jax.ShapeDtypeStruct((4, 1, 4, 128), jnp.bfloat16),
                               jax.ShapeDtypeStruct((4, 1, 4, 128), jnp.bfloat16)))
  compiled = jax.jit(decode_step, donate_argnums=0).lower(*args).compile()
  stats = compiled.memory_analysis()
  qkv = 2 * (4 * 16 * 128 + 2 * 4 * 4 * 128)
  # Each small array (lengths, overflow, errors, counters) pads to at most one 4 KiB tile.
  padding = stats.argument_size_in_bytes - qkv - nbytes
  assert 0 <= padding <= 4 * 4096, f"{fmt}: TPU holds {padding} bytes more than kvtpu counts"
  assert stats.alias_size_in_bytes >= nbytes, f"{fmt}: cache not donated in place"
  assert stats.alias_size_in_bytes - nbytes == padding
  # Writes update the cache in place: no temporary copy of it (XLA's scatter copies
  # the whole cache around every layer's write on TPU, in a layout of its own; XLA
  # converts a whole int2 array around each dynamic-update-slice of it: the Pallas
  # write kernel does neither).
  assert stats.temp_size_in_bytes < nbytes / 4, (
      f"{fmt}: {stats.temp_size_in_bytes} bytes of temporaries for a {nbytes}-byte cache")


@pytest.mark.parametrize("fmt,paged", [
    pytest.param("bf16", False), pytest.param("int8", True, marks=pytest.mark.slow),
    pytest.param("int2-nu-sbf16-rot", False, marks=pytest.mark.slow)])
def test_head_dim_64_step_holds_no_copy_of_the_cache(fmt, paged):
  # XLA stores an [S, 64] slab channel-major (positions minor) and, before values were
  # stored transposed, copied the whole cache into the kernels' row-major layout and
  # back around every call: 0.10 GB of temporaries for this 0.10 GB bf16 cache (2x at
  # S = 131072). Transposed values are the layout both agree on; int2 at head_dim 64,
  # which the kernels refuse as [S, 64] rows, compiles too.
  sharding = jax.sharding.SingleDeviceSharding(tpu_device("v5e:1x1"))
  s = 65536
  paging = dict(page_len=1024, num_pages=s // 1024 + 1) if paged else {}
  dims = dict(num_layers=1, batch=1, kv_heads=3, max_len=s, head_dim=64, **paging)
  cache = jax.eval_shape(lambda: kvtpu.KVCache.init(fmt, **dims))
  assert cache.k.transposed and cache.v.transposed
  nbytes = kvtpu.memory.cache_bytes(fmt, **dims)
  on_tpu = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)  # noqa: E731
  args = jax.tree.map(on_tpu, (cache, jax.ShapeDtypeStruct((1, 1, 9, 64), jnp.bfloat16),
                               jax.ShapeDtypeStruct((1, 1, 3, 64), jnp.bfloat16),
                               jax.ShapeDtypeStruct((1, 1, 3, 64), jnp.bfloat16)))
  stats = jax.jit(decode_step, donate_argnums=0).lower(*args).compile().memory_analysis()
  assert stats.alias_size_in_bytes >= nbytes, f"{fmt}: cache not donated in place"
  # Values padded to 128 lanes would hold twice their bytes; the small per-token scale
  # arrays may pad their 3 kv heads to a 4-row tile.
  assert stats.argument_size_in_bytes < 1.1 * nbytes
  assert stats.temp_size_in_bytes < nbytes / 16, (
      f"{fmt}: {stats.temp_size_in_bytes} bytes of temporaries for a {nbytes}-byte cache")


@pytest.mark.parametrize("fmt,head_dim", [
    pytest.param("int8", 96), pytest.param("int2-asym", 32, marks=pytest.mark.slow),
    pytest.param("int4-sbf16-rot+sink4+recent252", 80, marks=pytest.mark.slow),
    pytest.param("bf16", 192, marks=pytest.mark.slow)])
def test_other_head_dims_store_transposed_and_compile_without_copies(fmt, head_dim):
  # Every head_dim that is not a multiple of 128 stores [H, S] values: blocks of H rows
  # (not whole 8-, 16- or 32-row tiles at 80 or 96) that Mosaic must lower, decode and
  # prefill, with the cache updated in place.
  sharding = jax.sharding.SingleDeviceSharding(tpu_device("v5e:1x1"))
  # int2 writes place a chunk in tiles of 128 positions as int8 (~0.5 MB here): a longer
  # cache keeps that below a quarter of it.
  max_len = 32768 if fmt.startswith("int2") else 8192
  dims = dict(num_layers=1, batch=2, kv_heads=2, max_len=max_len, head_dim=head_dim)
  cache = jax.eval_shape(lambda: kvtpu.KVCache.init(fmt, **dims))
  assert cache.k.transposed and cache.v.transposed
  nbytes = kvtpu.memory.cache_bytes(fmt, **dims)
  on_tpu = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)  # noqa: E731
  for t in (1, 32):
    args = jax.tree.map(on_tpu, (cache, jax.ShapeDtypeStruct((2, t, 8, head_dim), jnp.bfloat16),
                                 jax.ShapeDtypeStruct((2, t, 2, head_dim), jnp.bfloat16),
                                 jax.ShapeDtypeStruct((2, t, 2, head_dim), jnp.bfloat16)))
    stats = jax.jit(decode_step, donate_argnums=0).lower(*args).compile().memory_analysis()
    assert stats.alias_size_in_bytes >= nbytes, f"{fmt}: cache not donated in place"
    assert stats.temp_size_in_bytes < nbytes / 4, (fmt, t, stats.temp_size_in_bytes, nbytes)
