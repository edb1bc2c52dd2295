"""python -m export CHECKPOINT --repository model_repository --name NAME [--precision fp32|fp16|int8]

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
(formats/signing.py), which `python -m serve stage --trusted-keys` verifies before Triton sees it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from histoserve.export import precision as variants
from histoserve.export.encoded import EncodedOptions, check_twins_publishable, publish_encoded
from histoserve.export.golden import golden_answers, npy_bytes, tolerance_for
from histoserve.export.images import load_images, parity_images, spread
from histoserve.export.model_card import (
    CLINICAL_CAVEAT,
    DEFAULT_INTENDED_USE,
    MODEL_CARD_FILE,
    MODEL_CARD_JSON,
    ModelCard,
    limitations,
)
from histoserve.export.onnx_model import ParityError, check_parity, export_onnx, onnx_session
from histoserve.export.precision import CALIBRATION_METHODS, PRECISIONS, AccuracyGate, AccuracyGateError, GateReport, QuantizationConfig
from histoserve.export.provenance import PROVENANCE_FILE, BuildFacts, ProvenanceError, data_facts, now, source_facts, statement
from histoserve.export.repository import (
    BatchingConfig,
    CpuTuning,
    TensorRTConfig,
    build_config,
    check_publishable,
    publish,
)
from histoserve.formats.baseline import BASELINE_FILE, BaselineError, DriftBaseline, build_baseline
from histoserve.formats.options import FRACTION, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, existing_file, existing_folder, output_file
from histoserve.formats.repository import RepositoryError, config_to_text
from histoserve.formats.signing import check_signing_key
from histoserve.formats.version import (
    CHECKSUMS_FILE,
    GOLDEN_FILE,
    GOLDEN_INPUTS_FILE,
    SIGNATURE_FILE,
    GoldenAnswers,
    Published,
    sha256_of,
    write_published,
)


def make_variant(precision: str, fp32_file: Path, target: Path, splits, meta, args) -> GateReport:
    """Write the reduced-precision model and pass it through the accuracy gate (or raise)."""
    if precision == "int8":
        calibration = load_images(spread(splits["train"], args.calibration_count), meta.preprocess, "calibration")[0]
        config = QuantizationConfig(len(calibration) or args.calibration_count, args.calibration_method, args.int8_reduce_range)
        print(f"int8: calibrating on {len(calibration)} training images ({config.method}, U8S8 QDQ per-channel, "
              f"reduce_range {'on' if config.reduce_range else 'off'}) ...", flush=True)
        variants.quantize_int8(fp32_file, target, calibration, config)
    else:
        print("fp16: converting weights and arithmetic to float16 (uint8 input and fp32 output kept) ...", flush=True)
        variants.convert_fp16(fp32_file, target)
    held_out = splits.get(args.gate_split, [])
    images, labels = load_images(held_out, meta.preprocess, "accuracy gate")
    if len(images) == 0:
        raise AccuracyGateError(f"the {args.gate_split!r} split has no readable images for the {precision} accuracy gate")
    gate = AccuracyGate(args.min_agreement, args.max_accuracy_drop)
    report = variants.check_accuracy_gate(precision, fp32_file, target, images, labels, gate)
    print(report, flush=True)
    return report


@dataclass(frozen=True)
class HeldOut:
    """The published model on the held-out split: the drift baseline, the golden answers and the
    predictions the model card's figures come from."""

    baseline: DriftBaseline
    golden: GoldenAnswers
    golden_inputs: np.ndarray
    probabilities: np.ndarray
    labels: np.ndarray
    groups: list[str]


