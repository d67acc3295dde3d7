"""Calibration through the model: statistics of what the observe hook sees, the artifact
that `calibrate` builds, every method, and applying it to the model's cache."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from kvtpu.models.calibrate import attention_inputs, calibrate, collect_statistics
from kvtpu.models.llama import Llama

from kvtpu import KVCache, QuantSpec
from kvtpu.calibration import stats as kv_stats
from kvtpu.eval import workloads
from tests.helpers import TINY, slow_unless

CFG = dataclasses.replace(TINY, num_layers=2, max_position=256)


@pytest.fixture(scope="module")
def model():
  return Llama(CFG, rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def data():
  return workloads.random_tokens(CFG.vocab_size, num_tokens=4096, seed=1)


def test_statistics_equal_numpy_on_the_observed_activations(model, data):
  batches = list(data.windows(32, batch=4, num_tokens=512))
  stats = collect_statistics(model, batches, impl="xla")
  for kind in ("k_pre", "k", "v"):
    seen = []
    for tokens in batches:
      captured = {}
      model(jnp.asarray(tokens), model.init_cache("bf16", batch=4, max_len=32), impl="xla",
            observe=lambda layer, k, x, c=captured: c.setdefault((layer, k), np.asarray(x)))
      seen.append(np.stack([captured[layer, kind] for layer in range(2)]))  # [L, B, T, K, H]
    x = np.concatenate(seen, axis=1).reshape(2, -1, CFG.num_kv_heads, CFG.head_dim)
    s = kv_stats.summary(stats[kind])
    np.testing.assert_array_equal(s["tokens"], [512, 512])
    np.testing.assert_allclose(s["max"], x.max(axis=1), rtol=1e-6)
    np.testing.assert_allclose(s["min"], x.min(axis=1), rtol=1e-6)
    np.testing.assert_allclose(s["mean"], x.mean(axis=1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", [pytest.param(m, marks=slow_unless(m == "absmax"))
                                    for m in ("absmax", "percentile", "mse", "learned")])
def test_calibrate_builds_an_artifact_the_cache_applies(model, data, method, tmp_path):
  fmt = "k=int8-channel,v=int4-asym-head"
  art, stats = calibrate(model, [data], fmt, method=method, seq_len=32, batch=4,
                         num_tokens=512, learn_steps=5, impl="xla")
  assert art.model["name"] == "tiny" and art.model["weight_precision"] == model.weight_precision
  assert art.workloads[0]["token_sha256"] == data.token_sha256
  assert art.workloads[0]["tokens_used"] == 512 and art.method == method
  assert {w: sorted(d) for w, d in art.scales.items()} == {"k": ["scale"], "v": ["scale", "zero"]}
  if method == "absmax":
    assert art.clip_fraction["k"].max() == 0 and art.clip_fraction["v"].max() == 0
  path = art.save(tmp_path / "artifact")
  cache = model.init_cache(fmt, batch=1, max_len=8, calibration=type(art).load(path))
  np.testing.assert_array_equal(cache.k.scale, art.scales["k"]["scale"])
  np.testing.assert_array_equal(cache.v.zero, art.scales["v"]["zero"])
  logits, _ = model(jnp.asarray(next(iter(data.windows(8, batch=1)))), cache, impl="xla")
  assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("method", [pytest.param(m, marks=slow_unless(m == "absmax"))
                                    for m in ("absmax", "percentile", "mse", "learned")])
def test_calibrate_dynamic_specs_gives_clip_ratios_the_cache_applies(model, data, method,
                                                                     tmp_path):
  fmt = "k=int4,v=int8-head"  # dynamic K (clip ratios), static V (scales)
  options = {"percentile": 99.0} if method == "percentile" else {}
  art, _ = calibrate(model, [data], fmt, method=method, seq_len=32, batch=4, num_tokens=512,
                     learn_steps=5, impl="xla", method_options=options)
  assert {w: sorted(d) for w, d in art.scales.items()} == {"k": ["clip"], "v": ["scale"]}
  clip = art.scales["k"]["clip"]
  assert clip.shape == (CFG.num_layers, CFG.num_kv_heads) and ((clip > 0) & (clip <= 1)).all()
  if method == "absmax":
    assert (clip == 1).all() and art.clip_fraction["k"].max() == 0
  cache = model.init_cache(fmt, batch=4, max_len=32,
                           calibration=type(art).load(art.save(tmp_path / "a")))
  np.testing.assert_array_equal(cache.k.clip, clip)
  # Re-running the first calibration batch clips exactly the calibration fraction.
  first = next(iter(data.windows(32, batch=4)))
  _, cache = model(jnp.asarray(first), cache, impl="xla")
  np.testing.assert_allclose(cache.saturation_rates()["k"], art.clip_fraction["k"], rtol=1e-6)


def test_mismatched_artifact_and_bad_requests_are_clear(model, data):
  art, _ = calibrate(model, [data], "int8-head", seq_len=32, batch=4, num_tokens=256,
                     impl="xla")
  with pytest.raises(ValueError, match="num_layers=2 .*cache has num_layers=3"):
    KVCache.init("int8-head", num_layers=3, batch=1, kv_heads=2, max_len=8, head_dim=16,
                 calibration=art)
  with pytest.raises(ValueError, match="format int8-head, but the cache's format is int8-tensor"):
    KVCache.init("int8-tensor", num_layers=2, batch=1, kv_heads=2, max_len=8, head_dim=16,
                 calibration=art)
  other = Llama(dataclasses.replace(CFG, name="other"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="made on model 'tiny', not 'other'"):
    other.init_cache("int8-head", batch=1, max_len=8, calibration=art)
  with pytest.raises(ValueError, match="format bf16 has nothing to calibrate: K and V are unquantized"):
    calibrate(model, [data], "bf16", seq_len=32, batch=4, num_tokens=256)
  with pytest.raises(ValueError, match="unknown method='best'"):
    calibrate(model, [data], "int8-head", method="best")
  with pytest.raises(ValueError, match="unknown kinds"):
    collect_statistics(model, [], kinds=("q_pre",))


def test_attention_inputs_shapes(model, data):
  inputs = attention_inputs(model, next(iter(data.windows(16, batch=2))), impl="xla")
  assert len(inputs) == 2
  assert inputs[0]["q"].shape == (2, 16, CFG.num_heads, CFG.head_dim)
  assert inputs[1]["k"].shape == inputs[1]["v"].shape == (2, 16, CFG.num_kv_heads, CFG.head_dim)


def test_rotated_specs_are_calibrated_on_what_they_store(model, data):
  """A rotated static spec's absmax scales are those of the rotated keys (nothing
  clipped), not of the keys; the artifact's cache runs."""
  from kvtpu.calibration import methods

  fmt = "k=int8-channel-rot,v=int4-rot"
  art, stats = calibrate(model, [data], fmt, method="absmax", seq_len=32, batch=4,
                         num_tokens=512, impl="xla")
  assert {"k", "k_rot", "v"} <= set(stats) and "k_rot" in art.summary
  expected, _ = methods.compute_scales(stats["k_rot"], QuantSpec.parse("int8-channel-rot"),
                                       "absmax")
  np.testing.assert_array_equal(art.scales["k"]["scale"], np.asarray(expected, np.float32))
  unrotated = collect_statistics(model, data.windows(32, batch=4, num_tokens=512), kinds=("k",))
  plain, _ = methods.compute_scales(unrotated["k"], QuantSpec.parse("int8-channel"), "absmax")
  assert not np.allclose(art.scales["k"]["scale"], plain, rtol=0.05)
  assert art.clip_fraction["k"].max() == 0
  cache = model.init_cache(fmt, batch=1, max_len=8, calibration=art)
  logits, _ = model(jnp.asarray(next(iter(data.windows(8, batch=1)))), cache, impl="xla")
  assert np.isfinite(np.asarray(logits)).all()
