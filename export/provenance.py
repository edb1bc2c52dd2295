"""How a version was made, written into it and covered by its signature (formats/signing.py).

`provenance.intoto.json` is an in-toto Statement v1 whose subject is every file the version serves
from (model.onnx, the configs, the labels, the golden answers, the drift baseline), each with its
sha256, and whose predicate is SLSA Provenance v1 (https://slsa.dev/provenance/v1):

- buildDefinition.externalParameters: the training options (the checkpoint's, as `python -m histoserve.train fit`
  recorded them) and the export options (this command line);
- buildDefinition.resolvedDependencies: the checkpoint (sha256), the training data (sha256 of its
  manifest, with the split counts) and the source (the git commit, and whether the tree had changes);
- runDetails.byproducts: the gates this version passed (parity, the accuracy gate of a reduced
  precision, the golden answers, the drift baseline), with their figures.

The training data's digest is the one `python -m histoserve.train fit` recorded in the checkpoint when it ran
(train/data.py `data_digest`: a manifest CSV's sha256, or the sha256 of an image folder's listing,
one line per image `split<TAB>label<TAB>relative path<TAB>sha256 of the file`), checked against the
data as it is at export: data changed since training is refused, not described. Patient or slide
identifiers are counted, never written.

The source commit comes from git when the package runs from a checkout, else from the environment
variable HISTOSERVE_SOURCE_COMMIT (the image's build argument SOURCE_COMMIT sets it). Without either,
`python -m histoserve.export` refuses to publish: a version whose code cannot be named cannot be reviewed.
"""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

PROVENANCE_FILE = "provenance.intoto.json"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "https://histoserve.dev/export/v1"
SOURCE_COMMIT_VARIABLE = "HISTOSERVE_SOURCE_COMMIT"
SOURCE_ROOT = Path(__file__).resolve().parent.parent


class ProvenanceError(ValueError):
    """A fact the provenance or the model card needs is missing; the message says which and how to give it."""


@dataclass(frozen=True)
class SourceFacts:
    commit: str
    dirty: bool | None  # None: not known (taken from the environment, not from a checkout)
    found_by: str       # "git" or the environment variable's name


@dataclass(frozen=True)
class SplitFacts:
    images: int
    per_class: list[int]
    patients: int | None  # distinct patient/slide groups, when the data names them


@dataclass(frozen=True)
class DataFacts:
    uri: str
    kind: str     # "manifest-csv" or "image-folder-listing"
    sha256: str
    splits: dict[str, SplitFacts]


def source_facts(root: Path = SOURCE_ROOT) -> SourceFacts:
    """The commit of the source that runs this export (see the module's docstring)."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
        if commit.returncode == 0 and commit.stdout.strip():
            status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=30)
            return SourceFacts(commit.stdout.strip(), bool(status.stdout.strip()), "git")
    except (OSError, subprocess.TimeoutExpired):
        pass
    if commit := os.environ.get(SOURCE_COMMIT_VARIABLE, "").strip():
        return SourceFacts(commit, None, SOURCE_COMMIT_VARIABLE)
    raise ProvenanceError(f"the source commit is unknown: {root} is not a git checkout and {SOURCE_COMMIT_VARIABLE} is not set "
                          f"(build the image with --build-arg SOURCE_COMMIT=$(git rev-parse HEAD)); nothing was published")


def data_facts(data_root: str | Path, splits: dict, class_count: int, recorded: str) -> DataFacts:
    """The training data as the checkpoint recorded it (`recorded`, its digest when fit ran), checked
    against the data at `data_root` now: a digest that differs means the model did not see this data."""
    from histoserve.train.data import data_digest

    root = Path(data_root)  # there: export has read its splits already
    if not recorded:
        raise ProvenanceError("the checkpoint records no digest of its training data (written before they were kept): "
                              "retrain with `python -m histoserve.train fit`; nothing was published")
    kind, digest = data_digest(root, splits)
    if digest != recorded:
        raise ProvenanceError(f"{root}: the training data changed since training (sha256 {recorded[:16]}… when fit ran, "
                              f"{digest[:16]}… now): the provenance would name data the model never saw; nothing was published")
    counted = {}
    for name, samples in splits.items():
        per_class = [0] * class_count
        for sample in samples:
            per_class[sample.label] += 1
        groups = {s.group for s in samples if s.group and not s.group.startswith("file:")}
        counted[name] = SplitFacts(len(samples), per_class, len(groups) if groups else None)
    return DataFacts(str(root), kind, digest, counted)


def now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class BuildFacts:
    """Everything the statement says besides its subject."""

    checkpoint: Path
    checkpoint_sha256: str
    training_options: dict
    export_options: dict
    source: SourceFacts
    data: DataFacts
    gates: dict
    started: str
    versions: dict  # package versions that shaped the bytes (torch, onnx, onnxruntime, ...)


def statement(subject: dict[str, str], facts: BuildFacts, finished: str) -> dict:
    """The in-toto statement for a version whose serving files are `subject` {name: sha256}; checked
    against in-toto's Statement and SLSA's Provenance v1 schemas (PyPI in-toto-attestation)."""
    from google.protobuf import json_format
    from in_toto_attestation.predicates.provenance.v1 import provenance_pb2
    from in_toto_attestation.v1.resource_descriptor import ResourceDescriptor
    from in_toto_attestation.v1.statement import STATEMENT_TYPE_URI, Statement

    source = {"name": "source", "digest": {"gitCommit": facts.source.commit},
              "annotations": {"dirty": facts.source.dirty, "found_by": facts.source.found_by}}
    data = {"name": "training data", "uri": facts.data.uri, "digest": {"sha256": facts.data.sha256},
            "annotations": {"kind": facts.data.kind,
                            "splits": {k: vars(v) for k, v in facts.data.splits.items()}}}
    predicate = {
        "buildDefinition": {
            "buildType": BUILD_TYPE,
            "externalParameters": {"training": facts.training_options, "export": facts.export_options},
            "internalParameters": {"packages": facts.versions, "python": platform.python_version()},
            "resolvedDependencies": [
                {"name": "checkpoint", "uri": facts.checkpoint.name, "digest": {"sha256": facts.checkpoint_sha256}},
                data, source,
            ],
        },
        "runDetails": {
            "builder": {"id": f"{BUILD_TYPE}#python-m-histoserve.export"},
            "metadata": {"invocationId": f"{platform.node()}:{os.getpid()}:{facts.started}",
                         "startedOn": facts.started, "finishedOn": finished},
            "byproducts": [{"name": f"gate: {name}", "annotations": result} for name, result in facts.gates.items()],
        },
    }
    json_format.ParseDict(predicate, provenance_pb2.Provenance())  # raises on a field SLSA v1 does not define
    subjects = [{"name": name, "digest": {"sha256": digest}} for name, digest in sorted(subject.items())]
    Statement([ResourceDescriptor(**s).pb for s in subjects], PREDICATE_TYPE, predicate).validate()
    # Written from the dict, not the protobuf: a protobuf Struct turns every integer into a float.
    return {"_type": STATEMENT_TYPE_URI, "subject": subjects, "predicateType": PREDICATE_TYPE, "predicate": predicate}
