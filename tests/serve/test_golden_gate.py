"""Ready means "answers correctly": `python -m histoserve.serve golden-gate` against a real Triton serving staged
versions. A good version becomes ready; versions that load and serve but answer wrongly (perturbed
weights, swapped labels, a rescaled head) never do, whatever the checksums say."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from histoserve.formats.version import GoldenAnswers
from histoserve.serve.stage import stage
from histoserve.serve.triton_flags import free_ports
from tests.conftest import MODEL, ROOT, started_triton
from tests.serve.published import copy_model, perturb_weights, republish, scale_head, swap_labels

WRONG = {  # model name → how its version 1 was damaged before its checksums were rewritten
    "perturbed": perturb_weights,
    "swapped": swap_labels,
    "rescaled": lambda folder: scale_head(folder, 0.7),
}


@pytest.fixture(scope="module")
def pod_repository(repository, tmp_path_factory):
    """One Triton repository with the good digits model and three consistent but wrong publishes."""
    store, pod = tmp_path_factory.mktemp("store"), tmp_path_factory.mktemp("pod")
    copy_model(repository, MODEL, store)
    stage(store, MODEL, 1, pod)
    for name, damage in WRONG.items():
        damage(copy_model(repository, MODEL, store, name) / "1")
        republish(store / name / "1")
        stage(store, name, 1, pod)  # the checksums vouch for it: the stage cannot tell
    return pod


@pytest.fixture(scope="module")
def triton(pod_repository):
    with started_triton(pod_repository) as server:
        yield server


def free_port() -> int:
    return free_ports().http


class Gate:
    """`python -m histoserve.serve golden-gate` as a child process, polled like the kubelet's readiness probe."""

    def __init__(self, repository, model: str, url: str, recheck_s: float = 300.0, extra: tuple[str, ...] = ()):
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "histoserve.serve", "golden-gate", "--repository", str(repository), "--model", model, "--version", "1",
             "--url", url, "--address", "127.0.0.1", "--port", str(self.port), "--interval", "0.2", "--recheck", str(recheck_s),
             *extra],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def probe(self) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ready", timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())
        except (urllib.error.URLError, ConnectionError):
            return 0, {}

    def probe_until(self, predicate, timeout_s: float = 60.0) -> list[tuple[int, dict]]:
        seen, deadline = [], time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output()
            seen.append(self.probe())
            if seen[-1][0] and predicate(*seen[-1]):
                return seen
            time.sleep(0.1)
        raise AssertionError(f"golden-gate never got there; last answers {seen[-3:]}\n{self.output()}")

    def output(self) -> str:
        if self.process.poll() is None:
            self.process.terminate()
        return self.process.communicate(timeout=30)[0]

    def stop(self) -> str:
        return self.output()


def test_a_good_version_is_ready_once_triton_gives_every_golden_answer(triton, pod_repository):
    gate = Gate(pod_repository, MODEL, triton.grpc_url)
    try:
        seen = gate.probe_until(lambda status, _body: status == 200)
        status, body = seen[-1]
        answers, _ = GoldenAnswers.read(pod_repository / MODEL / "1")
        assert body == {**body, "model": MODEL, "version": 1, "ready": True, "problems": []}
        assert body["passes"] == 1 and len(answers.top1) >= 8
        assert all(s in (0, 200, 503) for s, _ in seen)  # 0: not listening yet; never another answer
    finally:
        output = gate.stop()
    assert f"ready: {MODEL} version 1 gave all {len(answers.top1)} golden answers" in output


