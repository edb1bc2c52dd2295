"""The main job, end to end on the bundled digits: `make demo` (or `.venv/bin/python scripts/demo.py`).

prepare data → train ResNet50 → test report → export ONNX to model_repository/ (fp32, and int8 through
its accuracy gate), each version signed with a demo publisher key → stage the fp32 version as a
Kubernetes pod does (its signature against the trusted public key, every file against its
SHA256SUMS) → real Triton and the drift monitor → the version's golden answers from the server →
classify the test split over gRPC with both, fp32's predictions recorded by the monitor (no drift),
then the test split with inverted contrast (drift flagged) → a small synthetic whole slide made of the
test split's digits, classified tile by tile with `python -m histoserve.client slide` → 30 s Locust run on fp32, 15 s on int8 →
stop Triton and the monitor → summary.
Every step is the documented command line, printed before it runs, so each can be rerun by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from histoserve.formats.version import GoldenAnswers, read_published, version_folder
from histoserve.loadtest.report import plot_history, read_summary
from histoserve.serve.server import wait_for_readiness
from histoserve.serve.triton_flags import free_ports

ROOT = Path(__file__).resolve().parent.parent

PYTHON = sys.executable


def step(title: str, command: list[str], **kwargs) -> subprocess.CompletedProcess:
    print(f"\n=== {title}\n$ {shlex.join(str(c) for c in command)}", flush=True)
    result = subprocess.run([str(c) for c in command], cwd=ROOT, **kwargs)
    if result.returncode != 0:
        sys.exit(f"demo: step '{title}' failed with exit code {result.returncode}")
    return result


def start_server(repository: Path, ports) -> subprocess.Popen:
    command = [PYTHON, "-m", "histoserve.serve", "--model-repository", repository,
               "--http-port", ports.http, "--grpc-port", ports.grpc, "--metrics-port", ports.metrics]
    print(f"\n=== serve (background)\n$ {shlex.join(str(c) for c in command)}", flush=True)
    server = subprocess.Popen([str(c) for c in command], cwd=ROOT)  # its output goes to this terminal
    if not wait_for_readiness(f"http://127.0.0.1:{ports.http}", 300, server):
        stop_server(server)
        sys.exit(f"demo: the server did not become ready (exit code {server.poll()})")
    return server


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


def writer_token(path: Path) -> Path:
    """The monitor's writer token for this demo (owner-only file): the monitor refuses writers without it."""
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_urlsafe(32) + "\n")
    return path


def start_monitor(repository: Path, port: int, records: Path, token: Path) -> subprocess.Popen:
    for stale in (records, records.with_name(records.name + ".1")):  # a new monitor would replay them
        stale.unlink(missing_ok=True)
    command = [PYTHON, "-m", "histoserve.monitor", "serve", "--repository", repository, "--port", port, "--window", 300,
               "--record-file", records, "--token-file", token]
    print(f"\n=== monitor (background)\n$ {shlex.join(str(c) for c in command)}", flush=True)
    monitor = subprocess.Popen([str(c) for c in command], cwd=ROOT)
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
            return monitor
        except OSError:
            if monitor.poll() is not None:
                break
            time.sleep(0.2)
    stop_server(monitor)
    sys.exit(f"demo: the monitor did not start (exit code {monitor.poll()})")


def monitor_verdict(port: int, model: str) -> str:
    """One line from the monitor's report on `model`'s newest version."""
    entries = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/report", timeout=30).read())
    entry = max((e for e in entries if e["model"] == model), key=lambda e: int(e["version"]), default=None)
    if entry is None or "tests" not in entry:
        return f"no verdict ({entry and entry.get('status')})"
    drifted = [t["name"] for t in entry["tests"] if t["drifted"]]
    accuracy = (f"estimated accuracy {entry['estimated_accuracy']:.3f} "
                f"({entry['estimated_accuracy_low']:.3f}–{entry['estimated_accuracy_high']:.3f}) "
                f"vs {entry['baseline_expected_accuracy']:.3f} at export")
    if not entry["drift"]:
        return f"no drift over the last {entry['window_size']} predictions (version {entry['version']}); {accuracy}"
    return (f"DRIFT over the last {entry['window_size']} predictions (version {entry['version']}): "
            f"{', '.join(drifted) or 'accuracy drop'}; {accuracy}")


def inverted_copy(folder: Path, target: Path) -> Path:
    """The test split with inverted contrast: a shift the monitor must flag."""
    from PIL import Image, ImageOps

    for path in sorted(folder.rglob("*.png")):
        out = target / path.relative_to(folder)
        out.parent.mkdir(parents=True, exist_ok=True)
        ImageOps.invert(Image.open(path).convert("RGB")).save(out)
    return target


