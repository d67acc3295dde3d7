"""Per-layer precision under a byte budget: rank layers by what a cheaper format costs
them, and give the costliest the dearer format while the budget allows.

`layer_costs` measures, per layer, how much worse that layer's attention output gets
when its cache is in the cheaper format `low` instead of `high`, on one calibration
batch of the layer's own queries, keys and values (captured from the model): both
caches are written and attended chunk by chunk, as in serving, and compared with
exact float32 attention; the cost is the difference of the two relative squared
errors. `assign` then keeps `low` everywhere but on the layers of highest cost, as
many as fit `target_bits` effective bits per value at `context` tokens
(`memory.plan_effective_bits`, scales and windows included): every layer adds the
same bytes when moved to `high`, so the costliest-first choice is the one that
removes the most cost within the budget (a layer whose cost is not positive gains
nothing from `high` and keeps `low`).

`LayerPlanArtifact` records the plan with everything that made it: the two formats,
the budget, the costs, the model and the calibration workloads; `load` verifies the
file's content hash and that the costs still give the recorded plan.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvtpu import memory
from kvtpu.attention import attend
from kvtpu.cache import KVCache
from kvtpu.calibration.artifact import fill_provenance
from kvtpu.formats import KVFormat, LayerPlan
from kvtpu.qtensor import QuantizedKV

__all__ = ["layer_costs", "assign", "check_budget", "LayerPlanArtifact", "ARTIFACT_FILE"]

ARTIFACT_FILE = "layer_plan.json"


def _attend_chunked(fmt: KVFormat, q, k, v, chunk: int) -> jax.Array:
  """One layer's attention `[B, T, N, H]` over a cache in `fmt`, written and read
  `chunk` tokens at a time."""
  b, t, kv_heads, h = k.shape
  multiple = math.lcm(*(QuantizedKV.max_len_multiple(s) for s in (fmt.k, fmt.v)))
  max_len = -(-t // multiple) * multiple
  cache = KVCache.init(fmt, num_layers=1, batch=b, kv_heads=kv_heads, max_len=max_len,
                       head_dim=h)
  out = []
  for start in range(0, t, chunk):
    sl = slice(start, min(start + chunk, t))
    cache = cache.update(0, k[:, sl], v[:, sl])
    out.append(attend(q[:, sl], cache, 0, impl="xla"))
    cache = cache.advance(sl.stop - sl.start)
  return jnp.concatenate(out, axis=1).astype(jnp.float32)


def layer_costs(samples: Sequence[Mapping[str, np.ndarray]], low: KVFormat | str,
                high: KVFormat | str, *, chunk: int = 128) -> np.ndarray:
  """Per layer, the relative squared error of its attention output with a `low` cache
  minus that with a `high` cache, against exact float32 attention.

  Args:
    samples: per layer `{"q": [B, T, N, H], "k": [B, T, K, H], "v": [B, T, K, H]}`
      (after RoPE), one calibration batch.
    low, high: the cheaper and the dearer format (dynamic or unquantized).
    chunk: tokens written and attended at a time.

  Returns:
    float64 `[L]`; larger means the layer loses more in `low`.

  Raises:
    ValueError: for no samples, misshaped ones, a static format or chunk < 1.
  """
  low, high = KVFormat.parse(low), KVFormat.parse(high)
  for fmt in (low, high):
    if fmt.static:
      raise ValueError(f"layer costs compare dynamic or unquantized formats, got {fmt.name}")
  if not samples:
    raise ValueError("samples is empty: give each layer's q, k, v of a calibration batch")
  if not isinstance(chunk, int) or chunk < 1:
    raise ValueError(f"chunk must be a positive int, got chunk={chunk!r}")
  costs = []
  for i, s in enumerate(samples):
    q, k, v = (jnp.asarray(s[name], jnp.float32) for name in ("q", "k", "v"))
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2]:
      raise ValueError(f"samples[{i}] must hold q [B, T, N, H], k and v [B, T, K, H], got "
                       f"{q.shape}, {k.shape}, {v.shape}")
    exact = _attend_chunked(KVFormat.parse("f32"), q, k, v, chunk)
    norm = float(jnp.sum(jnp.square(exact)))
    err = [float(jnp.sum(jnp.square(_attend_chunked(f, q, k, v, chunk) - exact))) / max(norm, 1e-30)
           for f in (low, high)]
    costs.append(err[0] - err[1])
  return np.asarray(costs, np.float64)


def check_budget(low: KVFormat | str, high: KVFormat | str, *, target_bits: float, context: int,
                 num_layers: int, kv_heads: int, head_dim: int) -> None:
  """Raises ValueError unless `high` takes more bits than `low` and the all-`low` plan
  fits `target_bits` (what `assign` needs, known before any layer is measured)."""
  low, high = KVFormat.parse(low), KVFormat.parse(high)
  dims = dict(context=context, num_layers=num_layers, kv_heads=kv_heads, head_dim=head_dim)
  low_bits = memory.plan_effective_bits(LayerPlan(low), **dims)
  if low_bits > target_bits:
    raise ValueError(f"target_bits={target_bits} is below the {low_bits:.4f} effective bits of "
                     f"{low.name} in every layer")
  if memory.plan_effective_bits(LayerPlan(high), **dims) <= low_bits:
    raise ValueError(f"high ({high.name}) must take more bits than low ({low.name})")


def assign(costs, low: KVFormat | str, high: KVFormat | str, *, target_bits: float,
           context: int, kv_heads: int, head_dim: int) -> LayerPlan:
  """The plan that gives `high` to the layers of highest positive cost (ties: the lower
  index first), as many as keep `plan_effective_bits` at `context` within `target_bits`.

  Raises:
    ValueError: for costs that are not finite `[L]`, `high` not dearer than `low`, or a
      budget below the all-`low` plan.
  """
  low, high = KVFormat.parse(low), KVFormat.parse(high)
  costs = np.asarray(costs, np.float64)
  if costs.ndim != 1 or not costs.size or not np.isfinite(costs).all():
    raise ValueError(f"costs must be finite floats, one per layer, got {costs!r}")
  num_layers = costs.size
  dims = dict(context=context, num_layers=num_layers, kv_heads=kv_heads, head_dim=head_dim)
  check_budget(low, high, target_bits=target_bits, **dims)
  bits = lambda plan: memory.plan_effective_bits(plan, **dims)  # noqa: E731
  base = LayerPlan(low)
  # Only layers that lose something in `low` are worth moving.
  order = sorted((i for i in range(num_layers) if costs[i] > 0), key=lambda i: (-costs[i], i))
  plan = base
  for n in range(1, len(order) + 1):
    layers = tuple(sorted(order[:n]))
    candidate = LayerPlan(high) if n == num_layers else LayerPlan(low, ((high, layers),))
    if bits(candidate) > target_bits:
      break
    plan = candidate
  return plan


@dataclasses.dataclass(frozen=True)
class LayerPlanArtifact:
  """A per-layer precision plan and its disclosure.

  Attributes:
    plan: the assignment (`assign(costs, low, high, ...)` with the fields below).
    low, high: the two formats.
    target_bits, context: the budget, effective bits per value at `context` tokens.
    costs: float64 `[L]` from `layer_costs`.
    model: `name`, `weight_precision`, `num_layers`, `kv_heads`, `head_dim`.
    workloads: the calibration workloads' disclosures (`name`, `num_tokens`,
      `tokens_used`, `token_sha256`, ...).
    method: how costs were measured, with its options (e.g. the chunk).
    kvtpu_version, created: provenance.
  """

  plan: LayerPlan
  low: KVFormat
  high: KVFormat
  target_bits: float
  context: int
  costs: np.ndarray
  model: Mapping[str, Any]
  workloads: tuple[Mapping[str, Any], ...]
  method: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  kvtpu_version: str = ""
  created: str = ""

  def __post_init__(self):
    object.__setattr__(self, "plan", LayerPlan.parse(self.plan))
    object.__setattr__(self, "low", KVFormat.parse(self.low))
    object.__setattr__(self, "high", KVFormat.parse(self.high))
    object.__setattr__(self, "costs", np.asarray(self.costs, np.float64))
    object.__setattr__(self, "workloads", tuple(dict(w) for w in self.workloads))
    fill_provenance(self)
    missing = [f for f in ("name", "num_layers", "kv_heads", "head_dim") if f not in self.model]
    if missing:
      raise ValueError(f"model is missing {missing}")
    if not self.workloads:
      raise ValueError("workloads is empty: a plan must name the data its costs were measured on")
    if self.costs.shape != (self.model["num_layers"],):
      raise ValueError(f"costs must have one entry per layer ({self.model['num_layers']}), got "
                       f"shape {self.costs.shape}")
    again = self.reassign()
    if again != self.plan:
      raise ValueError(f"the costs give plan {again.name}, not the recorded {self.plan.name}")

  def check_compatible(self, *, num_layers: int, kv_heads: int, head_dim: int,
                       model_name: str | None = None) -> None:
    """Raises ValueError unless the plan was made for a model of these dimensions (and
    this name, if given)."""
    want = {"num_layers": num_layers, "kv_heads": kv_heads, "head_dim": head_dim}
    if model_name is not None:
      want["name"] = model_name
    wrong = {k: (self.model[k], v) for k, v in want.items() if self.model[k] != v}
    if wrong:
      raise ValueError(f"layer plan {self.plan.name} was made for another model: "
                       + ", ".join(f"{k} {a!r} (here {b!r})" for k, (a, b) in wrong.items()))

  def reassign(self) -> LayerPlan:
    """`assign` from the recorded costs, formats and budget."""
    return assign(self.costs, self.low, self.high, target_bits=self.target_bits,
                  context=self.context, kv_heads=self.model["kv_heads"],
                  head_dim=self.model["head_dim"])

  @property
  def effective_bits(self) -> float:
    """The plan's effective bits per value at `context`."""
    return memory.plan_effective_bits(self.plan, context=self.context,
                                      num_layers=self.model["num_layers"],
                                      kv_heads=self.model["kv_heads"],
                                      head_dim=self.model["head_dim"])

  def to_dict(self) -> dict[str, Any]:
    return {"plan": self.plan.name, "low": self.low.name, "high": self.high.name,
            "target_bits": float(self.target_bits), "context": int(self.context),
            "effective_bits": self.effective_bits, "costs": self.costs.tolist(),
            "ranking": [int(i) for i in np.argsort(-self.costs, kind="stable")],
            "model": dict(self.model), "workloads": list(self.workloads),
            "method": dict(self.method), "kvtpu_version": self.kvtpu_version,
            "created": self.created}

  def save(self, directory: str | os.PathLike) -> pathlib.Path:
    """Writes `directory/layer_plan.json` (with the sha256 of its content); returns it."""
    path = pathlib.Path(directory) / ARTIFACT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    body = self.to_dict()
    text = json.dumps({**body, "sha256": _digest(body)}, indent=1, sort_keys=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path

  @classmethod
  def load(cls, directory: str | os.PathLike) -> LayerPlanArtifact:
    """Reads what `save` wrote.

    Raises:
      FileNotFoundError: no artifact there; ValueError: a corrupt or edited file (its
        hash), or costs that no longer give its plan.
    """
    path = pathlib.Path(directory)
    path = path if path.is_file() else path / ARTIFACT_FILE
    if not path.exists():
      raise FileNotFoundError(f"no layer plan artifact at {path}")
    try:
      data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"layer plan artifact {path} is not valid JSON: {e}") from None
    stored = data.pop("sha256", None)
    if stored != _digest(data):
      raise ValueError(f"layer plan artifact {path} does not match its sha256 (corrupt or edited)")
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in fields})


def _digest(body: Mapping[str, Any]) -> str:
  return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
