"""ExportConfig (export/config.py) built from the real parser of `python -m histoserve.export`: every
option lands in the config, where the pipeline reads it; the options come back as the command line gave
them (what the provenance records); values given in code are checked as the command line checks them;
and each refusal names its option, with the exit codes main() has always used. No export runs here."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from histoserve.export import __main__ as export_cli
from histoserve.export.config import CHOICES, KINDS, OPTIONS, ExportConfig
from histoserve.export.encoded import EncodedOptions
from histoserve.export.precision import AccuracyGate, QuantizationConfig
from histoserve.export.publish import BatchingConfig, CpuTuning, TensorRTConfig
from histoserve.formats.options import OptionError, Range
from histoserve.formats.repository_layout import RepositoryError

# One value per option, none of them its default; {tmp} is a folder holding checkpoint.pt and key.pem.
EVERY_OPTION = {
    "--repository": ["{tmp}/elsewhere"], "--version": ["3"], "--max-batch-size": ["8"], "--max-queue-delay-us": ["100"],
    "--instance-count": ["2"], "--preferred-batch-sizes": ["4", "8"], "--precision": ["int8"], "--calibration-count": ["16"],
    "--calibration-method": ["entropy"], "--int8-reduce-range": [], "--gate-split": ["val"], "--baseline-split": ["train"],
    "--min-agreement": ["0.9"], "--max-accuracy-drop": ["0.1"], "--tensorrt": ["int8"], "--tensorrt-workspace-bytes": ["1024"],
    "--tensorrt-cache-path": ["/cache"], "--cpu-instances": ["3"], "--cpu-threads": ["4"], "--cpu-max-queue-delay-us": ["50"],
    "--cpu-preferred-batch-sizes": ["2"], "--loaded-versions": ["1"], "--parity-images": ["{tmp}"], "--parity-count": ["8"],
    "--atol": ["0.001"], "--opset": ["17"], "--encoded": [], "--preprocess-instances": ["3"], "--max-file-mb": ["1.5"],
    "--max-image-megapixels": ["20"], "--signing-key": ["{tmp}/key.pem"], "--intended-use": ["tests only"],
    "--result-file": ["{tmp}/published"],
}
NEEDS = {"--tensorrt": ["--precision", "int8"]}  # an option that is refused alone


@pytest.fixture
def tmp(tmp_path) -> Path:
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    (tmp_path / "key.pem").write_bytes(b"")
    return tmp_path


def parse(tmp: Path, *options: str) -> argparse.Namespace:
    return export_cli.build_parser().parse_args([str(tmp / "checkpoint.pt"), "--name", "digits",
                                                 *(o.format(tmp=tmp) for o in options)])


def every_option() -> list[str]:
    return [word for option, values in EVERY_OPTION.items() for word in (option, *values)]


def value_at(config: ExportConfig, option: str):
    value = config
    for name in OPTIONS[option]:
        value = getattr(value, name)
    return value


def test_the_config_knows_every_option_of_the_parser_in_its_order():
    dests = [a.dest for a in export_cli.build_parser()._actions if a.dest != "help"]
    assert list(OPTIONS) == dests
    assert ["--" + d.replace("_", "-") for d in dests if d not in ("checkpoint", "name")] == list(EVERY_OPTION)


@pytest.mark.parametrize("option", list(EVERY_OPTION))
def test_every_option_lands_in_the_config(tmp, option):
    dest = option[2:].replace("-", "_")
    default = ExportConfig.from_args(parse(tmp))
    args = parse(tmp, *NEEDS.get(option, []), option, *EVERY_OPTION[option])
    config = ExportConfig.from_args(args)
    given = getattr(args, dest)
    assert value_at(config, dest) == (tuple(given) if isinstance(given, list) else given)
    assert value_at(config, dest) != value_at(default, dest)


def test_the_pipeline_gets_the_dataclasses_it_runs_with(tmp):
    config = ExportConfig.from_args(parse(tmp, *every_option()))
    assert (config.checkpoint, config.name, config.model_name) == (tmp / "checkpoint.pt", "digits", "digits-int8")
    assert config.batching == BatchingConfig(8, 100, 2, (4, 8))
    assert config.cpu == CpuTuning(3, 4, CpuTuning.inter_op_threads, 50, (2,))
    assert config.quantization == QuantizationConfig(16, "entropy", True)
    assert config.gate == AccuracyGate(0.9, 0.1)
    assert config.tensorrt_config == TensorRTConfig("INT8", 1024, "/cache")
    assert config.encoded_options() == EncodedOptions(3, int(1.5 * 2**20), 20_000_000)
    assert (config.parity_images, config.parity_count, config.atol, config.opset) == (tmp, 8, 0.001, 17)
    assert (config.signing_key, config.result_file, config.intended_use) == (tmp / "key.pem", tmp / "published", "tests only")
    defaults = ExportConfig.from_args(parse(tmp))
    assert defaults == ExportConfig(tmp / "checkpoint.pt", "digits")  # the parser's defaults are the config's
    assert defaults.model_name == "digits" and defaults.tensorrt_config is None and defaults.encoded_options() == EncodedOptions()


@pytest.mark.parametrize("options", [[], "every"], ids=["defaults", "every option"])
def test_the_options_come_back_as_the_command_line_gave_them(tmp, options):
    """What the provenance records (export_options): argparse's names, values and order."""
    args = parse(tmp, *(every_option() if options == "every" else options))
    recorded = ExportConfig.from_args(args).options()
    assert recorded == vars(args) and list(recorded) == list(vars(args))


