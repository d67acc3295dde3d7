"""Rotated specs (`rot`): the matrix, the round trip, attention invariance, calibration."""

import jax.numpy as jnp
import numpy as np
import pytest

import kvtpu
from kvtpu import rotation
from tests.helpers import assert_close, kv_with_outliers, np_attention, poison


@pytest.mark.parametrize("h", [1, 2, 3, 16, 64, 80, 96, 128, 256])
def test_matrix_is_orthogonal_and_fixed(h):
  r = rotation.rotation_matrix(h)
  assert r.shape == (h, h) and r.dtype == np.float64
  np.testing.assert_allclose(r @ r.T, np.eye(h), atol=1e-12)
  np.testing.assert_array_equal(r, rotation.rotation_matrix(h))  # Deterministic.
  if h & (h - 1) == 0:  # Normalized Hadamard: +-1/sqrt(H), symmetric, first row constant.
    np.testing.assert_allclose(np.abs(r), h**-0.5, rtol=1e-15)
    np.testing.assert_array_equal(r, r.T)
    assert (r[0] > 0).all()
  r[0, 0] = 7.0  # A copy: the module's matrix is untouched.
  assert rotation.rotation_matrix(h)[0, 0] != 7.0


@pytest.mark.parametrize("h", [0, -2, 2.0, True, None])
def test_bad_head_dim(h):
  with pytest.raises(ValueError, match="head_dim must be a positive int"):
    rotation.rotation_matrix(h)


def test_rotate_round_trips_and_spreads_an_outlier_channel(rng):
  x = kv_with_outliers(rng, (2, 5, 3, 64), channel_scale=100.0)
  y = np.asarray(rotation.rotate(jnp.asarray(x)))
  atol = 2e-6 * np.abs(x).max()  # float32 sums of 64 terms, against the largest value.
  np.testing.assert_allclose(y, x.astype(np.float64) @ rotation.rotation_matrix(64), rtol=0,
                             atol=atol)
  np.testing.assert_allclose(np.asarray(rotation.unrotate(jnp.asarray(y))), x, rtol=0, atol=atol)
  # Norms are kept; a one-hot channel spreads evenly over the 64 coordinates.
  np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
  e = np.zeros(64, np.float32)
  e[5] = 8.0
  np.testing.assert_allclose(np.abs(np.asarray(rotation.rotate(jnp.asarray(e)))), 1.0, rtol=1e-6)
  assert rotation.rotate(jnp.ones((2, 16), jnp.bfloat16)).dtype == jnp.bfloat16
  assert rotation.rotate(jnp.ones((2, 16), jnp.bfloat16), jnp.float32).dtype == jnp.float32


def test_grammar_names_and_descriptions():
  fmt = kvtpu.KVFormat.parse("int4-rot-asym")
  assert fmt.k.rotation and fmt.name == "int4-asym-rot"
  assert kvtpu.KVFormat.parse(fmt.name) == fmt
  assert fmt.k.description == "int4, token_head, asymmetric, rotated"
  assert kvtpu.KVFormat.parse("bf16-rot").k.description == "bf16, unscaled, rotated"
  mixed = kvtpu.KVFormat.parse("k=int4-g32-rot,v=int8")
  assert mixed.k.rotation and not mixed.v.rotation
  assert kvtpu.KVFormat.from_dict(mixed.to_dict()) == mixed
  with pytest.raises(ValueError, match="conflicts with an earlier option"):
    kvtpu.KVFormat.parse("int8-rot-rot")
  with pytest.raises(ValueError, match="only rot"):
    kvtpu.KVFormat.parse("bf16-rot-asym")
  with pytest.raises(ValueError, match="rotation must be a bool"):
    kvtpu.QuantSpec("int8", rotation=1)
  # Rotation stores no extra bytes.
  assert kvtpu.memory.bytes_per_token(fmt, kv_heads=3, head_dim=64) == \
      kvtpu.memory.bytes_per_token("int4-asym", kv_heads=3, head_dim=64)


def _filled(fmt, rng, *, prefix=(9, 0), t=4, h=64, layer=1, max_len=16, **outliers):
  cache = poison(kvtpu.KVCache.init(fmt, num_layers=2, batch=2, kv_heads=2, max_len=max_len,
                                    head_dim=h))
  gen = lambda shape: kv_with_outliers(rng, shape, **outliers)  # noqa: E731
  pre = jnp.asarray(gen((2, max(prefix), 2, h)))
  cache = cache.update(layer, pre, pre[:, ::-1] * 0.5, valid_len=np.array(prefix))
  cache = cache.advance(np.array(prefix))
  k, v = gen((2, t, 2, h)), gen((2, t, 2, h))
  return cache.update(layer, jnp.asarray(k), jnp.asarray(v))


@pytest.mark.parametrize("fmt", ["int4-asym-rot", "k=int8-rot,v=int4-g16", "k=int4,v=int4-rot",
                                 "fp8_e4m3-rot", "k=int4-nu-rot,v=int4-nu-g16-sbf16-rot"])