def classify(data: Path, ports, model: str, title: str, show: int, monitor: tuple[str, Path] | None = None,
             folder: Path | None = None) -> tuple[list[dict], float]:
    """Classify the test split with `python -m histoserve.client classify`; the rows and the top-1 accuracy.
    `monitor`: the monitor's URL and the writer token file."""
    result = step(title, [
        PYTHON, "-m", "histoserve.client", "classify", folder or data / "test", "--url", f"127.0.0.1:{ports.grpc}",
        "--model", model, "--top-k", 3, "--json",
        *(["--monitor-url", monitor[0], "--monitor-token-file", monitor[1]] if monitor else []),
    ], stdout=subprocess.PIPE, text=True)
    served = [json.loads(line) for line in result.stdout.splitlines()]
    correct = 0
    for i, row in enumerate(served):
        truth = Path(row["path"]).parent.name
        top = row["predictions"][0]["label"] if row["predictions"] else None
        correct += top == truth
        if i < show:
            scores = ", ".join(f"{p['label']} {p['score']:.3f}" for p in row["predictions"])
            print(f"  {Path(row['path']).relative_to(data)}  true {truth}  →  {scores}")
    accuracy = correct / max(1, len(served))
    print(f"  ... {len(served)} files classified by {model}, served top-1 accuracy {accuracy:.4f}")
    return served, accuracy


SLIDE_COLUMNS, SLIDE_ROWS, SLIDE_MPP = 18, 15, 0.5  # the demo slide: 270 tiles, the test split, at 20× (digits are no tissue)


