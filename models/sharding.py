"""Tensor-parallel layout of a `kvtpu.models.llama.Llama`'s weights over a mesh's model axis.

Megatron-style: the q/k/v, gate and up projections split their output features
over the model axis, the o and down projections their input features (so each
layer needs one all-reduce after attention and one after the MLP), the embedding
its vocabulary rows and the untied output head its vocabulary columns (logits come
out vocabulary-sharded). Norm weights are replicated. A dimension the model axis
does not divide stays replicated, and `state_bytes_per_device` counts exactly
what each device then holds. Weights are replicated over the data axis.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from kvtpu.models.llama import Llama

from kvtpu.memory import array_nbytes

__all__ = ["param_specs", "param_shardings", "state_bytes_per_device", "abstract_state"]

# Which axis of each weight (by its module's name) goes over the model axis.
_COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")
_ROW = ("o_proj", "down_proj")


def _spec(path: tuple, shape: tuple[int, ...], model_axis: str, model: int) -> P:
  names = [str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey)]
  module, leaf = (names[-2] if len(names) > 1 else ""), names[-1]
  axis = None
  if module in _COLUMN:
    axis = len(shape) - 1  # kernel [in, out] -> out; bias [out].
  elif module in _ROW and leaf == "kernel":
    axis = 0
  elif module == "embed":
    axis = 0  # [vocab, hidden]: vocabulary rows.
  if axis is None or shape[axis] % model:
    return P()
  return P(*[model_axis if i == axis else None for i in range(len(shape))])


def param_specs(state: nnx.State, *, model_axis: str = "model", model: int) -> nnx.State:
  """`PartitionSpec`s of a `Llama`'s parameter state (`nnx.split(model)[1]`), same tree."""
  if model < 1:
    raise ValueError(f"model must be a positive int, got model={model!r}")
  return jax.tree_util.tree_map_with_path(
      lambda path, x: _spec(path, jnp.shape(x), model_axis, model), state)


def param_shardings(state: nnx.State, mesh: Mesh, *, model_axis: str = "model") -> nnx.State:
  """`NamedSharding`s of the parameter state on `mesh` (replicated over other axes)."""
  specs = param_specs(state, model_axis=model_axis, model=mesh.shape[model_axis])
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def state_bytes_per_device(state: nnx.State, *, model_axis: str = "model", model: int) -> int:
  """Bytes of the parameter state one device holds under `param_specs` (sub-byte
  dtypes packed)."""
  specs = param_specs(state, model_axis=model_axis, model=model)
  total = 0
  for x, spec in zip(jax.tree.leaves(state), jax.tree.leaves(
      specs, is_leaf=lambda s: isinstance(s, P)), strict=True):
    shards = math.prod(model for axis in spec if axis == model_axis)
    total += array_nbytes(jnp.shape(x), x.dtype) // shards
  return total


def abstract_state(cfg, *, weight_dtype, dtype=jnp.bfloat16):
  """`(graphdef, state)` of a `Llama(cfg)` without allocating: the state's leaves are
  `ShapeDtypeStruct`s, matrices (projections, embedding, output head) stored in
  `weight_dtype` (e.g. int8 for weight-only quantized storage, upcast to `dtype` at
  use), norm weights in float32.
  """
  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), dtype=dtype,
                                          param_dtype=jnp.float32))
  graphdef, state = nnx.split(abstract)
  weight_dtype = jnp.dtype(weight_dtype)
  state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, weight_dtype if x.ndim == 2 else x.dtype), state)
  return graphdef, state
