"""Opt-in search for mislabelled images: out-of-fold predicted probabilities (K folds grouped by
patient, so no patient's images help predict themselves) fed to cleanlab's `find_label_issues`.

Two models: `pixels` (logistic regression on 16×16 RGB thumbnails: seconds, a baseline) and
`resnet18` (a short CNN training per fold at 64×64: minutes, stronger on real tissue).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from cleanlab.filter import find_label_issues
from sklearn.model_selection import StratifiedGroupKFold
from tqdm import tqdm

from histoserve.formats.preprocessing import PreprocessSpec, preprocess_file
from histoserve.train.manifest import ManifestRow

MODELS = ("pixels", "resnet18")


def _pixel_features(paths) -> np.ndarray:
    spec = PreprocessSpec(16, 16)
    return np.stack([preprocess_file(p, spec).reshape(-1) for p in paths]).astype(np.float32) / 255.0


def _pixels_probabilities(features, labels, train, held_out, classes):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
    model.fit(features[train], labels[train])
    probabilities = np.zeros((len(held_out), classes))
    probabilities[:, model.classes_] = model.predict_proba(features[held_out])
    return probabilities


def _resnet18_probabilities(paths, labels, train, held_out, classes, epochs: int = 4, seed: int = 0):
    import torch

    from histoserve.train.augment import training_transform
    from histoserve.train.data import ImageDataset, Sample
    from histoserve.train.evaluate import predict
    from histoserve.train.fit import make_optimizer, train_one_epoch
    from histoserve.train.model import build_classifier

    torch.manual_seed(seed)
    spec = PreprocessSpec(72, 64)
    samples = [Sample(Path(p), int(y)) for p, y in zip(paths, labels, strict=True)]
    loader = torch.utils.data.DataLoader(
        ImageDataset([samples[i] for i in train], training_transform("light", spec)), batch_size=32, shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    model = build_classifier("resnet18", classes, dropout=0.2)
    optimizer, schedule = make_optimizer(model, 2e-3, 0.05, epochs * len(loader), len(loader))
    for epoch in range(epochs):
        train_one_epoch(model, loader, optimizer, schedule, torch.nn.CrossEntropyLoss(), f"fold model epoch {epoch + 1}")
    return predict(model, [samples[i] for i in held_out], spec, desc="out-of-fold").probabilities


def out_of_fold_probabilities(root: Path, rows: list[ManifestRow], folds: int, model: str, seed: int) -> np.ndarray:
    if model not in MODELS:
        raise ValueError(f"--label-issue-model {model!r} is not one of {', '.join(MODELS)}")
    class_names = sorted({r.label for r in rows})
    labels = np.array([class_names.index(r.label) for r in rows])
    groups = np.array([r.group for r in rows])
    paths = [root / r.path for r in rows]
    if len(set(groups)) < folds:
        raise ValueError(f"label issues: {len(set(groups))} groups cannot make {folds} patient-grouped folds")
    probabilities = np.zeros((len(rows), len(class_names)))
    features = _pixel_features(paths) if model == "pixels" else None
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, held_out in tqdm(list(splitter.split(labels, labels, groups)), desc="label-issue folds", unit="fold", disable=None):
        if features is not None:
            probabilities[held_out] = _pixels_probabilities(features, labels, train, held_out, len(class_names))
        else:
            probabilities[held_out] = _resnet18_probabilities(paths, labels, train, held_out, len(class_names), seed=seed)
    return probabilities


def mark_label_issues(root: Path, rows: list[ManifestRow], folds: int, model: str, seed: int) -> int:
    """Mark suspected rows (status, self-confidence score); returns how many were found."""
    usable = [r for r in rows if r.status == "ok"]
    class_names = sorted({r.label for r in usable})
    labels = np.array([class_names.index(r.label) for r in usable])
    probabilities = out_of_fold_probabilities(root, usable, folds, model, seed)
    ranked = find_label_issues(labels, probabilities, return_indices_ranked_by="self_confidence")
    for row, label, p in zip(usable, labels, probabilities, strict=True):
        row.label_issue_score = f"{p[label]:.4f}"
    for i in ranked:
        usable[i].status = "suspected-label-issue"
        usable[i].reason = f"out-of-fold model prefers {class_names[int(probabilities[i].argmax())]!r}"
    return len(ranked)
