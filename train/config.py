"""Training options as one dataclass: `python -m train fit --help` is generated from it, and the
resolved values are stored in every checkpoint. Kept free of torch so the CLI starts fast."""

from __future__ import annotations

from dataclasses import dataclass

ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "resnet101")


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
    balance: str = "none"  # none | sampler (weighted sampler) | loss (class-weighted loss)
    fold: int = -1  # K-fold manifests: the validation fold
    seed: int = 0
    val_ratio: float = 0.15
    test_ratio: float = 0.15
    workers: int = 0
    threads: int = 0  # 0: one per core
