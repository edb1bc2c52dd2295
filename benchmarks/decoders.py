"""Decoders for the client and the encoded model's server-side step, on a 700×460 H&E-coloured tile:
milliseconds per file on one thread and whether the pixels equal Pillow's, in one run.

    .venv/bin/python benchmarks/decoders.py            # the decoders the package installs
    pip install imagecodecs PyTurboJPEG                # (a scratch venv: imagecodecs needs numpy 2)
    python benchmarks/decoders.py                      # adds their rows; PyTurboJPEG needs libturbojpeg0

Decoding is lossless for PNG and deterministic for a given libjpeg-turbo and its settings, so a
decoder is worth adopting where it is faster *and* every pixel is Pillow's: the package takes libspng
(pyspng) for PNG and simplejpeg for JPEG (formats/preprocessing.py). Decoders not installed are
listed as such; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from histoserve.formats.preprocessing import fast_pixels
from histoserve.train.synthetic import tissue


def tiles(count: int) -> dict[str, list[bytes]]:
    """`count` different 700×460 tiles, as Pillow writes PNG (default compression) and JPEG (q 90)."""
    out: dict[str, list[bytes]] = {"PNG": [], "JPEG": []}
    for seed in range(count):
        image = tissue(seed, 700).crop((0, 120, 700, 580))
        for format, options in (("PNG", {}), ("JPEG", {"quality": 90})):
            buffer = io.BytesIO()
            image.save(buffer, format=format, **options)
            out[format].append(buffer.getvalue())
    return out


def pillow(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def package(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        pixels = fast_pixels(image, data)
        assert pixels is not None, "the package left this file to Pillow"
        return pixels


def candidates() -> dict[str, dict[str, Callable[[bytes], np.ndarray] | str]]:
    """format → decoder name → decode function, or why it cannot run here."""
    found: dict[str, dict[str, Callable[[bytes], np.ndarray] | str]] = {
        "PNG": {"Pillow": pillow, "pyspng (libspng), as the package calls it": package},
        "JPEG": {"Pillow": pillow, "simplejpeg (libjpeg-turbo), as the package calls it": package},
    }
    try:
        import imagecodecs
        found["PNG"]["imagecodecs png_decode (libpng)"] = imagecodecs.png_decode
        found["PNG"]["imagecodecs spng_decode (libspng)"] = imagecodecs.spng_decode
        found["JPEG"]["imagecodecs jpeg8_decode (libjpeg-turbo)"] = imagecodecs.jpeg8_decode
    except ImportError:
        for format in found:
            found[format]["imagecodecs"] = "not installed"
    try:
        from turbojpeg import TJPF_RGB, TurboJPEG
        decoder = TurboJPEG()
        found["JPEG"]["PyTurboJPEG (libjpeg-turbo)"] = lambda data: decoder.decode(data, pixel_format=TJPF_RGB)
    except (ImportError, RuntimeError, OSError) as error:  # RuntimeError/OSError: no libturbojpeg on the system
        found["JPEG"]["PyTurboJPEG"] = f"not usable: {str(error).splitlines()[0]}"
    return found


def ms_per_file(decode: Callable[[bytes], np.ndarray], files: list[bytes], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for data in files:
            decode(data)
        times.append((time.perf_counter() - started) * 1000 / len(files))
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    files = tiles(args.tiles)
    print(f"{args.tiles} tiles of 700×460: PNG {np.mean([len(d) for d in files['PNG']]) / 1e3:.0f} kB, "
          f"JPEG q90 {np.mean([len(d) for d in files['JPEG']]) / 1e3:.0f} kB on average; one thread\n")
    print(f"{'format':6} {'decoder':52} {'ms/file':>8} {'÷ Pillow':>9}  pixels")
    for format, decoders in candidates().items():
        reference = [pillow(data) for data in files[format]]
        baseline = ms_per_file(pillow, files[format], args.repeats)
        for name, decode in decoders.items():
            if isinstance(decode, str):
                print(f"{format:6} {name:52} {'-':>8} {'-':>9}  {decode}")
                continue
            identical = all(np.array_equal(np.asarray(decode(data))[..., :3], expected)
                            for data, expected in zip(files[format], reference, strict=True))
            took = baseline if decode is pillow else ms_per_file(decode, files[format], args.repeats)
            print(f"{format:6} {name:52} {took:8.2f} {baseline / took:8.2f}×  "
                  f"{'identical to Pillow' if identical else 'DIFFERENT from Pillow'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
