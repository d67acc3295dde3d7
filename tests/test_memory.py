"""Memory accounting: hand-computed bytes, and closed forms against the real cache arrays."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvtpu import KVCache, memory
from kvtpu.formats import PRESETS, KVFormat
from tests.helpers import flat_arrays

# Per-layer counters: 5 counters x 2 uint32 words x 4 bytes.
COUNTER_BYTES = 40


@pytest.mark.parametrize("name, expected", [
    # K=8 kv heads, H=128, per token and layer, K plus V:
    ("bf16", 2 * 8 * 128 * 2),  # 4096: 2 bytes a value, no scales.
    ("int8", 2 * (8 * 128 + 8 * 4)),  # 2112: 1 byte a value + one f32 scale per head.
    ("fp8_e4m3", 2 * (8 * 128 + 8 * 4)),  # 2112, as int8.
    ("fp8_e5m2", 2112),
    ("int4", 2 * (8 * 64 + 8 * 4)),  # 1088: half a byte a value.
    ("int4-g32", 2 * (8 * 64 + 8 * 4 * 4)),  # 1280: 128 / 32 = 4 scales per head.
    ("int8-asym", 2 * (8 * 128 + 8 * 4 + 8 * 4)),  # 2176: plus a float32 zero point per head.
    ("int4-asym", 2 * (8 * 64 + 8 * 4 + 8 * 4)),  # 1152.
    ("int4-asym-g32", 2 * (8 * 64 + 8 * 4 * (4 + 4))),  # 1536.
    ("int8-sbf16", 2 * (8 * 128 + 8 * 2)),  # 2080: bf16 scales.
    ("int4-asym-g32-sbf16", 2 * (8 * 64 + 8 * 4 * (2 + 4))),  # 1408: zero points stay f32.
    ("k8v4", (8 * 128 + 8 * 4) + (8 * 64 + 8 * 4)),  # 1056 + 544 = 1600.
    ("k4v8", 1600),
    ("k16v8", 8 * 128 * 2 + (8 * 128 + 8 * 4)),  # 2048 + 1056 = 3104.
    ("int8-head", 2 * 8 * 128),  # 2048: static scales are per layer (fixed_bytes).
    ("fp8_e4m3-channel", 2048),
    ("k=int8-head,v=int4-g32", 8 * 128 + (8 * 64 + 8 * 4 * 4)),  # 1024 + 640 = 1664.
    ("int2", 2 * (8 * 32 + 8 * 4)),  # 576: a quarter byte a value.
    ("int2-asym-sbf16", 2 * (8 * 32 + 8 * (2 + 4))),  # 608: bf16 scales, f32 zero points.
    ("k4v2", (8 * 64 + 8 * 4) + (8 * 32 + 8 * 4)),  # 544 + 288 = 832.
])
def test_bytes_per_token_by_hand(name, expected):
  assert memory.bytes_per_token(name, kv_heads=8, head_dim=128) == expected


def test_bytes_per_token_odd_int4():
  # K=1, H=3: 1.5 bytes of int4 values + a 4-byte scale, for K and V: 11, not rounded.
  assert memory.bytes_per_token("int4", kv_heads=1, head_dim=3) == 11.0
  assert memory.bytes_per_token(KVFormat.parse("int4"), kv_heads=1, head_dim=3) == 11.0


@pytest.mark.parametrize("name, expected", [
    ("int8", COUNTER_BYTES),  # Dynamic: only the counters.
    ("bf16", COUNTER_BYTES),
    ("int8-tensor", COUNTER_BYTES + 2 * 4),  # 48: one f32 scale each for K and V.
    ("int8-head", COUNTER_BYTES + 2 * 8 * 4),  # 104: K=8 scales each.
    ("int8-channel", COUNTER_BYTES + 2 * 8 * 128 * 4),  # 8232: K * H each.
    ("int8-channel-sbf16", COUNTER_BYTES + 2 * 8 * 128 * 2),  # 4136.
    ("int4-asym-head", COUNTER_BYTES + 2 * (8 * 4 + 8 * 4)),  # 168: plus f32 zero points.
    ("int4-asym-tensor-sbf16", COUNTER_BYTES + 2 * (2 + 4)),  # 52.
    ("k=int8-head,v=int4", COUNTER_BYTES + 8 * 4),  # 72: only K is static.
])
def test_fixed_bytes_by_hand(name, expected):
  assert memory.fixed_bytes(name, kv_heads=8, head_dim=128) == expected


def test_counters_layout():
  assert len(memory.COUNTERS) == 5
  layout = memory.cache_layout("int8", num_layers=3, batch=2, kv_heads=1, max_len=4, head_dim=8)
  counters = layout.counters
  assert counters.shape == (3, 5, 2) and counters.dtype == jnp.uint32
  assert memory.array_nbytes(counters.shape, counters.dtype) == 3 * COUNTER_BYTES


@pytest.mark.parametrize("shape, dtype, expected", [
    ((4,), jnp.int4, 2),  # Two int4 values a byte.
    ((3,), jnp.int4, 2),  # An odd count rounds up.
    ((2, 3), jnp.int4, 3),
    ((8,), jnp.int2, 2),  # Four int2 values a byte.
    ((5,), jnp.int2, 2),  # Rounded up.
    ((5,), jnp.int8, 5),
    ((5,), jnp.float8_e4m3fn, 5),
    ((5,), jnp.float8_e5m2, 5),
    ((2, 3), jnp.bfloat16, 12),
    ((7,), jnp.bool_, 7),
    ((5, 2), jnp.uint32, 40),
    ((3,), jnp.float32, 12),
    ((0, 4), jnp.float32, 0),
])
def test_array_nbytes(shape, dtype, expected):
  assert memory.array_nbytes(shape, dtype) == expected


def test_int4_is_counted_packed():
  assert memory.dtype_bits(jnp.int4) == 4
  # jax (like numpy) reports a byte per int4 value; the cache counts what TPUs store.
  assert jnp.zeros((4,), jnp.int4).nbytes == 4
  assert memory.array_nbytes((4,), jnp.int4) == 2


# Static formats need calibrated scales; every granularity, symmetric and not.
STATIC_NAMES = ("int8-tensor", "int8-head", "int8-channel", "fp8_e4m3-channel", "fp8_e5m2-head-sbf16",
                "int4-asym-head", "int8-asym-channel-sbf16", "k=int8-head,v=int4-g16",
                "k=fp8_e4m3,v=int4-asym-tensor")


def _static_kwargs(fmt: KVFormat, num_layers: int, kv_heads: int, head_dim: int,
                   per_layer: bool) -> dict:
  """Scales (and zero points) for the static specs of `fmt`: `[L, 1|K, 1|H]`, or without L."""
  out = {}
  for which in ("k", "v"):
    spec = fmt.spec(which)
    if not spec.static:
      continue
    shape = {"tensor": (1, 1), "head": (kv_heads, 1), "channel": (kv_heads, head_dim)}[
        spec.granularity.value]
    if per_layer:
      shape = (num_layers, *shape)
    out[f"{which}_scale"] = np.full(shape, 0.05, np.float32)
    if not spec.symmetric:
      out[f"{which}_zero"] = np.full(shape, 3.0, np.float32)
  return out


@pytest.mark.parametrize("dims", [
    dict(num_layers=2, batch=3, kv_heads=2, max_len=5, head_dim=32),
    dict(num_layers=1, batch=1, kv_heads=1, max_len=1, head_dim=16),
    dict(num_layers=3, batch=1, kv_heads=3, max_len=5, head_dim=5),  # Odd int4 counts.
])
@pytest.mark.parametrize("name", PRESETS + STATIC_NAMES)
def test_cache_bytes_matches_arrays(name, dims):
  fmt = KVFormat.parse(name)
  if any(s.group_size and dims["head_dim"] % s.group_size for s in (fmt.k, fmt.v)):
    # A group size that does not divide head_dim is an error everywhere.
    for fn in (memory.cache_bytes, memory.cache_layout, KVCache.init):
      with pytest.raises(ValueError, match="is not a multiple of group_size"):
        fn(name, **dims)
    return
  layout = memory.cache_layout(fmt, **dims)
  from_layout = sum(memory.array_nbytes(s.shape, s.dtype) for s in jax.tree.leaves(layout))
  expected = memory.cache_bytes(name, **dims)
  assert from_layout == expected

  for per_layer in (True, False):
    kwargs = _static_kwargs(fmt, dims["num_layers"], dims["kv_heads"], dims["head_dim"], per_layer)
    cache = KVCache.init(name, **dims, **kwargs)
    assert cache.nbytes == expected
    # Every array of the cache is one of the layout's entries, shaped as it says.
    arrays = flat_arrays(cache)
    assert arrays.keys() == flat_arrays(layout).keys()
    for key, sds in flat_arrays(layout).items():
      assert (arrays[key].shape, arrays[key].dtype) == (sds.shape, sds.dtype), key
    if not fmt.static:
      break

  # The closed form: tokens x bytes per token (K and V each rounded up to whole
  # bytes), per-layer fixed bytes, and 4 + 1 + 1 bytes (length, overflow flag, error
  # bits) a sequence.
  tokens = dims["num_layers"] * dims["batch"] * dims["max_len"]
  kh = dict(kv_heads=dims["kv_heads"], head_dim=dims["head_dim"])
  per_tensor = sum(math.ceil(tokens * memory.bytes_per_token(KVFormat(s, s), **kh) / 2)
                   for s in (fmt.k, fmt.v))
  assert expected == (per_tensor + dims["num_layers"] * memory.fixed_bytes(fmt, **kh)
                      + dims["batch"] * 6)


def test_cache_bytes_odd_int4_by_hand():
  # One layer, sequence, head and position, H=3: K and V are 3 int4 values each, 2 bytes
  # each (not 1.5 + 1.5 = 3 together); 4-byte scales: 2 * (2 + 4) = 12; counters 40;
  # length, overflow flag and error bits 6. Total 58.
  dims = dict(num_layers=1, batch=1, kv_heads=1, max_len=1, head_dim=3)
  assert memory.cache_bytes("int4", **dims) == 58
  assert KVCache.init("int4", **dims).nbytes == 58


def test_layout_shapes():
  layout = memory.cache_layout("k=int4-asym-g16,v=int8-channel", num_layers=2, batch=3,
                               kv_heads=4, max_len=5, head_dim=32)
  shapes = {k: (v.shape, v.dtype) for k, v in flat_arrays(layout).items()}
  assert shapes == {
      "k.values": ((2, 3, 4, 5, 32), jnp.int4),
      "k.scale": ((2, 3, 4, 2, 5), jnp.float32),  # [L, B, K, G, S], G = 32 / 16.
      "k.zero": ((2, 3, 4, 2, 5), jnp.float32),
      "v.values": ((2, 3, 4, 5, 32), jnp.int8),
      "v.scale": ((2, 4, 32), jnp.float32),  # Static per channel: [L, K, H].
      "lengths": ((3,), jnp.int32),
      "overflow": ((3,), jnp.bool_),
      "errors": ((3,), jnp.uint8),
      "counters": ((2, 5, 2), jnp.uint32),
  }


@pytest.mark.parametrize("kv_heads", [1, 8])
def test_ratio_targets(kv_heads):
  # The targets at head_dim 128 with per-token-head scales.
  def ratio(name):
    return (memory.bytes_per_token(name, kv_heads=kv_heads, head_dim=128)
            / memory.bytes_per_token("bf16", kv_heads=kv_heads, head_dim=128))
  for name in ("int8", "fp8_e4m3", "fp8_e5m2"):
    assert ratio(name) == (128 + 4) / 256 <= 0.53  # 0.5156.
  assert ratio("int4") == (64 + 4) / 256 <= 0.28  # 0.2656.
  assert ratio("k8v4") == ((128 + 4) + (64 + 4)) / 512


BAD_DIMS = [0, -1, True, 2.5, None, "8", np.float32(8)]


@pytest.mark.parametrize("bad", BAD_DIMS)
@pytest.mark.parametrize("arg", ["kv_heads", "head_dim"])
def test_invalid_dims_per_token(arg, bad):
  dims = dict(kv_heads=8, head_dim=128)
  dims[arg] = bad
  for fn in (memory.bytes_per_token, memory.fixed_bytes):
    with pytest.raises(ValueError, match=f"{arg} must be a positive int, got {arg}="):
      fn("int8-channel", **dims)


@pytest.mark.parametrize("bad", BAD_DIMS)
@pytest.mark.parametrize("arg", ["num_layers", "batch", "kv_heads", "max_len", "head_dim"])
def test_invalid_dims_cache(arg, bad):
  dims = dict(num_layers=2, batch=2, kv_heads=2, max_len=4, head_dim=16)
  dims[arg] = bad
  for fn in (memory.cache_bytes, memory.cache_layout):
    with pytest.raises(ValueError, match=f"{arg} must be a positive int, got {arg}="):
      fn("int8", **dims)


def test_numpy_int_dims_accepted():
  dims = dict(num_layers=np.int64(2), batch=np.int32(1), kv_heads=np.int64(2),
              max_len=np.int64(3), head_dim=np.int64(8))
  assert memory.cache_bytes("int8", **dims) == memory.cache_bytes(
      "int8", num_layers=2, batch=1, kv_heads=2, max_len=3, head_dim=8)


@pytest.mark.parametrize("name", ["int4-g32", "k=int8,v=int8-g64", "int8-asym-g48"])
def test_group_must_divide_head_dim(name):
  for fn in (memory.bytes_per_token, memory.cache_bytes, memory.cache_layout):
    kwargs = dict(kv_heads=2, head_dim=80)
    if fn is not memory.bytes_per_token:
      kwargs.update(num_layers=1, batch=1, max_len=4)
    with pytest.raises(ValueError, match="head_dim=80 is not a multiple of group_size"):
      fn(name, **kwargs)


def test_invalid_format_name():
  with pytest.raises(ValueError, match="Presets: "):
    memory.bytes_per_token("int5", kv_heads=1, head_dim=8)


# One copied [L, B, K, G + 1, S] bf16 array at L=3, B=5, K=7, G=1, S=256.
ONE_COPY = 3 * 5 * 7 * 2 * 256 * 2


@pytest.mark.parametrize("name, expected", [
    ("int8", 0),  # float32 scales are read in place.
    ("int8-sbf16", 2 * ONE_COPY),  # One group, padded to two, for K and V.
    ("int4-g32-sbf16", 0),  # Four groups at head_dim 128: already pairs.
    ("int4-g32-sbf16-rot+sink4+recent64", 0),
    ("k=int8-sbf16,v=int4-g64-sbf16", ONE_COPY),  # Only K's single group.
    ("int4-asym-sbf16", 2 * ONE_COPY),  # Zero points are float32.
    ("int8-head-sbf16", 0),  # Static scales are per layer, not per token.
    ("bf16", 0),
])
def test_tpu_layout_copy_bytes_by_hand(name, expected):
  dims = dict(num_layers=3, batch=5, kv_heads=7, max_len=256, head_dim=128)
  assert memory.tpu_layout_copy_bytes(name, **dims) == expected
