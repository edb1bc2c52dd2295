"""Export publishes a self-contained version: the model, its configs and labels, the drift baseline,
golden answers taken from the data, and SHA256SUMS over all of it, in one rename."""

import numpy as np
import pytest
import torch

from histoserve.export.golden import GoldenAnswersError, golden_answers, tolerance_for
from histoserve.export.onnx_model import onnx_session
from histoserve.export.precision import onnx_probabilities
from histoserve.export.publish import publish
from histoserve.formats.preprocessing import preprocess_file
from histoserve.formats.repository_layout import read_config
from histoserve.formats.version import TOLERANCE, GoldenAnswers, read_checksums, verify_checksums
from tests.conftest import MODEL
from tests.export.test_publish import fake_model_file, small_config

VERSION_FILES = sorted(["SHA256SUMS", "config.pbtxt", "cpu.pbtxt", "drift_baseline.json", "golden.json", "golden_inputs.npy",
                        "labels.txt", "model.onnx", "provenance.intoto.json", "MODEL_CARD.md", "model_card.json", "model.sig",
                        "identity.json"])


@pytest.mark.parametrize("model, precision", [(MODEL, "fp32"), (f"{MODEL}-int8", "int8")])
def test_a_published_version_holds_every_file_it_needs_and_checks_out(repository, model, precision):
    folder = repository / model / "1"
    assert sorted(p.name for p in folder.iterdir()) == VERSION_FILES
    assert sorted(read_checksums(folder)) == [name for name in VERSION_FILES if name not in ("SHA256SUMS", "model.sig")]
    assert verify_checksums(folder) == []
    assert all(not p.stat().st_mode & 0o222 for p in folder.iterdir())  # read-only from the start
    for snapshot, current in (("config.pbtxt", "config.pbtxt"), ("cpu.pbtxt", "configs/cpu.pbtxt"), ("labels.txt", "labels.txt")):
        assert (folder / snapshot).read_text() == (repository / model / current).read_text()
    assert read_config(folder / "cpu.pbtxt").name == model
    answers, _ = GoldenAnswers.read(folder)
    assert (answers.model, answers.version, answers.precision, answers.tolerance) == (model, 1, precision, TOLERANCE[precision])


def test_golden_answers_are_the_data_s_classes_and_the_published_model_s_probabilities(repository, digits_root):
    """Each golden input is a real held-out image; its expected label is the folder it came from."""
    folder = repository / MODEL / "1"
    answers, inputs = GoldenAnswers.read(folder)
    spec = read_config(folder / "config.pbtxt")
    from histoserve.formats.repository_layout import contract_of

    preprocess = contract_of(spec).preprocess
    held_out = {preprocess_file(path, preprocess).tobytes(): path.parent.name for path in sorted((digits_root / "test").rglob("*.png"))}
    assert [held_out[image.tobytes()] for image in inputs] == answers.labels
    class_names = (folder / "labels.txt").read_text().splitlines()
    assert [class_names[c] for c in answers.top1] == answers.labels
    assert 2 <= len(answers.labels) <= 10  # golden_count(10); fewer where too few images qualify
    measured = onnx_probabilities(onnx_session(folder / "model.onnx"), inputs)
    assert np.abs(measured - np.asarray(answers.probabilities)).max() < 1e-6


class Constant(torch.nn.Module):
    """A 'PyTorch model' that always answers class `label`."""

    def __init__(self, label: int, classes: int = 3):
        super().__init__()
        self.label, self.classes = label, classes

    def forward(self, images):
        out = torch.zeros(len(images), self.classes)
        out[:, self.label] = 1
        return out


def test_golden_answers_need_the_reference_to_agree_and_refuse_a_model_right_on_too_few_images():
    images = np.arange(6 * 3 * 2 * 2, dtype=np.uint8).reshape(6, 3, 2, 2)
    truth = np.array([0, 0, 1, 1, 2, 2])
    probabilities = np.eye(3)[truth] * 0.8 + 0.2 / 3
    answers, inputs = golden_answers("m", "fp32", 0.002, ["a", "b", "c"], images, truth, probabilities, Constant(1))
    assert answers.labels == ["b", "b"] and inputs.tolist() == images[[2, 3]].tolist()  # where PyTorch agrees only
    wrong = np.eye(3)[(truth + 1) % 3]  # the exported model gets every image wrong
    with pytest.raises(GoldenAnswersError, match="only 0 of 6 held-out images"):
        golden_answers("m", "fp32", 0.002, ["a", "b", "c"], images, truth, wrong, Constant(1))


def test_the_tolerance_is_the_widest_of_the_model_and_its_tensorrt_precision():
    assert tolerance_for("fp32") == TOLERANCE["fp32"] < tolerance_for("fp32", "FP16") == TOLERANCE["fp16"]
    assert tolerance_for("int8", "int8") == tolerance_for("int8", "fp16") == TOLERANCE["int8"]


def test_version_files_and_checksums_appear_with_the_model_in_one_rename(tmp_path):
    repo = tmp_path / "repo"
    target = publish(repo, small_config(), ["a", "b", "c"], fake_model_file(tmp_path),
                     version_files={"golden_inputs.npy": lambda version: bytes([version]), "note.json": lambda version: f"{version}"})
    assert (target / "golden_inputs.npy").read_bytes() == b"\x01" and (target / "note.json").read_text() == "1"
    assert verify_checksums(target) == [] and sorted(read_checksums(target)) == [
        "config.pbtxt", "cpu.pbtxt", "golden_inputs.npy", "identity.json", "labels.txt", "model.onnx", "note.json"]
    assert [p.name for p in (repo / "m").iterdir() if p.name.startswith(".")] == []  # no staging folder left
