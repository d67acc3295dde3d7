"""Teacher-forced scoring through the cache, on a tiny random Llama."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from kvtpu.models.evaluate import CacheConfig, forward_fn, score_workload
from kvtpu.models.llama import Llama

from kvtpu.eval import workloads
from kvtpu.eval.protocol import Protocol, ragged_lengths, score
from tests.helpers import TINY

CFG = dataclasses.replace(TINY, max_position=128)


@pytest.fixture(scope="module")
def model():
  return Llama(CFG, rngs=nnx.Rngs(5))


def _full_forward_nll(model, tokens, lengths, fmt):
  """Per-token NLL of one plain full-sequence forward, numpy float64."""
  b, s = tokens.shape
  logits, _ = model(jnp.asarray(tokens), model.init_cache(fmt, batch=b, max_len=s),
                    valid_len=jnp.asarray(lengths), impl="xla")
  lp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), -1), np.float64)
  out = []
  for i in range(b):
    n = lengths[i]
    out.append(-lp[i, np.arange(n - 1), tokens[i, 1:n]])
  return np.concatenate(out)


def test_schedule_and_ragged_lengths():
  assert Protocol(prefill=3, chunk=2).schedule(8) == [(0, 3), (3, 2), (5, 2), (7, 2)]
  assert Protocol(prefill=8, chunk=2).schedule(8) == [(0, 8)]
  assert Protocol(prefill=16, chunk=16).schedule(5) == [(0, 5)]
  assert Protocol(prefill=2, chunk=16).schedule(5) == [(0, 2), (2, 5)]
  assert Protocol(prefill=4, chunk=1).schedule(6) == [(0, 4), (4, 1), (5, 1)]
  assert ragged_lengths(64, 4).tolist() == [64, 56, 48, 40]
  assert ragged_lengths(10, 1).tolist() == [10]
  with pytest.raises(ValueError, match="Protocol.chunk must be a positive int"):
    Protocol(chunk=0)


@pytest.mark.parametrize("ref", ["bf16", pytest.param("f32", marks=pytest.mark.slow)])
@pytest.mark.parametrize("prefill, chunk", [pytest.param(16, 1, marks=pytest.mark.slow), (7, 5),
                                            pytest.param(64, 64, marks=pytest.mark.slow)])
def test_reference_cache_reproduces_a_full_forward(model, prefill, chunk, ref, rng):
  tokens = rng.integers(0, CFG.vocab_size, (3, 40)).astype(np.int32)
  lengths = np.array([40, 17, 2])  # ragged, down to a single scored token
  forward, params = forward_fn(model, "xla")
  caches = {"same": model.init_cache(ref, batch=3, max_len=48),
            "int4": model.init_cache("int4", batch=3, max_len=48)}
  res = score(forward, params, tokens, lengths, caches, model.init_cache(ref, batch=3,
                                                                          max_len=48),
              Protocol(prefill=prefill, chunk=chunk, impl="xla"))
  want = _full_forward_nll(model, tokens, lengths, ref)
  same = res["same"]
  assert same.metrics["scored_tokens"] == want.size == 39 + 16 + 1
  np.testing.assert_allclose(same.per_token["nll_ref"], want, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(same.per_token["nll"], want, rtol=2e-5, atol=2e-5)
  # A cache identical to the reference: no divergence beyond rounding. The reference
  # and compared steps are different XLA programs, which the tests' CPU code generation
  # (tests/conftest.py) may round apart in float32; a bf16 cache then rounds an
  # occasional value to the neighbouring bf16 (a relative 2^-8 in one element; int4's
  # error, below, is 1e4 times larger).
  assert same.metrics["kl_mean"] < 1e-6 and same.metrics["top1_agreement"] == 1.0
  assert max(same.metrics["attn_rel_error"]) < 1e-4
  assert same.metrics["ppl"] == pytest.approx(np.exp(want.mean()), rel=1e-5)
  q = res["int4"]
  assert q.metrics["kl_mean"] > 1e-6 and 0 < max(q.metrics["attn_rel_error"]) < 1
  np.testing.assert_allclose(q.per_token["nll_ref"], want, rtol=2e-5, atol=2e-5)
  assert len(q.metrics["attn_rel_error"]) == len(q.metrics["saturation_k"]) == CFG.num_layers
  assert int(np.asarray(q.cache.lengths).sum()) == lengths.sum()


def test_bad_inputs(model, rng):
  forward, params = forward_fn(model, "xla")
  tokens = rng.integers(0, CFG.vocab_size, (2, 16)).astype(np.int32)
  ref = model.init_cache("bf16", batch=2, max_len=16)
  cache = model.init_cache("int8", batch=2, max_len=16)
  with pytest.raises(ValueError, match=r"lengths must be 2 ints in \[2, 16\]"):
    score(forward, params, tokens, [16, 1], {"a": cache}, ref)
  with pytest.raises(ValueError, match="cache 'a' has batch=2, max_len=8"):
    score(forward, params, tokens, [16, 4], {"a": model.init_cache("int8", batch=2, max_len=8)},
          ref)
  used = cache.advance(3)
  with pytest.raises(ValueError, match="cache 'a' is not empty"):
    score(forward, params, tokens, [16, 4], {"a": used}, ref)
  with pytest.raises(ValueError, match="caches is empty"):
    score(forward, params, tokens, [16, 4], {}, ref)


@pytest.mark.slow  # Scores two formats over a workload: compiles a schedule of its own.
def test_score_workload_rows_carry_their_disclosure(model):
  data = workloads.random_tokens(CFG.vocab_size, num_tokens=512, seed=2)
  rows = score_workload(model, data, [CacheConfig("int8"), CacheConfig("fp8_e5m2")], context=32,
                        batch=2, max_len=64, protocol=Protocol(prefill=16, chunk=8, impl="xla"))
  assert [r["kv_format"] for r in rows] == ["int8", "fp8_e5m2"]
  for r in rows:
    assert r["weight_precision"] == "random init (float32)" and r["calibration"] == "dynamic"
    assert r["eval_workload"]["token_sha256"] == data.token_sha256
    assert r["lengths"] == [32, 24] and r["metrics"]["scored_tokens"] == 31 + 23
    assert r["kv_precision"]["k"]["dtype"] == r["kv_format"]
    assert r["protocol"] == {"prefill": 16, "chunk": 8, "impl": "xla", "reference": "bf16"}
  assert rows[0]["kv_bytes_per_token"] == CFG.num_layers * 2 * 2 * (16 + 4)  # K+V, 2 heads
  assert rows[0]["kv_effective_bits"] == 8 + 32 / CFG.head_dim  # int8, f32 per-token scales.
  with pytest.raises(ValueError, match="needs 2048"):
    score_workload(model, data, [CacheConfig("int8")], context=1024, batch=2)
  with pytest.raises(ValueError, match="int8-head has static scales"):
    CacheConfig("int8-head")
