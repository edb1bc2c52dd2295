"""INT8 and FP16 variants: what export writes, and the accuracy gate that stands before publishing."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from histoserve.export.onnx_model import onnx_session
from histoserve.export.precision import (
    AccuracyGate,
    AccuracyGateError,
    QuantizationConfig,
    check_accuracy_gate,
    convert_fp16,
    gate_report,
    kept_in_fp32,
    onnx_probabilities,
)
from histoserve.formats.repository_layout import read_config
from tests.conftest import MODEL


@pytest.fixture(scope="module")
def held_out(trained_run):
    """The checkpoint's own test split, preprocessed as the client does, with labels."""
    from histoserve.export.images import preprocess_samples
    from histoserve.train.checkpoint import load_checkpoint, training_splits

    _, meta = load_checkpoint(trained_run / "checkpoint.pt")
    return preprocess_samples(training_splits(meta).splits["test"], meta.preprocess, "test")


def damaged_copy(fp32_file: Path, target: Path) -> Path:
    """The same model with a random classifier layer: a variant that really is worse."""
    model = onnx.load(str(fp32_file))
    gemm = next(node for node in model.graph.node if node.op_type == "Gemm")
    weight = next(init for init in model.graph.initializer if init.name == gemm.input[1])
    values = numpy_helper.to_array(weight)
    random = np.random.default_rng(0).normal(0, values.std(), values.shape).astype(values.dtype)
    weight.CopyFrom(numpy_helper.from_array(random, weight.name))
    onnx.save(model, str(target))
    return target


@pytest.mark.parametrize(
    "reference, variant, labels, passed",
    [
        ([0] * 100, [0] * 100, [0] * 100, True),
        ([0] * 100, [0] * 99 + [1], [0] * 100, False),  # 99% agreement is enough, a 1 point drop is not
        ([0] * 200, [0] * 199 + [1], [0] * 200, True),  # 99.5% agreement, 0.5 point drop: on both limits
        ([0] * 200, [0] * 197 + [1] * 3, [0] * 200, False),  # 98.5% agreement
        ([0] * 100 + [1] * 100, [1] * 100 + [0] * 100, [0] * 200, False),  # nothing agrees
        ([1] * 100, [0] * 2 + [1] * 98, [0] * 100, False),  # 98% agreement, though 2 points *better*
    ],
    ids=["identical", "one-flip-of-100", "on-the-limits", "low-agreement", "swapped", "better-but-different"],
)
def test_gate_needs_agreement_and_no_accuracy_drop(reference, variant, labels, passed):
    def one_hot(top1):
        return np.eye(2, dtype=np.float32)[top1]

    report = gate_report("int8", one_hot(reference), one_hot(variant), np.array(labels), AccuracyGate())
    assert report.passed is passed, str(report)


def test_gate_refuses_a_model_that_is_really_worse_with_the_numbers(repository, held_out, tmp_path):
    images, labels = held_out
    fp32_file = repository / MODEL / "1" / "model.onnx"
    worse = damaged_copy(fp32_file, tmp_path / "worse.onnx")
    with pytest.raises(AccuracyGateError) as refused:
        check_accuracy_gate("int8", fp32_file, worse, images, labels)
    message = str(refused.value)
    assert "FAILED" in message and f"on {len(labels)} held-out images" in message and "agreement" in message
    assert "nothing was published" in message
    assert check_accuracy_gate("int8", fp32_file, fp32_file, images, labels).agreement == 1.0


def test_export_refuses_to_publish_a_variant_that_fails_the_gate(trained_run, tmp_path, monkeypatch, capsys):
    """A quantization that really loses accuracy (injected: the quantizer writes a copy with a random
    classifier layer) fails the real accuracy gate, and nothing is published."""
    from histoserve.export import __main__ as export_cli
    from histoserve.export import pipeline

    monkeypatch.setattr(pipeline.variants, "quantize_int8", lambda fp32_file, target, *_: damaged_copy(fp32_file, target))
    repo = tmp_path / "repo"
    code = export_cli.main([str(trained_run / "checkpoint.pt"), "--repository", str(repo), "--name", MODEL, "--precision", "int8",
                            "--calibration-count", "16"])
    stderr = capsys.readouterr().err
    assert code == 1
    assert "int8 accuracy gate FAILED" in stderr and "top-1 agreement with fp32" in stderr
    assert not repo.exists() or not any(repo.iterdir())


