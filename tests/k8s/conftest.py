"""The real tritonserver started with a Deployment's own arguments, as the kubelet would run them:
first the pod's init containers (model-stage copies and verifies the pinned version from the store),
then Triton over the pod's repository."""

from __future__ import annotations

import secrets
import subprocess
import tempfile
from pathlib import Path

import pytest

from histoserve.formats.admin import AdminKey
from tests.k8s.kubelet import expand, local_command, localize
from tests.k8s.manifests import render
from tests.publisher_keys import session_publisher

# Where a local run must differ from the pod: its own repository folder and free ports, and where its
# spans go (the collector's Service does not resolve here).
LOCAL = ("--model-repository=", "--http-port=", "--grpc-port=", "--metrics-port=")
TRACE_URL = "--trace-config=opentelemetry,url="
NO_COLLECTOR = "http://127.0.0.1:9/v1/traces"  # the discard port: nothing listens, nothing leaves the machine
# Triton's TLS flags (k8s/components/tls). Kept only when a test brings the pod's certificates
# (tests/k8s/test_tls.py); the other tests talk plaintext to the same arguments otherwise.
TLS = ("--grpc-use-ssl", "--grpc-server-cert=", "--grpc-server-key=", "--grpc-root-cert=")


def triton_deployment(overlay: str) -> dict:
    return next(o for o in render(overlay) if o["kind"] == "Deployment" and o["metadata"]["name"] == "triton")


def triton_template(overlay: str) -> dict:
    return triton_deployment(overlay)["spec"]["template"]


def run_init_containers(template: dict, store: Path, repository: Path, trusted: Path | None = None) -> None:
    """The pod's init containers, in order, with the store claim at `store`, the pod's repository at
    `repository` and the ConfigMap of trusted keys at `trusted` (default: the session publisher's
    public key, which the test versions are signed with); raises on a failed one, with its output."""
    trusted = trusted or session_publisher()[1]
    for container in template["spec"].get("initContainers", []):
        command = local_command(container, template, {"model-store": store, "model-repository": repository, "trusted-keys": trusted})
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"init container {container['name']} failed ({command}):\n{result.stdout}{result.stderr}")


def start_manifest_server(store, overlay: str = "overlays/cpu", extra: list[str] = (), version: int | None = None,
                          key: AdminKey | None = None, trace_url: str | None = None, certificates=None):
    """A started TritonServer running `overlay`'s Triton arguments with `$(VAR)` expanded from the
    container's environment (the admin key Secret holding a key made for this run; the pod's name,
    namespace and annotations for the downward API), then `extra`, over the repository the pod's init
    containers assemble from the model store `store` (its pinned version only; the store itself where
    the overlay has no init container, as dev in poll mode). The restriction is the manifest's own:
    TritonServer adds none (restrict_admin=False) and only knows the key, for its own calls and the
    tests'. `version` stands for the overlay's knob set to it. The trace collector's URL is replaced by
    `trace_url` (an OTLP/HTTP receiver's /v1/traces), or by a port nobody listens on.
    `server.pod_name`/`pod_namespace` are the pod's as the downward API gives them. Triton's TLS flags
    are dropped unless `certificates` (tests/k8s/pod_tls.PodCertificates) holds the Secrets the pod
    mounts: then they stay, pointing at those files, and the server is asked for its readiness with
    the golden gate's client certificate (`server.client_tls`)."""
    from histoserve.serve.server import TritonServer
    from histoserve.serve.triton_flags import free_ports

    deployment = triton_deployment(overlay)
    template = deployment["spec"]["template"]
    if version is not None:
        template["metadata"]["annotations"]["histoserve.io/model-version"] = str(version)
    container = template["spec"]["containers"][0]
    key = key or AdminKey.generate()  # pods of one Deployment share the Secret's key
    env = container.get("env", [])
    secret_values = {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"]): key.value
                     for e in env if "secretKeyRef" in e.get("valueFrom", {})}
    # as a ReplicaSet names its pods: <deployment>-<template hash>-<5 characters>
    name = f"{deployment['metadata']['name']}-{secrets.token_hex(5)}-{secrets.token_hex(3)[:5]}"
    namespace = deployment["metadata"].get("namespace", "default")
    args = container["args"][1:]  # without `tritonserver`
    expanded = expand(args, container, secret_values, template["metadata"].get("annotations", {}), name=name, namespace=namespace)
    manifest_args = [TRACE_URL + (trace_url or NO_COLLECTOR) if a.startswith(TRACE_URL) else a
                     for a in expanded if not a.startswith(LOCAL) and (certificates or not a.startswith(TLS))]
    client_tls = None
    if certificates is not None:
        volumes = {v["name"]: v.get("secret", {}).get("secretName") for v in template["spec"].get("volumes", [])}
        mounts = {name: certificates.secrets[secret].folder for name, secret in volumes.items() if secret in certificates.secrets}
        manifest_args = localize(manifest_args, container, mounts)
        client_tls = certificates.secrets["triton-golden-gate-tls"].client_tls
    repository = Path(store)
    if template["spec"].get("initContainers"):
        repository = Path(tempfile.mkdtemp(prefix="histoserve-pod-"))
        run_init_containers(template, Path(store), repository)
    server = TritonServer(repository, free_ports(), extra_args=[*manifest_args, *extra], admin_key=key, restrict_admin=False,
                          client_tls=client_tls, remove_on_stop=[repository] if repository != Path(store) else [])
    server.manifest_args, server.manifest_container, server.pod_template = manifest_args, container, template
    server.pod_name, server.pod_namespace = name, namespace
    return server.start()


@pytest.fixture(scope="session")
def manifest_server(repository, otlp_receiver):
    """The cpu overlay's pod: its pinned version staged from the store, admin APIs behind the key, HTTP
    off, its spans to the session's OTLP receiver."""
    server = start_manifest_server(repository, trace_url=f"{otlp_receiver.endpoint}/v1/traces")
    try:
        yield server
    finally:
        server.stop()
