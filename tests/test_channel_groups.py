"""Per-channel scales over groups of positions (`c<N>`, KIVI's keys): grammar, the
quantization math against float64, group writes under every chunking (open groups
held in the ring, groups filling mid-chunk, ragged batches, capacity), attention over
NaN-poisoned caches against float64, bytes."""

import importlib.util

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from kvtpu.pallas_kernels.decode_attention import (
  BlockSizes,
  decode_attention,
  ref_decode_attention,
)
from kvtpu.pallas_kernels.prefill_attention import PrefillBlockSizes, prefill_attention

import kvtpu
from kvtpu import memory, quant, rotation
from kvtpu.formats import Granularity, QuantSpec
from tests.helpers import (
  assert_close,
  chunked,
  kv_with_outliers,
  np_attention,
  poison,
  prefix_cases,
  slow_unless,
  write_chunks,
)
from tests.pallas_kernels.cases import INTERPRET, compile_with_default_blocks

N, S = 32, 128  # Positions per group; cache capacity (four groups; int2 needs S % 128 == 0).
H = 128  # The kernels read int2 at head_dim a multiple of 128.
# Lengths at the group edges: 0, 1, N - 1, N, N + 1, 2N + 1, capacity - 1, capacity.
EDGE_LENGTHS = [0, 1, N - 1, N, N + 1, 2 * N + 1, S - 1, S]
STEP_EPS = 2.0**-10


def test_grammar_and_refusals():
  spec = QuantSpec.parse("int2-asym-c128-sbf16-rot")
  assert (spec.granularity, spec.group_size, spec.token_group) == (
      Granularity.CHANNEL_GROUP, 128, 128)
  assert spec.dynamic and not spec.per_token and not spec.clippable and not spec.calibrated
  assert spec.name == "int2-asym-c128-sbf16-rot"
  assert QuantSpec.from_dict(spec.to_dict()) == spec
  assert "per channel over 128 positions" in spec.description
  assert QuantSpec.parse("int4-g32").token_group is None
  fmt = kvtpu.KVFormat.parse("k=int2-asym-c64,v=int2-nu-rot+sink4+recent64")
  assert fmt.name == "k=int2-asym-c64,v=int2-nu-rot+sink4+recent64"
  assert kvtpu.KVFormat.from_dict(fmt.to_dict()) == fmt
  for bad, match in [("int4-c0+recent8", "unknown option 'c0'"),
                     ("int4-c8-g4+recent8", "conflicts with an earlier option"),
                     ("int4-c8-channel+recent8", "conflicts with an earlier option"),
                     ("int2-nu-c8-rot+recent8", "nu.*needs per-token scales"),
                     ("bf16-c8", "takes no scale options"),
                     ("k=int4-c8,v=int4", r"needs \+recent<N> with N >= 8, got recent=0"),
                     ("int4-c16+recent15", r"N >= 16, got recent=15")]:
    with pytest.raises(ValueError, match=match):
      kvtpu.KVFormat.parse(bad)
  with pytest.raises(ValueError, match="max_len must be a multiple of 8"):
    kvtpu.KVCache.init("int4-c8+recent8", num_layers=1, batch=1, kv_heads=1, max_len=12,
                       head_dim=16)
  with pytest.raises(ValueError, match="clip ratios are for range-scaled dynamic"):
    kvtpu.KVCache.init("int4-c8+recent8", num_layers=1, batch=1, kv_heads=1, max_len=16,
                       head_dim=16, k_clip=np.ones(1))
  with pytest.raises(ValueError, match=r"needs recent >= 8, got recent=0"):
    kvtpu.qtensor.QuantizedKV.init(QuantSpec.parse("int4-c8"), num_layers=1, batch=1,
                                   kv_heads=1, max_len=16, head_dim=16)


