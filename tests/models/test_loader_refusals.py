"""What the weight loaders refuse, and the quantized checkpoints they dequantize.

A file the model cannot run as it is written (quantized codes, a malformed config,
metadata that disagrees with the tensors, a tensor in two shards, non-finite weights)
is a `LoadError` naming the field or tensor, never a model that runs wrong. Tiny
synthetic GGUF files and Hugging Face folders are written here per test.
"""

import dataclasses
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
from tests.models.reference import gguf_to_hf_names, np_llama_forward, random_hf_tensors

TINY = ModelConfig("tiny", vocab_size=61, hidden_size=64, intermediate_size=96, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                   rms_norm_eps=1e-5, tie_embeddings=False, max_position=128)
TOKENS = np.array([3, 17, 0, 60, 5, 5, 42, 9, 11])
FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _logits(model):
  logits, _ = model(jnp.asarray(TOKENS)[None], model.init_cache("f32", batch=1, max_len=16),
                    impl="xla")
  return np.asarray(logits[0])


# ----------------------------------------------------------------------------- writers


def _hf_config(cfg: ModelConfig = TINY, **overrides) -> dict:
  config = {"architectures": ["LlamaForCausalLM"], "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads, "rope_theta": cfg.rope_theta,
            "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
            "max_position_embeddings": cfg.max_position}
  return config | overrides


def _write_hf(folder, tensors, config=None, *, shards=None, index=None):
  """A Hugging Face folder: `shards` maps file name -> tensor names (default: one file);
  `index` is written as `model.safetensors.index.json`'s weight_map when given."""
  folder.mkdir()
  (folder / "config.json").write_text(
      config if isinstance(config, str) else json.dumps(config or _hf_config()))
  for fname, names in (shards or {"model.safetensors": sorted(tensors)}).items():
    save_file({n: tensors[n] for n in names}, str(folder / fname))
  if index is not None:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
  return folder


_GGUF_TYPES = {int: gguf.GGUFValueType.UINT32, float: gguf.GGUFValueType.FLOAT32,
               str: gguf.GGUFValueType.STRING}


def _write_gguf(path, tensors, cfg=TINY, *, meta=None, layers=None, extra=()):
  """A `llama` GGUF of the HF `tensors` (of `layers` layers, default the config's) with
  metadata from `cfg`; `meta` overrides fields (None drops one, `(value, GGUFValueType)`
  sets a type); `extra` adds tensors (GGUF name -> array). Q/K rows are written as given,
  without llama.cpp's permutation: these files test what loads, not the values."""
  layers = cfg.num_layers if layers is None else layers
  fields = {"llama.block_count": cfg.num_layers, "llama.context_length": cfg.max_position,
            "llama.embedding_length": cfg.hidden_size,
            "llama.feed_forward_length": cfg.intermediate_size,
            "llama.attention.head_count": cfg.num_heads,
            "llama.attention.head_count_kv": cfg.num_kv_heads,
            "llama.rope.freq_base": cfg.rope_theta,
            "llama.attention.layer_norm_rms_epsilon": cfg.rms_norm_eps,
            "llama.vocab_size": cfg.vocab_size} | (meta or {})
  w = gguf.GGUFWriter(str(path), "llama")
  for key, value in fields.items():
    if value is not None:
      value, vtype = value if isinstance(value, tuple) else (value, _GGUF_TYPES[type(value)])
      w.add_key_value(key, value, vtype)
  for gname, hname in gguf_to_hf_names(dataclasses.replace(cfg, num_layers=layers)).items():
    w.add_tensor(gname, np.ascontiguousarray(tensors[hname], np.float32))
  for gname, x in dict(extra).items():
    w.add_tensor(gname, np.ascontiguousarray(x, np.float32))
  w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
  return path


def _two_layers_more(rng):
  """TINY's tensors plus those of layers 2 and 3 (a four-layer file)."""
  return random_hf_tensors(dataclasses.replace(TINY, num_layers=4), rng)


# ----------------------------------------------------------------------------- quantized HF


