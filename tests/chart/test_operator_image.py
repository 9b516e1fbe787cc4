"""operator/Dockerfile agrees with the package and the chart (no Docker engine here to build it)."""

from __future__ import annotations

import json
import re
import tomllib

from chart.chartlib import ROOT, documents, template
from disaggserve.cli import build_parser

DOCKERFILE = (ROOT / "operator" / "Dockerfile").read_text()


def _instruction(name: str) -> list[str]:
    return [m.group(1) for m in re.finditer(rf"^{name}\s+(.+)$", DOCKERFILE, flags=re.MULTILINE)]


def test_copied_sources_exist() -> None:
    for line in _instruction("COPY"):
        if line.startswith("--from"):
            continue
        *sources, _ = line.split()
        for source in sources:
            assert (ROOT / source).exists(), f"operator/Dockerfile copies {source}, which does not exist"


def test_entrypoint_is_the_console_script_and_cmd_parses() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    (entrypoint,) = _instruction("ENTRYPOINT")
    (cmd,) = _instruction("CMD")
    assert json.loads(entrypoint) == ["disaggserve"] and "disaggserve" in scripts
    args = build_parser().parse_args(json.loads(cmd))
    assert args.command == "operator" and args.liveness == "http://0.0.0.0:8080/healthz"


def test_image_user_matches_the_chart(helm_bin: str) -> None:
    (user,) = _instruction("USER")
    uid, gid = (int(x) for x in user.split(":"))
    deployment = next(o for o in documents(template()) if o["kind"] == "Deployment")
    context = deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    assert (context["runAsUser"], context["runAsGroup"]) == (uid, gid)


def test_image_never_installs_torch() -> None:
    install = next(line for line in DOCKERFILE.splitlines() if "pip install" in line)
    assert "[" not in install, "extras would pull the worker's stack (torch) into the operator image"
    assert "find_spec('torch')" in DOCKERFILE  # the build fails if torch sneaks in through a dependency
