"""models.tokenizer against independent references.

The reference is a pure-Python byte-level BPE written here: GPT-2's byte alphabet,
llama.cpp's pre-tokenizer regexes run by Python `re` (with \\p{L}, \\p{N}, \\p{P} and \\s
spelled out from `unicodedata`, since the `regex` package is not a dependency), and
merges applied lowest rank first, leftmost first, as llama.cpp does. The real tokenizer
is SmolLM2-135M-Instruct's GGUF; its vocabulary is read here with `gguf` directly.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import unicodedata
from pathlib import Path

import gguf
import jinja2
import numpy as np
import pytest
import tokenizers
from kvtpu.models.tokenizer import SUPPORTED_PRE_TYPES, Tokenizer

# ----------------------------------------------------------------------------- reference


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's map of the 256 bytes to printable characters (openai/gpt-2 encoder.py)."""
  bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1)]
  cs = list(bs)
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def _byte_encode(text: str) -> str:
  table = _bytes_to_unicode()
  return "".join(table[b] for b in text.encode("utf-8"))


@functools.cache
def _classes() -> dict[str, str]:
  """Character-class bodies for Python `re`: Unicode letters, numbers, punctuation, spaces."""
  ranges: dict[str, list[list[int]]] = {"L": [], "N": [], "P": []}
  for cp in range(sys.maxunicode + 1):
    major = unicodedata.category(chr(cp))[0]
    if major in ranges:
      rs = ranges[major]
      if rs and rs[-1][1] == cp - 1:
        rs[-1][1] = cp
      else:
        rs.append([cp, cp])
  out = {k: "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}"
                    for a, b in rs) for k, rs in ranges.items()}
  # Unicode White_Space (Python's \s also takes U+001C..U+001F, which Unicode does not).
  out["S"] = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
  return out


def _ref_regexes(family: str) -> list[re.Pattern[str]]:
  """llama.cpp's `regex_exprs` (src/llama-vocab.cpp) in Python `re` syntax."""
  c = _classes()
  L, N, P, S = c["L"], c["N"], c["P"], c["S"]
  gpt2 = rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])"
  contractions = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
  tail = rf"| ?[^{S}{L}{N}]+[\r\n]*|[{S}]*[\r\n]+|[{S}]+(?![^{S}])|[{S}]+"
  exprs = {
      "gpt2": [gpt2],
      "starcoder": [rf"[{N}]", gpt2],
      "llama3": [contractions + rf"|[^\r\n{L}{N}]?[{L}]+|[{N}]{{1,3}}" + tail],
      "qwen2": [contractions + rf"|[^\r\n{L}{N}]?[{L}]+|[{N}]" + tail],
      "default": [rf"[{P}\$\+<=>\^~\|]+", gpt2, rf"[{N}]+", r"[0-9][0-9][0-9]"],
  }[family]
  return [re.compile(e) for e in exprs]


def _ref_pre_tokenize(text: str, family: str) -> list[str]:
  """Each regex isolates its matches inside the pieces left by the one before."""
  pieces = [text] if text else []
  for pattern in _ref_regexes(family):
    out = []
    for piece in pieces:
      pos = 0
      for m in pattern.finditer(piece):
        if m.start() > pos:
          out.append(piece[pos:m.start()])
        if m.end() > m.start():
          out.append(m.group())
        pos = m.end()
      if pos < len(piece):
        out.append(piece[pos:])
    pieces = out
  return pieces


def _ref_bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
  parts = list(word)
  while len(parts) > 1:
    rank, i = min((ranks.get((parts[i], parts[i + 1]), sys.maxsize), i)
                  for i in range(len(parts) - 1))
    if rank == sys.maxsize:
      break
    parts[i:i + 2] = [parts[i] + parts[i + 1]]
  return parts


class _RefTokenizer:
  """Pure-Python llama.cpp-style tokenizer over GGUF fields (control tokens matched whole)."""

  def __init__(self, fields: dict, family: str):
    self.tokens = fields["tokenizer.ggml.tokens"]
    self.vocab = {t: i for i, t in enumerate(self.tokens)}
    self.ranks = {tuple(m.split(" ")): r for r, m in enumerate(fields["tokenizer.ggml.merges"])}
    specials = [t for t, k in zip(self.tokens, fields["tokenizer.ggml.token_type"], strict=True)
                if k in (3, 4)]
    self.special_re = re.compile("(" + "|".join(map(re.escape, sorted(specials, key=len,
                                                                       reverse=True))) + ")")
    self.family = family

  def encode(self, text: str) -> list[int]:
    ids = []
    for k, chunk in enumerate(self.special_re.split(text)):
      if k % 2:
        ids.append(self.vocab[chunk])
        continue
      for piece in _ref_pre_tokenize(chunk, self.family):
        ids += [self.vocab[p] for p in _ref_bpe(_byte_encode(piece), self.ranks)]
    return ids