def _np_group_reference(x: np.ndarray, spec: QuantSpec):
  """float64 per-channel quantization of `x: [..., N, H]` over axis -2: the exact step
  (scale before rounding into the scale dtype) and the rounding error bound source."""
  x = x.astype(np.float64)
  if spec.symmetric:
    return np.abs(x).max(axis=-2, keepdims=True) / spec.qmax
  return (x.max(axis=-2, keepdims=True) - x.min(axis=-2, keepdims=True)) / (spec.qmax - spec.qmin)


@pytest.mark.parametrize("name", ["int4-c32", "int4-asym-c32", "int2-asym-c32", "int8-c32-sbf16",
                                  "int2-c32", "fp8_e4m3-c32"])
def test_quantize_per_channel_over_positions_against_float64(name, rng):
  spec = QuantSpec.parse(name)
  x = kv_with_outliers(rng, (3, 2, N, 16))  # [..., N positions, H]
  x[0, 0, :, 5] = 0.0  # An all-zero channel of a group: the smallest normal scale.
  x[1, 1, 3, 2] = np.nan  # Non-finite values are stored as 0 and flagged.
  r = quant.quantize(jnp.asarray(x), spec)
  assert r.scale.shape == (3, 2, 1, 16) and r.scale.dtype == spec.scale_jnp_dtype
  assert np.asarray(r.nonfinite).sum() == 1 and not np.asarray(r.saturated).any()
  clean = np.where(np.isfinite(x), x, 0.0)
  exact = _np_group_reference(clean, spec)
  scale = np.asarray(r.scale, np.float64)
  assert (scale >= np.maximum(exact, float(jnp.finfo(spec.scale_jnp_dtype).tiny))).all()
  ulp = 2.0**-22 if spec.scale_dtype == "float32" else 2.0**-7
  assert (scale <= np.maximum(exact * (1 + ulp), float(jnp.finfo(spec.scale_jnp_dtype).tiny))).all()
  deq = np.asarray(quant.dequantize(r.q, spec, r.scale, r.zero), np.float64)
  if spec.dtype.is_int:
    bound = np.broadcast_to(scale / 2 * (1 + STEP_EPS), x.shape)
  else:  # e4m3: 3 mantissa bits, relative half-ulp, and half the subnormal step.
    bound = (2.0**-4 * np.abs(clean) + 2.0**-10 * scale) * (1 + 2.0**-16)
  bad = np.abs(deq - clean) > bound
  assert not bad.any(), f"{int(bad.sum())} values beyond half a step, first {np.argwhere(bad)[0]}"
  fq = quant.fake_quantize(jnp.asarray(x), spec)
  np.testing.assert_array_equal(np.asarray(fq), deq.astype(np.float32))
  with pytest.raises(ValueError, match=r"x must be \[\.\.\., 32, H\]"):
    quant.quantize(jnp.asarray(x[..., :4, :]), spec)
  with pytest.raises(ValueError, match="clip is for per-token scales"):
    quant.quantize(jnp.asarray(x), spec, clip=0.5)


def _write(fmt, rng, steps):
  cache, keys, values, held, _ = write_chunks(fmt, rng, steps, max_len=S, head_dim=H)
  return cache, keys, values, held


def _stored(cache, which, layer=1) -> np.ndarray:
  """`[B, K, S, H]` float64 read straight off the arrays, independently of
  `QuantizedKV.dequantize`: `(q - zero[p // N]) * scale[p // N]` per channel, or the
  codebook level for a `nu` spec; per-token specs through the windows test's route."""
  t = cache.tensor(which)
  spec = t.spec
  q = np.asarray(t.values[layer].astype(jnp.float32), np.float64)
  if spec.token_group is None:
    return np.asarray(t.dequantize_stored(layer), np.float64)
  n = spec.token_group
  scale = np.repeat(np.asarray(t.scale[layer].astype(jnp.float32), np.float64), n, axis=2)
  zero = 0.0 if t.zero is None else np.repeat(np.asarray(t.zero[layer], np.float64), n, axis=2)
  return (q - zero) * scale