def write_digit_slide(path: Path, files: list[Path], spec) -> list[tuple[int, int, Path]]:
    """A small whole-slide image from the test split: a pyramidal, tiled, zlib TIFF with resolution tags
    (what OpenSlide reads as generic-tiff), each of its SLIDE_COLUMNS × SLIDE_ROWS tiles one digit at the
    model's resize size, resized as the model's own preprocessing resizes a file: every tile's centre crop
    is then exactly the pixels `classify` sends for that file. Returns each tile's origin and file."""
    import numpy as np
    import tifffile
    from PIL import Image

    from histoserve.formats.preprocessing import PreprocessSpec, resize_and_center_crop, to_rgb

    side = spec.resize_size
    square = PreprocessSpec(side, side, spec.interpolation)
    pixels = np.zeros((SLIDE_ROWS * side, SLIDE_COLUMNS * side, 3), np.uint8)
    placed = []
    for i, file in enumerate(files[:SLIDE_COLUMNS * SLIDE_ROWS]):
        row, column = divmod(i, SLIDE_COLUMNS)
        tile = resize_and_center_crop(to_rgb(Image.open(file)), square)
        pixels[row * side:(row + 1) * side, column * side:(column + 1) * side] = np.asarray(tile)
        placed.append((column * side, row * side, file))
    with tifffile.TiffWriter(path) as tiff:
        for level in range(2):  # level 0 and one halving: a pyramid, as scanners write
            image = pixels if level == 0 else np.asarray(Image.fromarray(pixels).resize(
                (pixels.shape[1] // 2, pixels.shape[0] // 2), Image.Resampling.BOX))
            mpp = SLIDE_MPP * 2 ** level
            tiff.write(image, tile=(128, 128), compression="zlib", photometric="rgb", subfiletype=1 if level else 0,
                       resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    return placed


def classify_slide(ports, model: str, data: Path, title: str, served: list[dict]) -> dict:
    """Write the demo slide, classify it with `python -m histoserve.client slide` (every tile: --min-tissue 0, the
    digits being grey, not stained), and say how fast, whether each tile got its file's label from step 4
    (`served`), and where the results are."""
    import csv
    import shutil

    from histoserve.client.classifier import TritonClassifier

    with TritonClassifier(f"127.0.0.1:{ports.grpc}", model) as classifier:
        spec = classifier.spec
    slide, out = RUN / "demo-slide.tiff", RUN / "slides"
    placed = write_digit_slide(ROOT / slide, sorted((ROOT / data / "test").rglob("*.png")), spec)
    shutil.rmtree(ROOT / out / slide.stem, ignore_errors=True)  # a fresh run, not "already done"
    started = time.monotonic()
    result = step(title, [PYTHON, "-m", "histoserve.client", "slide", slide, "--url", f"127.0.0.1:{ports.grpc}", "--model", model,
                          "--out", out, "--min-tissue", 0, "--json"], stdout=subprocess.PIPE, text=True)
    seconds = time.monotonic() - started
    summary = json.loads(result.stdout.splitlines()[-1])["summary"]
    with open(ROOT / out / slide.stem / "tiles.csv", newline="") as handle:
        labels = {(int(r["x"]), int(r["y"])): r["label"] for r in csv.DictReader(handle)}
    by_file = {Path(row["path"]).parts[-2:]: row["predictions"][0]["label"] for row in served if row["predictions"]}
    same = sum(labels.get((x, y)) == by_file.get(file.parts[-2:]) for x, y, file in placed)
    right = sum(labels.get((x, y)) == file.parent.name for x, y, file in placed)
    tiles = summary["tiles"]["classified"]
    folder = out / slide.stem
    print(f"  {tiles} tiles of {summary['level0_size'][0]}×{summary['level0_size'][1]} px in {seconds:.1f} s: "
          f"{tiles / seconds:.0f} tiles/s (the whole command, start-up included); {same} of {len(placed)} tiles got the "
          f"label their PNG got in step 4, {right} show their true digit")
    print(f"  heatmap: {folder / summary['thumbnail']['heatmap']}  (tiles.csv, tiles.geojson, summary.json beside it)")
    return {"tiles": tiles, "seconds": seconds, "same": same, "placed": len(placed), "heatmap": folder / summary["thumbnail"]["heatmap"]}


def load_test(title: str, ports, model: str, data: Path, users: int, seconds: int, prefix: Path) -> None:
    step(title, [
        PYTHON, "-m", "histoserve.loadtest", "locust", "--headless", "--users", users,
        "--spawn-rate", users, "--run-time", f"{seconds}s", "--only-summary",
        "--triton-url", f"127.0.0.1:{ports.grpc}", "--model", model, "--images", data / "test",
        "--csv", prefix, "--html", prefix.with_suffix(".html"),
    ])


DATA, RUN, REPOSITORY, REPORTS = Path("data/digits"), Path("runs/demo"), Path("model_repository"), Path("reports")
MODEL = "digits"


@dataclass
class Outcome:
    """What the serving half of the demo saw, for the summary."""

    served: list[dict]
    served_accuracy: float
    int8_accuracy: float
    shifted_accuracy: float
    unshifted: str
    shifted: str
    records: Path
    slide: dict


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--load-seconds", type=int, default=30)
    parser.add_argument("--users", type=int, default=8)
    return parser


def train_and_publish(args) -> int:
    """Steps 1 to 3b: demo data, training, export (fp32 and int8) and staging; the published version."""
    step("1. demo data: scikit-learn's digits as an ImageFolder tree", [PYTHON, "-m", "histoserve.train", "demo-data", DATA])
    step("2. train + test report", [
        PYTHON, "-m", "histoserve.train", "fit", "--data", DATA, "--out", RUN, "--arch", args.arch, "--weights", "none",
        "--epochs", args.epochs, "--resize-size", 36, "--crop-size", 32, "--batch-size", 64, "--augment", "light",
    ])
    published = RUN / "published"
    signing_key, trusted = publisher_keys(RUN / "keys")
    step("3. export: ONNX, parity gate, golden answers, provenance and model card, signed: Triton model repository",
         [PYTHON, "-m", "histoserve.export", RUN / "checkpoint.pt", "--repository", REPOSITORY, "--name", MODEL, "--result-file", published,
          "--signing-key", signing_key], stdout=subprocess.DEVNULL)
    version = read_published(ROOT / published).version
    step(f"3a. stage version {version} as a pod's init container does: copy it, check its signature and every file",
         [PYTHON, "-m", "histoserve.serve", "stage", "--store", REPOSITORY, "--published", published, "--target", RUN / "pod",
          "--trusted-keys", trusted])
    gate = step("3b. export int8: calibrate on training images, accuracy gate against fp32, publish as digits-int8", [
        PYTHON, "-m", "histoserve.export", RUN / "checkpoint.pt", "--repository", REPOSITORY, "--name", MODEL, "--precision", "int8",
        "--signing-key", signing_key,
    ], stdout=subprocess.PIPE, text=True)
    print(next((line for line in gate.stdout.splitlines() if "accuracy gate" in line), ""))
    return version


def publisher_keys(folder: Path) -> tuple[Path, Path]:
    """The demo's publisher: an EC P-256 key pair made once (what `openssl ecparam -name prime256v1
    -genkey -noout -out publisher.key` and `openssl ec -in publisher.key -pubout` make), and a folder
    of trusted public keys holding its public half (the cluster's ConfigMap histoserve-model-trust)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private, trusted = ROOT / folder / "publisher.key", ROOT / folder / "trusted"
    if not private.exists():
        trusted.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        os.chmod(private, 0o600)
        (trusted / "publisher.pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, trusted


def serve_and_measure(args, version: int) -> Outcome:
    """Steps 3c to 6: the real Triton and the monitor started, golden answers, classification (plain,
    int8, shifted), load tests, both stopped."""
    ports = free_ports()
    server = start_server(REPOSITORY, ports)
    monitor_port = free_ports().http
    records = RUN / "monitor-records.jsonl"
    token = writer_token(RUN / "monitor-token")
    monitor = start_monitor(REPOSITORY, monitor_port, records, token)
    writer = (f"http://127.0.0.1:{monitor_port}", token)
    try:
        step(f"3c. golden answers: version {version} must give them before a pod serving it is Ready", [
            PYTHON, "-m", "histoserve.serve", "golden-gate", "--once", "--repository", RUN / "pod", "--model", MODEL, "--version", version,
            "--url", f"127.0.0.1:{ports.grpc}"])
        served, served_accuracy = classify(DATA, ports, MODEL, "4. classify the test split over gRPC, records to the monitor "
                                           "(first lines shown)", show=8, monitor=writer)
        unshifted = monitor_verdict(monitor_port, MODEL)
        print(f"  monitor: {unshifted}")
        _, int8_accuracy = classify(DATA, ports, f"{MODEL}-int8", "4b. the same with the int8 model", show=0)
        _, shifted_accuracy = classify(DATA, ports, MODEL, "4c. a shifted batch: the test split with inverted contrast",
                                       show=0, monitor=writer, folder=inverted_copy(DATA / "test", RUN / "inverted"))
        shifted = monitor_verdict(monitor_port, MODEL)
        print(f"  monitor: {shifted}")
        slide = classify_slide(ports, MODEL, DATA, "4d. a whole slide: the test split's digits as a pyramidal tiled TIFF, "
                                                     "classified tile by tile", served)

        REPORTS.mkdir(exist_ok=True)
        load_test(f"5. load test: {args.users} gRPC users for {args.load_seconds}s", ports, MODEL, DATA, args.users,
                  args.load_seconds, REPORTS / "locust")
        load_test(f"5b. load test on the int8 model: {args.users} users for {args.load_seconds // 2}s", ports, f"{MODEL}-int8",
                  DATA, args.users, args.load_seconds // 2, REPORTS / "locust-int8")
    finally:
        print("\n=== 6. stop the server and the monitor", flush=True)
        stop_server(server)
        stop_server(monitor)
    return Outcome(served, served_accuracy, int8_accuracy, shifted_accuracy, unshifted, shifted, records, slide)


def print_summary(args, version: int, outcome: Outcome, minutes: float) -> int:
    """The summary table; 0 when both load tests had no failure."""
    metrics = json.loads((ROOT / RUN / "test_metrics.json").read_text())
    golden_count = len(GoldenAnswers.read(version_folder(ROOT / RUN / "pod", MODEL, version))[0].top1)
    load = read_summary(ROOT / REPORTS / "locust")
    load_int8 = read_summary(ROOT / REPORTS / "locust-int8")
    plot = plot_history(ROOT / REPORTS / "locust")
    print(f"""
=== summary ({minutes:.1f} min)
  test accuracy (PyTorch, {metrics['images']} images)   {metrics['accuracy']:.4f}
  served accuracy (Triton, {len(outcome.served)} images)  {outcome.served_accuracy:.4f}
  served accuracy, int8 model          {outcome.int8_accuracy:.4f}  ({100 * (outcome.int8_accuracy - outcome.served_accuracy):+.2f} points)
  version {version}, as a pod checks it      signed by a trusted key, files match SHA256SUMS, {golden_count} golden answers right
  monitor, the test split              {outcome.unshifted}
  monitor, inverted contrast           {outcome.shifted}
      (served accuracy on the inverted images {outcome.shifted_accuracy:.4f}; offline, with plots:
       python -m histoserve.monitor report {outcome.records} --window 270 --out reports/monitor)
  whole slide ({outcome.slide['tiles']} tiles)           {outcome.slide['tiles'] / outcome.slide['seconds']:.0f} tiles/s, \
{outcome.slide['same']} of {outcome.slide['placed']} tiles labelled as their PNG; heatmap {outcome.slide['heatmap']}
  load test ({args.users} users, {args.load_seconds}s, batch 1, 3×32² uint8)
{load.table()}
  int8 ÷ fp32 served throughput        {load_int8.requests_per_second / load.requests_per_second:.2f}×  \
({load_int8.requests_per_second:.1f} vs {load.requests_per_second:.1f} req/s)
      (ResNet50 at 32²; benchmarks/serving.py measures it at 224²)
  reports
    test report         {RUN / 'test_report.txt'}
    confusion matrix    {RUN / 'test_confusion_matrix.png'}
    training curves     {RUN / 'training_curves.png'}
    model repository    {REPOSITORY / MODEL}
    locust              {REPORTS / 'locust.html'}, {REPORTS / 'locust_stats.csv'}
    latency plot        {plot.relative_to(ROOT)}""")
    return 0 if load.failures == 0 and load_int8.failures == 0 else 1


def main() -> int:
    args = build_parser().parse_args()
    started = time.monotonic()
    version = train_and_publish(args)
    outcome = serve_and_measure(args, version)
    return print_summary(args, version, outcome, (time.monotonic() - started) / 60)

if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
