"""Decode attention kernel: reference vs float64, interpret mode vs reference, TPU compiles."""

import dataclasses
import functools
import importlib.util
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import topologies
from kvtpu.pallas_kernels.decode_attention import (
  BlockSizes,
  Dims,
  decode_attention,
  decode_codes,
  default_block_sizes,
  dequantize_per_token,
  hbm_bytes,
  ref_decode_attention,
  validate_inputs,
  vmem_estimate_bytes,
)

import kvtpu
from tests.helpers import assert_close, covering_cases, np_attention, slow_unless
from tests.pallas_kernels.cases import (
  BLOCK,
  FAST_CASES,
  FORMATS,
  GENERATIONS,
  GQA,
  HEAD_DIMS,
  INTERPRET,
  KERNEL_RTOL,
  STATIC,
  compile_with_default_blocks,
  filled_cache,
  kernel_args,
  runnable,
  split_static,
  tpu_device,
)


# ------------------------------------------------------------- the reference
def test_reference_by_hand():
  # One sequence, one kv head, H = 2, bf16 keys (1, 0) and (0, 1), values 10 and 20.
  # Query (ln 3, 0) at position 1 sees both keys: logits ln 3 and 0 -> p = (3/4, 1/4),
  # output 3/4 * 10 + 1/4 * 20 = 12.5 per channel.
  k = jnp.zeros((1, 1, 1, 4, 2), jnp.bfloat16).at[0, 0, 0, :2].set(jnp.eye(2, dtype=jnp.bfloat16))
  v = jnp.zeros((1, 1, 1, 4, 2), jnp.bfloat16).at[0, 0, 0, :2].set(
      jnp.array([[10.0, 10.0], [20.0, 20.0]], jnp.bfloat16))
  q = jnp.array([[[[np.log(3.0), 0.0]]]], jnp.float32)  # [B=1, T=1, N=1, H=2]
  out = ref_decode_attention(q, k, v, jnp.array([1]), jnp.array([1]), 0)
  np.testing.assert_allclose(out, [[[[12.5, 12.5]]]], rtol=1e-6)
  # With a chunk of 0 the query row is padding: 0, whatever the cache holds.
  out = ref_decode_attention(q, k, v, jnp.array([1]), jnp.array([0]), 0)
  np.testing.assert_array_equal(out, [[[[0.0, 0.0]]]])
  # Two query rows, a chunk of one: the first sees positions 0 and 1, the second is 0.
  out = ref_decode_attention(jnp.concatenate([q, q], axis=1), k, v, jnp.array([1]),
                             jnp.array([1]), 0)
  np.testing.assert_allclose(out, [[[[12.5, 12.5]], [[0.0, 0.0]]]], rtol=1e-6)


@pytest.mark.parametrize("fmt", [
    pytest.param(f, marks=slow_unless(f in ("int8", "int4-asym-g16")))
    for f in ("f32", "bf16", "int8", "int4", "int4-asym-g16", "fp8_e4m3", "fp8_e5m2-sbf16",
              "int8-asym-g8", "int2", "int2-asym-g16", "int4-nu-rot", "int2-nu-g16-sbf16-rot")])
def test_reference_dequantizes_exactly_as_quant(fmt, rng):
  # The kernels' reference reads the cache layout ([B, K, S, H] values, [B, K, G, S]
  # scales) and must mean what kvtpu.quant says a stored value means, bit for bit.
  max_len = 128 if "int2" in fmt else 16  # int2 needs a multiple of 128 positions.
  cache = filled_cache(fmt, rng, lengths=[3, 9], t=4, chunk=[4, 2], kv_heads=2, head_dim=32,
                       max_len=max_len)
  for which in ("k", "v"):
    x = getattr(cache, which).relayout(False)  # int2 at head_dim 32 is stored [.., H, S].
    pick = lambda a: None if a is None else a[1]  # noqa: E731
    got = dequantize_per_token(x.values[1], pick(x.per_token_scale), pick(x.per_token_zero),
                               x.codes)
    # quant.dequantize on the token-major layout: [B, K, S, H] with scales [B, K, S, G].
    swap = lambda a: None if a is None else jnp.swapaxes(a[1], -1, -2)  # noqa: E731
    want = kvtpu.dequantize(x.values[1], x.spec, swap(x.scale), swap(x.zero))
    held = np.arange(max_len)[None, None, :, None] < np.array([7, 11])[:, None, None, None]
    np.testing.assert_array_equal(np.where(held, got, 0), np.where(held, want, 0), err_msg=which)


