"""How well the monitor's drift tests and label-free accuracy estimate work, on real images.

    .venv/bin/python benchmarks/drift.py [--checkpoint runs/demo/checkpoint.pt] [--trials 200] [--window 200]

1. A digits model: the given checkpoint, or ResNet18 trained here for a few epochs at 32² (about 2
   minutes on 2 cores); exported by `python -m histoserve.export` (which also writes its drift_baseline.json).
2. Its held-out images (val + test, 540 real 8×8 scans) through the exported ONNX model in process,
   unshifted and under six shifts made from the same images: rotation by 90°, inverted contrast, blur,
   brightness +40 %, a colour cast, and a class-prior shift (digits 0–4 dropped).
3. Each trial splits the held-out images at random into a baseline half (monitor.baseline, from the
   unshifted images) and a window of --window images drawn without replacement from the other half,
   shifted or not, and runs monitor.drift on it (Bonferroni over 11 tests, α = 0.05 family-wise).

Prints a table: the share of trials with any alarm (unshifted: the false-alarm rate, goal ≤ 5 %;
shifted: the power, goal ≥ 0.9), which family fired, and for the label-free accuracy estimate its
mean error against each window's true accuracy and the share of windows within ±3 points. Writes
drift.json under --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from histoserve.export.onnx_model import onnx_session  # noqa: E402
from histoserve.export.precision import onnx_probabilities  # noqa: E402
from histoserve.formats.baseline import build_baseline  # noqa: E402
from histoserve.formats.image_statistics import input_statistics  # noqa: E402
from histoserve.formats.preprocessing import find_images, load_image, preprocess_image  # noqa: E402
from histoserve.monitor.drift import drift_report  # noqa: E402

SHIFTS = {
    "none": lambda image: image,
    "rotation 90°": lambda image: image.rotate(90),
    "inverted contrast": ImageOps.invert,
    "blur": lambda image: image.filter(ImageFilter.GaussianBlur(1.0)),
    "brightness +40 %": lambda image: ImageEnhance.Brightness(image).enhance(1.4),
    "colour cast": lambda image: Image.merge("RGB", [band.point(lambda v, k=k: int(v * k))
                                                     for band, k in zip(image.split(), (1.0, 0.85, 0.6), strict=True)]),
    "digits 0–4 dropped": lambda image: image,  # a prior shift: same pixels, other classes
}


def run(*command) -> None:
    result = subprocess.run([sys.executable, *map(str, command)], cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(map(str, command))} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")


def model_and_data(work: Path, checkpoint: Path | None, epochs: int) -> tuple[Path, Path]:
    """The exported ONNX file and the digits folder it was trained on."""
    from histoserve.train.checkpoint import load_checkpoint
    from histoserve.train.data import write_digits_demo

    if checkpoint is None:
        data = work / "digits"
        write_digits_demo(data, seed=0)
        print(f"training ResNet18 on the digits for {epochs} epochs ...", flush=True)
        run("-m", "histoserve.train", "fit", "--data", data, "--out", work / "run", "--arch", "resnet18", "--epochs", epochs,
            "--resize-size", 36, "--crop-size", 32, "--batch-size", 64)
        checkpoint = work / "run" / "checkpoint.pt"
    data = Path(load_checkpoint(checkpoint)[1].data_root)
    print(f"exporting {checkpoint} ...", flush=True)
    run("-m", "histoserve.export", checkpoint, "--repository", work / "repository", "--name", "digits", "--parity-count", 8)
    return work / "repository" / "digits" / "1" / "model.onnx", data


def outputs(session, paths: list[Path], spec, shift) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images after the shift and the model's probabilities for them."""
    images = np.stack([preprocess_image(shift(load_image(path)), spec) for path in paths])
    return images, onnx_probabilities(session, images, batch_size=64)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="a trained digits checkpoint (default: train one here)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--window", type=int, default=200, help="predictions per window (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "drift")
    args = parser.parse_args()
    started = time.monotonic()
    from histoserve.train.checkpoint import load_checkpoint

    with tempfile.TemporaryDirectory(prefix="histoserve-drift-") as work:
        onnx_file, data = model_and_data(Path(work), args.checkpoint, args.epochs)
        meta = load_checkpoint(args.checkpoint or Path(work) / "run" / "checkpoint.pt")[1]
        paths = find_images(data / "val") + find_images(data / "test")
        labels = np.array([int(meta.class_names.index(p.parent.name)) for p in paths])
        print(f"{len(paths)} held-out images through the model, unshifted and under {len(SHIFTS) - 1} shifts ...", flush=True)
        session = onnx_session(onnx_file)
        conditions = {name: outputs(session, paths, meta.preprocess, shift) for name, shift in SHIFTS.items()}

    rng = np.random.default_rng(0)
    reference_images, reference_probabilities = conditions["none"]
    rows = []
    for name, (images, probabilities) in conditions.items():
        pool = np.flatnonzero(labels >= 5) if name.startswith("digits 0–4") else np.arange(len(paths))
        alarms, families, errors = 0, {"prediction": 0, "input": 0, "accuracy": 0}, []
        for _ in range(args.trials):
            order = rng.permutation(len(paths))
            half, rest = order[: len(paths) // 2], order[len(paths) // 2:]
            candidates = np.intersect1d(rest, pool)
            window = rng.choice(candidates, size=min(args.window, len(candidates)), replace=False)
            baseline = build_baseline("digits", "fp32", "half", meta.class_names, reference_probabilities[half],
                                      reference_images[half], labels[half])
            chosen = probabilities[window]
            report = drift_report(baseline, chosen.argmax(axis=1), chosen.max(axis=1), input_statistics(images[window]))
            alarms += report.drift
            families["prediction"] += report.prediction_drift
            families["input"] += report.input_drift
            families["accuracy"] += report.accuracy_dropped
            errors.append(report.estimated_accuracy - float((chosen.argmax(axis=1) == labels[window]).mean()))
        errors = np.array(errors)
        rows.append({"shift": name, "window": len(window),
                     "alarm_rate": alarms / args.trials, **{f"{k}_rate": v / args.trials for k, v in families.items()},
                     "accuracy_error_mean": float(errors.mean()), "within_3_points": float((np.abs(errors) <= 0.03).mean())})

    print(f"\n{args.trials} trials per row, windows of {args.window} predictions (class-prior shift: at most the "
          f"held-out half's digits 5–9), Bonferroni over 11 tests at α = 0.05")
    print(f"{'shift':22} {'window':>6} {'any alarm':>9} {'prediction':>10} {'input':>6} {'acc. drop':>9} {'est. − true acc.':>16} "
          f"{'within ±3 pts':>13}")
    for row in rows:
        print(f"{row['shift']:22} {row['window']:6d} {row['alarm_rate']:9.1%} {row['prediction_rate']:10.1%} {row['input_rate']:6.1%} "
              f"{row['accuracy_rate']:9.1%} {row['accuracy_error_mean']:+16.3f} {row['within_3_points']:13.1%}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "drift.json").write_text(json.dumps({"trials": args.trials, "window": args.window, "rows": rows}, indent=2))
    print(f"\nwrote {args.out / 'drift.json'} ({(time.monotonic() - started) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