def test_reference_on_hand_sized_cases():
  # GPT-2's alphabet: printable Latin-1 maps to itself, space to "Ġ" (256 + 32), "\n" to "Ċ".
  assert _byte_encode("a é\n") == "aĠÃ©Ċ"
  assert len(set(_bytes_to_unicode().values())) == 256
  # Digits isolated first, then GPT-2's regex: " 12" leaves " " alone; "  x" keeps one space.
  assert _ref_pre_tokenize("ab 12 don't  x\n", "starcoder") == [
      "ab", " ", "1", "2", " don", "'t", " ", " x", "\n"]
  assert _ref_pre_tokenize("12345 I'M", "llama3") == ["123", "45", " I", "'M"]
  assert _ref_pre_tokenize("a+=1234", "default") == ["a", "+=", "123", "4"]
  # Merges apply lowest rank first: with (b,c) ranked before (a,b), "abc" -> a + bc.
  assert _ref_bpe("abc", {("a", "b"): 1, ("b", "c"): 0}) == ["a", "bc"]
  assert _ref_bpe("aaa", {("a", "a"): 0}) == ["aa", "a"]  # Leftmost first.


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def gguf_file() -> Path:
  from kvtpu.models.pretrained import gguf_path

  return gguf_path("smollm2-135m")


@pytest.fixture(scope="module")
def reader(gguf_file) -> gguf.GGUFReader:
  return gguf.GGUFReader(gguf_file)


@pytest.fixture(scope="module")
def fields(reader) -> dict:
  return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def tok(reader) -> Tokenizer:
  return Tokenizer.from_gguf(reader)


@pytest.fixture(scope="module")
def ref(fields) -> _RefTokenizer:
  assert fields["tokenizer.ggml.pre"] == "smollm"
  return _RefTokenizer(fields, "starcoder")


SENTENCES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 2024; we'll see, they'd say, you're right!",
    "def f(x, y=3):\n\tif x:\n\t\treturn x ** 2  # square\n    return {'y': y}\n",
    "int main() { printf(\"%d\\n\", 42); }\r\n",
    "Crème brûlée, naïve façade, São Paulo, Ærøskøbing, straße",
    "日本語のテキストと中文字符，还有한국어.",
    "Emoji: 🙂👍🏽🇫🇷 and ZWJ 👩‍👩‍👧",
    "שלום עולם و مرحبا بالعالم",
    "   leading spaces, trailing spaces   ",
    "line1\n\n\nline2\r\n\r\n  \n",
    "numbers 12345 3.14159 -7 1,000,000 and ²½ ٣٤ Ⅻ",
    "CAPS I'M YOU'RE WE'VE; don't can't won't",
    "tabs\t\tand\u00a0nbsp and   multiple     spaces",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "",
]


def _random_text(rng, n: int) -> str:
  pieces = list("abcXYZ019 \t\n\r'!?.,-_()[]{}<>=+$^~|\"éÅßçñ中文字日本ש ل٣²½\u00a0") + [
      "🙂", "👍🏽", "'s", "'LL", "  ", "\n\n", "<|im_end|>", "<|im_start|>", "12", "hello", "élan"]
  return "".join(pieces[i] for i in rng.integers(0, len(pieces), n))


# ----------------------------------------------------------------------------- SmolLM2 GGUF


def test_metadata(tok, fields):
  tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
  assert tok.vocab_size == len(tokens) == 49152
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
  assert tok.add_bos is False and tok.add_eos is False
  assert tok.special_ids == {i for i, t in enumerate(types) if t == 3}
  assert tok.stop_ids == {tokens.index("<|im_end|>"), tokens.index("<|endoftext|>")} == {0, 2}
  assert tok.chat_template == fields["tokenizer.chat_template"]
  assert all(tok.id_to_token(i) == t for i, t in enumerate(tokens))
  assert all(tok.token_to_id(t) == i for i, t in enumerate(tokens[:2000]))
  assert tok.id_to_token(len(tokens)) is None and tok.id_to_token(-1) is None
  assert tok.token_to_id("no such token") is None