@pytest.mark.parametrize("dtype", [jnp.int2, jnp.int4])
def test_decode_codes_reads_every_stored_value_as_its_level(dtype):
  # The select chain the kernels run (in VMEM and in the reference) is the table lookup.
  bits = jnp.iinfo(dtype).bits
  levels = kvtpu.quant.lloyd_max_levels(bits)
  q = jnp.arange(-(2 ** (bits - 1)), 2 ** (bits - 1), dtype=jnp.int32).astype(dtype)
  for x in (q, q.astype(jnp.float32)):
    np.testing.assert_array_equal(decode_codes(x, levels), np.asarray(levels, np.float32))


def test_codes_are_checked_at_the_boundary(rng):
  cache = filled_cache("int4-nu-rot", rng, lengths=[3], t=1, chunk=[1], kv_heads=1, head_dim=32,
                       max_len=16)
  q = jnp.zeros((1, 1, 1, 32), jnp.float32)
  args, kw = kernel_args(cache, 1, [1])
  levels = kw["k_codes"]
  with pytest.raises(ValueError, match="do not also pass k_codes"):
    ref_decode_attention(q, cache.k, cache.v, *args[2:], k_codes=levels)
  uniform = filled_cache("int4", rng, lengths=[3], t=1, chunk=[1], kv_heads=1, head_dim=32,
                         max_len=16)
  with pytest.raises(ValueError, match="says how its values are coded; do not also pass v_codes"):
    ref_decode_attention(q, uniform.k, uniform.v, *args[2:], v_codes=levels)
  for bad in (levels[:8], levels[::-1], tuple(range(16)), list(levels)):
    with pytest.raises(ValueError, match="k_codes must be a tuple of 16 ascending floats"):
      ref_decode_attention(q, *args, **{**kw, "k_codes": bad})
  bf16 = filled_cache("bf16", rng, lengths=[3], t=1, chunk=[1], kv_heads=1, head_dim=32, max_len=16)
  with pytest.raises(ValueError, match="v_codes index integer storage, but v is bfloat16"):
    ref_decode_attention(q, bf16.k.values, bf16.v.values, *args[2:], v_codes=levels)


@pytest.mark.parametrize("impl", ["ref", "kernel"])
def test_quantized_tensors_are_unpacked_at_the_boundary(impl, rng):
  cache = filled_cache("k=int4-asym-g16,v=int8", rng, lengths=[0, 5, 130], t=2, chunk=[2, 1, 2],
                       kv_heads=2, head_dim=32, max_len=256)
  q = jnp.asarray(rng.standard_normal((3, 2, 4, 32)), jnp.float32)
  args, kw = kernel_args(cache, 1, [2, 1, 2])
  fn = ref_decode_attention if impl == "ref" else functools.partial(
      decode_attention, interpret=INTERPRET, precision="highest")
  raw = fn(q, *args, **kw)
  packed = fn(q, cache.k, cache.v, *args[2:])
  np.testing.assert_array_equal(packed, raw)
  with pytest.raises(ValueError, match="k is a quantized tensor carrying its scales"):
    fn(q, cache.k, cache.v, *args[2:], k_scale=kw["k_scale"])


@pytest.mark.parametrize("fmt", [pytest.param(f, marks=slow_unless(f == "int4-asym-g16"))
                                 for f in ("bf16", "int8", "int4-asym-g16", "fp8_e5m2")])
