"""A thin gRPC client for a histoserve model on Triton: reads the serving contract from the server,
preprocesses files with the one shared implementation and sends uint8 batches (or, to an encoded model,
sends the files as they are), returns top-k labels through Triton's classification extension. Each
request is traced when the process configures OpenTelemetry (client.tracing)."""

from __future__ import annotations

import json
import os
import re
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import tritonclient.grpc as grpcclient
from tenacity import RetryError, Retrying, retry_if_exception, stop_before_delay, wait_random_exponential
from tritonclient.utils import InferenceServerException

from histoserve.client import tracing
from histoserve.client.record_sender import MonitorSender
from histoserve.client.telemetry import CallMetrics, grpc_code, process_metrics
from histoserve.formats.contract import ContractError, EncodedContract, ModelContract, contract_for
from histoserve.formats.options import ClientTls, OptionError
from histoserve.formats.preprocessing import ImageLoadError, PreprocessSpec, preprocess_file, read_image_file
from histoserve.formats.records import records_for


class ClientError(RuntimeError):
    """The server or model cannot be used at all (as opposed to one bad file)."""


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    score: float


@dataclass(frozen=True)
class FileResult:
    path: str
    predictions: list[Prediction] | None = None
    error: str | None = None
    trace_id: str | None = None  # of the request that carried the file (32 hex digits), when traced

    @property
    def ok(self) -> bool:
        return self.error is None


def parse_classification(entry: bytes | str) -> Prediction:
    """Triton's classification output is 'score:index:label' (label may be absent)."""
    text = entry.decode() if isinstance(entry, bytes) else entry
    score, index, *label = text.split(":", 2)
    return Prediction(label=label[0] if label else index, index=int(index), score=float(score))


# Keepalive: ping every 20 s, also between calls, and give up on a connection after 10 s of silence,
# so a call to a dead node fails fast instead of hanging until its deadline. Servers must accept
# pings that often: k8s/base/deployment.yaml and `python -m histoserve.serve` allow one every 10 s.
KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000
# After a server closes a connection (Triton's --grpc-max-connection-age on Kubernetes), re-resolve
# the name at most this often, to find pods a scale-out added (gRPC's default is 30 s).
DNS_MIN_RERESOLUTION_MS = 5_000
# Reconnect to a server that went away within 2 s of its return (gRPC backs off up to 120 s).
RECONNECT_BACKOFF_MS = (500, 2_000)
# An inference call made while no server is reachable waits for one (up to its deadline) instead of
# failing at once; only ModelInfer, so that reading the contract at start-up still fails fast.
SERVICE_CONFIG = json.dumps({"methodConfig": [{
    "name": [{"service": "inference.GRPCInferenceService", "method": "ModelInfer"}],
    "waitForReady": True,
}]})
# What a rollout, a restart or an overloaded server answer for a while; anything else is final.
# NOT_FOUND: "Request for unknown model ... has no available versions" while a server unloads its
# models on the way down (measured with a real Triton stopped under load); the contract was read at
# start-up, so the model exists.
RETRYABLE = ("StatusCode.UNAVAILABLE", "StatusCode.RESOURCE_EXHAUSTED", "StatusCode.NOT_FOUND")


def channel_arguments(url: str) -> list[tuple[str, object]]:
    """gRPC channel options: keepalive always; for `dns:///host:port` (or `ipv4:a:p1,b:p2`) targets,
    round_robin over every address the target names.

    A Kubernetes headless Service resolves to one address per ready pod. gRPC's default policy
    (pick_first) sends everything over one long-lived HTTP/2 connection to one pod; round_robin keeps
    a connection to each pod and spreads calls. tritonclient replaces all its channel options when
    any are given, so its message-size defaults are restated here.
    """
    options: list[tuple[str, object]] = [
        ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        # Any unanswered ping ends the connection after the same time: gRPC's own bandwidth probe
        # ping, sent with a request, otherwise holds keepalive back for a minute (measured).
        ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.dns_min_time_between_resolutions_ms", DNS_MIN_RERESOLUTION_MS),
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
        ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[1]),
        ("grpc.service_config", SERVICE_CONFIG),
    ]
    if url.startswith(("dns:", "ipv4:", "ipv6:")):
        options.append(("grpc.lb_policy_name", "round_robin"))
    return options


class InferenceFailed(RuntimeError):
    """A request failed for good: a final error, or its deadline passed; the message says which."""


