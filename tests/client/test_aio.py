"""The asyncio classifier against the real server: the same results as the sync one, in order."""

import asyncio

import numpy as np
import pytest

from histoserve.client.aio import AsyncTritonClassifier
from histoserve.client.classifier import ClientError, TritonClassifier
from tests.conftest import MODEL, make_truncated_png


def test_async_classification_equals_sync_and_keeps_order(server, test_files, tmp_path):
    broken = make_truncated_png(tmp_path / "broken.png")
    paths = [*test_files[:10], broken, *test_files[10:30]]

    async def run():
        async with AsyncTritonClassifier(server.grpc_url, MODEL, deadline_s=30) as classifier:
            results = [r async for r in classifier.classify_files(paths, top_k=2, concurrency=3, batch_size=4)]
            images = np.zeros((2, 3, classifier.spec.crop_size, classifier.spec.crop_size), np.uint8)
            return results, await classifier.infer(images, top_k=1), classifier.contract

    results, direct, contract = asyncio.run(run())
    with TritonClassifier(server.grpc_url, MODEL) as sync:
        expected = list(sync.classify_files(paths, top_k=2))
        assert contract == sync.contract
    assert [r.path for r in results] == [str(p) for p in paths]
    assert [r.ok for r in results] == [r.ok for r in expected] and not results[10].ok
    assert [r.predictions[0].index for r in results if r.ok] == [r.predictions[0].index for r in expected if r.ok]
    assert len(direct) == 2 and all(len(row) == 1 for row in direct)


def test_async_classifier_reports_an_unusable_model_and_closes(server):
    async def run():
        async with AsyncTritonClassifier(server.grpc_url, "absent"):
            pass

    with pytest.raises(ClientError, match="absent"):
        asyncio.run(run())
