"""Whole slides through the served model: `python -m histoserve.client slide SLIDE... --out DIR` (histoserve.client.slide).

A slide is whatever OpenSlide opens (SVS, NDPI, MRXS, generic tiled TIFF, DICOM WSI, ...). For each:

1. **Resolution.** µm per level-0 pixel from `openslide.mpp-x/y` (OpenSlide fills it from the vendor's
   metadata or, for a generic TIFF, from its resolution tags); a slide without it needs --assume-mpp and
   is refused by name otherwise.
2. **Grid.** Tiles of --tile-px pixels at --mpp µm/px (default: level 0's), every --stride-px (default: the
   tile), in level-0 coordinates; only whole tiles inside the slide (a last strip narrower than a tile is
   left out). Each tile is read from the pyramid level closest to --mpp without being coarser, and
   resized to --tile-px with the model's own interpolation when that level's resolution is not exactly
   --mpp (at level 0's resolution, or a level's, the pixels are the slide's, untouched).
3. **Tissue.** A thumbnail's saturation thresholded by Otsu's method (CLAM's and HistoQC's approach),
   cleaned by a morphological closing and opening, with blank glass (low saturation), pen ink in green
   to blue hues and near-black marks left out (`tissue_mask`). A tile is classified when at least
   --min-tissue of its area is tissue; --min-tissue 0 classifies every tile.
4. **Classification.** Each tile goes through the one preprocessing (formats/preprocessing.py: resize the
   shorter side, centre crop), exactly as an image file of the same pixels would, and to the served model
   through the client (batches, --concurrency requests in flight, retries until --deadline-s, TLS). Tiles
   are read and preprocessed in --workers processes, at most 2 × concurrency batches ahead, so the
   pixels in memory do not grow with the slide (the tile plan and the finished rows do: about 1 KB a tile).
5. **Results**, in DIR/<slide stem>/:
   - tiles.csv: one row per classified tile, `x, y, width, height` (level 0 pixels), `tissue`, `label`,
     `score` and `p_<label>` per class, sorted by y then x;
   - tiles.geojson: the same tiles as a FeatureCollection QuPath imports (File > Import objects), each a
     `tile` object whose classification is its label;
   - heatmap.png: the thumbnail under each tile's top class (colour) and probability (opacity), with a
     legend; overlay.png: the same colours alone, transparent elsewhere (the viewer's overlay);
   - summary.json: the resolution used and where it came from, the grid, tissue area in mm², tile counts,
     each class's share of the classified tiles and mean probability, and a slide-level result with its
     rule (the class with the largest share of tiles; ties go to the higher mean probability).
   An interrupted run continues where it stopped: finished batches are kept in progress.csv, and the
   results are those of an uninterrupted run (same rows, same probabilities). A slide whose summary.json
   is there for the same options is skipped.

The default tile is the model's resize size (its shorter side needs no resizing; the model then sees the
centre crop of each tile at the slide's own resolution): state the magnification the model was trained
at with --mpp (e.g. 0.5 µm/px for a model trained on 20× patches).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from histoserve.client.classifier import ClientError, InferenceFailed
from histoserve.formats.files import write_atomically
from histoserve.formats.preprocessing import INTERPOLATIONS, PreprocessSpec, preprocess_image

SLIDE_EXTRA = "pip install 'histoserve[slide]'"
TILES_CSV, TILES_GEOJSON, HEATMAP_PNG, OVERLAY_PNG, SUMMARY_JSON, PROGRESS_CSV = (
    "tiles.csv", "tiles.geojson", "heatmap.png", "overlay.png", "summary.json", "progress.csv")
THUMBNAIL_MAX_SIDE = 2048
# A qualitative palette (Tableau 10, as matplotlib's tab10): one colour per class, repeating after ten.
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


class SlideError(RuntimeError):
    """One slide cannot be classified; the message names the file and the reason. Other slides go on."""


@dataclass(frozen=True)
class SlideOptions:
    mpp: float | None = None          # µm per pixel to tile at (default: level 0's)
    tile_px: int | None = None        # tile side at that resolution (default: the model's resize size)
    stride_px: int | None = None      # default: the tile side
    min_tissue: float = 0.5           # fraction of a tile that must be tissue; 0: every tile
    assume_mpp: float | None = None   # for slides whose files do not say
    workers: int = 2                  # tile-reading processes
    concurrency: int = 4              # requests in flight
    batch_size: int | None = None     # tiles per request (default and at most: the model's max batch)


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles are, in level-0 pixels, and how each is read."""

    width: int               # level 0
    height: int
    mpp: tuple[float, float]  # µm per level-0 pixel (x, y)
    mpp_source: str           # "openslide.mpp-x/y" or "--assume-mpp"
    target_mpp: float
    tile_px: int
    stride_px: int
    level: int                # the pyramid level tiles are read from
    level_downsample: float
    footprint: int            # level-0 pixels per tile side
    step: int                 # level-0 pixels per stride
    columns: int
    rows: int

    @property
    def read_px(self) -> int:
        """Pixels read from `level` per tile side (resized to tile_px when different)."""
        return max(1, round(self.footprint / self.level_downsample))

    def origin(self, column: int, row: int) -> tuple[int, int]:
        return column * self.step, row * self.step


