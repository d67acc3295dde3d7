"""Named, reproducible token workloads for calibrating and evaluating quantized KV caches.

A `Workload` is a tuple of documents (int32 token ids) with a canonical `name` that rebuilds
it through `load`, and two hashes that pin exactly what was used:

  * `token_sha256`: sha256 over the token ids. For each document in order: its length as
    an 8-byte little-endian unsigned integer, then its ids as 4-byte little-endian signed
    integers (`tokens_sha256`). Any changed, added, removed or moved token changes it.
  * `source_sha256`: sha256 of the text that was tokenized. For a single user file it is
    the file's bytes (what `sha256sum` prints); otherwise the documents' UTF-8 texts are
    length-prefixed the same way (`texts_sha256`). Each builder says what its source is.

Record `disclosure()` wherever a workload is used (calibration artifacts, reports).

Built-in workloads (`WORKLOADS`), each deterministic for a seed:

  prose    English docstrings of a fixed list of standard-library modules (~64k tokens
           with SmolLM2's tokenizer on Python 3.11.7).
  code     source files of a fixed list of standard-library modules (~111k tokens).
  chat     the model's chat template around `CHAT_QUESTIONS`, plus the model's own answers
           (from a `respond` callable the caller passes).
  passkey  a five-digit key hidden at a relative depth of filler text, then a question.
  repeat   one token (or a phrase) repeated: a known trigger of attention sinks and
           massive activations.
  random   uniform token ids.

User data: `text_file` (a .txt file or a folder of them) and `jsonl`.

The standard library's text differs between Python versions (and `prose` also depends on
which classes and functions exist), so `prose` and `code` give other tokens, and other
hashes, on another Python; their descriptions name the Python version and the hashes record
exactly which text was used. `random` uses numpy's `Generator.integers`, whose stream numpy
does not promise to keep across versions; `token_sha256` pins it too.

This module only duck-types the tokenizer: `encode(text) -> list[int]`,
`decode(ids) -> str`, `encode_chat(messages, add_generation_prompt=...) -> list[int]`,
`vocab_size: int`, `bos_id: int | None` (e.g. `kvtpu.models.tokenizer.Tokenizer`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

__all__ = [
    "CHAT_QUESTIONS", "CODE_MODULES", "PASSKEY_FILLER", "PASSKEY_INTRO", "PASSKEY_NEEDLE",
    "PASSKEY_QUESTION", "PROSE_MODULES", "REPEAT_DEFAULT_TEXT", "WORKLOADS", "Respond",
    "TokenizerLike", "Workload", "chat", "chat_prompts", "code", "jsonl", "load", "passkey", "prose",
    "random_tokens", "repeat", "text_file", "texts_sha256", "tokens_sha256",
]


class TokenizerLike(Protocol):
  """What the builders use of a tokenizer (`kvtpu.models.tokenizer.Tokenizer` has it)."""

  vocab_size: int
  bos_id: int | None

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...

  def encode_chat(self, messages: Sequence[Mapping[str, Any]], *,
                  add_generation_prompt: bool = True) -> list[int]: ...


# A callable that answers chat prompts: token ids per prompt -> answer ids per prompt.
Respond = Callable[[list[list[int]]], Sequence[Sequence[int]]]


# ------------------------------------------------------------------------------- hashing


def tokens_sha256(documents: Sequence[np.ndarray | Sequence[int]]) -> str:
  """sha256 over token ids with document boundaries.

  For each document in order: its length as 8-byte little-endian unsigned, then its ids as
  4-byte little-endian signed integers.
  """
  h = hashlib.sha256()
  for doc in documents:
    ids = np.asarray(doc, dtype="<i4")
    h.update(len(ids).to_bytes(8, "little"))
    h.update(ids.tobytes())
  return h.hexdigest()


def texts_sha256(texts: Sequence[str | bytes]) -> str:
  """sha256 over texts: for each, its UTF-8 byte length (8-byte little-endian), then the bytes."""
  h = hashlib.sha256()
  for text in texts:
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)
  return h.hexdigest()


# ------------------------------------------------------------------------------- Workload


@dataclasses.dataclass(frozen=True, eq=False)
class Workload:
  """A named token stream: documents of int32 ids, with hashes of the tokens and the text.

  Invariants (checked on construction): at least one document; each a non-empty 1-D
  read-only int32 array of non-negative ids; `token_sha256 == tokens_sha256(documents)`;
  `answers` is empty or has one entry per document. Compare workloads by `token_sha256`
  (equality is identity: the fields hold arrays).

  Attributes:
    name: the canonical spec that rebuilds it with `load`, e.g. "prose",
      "passkey:length=2048,depth=0.5", "file:/abs/path.txt".
    description: one line for reports.
    documents: the token ids of each document, int32 [S_d] each.
    source_sha256: sha256 of the source text (each builder says what that is).
    token_sha256: `tokens_sha256(documents)`.
    answers: per document, the expected answer (passkey: the key); empty otherwise.
    seed: the seed it was built with.
  """

  name: str
  description: str
  documents: tuple[np.ndarray, ...]
  source_sha256: str
  token_sha256: str
  answers: tuple[str, ...] = ()
  seed: int = 0

  def __post_init__(self):
    if not self.documents:
      raise ValueError(f"workload {self.name!r} has no documents")
    docs = []
    for i, doc in enumerate(self.documents):
      ids = np.asarray(doc)
      if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"workload {self.name!r}: document {i} must be a non-empty 1-D array "
                         f"of token ids, got shape {ids.shape}")
      if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"workload {self.name!r}: document {i} has dtype {ids.dtype}, not an "
                         "integer type")
      if ids.min() < 0 or ids.max() > np.iinfo(np.int32).max:
        raise ValueError(f"workload {self.name!r}: document {i} has ids outside "
                         f"[0, 2**31): min={ids.min()}, max={ids.max()}")
      ids = np.array(ids, dtype=np.int32)  # A private copy, then frozen.
      ids.setflags(write=False)
      docs.append(ids)
    object.__setattr__(self, "documents", tuple(docs))
    object.__setattr__(self, "answers", tuple(str(a) for a in self.answers))
    if self.answers and len(self.answers) != len(docs):
      raise ValueError(f"workload {self.name!r}: {len(self.answers)} answers for {len(docs)} "
                       "documents (want one per document, or none)")
    for field in ("source_sha256", "token_sha256"):
      if not re.fullmatch(r"[0-9a-f]{64}", getattr(self, field)):
        raise ValueError(f"workload {self.name!r}: {field}={getattr(self, field)!r} is not a "
                         "sha256 hex digest")
    expected = tokens_sha256(docs)
    if self.token_sha256 != expected:
      raise ValueError(f"workload {self.name!r}: token_sha256={self.token_sha256} does not match "
                       f"its documents ({expected})")

  @classmethod
  def from_documents(cls, name: str, description: str,
                     documents: Sequence[np.ndarray | Sequence[int]], source_sha256: str, *,
                     answers: Sequence[str] = (), seed: int = 0) -> Workload:
    """A workload whose `token_sha256` is computed from `documents`."""
    docs = tuple(np.asarray(d) for d in documents)
    return cls(name=name, description=description, documents=docs,
               source_sha256=source_sha256, token_sha256=tokens_sha256(docs),
               answers=tuple(answers), seed=seed)

  @property
  def num_tokens(self) -> int:
    """Total tokens over all documents."""
    return sum(len(d) for d in self.documents)

  def disclosure(self) -> dict[str, Any]:
    """What to record wherever the workload is used: name, description, counts, hashes, seed."""
    return {"name": self.name, "description": self.description, "num_tokens": self.num_tokens,
            "num_documents": len(self.documents), "token_sha256": self.token_sha256,
            "source_sha256": self.source_sha256, "seed": self.seed}

  def stream(self, *, separator: int | None = None) -> np.ndarray:
    """The documents concatenated in order, int32 [num_tokens (+ separators)].

    Args:
      separator: a token id put between consecutive documents (e.g. BOS or EOS), or None.
    """
    parts: list[np.ndarray] = []
    for i, doc in enumerate(self.documents):
      if i and separator is not None:
        parts.append(np.array([separator], dtype=np.int32))
      parts.append(doc)
    return np.concatenate(parts)

  def num_batches(self, seq_len: int, *, batch: int, num_tokens: int | None = None,
                  separator: int | None = None) -> int:
    """How many batches `windows` yields with these arguments (see there; same errors)."""
    available = self.num_tokens + (0 if separator is None else len(self.documents) - 1)
    for arg, value in (("seq_len", seq_len), ("batch", batch)):
      _check_positive_int(arg, value)
    if separator is not None:
      _check_nonnegative_int("separator", separator)
    if num_tokens is None:
      num_tokens = available
    else:
      _check_positive_int("num_tokens", num_tokens)
      if num_tokens > available:
        raise ValueError(f"workload {self.name!r} has {available} tokens, fewer than "
                         f"num_tokens={num_tokens}")
    count = num_tokens // (seq_len * batch)
    if count == 0:
      raise ValueError(f"workload {self.name!r}: num_tokens={num_tokens} (of {available} "
                       f"available) is fewer than one batch of seq_len={seq_len} x "
                       f"batch={batch} = {seq_len * batch} tokens")
    return count

  def windows(self, seq_len: int, *, batch: int, num_tokens: int | None = None,
              separator: int | None = None) -> Iterator[np.ndarray]:
    """Batches of consecutive windows of the token stream, in order, without cycling.

    The stream is the documents concatenated (`stream(separator=...)`). Batch `i` holds
    tokens `[i * batch * seq_len, (i + 1) * batch * seq_len)` of the stream, row `r` being
    window `i * batch + r`. Only whole batches are yielded: `num_tokens` (default: the
    whole stream) is rounded down to a multiple of `batch * seq_len`, and the rest of the
    stream is left out. Deterministic; arguments are checked when this is called, not when
    the first batch is drawn.

    Args:
      seq_len: tokens per window (T).
      batch: windows per batch (B).
      num_tokens: use the first `num_tokens` tokens of the stream (rounded down to whole
        batches); None: the whole stream.
      separator: a token id put between consecutive documents, or None.

    Returns:
      An iterator of int32 [B, T] arrays (fresh, writable copies).

    Raises:
      ValueError: `num_tokens` exceeds the stream, or is fewer than one batch
        (`batch * seq_len`); a non-positive `seq_len`, `batch` or `num_tokens`.
    """
    count = self.num_batches(seq_len, batch=batch, num_tokens=num_tokens, separator=separator)
    tokens = self.stream(separator=separator)[:count * batch * seq_len].reshape(
        count, batch, seq_len)

    def generate() -> Iterator[np.ndarray]:
      for i in range(count):
        yield tokens[i].copy()

    return generate()


def _check_positive_int(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
    raise ValueError(f"{name}={value!r} must be a positive integer")


def _check_nonnegative_int(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
    raise ValueError(f"{name}={value!r} must be a non-negative integer")


# ------------------------------------------------------------------------------- helpers


def _spec(kind: str, options: Sequence[tuple[str, Any, Any]]) -> str:
  """The canonical name "kind:k=v,..." of the options that differ from their defaults."""
  parts = [f"{key}={_format_value(value)}" for key, value, default in options
           if value != default]
  return f"{kind}:{','.join(parts)}" if parts else kind


def _format_value(value: Any) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, str):
    return json.dumps(value, ensure_ascii=False)
  return repr(value)


def _python() -> str:
  return f"Python {sys.version.split()[0]}"


def _encode(tokenizer: TokenizerLike, text: str) -> np.ndarray:
  return np.asarray(tokenizer.encode(text), dtype=np.int32).reshape(-1)


def _take(documents: Sequence[np.ndarray], num_tokens: int | None,
          what: str) -> list[np.ndarray]:
  """The first `num_tokens` tokens of the documents in order (the last one cut)."""
  docs = [d for d in documents if len(d)]
  if num_tokens is None:
    return docs
  _check_positive_int("num_tokens", num_tokens)
  available = sum(len(d) for d in docs)
  if num_tokens > available:
    raise ValueError(f"{what} has {available} tokens, fewer than num_tokens={num_tokens}")
  out, left = [], num_tokens
  for doc in docs:
    if left == 0:
      break
    out.append(doc[:left])
    left -= len(out[-1])
  return out


def _permutation(n: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).permutation(n)


def _check_seed(seed: Any) -> int:
  _check_nonnegative_int("seed", seed)
  return int(seed)


# ------------------------------------------------------------------------------- prose, code

# Fixed, sorted lists: changing them changes the workloads (and their hashes) on purpose.
PROSE_MODULES: tuple[str, ...] = (
    "abc", "argparse", "base64", "bisect", "calendar", "collections", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "email.message", "enum", "fractions", "ftplib", "functools", "getopt", "gettext", "glob",
    "gzip", "hashlib", "heapq", "hmac", "http.client", "http.server", "imaplib", "inspect",
    "ipaddress", "json", "logging", "mailbox", "numbers", "optparse", "os", "pathlib",
    "pickle", "pprint", "queue", "random", "re", "sched", "secrets", "shlex", "shutil",
    "smtplib", "socket", "statistics", "string", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "traceback", "typing", "unittest.case",
    "urllib.parse", "uuid", "warnings", "weakref", "zipfile",
)
CODE_MODULES: tuple[str, ...] = (
    "bisect", "calendar", "colorsys", "contextlib", "copy", "csv", "dataclasses", "fnmatch",
    "fractions", "functools", "glob", "graphlib", "heapq", "json.decoder", "json.encoder",
    "numbers", "pprint", "queue", "sched", "shlex", "statistics", "string", "textwrap",
)
_MIN_PARAGRAPH_WORDS = 8
_MIN_LETTER_FRACTION = 0.85


def _docstrings(module: Any) -> list[str]:
  """Docstrings of a module and of the public classes, methods and functions it defines."""
  found = [module.__doc__]
  for name, obj in sorted(vars(module).items()):
    if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
      continue
    if inspect.isclass(obj):
      found.append(obj.__doc__)
      for member_name, member in sorted(vars(obj).items()):
        if member_name.startswith("_"):
          continue
        if isinstance(member, staticmethod | classmethod):
          member = member.__func__
        elif isinstance(member, property):
          member = member.fget
        if callable(member):
          found.append(getattr(member, "__doc__", None))
    elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
      found.append(obj.__doc__)
  return [inspect.cleandoc(d) for d in found if isinstance(d, str) and d.strip()]


def _prose_paragraphs(docstring: str) -> Iterator[str]:
  """The prose paragraphs of a docstring, each reflowed onto one line.

  Dropped: paragraphs with doctest lines (`>>>`), indented lines (code, argument tables),
  fewer than `_MIN_PARAGRAPH_WORDS` words, or mostly non-letters (signatures, formulas).
  """
  for paragraph in re.split(r"\n\s*\n", docstring):
    lines = paragraph.strip("\n").splitlines()
    if not lines or ">>>" in paragraph or any(line[:1].isspace() for line in lines):
      continue
    text = " ".join(line.strip() for line in lines)
    letters = sum(c.isalpha() or c.isspace() for c in text)
    if len(text.split()) >= _MIN_PARAGRAPH_WORDS and letters >= _MIN_LETTER_FRACTION * len(text):
      yield text


def prose(tokenizer: TokenizerLike, *, num_tokens: int | None = None, seed: int = 0) -> Workload:
  """English prose: docstrings of the standard-library modules in `PROSE_MODULES`.

  One document per module: the module's docstring, then those of its public classes (with
  their methods) and functions in name order, cut into paragraphs of which only prose is
  kept (see `_prose_paragraphs`; a paragraph seen in an earlier module is dropped), joined
  by blank lines. Documents are shuffled by `seed`. Modules that fail to import are left
  out (the description counts those used).

  Args:
    tokenizer: encodes each document.
    num_tokens: keep the first `num_tokens` tokens (the last document cut); None: all.
    seed: shuffles the documents.

  Returns:
    The workload; `source_sha256` is `texts_sha256` of all documents' texts in the shuffled
    order (also when `num_tokens` cuts them). The text depends on the Python version.

  Raises:
    ValueError: `num_tokens` exceeds the text, or the modules give no prose.
  """
  seed = _check_seed(seed)
  seen: set[str] = set()
  texts = []
  with warnings.catch_warnings():  # e.g. typing.io's deprecation when its __doc__ is read.
    warnings.simplefilter("ignore")
    for name in PROSE_MODULES:
      try:
        module = importlib.import_module(name)
      except ImportError:
        continue
      paragraphs = []
      for docstring in _docstrings(module):
        for paragraph in _prose_paragraphs(docstring):
          if paragraph not in seen:
            seen.add(paragraph)
            paragraphs.append(paragraph)
      if paragraphs:
        texts.append("\n\n".join(paragraphs))
  if not texts:
    raise ValueError(f"prose: no docstrings found in the modules PROSE_MODULES={PROSE_MODULES}")
  texts = [texts[i] for i in _permutation(len(texts), seed)]
  docs = _take([_encode(tokenizer, t) for t in texts], num_tokens, "prose")
  return Workload.from_documents(
      _spec("prose", [("num_tokens", num_tokens, None), ("seed", seed, 0)]),
      f"English prose: docstrings of {len(texts)} {_python()} standard-library modules, "
      f"shuffled (seed {seed})", docs, texts_sha256(texts), seed=seed)


def _module_source(name: str) -> tuple[Path, str]:
  spec = importlib.util.find_spec(name)
  origin = spec.origin if spec is not None else None
  if origin is None or not origin.endswith(".py"):  # e.g. a frozen module.
    origin = inspect.getsourcefile(importlib.import_module(name))
  if origin is None:
    raise ValueError(f"code: no source file for the standard-library module {name!r}")
  path = Path(origin)
  try:
    return path, path.read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"code: cannot read {path} (module {name!r}): {e}") from e


def code(tokenizer: TokenizerLike, *, num_tokens: int | None = None, seed: int = 0) -> Workload:
  """Python source: the files of the standard-library modules in `CODE_MODULES`.

  One document per file, as read (UTF-8), shuffled by `seed`.

  Args:
    tokenizer: encodes each file.
    num_tokens: keep the first `num_tokens` tokens (the last document cut); None: all.
    seed: shuffles the files.

  Returns:
    The workload; `source_sha256` is `texts_sha256` of all files' texts in the shuffled
    order. The files differ between Python versions.

  Raises:
    ValueError: a module has no readable source file; `num_tokens` exceeds the text.
  """
  seed = _check_seed(seed)
  texts = [_module_source(name)[1] for name in CODE_MODULES]
  texts = [texts[i] for i in _permutation(len(texts), seed)]
  docs = _take([_encode(tokenizer, t) for t in texts], num_tokens, "code")
  return Workload.from_documents(
      _spec("code", [("num_tokens", num_tokens, None), ("seed", seed, 0)]),
      f"Python source: {len(texts)} {_python()} standard-library modules, shuffled "
      f"(seed {seed})", docs, texts_sha256(texts), seed=seed)


# ------------------------------------------------------------------------------- chat

CHAT_QUESTIONS: tuple[str, ...] = (
    "Why is the sky blue?",
    "Explain how a refrigerator keeps food cold.",
    "What is the difference between weather and climate?",
    "How do vaccines train the immune system?",
    "What causes the seasons on Earth?",
    "Describe the water cycle in a few sentences.",
    "What is photosynthesis and why does it matter?",
    "How does a binary search work? Give a short example.",
    "Write a Python function that checks whether a string is a palindrome.",
    "What is the difference between a list and a tuple in Python?",
    "Explain recursion to a beginner programmer.",
    "What does a compiler do?",
    "How does public-key cryptography let two strangers communicate securely?",
    "What is 17 multiplied by 23? Show your steps.",
    "If a train travels 180 kilometers in 2 hours, what is its average speed?",
    "Explain what a prime number is and list the first five.",
    "What is the Pythagorean theorem?",
    "Who was Marie Curie and what is she known for?",
    "Why did the Roman Empire fall? Give a few reasons.",
    "What was the Industrial Revolution?",
    "Summarize the plot of Romeo and Juliet in three sentences.",
    "Write a short poem about autumn leaves.",
    "Write a haiku about the ocean.",
    "Tell me a short story about a robot who learns to paint.",
    "Suggest a name for a bakery that specializes in bread.",
    "How can I improve my sleep?",
    "Give me three tips for learning a new language.",
    "How should I prepare for a job interview?",
    "What are some healthy breakfast ideas?",
    "How do I make a simple tomato sauce?",
    "What is the capital of Australia, and why is it not Sydney?",
    "Name the planets of the solar system in order from the Sun.",
    "What is the tallest mountain in the world and where is it?",
    "Translate 'Good morning, how are you?' into French and Spanish.",
    "What is the difference between 'affect' and 'effect'?",
    "Explain supply and demand with an everyday example.",
    "What is inflation and how does it affect savings?",
    "Is it better to rent or to buy a home? Give arguments for both.",
    "What are the pros and cons of working from home?",
    "Write a polite email declining a meeting invitation.",
)


def chat_prompts(tokenizer: TokenizerLike, *, num_questions: int | None = None,
                 seed: int = 0) -> tuple[list[str], list[list[int]]]:
  """`(questions, prompts)`: `CHAT_QUESTIONS` shuffled by `seed`, the first
  `num_questions` (None: all), each one user turn rendered with
  `tokenizer.encode_chat(..., add_generation_prompt=True)` (the template's default system
  prompt, if any, included): what `chat` asks, and the chat serving trace's prompts.

  Raises:
    ValueError: `num_questions` not in [1, len(CHAT_QUESTIONS)], or a bad seed.
  """
  seed = _check_seed(seed)
  n = len(CHAT_QUESTIONS)
  if num_questions is not None:
    _check_positive_int("num_questions", num_questions)
    if num_questions > n:
      raise ValueError(f"num_questions={num_questions} exceeds the {n} CHAT_QUESTIONS")
  questions = [CHAT_QUESTIONS[i] for i in _permutation(n, seed)][:num_questions]
  prompts = [[int(i) for i in tokenizer.encode_chat([{"role": "user", "content": q}],
                                                    add_generation_prompt=True)]
             for q in questions]
  return questions, prompts


def chat(tokenizer: TokenizerLike, respond: Respond, *, num_questions: int | None = None,
         seed: int = 0) -> Workload:
  """Chat: the model's template around `CHAT_QUESTIONS`, followed by the model's answers.

  The questions are shuffled by `seed` and the first `num_questions` kept. Each is one user
  turn rendered with `tokenizer.encode_chat(..., add_generation_prompt=True)` (the template's
  default system prompt, if any, included); `respond` is called once with all the prompts
  and returns each answer's ids (e.g. greedy `kvtpu.models.generation.generate`, with or without
  the stop token; the ids are used as returned). Document `i` = prompt `i` + answer `i`.

  Args:
    tokenizer: renders the prompts and decodes the answers (for `source_sha256`).
    respond: prompts' ids (a list of lists of ints) -> answers' ids, one per prompt.
    num_questions: how many questions, 1 to `len(CHAT_QUESTIONS)`; None: all.
    seed: shuffles the questions.

  Returns:
    The workload. `source_sha256` is `texts_sha256` over, per document, the JSON of the
    conversation with the decoded answer as the assistant turn. The answers depend on the
    model behind `respond`, which the name does not record: `token_sha256` pins them.

  Raises:
    ValueError: bad `num_questions`; `respond` returns the wrong number of answers or ids
      outside the vocabulary.
  """
  seed = _check_seed(seed)
  questions, prompts = chat_prompts(tokenizer, num_questions=num_questions, seed=seed)
  conversations = [[{"role": "user", "content": q}] for q in questions]
  answers = list(respond([list(p) for p in prompts]))
  if len(answers) != len(prompts):
    raise ValueError(f"chat: respond returned {len(answers)} answers for {len(prompts)} prompts")
  docs, texts = [], []
  for i, (conversation, prompt, answer) in enumerate(zip(conversations, prompts, answers,
                                                         strict=True)):
    answer_ids = np.asarray(answer, dtype=np.int64).reshape(-1)
    if answer_ids.size and (answer_ids.min() < 0 or answer_ids.max() >= tokenizer.vocab_size):
      raise ValueError(f"chat: respond's answer {i} has ids outside [0, vocab_size="
                       f"{tokenizer.vocab_size})")
    docs.append(np.concatenate([np.asarray(prompt, np.int32), answer_ids.astype(np.int32)]))
    reply = {"role": "assistant", "content": tokenizer.decode(answer_ids.tolist())}
    texts.append(json.dumps([*conversation, reply], ensure_ascii=False))
  return Workload.from_documents(
      _spec("chat", [("num_questions", num_questions, None), ("seed", seed, 0)]),
      f"chat: {len(docs)} questions in the model's chat template with the model's own "
      f"answers (seed {seed})", docs, texts_sha256(texts), seed=seed)


# ------------------------------------------------------------------------------- passkey

PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of "
                 "irrelevant text. Find it and memorize it. I will quiz you about it.")
PASSKEY_FILLER = (" The grass is green. The sky is blue. The sun is yellow. Here we go. "
                  "There and back again.")
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"


def passkey(tokenizer: TokenizerLike, *, length: int, depth: float, seed: int = 0,
            num_samples: int = 1) -> Workload:
  """Passkey retrieval: a five-digit key hidden in filler text, then a question about it.

  Each document is exactly `length` tokens: the ids of `PASSKEY_INTRO`, filler, the
  needle (`PASSKEY_NEEDLE` with the key), more filler, and `PASSKEY_QUESTION`, each piece
  encoded on its own and the ids concatenated. The filler is the ids of `PASSKEY_FILLER`
  repeated and cut to fit (so it may stop mid-sentence); `round(depth * F)` of its `F`
  tokens come before the needle, so `depth` is the needle's relative position within the
  filler (0: right after the intro, 1: right before the question). If `encode` adds BOS,
  only the document's first piece keeps it.

  Args:
    tokenizer: encodes the pieces.
    length: tokens per document; at least the intro, needle and question.
    depth: in [0, 1].
    seed: draws the keys (uniform in [10000, 99999], one per sample).
    num_samples: documents (each with its own key).

  Returns:
    The workload; `answers` are the keys as strings; `source_sha256` is `texts_sha256` of
    the decoded documents.

  Raises:
    ValueError: `length` too small for the fixed pieces, `depth` outside [0, 1], bad
      `num_samples` or `seed`.
  """
  seed = _check_seed(seed)
  _check_positive_int("length", length)
  _check_positive_int("num_samples", num_samples)
  if isinstance(depth, bool) or not isinstance(depth, int | float) or not 0 <= depth <= 1:
    raise ValueError(f"depth={depth!r} must be a number in [0, 1]")
  depth = float(depth)
  bos = tokenizer.bos_id

  def piece(text: str) -> np.ndarray:
    ids = _encode(tokenizer, text)
    return ids[1:] if bos is not None and len(ids) and ids[0] == bos else ids

  intro = _encode(tokenizer, PASSKEY_INTRO)  # Keeps a BOS that `encode` adds.
  filler_unit = piece(PASSKEY_FILLER)
  question = piece(PASSKEY_QUESTION)
  keys = np.random.default_rng(seed).integers(10000, 100000, size=num_samples)
  docs, answers = [], []
  for key in keys:
    needle = piece(PASSKEY_NEEDLE.format(key=int(key)))
    fixed = len(intro) + len(needle) + len(question)
    if length < fixed:
      raise ValueError(f"passkey: length={length} is too small: the intro, needle and question "
                       f"alone take {fixed} tokens")
    num_filler = length - fixed
    filler = np.tile(filler_unit, -(-num_filler // len(filler_unit)))[:num_filler]
    before = round(depth * num_filler)
    docs.append(np.concatenate([intro, filler[:before], needle, filler[before:], question]))
    answers.append(str(int(key)))
  texts = [tokenizer.decode(d.tolist()) for d in docs]
  return Workload.from_documents(
      _spec("passkey", [("length", length, None), ("depth", depth, None),
                        ("num_samples", num_samples, 1), ("seed", seed, 0)]),
      f"passkey retrieval: {num_samples} x {length} tokens, a five-digit key at depth {depth:g} "
      f"of the filler (seed {seed})", docs, texts_sha256(texts), answers=answers, seed=seed)


# ------------------------------------------------------------------------------- synthetic

REPEAT_DEFAULT_TEXT = " the"


def repeat(tokenizer: TokenizerLike, *, num_tokens: int, phrase: str | None = None,
           seed: int = 0) -> Workload:
  """One document of `num_tokens` tokens: a phrase's ids repeated (cut to fit).

  Long runs of one token are a known trigger of attention sinks and massive activations.

  Args:
    tokenizer: encodes the phrase (a leading BOS, if `encode` adds one, is dropped).
    num_tokens: the document's length.
    phrase: the text repeated; None: `REPEAT_DEFAULT_TEXT` (" the", one token with
      SmolLM2's tokenizer).
    seed: recorded only: the stream does not depend on it.

  Returns:
    The workload; `source_sha256` is `texts_sha256([phrase])`.

  Raises:
    ValueError: bad `num_tokens`; a phrase that encodes to no tokens.
  """
  seed = _check_seed(seed)
  _check_positive_int("num_tokens", num_tokens)
  text = REPEAT_DEFAULT_TEXT if phrase is None else phrase
  ids = _encode(tokenizer, text)
  if tokenizer.bos_id is not None and len(ids) > 1 and ids[0] == tokenizer.bos_id:
    ids = ids[1:]
  if len(ids) == 0:
    raise ValueError(f"repeat: phrase={text!r} encodes to no tokens")
  doc = np.tile(ids, -(-num_tokens // len(ids)))[:num_tokens]
  return Workload.from_documents(
      _spec("repeat", [("num_tokens", num_tokens, None), ("phrase", phrase, None),
                       ("seed", seed, 0)]),
      f"repeat: {text!r} ({len(ids)} token{'s' if len(ids) > 1 else ''}) repeated to "
      f"{num_tokens} tokens", [doc], texts_sha256([text]), seed=seed)


def random_tokens(vocab_size: int, *, num_tokens: int, seed: int = 0) -> Workload:
  """One document of `num_tokens` ids drawn uniformly from [0, vocab_size) (special ids too).

  Drawn as `numpy.random.default_rng(seed).integers(0, vocab_size, num_tokens)`.

  Returns:
    The workload; `source_sha256` is the sha256 of that expression's text (there is no
    source text).

  Raises:
    ValueError: bad `vocab_size`, `num_tokens` or `seed`.
  """
  seed = _check_seed(seed)
  _check_positive_int("vocab_size", vocab_size)
  _check_positive_int("num_tokens", num_tokens)
  recipe = f"numpy.random.default_rng({seed}).integers(0, {vocab_size}, {num_tokens})"
  ids = np.random.default_rng(seed).integers(0, vocab_size, num_tokens).astype(np.int32)
  return Workload.from_documents(
      _spec("random", [("vocab_size", vocab_size, None), ("num_tokens", num_tokens, None),
                       ("seed", seed, 0)]),
      f"random: {num_tokens} uniform token ids in [0, {vocab_size}) (seed {seed})", [ids],
      texts_sha256([recipe]), seed=seed)


# ------------------------------------------------------------------------------- user data


def _read_text(path: Path) -> tuple[bytes, str]:
  """A file's bytes and their UTF-8 text (a leading byte-order mark dropped)."""
  try:
    data = path.read_bytes()
  except OSError as e:
    raise ValueError(f"cannot read {path}: {e}") from e
  try:
    return data, data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise ValueError(f"{path} is not UTF-8 text: {e}") from e


