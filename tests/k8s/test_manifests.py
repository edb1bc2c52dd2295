"""Every kustomization renders with real kubectl, validates strictly against the official schemas of
the oldest and newest Kubernetes we support, and keeps the invariants schemas cannot see."""

import copy
from functools import lru_cache

import kubernetes_validate
import pytest

from tests.k8s.manifests import CHECKS, KUSTOMIZATIONS, OVERLAYS, all_problems, render

KUBERNETES_VERSIONS = ["1.27.0", "1.37.0"]  # oldest and newest supported
CUSTOM_RESOURCES = {"monitoring.coreos.com/v1"}  # checked in test_monitoring.py


@lru_cache(maxsize=None)
def rendered(kustomization):
    return render(kustomization)


def objects_of(kustomization):
    return copy.deepcopy(rendered(kustomization))


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_renders_with_real_kustomize(kustomization):
    kinds = {o["kind"] for o in rendered(kustomization)}
    assert kinds, kustomization
    if kustomization in OVERLAYS:
        assert {"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "Namespace"} <= kinds


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_object_validates_strictly_against_the_official_schema(kustomization, version):
    for o in rendered(kustomization):
        if o["apiVersion"] in CUSTOM_RESOURCES:
            continue
        kubernetes_validate.validate(o, version, strict=True)  # raises on any error


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_schema_validation_fails_on_a_removed_api_and_an_unknown_field(version):
    hpa = next(o for o in objects_of("overlays/gpu") if o["kind"] == "HorizontalPodAutoscaler")
    old = {**copy.deepcopy(hpa), "apiVersion": "autoscaling/v2beta2"}  # removed in 1.26
    with pytest.raises(kubernetes_validate.utils.SchemaNotFoundError):
        kubernetes_validate.validate(old, version, strict=True)
    typo = copy.deepcopy(hpa)
    typo["spec"]["maxReplica"] = typo["spec"].pop("maxReplicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, version, strict=True)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_invariants_hold(kustomization):
    assert all_problems(rendered(kustomization)) == []


def find(objects, kind, name=None):
    return next(o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name))


def triton(objects):
    return find(objects, "Deployment", "triton")["spec"]["template"]["spec"]["containers"][0]


def break_selector(objects):
    find(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] = "other"


def break_probe_port(objects):
    triton(objects)["readinessProbe"]["httpGet"]["port"] = "htttp"


def break_service_port(objects):
    find(objects, "Service", "triton-grpc")["spec"]["ports"][0]["targetPort"] = "grcp"


def break_gpu_limit(objects):
    triton(objects)["resources"]["requests"]["nvidia.com/gpu"] = "2"


def break_quantity(objects):
    triton(objects)["resources"]["limits"]["memory"] = "16 Gi"


def break_hpa_target(objects):
    find(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"] = "tritn"


def break_hpa_bounds(objects):
    find(objects, "HorizontalPodAutoscaler")["spec"]["minReplicas"] = 9


def break_pdb_both(objects):
    find(objects, "PodDisruptionBudget")["spec"]["minAvailable"] = 1


def break_pdb_neither(objects):
    del find(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"]


def break_metrics_port(objects):
    container = triton(objects)
    container["ports"] = [p for p in container["ports"] if p["containerPort"] != 8002]
    container["args"] = [a for a in container["args"] if not a.startswith("--metrics-port")]


def break_name(objects):
    find(objects, "Service", "triton")["metadata"]["name"] = "Triton_Service"


def break_latest(objects):
    triton(objects)["image"] = "nvcr.io/nvidia/tritonserver:latest"


def break_untagged(objects):
    triton(objects)["image"] = "nvcr.io/nvidia/tritonserver"


def break_service_monitor(objects):
    find(objects, "ServiceMonitor")["spec"]["endpoints"][0]["port"] = "metric"


BROKEN = {
    break_selector: "selectors", break_probe_port: "ports", break_service_port: "ports", break_gpu_limit: "resources",
    break_quantity: "resources", break_hpa_target: "autoscaling", break_hpa_bounds: "autoscaling",
    break_pdb_both: "autoscaling", break_pdb_neither: "autoscaling", break_metrics_port: "triton-ports",
    break_name: "names", break_latest: "images", break_untagged: "images", break_service_monitor: "selectors",
}


@pytest.mark.parametrize("breakage", list(BROKEN), ids=lambda f: f.__name__)
def test_each_invariant_fails_on_a_broken_copy(breakage):
    objects = objects_of("overlays/gpu")
    breakage(objects)
    assert CHECKS[BROKEN[breakage]](objects), f"{BROKEN[breakage]} did not notice {breakage.__name__}"


def test_gpu_overlay_requests_a_gpu_and_cpu_overlays_do_not():
    gpu = triton(objects_of("overlays/gpu"))
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == gpu["resources"]["requests"]["nvidia.com/gpu"] == "1"
    for overlay in ("overlays/cpu", "overlays/dev"):
        container = triton(objects_of(overlay))
        assert "nvidia.com/gpu" not in str(container["resources"])
        assert "--model-config-name=cpu" in container["args"]


def test_deployment_is_hardened_and_drains_gracefully():
    objects = objects_of("overlays/gpu")
    deployment = find(objects, "Deployment", "triton")
    pod, container = deployment["spec"]["template"]["spec"], triton(objects)
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"]
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/dev/shm", "/tmp", "/models"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # model load and warmup
    grace = pod["terminationGracePeriodSeconds"]
    exit_timeout = int(next(a for a in container["args"] if a.startswith("--exit-timeout-secs=")).split("=")[1])
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert grace > pre_stop + exit_timeout
    assert "--model-control-mode=poll" in container["args"]


def test_s3_overlay_reads_the_bucket_with_a_credential_file_and_no_volume():
    objects = objects_of("overlays/gpu-s3")
    container = triton(objects)
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MODEL_REPOSITORY"] == "s3://histoserve-models/model_repository"
    assert "--model-repository=$(MODEL_REPOSITORY)" in container["args"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "cloud-credentials")
    assert env["TRITON_CLOUD_CREDENTIAL_PATH"].startswith(mount["mountPath"] + "/") and mount["readOnly"]
    pod = find(objects, "Deployment", "triton")["spec"]["template"]["spec"]
    assert {"name": "cloud-credentials", "secret": {"secretName": "triton-s3-credentials", "defaultMode": 0o400}} in pod["volumes"]
    assert all(v["name"] != "model-repository" for v in pod["volumes"])
    assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