def test_reference_matches_float64_numpy(fmt, rng):
  cache = filled_cache(fmt, rng, lengths=[0, 5, 20], t=3, chunk=[3, 1, 3], kv_heads=2, head_dim=32,
                  max_len=24)
  q = rng.standard_normal((3, 3, 6, 32)).astype(np.float32)
  args, kw = kernel_args(cache, 1, [3, 1, 3])
  out = ref_decode_attention(jnp.asarray(q), *args, **kw)
  keys = np.asarray(cache.dequantized(1, "k"), np.float64)
  values = np.asarray(cache.dequantized(1, "v"), np.float64)
  expect = np_attention(q, keys, values, [0, 5, 20], [3, 1, 3], 1.0)
  assert_close(out, expect, atol=2e-5 * np.nanmax(np.abs(np.nan_to_num(values))), rtol=1e-3,
               name=f"ref_decode_attention[{fmt}]")


# --------------------------------------------------------- interpret vs reference
# The oracle of the kernel comparisons: the reference (checked op by op against float64
# numpy above) compiled as one program, which costs less than its per-op compiles.
jitted_ref = jax.jit(ref_decode_attention, static_argnames=STATIC)


def _case_params():
  """Every format, GQA ratio, head_dim and T, not their whole product: the full GQA x
  head_dim product, with formats and T drawn over it by `covering_cases` (each value in
  some case, pairings seeded by the test's name). The FAST_CASES run in the fast tier."""
  cases = covering_cases("test_decode_attention.test_interpret_matches_reference",
                         full={"gqa": GQA, "head_dim": HEAD_DIMS},
                         sampled={"fmt": FORMATS, "t": (1, 4, 8)})
  for i, c in enumerate(cases):
    h, _ = runnable(c["fmt"], c["head_dim"])
    yield pytest.param(c["fmt"], c["gqa"], h, c["t"], id=f"{c['fmt']}-G{c['gqa']}-H{h}-T{c['t']}",
                       marks=slow_unless(i in FAST_CASES))


@pytest.mark.parametrize("fmt,gqa,head_dim,t", list(_case_params()))
def test_interpret_matches_reference(fmt, gqa, head_dim, t, rng):
  max_len = 3 * BLOCK
  # Every edge length in one ragged batch: 0, 1, block-1, block, block+1, capacity.
  lengths = np.array([0, 1, BLOCK - 1, BLOCK, BLOCK + 1, max_len - t])
  chunk = rng.integers(0, t + 1, size=len(lengths))
  chunk[-1] = t  # Fills the cache to capacity.
  cache = filled_cache(fmt, rng, lengths=lengths, t=t, chunk=chunk, kv_heads=1 + (gqa != 8),
                  head_dim=head_dim, max_len=max_len)
  n = cache.kv_heads * gqa
  q = jnp.asarray(rng.standard_normal((len(lengths), t, n, head_dim)) * head_dim**-0.5,
                  jnp.float32)
  args, kw = kernel_args(cache, 1, chunk)
  ref = jitted_ref(q, *args, **kw)
  out = decode_attention(q, *args, **kw, block_sizes=BlockSizes(BLOCK), interpret=INTERPRET,
                         precision="highest")
  assert np.isfinite(np.asarray(out)).all(), "NaN-poisoned memory reached the output"
  scale = float(jnp.max(jnp.abs(ref)))
  assert_close(out, ref, atol=KERNEL_RTOL * scale, name=f"decode_attention[{fmt}]")


