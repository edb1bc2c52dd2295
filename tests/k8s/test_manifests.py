"""Every kustomization renders with real kubectl, validates strictly against the official schemas of
the oldest and newest Kubernetes we support (custom resources against their published CRDs), and
keeps the invariants schemas cannot see."""

import copy
from functools import cache

import jsonschema
import kubernetes_validate
import pytest

from tests.k8s import custom_resources
from tests.k8s.kubelet import expand
from tests.k8s.manifests import CHECKS, KUSTOMIZATIONS, OVERLAYS, all_problems, render

KUBERNETES_VERSIONS = ["1.27.0", "1.37.0"]  # oldest and newest supported


@cache
def rendered(kustomization):
    return render(kustomization)


def objects_of(kustomization):
    return copy.deepcopy(rendered(kustomization))


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_renders_with_real_kustomize(kustomization):
    kinds = {o["kind"] for o in rendered(kustomization)}
    assert kinds, kustomization
    if kustomization in OVERLAYS:  # the Namespace is the platform's (k8s/platform)
        assert {"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"} <= kinds


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_object_validates_strictly_against_the_official_schema(kustomization, version):
    for o in rendered(kustomization):
        if custom_resources.is_custom(o):
            continue  # validated against its CRD below
        kubernetes_validate.validate(o, version, strict=True)  # raises on any error


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_custom_resource_validates_against_its_published_crd(kustomization):
    for o in rendered(kustomization):
        if custom_resources.is_custom(o):
            custom_resources.validate(o)  # raises on any error; KeyError when no schema is vendored


def misspell(path, wrong):
    def breakage(o):
        node = o
        for key in path[:-1]:
            node = node[key]
        node[wrong] = node.pop(path[-1])
    breakage.__name__ = f"{'.'.join(map(str, path))}->{wrong}"
    return breakage


@pytest.mark.parametrize("overlay, kind, breakage", [
    ("overlays/gpu-gateway", "ServiceMonitor", misspell(["spec", "endpoints", 0, "scrapeTimeout"], "scrapeTimeOut")),
    ("overlays/gpu-gateway", "PrometheusRule", misspell(["spec", "groups", 0, "rules", 0, "expr"], "exp")),
    ("overlays/gpu-gateway", "Gateway", misspell(["spec", "listeners", 0, "protocol"], "protocl")),
    ("overlays/gpu-gateway", "GRPCRoute", misspell(["spec", "rules", 0, "backendRefs"], "backendRef")),
    ("overlays/gpu-gateway", "ClientTrafficPolicy", misspell(["spec", "tls", "clientValidation", "caCertificateRefs"], "caCertificateRef")),
    ("overlays/gpu-gateway", "SecurityPolicy", misspell(["spec", "authorization", "defaultAction"], "default")),
    ("overlays/gpu-gateway", "BackendTrafficPolicy", misspell(["spec", "requestBuffer", "limit"], "maxSize")),
    ("overlays/gpu-gateway", "EnvoyProxy", misspell(["spec", "telemetry", "tracing", "samplingFraction"], "samplingFractions")),
    ("overlays/gpu-gateway", "EnvoyProxy", misspell(["spec", "backendTLS", "clientCertificateRef"], "clientCertificate")),
    ("overlays/gpu-gateway", "BackendTLSPolicy", misspell(["spec", "validation", "hostname"], "hostName")),
    ("overlays/gpu", "Certificate", misspell(["spec", "issuerRef"], "issuer")),
    ("overlays/gpu", "Issuer", misspell(["spec", "ca", "secretName"], "secret")),
    ("overlays/gpu-canary", "Rollout", misspell(["spec", "workloadRef", "scaleDown"], "scaledown")),
    ("overlays/gpu-canary", "Rollout", misspell(["spec", "strategy", "canary", "canaryService"], "canaryServiceName")),
    ("overlays/gpu-canary", "AnalysisTemplate", misspell(["spec", "metrics", 0, "successCondition"], "successCriteria")),
    ("overlays/gpu-canary", "AnalysisTemplate", misspell(["spec", "metrics", 0, "provider", "prometheus", "query"], "expr")),
], ids=lambda v: v if isinstance(v, str) else v.__name__)
def test_crd_validation_fails_on_a_misspelt_field(overlay, kind, breakage):
    obj = next(o for o in objects_of(overlay) if o["kind"] == kind)
    custom_resources.validate(obj)
    breakage(obj)
    with pytest.raises(jsonschema.ValidationError):
        custom_resources.validate(obj)


