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

Hugging Face folders. `config.json` plus `*.safetensors` shards of F32, F16, BF16 or F64
tensors. Quantized checkpoints are dequantized only where that is exact arithmetic on
the stored codes, fp8 E4M3 weights times float scales:

  * `quant_method: compressed-tensors`, `format: float-quantized`, weights of 8-bit
    `float` type with `strategy: tensor` or `channel` (`*.weight_scale` of shape `[1]`
    or `[out, 1]`); activation quantization (`input_scale`) is not applied: activations
    stay in the model's dtype, which the weight-precision string says;
  * `quant_method: fp8` (transformers' fine-grained fp8) with `weight_block_size`
    `[bo, bi]` and `activation_scheme: dynamic` (`*.weight_scale_inv` of shape
    `[ceil(out / bo), ceil(in / bi)]`, multiplied as in transformers).

Every other `quantization_config` (gptq, awq, bitsandbytes, fbgemm_fp8, compressed-tensors
int or packed formats, ...) is a `LoadError` naming `quant_method` or the field: their
codes are never run as weights. Without a `quantization_config`, integer or fp8 weights and
quantization companions (`weight_scale`, `scales`, `qweight`, `qzeros`, `g_idx`, `absmax`,
`SCB`, `quant_state`, ...) are refused the same way.

What is refused everywhere, as a `LoadError` naming the field or tensor: metadata fields
of the wrong type or value (`config.json` or GGUF: a count that is not a positive integer,
heads not a multiple of kv heads, ...); a tensor the model would not use (every tensor is
loaded, except the rotary caches `rotary_emb.inv_freq` / `cos_cached` / `sin_cached` /
GGUF `rot_embd` and a tied `lm_head.weight` equal to the embedding), in particular the
layers past `num_hidden_layers` or `block_count`; a tensor in two shards, or in a shard
other than the one the index names; a NaN or inf in any weight.

orbax. `save_checkpoint(model, path)` stores the converted parameters (in their
dtype) and the config; `load_checkpoint(path)` restores them without touching the
original file, which is the fast path `load_pretrained` takes the second time.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from kvtpu.models.config import ModelConfig, RopeScaling
from kvtpu.models.llama import Llama, rope_frequencies

from kvtpu.checkpointing import (
  IntegrityError,
  check_arrays,
  check_files,
  check_metadata,
  read_marker,
  restore_arrays,
  save_arrays,
  seal,
)

__all__ = ["Weights", "LoadError", "load_gguf", "load_safetensors", "hf_config", "build_model",
           "save_checkpoint", "load_checkpoint", "CHECKPOINT_MARKER", "IntegrityError"]

CHECKPOINT_MARKER = "kvtpu_model.json"


class LoadError(ValueError):
  """A weight file is not what it claims (architecture, tensors, shapes, truncation), or
  is what the model cannot run as written (quantized codes of a scheme it does not
  dequantize, metadata that disagrees with the tensors, non-finite weights)."""


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


def _check_tensors(tensors: Mapping[str, np.ndarray], cfg: ModelConfig, source: str, *,
                   finite: bool = True) -> None:
  """`tensors` are exactly `hf_names(cfg)`, each of its shape and (if `finite`) finite."""
  expected = hf_names(cfg)
  for name, shape in expected.items():
    if name not in tensors:
      raise LoadError(f"{source}: missing tensor {name!r} (expected shape {shape}) for a "
                      f"{cfg.num_layers}-layer {cfg.name}")
    if tuple(tensors[name].shape) != shape:
      raise LoadError(f"{source}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                      f"expected {shape} from the config")
    if finite:
      _check_finite(tensors[name], repr(name), source)
  extra = sorted(set(tensors) - set(expected), key=_natural)
  if extra:
    raise LoadError(f"{source}: tensors {_listed(extra)} are not used by a "
                    f"{cfg.num_layers}-layer {cfg.name}")


def _check_finite(x: np.ndarray, what: str, source: str) -> None:
  bad = x.size - int(np.count_nonzero(np.isfinite(x)))
  if bad:
    raise LoadError(f"{source}: tensor {what} has {bad} non-finite values (NaN or inf) of "
                    f"{x.size}: a corrupt or overflowed file")


def _natural(name: str) -> list:
  """Sort key that orders `blk.2.` before `blk.10.`."""
  return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]


def _listed(names: list[str], limit: int = 6) -> str:
  shown = ", ".join(repr(n) for n in names[:limit])
  return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def _refuse_unused(unused: set[str], *, source: str, layer: re.Pattern, layers_field: str,
                   num_layers: int, model: str) -> None:
  """Every tensor of a file is used: an unused one is a weight the model would silently drop.

  Tensors of layers at or past the config's layer count mean that the metadata and the
  tensors disagree (the message names the field); any other unused tensor is a weight the
  model has no slot for (a bias, a norm, a head of another architecture).
  """
  if not unused:
    return
  names = sorted(unused, key=_natural)
  beyond = [n for n in names if (m := layer.match(n)) and int(m[1]) >= num_layers]
  if beyond:
    layers = sorted({int(layer.match(n)[1]) for n in beyond})
    raise LoadError(f"{source}: {layers_field}={num_layers} but the file holds tensors of "
                    f"layers {', '.join(map(str, layers))}: {_listed(beyond)}; the metadata and "
                    "the tensors disagree")
  raise LoadError(f"{source}: tensors {_listed(names)} are not used by a {model}; every tensor "
                  "of a file is loaded or refused (only rotary caches are ignored)")


# --------------------------------------------------------------------------- GGUF

# GGUF block types this loader dequantizes (each checked against a hand-written
# numpy decoder in the tests).
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
GGUF_ARCHS = ("llama", "qwen2")
_GGUF_LAYER = re.compile(r"blk\.(\d+)\.")
# Precomputed rotary tables some converters store; the model computes its own.
_GGUF_ROTARY_CACHE = re.compile(r"blk\.\d+\.rot_embd(\.|$)")


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


def _is_count(v: Any) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) and v >= 1


