"""Unquantized sink and recent windows (`+sink<N>`, `+recent<N>`): grammar, writes,
attention (XLA reference and the Pallas kernels in interpret mode and through Mosaic),
bytes."""

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvtpu
from kvtpu import memory, qtensor, rotation
from tests.helpers import (
  assert_close,
  chunked,
  kv_with_outliers,
  np_attention,
  prefix_cases,
  slow_unless,
  write_chunks,
)
from tests.pallas_kernels.cases import INTERPRET


def test_grammar():
  fmt = kvtpu.KVFormat.parse("int4-asym-rot+sink4+recent128")
  assert (fmt.sink, fmt.recent, fmt.k.name) == (4, 128, "int4-asym-rot")
  assert fmt.name == "int4-asym-rot+sink4+recent128" and fmt.windowed
  assert kvtpu.KVFormat.parse("INT8+RECENT8+SINK2").name == "int8+sink2+recent8"
  assert kvtpu.KVFormat.from_dict(fmt.to_dict()) == fmt
  assert "sink" not in kvtpu.KVFormat.parse("int8").to_dict()
  mixed = kvtpu.KVFormat.parse("k=int4-rot,v=int8+recent16")
  assert (mixed.k.name, mixed.v.name, mixed.recent) == ("int4-rot", "int8", 16)
  for bad, match in [("int8+recent0", "unknown window 'recent0'"),
                     ("int8+window4", "unknown window 'window4'"),
                     ("int8+sink2+sink3", "window sink given twice"),
                     ("bf16+recent4", "stores K and V unquantized already"),
                     ("k=int8-head,v=int8+recent4", "K of k=int8-head,v=int8 has static scales"),
                     ("int8+sink-1", "unknown window")]:
    with pytest.raises(ValueError, match=match):
      kvtpu.KVFormat.parse(bad)
  with pytest.raises(ValueError, match="recent must be an int >= 0"):
    kvtpu.KVFormat(fmt.k, fmt.v, recent=-1)
  with pytest.raises(ValueError, match="sink must be an int >= 0"):
    kvtpu.KVFormat(fmt.k, fmt.v, sink=True)


SINK, RECENT, S = 3, 5, 16
FMT = f"int4+sink{SINK}+recent{RECENT}"
# Lengths at the window edges (0, 1, s, r - 1, r, r + 1, s + r, capacity) and between.
EDGE_LENGTHS = [0, 1, SINK, RECENT - 1, RECENT, RECENT + 1, SINK + RECENT, 11, S]


def _write(fmt, rng, steps, *, layer=1, h=16):
  return write_chunks(fmt, rng, steps, max_len=S, head_dim=h, layer=layer)


def _expected(cache, which, x, held, layer=1):
  """`[B, K, S, H]` float64 of what attention reads, built in numpy: window positions
  are the written values rounded to bf16 (in the stored coordinates), the others the
  quantized store (read without windows)."""
  spec = cache.fmt.spec(which)
  h = x.shape[-1]
  r = rotation.rotation_matrix(h) if spec.rotation else np.eye(h)
  exact = np.asarray(jnp.asarray(x.astype(np.float64) @ r, jnp.bfloat16), np.float64) @ r.T
  stored = np.asarray(cache.tensor(which).dequantize(layer), np.float64)  # Quantized only.
  out = stored.copy()
  fmt = cache.fmt
  for b, n in enumerate(held):
    for p in range(min(int(n), x.shape[1])):
      if p < fmt.sink or p >= n - fmt.recent:
        out[b, :, p] = exact[b, p]
  return out


@pytest.mark.parametrize("chunks", [pytest.param(c, marks=slow_unless(i == 0), id=str(c))
                                    for i, c in enumerate([(4, 4, 4, 4), (1,) * 16, (7, 9), (16,),
                                                           (2, 11, 3)])])
