"""Calibration statistics against float64 numpy on the concatenated data."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvtpu.calibration import stats as S
from tests.helpers import assert_close, feed_stats, kv_with_outliers

# One stats layout and one batch shape for most tests: each new one costs a compile.
L, K, H = 2, 2, 8
CHUNK = 4096  # Also the batch length of `feed_stats` (its default).


def _np_bins(stats: S.TensorStats, x: np.ndarray) -> np.ndarray:
  """Independent signed bin index: a binary search on the float32 edges."""
  m_bins = stats.num_mag_bins
  m = np.searchsorted(stats.edges(), np.abs(x.astype(np.float32)), side="right") - 1
  m = np.clip(m, -1, m_bins - 1)
  return np.where(x < 0, m_bins - 1 - m, m_bins + 1 + m)


def _np_stats(stats: S.TensorStats, xs: list[np.ndarray], valids: list[np.ndarray | None]):
  """float64 numpy statistics of the valid values of batches `[B, T, K, H]`."""
  rows, tokens, bad = [], 0, 0
  for x, valid in zip(xs, valids, strict=True):
    valid = np.ones(x.shape[:2], bool) if valid is None else valid
    tokens += int(valid.sum())
    rows.append(x[valid].astype(np.float64))  # [n, K, H]
  data = np.concatenate(rows)
  bad = int((~np.isfinite(data)).sum())
  fin = np.where(np.isfinite(data), data, np.nan)
  hist = np.zeros((K, H, stats.num_bins), np.int64)
  for k in range(K):
    for h in range(H):
      col = fin[:, k, h]
      col = col[~np.isnan(col)]
      np.add.at(hist[k, h], _np_bins(stats, col), 1)
  return {"tokens": tokens, "nonfinite": bad, "count": np.sum(~np.isnan(fin), 0),
          "min": np.nanmin(fin, 0), "max": np.nanmax(fin, 0), "mean": np.nanmean(fin, 0),
          "var": np.nanvar(fin, 0), "hist": hist, "data": fin}


def _batches(rng, shapes, *, nan=True):
  xs, valids = [], []
  for i, (b, t) in enumerate(shapes):
    x = kv_with_outliers(rng, (b, t, K, H)) + 3.0  # Offset: a mean far from 0.
    if nan:
      x[0, 0, 0, 1] = np.nan
      x[-1, -1, 1, 2] = np.inf
      x[0, t // 2, 1, 0] = -np.inf
    valid = rng.uniform(size=(b, t)) < 0.8 if i % 2 else None
    if valid is not None:
      valid[0, 0] = True
      valid[-1, -1] = False  # Its inf is padding: neither observed nor counted.
    xs.append(x)
    valids.append(valid)
  return xs, valids


def _check(stats: S.TensorStats, layer: int, ref: dict) -> None:
  assert stats.tokens_per_layer()[layer] == ref["tokens"]
  assert stats.nonfinite_per_layer()[layer] == ref["nonfinite"]
  np.testing.assert_array_equal(np.asarray(stats.count[layer]), ref["count"])
  np.testing.assert_array_equal(np.asarray(stats.min[layer], np.float64), ref["min"])
  np.testing.assert_array_equal(np.asarray(stats.max[layer], np.float64), ref["max"])
  np.testing.assert_array_equal(np.asarray(stats.hist[layer]), ref["hist"])
  assert_close(stats.mean[layer], ref["mean"], atol=1e-5, rtol=1e-5, name="mean")
  var = np.asarray(stats.m2[layer], np.float64) / ref["count"]
  assert_close(var, ref["var"], atol=0.0, rtol=1e-5, name="var")


def test_observe_matches_numpy(rng):
  xs, valids = _batches(rng, [(2, 37), (3, 64), (2, 37), (3, 64)])
  stats = S.init_stats(L, K, H)
  for x, valid in zip(xs, valids, strict=True):
    stats = S.observe(stats, 1, jnp.asarray(x), None if valid is None else jnp.asarray(valid))
  ref = _np_stats(stats, xs, valids)
  _check(stats, 1, ref)
  assert ref["nonfinite"] >= 4  # NaN and infs were planted and are excluded.
  # The other layer is untouched.
  assert stats.tokens_per_layer().tolist() == [0, ref["tokens"]]
  assert np.all(np.asarray(stats.hist[0]) == 0) and np.all(np.isinf(np.asarray(stats.min[0])))
  np.testing.assert_array_equal(np.asarray(stats.hist[1]).sum(-1), np.asarray(stats.count[1]))


def test_mean_var_stable_for_large_offset(rng):
  """Chan's merge keeps the variance of data with mean 1e3 and std 1 over many batches."""
  xs = [(1000.0 + rng.standard_normal((1, CHUNK, K, H))).astype(np.float32) for _ in range(8)]
  stats = S.init_stats(L, K, H)
  for x in xs:
    stats = S.observe(stats, 0, jnp.asarray(x))
  data = np.concatenate([x.reshape(-1, K, H) for x in xs]).astype(np.float64)
  assert_close(stats.mean[0], data.mean(0), atol=0, rtol=1e-6, name="mean")
  assert_close(np.asarray(stats.m2[0], np.float64) / data.shape[0], data.var(0), atol=0,
               rtol=1e-3, name="var")  # float32 data: var 1 on values near 1000.


