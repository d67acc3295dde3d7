"""What the calibration artifact and `kvtpu.models.loaders` share to write and read folders.

Both write a folder: an orbax checkpoint of arrays, perhaps side files, and a JSON
marker written last (its presence means a complete save). `seal` records in the marker,
under `"integrity"`, content hashes of everything the folder holds:

  arrays           `{tree path: sha256}` of every array, over its dtype name, shape and
                   little-endian bytes (`array_sha256`); the path joins the tree's keys
                   with "/" (`scales/k/scale`, `layers/3/q_proj/kernel`).
  files            `{name: sha256}` of side files (a tokenizer), over their bytes.
  metadata_sha256  of the marker's content: the canonical JSON (sorted keys, no spaces)
                   of everything else in it, the hashes above included.

Loading verifies in that order of use: `read_marker` parses the marker, `check_metadata`
verifies its hash before any field is trusted, `restore_arrays` reads the orbax data
and `check_arrays` / `check_files` verify what was read. A marker that does not parse,
orbax data that does not restore (truncated, corrupt) and any hash that differs are one
error, `IntegrityError`, naming the file or array and saying how to regenerate it;
nothing loads that is not bit-identical to what was saved. sha256 runs at about 1 GB/s
per core with the CPU's SHA extensions; arrays are hashed on a few threads.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

__all__ = ["IntegrityError", "quiet_orbax", "array_sha256", "tree_sha256", "file_sha256",
           "metadata_sha256", "seal", "read_marker", "check_metadata", "check_arrays",
           "check_files", "save_arrays", "restore_arrays"]

INTEGRITY = "integrity"
_THREADS = 4


class IntegrityError(ValueError):
  """A folder kvtpu wrote does not hold what was recorded when it was written: a content
  hash differs, or a file does not parse or restore. The message names the file or array
  and says how to regenerate it."""


class _DropOrbaxInfo(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


@contextlib.contextmanager
def quiet_orbax():
  """Orbax logs a dozen INFO lines per save or restore through absl; keep its warnings."""
  quiet = _DropOrbaxInfo()
  logger = logging.getLogger("absl")
  logger.addFilter(quiet)
  try:
    yield
  finally:
    logger.removeFilter(quiet)


# --------------------------------------------------------------------------- hashes


def array_sha256(x) -> str:
  """sha256 of an array's dtype name, shape and little-endian bytes (hex)."""
  a = np.asarray(x)
  if a.dtype.byteorder == ">":
    a = a.astype(a.dtype.newbyteorder("<"))
  h = hashlib.sha256(f"{a.dtype.name}{list(a.shape)}".encode())
  h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
  return h.hexdigest()