def test_int8_model_is_published_under_its_own_name_with_the_same_contract(repository):
    fp32, int8 = read_config(repository / MODEL / "config.pbtxt"), read_config(repository / f"{MODEL}-int8" / "config.pbtxt")
    assert int8.name == f"{MODEL}-int8"
    parameters = {k: v.string_value for k, v in int8.parameters.items()}
    assert parameters.pop("precision") == "int8" and fp32.parameters["precision"].string_value == "fp32"
    for field in ("input", "output", "max_batch_size", "model_warmup", "instance_group", "dynamic_batching"):
        assert getattr(int8, field) == getattr(fp32, field), field
    assert parameters == {k: v.string_value for k, v in fp32.parameters.items() if k != "precision"}
    assert (repository / f"{MODEL}-int8" / "labels.txt").read_text() == (repository / MODEL / "labels.txt").read_text()


def test_int8_model_is_quantized_except_the_first_convolution_and_the_head(repository):
    model = onnx.load(str(repository / f"{MODEL}-int8" / "1" / "model.onnx"))
    produced_by = {output: node for node in model.graph.node for output in node.output}
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    fed_by_dequantize = [produced_by.get(conv.input[1]) is not None and produced_by[conv.input[1]].op_type == "DequantizeLinear"
                         for conv in convs]
    assert fed_by_dequantize[0] is False, "the first convolution should stay FP32"
    assert all(fed_by_dequantize[1:]), "every other convolution should run on int8 weights"
    weights = {init.name: init for init in model.graph.initializer}
    int8_kernels = [w for w in weights.values() if w.data_type == onnx.TensorProto.INT8 and len(w.dims) == 4]
    assert len(int8_kernels) == len(convs) - 1
    softmax = next(node for node in model.graph.node if node.op_type == "Softmax")
    assert produced_by[softmax.input[0]].op_type != "DequantizeLinear"
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [onnx.TensorProto.UINT8]
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [onnx.TensorProto.FLOAT]


def test_kept_in_fp32_names_the_first_conv_and_the_nodes_after_the_last(repository):
    model = onnx.load(str(repository / MODEL / "1" / "model.onnx"))
    kept = kept_in_fp32(model)
    ops = {node.name: node.op_type for node in model.graph.node}
    assert ops[kept[0]] == "Conv" and kept[0] == next(n.name for n in model.graph.node if n.op_type == "Conv")
    assert {ops[name] for name in kept[1:]} >= {"Gemm", "Softmax"}
    assert "Conv" not in {ops[name] for name in kept[1:]}


def test_fp16_variant_keeps_uint8_in_and_fp32_out_and_passes_the_gate(repository, held_out, tmp_path):
    images, labels = held_out
    fp32_file = repository / MODEL / "1" / "model.onnx"
    convert_fp16(fp32_file, tmp_path / "fp16.onnx")
    model = onnx.load(str(tmp_path / "fp16.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    conv_weights = {node.input[1] for node in model.graph.node if node.op_type == "Conv"}
    assert {init.data_type for init in model.graph.initializer if init.name in conv_weights} == {onnx.TensorProto.FLOAT16}
    fp16, fp32 = (onnx_probabilities(onnx_session(f), images[:32]) for f in (tmp_path / "fp16.onnx", fp32_file))
    difference = np.abs(fp16 - fp32)
    assert difference.max() < 1e-2
    assert check_accuracy_gate("fp16", fp32_file, tmp_path / "fp16.onnx", images, labels).passed


@pytest.mark.parametrize("options, message", [
    ({"method": "mse"}, "calibration method"),
    ({"calibration_count": 0}, "at least one image"),
])
def test_quantization_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        QuantizationConfig(**options)
