"""The calibration artifact: calibrated scales plus the disclosure of how they were made.

What is calibrated depends on each spec of the format: a static spec (granularity
tensor, head or channel) gets its scale (and zero point); a dynamic spec (scales
per token, computed on write) gets its clip ratios per layer and kv head
(`kvtpu.calibration.clipping`).

Static scales are only as good as the workload they were calibrated on, so the
artifact carries, next to the scales, everything a report needs to say so: the
model id and its weight precision, the cache format, the scale method and its
options, every workload's name, the tokens of it used and available, its content
hashes, the kvtpu version and the date. It also stores, per layer, the fraction of
calibration values that the chosen scales clip: the baseline that drift monitoring
(`kvtpu.calibration.drift`) compares the cache's run-time saturation counters against.

The calibrated arrays are those of the cache's quantized tensors that are fixed at
creation (`QuantizedKV.param_names`): `scales["k"]` and `scales["v"]` map a field
name (`scale`, `zero`, `clip`) to its array, shaped as in `QuantizedKV.layout`.

On disk (`save` / `load`) it is a directory: `kvtpu_calibration.json` (the format,
disclosure and summary; written last, so its presence means a complete artifact)
and an orbax checkpoint `arrays/` of the scale and clip-fraction arrays. The marker
records the sha256 of every array and of its own content (`kvtpu.checkpointing`), and
`load` verifies them before using anything: a bit flipped in the scales, a truncated
file or an edited field (say `kv_format`, which would apply int8 scales to an int4
cache) is an `IntegrityError` naming the file or array and the `calibrate` command
that regenerates the artifact, never scales silently different from those computed.

Applying it: `KVCache.init(fmt, ..., calibration=artifact)` (or the artifact's
folder) validates the layer count, kv heads, head dim and format against the cache
and uses the scales.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from kvtpu.checkpointing import (
  IntegrityError,
  check_arrays,
  check_metadata,
  read_marker,
  restore_arrays,
  save_arrays,
  seal,
)
from kvtpu.formats import KVFormat
from kvtpu.qtensor import QuantizedKV, check_param

__all__ = ["CalibrationArtifact", "IntegrityError", "ARTIFACT_MARKER", "FORMAT_VERSION", "fill_provenance",
           "calibrated_layout"]

ARTIFACT_MARKER = "kvtpu_calibration.json"
# Version of the on-disk layout (3: content hashes in the marker); `load` refuses others.
FORMAT_VERSION = 3
_MODEL_FIELDS = ("name", "weight_precision", "num_layers", "kv_heads", "head_dim")
_WORKLOAD_FIELDS = ("name", "num_tokens", "tokens_used", "token_sha256", "source_sha256")


def calibrated_layout(fmt: KVFormat, *, num_layers: int, kv_heads: int, head_dim: int
                      ) -> dict[str, dict[str, tuple[int, ...]]]:
  """`{which: {field: shape}}` of what calibration provides for `fmt`: static scales
  (and zero points), or the clip ratios of dynamic quantized specs."""
  out = {}
  for which in ("k", "v"):
    spec = fmt.spec(which)
    layout = QuantizedKV.layout(spec, num_layers=num_layers, batch=1, kv_heads=kv_heads,
                                max_len=128, head_dim=head_dim, clip=spec.clippable)
    names = QuantizedKV.param_names(spec, clip=spec.clippable)
    if names:
      out[which] = {f: tuple(getattr(layout, f).shape) for f in names}
  return out


def fill_provenance(artifact) -> None:
  """Sets a frozen artifact's empty `kvtpu_version` (this library's) and `created` (now,
  ISO 8601 UTC)."""
  if not artifact.kvtpu_version:
    from kvtpu import __version__  # noqa: PLC0415 (kvtpu imports this module)
    object.__setattr__(artifact, "kvtpu_version", __version__)
  if not artifact.created:
    object.__setattr__(artifact, "created", datetime.datetime.now(datetime.UTC).isoformat(
        timespec="seconds"))


@dataclasses.dataclass(frozen=True)
class CalibrationArtifact:
  """Calibrated scales (or clip ratios) of one model and cache format, with their disclosure.

  Attributes:
    fmt: the cache format; at least one of its specs is quantized.
    scales: per quantized tensor ("k", "v"), its calibrated fields
      (`calibrated_layout`): `scale` (and `zero` for asymmetric specs), float32
      `[L, 1|K, 1|H]`, for static specs; `clip`, float32 `[L, K]` ratios in
      (0, 1], for dynamic ones.
    clip_fraction: `{"k": f64[L], "v": f64[L]}` for the quantized specs: the fraction
      of calibration values these scales clip (the run-time saturation baseline).
    model: `name`, `weight_precision`, `num_layers`, `kv_heads`, `head_dim`.
    method: the scale method (`absmax`, `percentile`, `mse`, `learned`);
      method_options: its options (e.g. `{"percentile": 99.99}`).
    workloads: per calibration workload its disclosure: `name`, `num_tokens` (the
      workload's size), `tokens_used` (how many of them calibrated the scales, at most
      `num_tokens`), `token_sha256`, `source_sha256` (and whatever else it reports).
    kvtpu_version: the library version that computed the scales.
    created: ISO 8601 date and time (UTC).
    summary: JSON-able statistics summary (per-layer outlier table), for reports.
  """

  fmt: KVFormat
  scales: Mapping[str, np.ndarray]
  clip_fraction: Mapping[str, np.ndarray]
  model: Mapping[str, Any]
  method: str
  workloads: tuple[Mapping[str, Any], ...]
  method_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  kvtpu_version: str = ""
  created: str = ""
  summary: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    object.__setattr__(self, "fmt", KVFormat.parse(self.fmt))
    object.__setattr__(self, "workloads", tuple(dict(w) for w in self.workloads))
    fill_provenance(self)
    missing = [f for f in _MODEL_FIELDS if f not in self.model]
    if missing:
      raise ValueError(f"model is missing {missing}; it needs {list(_MODEL_FIELDS)}")
    if not self.workloads:
      raise ValueError("workloads is empty: an artifact must name the data it was calibrated on")
    for i, w in enumerate(self.workloads):
      lacking = [f for f in _WORKLOAD_FIELDS if f not in w]
      if lacking:
        raise ValueError(f"workloads[{i}] lacks {lacking} (a disclosure needs {_WORKLOAD_FIELDS})")
      used, total = w["tokens_used"], w["num_tokens"]
      if not all(isinstance(n, int | np.integer) and not isinstance(n, bool)
                 for n in (used, total)) or not 0 < used <= total:
        raise ValueError(f"workloads[{i}] ({w['name']}) must have ints 0 < tokens_used <= "
                         f"num_tokens, got tokens_used={used!r}, num_tokens={total!r}")
    layers, heads, dim = (int(self.model[f]) for f in ("num_layers", "kv_heads", "head_dim"))
    expected = calibrated_layout(self.fmt, num_layers=layers, kv_heads=heads, head_dim=dim)
    if not expected:
      raise ValueError(f"format {self.fmt.name} stores K and V unquantized: nothing to calibrate")
    got = {w: sorted(d) for w, d in self.scales.items()} if isinstance(self.scales, Mapping) else None
    if got != {w: sorted(d) for w, d in expected.items()}:
      raise ValueError(f"format {self.fmt.name} needs scales {_names(expected)}, got "
                       f"{_names(self.scales) if got is not None else repr(self.scales)[:80]}")
    arrays = {}
    for which, fields in expected.items():
      spec = self.fmt.spec(which)
      arrays[which] = {}
      for field, shape in fields.items():
        name = f"{which}_{field}"
        arr = np.asarray(self.scales[which][field], np.float32)
        if arr.shape != shape:
          raise ValueError(f"{name} has shape {arr.shape}; {spec.name} on this model needs {shape}")
        check_param(name, field, arr)
        arrays[which][field] = arr
    object.__setattr__(self, "scales", arrays)
    fractions = {}
    for which in sorted(expected):
      if which not in self.clip_fraction:
        raise ValueError(f"clip_fraction lacks {which!r}: the drift baseline of the "
                         f"calibrated {which.upper()} scales")
      frac = np.asarray(self.clip_fraction[which], np.float64)
      if frac.shape != (layers,) or not np.all((frac >= 0) & (frac <= 1)):
        raise ValueError(f"clip_fraction[{which!r}] must be {layers} fractions in [0, 1], got "
                         f"shape {frac.shape}")
      fractions[which] = frac
    object.__setattr__(self, "clip_fraction", fractions)

  # ---------------------------------------------------------------- applying
  def check_compatible(self, *, num_layers: int, kv_heads: int, head_dim: int,
                       fmt: KVFormat | str | None = None, model_name: str | None = None) -> None:
    """Raises a ValueError naming the first mismatch with a cache (or model)."""
    fmt = None if fmt is None else KVFormat.parse(fmt)
    for field, want in (("num_layers", num_layers), ("kv_heads", kv_heads),
                        ("head_dim", head_dim)):
      if int(self.model[field]) != want:
        raise ValueError(f"calibration artifact is for {field}={self.model[field]} "
                         f"({self.model['name']}), but the cache has {field}={want}")
    if fmt is not None and fmt != self.fmt:
      raise ValueError(f"calibration artifact holds scales for format {self.fmt.name}, but the "
                       f"cache's format is {fmt.name}")
    if model_name is not None and model_name != self.model["name"]:
      raise ValueError(f"calibration artifact was made on model {self.model['name']!r}, not "
                       f"{model_name!r}")

  def disclosure(self) -> dict[str, Any]:
    """What a report must state about these scales (JSON-able)."""
    return {"model": dict(self.model), "kv_format": self.fmt.name, "method": self.method,
            "method_options": dict(self.method_options), "workloads": list(self.workloads),
            "kvtpu_version": self.kvtpu_version, "created": self.created}

  def workload_names(self) -> str:
    """`prose (2048 of 63789 tok) + code (2048 of 111317 tok)`: the short form for table
    headers, the tokens used for calibration of each workload's available total."""
    return " + ".join(f"{w['name']} ({w['tokens_used']} of {w['num_tokens']} tok)"
                      for w in self.workloads)

  # ---------------------------------------------------------------- storage
  def save(self, path: str | os.PathLike) -> Path:
    """Writes the artifact, with the content hashes `load` verifies, to a new or empty
    directory `path`."""
    path = Path(path).absolute()
    if path.exists() and any(path.iterdir()):
      raise FileExistsError(f"artifact path={str(path)!r} exists and is not empty")
    path.mkdir(parents=True, exist_ok=True)
    arrays = {"scales": {w: dict(d) for w, d in self.scales.items()},
              "clip_fraction": {k: np.asarray(v) for k, v in self.clip_fraction.items()}}
    save_arrays(path / "arrays", arrays)
    shapes = jax.tree.map(lambda a: list(np.shape(a)), arrays)
    meta = {"format_version": FORMAT_VERSION, "kv_format": self.fmt.name, **self.disclosure(),
            "summary": _jsonable(self.summary), "arrays": shapes}
    (path / ARTIFACT_MARKER).write_text(json.dumps(seal(meta, arrays), indent=2))
    return path

  @classmethod
  def load(cls, path: str | os.PathLike) -> CalibrationArtifact:
    """Reads an artifact written by `save`: verifies the content hashes of its marker
    and arrays, then re-validates every field and scale.

    Raises:
      FileNotFoundError: no artifact at `path`.
      IntegrityError: a corrupt artifact (a marker or array that differs from what was
        saved, data that does not restore); the message names the file or array and the
        command that regenerates the artifact.
      ValueError: an artifact of another format version, or an invalid one (the message
        names the field).
    """
    path = Path(path).absolute()
    marker = path / ARTIFACT_MARKER
    if not marker.is_file():
      raise FileNotFoundError(f"no calibration artifact at {path} (no {ARTIFACT_MARKER})")
    meta = read_marker(marker, regenerate=_recalibrate({}))
    regenerate = _recalibrate(meta)
    if meta.get("format_version") != FORMAT_VERSION:
      raise ValueError(f"{marker}: artifact format_version={meta.get('format_version')!r}, this "
                       f"kvtpu reads {FORMAT_VERSION}; {regenerate}")
    check_metadata(meta, marker, regenerate=regenerate)
    try:
      target = {group: jax.tree.map(
          lambda s, g=group: np.zeros(s, np.float32 if g == "scales" else np.float64), d,
          is_leaf=lambda x: isinstance(x, list)) for group, d in meta["arrays"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
      raise ValueError(f"{marker}: malformed array shapes in the metadata ({e})") from e
    arrays = restore_arrays(path / "arrays", target, what="calibrated arrays",
                            regenerate=regenerate)
    check_arrays(arrays, meta, path / "arrays", regenerate=regenerate)
    try:
      return cls(fmt=meta["kv_format"], scales=arrays["scales"],
                 clip_fraction=arrays["clip_fraction"], model=meta["model"],
                 method=meta["method"], method_options=meta.get("method_options", {}),
                 workloads=tuple(meta["workloads"]), kvtpu_version=meta["kvtpu_version"],
                 created=meta["created"], summary=meta.get("summary", {}))
    except KeyError as e:
      raise ValueError(f"{marker}: artifact metadata lacks field {e}") from None


def _recalibrate(meta: Mapping[str, Any]) -> str:
  """How to regenerate an artifact: the calibrate command, with the flags its marker records
  (placeholders where it records none)."""

  def field(*keys, default):
    x = meta
    for k in keys:
      x = x.get(k) if isinstance(x, Mapping) else None
    return default if x is None else x

  listed = meta.get("workloads")
  workloads = [w for w in listed if isinstance(w, Mapping)] if isinstance(listed, list) else []
  names = ",".join(str(w.get("name")) for w in workloads)
  used = [w.get("tokens_used") for w in workloads]
  flags = [f"--model={field('model', 'name', default='MODEL')}",
           f"--workloads={names or 'WORKLOADS'}",
           f"--kv_format={field('kv_format', default='FORMAT')}",
           f"--method={field('method', default='METHOD')}"]
  percentile = field("method_options", "percentile", default=None)
  if percentile is not None:
    flags.append(f"--percentile={percentile}")
  if used and all(isinstance(n, int) for n in used):
    flags.append(f"--num_tokens={max(used)}")
  return ("regenerate it with `python -m kvtpu.experiments.calibrate " + " ".join(flags)
          + " --workdir=DIR` (the artifact is DIR/artifact)")


def _names(scales) -> list[str]:
  return sorted(f"{w}_{f}" for w, d in scales.items() for f in d)


def _jsonable(x: Any) -> Any:
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (np.ndarray, np.generic)):
    return np.asarray(x).tolist()
  if isinstance(x, Sequence) and not isinstance(x, str):
    return [_jsonable(v) for v in x]
  return x
