"""The import rules of ARCHITECTURE.md, checked on the source tree.

Layers, top to bottom: experiments -> models -> kvtpu -> pallas_kernels (installed as
kvtpu.experiments, kvtpu.models, kvtpu and kvtpu.pallas_kernels). Imports point
down only; no module imports a private name (`_x`) from another module; no test
module imports from another test module; nothing imports the repository folders
under their bare names (`models`, `experiments`, `pallas_kernels`), which would load
a second copy of them beside the installed `kvtpu.*` one.
"""

from __future__ import annotations

import ast
import pathlib
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Folder -> the package name it is installed as.
PACKAGES = {"pallas_kernels": "kvtpu.pallas_kernels", "kvtpu": "kvtpu", "models": "kvtpu.models",
            "experiments": "kvtpu.experiments"}
LAYER = {"kvtpu.pallas_kernels": 0, "kvtpu": 1, "kvtpu.models": 2, "kvtpu.experiments": 3}


def _package_of(module: str) -> str | None:
  """The layer package a dotted module name belongs to (longest prefix), or None."""
  for pkg in sorted(LAYER, key=len, reverse=True):
    if module == pkg or module.startswith(pkg + "."):
      return pkg
  return None


def _imports(path: pathlib.Path):
  """(line, module, imported names) of every import in a file, relative ones resolved."""
  tree = ast.parse(path.read_text(), filename=str(path))
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name, []
    elif isinstance(node, ast.ImportFrom):
      module = node.module or ""
      if node.level:
        raise AssertionError(f"{path}:{node.lineno}: relative import; use the absolute "
                             "kvtpu.* name")
      yield node.lineno, module, [a.name for a in node.names]


def _sources(folder: str):
  return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("folder", list(PACKAGES))
def test_imports_point_down_and_use_installed_names(folder):
  own = PACKAGES[folder]
  problems = []
  for path in _sources(folder):
    for line, module, names in _imports(path):
      where = f"{path.relative_to(ROOT)}:{line}"
      top = module.split(".")[0]
      if top in ("models", "experiments", "pallas_kernels", "tests"):
        problems.append(f"{where}: imports {module!r} by its folder name")
        continue
      target = _package_of(module)
      if target is None:
        continue
      if LAYER[target] > LAYER[own]:
        problems.append(f"{where}: {own} imports {module} from a layer above it")
      private = [n for n in names if n.startswith("_") and not n.startswith("__")]
      if private:
        problems.append(f"{where}: imports private {private} from {module}")
  assert not problems, "\n".join(problems)


def test_tests_import_no_test_module_and_no_private_name():
  problems = []
  for path in _sources("tests"):
    for line, module, names in _imports(path):
      where = f"{path.relative_to(ROOT)}:{line}"
      leaf = module.split(".")[-1]
      if module.startswith("tests") and (leaf.startswith("test_") or any(
          n.startswith("test_") for n in names)):
        problems.append(f"{where}: imports the test module {module}")
      if module.split(".")[0] in ("models", "experiments", "pallas_kernels"):
        problems.append(f"{where}: imports {module!r} by its folder name")
      if module.startswith(("kvtpu", "tests")):
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        if private:
          problems.append(f"{where}: imports private {private} from {module}")
  assert not problems, "\n".join(problems)


def test_the_rules_catch_what_they_forbid(tmp_path, monkeypatch):
  # The checker itself: a file breaking each rule is reported.
  bad = tmp_path / "kvtpu"
  bad.mkdir()
  (bad / "x.py").write_text("from kvtpu.models import llama\nfrom kvtpu.cache import _thing\n"
                            "import models\n")
  monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
  with pytest.raises(AssertionError) as e:
    test_imports_point_down_and_use_installed_names("kvtpu")
  msg = str(e.value)
  assert "from a layer above it" in msg and "private ['_thing']" in msg
  assert "imports 'models' by its folder name" in msg


def test_every_package_folder_is_installed():
  # pyproject lists the packages explicitly (the folders install under other names):
  # a new subpackage missing from the list would work in the editable checkout and be
  # absent from a wheel.
  config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
  assert config["package-dir"] == {v: k for k, v in PACKAGES.items()}
  found = set()
  for folder, name in PACKAGES.items():
    for init in (ROOT / folder).rglob("__init__.py"):
      rel = init.parent.relative_to(ROOT / folder).parts
      found.add(".".join((name, *rel)))
  assert found == set(config["packages"])