def _path_name(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def tree_sha256(tree) -> dict[str, str]:
  """`{tree path: array_sha256}` of every leaf of `tree` (hashed on a few threads)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  names = [_path_name(p) for p, _ in leaves]
  if len(set(names)) != len(names):
    raise ValueError(f"tree paths are not unique once joined with '/': {sorted(names)}")
  with concurrent.futures.ThreadPoolExecutor(min(_THREADS, os.cpu_count() or 1)) as pool:
    digests = list(pool.map(array_sha256, [x for _, x in leaves]))
  return dict(zip(names, digests, strict=True))


def file_sha256(path: str | os.PathLike) -> str:
  """sha256 of a file's bytes (hex), read in 1 MiB chunks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _canonical(meta: Any) -> bytes:
  return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def metadata_sha256(meta: Mapping[str, Any]) -> str:
  """sha256 of the canonical JSON of `meta` without `integrity.metadata_sha256`."""
  meta = dict(meta)
  if isinstance(meta.get(INTEGRITY), Mapping):
    meta[INTEGRITY] = {k: v for k, v in meta[INTEGRITY].items() if k != "metadata_sha256"}
  return hashlib.sha256(_canonical(meta)).hexdigest()


def seal(meta: Mapping[str, Any], arrays, *, folder: str | os.PathLike | None = None,
         files: tuple[str, ...] = ()) -> dict[str, Any]:
  """`meta` as it reads back from JSON, with its `integrity` record added.

  Args:
    meta: the marker's fields (JSON-able; tuples come back as lists).
    arrays: the pytree of arrays saved beside it.
    folder, files: side files, by name inside `folder`, to hash too.

  Returns:
    The marker content to write (e.g. with `json.dumps(..., indent=2)`).
  """
  if INTEGRITY in meta:
    raise ValueError(f"meta must not have a field {INTEGRITY!r}: seal records it")
  out = json.loads(json.dumps(dict(meta)))
  record = {"arrays": tree_sha256(arrays)}
  if files:
    record["files"] = {name: file_sha256(Path(folder) / name) for name in files}
  out[INTEGRITY] = record
  record["metadata_sha256"] = metadata_sha256(out)
  return out


# --------------------------------------------------------------------------- checks


def read_marker(marker: Path, *, regenerate: str) -> dict[str, Any]:
  """The marker's JSON object; one that does not decode or parse is an `IntegrityError`."""
  try:
    meta = json.loads(marker.read_bytes().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise IntegrityError(f"{marker} is corrupt: it does not parse as JSON ({e}); "
                         f"{regenerate}") from None
  if not isinstance(meta, dict):
    raise IntegrityError(f"{marker} is corrupt: it holds a JSON {type(meta).__name__}, not an "
                         f"object; {regenerate}")
  return meta


def check_metadata(meta: Mapping[str, Any], marker: Path, *, regenerate: str) -> None:
  """Verifies the marker's own hash (before any of its fields is used)."""
  record = meta.get(INTEGRITY)
  if not isinstance(record, Mapping) or not isinstance(record.get("metadata_sha256"), str):
    raise IntegrityError(f"{marker} records no content hashes (field {INTEGRITY!r}): it was "
                         f"written by an older kvtpu or edited; {regenerate}")
  if metadata_sha256(meta) != record["metadata_sha256"]:
    raise IntegrityError(f"{marker} was modified after it was written (its content does not "
                         f"match {INTEGRITY}.metadata_sha256); {regenerate}")
  for field in ("arrays", "files"):
    if not isinstance(record.get(field, {}), Mapping):
      raise IntegrityError(f"{marker}: {INTEGRITY}.{field} is not a mapping; {regenerate}")


def check_arrays(arrays, meta: Mapping[str, Any], where: Path, *, regenerate: str) -> None:
  """Every array read back from `where` has the sha256 recorded in `meta` at save."""
  recorded = meta[INTEGRITY]["arrays"]
  got = tree_sha256(arrays)
  if set(got) != set(recorded):
    raise IntegrityError(f"{where} holds arrays {sorted(got)}, but its marker records "
                         f"{sorted(recorded)}; {regenerate}")
  for name, digest in got.items():
    if digest != recorded[name]:
      raise IntegrityError(f"{where}: array {name!r} is corrupt (its sha256 {digest[:16]}... is "
                           f"not the {recorded[name][:16]}... recorded at save); {regenerate}")


def check_files(folder: Path, meta: Mapping[str, Any], *, regenerate: str) -> None:
  """Every side file recorded in `meta` is in `folder` with its recorded sha256."""
  for name, want in meta[INTEGRITY].get("files", {}).items():
    path = folder / name
    if not path.is_file():
      raise IntegrityError(f"{path} is missing; {regenerate}")
    if file_sha256(path) != want:
      raise IntegrityError(f"{path} is corrupt (its sha256 is not the one recorded at save); "
                           f"{regenerate}")


# --------------------------------------------------------------------------- orbax


def save_arrays(path: Path, arrays) -> None:
  """Saves a pytree of arrays as an orbax checkpoint at `path` (a new directory)."""
  import orbax.checkpoint as ocp

  with quiet_orbax(), ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, arrays)


def restore_arrays(path: Path, target, *, what: str, regenerate: str):
  """Restores the orbax checkpoint at `path` into the structure, shapes and dtypes of
  `target` (numpy arrays come back as numpy arrays).

  Raises:
    IntegrityError: the data does not restore (missing, truncated or corrupt files);
      the message names `path` and `what` it holds.
  """
  import orbax.checkpoint as ocp

  try:
    with quiet_orbax(), ocp.StandardCheckpointer() as ckpt:
      return ckpt.restore(path, target)
  except Exception as e:  # orbax and tensorstore raise many types; all mean the same here.
    detail = f"{type(e).__name__}: {e}"
    raise IntegrityError(f"{path}: the {what} do not restore ({detail[:300]}); "
                         f"{regenerate}") from e
