"""What a version says about itself, read against the run that made it: provenance.intoto.json (the
data's, code's and checkpoint's digests, the options, the gates) and the model card (the published
model's figures on the held-out split, recomputed here from model.onnx), both covered by model.sig;
and `python -m histoserve.export` refuses to publish without the facts they need."""

from __future__ import annotations

import hashlib
import json
import subprocess

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, precision_recall_fscore_support

from histoserve.export.model_card import CLINICAL_CAVEAT, MODEL_CARD_FILE, MODEL_CARD_JSON
from histoserve.export.provenance import PROVENANCE_FILE, SOURCE_COMMIT_VARIABLE, ProvenanceError, source_facts
from histoserve.formats.preprocessing import preprocess_file
from histoserve.formats.signing import SignatureError, verify_signature
from histoserve.formats.version import sha256_of
from histoserve.train.checkpoint import load_checkpoint, training_splits
from histoserve.train.evaluate import expected_calibration_error
from tests.conftest import MODEL, ROOT, run_cli
from tests.publisher_keys import session_publisher

SERVING_FILES = ["config.pbtxt", "cpu.pbtxt", "drift_baseline.json", "golden.json", "golden_inputs.npy", "identity.json", "labels.txt",
                 "model.onnx"]


def read_json(path):
    return json.loads(path.read_text())


def test_the_provenance_names_the_data_code_options_checkpoint_and_gates_of_the_run(repository, trained_run):
    folder = repository / MODEL / "1"
    statement = read_json(folder / PROVENANCE_FILE)
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    assert {s["name"]: s["digest"]["sha256"] for s in statement["subject"]} == {n: sha256_of(folder / n) for n in SERVING_FILES}
    build = statement["predicate"]["buildDefinition"]
    dependencies = {d["name"]: d for d in build["resolvedDependencies"]}
    assert dependencies["checkpoint"]["digest"]["sha256"] == sha256_of(trained_run / "checkpoint.pt")
    recorded = read_json(trained_run / "config.json")
    recorded.pop("world_size")
    assert build["externalParameters"]["training"] == recorded
    assert build["externalParameters"]["export"]["name"] == MODEL and build["externalParameters"]["export"]["precision"] == "fp32"
    assert "signing_key" not in build["externalParameters"]["export"]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert dependencies["source"]["digest"]["gitCommit"] == head

    # The data: the documented listing (split, label, path, file sha256 per image), recomputed here.
    _, meta = load_checkpoint(trained_run / "checkpoint.pt")
    splits = training_splits(meta).splits
    listing = "".join(f"{split}\t{s.label}\t{s.path.relative_to(meta.data_root).as_posix()}\t{sha256_of(s.path)}\n"
                      for split in sorted(splits) for s in sorted(splits[split], key=lambda s: str(s.path)))
    data = dependencies["training data"]
    assert data["digest"]["sha256"] == hashlib.sha256(listing.encode()).hexdigest()
    assert {k: v["images"] for k, v in data["annotations"]["splits"].items()} == {k: len(v) for k, v in splits.items()}
    gates = {b["name"]: b["annotations"] for b in statement["predicate"]["runDetails"]["byproducts"]}
    assert gates["gate: parity"]["top1_mismatches"] == 0 and gates["gate: parity"]["max_abs_diff"] <= gates["gate: parity"]["atol"]
    assert gates["gate: golden answers"]["images"] == len(read_json(folder / "golden.json")["top1"])
    assert "gate: accuracy" not in gates
    int8_statement = read_json(repository / f"{MODEL}-int8" / "1" / PROVENANCE_FILE)
    int8 = {b["name"]: b["annotations"] for b in int8_statement["predicate"]["runDetails"]["byproducts"]}
    assert int8["gate: accuracy"]["precision"] == "int8" and int8["gate: accuracy"]["agreement"] >= 0.95


def test_the_model_card_reports_the_published_model_on_the_held_out_split(repository, trained_run):
    """Its figures recomputed from the version's own model.onnx on the test split, by scikit-learn."""
    import onnxruntime

    folder = repository / MODEL / "1"
    card = read_json(folder / MODEL_CARD_JSON)
    _, meta = load_checkpoint(trained_run / "checkpoint.pt")
    test = training_splits(meta).splits["test"]
    images = np.stack([preprocess_file(s.path, meta.preprocess) for s in test])
    labels = np.array([s.label for s in test])
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    probabilities = np.concatenate([session.run(None, {"image": images[i:i + 64]})[0] for i in range(0, len(images), 64)])
    predicted = probabilities.argmax(1)
    evaluation = card["evaluation"]
    assert (evaluation["split"], evaluation["images"]) == ("test", len(test))
    assert evaluation["accuracy"] == pytest.approx(float((predicted == labels).mean()))
    assert evaluation["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predicted))
    assert evaluation["ece"] == pytest.approx(expected_calibration_error(probabilities, labels)[0], abs=1e-6)
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=range(len(meta.class_names)),
                                                                     zero_division=0)
    for i, label in enumerate(meta.class_names):
        row = evaluation["per_class"][label]
        assert (row["precision"], row["recall"], row["f1-score"], row["support"]) == pytest.approx(
            (precision[i], recall[i], f1[i], support[i])), label
    assert card["data"]["splits"]["train"]["per_class"] == np.bincount([s.label for s in training_splits(meta).splits["train"]],
                                                                        minlength=len(meta.class_names)).tolist()
    assert card["reduced_precision"] is None and card["precision"] == "fp32" and card["clinical_caveat"] == CLINICAL_CAVEAT
    golden = read_json(folder / "golden.json")
    assert card["golden"]["count"] == len(golden["top1"]) and card["golden"]["tolerance"] == golden["tolerance"]
    assert card["drift_baseline"]["sample_size"] == read_json(folder / "drift_baseline.json")["sample_size"]
    assert card["provenance"]["checkpoint_sha256"] == sha256_of(trained_run / "checkpoint.pt")

    markdown = (folder / MODEL_CARD_FILE).read_text()
    assert CLINICAL_CAVEAT in markdown and f"Balanced accuracy {evaluation['balanced_accuracy']:.4f}".lower() in markdown.lower()
    for label in meta.class_names:
        row = evaluation["per_class"][label]
        assert f"| {label} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1-score']:.4f} | {int(row['support'])} |" in markdown
    int8 = read_json(repository / f"{MODEL}-int8" / "1" / MODEL_CARD_JSON)
    assert int8["reduced_precision"]["precision"] == "int8" and "agreement" in int8["reduced_precision"]
    assert "int8 against the fp32 model" in (repository / f"{MODEL}-int8" / "1" / MODEL_CARD_FILE).read_text()


