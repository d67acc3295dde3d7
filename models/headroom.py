"""The decode step of a `Llama`, sharded, measured for the headroom solver.

`kvtpu.headroom` asks "how many bytes does one device need at this batch and
max_len?"; this module answers for a real model's decode step (one token per
sequence through every layer, weights tensor-parallel over the `model` axis
(`kvtpu.models.sharding`), the cache sharded by `kvtpu.sharding`, the cache donated):

* `AotMeasure`: compiles the step for a TPU topology through libtpu on any machine
  and reads `compiled.memory_analysis()` (arguments, temporaries, program); a compile
  that runs out of HBM is an out-of-memory point, with the bytes it reported.
* `LiveMeasure`: allocates weights and cache on the present devices and runs the
  step once; an allocation or execution that runs out of memory is an
  out-of-memory point, not a crash.
"""

from __future__ import annotations

import functools
import gc
import logging
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from kvtpu.models.config import ModelConfig
from kvtpu.models.sharding import abstract_state, param_shardings, state_bytes_per_device

import kvtpu
from kvtpu import accelerators, headroom
from kvtpu.formats import KVFormat
from kvtpu.memory import array_nbytes
from kvtpu.sharding import CacheSharding

__all__ = ["WEIGHT_DTYPES", "weight_dtype", "make_mesh", "deployment", "decode_step",
           "AotMeasure", "LiveMeasure", "parse_mesh"]

# Why layer plans are sized analytically, on one device: a layered cache is not
# sharded, and the compiled and executed steps shard the cache (on one device too).
PLANS_ANALYTIC_ONLY = ("a layered cache (kvtpu.LayeredKVCache) is not sharded, and the compiled "
                       "and executed steps shard the cache over the mesh")

WEIGHT_DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32, "int8": jnp.int8,
                 "fp8_e4m3": jnp.float8_e4m3fn, "int4": jnp.int4}


def weight_dtype(name: str):
  """The storage dtype of a weight precision name (`WEIGHT_DTYPES`)."""
  if name not in WEIGHT_DTYPES:
    raise ValueError(f"weight_dtype must be one of {sorted(WEIGHT_DTYPES)}, got {name!r}")
  return jnp.dtype(WEIGHT_DTYPES[name])


def parse_mesh(text: str) -> dict[str, int]:
  """"data:2,model:4" -> {"data": 2, "model": 4} (both axes required, sizes >= 1)."""
  sizes = {}
  for part in text.split(","):
    name, _, size = part.strip().partition(":")
    if name not in ("data", "model") or not size.isdigit() or int(size) < 1 or name in sizes:
      raise ValueError(f"mesh={text!r}: expected 'data:<n>,model:<m>' with positive sizes, "
                       f"got part {part!r}")
    sizes[name] = int(size)
  if set(sizes) != {"data", "model"}:
    raise ValueError(f"mesh={text!r}: name both axes, e.g. 'data:2,model:4'")
  return sizes


def make_mesh(devices, data: int, model: int) -> Mesh:
  """A (`data`, `model`) mesh over `devices` (Auto axes: the compiler propagates the
  weights' and activations' shardings)."""
  devices = list(devices)
  if data * model != len(devices):
    raise ValueError(f"mesh data:{data} x model:{model} = {data * model} devices, but the "
                     f"accelerator has {len(devices)}: the mesh must use every device")
  return Mesh(np.array(devices).reshape(data, model), ("data", "model"),
              axis_types=(AxisType.Auto, AxisType.Auto))


def deployment(cfg: ModelConfig, *, weights: str, hbm_per_device: int, data: int, model: int,
               strategy: str = "auto", reserve: float = headroom.DEFAULT_RESERVE,
               tpu: bool = True) -> headroom.Deployment:
  """The solver's view of `cfg` deployed tensor-parallel over `model` devices, with its
  weights stored as `weights` (a `WEIGHT_DTYPES` name), on TPUs or not (`tpu`)."""
  _, state = abstract_state(cfg, weight_dtype=weight_dtype(weights))
  return headroom.Deployment(
      num_layers=cfg.num_layers, kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
      vocab_size=cfg.vocab_size, weights_per_device=state_bytes_per_device(state, model=model),
      hbm_per_device=hbm_per_device, data=data, model=model, strategy=strategy, reserve=reserve,
      tpu=tpu)


