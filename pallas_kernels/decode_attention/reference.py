"""Pure-jnp reference of `decode_attention`, and the input handling both share.

The reference is written for clarity: it dequantizes one layer of the cache to
float32 and computes masked softmax attention with highest-precision matmuls.

Cached tensors arrive either as plain `[L, B, K, S, H]` arrays with separate
per-token scale and zero-point arguments, or as quantized tensors (any object with
`values`, `scale` and `zero` attributes, such as `kvtpu.qtensor.QuantizedKV`) that carry
their scales; `unpack_operands` turns both into raw arrays at the boundary, and
the kernel bodies only ever see refs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# Storage dtypes the kernels read.
STORAGE_DTYPES = tuple(jnp.dtype(d) for d in (
    jnp.float32, jnp.bfloat16, jnp.int8, jnp.int4, jnp.int2, jnp.float8_e4m3fn, jnp.float8_e5m2))
MAX_DECODE_T = 8


@dataclasses.dataclass(frozen=True)
class Dims:
  """Static dimensions of one call (axis letters as in ARCHITECTURE.md)."""

  num_layers: int  # L
  batch: int  # B
  t: int  # T, query tokens per sequence
  q_heads: int  # N
  kv_heads: int  # K
  max_len: int  # S
  head_dim: int  # H
  k_groups: int  # scale groups per token for K (0: no per-token scales)
  v_groups: int  # likewise for V
  k_token_group: int = 0  # positions per per-channel K scale (0: none; `unpack_token_groups`)
  v_token_group: int = 0  # likewise for V
  page_len: int = 0  # Z, positions per page of a paged cache (0: one slab of S per sequence)
  pages: int = 0  # P, pages in the pool of a paged cache (0: none)

  @property
  def slab(self) -> int:
    """Positions of one stored slab: a page (Z), or all S of a contiguous cache."""
    return self.page_len or self.max_len

  @property
  def rows(self) -> int:
    """The stored arrays' axis 1: P pages, or B sequences."""
    return self.pages or self.batch

  @property
  def group(self) -> int:
    """G = N / K query heads per kv head."""
    return self.q_heads // self.kv_heads


def _is_quantized(x) -> bool:
  return all(hasattr(x, a) for a in ("values", "scale", "zero"))


def unpack_operands(k, v, k_scale=None, k_zero=None, v_scale=None, v_zero=None):
  """`(k, v, k_scale, k_zero, v_scale, v_zero)` as raw arrays.

  `k` and `v` may each be a plain array (its scales passed separately) or a
  quantized tensor carrying them; its scales must then be per token (`[L, B, K, G, S]`)
  or per channel over groups of positions (`[L, B, K, S / N, H]`, `unpack_token_groups`):
  static scales are the caller's to fold around the kernel.

  Raises:
    ValueError: for a quantized tensor passed together with separate scales.
  """
  out = {}
  for name, x, scale, zero in (("k", k, k_scale, k_zero), ("v", v, v_scale, v_zero)):
    if _is_quantized(x):
      if scale is not None or zero is not None:
        raise ValueError(f"{name} is a quantized tensor carrying its scales; do not also pass "
                         f"{name}_scale or {name}_zero")
      x, scale, zero = x.values, x.scale, x.zero
    out[name] = (x, scale, zero)
  (k, k_scale, k_zero), (v, v_scale, v_zero) = out["k"], out["v"]
  return k, v, k_scale, k_zero, v_scale, v_zero


def _carried(name: str, x, given, attr: str, what: str):
  """A static property of tensor `name`: a quantized tensor's attribute `attr` (absent:
  None), else `given`. Raises ValueError when a quantized tensor is given it too."""
  if not _is_quantized(x):
    return given
  if given is not None:
    raise ValueError(f"{name} is a quantized tensor that says {what}; do not also pass "
                     f"{name}_{attr}")
  return getattr(x, attr, None)


