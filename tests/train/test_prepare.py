"""`python -m histoserve.train prepare` on a generated corpus with every kind of problem mixed in."""

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from histoserve.train.data import load_splits
from histoserve.train.manifest import ManifestRow, groups_in_several_splits, read_manifest
from histoserve.train.prepare import BREAKHIS_GROUP, PrepareConfig, assign_splits, prepare
from tests.conftest import run_cli
from tests.train.corpus import BOMB_LIMIT, EXPECTED, GROUP_REGEX, fingerprint, make_breakhis, make_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus") / "slides")


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    before = fingerprint(corpus)
    out = tmp_path_factory.mktemp("prepared")
    run_cli("-m", "histoserve.train", "prepare", corpus, out, "--group-regex", GROUP_REGEX, "--max-pixels", BOMB_LIMIT)
    root, rows = read_manifest(out / "manifest.csv")
    return {"before": before, "out": out, "root": root, "rows": {r.path: r for r in rows}}


def test_every_file_is_in_the_manifest_and_none_was_touched(corpus, prepared):
    assert prepared["root"] == corpus.resolve()
    assert fingerprint(corpus) == prepared["before"], "prepare changed, moved or deleted a user file"
    assert set(prepared["rows"]) == set(prepared["before"])


@pytest.mark.parametrize("path", sorted(EXPECTED))
def test_each_problem_gets_its_status_and_reason(prepared, path):
    status, detail = EXPECTED[path]
    row = prepared["rows"][path]
    assert row.status == status, (row.status, row.reason)
    if status in ("duplicate", "near-duplicate"):
        assert row.duplicate_of == detail and prepared["rows"][detail].status == "ok"
    elif status == "ok":
        assert row.mode == detail and row.split in ("train", "val", "test")
    else:
        assert detail in row.reason and not row.split


def test_exif_orientation_is_applied_before_measuring(prepared):
    row = prepared["rows"]["malignant/P13_exif.jpg"]
    assert (row.width, row.height) == ("40", "60")


def test_near_duplicate_distance_is_recorded(prepared):
    assert 0 <= int(prepared["rows"]["benign/P02_1_resaved.jpg"].distance) <= 4


def test_clean_tiles_are_ok_with_hashes_and_patient_groups(prepared):
    row = prepared["rows"]["benign/P07_3.png"]
    assert (row.status, row.label, row.group, row.mode) == ("ok", "benign", "P07", "RGB")
    assert re.fullmatch(r"[0-9a-f]{64}", row.sha256) and re.fullmatch(r"[0-9a-f]{16}", row.phash)


def test_report_names_every_problem_and_says_zero_leakage(prepared):
    report = (prepared["out"] / "report.md").read_text()
    assert "**Groups found in more than one split: 0.**" in report
    for path, (status, _) in EXPECTED.items():
        if status != "ok":
            assert path in report, path
    assert "Images found under more than one patient: 1." in report and "P05: benign/P05_9.png" in report
    for png in ("class_counts.png", "examples.png", "near_duplicates.png"):
        assert (prepared["out"] / png).read_bytes()[:4] == b"\x89PNG"
    meta = json.loads((prepared["out"] / "prepare.json").read_text())
    assert meta["groups_in_several_splits"] == 0 and meta["status"]["corrupt"] == 3


