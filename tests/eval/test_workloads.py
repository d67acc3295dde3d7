"""Workloads: hashes, windows, each builder on SmolLM2's tokenizer, user files, `load`."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kvtpu.eval import workloads as wl
from kvtpu.eval.workloads import Workload
from tests.helpers import ByteTokenizer


@pytest.fixture(scope="module")
def tok():
  """SmolLM2-135M-Instruct's tokenizer (no BOS added by `encode`, digits split one by one)."""
  from kvtpu.models.pretrained import gguf_path
  from kvtpu.models.tokenizer import Tokenizer
  return Tokenizer.from_gguf(gguf_path("smollm2-135m"))


def reference_token_sha(documents) -> str:
  """The documented token hash, written independently with `struct`."""
  h = hashlib.sha256()
  for doc in documents:
    h.update(struct.pack("<Q", len(doc)))
    h.update(struct.pack(f"<{len(doc)}i", *[int(i) for i in doc]))
  return h.hexdigest()


def make(documents, name="test") -> Workload:
  return Workload.from_documents(name, "a test workload", documents, "0" * 64)


# ----------------------------------------------------------------------------- hashes, Workload


def test_token_hash_matches_the_documented_layout(rng):
  docs = [rng.integers(0, 50_000, n) for n in (1, 7, 300)]
  assert wl.tokens_sha256(docs) == reference_token_sha(docs)
  assert make(docs).token_sha256 == reference_token_sha(docs)


def test_token_hash_changes_with_any_single_token(rng):
  docs = [rng.integers(0, 1000, 40).astype(np.int32), rng.integers(0, 1000, 25).astype(np.int32)]
  base = wl.tokens_sha256(docs)
  seen = {base}
  for d, doc in enumerate(docs):
    for pos in range(len(doc)):
      changed = [x.copy() for x in docs]
      changed[d][pos] += 1
      seen.add(wl.tokens_sha256(changed))
  assert len(seen) == 1 + sum(len(d) for d in docs)  # Every single change gives a new hash.
  # Moving a document boundary (same concatenated ids) changes it too.
  assert wl.tokens_sha256([[1, 2], [3]]) != wl.tokens_sha256([[1], [2, 3]])
  assert wl.tokens_sha256([[1, 2, 3]]) != wl.tokens_sha256([[1, 2], [3]])


def test_texts_hash_layout():
  expected = hashlib.sha256(struct.pack("<Q", 2) + b"ab" + struct.pack("<Q", 3) + "é!".encode())
  assert wl.texts_sha256(["ab", "é!"]) == expected.hexdigest()
  assert wl.texts_sha256(["ab", "c"]) != wl.texts_sha256(["a", "bc"])


def test_workload_invariants():
  w = make([[5, 6, 7], np.array([8], np.int64)])
  assert w.num_tokens == 4 and all(d.dtype == np.int32 for d in w.documents)
  with pytest.raises(ValueError):
    w.documents[0][0] = 1  # Read-only: the hash cannot go stale.
  assert w.disclosure() == {
      "name": "test", "description": "a test workload", "num_tokens": 4, "num_documents": 2,
      "token_sha256": reference_token_sha([[5, 6, 7], [8]]), "source_sha256": "0" * 64,
      "seed": 0}
  with pytest.raises(ValueError, match="does not match"):
    dataclasses.replace(w, documents=(np.array([5, 6, 9]), np.array([8])))
  with pytest.raises(ValueError, match="no documents"):
    make([])
  with pytest.raises(ValueError, match="non-empty"):
    make([[1], []])
  with pytest.raises(ValueError, match="outside"):
    make([[-1, 2]])
  with pytest.raises(ValueError, match="answers"):
    Workload.from_documents("x", "x", [[1], [2]], "0" * 64, answers=["1"])
  with pytest.raises(ValueError, match="sha256"):
    Workload.from_documents("x", "x", [[1]], "not a hash")


# ----------------------------------------------------------------------------- windows


@pytest.mark.parametrize("seq_len, batch, num_tokens, separator", [
    (8, 2, None, None), (8, 2, None, 0), (5, 3, 40, None), (1, 1, 7, 9), (16, 1, 64, None)])
