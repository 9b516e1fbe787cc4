"""Pinning what runs: the image by digest, Hugging Face weights by revision (issue 11, item 8)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from disaggserve.api import parse_spec
from disaggserve.api.crd import build_crd
from disaggserve.api.spec import SpecError
from disaggserve.local.schema import validate
from disaggserve.planner import plan_for
from disaggserve.resources import Owner, build_children
from disaggserve_worker.model.source import download_hf
from helpers import example

DIGEST = "sha256:" + "ab" * 32
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SCHEMA = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def containers(spec_patch: dict) -> list[dict]:
    body = example()
    body["spec"].update(spec_patch)
    spec = parse_spec(body["spec"])
    return [c for o in build_children(Owner("tiny", "ns"), spec, plan_for(spec))
            if o["kind"] in ("StatefulSet", "Deployment") for c in o["spec"]["template"]["spec"]["containers"]]


def test_image_digest_is_what_every_pod_runs() -> None:
    found = containers({"image": {"repository": "registry.example/ds/worker", "digest": DIGEST}})
    assert {c["image"] for c in found} == {f"registry.example/ds/worker@{DIGEST}"}
    assert {c["image"] for c in containers({})} == {"ghcr.io/disaggserve/worker:0.1.0"}


@pytest.mark.parametrize("digest", ["sha256:abc", "md5:" + "ab" * 32, "sha256:" + "AB" * 32])
def test_malformed_digest_is_refused_by_model_and_crd(digest: str) -> None:
    spec = {**example()["spec"], "image": {"digest": digest}}
    with pytest.raises(SpecError, match="digest"):
        parse_spec(spec)
    _, errors = validate({"spec": spec}, SCHEMA, strict=True)
    assert errors


def test_hf_revision_reaches_the_worker_and_needs_hf() -> None:
    source = {"model": {"name": "m", "source": {"hf": "org/model", "revision": COMMIT},
                        "facts": {"layers": 2, "attentionHeads": 2, "hiddenSize": 64, "parameters": 1000}}}
    spec = {**example()["spec"], **source}
    args = containers(source)[0]["args"]
    assert args[args.index("--model") + 1] == f"hf:org/model@{COMMIT}"
    assert validate({"spec": spec}, SCHEMA, strict=True)[1] == []
    wrong = {**example()["spec"], "model": {"name": "m", "source": {"builtin": "tiny-llama", "revision": COMMIT}}}
    with pytest.raises(SpecError, match="revision pins an hf repository"):
        parse_spec(wrong)
    _, errors = validate({"spec": wrong}, SCHEMA, strict=True)
    assert [e.message for e in errors] == ["model source: revision pins an hf repository; set hf too"]


def test_worker_downloads_exactly_the_pinned_revision(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[tuple[str, str | None]] = []

    def snapshot_download(repo: str, revision: str | None = None, **_: object) -> str:
        calls.append((repo, revision))
        return str(tmp_path)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    assert download_hf(f"org/model@{COMMIT}") == tmp_path
    assert download_hf("org/model") == tmp_path
    assert calls == [("org/model", COMMIT), ("org/model", None)]
