"""Reading DisaggServe resources from YAML files (CLI edge): clear errors, no tracebacks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from disaggserve.api import safe_yaml
from disaggserve.api.constants import API_VERSION, KIND
from disaggserve.api.spec import DisaggServeSpec, SpecError, parse_spec


class ResourceFileError(ValueError):
    """The file cannot be used; the message names the file and what to change."""


@dataclass(frozen=True)
class ResourceFile:
    name: str
    namespace: str
    spec: DisaggServeSpec
    raw: dict[str, Any]


def read_yaml_documents(path: str | Path, what: str = "file") -> list[Any]:
    """All non-empty YAML documents of a file; ResourceFileError names the file and the problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ResourceFileError(f"{what} {path}: cannot read: {e.strerror}") from None
    try:
        return [d for d in safe_yaml.load_all(text) if d is not None]
    except safe_yaml.YamlLimitError as e:
        raise ResourceFileError(f"{what} {path}: refused: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ResourceFileError(f"{what} {path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None


def load_resource(path: str | Path, namespace: str | None = None, *, allow_bare_spec: bool = False) -> ResourceFile:
    """One DisaggServe from a file (`allow_bare_spec`: a file holding only the spec also works)."""
    docs = read_yaml_documents(path, "resource")
    found = [d for d in docs if isinstance(d, dict) and d.get("kind") == KIND]
    if allow_bare_spec and not found and len(docs) == 1 and isinstance(docs[0], dict) and "kind" not in docs[0]:
        bare = docs[0].get("spec", docs[0])
        found = [{"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "plan"}, "spec": bare}]
    if len(found) != 1:
        raise ResourceFileError(f"{path}: expected exactly one {KIND} document, found {len(found)}")
    raw = found[0]
    if raw.get("apiVersion") != API_VERSION:
        raise ResourceFileError(f"{path}: apiVersion must be {API_VERSION}, not {raw.get('apiVersion')!r}")
    meta = raw.get("metadata") or {}
    if not meta.get("name"):
        raise ResourceFileError(f"{path}: metadata.name is required")
    try:
        spec = parse_spec(raw.get("spec"))
    except SpecError as e:
        raise ResourceFileError(f"{path}: invalid spec: " + "; ".join(e.problems)) from None
    return ResourceFile(meta["name"], namespace or meta.get("namespace") or "default", spec, raw)
