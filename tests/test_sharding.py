"""CacheSharding: a cache sharded over a (data, model) mesh equals the unsharded one bit
for bit, holds exactly the bytes `per_device_bytes` counts, and compiles without gathers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import kvtpu
from kvtpu import memory, quant
from kvtpu import sharding as sharding_lib
from kvtpu._shared import psum_u64
from kvtpu.sharding import CacheSharding
from tests.helpers import assert_close, bits, flat_arrays, kv_with_outliers, slow_unless

L, B, S, H = 2, 8, 64, 32
STATIC = "k=int8-head,v=int8-channel"


def make_mesh(shape, auto: bool = False):
  kw = dict(axis_types=(AxisType.Auto,) * 2) if auto else {}
  return jax.make_mesh(shape, ("data", "model"), **kw)


def static_params(fmt, kv_heads: int, rng) -> dict:
  """Random calibrated scales (and integer zero points) for a format's static specs."""
  fmt = kvtpu.KVFormat.parse(fmt)
  out = {}
  for name in ("k", "v"):
    spec = fmt.spec(name)
    if spec.static:
      shape = (L, *quant.static_scale_shape(spec, kv_heads, H))
      out[f"{name}_scale"] = rng.uniform(0.02, 0.1, shape).astype(np.float32)
      if not spec.symmetric:
        out[f"{name}_zero"] = rng.integers(-3, 4, shape).astype(np.float32)
  return out


def init_kwargs(fmt, kv_heads: int, rng, clip: bool = False) -> dict:
  kw = dict(num_layers=L, batch=B, kv_heads=kv_heads, max_len=S, head_dim=H,
            **static_params(fmt, kv_heads, rng))
  if clip:  # Per layer for K, shared across layers for V.
    kw["k_clip"] = rng.uniform(0.3, 1.0, (L, kv_heads)).astype(np.float32)
    kw["v_clip"] = rng.uniform(0.3, 1.0, (kv_heads,)).astype(np.float32)
  return kw


def poisoned(cache: kvtpu.KVCache, lengths, rng) -> kvtpu.KVCache:
  """`cache` holding `lengths` random tokens per sequence, NaN (floats) or random ints at
  every position that holds none, and counters a few counts short of 2**32."""
  lengths = np.asarray(lengths, np.int32)
  new = {}
  for which in ("k", "v"):
    tensor = getattr(cache, which)
    fields = {}
    for name in ("values", "scale", "zero"):
      x = getattr(tensor, name)
      if x is None or (name != "values" and tensor.spec.static):
        continue  # Absent, or a calibrated static scale.
      n = tensor.spec.token_group if name != "values" else None
      seq_axis = 3 if name == "values" or n else 4
      # A per-channel scale over N positions is held once its group is (its last position).
      pos = (np.arange(S) if n is None else np.arange(n - 1, S, n)).reshape(
          [-1 if i == seq_axis else 1 for i in range(5)])
      held = pos < lengths.reshape(1, -1, 1, 1, 1)
      if jnp.issubdtype(x.dtype, jnp.integer):
        info = jnp.iinfo(x.dtype)
        vals = rng.integers(int(info.min), int(info.max) + 1, x.shape).astype(np.int8)
      else:
        if name == "scale":
          vals = rng.uniform(0.01, 0.1, x.shape)
        elif name == "zero":
          vals = rng.integers(-3, 4, x.shape)
        else:
          vals = rng.standard_normal(x.shape) * 2
        vals = np.where(held, vals, np.nan).astype(np.float32)
      fields[name] = jnp.asarray(vals).astype(x.dtype)
    new[which] = dataclasses.replace(tensor, **fields)
  counters = np.stack([2**32 - rng.integers(1, 100, cache.counters.shape[:-1]),
                       rng.integers(0, 3, cache.counters.shape[:-1])], axis=-1)
  return dataclasses.replace(cache, lengths=jnp.asarray(lengths),
                             overflow=jnp.zeros((cache.batch,), bool),
                             counters=jnp.asarray(counters.astype(np.uint32)), **new)


