"""Attention over a span of positions (`kv_span`) with its log-sum-exp (`return_lse`).

The calls over disjoint spans of a sequence, merged by their log-sum-exps
(`merge_partials`), are attention over the whole sequence: the mechanism of sharding
a sequence's pages over devices (or splitting a long sequence over cores).
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kvtpu.pallas_kernels.decode_attention import (
  BlockSizes,
  decode_attention,
  hbm_bytes,
  merge_partials,
  validate_inputs,
)
from kvtpu.pallas_kernels.prefill_attention import PrefillBlockSizes, prefill_attention

import kvtpu
from tests.helpers import slow_unless
from tests.pallas_kernels.cases import (
  BLOCK,
  INTERPRET,
  filled_cache,
  kernel_args,
  logical_args,
  split_static,
  tpu_device,
)

MAX_LEN = 3 * BLOCK
# Span boundaries: inside the sink, mid-block, at a block edge, past the end.
CUTS = [0, 3, 200, 2 * BLOCK, MAX_LEN]


def spans(b: int, cuts=CUTS):
  return [(np.full(b, lo, np.int32), np.full(b, hi, np.int32))
          for lo, hi in zip(cuts[:-1], cuts[1:], strict=True)]


SPAN_CASES = [("int4-sbf16-rot+sink4+recent16", 4),
              ("k=int2-asym-c16,v=int4-c16-sbf16+recent16", 1), ("int4-asym-g16", 8), ("bf16", 20)]


@pytest.mark.parametrize("fmt,t", [pytest.param(f, t, marks=slow_unless(i == 0))
                                   for i, (f, t) in enumerate(SPAN_CASES)])
def test_disjoint_spans_merge_to_the_whole(fmt, t, rng):
  lengths = np.array([0, 1, BLOCK - 1, BLOCK + 1, MAX_LEN - t])
  chunk = np.minimum(np.array([t, 1, t, 0, t]), t)
  cache = filled_cache(fmt, rng, lengths=lengths, t=t, chunk=chunk, kv_heads=2, head_dim=128,
                       max_len=MAX_LEN)
  q = jnp.asarray(rng.standard_normal((len(lengths), t, 4, 128)) * 128**-0.5, jnp.float32)
  args, kw = kernel_args(cache, 1, chunk)
  if t <= 8:
    call = lambda **k: decode_attention(q, *args, **kw, block_sizes=BlockSizes(BLOCK),  # noqa: E731
                                        precision="highest", interpret=INTERPRET, **k)
  else:
    call = lambda **k: prefill_attention(q, *args, **kw, precision="highest",  # noqa: E731
                                         block_sizes=PrefillBlockSizes(8, BLOCK),
                                         interpret=INTERPRET, **k)
  whole, whole_lse = call(return_lse=True)
  np.testing.assert_array_equal(np.asarray(call()), np.asarray(whole))
  parts = [call(kv_span=s, return_lse=True) for s in spans(len(lengths))]
  merged = merge_partials([o for o, _ in parts], [x for _, x in parts])
  assert np.isfinite(np.asarray(merged)).all(), "NaN-poisoned memory reached the output"
  scale = float(jnp.max(jnp.abs(whole)))
  np.testing.assert_allclose(np.asarray(merged), np.asarray(whole), atol=5e-6 * scale)
  total = jax.scipy.special.logsumexp(jnp.stack([x for _, x in parts]), axis=0)
  np.testing.assert_allclose(np.asarray(total), np.asarray(whole_lse), atol=1e-5)
  # Padding rows, and rows of a span that sees nothing: output 0, log-sum-exp -inf.
  padding = np.arange(t)[None, :] >= chunk[:, None]
  assert (np.asarray(whole_lse)[padding] == -np.inf).all()
  first_out, first_lse = parts[0]  # Positions [0, 3): the sequence of length 0 sees t of them.
  sees_none = np.asarray(first_lse) == -np.inf
  assert (np.asarray(first_out)[sees_none] == 0).all()
  assert not sees_none[0, :min(t, 3)].any() and sees_none[3].all()


def test_log_sum_exp_is_that_of_the_logits(rng):
  # bf16 keys are used as stored: the row's log-sum-exp in float64 over what it sees.
  lengths, chunk, t = np.array([0, 5, 300]), np.array([2, 1, 2]), 2
  cache = filled_cache("bf16", rng, lengths=lengths, t=t, chunk=chunk, kv_heads=1, head_dim=128,
                       max_len=MAX_LEN)
  q = jnp.asarray(rng.standard_normal((3, t, 2, 128)) * 0.05, jnp.float32)
  args, kw = kernel_args(cache, 1, chunk)
  span = (np.array([0, 2, 100], np.int32), np.array([1, 6, 301], np.int32))
  _, lse = decode_attention(q, *args, **kw, kv_span=span, return_lse=True, precision="highest",
                            block_sizes=BlockSizes(BLOCK), interpret=INTERPRET)
  keys = np.asarray(cache.k.values[1].astype(jnp.float32), np.float64)  # [B, K, S, H]
  for b in range(3):
    for i in range(t):
      if i >= chunk[b]:
        assert (np.asarray(lse)[b, i] == -np.inf).all()
        continue
      seen = np.arange(span[0][b], min(span[1][b], lengths[b] + i + 1))
      for n in range(2):
        logits = keys[b, 0, seen] @ np.asarray(q[b, i, n], np.float64)
        expect = np.log(np.exp(logits - logits.max()).sum()) + logits.max()
        np.testing.assert_allclose(float(lse[b, i, n]), expect, rtol=1e-6)


@pytest.mark.parametrize("fmt,t,block_t", [("int8", 1, None), pytest.param(
    "int4-asym+sink4+recent64", 20, 8, marks=pytest.mark.slow)])
def test_span_account_matches_interpreter_copies(fmt, t, block_t, copied_bytes, rng):
  lengths = np.array([0, 5, 130, 300, 380 - t])
  chunk = np.array([t, 0, 1, t, t])
  span = (np.array([0, 0, 130, 129, 200], np.int32), np.array([384, 9, 131, 250, 384], np.int32))
  cache = filled_cache(fmt, rng, lengths=lengths, t=t, chunk=chunk, kv_heads=2, head_dim=64,
                       max_len=MAX_LEN)
  q = jnp.asarray(rng.standard_normal((len(lengths), t, 4, 64)), jnp.float32)
  args, kw = kernel_args(cache, 1, chunk)
  if block_t is None:
    out = decode_attention(q, *args, **kw, kv_span=span, block_sizes=BlockSizes(BLOCK),
                           interpret=INTERPRET)
  else:
    out = prefill_attention(q, *args, **kw, kv_span=span, interpret=INTERPRET,
                            block_sizes=PrefillBlockSizes(block_t, BLOCK))
  jax.block_until_ready(out)
  d = validate_inputs(q, *logical_args(args, kw), kw["k_scale"], kw["k_zero"], kw["v_scale"], kw["v_zero"],
                      max_t=None)
  itemsize = {w: cache.tensor(w).spec.scale_jnp_dtype.itemsize for w in ("k", "v")}
  common = dict(block_t=block_t, has_zero=(kw["k_zero"] is not None, kw["v_zero"] is not None),
                windows=(cache.fmt.sink, cache.fmt.recent), scale_itemsize=itemsize)
  account = hbm_bytes(d, BLOCK, lengths, chunk, cache.k.dtype, cache.v.dtype, span=span, **common)
  assert copied_bytes["k_ref"] > 0
  assert sum(copied_bytes.values()) == account["total"] - account["out"], (copied_bytes, account)
  whole = hbm_bytes(d, BLOCK, lengths, chunk, cache.k.dtype, cache.v.dtype, **common)
  assert account["kv"] < whole["kv"]


def test_bad_spans_are_named(rng):
  cache = filled_cache("int8", rng, lengths=[3, 4], t=1, chunk=[1, 1], kv_heads=1, head_dim=128,
                       max_len=BLOCK)
  q = jnp.zeros((2, 1, 1, 128), jnp.float32)
  args, kw = kernel_args(cache, 1, [1, 1])
  for bad in (np.zeros(2, np.int32), (np.zeros(3, np.int32), np.ones(3, np.int32)),
              (np.zeros(2, np.float32), np.ones(2, np.float32))):
    with pytest.raises(ValueError, match="kv_span"):
      decode_attention(q, *args, **kw, kv_span=bad, interpret=INTERPRET)


@pytest.mark.tpu_compile
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
@pytest.mark.parametrize("generation,fmt,t", [("v5e", "int4-sbf16-rot+sink4+recent252", 1),
                                              ("v6e", "int8", 8), ("v5e", "int4-asym-g16", 40)])
def test_spans_and_log_sum_exps_compile_through_mosaic(generation, fmt, t):
  sharding = jax.sharding.SingleDeviceSharding(tpu_device(generation))
  cache = jax.eval_shape(lambda: kvtpu.KVCache.init(fmt, num_layers=1, batch=2, kv_heads=2,
                                                    max_len=2048, head_dim=128))
  args, kw = kernel_args(cache, 0, jnp.zeros(2, jnp.int32))
  kw, static = split_static(kw)
  on_tpu = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)  # noqa: E731
  i32 = jax.ShapeDtypeStruct((2,), jnp.int32)
  args = jax.tree.map(on_tpu, (jax.ShapeDtypeStruct((2, t, 8, 128), jnp.float32), *args[:3], i32,
                               (i32, i32)))
  kernel = decode_attention if t <= 8 else prefill_attention
  fn = jax.jit(lambda q, k, v, lengths, chunk, span, kw: kernel(
      q, k, v, lengths, chunk, 0, **kw, **static, kv_span=span, return_lse=True))
  compiled = fn.lower(*args, jax.tree.map(on_tpu, kw)).compile()  # Raises if Mosaic rejects it.
  assert compiled.memory_analysis().output_size_in_bytes >= 2 * t * 8 * (128 + 1) * 4
