"""Whole-slide speed: `python -m histoserve.client slide` against the served model's own capacity, in one run.

    .venv/bin/python benchmarks/slide.py [--checkpoint runs/x/checkpoint.pt] [--region-mm2 2] [--seconds 10]
    .venv/bin/python benchmarks/slide.py --region-mm2 20     # the whole 20 mm² region, measured (≈1 GB of pixels)

One machine, one run, so the ratio means something (these machines drift):
1. the model: one epoch of ResNet18 at 32×32 on the bundled digits (`python -m histoserve.train fit ... --resize-size 36
   --crop-size 32`, as tests/conftest.py trains it), or --checkpoint; `python -m histoserve.export` at fp32 with its
   default batching (max batch 16); the local real Triton (`python -m histoserve.serve`'s TritonServer);
2. a synthetic slide: a tissue region of --region-mm2 at 0.25 µm/px (40×), every pixel tissue (the test
   split's digits, coloured pink and purple like H&E, each 36 px: the model's resize size, so each tile is
   one digit and the preprocessing only crops it), written as a pyramidal, tiled (256²), zlib TIFF with
   resolution tags, which OpenSlide reads as generic-tiff;
3. the served capacity at the tile size: the client sending preprocessed uint8 batches of the model's max
   batch size (tiles of that slide), --concurrency requests in flight (the slide command's default), as
   fast as the server answers them: classifier.infer_probabilities in a thread pool for --seconds, before
   and after the slide rows (averaged);
4. `classify_slide` in this process (tiles/s from its call to its return, tissue mask and writing the
   results included), then `python -m histoserve.client slide SLIDE --min-tissue 0` as a subprocess: tiles/s over the
   whole command (interpreter start included) and in its steady state (from progress.csv's rows as they
   are written), and the peak memory of the command and its tile-reading workers together (their RSS summed,
   sampled every 50 ms) and of its largest single process (its VmHWM);
5. slide ÷ capacity (target ≥ 0.9; Triton, the client and its workers all share this machine's cores, so
   the tile reading and preprocessing the capacity rows do not do take CPU from the server), and the time
   for one 20 mm² region at 40×: measured when --region-mm2 is 20, else the measured region's time per mm²
   (steady rate, plus the command's fixed cost once) extrapolated, and said so.

Prints a table, writes slide.json and slide.png (tiles/s over the command's run against the capacity) under
--out. Run by hand: no test times anything.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from histoserve.client.classifier import TritonClassifier  # noqa: E402
from histoserve.client.slide import PROGRESS_CSV, TILES_CSV, SlideOptions, classify_slide  # noqa: E402
from histoserve.formats.preprocessing import find_images, preprocess_image  # noqa: E402
from histoserve.serve.server import TritonServer  # noqa: E402
from histoserve.serve.triton_flags import free_ports  # noqa: E402

MODEL = "digits"
MPP = 0.25                 # µm per pixel: 40×
TILE_PX = 36               # the model's resize size (--resize-size 36 --crop-size 32)
REGION_TARGET_MM2 = 20.0   # the region
PINK, PURPLE = np.array([232, 170, 205], np.float32), np.array([95, 40, 140], np.float32)  # eosin-ish, haematoxylin-ish


def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    print("$ " + " ".join(str(c) for c in command), flush=True)
    result = subprocess.run([str(c) for c in command], cwd=ROOT, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        sys.exit(f"failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return result


def build_model(work: Path, checkpoint: Path | None) -> Path:
    """The exported model repository: --checkpoint, or one epoch of ResNet18 at 32×32 on the digits."""
    if checkpoint is None:
        data = work / "digits"
        run([sys.executable, "-m", "histoserve.train", "demo-data", data])
        run([sys.executable, "-m", "histoserve.train", "fit", "--data", data, "--out", work / "run", "--arch", "resnet18", "--epochs", 1,
             "--resize-size", 36, "--crop-size", 32, "--batch-size", 64, "--augment", "light"])
        checkpoint = work / "run" / "checkpoint.pt"
    repository = work / "model_repository"
    run([sys.executable, "-m", "histoserve.export", checkpoint, "--repository", repository, "--name", MODEL])
    return repository


def digit_tiles(folder: Path, count: int = 256) -> list[np.ndarray]:
    """The test split's digits as TILE_PX² RGB tiles, coloured like H&E: background pink, strokes purple."""
    tiles = []
    for path in find_images(folder)[:count]:
        grey = np.asarray(Image.open(path).convert("L").resize((TILE_PX, TILE_PX), Image.Resampling.BILINEAR), np.float32) / 255
        tiles.append((PINK * (1 - grey[..., None]) + PURPLE * grey[..., None]).round().astype(np.uint8))
    return tiles