def unpack_codes(k, v, k_codes=None, v_codes=None):
  """`(k_codes, v_codes)`: each a tuple of codebook levels (ascending) that the stored
  integers index from the dtype's minimum (`q - min` picks the level), or None for a
  uniform grid; from a quantized tensor's `codes` attribute (absent or None: uniform),
  else from the argument.

  Raises:
    ValueError: for codes given twice, a codebook that is not a tuple of `2**bits`
      ascending floats, or codes for a storage dtype that is not an integer.
  """
  out = []
  for name, x, given in (("k", k, k_codes), ("v", v, v_codes)):
    # The tensor knows its own code (None: a uniform grid).
    codes = _carried(name, x, given, "codes", "how its values are coded")
    if codes is not None:
      dtype = jnp.dtype(x.dtype)
      if not jnp.issubdtype(dtype, jnp.signedinteger):
        raise ValueError(f"{name}_codes index integer storage, but {name} is {dtype}")
      n = 2 ** jnp.iinfo(dtype).bits
      if (not isinstance(codes, tuple) or len(codes) != n
          or any(not isinstance(c, float) for c in codes) or list(codes) != sorted(set(codes))):
        raise ValueError(f"{name}_codes must be a tuple of {n} ascending floats (one level per "
                         f"{dtype} value), got {codes!r}")
    out.append(codes)
  return tuple(out)


def unpack_token_groups(k, v, k_token_group=None, v_token_group=None) -> tuple[int, int]:
  """`(N_k, N_v)`: positions per per-channel scale of a token-grouped tensor (its scales
  `[L, B, K, S / N, H]`, one per channel over each aligned group of N positions), or 0
  for per-token or no scales; from a quantized tensor's `token_group` attribute (absent
  or None: 0), else from the argument.

  Raises:
    ValueError: for a group given twice, or one that is not a positive int.
  """
  out = []
  for name, x, given in (("k", k, k_token_group), ("v", v, v_token_group)):
    given = _carried(name, x, given, "token_group", "how its scales are laid out")
    if given is not None and (not isinstance(given, int) or isinstance(given, bool) or given < 1):
      raise ValueError(f"{name}_token_group must be a positive int or None, got {given!r}")
    out.append(given or 0)
  return out[0], out[1]


def unpack_transposed(k, v, k_transposed=None, v_transposed=None) -> tuple[bool, bool]:
  """`(k_transposed, v_transposed)`: whether each tensor's values are stored
  positions-minor, `[L, B, K, H, S]` (`kvtpu.qtensor.lanes_transposed`), from a quantized
  tensor's `transposed` attribute (absent: False), else from the argument (None: False).

  Raises:
    ValueError: for a layout given twice, or one that is not a bool.
  """
  out = []
  for name, x, given in (("k", k, k_transposed), ("v", v, v_transposed)):
    given = _carried(name, x, given, "transposed", "how its values are laid out")
    if given is not None and not isinstance(given, bool):
      raise ValueError(f"{name}_transposed must be a bool or None, got {given!r}")
    out.append(bool(given))
  return out[0], out[1]


def logical(x, transposed: bool, name: str = "values"):
  """A stored values array's logical `[L, B|P, K, S|Z, H]` shape and dtype: `x` itself,
  or a `jax.ShapeDtypeStruct` of its two minor axes swapped when `transposed`. `name`
  (k or v) names the tensor in errors."""
  if not transposed:
    return x
  if jnp.ndim(x) != 5:
    raise ValueError(f"{name} is stored transposed ({name}_transposed=True) and must be "
                     f"[L, B, K, H, S], got shape {jnp.shape(x)}")
  shape = x.shape
  return jax.ShapeDtypeStruct((*shape[:3], shape[4], shape[3]), x.dtype)


def decode_codes(x, levels):
  """Stored integers `x` (any shape; as float32 or integers) -> float32 levels:
  `levels[x - min]` with `min = -len(levels) // 2`, by a chain of selects (a table of
  n levels costs n - 1 compares and selects per value, in VMEM as in XLA)."""
  x = x.astype(jnp.float32)
  base = -len(levels) // 2
  out = jnp.full(x.shape, levels[0], jnp.float32)
  for i, level in enumerate(levels[1:], start=1):
    out = jnp.where(x >= base + i, jnp.float32(level), out)
  return out


# Window storage. XLA's TPU layouts (libtpu 0.0.52, found by compiling) keep a `[W, H]`
# window row-major, the layout the kernels read, only when W is a multiple of 8 (or 2 or
# 4, small tiles) and, where H is not a multiple of 128 lanes, W <= H. Other windows it
# stores with the batch folded into tiles or positions minor, and copies into the
# kernels' layout and back around every call (tens of MB per decode step for rings of
# 252 positions at 64 sequences). So a window of W positions has `window_slots(W)`
# slots, the last few never written or read, stored `[H, slots]` where
# `window_transposed` (positions in lanes, as XLA then keeps them).
_LANES = 128


