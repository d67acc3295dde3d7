"""Byte-level BPE tokenizers from GGUF metadata or Hugging Face folders, and chat templates.

`Tokenizer.from_gguf` rebuilds the tokenizer that llama.cpp builds from a GGUF file's
`tokenizer.ggml.*` fields, as a Hugging Face `tokenizers.Tokenizer` (the BPE itself runs in
that library; nothing here merges tokens by hand):

  * model: `tokenizer.ggml.model == "gpt2"` (byte-level BPE), vocabulary from
    `tokenizer.ggml.tokens` (token i has id i), merges from `tokenizer.ggml.merges` in rank
    order, no unknown token and no byte fallback. Other models (`llama` SentencePiece,
    `bert`, `t5`, `rwkv`) raise.
  * pre-tokenizer: llama.cpp's `regex_exprs` for `tokenizer.ggml.pre` (see
    `SUPPORTED_PRE_TYPES`); each regex isolates its matches inside the pieces the previous
    one left, exactly as HF's `Split(..., "isolated")`, then the bytes of each piece are
    mapped to GPT-2's printable alphabet (`ByteLevel`). `smollm`/`starcoder`/`refact` are
    `Digits(individual_digits=True)` then the GPT-2 regex, as in SmolLM2's own
    tokenizer.json.
  * special tokens: control (type 3) and unknown (type 2) tokens become HF special added
    tokens; user-defined tokens (type 4) become non-special added tokens. Both are matched
    whole in the input text, as llama.cpp's `llama_tokenize(..., parse_special=true)`
    does, and never split by BPE. Decoding with `skip_special_tokens=True` drops control
    tokens but keeps user-defined ones, as llama.cpp's `token_to_piece(special=false)`.
  * `add_bos_token` / `add_eos_token` as llama.cpp reads them (default: BOS only for the
    llama3 family).

Verified in tests/models/test_tokenizer.py: on SmolLM2-135M-Instruct's GGUF, ids equal a
pure-Python BPE (GPT-2 byte alphabet, llama.cpp's regexes run by Python `re`, rank-ordered
merges) on fixed and random mixed-script text; known vocabulary ids; round trips; the chat
template's exact rendering; and, for every supported `tokenizer.ggml.pre`, the
pre-tokenizer's pieces equal llama.cpp's regexes run by Python `re`. Not verified against a
llama.cpp binary, nor on real llama3/qwen2 vocabularies.

Known differences from llama.cpp: no clean-up of spaces around punctuation in decode
(llama.cpp's `llama_detokenize` does it for some pre types; `token_to_piece`, which
streaming generation uses, never does); added tokens that overlap are matched longest
first (HF) rather than in llama.cpp's length-sorted scan; a user-defined token whose text
lies entirely in the GPT-2 byte alphabet (e.g. "é") decodes through that alphabet rather
than verbatim.

Chat templates are rendered as HF transformers renders them: a Jinja2
`ImmutableSandboxedEnvironment` with `trim_blocks`, `lstrip_blocks`, loop controls, a
`tojson` filter, and `raise_exception` / `strftime_now` globals.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import gguf
import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers

__all__ = ["STOP_TOKEN_TEXTS", "SUPPORTED_PRE_TYPES", "Tokenizer"]

# GGUF token types (llama.cpp `llama_token_type`, `gguf.TokenType`).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4

# llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp, `llm_tokenizer_bpe`).
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# llama.cpp's case-insensitive contractions spelled out (not `(?i:...)`, which would also
# fold e.g. the long s "ſ" into "s").
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3_REGEX = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEFAULT_REGEXES = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_REGEX, r"\p{N}+", r"[0-9][0-9][0-9]")

# `tokenizer.ggml.pre` -> pre-tokenizer family, as llama.cpp groups them.
_PRE_FAMILY = {
    "default": "default",
    "gpt-2": "gpt2", "gpt2": "gpt2", "phi-2": "gpt2", "mpt": "gpt2", "olmo": "gpt2",
    "starcoder": "starcoder", "refact": "starcoder", "smollm": "starcoder",
    "codeshell": "starcoder", "command-r": "starcoder", "exaone": "starcoder",
    "minerva-7b": "starcoder",
    "llama3": "llama3", "llama-v3": "llama3", "llama-bpe": "llama3", "falcon3": "llama3",
    "qwen2": "qwen2", "deepseek-r1-qwen": "qwen2", "stablelm2": "qwen2", "megrez": "qwen2",
}
SUPPORTED_PRE_TYPES: tuple[str, ...] = tuple(sorted(_PRE_FAMILY))
_SUPPORTED_MODELS = ("gpt2",)

# Texts of tokens that end a generated turn when present in the vocabulary (llama.cpp's
# end-of-generation list, `special_eog_ids`).
STOP_TOKEN_TEXTS: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>",
                                     "<end_of_turn>", "<|end|>", "<EOT>")


def _byte_level(use_regex: bool) -> pre_tokenizers.ByteLevel:
  return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=use_regex)


def _splits(*regexes: str) -> list[pre_tokenizers.PreTokenizer]:
  return [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in regexes]


def _pre_tokenizer(pre: str) -> tuple[pre_tokenizers.PreTokenizer, bool, bool]:
  """`(pre_tokenizer, ignore_merges, default add_bos)` for a `tokenizer.ggml.pre` value."""
  family = _PRE_FAMILY.get(pre)
  if family is None:
    raise ValueError(f"unsupported GGUF field tokenizer.ggml.pre={pre!r}; supported values: "
                     f"{', '.join(SUPPORTED_PRE_TYPES)}")
  if family == "gpt2":  # ByteLevel's own regex is GPT-2's.
    return _byte_level(use_regex=True), False, False
  if family == "starcoder":  # "\p{N}" isolated == Digits(individual_digits=True).
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    _byte_level(use_regex=True)]), False, False
  if family == "llama3":
    return pre_tokenizers.Sequence(_splits(_LLAMA3_REGEX) + [_byte_level(False)]), True, True
  if family == "qwen2":
    return pre_tokenizers.Sequence(_splits(_QWEN2_REGEX) + [_byte_level(False)]), False, False
  return pre_tokenizers.Sequence(_splits(*_DEFAULT_REGEXES) + [_byte_level(False)]), False, False


def _gguf_metadata(source: Any) -> Mapping[str, Any]:
  """The `tokenizer.*` fields of a GGUF path or reader, or a mapping as given."""
  if isinstance(source, Mapping):
    return source
  if isinstance(source, str | os.PathLike):
    source = gguf.GGUFReader(source)
  if isinstance(source, gguf.GGUFReader):
    return {name: field.contents() for name, field in source.fields.items()
            if name.startswith("tokenizer.")}
  raise TypeError(f"from_gguf takes a path, a gguf.GGUFReader or a mapping of field name to "
                  f"value, got {type(source).__name__}")


def _required(meta: Mapping[str, Any], key: str) -> Any:
  if key not in meta or meta[key] is None:
    raise ValueError(f"GGUF metadata is missing the required field {key}")
  return meta[key]


def _token_id(meta: Mapping[str, Any], key: str, n_tokens: int) -> int | None:
  value = meta.get(key)
  if value is None:
    return None
  value = int(value)
  if not 0 <= value < n_tokens:
    raise ValueError(f"GGUF field {key}={value} is outside the vocabulary (size {n_tokens})")
  return value


def _token_text(value: Any) -> str | None:
  """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
  if isinstance(value, Mapping):
    value = value.get("content")
  return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


