"""The one preprocessing implementation: decode → RGB → resize shorter side → center crop → uint8 CHW.

Training's evaluation path, the export parity gate, the gRPC client and the load test all call these
functions, so what the served model receives is pixel for pixel what it was evaluated on. The geometry
matches torchvision's ``Resize(resize_size)`` followed by ``CenterCrop(crop_size)`` on a PIL image.
Normalization (mean/std) is *not* here: it is the first layer of the model.

Only numpy and Pillow: importing this module must never import torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


def find_images(folder: str | os.PathLike) -> list[Path]:
    """The image files below `folder` (any depth, by suffix), sorted; hidden files and folders (a
    leading dot, such as export's staging folders or .DS_Store) are skipped. The one rule every stage
    uses to turn a folder into images."""
    root = Path(folder)
    return sorted(path for path in root.rglob("*")
                  if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
                  and not any(part.startswith(".") for part in path.relative_to(root).parts))

# Names as torchvision's InterpolationMode values, so a spec reads the same on both sides.
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


class ImageLoadError(ValueError):
    """A file that cannot be turned into an image; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class PreprocessSpec:
    """Geometry of the serving contract; written to config.pbtxt `parameters` by export."""

    resize_size: int
    crop_size: int
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation {self.interpolation!r} is not one of {sorted(INTERPOLATIONS)}"
            )
        if not 0 < self.crop_size <= self.resize_size:
            raise ValueError(
                f"need 0 < crop_size <= resize_size, got crop_size={self.crop_size} "
                f"resize_size={self.resize_size}"
            )

    def to_parameters(self) -> dict[str, str]:
        return {
            "resize_size": str(self.resize_size),
            "crop_size": str(self.crop_size),
            "interpolation": self.interpolation,
            "color_mode": "RGB",
        }

    @classmethod
    def from_parameters(cls, parameters: dict[str, str]) -> PreprocessSpec:
        missing = [k for k in ("resize_size", "crop_size") if k not in parameters]
        if missing:
            raise ValueError(
                f"model config parameters lack {missing}: was this model exported by `python -m export`?"
            )
        return cls(
            resize_size=int(parameters["resize_size"]),
            crop_size=int(parameters["crop_size"]),
            interpolation=parameters.get("interpolation", "bilinear"),
        )


def load_image(path: str | os.PathLike) -> Image.Image:
    """Fully decode a file into an RGB image with its EXIF orientation applied.

    `Image.open` only reads the header; `load()` decodes every pixel, so truncated files fail here,
    with the file named, instead of deep inside a batch.
    """
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except Image.DecompressionBombError as error:
        raise ImageLoadError(path, f"refused as a decompression bomb ({error})") from error
    except FileNotFoundError as error:
        raise ImageLoadError(path, "no such file") from error
    except IsADirectoryError as error:
        raise ImageLoadError(path, "is a directory") from error
    except (OSError, SyntaxError, ValueError) as error:
        # Pillow raises UnidentifiedImageError (an OSError) for non-images, OSError for truncation.
        reason = str(error) or type(error).__name__
        if os.path.exists(path) and os.path.getsize(path) == 0:
            reason = "empty file (0 bytes)"
        raise ImageLoadError(path, f"cannot decode image: {reason}") from error


def to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, palette, CMYK and 16-bit images become 8-bit RGB. Alpha is discarded: a transparent
    pixel keeps the colour stored under it (not composited onto black or white)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits instead of letting Pillow clip at 255.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def resize_and_center_crop(image: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """torchvision's Resize(spec.resize_size) then CenterCrop(spec.crop_size), on a PIL image."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = spec.resize_size, int(spec.resize_size * long / short)
    new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), resample=INTERPOLATIONS[spec.interpolation])
    top = int(round((new_height - spec.crop_size) / 2.0))
    left = int(round((new_width - spec.crop_size) / 2.0))
    return image.crop((left, top, left + spec.crop_size, top + spec.crop_size))


def image_to_chw(image: Image.Image) -> np.ndarray:
    """An RGB PIL image as a contiguous uint8 array of shape (3, H, W): the wire format."""
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def preprocess_image(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    return image_to_chw(resize_and_center_crop(to_rgb(image), spec))


def preprocess_file(path: str | os.PathLike, spec: PreprocessSpec) -> np.ndarray:
    """Decode, resize and crop one file into the (3, crop, crop) uint8 array the model takes."""
    return preprocess_image(load_image(path), spec)
