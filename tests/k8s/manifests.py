"""Rendering the kustomizations with real kubectl, and the invariants that schemas cannot see.

Each check returns a list of problems (empty when fine), so a test can assert both that the real
manifests pass and that a deliberately broken copy fails.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
KUBECTL = Path(sys.executable).parent / "kubectl"
OVERLAYS = ["overlays/gpu", "overlays/gpu-s3", "overlays/gpu-gateway", "overlays/gpu-canary", "overlays/gpu-canary-adopt",
            "overlays/gpu-canary-leave", "overlays/cpu", "overlays/dev"]
JOBS = ["jobs/loadtest", "jobs/training", "jobs/publish", "jobs/publish-s3", "jobs/slides"]
# What outlives the overlays (the Namespace, the model store's claim, the image policy), applied first.
PLATFORMS = ["platform", "platform/s3", "platform/dev"]
KUSTOMIZATIONS = OVERLAYS + JOBS + PLATFORMS
DIGEST = re.compile(r"^[^@\s]+@sha256:[0-9a-f]{64}$")
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
PORT_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
QUANTITY = re.compile(r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei|e[0-9]+)?$")
SUFFIX = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
GRPC_PORT, METRICS_PORT, HTTP_PORT = 8001, 8002, 8000
ADAPTER_RULES = K8S / "components" / "monitoring" / "prometheus-adapter-rules.yaml"
IMAGE_PULL_ALLOWANCE_S = 900  # a ~15 GB Triton image on a fresh node
CLUSTER_DOMAIN = "cluster.local"  # Kubernetes' default


def render(kustomization: str) -> list[dict]:
    result = subprocess.run([str(KUBECTL), "kustomize", str(K8S / kustomization)], capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize {kustomization} failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def platform_for(kustomization: str) -> str:
    """The platform kustomization an overlay or job is applied on."""
    return {"overlays/dev": "platform/dev", "overlays/gpu-s3": "platform/s3"}.get(kustomization, "platform")


@cache
def _rendered(kustomization: str) -> str:
    return json.dumps(render(kustomization))


def render_cached(kustomization: str) -> list[dict]:
    """render(), once per run (a copy each call)."""
    return json.loads(_rendered(kustomization))


def pod_templates(objects: list[dict]) -> list[tuple[dict, dict]]:
    return [(o, o["spec"]["template"]) for o in objects if o["kind"] in WORKLOADS]


def triton_pods(objects: list[dict]) -> list[tuple[dict, dict, dict, list[str]]]:
    """(workload, pod template, Triton container, Triton's command words) of each workload running Triton."""
    found = []
    for workload, template in pod_templates(objects):
        triton = next((c for c in template["spec"]["containers"] if triton_command(c)), None)
        if triton is not None:
            found.append((workload, template, triton, triton_command(triton)))
    return found


def containers(template: dict) -> list[dict]:
    spec = template["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def triton_command(container: dict) -> list[str]:
    """tritonserver's argument list (without the program), or [] for another container. The image's
    entrypoint runs `args` when there is no `command`."""
    words = container.get("command", []) + container.get("args", [])
    return words[1:] if words[:1] == ["tritonserver"] else []


def deployment_args(overlay: str) -> tuple[list[str], dict]:
    """tritonserver's arguments in the overlay's Deployment (without the program name), and its container."""
    deployment = next(o for o in render(overlay) if o["kind"] == "Deployment" and o["metadata"]["name"] == "triton")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return triton_command(container), container


def flag(words: list[str], name: str) -> str | None:
    """The value of `--name=value` among command-line words (the last one wins, as in argparse)."""
    values = [w.split("=", 1)[1] for w in words if w.startswith(f"--{name}=")]
    return values[-1] if values else None


def pod_labels(workload: dict) -> dict:
    labels = dict(workload["spec"]["template"]["metadata"].get("labels", {}))
    if workload["kind"] == "Job":  # the Job controller adds these to every pod it creates
        labels["job-name"] = labels["batch.kubernetes.io/job-name"] = workload["metadata"]["name"]
    return labels


def quantity(text) -> float:
    text = str(text)
    match = QUANTITY.match(text)
    if not match:
        raise ValueError(f"not a Kubernetes quantity: {text!r}")
    suffix = match.group(3) or ""
    if suffix.startswith("e"):
        return float(text[: -len(suffix)]) * 10 ** int(suffix[1:])
    return float(text[: len(text) - len(suffix)] if suffix else text) * SUFFIX[suffix]


# --- the invariants -------------------------------------------------------------------------------

def check_selectors(objects: list[dict]) -> list[str]:
    problems = []
    pod_labels = [(o, t["metadata"].get("labels", {})) for o, t in pod_templates(objects)]
    for workload, labels in pod_labels:
        selector = workload["spec"].get("selector", {}).get("matchLabels")
        if workload["kind"] != "Job" and not matches(selector, labels):
            problems.append(f"{workload['kind']}/{workload['metadata']['name']}: selector {selector} does not match its pod labels "
                            f"{labels}")
    for o in objects:
        selector = None
        if o["kind"] == "Service":
            selector = o["spec"].get("selector")
        elif o["kind"] == "PodDisruptionBudget":
            selector = o["spec"]["selector"].get("matchLabels")
        elif o["kind"] == "NetworkPolicy":
            selector = o["spec"]["podSelector"].get("matchLabels")
        if selector is not None and not any(matches(selector, labels) for _, labels in pod_labels):
            problems.append(f"{o['kind']}/{o['metadata']['name']}: selector {selector} matches no pod template")
        if o["kind"] == "ServiceMonitor":
            selector = o["spec"]["selector"]["matchLabels"]
            services = [s for s in objects if s["kind"] == "Service" and matches(selector, s["metadata"].get("labels", {}))]
            if not services:
                problems.append(f"ServiceMonitor/{o['metadata']['name']}: selector {selector} matches no Service")
            for endpoint in o["spec"]["endpoints"]:
                if not any(endpoint["port"] == p.get("name") for s in services for p in s["spec"]["ports"]):
                    problems.append(f"ServiceMonitor/{o['metadata']['name']}: port {endpoint['port']!r} is no Service port name")
    return problems


def check_ports(objects: list[dict]) -> list[str]:
    problems = []
    templates = pod_templates(objects)
    for workload, template in templates:
        # The kubelet probes the pod's address: a port number may be any container's, a port name
        # only the probed container's own.
        pod_numbers = {p["containerPort"] for c in containers(template) for p in c.get("ports", [])}
        for container in containers(template):
            names = {p.get("name") for p in container.get("ports", [])}
            numbers = pod_numbers
            for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(probe_name)
                if not probe:
                    continue
                port = (probe.get("httpGet") or probe.get("tcpSocket") or probe.get("grpc") or {}).get("port")
                if port is not None and port not in names and port not in numbers:
                    problems.append(f"{workload['metadata']['name']}/{container['name']}: {probe_name} port {port!r} is no container port")
    for service in (o for o in objects if o["kind"] == "Service"):
        pods = [t for _, t in templates if matches(service["spec"].get("selector", {}), t["metadata"].get("labels", {}))]
        declared = {(p.get("name"), p["containerPort"]) for t in pods for c in containers(t) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if not any(target in (name, number) for name, number in declared):
                problems.append(f"Service/{service['metadata']['name']}: targetPort {target!r} is no port of its pods")
    for policy in (o for o in objects if o["kind"] == "NetworkPolicy"):
        pods = [t for _, t in templates if matches(policy["spec"]["podSelector"].get("matchLabels", {}), t["metadata"].get("labels", {}))]
        declared = {v for t in pods for c in containers(t) for p in c.get("ports", []) for v in (p.get("name"), p["containerPort"])}
        for rule in policy["spec"].get("ingress", []):
            for port in rule.get("ports", []):
                if port["port"] not in declared:
                    problems.append(f"NetworkPolicy/{policy['metadata']['name']}: port {port['port']!r} is no port of its pods")
    return problems


def check_resources(objects: list[dict]) -> list[str]:
    problems = []
    for workload, template in pod_templates(objects):
        for container in containers(template):
            resources = container.get("resources", {})
            requests, limits = resources.get("requests", {}), resources.get("limits", {})
            where = f"{workload['metadata']['name']}/{container['name']}"
            for kind, values in (("requests", requests), ("limits", limits)):
                for name, value in values.items():
                    try:
                        quantity(value)
                    except ValueError as error:
                        problems.append(f"{where}: {kind}.{name}: {error}")
            gpu_request, gpu_limit = requests.get("nvidia.com/gpu"), limits.get("nvidia.com/gpu")
            if (gpu_request is not None or gpu_limit is not None) and str(gpu_request) != str(gpu_limit):
                problems.append(f"{where}: nvidia.com/gpu request {gpu_request} != limit {gpu_limit}")
            for name in ("cpu", "memory"):
                if name in requests and name in limits:
                    try:
                        if quantity(requests[name]) > quantity(limits[name]):
                            problems.append(f"{where}: {name} request {requests[name]} above limit {limits[name]}")
                    except ValueError:
                        pass
    return problems


def check_autoscaling_and_disruption(objects: list[dict]) -> list[str]:
    problems = []
    for hpa in (o for o in objects if o["kind"] == "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        if not any(o["kind"] == target["kind"] and o["metadata"]["name"] == target["name"] for o in objects):
            problems.append(f"HPA/{hpa['metadata']['name']}: target {target['kind']}/{target['name']} does not exist")
        if not 1 <= hpa["spec"].get("minReplicas", 1) <= hpa["spec"]["maxReplicas"]:
            problems.append(f"HPA/{hpa['metadata']['name']}: need 1 <= minReplicas <= maxReplicas")
    for pdb in (o for o in objects if o["kind"] == "PodDisruptionBudget"):
        fields = [f for f in ("minAvailable", "maxUnavailable") if f in pdb["spec"]]
        if len(fields) != 1:
            problems.append(f"PDB/{pdb['metadata']['name']}: sets {fields or 'neither'}; exactly one of minAvailable/maxUnavailable")
    return problems


def http_allowed(words: list[str]) -> bool:
    return (flag(words, "allow-http") or "true").lower() in ("true", "1")


def check_triton_ports(objects: list[dict]) -> list[str]:
    """gRPC on 8001 and metrics on 8002, declared, flagged and behind a Service; HTTP/REST off, and
    then nowhere: no container port, no Service port, no probe (or, where an overlay turns it on, on
    8000 like the rest)."""
    problems = []
    for workload, template in pod_templates(objects):
        labels = template["metadata"].get("labels", {})
        service_ports = [p for s in objects if s["kind"] == "Service" and matches(s["spec"].get("selector", {}), labels)
                         for p in s["spec"]["ports"]]
        for container in containers(template):
            words = triton_command(container)
            if not words:
                continue
            name = workload["metadata"]["name"]
            declared = {p["containerPort"]: p.get("name") for p in container.get("ports", [])}
            wanted = {"grpc-port": GRPC_PORT, "metrics-port": METRICS_PORT}
            if http_allowed(words):
                wanted["http-port"] = HTTP_PORT
            elif HTTP_PORT in declared or flag(words, "http-port"):
                problems.append(f"{name}: HTTP is off (--allow-http=false) but port {HTTP_PORT} is still declared or flagged")
            for option, port in wanted.items():
                if flag(words, option) != str(port):
                    problems.append(f"{name}: Triton args lack --{option}={port}")
                if port not in declared:
                    problems.append(f"{name}: Triton container ports {sorted(declared)} lack {port}")
                elif not any(p.get("targetPort") in (port, declared[port]) for p in service_ports):
                    problems.append(f"{name}: no Service exposes Triton's port {port}")
            if not http_allowed(words):
                http_names = {HTTP_PORT, "http"}
                if any(p.get("targetPort") in http_names or p["port"] == HTTP_PORT for p in service_ports):
                    problems.append(f"{name}: HTTP is off but a Service still exposes port {HTTP_PORT}")
                for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
                    if container.get(probe_name, {}).get("httpGet", {}).get("port") in http_names:
                        problems.append(f"{name}: HTTP is off but the {probe_name} calls Triton's HTTP port")
    return problems


def restriction(words: list[str], option: str) -> tuple[list[str], str, str] | None:
    """(groups, key name, value) of `--option=<groups>:<key>=<value>`, or None."""
    value = flag(words, option)
    if value is None or ":" not in value or "=" not in value.split(":", 1)[1]:
        return None
    groups, _, secret = value.partition(":")
    key, _, secret_value = secret.partition("=")
    return groups.split(","), key, secret_value


def check_admin_restriction(objects: list[dict]) -> list[str]:
    """Every Triton restricts exactly the admin groups (formats/admin.py) behind the admin key, over
    gRPC and HTTP, and the key is `$(VAR)` with VAR from a Secret: never written in a manifest."""
    from histoserve.formats.admin import KEY_NAME, RESTRICTED_GROUPS

    problems = []
    for workload, template in pod_templates(objects):
        for container in containers(template):
            words = triton_command(container)
            if not words:
                continue
            name = workload["metadata"]["name"]
            env = {e["name"]: e for e in container.get("env", [])}
            for option in ("grpc-restricted-protocol", "http-restricted-api"):
                found = restriction(words, option)
                if found is None:
                    problems.append(f"{name}: no --{option}: Triton's admin APIs answer anyone")
                    continue
                groups, key, value = found
                if sorted(groups) != sorted(RESTRICTED_GROUPS) or key != KEY_NAME:
                    problems.append(f"{name}: --{option} restricts {groups} with {key!r}, not {list(RESTRICTED_GROUPS)} "
                                    f"with {KEY_NAME!r}")
                variable = re.fullmatch(r"\$\((\w+)\)", value)
                source = env.get(variable.group(1), {}) if variable else {}
                if not source.get("valueFrom", {}).get("secretKeyRef"):
                    problems.append(f"{name}: --{option}'s key is {'a literal' if not variable else repr(value)}, not $(VAR) "
                                    "with VAR from a Secret")
            if len([w for w in words if w.startswith("--grpc-restricted-protocol=")]) > 1:
                problems.append(f"{name}: several --grpc-restricted-protocol flags: Triton takes each group once")
    for secret in (o for o in objects if o["kind"] == "Secret"):
        if secret.get("data") or secret.get("stringData"):
            problems.append(f"Secret/{secret['metadata']['name']}: holds values: secrets are created outside the manifests")
    return problems


CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                  "CustomResourceDefinition", "PriorityClass", "GatewayClass", "ClusterImagePolicy"}


def check_names(objects: list[dict]) -> list[str]:
    """Valid DNS names; and every namespaced object in the kustomization's one namespace (one without a
    namespace lands in whatever namespace kubectl's context names)."""
    problems = []
    namespaced = [o for o in objects if o["kind"] not in CLUSTER_SCOPED]
    namespaces = {o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"} or \
        {o["metadata"].get("namespace") for o in namespaced} - {None}
    for o in namespaced:
        if len(namespaces) != 1 or o["metadata"].get("namespace") not in namespaces:
            problems.append(f"{o['kind']}/{o['metadata']['name']}: namespace {o['metadata'].get('namespace')!r}, not the "
                            f"kustomization's one namespace (it has {sorted(namespaces)})")
    for o in objects:
        name = o["metadata"]["name"]
        pattern = DNS1035_LABEL if o["kind"] == "Service" else DNS1123_SUBDOMAIN
        if not pattern.match(name) or len(name) > (63 if o["kind"] == "Service" else 253):
            problems.append(f"{o['kind']}/{name}: not a valid DNS name")
    for workload, template in pod_templates(objects):
        for container in containers(template):
            if not DNS1123_LABEL.match(container["name"]):
                problems.append(f"{workload['metadata']['name']}: container name {container['name']!r} is not DNS-1123")
            for port in container.get("ports", []):
                if "name" in port and (len(port["name"]) > 15 or not PORT_NAME.match(port["name"])):
                    problems.append(f"{workload['metadata']['name']}: port name {port['name']!r} is not an IANA service name")
    return problems


def check_images(objects: list[dict]) -> list[str]:
    problems = []
    for workload, template in pod_templates(objects):
        for container in containers(template):
            image = container["image"]
            if not DIGEST.match(image):
                problems.append(f"{workload['metadata']['name']}/{container['name']}: image {image!r} is not pinned by digest "
                                "(components/images)")
            elif container.get("imagePullPolicy") != "IfNotPresent":
                problems.append(f"{workload['metadata']['name']}/{container['name']}: imagePullPolicy "
                                f"{container.get('imagePullPolicy')!r}: a digest never changes, IfNotPresent pulls it once")
    return problems


def check_scheduling_and_rollout(objects: list[dict]) -> list[str]:
    """GPU pods Guaranteed, probes with timeouts, a progress deadline that covers the startup probe
    plus an image pull, no replicas fighting an HPA, the NGC entrypoint kept."""
    problems = []
    scaled = {(h["spec"]["scaleTargetRef"]["kind"], h["spec"]["scaleTargetRef"]["name"])
              for h in objects if h["kind"] == "HorizontalPodAutoscaler"}
    for workload, template in pod_templates(objects):
        name = workload["metadata"]["name"]
        every = containers(template)
        if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in every):
            for container in every:
                resources = container.get("resources", {})
                for resource in ("cpu", "memory"):
                    request, limit = resources.get("requests", {}).get(resource), resources.get("limits", {}).get(resource)
                    if request is None or limit is None or quantity(request) != quantity(limit):
                        problems.append(f"{name}/{container['name']}: GPU pod not Guaranteed: {resource} request {request} != limit "
                                        f"{limit}")
        for container in template["spec"]["containers"]:
            for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe_name in container and "timeoutSeconds" not in container[probe_name]:
                    problems.append(f"{name}/{container['name']}: {probe_name} has no timeoutSeconds (default 1 s)")
            if triton_command(container) and container.get("command"):
                problems.append(f"{name}/{container['name']}: `command` bypasses the NGC image's entrypoint; put tritonserver first "
                                "in args")
        if workload["kind"] == "Deployment":
            startup = max((c["startupProbe"].get("periodSeconds", 10) * c["startupProbe"].get("failureThreshold", 3)
                           for c in template["spec"]["containers"] if "startupProbe" in c), default=0)
            deadline = workload["spec"].get("progressDeadlineSeconds", 600)
            if deadline < startup + IMAGE_PULL_ALLOWANCE_S:
                problems.append(f"Deployment/{name}: progressDeadlineSeconds {deadline} < startup probe {startup} s + image pull "
                                f"{IMAGE_PULL_ALLOWANCE_S} s")
            if ("Deployment", name) in scaled and "replicas" in workload["spec"]:
                problems.append(f"Deployment/{name}: spec.replicas next to an HPA resets the scaled count on every apply")
    return problems


def check_storage(objects: list[dict]) -> list[str]:
    """Shared claims name a class that can share; a Deployment mounts only claims its kustomization or
    its platform creates (Jobs mount the platform's); a ReadWriteOnce claim passes from the old pod to
    the new one only with Recreate; disk emptyDirs fit the pod's ephemeral-storage limit."""
    problems = []
    namespaces = {o["metadata"].get("namespace") for o in objects}
    platform = [o for p in PLATFORMS for o in render_cached(p) if o["kind"] == "PersistentVolumeClaim"
                and o["metadata"].get("namespace") in namespaces]
    claims = {o["metadata"]["name"]: o for o in platform + objects if o["kind"] == "PersistentVolumeClaim"}
    for claim in claims.values():
        shared = {"ReadWriteMany", "ReadOnlyMany"} & set(claim["spec"].get("accessModes", []))
        if shared and not claim["spec"].get("storageClassName"):
            problems.append(f"PVC/{claim['metadata']['name']}: {sorted(shared)} without storageClassName: the default classes of "
                            "EKS/GKE/AKS are ReadWriteOnce, it would stay Pending")
    for deployment in (o for o in objects if o["kind"] == "Deployment"):
        for volume in deployment["spec"]["template"]["spec"].get("volumes", []):
            name = volume.get("persistentVolumeClaim", {}).get("claimName")
            if name is None:
                continue
            if name not in claims:
                problems.append(f"Deployment/{deployment['metadata']['name']}: volume {volume['name']} claims PVC {name}, "
                                "which this kustomization does not create: the pod would stay Pending")
            elif claims[name]["spec"].get("accessModes") == ["ReadWriteOnce"] and \
                    deployment["spec"].get("strategy", {}).get("type") != "Recreate":
                problems.append(f"Deployment/{deployment['metadata']['name']}: ReadWriteOnce PVC {name} with a rolling update: "
                                "the new pod waits for a volume the old one holds")
    for workload, template in pod_templates(objects):
        # The kubelet evicts a pod whose disk use (emptyDirs included) exceeds the sum of the limits its
        # containers set (containers without one add nothing); no limit anywhere: no pod-level limit.
        limits = [limit for c in template["spec"]["containers"]
                  if (limit := c.get("resources", {}).get("limits", {}).get("ephemeral-storage")) is not None]
        if not limits:
            continue
        on_disk = [v["emptyDir"].get("sizeLimit") for v in template["spec"].get("volumes", [])
                   if "emptyDir" in v and (v["emptyDir"] or {}).get("medium") != "Memory"]
        if None in on_disk:
            problems.append(f"{workload['metadata']['name']}: an emptyDir without sizeLimit in a pod with an ephemeral-storage limit")
        elif sum(map(quantity, on_disk)) > sum(map(quantity, limits)):
            problems.append(f"{workload['metadata']['name']}: emptyDirs {on_disk} exceed the pod's ephemeral-storage limit "
                            f"{limits}: the kubelet evicts it")
    return problems


def adapter_metric_names() -> set[str]:
    values = yaml.safe_load(ADAPTER_RULES.read_text())
    return {rule["name"]["as"] for rule in values["rules"]["custom"]}


def headless_service_for(objects: list[dict], job: dict) -> dict | None:
    """The headless Service that gives an Indexed Job's pods DNS names <job>-<index>.<subdomain>."""
    subdomain = job["spec"]["template"]["spec"].get("subdomain")
    return next((s for s in objects if s["kind"] == "Service" and s["metadata"]["name"] == subdomain
                 and s["spec"].get("clusterIP") == "None" and matches(s["spec"].get("selector", {}), pod_labels(job))), None)


def check_wiring(objects: list[dict]) -> list[str]:
    """Objects that name each other: the HPA's metric is one the adapter serves, routes reach a
    Service port through a Gateway listener, Indexed Jobs reach pod 0 by a name that resolves."""
    problems = []
    for hpa in (o for o in objects if o["kind"] == "HorizontalPodAutoscaler"):
        for metric in hpa["spec"].get("metrics", []):
            if metric["type"] == "Pods" and metric["pods"]["metric"]["name"] not in adapter_metric_names():
                problems.append(f"HPA/{hpa['metadata']['name']}: metric {metric['pods']['metric']['name']!r} is served by no "
                                "prometheus-adapter rule")
    for route in (o for o in objects if o["kind"] in ("GRPCRoute", "HTTPRoute")):
        for parent in route["spec"].get("parentRefs", []):
            gateway = next((g for g in objects if g["kind"] == "Gateway" and g["metadata"]["name"] == parent["name"]), None)
            if gateway is None:
                problems.append(f"{route['kind']}/{route['metadata']['name']}: parent Gateway {parent['name']!r} does not exist")
            elif "sectionName" in parent and parent["sectionName"] not in {listener["name"] for listener in gateway["spec"]["listeners"]}:
                problems.append(f"{route['kind']}/{route['metadata']['name']}: Gateway {parent['name']} has no listener "
                                f"{parent['sectionName']!r}")
        for rule in route["spec"].get("rules", []):
            for backend in rule.get("backendRefs", []):
                service = next((s for s in objects if s["kind"] == "Service" and s["metadata"]["name"] == backend["name"]), None)
                if service is None or backend.get("port") not in {p["port"] for p in service["spec"]["ports"]}:
                    problems.append(f"{route['kind']}/{route['metadata']['name']}: backend {backend['name']}:{backend.get('port')} "
                                    "is no Service port")
    for job in (o for o in objects if o["kind"] == "Job" and o["spec"].get("completionMode") == "Indexed"):
        name, completions = job["metadata"]["name"], job["spec"]["completions"]
        spec = job["spec"]["template"]["spec"]
        for container in spec["containers"]:  # a sharded Job: each index takes its lines of a list, i ≡ index mod SHARDS
            shards = env_sources(container).get("SHARDS")
            if shards is not None and shards != str(completions):
                problems.append(f"Job/{name}: SHARDS={shards} but {completions} completions: some lines go to no index "
                                "(or indexes share none)")
        talks = " ".join(w for c in spec["containers"] for w in c.get("command", []) + c.get("args", []))
        if "subdomain" not in spec and "torchrun" not in talks and "locust" not in talks:
            continue  # its pods never look each other up: no pod 0 to reach, no need to run all at once
        service = headless_service_for(objects, job)
        if service is None:
            problems.append(f"Job/{name}: no headless Service named after its subdomain selects its pods: pod 0 has no DNS name")
            continue
        if job["spec"].get("parallelism", 1) != completions:
            problems.append(f"Job/{name}: parallelism {job['spec'].get('parallelism', 1)} != completions {completions}: not every "
                            "pod runs at once")
        rank0 = f"{name}-0.{service['metadata']['name']}"
        # what the kubelet writes into pod 0's /etc/hosts: resolvable there before DNS lists the pod
        rank0_hosts_name = f"{rank0}.{job['metadata'].get('namespace', 'default')}.svc.{CLUSTER_DOMAIN}"
        for container in job["spec"]["template"]["spec"]["containers"]:
            words = container.get("command", []) + container.get("args", [])
            text = " ".join(words)
            if words[:1] == ["torchrun"]:
                endpoint = flag(words, "rdzv-endpoint") or ""
                host, _, port = endpoint.rpartition(":")
                if host != rank0_hosts_name or int(port or 0) not in {p["port"] for p in service["spec"]["ports"]}:
                    problems.append(f"Job/{name}: --rdzv-endpoint {endpoint!r} is not pod 0 by the name in its /etc/hosts "
                                    f"({rank0_hosts_name}) on a port of Service {service['metadata']['name']}: pod 0 may not "
                                    "know it hosts the rendezvous before DNS lists it")
                if flag(words, "nnodes") != str(completions):
                    problems.append(f"Job/{name}: torchrun --nnodes={flag(words, 'nnodes')} but {completions} pods")
            if "locust" in text and "--master" in text:
                workers = re.search(r"--expect-workers=(\d+)", text)
                if not workers or int(workers.group(1)) != completions - 1:
                    problems.append(f"Job/{name}: the master expects {workers and workers.group(1)} workers but the Job runs "
                                    f"{completions - 1}")
                if f"--master-host={rank0}" not in text:
                    problems.append(f"Job/{name}: workers do not look the master up as {rank0}")
    return problems


# The RPCs a classifying caller needs, and so all a gateway may pass to Triton: inference (unary),
# model metadata and config (the client's contract), readiness and liveness.
EDGE_RPCS = {"ModelInfer", "ModelMetadata", "ModelConfig", "ModelReady", "ServerReady", "ServerLive"}
TRITON_SERVICE = "inference.GRPCInferenceService"


def triton_rpcs() -> list[str]:
    """Every RPC of Triton's gRPC service, from the protos tritonclient ships."""
    from tritonclient.grpc import service_pb2

    return [m.name for m in service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods]


def route_admits(route: dict, service: str, method: str) -> bool:
    """Would this GRPCRoute send a call of service/method to a backend? (Gateway API semantics: a rule
    without matches matches every call; a method match without `method` matches every method of the
    service, without `service` that method of any service; header matches are the caller's to satisfy.)"""
    for rule in route["spec"].get("rules", []):
        if not rule.get("backendRefs"):
            continue
        for match in rule.get("matches") or [{}]:
            wanted = match.get("method") or {}
            if wanted.get("type", "Exact") == "RegularExpression":
                hit = (re.fullmatch(wanted.get("service", ".*"), service) is not None
                       and re.fullmatch(wanted.get("method", ".*"), method) is not None)
            else:
                hit = wanted.get("service", service) == service and wanted.get("method", method) == method
            if hit:
                return True
    return False


def check_edge(objects: list[dict]) -> list[str]:
    """A GRPCRoute to Triton passes only EDGE_RPCS (every admin RPC stays inside) and removes the
    admin-key metadata from every request it forwards."""
    from histoserve.formats.admin import GRPC_HEADER

    problems = []
    for route in (o for o in objects if o["kind"] == "GRPCRoute"):
        name = route["metadata"]["name"]
        admitted = {rpc for rpc in triton_rpcs() if route_admits(route, TRITON_SERVICE, rpc)}
        if admitted - EDGE_RPCS:
            problems.append(f"GRPCRoute/{name}: admits {sorted(admitted - EDGE_RPCS)} from outside")
        if "ModelInfer" not in admitted:
            problems.append(f"GRPCRoute/{name}: does not admit ModelInfer")
        for index, rule in enumerate(route["spec"].get("rules", [])):
            removed = {header.lower() for f in rule.get("filters", []) if f.get("type") == "RequestHeaderModifier"
                       for header in f.get("requestHeaderModifier", {}).get("remove", [])}
            if rule.get("backendRefs") and GRPC_HEADER not in removed:
                problems.append(f"GRPCRoute/{name}: rule {index} forwards the {GRPC_HEADER} metadata from outside")
    return problems


MODEL_ANNOTATION, VERSION_ANNOTATION = "histoserve.io/model", "histoserve.io/model-version"


def serve_command(container: dict, command: str) -> list[str] | None:
    """The words after `python -m histoserve.serve <command>`, else None."""
    words = container.get("command", []) + container.get("args", [])
    return words[4:] if words[:4] == ["python", "-m", "histoserve.serve", command] else None


def option(words: list[str], name: str) -> str | None:
    """The value of `--name value` or `--name=value` (the last one wins)."""
    found = None
    for index, word in enumerate(words):
        if word == f"--{name}" and index + 1 < len(words):
            found = words[index + 1]
        elif word.startswith(f"--{name}="):
            found = word.split("=", 1)[1]
    return found


def env_sources(container: dict) -> dict[str, str]:
    """Each environment variable's value, or `fieldRef:<path>` for a downward-API one."""
    return {e["name"]: e["value"] if "value" in e else f"fieldRef:{e.get('valueFrom', {}).get('fieldRef', {}).get('fieldPath')}"
            for e in container.get("env", [])}


def mounted_volume(container: dict, path: str) -> dict | None:
    """The volumeMount whose mountPath holds `path`."""
    return next((m for m in container.get("volumeMounts", []) if path == m["mountPath"] or path.startswith(m["mountPath"] + "/")), None)


def check_pinned_model(objects: list[dict]) -> list[str]:
    """A Triton pod serves either one pinned version (--model-control-mode=none) or, in poll mode, the
    store claim itself. Pinned: strict readiness; the pod template names the model and a version;
    model-stage copies that version (name and version read from those annotations) from the store,
    mounted read-only, into a pod-local emptyDir that is Triton's --model-repository; golden-gate
    reads the same version from there, asks this pod's Triton and is the /ready readiness probe; a
    download, where there is one, runs before the stage into the store folder the stage reads."""
    problems = []
    for workload, template, triton, words in triton_pods(objects):
        spec, name = template["spec"], workload["metadata"]["name"]
        repository = (flag(words, "model-repository") or "").replace("$(MODEL_REPOSITORY)", env_sources(triton).get("MODEL_REPOSITORY", ""))
        mode = flag(words, "model-control-mode") or "none"
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        repository_mount = mounted_volume(triton, repository)
        if mode == "poll":
            if (flag(words, "strict-readiness") or "true") != "false":
                problems.append(f"{name}: poll mode with strict readiness: every publish takes every pod out while it loads")
            continue
        if mode != "none":
            problems.append(f"{name}: --model-control-mode={mode}: a pod serves one pinned version (none) or, in dev, polls")
            continue
        if (flag(words, "strict-readiness") or "true") != "true":
            problems.append(f"{name}: a pinned pod must be strictly ready: its one model loaded")
        annotations = template["metadata"].get("annotations", {})
        model, version = annotations.get(MODEL_ANNOTATION, ""), annotations.get(VERSION_ANNOTATION, "")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", model) or not re.fullmatch(r"[1-9][0-9]*", version):
            problems.append(f"{name}: pod template pins model {model!r} version {version!r}: the overlay's model.yaml is not applied")
        pinned = {"MODEL_NAME": f"fieldRef:metadata.annotations['{MODEL_ANNOTATION}']",
                  "MODEL_VERSION": f"fieldRef:metadata.annotations['{VERSION_ANNOTATION}']"}
        init = spec.get("initContainers", [])
        stages = [(i, c, serve_command(c, "stage")) for i, c in enumerate(init) if serve_command(c, "stage") is not None]
        gates = [(c, serve_command(c, "golden-gate")) for c in spec["containers"] if serve_command(c, "golden-gate") is not None]
        if len(stages) != 1 or len(gates) != 1:
            problems.append(f"{name}: a pinned pod needs one model-stage init container and one golden-gate container, has "
                            f"{len(stages)} and {len(gates)}")
            continue
        (index, stage, stage_words), (gate, gate_words) = stages[0], gates[0]
        if repository_mount is None or "emptyDir" not in volumes.get(repository_mount["name"], {}):
            problems.append(f"{name}: Triton's repository {repository!r} is not a pod-local emptyDir (the staged copy)")
            continue
        for container, its_words in ((stage, stage_words), (gate, gate_words)):
            sources = env_sources(container)
            for variable, wanted in pinned.items():
                if f"$({variable})" not in its_words or sources.get(variable) != wanted:
                    problems.append(f"{name}/{container['name']}: {variable} is not read from the pod's {wanted[9:]}")
        target = mounted_volume(stage, option(stage_words, "target") or "")
        if target is None or target["name"] != repository_mount["name"]:
            problems.append(f"{name}: model-stage's --target is not the volume Triton serves ({repository_mount['name']})")
        store = mounted_volume(stage, option(stage_words, "store") or "")
        if store is None or not store.get("readOnly"):
            problems.append(f"{name}: model-stage must read the store from a read-only mount")
        served = mounted_volume(gate, option(gate_words, "repository") or "")
        if served is None or served["name"] != repository_mount["name"]:
            problems.append(f"{name}: golden-gate does not read the golden answers from Triton's repository")
        if option(gate_words, "url") != f"127.0.0.1:{flag(words, 'grpc-port')}":
            problems.append(f"{name}: golden-gate asks {option(gate_words, 'url')}, not this pod's Triton")
        probe = gate.get("readinessProbe", {}).get("httpGet", {})
        ports = {p.get("name"): p["containerPort"] for p in gate.get("ports", [])}
        if probe.get("path") != "/ready" or str(ports.get(probe.get("port"), probe.get("port"))) != option(gate_words, "port"):
            problems.append(f"{name}: golden-gate's /ready on port {option(gate_words, 'port')} is not its readiness probe")
        for earlier in init[:index]:
            if earlier["name"] == "model-download" and mounted_volume(earlier, "/store") is None:
                problems.append(f"{name}: model-download does not write the store model-stage reads")
        for later in init[index + 1:]:
            if later["name"] == "model-download":
                problems.append(f"{name}: model-download runs after model-stage: the stage finds nothing to verify")
    return problems


ARG_REFERENCE = re.compile(r"\{\{\s*args\.([\w-]+)\s*\}\}")


def named(objects: list[dict], kind: str | None, name: str | None) -> dict | None:
    return next((o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name), None)


def check_canary(objects: list[dict]) -> list[str]:
    """An Argo Rollouts canary is wired end to end: the Rollout takes its pods from the Triton
    Deployment (workloadRef) and is what the HPA scales; its stable and canary Services select those
    pods and are the GRPCRoute's weighted backends the Gateway API plugin rewrites; each analysis
    step names AnalysisTemplates that exist and gets every argument they need, every `{{args.x}}` of
    a template is declared; the Rollout's pinned version is the pod template's; Prometheus labels
    Triton's series with the pod-template hash the queries select on."""
    problems = []
    templates = {o["metadata"]["name"]: o for o in objects if o["kind"] == "AnalysisTemplate"}
    for template in templates.values():
        declared = {a["name"] for a in template["spec"].get("args", [])}
        if used := set(ARG_REFERENCE.findall(json.dumps(template["spec"]["metrics"]))) - declared:
            problems.append(f"AnalysisTemplate/{template['metadata']['name']}: uses undeclared args {sorted(used)}")
    for rollout in (o for o in objects if o["kind"] == "Rollout"):
        name, spec = rollout["metadata"]["name"], rollout["spec"]
        reference = spec.get("workloadRef", {})
        deployment = named(objects, reference.get("kind"), reference.get("name"))
        if deployment is None:
            problems.append(f"Rollout/{name}: workloadRef {reference.get('kind')}/{reference.get('name')} does not exist")
            continue
        pod = deployment["spec"]["template"]
        if not matches(spec["selector"]["matchLabels"], pod["metadata"].get("labels", {})):
            problems.append(f"Rollout/{name}: selector does not match the pods of {reference['name']}")
        canary = spec["strategy"].get("canary", {})
        targets = {(h["spec"]["scaleTargetRef"]["kind"], h["spec"]["scaleTargetRef"]["name"])
                   for h in objects if h["kind"] == "HorizontalPodAutoscaler"}
        if "trafficRouting" not in canary:  # a move between overlays: overlays/gpu-canary-adopt or -leave
            if reference.get("scaleDown") != "never":
                problems.append(f"Rollout/{name}: without traffic routing it is adopting or leaving a Deployment, and must leave "
                                "the Deployment's replicas alone (scaleDown: never)")
            adopting = ("Deployment", reference["name"]) in targets
            if adopting and (canary.get("stableService") or canary.get("canaryService") or ("Rollout", name) in targets):
                problems.append(f"Rollout/{name}: while it adopts the Deployment, no Service selector of its and no HPA on it")
            if not adopting and ("Rollout", name) not in targets:
                problems.append(f"Rollout/{name}: while the Deployment is not scaled by the HPA, the Rollout must be")
            continue
        if ("Deployment", reference["name"]) in targets:
            problems.append(f"HPA: scales the Deployment the Rollout {name} replaces")
        for key in (MODEL_ANNOTATION, VERSION_ANNOTATION):
            if rollout["metadata"].get("annotations", {}).get(key) != pod["metadata"].get("annotations", {}).get(key):
                problems.append(f"Rollout/{name}: {key} {rollout['metadata'].get('annotations', {}).get(key)!r} is not the pod "
                                f"template's {pod['metadata'].get('annotations', {}).get(key)!r}: the analysis would judge another version")
        services = {role: named(objects, "Service", canary.get(f"{role}Service")) for role in ("stable", "canary")}
        for role, service in services.items():
            if service is None or not matches(service["spec"].get("selector", {}), pod["metadata"].get("labels", {})):
                problems.append(f"Rollout/{name}: {role}Service {canary.get(f'{role}Service')!r} is missing or selects other pods")
        plugin = canary.get("trafficRouting", {}).get("plugins", {}).get("argoproj-labs/gatewayAPI", {})
        route = named(objects, "GRPCRoute", plugin.get("grpcRoute"))
        if route is None or plugin.get("namespace") != route["metadata"].get("namespace"):
            problems.append(f"Rollout/{name}: the Gateway API plugin's grpcRoute {plugin.get('grpcRoute')!r} in "
                            f"{plugin.get('namespace')!r} is no GRPCRoute of this overlay")
        else:
            for index, rule in enumerate(route["spec"]["rules"]):
                weights = {b["name"]: b.get("weight", 1) for b in rule.get("backendRefs", [])}
                wanted = {canary.get("stableService"): 100, canary.get("canaryService"): 0}
                if weights != wanted:
                    problems.append(f"GRPCRoute/{route['metadata']['name']}: rule {index} backends {weights}, not the Rollout's "
                                    f"stable and canary Services {wanted}")
                    continue
                # Envoy Gateway builds one Envoy cluster per backend only when backendRefs carry filters; the
                # analysis reads the canary's cluster by its position, grpcroute/<ns>/<route>/rule/<i>/backend/<j>.
                if not all(b.get("filters") for b in rule["backendRefs"]):
                    problems.append(f"GRPCRoute/{route['metadata']['name']}: rule {index} backendRefs without filters share one "
                                    "Envoy cluster: the edge cannot tell the canary's calls from the stable pods'")
                names = [b["name"] for b in rule["backendRefs"]]
                cluster = {role: f"grpcroute/{{{{args.namespace}}}}/{route['metadata']['name']}/rule/{index}/backend/"
                                 f"{names.index(canary.get(f'{role}Service'))}" for role in ("stable", "canary")}
                queries = [m["provider"]["prometheus"]["query"] for t in templates.values() for m in t["spec"]["metrics"]
                           if "envoy_cluster" in m["provider"]["prometheus"]["query"]]
                read = [re.findall(r'envoy_cluster_name="([^"]+)"', q) for q in queries]
                if not queries or any(cluster["canary"] not in r or not set(r) <= set(cluster.values()) for r in read):
                    problems.append(f"AnalysisTemplate: an edge query reads another Envoy cluster than the canary's "
                                    f"{cluster['canary']} (and the stable pods' {cluster['stable']})")
        labels = pod["metadata"].get("labels", {})
        pod_services = [o for o in objects if o["kind"] == "Service" and matches(o["spec"].get("selector", {}), labels)]
        monitors = [o for o in objects if o["kind"] == "ServiceMonitor"
                    and any(matches(o["spec"]["selector"]["matchLabels"], s["metadata"].get("labels", {})) for s in pod_services)]
        if not any("rollouts-pod-template-hash" in m["spec"].get("podTargetLabels", []) for m in monitors):
            problems.append(f"Rollout/{name}: no ServiceMonitor of its pods keeps rollouts-pod-template-hash, which the analyses select on")
        for index, step in enumerate(canary.get("steps", [])):
            if "analysis" not in step:
                continue
            given = {a["name"] for a in step["analysis"].get("args", [])}
            for reference in step["analysis"]["templates"]:
                template = templates.get(reference["templateName"])
                if template is None:
                    problems.append(f"Rollout/{name}: step {index} uses AnalysisTemplate {reference['templateName']!r}, which is missing")
                    continue
                missing = {a["name"] for a in template["spec"].get("args", []) if "value" not in a and "valueFrom" not in a} - given
                if missing:
                    problems.append(f"Rollout/{name}: step {index} gives {reference['templateName']} no {sorted(missing)}")
            for argument in step["analysis"].get("args", []):
                path = argument.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath", "")
                field = re.fullmatch(r"metadata\.annotations\['([^']+)'\]", path)
                if field and field.group(1) not in rollout["metadata"].get("annotations", {}):
                    problems.append(f"Rollout/{name}: argument {argument['name']} reads annotation {field.group(1)!r}, which it lacks")
    return problems


VARIABLE = re.compile(r"(?<!\$)\$\((\w+)\)")


def check_variables(objects: list[dict]) -> list[str]:
    """Every `$(VAR)` in a container's command and arguments is one of its environment variables: the
    kubelet leaves an unknown one as written (Triton would export to `otel-collector.$(POD_NAMESPACE)...`)."""
    problems = []
    for workload, template in pod_templates(objects):
        for container in containers(template):
            defined = {e["name"] for e in container.get("env", [])}
            for variable in sorted({v for w in container.get("command", []) + container.get("args", []) for v in VARIABLE.findall(w)}):
                if variable not in defined:
                    problems.append(f"{workload['metadata']['name']}/{container['name']}: $({variable}) is no environment variable "
                                    "of the container: it stays as written")
    return problems


OTELCOL = Path(__file__).parent / "otelcol" / "manifest.yaml"
# Each module of the collector distribution's manifest by the component type its metadata.yaml
# declares (v0.159.0), and the deprecated alias it still accepts.
OTELCOL_TYPES = {
    "nopreceiver": ("nop",), "otlpreceiver": ("otlp",), "hostmetricsreceiver": ("hostmetrics",), "jaegerreceiver": ("jaeger",),
    "kafkareceiver": ("kafka",), "prometheusreceiver": ("prometheus",), "zipkinreceiver": ("zipkin",),
    "debugexporter": ("debug",), "nopexporter": ("nop",), "otlpexporter": ("otlp_grpc", "otlp"),
    "otlphttpexporter": ("otlp_http", "otlphttp"), "fileexporter": ("file",), "kafkaexporter": ("kafka",),
    "prometheusexporter": ("prometheus",), "prometheusremotewriteexporter": ("prometheusremotewrite",), "zipkinexporter": ("zipkin",),
    "zpagesextension": ("zpages",), "healthcheckextension": ("health_check",), "pprofextension": ("pprof",),
    "batchprocessor": ("batch",), "memorylimiterprocessor": ("memory_limiter",), "attributesprocessor": ("attributes",),
    "resourceprocessor": ("resource",), "spanprocessor": ("span",), "probabilisticsamplerprocessor": ("probabilistic_sampler",),
    "filterprocessor": ("filter",), "forwardconnector": ("forward",),
}
COLLECTOR_KINDS = ("receivers", "processors", "exporters", "extensions", "connectors")


def otelcol_distribution() -> tuple[str, dict[str, set[str]]]:
    """The pinned collector distribution's version and its component types, by kind."""
    manifest = yaml.safe_load(OTELCOL.read_text())

    def types(module: dict) -> tuple[str, ...]:
        return OTELCOL_TYPES[module["gomod"].split()[0].rsplit("/", 1)[1]]  # "<path> <version>"

    return manifest["dist"]["version"], {kind: {t for m in manifest.get(kind, []) for t in types(m)} for kind in COLLECTOR_KINDS}


def trace_settings(words: list[str]) -> dict[str, list[tuple[str, str]]]:
    """Triton's --trace-config settings by mode ("" for the global ones), in order, parsed as Triton
    does: `<mode>,<setting>=<value>` when a comma comes first, else `<setting>=<value>`."""
    settings: dict[str, list[tuple[str, str]]] = {}
    for word in words:
        if not word.startswith("--trace-config="):
            continue
        value = word.split("=", 1)[1]
        comma = value.find(",")
        mode, rest = (value[:comma], value[comma + 1:]) if 0 < comma < value.find("=") else ("", value)
        setting, _, argument = rest.partition("=")
        settings.setdefault(mode, []).append((setting, argument))
    return settings


def last(settings: list[tuple[str, str]], name: str) -> str | None:
    """A repeated setting's last value, the one Triton uses (measured on 2.51)."""
    values = [v for s, v in settings if s == name]
    return values[-1] if values else None


def service_port(objects: list[dict], name: str, namespace: str | None, port: int) -> dict | None:
    service = next((s for s in objects if s["kind"] == "Service" and s["metadata"]["name"] == name
                    and (namespace is None or s["metadata"].get("namespace") == namespace)), None)
    return next((p for p in service["spec"]["ports"] if p["port"] == port), None) if service else None


TRACE_RESOURCE = {"k8s.pod.name": "fieldRef:metadata.name", "k8s.namespace.name": "fieldRef:metadata.namespace",
                  "histoserve.model.name": "fieldRef:metadata.annotations['histoserve.io/model']",
                  "histoserve.model.version": "fieldRef:metadata.annotations['histoserve.io/model-version']"}
MIN_TRACE_RATE = 100  # at most 1 in 100 requests without a context: tracing every request crashed Triton (server#7795)


def check_tracing(objects: list[dict]) -> list[str]:
    """A Triton that traces (OpenTelemetry mode) does so at TIMESTAMPS level, samples requests
    without a context at a low rate, exports to a Service of this kustomization over OTLP/HTTP, names
    its pod, namespace, model and version on every span from the downward API, and queues no fewer
    spans than it exports at once. The collector runs the pinned distribution's image with only its
    components, refuses data before its memory limit (memory_limiter first, then batch, in every
    pipeline), and reads only environment variables it has. A Gateway's EnvoyProxy exists and sends its
    spans to a Service port of this kustomization."""
    problems = []
    version, distribution = otelcol_distribution()
    for workload, template in pod_templates(objects):
        name, namespace = workload["metadata"]["name"], workload["metadata"].get("namespace", "default")
        for container in containers(template):
            settings = trace_settings(triton_command(container))
            if last(settings.get("", []), "mode") == "opentelemetry":
                problems += tracing_triton_problems(objects, f"{name}/{container['name']}", namespace, container, template, settings)
            image = container["image"].split("@")[0]
            if image.rsplit(":", 1)[0].endswith("opentelemetry-collector"):
                problems += collector_problems(objects, name, template, container, version, distribution)
    for gateway in (o for o in objects if o["kind"] == "Gateway"):
        reference = gateway["spec"].get("infrastructure", {}).get("parametersRef")
        if reference is None:
            continue
        proxy = next((o for o in objects if o["kind"] == reference["kind"] and o["metadata"]["name"] == reference["name"]
                      and o["metadata"].get("namespace") == gateway["metadata"].get("namespace")), None)
        if proxy is None:
            problems.append(f"Gateway/{gateway['metadata']['name']}: parametersRef {reference['kind']}/{reference['name']} does not exist")
            continue
        tracing = proxy["spec"].get("telemetry", {}).get("tracing")
        for backend in (tracing or {}).get("provider", {}).get("backendRefs", []):
            namespace = backend.get("namespace", proxy["metadata"].get("namespace"))
            if service_port(objects, backend["name"], namespace, backend.get("port")) is None:
                problems.append(f"EnvoyProxy/{proxy['metadata']['name']}: tracing backend {backend['name']}:{backend.get('port')} is "
                                "no Service port of this kustomization")
    return problems


def tracing_triton_problems(objects, where, namespace, container, template, settings) -> list[str]:
    from collections import defaultdict

    from tests.k8s.kubelet import expand

    problems = []
    global_settings, otel = settings.get("", []), settings.get("opentelemetry", [])
    if "TIMESTAMPS" not in {v for s, v in global_settings if s == "level"}:
        problems.append(f"{where}: tracing without --trace-config=level=TIMESTAMPS records nothing")
    rate = last(global_settings, "rate")
    if rate is None or int(rate) < MIN_TRACE_RATE:
        problems.append(f"{where}: trace rate {rate} (default 1000): requests without a context must be sampled at most "
                        f"1 in {MIN_TRACE_RATE}")
    url = last(otel, "url") or ""
    expanded = expand([url], container, defaultdict(str), template["metadata"].get("annotations", {}), name="pod",
                      namespace=namespace)[0] if url else ""
    target = re.fullmatch(rf"http://([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.{re.escape(CLUSTER_DOMAIN)}:(\d+)/v1/traces", expanded)
    if not target or target.group(2) != namespace or service_port(objects, target.group(1), namespace, int(target.group(3))) is None:
        problems.append(f"{where}: trace url {url!r} is not OTLP/HTTP (/v1/traces) to a Service port of this kustomization")
    sources = env_sources(container)
    resource = dict(v.split("=", 1) for s, v in otel if s == "resource" and "=" in v)
    for key, wanted in TRACE_RESOURCE.items():
        variable = re.fullmatch(r"\$\((\w+)\)", resource.get(key, ""))
        if not variable or sources.get(variable.group(1)) != wanted:
            problems.append(f"{where}: span resource {key} is {resource.get(key)!r}, not $(VAR) with VAR from the pod's {wanted[9:]}")
    queue, batch = last(otel, "bsp_max_queue_size") or "2048", last(otel, "bsp_max_export_batch_size") or "512"
    if int(batch) > int(queue):
        problems.append(f"{where}: bsp_max_export_batch_size {batch} above bsp_max_queue_size {queue}: spans are dropped")
    return problems


def collector_problems(objects, name, template, container, version, distribution) -> list[str]:
    problems = []
    tag = container["image"].split("@")[0].rsplit(":", 1)[-1]
    if tag != version:
        problems.append(f"{name}: collector image {container['image']} is not the pinned distribution {version}")
    path = option(container.get("command", []) + container.get("args", []), "config") or ""
    mount = mounted_volume(container, path)
    volume = next((v for v in template["spec"].get("volumes", []) if mount and v["name"] == mount["name"]), {})
    config_map = named(objects, "ConfigMap", volume.get("configMap", {}).get("name"))
    text = (config_map or {}).get("data", {}).get(path[len(mount["mountPath"]) + 1:] if mount else "")
    if text is None:
        return problems + [f"{name}: --config {path!r} is no file of a ConfigMap of this kustomization"]
    config = yaml.safe_load(text)
    for kind in COLLECTOR_KINDS:
        for component in config.get(kind) or {}:
            if component.split("/")[0] not in distribution[kind]:
                problems.append(f"{name}: {kind[:-1]} {component!r} is not in the collector distribution {version}")
    service = config.get("service", {})
    for extension in service.get("extensions", []):
        if extension not in (config.get("extensions") or {}):
            problems.append(f"{name}: service extension {extension!r} is not configured")
    for pipeline, spec in service.get("pipelines", {}).items():
        for kind in ("receivers", "processors", "exporters"):
            for component in spec.get(kind, []):
                if component not in (config.get(kind) or {}):
                    problems.append(f"{name}: pipeline {pipeline} uses {kind[:-1]} {component!r}, which is not configured")
        types = [p.split("/")[0] for p in spec.get("processors", [])]
        if types[:1] != ["memory_limiter"] or "batch" not in types:
            problems.append(f"{name}: pipeline {pipeline} runs processors {types}: memory_limiter first, then batch")
        if not spec.get("receivers") or not spec.get("exporters"):
            problems.append(f"{name}: pipeline {pipeline} has no receiver or no exporter")
    limits = [c for c in (config.get("processors") or {}).items() if c[0].split("/")[0] == "memory_limiter"]
    memory = container.get("resources", {}).get("limits", {}).get("memory")
    for limiter, settings in limits:
        limit_mib = (settings or {}).get("limit_mib")
        if memory is None or limit_mib is None or limit_mib * 2**20 >= quantity(memory):
            problems.append(f"{name}: {limiter} limit_mib {limit_mib} is not below the container's memory limit {memory}")
    defined = {e["name"] for e in container.get("env", [])}
    for variable in sorted(set(re.findall(r"\$\{env:(\w+)", text)) - defined):
        problems.append(f"{name}: the configuration reads ${{env:{variable}}}, which the container does not set")
    return problems


TRITON_PROBE_PATHS = {"startupProbe": "/triton/ready", "readinessProbe": "/triton/ready", "livenessProbe": "/triton/live"}
RELOADER = "secret.reloader.stakater.com/reload"
LOADTEST_TLS = {"HISTOSERVE_SSL_ROOT_CERTIFICATES": "ca.crt", "HISTOSERVE_SSL_PRIVATE_KEY": "tls.key",
                "HISTOSERVE_SSL_CERTIFICATE_CHAIN": "tls.crt"}


def certificate_file(objects: list[dict], template: dict, container: dict, path: str | None) -> tuple[dict | None, str]:
    """(the cert-manager Certificate whose Secret holds `path` in this container, the Secret key), or
    (None, why not)."""
    mount = mounted_volume(container, path or "")
    if mount is None:
        return None, f"{path!r} is on no volume mount"
    volume = next((v for v in template["spec"].get("volumes", []) if v["name"] == mount["name"]), {})
    secret = volume.get("secret", {}).get("secretName")
    certificate = next((o for o in objects if o["kind"] == "Certificate" and o["spec"]["secretName"] == secret), None)
    if certificate is None:
        return None, f"{path!r} is not in the Secret of a cert-manager Certificate of this kustomization"
    return certificate, path[len(mount["mountPath"]) + 1:]


def issuer_of(objects: list[dict], certificate: dict) -> str | None:
    """The Certificate's issuer as `Kind/name`, or None when it names an Issuer this kustomization lacks
    (a ClusterIssuer is cluster-wide: the operator's)."""
    ref = certificate["spec"].get("issuerRef", {})
    kind = ref.get("kind", "Issuer")
    if kind == "Issuer" and named(objects, "Issuer", ref.get("name")) is None:
        return None
    return f"{kind}/{ref.get('name')}"


def check_tls(objects: list[dict]) -> list[str]:
    """Where Triton serves gRPC over TLS: mutual TLS, every file from a cert-manager Certificate of
    this kustomization whose issuer exists; the server certificate names every Service that selects
    the pods and 127.0.0.1 (the golden gate); no gRPC probe (the kubelet cannot present a client
    certificate): the Triton container's probes ask the golden gate, which calls Triton with a client
    certificate of the same issuer; Reloader rolls the pods when the server Secret is renewed; a
    GRPCRoute's Envoy checks the server certificate (BackendTLSPolicy) and presents a client
    certificate (EnvoyProxy backendTLS) of the same issuer, offering ALPN h2. A Job that calls
    triton-grpc presents a client certificate (HISTOSERVE_SSL_*)."""
    problems = []
    server_certificates: dict[str, dict] = {}  # Service name -> Triton's server Certificate
    serves = any(triton_command(c) for _, t in pod_templates(objects) for c in t["spec"]["containers"])
    for certificate in (o for o in objects if o["kind"] == "Certificate" and serves):  # a Job's: the overlay has its Issuer
        if issuer_of(objects, certificate) is None:
            problems.append(f"Certificate/{certificate['metadata']['name']}: issuerRef Issuer "
                            f"{certificate['spec'].get('issuerRef', {}).get('name')!r} is no Issuer of this kustomization")
    for workload, template, triton, words in triton_pods(objects):
        spec, name = template["spec"], workload["metadata"]["name"]
        if flag(words, "grpc-use-ssl") != "true":
            continue
        if flag(words, "grpc-use-ssl-mutual") != "true":
            problems.append(f"{name}: --grpc-use-ssl without --grpc-use-ssl-mutual=true: any caller may connect")
        files = {}
        for triton_option, key in (("grpc-server-cert", "tls.crt"), ("grpc-server-key", "tls.key"), ("grpc-root-cert", "ca.crt")):
            certificate, found = certificate_file(objects, template, triton, flag(words, triton_option))
            if certificate is None or found != key:
                problems.append(f"{name}: --{triton_option}: {found if certificate is None else f'key {found!r}, not {key!r}'}")
            files[triton_option] = certificate
        server = files["grpc-server-cert"]
        if server is None:
            continue
        namespace = server["metadata"].get("namespace", "default")
        if "server auth" not in server["spec"].get("usages", []):
            problems.append(f"Certificate/{server['metadata']['name']}: Triton's certificate lacks the usage 'server auth'")
        if "127.0.0.1" not in server["spec"].get("ipAddresses", []):
            problems.append(f"Certificate/{server['metadata']['name']}: no ipAddress 127.0.0.1: the golden gate cannot verify Triton")
        labels = template["metadata"].get("labels", {})
        for service in (o for o in objects if o["kind"] == "Service" and matches(o["spec"].get("selector", {}), labels)):
            if any(p.get("targetPort") in ("grpc", GRPC_PORT) for p in service["spec"]["ports"]):
                fqdn = f"{service['metadata']['name']}.{namespace}.svc.{CLUSTER_DOMAIN}"
                server_certificates[service["metadata"]["name"]] = server
                if fqdn not in server["spec"].get("dnsNames", []):
                    problems.append(f"Certificate/{server['metadata']['name']}: dnsNames lack {fqdn}: callers of Service "
                                    f"{service['metadata']['name']} cannot verify Triton")
        if server["spec"]["secretName"] not in workload["metadata"].get("annotations", {}).get(RELOADER, "").split(","):
            problems.append(f"{name}: no {RELOADER} annotation naming {server['spec']['secretName']}: Triton keeps a renewed "
                            "certificate's predecessor until it restarts")
        gate = next((c for c in spec["containers"] if serve_command(c, "golden-gate") is not None), None)
        gate_ports = {p["containerPort"] for p in (gate or {}).get("ports", [])}
        for probe_name, path in TRITON_PROBE_PATHS.items():
            probe = triton.get(probe_name, {})
            if "grpc" in probe:
                problems.append(f"{name}: Triton's {probe_name} is a gRPC probe: the kubelet cannot present a client certificate")
            elif probe.get("httpGet", {}).get("port") not in gate_ports or probe["httpGet"].get("path") != path:
                problems.append(f"{name}: Triton's {probe_name} does not ask the golden gate's {path}")
        if gate is None:
            continue
        gate_words = serve_command(gate, "golden-gate")
        for gate_option, key in (("ssl-root-certificates", "ca.crt"), ("ssl-private-key", "tls.key"),
                                 ("ssl-certificate-chain", "tls.crt")):
            certificate, found = certificate_file(objects, template, gate, option(gate_words, gate_option))
            if certificate is None or found != key:
                problems.append(f"{name}/golden-gate: --{gate_option}: {found if certificate is None else f'key {found!r}, not {key!r}'}")
            elif gate_option == "ssl-private-key" and ("client auth" not in certificate["spec"].get("usages", [])
                                                  or issuer_of(objects, certificate) != issuer_of(objects, server)):
                problems.append(f"{name}/golden-gate: its certificate is no client certificate of Triton's issuer")
    for route in (o for o in objects if o["kind"] == "GRPCRoute"):
        backends = {b["name"] for rule in route["spec"].get("rules", []) for b in rule.get("backendRefs", [])}
        for backend in sorted(backends & set(server_certificates)):
            server = server_certificates[backend]
            policy = next((o for o in objects if o["kind"] == "BackendTLSPolicy"
                           and any(t.get("kind") == "Service" and t["name"] == backend for t in o["spec"]["targetRefs"])), None)
            if policy is None:
                problems.append(f"GRPCRoute/{route['metadata']['name']}: backend {backend} serves TLS but no BackendTLSPolicy targets it")
                continue
            validation = policy["spec"]["validation"]
            if validation.get("hostname") not in server["spec"].get("dnsNames", []):
                problems.append(f"BackendTLSPolicy/{policy['metadata']['name']}: hostname {validation.get('hostname')!r} is not in "
                                f"Triton's certificate {server['metadata']['name']}")
            for ref in validation.get("caCertificateRefs", []):
                certificate = next((o for o in objects if o["kind"] == "Certificate" and o["spec"]["secretName"] == ref["name"]), None)
                if ref.get("kind") != "Secret" or certificate is None or issuer_of(objects, certificate) != issuer_of(objects, server):
                    problems.append(f"BackendTLSPolicy/{policy['metadata']['name']}: CA {ref.get('kind')}/{ref['name']} is not the "
                                    "ca.crt of a Certificate of Triton's issuer")
        for parent in route["spec"].get("parentRefs", []):
            gateway = named(objects, "Gateway", parent["name"])
            reference = (gateway or {}).get("spec", {}).get("infrastructure", {}).get("parametersRef", {})
            proxy = named(objects, reference.get("kind"), reference.get("name"))
            if not backends & set(server_certificates):
                continue
            backend_tls = (proxy or {}).get("spec", {}).get("backendTLS", {})
            secret = backend_tls.get("clientCertificateRef", {}).get("name")
            client = next((o for o in objects if o["kind"] == "Certificate" and o["spec"]["secretName"] == secret), None)
            server = server_certificates[sorted(backends & set(server_certificates))[0]]
            if (client is None or "client auth" not in client["spec"].get("usages", [])
                    or issuer_of(objects, client) != issuer_of(objects, server)):
                problems.append(f"Gateway/{parent['name']}: its EnvoyProxy presents no client certificate of Triton's issuer "
                                "(backendTLS.clientCertificateRef)")
            if "h2" not in backend_tls.get("alpnProtocols", []):
                problems.append(f"Gateway/{parent['name']}: its EnvoyProxy does not offer ALPN h2 to Triton (backendTLS.alpnProtocols)")
    for workload, template in pod_templates(objects):
        for container in template["spec"]["containers"]:
            words = container.get("command", []) + container.get("args", [])
            if workload["kind"] != "Job" or "triton-grpc." not in " ".join(words):
                continue
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            where = f"Job/{workload['metadata']['name']}"
            if env.get("HISTOSERVE_SSL") != "true":
                problems.append(f"{where}: calls triton-grpc without HISTOSERVE_SSL=true")
            for variable, key in LOADTEST_TLS.items():
                certificate, found = certificate_file(objects, template, container, env.get(variable))
                if certificate is None or found != key or "client auth" not in certificate["spec"].get("usages", []):
                    problems.append(f"{where}: {variable}: "
                                    + (found if certificate is None else f"key {found!r} of a client Certificate, not {key!r}"))
    return problems


CHECKS = {
    "selectors": check_selectors,
    "ports": check_ports,
    "resources": check_resources,
    "autoscaling": check_autoscaling_and_disruption,
    "triton-ports": check_triton_ports,
    "admin": check_admin_restriction,
    "names": check_names,
    "images": check_images,
    "rollout": check_scheduling_and_rollout,
    "storage": check_storage,
    "wiring": check_wiring,
    "edge": check_edge,
    "pinned": check_pinned_model,
    "canary": check_canary,
    "variables": check_variables,
    "tracing": check_tracing,
    "tls": check_tls,
}


def all_problems(objects: list[dict]) -> list[str]:
    return [problem for check in CHECKS.values() for problem in check(objects)]
