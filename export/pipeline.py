"""One export run (`python -m histoserve.export`, export/__main__.py), step by step, from an ExportConfig
(export/config.py): what can be checked before the work (the version number, the model name, the
contract of a model already in the repository, the signing key, the facts the provenance needs), then
the ONNX export and its parity gate, the reduced-precision variant and its accuracy gate, the held-out
measurements (drift baseline, golden answers, the model card's figures), the version folder with its
provenance and card, and what was published. Nothing is written to the repository unless every check
passes; a failed check raises (ParityError, AccuracyGateError, RepositoryError, ValueError, ...)."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from histoserve.export import precision as variants
from histoserve.export.config import ExportConfig
from histoserve.export.encoded import EncodedOptions, check_twins_publishable, publish_encoded
from histoserve.export.golden import golden_answers, npy_bytes, tolerance_for
from histoserve.export.images import parity_images, preprocess_samples, spread
from histoserve.export.model_card import CLINICAL_CAVEAT, MODEL_CARD_FILE, MODEL_CARD_JSON, ModelCard, limitations
from histoserve.export.onnx_model import check_parity, export_onnx, onnx_session
from histoserve.export.precision import AccuracyGateError, GateReport
from histoserve.export.provenance import PROVENANCE_FILE, BuildFacts, ProvenanceError, data_facts, now, source_facts, statement
from histoserve.export.publish import build_config, check_publishable, publish
from histoserve.formats.baseline import BASELINE_FILE, BaselineError, DriftBaseline, build_baseline
from histoserve.formats.repository_layout import config_to_text
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


def export_and_publish(config: ExportConfig) -> Path:
    """Checkpoint → gated ONNX model → a new version folder in the repository (and, with
    config.encoded, its encoded twins); returns the version folder."""
    from histoserve.train.checkpoint import load_checkpoint, training_splits
    from histoserve.train.data import list_image_folder
    from histoserve.train.model import ServingModel

    name = config.model_name
    classifier, meta = load_checkpoint(config.checkpoint)
    triton = build_config(name, len(meta.class_names), meta.preprocess, config.batching, loaded_versions=config.loaded_versions,
                          precision=config.precision, tensorrt=config.tensorrt_config)
    version = check_publishable(config.repository, triton, meta.class_names, config.version, config.cpu)  # before minutes of work
    if config.signing_key:
        check_signing_key(config.signing_key)
    encoded = config.encoded_options()
    if config.encoded:
        check_twins_publishable(config.repository, name, version)
    model = ServingModel(classifier, meta.temperature).eval()
    splits = training_splits(meta).splits
    facts = release_facts(config, meta, splits)
    samples = list_image_folder(config.parity_images)[1] if config.parity_images else splits["test"]
    images = parity_images([s.path for s in samples], meta.preprocess, config.parity_count)
    target = gate_and_publish(config, model, meta, splits, triton, facts, images)
    finish_publishing(config, target, triton, meta, encoded)
    return target


def make_variant(config: ExportConfig, fp32_file: Path, target: Path, splits, meta) -> GateReport:
    """Write the reduced-precision model (config.precision) and pass it through the accuracy gate (or raise)."""
    precision = config.precision
    if precision == "int8":
        count = config.quantization.calibration_count
        calibration = preprocess_samples(spread(splits["train"], count), meta.preprocess, "calibration")[0]
        quantization = replace(config.quantization, calibration_count=len(calibration) or count)
        print(f"int8: calibrating on {len(calibration)} training images ({quantization.method}, U8S8 QDQ per-channel, "
              f"reduce_range {'on' if quantization.reduce_range else 'off'}) ...", flush=True)
        variants.quantize_int8(fp32_file, target, calibration, quantization)
    else:
        print("fp16: converting weights and arithmetic to float16 (uint8 input and fp32 output kept) ...", flush=True)
        variants.convert_fp16(fp32_file, target)
    held_out = splits.get(config.gate_split, [])
    images, labels = preprocess_samples(held_out, meta.preprocess, "accuracy gate")
    if len(images) == 0:
        raise AccuracyGateError(f"the {config.gate_split!r} split has no readable images for the {precision} accuracy gate")
    report = variants.check_accuracy_gate(precision, fp32_file, target, images, labels, config.gate)
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


def measure_held_out(config: ExportConfig, onnx_file: Path, splits, meta, reference) -> HeldOut:
    """The published model on the held-out split (config.baseline_split): its predictions and inputs (the
    monitor's drift baseline) and, from the same run, the golden answers every server of this version must give."""
    name, split = config.model_name, config.baseline_split
    samples = splits.get(split, [])
    images, labels = preprocess_samples(samples, meta.preprocess, "drift baseline")
    if len(images) == 0:
        raise BaselineError(f"the {split!r} split has no readable images for the drift baseline")
    probabilities = variants.onnx_probabilities(onnx_session(onnx_file), images)
    baseline = build_baseline(name, config.precision, split, meta.class_names, probabilities, images, labels)
    print(f"drift baseline: {baseline.sample_size} {split} images, accuracy {baseline.accuracy:.4f}, "
          f"mean top-1 probability {baseline.expected_accuracy:.4f}", flush=True)
    tolerance = tolerance_for(config.precision, config.tensorrt)
    golden, golden_inputs = golden_answers(name, config.precision, tolerance, meta.class_names, images, labels, probabilities, reference)
    print(f"golden answers: {len(golden.top1)} {split} images (classes {sorted(set(golden.labels))}), "
          f"probabilities within {tolerance:g}", flush=True)
    groups = [s.group for s in samples] if len(samples) == len(images) else []  # a skipped file would misalign them
    return HeldOut(baseline, golden, golden_inputs, probabilities, labels, groups)


def release_facts(config: ExportConfig, meta, splits) -> BuildFacts:
    """What the provenance and the model card need and the checkpoint alone cannot say, gathered before
    minutes of work; raises ProvenanceError naming what is missing. The gates are added as they pass.
    The options are recorded as the command line names them, without the signing key's path."""
    if not meta.config:
        raise ProvenanceError(f"{config.checkpoint}: records no training options (written before they were kept?): retrain "
                              "with `python -m histoserve.train fit`; nothing was published")
    import onnx
    import onnxruntime
    import torch

    options = {k: str(v) if isinstance(v, Path) else v for k, v in config.options().items() if k != "signing_key"}
    return BuildFacts(Path(config.checkpoint), sha256_of(Path(config.checkpoint)), dict(meta.config), options, source_facts(),
                      data_facts(meta.data_root, splits, len(meta.class_names), meta.data_sha256), {}, now(),
                      {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__})


def gate_and_publish(config: ExportConfig, model, meta, splits, triton, facts: BuildFacts, images: np.ndarray) -> Path:
    """ONNX export, the parity gate, the reduced-precision variant and its gate, the held-out
    measurements, then the version folder with its provenance and card (each gate's result recorded in
    `facts` as it passes); returns the version folder."""
    with tempfile.TemporaryDirectory(prefix="histoserve-export-") as workdir:
        onnx_file = Path(workdir) / "model.onnx"
        print(f"exporting {meta.arch} ({len(meta.class_names)} classes, input uint8 3×{meta.preprocess.crop_size}²) to ONNX "
              "...", flush=True)
        export_onnx(model, onnx_file, meta.preprocess.crop_size, config.opset)
        parity = check_parity(model, onnx_file, images, config.atol)
        print(parity, flush=True)
        facts.gates["parity"] = {"images": parity.images, "max_abs_diff": parity.max_abs_diff,
                                 "top1_mismatches": parity.top1_mismatches, "atol": parity.atol}
        gate = None
        if config.precision != "fp32":
            variant = Path(workdir) / f"model-{config.precision}.onnx"
            gate = make_variant(config, onnx_file, variant, splits, meta)
            facts.gates["accuracy"] = gate.as_dict()
            onnx_file = variant
        held_out = measure_held_out(config, onnx_file, splits, meta, model)
        facts.gates["golden answers"] = {"images": len(held_out.golden.top1), "tolerance": held_out.golden.tolerance}
        facts.gates["drift baseline"] = {"split": held_out.baseline.split, "images": held_out.baseline.sample_size,
                                         "accuracy": held_out.baseline.accuracy}
        return publish(config.repository, triton, meta.class_names, onnx_file, config.version, config.cpu, version_files={
            BASELINE_FILE: lambda version: held_out.baseline.with_version(version).to_json(),
            GOLDEN_FILE: lambda version: held_out.golden.with_version(version).to_json(),
            GOLDEN_INPUTS_FILE: lambda _version: npy_bytes(held_out.golden_inputs),
        }, describe=release_files(config, meta, facts, held_out, gate), signing_key=config.signing_key)


def release_files(config: ExportConfig, meta, facts: BuildFacts, held_out: HeldOut, gate: GateReport | None):
    """render(version, {file: sha256}) → the provenance statement and the model card for that version."""

    def render(version: int, digests: dict[str, str]) -> dict[str, str]:
        card = model_card(config, version, meta, facts, held_out, gate)
        return {PROVENANCE_FILE: json_text(statement(digests, facts, now())),
                MODEL_CARD_FILE: card.to_markdown(), MODEL_CARD_JSON: card.to_json()}

    return render


def json_text(value: dict) -> str:
    return json.dumps(value, indent=2) + "\n"


def model_card(config: ExportConfig, version: int, meta, facts: BuildFacts, held_out: HeldOut, gate: GateReport | None) -> ModelCard:
    """The card of version `version`: what the model is for, what it was trained on, and its figures on
    the held-out split (recomputed from the published model's own predictions)."""
    from histoserve.train.evaluate import Predictions, summarize

    logits = np.log(np.clip(held_out.probabilities.astype(np.float64), 1e-30, None))  # softmax(log p) = p
    evaluation = summarize(Predictions(held_out.labels, logits, held_out.groups), meta.class_names)
    evaluation.update(split=config.baseline_split)
    evaluation.pop("temperature")
    baseline, golden = held_out.baseline, held_out.golden
    shares = dict(zip(meta.class_names, (c / max(baseline.sample_size, 1) for c in baseline.predicted_counts), strict=True))
    held_split = facts.data.splits.get(config.baseline_split)
    spec = meta.preprocess
    return ModelCard(
        name=config.model_name, version=version, precision=config.precision, intended_use=config.intended_use,
        clinical_caveat=CLINICAL_CAVEAT, architecture=meta.arch, classes=list(meta.class_names),
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


def finish_publishing(config: ExportConfig, target: Path, triton, meta, encoded: EncodedOptions) -> None:
    """After the version is in place: its encoded twins at the same version, the hand-over file
    (--result-file), and what was published and how to deploy it, on stdout."""
    name = config.model_name
    print(f"published {target} ({(target / 'model.onnx').stat().st_size / 1e6:.1f} MB model; every file listed with "
          f"its sha256 in {target / CHECKSUMS_FILE}; how it was made in {PROVENANCE_FILE}, what it is for in {MODEL_CARD_FILE})")
    print(f"signed: {target / SIGNATURE_FILE} ({config.signing_key})" if config.signing_key else
          "unsigned (no --signing-key): pods that stage with --trusted-keys, as every overlay does, will refuse it")
    if config.encoded:
        _, twin = publish_encoded(config.repository, triton, meta.class_names, int(target.name), encoded, signing_key=config.signing_key)
        print(f"published {twin}: image files in ({twin.parent.name}, input image_file, TYPE_STRING), the same "
              f"probabilities out; decoded by {twin.parent.name.removesuffix('-encoded')}-preprocess")
    print(f"config: {target.parent / 'config.pbtxt'}\n" + config_to_text(triton))
    print(f"deploy it: set the model knob to name {name}, version {target.name} (docs/kubernetes/rollouts.md, \"Rollout and rollback\")")
    if config.result_file:
        write_published(config.result_file, Published(name, int(target.name), target))