def assert_same_cache(got: kvtpu.KVCache, want: kvtpu.KVCache) -> None:
  assert got.fmt == want.fmt
  got_arrays, want_arrays = flat_arrays(got), flat_arrays(want)
  assert got_arrays.keys() == want_arrays.keys()
  for name, b in want_arrays.items():
    a = got_arrays[name]
    assert (a.shape, a.dtype) == (b.shape, b.dtype), name
    np.testing.assert_array_equal(bits(a), bits(b), err_msg=name)
  for name, count in want.counts().items():
    np.testing.assert_array_equal(got.counts()[name], count, err_msg=name)


def make_step(update, attend, advance):
  """A step over all layers, as models run it: `lax.scan` over (traced) layer indices
  and stacked `q: [L, B, T, N, H]`, `k, v: [L, B, T, K, H]`; then `advance`."""

  def step(cache, q, k, v, valid):
    def layer_step(cache, xs):
      layer, q, k, v = xs
      cache = update(cache, layer, k, v, valid)
      return cache, attend(q, cache, layer, valid)

    cache, outs = jax.lax.scan(layer_step, cache, (jnp.arange(L), q, k, v))
    return advance(cache, valid), outs

  return step


reference_step = jax.jit(make_step(
    lambda c, layer, k, v, n: c.update(layer, k, v, valid_len=n),
    lambda q, c, layer, n: kvtpu.attend(q, c, layer, valid_len=n, impl="xla"),
    lambda c, n: c.advance(n)))


def sharded_step(sh: CacheSharding):
  return make_step(
      lambda c, layer, k, v, n: sh.update(c, layer, k, v, valid_len=n),
      lambda q, c, layer, n: sh.attend(q, c, layer, valid_len=n, impl="xla"),
      sh.advance)


def chunk(rng, t: int, kv_heads: int):
  """Stacked q, k, v for one step: keys with outliers and a NaN and an inf, at valid
  positions of the ragged chunks below."""
  k = kv_with_outliers(rng, (L * B, t, kv_heads, H)).reshape(L, B, t, kv_heads, H)
  k[0, 2, 0, 0, 3] = np.nan
  k[1, 6, 0, kv_heads - 1, 5] = np.inf
  v = (rng.standard_normal((L, B, t, kv_heads, H)) * 3).astype(np.float32)
  q = rng.standard_normal((L, B, t, 2 * kv_heads, H)).astype(np.float32)
  return q, k, v


# Per sequence: empty and staying empty, mid, filling exactly then overflowing on decode,
# overflowing on prefill (partly dropped), already full (all dropped), short chunks.
LENGTHS = [0, 0, 7, 60, 62, 64, 3, 20]
# Both steps 5 wide (one compiled step per mesh serves both; attend's XLA path has no
# decode/prefill split), ragged by their counts.
STEPS = [(5, [5, 0, 5, 4, 3, 5, 1, 2]),  # Prefill chunk, ragged.
         (5, [1, 0, 1, 1, 1, 1, 0, 1])]  # Decode: a token per sequence.

CASES = [  # mesh shape, Auto axis types, format, kv heads, clip ratios.
    pytest.param((2, 4), False, "int8", 8, False, id="int8-2x4"),
    pytest.param((4, 2), False, "int4", 8, False, id="int4-4x2"),
    pytest.param((8, 1), False, "bf16", 8, False, id="bf16-8x1"),
    pytest.param((1, 8), False, "fp8_e4m3", 8, False, id="fp8-1x8"),
    pytest.param((2, 4), False, "int4-asym-g32", 3, False, id="int4asym-2x4-replicate"),
    pytest.param((4, 2), True, STATIC, 8, False, id="static-4x2-auto"),
    pytest.param((2, 4), True, "int8", 8, True, id="int8clip-2x4-auto"),
    pytest.param((1, 8), True, "k=int4-asym-head,v=fp8_e4m3", 3, False,
                 id="staticasym-1x8-auto-replicate"),
    pytest.param((2, 4), False, "int4-asym+sink2+recent4", 8, False, id="windows-2x4"),
    pytest.param((4, 2), False, "k=int4-asym-c8,v=int8-c8+recent8", 8, False,
                 id="channelgroups-4x2"),
]


@pytest.mark.parametrize("shape,auto,fmt,kv_heads,clip", [  # The fast tier runs the first.
    pytest.param(*c.values, id=c.id, marks=slow_unless(i == 0)) for i, c in enumerate(CASES)])
