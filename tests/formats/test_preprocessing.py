import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from histoserve.formats.preprocessing import (
    INTERPOLATIONS,
    ImageLoadError,
    PreprocessSpec,
    find_images,
    load_image,
    preprocess_file,
    preprocess_image,
    resize_and_center_crop,
)
from tests.conftest import make_noise_png, make_truncated_png

SIZES = [(8, 8), (37, 50), (300, 200), (224, 224), (101, 33), (640, 479)]
SPECS = [PreprocessSpec(36, 32), PreprocessSpec(256, 224), PreprocessSpec(64, 64), PreprocessSpec(40, 17)]


def noise_image(size, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"r{s.resize_size}c{s.crop_size}")
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_matches_torchvision_resize_center_crop_pixel_for_pixel(size, spec, interpolation):
    spec = PreprocessSpec(spec.resize_size, spec.crop_size, interpolation)
    image = noise_image(size)
    reference = v2.Compose([
        v2.Resize(spec.resize_size, interpolation=INTERPOLATIONS[interpolation]),
        v2.CenterCrop(spec.crop_size),
        v2.PILToTensor(),
    ])(image)
    ours = preprocess_image(image, spec)
    assert ours.dtype == np.uint8 and ours.shape == (3, spec.crop_size, spec.crop_size)
    assert ours.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(ours, reference.numpy())
    assert resize_and_center_crop(image, spec).size == (spec.crop_size, spec.crop_size)


def palette_image(size, colour):
    image = Image.new("P", size, 0)
    image.putpalette([*colour, *([0] * 765)])
    return image


# mode → (a solid image in that mode, the RGB it must become)
SOLID = {
    "L": (lambda s: Image.new("L", s, 100), (100, 100, 100)),
    "P": (lambda s: palette_image(s, (200, 50, 30)), (200, 50, 30)),
    "RGBA": (lambda s: Image.new("RGBA", s, (10, 20, 30, 0)), (10, 20, 30)),  # transparent: the stored colour stays
    "CMYK": (lambda s: Image.new("CMYK", s, (0, 255, 255, 0)), (255, 0, 0)),  # no cyan, full magenta + yellow: red
    "LA": (lambda s: Image.new("LA", s, (100, 255)), (100, 100, 100)),
    "I;16": (lambda s: Image.fromarray(np.full((s[1], s[0]), 32896, dtype=np.uint16)), (128, 128, 128)),  # scaled, not clipped
    "1": (lambda s: Image.new("1", s, 1), (255, 255, 255)),
}


@pytest.mark.parametrize("mode", list(SOLID))
def test_every_mode_becomes_the_right_rgb_uint8(tmp_path, mode):
    make, rgb = SOLID[mode]
    image = make((40, 30))
    assert image.mode == mode
    path = tmp_path / ("image.tif" if mode == "CMYK" else "image.png")
    image.save(path)
    array = preprocess_file(path, PreprocessSpec(36, 32))
    assert array.shape == (3, 32, 32) and array.dtype == np.uint8
    np.testing.assert_array_equal(array, np.broadcast_to(np.array(rgb, np.uint8)[:, None, None], (3, 32, 32)))


def test_exif_orientation_is_applied(tmp_path):
    image = noise_image((60, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").size == (20, 60)


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_text("not an image at all"), "cannot identify image file"),
        (make_truncated_png, "truncated"),
        (lambda p: None, "no such file"),
    ],
    ids=["empty", "not-an-image", "truncated", "missing"],
)
def test_unreadable_files_raise_an_error_naming_the_file(tmp_path, make, reason):
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(ImageLoadError) as raised:
        load_image(path)
    assert raised.value.path == str(path)
    assert reason in str(raised.value) and str(path) in str(raised.value)


def test_decompression_bomb_is_refused_with_a_clear_reason(tmp_path, monkeypatch):
    path = make_noise_png(tmp_path / "big.png", size=(64, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(path)


@pytest.mark.parametrize("resize, crop, interpolation", [(32, 36, "bilinear"), (36, 0, "bilinear"), (36, 32, "cubic")])
def test_invalid_spec_is_refused(resize, crop, interpolation):
    with pytest.raises(ValueError):
        PreprocessSpec(resize, crop, interpolation)


def test_spec_round_trips_through_config_parameters():
    spec = PreprocessSpec(256, 224, "bicubic")
    assert PreprocessSpec.from_parameters(spec.to_parameters()) == spec
    with pytest.raises(ValueError, match="resize_size"):
        PreprocessSpec.from_parameters({"crop_size": "224"})


def test_training_evaluation_transform_is_the_client_function():
    from histoserve.train.augment import evaluation_transform

    image, spec = noise_image((50, 70)), PreprocessSpec(36, 32)
    tensor = evaluation_transform(spec)(image)
    assert tensor.dtype == torch.uint8
    np.testing.assert_array_equal(tensor.numpy(), preprocess_image(image, spec))


def test_find_images_is_the_one_rule_for_folders(tmp_path):
    for name in ("b/2.PNG", "a/1.jpg", "a/deep/3.tif", "notes.txt", ".hidden.png", "a/.staging-2/4.png", "c.png/d.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)] == ["a/1.jpg", "a/deep/3.tif", "b/2.PNG"]
