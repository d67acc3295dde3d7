"""Chunked-prefill kernel: interpret mode vs the reference, attend dispatch, TPU compiles."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kvtpu.pallas_kernels.decode_attention import Dims, default_block_sizes
from kvtpu.pallas_kernels.prefill_attention import (
  PrefillBlockSizes,
  default_prefill_block_sizes,
  prefill_attention,
  prefill_vmem_estimate_bytes,
  ref_prefill_attention,
)

import kvtpu
from tests.helpers import assert_close, covering_cases, slow_unless
from tests.pallas_kernels.cases import (
  BLOCK,
  FAST_CASES,
  FORMATS,
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

# The oracle of the kernel comparisons: the reference compiled as one program, which
# costs less than its per-op compiles.
jitted_ref = jax.jit(ref_prefill_attention, static_argnames=STATIC)


def _cases():
  """Every format, GQA ratio, head_dim and (T, block_t), not their whole product: the
  full GQA x head_dim product, with formats and (T, block_t) drawn over it by
  `covering_cases` (each value in some case, pairings seeded by the test's name; T=9
  over block_t=8 is the unaligned one). The FAST_CASES run in the fast tier."""
  cases = covering_cases("test_prefill_attention.test_interpret_matches_reference",
                         full={"gqa": GQA, "head_dim": HEAD_DIMS},
                         sampled={"fmt": FORMATS, "t_block": ((9, 8), (33, 16), (64, 64))})
  for i, c in enumerate(cases):
    (t, block_t), fmt, gqa = c["t_block"], c["fmt"], c["gqa"]
    h, _ = runnable(fmt, c["head_dim"])
    yield pytest.param(fmt, gqa, h, t, block_t, id=f"{fmt}-G{gqa}-H{h}-T{t}",
                       marks=slow_unless(i in FAST_CASES))


@pytest.mark.parametrize("fmt,gqa,head_dim,t,block_t", list(_cases()))
def test_interpret_matches_reference(fmt, gqa, head_dim, t, block_t, rng):
  max_len = 3 * BLOCK
  # Prefix lengths at the edges (0, 1, block-1, block, block+1) and one that the chunk
  # fills to capacity; chunks of 0, 1, partial and full length.
  lengths = np.array([0, 1, BLOCK - 1, BLOCK, BLOCK + 1, max_len - t])
  chunk = np.array([t, 1, 0, t // 2, t, t])
  cache = filled_cache(fmt, rng, lengths=lengths, t=t, chunk=chunk, kv_heads=1 + (gqa != 8),
                       head_dim=head_dim, max_len=max_len)
  n = cache.kv_heads * gqa
  q = jnp.asarray(rng.standard_normal((len(lengths), t, n, head_dim)) * head_dim**-0.5,
                  jnp.float32)
  args, kw = kernel_args(cache, 1, chunk)
  ref = jitted_ref(q, *args, **kw)
  out = prefill_attention(q, *args, **kw, block_sizes=PrefillBlockSizes(block_t, BLOCK),
                          interpret=INTERPRET, precision="highest")
  assert np.isfinite(np.asarray(out)).all(), "NaN-poisoned memory reached the output"
  assert_close(out, ref, atol=KERNEL_RTOL * float(jnp.max(jnp.abs(ref))),
               name=f"prefill_attention[{fmt}]")


def test_attend_dispatches_long_chunks_to_prefill(rng):
  cache = kvtpu.KVCache.init("k8v4", num_layers=1, batch=2, kv_heads=2, max_len=256,
                             head_dim=64)
  x = jnp.asarray(rng.standard_normal((2, 40, 2, 64)), jnp.float32)
  cache = cache.update(0, x, x, valid_len=np.array([40, 17]))
  q = jnp.asarray(rng.standard_normal((2, 40, 8, 64)), jnp.float32)
  ref = kvtpu.attend(q, cache, 0, valid_len=np.array([40, 17]), impl="xla")
  out = kvtpu.attend(q, cache, 0, valid_len=np.array([40, 17]), impl="interpret",
                     precision="highest")
  assert_close(out, ref, atol=KERNEL_RTOL * float(jnp.max(jnp.abs(ref))), name="attend T=40")


def test_block_sizes():
  assert PrefillBlockSizes(12, 128).resolve(10, 1000) == (10, 128)  # One block of all T.
  assert PrefillBlockSizes(16, 384).resolve(100, 1000) == (16, 384)
  with pytest.raises(ValueError, match="block_t=12 must be a multiple of 8 when smaller than T=100"):
    PrefillBlockSizes(12, 128).resolve(100, 1000)
  with pytest.raises(ValueError, match="block_s must be a positive int"):
    PrefillBlockSizes(8, 0)
  assert default_prefill_block_sizes(jnp.int8, jnp.int8, 128).block_t == 128


@pytest.mark.parametrize("dtype", [jnp.int2, jnp.int4, jnp.int8, jnp.bfloat16])
def test_default_prefill_blocks_shrink_with_the_query_rows(dtype):
  # 128 tokens x G heads of logits per KV block: the KV block halves as G grows, then the
  # query block, so the step's VMEM estimate stays within v5e's 16 MiB of scoped VMEM.
  previous = None
  for group in (1, 2, 4, 8, 16, 32, 64):
    sizes = default_prefill_block_sizes(dtype, dtype, 128, group)
    d = Dims(1, 1, sizes.block_t, group, 1, sizes.block_s, 128, 1, 1)
    assert prefill_vmem_estimate_bytes(d, sizes.block_t, sizes.block_s, dtype, dtype) <= 16 * 2**20
    assert sizes.block_s % 128 == 0 and sizes.block_t % 8 == 0
    assert previous is None or (sizes.block_s <= previous.block_s
                                and sizes.block_t <= previous.block_t)
    previous = sizes
  # At G = 1: 128 query tokens and the decode rule's KV block, halved only while the
  # rule's block does not fit with 128 query rows (int2's 4096 positions).
  first, rule = default_prefill_block_sizes(dtype, dtype, 128, 1), default_block_sizes(
      dtype, dtype, 128).block_s
  assert first.block_t == 128 and rule % first.block_s == 0
  twice = 2 * first.block_s
  assert first.block_s == rule or prefill_vmem_estimate_bytes(
      Dims(1, 1, 128, 1, 1, twice, 128, 1, 1), 128, twice, dtype, dtype) > 16 * 2**20
  assert default_prefill_block_sizes(dtype, dtype, 128, 64).block_t < 128


@pytest.mark.tpu_compile
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
@pytest.mark.parametrize("fmt,group", [("int4", 8), pytest.param(
    "int2-nu-sbf16-rot+sink4+recent252", 8, marks=pytest.mark.slow), pytest.param(
    "int8", 64, marks=pytest.mark.slow)])
def test_default_prefill_blocks_compile_on_v5e(fmt, group):
  # G query heads per kv head at 8K positions: the decode rule's KV block (2048 int4,
  # 4096 int2 positions) made logits that overflowed v5e's scoped VMEM at G = 8; at
  # G = 64 even 128 positions do unless the query block shrinks too.
  compile_with_default_blocks(prefill_attention, fmt, t=256, group=group)


# The prefill kernel shares the decode kernel's body, which
# tests/pallas_kernels/test_decode_attention.py compiles for every format on v5e and
# samples on the other generations: prefill adds query blocks of 128 rows, compiled here
# on v5e for one format of each scale layout (none, per-token groups with zero points,
# per-channel token groups with windows, codebooks with rotation, 2-bit, f32) and every
# head dim.
PREFILL_COMPILE_CASES = [("bf16", 64), ("int4-asym-g16", 256),
                         ("k=int2-asym-c16,v=int4-c16-sbf16+recent16", 128),
                         ("k=int2-nu-sbf16-rot,v=int4-nu-g32-rot", 128), ("int2-asym", 256),
                         ("f32", 64)]


def _compile_cases():
  for i, (fmt, h) in enumerate(PREFILL_COMPILE_CASES):
    yield pytest.param("v5e", fmt, h, id=f"v5e-{fmt}-H{h}", marks=slow_unless(i == 0))


@pytest.mark.tpu_compile
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
@pytest.mark.parametrize("generation,fmt,head_dim", list(_compile_cases()))
def test_compiles_through_mosaic(generation, fmt, head_dim):
  sharding = jax.sharding.SingleDeviceSharding(tpu_device(generation))
  cache = jax.eval_shape(lambda: kvtpu.KVCache.init(fmt, num_layers=2, batch=2, kv_heads=2,
                                                    max_len=2048, head_dim=head_dim))
  args, kw = kernel_args(cache, 1, jnp.zeros(2, jnp.int32))
  kw, codes = split_static(kw)
  on_tpu = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)  # noqa: E731
  args = jax.tree.map(on_tpu, (jax.ShapeDtypeStruct((2, 256, 8, head_dim), jnp.float32),
                               *args[:3], jax.ShapeDtypeStruct((2,), jnp.int32)))
  fn = jax.jit(lambda q, k, v, lengths, chunk, kw: prefill_attention(
      q, k, v, lengths, chunk, 1, **kw, **codes, block_sizes=PrefillBlockSizes(128, 512)))
  fn.lower(*args, jax.tree.map(on_tpu, kw)).compile()  # Raises if Mosaic rejects the kernel.
