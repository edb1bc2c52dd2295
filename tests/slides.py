"""Whole-slide images made in tests: pyramidal, tiled, zlib-compressed TIFFs written with tifffile, with
resolution tags, which OpenSlide reads as vendor `generic-tiff` with `openslide.mpp-x/y` the written
µm per pixel and level-0 pixels identical to those written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image


def write_slide(path: Path, pixels: np.ndarray, mpp: float | None = 0.5, levels: int = 3, tile: int = 128) -> Path:
    """`pixels` (H×W×3 uint8) as level 0 and `levels - 1` halvings (box-filtered by Pillow) as the
    pyramid; mpp None writes no resolution tags."""
    resolution = {} if mpp is None else {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path, bigtiff=False) as tiff:
        image = pixels
        for level in range(levels):
            scale = 2 ** level
            if level:
                image = np.asarray(Image.fromarray(pixels).resize((pixels.shape[1] // scale, pixels.shape[0] // scale),
                                                                  Image.Resampling.BOX))
                level_resolution = {} if mpp is None else {"resolution": (1e4 / (mpp * scale), 1e4 / (mpp * scale)),
                                                           "resolutionunit": "CENTIMETER"}
            else:
                level_resolution = resolution
            tiff.write(image, tile=(tile, tile), compression="zlib", photometric="rgb",
                       subfiletype=1 if level else 0, **level_resolution)
    return path


def background(height: int, width: int, value: int = 242) -> np.ndarray:
    """Blank glass: near-white, unsaturated."""
    return np.full((height, width, 3), value, np.uint8)
