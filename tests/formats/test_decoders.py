"""The faster decoders take over only where they give Pillow's very pixels: libspng for 8-bit RGB,
RGBA and greyscale PNGs, libjpeg-turbo (simplejpeg) for RGB JPEGs without an orientation."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageOps, PngImagePlugin

from histoserve.formats import preprocessing
from histoserve.formats.preprocessing import fast_pixels, load_image, to_rgb
from tests.odd_images import _scene, png_header_only, write_odd_images


def pillow_only(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return np.asarray(to_rgb(ImageOps.exif_transpose(image)))


def encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def with_orientation(image: Image.Image, format: str, **options) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(image, format, exif=exif.tobytes(), **options)


def with_orientation_elsewhere(image: Image.Image, where: str) -> bytes:
    """A PNG whose orientation 6 Pillow applies, recorded where a byte search for `eXIf` misses it:
    XMP text, ImageMagick's compressed "Raw profile type exif", or an eXIf chunk after the pixels."""
    exif = Image.Exif()
    exif[0x0112] = 6
    info = PngImagePlugin.PngInfo()
    if where == "xmp":
        info.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>')
    elif where == "raw profile":
        raw = exif.tobytes()
        info.add_text("Raw profile type exif", f"\nexif\n{len(raw):8}\n{raw.hex()}\n", zip=True)
    data = encoded(image, "PNG", pnginfo=info)
    if where == "after the pixels":
        body = exif.tobytes()[6:]  # without the "Exif\0\0" of the JPEG segment
        chunk = struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body))
        data = data[:-12] + chunk + data[-12:]  # before IEND
    return data


def with_harmless_chunks(image: Image.Image) -> bytes:
    """Colour-management, resolution, time, background and text chunks: Pillow applies none of them."""
    info = PngImagePlugin.PngInfo()
    info.add(b"gAMA", struct.pack(">I", 45455))
    info.add(b"cHRM", struct.pack(">8I", 31270, 32900, 64000, 33000, 30000, 60000, 15000, 6000))
    info.add(b"bKGD", struct.pack(">3H", 255, 0, 0))
    info.add(b"tIME", struct.pack(">HBBBBB", 2026, 11, 30, 12, 0, 0))
    info.add_text("Comment", "scanned at 40x")
    info.add_itxt("Description", "H&E", zip=True)
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return encoded(image, "PNG", pnginfo=info, dpi=(300, 300), icc_profile=profile)


RGB = Image.fromarray(_scene(700, 460, 3))
CASES = {  # name → (file bytes, the decoder that must take it)
    "png rgb": (encoded(RGB, "PNG"), "pyspng"),
    "png rgba": (encoded(RGB.convert("RGBA"), "PNG"), "pyspng"),
    "png grey": (encoded(RGB.convert("L"), "PNG"), "pyspng"),
    "png palette": (encoded(RGB.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), "pillow"),
    "png 16-bit grey": (encoded(Image.fromarray(_scene(64, 48, 4)[..., 0].astype(np.uint16) * 257), "PNG"), "pillow"),
    "png colour key": (encoded(RGB, "PNG", transparency=(0, 0, 0)), "pillow"),
    "png rotated": (with_orientation(RGB, "PNG"), "pillow"),
    "png rotated in xmp": (with_orientation_elsewhere(RGB, "xmp"), "pillow"),
    "png rotated in a raw profile": (with_orientation_elsewhere(RGB, "raw profile"), "pillow"),
    "png rotated after the pixels": (with_orientation_elsewhere(RGB, "after the pixels"), "pillow"),
    "png harmless chunks": (with_harmless_chunks(RGB), "pyspng"),
    "jpeg 4:2:0": (encoded(RGB, "JPEG", quality=90, subsampling=2), "simplejpeg"),
    "jpeg 4:2:2": (encoded(RGB, "JPEG", quality=90, subsampling=1), "simplejpeg"),
    "jpeg 4:4:4": (encoded(RGB, "JPEG", quality=95, subsampling=0), "simplejpeg"),
    "jpeg progressive": (encoded(RGB, "JPEG", quality=85, progressive=True), "simplejpeg"),
    "jpeg odd size": (encoded(RGB.crop((0, 0, 333, 221)), "JPEG", quality=75), "simplejpeg"),
    "jpeg grey": (encoded(RGB.convert("L"), "JPEG", quality=90), "pillow"),
    "jpeg cmyk": (encoded(RGB.convert("CMYK"), "JPEG", quality=90), "pillow"),
    "jpeg rotated": (with_orientation(RGB, "JPEG", quality=90), "pillow"),
    "tiff": (encoded(RGB, "TIFF"), "pillow"),
}


def decoder_of(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as image:
        if fast_pixels(image, data) is None:
            return "pillow"
        return "pyspng" if image.format == "PNG" else "simplejpeg"


@pytest.mark.parametrize("name", list(CASES))
def test_each_file_goes_to_its_decoder_and_gives_pillow_s_pixels(name):
    data, decoder = CASES[name]
    assert decoder_of(data) == decoder
    assert np.array_equal(np.asarray(preprocessing.load_image_bytes(data, name)), pillow_only(data))
    if "rotated" in name:  # the file really is one Pillow turns
        assert pillow_only(data).shape[:2] == (RGB.width, RGB.height)


def test_the_awkward_corpus_decodes_as_pillow_decodes_it(tmp_path):
    for path in write_odd_images(tmp_path).values():
        assert np.array_equal(np.asarray(load_image(path)), pillow_only(path.read_bytes())), path.name


def test_a_file_the_fast_decoder_stumbles_on_is_pillow_s_to_refuse():
    data = CASES["png rgb"][0]
    broken = data[: len(data) // 2] + bytes(4096) + data[len(data) // 2 + 4096:]
    with pytest.raises(preprocessing.ImageLoadError, match="cannot decode image"):
        preprocessing.load_image_bytes(broken, "broken.png")


def test_an_image_over_the_pixel_limit_is_refused_from_its_header():
    """The encoded model's limit: a header announcing 8000×8000 pixels (and no pixel data to decode)
    is refused for its size, where without the limit it gets as far as decoding."""
    header_only = png_header_only(8000, 8000)
    with pytest.raises(preprocessing.ImageLoadError, match=r"^upload: 8000×8000 pixels, over the limit of 50000000"):
        preprocessing.load_image_bytes(header_only, "upload", max_pixels=50_000_000)
    with pytest.raises(preprocessing.ImageLoadError, match="cannot decode image"):
        preprocessing.load_image_bytes(header_only, "upload")