def retryable(error: BaseException) -> bool:
    return isinstance(error, InferenceServerException) and error.status() in RETRYABLE


class ContractView:
    """What both classifiers (this one and client.aio's) read off the contract they hold."""

    contract: ModelContract | EncodedContract

    @property
    def spec(self) -> PreprocessSpec | None:
        """How files are preprocessed here; None for an encoded model (the server does it)."""
        return self.contract.preprocess

    @property
    def max_batch_size(self) -> int:
        return self.contract.max_batch_size


class TritonClassifier(ContractView):
    """Classify images with a model served by Triton, over gRPC.

    Every request has a deadline (`deadline_s`) that covers its retries: answers a rollout or a
    restart gives for a while (UNAVAILABLE, RESOURCE_EXHAUSTED, a model being unloaded) are retried
    with exponential backoff and full jitter (tenacity), and while no server is reachable the call
    waits for one (gRPC wait-for-ready) instead of failing, so a server that comes back within the
    deadline loses no request.
    """

    def __init__(self, url: str, model: str, version: str = "", deadline_s: float = 60.0, tls: ClientTls | None = None,
                 monitor: MonitorSender | None = None, metrics: CallMetrics | None = None):
        self.url, self.model, self.version, self.deadline_s, self.tls = url, model, version, deadline_s, tls
        self.monitor = monitor  # classify_files sends a record per classified file to it (client/record_sender.py)
        self.metrics = metrics or process_metrics()  # OpenTelemetry; no-ops until the process configures it (client.telemetry)
        try:
            security = tls.client_arguments() if tls else {}
        except OptionError as error:
            raise ClientError(str(error)) from error
        self.client = grpcclient.InferenceServerClient(url, channel_args=channel_arguments(url), **security)
        try:
            self._read_contract()
        except BaseException:
            self.client.close()  # the channel would otherwise live on with nobody to close it
            raise

    def _read_contract(self) -> None:
        try:
            if not self.client.is_model_ready(self.model, self.version):
                raise ClientError(not_ready_message(self))
            config = self.client.get_model_config(self.model, self.version, as_json=True)["config"]
        except InferenceServerException as error:
            raise unreachable(self, error) from error
        self.contract = contract_from(config)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> TritonClassifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def infer(self, images: np.ndarray | list[bytes], top_k: int = 1) -> list[list[Prediction]]:
        """Top-k predictions for a uint8 batch of shape (N, 3, crop, crop), N <= max_batch_size (for an
        encoded model: a list of N files' bytes)."""
        return self.infer_versioned(images, top_k)[0]

    def infer_versioned(self, images: np.ndarray | list[bytes], top_k: int = 1,
                        deadline: float | None = None) -> tuple[list[list[Prediction]], str]:
        """`infer`, and the model version that answered (Triton's response names it): what a monitor
        record needs, since the latest version changes during a rollout. `deadline` (time.monotonic())
        when the request's deadline is older than this call: a batch sent again keeps its first one."""
        result = self._infer(images, top_k_output(self.contract, top_k), deadline)
        return predictions_of(result.as_numpy(self.contract.output_name)), result.get_response().model_version

    def infer_probabilities(self, images: np.ndarray | list[bytes]) -> np.ndarray:
        """The full FP32 probability rows, for parity checks against PyTorch."""
        return self._infer(images, grpcclient.InferRequestedOutput(self.contract.output_name)).as_numpy(self.contract.output_name)

    def _infer(self, images: np.ndarray | list[bytes], output: grpcclient.InferRequestedOutput,
               deadline: float | None = None) -> grpcclient.InferResult:
        """Raises InferenceFailed when the request fails for good or its deadline passes."""
        request = input_of(self.contract, images)
        started = time.monotonic()
        deadline = deadline or started + self.deadline_s
        try:
            for attempt in Retrying(**retry_policy(max(0.001, deadline - started))):
                with attempt, counted_attempt(self), tracing.rpc_span(self.model, self.url) as (span, headers):
                    result = self.client.infer(self.model, [request], self.version, outputs=[output], headers=headers,
                                               client_timeout=max(0.001, deadline - time.monotonic()))
                    tracing.answered(span, result.get_response().model_version)
        except (RetryError, InferenceServerException) as error:
            self.metrics.call(self.model, self.version, grpc_code(last_error(error)), time.monotonic() - started)
            raise failure(error, self.deadline_s) from None
        self.metrics.call(self.model, result.get_response().model_version, "OK", time.monotonic() - started)
        return result

    def classify_files(
        self, paths: Iterable[str | os.PathLike], top_k: int = 1, concurrency: int = 4, batch_size: int | None = None
    ) -> Iterator[FileResult]:
        """One result per path, in input order; a bad file yields an error result and never stops the rest.

        `concurrency` batches are worked on at once, each by its own thread that reads and
        preprocesses its files (Pillow releases the GIL while decoding and resizing) and then sends
        them as one request, so preprocessing overlaps inference and up to `concurrency` requests
        are in flight. At most 2 × concurrency batches are held at a time and `paths` is read
        lazily, so a folder of any size runs in bounded memory. Batches have `batch_size` files
        (default and at most: the model's max batch size).
        """
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        size = min(batch_size or self.max_batch_size, self.max_batch_size)
        pool = ThreadPoolExecutor(concurrency, thread_name_prefix="classify")
        window: deque[Future[list[FileResult]]] = deque()
        parent = tracing.current_context()  # the caller's span, for the worker threads' spans
        try:
            for group in batched(paths, size):
                window.append(pool.submit(self._classify_batch, group, top_k, parent))
                if len(window) >= 2 * concurrency:
                    yield from window.popleft().result()
            while window:
                yield from window.popleft().result()
        finally:  # also on Ctrl-C or when the caller stops early: drop the batches not yet started
            pool.shutdown(wait=False, cancel_futures=True)

    def _classify_batch(self, paths: list[str], top_k: int, parent=None) -> list[FileResult]:
        with tracing.classify_span(self.model, paths, parent) as span:
            batch = PreparedBatch.of(paths, self.spec)
            deadline = time.monotonic() + self.deadline_s  # one for the batch, re-sends included
            while batch.images:
                span.set_attribute("histoserve.batch_size", len(batch.images))
                tensor = batch.tensor()  # stacked once: sent, then the monitor's statistics
                try:
                    rows, version = self.infer_versioned(tensor, top_k, deadline)
                except InferenceFailed as error:
                    if batch.drop_refused_file(error):
                        continue  # an encoded model refused one file: the others are sent again without it
                    return batch.finish(None, f"inference failed: {error}", tracing.trace_id_of(span))
                if self.monitor is not None and self.spec is not None:
                    self.monitor.submit(records_for(self.model, version, tensor, [row[0].index for row in rows],
                                                    [row[0].score for row in rows], tracing.trace_id_of(span)))
                return batch.finish(rows, "", tracing.trace_id_of(span))
            return batch.finish(None, "", tracing.trace_id_of(span))


