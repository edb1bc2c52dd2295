"""The slides Job (k8s/jobs/slides) as rendered: its shard script, run here with sh as the kubelet would
run it for each index (the real CLI parser reading the command it builds), gives every slide of the
list to exactly one index; its pods reach Triton's gRPC port and DNS and nothing else; it presents the
client certificate of Triton's issuer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.k8s.manifests import CHECKS, OVERLAYS, all_problems, render
from tests.k8s.network import Pod, allowed, pods_of
from tests.k8s.test_network_policies import (
    CLIENT_LABEL,
    INTERNET,
    KUBE_DNS,
    METADATA,
    POD_IDENTITY_AGENT,
    PRIVATE_HOST,
    S3,
    S3_ENDPOINT,
    STRANGER,
    objects,
)

KUSTOMIZATION, NAME = "jobs/slides", "histoserve-slides"
# Stands in for the image's `python`: parses what the script runs with the real CLI's parser and writes
# down the slides it was given, the options, and where it ran.
RECORDER = """
import json, os, sys
from histoserve.client.__main__ import build_parser
assert sys.argv[1:4] == ["-m", "histoserve.client", "slide"], sys.argv
args = build_parser().parse_args(sys.argv[3:])
record = {"slides": [str(s) for s in args.slides], "cwd": os.getcwd(), "url": args.url, "model": args.model,
          "out": str(args.out), "ssl": args.ssl, "files": [args.ssl_root_certificates, args.ssl_private_key,
                                                           args.ssl_certificate_chain]}
with open(os.path.join(os.environ["RECORDS"], os.environ["JOB_COMPLETION_INDEX"] + ".json"), "w") as handle:
    json.dump(record, handle)