def _file_spec(kind: str, path: Path, options: Sequence[tuple[str, Any, Any]]) -> str:
  suffix = _spec("", options)[1:]  # ":k=v,..." without the kind, or "".
  return f"{kind}:{path}" + (f"?{suffix}" if suffix else "")


def text_file(tokenizer: TokenizerLike, path: str | Path, *, num_tokens: int | None = None,
              paragraphs: bool = False) -> Workload:
  """Plain UTF-8 text from a file, or from every `*.txt` file under a folder.

  Args:
    tokenizer: encodes each document.
    path: a text file (any name), or a folder: its `*.txt` files, recursively, in sorted
      order of their relative paths.
    num_tokens: keep the first `num_tokens` tokens (the last document cut); None: all.
    paragraphs: one document per blank-line-separated paragraph instead of one per file.

  Returns:
    The workload, named "file:<absolute path>". `source_sha256` is the sha256 of the file's
    bytes (as `sha256sum` prints it); for a folder, `texts_sha256` over each file's
    relative path (POSIX) followed by its bytes.

  Raises:
    ValueError: the path is missing or unreadable, not UTF-8, a folder without `.txt`
      files, or a file with only whitespace; `num_tokens` exceeds the text.
  """
  path = Path(path).expanduser().absolute()
  if path.is_dir():
    files = sorted(path.rglob("*.txt"), key=lambda p: p.relative_to(path).as_posix())
    files = [f for f in files if f.is_file()]
    if not files:
      raise ValueError(f"the folder {path} has no .txt files")
  elif path.exists():
    files = [path]
  else:
    raise ValueError(f"cannot read {path}: no such file or folder")
  texts: list[str] = []
  source: list[str | bytes] = []
  for file in files:
    data, text = _read_text(file)
    if not text.strip():
      raise ValueError(f"{file} is empty (no text besides whitespace)")
    if paragraphs:
      texts.extend(p for p in re.split(r"\n\s*\n", text) if p.strip())
    else:
      texts.append(text)
    source.extend([file.relative_to(path).as_posix() if path.is_dir() else "", data])
  sha = texts_sha256(source) if path.is_dir() else hashlib.sha256(source[1]).hexdigest()
  docs = _take([_encode(tokenizer, t) for t in texts], num_tokens, f"file {path}")
  if not docs:
    raise ValueError(f"{path}: the text encodes to no tokens")
  what = f"{len(files)} .txt files under {path.name}/" if path.is_dir() else path.name
  unit = "paragraphs" if paragraphs else "documents"
  return Workload.from_documents(
      _file_spec("file", path, [("num_tokens", num_tokens, None),
                                ("paragraphs", paragraphs, False)]),
      f"user text: {what} ({len(docs)} {unit})", docs, sha)


