"""Reference quantization math: the single source of truth for what a stored value means.

Convention, for every format: a stored value `q` with scale `s` and zero point `z`
means `x = (q - z) * s` (symmetric specs have no zero point: `x = q * s`); bf16
storage is the value itself.

Quantizing (`quantize`):
  * `y = x * (1 / scale)` in float32: a multiplication by the reciprocal, which is
    what XLA makes of a division under jit anyway.
  * Integers store `round(y) + zero`: round to nearest (ties to even), then the
    integer zero point, clipped to `[qmin, qmax]`: int8 `[-127, 127]`, int4
    `[-7, 7]` symmetric; `[-128, 127]`, `[-8, 7]` asymmetric. Rounding before the
    integer offset is exact and leaves XLA no multiply-add to fuse differently
    under jit and eagerly, and it bounds the error by `scale / 2` in both schemes.
  * fp8 values are clipped to the format's finite range before the cast, because an
    out-of-range cast gives NaN (e4m3fn) or inf (e5m2); the cast rounds to nearest.
  * Dynamic scales are computed per token and group from the finite values: the
    smallest value of the scale dtype that is >= `amax / qmax` (symmetric) or
    `(max - min) / (qmax - qmin)` (asymmetric, up to an ulp), exactly, whatever the
    backend's division does. So no value of the group is clipped by the rounding of
    its own scale beyond half a step: under dynamic scales the `saturated` mask is
    all False, and any clipping reported by the cache comes from static scales that
    the data outgrew.
  * Calibrated clipping (`clip`, dynamic specs only): a ratio `c` in (0, 1] per
    token and kv head narrows the range each scale covers to `c * amax`
    (asymmetric: `[c * min, c * max]`), trading the clipping of the few largest
    values for a finer grid for all others. Values beyond the narrowed range are
    clipped and reported in `saturated`; `c = 1` (or no clip) is plain absmax.
  * An all-zero (or tiny) group gets a safe finite scale: the scale dtype's smallest
    normal number (symmetric), so every value quantizes to 0 and dequantizes to 0.
    Asymmetric scales are floored at `max(|min|, |max|) * 2**-16` as well, which
    bounds the zero point (|z| <= 2**16 + 128) so that it stays exact in float32.
  * Asymmetric zero points are integers, `z = qmin - round(min / scale)`: 0, and
    the values much smaller than a step (the bulk of K/V beside an outlier
    channel), are stored exactly, where a fractional zero point gives them a
    uniform half-step error. The range spans all `qmax - qmin` steps: rounding the
    zero point moves the grid by less than half a step, so the range's ends land
    within half a step of `qmin` and `qmax`, and clipping them to the grid errs by
    at most half a step, as rounding does everywhere (at 2 bits a spare step for a
    floored zero point would cost a third of the grid). Zero points are float32
    whatever the scale dtype (bfloat16 is not exact above 256); static zero points
    must be integers too.

Fake quantization (`fake_quantize`): `dequantize(quantize(x))` as one differentiable
function for learning scales and clip ratios. Its forward value IS that round trip
(the same `quantize`, bit for bit); its gradient is that of a smooth surrogate
with the same scale rule, where rounding (and the cast to fp8) passes the gradient
straight through and clipping to the storage range stops it: the scale (static
specs) or the clip ratio (dynamic specs) gets the usual straight-through
estimate, each group's data range none.

Non-uniform codes (`nu` specs, `QuantSpec.nonuniform`): the scale of a token (and
group) is the RMS of its finite values (the smallest normal number for an all-zero
group), and the stored integer `q` indexes the codebook `codebook(spec)`, the
`2**bits` Lloyd-Max levels of a standard normal in ascending order: `x = levels[q -
qmin] * s`. Quantizing picks the nearest level (a value exactly between two goes
to the lower). Rotated coordinates of a token are close to normal with the token's
RMS as deviation, for which these are the levels of least squared error: for
Gaussian data, 0.1175 of the variance at 2 bits against 0.190 for the ternary
symmetric grid at its best scale. The outermost cells are unbounded by design (a
Lloyd-Max quantizer has no clipping range), so `saturated` is all False and the
error is not bounded by half a step; such specs take no clip ratios.

NaN / inf policy. A non-finite value in incoming K or V is taken as 0 (stored as 0; a
`nu` spec, which has no level at 0, stores the level just below it) and reported in
the `nonfinite` mask (the cache counts it per layer). It is excluded from its group's
scale, so the finite values of the same token and head are quantized exactly as if it
were 0; other tokens, heads and sequences are untouched. bf16 storage follows the
same policy. Finite values beyond the bf16 range are clipped.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kvtpu.formats import Granularity, QuantSpec

__all__ = ["Quantized", "quantize", "dequantize", "fake_quantize", "straight_through",
           "dynamic_scales", "validate_scale", "validate_clip", "ZERO_DTYPE", "codebook",
           "lloyd_max_levels"]

ZERO_DTYPE = jnp.float32
# Asymmetric scales are at least this fraction of the group's largest magnitude.
_ASYM_SCALE_FLOOR = 2.0**-16


@functools.cache
def lloyd_max_levels(bits: int) -> tuple[float, ...]:
  """The `2**bits` Lloyd-Max reconstruction levels of a standard normal, ascending.

  The fixed point of Lloyd's conditions, each threshold the midpoint of its two
  levels and each level the mean of N(0, 1) over its cell, iterated in float64
  from a uniform start until nothing moves; the levels are then rounded to float32
  (what the kernels decode to). 2 bits: +-0.4528, +-1.5104; 4 bits: +-0.1284 ...
  +-2.7326 (Max, 1960).
  """
  if bits not in (1, 2, 3, 4):
    raise ValueError(f"Lloyd-Max levels are for codes of 1 to 4 bits, got bits={bits}")
  n = 2**bits
  pdf = lambda t: math.exp(-t * t / 2) / math.sqrt(2 * math.pi)  # noqa: E731
  cdf = lambda t: 0.5 * (1 + math.erf(t / math.sqrt(2)))  # noqa: E731
  levels = [(i + 0.5 - n / 2) * 4 / n for i in range(n)]
  for _ in range(10_000):
    cuts = [-math.inf, *((a + b) / 2 for a, b in itertools.pairwise(levels)), math.inf]
    new = [(pdf(lo) - pdf(hi)) / (cdf(hi) - cdf(lo)) for lo, hi in itertools.pairwise(cuts)]
    done = max(abs(a - b) for a, b in zip(new, levels, strict=True)) < 1e-15
    levels = new
    if done:
      break
  return tuple(float(np.float32(x)) for x in levels)


def codebook(spec: QuantSpec) -> tuple[float, ...] | None:
  """The levels a `nu` spec's stored integers index (`q - qmin`), ascending; None for
  every other spec."""
  return lloyd_max_levels(spec.dtype.bits) if spec.nonuniform else None


def _nearest_level(y: jax.Array, levels: tuple[float, ...]) -> jax.Array:
  """Index of the level nearest to each `y` (ties to the lower), as float32."""
  idx = jnp.zeros(y.shape, jnp.float32)
  for a, b in itertools.pairwise(levels):
    idx = idx + (y > np.float32((a + b) / 2)).astype(jnp.float32)
  return idx


def _rms_scales(x: jax.Array, spec: QuantSpec) -> jax.Array:
  """Per group of `x: [..., H]` (finite, float32): its RMS in the scale dtype, at least
  the smallest normal number and at most the largest finite one.

  Computed as `amax * rms(x / amax)`: squaring first overflows float32 for values above
  ~1.8e19 and flushes to 0 below ~1e-19."""
  xg = _grouped(x, spec.num_groups(x.shape[-1]))
  info = jnp.finfo(spec.scale_jnp_dtype)
  amax = jnp.maximum(jnp.max(jnp.abs(xg), axis=-1, keepdims=True), float(info.tiny))
  u = xg / amax
  rms = amax[..., 0] * jnp.sqrt(jnp.mean(u * u, axis=-1))
  return jnp.clip(rms, float(info.tiny), float(info.max)).astype(spec.scale_jnp_dtype)


class Quantized(NamedTuple):
  """Result of `quantize`.

  Attributes:
    q: stored values, `x.shape`, in the spec's storage dtype.
    scale: the scales used. Per-token: `[..., G]` (G groups along H), in the scale
      dtype; token-grouped: `[..., 1, H]`, one per channel of each group of positions.
      Static: the scale passed in. bf16: None.
    zero: zero points like `scale` (float32), or None when symmetric.
    saturated: bool `x.shape`, values clipped to the storage range: static scales
      that the data outgrew, values beyond a calibrated clip ratio, or values
      beyond the bf16 range. All False under unclipped dynamic scales.
    nonfinite: bool `x.shape`, NaN/inf inputs (stored as 0).
  """

  q: jax.Array
  scale: jax.Array | None
  zero: jax.Array | None
  saturated: jax.Array
  nonfinite: jax.Array


def _round_up_to(x: jax.Array, dtype) -> jax.Array:
  """Casts float32 `x` to `dtype`, never rounding below `x`."""
  y = x.astype(dtype)
  if jnp.dtype(dtype) == jnp.float32:
    return y
  return jnp.where(y.astype(jnp.float32) < x, jnp.nextafter(y, jnp.asarray(jnp.inf, dtype)), y)


_INF32 = float("inf")


def _covers(r: jax.Array, num: jax.Array, den: float) -> jax.Array:
  """Exactly `r * den >= num`, for float32 `r, num >= 0` and `den` of <= 12 significant bits.

  With `r = hi + lo`, `hi` the top 12 bits of `r`, the products `hi * den` and
  `lo * den` are exact and so is `num - hi * den` (Sterbenz, `r` being near
  `num / den`). Exact unless the terms are subnormal (`num` below ~2**-100), which
  may flush to 0.
  """
  bits = jax.lax.bitcast_convert_type(r, jnp.uint32) & jnp.uint32(0xFFFFF000)
  hi = jax.lax.bitcast_convert_type(bits, jnp.float32)
  return num - hi * den <= (r - hi) * den


def _div_up(num: jax.Array, den: float) -> jax.Array:
  """The smallest float32 `r` with `r * den >= num`: `num / den` rounded up.

  For `num >= 0` and a constant `den` of at most 12 significant bits (every qmax and
  half of qmax - qmin is). XLA does not always round a division correctly (on CPU
  it multiplies by `1 / den`, off by an ulp either way), and a scale an ulp below
  `amax / qmax` puts `amax / scale` above qmax, which fp8 flags as saturated. So the
  quotient is checked exactly and moved by an ulp, up then down, twice each: the
  result does not depend on how the backend divides.
  """
  r = num / den
  for _ in range(2):
    r = jnp.where(_covers(r, num, den), r, jnp.nextafter(r, _INF32))
  for _ in range(2):
    down = jnp.nextafter(r, 0.0)
    r = jnp.where(_covers(down, num, den), down, r)
  return r


def _half_range_up(lo: jax.Array, hi: jax.Array) -> jax.Array:
  """float32 `(hi - lo) / 2` rounded up; halving first cannot overflow."""
  a, b = hi * 0.5, lo * -0.5
  s = a + b
  # TwoSum: `err` is exactly (a + b) - s.
  bp = s - a
  err = (a - (s - bp)) + (b - bp)
  return jnp.where(err > 0, jnp.nextafter(s, _INF32), s)


def _grouped(x: jax.Array, num_groups: int) -> jax.Array:
  """[..., H] -> [..., G, H/G]."""
  return x.reshape(*x.shape[:-1], num_groups, x.shape[-1] // num_groups)


def scales_for_range(lo: jax.Array, hi: jax.Array, spec: QuantSpec
                     ) -> tuple[jax.Array, jax.Array | None]:
  """The smallest scale (and integer zero point) whose grid covers `[lo, hi]`.

  The one rule behind dynamic scales and calibrated static ones: symmetric specs
  cover `max(|lo|, |hi|)` (`scale >= amax / qmax`, rounded up in the scale dtype);
  asymmetric integer specs spread `[lo, hi]` over all `qmax - qmin` steps, with the
  integer zero point that puts `lo` within half a step of `qmin`. A zero range gets
  the smallest normal scale, never 0.

  Args:
    lo, hi: elementwise bounds (`lo <= 0 <= hi` is not required), any shape.
    spec: a quantized spec.

  Returns:
    `scale` in the spec's scale dtype and `zero` float32 (None when symmetric),
    shaped like `lo`.
  """
  if not spec.quantized:
    raise ValueError(f"scales_for_range needs a quantized spec, got {spec.name}")
  lo, hi = jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32)
  tiny = float(jnp.finfo(spec.scale_jnp_dtype).tiny)
  if spec.symmetric:
    amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    return _round_up_to(jnp.maximum(_div_up(amax, spec.qmax), tiny), spec.scale_jnp_dtype), None
  floor = jnp.maximum(jnp.maximum(jnp.abs(lo), jnp.abs(hi)) * _ASYM_SCALE_FLOOR, tiny)
  # (hi - lo) / (qmax - qmin) as half-range / half-steps: hi - lo overflows float32
  # for |values| above 1.7e38.
  step = _div_up(_half_range_up(lo, hi), (spec.qmax - spec.qmin) / 2)
  scale = _round_up_to(jnp.maximum(step, floor), spec.scale_jnp_dtype)
  # `lo * (1 / scale)` is the product `quantize` computes for lo, bit for bit: lo
  # lands within half a step of qmin, and hi (at most qmax - qmin steps above) within
  # half a step of qmax.
  zero = (spec.qmin - jnp.round(lo * _reciprocal(scale))).astype(ZERO_DTYPE)
  return scale, zero


def _check_clip(clip, x: jax.Array, spec: QuantSpec) -> jax.Array:
  """`clip` broadcastable to `x.shape[:-1]` -> float32 `[..., 1]` against groups `[..., G]`."""
  if not spec.dynamic:
    raise ValueError(f"clip is for dynamic specs (scales computed per token); {spec.name} has "
                     "static scales: calibrate the scale itself")
  if spec.nonuniform:
    raise ValueError(f"clip is for range-scaled specs; {spec.name} scales each token by its RMS "
                     "onto a Lloyd-Max codebook, which has no range to clip")
  if not spec.per_token:
    raise ValueError(f"clip is for per-token scales; {spec.name} scales each channel over a group "
                     "of positions (each scale covers its group's whole range)")
  clip = jnp.asarray(clip, jnp.float32)
  try:
    jnp.broadcast_shapes(clip.shape, x.shape[:-1])
  except ValueError:
    raise ValueError(f"clip of shape {clip.shape} does not broadcast against x.shape[:-1]="
                     f"{x.shape[:-1]} (one ratio per token and kv head)") from None
  validate_clip("clip", clip)
  return jnp.broadcast_to(clip, x.shape[:-1])[..., None]


def _check_token_group(x: jax.Array, spec: QuantSpec) -> None:
  """A token-grouped spec quantizes one group of positions at a time: `x: [..., N, H]`."""
  if x.ndim < 2 or x.shape[-2] != spec.token_group:
    raise ValueError(f"{spec.name} scales each channel over a group of {spec.token_group} "
                     f"positions: x must be [..., {spec.token_group}, H] (the group's positions in "
                     f"axis -2), got x.shape={x.shape}")


def _clipped_ranges(x: jax.Array, spec: QuantSpec, clip) -> tuple[jax.Array, jax.Array]:
  """Per group of `x: [..., H]`, the range `[lo, hi]: [..., G]` its scale covers; for a
  token-grouped spec, per channel of `x: [..., N, H]` over its N positions, `[..., 1, H]`."""
  if spec.token_group is not None:
    _check_token_group(x, spec)
    xg, axis = _sanitize(x), -2
  else:
    xg, axis = _grouped(_sanitize(x), spec.num_groups(x.shape[-1])), -1
  keep = axis == -2
  if spec.symmetric:
    hi = jnp.max(jnp.abs(xg), axis=axis, keepdims=keep)
    lo = -hi
  else:
    lo, hi = (jnp.min(xg, axis=axis, keepdims=keep), jnp.max(xg, axis=axis, keepdims=keep))
  if clip is not None:
    c = _check_clip(clip, x, spec)
    lo, hi = lo * c, hi * c
  return lo, hi


def dynamic_scales(x: jax.Array, spec: QuantSpec, clip=None
                   ) -> tuple[jax.Array, jax.Array | None]:
  """Per-token (and group) scales and zero points for `x: [..., H]`.

  Non-finite values are ignored (treated as 0). `clip`, optional, broadcastable to
  `x.shape[:-1]` with values in (0, 1]: each scale covers `clip` times its group's
  range (module docstring). Returns `scale: [..., G]` in the spec's scale dtype and
  `zero: [..., G]` float32 (None when symmetric). A token-grouped spec (`c<N>`) takes
  one group of positions, `x: [..., N, H]`, and returns per channel `[..., 1, H]`.
  """
  if not spec.dynamic:
    raise ValueError(f"dynamic_scales needs a dynamic spec, got {spec.name}")
  if spec.nonuniform:
    if clip is not None:
      _check_clip(clip, x, spec)  # Raises.
    return _rms_scales(_sanitize(x), spec), None
  return scales_for_range(*_clipped_ranges(x, spec, clip), spec)


def _reciprocal(scale: jax.Array) -> jax.Array:
  return 1.0 / scale.astype(jnp.float32)


def _sanitize(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return jnp.where(jnp.isfinite(x), x, 0.0)


def _broadcast_params(spec: QuantSpec, p: jax.Array, x: jax.Array) -> jax.Array:
  """Scale or zero -> same rank as `x: [..., H]` (per-token `[..., G]`: groups expanded;
  token-grouped `[..., 1, H]` against `x: [..., N, H]`: broadcast over the positions)."""
  p = p.astype(jnp.float32)
  if spec.token_group is not None:
    return jnp.broadcast_to(p, x.shape)
  if spec.dynamic:
    return jnp.repeat(p, x.shape[-1] // p.shape[-1], axis=-1)
  if p.ndim > x.ndim:
    raise ValueError(f"static scale of shape {p.shape} has more dims than x.shape={x.shape}")
  return p.reshape((1,) * (x.ndim - p.ndim) + p.shape)


def quantize(x: jax.Array, spec: QuantSpec, *, scale: jax.Array | None = None,
             zero: jax.Array | None = None, clip=None, q_dtype=None) -> Quantized:
  """Quantizes `x: [..., H]` into `spec`'s storage.

  Args:
    x: values to store, any float dtype; the last axis is the head dimension. A
      token-grouped spec (`c<N>`) quantizes groups of positions: `x: [..., N, H]`.
    spec: the storage spec.
    scale: static specs only: the calibrated scale, broadcastable to `x` (tensor:
      `[1, 1]`, head: `[K, 1]`, channel: `[K, H]` against `x: [..., K, H]`).
    zero: static asymmetric specs only: the zero point, shaped like `scale`.
    clip: dynamic specs only, optional: calibrated clip ratios in (0, 1],
      broadcastable to `x.shape[:-1]` (e.g. `[K]` per kv head against
      `x: [B, T, K, H]`); values beyond `clip` times their group's range saturate.
    q_dtype: integer specs only, optional: a wider integer dtype for `q` holding the
      same values (the cache takes int2 values as int8: XLA's TPU layouts of int2
      need arrays of at least 16 rows, which a chunk of a few tokens is not).

  Returns:
    A `Quantized` tuple; see its docstring.
  """
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"x must be floating point, got x.dtype={x.dtype}")
  finite = jnp.isfinite(x)
  xs = _sanitize(x)
  if not spec.quantized:
    store = spec.dtype.jnp_dtype
    big = float(jnp.finfo(store).max)
    return Quantized(jnp.clip(xs, -big, big).astype(store), None, None,
                     jnp.abs(xs) > big, ~finite)
  clip_range = None
  if spec.nonuniform:
    if scale is not None or zero is not None:
      raise ValueError(f"{spec.name} computes its scales on write; do not pass scale or zero")
    scale, _ = dynamic_scales(xs, spec, clip)
    y = xs * _broadcast_params(spec, _reciprocal(scale), xs)
    q = _nearest_level(y, codebook(spec)) + spec.qmin
    return Quantized(q.astype(_q_dtype(spec, q_dtype)), scale, None, jnp.zeros(x.shape, bool),
                     ~finite)
  if spec.dynamic:
    if scale is not None or zero is not None:
      raise ValueError(f"{spec.name} computes its scales on write; do not pass scale or zero")
    lo, hi = _clipped_ranges(xs, spec, clip)
    scale, zero = scales_for_range(lo, hi, spec)
    if clip is not None:
      clip_range = (lo, hi)
  else:
    if clip is not None:
      _check_clip(clip, x, spec)  # Raises: static specs take no clip.
    if scale is None:
      raise ValueError(f"{spec.name} has static scales: pass the calibrated scale")
    if (zero is None) != spec.symmetric:
      raise ValueError(
          f"{spec.name}: zero must be {'None' if spec.symmetric else 'given'} for a "
          f"{'symmetric' if spec.symmetric else 'asymmetric'} spec")
  # x * (1 / scale), not x / scale: under jit XLA rewrites a division by a broadcast
  # scale into this multiplication (an ulp apart from the division), so writing it
  # out makes eager and jit (and kernels that do the same) agree bit for bit.
  y = xs * _broadcast_params(spec, _reciprocal(scale), xs)
  if spec.dtype.is_int:
    y = jnp.round(y)
    if zero is not None:  # An integer: exact, and no multiply-add for XLA to fuse.
      y = y + _broadcast_params(spec, zero, xs)
    beyond = (y > spec.qmax) | (y < spec.qmin)
  else:
    beyond = jnp.abs(y) > spec.qmax
  # Dynamic scales cover their (clipped) range exactly (scale * qmax >= amax), so a
  # value inside it can pass qmax only by the float32 rounding of x * (1 / scale),
  # which the clip absorbs: that is not saturation. Outside a calibrated clip range
  # it is.
  if not spec.dynamic:
    saturated = beyond
  elif clip_range is None:
    saturated = jnp.zeros(x.shape, bool)
  else:
    lo, hi = (_broadcast_params(spec, r, xs) for r in clip_range)
    saturated = beyond & ((xs > hi) | (xs < lo))
  q = jnp.clip(y, spec.qmin, spec.qmax).astype(_q_dtype(spec, q_dtype))
  return Quantized(q, scale, zero, saturated, ~finite)


def _q_dtype(spec: QuantSpec, q_dtype) -> jnp.dtype:
  """The dtype `quantize` hands `q` over in: the storage dtype, or a validated wider one."""
  if q_dtype is None:
    return spec.storage_dtype
  if not (spec.dtype.is_int and jnp.issubdtype(q_dtype, jnp.signedinteger)
          and jnp.iinfo(q_dtype).bits >= spec.dtype.bits):
    raise ValueError(f"q_dtype must be a signed integer dtype at least as wide as "
                     f"{spec.dtype.value} (integer specs only), got q_dtype={q_dtype} for {spec.name}")
  return q_dtype


def dequantize(q: jax.Array, spec: QuantSpec, scale: jax.Array | None = None,
               zero: jax.Array | None = None, dtype=jnp.float32) -> jax.Array:
  """Inverse of `quantize`: `(q - zero) * scale` in `dtype`.

  Args:
    q: stored values `[..., H]`.
    spec: the storage spec they were written with.
    scale: as returned by / passed to `quantize` (per-token: `[..., G]`; token-grouped:
      `[..., 1, H]` against `q: [..., N, H]`).
    zero: likewise; None for symmetric specs.
    dtype: output dtype.
  """
  if not spec.quantized:
    return q.astype(dtype)
  if scale is None:
    raise ValueError(f"dequantize({spec.name}) needs scale")
  levels = codebook(spec)
  if levels is not None:  # A table lookup: index q - qmin.
    x = jnp.asarray(levels, jnp.float32)[q.astype(jnp.int32) - int(spec.qmin)]
  else:
    x = q.astype(jnp.float32)
  if zero is not None:
    x = x - _broadcast_params(spec, zero, q)
  return (x * _broadcast_params(spec, scale, q)).astype(dtype)


def straight_through(x: jax.Array, y: jax.Array) -> jax.Array:
  """`y` in the forward pass, the identity's gradient to `x` in the backward pass."""
  return x + jax.lax.stop_gradient(y - x)