class _GenerationTag(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}` (HF's assistant-mask tags): renders the body."""

  tags = {"generation"}

  def parse(self, parser: Any) -> list[jinja2.nodes.Node]:
    next(parser.stream)
    return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
  return datetime.datetime.now().strftime(fmt)


def _compile_template(source: str) -> jinja2.Template:
  """Compiles a chat template in the environment HF transformers uses."""
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=[jinja2.ext.loopcontrols, _GenerationTag])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  return env.from_string(source)


class Tokenizer:
  """A byte-level BPE tokenizer (HF `tokenizers`) with its special ids and chat template.

  Build one with `from_gguf` or `from_hf`. Encoding matches llama.cpp's
  `llama_tokenize(text, add_special=add_bos, parse_special=true)`: special-token text in
  the input (e.g. "<|im_start|>") becomes its single id.

  Attributes:
    vocab_size: number of token ids, added tokens included (the model's embedding may have
      more rows).
    bos_id: beginning-of-sequence id, or None when the model has none.
    eos_id: end-of-sequence id.
    pad_id: padding id (`eos_id` when the model names none).
    special_ids: ids of special (control) tokens, which `decode` drops by default.
    stop_ids: ids that end a generated turn: `eos_id`, any extra end-of-turn ids the
      metadata names, and those of `STOP_TOKEN_TEXTS` in the vocabulary.
    chat_template: the model's Jinja chat template, or None.
    add_bos / add_eos: whether `encode` adds BOS / EOS by default.
  """

  def __init__(self, hf_tokenizer: tokenizers.Tokenizer, *, eos_id: int, bos_id: int | None = None,
               pad_id: int | None = None, add_bos: bool = False, add_eos: bool = False,
               chat_template: str | None = None, extra_stop_ids: Iterable[int] = ()):
    """Wraps a HF tokenizer; see `from_gguf` and `from_hf` for the usual constructors.

    Args:
      hf_tokenizer: the `tokenizers.Tokenizer`; it is called without its post-processor
        (`add_special_tokens=False`): BOS/EOS come from `add_bos`/`add_eos` here.
      eos_id, bos_id, pad_id: special ids (`pad_id` defaults to `eos_id`).
      add_bos, add_eos: defaults of `encode`.
      chat_template: Jinja source, or None.
      extra_stop_ids: ids that end a turn besides EOS and `STOP_TOKEN_TEXTS`.

    Raises:
      ValueError: an id outside the vocabulary, or `add_bos` without `bos_id`.
    """
    self._hf = hf_tokenizer
    self.vocab_size: int = hf_tokenizer.get_vocab_size(with_added_tokens=True)
    for name, value in (("eos_id", eos_id), ("bos_id", bos_id), ("pad_id", pad_id)):
      if value is not None and not 0 <= value < self.vocab_size:
        raise ValueError(f"{name}={value} is outside the vocabulary (size {self.vocab_size})")
    if add_bos and bos_id is None:
      raise ValueError("add_bos=True but the tokenizer has no BOS token (bos_id=None)")
    self.eos_id: int = eos_id
    self.bos_id: int | None = bos_id
    self.pad_id: int = eos_id if pad_id is None else pad_id
    self.add_bos: bool = bool(add_bos)
    self.add_eos: bool = bool(add_eos)
    self.chat_template: str | None = chat_template or None
    self.special_ids: frozenset[int] = frozenset(
        i for i, t in hf_tokenizer.get_added_tokens_decoder().items() if t.special)
    stops = {eos_id, *(int(i) for i in extra_stop_ids)}
    stops.update(i for i in map(hf_tokenizer.token_to_id, STOP_TOKEN_TEXTS) if i is not None)
    self.stop_ids: frozenset[int] = frozenset(stops)
    self._template: jinja2.Template | None = None

  # ---------------------------------------------------------------- construction

  @classmethod
  def from_gguf(cls, path_or_reader: str | os.PathLike | gguf.GGUFReader | Mapping[str, Any],
                ) -> Tokenizer:
    """Builds the tokenizer llama.cpp builds from a GGUF file's metadata.

    Args:
      path_or_reader: a `.gguf` path, a `gguf.GGUFReader`, or a mapping of GGUF field name
        to Python value (`field.contents()`), e.g. for tests.

    Returns:
      The tokenizer; `chat_template` is `tokenizer.chat_template` if present.

    Raises:
      ValueError: a required field is missing (`tokenizer.ggml.model`, `.tokens`, `.merges`,
        `.eos_token_id`), malformed, or names an unsupported `tokenizer.ggml.model` (only
        "gpt2", byte-level BPE) or `tokenizer.ggml.pre` (see `SUPPORTED_PRE_TYPES`).
    """
    meta = _gguf_metadata(path_or_reader)
    model = _required(meta, "tokenizer.ggml.model")
    if model not in _SUPPORTED_MODELS:
      raise ValueError(f"unsupported GGUF field tokenizer.ggml.model={model!r}; supported values: "
                       f"{', '.join(_SUPPORTED_MODELS)} (byte-level BPE)")
    # llama.cpp: a missing pre type means "default" (with a warning about quality).
    pre = meta.get("tokenizer.ggml.pre") or "default"
    pre_tokenizer, ignore_merges, add_bos = _pre_tokenizer(pre)

    tokens = list(_required(meta, "tokenizer.ggml.tokens"))
    merges = list(_required(meta, "tokenizer.ggml.merges"))
    n = len(tokens)
    types = meta.get("tokenizer.ggml.token_type")
    types = [_NORMAL] * n if types is None else [int(t) for t in types]
    if len(types) != n:
      raise ValueError(f"GGUF field tokenizer.ggml.token_type has {len(types)} entries for {n} "
                       "tokenizer.ggml.tokens")
    # llama.cpp names empty tokens "[EMPTY_i]"; it requires the texts to be unique.
    tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != n:
      raise ValueError(f"GGUF field tokenizer.ggml.tokens has {n - len(vocab)} duplicate texts")
    pairs = []
    for rank, merge in enumerate(merges):
      pos = merge.find(" ", 1)  # As llama.cpp splits them.
      if pos < 0:
        raise ValueError(f"GGUF field tokenizer.ggml.merges[{rank}]={merge!r} is not 'a b'")
      pairs.append((merge[:pos], merge[pos + 1:]))

    try:
      bpe = tokenizers.models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges,
                                  fuse_unk=False, byte_fallback=False)
    except Exception as e:  # The library names the offending merge.
      raise ValueError(f"GGUF fields tokenizer.ggml.tokens/merges do not form a BPE: {e}") from e
    hf = tokenizers.Tokenizer(bpe)
    hf.pre_tokenizer = pre_tokenizer
    hf.decoder = decoders.ByteLevel()
    # Added tokens keep their vocabulary ids (their texts are already in `vocab`).
    hf.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                           for i in range(n) if types[i] in (_CONTROL, _UNKNOWN)])
    hf.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                   for i in range(n) if types[i] == _USER_DEFINED])

    eos_id = _token_id(meta, "tokenizer.ggml.eos_token_id", n)
    if eos_id is None:
      raise ValueError("GGUF metadata is missing the required field tokenizer.ggml.eos_token_id")
    extra_stops = [i for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
                   if (i := _token_id(meta, key, n)) is not None]
    add_bos = meta.get("tokenizer.ggml.add_bos_token", add_bos)
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
    return cls(hf, eos_id=eos_id, bos_id=_token_id(meta, "tokenizer.ggml.bos_token_id", n),
               pad_id=_token_id(meta, "tokenizer.ggml.padding_token_id", n),
               add_bos=bool(add_bos), add_eos=bool(add_eos),
               chat_template=meta.get("tokenizer.chat_template"), extra_stop_ids=extra_stops)

  @classmethod
  def from_hf(cls, folder: str | os.PathLike) -> Tokenizer:
    """Loads a Hugging Face tokenizer folder (what `save_hf` writes).

    Reads `tokenizer.json` (the `tokenizers` pipeline) and `tokenizer_config.json`
    (`bos_token`, `eos_token`, `pad_token` as strings or {"content": ...},
    `add_bos_token`, `add_eos_token`, `chat_template`); a `chat_template.jinja` file and
    `generation_config.json`'s `eos_token_id` (extra stop ids) are used when present. When
    `add_bos_token` / `add_eos_token` are absent, they are read off what tokenizer.json's
    post-processor adds to an empty text.

    Raises:
      FileNotFoundError: `tokenizer.json` or `tokenizer_config.json` is missing.
      ValueError: no `eos_token`, or a special token that is not in the vocabulary.
    """
    folder = Path(folder)
    files = {name: folder / name for name in ("tokenizer.json", "tokenizer_config.json")}
    for name, path in files.items():
      if not path.is_file():
        raise FileNotFoundError(f"{path}: a Hugging Face tokenizer folder needs {name} "
                                "(tokenizer.json and tokenizer_config.json)")
    hf = tokenizers.Tokenizer.from_file(str(files["tokenizer.json"]))
    hf.no_truncation()
    hf.no_padding()
    config = _read_json(files["tokenizer_config.json"])
    if (folder / "special_tokens_map.json").is_file():
      config = {**_read_json(folder / "special_tokens_map.json"), **config}

    def token_id(key: str) -> int | None:
      text = _token_text(config.get(key))
      if text is None:
        return None
      i = hf.token_to_id(text)
      if i is None:
        raise ValueError(
            f"{files['tokenizer_config.json']}: {key}={text!r} is not in the vocabulary")
      return i

    eos_id = token_id("eos_token")
    if eos_id is None:
      raise ValueError(f"{files['tokenizer_config.json']} names no eos_token")
    bos_id = token_id("bos_token")
    added = hf.encode("", add_special_tokens=True).ids  # What the post-processor adds.
    add_bos = config.get("add_bos_token", bos_id is not None and added[:1] == [bos_id])
    add_eos = config.get("add_eos_token", added[-1:] == [eos_id] and added != [bos_id])

    template = config.get("chat_template")
    if isinstance(template, list):  # Named templates: [{"name": ..., "template": ...}].
      template = {t.get("name"): t.get("template") for t in template}.get("default")
    if template is None and (folder / "chat_template.jinja").is_file():
      template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    extra_stops: list[int] = []
    if (folder / "generation_config.json").is_file():
      eos = _read_json(folder / "generation_config.json").get("eos_token_id")
      extra_stops = [int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None]
    return cls(hf, eos_id=eos_id, bos_id=bos_id, pad_id=token_id("pad_token"),
               add_bos=bool(add_bos), add_eos=bool(add_eos), chat_template=template,
               extra_stop_ids=[i for i in extra_stops if 0 <= i < hf.get_vocab_size(True)])

  def save_hf(self, folder: str | os.PathLike) -> None:
    """Writes `tokenizer.json` and `tokenizer_config.json` into `folder` (for `from_hf`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    self._hf.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None if self.bos_id is None else self.id_to_token(self.bos_id),
        "eos_token": self.id_to_token(self.eos_id),
        "pad_token": self.id_to_token(self.pad_id),
        "add_bos_token": self.add_bos,
        "add_eos_token": self.add_eos,
        "clean_up_tokenization_spaces": False,
        "chat_template": self.chat_template,
    }
    with open(folder / "tokenizer_config.json", "w", encoding="utf-8") as f:
      json.dump(config, f, ensure_ascii=False, indent=2)

  # ---------------------------------------------------------------- encode / decode

  @property
  def hf_tokenizer(self) -> tokenizers.Tokenizer:
    """The underlying `tokenizers.Tokenizer` (shared, not a copy)."""
    return self._hf

  def _wrap(self, ids: list[int], add_bos: bool | None, add_eos: bool | None) -> list[int]:
    if self.add_bos if add_bos is None else add_bos:
      if self.bos_id is None:
        raise ValueError("add_bos=True but the tokenizer has no BOS token (bos_id=None)")
      ids = [self.bos_id, *ids]
    if self.add_eos if add_eos is None else add_eos:
      ids = [*ids, self.eos_id]
    return ids

  def encode(self, text: str, *, add_bos: bool | None = None,
             add_eos: bool | None = None) -> list[int]:
    """Token ids of `text`; special-token text in it becomes its id.

    Args:
      text: any string ("" gives no tokens besides BOS/EOS).
      add_bos, add_eos: prepend BOS / append EOS; None uses the model's metadata
        (`add_bos` / `add_eos`).
    """
    return self._wrap(self._hf.encode(text, add_special_tokens=False).ids, add_bos, add_eos)

  def encode_batch(self, texts: Sequence[str], *, add_bos: bool | None = None,
                   add_eos: bool | None = None) -> list[list[int]]:
    """`encode` of each text (in parallel threads inside the library)."""
    encodings = self._hf.encode_batch(list(texts), add_special_tokens=False)
    return [self._wrap(e.ids, add_bos, add_eos) for e in encodings]

  def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
    """The text of `ids` (bytes joined, then UTF-8 decoded; invalid bytes become U+FFFD).

    Args:
      ids: token ids (ints, or a 1-D array).
      skip_special_tokens: drop control tokens (`special_ids`), e.g. "<|im_end|>".
    """
    return self._hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    """The id of a vocabulary entry (byte-level text, e.g. "Ġworld"), or None."""
    return self._hf.token_to_id(token)

  def id_to_token(self, i: int) -> str | None:
    """The vocabulary entry of an id (byte-level text), or None when out of range."""
    return self._hf.id_to_token(int(i)) if 0 <= int(i) < self.vocab_size else None

  # ---------------------------------------------------------------- chat

  def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *,
                          add_generation_prompt: bool = True, **kwargs: Any) -> str:
    """Renders a conversation with the model's chat template, as HF transformers does.

    Args:
      messages: [{"role": ..., "content": ...}, ...].
      add_generation_prompt: end with the header of an assistant turn.
      **kwargs: more template variables (`tools`, `documents`, `enable_thinking`, ...).
        `bos_token`, `eos_token` and `pad_token` are set to the tokens' texts.

    Raises:
      ValueError: the model has no chat template.
      jinja2.TemplateError: the template rejects the conversation (`raise_exception`).
    """
    if self.chat_template is None:
      raise ValueError("this tokenizer has no chat template (no GGUF field "
                       "tokenizer.chat_template, no chat_template in tokenizer_config.json)")
    if self._template is None:
      self._template = _compile_template(self.chat_template)
    variables: dict[str, Any] = {
        "bos_token": "" if self.bos_id is None else self.id_to_token(self.bos_id),
        "eos_token": self.id_to_token(self.eos_id),
        "pad_token": self.id_to_token(self.pad_id),
        "tools": None, "documents": None,
    }
    variables.update(kwargs)
    return self._template.render(messages=list(messages),
                                 add_generation_prompt=add_generation_prompt, **variables)

  def encode_chat(self, messages: Sequence[Mapping[str, Any]], *,
                  add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
    """Ids of the rendered conversation. No BOS/EOS is added: the template writes its own
    (as HF `apply_chat_template(tokenize=True)`)."""
    text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                    **kwargs)
    return self.encode(text, add_bos=False, add_eos=False)

  def __repr__(self) -> str:
    return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id}, add_bos={self.add_bos}, "
            f"chat_template={'yes' if self.chat_template else 'no'})")
