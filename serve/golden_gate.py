"""python -m serve golden-gate --repository /models --model NAME --version N [--url 127.0.0.1:8001] [--port 8003]
python -m serve golden-gate --once --repository REPO --model NAME --version N --url HOST:PORT

Ready means "answers correctly": this process asks its own Triton (the one in the same pod) the
version's golden inputs (formats/version.py) and reports, on HTTP, whether the answers are right:

    GET /ready    200 once the served version gave every golden answer (right class, right label,
                  probabilities within the version's tolerance) at the last check; 503 before that
                  and after any failed check, with the reasons as JSON
    GET /healthz  200 while this process runs

In the Triton pod it is a second container whose readiness probe is /ready, so the pod joins the
Services only when its model gives the answers export measured: a loadable model with wrong weights
or a wrong labels file loads, and never takes traffic. It checks every --interval seconds until the
first pass, then every --recheck seconds (a restarted Triton, a GPU gone bad), each check a handful
of inferences. Inference, model readiness and model config need no admin key.

--once asks once, prints each wrong answer and exits 0 (every golden answer given) or 1: a smoke test
of any server that serves the version (`python -m serve` here, a pod through port-forward).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from histoserve.formats.contract import ContractError, ModelContract
from histoserve.formats.options import POSITIVE, POSITIVE_INT, Range, existing_folder
from histoserve.formats.version import GoldenAnswers, VersionFilesError, version_folder

PORT = Range(int, 1, 65535)


@dataclass
class Verdict:
    ready: bool = False
    problems: list[str] = field(default_factory=lambda: ["not checked yet"])
    checked_at: float = 0.0  # time.time() of the last check
    passes: int = 0
    failures: int = 0

    def to_json(self, model: str, version: int) -> bytes:
        return json.dumps({"model": model, "version": version, "ready": self.ready, "problems": self.problems,
                           "checked_at": self.checked_at, "passes": self.passes, "failures": self.failures}).encode()


def served_answers(url: str, model: str, version: int, inputs: np.ndarray, timeout_s: float = 30.0) -> tuple[np.ndarray, list[str]]:
    """The server's probability rows and top-1 labels for `inputs` (raises InferenceServerException)."""
    with grpcclient.InferenceServerClient(url) as client:
        if not client.is_model_ready(model, str(version), client_timeout=timeout_s):
            raise InferenceServerException(f"model {model} version {version} is not ready on {url}")
        contract = ModelContract.from_config(client.get_model_config(model, str(version), as_json=True,
                                                                     client_timeout=timeout_s)["config"])
        rows, labels = [], []
        for start in range(0, len(inputs), contract.max_batch_size):
            batch = np.ascontiguousarray(inputs[start:start + contract.max_batch_size])
            tensor = grpcclient.InferInput(contract.input_name, list(batch.shape), "UINT8")
            tensor.set_data_from_numpy(batch)
            raw = grpcclient.InferRequestedOutput(contract.output_name)
            top1 = grpcclient.InferRequestedOutput(contract.output_name, class_count=1)
            rows.append(client.infer(model, [tensor], str(version), outputs=[raw], client_timeout=timeout_s)
                        .as_numpy(contract.output_name))
            answer = client.infer(model, [tensor], str(version), outputs=[top1], client_timeout=timeout_s).as_numpy(contract.output_name)
            labels += [entry.decode().split(":", 2)[2] if entry.decode().count(":") >= 2 else ""
                       for entry in np.asarray(answer).reshape(len(batch), -1)[:, 0]]
    return np.concatenate(rows).astype(np.float64), labels


def check(url: str, answers: GoldenAnswers, inputs: np.ndarray) -> list[str]:
    """Problems with the served answers (empty: every golden answer given)."""
    try:
        probabilities, labels = served_answers(url, answers.model, answers.version, inputs)
    except (InferenceServerException, ContractError) as error:
        return [f"cannot ask {url}: {error.message() if isinstance(error, InferenceServerException) else error}"]
    return answers.problems(probabilities, labels)


class GoldenGate:
    """Checks in a thread; the HTTP handler only reads the last verdict."""

    def __init__(self, url: str, answers: GoldenAnswers, inputs: np.ndarray, interval_s: float, recheck_s: float):
        self.url, self.answers, self.inputs = url, answers, inputs
        self.interval_s, self.recheck_s = interval_s, recheck_s
        self.verdict = Verdict()
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def check_once(self) -> Verdict:
        problems = check(self.url, self.answers, self.inputs)
        with self.lock:
            was_ready = self.verdict.ready
            self.verdict = Verdict(not problems, problems, time.time(), self.verdict.passes + (not problems),
                                   self.verdict.failures + bool(problems))
            verdict = self.verdict
        name = f"{self.answers.model} version {self.answers.version}"
        if verdict.ready and not was_ready:
            print(f"golden-gate: ready: {name} gave all {len(self.answers.top1)} golden answers", flush=True)
        elif not verdict.ready and (was_ready or verdict.failures == 1 or verdict.failures % 30 == 0):
            print(f"golden-gate: not ready: {name}: " + "; ".join(problems[:5])
                  + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""), flush=True)
        return verdict

    def run(self) -> None:
        while not self.stopping.is_set():
            verdict = self.check_once()
            self.stopping.wait(self.recheck_s if verdict.ready else self.interval_s)

    def handler(self) -> type[BaseHTTPRequestHandler]:
        gate = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/healthz":
                    self._answer(200, b'{"alive": true}')
                elif self.path == "/ready":
                    with gate.lock:
                        verdict = gate.verdict
                    self._answer(200 if verdict.ready else 503, verdict.to_json(gate.answers.model, gate.answers.version))
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serve golden-gate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=existing_folder, required=True, help="the serving repository (serve stage's --target)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--version", type=POSITIVE_INT, required=True)
    parser.add_argument("--url", default="127.0.0.1:8001", help="the pod's own Triton, gRPC (default: %(default)s)")
    parser.add_argument("--address", default="0.0.0.0", help="address of the /ready endpoint (default: %(default)s)")
    parser.add_argument("--port", type=PORT, default=8003, help="port of the /ready endpoint (default: %(default)s)")
    parser.add_argument("--interval", type=POSITIVE, default=2.0, help="seconds between checks until the first pass")
    parser.add_argument("--recheck", type=POSITIVE, default=300.0, help="seconds between checks once passed (default: %(default)s)")
    parser.add_argument("--once", action="store_true", help="check once and exit 0 (all answers right) or 1; no HTTP endpoint")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
        problems = check(args.url, answers, inputs)
        for problem in problems:
            print(f"golden-gate: {problem}", file=sys.stderr)
        print(f"golden-gate: {args.model} version {args.version} on {args.url}: "
              + (f"not right ({len(problems)} problem(s) above)" if problems else f"all {len(answers.top1)} golden answers right"),
              flush=True)
        return 1 if problems else 0
    gate = GoldenGate(args.url, answers, inputs, args.interval, args.recheck)
    try:
        http = ThreadingHTTPServer((args.address, args.port), gate.handler())
    except OSError as error:
        print(f"error: cannot listen on {args.address}:{args.port}: {error.strerror or error}", file=sys.stderr, flush=True)
        return 1
    http.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=http.shutdown, daemon=True).start())
    checker = threading.Thread(target=gate.run, name="golden-checks", daemon=True)
    checker.start()
    print(f"golden-gate: {len(answers.top1)} golden answers for {args.model} version {args.version} from {folder}; "
          f"asking {args.url}; /ready on {args.address}:{args.port}", flush=True)
    try:
        http.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    gate.stopping.set()
    http.server_close()
    return 0
