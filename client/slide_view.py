"""The slide viewer: `python -m histoserve.client slide-view DIR/<slide stem> [--port 8080] [--export FOLDER]`.

Opens a result folder of `python -m histoserve.client slide` (histoserve.client.slide) in the browser:

- the slide itself as Deep Zoom tiles, made on request from the slide file that summary.json names
  (OpenSlide's DeepZoomGenerator: 254-px tiles with a 1-px overlap, the whole level-0 plane, so the
  viewer's image coordinates are the level-0 pixels of tiles.csv), shown by OpenSeadragon (vendored,
  client/viewer/openseadragon/README.md);
- overlay.png (each classified tile's top-class colour, opacity 0.75 × score) over it, as an image
  overlay stretched to the level-0 rectangle it covers (thumbnail size × summary.json's
  thumbnail downsample, which may differ in x and y), drawn pixelated so each thumbnail pixel stays
  a sharp cell; a checkbox hides it and a slider scales its opacity;
- each tile's label, score and every class's probability (tiles.csv, served as tiles.json) for the
  tile under the pointer, or pinned by a click; where tiles overlap (a stride below the tile side),
  the one drawn last in overlay.png, as its colour shows.

Served by Python's http.server (ThreadingHTTPServer), on 127.0.0.1 unless --host says otherwise: the
server reads only the files of the one result folder and its slide. `--export FOLDER` writes the same
page, the Deep Zoom image (slide.dzi + slide_files/), the overlay, tiles.json and viewer.json
instead, for any static web server (`python -m http.server -d FOLDER`), since browsers refuse
fetch() on file:// pages. Needs `pip install 'histoserve[slide]'` (openslide-python, openslide-bin).
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import re
import shutil
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from histoserve.client.slide import OVERLAY_PNG, PROGRESS_CSV, SLIDE_EXTRA, SUMMARY_JSON, TILES_CSV
from histoserve.formats.options import POSITIVE_INT, Range

VIEWER = Path(__file__).resolve().parent / "viewer"
OPENSEADRAGON_VERSION = "6.1.1"
# The page and what it loads, by URL path (the same names in an export folder).
STATIC_FILES = {
    "index.html": VIEWER / "index.html",
    "viewer.js": VIEWER / "viewer.js",
    "viewer.css": VIEWER / "viewer.css",
    "openseadragon/openseadragon.min.js": VIEWER / "openseadragon" / "openseadragon.min.js",
    "openseadragon/LICENSE.txt": VIEWER / "openseadragon" / "LICENSE.txt",
}
DZI, DZ_FILES, OVERLAY, TILES, CONFIG = "slide.dzi", "slide_files", OVERLAY_PNG, "tiles.json", "viewer.json"
DZ_TILE_SIZE, DZ_OVERLAP = 254, 1  # 256-px tiles with their overlap, as OpenSlide's own examples
TILE_FORMATS = {"jpeg": "image/jpeg", "png": "image/png"}
JPEG_QUALITY = 90
PORT = Range(int, 0, 65535)


class ViewerError(RuntimeError):
    """A result folder that cannot be viewed; the message names the file and what to do."""


@dataclass
class ResultFolder:
    """What the viewer shows of DIR/<slide stem>/."""

    folder: Path
    summary: dict
    slide_path: Path
    width: int                       # level 0
    height: int
    labels: list[str]
    colours: dict[str, str]
    overlay_size: tuple[int, int]    # pixels of overlay.png
    overlay_downsample: tuple[float, float]  # level-0 pixels per overlay pixel (x, y)
    tiles: list[list] = field(repr=False, default_factory=list)  # [x, y, width, height, tissue, label index, score, p...]


def _summary_of(folder: Path) -> dict:
    if not folder.is_dir():
        raise ViewerError(f"{folder}: no such folder (give DIR/<slide stem>, a folder `python -m histoserve.client slide --out DIR` wrote)")
    path = folder / SUMMARY_JSON
    if not path.is_file():
        interrupted = (folder / PROGRESS_CSV).is_file()
        hint = " (an interrupted run: rerun `python -m histoserve.client slide` to finish it)" if interrupted else ""
        raise ViewerError(f"{path}: missing: {folder} is not a finished result folder of `python -m histoserve.client slide`{hint}")
    try:
        summary = json.loads(path.read_text())
        width, height = (int(v) for v in summary["level0_size"])
        str(summary["slide"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ViewerError(f"{path}: not a summary `python -m histoserve.client slide` wrote ({type(error).__name__}: {error})") from None
    if width < 1 or height < 1:
        raise ViewerError(f"{path}: level0_size {width}×{height} is empty")
    return summary


def _read_tiles(path: Path, labels_hint: list[str]) -> tuple[list[str], list[list]]:
    """tiles.csv as compact rows, and its class labels in column order (its p_<label> columns)."""
    if not path.is_file():
        raise ViewerError(f"{path}: missing (each result folder of `python -m histoserve.client slide` has one)")
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        fixed = ["x", "y", "width", "height", "tissue", "label", "score"]
        if header is None or header[:len(fixed)] != fixed or not all(c.startswith("p_") for c in header[len(fixed):]):
            raise ViewerError(f"{path}: expected the columns {', '.join(fixed)}, p_<label>..., got {header}")
        labels = [c[2:] for c in header[len(fixed):]] or labels_hint
        index = {label: i for i, label in enumerate(labels)}
        rows = []
        for number, record in enumerate(reader, 2):
            try:
                x, y, w, h = (int(v) for v in record[:4])
                probabilities = [float(v) for v in record[7:]]
                if len(probabilities) != len(labels) or record[5] not in index:
                    raise ValueError(f"label {record[5]!r} or {len(probabilities)} probabilities for {len(labels)} classes")
                rows.append([x, y, w, h, float(record[4]), index[record[5]], float(record[6]), *probabilities])
            except (ValueError, IndexError) as error:
                raise ViewerError(f"{path}: line {number}: not a tile row ({error})") from None
    return labels, rows


def load_result(folder: Path, slide: Path | None = None) -> ResultFolder:
    """The result folder, checked: its summary, tiles and overlay, and the slide they are of (`slide`,
    or the path summary.json names)."""
    from PIL import Image

    folder = Path(folder)
    summary = _summary_of(folder)
    width, height = (int(v) for v in summary["level0_size"])
    named = Path(summary["slide"])
    slide_path = Path(slide) if slide is not None else named
    if not slide_path.is_file():
        if slide is not None:
            raise ViewerError(f"--slide {slide_path}: no such file")
        raise ViewerError(f"{folder / SUMMARY_JSON}: its slide {named} is not there any more (moved or deleted): "
                          f"give the slide's new path with --slide PATH")
    labels, tiles = _read_tiles(folder / TILES_CSV, list(summary.get("classes") or {}))
    palette = summary.get("colours") or {}
    missing = [label for label in labels if not re.fullmatch(r"#[0-9a-fA-F]{6}", str(palette.get(label, "")))]
    if missing:
        raise ViewerError(f"{folder / SUMMARY_JSON}: no #rrggbb colour for class(es) {', '.join(missing)} in \"colours\"")
    overlay_path = folder / OVERLAY
    try:
        with Image.open(overlay_path) as overlay:
            overlay_size = overlay.size
    except FileNotFoundError:
        raise ViewerError(f"{overlay_path}: missing (the heatmap overlay `python -m histoserve.client slide` writes)") from None
    except OSError as error:
        raise ViewerError(f"{overlay_path}: not an image ({error})") from None
    downsample = (summary.get("thumbnail") or {}).get("downsample") or [width / overlay_size[0], height / overlay_size[1]]
    return ResultFolder(folder, summary, slide_path, width, height, labels, {label: palette[label] for label in labels},
                        overlay_size, (float(downsample[0]), float(downsample[1])), tiles)


class SlideView:
    """A result folder with its slide open: the page's config, tiles.json, the overlay and Deep Zoom tiles."""

    def __init__(self, result: ResultFolder, tile_format: str = "jpeg"):
        try:
            import openslide
            from openslide.deepzoom import DeepZoomGenerator
        except ImportError:
            raise ViewerError(f"the viewer reads slides with OpenSlide: {SLIDE_EXTRA}") from None
        if tile_format not in TILE_FORMATS:
            raise ViewerError(f"tile format {tile_format!r}: one of {', '.join(TILE_FORMATS)}")
        self.result, self.tile_format = result, tile_format
        try:
            self.slide = openslide.OpenSlide(str(result.slide_path))
        except openslide.OpenSlideUnsupportedFormatError:
            raise ViewerError(f"{result.slide_path}: not a slide format OpenSlide reads") from None
        except (openslide.OpenSlideError, OSError) as error:
            raise ViewerError(f"{result.slide_path}: cannot open ({str(error) or type(error).__name__})") from None
        width, height = self.slide.dimensions
        if (width, height) != (result.width, result.height):
            self.slide.close()
            raise ViewerError(f"{result.slide_path}: {width}×{height} pixels, but "
                              f"{result.folder / SUMMARY_JSON} is of a {result.width}×{result.height} slide: not the slide "
                              "these results are of")
        identity = ((result.summary.get("run") or {}).get("slide_identity") or "")
        quickhash = self.slide.properties.get("openslide.quickhash-1")
        if quickhash and ":" not in identity and identity and identity != quickhash:
            self.slide.close()
            raise ViewerError(f"{result.slide_path}: its OpenSlide quickhash differs from the one in "
                              f"{result.folder / SUMMARY_JSON}: not the slide these results are of")
        # limit_bounds=False: the Deep Zoom image is the whole level-0 plane, in tiles.csv's coordinates
        self.deepzoom = DeepZoomGenerator(self.slide, tile_size=DZ_TILE_SIZE, overlap=DZ_OVERLAP, limit_bounds=False)

    def close(self) -> None:
        self.slide.close()

    def __enter__(self) -> SlideView:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def config(self) -> dict:
        """viewer.json: what the page needs besides the images."""
        result, summary = self.result, self.result.summary
        ow, oh = result.overlay_size
        dx, dy = result.overlay_downsample
        return {
            "name": result.folder.name,
            "slide": result.slide_path.name,
            "width": result.width,
            "height": result.height,
            "dzi": DZI,
            "tiles": TILES,
            "overlay": {"url": OVERLAY, "size": [ow, oh], "level0_rect": [0, 0, ow * dx, oh * dy]},
            "labels": result.labels,
            "colours": result.colours,
            "mpp": summary.get("mpp"),
            "grid": summary.get("grid"),
            "tile_counts": summary.get("tiles"),
            "slide_result": summary.get("slide_result"),
            "openseadragon": OPENSEADRAGON_VERSION,
        }

    def config_json(self) -> bytes:
        return (json.dumps(self.config(), indent=1) + "\n").encode()

    @functools.cached_property
    def _tiles_json(self) -> bytes:  # made once: the results do not change while they are viewed
        return json.dumps({"labels": self.result.labels,
                           "columns": ["x", "y", "width", "height", "tissue", "label", "score",
                                       *(f"p_{label}" for label in self.result.labels)],
                           "tiles": self.result.tiles}, separators=(",", ":")).encode()

    def tiles_json(self) -> bytes:
        """tiles.csv as {"labels", "columns", "tiles": [[x, y, width, height, tissue, label index, score, p...]]}."""
        return self._tiles_json

    def overlay_png(self) -> bytes:
        return (self.result.folder / OVERLAY).read_bytes()

    def dzi(self) -> bytes:
        return self.deepzoom.get_dzi(self.tile_format).encode()

    def levels(self) -> list[tuple[int, int]]:
        """Deep Zoom tiles (columns, rows) per level."""
        return list(self.deepzoom.level_tiles)

    def tile(self, level: int, column: int, row: int) -> bytes:
        """One Deep Zoom tile, encoded; ValueError for an address outside the pyramid."""
        image = self.deepzoom.get_tile(level, (column, row))
        buffer = io.BytesIO()
        if self.tile_format == "jpeg":
            image.save(buffer, "JPEG", quality=JPEG_QUALITY)
        else:
            image.save(buffer, "PNG", compress_level=1)
        return buffer.getvalue()