def test_the_signature_covers_the_provenance_and_the_card(repository, tmp_path):
    import shutil

    folder = shutil.copytree(repository / MODEL / "1", tmp_path / "1")
    trusted = [session_publisher()[0].public]
    assert verify_signature(folder, trusted).files == len(SERVING_FILES) + 4  # + provenance, card, its JSON, SHA256SUMS
    card = folder / MODEL_CARD_FILE
    card.chmod(0o644)
    card.write_text(card.read_text().replace("Not validated for diagnosis", "Validated for diagnosis"))
    with pytest.raises(SignatureError, match=r"MODEL_CARD\.md: altered after signing"):
        verify_signature(folder, trusted)


@pytest.mark.parametrize("change, message", [
    ({"config": {}}, "records no training options"),
    ({"data_sha256": ""}, "records no digest of its training data"),
    ({"data_sha256": "0" * 64}, "the training data changed since training"),
], ids=["no-options", "no-data-digest", "data-changed"])
def test_without_the_facts_of_the_run_nothing_is_published(trained_run, tmp_path, change, message):
    payload = torch.load(trained_run / "checkpoint.pt", weights_only=True)
    payload.update(change)
    torch.save(payload, tmp_path / "old.pt")
    result = run_cli("-m", "histoserve.export", tmp_path / "old.pt", "--repository", tmp_path / "repo", "--name", MODEL,
                     check=False, timeout=180)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert "exporting" not in result.stdout and not (tmp_path / "repo" / MODEL / "1").exists()


def test_a_key_that_cannot_sign_is_refused_before_the_export(trained_run, tmp_path):
    (tmp_path / "signing.key").write_text("not a key")
    result = run_cli("-m", "histoserve.export", trained_run / "checkpoint.pt", "--repository", tmp_path / "repo", "--name", MODEL,
                     "--signing-key", tmp_path / "signing.key", check=False, timeout=180)
    assert result.returncode == 1 and f"{tmp_path / 'signing.key'}: not a usable signing key" in result.stderr, result.stderr
    assert "exporting" not in result.stdout and not (tmp_path / "repo" / MODEL / "1").exists()


def test_the_source_commit_comes_from_git_or_the_image_and_is_required(tmp_path, monkeypatch):
    monkeypatch.delenv(SOURCE_COMMIT_VARIABLE, raising=False)
    with pytest.raises(ProvenanceError, match=f"is not a git checkout and {SOURCE_COMMIT_VARIABLE} is not set"):
        source_facts(tmp_path)
    monkeypatch.setenv(SOURCE_COMMIT_VARIABLE, "0123abc")
    assert (source_facts(tmp_path).commit, source_facts(tmp_path).found_by) == ("0123abc", SOURCE_COMMIT_VARIABLE)
    assert source_facts(ROOT).found_by == "git"


def test_patients_are_counted_per_split_never_named(tmp_path):
    """Data that names patients (a prepared manifest's groups): the card counts them per split and
    says so in its table; no identifier reaches the provenance or the card."""
    from histoserve.export.model_card import limitations
    from histoserve.export.provenance import data_facts
    from histoserve.train.data import Sample

    (tmp_path / "manifest.csv").write_text("path,label,group\n")
    splits = {"train": [Sample(tmp_path / f"{i}.png", i % 2, f"patient-{i // 3}") for i in range(12)],
              "test": [Sample(tmp_path / f"t{i}.png", i % 2, f"patient-x{i // 2}") for i in range(4)]}
    facts = data_facts(tmp_path / "manifest.csv", splits, 2, sha256_of(tmp_path / "manifest.csv"))
    assert facts.kind == "manifest-csv" and facts.sha256 == sha256_of(tmp_path / "manifest.csv")
    assert (facts.splits["train"].patients, facts.splits["test"].patients) == (4, 2)
    assert facts.splits["train"].per_class == [6, 6]
    assert "patient-" not in json.dumps({k: vars(v) for k, v in facts.splits.items()})
    found = limitations({"images": 4, "uri": "x", "support": {"a": 2, "b": 2}, "patients": 2})
    assert not any("names no patients" in line for line in found) and any("Fewer than 30" in line for line in found)
