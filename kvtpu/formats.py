"""KV-cache storage formats: what is stored for keys and values, and how it is scaled.

A `KVFormat` holds one `QuantSpec` for keys and one for values. Both are frozen,
hashable dataclasses, so a format is a static (meta) field of the cache pytree
and a valid static argument under `jax.jit`.

Names. Every format has a stable `name` that `KVFormat.parse` reads back:

  tensor spec   := dtype ("-" option)*
  dtype         := bf16 | f32 | int8 | int4 | int2 | fp8_e4m3 | fp8_e5m2
                                   (f32: exact reference; int2 packs four values a byte)
  option        := asym            asymmetric (zero point), integer dtypes only
                 | g<N>            dynamic scales per token, head and group of N channels
                 | c<N>            dynamic scales per channel and head over each aligned
                                   group of N positions (KIVI's keys), computed when the
                                   group fills; the open group is read from the recent
                                   window, which the format must have (recent >= N)
                 | tensor | head | channel
                                   static (calibrated) scales per layer, per layer and
                                   kv head, or per layer, kv head and channel
                 | sbf16           scales stored as bfloat16 (zero points stay float32)
                 | rot             rotated per head before storing (`kvtpu.rotation`);
                                   any dtype, bf16 and f32 included
                 | nu              non-uniform code (int4/int2, dynamic, rotated specs):
                                   a fixed Lloyd-Max codebook for N(0, 1) (`quant.codebook`),
                                   scaled per token (and group) by its RMS
  format        := specs ("+" window)*
  specs         := tensor spec                  same spec for K and V
                 | "k" bits "v" bits            bits in {16, 8, 4, 2}: bf16/int8/int4/int2
                 | "k=" tensor spec ",v=" tensor spec
  window        := sink<N>         the first N tokens of each sequence kept unquantized
                 | recent<N>       the most recent N tokens kept unquantized (a ring)

Without a granularity option a quantized spec has dynamic scales per token and
kv head (`token_head`), computed when the token is written (`c<N>`: when its group of
N positions fills). Examples: `int8`,
`fp8_e4m3`, `int4-g32`, `int8-asym`, `fp8_e4m3-channel`, `int4-asym-rot`, `k8v4`,
`k=int8-head,v=int4-g64`, `k4v2`, `int4-asym-rot+sink4+recent128`,
`k=int2-asym-c128,v=int2+recent128`.

Integer grids: symmetric specs use `[-qmax, qmax]` (int8 255 levels, int4 15, int2
three: -1, 0, 1); asymmetric ones the whole range (int2: four levels). A `nu` spec's
stored integer indexes all `2**bits` levels of its codebook, symmetric about 0 and
without a zero point (`int2-nu`: four levels at +-0.453 and +-1.510 times the RMS).

Windows hold K and V of the same positions unquantized (bf16; f32 for an f32 spec),
beside the quantized store, which holds every position (a `c<N>` spec: every position
of a filled group, which the ring's N or more slots always cover): attention reads a position
from the sink if it is among the first `sink`, from the ring if it is among the
sequence's last `recent`, else from the quantized store. Windows are for dynamic
(per-token) and unquantized specs: a static spec's kernel reads values in its own
calibrated units, in which an unquantized copy would not be exact.

Static or dynamic is decided by the granularity: a scale shared across tokens
(tensor, head, channel) cannot be recomputed on write without rescaling what is
already stored, so it is calibrated ahead of time; a scale per token (token_head,
group) is computed on write, and so is a scale per channel over a group of positions
(channel_group), once the group is complete. `QuantSpec.dynamic` says which;
`QuantSpec.per_token` and `QuantSpec.token_group` tell the two dynamic layouts apart.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

__all__ = ["StorageDtype", "Granularity", "QuantSpec", "KVFormat", "PRESETS"]


class StorageDtype(enum.Enum):
  """The element type stored in the cache."""

  BF16 = "bf16"
  F32 = "f32"  # Unquantized reference storage: exact K/V, for checking models and kernels.
  INT8 = "int8"
  INT4 = "int4"
  INT2 = "int2"
  FP8_E4M3 = "fp8_e4m3"
  FP8_E5M2 = "fp8_e5m2"

  @property
  def jnp_dtype(self) -> jnp.dtype:
    return jnp.dtype(_JNP_DTYPES[self])

  @property
  def bits(self) -> int:
    return {"bf16": 16, "f32": 32, "int8": 8, "int4": 4, "int2": 2, "fp8_e4m3": 8, "fp8_e5m2": 8}[self.value]

  @property
  def is_int(self) -> bool:
    return self in (StorageDtype.INT8, StorageDtype.INT4, StorageDtype.INT2)

  @property
  def is_fp8(self) -> bool:
    return self in (StorageDtype.FP8_E4M3, StorageDtype.FP8_E5M2)

  @property
  def quantized(self) -> bool:
    return self not in (StorageDtype.BF16, StorageDtype.F32)


_JNP_DTYPES = {
    StorageDtype.BF16: jnp.bfloat16,
    StorageDtype.F32: jnp.float32,
    StorageDtype.INT8: jnp.int8,
    StorageDtype.INT4: jnp.int4,
    StorageDtype.INT2: jnp.int2,
    StorageDtype.FP8_E4M3: jnp.float8_e4m3fn,
    StorageDtype.FP8_E5M2: jnp.float8_e5m2,
}


class Granularity(enum.Enum):
  """Which values share one scale (and zero point)."""

  NONE = "none"  # bf16: nothing is scaled.
  TENSOR = "tensor"  # static: one scale per layer.
  HEAD = "head"  # static: one per layer and kv head.
  CHANNEL = "channel"  # static: one per layer, kv head and channel of H.
  TOKEN_HEAD = "token_head"  # dynamic: one per token and kv head.
  GROUP = "group"  # dynamic: one per token, kv head and group of channels.
  CHANNEL_GROUP = "channel_group"  # dynamic: one per channel and kv head, over N positions.

  @property
  def dynamic(self) -> bool:
    return self in (Granularity.TOKEN_HEAD, Granularity.GROUP, Granularity.CHANNEL_GROUP)


_SCALE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How one tensor (K or V) is stored.

  Attributes:
    dtype: element type in the cache.
    granularity: which values share a scale; decides static vs dynamic.
    group_size: with `GROUP`, channels per scale group along H; with `CHANNEL_GROUP`,
      positions per group (each channel's scale covers an aligned group of
      `group_size` positions); else None.
    symmetric: True stores `x = q * scale`; False adds a zero point,
      `x = (q - zero) * scale` (integer dtypes only).
    scale_dtype: dtype of stored scales, "float32" or "bfloat16" (zero points are
      float32 either way).
    rotation: store `x @ R` for the fixed orthogonal per-head `R` of
      `kvtpu.rotation` (scales, zero points and calibration then live in the
      rotated coordinates); attention rotates queries and outputs to match.
    nonuniform: store the index of the nearest level of a fixed codebook
      (`quant.codebook`: the Lloyd-Max levels of a standard normal) after scaling
      by the group's RMS, instead of a uniform grid. For int4/int2, symmetric,
      dynamic and rotated specs: rotation makes each token's coordinates close to
      normal, for which these levels are the least-squares optimum.
  """

  dtype: StorageDtype
  granularity: Granularity = Granularity.TOKEN_HEAD
  group_size: int | None = None
  symmetric: bool = True
  scale_dtype: str = "float32"
  rotation: bool = False
  nonuniform: bool = False

  def __post_init__(self):
    # Accept plain strings for the enum fields; normalize bf16 to "no scales".
    object.__setattr__(self, "dtype", StorageDtype(self.dtype))
    object.__setattr__(self, "granularity", Granularity(self.granularity))
    for flag in ("symmetric", "rotation", "nonuniform"):
      if not isinstance(getattr(self, flag), bool):
        raise ValueError(f"{flag} must be a bool, got {flag}={getattr(self, flag)!r}")
    if not self.dtype.quantized:
      if self.granularity not in (Granularity.NONE, Granularity.TOKEN_HEAD) or (
          self.group_size is not None or not self.symmetric
          or self.scale_dtype != "float32" or self.nonuniform):
        raise ValueError(f"{self.dtype.value} storage takes no scale options, got {self!r}")
      object.__setattr__(self, "granularity", Granularity.NONE)
      return
    if self.granularity is Granularity.NONE:
      raise ValueError(f"granularity=none is only for bf16 storage, got dtype={self.dtype.value}")
    if self.granularity in (Granularity.GROUP, Granularity.CHANNEL_GROUP):
      # bool is an int to Python, but `group_size=True` is a mistake, not a 1.
      if (not isinstance(self.group_size, int) or isinstance(self.group_size, bool)
          or self.group_size < 1):
        raise ValueError(f"granularity={self.granularity.value} needs a positive integer "
                         f"group_size, got group_size={self.group_size!r}")
    elif self.group_size is not None:
      raise ValueError(
          f"group_size is only for granularity=group or channel_group, got "
          f"group_size={self.group_size} with granularity={self.granularity.value}")
    if not self.symmetric and not self.dtype.is_int:
      raise ValueError(
          f"asymmetric (zero-point) scales are only for int8/int4/int2, got dtype={self.dtype.value}: "
          "fp8 is already non-uniform around zero; use a symmetric fp8 spec")
    if self.scale_dtype not in _SCALE_DTYPES:
      raise ValueError(f"scale_dtype must be one of {_SCALE_DTYPES}, got scale_dtype={self.scale_dtype!r}")
    if self.nonuniform:
      wrong = [why for bad, why in (
          (self.dtype not in (StorageDtype.INT4, StorageDtype.INT2), f"dtype int4 or int2 (got {self.dtype.value})"),
          (not self.symmetric, "no zero point (its codebook is symmetric about 0; drop asym)"),
          (not self.per_token, f"per-token scales (got {'static ' if self.static else ''}"
                               f"{self.granularity.value} scales)"),
          (not self.rotation, "rotation (add rot: the codebook is fitted to the near-normal "
                              "coordinates a rotation makes; an unrotated outlier channel "
                              "would sit far beyond its outermost level)"),
      ) if bad]
      if wrong:
        raise ValueError(f"a non-uniform code (nu) needs {'; '.join(wrong)}")

  # Derived properties, the single place other modules read them from.
  @property
  def quantized(self) -> bool:
    return self.dtype.quantized

  @property
  def dynamic(self) -> bool:
    """Scales computed per token on write (vs calibrated static scales)."""
    return self.granularity.dynamic

  @property
  def static(self) -> bool:
    return self.quantized and not self.dynamic

  @property
  def per_token(self) -> bool:
    """Dynamic scales per token (and group of channels), `[..., G, S]` in the cache."""
    return self.granularity in (Granularity.TOKEN_HEAD, Granularity.GROUP)

  @property
  def token_group(self) -> int | None:
    """Positions per scale of a per-channel spec over token groups (`c<N>`), else None."""
    return self.group_size if self.granularity is Granularity.CHANNEL_GROUP else None

  @property
  def clippable(self) -> bool:
    """Per-token scales that cover a range, which calibrated clip ratios narrow (every
    per-token spec but a non-uniform code's RMS scales)."""
    return self.quantized and self.per_token and not self.nonuniform

  @property
  def calibrated(self) -> bool:
    """Whether calibration has anything to fit: static scales, or clip ratios."""
    return self.static or self.clippable

  @property
  def storage_dtype(self) -> jnp.dtype:
    return self.dtype.jnp_dtype

  @property
  def scale_jnp_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.scale_dtype)

  @property
  def qmin(self) -> float:
    """Smallest stored value used (integers: -qmax when symmetric on a uniform grid)."""
    if self.dtype.is_int:
      info = jnp.iinfo(self.storage_dtype)
      return float(info.min) if not self.symmetric or self.nonuniform else -float(info.max)
    return -self.qmax

  @property
  def qmax(self) -> float:
    """Largest finite stored value (127, 7, 448, 57344; bf16: its max)."""
    if self.dtype.is_int:
      return float(jnp.iinfo(self.storage_dtype).max)
    return float(jnp.finfo(self.storage_dtype).max)

  def num_groups(self, head_dim: int) -> int:
    """Scale groups per token and head (dynamic specs); validates `head_dim`."""
    if self.granularity is Granularity.TOKEN_HEAD:
      return 1
    if self.granularity is Granularity.GROUP:
      if head_dim % self.group_size:
        raise ValueError(
            f"head_dim={head_dim} is not a multiple of group_size={self.group_size} ({self.name})")
      return head_dim // self.group_size
    raise ValueError(f"{self.name} has no per-token scale groups")

  @property
  def description(self) -> str:
    """Plain words for reports: `int8, token_head, symmetric`, `int4, group 32,
    asymmetric, bfloat16 scales`, `bf16, unscaled`."""
    rotated = ", rotated" if self.rotation else ""
    if not self.quantized:
      return f"{self.dtype.value}, unscaled{rotated}"
    parts = [self.dtype.value, self.granularity.value]
    if self.granularity is Granularity.GROUP:
      parts[-1] = f"group {self.group_size}"
    elif self.granularity is Granularity.CHANNEL_GROUP:
      parts[-1] = f"per channel over {self.group_size} positions"
    parts.append("symmetric" if self.symmetric else "asymmetric")
    if self.nonuniform:
      parts.append(f"Lloyd-Max code of {2 ** self.dtype.bits} levels")
    if self.scale_dtype != "float32":
      parts.append(f"{self.scale_dtype} scales")
    return ", ".join(parts) + rotated

  @property
  def name(self) -> str:
    parts = [self.dtype.value]
    if self.nonuniform:
      parts.append("nu")
    if not self.symmetric:
      parts.append("asym")
    if self.granularity is Granularity.GROUP:
      parts.append(f"g{self.group_size}")
    elif self.granularity is Granularity.CHANNEL_GROUP:
      parts.append(f"c{self.group_size}")
    elif self.granularity in (Granularity.TENSOR, Granularity.HEAD, Granularity.CHANNEL):
      parts.append(self.granularity.value)
    if self.scale_dtype == "bfloat16":
      parts.append("sbf16")
    if self.rotation:
      parts.append("rot")
    return "-".join(parts)

  def to_dict(self) -> dict[str, Any]:
    """Every field as JSON-able values (enums by value); `from_dict` reads it back."""
    return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> QuantSpec:
    """The spec `to_dict` wrote, validated like any spec.

    Raises:
      ValueError: for a field that `QuantSpec` does not have, or an invalid value.
    """
    if not isinstance(d, Mapping):
      raise ValueError(f"a QuantSpec dict must be a mapping, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown QuantSpec field(s) {unknown}; fields: {sorted(known)}")
    try:
      return cls(**d)
    except (TypeError, ValueError) as e:
      raise ValueError(f"invalid QuantSpec dict {dict(d)!r}: {e}") from None

  @classmethod
  def parse(cls, name: str) -> QuantSpec:
    """Parses a tensor spec name such as `int8`, `int4-asym-g32`, `fp8_e4m3-channel`."""
    if not isinstance(name, str) or not name:
      raise ValueError(f"a tensor spec name must be a non-empty string, got name={name!r}")
    dtype_name, *options = name.strip().lower().split("-")
    valid_dtypes = [d.value for d in StorageDtype]
    if dtype_name not in valid_dtypes:
      raise ValueError(f"unknown storage dtype {dtype_name!r} in name={name!r}; valid: {valid_dtypes}")
    if not StorageDtype(dtype_name).quantized and set(options) - {"rot"}:
      raise ValueError(f"{dtype_name} storage takes no scale options (only rot), got "
                       f"{'-'.join(options)!r} in name={name!r}")
    kwargs: dict = {"dtype": StorageDtype(dtype_name)}
    seen: set[str] = set()
    for opt in options:
      # Each option kind at most once: two granularities (or `asym-asym`) is a typo.
      kind = ("granularity" if opt in ("tensor", "head", "channel") or opt[:1] in ("g", "c")
              else opt)
      if kind in seen:
        raise ValueError(f"option {opt!r} conflicts with an earlier option in name={name!r}")
      seen.add(kind)
      if opt == "asym":
        kwargs["symmetric"] = False
      elif opt == "sbf16":
        kwargs["scale_dtype"] = "bfloat16"
      elif opt == "rot":
        kwargs["rotation"] = True
      elif opt == "nu":
        kwargs["nonuniform"] = True
      elif opt in ("tensor", "head", "channel"):
        kwargs["granularity"] = Granularity(opt)
      elif re.fullmatch(r"g[1-9]\d*", opt):
        kwargs["granularity"] = Granularity.GROUP
        kwargs["group_size"] = int(opt[1:])
      elif re.fullmatch(r"c[1-9]\d*", opt):
        kwargs["granularity"] = Granularity.CHANNEL_GROUP
        kwargs["group_size"] = int(opt[1:])
      else:
        raise ValueError(
            f"unknown option {opt!r} in name={name!r}; valid options: asym, g<N>, c<N>, tensor, "
            "head, channel, sbf16, rot, nu")
    try:
      return cls(**kwargs)
    except ValueError as e:  # Field validation: say which name it came from.
      raise ValueError(f"{e} (in name={name!r})") from None


