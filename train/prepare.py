"""`python -m histoserve.train prepare SRC OUT`: scan a folder of images into a manifest, a patient-level split
and a data report. User files are only ever read: nothing is deleted, moved or rewritten.

Top to bottom: find files → label and group from the path → decode every file in parallel
(sha256, pHash, size, mode; failures become `corrupt`/`unsupported` rows with a reason) → exact and
near duplicates (keep one, mark the rest; the same image under two labels is a `label-conflict`) →
optional label-issue search (out-of-fold probabilities + cleanlab) → stratified, patient-grouped
split (or K folds) → manifest.csv, prepare.json, report.md.

Pixel policy (documented, applied the same way in training and serving by client.preprocessing):
grayscale, palette, CMYK, RGBA/LA (alpha dropped) and 16-bit images are converted to 8-bit RGB and
kept; the stored mode is recorded in the manifest. Float images (mode F), multi-frame files and files
over --max-pixels (Pillow's decompression-bomb guard) are `unsupported`; undecodable, truncated and
empty files are `corrupt`. EXIF orientation is applied before hashing and training.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.model_selection import StratifiedGroupKFold
from tqdm import tqdm

from histoserve.formats.options import NON_NEGATIVE_INT, POSITIVE_INT, Range
from histoserve.formats.preprocessing import IMAGE_SUFFIXES, ImageLoadError, load_image
from histoserve.train.config import SplitRatios, check_choices, option
from histoserve.train.data_report import write_data_report
from histoserve.train.manifest import META_FILE, NO_GROUP, ManifestRow, groups_in_several_splits, write_manifest

# Named layouts. BreakHis: .../breast/{benign,malignant}/SOB/<subtype>/<slide>/<40X|100X|200X|400X>/
# SOB_B_A-14-22549AB-40-001.png, where the patient is 14-22549AB.
BREAKHIS_GROUP = r"^SOB_[BM]_[A-Z]+-(?P<group>\d+-[A-Za-z0-9]+)-\d+-\d+\."
LAYOUTS = {
    "breakhis": {"label_regex": r"(?:^|/)(?P<label>benign|malignant)/", "group_regex": BREAKHIS_GROUP},
    "breakhis-subtype": {"label_regex": r"(?:^|/)SOB/(?P<label>[a-z_]+)/", "group_regex": BREAKHIS_GROUP},
}
UNSUPPORTED_MODES = {"F": "32-bit float pixels have no safe 8-bit mapping"}


class PrepareError(ValueError):
    pass


@dataclass
class PrepareConfig:
    src: str
    out: str
    layout: str = option("", "a known dataset layout, or '' to use --label-regex / --group-regex / --groups-csv",
                         ("", *LAYOUTS))
    label_regex: str = option("", "regex over the path relative to SRC; group 'label' (or 1). '': the first folder")
    group_regex: str = option("", "regex over the file name; group 'group' (or 1), the patient. '': each file its own")
    groups_csv: str = option("", "CSV with columns path (relative to SRC) and group")
    include_regex: str = option("", "keep only relative paths that match, e.g. '/40X/' for one magnification")
    val_ratio: float = option(SplitRatios.val, "validation share of the patients", kind=Range(float, 0, 1, True, True))
    test_ratio: float = option(SplitRatios.test, "test share of the patients", kind=Range(float, 0, 1, True, True))
    folds: int = option(0, "> 1: K-fold mode (test held out, a fold column over the rest)", kind=NON_NEGATIVE_INT)
    seed: int = option(0, "seed of the split")
    near_duplicate_distance: int = option(4, "pHash Hamming distance (of 64 bits) that makes a near duplicate; -1: off",
                                          kind=Range(int, -1, 64))
    max_pixels: int = option(89_478_485, "larger images are unsupported (Pillow's decompression-bomb limit)", kind=POSITIVE_INT)
    workers: int = option(0, "decoding processes (0: one per core)", kind=NON_NEGATIVE_INT)
    label_issues: bool = option(False, "search for label issues with cleanlab on out-of-fold probabilities")
    label_issue_folds: int = option(5, "folds (grouped by patient) for the label-issue search", kind=Range(int, 2))
    label_issue_model: str = option("pixels", "pixels (fast) or resnet18 (slower, stronger)", ("pixels", "resnet18"))

    def __post_init__(self) -> None:
        check_choices(self)

    def resolved(self) -> PrepareConfig:
        if not self.layout:
            return self
        if self.layout not in LAYOUTS:
            raise PrepareError(f"--layout {self.layout!r} is not one of {', '.join(LAYOUTS)}")
        return PrepareConfig(**{**asdict(self), **{k: getattr(self, k) or v for k, v in LAYOUTS[self.layout].items()}})


# --- 1. files, labels, groups ---------------------------------------------------------------------

def find_files(src: Path, skip: Path | None = None) -> list[str]:
    """Every regular file below src (hidden ones excepted), as sorted POSIX paths relative to src."""
    found = []
    for directory, subdirs, files in os.walk(src):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and (skip is None or Path(directory, d).resolve() != skip))
        found += [Path(directory, f).relative_to(src).as_posix() for f in files if not f.startswith(".")]
    return sorted(found)


def _match(pattern: re.Pattern, text: str, name: str) -> str | None:
    match = pattern.search(text)
    if not match:
        return None
    return match.group(name) if name in pattern.groupindex else match.group(1 if pattern.groups else 0)


def label_of(relative: str, pattern: re.Pattern | None) -> str | None:
    if pattern is not None:
        return _match(pattern, relative, "label")
    return relative.split("/", 1)[0] if "/" in relative else None


def read_groups_csv(path: str) -> dict[str, str]:
    import csv

    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if not {"path", "group"} <= set(reader.fieldnames or []):
            raise PrepareError(f"--groups-csv {path}: needs columns 'path' and 'group'")
        return {row["path"]: row["group"] for row in reader}


def initial_rows(config: PrepareConfig, files: list[str]) -> list[ManifestRow]:
    label_pattern = re.compile(config.label_regex) if config.label_regex else None
    group_pattern = re.compile(config.group_regex) if config.group_regex else None
    groups = read_groups_csv(config.groups_csv) if config.groups_csv else {}
    include = re.compile(config.include_regex) if config.include_regex else None
    rows = []
    for relative in files:
        if include and not include.search(relative):
            continue
        label = label_of(relative, label_pattern)
        name = relative.rsplit("/", 1)[-1]
        group = groups.get(relative) or (group_pattern and _match(group_pattern, name, "group")) or ""
        row = ManifestRow(path=relative, label=label or "", group=group)
        if Path(relative).suffix.lower() not in IMAGE_SUFFIXES:
            row.status, row.reason = "unsupported", f"not an image type read here ({Path(relative).suffix or 'no suffix'})"
        elif label is None:
            row.status = "unsupported"
            row.reason = "no label: --label-regex does not match" if label_pattern else "no label: not inside a class folder"
        rows.append(row)
    return rows


# --- 2. decode every file (in worker processes; nothing but a few strings comes back) -----------

def _init_worker(max_pixels: int) -> None:
    # Pillow refuses images over 2 × MAX_IMAGE_PIXELS (and only warns above 1 ×).
    Image.MAX_IMAGE_PIXELS = max(1, max_pixels // 2)


def inspect_file(path: str) -> dict[str, str]:
    import imagehash

    result = {"sha256": "", "phash": "", "width": "", "height": "", "mode": "", "status": "ok", "reason": ""}
    try:
        with open(path, "rb") as handle:
            result["sha256"] = hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError as error:
        return {**result, "status": "corrupt", "reason": f"cannot read file: {error}"}
    try:
        with Image.open(path) as header:  # header only: mode and frame count as stored
            result["mode"] = header.mode
            frames = getattr(header, "n_frames", 1)
        if frames > 1:
            return {**result, "status": "unsupported", "reason": f"multi-frame image ({frames} frames); export single images"}
        if result["mode"] in UNSUPPORTED_MODES:
            return {**result, "status": "unsupported", "reason": f"mode {result['mode']}: {UNSUPPORTED_MODES[result['mode']]}"}
    except Image.DecompressionBombError:
        pass  # load_image below gives the reason
    except Exception:  # noqa: BLE001 - any header failure is reported by the full decode below
        pass
    try:
        image = load_image(path)  # full decode, EXIF orientation, RGB: exactly what training sees
    except ImageLoadError as error:
        status = "unsupported" if "decompression bomb" in error.reason else "corrupt"
        reason = error.reason
        if status == "unsupported":
            reason = f"over --max-pixels ({Image.MAX_IMAGE_PIXELS * 2:,} pixels): refused as a possible decompression bomb"
        return {**result, "status": status, "reason": reason}
    result.update(width=str(image.width), height=str(image.height), phash=str(imagehash.phash(image)))
    return result


def inspect_all(root: Path, rows: list[ManifestRow], config: PrepareConfig) -> None:
    todo = [row for row in rows if row.status == "ok"]
    workers = config.workers or os.cpu_count() or 1
    paths = [str(root / row.path) for row in todo]
    # forkserver: workers start clean (no inherited threads) and import only what decoding needs.
    context = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "forkserver")
    with context.Pool(workers, initializer=_init_worker, initargs=(config.max_pixels,)) as pool:
        results = pool.imap(inspect_file, paths, chunksize=16)
        for row, result in tqdm(zip(todo, results, strict=True), total=len(todo), desc="decoding", unit="file", disable=None):
            for key, value in result.items():
                setattr(row, key, value)


# --- 3. duplicates --------------------------------------------------------------------------------

EXACT, NEAR = "same bytes as", "looks like"
_POPCOUNT16 = np.array([bin(i).count("1") for i in range(1 << 16)], dtype=np.uint8)


def hamming(one: np.uint64, many: np.ndarray) -> np.ndarray:
    x = np.bitwise_xor(many, one)
    return sum(_POPCOUNT16[(x >> np.uint64(s)) & np.uint64(0xFFFF)].astype(np.int32) for s in (0, 16, 32, 48))


def _resolve_cluster(members: list[ManifestRow], how: str, distances: dict[str, int] | None = None) -> None:
    """Keep the first member (by path) unless labels disagree, in which case none is usable."""
    members = sorted(members, key=lambda r: r.path)
    labels = sorted({m.label for m in members})
    if len(labels) > 1:
        for member in members:
            others = [f"{m.path} ({m.label})" for m in members if m is not member]
            member.status, member.reason = "label-conflict", f"{how} {', '.join(others)}"
        return
    keep = members[0]
    for member in members[1:]:
        member.status, member.duplicate_of = ("duplicate" if how == EXACT else "near-duplicate"), keep.path
        member.reason = f"{how} {keep.path}"
        if distances is not None:
            member.distance = str(distances[member.path])


def mark_duplicates(rows: list[ManifestRow], max_distance: int) -> None:
    by_hash: dict[str, list[ManifestRow]] = defaultdict(list)
    for row in rows:
        if row.status == "ok":
            by_hash[row.sha256].append(row)
    for members in by_hash.values():
        if len(members) > 1:
            _resolve_cluster(members, EXACT)
    if max_distance < 0:
        return
    candidates = [row for row in rows if row.status == "ok"]
    hashes = np.array([int(r.phash, 16) for r in candidates], dtype=np.uint64)
    parent = list(range(len(candidates)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in tqdm(range(len(candidates) - 1), desc="near duplicates", unit="file", leave=False, disable=None):
        for j in np.nonzero(hamming(hashes[i], hashes[i + 1:]) <= max_distance)[0] + i + 1:
            parent[find(int(j))] = find(i)
    clusters: dict[int, list[int]] = defaultdict(list)
    for i in range(len(candidates)):
        clusters[find(i)].append(i)
    for indices in clusters.values():
        if len(indices) > 1:
            members = [candidates[i] for i in indices]
            keep = min(members, key=lambda r: r.path)
            kept_hash = np.uint64(int(keep.phash, 16))
            distances = {m.path: int(hamming(kept_hash, np.array([int(m.phash, 16)], dtype=np.uint64))[0]) for m in members}
            _resolve_cluster(members, NEAR, distances)


# --- 4. splits ------------------------------------------------------------------------------------

def _folds(ratio: float) -> int:
    return max(2, round(1.0 / ratio))


def assign_splits(rows: list[ManifestRow], config: PrepareConfig) -> None:
    """Stratified by label, grouped by patient: no group is in two splits. Ratios are met to the
    nearest 1/k (k folds of StratifiedGroupKFold), which is as close as whole patients allow."""
    usable = [row for row in rows if row.status == "ok"]
    if not usable:
        raise PrepareError("no usable images: every file was quarantined (see the report)")
    labels = np.array([row.label for row in usable])
    groups = np.array([row.group for row in usable])
    test_folds = _folds(config.test_ratio)
    if len(set(groups)) < test_folds + 1:
        raise PrepareError(f"only {len(set(groups))} groups (patients): too few for a grouped split with a "
                           f"{config.test_ratio:.0%} test share; add data or lower --test-ratio")
    splitter = StratifiedGroupKFold(n_splits=test_folds, shuffle=True, random_state=config.seed)
    try:
        rest, test = next(splitter.split(labels, labels, groups))
    except ValueError as error:  # sklearn: every class has fewer images than folds
        raise PrepareError(f"cannot split {len(usable)} images by patient with a {config.test_ratio:.0%} test share "
                           f"({error}); add data or raise --test-ratio") from error
    for i in test:
        usable[i].split = "test"
    if config.folds > 1:
        splitter = StratifiedGroupKFold(n_splits=config.folds, shuffle=True, random_state=config.seed)
        for fold, (_, held_out) in enumerate(splitter.split(labels[rest], labels[rest], groups[rest])):
            for i in held_out:
                usable[rest[i]].split, usable[rest[i]].fold = "train", str(fold)
        return
    val_folds = _folds(config.val_ratio / (1.0 - config.test_ratio))
    splitter = StratifiedGroupKFold(n_splits=val_folds, shuffle=True, random_state=config.seed)
    train, val = next(splitter.split(labels[rest], labels[rest], groups[rest]))
    for i in train:
        usable[rest[i]].split = "train"
    for i in val:
        usable[rest[i]].split = "val"


# --- the command ----------------------------------------------------------------------------------

def prepare(config: PrepareConfig) -> list[ManifestRow]:
    config = config.resolved()
    src, out = Path(config.src).resolve(), Path(config.out).resolve()
    if not src.is_dir():
        raise PrepareError(f"SRC {src} is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    files = find_files(src, skip=out)
    rows = initial_rows(config, files)
    if not rows:
        raise PrepareError(f"no files found under {src}" + (f" matching {config.include_regex!r}" if config.include_regex else ""))
    for row in rows:
        if not row.group:
            row.group = f"{NO_GROUP}{row.path}"
    print(f"{len(rows)} files under {src}", flush=True)
    inspect_all(src, rows, config)
    mark_duplicates(rows, config.near_duplicate_distance)
    if config.label_issues:
        from histoserve.train.label_issues import mark_label_issues

        mark_label_issues(src, rows, config.label_issue_folds, config.label_issue_model, config.seed)
    assign_splits(rows, config)

    leaks = groups_in_several_splits(rows)
    if leaks:  # StratifiedGroupKFold guarantees there are none; never write a manifest that leaks
        raise PrepareError(f"grouped split put patients in several splits: {leaks}")
    write_manifest(out / "manifest.csv", rows)
    summary = {
        "root": str(src),
        "config": asdict(config),
        "files": len(rows),
        "status": {s: sum(r.status == s for r in rows) for s in sorted({r.status for r in rows})},
        "usable_files_without_group": sum(r.status == "ok" and r.group.startswith(NO_GROUP) for r in rows),
        "groups_in_several_splits": len(leaks),
    }
    (out / META_FILE).write_text(json.dumps(summary, indent=2))

    report = write_data_report(src, rows, out, config)
    print(f"manifest: {out / 'manifest.csv'}\nreport:   {report}")
    for status, count in summary["status"].items():
        print(f"  {status:22s} {count}")
    return rows
