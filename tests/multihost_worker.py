"""One process of the two-process sharded-cache check (`tests/test_multihost.py`).

Run as `python -m tests.multihost_worker <port> <process_id> <fmt> <layout>`: joins a JAX
job of two CPU processes of 4 devices each (gloo collectives), lays a cache on a global
mesh with `CacheSharding` and runs two steps (a ragged prefill chunk
and a decode token) of update / attend / advance over every layer, and compares the
gathered outputs, lengths and counters with the same steps on an unsharded cache on this
process's first device. Prints one line "max abs diff <x> lengths <...>" and exits 0 when
they agree to 1e-4 (outputs of O(1) over f32 logits up to ~100, from keys with 30x outlier
channels: the two programs sum in different orders), else 1.

Layouts: "slabs" (data: 2, model: 4; each process one data shard, kv heads over its
devices); "sequence" (data: 4, model: 2 with each model pair one device of each process:
strategy "sequence", a sequence's pages split over the two processes, block-local page ids
from a `PageAllocator(shards=4, model_shards=2)`, the attention partials merged across
processes).
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

L, B, K, N, H, S, PAGE = 2, 8, 4, 8, 64, 256, 64


def main(port: int, process_id: int, fmt: str, layout: str) -> int:
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                             process_id=process_id)
  import kvtpu  # noqa: PLC0415 (after the job is formed)
  from kvtpu.sharding import CacheSharding  # noqa: PLC0415

  assert jax.device_count() == 8 and jax.local_device_count() == 4
  paged = layout == "sequence"
  if paged:  # Model pairs across the processes: the merge's collectives cross hosts.
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4).T, ("data", "model"))
    assert {d.process_index for d in mesh.devices[0]} == {0, 1}
    sh = CacheSharding(mesh, strategy="sequence")
  else:
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    sh = CacheSharding(mesh)
  data_shards = mesh.shape["data"]
  rng = np.random.default_rng(0)  # The same data in both processes.
  # Long enough that the pages of both data shards' sequences would not fit one shard's
  # pool: shard-local page ids are needed.
  steps = [(200, np.array([200, 0, 170, 1, 200, 90, 3, 199])), (1, np.ones(B, np.int64))]
  data = [(t, valid, rng.standard_normal((L, B, t, N, H)).astype(np.float32),
           (rng.standard_normal((L, B, t, K, H)) * np.where(
               rng.random((1, 1, 1, 1, H)) < 0.1, 30, 1)).astype(np.float32),
           rng.standard_normal((L, B, t, K, H)).astype(np.float32)) for t, valid in steps]
  dims = dict(num_layers=L, batch=B, kv_heads=K, max_len=S, head_dim=H)
  # Each of the 8 pool blocks: the null page and its 2 sequences' 2 columns.
  kw = dict(page_len=PAGE, num_pages=8 * (1 + 2 * (S // PAGE) // 2)) if paged else {}
  cache = sh.init(fmt, **dims, **kw)
  allocator = kvtpu.PageAllocator.for_cache(cache, shards=data_shards,
                                            model_shards=2) if paged else None
  ref = kvtpu.KVCache.init(fmt, **dims)

  def global_array(x, spec):
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  def run(cache, q, k, v, valid, *, sharded):
    outs = []
    for layer in range(L):
      if sharded:
        cache = sh.update(cache, layer, k[layer], v[layer], valid_len=valid)
        outs.append(sh.attend(q[layer], cache, layer, valid_len=valid, impl="xla"))
      else:
        cache = cache.update(layer, k[layer], v[layer], valid_len=valid)
        outs.append(kvtpu.attend(q[layer], cache, layer, valid_len=valid, impl="xla"))
    advance = sh.advance if sharded else lambda c, n: c.advance(n)
    return advance(cache, valid), jnp.stack(outs)

  sharded_step = jax.jit(lambda *a: run(*a, sharded=True))
  local_step = jax.jit(lambda *a: run(*a, sharded=False))
  held = np.zeros(B, np.int64)
  worst = 0.0
  for _, valid, q, k, v in data:
    if paged:
      allocator.reserve_many({b: int(held[b] + valid[b]) for b in range(B)})
      cache = cache.with_page_table(global_array(allocator.table, P("data", None)))
    acts = P(None, "data", None, "model", None)
    cache, out = sharded_step(cache, global_array(q, acts), global_array(k, acts),
                              global_array(v, acts), global_array(valid.astype(np.int32),
                                                                  P("data")))
    with jax.default_device(jax.local_devices()[0]):
      ref, want = local_step(ref, q, k, v, valid.astype(np.int32))
    got = np.asarray(multihost_utils.process_allgather(out, tiled=True))
    worst = max(worst, float(np.abs(got - np.asarray(want)).max()))
    held += valid
  lengths = np.asarray(multihost_utils.process_allgather(cache.lengths, tiled=True))
  counters = np.asarray(multihost_utils.process_allgather(cache.counters, tiled=True))
  same_counts = np.array_equal(counters, np.asarray(ref.counters))
  print(f"max abs diff {worst:.3g} lengths {lengths.tolist()} counters equal {same_counts}",
        flush=True)
  ok = worst <= 1e-4 and lengths.tolist() == ref.lengths.tolist() and same_counts
  jax.distributed.shutdown()
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]))