def test_known_ids_from_the_gguf_vocabulary(tok, fields):
  tokens = fields["tokenizer.ggml.tokens"]
  assert tok.encode("Hello world") == [tokens.index("Hello"), tokens.index("Ġworld")]
  assert tok.encode("<|im_start|>") == [1]
  assert tok.encode("<|im_end|>") == [2]
  # Digits are isolated (the vocabulary has no multi-digit tokens at all).
  assert tok.encode("12345") == [tokens.index(d) for d in "12345"]
  assert tok.encode(" 2024") == [tokens.index(t) for t in ("Ġ", "2", "0", "2", "4")]
  assert tok.encode("hi", add_bos=True) == [1, tokens.index("hi")]
  assert tok.encode("hi", add_eos=True) == [tokens.index("hi"), 2]


@pytest.mark.parametrize("text", SENTENCES)
def test_matches_reference_bpe(tok, ref, text):
  assert tok.encode(text) == ref.encode(text)


def test_matches_reference_bpe_on_random_text(tok, ref, rng):
  texts = [_random_text(rng, int(n)) for n in rng.integers(0, 40, 60)]
  got = tok.encode_batch(texts)
  for text, ids in zip(texts, got, strict=True):
    assert ids == ref.encode(text), repr(text)


@pytest.mark.parametrize("text", SENTENCES)
def test_round_trip(tok, text):
  ids = tok.encode(text)
  assert tok.decode(ids, skip_special_tokens=False) == text
  special = re.compile("|".join(re.escape(tok.id_to_token(i)) for i in tok.special_ids))
  assert tok.decode(ids) == special.sub("", text)


def test_round_trip_random_text(tok, rng):
  for _ in range(100):
    text = _random_text(rng, int(rng.integers(0, 60)))
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text, repr(text)


def test_decode_partial_utf8_and_arrays(tok):
  ids = tok.encode("🙂")
  assert len(ids) > 1 and tok.decode(ids[:1]) == "\ufffd"  # A lone lead byte.
  assert tok.decode(np.asarray(tok.encode("Hello world"), np.int32)) == "Hello world"


def test_encode_batch_matches_encode(tok):
  assert tok.encode_batch(SENTENCES) == [tok.encode(s) for s in SENTENCES]
  assert tok.encode_batch(["a", ""], add_bos=True) == [[1, tok.encode("a")[0]], [1]]


def test_chat_template(tok):
  messages = [{"role": "user", "content": "What is the capital of France?"}]
  text = tok.apply_chat_template(messages)
  assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                  "Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?"
                  "<|im_end|>\n<|im_start|>assistant\n")
  assert tok.apply_chat_template(messages, add_generation_prompt=False) == text.removesuffix(
      "<|im_start|>assistant\n")
  system = [{"role": "system", "content": "Be brief."}, *messages,
            {"role": "assistant", "content": "Paris."}]
  assert tok.apply_chat_template(system, add_generation_prompt=False) == (
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is the capital of "
      "France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n")
  ids = tok.encode_chat(messages)
  assert ids == tok.encode(text)
  assert ids[0] == 1 and ids[-3:] == tok.encode("<|im_start|>assistant\n")[-3:]
  assert ids.count(1) == 3 and ids.count(2) == 2