def test_windows_hold_the_sink_and_the_last_tokens_exactly(chunks, rng):
  lengths = EDGE_LENGTHS
  cache, keys, values, held, _ = _write(FMT, rng, chunked(lengths, chunks))
  assert held.tolist() == lengths
  for which, x in (("k", keys), ("v", values)):
    got = np.asarray(cache.dequantized(1, which, held=held), np.float64)
    want = _expected(cache, which, x, held)
    for b, n in enumerate(held):  # Positions that hold no token are not compared.
      np.testing.assert_allclose(got[b, :, :n], want[b, :, :n], rtol=1e-6, atol=1e-6,
                                 err_msg=f"{which}, sequence {b} of length {n}")
      # The windows really differ from the quantized store where they hold tokens.
      if 0 < n and cache.fmt.sink:
        assert not np.allclose(got[b, :, 0], np.asarray(cache.tensor(which).dequantize(1))[b, :, 0])


def test_transposed_rings_hold_the_last_tokens_exactly(rng):
  """A ring of 100 positions at head_dim 64 is stored [H, 104] (`window_transposed`) and
  holds the same tokens where the natural layout would; the sink of 3 stays [8, H]."""
  fmt, lengths = "int8+sink3+recent100", [0, 1, 3, 99, 100, 101, 104, 250, 256]
  cache, keys, values, held, _ = write_chunks(fmt, rng, chunked(lengths, (37, 100, 119)),
                                              max_len=256, head_dim=64)
  ring, sink = cache.k.window("recent"), cache.k.window("sink")
  assert ring.transposed and ring.data.shape[3:] == (64, 104) and ring.size == 100
  assert not sink.transposed and sink.data.shape[3:] == (8, 64)
  assert held.tolist() == lengths
  for which, x in (("k", keys), ("v", values)):
    got = np.asarray(cache.dequantized(1, which, held=held), np.float64)
    want = _expected(cache, which, x, held)
    for b, n in enumerate(held):
      np.testing.assert_allclose(got[b, :, :n], want[b, :, :n], rtol=1e-6, atol=1e-6,
                                 err_msg=f"{which}, sequence {b} of length {n}")


def test_a_chunk_longer_than_the_ring_keeps_its_last_tokens(rng):
  cache, keys, _, held, _ = _write("int8+recent4", rng, [(13, [13, 2])])
  ring = np.asarray(cache.k.recent[1], np.float32)  # [B, K, 4, H]
  for p in range(9, 13):  # Slot p mod 4.
    np.testing.assert_allclose(ring[0, :, p % 4], keys[0, p], rtol=2**-8)
  for p in range(2):
    np.testing.assert_allclose(ring[1, :, p], keys[1, p], rtol=2**-8)
  assert np.isnan(ring[1, :, 2:]).all()  # Poison: slots past the sequence are unwritten.


def test_writes_past_capacity_are_dropped_from_the_windows(rng):
  cache, keys, _, held, _ = _write("int8+sink2+recent3", rng, [(S, [S - 1, S])])
  cache = cache.advance(np.array([S - 1, S]))
  over = jnp.asarray(kv_with_outliers(rng, (2, 3, 2, 16)))
  cache = cache.update(1, over, over).advance(3)
  assert cache.overflow.tolist() == [True, True] and cache.lengths.tolist() == [S, S]
  got = np.asarray(cache.dequantized(1, "k"), np.float64)
  np.testing.assert_allclose(got[1, :, S - 3:], np.swapaxes(keys[1, S - 3:], 0, 1),
                             rtol=2**-8, err_msg="the ring of a full sequence was overwritten")
  np.testing.assert_allclose(got[0, :, S - 1], np.asarray(over[0, 0], np.float64), rtol=2**-8)


FORMATS = [FMT, "int4-asym-rot+recent8", "k=int8,v=int4-g8+sink2", "fp8_e4m3+sink1+recent16",
           "int4-nu-sbf16-rot+sink2+recent8"]
PREFIXES = [((0, 0), 1), ((RECENT, SINK + RECENT), 1), ((3, 9), 4), ((0, 2), 12), ((S - 1, 6), 1),
            ((RECENT - 1, RECENT + 1), 3)]


