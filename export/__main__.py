"""python -m export CHECKPOINT --repository model_repository --name NAME

Checkpoint → ONNX (dynamic batch) → onnx.checker → parity gate on real images → Triton repository.
Nothing is written to the repository unless every check passes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from client.preprocessing import ImageLoadError, preprocess_file
from export.onnx_model import ParityError, check_parity, export_onnx
from export.repository import BatchingConfig, RepositoryError, build_config, config_to_text, publish


def parity_images(paths: list[Path], spec, count: int) -> np.ndarray:
    """Up to `count` images spread evenly over `paths` (so several classes are covered)."""
    chosen = [paths[int(i)] for i in np.linspace(0, len(paths) - 1, num=min(count, len(paths)))]
    arrays = []
    for path in dict.fromkeys(chosen):
        try:
            arrays.append(preprocess_file(path, spec))
        except ImageLoadError as error:
            print(f"parity: skipping {error}", file=sys.stderr)
    return np.stack(arrays) if arrays else np.zeros((0, 3, spec.crop_size, spec.crop_size), np.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="checkpoint.pt written by `python -m train fit`")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--name", required=True, help="Triton model name")
    parser.add_argument("--version", type=int, help="default: the next free version number")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-queue-delay-us", type=int, default=500)
    parser.add_argument("--instance-count", type=int, default=1, help="model instances per GPU")
    parser.add_argument("--loaded-versions", type=int, default=2,
                        help="newest versions Triton keeps loaded: 2 keeps the previous one serving during a "
                             "rollout and warm for a rollback (default: %(default)s)")
    parser.add_argument("--parity-images", type=Path,
                        help="ImageFolder for the parity gate (default: the checkpoint's test split)")
    parser.add_argument("--parity-count", type=int, default=32)
    parser.add_argument("--atol", type=float, default=1e-4, help="max |Δprob| allowed by the parity gate")
    parser.add_argument("--opset", type=int, default=18)
    args = parser.parse_args(argv)

    from train.checkpoint import load_checkpoint, training_splits
    from train.data import list_image_folder
    from train.model import ServingModel

    try:
        classifier, meta = load_checkpoint(args.checkpoint)
        model = ServingModel(classifier, meta.temperature).eval()
        if args.parity_images:
            samples = list_image_folder(args.parity_images)[1]
        else:
            samples = training_splits(meta).splits["test"]
        images = parity_images([s.path for s in samples], meta.preprocess, args.parity_count)
        config = build_config(
            args.name, len(meta.class_names), meta.preprocess,
            BatchingConfig(args.max_batch_size, args.max_queue_delay_us, args.instance_count),
            loaded_versions=args.loaded_versions,
        )
        with tempfile.TemporaryDirectory(prefix="histoserve-export-") as workdir:
            onnx_file = Path(workdir) / "model.onnx"
            print(f"exporting {meta.arch} ({len(meta.class_names)} classes, input uint8 3×{meta.preprocess.crop_size}²) to ONNX "
                  "...", flush=True)
            export_onnx(model, onnx_file, meta.preprocess.crop_size, args.opset)
            print(check_parity(model, onnx_file, images, args.atol), flush=True)
            target = publish(args.repository, config, meta.class_names, onnx_file, args.version)
    except (ParityError, RepositoryError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"published {target / 'model.onnx'} ({(target / 'model.onnx').stat().st_size / 1e6:.1f} MB)")
    print(f"config: {target.parent / 'config.pbtxt'}\n" + config_to_text(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
