"""Training, top to bottom: data → model → AdamW with warmup + cosine → epochs → best checkpoint →
test-split report. Everything export needs goes into the checkpoint."""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from client.preprocessing import PreprocessSpec
from train.augment import training_transform
from train.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from train.data import ImageDataset, SplitRatios, drop_unreadable, load_splits
from train.evaluate import plot_training_curves, predict, summarize, write_report
from train.model import IMAGENET_MEAN, IMAGENET_STD, build_classifier, load_backbone_weights


@dataclass
class FitConfig:
    data: str
    out: str = "runs/latest"
    arch: str = "resnet50"
    weights: str = "none"
    weights_cache: str | None = None
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    dropout: float = 0.2
    resize_size: int = 256
    crop_size: int = 224
    interpolation: str = "bilinear"
    augment: str = "light"
    seed: int = 0
    val_ratio: float = 0.15
    test_ratio: float = 0.15
    workers: int = 0
    threads: int = 0  # 0: one per core


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fit(config: FitConfig) -> dict:
    seed_everything(config.seed)
    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = PreprocessSpec(config.resize_size, config.crop_size, config.interpolation)

    data = load_splits(Path(config.data), SplitRatios(config.val_ratio, config.test_ratio), config.seed)
    skipped = []
    for name, samples in data.splits.items():
        data.splits[name], errors = drop_unreadable(samples, name)
        skipped += errors
    if skipped:
        (out / "skipped_files.txt").write_text("".join(f"{e}\n" for e in skipped))
        print(f"skipped {len(skipped)} unreadable file(s), listed in {out / 'skipped_files.txt'}:")
        for error in skipped[:10]:
            print(f"  {error}")
    counts = data.counts()
    print(f"classes: {data.class_names}")
    for name, per_class in counts.items():
        print(f"  {name:5s} {sum(per_class):6d} images  per class {per_class}")

    backbone_state = load_backbone_weights(config.arch, config.weights, config.weights_cache)
    model = build_classifier(config.arch, len(data.class_names), config.dropout, backbone_state)
    generator = torch.Generator().manual_seed(config.seed)
    train_loader = torch.utils.data.DataLoader(
        ImageDataset(data.splits["train"], training_transform(config.augment, spec)),
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=len(data.splits["train"]) > config.batch_size,
        num_workers=config.workers,
        generator=generator,
    )

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * len(train_loader)
    warmup = min(steps - 1, max(1, int(config.warmup_epochs * len(train_loader))))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))),
    )
    loss_fn = nn.CrossEntropyLoss()

    history, best_accuracy = [], -1.0
    meta = CheckpointMeta(
        arch=config.arch,
        class_names=data.class_names,
        preprocess=spec,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        dropout=config.dropout,
        data_root=str(Path(config.data).resolve()),
        split_seed=config.seed,
        config=asdict(config),
    )
    for epoch in range(1, config.epochs + 1):
        model.train()
        started, seen, correct, loss_sum = time.perf_counter(), 0, 0, 0.0
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{config.epochs}", unit="batch", leave=False)
        for images, labels in bar:
            logits = model(images)
            loss = loss_fn(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            seen += len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            loss_sum += loss.item() * len(labels)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{schedule.get_last_lr()[0]:.2e}")
        elapsed = time.perf_counter() - started
        val = summarize(predict(model, data.splits["val"], spec, desc="validating"), data.class_names)
        row = {
            "epoch": epoch,
            "train_loss": loss_sum / seen,
            "train_accuracy": correct / seen,
            "val_accuracy": val["accuracy"],
            "images_per_second": seen / elapsed,
        }
        history.append(row)
        print(
            f"epoch {epoch}/{config.epochs}  loss {row['train_loss']:.4f}  train acc {row['train_accuracy']:.4f}  "
            f"val acc {row['val_accuracy']:.4f}  {row['images_per_second']:.0f} img/s  {elapsed:.0f}s",
            flush=True,
        )
        if val["accuracy"] > best_accuracy:
            best_accuracy = val["accuracy"]
            meta.metrics = {"best_epoch": epoch, "val_accuracy": val["accuracy"]}
            save_checkpoint(out / "checkpoint.pt", model, meta)

    (out / "history.json").write_text(json.dumps(history, indent=2))
    plot_training_curves(history, out / "training_curves.png")
    # Report on the test split with the best checkpoint, and keep the figures in it for export.
    model, meta = load_checkpoint(out / "checkpoint.pt")
    test = write_report(predict(model, data.splits["test"], spec), data.class_names, out, "test")
    meta.metrics.update(test_accuracy=test["accuracy"], test_images=test["images"])
    save_checkpoint(out / "checkpoint.pt", model, meta)
    print(f"checkpoint: {out / 'checkpoint.pt'}  (best epoch {meta.metrics['best_epoch']}, "
          f"val acc {meta.metrics['val_accuracy']:.4f}, test acc {test['accuracy']:.4f})")
    return meta.metrics
