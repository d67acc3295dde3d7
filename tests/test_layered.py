"""Formats per layer (`LayerPlan`) and the cache of layer groups (`LayeredKVCache`):
grammar, writes and attention equal to one-format caches of each layer, counters,
bytes, and a model and generation running on it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvtpu
from kvtpu import KVFormat, LayerPlan, memory
from tests.helpers import TINY, flat_arrays, kv_with_outliers, poison

PLAN = "int4-asym+recent8|int8@1,3|k=int2-nu-sbf16-rot,v=int4-g8+sink2+recent8@2"
L, B, K, S, H = 5, 3, 2, 128, 128  # int2 needs S and H multiples of 128.
WRITTEN = "int4-asym+recent8|int8@1|k=int2-nu-sbf16-rot,v=int4-g8+sink2+recent8@2"  # 4 layers.


def test_grammar_and_refusals():
  plan = LayerPlan.parse(PLAN)
  assert plan.name == PLAN and LayerPlan.parse(plan.name) == plan
  assert [f.name for f in plan.formats(5)] == [
      "int4-asym+recent8", "int8", "k=int2-nu-sbf16-rot,v=int4-g8+sink2+recent8", "int8",
      "int4-asym+recent8"]
  assert [(f.name, layers) for f, layers in plan.groups(5)] == [
      ("int4-asym+recent8", (0, 4)), ("int8", (1, 3)),
      ("k=int2-nu-sbf16-rot,v=int4-g8+sink2+recent8", (2,))]
  assert [f.name for f, _ in plan.groups(4)][0] == "int4-asym+recent8"
  only = LayerPlan.parse("int8|bf16@0-1")
  assert [(f.name, layers) for f, layers in only.groups(2)] == [("bf16", (0, 1))]
  assert LayerPlan.parse("int8") == LayerPlan(KVFormat.parse("int8"))
  assert LayerPlan.parse(KVFormat.parse("int8")).overrides == ()
  assert LayerPlan.parse("int8|int4@7,2-4,9").name == "int8|int4@2-4,7,9"
  for bad, match in [("int8|int4@1|k8v4@1", r"layers \[1\] are given two formats"),
                     ("int8|int8@1", "appears twice"),
                     ("int8|int4@1|int4@2", "appears twice"),
                     ("int8|int4@3-1", "ranges a-b"), ("int8|int4@1,1", "listed twice"),
                     ("int8|int4", "each override is format@layers"),
                     ("int8|int3@1", "unknown storage dtype 'int3'"),
                     ("int8|int4@x", "layers are ints")]:
    with pytest.raises(ValueError, match=match):
      LayerPlan.parse(bad)
  with pytest.raises(ValueError, match="gives layer 5 a format, but the model has 5 layers"):
    LayerPlan.parse("int8|int4@5").formats(5)
  with pytest.raises(ValueError, match="static scales"):
    kvtpu.LayeredKVCache.init("int8|int8-head@1", num_layers=2, batch=1, kv_heads=1,
                              max_len=8, head_dim=8)


# (T, valid_len) steps: ragged chunks, sequence 0 overflowing on the second, then a token
# each; all 100 wide (one compiled write and attention per format), ragged by the counts.
CHUNKS = [(100, [100, 3, 0]), (100, [30, 0, 30]), (100, [1, 1, 1])]


def test_each_layer_is_the_cache_of_its_format(rng):
  """Writes, attention, counters and lengths of every layer equal those of a one-format
  cache fed the same chunks (layers 0 and 3 share a group); unwritten memory NaN-poisoned."""
  plan, num = LayerPlan.parse(WRITTEN), 4
  dims = dict(batch=B, kv_heads=K, max_len=S, head_dim=H)
  cache = kvtpu.LayeredKVCache.init(plan, num_layers=num, **dims)
  cache = kvtpu.LayeredKVCache(tuple(poison(g) for g in cache.groups), plan, num)
  singles = [poison(kvtpu.KVCache.init(f, num_layers=1, **dims)) for f in plan.formats(num)]
  assert cache.nbytes == memory.plan_cache_bytes(plan, num_layers=num, **dims)
  for t, valid in CHUNKS:
    valid = np.asarray(valid)
    q = jnp.asarray(rng.standard_normal((B, t, 4, H)), jnp.float32)
    for layer in range(num):
      k, v = (jnp.asarray(kv_with_outliers(rng, (B, t, K, H))) for _ in range(2))
      cache = cache.update(layer, k, v, valid_len=valid)
      singles[layer] = singles[layer].update(0, k, v, valid_len=valid)
      got = kvtpu.attend(q, cache, layer, valid_len=valid, impl="xla")
      want = kvtpu.attend(q, singles[layer], 0, valid_len=valid, impl="xla")
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=f"layer {layer}")
      assert np.isfinite(np.asarray(got)).all()
    cache = cache.advance(valid)
    singles = [s.advance(valid) for s in singles]
  for g, (fmt, layers) in enumerate(plan.groups(num)):
    group = flat_arrays(cache.groups[g])
    for i, layer in enumerate(layers):
      single = flat_arrays(singles[layer])
      for name in ("k.values", "v.values", "k.scale", "v.scale", "k.zero", "k.recent", "v.sink"):
        if name in single:
          np.testing.assert_array_equal(
              np.asarray(group[name][i].astype(jnp.float32)),
              np.asarray(single[name][0].astype(jnp.float32)), err_msg=f"{fmt.name} {name}")
  np.testing.assert_array_equal(cache.lengths, singles[0].lengths)
  np.testing.assert_array_equal(cache.overflow, [True, False, False])
  counts = cache.counts()
  for name in counts:
    np.testing.assert_array_equal(counts[name], [s.counts()[name][0] for s in singles])
  assert cache.error_flags()["negative_count"].tolist() == [False] * B
  with pytest.raises(TypeError, match="picks a layer by a Python int"):
    jax.jit(lambda c, i: c.update(i, k, v))(cache, 1)
  with pytest.raises(IndexError):
    cache.update(num, k, v)
  reset = cache.reset(np.array([True, False, False]))
  assert all(g.lengths.tolist() == [0, *cache.lengths.tolist()[1:]] for g in reset.groups)


def test_plan_bytes_are_the_layers_bytes():
  plan = LayerPlan.parse(PLAN)
  per_layer = [memory.bytes_per_token(f, kv_heads=8, head_dim=128) for f in plan.formats(L)]
  assert memory.plan_bytes_per_token(plan, num_layers=L, kv_heads=8, head_dim=128) == sum(per_layer)
  bits = [memory.effective_bits(f, context=8192, kv_heads=8, head_dim=128) for f in plan.formats(L)]
  assert memory.plan_effective_bits(plan, context=8192, num_layers=L, kv_heads=8,
                                    head_dim=128) == pytest.approx(np.mean(bits), rel=1e-12)
  # int8 (8.25 bits at head_dim 128), twice; int4-asym (4.5) with an 8-position window,
  # twice; keys int2-nu with bf16 scales (2.125) and values int4-g8 (4 + 16 float32
  # scales per 128 values = 8), with 10 window positions.
  expect = (2 * 8.25 + 2 * (4.5 + 8 * 16 / 8192) + (2.125 + 8) / 2 + 10 * 16 / 8192) / L
  assert memory.plan_effective_bits(PLAN, context=8192, num_layers=L, kv_heads=8,
                                    head_dim=128) == pytest.approx(expect, rel=1e-12)


def test_a_model_runs_on_a_plan_and_one_group_is_its_format(rng):
  from kvtpu.models.generation import generate
  from kvtpu.models.llama import Llama

  model = Llama(TINY, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(rng.integers(0, TINY.vocab_size, (2, 9)))
  # Both of the tiny model's layers overridden to bf16: one group, the bf16 cache.
  one = model.init_cache("int8|bf16@0-1", batch=2, max_len=16)
  assert [g.fmt.name for g in one.groups] == ["bf16"]
  got, _ = model(tokens, one)
  want, _ = model(tokens, model.init_cache("bf16", batch=2, max_len=16))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  mixed = model.init_cache("int4+recent4|int8@1", batch=2, max_len=16)
  logits, mixed = model(tokens, mixed)
  assert np.isfinite(np.asarray(logits)).all() and mixed.lengths.tolist() == [9, 9]
  assert mixed.counts()["written"].tolist() == [9 * 2 * TINY.num_kv_heads * TINY.head_dim] * 2
  sharding = kvtpu.sharding.CacheSharding(jax.make_mesh((1, 1), ("data", "model")))
  with pytest.raises(ValueError, match="a LayeredKVCache .* runs unsharded"):
    model(tokens, mixed, cache_sharding=sharding)
  with pytest.raises(TypeError, match="CacheSharding shards a KVCache, got LayeredKVCache"):
    sharding.specs(mixed)
  with pytest.raises(ValueError, match="takes no calibration or static scales"):
    model.init_cache("int8|bf16@1", batch=1, max_len=8, k_scale=np.ones((1, 1)))
  out = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=3, kv_format="int4+recent4|int8@1")
  assert isinstance(out.cache, kvtpu.LayeredKVCache)
  assert out.cache.lengths.tolist() == [3 + len(out.tokens[0]), 2 + len(out.tokens[1])]
