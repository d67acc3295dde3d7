"""A KV cache whose layers are stored in different formats (a `LayerPlan`).

`LayeredKVCache` holds one `KVCache` per format of the plan (a layer group), each
over the layers that format serves, and maps a model's layer index to its group
and its index there. It has the `KVCache` calls a model makes (`update`, `advance`,
`reset`, the dimensions, `lengths`), and `kvtpu.attend` reads a layer from its
group, so a model runs on it unchanged. Every group sees every chunk's `advance`,
so the groups' lengths, overflow flags and error bits agree; counters stay per
layer.

Layers are picked by a Python int: their arrays differ in dtype and shape from group
to group, so a traced layer index (`lax.scan` over layers) cannot select one.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kvtpu._shared import check_dims, check_layer
from kvtpu.cache import COUNTERS, ERRORS, KVCache
from kvtpu.formats import KVFormat, LayerPlan

__all__ = ["LayeredKVCache"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayeredKVCache:
  """One `KVCache` per layer group of `plan`.

  Attributes:
    groups: the caches, in the order of `plan.groups(num_layers)`; group g holds
      the layers `plan.groups(num_layers)[g][1]`, in that order.
    plan: the formats per layer (static).
    num_layers: L, the model's layers (static).
  """

  groups: tuple[KVCache, ...]
  plan: LayerPlan = dataclasses.field(metadata=dict(static=True))
  num_layers: int = dataclasses.field(metadata=dict(static=True))

  @classmethod
  def init(cls, plan: LayerPlan | KVFormat | str, *, num_layers: int, batch: int,
           kv_heads: int, max_len: int, head_dim: int) -> LayeredKVCache:
    """An empty cache: each group's `KVCache.init` over its layers.

    Raises:
      ValueError: for an invalid plan or dimension, a plan layer >= num_layers, or a
        format with static scales (calibrated per layer: a plan's groups take dynamic
        or unquantized formats).
    """
    plan = LayerPlan.parse(plan)
    check_dims(num_layers=num_layers, batch=batch, kv_heads=kv_heads, max_len=max_len,
               head_dim=head_dim)
    groups = plan.groups(num_layers)
    static = [fmt.name for fmt, _ in groups if fmt.static]
    if static:
      raise ValueError(f"plan {plan.name} has formats with static scales {static}; a layer plan "
                       "takes dynamic or unquantized formats")
    return cls(tuple(KVCache.init(fmt, num_layers=len(layers), batch=batch, kv_heads=kv_heads,
                                  max_len=max_len, head_dim=head_dim)
                     for fmt, layers in groups), plan, num_layers)

  # --------------------------------------------------------------- layout
  def locate(self, layer) -> tuple[int, int]:
    """`(group, index in the group)` of a model layer (a Python int).

    Raises:
      TypeError: for a traced layer index; IndexError, TypeError: as `KVCache`.
    """
    if isinstance(layer, jax.core.Tracer):
      raise TypeError(
          f"a LayeredKVCache picks a layer by a Python int: its layers are stored in different "
          f"formats ({self.plan.name}), so a traced layer index (lax.scan over layers) cannot "
          "select one; loop over the layers in Python")
    check_layer(layer, self.num_layers)
    for g, (_, layers) in enumerate(self.plan.groups(self.num_layers)):
      if layer in layers:
        return g, layers.index(layer)
    raise AssertionError(f"layer {layer} is in no group of {self.plan.name}")

  def group_of(self, layer) -> tuple[KVCache, int]:
    """The layer's group cache and its index there."""
    g, i = self.locate(layer)
    return self.groups[g], i

  @property
  def formats(self) -> tuple[KVFormat, ...]:
    """The format of each layer."""
    return self.plan.formats(self.num_layers)

  @property
  def batch(self) -> int:
    return self.groups[0].batch

  @property
  def kv_heads(self) -> int:
    return self.groups[0].kv_heads

  @property
  def max_len(self) -> int:
    return self.groups[0].max_len

  @property
  def head_dim(self) -> int:
    return self.groups[0].head_dim

  @property
  def lengths(self) -> jax.Array:
    return self.groups[0].lengths

  @property
  def overflow(self) -> jax.Array:
    return self.groups[0].overflow

  @property
  def nbytes(self) -> int:
    """Bytes of all arrays of all groups."""
    return sum(g.nbytes for g in self.groups)

  def logical_axes(self) -> LayeredKVCache:
    """Each group's `KVCache.logical_axes`."""
    return dataclasses.replace(self, groups=tuple(g.logical_axes() for g in self.groups))

  # -------------------------------------------------------------- writing
  def update(self, layer, k: jax.Array, v: jax.Array, *, valid_len=None) -> LayeredKVCache:
    """`KVCache.update` of the layer's group."""
    g, i = self.locate(layer)
    return self._with(g, self.groups[g].update(i, k, v, valid_len=valid_len))

  def advance(self, num_new) -> LayeredKVCache:
    """`KVCache.advance` of every group."""
    return dataclasses.replace(self, groups=tuple(g.advance(num_new) for g in self.groups))

  def reset(self, sequences=None) -> LayeredKVCache:
    """`KVCache.reset` of every group."""
    return dataclasses.replace(self, groups=tuple(g.reset(sequences) for g in self.groups))

  def _with(self, g: int, cache: KVCache) -> LayeredKVCache:
    groups = list(self.groups)
    groups[g] = cache
    return dataclasses.replace(self, groups=tuple(groups))

  # -------------------------------------------------------------- reading
  def dequantized(self, layer, which: str, dtype=jnp.float32, *, held=None) -> jax.Array:
    """`KVCache.dequantized` of the layer."""
    cache, i = self.group_of(layer)
    return cache.dequantized(i, which, dtype, held=held)

  def counts(self) -> dict[str, np.ndarray]:
    """`{name: int64[L]}` for each of `COUNTERS`, in the model's layer order."""
    out = {name: np.zeros(self.num_layers, np.int64) for name in COUNTERS}
    for cache, (_, layers) in zip(self.groups, self.plan.groups(self.num_layers), strict=True):
      for name, per_layer in cache.counts().items():
        out[name][list(layers)] = per_layer
    return out

  def saturation_rates(self) -> dict[str, np.ndarray]:
    """Per layer, the fraction of written K and V values that were clipped
    (`KVCache.saturation_rates`), in the model's layer order."""
    c = self.counts()
    written = np.maximum(c["written"], 1)
    return {"k": c["k_saturated"] / written, "v": c["v_saturated"] / written}

  def error_flags(self) -> dict[str, np.ndarray]:
    """`{name: bool[B]}` for each of `ERRORS`: set in any group."""
    flags = [g.error_flags() for g in self.groups]
    return {name: np.any([f[name] for f in flags], axis=0) for name in ERRORS}
