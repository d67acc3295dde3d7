"""The objective that learned scales and learned clip ratios share, and its one optimizer loop.

Both learn, for ONE layer, the parameters of how K (or V) is quantized so that
causal attention over the quantized tensor matches exact attention: the mean
squared error of the attention output (`attention_error`) on the caller's
calibration batch, with `quant.fake_quantize` standing in for the cache's
quantize/dequantize round trip. Its forward value is that round trip exactly, so the
objective the optimizer sees and the exact objective a result is judged by are the
same function. `learn` runs Adam on it (`minimize`) and returns the best parameters
seen, and the caller keeps them only if they beat its starting point.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["causal_attention", "output_error", "check_qkv", "attention_error", "exact_error",
           "minimize", "learn", "check_steps", "softmax_scale_for"]


def causal_attention(q, k, v, valid, softmax_scale):
  """Causal GQA softmax attention, float32: `q: [B, T, N, H]`, `k, v: [B, T, K, H]`."""
  b, t, n, h = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, t, kv, n // kv, h)
  logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k) * softmax_scale
  mask = jnp.tril(jnp.ones((t, t), bool))[None, None, None] & valid[:, None, None, None, :]
  logits = jnp.where(mask, logits, -1e30)
  p = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("BKGTS,BSKH->BTKGH", p, v).reshape(b, t, n, h)


def output_error(out, ref, valid):
  """Sum over valid queries, heads and channels of `(out - ref)**2`, over their count."""
  w = valid.astype(jnp.float32)[:, :, None, None]
  denom = jnp.maximum(jnp.sum(valid), 1) * out.shape[2] * out.shape[3]
  return jnp.sum(w * jnp.square(out - ref)) / denom


def check_qkv(q, k, v, which: str, valid) -> jax.Array:
  """Validates one layer's attention inputs; returns `valid` as `bool[B, T]`."""
  if which not in ("k", "v"):
    raise ValueError(f"which must be 'k' or 'v', got {which=}")
  if jnp.ndim(q) != 4 or jnp.ndim(k) != 4 or jnp.shape(k) != jnp.shape(v):
    raise ValueError(f"need q: [B, T, N, H], k, v: [B, T, K, H], got q{list(jnp.shape(q))}, "
                     f"k{list(jnp.shape(k))}, v{list(jnp.shape(v))}")
  b, t, n, h = q.shape
  if k.shape[:2] != (b, t) or k.shape[3] != h or n % k.shape[2]:
    raise ValueError(f"q{list(q.shape)} and k{list(k.shape)} disagree on B, T or H, or N is "
                     "not a multiple of K")
  if valid is None:
    return jnp.ones((b, t), bool)
  if tuple(jnp.shape(valid)) != (b, t):
    raise ValueError(f"valid must be bool[B, T]={(b, t)}, got {tuple(jnp.shape(valid))}")
  return jnp.asarray(valid, bool)


def softmax_scale_for(q, softmax_scale: float | None) -> float:
  """The logit scale: `softmax_scale`, or `1 / sqrt(H)`."""
  return float(softmax_scale) if softmax_scale is not None else 1.0 / float(np.sqrt(q.shape[-1]))


def attention_error(fake: Callable, spec, params, aux, q, k, v, valid, softmax_scale,
                    which: str):
  """`output_error` of attention with `which` replaced by `fake(params, aux, x, spec)`."""
  ref = causal_attention(q, k, v, valid, softmax_scale)
  x = k if which == "k" else v
  xq = fake(params, aux, x, spec)
  kk, vv = (xq, v) if which == "k" else (k, xq)
  return output_error(causal_attention(q, kk, vv, valid, softmax_scale), ref, valid)


def minimize(loss_fn, x0: jax.Array, steps: int, learning_rate: float) -> jax.Array:
  """`steps` Adam steps on `loss_fn` from `x0` (under jit, as one `lax.scan`).

  Returns the parameters of the lowest loss seen, the final ones included: the
  straight-through losses are not smooth, so the last step need not be the best.
  """
  opt = optax.adam(learning_rate)

  def step(carry, _):
    x, opt_state, best_loss, best = carry
    loss, grad = jax.value_and_grad(loss_fn)(x)
    better = loss < best_loss
    best_loss = jnp.where(better, loss, best_loss)
    best = jnp.where(better, x, best)
    updates, opt_state = opt.update(grad, opt_state)
    return (optax.apply_updates(x, updates), opt_state, best_loss, best), loss

  init = (x0, opt.init(x0), jnp.asarray(jnp.inf, jnp.float32), x0)
  (x, _, best_loss, best), _ = jax.lax.scan(step, init, None, length=steps)
  return jnp.where(loss_fn(x) < best_loss, x, best)


@partial(jax.jit, static_argnames=("fake", "spec", "which", "steps", "learning_rate"))
def learn(fake: Callable, spec, params0, aux, q, k, v, valid, softmax_scale, *, which: str,
          steps: int, learning_rate: float):
  """The parameters minimizing `attention_error(fake, ...)`, by `minimize` from `params0`.

  `fake(params, aux, x, spec)` fake-quantizes `x` (with `quant.fake_quantize`); `aux` is
  data it needs that is not learned. `fake` (a module-level function) and `spec` are
  static: one compiled loop serves every layer.
  """
  return minimize(
      lambda p: attention_error(fake, spec, p, aux, q, k, v, valid, softmax_scale, which),
      params0, steps, learning_rate)


@partial(jax.jit, static_argnames=("fake", "spec", "which"))
def exact_error(fake: Callable, spec, params, aux, q, k, v, valid, softmax_scale, *,
                which: str):
  """`attention_error` as one jitted value: the exact objective, since `fake_quantize`'s
  forward is the cache's quantize/dequantize round trip."""
  return attention_error(fake, spec, params, aux, q, k, v, valid, softmax_scale, which)


def check_steps(steps, learning_rate) -> None:
  """Raises for steps that are not an int >= 0 or a learning rate that is not > 0."""
  if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0):
    raise ValueError(f"steps must be an int >= 0, got {steps=}")
  if not learning_rate > 0:
    raise ValueError(f"learning_rate must be > 0, got {learning_rate=}")