@pytest.mark.parametrize("impl", ["xla", "interpret"])
def test_attention_over_a_rotated_cache_equals_float64_attention_in_model_coordinates(
    fmt, impl, rng):
  """The reference un-rotates the stored tensors; the kernel path rotates the queries and
  the output instead. Both equal float64 attention over what the cache holds, mapped
  back to the model's coordinates with the float64 matrix."""
  prefix, t, h = (9, 0), 4, 64
  cache = _filled(fmt, rng, prefix=prefix, t=t, h=h)
  spec = cache.fmt

  def model_coords(which):
    stored = np.asarray(cache.tensor(which).dequantize_stored(1), np.float64)
    rotated = spec.spec(which).rotation
    return stored @ rotation.rotation_matrix(h).T if rotated else stored

  q = rng.standard_normal((2, t, 6, h)).astype(np.float32)
  out = np.asarray(kvtpu.attend(jnp.asarray(q), cache, 1, impl=impl, precision="highest"))
  v = model_coords("v")
  expect = np_attention(q, model_coords("k"), v, prefix, [t, t], h**-0.5)
  assert np.isfinite(out).all()
  assert_close(out, expect, atol=1e-4 * max(1.0, np.abs(np.nan_to_num(v)).max()), rtol=1e-3,
               name=f"{impl}[{fmt}]")


def test_rotated_bf16_cache_equals_the_plain_bf16_cache_to_rounding(rng):
  # Unit-scale data: with outlier channels a logit of ~1e3 moves by more than 1 under
  # bf16 rounding, and the two caches' softmaxes differ by more than rounding.
  plain, rotated = (_filled(f, np.random.default_rng(7), t=3, channel_scale=1.0, token_scale=1.0)
                    for f in ("bf16", "bf16-rot"))
  assert not np.array_equal(np.asarray(plain.k.values), np.asarray(rotated.k.values))
  q = jnp.asarray(rng.standard_normal((2, 3, 6, 64)), jnp.float32)
  for impl in ("xla", "interpret"):
    a, b = (np.asarray(kvtpu.attend(q, c, 1, impl=impl, precision="highest")) for c in (plain, rotated))
    # Both round K and V to bf16 once (2**-9 relative), in different coordinates.
    assert_close(b, a, atol=1e-2 * np.abs(a).max(), rtol=0, name=impl)


def test_rotation_cuts_int4_error_on_outlier_channels(rng):
  """Per-token int4 spends its grid on the outlier channel; rotated, it does not."""
  x = kv_with_outliers(rng, (2, 64, 2, 64), channel_scale=30.0, num_tokens=0)
  errors = {}
  for fmt in ("int4", "int4-rot"):
    cache = kvtpu.KVCache.init(fmt, num_layers=1, batch=2, kv_heads=2, max_len=64, head_dim=64)
    cache = cache.update(0, jnp.asarray(x), jnp.asarray(x))
    got = np.swapaxes(np.asarray(cache.dequantized(0, "k")), 1, 2)  # [B, S, K, H]
    errors[fmt] = np.linalg.norm(got - x) / np.linalg.norm(x)
  assert errors["int4-rot"] < 0.5 * errors["int4"], errors


def test_static_rotated_spec_is_calibrated_in_rotated_coordinates(rng):
  """`int8-channel-rot` scales are the per-channel absmax of the rotated keys."""
  from flax import nnx
  from kvtpu.models import calibrate as model_calibrate
  from kvtpu.models.llama import Llama

  from tests.helpers import TINY

  model = Llama(TINY, rngs=nnx.Rngs(0))
  tokens = rng.integers(0, TINY.vocab_size, (2, 16))
  stats = model_calibrate.collect_statistics(model, [tokens], kinds=("k", "k_rot"))
  seen = model_calibrate.attention_inputs(model, tokens, impl="xla")
  for layer in range(TINY.num_layers):
    k = np.asarray(seen[layer]["k"], np.float64)  # [B, T, K, H]
    k_rot = k @ rotation.rotation_matrix(TINY.head_dim)
    absmax = lambda st, i=layer: np.maximum(-np.asarray(st.min[i]), np.asarray(st.max[i]))  # noqa: E731
    np.testing.assert_allclose(absmax(stats["k_rot"]), np.abs(k_rot).max(axis=(0, 1)),
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(absmax(stats["k_rot"]), absmax(stats["k"]), rtol=0.1)


def test_a_non_finite_input_is_counted_once_and_spares_its_neighbours(rng):
  """A NaN channel becomes 0 before the rotation (which would spread it over all H
  coordinates): one value counted, the token's other channels stored."""
  x = rng.standard_normal((1, 2, 1, 16)).astype(np.float32)
  x[0, 0, 0, 3] = np.nan
  x[0, 1, 0, 5] = np.inf
  for fmt in ("int8-rot", "int8-rot+recent4"):
    cache = kvtpu.KVCache.init(fmt, num_layers=1, batch=1, kv_heads=1, max_len=4, head_dim=16)
    cache = cache.update(0, jnp.asarray(x), jnp.asarray(x)).advance(2)
    assert cache.counts()["k_nonfinite"].tolist() == [2]
    got = np.asarray(cache.tensor("k").dequantize(0))[0, 0, :2]  # The quantized store.
    clean = np.where(np.isfinite(x[0, :, 0]), x[0, :, 0], 0.0)
    np.testing.assert_allclose(got, clean, atol=0.05 * np.abs(clean).max())
    np.testing.assert_allclose(np.asarray(cache.dequantized(0, "k"))[0, 0, :2], clean,
                               atol=0.05 * np.abs(clean).max())