def _exact(x: np.ndarray, spec: QuantSpec) -> np.ndarray:
  """`[B, S, K, H]` -> `[B, K, S, H]` float64 in the stored coordinates, rounded to bf16
  as the windows hold it (rotated in float32 as the cache does, so that the bf16
  rounding matches bit for bit; `tests/test_rotation.py` checks the rotation)."""
  y = np.where(np.isfinite(x), x, 0.0).astype(np.float32)
  if spec.rotation:
    y = np.asarray(rotation.rotate(jnp.asarray(y), jnp.float32))
  return np.swapaxes(np.asarray(y.astype(ml_dtypes.bfloat16), np.float64), 1, 2)


FORMATS = ["k=int4-asym-c32,v=int8+recent32", "k=int2-c32-sbf16-rot,v=int4+sink2+recent40",
           "int4-asym-c32+recent32", "k=int2-asym-c32,v=int2-nu-rot+sink3+recent33"]
CHUNKINGS = [(N, N, N, N), (N - 1, N + 1, 3, S - 2 * N - 3), (S,), (2 * N + 1, 5, 2 * N, 30),
             (1,) * S]


@pytest.mark.parametrize("fmt,chunks", [
    pytest.param(f, c, id=f"{f}-{c if len(c) < 8 else f'{c[0]}x{len(c)}'}",
                 marks=slow_unless((i + j) % 4 == 0))
    for i, f in enumerate(FORMATS) for j, c in enumerate(CHUNKINGS) if (i + j) % 2 == 0])
