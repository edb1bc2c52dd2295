"""A published model version is self-contained and can prove it is intact and correct.

`python -m histoserve.export` writes every version folder in one atomic rename:

    <repository>/<name>/<version>/
        model.onnx            the model
        config.pbtxt          the model's (GPU) config as published with this version
        cpu.pbtxt             its CPU variant (--model-config-name=cpu)
        labels.txt            the labels
        identity.json         the model name and version this folder was published as
        drift_baseline.json   the monitor's reference (formats/baseline.py)
        golden.json           golden answers: a few held-out images and what this version must answer
        golden_inputs.npy     those images, uint8 N×3×H×W, as the client sends them
        provenance.intoto.json  how it was made: data, code, options, gates (export/provenance.py)
        MODEL_CARD.md         what it is for and how well it does, and its JSON twin model_card.json
        SHA256SUMS            sha256 of every other file of the folder (`sha256sum -c` reads it)
        model.sig             who published it: a signature over all of the above (formats/signing.py)

A pod copies exactly one version into its own repository (python -m histoserve.serve stage) and checks it
against SHA256SUMS: a missing, altered or unexpected file stops it, naming the file. Before the pod
takes traffic its own Triton must answer the golden inputs as golden.json says (python -m histoserve.serve
golden-gate): the right top-1 class and label, and probabilities within the version's tolerance.
The expected classes and labels come from the data (the images' true classes, on which PyTorch
agreed), not from the exported files, so a wrong labels file or wrong weights cannot vouch for
themselves. SHA256SUMS guards against partial copies, corruption and stray edits of the store; the
signature against a writer of the store who holds no trusted signing key (docs/kubernetes/security.md, "Signed versions").
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

CHECKSUMS_FILE = "SHA256SUMS"
SIGNATURE_FILE = "model.sig"  # formats/signing.py: over every other file, SHA256SUMS included
IDENTITY_FILE = "identity.json"  # {"model": NAME, "version": N}: binds the signed files to their place in the store
GOLDEN_FILE, GOLDEN_INPUTS_FILE = "golden.json", "golden_inputs.npy"
VERSION_CONFIG, VERSION_CPU_CONFIG, VERSION_LABELS = "config.pbtxt", "cpu.pbtxt", "labels.txt"
GOLDEN_FORMAT, GOLDEN_FORMAT_VERSION = "histoserve.golden", 1
# How far served probabilities may sit from the ones export measured with ONNX Runtime on the CPU:
# another device and execution provider (CUDA, TensorRT in FP16) move them by up to about 1e-3 for
# FP32 and more for the reduced precisions. Wrong weights or a wrong model move them by far more.
TOLERANCE = {"fp32": 2e-3, "fp16": 1e-2, "int8": 3e-2}
GOLDEN_COUNT, GOLDEN_MAX = 8, 64  # at least 8 images, one per class where possible (a swapped label shows)
GOLDEN_MIN_MARGIN = 0.2  # top-1 minus top-2 probability: no near-tie can flip between devices


class VersionFilesError(ValueError):
    """A version folder or one of its files that cannot be used; the message names the file."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def files_of(folder: Path, include_checksums: bool = False) -> list[str]:
    """Every regular file below `folder` but the signature (and SHA256SUMS, unless `include_checksums`),
    as sorted relative POSIX paths."""
    left_out = {SIGNATURE_FILE} | (set() if include_checksums else {CHECKSUMS_FILE})
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.relative_to(folder).as_posix() not in left_out)


def write_checksums(folder: Path) -> Path:
    """SHA256SUMS for every other file of `folder`, in `sha256sum` format."""
    lines = [f"{sha256_of(folder / name)}  {name}\n" for name in files_of(folder)]
    target = folder / CHECKSUMS_FILE
    target.write_text("".join(lines))
    return target


def read_checksums(folder: Path) -> dict[str, str]:
    path = Path(folder) / CHECKSUMS_FILE
    try:
        text = path.read_text()
    except OSError as error:
        raise VersionFilesError(f"{path}: cannot read ({error.strerror or error}): the version is incomplete") from error
    sums = {}
    for number, line in enumerate(text.splitlines(), 1):
        digest, separator, name = line.partition("  ")
        if not separator or len(digest) != 64 or not name or name.startswith("/") or ".." in Path(name).parts:
            raise VersionFilesError(f"{path}:{number}: not a `sha256sum` line: {line[:80]!r}")
        if name in sums:  # `sha256sum -c` checks both lines, and one of them fails: malformed, not "last wins"
            raise VersionFilesError(f"{path}:{number}: {name} is listed twice")
        sums[name] = digest
    if not sums:
        raise VersionFilesError(f"{path} lists no file")
    return sums


def verify_checksums(folder: Path) -> list[str]:
    """Problems with `folder` against its SHA256SUMS, each naming the file (empty: intact)."""
    folder = Path(folder)
    sums = read_checksums(folder)
    problems = []
    for name, digest in sums.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif sha256_of(path) != digest:
            problems.append(f"{path}: altered (its sha256 is not the one in {CHECKSUMS_FILE})")
    problems += [f"{folder / name}: not in {CHECKSUMS_FILE} (a file the version was not published with)"
                 for name in files_of(folder) if name not in sums]
    return problems