@pytest.mark.parametrize("fmt,prefix,t", prefix_cases(FORMATS, PREFIXES, stride=2))
def test_attention_reads_the_windows(fmt, prefix, t, rng):
  """XLA reference and kernel (decode for T <= 8, prefill above) vs float64 attention
  over the K/V built in numpy, on a NaN-poisoned cache."""
  steps = ([(max(prefix), prefix)] if max(prefix) else []) + [(t, [t, t])]
  cache, keys, values, held, chunk = _write(fmt, rng, steps)
  chunk = np.minimum(chunk, S - np.asarray(prefix))  # What fits.
  k_exp = _expected(cache, "k", keys, held)
  v_exp = _expected(cache, "v", values, held)
  q = rng.standard_normal((2, t, 4, 16)).astype(np.float32)
  expect = np_attention(q, k_exp, v_exp, np.asarray(held) - chunk, chunk, 16**-0.5)
  tol = dict(atol=2e-5 * max(1.0, np.abs(np.nan_to_num(v_exp)).max()), rtol=1e-3)
  for impl in ("xla", "interpret"):
    out = np.asarray(kvtpu.attend(jnp.asarray(q), cache, 1, valid_len=chunk, impl=impl,
                                  precision="highest"))
    assert np.isfinite(out).all(), f"{impl}: poisoned memory leaked into the output"
    assert_close(out, expect, **tol, name=f"{impl}[{fmt}]")


def test_kernel_takes_windows_as_arrays_and_checks_them(rng):
  from kvtpu.pallas_kernels.decode_attention import (
    Window,
    decode_attention,
    ref_decode_attention,
    window_slots,
  )

  cache, *_ = _write(FMT, rng, [(9, [9, 4])])
  q = jnp.asarray(rng.standard_normal((2, 1, 4, 16)), jnp.float32)
  k, v = cache.k, cache.v
  assert k.windows == (SINK, RECENT) and k.recent.shape[3] == window_slots(RECENT) > RECENT
  args = (k.values, v.values, jnp.asarray([8, 3]), jnp.asarray([1, 1]), 1)
  scales = dict(k_scale=k.scale, v_scale=v.scale)
  # As stored (padded slots, never read), and as plain arrays of exactly the windows.
  stored = {f"{w}_{f}": x.window(f) for w, x in (("k", k), ("v", v)) for f in ("sink", "recent")}
  plain = {n: jnp.stack([w.layer(i) for i in range(cache.num_layers)]) for n, w in stored.items()}
  carried = decode_attention(q, k, v, *args[2:], interpret=INTERPRET)
  for kw in (stored, plain):
    out = decode_attention(q, *args, **scales, **kw, interpret=INTERPRET)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(carried))
    assert_close(out, ref_decode_attention(q, *args, **scales, **kw), atol=1e-4, rtol=1e-4,
                 name="ref")
  with pytest.raises(ValueError, match="pass both k_sink and v_sink or neither"):
    decode_attention(q, *args, **scales, k_sink=k.sink)
  with pytest.raises(ValueError, match="carrying its sink window; do not also pass k_sink"):
    decode_attention(q, k, v, *args[2:], k_sink=k.sink, v_sink=v.sink)
  bad = {"k_recent": plain["k_recent"][:, :, :1], "v_recent": plain["v_recent"][:, :, :1]}
  with pytest.raises(ValueError, match=r"k_recent must be \[L=2, B=2, K=2, slots, H\] \(H=16\)"):
    decode_attention(q, *args, **scales, **{**plain, **bad})
  with pytest.raises(ValueError, match=r"k_sink must be \[L=2, B=2, K=2, slots, H\]"):  # 4-D data.
    decode_attention(q, *args, **scales, **{**stored, "k_sink": Window(k.sink[0], SINK)})
  with pytest.raises(ValueError, match=r"k_sink \(shape .*, size 3\) and v_sink \(shape .*, size 2\)"):
    decode_attention(q, *args, **scales, **{**stored, "v_sink": dataclasses.replace(stored["v_sink"], size=2)})


@pytest.mark.parametrize("fmt", ["bf16", "int4", "int4-asym-rot+recent128",
                                 "int4-asym-sbf16-rot+sink4+recent128", "k8v4+sink8+recent64",
                                 "int4-sbf16-rot+sink3+recent252"])
