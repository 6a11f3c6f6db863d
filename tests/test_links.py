"""Every link in a tracked file resolves inside the repository.

A clone is all a user gets: documentation must not point at files beside the
checkout (such as a workspace's ``../shared``) or at paths that do not exist.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# [text](target) and <a href="target">, the forms Markdown files here use.
LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|href=\"([^\"]+)\"")
EXTERNAL = ("http://", "https://", "mailto:", "#")


def _tracked() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / p for p in out.split("\0") if p]


def _links(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return []
    return [a or b for a, b in LINK.findall(text)]


def test_no_link_leaves_the_repository() -> None:
    bad = []
    for path in _tracked():
        if path.suffix not in {".md", ".py", ".rs", ".toml", ".pyi", ""} or path == Path(__file__):
            continue
        for target in _links(path):
            # Rust intra-doc links (`crate::Cache`) name items, not files.
            if target.startswith(EXTERNAL) or "{" in target or "::" in target:
                continue
            resolved = (path.parent / target.split("#", 1)[0]).resolve()
            if not resolved.is_relative_to(ROOT):
                bad.append(f"{path.relative_to(ROOT)}: {target} (outside the repository)")
            elif not resolved.exists():
                bad.append(f"{path.relative_to(ROOT)}: {target} (does not exist)")
    assert not bad, "\n".join(bad)


def test_no_tracked_file_names_the_workspace_outside() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for p in _tracked()
        if p.is_file() and p.name != "test_links.py" and "../shared/" in _safe_text(p)
    ]
    assert not offenders


def _safe_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return ""
