"""Evaluation: predictions through the client's preprocessing, then scikit-learn metrics (accuracy,
balanced accuracy, per-class precision/recall/F1 with macro and weighted averages, one-vs-rest
ROC-AUC), calibration (ECE, reliability diagram, temperature scaling fitted on validation) and
patient-level metrics when the data has groups. Writes text, JSON and PNGs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    ConfusionMatrixDisplay,
    accuracy_score,
    balanced_accuracy_score,
    classification_report,
    confusion_matrix,
    recall_score,
    roc_auc_score,
)
from tqdm import tqdm  # noqa: E402

from histoserve.formats.preprocessing import PreprocessSpec  # noqa: E402
from histoserve.train.augment import evaluation_transform  # noqa: E402
from histoserve.train.data import ImageDataset, Sample  # noqa: E402

CALIBRATION_BINS = 15


@dataclass
class Predictions:
    labels: np.ndarray  # (n,) true class indices
    logits: np.ndarray  # (n, classes)
    groups: list[str] = field(default_factory=list)  # patient per image, when known
    temperature: float = 1.0

    @property
    def probabilities(self) -> np.ndarray:
        return torch.softmax(torch.from_numpy(self.logits) / self.temperature, dim=1).numpy()


@torch.no_grad()
def predict(model: torch.nn.Module, samples: list[Sample], spec: PreprocessSpec, batch_size: int = 64,
            desc: str = "evaluating", device: torch.device | str = "cpu") -> Predictions:
    model.eval()
    loader = torch.utils.data.DataLoader(ImageDataset(samples, evaluation_transform(spec)), batch_size=batch_size, shuffle=False)
    labels, logits = [], []
    for images, targets in tqdm(loader, desc=desc, unit="batch", leave=False, disable=None):
        logits.append(model(images.to(device)).float().cpu().numpy())
        labels.append(targets.numpy())
    return Predictions(np.concatenate(labels), np.concatenate(logits), [s.group for s in samples])


def fit_temperature(predictions: Predictions) -> float:
    """Temperature scaling (Guo et al. 2017): the T > 0 that minimises the NLL of softmax(logits / T)."""
    logits, labels = torch.from_numpy(predictions.logits).double(), torch.from_numpy(predictions.labels).long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = CALIBRATION_BINS):
    """ECE over equal-width confidence bins, and the per-bin (confidence, accuracy, count)."""
    confidence, correct = probabilities.max(1), (probabilities.argmax(1) == labels).astype(float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    table, ece = [], 0.0
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            gap = abs(correct[inside].mean() - confidence[inside].mean())
            ece += inside.mean() * gap
            table.append((float(confidence[inside].mean()), float(correct[inside].mean()), int(inside.sum())))
    return float(ece), table


def patient_level(predictions: Predictions, class_names: list[str]) -> dict | None:
    """Mean probability per patient, then metrics over patients; and BreakHis' patient score (the
    mean over patients of each patient's image accuracy)."""
    groups = predictions.groups
    if not groups or all(g.startswith("file:") or not g for g in groups) or len(set(groups)) == len(groups):
        return None
    probabilities = predictions.probabilities
    patients = sorted(set(groups))
    index = {g: i for i, g in enumerate(patients)}
    mean = np.zeros((len(patients), probabilities.shape[1]))
    count = np.zeros(len(patients))
    truth = np.zeros(len(patients), dtype=int)
    image_correct = np.zeros(len(patients))
    for g, p, y in zip(groups, probabilities, predictions.labels, strict=True):
        i = index[g]
        mean[i] += p
        count[i] += 1
        truth[i] = y
        image_correct[i] += p.argmax() == y
    mean /= count[:, None]
    predicted = mean.argmax(1)
    return {
        "patients": len(patients),
        "accuracy": float(accuracy_score(truth, predicted)),
        "balanced_accuracy": float(balanced_accuracy_score(truth, predicted)),
        "patient_score": float(np.mean(image_correct / count)),
        "recall_per_class": dict(zip(class_names, map(float, recall_score(
            truth, predicted, labels=list(range(len(class_names))), average=None, zero_division=0)), strict=True)),
    }


def summarize(predictions: Predictions, class_names: list[str]) -> dict:
    probabilities = predictions.probabilities
    y_true, y_pred = predictions.labels, probabilities.argmax(axis=1)
    indices = list(range(len(class_names)))
    report = classification_report(y_true, y_pred, labels=indices, target_names=class_names, output_dict=True, zero_division=0)
    ece, _ = expected_calibration_error(probabilities, y_true)
    roc_auc = None
    if len(set(y_true.tolist())) == len(class_names) > 1:
        roc_auc = float(roc_auc_score(y_true, probabilities[:, 1] if len(class_names) == 2 else probabilities,
                                      multi_class="ovr", labels=indices))
    return {
        "images": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        "roc_auc_ovr": roc_auc,
        "ece": ece,
        "temperature": predictions.temperature,
        "per_class": {name: report[name] for name in class_names},
        "macro_avg": report["macro avg"],
        "weighted_avg": report["weighted avg"],
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=indices).tolist(),
        "patient_level": patient_level(predictions, class_names),
    }


