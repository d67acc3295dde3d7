"""Weight loaders: GGUF files, Hugging Face safetensors folders, orbax checkpoints.

Every loader returns a `Weights`: float32 numpy arrays under Hugging Face tensor names
(`model.layers.3.self_attn.q_proj.weight`, `[out, in]` as PyTorch stores them), the
`ModelConfig` the file describes, and a weight-precision string for reports ("GGUF
Q4_1 x210, Q8_0 x1, F32 x61"). `build_model` turns one into a `Llama` in a chosen
parameter dtype, so every format reaches the model through one mapping.

GGUF (llama.cpp). Tensors are parsed and block-dequantized (F32, F16, BF16, Q8_0,
Q4_0, Q4_1) by llama.cpp's own `gguf` package. For `llama` files, llama.cpp's
converter permutes the rows of `attn_q` and `attn_k` per head so that its
interleaved rotary layout (channel pairs `(2i, 2i+1)`) sees what Hugging Face's
rotate-half layout (pairs `(i, i + H/2)`) saw; `_unpermute_rope_rows` undoes that, so
the model runs the rotate-half RoPE of `kvtpu.models.llama`. `tests/models/test_pretrained.py`
verifies it by logits: an independent numpy forward with interleaved RoPE on the
file's rows as stored gives the same logits. `qwen2` files are not permuted (llama.cpp
runs NeoX rotary for them).

orbax. `save_checkpoint(model, path)` stores the converted parameters (in their
dtype) and the config; `load_checkpoint(path)` restores them without touching the
original file, which is the fast path `load_pretrained` takes the second time.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from kvtpu.models.config import ModelConfig, RopeScaling
from kvtpu.models.llama import Llama, rope_frequencies

from kvtpu.checkpointing import quiet_orbax

__all__ = ["Weights", "LoadError", "load_gguf", "load_safetensors", "hf_config", "build_model",
           "save_checkpoint", "load_checkpoint", "CHECKPOINT_MARKER"]

CHECKPOINT_MARKER = "kvtpu_model.json"


class LoadError(ValueError):
  """A weight file is not what it claims (architecture, tensors, shapes, truncation)."""


@dataclasses.dataclass
class Weights:
  """Float32 tensors under Hugging Face names, the config they fit, their provenance.

  Attributes:
    tensors: `name -> float32 array`, linear weights `[out, in]`.
    config: the model's shapes.
    weight_precision: how the weights are stored in the source, e.g. "GGUF Q4_1 x210,
      Q8_0 x1, F32 x61" or "safetensors BF16".
    source: the file or folder they came from.
  """

  tensors: dict[str, np.ndarray]
  config: ModelConfig
  weight_precision: str
  source: str


# --------------------------------------------------------------------------- names


def hf_names(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor a Hugging Face Llama/Mistral/Qwen2 checkpoint of `cfg` holds, with shape."""
  d, h, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
  q, kv = cfg.num_heads * h, cfg.num_kv_heads * h
  names = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
  if not cfg.tie_embeddings:
    names["lm_head.weight"] = (cfg.vocab_size, d)
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    names |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
              p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
              p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
              p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
              p + "mlp.down_proj.weight": (d, f)}
    if cfg.qkv_bias:
      names |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.bias": (kv,)}
  return names


