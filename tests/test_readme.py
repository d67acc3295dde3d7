"""The README and docs/*.md say what the code does.

* Every ```python block of README.md and docs/*.md runs as written, each in a fresh
  Python process started outside the repository (so only the installed `kvtpu` is
  importable) with `JAX_PLATFORMS=cpu` and no `XLA_FLAGS`: a snippet that needs
  fake devices or other settings must make them itself. A line ending in
  `# prints <text>` must print `<text>`: the expectations of a block are matched, in
  order, against the lines it printed; `<text>` is the whole line, or its start
  when `<text>` ends with `...`.
* Every command of a ```sh block names what exists: a `make` target of the
  Makefile, or a `python -m` module, with flags that binary defines.
* Every relative link points to a file that exists.
"""

import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Snippets that load SmolLM2 (fetched on first use; up to a minute or two of compiles
# each) are in the slow tier.
_MODEL = "load_pretrained("


def _blocks(lang: str) -> list[tuple[str, int, str]]:
  """(page, index within page, text) of every fenced block in `lang`."""
  out = []
  for page in PAGES:
    blocks = re.findall(rf"^```{lang}\n(.*?)^```", page.read_text(), flags=re.S | re.M)
    out += [(str(page.relative_to(ROOT)), i, b) for i, b in enumerate(blocks)]
  return out


PYTHON = _blocks("python")
SHELL = _blocks("sh")


def _expected(block: str) -> list[str]:
  """What the block's `# prints <text>` comments promise, in order."""
  return [m.group(1).rstrip() for m in re.finditer(r"#\s*prints\s(.*)$", block, flags=re.M)]


def _matches(line: str, want: str) -> bool:
  line = line.rstrip()
  return line.startswith(want[:-3]) if want.endswith("...") else line == want


def _snippet_env() -> dict[str, str]:
  """The test process's environment on the CPU, without its fake devices (snippets see
  the devices a reader's CPU has), with its cheaper CPU codegen (a third of the heavier
  snippets' time). The cheaper codegen may round a float's last bit differently; every
  `# prints` line is matched under it, so a figure it changed would fail here."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["XLA_FLAGS"] = ("--xla_backend_optimization_level=0 "
                      + os.environ.get("KVTPU_TEST_CPU_XLA_FLAGS", "")).strip()
  env["JAX_PLATFORMS"] = "cpu"
  return env


def test_pages_have_snippets_and_commands():
  assert len(PAGES) >= 5, "README.md links pages under docs/"
  assert len(PYTHON) >= 8 and len(SHELL) >= 5, (len(PYTHON), len(SHELL))


def test_readme_is_short():
  lines = len((ROOT / "README.md").read_text().splitlines())
  assert lines <= 200, f"README.md has {lines} lines: move detail to a page under docs/"


@pytest.mark.parametrize("page,index,block", [
    pytest.param(*b, id=f"{b[0]}:{b[1]}", marks=[pytest.mark.slow] if _MODEL in b[2] else [])
    for b in PYTHON])
def test_python_snippet_runs(page, index, block, tmp_path):
  proc = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=_snippet_env(),
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, f"{page} python block {index} failed:\n{proc.stderr[-3000:]}"
  printed = proc.stdout.splitlines()
  rest = iter(printed)
  for want in _expected(block):
    assert any(_matches(line, want) for line in rest), (
        f"{page} python block {index}: no line prints {want!r} (in order); printed:\n"
        + "\n".join(printed))


def _commands(block: str) -> list[list[str]]:
  """The block's commands as argv lists: continuations joined, comments dropped."""
  text = re.sub(r"\\\n\s*", " ", block)
  commands = []
  for line in text.splitlines():
    line = line.split(" #")[0].strip()
    if line and not line.startswith("#"):
      commands.append(shlex.split(line))
  return commands


def _make_targets() -> set[str]:
  return set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", (ROOT / "Makefile").read_text(), flags=re.M))


@functools.cache
def _binary_flags(module: str) -> frozenset[str]:
  """The flags `python -m module --helpfull` lists (absl binaries)."""
  proc = subprocess.run([sys.executable, "-m", module, "--helpfull"], cwd=ROOT,
                        env=_snippet_env(), capture_output=True, text=True, timeout=300)
  names = re.findall(r"^\s+--(?:\[no\])?([\w.]+):", proc.stdout, flags=re.M)
  assert names, f"python -m {module} --helpfull listed no flags:\n{proc.stdout}{proc.stderr}"
  return frozenset(names)


@pytest.mark.parametrize("page,index,block", [
    pytest.param(*b, id=f"{b[0]}:{b[1]}") for b in SHELL])
def test_shell_commands_exist(page, index, block):
  commands = _commands(block)
  assert commands, f"{page} sh block {index} holds no command"
  for argv in commands:
    while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):  # Environment assignments.
      argv = argv[1:]
    where = f"{page} sh block {index}: {shlex.join(argv)}"
    if argv[0] == "make":
      targets = [a for a in argv[1:] if "=" not in a and not a.startswith("-")]
      missing = set(targets) - _make_targets()
      assert not missing, f"{where}: no make target {sorted(missing)}"
    elif Path(argv[0]).name.startswith("python") and argv[1:2] == ["-m"]:
      module, args = argv[2], argv[3:]
      if module == "pytest":
        for path in (a for a in args if a.startswith("tests")):
          assert (ROOT / path.split("::")[0]).exists(), f"{where}: no {path}"
        continue
      assert module.startswith("kvtpu."), f"{where}: not a kvtpu binary"
      defined = _binary_flags(module)
      used = {a[2:].split("=")[0] for a in args if a.startswith("--")}
      missing = {u for u in used if u not in defined and u.removeprefix("no") not in defined}
      assert not missing, f"{where}: {module} defines no flag {sorted(missing)}"
    elif argv[0] in ("pip", "git", "cd", "ls", "cat"):
      continue
    else:
      raise AssertionError(f"{where}: unknown kind of command")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_exist(page):
  for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
    if re.match(r"[a-z]+:", target):
      continue
    assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
