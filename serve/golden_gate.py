"""python -m histoserve.serve golden-gate --repository /models --model NAME --version N [--url 127.0.0.1:8001] [--port 8003]
                               [--ssl-root-certificates CA --ssl-private-key KEY --ssl-certificate-chain CRT]
python -m histoserve.serve golden-gate --once --repository REPO --model NAME --version N --url HOST:PORT [--ssl ...]

Ready means "answers correctly": this process asks its own Triton (the one in the same pod) the
version's golden inputs (formats/version.py) and reports, on HTTP, whether the answers are right:

    GET /ready         200 once the served version gave every golden answer (right class, right label,
                       probabilities within the version's tolerance) at the last check; 503 before that
                       and once it is withdrawn (below), with the reasons as JSON
    GET /healthz       200 while this process runs *and* its checker thread makes progress: a checker
                       that died, or one stuck in a check past --check-timeout, answers 503 (its
                       verdict would be frozen), so the kubelet restarts this container
    GET /triton/live   Triton's own liveness and readiness, asked at each request (ServerLive,
    GET /triton/ready  ServerReady): the probes of the Triton container, which cannot speak TLS itself

In the Triton pod it is a second container whose readiness probe is /ready, so the pod joins the
Services only when its model gives the answers export measured: a loadable model with wrong weights
or a wrong labels file loads, and never takes traffic. It checks every --interval seconds until the
first pass, then every --recheck seconds (a GPU gone bad), each check a handful of inferences with
--check-timeout for all of them. Once ready, the verdict is withdrawn by a wrong answer at once, but
by failures to ask (a timeout under load) only after --failures-to-unready in a row; and at once when
Triton says it is not ready or refuses the connection (a restarted Triton: it is watched every --watch
seconds, and the /triton/* probes report what they see), so a restarted Triton is checked again
before the pod rejoins. Inference, model readiness and model config need no admin key.

With the --ssl options it calls Triton over TLS, presenting the client certificate for mutual TLS.
The files are read again whenever they change on disk (a Secret volume renewed by cert-manager), so
a rotated client certificate needs no restart.

--once asks once, prints each wrong answer and exits 0 (every golden answer given) or 1: a smoke test
of any server that serves the version (`python -m histoserve.serve` here, a pod through port-forward).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from histoserve.formats.contract import ContractError, ModelContract
from histoserve.formats.options import (
    POSITIVE,
    POSITIVE_INT,
    ClientTls,
    OptionError,
    Range,
    add_tls_arguments,
    existing_folder,
    tls_from,
)
from histoserve.formats.version import GoldenAnswers, VersionFilesError, version_folder

PORT = Range(int, 1, 65535)
REFUSED = "StatusCode.UNAVAILABLE"  # tritonclient's status() of a refused connection or a failed TLS handshake


@dataclass
class Verdict:
    ready: bool = False
    problems: list[str] = field(default_factory=lambda: ["not checked yet"])
    checked_at: float = 0.0  # time.time() of the last check
    passes: int = 0
    failures: int = 0
    consecutive_failures: int = 0  # checks in a row that could not ask Triton (tolerated while ready)

    def to_json(self, model: str, version: int) -> bytes:
        return json.dumps({"model": model, "version": version, "ready": self.ready, "problems": self.problems,
                           "checked_at": self.checked_at, "passes": self.passes, "failures": self.failures,
                           "consecutive_failures": self.consecutive_failures}).encode()


@dataclass(frozen=True)
class Outcome:
    """One check: `problems` empty when every golden answer was right; `answered` False when Triton
    could not be asked (refused, timed out), True when it answered, rightly or wrongly."""

    problems: list[str]
    answered: bool


def client_for(url: str, tls: ClientTls | None) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(url, **(tls.client_arguments() if tls else {}))


def served_answers(url: str, model: str, version: int, inputs: np.ndarray, timeout_s: float = 30.0,
                   tls: ClientTls | None = None) -> tuple[np.ndarray, list[str]]:
    """The server's probability rows and top-1 labels for `inputs`, all calls within `timeout_s`
    together (raises InferenceServerException)."""
    deadline = time.monotonic() + timeout_s

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise InferenceServerException(f"the check took over {timeout_s:g} s", status="StatusCode.DEADLINE_EXCEEDED")
        return remaining

    with client_for(url, tls) as client:
        if not client.is_model_ready(model, str(version), client_timeout=left()):
            raise InferenceServerException(f"model {model} version {version} is not ready on {url}")
        contract = ModelContract.from_config(client.get_model_config(model, str(version), as_json=True,
                                                                     client_timeout=left())["config"])
        rows, labels = [], []
        for start in range(0, len(inputs), contract.max_batch_size):
            batch = np.ascontiguousarray(inputs[start:start + contract.max_batch_size])
            tensor = grpcclient.InferInput(contract.input_name, list(batch.shape), "UINT8")
            tensor.set_data_from_numpy(batch)
            raw = grpcclient.InferRequestedOutput(contract.output_name)
            top1 = grpcclient.InferRequestedOutput(contract.output_name, class_count=1)
            rows.append(client.infer(model, [tensor], str(version), outputs=[raw], client_timeout=left())
                        .as_numpy(contract.output_name))
            answer = client.infer(model, [tensor], str(version), outputs=[top1], client_timeout=left()).as_numpy(contract.output_name)
            labels += [entry.decode().split(":", 2)[2] if entry.decode().count(":") >= 2 else ""
                       for entry in np.asarray(answer).reshape(len(batch), -1)[:, 0]]
    return np.concatenate(rows).astype(np.float64), labels


def ask(url: str, answers: GoldenAnswers, inputs: np.ndarray, timeout_s: float = 60.0, tls: ClientTls | None = None) -> Outcome:
    try:
        probabilities, labels = served_answers(url, answers.model, answers.version, inputs, timeout_s, tls)
    except InferenceServerException as error:
        return Outcome([f"cannot ask {url}: {error.message()}"], answered=False)
    except ContractError as error:
        return Outcome([f"cannot ask {url}: {error}"], answered=True)  # Triton answered: with a config we cannot use
    return Outcome(answers.problems(probabilities, labels), answered=True)


def check(url: str, answers: GoldenAnswers, inputs: np.ndarray, timeout_s: float = 60.0, tls: ClientTls | None = None) -> list[str]:
    """Problems with the served answers (empty: every golden answer given)."""
    return ask(url, answers, inputs, timeout_s, tls).problems


class Identity:
    """The TLS files this process calls Triton with, read again when their content changes (a Secret
    volume: the kubelet swaps the files atomically when cert-manager renews the Secret)."""

    def __init__(self, tls: ClientTls | None):
        self.tls = tls
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> str:
        digest = hashlib.sha256()
        for path in (self.tls.root_certificates, self.tls.private_key, self.tls.certificate_chain) if self.tls else ():
            try:
                with open(path, "rb") as file:
                    digest.update(file.read())
            except OSError as error:  # mid-swap, or gone: compare again at the next look
                digest.update(str(error).encode())
        return digest.hexdigest()

    def changed(self) -> bool:
        """True once after the files changed on disk."""
        now = self._fingerprint()
        if now == self.fingerprint:
            return False
        self.fingerprint = now
        return True


class GoldenGate:
    """Checks in a thread; the HTTP handler reads the last verdict, asks Triton's live/ready for the
    Triton container's probes and withdraws a stale verdict when Triton is down."""

    def __init__(self, url: str, answers: GoldenAnswers, inputs: np.ndarray, interval_s: float, recheck_s: float, *,
                 tls: ClientTls | None = None, check_timeout_s: float = 60.0, failures_to_unready: int = 3,
                 watch_s: float = 2.0, probe_timeout_s: float = 2.0, stuck_grace_s: float = 30.0,
                 check: Callable[[], Outcome] | None = None):
        self.url, self.answers, self.inputs = url, answers, inputs
        self.interval_s, self.recheck_s, self.watch_s = interval_s, recheck_s, watch_s
        self.check_timeout_s, self.failures_to_unready = check_timeout_s, failures_to_unready
        self.probe_timeout_s, self.stuck_grace_s = probe_timeout_s, stuck_grace_s
        self.identity = Identity(tls)
        self.check = check or (lambda: ask(self.url, self.answers, self.inputs, self.check_timeout_s, self.identity.tls))
        self.verdict = Verdict()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.wake = threading.Event()  # a withdrawn verdict: check again now
        self.thread: threading.Thread | None = None
        self.busy_since: float | None = None  # monotonic start of the check in progress
        self.beat_at = time.monotonic()       # the checker's last sign of progress outside a check
        self._client: grpcclient.InferenceServerClient | None = None
        self._client_lock = threading.Lock()

    @property
    def name(self) -> str:
        return f"{self.answers.model} version {self.answers.version}"

    def check_once(self) -> Verdict:
        self.reload_if_changed()
        self.busy_since = time.monotonic()
        try:
            outcome = self.check()
        finally:
            self.busy_since = None
            self.beat_at = time.monotonic()
        problems = outcome.problems
        with self.lock:
            old = self.verdict
            consecutive = 0 if outcome.answered else old.consecutive_failures + 1
            # Only a wrong answer, or several checks in a row that could not ask, withdraw a pass: one
            # check that timed out under load must not take a serving pod out.
            tolerated = bool(problems) and old.ready and not outcome.answered and consecutive < self.failures_to_unready
            self.verdict = Verdict(not problems or tolerated, problems, time.time(), old.passes + (not problems),
                                   old.failures + bool(problems), consecutive)
            verdict = self.verdict
        if verdict.ready and not old.ready:
            print(f"golden-gate: ready: {self.name} gave all {len(self.answers.top1)} golden answers", flush=True)
        elif tolerated:
            print(f"golden-gate: still ready after {consecutive} failed check(s) in a row of {self.failures_to_unready} "
                  f"tolerated: {self.name}: " + "; ".join(problems[:2]), flush=True)
        elif not verdict.ready and (old.ready or verdict.failures == 1 or verdict.failures % 30 == 0):
            print(f"golden-gate: not ready: {self.name}: " + "; ".join(problems[:5])
                  + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""), flush=True)
        return verdict

    def withdraw(self, reason: str) -> None:
        """Triton restarted or is going: the last pass says nothing about the Triton that comes back."""
        with self.lock:
            old = self.verdict
            if not old.ready:
                return
            self.verdict = Verdict(False, [reason], time.time(), old.passes, old.failures + 1, old.consecutive_failures)
        print(f"golden-gate: not ready: {self.name}: {reason}; checking again once Triton is back", flush=True)
        self.wake.set()

    def reload_if_changed(self) -> None:
        if self.identity.changed():
            with self._client_lock:
                if self._client is not None:
                    self._client.close()
                self._client = None
            print("golden-gate: the TLS files changed on disk: calling Triton with the new ones", flush=True)

    def triton(self, what: str) -> tuple[bool, str]:
        """Triton's ServerLive (`what` "live") or ServerReady ("ready"), asked now; a refused connection
        or a "not ready" withdraws the golden verdict."""
        try:
            with self._client_lock:
                if self._client is None:
                    self._client = client_for(self.url, self.identity.tls)
                client = self._client
            ask_triton = client.is_server_live if what == "live" else client.is_server_ready
            if ask_triton(client_timeout=self.probe_timeout_s):
                return True, f"Triton is {what}"
            detail = f"Triton says it is not {what}"
        except InferenceServerException as error:
            detail = f"cannot ask Triton at {self.url}: {error.message()}"
            if error.status() != REFUSED:
                return False, detail  # a timeout under load: the probe fails, the golden verdict stays
        except OptionError as error:
            return False, f"cannot ask Triton at {self.url}: {error}"
        self.withdraw(detail)
        return False, detail

    def run(self) -> None:
        while not self.stopping.is_set():
            self.wake.clear()
            verdict = self.check_once()
            if not verdict.ready:
                self.stopping.wait(self.interval_s)
                continue
            due = time.monotonic() + self.recheck_s
            while not self.stopping.is_set() and (left := due - time.monotonic()) > 0:
                self.beat_at = time.monotonic()
                if self.wake.wait(min(self.watch_s, left)):
                    break
                self.reload_if_changed()
                self.triton("ready")

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="golden-checks", daemon=True)
        self.thread.start()

    def health(self) -> tuple[bool, str]:
        """Is the checker alive and making progress? A stuck checker would freeze the verdict."""
        if self.thread is None or not self.thread.is_alive():
            return False, "the checker thread is not running"
        now, busy = time.monotonic(), self.busy_since
        if busy is not None and now - busy > self.check_timeout_s + self.stuck_grace_s:
            return False, f"a check has run for {now - busy:.0f} s, past --check-timeout {self.check_timeout_s:g} s"
        if busy is None and now - self.beat_at > max(self.interval_s, self.watch_s) + self.probe_timeout_s + self.stuck_grace_s:
            return False, f"the checker has made no progress for {now - self.beat_at:.0f} s"
        return True, "checking"

    def handler(self) -> type[BaseHTTPRequestHandler]:
        gate = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/healthz":
                    alive, detail = gate.health()
                    self._answer(200 if alive else 503, json.dumps({"alive": alive, "detail": detail}).encode())
                elif self.path == "/ready":
                    with gate.lock:
                        verdict = gate.verdict
                    self._answer(200 if verdict.ready else 503, verdict.to_json(gate.answers.model, gate.answers.version))
                elif self.path in ("/triton/live", "/triton/ready"):
                    what = self.path.rsplit("/", 1)[1]
                    ok, detail = gate.triton(what)
                    self._answer(200 if ok else 503, json.dumps({what: ok, "detail": detail}).encode())
                else:
                    self._answer(404, b'{"error": "not found"}')

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # the kubelet probes every few seconds: no access log
                pass

        return Handler


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`python -m histoserve.serve golden-gate`'s options (serve/__main__.py)."""
    parser.add_argument("--repository", type=existing_folder, required=True, help="the serving repository (serve stage's --target)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--version", type=POSITIVE_INT, required=True)
    parser.add_argument("--url", default="127.0.0.1:8001", help="the pod's own Triton, gRPC (default: %(default)s)")
    parser.add_argument("--address", default="0.0.0.0", help="address of the /ready endpoint (default: %(default)s)")
    parser.add_argument("--port", type=PORT, default=8003, help="port of the /ready endpoint (default: %(default)s)")
    parser.add_argument("--interval", type=POSITIVE, default=2.0, help="seconds between checks until the first pass")
    parser.add_argument("--recheck", type=POSITIVE, default=300.0, help="seconds between checks once passed (default: %(default)s)")
    parser.add_argument("--check-timeout", type=POSITIVE, default=60.0,
                        help="seconds for all calls of one check together (default: %(default)s)")
    parser.add_argument("--failures-to-unready", type=POSITIVE_INT, default=3,
                        help="checks in a row that cannot ask Triton before a pass is withdrawn; a wrong answer "
                             "withdraws it at once (default: %(default)s)")
    parser.add_argument("--watch", type=POSITIVE, default=2.0,
                        help="seconds between looks at Triton's readiness while passed (default: %(default)s)")
    parser.add_argument("--probe-timeout", type=POSITIVE, default=2.0,
                        help="seconds for the ServerLive/ServerReady call of /triton/live, /triton/ready (default: %(default)s)")
    parser.add_argument("--once", action="store_true", help="check once and exit 0 (all answers right) or 1; no HTTP endpoint")
    add_tls_arguments(parser.add_argument_group("TLS to Triton"))


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        tls = tls_from(args)
    except OptionError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    folder = version_folder(args.repository, args.model, args.version)
    try:
        answers, inputs = GoldenAnswers.read(folder)
    except VersionFilesError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    if (answers.model, answers.version) != (args.model, args.version):
        print(f"error: {folder / 'golden.json'}: answers for {answers.model} version {answers.version}, not "
              f"{args.model} version {args.version}", file=sys.stderr, flush=True)
        return 1
    if args.once:
        problems = check(args.url, answers, inputs, args.check_timeout, tls)
        for problem in problems:
            print(f"golden-gate: {problem}", file=sys.stderr)
        print(f"golden-gate: {args.model} version {args.version} on {args.url}: "
              + (f"not right ({len(problems)} problem(s) above)" if problems else f"all {len(answers.top1)} golden answers right"),
              flush=True)
        return 1 if problems else 0
    gate = GoldenGate(args.url, answers, inputs, args.interval, args.recheck, tls=tls, check_timeout_s=args.check_timeout,
                      failures_to_unready=args.failures_to_unready, watch_s=args.watch, probe_timeout_s=args.probe_timeout)
    try:
        http = ThreadingHTTPServer((args.address, args.port), gate.handler())
    except OSError as error:
        print(f"error: cannot listen on {args.address}:{args.port}: {error.strerror or error}", file=sys.stderr, flush=True)
        return 1
    http.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=http.shutdown, daemon=True).start())
    gate.start()
    print(f"golden-gate: {len(answers.top1)} golden answers for {args.model} version {args.version} from {folder}; "
          f"asking {args.url}{' over TLS' if tls else ''}; /ready on {args.address}:{args.port}", flush=True)
    try:
        http.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    gate.stopping.set()
    http.server_close()
    return 0