@pytest.mark.parametrize("model, reason", [
    ("perturbed", r"golden input \d+: answered class"),
    ("swapped", r"answered class \d+ \('1'\), expected \d+ \('0'\)|answered class \d+ \('0'\), expected \d+ \('1'\)"),
    ("rescaled", r"probabilities differ by"),
])
def test_a_loadable_version_with_wrong_answers_is_served_by_triton_and_never_ready(triton, pod_repository, model, reason):
    import re

    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        assert client.is_model_ready(model, "1")  # Triton loaded it and would serve it: only the gate can tell
    gate = Gate(pod_repository, model, triton.grpc_url)
    try:
        seen = gate.probe_until(lambda _status, body: body.get("failures", 0) >= 3)
    finally:
        output = gate.stop()
    assert {status for status, _ in seen} <= {0, 503}, seen  # never ready, not once
    problems = seen[-1][1]["problems"]
    assert any(re.search(reason, p) for p in problems), problems
    assert f"not ready: {model} version 1" in output


@pytest.mark.parametrize("model, code", [(MODEL, 0), ("swapped", 1)])
def test_once_checks_a_server_and_exits_with_the_verdict(triton, pod_repository, model, code):
    result = subprocess.run([sys.executable, "-m", "histoserve.serve", "golden-gate", "--once", "--repository", str(pod_repository),
                             "--model", model, "--version", "1", "--url", triton.grpc_url], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == code, result.stdout + result.stderr
    if code:
        assert "answered class" in result.stderr and "not right" in result.stdout
    else:
        assert "golden answers right" in result.stdout and result.stderr == ""


def test_the_rescaled_head_keeps_every_top1_class_so_only_the_tolerance_catches_it(pod_repository):
    """The third damage is the subtle one: same classes, same labels, other probabilities."""
    from histoserve.export.onnx_model import onnx_session
    from histoserve.export.precision import onnx_probabilities

    good, inputs = GoldenAnswers.read(pod_repository / MODEL / "1")
    rescaled = onnx_probabilities(onnx_session(pod_repository / "rescaled" / "1" / "model.onnx"), inputs)
    assert rescaled.argmax(1).tolist() == good.top1
    assert np.abs(rescaled - np.asarray(good.probabilities)).max() > good.tolerance


def test_a_ready_gate_turns_unready_when_its_triton_stops_answering(own_triton):
    gate = Gate(own_triton.model_repository, MODEL, own_triton.grpc_url, recheck_s=0.5)
    try:
        gate.probe_until(lambda status, _body: status == 200)
        own_triton.stop()
        status, body = gate.probe_until(lambda status, _body: status == 503, timeout_s=30)[-1]
        assert body["ready"] is False and "cannot ask" in body["problems"][0]
    finally:
        gate.stop()


def test_the_gate_refuses_to_start_without_readable_golden_answers(pod_repository, tmp_path):
    result = subprocess.run([sys.executable, "-m", "histoserve.serve", "golden-gate", "--repository", str(tmp_path), "--model", MODEL,
                             "--version", "1", "--port", str(free_port())], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"{tmp_path / MODEL / '1' / 'golden.json'}: cannot read" in result.stderr


@pytest.fixture
def own_triton(repository, tmp_path, triton_factory):
    """A Triton of this test's own (it is paused, stopped and restarted), serving the good version."""
    copy_model(repository, MODEL, tmp_path / "store")
    stage(tmp_path / "store", MODEL, 1, tmp_path / "pod")
    return triton_factory(tmp_path / "pod")


def test_one_timed_out_recheck_does_not_pull_a_ready_pod_but_several_in_a_row_do(own_triton):
    """A paused Triton (SIGSTOP: connections accepted, nothing answered, as under a load spike) times
    the rechecks out. One such recheck leaves the pod in; --failures-to-unready of them in a row take
    it out; a wrong answer would at once (the tests above)."""
    gate = Gate(own_triton.model_repository, MODEL, own_triton.grpc_url, recheck_s=0.3,
                extra=("--check-timeout", "1", "--failures-to-unready", "3", "--watch", "0.2", "--probe-timeout", "0.5"))
    pid = own_triton.process.pid
    try:
        gate.probe_until(lambda status, _body: status == 200)
        os.kill(pid, signal.SIGSTOP)
        seen = gate.probe_until(lambda _status, body: body.get("consecutive_failures", 0) >= 1, timeout_s=20)
        os.kill(pid, signal.SIGCONT)
        seen += gate.probe_until(lambda _status, body: body.get("passes", 0) >= 2 and body["consecutive_failures"] == 0, timeout_s=20)
        assert {status for status, _ in seen} == {200}, [b for s, b in seen if s != 200][:2]
        os.kill(pid, signal.SIGSTOP)
        status, body = gate.probe_until(lambda status, _body: status == 503, timeout_s=30)[-1]
        os.kill(pid, signal.SIGCONT)
        assert body["consecutive_failures"] == 3 and "cannot ask" in body["problems"][0], body
        gate.probe_until(lambda status, _body: status == 200, timeout_s=30)
    finally:
        os.kill(pid, signal.SIGCONT)
        output = gate.stop()
    assert "still ready after 1 failed check(s) in a row of 3 tolerated" in output


def test_a_restarted_triton_clears_a_stale_ready_at_once_and_is_checked_again(own_triton, triton_factory):
    """Rechecks 5 minutes apart, as in the pod: the gate still notices Triton going (it watches its
    readiness every --watch seconds) and withdraws the pass before the restarted Triton is back, which
    must then give the golden answers again."""
    gate = Gate(own_triton.model_repository, MODEL, own_triton.grpc_url, recheck_s=300, extra=("--watch", "0.2"))
    try:
        gate.probe_until(lambda status, _body: status == 200)
        own_triton.stop()
        started = time.monotonic()
        status, body = gate.probe_until(lambda status, _body: status == 503, timeout_s=10)[-1]
        assert time.monotonic() - started < 5 and body["passes"] == 1, body
        triton_factory(own_triton.model_repository, ports=own_triton.ports)  # the restart, on the same ports
        status, body = gate.probe_until(lambda status, _body: status == 200, timeout_s=60)[-1]
        assert body["passes"] == 2  # a fresh check of the new Triton, not the old verdict back
    finally:
        output = gate.stop()
    assert "checking again once Triton is back" in output


class StuckCheck:
    """A check that never returns until released: a checker stuck in a call that honours no deadline."""

    def __init__(self):
        self.release, self.entered = threading.Event(), threading.Event()

    def __call__(self):
        from histoserve.serve.golden_gate import Outcome

        self.entered.set()
        self.release.wait(60)
        return Outcome([], answered=True)


def healthz(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the dead checker's, on purpose
@pytest.mark.parametrize("failure", ["stuck", "dead"])
def test_healthz_fails_when_the_checker_is_stuck_or_dead(pod_repository, failure):
    """A checker that stops making progress would freeze the verdict: /healthz then answers 503, so the
    kubelet restarts the container, and answers 200 again once the checker moves."""
    from http.server import ThreadingHTTPServer

    from histoserve.serve.golden_gate import GoldenGate

    answers, inputs = GoldenAnswers.read(pod_repository / MODEL / "1")
    stuck = StuckCheck()

    def dies():
        raise RuntimeError("the checker died")

    gate = GoldenGate("127.0.0.1:9", answers, inputs, 0.2, 300.0, check_timeout_s=0.3, stuck_grace_s=0.3,
                      check=stuck if failure == "stuck" else dies)
    http = ThreadingHTTPServer(("127.0.0.1", 0), gate.handler())
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        gate.start()
        deadline = time.monotonic() + 10
        while (answer := healthz(http.server_address[1]))[0] != 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert answer[0] == 503, answer
        assert ("a check has run" if failure == "stuck" else "not running") in answer[1]["detail"]
        if failure == "stuck":
            stuck.release.set()
            deadline = time.monotonic() + 10
            while healthz(http.server_address[1])[0] != 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert healthz(http.server_address[1])[0] == 200
    finally:
        stuck.release.set()
        gate.stopping.set()
        http.shutdown()
