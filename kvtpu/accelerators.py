"""HBM capacity and bandwidth per accelerator chip: rooflines for benchmarks and sizing.

Figures are the vendors' published per-chip numbers (Google Cloud TPU system
architecture pages; NVIDIA H100/H200 SXM datasheets). TPU capacities are checked
against `jax.experimental.pallas.tpu.get_tpu_info_for_chip` in tests.
"""

from __future__ import annotations

import dataclasses

__all__ = ["Accelerator", "ACCELERATORS", "get", "from_device", "chip_name"]


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """One chip.

  Attributes:
    name: short name ("v5e", "h100", ...).
    hbm_bytes: HBM capacity per chip, bytes.
    hbm_bandwidth: HBM bandwidth per chip, bytes per second.
    tensor_cores: TensorCores per chip as JAX devices see them (1 for GPUs).
  """

  name: str
  hbm_bytes: int
  hbm_bandwidth: float
  tensor_cores: int = 1


_GIB = 2**30
ACCELERATORS: dict[str, Accelerator] = {a.name: a for a in (
    Accelerator("v4", 32 * _GIB, 1200e9, tensor_cores=2),
    Accelerator("v5e", 16 * _GIB, 819e9),
    Accelerator("v5p", 95 * _GIB, 2765e9, tensor_cores=2),
    Accelerator("v6e", 32 * _GIB, 1640e9),
    Accelerator("h100", 80 * 10**9, 3.35e12),
    Accelerator("h200", 141 * 10**9, 4.8e12),
)}


def get(name: str) -> Accelerator:
  """The chip called `name` (case-insensitive; "v5litepod"/"v5 lite" mean v5e)."""
  key = name.strip().lower().replace("v5litepod", "v5e").replace("v5 lite", "v5e")
  if key not in ACCELERATORS:
    raise ValueError(f"unknown accelerator name={name!r}; known: {sorted(ACCELERATORS)}")
  return ACCELERATORS[key]


def chip_name(device_kind: str) -> str | None:
  """Short chip name of a JAX `device_kind`: "TPU v5 lite" -> "v5e", "NVIDIA H200" ->
  "h200"; TPUs missing from the table keep their version ("TPU v3" -> "v3"); None
  for anything else (CPU)."""
  kind = device_kind.lower()
  for token, name in (("v6", "v6e"), ("v5p", "v5p"), ("v5 lite", "v5e"), ("v5e", "v5e"),
                      ("v4", "v4"), ("v3", "v3"), ("v2", "v2"), ("h200", "h200"),
                      ("h100", "h100")):
    if token in kind:
      return name
  return kind.replace("tpu", "").strip() if "tpu" in kind else None


def from_device(device) -> Accelerator | None:
  """The chip of a JAX device (from its `device_kind`), or None if not in the table."""
  return ACCELERATORS.get(chip_name(getattr(device, "device_kind", "")))