def _windows(clauses: list[str]) -> dict[str, int]:
  """`["sink4", "recent128"]` -> `{"sink": 4, "recent": 128}`, each at most once."""
  sizes: dict[str, int] = {}
  for clause in clauses:
    m = re.fullmatch(r"(sink|recent)([1-9]\d*)", clause)
    if m is None:
      raise ValueError(f"unknown window {clause!r}; windows are sink<N> and recent<N>, N >= 1")
    if m[1] in sizes:
      raise ValueError(f"window {m[1]} given twice")
    sizes[m[1]] = int(m[2])
  return sizes


def _plain(x):
  return x.value if isinstance(x, enum.Enum) else x


_SHORT_BITS = {"16": "bf16", "8": "int8", "4": "int4", "2": "int2"}


@dataclasses.dataclass(frozen=True)
class KVFormat:
  """The storage format of a KV cache: one `QuantSpec` for K, one for V.

  Attributes:
    k: how keys are stored.
    v: how values are stored.
    sink: the first `sink` positions of each sequence are also kept unquantized.
    recent: the most recent `recent` positions of each sequence are also kept
      unquantized, in a ring of `recent` slots.
  """

  k: QuantSpec
  v: QuantSpec
  sink: int = 0
  recent: int = 0

  def __post_init__(self):
    for field in ("k", "v"):
      if not isinstance(getattr(self, field), QuantSpec):
        raise TypeError(f"KVFormat.{field} must be a QuantSpec, got {type(getattr(self, field)).__name__}")
    for field in ("sink", "recent"):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{field} must be an int >= 0, got {field}={value!r}")
    if self.windowed:
      if not self.quantized:
        raise ValueError(f"windows keep tokens unquantized, but {self.specs_name} stores K and V "
                         "unquantized already")
      static = [w for w in ("k", "v") if self.spec(w).static]
      if static:
        raise ValueError(
            f"sink/recent windows are for dynamic (per-token) or unquantized specs, but "
            f"{'/'.join(w.upper() for w in static)} of {self.specs_name} has static scales, in "
            "whose calibrated units the kernels read it")
    for w in ("k", "v"):
      n = self.spec(w).token_group
      if n is not None and self.recent < n:
        raise ValueError(
            f"{w.upper()} of {self.specs_name} is quantized per channel over groups of {n} "
            f"positions when a group fills; the open group is read from the recent window "
            f"until then, so the format needs +recent<N> with N >= {n}, got recent={self.recent}")

  @property
  def windowed(self) -> bool:
    """True if the format keeps a sink or a recent window."""
    return bool(self.sink or self.recent)

  @property
  def specs_name(self) -> str:
    """The name of the specs alone, without windows."""
    if self.k == self.v:
      return self.k.name
    short = {v: k for k, v in _SHORT_BITS.items()}
    if self.k.name in short and self.v.name in short:
      return f"k{short[self.k.name]}v{short[self.v.name]}"
    return f"k={self.k.name},v={self.v.name}"

  @property
  def name(self) -> str:
    """Stable name; `KVFormat.parse(fmt.name) == fmt`."""
    windows = (f"+sink{self.sink}" if self.sink else "") + (
        f"+recent{self.recent}" if self.recent else "")
    return self.specs_name + windows

  @property
  def quantized(self) -> bool:
    return self.k.quantized or self.v.quantized

  @property
  def static(self) -> bool:
    """True if either K or V needs calibrated static scales."""
    return self.k.static or self.v.static

  def to_dict(self) -> dict[str, Any]:
    """`{"name": ..., "k": spec dict, "v": spec dict, "sink": n, "recent": n}` (windows
    only when present); `from_dict` reads it back."""
    out = {"name": self.name, "k": self.k.to_dict(), "v": self.v.to_dict()}
    out |= {w: getattr(self, w) for w in ("sink", "recent") if getattr(self, w)}
    return out

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> KVFormat:
    """The format `to_dict` wrote; its `name`, if present, must agree with the specs.

    Raises:
      ValueError: for missing specs, an invalid spec, or a name that disagrees.
    """
    keys = {"name", "k", "v", "sink", "recent"}
    if not isinstance(d, Mapping) or not {"k", "v"} <= set(d) or set(d) - keys:
      raise ValueError(f"a KVFormat dict has keys 'k', 'v' and optionally 'name', 'sink', "
                       f"'recent', got {sorted(d) if isinstance(d, Mapping) else type(d).__name__}")
    fmt = cls(QuantSpec.from_dict(d["k"]), QuantSpec.from_dict(d["v"]), sink=d.get("sink", 0),
              recent=d.get("recent", 0))
    if "name" in d and cls.parse(d["name"]) != fmt:
      raise ValueError(f"KVFormat dict names {d['name']!r} but its specs are {fmt.name!r}")
    return fmt

  def spec(self, which: str) -> QuantSpec:
    if which not in ("k", "v"):
      raise ValueError(f"which must be 'k' or 'v', got which={which!r}")
    return self.k if which == "k" else self.v

  @classmethod
  def parse(cls, name: str | KVFormat) -> KVFormat:
    """Parses a format name (see module docstring); a `KVFormat` passes through.

    Raises:
      ValueError: for an unknown name, listing the presets and the grammar.
    """
    if isinstance(name, KVFormat):
      return name
    if not isinstance(name, str):
      raise TypeError(f"format name must be a str, got {type(name).__name__}")
    if "|" in name or "@" in name:
      raise ValueError(f"{name!r} is a layer plan (formats per layer), not a format: use "
                       "kvtpu.LayerPlan.parse, kvtpu.LayeredKVCache or a model's init_cache")
    text, *windows = name.strip().lower().split("+")
    try:
      sizes = _windows(windows)
      if m := re.fullmatch(r"k(16|8|4|2)v(16|8|4|2)", text):
        return cls(QuantSpec.parse(_SHORT_BITS[m[1]]), QuantSpec.parse(_SHORT_BITS[m[2]]),
                   **sizes)
      if m := re.fullmatch(r"k=([^,]+),v=([^,]+)", text):
        return cls(QuantSpec.parse(m[1]), QuantSpec.parse(m[2]), **sizes)
      spec = QuantSpec.parse(text)
      return cls(spec, spec, **sizes)
    except ValueError as e:
      raise ValueError(
          f"invalid KV format name={name!r}: {e}. Presets: {', '.join(PRESETS)}; or a tensor "
          "spec 'dtype[-nu][-asym][-g<N>|-c<N>|-tensor|-head|-channel][-sbf16][-rot]', 'k<bits>v<bits>' "
          "with bits in 16/8/4/2, or 'k=<spec>,v=<spec>'; then optionally '+sink<N>' and/or "
          "'+recent<N>'") from None

  def __str__(self) -> str:
    return self.name