def open_view(folder: Path, slide: Path | None = None, tile_format: str = "jpeg") -> SlideView:
    return SlideView(load_result(folder, slide), tile_format)


# --- the server


TILE_PATH = re.compile(rf"^/{DZ_FILES}/(\d+)/(\d+)_(\d+)\.(jpeg|png)$")


class ViewerHandler(BaseHTTPRequestHandler):
    """GET only, and only the page's files: nothing else of the disk is reachable."""

    view: SlideView  # set on the subclass make_server builds
    server_version = "histoserve-slide-view"
    quiet = True

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0].split("#", 1)[0]
        try:
            found = self.route(path)
        except Exception as error:  # a tile that cannot be read: the page keeps working
            self.send_error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(error).__name__}: {error}")
            return
        if found is None:
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        body, content_type, cache = found
        try:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", cache)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the browser no longer wants it (zoomed on)
            pass

    def route(self, path: str) -> tuple[bytes, str, str] | None:
        view = self.view
        if path in ("/", "/index.html"):
            return STATIC_FILES["index.html"].read_bytes(), "text/html; charset=utf-8", "no-cache"
        name = path.lstrip("/")
        if name in STATIC_FILES:
            return STATIC_FILES[name].read_bytes(), _content_type(name), "no-cache"
        if name == CONFIG:
            return view.config_json(), "application/json", "no-cache"
        if name == TILES:
            return view.tiles_json(), "application/json", "no-cache"
        if name == OVERLAY:
            return view.overlay_png(), "image/png", "no-cache"
        if name == DZI:
            return view.dzi(), "application/xml", "no-cache"
        if match := TILE_PATH.match(path):
            level, column, row, extension = int(match[1]), int(match[2]), int(match[3]), match[4]
            if extension != view.tile_format:
                return None
            try:
                return view.tile(level, column, row), TILE_FORMATS[extension], "max-age=3600"
            except ValueError:  # outside the pyramid
                return None
        return None

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        if not self.quiet:
            super().log_message(format, *args)

    def log_error(self, format: str, *args) -> None:  # noqa: A002
        if args and str(args[0]).startswith("404"):
            return
        sys.stderr.write(f"slide-view: {format % args}\n")