def measure_held_out(name: str, onnx_file: Path, splits, meta, args, reference) -> HeldOut:
    """The published model on the held-out split: its predictions and inputs (the monitor's drift
    baseline) and, from the same run, the golden answers every server of this version must give."""
    samples = splits.get(args.baseline_split, [])
    images, labels = load_images(samples, meta.preprocess, "drift baseline")
    if len(images) == 0:
        raise BaselineError(f"the {args.baseline_split!r} split has no readable images for the drift baseline")
    probabilities = variants.predict(onnx_session(onnx_file), images)
    baseline = build_baseline(name, args.precision, args.baseline_split, meta.class_names, probabilities, images, labels)
    print(f"drift baseline: {baseline.sample_size} {args.baseline_split} images, accuracy {baseline.accuracy:.4f}, "
          f"mean top-1 probability {baseline.expected_accuracy:.4f}", flush=True)
    tolerance = tolerance_for(args.precision, args.tensorrt)
    golden, golden_inputs = golden_answers(name, args.precision, tolerance, meta.class_names, images, labels, probabilities, reference)
    print(f"golden answers: {len(golden.top1)} {args.baseline_split} images (classes {sorted(set(golden.labels))}), "
          f"probabilities within {tolerance:g}", flush=True)
    groups = [s.group for s in samples] if len(samples) == len(images) else []  # a skipped file would misalign them
    return HeldOut(baseline, golden, golden_inputs, probabilities, labels, groups)


def release_facts(args: argparse.Namespace, meta, splits) -> BuildFacts:
    """What the provenance and the model card need and the checkpoint alone cannot say, gathered before
    minutes of work; raises ProvenanceError naming what is missing. The gates are added as they pass."""
    if not meta.config:
        raise ProvenanceError(f"{args.checkpoint}: records no training options (written before they were kept?): retrain "
                              "with `python -m train fit`; nothing was published")
    import onnx
    import onnxruntime
    import torch

    options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "signing_key"}
    return BuildFacts(Path(args.checkpoint), sha256_of(Path(args.checkpoint)), dict(meta.config), options, source_facts(),
                      data_facts(meta.data_root, splits, len(meta.class_names), meta.data_sha256), {}, now(),
                      {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__})


def model_card(name: str, version: int, args, meta, facts: BuildFacts, held_out: HeldOut, gate: GateReport | None) -> ModelCard:
    from histoserve.train.evaluate import Predictions, summarize

    logits = np.log(np.clip(held_out.probabilities.astype(np.float64), 1e-30, None))  # softmax(log p) = p
    evaluation = summarize(Predictions(held_out.labels, logits, held_out.groups), meta.class_names)
    evaluation.update(split=args.baseline_split)
    evaluation.pop("temperature")
    baseline, golden = held_out.baseline, held_out.golden
    shares = dict(zip(meta.class_names, (c / max(baseline.sample_size, 1) for c in baseline.predicted_counts), strict=True))
    held_split = facts.data.splits.get(args.baseline_split)
    spec = meta.preprocess
    return ModelCard(
        name=name, version=version, precision=args.precision, intended_use=args.intended_use, clinical_caveat=CLINICAL_CAVEAT,
        architecture=meta.arch, classes=list(meta.class_names),
        input={"description": f"RGB uint8 3×{spec.crop_size}×{spec.crop_size}: decode, shorter side resized to {spec.resize_size} "
                              f"({spec.interpolation}), centre crop {spec.crop_size}; normalization inside the model",
               **asdict(spec)},
        data={"uri": facts.data.uri, "kind": facts.data.kind, "sha256": facts.data.sha256,
              "splits": {k: asdict(v) for k, v in facts.data.splits.items()}},
        evaluation=evaluation,
        reduced_precision={**gate.as_dict(), "min_agreement": gate.gate.min_agreement, "max_accuracy_drop": gate.gate.max_accuracy_drop}
        if gate else None,
        golden={"count": len(golden.top1), "labels": sorted(set(golden.labels)), "tolerance": golden.tolerance},
        drift_baseline={"split": baseline.split, "sample_size": baseline.sample_size, "accuracy": baseline.accuracy,
                        "expected_accuracy": baseline.expected_accuracy, "predicted_shares": shares},
        limitations=limitations({"images": evaluation["images"], "uri": facts.data.uri,
                                 "support": {k: v["support"] for k, v in evaluation["per_class"].items()},
                                 "patients": held_split.patients if held_split else None,
                                 "calibrated": bool(meta.config.get("calibrate")) and meta.temperature != 1.0}),
        provenance={"commit": facts.source.commit, "dirty": facts.source.dirty, "checkpoint_sha256": facts.checkpoint_sha256},
    )