def test_sharded_steps_equal_unsharded_ones(shape, auto, fmt, kv_heads, clip, rng):
  sh = CacheSharding(make_mesh(shape, auto))
  ref = poisoned(kvtpu.KVCache.init(fmt, **init_kwargs(fmt, kv_heads, rng, clip)), LENGTHS, rng)
  # From the host: `put` may reuse ref's buffers (replicated ones), which donation deletes.
  cache = sh.put(jax.device_get(ref))
  start = ref.counts()
  shardings = sh.shardings(ref)
  step = jax.jit(sharded_step(sh), in_shardings=(shardings, None, None, None, None),
                 out_shardings=(shardings, None), donate_argnums=0)
  for t, valid in STEPS:
    q, k, v = chunk(rng, t, kv_heads)
    valid = np.asarray(valid, np.int32)
    old = cache
    cache, out = step(cache, q, k, v, valid)
    assert old.k.values.is_deleted()  # Donated.
    ref, expect = reference_step(ref, q, k, v, valid)
    assert np.isfinite(np.asarray(expect)).all() and np.abs(np.asarray(expect)).max() > 0.1
    assert_close(out, expect, atol=1e-6, rtol=1e-6, name=f"attention {valid.tolist()}")
    assert_same_cache(cache, ref)
    for leaf, want in zip(jax.tree.leaves(cache), jax.tree.leaves(shardings), strict=True):
      assert leaf.sharding == want
  # The edges happened: overflow on prefill and decode, and counts past 2**32.
  np.testing.assert_array_equal(cache.lengths, [6, 0, 13, 64, 64, 64, 4, 23])
  np.testing.assert_array_equal(cache.overflow, [0, 0, 0, 1, 1, 1, 0, 0])
  counts = cache.counts()
  assert (counts["written"] > 2**32).all()
  if fmt == STATIC or clip:
    assert (counts["k_saturated"] > start["k_saturated"]).all()
  # The NaN is written in both steps (sequence 2), the inf only in the prefill (6).
  assert (counts["k_nonfinite"] - start["k_nonfinite"]).tolist() == [2, 1]