@dataclass(frozen=True)
class GoldenAnswers:
    """What a version must answer for its golden inputs."""

    model: str
    version: int
    precision: str
    top1: list[int]                  # expected class index per input
    labels: list[str]                # expected label (classification extension) per input
    probabilities: list[list[float]]  # expected probability rows (export's ONNX Runtime on the CPU)
    tolerance: float

    def with_version(self, version: int) -> GoldenAnswers:
        return replace(self, version=int(version))

    def to_json(self) -> str:
        return json.dumps({"format": GOLDEN_FORMAT, "format_version": GOLDEN_FORMAT_VERSION, "inputs_file": GOLDEN_INPUTS_FILE,
                           **asdict(self)})

    @classmethod
    def read(cls, folder: Path) -> tuple[GoldenAnswers, np.ndarray]:
        """The answers and their uint8 inputs from a version folder (VersionFilesError names the file)."""
        folder = Path(folder)
        path = folder / GOLDEN_FILE
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise VersionFilesError(f"{path}: cannot read ({error})") from error
        if data.get("format") != GOLDEN_FORMAT or data.get("format_version") != GOLDEN_FORMAT_VERSION:
            raise VersionFilesError(f"{path}: format: expected {GOLDEN_FORMAT} version {GOLDEN_FORMAT_VERSION}")
        try:
            answers = cls(**{name: data[name] for name in cls.__dataclass_fields__})
        except KeyError as error:
            raise VersionFilesError(f"{path}: field {error.args[0]!r} missing") from None
        try:
            inputs = np.load(folder / data.get("inputs_file", GOLDEN_INPUTS_FILE), allow_pickle=False)
        except (OSError, ValueError) as error:
            raise VersionFilesError(f"{folder / GOLDEN_INPUTS_FILE}: cannot read ({error})") from error
        count = len(answers.top1)
        if inputs.dtype != np.uint8 or inputs.ndim != 4 or len(inputs) != count or not (
                len(answers.labels) == len(answers.probabilities) == count > 0):
            raise VersionFilesError(f"{path}: {count} answers for inputs of shape {inputs.shape} ({inputs.dtype})")
        return answers, inputs

    def problems(self, probabilities: np.ndarray, labels: list[str]) -> list[str]:
        """How the served answers (probability rows, top-1 labels) differ from the golden ones."""
        found = []
        expected = np.asarray(self.probabilities, dtype=np.float64)
        if probabilities.shape != expected.shape:
            return [f"answers of shape {probabilities.shape}, expected {expected.shape}"]
        for i, (row, label) in enumerate(zip(probabilities, labels, strict=True)):
            top = int(np.argmax(row))
            if top != self.top1[i] or label != self.labels[i]:
                found.append(f"golden input {i}: answered class {top} ({label!r}), expected {self.top1[i]} ({self.labels[i]!r})")
            elif (difference := float(np.abs(row - expected[i]).max())) > self.tolerance:
                found.append(f"golden input {i}: probabilities differ by {difference:.2e}, more than {self.tolerance:g}")
        return found


def golden_count(num_classes: int) -> int:
    return min(max(GOLDEN_COUNT, num_classes), GOLDEN_MAX)


def choose_golden(probabilities: np.ndarray, true_labels: np.ndarray, reference_top1: np.ndarray,
                  count: int = GOLDEN_COUNT) -> list[int]:
    """Indices of up to `count` images, spread over the classes, that the model gets right by a clear
    margin and on which the reference (PyTorch) agrees: answers no device difference can flip.
    Within a class the least confident qualifying images come first: a saturated probability row
    (0.99999…) hardly moves when the weights do, a row of 0.7 / 0.2 / … does."""
    ordered = np.sort(probabilities, axis=1)
    margin = ordered[:, -1] - ordered[:, -2] if probabilities.shape[1] > 1 else ordered[:, -1]
    top1 = probabilities.argmax(axis=1)
    good = [i for i in range(len(probabilities))
            if top1[i] == true_labels[i] == reference_top1[i] and margin[i] >= GOLDEN_MIN_MARGIN]
    by_class: dict[int, list[int]] = {}
    for i in sorted(good, key=lambda i: (ordered[i, -1], i)):
        by_class.setdefault(int(true_labels[i]), []).append(i)
    chosen: list[int] = []
    while len(chosen) < count and any(by_class.values()):  # round-robin over the classes
        for label in sorted(by_class):
            if by_class[label] and len(chosen) < count:
                chosen.append(by_class[label].pop(0))
    return sorted(chosen)


def identity_json(model: str, version: int) -> str:
    return json.dumps({"model": model, "version": int(version)}) + "\n"


def read_identity(folder: Path) -> tuple[str, int] | None:
    """(model, version) from a version folder's identity.json; None when it has none (published before it existed)."""
    path = Path(folder) / IDENTITY_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return str(data["model"]), int(data["version"])
    except (ValueError, KeyError, TypeError) as error:
        raise VersionFilesError(f"{path}: not an identity file ({error})") from None


def version_folder(repository: str | Path, model: str, version: int | str) -> Path:
    return Path(repository) / model / str(version)


@dataclass(frozen=True)
class Published:
    """What `python -m histoserve.export --result-file` hands to the next step of a publish: `KEY=value` lines,
    which sh can source (a model name matches NAME_PATTERN, so it needs no quoting)."""

    name: str
    version: int
    folder: Path


def write_published(path: str | Path, published: Published) -> None:
    Path(path).write_text(f"NAME={published.name}\nVERSION={published.version}\nFOLDER={published.folder}\n")


def read_published(path: str | Path) -> Published:
    try:
        pairs = dict(line.split("=", 1) for line in Path(path).read_text().splitlines() if "=" in line)
        return Published(pairs["NAME"], int(pairs["VERSION"]), Path(pairs.get("FOLDER", "")))
    except (OSError, KeyError, ValueError) as error:
        raise VersionFilesError(f"{path}: not a result file of `python -m histoserve.export --result-file` ({error})") from error
