"""The encoded twins export publishes beside the pixel model (`python -m histoserve.export --encoded`), at the
same version, each complete, checksummed and read-only, wired so that version N of MODEL-encoded is
version N of MODEL behind the package's own preprocessing. (What they answer, and the command itself:
tests/serve/test_encoded_model.py.)"""

from __future__ import annotations

import stat

import pytest

from histoserve.export.encoded import PREPROCESS_MODEL_FILE
from histoserve.formats.contract import LABELS_FILE
from histoserve.formats.repository_layout import contract_of, encoded_twins, read_config
from histoserve.formats.version import VERSION_CONFIG, verify_checksums
from tests.conftest import MODEL


@pytest.mark.parametrize("pixel_model", [MODEL, f"{MODEL}-int8"])
def test_each_twin_version_is_complete_checksummed_and_read_only(encoded_repository, pixel_model):
    for twin in encoded_twins(pixel_model):
        folder = encoded_repository / twin / "1"
        assert verify_checksums(folder) == []
        assert all(not path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) for path in folder.iterdir())
        assert (folder / VERSION_CONFIG).read_bytes() == (encoded_repository / twin / "config.pbtxt").read_bytes()
    preprocess, _ = encoded_twins(pixel_model)
    assert (encoded_repository / preprocess / "1" / "model.py").read_bytes() == PREPROCESS_MODEL_FILE.read_bytes()


@pytest.mark.parametrize("pixel_model", [MODEL, f"{MODEL}-int8"])
def test_the_ensemble_calls_its_own_version_of_the_pixel_model_through_the_same_preprocessing(encoded_repository, pixel_model):
    pixel = read_config(encoded_repository / pixel_model / "config.pbtxt")
    contract = contract_of(pixel)
    preprocess_name, encoded_name = encoded_twins(pixel_model)
    preprocess, encoded = (read_config(encoded_repository / name / "config.pbtxt") for name in (preprocess_name, encoded_name))
    assert [(step.model_name, step.model_version) for step in encoded.ensemble_scheduling.step] == \
        [(preprocess_name, 1), (pixel_model, 1)]
    assert encoded.max_batch_size == preprocess.max_batch_size == pixel.max_batch_size
    # the server-side step reads the pixel model's preprocessing parameters, and produces its input
    assert {key: preprocess.parameters[key].string_value for key in contract.parameters()} == contract.parameters()
    assert list(preprocess.output[0].dims) == list(pixel.input[0].dims)
    assert preprocess.instance_group[0].kind == preprocess.instance_group[0].KIND_CPU
    assert preprocess.dynamic_batching.max_queue_delay_microseconds == 0
    # labels for the classification extension, the pixel model's own
    assert encoded.output[0].label_filename == LABELS_FILE
    assert (encoded_repository / encoded_name / LABELS_FILE).read_text() == (encoded_repository / pixel_model / LABELS_FILE).read_text()
