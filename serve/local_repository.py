"""A local derivative of the production model repository that the pip-installable Triton can run.

Production configs say `backend: "onnxruntime"` and `KIND_GPU`; this Triton build has neither. Each
model becomes a python-backend model (serve/onnxruntime_model.py) that runs the *same* model.onnx
(linked, not copied) on the CPU. Everything else in config.pbtxt — tensors, max_batch_size,
dynamic batching, warmup, labels, the preprocessing parameters — is kept as written.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from export.repository import LABELS_FILE, MODEL_FILE, config_to_text, read_config, versions

PYTHON_MODEL = Path(__file__).with_name("onnxruntime_model.py")


class LocalRepositoryError(RuntimeError):
    pass


def derive_local_repository(repository: Path, target: Path) -> list[str]:
    """Write the CPU/python-backend derivative of `repository` into `target`; returns model names."""
    repository, target = Path(repository).resolve(), Path(target)
    if not repository.is_dir():
        raise LocalRepositoryError(f"model repository {repository} does not exist (run `python -m export` first)")
    names = []
    for model_dir in sorted(p for p in repository.iterdir() if (p / "config.pbtxt").is_file()):
        config = read_config(model_dir / "config.pbtxt")
        model_versions = [v for v in versions(model_dir) if (model_dir / str(v) / MODEL_FILE).is_file()]
        if not model_versions:
            raise LocalRepositoryError(f"{model_dir} has no <version>/{MODEL_FILE}")
        if config.backend not in ("onnxruntime", "") or config.platform not in ("onnxruntime_onnx", ""):
            raise LocalRepositoryError(f"{model_dir}: only ONNX models can be served locally, not {config.backend or config.platform}")
        name = config.name or model_dir.name
        out = target / name
        out.mkdir(parents=True)
        config.backend, config.platform = "python", ""
        config.default_model_filename = ""
        del config.instance_group[:]
        config.instance_group.append(mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1))
        config.optimization.ClearField("execution_accelerators")
        (out / "config.pbtxt").write_text(config_to_text(config))
        if (model_dir / LABELS_FILE).is_file():
            os.symlink(model_dir / LABELS_FILE, out / LABELS_FILE)
        for version in model_versions:
            (out / str(version)).mkdir()
            os.symlink(model_dir / str(version) / MODEL_FILE, out / str(version) / MODEL_FILE)
            shutil.copyfile(PYTHON_MODEL, out / str(version) / "model.py")
        names.append(name)
    if not names:
        raise LocalRepositoryError(f"{repository} holds no <model>/config.pbtxt")
    return names