def test_merge_equals_observe_all(rng):
  xs, valids = _batches(rng, [(2, 37), (3, 64), (2, 37), (3, 64)])
  one = S.init_stats(L, K, H)
  a = S.init_stats(L, K, H)
  b = S.init_stats(L, K, H)
  for i, (x, valid) in enumerate(zip(xs, valids, strict=True)):
    v = None if valid is None else jnp.asarray(valid)
    one = S.observe(one, i % L, jnp.asarray(x), v)
    if i < 2:
      a = S.observe(a, i % L, jnp.asarray(x), v)
    else:
      b = S.observe(b, i % L, jnp.asarray(x), v)
  merged = S.merge(a, b)
  # `beyond` is judged against the running stats of each side, so it is not compared.
  for field in ("tokens", "nonfinite", "count", "min", "max", "hist"):
    np.testing.assert_array_equal(np.asarray(getattr(merged, field)),
                                  np.asarray(getattr(one, field)), err_msg=field)
  assert_close(merged.mean, one.mean, atol=1e-6, rtol=1e-6, name="mean")
  assert_close(merged.m2, one.m2, atol=1e-4, rtol=1e-5, name="m2")
  with pytest.raises(ValueError, match="different layouts"):
    S.merge(a, S.init_stats(L, K, H, bins_per_octave=8))


def test_jit_and_traced_layer(rng):
  """Under jit and lax.scan (traced layer) the result is that of the eager loop."""
  x = rng.standard_normal((L, 2, 37, K, H)).astype(np.float32)
  eager = S.init_stats(L, K, H)
  for layer in range(L):
    eager = S.observe(eager, layer, jnp.asarray(x[layer]))

  @jax.jit
  def scan(stats, xs):
    def body(s, args):
      layer, xl = args
      return S.observe(s, layer, xl), None
    return jax.lax.scan(body, stats, (jnp.arange(L), xs))[0]

  scanned = scan(S.init_stats(L, K, H), jnp.asarray(x))
  for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(scanned),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bin_index_exact_at_edges():
  stats = S.init_stats(L, K, H)
  e = stats.edges()
  mags = np.concatenate([e, np.nextafter(e, np.float32(0)), np.nextafter(e, np.float32(np.inf)),
                         [0.0, 1e-38, 2.0**-30, 2.0**30, 3e38]]).astype(np.float32)
  x = np.concatenate([mags, -mags, [-0.0]]).astype(np.float32)
  np.testing.assert_array_equal(S.signed_bin_index(stats, x), _np_bins(stats, x))
  m_bins = stats.num_mag_bins
  idx = S.signed_bin_index(stats, np.float32([0.0, -0.0, 2.0**-30, 3e38, -3e38, 1.0]))
  assert idx.tolist() == [m_bins, m_bins, m_bins, 2 * m_bins, 0, m_bins + 1 + 24 * 16]


def test_nbytes():
  stats = S.init_stats(30, 3, 64)
  assert stats.nbytes == S.stats_nbytes(30, 3, 64) == 30 * 3 * 64 * (4 * 1537 + 20) + 4 * 90 + 480
  small = S.init_stats(2, 1, 4, bins_per_octave=4, min_exponent=-8, max_exponent=8)
  assert small.num_bins == 129
  assert small.nbytes == S.stats_nbytes(2, 1, 4, bins_per_octave=4, min_exponent=-8,
                                        max_exponent=8)


# Percentiles: estimate vs np.percentile of the pooled float64 data.
_TAIL_Q = (90.0, 99.0, 99.9, 99.99, 100.0)