def write_region(path: Path, tiles: list[np.ndarray], mm2: float) -> tuple[int, int]:
    """A square tissue region of `mm2` at MPP as a pyramidal tiled TIFF (level 0 plus halvings down to
    under 1024 px); returns its side in pixels and its tile grid's side."""
    side_tiles = int(math.sqrt(mm2) * 1000 / MPP) // TILE_PX
    side = side_tiles * TILE_PX
    mosaic = 16  # a 16 × 16 block of different digits, repeated
    block = np.concatenate([np.concatenate(tiles[r * mosaic:(r + 1) * mosaic], axis=1) for r in range(mosaic)], axis=0)
    reps = math.ceil(side_tiles / mosaic)
    level = np.tile(block, (reps, reps, 1))[:side, :side]
    import tifffile

    with tifffile.TiffWriter(path, bigtiff=level.nbytes > 2**31) as tiff:
        scale = 1
        while True:
            resolution = (1e4 / (MPP * scale), 1e4 / (MPP * scale))
            tiff.write(level, tile=(256, 256), compression="zlib", photometric="rgb", subfiletype=1 if scale > 1 else 0,
                       resolution=resolution, resolutionunit="CENTIMETER")
            if max(level.shape[:2]) < 1024:
                break
            scale *= 2
            level = np.asarray(Image.fromarray(level).resize((level.shape[1] // 2, level.shape[0] // 2), Image.Resampling.BOX))
    return side, side_tiles


def capacity(classifier: TritonClassifier, batch: np.ndarray, concurrency: int, seconds: float) -> float:
    """Tiles/s the server answers for preprocessed batches sent back to back by `concurrency` threads."""
    stop, counts = threading.Event(), [0] * concurrency

    def sender(index: int) -> None:
        while not stop.is_set():
            classifier.infer_probabilities(batch)
            counts[index] += len(batch)

    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(sender, i) for i in range(concurrency)]
        time.sleep(min(1.0, seconds / 4))  # warm: every thread has a request in flight
        before, started = sum(counts), time.perf_counter()
        time.sleep(seconds)
        done, elapsed = sum(counts) - before, time.perf_counter() - started
        stop.set()
        for future in futures:
            future.result()
    return done / elapsed


class MemorySampler:
    """The summed RSS of a process and its descendants, sampled every 50 ms, and each one's own peak
    (the kernel's VmHWM, which a sample cannot miss): the peaks."""

    def __init__(self, pid: int):
        import psutil

        self.process, self.peak, self.peak_children, self.high_water = psutil.Process(pid), 0, 0, {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self) -> None:
        import psutil

        while not self.stop.is_set():
            try:
                children = self.process.children(recursive=True)
                sizes = [c.memory_info().rss for c in children]
                total = self.process.memory_info().rss + sum(sizes)
                for process in (self.process, *children):
                    self.high_water[process.pid] = max(self.high_water.get(process.pid, 0), vm_hwm(process.pid))
            except psutil.Error:
                break
            self.peak, self.peak_children = max(self.peak, total), max(self.peak_children, sum(sizes))
            time.sleep(0.05)

    def close(self) -> tuple[int, int, int]:
        self.stop.set()
        self.thread.join()
        return self.peak, self.peak_children, max(self.high_water.values(), default=0)


def vm_hwm(pid: int) -> int:
    """A process's peak resident set so far, in bytes (Linux: /proc/<pid>/status VmHWM)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def progress_rows(path: Path) -> int:
    try:
        with open(path, "rb") as handle:
            return max(0, handle.read().count(b"\n") - 2)  # the run line and the header
    except OSError:
        return -1


def slide_command(url: str, slide: Path, out: Path, options: SlideOptions) -> dict:
    """`python -m histoserve.client slide` as a user runs it: the whole command, its steady state, its memory."""
    command = [sys.executable, "-m", "histoserve.client", "slide", slide, "--url", url, "--model", MODEL, "--out", out, "--min-tissue", 0,
               "--workers", options.workers, "--concurrency", options.concurrency, "--json"]
    print("$ " + " ".join(str(c) for c in command), flush=True)
    progress, samples = out / slide.stem / PROGRESS_CSV, []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    process = subprocess.Popen([str(c) for c in command], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory = MemorySampler(process.pid)
    while process.poll() is None:
        rows = progress_rows(progress)
        if rows >= 0:
            samples.append((time.perf_counter() - started, rows))
        time.sleep(0.1)
    elapsed = time.perf_counter() - started
    peak, peak_children, single = memory.close()
    stdout, stderr = process.communicate()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if process.returncode != 0:
        sys.exit(f"python -m histoserve.client slide exited {process.returncode}:\n{stdout[-2000:]}\n{stderr[-2000:]}")
    summary = json.loads(stdout.splitlines()[-1])["summary"]
    tiles = summary["tiles"]["classified"]
    moving = [(t, r) for t, r in samples if r > 0]
    steady = (moving[-1][1] - moving[0][1]) / (moving[-1][0] - moving[0][0]) if len(moving) > 1 else float("nan")
    return {"tiles": tiles, "seconds": elapsed, "tiles_per_s": tiles / elapsed, "steady_tiles_per_s": steady,
            "peak_rss_tree_mb": peak / 2**20, "peak_rss_workers_mb": peak_children / 2**20,
            "max_single_process_rss_mb": single / 2**20,
            "cpu_s": sum(getattr(after, k) - getattr(before, k) for k in ("ru_utime", "ru_stime")),
            "progress": samples, "out": str(out / slide.stem)}


def in_process(classifier: TritonClassifier, slide: Path, out: Path, options: SlideOptions) -> dict:
    started = time.perf_counter()
    result = classify_slide(slide, classifier, out, options, progress=False)
    elapsed = time.perf_counter() - started
    tiles = result.summary["tiles"]["classified"]
    return {"tiles": tiles, "seconds": elapsed, "tiles_per_s": tiles / elapsed, "out": str(result.out)}


def plot(command: dict, capacity_rate: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(t, r) for t, r in command["progress"] if r >= 0]
    rates = [((t0 + t1) / 2, (r1 - r0) / (t1 - t0)) for (t0, r0), (t1, r1) in zip(points, points[5:], strict=False)
             if t1 > t0]  # over 0.5 s
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot([t for t, _ in rates], [r for _, r in rates], label="python -m histoserve.client slide (tiles/s over 0.5 s)")
    axes.axhline(capacity_rate, linestyle="--", color="black", label="served capacity (preprocessed batches)")
    axes.axhline(0.9 * capacity_rate, linestyle=":", color="grey", label="0.9 × capacity")
    axes.set_xlabel("seconds since the command started")
    axes.set_ylabel("tiles / s")
    axes.set_title("Whole slide vs served capacity, same machine")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="a 36/32 checkpoint to export instead of training one epoch")
    parser.add_argument("--region-mm2", type=float, default=2.0, help="tissue area of the slide measured (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per capacity measurement (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=SlideOptions.workers)
    parser.add_argument("--concurrency", type=int, default=SlideOptions.concurrency)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "slide")
    parser.add_argument("--keep", type=Path, help="build in this folder and keep it (default: a temporary one)")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    started = time.monotonic()
    work = args.keep or Path(tempfile.mkdtemp(prefix="histoserve-slide-"))
    work.mkdir(parents=True, exist_ok=True)
    options = SlideOptions(min_tissue=0.0, workers=args.workers, concurrency=args.concurrency)
    try:
        repository = build_model(work, args.checkpoint)
        digits = work / "digits" / "test" if (work / "digits").is_dir() else ROOT / "data" / "digits" / "test"
        if not digits.is_dir():
            run([sys.executable, "-m", "histoserve.train", "demo-data", work / "digits"])
            digits = work / "digits" / "test"
        tiles = digit_tiles(digits)
        slide = work / "region.tiff"
        print(f"writing a {args.region_mm2:g} mm² region at {MPP} µm/px ...", flush=True)
        side, side_tiles = write_region(slide, tiles, args.region_mm2)
        mm2 = (side * MPP / 1000) ** 2
        with TritonServer(repository, free_ports()) as server, TritonClassifier(server.grpc_url, MODEL) as classifier:
            spec, batch_size = classifier.spec, classifier.max_batch_size
            batch = np.stack([preprocess_image(Image.fromarray(t), spec) for t in (tiles * batch_size)[:batch_size]])
            print(f"capacity: batches of {batch_size} × {batch.shape[1:]} uint8, {args.concurrency} in flight ...", flush=True)
            first = capacity(classifier, batch, args.concurrency, args.seconds)
            print("classify_slide in process ...", flush=True)
            inside = in_process(classifier, slide, work / "in-process", options)
            command = slide_command(server.grpc_url, slide, work / "command", options)
            print("capacity again ...", flush=True)
            second = capacity(classifier, batch, args.concurrency, args.seconds)
        same = (Path(inside["out"]) / TILES_CSV).read_bytes() == (Path(command["out"]) / TILES_CSV).read_bytes()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    served = (first + second) / 2
    report(args, served, first, second, inside, command, side, side_tiles, mm2, batch_size, same)
    print(f"({(time.monotonic() - started) / 60:.1f} min)")
    return 0


def report(args, served, first, second, inside, command, side, side_tiles, mm2, batch_size, same) -> None:
    cores = os.cpu_count() or 1
    fixed_s = max(0.0, command["seconds"] - command["tiles"] / command["steady_tiles_per_s"])
    target_tiles = REGION_TARGET_MM2 * 1e6 / (TILE_PX * MPP) ** 2
    measured = abs(mm2 - REGION_TARGET_MM2) / REGION_TARGET_MM2 < 0.05
    region_s = command["seconds"] if measured else fixed_s + target_tiles / command["steady_tiles_per_s"]
    rows = [
        ("served capacity, preprocessed batches (mean of before/after)", served, f"{first:.0f} before, {second:.0f} after"),
        ("classify_slide, in process", inside["tiles_per_s"], f"{inside['tiles']} tiles in {inside['seconds']:.1f} s"),
        ("python -m histoserve.client slide, whole command", command["tiles_per_s"],
         f"{command['tiles']} tiles in {command['seconds']:.1f} s"),
        ("python -m histoserve.client slide, steady", command["steady_tiles_per_s"], "progress.csv rows over time"),
    ]
    model = "the --checkpoint's model" if args.checkpoint else "ResNet18"
    print(f"\n{cores} cores; {model} at 32² (tiles {TILE_PX} px at {MPP} µm/px, centre-cropped to 32), max batch {batch_size}, "
          f"{args.concurrency} requests in flight, {args.workers} tile-reading workers; slide {side}×{side} px = {mm2:.2f} mm², "
          f"{side_tiles}×{side_tiles} tiles, --min-tissue 0")
    print(f"{'':62} {'tiles/s':>8} {'÷ capacity':>10}")
    for name, rate, note in rows:
        print(f"{name:62} {rate:8.0f} {rate / served:10.2f}  {note}")
    print(f"\npeak memory, the command and its workers (RSS summed)   {command['peak_rss_tree_mb']:.0f} MB "
          f"(workers {command['peak_rss_workers_mb']:.0f} MB; largest single process {command['max_single_process_rss_mb']:.0f} MB)")
    print(f"client CPU per tile (command and workers)               {1000 * command['cpu_s'] / command['tiles']:.2f} ms")
    print(f"in-process and command tiles.csv identical              {'yes' if same else 'NO'}")
    how = "measured" if measured else (f"extrapolated from {mm2:.2f} mm²: {fixed_s:.1f} s fixed + {target_tiles:,.0f} tiles at the "
                                       "steady rate")
    print(f"one {REGION_TARGET_MM2:g} mm² region at 40× ({target_tiles:,.0f} tiles of {TILE_PX} px)      "
          f"{region_s:.0f} s ({region_s / 60:.1f} min), {how}")
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": cores, "python": platform.python_version()},
        "model": f"resnet18, 32² crop of {TILE_PX} px tiles, uint8 NCHW, max batch {batch_size}",
        "slide": {"side_px": side, "mpp": MPP, "area_mm2": mm2, "tiles": command["tiles"], "min_tissue": 0},
        "options": {"workers": args.workers, "concurrency": args.concurrency},
        "capacity_tiles_per_s": {"before": first, "after": second, "mean": served},
        "in_process": {k: v for k, v in inside.items() if k != "out"},
        "command": {k: v for k, v in command.items() if k not in ("out", "progress")},
        "ratios": {"in process ÷ capacity": inside["tiles_per_s"] / served,
                   "command whole ÷ capacity": command["tiles_per_s"] / served,
                   "command steady ÷ capacity": command["steady_tiles_per_s"] / served},
        "region_20mm2": {"seconds": region_s, "measured": measured, "tiles": target_tiles, "fixed_seconds": fixed_s},
        "identical_tiles_csv": same,
    }
    (args.out / "slide.json").write_text(json.dumps(summary, indent=2))
    plot(command, served, args.out / "slide.png")
    print(f"\nwrote {args.out / 'slide.json'} and {args.out / 'slide.png'}")


if __name__ == "__main__":
    sys.exit(main())
