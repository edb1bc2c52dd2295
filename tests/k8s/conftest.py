"""The real tritonserver started with a Deployment's own arguments, as the kubelet would run them."""

from __future__ import annotations

import pytest

from histoserve.formats.admin import AdminKey
from tests.k8s.kubelet import expand
from tests.k8s.manifests import deployment_args

# Where a local run must differ from the pod: its own repository folder and free ports.
LOCAL = ("--model-repository=", "--http-port=", "--grpc-port=", "--metrics-port=")


def start_manifest_server(repository, overlay: str = "overlays/cpu", extra: list[str] = ()):
    """A started TritonServer running `overlay`'s Triton arguments with `$(VAR)` expanded from the
    container's environment (the admin key Secret holding a key made for this run), then `extra`.
    The restriction is the manifest's own: TritonServer adds none (restrict_admin=False) and only
    knows the key, for its own calls and the tests'."""
    from histoserve.serve.server import TritonServer, free_ports

    args, container = deployment_args(overlay)
    key = AdminKey.generate()
    env = container.get("env", [])
    secrets = {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"]): key.value
               for e in env if "secretKeyRef" in e.get("valueFrom", {})}
    manifest_args = [a for a in expand(args, container, secrets) if not a.startswith(LOCAL)]
    server = TritonServer(repository, free_ports(), extra_args=[*manifest_args, *extra], admin_key=key, restrict_admin=False)
    server.manifest_args, server.manifest_container = manifest_args, container
    return server.start()


@pytest.fixture(scope="session")
def manifest_server(repository):
    """The cpu overlay's Triton: admin APIs behind the key, HTTP off."""
    server = start_manifest_server(repository)
    try:
        yield server
    finally:
        server.stop()
