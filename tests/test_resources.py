"""Resource builders: what the operator asks of the cluster, checked object by object."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest

from disaggserve.api import parse_spec
from disaggserve.api.crd import build_crd
from disaggserve.planner import plan_for
from disaggserve.resources import Owner, RenderError, build_children
from helpers import example

UID = "0b0e4b8e-5d2c-4a39-9d84-1f1d6a2b7c11"


def render(body: dict, uid: str | None = UID) -> dict[tuple[str, str], dict]:
    spec = parse_spec(body["spec"])
    objects = build_children(Owner(body["metadata"]["name"], "ns", uid), spec, plan_for(spec))
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def gpu_example(placement: str = "low-affinity") -> dict:
    body = example("opt", file="opt-13b-low-affinity.yaml")
    body["spec"]["placement"] = placement
    body["spec"]["hardware"]["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    body["spec"]["hardware"]["nodeSelector"] = {"pool": "a100"}
    return body


def pod(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def test_cpu_mode_children_and_owner_references():
    objs = render(example())
    kinds = sorted(objs)
    assert kinds == sorted(
        [
            ("ConfigMap", "tiny-plan"),
            ("Service", "tiny-prefill"),
            ("Service", "tiny-decode"),
            ("StatefulSet", "tiny-prefill"),
            ("StatefulSet", "tiny-decode"),
            ("PodDisruptionBudget", "tiny-prefill"),
            ("PodDisruptionBudget", "tiny-decode"),
            ("ServiceAccount", "tiny-router"),
            ("Role", "tiny-router"),
            ("RoleBinding", "tiny-router"),
            ("Deployment", "tiny-router"),
            ("Service", "tiny-router"),
            ("Secret", "tiny-worker-token"),
            ("NetworkPolicy", "tiny-workers"),
        ]
    )
    for obj in objs.values():
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref["uid"] == UID and ref["controller"] is True and ref["kind"] == "DisaggServe"
    worker = pod(objs["StatefulSet", "tiny-prefill"])["containers"][0]
    assert "nvidia.com/gpu" not in worker["resources"]["requests"]
    assert worker["args"][:4] == ["serve", "--role", "prefill", "--model"]
    assert "--device" in worker["args"] and worker["args"][worker["args"].index("--device") + 1] == "cpu"
    assert objs["Service", "tiny-prefill"]["spec"]["clusterIP"] == "None"


def test_model_dtype_reaches_both_phases_of_builtin_workers():
    """One dtype for prefill and decode (their KV caches must agree); auto renders nothing, so
    existing resources keep their pod templates."""
    body = example()
    assert all("--dtype" not in pod(o)["containers"][0]["args"]
               for o in render(body).values() if o["kind"] == "StatefulSet")
    body["spec"]["model"]["dtype"] = "bfloat16"
    sets = [o for o in render(body).values() if o["kind"] == "StatefulSet"]
    assert len(sets) == 2
    for obj in sets:
        args = pod(obj)["containers"][0]["args"]
        assert args[args.index("--dtype") + 1] == "bfloat16"


def test_builtin_prefill_pods_batch_up_to_the_plan_l_m_and_decode_pods_keep_the_default():
    """The plan's prefill budget (DistServe's L_m from the profile) reaches the prefill worker's
    --max-batch-tokens, which the worker's own parser accepts; decode pods render none."""
    from disaggserve_worker.cli import build_parser

    for body in (example(), gpu_example("high-affinity")):
        spec = parse_spec(body["spec"])
        plan = plan_for(spec)
        assert plan.prefill.max_batch_tokens is not None
        objects = build_children(Owner(body["metadata"]["name"], "ns", UID), spec, plan)
        sets = {o["metadata"]["labels"]["app.kubernetes.io/component"]: o
                for o in objects if o["kind"] == "StatefulSet"}
        prefill = pod(sets["prefill"])["containers"][0]["args"]
        assert build_parser().parse_args(prefill).max_batch_tokens == plan.prefill.max_batch_tokens
        assert "--max-batch-tokens" not in pod(sets["decode"])["containers"][0]["args"]
    # tiny-cpu.yaml is a hand-written plan on tiny-llama: its budget is the built-in CPU profile's L_m.
    assert plan_for(parse_spec(example()["spec"])).prefill.max_batch_tokens == 1408


def test_offline_render_has_no_owner_references():
    assert all("ownerReferences" not in o["metadata"] for o in render(example(), uid=None).values())


