"""ImageFolder trees, seeded stratified splits, the bundled digits demo data, and the torch Dataset.

A data root is either already split (`root/{train,val,test}/<class>/...`, as `demo-data` writes it)
or a plain ImageFolder (`root/<class>/...`), which is split here with a seeded stratified split so
that every stage that asks for "test" gets the same files.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from histoserve.formats.preprocessing import IMAGE_SUFFIXES, ImageLoadError, find_images, load_image
from histoserve.formats.version import sha256_of
from histoserve.train.config import SplitRatios

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    group: str = ""  # patient / slide, when the data says (manifests do)


@dataclass
class DataSplits:
    class_names: list[str]
    splits: dict[str, list[Sample]]
    digest: str = ""  # data_digest of the splits as found (fit records it in the checkpoint)

    def counts(self) -> dict[str, list[int]]:
        """Images per class for each split, in class order."""
        return {
            name: [Counter(s.label for s in samples)[i] for i in range(len(self.class_names))]
            for name, samples in self.splits.items()
        }


def list_image_folder(root: Path, class_names: list[str] | None = None) -> tuple[list[str], list[Sample]]:
    """Class = first folder level under `root`; every image file below it, sorted, is a sample."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} is not a folder")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if class_names is None:
        class_names = found
    else:
        unknown = sorted(set(found) - set(class_names))
        if unknown:
            raise ValueError(f"{root} has classes {unknown} that the training split does not have")
    if not class_names:
        raise ValueError(f"{root} has no class folders (expected {root}/<class>/<image>)")
    samples = [Sample(path, label) for label, name in enumerate(class_names)
               if (root / name).is_dir() for path in find_images(root / name)]
    if not samples:
        raise ValueError(f"{root} holds no images with suffixes {IMAGE_SUFFIXES}")
    return class_names, samples


def stratified_split(samples: list[Sample], ratios: SplitRatios, seed: int) -> dict[str, list[Sample]]:
    # Counts, not fractions: sklearn rounds a fraction up, and 0.1 / 0.7 of 140 is not exactly 20.
    test_count, val_count = round(ratios.test * len(samples)), round(ratios.val * len(samples))
    rest, test = train_test_split(samples, test_size=test_count, stratify=[s.label for s in samples], random_state=seed)
    train, val = train_test_split(rest, test_size=val_count, stratify=[s.label for s in rest], random_state=seed)
    return {"train": train, "val": val, "test": test}


def load_manifest_splits(path: Path, fold: int = -1) -> DataSplits:
    """The `ok` rows of a manifest written by `python -m histoserve.train prepare`, by its split column; with
    fold >= 0 (K-fold manifests), fold k of the non-test rows is the validation split."""
    from histoserve.train.manifest import read_manifest

    root, rows = read_manifest(path)
    usable = [r for r in rows if r.status == "ok"]
    class_names = sorted({r.label for r in usable})
    index = {name: i for i, name in enumerate(class_names)}

    def samples(selected) -> list[Sample]:
        return [Sample(root / r.path, index[r.label], r.group) for r in selected]

    if fold >= 0:
        folds = {r.fold for r in usable if r.fold}
        if str(fold) not in folds:
            raise ValueError(f"{path} has no fold {fold} (folds: {sorted(folds) or 'none; prepare with --folds K'})")
        splits = {
            "train": samples(r for r in usable if r.split != "test" and r.fold != str(fold)),
            "val": samples(r for r in usable if r.split != "test" and r.fold == str(fold)),
            "test": samples(r for r in usable if r.split == "test"),
        }
    else:
        splits = {name: samples(r for r in usable if r.split == name) for name in SPLITS}
        if not splits["val"] and any(r.fold for r in usable):
            raise ValueError(f"{path} is a K-fold manifest: choose the validation fold with --fold K")
    return DataSplits(class_names, splits)


def load_splits(root: Path, ratios: SplitRatios = SplitRatios(), seed: int = 0, fold: int = -1) -> DataSplits:
    """From a manifest CSV (the prepared way), a split ImageFolder, or a plain ImageFolder."""
    root = Path(root)
    if root.is_file():
        return load_manifest_splits(root, fold)
    if (root / "train").is_dir():
        class_names, train = list_image_folder(root / "train")
        splits = {"train": train}
        for name in ("val", "test"):
            if (root / name).is_dir():
                splits[name] = list_image_folder(root / name, class_names)[1]
        if "val" not in splits:
            raise ValueError(f"{root} has a train/ split but no val/ split")
        if "test" not in splits:
            # Reporting validation accuracy as test accuracy would be a lie: val drives early stopping
            # and the temperature, so it is not held out.
            raise ValueError(f"{root} has train/ and val/ but no test/ split: add {root / 'test'}, or give a folder "
                             f"without train/ and val/ (a seeded stratified split is made), or `python -m histoserve.train prepare` it")
        return DataSplits(class_names, splits)
    class_names, samples = list_image_folder(root)
    return DataSplits(class_names, stratified_split(samples, ratios, seed))


def drop_unreadable(samples: list[Sample], desc: str) -> tuple[list[Sample], list[ImageLoadError]]:
    """Decode every file once; a broken one is reported and left out, it never stops the run."""
    good, errors = [], []
    for sample in tqdm(samples, desc=f"checking {desc} images", unit="img", leave=False, disable=None):
        try:
            load_image(sample.path)
            good.append(sample)
        except ImageLoadError as error:
            errors.append(error)
    return good, errors


class ImageDataset:
    """A map-style dataset of (uint8 CHW tensor, label); `transform` maps a PIL RGB image to a tensor."""

    def __init__(self, samples: list[Sample], transform: Callable[[Image.Image], object]):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        return self.transform(load_image(sample.path)), sample.label


def write_digits_demo(out: Path, ratios: SplitRatios = SplitRatios(), seed: int = 0) -> DataSplits:
    """scikit-learn's bundled digits (1,797 real 8×8 scans) as `out/{train,val,test}/<digit>/*.png`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = Path(out)
    class_names = [str(d) for d in digits.target_names]
    samples = [Sample(Path(f"digit_{i:04d}.png"), int(t)) for i, t in enumerate(digits.target)]
    splits = stratified_split(samples, ratios, seed)
    for split, members in splits.items():
        for sample in members:
            index = int(sample.path.stem.split("_")[1])
            pixels = np.rint(digits.images[index] * (255.0 / 16.0)).astype(np.uint8)  # 0..16 → 0..255
            target = out / split / class_names[sample.label] / sample.path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(target)
    return load_splits(out)


def data_digest(root: str | Path, splits: dict[str, list[Sample]]) -> tuple[str, str]:
    """What names the training data in a version's provenance: (kind, sha256). A manifest CSV (`python -m
    train prepare`) is named by its own sha256; an image folder by the sha256 of its listing, one line
    per image `split<TAB>label<TAB>relative path<TAB>sha256 of the file`, in split and path order (the
    splits as load_splits makes them, unreadable files included). Patient identifiers never enter it."""
    root = Path(root)
    if root.is_file():
        return "manifest-csv", sha256_of(root)
    digest = hashlib.sha256()
    for split in sorted(splits):
        for sample in sorted(splits[split], key=lambda s: str(s.path)):
            path = Path(sample.path)
            relative = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()
            digest.update(f"{split}\t{sample.label}\t{relative}\t{sha256_of(path)}\n".encode())
    return "image-folder-listing", digest.hexdigest()
