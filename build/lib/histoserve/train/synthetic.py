"""Histology-like tiles without a dataset: smooth random fields in H&E colours (pink stroma,
purple nuclei). For benchmarks at scale and for tests; nothing here is used to train a real model."""

from __future__ import annotations

import numpy as np
from PIL import Image

PINK, PURPLE = np.array([236, 170, 200]), np.array([120, 60, 150])


def tissue(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    field = Image.fromarray((rng.random((6, 6)) * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    t = np.asarray(field, dtype=np.float64)[..., None] / 255.0
    rgb = PINK * (1 - t) + PURPLE * t + rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