def test_bytes_are_the_arrays_and_effective_bits_the_closed_form(fmt):
  """Windows count their stored slots: W rounded up to a multiple of 8 (2 and 4 kept)."""
  dims = dict(num_layers=3, batch=5, kv_heads=8, max_len=1024, head_dim=128)
  cache = jax.eval_shape(lambda: kvtpu.KVCache.init(fmt, **dims))
  leaves = jax.tree.leaves(cache)
  nbytes = sum(int(np.prod(x.shape)) * (4 if x.dtype == jnp.int4 else 8 * x.dtype.itemsize)
               for x in leaves) // 8
  assert memory.cache_bytes(fmt, **dims) == nbytes
  f = kvtpu.KVFormat.parse(fmt)
  per_seq = memory.window_bytes(fmt, kv_heads=8, head_dim=128)
  slots = {3: 8, 252: 256}.get(f.sink, f.sink) + {3: 8, 252: 256}.get(f.recent, f.recent)
  assert per_seq == 2 * 8 * slots * 128 * 2  # K and V, bf16.
  bits = {"bf16": 16, "int4": 4 + 32 / 128, "int4-asym-rot+recent128": 4 + 64 / 128,
          "int4-asym-sbf16-rot+sink4+recent128": 4 + (16 + 32) / 128,  # Zero points: f32.
          "k8v4+sink8+recent64": (8 + 4) / 2 + 32 / 128,
          "int4-sbf16-rot+sink3+recent252": 4 + 16 / 128}[fmt]
  bits += slots * 16 / 8192
  assert memory.effective_bits(fmt, context=8192, kv_heads=8, head_dim=128) == pytest.approx(
      bits, rel=1e-12)
  with pytest.raises(ValueError, match="context must be a positive int"):
    memory.effective_bits(fmt, context=0, kv_heads=8, head_dim=128)


@pytest.mark.tpu_compile
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
@pytest.mark.parametrize("generation,fmt,t", [
    ("v5e", "int4-asym+sink4+recent128", 1), ("v6e", "int8+sink1+recent5", 2),
    pytest.param("v5e", "int4-asym+recent64", 256, marks=pytest.mark.slow),
    pytest.param("v6e", "int4-asym+sink4+recent128", 256, marks=pytest.mark.slow),
    # The binaries' non-uniform schemes on v6e (v5e and v5p compile the codes in
    # tests/pallas_kernels): decode of the 2-bit one, prefill of the 4-bit one.
    ("v6e", "int2-nu-sbf16-rot+sink4+recent252", 1),
    pytest.param("v6e", "int4-nu-sbf16-rot+sink4+recent252", 256, marks=pytest.mark.slow)])
def test_windowed_kernels_compile_through_mosaic(generation, fmt, t):
  from jax.experimental import topologies
  from kvtpu.pallas_kernels.decode_attention import decode_attention
  from kvtpu.pallas_kernels.prefill_attention import prefill_attention

  device = topologies.get_topology_desc(platform="tpu", topology_name=f"{generation}:1x1").devices[0]
  on_tpu = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,  # noqa: E731
                                          sharding=jax.sharding.SingleDeviceSharding(device))
  cache = jax.eval_shape(lambda: kvtpu.KVCache.init(fmt, num_layers=2, batch=4, kv_heads=2,
                                                    max_len=2048, head_dim=128))
  k, v = jax.tree.map(on_tpu, (cache.k, cache.v))
  q = on_tpu(jax.ShapeDtypeStruct((4, t, 4 if t > 8 else 16, 128), jnp.float32))
  counts = on_tpu(jax.ShapeDtypeStruct((4,), jnp.int32))
  kernel = decode_attention if t <= 8 else prefill_attention
  compiled = jax.jit(lambda q, k, v, n, c: kernel(q, k, v, n, c, 1)).lower(
      q, k, v, counts, counts).compile()  # Raises if Mosaic rejects the kernel.
  assert compiled.memory_analysis().output_size_in_bytes >= q.size * 4


@pytest.mark.parametrize("width,transposed", [(4, False), (5, False), (252, False), (5, True),
                                              (256, True)])
