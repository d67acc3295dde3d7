"""Static scale methods against closed forms, the quantizer itself and float64 numpy."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvtpu import quant
from kvtpu.cache import KVCache
from kvtpu.calibration import methods as M
from kvtpu.calibration import stats as S
from kvtpu.formats import KVFormat, QuantSpec
from tests.helpers import assert_close, feed_stats, kv_with_outliers

K, H = 2, 8  # As tests/calibration/test_stats.py (one stats layout, one compile).
# Every static granularity, symmetric and asymmetric integers, fp8, both scale dtypes.
SPECS = [f"{d}-{g}" for d in ("int8", "int8-asym", "int4", "int4-asym", "fp8_e4m3")
         for g in ("tensor", "head", "channel")] + ["int8-channel-sbf16", "fp8_e5m2-head"]


def _observe(x: np.ndarray) -> S.TensorStats:
  """Stats of `x: [L, B, T, K, H]` (layer l observes `x[l]`) or of one layer `[B, T, K, H]`."""
  x = x if x.ndim == 5 else x[None]
  stats = S.init_stats(x.shape[0], K, H)
  for layer in range(x.shape[0]):
    stats = feed_stats(stats, layer, x[layer].reshape(-1, K, H))
  return stats


def _group_minmax(x: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
  """float64 group min/max `[1|K, 1|H]` of data `[B, T, K, H]`."""
  d = x.reshape(-1, *x.shape[2:])
  axes = {"tensor": (0, 1, 2), "head": (0, 2), "channel": (0,)}[spec.granularity.value]
  return d.min(axis=axes, keepdims=True)[0], d.max(axis=axes, keepdims=True)[0]


@functools.partial(jax.jit, static_argnums=1)
def _roundtrip_jit(x, spec, scale, zero):
  res = quant.quantize(x, spec, scale=scale, zero=zero)
  return quant.dequantize(res.q, spec, scale, zero), res.saturated


def _roundtrip(x, spec, scale, zero):
  deq, saturated = _roundtrip_jit(jnp.asarray(x), spec, scale, zero)
  return np.asarray(deq, np.float64), np.asarray(saturated)


def _realized_mse(x, spec, scale, zero) -> float:
  deq, _ = _roundtrip(x, spec, scale, zero)
  return float(np.mean((deq - x.astype(np.float64)) ** 2))


@pytest.fixture(scope="module")
def outlier_stats():
  rng = np.random.default_rng(7)
  x = np.stack([kv_with_outliers(rng, (2, 512, K, H)) for _ in range(2)])  # [L, B, T, K, H]
  x[1] *= 0.01  # A layer of small values: scales follow each layer.
  return x, _observe(x)


@pytest.mark.parametrize("name", SPECS)
def test_absmax_is_scales_for_range_of_true_extremes(name, outlier_stats):
  x, stats = outlier_stats
  spec = QuantSpec.parse(name)
  scale, zero = M.compute_scales(stats, spec, "absmax")
  want_shape = (2, *quant.static_scale_shape(spec, K, H))
  assert scale.shape == want_shape and scale.dtype == spec.scale_jnp_dtype
  assert (zero is None) == spec.symmetric
  for layer in range(2):
    lo, hi = _group_minmax(x[layer], spec)
    ref_s, ref_z = quant.scales_for_range(jnp.asarray(lo, jnp.float32),
                                          jnp.asarray(hi, jnp.float32), spec)
    np.testing.assert_array_equal(np.asarray(scale[layer]), np.asarray(ref_s))
    if zero is not None:
      np.testing.assert_array_equal(np.asarray(zero[layer]), np.asarray(ref_z))
    _, saturated = _roundtrip(x[layer], spec, scale[layer], None if zero is None else zero[layer])
    assert not saturated.any()
  np.testing.assert_array_equal(M.clip_fraction(stats, spec, scale, zero), [0.0, 0.0])
  for method in ("percentile", "mse"):  # Shapes, dtypes and validity for every method.
    s, z = M.compute_scales(stats, spec, method)
    assert s.shape == want_shape and s.dtype == spec.scale_jnp_dtype
    quant.validate_scale("scale", s)
    if z is not None:
      quant.validate_scale("zero", z, is_zero=True)
      assert z.shape == want_shape
    assert np.all(np.asarray(s, np.float64) <= np.asarray(scale, np.float64) * (1 + 1e-6))


def test_scales_load_into_the_cache(outlier_stats):
  _, stats = outlier_stats
  fmt = KVFormat.parse("k=int8-asym-channel,v=fp8_e4m3-head")
  k_scale, k_zero = M.compute_scales(stats, fmt.k, "mse")
  v_scale, _ = M.compute_scales(stats, fmt.v, "percentile", percentile=99.9)
  cache = KVCache.init(fmt, num_layers=2, batch=1, kv_heads=K, max_len=8, head_dim=H,
                       k_scale=k_scale, k_zero=k_zero, v_scale=v_scale)
  np.testing.assert_array_equal(np.asarray(cache.k.scale), np.asarray(k_scale))


def _gauss_tail(z: float) -> float:
  """P(|N(0, 1)| > z)."""
  return math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("name", ["int8-tensor", "int8-asym-tensor", "fp8_e4m3-tensor"])
def test_percentile_closed_form(name):
  """Integers -500..999 once each: the clip range is np.percentile's, to the bound."""
  spec = QuantSpec.parse(name)
  x = np.broadcast_to(np.arange(-500, 1000, dtype=np.float32)[None, :, None, None], (1, 1500, K, H))
  stats = _observe(x)
  scale, zero = M.compute_scales(stats, spec, "percentile", percentile=99)
  bound = stats.relative_error_bound
  vals = x.astype(np.float64).ravel()
  s = float(scale.ravel()[0])
  if spec.symmetric:
    p = np.percentile(np.abs(vals), 99)  # 985.01 (|x|: 1..999 twice below 500).
    assert_close(s, p / spec.qmax, atol=0, rtol=bound)
  else:
    lo, hi = np.percentile(vals, 1), np.percentile(vals, 99)  # -485.01, 984.01
    assert_close(s, (hi - lo) / (spec.qmax - spec.qmin), atol=0, rtol=bound)
    # The zero point puts the grid's first value within half a step of the lower clip.
    first = (spec.qmin - float(zero.ravel()[0])) * s
    assert abs(first - lo) <= s / 2 * (1 + bound) + abs(lo) * bound
  frac = M.clip_fraction(stats, spec, scale, zero)[0]
  _, saturated = _roundtrip(x, spec, scale[0], None if zero is None else zero[0])
  assert abs(frac - saturated.mean()) < 2e-3, (frac, saturated.mean())