"""


def job() -> dict:
    return next(o for o in render(KUSTOMIZATION) if o["kind"] == "Job")


def container() -> dict:
    return job()["spec"]["template"]["spec"]["containers"][0]


def run_shard(script: str, env: dict, index: int, paths: dict[str, Path], bin_dir: Path, records: Path) -> subprocess.CompletedProcess:
    """The container's `sh -c` script for one index, its environment's paths mapped to local folders."""
    local = {name: str(paths[value]) if value in paths else value for name, value in env.items()}
    for mount, folder in paths.items():
        local.update({name: value.replace(mount, str(folder), 1) for name, value in local.items() if value.startswith(mount + "/")})
    return subprocess.run(["/bin/sh", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, env={
        **os.environ, **local, "JOB_COMPLETION_INDEX": str(index), "RECORDS": str(records),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)})


@pytest.fixture
def shards(tmp_path):
    """Every index of the rendered Job run on a list of 23 slides (two of them absolute paths, one with a
    space, one starting with a dash) with blank lines, a comment and Windows line ends in it."""
    bin_dir, records, slides, results = tmp_path / "bin", tmp_path / "records", tmp_path / "slides", tmp_path / "results"
    for folder in (bin_dir, records, slides, results):
        folder.mkdir()
    (bin_dir / "recorder.py").write_text(RECORDER)
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "{bin_dir / "recorder.py"}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    names = [f"batch{i % 3}/slide_{i:02d}.svs" for i in range(20)] + ["with space.ndpi", "-dash.tiff", str(slides / "abs.mrxs")]
    lines = ["# scanned 2025-06", "", *names[:10], "   ", *names[10:]]
    (slides / "slides.txt").write_text("\r\n".join(lines) + "\r\n")
    spec, env = job()["spec"], {e["name"]: e["value"] for e in container()["env"]}
    mounts = {m["mountPath"]: m for m in container()["volumeMounts"]}
    paths = {"/slides": slides, "/results": results}
    assert set(paths) <= set(mounts) and mounts["/slides"].get("readOnly")
    runs = [run_shard(container()["args"][0], env, i, paths, bin_dir, records) for i in range(spec["completions"])]
    return names, slides, results, runs, records


def test_the_shard_script_gives_every_slide_to_exactly_one_index(shards):
    names, slides, results, runs, records = shards
    completions = job()["spec"]["completions"]
    for index, run in enumerate(runs):
        assert run.returncode == 0, run.stdout + run.stderr
        assert f"shard {index} of {completions}:" in run.stdout
    given = {int(p.stem): json.loads(p.read_text()) for p in records.glob("*.json")}
    assert sorted(s for r in given.values() for s in r["slides"]) == sorted(names)  # each exactly once
    for index, record in given.items():
        assert record["slides"] == [n for i, n in enumerate(names) if i % completions == index]  # i ≡ index (mod completions)
        assert record["cwd"] == str(slides)  # relative lines are relative to the slides claim
        assert record["out"] == str(results) and record["model"] == "digits"
        assert record["url"] == "dns:///triton-grpc.histoserve.svc.cluster.local:8001"


def test_an_index_with_no_slides_succeeds_without_calling_the_server(tmp_path):
    bin_dir, records, slides = tmp_path / "bin", tmp_path / "records", tmp_path / "slides"
    for folder in (bin_dir, records, slides):
        folder.mkdir()
    (slides / "slides.txt").write_text("one.svs\ntwo.svs\n")  # fewer slides than indexes
    env = {e["name"]: e["value"] for e in container()["env"]}
    run = run_shard(container()["args"][0], env, job()["spec"]["completions"] - 1, {"/slides": slides, "/results": tmp_path},
                    bin_dir, records)
    assert run.returncode == 0 and "0 of 2 slides" in run.stdout, run.stdout + run.stderr
    assert not list(records.iterdir())


def test_shards_match_completions_and_the_check_notices_when_they_do_not():
    objects_ = render(KUSTOMIZATION)
    assert all_problems(objects_) == []
    assert {e["name"]: e["value"] for e in container()["env"]}["SHARDS"] == str(job()["spec"]["completions"])
    next(o for o in objects_ if o["kind"] == "Job")["spec"]["completions"] = 12
    assert any("SHARDS=8 but 12 completions" in p for p in CHECKS["wiring"](objects_))


def test_the_pods_present_the_client_certificate_of_tritons_issuer(shards):
    *_, records = shards
    assert CHECKS["tls"](render(KUSTOMIZATION)) == []
    certificate = next(o for o in render(KUSTOMIZATION) if o["kind"] == "Certificate")
    issuer = next(o for o in render("overlays/gpu") if o["kind"] == "Issuer")["metadata"]["name"]
    assert certificate["spec"]["issuerRef"]["name"] == issuer and "client auth" in certificate["spec"]["usages"]
    volume = next(v for v in job()["spec"]["template"]["spec"]["volumes"] if v["name"] == "triton-tls")
    assert volume["secret"]["secretName"] == certificate["spec"]["secretName"]
    record = json.loads(next(records.glob("*.json")).read_text())
    assert record["ssl"] and record["files"] == ["/etc/histoserve/tls/ca.crt", "/etc/histoserve/tls/tls.key",
                                                 "/etc/histoserve/tls/tls.crt"]  # the command itself, not only the env
    without = render(KUSTOMIZATION)
    for env in next(o for o in without if o["kind"] == "Job")["spec"]["template"]["spec"]["containers"][0]["env"]:
        if env["name"] == "HISTOSERVE_SSL_PRIVATE_KEY":
            env["value"] = "/tmp/tls.key"
    assert CHECKS["tls"](without)


def test_the_pod_posture_is_the_other_clients():
    spec = job()["spec"]["template"]
    assert spec["metadata"]["labels"]["histoserve.io/triton-client"] == "true"
    pod = spec["spec"]
    assert pod["automountServiceAccountToken"] is False and pod["securityContext"]["runAsNonRoot"]
    assert container()["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                              "capabilities": {"drop": ["ALL"]}}
    assert {o["kind"] for o in render(KUSTOMIZATION)} == {"Job", "Certificate", "NetworkPolicy", "PersistentVolumeClaim"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pods_reach_tritons_grpc_port_and_dns_and_nothing_else(overlay):
    cluster = objects(overlay)
    pods = pods_of(cluster)
    slides, triton = pods[NAME], pods["triton"]
    dev = overlay == "overlays/dev"  # the jobs render into histoserve; dev's Triton is in histoserve-dev
    others = [pods[n] for n in ("locust", "histoserve-train", "triton-publish", "histoserve-monitor", "otel-collector") if n in pods]
    same_namespace = Pod("batch-scorer", triton.namespace, dict(CLIENT_LABEL), {"http": 8080}, triton.namespace_labels)
    assert allowed(cluster, slides, triton, "grpc") is not dev   # Triton's policy admits the client label
    assert allowed(cluster, slides, KUBE_DNS, 53, "UDP") and allowed(cluster, slides, KUBE_DNS, 53, "TCP")
    assert not allowed(cluster, slides, triton, "metrics")
    for address, port in ((INTERNET, 443), (INTERNET, 80), (METADATA, 80), (POD_IDENTITY_AGENT, 80), (S3, 443),
                          (S3_ENDPOINT, 443), (PRIVATE_HOST, 5432), (PRIVATE_HOST, 8001)):
        assert not allowed(cluster, slides, address, port), address
    for other in [*others, same_namespace]:
        for port in other.ports.values():
            assert not allowed(cluster, slides, other, port), (other.name, port)
    for caller in (STRANGER, same_namespace, triton, *others):
        assert not allowed(cluster, caller, slides, 8080), caller.name  # nothing reaches a slide pod


def test_the_reachability_test_notices_open_egress():
    cluster = objects("overlays/gpu")
    policy = next(o for o in cluster if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == NAME)
    policy["spec"]["policyTypes"] = ["Ingress"]
    assert allowed(cluster, pods_of(cluster)[NAME], INTERNET, 443)
