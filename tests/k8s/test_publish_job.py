"""The publish Job as rendered, run here as the kubelet would run its containers (their scripts and
environment, the volumes as local folders): export writes a numbered version into the store and
hands its name and version over, verify copies it back out and checks it, and a version altered in
the store between the two fails the Job naming the file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MODEL, ROOT
from tests.k8s.manifests import render
from tests.publisher_keys import make_key_pair, trusted_folder

SIGNING, TRUST = "/var/run/secrets/model-signing", "/trusted-keys"  # the Secret's and the ConfigMap's mounts


def job_containers(kustomization: str = "jobs/publish") -> dict[str, dict]:
    job = next(o for o in render(kustomization) if o["kind"] == "Job")
    spec = job["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec.get("initContainers", []) + spec["containers"]}


def run_container(container: dict, paths: dict[str, Path]) -> subprocess.CompletedProcess:
    """The container's `sh -c` script with its environment; a variable naming one of its mount paths
    gets the local folder instead (`paths`: mount path → folder); `python` is this virtualenv's."""
    env = {e["name"]: e["value"] for e in container["env"]}
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    for name, value in env.items():
        if value in paths and value in mounts:
            env[name] = str(paths[value])
    assert container["command"] == ["/bin/sh", "-c"]
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run(["/bin/sh", "-c", container["args"][0]], cwd=ROOT, env={**os.environ, **env, "PATH": path},
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def published(trained_run, tmp_path_factory):
    """The Job run twice on one store (two publishes of the same run: versions 1 and 2), with the
    Secret's signing key and the ConfigMap's trusted public key where the Job mounts them."""
    store, containers = tmp_path_factory.mktemp("store"), job_containers()
    keys = tmp_path_factory.mktemp("keys")
    publisher = make_key_pair(keys / "pair", "publisher")
    secret = keys / "secret"
    secret.mkdir()
    (secret / "signing.key").write_bytes(publisher.private.read_bytes())  # the Secret's key signing.key
    trusted = trusted_folder(keys / "trusted", publisher)
    results = []
    for _ in range(2):
        work = tmp_path_factory.mktemp("work")
        paths = {"/runs": trained_run.parent, "/models": store, "/work": work, SIGNING: secret, TRUST: trusted}
        containers["export"]["env"] = [e if e["name"] != "RUN" else {"name": "RUN", "value": trained_run.name}
                                       for e in containers["export"]["env"]]
        export = run_container(containers["export"], paths)
        verify = run_container(containers["verify"], paths)
        results.append((export, verify, work))
    return store, results, paths


def test_the_job_publishes_numbered_versions_and_verifies_each_in_the_store(published):
    store, results, _ = published
    for number, (export, verify, work) in enumerate(results, 1):
        assert export.returncode == 0, export.stdout[-2000:] + export.stderr[-2000:]
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert (work / "published").read_text() == f"NAME={MODEL}\nVERSION={number}\nFOLDER={store / MODEL / str(number)}\n"
        assert f"staged {MODEL} version {number}" in verify.stdout
        assert f'deploy: set version: "{number}" (name: {MODEL})' in verify.stdout
        assert (store / MODEL / str(number) / "SHA256SUMS").is_file()
        assert (store / MODEL / str(number) / "model.sig").is_file()  # signed with the Secret's key


def test_verify_refuses_a_version_signed_by_a_key_the_configmap_does_not_trust(published, tmp_path):
    """The verify container checks the signer against the mounted trusted keys, not just the checksums."""
    store, results, paths = published
    stranger = trusted_folder(tmp_path / "trusted", make_key_pair(tmp_path / "other", "someone-else"))
    verify = run_container(job_containers()["verify"], {**paths, "/work": results[0][2], TRUST: stranger})
    assert verify.returncode != 0 and "deploy:" not in verify.stdout, verify.stdout + verify.stderr


def test_a_version_altered_in_the_store_fails_the_job_naming_the_file(published):
    store, results, paths = published
    model = store / MODEL / "2" / "model.onnx"
    os.chmod(model, 0o644)
    data = bytearray(model.read_bytes())
    data[100] ^= 0xFF
    model.write_bytes(bytes(data))  # what a broken NFS write or a stray edit leaves behind
    verify = run_container(job_containers()["verify"], {**paths, "/work": results[1][2]})
    assert verify.returncode == 1
    assert f"{model}: altered" in verify.stderr and "deploy:" not in verify.stdout


def test_the_s3_job_uploads_the_checksums_last_and_verifies_what_it_reads_back():
    containers = job_containers("jobs/publish-s3")
    assert list(containers) == ["store-state", "export", "upload", "download", "verify"]
    upload = containers["upload"]["args"][0]
    assert upload.index("--exclude SHA256SUMS") < upload.index('"$FOLDER/SHA256SUMS"')  # a partial upload never verifies
    assert "versions are immutable" in upload
    download, verify = containers["download"], containers["verify"]
    into = next(m["mountPath"] for m in download["volumeMounts"] if m["name"] == "downloaded")
    assert f'"{into}/$NAME/$VERSION/"' in download["args"][0]
    store = next(e["value"] for e in verify["env"] if e["name"] == "STORE")
    assert {"name": "downloaded", "mountPath": store, "readOnly": True} in verify["volumeMounts"]
