"""The one preprocessing implementation: decode → RGB → resize shorter side → center crop → uint8 CHW.

Decoding is lossless and exact, so a faster decoder may take over where it gives the very pixels
Pillow gives: 8-bit RGB, RGBA and greyscale PNGs go to libspng (pyspng) when no chunk of theirs
changes a pixel (colour key, orientation), RGB JPEGs to libjpeg-turbo (simplejpeg) when no orientation
is recorded; everything else, and anything a fast decoder stumbles on, is Pillow's
(tests/formats/test_decoders.py holds them to identical pixels).

Training's evaluation path, the export parity gate, the gRPC client and the load test all call these
functions, so what the served model receives is pixel for pixel what it was evaluated on. The geometry
matches torchvision's ``Resize(resize_size)`` followed by ``CenterCrop(crop_size)`` on a PIL image.
Normalization (mean/std) is *not* here: it is the first layer of the model.

Only numpy, Pillow and the two decoders: importing this module must never import torch.
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyspng
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

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
                f"model config parameters lack {missing}: was this model exported by `python -m histoserve.export`?"
            )
        return cls(
            resize_size=int(parameters["resize_size"]),
            crop_size=int(parameters["crop_size"]),
            interpolation=parameters.get("interpolation", "bilinear"),
        )


def load_image(path: str | os.PathLike) -> Image.Image:
    """Fully decode a file into an RGB image with its EXIF orientation applied.

    Every pixel is decoded here, so truncated files fail here, with the file named, instead of deep
    inside a batch.
    """
    return _decode(read_image_file(path), path)


def read_image_file(path: str | os.PathLike) -> bytes:
    """A file's bytes, or ImageLoadError naming why it cannot be read (also for an empty file). What an
    encoded model is sent as it is."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError as error:
        raise ImageLoadError(path, "no such file") from error
    except IsADirectoryError as error:
        raise ImageLoadError(path, "is a directory") from error
    except OSError as error:
        raise ImageLoadError(path, f"cannot read: {error.strerror or error}") from error
    if not data:
        raise ImageLoadError(path, "empty file (0 bytes)")
    return data


def load_image_bytes(data: bytes, name: str = "<bytes>", max_pixels: int | None = None) -> Image.Image:
    """`load_image` for the bytes of a file (what the encoded model receives); `name` goes into errors.
    An image of more than `max_pixels` pixels is refused from its header, before a pixel is decoded."""
    if not data:
        raise ImageLoadError(name, "empty file (0 bytes)")
    return _decode(data, name, max_pixels)


def fast_pixels(image: Image.Image, data: bytes) -> np.ndarray | None:
    """The RGB pixels of an opened (header only) image from a faster exact decoder, or None when this
    file is Pillow's: another format or mode, 16-bit, a colour key, an orientation, or any error."""
    try:
        if image.format == "PNG" and image.mode in ("RGB", "RGBA", "L") and data[24] == 8 and plain_png(data):
            pixels = pyspng.load(data)
            if pixels.ndim == 2:
                return np.repeat(pixels[:, :, None], 3, axis=2)
            return np.ascontiguousarray(pixels[:, :, :3])
        if image.format == "JPEG" and image.mode == "RGB" and image.getexif().get(ORIENTATION, 1) == 1:
            # (Pillow's getexif reads the JPEG's EXIF and XMP orientation from the header it has parsed)
            return simplejpeg.decode_jpeg(data, colorspace="RGB")
    except Exception:  # noqa: BLE001 - a file a fast decoder stumbles on is Pillow's to decode or refuse
        return None
    return None


ORIENTATION = 0x0112  # the EXIF tag
# PNG chunks that change no pixel Pillow gives (colour-management and text chunks Pillow does not
# apply), so libspng's pixels are Pillow's. Any other chunk (tRNS, eXIf, sBIT, an unknown one) sends
# the file to Pillow. Text chunks may carry an orientation Pillow applies: those keywords do too.
PLAIN_PNG_CHUNKS = frozenset({b"IHDR", b"PLTE", b"IDAT", b"IEND", b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"pHYs",
                              b"tIME", b"bKGD", b"tEXt", b"zTXt", b"iTXt"})
ORIENTING_KEYWORDS = (b"XML:com.adobe.xmp", b"Raw profile type exif")


def plain_png(data: bytes) -> bool:
    """Whether every chunk of this PNG is one that changes no pixel: a walk over the chunk headers,
    not a scan of the compressed data (a byte search over a 600 kB tile costs as much as libspng
    saves)."""
    position = 8
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        if kind == b"IEND":
            return True
        if kind not in PLAIN_PNG_CHUNKS:
            return False
        if kind in (b"tEXt", b"zTXt", b"iTXt") and data[position + 8:position + 8 + min(length, 80)].startswith(ORIENTING_KEYWORDS):
            return False
        position += 12 + length
    return False  # truncated: Pillow's to decode or refuse


def _decode(data: bytes, name, max_pixels: int | None = None) -> Image.Image:
    source = io.BytesIO(data)
    try:
        with Image.open(source) as image:  # the header only (and Pillow's decompression-bomb check)
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise ImageLoadError(name, f"{image.width}×{image.height} pixels, over the limit of {max_pixels} "
                                           "(a decompression bomb, or a slide to tile first)")
            pixels = fast_pixels(image, data)
            if pixels is not None and pixels.shape[:2] == (image.height, image.width):
                return Image.fromarray(pixels, "RGB")
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageLoadError(name, f"refused as a decompression bomb ({error})") from error
    except UnidentifiedImageError as error:  # Pillow's own message would show the buffer's repr
        raise ImageLoadError(name, "cannot identify image file: no decoder recognises it") from error
    except (OSError, SyntaxError, ValueError) as error:  # OSError: a truncated or corrupt file
        raise ImageLoadError(name, f"cannot decode image: {str(error) or type(error).__name__}") from error


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


def preprocess_bytes(data: bytes, spec: PreprocessSpec, name: str = "<bytes>", max_pixels: int | None = None) -> np.ndarray:
    """`preprocess_file` for a file's bytes: the encoded model's server-side step runs this."""
    return preprocess_image(load_image_bytes(data, name, max_pixels), spec)