def _record_text(tokenizer: TokenizerLike, record: Any, where: str) -> np.ndarray:
  """The ids of one JSONL record ({"text"}, {"prompt"[, "completion"]} or {"messages"})."""
  if not isinstance(record, dict):
    raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
  kinds = [k for k in ("text", "prompt", "messages") if k in record]
  if len(kinds) != 1:
    raise ValueError(f"{where}: expected exactly one of the keys 'text', 'prompt' (with an "
                     f"optional 'completion') or 'messages', got keys {sorted(record)}")
  kind = kinds[0]
  if kind == "messages":
    messages = record["messages"]
    if (not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str) for m in messages)):
      raise ValueError(f"{where}: 'messages' must be a non-empty list of objects with string "
                       "'role' and 'content'")
    ids = np.asarray(tokenizer.encode_chat(messages, add_generation_prompt=False), np.int32)
  else:
    text = record[kind]
    completion = record.get("completion", "") if kind == "prompt" else ""
    if "completion" in record and kind != "prompt":
      raise ValueError(f"{where}: 'completion' goes with 'prompt', not '{kind}'")
    if not isinstance(text, str) or not isinstance(completion, str):
      raise ValueError(f"{where}: '{kind}' and 'completion' must be strings")
    ids = _encode(tokenizer, text + completion)
  if ids.size == 0:
    raise ValueError(f"{where}: the record encodes to no tokens")
  return ids.reshape(-1)