def test_window_write_kernel_stores_what_the_scatter_stores(width, transposed, rng):
  """The TPU path of window writes (one in-place Pallas call per layer, interpret mode
  here) against XLA's scatter, bit for bit, `[W, H]` and `[H, W]` windows: chunks that
  wrap the ring, overrun it, write nothing, and land past the sink."""
  shape = (2, 4, 2, 64, width) if transposed else (2, 4, 2, width, 64)
  store = jnp.asarray(np.where(rng.random(shape) < 0.1, np.nan, rng.standard_normal(shape)),
                      jnp.bfloat16)
  for t, lengths, valid in ((1, [0, 3, width - 1, 1000], [1, 1, 0, 1]),
                            (300, [0, 250, 2, 7], [300, 9, 1, 0])):
    where = qtensor.Placement.of(jnp.array(lengths), jnp.array(valid), t, 4096, sink=width,
                                 recent=width)
    x = jnp.asarray(kv_with_outliers(rng, (4, t, 2, 64)))
    for target in (where.sink_target, where.recent_target):
      want = qtensor.write_window(store, 1, x, target, "scatter", transposed)
      got = qtensor.write_window(store, 1, x, target, "interpret", transposed)
      np.testing.assert_array_equal(np.asarray(got).view(np.uint16),
                                    np.asarray(want).view(np.uint16))
      assert not np.array_equal(np.asarray(want).view(np.uint16), np.asarray(store).view(np.uint16))
  with pytest.raises(ValueError, match="method must be"):
    qtensor.write_window(store, 1, x, where.sink_target, "blocks")


def test_window_write_blocks_fit_their_vmem_budget():
  from kvtpu.pallas_kernels.cache_write import window_blocks, window_vmem_bytes

  # bf16 [252, 64] blocks: 256 rows x 128 lanes x 2 bytes x 3 (placed, store, output)
  # plus a [256, 1] int32 mask (256 rows of a 128-lane tile), all double-buffered.
  assert window_vmem_bytes(1, 252, 64, jnp.bfloat16) == 2 * (3 * 256 * 128 * 2 + 256 * 128 * 4)
  assert window_blocks(8, 252, 128, jnp.bfloat16) == (8, 252)  # Llama-3.1-8B: whole window.
  assert window_blocks(32, 1024, 128, jnp.bfloat16) == (4, 1024)  # MHA, long ring: by heads.
  # One head's whole window does not fit: whole tiles of slots dividing W, or no block.
  assert window_blocks(3, 8192, 256, jnp.float32) == (1, 1024)
  assert window_blocks(3, 320, 64, jnp.float32, budget=1_000_000) == (1, 160)
  assert window_blocks(3, 252, 64, jnp.float32, budget=1_000_000) is None  # 252 = 4 x 63.
  for args in ((32, 1024, 128, jnp.bfloat16), (3, 8192, 256, jnp.float32),
               (1, 6000, 256, jnp.bfloat16)):
    heads, slots = window_blocks(*args)
    assert window_vmem_bytes(heads, slots, args[2], args[3]) <= 8 * 2**20
    assert args[0] % heads == 0 and args[1] % slots == 0 and (slots == args[1] or slots % 16 == 0)


@pytest.mark.parametrize("budget", [3_000_000, 1_000_000])  # 2 heads of 4; 160 slots of 320.
def test_window_write_in_blocks_of_heads_and_slots(budget, rng):
  from kvtpu.pallas_kernels.cache_write import window_blocks, window_write

  shape = (2, 3, 4, 320, 64)
  store = jnp.asarray(np.where(rng.random(shape) < 0.1, np.nan, rng.standard_normal(shape)),
                      jnp.float32)
  placed = jnp.asarray(kv_with_outliers(rng, shape[1:]), jnp.float32)
  keep = jnp.asarray(rng.random((3, 320, 1)) < 0.3, jnp.int32)
  assert window_blocks(4, 320, 64, jnp.float32, budget) == ((2, 320) if budget > 2_000_000
                                                            else (1, 160))
  got = window_write(store, placed, keep, 1, interpret=INTERPRET, budget=budget)
  want = np.asarray(store).copy()
  want[1] = np.where(np.asarray(keep)[:, None] > 0, np.asarray(placed), want[1])
  np.testing.assert_array_equal(np.asarray(got).view(np.uint32), want.view(np.uint32))
  with pytest.raises(ValueError, match="W=320 slots of head_dim=64 .* has no block within"):
    window_write(store, placed, keep, 1, interpret=INTERPRET, budget=30_000)