def _percentile_cases(rng, stats_kwargs):
  x = kv_with_outliers(rng, (1, 2 * CHUNK, K, H))
  x[..., 0, 3] = np.abs(x[..., 0, 3]) * 1e3  # A positive channel: signed tails differ.
  stats = feed_stats(S.init_stats(L, K, H, **stats_kwargs), 0, x[0])
  data = x.reshape(-1, K, H).astype(np.float64)
  pooled = {"channel": lambda a: a.reshape(a.shape[0], K, H)[:, :, :, None],
            "head": lambda a: a.transpose(1, 0, 2).reshape(K, -1).T[:, :, None, None],
            "tensor": lambda a: a.reshape(-1)[:, None, None, None]}
  worst = {q: 0.0 for q in _TAIL_Q}
  for gran, pool in pooled.items():
    g = pool(data)  # [n, 1|K, 1|H, 1]: pooled values per group.
    for side in S.SIDES:
      for q in _TAIL_Q:
        est = S.percentile(stats, q, gran, side=side)[0]
        vals = np.abs(g) if side == "abs" else g
        ref = np.percentile(vals, q if side != "lower" else 100 - q, axis=0)[..., 0]
        rel = np.abs(est - ref) / np.abs(ref)
        assert est.shape == ref.shape
        bound = stats.relative_error_bound
        assert np.all(rel <= bound), (gran, side, q, rel.max(), bound)
        worst[q] = max(worst[q], float(rel.max()))
        if q == 100.0:  # The extremes are exact.
          np.testing.assert_array_equal(est, ref)
  return worst, stats.relative_error_bound


@pytest.mark.parametrize("bins_per_octave", [4, 16])
def test_percentile_within_bound(rng, bins_per_octave):
  worst, bound = _percentile_cases(rng, {"bins_per_octave": bins_per_octave})
  # Measured: where bins hold many values (q <= 99 of 8192 per channel) the spread
  # within a bin is close to the data's, so errors are a fraction of the bound
  # (16 bins/octave: ~0.009 vs 0.044); sparse tails (p99.9, p99.99: a handful of
  # values, one per bin) err up to about half the bin.
  assert max(worst[90.0], worst[99.0]) < bound / 3, (worst, bound)
  assert worst[100.0] == 0.0


def test_percentile_bound_is_tight():
  """Adversarial bin: all values on its lower edge, one far above. The estimate of the
  top value of the bin lands near the upper edge: the error approaches the bound."""
  x = np.full((1001, K, H), 1.0, np.float32)
  x[-1] = 100.0
  stats = feed_stats(S.init_stats(L, K, H), 0, x)
  q = 100.0 * 999 / 1000  # Rank 999 of 0..1000: the last value at 1.0.
  est = float(S.percentile(stats, q, "tensor", side="upper")[0, 0, 0])
  rel = est - 1.0
  assert 0.9 * stats.relative_error_bound < rel <= stats.relative_error_bound


def test_percentile_uniform_closed_form():
  """Integers 1..1000 in every channel: p99 (linear) is 1 + 0.99 * 999 = 990.01."""
  x = np.broadcast_to(np.arange(1, 1001, dtype=np.float32)[:, None, None], (1000, K, H))
  stats = feed_stats(S.init_stats(L, K, H), 0, x)
  for side in ("abs", "upper"):
    est = float(S.percentile(stats, 99, "tensor", side=side)[0, 0, 0])
    assert abs(est / 990.01 - 1) < 2e-3, est
  est = float(S.percentile(stats, 99, "tensor", side="lower")[0, 0, 0])
  assert abs(est / 10.99 - 1) <= stats.relative_error_bound, est


def test_percentile_empty_and_bad_args():
  stats = feed_stats(S.init_stats(L, K, H), 0, np.ones((4, K, H), np.float32))
  p = S.percentile(stats, 99, "head")
  assert p.shape == (L, K, 1) and np.all(p[0] == 1.0) and np.all(np.isnan(p[1]))
  with pytest.raises(ValueError, match="q must be in"):
    S.percentile(stats, 101, "tensor")
  with pytest.raises(ValueError, match="side must be"):
    S.percentile(stats, 99, "tensor", side="both")
  with pytest.raises(ValueError, match="granularity must be"):
    S.percentile(stats, 99, "token_head")


def test_token_limit_checked():
  stats = S.init_stats(L, K, H)
  over = dataclasses.replace(stats, tokens=stats.tokens.at[1, 1].set(1))  # 2**32 tokens.
  with pytest.raises(ValueError, match="layer 1 observed 4294967296 tokens"):
    S.percentile(over, 99, "tensor")


def test_outlier_indicators_find_planted_channels(rng):
  x = rng.standard_normal((CHUNK, K, H)).astype(np.float32)
  planted = {0: [2, 5], 1: [0, 7]}
  for k, chans in planted.items():
    x[..., k, chans] *= 50.0
  stats = feed_stats(S.init_stats(L, K, H), 1, x)
  s = S.summary(stats)
  for k, chans in planted.items():
    assert sorted(s["top_channels"][1, k, :2].tolist()) == chans
    assert 35 < s["outlier_ratio"][1, k] < 70, s["outlier_ratio"][1, k]
    assert np.all(s["channel_ratio"][1, k, chans] > 35)
  assert np.all(np.isnan(s["outlier_ratio"][0]))  # Layer 0 saw nothing.