def _is_positive(v: Any) -> bool:
  return (isinstance(v, (int, float, np.integer, np.floating))
          and not isinstance(v, (bool, np.bool_)) and math.isfinite(v) and v > 0)


def _gguf_count(reader, name: str, default: Any = ...) -> Any:
  """A GGUF metadata integer >= 1 (or `default` when the field is absent)."""
  if default is not ... and reader.fields.get(name) is None:
    return default
  value = _field(reader, name)
  if not _is_count(value):
    raise LoadError(f"GGUF metadata field {name}={value!r}: expected an integer >= 1")
  return int(value)


def _gguf_positive(reader, name: str, default: Any = ...) -> float:
  """A GGUF metadata number > 0 and finite (or `default` when the field is absent)."""
  value = _field(reader, name, default)
  if not _is_positive(value):
    raise LoadError(f"GGUF metadata field {name}={value!r}: expected a finite number > 0")
  return _f32(value)


def gguf_config(reader, *, name: str) -> ModelConfig:
  """The `ModelConfig` that a GGUF file's metadata describes.

  Raises:
    LoadError: an unsupported architecture or rotary variant, or a field that is missing,
      of the wrong type or out of range (the message names the field and its value).
  """
  arch = _field(reader, "general.architecture")
  if arch not in GGUF_ARCHS:
    raise LoadError(f"GGUF general.architecture={arch!r} is not supported; expected one of "
                    f"{GGUF_ARCHS} (Llama-family decoders)")
  key = lambda k: f"{arch}.{k}"  # noqa: E731
  count = lambda k, default=...: _gguf_count(reader, key(k), default)  # noqa: E731
  hidden, heads = count("embedding_length"), count("attention.head_count")
  kv_heads = count("attention.head_count_kv", heads)
  if heads % kv_heads:
    raise LoadError(f"GGUF metadata field {key('attention.head_count')}={heads} is not a "
                    f"multiple of {key('attention.head_count_kv')}={kv_heads}")
  head_dim = count("attention.key_length", None)
  if head_dim is None:
    if hidden % heads:
      raise LoadError(f"GGUF metadata field {key('embedding_length')}={hidden} is not divisible "
                      f"by {key('attention.head_count')}={heads}, and "
                      f"{key('attention.key_length')} (the head size) is absent")
    head_dim = hidden // heads
  if (value_dim := count("attention.value_length", head_dim)) != head_dim:
    raise LoadError(f"GGUF metadata field {key('attention.value_length')}={value_dim} differs "
                    f"from the key head size {head_dim}: not supported")
  if (rope_dim := count("rope.dimension_count", head_dim)) != head_dim:
    raise LoadError(f"GGUF {arch}.rope.dimension_count={rope_dim} differs from "
                    f"head_dim={head_dim}: partial rotary embeddings are not supported")
  scaling_type = _field(reader, key("rope.scaling.type"), "none")
  if scaling_type not in ("none", "", None):
    raise LoadError(f"GGUF {arch}.rope.scaling.type={scaling_type!r} is not supported (only "
                    "Llama-3 scaling, which GGUF stores as the rope_freqs.weight tensor)")
  tensor_names = {t.name for t in reader.tensors}
  vocab = count("vocab_size", None)
  if vocab is None:
    tokens = _field(reader, "tokenizer.ggml.tokens", None)
    if tokens is None:
      raise LoadError(f"GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
      raise LoadError("GGUF metadata field tokenizer.ggml.tokens: expected a non-empty list")
    vocab = len(tokens)
  return ModelConfig(
      name=name, vocab_size=vocab, hidden_size=hidden,
      intermediate_size=count("feed_forward_length"), num_layers=count("block_count"),
      num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
      rope_theta=_gguf_positive(reader, key("rope.freq_base"), 10000.0),
      rope_scaling=RopeScaling() if "rope_freqs.weight" in tensor_names else None,
      rms_norm_eps=_gguf_positive(reader, key("attention.layer_norm_rms_epsilon")),
      tie_embeddings="output.weight" not in tensor_names,
      qkv_bias="blk.0.attn_q.bias" in tensor_names,
      max_position=count("context_length", 4096))


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


def load_gguf(path: str | os.PathLike, *, name: str | None = None, reader=None) -> Weights:
  """Reads and dequantizes a llama.cpp GGUF file of a Llama-family model.

  Args:
    path: the `.gguf` file.
    name: model id for reports (default: the file name without extension).
    reader: `gguf_reader(path)` when the caller already has it (the tokenizer reads
      the same file), else None.

  Returns:
    `Weights` in Hugging Face layout (Q/K rows un-permuted for `llama` files).

  Raises:
    LoadError: wrong architecture, a metadata field missing or of the wrong type or
      value, a missing or mis-shaped tensor, a tensor the model would not use (layers
      past `block_count` included), an unsupported tensor type, a NaN or inf weight, or a
      truncated/corrupt file (the message names the field or tensor).
  """
  path = Path(path)
  reader = gguf_reader(path) if reader is None else reader
  try:
    cfg = gguf_config(reader, name=name or path.stem)
  except LoadError as e:
    raise LoadError(f"{path}: {e}") from None
  arch = _field(reader, "general.architecture")
  by_name = {t.name: t for t in reader.tensors}
  mapping = _gguf_to_hf(cfg)
  used = set(mapping) | ({"rope_freqs.weight"} if cfg.rope_scaling is not None else set())
  _refuse_unused({n for n in by_name if n not in used and not _GGUF_ROTARY_CACHE.match(n)},
                 source=str(path), layer=_GGUF_LAYER, layers_field=f"{arch}.block_count",
                 num_layers=cfg.num_layers, model=f"{cfg.num_layers}-layer {arch} model")
  tensors: dict[str, np.ndarray] = {}
  types: collections.Counter[str] = collections.Counter()
  shapes = hf_names(cfg)
  for gname, hname in mapping.items():
    if gname not in by_name:
      raise LoadError(f"{path}: missing GGUF tensor {gname!r} (Hugging Face {hname!r}) for a "
                      f"{cfg.num_layers}-layer {arch} model")
    t = by_name[gname]
    types[t.tensor_type.name] += 1
    w = _dequantize(t)
    if w.shape != shapes[hname]:  # Before the row permutation, which needs the shape.
      raise LoadError(f"{path}: tensor {hname!r} has shape {w.shape}, expected "
                      f"{shapes[hname]} from the config (GGUF tensor {gname!r})")
    _check_finite(w, f"{gname!r} (Hugging Face {hname!r})", str(path))
    if arch == "llama" and gname.endswith(("attn_q.weight", "attn_q.bias")):
      w = _unpermute_rope_rows(w, cfg.num_heads)
    elif arch == "llama" and gname.endswith(("attn_k.weight", "attn_k.bias")):
      w = _unpermute_rope_rows(w, cfg.num_kv_heads)
    tensors[hname] = w
  if cfg.rope_scaling is not None:
    _check_rope_freqs(by_name["rope_freqs.weight"], cfg, path)
    types[by_name["rope_freqs.weight"].tensor_type.name] += 1
  _check_tensors(tensors, cfg, str(path), finite=False)  # Each was checked as it was read.
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
# Safetensors dtypes read as float weights (as float32).
HF_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.")
# Precomputed rotary tables some checkpoints store; the model computes its own.
_HF_ROTARY_CACHE = re.compile(r"(^|\.)rotary_emb\.(inv_freq|cos_cached|sin_cached)$")
# Tensors only quantized checkpoints hold: scales, zero points, packed codes, group indices
# (compressed-tensors, fp8, gptq, awq, bitsandbytes, ...).
_QUANT_COMPANION = re.compile(
    r"\.(weight_scale|weight_scale_inv|weight_zero_point|weight_global_scale|weight_packed|"
    r"weight_shape|input_scale|input_global_scale|input_zero_point|output_scale|k_scale|"
    r"v_scale|scales|qweight|qzeros|g_idx|absmax|SCB|quant_map|nested_absmax|"
    r"nested_quant_map|weight_format)$|\.quant_state\.")
_DEQUANTIZED = ("quant_method=compressed-tensors (float-quantized: fp8 weights, per-tensor or "
                "per-channel scales) and quant_method=fp8 (block scales, dynamic activations)")
_EXPECTED = {"count": "an integer >= 1", "positive": "a finite number > 0", "bool": "true or false"}


def _hf_field(config: Mapping[str, Any], key: str, kind: str, default: Any = ..., *,
              prefix: str = "") -> Any:
  """`config[key]` checked to be `kind` ("count", "positive" or "bool"); `default` when the
  field is absent or null, or a `LoadError` naming the field when there is no default."""
  value = config.get(key)
  if value is None:
    if default is not ...:
      return default
    if key not in config:
      raise LoadError(f"config.json field {prefix + key!r} is missing")
  ok = {"count": _is_count, "positive": _is_positive, "bool": lambda v: isinstance(v, bool)}
  if not ok[kind](value):
    raise LoadError(f"config.json field {prefix}{key}={value!r}: expected {_EXPECTED[kind]}")
  return {"count": int, "positive": float, "bool": bool}[kind](value)


def _hf_rope_scaling(rope: Any) -> RopeScaling | None:
  if not rope:
    return None
  if not isinstance(rope, Mapping):
    raise LoadError(f"config.json field rope_scaling={rope!r}: expected an object or null")
  kind = rope.get("rope_type", rope.get("type"))
  if kind != "llama3":
    raise LoadError(f"config.json rope_scaling type={kind!r} is not supported (only 'llama3')")
  get = lambda key, kind: _hf_field(rope, key, kind, prefix="rope_scaling.")  # noqa: E731
  return RopeScaling(get("factor", "positive"), get("low_freq_factor", "positive"),
                     get("high_freq_factor", "positive"),
                     get("original_max_position_embeddings", "count"))


def hf_config(config: Mapping[str, Any], *, name: str) -> ModelConfig:
  """The `ModelConfig` of a Hugging Face `config.json` (Llama, Mistral, Qwen2).

  Raises:
    LoadError: an unsupported architecture, rotary scaling or sliding window, or a field
      missing, of the wrong type or out of range (the message names the field and value).
  """
  if not isinstance(config, Mapping):
    raise LoadError(f"config.json: expected a JSON object, got {type(config).__name__}")
  archs = config.get("architectures")
  archs = [] if archs is None else archs
  if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
    raise LoadError(f"config.json field architectures={archs!r}: expected a list of class "
                    "names such as ['LlamaForCausalLM']")
  arch = next((a for a in archs if a in HF_ARCHITECTURES), None)
  if arch is None:
    raise LoadError(f"config.json architectures={archs!r}: expected one of "
                    f"{sorted(HF_ARCHITECTURES)}")
  count = lambda key, default=...: _hf_field(config, key, "count", default)  # noqa: E731
  scaling = _hf_rope_scaling(config.get("rope_scaling"))
  heads, hidden = count("num_attention_heads"), count("hidden_size")
  kv_heads = count("num_key_value_heads", heads)
  if heads % kv_heads:
    raise LoadError(f"config.json field num_attention_heads={heads} is not a multiple of "
                    f"num_key_value_heads={kv_heads}")
  head_dim = count("head_dim", None)
  if head_dim is None:
    if hidden % heads:
      raise LoadError(f"config.json field hidden_size={hidden} is not divisible by "
                      f"num_attention_heads={heads}, and head_dim (the head size) is absent")
    head_dim = hidden // heads
  max_position = count("max_position_embeddings", 4096)
  window = count("sliding_window", None)
  sliding = _hf_field(config, "use_sliding_window", "bool", arch == "MistralForCausalLM")
  if window is not None and sliding and window < max_position:
    raise LoadError(f"config.json sliding_window={window} < max_position_embeddings: sliding-"
                    "window attention is not implemented")
  return ModelConfig(
      name=name, vocab_size=count("vocab_size"), hidden_size=hidden,
      intermediate_size=count("intermediate_size"), num_layers=count("num_hidden_layers"),
      num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
      rope_theta=_hf_field(config, "rope_theta", "positive", 10000.0), rope_scaling=scaling,
      rms_norm_eps=_hf_field(config, "rms_norm_eps", "positive", 1e-6),
      tie_embeddings=_hf_field(config, "tie_word_embeddings", "bool", False),
      qkv_bias=_hf_field(config, "attention_bias", "bool", HF_ARCHITECTURES[arch]),
      max_position=max_position)


def _is_linear(name: str) -> bool:
  return name.endswith("_proj.weight") or name == "lm_head.weight"


@dataclasses.dataclass(frozen=True)
class _Fp8Scheme:
  """fp8 E4M3 linear weights times float scales: `w = float32(code) * scale`."""

  method: str  # quant_method: "compressed-tensors" or "fp8".
  block: tuple[int, int] | None  # fp8's weight_block_size [bo, bi]; None: per tensor or row.
  granularity: str  # For the weight-precision string ("per-channel", "128x128 block").

  @property
  def scale_suffix(self) -> str:
    return "_scale_inv" if self.block else "_scale"

  def companions(self, weight: str) -> tuple[str, ...]:
    """The tensors that travel with the linear `weight` (its scale; compressed-tensors'
    activation scale, which this loader does not apply)."""
    extra = () if self.block else (weight[:-len("weight")] + "input_scale",)
    return (weight + self.scale_suffix, *extra)

  def describe(self) -> str:
    return (f"dequantized from quant_method={self.method} (fp8 E4M3, {self.granularity} "
            "scales); activations unquantized")

  def dequantize(self, codes: np.ndarray, scale: np.ndarray, scale_name: str,
                 source: str) -> np.ndarray:
    out, cols = codes.shape
    if self.block is None:
      if scale.shape not in ((), (1,), (out, 1)):
        raise LoadError(f"{source}: tensor {scale_name!r} has shape {scale.shape}, expected "
                        f"(1,) (per tensor) or ({out}, 1) (per channel) for weights {codes.shape}")
      return codes.astype(np.float32) * scale.reshape(-1, 1)
    bo, bi = self.block
    expected = (-(-out // bo), -(-cols // bi))
    if scale.shape != expected:
      raise LoadError(f"{source}: tensor {scale_name!r} has shape {scale.shape}, expected "
                      f"{expected}: [{bo}, {bi}] blocks of weights {codes.shape}")
    return codes.astype(np.float32) * np.repeat(np.repeat(scale, bo, 0), bi, 1)[:out, :cols]


def _hf_quantization(config: Mapping[str, Any]) -> _Fp8Scheme | None:
  """The scheme `config.json`'s `quantization_config` names (None without one); a
  `LoadError` naming the field for every scheme this loader does not dequantize."""
  key = next((k for k in ("quantization_config", "compression_config")
              if config.get(k) is not None), None)
  if key is None:
    return None
  q = config[key]

  def refuse(what: str) -> LoadError:
    return LoadError(f"config.json {key}.{what} is not supported: this loader dequantizes only "
                     f"{_DEQUANTIZED}; load the float checkpoint instead (quantized codes are "
                     "never run as weights)")

  if not isinstance(q, Mapping):
    raise LoadError(f"config.json field {key}={q!r}: expected an object")
  method = q.get("quant_method")
  if method == "fp8":
    if q.get("activation_scheme", "dynamic") != "dynamic":
      raise refuse(f"activation_scheme={q['activation_scheme']!r} (fp8)")
    if q.get("fmt", "e4m3") != "e4m3":
      raise refuse(f"fmt={q['fmt']!r} (fp8)")
    block = q.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(map(_is_count, block))):
      raise refuse(f"weight_block_size={block!r} (fp8; expected [rows, columns])")
    return _Fp8Scheme("fp8", (int(block[0]), int(block[1])), f"{block[0]}x{block[1]} block")
  if method != "compressed-tensors":
    raise refuse(f"quant_method={method!r}")
  if q.get("format") != "float-quantized":
    raise refuse(f"format={q.get('format')!r} (compressed-tensors)")
  for field in ("kv_cache_scheme", "sparsity_config", "transform_config"):
    if q.get(field):
      raise refuse(f"{field}={q[field]!r} (compressed-tensors)")
  if q.get("quantization_status", "compressed") != "compressed":
    raise refuse(f"quantization_status={q['quantization_status']!r} (compressed-tensors)")
  groups = q.get("config_groups")
  if not isinstance(groups, Mapping) or not groups:
    raise refuse(f"config_groups={groups!r} (compressed-tensors)")
  strategies = set()
  for gname, group in groups.items():
    where = f"config_groups.{gname}"
    w = group.get("weights") if isinstance(group, Mapping) else None
    if not isinstance(w, Mapping) or not (
        w.get("num_bits") == 8 and w.get("type") == "float" and w.get("symmetric", True) is True
        and w.get("strategy") in ("tensor", "channel") and w.get("group_size") is None
        and w.get("block_structure") is None and not w.get("dynamic", False)):
      raise refuse(f"{where}.weights={w!r} (compressed-tensors; expected 8-bit float weights, "
                   "symmetric, strategy tensor or channel)")
    if group.get("format") not in (None, "float-quantized"):
      raise refuse(f"{where}.format={group['format']!r} (compressed-tensors)")
    if group.get("output_activations") is not None:
      raise refuse(f"{where}.output_activations (compressed-tensors)")
    inputs = group.get("input_activations")
    if inputs is not None and not (isinstance(inputs, Mapping) and inputs.get("num_bits") == 8
                                   and inputs.get("type") == "float"):
      raise refuse(f"{where}.input_activations={inputs!r} (compressed-tensors)")
    strategies.add(f"per-{w['strategy']}")
  return _Fp8Scheme("compressed-tensors", None, " and ".join(sorted(strategies)))


def _read_json(path: Path) -> Any:
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise LoadError(f"{path}: not valid JSON ({e})") from None


def _check_index(weight_map: Mapping[str, str], found: Mapping[str, tuple], index: Path) -> None:
  """The index and the shards agree on where every tensor is."""
  for key, (shard, _, _) in found.items():
    listed = weight_map.get(key)
    if listed is None and not _HF_ROTARY_CACHE.search(key):
      raise LoadError(f"{index}: tensor {key!r} is in {shard} but the index does not list it")
    if listed is not None and listed != shard:
      raise LoadError(f"{index}: the index puts {key!r} in {listed} but it is found in {shard}")
  absent = sorted(set(weight_map) - set(found), key=_natural)
  if absent:
    raise LoadError(f"{index}: the index lists {_listed(absent)} but no shard holds them")


def load_safetensors(folder: str | os.PathLike, *, name: str | None = None) -> Weights:
  """Reads a Hugging Face checkpoint folder: `config.json` plus `*.safetensors` shards.

  Sharded checkpoints are read through `model.safetensors.index.json`; every
  `*.safetensors` file of the folder otherwise. Float tensors are read as float32; fp8
  checkpoints of the schemes the module docstring lists are dequantized, and every other
  quantized checkpoint is refused. Every tensor must be used, except rotary caches
  (`rotary_emb.inv_freq`) and a tied `lm_head.weight` equal to the embedding.

  Raises:
    LoadError: unsupported architecture or quantization scheme; a config field missing,
      of the wrong type or out of range; a missing, mis-shaped, unused (layers past
      `num_hidden_layers` included), non-float or non-finite tensor; a tensor in two
      shards or where the index does not put it; a shard the index names that is absent;
      a file that does not parse (truncated or corrupt). The message names the field,
      tensor or file.
  """
  from safetensors import SafetensorError, safe_open

  folder = Path(folder)
  config_path = folder / "config.json"
  if not config_path.is_file():
    raise FileNotFoundError(f"{folder}: no config.json (a Hugging Face checkpoint folder has one)")
  config = _read_json(config_path)
  try:
    cfg = hf_config(config, name=name or folder.name)
    scheme = _hf_quantization(config)
  except LoadError as e:
    raise LoadError(f"{folder}: {e}") from None
  index = folder / "model.safetensors.index.json"
  weight_map = None
  if index.is_file():
    doc = _read_json(index)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str)
                                                   for v in weight_map.values()):
      raise LoadError(f"{index}: no 'weight_map' of tensor name -> shard file name")
    shards = sorted(set(weight_map.values()))
  else:
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
  if not shards:
    raise LoadError(f"{folder}: no *.safetensors files")
  # Where every tensor is, from the shards' headers: name -> (shard, dtype, shape).
  found: dict[str, tuple[str, str, tuple[int, ...]]] = {}
  for shard in shards:
    path = folder / shard
    if not path.is_file():
      raise LoadError(f"{folder}: shard {shard!r} named by the index is missing")
    try:
      with safe_open(path, framework="numpy") as f:
        for key in f.keys():
          if key in found:
            raise LoadError(f"{folder}: tensor {key!r} is in two shards, {found[key][0]} and "
                            f"{shard}; which one holds the weight is undefined")
          sl = f.get_slice(key)
          found[key] = (shard, sl.get_dtype(), tuple(sl.get_shape()))
    except SafetensorError as e:
      raise LoadError(f"{path}: not a readable safetensors file (corrupt or truncated: {e})") from e
  if weight_map is not None:
    _check_index(weight_map, found, index)

  wanted = hf_names(cfg)
  used = set(wanted)
  tied_head = cfg.tie_embeddings and "lm_head.weight" in found
  used |= {"lm_head.weight"} if tied_head else set()
  if scheme is not None:
    used |= {c for w in wanted if _is_linear(w) for c in scheme.companions(w)}
  unused = {k for k in found if k not in used and not _HF_ROTARY_CACHE.search(k)}
  companions = sorted((k for k in unused if _QUANT_COMPANION.search(k)), key=_natural)
  if companions and scheme is None:
    raise LoadError(f"{folder}: tensor {companions[0]!r} is a quantization companion (a scale, "
                    "zero point or packed code) but config.json has no quantization_config: a "
                    f"quantized checkpoint of unknown scheme; this loader dequantizes only "
                    f"{_DEQUANTIZED} and never runs codes as weights")
  _refuse_unused(unused, source=str(folder), layer=_HF_LAYER,
                 layers_field="config.json num_hidden_layers", num_layers=cfg.num_layers,
                 model=f"{cfg.num_layers}-layer {cfg.name}")
  for key, shape in wanted.items():
    if key in found and found[key][2] != shape:
      raise LoadError(f"{folder}: tensor {key!r} has shape {found[key][2]}, expected {shape} "
                      "from the config")

  def stored(key: str) -> np.ndarray:
    shard, dtype, _ = found[key]
    try:
      if dtype == "F8_E4M3":  # safetensors' numpy reader has no fp8; ml_dtypes does.
        return _safetensor_fp8(folder / shard, key)
      with safe_open(folder / shard, framework="numpy") as f:
        return f.get_tensor(key)
    except SafetensorError as e:
      raise LoadError(f"{folder / shard}: tensor {key!r} does not read ({e})") from e

  def read(key: str) -> np.ndarray:
    """Float32 weights of `key`, dequantized if the scheme quantized it; or a LoadError."""
    dtype = found[key][1]
    scale_name = key + scheme.scale_suffix if scheme is not None and _is_linear(key) else None
    if dtype in HF_FLOAT_DTYPES:
      if scale_name in found:
        raise LoadError(f"{folder}: tensor {key!r} has dtype {dtype} but {scale_name!r} scales "
                        f"it: quant_method={scheme.method} stores the weights it quantizes as "
                        "F8_E4M3")
      x = np.asarray(stored(key), np.float32)
    elif dtype == "F8_E4M3" and scale_name is not None:
      if scale_name not in found:
        raise LoadError(f"{folder}: tensor {key!r} holds F8_E4M3 codes but its scale "
                        f"{scale_name!r} is missing")
      if found[scale_name][1] not in HF_FLOAT_DTYPES:
        raise LoadError(f"{folder}: tensor {scale_name!r} has dtype {found[scale_name][1]}, "
                        f"expected a float scale ({', '.join(HF_FLOAT_DTYPES)})")
      scale = np.asarray(stored(scale_name), np.float32)
      x = scheme.dequantize(stored(key), scale, scale_name, str(folder))
    else:
      why = (f"quant_method={scheme.method} does not quantize it so" if scheme is not None else
             "integer or fp8 codes of a quantized checkpoint, and config.json has no "
             "quantization_config")
      raise LoadError(f"{folder}: tensor {key!r} has dtype {dtype}: {why}; this loader reads "
                      f"float weights ({', '.join(HF_FLOAT_DTYPES)}) and dequantizes only "
                      f"{_DEQUANTIZED}")
    _check_finite(x, repr(key), str(folder))
    return x

  tensors: dict[str, np.ndarray] = {}
  dtypes: collections.Counter[str] = collections.Counter()
  for key in wanted:
    if key in found:
      tensors[key] = read(key)
      dtypes[found[key][1]] += 1
  embed = tensors.get("model.embed_tokens.weight")
  if tied_head and embed is not None and not np.array_equal(read("lm_head.weight"), embed):
    raise LoadError(f"{folder}: config.json tie_word_embeddings=True but 'lm_head.weight' "
                    "differs from 'model.embed_tokens.weight': the model would run the "
                    "embedding as its output head")
  _check_tensors(tensors, cfg, str(folder), finite=False)  # Each was checked as it was read.
  precision = "safetensors " + ", ".join(f"{k} x{v}" for k, v in dtypes.most_common())
  if scheme is not None and dtypes["F8_E4M3"]:
    precision += "; " + scheme.describe()
  return Weights(tensors, cfg, precision, str(folder))


