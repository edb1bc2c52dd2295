"""The drift baseline export publishes with each version, and its validation on read."""

import json

import numpy as np
import pytest

from histoserve.formats.baseline import BASELINE_FILE, BaselineError, DriftBaseline, baseline_path, build_baseline, read_baseline
from histoserve.formats.image_statistics import INPUT_STATISTICS, input_statistics
from histoserve.formats.preprocessing import find_images
from tests.conftest import MODEL


@pytest.mark.parametrize("model", [MODEL, f"{MODEL}-int8"])
def test_export_publishes_a_baseline_inside_each_version(repository, digits_root, model):
    version = max(int(p.name) for p in (repository / model).iterdir() if p.name.isdigit())
    baseline = read_baseline(baseline_path(repository, model, version))
    assert (baseline.model, baseline.version, baseline.split) == (model, version, "test")
    assert baseline.precision == ("int8" if model.endswith("int8") else "fp32")
    assert baseline.sample_size == len(find_images(digits_root / "test")) == sum(baseline.predicted_counts)
    assert baseline.class_names == [str(d) for d in range(10)]
    assert 0 < baseline.accuracy <= 1 and baseline.expected_accuracy == pytest.approx(np.mean(baseline.max_probability))
    assert set(baseline.input_statistics) == set(INPUT_STATISTICS)
    # the staging folder is gone: the baseline arrived with model.onnx in one rename
    assert not [p for p in (repository / model).iterdir() if p.name.startswith(".staging")]


def test_input_statistics_measure_what_they_say():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 3, 8, 8), dtype=np.uint8)
    images[1] = 0  # black
    images[2, 2] = 255  # blue channel saturated
    images[2, :2] = 0
    images[3] = 128  # grey
    stats = input_statistics(images)
    assert stats["mean_red"][0] == pytest.approx(images[0, 0].mean(), abs=1e-3)
    assert stats["std_green"][0] == pytest.approx(images[0, 1].std(), abs=1e-3)
    assert stats["brightness"][1] == 0 and stats["saturation"][1] == 0
    assert stats["saturation"][2] == 1 and stats["blue_ratio"][2] == 1
    assert stats["saturation"][3] == 0 and stats["blue_ratio"][3] == pytest.approx(1 / 3, abs=1e-4)


def good_baseline() -> DriftBaseline:
    rng = np.random.default_rng(1)
    probabilities = rng.dirichlet(np.ones(3) * 0.3, size=20)
    images = rng.integers(0, 256, (20, 3, 8, 8), dtype=np.uint8)
    return build_baseline("m", "fp32", "test", ["a", "b", "c"], probabilities, images, rng.integers(0, 3, 20), version=4)


def test_a_baseline_round_trips():
    baseline = good_baseline()
    assert DriftBaseline.from_json(baseline.to_json()) == baseline


@pytest.mark.parametrize("field, value, message", [
    ("format", "something-else", "format"),
    ("format_version", 2, "format_version"),
    ("sample_size", 0, "sample_size"),
    ("predicted_counts", [1, 2, 3], "predicted_counts"),
    ("max_probability", [1.5] * 20, "max_probability"),
    ("input_statistics", {}, "input_statistics.mean_red"),
    ("class_names", None, "missing"),
])
def test_a_broken_baseline_is_refused_naming_the_file_and_field(tmp_path, field, value, message):
    data = json.loads(good_baseline().to_json())
    if value is None:
        del data[field]
    else:
        data[field] = value
    path = tmp_path / BASELINE_FILE
    path.write_text(json.dumps(data))
    with pytest.raises(BaselineError, match=message) as error:
        read_baseline(path)
    assert str(path) in str(error.value)