def jsonl(tokenizer: TokenizerLike, path: str | Path, *, num_tokens: int | None = None) -> Workload:
  """One document per line of a JSON Lines file; blank lines are skipped.

  Each line is one of:
    {"text": "..."}                            the text, encoded with `encode`
    {"prompt": "...", "completion": "..."}     prompt + completion as one text
                                               ("completion" is optional)
    {"messages": [{"role": ..., "content": ...}, ...]}
                                               `encode_chat(messages,
                                               add_generation_prompt=False)`
  Other keys are ignored.

  Args:
    tokenizer: encodes the records.
    path: the .jsonl file.
    num_tokens: keep the first `num_tokens` tokens (the last document cut); None: all.

  Returns:
    The workload, named "jsonl:<absolute path>"; `source_sha256` is the sha256 of the file's
    bytes.

  Raises:
    ValueError: naming the path (and line number): unreadable or missing file, not UTF-8,
      no records, a line that is not JSON or not one of the forms above, a record that
      encodes to no tokens; `num_tokens` exceeds the text.
  """
  path = Path(path).expanduser().absolute()
  if path.is_dir():
    raise ValueError(f"cannot read {path}: it is a folder, not a .jsonl file")
  data, text = _read_text(path)
  docs = []
  for number, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    where = f"{path}:{number}"
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: not valid JSON: {e}") from e
    docs.append(_record_text(tokenizer, record, where))
  if not docs:
    raise ValueError(f"{path} is empty (no JSON records)")
  docs = _take(docs, num_tokens, f"jsonl {path}")
  return Workload.from_documents(
      _file_spec("jsonl", path, [("num_tokens", num_tokens, None)]),
      f"user JSONL: {path.name} ({len(docs)} records)", docs,
      hashlib.sha256(data).hexdigest())