PRESETS: tuple[str, ...] = (
    "bf16", "int8", "int4", "fp8_e4m3", "fp8_e5m2", "k8v4", "k4v8", "k8v16", "k16v8",
    "int8-asym", "int4-asym", "int4-g32", "int4-asym-g32",
)


def _layer_list(text: str) -> tuple[int, ...]:
  """`"3,7,12-14"` -> `(3, 7, 12, 13, 14)`: sorted, each layer once."""
  layers: list[int] = []
  for part in text.split(","):
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
    if m is None or (m[2] is not None and int(m[2]) < int(m[1])):
      raise ValueError(f"layers are ints and ranges a-b (a <= b), comma-separated, got {text!r}")
    layers += range(int(m[1]), int(m[2] or m[1]) + 1)
  if len(set(layers)) != len(layers):
    raise ValueError(f"a layer is listed twice in {text!r}")
  return tuple(sorted(layers))


def _layer_text(layers: tuple[int, ...]) -> str:
  """`(3, 7, 12, 13, 14)` -> `"3,7,12-14"`."""
  runs: list[list[int]] = []
  for layer in layers:
    if runs and layer == runs[-1][1] + 1:
      runs[-1][1] = layer
    else:
      runs.append([layer, layer])
  return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """Formats per layer: a default, and other formats for listed layers.

  Name: `default ("|" format "@" layers)*`, layers as ints and ranges, e.g.
  `int2-nu-sbf16-rot+sink4+recent124|k=int4-nu-sbf16-rot,v=int2-nu-sbf16-rot+sink4+recent124@20-29`
  (quote it in a shell). `LayerPlan.parse(plan.name) == plan`.

  Attributes:
    default: the format of every layer not listed.
    overrides: `(format, layers)` pairs, each format distinct from the default and
      from the others, layers ascending and listed once across all pairs.
  """

  default: KVFormat
  overrides: tuple[tuple[KVFormat, tuple[int, ...]], ...] = ()

  def __post_init__(self):
    if not isinstance(self.default, KVFormat):
      raise TypeError(f"LayerPlan.default must be a KVFormat, got {type(self.default).__name__}")
    try:  # Tuples, so that the plan is hashable (jit-static) and compares by value.
      object.__setattr__(self, "overrides", tuple((fmt, tuple(layers))
                                                  for fmt, layers in self.overrides))
    except (TypeError, ValueError):
      raise ValueError(f"LayerPlan.overrides must be (format, layers) pairs, got "
                       f"{self.overrides!r}") from None
    seen: set[int] = set()
    formats = {self.default}
    for fmt, layers in self.overrides:
      if not isinstance(fmt, KVFormat):
        raise TypeError(f"LayerPlan override formats must be KVFormats, got {type(fmt).__name__}")
      if fmt in formats:
        raise ValueError(f"format {fmt.name} appears twice in the plan (as the default or another "
                         "override): list all its layers in one override")
      formats.add(fmt)
      if (not layers or list(layers) != sorted(set(layers))
          or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in layers)):
        raise ValueError(f"the layers of {fmt.name} must be distinct ascending ints >= 0, got "
                         f"{layers!r}")
      if seen & set(layers):
        raise ValueError(f"layers {sorted(seen & set(layers))} are given two formats")
      seen |= set(layers)

  @property
  def name(self) -> str:
    return "|".join([self.default.name] + [f"{fmt.name}@{_layer_text(layers)}"
                                           for fmt, layers in self.overrides])

  @property
  def all_formats(self) -> tuple[KVFormat, ...]:
    """The default, then each override's format."""
    return (self.default, *(fmt for fmt, _ in self.overrides))

  @property
  def quantized(self) -> bool:
    return any(f.quantized for f in self.all_formats)

  @property
  def static(self) -> bool:
    return any(f.static for f in self.all_formats)

  @property
  def windowed(self) -> bool:
    return any(f.windowed for f in self.all_formats)

  def to_dict(self) -> dict[str, Any]:
    """`{"name", "default": format dict, "overrides": [{"format", "layers"}]}`;
    `from_dict` reads it back."""
    return {"name": self.name, "default": self.default.to_dict(),
            "overrides": [{"format": fmt.to_dict(), "layers": list(layers)}
                          for fmt, layers in self.overrides]}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> LayerPlan:
    """The plan `to_dict` wrote; its `name` must agree with its formats.

    Raises:
      ValueError: for a malformed dict or a name that disagrees.
    """
    if not isinstance(d, Mapping) or set(d) != {"name", "default", "overrides"}:
      raise ValueError(f"a LayerPlan dict has keys 'name', 'default', 'overrides', got "
                       f"{sorted(d) if isinstance(d, Mapping) else type(d).__name__}")
    plan = cls(KVFormat.from_dict(d["default"]),
               tuple((KVFormat.from_dict(o["format"]), tuple(o["layers"])) for o in d["overrides"]))
    if cls.parse(d["name"]) != plan:
      raise ValueError(f"LayerPlan dict names {d['name']!r} but its formats are {plan.name!r}")
    return plan

  def __str__(self) -> str:
    return self.name

  @classmethod
  def parse(cls, name: str | KVFormat | LayerPlan) -> LayerPlan:
    """A plan name; a `KVFormat` (or format name) is the plan of one format for every
    layer, and a `LayerPlan` passes through.

    Raises:
      ValueError: for an invalid format, layer list or plan.
    """
    if isinstance(name, LayerPlan):
      return name
    if isinstance(name, KVFormat):
      return cls(name)
    if not isinstance(name, str):
      raise TypeError(f"a layer plan must be a str, KVFormat or LayerPlan, got {type(name).__name__}")
    default, *parts = name.strip().split("|")
    overrides = []
    for part in parts:
      fmt, at, layers = part.rpartition("@")
      if not at:
        raise ValueError(f"invalid layer plan {name!r}: each override is format@layers, got {part!r}")
      try:
        overrides.append((KVFormat.parse(fmt), _layer_list(layers)))
      except ValueError as e:
        raise ValueError(f"invalid layer plan {name!r}: {e}") from None
    return cls(KVFormat.parse(default), tuple(overrides))

  @classmethod
  def config(cls, name: str | KVFormat | LayerPlan) -> KVFormat | LayerPlan:
    """A cache's configuration in its simplest form: the `KVFormat` when every layer has
    it, else the `LayerPlan` (as `parse` reads `name`)."""
    plan = cls.parse(name)
    return plan if plan.overrides else plan.default

  def formats(self, num_layers: int) -> tuple[KVFormat, ...]:
    """The format of each of `num_layers` layers.

    Raises:
      ValueError: for an override layer >= num_layers.
    """
    out = [self.default] * num_layers
    for fmt, layers in self.overrides:
      if layers[-1] >= num_layers:
        raise ValueError(f"plan {self.name} gives layer {layers[-1]} a format, but the model has "
                         f"{num_layers} layers")
      for i in layers:
        out[i] = fmt
    return tuple(out)

  def groups(self, num_layers: int) -> tuple[tuple[KVFormat, tuple[int, ...]], ...]:
    """`(format, layers)` per format present among `num_layers` layers: the default's
    first (if any layer keeps it), then the overrides in order."""
    formats = self.formats(num_layers)
    return tuple((fmt, tuple(i for i, f in enumerate(formats) if f == fmt))
                 for fmt in self.all_formats if fmt in formats)
