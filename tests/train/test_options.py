"""A mistyped or impossible option stops `python -m histoserve.train` before any image is decoded, naming the
option and what it accepts."""

import pytest
import torch

from histoserve.train.config import FitConfig
from histoserve.train.prepare import PrepareConfig
from tests.conftest import run_cli


@pytest.mark.parametrize("option, value", [
    ("--device", "gpu"), ("--augment", "heavy"), ("--balance", "weights"), ("--optimizer", "adam"),
    ("--amp", "fp32"), ("--interpolation", "cubic"), ("--arch", "resnet152"),
])
def test_fit_refuses_a_value_outside_the_choices_before_reading_data(option, value, tmp_path):
    result = run_cli("-m", "histoserve.train", "fit", "--data", tmp_path / "nothing-here", "--out", tmp_path / "run",
                     option, value, check=False, timeout=120)
    assert result.returncode == 2
    assert f"argument {option}: invalid choice: '{value}'" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("options, message", [
    (["--device", "cuda"], "--device cuda, but no CUDA device is visible"),
    (["--amp", "fp16"], "--amp fp16 needs CUDA"),
])
def test_fit_refuses_cuda_options_without_cuda_before_decoding_any_image(options, message, small_digits, tmp_path):
    result = run_cli("-m", "histoserve.train", "fit", "--data", small_digits, "--out", tmp_path / "run", "--arch", "resnet18",
                     *options, check=False, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr
    assert "checking train images" not in result.stderr + result.stdout


@pytest.mark.parametrize("config, fields", [
    (lambda: FitConfig(augment="heavy"), "--augment 'heavy' is not one of: none, light, seed, histology"),
    (lambda: FitConfig(device="cpu", amp="fp16"), "--amp fp16 needs CUDA"),
    (lambda: PrepareConfig(src="a", out="b", layout="breakhis2"), "--layout 'breakhis2' is not one of"),
    (lambda: PrepareConfig(src="a", out="b", label_issue_model="vit"), "--label-issue-model 'vit'"),
])
def test_configs_built_in_code_are_checked_too(config, fields):
    with pytest.raises(ValueError, match=fields.replace("(", r"\(").replace(")", r"\)")):
        config()


def test_prepare_help_explains_every_option():
    result = run_cli("-m", "histoserve.train", "prepare", "--help")
    assert "--near-duplicate-distance" in result.stdout and "pHash Hamming distance" in result.stdout
    assert "{pixels,resnet18}" in result.stdout


@pytest.mark.parametrize("options, message", [
    (["--crop-size", "40", "--resize-size", "36"], "--crop-size 40 is larger than --resize-size 36"),
    (["--epochs", "0"], "argument --epochs: must be at least 1, got 0"),
    (["--lr", "-1"], "argument --lr: must be above 0, got -1"),
    (["--dropout", "1"], "argument --dropout: must be in [0, 1), got 1"),
    (["--val-ratio", "0.6", "--test-ratio", "0.5"], "leave nothing to train on"),
    (["--batch-size", "many"], "argument --batch-size: not an integer: 'many'"),
], ids=["crop-over-resize", "no-epochs", "negative-lr", "dropout-one", "ratios", "not-a-number"])
def test_fit_refuses_a_value_out_of_range_before_writing_anything(options, message, small_digits, tmp_path):
    result = run_cli("-m", "histoserve.train", "fit", "--data", small_digits, "--out", tmp_path / "run", "--arch", "resnet18",
                     *options, check=False, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()  # not even config.json


@pytest.mark.parametrize("config, message", [
    (lambda: FitConfig(epochs=0), "--epochs: must be at least 1, got 0"),
    (lambda: FitConfig(crop_size=300, resize_size=256), "--crop-size 300 is larger than --resize-size 256"),
    (lambda: FitConfig(ema_decay=1.0), "--ema-decay: must be in [0, 1), got 1"),
    (lambda: PrepareConfig(src="a", out="b", near_duplicate_distance=65), "--near-duplicate-distance: must be in [-1, 64]"),
], ids=["epochs", "crop", "ema", "near-duplicate"])
def test_ranges_hold_for_configs_built_in_code(config, message):
    with pytest.raises(ValueError) as refused:
        config()
    assert message in str(refused.value)
