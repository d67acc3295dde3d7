"""Values stored positions-minor (`[.., H, S]`) where head_dim fills half the lanes.

The transposed layout must be the natural one's exact twin: the same stored bits (read
back through `relayout`), the same dequantized tensor, counters and lengths after the
same writes on NaN-poisoned memory, and the same attention from the kernels (interpret
mode) and the XLA reference, for contiguous and paged caches. What it buys on TPU (no
relayout copy of the cache around the kernels) is checked by compiling a step ahead of
time in `test_tpu_compile.py`.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from kvtpu.pallas_kernels import decode_attention as da
from kvtpu.pallas_kernels.decode_attention.reference import (
  ref_decode_attention,
  unpack_transposed,
)
from kvtpu.pallas_kernels.prefill_attention import prefill_attention

import kvtpu
from kvtpu import benchmark, qtensor
from tests.helpers import assert_close, bits, flat_arrays, kv_with_outliers, poison, slow_unless

H = 64


@pytest.mark.parametrize("fmt,head_dim,slab,expected", [
    ("int8", 64, 128, True), ("int8", 64, 2048, True), ("bf16", 32, 256, True),
    ("int8", 128, 2048, False), ("int8", 256, 2048, False),
    ("int8", 64, 64, False), ("int8", 64, 200, False),  # Fewer than whole 128-lane tiles.
    ("int4-c16", 64, 2048, False),  # Per-channel scales over token groups follow [S, H].
])
def test_layout_rule(fmt, head_dim, slab, expected):
  spec = kvtpu.KVFormat.parse(fmt + ("+recent16" if "-c" in fmt else "")).k
  assert qtensor.lanes_transposed(spec, head_dim, slab) is expected
  t = qtensor.QuantizedKV.layout(spec, num_layers=2, batch=3, kv_heads=2, max_len=slab,
                                 head_dim=head_dim, recent=16 if "-c" in fmt else 0)
  assert t.transposed is expected
  assert t.shape == (2, 3, 2, slab, head_dim)  # Logical, whatever the storage order.
  assert t.values.shape == ((2, 3, 2, head_dim, slab) if expected else (2, 3, 2, slab, head_dim))


def _natural(cache):
  return dataclasses.replace(cache, k=cache.k.relayout(False), v=cache.v.relayout(False))


def _run(cache, rng, steps, write_method=None):
  """The chunks `steps` ((T, valid [B]) each) of K/V with outliers into layer 1, advanced."""
  for t, valid in steps:
    k, v = (jnp.asarray(kv_with_outliers(rng, (cache.batch, t, cache.kv_heads, cache.head_dim)))
            for _ in range(2))
    cache = cache.update(1, k, v, valid_len=jnp.asarray(valid)).advance(jnp.asarray(valid))
  return cache


FORMATS = ["int8", "int4-asym-g16", "bf16", "fp8_e4m3", "k8v4",
           "int4-sbf16-rot+sink4+recent252", "int2-nu-sbf16-rot+sink4+recent252",
           "int2-asym"]
FAST = ("int8", "int4-sbf16-rot+sink4+recent252")


@pytest.mark.parametrize("fmt,paged", [
    pytest.param(f, i % 2 == 0, marks=slow_unless(f in FAST)) for i, f in enumerate(FORMATS)])
def test_transposed_cache_is_the_natural_ones_twin(fmt, paged):
  """Same writes (edge lengths: 0, 1, block - 1, block, block + 1, capacity) into a
  transposed cache and its natural twin: the same bits, reads and attention."""
  b, s, k, n = 4, 512, 2, 4
  kw = dict(page_len=256, num_pages=2 * b + 1) if paged else {}
  cache = poison(kvtpu.KVCache.init(fmt, num_layers=2, batch=b, kv_heads=k, max_len=s,
                                    head_dim=H, **kw))
  if paged:  # Sequences' pages interleaved in the pool, page 0 the null page.
    cache = cache.with_page_table(jnp.array([[1, 5], [2, 6], [3, 7], [4, 8]]))
  assert cache.k.transposed and cache.v.transposed
  twin = _natural(cache)
  # Chunks of one width (one compiled write per cache), ragged by their counts.
  steps = [(511, [127, 0, 128, 129]), (511, [1, 1, 0, 1]), (511, [0, 511, 300, 282])]
  got, want = (_run(c, np.random.default_rng(7), steps) for c in (cache, twin))
  assert got.k.transposed and not want.k.transposed
  for name, leaf in flat_arrays(_natural(got)).items():
    np.testing.assert_array_equal(bits(leaf), bits(flat_arrays(want)[name]), err_msg=name)
  np.testing.assert_array_equal(np.asarray(got.lengths), [128, 512, 428, 412])
  held = got.lengths
  for which in ("k", "v"):
    np.testing.assert_array_equal(bits(got.dequantized(1, which, held=held)),
                                  bits(want.dequantized(1, which, held=held)))
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.standard_normal((b, 2, n, H)), jnp.float32)
  new = jnp.asarray(kv_with_outliers(rng, (b, 2, k, H)))  # The chunk the queries belong to.
  got, want = (c.update(1, new, new * 0.5) for c in (got, want))
  out = kvtpu.attend(q, got, 1, impl="xla")
  assert np.isfinite(np.asarray(out)).all()
  # Equal inputs; XLA may fuse the transposed read into its matmuls in another order, and
  # logits over keys with outliers reach ~100 (f32 order effects of ~1e-4 in the output).
  scale = float(np.max(np.abs(np.asarray(out))))
  assert_close(out, kvtpu.attend(q, want, 1, impl="xla"), atol=1e-4 * scale, rtol=1e-4,
               name=f"{fmt} attention")


# Every format paged at T = 1; decode at T = 8 and prefill contiguous for three; head
# dims other than 64 that are not multiples of 128 (odd tiles of H rows) for two.
KERNEL_CASES = ([(f, 1, True, H) for f in FORMATS]
                + [(FORMATS[0], 20, False, H), (FORMATS[1], 8, False, H), (FORMATS[5], 20, False, H)]
                + [("int8", 8, False, 80), ("int2-asym", 1, True, 96)]
                # Keys per channel over token groups stay [S, H]; values transposed.
                + [("k=int4-c16,v=int4+recent16", 20, False, H)])


@pytest.mark.parametrize("fmt,t,paged,head_dim", [
    pytest.param(*c, marks=slow_unless(c in (KERNEL_CASES[0], KERNEL_CASES[-4])))
    for c in KERNEL_CASES])
def test_kernels_read_transposed_values_as_natural(fmt, t, paged, head_dim):
  """Decode (T <= 8) and prefill kernels in interpret mode: the transposed operands give
  the natural ones' outputs, bit for bit at H = 64 (the natural int2 at H = 64 against the
  reference only: the kernels refuse it), and agree with the float64-checked reference
  (f32 matmuls: `precision="highest"`)."""
  b, s, k, n = 3, 512, 2, 4
  kw = dict(page_len=256, num_pages=2 * b + 1) if paged else {}
  cache = poison(kvtpu.KVCache.init(fmt, num_layers=2, batch=b, kv_heads=k, max_len=s,
                                    head_dim=head_dim, **kw))
  assert cache.v.transposed and cache.k.transposed == (cache.fmt.k.token_group is None)
  if paged:
    cache = cache.with_page_table(jnp.array([[6, 1], [2, 4], [3, 5]]))
  lengths = np.array([300, 0, 512 - t])
  cache = _run(cache, np.random.default_rng(3), [(512, lengths)])
  chunk = jnp.array([t, 0, t])
  before = cache.lengths - chunk
  q = jnp.asarray(np.random.default_rng(4).standard_normal((b, t, n, head_dim)), jnp.float32)
  kernel = da.decode_attention if t <= da.MAX_DECODE_T else prefill_attention
  call = dict(page_table=cache.page_table, interpret=pltpu.InterpretParams(), precision="highest")
  got = kernel(q, cache.k.kernel_operand, cache.v.kernel_operand, before, chunk, 1, **call)
  ref = ref_decode_attention(q, cache.k.kernel_operand, cache.v.kernel_operand, before, chunk, 1,
                             page_table=cache.page_table, max_t=None)
  twin = _natural(cache)
  ref_twin = ref_decode_attention(q, twin.k.kernel_operand, twin.v.kernel_operand, before, chunk,
                                  1, page_table=cache.page_table, max_t=None)
  np.testing.assert_array_equal(np.asarray(ref), np.asarray(ref_twin))
  scale = float(np.nanmax(np.abs(np.asarray(ref))))
  assert_close(got, ref, atol=1e-5 * scale, rtol=1e-4, name=f"{fmt} transposed vs reference")
  assert np.all(np.asarray(got)[1] == 0)  # The sequence with no chunk: padding rows.
  if "int2" not in fmt:
    want = kernel(q, twin.k.kernel_operand, twin.v.kernel_operand, before, chunk, 1, **call)
    if head_dim == H:
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    else:  # CPU's f32 dots sum H = 80 in another order for [H, S] than for [S, H] blocks.
      assert_close(got, want, atol=1e-5 * scale, rtol=1e-4, name=f"{fmt} transposed vs natural")


@pytest.mark.parametrize("fmt", ["int8", "int4", "int2"])
def test_transposed_writes_match_the_scatter(fmt):
  """The Pallas write kernel (interpret) puts a chunk into positions-minor values exactly
  where XLA's scatter does, paged and contiguous; int4 and int2 chunks arrive as int8."""
  rng = np.random.default_rng(5)
  for kw in ({}, dict(page_len=128, num_pages=9)):
    cache = poison(kvtpu.KVCache.init(fmt, num_layers=2, batch=4, kv_heads=2, max_len=512,
                                      head_dim=H, **kw))
    if kw:
      cache = cache.with_page_table(jnp.array([[1, 5, 0, 0], [2, 6, 0, 0], [3, 7, 0, 0],
                                               [4, 8, 0, 0]]))
    cache = dataclasses.replace(cache, lengths=jnp.array([0, 127, 128, 250]))
    spec = cache.fmt.k
    x = jnp.asarray(rng.integers(int(spec.qmin), int(spec.qmax) + 1, (4, 6, 2, H)), jnp.int8)
    if fmt == "int4":
      x = x.astype(jnp.int4)  # Stores of int2 take int8 codes (`quant.quantize`'s q_dtype).
    where = qtensor.Placement.of(cache.lengths, jnp.array([6, 1, 6, 0]), 6, cache.max_len)
    out = {m: qtensor.write_rows(cache.k.values, 1, x, where, 4, m, cache.page_table)
           for m in ("scatter", "interpret")}
    np.testing.assert_array_equal(bits(out["interpret"]), bits(out["scatter"]))
    assert not np.array_equal(bits(out["scatter"]), bits(cache.k.values))