def test_windows_pack_the_stream_in_order(rng, seq_len, batch, num_tokens, separator):
  docs = [rng.integers(1, 100, n) for n in (13, 1, 30, 22)]
  w = make(docs)
  # Independent reference: the documents joined (with separators) as a Python list.
  stream = []
  for i, doc in enumerate(docs):
    stream += ([separator] if i and separator is not None else []) + doc.tolist()
  assert w.stream(separator=separator).tolist() == stream
  used = len(stream) if num_tokens is None else num_tokens
  count = used // (seq_len * batch)  # Rounded down to whole batches.
  batches = list(w.windows(seq_len, batch=batch, num_tokens=num_tokens, separator=separator))
  assert len(batches) == count == w.num_batches(seq_len, batch=batch, num_tokens=num_tokens,
                                                separator=separator)
  for i, b in enumerate(batches):
    assert b.shape == (batch, seq_len) and b.dtype == np.int32
    for r in range(batch):
      start = (i * batch + r) * seq_len
      assert b[r].tolist() == stream[start:start + seq_len]
  assert batches == [] or batches[0].flags.writeable
  again = list(w.windows(seq_len, batch=batch, num_tokens=num_tokens, separator=separator))
  assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))


def test_windows_errors_are_eager_and_name_the_arguments():
  w = make([np.arange(1, 31)])  # 30 tokens.
  with pytest.raises(ValueError, match=r"num_tokens=30 .*seq_len=8 .*batch=4"):
    w.windows(8, batch=4)  # 30 < 32: raised on the call, before iteration.
  with pytest.raises(ValueError, match="num_tokens=20.*seq_len=8.*batch=3"):
    w.windows(8, batch=3, num_tokens=20)
  with pytest.raises(ValueError, match="fewer than num_tokens=31"):
    w.windows(1, batch=1, num_tokens=31)
  for kwargs in ({"batch": 0}, {"batch": 1, "num_tokens": 0}, {"batch": 1.5}):
    with pytest.raises(ValueError):
      w.windows(1, **kwargs)
  with pytest.raises(ValueError, match="seq_len"):
    w.windows(0, batch=1)
  assert len(list(w.windows(10, batch=3))) == 1


# ----------------------------------------------------------------------------- prose, code


def test_prose_is_english_and_deterministic(tok):
  w = wl.prose(tok)
  assert w.name == "prose" and w.num_tokens >= 50_000 and len(w.documents) >= 30
  text = "\n".join(tok.decode(d) for d in w.documents)
  assert sum(c.isascii() for c in text) >= 0.99 * len(text)
  words = text.split()
  plain = sum(bool(re.fullmatch(r"[(\"']?[A-Za-z][a-z'-]*[.,;:!?)\"']*", x)) for x in words)
  assert plain >= 0.75 * len(words), plain / len(words)
  assert ">>>" not in text
  assert wl.prose(tok).token_sha256 == w.token_sha256
  other = wl.prose(tok, seed=1)
  assert other.token_sha256 != w.token_sha256 and other.num_tokens == w.num_tokens
  assert sorted(map(wl.tokens_sha256, [[d] for d in other.documents])) == sorted(
      map(wl.tokens_sha256, [[d] for d in w.documents]))  # Same documents, shuffled.
  cut = wl.prose(tok, num_tokens=20_000, seed=1)
  assert cut.name == "prose:num_tokens=20000,seed=1" and cut.num_tokens == 20_000
  assert np.array_equal(cut.stream(), other.stream()[:20_000])
  with pytest.raises(ValueError, match="fewer than num_tokens"):
    wl.prose(tok, num_tokens=10**7)


def test_prose_text_is_the_same_in_a_fresh_interpreter():
  """No dependence on what else was imported: the source hash from a bare `python`."""
  here = wl.prose(ByteTokenizer()).source_sha256
  script = ("from kvtpu.eval import workloads\n"
            "class T:\n"
            "  def encode(self, text): return list(text.encode())\n"
            "print(workloads.prose(T()).source_sha256)\n")
  root = Path(__file__).parents[2]
  env = {**os.environ, "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
                       check=True, env=env)
  assert out.stdout.strip() == here


