"""The real tritonserver started with a Deployment's own arguments, as the kubelet would run them:
first the pod's init containers (model-stage copies and verifies the pinned version from the store),
then Triton over the pod's repository."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from histoserve.formats.admin import AdminKey
from tests.k8s.kubelet import expand, local_command
from tests.k8s.manifests import render

# Where a local run must differ from the pod: its own repository folder and free ports.
LOCAL = ("--model-repository=", "--http-port=", "--grpc-port=", "--metrics-port=")


def triton_template(overlay: str) -> dict:
    deployment = next(o for o in render(overlay) if o["kind"] == "Deployment" and o["metadata"]["name"] == "triton")
    return deployment["spec"]["template"]


def run_init_containers(template: dict, store: Path, repository: Path) -> None:
    """The pod's init containers, in order, with the store claim at `store` and the pod's repository
    at `repository` (raises on a failed one, with its output)."""
    for container in template["spec"].get("initContainers", []):
        command = local_command(container, template, {"model-store": store, "model-repository": repository})
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"init container {container['name']} failed ({command}):\n{result.stdout}{result.stderr}")


def start_manifest_server(store, overlay: str = "overlays/cpu", extra: list[str] = (), version: int | None = None,
                          key: AdminKey | None = None):
    """A started TritonServer running `overlay`'s Triton arguments with `$(VAR)` expanded from the
    container's environment (the admin key Secret holding a key made for this run), then `extra`,
    over the repository the pod's init containers assemble from the model store `store` (its pinned
    version only; the store itself where the overlay has no init container, as dev in poll mode).
    The restriction is the manifest's own: TritonServer adds none (restrict_admin=False) and only
    knows the key, for its own calls and the tests'. `version` stands for the overlay's knob set to it."""
    from histoserve.serve.server import TritonServer, free_ports

    template = triton_template(overlay)
    if version is not None:
        template["metadata"]["annotations"]["histoserve.io/model-version"] = str(version)
    container = template["spec"]["containers"][0]
    key = key or AdminKey.generate()  # pods of one Deployment share the Secret's key
    env = container.get("env", [])
    secrets = {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"]): key.value
               for e in env if "secretKeyRef" in e.get("valueFrom", {})}
    args = container["args"][1:]  # without `tritonserver`
    manifest_args = [a for a in expand(args, container, secrets) if not a.startswith(LOCAL)]
    repository = Path(store)
    if template["spec"].get("initContainers"):
        repository = Path(tempfile.mkdtemp(prefix="histoserve-pod-"))
        run_init_containers(template, Path(store), repository)
    server = TritonServer(repository, free_ports(), extra_args=[*manifest_args, *extra], admin_key=key, restrict_admin=False)
    server.manifest_args, server.manifest_container, server.pod_template = manifest_args, container, template
    stop = server.stop

    def stop_and_remove_the_pod_repository(*args, **kwargs):
        code = stop(*args, **kwargs)
        if repository != Path(store):
            shutil.rmtree(repository, ignore_errors=True)
        return code

    server.stop = stop_and_remove_the_pod_repository
    return server.start()


@pytest.fixture(scope="session")
def manifest_server(repository):
    """The cpu overlay's pod: its pinned version staged from the store, admin APIs behind the key, HTTP off."""
    server = start_manifest_server(repository)
    try:
        yield server
    finally:
        server.stop()
