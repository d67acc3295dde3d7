"""Fixtures of the kernel tests: the bytes the TPU interpreter copies between HBM and VMEM.

The interpreter (jax._src.pallas.mosaic.interpret, private; jax is pinned in
pyproject.toml) copies an input block from HBM only when its block indices change
between grid steps, through its module-level `get`, and an output block back through
`store`. Wrapping them counts those copies' bytes.

The wrappers are captured when the interpreter is traced, so they are installed once per
process (at the first test that asks for a count) and stay: one `jax.clear_caches()`
then drops the programs traced with the unwrapped functions, and every later program
carries the wrappers. They add to the dict of the test that asked for it, and to
nothing otherwise. (Clearing the caches around every counting test threw away all of
the worker's compiled programs each time.)
"""

import jax
import pytest
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as mosaic_interpret

from tests.pallas_kernels.cases import stored_bits

_HBM = mosaic_interpret.TPU_MEMORY_SPACE_IDXS[mosaic_interpret.mosaic_core.MemorySpace.HBM]
# The dicts of the running test's `copied_bytes` and `stored_bytes` (None: not counting).
_COUNTS: dict[str, dict[str, int] | None] = {"copied": None, "stored": None}


def _install_counting_hooks():
  """Wraps the interpreter's `get` and `store` once in this process."""
  if getattr(mosaic_interpret.get, "_kvtpu_counting", False):
    return
  real_get, real_store = mosaic_interpret.get, mosaic_interpret.store

  def counting_get(token, device_id, local_core_id, memory_space, *args, input_name=None, **kw):
    token, value = real_get(token, device_id, local_core_id, memory_space, *args,
                            input_name=input_name, **kw)
    counts = _COUNTS["copied"]
    if counts is not None and input_name is not None and int(memory_space) == _HBM:
      counts[input_name] = counts.get(input_name, 0) + value.size * stored_bits(value.dtype) // 8
    return token, value

  def counting_store(token, device_id, local_core_id, memory_space, buffer_id, transforms, val,
                     *args, output_name=None, **kw):
    counts = _COUNTS["stored"]
    if counts is not None and output_name is not None and int(memory_space) == _HBM:
      counts["out"] += val.size * stored_bits(val.dtype) // 8
    return real_store(token, device_id, local_core_id, memory_space, buffer_id, transforms, val,
                      *args, output_name=output_name, **kw)

  # The interpreter's DMAs call `get.__wrapped__` and `store.__wrapped__` (the functions
  # under its `fail_on_exception`): they stay what they were, and are not counted.
  counting_get.__wrapped__, counting_store.__wrapped__ = real_get.__wrapped__, real_store.__wrapped__
  counting_get._kvtpu_counting = True
  mosaic_interpret.get, mosaic_interpret.store = counting_get, counting_store
  jax.clear_caches()  # Programs traced before now hold the unwrapped functions.


@pytest.fixture
def copied_bytes():
  """Bytes of every HBM -> VMEM block copy of kernel inputs, by input name."""
  _install_counting_hooks()
  _COUNTS["copied"] = counts = {}
  yield counts
  _COUNTS["copied"] = None


@pytest.fixture
def stored_bytes():
  """Bytes of every VMEM -> HBM block copy of kernel outputs."""
  _install_counting_hooks()
  _COUNTS["stored"] = counts = {"out": 0}
  yield counts
  _COUNTS["stored"] = None
