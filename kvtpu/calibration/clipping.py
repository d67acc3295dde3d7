"""Calibrated clip ratios for dynamic (per-token) formats.

A dynamic spec (`int8`, `fp8_e4m3`, `int4-g32`, ...) computes each token's scale
when it is written, from that token's own range: nothing clips, but one outlier
channel stretches the grid of the whole token and head. A clip ratio `c` in (0, 1]
per layer and kv head narrows every scale to `c` times the token's range
(`quant.quantize(..., clip=c)`): the few values beyond are clipped, all others get
a finer grid. The ratio is a property of the data (how heavy the tail of a token's
values is, relative to its maximum), so it is calibrated like a static scale, on
named workloads, and stored in the same artifact; the kernels read the per-token
scales as before.

Because a ratio is relative to each token's own maximum, the statistics that set it
are the tokens themselves, not the global histograms of `stats`: the methods here
take samples of whole tokens (`[..., K, H]` per layer, e.g. one batch of each
calibration workload) and evaluate every candidate with the cache's own
`quant.quantize`, exactly:

  absmax      `c = 1`: plain per-token absmax scales (nothing clips).
  percentile  per layer and head, the `percentile`-th percentile of `r`, each
              value's position in its group's range (`x / max` for `x >= 0`,
              `x / min` for `x < 0`; symmetric specs `|x| / max |x|`), so that
              `1 - percentile/100` of the values lie beyond `c`. With a head
              dimension of H values per group, each group's own maximum is `1 /
              H` of its values, so percentiles above `100 (1 - 1/H)` give `c = 1`.
  mse         among `num_candidates` ratios evenly spaced in `[min_fraction, 1]`,
              the one with the least squared error of the dequantized samples, per
              layer and head (ties: the larger ratio).

`learn_clip` refines one layer's ratios with optax on the attention-output error,
like `methods.learn_scales` does for static scales, and never returns a ratio worse
than its start. `clip_fraction` gives the drift baseline: the fraction of the sample
values the ratios clip, the figure the cache's saturation counters report at run
time.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kvtpu import quant
from kvtpu.calibration import objective
from kvtpu.calibration.methods import check_options
from kvtpu.formats import QuantSpec

__all__ = ["CLIP_METHODS", "compute_clip", "clip_fraction", "learn_clip", "clip_attention_error",
           "LearnedClip"]

CLIP_METHODS = ("absmax", "percentile", "mse")
_OPTIONS = {
    "absmax": {},
    "percentile": {"percentile": 99.99},
    "mse": {"num_candidates": 100, "min_fraction": 0.05},
}


def _check_spec(spec: QuantSpec) -> None:
  if not isinstance(spec, QuantSpec):
    raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
  if not (spec.quantized and spec.dynamic):
    raise ValueError(f"clip ratios are for dynamic (per-token) specs, got {spec.name}: static "
                     "specs calibrate the scale itself (methods.compute_scales)")
  if not spec.clippable:
    raise ValueError(f"clip ratios are for range-scaled per-token specs, got {spec.name}, whose "
                     "scales are each token's RMS onto a fixed codebook or each channel's range "
                     "over a group of positions: nothing to calibrate")


def _check_samples(samples, spec: QuantSpec) -> list[np.ndarray]:
  """Per layer a float32 `[N, K, H]` array of finite sample tokens; raises on bad data."""
  if isinstance(samples, (np.ndarray, jax.Array)):
    if np.ndim(samples) < 3:
      raise ValueError(f"samples must be [L, ..., K, H] or a per-layer sequence of [..., K, H], "
                       f"got shape {np.shape(samples)}")
    samples = list(samples)
  if not isinstance(samples, Sequence) or not samples:
    raise ValueError("samples must be a non-empty per-layer sequence of [..., K, H] arrays")
  out = []
  for layer, x in enumerate(samples):
    x = np.asarray(jax.device_get(x), np.float32)
    if x.ndim < 2:
      raise ValueError(f"layer {layer}: samples must be [..., K, H], got shape {x.shape}")
    x = x.reshape(-1, *x.shape[-2:])
    if out and x.shape[1:] != out[0].shape[1:]:
      raise ValueError(f"layer {layer}: samples of shape [..., {x.shape[1]}, {x.shape[2]}] "
                       f"differ from layer 0's [..., {out[0].shape[1]}, {out[0].shape[2]}]")
    spec.num_groups(x.shape[-1])  # Validates head_dim against the group size.
    if x.shape[0] == 0:
      raise ValueError(f"layer {layer}: no sample tokens: cannot calibrate {spec.name} clip "
                       "ratios")
    finite = np.isfinite(x)
    if not finite.all():
      raise ValueError(f"layer {layer}: {int((~finite).sum())} of {x.size} sample values are "
                       f"NaN/inf: cannot calibrate {spec.name} clip ratios from them")
    nonzero = (x != 0).any(axis=(0, 2))
    if not nonzero.any():
      raise ValueError(f"layer {layer}: all {x.size} sample values are 0: cannot calibrate "
                       f"{spec.name} clip ratios from all-zero data")
    if not nonzero.all():
      raise ValueError(f"layer {layer}, kv head {int(np.argmin(nonzero))}: every sample value "
                       f"is 0: a clip ratio cannot be calibrated for it")
    out.append(x)
  return out


def _options(method: str, options: dict) -> dict:
  return check_options(method, options, _OPTIONS, " ('learned' needs attention inputs: call "
                       "learn_clip(q, k, v, spec, init_clip))")


def _positions(x: np.ndarray, spec: QuantSpec) -> np.ndarray:
  """Each value's position `r` in its group's range: it clips iff `r > c`."""
  g = spec.num_groups(x.shape[-1])
  xg = x.reshape(*x.shape[:-1], g, -1).astype(np.float64)
  if spec.symmetric:
    amax = np.abs(xg).max(-1, keepdims=True)
    r = np.abs(xg) / np.where(amax > 0, amax, 1.0)
  else:
    hi = np.maximum(xg.max(-1, keepdims=True), 0.0)
    lo = np.minimum(xg.min(-1, keepdims=True), 0.0)
    r = np.where(xg >= 0, xg / np.where(hi > 0, hi, 1.0), xg / np.where(lo < 0, lo, 1.0))
  return r.reshape(x.shape)


@partial(jax.jit, static_argnames=("spec",))
def _clip_errors(x: jax.Array, fractions: jax.Array, spec: QuantSpec) -> jax.Array:
  """`[C, K]` squared error of `x: [N, K, H]` quantized with each clip fraction."""
  def per_candidate(c):
    res = quant.quantize(x, spec, clip=c)
    deq = quant.dequantize(res.q, spec, res.scale, res.zero)
    return jnp.sum(jnp.square(deq - x), axis=(0, 2))

  return jax.lax.map(per_candidate, fractions)


def compute_clip(samples, spec: QuantSpec, method: str = "mse", **options) -> np.ndarray:
  """Clip ratios of a dynamic spec from sample tokens (module docstring).

  Args:
    samples: per layer, the tensor's tokens as the cache stores them (K after
      RoPE, or V): a sequence of `[..., K, H]` arrays, or one `[L, ..., K, H]`.
    spec: a dynamic quantized spec (per token-head or group scales).
    method: "absmax", "percentile" or "mse".
    **options: percentile: `percentile=99.99`; mse: `num_candidates=100`,
      `min_fraction=0.05`.

  Returns:
    float32 `[L, K]` ratios in (0, 1], as `KVCache.init(..., k_clip=...)` takes them.

  Raises:
    ValueError: for a static or unquantized spec, an unknown method or option, or
      a layer (or kv head) whose samples are missing, all zero, or NaN/inf.
  """
  _check_spec(spec)
  opts = _options(method, options)
  xs = _check_samples(samples, spec)
  nl, k = len(xs), xs[0].shape[1]
  if method == "absmax":
    return np.ones((nl, k), np.float32)
  if method == "percentile":
    q = opts["percentile"]
    if not (isinstance(q, int | float) and 0 < q <= 100):
      raise ValueError(f"percentile must be in (0, 100], got percentile={q!r}")
    clip = np.stack([np.percentile(_positions(x, spec).transpose(1, 0, 2).reshape(k, -1), q,
                                   axis=-1, method="higher") for x in xs])
    if not (clip > 0).all():
      layer, head = (int(i) for i in np.argwhere(~(clip > 0))[0])
      raise ValueError(f"layer {layer}, kv head {head}: the {q}th percentile clip ratio is 0 "
                       f"(over {100 - q:g}% of its values are 0): use a higher percentile")
    return np.minimum(clip, 1.0).astype(np.float32)
  num, lo = opts["num_candidates"], opts["min_fraction"]
  if not (isinstance(num, int) and num >= 1):
    raise ValueError(f"num_candidates must be a positive int, got num_candidates={num!r}")
  if not 0 < lo <= 1:
    raise ValueError(f"min_fraction must be in (0, 1], got min_fraction={lo!r}")
  fractions = np.linspace(1.0, lo, num).astype(np.float32)  # Descending: argmin takes the widest.
  return np.stack([fractions[np.argmin(np.asarray(_clip_errors(jnp.asarray(x),
                                                               jnp.asarray(fractions), spec)),
                                       axis=0)] for x in xs])


@partial(jax.jit, static_argnames=("spec",))
def _saturated(x: jax.Array, clip: jax.Array, spec: QuantSpec) -> jax.Array:
  return jnp.sum(quant.quantize(x, spec, clip=clip).saturated)


def clip_fraction(samples, spec: QuantSpec, clip) -> np.ndarray:
  """Per layer, the fraction of the sample values that `clip` clips (the drift baseline).

  Counted with `quant.quantize`'s `saturated` mask, which is what the cache's
  saturation counters count at run time.

  Args:
    samples: as for `compute_clip`.
    spec: the dynamic spec.
    clip: `[L, K]` (or `[K]`) ratios in (0, 1].

  Returns:
    float64 `[L]`.
  """
  _check_spec(spec)
  xs = _check_samples(samples, spec)
  clip = np.broadcast_to(np.asarray(jax.device_get(clip), np.float32), (len(xs), xs[0].shape[1]))
  quant.validate_clip("clip", clip)
  return np.array([int(_saturated(jnp.asarray(x), jnp.asarray(c), spec)) / x.size
                   for x, c in zip(xs, clip, strict=True)], np.float64)


# ------------------------------------------------------------------- learned
class LearnedClip(NamedTuple):
  """Result of `learn_clip`.

  Attributes:
    clip: float32 `[K]` ratios in (0, 1] of one layer.
    objective: `clip_attention_error` of the returned ratios.
    init_objective: `clip_attention_error` of the initial ratios.
  """

  clip: np.ndarray
  objective: float
  init_objective: float


def _at(params, aux, x, spec: QuantSpec):
  """Fake quantization at clip ratios `params: [K]`."""
  del aux
  return quant.fake_quantize(x, spec, clip=params)


def _from_log(log_c, aux, x, spec: QuantSpec):
  """Fake quantization at `exp(log_c)`, capped at 1: a range wider than the data is waste."""
  del aux
  return quant.fake_quantize(x, spec, clip=jnp.exp(jnp.minimum(log_c, 0.0)))


def _exact(spec, clip, q, k, v, valid, sm, which) -> float:
  return float(objective.exact_error(_at, spec, clip, None, q, k, v, valid, sm,
                                     which=which))


def _check_attention_inputs(q, k, v, spec, clip, which, valid):
  _check_spec(spec)
  valid = objective.check_qkv(q, k, v, which, valid)
  spec.num_groups(q.shape[3])
  if tuple(np.shape(clip)) != (k.shape[2],):
    raise ValueError(f"clip must have shape ({k.shape[2]},) (one ratio per kv head of one "
                     f"layer), got {tuple(np.shape(clip))}")
  quant.validate_clip("clip", clip)
  return valid


def clip_attention_error(q, k, v, spec: QuantSpec, clip, *, which: str = "k", valid=None,
                         softmax_scale: float | None = None) -> float:
  """Mean squared error of causal attention with K (or V) quantized at clip ratios `clip`.

  Like `methods.attention_error`, for a dynamic spec: `clip: [K]` of one layer.
  """
  valid = _check_attention_inputs(q, k, v, spec, clip, which, valid)
  sm = objective.softmax_scale_for(q, softmax_scale)
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  return _exact(spec, f32(clip), f32(q), f32(k), f32(v), valid, sm, which)


def learn_clip(q, k, v, spec: QuantSpec, init_clip, *, which: str = "k", steps: int = 200,
               learning_rate: float = 1e-2, valid=None,
               softmax_scale: float | None = None) -> LearnedClip:
  """Learns one layer's clip ratios (per kv head) minimizing the attention-output error.

  Adam on `log c` (capped at 0, so `c <= 1`) with straight-through rounding
  minimizes `clip_attention_error` on the caller's calibration batch of ONE layer;
  the best ratios seen are then checked against `init_clip` with the exact
  objective (`quant.quantize`), and the better are returned: never worse than
  the start.

  Args:
    q: `[B, T, N, H]` queries after RoPE.
    k, v: `[B, T, K, H]` keys after RoPE and values.
    spec: a dynamic spec.
    init_clip: `[K]` starting ratios in (0, 1] (e.g. ones, or `compute_clip(...)`).
    which: "k" or "v": which tensor the ratios are for.
    steps: optimizer steps; learning_rate: Adam's step on `log c`.
    valid: optional `bool[B, T]` of real tokens; softmax_scale: default `1 / sqrt(H)`.

  Returns:
    A `LearnedClip`.
  """
  valid = _check_attention_inputs(q, k, v, spec, init_clip, which, valid)
  objective.check_steps(steps, learning_rate)
  sm = objective.softmax_scale_for(q, softmax_scale)
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  q, k, v, c0 = f32(q), f32(k), f32(v), f32(init_clip)
  init_obj = _exact(spec, c0, q, k, v, valid, sm, which)
  if steps == 0:
    return LearnedClip(np.asarray(c0), init_obj, init_obj)
  log_c = objective.learn(_from_log, spec, jnp.log(c0), None, q, k, v, valid, sm,
                          which=which, steps=steps, learning_rate=float(learning_rate))
  c = np.asarray(jnp.exp(jnp.minimum(log_c, 0.0)), np.float32)
  try:
    quant.validate_clip("learned clip", c)
    obj = _exact(spec, jnp.asarray(c), q, k, v, valid, sm, which)
  except ValueError:  # A ratio driven to 0 is no candidate.
    obj = float("inf")
  if not obj < init_obj:
    return LearnedClip(np.asarray(c0), init_obj, init_obj)
  return LearnedClip(c, obj, init_obj)
