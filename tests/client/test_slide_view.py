"""The slide viewer (`python -m histoserve.client slide-view`, histoserve.client.slide_view) in Debian's headless
chromium, driven by playwright-core (tests/client/browser/check_viewer.js): on a slide whose tiles have
known colours and a result folder whose tiles have known classes, the page draws each tile's own colour
where the tile is, the overlay puts each class's colour over exactly that tile (the screen pixel is the
class colour blended over the slide's at the overlay's opacity; with the checkbox off, the slide's own
colour), at the home view and zoomed in on a corner where four tiles meet; hovering and clicking a tile
show its label, score and probabilities; the static export shows the same. The page is kept as
reports/test-artefacts/slide-viewer.png. Also: the result-folder errors, and the export's files."""

from __future__ import annotations

import csv
import functools
import http.server
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import MODEL, ROOT, run_cli
from tests.slides import background, write_slide

BROWSER_TEST = ROOT / "tests" / "client" / "browser"
ARTEFACT = ROOT / "reports" / "test-artefacts" / "slide-viewer.png"

# The slide: 4100 × 3000 px at 0.5 µm/px (so the 2048-px thumbnail's downsample differs in x and y);
# tiles of 512 level-0 px on an 8 × 5 grid, each filled with one of two stain-like colours in a
# checkerboard, glass beyond the grid.
WIDTH, HEIGHT, FOOTPRINT = 4100, 3000, 512
COLUMNS, ROWS = (WIDTH - FOOTPRINT) // FOOTPRINT + 1, (HEIGHT - FOOTPRINT) // FOOTPRINT + 1
SLIDE_COLOURS = [(232, 176, 204), (120, 80, 160)]
LABELS = ["benign", "stroma", "tumour"]
UNCLASSIFIED = {(0, 0), (6, 3)}  # no row in tiles.csv: transparent in the overlay
TOLERANCE = 8  # per channel: JPEG tiles (quality 90) and 8-bit blending


def slide_colour(column: int, row: int) -> tuple[int, int, int]:
    return SLIDE_COLOURS[(column + row) % 2]


def label_of(column: int, row: int) -> int:
    return (column + 2 * row) % len(LABELS)  # every tile's four neighbours have another class


def score_of(column: int, row: int) -> float:
    return 0.45 + 0.5 * ((3 * column + 5 * row) % 7) / 6


def make_slide(path: Path) -> Path:
    pixels = background(HEIGHT, WIDTH)
    for row in range(ROWS):
        for column in range(COLUMNS):
            pixels[row * FOOTPRINT:(row + 1) * FOOTPRINT, column * FOOTPRINT:(column + 1) * FOOTPRINT] = slide_colour(column, row)
    return write_slide(path, pixels, mpp=0.5, levels=4, tile=256)