# What the sync classifier here and the asyncio one (client/aio.py) share.

def not_ready_message(classifier) -> str:
    return f"model {classifier.model!r} (version {classifier.version or 'latest'}) is not ready on {classifier.url}"


def unreachable(classifier, error: InferenceServerException) -> ClientError:
    hint = ("; if the server uses TLS, pass --ssl" if classifier.tls is None
            else "; check that the server speaks TLS and that the certificates match")
    return ClientError(f"cannot reach Triton at {classifier.url}: {error.message()}{hint}")


def contract_from(config: dict) -> ModelContract | EncodedContract:
    try:
        return contract_for(config)
    except ContractError as error:
        raise ClientError(str(error)) from error


def input_of(contract: ModelContract | EncodedContract, images: np.ndarray | list[bytes]) -> grpcclient.InferInput:
    """The request's one input: uint8 pixels, or for an encoded model the files, an N × 1 BYTES tensor."""
    if isinstance(contract, EncodedContract):
        files = np.array(list(images), dtype=np.object_).reshape(-1, 1)
        request = grpcclient.InferInput(contract.input_name, list(files.shape), "BYTES")
        request.set_data_from_numpy(files)
        return request
    request = grpcclient.InferInput(contract.input_name, list(images.shape), "UINT8")
    request.set_data_from_numpy(np.ascontiguousarray(images, dtype=np.uint8))
    return request


def top_k_output(contract: ModelContract, top_k: int) -> grpcclient.InferRequestedOutput:
    return grpcclient.InferRequestedOutput(contract.output_name, class_count=min(top_k, contract.num_classes))


def predictions_of(rows: np.ndarray) -> list[list[Prediction]]:
    return [[parse_classification(entry) for entry in row] for row in rows]


