"""Built-in models for engines that load only checkpoint folders, on this machine.

vLLM cannot run `source: {builtin: tiny-llama}` (the CRD refuses that combination on a cluster),
and no model hub is reachable here. For `disaggserve up`, a resource with `engine.kind: vllm` and
a builtin model gets the model written once as a Hugging Face checkpoint folder under the state
dir (`disaggserve-worker export-checkpoint`, in a subprocess: the control plane never imports
torch) and its `model.source` (and a builtin draft model's) pointed at that folder.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from disaggserve.api.files import ResourceFileError, read_yaml_documents

KIND = "DisaggServe"


def export_checkpoint(builtin: str, state_dir: Path) -> Path:
    out = state_dir / "models" / builtin
    proc = subprocess.run(
        [sys.executable, "-m", "disaggserve_worker.cli", "export-checkpoint", "--model", builtin, "--out", str(out)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise ResourceFileError(
            f"could not write built-in model {builtin!r} as a checkpoint for vLLM "
            f"(needs the worker package: pip install -e '.[worker,cpu]'): {proc.stderr.strip()[-500:]}"
        )
    return out


def _localise(source: dict[str, Any] | None, state_dir: Path) -> dict[str, Any] | None:
    if not isinstance(source, dict) or not source.get("builtin"):
        return source
    return {"path": str(export_checkpoint(str(source["builtin"]), state_dir).resolve())}


def prepare_for_local(path: str | Path, state_dir: Path) -> Path:
    """The resource file `up` should load: `path` itself, or a rewritten copy in `state_dir`."""
    docs = read_yaml_documents(path, "resource")
    changed = False
    out: list[Any] = []
    for doc in docs:
        spec = doc.get("spec") if isinstance(doc, dict) and doc.get("kind") == KIND else None
        if isinstance(spec, dict) and (spec.get("engine") or {}).get("kind") == "vllm":
            doc = copy.deepcopy(doc)
            spec = doc["spec"]
            model = spec.get("model") or {}
            if isinstance(model, dict) and (model.get("source") or {}).get("builtin"):
                model["source"] = _localise(model["source"], state_dir)
                changed = True
            speculation = spec.get("speculation") or {}
            if isinstance(speculation, dict) and (speculation.get("draftModel") or {}).get("builtin"):
                speculation["draftModel"] = _localise(speculation["draftModel"], state_dir)
                changed = True
        out.append(doc)
    if not changed:
        return Path(path)
    state_dir.mkdir(parents=True, exist_ok=True)
    rewritten = state_dir / "resource.yaml"
    rewritten.write_text(yaml.safe_dump_all(out, sort_keys=False))
    return rewritten