def _safetensor_fp8(path: Path, key: str) -> np.ndarray:
  """An F8_E4M3 tensor of a safetensors file (its layout: an 8-byte header size, the JSON
  header with each tensor's byte range, then the data), as `ml_dtypes.float8_e4m3fn`."""
  with open(path, "rb") as f:
    size = int.from_bytes(f.read(8), "little")
    entry = json.loads(f.read(size))[key]
  start, end = entry["data_offsets"]
  codes = np.fromfile(path, np.uint8, count=end - start, offset=8 + size + start)
  return codes.view(ml_dtypes.float8_e4m3fn).reshape(entry["shape"])


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

  The marker, written last, records the sha256 of every parameter, of the tokenizer
  files and of its own content (`kvtpu.checkpointing.seal`), which `load_checkpoint`
  verifies.

  Args:
    model: a loaded model.
    path: a new or empty directory.
    tokenizer: optional `kvtpu.models.tokenizer.Tokenizer`, saved beside the parameters
      (`tokenizer.json`, `tokenizer_config.json`) so the folder is self-contained.
    extra: more JSON-able fields for the marker file (e.g. the source file's hash).

  Returns:
    The checkpoint directory.
  """
  path = Path(path).absolute()
  if path.exists() and any(path.iterdir()):
    raise FileExistsError(f"checkpoint path={str(path)!r} exists and is not empty")
  path.mkdir(parents=True, exist_ok=True)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  save_arrays(path / "params", params)
  if tokenizer is not None:
    tokenizer.save_hf(path)
  cfg = dataclasses.asdict(model.cfg)
  meta = {"config": cfg, "weight_precision": model.weight_precision,
          "param_dtype": jnp.dtype(jax.tree.leaves(params)[0].dtype).name, **dict(extra)}
  files = tuple(sorted(p.name for p in path.iterdir() if p.is_file()))
  # The marker is written last: a directory with it holds a complete checkpoint.
  (path / CHECKPOINT_MARKER).write_text(json.dumps(seal(meta, params, folder=path, files=files),
                                                   indent=2))
  return path


def _config_from_json(d: Mapping[str, Any]) -> ModelConfig:
  d = dict(d)
  if d.get("rope_scaling") is not None:
    d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
  return ModelConfig(**d)


def load_checkpoint(path: str | os.PathLike) -> Llama:
  """Restores a `save_checkpoint` directory into a `Llama` (no original file needed).

  Before anything is used, the content hashes its marker records are verified: of the
  marker itself, the tokenizer files beside it and every parameter as read back.

  Args:
    path: the checkpoint directory. Parameters come back in the dtype they were saved in.

  Raises:
    LoadError: no marker file (not a checkpoint, or an interrupted save), or a marker
      whose fields do not describe a model.
    IntegrityError: a corrupt checkpoint (a marker, tokenizer file or parameter that
      differs from what was saved, or data that does not restore), or one written
      without content hashes; the message names the file or parameter and how to rebuild.
  """
  path = Path(path).absolute()
  marker = path / CHECKPOINT_MARKER
  if not marker.is_file():
    raise LoadError(f"{path}: no {CHECKPOINT_MARKER}; not a kvtpu model checkpoint (or an "
                    "interrupted save)")
  rebuild = "rebuild it: load the model from its source file and save_checkpoint it again"
  meta = read_marker(marker, regenerate=rebuild)
  if isinstance(meta.get("source"), str):
    rebuild += f" (its source, as recorded: {meta['source']})"
  check_metadata(meta, marker, regenerate=rebuild)
  check_files(path, meta, regenerate=rebuild)
  try:
    cfg = _config_from_json(meta["config"])
    saved = jnp.dtype(meta["param_dtype"])
    precision = meta["weight_precision"]
  except (KeyError, TypeError, ValueError) as e:
    raise LoadError(f"{marker}: field config, param_dtype or weight_precision is malformed "
                    f"({type(e).__name__}: {e})") from None
  model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), dtype=saved, param_dtype=saved,
                                       weight_precision=precision))
  abstract = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  # Restored to host arrays, hashed there, then put on the device once.
  target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
  params = restore_arrays(path / "params", target, what="parameters", regenerate=rebuild)
  check_arrays(params, meta, path / "params", regenerate=rebuild)
  params = jax.device_put(params)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  _check_materialized(model)
  return model