@contextmanager
def counted_attempt(classifier):
    """One RPC attempt counted with the status it got (OK, or the error it raised)."""
    try:
        yield
    except InferenceServerException as error:
        classifier.metrics.attempt(classifier.model, classifier.version, grpc_code(error))
        raise
    classifier.metrics.attempt(classifier.model, classifier.version, "OK")


def last_error(error: BaseException) -> BaseException | None:
    """The error a call ended with: the last attempt's, when retries gave up."""
    return error.last_attempt.exception() if isinstance(error, RetryError) else error


def retry_policy(deadline_s: float) -> dict:
    """tenacity's arguments: retry what a restart or rollout answers, backoff with full jitter, and
    no attempt that would start after the deadline."""
    return {"retry": retry_if_exception(retryable), "wait": wait_random_exponential(multiplier=0.2, max=5),
            "stop": stop_before_delay(deadline_s)}


def failure(error: BaseException, deadline_s: float) -> InferenceFailed:
    if isinstance(error, RetryError):
        last = error.last_attempt
        return InferenceFailed(f"gave up after {last.attempt_number} attempts in the {deadline_s:g} s deadline: "
                               f"{_message(last.exception())}")
    if isinstance(error, InferenceServerException) and error.status() == "StatusCode.DEADLINE_EXCEEDED":
        return InferenceFailed(f"the {deadline_s:g} s deadline passed (no server answered: {_message(error)})")
    return InferenceFailed(_message(error))


# How an encoded model's preprocessing step names the file it refused (export/preprocess_model.py).
REFUSED_FILE = re.compile(r"\bimage_file\[(\d+)\]: (.*)", re.DOTALL)


@dataclass
class PreparedBatch:
    """A batch of files read (and, for a pixel model, preprocessed): the images or files' bytes, and a
    result slot per path (filled now for a file that could not be read, by `finish` for the others).
    One span per file (client.tracing), current inside the request's span."""

    paths: list[str]
    images: list[np.ndarray] | list[bytes]
    slots: list[int]
    results: list[FileResult | None]

    @classmethod
    def of(cls, paths: list[str], spec: PreprocessSpec | None) -> PreparedBatch:
        """`spec` None: an encoded model's batch, the files as they are."""
        batch = cls(paths, [], [], [])
        for path in paths:
            with tracing.file_span(path, encoded=spec is None) as span:
                try:
                    batch.images.append(preprocess_file(path, spec) if spec is not None else read_image_file(path))
                    batch.slots.append(len(batch.results))
                    batch.results.append(None)
                except ImageLoadError as error:
                    tracing.failed(span, error.reason)
                    batch.results.append(FileResult(path, error=error.reason))
        return batch

    def tensor(self) -> np.ndarray | list[bytes]:
        return np.stack(self.images) if self.images and isinstance(self.images[0], np.ndarray) else list(self.images)

    def drop_refused_file(self, error: InferenceFailed) -> bool:
        """When an encoded model refused one file of this batch (INVALID_ARGUMENT naming image_file[i]):
        that file's result is the server's reason, it leaves the batch, and True (send the rest again)."""
        refused = REFUSED_FILE.search(str(error)) if "INVALID_ARGUMENT" in str(error) else None
        if refused is None or int(refused.group(1)) >= len(self.images) or isinstance(self.images[0], np.ndarray):
            return False
        index = int(refused.group(1))
        slot = self.slots.pop(index)
        self.images.pop(index)
        self.results[slot] = FileResult(self.paths[slot], error=f"refused by the server: {refused.group(2).strip()}")
        return True

    def finish(self, rows: list[list[Prediction]] | None, error: str, trace_id: str | None = None) -> list[FileResult]:
        """Every file's result, each with the request's trace (also those that failed here: their spans
        say why)."""
        for index, slot in enumerate(self.slots):
            path = self.paths[slot]
            self.results[slot] = FileResult(path, predictions=rows[index]) if rows is not None else FileResult(path, error=error)
        return [replace(result, trace_id=trace_id) for result in self.results]



def _message(error: BaseException | None) -> str:
    if isinstance(error, InferenceServerException):
        return f"{error.status() or 'error'}: {(error.message() or '').strip()}"
    return str(error)


def batched(paths: Iterable[str | os.PathLike], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for path in paths:
        batch.append(os.fspath(path))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