def test_crd_validation_fails_on_a_wrong_type_and_an_unknown_kind():
    monitor = next(o for o in objects_of("overlays/gpu") if o["kind"] == "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["port"] = 8002  # a port *name*, a string
    with pytest.raises(jsonschema.ValidationError):
        custom_resources.validate(monitor)
    with pytest.raises(KeyError):
        custom_resources.validate({"apiVersion": "monitoring.coreos.com/v1", "kind": "Probe", "spec": {}})


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
    probe = triton(objects)["readinessProbe"]
    (probe.get("grpc") or probe["httpGet"])["port"] = 8010


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


def break_http_port_left_behind(objects):  # HTTP off, yet a Service still sends callers to it
    triton(objects)["ports"].append({"name": "http", "containerPort": 8000, "protocol": "TCP"})
    find(objects, "Service", "triton")["spec"]["ports"].append({"name": "http", "port": 8000, "targetPort": "http"})


def break_http_probe(objects):
    triton(objects)["livenessProbe"] = {"httpGet": {"path": "/v2/health/live", "port": 8000}, "timeoutSeconds": 5}


def break_no_restriction(objects):
    container = triton(objects)
    container["args"] = [a for a in container["args"] if not a.startswith("--grpc-restricted-protocol")]


def break_literal_key(objects):
    container = triton(objects)
    container["args"] = [a.replace("$(TRITON_ADMIN_KEY)", "s3cr3t-in-the-manifest") for a in container["args"]]


def break_key_from_plain_env(objects):
    container = triton(objects)
    container["env"] = [{"name": "TRITON_ADMIN_KEY", "value": "s3cr3t-in-the-manifest"} if e["name"] == "TRITON_ADMIN_KEY" else e
                        for e in container["env"]]


def break_statistics_left_open(objects):
    container = triton(objects)
    container["args"] = [a.replace("statistics,", "") if a.startswith("--grpc-restricted-protocol") else a for a in container["args"]]


def break_secret_in_manifests(objects):
    objects.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "triton-admin-key", "namespace": "histoserve"},
                    "stringData": {"admin-key": "s3cr3t-in-the-manifest"}})


def break_route_admits_the_whole_service(objects):  # what main had: every admin RPC reachable from outside
    find(objects, "GRPCRoute")["spec"]["rules"][0]["matches"] = [{"method": {"type": "Exact", "service": "inference.GRPCInferenceService"}}]


def break_route_admits_statistics(objects):
    find(objects, "GRPCRoute")["spec"]["rules"][0]["matches"].append(
        {"method": {"type": "RegularExpression", "service": "inference\\..*", "method": "Model.*"}})


def break_route_keeps_the_admin_header(objects):
    del find(objects, "GRPCRoute")["spec"]["rules"][0]["filters"]


def break_namespace(objects):  # what overlays/gpu-s3 had: a component's object outside the overlay's namespace
    del find(objects, "NetworkPolicy", "model-store-s3-egress")["metadata"]["namespace"]


def break_name(objects):
    find(objects, "Service", "triton")["metadata"]["name"] = "Triton_Service"


def break_latest(objects):
    triton(objects)["image"] = "nvcr.io/nvidia/tritonserver:latest"


def break_untagged(objects):
    triton(objects)["image"] = "nvcr.io/nvidia/tritonserver"


def break_service_monitor(objects):
    find(objects, "ServiceMonitor", "triton")["spec"]["endpoints"][0]["port"] = "metric"


def break_guaranteed_qos(objects):
    triton(objects)["resources"]["requests"]["cpu"] = "4"


def break_probe_timeout(objects):
    del triton(objects)["readinessProbe"]["timeoutSeconds"]


