"""Every dotted `kvtpu.` name that the sources and docs cite (docstrings, comments, the
README, docs/) imports as written: `kvtpu.calibration.CalibrationArtifact` is a name a
user types."""

from __future__ import annotations

import importlib
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
FOLDERS = ("kvtpu", "models", "experiments", "pallas_kernels", "docs")
CITED = re.compile(r"\bkvtpu(?:\.[A-Za-z_]\w*)+")


def _resolves(name: str) -> bool:
  """The longest importable module prefix of `name`, then attributes for the rest."""
  parts = name.split(".")
  for i in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:i]))
    except ImportError:
      continue
    for attr in parts[i:]:
      if not hasattr(obj, attr):
        return False
      obj = getattr(obj, attr)
    return True
  return False


def test_every_cited_kvtpu_name_imports():
  files = [ROOT / "README.md"] + sorted(
      p for folder in FOLDERS for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md"))
  cited: dict[str, set[str]] = {}
  for path in files:
    for match in CITED.finditer(path.read_text()):
      cited.setdefault(match.group(0), set()).add(str(path.relative_to(ROOT)))
  assert "kvtpu.calibration.CalibrationArtifact" in cited
  broken = {name: sorted(where) for name, where in sorted(cited.items()) if not _resolves(name)}
  assert not broken, f"cited names that do not import (name: files citing it): {broken}"
