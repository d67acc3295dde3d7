"""Test setup: 8 fake CPU devices, unoptimized CPU codegen, a persistent compilation cache,
strict rank promotion, per-test seeds, longest-first scheduling and the fast tier's sample."""

import collections
import os
import pathlib

# Before jax is imported anywhere: CPU backend (libtpu is installed for AOT compiles
# only) with 8 host devices for sharding tests.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# pytest-xdist workers each load libtpu (for AOT compiles); without this only the
# first worker gets libtpu's process lock and the others cannot compile for TPU.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# LLVM optimization of XLA's CPU code off (-O0): the tests' arrays are tiny, so their
# time is compiling, not running. XLA's HLO passes (fusion, buffer aliasing, sharding)
# still run, so what the tests check of compiled CPU programs is unchanged, and
# ahead-of-time TPU compiles through libtpu produce the same executables.
_XLA_FLAGS = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
              " --xla_backend_optimization_level=0").strip()
# Cheaper still, for the CPU backend only: LLVM without its expensive passes, and
# fusions emitted by the elemental emitters instead of the MLIR fusion emitters (a
# third less compile time; two programs computing the same values may then round
# apart in the last float32 bit). libtpu's XLA reads XLA_FLAGS too, later (at the first
# ahead-of-time TPU compile), and aborts on flags it does not know, so these are set
# only until the CPU backend has read them (below, after jax's import).
_CPU_ONLY_XLA_FLAGS = (" --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false"
                       if os.environ["JAX_PLATFORMS"] == "cpu" else "")
os.environ["XLA_FLAGS"] = _XLA_FLAGS + _CPU_ONLY_XLA_FLAGS
# For the tests' subprocesses that compile for the CPU only (`tests.helpers.run_binary`).
os.environ["KVTPU_TEST_CPU_XLA_FLAGS"] = _CPU_ONLY_XLA_FLAGS.strip()

# JAX's persistent compilation cache, shared by both xdist workers and by the
# subprocesses the tests start (doc snippets, end-to-end binary runs): a program
# compiled once is read back instead of compiled again, within a run and across runs
# (the edit loop recompiles only what an edit changed). The key covers the program,
# the compile options and the jax, jaxlib and backend versions, so a hit is the
# executable the compiler would produce. KVTPU_TEST_JAX_CACHE= (empty) turns it off.
# Programs that compile in 30 ms or more are stored (JAX's default is 1 s): the tests'
# cache writes and small jitted steps compile in 30-200 ms each, hundreds per file, and
# were compiled again on every run at the former 0.2 s; below 30 ms a read costs about
# what the compile does.
# Unbounded for JAX (max size -1): a bounded cache rescans every entry (a stat and a
# read each) under a file lock on every write, which took a sixth of a kernel test
# file's time once the cache held ~1700 programs. The bound is kept here instead, once
# a run (`_bound_compilation_cache`, before the workers start).
_JAX_CACHE = os.environ.get(
    "KVTPU_TEST_JAX_CACHE", str(pathlib.Path(__file__).resolve().parents[1] / ".cache" / "jax-tests"))
_JAX_CACHE_MAX_BYTES = 2 << 30
if _JAX_CACHE:
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _JAX_CACHE)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.03")
  os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", "-1")

import zlib  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.jit(lambda x: x + 1)(0)  # The backend parses XLA_FLAGS once, at its first compile.
os.environ["XLA_FLAGS"] = _XLA_FLAGS  # What libtpu reads.
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def rng(request) -> np.random.Generator:
  """A numpy Generator seeded from the test's name (stable across runs and workers)."""
  return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


# Scheduling for `pytest -n 2 --dist loadgroup --no-loadscope-reorder` (the Makefile):
# a module's tests run on one worker (they share module fixtures and compiled
# programs), except the doc snippets, which are independent subprocesses and run one
# per work unit. Work units go out in collection order, so the longest run first and
# the short modules fill in at the end (longest-first balances the two workers).
_LONGEST_FIRST = ("tests/test_readme.py::test_python_snippet_runs",
                  "tests/models/test_pretrained.py",
                  "tests/test_experiments_calibrate.py", "tests/test_experiments_evaluate.py",
                  "tests/models/test_headroom.py", "tests/models/test_generation.py")


def _work_unit(item) -> str:
  if item.nodeid.startswith(_LONGEST_FIRST[0]):
    return item.nodeid
  return item.nodeid.split("::")[0]


def _rank(item) -> int:
  for i, prefix in enumerate(_LONGEST_FIRST):
    if item.nodeid.startswith(prefix):
      return i
  return len(_LONGEST_FIRST)


def _bound_compilation_cache(path: pathlib.Path, max_bytes: int) -> None:
  """Deletes the oldest-written programs until the cache holds at most `max_bytes`."""
  entries = []
  for f in path.glob("*-cache"):
    try:
      st = f.stat()
    except FileNotFoundError:
      continue
    entries.append((st.st_mtime, st.st_size, f))
  total = sum(size for _, size, _ in entries)
  for _, size, f in sorted(entries, key=lambda e: e[0]):
    if total <= max_bytes:
      break
    f.unlink(missing_ok=True)
    f.with_name(f.name.removesuffix("-cache") + "-atime").unlink(missing_ok=True)
    total -= size


def pytest_configure(config):
  # The controller, once a run; only the tests' own folder (never a cache folder the
  # caller chose with JAX_COMPILATION_CACHE_DIR).
  if (_JAX_CACHE and os.environ.get("JAX_COMPILATION_CACHE_DIR") == _JAX_CACHE
      and not hasattr(config, "workerinput")):
    _bound_compilation_cache(pathlib.Path(_JAX_CACHE), _JAX_CACHE_MAX_BYTES)


def pytest_addoption(parser):
  parser.addoption(
      "--sample-params", type=int, default=0, metavar="N",
      help="run at most N cases of each parametrized test (a stable sample, chosen by a "
           "hash of the test id); 0 runs every case. The fast tier's cut.")


def _sample(config, items):
  """At most `--sample-params` cases per test function; the rest are deselected."""
  n = config.getoption("sample_params")
  if n <= 0:
    return items
  cases = collections.defaultdict(list)
  for item in items:
    cases[item.nodeid.split("[")[0]].append(item)
  keep = set()
  for group in cases.values():
    keep.update(sorted(group, key=lambda it: zlib.crc32(it.nodeid.encode()))[:n])
  config.hook.pytest_deselected(items=[it for it in items if it not in keep])
  return [it for it in items if it in keep]


def pytest_collection_modifyitems(config, items):
  items[:] = _sample(config, items)
  for item in items:
    item.add_marker(pytest.mark.xdist_group(_work_unit(item)))
  items.sort(key=_rank)  # Stable: the collection order within each rank.
