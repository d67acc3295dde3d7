"""A sharded cache across two processes (one JAX job over localhost, CPU collectives),
each with 4 fake devices, equals the unsharded cache: the multi-host layout of a TPU
pod slice, where each host holds its data shards' sequences (and their pages)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import slow_unless

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


# One sequence-sharded paged case and one slab case: what crosses hosts (sequences over
# the data axis, a sequence's pages over the model axis with block-local page ids, the
# attention partials merged across hosts, the gathered outputs and counters) does not
# depend on the format. The paged case is the windowed, rotated one; pages over the data
# axis only (strategy "heads") are held to the contiguous cache over a (data, model)
# mesh in one process by tests/test_paging.py.
@pytest.mark.parametrize("fmt,layout", [
    pytest.param(f, p, marks=slow_unless(p == "sequence"))
    for f, p in (("int4-sbf16-rot+sink4+recent64", "sequence"), ("k8v4", "slabs"))])
def test_two_processes_equal_one(fmt, layout):
  port = free_port()
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  procs = [subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", str(port), str(i),
                             fmt, layout], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outs.append((p.returncode, out, err))
  for code, out, err in outs:
    assert code == 0, f"worker failed ({code}):\n{out}\n{err[-3000:]}"
    assert "counters equal True" in out, out