def test_code_is_the_stdlib_sources(tok):
  w = wl.code(tok)
  assert w.name == "code" and w.num_tokens >= 20_000 and len(w.documents) == len(wl.CODE_MODULES)
  decoded = sorted(tok.decode(d) for d in w.documents)
  files = sorted(Path(importlib.util.find_spec(m).origin).read_text(encoding="utf-8")
                 for m in wl.CODE_MODULES)
  assert decoded == files  # Byte-level BPE round-trips the files exactly.
  assert all("def " in t for t in decoded)
  assert w.source_sha256 == wl.texts_sha256([tok.decode(d) for d in w.documents])
  assert wl.code(tok).token_sha256 == w.token_sha256
  assert wl.code(tok, seed=3).token_sha256 != w.token_sha256


# ----------------------------------------------------------------------------- chat


def test_chat_documents_are_prompt_plus_answer(tok):
  calls = []

  def respond(prompts):
    calls.append(prompts)
    return [[tok.eos_id] * (i + 1) + [300 + i] for i in range(len(prompts))]

  w = wl.chat(tok, respond, num_questions=5, seed=2)
  assert len(calls) == 1 and len(calls[0]) == 5
  order = np.random.default_rng(2).permutation(len(wl.CHAT_QUESTIONS))[:5]
  questions = [wl.CHAT_QUESTIONS[i] for i in order]
  for i, (q, prompt, doc) in enumerate(zip(questions, calls[0], w.documents, strict=True)):
    assert prompt == tok.encode_chat([{"role": "user", "content": q}])
    assert q in tok.decode(prompt)
    assert doc.tolist() == prompt + [tok.eos_id] * (i + 1) + [300 + i]
  assert w.name == "chat:num_questions=5,seed=2" and w.seed == 2
  assert wl.chat(tok, respond, num_questions=5, seed=2).token_sha256 == w.token_sha256
  assert wl.chat(tok, respond, num_questions=5, seed=3).token_sha256 != w.token_sha256
  assert len(wl.chat(tok, respond).documents) == len(wl.CHAT_QUESTIONS) >= 40
  assert len(set(wl.CHAT_QUESTIONS)) == len(wl.CHAT_QUESTIONS)
  with pytest.raises(ValueError, match="2 answers for 5 prompts"):
    wl.chat(tok, lambda p: [[1], [2]], num_questions=5)
  with pytest.raises(ValueError, match="outside"):
    wl.chat(tok, lambda p: [[tok.vocab_size]] * len(p), num_questions=1)
  with pytest.raises(ValueError, match="num_questions"):
    wl.chat(tok, respond, num_questions=len(wl.CHAT_QUESTIONS) + 1)


# ----------------------------------------------------------------------------- passkey