def _clip_stop(r: jax.Array, lo: float, hi: float) -> jax.Array:
  """`clip(r, lo, hi)` whose gradient is 1 on `[lo, hi]` (bounds included) and 0 beyond."""
  return jnp.where(r > hi, hi, jnp.where(r < lo, lo, r))


def fake_quantize(x: jax.Array, spec: QuantSpec, *, scale: jax.Array | None = None,
                  zero: jax.Array | None = None, clip=None) -> jax.Array:
  """`dequantize(quantize(x, spec, ...))` in float32, with straight-through gradients.

  Args and their shapes as `quantize`: `scale` (and `zero`) for static specs,
  optional `clip` for dynamic ones. The forward value equals the quantize /
  dequantize round trip exactly (NaN/inf stored as 0, saturation included). The
  gradient is the surrogate's of the module docstring: with respect to `scale`
  (static) or `clip` (dynamic), and to `x` where a value is not clipped.
  """
  if not spec.quantized:
    return dequantize(quantize(x, spec).q, spec)
  if spec.nonuniform:  # No clip ratio to learn: the value passes straight through.
    if clip is not None:
      _check_clip(clip, x, spec)  # Raises.
    res = quantize(jax.lax.stop_gradient(x), spec)
    xs = _sanitize(x)  # `exact + (xs - xs)`: bit-exact forward, identity gradient.
    return dequantize(res.q, spec, res.scale) + (xs - jax.lax.stop_gradient(xs))
  nograd = jax.lax.stop_gradient
  xs = _sanitize(x)
  res = quantize(nograd(x), spec, scale=None if scale is None else nograd(scale),
                 zero=None if zero is None else nograd(zero),
                 clip=None if clip is None else nograd(clip))
  exact = dequantize(res.q, spec, res.scale, res.zero)
  # The surrogate: the same scale rule in plain float32 arithmetic.
  if spec.dynamic:
    lo, hi = (nograd(r) for r in _clipped_ranges(xs, spec, None))  # [..., G]
    c = 1.0 if clip is None else _check_clip(clip, x, spec)
    if spec.symmetric:
      s = jnp.maximum(c * jnp.maximum(-lo, hi) / spec.qmax, jnp.finfo(jnp.float32).tiny)
      z = None
    else:
      s = jnp.maximum(c * (hi - lo) / (spec.qmax - spec.qmin), jnp.finfo(jnp.float32).tiny)
      z = nograd(res.zero.astype(jnp.float32))
    s, z = (None if p is None else _broadcast_params(spec, p, xs) for p in (s, z))
  else:
    s = _broadcast_params(spec, jnp.asarray(scale, jnp.float32), xs)
    z = None if zero is None else _broadcast_params(spec, jnp.asarray(zero, jnp.float32), xs)
  y = xs / s
  if spec.dtype.is_int:  # Clipping is decided on the stored integer, as `quantize` does.
    r = straight_through(y, jnp.round(y)) + (0.0 if z is None else z)
    r = _clip_stop(r, spec.qmin, spec.qmax) - (0.0 if z is None else z)
  else:
    r = _clip_stop(y, -spec.qmax, spec.qmax)
  surrogate = r * s
  return straight_through(surrogate, exact)


