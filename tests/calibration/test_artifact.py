"""The calibration artifact (disclosure, storage, validation, applying it to the cache)
and drift monitoring against the cache's saturation counters."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import kvtpu
from kvtpu.calibration import CalibrationArtifact, IntegrityError
from kvtpu.calibration.artifact import ARTIFACT_MARKER
from kvtpu.calibration.drift import drift_markdown, drift_summary
from tests.helpers import kv_with_outliers

L, K, H = 3, 2, 16
MODEL = {"name": "tiny", "weight_precision": "random init (float32)", "num_layers": L,
         "kv_heads": K, "head_dim": H}
WORKLOADS = ({"name": "prose", "num_tokens": 4096, "tokens_used": 2048, "token_sha256": "ab" * 32,
              "source_sha256": "cd" * 32},)


def _artifact(fmt="k=int8-channel,v=int4-asym-head", **overrides):
  kw = dict(fmt=fmt, scales={
      "k": {"scale": np.full((L, K, H), 0.05, np.float32)},
      "v": {"scale": np.full((L, K, 1), 0.3, np.float32),
            "zero": np.full((L, K, 1), -1.0, np.float32)}},
      clip_fraction={"k": np.array([0.0, 1e-4, 0.0]), "v": np.array([0.0, 0.0, 2e-3])},
      model=MODEL, method="percentile", method_options={"percentile": 99.99},
      workloads=WORKLOADS, summary={"k_outlier_ratio": np.arange(L, dtype=np.float32)})
  kw.update(overrides)
  return CalibrationArtifact(**kw)


def test_round_trip_and_disclosure(tmp_path):
  art = _artifact()
  art.save(tmp_path / "a")
  assert (tmp_path / "a" / ARTIFACT_MARKER).is_file()
  back = CalibrationArtifact.load(tmp_path / "a")
  assert back.fmt == art.fmt and back.method == "percentile"
  assert {w: sorted(d) for w, d in back.scales.items()} == {"k": ["scale"], "v": ["scale", "zero"]}
  for which, fields in art.scales.items():
    for field, arr in fields.items():
      np.testing.assert_array_equal(back.scales[which][field], arr)
  for which in ("k", "v"):
    np.testing.assert_array_equal(back.clip_fraction[which], art.clip_fraction[which])
  d = back.disclosure()
  assert d["model"] == MODEL and d["workloads"] == list(WORKLOADS)
  assert d["kv_format"] == "k=int8-channel,v=int4-asym-head"
  assert d["kvtpu_version"] == kvtpu.__version__ and d["created"] == art.created
  assert back.summary == {"k_outlier_ratio": [0.0, 1.0, 2.0]}
  assert back.workload_names() == "prose (2048 of 4096 tok)"
  with pytest.raises(FileExistsError):
    art.save(tmp_path / "a")
  with pytest.raises(FileNotFoundError, match="no calibration artifact"):
    CalibrationArtifact.load(tmp_path / "missing")


def test_cache_uses_exactly_the_artifact_scales(rng):
  art = _artifact()
  cache = kvtpu.KVCache.init(art.fmt, num_layers=L, batch=2, kv_heads=K, max_len=8, head_dim=H,
                             calibration=art)
  np.testing.assert_array_equal(cache.k.scale, art.scales["k"]["scale"])
  np.testing.assert_array_equal(cache.v.scale, art.scales["v"]["scale"])
  np.testing.assert_array_equal(cache.v.zero, art.scales["v"]["zero"])
  x = jnp.asarray(rng.standard_normal((2, 3, K, H)), jnp.float32) * 0.5
  cache = cache.update(1, x, x).advance(3)
  expected = np.clip(np.round(np.asarray(x) / 0.05), -127, 127) * 0.05
  np.testing.assert_allclose(cache.dequantized(1, "k")[:, :, :3].transpose(0, 2, 1, 3),
                             expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("change, match", [
    (dict(num_layers=4), "num_layers=3 .*cache has num_layers=4"),
    (dict(kv_heads=1), "kv_heads=2 .*cache has kv_heads=1"),
    (dict(head_dim=32), "head_dim=16 .*cache has head_dim=32"),
    (dict(fmt="int8-channel"), "format k=int8-channel,v=int4-asym-head, but the cache's format "
     "is int8-channel"),
])
def test_mismatched_cache_is_a_clear_error(change, match):
  dims = dict(num_layers=L, kv_heads=K, head_dim=H, fmt="k=int8-channel,v=int4-asym-head")
  dims.update(change)
  fmt = dims.pop("fmt")
  with pytest.raises(ValueError, match=match):
    kvtpu.KVCache.init(fmt, batch=1, max_len=8, calibration=_artifact(), **dims)
  with pytest.raises(ValueError, match="either calibration= or explicit"):
    kvtpu.KVCache.init(_artifact().fmt, num_layers=L, batch=1, kv_heads=K, max_len=8,
                       head_dim=H, calibration=_artifact(), k_scale=np.ones((L, K, H)))
  with pytest.raises(ValueError, match="made on model 'tiny', not 'other'"):
    _artifact().check_compatible(num_layers=L, kv_heads=K, head_dim=H, model_name="other")


def test_invalid_artifacts_are_rejected():
  bad = np.full((L, K, H), 0.05, np.float32)
  bad[1, 0, 3] = 0.0
  base = _artifact()
  with pytest.raises(ValueError, match="k_scale"):
    _artifact(scales={**base.scales, "k": {"scale": bad}})
  with pytest.raises(ValueError, match=r"k_scale has shape \(3, 2, 1\); int8-channel"):
    _artifact(scales={**base.scales, "k": {"scale": np.ones((L, K, 1))}})
  with pytest.raises(ValueError, match=r"needs scales \['k_scale', 'v_scale', 'v_zero'\]"):
    _artifact(scales={"k": base.scales["k"]})
  with pytest.raises(ValueError, match="bf16 stores K and V unquantized"):
    _artifact(fmt="bf16", scales={})
  with pytest.raises(ValueError, match=r"needs scales \['k_clip', 'v_clip'\]"):
    _artifact(fmt="int8", scales={})
  with pytest.raises(ValueError, match="workloads is empty"):
    _artifact(workloads=())
  with pytest.raises(ValueError, match=r"workloads\[0\] lacks \['tokens_used', 'token_sha256'"):
    _artifact(workloads=({"name": "prose", "num_tokens": 5, "source_sha256": "x"},))
  with pytest.raises(ValueError, match=r"workloads\[0\] \(prose\) must have ints 0 < "
                     "tokens_used <= num_tokens, got tokens_used=8192, num_tokens=4096"):
    _artifact(workloads=({**WORKLOADS[0], "tokens_used": 8192},))
  with pytest.raises(ValueError, match="model is missing"):
    _artifact(model={"name": "tiny"})
  with pytest.raises(ValueError, match=r"clip_fraction\['v'\] must be 3 fractions"):
    _artifact(clip_fraction={"k": np.zeros(L), "v": np.array([0.0, 2.0, 0.0])})


def test_saved_artifact_is_verified_by_its_content_hashes(tmp_path):
  """An edited marker field, scales that are not the saved ones, truncated array data and an
  older layout are errors naming the file (and array) and the command that regenerates it."""
  art = _artifact()
  path = art.save(tmp_path / "a")
  marker = path / ARTIFACT_MARKER
  meta = json.loads(marker.read_text())
  regenerate = (r"python -m kvtpu\.experiments\.calibrate --model=tiny --workloads=prose "
                r"--kv_format=\S+ --method=percentile --percentile=99\.99 --num_tokens=2048")

  def corrupted(name, edit):
    copy = tmp_path / name
    shutil.copytree(path, copy)
    edit(copy)
    return copy

  # kv_format edited from int8 to int4 channel scales: the same shapes, so only the hash
  # stops the int8 scales from being applied to an int4 cache.
  def int4(copy):
    text = marker.read_text().replace("k=int8-channel", "k=int4-channel")
    (copy / ARTIFACT_MARKER).write_text(text)

  edited = corrupted("kv_format", int4)
  with pytest.raises(IntegrityError, match=f"{edited / ARTIFACT_MARKER} was modified after it was "
                     f"written .*{regenerate}"):
    CalibrationArtifact.load(edited)
  # The arrays of another artifact (K scales 0.06, not 0.05) under this marker.
  other = _artifact(scales={**art.scales, "k": {"scale": np.full((L, K, H), 0.06, np.float32)}})
  other.save(tmp_path / "other")
  swapped = corrupted("swapped", lambda c: (shutil.rmtree(c / "arrays"), shutil.copytree(
      tmp_path / "other" / "arrays", c / "arrays")))
  with pytest.raises(IntegrityError, match=f"{swapped / 'arrays'}: array 'scales/k/scale' is "
                     f"corrupt .*{regenerate}"):
    CalibrationArtifact.load(swapped)

  def truncate(copy):
    for f in (copy / "arrays").rglob("*"):
      if f.is_file() and "/d/" in str(f):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

  truncated = corrupted("truncated", truncate)
  with pytest.raises(IntegrityError, match=f"{truncated / 'arrays'}: the calibrated arrays do "
                     f"not restore .*{regenerate}"):
    CalibrationArtifact.load(truncated)
  garbled = corrupted("garbled", lambda c: (c / ARTIFACT_MARKER).write_bytes(
      marker.read_bytes()[:40] + b"\xff" + marker.read_bytes()[41:]))
  with pytest.raises(IntegrityError, match=f"{garbled / ARTIFACT_MARKER} is corrupt: it does not "
                     "parse as JSON .*python -m kvtpu.experiments.calibrate"):
    CalibrationArtifact.load(garbled)
  old = corrupted("old", lambda c: (c / ARTIFACT_MARKER).write_text(json.dumps(
      {**{k: v for k, v in meta.items() if k != "integrity"}, "format_version": 2})))
  with pytest.raises(ValueError, match=f"format_version=2, this kvtpu reads 3; regenerate it "
                     f"with `{regenerate}"):
    CalibrationArtifact.load(old)
  assert CalibrationArtifact.load(path).fmt == art.fmt  # The original is untouched.
  assert sorted(meta["integrity"]["arrays"]) == [
      "clip_fraction/k", "clip_fraction/v", "scales/k/scale", "scales/v/scale", "scales/v/zero"]


def test_cache_init_takes_the_folder_of_a_saved_artifact(tmp_path):
  art = _artifact()
  path = art.save(tmp_path / "a")
  dims = dict(num_layers=L, batch=1, kv_heads=K, max_len=8, head_dim=H)
  for given in (path, str(path)):
    cache = kvtpu.KVCache.init(art.fmt, **dims, calibration=given)
    np.testing.assert_array_equal(cache.k.scale, art.scales["k"]["scale"])
    np.testing.assert_array_equal(cache.v.zero, art.scales["v"]["zero"])
  with pytest.raises(FileNotFoundError, match=f"no calibration artifact at {tmp_path / 'nope'} "
                     f"\\(no {ARTIFACT_MARKER}\\)"):
    kvtpu.KVCache.init(art.fmt, **dims, calibration=tmp_path / "nope")
  with pytest.raises(TypeError, match="calibration must be a CalibrationArtifact or the path of a "
                     "saved one, got dict"):
    kvtpu.KVCache.init(art.fmt, **dims, calibration={"k": art.scales["k"]})


def test_drift_flags_layers_whose_traffic_outgrew_the_scales(rng):
  art = _artifact(fmt="int8-tensor", scales={"k": {"scale": np.full((L, 1, 1), 0.02, np.float32)},
                                             "v": {"scale": np.full((L, 1, 1), 1.0, np.float32)}},
                  clip_fraction={"k": np.array([0.01, 0.01, 0.0]), "v": np.zeros(L)})
  cache = kvtpu.KVCache.init(art.fmt, num_layers=L, batch=2, kv_heads=K, max_len=64,
                             head_dim=H, calibration=art)
  calm = jnp.asarray(rng.uniform(-1, 1, (2, 32, K, H)), jnp.float32)  # |x| <= 1 < 127 * 0.02
  wild = jnp.asarray(kv_with_outliers(rng, (2, 32, K, H)))  # N(0,1) plus 20-50x outliers
  cache = cache.update(0, calm, calm).update(1, wild, calm).update(2, calm * 0.1, wild)
  rows = drift_summary(art, cache.advance(32), factor=2.0)
  by = {(r["tensor"], r["layer"]): r for r in rows}
  assert len(rows) == 2 * L
  assert by["k", 0]["runtime_rate"] == 0 and not by["k", 0]["flagged"]
  k1 = by["k", 1]
  assert k1["flagged"] and k1["runtime_rate"] > 0.02 and k1["ratio"] > 2
  assert k1["runtime_clipped"] == int((np.abs(np.asarray(wild)) > 127.5 * 0.02).sum())
  assert by["v", 2]["flagged"] and np.isinf(by["v", 2]["ratio"])  # calibration clipped none.
  assert not by["v", 0]["flagged"]
  table = drift_markdown(rows, only_flagged=True)
  assert table.count("**yes**") == 2 and "| K | 1 |" in table
  with pytest.raises(ValueError, match="factor must be >= 1"):
    drift_summary(art, cache, factor=0.5)
