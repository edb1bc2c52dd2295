"""The drift baseline: what a model version's predictions and inputs looked like on the held-out split.

`python -m histoserve.export` runs the exported ONNX model over the held-out split and publishes this file,
`drift_baseline.json`, inside the version folder, in the same atomic rename as model.onnx, so a
version never exists without its baseline. The monitor compares live windows against it.

Format (JSON, `format` "histoserve.drift-baseline", `format_version` 1):

    model, version, precision, split     what was measured, on which split
    sample_size                          images measured (after unreadable ones were skipped)
    class_names                          in output order
    predicted_counts                     images predicted as each class (sums to sample_size)
    max_probability                      each image's top-1 probability (calibrated: export applies
                                         the fitted temperature), sample_size values
    input_statistics                     {name: sample_size values}, see image_statistics.py
    accuracy                             top-1 accuracy on the split (labels known there), or null
    expected_accuracy                    mean max_probability: what a label-free estimate says there

Reading validates every field and names the file and the field that is wrong.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from histoserve.formats.image_statistics import INPUT_STATISTICS, input_statistics
from histoserve.formats.version import version_folder

BASELINE_FILE = "drift_baseline.json"
FORMAT, FORMAT_VERSION = "histoserve.drift-baseline", 1


class BaselineError(ValueError):
    """A baseline file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class DriftBaseline:
    model: str
    version: int
    precision: str
    split: str
    sample_size: int
    class_names: list[str]
    predicted_counts: list[int]
    max_probability: list[float]
    input_statistics: dict[str, list[float]]
    accuracy: float | None
    expected_accuracy: float

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self)})

    def with_version(self, version: int) -> DriftBaseline:
        return replace(self, version=version)

    @classmethod
    def from_json(cls, text: str, source: str = "drift baseline") -> DriftBaseline:
        def fail(field: str, problem: str) -> BaselineError:
            return BaselineError(f"{source}: {field}: {problem}")

        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise fail("(file)", f"not JSON ({error})") from error
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise fail("format", f"expected {FORMAT!r}, got {data.get('format') if isinstance(data, dict) else data!r}")
        if data.get("format_version") != FORMAT_VERSION:
            raise fail("format_version", f"this monitor reads version {FORMAT_VERSION}, the file is {data.get('format_version')!r}")
        missing = [name for name in cls.__dataclass_fields__ if name not in data]
        if missing:
            raise fail(missing[0], "missing")
        n, classes = data["sample_size"], data["class_names"]
        if not isinstance(n, int) or n < 1:
            raise fail("sample_size", f"must be a positive integer, got {n!r}")
        if not isinstance(classes, list) or not classes:
            raise fail("class_names", "must be a non-empty list")
        counts = data["predicted_counts"]
        if not isinstance(counts, list) or len(counts) != len(classes) or sum(counts) != n or min(counts) < 0:
            raise fail("predicted_counts", f"must be {len(classes)} non-negative counts summing to sample_size {n}")
        probabilities = data["max_probability"]
        if len(probabilities) != n or not all(0.0 <= p <= 1.0 for p in probabilities):
            raise fail("max_probability", f"must be {n} probabilities in [0, 1]")
        statistics = data["input_statistics"]
        for name in INPUT_STATISTICS:
            if name not in statistics:
                raise fail(f"input_statistics.{name}", "missing")
            if len(statistics[name]) != n:
                raise fail(f"input_statistics.{name}", f"has {len(statistics[name])} values, sample_size is {n}")
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


def build_baseline(model: str, precision: str, split: str, class_names: list[str], probabilities: np.ndarray,
                   images: np.ndarray, labels: np.ndarray | None = None, version: int = 0) -> DriftBaseline:
    """The baseline of a model's (N, classes) output probabilities on the uint8 images it was given."""
    if len(probabilities) != len(images) or len(images) == 0:
        raise ValueError(f"need one probability row per image, got {len(probabilities)} rows for {len(images)} images")
    predicted = probabilities.argmax(axis=1)
    top = probabilities.max(axis=1).clip(0.0, 1.0)
    accuracy = float((predicted == labels).mean()) if labels is not None and len(labels) == len(images) else None
    return DriftBaseline(
        model=model, version=version, precision=precision, split=split, sample_size=len(images),
        class_names=list(class_names),
        predicted_counts=np.bincount(predicted, minlength=len(class_names)).astype(int).tolist(),
        max_probability=[round(float(p), 6) for p in top],
        input_statistics={name: [round(float(v), 4) for v in values] for name, values in input_statistics(images).items()},
        accuracy=accuracy, expected_accuracy=float(top.mean()),
    )


def read_baseline(path: str | os.PathLike) -> DriftBaseline:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise BaselineError(f"{path}: cannot read ({error.strerror or error})") from error
    return DriftBaseline.from_json(text, str(path))


def baseline_path(repository: str | os.PathLike, model: str, version: int | str) -> Path:
    return version_folder(repository, model, version) / BASELINE_FILE