@pytest.mark.parametrize("fmt", ["int2", "k=int8,v=int2-asym"])
def test_int2_at_head_dim_64_is_refused_before_mosaic(fmt, rng):
  # Mosaic aborts the process on an int2 block of 64 lanes; the wrappers refuse it at
  # trace time (interpret mode too, so laptops see what a TPU would do), and attend's
  # "auto" on a TPU falls back to XLA. Values stored transposed (a cache's layout at
  # head_dim 64) have whole lanes and run.
  from kvtpu.pallas_kernels.prefill_attention import prefill_attention

  from kvtpu import attention

  cache = filled_cache(fmt, rng, lengths=[3, 0], t=1, chunk=[1, 1], kv_heads=1, head_dim=64,
                       max_len=256)
  assert cache.k.transposed and cache.v.transposed
  natural = dataclasses.replace(cache, k=cache.k.relayout(False), v=cache.v.relayout(False))
  args, kw = kernel_args(natural, 1, [1, 1])
  which = "K/V" if fmt == "int2" else "V"
  for kernel, t in ((decode_attention, 1), (prefill_attention, 16)):
    q = jnp.zeros((2, t, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match=f"int2 {which} blocks need head_dim a multiple of 128"):
      kernel(q, *args, **kw, interpret=INTERPRET)
    assert np.all(np.isfinite(kernel(q, cache.k, cache.v, cache.lengths - 1, jnp.array([1, 1]), 1,
                                     interpret=INTERPRET)))
  assert attention.kernel_support_error("TPU v5 lite", cache.fmt) is None
  assert "head_dim=64" in attention.kernel_support_error("TPU v5 lite", cache.fmt, 64)
  assert attention.kernel_support_error("TPU v5 lite", cache.fmt, 64, (True, True)) is None
  assert attention.kernel_support_error("TPU v5 lite", cache.fmt, 128) is None
  assert "for TPU v4" in attention.kernel_support_error("TPU v4", cache.fmt, 128)


def test_transposed_int2_needs_whole_lane_blocks():
  # Values stored [H, block_s] put positions in lanes: an int2 slab of 64 positions read
  # whole (the block covers it) has rows of 64 lanes, as natural int2 at head_dim 64 does.
  from kvtpu.pallas_kernels.decode_attention import layout_error
  assert layout_error(jnp.int2, jnp.int2, 64, (True, True), 256) is None
  assert layout_error(jnp.int2, jnp.int2, 64, (True, True)) is None
  error = layout_error(jnp.int2, jnp.int2, 64, (True, True), 64)
  assert error.startswith("int2 K/V blocks need block_s a multiple of 128"), error
  error = layout_error(jnp.int2, jnp.int2, 64, (False, True), 64)
  assert "int2 K blocks need head_dim" in error and "int2 V blocks need block_s" in error
  assert layout_error(jnp.int8, jnp.int2, 64, (True, True), 64).startswith("int2 V blocks")
  q = jnp.zeros((1, 1, 1, 64), jnp.float32)
  k = jnp.zeros((1, 1, 1, 64, 64), jnp.int2)  # [L, B, K, H, S=64] values, one whole block.
  scale = jnp.ones((1, 1, 1, 1, 64), jnp.float32)
  one = jnp.ones(1, jnp.int32)
  with pytest.raises(ValueError, match="got block_s=64"):
    decode_attention(q, k, k, one, one, 0, k_scale=scale, v_scale=scale, k_transposed=True,
                     v_transposed=True, interpret=INTERPRET)


def test_unaligned_block_and_edge_block(rng):
  # block_s = 384 does not divide max_len = 640: the edge block is half outside.
  lengths = [0, 383, 384, 385, 639]
  cache = filled_cache("int8", rng, lengths=lengths, t=1, chunk=[1] * 5, kv_heads=2, head_dim=128,
                  max_len=640)
  q = jnp.asarray(rng.standard_normal((5, 1, 4, 128)) * 0.1, jnp.float32)
  args, kw = kernel_args(cache, 1, [1] * 5)
  ref = jitted_ref(q, *args, **kw)
  out = decode_attention(q, *args, **kw, block_sizes=BlockSizes(384), interpret=INTERPRET,
                         precision="highest")
  assert_close(out, ref, atol=KERNEL_RTOL * float(jnp.max(jnp.abs(ref))), name="block 384")


@pytest.mark.slow  # The race detector runs the kernel on two simulated cores, slowly.
def test_race_detection_smoke(rng):
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as mosaic_interpret

  cache = filled_cache("int4-asym-g16", rng, lengths=[3, 200], t=2, chunk=[2, 2], kv_heads=2,
                  head_dim=64, max_len=256)
  q = jnp.asarray(rng.standard_normal((2, 2, 4, 64)) * 0.1, jnp.float32)
  args, kw = kernel_args(cache, 1, [2, 2])
  params = dataclasses.replace(INTERPRET, detect_races=True, num_cores_or_threads=2)
  out = decode_attention(q, *args, **kw, block_sizes=BlockSizes(BLOCK), interpret=params)
  jax.block_until_ready(out)
  assert not mosaic_interpret.races.races_found
  ref = jitted_ref(q, *args, **kw)
  assert_close(out, ref, atol=KERNEL_RTOL * float(jnp.max(jnp.abs(ref))), name="race run")


@pytest.mark.parametrize("fmt", [
    pytest.param(f, marks=slow_unless(f == "int8-head"))
    for f in ("int8-head", "int4-asym-channel", "k=fp8_e4m3-tensor,v=int8-asym-head")])
def test_attend_folds_static_scales_around_the_kernel(fmt, rng):
  f = kvtpu.KVFormat.parse(fmt)
  static = {}
  for name, spec in (("k", f.k), ("v", f.v)):
    shape = kvtpu.quant.static_scale_shape(spec, 2, 64)
    static[f"{name}_scale"] = rng.uniform(0.02, 0.05, shape).astype(np.float32)
    if not spec.symmetric:
      static[f"{name}_zero"] = np.round(rng.uniform(-3, 3, shape)).astype(np.float32)
  cache = kvtpu.KVCache.init(f, num_layers=1, batch=3, kv_heads=2, max_len=256, head_dim=64,
                             **static)
  lengths, valid = np.array([0, 100, 250]), np.array([0, 3, 2])
  pre = jnp.asarray(rng.standard_normal((3, 250, 2, 64)), jnp.float32)
  cache = cache.update(0, pre, pre, valid_len=lengths).advance(lengths)
  new = jnp.asarray(rng.standard_normal((3, 3, 2, 64)), jnp.float32)
  cache = cache.update(0, new, new, valid_len=valid)
  q = jnp.asarray(rng.standard_normal((3, 3, 6, 64)), jnp.float32)
  ref = kvtpu.attend(q, cache, 0, valid_len=valid, impl="xla")
  out = kvtpu.attend(q, cache, 0, valid_len=valid, impl="interpret",
                     precision="highest")
  assert_close(out, ref, atol=KERNEL_RTOL * float(jnp.max(jnp.abs(ref))), name=fmt)
  np.testing.assert_array_equal(out[0], 0.0)  # No keys: zeros, also after the zero point.


# -------------------------------------------------------------- configuration
def test_block_sizes_and_estimates():
  assert BlockSizes(100).resolve(64) == 64  # One block of the full S.
  assert BlockSizes(384).resolve(1000) == 384
  with pytest.raises(ValueError, match="block_s=100 must be a multiple of 128"):
    BlockSizes(100).resolve(1000)
  with pytest.raises(ValueError, match="block_s must be a positive int"):
    BlockSizes(0)
  for k_dtype, v_dtype, h in itertools.product([jnp.bfloat16, jnp.int8, jnp.int4],
                                               [jnp.bfloat16, jnp.int4], HEAD_DIMS):
    bs = default_block_sizes(k_dtype, v_dtype, h).block_s
    assert bs % 128 == 0 and 128 <= bs <= 4096
    sds = jax.ShapeDtypeStruct
    d = validate_inputs(sds((8, 8, 64, h), jnp.float32), sds((1, 8, 8, 32768, h), k_dtype),
                        sds((1, 8, 8, 32768, h), k_dtype), jnp.zeros(8, jnp.int32),
                        jnp.zeros(8, jnp.int32), 0)
    # Double-buffered blocks of the largest case fit v5e's 16 MiB default scoped VMEM.
    assert vmem_estimate_bytes(d, bs, k_dtype, v_dtype) < 16 * 2**20


def test_hbm_account_by_hand():
  # B=2, K=1, H=128, int8 K and V with f32 per-token scales, block 128.
  # Sequence 0: 300 tokens held + 1 new -> ceil(301/128) = 3 blocks; sequence 1 is
  # empty: the first block is still fetched once. Each block: 2 * 128 * 128 bytes of
  # K/V + 2 * 128 * 4 bytes of scales = 33792; q and output: 2 * 2*1*1*128 * 4.
  d = validate_inputs(jnp.zeros((2, 1, 1, 128)), jnp.zeros((1, 2, 1, 512, 128), jnp.int8),
                      jnp.zeros((1, 2, 1, 512, 128), jnp.int8), jnp.zeros(2, jnp.int32),
                      jnp.zeros(2, jnp.int32), 0, jnp.ones((1, 2, 1, 1, 512)), None,
                      jnp.ones((1, 2, 1, 1, 512)))
  got = hbm_bytes(d, 128, [300, 0], [1, 0], jnp.int8, jnp.int8)
  assert got["kv"] + got["scales"] == 4 * 33792
  assert got["total"] == 4 * 33792 + 2 * 2 * 128 * 4


def test_bad_inputs_share_one_validation():
  q, kv = jnp.zeros((2, 1, 4, 64)), jnp.zeros((1, 2, 2, 128, 64), jnp.int8)
  i32 = jnp.zeros(2, jnp.int32)
  for fn in (decode_attention, ref_decode_attention):
    with pytest.raises(ValueError, match="decode attention takes T <= 8"):
      fn(jnp.zeros((2, 9, 4, 64)), kv, kv, i32, i32, 0)
    with pytest.raises(ValueError, match="N=3 query heads must be a multiple of K=2"):
      fn(jnp.zeros((2, 1, 3, 64)), kv, kv, i32, i32, 0)
    with pytest.raises(TypeError, match="is not a storage dtype"):
      fn(q, kv.astype(jnp.int32), kv, i32, i32, 0)
    with pytest.raises(ValueError, match=r"k_scale must be per-token scales \[L=1, B=2, K=2, G, S=128\]"):
      fn(q, kv, kv, i32, i32, 0, k_scale=jnp.ones((1, 2, 2, 1, 64)))
    with pytest.raises(ValueError, match="lengths must be i32"):
      fn(q, kv, kv, jnp.zeros(3, jnp.int32), i32, 0)


# ------------------------------------------------------------- TPU compilation
def _compile_cases():
  """Every format on v5e, and every format again on one of the other generations (drawn
  by `covering_cases`, so each generation compiles three or four formats); head dims
  drawn so that each appears on v5e and among the others. One case runs in the fast
  tier."""
  name = "test_decode_attention.test_compiles_through_mosaic"
  cases = [dict(gen="v5e", **c) for c in covering_cases(
      name, full={"fmt": FORMATS}, sampled={"head_dim": HEAD_DIMS})]
  cases += covering_cases(name, full={}, sampled={
      "gen": [g for g in GENERATIONS if g != "v5e"], "fmt": FORMATS, "head_dim": HEAD_DIMS})
  for i, c in enumerate(cases):
    h, gen = runnable(c["fmt"], c["head_dim"], c["gen"])
    yield pytest.param(gen, c["fmt"], h, id=f"{gen}-{c['fmt']}-H{h}", marks=slow_unless(i == 0))


@pytest.mark.tpu_compile
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
@pytest.mark.parametrize("generation,fmt,head_dim", list(_compile_cases()))
def test_compiles_through_mosaic(generation, fmt, head_dim):
  sharding = jax.sharding.SingleDeviceSharding(tpu_device(generation))
  cache = jax.eval_shape(lambda: kvtpu.KVCache.init(fmt, num_layers=2, batch=4, kv_heads=2,
                                                    max_len=2048, head_dim=head_dim))
  q = jax.ShapeDtypeStruct((4, 2, 16, head_dim), jnp.float32)
  args, kw = kernel_args(cache, 1, jnp.zeros(4, jnp.int32))
  kw, codes = split_static(kw)
  on_tpu = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)  # noqa: E731
  args = jax.tree.map(on_tpu, (q, *args[:3], jax.ShapeDtypeStruct((4,), jnp.int32)))
  kw = jax.tree.map(on_tpu, kw)
  fn = jax.jit(lambda q, k, v, lengths, chunk, kw: decode_attention(q, k, v, lengths, chunk, 1,
                                                                    **kw, **codes))
  compiled = fn.lower(*args, kw).compile()  # Raises if Mosaic rejects the kernel.
  # The f32 output, at least (H = 64 pads to 128 lanes in TPU tiles).
  assert compiled.memory_analysis().output_size_in_bytes >= 4 * 2 * 16 * head_dim * 4