def static_scale_shape(spec: QuantSpec, kv_heads: int, head_dim: int) -> tuple[int, int]:
  """Per-layer shape of a static scale, broadcastable against `[..., K, H]`."""
  return {
      Granularity.TENSOR: (1, 1),
      Granularity.HEAD: (kv_heads, 1),
      Granularity.CHANNEL: (kv_heads, head_dim),
  }[spec.granularity]


def validate_scale(name: str, scale, *, is_zero: bool = False) -> None:
  """Rejects scales that are 0, negative, NaN or inf, and zero points that are not integers.

  Args:
    name: the argument's name, for the message.
    scale: the scale, or with `is_zero` the zero point, to check.
    is_zero: check a zero point (a finite integer, |z| <= 2**24) instead of a scale.

  Checks concrete arrays only: traced values cannot be inspected at trace time.

  Raises:
    ValueError: naming `name`, the count of bad entries and the first one.
  """
  if isinstance(scale, jax.core.Tracer):
    return
  a = np.asarray(jax.device_get(scale), dtype=np.float64)
  with np.errstate(invalid="ignore"):
    if is_zero:
      _reject_bad(name, a, ~(np.isfinite(a) & (np.round(a) == a) & (np.abs(a) <= 2**24)),
                  "finite integers (|z| <= 2**24)")
    else:
      _reject_bad(name, a, ~(np.isfinite(a) & (a > 0)), "finite and > 0")


def _reject_bad(name: str, a: np.ndarray, bad: np.ndarray, what: str) -> None:
  """Raises a ValueError naming `name`, the count of `bad` entries of `a` and the first one."""
  if bad.any():
    idx = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(
        f"{name} must be {what} everywhere; {int(bad.sum())} of {a.size} entries are not, "
        f"first at index {idx}: {a[idx]!r}")


def validate_clip(name: str, clip) -> None:
  """Rejects clip ratios outside (0, 1] (and NaN); concrete arrays only.

  Raises:
    ValueError: naming `name`, the count of bad entries and the first one.
  """
  if isinstance(clip, jax.core.Tracer):
    return
  a = np.asarray(jax.device_get(clip), dtype=np.float64)
  with np.errstate(invalid="ignore"):
    _reject_bad(name, a, ~((a > 0) & (a <= 1)), "clip ratios in (0, 1] (1: no clipping)")
