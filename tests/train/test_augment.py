import numpy as np
import pytest
import torch
from PIL import Image

from histoserve.formats.preprocessing import PreprocessSpec, preprocess_image
from histoserve.train.augment import PRESETS, HEDJitter, RandomRotate90, training_transform
from histoserve.train.synthetic import tissue
from tests.conftest import run_cli


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("size", [(64, 64), (90, 50)])
def test_every_preset_returns_uint8_chw_at_the_crop_size(preset, size):
    torch.manual_seed(0)
    spec = PreprocessSpec(72, 64)
    out = training_transform(preset, spec)(tissue(1).resize(size))
    assert out.dtype == torch.uint8 and tuple(out.shape) == (3, 64, 64)


@pytest.mark.parametrize("preset", ["light", "seed", "histology"])
def test_random_presets_vary_and_none_is_the_evaluation_path(preset):
    image, spec = tissue(2), PreprocessSpec(72, 64)
    torch.manual_seed(0)
    draws = [training_transform(preset, spec)(image) for _ in range(3)]
    assert not torch.equal(draws[0], draws[1])
    np.testing.assert_array_equal(training_transform("none", spec)(image).numpy(), preprocess_image(image, spec))


def test_hed_jitter_without_noise_is_the_identity_and_with_noise_shifts_colour():
    image = torch.from_numpy(np.array(tissue(3))).permute(2, 0, 1).contiguous()
    assert torch.equal(HEDJitter(sigma=0.0)(image), image)
    torch.manual_seed(0)
    jittered = HEDJitter(sigma=0.2)(image)
    assert jittered.dtype == torch.uint8 and not torch.equal(jittered, image)


def test_rotate90_turns_by_a_random_multiple_of_90_degrees():
    image = torch.arange(3 * 4 * 4, dtype=torch.uint8).reshape(3, 4, 4)
    torch.manual_seed(1)
    turns = []
    for _ in range(40):
        rotated = RandomRotate90()(image)
        [k] = [k for k in range(4) if torch.equal(rotated, torch.rot90(image, k, dims=(1, 2)))]
        turns.append(k)
    assert set(turns) == {0, 1, 2, 3}  # every quarter turn occurs; the identity alone would not pass


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="histology"):
        training_transform("nope", PreprocessSpec(36, 32))


def test_preview_command_renders_a_grid(tmp_path):
    for i in range(2):
        tissue(10 + i).save(tmp_path / f"tile{i}.png")
    run_cli("-m", "histoserve.train", "augment-preview", tmp_path, "--preset", "histology", "--out", tmp_path / "grid.png",
            "--resize-size", 72, "--crop-size", 64, "--samples", 3)
    preview = Image.open(tmp_path / "grid.png")
    assert preview.format == "PNG" and preview.width > preview.height


def test_every_augment_choice_of_the_cli_has_a_preset():
    from histoserve.train.config import AUGMENT_PRESETS

    assert tuple(PRESETS) == AUGMENT_PRESETS
