"""Static scales from calibration statistics, for every static format and granularity.

`compute_scales(stats, spec, method)` turns a `TensorStats` into the static scale
(and zero point) of a tensor/head/channel spec, shaped `[L, 1|K, 1|H]` as
`KVCache.init(..., k_scale=..., k_zero=...)` takes it. Every method decides a clip
range per group (the channels that share a scale) and hands it to
`quant.scales_for_range`, the one rule for a scale covering a range:

  absmax      the observed `[min, max]` (symmetric: `max |x|`): nothing clips.
  percentile  `[p_lower, p_upper]` of the histogram (symmetric: the percentile of
              |x|), option `percentile=99.99`: a symmetric clip leaves `1 - q/100`
              of the values outside, an asymmetric one that much on each side.
  mse         the clip range, among `num_candidates` fractions of the absmax range
              evenly spaced in `[min_fraction, 1]`, that minimizes the expected
              squared quantization error over the histogram. Symmetric candidates are
              `[-f a, f a]` (a = max |x|), asymmetric ones `[f min, f max]`. The
              histogram stands for the data as `points_per_bin` evenly spaced points
              per bin (narrowed to the group's exact `[min, max]`, each weighing its
              share of the bin count) plus the exact min and max (weight 1 each),
              and each point's error is computed exactly with `quant.quantize` /
              `quant.dequantize` at the candidate's scale, so rounding, clipping and
              fp8's non-uniform grid are those of the cache. Ties go to the wider
              range. Values that quantize to 0 under every candidate (below a
              quarter of the smallest stored magnitude at the smallest candidate
              scale; and the zero bin) are left out: their error is the same for all
              candidates. Cost: one quantize per candidate over the binned
              points, linear in layers x heads x channels (per channel).

`learn_scales` refines one layer's scale by gradient descent on the attention
output error (see its docstring). `clip_fraction` says what fraction of the
calibration values a set of scales clips: the baseline for drift monitoring.

Errors: a layer that observed no tokens, only NaN/inf, or only zeros, and a
group (head or channel) without a nonzero value, raise a ValueError naming the
layer; no method ever returns a zero, unit or default scale.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kvtpu import quant
from kvtpu.calibration import objective
from kvtpu.calibration import stats as stats_lib
from kvtpu.calibration.stats import TensorStats
from kvtpu.formats import Granularity, QuantSpec

__all__ = ["METHODS", "compute_scales", "clip_fraction", "learn_scales", "attention_error",
           "LearnedScale"]

METHODS = ("absmax", "percentile", "mse")
_OPTIONS = {
    "absmax": {},
    "percentile": {"percentile": 99.99},
    "mse": {"num_candidates": 100, "min_fraction": 0.05, "points_per_bin": 4},
}


def _check_spec(spec: QuantSpec) -> None:
  if not isinstance(spec, QuantSpec):
    raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
  if not spec.quantized:
    raise ValueError(f"{spec.name} stores values unquantized: it has no scales to calibrate")
  if spec.dynamic:
    raise ValueError(
        f"{spec.name} has dynamic scales ({spec.granularity.value}), computed per token on "
        "write: calibration is for static specs (granularity tensor, head or channel)")


def _group_name(granularity: Granularity, idx: tuple[int, ...]) -> str:
  if granularity is Granularity.HEAD:
    return f"kv head {idx[0]}"
  if granularity is Granularity.CHANNEL:
    return f"kv head {idx[0]}, channel {idx[1]}"
  return "tensor"


def _check_data(stats: TensorStats, spec: QuantSpec, groups: dict[str, np.ndarray]) -> None:
  """Raises for layers (and groups) whose data cannot set a scale."""
  tokens = stats.tokens_per_layer()
  nonfinite = stats.nonfinite_per_layer()
  counts = groups["count"].reshape(stats.num_layers, -1).sum(-1)
  amax = np.maximum(np.abs(groups["min"]), np.abs(groups["max"]))
  for layer in range(stats.num_layers):
    if tokens[layer] == 0:
      raise ValueError(f"layer {layer} observed no tokens: cannot calibrate {spec.name} scales "
                       "(was the layer's observer called?)")
    if counts[layer] == 0:
      raise ValueError(f"layer {layer}: all {nonfinite[layer]} observed values are NaN/inf: "
                       f"cannot calibrate {spec.name} scales")
    if not np.any(amax[layer] > 0):
      raise ValueError(f"layer {layer}: all {counts[layer]} observed values are 0: cannot "
                       f"calibrate {spec.name} scales from all-zero data")
    bad = ~(amax[layer] > 0)
    if bad.any():
      idx = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(
          f"layer {layer}, {_group_name(spec.granularity, idx)}: no nonzero value observed "
          f"({int(bad.sum())} of {bad.size} groups): a {spec.granularity.value} scale cannot be "
          "calibrated for it; observe more data or use a coarser granularity")


def check_options(method: str, options: dict, defaults: dict[str, dict], hint: str = "") -> dict:
  """`options` of `method` merged over its `defaults`; unknown methods or options raise.

  `hint` is appended when the method is "learned" (which needs attention inputs).
  """
  if method not in defaults:
    hint = hint if method == "learned" else ""
    raise ValueError(f"unknown method={method!r}; valid methods: {', '.join(defaults)}{hint}")
  unknown = set(options) - set(defaults[method])
  if unknown:
    raise ValueError(f"method {method!r} takes options {sorted(defaults[method])}, got unknown "
                     f"{sorted(unknown)}")
  return {**defaults[method], **options}


def _options(method: str, options: dict) -> dict:
  return check_options(method, options, _OPTIONS,
                       " ('learned' needs attention inputs: call learn_scales(q, k, v, spec, "
                       "init_scale) with an init from compute_scales)")


# Jitted: one compile per shape instead of op-by-op dispatch (the same bits: quant's tests).
_scales_for_range = jax.jit(quant.scales_for_range, static_argnums=2)


def compute_scales(stats: TensorStats, spec: QuantSpec, method: str = "absmax", **options
                   ) -> tuple[jax.Array, jax.Array | None]:
  """Static scales (and zero points) for `spec` from calibration statistics.

  Args:
    stats: the statistics of the tensor the spec stores (K after RoPE, or V).
    spec: a static quantized spec (granularity tensor, head or channel).
    method: "absmax", "percentile" or "mse" (module docstring).
    **options: per method: percentile: `percentile=99.99`; mse:
      `num_candidates=100`, `min_fraction=0.05`, `points_per_bin=4`.

  Returns:
    `scale: [L, 1|K, 1|H]` in the spec's scale dtype, finite and > 0, and `zero`
    (float32 integers, same shape) for asymmetric specs, else None.

  Raises:
    ValueError: for a dynamic or unquantized spec, an unknown method or option, a
      layer that observed no tokens, only NaN/inf or only zeros, a group without a
      nonzero value, or a percentile clip range of 0.
  """
  if not isinstance(stats, TensorStats):
    raise TypeError(f"stats must be a TensorStats, got {type(stats).__name__}")
  _check_spec(spec)
  opts = _options(method, options)
  groups = stats_lib.grouped(stats, spec.granularity)
  _check_data(stats, spec, groups)
  gmin, gmax = groups["min"], groups["max"]
  if method == "absmax":
    lo, hi = gmin, gmax
  elif method == "percentile":
    q = opts["percentile"]
    if not (isinstance(q, int | float) and 0 < q <= 100):
      raise ValueError(f"percentile must be in (0, 100], got percentile={q!r}")
    if spec.symmetric:
      hi = stats_lib.percentile(stats, q, spec.granularity, side="abs")
      lo = -hi
    else:
      lo = stats_lib.percentile(stats, q, spec.granularity, side="lower")
      hi = stats_lib.percentile(stats, q, spec.granularity, side="upper")
    # A clip inside the zero bin (|x| < 2**min_exponent) is 0 as far as the histogram knows.
    zero_range = ~(np.maximum(np.abs(lo), np.abs(hi)) >= float(stats.edges()[0]))
    if zero_range.any():
      idx = np.argwhere(zero_range)[0]
      raise ValueError(
          f"layer {idx[0]}, {_group_name(spec.granularity, tuple(int(i) for i in idx[1:]))}: "
          f"the {q}th percentile range is 0 (over {100 - q:g}% of its values are 0): use a "
          "higher percentile or method='absmax'")
  else:
    lo, hi = _mse_ranges(stats, spec, groups, **opts)
  scale, zero = _scales_for_range(jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32),
                                  spec)
  quant.validate_scale(f"{method} scale", scale)
  if zero is not None:
    quant.validate_scale(f"{method} zero", zero, is_zero=True)
  return scale, zero


# ----------------------------------------------------------------------- mse
def _smallest_step(spec: QuantSpec) -> float:
  """The smallest positive stored magnitude: 1 for integers, the least fp8 subnormal."""
  if spec.dtype.is_int:
    return 1.0
  return float(jnp.finfo(spec.storage_dtype).smallest_subnormal)


def _bin_points(stats: TensorStats, spec: QuantSpec, groups: dict[str, np.ndarray],
                points_per_bin: int, min_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """Points `[L, G, P]` standing for each group's histogram, and their weights.

  Only the bins that can matter are kept: a value below a quarter of the smallest
  stored magnitude at the smallest candidate scale quantizes to 0 under every
  candidate, so its error (its square) is the same for all and cannot move the
  argmin. Per group the kept magnitude bins run from its largest occupied one down
  to that threshold (the widest group sets the common width; narrower ones carry
  a few extra bins); the zero bin (|x| < 2**min_exponent) is never kept.
  """
  nl, m_bins = stats.num_layers, stats.num_mag_bins
  hist = groups["hist"].reshape(nl, -1, stats.num_bins).astype(np.float64)
  gmin = groups["min"].reshape(nl, -1, 1)
  gmax = groups["max"].reshape(nl, -1, 1)
  occupied = hist > 0
  first = np.argmax(occupied, axis=-1)
  last = stats.num_bins - 1 - np.argmax(occupied[..., ::-1], axis=-1)
  # The exact min and max stand for one value each, taken out of their bins.
  two = (hist.sum(-1) >= 2)[..., None]
  np.put_along_axis(hist, last[..., None], np.take_along_axis(hist, last[..., None], -1) - 1, -1)
  np.put_along_axis(hist, first[..., None],
                    np.take_along_axis(hist, first[..., None], -1) - two, -1)

  # Magnitude bins kept per group: [m_top - width + 1, m_top].
  amax = np.maximum(np.abs(gmin), np.abs(gmax))[..., 0]
  if spec.symmetric:
    s_min = min_fraction * amax / spec.qmax
  else:
    s_min = min_fraction * (gmax - gmin)[..., 0] / (spec.qmax - spec.qmin)
    # With a range off zero, 0 is not on the grid: keep every bin.
    s_min = np.where((gmin[..., 0] > 0) | (gmax[..., 0] < 0), 0.0, s_min)
  edges = stats.edges().astype(np.float64)
  m_keep = np.maximum(np.searchsorted(edges, 0.25 * _smallest_step(spec) * s_min, "right") - 1, 0)
  m_top = np.clip(np.searchsorted(edges, amax, "right") - 1, 0, m_bins - 1)
  width = int(np.max(m_top - np.minimum(m_keep, m_top))) + 1
  m = m_top[..., None] - width + 1 + np.arange(width)  # [L, G, W], ascending
  keep = m >= 0
  m = np.maximum(m, 0)
  idx = np.concatenate([m_bins - 1 - m[..., ::-1], m_bins + 1 + m], axis=-1)  # [L, G, 2W]
  keep = np.concatenate([keep[..., ::-1], keep], axis=-1)
  counts = np.where(keep, np.take_along_axis(hist, idx, -1), 0.0)
  lo_edge, hi_edge = stats.signed_bin_ranges()
  a = np.maximum(lo_edge[idx], gmin)
  b = np.maximum(a, np.minimum(hi_edge[idx], gmax))  # Empty bins: keep points finite.
  t = (np.arange(points_per_bin) + 0.5) / points_per_bin
  pts = a[..., None] + (b - a)[..., None] * t
  wts = np.repeat(counts[..., None] / points_per_bin, points_per_bin, axis=-1)
  shape = (*pts.shape[:2], -1)
  pts = np.concatenate([pts.reshape(shape), gmin, gmax], axis=-1)
  wts = np.concatenate([wts.reshape(shape), two.astype(np.float64), np.ones_like(gmax)], axis=-1)
  return pts.astype(np.float32), wts.astype(np.float32)


@partial(jax.jit, static_argnames=("spec",))
def _mse_search(pts, wts, lo, hi, fractions, spec: QuantSpec):
  """Per layer and group, the candidate clip range of least weighted squared error.

  Args:
    pts, wts: `[L, G, P]` points and weights.
    lo, hi: `[L, G]` full ranges; candidate c is `[f_c lo, f_c hi]`.
    fractions: `[C]`, descending (argmin's first minimum is the widest range).

  Returns:
    The chosen `lo, hi: [L, G]` and the errors `[C, L, G]`.
  """
  def per_candidate(f):
    # A loop over candidates, each over all groups: ~10x faster on CPU than a vmap.
    s, z = quant.scales_for_range(f * lo, f * hi, spec)
    s = s[..., None]
    z = None if z is None else z[..., None]
    deq = quant.dequantize(quant.quantize(pts, spec, scale=s, zero=z).q, spec, s, z)
    return jnp.sum(wts * jnp.square(deq - pts), axis=-1)

  err = jax.lax.map(per_candidate, fractions)  # [C, L, G]
  best = fractions[jnp.argmin(err, axis=0)]
  return best * lo, best * hi, err


def _mse_ranges(stats: TensorStats, spec: QuantSpec, groups: dict[str, np.ndarray], *,
                num_candidates: int, min_fraction: float, points_per_bin: int
                ) -> tuple[jax.Array, jax.Array]:
  if not (isinstance(num_candidates, int) and num_candidates >= 1):
    raise ValueError(f"num_candidates must be a positive int, got {num_candidates=}")
  if not 0 < min_fraction <= 1:
    raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction=}")
  if not (isinstance(points_per_bin, int) and points_per_bin >= 1):
    raise ValueError(f"points_per_bin must be a positive int, got {points_per_bin=}")
  shape = groups["min"].shape
  pts, wts = _bin_points(stats, spec, groups, points_per_bin, min_fraction)
  # Pad the points to a multiple of 256 (weight 0): fewer shapes, fewer compiles.
  pad = ((0, 0), (0, 0), (0, -pts.shape[-1] % 256))
  pts, wts = np.pad(pts, pad), np.pad(wts, pad)
  gmin = groups["min"].reshape(stats.num_layers, -1)
  gmax = groups["max"].reshape(stats.num_layers, -1)
  if spec.symmetric:
    amax = np.maximum(np.abs(gmin), np.abs(gmax))
    lo, hi = -amax, amax
  else:
    lo, hi = gmin, gmax
  fractions = np.linspace(1.0, min_fraction, num_candidates).astype(np.float32)
  best_lo, best_hi, _ = _mse_search(jnp.asarray(pts), jnp.asarray(wts),
                                    jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32),
                                    jnp.asarray(fractions), spec)
  return best_lo.reshape(shape), best_hi.reshape(shape)


# ------------------------------------------------------------- clip fraction
def clip_fraction(stats: TensorStats, spec: QuantSpec, scale, zero=None) -> np.ndarray:
  """Per layer, the fraction of the observed (finite) values these scales clip.

  A value clips where `quant.quantize` reports it saturated: integers when
  `round(x / scale) + zero` leaves `[qmin, qmax]`, i.e. beyond `(qmax - zero + 1/2)
  * scale` or `(qmin - zero - 1/2) * scale`; fp8 beyond `±qmax * scale`. Counted
  from the channel histograms: bins wholly beyond a threshold count fully, the bin
  that straddles it counts the share of its range (narrowed to the channel's exact
  `[min, max]`) beyond the threshold, as if its values were spread evenly. So the
  result is exact when no bin straddles a threshold, 0 whenever the scales cover
  the observed range (absmax scales), and otherwise off by at most the straddling
  bins' counts (ties at a rounding boundary and the float32 rounding of `x /
  scale` aside).

  Args:
    stats: the calibration statistics.
    spec: the static spec the scales are for.
    scale, zero: `[L, 1|K, 1|H]` (or without L, shared by all layers), as from
      `compute_scales`; zero only for asymmetric specs.

  Returns:
    float64 `[L]`; NaN for layers without finite values.
  """
  _check_spec(spec)
  if (zero is None) != spec.symmetric:
    raise ValueError(f"{spec.name}: zero must be {'None' if spec.symmetric else 'given'}")
  quant.validate_scale("scale", scale)
  shape = (stats.num_layers, stats.kv_heads, stats.head_dim)
  s = np.broadcast_to(np.asarray(jax.device_get(scale), np.float64), shape)
  z = 0.0 if zero is None else np.broadcast_to(np.asarray(jax.device_get(zero), np.float64), shape)
  if spec.dtype.is_int:
    t_hi, t_lo = (spec.qmax - z + 0.5) * s, (spec.qmin - z - 0.5) * s
  else:
    t_hi, t_lo = spec.qmax * s, -spec.qmax * s
  t_hi, t_lo = np.broadcast_to(t_hi, shape), np.broadcast_to(t_lo, shape)
  groups = stats_lib.grouped(stats, Granularity.CHANNEL)
  lo_edge, hi_edge = stats.signed_bin_ranges()
  clipped = np.zeros(stats.num_layers)
  for layer in range(stats.num_layers):  # One layer at a time bounds the temporaries.
    hist = groups["hist"][layer].astype(np.float64)  # [K, H, NB]
    a = np.maximum(lo_edge, groups["min"][layer][..., None])
    b = np.minimum(hi_edge, groups["max"][layer][..., None])
    th, tl = t_hi[layer][..., None], t_lo[layer][..., None]
    width = b - a
    with np.errstate(invalid="ignore", divide="ignore"):
      above = np.where(width > 0, np.clip((b - th) / width, 0.0, 1.0), (a >= th) * 1.0)
      below = np.where(width > 0, np.clip((tl - a) / width, 0.0, 1.0), (a <= tl) * 1.0)
    clipped[layer] = np.sum(hist * np.where(hist > 0, above + below, 0.0))
  total = groups["count"].reshape(stats.num_layers, -1).sum(-1).astype(np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(total > 0, clipped / total, np.nan)


# ------------------------------------------------------------------- learned
class LearnedScale(NamedTuple):
  """Result of `learn_scales`.

  Attributes:
    scale: `[1|K, 1|H]` in the spec's scale dtype.
    zero: like `scale`, float32 integers; None for symmetric specs.
    objective: `attention_error` of the returned scale.
    init_objective: `attention_error` of the initial scale.
  """

  scale: jax.Array
  zero: jax.Array | None
  objective: float
  init_objective: float


def _check_attention_inputs(q, k, v, spec, scale, zero, which, valid):
  _check_spec(spec)
  valid = objective.check_qkv(q, k, v, which, valid)
  want = quant.static_scale_shape(spec, k.shape[2], q.shape[3])
  if tuple(jnp.shape(scale)) != want:
    raise ValueError(f"scale must have shape {want} ({spec.name}, one layer), got "
                     f"{tuple(jnp.shape(scale))}")
  if (zero is None) != spec.symmetric:
    raise ValueError(f"{spec.name}: zero must be {'None' if spec.symmetric else 'given'}")
  if zero is not None and tuple(jnp.shape(zero)) != want:
    raise ValueError(f"zero must have shape {want}, got {tuple(jnp.shape(zero))}")
  return valid


def _at(params, aux, x, spec: QuantSpec):
  """Fake quantization at a given `(scale, zero)`."""
  del aux
  scale, zero = params
  return quant.fake_quantize(x, spec, scale=scale, zero=zero)


def _from_log(log_s, center, x, spec: QuantSpec):
  """Fake quantization at `exp(log_s)`, rounded into the scale dtype (asymmetric: the
  zero point follows the scale so that the range stays centred on `center`)."""
  s, z = _scale_zero(log_s, center, spec, ste=True)
  return quant.fake_quantize(x, spec, scale=s, zero=z)


def _exact(spec, scale, zero, q, k, v, valid, sm, which) -> float:
  return float(objective.exact_error(_at, spec, (scale, zero), None, q, k, v,
                                     valid, sm, which=which))


def attention_error(q, k, v, spec: QuantSpec, scale, zero=None, *, which: str = "k",
                    valid=None, softmax_scale: float | None = None) -> float:
  """Mean squared error of causal attention with K (or V) quantized, against exact.

  Args:
    q: `[B, T, N, H]` queries (after RoPE) of one layer.
    k, v: `[B, T, K, H]` keys (as stored: after RoPE) and values; N a multiple of K.
    spec: the static spec of the quantized tensor.
    scale, zero: one layer's `[1|K, 1|H]` scale (and zero point, asymmetric specs).
    which: "k" quantizes the keys, "v" the values; the other stays exact.
    valid: optional `bool[B, T]`: False tokens are neither attended to nor scored.
    softmax_scale: logit scale; default `1 / sqrt(H)`.

  Returns:
    `sum over valid queries, heads and channels of (out_q - out)**2 / (valid
    queries * N * H)`, computed with `quant.quantize` / `quant.dequantize`.
  """
  valid = _check_attention_inputs(q, k, v, spec, scale, zero, which, valid)
  sm = objective.softmax_scale_for(q, softmax_scale)
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  return _exact(spec, jnp.asarray(scale), None if zero is None else f32(zero), f32(q), f32(k),
                f32(v), valid, sm, which)


def _scale_zero(log_s, center, spec: QuantSpec, ste: bool):
  """Scale (rounded into the scale dtype) and zero point of the parameters."""
  s = jnp.exp(log_s)
  stored = s.astype(spec.scale_jnp_dtype).astype(jnp.float32)
  s = quant.straight_through(s, stored) if ste else stored
  if spec.symmetric:
    return s, None
  zr = (spec.qmin + spec.qmax) / 2 - center * (1.0 / s)
  return s, (quant.straight_through(zr, jnp.round(zr)) if ste else jnp.round(zr))


def learn_scales(q, k, v, spec: QuantSpec, init_scale, *, init_zero=None, which: str = "k",
                 steps: int = 200, learning_rate: float = 1e-2, valid=None,
                 softmax_scale: float | None = None) -> LearnedScale:
  """Learns one layer's static K (or V) scale that minimizes the attention output error.

  Adam on the log of the scale, with straight-through rounding (of the values, the
  scale into its dtype and the zero point), minimizes `attention_error` on the
  caller's calibration batches of ONE layer. Asymmetric specs keep the center of
  the representable range where `init_scale` and `init_zero` put it: the zero point
  follows the scale. The scale with the lowest loss seen is then checked against
  `init_scale` with the exact objective (`quant.quantize`, no straight-through),
  and the better one is returned: never worse than the initial scale.

  Args:
    q: `[B, T, N, H]` queries after RoPE.
    k, v: `[B, T, K, H]` keys after RoPE and values.
    spec: a static spec.
    init_scale: `[1|K, 1|H]`, e.g. `compute_scales(stats, spec, "absmax")[0][layer]`.
    init_zero: likewise the zero point, for asymmetric specs.
    which: "k" or "v": which tensor the scale is for.
    steps: optimizer steps.
    learning_rate: Adam's step size on the log scale (1e-2: about 1% per step).
    valid: optional `bool[B, T]` of real (non-padding) tokens.
    softmax_scale: logit scale; default `1 / sqrt(H)`.

  Returns:
    A `LearnedScale`: scale, zero, the objective of the result and of the init.

  Raises:
    ValueError: for a dynamic or unquantized spec, mismatched shapes, or an invalid
      initial scale.
  """
  valid = _check_attention_inputs(q, k, v, spec, init_scale, init_zero, which, valid)
  quant.validate_scale("init_scale", init_scale)
  quant.validate_scale(f"init_scale (as {spec.scale_dtype})",
                       jnp.asarray(init_scale).astype(spec.scale_jnp_dtype))
  if init_zero is not None:
    quant.validate_scale("init_zero", init_zero, is_zero=True)
  objective.check_steps(steps, learning_rate)
  sm = objective.softmax_scale_for(q, softmax_scale)
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  q, k, v = f32(q), f32(k), f32(v)
  s0 = f32(init_scale)
  z0 = None if init_zero is None else f32(init_zero)
  center = jnp.zeros_like(s0) if z0 is None else ((spec.qmin + spec.qmax) / 2 - z0) * s0
  init_scale = jnp.asarray(init_scale).astype(spec.scale_jnp_dtype)
  init_obj = _exact(spec, init_scale, z0, q, k, v, valid, sm, which)
  if steps == 0:
    return LearnedScale(init_scale, z0, init_obj, init_obj)
  log_s = objective.learn(_from_log, spec, jnp.log(s0), center, q, k, v, valid, sm,
                          which=which, steps=steps, learning_rate=float(learning_rate))
  scale, zero = _scale_zero(log_s, center, spec, ste=False)
  scale = scale.astype(spec.scale_jnp_dtype)
  try:
    quant.validate_scale("learned scale", scale)
    if zero is not None:
      quant.validate_scale("learned zero", zero, is_zero=True)
    obj = _exact(spec, scale, zero, q, k, v, valid, sm, which)
  except ValueError:  # A scale driven out of range is no candidate.
    obj = float("inf")
  if not obj < init_obj:
    return LearnedScale(init_scale, z0, init_obj, init_obj)
  return LearnedScale(scale, zero, obj, init_obj)
