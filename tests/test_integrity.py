"""No silent load from corrupt files: random single-bit flips and truncations, written into
a saved calibration artifact and a saved model checkpoint (its orbax array files and its
JSON marker), either fail with an error that names the folder or load bit-identical data.

Seeded; each folder is saved once per module and every mutation works on a copy.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from kvtpu.models import loaders
from kvtpu.models.llama import Llama
from kvtpu.models.tokenizer import Tokenizer

from kvtpu.calibration.artifact import ARTIFACT_MARKER, CalibrationArtifact
from tests.helpers import TINY, flat_arrays

MUTATIONS = 24  # Per folder: half in the marker, half in the array data; a few truncations.
L, K, H = 2, 2, 8
# A five-token byte-level BPE, so the checkpoint carries tokenizer files too.
VOCAB = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
         "tokenizer.ggml.tokens": ["<|endoftext|>", "<|im_end|>", "a", "b", "ab"],
         "tokenizer.ggml.token_type": [3, 3, 1, 1, 1], "tokenizer.ggml.merges": ["a b"],
         "tokenizer.ggml.eos_token_id": 1}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """The two folders, saved once, and the loaders that read them back as comparable data."""
  root = tmp_path_factory.mktemp("integrity")
  rng = np.random.default_rng(0)
  art = CalibrationArtifact(
      fmt="k=int8-channel,v=int4-asym-head",
      scales={"k": {"scale": rng.uniform(0.01, 0.1, (L, K, H)).astype(np.float32)},
              "v": {"scale": rng.uniform(0.1, 0.5, (L, K, 1)).astype(np.float32),
                    "zero": rng.integers(-2, 3, (L, K, 1)).astype(np.float32)}},
      clip_fraction={"k": rng.uniform(0, 1e-3, L), "v": rng.uniform(0, 1e-3, L)},
      model={"name": "tiny", "weight_precision": "random", "num_layers": L, "kv_heads": K,
             "head_dim": H},
      method="percentile", method_options={"percentile": 99.9},
      workloads=({"name": "prose", "num_tokens": 4096, "tokens_used": 2048,
                  "token_sha256": "ab" * 32, "source_sha256": "cd" * 32},),
      summary={"outlier_ratio": [1.5, 2.5]})
  art.save(root / "artifact")
  model = Llama(TINY, rngs=nnx.Rngs(0))
  loaders.save_checkpoint(model, root / "model", tokenizer=Tokenizer.from_gguf(VOCAB),
                          extra={"source": "random init"})

  def read_artifact(path):
    a = CalibrationArtifact.load(path)
    return {"arrays": flat_arrays({"scales": a.scales, "clip": a.clip_fraction}),
            "meta": json.dumps([a.disclosure(), a.summary], sort_keys=True)}

  def read_model(path):
    m = loaders.load_checkpoint(path)
    tok = Tokenizer.from_hf(path)
    return {"arrays": flat_arrays(nnx.state(m, nnx.Param)),
            "meta": json.dumps([repr(m.cfg), m.weight_precision, tok.encode("abab")])}

  return {"artifact": (root / "artifact", read_artifact), "model": (root / "model", read_model)}


def _mutations(folder: Path, marker: str, rng: np.random.Generator):
  """(description, file, change) triples: bit flips and truncations, half of them in the
  marker, half in the other files (picked in proportion to their size, so mostly in the
  array data)."""
  data = sorted(p.relative_to(folder) for p in folder.rglob("*")
                if p.is_file() and p.name != marker)
  sizes = np.array([(folder / p).stat().st_size for p in data], np.float64)
  out = []
  for i in range(MUTATIONS):
    rel = Path(marker) if i % 2 == 0 else data[rng.choice(len(data), p=sizes / sizes.sum())]
    size = (folder / rel).stat().st_size
    if i % 6 == 5:
      keep = int(rng.integers(size))
      out.append((f"{rel} truncated to {keep} of {size} bytes", rel, ("truncate", keep)))
    else:
      byte, bit = int(rng.integers(size)), int(rng.integers(8))
      out.append((f"{rel} byte {byte} bit {bit} flipped", rel, ("flip", byte, bit)))
  return out


def _apply(path: Path, change) -> None:
  data = bytearray(path.read_bytes())
  if change[0] == "truncate":
    del data[change[1]:]
  else:
    data[change[1]] ^= 1 << change[2]
  path.write_bytes(bytes(data))


@pytest.mark.parametrize("which, marker", [("artifact", ARTIFACT_MARKER),
                                           ("model", loaders.CHECKPOINT_MARKER)])
def test_no_corruption_loads_silently(saved, tmp_path, which, marker):
  folder, read = saved[which]
  expected = read(folder)
  rng = np.random.default_rng(list(f"{which}".encode()))
  silent, unnamed, refused = [], [], 0
  for n, (what, rel, change) in enumerate(_mutations(folder, marker, rng)):
    copy = tmp_path / f"m{n}"
    shutil.copytree(folder, copy)
    _apply(copy / rel, change)
    try:
      got = read(copy)
    except ValueError as e:  # IntegrityError, LoadError and other named errors.
      refused += 1
      if str(copy) not in str(e):
        unnamed.append(f"{what}: {type(e).__name__}: {str(e)[:200]}")
      continue
    except Exception as e:  # noqa: BLE001 (any other type is a failure to report)
      unnamed.append(f"{what}: {type(e).__name__}: {str(e)[:200]}")
      continue
    same = got["meta"] == expected["meta"] and sorted(got["arrays"]) == sorted(
        expected["arrays"]) and all(np.array_equal(np.asarray(got["arrays"][k]), np.asarray(v))
                                    for k, v in expected["arrays"].items())
    if not same:
      silent.append(what)
  assert not silent, f"loaded different data without an error: {silent}"
  assert not unnamed, f"errors that do not name the folder, or of other types: {unnamed}"
  assert refused >= MUTATIONS // 2  # Every marker flip at least: the fuzz reached the checks.