def test_default_blocks_shrink_only_for_many_query_heads():
  # T x G rows of logits per KV block: up to G = 8 the rule's block, above it halved
  # until a step of 8 tokens fits v5e's 16 MiB of scoped VMEM by the estimate.
  for dtype in (jnp.int2, jnp.int4, jnp.int8, jnp.bfloat16):
    rule = default_block_sizes(dtype, dtype, 128).block_s
    assert default_block_sizes(dtype, dtype, 128, 8).block_s == rule
    for group in (16, 32, 64, 128):
      block = default_block_sizes(dtype, dtype, 128, group).block_s
      d = Dims(1, 1, 8, group, 1, block, 128, 1, 1)
      assert block <= rule and block % 128 == 0
      assert vmem_estimate_bytes(d, block, dtype, dtype) <= 16 * 2**20 or block == 128


@pytest.mark.tpu_compile
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
@pytest.mark.parametrize("fmt,group", [("int4", 16), pytest.param(
    "int2-nu-sbf16-rot+sink4+recent252", 64, marks=pytest.mark.slow)])
def test_default_blocks_compile_on_v5e_with_many_query_heads(fmt, group):
  # 8 tokens x 64 query heads per kv head over the rule's 4096-position int2 block
  # overflowed v5e's scoped VMEM.
  compile_with_default_blocks(decode_attention, fmt, t=8, group=group)