def open_slide(path: Path):
    try:
        import openslide
    except ImportError:
        raise SlideError(f"reading slides needs OpenSlide: {SLIDE_EXTRA}") from None
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideError(f"{path}: not a slide format OpenSlide reads (SVS, NDPI, MRXS, tiled TIFF, DICOM, ...)") from None
    except (openslide.OpenSlideError, OSError) as error:
        raise SlideError(f"{path}: cannot open ({str(error) or type(error).__name__})") from None


def slide_mpp(slide, path: Path, assume_mpp: float | None) -> tuple[tuple[float, float], str]:
    properties = slide.properties
    try:
        found = float(properties["openslide.mpp-x"]), float(properties["openslide.mpp-y"])
        if all(math.isfinite(v) and v > 0 for v in found):
            return found, "openslide.mpp-x/y"
    except (KeyError, ValueError):
        pass
    if assume_mpp:
        return (assume_mpp, assume_mpp), "--assume-mpp"
    raise SlideError(f"{path}: no resolution in the file (no openslide.mpp-x/y, no TIFF resolution tags): "
                     "give --assume-mpp µm/px if you know it")


def plan_grid(slide, path: Path, options: SlideOptions, spec: PreprocessSpec) -> TileGrid:
    (mpp_x, mpp_y), source = slide_mpp(slide, path, options.assume_mpp)
    mpp0 = (mpp_x + mpp_y) / 2
    target = options.mpp or mpp0
    tile_px = options.tile_px or spec.resize_size
    stride_px = options.stride_px or tile_px
    downsample = target / mpp0
    if downsample < 1 - 1e-6:
        raise SlideError(f"{path}: --mpp {target:g} is finer than the slide's level 0 ({mpp0:g} µm/px): "
                         "a slide cannot be read above its scanned resolution")
    # the coarsest level that is still at least as fine as --mpp (within 1 %: vendors' pyramids halve
    # approximately, 2.0042 or 4.016 for 2 and 4, and such a level read at its own pixels is the one wanted)
    level = max((i for i, d in enumerate(slide.level_downsamples) if d <= downsample * 1.01), default=0)
    footprint, step = round(tile_px * downsample), round(stride_px * downsample)
    width, height = slide.dimensions
    if footprint > width or footprint > height:
        raise SlideError(f"{path}: a {tile_px} px tile at {target:g} µm/px spans {footprint} level-0 pixels, more than "
                         f"the slide's {width}×{height}")
    return TileGrid(width, height, (mpp_x, mpp_y), source, target, tile_px, stride_px, level,
                    float(slide.level_downsamples[level]), footprint, step,
                    (width - footprint) // step + 1, (height - footprint) // step + 1)


def read_tile(slide, grid: TileGrid, x: int, y: int, interpolation: str) -> Image.Image:
    """The tile at level-0 (x, y) as an RGB image of grid.tile_px pixels per side."""
    size = grid.read_px
    region = slide.read_region((x, y), grid.level, (size, size))
    # OpenSlide hands RGBA with alpha 0 only outside the scanned area; RGB keeps the stored colour,
    # as the preprocessing does for a file with alpha (formats/preprocessing.py to_rgb).
    tile = region.convert("RGB")
    if size != grid.tile_px:
        tile = tile.resize((grid.tile_px, grid.tile_px), resample=INTERPOLATIONS[interpolation])
    return tile


def tissue_mask(thumbnail: Image.Image) -> np.ndarray:
    """Tissue on an RGB thumbnail: Otsu's threshold on saturation (at least 0.05, so blank glass stays
    background), closed then opened with a disk of radius 2, without pen ink (hue 0.2–0.7, green to
    deep blue, saturation above 0.3: H&E's pinks and purples lie outside) and near-black marks (value
    below 0.15). HSV as Pillow converts it (each channel 0–255)."""
    from scipy.ndimage import binary_closing, binary_opening
    from skimage.filters import threshold_otsu
    from skimage.morphology import disk

    hsv = np.asarray(thumbnail.convert("RGB").convert("HSV"), dtype=np.float32) / 255.0
    hue, saturation, value = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    threshold = max(float(threshold_otsu(saturation)) if np.ptp(saturation) > 0 else 1.0, 0.05)
    pen = (hue >= 0.2) & (hue <= 0.7) & (saturation > 0.3)
    mask = (saturation > threshold) & ~pen & (value >= 0.15)
    return binary_opening(binary_closing(mask, disk(2)), disk(2))


def tissue_fractions(mask: np.ndarray, grid: TileGrid, thumbnail_downsample: tuple[float, float]) -> np.ndarray:
    """The tissue share of each tile (rows × columns) from the thumbnail's mask."""
    fractions = np.zeros((grid.rows, grid.columns))
    sx, sy = thumbnail_downsample
    for row in range(grid.rows):
        for column in range(grid.columns):
            x, y = grid.origin(column, row)
            part = mask[int(y / sy):max(int(y / sy) + 1, int(math.ceil((y + grid.footprint) / sy))),
                        int(x / sx):max(int(x / sx) + 1, int(math.ceil((x + grid.footprint) / sx)))]
            fractions[row, column] = float(part.mean()) if part.size else 0.0
    return fractions


def thumbnail_of(slide) -> tuple[Image.Image, tuple[float, float]]:
    width, height = slide.dimensions
    scale = max(1.0, max(width, height) / THUMBNAIL_MAX_SIDE)
    thumbnail = slide.get_thumbnail((max(1, int(width / scale)), max(1, int(height / scale)))).convert("RGB")
    return thumbnail, (width / thumbnail.width, height / thumbnail.height)


# Tile reading in worker processes: each opens the slide once.
_WORKER_SLIDE = None


def _open_in_worker(path: str) -> None:
    global _WORKER_SLIDE
    import ctypes
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:  # Linux: the kernel kills this reader when the client dies, even by SIGKILL (no orphans)
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)
    _WORKER_SLIDE = open_slide(Path(path))