def write_result_folder(slide_path: Path, out: Path) -> Path:
    """DIR/<slide stem>/ as `python -m histoserve.client slide` writes it, with the classes chosen here, through
    that module's own writers (tiles.csv, tiles.geojson, overlay.png, heatmap.png) and summary.json's
    keys the viewer reads."""
    import openslide

    from histoserve.client.slide import PALETTE, draw_heatmap, draw_overlay, thumbnail_of, tile_row, write_geojson, write_tiles_csv

    folder = out / slide_path.stem
    folder.mkdir(parents=True)
    rows = []
    for row in range(ROWS):
        for column in range(COLUMNS):
            if (column, row) in UNCLASSIFIED:
                continue
            top, score = label_of(column, row), score_of(column, row)
            probabilities = np.full(len(LABELS), (1 - score) / (len(LABELS) - 1))
            probabilities[top] = score
            rows.append(tile_row(column * FOOTPRINT, row * FOOTPRINT, FOOTPRINT, 1.0, probabilities, LABELS))
    colours = {label: PALETTE[i] for i, label in enumerate(LABELS)}
    with openslide.OpenSlide(str(slide_path)) as slide:
        thumbnail, downsample = thumbnail_of(slide)
        quickhash = slide.properties.get("openslide.quickhash-1")
    write_tiles_csv(folder / "tiles.csv", rows, LABELS)
    write_geojson(folder / "tiles.geojson", rows, LABELS)
    overlay = draw_overlay(thumbnail.size, downsample, rows, colours)
    overlay.save(folder / "overlay.png")
    draw_heatmap(thumbnail, overlay, colours).save(folder / "heatmap.png")
    counts = {label: sum(r["label"] == label for r in rows) for label in LABELS}
    summary = {
        "slide": str(slide_path.resolve()),
        "vendor": "generic-tiff",
        "level0_size": [WIDTH, HEIGHT],
        "mpp": {"level0": [0.5, 0.5], "source": "openslide.mpp-x/y", "tiles": 0.5},
        "grid": {"tile_px": FOOTPRINT, "stride_px": FOOTPRINT, "footprint_level0": FOOTPRINT, "step_level0": FOOTPRINT,
                 "columns": COLUMNS, "rows": ROWS, "level": 0, "level_downsample": 1.0, "resampled": False},
        "tiles": {"grid": COLUMNS * ROWS, "selected": len(rows), "classified": len(rows), "failed": 0},
        "classes": {label: {"tiles": counts[label], "share": counts[label] / len(rows)} for label in LABELS},
        "slide_result": {"label": max(LABELS, key=counts.get), "share": max(counts.values()) / len(rows), "rule": "largest share"},
        "colours": colours,
        "thumbnail": {"downsample": list(downsample), "heatmap": "heatmap.png", "overlay": "overlay.png"},
        "run": {"slide_identity": quickhash},
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    return folder


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("viewer")
    return write_result_folder(make_slide(root / "checkerboard.tiff"), root / "results")


def chromium_executable() -> str:
    found = shutil.which("chromium")
    if found:
        return found
    pytest.fail("chromium is not installed: `make test` installs it (make chromium: apt-get install chromium, as root)")


def node_executable() -> str:
    node = shutil.which("node")
    installed = (BROWSER_TEST / "node_modules" / "playwright-core").is_dir()
    assert node, "Node.js is not installed"
    assert installed, "tests/client/browser has no node_modules: `make test` runs `npm ci --prefix tests/client/browser`"
    return node


class Viewer:
    """`python -m histoserve.client slide-view RESULT --port 0` running; its URL from its first line."""

    def __init__(self, folder: Path, *options):
        self.process = subprocess.Popen([sys.executable, "-m", "histoserve.client", "slide-view", str(folder), "--port", "0", *options],
                                        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if "http://" not in line:
            self.process.kill()
            raise AssertionError(f"slide-view did not start: {line}{self.process.stderr.read()}")
        self.url = line[line.index("http://"):].split()[0]

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        self.process.stdout.close()
        self.process.stderr.close()


def serve_folder(folder: Path) -> http.server.ThreadingHTTPServer:
    """Any static web server: Python's, on a free port, in a thread."""
    handler = functools.partial(QuietStaticHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class QuietStaticHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def tile_points() -> list[tuple[int, int, int, int]]:
    """(x, y, column, row): each tile's centre and four points 40 level-0 px inside its edges."""
    points = []
    for row in range(ROWS):
        for column in range(COLUMNS):
            x0, y0 = column * FOOTPRINT, row * FOOTPRINT
            inset = 40
            for x, y in ((x0 + FOOTPRINT // 2, y0 + FOOTPRINT // 2), (x0 + inset, y0 + FOOTPRINT // 2),
                         (x0 + FOOTPRINT - inset, y0 + FOOTPRINT // 2), (x0 + FOOTPRINT // 2, y0 + inset),
                         (x0 + FOOTPRINT // 2, y0 + FOOTPRINT - inset)):
                points.append((x, y, column, row))
    return points


# Zoomed in on the corner where tiles (1, 1), (2, 1), (1, 2) and (2, 2) meet: points 10 level-0 px
# from both boundaries (about 19 screen px at this zoom; an overlay cell is 2 level-0 px).
CORNER = (2 * FOOTPRINT, 2 * FOOTPRINT)
CORNER_POINTS = [(CORNER[0] + dx, CORNER[1] + dy, (2 if dx > 0 else 1), (2 if dy > 0 else 1))
                 for dx in (-10, 10) for dy in (-10, 10)]
HOVER, CLICK, AWAY = (3, 2), (5, 1), (6, 3)  # AWAY: an unclassified tile


def centre(column: int, row: int) -> list[int]:
    return [column * FOOTPRINT + FOOTPRINT // 2, row * FOOTPRINT + FOOTPRINT // 2]


@pytest.fixture(scope="module")
def browser_run(result, tmp_path_factory) -> dict:
    chromium = chromium_executable()
    node = node_executable()
    work = tmp_path_factory.mktemp("browser")
    exported = work / "export"
    run_cli("-m", "histoserve.client", "slide-view", result, "--export", exported, timeout=120)
    points = [*tile_points(), *CORNER_POINTS]
    plan = {"chromium": chromium, "out": str(work), "artefact": str(ARTEFACT),
            "views": [{"name": "home"}, {"name": "corner", "bounds": [CORNER[0] - 200, CORNER[1] - 200, 400, 400]}],
            "points": [[x, y] for x, y, _, _ in points], "hover": centre(*HOVER), "click": centre(*CLICK), "away": centre(*AWAY)}
    (work / "plan.json").write_text(json.dumps(plan))
    viewer, static = Viewer(result), serve_folder(exported)
    try:
        plan["url"] = viewer.url
        plan["exportUrl"] = f"http://127.0.0.1:{static.server_address[1]}/"
        (work / "plan.json").write_text(json.dumps(plan))
        run = subprocess.run([node, str(BROWSER_TEST / "check_viewer.js"), str(work / "plan.json")], cwd=BROWSER_TEST,
                             capture_output=True, text=True, timeout=120)
    finally:
        viewer.close()
        static.shutdown()
        static.server_close()
    assert run.returncode == 0, f"check_viewer.js exited {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    seen = json.loads(run.stdout.splitlines()[-1])
    seen["points"] = points
    return seen


def blended(column: int, row: int) -> tuple[int, ...]:
    """The screen colour of a classified tile under the overlay: its class colour at 0.75 × score
    (overlay.png's alpha) over the slide's colour; an unclassified tile shows the slide."""
    from histoserve.client.slide import PALETTE

    slide = slide_colour(column, row)
    if (column, row) in UNCLASSIFIED:
        return slide
    alpha = round(191 * score_of(column, row)) / 255
    colour = [int(PALETTE[label_of(column, row)][i:i + 2], 16) for i in (1, 3, 5)]
    return tuple(round(c * alpha + s * (1 - alpha)) for c, s in zip(colour, slide, strict=True))


def colours_at(shot: str, positions: list, points: list, seen: dict, wanted, at_least: int = 20) -> list[str]:
    """Each point's screen colour against `wanted(column, row)`: the mismatches, described."""
    image = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    left, top, right, bottom = seen["viewer"]
    nav_left, nav_top, nav_right, nav_bottom = seen["navigator"]
    problems, checked = [], 0
    for (x, y, column, row), (px, py) in zip(points, positions, strict=True):
        if not (left + 2 <= px < right - 2 and top + 2 <= py < bottom - 2):
            continue  # off screen at this zoom
        if nav_left - 4 <= px < nav_right + 4 and nav_top - 4 <= py < nav_bottom + 4:
            continue  # under the navigator (the minimap)
        checked += 1
        got = tuple(image[int(py), int(px)])
        expected = wanted(column, row)
        if max(abs(g - e) for g, e in zip(got, expected, strict=True)) > TOLERANCE:
            problems.append(f"level-0 ({x}, {y}) in tile ({column}, {row}) at screen ({px:.1f}, {py:.1f}): {got}, expected {expected}")
    assert checked >= at_least, f"only {checked} points were on screen"
    return problems


def view_points(seen: dict, view: str, subset: list) -> tuple[list, list]:
    """The points of `subset` and their page positions in `view`."""
    pairs = [(p, q) for p, q in zip(seen["points"], seen["views"][view]["positions"], strict=True) if p in subset]
    return [p for p, _ in pairs], [q for _, q in pairs]


def test_the_page_draws_each_tile_of_the_slide_where_it_is(browser_run):
    points, positions = view_points(browser_run, "home", tile_points())
    assert colours_at(browser_run["views"]["home"]["shots"]["off"], positions, points, browser_run, slide_colour) == []
    points, positions = view_points(browser_run, "corner", CORNER_POINTS)
    assert colours_at(browser_run["views"]["corner"]["shots"]["off"], positions, points, browser_run, slide_colour, at_least=4) == []


def test_the_overlay_lines_up_with_the_tiles_and_the_checkbox_hides_it(browser_run):
    points, positions = view_points(browser_run, "home", tile_points())
    assert colours_at(browser_run["views"]["home"]["shots"]["on"], positions, points, browser_run, blended) == []
    # zoomed in on a corner: each of the four points 10 level-0 px from two tile boundaries
    points, positions = view_points(browser_run, "corner", CORNER_POINTS)
    assert colours_at(browser_run["views"]["corner"]["shots"]["on"], positions, points, browser_run, blended, at_least=4) == []
    assert browser_run["console"] == []
    assert ARTEFACT.is_file()


def test_hovering_and_clicking_a_tile_shows_its_classes(browser_run):
    def expected(column, row, state):
        score = score_of(column, row)
        rest = (1 - score) / (len(LABELS) - 1)
        return {"state": state, "label": LABELS[label_of(column, row)], "score": f"{score:.4f}",
                "position": f"{column * FOOTPRINT}, {row * FOOTPRINT}",
                "probabilities": {label: f"{score if i == label_of(column, row) else rest:.4f}" for i, label in enumerate(LABELS)}}

    assert browser_run["hover"] == expected(*HOVER, "hover")
    assert browser_run["away"]["state"] == "none"  # an unclassified tile has no classes to show
    assert browser_run["clicked"] == expected(*CLICK, "pinned")  # and stays after the pointer moved on


def test_the_static_export_shows_the_same(browser_run):
    export = browser_run["export"]
    pairs = [(p, q) for p, q in zip(browser_run["points"], export["positions"], strict=True) if p not in CORNER_POINTS]
    assert colours_at(export["shot"], [q for _, q in pairs], [p for p, _ in pairs], browser_run, blended) == []


# --- without a browser


def test_the_export_holds_the_page_every_deep_zoom_tile_and_the_tiles(result, tmp_path):
    from histoserve.client.slide_view import open_view

    run_cli("-m", "histoserve.client", "slide-view", result, "--export", tmp_path / "site", "--tile-format", "png", timeout=120)
    site = tmp_path / "site"
    for name in ("index.html", "viewer.js", "viewer.css", "openseadragon/openseadragon.min.js", "openseadragon/LICENSE.txt",
                 "viewer.json", "tiles.json", "overlay.png", "slide.dzi"):
        assert (site / name).is_file(), name
    with open_view(result, tile_format="png") as view:
        expected = {f"{level}/{column}_{row}.png" for level, (columns, rows) in enumerate(view.levels())
                    for column in range(columns) for row in range(rows)}
        levels = len(view.levels())
    assert {str(p.relative_to(site / "slide_files")) for p in (site / "slide_files").rglob("*.png")} == expected
    assert f'Width="{WIDTH}"' in (site / "slide.dzi").read_text() and f'Height="{HEIGHT}"' in (site / "slide.dzi").read_text()
    deepest = Image.open(site / "slide_files" / str(levels - 1) / "1_1.png").convert("RGB")
    assert deepest.getpixel((100, 100)) == slide_colour(0, 0)  # level-0 pixels, losslessly: (355, 355) is in tile (0, 0)
    tiles = json.loads((site / "tiles.json").read_text())
    with open(result / "tiles.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tiles["labels"] == LABELS and len(tiles["tiles"]) == len(rows) == COLUMNS * ROWS - len(UNCLASSIFIED)
    for compact, row in zip(tiles["tiles"], rows, strict=True):
        assert compact[:4] == [int(row[k]) for k in ("x", "y", "width", "height")]
        assert LABELS[compact[5]] == row["label"] and compact[6] == float(row["score"])
        assert compact[7:] == [float(row[f"p_{label}"]) for label in LABELS]
    config = json.loads((site / "viewer.json").read_text())
    summary = json.loads((result / "summary.json").read_text())
    overlay = Image.open(result / "overlay.png")
    dx, dy = summary["thumbnail"]["downsample"]
    assert dx != dy  # the overlay is stretched differently in x and y: both exactly to the slide's edges
    assert config["overlay"]["level0_rect"] == [0, 0, overlay.width * dx, overlay.height * dy]
    assert abs(overlay.width * dx - WIDTH) < 1e-6 and abs(overlay.height * dy - HEIGHT) < 1e-6
    # an export over an earlier export is replaced; over a folder of other files, refused
    run_cli("-m", "histoserve.client", "slide-view", result, "--export", site, timeout=120)
    assert not list((site / "slide_files").rglob("*.png")) and list((site / "slide_files").rglob("*.jpeg"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    refused = run_cli("-m", "histoserve.client", "slide-view", result, "--export", tmp_path / "other", check=False)
    assert refused.returncode == 1 and "other files" in refused.stderr


def test_a_folder_without_summary_json_is_named(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "progress.csv").write_text("# run x\n")
    refused = run_cli("-m", "histoserve.client", "slide-view", tmp_path / "half", "--export", tmp_path / "out", check=False)
    assert refused.returncode == 1
    assert f"{tmp_path / 'half' / 'summary.json'}: missing" in refused.stderr and "interrupted" in refused.stderr
    assert "Traceback" not in refused.stderr
    missing = run_cli("-m", "histoserve.client", "slide-view", tmp_path / "nowhere", check=False)
    assert missing.returncode == 1 and f"{tmp_path / 'nowhere'}: no such folder" in missing.stderr


def test_a_moved_slide_is_named_and_found_again_with_slide(result, tmp_path):
    folder = tmp_path / "checkerboard"
    shutil.copytree(result, folder)
    summary = json.loads((folder / "summary.json").read_text())
    moved = tmp_path / "elsewhere.tiff"
    shutil.copy(summary["slide"], moved)
    summary["slide"] = str(tmp_path / "gone" / "checkerboard.tiff")
    (folder / "summary.json").write_text(json.dumps(summary))
    refused = run_cli("-m", "histoserve.client", "slide-view", folder, "--export", tmp_path / "out", check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert f"{folder / 'summary.json'}: its slide {tmp_path / 'gone' / 'checkerboard.tiff'} is not there any more" in refused.stderr
    assert "--slide" in refused.stderr
    run_cli("-m", "histoserve.client", "slide-view", folder, "--slide", moved, "--export", tmp_path / "out", timeout=120)
    assert (tmp_path / "out" / "slide.dzi").is_file()


def test_another_slide_is_refused(result, tmp_path):
    other = write_slide(tmp_path / "other.tiff", background(600, 800), mpp=0.5, levels=2)
    refused = run_cli("-m", "histoserve.client", "slide-view", result, "--slide", other, "--export", tmp_path / "out", check=False)
    assert refused.returncode == 1 and "not the slide these results are of" in refused.stderr and str(other) in refused.stderr


def test_the_server_serves_only_the_page_s_files(result):
    import urllib.error
    import urllib.request

    viewer = Viewer(result)
    try:
        def get(path):
            with urllib.request.urlopen(viewer.url + path, timeout=30) as response:
                return response.status, response.headers["Content-Type"], response.read()

        assert get("")[1].startswith("text/html")
        assert get("viewer.json")[1] == "application/json"
        status, kind, body = get("slide_files/0/0_0.jpeg")
        assert (status, kind) == (200, "image/jpeg") and body[:2] == b"\xff\xd8"
        for path in ("../summary.json", "summary.json", "tiles.csv", "slide_files/0/9_9.jpeg", "slide_files/0/0_0.png",
                     "openseadragon/../../slide.py", "%2e%2e/slide.py"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                get(path)
            assert refused.value.code == 404, path
    finally:
        viewer.close()


def test_the_installed_package_carries_the_viewer_s_files():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["histoserve.client"]
    from histoserve.client.slide_view import STATIC_FILES

    client = ROOT / "client"
    carried = {p for pattern in patterns for p in client.glob(pattern)}
    assert {p.resolve() for p in STATIC_FILES.values()} <= {p.resolve() for p in carried}


@pytest.mark.server
def test_a_real_result_folder_opens(server, tmp_path):
    """A folder `python -m histoserve.client slide` wrote against the served model: the viewer reads it as it is."""
    from histoserve.client.slide_view import open_view

    pixels = background(256, 320)
    pixels[64:192, 64:256] = (200, 120, 180)
    slide = write_slide(tmp_path / "real.tiff", pixels, mpp=0.5, levels=2, tile=128)
    run_cli("-m", "histoserve.client", "slide", slide, "--url", server.grpc_url, "--model", MODEL, "--out", tmp_path / "out",
            "--min-tissue", 0, timeout=300)
    with open_view(tmp_path / "out" / "real") as view:
        config, tiles = view.config(), json.loads(view.tiles_json())
        assert (config["width"], config["height"]) == (320, 256)
        assert len(tiles["tiles"]) == config["tile_counts"]["classified"] > 0
        assert set(config["colours"]) == set(tiles["labels"])
        assert view.tile(len(view.levels()) - 1, 0, 0)[:2] == b"\xff\xd8"