def write_report(predictions: Predictions, class_names: list[str], out_dir: Path, split: str) -> dict:
    """`<split>_metrics.json`, `<split>_report.txt`, `<split>_confusion_matrix.png` and
    `<split>_reliability.png` in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = summarize(predictions, class_names)
    y_true, y_pred = predictions.labels, predictions.probabilities.argmax(axis=1)
    indices = list(range(len(class_names)))
    matrix = np.array(metrics["confusion_matrix"])
    lines = [
        f"{split} split: {metrics['images']} images",
        f"  accuracy           {metrics['accuracy']:.4f}",
        f"  balanced accuracy  {metrics['balanced_accuracy']:.4f}",
        f"  ROC-AUC (one-vs-rest, macro)  {metrics['roc_auc_ovr']:.4f}" if metrics["roc_auc_ovr"] is not None
        else "  ROC-AUC  n/a (a class is missing)",
        f"  ECE ({CALIBRATION_BINS} bins)      {metrics['ece']:.4f} at temperature {predictions.temperature:.3f}",
    ]
    if metrics["patient_level"]:
        p = metrics["patient_level"]
        lines.append(f"  patient level ({p['patients']} patients, mean probability): accuracy {p['accuracy']:.4f}, "
                     f"balanced accuracy {p['balanced_accuracy']:.4f}, patient score {p['patient_score']:.4f}")
    text = ("\n".join(lines) + "\n\n"
            + classification_report(y_true, y_pred, labels=indices, target_names=class_names, digits=4, zero_division=0)
            + "\nconfusion matrix (rows: true class, columns: predicted)\n" + _matrix_text(matrix, class_names))
    (out_dir / f"{split}_report.txt").write_text(text)
    (out_dir / f"{split}_metrics.json").write_text(json.dumps(metrics, indent=2))

    size = 1.0 + 0.6 * len(class_names)
    figure, (counts, normalized) = plt.subplots(1, 2, figsize=(2 * size + 1, size + 0.3))
    ConfusionMatrixDisplay(matrix, display_labels=class_names).plot(ax=counts, cmap="Blues", colorbar=False)
    counts.set_title("counts")
    rows = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    ConfusionMatrixDisplay(rows, display_labels=class_names).plot(ax=normalized, cmap="Blues", colorbar=False, values_format=".2f")
    normalized.set_title("row-normalized (recall per class)")
    figure.suptitle(f"{split}: accuracy {metrics['accuracy']:.3f}, balanced {metrics['balanced_accuracy']:.3f}, {metrics['images']} images")
    figure.tight_layout()
    figure.savefig(out_dir / f"{split}_confusion_matrix.png", dpi=120)
    plt.close(figure)
    plot_reliability(predictions, out_dir / f"{split}_reliability.png", f"{split}: ECE {metrics['ece']:.3f}")
    print(text)
    return metrics


def plot_reliability(predictions: Predictions, path: Path, title: str) -> None:
    _, table = expected_calibration_error(predictions.probabilities, predictions.labels)
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    axis.plot([0, 1], [0, 1], "--", color="grey", label="perfectly calibrated")
    if table:
        confidence, accuracy, count = zip(*table, strict=True)
        axis.bar(confidence, accuracy, width=1.0 / CALIBRATION_BINS, alpha=0.6, edgecolor="black", label="accuracy per bin")
        for x, y, n in table:
            axis.annotate(str(n), (x, y), ha="center", va="bottom", fontsize=6)
    axis.set(xlim=(0, 1), ylim=(0, 1.05), xlabel="confidence (max probability)", ylabel="accuracy", title=title)
    axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_training_curves(history: list[dict], path: Path) -> None:
    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [row["train_loss"] for row in history], marker="o", label="train")
    loss_axis.plot(epochs, [row["val_loss"] for row in history], marker="o", label="validation")
    loss_axis.set(xlabel="epoch", ylabel="cross-entropy (as trained: smoothing, class weights)", title="loss")
    loss_axis.legend()
    accuracy_axis.plot(epochs, [row["train_accuracy"] for row in history], marker="o", label="train (augmented)")
    accuracy_axis.plot(epochs, [row["val_accuracy"] for row in history], marker="o", label="validation")
    accuracy_axis.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    accuracy_axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _matrix_text(matrix: np.ndarray, class_names: list[str]) -> str:
    width = max(max(len(n) for n in class_names), len(str(matrix.max()))) + 1
    lines = [" " * width + "".join(n.rjust(width) for n in class_names)]
    lines += [name.rjust(width) + "".join(str(v).rjust(width) for v in row) for name, row in zip(class_names, matrix, strict=True)]
    return "\n".join(lines) + "\n"
