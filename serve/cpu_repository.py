"""A local derivative of the production model repository that the pip-installable Triton can run.

Production configs say `backend: "onnxruntime"`; this Triton build does not have it. Each model
becomes a python-backend model (serve/onnxruntime_model.py) that runs the *same* model.onnx (linked,
not copied) on the CPU. The source is the model's CPU config (configs/cpu.pbtxt, what a CPU node
runs; config.pbtxt when there is none). Ensembles and python-backend models (an encoded model and its
preprocessing) run as written. Everything in it — tensors, max_batch_size, instance count,
dynamic batching, warmup, labels, the preprocessing parameters and the onnxruntime backend's thread
parameters, which the python model applies to its session — is kept as written, except the latency
histogram's buckets (`model_metrics`), which this Triton (2.51) cannot read.

`sync_cpu_repository` is idempotent: run again, it adds the versions that `python -m histoserve.export`
published since (each assembled in a hidden folder and renamed into place, as export does), removes
the ones that were deleted, and rewrites a config only when it changed. `python -m histoserve.serve` runs it on
every poll, so a local Triton in poll mode picks up new versions exactly as the pods on Kubernetes
do from their volume.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from histoserve.formats.contract import LABELS_FILE
from histoserve.formats.repository_layout import MODEL_FILE, config_to_text, read_config, versions, write_text_if_changed
from histoserve.formats.version import version_folder

PYTHON_MODEL = Path(__file__).with_name("onnxruntime_model.py")


class CpuRepositoryError(RuntimeError):
    pass


def local_config(config: mc.ModelConfig) -> mc.ModelConfig:
    """The CPU config, run by the python backend on CPU instances."""
    if config.backend not in ("onnxruntime", "") or config.platform not in ("onnxruntime_onnx", ""):
        raise CpuRepositoryError(f"{config.name}: only ONNX models can be served locally, not {config.backend or config.platform}")
    local = mc.ModelConfig()
    local.CopyFrom(config)
    local.backend, local.platform = "python", ""
    local.default_model_filename = ""
    count = sum(group.count or 1 for group in local.instance_group) or 1
    del local.instance_group[:]
    local.instance_group.append(mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=count))
    local.optimization.ClearField("execution_accelerators")
    # Triton 2.51 (the wheel's) predates `model_metrics` (24.11) and refuses a config that has it;
    # without it, only the latency histogram's buckets differ, and 2.51 exports no such histogram
    # for this kind of model anyway.
    local.ClearField("model_metrics")
    return local


def runs_as_written(config: mc.ModelConfig) -> bool:
    """Ensembles and python-backend models (an encoded model and its preprocessing, export/encoded.py)
    run here as exported: their version folders are linked file by file."""
    return config.platform == "ensemble" or config.backend == "python"


def sync_cpu_repository(repository: Path, target: Path) -> list[str]:
    """Make `target` the CPU/python-backend derivative of `repository`; returns the model names."""
    repository, target = Path(repository).resolve(), Path(target)
    if not repository.is_dir():
        raise CpuRepositoryError(f"model repository {repository} does not exist (run `python -m histoserve.export` first)")
    target.mkdir(parents=True, exist_ok=True)
    names = []
    for model_dir in sorted(p for p in repository.iterdir() if (p / "config.pbtxt").is_file()):
        cpu_config = model_dir / "configs" / "cpu.pbtxt"
        config = read_config(cpu_config if cpu_config.is_file() else model_dir / "config.pbtxt")
        as_written = runs_as_written(config)
        published = [v for v in versions(model_dir) if as_written or (model_dir / str(v) / MODEL_FILE).is_file()]
        if not published:
            raise CpuRepositoryError(f"{model_dir} has no <version>/{MODEL_FILE}")
        name = config.name or model_dir.name
        out = target / name
        out.mkdir(exist_ok=True)
        if as_written:
            config.ClearField("model_metrics")  # 2.51 cannot parse it (local_config)
        write_text_if_changed(out / "config.pbtxt", config_to_text(config if as_written else local_config(config)))
        if (model_dir / LABELS_FILE).is_file() and not (out / LABELS_FILE).is_symlink():
            os.symlink(model_dir / LABELS_FILE, out / LABELS_FILE)
        for version in sorted(set(published) - set(versions(out))):
            staging = Path(tempfile.mkdtemp(dir=out, prefix=f".staging-{version}-"))
            if as_written:
                for path in version_folder(repository, model_dir.name, version).iterdir():
                    os.symlink(path, staging / path.name)
            else:
                os.symlink(version_folder(repository, model_dir.name, version) / MODEL_FILE, staging / MODEL_FILE)
                shutil.copyfile(PYTHON_MODEL, staging / "model.py")
            os.chmod(staging, 0o755)
            os.rename(staging, version_folder(target, name, version))
        for version in set(versions(out)) - set(published):
            shutil.rmtree(version_folder(target, name, version))
        names.append(name)
    if not names:
        raise CpuRepositoryError(f"{repository} holds no <model>/config.pbtxt")
    return names

