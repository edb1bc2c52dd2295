"""The data report that `python -m histoserve.train prepare` writes: report.md with PNGs beside it, meant to be
sent to a colleague. Every quarantined file is listed with its reason; the patient-leakage check is
stated with its number, zero."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from histoserve.formats.preprocessing import ImageLoadError, load_image  # noqa: E402
from histoserve.train.manifest import NO_GROUP, ManifestRow, cross_group_duplicates, groups_in_several_splits  # noqa: E402

SPLIT_ORDER = ("train", "val", "test")
THUMBNAILS_PER_CLASS = 8


def _table(header: list[str], rows: list[list[object]]) -> str:
    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _thumbnail(root: Path, row: ManifestRow, size: int = 96) -> np.ndarray:
    try:
        image = load_image(root / row.path)
        image.thumbnail((size, size))
        canvas = np.full((size, size, 3), 255, dtype=np.uint8)
        array = np.asarray(image)
        canvas[: array.shape[0], : array.shape[1]] = array
        return canvas
    except ImageLoadError:
        return np.zeros((size, size, 3), dtype=np.uint8)


def _grid(root: Path, cells: list[list[tuple[ManifestRow, str]]], row_titles: list[str], path: Path, title: str) -> None:
    columns = max(len(c) for c in cells)
    figure, axes = plt.subplots(len(cells), columns, figsize=(1.5 * columns, 1.7 * len(cells)), squeeze=False)
    for r, line in enumerate(cells):
        for c in range(columns):
            axis = axes[r][c]
            axis.axis("off")
            if c < len(line):
                manifest_row, caption = line[c]
                axis.imshow(_thumbnail(root, manifest_row))
                axis.set_title(caption, fontsize=6)
        axes[r][0].text(-0.1, 0.5, row_titles[r], transform=axes[r][0].transAxes, ha="right", va="center", fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _class_counts_plot(counts: dict[str, Counter], labels: list[str], path: Path) -> None:
    figure, axis = plt.subplots(figsize=(max(5, 0.9 * len(labels) + 2), 3.5))
    width = 0.8 / max(1, len(counts))
    for i, split in enumerate(counts):
        axis.bar(np.arange(len(labels)) + i * width, [counts[split][label] for label in labels], width, label=split)
    axis.set_xticks(np.arange(len(labels)) + width * (len(counts) - 1) / 2, labels, rotation=30, ha="right")
    axis.set_ylabel("images")
    axis.set_title("images per class and split")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_data_report(root: Path, rows: list[ManifestRow], out: Path, config) -> Path:
    """OUT/report.md and its PNGs: what `prepare` found, section by section."""
    usable = [r for r in rows if r.status == "ok"]
    labels = sorted({r.label for r in usable})
    splits = [s for s in SPLIT_ORDER if any(r.split == s for r in usable)]
    counts = {s: Counter(r.label for r in usable if r.split == s) for s in splits}
    md = [f"# Data report: `{root}`\n",
          f"{len(rows)} files scanned; {len(usable)} usable for training. Files are only read: nothing was "
          f"deleted, moved or rewritten. The manifest (`manifest.csv`) is the list training uses.\n"]
    md += _status_section(rows)
    md += _classes_section(usable, labels, splits, counts, out, config)
    md += _patients_section(rows, usable, splits, counts, config)
    md += _examples_section(root, usable, labels, out)
    md += _duplicates_section(root, rows, out, config)
    md += _quarantine_section(rows, usable)
    md += _label_issues_section(root, rows, out, config)
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path


def _status_section(rows: list[ManifestRow]) -> list[str]:
    status_counts = Counter(r.status for r in rows)
    return ["## Files by status\n", _table(["status", "files"], [[s, status_counts[s]] for s in sorted(status_counts)])]


def _classes_section(usable, labels, splits, counts, out: Path, config) -> list[str]:
    md = ["## Classes per split\n",
          _table(["class", *splits, "all"],
                 [[label, *[counts[s][label] for s in splits], sum(counts[s][label] for s in splits)] for label in labels]
                 + [["**all**", *[sum(counts[s].values()) for s in splits], len(usable)]]),
          "![class counts](class_counts.png)\n"]
    _class_counts_plot(counts, labels, out / "class_counts.png")
    if config.folds > 1:
        folds = Counter((r.fold, r.label) for r in usable if r.fold)
        md += [f"K-fold mode: {config.folds} folds over the non-test images (column `fold`).\n",
               _table(["fold", *labels], [[k, *[folds[(str(k), label)] for label in labels]] for k in range(config.folds)])]
    if labels:
        per_class = [sum(c[label] for c in counts.values()) for label in labels]
        md.append(f"Imbalance: the largest class has {max(per_class) / max(1, min(per_class)):.1f}× the images of the smallest. "
                  f"`python -m histoserve.train fit --balance sampler` (or `loss`) compensates.\n")
    return md


def _patients_section(rows, usable, splits, counts, config) -> list[str]:
    leaks = groups_in_several_splits(rows)
    images_per_group = Counter(r.group for r in usable)
    md = ["## Patients (groups) and leakage\n",
          f"**Groups found in more than one split: {len(leaks)}.** Every image of a patient is in one split "
          f"(stratified group split, seed {config.seed}).\n",
          _table(["split", "groups", "images"],
                 [[s, len({r.group for r in usable if r.split == s}), sum(counts[s].values())] for s in splits])]
    if images_per_group:
        per_group = sorted(images_per_group.values())
        md.append(f"{len(images_per_group)} groups; images per group: min {per_group[0]}, median "
                  f"{per_group[len(per_group) // 2]}, max {per_group[-1]}.\n")
    files_without_group = sum(r.group.startswith(NO_GROUP) for r in usable)
    if files_without_group:
        md.append(f"{files_without_group} usable files had no group id (no --group-regex match / --groups-csv entry) and "
                  f"count as a group of their own: their split is per image, not per patient.\n")
    return md


def _examples_section(root: Path, usable, labels, out: Path) -> list[str]:
    md = ["## Examples per class\n"]
    if labels:
        cells = []
        for label in labels:  # spread over the class (and so over patients), not its first files
            members = [r for r in usable if r.label == label]
            chosen = [members[int(i)] for i in np.linspace(0, len(members) - 1, min(THUMBNAILS_PER_CLASS, len(members)))]
            cells.append([(r, r.path.rsplit("/", 1)[-1][:18]) for r in chosen])
        _grid(root, cells, labels, out / "examples.png", "examples per class")
        md.append("![examples](examples.png)\n")
    return md


def _duplicates_section(root: Path, rows, out: Path, config) -> list[str]:
    duplicates = [r for r in rows if r.status in ("duplicate", "near-duplicate")]
    md = ["## Duplicates\n",
          f"{sum(r.status == 'duplicate' for r in rows)} exact (same sha256) and "
          f"{sum(r.status == 'near-duplicate' for r in rows)} near duplicates (pHash distance ≤ "
          f"{config.near_duplicate_distance}). One copy is kept (`ok`), the others are marked and not trained on.\n"]
    if duplicates:
        md.append(_table(["file", "status", "copy of (kept)", "distance"],
                         [[r.path, r.status, r.duplicate_of, r.distance] for r in duplicates]))
        by_path = {r.path: r for r in rows}
        near = [r for r in duplicates if r.status == "near-duplicate"][:8]
        if near:
            pairs = [[(r, "marked"), (by_path[r.duplicate_of], "kept")] for r in near]
            _grid(root, pairs, [f"d={r.distance}" for r in near], out / "near_duplicates.png", "near duplicates")
            md.append("![near duplicates](near_duplicates.png)\n")
    across = cross_group_duplicates(rows)
    md.append(f"Images found under more than one patient: {len(across)}.\n")
    if across:
        md.append(_table(["kept file", "copies (group: file)"], [[key, "; ".join(copies)] for key, copies in across]))
    return md


def _quarantine_section(rows, usable) -> list[str]:
    quarantined = [r for r in rows if r.status in ("corrupt", "unsupported", "label-conflict")]
    md = ["## Quarantined files\n",
          f"{len(quarantined)} files cannot be used as they are. They stay where they are; fix or remove them "
          f"yourself and prepare again.\n"]
    if quarantined:
        md.append(_table(["file", "status", "reason"], [[r.path, r.status, r.reason] for r in quarantined]))
    converted = Counter(r.mode for r in usable if r.mode and r.mode != "RGB")
    if converted:
        md.append("Converted to 8-bit RGB (`to_rgb` in `formats/preprocessing.py` says how): "
                  + ", ".join(f"{count} × {mode}" for mode, count in sorted(converted.items())) + ".\n")
    return md


def _label_issues_section(root: Path, rows, out: Path, config) -> list[str]:
    md = ["## Label issues\n"]
    suspects = sorted((r for r in rows if r.status == "suspected-label-issue"), key=lambda r: float(r.label_issue_score))
    if not config.label_issues:
        md.append("Not searched (opt-in: `--label-issues`, it trains K models).\n")
        return md
    md.append(f"Out-of-fold probabilities ({config.label_issue_folds} folds grouped by patient, model "
              f"`{config.label_issue_model}`) given to cleanlab's `find_label_issues`: {len(suspects)} suspected, "
              f"ranked by self-confidence (the model's probability of the given label). They are not trained on; "
              f"set their status back to `ok` in the manifest to keep one.\n")
    if suspects:
        md.append(_table(["file", "given label", "self-confidence"],
                         [[r.path, r.label, f"{float(r.label_issue_score):.3f}"] for r in suspects]))
        cells = [[(r, f"{r.label} "
                      f"({float(r.label_issue_score):.2f})") for r in suspects[i:i + 8]] for i in range(0, min(len(suspects), 32), 8)]
        _grid(root, cells, [f"#{i + 1}" for i in range(0, min(len(suspects), 32), 8)], out / "label_issues.png",
              "suspected label issues: given label (self-confidence)")
        md.append("![label issues](label_issues.png)\n")
    return md
