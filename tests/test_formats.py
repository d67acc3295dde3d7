"""Format specs: name grammar, round trips, validation, derived properties."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import kvtpu
from kvtpu.formats import PRESETS, Granularity, KVFormat, QuantSpec, StorageDtype

EXTRA_NAMES = (
    "fp8_e4m3-channel", "fp8_e5m2-tensor", "int8-head", "int8-tensor", "int8-channel",
    "int4-asym-head", "int8-sbf16", "int4-asym-g16-sbf16", "int8-g64", "k=int8-head,v=int4-g32",
    "k=fp8_e4m3,v=int4-asym", "k=bf16,v=fp8_e5m2-sbf16", "f32", "k=f32,v=int8",
    "int2", "int2-asym-g32-sbf16-rot", "k4v2", "k8v2", "k=int4-rot,v=int2-asym-rot+recent64",
    "int2-nu-sbf16-rot", "int4-nu-g32-rot+sink4+recent60", "k=int4-nu-rot,v=int2-nu-sbf16-rot",
)


@pytest.mark.parametrize("name", PRESETS + EXTRA_NAMES)
def test_parse_round_trip(name):
  fmt = KVFormat.parse(name)
  assert KVFormat.parse(fmt.name) == fmt
  assert KVFormat.parse(fmt.name).name == fmt.name  # The name is a fixed point.
  assert KVFormat.parse(fmt) is fmt  # A parsed format passes through.
  assert str(fmt) == fmt.name


@pytest.mark.parametrize("name", PRESETS)
def test_presets_are_canonical(name):
  # Flags and reports use preset names, so a preset must print as itself.
  assert KVFormat.parse(name).name == name


@pytest.mark.parametrize("name, canonical", [
    ("k=int8,v=int4", "k8v4"),
    ("k=int4,v=int2", "k4v2"),
    ("k8v8", "int8"),
    ("k16v16", "bf16"),
    ("k=int8,v=int8", "int8"),
    ("k=bf16,v=int8", "k16v8"),
    ("INT8", "int8"),
    (" int4-g32 ", "int4-g32"),
    ("int4-g16-asym-sbf16", "int4-asym-g16-sbf16"),  # Options in canonical order.
    ("int8-sbf16-head", "int8-head-sbf16"),
    ("k=int8-head,v=int4-g32", "k=int8-head,v=int4-g32"),
    ("k=int4,v=int4-asym", "k=int4,v=int4-asym"),
    ("int2-rot-sbf16-nu", "int2-nu-sbf16-rot"),
])
def test_canonical_names(name, canonical):
  assert KVFormat.parse(name).name == canonical


def test_parse_fields():
  fmt = KVFormat.parse("k=int8-head,v=int4-asym-g32-sbf16")
  assert fmt.k == QuantSpec(StorageDtype.INT8, Granularity.HEAD)
  assert fmt.v == QuantSpec(StorageDtype.INT4, Granularity.GROUP, group_size=32, symmetric=False,
                            scale_dtype="bfloat16")
  assert KVFormat.parse("k8v4") == KVFormat(QuantSpec("int8"), QuantSpec("int4"))
  # bf16 is normalized to "no scales", whichever way it is built.
  assert QuantSpec("bf16") == QuantSpec("bf16", "none") == QuantSpec.parse("bf16")
  assert QuantSpec("bf16").granularity is Granularity.NONE


@pytest.mark.parametrize("name", ["int8", "k8v4", "int4-asym-g32", "fp8_e4m3-channel"])
def test_hashable_and_jit_static(name):
  fmt = KVFormat.parse(name)
  again = KVFormat.parse(name)
  assert hash(fmt) == hash(again) and len({fmt, again}) == 1
  assert len({KVFormat.parse(n) for n in PRESETS}) == len(PRESETS)

  traces = []

  def f(x, fmt):
    traces.append(fmt)
    return x * fmt.k.dtype.bits

  jf = jax.jit(f, static_argnums=1)
  x = jnp.ones((2,), jnp.float32)
  np.testing.assert_array_equal(jf(x, fmt), np.full((2,), fmt.k.dtype.bits, np.float32))
  jf(x, again)  # Equal formats hit the same compiled function.
  assert len(traces) == 1
  jf(x, KVFormat.parse("fp8_e5m2-tensor"))
  assert len(traces) == 2


@pytest.mark.parametrize("name, bad_part", [
    ("int7", "int7"),
    ("float16", "float16"),
    ("int8-foo", "foo"),
    ("int8-g0", "g0"),
    ("int8-g-1", "g"),
    ("int8-g032", "g032"),
    ("int8-", "''"),
    ("fp8_e4m3-asym", "asym"),
    ("fp8_e5m2-asym-g32", "asym"),
    ("bf16-g32", "g32"),
    ("bf16-sbf16", "sbf16"),
    ("bf16-asym", "asym"),
    ("int8-head-channel", "channel"),
    ("int8-g32-g64", "g64"),
    ("int8-asym-asym", "asym"),
    ("k8v3", "k8v3"),
    ("k=int8", "k=int8"),
    ("k=int8,v=int3", "int3"),
    ("int2-nu", "rotation (add rot"),
    ("int8-nu-rot", "dtype int4 or int2 (got int8)"),
    ("fp8_e4m3-nu-rot", "dtype int4 or int2"),
    ("int4-nu-asym-rot", "no zero point"),
    ("int4-nu-head-rot", "per-token scales (got static head scales)"),
    ("bf16-nu", "nu"),
    ("int2-nu-nu-rot", "nu"),
    ("", "''"),
    ("   ", "'   '"),
])
def test_invalid_names(name, bad_part):
  with pytest.raises(ValueError) as e:
    KVFormat.parse(name)
  msg = str(e.value)
  assert bad_part in msg, msg
  # An unknown name lists what is valid.
  assert "Presets: " + ", ".join(PRESETS) in msg, msg


@pytest.mark.parametrize("name, bad_part", [
    ("int9", "int9"), ("int8-zz", "zz"), ("fp8_e4m3-asym", "asym"), ("", "''"),
    ("f32-g32", "f32 storage takes no scale options"),
])
def test_quant_spec_parse_errors(name, bad_part):
  with pytest.raises(ValueError, match="name=") as e:
    QuantSpec.parse(name)
  assert bad_part in str(e.value)


@pytest.mark.parametrize("value", [None, 8, b"int8", ["int8"], QuantSpec("int8")])
def test_non_string_name(value):
  with pytest.raises(TypeError, match=type(value).__name__):
    KVFormat.parse(value)


@pytest.mark.parametrize("kwargs, match", [
    (dict(dtype="int3"), "int3"),
    (dict(dtype="int8", granularity="row"), "row"),
    (dict(dtype="int8", granularity="none"), "granularity=none"),
    (dict(dtype="int8", granularity="group"), "group_size=None"),
    (dict(dtype="int8", granularity="group", group_size=0), "group_size=0"),
    (dict(dtype="int8", granularity="group", group_size=-4), "group_size=-4"),
    (dict(dtype="int8", granularity="group", group_size=32.0), "group_size=32.0"),
    (dict(dtype="int8", granularity="group", group_size=True), "group_size=True"),
    (dict(dtype="int8", granularity="head", group_size=32), "group_size=32"),
    (dict(dtype="int8", group_size=32), "group_size=32"),
    (dict(dtype="fp8_e4m3", symmetric=False), "asymmetric"),
    (dict(dtype="int8", scale_dtype="float16"), "scale_dtype='float16'"),
    (dict(dtype="bf16", group_size=32), "bf16"),
    (dict(dtype="bf16", symmetric=False), "bf16"),
    (dict(dtype="bf16", scale_dtype="bfloat16"), "bf16"),
    (dict(dtype="bf16", granularity="channel"), "bf16"),
    (dict(dtype="bf16", nonuniform=True), "bf16"),
    (dict(dtype="int4", rotation=True, nonuniform=1), "nonuniform must be a bool"),
    (dict(dtype="int2", nonuniform=True), "rotation"),
])
def test_quant_spec_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    QuantSpec(**kwargs)


def test_kv_format_needs_specs():
  with pytest.raises(TypeError, match="KVFormat.v must be a QuantSpec"):
    KVFormat(QuantSpec("int8"), "int8")
  with pytest.raises(ValueError, match="which='q'"):
    KVFormat.parse("int8").spec("q")


@pytest.mark.parametrize("name, head_dim, groups", [
    ("int8", 128, 1), ("int8", 7, 1), ("int4-g32", 128, 4), ("int4-g32", 32, 1),
    ("int8-asym-g16", 64, 4), ("fp8_e4m3-g1", 3, 3),
])
def test_num_groups(name, head_dim, groups):
  assert QuantSpec.parse(name).num_groups(head_dim) == groups


@pytest.mark.parametrize("name, head_dim", [("int4-g32", 48), ("int4-g32", 16), ("int8-g3", 128)])
def test_num_groups_must_divide(name, head_dim):
  with pytest.raises(ValueError, match=f"head_dim={head_dim}.*group_size"):
    QuantSpec.parse(name).num_groups(head_dim)


@pytest.mark.parametrize("name", ["int8-head", "int8-tensor", "fp8_e4m3-channel", "bf16"])
def test_num_groups_static_or_bf16(name):
  with pytest.raises(ValueError, match="no per-token scale groups"):
    QuantSpec.parse(name).num_groups(128)


@pytest.mark.parametrize("name, qmin, qmax", [
    ("int8", -127, 127),  # Symmetric drops -128 so that q and -q both exist.
    ("int8-asym", -128, 127),
    ("int4", -7, 7),
    ("int4-asym", -8, 7),
    ("int4-asym-g32", -8, 7),
    ("int2", -1, 1),  # Ternary: three levels.
    ("int2-asym", -2, 1),  # All four levels.
    ("int2-nu-rot", -2, 1),  # Indexes a codebook of four levels.
    ("int4-nu-g32-rot", -8, 7),
    ("fp8_e4m3", -448, 448),  # e4m3fn: 1.75 * 2**8, no inf.
    ("fp8_e5m2", -57344, 57344),  # 1.75 * 2**15.
])
def test_qmin_qmax(name, qmin, qmax):
  spec = QuantSpec.parse(name)
  assert (spec.qmin, spec.qmax) == (qmin, qmax)
  if spec.dtype.is_fp8:  # Cross-check against ml_dtypes, not jnp.
    ml = {"fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2}
    assert qmax == float(ml_dtypes.finfo(ml[spec.dtype.value]).max)


@pytest.mark.parametrize("name, bits, jnp_dtype", [
    ("bf16", 16, jnp.bfloat16), ("int8", 8, jnp.int8), ("int4", 4, jnp.int4), ("int2", 2, jnp.int2),
    ("fp8_e4m3", 8, jnp.float8_e4m3fn), ("fp8_e5m2", 8, jnp.float8_e5m2),
])
def test_storage_dtypes(name, bits, jnp_dtype):
  spec = QuantSpec.parse(name)
  assert spec.dtype.bits == bits
  assert spec.storage_dtype == jnp.dtype(jnp_dtype)
  assert spec.quantized == (name != "bf16")


@pytest.mark.parametrize("name, dynamic, static", [
    ("bf16", False, False),  # Nothing is scaled.
    ("int8", True, False),
    ("int4-g32", True, False),
    ("fp8_e5m2", True, False),
    ("int8-tensor", False, True),
    ("int8-head", False, True),
    ("fp8_e4m3-channel", False, True),
    ("int4-asym-head", False, True),
])
def test_dynamic_static_from_granularity(name, dynamic, static):
  spec = QuantSpec.parse(name)
  assert spec.dynamic == dynamic and spec.static == static
  assert spec.dynamic == spec.granularity.dynamic


def test_format_static_either():
  assert KVFormat.parse("k=int8-head,v=int4").static
  assert KVFormat.parse("k=int8,v=int4-channel").static
  assert not KVFormat.parse("k8v4").static
  assert not KVFormat.parse("bf16").quantized and KVFormat.parse("k16v8").quantized


def test_public_api():
  assert kvtpu.KVFormat is KVFormat and kvtpu.PRESETS is PRESETS
  for required in ("bf16", "int8", "int4", "fp8_e4m3", "fp8_e5m2", "k8v4"):
    assert required in PRESETS


@pytest.mark.parametrize("name", ["bf16", "f32", "int8", "int4-asym-g32", "fp8_e4m3-channel-sbf16",
                                  "k=int8-head,v=int4-asym-g16", "int2-nu-sbf16-rot+recent8"])
def test_to_dict_round_trips_and_rejects_what_it_cannot_be(name):
  fmt = KVFormat.parse(name)
  d = fmt.to_dict()
  assert d["name"] == fmt.name and KVFormat.from_dict(d) == fmt
  assert QuantSpec.from_dict(d["k"]) == fmt.k and QuantSpec.from_dict(d["v"]) == fmt.v
  assert KVFormat.from_dict(json.loads(json.dumps(d))) == fmt  # JSON-able as it is.
  with pytest.raises(ValueError, match=r"unknown QuantSpec field\(s\) \['bits'\]"):
    QuantSpec.from_dict({**d["k"], "bits": 8})
  with pytest.raises(ValueError, match="names 'int4' but its specs are"):
    KVFormat.from_dict({**d, "name": "int4"} if fmt.name != "int4" else {**d, "name": "int8"})


def test_description_reads_as_words():
  assert QuantSpec.parse("int8").description == "int8, token_head, symmetric"
  assert QuantSpec.parse("int4-asym-g32-sbf16").description == (
      "int4, group 32, asymmetric, bfloat16 scales")
  assert QuantSpec.parse("bf16").description == "bf16, unscaled"
  assert QuantSpec.parse("fp8_e4m3-channel").description == "fp8_e4m3, channel, symmetric"
  assert QuantSpec.parse("int2-nu-sbf16-rot").description == (
      "int2, token_head, symmetric, Lloyd-Max code of 4 levels, bfloat16 scales, rotated")
