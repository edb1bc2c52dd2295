"""The Deployment's gRPC flags with the histoserve client, against two real Triton servers: calls are
spread over every server, and a server that appears after the client connected (a pod added by a
scale-out behind the headless Service) gets calls once --grpc-max-connection-age closes the old
connection and the client re-resolves the name."""

import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from dnslib import QTYPE, RR, A
from dnslib.server import BaseResolver, DNSServer

from histoserve.client.classifier import TritonClassifier
from histoserve.serve.server import TritonServer
from histoserve.serve.triton_flags import Ports, ServerError, check_ports_free, free_ports
from tests.conftest import MODEL, started_triton
from tests.k8s.manifests import deployment_args, flag

NAME = "triton-grpc.histoserve.test"
MAX_AGE_MS, GRACE_MS = 3000, 1000  # the manifest says 60 s + 30 s; shortened so the test is quick


def grpc_flags() -> list[str]:
    """The Deployment's own keepalive and connection-age flags, with the age shortened."""
    args, _ = deployment_args("overlays/cpu")
    assert flag(args, "grpc-max-connection-age") and flag(args, "grpc-keepalive-time")
    return [a for a in args if a.startswith(("--grpc-keepalive", "--grpc-http2"))] + [
        f"--grpc-max-connection-age={MAX_AGE_MS}", f"--grpc-max-connection-age-grace={GRACE_MS}"]


@pytest.fixture(scope="module")
def two_servers(repository):
    """Two Tritons with the Deployment's gRPC flags, as two pods behind one Service: shared by the
    balancing test and the frozen-server test (which resumes the one it freezes)."""
    with started_triton(repository, extra_args=grpc_flags()) as first, started_triton(repository, extra_args=grpc_flags()) as second:
        yield first, second


def inference_count(server: TritonServer) -> int:
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        stats = client.get_inference_statistics(MODEL, headers=server.admin_key.grpc_headers(), as_json=True)["model_stats"]
    return sum(int(s.get("inference_count", 0)) for s in stats)


def ports_on_two_addresses() -> tuple[Ports, Ports]:
    """Free ports on 127.0.0.1 and 127.0.0.2 with the same gRPC port, as two pods behind one Service."""
    while True:
        second = free_ports("127.0.0.2")
        first = free_ports()
        try:
            check_ports_free("127.0.0.1", Ports(first.http, second.grpc, first.metrics))
            return Ports(first.http, second.grpc, first.metrics), second
        except ServerError:
            continue


class ChangingDns(BaseResolver):
    """A real DNS server (UDP) whose answer for NAME is whatever `addresses` holds now, like the
    cluster DNS for a headless Service while pods come and go."""

    def __init__(self, addresses):
        self.addresses = list(addresses)

    def resolve(self, request, handler):
        reply = request.reply()
        if str(request.q.qname).rstrip(".") == NAME and request.q.qtype == QTYPE.A:
            for address in self.addresses:
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(address), ttl=1))
        return reply


class Load:
    """One long-lived client sending single images as fast as they return, in a thread."""

    def __init__(self, url):
        self.url, self.sent, self.errors = url, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with TritonClassifier(self.url, MODEL) as client:
            image = np.zeros((1, 3, client.spec.crop_size, client.spec.crop_size), np.uint8)
            while not self._stop.is_set():
                try:
                    client.infer(image)
                    self.sent += 1
                except Exception as error:  # collected; the test asserts there are none
                    self.errors.append(error)

    def __enter__(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(30)

    def __exit__(self, *exc):
        self.stop()


def test_a_long_lived_client_spreads_calls_over_every_server(two_servers):
    first, second = two_servers
    before = inference_count(first), inference_count(second)
    with TritonClassifier(f"ipv4:{first.grpc_url},{second.grpc_url}", MODEL) as client:
        image = np.zeros((1, 3, client.spec.crop_size, client.spec.crop_size), np.uint8)
        for _ in range(200):
            client.infer(image)
    deadline = time.monotonic() + 10  # Triton books a request in its statistics just after answering it
    while sum(served := (inference_count(first) - before[0], inference_count(second) - before[1])) < 200 \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum(served) == 200
    assert min(served) >= 0.3 * 200, f"calls per server {served}"


def test_a_server_added_after_the_client_connected_gets_calls_within_the_max_connection_age(repository):
    old_ports, new_ports = ports_on_two_addresses()
    grpc_port = new_ports.grpc
    dns = ChangingDns(["127.0.0.1"])
    resolver = DNSServer(dns, port=0, address="127.0.0.1")
    resolver.start_thread()
    dns_port = resolver.server.server_address[1]
    try:
        with started_triton(repository, ports=old_ports, extra_args=grpc_flags()) as old:
            with Load(f"dns://127.0.0.1:{dns_port}/{NAME}:{grpc_port}") as load:
                deadline = time.monotonic() + 30
                while load.sent < 20 and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert load.sent >= 20, load.errors[:3]
                with started_triton(repository, ports=new_ports, address="127.0.0.2", extra_args=grpc_flags()) as new:
                    dns.addresses = ["127.0.0.1", "127.0.0.2"]  # the scale-out's pod became ready
                    started = time.monotonic()
                    while inference_count(new) < 20 and time.monotonic() - started < 30:
                        time.sleep(0.5)
                    waited, reached_new = time.monotonic() - started, inference_count(new)
                    old_before = inference_count(old)
                    time.sleep(2)
                    old_after = inference_count(old)
                    load.stop()  # before any server stops: a stopping server is another test's subject
        assert reached_new >= 20, f"the new server got {reached_new} calls in {waited:.0f} s"
        assert waited < 20, f"the new server waited {waited:.0f} s for calls (max connection age {MAX_AGE_MS / 1000:.0f} s)"
        assert old_after > old_before, "the old server stopped getting calls"
        assert not load.errors, load.errors[:3]
    finally:
        resolver.stop()


def test_a_frozen_server_costs_a_client_seconds_not_its_deadline(two_servers, monkeypatch):
    """A node that dies without closing its connections (power loss, network partition) looks like a
    server that stops answering: SIGSTOP. Keepalive ends the calls stuck on it long before their 60 s
    deadline, and the client retries them on the other server."""
    import os
    import signal

    import histoserve.client.classifier as classifier_module

    monkeypatch.setattr(classifier_module, "KEEPALIVE_TIME_MS", 2000)  # production: 20 s and 10 s
    monkeypatch.setattr(classifier_module, "KEEPALIVE_TIMEOUT_MS", 1000)
    frozen, healthy = two_servers
    with TritonClassifier(f"ipv4:{frozen.grpc_url},{healthy.grpc_url}", MODEL, deadline_s=60) as client:
        image = np.zeros((1, 3, client.spec.crop_size, client.spec.crop_size), np.uint8)
        for _ in range(4):
            client.infer(image)  # a connection to each
        before = inference_count(healthy)
        os.killpg(frozen.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            for _ in range(10):
                client.infer(image)
            waited = time.monotonic() - started
        finally:
            os.killpg(frozen.process.pid, signal.SIGCONT)
        settle = time.monotonic() + 10  # Triton counts an inference just after it sends the response
        while inference_count(healthy) - before < 10 and time.monotonic() < settle:
            time.sleep(0.1)
        assert inference_count(healthy) - before == 10
    assert waited < 15, f"10 calls took {waited:.0f} s (deadline 60 s): keepalive did not notice the dead peer"