def release_files(name: str, args, meta, facts: BuildFacts, held_out: HeldOut, gate: GateReport | None):
    """render(version, {file: sha256}) → the provenance statement and the model card for that version."""

    def render(version: int, digests: dict[str, str]) -> dict[str, str]:
        card = model_card(name, version, args, meta, facts, held_out, gate)
        return {PROVENANCE_FILE: json_text(statement(digests, facts, now())),
                MODEL_CARD_FILE: card.to_markdown(), MODEL_CARD_JSON: card.to_json()}

    return render


def json_text(value: dict) -> str:
    return json.dumps(value, indent=2) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=existing_file, help="checkpoint.pt written by `python -m train fit`")
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
    parser.add_argument("--gate-split", default="test", choices=("train", "val", "test"),
                        help="held-out split the accuracy gate runs on (default: %(default)s)")
    parser.add_argument("--baseline-split", default="test", choices=("train", "val", "test"),
                        help="held-out split the drift baseline (drift_baseline.json, read by the monitor) is measured on "
                             "(default: %(default)s)")
    parser.add_argument("--min-agreement", type=FRACTION, default=AccuracyGate.min_agreement,
                        help="accuracy gate: top-1 agreement with fp32, in [0, 1] (default: %(default)s)")
    parser.add_argument("--max-accuracy-drop", type=FRACTION, default=AccuracyGate.max_accuracy_drop,
                        help="accuracy gate: top-1 accuracy drop, as a fraction (default: %(default)s = 0.5 point)")
    parser.add_argument("--tensorrt", choices=("fp32", "fp16", "int8"),
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
                             "`python -m serve stage --published FILE` reads it): the publish Job's hand-over")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tensorrt == "int8" and args.precision != "int8":
        parser.error("--tensorrt int8 runs the quantized model: add --precision int8")
    try:
        return export(args)
    except (ParityError, AccuracyGateError, RepositoryError, FileNotFoundError, ValueError) as error:  # Baseline, Provenance, Signature
        print(f"error: {error}", file=sys.stderr)
        return 1


def export(args: argparse.Namespace) -> int:
    from histoserve.train.checkpoint import load_checkpoint, training_splits
    from histoserve.train.data import list_image_folder
    from histoserve.train.model import ServingModel

    name = args.name if args.precision == "fp32" else f"{args.name}-{args.precision}"
    classifier, meta = load_checkpoint(args.checkpoint)
    tensorrt = TensorRTConfig(args.tensorrt.upper(), args.tensorrt_workspace_bytes, args.tensorrt_cache_path) if args.tensorrt else None
    config = build_config(
        name, len(meta.class_names), meta.preprocess,
        BatchingConfig(args.max_batch_size, args.max_queue_delay_us, args.instance_count, tuple(args.preferred_batch_sizes)),
        loaded_versions=args.loaded_versions, precision=args.precision, tensorrt=tensorrt,
    )
    cpu = CpuTuning(args.cpu_instances, args.cpu_threads, CpuTuning.inter_op_threads, args.cpu_max_queue_delay_us,
                    tuple(args.cpu_preferred_batch_sizes))
    version = check_publishable(args.repository, config, meta.class_names, args.version, cpu)  # before minutes of work
    if args.signing_key:
        check_signing_key(args.signing_key)
    encoded = EncodedOptions(args.preprocess_instances, int(args.max_file_mb * 2**20), int(args.max_image_megapixels * 1e6))
    if args.encoded:
        check_twins_publishable(args.repository, name, version)
    model = ServingModel(classifier, meta.temperature).eval()
    splits = training_splits(meta).splits
    facts = release_facts(args, meta, splits)
    samples = list_image_folder(args.parity_images)[1] if args.parity_images else splits["test"]
    images = parity_images([s.path for s in samples], meta.preprocess, args.parity_count)
    target = gate_and_publish(args, name, model, meta, splits, config, cpu, facts, images)
    report_published(args, name, target, config, meta, encoded)
    return 0