def _two_pass_beyond(x: np.ndarray, k_sigma: float) -> np.ndarray:
  d = x.reshape(-1, *x.shape[2:]).astype(np.float64)
  far = np.abs(d - d.mean(0)) > k_sigma * d.std(0)
  return far.any(-1).mean(0)  # [K]


def test_beyond_k_sigma_single_batch_is_two_pass(rng):
  """One batch: exactly the two-pass fraction; Gaussian: 1 - (1 - 2 Phi(-3))**H."""
  x = rng.standard_normal((8, 1024, K, H)).astype(np.float32)
  stats = S.observe(S.init_stats(L, K, H, k_sigma=3.0), 0, jnp.asarray(x))
  frac = S.summary(stats)["beyond_k_sigma"][0]
  assert_close(frac, _two_pass_beyond(x, 3.0), atol=2e-4, name="beyond")  # float32 ties.
  expected = 1 - (1 - 0.0026998) ** H
  assert_close(frac, np.full(K, expected), atol=0.0075, name="closed form")  # 3.4 sigma.


def test_beyond_k_sigma_streaming_finds_planted_tokens(rng):
  """Outlier tokens (1% of tokens, one channel at +20 sigma) over 8 batches, k=6."""
  xs, planted = [], 0
  for _ in range(4):
    x = rng.standard_normal((1, CHUNK, K, H)).astype(np.float32)
    hit = rng.uniform(size=(1, CHUNK)) < 0.01
    x[hit, 1, 3] += 20.0  # kv head 1 only.
    planted += int(hit.sum())
    xs.append(x)
  stats = S.init_stats(L, K, H)
  for x in xs:
    stats = S.observe(stats, 0, jnp.asarray(x))
  frac = S.summary(stats)["beyond_k_sigma"][0]
  assert frac[0] < 1e-3  # Gaussian beyond 6 sigma: ~2e-9 per value.
  assert_close(frac[1], planted / (4 * CHUNK), atol=1e-3, name="planted fraction")
  assert_close(frac[1], _two_pass_beyond(np.concatenate(xs), 6.0)[1], atol=1e-3, name="2-pass")


def test_summary_values(rng):
  x = kv_with_outliers(rng, (2, 300, K, H))
  stats = feed_stats(S.init_stats(L, K, H), 0, x.reshape(-1, K, H))
  s = S.summary(stats)
  d = x.reshape(-1, K, H).astype(np.float64)
  assert s["tokens"].tolist() == [600, 0] and s["count"][0].min() == 600
  assert_close(s["absmax"][0], np.abs(d).max(0), atol=0, name="absmax")
  assert_close(s["std"][0], d.std(0), atol=1e-5, rtol=1e-5, name="std")
  assert_close(s["head_absmax"][0], np.abs(d).max((0, 2)), atol=0, name="head absmax")
  for key, q in (("p99", 99), ("p99.9", 99.9), ("p99.99", 99.99)):
    ref = np.percentile(np.abs(d), q, axis=0)
    assert np.all(np.abs(s[key][0] / ref - 1) <= stats.relative_error_bound), key
  for key in ("absmax", "mean", "std", "p99"):
    assert np.all(np.isnan(s[key][1])), key


def test_bfloat16_input(rng):
  x = jnp.asarray(rng.standard_normal((2, 16, K, H)), jnp.bfloat16)
  stats = S.observe(S.init_stats(L, K, H), 0, x)
  np.testing.assert_array_equal(np.asarray(stats.max[0]),
                                np.asarray(x.astype(jnp.float32)).max((0, 1)))


def test_bad_inputs():
  stats = S.init_stats(2, K, H)
  x = jnp.zeros((1, 4, K, H))
  with pytest.raises(ValueError, match="x must be"):
    S.observe(stats, 0, jnp.zeros((1, 4, K, H + 1)))
  with pytest.raises(IndexError, match="out of range"):
    S.observe(stats, 2, x)
  with pytest.raises(TypeError, match="layer must be"):
    S.observe(stats, 0.5, x)
  with pytest.raises(ValueError, match="valid must be"):
    S.observe(stats, 0, x, jnp.ones((1, 3), bool))
  with pytest.raises(TypeError, match="floating"):
    S.observe(stats, 0, jnp.zeros((1, 4, K, H), jnp.int32))
  with pytest.raises(ValueError, match="min_exponent"):
    S.init_stats(1, 1, 1, min_exponent=4, max_exponent=4)
  with pytest.raises(ValueError, match="k_sigma"):
    S.init_stats(1, 1, 1, k_sigma=0)