def decode_step(graphdef, cache_sharding: CacheSharding, impl: str):
  """`step(state, cache, tokens) -> (next_tokens, cache)`: one greedy decode step."""

  def step(state, cache, tokens):
    model = nnx.merge(graphdef, state)
    logits, cache = model(tokens, cache, impl=impl, cache_sharding=cache_sharding)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

  return step


class _Step:
  """The pieces both measures share: abstract weights, shardings, the jitted step."""

  def __init__(self, cfg: ModelConfig, weights: str, mesh: Mesh, strategy: str, impl: str):
    self.cfg, self.mesh = cfg, mesh
    self.graphdef, self.state = abstract_state(cfg, weight_dtype=weight_dtype(weights))
    self.param_shardings = param_shardings(self.state, mesh)
    self.weights = state_bytes_per_device(self.state, model=mesh.shape["model"])
    self.sharding = CacheSharding(mesh, strategy=strategy)
    self.tokens_sharding = NamedSharding(mesh, P("data"))
    self.impl = impl

  def abstract_cache(self, fmt: KVFormat, batch: int, max_len: int, page_len: int | None = None,
                     num_pages: int | None = None) -> kvtpu.KVCache:
    if isinstance(fmt, kvtpu.LayerPlan):
      raise ValueError(f"fmt={fmt.name} is a layer plan, which only the analytic measure "
                       f"sizes: {PLANS_ANALYTIC_ONLY}")
    cfg = self.cfg
    return jax.eval_shape(functools.partial(
        kvtpu.KVCache.init, fmt, num_layers=cfg.num_layers, batch=batch,
        kv_heads=cfg.num_kv_heads, max_len=max_len, head_dim=cfg.head_dim, page_len=page_len,
        num_pages=num_pages))

  def jitted(self, cache):
    cache_sh = self.sharding.shardings(cache)
    return jax.jit(decode_step(self.graphdef, self.sharding, self.impl), donate_argnums=1,
                   in_shardings=(self.param_shardings, cache_sh, self.tokens_sharding),
                   out_shardings=(self.tokens_sharding, cache_sh))


_OOM = re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)\)")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _reported_temp(message: str) -> int:
  match = _OOM.search(message)
  return int(float(match.group(1)) * _UNITS[match.group(2)]) if match else 0


def hbm_exhausted(message: str) -> bool:
  """Whether a TPU compiler's RESOURCE_EXHAUSTED `message` is about HBM (the step's
  arrays and temporaries do not fit the device: an out-of-memory point), not about a
  memory the step's code could be changed to fit (scoped VMEM, SMEM, semaphores)."""
  text = message.lower()
  return "hbm" in text and not re.search(r"vmem|smem|sflag|semaphore", text)


class AotMeasure:
  """Bytes per device of the compiled decode step on a TPU slice (no TPU needed).

  Args:
    cfg, weights: the model and its weight precision name.
    slice_: the TPU slice (`accelerators.parse_slice`); its topology's devices form
      the mesh.
    data, model: mesh axis sizes (data * model = the slice's devices).
    strategy: kv-head strategy. impl: attention implementation ("pallas": the kernels).

  `compile_seconds` lists each successful compile's (format, batch, max_len, seconds)
  (wall time on this host; the headroom report summarizes it per batch). Called with
  `page_len` and `num_pages` (a `kvtpu.headroom.paged.PagedMeasure`), it compiles the
  step over a paged cache of that pool.
  """

  def __init__(self, cfg: ModelConfig, *, weights: str, slice_: accelerators.Slice, data: int,
               model: int, strategy: str = "auto", impl: str = "pallas"):
    if slice_.topology is None:
      raise ValueError(f"accelerator={slice_.name!r}: ahead-of-time compiles need a TPU "
                       "topology; GPUs are sized by the analytic mode only")
    from jax.experimental import topologies  # noqa: PLC0415  (loads libtpu)

    devices = topologies.get_topology_desc(platform="tpu", topology_name=slice_.topology).devices
    if len(devices) != slice_.num_chips:
      raise ValueError(
          f"accelerator={slice_.name!r}: libtpu's topology {slice_.topology} has "
          f"{len(devices)} devices for {slice_.num_chips} chips (one per TensorCore, not "
          "megacore); ahead-of-time sizing supports slices with one device per chip "
          "(v5e, v5p, v6e)")
    self.step = _Step(cfg, weights, make_mesh(devices, data, model), strategy, impl)
    self.compiles = 0
    self.compile_seconds: list[tuple[str, int, int, float]] = []  # (format, batch, max_len, s)

  def __call__(self, fmt: KVFormat, batch: int, max_len: int, page_len: int | None = None,
               num_pages: int | None = None) -> headroom.Usage:
    s = self.step
    cache = s.abstract_cache(fmt, batch, max_len, page_len, num_pages)
    typed = lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)  # noqa: E731
    args = (jax.tree.map(typed, s.state, s.param_shardings),
            jax.tree.map(typed, cache, s.sharding.shardings(cache)),
            jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=s.tokens_sharding))
    cache_bytes = s.sharding.per_device_bytes(cache)
    self.compiles += 1
    begin = time.perf_counter()
    try:
      compiled = s.jitted(cache).lower(*args).compile()
      seconds = time.perf_counter() - begin
      self.compile_seconds.append((fmt.name, batch, max_len, seconds))
      logging.info("aot %s batch=%d max_len=%d: compiled in %.1f s", fmt.name, batch, max_len,
                   seconds)
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      if not hbm_exhausted(str(e)):  # E.g. a kernel's scoped VMEM: not the HBM asked about.
        raise RuntimeError(f"aot {fmt.name} batch={batch} max_len={max_len}: the step does not "
                           "compile for TPU (a memory other than HBM is exhausted; not an "
                           f"out-of-HBM point): {str(e)[:400]}") from e
      logging.info("aot %s batch=%d max_len=%d: out of HBM at compile time", fmt.name, batch,
                   max_len)
      return headroom.Usage(weights=s.weights, cache=cache_bytes, temp=_reported_temp(str(e)),
                            oom=True)
    m = compiled.memory_analysis()
    other = (m.argument_size_in_bytes - s.weights - cache_bytes + m.output_size_in_bytes
             - m.alias_size_in_bytes + m.generated_code_size_in_bytes)
    return headroom.Usage(weights=s.weights, cache=cache_bytes, temp=m.temp_size_in_bytes,
                          other=other)