@pytest.mark.tpu_compile
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_window_storage_is_the_layout_xla_keeps_on_tpu():
  """`window_slots` / `window_transposed` against libtpu's own choice: the stored window
  arrays enter a TPU program in row-major layout (what the kernels read), for widths
  and head dims on both sides of the rule. Fails when a libtpu changes its layouts."""
  import re

  from jax.experimental import topologies

  device = topologies.get_topology_desc(platform="tpu", topology_name="v5e:1x1").devices[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  for width, head_dim in [(1, 64), (3, 128), (4, 64), (12, 128), (36, 64), (64, 64), (100, 64),
                          (252, 64), (252, 128), (124, 96), (1000, 80), (252, 256)]:
    spec = kvtpu.KVFormat.parse("int8").k
    t = qtensor.QuantizedKV.layout(spec, num_layers=2, batch=4, kv_heads=2, max_len=256,
                                   head_dim=head_dim, recent=width)
    x = jax.ShapeDtypeStruct(t.recent.shape, t.recent.dtype, sharding=sharding)
    text = jax.jit(lambda a: a * 2, donate_argnums=0).lower(x).compile().as_text()
    line = next(ln for ln in text.splitlines() if "parameter(0)" in ln and "ENTRY" not in ln)
    layout = re.search(r"\]\{([\d,]+)", line).group(1)
    assert layout == "4,3,2,1,0", (width, head_dim, t.recent.shape, line[:120])


@pytest.mark.tpu_compile
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
@pytest.mark.parametrize("head_dim", [64, pytest.param(128, marks=pytest.mark.slow)])
def test_window_writes_compile_in_place_for_tpu(head_dim):
  # XLA's TPU scatter copied whole window arrays around every layer's write: 236 MB of
  # temporaries for this step's 50 MB of windows (185 MB at head_dim 128); the window
  # kernel writes them in place. Rings of 252 slots stored [252, H] then still cost
  # 38 MB at either head_dim: XLA keeps such arrays in layouts of its own (positions
  # minor at H = 64, the batch folded into tiles at 128) and copies them for the
  # kernels. Stored in 256 slots, [H, 256] at H = 64, they need no copy.
  from jax.experimental import topologies
  from kvtpu.pallas_kernels.decode_attention import window_slots

  device = topologies.get_topology_desc(platform="tpu", topology_name="v5e:1x1").devices[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  on_tpu = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)  # noqa: E731
  dims = dict(num_layers=4, batch=64, kv_heads=3, max_len=2048, head_dim=head_dim)
  fmt = "int4-sbf16-rot+sink4+recent252"
  cache = jax.eval_shape(lambda: kvtpu.KVCache.init(fmt, **dims))
  ring = cache.k.window("recent")
  assert ring.slots == window_slots(252) == 256 and ring.transposed == (head_dim == 64)

  def step(cache, q, k, v):
    for layer in range(cache.num_layers):
      cache = cache.update(layer, k, v)
      q = kvtpu.attend(q, cache, layer, impl="pallas")
    return cache.advance(1), q

  kv = jax.ShapeDtypeStruct((64, 1, 3, head_dim), jnp.bfloat16)
  args = jax.tree.map(on_tpu, (cache, jax.ShapeDtypeStruct((64, 1, 9, head_dim), jnp.bfloat16),
                               kv, kv))
  compiled = jax.jit(step, donate_argnums=0).lower(*args).compile()
  stats = compiled.memory_analysis()
  nbytes = memory.cache_bytes(fmt, **dims)
  windows = sum(w.size * 2 for x in (cache.k, cache.v) for w in (x.sink, x.recent))
  assert stats.alias_size_in_bytes >= nbytes
  assert stats.temp_size_in_bytes < windows / 20, (stats.temp_size_in_bytes, windows)
  # Copies in VMEM are not temporaries: the windows reach the kernels as they are stored.
  copied = [line for line in compiled.as_text().splitlines()
            if " copy(" in line and "cache.k.recent" in line]
  assert not copied, copied[:2]
