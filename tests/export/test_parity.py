import numpy as np
import pytest

from histoserve.export.onnx_model import ParityError, check_parity
from histoserve.formats.preprocessing import preprocess_file
from histoserve.train.checkpoint import load_checkpoint
from histoserve.train.model import ServingModel, build_classifier
from tests.conftest import MODEL


@pytest.fixture(scope="module")
def parity_inputs(trained_run, repository, test_files):
    classifier, meta = load_checkpoint(trained_run / "checkpoint.pt")
    images = np.stack([preprocess_file(p, meta.preprocess) for p in test_files[::9]])
    return ServingModel(classifier, meta.temperature).eval(), repository / MODEL / "1" / "model.onnx", images


def test_parity_gate_passes_for_the_exported_model(parity_inputs):
    model, onnx_file, images = parity_inputs
    report = check_parity(model, onnx_file, images, atol=1e-4)
    assert report.passed and report.images == len(images) and report.max_abs_diff <= 1e-4


def test_parity_gate_refuses_a_model_that_differs(parity_inputs):
    _, onnx_file, images = parity_inputs
    other = ServingModel(build_classifier("resnet18", 10)).eval()
    with pytest.raises(ParityError, match="FAILED"):
        check_parity(other, onnx_file, images)


def test_export_publishes_nothing_when_parity_fails(trained_run, tmp_path, monkeypatch, capsys):
    """An ONNX file that computes something else than the checkpoint (injected: the exporter writes
    another network) fails the real parity gate, and no model folder is left behind."""
    from histoserve.export import __main__ as export_cli
    from histoserve.export import pipeline
    from histoserve.export.onnx_model import export_onnx

    def export_another_network(model, path, crop_size, opset=18):
        export_onnx(ServingModel(build_classifier("resnet18", 10)).eval(), path, crop_size, opset)

    monkeypatch.setattr(pipeline, "export_onnx", export_another_network)
    code = export_cli.main([str(trained_run / "checkpoint.pt"), "--repository", str(tmp_path / "repo"), "--name", "gated"])
    assert code == 1 and "nothing was published" in capsys.readouterr().err
    assert not (tmp_path / "repo" / "gated").exists()
