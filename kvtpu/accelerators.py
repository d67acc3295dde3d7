"""HBM capacity and bandwidth per accelerator chip: rooflines for benchmarks and sizing.

Figures are the vendors' published per-chip numbers (Google Cloud TPU system
architecture pages; NVIDIA H100/H200 SXM datasheets). TPU capacities are checked
against `jax.experimental.pallas.tpu.get_tpu_info_for_chip` in tests.
"""

from __future__ import annotations

import dataclasses

__all__ = ["Accelerator", "ACCELERATORS", "get", "from_device", "chip_name", "Slice",
           "parse_slice"]


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


# TPU slice shapes (chips) that libtpu's ahead-of-time topologies accept.
_TPU_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
           256: "16x16"}
_TPU_3D = {1: "1x1x1", 4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4",
           128: "4x4x8", 256: "4x8x8", 512: "8x8x8"}


@dataclasses.dataclass(frozen=True)
class Slice:
  """A group of chips addressed as one (a TPU slice, or GPUs of one system).

  Attributes:
    name: as given ("v5e-8", "v5p-8", "h100-8").
    chip: the chip.
    num_chips: chips in the slice (= JAX devices: v4 and v5p run megacore, one
      device per chip).
    topology: libtpu topology name for ahead-of-time compiles ("v5e:2x4"), or None
      (GPUs: nothing here compiles for them).
  """

  name: str
  chip: Accelerator
  num_chips: int
  topology: str | None


def parse_slice(name: str) -> Slice:
  """A slice from its Cloud TPU accelerator type or a GPU count.

  "v5e-8", "v6e-256": N chips (v5e/v6e count chips); "v4-8", "v5p-8": N TensorCores,
  so N/2 chips (Cloud TPU's naming for megacore chips); "h100-8": 8 GPUs; a bare
  chip name ("v5e") is one chip.

  Raises:
    ValueError: for an unknown chip, a count that is not a positive int, or a chip
      count with no TPU topology (e.g. "v5e-6").
  """
  text = name.strip().lower()
  chip_part, _, count = text.partition("-")
  chip = get(chip_part)
  if not count:
    n = 1
  elif count.isdigit() and int(count) > 0:
    n = int(count)
  else:
    raise ValueError(f"accelerator={name!r}: expected <chip>-<count>, e.g. 'v5e-8', with a "
                     "positive count")
  if chip.name in ("v4", "v5p") and count:
    if n % 2:
      raise ValueError(f"accelerator={name!r}: {chip.name}-N counts TensorCores (2 per chip), "
                       "so N must be even")
    n //= 2
  if chip.name.startswith("v"):
    shapes = _TPU_3D if chip.name in ("v4", "v5p") else _TPU_2D
    if n not in shapes:
      raise ValueError(f"accelerator={name!r}: no {chip.name} slice of {n} chips; known chip "
                       f"counts: {sorted(shapes)}")
    return Slice(name, chip, n, f"{chip.name}:{shapes[n]}")
  return Slice(name, chip, n, None)
