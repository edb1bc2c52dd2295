"""Reduced-precision variants of the exported FP32 model, and the accuracy gate each must pass.

INT8 (CPU nodes): ONNX Runtime static quantization, QDQ format, per-channel int8 weights and uint8
activations (U8S8), calibrated on training images through the client's preprocessing. The first
convolution and the head (global pooling, linear, temperature, softmax) stay FP32: they are a few
percent of the arithmetic and most of the error. On the demo digits model this halved the flips
against FP32 (3 → 1 of 540 held-out images; mean L1 distance of the probability rows 0.0144 →
0.0107). `reduce_range` (7-bit weights) is off by default: on CPUs with AVX-512 VNNI (our AMD EPYC
nodes, Intel since Cascade Lake) the int8 dot product accumulates in 32 bits and cannot saturate,
and 7-bit weights cost accuracy (mean L1 0.0107 → 0.0156, at the same speed). Turn it on for CPU
nodes without VNNI (AVX2 only, or Skylake-SP), where the `VPMADDUBSW` path saturates; the
gate runs on the export machine, so it cannot see that loss on another CPU.

FP16 (GPUs): float16 weights and arithmetic, with the uint8 input and the FP32 output kept
(onnxconverter-common's converter; the uint8 → float Cast stays as it is, followed by a cast to
float16). The gate for it runs with ONNX Runtime on the CPU.

S8S8 is not offered: it was 0.90× FP32 on this AMD EPYC (ONNX Runtime's MLAS has no fast S8S8 kernel
for it), against 3.3× for U8S8.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from histoserve.export.onnx_model import onnx_session
from histoserve.formats.contract import INPUT_NAME, OUTPUT_NAME
from histoserve.formats.options import FRACTION

PRECISIONS = ("fp32", "fp16", "int8")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
HEAD_OPS = ("GlobalAveragePool", "ReduceMean", "Flatten", "Reshape", "Gemm", "MatMul", "Div", "Softmax")


class AccuracyGateError(RuntimeError):
    """The variant disagrees with the FP32 model more than the gate allows; nothing is published."""


@dataclass(frozen=True)
class QuantizationConfig:
    calibration_count: int = 128
    method: str = "minmax"
    reduce_range: bool = False
    batch_size: int = 16

    def __post_init__(self):
        if self.method not in CALIBRATION_METHODS:
            raise ValueError(f"calibration method {self.method!r} is not one of {', '.join(CALIBRATION_METHODS)}")
        if self.calibration_count < 1:
            raise ValueError("the calibration needs at least one image")


@dataclass(frozen=True)
class AccuracyGate:
    min_agreement: float = 0.99  # top-1 agreement with the FP32 model
    max_accuracy_drop: float = 0.005  # 0.5 point of top-1 accuracy

    def __post_init__(self):
        FRACTION.check(self.min_agreement, "--min-agreement")
        FRACTION.check(self.max_accuracy_drop, "--max-accuracy-drop")


def kept_in_fp32(model: onnx.ModelProto) -> list[str]:
    """Node names quantization leaves alone: the first Conv and everything after the last Conv."""
    nodes = list(model.graph.node)
    convs = [i for i, node in enumerate(nodes) if node.op_type == "Conv"]
    if not convs:
        return []
    head = [node.name for node in nodes[convs[-1] + 1 :] if node.op_type in HEAD_OPS]
    return [nodes[convs[0]].name, *head]


def quantize_int8(fp32_file: Path, target: Path, calibration: np.ndarray, config: QuantizationConfig = QuantizationConfig()) -> None:
    """Static U8S8 QDQ quantization of `fp32_file` into `target`, calibrated on `calibration`
    (uint8 images, N×3×H×W, preprocessed exactly as the client does)."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) == 0:
        raise ValueError("no calibration images")

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(range(0, len(calibration), config.batch_size))

        def get_next(self):
            start = next(self.batches, None)
            return None if start is None else {INPUT_NAME: calibration[start : start + config.batch_size]}

    prepared = Path(target).with_name(Path(target).stem + ".prepared.onnx")
    quant_pre_process(str(fp32_file), str(prepared), skip_symbolic_shape=True)
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}
    try:
        quantize_static(
            str(prepared), str(target), Batches(),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            reduce_range=config.reduce_range, calibrate_method=methods[config.method],
            nodes_to_exclude=kept_in_fp32(onnx.load(str(prepared), load_external_data=False)),
        )
    finally:
        prepared.unlink(missing_ok=True)
    onnx.checker.check_model(str(target), full_check=True)