@pytest.mark.parametrize("qconfig,scheme", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "gptq"),
    ({"quant_method": "awq", "bits": 4, "version": "gemm"}, "awq"),
    ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "bitsandbytes"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
        "group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int",
                                                         "strategy": "group", "group_size": 128,
                                                         "symmetric": True}}}},
     "format='pack-quantized'"),
    ({"quant_method": "fp8", "activation_scheme": "static"}, "activation_scheme='static'"),
    ({"quant_method": "fbgemm_fp8"}, "fbgemm_fp8"),
])
def test_hf_quantization_config_of_a_refused_scheme_is_a_load_error(qconfig, scheme, tmp_path,
                                                                     rng):
  # Float tensors under the config: what a scheme stores is for the config to say.
  folder = _write_hf(tmp_path / "hf", random_hf_tensors(TINY, rng),
                     _hf_config(quantization_config=qconfig))
  with pytest.raises(loaders.LoadError, match=f"quantization_config.*{scheme}.*not supported"):
    loaders.load_safetensors(folder)


@pytest.mark.parametrize("dtype,name", [(np.int8, "I8"), (np.uint8, "U8"), (np.int32, "I32"),
                                        (ml_dtypes.float8_e4m3fn, "F8_E4M3"),
                                        (ml_dtypes.float8_e5m2, "F8_E5M2")])
def test_hf_integer_or_fp8_codes_without_a_scheme_are_refused(dtype, name, tmp_path, rng):
  tensors = random_hf_tensors(TINY, rng)
  q = "model.layers.1.self_attn.q_proj.weight"
  tensors[q] = np.clip(np.round(tensors[q] * 100), -100, 100).astype(dtype)
  folder = _write_hf(tmp_path / "hf", tensors)
  with pytest.raises(loaders.LoadError, match=f"{q!r} has dtype {name}.*quantiz"):
    loaders.load_safetensors(folder)


@pytest.mark.parametrize("companion", [
    "model.layers.0.self_attn.q_proj.weight_scale", "model.layers.0.mlp.up_proj.scales",
    "model.layers.0.mlp.up_proj.qweight", "model.layers.1.mlp.down_proj.weight.absmax",
    "model.layers.0.self_attn.o_proj.SCB",
    "model.layers.0.self_attn.v_proj.weight.quant_state.bitsandbytes__nf4"])
def test_hf_quantization_companions_without_a_scheme_are_refused(companion, tmp_path, rng):
  tensors = random_hf_tensors(TINY, rng) | {companion: np.ones(4, np.float32)}
  folder = _write_hf(tmp_path / "hf", tensors)
  with pytest.raises(loaders.LoadError, match=f"{companion!r}.*quantiz.*no quantization_config"):
    loaders.load_safetensors(folder)


def _fp8_quantize(w: np.ndarray, scale: np.ndarray):
  """fp8 E4M3 codes of `w / scale` (`scale` broadcast to `w`) and the float64 values they
  stand for: codes times scale, computed here independently of the loader."""
  codes = (w / scale).astype(ml_dtypes.float8_e4m3fn)
  return codes, codes.astype(np.float64) * scale.astype(np.float64)


