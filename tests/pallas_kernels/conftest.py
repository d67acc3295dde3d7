"""Fixtures of the kernel tests: the bytes the TPU interpreter copies between HBM and VMEM.

The interpreter (jax._src.pallas.mosaic.interpret, private; jax is pinned in
pyproject.toml) copies an input block from HBM only when its block indices change
between grid steps, through its module-level `get`, and an output block back through
`store`. Wrapping them counts those copies' bytes.
"""

import jax
import pytest
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as mosaic_interpret

from tests.pallas_kernels.cases import stored_bits

_HBM = mosaic_interpret.TPU_MEMORY_SPACE_IDXS[mosaic_interpret.mosaic_core.MemorySpace.HBM]


@pytest.fixture
def copied_bytes(monkeypatch):
  """Bytes of every HBM -> VMEM block copy of kernel inputs, by input name."""
  counts: dict[str, int] = {}
  real_get = mosaic_interpret.get

  def counting_get(token, device_id, local_core_id, memory_space, *args, input_name=None, **kw):
    token, value = real_get(token, device_id, local_core_id, memory_space, *args,
                            input_name=input_name, **kw)
    if input_name is not None and int(memory_space) == _HBM:
      counts[input_name] = counts.get(input_name, 0) + value.size * stored_bits(value.dtype) // 8
    return token, value

  monkeypatch.setattr(mosaic_interpret, "get", counting_get)
  jax.clear_caches()  # The wrapper is captured when the interpreter is traced.
  yield counts
  jax.clear_caches()



@pytest.fixture
def stored_bytes(monkeypatch):
  """Bytes of every VMEM -> HBM block copy of kernel outputs."""
  counts = {"out": 0}
  real_store = mosaic_interpret.store

  def counting_store(token, device_id, local_core_id, memory_space, buffer_id, transforms, val,
                     *args, output_name=None, **kw):
    if output_name is not None and int(memory_space) == _HBM:
      counts["out"] += val.size * stored_bits(val.dtype) // 8
    return real_store(token, device_id, local_core_id, memory_space, buffer_id, transforms, val,
                      *args, output_name=output_name, **kw)

  monkeypatch.setattr(mosaic_interpret, "store", counting_store)
  jax.clear_caches()
  yield counts
  jax.clear_caches()