@pytest.mark.parametrize("name", ["int8-tensor", "int4-channel", "int8-asym-head",
                                  "fp8_e4m3-channel"])
def test_clip_fraction_matches_the_quantizer(name, rng):
  """Gaussian data, p99 clip: clip_fraction ~ the quantizer's saturated share ~ closed form.

  fp8 saturates beyond qmax * scale: 1%. Integers round up to qmax + 1/2 first, so
  a symmetric p99 clip saturates beyond z99 * (qmax + 1/2) / qmax: 0.95% for int8,
  0.58% for int4.
  """
  spec = QuantSpec.parse(name)
  x = rng.standard_normal((1, 1, 50000, K, H)).astype(np.float32)
  stats = _observe(x)
  scale, zero = M.compute_scales(stats, spec, "percentile", percentile=99)
  frac = M.clip_fraction(stats, spec, scale, zero)[0]
  _, saturated = _roundtrip(x[0], spec, scale[0], None if zero is None else zero[0])
  assert abs(frac - saturated.mean()) < 1e-3, (frac, saturated.mean())
  z99 = 2.5758293035489
  if spec.dtype.is_fp8:
    expect = 0.01
  elif spec.symmetric:
    expect = _gauss_tail(z99 * (spec.qmax + 0.5) / spec.qmax)
  else:  # 1% a side, less up to a step and a half of margin: between 1% and 2%.
    assert 0.01 < frac < 0.02, frac
    return
  assert abs(frac - expect) < 1.5e-3, (frac, expect)


def _gauss_with_rare_outliers(rng, t: int, magnitude: float, per_channel: int = 1):
  """Standard normal `[1, 1, t, K, H]` with `per_channel` values of each channel at ±magnitude."""
  x = rng.standard_normal((1, 1, t, K, H)).astype(np.float32)
  for k in range(K):
    for h in range(H):
      at = rng.choice(t, per_channel, replace=False)
      x[0, 0, at, k, h] = magnitude * rng.choice([-1.0, 1.0], per_channel)
  return x


# Clipping a rare outlier pays when the rounding error it saves over all values beats
# its own clip error: n (A / qmax)**2 / 12 > A**2, i.e. n > 12 qmax**2 values per
# group (int4: ~600; int8: ~2e5). The data sizes follow.
@pytest.mark.parametrize("name", ["int4-tensor", "int4-head", "int4-channel", "int4-asym-channel",
                                  "int8-tensor", "int8-channel", "int8-asym-head"])
