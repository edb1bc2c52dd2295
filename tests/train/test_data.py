from collections import Counter
from pathlib import Path

import pytest

from histoserve.train.data import SplitRatios, drop_unreadable, list_image_folder, load_splits, stratified_split
from tests.conftest import make_noise_png, make_truncated_png


def test_demo_data_is_a_stratified_split_image_folder(digits_root):
    data = load_splits(digits_root)
    assert data.class_names == [str(d) for d in range(10)]
    sizes = {name: len(samples) for name, samples in data.splits.items()}
    assert sum(sizes.values()) == 1797
    assert sizes["val"] == pytest.approx(0.15 * 1797, abs=2) and sizes["test"] == pytest.approx(0.15 * 1797, abs=2)
    for per_class in data.counts().values():  # every class within ±1 image of an even share
        assert max(per_class) - min(per_class) <= 6
    paths = [s.path.name for samples in data.splits.values() for s in samples]
    assert len(paths) == len(set(paths)), "an image is in two splits"


def unsplit_folder(root: Path, per_class=(30, 12, 20)) -> Path:
    for label, count in enumerate(per_class):
        for i in range(count):
            make_noise_png(root / f"class_{label}" / "nested" / f"{i}.png", size=(8, 8), seed=label * 100 + i)
    return root


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_unsplit_image_folder_gets_a_seeded_stratified_split(tmp_path, seed):
    root = unsplit_folder(tmp_path)
    first, again = load_splits(root, SplitRatios(0.2, 0.2), seed), load_splits(root, SplitRatios(0.2, 0.2), seed)
    assert first.splits == again.splits
    everything = [s for samples in first.splits.values() for s in samples]
    assert sorted(s.path for s in everything) == sorted(s.path for s in list_image_folder(root)[1])
    for name, samples in first.splits.items():
        share = {label: count / len(samples) for label, count in Counter(s.label for s in samples).items()}
        assert share[0] == pytest.approx(30 / 62, abs=0.12), name
    other = load_splits(root, SplitRatios(0.2, 0.2), seed + 100)
    assert other.splits["test"] != first.splits["test"]


def test_val_class_missing_from_train_is_an_error(tmp_path):
    make_noise_png(tmp_path / "train" / "a" / "1.png")
    make_noise_png(tmp_path / "val" / "a" / "1.png")
    make_noise_png(tmp_path / "val" / "b" / "1.png")
    with pytest.raises(ValueError, match=r"classes \['b'\]"):
        load_splits(tmp_path)


def test_unreadable_files_are_reported_and_left_out_not_deleted(tmp_path):
    root = unsplit_folder(tmp_path / "data", per_class=(3, 3))
    bad = make_truncated_png(root / "class_1" / "bad.png")
    samples = list_image_folder(root)[1]
    good, errors = drop_unreadable(samples, "test")
    assert len(good) == 6 and [e.path for e in errors] == [str(bad)]
    assert bad.exists()


def test_stratified_split_keeps_every_sample_once():
    from histoserve.train.data import Sample

    samples = [Sample(Path(f"{i}.png"), i % 4) for i in range(200)]
    splits = stratified_split(samples, SplitRatios(0.1, 0.3), seed=3)
    assert sorted(s.path.name for v in splits.values() for s in v) == sorted(s.path.name for s in samples)
    assert len(splits["test"]) == 60 and len(splits["val"]) == 20


def test_a_split_folder_without_test_is_refused_not_evaluated_on_val(tmp_path):
    for split in ("train", "val"):
        for label in ("a", "b"):
            make_noise_png(tmp_path / split / label / "1.png")
    with pytest.raises(ValueError, match=r"no test/ split"):
        load_splits(tmp_path)