def break_entrypoint(objects):
    container = triton(objects)
    container["command"], container["args"] = ["tritonserver"], container["args"][1:]


def break_progress_deadline(objects):
    find(objects, "Deployment", "triton")["spec"]["progressDeadlineSeconds"] = 600


def break_replicas_beside_hpa(objects):
    find(objects, "Deployment", "triton")["spec"]["replicas"] = 2


def break_storage_class(objects):
    del find(objects, "PersistentVolumeClaim", "triton-model-repository")["spec"]["storageClassName"]


def break_claim_reference(objects):  # what overlays/gpu-s3 did before it dropped the drift monitor
    volumes = find(objects, "Deployment", "histoserve-monitor")["spec"]["template"]["spec"]["volumes"]
    next(v for v in volumes if "persistentVolumeClaim" in v)["persistentVolumeClaim"]["claimName"] = "absent"


def break_records_rollout(objects):
    find(objects, "Deployment", "histoserve-monitor")["spec"]["strategy"] = {"type": "RollingUpdate"}


def break_model_volume_size(objects):  # gpu-s3: the downloaded models outgrow the pod's ephemeral storage
    triton(objects)["resources"]["limits"]["ephemeral-storage"] = "2Gi"


def break_hpa_metric(objects):
    find(objects, "HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["name"] = "triton_queue_time"


def break_route_backend(objects):
    find(objects, "GRPCRoute")["spec"]["rules"][0]["backendRefs"][0]["port"] = 8000


def break_route_listener(objects):
    find(objects, "GRPCRoute")["spec"]["parentRefs"][0]["sectionName"] = "grpc"


def break_rendezvous_host(objects):
    args = find(objects, "Job")["spec"]["template"]["spec"]["containers"][0]["args"]
    args[:] = [a.replace("histoserve-train-0.", "histoserve-train-1.") for a in args]


def break_rendezvous_short_name(objects):  # resolvable only once DNS lists pod 0: it may not know it hosts
    args = find(objects, "Job")["spec"]["template"]["spec"]["containers"][0]["args"]
    args[:] = [a.replace(".histoserve.svc.cluster.local", "") for a in args]


def break_nnodes(objects):
    find(objects, "Job")["spec"]["completions"] = 3


def break_subdomain(objects):
    find(objects, "Job")["spec"]["template"]["spec"]["subdomain"] = "train"


def break_expected_workers(objects):
    find(objects, "Job", "locust")["spec"]["completions"] = 9


def pod_spec(objects):
    return find(objects, "Deployment", "triton")["spec"]["template"]


def break_poll_mode(objects):  # back to polling the shared store, strict readiness kept
    args = triton(objects)["args"]
    args[args.index("--model-control-mode=none")] = "--model-control-mode=poll"


def break_unpinned(objects):  # the overlay forgot its model.yaml
    pod_spec(objects)["metadata"]["annotations"]["histoserve.io/model-version"] = "UNSET"


def break_triton_reads_the_store(objects):  # Triton mounts the claim, not the verified copy
    mount = next(m for m in triton(objects)["volumeMounts"] if m["mountPath"] == "/models")
    mount["name"] = "model-store"


def break_writable_store(objects):
    stage = pod_spec(objects)["spec"]["initContainers"][0]
    next(m for m in stage["volumeMounts"] if m["name"] == "model-store").pop("readOnly")


def break_gate_without_probe(objects):
    pod_spec(objects)["spec"]["containers"][1].pop("readinessProbe")


def break_stage_pinned_by_hand(objects):  # a literal version beside the annotation: the two can disagree
    stage = pod_spec(objects)["spec"]["initContainers"][0]
    stage["env"] = [e if e["name"] != "MODEL_VERSION" else {"name": "MODEL_VERSION", "value": "2"} for e in stage["env"]]


def break_download_after_stage(objects):
    init = pod_spec(objects)["spec"]["initContainers"]
    init.reverse()


def break_gate_asks_another_server(objects):
    command = pod_spec(objects)["spec"]["containers"][1]["command"]
    command[command.index("127.0.0.1:8001")] = "triton-grpc:8001"


def break_hpa_scales_the_deployment(objects):  # the HPA and Argo would fight over the pods
    find(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"] = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "triton"}


def break_route_to_one_service(objects):  # the plugin finds no canary backend to weigh
    find(objects, "GRPCRoute")["spec"]["rules"][0]["backendRefs"] = [{"name": "triton-grpc", "port": 8001}]


def break_missing_template(objects):
    objects.remove(find(objects, "AnalysisTemplate", "triton-canary-predictions"))


def break_missing_argument(objects):
    steps = find(objects, "Rollout")["spec"]["strategy"]["canary"]["steps"]
    for step in steps:
        if "analysis" in step:
            step["analysis"]["args"] = [a for a in step["analysis"]["args"] if a["name"] != "canary-hash"]


def break_rollout_judges_another_version(objects):  # the knob not copied into the Rollout
    find(objects, "Rollout")["metadata"]["annotations"]["histoserve.io/model-version"] = "UNSET"


def break_hash_label_dropped(objects):
    find(objects, "ServiceMonitor", "triton")["spec"].pop("podTargetLabels")


def break_route_backends_share_a_cluster(objects):  # no filters: Envoy Gateway merges both backends into one cluster
    for backend in find(objects, "GRPCRoute")["spec"]["rules"][0]["backendRefs"]:
        backend.pop("filters")


def break_analysis_reads_the_stable_cluster(objects):  # the latency metric's traffic gate counts the stable pods' calls
    metric = next(m for m in find(objects, "AnalysisTemplate", "triton-canary-serving")["spec"]["metrics"] if m["name"] == "latency-p99")
    metric["provider"]["prometheus"]["query"] = metric["provider"]["prometheus"]["query"].replace("backend/1", "backend/0")


def break_adoption_scales_the_deployment_down(objects):
    find(objects, "Rollout")["spec"]["workloadRef"]["scaleDown"] = "progressively"


def break_leaving_holds_the_deployment_at_zero(objects):  # onsuccess: Argo would scale it back to 0 while it comes up
    find(objects, "Rollout")["spec"]["workloadRef"]["scaleDown"] = "onsuccess"


def break_adoption_changes_a_service(objects):  # Argo would put its hash on triton-stable before its pods are Ready
    find(objects, "Rollout")["spec"]["strategy"]["canary"]["stableService"] = "triton-stable"


def break_undeclared_argument(objects):
    metric = find(objects, "AnalysisTemplate", "triton-canary-serving")["spec"]["metrics"][0]
    metric["successCondition"] = metric["successCondition"].replace("max-error-ratio", "max-error-rate")


def replace_arg(objects, prefix, value):
    args = triton(objects)["args"]
    args[next(i for i, a in enumerate(args) if a.startswith(prefix))] = value


def break_trace_level_off(objects):  # mode opentelemetry at the default level OFF: no span at all
    args = triton(objects)["args"]
    args.remove("--trace-config=level=TIMESTAMPS")


def break_trace_every_request(objects):  # a later setting wins: rate 1 traces every request (server#7795)
    triton(objects)["args"].append("--trace-config=rate=1")


def break_trace_url_to_no_service(objects):
    replace_arg(objects, "--trace-config=opentelemetry,url=",
                "--trace-config=opentelemetry,url=http://otel-collecter.$(POD_NAMESPACE).svc.cluster.local:4318/v1/traces")


def break_trace_resource_written_by_hand(objects):  # every pod would claim the same name
    replace_arg(objects, "--trace-config=opentelemetry,resource=k8s.pod.name=", "--trace-config=opentelemetry,resource=k8s.pod.name=triton")


def break_trace_version_from_elsewhere(objects):  # a literal version beside the annotation: the two can disagree
    container = triton(objects)
    container["env"] = [e if e["name"] != "MODEL_VERSION" else {"name": "MODEL_VERSION", "value": "2"} for e in container["env"]]


def break_trace_queue_below_batch(objects):
    triton(objects)["args"].append("--trace-config=opentelemetry,bsp_max_queue_size=512")


def break_undefined_variable(objects):  # the URL would keep "$(POD_NAMESPACE)" as written
    container = triton(objects)
    container["env"] = [e for e in container["env"] if e["name"] != "POD_NAMESPACE"]


def collector_config(objects, edit):
    config_map = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("otel-collector-config"))
    key = next(iter(config_map["data"]))
    config_map["data"][key] = edit(config_map["data"][key])


def break_collector_contrib_component(objects):  # k8sattributes ships in contrib, not in the core image
    collector_config(objects, lambda text: text.replace("[memory_limiter, batch]", "[memory_limiter, k8sattributes, batch]")
                     .replace("  batch:\n", "  k8sattributes: {}\n  batch:\n"))


def break_collector_limiter_after_batch(objects):  # batching first holds data the limiter can no longer refuse
    collector_config(objects, lambda text: text.replace("[memory_limiter, batch]", "[batch, memory_limiter]"))


def break_collector_limit_above_container(objects):
    collector_config(objects, lambda text: text.replace("limit_mib: 400", "limit_mib: 600"))


def break_collector_unset_variable(objects):
    container = find(objects, "Deployment", "otel-collector")["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [e for e in container["env"] if e["name"] != "TRACE_BACKEND_ENDPOINT"]


def break_collector_other_release(objects):  # the config is checked against v0.159.0's components
    container = find(objects, "Deployment", "otel-collector")["spec"]["template"]["spec"]["containers"][0]
    container["image"] = "otel/opentelemetry-collector:0.120.0"


def break_gateway_without_its_envoyproxy(objects):
    objects.remove(find(objects, "EnvoyProxy", "triton"))


def break_edge_spans_to_no_service(objects):
    find(objects, "EnvoyProxy", "triton")["spec"]["telemetry"]["tracing"]["provider"]["backendRefs"][0]["port"] = 4316


BROKEN = {  # breakage: (the check that must notice it, the kustomization it breaks)
    break_selector: ("selectors", "overlays/gpu"), break_probe_port: ("ports", "overlays/gpu"),
    break_service_port: ("ports", "overlays/gpu"), break_gpu_limit: ("resources", "overlays/gpu"),
    break_quantity: ("resources", "overlays/gpu"), break_hpa_target: ("autoscaling", "overlays/gpu"),
    break_hpa_bounds: ("autoscaling", "overlays/gpu"), break_pdb_both: ("autoscaling", "overlays/gpu"),
    break_pdb_neither: ("autoscaling", "overlays/gpu"), break_metrics_port: ("triton-ports", "overlays/gpu"),
    break_name: ("names", "overlays/gpu"), break_latest: ("images", "overlays/gpu"),
    break_untagged: ("images", "overlays/gpu"), break_service_monitor: ("selectors", "overlays/gpu"),
    break_guaranteed_qos: ("rollout", "overlays/gpu"), break_probe_timeout: ("rollout", "overlays/gpu"),
    break_entrypoint: ("rollout", "overlays/gpu"), break_progress_deadline: ("rollout", "overlays/gpu"),
    break_replicas_beside_hpa: ("rollout", "overlays/gpu"), break_storage_class: ("storage", "platform"),
    break_claim_reference: ("storage", "overlays/cpu"), break_records_rollout: ("storage", "overlays/gpu"),
    break_model_volume_size: ("storage", "overlays/gpu-s3"), break_hpa_metric: ("wiring", "overlays/gpu"),
    break_route_backend: ("wiring", "overlays/gpu-gateway"), break_route_listener: ("wiring", "overlays/gpu-gateway"),
    break_rendezvous_host: ("wiring", "jobs/training"), break_nnodes: ("wiring", "jobs/training"),
    break_subdomain: ("wiring", "jobs/training"), break_expected_workers: ("wiring", "jobs/loadtest"),
    break_rendezvous_short_name: ("wiring", "jobs/training"),
    break_http_port_left_behind: ("triton-ports", "overlays/gpu"), break_http_probe: ("triton-ports", "overlays/cpu"),
    break_no_restriction: ("admin", "overlays/gpu"), break_literal_key: ("admin", "overlays/dev"),
    break_key_from_plain_env: ("admin", "overlays/gpu"), break_statistics_left_open: ("admin", "overlays/cpu"),
    break_secret_in_manifests: ("admin", "overlays/gpu"), break_route_admits_the_whole_service: ("edge", "overlays/gpu-gateway"),
    break_route_admits_statistics: ("edge", "overlays/gpu-gateway"), break_route_keeps_the_admin_header: ("edge", "overlays/gpu-gateway"),
    break_namespace: ("names", "overlays/gpu-s3"),
    break_poll_mode: ("pinned", "overlays/gpu"), break_unpinned: ("pinned", "overlays/gpu"),
    break_triton_reads_the_store: ("pinned", "overlays/gpu"), break_writable_store: ("pinned", "overlays/cpu"),
    break_gate_without_probe: ("pinned", "overlays/gpu"), break_stage_pinned_by_hand: ("pinned", "overlays/gpu"),
    break_download_after_stage: ("pinned", "overlays/gpu-s3"), break_gate_asks_another_server: ("pinned", "overlays/cpu"),
    break_hpa_scales_the_deployment: ("canary", "overlays/gpu-canary"), break_route_to_one_service: ("canary", "overlays/gpu-canary"),
    break_missing_template: ("canary", "overlays/gpu-canary"), break_missing_argument: ("canary", "overlays/gpu-canary"),
    break_rollout_judges_another_version: ("canary", "overlays/gpu-canary"), break_hash_label_dropped: ("canary", "overlays/gpu-canary"),
    break_undeclared_argument: ("canary", "overlays/gpu-canary"),
    break_route_backends_share_a_cluster: ("canary", "overlays/gpu-canary"),
    break_analysis_reads_the_stable_cluster: ("canary", "overlays/gpu-canary"),
    break_adoption_scales_the_deployment_down: ("canary", "overlays/gpu-canary-adopt"),
    break_adoption_changes_a_service: ("canary", "overlays/gpu-canary-adopt"),
    break_leaving_holds_the_deployment_at_zero: ("canary", "overlays/gpu-canary-leave"),
    break_trace_level_off: ("tracing", "overlays/gpu"), break_trace_every_request: ("tracing", "overlays/cpu"),
    break_trace_url_to_no_service: ("tracing", "overlays/gpu"), break_trace_resource_written_by_hand: ("tracing", "overlays/gpu"),
    break_trace_version_from_elsewhere: ("tracing", "overlays/cpu"), break_trace_queue_below_batch: ("tracing", "overlays/gpu"),
    break_undefined_variable: ("variables", "overlays/gpu"), break_collector_contrib_component: ("tracing", "overlays/gpu"),
    break_collector_limiter_after_batch: ("tracing", "overlays/cpu"), break_collector_limit_above_container: ("tracing", "overlays/gpu"),
    break_collector_unset_variable: ("tracing", "overlays/gpu"), break_collector_other_release: ("tracing", "overlays/gpu"),
    break_gateway_without_its_envoyproxy: ("tracing", "overlays/gpu-gateway"),
    break_edge_spans_to_no_service: ("tracing", "overlays/gpu-gateway"),
}


@pytest.mark.parametrize("breakage", list(BROKEN), ids=lambda f: f.__name__)
def test_each_invariant_fails_on_a_broken_copy(breakage):
    check, kustomization = BROKEN[breakage]
    objects = objects_of(kustomization)
    assert CHECKS[check](objects) == [], f"{check} fails on the real {kustomization}"
    breakage(objects)
    assert CHECKS[check](objects), f"{check} did not notice {breakage.__name__}"


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
    for probe, path in (("startupProbe", "/triton/ready"), ("readinessProbe", "/triton/ready"), ("livenessProbe", "/triton/live")):
        assert container[probe]["httpGet"] == {"path": path, "port": 8003}, probe  # the golden gate asks Triton over mutual TLS
    startup, liveness = container["startupProbe"], container["livenessProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # model load and warmup
    grace = pod["terminationGracePeriodSeconds"]
    exit_timeout = int(next(a for a in container["args"] if a.startswith("--exit-timeout-secs=")).split("=")[1])
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert grace > pre_stop + exit_timeout
    # liveness must outlast the drain (Triton's gRPC endpoint closes at SIGTERM, so ServerLive fails too)
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > exit_timeout
    for flag in ("--model-control-mode=none", "--strict-readiness=true", "--exit-on-error=true", "--allow-http=false",
                 "--grpc-max-connection-age=60000", "--grpc-keepalive-permit-without-calls=true"):
        assert flag in container["args"], flag
    for other in pod["initContainers"] + pod["containers"][1:]:  # model-stage, golden-gate: as locked down
        assert other["securityContext"] == container["securityContext"], other["name"]
    pdb = find(objects, "PodDisruptionBudget", "triton")
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"  # a crash-looping pod never blocks a drain
    assert container["args"][0] == "tritonserver" and "command" not in container  # the NGC entrypoint runs it


def test_s3_overlay_downloads_only_the_pinned_version_before_the_stage_and_triton_holds_no_credentials():
    objects = objects_of("overlays/gpu-s3")
    template = find(objects, "Deployment", "triton")["spec"]["template"]
    pod, annotations = template["spec"], template["metadata"]["annotations"]
    download, stage = pod["initContainers"]
    assert (download["name"], stage["name"]) == ("model-download", "model-stage")  # downloaded, then verified
    env = {e["name"]: e.get("value") or e["valueFrom"]["fieldRef"]["fieldPath"] for e in download["env"]}
    assert env["MODEL_SOURCE"] == "s3://histoserve-models/model_repository"
    assert env["MODEL_NAME"] == "metadata.annotations['histoserve.io/model']"
    assert env["MODEL_VERSION"] == "metadata.annotations['histoserve.io/model-version']"
    assert expand(download["args"], download, {}, annotations)[-2:] == [  # that version's folder, nothing else
        f"s3://histoserve-models/model_repository/{annotations['histoserve.io/model']}/{annotations['histoserve.io/model-version']}/",
        f"/store/{annotations['histoserve.io/model']}/{annotations['histoserve.io/model-version']}/"]
    credentials = next(m for m in download["volumeMounts"] if m["name"] == "model-store-credentials")
    assert env["AWS_SHARED_CREDENTIALS_FILE"].startswith(credentials["mountPath"] + "/") and credentials["readOnly"]
    assert {"name": "model-store", "mountPath": "/store"} in download["volumeMounts"]
    assert {"name": "model-store", "mountPath": "/store", "readOnly": True} in stage["volumeMounts"]
    for container in pod["containers"] + [stage]:
        assert "envFrom" not in container and all("AWS" not in e["name"] for e in container.get("env", []))
        assert all(m["name"] != "model-store-credentials" for m in container["volumeMounts"])
    skipped = set(annotations["eks.amazonaws.com/skip-containers"].split(","))
    assert skipped == {c["name"] for c in pod["containers"] + pod["initContainers"]} - {"model-download"}
    assert {"name": "model-repository", "mountPath": "/models", "readOnly": True} in triton(objects)["volumeMounts"]
    volume = next(v for v in pod["volumes"] if v["name"] == "model-store")
    assert volume == {"name": "model-store", "emptyDir": {"sizeLimit": "2Gi"}}
    assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    secret = next(v for v in pod["volumes"] if v["name"] == "model-store-credentials")["secret"]
    assert secret == {"secretName": "model-store-s3-credentials", "optional": True, "defaultMode": 0o400}


def test_the_cpu_overlay_gives_triton_the_cores_the_exported_cpu_config_uses():
    """configs/cpu.pbtxt sets ONNX Runtime's intra-op threads (ONNX Runtime's own default is the node's
    core count); the CPU pod must request that many cores, or the threads fight over fewer."""
    from histoserve.export.publish import CpuTuning

    resources = triton(rendered("overlays/cpu"))["resources"]
    cores = CpuTuning.instance_count * CpuTuning.intra_op_threads
    assert resources["requests"]["cpu"] == str(cores)
    assert int(resources["limits"]["cpu"]) >= cores
