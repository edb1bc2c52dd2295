"""The trained module: uint8 NCHW in, logits out, with mean/std normalization as its first layer.

Because normalization is part of the module, the exported ONNX graph is exactly what was trained and
the client only ever sends uint8 pixels (the serving contract in the README).
"""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from histoserve.train.config import ARCHITECTURES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsUnavailableError(ValueError):
    """Pretrained weights could not be fetched or read; the message says what to do instead."""


class Normalize(nn.Module):
    """uint8 pixels in [0, 255] → float, (x / 255 - mean) / std, folded into one affine step."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("offset", torch.tensor(mean).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("scale", 1.0 / (torch.tensor(std).view(1, -1, 1, 1) * 255.0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.offset) * self.scale


class Classifier(nn.Module):
    """Normalization + a torchvision ResNet whose head is dropout + linear. Returns logits."""

    def __init__(self, backbone: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(images))


def build_classifier(
    arch: str,
    num_classes: int,
    dropout: float = 0.2,
    backbone_state: dict[str, torch.Tensor] | None = None,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> Classifier:
    """A ResNet with `backbone_state` loaded (all but its head), and a fresh dropout + linear head."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"--arch {arch!r} is not one of {', '.join(ARCHITECTURES)}")
    backbone = models.get_model(arch, weights=None)
    if backbone_state is not None:
        state = {k: v for k, v in backbone_state.items() if not k.startswith("fc.")}
        try:
            result = backbone.load_state_dict(state, strict=False)
        except RuntimeError as error:  # tensor shapes differ
            first = str(error).split("\n\t")[1] if "\n\t" in str(error) else str(error)
            raise WeightsUnavailableError(f"the weights do not fit {arch} ({first}); is --arch right?") from None
        missing = [k for k in result.missing_keys if not k.startswith("fc.")]
        if missing or result.unexpected_keys:
            raise WeightsUnavailableError(
                f"the weights do not fit {arch}: missing {missing[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}; is --arch right?"
            )
    backbone.fc = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(backbone.fc.in_features, num_classes))
    return Classifier(backbone, mean, std)


def load_backbone_weights(arch: str, weights: str, cache_dir: str | None = None) -> dict | None:
    """Resolve `--weights`: 'none', a local file, or a torchvision weights name.

    A torchvision name ('IMAGENET1K_V2', 'DEFAULT' or 'ResNet50_Weights.IMAGENET1K_V2') is downloaded
    once into `cache_dir` (default: $TORCH_HOME/hub/checkpoints) and read from there afterwards.
    """
    if weights.lower() == "none":
        return None
    path = Path(weights).expanduser()
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt") or path.exists():
        return _read_state_file(path)
    entry = _torchvision_weights(arch, weights)
    cache_dir = cache_dir or os.path.join(torch.hub.get_dir(), "checkpoints")
    file_name = os.path.basename(entry.url)
    try:
        return entry.get_state_dict(progress=True, model_dir=cache_dir, weights_only=True)
    except (urllib.error.URLError, OSError, ConnectionError) as error:
        raise WeightsUnavailableError(
            f"could not download {type(entry).__name__}.{entry.name} from {entry.url} ({error}).\n"
            f"This machine looks offline. Either:\n"
            f"  - copy {file_name} (fetched on a machine with internet) into {cache_dir}\n"
            f"    (or into a folder you name with --weights-cache), or\n"
            f"  - pass the file itself: --weights /path/to/{file_name}, or\n"
            f"  - train from scratch: --weights none"
        ) from error


def _torchvision_weights(arch: str, name: str):
    try:
        if "." in name:
            return models.get_weight(name)
        return models.get_model_weights(arch)[name]
    except (KeyError, ValueError, AttributeError) as error:
        choices = ", ".join(models.get_model_weights(arch).__members__)
        raise WeightsUnavailableError(
            f"--weights {name!r} is neither a file nor a torchvision weights name for {arch} "
            f"(choices: {choices}, a path to a .pth file, or none)"
        ) from error


def _read_state_file(path: Path) -> dict:
    if not path.is_file():
        raise WeightsUnavailableError(f"--weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad file; all mean the same here
        raise WeightsUnavailableError(f"--weights {path}: not a readable PyTorch state dict ({error})") from error
    for key in ("state_dict", "model"):  # common wrappers around a plain state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsUnavailableError(f"--weights {path}: expected a state dict of tensors")
    return state


class ServingModel(nn.Module):
    """What export writes: the classifier followed by softmax(logits / temperature)."""

    def __init__(self, classifier: Classifier, temperature: float = 1.0):
        super().__init__()
        self.classifier = classifier
        self.temperature = temperature

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.classifier(image) / self.temperature, dim=1)