def _content_type(name: str) -> str:
    return {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
            ".txt": "text/plain; charset=utf-8"}[Path(name).suffix]


def make_server(view: SlideView, host: str = "127.0.0.1", port: int = 8080, quiet: bool = True) -> ThreadingHTTPServer:
    """A ThreadingHTTPServer serving `view` (port 0: any free port; server.server_address says which)."""
    handler = type("Handler", (ViewerHandler,), {"view": view, "quiet": quiet})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as error:
        raise ViewerError(f"cannot listen on {host}:{port}: {error.strerror or error} (another --port?)") from None
    server.daemon_threads = True
    return server


def url_of(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in str(host) else host
    return f"http://{'127.0.0.1' if host == '0.0.0.0' else shown}:{port}/"


# --- the static export


def export(view: SlideView, target: Path, workers: int = 4, progress: Callable[[int, int], None] | None = None) -> int:
    """Write the page and everything it loads into `target`; returns the number of Deep Zoom tiles.
    `target` must be empty, missing, or an earlier export (it is then replaced)."""
    target = Path(target)
    if target.exists():
        if not target.is_dir():
            raise ViewerError(f"--export {target}: exists and is not a folder")
        if any(target.iterdir()) and not (target / CONFIG).is_file():
            raise ViewerError(f"--export {target}: a folder with other files in it (give an empty or new folder)")
        shutil.rmtree(target / DZ_FILES, ignore_errors=True)
    target.mkdir(parents=True, exist_ok=True)
    for name, source in STATIC_FILES.items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target / name)
    (target / CONFIG).write_bytes(view.config_json())
    (target / TILES).write_bytes(view.tiles_json())
    (target / OVERLAY).write_bytes(view.overlay_png())
    addresses = [(level, column, row) for level, (columns, rows) in enumerate(view.levels())
                 for row in range(rows) for column in range(columns)]
    for level in range(len(view.levels())):
        (target / DZ_FILES / str(level)).mkdir(parents=True, exist_ok=True)
    done, lock = 0, threading.Lock()

    def write(address: tuple[int, int, int]) -> None:
        nonlocal done
        level, column, row = address
        (target / DZ_FILES / str(level) / f"{column}_{row}.{view.tile_format}").write_bytes(view.tile(level, column, row))
        with lock:
            done += 1
            if progress:
                progress(done, len(addresses))

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for _ in pool.map(write, addresses):
            pass
    (target / DZI).write_bytes(view.dzi())  # last: a folder with slide.dzi has all its tiles
    return len(addresses)


