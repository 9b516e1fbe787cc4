"""checkov (Kubernetes security practice) finds nothing in the chart or in deploy/.

Every skip is justified where it applies: `checkov.io/skipN` annotations in the templates, each
with a reason, which this test requires. checkov lives in its own virtualenv (.venv/checkov,
made by scripts/test) because its pins conflict with ours.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from chart.chartlib import ALL_FEATURES, CHART, DEPLOY, ROOT, in_ci, template

CHECKOV = ROOT / ".venv" / "checkov" / "bin" / "checkov"
# checkov's helm runner renders the chart into namespace `default` (it has no --namespace);
# the chart always installs into the release namespace (`helm install -n`), so CKV_K8S_21
# ("default namespace should not be used") judges checkov's render, not the chart. The
# rendered checks below run with a real namespace and keep CKV_K8S_21 on.
HELM_RUNNER_SKIPS = ("CKV_K8S_21",)


def _checkov(helm_bin: str, *args: str) -> list[dict[str, Any]]:
    if not CHECKOV.exists():
        message = f"checkov missing at {CHECKOV}: scripts/test installs it"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    env = {**os.environ, "PATH": f"{Path(helm_bin).parent}:{os.environ.get('PATH', '')}"}
    proc = subprocess.run(
        [str(CHECKOV), "--skip-download", "--output", "json", *args],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    # checkov exits 1 on failed checks; anything else (or no JSON) is a crash of its own.
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    assert "Failed to run" not in proc.stderr, proc.stderr[-3000:]
    # One JSON value per scanned target kind, written back to back when -d and -f are mixed.
    decoder, text, reports, pos = json.JSONDecoder(), proc.stdout, [], 0
    while pos < len(text.rstrip()):
        value, end = decoder.raw_decode(text, pos)
        reports.extend(value if isinstance(value, list) else [value])
        pos = end
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return reports


def _assert_clean(reports: list[dict[str, Any]], where: str) -> None:
    assert reports, f"checkov produced no report for {where}"
    for report in reports:
        summary = report["summary"]
        assert summary["resource_count"] > 0 and summary["passed"] > 50, f"checkov scanned nothing in {where}"
        failed = [f"{c['check_id']} {c['check_name']} ({c['resource']})" for c in report["results"]["failed_checks"]]
        assert not failed, f"checkov failures in {where}:\n" + "\n".join(failed)
        for skipped in report["results"]["skipped_checks"]:
            reason = skipped.get("check_result", {}).get("suppress_comment") or ""
            if skipped["check_id"] not in HELM_RUNNER_SKIPS:
                assert len(reason) > 20, f"{skipped['check_id']} skipped without a reason in {where}"


def test_checkov_chart(helm_bin: str) -> None:
    reports = _checkov(helm_bin, "--framework", "helm", "--directory", str(CHART),
                       "--skip-check", ",".join(HELM_RUNNER_SKIPS))
    _assert_clean(reports, "charts/disaggserve")


def test_checkov_manifests(helm_bin: str, tmp_path: Path) -> None:
    """deploy/ and the default and all-features renders, in one checkov run."""
    (tmp_path / "default.yaml").write_text(template())
    (tmp_path / "all-features.yaml").write_text(template(ALL_FEATURES))
    # checkov scans only the first of several --directory flags: gather everything in one.
    for manifest in DEPLOY.glob("*.yaml"):
        (tmp_path / f"deploy-{manifest.name}").write_text(manifest.read_text())
    reports = _checkov(helm_bin, "--framework", "kubernetes", "--directory", str(tmp_path))
    _assert_clean(reports, "deploy/ and the rendered chart")
    scanned = {r["file_path"] for report in reports for r in report["results"]["passed_checks"]}
    expected = {"/deploy-disaggserve.yaml", "/deploy-monitoring.yaml", "/default.yaml", "/all-features.yaml"}
    assert expected <= scanned, scanned


def test_checkov_operator_dockerfile(helm_bin: str) -> None:
    reports = _checkov(helm_bin, "--framework", "dockerfile", "--file", str(ROOT / "operator" / "Dockerfile"))
    for report in reports:
        assert report["summary"]["passed"] > 20, "checkov scanned nothing in operator/Dockerfile"
        failed = [c["check_id"] for c in report["results"]["failed_checks"]]
        assert not failed, f"checkov failures in operator/Dockerfile: {failed}"
