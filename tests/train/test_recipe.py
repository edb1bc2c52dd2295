"""The training recipe's parts, one by one, and a short run with all of them switched on."""

import csv
import json

import numpy as np
import pytest
import torch

from train.config import FitConfig
from train.evaluate import Predictions, expected_calibration_error, fit_temperature, patient_level, summarize
from train.fit import fit, freeze_backbone, make_optimizer, parameter_groups, train_one_epoch
from train.model import build_classifier


def test_weight_decay_skips_norm_layers_and_biases_and_the_backbone_may_learn_slower():
    model = build_classifier("resnet18", 3)
    groups = {g["name"]: g for g in parameter_groups(model, lr=0.1, weight_decay=0.05, backbone_lr_scale=0.1)}
    assert set(groups) == {"backbone/decay", "backbone/no_decay", "head/decay", "head/no_decay"}
    assert all(p.ndim > 1 for g in ("backbone/decay", "head/decay") for p in groups[g]["params"])
    assert all(p.ndim == 1 for g in ("backbone/no_decay", "head/no_decay") for p in groups[g]["params"])
    assert groups["backbone/no_decay"]["weight_decay"] == groups["head/no_decay"]["weight_decay"] == 0.0
    assert groups["backbone/decay"]["lr"] == pytest.approx(0.01) and groups["head/decay"]["lr"] == 0.1
    bn_weight = dict(model.named_parameters())["backbone.bn1.weight"]
    assert any(p is bn_weight for p in groups["backbone/no_decay"]["params"])
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_schedule_warms_up_linearly_then_decays_to_zero(kind):
    model = build_classifier("resnet18", 2)
    optimizer, schedule = make_optimizer(model, 0.1, 0.0, steps=20, warmup_steps=5, kind=kind)
    rates = []
    for _ in range(20):
        rates.append(schedule.get_last_lr()[-1])
        optimizer.step()
        schedule.step()
    assert rates[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    assert max(rates) == pytest.approx(0.1) and rates[-1] < 0.002 and rates[5:] == sorted(rates[5:], reverse=True)


def test_a_frozen_backbone_does_not_move_while_the_head_learns():
    torch.manual_seed(0)
    model = build_classifier("resnet18", 3, dropout=0.0)
    freeze_backbone(model, True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    loader = [(images, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))]
    optimizer, schedule = make_optimizer(model, 0.1, 0.05, steps=2, warmup_steps=1, kind="sgd")
    train_one_epoch(model, loader, optimizer, schedule, torch.nn.CrossEntropyLoss(), "t", show_progress=False)
    for name, parameter in model.named_parameters():
        moved = not torch.equal(parameter, before[name])
        assert moved == name.startswith("backbone.fc.1."), name


def test_temperature_scaling_fixes_overconfidence():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 2000)
    logits = rng.normal(0, 1, (2000, 3))
    logits[np.arange(2000), labels] += 1.0
    overconfident = Predictions(labels, logits * 4.0)
    before = expected_calibration_error(overconfident.probabilities, labels)[0]
    overconfident.temperature = fit_temperature(overconfident)
    after = expected_calibration_error(overconfident.probabilities, labels)[0]
    assert overconfident.temperature == pytest.approx(4.0, rel=0.15)
    assert after < before / 3


def test_patient_level_metrics_average_probabilities_per_patient():
    labels = np.array([0, 0, 0, 1, 1, 1])
    logits = np.log(np.array([[0.9, 0.1], [0.4, 0.6], [0.4, 0.6], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]]))
    predictions = Predictions(labels, logits, groups=["a", "a", "a", "b", "b", "c"])
    result = patient_level(predictions, ["benign", "malignant"])
    # a: mean [0.567, 0.433] → benign (right); b: [0.4, 0.6] → malignant (right); c: right.
    assert result["patients"] == 3 and result["accuracy"] == 1.0
    assert result["patient_score"] == pytest.approx((1 / 3 + 1 / 2 + 1) / 3)
    assert patient_level(Predictions(labels, logits, groups=[f"file:{i}" for i in range(6)]), ["b", "m"]) is None


def test_summary_has_balanced_accuracy_roc_auc_and_calibration():
    labels = np.array([0, 0, 0, 0, 1, 1])
    logits = np.log(np.array([[0.9, 0.1]] * 4 + [[0.6, 0.4], [0.2, 0.8]]))
    metrics = summarize(Predictions(labels, logits), ["a", "b"])
    assert metrics["accuracy"] == pytest.approx(5 / 6) and metrics["balanced_accuracy"] == pytest.approx(0.75)
    assert metrics["roc_auc_ovr"] == 1.0 and 0 <= metrics["ece"] <= 1
    assert {"macro_avg", "weighted_avg", "per_class", "confusion_matrix"} <= set(metrics)


def test_a_short_run_with_every_option_on_writes_a_complete_run_folder(small_digits, tmp_path):
    metrics = fit(FitConfig(
        data=str(small_digits), out=str(tmp_path), arch="resnet18", epochs=3, batch_size=32, resize_size=36, crop_size=32,
        optimizer="sgd", lr=0.02, label_smoothing=0.1, clip_grad_norm=2.0, ema_decay=0.9, amp="bf16",
        channels_last=True, freeze_epochs=1, backbone_lr_scale=0.5, balance="loss", early_stopping_patience=1,
        deterministic=True, seed=3,
    ))
    with open(tmp_path / "metrics.csv") as handle:
        history = list(csv.DictReader(handle))
    assert 2 <= len(history) <= 3 and {"val_loss", "val_balanced_accuracy", "lr"} <= set(history[0])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["amp"] == "bf16" and config["world_size"] == 1
    for name in ("checkpoint.pt", "last.pt", "train.log", "steps.csv", "training_curves.png", "test_confusion_matrix.png",
                 "test_reliability.png", "val_reliability.png", "test_report.txt"):
        assert (tmp_path / name).exists(), name
    from train.checkpoint import load_checkpoint

    _, meta = load_checkpoint(tmp_path / "checkpoint.pt")
    assert meta.temperature != 1.0 and metrics["test_ece"] >= 0
    report = (tmp_path / "test_report.txt").read_text()
    assert "balanced accuracy" in report and "ROC-AUC" in report and "ECE" in report
