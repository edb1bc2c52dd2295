"""python -m histoserve.export CHECKPOINT --repository model_repository --name NAME [--precision fp32|fp16|int8]

Checkpoint → ONNX (dynamic batch) → onnx.checker → parity gate on real images → [INT8 or FP16 variant
→ accuracy gate against FP32 on the held-out split] → drift baseline (the published model on the
held-out split, for the monitor) and golden answers (held-out images and what every server of the
version must answer, for readiness) → Triton repository, the version folder with SHA256SUMS over
its every file (formats/version.py). A variant is published as its
own model, NAME-int8 or NAME-fp16, with the same contract, labels and warmup. Nothing is written to the
repository unless every check passes, and what can be checked before the work (every option, the
version number, the model name, the contract of a model already in the repository, the facts the
provenance needs) is checked first.

Each version also carries how it was made and what it is for: provenance.intoto.json (the data's,
code's and checkpoint's digests, the options, the gates: export/provenance.py) and MODEL_CARD.md with
model_card.json (export/model_card.py); with --signing-key, model.sig signs every file of the folder
(formats/signing.py), which `python -m histoserve.serve stage --trusted-keys` verifies before Triton sees it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from histoserve.export.config import SPLITS, TENSORRT_PRECISIONS, ExportConfig
from histoserve.export.encoded import EncodedOptions
from histoserve.export.model_card import DEFAULT_INTENDED_USE
from histoserve.export.onnx_model import ParityError
from histoserve.export.pipeline import export_and_publish
from histoserve.export.precision import CALIBRATION_METHODS, PRECISIONS, AccuracyGate, AccuracyGateError, QuantizationConfig
from histoserve.export.publish import CpuTuning, TensorRTConfig
from histoserve.formats.options import FRACTION, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, existing_file, existing_folder, output_file
from histoserve.formats.repository_layout import RepositoryError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m histoserve.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=existing_file, help="checkpoint.pt written by `python -m histoserve.train fit`")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--name", required=True, help="Triton model name")
    parser.add_argument("--version", type=POSITIVE_INT, help="default: the next free version number")
    parser.add_argument("--max-batch-size", type=POSITIVE_INT, default=16)
    parser.add_argument("--max-queue-delay-us", type=NON_NEGATIVE_INT, default=500)
    parser.add_argument("--instance-count", type=POSITIVE_INT, default=1, help="model instances per GPU")
    parser.add_argument("--preferred-batch-sizes", type=POSITIVE_INT, nargs="*", default=[], help="GPU batcher's preferred sizes")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp16 and int8 are published as NAME-fp16 / NAME-int8 after the accuracy gate")
    parser.add_argument("--calibration-count", type=POSITIVE_INT, default=QuantizationConfig.calibration_count,
                        help="int8: training images to calibrate on (default: %(default)s)")
    parser.add_argument("--calibration-method", choices=CALIBRATION_METHODS, default=QuantizationConfig.method)
    parser.add_argument("--int8-reduce-range", action="store_true",
                        help="int8: 7-bit weights, for CPU nodes without AVX-512 VNNI (see README)")
    parser.add_argument("--gate-split", default="test", choices=SPLITS,
                        help="held-out split the accuracy gate runs on (default: %(default)s)")
    parser.add_argument("--baseline-split", default="test", choices=SPLITS,
                        help="held-out split the drift baseline (drift_baseline.json, read by the monitor) is measured on "
                             "(default: %(default)s)")
    parser.add_argument("--min-agreement", type=FRACTION, default=AccuracyGate.min_agreement,
                        help="accuracy gate: top-1 agreement with fp32, in [0, 1] (default: %(default)s)")
    parser.add_argument("--max-accuracy-drop", type=FRACTION, default=AccuracyGate.max_accuracy_drop,
                        help="accuracy gate: top-1 accuracy drop, as a fraction (default: %(default)s = 0.5 point)")
    parser.add_argument("--tensorrt", choices=TENSORRT_PRECISIONS,
                        help="GPU config: TensorRT execution accelerator at this precision (int8 needs --precision int8)")
    parser.add_argument("--tensorrt-workspace-bytes", type=POSITIVE_INT, default=TensorRTConfig.workspace_bytes)
    parser.add_argument("--tensorrt-cache-path", default=TensorRTConfig.cache_path,
                        help="engine and timing cache folder in the serving container (default: %(default)s)")
    parser.add_argument("--cpu-instances", type=POSITIVE_INT, default=CpuTuning.instance_count,
                        help="configs/cpu.pbtxt: model instances")
    parser.add_argument("--cpu-threads", type=POSITIVE_INT, default=CpuTuning.intra_op_threads,
                        help="configs/cpu.pbtxt: ONNX Runtime intra-op threads per instance; the pod's CPU limit (default: %(default)s)")
    parser.add_argument("--cpu-max-queue-delay-us", type=NON_NEGATIVE_INT, default=CpuTuning.max_queue_delay_us)
    parser.add_argument("--cpu-preferred-batch-sizes", type=POSITIVE_INT, nargs="*", default=list(CpuTuning.preferred_batch_sizes))
    parser.add_argument("--loaded-versions", type=POSITIVE_INT, default=2,
                        help="newest versions Triton keeps loaded: 2 keeps the previous one serving during a "
                             "rollout and warm for a rollback (default: %(default)s)")
    parser.add_argument("--parity-images", type=existing_folder,
                        help="ImageFolder for the parity gate (default: the checkpoint's test split)")
    parser.add_argument("--parity-count", type=POSITIVE_INT, default=32)
    parser.add_argument("--atol", type=POSITIVE, default=1e-4, help="max |Δprob| allowed by the parity gate")
    parser.add_argument("--opset", type=POSITIVE_INT, default=18, help="ONNX opset (default: %(default)s)")
    add_publishing_arguments(parser)
    return parser


def add_publishing_arguments(parser: argparse.ArgumentParser) -> None:
    """What is published beside the model: the encoded twins, the signature, the card, the hand-over file."""
    parser.add_argument("--encoded", action="store_true",
                        help="also publish NAME-encoded (image files in, the same probabilities out; NAME-preprocess "
                             "decodes in the server with the package's preprocessing) at the same version")
    parser.add_argument("--preprocess-instances", type=POSITIVE_INT, default=EncodedOptions.instances,
                        help="--encoded: CPU instances decoding files (default: %(default)s)")
    parser.add_argument("--max-file-mb", type=POSITIVE, default=EncodedOptions.max_file_bytes / 2**20,
                        help="--encoded: larger files are refused (default: %(default)g)")
    parser.add_argument("--max-image-megapixels", type=POSITIVE, default=EncodedOptions.max_image_pixels / 1e6,
                        help="--encoded: larger images are refused before decoding (default: %(default)g)")
    parser.add_argument("--signing-key", type=existing_file,
                        help="EC private key (PEM) to sign each version folder with (model.sig); pods that stage with "
                             "--trusted-keys refuse an unsigned version")
    parser.add_argument("--intended-use", default=DEFAULT_INTENDED_USE,
                        help="the model card's intended use (default: research use, not validated for diagnosis)")
    parser.add_argument("--result-file", type=output_file,
                        help="after publishing, write NAME=, VERSION= and FOLDER= lines here (sh can source it; "
                             "`python -m histoserve.serve stage --published FILE` reads it): the publish Job's hand-over")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = ExportConfig.from_args(args)
    except ValueError as error:  # OptionError: options that do not go together
        parser.error(str(error))
    try:
        export_and_publish(config)
    except (ParityError, AccuracyGateError, RepositoryError, FileNotFoundError, ValueError) as error:  # Baseline, Provenance, Signature
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