@pytest.mark.parametrize("shape,kv_heads,strategy,expect", [
    ((2, 4), 8, "auto", "heads"),
    ((4, 2), 3, "auto", "replicate"),
    ((2, 4), 3, "auto", "replicate"),
    ((4, 2), 8, "replicate", "replicate"),
    ((8, 1), 3, "heads", "heads"),
])
def test_strategies_set_the_block_each_device_holds(shape, kv_heads, strategy, expect):
  data, model = shape
  sh = CacheSharding(make_mesh(shape), strategy=strategy)
  assert sh.resolved(kv_heads) == expect
  local = kv_heads // model if expect == "heads" else kv_heads
  assert sharding_lib.per_device_dims(batch=B, kv_heads=kv_heads, data=data, model=model,
                                      strategy=strategy) == (B // data, local)
  cache = sh.init("int8", num_layers=L, batch=B, kv_heads=kv_heads, max_len=S, head_dim=H)
  for name in ("k.values", "v.values", "k.scale", "v.scale"):
    arr = flat_arrays(cache)[name]
    assert len(arr.addressable_shards) == data * model
    heads_held = set()
    for shard in arr.addressable_shards:
      assert shard.data.shape[:3] == (L, B // data, local), name
      heads_held.add(shard.index[2].indices(kv_heads))
    if expect == "heads":  # Each model device holds its own contiguous block of heads.
      assert heads_held == {(j * local, (j + 1) * local, 1) for j in range(model)}
    else:
      assert heads_held == {(0, kv_heads, 1)}


def test_bad_meshes_strategies_and_batches_are_clear_errors():
  mesh = make_mesh((4, 2))
  with pytest.raises(ValueError, match=r"strategy='heads'.*2 devices.*kv_heads=3"):
    CacheSharding(mesh, strategy="heads").init("int8", num_layers=L, batch=B, kv_heads=3,
                                               max_len=S, head_dim=H)
  with pytest.raises(ValueError, match=r"strategy='heads'.*2 devices.*kv_heads=3"):
    sharding_lib.per_device_bytes("int8", num_layers=L, batch=B, kv_heads=3, max_len=S,
                                  head_dim=H, data=4, model=2, strategy="heads")
  with pytest.raises(ValueError, match="strategy must be one of.*'columns'"):
    CacheSharding(mesh, strategy="columns")
  with pytest.raises(ValueError, match="strategy must be one of"):
    sharding_lib.resolve_strategy("seq", kv_heads=8, model=2)
  with pytest.raises(ValueError, match="strategy='sequence' .* use a paged cache"):
    CacheSharding(mesh, strategy="sequence").init("int8", num_layers=L, batch=B, kv_heads=2,
                                                  max_len=S, head_dim=H)
  with pytest.raises(ValueError, match="batch=6 must be a multiple of the data axis size 4"):
    CacheSharding(mesh).init("int8", num_layers=L, batch=6, kv_heads=8, max_len=S, head_dim=H)
  cache = kvtpu.KVCache.init("int8", num_layers=L, batch=6, kv_heads=8, max_len=S, head_dim=H)
  with pytest.raises(ValueError, match="batch=6"):
    CacheSharding(mesh).put(cache)
  other = jax.make_mesh((4, 2), ("x", "y"))
  with pytest.raises(ValueError, match=r"data_axis='data' is not an axis of the mesh.*'x', 'y'"):
    CacheSharding(other)
  with pytest.raises(ValueError, match="model_axis='model'"):
    CacheSharding(other, data_axis="x")
  with pytest.raises(ValueError, match="must differ"):
    CacheSharding(other, data_axis="x", model_axis="x")
  sh = CacheSharding(mesh)
  good = sh.init("int8", num_layers=L, batch=B, kv_heads=8, max_len=S, head_dim=H)
  x = jnp.zeros((B, 1, 8, H))
  # Shape errors name the global shapes, not a device's block.
  with pytest.raises(ValueError, match=r"k.shape=\(4, 1, 8, 32\) does not match the cache: "
                     r"expected \[B=8, T, K=8, H=32\]"):
    sh.update(good, 0, x[:4], x[:4])
  with pytest.raises(ValueError, match=r"k.shape=\(8, 1, 4, 32\) .*expected \[B=8, T, K=8"):
    sh.update(good, 0, x[:, :, :4], x[:, :, :4])
  with pytest.raises(ValueError, match=r"q.shape\[3\]=16 does not match the cache's head_dim=32"):
    sh.attend(jnp.zeros((B, 1, 8, 16)), good, 0)
  with pytest.raises(TypeError, match="q must be a .B, T, N, H. jax or numpy array, got list"):
    sh.attend(np.zeros((B, 1, 8, H)).tolist(), good, 0)
  # Counts saturate as on one device: no wrap-around, overflow flagged.
  big = sh.advance(sh.advance(good, 10), np.uint32(2**32 - 1))
  np.testing.assert_array_equal(big.lengths, [S] * B)
  assert big.overflow.all()
  with pytest.raises(IndexError, match="layer=2"):
    sh.update(good, L, x, x)
  with pytest.raises(ValueError, match="N=12 query heads must be a multiple of the cache's K=8"):
    sh.attend(jnp.zeros((B, 1, 12, H)), good, 0)
  # Static scales and clip ratios are checked as KVCache.init checks them (though the
  # sharded init builds the cache under jit, where they are traced).
  dims = dict(num_layers=L, batch=B, kv_heads=8, max_len=S, head_dim=H)
  bad = np.ones((L, 8, 1), np.float32)
  bad[1, 3, 0] = -1.0
  with pytest.raises(ValueError, match=r"k_scale must be finite and > 0.*index \(1, 3, 0\)"):
    sh.init("int8-head", k_scale=bad, v_scale=np.ones((8, 1)), **dims)
  with pytest.raises(ValueError, match=r"k_scale \(as bfloat16\)"):
    sh.init("int8-head-sbf16", k_scale=np.full((8, 1), 1e-45), v_scale=np.ones((8, 1)), **dims)
  with pytest.raises(ValueError, match=r"v_clip must be clip ratios in \(0, 1\]"):
    sh.init("int8", v_clip=np.full(8, 1.5), **dims)
  with pytest.raises(ValueError, match=r"k_scale with shape \(2, 8, 1\)"):
    sh.init("int8-head", **dims)
  # Other axis names work when named.
  named = CacheSharding(other, data_axis="y", model_axis="x")
  assert (named.data, named.model) == (2, 4)
  assert named.specs(cache).k.values == P(None, "y", "x", None, None)


@pytest.mark.parametrize("shape,fmt,kv_heads,strategy,clip", [
    ((2, 4), "int4", 8, "auto", False),
    ((4, 2), "int4-asym-g32", 3, "auto", False),  # Replicated heads.
    ((2, 4), STATIC, 8, "auto", False),
    ((2, 4), "k=int8-tensor,v=int4-asym-channel", 8, "replicate", False),
    ((4, 2), "int8", 8, "auto", True),
    ((1, 8), "bf16", 8, "heads", False),
    ((2, 4), "k=int4-asym-c16,v=int4+recent16", 8, "auto", False),
])
def test_per_device_bytes_are_what_each_device_holds(shape, fmt, kv_heads, strategy, clip, rng):
  data, model = shape
  sh = CacheSharding(make_mesh(shape), strategy=strategy)
  kw = init_kwargs(fmt, kv_heads, rng, clip)
  cache = sh.init(fmt, **kw)
  held = set()
  for i in range(data * model):
    held.add(sum(memory.array_nbytes(leaf.addressable_shards[i].data.shape, leaf.dtype)
                 for leaf in jax.tree.leaves(cache)))
  assert len(held) == 1  # Every device holds the same.
  (device_bytes,) = held
  clip_names = ("k", "v") if clip else ()
  b, k = sharding_lib.per_device_dims(batch=B, kv_heads=kv_heads, data=data, model=model,
                                      strategy=strategy)
  assert device_bytes == sh.per_device_bytes(cache)
  assert device_bytes == sh.per_device_bytes(jax.eval_shape(lambda: cache))
  assert device_bytes == sharding_lib.per_device_bytes(
      fmt, num_layers=L, batch=B, kv_heads=kv_heads, max_len=S, head_dim=H, data=data,
      model=model, strategy=strategy, clip=clip_names)
  assert device_bytes == memory.cache_bytes(fmt, num_layers=L, batch=b, kv_heads=k, max_len=S,
                                            head_dim=H, clip=clip_names)
  # Less than the whole cache wherever anything is split.
  assert device_bytes < cache.nbytes


@pytest.mark.parametrize("shape,auto,fmt,kv_heads", [
    ((2, 4), False, "int8", 8),
    pytest.param((4, 2), True, "int4-asym-g32", 3, marks=pytest.mark.slow),
])
def test_compiled_step_gathers_nothing_and_updates_in_place(shape, auto, fmt, kv_heads, rng):
  mesh = make_mesh(shape, auto)
  sh = CacheSharding(mesh)
  cache = sh.init(fmt, **init_kwargs(fmt, kv_heads, rng))
  shardings = sh.shardings(cache)
  m = "model" if sh.resolved(kv_heads) == "heads" else None
  acts = NamedSharding(mesh, P(None, "data", None, m, None))  # q, k, v and the output.
  step = jax.jit(sharded_step(sh), donate_argnums=0,
                 in_shardings=(shardings, acts, acts, acts, NamedSharding(mesh, P("data"))),
                 out_shardings=(shardings, acts))
  q, k, v = chunk(rng, 1, kv_heads)
  compiled = step.lower(cache, q, k, v, np.ones(B, np.int32)).compile()
  text = compiled.as_text()
  for op in ("all-gather", "all-to-all", "collective-permute", "reduce-scatter"):
    assert op not in text, f"{op} in the compiled step"
  # The only cross-device traffic: each layer's counters, summed as 16-bit halves.
  reduces = [line for line in text.splitlines() if "all-reduce(" in line]
  assert reduces
  for line in reduces:
    assert "u32[" in line and "f32[" not in line and "s8[" not in line, line
  # The cache leaves as it came, and every buffer of it is donated and aliased in place:
  # exactly the device's bytes (int4 packed; CPU has no tile padding).
  assert compiled.input_shardings[0][0] == shardings
  assert compiled.output_shardings[0] == shardings
  assert compiled.memory_analysis().alias_size_in_bytes == sh.per_device_bytes(cache)
  out_cache, _ = step(cache, q, k, v, np.ones(B, np.int32))
  assert cache.k.values.is_deleted()
  np.testing.assert_array_equal(out_cache.lengths, [1] * B)


def test_psum_u64_carries_across_words_and_halves(rng):
  mesh = make_mesh((2, 4))
  n = 16
  lo = np.concatenate([2**32 - rng.integers(1, 2**20, (8, n // 2)),
                       rng.integers(0, 2**32, (8, n // 2))], axis=1)
  lo[:, 0] = 2**32 - 1  # The high halves' sum passes 16 bits: 7 goes to the high word.
  lo[:, 1] = [2**32 - 1, 2**16 - 1] + [0] * 6  # Adding the halves back carries.
  lo[:, 2] = [2**31 + 2**15] * 8  # Sums to exactly 4 * 2**32 + 2**18.
  hi = rng.integers(0, 2**31 // 8, (8, n))
  words = np.stack([lo, hi], axis=-1).astype(np.uint32)  # Device i holds words[i].
  spread = jax.device_put(words, NamedSharding(mesh, P(("data", "model"))))
  summed = jax.jit(jax.shard_map(
      lambda w: psum_u64(w[0], ("data", "model")), mesh=mesh,
      in_specs=P(("data", "model")), out_specs=P()))(spread)
  summed = np.asarray(summed).astype(object)
  expect = [sum(int(words[d, i, 1]) << 32 | int(words[d, i, 0]) for d in range(8))
            for i in range(n)]
  assert [int(s[1]) << 32 | int(s[0]) for s in summed] == expect
  assert expect[0] == 8 * (2**32 - 1) + sum(int(x) << 32 for x in hi[:, 0])
  np.testing.assert_array_equal(psum_u64(jnp.asarray(words[0]), ()), words[0])


@pytest.mark.parametrize("shape", [(8, 1), (2, 4)])
def test_counters_sum_exactly_past_2_to_the_32(shape, rng):
  sh = CacheSharding(make_mesh(shape))
  kw = init_kwargs("int8-head", 8, rng)
  cache = sh.init("int8-head", **kw)
  start = np.zeros(cache.counters.shape, np.uint32)
  start[..., 0] = 2**32 - 10
  start[..., 1] = 7
  cache = sh.put(dataclasses.replace(cache, counters=jnp.asarray(start)))
  k = kv_with_outliers(rng, (B, 5, 8, H))
  valid = np.array([5, 0, 1, 2, 3, 4, 5, 5], np.int32)
  step = jax.jit(lambda c, k: sh.update(c, 1, k, k, valid_len=valid), donate_argnums=0)
  counts = step(cache, k).counts()
  base = 7 * 2**32 + 2**32 - 10
  assert counts["written"].tolist() == [base, base + int(valid.sum()) * 8 * H]
  mask = (np.arange(5)[None, :] < valid[:, None])[:, :, None, None]
  q = quant.quantize(jnp.asarray(k), kvtpu.KVFormat.parse("int8-head").k,
                     scale=jnp.asarray(kw["k_scale"][1]))
  saturated = int((np.asarray(q.saturated) & mask).sum())
  assert saturated > 10
  assert counts["k_saturated"].tolist() == [7 * 2**32 + 2**32 - 10, 8 * 2**32 - 10 + saturated]


@pytest.mark.parametrize("auto", [False, True])
def test_init_allocates_sharded_and_put_moves_a_cache(auto, rng):
  sh = CacheSharding(make_mesh((2, 4), auto))
  kw = init_kwargs(STATIC, 8, rng, clip=False)
  cache = sh.init(STATIC, **kw)
  plain = kvtpu.KVCache.init(STATIC, **kw)
  shardings = sh.shardings(plain)
  leaves, wants = flat_arrays(cache), flat_arrays(shardings)
  assert leaves.keys() == wants.keys()
  for name, leaf in leaves.items():
    assert isinstance(leaf.sharding, NamedSharding) and leaf.sharding == wants[name], name
  assert_same_cache(cache, plain)
  assert cache.k.scale.sharding.spec == P(None, "model", None)
  source = poisoned(plain, LENGTHS, rng)
  moved = sh.put(source)
  for leaf, want in zip(jax.tree.leaves(moved), jax.tree.leaves(shardings), strict=True):
    assert leaf.sharding == want
  assert_same_cache(moved, source)