@pytest.mark.parametrize("length", [1024, 2048, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_passkey_exact_length_and_depth(tok, length, depth):
  w = wl.passkey(tok, length=length, depth=depth, num_samples=2, seed=7)
  assert w.name == f"passkey:length={length},depth={depth},num_samples=2,seed=7"
  assert [len(d) for d in w.documents] == [length, length]
  for doc, key in zip(w.documents, w.answers, strict=True):
    assert re.fullmatch(r"[1-9]\d{4}", key)
    text = tok.decode(doc)
    assert text.count(key) == 2 and text.endswith(wl.PASSKEY_QUESTION)
    assert text.startswith(wl.PASSKEY_INTRO)
    # Token position of the key (SmolLM2 splits digits into single tokens).
    key_ids = tok.encode(key)
    ids = doc.tolist()
    pos = next(i for i in range(len(ids)) if ids[i:i + len(key_ids)] == key_ids)
    assert abs(pos - depth * length) <= 0.05 * length, (pos, depth * length)
    assert abs(text.index(key) - depth * len(text)) <= 0.05 * len(text)


def test_passkey_keys_minimum_length_and_errors(tok):
  w = wl.passkey(tok, length=512, depth=0.5, num_samples=8, seed=1)
  assert len(set(w.answers)) == 8
  assert wl.passkey(tok, length=512, depth=0.5, num_samples=8, seed=1).answers == w.answers
  assert wl.passkey(tok, length=512, depth=0.5, num_samples=8, seed=2).answers != w.answers
  key = w.answers[0]
  needle = wl.PASSKEY_NEEDLE.format(key=key)
  fixed = sum(len(tok.encode(t)) for t in (wl.PASSKEY_INTRO, needle, wl.PASSKEY_QUESTION))
  bare = wl.passkey(tok, length=fixed, depth=0.5, num_samples=1, seed=1)  # No filler at all.
  assert tok.decode(bare.documents[0]) == wl.PASSKEY_INTRO + needle + wl.PASSKEY_QUESTION
  with pytest.raises(ValueError, match=f"length={fixed - 1} is too small.*{fixed} tokens"):
    wl.passkey(tok, length=fixed - 1, depth=0.5, seed=1)
  for depth in (-0.01, 1.01, float("nan"), "0.5"):
    with pytest.raises(ValueError, match="depth"):
      wl.passkey(tok, length=512, depth=depth)
  for kwargs in ({"length": 0}, {"num_samples": 0}, {"seed": -1}):
    with pytest.raises(ValueError):
      wl.passkey(tok, **{"length": 512, "depth": 0.5, **kwargs})


def test_passkey_with_a_tokenizer_that_adds_bos():
  t = ByteTokenizer(add_bos=True)
  w = wl.passkey(t, length=600, depth=0.5)
  doc = w.documents[0].tolist()
  assert len(doc) == 600 and doc[0] == t.bos_id and doc.count(t.bos_id) == 1
  assert t.decode(doc).endswith(wl.PASSKEY_QUESTION) and w.answers[0] in t.decode(doc)


# ----------------------------------------------------------------------------- repeat, random


def test_repeat_and_random(tok):
  w = wl.repeat(tok, num_tokens=1000)
  assert w.documents[0].tolist() == [tok.encode(" the")[0]] * 1000 and w.num_tokens == 1000
  p = wl.repeat(tok, num_tokens=100, phrase=" Hello world")
  ids = tok.encode(" Hello world")
  assert p.documents[0].tolist() == (ids * 100)[:100]
  assert p.token_sha256 != wl.repeat(tok, num_tokens=101, phrase=" Hello world").token_sha256
  r = wl.random_tokens(1000, num_tokens=5000, seed=4)
  assert r.documents[0].min() >= 0 and r.documents[0].max() < 1000
  assert len(np.unique(r.documents[0])) > 900  # Uniform over the vocabulary.
  assert wl.random_tokens(1000, num_tokens=5000, seed=4).token_sha256 == r.token_sha256
  assert wl.random_tokens(1000, num_tokens=5000, seed=5).token_sha256 != r.token_sha256
  assert r.name == "random:vocab_size=1000,num_tokens=5000,seed=4"
  with pytest.raises(ValueError, match="encodes to no tokens"):
    wl.repeat(tok, num_tokens=10, phrase="")
  with pytest.raises(ValueError, match="num_tokens"):
    wl.random_tokens(1000, num_tokens=0)


# ----------------------------------------------------------------------------- user files


def test_jsonl_all_record_kinds(tok, tmp_path):
  messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
  lines = [json.dumps({"text": "Plain text."}), "",
           json.dumps({"prompt": "Q: 2+2?", "completion": " A: 4", "id": 3}),
           json.dumps({"prompt": "Only a prompt"}),
           json.dumps({"messages": messages})]
  path = tmp_path / "data.jsonl"
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  w = wl.jsonl(tok, path)
  assert [d.tolist() for d in w.documents] == [
      tok.encode("Plain text."), tok.encode("Q: 2+2? A: 4"), tok.encode("Only a prompt"),
      tok.encode_chat(messages, add_generation_prompt=False)]
  assert w.name == f"jsonl:{path}" and w.source_sha256 == hashlib.sha256(
      path.read_bytes()).hexdigest()
  cut = wl.jsonl(tok, path, num_tokens=5)
  assert cut.name == f"jsonl:{path}?num_tokens=5" and cut.num_tokens == 5


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"txt": "x"}', "exactly one of"),
    ('{"text": "a", "prompt": "b"}', "exactly one of"),
    ('{"text": 5}', "must be strings"),
    ('{"text": "a", "completion": "b"}', "goes with 'prompt'"),
    ('{"messages": [{"role": "user"}]}', "'messages' must be"),
    ('{"messages": []}', "'messages' must be"),
    ('{"text": ""}', "no tokens"),
])
def test_jsonl_malformed_line_names_the_line(tok, tmp_path, bad, message):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"text": "fine"}\n\n' + bad + "\n", encoding="utf-8")
  with pytest.raises(ValueError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(message)):
    wl.jsonl(tok, path)


