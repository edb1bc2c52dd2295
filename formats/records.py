"""Prediction records: what a client sends the monitor about each classified image (numpy only: the
thin client builds them). One JSON object per prediction:

    {"model": "digits", "version": "3", "predicted": 7, "max_probability": 0.981,
     "statistics": {"mean_red": 41.2, ..., "blue_ratio": 0.33},
     "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736"}

`version` is the one Triton answered with (its response names it). `trace_id` (optional: null or
absent when the client traced nothing) is the OpenTelemetry trace of the request that carried the
image, so that a window the monitor flags can be followed back to requests. Records travel as a JSON array
(POST /v1/records) or as JSON lines in a file (`python -m histoserve.monitor report`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from histoserve.formats.image_statistics import INPUT_STATISTICS, input_statistics

TRACE_ID = re.compile(r"[0-9a-f]{32}")


class RecordError(ValueError):
    """A record that cannot be used; the message names the field."""


@dataclass(frozen=True)
class PredictionRecord:
    model: str
    version: str
    predicted: int
    max_probability: float
    statistics: dict[str, float]
    trace_id: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PredictionRecord:
        if not isinstance(data, dict):
            raise RecordError(f"a record is a JSON object, got {type(data).__name__}")
        for field, kind in (("model", str), ("version", str), ("predicted", int), ("max_probability", (int, float))):
            if not isinstance(data.get(field), kind) or isinstance(data.get(field), bool):
                raise RecordError(f"record field {field!r}: expected {getattr(kind, '__name__', 'a number')}, got {data.get(field)!r}")
        if not 0.0 <= data["max_probability"] <= 1.0:
            raise RecordError(f"record field 'max_probability': {data['max_probability']} is not in [0, 1]")
        statistics = data.get("statistics", {})
        if not isinstance(statistics, dict):
            raise RecordError("record field 'statistics': expected an object")
        values = {}
        for name in INPUT_STATISTICS:
            value = statistics.get(name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise RecordError(f"record field 'statistics.{name}': expected a number, got {value!r}")
            values[name] = float(value)
        trace_id = data.get("trace_id")
        if trace_id is not None and not (isinstance(trace_id, str) and TRACE_ID.fullmatch(trace_id)):
            raise RecordError(f"record field 'trace_id': expected 32 hex digits or null, got {trace_id!r}")
        return cls(data["model"], data["version"], data["predicted"], float(data["max_probability"]), values, trace_id)


def records_for(model: str, version: str, images: np.ndarray, predicted: Iterable[int],
                max_probability: Iterable[float], trace_id: str | None = None) -> list[PredictionRecord]:
    """One record per image of a uint8 (N, 3, H, W) batch and its top-1 answers; `trace_id`: the
    request's trace, when it was traced."""
    statistics = input_statistics(images)
    return [PredictionRecord(model, version, int(p), round(float(m), 6),
                             {name: round(float(values[i]), 4) for name, values in statistics.items()}, trace_id)
            for i, (p, m) in enumerate(zip(predicted, max_probability, strict=True))]


def read_records(path: str | Path, skipped: list[str]) -> Iterator[PredictionRecord]:
    """The records of a JSON-lines file, oldest first. A line that cannot be read (cut short by a
    crash, edited by hand) is skipped, never fatal, and described in `skipped` as "file:line: why"."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield PredictionRecord.from_dict(json.loads(line))
            except (UnicodeDecodeError, json.JSONDecodeError, RecordError) as error:
                skipped.append(f"{path}:{number}: {error}")
