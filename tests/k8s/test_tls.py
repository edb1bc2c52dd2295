"""Mutual TLS to Triton as rendered (k8s/components/tls): the real tritonserver started with the cpu
overlay's own arguments, TLS flags included, over certificates made here and laid out where the
Deployment mounts its Secrets; the rendered golden-gate container answering the Triton container's
probes. Who gets in with what, and what the kubelet sees."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from histoserve.formats.options import ClientTls
from histoserve.serve.triton_flags import free_ports
from tests.client.certificates import CertificateAuthority
from tests.k8s.conftest import start_manifest_server
from tests.k8s.kubelet import grpc_probe, http_probe, local_command
from tests.k8s.manifests import CHECKS, flag, option, render, serve_command
from tests.k8s.pod_tls import PodCertificates

OVERLAY = "overlays/cpu"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PodCertificates:
    pod = PodCertificates(tmp_path_factory.mktemp("pod-secrets"))
    pod.issue("triton-server-tls", server=True)
    pod.issue("triton-golden-gate-tls", server=False)
    pod.issue("triton-loadtest-tls", server=False)
    pod.stranger = CertificateAuthority(pod.folder, "stranger-ca")
    pod.issue("stranger-client-tls", server=False, authority=pod.stranger)
    return pod


@pytest.fixture(scope="module")
def tls_server(repository, pki):
    server = start_manifest_server(repository, OVERLAY, certificates=pki)
    try:
        yield server
    finally:
        server.stop()


def run_gate(server, pki, secret: str = "triton-golden-gate-tls", *extra: str) -> tuple[subprocess.Popen, int]:
    """The rendered golden-gate container's command, run here: its mounts are the local repository and
    the Secret folder `secret`, its Triton the local one, its port a free one."""
    template = server.pod_template
    gate = next(c for c in template["spec"]["containers"] if c["name"] == "golden-gate")
    words = local_command(gate, template, {"model-repository": server.model_repository, "golden-gate-tls": pki.secrets[secret].folder})
    port = free_ports().http
    words[words.index("--url") + 1] = server.grpc_url
    words[words.index("--port") + 1] = str(port)
    command = [*words, "--address", "127.0.0.1", "--interval", "0.2", "--watch", "0.2", *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), port


def stop(process: subprocess.Popen) -> str:
    process.terminate()
    return process.communicate(timeout=30)[0]


def probes(template: dict, gate_port: int) -> dict[str, str]:
    """Every probe of the pod's containers, as the kubelet runs it (the pod's port 8003 is the gate's)."""
    verdicts = {}
    for container in template["spec"]["containers"]:
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            if get := container.get(kind, {}).get("httpGet"):
                verdicts[f"{container['name']}/{kind}"] = http_probe(f"http://127.0.0.1:{gate_port}{get['path']}", timeout_s=3)
    return verdicts


def until(predicate, timeout_s: float = 60.0, what: str = ""):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout_s:g} s: {what}")


def ready(client_tls: ClientTls | None, url: str) -> str:
    try:
        with grpcclient.InferenceServerClient(url, **(client_tls.client_arguments() if client_tls else {})) as client:
            return "ready" if client.is_server_ready(client_timeout=5) else "not ready"
    except InferenceServerException as error:
        return f"{error.status()}: {error.message()}"


def test_the_rendered_deployment_runs_triton_with_mutual_tls_from_its_mounted_secrets(tls_server, pki):
    args = tls_server.manifest_args
    assert flag(args, "grpc-use-ssl") == flag(args, "grpc-use-ssl-mutual") == "true"
    assert flag(args, "grpc-server-cert") == str(pki.secrets["triton-server-tls"].folder / "tls.crt")
    assert flag(args, "grpc-root-cert") == str(pki.secrets["triton-server-tls"].folder / "ca.crt")


def test_only_callers_with_a_client_certificate_of_the_cluster_ca_get_in(tls_server, pki):
    url, ca = tls_server.grpc_url, str(pki.authority.certificate_file)
    assert ready(pki.secrets["triton-golden-gate-tls"].client_tls, url) == "ready"
    assert ready(pki.secrets["triton-loadtest-tls"].client_tls, url) == "ready"
    refused = {
        "plaintext": ready(None, url),
        "TLS, no client certificate": ready(ClientTls(ca), url),
        "a client certificate of another CA": ready(pki.secrets["stranger-client-tls"].client_tls, url),
    }
    assert all(v.startswith("StatusCode.UNAVAILABLE") for v in refused.values()), refused
    log = tls_server.log_text()  # Triton names each refusal (2.51's BoringSSL/OpenSSL errors)
    for reason in ("wrong version number", "peer did not return a certificate", "certificate verify failed"):
        assert reason in log, reason
    # the kubelet's own gRPC probe is refused too: why the Triton container's probes ask the gate
    assert grpc_probe(url, timeout_s=3).startswith("error")


def test_triton_closes_a_tls_connection_that_does_not_offer_alpn_h2(tls_server, pki):
    """Why the gateway's EnvoyProxy sets backendTLS.alpnProtocols [h2]: Envoy Gateway offers no ALPN
    to a backend unless told, and Triton's gRPC server then hangs up after the handshake."""
    host, port = tls_server.grpc_url.rsplit(":", 1)
    identity = pki.secrets["triton-golden-gate-tls"].client_tls
    answers = {}
    for alpn in ([], ["h2"]):
        context = ssl.create_default_context(cafile=identity.root_certificates)
        context.load_cert_chain(identity.certificate_chain, identity.private_key)
        if alpn:
            context.set_alpn_protocols(alpn)
        with socket.create_connection((host, int(port)), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as connection:
            connection.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))  # preface + SETTINGS
            answers[tuple(alpn)] = connection.recv(64)
    assert answers[()] == b""                          # closed: no HTTP/2 at all
    assert answers[("h2",)][3] == 4                     # the server's SETTINGS frame


