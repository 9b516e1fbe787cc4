"""The CLI behaves the way a newcomer expects: one-line errors with the next step, plots for
every example, CPU workers not called GPUs, autoscaling bounds defaulted by the schema."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from disaggserve.api.crd import build_crd
from disaggserve.cli import main
from disaggserve.local.schema import validate

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "examples" / "tiny-cpu.yaml")


def test_plot_of_a_manual_plan_is_written(tmp_path, capsys):
    png = tmp_path / "p.png"
    assert main(["plan", "-f", TINY, "--plot", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr()
    assert "manual" in out.out and "CPU worker" in out.out and "GPU" not in out.out
    assert f"wrote {png}" in out.err


def test_plot_without_matplotlib_is_one_line(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert main(["plan", "-f", TINY, "--plot", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --plot needs matplotlib") and "\n" not in err
    assert not (tmp_path / "p.png").exists()


def test_missing_profile_points_at_plan_profile(tmp_path, capsys):
    resource = (ROOT / "examples" / "tiny-cpu.yaml").read_text()
    resource = resource.replace("source: {builtin: tiny-llama}", "source: {path: /models/nothing}")
    resource = resource.replace("name: tiny-llama", "name: unknown-model")
    resource = resource.split("  parallelism:")[0]
    (tmp_path / "r.yaml").write_text(resource)
    assert main(["plan", "-f", str(tmp_path / "r.yaml")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ProfileMissing:") and "plan -f FILE --profile profile.json" in err


def test_cpu_plans_are_counted_in_cpu_workers(tmp_path, capsys):
    path = tmp_path / "auto.yaml"
    path.write_text((ROOT / "examples" / "tiny-cpu.yaml").read_text().split("  parallelism:")[0])
    assert main(["plan", "-f", str(path)]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "┃" in line and "phase" in line)
    assert "CPU workers" in header and "GPU" not in header.replace("CPU worker", "")
    assert "goodput per CPU worker" in out


def test_status_with_nothing_running_suggests_up(tmp_path, capsys):
    assert main(["status", "--state-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "disaggserve up" in err and "network" not in err


@pytest.mark.parametrize(
    ("autoscaling", "error"),
    [
        ({"enabled": True}, None),
        ({"enabled": True, "minReplicas": {"prefill": 2, "decode": 2}}, None),
        ({"enabled": True, "minReplicas": {"prefill": 20, "decode": 1}}, "minReplicas.prefill must not exceed"),
        ({"enabled": True, "minReplicas": {"prefill": 2}}, "'decode' is a required property"),
    ],
)
def test_autoscaling_bounds_are_defaulted_by_the_schema(autoscaling, error):
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    obj = {
        "apiVersion": "disaggserve.io/v1alpha1",
        "kind": "DisaggServe",
        "metadata": {"name": "a"},
        "spec": {
            "model": {"name": "m", "source": {"builtin": "tiny-llama"}},
            "slo": {"ttftMs": 200, "tpotMs": 50},
            "workload": {"requestRate": 1, "inputTokens": 10, "outputTokens": 10},
            "autoscaling": autoscaling,
        },
    }
    stored, errors = validate(obj, schema, strict=True)
    if error is None:
        assert errors == []
        bounds = stored["spec"]["autoscaling"]
        assert bounds["maxReplicas"] == {"prefill": 16, "decode": 16}
        assert bounds["minReplicas"]["prefill"] >= 1
    else:
        assert len(errors) == 1 and error in errors[0].message, errors
