"""Reading DisaggServe resources from YAML files (CLI edge): clear errors, no tracebacks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

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


def load_resource(path: str | Path, namespace: str | None = None) -> ResourceFile:
    path = Path(path)
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except OSError as e:
        raise ResourceFileError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ResourceFileError(f"{path}: not valid YAML: {e}") from None
    found = [d for d in docs if isinstance(d, dict) and d.get("kind") == KIND]
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
        raise ResourceFileError(f"{path}: invalid spec:\n  " + "\n  ".join(e.problems)) from None
    return ResourceFile(meta["name"], namespace or meta.get("namespace") or "default", spec, raw)
