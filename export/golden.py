"""The golden answers a version publishes (formats/version.py): a few held-out images and what any
server running this version must answer for them.

The expected class and label of each image is its *true* class from the data, used only where the
published model, measured with ONNX Runtime, and the PyTorch checkpoint both give it by a clear
margin. So a version whose weights or labels file are wrong cannot vouch for itself: its golden
answers still say what the data says, and serving it fails them.
"""

from __future__ import annotations

import io
import sys

import numpy as np
import torch

from histoserve.formats.repository_layout import RepositoryError
from histoserve.formats.version import TOLERANCE, GoldenAnswers, choose_golden, golden_count


class GoldenAnswersError(RepositoryError):
    """Too few held-out images qualify as golden answers; nothing is published."""


def tolerance_for(precision: str, tensorrt_precision: str | None = None) -> float:
    """The widest of the model's precision and the TensorRT precision the GPU config builds it at."""
    return max(TOLERANCE[precision], TOLERANCE[tensorrt_precision.lower()] if tensorrt_precision else 0.0)


def golden_answers(name: str, precision: str, tolerance: float, class_names: list[str], images: np.ndarray,
                   true_labels: np.ndarray, probabilities: np.ndarray, reference: torch.nn.Module,
                   ) -> tuple[GoldenAnswers, np.ndarray]:
    """Golden answers (version 0: `with_version` sets it at publish) and their uint8 inputs.

    `probabilities` are the published model's on `images` (ONNX Runtime, CPU); `reference` is the
    PyTorch ServingModel. Candidates come from the ONNX answers; PyTorch is run on a few times
    `count` of them only (a held-out split of ResNet50 images would take minutes). Every class gets
    one where the data allows (up to GOLDEN_MAX images), so any swap in the labels file shows."""
    count = golden_count(len(class_names))
    candidates = choose_golden(probabilities, true_labels, true_labels, count * 4)
    if candidates:
        with torch.inference_mode():
            reference_top1 = reference.eval()(torch.from_numpy(images[candidates])).argmax(1).numpy()
        agreeing = np.full(len(images), -1)
        agreeing[candidates] = reference_top1
        chosen = choose_golden(probabilities, true_labels, agreeing, count)
    else:
        chosen = []
    if len(chosen) < min(count, 2):
        raise GoldenAnswersError(
            f"only {len(chosen)} of {len(images)} held-out images are answered right by a clear margin by both the "
            f"exported model and PyTorch: too few golden answers (the model is not fit to publish)")
    top1 = [int(true_labels[i]) for i in chosen]
    if missing := sorted(set(range(len(class_names))) - set(top1)):
        print(f"golden answers: no qualifying held-out image for class(es) {[class_names[c] for c in missing][:10]}", file=sys.stderr)
    answers = GoldenAnswers(name, 0, precision, top1, [class_names[c] for c in top1],
                            probabilities[chosen].astype(np.float64).round(7).tolist(), tolerance)
    return answers, np.ascontiguousarray(images[chosen], dtype=np.uint8)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