def convert_fp16(fp32_file: Path, target: Path) -> None:
    """float16 weights and arithmetic; the uint8 `image` input and FP32 `probabilities` output kept."""
    from onnxconverter_common import float16

    model = onnx.load(str(fp32_file))
    input_casts = [node.name for node in model.graph.node if node.op_type == "Cast" and INPUT_NAME in node.input]
    with warnings.catch_warnings():  # one warning per weight below float16's smallest normal; they become 1e-7
        warnings.filterwarnings("ignore", message="the float32 number", category=UserWarning)
        converted = float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=input_casts)
    onnx.save(converted, str(target))
    onnx.checker.check_model(str(target), full_check=True)


def onnx_probabilities(session: ort.InferenceSession, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Probability rows for `images`, run in batches (the held-out split does not fit one call)."""
    return np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: chunk})[0] for chunk in _chunks(images, batch_size)])


def _chunks(images: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(images), size):
        yield images[start : start + size]


@dataclass(frozen=True)
class GateReport:
    precision: str
    images: int
    agreement: float
    reference_accuracy: float
    accuracy: float
    gate: AccuracyGate

    @property
    def accuracy_drop(self) -> float:
        return self.reference_accuracy - self.accuracy

    @property
    def passed(self) -> bool:
        return self.agreement >= self.gate.min_agreement and self.accuracy_drop <= self.gate.max_accuracy_drop + 1e-12

    def __str__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"{self.precision} accuracy gate {verdict} on {self.images} held-out images: top-1 agreement with fp32 "
            f"{self.agreement:.2%} (at least {self.gate.min_agreement:.2%}), accuracy {self.accuracy:.2%} vs fp32 "
            f"{self.reference_accuracy:.2%}, drop {100 * self.accuracy_drop:+.2f} points (at most {100 * self.gate.max_accuracy_drop:.2f})"
        )

    def as_dict(self) -> dict:
        return {"precision": self.precision, "images": self.images, "agreement": self.agreement,
                "fp32_accuracy": self.reference_accuracy, "accuracy": self.accuracy, "accuracy_drop": self.accuracy_drop}


def gate_report(precision: str, reference: np.ndarray, variant: np.ndarray, labels: np.ndarray, gate: AccuracyGate) -> GateReport:
    """Compare probability rows of the FP32 model (`reference`) and a variant on labelled images."""
    if len(labels) == 0 or reference.shape != variant.shape or len(labels) != len(reference):
        raise AccuracyGateError(f"the {precision} accuracy gate needs labelled images with outputs of both models")
    reference_top1, variant_top1 = reference.argmax(1), variant.argmax(1)
    return GateReport(
        precision, len(labels),
        agreement=float((reference_top1 == variant_top1).mean()),
        reference_accuracy=float((reference_top1 == labels).mean()),
        accuracy=float((variant_top1 == labels).mean()),
        gate=gate,
    )


def check_accuracy_gate(
    precision: str, fp32_file: Path, variant_file: Path, images: np.ndarray, labels: np.ndarray, gate: AccuracyGate = AccuracyGate()
) -> GateReport:
    """Run both models on the held-out images; raise AccuracyGateError (numbers in the message) on failure."""
    reference, candidate = (onnx_probabilities(onnx_session(f), images) for f in (fp32_file, variant_file))
    report = gate_report(precision, reference, candidate, labels, gate)
    if not report.passed:
        raise AccuracyGateError(f"{report}; nothing was published")
    return report
