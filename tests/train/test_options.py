"""A mistyped or impossible option stops `python -m train` before any image is decoded, naming the
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
    result = run_cli("-m", "train", "fit", "--data", tmp_path / "nothing-here", "--out", tmp_path / "run",
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
    result = run_cli("-m", "train", "fit", "--data", small_digits, "--out", tmp_path / "run", "--arch", "resnet18",
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
    result = run_cli("-m", "train", "prepare", "--help")
    assert "--near-duplicate-distance" in result.stdout and "pHash Hamming distance" in result.stdout
    assert "{pixels,resnet18}" in result.stdout