def test_the_triton_containers_probes_pass_through_the_gate_and_the_pod_becomes_ready(tls_server, pki):
    template = tls_server.pod_template
    gate, port = run_gate(tls_server, pki)
    try:
        seen = until(lambda: (v := probes(template, port)) and all(s == "success" for s in v.values()) and v,
                     what="every probe of the pod passing")
    finally:
        output = stop(gate)
    assert set(seen) == {"triton/startupProbe", "triton/readinessProbe", "triton/livenessProbe",
                         "golden-gate/readinessProbe", "golden-gate/livenessProbe"}
    assert "over TLS" in output and "ready: digits version 1 gave all" in output


def test_a_gate_whose_certificate_triton_refuses_keeps_the_pod_out_until_the_secret_is_renewed(tls_server, pki):
    """The gate starts with a certificate Triton does not accept (another CA): the Triton container's
    probes fail and the pod stays out. Then the Secret is renewed in place, as the kubelet swaps a
    Secret volume: the gate calls with the new files without restarting, and the pod becomes ready."""
    renewed = "rotated-gate-tls"
    pki.issue(renewed, server=False, authority=pki.stranger)
    gate, port = run_gate(tls_server, pki, renewed)
    try:
        until(lambda: http_probe(f"http://127.0.0.1:{port}/healthz") == "success", what="the gate listening")
        time.sleep(1.0)
        assert http_probe(f"http://127.0.0.1:{port}/triton/ready", timeout_s=3) == "status 503"
        assert http_probe(f"http://127.0.0.1:{port}/ready", timeout_s=3) == "status 503"
        pki.issue(renewed, server=False)  # cert-manager renews from the right issuer
        until(lambda: all(http_probe(f"http://127.0.0.1:{port}{path}", timeout_s=3) == "success"
                          for path in ("/triton/ready", "/ready")), timeout_s=30, what="ready with the renewed certificate")
        assert gate.poll() is None  # the same process
    finally:
        output = stop(gate)
    assert "the TLS files changed on disk" in output


def test_every_tls_caller_is_wired_to_the_same_issuer_in_every_overlay():
    """The tls invariant on the real renders, and broken copies it must catch."""
    for kustomization in ("overlays/gpu", "overlays/gpu-gateway", "overlays/gpu-canary", "overlays/cpu", "jobs/loadtest"):
        assert CHECKS["tls"](render(kustomization)) == [], kustomization
    gpu_gateway = render("overlays/gpu-gateway")
    issuer = next(o for o in gpu_gateway if o["kind"] == "Issuer")["metadata"]["name"]
    loadtest = next(o for o in render("jobs/loadtest") if o["kind"] == "Certificate")
    assert loadtest["spec"]["issuerRef"]["name"] == issuer  # the Job's certificate from the overlay's Issuer

    def broken(change) -> list[str]:
        objects = render("overlays/gpu-gateway")
        change(objects)
        return CHECKS["tls"](objects)

    def triton(objects):
        return next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "triton")

    def deployment(objects):
        return triton(objects)["spec"]["template"]["spec"]

    def without_mutual(objects):
        args = deployment(objects)["containers"][0]["args"]
        args.remove("--grpc-use-ssl-mutual=true")

    def grpc_probe_back(objects):
        deployment(objects)["containers"][0]["readinessProbe"] = {"grpc": {"port": 8001}, "timeoutSeconds": 3}

    def gate_without_certificate(objects):
        command = deployment(objects)["containers"][1]["command"]
        command[:] = [w for w in command if not w.startswith("--ssl-private-key")]

    def envoy_without_alpn(objects):
        next(o for o in objects if o["kind"] == "EnvoyProxy")["spec"]["backendTLS"].pop("alpnProtocols")

    def no_backend_tls_policy(objects):
        objects[:] = [o for o in objects if o["kind"] != "BackendTLSPolicy"]

    def no_loopback_name(objects):
        next(o for o in objects if o["kind"] == "Certificate" and o["metadata"]["name"] == "triton-server-tls")["spec"].pop("ipAddresses")

    def no_reloader(objects):
        triton(objects)["metadata"]["annotations"].pop("secret.reloader.stakater.com/reload")

    for change in (without_mutual, grpc_probe_back, gate_without_certificate, envoy_without_alpn, no_backend_tls_policy,
                   no_loopback_name, no_reloader):
        assert broken(change), change.__name__


def pod_spec(overlay: str) -> dict:
    return next(o for o in render(overlay) if o["kind"] == "Deployment" and o["metadata"]["name"] == "triton")["spec"]["template"]["spec"]


def test_the_gate_is_the_only_tls_client_in_the_pod_and_dev_stays_plaintext():
    dev = pod_spec("overlays/dev")
    assert not any(a.startswith("--grpc-use-ssl") for a in dev["containers"][0]["args"])
    assert dev["containers"][0]["readinessProbe"]["grpc"] == {"port": 8001}  # plaintext: the kubelet's gRPC probe works
    gpu = pod_spec("overlays/gpu")
    gate = serve_command(gpu["containers"][1], "golden-gate")
    assert option(gate, "url") == "127.0.0.1:8001" and option(gate, "ssl-certificate-chain")