def test_the_config_checks_values_with_the_parser_own_types():
    """KINDS and CHOICES are the parser's types and choices, so a config built in code is held to the same."""
    parser = export_cli.build_parser()
    kinds = {a.dest: a.type for a in parser._actions if isinstance(a.type, Range)}
    choices = {a.dest: tuple(a.choices) for a in parser._actions if a.choices}
    assert kinds == KINDS and choices == CHOICES


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_int8_without_an_int8_model_is_refused_naming_the_option(tmp, precision, capsys):
    args = parse(tmp, "--tensorrt", "int8", "--precision", precision)
    with pytest.raises(OptionError, match=r"^--tensorrt int8 runs the quantized model: add --precision int8$"):
        ExportConfig.from_args(args)
    with pytest.raises(SystemExit) as exited:
        export_cli.main([str(tmp / "checkpoint.pt"), "--name", "digits", "--tensorrt", "int8", "--precision", precision])
    assert exited.value.code == 2
    assert "error: --tensorrt int8 runs the quantized model: add --precision int8" in capsys.readouterr().err


@pytest.mark.parametrize("values, message", [
    ({"precision": "fp8"}, "--precision 'fp8' is not one of: fp32, fp16, int8"),
    ({"gate_split": "holdout"}, "--gate-split 'holdout' is not one of: train, val, test"),
    ({"tensorrt": "fp8"}, "--tensorrt 'fp8' is not one of: fp32, fp16, int8"),
    ({"version": 0}, "--version: must be at least 1, got 0"),
    ({"batching": BatchingConfig(max_batch_size=0)}, "--max-batch-size: must be at least 1, got 0"),
    ({"batching": BatchingConfig(preferred_batch_sizes=(4, 0))}, "--preferred-batch-sizes: must be at least 1, got 0"),
    ({"cpu": CpuTuning(intra_op_threads=0)}, "--cpu-threads: must be at least 1, got 0"),
    ({"cpu": CpuTuning(max_queue_delay_us=-1)}, "--cpu-max-queue-delay-us: must be at least 0, got -1"),
    ({"parity_count": 0}, "--parity-count: must be at least 1, got 0"),
    ({"atol": 0.0}, "--atol: must be above 0, got 0"),
    ({"opset": 17.5}, "--opset: expected an integer, got 17.5"),
    ({"loaded_versions": None}, "--loaded-versions: expected an integer, got None"),
    ({"max_file_mb": -1.0}, "--max-file-mb: must be above 0, got -1"),
    ({"precision": "fp16", "tensorrt": "int8"}, "--tensorrt int8 runs the quantized model: add --precision int8"),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else None)
def test_values_given_in_code_are_refused_naming_the_option(tmp, values, message):
    with pytest.raises(OptionError) as refused:
        ExportConfig(tmp / "checkpoint.pt", "digits", **values)
    assert str(refused.value) == message


def test_main_maps_a_failed_run_to_1_and_a_published_one_to_0(tmp, monkeypatch, capsys):
    argv = [str(tmp / "checkpoint.pt"), "--name", "digits", "--version", "4"]
    ran = []

    def refuse(config):
        ran.append(config)
        raise RepositoryError("version 4 already exists: versions are immutable")

    monkeypatch.setattr(export_cli, "export_and_publish", refuse)
    assert export_cli.main(argv) == 1
    assert capsys.readouterr().err == "error: version 4 already exists: versions are immutable\n"
    assert ran == [ExportConfig(tmp / "checkpoint.pt", "digits", version=4)]
    monkeypatch.setattr(export_cli, "export_and_publish", lambda config: tmp / "digits" / "4")
    assert export_cli.main(argv) == 0
