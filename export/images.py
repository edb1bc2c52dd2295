"""The images export measures on, preprocessed exactly as the client sends them: a spread of files for
the parity gate, training images to calibrate INT8 on, and the held-out split for the accuracy gate
and the drift baseline."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

from histoserve.formats.preprocessing import ImageLoadError, preprocess_file


def spread(items: list, count: int) -> list:
    """Up to `count` items spread evenly over `items` (so several classes are covered)."""
    if not items:
        return []
    return list(dict.fromkeys(items[int(i)] for i in np.linspace(0, len(items) - 1, num=min(count, len(items)))))


def preprocess_samples(samples: list, spec, purpose: str) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed uint8 images (as the client sends them) and their labels; unreadable files are
    skipped with a message naming them."""
    arrays, labels = [], []
    for sample in samples:
        try:
            arrays.append(preprocess_file(sample.path, spec))
            labels.append(sample.label)
        except ImageLoadError as error:
            print(f"{purpose}: skipping {error}", file=sys.stderr)
    if not arrays:
        return np.zeros((0, 3, spec.crop_size, spec.crop_size), np.uint8), np.zeros(0, np.int64)
    return np.stack(arrays), np.asarray(labels)


class _Unlabelled(NamedTuple):
    path: Path
    label: int = -1


def parity_images(paths: list[Path], spec, count: int) -> np.ndarray:
    return preprocess_samples([_Unlabelled(path) for path in spread(paths, count)], spec, "parity")[0]
