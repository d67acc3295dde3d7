"""Clip ratios of dynamic formats: closed forms, an independent float64 search, errors,
learned clipping, and the drift baseline against the cache's counters."""

import jax.numpy as jnp
import numpy as np
import pytest

import kvtpu
from kvtpu.calibration import clipping
from kvtpu.calibration.artifact import CalibrationArtifact
from kvtpu.calibration.drift import drift_summary
from kvtpu.formats import QuantSpec
from tests.helpers import kv_with_outliers

MODEL = {"name": "tiny", "weight_precision": "random init (float32)", "num_layers": 2,
         "kv_heads": 2, "head_dim": 16}
WORKLOADS = ({"name": "prose", "num_tokens": 4096, "tokens_used": 2048, "token_sha256": "ab" * 32,
              "source_sha256": "cd" * 32},)


def _ladder(n, heads=2):
  """Tokens whose every head holds magnitudes {1, 1/2, 1/4, 1/8} (x4 channels), random signs
  and a random per-token size: positions in the range are known exactly."""
  rng = np.random.default_rng(0)
  base = np.repeat([1.0, 0.5, 0.25, 0.125], 4)
  x = base * rng.choice([-1.0, 1.0], (n, heads, 16)) * rng.uniform(0.1, 10, (n, heads, 1))
  return x.astype(np.float32)


def test_absmax_and_percentile_closed_forms():
  spec = QuantSpec.parse("int8")
  samples = [_ladder(64), _ladder(64) * 3]
  np.testing.assert_array_equal(clipping.compute_clip(samples, spec, "absmax"), np.ones((2, 2)))
  # A quarter of the values sit at each position 1, 1/2, 1/4, 1/8 of their token's max.
  clip = clipping.compute_clip(samples, spec, "percentile", percentile=70)
  np.testing.assert_array_equal(clip, np.full((2, 2), 0.5, np.float32))
  np.testing.assert_array_equal(clipping.compute_clip(samples, spec, "percentile", percentile=40),
                                np.full((2, 2), 0.25, np.float32))
  # With c = 1/2 the values at 1 clip (254 steps > 127) and those at 1/2 land on 127: 1/4.
  np.testing.assert_allclose(clipping.clip_fraction(samples, spec, clip), [0.25, 0.25])
  assert clipping.clip_fraction(samples, spec, np.ones(2)).tolist() == [0.0, 0.0]
  # Asymmetric: the position of x < 0 is measured against the token's min.
  x = np.tile(np.array([-2.0, -1.0, 0.0, 4.0, 2.0, 1.0, 0.5, 0.0], np.float32), (32, 2, 2))
  got = clipping.compute_clip([x], QuantSpec.parse("int8-asym"), "percentile", percentile=60)
  np.testing.assert_array_equal(got, [[0.5, 0.5]])  # positions 1, .5, 0, 1, .5, .25, .125, 0


def _np_errors(x, spec_qmax, fractions, group):
  """Float64 reference: squared error of symmetric integer per-group quantization."""
  xg = x.reshape(*x.shape[:-1], -1, group).astype(np.float64)
  amax = np.abs(xg).max(-1, keepdims=True)
  out = []
  for c in fractions:
    s = np.maximum(c * amax / spec_qmax, np.finfo(np.float32).tiny)
    deq = np.clip(np.round(xg / s), -spec_qmax, spec_qmax) * s
    out.append(np.sum((deq - xg) ** 2, axis=(0, 2, 3)))
  return np.stack(out)  # [C, K]


