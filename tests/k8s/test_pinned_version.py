"""Immutable versioned pods, as rendered: the overlay's one knob pins the version in the pod template;
the rendered init container copies and verifies exactly that version; the pod is Ready only when
Triton's own probe passes *and* the rendered golden-gate container has its golden answers."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from histoserve.formats.signing import sign_version
from histoserve.formats.version import version_folder, write_checksums
from histoserve.serve.server import TritonServer
from histoserve.serve.triton_flags import free_ports
from tests.conftest import MODEL, run_cli
from tests.k8s.conftest import run_init_containers, start_manifest_server, triton_template
from tests.k8s.kubelet import grpc_probe, http_probe, local_command
from tests.k8s.manifests import K8S, KUBECTL
from tests.publisher_keys import make_key_pair, session_publisher, trusted_folder
from tests.serve.published import copy_model, copy_version, republish, swap_labels


def render_copy(k8s, overlay):
    result = subprocess.run([str(KUBECTL), "kustomize", str(k8s / overlay)], capture_output=True, text=True, check=True)
    return [o for o in yaml.safe_load_all(result.stdout) if o]


@pytest.mark.parametrize("overlay", ["overlays/gpu", "overlays/gpu-gateway", "overlays/gpu-s3", "overlays/gpu-canary"])
def test_the_knob_changes_the_pinned_version_and_nothing_else(tmp_path, overlay):
    """Editing overlays/gpu/model.yaml is the whole deploy: the pod template's version annotation (so
    Kubernetes rolls a new ReplicaSet, or Argo Rollouts a canary, whose analyses read the Rollout's
    copy) and not one other field of any object."""
    k8s = tmp_path / "k8s"
    shutil.copytree(K8S, k8s)
    before = render_copy(k8s, overlay)
    knob = k8s / "overlays" / "gpu" / "model.yaml"
    knob.write_text(knob.read_text().replace('version: "1"', 'version: "7"'))
    after = render_copy(k8s, overlay)
    changed = [(b["kind"], b["metadata"]["name"]) for b, a in zip(before, after, strict=True) if a != b]
    assert changed == [("Deployment", "triton")] + ([("Rollout", "triton")] if overlay == "overlays/gpu-canary" else [])
    if overlay == "overlays/gpu-canary":
        rollout = next(o for o in after if o["kind"] == "Rollout")
        assert rollout["metadata"]["annotations"]["histoserve.io/model-version"] == "7"
    old, new = (next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "triton") for objects in (before, after))
    assert new["spec"]["template"]["metadata"]["annotations"]["histoserve.io/model-version"] == "7"
    new["spec"]["template"]["metadata"]["annotations"]["histoserve.io/model-version"] = "1"
    assert new == old


def gate_command(template: dict, server: TritonServer, port: int) -> list[str]:
    """The rendered golden-gate container's command, run here: the pod's repository and Triton are the
    local ones, its port a free one (both containers share the pod's network; here they cannot)."""
    gate = next(c for c in template["spec"]["containers"] if c["name"] == "golden-gate")
    words = local_command(gate, template, {"model-repository": server.model_repository})
    if server.client_tls is None:  # start_manifest_server left Triton's TLS out: the gate talks plaintext too
        words = [w for w in words if not w.startswith("--ssl")]
    words[words.index("--url") + 1] = server.grpc_url
    words[words.index("--port") + 1] = str(port)
    return [*words, "--address", "127.0.0.1", "--interval", "0.2"]


def pod_readiness(template: dict, server: TritonServer, gate_port: int) -> dict[str, str]:
    """Each container's readiness probe, run as the kubelet runs it; the pod is Ready when all pass."""
    verdicts = {}
    for container in template["spec"]["containers"]:
        probe = container["readinessProbe"]
        if "grpc" in probe:
            verdicts[container["name"]] = grpc_probe(server.grpc_url)
        else:
            verdicts[container["name"]] = http_probe(f"http://127.0.0.1:{gate_port}{probe['httpGet']['path']}")
    return verdicts


def watch_pod(template, server, seconds: float, until=None) -> tuple[list[dict[str, str]], str]:
    """Probe the pod like the kubelet for `seconds` (or `until` a verdict satisfies it); the probe
    verdicts and the golden-gate's output."""
    port = free_ports().http
    gate = subprocess.Popen(gate_command(template, server, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, deadline = [], time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            seen.append(pod_readiness(template, server, port))
            if until and until(seen[-1]):
                break
            time.sleep(0.2)
    finally:
        gate.terminate()
        output = gate.communicate(timeout=30)[0]
    return seen, output


def ready(verdicts: dict[str, str]) -> bool:
    return all(v in ("SERVING", "success") for v in verdicts.values())


def test_the_rendered_pod_is_ready_once_its_golden_answers_are_right(manifest_server):
    template = manifest_server.pod_template
    version = template["metadata"]["annotations"]["histoserve.io/model-version"]
    assert sorted(p.name for p in (manifest_server.model_repository / MODEL).iterdir() if p.name.isdigit()) == [version]
    seen, output = watch_pod(template, manifest_server, 60, until=ready)
    assert ready(seen[-1]), f"{seen[-3:]}\n{output}"
    assert set(seen[0]) == {"triton", "golden-gate"}


def test_a_version_that_loads_but_answers_wrongly_never_makes_the_rendered_pod_ready(repository, tmp_path):
    store = tmp_path / "store"
    swap_labels(copy_model(repository, MODEL, store) / "1")
    republish(store / MODEL / "1")  # the files check out: a consistent publish of a wrong labels file
    server = start_manifest_server(store)
    try:
        seen, output = watch_pod(server.pod_template, server, 20)
    finally:
        server.stop()
    # Triton itself is happy, it loaded the model (its probes ask the gate: an error until the gate listens)
    assert "success" in {v["triton"] for v in seen} and all(v["triton"] == "success" or v["triton"].startswith("error") for v in seen)
    assert all(v["golden-gate"] == "status 503" or v["golden-gate"].startswith("error") for v in seen)  # error: not listening yet
    assert "status 503" in {v["golden-gate"] for v in seen} and not any(ready(v) for v in seen)
    assert "answered class" in output


def flip_and_rewrite_sums(version: Path) -> None:
    """A writer of the store without the signing key: a changed model, SHA256SUMS made to match."""
    data = bytearray((version / "model.onnx").read_bytes())
    data[-100] ^= 0xFF
    (version / "model.onnx").write_bytes(bytes(data))
    write_checksums(version)


def sign_with_a_stranger_s_key(version: Path) -> None:
    sign_version(version, make_key_pair(version.parent.parent / "stranger", "stranger").private)


@pytest.mark.parametrize("alter, file, problem", [
    (lambda version: (version / "model.onnx").write_bytes(b"truncated"), "model.onnx", "altered after signing"),
    (lambda version: (version / "SHA256SUMS").unlink(), "SHA256SUMS", "missing"),
    (lambda version: (version / "labels.txt").unlink(), "labels.txt", "missing"),
    (lambda version: (version / "model.sig").unlink(), "model.sig", "missing: the version is unsigned"),
    (flip_and_rewrite_sums, "model.onnx", "altered after signing"),
    (sign_with_a_stranger_s_key, "model.sig", "signed by a key that is not trusted"),
], ids=["truncated", "no-sums", "no-labels", "unsigned", "sums-rewritten", "untrusted-signer"])
def test_the_rendered_init_container_stops_the_pod_naming_the_file(repository, tmp_path, alter, file, problem):
    store = tmp_path / "store"
    alter(copy_model(repository, MODEL, store) / "1")
    pod = tmp_path / "pod"
    with pytest.raises(RuntimeError, match="init container model-stage failed") as failure:
        run_init_containers(triton_template("overlays/gpu"), store, pod)
    assert f"{store / MODEL / '1' / file}: {problem}" in str(failure.value)
    assert list(pod.iterdir()) == []  # Triton would find nothing to serve: the pod never starts


def test_key_rotation_the_rendered_init_container_trusts_every_key_of_the_configmap(repository, tmp_path):
    """Publishing moves to a new key while the ConfigMap holds the old and the new public keys: versions
    signed by either stage; once the old key is dropped, its versions no longer do."""
    old, _ = session_publisher()
    new = make_key_pair(tmp_path / "keys", "publisher-2027")
    store = tmp_path / "store"
    copy_model(repository, MODEL, store)
    copy_version(store / MODEL, 1, 2)
    sign_version(store / MODEL / "2", new.private)
    both, only_new = trusted_folder(tmp_path / "both", old, new), trusted_folder(tmp_path / "new", new)
    template = triton_template("overlays/gpu")
    for version, trusted, staged in ((1, both, True), (2, both, True), (2, only_new, True), (1, only_new, False)):
        template["metadata"]["annotations"]["histoserve.io/model-version"] = str(version)
        pod = tmp_path / f"pod-{version}-{trusted.name}"
        if staged:
            run_init_containers(template, store, pod, trusted)
            assert (version_folder(pod, MODEL, version) / "model.sig").is_file()
        else:
            with pytest.raises(RuntimeError, match="signed by a key that is not trusted"):
                run_init_containers(template, store, pod, trusted)


def test_rollout_status_is_done_when_every_ready_pod_serves_the_new_version(manifest_server, repository, tmp_path):
    """An old pod (version 1) and a pod of the new ReplicaSet (version 2), as `dns:///` lists them
    mid-rollout: not done, and the old pod is named; once only version-2 pods answer: done."""
    store = tmp_path / "store"
    copy_version(copy_model(repository, MODEL, store), 1, 2)
    new = start_manifest_server(store, version=2, key=manifest_server.admin_key)

    def status(*servers):
        return run_cli("-m", "histoserve.client", "rollout-status", "--url", ",".join(s.grpc_url for s in servers), "--model", MODEL,
                       "--version", 2, "--timeout", 3, "--admin-key-file", manifest_server.admin_key_file, check=False)

    try:
        midway, done = status(manifest_server, new), status(new)
    finally:
        new.stop()
    assert midway.returncode == 2, midway.stdout + midway.stderr
    assert f"{manifest_server.grpc_url}\t{MODEL} version 2\tOTHER_VERSION\tserves version 1" in midway.stdout
    assert f"{new.grpc_url}\t{MODEL} version 2\tREADY" in midway.stdout
    assert "1 server(s) still serve another version: pods of the previous ReplicaSet" in midway.stderr
    assert done.returncode == 0 and done.stdout.strip() == f"{new.grpc_url}\t{MODEL} version 2\tREADY", done.stdout + done.stderr
