"""Training-time augmentation presets, by name (`fit --augment NAME`). Each maps a PIL RGB image to a
uint8 (3, crop, crop) tensor; normalization stays in the model.

- `none`: exactly the evaluation path (the client's preprocessing): train on what is served.
- `light`: small crops, rotations and shifts, no flips: safe for any content, digits included.
- `seed`: the original pipeline's Keras ImageDataGenerator (rotation 30°, shifts 0.2, zoom,
  horizontal flip).
- `histology`: orientation-free tissue: 90° rotations, both flips, random resized crop, colour
  jitter and H&E stain jitter (Tellez et al. 2018: scale and shift in haematoxylin-eosin-DAB
  optical-density space).

`python -m histoserve.train augment-preview` renders any preset on real images as a PNG grid.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from histoserve.formats.preprocessing import INTERPOLATIONS, PreprocessSpec, preprocess_image

# Ruifrok & Johnston's stain vectors (rows: haematoxylin, eosin, DAB), as scikit-image uses them.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)


class HEDJitter(torch.nn.Module):
    """Multiply each stain's optical density by U(1-σ, 1+σ) and add U(-σ, σ); uint8 CHW in and out."""

    def __init__(self, sigma: float = 0.03):
        super().__init__()
        self.sigma = sigma

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        rgb = image.permute(1, 2, 0).double().numpy()
        optical_density = -np.log((rgb + 1.0) / 256.0)
        stains = optical_density @ HED_FROM_RGB
        alpha = 1.0 + (torch.rand(3, dtype=torch.float64).numpy() * 2 - 1) * self.sigma
        beta = (torch.rand(3, dtype=torch.float64).numpy() * 2 - 1) * self.sigma
        rgb = 256.0 * np.exp(-((stains * alpha + beta) @ RGB_FROM_HED)) - 1.0
        return torch.from_numpy(np.clip(np.rint(rgb), 0, 255).astype(np.uint8)).permute(2, 0, 1).contiguous()


class RandomRotate90(torch.nn.Module):
    """Rotate by 0, 90, 180 or 270 degrees: no interpolation, no corners filled in."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.rot90(image, k=int(torch.randint(0, 4, ())), dims=(-2, -1)).contiguous()


def evaluation_transform(spec: PreprocessSpec) -> Callable[[Image.Image], torch.Tensor]:
    def transform(image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(preprocess_image(image, spec))

    return transform


def _light(spec: PreprocessSpec):
    return v2.Compose([
        v2.RandomResizedCrop(spec.crop_size, scale=(0.6, 1.0), ratio=(0.85, 1.18),
                             interpolation=INTERPOLATIONS[spec.interpolation]),
        v2.RandomAffine(degrees=12, translate=(0.06, 0.06)),
        v2.PILToTensor(),
    ])


def _seed(spec: PreprocessSpec):
    interpolation = INTERPOLATIONS[spec.interpolation]
    return v2.Compose([
        v2.Resize(spec.resize_size, interpolation=interpolation),
        v2.CenterCrop(spec.crop_size),
        v2.RandomAffine(degrees=30, translate=(0.2, 0.2), scale=(0.8, 1.2), interpolation=v2.InterpolationMode.BILINEAR),
        v2.RandomHorizontalFlip(),
        v2.PILToTensor(),
    ])


def _histology(spec: PreprocessSpec):
    return v2.Compose([
        v2.RandomResizedCrop(spec.crop_size, scale=(0.5, 1.0), ratio=(0.8, 1.25),
                             interpolation=INTERPOLATIONS[spec.interpolation]),
        v2.PILToTensor(),
        RandomRotate90(),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.1, hue=0.03),
        HEDJitter(sigma=0.03),
    ])


PRESETS: dict[str, Callable[[PreprocessSpec], Callable[[Image.Image], torch.Tensor]]] = {
    "none": evaluation_transform,
    "light": _light,
    "seed": _seed,
    "histology": _histology,
}


def training_transform(name: str, spec: PreprocessSpec) -> Callable[[Image.Image], torch.Tensor]:
    if name not in PRESETS:
        raise ValueError(f"--augment {name!r} is not one of {', '.join(PRESETS)}")
    return PRESETS[name](spec)


def render_preview(paths: list, preset: str, spec: PreprocessSpec, out, samples: int = 6, seed: int = 0) -> None:
    """A grid: one row per image, its evaluation view first, then `samples` draws of the preset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from histoserve.formats.preprocessing import load_image

    torch.manual_seed(seed)
    transform, reference = training_transform(preset, spec), evaluation_transform(spec)
    figure, axes = plt.subplots(len(paths), samples + 1, figsize=(1.6 * (samples + 1), 1.6 * len(paths)), squeeze=False)
    for row, path in enumerate(paths):
        image = load_image(path)
        views = [reference(image)] + [transform(image) for _ in range(samples)]
        for column, view in enumerate(views):
            axis = axes[row][column]
            axis.imshow(view.permute(1, 2, 0).numpy())
            axis.set_xticks([]), axis.set_yticks([])
            if row == 0:
                axis.set_title("evaluated" if column == 0 else f"{preset} #{column}", fontsize=8)
    figure.suptitle(f"augmentation preset '{preset}' at {spec.crop_size}×{spec.crop_size}")
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
