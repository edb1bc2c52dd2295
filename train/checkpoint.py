"""The checkpoint: everything export needs to rebuild, check and publish the model, in one file."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from histoserve.formats.files import write_atomically
from histoserve.formats.preprocessing import PreprocessSpec
from histoserve.train.config import SplitRatios
from histoserve.train.data import DataSplits, load_splits
from histoserve.train.model import Classifier, build_classifier

FORMAT = "histoserve-checkpoint/1"


@dataclass
class CheckpointMeta:
    arch: str
    class_names: list[str]
    preprocess: PreprocessSpec
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dropout: float
    data_root: str
    split_seed: int
    temperature: float = 1.0
    metrics: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    data_sha256: str = ""  # the training data as fit found it (train/data.py data_digest): the provenance names it


def save_checkpoint(path: Path, model: Classifier, meta: CheckpointMeta) -> None:
    payload = {"format": FORMAT, "model_state": model.state_dict(), **asdict(meta)}
    payload["preprocess"] = asdict(meta.preprocess)
    save_atomically(payload, Path(path))


def save_atomically(payload: dict, path: Path) -> None:
    """torch.save, renamed into place: never a half-written file (formats/files.py)."""
    write_atomically(path, lambda handle: torch.save(payload, handle))


def load_checkpoint(path: Path) -> tuple[Classifier, CheckpointMeta]:
    """The classifier in eval mode and its metadata."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} checkpoint written by `python -m histoserve.train fit`")
    state = payload.pop("model_state")
    payload.pop("format")
    payload["preprocess"] = PreprocessSpec(**payload["preprocess"])
    payload["mean"], payload["std"] = tuple(payload["mean"]), tuple(payload["std"])
    meta = CheckpointMeta(**payload)
    model = build_classifier(meta.arch, len(meta.class_names), meta.dropout, mean=meta.mean, std=meta.std)
    model.load_state_dict(state)
    return model.eval(), meta


def training_splits(meta: CheckpointMeta, data_root: str | os.PathLike | None = None) -> DataSplits:
    """The splits the run was trained on, rebuilt from what its checkpoint recorded (data, ratios,
    seed, fold), for evaluation and export's parity images. `data_root` overrides the recorded path."""
    ratios = SplitRatios(meta.config.get("val_ratio", SplitRatios.val), meta.config.get("test_ratio", SplitRatios.test))
    return load_splits(Path(data_root or meta.data_root), ratios, meta.split_seed, meta.config.get("fold", -1))