def test_save_hf_and_from_hf(tok, tmp_path):
  tok.save_hf(tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
  back = Tokenizer.from_hf(tmp_path)
  assert back.encode_batch(SENTENCES) == tok.encode_batch(SENTENCES)
  for name in ("vocab_size", "bos_id", "eos_id", "pad_id", "special_ids", "stop_ids",
               "chat_template", "add_bos", "add_eos"):
    assert getattr(back, name) == getattr(tok, name), name
  assert back.decode(back.encode(SENTENCES[13])) == tok.decode(tok.encode(SENTENCES[13]))


def test_from_hf_config_variants(tok, tmp_path):
  # Token strings as {"content": ...}, named templates, BOS added by the post-processor.
  hf = tokenizers.Tokenizer.from_str(tok.hf_tokenizer.to_str())
  hf.post_processor = tokenizers.processors.TemplateProcessing(
      single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
  hf.save(str(tmp_path / "tokenizer.json"))
  config = {"eos_token": {"content": "<|im_end|>", "special": True}, "bos_token": "<|im_start|>",
            "chat_template": [{"name": "default", "template": "{{ messages[0]['content'] }}"},
                              {"name": "tool_use", "template": "tools"}]}
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
  back = Tokenizer.from_hf(tmp_path)
  assert (back.bos_id, back.eos_id, back.pad_id, back.add_bos) == (1, 2, 2, True)
  assert back.encode("Hello world") == [1, *tok.encode("Hello world")]  # BOS once.
  assert back.stop_ids == {0, 2, 7}
  assert back.apply_chat_template([{"role": "user", "content": "x"}]) == "x"


# ----------------------------------------------------------------------------- small vocabularies


def _meta(pre="smollm", extra=(), merges=(), **overrides) -> dict:
  """GGUF fields of a tiny byte-level vocabulary: 2 control tokens, the 256 bytes, `extra`."""
  byte_chars = [_bytes_to_unicode()[b] for b in range(256)]
  tokens = ["<|endoftext|>", "<|im_end|>", *byte_chars, *(t for t, _ in extra)]
  meta = {
      "tokenizer.ggml.model": "gpt2",
      "tokenizer.ggml.pre": pre,
      "tokenizer.ggml.tokens": tokens,
      "tokenizer.ggml.token_type": [3, 3] + [1] * 256 + [k for _, k in extra],
      "tokenizer.ggml.merges": [f"{a} {b}" for a, b in merges],
      "tokenizer.ggml.eos_token_id": 1,
  }
  meta.update(overrides)
  return {k: v for k, v in meta.items() if v is not None}


PRE_TEXTS = [
    "Hello, World! I'M here; don't 12345 + 678=9 x^2 ~a|b $5",
    "\t  indented\n\n  code();\r\n  \n// end   ",
    "ünïcödé 中文 ٣٤٥ ²½ 🙂 '' 's",
]


# llama.cpp's grouping of `tokenizer.ggml.pre` values by regex (llm_tokenizer_bpe).
_FAMILY = {
    "default": "default",
    **dict.fromkeys(["gpt-2", "gpt2", "phi-2", "mpt", "olmo"], "gpt2"),
    **dict.fromkeys(["starcoder", "refact", "smollm", "codeshell", "command-r", "exaone",
                     "minerva-7b"], "starcoder"),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3"], "llama3"),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"], "qwen2"),
}


def test_supported_pre_types():
  assert set(SUPPORTED_PRE_TYPES) == set(_FAMILY)


@pytest.mark.parametrize("pre", SUPPORTED_PRE_TYPES)
def test_pre_tokenizer_families_match_llama_cpp_regexes(pre):
  family = _FAMILY[pre]
  tok = Tokenizer.from_gguf(_meta(pre=pre, **{"tokenizer.ggml.bos_token_id": 0}))
  for text in PRE_TEXTS:
    got = [p for p, _ in tok.hf_tokenizer.pre_tokenizer.pre_tokenize_str(text)]
    assert got == [_byte_encode(p) for p in _ref_pre_tokenize(text, family)], (pre, text)
    assert tok.decode(tok.encode(text)) == text


def test_llama3_family_ignores_merges_and_adds_bos():
  # Ids: 0, 1 control; byte b is 2 + b; then "ab" 258 and "abc" 259. "abc" is a vocabulary
  # word that no merge builds: llama3 takes the whole word, the others merge a+b only.
  extra, merges = [("ab", 1), ("abc", 1)], [("a", "b")]
  llama3 = Tokenizer.from_gguf(
      _meta("llama-bpe", extra, merges, **{"tokenizer.ggml.bos_token_id": 0}))
  assert llama3.add_bos and llama3.encode("abc") == [0, 259]
  assert Tokenizer.from_gguf(_meta("smollm", extra, merges)).encode("abc") == [258, 2 + ord("c")]
  with pytest.raises(ValueError, match="no BOS token"):
    Tokenizer.from_gguf(_meta("llama-bpe"))


def test_user_defined_tokens_are_whole_and_kept_in_decode():
  tok = Tokenizer.from_gguf(_meta(extra=[("<think>", 4)]))
  think = 258
  assert tok.encode("a<think>b<|im_end|>") == [2 + ord("a"), think, 2 + ord("b"), 1]
  assert tok.special_ids == {0, 1}
  assert tok.decode(tok.encode("a<think>b<|im_end|>")) == "a<think>b"


def test_gguf_file_path(tmp_path):
  meta = _meta(extra=[("ab", 1)], merges=[("a", "b")], **{
      "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.add_bos_token": True,
      "tokenizer.chat_template": "{{ bos_token }}{{ messages[0].content }}"})
  writer = gguf.GGUFWriter(tmp_path / "t.gguf", arch="llama")
  writer.add_tokenizer_model(meta["tokenizer.ggml.model"])
  writer.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
  writer.add_token_list(meta["tokenizer.ggml.tokens"])
  writer.add_token_types(meta["tokenizer.ggml.token_type"])
  writer.add_token_merges(meta["tokenizer.ggml.merges"])
  writer.add_eos_token_id(1)
  writer.add_bos_token_id(0)
  writer.add_add_bos_token(True)
  writer.add_chat_template(meta["tokenizer.chat_template"])
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  for source in (tmp_path / "t.gguf", str(tmp_path / "t.gguf"), meta):
    tok = Tokenizer.from_gguf(source)
    assert tok.encode("ab") == [0, 258]
    assert tok.apply_chat_template([{"role": "user", "content": "q"}]) == "<|endoftext|>q"


