"""Image files that are real but awkward, made with Pillow: EXIF-rotated, CMYK, 16-bit, palette with
transparency, RGBA, greyscale, huge, tiny, and the other containers (TIFF, BMP, WebP); and files that
are not usable images. Shared by the encoded-model tests (server against client) and the decoder tests."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _scene(width: int, height: int, seed: int = 0, noise: float = 12.0) -> np.ndarray:
    """Smooth gradients with some noise: resizing has work to do."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255.0 / max(width - 1, 1), y * 255.0 / max(height - 1, 1), (x + y) * 127.0 / max(width + height, 1)], -1)
    return np.clip(base + (rng.normal(0, noise, base.shape) if noise else 0), 0, 255).astype(np.uint8)


def write_odd_images(folder: Path) -> dict[str, Path]:
    """name → file, each decodable, each a different path through decoding."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}

    def save(name: str, image: Image.Image, **options) -> None:
        files[name] = folder / name
        image.save(files[name], **options)

    rgb = Image.fromarray(_scene(70, 46))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    save("exif_rotated.jpg", rgb, quality=92, exif=exif.tobytes())
    save("cmyk.jpg", rgb.convert("CMYK"), quality=90)
    save("plain.jpg", Image.fromarray(_scene(700, 460, 1)), quality=90)
    gray16 = (_scene(60, 40, 2)[..., 0].astype(np.uint16) * 257)
    save("gray16.png", Image.fromarray(gray16))  # uint16: mode I;16
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    save("palette_transparent.png", palette, transparency=0)
    rgba = Image.fromarray(np.dstack([_scene(50, 64, 3), np.linspace(0, 255, 50 * 64).reshape(64, 50).astype(np.uint8)]), "RGBA")
    save("rgba.png", rgba)
    save("gray.png", Image.fromarray(_scene(48, 48, 4)[..., 1], mode="L"))
    save("huge.png", Image.fromarray(_scene(4000, 3000, 5, noise=0)))  # 12 megapixels, smooth: about 1 MB
    save("tiny.png", Image.fromarray(_scene(3, 2, 6)))
    save("slide_patch.png", Image.fromarray(_scene(700, 460, 7)))
    save("lzw.tiff", Image.fromarray(_scene(64, 40, 8)), compression="tiff_lzw")
    save("plain.bmp", Image.fromarray(_scene(33, 57, 9)))
    save("lossless.webp", Image.fromarray(_scene(40, 30, 10)), lossless=True)
    return files


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height and whose data is a few bytes: what a decompression bomb
    looks like before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def unusable_files(good_png: Path) -> dict[str, tuple[bytes, str]]:
    """name → (file bytes, a phrase the refusal must contain). `good_png`: a PNG of some size (its
    compressed pixels are what truncation and corruption hit)."""
    data = good_png.read_bytes()
    middle = len(data) // 2
    return {
        "not_an_image": (b"patient id 1234, not an image", "cannot identify image file"),
        "empty": (b"", "empty file"),
        "truncated": (data[:middle], "cannot decode image"),
        "corrupt": (data[:middle] + bytes(4096) + data[middle + 4096:], "cannot decode image"),
        "over_the_pixel_limit": (png_header_only(8000, 8000), "pixels, over the limit"),
        "decompression_bomb": (png_header_only(60000, 60000), "decompression bomb"),
    }