def _read_batch(grid: TileGrid, spec: PreprocessSpec, origins: list[tuple[int, int]]) -> np.ndarray:
    import openslide

    try:
        return read_tiles(_WORKER_SLIDE, grid, spec, origins)
    except openslide.OpenSlideError as error:  # a damaged tile: the slide's error, not a traceback
        raise SlideError(f"{_WORKER_SLIDE._filename}: cannot read the tiles at {origins[0]}…: {error}") from None


def read_tiles(slide, grid: TileGrid, spec: PreprocessSpec, origins: list[tuple[int, int]]) -> np.ndarray:
    """The preprocessed tiles at `origins` (level 0), as the model takes them. Tiles of one row are cut
    from one read of the strip that holds them when that gives the very pixels of a read per tile (the
    level's downsample a whole number that divides their distances): OpenSlide's cost is per call, and
    a small tile costs little else."""
    by_row: dict[int, list[int]] = {}
    for x, y in origins:
        by_row.setdefault(y, []).append(x)
    downsample = grid.level_downsample
    whole = downsample == int(downsample)
    tiles: dict[tuple[int, int], np.ndarray] = {}
    for y, xs in by_row.items():
        left = min(xs)
        if len(xs) > 1 and whole and all((x - left) % int(downsample) == 0 for x in xs) \
                and (max(xs) - left + grid.footprint) <= 4 * grid.footprint * len(xs):
            offsets = [(x - left) // int(downsample) for x in xs]
            strip = slide.read_region((left, y), grid.level, (max(offsets) + grid.read_px, grid.read_px)).convert("RGB")
            for x, offset in zip(xs, offsets, strict=True):
                tile = strip.crop((offset, 0, offset + grid.read_px, grid.read_px))
                if grid.read_px != grid.tile_px:
                    tile = tile.resize((grid.tile_px, grid.tile_px), resample=INTERPOLATIONS[spec.interpolation])
                tiles[(x, y)] = preprocess_image(tile, spec)
        else:
            for x in xs:
                tiles[(x, y)] = preprocess_image(read_tile(slide, grid, x, y, spec.interpolation), spec)
    return np.stack([tiles[origin] for origin in origins])


@dataclass
class SlideResult:
    slide: str
    out: Path | None = None
    summary: dict = field(default_factory=dict)
    error: str | None = None
    skipped: bool = False  # done by an earlier run with the same options

    @property
    def ok(self) -> bool:
        return self.error is None and not self.summary.get("tiles", {}).get("failed")


def run_key(slide, path: Path, grid: TileGrid, options: SlideOptions, model: str, version: str) -> dict:
    """What makes two runs the same run: the slide's identity, the grid, the tissue cut, the model."""
    identity = slide.properties.get("openslide.quickhash-1") or f"{path.stat().st_size}:{path.stat().st_mtime_ns}"
    key = {"slide_identity": identity, "grid": asdict(grid), "min_tissue": options.min_tissue, "model": model,
           "model_version": version}
    return json.loads(json.dumps(key))  # as summary.json will hold it (tuples become lists)


def classify_slide(path: Path, classifier, out_root: Path, options: SlideOptions, progress: bool | None = None) -> SlideResult:
    """Classify one slide into out_root/<stem>/; SlideError for a slide that cannot be classified."""
    path = Path(path)
    spec = classifier.spec
    if spec is None:
        raise SlideError(f"{classifier.model} takes encoded files: give the pixel model (tiles are preprocessed here)")
    slide = open_slide(path)
    try:
        return classify_open_slide(path, slide, classifier, spec, out_root, options, progress)
    except openslide_error() as error:  # a slide that opens and then cannot be read
        raise SlideError(f"{path}: cannot read ({str(error) or type(error).__name__})") from None
    finally:
        slide.close()


def openslide_error() -> type[Exception]:
    import openslide

    return openslide.OpenSlideError


def classify_open_slide(path: Path, slide, classifier, spec: PreprocessSpec, out_root: Path, options: SlideOptions,
                        progress: bool | None) -> SlideResult:
    grid = plan_grid(slide, path, options, spec)
    out = Path(out_root) / path.stem
    out.mkdir(parents=True, exist_ok=True)
    labels, version = classifier_labels(classifier)
    key = run_key(slide, path, grid, options, classifier.model, version)
    done = out / SUMMARY_JSON
    if done.is_file():
        previous = json.loads(done.read_text())
        if previous.get("run") == key:
            return SlideResult(str(path), out, previous, skipped=True)
        if previous.get("run", {}).get("slide_identity") != key["slide_identity"]:
            raise SlideError(f"{path}: {out} holds the results of another slide ({previous.get('slide')}), of the same "
                             "name: give this one another --out")
        done.unlink()  # results of other options (or another model version): they are about to be replaced
    thumbnail, thumbnail_downsample = thumbnail_of(slide)
    mask = tissue_mask(thumbnail)
    fractions = tissue_fractions(mask, grid, thumbnail_downsample)
    chosen = [(c, r) for r in range(grid.rows) for c in range(grid.columns)
              if options.min_tissue == 0 or fractions[r, c] >= options.min_tissue]
    pinned, classifier.version = classifier.version, version  # every tile by the version the labels came from
    try:
        rows, failed = run_tiles(path, classifier, grid, spec, chosen, fractions, labels, out, key, options, progress)
    finally:
        classifier.version = pinned
    rows.sort(key=lambda row: (row["y"], row["x"]))
    write_tiles_csv(out / TILES_CSV, rows, labels)
    write_geojson(out / TILES_GEOJSON, rows, labels)
    colours = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}
    overlay = draw_overlay(thumbnail.size, thumbnail_downsample, rows, colours)
    overlay.save(out / OVERLAY_PNG)
    draw_heatmap(thumbnail, overlay, colours).save(out / HEATMAP_PNG)
    tissue_mm2 = float(mask.sum()) * thumbnail_downsample[0] * grid.mpp[0] * thumbnail_downsample[1] * grid.mpp[1] / 1e6
    summary = slide_summary(path, slide, grid, key, rows, labels, colours, len(chosen), failed, tissue_mm2,
                            thumbnail_downsample, options)
    if not failed:  # the marker of a finished slide: written last
        write_atomically(done, json.dumps(summary, indent=2) + "\n")
        (out / PROGRESS_CSV).unlink(missing_ok=True)
    return SlideResult(str(path), out, summary)


