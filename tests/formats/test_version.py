"""The version folder's own files: SHA256SUMS in `sha256sum` format, and the golden answers."""

import hashlib
import json
import shutil
import subprocess

import numpy as np
import pytest

from histoserve.formats.version import (
    CHECKSUMS_FILE,
    GOLDEN_MIN_MARGIN,
    GoldenAnswers,
    VersionFilesError,
    choose_golden,
    golden_count,
    read_checksums,
    verify_checksums,
    write_checksums,
)


def version(tmp_path):
    folder = tmp_path / "3"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"weights")
    (folder / "sub" / "part.bin").write_bytes(b"more")
    write_checksums(folder)
    return folder


def test_checksums_cover_every_other_file_and_sha256sum_reads_them(tmp_path):
    folder = version(tmp_path)
    assert read_checksums(folder) == {"model.onnx": hashlib.sha256(b"weights").hexdigest(),
                                      "sub/part.bin": hashlib.sha256(b"more").hexdigest()}
    assert verify_checksums(folder) == []
    if shutil.which("sha256sum"):  # the operator's tool agrees, file for file
        result = subprocess.run(["sha256sum", "-c", CHECKSUMS_FILE], cwd=folder, capture_output=True, text=True)
        assert result.returncode == 0 and result.stdout.count(": OK") == 2


def test_every_difference_is_reported_with_its_file(tmp_path):
    folder = version(tmp_path)
    (folder / "model.onnx").write_bytes(b"weightz")
    (folder / "sub" / "part.bin").unlink()
    (folder / "notes.txt").write_text("added")
    assert verify_checksums(folder) == [
        f"{folder / 'model.onnx'}: altered (its sha256 is not the one in {CHECKSUMS_FILE})",
        f"{folder / 'sub/part.bin'}: missing",
        f"{folder / 'notes.txt'}: not in {CHECKSUMS_FILE} (a file the version was not published with)",
    ]


@pytest.mark.parametrize("line", ["abc  model.onnx", "0" * 64 + " model.onnx", "0" * 64 + "  /etc/passwd", "0" * 64 + "  a/../../b"])
def test_malformed_or_escaping_lines_are_refused_with_their_line_number(tmp_path, line):
    folder = version(tmp_path)
    (folder / CHECKSUMS_FILE).write_text(f"{'0' * 64}  model.onnx\n{line}\n")
    with pytest.raises(VersionFilesError, match=f"{CHECKSUMS_FILE}:2: not a `sha256sum` line".replace("`", ".")):
        read_checksums(folder)


def answers(**overrides):
    fields = dict(model="m", version=1, precision="fp32", top1=[0, 1], labels=["cat", "dog"],
                  probabilities=[[0.7, 0.3], [0.2, 0.8]], tolerance=0.01)
    return GoldenAnswers(**{**fields, **overrides})


def test_golden_answers_pass_within_the_tolerance_and_name_each_wrong_answer():
    golden = answers()
    assert golden.problems(np.array([[0.705, 0.295], [0.2, 0.8]]), ["cat", "dog"]) == []
    assert golden.problems(np.array([[0.4, 0.6], [0.2, 0.8]]), ["dog", "dog"]) == [
        "golden input 0: answered class 1 ('dog'), expected 0 ('cat')"]
    assert golden.problems(np.array([[0.7, 0.3], [0.2, 0.8]]), ["cat", "cat"]) == [
        "golden input 1: answered class 1 ('cat'), expected 1 ('dog')"]
    assert golden.problems(np.array([[0.75, 0.25], [0.2, 0.8]]), ["cat", "dog"]) == [
        "golden input 0: probabilities differ by 5.00e-02, more than 0.01"]
    assert golden.problems(np.zeros((1, 2)), ["cat"]) == ["answers of shape (1, 2), expected (2, 2)"]


def test_golden_answers_round_trip_and_refuse_inputs_that_do_not_fit(tmp_path):
    golden = answers()
    (tmp_path / "golden.json").write_text(golden.with_version(4).to_json())
    np.save(tmp_path / "golden_inputs.npy", np.zeros((2, 3, 8, 8), np.uint8))
    read, inputs = GoldenAnswers.read(tmp_path)
    assert read == answers(version=4) and inputs.shape == (2, 3, 8, 8)
    np.save(tmp_path / "golden_inputs.npy", np.zeros((3, 3, 8, 8), np.uint8))
    with pytest.raises(VersionFilesError, match=r"golden.json: 2 answers for inputs of shape \(3, 3, 8, 8\)"):
        GoldenAnswers.read(tmp_path)
    np.save(tmp_path / "golden_inputs.npy", np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(VersionFilesError, match="float32"):
        GoldenAnswers.read(tmp_path)
    (tmp_path / "golden.json").write_text(json.dumps({**json.loads(golden.to_json()), "format_version": 2}))
    with pytest.raises(VersionFilesError, match="format: expected histoserve.golden version 1"):
        GoldenAnswers.read(tmp_path)
    data = json.loads(golden.to_json())
    del data["tolerance"]
    (tmp_path / "golden.json").write_text(json.dumps(data))
    with pytest.raises(VersionFilesError, match="field 'tolerance' missing"):
        GoldenAnswers.read(tmp_path)


def test_golden_images_are_right_by_a_margin_agreed_by_the_reference_spread_over_classes_least_confident_first():
    probabilities = np.array([
        [0.95, 0.05, 0.0],   # 0: class 0, confident
        [0.55, 0.45, 0.0],   # 1: class 0, margin 0.1: a device could flip it
        [0.70, 0.30, 0.0],   # 2: class 0, margin 0.4, less confident than 0
        [0.10, 0.85, 0.05],  # 3: class 1
        [0.10, 0.80, 0.10],  # 4: class 1, but the reference disagrees
        [0.80, 0.10, 0.10],  # 5: answered 0, truly class 2: wrong
        [0.05, 0.05, 0.90],  # 6: class 2
    ])
    truth = np.array([0, 0, 0, 1, 1, 2, 2])
    reference = np.array([0, 0, 0, 1, 2, 0, 2])
    assert GOLDEN_MIN_MARGIN > 0.1
    assert choose_golden(probabilities, truth, reference, count=3) == [2, 3, 6]  # one per class, 2 before 0
    assert choose_golden(probabilities, truth, reference, count=10) == [0, 2, 3, 6]
    assert golden_count(2) == 8 and golden_count(10) == 10 and golden_count(1000) == 64
