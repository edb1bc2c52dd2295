"""The data manifest: one row per file found, the single source of truth for what is trained on.

`python -m histoserve.train prepare` writes it; `python -m histoserve.train fit --data manifest.csv` reads it, so every
stage sees the same split. Only rows with status `ok` are used; every other row says why not, and the
file itself is left exactly where and as it was.
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from histoserve.formats.files import write_atomically

STATUSES = ("ok", "duplicate", "near-duplicate", "corrupt", "unsupported", "label-conflict", "suspected-label-issue")
META_FILE = "prepare.json"
NO_GROUP = "file:"  # prefix of the group of a file without a patient id: a group of its own


@dataclass
class ManifestRow:
    path: str  # relative to the data root (recorded in prepare.json beside the manifest)
    label: str
    group: str  # patient / slide id; rows of one group always share a split
    split: str = ""  # train / val / test for ok rows
    fold: str = ""  # 0..K-1 in K-fold mode
    status: str = "ok"
    reason: str = ""
    duplicate_of: str = ""
    distance: str = ""  # pHash Hamming distance to duplicate_of
    sha256: str = ""
    phash: str = ""
    width: str = ""
    height: str = ""
    mode: str = ""  # Pillow mode as stored; to_rgb in formats/preprocessing.py says how each becomes RGB
    label_issue_score: str = ""  # cleanlab self-confidence (lower: more likely mislabelled)


COLUMNS = [f.name for f in fields(ManifestRow)]


def write_manifest(path: Path, rows: list[ManifestRow]) -> None:
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow(asdict(row))
    write_atomically(path, buffer.getvalue())


def read_manifest(path: Path) -> tuple[Path, list[ManifestRow]]:
    """The data root and the rows. The root comes from prepare.json beside the manifest."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist (write one with `python -m histoserve.train prepare`)")
    meta_file = path.with_name(META_FILE)
    root = Path(json.loads(meta_file.read_text())["root"]) if meta_file.is_file() else path.parent
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = set(COLUMNS) - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: not a histoserve manifest, columns {sorted(missing)} are missing")
        rows = [ManifestRow(**{k: r[k] for k in COLUMNS}) for r in reader]
    bad = sorted({r.status for r in rows} - set(STATUSES))
    if bad:
        raise ValueError(f"{path}: unknown status {bad}; allowed: {', '.join(STATUSES)}")
    return root, rows


def groups_in_several_splits(rows: list[ManifestRow]) -> dict[str, list[str]]:
    """Patients whose images landed in more than one split (must be none: that would leak)."""
    splits: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        if row.split:
            splits[row.group].add(row.split)
    return {group: sorted(s) for group, s in splits.items() if len(s) > 1}


def cross_group_duplicates(rows: list[ManifestRow]) -> list[tuple[str, list[str]]]:
    """Images found (exactly or nearly) under more than one group: the same tile in two patients.
    Only one copy is kept, so it cannot leak across splits, but the data deserves a look."""
    clusters: dict[str, list[ManifestRow]] = defaultdict(list)
    for row in rows:
        if row.status in ("ok", "duplicate", "near-duplicate"):
            clusters[row.duplicate_of or row.path].append(row)
    return [
        (key, sorted(f"{m.group}: {m.path}" for m in members))
        for key, members in clusters.items()
        if len({m.group for m in members}) > 1
    ]
