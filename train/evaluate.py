"""Test-split evaluation: predictions through the client's preprocessing, then scikit-learn metrics,
a confusion matrix as text and PNG, and a JSON summary that export and the demo read back."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    ConfusionMatrixDisplay,
    accuracy_score,
    classification_report,
    confusion_matrix,
)
from tqdm import tqdm  # noqa: E402

from client.preprocessing import PreprocessSpec  # noqa: E402
from train.augment import evaluation_transform  # noqa: E402
from train.data import ImageDataset, Sample  # noqa: E402


@dataclass
class Predictions:
    labels: np.ndarray  # (n,) true class indices
    probabilities: np.ndarray  # (n, classes) softmax


@torch.no_grad()
def predict(
    model: torch.nn.Module, samples: list[Sample], spec: PreprocessSpec, batch_size: int = 64, desc: str = "evaluating"
) -> Predictions:
    model.eval()
    loader = torch.utils.data.DataLoader(
        ImageDataset(samples, evaluation_transform(spec)), batch_size=batch_size, shuffle=False
    )
    labels, probabilities = [], []
    for images, targets in tqdm(loader, desc=desc, unit="batch", leave=False):
        probabilities.append(torch.softmax(model(images), dim=1).numpy())
        labels.append(targets.numpy())
    return Predictions(np.concatenate(labels), np.concatenate(probabilities))


def summarize(predictions: Predictions, class_names: list[str]) -> dict:
    y_true, y_pred = predictions.labels, predictions.probabilities.argmax(axis=1)
    indices = list(range(len(class_names)))
    report = classification_report(
        y_true, y_pred, labels=indices, target_names=class_names, output_dict=True, zero_division=0
    )
    return {
        "images": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "per_class": {name: report[name] for name in class_names},
        "macro_avg": report["macro avg"],
        "weighted_avg": report["weighted avg"],
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=indices).tolist(),
    }


def write_report(predictions: Predictions, class_names: list[str], out_dir: Path, split: str) -> dict:
    """`<split>_metrics.json`, `<split>_report.txt` and `<split>_confusion_matrix.png` in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = summarize(predictions, class_names)
    y_true, y_pred = predictions.labels, predictions.probabilities.argmax(axis=1)
    indices = list(range(len(class_names)))
    text = (
        f"{split} split: {metrics['images']} images, accuracy {metrics['accuracy']:.4f}\n\n"
        + classification_report(
            y_true, y_pred, labels=indices, target_names=class_names, digits=4, zero_division=0
        )
        + "\nconfusion matrix (rows: true class, columns: predicted)\n"
        + _matrix_text(np.array(metrics["confusion_matrix"]), class_names)
    )
    (out_dir / f"{split}_report.txt").write_text(text)
    (out_dir / f"{split}_metrics.json").write_text(json.dumps(metrics, indent=2))

    figure, axis = plt.subplots(figsize=(1.0 + 0.6 * len(class_names), 0.8 + 0.6 * len(class_names)))
    ConfusionMatrixDisplay(np.array(metrics["confusion_matrix"]), display_labels=class_names).plot(
        ax=axis, cmap="Blues", colorbar=False
    )
    axis.set_title(f"{split}: accuracy {metrics['accuracy']:.3f} on {metrics['images']} images")
    figure.tight_layout()
    figure.savefig(out_dir / f"{split}_confusion_matrix.png", dpi=120)
    plt.close(figure)
    print(text)
    return metrics


def plot_training_curves(history: list[dict], path: Path) -> None:
    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [row["train_loss"] for row in history], marker="o")
    loss_axis.set(xlabel="epoch", ylabel="training loss", title="loss")
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
    lines += [name.rjust(width) + "".join(str(v).rjust(width) for v in row) for name, row in zip(class_names, matrix)]
    return "\n".join(lines) + "\n"
