"""`disaggserve plan`: outputs and exit codes."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import spec_dict
from disaggserve.cli import main


@pytest.fixture
def resource(tmp_path):
    def write(**over) -> str:
        p = tmp_path / "r.yaml"
        p.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "disaggserve.io/v1alpha1",
                    "kind": "DisaggServe",
                    "metadata": {"name": "x"},
                    "spec": spec_dict(**over),
                }
            )
        )
        return str(p)

    return write


def test_json_output_has_the_stable_keys(resource, capsys):
    assert main(["plan", "-f", resource(), "--cluster", "4x8", "--output", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["placement"] in ("high-affinity", "low-affinity")
    for phase in ("prefill", "decode"):
        assert set(out[phase]) >= {"tensor", "pipeline", "replicas", "gpus"}
    assert out["gpus_total"] == out["prefill"]["gpus"] + out["decode"]["gpus"]
    assert set(out["predicted"]) >= {"ttft_p90_ms", "tpot_p90_ms", "attainment"}
    assert set(out["baseline_colocated"]) >= {"tensor", "pipeline", "goodput_per_gpu"}
    assert out["goodput_per_gpu"] > 0 and out["search"]["configs"] > 0 and out["search"]["seconds"] > 0


def test_table_output_and_plot(resource, tmp_path, capsys):
    png = tmp_path / "a.png"
    assert main(["plan", "-f", resource(), "--cluster", "2x8", "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "prefill" in text and "colocated baseline" in text and "why:" in text
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_nodes_file_and_trace(resource, tmp_path, capsys):
    from disaggserve.topology import synthetic_nodes

    nodes = tmp_path / "nodes.yaml"
    nodes.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "List",
                "items": synthetic_nodes(
                    2, 8, product="NVIDIA-A100-SXM4-80GB", memory_gib=80, cross_gbps=400
                ),
            }
        )
    )
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        "\n".join(json.dumps({"input_tokens": 300 + i, "output_tokens": 100}) for i in range(50))
    )
    assert (
        main(["plan", "-f", resource(), "--nodes", str(nodes), "--trace", str(trace), "--output", "json"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["placement"] == "high-affinity"


@pytest.mark.parametrize(
    "case", ["missing", "bad-yaml", "invalid-spec", "bad-cluster", "bad-rate", "bad-trace"]
)
def test_bad_input_exits_2_with_one_line(case, resource, tmp_path, capsys):
    path = resource()
    args = ["plan", "-f", path, "--cluster", "4x8"]
    if case == "missing":
        args[2] = str(tmp_path / "nope.yaml")
    elif case == "bad-yaml":
        (tmp_path / "b.yaml").write_text("spec: [unclosed")
        args[2] = str(tmp_path / "b.yaml")
    elif case == "invalid-spec":
        args[2] = resource(slo={"ttftMs": -1})
    elif case == "bad-cluster":
        args[4] = "four-by-eight"
    elif case == "bad-rate":
        args += ["--rate", "0"]
    else:
        (tmp_path / "t.jsonl").write_text('{"input_tokens": 0}\n')
        args += ["--trace", str(tmp_path / "t.jsonl")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


@pytest.mark.parametrize(
    ("over", "cluster", "reason"),
    [
        ({"slo": {"ttftMs": 20}}, "4x8", "SLOUnattainable"),
        ({}, "0x8", None),
        (
            {
                "model": {
                    "name": "m",
                    "source": {"path": "/m"},
                    "facts": {"layers": 8, "attentionHeads": 8, "hiddenSize": 512, "parameters": 10**13},
                },
                # a GPU the roofline table lacks: no estimate either
                "hardware": {"gpuProduct": "NVIDIA-GeForce-GT-710"},
            },
            "4x8",
            "ProfileMissing",
        ),
    ],
)
def test_impossible_plans_exit_1_with_reason(over, cluster, reason, resource, capsys):
    code = main(["plan", "-f", resource(**over), "--cluster", cluster])
    err = capsys.readouterr().err
    if reason is None:  # 0 nodes is a bad --cluster, not an impossible plan
        assert code == 2
    else:
        assert code == 1 and err.startswith(f"error: {reason}:")


def test_model_too_large_exits_1(resource, capsys):
    facts = {"layers": 64, "attentionHeads": 72, "hiddenSize": 9216, "parameters": 10**12}
    code = main(
        [
            "plan",
            "-f",
            resource(model={"name": "facebook/opt-66b", "source": {"path": "/m"}, "facts": facts}),
            "--cluster",
            "4x8",
        ]
    )
    assert code == 1 and "ModelTooLarge" in capsys.readouterr().err


def test_empty_cluster_exits_1(resource, tmp_path, capsys):
    nodes = tmp_path / "n.yaml"
    nodes.write_text("apiVersion: v1\nkind: List\nitems: []\n")
    assert main(["plan", "-f", resource(), "--nodes", str(nodes)]) == 1
    assert "NoCapacity" in capsys.readouterr().err
