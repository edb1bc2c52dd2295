import os

import pytest
import torch
from torchvision import models
from torchvision.transforms import v2

from histoserve.train.model import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Normalize,
    WeightsUnavailableError,
    build_classifier,
    load_backbone_weights,
)


def test_normalize_layer_equals_torchvision_normalize_on_uint8():
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    reference = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(images)
    torch.testing.assert_close(Normalize(IMAGENET_MEAN, IMAGENET_STD)(images), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_classifier_takes_uint8_nchw_and_has_a_dropout_linear_head(arch):
    model = build_classifier(arch, num_classes=5, dropout=0.3).eval()
    assert isinstance(model.backbone.fc[0], torch.nn.Dropout) and model.backbone.fc[0].p == 0.3
    assert model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 5)


def test_weights_from_a_local_file_are_loaded_into_the_backbone(tmp_path):
    source = models.resnet18()
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    model = build_classifier("resnet18", 3, backbone_state=load_backbone_weights("resnet18", str(tmp_path / "resnet18.pth")))
    torch.testing.assert_close(model.backbone.conv1.weight, source.conv1.weight)
    assert model.backbone.fc[1].out_features == 3


def test_torchvision_weights_name_is_read_from_the_cache_without_network(tmp_path, no_network):
    entry = models.ResNet18_Weights.IMAGENET1K_V1
    source = models.resnet18()
    torch.save(source.state_dict(), tmp_path / os.path.basename(entry.url))
    state = load_backbone_weights("resnet18", "IMAGENET1K_V1", cache_dir=str(tmp_path))
    torch.testing.assert_close(state["layer1.0.conv1.weight"], source.layer1[0].conv1.weight)


def test_offline_download_fails_with_a_message_that_says_what_to_do(tmp_path, no_network):
    with pytest.raises(WeightsUnavailableError) as raised:
        load_backbone_weights("resnet50", "ResNet50_Weights.IMAGENET1K_V2", cache_dir=str(tmp_path))
    message = str(raised.value)
    assert "resnet50-11ad3fa6.pth" in message and str(tmp_path) in message
    assert "--weights none" in message and "--weights /path/to/" in message


@pytest.mark.parametrize("weights, message", [
    ("IMAGENET_NOPE", "neither a file nor a torchvision weights name"),
    ("/nonexistent/weights.pth", "no such file"),
])
def test_bad_weights_arguments_are_explained(weights, message):
    with pytest.raises(WeightsUnavailableError, match=message):
        load_backbone_weights("resnet18", weights)


def test_weights_of_another_architecture_are_refused(tmp_path):
    torch.save(models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(WeightsUnavailableError, match="do not fit resnet50"):
        build_classifier("resnet50", 2, backbone_state=load_backbone_weights("resnet50", str(tmp_path / "r18.pth")))


def test_none_means_from_scratch():
    assert load_backbone_weights("resnet50", "none") is None