def test_mse_beats_absmax_with_rare_outliers(name, rng):
  spec = QuantSpec.parse(name)
  t = 4096 if spec.dtype.bits == 4 else 65536
  x = _gauss_with_rare_outliers(rng, t, 40.0 if spec.dtype.bits == 4 else 100.0)
  stats = _observe(x)
  s_abs, z_abs = M.compute_scales(stats, spec, "absmax")
  s_mse, z_mse = M.compute_scales(stats, spec, "mse")
  assert np.all(np.asarray(s_mse, np.float64) < np.asarray(s_abs, np.float64))
  pick = lambda z: None if z is None else z[0]  # noqa: E731
  e_abs = _realized_mse(x[0], spec, s_abs[0], pick(z_abs))
  e_mse = _realized_mse(x[0], spec, s_mse[0], pick(z_mse))
  # int8 at 65536 values a channel: the optimum clips at ~0.75 A and saves ~25%.
  assert e_mse < (0.5 if spec.dtype.bits == 4 else 0.9) * e_abs, (e_mse, e_abs)


@pytest.mark.parametrize("name", ["fp8_e4m3-tensor", "fp8_e4m3-channel"])
def test_mse_fp8_no_worse_than_absmax(name, rng):
  """fp8's error is relative, so clipping rarely pays: mse stays at (or near) absmax and is
  never meaningfully worse on the data."""
  spec = QuantSpec.parse(name)
  x = _gauss_with_rare_outliers(rng, 8192, 40.0)
  stats = _observe(x)
  s_abs, _ = M.compute_scales(stats, spec, "absmax")
  s_mse, _ = M.compute_scales(stats, spec, "mse")
  assert _realized_mse(x[0], spec, s_mse[0], None) <= 1.01 * _realized_mse(x[0], spec, s_abs[0],
                                                                            None)


@pytest.mark.parametrize("name,rtol", [("int8-tensor", 0.02), ("int8-channel", 0.02),
                                       ("int8-asym-head", 0.02), ("int4-channel", 0.1)])
def test_mse_uniform_close_to_absmax(name, rtol, rng):
  """Uniform data: clipping buys little (int8 optimum ~0.997 absmax, int4 ~0.94)."""
  spec = QuantSpec.parse(name)
  x = rng.uniform(-3, 3, (1, 1, 20000, K, H)).astype(np.float32)
  stats = _observe(x)
  s_abs, _ = M.compute_scales(stats, spec, "absmax")
  s_mse, _ = M.compute_scales(stats, spec, "mse")
  ratio = np.asarray(s_mse, np.float64) / np.asarray(s_abs, np.float64)
  assert np.all(ratio >= 1 - rtol) and np.all(ratio <= 1), ratio.ravel()


def test_errors(rng):
  x = rng.standard_normal((1, 8, K, H)).astype(np.float32)
  int8 = QuantSpec.parse("int8-head")
  stats = feed_stats(S.init_stats(2, K, H), 0, x[0])
  with pytest.raises(ValueError, match="layer 1 observed no tokens"):
    M.compute_scales(stats, int8, "absmax")
  with pytest.raises(ValueError, match=f"layer 0: all {8 * K * H} observed values are 0"):
    M.compute_scales(_observe(np.zeros_like(x)), int8, "mse")
  with pytest.raises(ValueError, match=f"layer 0: all {8 * K * H} observed values are NaN/inf"):
    M.compute_scales(_observe(np.full_like(x, np.nan)), int8, "percentile")
  dead = x.copy()
  dead[..., 1, 2] = 0.0
  dead_stats = _observe(dead)
  M.compute_scales(dead_stats, int8, "absmax")  # The head has other channels: fine.
  with pytest.raises(ValueError, match="layer 0, kv head 1, channel 2: no nonzero value"):
    M.compute_scales(dead_stats, QuantSpec.parse("int8-channel"), "absmax")
  sparse = np.zeros((1, 1000, K, H), np.float32)
  sparse[0, 0] = 1.0
  with pytest.raises(ValueError, match="percentile range is 0"):
    M.compute_scales(_observe(sparse), int8, "percentile", percentile=99)
  full = _observe(x)
  for bad in ("int8", "int4-g2", "bf16", "f32"):
    with pytest.raises(ValueError, match="dynamic|unquantized"):
      M.compute_scales(full, QuantSpec.parse(bad), "absmax")
  with pytest.raises(ValueError, match="unknown method='kl'; valid methods: absmax, percentile"):
    M.compute_scales(full, int8, "kl")
  with pytest.raises(ValueError, match="learn_scales"):
    M.compute_scales(full, int8, "learned")
  with pytest.raises(ValueError, match="unknown"):
    M.compute_scales(full, int8, "mse", percentile=99)
  with pytest.raises(ValueError, match="percentile must be in"):
    M.compute_scales(full, int8, "percentile", percentile=0)