def _fp8_checkpoint(tensors, scheme):
  """`tensors` as an fp8 checkpoint of `scheme` ("tensor", "channel": compressed-tensors;
  "block": the `fp8` method, 32 x 32 blocks): (stored tensors, the float64 weights their
  codes and scales stand for, quantization_config)."""
  stored, meant = {}, {}
  for name, w in tensors.items():
    if not name.endswith(tuple(p + ".weight" for p in LINEARS)):
      stored[name] = meant[name] = w
      continue
    absmax = np.abs(w).max(axis=1, keepdims=True)
    if scheme == "tensor":
      scale = np.float32(absmax.max() / FP8_MAX).reshape(1)
      codes, meant[name] = _fp8_quantize(w, scale)
      stored |= {name: codes, name + "_scale": scale,
                 name[:-len("weight")] + "input_scale": np.float32(0.5).reshape(1)}
    elif scheme == "channel":
      scale = (absmax / FP8_MAX).astype(np.float32)  # [out, 1]
      codes, meant[name] = _fp8_quantize(w, scale)
      stored |= {name: codes, name + "_scale": scale}
    else:  # Scales [ceil(out/32), ceil(in/32)], each repeated over its block.
      out, cols = w.shape
      padded = np.zeros((-(-out // 32) * 32, -(-cols // 32) * 32), np.float32)
      padded[:out, :cols] = np.abs(w)
      blocks = padded.reshape(padded.shape[0] // 32, 32, -1, 32).max(axis=(1, 3)) / FP8_MAX
      scale_inv = blocks.astype(np.float32)
      full = np.repeat(np.repeat(scale_inv, 32, 0), 32, 1)[:out, :cols]
      codes, meant[name] = _fp8_quantize(w, full)
      stored |= {name: codes, name + "_scale_inv": scale_inv}
  if scheme == "block":
    qconfig = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [32, 32]}
  else:
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": scheme,
               "dynamic": False, "group_size": None}
    inputs = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor",
              "dynamic": False} if scheme == "tensor" else None
    qconfig = {"quant_method": "compressed-tensors", "format": "float-quantized",
               "quantization_status": "compressed", "ignore": ["lm_head"],
               "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                             "input_activations": inputs}}}
  return stored, meant, qconfig


# Relative logit error of the fp8 model vs the float32 weights it was quantized from:
# E4M3 rounds each weight by 2.5 % RMS (five times Q8_0), measured 0.072 per tensor, 0.075
# per channel and 0.098 block-wise on these random weights.
@pytest.mark.parametrize("scheme", ["tensor", "channel", "block"])
def test_hf_fp8_checkpoints_are_dequantized_against_the_float_model(scheme, tmp_path, rng):
  tensors = random_hf_tensors(TINY, rng)
  stored, meant, qconfig = _fp8_checkpoint(tensors, scheme)
  weights = loaders.load_safetensors(
      _write_hf(tmp_path / "hf", stored, _hf_config(quantization_config=qconfig)))
  for name, x in meant.items():  # Codes times scales, to float32 rounding.
    assert_close(weights.tensors[name], x, atol=0, rtol=2**-24, name=name)
  method = "fp8" if scheme == "block" else "compressed-tensors"
  granularity = {"tensor": "per-tensor", "channel": "per-channel", "block": "32x32 block"}[scheme]
  assert weights.weight_precision == (
      f"safetensors F8_E4M3 x14, F32 x7; dequantized from quant_method={method} (fp8 E4M3, "
      f"{granularity} scales); activations unquantized")
  got = _logits(loaders.build_model(weights))
  assert_close(got, np_llama_forward(weights.tensors, TINY, TOKENS), atol=2e-4, rtol=2e-4,
               name="flax vs numpy (dequantized)")
  ref = np_llama_forward(tensors, TINY, TOKENS)
  rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
  assert 0 < rel < 0.15, rel


@pytest.mark.parametrize("scheme", ["channel", "block"])
def test_hf_fp8_checkpoint_with_missing_or_misshaped_scales_is_refused(scheme, tmp_path, rng):
  stored, _, qconfig = _fp8_checkpoint(random_hf_tensors(TINY, rng), scheme)
  name = "model.layers.1.mlp.down_proj.weight"
  scale = name + ("_scale" if scheme == "channel" else "_scale_inv")
  config = _hf_config(quantization_config=qconfig)
  no_scale = {k: v for k, v in stored.items() if k != scale}
  with pytest.raises(loaders.LoadError, match=f"{name!r} .*F8_E4M3.*{scale!r} is missing"):
    loaders.load_safetensors(_write_hf(tmp_path / "a", no_scale, config))
  bad = stored | {scale: np.ones((3, 1), np.float32)}
  with pytest.raises(loaders.LoadError, match=f"{scale!r} has shape \\(3, 1\\)"):
    loaders.load_safetensors(_write_hf(tmp_path / "b", bad, config))
  # A scale on a weight stored in float: the scheme says the weight is not quantized.
  q = "model.layers.0.mlp.up_proj.weight"
  odd = stored | {q: np.zeros((96, 64), np.float32)}
  with pytest.raises(loaders.LoadError, match=f"{q!r} has dtype F32 but"):
    loaders.load_safetensors(_write_hf(tmp_path / "c", odd, config))


# ----------------------------------------------------------------------------- malformed configs


def test_hf_config_json_that_does_not_parse_is_a_load_error(tmp_path, rng):
  folder = _write_hf(tmp_path / "hf", random_hf_tensors(TINY, rng), '{"hidden_size": 64,')
  with pytest.raises(loaders.LoadError, match=r"config.json.*not valid JSON.*line 1"):
    loaders.load_safetensors(folder)
  (folder / "config.json").write_text("[1, 2]")
  with pytest.raises(loaders.LoadError, match=r"config.json.*a JSON object.*got list"):
    loaders.load_safetensors(folder)


@pytest.mark.parametrize("overrides,field", [
    ({"hidden_size": "big"}, "hidden_size='big'"),
    ({"hidden_size": 64.5}, "hidden_size=64.5"),
    ({"num_attention_heads": None}, "num_attention_heads=None"),
    ({"num_attention_heads": 0}, "num_attention_heads=0"),
    ({"num_attention_heads": -4}, "num_attention_heads=-4"),
    ({"num_hidden_layers": 0}, "num_hidden_layers=0"),
    ({"vocab_size": True}, "vocab_size=True"),
    ({"num_key_value_heads": 0}, "num_key_value_heads=0"),
    ({"num_key_value_heads": 3}, "num_attention_heads=4.*num_key_value_heads=3"),
    ({"num_attention_heads": 3, "num_key_value_heads": 1}, "hidden_size=64.*num_attention_heads=3"),
    ({"head_dim": 0}, "head_dim=0"),
    ({"rope_theta": "x"}, "rope_theta='x'"),
    ({"rms_norm_eps": -1.0}, "rms_norm_eps=-1.0"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps=nan"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings='yes'"),
    ({"max_position_embeddings": "4k"}, "max_position_embeddings='4k'"),
    ({"architectures": "LlamaForCausalLM"}, "architectures='LlamaForCausalLM'"),
    ({"rope_scaling": "llama3"}, "rope_scaling='llama3'"),
    ({"rope_scaling": {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}},
     "'rope_scaling.factor' is missing"),
    ({"sliding_window": "wide", "use_sliding_window": True}, "sliding_window='wide'"),
])
def test_hf_config_fields_of_the_wrong_type_or_value_are_named(overrides, field):
  with pytest.raises(loaders.LoadError, match=r"config.json field " + field):
    loaders.hf_config(_hf_config(**overrides), name="tiny")


@pytest.mark.parametrize("meta,field", [
    ({"llama.attention.head_count": 0}, "llama.attention.head_count=0"),
    ({"llama.attention.head_count": "four"}, "llama.attention.head_count='four'"),
    ({"llama.attention.head_count": (-4, gguf.GGUFValueType.INT32)},
     "llama.attention.head_count=-4"),
    ({"llama.block_count": 0}, "llama.block_count=0"),
    ({"llama.embedding_length": None}, "llama.embedding_length' is missing"),
    ({"llama.attention.head_count_kv": 3},
     "llama.attention.head_count=4 .*llama.attention.head_count_kv=3"),
    ({"llama.attention.head_count": 3, "llama.attention.head_count_kv": 1},
     "llama.embedding_length=64 .*llama.attention.head_count=3"),
    ({"llama.attention.key_length": 0}, "llama.attention.key_length=0"),
    ({"llama.rope.freq_base": "big"}, "llama.rope.freq_base='big'"),
    ({"llama.attention.layer_norm_rms_epsilon": -1.0},
     "llama.attention.layer_norm_rms_epsilon=-1.0"),
    ({"llama.context_length": 0}, "llama.context_length=0"),
])
def test_gguf_metadata_of_the_wrong_type_or_value_is_named(meta, field, tmp_path, rng):
  path = _write_gguf(tmp_path / "m.gguf", random_hf_tensors(TINY, rng), meta=meta)
  with pytest.raises(loaders.LoadError, match=r"GGUF metadata field '?" + field):
    loaders.load_gguf(path)


# ----------------------------------------------------------------------------- metadata vs tensors


def test_gguf_block_count_below_the_layers_of_its_tensors_is_refused(tmp_path, rng):
  path = _write_gguf(tmp_path / "m.gguf", _two_layers_more(rng), layers=4)
  with pytest.raises(loaders.LoadError, match=r"llama.block_count=2 but .*layers 2, 3.*"
                     r"'blk.2.attn_k.weight'"):
    loaders.load_gguf(path)
  # More layers in the metadata than in the tensors stays an error.
  path = _write_gguf(tmp_path / "few.gguf", random_hf_tensors(TINY, rng), layers=1)
  with pytest.raises(loaders.LoadError, match="missing GGUF tensor 'blk.1."):
    loaders.load_gguf(path)


def test_hf_num_hidden_layers_below_the_layers_of_its_tensors_is_refused(tmp_path, rng):
  folder = _write_hf(tmp_path / "hf", _two_layers_more(rng))
  with pytest.raises(loaders.LoadError, match=r"num_hidden_layers=2 but .*layers 2, 3.*"
                     r"'model.layers.2.input_layernorm.weight'"):
    loaders.load_safetensors(folder)


@pytest.mark.parametrize("extra", ["model.layers.0.self_attn.o_proj.bias",
                                   "model.layers.1.self_attn.q_norm.weight",
                                   "model.layers.0.mlp.shared_expert.weight", "score.weight"])
def test_hf_weights_the_model_would_not_use_are_refused(extra, tmp_path, rng):
  tensors = random_hf_tensors(TINY, rng) | {extra: np.ones(64, np.float32)}
  with pytest.raises(loaders.LoadError, match=f"{extra!r} .*not used"):
    loaders.load_safetensors(_write_hf(tmp_path / "hf", tensors))


def test_rotary_caches_and_a_tied_head_equal_to_the_embedding_are_ignored(tmp_path, rng):
  tied = dataclasses.replace(TINY, tie_embeddings=True)
  tensors = random_hf_tensors(tied, rng)
  harmless = {"model.rotary_emb.inv_freq": np.ones(8, np.float32),
              "model.layers.1.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32),
              "lm_head.weight": tensors["model.embed_tokens.weight"]}
  config = _hf_config(tied)
  weights = loaders.load_safetensors(_write_hf(tmp_path / "ok", tensors | harmless, config))
  assert sorted(weights.tensors) == sorted(tensors)
  other = harmless | {"lm_head.weight": harmless["lm_head.weight"] + 1}
  with pytest.raises(loaders.LoadError, match=r"tie_word_embeddings=True but 'lm_head.weight' "
                     r"differs from 'model.embed_tokens.weight'"):
    loaders.load_safetensors(_write_hf(tmp_path / "bad", tensors | other, config))
  gguf_tensors = random_hf_tensors(TINY, rng)
  path = _write_gguf(tmp_path / "m.gguf", gguf_tensors,
                     extra={"blk.1.rot_embd": np.ones(8, np.float32)})
  assert sorted(loaders.load_gguf(path).tensors) == sorted(gguf_tensors)


def test_gguf_weights_the_model_would_not_use_are_refused(tmp_path, rng):
  tensors = random_hf_tensors(TINY, rng)
  path = _write_gguf(tmp_path / "m.gguf", tensors,
                     extra={"blk.0.attn_output.bias": np.ones(64, np.float32)})
  with pytest.raises(loaders.LoadError, match="'blk.0.attn_output.bias' .*not used"):
    loaders.load_gguf(path)
  # And `build_model` takes only the tensors it places.
  weights = loaders.load_gguf(_write_gguf(tmp_path / "ok.gguf", tensors))
  weights.tensors["model.layers.0.self_attn.o_proj.bias"] = np.ones(64, np.float32)
  with pytest.raises(loaders.LoadError, match="'model.layers.0.self_attn.o_proj.bias' .*not used"):
    loaders.build_model(weights)


def test_a_tensor_in_two_shards_or_in_a_shard_the_index_does_not_name_is_refused(tmp_path, rng):
  tensors = random_hf_tensors(TINY, rng)
  names = sorted(tensors)
  k = "model.layers.1.self_attn.k_proj.weight"
  a, b = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
  first, second = sorted(set(names[::2]) | {k}), sorted(set(names[1::2]) | {k})
  shards = {a: first, b: second}
  index = {n: (a if n in first else b) for n in names}
  with pytest.raises(loaders.LoadError, match=f"{k!r} is in two shards.*{a}.*{b}"):
    loaders.load_safetensors(_write_hf(tmp_path / "dup_index", tensors, shards=shards,
                                       index=index))
  with pytest.raises(loaders.LoadError, match=f"{k!r} is in two shards.*{a}.*{b}"):
    loaders.load_safetensors(_write_hf(tmp_path / "dup", tensors, shards=shards))
  # The index names one shard, the tensor is in the other.
  shards = {a: names[::2], b: names[1::2]}
  moved = names[1]
  index = {n: (a if n in shards[a] else b) for n in names} | {moved: a}
  with pytest.raises(loaders.LoadError, match=f"index.*{moved!r} in {a}.*found in {b}"):
    loaders.load_safetensors(_write_hf(tmp_path / "moved", tensors, shards=shards, index=index))
  # A tensor the index leaves out, and an index entry no shard holds.
  index = {n: (a if n in shards[a] else b) for n in names}
  unlisted = {n: f for n, f in index.items() if n != moved}
  with pytest.raises(loaders.LoadError, match=f"{moved!r} is in {b} but the index does not list"):
    loaders.load_safetensors(_write_hf(tmp_path / "unlisted", tensors, shards=shards,
                                       index=unlisted))
  ghost = index | {"model.layers.1.mlp.up_proj.bias": b}
  with pytest.raises(loaders.LoadError, match="index lists 'model.layers.1.mlp.up_proj.bias' but "
                     "no shard holds"):
    loaders.load_safetensors(_write_hf(tmp_path / "ghost", tensors, shards=shards, index=ghost))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused(bad, tmp_path, rng):
  tensors = random_hf_tensors(TINY, rng)
  name = "model.layers.1.mlp.gate_proj.weight"
  tensors[name] = tensors[name].copy()
  tensors[name][3, :2] = bad
  with pytest.raises(loaders.LoadError, match=f"{name!r} has 2 non-finite values"):
    loaders.load_safetensors(_write_hf(tmp_path / "hf", tensors))
  path = _write_gguf(tmp_path / "m.gguf", tensors)
  with pytest.raises(loaders.LoadError, match=r"'blk.1.ffn_gate.weight' \(Hugging Face "
                     f"{name!r}\\) has 2 non-finite values"):
    loaders.load_gguf(path)
  weights = loaders.load_gguf(_write_gguf(tmp_path / "ok.gguf", random_hf_tensors(TINY, rng)))
  weights.tensors[name] = tensors[name]
  with pytest.raises(loaders.LoadError, match=f"{name!r} has 2 non-finite values"):
    loaders.build_model(weights)


def test_gguf_query_rows_of_the_wrong_shape_are_named_before_the_rope_permutation(tmp_path, rng):
  tensors = random_hf_tensors(TINY, rng)
  q = "model.layers.0.self_attn.q_proj.weight"
  tensors[q] = tensors[q][:63]  # Not a whole number of heads: the permutation cannot reshape.
  with pytest.raises(loaders.LoadError, match=rf"{q!r} has shape \(63, 64\), expected "
                     r"\(64, 64\) from the config \(GGUF tensor 'blk.0.attn_q.weight'\)"):
    loaders.load_gguf(_write_gguf(tmp_path / "m.gguf", tensors))
