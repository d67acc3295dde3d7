"""Shared cases of the kernel tests: formats, interpret parameters, filled caches."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.experimental.pallas import tpu as pltpu
from kvtpu.pallas_kernels.decode_attention.reference import logical

import kvtpu
from tests.helpers import kv_with_outliers, poison

# Interpret mode vs the reference on the same stored values: both float32 with
# highest-precision matmuls, differing only in summation order (blocked online
# softmax vs one softmax); relative to the largest output magnitude. Logits reach
# ~1e3 on the 1000x outlier keys, where an f32 ulp moves probabilities by ~1e-5:
# seen up to 3e-5 over ~4M outputs. Formats' own errors are >= 1e-3 of it.
KERNEL_RTOL = 5e-5

INTERPRET = pltpu.InterpretParams(uninitialized_memory="nan", out_of_bounds_reads="raise")
FORMATS = ["f32", "bf16", "int8", "int4", "fp8_e4m3", "fp8_e5m2", "k8v4", "int8-asym", "int4-asym-g16",
           "fp8_e4m3-sbf16", "int2-asym", "k4v2", "k=int2-nu-sbf16-rot,v=int4-nu-g32-rot",
           "k=int2-asym-c16,v=int4-c16-sbf16+recent16"]
GQA = [1, 3, 8]
HEAD_DIMS = [64, 128, 256]
BLOCK = 128
# The cases of a sampled GQA x head_dim kernel grid (`covering_cases`, row-major over
# the 3 x 3 product) that also run in the fast tier (`-m "not slow"`): its diagonal,
# every GQA ratio and every head dim once.
FAST_CASES = (0, 4, 8)


def stored_bits(dtype) -> int:
  """Bits per stored value of `dtype` in HBM (int4 and int2 packed)."""
  dtype = jnp.dtype(dtype)
  return jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer) else dtype.itemsize * 8


def runnable(fmt: str, head_dim: int, gen: str | None = None) -> tuple[int, str | None]:
  """A drawn kernel case moved to where the kernels run the format: int2 at head_dim 128
  rather than 64, and on v5p rather than v4 (`kvtpu.attention.kernel_support_error`;
  the refusals themselves are tested in test_decode_attention.py)."""
  f = kvtpu.KVFormat.parse(fmt)
  if "int2" in (f.k.dtype.value, f.v.dtype.value):
    head_dim = max(head_dim, 128)
    gen = "v5p" if gen == "v4" else gen
  return head_dim, gen


def kernel_args(cache, layer, chunk):
  """Raw-array arguments of the kernel for one cache layer (dynamic formats), windows,
  codebooks, token groups and values layouts (static: `split_static`) included."""
  k, v = cache.k, cache.v
  windows = {f"{w}_{f}": x.window(f) for w, x in (("k", k), ("v", v))
             for f in ("sink", "recent") if getattr(x, f) is not None}
  codes = {f"{w}_codes": x.codes for w, x in (("k", k), ("v", v)) if x.codes is not None}
  groups = {f"{w}_token_group": x.token_group for w, x in (("k", k), ("v", v)) if x.token_group}
  groups.update({f"{w}_transposed": True for w, x in (("k", k), ("v", v)) if x.transposed})
  scales = {f"{w}_{f}": getattr(x, f) if x.spec.dynamic else None
            for w, x in (("k", k), ("v", v)) for f in ("scale", "zero")}
  return ((k.values, v.values, cache.lengths, jnp.asarray(chunk, jnp.int32), layer),
          dict(**scales, **windows, **codes, **groups))


def logical_args(args, kw):
  """`kernel_args`' positional arguments with values stored transposed given as their
  logical `[L, B, K, S, H]` shapes (what `validate_inputs` checks)."""
  k, v, *rest = args
  return (logical(k, kw.get("k_transposed", False), "k"),
          logical(v, kw.get("v_transposed", False), "v"), *rest)


# The kernels' static keyword arguments that `kernel_args` may return.
STATIC = ("k_codes", "v_codes", "k_token_group", "v_token_group", "k_transposed",
          "v_transposed")


def split_static(kw):
  """`kw` of `kernel_args` -> (its arrays, its static arguments)."""
  return ({n: x for n, x in kw.items() if n not in STATIC},
          {n: x for n, x in kw.items() if n in STATIC})


def filled_cache(fmt, rng, *, lengths, t, chunk, kv_heads, head_dim, max_len, layer=1):
  """A NaN-poisoned cache with ragged `lengths` held and a `chunk`-token chunk written."""
  lengths = np.asarray(lengths)
  b = len(lengths)
  pre = kv_with_outliers(rng, (b, int(lengths.max()), kv_heads, head_dim)) if lengths.max() else None
  new = kv_with_outliers(rng, (b, t, kv_heads, head_dim)) if t else None
  return _fill(fmt, b, kv_heads, head_dim, max_len, layer, pre, new, lengths, np.asarray(chunk))


@functools.partial(jax.jit, static_argnums=range(6))
def _fill(fmt, b, kv_heads, head_dim, max_len, layer, pre, new, lengths, chunk):
  # One compiled program per case instead of op-by-op dispatch (whose per-op compiles
  # cost more than the kernels' own); the writes are the same `update` and `advance`.
  cache = poison(kvtpu.KVCache.init(fmt, num_layers=2, batch=b, kv_heads=kv_heads,
                                    max_len=max_len, head_dim=head_dim))
  if pre is not None:
    cache = cache.update(layer, pre, pre[:, ::-1], valid_len=lengths).advance(lengths)
  if new is not None:
    cache = cache.update(layer, new, new * 0.5, valid_len=chunk)
  return cache


GENERATIONS = {"v5e": "v5e:1x1", "v6e": "v6e:1x1", "v4": "v4:1x1x1", "v5p": "v5p:1x1x1"}


@functools.cache
def tpu_device(generation):
  return topologies.get_topology_desc(platform="tpu",
                                      topology_name=GENERATIONS[generation]).devices[0]




def compile_with_default_blocks(kernel, fmt: str, *, t: int, group: int, generation="v5e"):
  """Compiles `kernel` (decode or prefill attention) for one TPU generation ahead of time
  with its default block sizes: 2 sequences, 2 kv heads of `group` query heads each,
  `t` query tokens, 8K positions, head_dim 128. Raises if Mosaic rejects it."""
  sharding = jax.sharding.SingleDeviceSharding(tpu_device(generation))
  cache = jax.eval_shape(lambda: kvtpu.KVCache.init(fmt, num_layers=2, batch=2, kv_heads=2,
                                                    max_len=8192, head_dim=128))
  on_tpu = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)  # noqa: E731
  fn = jax.jit(lambda q, k, v, lengths, chunk: kernel(q, k, v, lengths, chunk, 1))
  fn.lower(on_tpu(jax.ShapeDtypeStruct((2, t, 2 * group, 128), jnp.float32)),
           jax.tree.map(on_tpu, cache.k), jax.tree.map(on_tpu, cache.v), on_tpu(cache.lengths),
           on_tpu(jax.ShapeDtypeStruct((2,), jnp.int32))).compile()
