"""YAML bombs and oversized files are refused at every YAML edge (issue 11, item 8)."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest

from disaggserve.api import safe_yaml
from disaggserve.api.files import ResourceFileError, load_resource
from helpers import example

LAUGHS = "\n".join(
    ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)])


def bomb_resource() -> str:
    return (f"{LAUGHS}\napiVersion: disaggserve.io/v1alpha1\nkind: DisaggServe\n"
            "metadata: {name: *a8}\nspec: {model: {name: x, source: {builtin: tiny-llama}}}\n")


def test_billion_laughs_is_refused_quickly() -> None:
    with pytest.raises(safe_yaml.YamlLimitError, match="YAML bomb"):
        safe_yaml.load_all(LAUGHS)


def test_ordinary_anchors_and_documents_still_load() -> None:
    text = "base: &b {cpu: '1'}\nprefill: *b\ndecode: *b\n---\nsecond: 2\n"
    assert safe_yaml.load_all(text) == [{"base": {"cpu": "1"}, "prefill": {"cpu": "1"}, "decode": {"cpu": "1"}},
                                        {"second": 2}]
    with pytest.raises(safe_yaml.YamlLimitError, match="bytes"):
        safe_yaml.load_all("a: " + "x" * 200, max_bytes=100)


def test_render_refuses_a_bomb_in_metadata_name_with_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb_resource())
    with pytest.raises(ResourceFileError, match=r"refused: .*YAML bomb"):
        load_resource(path)
    # The CLI itself, with its memory capped at 1 GiB: a one-line error, not an out-of-memory death.
    limit = 1 << 30

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    out = subprocess.run([sys.executable, "-m", "disaggserve.cli", "render", "-f", str(path)],
                         capture_output=True, text=True, timeout=120, preexec_fn=cap)
    assert out.returncode != 0 and "YAML bomb" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_an_example_resource_still_loads(tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(example()))
    assert load_resource(path).name == "tiny"