def test_groups_quantize_when_they_fill_whatever_the_chunking(fmt, chunks, rng):
  """Every filled group holds the per-channel quantization of its positions' bf16 copies
  (within half a step of them, scale at the group's range), bit for bit the same under
  every chunking and ragged batch; open groups are read from the ring, exactly."""
  lengths = EDGE_LENGTHS
  cache, keys, values, held = _write(fmt, rng, chunked(lengths, chunks))
  assert held.tolist() == lengths
  for which, x in (("k", keys), ("v", values)):
    spec = cache.fmt.spec(which)
    if spec.token_group is None:
      continue
    t = cache.tensor(which)
    exact = _exact(x, spec)  # [B, K, S, H]
    got = _stored(cache, which)
    for b, length in enumerate(lengths):
      filled = length // N * N
      if filled:
        groups = exact[b, :, :filled].reshape(2, -1, N, H)
        step = _np_group_reference(groups, spec)  # [K, G, 1, H]
        scale = np.asarray(t.scale[1, b, :, :filled // N].astype(jnp.float32), np.float64)
        assert (scale[:, :, None] >= step).all() and (scale[:, :, None] <= step * (1 + 2**-7) + 1e-30).all()
        err = np.abs(got[b, :, :filled] - exact[b, :, :filled]).reshape(2, -1, N, H)
        assert (err <= scale[:, :, None] / 2 * (1 + STEP_EPS)).all(), f"{which} seq {b}"
      read = np.asarray(cache.dequantized(1, which, held=held), np.float64)
      r = rotation.rotation_matrix(H) if spec.rotation else np.eye(H)
      if length > filled:  # The open group: the ring's bf16 copies.
        # Exact up to the float32 rotation back to the model's coordinates and ours.
        np.testing.assert_allclose(read[b, :, filled:length] @ r, exact[b, :, filled:length],
                                   rtol=1e-6, atol=1e-5 * np.abs(exact[b, :, filled:length]).max())
  # Bit for bit what one chunk of the same tokens stores.
  one = kvtpu.KVCache.init(fmt, num_layers=2, batch=len(lengths), kv_heads=2, max_len=S,
                           head_dim=H)
  k0, v0 = (np.where(np.isfinite(a), a, 0.0) for a in (keys, values))
  one = one.update(1, jnp.asarray(k0), jnp.asarray(v0), valid_len=np.asarray(lengths))
  for which in ("k", "v"):
    t, o = cache.tensor(which), one.tensor(which)
    if t.spec.token_group is None:
      continue
    for b, length in enumerate(lengths):
      g = length // N
      np.testing.assert_array_equal(np.asarray(t.scale[1, b, :, :g]), np.asarray(o.scale[1, b, :, :g]))
      np.testing.assert_array_equal(np.asarray(t.values[1, b, :, :g * N].astype(jnp.int8)),
                                    np.asarray(o.values[1, b, :, :g * N].astype(jnp.int8)))


def _expected(cache, which, x, held) -> np.ndarray:
  """`[B, K, S, H]` float64 in the model's coordinates of what attention reads: sink and
  ring positions from the bf16 copies, the others off the quantized arrays."""
  spec, fmt = cache.fmt.spec(which), cache.fmt
  r = rotation.rotation_matrix(H) if spec.rotation else np.eye(H)
  out = _stored(cache, which)
  exact = _exact(x, spec)
  for b, n in enumerate(held):
    for p in range(int(n)):
      if p < fmt.sink or p >= n - fmt.recent:
        out[b, :, p] = exact[b, :, p]
  return out @ r.T


PREFIXES = [((0, 0), 1), ((N - 1, N), 1), ((N, 2 * N + 1), 3), ((0, 5), 2 * N + 3),
            ((S - 1, S - 2), 1), ((N + 1, 3 * N - 1), 12)]


@pytest.mark.parametrize("fmt,prefix,t", prefix_cases(FORMATS, PREFIXES, stride=2))
def test_attention_over_groups_against_float64(fmt, prefix, t, rng):
  """XLA reference and kernels (decode for T <= 8, prefill above) over a NaN-poisoned
  cache vs float64 attention over K/V built off the arrays (groups that fill mid-chunk
  included)."""
  steps = ([(max(prefix), prefix)] if max(prefix) else []) + [(t, [t, t])]
  cache, keys, values, held = _write(fmt, rng, steps)
  chunk = np.minimum(t, S - np.asarray(prefix))
  q = rng.standard_normal((2, t, 4, H)).astype(np.float32)
  k_exp, v_exp = _expected(cache, "k", keys, held), _expected(cache, "v", values, held)
  expect = np_attention(q, k_exp, v_exp, np.asarray(held) - chunk, chunk, H**-0.5)
  for impl in ("xla", "interpret"):  # The reference, and the kernels at their default blocks.
    out = np.asarray(kvtpu.attend(jnp.asarray(q), cache, 1, valid_len=chunk, impl=impl,
                                  precision="highest"))
    assert np.isfinite(out).all(), f"{impl}: poisoned memory leaked into the output"
    assert_close(out, expect, atol=2e-5 * max(1.0, np.abs(np.nan_to_num(v_exp)).max()),
                 rtol=1e-3, name=f"{impl}[{fmt}]")


@pytest.mark.parametrize("fmt", ["k=int2-asym-c128,v=int2-nu-sbf16-rot+sink4+recent252",
                                 "k=int4-c64-sbf16,v=int4+recent64", "int8-asym-c256+recent256"])
def test_bytes_are_the_arrays_and_effective_bits_the_closed_form(fmt):
  dims = dict(num_layers=3, batch=5, kv_heads=8, max_len=1024, head_dim=128)
  cache = jax.eval_shape(lambda: kvtpu.KVCache.init(fmt, **dims))
  nbytes = sum(int(np.prod(x.shape)) * memory.dtype_bits(x.dtype) for x in jax.tree.leaves(cache))
  assert memory.cache_bytes(fmt, **dims) == nbytes // 8
  f = kvtpu.KVFormat.parse(fmt)

  def bits(spec):  # Per stored value: the value, its scale and zero point shared by N positions.
    if spec.token_group is None:
      return spec.dtype.bits + (16 if spec.scale_dtype == "bfloat16" else 32) / 128
    per_channel = (16 if spec.scale_dtype == "bfloat16" else 32) + (0 if spec.symmetric else 32)
    return spec.dtype.bits + per_channel / spec.token_group

  # Windows hold their stored slots: 252 positions in 256 (`window_slots`).
  slots = f.sink + {252: 256}.get(f.recent, f.recent)
  expected = (bits(f.k) + bits(f.v)) / 2 + slots * 16 / 8192
  assert memory.effective_bits(fmt, context=8192, kv_heads=8, head_dim=128) == pytest.approx(
      expected, rel=1e-12)
  assert memory.bytes_per_token(fmt, kv_heads=8, head_dim=128) == pytest.approx(
      8 * 128 * (bits(f.k) + bits(f.v)) / 8, rel=1e-12)


@pytest.mark.parametrize("t", [1, 20])
def test_kernels_over_several_blocks_and_their_refusals(t, rng):
  """Blocks of 256 positions (8 key groups of 32) over a 512-position cache, scales
  passed as arrays or carried by the tensors; wrong layouts and tilings are refused."""
  fmt = "k=int2-asym-c32,v=int4-c16-sbf16+sink2+recent36"
  cache = poison(kvtpu.KVCache.init(fmt, num_layers=1, batch=3, kv_heads=2, max_len=512,
                                    head_dim=128))
  held = np.array([400, 129, 0])
  x = jnp.asarray(kv_with_outliers(rng, (3, 400, 2, 128)))
  cache = cache.update(0, x, x, valid_len=held).advance(held)
  new = jnp.asarray(kv_with_outliers(rng, (3, t, 2, 128)))
  cache = cache.update(0, new, new)
  q = jnp.asarray(rng.standard_normal((3, t, 4, 128)), jnp.float32)
  chunk = jnp.full((3,), t, jnp.int32)
  k, v = cache.k, cache.v
  want = ref_decode_attention(q, k, v, cache.lengths, chunk, 0, max_t=None)
  kernel, blocks = ((decode_attention, BlockSizes(256)) if t <= 8
                    else (prefill_attention, PrefillBlockSizes(8, 256)))
  carried = kernel(q, k, v, cache.lengths, chunk, 0, block_sizes=blocks, interpret=INTERPRET)
  assert_close(carried, want, atol=2e-5 * float(jnp.abs(x).max()), rtol=1e-4, name="carried")
  raw = dict(k_scale=k.scale, k_zero=k.zero, v_scale=v.scale, k_sink=k.window("sink"),
             v_sink=v.window("sink"), k_recent=k.window("recent"), v_recent=v.window("recent"))
  args = (q, k.values, v.values, cache.lengths, chunk, 0)
  out = kernel(*args, **raw, k_token_group=32, v_token_group=16, block_sizes=blocks,
               interpret=INTERPRET)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(carried))
  with pytest.raises(ValueError, match="block_s=128 must be a multiple of 256"):
    kernel(*args, **raw, k_token_group=32, v_token_group=16, block_sizes=type(blocks)(
        *([8] if t > 8 else []), 128), interpret=INTERPRET)
  with pytest.raises(ValueError, match=r"k_scale of k_token_group=24 must be per-channel scales"):
    kernel(*args, **raw, k_token_group=24, v_token_group=16, interpret=INTERPRET)
  with pytest.raises(ValueError, match="do not also pass k_token_group"):
    kernel(q, k, v, cache.lengths, chunk, 0, k_token_group=32, interpret=INTERPRET)
  with pytest.raises(ValueError, match=r"v_scale must be per-token scales"):
    kernel(*args, **raw, k_token_group=32, interpret=INTERPRET)


@pytest.mark.tpu_compile
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_a_two_bit_scheme_with_channel_keys_compiles_at_its_default_blocks():
  """8K positions, head_dim 128, GQA 3, v5e: blocks of 1024 positions with bf16 scale
  blocks of 8 rows (the kernel grid of tests/pallas_kernels compiles a c16 format on
  every generation)."""
  compile_with_default_blocks(decode_attention, "k=int2-asym-c128-sbf16,v=int2-nu-sbf16-rot"
                              "+sink4+recent252", t=1, group=3, generation="v5e")
