"""docs/install.md: its YAML examples parse and the files its commands name exist."""

from __future__ import annotations

import re

import yaml

from chart.chartlib import DOCS, ROOT


def test_yaml_examples_parse_into_kubernetes_objects() -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 2, "expected the Argo CD and Flux examples"
    kinds = set()
    for block in blocks:
        for doc in yaml.safe_load_all(block):
            assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), doc
            kinds.add(doc["kind"])
    assert {"Application", "HelmRelease", "GitRepository"} <= kinds


def test_paths_in_commands_exist() -> None:
    text = DOCS.read_text() + (ROOT / "README.md").read_text()
    paths = set(re.findall(r"(?:-f|apply -f|install \S+) \.?/?((?:crds|deploy|examples|charts)/[\w./-]*)", text))
    assert {"crds/", "deploy/disaggserve.yaml", "examples/tiny-cpu.yaml"} <= paths, paths
    for path in paths:
        assert (ROOT / path).exists(), f"docs name {path}, which does not exist"