# ------------------------------------------------------------------------------- load

WORKLOADS: tuple[str, ...] = ("prose", "code", "chat", "passkey", "repeat", "random")
_FILE_KINDS = ("file", "jsonl")
# Option name -> parser, per kind (in the order of the canonical name).
_OPTION_TYPES: dict[str, dict[str, Callable[[str], Any]]] = {
    "prose": {"num_tokens": int, "seed": int},
    "code": {"num_tokens": int, "seed": int},
    "chat": {"num_questions": int, "seed": int},
    "passkey": {"length": int, "depth": float, "num_samples": int, "seed": int},
    "repeat": {"num_tokens": int, "phrase": str, "seed": int},
    "random": {"vocab_size": int, "num_tokens": int, "seed": int},
    "file": {"num_tokens": int, "paragraphs": bool},
    "jsonl": {"num_tokens": int},
}
_SYNTHETIC_DEFAULT_TOKENS = 8192  # `repeat` and `random` when `load` gets no num_tokens.
_OPTION = re.compile(r'\s*(\w+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,]*)\s*(?:,|$)')


def _parse_options(kind: str, text: str, spec: str) -> dict[str, Any]:
  """"k=v,k=v" -> {k: typed v}; string values may be JSON string literals."""
  types = _OPTION_TYPES[kind]
  options: dict[str, Any] = {}
  pos = 0
  while pos < len(text):
    match = _OPTION.match(text, pos)
    if match is None or match.end() == pos:
      raise ValueError(f"workload spec {spec!r}: cannot parse options {text[pos:]!r} (want "
                       "key=value,key=value)")
    key, raw = match.group(1), match.group(2).strip()
    pos = match.end()
    if key not in types:
      raise ValueError(f"workload spec {spec!r}: unknown option {key!r} for {kind!r}; known: "
                       f"{', '.join(types)}")
    if key in options:
      raise ValueError(f"workload spec {spec!r}: option {key!r} given twice")
    try:
      if raw.startswith('"'):
        value = json.loads(raw)
        if types[key] is not str:
          raise ValueError("a string")
      elif types[key] is bool:
        if raw.lower() not in ("true", "false", "1", "0"):
          raise ValueError(raw)
        value = raw.lower() in ("true", "1")
      else:
        value = types[key](raw)
    except ValueError as e:
      raise ValueError(f"workload spec {spec!r}: option {key}={raw!r} is not a valid "
                       f"{types[key].__name__}") from e
    least = 0 if key == "seed" else 1  # Counts and sizes are positive; seeds >= 0.
    if types[key] is int and value < least:
      raise ValueError(f"workload spec {spec!r}: option {key}={value} must be >= {least}")
    if types[key] is float and not math.isfinite(value):
      raise ValueError(f"workload spec {spec!r}: option {key}={value} must be finite")
    options[key] = value
  return options


