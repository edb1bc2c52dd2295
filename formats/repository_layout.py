"""The Triton model repository as every stage reads it, and Triton's own account of it.

Layout (export writes it; Triton, `python -m histoserve.serve`, the monitor and the k8s manifests read it):

    <repository>/<name>/config.pbtxt           (GPU: the default)
    <repository>/<name>/configs/cpu.pbtxt      (the same on CPU: tritonserver --model-config-name=cpu)
    <repository>/<name>/labels.txt
    <repository>/<name>/<version>/model.onnx   (+ drift_baseline.json, formats/baseline.py)

Version folders are positive integers without leading zeros; anything else (export's hidden
`.staging-*` folders) is not a version. Configs are read and written with Triton's protobuf types.
`VersionState` is the rule for reading Triton's repository index (an admin API: see formats/admin.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc

from histoserve.formats.contract import ModelContract
from histoserve.formats.files import write_atomically

MODEL_FILE = "model.onnx"
NAME_PATTERN = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")


class RepositoryError(RuntimeError):
    pass


def contract_of(config: mc.ModelConfig) -> ModelContract:
    """The serving contract a config carries, read exactly as the client reads it from the server."""
    return ModelContract.from_config(json_format.MessageToDict(config, preserving_proto_field_name=True))


def config_to_text(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)


def read_config(path: Path) -> mc.ModelConfig:
    try:
        return text_format.Parse(Path(path).read_text(), mc.ModelConfig())
    except text_format.ParseError as error:
        raise RepositoryError(f"{path}: not a valid Triton model config ({error})") from error


def is_model_name(text: str) -> bool:
    """The rule for a model's name (a folder of the repository, and a Triton model name): NAME_PATTERN
    over the whole text ("digits\\n" is not one)."""
    return NAME_PATTERN.fullmatch(text) is not None


def is_version_name(text: str) -> bool:
    """The rule for a version folder's name: a positive integer in ASCII digits without leading zeros
    ("1", "12"; not "0", "01", "1.0", "١" or export's `.staging-*` folders)."""
    return text.isascii() and text.isdigit() and not text.startswith("0")


def versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and is_version_name(p.name))


def write_text_if_changed(path: Path, text: str) -> None:
    """Rename into place, and only when the content changes: a polling Triton reloads a model whose
    config.pbtxt or labels file was touched."""
    if path.is_file() and path.read_text() == text:
        return
    write_atomically(path, text)


@dataclass(frozen=True)
class VersionState:
    server: str
    # READY, LOADING, UNAVAILABLE (failed to load), UNLOADED (by version policy), OTHER_VERSION (the
    # server serves other versions of the model only: a pod pinned to another one), UNKNOWN,
    # UNREACHABLE, REFUSED (the admin key is missing or wrong)
    state: str
    reason: str = ""
    model: str = ""
    version: str = ""

    @classmethod
    def from_index_entry(cls, server: str, entry: dict) -> VersionState:
        """Triton reports a version the policy unloaded as UNAVAILABLE with reason "unloaded"; only
        the other UNAVAILABLE versions failed to load."""
        state, reason = entry.get("state", "UNKNOWN"), entry.get("reason", "")
        if (state, reason) == ("UNAVAILABLE", "unloaded"):
            state = "UNLOADED"
        return cls(server, state, reason, entry.get("name", ""), entry.get("version", ""))


PREPROCESS_SUFFIX, ENCODED_SUFFIX = "-preprocess", "-encoded"


def encoded_twins(name: str) -> tuple[str, str]:
    """The models `python -m histoserve.export --encoded` publishes beside `name`, at its version numbers: the
    server-side preprocessing and the ensemble that takes image files (export/encoded.py)."""
    return name + PREPROCESS_SUFFIX, name + ENCODED_SUFFIX
