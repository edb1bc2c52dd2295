"""MODEL_CARD.md and its JSON twin model_card.json: what a clinic's reviewer asks first, written from
this export's own measurements (never typed in by hand), and covered by the version's signature.

Every figure is the *published* model's (the ONNX file at its precision, run by ONNX Runtime on the
CPU) on the held-out split export measured the drift baseline on (`--baseline-split`, test by
default), computed by the same function as training's report (train/evaluate.py `summarize`):
per-class precision, recall and F1, balanced accuracy, expected calibration error (15 bins) and,
when the data names patients, patient-level figures (mean probability per patient).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

MODEL_CARD_FILE, MODEL_CARD_JSON = "MODEL_CARD.md", "model_card.json"
MODEL_CARD_FORMAT, MODEL_CARD_FORMAT_VERSION = "histoserve.model-card", 1
DEFAULT_INTENDED_USE = (
    "Research use: classifies image patches into the classes below, as a decision-support signal for "
    "people who review the images. Not validated for diagnosis."
)
CLINICAL_CAVEAT = (
    "This model is not a medical device and has not been cleared or approved by any regulator. Its output must "
    "not be used to diagnose, treat or triage a patient without review by a qualified pathologist, and its "
    "figures hold only for images like its held-out split (same source, scanners, stains and magnification)."
)


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: int
    precision: str
    intended_use: str
    clinical_caveat: str
    architecture: str
    classes: list[str]
    input: dict             # geometry and preprocessing as the contract states it
    data: dict              # provenance.DataFacts as a dict
    evaluation: dict        # summarize() of the published model on the held-out split, and its split
    reduced_precision: dict | None  # the accuracy gate against fp32 (int8 / fp16 versions)
    golden: dict
    drift_baseline: dict
    limitations: list[str]
    provenance: dict        # commit, checkpoint sha256, data sha256

    def to_json(self) -> str:
        return json.dumps({"format": MODEL_CARD_FORMAT, "format_version": MODEL_CARD_FORMAT_VERSION, **asdict(self)}, indent=2) + "\n"

    def to_markdown(self) -> str:
        lines: list[str] = []
        add = lines.append
        add(f"# Model card: {self.name}, version {self.version}\n")
        add("## Intended use\n")
        add(f"{self.intended_use}\n")
        add(f"**Clinical caveat.** {self.clinical_caveat}\n")
        add("## Model\n")
        add(f"- Architecture: {self.architecture}, precision {self.precision}, exported to ONNX and served by Triton")
        add(f"- Classes ({len(self.classes)}): {', '.join(self.classes)}")
        add(f"- Input: {self.input['description']}\n")
        add("## Data and splits\n")
        add(f"Training data `{self.data['uri']}` ({self.data['kind']}, sha256 `{self.data['sha256']}`).\n")
        patients = any(s["patients"] is not None for s in self.data["splits"].values())
        add("| split | images | " + ("patients | " if patients else "") + " | ".join(self.classes) + " |")
        add("|---|---:|" + ("---:|" if patients else "") + "---:|" * len(self.classes))
        for split, facts in self.data["splits"].items():
            add(f"| {split} | {facts['images']} | " + (f"{facts['patients'] or '—'} | " if patients else "")
                + " | ".join(map(str, facts["per_class"])) + " |")
        add("")
        lines += self._performance_markdown()
        lines += self._gates_markdown()
        add("## Limitations\n")
        lines.extend(f"- {item}" for item in self.limitations)
        add("")
        add("## Provenance\n")
        p = self.provenance
        add(f"Source commit `{p['commit']}`{' (with uncommitted changes)' if p['dirty'] else ''}; checkpoint sha256 "
            f"`{p['checkpoint_sha256']}`; training data sha256 `{self.data['sha256']}`. The full statement is "
            "provenance.intoto.json; model.sig signs every file of this version, this card included.")
        return "\n".join(lines) + "\n"

    def _performance_markdown(self) -> list[str]:
        e, lines = self.evaluation, []
        add = lines.append
        add(f"## Performance: the published model on the {e['split']} split ({e['images']} images)\n")
        add(f"- Accuracy {e['accuracy']:.4f}, balanced accuracy {e['balanced_accuracy']:.4f}"
            + (f", ROC AUC (one-vs-rest) {e['roc_auc_ovr']:.4f}" if e.get("roc_auc_ovr") is not None else ""))
        add(f"- Calibration: expected calibration error {e['ece']:.4f} (15 equal-width confidence bins)\n")
        add("| class | precision | recall | F1 | support |")
        add("|---|---:|---:|---:|---:|")
        for label in self.classes:
            row = e["per_class"][label]
            add(f"| {label} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1-score']:.4f} | {int(row['support'])} |")
        add("")
        if patient := e.get("patient_level"):
            add(f"Patient level ({patient['patients']} patients, mean probability per patient): accuracy "
                f"{patient['accuracy']:.4f}, balanced accuracy {patient['balanced_accuracy']:.4f}, patient score "
                f"{patient['patient_score']:.4f}.\n")
        return lines

    def _gates_markdown(self) -> list[str]:
        lines: list[str] = []
        add = lines.append
        add("## Reduced precision\n")
        if r := self.reduced_precision:
            drop = 100 * r["accuracy_drop"]
            add(f"{r['precision']} against the fp32 model on {r['images']} held-out images: top-1 agreement {r['agreement']:.4f}, "
                f"accuracy {r['accuracy']:.4f} vs fp32 {r['fp32_accuracy']:.4f} (drop {drop:+.2f} "
                f"points; the gate allows at most {100 * r['max_accuracy_drop']:.2f} and needs agreement {r['min_agreement']:.4f}).\n")
        else:
            add("This version is fp32: no INT8 or FP16 delta applies. A reduced-precision version is published as "
                f"{self.name}-int8 or {self.name}-fp16, with its own card and its deltas against fp32.\n")
        add("## Golden set\n")
        add(f"{self.golden['count']} held-out images (classes {', '.join(self.golden['labels'])}) that every server of this "
            f"version must answer with the same top-1 class and probabilities within {self.golden['tolerance']:g} before it "
            "takes traffic (golden.json, golden_inputs.npy).\n")
        add("## Drift baseline\n")
        b = self.drift_baseline
        add(f"{b['sample_size']} {b['split']} images: accuracy {b['accuracy']:.4f}, mean top-1 probability "
            f"{b['expected_accuracy']:.4f}; predicted class shares {', '.join(f'{k} {v:.3f}' for k, v in b['predicted_shares'].items())}. "
            "The drift monitor compares served traffic with these (drift_baseline.json).\n")
        return lines


def limitations(card_facts: dict) -> list[str]:
    """What the figures above do not show, stated from the facts themselves."""
    found = [
        f"Measured on {card_facts['images']} held-out images from the same source as the training data "
        f"({card_facts['uri']}); other scanners, stains, labs, magnifications or tissue types are not measured.",
        "Every input gets one of the classes listed, including images of none of them (blank glass, pen marks, "
        "out-of-focus regions, other tissue): screen inputs, and watch the drift monitor.",
    ]
    found.append("The probabilities are calibrated (temperature scaling on the validation split) only for data like it; "
                 "a shifted input distribution degrades calibration before accuracy." if card_facts.get("calibrated") else
                 "The probabilities are not calibrated (trained without temperature scaling): read them as scores, "
                 "not as frequencies.")
    if small := [label for label, support in card_facts["support"].items() if support < 30]:
        found.append(f"Fewer than 30 held-out images for: {', '.join(small)}; their per-class figures are uncertain.")
    if card_facts["patients"] is None:
        found.append("The data names no patients: the splits may share patients, and figures per patient are not available.")
    return found