@pytest.mark.tpu_compile
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
@pytest.mark.parametrize("fmt,precision", [(f, "highest") for f in ("bf16", "int8", "int4", "int2",
                                                                    "fp8_e5m2")] + [("int8", "high")])
def test_support_table_matches_the_compiler_on_v3(fmt, precision):
  """kvtpu.attention's tables of unsupported (generation, dtype) pairs and of generations
  without bf16 matmuls are what Mosaic says."""
  from kvtpu import attention

  device = topologies.get_topology_desc(platform="tpu", topology_name="v3:1x1").devices[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  cache = jax.eval_shape(lambda: kvtpu.KVCache.init(fmt, num_layers=1, batch=2, kv_heads=2,
                                                    max_len=1024, head_dim=128))
  args, kw = kernel_args(cache, 0, jnp.zeros(2, jnp.int32))
  on_tpu = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)  # noqa: E731
  args = jax.tree.map(on_tpu, (jax.ShapeDtypeStruct((2, 1, 4, 128), jnp.float32), *args[:3],
                               jax.ShapeDtypeStruct((2,), jnp.int32)))
  fn = jax.jit(lambda q, k, v, lengths, chunk, kw: decode_attention(q, k, v, lengths, chunk, 0,
                                                                    precision=precision, **kw))
  expected_error = attention.kernel_support_error(device.device_kind, cache.fmt) or (
      precision != "highest" and "v3" in attention._F32_MATMUL_ONLY)
  if not expected_error:
    fn.lower(*args, jax.tree.map(on_tpu, kw)).compile()
  else:
    with pytest.raises(Exception, match="Mosaic failed to compile TPU kernel"):
      fn.lower(*args, jax.tree.map(on_tpu, kw)).compile()
