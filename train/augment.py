"""Training-time augmentation presets, by name. Each works on PIL RGB images and returns a uint8
(3, crop, crop) tensor; normalization stays in the model.

`none` is exactly the evaluation path (the client's preprocessing), so a run with it trains on what
is served. New presets are one entry in PRESETS.
"""

from __future__ import annotations

from typing import Callable

import torch
from PIL import Image
from torchvision.transforms import v2

from client.preprocessing import INTERPOLATIONS, PreprocessSpec, preprocess_image


def evaluation_transform(spec: PreprocessSpec) -> Callable[[Image.Image], torch.Tensor]:
    def transform(image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(preprocess_image(image, spec))

    return transform


def _light(spec: PreprocessSpec) -> Callable[[Image.Image], torch.Tensor]:
    """Small crops, rotations and shifts: safe for any image content, digits included (no flips)."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(
                spec.crop_size, scale=(0.6, 1.0), ratio=(0.85, 1.18), interpolation=INTERPOLATIONS[spec.interpolation]
            ),
            v2.RandomAffine(degrees=12, translate=(0.06, 0.06)),
            v2.PILToTensor(),
        ]
    )


PRESETS: dict[str, Callable[[PreprocessSpec], Callable[[Image.Image], torch.Tensor]]] = {
    "none": evaluation_transform,
    "light": _light,
}


def training_transform(name: str, spec: PreprocessSpec) -> Callable[[Image.Image], torch.Tensor]:
    if name not in PRESETS:
        raise ValueError(f"--augment {name!r} is not one of {', '.join(PRESETS)}")
    return PRESETS[name](spec)