# --- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("result", type=Path, metavar="DIR/SLIDE_STEM",
                        help="a result folder of `python -m histoserve.client slide` (summary.json, tiles.csv, overlay.png)")
    parser.add_argument("--slide", type=Path,
                        help="the slide file, when it is no longer where summary.json says (moved, another machine)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    parser.add_argument("--port", type=PORT, default=8080, help="0: any free port (default: %(default)s)")
    parser.add_argument("--export", type=Path, metavar="FOLDER",
                        help="write a static copy (page, Deep Zoom tiles, overlay, tiles.json) to FOLDER instead of serving")
    parser.add_argument("--tile-format", choices=sorted(TILE_FORMATS), default="jpeg",
                        help=f"Deep Zoom tiles as JPEG (quality {JPEG_QUALITY}) or lossless PNG (default: %(default)s)")
    parser.add_argument("--workers", type=POSITIVE_INT, default=4, help="threads writing tiles for --export (default: %(default)s)")
    parser.add_argument("--log", action="store_true", help="print each request")


def slide_view_command(args: argparse.Namespace) -> int:
    """Exit code: 0 served until Ctrl-C or exported, 1 the result folder or its slide cannot be used."""
    try:
        view = open_view(args.result, args.slide, args.tile_format)
    except ViewerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    with view:
        if args.export:
            shown = sys.stderr.isatty()

            def report(done: int, total: int) -> None:
                if shown and (done == total or done % 64 == 0):
                    print(f"\r{done}/{total} Deep Zoom tiles", end="\n" if done == total else "", file=sys.stderr, flush=True)

            try:
                count = export(view, args.export, args.workers, report)
            except ViewerError as error:
                print(f"error: {error}", file=sys.stderr)
                return 1
            print(f"exported {args.result} ({count} Deep Zoom tiles) to {args.export}: serve it with any static web server, "
                  f"e.g. python -m http.server -d {args.export}", flush=True)
            return 0
        try:
            server = make_server(view, args.host, args.port, quiet=not args.log)
        except ViewerError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        with server:
            tiles = len(view.result.tiles)
            print(f"serving {args.result} ({view.result.width}×{view.result.height} px, {tiles} classified tiles) at "
                  f"{url_of(server)} (Ctrl-C stops)", flush=True)
            try:
                server.serve_forever(poll_interval=0.2)
            except KeyboardInterrupt:
                pass
    return 0

