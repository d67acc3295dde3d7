"""The kernels' HBM-traffic accounts vs the copies the TPU interpreter actually makes.

The interpreter copies an input block from HBM only when its block indices change
between grid steps; the `copied_bytes` and `stored_bytes` fixtures (conftest.py) count
those copies' bytes, and `hbm_bytes` must predict them exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kvtpu.pallas_kernels import cache_write as cw
from kvtpu.pallas_kernels.decode_attention import (
  BlockSizes,
  decode_attention,
  hbm_bytes,
  min_hbm_bytes,
  validate_inputs,
)
from kvtpu.pallas_kernels.prefill_attention import PrefillBlockSizes, prefill_attention

from tests.helpers import slow_unless
from tests.pallas_kernels.cases import (
  INTERPRET,
  filled_cache,
  kernel_args,
  logical_args,
  stored_bits,
)

CASES = [
    # fmt, lengths, chunk, T, block_t (None: decode), block_s, max_len
    ("int8", [0, 1, 127, 128, 129, 380], [1, 1, 1, 1, 0, 1], 1, None, 128, 384),
    ("int4-asym-g16", [0, 200, 511], [2, 2, 1], 2, None, 256, 512),
    ("k8v4", [0, 5, 130], [20, 0, 17], 20, 8, 128, 384),
    ("fp8_e4m3", [0, 100, 300], [40, 33, 9], 40, 16, 128, 512),
    ("int4-asym+sink4+recent64", [0, 3, 70, 300], [1, 1, 1, 1], 1, None, 128, 384),
    ("int8-rot+recent16", [0, 5, 130], [20, 0, 17], 20, 8, 128, 384),
    ("k=int4-asym-c16,v=int8-c16+recent16", [0, 15, 16, 200, 383], [1, 1, 1, 1, 1], 1, None,
     128, 384),
    ("k=int4-c16-sbf16,v=int4+recent24", [0, 5, 130], [20, 0, 17], 20, 8, 128, 384),
    # A mixed batch: decode tokens and an idle row beside a prefill chunk; query blocks
    # of padding only copy nothing, so each decode row reads its prefix once.
    ("int8", [1000, 5, 300, 0, 700], [1, 64, 1, 0, 0], 64, 16, 128, 1024),
]


@pytest.mark.parametrize("fmt,lengths,chunk,t,block_t,block_s,max_len", [
    pytest.param(*c, marks=slow_unless(i == 0)) for i, c in enumerate(CASES)])
def test_account_matches_interpreter_copies(fmt, lengths, chunk, t, block_t, block_s, max_len,
                                            copied_bytes, rng):
  cache = filled_cache(fmt, rng, lengths=lengths, t=t, chunk=chunk, kv_heads=2, head_dim=64,
                       max_len=max_len)
  q = jnp.asarray(rng.standard_normal((len(lengths), t, 4, 64)), jnp.float32)
  args, kw = kernel_args(cache, 1, chunk)
  groups = (kw.get("k_token_group", 0), kw.get("v_token_group", 0))
  if block_t is None:
    out = decode_attention(q, *args, **kw, block_sizes=BlockSizes(block_s), interpret=INTERPRET)
  else:
    out = prefill_attention(q, *args, **kw, block_sizes=PrefillBlockSizes(block_t, block_s),
                            interpret=INTERPRET)
  jax.block_until_ready(out)
  d = validate_inputs(q, *logical_args(args, kw), kw["k_scale"], kw["k_zero"], kw["v_scale"], kw["v_zero"],
                      max_t=None, token_groups=groups)
  fmt = cache.fmt
  itemsize = {w: cache.tensor(w).spec.scale_jnp_dtype.itemsize for w in ("k", "v")}
  account = hbm_bytes(d, block_s, lengths, chunk, cache.k.dtype, cache.v.dtype,
                      block_t=block_t, has_zero=(kw["k_zero"] is not None,
                                                 kw["v_zero"] is not None),
                      windows=(fmt.sink, fmt.recent), scale_itemsize=itemsize)
  assert copied_bytes, "no copies were counted: the interpreter's `get` hook did not run"
  counted = sum(copied_bytes.values())
  assert counted == account["total"] - account["out"], (copied_bytes, account)
  # Never below the minimum: every seen token's K, V and scales once (window positions
  # at bf16), each query row read and written once.
  # Windows: copied once per (b, kv head), K and V, (W_s + W_r) x H bf16 values each.
  assert account["windows"] == len(lengths) * 2 * 2 * (fmt.sink + fmt.recent) * 64 * 2
  assert account["total"] >= min_hbm_bytes(
      d, lengths, chunk, cache.k.dtype, cache.v.dtype, scale_itemsize=itemsize,
      has_zero=(kw["k_zero"] is not None, kw["v_zero"] is not None),
      windows=(fmt.sink, fmt.recent))


@pytest.mark.parametrize("dtype,seq_axis,t", [
    pytest.param(jnp.int8, 3, 1), pytest.param(jnp.int4, 3, 70, marks=pytest.mark.slow),
    pytest.param(jnp.bfloat16, 4, 130, marks=pytest.mark.slow)])
@pytest.mark.parametrize("paged", [False, True], ids=["slab", "paged"])
def test_cache_write_account_matches_interpreter_copies(dtype, seq_axis, t, paged, copied_bytes,
                                                        stored_bytes, rng):
  # Per sequence the touched tiles are read and written once, and their placed rows
  # read once: nothing else of the store moves. Starts at tile edges and capacity.
  # Paged: pages of two tiles, scattered over a pool whose page 0 is the null page.
  tile = cw.tile_positions(dtype, seq_axis == 4, 1 << 20)
  s = 4 * tile
  lo = np.array([0, tile - 1, tile, 2 * tile + 1, s - 1, s], np.int32)
  hi = np.minimum(lo + np.array([t, t, 0, t, t, t]), s).astype(np.int32)
  z = 2 * tile if paged else s
  table, rows = None, len(lo)
  if paged:
    rows = 1 + 2 * len(lo)
    table = rng.permutation(np.arange(1, rows)).reshape(len(lo), 2).astype(np.int32)
  shape = (2, rows, 2, z, 64) if seq_axis == 3 else (2, rows, 2, 1, z)
  store = jnp.zeros(shape, dtype)
  new = jnp.asarray(rng.integers(-8, 8, (len(lo), t, 2, shape[7 - seq_axis])), jnp.int8)
  jax.block_until_ready(cw.cache_write(
      store, new.astype(dtype), 1, jnp.asarray(lo), jnp.asarray(hi), seq_axis=seq_axis,
      page_table=None if table is None else jnp.asarray(table), interpret=INTERPRET))
  account = cw.hbm_bytes(shape, dtype, t, lo, hi, seq_axis=seq_axis,
                         pages_per_sequence=2 if paged else 1)
  assert sum(copied_bytes.values()) == account["store_read"] + account["placed_read"], (
      copied_bytes, account)
  assert stored_bytes["out"] == account["store_written"], (stored_bytes, account)
  # At most two tiles of a sequence beyond the ones its rows need, and at least those.
  row_bytes = 2 * shape[7 - seq_axis] * stored_bits(dtype) // 8
  needed = sum(-(-(e - a) // tile) for a, e in zip(lo, hi, strict=True))
  assert account["store_read"] >= needed * tile * row_bytes
  assert account["store_read"] <= (needed + 2 * len(lo)) * tile * row_bytes