def _merge(options: dict[str, Any], key: str, value: Any, spec: str) -> None:
  """Sets `options[key]` from a keyword argument, which must agree with the spec's."""
  if value is None:
    return
  if key in options and options[key] != value:
    raise ValueError(f"workload spec {spec!r} says {key}={options[key]!r} but {key}={value!r} "
                     "was passed")
  options[key] = value


def load(spec: str, tokenizer: TokenizerLike, *, num_tokens: int | None = None, seed: int = 0,
         respond: Respond | None = None) -> Workload:
  """Builds a workload from its name; `load(w.name, ...)` rebuilds `w`.

  Specs: a built-in name (`WORKLOADS`), optionally with options, e.g. "prose",
  "prose:num_tokens=20000,seed=1", "passkey:length=4096,depth=0.25", "chat:num_questions=8",
  "repeat:num_tokens=4096,phrase=\"Hello world\"", "random:num_tokens=8192"; or
  "file:PATH" / "jsonl:PATH", optionally with "?num_tokens=N" (and "paragraphs=true" for
  files), or a bare path ending in .txt or .jsonl.

  Args:
    spec: the workload spec.
    tokenizer: encodes text (and gives `vocab_size` for "random").
    num_tokens: for prose, code, repeat, random (default 8192), file and jsonl; must agree
      with the spec's option if both are given. Not for chat or passkey.
    seed: for the seeded builders (a nonzero seed must agree with the spec's); file and
      jsonl have no randomness and ignore it.
    respond: the model's answering callable, required by "chat" (see `chat`).

  Raises:
    ValueError: an unknown name (the message lists the known ones), a malformed or unknown
      option, a missing required option (passkey's length and depth), conflicting
      arguments, or any error of the builder.
  """
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f"workload spec must be a non-empty string, got {spec!r}")
  spec = spec.strip()
  kind, sep, rest = spec.partition(":")
  if kind not in (*WORKLOADS, *_FILE_KINDS):
    if spec.endswith((".txt", ".jsonl")) or Path(spec).suffix in (".txt", ".jsonl"):
      kind, rest = ("jsonl" if spec.endswith(".jsonl") else "file"), spec
    else:
      raise ValueError(f"unknown workload {spec!r}; known: {', '.join(WORKLOADS)}, "
                       "file:PATH, jsonl:PATH (or a path ending in .txt or .jsonl)")
  if kind in _FILE_KINDS:
    path, options = rest, {}
    if "?" in rest:
      head, _, tail = rest.rpartition("?")
      try:
        options, path = _parse_options(kind, tail, spec), head
      except ValueError:
        if Path(head).exists() or not Path(rest).exists():
          raise
    if not path:
      raise ValueError(f"workload spec {spec!r} names no path (want {kind}:PATH)")
    _merge(options, "num_tokens", num_tokens, spec)
    if kind == "file":
      return text_file(tokenizer, path, **options)
    return jsonl(tokenizer, path, **options)

  options = _parse_options(kind, rest, spec) if sep else {}
  if seed:
    _merge(options, "seed", _check_seed(seed), spec)
  if kind in ("chat", "passkey"):
    if num_tokens is not None:
      raise ValueError(f"workload {spec!r} does not take num_tokens (chat: num_questions; "
                       "passkey: length and num_samples)")
  else:
    _merge(options, "num_tokens", num_tokens, spec)
  if kind == "prose":
    return prose(tokenizer, **options)
  if kind == "code":
    return code(tokenizer, **options)
  if kind == "chat":
    if respond is None:
      raise ValueError("the chat workload needs respond= (a callable from prompts' ids to the "
                       "model's answers' ids)")
    return chat(tokenizer, respond, **options)
  if kind == "passkey":
    missing = [k for k in ("length", "depth") if k not in options]
    if missing:
      raise ValueError(f"workload spec {spec!r} lacks {', '.join(missing)} (e.g. "
                       "passkey:length=4096,depth=0.5)")
    return passkey(tokenizer, **options)
  options.setdefault("num_tokens", _SYNTHETIC_DEFAULT_TOKENS)
  if kind == "repeat":
    return repeat(tokenizer, **options)
  options.setdefault("vocab_size", int(tokenizer.vocab_size))
  return random_tokens(**options)

