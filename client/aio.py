"""The classifier for asyncio services (tritonclient.grpc.aio): the same contract, channel options,
deadlines, retries and results as client.classifier.TritonClassifier.

    async with AsyncTritonClassifier("localhost:8001", "digits") as classifier:
        async for result in classifier.classify_files(paths, top_k=3, concurrency=8):
            ...
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable

import numpy as np
import tritonclient.grpc.aio as aioclient
from tenacity import AsyncRetrying, RetryError
from tritonclient.utils import InferenceServerException

from histoserve.client import tracing
from histoserve.client.classifier import (
    ClientError,
    ContractView,
    FileResult,
    InferenceFailed,
    Prediction,
    PreparedBatch,
    batched,
    channel_arguments,
    contract_from,
    counted_attempt,
    failure,
    input_of,
    last_error,
    not_ready_message,
    predictions_of,
    retry_policy,
    top_k_output,
    unreachable,
)
from histoserve.client.telemetry import CallMetrics, grpc_code, process_metrics
from histoserve.formats.contract import EncodedContract, ModelContract
from histoserve.formats.options import ClientTls, OptionError


class AsyncTritonClassifier(ContractView):
    """`async with AsyncTritonClassifier(url, model) as classifier:` reads the contract once on entry
    (ClientError if the server or model cannot be used) and closes the channel on exit."""

    def __init__(self, url: str, model: str, version: str = "", deadline_s: float = 60.0, tls: ClientTls | None = None,
                 metrics: CallMetrics | None = None):
        self.url, self.model, self.version, self.deadline_s, self.tls = url, model, version, deadline_s, tls
        self.metrics = metrics or process_metrics()
        try:
            self._security = tls.client_arguments() if tls else {}
        except OptionError as error:
            raise ClientError(str(error)) from error
        self.client: aioclient.InferenceServerClient | None = None
        self.contract: ModelContract | EncodedContract | None = None

    async def __aenter__(self) -> AsyncTritonClassifier:
        self.client = aioclient.InferenceServerClient(self.url, channel_args=channel_arguments(self.url), **self._security)
        try:
            if not await self.client.is_model_ready(self.model, self.version):
                raise ClientError(not_ready_message(self))
            config = (await self.client.get_model_config(self.model, self.version, as_json=True))["config"]
            self.contract = contract_from(config)
        except InferenceServerException as error:
            await self.client.close()
            raise unreachable(self, error) from error
        except BaseException:
            await self.client.close()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        if self.client is not None:
            await self.client.close()

    async def infer(self, images: np.ndarray | list[bytes], top_k: int = 1, deadline: float | None = None) -> list[list[Prediction]]:
        """Top-k predictions for a uint8 batch (N, 3, crop, crop), or an encoded model's list of files'
        bytes; raises InferenceFailed. `deadline`: as TritonClassifier.infer_versioned's."""
        request, output = input_of(self.contract, images), top_k_output(self.contract, top_k)
        started = time.monotonic()
        deadline = deadline or started + self.deadline_s
        try:
            async for attempt in AsyncRetrying(**retry_policy(max(0.001, deadline - started))):
                with attempt, counted_attempt(self), tracing.rpc_span(self.model, self.url) as (span, headers):
                    result = await self.client.infer(self.model, [request], self.version, outputs=[output], headers=headers,
                                                     client_timeout=max(0.001, deadline - time.monotonic()))
                    tracing.answered(span, result.get_response().model_version)
        except (RetryError, InferenceServerException) as error:
            self.metrics.call(self.model, self.version, grpc_code(last_error(error)), time.monotonic() - started)
            raise failure(error, self.deadline_s) from None
        self.metrics.call(self.model, result.get_response().model_version, "OK", time.monotonic() - started)
        return predictions_of(result.as_numpy(self.contract.output_name))

    async def classify_files(
        self, paths: Iterable[str | os.PathLike], top_k: int = 1, concurrency: int = 4, batch_size: int | None = None
    ) -> AsyncIterator[FileResult]:
        """One result per path, in input order, never an exception for a bad file or a failed request.
        `concurrency` batches at once: files are read and preprocessed in worker threads
        (asyncio.to_thread), requests awaited on the event loop; at most 2 × concurrency batches held."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        size = min(batch_size or self.max_batch_size, self.max_batch_size)
        window: deque[asyncio.Task[list[FileResult]]] = deque()
        try:
            for group in batched(paths, size):
                window.append(asyncio.create_task(self._classify_batch(group, top_k)))
                if len(window) >= 2 * concurrency:
                    for result in await window.popleft():
                        yield result
            while window:
                for result in await window.popleft():
                    yield result
        finally:
            for task in window:
                task.cancel()

    async def _classify_batch(self, paths: list[str], top_k: int) -> list[FileResult]:
        with tracing.classify_span(self.model, paths) as span:  # tasks and to_thread carry the caller's context
            batch = await asyncio.to_thread(PreparedBatch.of, paths, self.spec)
            trace_id = tracing.trace_id_of(span)
            deadline = time.monotonic() + self.deadline_s  # one for the batch, re-sends included
            while batch.images:
                span.set_attribute("histoserve.batch_size", len(batch.images))
                try:
                    return batch.finish(await self.infer(batch.tensor(), top_k, deadline), "", trace_id)
                except InferenceFailed as error:
                    if not batch.drop_refused_file(error):
                        return batch.finish(None, f"inference failed: {error}", trace_id)
            return batch.finish(None, "", trace_id)