@pytest.mark.parametrize("name, group", [("int4", 16), ("int4-g8", 8), ("int8", 16)])
def test_mse_clip_matches_an_independent_float64_search(name, group, rng):
  spec = QuantSpec.parse(name)
  samples = [rng.standard_normal((256, 2, 16)).astype(np.float32),
             kv_with_outliers(rng, (4, 64, 2, 16)).reshape(256, 2, 16)]
  clip = clipping.compute_clip(samples, spec, "mse", num_candidates=40, min_fraction=0.2)
  fractions = np.linspace(1.0, 0.2, 40).astype(np.float32)
  for layer, x in enumerate(samples):
    err = _np_errors(x, spec.qmax, fractions, group)
    best = err.min(0)
    chosen = err[np.searchsorted(-fractions, -clip[layer]), np.arange(2)]
    # The chosen ratio is a minimizer up to float32 rounding of the errors.
    np.testing.assert_allclose(chosen, best, rtol=1e-5)
    assert (chosen <= err[0] * (1 + 1e-6)).all()  # never worse than absmax (c = 1)
  if name.startswith("int4"):
    # Gaussian tokens under 4 bits: clipping the top of each token pays.
    assert (clip[0] < 1).all() and (clip[0] > 0.5).all()


def test_bad_samples_and_requests_are_clear_errors():
  spec = QuantSpec.parse("int8")
  good = np.ones((8, 2, 16), np.float32)
  nan = good.copy()
  nan[3, 1, 2] = np.nan
  zero_head = good.copy()
  zero_head[:, 1] = 0
  for samples, match in [
      ([good, nan], "layer 1: 1 of 256 sample values are NaN/inf"),
      ([np.zeros((8, 2, 16))], "layer 0: all 256 sample values are 0"),
      ([zero_head], "layer 0, kv head 1: every sample value is 0"),
      ([np.ones((0, 2, 16))], "layer 0: no sample tokens"),
      ([good, np.ones((8, 3, 16))], r"layer 1: samples of shape \[..., 3, 16\] differ"),
      ([], "non-empty per-layer sequence"),
  ]:
    with pytest.raises(ValueError, match=match):
      clipping.compute_clip(samples, spec, "mse")
  with pytest.raises(ValueError, match="clip ratios are for dynamic"):
    clipping.compute_clip([good], QuantSpec.parse("int8-channel"))
  with pytest.raises(ValueError, match="clip ratios are for range-scaled per-token specs, got "
                                       "int2-nu-rot"):
    clipping.compute_clip([good], QuantSpec.parse("int2-nu-rot"))
  with pytest.raises(ValueError, match="each channel's range over a group of positions"):
    clipping.compute_clip([good], QuantSpec.parse("int4-asym-c8"))
  with pytest.raises(ValueError, match="learn_clip"):
    clipping.compute_clip([good], spec, "learned")
  with pytest.raises(ValueError, match="takes options"):
    clipping.compute_clip([good], spec, "mse", percentile=3)
  with pytest.raises(ValueError, match="is not a multiple of group_size=32"):
    clipping.compute_clip([good], QuantSpec.parse("int4-g32"))
  sparse = np.zeros((8, 2, 16), np.float32)
  sparse[:, :, 0] = 1.0  # 15 of 16 values are 0: the 50th percentile position is 0.
  with pytest.raises(ValueError, match="percentile clip ratio is 0"):
    clipping.compute_clip([sparse], spec, "percentile", percentile=50)


@pytest.mark.parametrize("name, which", [("int4", "k"), ("int4-asym", "v"), ("fp8_e5m2", "k")])
def test_learned_clip_never_loses_to_its_start(name, which, rng):
  spec = QuantSpec.parse(name)
  q = jnp.asarray(rng.standard_normal((2, 24, 4, 16)), jnp.float32)
  k = jnp.asarray(kv_with_outliers(rng, (2, 24, 2, 16)))
  v = jnp.asarray(kv_with_outliers(rng, (2, 24, 2, 16)))
  init = np.ones(2, np.float32)
  res = clipping.learn_clip(q, k, v, spec, init, which=which, steps=60, learning_rate=0.05)
  assert res.objective <= res.init_objective
  assert np.isclose(res.init_objective, clipping.clip_attention_error(q, k, v, spec, init,
                                                                      which=which), rtol=1e-6)
  assert np.isclose(res.objective, clipping.clip_attention_error(q, k, v, spec, res.clip,
                                                                 which=which), rtol=1e-6)
  assert ((res.clip > 0) & (res.clip <= 1)).all()
  if name == "int4":  # 4-bit keys with outliers: clipping helps the attention output.
    assert res.objective < 0.95 * res.init_objective
  with pytest.raises(ValueError, match=r"clip must have shape \(2,\)"):
    clipping.learn_clip(q, k, v, spec, np.ones(3), which=which)
  with pytest.raises(ValueError, match="clip ratios are for dynamic"):
    clipping.learn_clip(q, k, v, QuantSpec.parse("int8-head"), init)


