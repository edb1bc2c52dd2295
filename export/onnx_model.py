"""ONNX export of the serving model (uint8 NCHW `image` → FP32 `probabilities`) and the parity gate
that must pass before anything is published."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from histoserve.formats.contract import INPUT_NAME, OUTPUT_NAME


class ParityError(RuntimeError):
    """ONNX Runtime and PyTorch disagree; the model is not published."""


def export_onnx(model: torch.nn.Module, path: Path, crop_size: int, opset: int = 18) -> None:
    """Write `model` with a dynamic batch axis and check the file with onnx.checker."""
    model.eval()
    example = torch.zeros(2, 3, crop_size, crop_size, dtype=torch.uint8)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),  # forward's one argument: the batch axis is free
        opset_version=opset,
        dynamo=True,
        external_data=False,
    )
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path), load_external_data=False).graph
    batch_dim = graph.input[0].type.tensor_type.shape.dim[0]
    if batch_dim.dim_value or not batch_dim.dim_param:
        raise ParityError(f"{path}: the batch axis of {INPUT_NAME!r} is not dynamic")


@dataclass
class ParityReport:
    images: int
    max_abs_diff: float
    top1_mismatches: int
    atol: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.atol and self.top1_mismatches == 0

    def __str__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"parity {verdict} on {self.images} images: max |Δprob| {self.max_abs_diff:.2e} "
            f"(limit {self.atol:.0e}), top-1 mismatches {self.top1_mismatches}"
        )


def onnx_session(path: Path) -> ort.InferenceSession:
    """ONNX Runtime on the CPU, for the parity and accuracy gates."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the fp16 model would warn about every Cast it keeps
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def check_parity(model: torch.nn.Module, onnx_file: Path, images: np.ndarray, atol: float = 1e-4) -> ParityReport:
    """Compare PyTorch and ONNX Runtime on real preprocessed images (uint8, N×3×H×W), as one batch
    and one image at a time (both paths of the dynamic batch axis). Raises ParityError on failure."""
    if len(images) == 0:
        raise ParityError("no images to check parity on")
    expected = model.eval()(torch.from_numpy(images)).numpy()
    session = onnx_session(onnx_file)
    batched = session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
    single = np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: image[None]})[0] for image in images])
    diff = max(float(np.abs(batched - expected).max()), float(np.abs(single - expected).max()))
    mismatches = int(
        ((batched.argmax(1) != expected.argmax(1)) | (single.argmax(1) != expected.argmax(1))).sum()
    )
    report = ParityReport(len(images), diff, mismatches, atol)
    if not report.passed:
        raise ParityError(f"{report}; nothing was published")
    return report
