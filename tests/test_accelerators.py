"""The accelerator table against JAX's own TPU chip info."""

import pytest
from jax.experimental.pallas import tpu as pltpu

from kvtpu import accelerators


@pytest.mark.parametrize("name", ["v4", "v5e", "v5p", "v6e"])
def test_tpu_capacity_matches_pallas_chip_info(name):
  chip = accelerators.get(name)
  # Chip info splits a multi-TensorCore chip's HBM per core.
  info = pltpu.get_tpu_info_for_chip(pltpu.ChipVersion(name), 1)
  per_chip = info.hbm_capacity_bytes * chip.tensor_cores
  assert abs(chip.hbm_bytes - per_chip) <= 0.02 * per_chip, (chip, per_chip)


def test_lookup():
  assert accelerators.get("V5litepod").name == "v5e"
  assert accelerators.get("h200").hbm_bandwidth == 4.8e12
  with pytest.raises(ValueError, match="unknown accelerator name='v9'; known:"):
    accelerators.get("v9")

  class FakeDevice:
    device_kind = "TPU v5 lite"

  assert accelerators.from_device(FakeDevice()).name == "v5e"
  assert accelerators.from_device(object()) is None
