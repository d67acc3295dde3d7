"""2-bit storage: exact levels, packed bytes, the write paths and its refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvtpu
from kvtpu import memory, qtensor, quant, rotation
from kvtpu.formats import QuantSpec
from tests.helpers import kv_with_outliers, poison


@pytest.mark.parametrize("name, levels", [("int2", [-1, 0, 1]), ("int2-asym", [-2, -1, 0, 1])])
def test_every_level_is_stored_and_read_back_exactly(name, levels):
  # One token per level pattern: each token's H values walk through every level, so
  # every stored code appears in every channel position of some token.
  spec = QuantSpec.parse(name)
  h, n = 16, len(levels)
  codes = np.array([[levels[(i + j) % n] for j in range(h)] for i in range(n)], np.float64)
  if spec.symmetric:  # amax = 1 -> scale = 1 / qmax = 1: x = q exactly.
    x = codes
  else:  # min -3, max 1.5: scale 4.5 / 3 = 1.5, zero point 0: x = 1.5 q exactly.
    x = codes * 1.5
  x = x[None, :, None, :]  # [B=1, T=n, K=1, H]
  cache = poison(kvtpu.KVCache.init(name, num_layers=1, batch=1, kv_heads=1, max_len=128,
                                    head_dim=h))
  cache = jax.jit(lambda c, x: c.update(0, x, x).advance(n))(cache, jnp.asarray(x, jnp.float32))
  stored = np.asarray(cache.k.relayout(False).values[0, 0, 0, :n], np.int64)
  assert cache.k.values.dtype == jnp.int2
  assert set(np.unique(stored)) <= set(levels)
  # Dequantized (model coordinates) equals the input exactly: every value is on the grid.
  np.testing.assert_array_equal(np.asarray(cache.dequantized(0, "k"))[0, 0, :n], x[0, :, 0])
  # The stored codes are the quantizer's own, and jnp's int2 round trip is exact.
  direct = quant.quantize(jnp.asarray(x, jnp.float32), spec)
  np.testing.assert_array_equal(stored, np.asarray(direct.q, np.int64)[0, :, 0])
  every = jnp.asarray(levels, jnp.int8)
  np.testing.assert_array_equal(every.astype(jnp.int2).astype(jnp.int8), every)


@pytest.mark.parametrize("name", ["int2", "int2-asym-sbf16", "k4v2", "k=int8,v=int2-rot"])
def test_bytes_are_a_quarter_byte_a_value(name):
  dims = dict(num_layers=2, batch=3, kv_heads=2, max_len=256, head_dim=64)
  cache = kvtpu.KVCache.init(name, **dims)
  fmt = cache.fmt
  assert cache.nbytes == memory.cache_bytes(name, **dims)
  per_token = sum(2 * 64 * spec.dtype.bits / 8 + 2 * (4 if spec.scale_dtype == "float32" else 2)
                  + (0 if spec.symmetric else 2 * 4) for spec in (fmt.k, fmt.v))
  assert memory.bytes_per_token(name, kv_heads=2, head_dim=64) == per_token
  # int2 values: 64 channels at 2 bits = 16 bytes per token and head.
  assert memory.array_nbytes((256, 64), jnp.int2) == 256 * 16


@pytest.mark.parametrize("max_len", [16, 100, 200])
def test_max_len_must_be_a_multiple_of_128(max_len):
  with pytest.raises(ValueError, match=f"int2 storage needs max_len a multiple of 128.*"
                                       f"got max_len={max_len}"):
    kvtpu.KVCache.init("k4v2", num_layers=1, batch=1, kv_heads=1, max_len=max_len, head_dim=8)
  kvtpu.KVCache.init("int4", num_layers=1, batch=1, kv_heads=1, max_len=max_len, head_dim=8)


def test_q_dtype_is_checked():
  x = jnp.ones((2, 8))
  assert quant.quantize(x, QuantSpec.parse("int2"), q_dtype=jnp.int8).q.dtype == jnp.int8
  with pytest.raises(ValueError, match="q_dtype must be a signed integer dtype"):
    quant.quantize(x, QuantSpec.parse("int4"), q_dtype=jnp.int2)
  with pytest.raises(ValueError, match="q_dtype must be a signed integer dtype"):
    quant.quantize(x, QuantSpec.parse("fp8_e4m3"), q_dtype=jnp.int8)


@pytest.mark.parametrize("t", [1, 3, 15, 16, 20])
def test_block_writes_of_int2_equal_the_scatter(t, rng):
  # The TPU paths must store exactly what the scatter does: the Pallas kernel
  # ("interpret": narrows int8 codes to int2 tile by tile) and the per-sequence
  # blocks (widen a chunk of fewer than 16 tokens to a block of 16 positions, taking
  # each row's token by its target), for ragged lengths that start at 0, mid-cache,
  # and near capacity (where the widened block is clamped back from the end), with
  # partial chunks. Rows of 128 lanes: what the kernel takes for int2.
  s = 128
  lengths = np.array([0, 5, s - 16, s - t, s - 2, s - 1, s])
  valid = np.array([t, max(t - 1, 0), t, t, min(t, 2), t, t])
  b = len(lengths)
  store = jnp.asarray(rng.integers(-2, 2, size=(2, b, 2, s, 128)), jnp.int8).astype(jnp.int2)
  values = jnp.asarray(rng.integers(-2, 2, size=(b, t, 2, 128)), jnp.int8)
  where = qtensor.Placement.of(jnp.asarray(lengths, jnp.int32), jnp.asarray(valid, jnp.int32), t, s)
  scatter = qtensor.write_rows(store, 1, values, where, 3, "scatter")
  blocks = qtensor.write_rows(store, 1, values, where, 3, "blocks")
  np.testing.assert_array_equal(np.asarray(blocks, np.int8), np.asarray(scatter, np.int8))
  kernel = qtensor.write_rows(store, 1, values, where, 3, "interpret")
  np.testing.assert_array_equal(np.asarray(kernel, np.int8), np.asarray(scatter, np.int8))
  # And the scatter put each kept token at its position, leaving the rest untouched.
  expect = np.asarray(store, np.int8).copy()
  for i in range(b):
    for j in range(t):
      if j < valid[i] and lengths[i] + j < s:
        expect[1, i, :, lengths[i] + j] = np.asarray(values)[i, j]
  np.testing.assert_array_equal(np.asarray(scatter, np.int8), expect)


@pytest.mark.parametrize("name", ["int2-asym-rot+sink4+recent32", "int2-nu-sbf16-rot+sink4+recent32"])
def test_int2_cache_attends_like_its_dequantized_float64(name, rng):
  # An int2 cache with windows, through update and the XLA and interpret paths, at
  # head_dim 128 (the kernels' int2 layout) with ragged lengths.
  from tests.helpers import np_attention

  lengths, t = np.array([0, 1, 130, 250]), 3
  cache = poison(kvtpu.KVCache.init(name, num_layers=1, batch=4,
                                    kv_heads=1, max_len=256, head_dim=128))
  pre = jnp.asarray(kv_with_outliers(rng, (4, 250, 1, 128)), jnp.float32)
  cache = cache.update(0, pre, pre * 0.5, valid_len=lengths).advance(lengths)
  new = jnp.asarray(kv_with_outliers(rng, (4, t, 1, 128)), jnp.float32)
  cache = cache.update(0, new, new[:, ::-1], valid_len=np.array([3, 3, 3, 3]))
  q = jnp.asarray(rng.standard_normal((4, t, 2, 128)), jnp.float32) * 0.1
  held = np.minimum(lengths + t, 256)
  keys = np.asarray(cache.dequantized(0, "k", held=jnp.asarray(held)), np.float64)
  vals = np.asarray(cache.dequantized(0, "v", held=jnp.asarray(held)), np.float64)
  want = np_attention(q, keys, vals, lengths, [3, 3, 3, 3], 128**-0.5)
  for impl in ("xla", "interpret"):
    out = np.asarray(kvtpu.attend(q, cache, 0, impl=impl, precision="highest"), np.float64)
    scale = np.max(np.abs(want))
    np.testing.assert_allclose(out, want, atol=1e-4 * scale, err_msg=impl)
  # The stored int2 codes are the quantizer's, of the rotated chunk (handed over as int8).
  spec = cache.fmt.k
  direct = quant.quantize(rotation.rotate(new, jnp.float32), spec)
  for b in range(4):
    got = np.asarray(cache.k.values[0, b, 0, lengths[b]:lengths[b] + t], np.int64)
    np.testing.assert_array_equal(got, np.asarray(direct.q, np.int64)[b, :, 0])