def test_transposed_operands_errors():
  cache = kvtpu.KVCache.init("int8", num_layers=1, batch=1, kv_heads=1, max_len=256, head_dim=H)
  q = jnp.zeros((1, 1, 1, H))
  one = jnp.ones(1, jnp.int32)
  with pytest.raises(ValueError, match="do not also pass k_transposed"):
    unpack_transposed(cache.k, cache.v, k_transposed=True)
  with pytest.raises(ValueError, match="k_transposed must be a bool"):
    unpack_transposed(cache.k.values, cache.v.values, k_transposed=1)
  k, v = cache.k.values, cache.v.values  # Raw [1, 1, 1, H, S] arrays.
  with pytest.raises(ValueError, match=r"v is stored transposed \(v_transposed=True\) and must"):
    da.decode_attention(q, k, v[0], one, one, 0, k_scale=cache.k.scale, v_scale=cache.v.scale,
                        k_transposed=True, v_transposed=True, interpret=pltpu.InterpretParams())
  with pytest.raises(ValueError, match="block_s=64 must be a multiple of 128"):
    da.decode_attention(q, k, v, one, one, 0, k_scale=cache.k.scale, v_scale=cache.v.scale,
                        k_transposed=True, v_transposed=True,
                        block_sizes=da.BlockSizes(64), interpret=pltpu.InterpretParams())
  # Unmarked transposed arrays are [L, B, K, S=64, H=256]: the query's H does not match.
  with pytest.raises(ValueError, match="does not match the cache"):
    da.decode_attention(q, k, v, one, one, 0, interpret=pltpu.InterpretParams())
  grouped = jnp.zeros((1, 1, 1, 256 // 16, H), jnp.float32)
  with pytest.raises(ValueError, match="k_transposed must be False"):
    da.decode_attention(q, k, v, one, one, 0, k_scale=grouped, k_token_group=16,
                        v_scale=cache.v.scale, k_transposed=True, v_transposed=True,
                        interpret=pltpu.InterpretParams())


def test_relayout_checks_its_argument():
  spec = kvtpu.KVFormat.parse("int4-c16+recent16").k
  grouped = qtensor.QuantizedKV.layout(spec, num_layers=1, batch=1, kv_heads=1, max_len=256,
                                       head_dim=H, recent=16)
  with pytest.raises(ValueError, match="transposed=True: int4-c16 keeps per-channel scales"):
    grouped.relayout(True)
  assert grouped.relayout(False) is grouped
  cache = kvtpu.KVCache.init("int8", num_layers=1, batch=1, kv_heads=1, max_len=256, head_dim=H)
  with pytest.raises(ValueError, match="transposed must be a bool, got 0"):
    cache.k.relayout(0)


@pytest.mark.parametrize("page_len", [None, 128])
def test_benchmark_caches_at_head_dim_64(page_len):
  """The benchmark's random caches draw their values in the stored (transposed) order and
  the attention over them runs: a cache of logical [.., S, 64]."""
  cache = benchmark.random_cache("int8", batch=2, kv_heads=2, max_len=256, head_dim=H,
                                       lengths=[200, 3], page_len=page_len)
  assert cache.k.transposed and cache.head_dim == H and cache.max_len == 256
  assert cache.k.values.shape[-2:] == (H, page_len or 256)
  assert cache.v.scale.shape == cache.k.scale.shape
  held = np.asarray(cache.k.values, np.int32)
  assert held.min() < -100 and held.max() > 100  # Drawn over the whole int8 range.
  out = kvtpu.attend(jnp.ones((2, 1, 4, H), jnp.float32), cache, 0, impl="xla")
  assert out.shape == (2, 1, 4, H) and np.isfinite(np.asarray(out)).all()
