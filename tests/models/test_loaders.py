"""Weight loaders (GGUF, safetensors, orbax) on tiny files written here, checked against
hand-written block decoders and a float64 numpy forward."""

import json

import gguf
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from kvtpu.models import loaders
from kvtpu.models.config import ModelConfig
from safetensors.numpy import save_file

from tests.helpers import assert_close
from tests.models.reference import (
    decode_gguf_blocks,
    np_llama_forward,
    random_hf_tensors,
    write_llama_gguf,
)

TINY = ModelConfig("tiny", vocab_size=61, hidden_size=64, intermediate_size=96, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                   rms_norm_eps=1e-5, tie_embeddings=False, max_position=128)
TINY_TIED_BIAS = ModelConfig("tiny-qwen", vocab_size=61, hidden_size=64, intermediate_size=96,
                             num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                             rope_theta=10000.0, rms_norm_eps=1e-6, tie_embeddings=True,
                             qkv_bias=True, max_position=128)
TOKENS = np.array([3, 17, 0, 60, 5, 5, 42, 9, 11])


def _logits(model, tokens=TOKENS):
  # An f32 cache: exact K/V, so only float32 summation order separates Flax from numpy.
  logits, _ = model(jnp.asarray(tokens)[None], model.init_cache("f32", batch=1, max_len=16),
                    impl="xla")
  return np.asarray(logits[0])


# ----------------------------------------------------------------------------- GGUF blocks