def test_chat_template_environment_is_transformers():
  template = (
      "{% for m in messages %}\n"
      "  {% if m.role not in ['user', 'assistant'] %}"
      "{{ raise_exception('bad role ' + m.role) }}{% endif %}\n"
      "  {% if loop.index > 2 %}{% break %}{% endif %}\n"
      "  {% generation %}{{ m.role }}: {{ m.content | tojson }}\n{% endgeneration %}\n"
      "{% endfor %}\n"
      "{{ eos_token }}{{ extra }}")
  tok = Tokenizer.from_gguf(_meta(**{"tokenizer.chat_template": template}))
  messages = [{"role": "user", "content": "é\"x"}, {"role": "assistant", "content": 1},
              {"role": "user", "content": "dropped"}]
  # trim_blocks drops the newline after each block tag, lstrip_blocks the indentation
  # before it; tojson keeps non-ASCII as is.
  assert tok.apply_chat_template(messages, extra="!") == (
      'user: "é\\"x"\nassistant: 1\n<|im_end|>!')
  with pytest.raises(jinja2.TemplateError, match="bad role system"):
    tok.apply_chat_template([{"role": "system", "content": ""}])
  with pytest.raises(jinja2.exceptions.SecurityError):  # The sandbox is immutable.
    Tokenizer.from_gguf(_meta(**{"tokenizer.chat_template": "{{ messages.append(1) }}"})
                        ).apply_chat_template([])


# ----------------------------------------------------------------------------- errors


def test_unsupported_pre_and_model():
  with pytest.raises(ValueError, match=r"tokenizer\.ggml\.pre='tekken'.*smollm"):
    Tokenizer.from_gguf(_meta(pre="tekken"))
  with pytest.raises(ValueError, match=r"tokenizer\.ggml\.model='llama'.*gpt2"):
    Tokenizer.from_gguf(_meta(**{"tokenizer.ggml.model": "llama"}))
  with pytest.raises(TypeError, match="GGUFReader"):
    Tokenizer.from_gguf(42)


@pytest.mark.parametrize("field", ["tokenizer.ggml.model", "tokenizer.ggml.tokens",
                                   "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id"])
def test_missing_required_field(field):
  with pytest.raises(ValueError, match=f"missing the required field {re.escape(field)}"):
    Tokenizer.from_gguf(_meta(**{field: None}))


def test_malformed_fields():
  with pytest.raises(ValueError, match="token_type has 3 entries"):
    Tokenizer.from_gguf(_meta(**{"tokenizer.ggml.token_type": [1, 1, 1]}))
  with pytest.raises(ValueError, match="do not form a BPE"):
    Tokenizer.from_gguf(_meta(merges=[("x", "y")]))  # "xy" is not in the vocabulary.
  with pytest.raises(ValueError, match="outside the vocabulary"):
    Tokenizer.from_gguf(_meta(**{"tokenizer.ggml.eos_token_id": 10**6}))


def test_missing_pre_is_llama_cpp_default():
  tok = Tokenizer.from_gguf(_meta(pre=None))
  pieces = [p for p, _ in tok.hf_tokenizer.pre_tokenizer.pre_tokenize_str("x+=12345")]
  assert pieces == ["x", "+=", "123", "45"]


def test_no_chat_template():
  tok = Tokenizer.from_gguf(_meta())
  assert tok.chat_template is None
  with pytest.raises(ValueError, match="no chat template"):
    tok.apply_chat_template([{"role": "user", "content": "hi"}])
  with pytest.raises(ValueError, match="no chat template"):
    tok.encode_chat([{"role": "user", "content": "hi"}])


def test_from_hf_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    Tokenizer.from_hf(tmp_path)
  Tokenizer.from_gguf(_meta()).hf_tokenizer.save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
    Tokenizer.from_hf(tmp_path)
  (tmp_path / "tokenizer_config.json").write_text("{}")
  with pytest.raises(ValueError, match="no eos_token"):
    Tokenizer.from_hf(tmp_path)
  (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<nope>"}')
  with pytest.raises(ValueError, match="not in the vocabulary"):
    Tokenizer.from_hf(tmp_path)
