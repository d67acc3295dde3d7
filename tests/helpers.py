"""Shared test helpers: comparisons that explain failures, data with outliers, tolerances."""

from __future__ import annotations

import jax
import numpy as np


def assert_close(actual, expected, *, atol: float, rtol: float = 0.0, name: str = "value") -> None:
  """Asserts |actual - expected| <= atol + rtol * |expected| elementwise.

  On failure the message gives the max abs and rel error, the number of mismatches
  and the first bad index with both values.
  """
  a = np.asarray(actual, dtype=np.float64)
  e = np.asarray(expected, dtype=np.float64)
  if a.shape != e.shape:
    raise AssertionError(f"{name}: shape {a.shape} != expected {e.shape}")
  if a.size == 0:
    return
  err = np.abs(a - e)
  bad = ~(err <= atol + rtol * np.abs(e))  # NaN anywhere counts as bad.
  if bad.any():
    idx = tuple(int(i) for i in np.argwhere(bad)[0])
    rel = err / np.maximum(np.abs(e), 1e-30)
    raise AssertionError(
        f"{name}: {int(bad.sum())} of {a.size} elements differ (atol={atol}, rtol={rtol}); "
        f"max abs err {np.nanmax(err):.3e}, max rel err {np.nanmax(rel):.3e}; first bad index "
        f"{idx}: actual {a[idx]!r}, expected {e[idx]!r}")


def kv_with_outliers(rng: np.random.Generator, shape, *, channel_scale: float = 50.0,
                     token_scale: float = 20.0, num_channels: int = 2,
                     num_tokens: int = 2) -> np.ndarray:
  """Normal data `[B, T, K, H]` with a few channels and tokens at 20-100x the typical size.

  Outlier channels (fixed per kv head, as in real keys) are multiplied by
  `channel_scale`; outlier tokens by `token_scale`.
  """
  x = rng.standard_normal(shape).astype(np.float32)
  _, t, _, h = shape
  chans = rng.choice(h, size=min(num_channels, h), replace=False)
  x[..., chans] *= channel_scale
  if t:
    toks = rng.choice(t, size=min(num_tokens, t), replace=False)
    x[:, toks] *= token_scale
  return x


def run_binary(module: str, *args: str, workdir, timeout: float = 600, env=None):
  """Runs `python -m <module> --workdir=<workdir> <args>` on CPU in a subprocess (absl
  flags are process-global, so experiment binaries cannot share the pytest process)."""
  import os  # noqa: PLC0415
  import pathlib  # noqa: PLC0415
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415

  root = pathlib.Path(__file__).resolve().parents[1]
  return subprocess.run(
      [sys.executable, "-m", module, f"--workdir={workdir}", *args], cwd=root,
      env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}, capture_output=True, text=True,
      timeout=timeout)


def flat_arrays(tree) -> dict:
  """`{"k.values": leaf, "k.scale": leaf, "lengths": leaf, ...}`: a pytree's leaves by path."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path, simple=True, separator="."): leaf for path, leaf in leaves}