class LiveMeasure:
  """Bytes per device of the decode step run on the present devices.

  Weights are allocated once (zeros: memory, not accuracy, is measured). Each call
  allocates the cache sharded, runs one step and frees it. Devices that report
  memory statistics (TPU, GPU) give the peak bytes in use; others (CPU) the compiled
  step's temporaries plus the arrays held. An out-of-memory error anywhere is an
  out-of-memory point.
  """

  def __init__(self, cfg: ModelConfig, *, weights: str, devices, data: int, model: int,
               strategy: str = "auto", impl: str = "auto"):
    self.step = _Step(cfg, weights, make_mesh(devices, data, model), strategy, impl)
    self.devices = list(devices)
    self.params = None
    self.runs = 0

  def _params(self):
    if self.params is None:
      s = self.step
      self.params = jax.jit(lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), s.state),
                            out_shardings=s.param_shardings)()
    return self.params

  def __call__(self, fmt: KVFormat, batch: int, max_len: int) -> headroom.Usage:
    s = self.step
    abstract = s.abstract_cache(fmt, batch, max_len)
    cache_bytes = s.sharding.per_device_bytes(abstract)
    self.runs += 1
    cache = tokens = out = None
    try:
      params = self._params()
      cache = s.sharding.init(fmt, num_layers=s.cfg.num_layers, batch=batch,
                              kv_heads=s.cfg.num_kv_heads, max_len=max_len,
                              head_dim=s.cfg.head_dim)
      tokens = jax.device_put(jnp.zeros((batch, 1), jnp.int32), s.tokens_sharding)
      jitted = s.jitted(abstract)
      compiled = jitted.lower(params, cache, tokens).compile()
      out = compiled(params, cache, tokens)
      jax.block_until_ready(out)
      stats = self.devices[0].memory_stats()
      if stats and "peak_bytes_in_use" in stats:
        peak = int(stats["peak_bytes_in_use"])
        temp = max(0, peak - s.weights - cache_bytes)
        return headroom.Usage(weights=s.weights, cache=cache_bytes, temp=temp)
      held = sum(array_nbytes(x.addressable_shards[0].data.shape, x.dtype)
                 for x in jax.tree.leaves(params))
      return headroom.Usage(weights=s.weights, cache=cache_bytes,
                            temp=compiled.memory_analysis().temp_size_in_bytes,
                            other=held - s.weights)
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
        raise
      logging.info("live %s batch=%d max_len=%d: out of memory: %s", fmt.name, batch, max_len,
                   str(e).splitlines()[0])
      return headroom.Usage(weights=s.weights, cache=cache_bytes, temp=0, oom=True)
    finally:
      del cache, tokens, out
      gc.collect()