def window_slots(size: int) -> int:
  """Stored slots of a window of `size` positions: `size` rounded up to a multiple of 8
  (2 and 4 kept)."""
  return size if size in (0, 2, 4) else -(-size // 8) * 8


def window_transposed(head_dim: int, slots: int) -> bool:
  """Whether a window of `slots` slots is stored `[H, slots]`: head_dim not a multiple of
  128 lanes and fewer than the slots."""
  return head_dim % _LANES != 0 and slots > head_dim


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Window:
  """An unquantized window as the kernels read it: `data` `[L, B, K, slots, H]`, or
  `[L, B, K, H, slots]` when `transposed`, whose first `size` slots hold the window
  (`window_slots`; the others are never read). A pytree of `data`; `size` and
  `transposed` are static."""

  data: jax.Array
  size: int = dataclasses.field(metadata=dict(static=True))
  transposed: bool = dataclasses.field(default=False, metadata=dict(static=True))

  @property
  def slots(self) -> int:
    return self.data.shape[4 if self.transposed else 3]

  def layer(self, layer) -> jax.Array:
    """One layer's window as `[B, K, size, H]`."""
    w = self.data[layer]
    return (jnp.swapaxes(w, -1, -2) if self.transposed else w)[:, :, :self.size]


def unpack_windows(k, v, k_sink=None, v_sink=None, k_recent=None, v_recent=None):
  """`(k_sink, v_sink, k_recent, v_recent)`: the unquantized windows as `Window`s (or
  None), from quantized tensors (their `window(field)`) or from the arguments (not
  both): a `Window`, or a plain `[L, B, K, W, H]` array, all W of its slots the window
  (a cache's stored window arrays have padding slots, and some are `[H, slots]`: pass
  them as `QuantizedKV.window(field)`, or the quantized tensor itself).

  Windows hold positions unquantized beside the quantized store `[L, B, K, S, H]`:
  a sink of W_s positions holds position p < W_s in slot p; a recent window of W_r
  positions holds each of a sequence's last W_r positions p in slot p mod W_r (a
  ring). Attention reads a position from the sink if p < W_s, else from the ring if
  p >= held - W_r (held: the tokens the sequence holds, chunk included), else from
  the quantized store.
  """
  out = {"k_sink": k_sink, "v_sink": v_sink, "k_recent": k_recent, "v_recent": v_recent}
  for name, x in (("k", k), ("v", v)):
    for field in ("sink", "recent"):
      carried = x.window(field) if _is_quantized(x) and hasattr(x, "window") else None
      if carried is not None:
        if out[f"{name}_{field}"] is not None:
          raise ValueError(f"{name} is a quantized tensor carrying its {field} window; do not "
                           f"also pass {name}_{field}")
        out[f"{name}_{field}"] = carried
  for key, w in out.items():
    if w is not None and not isinstance(w, Window):
      if jnp.ndim(w) != 5:
        raise ValueError(f"{key} must be [L, B, K, W, H], got {key}.shape={jnp.shape(w)}")
      out[key] = Window(w, w.shape[3])
  return out["k_sink"], out["v_sink"], out["k_recent"], out["v_recent"]


def validate_windows(d: Dims, k_sink, v_sink, k_recent, v_recent) -> tuple[int, int]:
  """Checks the windows (`Window`s or None, `unpack_windows`) against the call's `Dims`;
  returns `(W_s, W_r)`, their sizes in positions (0: none).

  Raises:
    ValueError, TypeError: naming the argument and the expected shape or dtype.
  """
  sizes = []
  for field, kw, vw in (("sink", k_sink, v_sink), ("recent", k_recent, v_recent)):
    if (kw is None) != (vw is None):
      raise ValueError(f"pass both k_{field} and v_{field} or neither")
    if kw is None:
      sizes.append(0)
      continue
    for name, w in ((f"k_{field}", kw), (f"v_{field}", vw)):
      x = w.data
      minor = (None if x.ndim != 5 else
               (d.head_dim, w.slots) if w.transposed else (w.slots, d.head_dim))
      if (minor is None or x.shape[:3] != (d.num_layers, d.batch, d.kv_heads)
          or tuple(x.shape[3:]) != minor or not 1 <= w.size <= w.slots):
        what = "H, slots" if w.transposed else "slots, H"
        raise ValueError(f"{name} must be [L={d.num_layers}, B={d.batch}, K={d.kv_heads}, {what}] "
                         f"(H={d.head_dim}) with 1 <= size <= slots, got {name}.shape={x.shape}, "
                         f"size={w.size}")
      if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be floating point, got {name}.dtype={x.dtype}")
    if (kw.data.shape, kw.size, kw.transposed) != (vw.data.shape, vw.size, vw.transposed):
      raise ValueError(f"k_{field} (shape {kw.data.shape}, size {kw.size}) and v_{field} (shape "
                       f"{vw.data.shape}, size {vw.size}) differ")
    sizes.append(kw.size)
  return sizes[0], sizes[1]


def overlay_windows(x, sink, recent, held):
  """`x: [B, K, S, H]` float32 with each sequence's window positions read from the
  windows (`[B, K, W, H]` or None; see `unpack_windows`); `held: i32[B]`."""
  pos = jnp.arange(x.shape[2], dtype=jnp.int32)
  p = pos[None, None, :, None]
  held = jnp.asarray(held, jnp.int32)[:, None, None, None]
  w_s = 0 if sink is None else sink.shape[2]
  if sink is not None:
    from_sink = jnp.take(sink, jnp.minimum(pos, w_s - 1), axis=2).astype(x.dtype)
    x = jnp.where(p < w_s, from_sink, x)
  if recent is not None:
    w_r = recent.shape[2]
    from_ring = jnp.take(recent, jax.lax.rem(pos, w_r), axis=2).astype(x.dtype)
    x = jnp.where((p >= held - w_r) & (p >= w_s) & (p < held), from_ring, x)
  return x


def validate_inputs(q, k, v, lengths, chunk, layer, k_scale=None, k_zero=None, v_scale=None,
                    v_zero=None, *, max_t: int | None = MAX_DECODE_T,
                    token_groups: tuple[int, int] = (0, 0), page_table=None) -> Dims:
  """Checks shapes and dtypes of a decode/prefill call; returns its `Dims`.

  Args:
    q: `[B, T, N, H]` float queries (already multiplied by the softmax scale).
    k, v: `[L, B, K, S, H]` caches in a storage dtype; with `page_table`, pools
      `[L, P, K, Z, H]` of P pages of Z positions (scales likewise with P and Z for B
      and S; windows stay per sequence: their axis 1 is B).
    lengths: `i32[B]` tokens held before this chunk; query t sits at lengths + t.
    chunk: `i32[B]` tokens of this chunk already written (valid), <= T.
    layer: integer scalar, the layer to read.
    k_scale, v_scale: per-token scales `[L, B, K, G, S]` float, or per-channel scales
      `[L, B, K, S / N, H]` of a token-grouped tensor, or None (unscaled).
    k_zero, v_zero: zero points shaped like the scales, or None.
    max_t: largest T accepted (decode: 8), or None.
    token_groups: `(N_k, N_v)` from `unpack_token_groups` (0: per-token scales).
    page_table: None, or integer `[B, pages_per_sequence]`: position p of sequence b
      is at offset `p % Z` of page `page_table[b, p // Z]`; S = Z * pages_per_sequence.

  Raises:
    ValueError, TypeError: naming the argument and the expected shape or dtype.
  """
  if q.ndim != 4:
    raise ValueError(f"q must be [B, T, N, H], got q.shape={q.shape}")
  if not jnp.issubdtype(q.dtype, jnp.floating):
    raise TypeError(f"q must be floating point, got q.dtype={q.dtype}")
  for name, x in (("k", k), ("v", v)):
    if x.ndim != 5:
      raise ValueError(f"{name} must be [L, B, K, S, H], got {name}.shape={x.shape}")
    if jnp.dtype(x.dtype) not in STORAGE_DTYPES:
      raise TypeError(f"{name}.dtype={x.dtype} is not a storage dtype {STORAGE_DTYPES}")
  if k.shape != v.shape:
    raise ValueError(f"k.shape={k.shape} and v.shape={v.shape} differ")
  num_layers, rows, kh, z, h = k.shape
  qb, t, n, qh = q.shape
  b, s = rows, z
  if page_table is not None:
    if (jnp.ndim(page_table) != 2 or jnp.shape(page_table)[0] != qb
        or not jnp.issubdtype(jnp.result_type(page_table), jnp.integer)):
      raise ValueError(f"page_table must be an integer [B={qb}, pages_per_sequence] array, got "
                       f"shape {jnp.shape(page_table)}, dtype {jnp.result_type(page_table)}")
    b, s = qb, z * page_table.shape[1]
  kind = "P" if page_table is not None else "B"
  if (qb, qh) != (b, h):
    raise ValueError(f"q.shape={q.shape} does not match the cache: expected [B={b}, T, N, H={h}]")
  if n % kh:
    raise ValueError(f"q's N={n} query heads must be a multiple of K={kh} kv heads")
  if max_t is not None and t > max_t:
    raise ValueError(f"decode attention takes T <= {max_t} query tokens, got T={t}")
  for name, x in (("lengths", lengths), ("chunk", chunk)):
    if jnp.shape(x) != (b,) or not jnp.issubdtype(jnp.result_type(x), jnp.integer):
      raise ValueError(f"{name} must be i32[B={b}], got shape {jnp.shape(x)}, "
                       f"dtype {jnp.result_type(x)}")
  if jnp.ndim(layer) != 0 or not jnp.issubdtype(jnp.result_type(layer), jnp.integer):
    raise ValueError(f"layer must be an integer scalar, got {layer!r}")
  groups = {}
  for name, scale, zero, tg in (("k", k_scale, k_zero, token_groups[0]),
                               ("v", v_scale, v_zero, token_groups[1])):
    if scale is None:
      if zero is not None:
        raise ValueError(f"{name}_zero given without {name}_scale")
      if tg:
        raise ValueError(f"{name}_token_group={tg} given without {name}_scale")
      groups[name] = 0
      continue
    if zero is not None and zero.shape != scale.shape:
      raise ValueError(f"{name}_zero.shape={zero.shape} must equal {name}_scale.shape={scale.shape}")
    axis = "Z" if page_table is not None else "S"
    if tg:
      if z % tg or scale.shape != (num_layers, rows, kh, z // tg, h):
        raise ValueError(f"{name}_scale of {name}_token_group={tg} must be per-channel scales "
                         f"[L={num_layers}, {kind}={rows}, K={kh}, {axis}/N={z // tg}, H={h}] "
                         f"with {axis}={z} a multiple of N={tg}, got {scale.shape}")
      groups[name] = 0
      continue
    if scale.ndim != 5 or scale.shape[:3] != (num_layers, rows, kh) or scale.shape[4] != z:
      raise ValueError(f"{name}_scale must be per-token scales [L={num_layers}, {kind}={rows}, "
                       f"K={kh}, G, {axis}={z}], got {scale.shape} (static scales are folded "
                       "around the kernel by the caller)")
    g = scale.shape[3]
    if h % g:
      raise ValueError(f"{name}_scale has G={g} groups, which does not divide H={h}")
    groups[name] = g
  paged = dict(page_len=z, pages=rows) if page_table is not None else {}
  return Dims(num_layers, b, t, n, kh, s, h, groups["k"], groups["v"], *token_groups, **paged)


def gather_pages(x, page_table, seq_axis: int):
  """One layer of a paged pool as per-sequence slabs: `x` `[P, K, Z, X]` (`seq_axis=2`)
  or `[P, K, X, Z]` (`seq_axis=3`) -> `[B, K, S, X]` / `[B, K, X, S]` with S = Z x
  pages_per_sequence; table entries outside `[0, P)` read page 0 (the null page)."""
  pages = jnp.where((page_table >= 0) & (page_table < x.shape[0]), page_table, 0)
  g = jnp.take(x, pages, axis=0)  # [B, W, K, ..., Z, ...]
  g = jnp.moveaxis(g, 1, seq_axis)  # The page axis next to Z: [B, K, ..., W, Z, ...].
  shape = g.shape[:seq_axis] + (g.shape[seq_axis] * g.shape[seq_axis + 1],) + g.shape[seq_axis + 2:]
  return g.reshape(shape)


def dequantize_per_token(x, scale, zero, codes=None):
  """`[B, K, S, H]` stored values and `[B, K, G, S]` scales (and zero points, or
  None) -> float32 `(x - zero) * scale`, each channel its group's scale; with
  `codes` (`unpack_codes`), `x` is first read as its codebook level."""
  x = x.astype(jnp.float32) if codes is None else decode_codes(x, codes)
  if scale is None:
    return x
  b, kh, s, h = x.shape
  g = scale.shape[2]
  xg = x.reshape(b, kh, s, g, h // g)
  sg = jnp.swapaxes(scale.astype(jnp.float32), 2, 3)[..., None]  # [B, K, S, G, 1]
  if zero is not None:
    xg = xg - jnp.swapaxes(zero.astype(jnp.float32), 2, 3)[..., None]
  return (xg * sg).reshape(b, kh, s, h)


def dequantize_token_groups(x, scale, zero, n: int, codes=None):
  """`[B, K, S, H]` stored values and `[B, K, S / n, H]` per-channel scales (and zero
  points, or None) of groups of `n` positions -> float32 `(x - zero) * scale`, each
  position its group's; `codes` as in `dequantize_per_token`."""
  x = x.astype(jnp.float32) if codes is None else decode_codes(x, codes)
  b, kh, s, h = x.shape
  xg = x.reshape(b, kh, s // n, n, h)
  if zero is not None:
    xg = xg - zero.astype(jnp.float32)[:, :, :, None, :]
  return (xg * scale.astype(jnp.float32)[:, :, :, None, :]).reshape(b, kh, s, h)


def dequantize_layer(x, scale, zero, codes=None, token_group: int = 0):
  """One layer's stored values as float32: per-channel scales over groups of
  `token_group` positions (`dequantize_token_groups`), else per-token ones."""
  if token_group:
    return dequantize_token_groups(x, scale, zero, token_group, codes)
  return dequantize_per_token(x, scale, zero, codes)


def ref_decode_attention(q, k, v, lengths, chunk, layer, *, k_scale=None, k_zero=None,
                         v_scale=None, v_zero=None, k_sink=None, v_sink=None, k_recent=None,
                         v_recent=None, k_codes=None, v_codes=None, k_token_group=None,
                         v_token_group=None, k_transposed=None, v_transposed=None,
                         page_table=None, block_sizes=None, precision=None, kv_span=None,
                         return_lse: bool = False, interpret=None,
                         max_t: int | None = MAX_DECODE_T):
  """Reference of `decode_attention` (same signature; `block_sizes`, `precision` and
  `interpret` unused: float32 at HIGHEST throughout).

  `k`, `v` may be quantized tensors carrying their scales, windows, codes, scale
  layout and values layout (`unpack_operands`, `unpack_windows`, `unpack_codes`,
  `unpack_token_groups`, `unpack_transposed`).
  Query t < chunk[b] of sequence b sits at position `p = lengths[b] + t` and sees cache
  positions `s <= p` with `s < S`, window positions read from the windows; rows
  t >= chunk[b] are padding, and they and rows with no visible position are 0.
  `kv_span` and `return_lse` as in `decode_attention`.
  Returns `[B, T, N, H]` float32 (and the log-sum-exps `[B, T, N]` if `return_lse`).
  """
  del block_sizes, interpret, precision
  windows = unpack_windows(k, v, k_sink, v_sink, k_recent, v_recent)
  k_codes, v_codes = unpack_codes(k, v, k_codes, v_codes)
  token_groups = unpack_token_groups(k, v, k_token_group, v_token_group)
  transposed = unpack_transposed(k, v, k_transposed, v_transposed)
  k, v, k_scale, k_zero, v_scale, v_zero = unpack_operands(k, v, k_scale, k_zero, v_scale, v_zero)
  k_shape, v_shape = logical(k, transposed[0], "k"), logical(v, transposed[1], "v")
  d = validate_inputs(q, k_shape, v_shape, lengths, chunk,
                      layer, k_scale, k_zero, v_scale, v_zero, max_t=max_t,
                      token_groups=token_groups, page_table=page_table)
  validate_windows(d, *windows)
  span = check_span(kv_span, d.batch)

  def pick(a, seq_axis=2):
    if a is None:
      return None
    return a[layer] if page_table is None else gather_pages(a[layer], page_table, seq_axis)

  def pick_scale(a, token_group):  # Per-token scales have positions minor.
    return pick(a, 2 if token_group else 3)

  k_scale, k_zero = (pick_scale(a, d.k_token_group) for a in (k_scale, k_zero))
  v_scale, v_zero = (pick_scale(a, d.v_token_group) for a in (v_scale, v_zero))
  # [B, K, S, H] slabs; values stored transposed are gathered as [B, K, H, S].
  k, v = (jnp.swapaxes(pick(x, 3), -1, -2) if t else pick(x)
          for x, t in zip((k, v), transposed, strict=True))
  k_sink, v_sink, k_recent, v_recent = (None if w is None else w.layer(layer) for w in windows)
  held = jnp.minimum(lengths + chunk, d.max_len)
  keys = overlay_windows(dequantize_layer(k, k_scale, k_zero, k_codes, d.k_token_group),
                         k_sink, k_recent, held)  # [B, K, S, H]
  values = overlay_windows(dequantize_layer(v, v_scale, v_zero, v_codes, d.v_token_group),
                           v_sink, v_recent, held)
  return masked_attention(q, keys, values, lengths, chunk, span=span, return_lse=return_lse)


def check_span(kv_span, batch: int, *, scalars: bool = False):
  """`kv_span` as two int32 `[batch]` arrays, or None; with `scalars`, integer scalars
  (the same span for every sequence) are taken too. Raises ValueError naming the
  argument for anything else."""
  if kv_span is None:
    return None
  try:
    start, stop = kv_span
  except (TypeError, ValueError):
    raise ValueError("kv_span must be None or a pair (start, stop) of int32 [B] arrays, got "
                     f"{type(kv_span).__name__}") from None
  start, stop = (jnp.broadcast_to(x, (batch,)) if scalars and jnp.ndim(x) == 0 else x
                 for x in (jnp.asarray(start), jnp.asarray(stop)))
  for name, x in (("start", start), ("stop", stop)):
    if x.shape != (batch,) or not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"kv_span's {name} must be an integer [B={batch}] array, got "
                       f"shape {x.shape} and dtype {x.dtype}")
  return start.astype(jnp.int32), stop.astype(jnp.int32)


def masked_attention(q, keys, values, lengths, chunk, *, span=None, return_lse: bool = False):
  """Exact attention over dequantized K/V, with the kernels' visibility rule.

  Args:
    q: `[B, T, N, H]` queries, already multiplied by the softmax scale.
    keys, values: `[B, K, S, H]` float; positions that hold no token may hold
      anything (NaN included) and are never read.
    lengths, chunk: `i32[B]`, as in `ref_decode_attention`.
    span: None, or `(start, stop)` `i32[B]` each (`check_span`): only positions in
      `[start[b], stop[b])` are visible.
    return_lse: also return each row's log-sum-exp, `[B, T, N]` (-inf: sees nothing).

  Returns:
    `[B, T, N, H]` float32; rows that see no position are 0.
  """
  b, t, n, h = q.shape
  kh, s = keys.shape[1], keys.shape[2]
  pos_s = jnp.arange(s)[None, :]
  held = pos_s < (lengths + chunk)[:, None]  # [B, S]
  if span is not None:  # Positions outside the span may hold anything, like unheld ones.
    start, stop = span
    held &= (pos_s >= start[:, None]) & (pos_s < stop[:, None])
  keys = jnp.where(held[:, None, :, None], keys.astype(jnp.float32), 0.0)
  values = jnp.where(held[:, None, :, None], values.astype(jnp.float32), 0.0)
  steps = jnp.arange(t)[None, :]
  limit = jnp.where(steps < chunk[:, None], lengths[:, None] + steps, -1)  # [B, T]; -1: padding
  visible = held[:, None, :] & (pos_s[None, :, :] <= limit[:, :, None])  # [B, T, S]
  qg = q.astype(jnp.float32).reshape(b, t, kh, n // kh, h)
  hi = jax.lax.Precision.HIGHEST
  logits = jnp.einsum("BTKGH,BKSH->BKGTS", qg, keys, precision=hi)
  mask = visible[:, None, None]
  logits = jnp.where(mask, logits, -jnp.inf)
  peak = jnp.max(logits, axis=-1, keepdims=True)
  p = jnp.where(mask, jnp.exp(logits - jnp.where(jnp.isfinite(peak), peak, 0.0)), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum("BKGTS,BKSH->BTKGH", p, values, precision=hi).reshape(b, t, n, h)
  if not return_lse:
    return out
  finite = jnp.isfinite(peak[..., 0])
  lse = jnp.where(finite & (denom[..., 0] > 0), jnp.log(denom[..., 0]) + peak[..., 0], -jnp.inf)
  return out, jnp.moveaxis(lse, 3, 1).reshape(b, t, n)  # [B, K, G, T] -> [B, T, N]