def classifier_labels(classifier) -> tuple[list[str], str]:
    """The class labels in output order, as the server's classification extension names them (labels.txt),
    and the model version that answered: one request for a blank image. The slide's tiles then all go to
    that version, so a rollout during a run cannot mix two models in one slide."""
    contract, spec = classifier.contract, classifier.spec
    blank = np.zeros((1, 3, spec.crop_size, spec.crop_size), np.uint8)
    labels = [""] * contract.num_classes
    try:
        answer, version = classifier.infer_versioned(blank, top_k=contract.num_classes)
    except InferenceFailed as error:
        raise ClientError(f"{classifier.model} on {classifier.url} does not answer: {error}") from None
    for prediction in answer[0]:
        labels[prediction.index] = prediction.label
    return labels, str(version)


def run_tiles(path, classifier, grid, spec, chosen, fractions, labels, out, key, options, progress):
    """Classify the `chosen` tiles not in out/progress.csv yet; returns every finished row and the
    number of tiles whose requests failed for good (left for a rerun)."""
    rows = load_progress(out / PROGRESS_CSV, key, labels)
    finished = {(row["x"], row["y"]) for row in rows}
    origins = [grid.origin(c, r) for c, r in chosen]
    todo = [(x, y) for x, y in origins if (x, y) not in finished]
    tissue = {grid.origin(c, r): float(fractions[r, c]) for c, r in chosen}
    size = min(options.batch_size or classifier.max_batch_size, classifier.max_batch_size)
    batches = [todo[i:i + size] for i in range(0, len(todo), size)]
    failed = 0
    from tqdm import tqdm

    bar = tqdm(total=len(origins), initial=len(origins) - len(todo), unit="tile", desc=path.name,
               disable=None if progress is None else not progress, file=sys.stderr)
    readers = ProcessPoolExecutor(options.workers, initializer=_open_in_worker, initargs=(str(path),))
    senders = ThreadPoolExecutor(options.concurrency, thread_name_prefix="slide")
    window: deque[tuple[list[tuple[int, int]], Future]] = deque()
    try:
        with open_progress(out / PROGRESS_CSV, key, labels) as log:
            def settle(batch, future):
                nonlocal failed
                try:
                    probabilities = future.result()
                except InferenceFailed as error:  # for good, after its retries: the tiles stay for a rerun
                    failed += len(batch)
                    print(f"{path}: {len(batch)} tiles failed: {error}", file=sys.stderr)
                    return
                for (x, y), row in zip(batch, probabilities, strict=True):
                    record = tile_row(x, y, grid.footprint, tissue[(x, y)], row, labels)
                    rows.append(record)
                    log.writerow(record)
                log.flush()
                bar.update(len(batch))

            # `concurrency` requests in flight, up to 2 × concurrency batches read ahead: memory stays flat
            reads: deque[tuple[list[tuple[int, int]], Future]] = deque()
            upcoming = iter(batches)

            def read_ahead() -> None:
                while len(reads) < 2 * options.concurrency and (batch := next(upcoming, None)) is not None:
                    reads.append((batch, readers.submit(_read_batch, grid, spec, batch)))

            read_ahead()
            while reads or window:
                while reads and len(window) < options.concurrency:
                    batch, read = reads.popleft()
                    try:
                        images = read.result()
                    except BrokenProcessPool as error:  # a reader killed (out of memory) or crashed in a decoder
                        raise SlideError(f"{path}: a tile-reading process died ({error}); the tiles done so far are kept "
                                         "for a rerun") from None
                    window.append((batch, senders.submit(classifier.infer_probabilities, images)))
                    read_ahead()
                settle(*window.popleft())
    finally:
        bar.close()
        senders.shutdown(wait=False, cancel_futures=True)
        readers.shutdown(wait=False, cancel_futures=True)
    return rows, failed