def _check_tensors(tensors: Mapping[str, np.ndarray], cfg: ModelConfig, source: str) -> None:
  expected = hf_names(cfg)
  for name, shape in expected.items():
    if name not in tensors:
      raise LoadError(f"{source}: missing tensor {name!r} (expected shape {shape}) for a "
                      f"{cfg.num_layers}-layer {cfg.name}")
    if tuple(tensors[name].shape) != shape:
      raise LoadError(f"{source}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                      f"expected {shape} from the config")


# --------------------------------------------------------------------------- GGUF

# GGUF block types this loader dequantizes (each checked against a hand-written
# numpy decoder in the tests).
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
GGUF_ARCHS = ("llama", "qwen2")


def _gguf_to_hf(cfg: ModelConfig) -> dict[str, str]:
  """GGUF tensor name -> Hugging Face name."""
  out = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
  if not cfg.tie_embeddings:
    out["output.weight"] = "lm_head.weight"
  per_layer = {"attn_norm.weight": "input_layernorm.weight",
               "ffn_norm.weight": "post_attention_layernorm.weight",
               "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
               "attn_v.weight": "self_attn.v_proj.weight",
               "attn_output.weight": "self_attn.o_proj.weight",
               "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
               "ffn_down.weight": "mlp.down_proj.weight"}
  if cfg.qkv_bias:
    per_layer |= {"attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
                  "attn_v.bias": "self_attn.v_proj.bias"}
  for i in range(cfg.num_layers):
    out |= {f"blk.{i}.{g}": f"model.layers.{i}.{h}" for g, h in per_layer.items()}
  return out


def _unpermute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
  """Inverse of llama.cpp's `permute`: per head, rows `[H/2, 2]` back to `[2, H/2]`.

  llama.cpp stores row `2i + j` of a head from Hugging Face row `j * H/2 + i`; works
  for weights `[heads * H, in]` and biases `[heads * H]`.
  """
  rows = w.shape[0]
  return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's converter permutation (Hugging Face rows -> GGUF rows), for tests and writers."""
  rows = w.shape[0]
  return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_reader(path: str | os.PathLike):
  """A `gguf.GGUFReader` for `path`, with parse failures and truncation as `LoadError`."""
  import gguf  # Deferred: only GGUF loading needs it.

  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no GGUF file at path={str(path)!r}")
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # The reader raises ValueError/IndexError/KeyError on bad bytes.
    raise LoadError(f"{path}: not a readable GGUF file (corrupt or truncated: "
                    f"{type(e).__name__}: {e})") from e
  size = path.stat().st_size
  for t in reader.tensors:
    if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
      raise LoadError(f"{path}: tensor {t.name!r} needs bytes {t.data_offset}.."
                      f"{t.data_offset + t.n_bytes} but the file has {size}: truncated file")
  return reader


def _field(reader, name: str, default: Any = ...) -> Any:
  f = reader.fields.get(name)
  if f is None:
    if default is ...:
      raise LoadError(f"GGUF metadata field {name!r} is missing")
    return default
  return f.contents()


def _f32(x) -> float:
  """A GGUF float32 field as the shortest decimal that round-trips (1e-05, not 9.99e-06)."""
  return float(np.format_float_scientific(np.float32(x), unique=True))


def gguf_config(reader, *, name: str) -> ModelConfig:
  """The `ModelConfig` that a GGUF file's metadata describes."""
  arch = _field(reader, "general.architecture")
  if arch not in GGUF_ARCHS:
    raise LoadError(f"GGUF general.architecture={arch!r} is not supported; expected one of "
                    f"{GGUF_ARCHS} (Llama-family decoders)")
  get = lambda key, default=...: _field(reader, f"{arch}.{key}", default)  # noqa: E731
  hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
  kv_heads = int(get("attention.head_count_kv", heads))
  head_dim = int(get("attention.key_length", hidden // heads))
  if int(get("rope.dimension_count", head_dim)) != head_dim:
    raise LoadError(f"GGUF {arch}.rope.dimension_count={get('rope.dimension_count')} differs from "
                    f"head_dim={head_dim}: partial rotary embeddings are not supported")
  scaling_type = get("rope.scaling.type", "none")
  if scaling_type not in ("none", "", None):
    raise LoadError(f"GGUF {arch}.rope.scaling.type={scaling_type!r} is not supported (only "
                    "Llama-3 scaling, which GGUF stores as the rope_freqs.weight tensor)")
  tensor_names = {t.name for t in reader.tensors}
  vocab = get("vocab_size", None)
  if vocab is None:
    tokens = _field(reader, "tokenizer.ggml.tokens", None)
    if tokens is None:
      raise LoadError(f"GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
    vocab = len(tokens)
  return ModelConfig(
      name=name, vocab_size=int(vocab), hidden_size=hidden,
      intermediate_size=int(get("feed_forward_length")), num_layers=int(get("block_count")),
      num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
      rope_theta=_f32(get("rope.freq_base", 10000.0)),
      rope_scaling=RopeScaling() if "rope_freqs.weight" in tensor_names else None,
      rms_norm_eps=_f32(get("attention.layer_norm_rms_epsilon")),
      tie_embeddings="output.weight" not in tensor_names,
      qkv_bias="blk.0.attn_q.bias" in tensor_names,
      max_position=int(get("context_length", 4096)))


def _dequantize(t) -> np.ndarray:
  import gguf

  kind = t.tensor_type.name
  if kind not in GGUF_TYPES:
    raise LoadError(f"GGUF tensor {t.name!r} has type {kind}; this loader reads {GGUF_TYPES}")
  # GGUF shapes list the innermost dimension first: `[in, out]` is numpy `[out, in]`.
  shape = tuple(int(s) for s in reversed(t.shape.tolist()))
  if kind == "F32":
    out = np.asarray(t.data, np.float32)
  else:
    out = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
  return out.reshape(shape)


def load_gguf(path: str | os.PathLike, *, name: str | None = None) -> Weights:
  """Reads and dequantizes a llama.cpp GGUF file of a Llama-family model.

  Args:
    path: the `.gguf` file.
    name: model id for reports (default: the file name without extension).

  Returns:
    `Weights` in Hugging Face layout (Q/K rows un-permuted for `llama` files).

  Raises:
    LoadError: wrong architecture, a missing or mis-shaped tensor, an unsupported
      tensor type, or a truncated/corrupt file (the message names the field or tensor).
  """
  path = Path(path)
  reader = gguf_reader(path)
  cfg = gguf_config(reader, name=name or path.stem)
  arch = _field(reader, "general.architecture")
  by_name = {t.name: t for t in reader.tensors}
  mapping = _gguf_to_hf(cfg)
  tensors: dict[str, np.ndarray] = {}
  types: collections.Counter[str] = collections.Counter()
  for gname, hname in mapping.items():
    if gname not in by_name:
      raise LoadError(f"{path}: missing GGUF tensor {gname!r} (Hugging Face {hname!r}) for a "
                      f"{cfg.num_layers}-layer {arch} model")
    t = by_name[gname]
    types[t.tensor_type.name] += 1
    w = _dequantize(t)
    if arch == "llama" and gname.endswith(("attn_q.weight", "attn_q.bias")):
      w = _unpermute_rope_rows(w, cfg.num_heads)
    elif arch == "llama" and gname.endswith(("attn_k.weight", "attn_k.bias")):
      w = _unpermute_rope_rows(w, cfg.num_kv_heads)
    tensors[hname] = w
  if cfg.rope_scaling is not None:
    _check_rope_freqs(by_name["rope_freqs.weight"], cfg, path)
    types[by_name["rope_freqs.weight"].tensor_type.name] += 1
  _check_tensors(tensors, cfg, str(path))
  precision = "GGUF " + ", ".join(f"{k} x{v}" for k, v in types.most_common())
  return Weights(tensors, cfg, precision, str(path))


def _check_rope_freqs(t, cfg: ModelConfig, path: Path) -> None:
  """GGUF stores Llama-3 scaling as per-frequency divisors; they must be the defaults'."""
  factors = _dequantize(t).reshape(-1)
  plain = np.asarray(rope_frequencies(cfg.head_dim, cfg.rope_theta, None))
  scaled = np.asarray(rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
  if factors.shape != plain.shape or not np.allclose(plain / factors, scaled, rtol=1e-3):
    raise LoadError(f"{path}: tensor 'rope_freqs.weight' is not Llama-3 scaling with "
                    f"{cfg.rope_scaling} (the only rotary scaling supported)")


# --------------------------------------------------------------------------- safetensors

HF_ARCHITECTURES = {"LlamaForCausalLM": False, "MistralForCausalLM": False,
                    "Qwen2ForCausalLM": True}  # -> has q/k/v biases


def hf_config(config: Mapping[str, Any], *, name: str) -> ModelConfig:
  """The `ModelConfig` of a Hugging Face `config.json` (Llama, Mistral, Qwen2)."""
  archs = config.get("architectures") or []
  arch = next((a for a in archs if a in HF_ARCHITECTURES), None)
  if arch is None:
    raise LoadError(f"config.json architectures={archs!r}: expected one of "
                    f"{sorted(HF_ARCHITECTURES)}")

  def need(key):
    if key not in config:
      raise LoadError(f"config.json field {key!r} is missing ({arch})")
    return config[key]

  rope = config.get("rope_scaling")
  scaling = None
  if rope:
    kind = rope.get("rope_type", rope.get("type"))
    if kind != "llama3":
      raise LoadError(f"config.json rope_scaling type={kind!r} is not supported (only 'llama3')")
    scaling = RopeScaling(float(rope["factor"]), float(rope["low_freq_factor"]),
                          float(rope["high_freq_factor"]),
                          int(rope["original_max_position_embeddings"]))
  heads = int(need("num_attention_heads"))
  hidden = int(need("hidden_size"))
  window = config.get("sliding_window")
  if window and config.get("use_sliding_window", arch == "MistralForCausalLM") and (
      int(window) < int(config.get("max_position_embeddings", 0))):
    raise LoadError(f"config.json sliding_window={window} < max_position_embeddings: sliding-"
                    "window attention is not implemented")
  return ModelConfig(
      name=name, vocab_size=int(need("vocab_size")), hidden_size=hidden,
      intermediate_size=int(need("intermediate_size")),
      num_layers=int(need("num_hidden_layers")), num_heads=heads,
      num_kv_heads=int(config.get("num_key_value_heads") or heads),
      head_dim=int(config.get("head_dim") or hidden // heads),
      rope_theta=float(config.get("rope_theta", 10000.0)), rope_scaling=scaling,
      rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(config.get("tie_word_embeddings", False)),
      qkv_bias=bool(config.get("attention_bias", HF_ARCHITECTURES[arch])),
      max_position=int(config.get("max_position_embeddings", 4096)))


def load_safetensors(folder: str | os.PathLike, *, name: str | None = None) -> Weights:
  """Reads a Hugging Face checkpoint folder: `config.json` plus `*.safetensors` shards.

  Sharded checkpoints are read through `model.safetensors.index.json`; a single
  `model.safetensors` otherwise. Extra tensors (e.g. `rotary_emb.inv_freq`) are ignored.

  Raises:
    LoadError: unsupported architecture, missing config field, missing or mis-shaped
      tensor, a shard the index names that is absent, or a truncated file.
  """
  from safetensors import SafetensorError, safe_open

  folder = Path(folder)
  config_path = folder / "config.json"
  if not config_path.is_file():
    raise FileNotFoundError(f"{folder}: no config.json (a Hugging Face checkpoint folder has one)")
  cfg = hf_config(json.loads(config_path.read_text()), name=name or folder.name)
  index = folder / "model.safetensors.index.json"
  if index.is_file():
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict):
      raise LoadError(f"{index}: no 'weight_map'")
    shards = sorted(set(weight_map.values()))
  else:
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
  if not shards:
    raise LoadError(f"{folder}: no *.safetensors files")
  wanted = hf_names(cfg)
  tensors: dict[str, np.ndarray] = {}
  dtypes: collections.Counter[str] = collections.Counter()
  for shard in shards:
    path = folder / shard
    if not path.is_file():
      raise LoadError(f"{folder}: shard {shard!r} named by the index is missing")
    try:
      with safe_open(path, framework="numpy") as f:
        for key in f.keys():
          if key in wanted:
            sl = f.get_slice(key)
            dtypes[sl.get_dtype()] += 1
            tensors[key] = _safetensor_f32(f, key)
    except SafetensorError as e:
      raise LoadError(f"{path}: not a readable safetensors file (corrupt or truncated: {e})") from e
  _check_tensors(tensors, cfg, str(folder))
  precision = "safetensors " + ", ".join(f"{k} x{v}" for k, v in dtypes.most_common())
  return Weights(tensors, cfg, precision, str(folder))


def _safetensor_f32(f, key: str) -> np.ndarray:
  # safetensors hands BF16 to numpy as ml_dtypes.bfloat16; float32 holds it exactly.
  return np.asarray(f.get_tensor(key), np.float32)


# --------------------------------------------------------------------------- Llama


def build_model(weights: Weights, *, param_dtype=jnp.float32, dtype=None,
                weight_precision: str | None = None) -> Llama:
  """A `Llama` holding `weights`, cast to `param_dtype` (no random initialization).

  Args:
    weights: from a loader.
    param_dtype: storage dtype of the parameters (float32 or bfloat16).
    dtype: computation dtype (default `param_dtype`).
    weight_precision: report string (default: the source's, plus the dtype).
  """
  cfg = weights.config
  _check_tensors(weights.tensors, cfg, weights.source)
  param_dtype = jnp.dtype(param_dtype)
  precision = weight_precision or (f"{weights.weight_precision}; dequantized to {param_dtype.name}"
                                   if weights.source.endswith(".gguf") else
                                   f"{weights.weight_precision}; as {param_dtype.name}")
  model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), dtype=dtype or param_dtype,
                                       param_dtype=param_dtype, weight_precision=precision))
  t = weights.tensors
  put = lambda var, x: var.set_value(jnp.asarray(x, param_dtype))  # noqa: E731
  put(model.embed.embedding, t["model.embed_tokens.weight"])
  put(model.norm.weight, t["model.norm.weight"])
  if model.lm_head is not None:
    put(model.lm_head.kernel, t["lm_head.weight"].T)
  for i, block in enumerate(model.layers):
    p = f"model.layers.{i}."
    put(block.input_norm.weight, t[p + "input_layernorm.weight"])
    put(block.post_norm.weight, t[p + "post_attention_layernorm.weight"])
    for mod, hname in (("q_proj", "self_attn.q_proj"), ("k_proj", "self_attn.k_proj"),
                       ("v_proj", "self_attn.v_proj"), ("o_proj", "self_attn.o_proj"),
                       ("gate_proj", "mlp.gate_proj"), ("up_proj", "mlp.up_proj"),
                       ("down_proj", "mlp.down_proj")):
      linear = getattr(block, mod)
      put(linear.kernel, t[p + hname + ".weight"].T)
      if linear.bias is not None:
        put(linear.bias, t[p + hname + ".bias"])
  _check_materialized(model)
  return model


def _check_materialized(model: Llama) -> None:
  """Every parameter holds real values: none left as an `eval_shape` placeholder."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
    if isinstance(leaf, jax.ShapeDtypeStruct):
      raise LoadError(f"parameter {jax.tree_util.keystr(path)} was not loaded")


# --------------------------------------------------------------------------- orbax


def save_checkpoint(model: Llama, path: str | os.PathLike, *, tokenizer=None,
                    extra: Mapping[str, Any] = ()) -> Path:
  """Writes `model`'s parameters (orbax) and config (`kvtpu_model.json`) to `path`.

  Args:
    model: a loaded model.
    path: a new or empty directory.
    tokenizer: optional `kvtpu.models.tokenizer.Tokenizer`, saved beside the parameters
      (`tokenizer.json`, `tokenizer_config.json`) so the folder is self-contained.
    extra: more JSON-able fields for the marker file (e.g. the source file's hash).

  Returns:
    The checkpoint directory.
  """
  import orbax.checkpoint as ocp

  path = Path(path).absolute()
  if path.exists() and any(path.iterdir()):
    raise FileExistsError(f"checkpoint path={str(path)!r} exists and is not empty")
  path.mkdir(parents=True, exist_ok=True)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  with quiet_orbax(), ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path / "params", params)
  if tokenizer is not None:
    tokenizer.save_hf(path)
  cfg = dataclasses.asdict(model.cfg)
  meta = {"config": cfg, "weight_precision": model.weight_precision,
          "param_dtype": jnp.dtype(jax.tree.leaves(params)[0].dtype).name, **dict(extra)}
  # The marker is written last: a directory with it holds a complete checkpoint.
  (path / CHECKPOINT_MARKER).write_text(json.dumps(meta, indent=2))
  return path


def _config_from_json(d: Mapping[str, Any]) -> ModelConfig:
  d = dict(d)
  if d.get("rope_scaling") is not None:
    d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
  return ModelConfig(**d)


def load_checkpoint(path: str | os.PathLike) -> Llama:
  """Restores a `save_checkpoint` directory into a `Llama` (no original file needed).

  Args:
    path: the checkpoint directory. Parameters come back in the dtype they were saved in.

  Raises:
    LoadError: no marker file, or parameters that do not match the saved config.
  """
  import orbax.checkpoint as ocp

  path = Path(path).absolute()
  marker = path / CHECKPOINT_MARKER
  if not marker.is_file():
    raise LoadError(f"{path}: no {CHECKPOINT_MARKER}; not a kvtpu model checkpoint (or an "
                    "interrupted save)")
  meta = json.loads(marker.read_text())
  cfg = _config_from_json(meta["config"])
  saved = jnp.dtype(meta["param_dtype"])
  model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), dtype=saved, param_dtype=saved,
                                       weight_precision=meta["weight_precision"]))
  abstract = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  try:
    with quiet_orbax(), ocp.StandardCheckpointer() as ckpt:
      params = ckpt.restore(path / "params", abstract)
  except Exception as e:
    raise LoadError(f"{path}: parameters do not match {CHECKPOINT_MARKER} ({e})") from e
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  _check_materialized(model)
  return model
