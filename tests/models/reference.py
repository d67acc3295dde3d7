"""Independent references for model tests: a float64 numpy Llama forward, GGUF names,
block decoders and writers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from kvtpu.models.config import ModelConfig


def _rms_norm(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, positions, theta, layout):
  """`x: [T, heads, H]`. layout "half": pairs (i, i+H/2) (HF); "interleaved": (2i, 2i+1)
  (llama.cpp's normal mode, on its permuted rows)."""
  h = x.shape[-1]
  inv = 1.0 / theta ** (np.arange(0, h, 2, dtype=np.float64) / h)
  ang = positions[:, None, None] * inv[None, None, :]  # [T, 1, H/2]
  cos, sin = np.cos(ang), np.sin(ang)
  if layout == "half":
    a, b = x[..., : h // 2], x[..., h // 2:]
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
  a, b = x[..., 0::2], x[..., 1::2]
  out = np.empty_like(x)
  out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
  return out


def np_llama_forward(t: dict[str, np.ndarray], cfg: ModelConfig, tokens,
                     rope_layout: str = "half") -> np.ndarray:
  """Float64 logits `[T, vocab]` of one sequence, from Hugging Face-named tensors.

  Written from the Llama equations, no JAX: causal softmax attention with grouped
  kv heads, SwiGLU, RMSNorm, tied or untied head. `rope_layout="interleaved"` runs
  the rows as llama.cpp stores them (its own rotary convention).
  """
  f64 = {k: np.asarray(v, np.float64) for k, v in t.items()}
  tokens = np.asarray(tokens)
  n, kvh, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  tt = len(tokens)
  pos = np.arange(tt, dtype=np.float64)
  x = f64["model.embed_tokens.weight"][tokens]
  mask = np.tril(np.ones((tt, tt), bool))
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."

    def lin(name, y, p=p):
      out = y @ f64[p + name + ".weight"].T
      return out + f64[p + name + ".bias"] if p + name + ".bias" in f64 else out

    y = _rms_norm(x, f64[p + "input_layernorm.weight"], cfg.rms_norm_eps)
    q = _rope(lin("self_attn.q_proj", y).reshape(tt, n, h), pos, cfg.rope_theta, rope_layout)
    k = _rope(lin("self_attn.k_proj", y).reshape(tt, kvh, h), pos, cfg.rope_theta, rope_layout)
    v = lin("self_attn.v_proj", y).reshape(tt, kvh, h)
    k, v = np.repeat(k, n // kvh, axis=1), np.repeat(v, n // kvh, axis=1)
    logits = np.einsum("tnh,snh->nts", q, k) / np.sqrt(h)
    logits = np.where(mask[None], logits, -np.inf)
    prob = np.exp(logits - logits.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    attn = np.einsum("nts,snh->tnh", prob, v).reshape(tt, n * h)
    x = x + lin("self_attn.o_proj", attn)
    y = _rms_norm(x, f64[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
    gate = lin("mlp.gate_proj", y)
    x = x + lin("mlp.down_proj", gate / (1 + np.exp(-gate)) * lin("mlp.up_proj", y))
  x = _rms_norm(x, f64["model.norm.weight"], cfg.rms_norm_eps)
  head = f64.get("lm_head.weight", f64["model.embed_tokens.weight"])
  return x @ head.T


def random_hf_tensors(cfg: ModelConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Random float32 weights under Hugging Face names, scaled so activations stay O(1)."""
  from kvtpu.models.loaders import hf_names

  out = {}
  for name, shape in hf_names(cfg).items():
    if name.endswith("norm.weight"):
      out[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    elif name.endswith(".bias"):
      out[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    else:
      out[name] = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
  return out


def gguf_to_hf_names(cfg: ModelConfig) -> dict[str, str]:
  """GGUF tensor name -> Hugging Face name, written here from llama.cpp's naming
  (`token_embd`, `blk.{i}.attn_q`, ...), independently of the loader's own table."""
  hf_of = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}
  if not cfg.tie_embeddings:
    hf_of["output"] = "lm_head"
  layer = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
           "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
           "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
           "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
  for i in range(cfg.num_layers):
    hf_of |= {f"blk.{i}.{g}": f"model.layers.{i}.{h}" for g, h in layer.items()}
  names = {f"{g}.weight": f"{h}.weight" for g, h in hf_of.items()}
  if cfg.qkv_bias:
    names |= {f"blk.{i}.attn_{x}.bias": f"model.layers.{i}.self_attn.{x}_proj.bias"
              for i in range(cfg.num_layers) for x in "qkv"}
  return names


def decode_gguf_blocks(raw: np.ndarray, kind: str) -> np.ndarray:
  """Hand-written decoders of ggml's block layouts (ggml-common.h), 32 values a block."""
  raw = raw.reshape(-1)
  if kind == "F16":
    return raw.view(np.float16).astype(np.float64)
  if kind == "BF16":
    return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
  size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[kind]
  blocks = raw.reshape(-1, size)
  d = blocks[:, 0:2].copy().view(np.float16).astype(np.float64)  # [nb, 1]
  if kind == "Q8_0":
    return (d * blocks[:, 2:].copy().view(np.int8)).reshape(-1)
  start = 4 if kind == "Q4_1" else 2
  nib = blocks[:, start:start + 16]
  q = np.concatenate([nib & 0xF, nib >> 4], axis=1).astype(np.float64)  # low nibbles first
  if kind == "Q4_0":
    return (d * (q - 8)).reshape(-1)
  m = blocks[:, 2:4].copy().view(np.float16).astype(np.float64)
  return (d * q + m).reshape(-1)


def write_llama_gguf(path: Path, cfg: ModelConfig, tensors: dict[str, np.ndarray], *,
                     arch: str = "llama", qtype: str = "F32", skip: tuple[str, ...] = (),
                     metadata: dict | None = None) -> Path:
  """Writes `tensors` (HF names/layout) as llama.cpp's converter would: GGUF names, Q/K
  rows permuted for `llama`, 2-D weights in `qtype`, norms in F32."""
  import gguf
  from kvtpu.models.loaders import permute_rope_rows

  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg.num_layers)
  w.add_context_length(cfg.max_position)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_vocab_size(cfg.vocab_size)
  for key, value in (metadata or {}).items():
    w.add_string(key, value) if isinstance(value, str) else w.add_uint32(key, value)
  qt = gguf.GGMLQuantizationType[qtype]
  for gname, hname in gguf_to_hf_names(cfg).items():
    if gname in skip:
      continue
    x = tensors[hname]
    if arch == "llama" and ".attn_q." in gname:
      x = permute_rope_rows(x, cfg.num_heads)
    elif arch == "llama" and ".attn_k." in gname:
      x = permute_rope_rows(x, cfg.num_kv_heads)
    if x.ndim == 2 and qt != gguf.GGMLQuantizationType.F32:
      w.add_tensor(gname, gguf.quants.quantize(x, qt), raw_dtype=qt)
    else:
      w.add_tensor(gname, np.ascontiguousarray(x, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path