def tile_row(x: int, y: int, footprint: int, tissue: float, probabilities: np.ndarray, labels: list[str]) -> dict:
    top = int(np.argmax(probabilities))
    return {"x": x, "y": y, "width": footprint, "height": footprint, "tissue": round(tissue, 4), "label": labels[top],
            "score": float(probabilities[top]), **{f"p_{label}": float(p) for label, p in zip(labels, probabilities, strict=True)}}


def exact(row: dict) -> dict:
    """A row for csv with each float as its repr: read back, it is the very float (a resumed run's rows
    equal an uninterrupted run's)."""
    return {k: repr(v) if isinstance(v, float) else v for k, v in row.items()}


def columns_of(labels: list[str]) -> list[str]:
    return ["x", "y", "width", "height", "tissue", "label", "score", *(f"p_{label}" for label in labels)]


class open_progress:
    """progress.csv, appended to: a header line naming the run (its key's sha256), then rows."""

    def __init__(self, path: Path, key: dict, labels: list[str]):
        self.path, self.key, self.labels = path, key, labels

    def __enter__(self):
        fresh = not self.path.is_file()
        self.handle = open(self.path, "a", newline="")
        if fresh:
            self.handle.write(f"# run {key_digest(self.key)} slide {self.key['slide_identity']}\n")
        self.writer = csv.DictWriter(self.handle, columns_of(self.labels), lineterminator="\n")
        if fresh:
            self.writer.writeheader()
        self.synced = time.monotonic()
        return self

    def writerow(self, row: dict) -> None:
        self.writer.writerow(exact(row))

    def flush(self) -> None:
        """Every batch reaches the OS (a killed client loses none); it reaches the disk at most a second
        later (a machine that dies loses at most a second of tiles, which the rerun classifies again)."""
        self.handle.flush()
        if time.monotonic() - self.synced > 1.0:
            os.fsync(self.handle.fileno())
            self.synced = time.monotonic()

    def __exit__(self, *exc) -> None:
        self.handle.close()


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def load_progress(path: Path, key: dict, labels: list[str]) -> list[dict]:
    """The rows an interrupted run of the same run key finished; a progress file of another run is
    set aside (renamed, never deleted) and the slide starts over."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines(keepends=True)
    header = f"# run {key_digest(key)} slide {key['slide_identity']}"
    if lines and lines[0].startswith("# run ") and not lines[0].strip().endswith(f" slide {key['slide_identity']}"):
        raise SlideError(f"{path}: another slide of the same name is being (or was) classified into this folder: "
                         "give this one another --out")
    if not lines or lines[0].strip() != header:
        path.rename(path.with_name(f"{path.name}.other-run-{os.getpid()}"))
        return []
    complete = [line for line in lines[1:] if line.endswith("\n")]  # a line cut by the interruption is dropped
    rows = []
    for record in csv.DictReader(complete):
        try:
            rows.append({"x": int(record["x"]), "y": int(record["y"]), "width": int(record["width"]),
                         "height": int(record["height"]), "tissue": float(record["tissue"]), "label": record["label"],
                         "score": float(record["score"]), **{f"p_{label}": float(record[f"p_{label}"]) for label in labels}})
        except (KeyError, TypeError, ValueError):
            continue  # a damaged row: its tile is classified again
    # rewritten without a torn last line, so appends stay whole; atomically, so a kill now loses nothing
    write_atomically(path, lines[0] + rows_csv(rows, labels))
    return rows


def rows_csv(rows: list[dict], labels: list[str]) -> str:
    """The header and the rows, as tiles.csv and progress.csv hold them."""
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns_of(labels), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(exact(row))
    return buffer.getvalue()


def write_tiles_csv(path: Path, rows: list[dict], labels: list[str]) -> None:
    write_atomically(path, rows_csv(rows, labels))


def write_geojson(path: Path, rows: list[dict], labels: list[str]) -> None:
    colours = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}
    features = []
    for row in rows:
        x, y, w, h = row["x"], row["y"], row["width"], row["height"]
        rgb = [int(colours[row["label"]][i:i + 2], 16) for i in (1, 3, 5)]
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]]},
            "properties": {"objectType": "tile", "classification": {"name": row["label"], "color": rgb},
                           "measurements": {"score": row["score"], "tissue": row["tissue"],
                                            **{f"p_{label}": row[f"p_{label}"] for label in labels}}},
        })
    write_atomically(path, json.dumps({"type": "FeatureCollection", "features": features}) + "\n")


def draw_overlay(size: tuple[int, int], downsample: tuple[float, float], rows: list[dict], colours: dict[str, str]) -> Image.Image:
    """Each tile's top class as its colour, its probability as opacity (up to 75 %), on transparency;
    overlapping tiles (a stride below the tile) are drawn in order, the later on top."""
    overlay = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    sx, sy = downsample
    for row in rows:
        colour = tuple(int(colours[row["label"]][i:i + 2], 16) for i in (1, 3, 5))
        left, top = row["x"] / sx, row["y"] / sy
        box = (left, top, max(left, (row["x"] + row["width"]) / sx - 1), max(top, (row["y"] + row["height"]) / sy - 1))
        draw.rectangle(box, fill=(*colour, int(round(191 * row["score"]))))
    return overlay


def draw_heatmap(thumbnail: Image.Image, overlay: Image.Image, colours: dict[str, str]) -> Image.Image:
    """The thumbnail with the overlay on it and a legend strip on the right."""
    base = Image.alpha_composite(thumbnail.convert("RGBA"), overlay).convert("RGB")
    line = 16
    legend_width = 12 + max(len(label) for label in colours) * 7 + 24
    canvas = Image.new("RGB", (base.width + legend_width, max(base.height, line * (len(colours) + 2))), "white")
    canvas.paste(base, (0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((base.width + 6, 4), "top class", fill="black")
    for i, (label, colour) in enumerate(colours.items(), 1):
        top = 4 + i * line
        draw.rectangle((base.width + 6, top, base.width + 18, top + 11), fill=colour)
        draw.text((base.width + 24, top), label, fill="black")
    return canvas


def slide_summary(path, slide, grid, key, rows, labels, colours, chosen, failed, tissue_mm2, downsample, options) -> dict:
    counts = {label: 0 for label in labels}
    for row in rows:
        counts[row["label"]] += 1
    classified = len(rows)
    means = {label: float(np.mean([row[f"p_{label}"] for row in rows])) if rows else 0.0 for label in labels}
    shares = {label: counts[label] / classified if classified else 0.0 for label in labels}
    top = max(labels, key=lambda label: (shares[label], means[label])) if classified else None
    return {
        "slide": str(Path(path).resolve()),
        "vendor": slide.properties.get("openslide.vendor"),
        "level0_size": [grid.width, grid.height],
        "mpp": {"level0": list(grid.mpp), "source": grid.mpp_source, "tiles": grid.target_mpp},
        "grid": {"tile_px": grid.tile_px, "stride_px": grid.stride_px, "footprint_level0": grid.footprint,
                 "step_level0": grid.step, "columns": grid.columns, "rows": grid.rows, "level": grid.level,
                 "level_downsample": grid.level_downsample,
                 "resampled": grid.read_px != grid.tile_px},
        "tissue": {"method": "Otsu on thumbnail saturation, closing and opening (disk 2), pen and dark marks removed",
                   "min_tissue": options.min_tissue, "area_mm2": round(tissue_mm2, 4)},
        "tiles": {"grid": grid.columns * grid.rows, "selected": chosen, "classified": classified, "failed": failed},
        "classes": {label: {"tiles": counts[label], "share": shares[label], "mean_probability": means[label]} for label in labels},
        "slide_result": {"label": top, "share": shares.get(top, 0.0) if top else None,
                         "rule": "the class with the largest share of classified tiles (each tile's top class); "
                                 "a tie goes to the higher mean probability"},
        "colours": colours,
        "thumbnail": {"downsample": list(downsample), "heatmap": HEATMAP_PNG, "overlay": OVERLAY_PNG},
        "run": key,
    }


def classify_slides(paths: list[Path], classifier, out_root: Path, options: SlideOptions,
                    progress: bool | None = None) -> Iterator[SlideResult]:
    """One result per slide, in order; a slide that cannot be classified is an error result, the rest go on."""
    stems: dict[str, Path] = {}
    for path in paths:
        if (first := stems.setdefault(Path(path).stem, Path(path))) != Path(path):
            yield SlideResult(str(path), error=f"{path}: same name as {first}, whose results go to the same folder "
                                               f"{Path(out_root) / Path(path).stem}: classify it with another --out")
            continue
        try:
            yield classify_slide(Path(path), classifier, out_root, options, progress)
        except SlideError as error:
            yield SlideResult(str(path), error=str(error))
