"""`disaggserve` CLI edges: clear one-line errors and exit codes, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from disaggserve.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_crd_command_writes_the_committed_file(tmp_path):
    out = tmp_path / "crd.yaml"
    assert main(["crd", "-o", str(out)]) == 0
    assert out.read_text() == (ROOT / "crds" / "disaggserve.io_disaggserves.yaml").read_text()


def test_render_prints_every_child(capsys):
    assert main(["render", "-f", str(ROOT / "examples" / "tiny-cpu.yaml"), "-n", "team-a"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert len(docs) == 14  # the worker token Secret and the NetworkPolicy included
    assert {d["metadata"]["namespace"] for d in docs} == {"team-a"}
    assert all("ownerReferences" not in d["metadata"] for d in docs)


def test_render_bad_inputs(tmp_path, capsys):
    cases = {
        "missing.yaml": None,
        "notyaml.yaml": "a: [unclosed",
        "nokind.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
        "badversion.yaml": "apiVersion: disaggserve.io/v9\nkind: DisaggServe\nmetadata: {name: x}\nspec: {}\n",
        "noname.yaml": "apiVersion: disaggserve.io/v1alpha1\nkind: DisaggServe\nmetadata: {}\nspec: {}\n",
        "badspec.yaml": "apiVersion: disaggserve.io/v1alpha1\nkind: DisaggServe\nmetadata: {name: x}\n"
        "spec: {slo: {ttftMs: -1, tpotMs: 5}}\n",
    }
    expected = {
        "missing.yaml": "cannot read",
        "notyaml.yaml": "not valid YAML",
        "nokind.yaml": "expected exactly one DisaggServe",
        "badversion.yaml": "apiVersion must be disaggserve.io/v1alpha1",
        "noname.yaml": "metadata.name is required",
        "badspec.yaml": "spec.slo.ttftMs",
    }
    for name, text in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        assert main(["render", "-f", str(path)]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("disaggserve: error: ") and expected[name] in err, (name, err)
        assert "Traceback" not in err


def test_console_script_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "disaggserve.cli", "render", "-f", "/nonexistent.yaml"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT / "operator"), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2 and "cannot read" in result.stderr


def test_peering_crds_are_generated(tmp_path):
    out = tmp_path / "peering.yaml"
    assert main(["crd", "--peering", "-o", str(out)]) == 0
    assert out.read_text() == (ROOT / "crds" / "kopf-peering.yaml").read_text()
    kinds = [d["spec"]["names"]["kind"] for d in yaml.safe_load_all(out.read_text())]
    assert kinds == ["ClusterKopfPeering", "KopfPeering"]


def test_up_refuses_bad_input_before_starting_anything(tmp_path, capsys):
    state = tmp_path / "state"
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: disaggserve.io/v1alpha1\nkind: DisaggServe\nmetadata: {name: x}\nspec: {}\n")
    assert main(["up", "-f", str(bad), "--state-dir", str(state)]) == 2
    assert "spec.model: Field required" in capsys.readouterr().err
    assert not (state / "kubeconfig").exists(), "nothing was started"


def test_up_refuses_a_second_instance(tmp_path, capsys):
    import os

    state = tmp_path / "state"
    state.mkdir()
    (state / "up.pid").write_text(str(os.getpid()))  # a live process holds the state folder
    assert main(["up", "--state-dir", str(state)]) == 2
    assert "already running" in capsys.readouterr().err


def test_down_with_nothing_running(tmp_path, capsys):
    assert main(["down", "--state-dir", str(tmp_path)]) == 0
    assert "nothing is running" in capsys.readouterr().out