def test_jsonl_unreadable_or_empty(tok, tmp_path):
  (tmp_path / "empty.jsonl").write_text("\n  \n", encoding="utf-8")
  with pytest.raises(ValueError, match="empty.jsonl is empty"):
    wl.jsonl(tok, tmp_path / "empty.jsonl")
  with pytest.raises(ValueError, match="cannot read .*missing.jsonl"):
    wl.jsonl(tok, tmp_path / "missing.jsonl")
  with pytest.raises(ValueError, match="is a folder"):
    wl.jsonl(tok, tmp_path)
  (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
  with pytest.raises(ValueError, match="latin1.jsonl is not UTF-8"):
    wl.jsonl(tok, tmp_path / "latin1.jsonl")


def test_text_file_and_folder(tok, tmp_path):
  one = tmp_path / "book.txt"
  one.write_text("First paragraph,\ntwo lines.\n\n\nSecond one.\n", encoding="utf-8")
  w = wl.text_file(tok, one)
  assert [d.tolist() for d in w.documents] == [tok.encode(one.read_text(encoding="utf-8"))]
  assert w.source_sha256 == hashlib.sha256(one.read_bytes()).hexdigest()
  assert w.name == f"file:{one}"
  p = wl.text_file(tok, one, paragraphs=True)
  assert [tok.decode(d) for d in p.documents] == ["First paragraph,\ntwo lines.", "Second one.\n"]
  assert p.name == f"file:{one}?paragraphs=true"

  folder = tmp_path / "corpus"
  (folder / "sub").mkdir(parents=True)
  (folder / "b.txt").write_text("bee", encoding="utf-8")
  (folder / "a.txt").write_text("ay", encoding="utf-8")
  (folder / "sub" / "c.txt").write_text("sea", encoding="utf-8")
  (folder / "notes.md").write_text("ignored", encoding="utf-8")
  f = wl.text_file(tok, folder)
  assert [tok.decode(d) for d in f.documents] == ["ay", "bee", "sea"]
  assert f.source_sha256 == wl.texts_sha256(["a.txt", b"ay", "b.txt", b"bee", "sub/c.txt", b"sea"])


def test_text_file_errors(tok, tmp_path):
  with pytest.raises(ValueError, match="cannot read .*nope.txt"):
    wl.text_file(tok, tmp_path / "nope.txt")
  (tmp_path / "blank.txt").write_text(" \n\n", encoding="utf-8")
  with pytest.raises(ValueError, match="blank.txt is empty"):
    wl.text_file(tok, tmp_path / "blank.txt")
  (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
  with pytest.raises(ValueError, match="bin.txt is not UTF-8"):
    wl.text_file(tok, tmp_path / "bin.txt")
  (tmp_path / "none").mkdir()
  with pytest.raises(ValueError, match="none has no .txt files"):
    wl.text_file(tok, tmp_path / "none")


# ----------------------------------------------------------------------------- load


def test_load_rebuilds_every_workload_from_its_name(tok, tmp_path):
  (tmp_path / "t.txt").write_text("Some user text.\n\nMore.", encoding="utf-8")
  (tmp_path / "d.jsonl").write_text('{"text": "a b c d e f"}\n', encoding="utf-8")

  def respond(prompts):
    return [[7, 8]] * len(prompts)

  built = [wl.prose(tok, num_tokens=3000, seed=2), wl.code(tok, num_tokens=3000),
           wl.chat(tok, respond, num_questions=3, seed=1),
           wl.passkey(tok, length=700, depth=0.25), wl.passkey(tok, length=700, depth=1),
           wl.repeat(tok, num_tokens=64, phrase='Say "hi", twice=yes'),
           wl.random_tokens(tok.vocab_size, num_tokens=100, seed=3),
           wl.text_file(tok, tmp_path / "t.txt", num_tokens=3, paragraphs=True),
           wl.jsonl(tok, tmp_path / "d.jsonl", num_tokens=2)]
  for w in built:
    again = wl.load(w.name, tok, respond=respond)
    assert (again.name, again.token_sha256, again.source_sha256, again.answers) == (
        w.name, w.token_sha256, w.source_sha256, w.answers), w.name


def test_load_parsing(tok, tmp_path, monkeypatch):
  assert wl.WORKLOADS == ("prose", "code", "chat", "passkey", "repeat", "random")
  p = wl.load("passkey:length=600, depth=0.5,seed=3", tok)
  assert p.name == "passkey:length=600,depth=0.5,seed=3" and len(p.documents[0]) == 600
  assert wl.load("passkey:length=600,depth=0.5", tok, seed=3).token_sha256 == p.token_sha256
  r = wl.load("random", tok, seed=1)
  assert r.name == f"random:vocab_size={tok.vocab_size},num_tokens=8192,seed=1"
  assert wl.load("repeat", tok, num_tokens=10).documents[0].tolist() == [tok.encode(" the")[0]] * 10
  assert wl.load("prose:num_tokens=100", tok, num_tokens=100).num_tokens == 100
  (tmp_path / "x.txt").write_text("hello", encoding="utf-8")
  (tmp_path / "y.jsonl").write_text('{"text": "hello"}', encoding="utf-8")
  monkeypatch.chdir(tmp_path)
  for spec, name in (("x.txt", "file:"), ("file:x.txt", "file:"), ("y.jsonl", "jsonl:"),
                     ("jsonl:y.jsonl", "jsonl:")):
    w = wl.load(spec, tok, seed=5)
    assert w.name == name + str(tmp_path / spec.split(":")[-1]) and w.seed == 0
    assert w.documents[0].tolist() == tok.encode("hello")


@pytest.mark.parametrize("spec, kwargs, message", [
    ("poetry", {}, "unknown workload 'poetry'; known: prose, code, chat, passkey, repeat, random"),
    ("", {}, "non-empty"),
    ("prose:colour=red", {}, "unknown option 'colour' for 'prose'; known: num_tokens, seed"),
    ("prose:num_tokens=lots", {}, "num_tokens='lots' is not a valid int"),
    ("prose:seed=1,seed=1", {}, "given twice"),
    ("prose:num_tokens", {}, "cannot parse options"),
    ("passkey:length=600", {}, "lacks depth"),
    ("passkey:length=600,depth=0.5", {"num_tokens": 5}, "does not take num_tokens"),
    ("chat", {}, "needs respond="),
    ("prose:num_tokens=100", {"num_tokens": 200}, "says num_tokens=100 but num_tokens=200"),
    ("prose:seed=1", {"seed": 2}, "says seed=1 but seed=2"),
    ("file:", {}, "names no path"),
    ("file:/no/such/file.txt", {}, "cannot read /no/such/file.txt"),
    ("/no/such/data.jsonl", {}, "cannot read /no/such/data.jsonl"),
    ("file:/no/such.txt?paragraphs=maybe", {}, "paragraphs='maybe' is not a valid bool"),
    ("prose:num_tokens=-1", {}, "option num_tokens=-1 must be >= 1"),
    ("passkey:length=0,depth=0.5", {}, "option length=0 must be >= 1"),
    ("passkey:length=600,depth=nan", {}, "option depth=nan must be finite"),
    ("random:seed=-2", {}, "option seed=-2 must be >= 0"),
])
def test_load_errors(tok, spec, kwargs, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    wl.load(spec, tok, **kwargs)