# Learned scales: attention with GQA (N = 4 query heads over K = 2 kv heads).
B, T, N = 2, 48, 4


def _ref_attention(q, k, v, valid):
  """float64 numpy causal GQA attention, one query at a time."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  out = np.zeros_like(q)
  g = N // K
  for b in range(B):
    for t in range(T):
      keys = [s for s in range(t + 1) if valid[b, s]]
      for n in range(N):
        logits = k[b, keys, n // g] @ q[b, t, n] / np.sqrt(H)
        p = np.exp(logits - logits.max())
        out[b, t, n] = (p / p.sum()) @ v[b, keys, n // g]
  return out


def _qkv(rng):
  q = rng.standard_normal((B, T, N, H)).astype(np.float32)
  k = kv_with_outliers(rng, (B, T, K, H), channel_scale=10.0, num_channels=1)
  v = kv_with_outliers(rng, (B, T, K, H), channel_scale=5.0, num_channels=1)
  valid = np.ones((B, T), bool)
  valid[1, T - 5:] = False  # Padding.
  return q, k, v, valid


def test_attention_error_against_numpy(rng):
  q, k, v, valid = _qkv(rng)
  spec = QuantSpec.parse("int4-head")
  stats = _observe(k)
  scale, _ = M.compute_scales(stats, spec, "absmax")
  kq, _ = _roundtrip(k, spec, scale[0], None)
  ref, approx = _ref_attention(q, k, v, valid), _ref_attention(q, kq, v, valid)
  want = np.sum(((approx - ref) ** 2)[valid]) / (valid.sum() * N * H)
  got = M.attention_error(q, k, v, spec, scale[0], which="k", valid=valid)
  assert_close(got, want, atol=0, rtol=1e-4, name="attention error")


@pytest.mark.parametrize("name,which", [("int4-head", "k"), ("int8-asym-channel", "v"),
                                        ("fp8_e4m3-tensor", "k"), ("int4-tensor-sbf16", "v")])
def test_learned_no_worse_than_absmax_or_init(name, which, rng):
  q, k, v, valid = _qkv(rng)
  spec = QuantSpec.parse(name)
  stats = _observe(k if which == "k" else v)
  scale, zero = M.compute_scales(stats, spec, "absmax")
  s0, z0 = scale[0], None if zero is None else zero[0]
  err = lambda s, z: M.attention_error(q, k, v, spec, s, z, which=which, valid=valid)  # noqa: E731
  absmax_obj = err(s0, z0)
  res = M.learn_scales(q, k, v, spec, s0, init_zero=z0, which=which, steps=100, valid=valid)
  assert res.scale.shape == s0.shape and res.scale.dtype == spec.scale_jnp_dtype
  assert res.objective == err(res.scale, res.zero)
  assert res.init_objective == absmax_obj and res.objective <= absmax_obj
  if spec.dtype.bits == 4:
    assert res.objective < absmax_obj  # int4 leaves room to learn.
  # From a poor init (4x absmax): better than that init, and never worse than it.
  poor = (s0.astype(jnp.float32) * 4).astype(s0.dtype)
  res2 = M.learn_scales(q, k, v, spec, poor, init_zero=z0, which=which, steps=100, valid=valid)
  assert res2.objective <= res2.init_objective == err(poor, z0)


def test_learned_zero_steps_returns_init(rng):
  q, k, v, _ = _qkv(rng)
  spec = QuantSpec.parse("int8-head")
  init = jnp.full((K, 1), 0.1, jnp.float32)
  res = M.learn_scales(q, k, v, spec, init, steps=0)
  np.testing.assert_array_equal(np.asarray(res.scale), np.asarray(init))
  assert res.objective == res.init_objective
  with pytest.raises(ValueError, match="scale must have shape"):
    M.learn_scales(q, k, v, spec, jnp.ones((1, 1)), steps=1)
  with pytest.raises(ValueError, match="dynamic"):
    M.learn_scales(q, k, v, QuantSpec.parse("int8"), init, steps=1)
  with pytest.raises(ValueError, match="finite and > 0"):
    M.learn_scales(q, k, v, spec, jnp.zeros((K, 1)), steps=1)
