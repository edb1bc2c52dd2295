"""Copies of a published version that tests alter: by hand (what SHA256SUMS must catch), or as a
consistent but wrong publish (checksums rewritten: what only the golden answers can catch)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from histoserve.formats.repository_layout import config_to_text, read_config
from histoserve.formats.signing import sign_version
from histoserve.formats.version import (
    CHECKSUMS_FILE,
    GOLDEN_FILE,
    IDENTITY_FILE,
    VERSION_CONFIG,
    VERSION_CPU_CONFIG,
    identity_json,
    write_checksums,
)
from tests.publisher_keys import session_publisher


def copy_model(repository: Path, model: str, store: Path, name: str | None = None) -> Path:
    """`repository/model` copied to `store/name` with its files writable; returns the model folder.
    Under another name, the configs and golden answers of every version are renamed too."""
    target = store / (name or model)
    shutil.copytree(repository / model, target)
    for path in target.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    if name and name != model:
        for config_file in [target / "config.pbtxt", *target.glob("configs/*.pbtxt"), *target.glob(f"*/{VERSION_CONFIG}"),
                            *target.glob(f"*/{VERSION_CPU_CONFIG}")]:
            config = read_config(config_file)
            config.name = name
            config_file.write_text(config_to_text(config))
        for golden in target.glob(f"*/{GOLDEN_FILE}"):
            golden.write_text(json.dumps({**json.loads(golden.read_text()), "model": name}))
        for version in target.iterdir():
            if (version / CHECKSUMS_FILE).is_file():
                (version / IDENTITY_FILE).write_text(identity_json(name, int(version.name)))
                republish(version)
    return target


def copy_version(model_dir: Path, source: int, target: int) -> Path:
    """Version `source` published again as `target` (its golden answers and baseline renumbered)."""
    folder = model_dir / str(target)
    shutil.copytree(model_dir / str(source), folder)
    for path in folder.iterdir():
        os.chmod(path, 0o644)
    for name in (GOLDEN_FILE, "drift_baseline.json"):
        path = folder / name
        path.write_text(json.dumps({**json.loads(path.read_text()), "version": target}))
    (folder / IDENTITY_FILE).write_text(identity_json(model_dir.name, target))
    republish(folder)
    return folder


def republish(version_folder: Path) -> None:
    """SHA256SUMS rewritten for what the folder holds now, and signed again by the session's trusted
    publisher: a wrong version that checks out (a trusted writer's mistake: only the golden answers
    can tell)."""
    write_checksums(version_folder)
    sign_version(version_folder, session_publisher()[0].private)


def scale_head(version_folder: Path, factor: float) -> None:
    """Multiply the classifier head (the last Gemm's weights and bias) by `factor`: every logit is
    scaled, so the top-1 class stays and the probabilities move (a wrong temperature, in effect)."""
    path = version_folder / "model.onnx"
    model = onnx.load(path)
    gemm = [node for node in model.graph.node if node.op_type == "Gemm"][-1]
    initializers = {init.name: init for init in model.graph.initializer}
    for name in gemm.input[1:3]:
        tensor = initializers[name]
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(factor), name))
    onnx.save(model, path)


def perturb_weights(version_folder: Path, scale: float = 1.0, seed: int = 0) -> None:
    """Gaussian noise of `scale` × each tensor's spread on every convolution and the head: a damaged
    model that still loads and answers (a bad export, a bit flip in the store before checksums)."""
    path = version_folder / "model.onnx"
    model = onnx.load(path)
    rng = np.random.default_rng(seed)
    for tensor in model.graph.initializer:
        values = numpy_helper.to_array(tensor)
        if values.dtype == np.float32 and values.ndim >= 2:
            noisy = values + rng.normal(0, scale * float(values.std() or 1), values.shape).astype(np.float32)
            tensor.CopyFrom(numpy_helper.from_array(noisy, tensor.name))
    onnx.save(model, path)


def swap_labels(version_folder: Path, first: int = 0, second: int = 1) -> None:
    path = version_folder / "labels.txt"
    labels = path.read_text().splitlines()
    labels[first], labels[second] = labels[second], labels[first]
    path.write_text("".join(f"{label}\n" for label in labels))
