"""The training recipe's parts, one by one, and a short run with all of them switched on."""

import csv
import json

import numpy as np
import pytest
import torch

from histoserve.train.config import FitConfig
from histoserve.train.evaluate import Predictions, expected_calibration_error, fit_temperature, patient_level, summarize
from histoserve.train.fit import fit, freeze_backbone, make_optimizer, parameter_groups, train_one_epoch
from histoserve.train.model import build_classifier


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


class RecordingSchedule:
    """A constant learning rate that records the model's parameters after every optimizer step."""

    def __init__(self, model):
        self.model, self.after_step = model, []

    def step(self):
        self.after_step.append({n: p.detach().clone() for n, p in self.model.named_parameters()})

    def get_last_lr(self):
        return [0.1]


def two_batches():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 8, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([[0, 1, 2, 0, 1, 2, 0, 1], [2, 1, 0, 2, 1, 0, 2, 1]])
    return list(zip(images, labels, strict=True))


def test_gradients_are_clipped_to_the_given_norm():
    norms = {}
    for clip in (0.0, 0.01):
        torch.manual_seed(0)
        model = build_classifier("resnet18", 3, dropout=0.0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        train_one_epoch(model, two_batches(), optimizer, RecordingSchedule(model), torch.nn.CrossEntropyLoss(), "t",
                        clip_grad_norm=clip, show_progress=False)
        # the last step's gradients are still on the parameters (they are zeroed before each backward)
        norms[clip] = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])).item()
    assert norms[0.0] > 0.05 and norms[0.01] == pytest.approx(0.01, rel=1e-3)


def test_ema_weights_follow_the_exponential_average_of_every_step():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    model = build_classifier("resnet18", 3, dropout=0.0)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.75), use_buffers=True)
    schedule = RecordingSchedule(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_one_epoch(model, two_batches(), optimizer, schedule, torch.nn.CrossEntropyLoss(), "t", ema=ema, show_progress=False)
    first, second = schedule.after_step
    averaged = dict(ema.module.named_parameters())
    for name in ("backbone.conv1.weight", "backbone.fc.1.weight"):
        expected = 0.75 * first[name] + 0.25 * second[name]  # the first update copies, the second averages
        assert torch.allclose(averaged[name], expected, atol=1e-6), name
        assert not torch.allclose(averaged[name], second[name]), name


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
    assert result["recall_per_class"] == {"benign": 1.0, "malignant": 1.0}
    merged = Predictions(labels, logits, groups=["a", "a", "a", "b", "b", "b"])  # b: mean [0.367, 0.633] → right
    flipped = Predictions(1 - labels, logits, groups=["a", "a", "a", "b", "b", "b"])  # both patients wrong
    assert patient_level(merged, ["benign", "malignant"])["recall_per_class"] == {"benign": 1.0, "malignant": 1.0}
    assert patient_level(flipped, ["benign", "malignant"])["recall_per_class"] == {"benign": 0.0, "malignant": 0.0}
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
        data=str(small_digits), out=str(tmp_path), arch="resnet18", epochs=2, batch_size=32, resize_size=36, crop_size=32,
        optimizer="sgd", lr=0.02, label_smoothing=0.1, clip_grad_norm=2.0, ema_decay=0.9, amp="bf16",
        channels_last=True, freeze_epochs=1, backbone_lr_scale=0.5, balance="loss", early_stopping_patience=3,
        deterministic=True, seed=3,
    ))
    with open(tmp_path / "metrics.csv") as handle:
        history = list(csv.DictReader(handle))
    assert len(history) == 2 and {"val_loss", "val_balanced_accuracy", "lr"} <= set(history[0])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["amp"] == "bf16" and config["world_size"] == 1
    for name in ("checkpoint.pt", "last.pt", "train.log", "steps.csv", "training_curves.png", "test_confusion_matrix.png",
                 "test_reliability.png", "val_reliability.png", "test_report.txt"):
        assert (tmp_path / name).exists(), name
    from histoserve.train.checkpoint import load_checkpoint

    model, meta = load_checkpoint(tmp_path / "checkpoint.pt")
    assert meta.temperature != 1.0 and metrics["test_accuracy"] == meta.metrics["test_accuracy"]
    last = torch.load(tmp_path / "last.pt", weights_only=False)
    ema_weights, raw_weights = last["ema"]["module.backbone.fc.1.weight"], last["model"]["backbone.fc.1.weight"]
    assert not torch.allclose(ema_weights, raw_weights)  # the EMA is what is kept, not the last step
    if meta.metrics["best_epoch"] == 2:
        assert torch.equal(model.state_dict()["backbone.fc.1.weight"], ema_weights)
    report = (tmp_path / "test_report.txt").read_text()
    assert "balanced accuracy" in report and "ROC-AUC" in report and "ECE" in report


def test_freeze_epochs_keep_the_backbone_as_initialised(small_digits, tmp_path):
    config = FitConfig(data=str(small_digits), out=str(tmp_path), arch="resnet18", epochs=1, batch_size=32,
                       resize_size=36, crop_size=32, freeze_epochs=1, seed=5, calibrate=False)
    fit(config)
    from histoserve.train.checkpoint import load_checkpoint
    from histoserve.train.fit import seed_everything

    trained, _ = load_checkpoint(tmp_path / "checkpoint.pt")
    seed_everything(5)
    initial = build_classifier("resnet18", 10, dropout=config.dropout)
    before, after = dict(initial.named_parameters()), dict(trained.named_parameters())
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved and all(name.startswith("backbone.fc.") for name in moved), sorted(moved)[:5]


def test_early_stopping_ends_the_run_patience_epochs_after_the_last_improvement(small_digits, tmp_path):
    """A learning rate too small to move the weights (1e-12): only BatchNorm statistics move, so
    validation soon stops improving; the run must end exactly `patience` epochs after its last strict
    improvement, long before --epochs."""
    epochs, patience = 8, 1
    fit(FitConfig(data=str(small_digits), out=str(tmp_path), arch="resnet18", epochs=epochs, batch_size=32, lr=1e-12,
                  resize_size=36, crop_size=32, early_stopping_patience=patience, seed=1, calibrate=False))
    with open(tmp_path / "metrics.csv") as handle:
        scores = [float(row["val_balanced_accuracy"]) for row in csv.DictReader(handle)]
    improved = [epoch for epoch, score in enumerate(scores, 1) if score > max(scores[:epoch - 1], default=-1.0)]
    assert len(scores) == improved[-1] + patience < epochs, scores
    assert "early stop" in (tmp_path / "train.log").read_text()
