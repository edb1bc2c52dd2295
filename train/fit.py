"""Training, top to bottom: data → model → AdamW with warmup + cosine → epochs → best checkpoint →
test-split report. Everything export needs goes into the checkpoint."""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from client.preprocessing import PreprocessSpec
from train.augment import training_transform
from train.config import FitConfig
from train.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from train.data import ImageDataset, SplitRatios, drop_unreadable, load_splits
from train.evaluate import plot_training_curves, predict, summarize, write_report
from train.model import IMAGENET_MEAN, IMAGENET_STD, build_classifier, load_backbone_weights


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, steps: int, warmup_steps: int):
    """AdamW (decoupled L2 weight decay); linear warmup, then cosine to zero, stepped per batch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = min(steps - 1, max(1, warmup_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_one_epoch(model, loader, optimizer, schedule, loss_fn, desc: str) -> dict:
    model.train()
    seen, correct, loss_sum = 0, 0, 0.0
    bar = tqdm(loader, desc=desc, unit="batch", leave=False)
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
    return {"train_loss": loss_sum / max(1, seen), "train_accuracy": correct / max(1, seen), "images": seen}


def fit(config: FitConfig) -> dict:
    seed_everything(config.seed)
    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = PreprocessSpec(config.resize_size, config.crop_size, config.interpolation)

    data = load_splits(Path(config.data), SplitRatios(config.val_ratio, config.test_ratio), config.seed, config.fold)
    if not data.splits["train"] or not data.splits["val"]:
        raise ValueError(f"{config.data}: the train and val splits must not be empty ({ {k: len(v) for k, v in data.splits.items()} })")
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
    labels = [s.label for s in data.splits["train"]]
    class_counts = np.maximum(np.bincount(labels, minlength=len(data.class_names)), 1)
    sampler = None
    if config.balance == "sampler":  # every class drawn equally often, with replacement
        weights = torch.tensor(1.0 / class_counts[labels], dtype=torch.double)
        sampler = torch.utils.data.WeightedRandomSampler(weights, len(labels), replacement=True, generator=generator)
    elif config.balance not in ("none", "loss"):
        raise ValueError(f"--balance {config.balance!r} is not one of none, sampler, loss")
    train_loader = torch.utils.data.DataLoader(
        ImageDataset(data.splits["train"], training_transform(config.augment, spec)),
        batch_size=config.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=len(data.splits["train"]) > config.batch_size,
        num_workers=config.workers,
        generator=generator,
    )

    optimizer, schedule = make_optimizer(model, config.lr, config.weight_decay, config.epochs * len(train_loader),
                                         int(config.warmup_epochs * len(train_loader)))
    class_weights = None
    if config.balance == "loss":  # inverse frequency, mean weight 1
        class_weights = torch.tensor(len(labels) / (len(class_counts) * class_counts), dtype=torch.float32)
    loss_fn = nn.CrossEntropyLoss(weight=class_weights)

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
        started = time.perf_counter()
        row = train_one_epoch(model, train_loader, optimizer, schedule, loss_fn, f"epoch {epoch}/{config.epochs}")
        elapsed = time.perf_counter() - started
        val = summarize(predict(model, data.splits["val"], spec, desc="validating"), data.class_names)
        row = {"epoch": epoch, **row, "val_accuracy": val["accuracy"], "images_per_second": row["images"] / elapsed}
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
