"""The YAML documents under deploy/, loaded once for every test module of this directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yaml", ".yml"})


def parse_documents(text: str) -> list[dict[str, Any]]:
    """The non-empty documents of a YAML stream."""
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def load_documents(path: Path) -> list[dict[str, Any]]:
    return parse_documents(path.read_text())


def documents() -> list[tuple[Path, dict[str, Any]]]:
    """(file, document) for every document under deploy/, freshly parsed."""
    return [(path, doc) for path in yaml_files() for doc in load_documents(path)]


def by_kind(kind: str, directory: str | None = None) -> list[dict[str, Any]]:
    return [
        doc
        for path, doc in documents()
        if doc.get("kind") == kind and (directory is None or path.parent.name == directory)
    ]


def one(kind: str, directory: str | None = None) -> dict[str, Any]:
    found = by_kind(kind, directory)
    assert len(found) == 1, f"expected one {kind} in deploy/{directory or ''}, found {len(found)}"
    return found[0]