def gate_and_publish(args, name: str, model, meta, splits, config, cpu: CpuTuning, facts: BuildFacts, images: np.ndarray) -> Path:
    """ONNX export, the parity gate, the reduced-precision variant and its gate, the held-out
    measurements, then the version folder with its provenance and card (each gate's result recorded in
    `facts` as it passes); returns the version folder."""
    with tempfile.TemporaryDirectory(prefix="histoserve-export-") as workdir:
        onnx_file = Path(workdir) / "model.onnx"
        print(f"exporting {meta.arch} ({len(meta.class_names)} classes, input uint8 3×{meta.preprocess.crop_size}²) to ONNX "
              "...", flush=True)
        export_onnx(model, onnx_file, meta.preprocess.crop_size, args.opset)
        parity = check_parity(model, onnx_file, images, args.atol)
        print(parity, flush=True)
        facts.gates["parity"] = {"images": parity.images, "max_abs_diff": parity.max_abs_diff,
                                 "top1_mismatches": parity.top1_mismatches, "atol": parity.atol}
        gate = None
        if args.precision != "fp32":
            variant = Path(workdir) / f"model-{args.precision}.onnx"
            gate = make_variant(args.precision, onnx_file, variant, splits, meta, args)
            facts.gates["accuracy"] = gate.as_dict()
            onnx_file = variant
        held_out = measure_held_out(name, onnx_file, splits, meta, args, model)
        facts.gates["golden answers"] = {"images": len(held_out.golden.top1), "tolerance": held_out.golden.tolerance}
        facts.gates["drift baseline"] = {"split": held_out.baseline.split, "images": held_out.baseline.sample_size,
                                         "accuracy": held_out.baseline.accuracy}
        return publish(args.repository, config, meta.class_names, onnx_file, args.version, cpu, version_files={
            BASELINE_FILE: lambda version: held_out.baseline.with_version(version).to_json(),
            GOLDEN_FILE: lambda version: held_out.golden.with_version(version).to_json(),
            GOLDEN_INPUTS_FILE: lambda _version: npy_bytes(held_out.golden_inputs),
        }, describe=release_files(name, args, meta, facts, held_out, gate), signing_key=args.signing_key)


def report_published(args, name: str, target: Path, config, meta, encoded: EncodedOptions) -> None:
    """What was published and how to deploy it; the encoded twins and the hand-over file."""
    print(f"published {target} ({(target / 'model.onnx').stat().st_size / 1e6:.1f} MB model; every file listed with "
          f"its sha256 in {target / CHECKSUMS_FILE}; how it was made in {PROVENANCE_FILE}, what it is for in {MODEL_CARD_FILE})")
    print(f"signed: {target / SIGNATURE_FILE} ({args.signing_key})" if args.signing_key else
          "unsigned (no --signing-key): pods that stage with --trusted-keys, as every overlay does, will refuse it")
    if args.encoded:
        _, twin = publish_encoded(args.repository, config, meta.class_names, int(target.name), encoded, signing_key=args.signing_key)
        print(f"published {twin}: image files in ({twin.parent.name}, input image_file, TYPE_STRING), the same "
              f"probabilities out; decoded by {twin.parent.name.removesuffix('-encoded')}-preprocess")
    print(f"config: {target.parent / 'config.pbtxt'}\n" + config_to_text(config))
    print(f"deploy it: set the model knob to name {name}, version {target.name} (k8s/README.md, \"Rollout and rollback\")")
    if args.result_file:
        write_published(args.result_file, Published(name, int(target.name), target))

if __name__ == "__main__":
    sys.exit(main())
