"""A small histology-like corpus with every problem `prepare` must survive, made on the fly.

Tissue-like images: smooth random fields in H&E colours. 16 patients (P01–P08 benign, P09–P16
malignant), 5 tiles each, plus the deliberate problems listed in EXPECTED.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from histoserve.train.synthetic import tissue

GROUP_REGEX = r"^(?P<group>P\d+)_"

# relative path → (status, reason fragment or duplicate_of)
EXPECTED = {
    "benign/P01_0_copy.png": ("duplicate", "benign/P01_0.png"),
    "benign/P02_1_resaved.jpg": ("near-duplicate", "benign/P02_1.png"),
    "benign/P03_2.png": ("label-conflict", "malignant/P03_2.png"),
    "malignant/P03_2.png": ("label-conflict", "benign/P03_2.png"),
    "benign/P05_9.png": ("duplicate", "benign/P04_0.png"),
    "benign/P06_truncated.png": ("corrupt", "truncated"),
    "benign/P06_empty.png": ("corrupt", "empty file"),
    "malignant/P10_text.jpg": ("corrupt", "cannot identify image file"),
    "malignant/P10_bomb.png": ("unsupported", "decompression bomb"),
    "benign/notes.txt": ("unsupported", "not an image type"),
    "malignant/P14_stack.tif": ("unsupported", "multi-frame"),
    "malignant/P14_float.tif": ("unsupported", "mode F"),
    "stray.png": ("unsupported", "not inside a class folder"),
    "malignant/P11_cmyk.jpg": ("ok", "CMYK"),
    "malignant/P11_16bit.png": ("ok", "I;16"),
    "malignant/P12_palette.png": ("ok", "P"),
    "malignant/P12_rgba.png": ("ok", "RGBA"),
    "malignant/P13_gray.png": ("ok", "L"),
    "malignant/P13_exif.jpg": ("ok", "RGB"),
}
BOMB_LIMIT = 1_000_000  # --max-pixels used with this corpus; the bomb is 2000 × 2000


def make_corpus(root: Path) -> Path:
    seed = 0
    for patient in range(1, 17):
        label = "benign" if patient <= 8 else "malignant"
        for tile in range(5):
            seed += 1
            path = root / label / f"P{patient:02d}_{tile}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            tissue(seed).save(path)
    shutil.copy(root / "benign/P01_0.png", root / "benign/P01_0_copy.png")
    tissue_p2 = Image.open(root / "benign/P02_1.png").convert("RGB")
    tissue_p2.save(root / "benign/P02_1_resaved.jpg", quality=92)
    shutil.copy(root / "benign/P03_2.png", root / "malignant/P03_2.png")
    shutil.copy(root / "benign/P04_0.png", root / "benign/P05_9.png")  # same tile, another patient

    tissue(1001).save(root / "benign/P06_truncated.png")
    data = (root / "benign/P06_truncated.png").read_bytes()
    (root / "benign/P06_truncated.png").write_bytes(data[: len(data) // 2])
    (root / "benign/P06_empty.png").write_bytes(b"")
    (root / "malignant/P10_text.jpg").write_text("this is not a JPEG")
    Image.new("RGB", (2000, 2000), (230, 180, 210)).save(root / "malignant/P10_bomb.png")
    (root / "benign/notes.txt").write_text("slide scanner export notes")
    frames = [tissue(2000 + i) for i in range(3)]
    frames[0].save(root / "malignant/P14_stack.tif", save_all=True, append_images=frames[1:])
    Image.fromarray(np.random.default_rng(3).random((32, 32)).astype(np.float32), mode="F").save(root / "malignant/P14_float.tif")
    tissue(1002).save(root / "stray.png")

    tissue(1003).convert("CMYK").save(root / "malignant/P11_cmyk.jpg", quality=95)
    sixteen = (np.asarray(tissue(1004).convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(sixteen).save(root / "malignant/P11_16bit.png")
    tissue(1005).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "malignant/P12_palette.png")
    rgba = tissue(1006).convert("RGBA")
    rgba.putalpha(200)
    rgba.save(root / "malignant/P12_rgba.png")
    tissue(1007).convert("L").save(root / "malignant/P13_gray.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    tissue(1008).resize((60, 40)).save(root / "malignant/P13_exif.jpg", exif=exif, quality=95)
    return root


def fingerprint(root: Path) -> dict[str, str]:
    """sha256 of every file below root (hidden ones too): what 'nothing was changed' means."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def make_breakhis(root: Path, images_per_magnification: int = 3) -> Path:
    """The BreakHis folder and file naming, with generated images."""
    subtypes = {"benign": {"adenosis": "A", "fibroadenoma": "F"}, "malignant": {"ductal_carcinoma": "DC", "lobular_carcinoma": "LC"}}
    seed = 5000
    for label, kinds in subtypes.items():
        for subtype, code in kinds.items():
            for n in range(3):
                patient = f"14-{22549 + 100 * len(code) + 10 * n + len(subtype)}{code[0]}B"
                for magnification in (40, 100):
                    folder = root / "breast" / label / "SOB" / subtype / f"SOB_{label[0].upper()}_{code}_{patient}" / f"{magnification}X"
                    folder.mkdir(parents=True, exist_ok=True)
                    for i in range(1, images_per_magnification + 1):
                        seed += 1
                        name = f"SOB_{label[0].upper()}_{code}-{patient}-{magnification}-{i:03d}.png"
                        tissue(seed, size=48).save(folder / name)
    return root