@pytest.mark.parametrize("kind", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_dequantization_matches_hand_decoders(kind, tmp_path, rng):
  x = rng.standard_normal((6, 64)).astype(np.float32)
  x[2, 5] = 40.0  # An outlier inside one block.
  qt = gguf.GGMLQuantizationType[kind]
  raw = gguf.quants.quantize(x, qt)
  w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
  w.add_tensor("t", raw, raw_dtype=qt)
  w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
  (t,) = loaders.gguf_reader(tmp_path / "t.gguf").tensors
  got = loaders._dequantize(t)
  assert got.shape == (6, 64) and got.dtype == np.float32
  assert_close(got, decode_gguf_blocks(np.asarray(raw), kind).reshape(6, 64), atol=0, name=kind)
  # And the format's own error bound against the original values.
  blocks = np.abs(x).reshape(-1, 32).max(axis=1, keepdims=True)
  bound = {"F16": 1e-3 * np.abs(x).reshape(-1, 32), "BF16": 4e-3 * np.abs(x).reshape(-1, 32),
           "Q8_0": blocks / 127 * 0.51 + 1e-6, "Q4_0": blocks / 8 * 1.01,
           "Q4_1": (2 * blocks) / 15 * 0.51 + 1e-3}[kind]
  assert (np.abs(got - x).reshape(-1, 32) <= bound).all()


def test_rope_row_permutation_is_llama_cpps_and_inverts():
  # Head of H=8: llama.cpp row 2i+j holds HF row j*4+i.
  w = np.arange(16).reshape(16, 1)  # two heads
  p = loaders.permute_rope_rows(w, 2)
  assert p[:8, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
  assert p[8:, 0].tolist() == [8, 12, 9, 13, 10, 14, 11, 15]
  np.testing.assert_array_equal(loaders._unpermute_rope_rows(p, 2), w)


# ----------------------------------------------------------------------------- GGUF models


@pytest.mark.parametrize("cfg", [TINY, TINY_TIED_BIAS], ids=lambda c: c.name)
def test_gguf_f32_round_trip_and_logits_match_numpy(cfg, tmp_path, rng):
  tensors = random_hf_tensors(cfg, rng)
  arch = "qwen2" if cfg.qkv_bias else "llama"
  path = write_llama_gguf(tmp_path / "m.gguf", cfg, tensors, arch=arch)
  weights = loaders.load_gguf(path, name=cfg.name)
  assert weights.config == cfg
  assert weights.weight_precision == f"GGUF F32 x{len(tensors)}"
  for name, x in tensors.items():
    np.testing.assert_array_equal(weights.tensors[name], x, err_msg=name)
  model = loaders.build_model(weights)
  assert model.weight_precision == f"GGUF F32 x{len(tensors)}; dequantized to float32"
  assert_close(_logits(model), np_llama_forward(tensors, cfg, TOKENS), atol=2e-4, rtol=2e-4,
               name="flax vs numpy")


def test_interleaved_rope_on_gguf_rows_equals_half_rope_on_hf_rows(tmp_path, rng):
  """The numpy reference's two RoPE layouts agree exactly when rows are permuted."""
  tensors = random_hf_tensors(TINY, rng)
  perm = dict(tensors)
  for i in range(TINY.num_layers):
    q, k = f"model.layers.{i}.self_attn.q_proj.weight", f"model.layers.{i}.self_attn.k_proj.weight"
    perm[q] = loaders.permute_rope_rows(tensors[q], TINY.num_heads)
    perm[k] = loaders.permute_rope_rows(tensors[k], TINY.num_kv_heads)
  a = np_llama_forward(tensors, TINY, TOKENS, "half")
  assert_close(np_llama_forward(perm, TINY, TOKENS, "interleaved"), a, atol=1e-9, name="layouts")
  # Without the permutation the interleaved layout computes a different model.
  assert np.abs(np_llama_forward(tensors, TINY, TOKENS, "interleaved") - a).max() > 1e-3


# Relative logit error of the quantized file vs the float32 weights: random Gaussian
# weights are the hardest case for 4 bits (measured 0.39 Q4_1, 0.43 Q4_0, Q8_0 < 0.02).
@pytest.mark.parametrize("qtype,tol", [("Q8_0", 0.02), ("Q4_1", 0.5), ("Q4_0", 0.55)])
def test_gguf_quantized_model_logits(qtype, tol, tmp_path, rng):
  tensors = random_hf_tensors(TINY, rng)
  weights = loaders.load_gguf(write_llama_gguf(tmp_path / "m.gguf", TINY, tensors, qtype=qtype))
  assert weights.weight_precision == f"GGUF {qtype} x{7 * 2 + 2}, F32 x{2 * 2 + 1}"
  got = _logits(loaders.build_model(weights))
  # Exact against numpy on the dequantized weights; close to the unquantized model.
  assert_close(got, np_llama_forward(weights.tensors, TINY, TOKENS), atol=2e-4, rtol=2e-4,
               name="flax vs numpy (dequantized)")
  ref = np_llama_forward(tensors, TINY, TOKENS)
  rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
  assert 0 < rel < tol, rel


def test_gguf_wrong_architecture_missing_tensor_truncation_are_clear(tmp_path, rng):
  tensors = random_hf_tensors(TINY, rng)
  bad = write_llama_gguf(tmp_path / "g.gguf", TINY, tensors, arch="gemma2")
  with pytest.raises(loaders.LoadError, match="general.architecture='gemma2' is not supported"):
    loaders.load_gguf(bad)
  missing = write_llama_gguf(tmp_path / "m.gguf", TINY, tensors, skip=("blk.1.ffn_up.weight",))
  with pytest.raises(loaders.LoadError, match=r"missing GGUF tensor 'blk.1.ffn_up.weight' "
                     r"\(Hugging Face 'model.layers.1.mlp.up_proj.weight'\)"):
    loaders.load_gguf(missing)
  good = write_llama_gguf(tmp_path / "ok.gguf", TINY, tensors).read_bytes()
  for cut in (10, 200, len(good) // 2, len(good) - 3):
    (tmp_path / "t.gguf").write_bytes(good[:cut])
    with pytest.raises(loaders.LoadError, match="truncated"):
      loaders.load_gguf(tmp_path / "t.gguf")
  with pytest.raises(FileNotFoundError, match="no GGUF file"):
    loaders.load_gguf(tmp_path / "absent.gguf")


def test_gguf_unsupported_type_and_shape_mismatch(tmp_path, rng):
  tensors = random_hf_tensors(TINY, rng)
  path = write_llama_gguf(tmp_path / "q5.gguf", TINY, tensors, qtype="Q5_0")
  with pytest.raises(loaders.LoadError, match="'token_embd.weight' has type Q5_0"):
    loaders.load_gguf(path)
  tensors["model.layers.0.mlp.down_proj.weight"] = tensors[
      "model.layers.0.mlp.down_proj.weight"][:, :64]
  path = write_llama_gguf(tmp_path / "s.gguf", TINY, tensors)
  with pytest.raises(loaders.LoadError, match=r"'model.layers.0.mlp.down_proj.weight' has shape "
                     r"\(64, 64\), expected \(64, 96\)"):
    loaders.load_gguf(path)


# ----------------------------------------------------------------------------- safetensors


def _hf_config(cfg: ModelConfig, arch: str) -> dict:
  return {"architectures": [arch], "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
          "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
          "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
          "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps,
          "tie_word_embeddings": cfg.tie_embeddings, "max_position_embeddings": cfg.max_position}


def _write_hf(folder, cfg, tensors, arch, *, shards=1, dtype=np.float32):
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps(_hf_config(cfg, arch)))
  names = sorted(tensors)
  weight_map = {}
  for s in range(shards):
    part = {n: tensors[n].astype(dtype) for n in names[s::shards]}
    fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
    save_file(part | ({"model.rotary_emb.inv_freq": np.ones(8, np.float32)} if s == 0 else {}),
              str(folder / fname))
    weight_map |= dict.fromkeys(part, fname)
  if shards > 1:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  return folder


@pytest.mark.parametrize("arch,cfg,shards,dtype", [
    ("LlamaForCausalLM", TINY, 1, np.float32),
    ("MistralForCausalLM", TINY, 3, ml_dtypes.bfloat16),
    ("Qwen2ForCausalLM", TINY_TIED_BIAS, 2, np.float32)])
def test_safetensors_folders_load_and_match_numpy(arch, cfg, shards, dtype, tmp_path, rng):
  tensors = random_hf_tensors(cfg, rng)
  folder = _write_hf(tmp_path / "hf", cfg, tensors, arch, shards=shards, dtype=dtype)
  weights = loaders.load_safetensors(folder, name=cfg.name)
  assert weights.config == cfg
  stored = {n: np.asarray(x.astype(dtype), np.float32) for n, x in tensors.items()}
  for name, x in stored.items():
    np.testing.assert_array_equal(weights.tensors[name], x, err_msg=name)
  dt = "BF16" if dtype is ml_dtypes.bfloat16 else "F32"
  assert weights.weight_precision == f"safetensors {dt} x{len(tensors)}"
  model = loaders.build_model(weights)
  assert_close(_logits(model), np_llama_forward(stored, cfg, TOKENS), atol=2e-4, rtol=2e-4,
               name=arch)


def test_safetensors_errors_name_the_problem(tmp_path, rng):
  tensors = random_hf_tensors(TINY, rng)
  folder = _write_hf(tmp_path / "hf", TINY, tensors, "GPT2LMHeadModel")
  with pytest.raises(loaders.LoadError, match="architectures=.*GPT2LMHeadModel.*expected one of"):
    loaders.load_safetensors(folder)
  del tensors["model.layers.1.self_attn.v_proj.weight"]
  folder = _write_hf(tmp_path / "m", TINY, tensors, "LlamaForCausalLM", shards=2)
  with pytest.raises(loaders.LoadError, match="missing tensor 'model.layers.1.self_attn.v_proj"):
    loaders.load_safetensors(folder)
  shard = sorted(folder.glob("*.safetensors"))[0]
  shard.write_bytes(shard.read_bytes()[:-100])
  with pytest.raises(loaders.LoadError, match="corrupt or truncated"):
    loaders.load_safetensors(folder)
  shard.unlink()
  with pytest.raises(loaders.LoadError, match="shard .* named by the index is missing"):
    loaders.load_safetensors(folder)
  cfg = _hf_config(TINY, "MistralForCausalLM") | {"sliding_window": 32}
  (folder / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(loaders.LoadError, match="sliding_window=32"):
    loaders.load_safetensors(folder)
  cfg = _hf_config(TINY, "LlamaForCausalLM") | {"rope_scaling": {"rope_type": "yarn"}}
  (folder / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(loaders.LoadError, match="rope_scaling type='yarn'"):
    loaders.load_safetensors(folder)


# ----------------------------------------------------------------------------- orbax


@pytest.mark.parametrize("dtype", [jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)])
def test_orbax_checkpoint_round_trip(dtype, tmp_path, rng):
  cfg = TINY_TIED_BIAS
  weights = loaders.load_gguf(write_llama_gguf(tmp_path / "m.gguf", cfg, random_hf_tensors(
      cfg, rng), arch="qwen2", qtype="Q8_0"))
  model = loaders.build_model(weights, param_dtype=dtype)
  loaders.save_checkpoint(model, tmp_path / "ckpt", extra={"note": "test"})
  restored = loaders.load_checkpoint(tmp_path / "ckpt")
  assert restored.cfg == model.cfg and restored.weight_precision == model.weight_precision
  assert restored.embed.embedding.get_value().dtype == jnp.dtype(dtype)
  np.testing.assert_array_equal(_logits(restored), _logits(model))
  with pytest.raises(FileExistsError, match="exists and is not empty"):
    loaders.save_checkpoint(model, tmp_path / "ckpt")
  (tmp_path / "ckpt" / loaders.CHECKPOINT_MARKER).unlink()
  with pytest.raises(loaders.LoadError, match="no kvtpu_model.json"):
    loaders.load_checkpoint(tmp_path / "ckpt")