def test_artifact_with_clip_ratios_round_trips_and_drives_the_cache(tmp_path, rng):
  samples = [kv_with_outliers(rng, (4, 16, 2, 16)) for _ in range(2)]
  spec = QuantSpec.parse("int4")
  clip = clipping.compute_clip(samples, spec, "mse")
  frac = clipping.clip_fraction(samples, spec, clip)
  art = CalibrationArtifact(fmt="k=int4,v=int8-head", model=MODEL, method="mse",
                            workloads=WORKLOADS,
                            scales={"k": {"clip": clip}, "v": {"scale": np.full((2, 2, 1), 0.1)}},
                            clip_fraction={"k": frac, "v": np.zeros(2)})
  back = CalibrationArtifact.load(art.save(tmp_path / "a"))
  np.testing.assert_array_equal(back.scales["k"]["clip"], clip)
  cache = kvtpu.KVCache.init(back.fmt, num_layers=2, batch=4, kv_heads=2, max_len=16,
                             head_dim=16, calibration=back)
  np.testing.assert_array_equal(cache.k.clip, clip)
  # Traffic like the calibration data clips at the calibration rate: no drift.
  for layer, x in enumerate(samples):
    cache = cache.update(layer, jnp.asarray(x), jnp.asarray(x) * 0.01)
  rows = drift_summary(back, cache.advance(16))
  for layer in range(2):
    assert rows[layer]["tensor"] == "k"
    assert rows[layer]["runtime_rate"] == pytest.approx(frac[layer])
    assert not rows[layer]["flagged"]
  for bad, match in [({"k": {"clip": np.full((2, 2), 1.5)}}, r"k_clip must be clip ratios"),
                     ({"k": {"clip": np.ones((2, 3))}}, r"k_clip has shape \(2, 3\); int4"),
                     ({}, r"needs scales \['k_clip', 'v_scale'\]")]:
    with pytest.raises(ValueError, match=match):
      CalibrationArtifact(fmt="k=int4,v=int8-head", model=MODEL, method="mse",
                          workloads=WORKLOADS, scales={"v": {"scale": np.full((2, 2, 1), 0.1)}, **bad},
                          clip_fraction={"k": frac, "v": np.zeros(2)})


def test_a_non_uniform_tensor_takes_no_clip_ratios(rng):
  # Its RMS scales have no range to narrow: an artifact of a mixed format calibrates the
  # other tensor only, and the cache refuses a clip for it.
  clip = np.full((2, 2), 0.5, np.float32)
  fmt = "k=int4-rot,v=int4-nu-rot"
  art = CalibrationArtifact(fmt=fmt, model=MODEL, method="mse", workloads=WORKLOADS,
                            scales={"k": {"clip": clip}}, clip_fraction={"k": np.zeros(2)})
  cache = kvtpu.KVCache.init(art.fmt, num_layers=2, batch=1, kv_heads=2, max_len=16, head_dim=16,
                             calibration=art)
  assert cache.v.clip is None and cache.k.clip is not None
  with pytest.raises(ValueError, match="needs scales \\['k_clip'\\]"):
    CalibrationArtifact(fmt=fmt, model=MODEL, method="mse", workloads=WORKLOADS,
                        scales={"k": {"clip": clip}, "v": {"clip": clip}},
                        clip_fraction={"k": np.zeros(2), "v": np.zeros(2)})
  with pytest.raises(ValueError, match="v_clip given, but V is stored as int4-nu-rot"):
    kvtpu.KVCache.init(fmt, num_layers=2, batch=1, kv_heads=2, max_len=16, head_dim=16,
                       k_clip=clip, v_clip=clip)
