"""A thin gRPC client for a histoserve model on Triton: reads the serving contract from the server,
preprocesses files with the one shared implementation, sends uint8 batches, returns top-k labels
through Triton's classification extension."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from client.contract import ContractError, ModelContract
from client.preprocessing import ImageLoadError, PreprocessSpec, preprocess_file


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
# pings that often: k8s/base/deployment.yaml and `python -m serve` allow one every 10 s.
KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000
# After a server closes a connection (Triton's --grpc-max-connection-age on Kubernetes), re-resolve
# the name at most this often, to find pods a scale-out added (gRPC's default is 30 s).
DNS_MIN_RERESOLUTION_MS = 5_000


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
    ]
    if url.startswith(("dns:", "ipv4:", "ipv6:")):
        options.append(("grpc.lb_policy_name", "round_robin"))
    return options


class TritonClassifier:
    def __init__(self, url: str, model: str, version: str = "", timeout_s: float = 60.0):
        self.url, self.model, self.version, self.timeout_s = url, model, version, timeout_s
        self.client = grpcclient.InferenceServerClient(url, channel_args=channel_arguments(url))
        try:
            self._read_contract()
        except BaseException:
            self.client.close()  # the channel would otherwise live on with nobody to close it
            raise

    def _read_contract(self) -> None:
        model, version, url = self.model, self.version, self.url
        try:
            if not self.client.is_model_ready(model, version):
                raise ClientError(f"model {model!r} (version {version or 'latest'}) is not ready on {url}")
            config = self.client.get_model_config(model, version, as_json=True)["config"]
        except InferenceServerException as error:
            raise ClientError(f"cannot reach Triton at {url}: {error.message()}") from error
        try:
            self.contract = ModelContract.from_config(config)
        except ContractError as error:
            raise ClientError(str(error)) from error

    @property
    def spec(self) -> PreprocessSpec:
        return self.contract.preprocess

    @property
    def max_batch_size(self) -> int:
        return self.contract.max_batch_size

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> TritonClassifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def infer(self, images: np.ndarray, top_k: int = 1) -> list[list[Prediction]]:
        """Top-k predictions for a uint8 batch of shape (N, 3, crop, crop), N <= max_batch_size."""
        output = grpcclient.InferRequestedOutput(self.contract.output_name, class_count=min(top_k, self.contract.num_classes))
        rows = self._infer(images, output)
        return [[parse_classification(entry) for entry in row] for row in rows]

    def infer_probabilities(self, images: np.ndarray) -> np.ndarray:
        """The full FP32 probability rows, for parity checks against PyTorch."""
        return self._infer(images, grpcclient.InferRequestedOutput(self.contract.output_name))

    def _infer(self, images: np.ndarray, output: grpcclient.InferRequestedOutput) -> np.ndarray:
        request = grpcclient.InferInput(self.contract.input_name, list(images.shape), "UINT8")
        request.set_data_from_numpy(np.ascontiguousarray(images, dtype=np.uint8))
        result = self.client.infer(self.model, [request], self.version, outputs=[output],
                                   client_timeout=self.timeout_s)
        return result.as_numpy(self.contract.output_name)

    def classify_files(self, paths: Iterable[str | os.PathLike], top_k: int = 1) -> Iterator[FileResult]:
        """One result per path, in order; a bad file yields an error result and never stops the rest."""
        pending: list[tuple[str, np.ndarray]] = []
        for path in paths:
            try:
                pending.append((os.fspath(path), preprocess_file(path, self.spec)))
            except ImageLoadError as error:
                yield from self._flush(pending, top_k)
                pending = []
                yield FileResult(os.fspath(path), error=error.reason)
                continue
            if len(pending) == self.max_batch_size:
                yield from self._flush(pending, top_k)
                pending = []
        yield from self._flush(pending, top_k)

    def _flush(self, pending: list[tuple[str, np.ndarray]], top_k: int) -> Iterator[FileResult]:
        if not pending:
            return
        try:
            rows = self.infer(np.stack([image for _, image in pending]), top_k)
        except InferenceServerException as error:
            for path, _ in pending:
                yield FileResult(path, error=f"inference failed: {error.message()}")
            return
        for (path, _), predictions in zip(pending, rows, strict=True):
            yield FileResult(path, predictions=predictions)
