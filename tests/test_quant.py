"""The quantization math against hand-worked cases and independent float64 numpy references."""

import itertools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from kvtpu import quant
from kvtpu.formats import QuantSpec
from tests.helpers import assert_close, kv_with_outliers

F32_TINY = float(np.finfo(np.float32).tiny)
_ML_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16,
              "fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2}
# Per fp8 format: the bound on |x - round(x)| / |x| for normal values (half an ulp,
# 2**-(mantissa bits + 1)) and half the smallest subnormal (the absolute bound below).
FP8_TOL = {"fp8_e4m3": (2.0**-4, 2.0**-10), "fp8_e5m2": (2.0**-3, 2.0**-17)}
# float32 arithmetic in x / scale (+ zero) and back, relative to one quantization step.
STEP_EPS = 2.0**-10


def _np(a) -> np.ndarray:
  return np.asarray(a, dtype=np.float64)


def _smallest_at_least(v: np.ndarray, dtype) -> np.ndarray:
  """The smallest value of `dtype` that is >= `v` (float64), as float64."""
  c = np.asarray(v).astype(dtype)
  up = np.nextafter(c, np.asarray(np.inf, dtype))
  return _np(np.where(_np(c) < v, up, c))


def _per_element(p, h: int) -> np.ndarray:
  """Dynamic scale or zero `[..., G]` -> `[..., H]` (each group's value repeated)."""
  p = _np(p)
  return np.repeat(p, h // p.shape[-1], axis=-1)


def _ambiguous(y: np.ndarray, f) -> np.ndarray:
  """Where `f` (a rounding) could go either way for a float32 computation of `y`.

  The library computes `x * (1 / scale)` in float32, two roundings away from the
  float64 `y`, so `y` is known to ~1e-6 relative: near a rounding tie it may
  legitimately land on either side.
  """
  return f(y * (1 - 1e-6)) != f(y * (1 + 1e-6))


def _fp8_round(y: np.ndarray, dtype: str) -> np.ndarray:
  """Round-to-nearest-even into an fp8 format (ml_dtypes casts from float64 directly)."""
  return _np(y.astype(_ML_DTYPES[dtype]))


# Jitted for one-off shapes: one compile beats eager op-by-op compiles for each new
# shape (test_jit_matches_eager pins that both give the same bits). Tests over a
# shared shape run eagerly, reusing the compiled ops.
_quantize = jax.jit(quant.quantize, static_argnums=1)
_dequantize = jax.jit(quant.dequantize, static_argnums=1)


# ----------------------------------------------------------------- hand cases
def test_int8_symmetric_by_hand():
  x = jnp.asarray([0.5, -1.27, 0.0, 1.27], jnp.float32)
  r = _quantize(x, QuantSpec.parse("int8"))
  # amax = 1.27, scale = 1.27 / 127 = 0.01; q = x / 0.01 = [50, -127, 0, 127].
  assert r.scale.shape == (1,) and r.scale.dtype == jnp.float32
  assert_close(r.scale, [0.01], atol=0, rtol=1e-7, name="scale")
  np.testing.assert_array_equal(r.q, np.array([50, -127, 0, 127], np.int8))
  assert r.q.dtype == jnp.int8 and r.zero is None
  assert not r.saturated.any() and not r.nonfinite.any()
  # Dequantized: q * 0.01 = x, up to float32 rounding of 0.01.
  assert_close(_dequantize(r.q, QuantSpec.parse("int8"), r.scale), x, atol=0, rtol=1e-6)


def test_round_half_even_and_not_truncation():
  spec = QuantSpec.parse("int8")
  # amax = 127 makes scale = 127 / 127 = 1, so q = round(x): ties go to even
  # (0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -2.5 -> -2) and 0.6 -> 1, 2.7 -> 3, -0.6 -> -1
  # (truncation would give 0, 2, 0).
  x = jnp.asarray([127.0, 0.5, 1.5, 2.5, -2.5, 0.6, 2.7, -0.6, 3.49], jnp.float32)
  r = _quantize(x, spec)
  np.testing.assert_array_equal(r.scale, [1.0])
  np.testing.assert_array_equal(r.q, [127, 0, 2, 2, -2, 1, 3, -1, 3])
  # Relative to another scale: 0.6 * scale -> 1, 0.4 * scale -> 0, -0.6 * scale -> -1.
  s = 1.27 / 127
  r = _quantize(jnp.asarray([1.27, 0.6 * s, 0.4 * s, -0.6 * s, 126.6 * s], jnp.float32), spec)
  np.testing.assert_array_equal(r.q, [127, 1, 0, -1, 127])


def test_int4_symmetric_by_hand():
  # amax = 7, scale = 7 / 7 = 1; q = round(x) with 3.5 -> 4 (tie to even), 0.4 -> 0.
  x = jnp.asarray([7.0, 3.5, -1.0, 0.4, -6.6], jnp.float32)
  r = _quantize(x, QuantSpec.parse("int4"))
  np.testing.assert_array_equal(r.scale, [1.0])
  assert r.q.dtype == jnp.int4
  np.testing.assert_array_equal(_np(r.q), [7, 4, -1, 0, -7])


def test_int8_asymmetric_by_hand():
  spec = QuantSpec.parse("int8-asym")
  x = jnp.asarray([-0.5, 0.0, 0.25, 1.4921875], jnp.float32)
  r = _quantize(x, spec)
  # lo = -0.5, hi = 1.4921875: scale = (hi - lo) / (127 - -128) = 1.9921875 / 255
  # = 2**-7 (every step of the grid), zero = qmin - round(lo / scale) = -128 - (-64)
  # = -64, q = round(x / scale) + zero: [-64, 0, 32, 191] - 64 = [-128, -64, -32, 127];
  # 0 is stored exactly as q = zero.
  np.testing.assert_array_equal(r.scale, [2.0**-7])
  np.testing.assert_array_equal(r.zero, [-64.0])
  assert r.zero.dtype == jnp.float32
  np.testing.assert_array_equal(r.q, [-128, -64, -32, 127])
  np.testing.assert_array_equal(_dequantize(r.q, spec, r.scale, r.zero), x)


def test_int4_asymmetric_by_hand():
  # lo = 0, hi = 3.75: scale = 3.75 / (7 - -8) = 0.25, zero = -8 - round(0 / 0.25) = -8,
  # q = round(x / 0.25) - 8 = [0, 4, 9, 15] - 8 = [-8, -4, 1, 7] (2.2 / 0.25 = 8.8 -> 9).
  r = _quantize(jnp.asarray([0.0, 1.0, 2.2, 3.75], jnp.float32), QuantSpec.parse("int4-asym"))
  np.testing.assert_array_equal(r.scale, [0.25])
  np.testing.assert_array_equal(r.zero, [-8.0])
  np.testing.assert_array_equal(_np(r.q), [-8, -4, 1, 7])


@pytest.mark.parametrize("x, zero, q, back", [
    # lo = -3, hi = 1.5: scale 4.5 / 3 = 1.5, zero = -2 - round(-2) = 0: four levels.
    ([-3.0, -1.5, 0.0, 1.5], 0.0, [-2, -1, 0, 1], [-3.0, -1.5, 0.0, 1.5]),
    # lo = -0.7, hi = 2.3: scale 1, zero = -2 - round(-0.7) = -1; the ends land at
    # -1.7 and 1.3 in grid units, each rounded onto the grid within half a step.
    ([-0.7, 0.0, 0.4, 2.3], -1.0, [-2, -1, -1, 1], [-1.0, 0.0, 0.0, 2.0]),
    # lo = -0.4, hi = 2.6: zero = -2 - round(-0.4) = -2; 2.6 -> 0.6 -> 1, back to 3.
    ([-0.4, 0.0, 1.2, 2.6], -2.0, [-2, -2, -1, 1], [0.0, 0.0, 1.0, 3.0]),
])
def test_int2_asymmetric_by_hand(x, zero, q, back):
  spec = QuantSpec.parse("int2-asym")
  r = _quantize(jnp.asarray(x, jnp.float32), spec)
  assert r.q.dtype == jnp.int2
  np.testing.assert_array_equal(r.zero, [zero])
  np.testing.assert_array_equal(_np(r.q), q)
  deq = _np(_dequantize(r.q, spec, r.scale, r.zero))
  np.testing.assert_allclose(deq, back, rtol=1e-6)
  assert (np.abs(deq - np.asarray(x)) <= _np(r.scale) / 2 * (1 + 1e-6)).all()
  assert not np.asarray(r.saturated).any()


def test_fp8_by_hand():
  # e4m3: amax = 896, scale = 896 / 448 = 2; y = x / 2 = [448, -224, 0.5, 17, 0].
  # 17 = 1.0001b * 2**4 needs 4 mantissa bits; e4m3 has 3, so it is a tie between 16
  # (mantissa 000, even) and 18 (001): 16, which dequantizes to 32.
  x = jnp.asarray([896.0, -448.0, 1.0, 34.0, 0.0], jnp.float32)
  spec = QuantSpec.parse("fp8_e4m3")
  r = _quantize(x, spec)
  np.testing.assert_array_equal(r.scale, [2.0])
  assert r.q.dtype == jnp.float8_e4m3fn
  np.testing.assert_array_equal(_np(r.q), [448, -224, 0.5, 16, 0])
  np.testing.assert_array_equal(_dequantize(r.q, spec, r.scale), [896, -448, 1, 32, 0])
  # e5m2: amax = 57344, scale = 1; 9 = 1.001b * 2**3 needs 3 mantissa bits, tie between
  # 8 (even) and 10: 8; 5 = 1.01b * 2**2 and 3 = 1.1b * 2 are exact; 11 -> 12 (nearest).
  x = jnp.asarray([57344.0, 9.0, 5.0, -3.0, 11.0], jnp.float32)
  r = _quantize(x, QuantSpec.parse("fp8_e5m2"))
  np.testing.assert_array_equal(r.scale, [1.0])
  np.testing.assert_array_equal(_np(r.q), [57344, 8, 5, -3, 12])


def test_groups_by_hand():
  # g2 over H = 4: groups [0.5, -2] and [0.07, 0.0] get scales 2/127 and 0.07/127,
  # so the small group keeps its precision: 0.07 -> 127, not 0 as with one scale.
  x = jnp.asarray([[0.5, -2.0, 0.07, 0.0]], jnp.float32)
  r = _quantize(x, QuantSpec.parse("int8-g2"))
  assert r.scale.shape == (1, 2)
  assert_close(r.scale, [[2 / 127, 0.07 / 127]], atol=0, rtol=1e-6, name="scale")
  np.testing.assert_array_equal(r.q, [[32, -127, 127, 0]])  # 0.5 / (2/127) = 31.75 -> 32.


# ------------------------------------------------------ per-format bounds (grid)
_INT_SPECS = [
    f"{d}{'' if sym else '-asym'}{g}{s}"
    for d, sym, g, s in itertools.product(("int8", "int4", "int2"), (True, False), ("", "-g16", "-g32"),
                                          ("", "-sbf16"))
]
_FP8_SPECS = [f"{d}{g}{s}" for d, g, s in itertools.product(("fp8_e4m3", "fp8_e5m2"),
                                                            ("", "-g16", "-g32"), ("", "-sbf16"))]


def _ref_step(x: np.ndarray, spec: QuantSpec) -> np.ndarray:
  """Exact float64 quantization step per group: `[..., G]` (before rounding into the dtype)."""
  xg = x.reshape(*x.shape[:-1], spec.num_groups(x.shape[-1]), -1)
  if spec.symmetric:
    return np.abs(xg).max(-1) / spec.qmax
  lo, hi = xg.min(-1), xg.max(-1)
  floor = np.maximum(np.maximum(np.abs(lo), np.abs(hi)) * 2.0**-16, F32_TINY)
  # All qmax - qmin steps over [lo, hi].
  return np.maximum((hi - lo) / (spec.qmax - spec.qmin), floor)


@pytest.mark.parametrize("name", _INT_SPECS + _FP8_SPECS)
def test_dynamic_bounds(name, rng):
  spec = QuantSpec.parse(name)
  x = kv_with_outliers(rng, (2, 16, 4, 64))
  r = quant.quantize(jnp.asarray(x), spec)
  h = x.shape[-1]
  assert r.q.dtype == spec.storage_dtype and r.q.shape == x.shape
  assert r.scale.dtype == spec.scale_jnp_dtype
  assert r.scale.shape == (*x.shape[:-1], spec.num_groups(h))
  scale = _np(r.scale)
  assert np.isfinite(scale).all() and (scale > 0).all()

  # Scales are rounded *up* into the scale dtype, so no value of a group is clipped.
  exact = _ref_step(_np(x), spec)
  assert (scale >= exact).all(), f"{int((scale < exact).sum())} scales below the exact step"
  assert not np.asarray(r.saturated).any() and not np.asarray(r.nonfinite).any()
  if spec.symmetric:  # Exactly the smallest scale-dtype value >= amax / qmax.
    np.testing.assert_array_equal(scale, _smallest_at_least(exact, _ML_DTYPES[spec.scale_dtype]))
  else:  # Within an ulp of it (the half range is rounded up before the division).
    ulp = 2.0**-22 if spec.scale_dtype == "float32" else 2.0**-7
    assert (scale <= exact * (1 + ulp)).all()

  deq = _np(quant.dequantize(r.q, spec, r.scale, r.zero))
  s = _per_element(scale, h)
  if spec.dtype.is_int:
    # Round to nearest: at most half a step, plus float32 arithmetic.
    bound = s / 2 * (1 + STEP_EPS)
    q = _np(r.q)
    assert ((q >= spec.qmin) & (q <= spec.qmax)).all()
  else:
    rel, half_sub = FP8_TOL[spec.dtype.value]
    bound = (rel * np.abs(x) + half_sub * s) * (1 + 2.0**-16)
  err = np.abs(deq - x)
  bad = err > bound
  assert not bad.any(), (
      f"{int(bad.sum())} of {x.size} exceed the bound; worst err/bound "
      f"{np.max(err / bound):.4f} at {tuple(np.argwhere(bad)[0])}")


@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16"])
def test_int8_matches_float64_reference(scale_dtype, rng):
  """Independent float64 symmetric int8: scale = amax / 127, q = round-half-even(x / scale)."""
  spec = QuantSpec("int8", scale_dtype=scale_dtype)
  x = kv_with_outliers(rng, (2, 16, 4, 64))
  # Magnitudes spread over 2**-20 .. 2**20 per token and head.
  x *= np.exp2(rng.integers(-20, 21, size=(2, 16, 4, 1))).astype(np.float32)
  r = quant.quantize(jnp.asarray(x), spec)

  amax = np.abs(_np(x)).max(-1, keepdims=True)
  scale_ref = amax / 127
  if scale_dtype == "float32":
    # One ulp at most, upwards: scale >= amax / 127, so nothing clips.
    assert_close(r.scale, scale_ref, atol=0, rtol=2.0**-23, name="scale")
    y = _np(x) / scale_ref
  else:
    # bf16 scales are rounded up to the next bf16 value: 8 bits of precision.
    assert_close(r.scale, scale_ref, atol=0, rtol=2.0**-7, name="scale")
    y = _np(x) / _np(r.scale)
  assert (_np(r.scale) >= scale_ref).all()
  q_ref = np.clip(np.round(y), -127, 127)  # np.round rounds half to even.
  # The f32 scale sits within an ulp above scale_ref: only near-ties may differ.
  tie = _ambiguous(y, np.round)
  q = _np(r.q)
  assert np.all((q == q_ref) | (tie & (np.abs(q - q_ref) == 1))), (
      f"{int((q != q_ref).sum())} mismatches, {int(tie.sum())} near ties")
  assert (q == q_ref).mean() > 0.999


@pytest.mark.parametrize("shape", [(2, 0, 4, 16), (1, 1, 1, 16)])  # No token; one value group.
@pytest.mark.parametrize("name", ["int4-asym-g16", "fp8_e4m3-head"])
def test_edge_shapes(name, shape, rng):
  spec = QuantSpec.parse(name)
  x = rng.standard_normal(shape).astype(np.float32)
  static = dict(scale=jnp.ones((shape[2], 1), jnp.float32)) if spec.static else {}
  r = _quantize(jnp.asarray(x), spec, **static)
  assert r.q.shape == r.saturated.shape == r.nonfinite.shape == shape
  if spec.dynamic:
    assert r.scale.shape == r.zero.shape == (*shape[:-1], 1)
  deq = _np(_dequantize(r.q, spec, r.scale, r.zero))
  assert deq.shape == shape and np.isfinite(deq).all()
  if x.size:
    assert np.abs(deq - x).max() <= np.abs(x).max() / 8


# --------------------------------------------------------- degenerate groups
@pytest.mark.parametrize("name", ["int8", "int4-asym", "int8-asym-sbf16", "fp8_e4m3", "fp8_e5m2-g4",
                                  "int4-g4-sbf16"])
def test_all_zero_group(name):
  spec = QuantSpec.parse(name)
  x = jnp.zeros((3, 8), jnp.float32)  # The shape of the next test: compiled ops are reused.
  r = quant.quantize(x, spec)
  scale = _np(r.scale)
  # The smallest normal, not 0 (0 would make x / scale NaN) and not subnormal
  # (flushed to 0 on TPU and on XLA CPU).
  assert np.isfinite(scale).all() and (scale >= F32_TINY).all()
  deq = quant.dequantize(r.q, spec, r.scale, r.zero)
  np.testing.assert_array_equal(deq, np.zeros((3, 8)))
  if spec.symmetric:
    np.testing.assert_array_equal(_np(r.q), 0)
  else:  # min = 0 lands on qmin, and the zero point is qmin: (q - zero) * scale = 0.
    np.testing.assert_array_equal(_np(r.q), spec.qmin)
    np.testing.assert_array_equal(_np(r.zero), spec.qmin)
  assert not np.asarray(r.saturated).any()


@pytest.mark.parametrize("name", ["int8-asym", "int4-asym", "int4-asym-sbf16", "int8"])
@pytest.mark.parametrize("value", [1e-40, -1e-40, 5.0, -3.3, 1e30, 1e-30])
def test_tiny_and_constant_groups(name, value):
  spec = QuantSpec.parse(name)
  x = np.zeros((3, 8), np.float32)
  x[0] = value  # Constant.
  x[2, ::2] = value  # Half constant, half zero: an ordinary group next to them.
  r = quant.quantize(jnp.asarray(x), spec)
  scale = _np(r.scale)
  assert np.isfinite(scale).all() and (scale >= F32_TINY).all()
  if r.zero is not None:
    # The scale floor (max |x| * 2**-16) bounds the zero point.
    assert np.isfinite(_np(r.zero)).all() and (np.abs(_np(r.zero)) <= 2**16 + 129).all()
  deq = _np(quant.dequantize(r.q, spec, r.scale, r.zero))
  assert np.isfinite(deq).all()
  # A constant group is reproduced to float32 precision: asymmetric scales are floored
  # at |x| * 2**-16, so x sits exactly on qmin and the zero point holds the offset.
  # Subnormal inputs may be flushed to 0 (an error below the smallest normal).
  assert_close(deq[0], x[0], atol=F32_TINY, rtol=2.0**-16, name="constant")
  np.testing.assert_array_equal(deq[1], 0.0)  # All zero: exactly 0.
  assert_close(deq[2], x[2], atol=float(scale[2, 0]) * 0.5 * (1 + STEP_EPS), name="mixed")
  assert not np.asarray(r.saturated).any()


def test_huge_finite_values():
  # |values| near the float32 max: the asymmetric range hi - lo would overflow.
  x = jnp.asarray([[3e38, -3e38, 0.0, 1e38], [3.4e38, 3.4e38, 3.4e38, 3.4e38]], jnp.float32)
  for name in ["int8", "int8-asym", "fp8_e4m3", "int4-asym-sbf16"]:
    spec = QuantSpec.parse(name)
    r = _quantize(x, spec)
    assert np.isfinite(_np(r.scale)).all(), name
    deq = _np(_dequantize(r.q, spec, r.scale, r.zero))
    assert np.isfinite(deq).all(), name
    s = _per_element(r.scale, 4)
    if spec.dtype.is_int:
      bound = s / 2 * (1 + STEP_EPS)
    else:
      bound = (FP8_TOL[spec.dtype.value][0] * np.abs(_np(x)) + s) * (1 + 2.0**-16)
    assert (np.abs(deq - _np(x)) <= bound).all(), name


# ------------------------------------------------------------- static scales
def _static_case(rng, granularity: str, qmax: float, k: int = 4, h: int = 64):
  """Data `[2, 16, K, H]` and a static scale that clips its largest values."""
  x = kv_with_outliers(rng, (2, 16, k, h))
  shape = {"tensor": (1, 1), "head": (k, 1), "channel": (k, h)}[granularity]
  axes = {"tensor": (0, 1, 2, 3), "head": (0, 1, 3), "channel": (0, 1)}[granularity]
  amax = np.abs(x).max(axis=axes).reshape(shape)
  # Calibrated on 60% of the range, so the top values saturate.
  return x, (0.6 * amax / (qmax * rng.uniform(0.8, 1, size=shape))).astype(np.float32)


@pytest.mark.parametrize("name", ["int8-tensor", "int8-head", "int8-channel", "int4-head",
                                  "int4-asym-channel", "int8-asym-tensor", "fp8_e4m3-head",
                                  "fp8_e5m2-channel", "fp8_e4m3-tensor-sbf16"])
def test_static_scales_match_reference(name, rng):
  spec = QuantSpec.parse(name)
  x, scale = _static_case(rng, spec.granularity.value, spec.qmax)
  zero = None
  if not spec.symmetric:
    zero = np.round(rng.uniform(-3, 3, size=scale.shape)).astype(np.float32)
  r = quant.quantize(jnp.asarray(x), spec, scale=jnp.asarray(scale),
                     zero=None if zero is None else jnp.asarray(zero))
  np.testing.assert_array_equal(r.scale, scale)  # Static: the scale passed in.

  y = _np(x) / _np(scale) + (0.0 if zero is None else _np(zero))
  if spec.dtype.is_int:
    def f(v):
      return np.clip(np.round(v), spec.qmin, spec.qmax)
    sat_ref = (np.round(y) > spec.qmax) | (np.round(y) < spec.qmin)
    amb = _ambiguous(y, np.round)
  else:
    def f(v):
      return _fp8_round(np.clip(v, -spec.qmax, spec.qmax), spec.dtype.value)
    sat_ref = np.abs(y) > spec.qmax
    amb = _ambiguous(y, f) | (np.abs(np.abs(y) - spec.qmax) < 1e-6 * spec.qmax)
  assert sat_ref.any() and (~sat_ref).any(), "the case should saturate some values, not all"
  assert amb.mean() < 1e-3
  q = _np(r.q)
  ok = amb | (q == f(y))
  assert ok.all(), f"{int((~ok).sum())} q differ from the reference, first {np.argwhere(~ok)[0]}"
  sat = np.asarray(r.saturated)
  assert ((sat == sat_ref) | amb).all(), f"saturated {int(sat.sum())} vs reference {int(sat_ref.sum())}"
  assert np.isfinite(_np(quant.dequantize(r.q, spec, r.scale, r.zero))).all()


@pytest.mark.parametrize("name, big", [("fp8_e4m3-tensor", 448.0), ("fp8_e5m2-tensor", 57344.0)])
def test_fp8_static_clips(name, big):
  spec = QuantSpec.parse(name)
  # With scale 1: 10 * max and 1e30 are beyond the range, max itself is not.
  x = jnp.asarray([[10 * big, -10 * big, big, -big, 1e30, 1.0]], jnp.float32)
  r = _quantize(x, spec, scale=jnp.ones((1, 1), jnp.float32))
  q = _np(r.q)
  assert np.isfinite(q).all(), "an out-of-range fp8 cast gives NaN/inf: values must be clipped"
  np.testing.assert_array_equal(q, [[big, -big, big, -big, big, 1.0]])
  np.testing.assert_array_equal(r.saturated, [[True, True, False, False, True, False]])
  assert not np.asarray(r.nonfinite).any()


def test_static_and_dynamic_scale_arguments():
  x = jnp.ones((2, 4, 8), jnp.float32)
  with pytest.raises(ValueError, match="int8-head has static scales: pass the calibrated scale"):
    quant.quantize(x, QuantSpec.parse("int8-head"))
  with pytest.raises(ValueError, match="do not pass scale"):
    quant.quantize(x, QuantSpec.parse("int8"), scale=jnp.ones((4, 1)))
  with pytest.raises(ValueError, match="do not pass scale or zero"):
    quant.quantize(x, QuantSpec.parse("int8-asym"), zero=jnp.ones((4, 1)))
  with pytest.raises(ValueError, match="zero must be given"):
    quant.quantize(x, QuantSpec.parse("int8-asym-head"), scale=jnp.ones((4, 1)))
  with pytest.raises(ValueError, match="zero must be None"):
    quant.quantize(x, QuantSpec.parse("int8-head"), scale=jnp.ones((4, 1)), zero=jnp.ones((4, 1)))
  with pytest.raises(ValueError, match="more dims"):
    quant.quantize(x, QuantSpec.parse("int8-head"), scale=jnp.ones((1, 1, 4, 1)))
  with pytest.raises(TypeError, match="x.dtype=int32"):
    quant.quantize(jnp.ones((4, 8), jnp.int32), QuantSpec.parse("int8"))
  with pytest.raises(ValueError, match="needs scale"):
    quant.dequantize(jnp.ones((4, 8), jnp.int8), QuantSpec.parse("int8"))
  with pytest.raises(ValueError, match="head_dim=12 is not a multiple of group_size=32"):
    quant.quantize(jnp.ones((4, 12)), QuantSpec.parse("int4-g32"))
  with pytest.raises(ValueError, match="dynamic spec"):
    quant.dynamic_scales(x, QuantSpec.parse("int8-tensor"))


# ------------------------------------------------------------ NaN / inf policy
_BAD = {(0, 1, 0, 3): np.nan, (0, 1, 1, 5): np.inf, (1, 2, 0, 0): -np.inf, (1, 2, 0, 6): np.nan}


@pytest.mark.parametrize("name", ["int8", "int4-asym-g16", "fp8_e4m3", "fp8_e5m2-g16-sbf16", "bf16",
                                  "int8-head", "int8-asym-sbf16"])
def test_nonfinite_policy(name, rng):
  spec = QuantSpec.parse(name)
  x0 = kv_with_outliers(rng, (2, 16, 4, 64))  # The grid's shape: compiled ops are reused.
  x = x0.copy()
  for idx, val in _BAD.items():
    x0[idx] = 0.0
    x[idx] = val
  static = {}
  if spec.static:
    static = dict(scale=jnp.asarray(np.abs(x0).max((0, 1, 3))[:, None] / 100, jnp.float32))
  r = quant.quantize(jnp.asarray(x), spec, **static)
  r0 = quant.quantize(jnp.asarray(x0), spec, **static)

  expected = np.zeros(x.shape, bool)
  for idx in _BAD:
    expected[idx] = True
  np.testing.assert_array_equal(r.nonfinite, expected)
  assert not np.asarray(r0.nonfinite).any()
  # Stored exactly as a 0 would be, and the rest of the token, its groups and the
  # other tokens are bit-identical to the all-finite input with zeros there.
  np.testing.assert_array_equal(_np(r.q), _np(r0.q))
  for a, b in ((r.scale, r0.scale), (r.zero, r0.zero)):
    if a is not None:
      np.testing.assert_array_equal(_np(a), _np(b))
  np.testing.assert_array_equal(r.saturated, r0.saturated)
  assert not np.asarray(r.saturated)[expected].any()

  deq = _np(quant.dequantize(r.q, spec, r.scale, r.zero))
  assert np.isfinite(deq).all()
  np.testing.assert_array_equal(deq[expected], 0.0)  # Integer zero points hold 0 exactly.
  if not spec.quantized:  # bf16 stores the finite values rounded to bf16.
    ref = x0.astype(ml_dtypes.bfloat16).astype(np.float64)
    np.testing.assert_array_equal(deq, ref)


def test_bf16_clips_beyond_its_range():
  # float32 max (3.40e38) is above bfloat16's (3.39e38): clipped and flagged, not inf.
  big = float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
  x = jnp.asarray([3.4e38, -3.4e38, big, 1.0], jnp.float32)
  r = _quantize(x, QuantSpec.parse("bf16"))
  assert r.scale is None and r.zero is None and r.q.dtype == jnp.bfloat16
  np.testing.assert_array_equal(_np(r.q), [big, -big, big, 1.0])
  np.testing.assert_array_equal(r.saturated, [True, True, False, False])


# -------------------------------------------------------------- validate_scale
@pytest.mark.parametrize("bad, count, index", [
    ([1.0, 0.0], 1, "(1,)"),
    ([[1.0, -2.0], [-1.0, 3.0]], 2, "(0, 1)"),
    ([np.nan, 1.0], 1, "(0,)"),
    ([1.0, 1.0, np.inf], 1, "(2,)"),
    ([-np.inf], 1, "(0,)"),
])
def test_validate_scale_rejects(bad, count, index):
  with pytest.raises(ValueError, match="k_scale must be finite and > 0") as e:
    quant.validate_scale("k_scale", jnp.asarray(bad, jnp.float32))
  assert f"{count} of {np.size(bad)} entries" in str(e.value)
  assert f"first at index {index}" in str(e.value)


def test_validate_scale_accepts():
  quant.validate_scale("v_scale", np.array([1e-30, 2.0, 3e30]))
  quant.validate_scale("k_zero", np.array([0.0, -5.0, 7.0]), is_zero=True)
  for bad in (np.nan, np.inf, -np.inf, 0.5, 2.0**25):
    with pytest.raises(ValueError, match=r"k_zero must be finite integers .*index \(1,\)"):
      quant.validate_scale("k_zero", np.array([0.0, bad]), is_zero=True)
  # Traced values cannot be checked here (the cache checks shapes): no error.
  jax.jit(lambda s: quant.validate_scale("s", s) or s)(jnp.zeros((2,)))


# ------------------------------------------------------- golden round trip
# Relative Frobenius error ||deq - x|| / ||x|| on fixed [2, 64, 4, 128] float32
# tensors from np.random.default_rng(1234): GOLDEN with outlier channels (50x) and
# tokens (20x) (`kv_with_outliers`), GOLDEN_GAUSSIAN plain standard normal. These
# are the formats' own error; a change to the math that moves one must update it
# here on purpose.
GOLDEN = {
    "bf16": 0.0015196,
    "int8": 0.0233709,
    "int4": 0.167031,
    "fp8_e4m3": 0.00923777,
    "fp8_e5m2": 0.0218861,
    "int8-asym": 0.014973,
    "int4-asym": 0.156748,
    "int4-g32": 0.101605,
}
GOLDEN_GAUSSIAN = {
    "bf16": 0.00165063,
    "int8": 0.00649038,
    "int4": 0.117317,
    "fp8_e4m3": 0.0256368,
    "fp8_e5m2": 0.051678,
    "int8-asym": 0.005913,
    "int4-asym": 0.100197,
    "int4-g32": 0.0967064,
}
GOLDEN_RTOL = 0.02


def _round_trip_errors(x: np.ndarray, names) -> dict[str, float]:
  out = {}
  for name in names:
    spec = QuantSpec.parse(name)
    r = quant.quantize(jnp.asarray(x), spec)
    deq = _np(quant.dequantize(r.q, spec, r.scale, r.zero))
    out[name] = float(np.linalg.norm(deq - x) / np.linalg.norm(x))
  return out


def _check_golden(errors: dict[str, float], golden: dict[str, float], table: str) -> None:
  moved = {n: (errors[n], golden[n]) for n in golden
           if not np.isclose(errors[n], golden[n], rtol=GOLDEN_RTOL, atol=0)}
  assert not moved, (
      f"golden figure moved: if the change is intended, update {table} in tests/test_quant.py; "
      + ", ".join(f"{n}: got {got:.6g}, pinned {want:.6g}" for n, (got, want) in moved.items()))


def test_golden_round_trip_errors():
  e = _round_trip_errors(kv_with_outliers(np.random.default_rng(1234), (2, 64, 4, 128)), GOLDEN)
  _check_golden(e, GOLDEN, "GOLDEN")
  assert e["bf16"] < min(v for n, v in e.items() if n != "bf16")
  assert e["int8"] < e["int4"] and e["fp8_e4m3"] < e["fp8_e5m2"]
  assert e["int8-asym"] < e["int8"]  # 255 steps over [min, max] instead of 2 * 127.
  # An integer zero point stores the small values beside an outlier exactly as
  # symmetric does, on a finer step.
  assert e["int4-asym"] < e["int4"]
  assert e["int4-g32"] < e["int4"]  # Groups of 32 keep the outlier channels' step local.
  # The outlier channels set the integer step of their whole token and head, while
  # fp8 keeps ~3 mantissa bits of every value: here fp8_e4m3 beats int8 (on
  # well-behaved data below it is the other way round).
  assert e["fp8_e4m3"] < e["int8"]


def test_golden_round_trip_errors_gaussian():
  x = np.random.default_rng(1234).standard_normal((2, 64, 4, 128)).astype(np.float32)
  e = _round_trip_errors(x, GOLDEN_GAUSSIAN)
  _check_golden(e, GOLDEN_GAUSSIAN, "GOLDEN_GAUSSIAN")
  # Without outliers uniform integer steps win: 8 bits beat fp8's 3 or 2 mantissa bits.
  assert e["bf16"] < e["int8"] < e["fp8_e4m3"] < e["fp8_e5m2"]
  assert e["int8"] < e["int4"] and e["int8-asym"] < e["int8"]
  assert e["int4-asym"] < e["int4"] and e["int4-g32"] < e["int4"]


# ------------------------------------------------------------------------- jit
@pytest.mark.parametrize("name", ["int8", "int4-asym-g16", "fp8_e4m3-sbf16", "fp8_e5m2", "bf16",
                                  "int8-channel"])
def test_jit_matches_eager(name, rng):
  spec = QuantSpec.parse(name)
  x = jnp.asarray(kv_with_outliers(rng, (2, 16, 4, 64)))
  static = {}
  if spec.static:
    static = dict(scale=jnp.asarray(rng.uniform(0.1, 1, (4, 64)), jnp.float32))
  eager = quant.quantize(x, spec, **static)
  jitted = jax.jit(quant.quantize, static_argnums=1)(x, spec, **static)
  for a, b in zip(eager, jitted, strict=True):
    if a is None:
      assert b is None
    else:
      assert a.dtype == b.dtype
      np.testing.assert_array_equal(_np(a), _np(b))
  deq = jax.jit(quant.dequantize, static_argnums=1)(eager.q, spec, eager.scale, eager.zero)
  np.testing.assert_array_equal(_np(deq), _np(quant.dequantize(eager.q, spec, eager.scale,
                                                               eager.zero)))


def test_jit_matches_eager_at_exact_tie():
  # A token found by search: one of its values lands on an exact rounding tie in float32.
  # Computed as x * (1 / scale) + zero with a fractional zero point, XLA CPU contracted
  # that into a fused multiply-add under jit (not eagerly) and broke the tie the other
  # way; the integer zero point is now added after rounding. Kept as a regression test.
  x = np.random.default_rng(0).standard_normal((64, 64, 8, 128)).astype(np.float32)[22, 32, :1]
  spec = QuantSpec.parse("int8-asym")
  eager = quant.quantize(jnp.asarray(x), spec)
  jitted = _quantize(jnp.asarray(x), spec)
  np.testing.assert_array_equal(_np(jitted.q), _np(eager.q))
  np.testing.assert_array_equal(_np(jitted.zero), _np(eager.zero))


# ------------------------------------------------------------ calibrated clip ratios
@pytest.mark.parametrize("name", ["int8", "int4", "fp8_e4m3", "fp8_e5m2", "int4-g8", "int8-asym",
                                  "int4-asym-g8", "int8-sbf16"])
def test_clip_ratio_narrows_each_scale_and_flags_what_it_clips(name, rng):
  spec = QuantSpec.parse(name)
  x = kv_with_outliers(rng, (2, 7, 3, 16))
  clip = np.array([0.3, 1.0, 0.75], np.float32)  # per kv head
  res = quant.quantize(jnp.asarray(x), spec, clip=clip)
  # The scale is the one rule applied to the narrowed range of each group.
  g = spec.num_groups(16)
  xg = x.reshape(2, 7, 3, g, -1).astype(np.float64)
  c = clip[:, None].astype(np.float32)
  if spec.symmetric:
    amax = np.abs(xg).max(-1).astype(np.float32)
    lo, hi = -amax * c, amax * c
  else:
    lo, hi = xg.min(-1).astype(np.float32) * c, xg.max(-1).astype(np.float32) * c
  want_scale, want_zero = quant.scales_for_range(lo, hi, spec)
  np.testing.assert_array_equal(res.scale, want_scale)
  if want_zero is not None:
    np.testing.assert_array_equal(res.zero, want_zero)
  # Saturated: exactly the values outside the narrowed range that the grid cannot hold.
  s = np.repeat(np.asarray(res.scale, np.float64), 16 // g, -1)
  z = 0.0 if res.zero is None else np.repeat(np.asarray(res.zero, np.float64), 16 // g, -1)
  y = x.astype(np.float64) / s
  outside = (x > np.repeat(hi, 16 // g, -1)) | (x < np.repeat(lo, 16 // g, -1))
  if spec.dtype.is_int:
    beyond = (np.round(y) + z > spec.qmax) | (np.round(y) + z < spec.qmin)
  else:
    beyond = np.abs(y) > spec.qmax
  np.testing.assert_array_equal(res.saturated, beyond & outside)
  assert res.saturated[:, :, 1].sum() == 0  # clip 1: nothing clips.
  assert res.saturated[:, :, 0].sum() > 0  # clip 0.3 of N(0, 1) with outliers: plenty.
  # Clipped values dequantize to the edge of the grid; the rest keep the scale/2 bound.
  deq = np.asarray(quant.dequantize(res.q, spec, res.scale, res.zero), np.float64)
  inside = ~np.asarray(res.saturated)
  if spec.dtype.is_int:
    assert (np.abs(deq - x)[inside] <= s[inside] / 2 * (1 + 1e-6)).all()
  # clip=1 is plain absmax, bit for bit.
  plain, ones = quant.quantize(jnp.asarray(x), spec), quant.quantize(jnp.asarray(x), spec, clip=1.0)
  np.testing.assert_array_equal(plain.q.astype(jnp.float32), ones.q.astype(jnp.float32))
  np.testing.assert_array_equal(plain.scale, ones.scale)
  assert not np.asarray(ones.saturated).any()


def test_clip_ratio_errors():
  x = jnp.ones((2, 3, 4))
  with pytest.raises(ValueError, match="clip is for dynamic specs"):
    quant.quantize(x, QuantSpec.parse("int8-head"), scale=jnp.ones((3, 1)), clip=0.5)
  with pytest.raises(ValueError, match="dynamic_scales needs a dynamic spec"):
    quant.dynamic_scales(x, QuantSpec.parse("int8-head"), clip=0.5)
  for bad in (0.0, 1.5, float("nan"), -0.2):
    with pytest.raises(ValueError, match=r"clip must be clip ratios in \(0, 1\]"):
      quant.quantize(x, QuantSpec.parse("int8"), clip=jnp.full((3,), bad))
  with pytest.raises(ValueError, match=r"clip of shape \(4,\) does not broadcast"):
    quant.quantize(x, QuantSpec.parse("int8"), clip=jnp.full((4,), 0.5))


# ---------------------------------------------------------------- fake_quantize
def _round_trip(x, spec, **params):
  res = quant.quantize(x, spec, **params)
  return quant.dequantize(res.q, spec, res.scale, res.zero)


@pytest.mark.parametrize("name, params", [
    ("int8", {}), ("int4-asym-g16", {}), ("fp8_e4m3-sbf16", {}), ("fp8_e5m2", {}), ("bf16", {}),
    ("int4", {"clip": 0.6}), ("int8-asym", {"clip": 0.3}), ("fp8_e4m3-g8", {"clip": 0.5}),
    ("int8-head", {"scale": 0.02}), ("int4-asym-channel", {"scale": 0.3, "zero": 2.0}),
    ("fp8_e4m3-tensor", {"scale": 1e-3}),
])
def test_fake_quantize_forward_is_the_round_trip(name, params, rng):
  # Outliers, NaN and inf included; static scales small enough that values saturate.
  spec = QuantSpec.parse(name)
  x = kv_with_outliers(rng, (3, 5, 2, 32)).astype(np.float32)
  x[0, 1, 0, 3], x[2, 0, 1, 7], x[1, 4, 1, 0] = np.nan, np.inf, -np.inf
  if spec.static:
    shape = quant.static_scale_shape(spec, 2, 32)
    params = {k: np.full(shape, v, np.float32) for k, v in params.items()}
  x = jnp.asarray(x)
  for fn in (quant.fake_quantize, jax.jit(quant.fake_quantize, static_argnums=1)):
    got = fn(x, spec, **params)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, _round_trip(x, spec, **params))


def test_fake_quantize_gradients_are_straight_through_by_hand(rng):
  # Static int8, one scale s: d/ds sum(fake(x)) = sum(round(x/s) - x/s) over values
  # inside the range, + sum(+-127) over values clipped to it; d/dx = 1 inside, 0 clipped.
  spec = QuantSpec.parse("int8-tensor")
  x = rng.standard_normal((4, 3, 1, 16)).astype(np.float32) * 3
  s = np.float32(0.05)  # 127 * 0.05 = 6.35: the 3-sigma tail saturates.
  gs, gx = jax.grad(lambda s, x: jnp.sum(quant.fake_quantize(x, spec, scale=s)), (0, 1))(
      jnp.full((1, 1), s), jnp.asarray(x))
  y = x.astype(np.float64) / np.float64(s)
  inside = np.abs(np.round(y)) <= 127  # Clipped: the stored integer would pass 127.
  assert 0 < (~inside).sum() < x.size
  want_s = np.sum(np.where(inside, np.round(y) - y, np.sign(y) * 127))
  np.testing.assert_allclose(float(gs.sum()), want_s, rtol=1e-4)
  np.testing.assert_array_equal(np.asarray(gx), inside.astype(np.float32))


@pytest.mark.parametrize("name", ["int8", "int4-g8", "fp8_e4m3"])
def test_fake_quantize_clip_gradient_by_hand(name, rng):
  # Dynamic symmetric: s = c * amax / qmax per group, so d/dc sum(fake(x)) =
  # sum over values of d(out)/ds * amax / qmax, with d(out)/ds = round(y) - y inside
  # the range (ints; fp8 casts pass straight through: 0) and +-qmax where clipped;
  # an integer is clipped when round(y) is beyond qmax (as `quantize` stores it).
  spec = QuantSpec.parse(name)
  x = kv_with_outliers(rng, (2, 3, 2, 16)).astype(np.float32)
  c = np.array([0.4, 0.9], np.float32)
  grad = jax.grad(lambda c: jnp.sum(quant.fake_quantize(jnp.asarray(x), spec, clip=c)))(
      jnp.asarray(c))
  g = spec.num_groups(16)
  xg = x.astype(np.float64).reshape(2, 3, 2, g, 16 // g)
  amax = np.abs(xg).max(-1, keepdims=True)
  s = c.astype(np.float64)[None, None, :, None, None] * amax / spec.qmax
  y = xg / s
  inside = np.abs(np.round(y) if spec.dtype.is_int else y) <= spec.qmax
  assert 0 < (~inside).sum() < inside.size
  ds = np.where(inside, (np.round(y) - y) if spec.dtype.is_int else 0.0, np.sign(y) * spec.qmax)
  want = (ds * amax / spec.qmax).sum(axis=(0, 1, 3, 4))
  np.testing.assert_allclose(np.asarray(grad), want, rtol=2e-3, atol=1e-3)


# ---------------------------------------------------------- non-uniform codes
def _normal_cell_mean(lo: float, hi: float) -> float:
  """E[X | lo < X <= hi] for X ~ N(0, 1), by float64 quadrature on a fine grid."""
  t = np.linspace(max(lo, -12.0), min(hi, 12.0), 200_001)
  w = np.exp(-t * t / 2)
  return float(np.trapezoid(t * w, t) / np.trapezoid(w, t))


@pytest.mark.parametrize("bits", [2, 4])
def test_lloyd_max_levels_are_the_normal_optimum(bits):
  # Lloyd's two conditions, checked independently by quadrature: each threshold is the
  # midpoint of its levels, each level the mean of N(0, 1) over its cell.
  levels = np.asarray(quant.lloyd_max_levels(bits), np.float64)
  assert len(levels) == 2**bits and np.all(np.diff(levels) > 0)
  np.testing.assert_allclose(levels, -levels[::-1], atol=0)  # Symmetric about 0.
  cuts = np.concatenate([[-np.inf], (levels[1:] + levels[:-1]) / 2, [np.inf]])
  means = [_normal_cell_mean(a, b) for a, b in itertools.pairwise(cuts)]
  np.testing.assert_allclose(levels, means, atol=2e-6)
  # The published tables (Max, 1960).
  published = {2: [0.4528, 1.510], 4: [0.1284, 0.3881, 0.6568, 0.9424, 1.256, 1.618, 2.069, 2.733]}
  np.testing.assert_allclose(levels[2**(bits - 1):], published[bits], atol=6e-4)


def test_lloyd_max_levels_refuse_untabulated_bits():
  with pytest.raises(ValueError, match="bits=8"):
    quant.lloyd_max_levels(8)


def _np_nu_round_trip(x: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """float64 reference of a `nu` spec: per group the RMS (finite values, NaN/inf as 0)
  in the scale dtype, the nearest level's index, and level * scale."""
  levels = np.asarray(quant.codebook(spec), np.float64)
  xs = np.where(np.isfinite(x), x, 0.0).astype(np.float64)
  g = spec.num_groups(x.shape[-1])
  xg = xs.reshape(*x.shape[:-1], g, -1)
  rms = np.sqrt(np.mean(xg * xg, axis=-1))
  tiny = float(jnp.finfo(spec.scale_jnp_dtype).tiny)
  scale = _np(np.maximum(rms, tiny).astype(_ML_DTYPES[spec.scale_dtype]))
  y = xg / scale[..., None]
  idx = np.argmin(np.abs(y[..., None] - levels), axis=-1)
  return idx.reshape(x.shape), scale, (levels[idx] * scale[..., None]).reshape(x.shape)


@pytest.mark.parametrize("name", ["int2-nu-rot", "int4-nu-rot", "int2-nu-g16-sbf16-rot",
                                  "int4-nu-g32-sbf16-rot"])
def test_nonuniform_matches_float64_reference(name, rng):
  spec = QuantSpec.parse(name)
  x = kv_with_outliers(rng, (3, 40, 2, 64)).astype(np.float32)
  x[0, 1, 0, 3], x[2, 0, 1, 7], x[1, 4, 1, 0] = np.nan, np.inf, -np.inf
  x[1, 2, 0] = 0.0  # An all-zero token and head.
  res = _quantize(jnp.asarray(x), spec)
  idx, scale, back = _np_nu_round_trip(x, spec)
  assert res.q.dtype == spec.storage_dtype and res.zero is None
  np.testing.assert_allclose(_np(res.scale), scale, rtol=1e-6)
  # The nearest level, except where float32 y sits within rounding of a threshold (an
  # exact tie, such as 0 between +-0.4528, goes to the lower level in both).
  levels = np.asarray(quant.codebook(spec))
  y = np.where(np.isfinite(x), x, 0) / _per_element(res.scale, 64)
  gap = np.min(np.abs(y[..., None] - (levels[1:] + levels[:-1]) / 2), axis=-1)
  near_cut = (gap > 0) & (gap < 1e-5)
  got_idx = _np(res.q) - spec.qmin
  np.testing.assert_array_equal(np.where(near_cut, idx, got_idx), idx)
  assert near_cut.mean() < 1e-3
  deq = _np(_dequantize(res.q, spec, res.scale, None))
  # atol: the all-zero token's levels times the smallest normal scale are subnormal,
  # which XLA may flush to 0.
  np.testing.assert_allclose(np.where(near_cut, back, deq), back, rtol=1e-6, atol=1e-37)
  assert not np.asarray(res.saturated).any()
  np.testing.assert_array_equal(np.asarray(res.nonfinite), ~np.isfinite(x))
  assert (np.abs(deq[1, 2, 0]) < 1e-37).all()  # All zero: the smallest scale, so ~0.


@pytest.mark.parametrize("name", ["int4-nu-rot", "int2-nu-sbf16-rot"])
@pytest.mark.parametrize("magnitude", [1e20, 1e38, 1e-25, 1e-36])
def test_nonuniform_scales_neither_overflow_nor_underflow(name, magnitude, rng):
  # Squaring first would overflow above ~1.8e19 (scale inf, every value -inf, nothing
  # flagged) and flush to 0 below ~1e-19 (every value on an outer level).
  spec = QuantSpec.parse(name)
  x = rng.standard_normal((3, 64)) * (magnitude / 4)
  res = _quantize(jnp.asarray(x, jnp.float32), spec)
  deq = _np(_dequantize(res.q, spec, res.scale, None))
  assert np.isfinite(_np(res.scale)).all() and np.isfinite(deq).all()
  xs = _np(jnp.asarray(x, jnp.float32))
  rms = np.sqrt(np.mean(xs**2, axis=-1, keepdims=True))
  np.testing.assert_allclose(_np(res.scale), rms, rtol=2**-7)  # bf16 scales: 8 bits.
  err = np.sum((deq - xs) ** 2) / np.sum(xs**2)
  assert err < (0.2 if "int2" in name else 0.02), err


@pytest.mark.parametrize("name, closed_form", [("int2-nu-rot", 0.1175), ("int4-nu-rot", 0.009497)])
def test_nonuniform_error_on_normal_data_is_lloyd_max(name, closed_form, rng):
  # On normal data the relative squared error is Max's distortion of the code (plus
  # the small cost of estimating each token's RMS from 128 values), well below the
  # uniform grids of the same bits at absmax scales.
  spec = QuantSpec.parse(name)
  x = rng.standard_normal((64, 4, 128)).astype(np.float32)
  res = _quantize(jnp.asarray(x), spec)
  err = float(np.sum((_np(_dequantize(res.q, spec, res.scale, None)) - x) ** 2) / np.sum(_np(x) ** 2))
  assert closed_form * 0.95 < err < closed_form * 1.05, err
  uniform = QuantSpec.parse(name.replace("-nu", ""))
  r = _quantize(jnp.asarray(x), uniform)
  err_uniform = float(np.sum((_np(_dequantize(r.q, uniform, r.scale, None)) - x) ** 2)
                      / np.sum(_np(x) ** 2))
  assert err < 0.7 * err_uniform, (err, err_uniform)


@pytest.mark.parametrize("name", ["int2-nu-rot", "int4-nu-g16-sbf16-rot"])
def test_every_stored_value_decodes_to_its_level(name):
  spec = QuantSpec.parse(name)
  levels = np.asarray(quant.codebook(spec), np.float32)
  q = jnp.arange(spec.qmin, spec.qmax + 1, dtype=jnp.int32).astype(spec.storage_dtype)
  q = jnp.tile(q, 16 // len(levels) * 4)[None, :]  # [1, H]: H a multiple of the group.
  scale = jnp.full((1, spec.num_groups(q.shape[-1])), 2.0, spec.scale_jnp_dtype)
  np.testing.assert_array_equal(quant.dequantize(q, spec, scale),
                                2.0 * np.tile(levels, q.shape[-1] // len(levels))[None, :])


def test_nonuniform_takes_no_clip():
  spec = QuantSpec.parse("int2-nu-rot")
  x = jnp.ones((2, 3, 8))
  for fn in (quant.quantize, quant.dynamic_scales, quant.fake_quantize):
    with pytest.raises(ValueError, match="scales each token by its RMS"):
      fn(x, spec, clip=0.5)
  with pytest.raises(ValueError, match="computes its scales on write"):
    quant.quantize(x, spec, scale=jnp.ones((2, 3, 1)))


def test_nonuniform_fake_quantize_is_the_round_trip_and_passes_gradients(rng):
  spec = QuantSpec.parse("int4-nu-g16-rot")
  x = jnp.asarray(kv_with_outliers(rng, (3, 5, 2, 32)), jnp.float32)
  res = quant.quantize(x, spec)
  np.testing.assert_array_equal(quant.fake_quantize(x, spec),
                                quant.dequantize(res.q, spec, res.scale))
  g = jax.grad(lambda x: jnp.sum(quant.fake_quantize(x, spec)))(x)
  np.testing.assert_array_equal(g, np.ones(x.shape, np.float32))
