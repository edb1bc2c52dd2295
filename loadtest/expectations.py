"""The images a load test sends and the answer each one must get, decided before any timed request."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from histoserve.client.classifier import TritonClassifier
from histoserve.formats.preprocessing import ImageLoadError, PreprocessSpec, find_images, preprocess_file

NEAR_TIE = 1e-3  # top-1 and top-2 scores closer than this: either is a correct answer under batching


def request_images(folder: str, spec: PreprocessSpec | None, limit: int) -> tuple[list[str], np.ndarray]:
    """The first `limit` images of `folder`, preprocessed; a bad file is skipped with a note, not fatal.
    `spec` None (an encoded model, which takes files) is refused: the load test sends pixels."""
    if spec is None:
        raise ValueError("the model is an encoded model (NAME-encoded, it takes image files): the load test sends "
                         "preprocessed pixels, so load-test its pixel model NAME (benchmarks/serving.py measures "
                         "the encoded path)")
    paths, arrays = [], []
    for path in find_images(folder)[:limit]:
        try:
            arrays.append(preprocess_file(path, spec))
            paths.append(str(path))
        except ImageLoadError as error:
            print(f"loadtest: skipping {error}", file=sys.stderr)
    if not arrays:
        raise ValueError(f"--images {folder}: no readable images")
    return paths, np.stack(arrays)


def expected_predictions(classifier: TritonClassifier, images: np.ndarray) -> list[frozenset[int]]:
    """Each image's top-1 from the server, one max-size batch at a time; a near-tie accepts its
    top-2 as well (another batch composition may flip it by rounding)."""
    accepted = []
    for start in range(0, len(images), classifier.max_batch_size):
        for first, *second in classifier.infer(images[start:start + classifier.max_batch_size], top_k=2):
            near = second and first.score - second[0].score < NEAR_TIE
            accepted.append(frozenset({first.index, second[0].index} if near else {first.index}))
    return accepted


def write_expected(path: Path, paths: list[str], accepted: list[frozenset[int]]) -> None:
    path.write_text(json.dumps({p: sorted(a) for p, a in zip(paths, accepted, strict=True)}))


def read_expected(path: str | Path, paths: list[str]) -> list[frozenset[int]]:
    known = json.loads(Path(path).read_text())
    missing = [p for p in paths if p not in known]
    if missing:
        raise ValueError(f"--expected {path} has no prediction for {missing[0]} ({len(missing)} image(s))")
    return [frozenset(known[p]) for p in paths]