def synthetic_rows(patients: int = 60, seed: int = 0) -> list[ManifestRow]:
    """Rows without files: an imbalanced (3:1) set of patients with 1–9 images each."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        label = "tumour" if p % 4 == 0 else "normal"
        rows += [ManifestRow(path=f"{label}/p{p}_{i}.png", label=label, group=f"p{p}") for i in range(rng.integers(1, 10))]
    return rows


@pytest.mark.parametrize("seed", range(5))
def test_grouped_split_has_no_patient_in_two_splits_and_keeps_class_ratios(seed):
    rows = synthetic_rows(seed=seed)
    assign_splits(rows, PrepareConfig(src="", out="", seed=seed))
    assert groups_in_several_splits(rows) == {}
    overall = Counter(r.label for r in rows)["tumour"] / len(rows)
    for split in ("train", "val", "test"):
        members = [r for r in rows if r.split == split]
        assert 0.08 * len(rows) <= len(members), split
        assert Counter(r.label for r in members)["tumour"] / len(members) == pytest.approx(overall, abs=0.12), split


@pytest.mark.parametrize("seed", range(3))
def test_k_fold_mode_puts_each_patient_in_exactly_one_fold(seed):
    rows = synthetic_rows(seed=seed)
    assign_splits(rows, PrepareConfig(src="", out="", seed=seed, folds=5))
    folds_of = {}
    for row in rows:
        if row.split == "test":
            assert row.fold == ""
        else:
            assert row.split == "train" and row.fold in {"0", "1", "2", "3", "4"}
            folds_of.setdefault(row.group, set()).add(row.fold)
    assert all(len(f) == 1 for f in folds_of.values())
    test_groups = {r.group for r in rows if r.split == "test"}
    assert test_groups and not test_groups & set(folds_of)


def test_too_few_images_per_class_is_a_clear_error():
    rows = [ManifestRow(path=f"a/{i}.png", label="ab"[i % 2], group=f"g{i}") for i in range(10)]
    with pytest.raises(ValueError, match="cannot split 10 images by patient"):
        assign_splits(rows, PrepareConfig(src="", out=""))


def test_too_few_patients_is_a_clear_error():
    rows = [ManifestRow(path=f"a/{i}.png", label="a" if i % 2 else "b", group=f"g{i % 3}") for i in range(12)]
    with pytest.raises(ValueError, match="only 3 groups"):
        assign_splits(rows, PrepareConfig(src="", out=""))


@pytest.mark.parametrize("layout, labels", [("breakhis", {"benign", "malignant"}),
                                             ("breakhis-subtype", {"adenosis", "fibroadenoma", "ductal_carcinoma", "lobular_carcinoma"})])
def test_breakhis_layout_prepares_with_patient_level_splits(tmp_path, layout, labels):
    root = make_breakhis(tmp_path / "BreaKHis_v1" / "histology_slides")
    rows = prepare(PrepareConfig(src=str(root), out=str(tmp_path / "out"), layout=layout, include_regex="/40X/"))
    assert {r.label for r in rows} == labels
    assert all("/40X/" in r.path and r.status == "ok" for r in rows)
    patient = rows[0].path.rsplit("/", 1)[-1].split("-", 1)[1].rsplit("-", 2)[0]
    assert rows[0].group == patient and re.fullmatch(r"14-\d+[A-Z]B", patient)
    assert groups_in_several_splits(rows) == {}
    assert len({r.group for r in rows}) == 12


def test_breakhis_patient_regex_on_the_documented_name():
    assert re.search(BREAKHIS_GROUP, "SOB_B_A-14-22549AB-40-001.png").group("group") == "14-22549AB"
    assert re.search(BREAKHIS_GROUP, "SOB_M_DC-14-16716-400-016.png").group("group") == "14-16716"


def test_training_reads_the_manifest(prepared, tmp_path):
    manifest = prepared["out"] / "manifest.csv"
    data = load_splits(manifest)
    expected = {s: sum(r.status == "ok" and r.split == s for r in prepared["rows"].values()) for s in ("train", "val", "test")}
    assert {s: len(v) for s, v in data.splits.items()} == expected
    run_cli("-m", "histoserve.train", "fit", "--data", manifest, "--out", tmp_path, "--arch", "resnet18", "--epochs", 1,
            "--resize-size", 36, "--crop-size", 32, "--batch-size", 16, "--augment", "histology", "--balance", "sampler")
    metrics = json.loads((tmp_path / "test_metrics.json").read_text())
    assert metrics["images"] == expected["test"]
    test_patients = {r.group for r in prepared["rows"].values() if r.status == "ok" and r.split == "test"}
    assert metrics["patient_level"]["patients"] == len(test_patients) >= 2  # patient-level metrics from the manifest


def test_k_fold_manifest_trains_one_fold(corpus, tmp_path):
    run_cli("-m", "histoserve.train", "prepare", corpus, tmp_path / "prep", "--group-regex", GROUP_REGEX, "--folds", 3,
            "--max-pixels", BOMB_LIMIT, "--near-duplicate-distance", -1)
    manifest = tmp_path / "prep" / "manifest.csv"
    with pytest.raises(ValueError, match="K-fold manifest"):
        load_splits(manifest)
    folds = [load_splits(manifest, fold=k) for k in range(3)]
    vals = [{s.path for s in f.splits["val"]} for f in folds]
    assert all(vals) and not (vals[0] & vals[1] or vals[1] & vals[2] or vals[0] & vals[2])
    assert all({s.path for s in f.splits["train"]}.isdisjoint(v) for f, v in zip(folds, vals, strict=True))


def test_label_issues_are_found_on_deliberately_flipped_digits(tmp_path):
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    flipped = {}
    for i in range(400):
        label = int(digits.target[i])
        if i % 50 == 7:  # 8 deliberate mistakes
            flipped[f"{(label + 3) % 10}/d{i}.png"] = label
            label = (label + 3) % 10
        path = tmp_path / "digits" / str(label) / f"d{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).save(path)
    rows = prepare(PrepareConfig(src=str(tmp_path / "digits"), out=str(tmp_path / "out"), label_issues=True,
                                 label_issue_folds=5, label_issue_model="pixels", near_duplicate_distance=-1))
    suspected = {r.path for r in rows if r.status == "suspected-label-issue"}
    assert len(suspected & set(flipped)) >= 6, suspected
    assert len(suspected) <= 20
    report = (tmp_path / "out" / "report.md").read_text()
    assert "suspected" in report and (tmp_path / "out" / "label_issues.png").exists()
    assert all(r.label_issue_score for r in rows if r.status in ("ok", "suspected-label-issue"))


def test_label_issue_search_with_the_cnn_model_scores_every_usable_image(prepared):
    from dataclasses import replace

    from histoserve.train.label_issues import mark_label_issues

    rows = [replace(r) for r in prepared["rows"].values()]  # the fixture's rows stay as they are
    found = mark_label_issues(prepared["root"], rows, folds=3, model="resnet18", seed=0)
    scored = [r for r in rows if r.status in ("ok", "suspected-label-issue")]
    assert len(scored) == sum(r.status == "ok" for r in prepared["rows"].values())
    assert all(0.0 <= float(r.label_issue_score) <= 1.0 for r in scored)
    assert found == sum(r.status == "suspected-label-issue" for r in rows)
