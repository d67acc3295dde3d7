"""KVCache: layout, writes at each sequence's length, overflow, counters, jit/scan/vmap."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvtpu
from kvtpu import memory, qtensor, quant, rotation
from kvtpu._shared import add_u64
from tests.helpers import assert_close, bits, kv_with_outliers, slow_unless

L, B, K, S, H = 3, 3, 2, 16, 32
DYNAMIC = ["bf16", "int8", "int4", "fp8_e4m3", "fp8_e5m2", "int8-asym", "int4-g16", "k8v4", "int4-nu-rot"]


def make(fmt, **kw):
  return kvtpu.KVCache.init(fmt, num_layers=L, batch=B, kv_heads=K, max_len=S, head_dim=H, **kw)


def static_scales(fmt, value=0.05):
  """Static parameters of the right shapes for a static format (all `value`)."""
  fmt = kvtpu.KVFormat.parse(fmt)
  out = {}
  for name, spec in (("k", fmt.k), ("v", fmt.v)):
    if spec.static:
      shape = quant.static_scale_shape(spec, K, H)
      out[f"{name}_scale"] = np.full(shape, value, np.float32)
      if not spec.symmetric:
        out[f"{name}_zero"] = np.zeros(shape, np.float32)
  return out


@pytest.mark.parametrize("fmt", DYNAMIC + ["int8-head", "fp8_e4m3-channel", "int4-asym-tensor"])
def test_init_stores_what_the_format_claims(fmt):
  cache = make(fmt, **static_scales(fmt))
  f = cache.fmt
  assert cache.k.dtype == f.k.storage_dtype and cache.v.dtype == f.v.storage_dtype
  assert cache.k.shape == cache.v.shape == (L, B, K, S, H)
  for name, spec in (("k", f.k), ("v", f.v)):
    scale, zero = getattr(cache, name).scale, getattr(cache, name).zero
    assert (scale is None) == (not spec.quantized)
    assert (zero is None) == spec.symmetric or not spec.quantized
    if spec.quantized:
      assert scale.dtype == spec.scale_jnp_dtype
  assert int(cache.lengths.sum()) == 0 and not bool(cache.overflow.any())
  layout = memory.cache_layout(f, num_layers=L, batch=B, kv_heads=K, max_len=S, head_dim=H)
  assert jax.tree.structure(layout) == jax.tree.structure(cache)
  for arr, sds in zip(jax.tree.leaves(cache), jax.tree.leaves(layout), strict=True):
    assert (arr.shape, arr.dtype) == (sds.shape, sds.dtype)
  assert cache.nbytes == memory.cache_bytes(f, num_layers=L, batch=B, kv_heads=K, max_len=S,
                                            head_dim=H)


def test_static_scales_are_required_and_validated():
  with pytest.raises(ValueError, match="k_scale.*shape"):
    make("int8-head")
  with pytest.raises(ValueError, match="k_zero"):
    make("int8-asym-head", k_scale=np.ones((K, 1)), v_scale=np.ones((K, 1)))
  for bad in (0.0, -1.0, np.nan, np.inf):
    s = np.ones((L, K, 1), np.float32)
    s[1, 0, 0] = bad
    with pytest.raises(ValueError, match=r"k_scale must be finite and > 0.*index \(1, 0, 0\)"):
      make("int8-head", k_scale=s, v_scale=np.ones((K, 1)))
  with pytest.raises(ValueError, match=r"v_scale must have shape \(3, 2, 1\) or \(2, 1\)"):
    make("int8-head", k_scale=np.ones((K, 1)), v_scale=np.ones((K, H)))
  # Positive in float32 but 0 once rounded into the bf16 scale dtype.
  with pytest.raises(ValueError, match=r"k_scale \(as bfloat16\)"):
    make("int8-head-sbf16", k_scale=np.full((K, 1), 1e-45), v_scale=np.ones((K, 1)))
  with pytest.raises(ValueError, match="k_scale given, but K is stored as int8, which has no static"):
    make("int8", k_scale=np.ones((1, 1)))
  # Broadcast over layers when the leading L is left out.
  cache = make("int8-head", k_scale=np.full((K, 1), 0.5), v_scale=np.full((L, K, 1), 0.25))
  np.testing.assert_array_equal(cache.k.scale, np.full((L, K, 1), 0.5))


@pytest.mark.parametrize("fmt", [pytest.param(f, marks=slow_unless(f in ("int8", "int4-g16", "int8-head")))
                                 for f in DYNAMIC + ["int8-head"]])
def test_update_writes_at_each_length_and_nowhere_else(fmt, rng):
  cache = make(fmt, **static_scales(fmt, 0.2))
  # Ragged prefixes: 0, 5 and S - 4 tokens, then a chunk of 4 new tokens.
  prefix = np.array([0, 5, S - 4])
  pre = jnp.asarray(kv_with_outliers(rng, (B, S - 4, K, H)))
  cache = cache.update(1, pre, pre, valid_len=prefix).advance(prefix)
  before = cache
  k = jnp.asarray(kv_with_outliers(rng, (B, 4, K, H)))
  v = jnp.asarray(rng.standard_normal((B, 4, K, H)), jnp.bfloat16)
  cache = cache.update(1, k, v)
  np.testing.assert_array_equal(cache.lengths, prefix)  # update does not move lengths.
  f = cache.fmt
  for name, x in (("k", k), ("v", v)):
    spec = f.spec(name)
    static = {} if not spec.static else dict(scale=before.k.scale[1] if name == "k" else before.v.scale[1])
    stored = rotation.rotate(x, jnp.float32) if spec.rotation else x  # The stored coordinates.
    expect = quant.quantize(stored, spec, **static)
    got, old = np.asarray(getattr(cache, name).values), np.asarray(getattr(before, name).values)
    written = np.zeros(got.shape, bool)
    for b in range(B):
      for t in range(4):
        pos = prefix[b] + t
        np.testing.assert_array_equal(got[1, b, :, pos], np.asarray(expect.q[b, t]))
        written[1, b, :, pos] = True
        if spec.dynamic:
          np.testing.assert_array_equal(getattr(cache, name).scale[1, b, :, :, pos],
                                        expect.scale[b, t])
    np.testing.assert_array_equal(got[~written], old[~written])  # Nothing else moved.
  counts = cache.counts()
  # Layer 1: the ragged prefix (0 + 5 + 12 tokens) and the chunk (3 x 4), K*H values each.
  assert counts["written"].tolist() == [0, (prefix.sum() + B * 4) * K * H, 0]


def test_advance_and_overflow_touch_only_their_sequence(rng):
  cache = make("int8")
  x = jnp.asarray(rng.standard_normal((B, S, K, H)), jnp.float32)
  cache = cache.update(0, x, x).advance(jnp.array([S - 1, 3, 0]))
  snapshot = cache
  # Sequence 0 has one free slot: a 3-token chunk writes one and drops two.
  y = jnp.asarray(rng.standard_normal((B, 3, K, H)), jnp.float32)
  cache = cache.update(0, y, y)
  np.testing.assert_array_equal(cache.k.values[0, 0, :, : S - 1], snapshot.k.values[0, 0, :, : S - 1])
  assert not np.array_equal(cache.k.values[0, 0, :, S - 1], snapshot.k.values[0, 0, :, S - 1])
  # Other sequences get exactly their 3 new tokens, nothing at other positions.
  np.testing.assert_array_equal(cache.k.values[0, 1, :, 6:], snapshot.k.values[0, 1, :, 6:])
  np.testing.assert_array_equal(cache.k.values[0, 2, :, 3:], snapshot.k.values[0, 2, :, 3:])
  cache = cache.advance(3)
  np.testing.assert_array_equal(cache.lengths, [S, 6, 3])
  np.testing.assert_array_equal(cache.overflow, [True, False, False])
  # Dropped writes are not counted as written.
  assert cache.counts()["written"][0] == (B * S + (1 + 3 + 3)) * K * H
  # Overflow is sticky; reset clears the chosen sequence only.
  cache = cache.advance(0).reset(np.array([True, False, False]))
  np.testing.assert_array_equal(cache.lengths, [0, 6, 3])
  np.testing.assert_array_equal(cache.overflow, [False, False, False])


# Counts far past max_len, in every integer dtype: none may wrap into a small or
# negative length (an int32 sum of 10 + 2**31 - 1 did; uint32 2**32 - 1 became -1).
HUGE_COUNTS = [2**31 - 1, 2**40, np.int32(2**31 - 1), np.uint32(2**32 - 1), np.int64(2**40),
               np.uint64(2**64 - 1), np.int8(127), np.uint16(S + 1), S + 1]


@pytest.mark.parametrize("num", HUGE_COUNTS, ids=lambda n: f"{type(n).__name__}-{n}")
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_advance_saturates_at_max_len_for_every_integer_dtype(num, jit):
  dtype = np.asarray(num).dtype
  if jit and (dtype.itemsize > 4 or int(num) >= 2**31 and dtype.kind == "i"):
    pytest.skip("a traced value is at most 32-bit without jax_enable_x64")
  cache = make("int8").advance(jnp.array([10, 0, S]))
  advance = jax.jit(lambda c, n: c.advance(n)) if jit else (lambda c, n: c.advance(n))
  out = advance(cache, np.asarray(num) if jit else num)
  np.testing.assert_array_equal(out.lengths, [S, min(S, int(num)), S])
  np.testing.assert_array_equal(out.overflow, [True, int(num) > S, True])
  assert not any(f.any() for f in out.error_flags().values())
  # Per sequence, in the same dtype.
  out = advance(cache, np.array([num, 0, 1], dtype))
  np.testing.assert_array_equal(out.lengths, [S, 0, S])
  np.testing.assert_array_equal(out.overflow, [True, False, True])


def test_traced_out_of_range_arguments_are_flagged_not_applied(rng):
  cache = make("int8").advance(jnp.array([2, 0, 5]))
  x = jnp.asarray(rng.standard_normal((B, 4, K, H)), jnp.float32)
  update = jax.jit(lambda c, layer, n: c.update(layer, x, x, valid_len=n))
  for layer in (L, -1, 2**31 - 1):
    out = update(cache, jnp.int32(layer), jnp.int32(4))
    for got, old in zip(jax.tree.leaves(out.k), jax.tree.leaves(cache.k), strict=True):
      np.testing.assert_array_equal(got, old)  # No layer written, not even the last.
    assert out.counts()["written"].sum() == 0
    np.testing.assert_array_equal(out.error_flags()["layer_out_of_range"], [True] * B)
  # A negative valid_len writes nothing for its sequence, flags it, and the others
  # are written as usual.
  out = update(cache, jnp.int32(1), jnp.array([4, -1, 2], jnp.int32))
  np.testing.assert_array_equal(out.error_flags()["negative_count"], [False, True, False])
  assert out.counts()["written"][1] == (4 + 2) * K * H
  np.testing.assert_array_equal(out.k.values[1, 1], cache.k.values[1, 1])
  # A negative num_new adds nothing and flags its sequence; reset clears the flag.
  out = jax.jit(lambda c, n: c.advance(n))(cache, jnp.array([1, -3, 0], jnp.int32))
  np.testing.assert_array_equal(out.lengths, [3, 0, 5])
  np.testing.assert_array_equal(out.error_flags()["negative_count"], [False, True, False])
  assert not out.overflow.any()
  out = out.reset(np.array([False, True, False]))
  assert not out.error_flags()["negative_count"].any()
  # Concrete negative counts are errors at the call, not flags.
  with pytest.raises(ValueError, match=r"num_new must be >= 0, got num_new=\[0, -1, 0\]"):
    cache.advance(np.array([0, -1, 0], np.int64))
  with pytest.raises(ValueError, match="valid_len must be >= 0"):
    cache.update(0, x, x, valid_len=-1)
  with pytest.raises(TypeError, match="num_new must be an int or an integer array"):
    cache.advance(True)


def test_attend_gives_nan_for_traced_out_of_range_arguments(rng):
  cache = make("int8")
  x = jnp.asarray(rng.standard_normal((B, 2, K, H)), jnp.float32)
  cache = cache.update(0, x, x)
  q = jnp.asarray(rng.standard_normal((B, 2, 2 * K, H)), jnp.float32)
  attend = jax.jit(lambda layer, n: kvtpu.attend(q, cache, layer, valid_len=n, impl="xla"))
  good = np.asarray(attend(jnp.int32(0), jnp.int32(2)))
  assert np.isfinite(good).all()
  np.testing.assert_array_equal(good, kvtpu.attend(q, cache, 0, impl="xla"))
  assert np.isnan(attend(jnp.int32(L), jnp.int32(2))).all()
  assert np.isnan(attend(jnp.int32(-1), jnp.int32(2))).all()
  out = np.asarray(attend(jnp.int32(0), jnp.array([2, -1, 2], jnp.int32)))
  assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2]]).all()


def test_bad_inputs_are_clear_errors():
  cache = make("int8")
  k = jnp.zeros((B, 2, K, H))
  with pytest.raises(IndexError, match=f"layer={L} is out of range for num_layers={L}"):
    cache.update(L, k, k)
  with pytest.raises(IndexError, match="layer=-1"):
    cache.update(-1, k, k)
  with pytest.raises(TypeError, match="layer must be an int"):
    cache.update(1.0, k, k)
  with pytest.raises(ValueError, match=r"k must be a \[B, T, K, H\] array"):
    cache.update(0, k[0], k)
  with pytest.raises(ValueError, match=r"v.shape=.*expected \[B=3, T, K=2, H=32\]"):
    cache.update(0, k, jnp.zeros((B, 2, K, H + 1)))
  with pytest.raises(TypeError, match="k must be floating point"):
    cache.update(0, k.astype(jnp.int8), k)
  with pytest.raises(ValueError, match=f"T={S + 1} tokens cannot fit in a cache of max_len={S}"):
    cache.update(0, jnp.zeros((B, S + 1, K, H)), jnp.zeros((B, S + 1, K, H)))
  with pytest.raises(ValueError, match="num_new must be >= 0"):
    cache.advance(-1)
  with pytest.raises(ValueError, match=r"num_new must be a scalar or have shape \(batch,\)"):
    cache.advance(jnp.ones((B + 1,), jnp.int32))
  with pytest.raises(TypeError, match="num_new must be an int"):
    cache.advance(1.5)
  with pytest.raises(ValueError, match="valid_len must be >= 0"):
    cache.update(0, k, k, valid_len=np.array([1, -1, 2]))
  with pytest.raises(ValueError, match="num_layers must be a positive int"):
    kvtpu.KVCache.init("int8", num_layers=0, batch=B, kv_heads=K, max_len=S, head_dim=H)
  with pytest.raises(ValueError, match="invalid KV format name='int9'"):
    kvtpu.KVCache.init("int9", num_layers=1, batch=B, kv_heads=K, max_len=S, head_dim=H)


def test_counters_saturation_and_nonfinite(rng):
  # Static per-head scale 0.01: int8 holds |x| <= 1.27 (plus half a step).
  scale = 0.01
  cache = make("int8-head", **static_scales("int8-head", scale))
  x = rng.standard_normal((B, 5, K, H)).astype(np.float32)
  x[0, 1, 0, :4] = [np.nan, np.inf, -np.inf, np.nan]
  v = x.copy()
  v[2, 3, 1, 7] = np.nan
  cache = cache.update(2, jnp.asarray(x), jnp.asarray(v), valid_len=np.array([5, 5, 3]))
  counts = cache.counts()
  valid = np.arange(5)[None, :] < np.array([5, 5, 3])[:, None]  # [B, T]

  def expected_saturated(a):
    r = np.round(np.where(np.isfinite(a), a, 0) / scale)
    return int(((np.abs(r) > 127) & valid[:, :, None, None]).sum())

  assert counts["k_saturated"].tolist() == [0, 0, expected_saturated(x)]
  assert counts["v_saturated"].tolist() == [0, 0, expected_saturated(v)]
  assert counts["k_nonfinite"].tolist() == [0, 0, 4]
  assert counts["v_nonfinite"].tolist() == [0, 0, 4]  # v[2, 3] is past valid_len: not counted.
  assert counts["written"][2] == valid.sum() * K * H
  rates = cache.saturation_rates()
  assert 0 < rates["k"][2] < 1 and rates["k"][0] == 0
  # Dynamic scales never saturate, even with outliers.
  dyn = make("int8").update(0, jnp.asarray(kv_with_outliers(rng, (B, 5, K, H))),
                            jnp.asarray(kv_with_outliers(rng, (B, 5, K, H))))
  assert dyn.counts()["k_saturated"][0] == 0 and dyn.counts()["v_saturated"][0] == 0


def test_counters_are_64_bit():
  c = jnp.array([[2**32 - 3, 7], [5, 0]], jnp.uint32)
  out = np.asarray(add_u64(c, jnp.array([10, 2**32 - 1], jnp.uint32)))
  assert out.tolist() == [[7, 8], [4, 1]]  # 7*2^32 + 2^32 - 3 + 10 = 8*2^32 + 7.
  cache = make("int8")
  cache = dataclasses.replace(cache, counters=cache.counters.at[0, 0].set(jnp.array([2**32 - 1, 2], jnp.uint32)))
  cache = cache.update(0, jnp.zeros((B, 1, K, H)), jnp.zeros((B, 1, K, H)))
  assert cache.counts()["written"][0] == 3 * 2**32 - 1 + B * K * H


def test_jit_donation_writes_in_place():
  cache = make("int8")
  k = jnp.ones((B, 1, K, H))
  step = jax.jit(lambda c, k: c.update(1, k, k).advance(1), donate_argnums=0)
  compiled = step.lower(cache, k).compile()
  stats = compiled.memory_analysis()
  # Every cache buffer is aliased to its output, and no temporary holds a copy.
  assert stats.alias_size_in_bytes >= cache.nbytes
  assert stats.temp_size_in_bytes < cache.nbytes / 10
  out = step(cache, k)
  assert cache.k.values.is_deleted()  # Donated.
  np.testing.assert_array_equal(out.lengths, [1, 1, 1])


@pytest.mark.parametrize("fmt", [pytest.param(f, marks=slow_unless(f == "int8"))
                                 for f in ("int8", "int4-asym-g16", "fp8_e4m3")])
def test_scan_over_layers_and_steps_matches_a_python_loop(fmt, rng):
  ks = jnp.asarray(kv_with_outliers(rng, (L * B, 2, K, H)).reshape(L, B, 2, K, H))
  vs = jnp.asarray(rng.standard_normal((L, B, 2, K, H)), jnp.float32)

  def body(cache, layer_kv):
    layer, k, v = layer_kv
    return cache.update(layer, k, v), None

  scanned, _ = jax.jit(lambda c: jax.lax.scan(body, c, (jnp.arange(L), ks, vs)))(make(fmt))
  looped = make(fmt)
  for layer in range(L):
    looped = looped.update(layer, ks[layer], vs[layer])
  for a, b in zip(jax.tree.leaves(scanned), jax.tree.leaves(looped), strict=True):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))

  # Decode steps under scan: lengths advance per step.
  def decode(cache, kv):
    return cache.update(0, kv, kv).advance(1), None

  steps = jnp.asarray(rng.standard_normal((5, B, 1, K, H)), jnp.float32)
  out, _ = jax.lax.scan(decode, make(fmt), steps)
  np.testing.assert_array_equal(out.lengths, [5] * B)
  ref = make(fmt).update(0, jnp.swapaxes(steps[:, :, 0], 0, 1), jnp.swapaxes(steps[:, :, 0], 0, 1))
  np.testing.assert_array_equal(np.asarray(out.k.values[0, :, :, :5], np.float32),
                                np.asarray(ref.k.values[0, :, :, :5], np.float32))


def test_vmap_over_stacked_caches(rng):
  caches = [make("int8"), make("int8").advance(jnp.array([1, 2, 3]))]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *caches)
  k = jnp.asarray(rng.standard_normal((2, B, 2, K, H)), jnp.float32)
  out = jax.vmap(lambda c, k: c.update(1, k, k).advance(2))(stacked, k)
  for i, cache in enumerate(caches):
    ref = cache.update(1, k[i], k[i]).advance(2)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
      np.testing.assert_array_equal(a[i], b)


def test_dequantized_round_trips_with_quant(rng):
  cache = make("int4-g16")
  x = jnp.asarray(kv_with_outliers(rng, (B, 3, K, H)))
  cache = cache.update(0, x, x)
  deq = cache.dequantized(0, "k")[:, :, :3]  # [B, K, 3, H]
  res = quant.quantize(x, cache.fmt.k)
  expect = quant.dequantize(res.q, cache.fmt.k, res.scale)
  assert_close(deq, jnp.swapaxes(expect, 1, 2), atol=0, name="dequantized")


@pytest.mark.parametrize("fmt", [pytest.param(f, marks=slow_unless(f == "int8"))
                                 for f in ("int8", "int4-g16", "fp8_e4m3", "int8-asym")])
def test_clip_ratios_set_the_written_scales_and_count_what_they_clip(fmt, rng):
  clip = np.array([[1.0, 0.5], [0.8, 0.25], [0.6, 1.0]], np.float32)  # [L, K]
  cache = make(fmt, k_clip=clip)
  assert cache.v.clip is None and cache.k.clip.shape == (L, K)
  assert cache.nbytes == memory.cache_bytes(fmt, num_layers=L, batch=B, kv_heads=K, max_len=S,
                                            head_dim=H, clip=("k",))
  x = kv_with_outliers(rng, (B, 5, K, H))
  x[0, 0, 0, 0] = np.nan
  valid = np.array([5, 2, 0])
  for layer in range(L):
    cache = cache.update(layer, jnp.asarray(x), jnp.asarray(x), valid_len=valid)
  cache = cache.advance(valid)
  counts = cache.counts()
  mask = (np.arange(5)[None, :] < valid[:, None])[:, :, None, None]
  spec = cache.fmt.k
  for layer in range(L):
    ref = quant.quantize(jnp.asarray(x), spec, clip=clip[layer])
    assert counts["k_saturated"][layer] == int((np.asarray(ref.saturated) & mask).sum())
    # The scales stored per token are those of the clipped ranges.
    stored = np.swapaxes(np.asarray(cache.k.scale[layer]), -1, -2)  # [B, K, S, G]
    for b in range(B):
      np.testing.assert_array_equal(stored[b, :, :valid[b]],
                                    np.swapaxes(np.asarray(ref.scale[b, :valid[b]]), 0, 1))
  assert counts["k_saturated"][1] > counts["k_saturated"][0] > 0  # 0.25 clips more than 0.5.
  assert counts["v_saturated"].sum() == 0  # V: plain per-token absmax.
  assert counts["k_nonfinite"][0] == 1
  # Shared across layers when the leading L is left out.
  np.testing.assert_array_equal(make(fmt, v_clip=[0.5, 0.75]).v.clip, [[0.5, 0.75]] * L)


def test_clip_ratio_errors_in_the_cache():
  with pytest.raises(ValueError, match=r"k_clip must be clip ratios in \(0, 1\].*index \(2, 1\)"):
    make("int8", k_clip=np.array([[1.0, 1.0]] * 2 + [[1.0, 1.5]]))
  with pytest.raises(ValueError, match=r"v_clip must have shape \(3, 2\) or \(2,\)"):
    make("int8", v_clip=np.ones((L, K, 1)))
  with pytest.raises(ValueError, match="k_clip given, but K is stored as int8-head: clip ratios are for range-scaled dynamic"):
    make("int8-head", k_clip=np.ones(K), **static_scales("int8-head"))
  with pytest.raises(ValueError, match="v_clip given, but V is stored as bf16"):
    make("k8v16", v_clip=np.ones(K))
  with pytest.raises(ValueError, match="clip names the tensors with clip ratios"):
    memory.cache_bytes("bf16", num_layers=L, batch=B, kv_heads=K, max_len=S, head_dim=H,
                       clip=("k",))


@pytest.mark.parametrize("dtype", [
    pytest.param(d, marks=slow_unless(d in (jnp.int8, jnp.int4)))
    for d in (jnp.int8, jnp.int4, jnp.bfloat16, jnp.float8_e4m3fn, jnp.float32)])
@pytest.mark.parametrize("t", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_block_writes_equal_scatter_writes(dtype, t, rng):
  # TPU writes the cache with the Pallas kernel (or per-sequence dynamic-update-slices
  # where the kernel cannot take the layout), CPU with a scatter (`qtensor.write_rows`);
  # all must store exactly the same bytes. Lengths cover
  # empty, mid, block-1, at capacity (blocks clamped back over earlier tokens, which
  # must survive) and ragged valid lengths, over NaN-poisoned memory.
  num_layers, b, kh, s, x = 2, 6, 2, 8, 4
  lengths = jnp.asarray([0, 3, s - 2, s - 1, s, 5], jnp.int32)
  valid = jnp.asarray([t, t, t, 1, t, 0], jnp.int32)
  where = qtensor.Placement.of(lengths, jnp.minimum(valid, t), t, s)
  for seq_axis, shape in ((3, (num_layers, b, kh, s, x)), (4, (num_layers, b, kh, x, s))):
    store = rng.standard_normal(shape).astype(np.float32) * 4
    store[..., ::3] = np.nan if jnp.issubdtype(dtype, jnp.floating) else 0
    store = jnp.asarray(store).astype(dtype)
    values = jnp.asarray(rng.standard_normal((b, t, kh, x)) * 4).astype(dtype)
    by_scatter = qtensor.write_rows(store, 1, values, where, seq_axis, "scatter")
    by_blocks = qtensor.write_rows(store, 1, values, where, seq_axis, "blocks")
    np.testing.assert_array_equal(bits(by_blocks), bits(by_scatter))
    by_kernel = qtensor.write_rows(store, 1, values, where, seq_axis, "interpret")
    np.testing.assert_array_equal(bits(by_kernel), bits(by_scatter))
    # Layer 0 untouched, and something was written.
    np.testing.assert_array_equal(bits(by_blocks[0]), bits(store[0]))
    assert not np.array_equal(bits(by_blocks[1]), bits(store[1]))
  with pytest.raises(ValueError, match="method must be one of"):
    qtensor.write_rows(store, 1, values, where, 4, "gather")
