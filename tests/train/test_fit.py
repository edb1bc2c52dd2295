import json

import numpy as np
import torch

from histoserve.formats.preprocessing import PreprocessSpec
from histoserve.train.checkpoint import load_checkpoint
from tests.conftest import run_cli


def test_training_writes_a_checkpoint_that_carries_what_export_needs(trained_run, digits_root):
    model, meta = load_checkpoint(trained_run / "checkpoint.pt")
    assert meta.arch == "resnet18" and meta.class_names == [str(d) for d in range(10)]
    assert meta.preprocess == PreprocessSpec(36, 32, "bilinear")
    assert meta.data_root == str(digits_root.resolve())
    reported = json.loads((trained_run / "test_metrics.json").read_text())
    assert meta.metrics["test_accuracy"] == reported["accuracy"] and meta.metrics["best_epoch"] == 1
    assert model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape == (1, 10)


def test_training_reports_the_test_split(trained_run, digits_root):
    metrics = json.loads((trained_run / "test_metrics.json").read_text())
    test_images = len(list((digits_root / "test").rglob("*.png")))
    matrix = np.array(metrics["confusion_matrix"])
    assert metrics["images"] == test_images == matrix.sum()
    assert metrics["accuracy"] == np.trace(matrix) / matrix.sum()
    assert set(metrics["per_class"]) == {str(d) for d in range(10)}
    assert {"precision", "recall", "f1-score"} <= set(metrics["per_class"]["3"])
    report = (trained_run / "test_report.txt").read_text()
    assert "confusion matrix" in report and "macro avg" in report
    for png in ("test_confusion_matrix.png", "training_curves.png"):
        assert (trained_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_command_reports_any_split(trained_run, digits_root, tmp_path):
    run_cli("-m", "histoserve.train", "evaluate", trained_run / "checkpoint.pt", "--split", "val", "--out", tmp_path)
    metrics = json.loads((tmp_path / "val_metrics.json").read_text())
    assert metrics["images"] == len(list((digits_root / "val").rglob("*.png")))
    assert (tmp_path / "val_confusion_matrix.png").exists()


def test_fit_refuses_unavailable_weights_with_exit_code_2(digits_root, tmp_path, no_network):
    result = run_cli("-m", "histoserve.train", "fit", "--data", digits_root, "--out", tmp_path, "--arch", "resnet18",
                     "--weights", "IMAGENET1K_V1", "--weights-cache", tmp_path / "cache", "--epochs", 1, check=False)
    assert result.returncode == 2
    assert "could not download" in result.stderr and "--weights none" in result.stderr


def test_logs_get_epoch_lines_and_no_progress_bars(small_digits, tmp_path):
    """Progress bars are for terminals; piped into a log (CI, a Job) only the epoch lines remain."""
    result = run_cli("-m", "histoserve.train", "fit", "--data", small_digits, "--out", tmp_path, "--arch", "resnet18", "--epochs", 1,
                     "--resize-size", 36, "--crop-size", 32, "--batch-size", 64, "--no-calibrate")
    assert "epoch 1/1  loss" in result.stdout
    assert "batch/s" not in result.stderr + result.stdout and "img/s]" not in result.stderr + result.stdout
