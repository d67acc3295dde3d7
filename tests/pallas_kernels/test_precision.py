"""The kernels' bf16 MXU operands against float64 attention, within the stated budget.

The kernels multiply with f32 accumulation and, by `precision`, bf16 operands (DEFAULT:
one pass), bf16 high and low parts of the f32 operands (HIGH, the default: 2-3 passes)
or f32 (HIGHEST, checked against the reference at `KERNEL_RTOL` in the other kernel
tests). The budget (docs/kernels.md#matmul-precision), per output row over the
positions i it sees, with u = 2^-8 (bf16's unit roundoff) and A = |q| . |k_i|:

  logits off by at most  D = c_qk max_i A_i + eps_H max_i A_i
  output off by at most  (exp(2 D) - 1) (max_i v_i - min_i v_i) / 2 + (c_pv + eps_S) max_i |v_i|

c = 2u + u^2 at DEFAULT (both operands rounded), 3u^2 at HIGH (the dropped low x low
product and the rounding of the low parts), eps_n = (n + 8) 2^-24 for f32 sums. The
cached values here are those the kernels read (dequantized by the reference), so the
budget is the kernels' arithmetic alone, not the formats' quantization error.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kvtpu.pallas_kernels.decode_attention import BlockSizes, check_precision, decode_attention
from kvtpu.pallas_kernels.decode_attention import reference as decode_reference
from kvtpu.pallas_kernels.prefill_attention import PrefillBlockSizes, prefill_attention

import kvtpu
from tests.helpers import slow_unless
from tests.pallas_kernels.cases import (
  FORMATS,
  INTERPRET,
  filled_cache,
  kernel_args,
  runnable,
  split_static,
)

U = 2.0**-8
COEF = {"default": 2 * U + U * U, "high": 3 * U * U}
# The 4-bit and 2-bit schemes with a ring of 16 (bf16 matmuls) and a sink of 4 (f32).
WINDOWED = ["int4-sbf16-rot+sink4+recent16", "int2-nu-sbf16-rot+sink4+recent16"]
BLOCK = 128


def dequantized(q, args, kw, monkeypatch):
  """The float32 keys and values `[B, K, S, H]` the reference attends over (windows
  overlaid), taken from `ref_decode_attention` (one compiled program)."""
  def keys_values(q, args, arrays, static):
    seen = {}

    def capture(q, keys, values, lengths, chunk, **_):
      seen.update(keys=keys, values=values)
      return q

    with monkeypatch.context() as m:
      m.setattr(decode_reference, "masked_attention", capture)
      decode_reference.ref_decode_attention(q, *args, **arrays, **static, max_t=None)
    return seen["keys"], seen["values"]

  arrays, static = split_static(kw)
  keys, values = jax.jit(lambda q, args, arrays: keys_values(q, args, arrays, static))(
      q, args, arrays)
  return np.asarray(keys, np.float64), np.asarray(values, np.float64)


def exact_and_budget(q, keys, values, lengths, chunk, coef):
  """float64 attention `[B, T, N, H]` and the budget of each output element."""
  q = np.asarray(q, np.float64)
  b_, t_, n_, h = q.shape
  kh = keys.shape[1]
  out, bound = np.zeros(q.shape), np.zeros(q.shape)
  for b in range(b_):
    for t in range(min(t_, chunk[b])):
      seen = min(lengths[b] + t + 1, keys.shape[2])
      for n in range(n_):
        k, v = keys[b, n // (n_ // kh), :seen], values[b, n // (n_ // kh), :seen]
        logits = k @ q[b, t, n]
        p = np.exp(logits - logits.max())
        out[b, t, n] = p @ v / p.sum()
        a = float((np.abs(k) @ np.abs(q[b, t, n])).max())
        d = (coef + (h + 8) * 2.0**-24) * a
        bound[b, t, n] = (np.expm1(2 * d) * (v.max(0) - v.min(0)) / 2
                          + (coef + (seen + 8) * 2.0**-24) * np.abs(v).max(0))
  return out, bound


def keys_with_realistic_outliers(rng, shape):
  """Keys whose outlier channels are 8x the median channel (SmolLM2's: 3-7x)."""
  x = rng.standard_normal(shape).astype(np.float32)
  x[..., rng.choice(shape[-1], 2, replace=False)] *= 8.0
  return x


def budget_case(fmt, rng, monkeypatch, *, t, lengths, chunk):
  """A NaN-poisoned cache of 2 BLOCK positions with `lengths` held and a `t`-token chunk,
  queries of 2 heads whose logits are a few units (as in a model, softmax scale
  1/sqrt(H)), the kernel's arguments, and the keys and values it reads (float64, 0
  where nothing is held)."""
  head_dim, _ = runnable(fmt, 64)
  cache = filled_cache(fmt, rng, lengths=lengths, t=t, chunk=chunk, kv_heads=1,
                       head_dim=head_dim, max_len=2 * BLOCK)
  q = jnp.asarray(keys_with_realistic_outliers(rng, (len(lengths), t, 2, head_dim))
                  * head_dim**-0.5 / 8, jnp.float32)
  args, kw = kernel_args(cache, 1, chunk)
  keys, values = dequantized(q, args, kw, monkeypatch)
  return q, args, kw, np.where(np.isfinite(keys), keys, 0.0), np.where(
      np.isfinite(values), values, 0.0)


@pytest.mark.parametrize("fmt", [pytest.param(f, marks=slow_unless(f in ("int8", "int4-asym-g16",
                                                                          WINDOWED[0])))
                                 for f in FORMATS + WINDOWED])
def test_kernels_meet_the_bf16_budget(fmt, rng, monkeypatch):
  t = 2
  lengths = np.array([0, 1, BLOCK - 1, BLOCK + 1, 2 * BLOCK - t])
  chunk = np.array([2, 1, 2, 0, t])
  q, args, kw, keys, values = budget_case(fmt, rng, monkeypatch, t=t, lengths=lengths,
                                          chunk=chunk)
  errors = {}
  for precision, coef in COEF.items():
    exact, bound = exact_and_budget(q, keys, values, lengths, chunk, coef)
    out = np.asarray(decode_attention(q, *args, **kw, block_sizes=BlockSizes(BLOCK),
                                      precision=precision, interpret=INTERPRET), np.float64)
    err = np.abs(out - exact)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert (err <= bound).all(), (
        f"{fmt} at {precision}: error {err[worst]:.3g} over its budget {bound[worst]:.3g} at "
        f"{worst}")
    errors[precision] = err.max() / np.abs(exact).max()
  # HIGH is the accurate setting: far below DEFAULT's error on the same data.
  assert errors["high"] < errors["default"] / 20, errors
  print(f"{fmt}: max |err| / max |out|: default {errors['default']:.2e}, "
        f"high {errors['high']:.2e}")


@pytest.mark.parametrize("fmt", ["int8", "k=int2-asym-c16,v=int4-c16-sbf16+recent16"])
def test_prefill_meets_the_bf16_budget(fmt, rng, monkeypatch):
  t = 24
  lengths, chunk = np.array([0, BLOCK - 1, 2 * BLOCK - t]), np.array([t, 9, t])
  q, args, kw, keys, values = budget_case(fmt, rng, monkeypatch, t=t, lengths=lengths,
                                          chunk=chunk)
  for precision, coef in COEF.items():
    exact, bound = exact_and_budget(q, keys, values, lengths, chunk, coef)
    out = np.asarray(prefill_attention(q, *args, **kw, block_sizes=PrefillBlockSizes(8, BLOCK),
                                       precision=precision, interpret=INTERPRET), np.float64)
    assert (np.abs(out - exact) <= bound).all(), (fmt, precision)


def test_precision_names_and_refusals():
  assert check_precision(None) == jax.lax.Precision.HIGH
  for name, p in (("default", "DEFAULT"), ("high", "HIGH"), ("highest", "HIGHEST")):
    assert check_precision(name) == getattr(jax.lax.Precision, p)
  for bad in ("bf16x9", 3.5, "fast"):
    with pytest.raises(ValueError, match="precision must be"):
      check_precision(bad)
  q = jnp.zeros((1, 1, 1, 128), jnp.float32)
  cache = kvtpu.KVCache.init("int8", num_layers=1, batch=1, kv_heads=1, max_len=128, head_dim=128)
  with pytest.raises(ValueError, match="precision must be"):
    kvtpu.attend(q, cache.update(0, q, q), 0, impl="interpret", precision="fast")