def test_gpu_requests_affinity_and_tolerations():
    objs = render(gpu_example("high-affinity"))
    prefill = objs["StatefulSet", "opt-prefill"]
    decode = objs["StatefulSet", "opt-decode"]
    assert pod(prefill)["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"  # tensor 2
    assert pod(decode)["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    term = pod(prefill)["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["nodeSelectorTerms"][0]["matchExpressions"][0] == {
        "key": "nvidia.com/gpu.product",
        "operator": "In",
        "values": ["NVIDIA-A100-SXM4-80GB"],
    }
    assert pod(prefill)["nodeSelector"] == {"pool": "a100"}
    assert pod(prefill)["tolerations"][0]["key"] == "nvidia.com/gpu"
    spread = pod(prefill)["topologySpreadConstraints"][0]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert prefill["spec"]["replicas"] == 2
    router = pod(objs["Deployment", "opt-router"])
    assert "affinity" not in router, "the router needs no GPU node"


def test_low_affinity_units_share_a_node():
    objs = render(gpu_example("low-affinity"))
    for unit in (0, 1):
        for phase in ("prefill", "decode"):
            sts = objs["StatefulSet", f"opt-u{unit}-{phase}"]
            assert sts["spec"]["replicas"] == 1
            (term,) = pod(sts)["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            assert term["topologyKey"] == "kubernetes.io/hostname"
            assert term["labelSelector"]["matchLabels"]["disaggserve.io/unit"] == str(unit)
            assert sts["spec"]["template"]["metadata"]["labels"]["disaggserve.io/unit"] == str(unit)
            env = {e["name"]: e.get("value") for e in pod(sts)["containers"][0]["env"]}
            assert env["DISAGGSERVE_UNIT"] == str(unit)
    assert ("StatefulSet", "opt-prefill") not in objs


def test_restricted_security_and_model_volume():
    body = gpu_example()
    objs = render(body)
    for key in [("StatefulSet", "opt-u0-prefill"), ("Deployment", "opt-router")]:
        spec = pod(objs[key])
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        ctx = spec["containers"][0]["securityContext"]
        assert ctx["readOnlyRootFilesystem"] and ctx["capabilities"] == {"drop": ["ALL"]}
        assert not ctx["allowPrivilegeEscalation"]
        mounts = {m["mountPath"]: m for m in spec["containers"][0]["volumeMounts"]}
        assert mounts["/models"]["readOnly"] is True and "/tmp" in mounts
        claims = [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
        assert claims[0]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}


def test_api_key_secret_is_mounted_for_the_router():
    body = example()
    body["spec"]["router"] = {"replicas": 2, "apiKeySecretRef": {"name": "keys", "key": "token"}}
    router = render(body)["Deployment", "tiny-router"]
    assert router["spec"]["replicas"] == 2
    args = pod(router)["containers"][0]["args"]
    assert args[args.index("--api-key-file") + 1] == "/var/run/secrets/disaggserve/api-key"
    secret = next(v for v in pod(router)["volumes"] if "secret" in v)
    assert secret["secret"] == {"secretName": "keys", "items": [{"key": "token", "path": "api-key"}]}


def test_router_timeouts_reach_the_router_only_when_set():
    """spec.router.tokenTimeoutSeconds/prefillTimeoutSeconds become the router's flags, which its
    own parser turns into its config; absent, the flags are left out (no rollout on upgrade)."""
    from disaggserve_worker.router.cli import config_from_args, register

    def router_config(args: list[str]):
        import argparse

        parser = argparse.ArgumentParser()
        register(parser.add_subparsers(dest="command"))
        return config_from_args(parser.parse_args(args))

    plain = pod(render(example())["Deployment", "tiny-router"])["containers"][0]["args"]
    assert "--token-timeout-s" not in plain and "--prefill-timeout-s" not in plain
    assert router_config(plain).token_timeout_s == 30.0
    body = example()
    body["spec"]["router"] = {"tokenTimeoutSeconds": 90, "prefillTimeoutSeconds": 300}
    args = pod(render(body)["Deployment", "tiny-router"])["containers"][0]["args"]
    config = router_config(args)
    assert (config.token_timeout_s, config.prefill_timeout_s) == (90.0, 300.0)


def test_probes_and_draining_grace():
    objs = render(example())
    decode = pod(objs["StatefulSet", "tiny-decode"])
    worker = decode["containers"][0]
    assert worker["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert worker["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert worker["startupProbe"]["failureThreshold"] * worker["startupProbe"]["periodSeconds"] >= 600
    assert (
        decode["terminationGracePeriodSeconds"]
        > pod(objs["StatefulSet", "tiny-prefill"])["terminationGracePeriodSeconds"]
    )


def test_names_too_long_for_pods_are_refused():
    body = example(name="x" * 41)
    spec = parse_spec(body["spec"])
    with pytest.raises(RenderError, match="at most 40"):
        build_children(Owner(body["metadata"]["name"], "ns"), spec, plan_for(spec))


@pytest.mark.parametrize("placement", ["high-affinity", "low-affinity"])
def test_rendered_objects_pass_kubernetes_validate_strict(placement):
    for body in (example(), gpu_example(placement)):
        b = copy.deepcopy(body)
        b["spec"]["router"] = {"apiKeySecretRef": {"name": "k"}}
        for obj in render(b).values():
            kubernetes_validate.validate(obj, "1.30.0", strict=True)


def test_crd_passes_kubernetes_validate_strict():
    kubernetes_validate.validate(build_crd(), "1.30.0", strict=True)
