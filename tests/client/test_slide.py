"""`python -m histoserve.client slide` against the real Triton: slides made here with tifffile (pyramidal, tiled,
with resolution tags) from the test split's images placed in known regions, and OpenSlide's own small
vendor files. A tile classified from the slide is exactly the pixels of the same region saved as a
lossless PNG; an interrupted run finishes with the results of an uninterrupted one; a slide that cannot
be read is one error line while the others go on."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histoserve.client.classifier import TritonClassifier
from histoserve.client.slide import SlideOptions, TileGrid, plan_grid, read_tile, read_tiles, tissue_mask
from histoserve.formats.preprocessing import INTERPOLATIONS, preprocess_file, preprocess_image
from tests.conftest import MODEL, ROOT, run_cli
from tests.slides import background, write_slide

FIXTURES = Path(__file__).parent / "openslide-fixtures"
CELL = 36  # the digits model's resize size: the default tile


def digit_slide(path: Path, test_files: list[Path], columns: int = 8, rows: int = 6, mpp: float = 0.5, levels: int = 3) -> Path:
    """The test split's images (upscaled 4× with nearest neighbours) centred in 36-pixel cells on glass."""
    pixels = background(rows * CELL, columns * CELL)
    for i, file in enumerate(test_files[::7][:columns * rows]):
        r, c = divmod(i, columns)
        image = np.asarray(Image.open(file).convert("RGB").resize((32, 32), Image.Resampling.NEAREST))
        pixels[r * CELL + 2:r * CELL + 34, c * CELL + 2:c * CELL + 34] = image
    return write_slide(path, pixels, mpp, levels=levels, tile=64)


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def slide_cli(*args, check=True, timeout=300):
    return run_cli("-m", "histoserve.client", "slide", *args, check=check, timeout=timeout)


@pytest.fixture(scope="module")
def classifier(server):
    with TritonClassifier(server.grpc_url, MODEL) as client:
        yield client


@pytest.mark.parametrize("tile_px, stride_px, mpp", [(None, None, None), (40, 20, None), (None, None, 1.0), (None, None, 0.75)],
                         ids=["default-tile", "overlapping-40px", "level-1-exact", "resampled-0.75"])
def test_each_tile_is_exactly_the_region_saved_as_a_lossless_png(server, classifier, test_files, tmp_path, tile_px, stride_px, mpp):
    slide = digit_slide(tmp_path / "digits.tiff", test_files)
    options = [*(["--tile-px", tile_px] if tile_px else []), *(["--stride-px", stride_px] if stride_px else []),
               *(["--mpp", mpp] if mpp else [])]
    slide_cli(slide, "--url", server.grpc_url, "--model", MODEL, "--out", tmp_path / "out", "--min-tissue", 0, *options)
    out = tmp_path / "out" / "digits"
    summary = json.loads((out / "summary.json").read_text())
    rows = read_rows(out / "tiles.csv")
    import openslide

    opened = openslide.OpenSlide(str(slide))
    level, downsample = summary["grid"]["level"], summary["grid"]["level_downsample"]
    tile = summary["grid"]["tile_px"]
    assert summary["mpp"]["level0"] == [0.5, 0.5] and summary["mpp"]["source"] == "openslide.mpp-x/y"
    assert len(rows) == summary["tiles"]["classified"] == summary["grid"]["columns"] * summary["grid"]["rows"]
    assert (level, summary["grid"]["resampled"]) == {None: (0, False), 1.0: (1, False), 0.75: (0, True)}[mpp]
    pngs, pixels = [], []
    for row in rows[:: max(1, len(rows) // 12)]:
        x, y, size = int(row["x"]), int(row["y"]), int(row["width"])
        read = round(size / downsample)
        region = opened.read_region((x, y), level, (read, read)).convert("RGB")
        if read != tile:  # the documented resampling: the model's own interpolation, to --tile-px
            region = region.resize((tile, tile), resample=INTERPOLATIONS[classifier.spec.interpolation])
        png = tmp_path / f"tile-{x}-{y}.png"
        region.save(png)  # lossless
        pngs.append((row, png))
        pixels.append(preprocess_file(png, classifier.spec))
    # the tiles as the slide path reads them (strips of a row, or one by one) are the PNGs' pixels, exactly
    grid = TileGrid(**{k: tuple(v) if isinstance(v, list) else v for k, v in summary["run"]["grid"].items()})
    from_slide = read_tiles(opened, grid, classifier.spec, [(int(row["x"]), int(row["y"])) for row, _ in pngs])
    for (_, png), expected, tile in zip(pngs, pixels, from_slide, strict=True):
        assert np.array_equal(tile, expected), png
    first_row = [(int(r["x"]), int(r["y"])) for r in rows if r["y"] == rows[0]["y"]]
    one_by_one = [preprocess_image(read_tile(opened, grid, x, y, classifier.spec.interpolation), classifier.spec) for x, y in first_row]
    assert np.array_equal(read_tiles(opened, grid, classifier.spec, first_row), np.stack(one_by_one))
    batch = classifier.max_batch_size
    probabilities = np.concatenate([classifier.infer_probabilities(np.stack(pixels[i:i + batch])) for i in range(0, len(pixels), batch)])
    labels = [key[2:] for key in rows[0] if key.startswith("p_")]
    for (row, _), served in zip(pngs, probabilities, strict=True):
        assert np.allclose([float(row[f"p_{label}"]) for label in labels], served, atol=1e-6, rtol=0)
        assert row["label"] == labels[int(np.argmax(served))]


def test_the_results_name_every_tile_once_for_qupath_and_the_slide_level_rule(server, test_files, tmp_path):
    slide = digit_slide(tmp_path / "digits.tiff", test_files)
    result = slide_cli(slide, "--url", server.grpc_url, "--model", MODEL, "--out", tmp_path / "out", "--min-tissue", 0, "--json")
    line = json.loads(result.stdout.splitlines()[-1])
    out = Path(line["out"])
    rows = read_rows(out / "tiles.csv")
    features = json.loads((out / "tiles.geojson").read_text())["features"]
    assert [f["properties"]["classification"]["name"] for f in features] == [row["label"] for row in rows]
    first = features[0]["geometry"]["coordinates"][0]
    assert first[0] == [int(rows[0]["x"]), int(rows[0]["y"])] and first[2] == [int(rows[0]["x"]) + CELL, int(rows[0]["y"]) + CELL]
    assert sorted((int(r["y"]), int(r["x"])) for r in rows) == [(int(r["y"]), int(r["x"])) for r in rows]
    summary = line["summary"]
    shares = {label: c["share"] for label, c in summary["classes"].items()}
    assert summary["slide_result"]["label"] == max(shares, key=lambda k: (shares[k], summary["classes"][k]["mean_probability"]))
    assert sum(c["tiles"] for c in summary["classes"].values()) == len(rows)
    heatmap = Image.open(out / "heatmap.png")
    assert heatmap.width > Image.open(out / "overlay.png").width  # the legend strip
    again = slide_cli(slide, "--url", server.grpc_url, "--model", MODEL, "--out", tmp_path / "out", "--min-tissue", 0)
    assert "already done" in again.stdout


def tissue_slide(path: Path, mpp: float = 0.5) -> tuple[Path, dict]:
    """Glass with a pink-purple H&E-like region, a blue pen stroke and a black mark, at known places."""
    pixels = background(720, 960)
    rng = np.random.default_rng(0)
    tissue = (slice(72, 432), slice(108, 540))  # 360 × 432 px
    pixels[tissue] = np.clip(rng.normal((190, 110, 170), 12, (360, 432, 3)), 0, 255).astype(np.uint8)
    pixels[540:612, 108:468] = (40, 60, 200)   # blue ink
    pixels[540:612, 468:828] = (10, 10, 235)   # deep blue ink (hue 0.667)
    pixels[72:180, 720:828] = (20, 20, 20)     # a black mark
    return write_slide(path, pixels, mpp, levels=2, tile=128), {"tissue_mm2": 360 * 432 * (mpp / 1000) ** 2}


def test_only_tissue_tiles_are_classified_not_glass_pen_or_marks(server, tmp_path):
    slide, truth = tissue_slide(tmp_path / "tissue.tiff")
    import openslide

    thumbnail = openslide.OpenSlide(str(slide)).get_thumbnail((960, 720)).convert("RGB")
    mask = tissue_mask(thumbnail)
    assert mask[100:400, 150:500].mean() > 0.99 and mask[545:605, 120:800].mean() == 0 and mask[80:170, 730:820].mean() == 0
    slide_cli(slide, "--url", server.grpc_url, "--model", MODEL, "--out", tmp_path / "out", "--min-tissue", 0.5)
    summary = json.loads((tmp_path / "out" / "tissue" / "summary.json").read_text())
    rows = read_rows(tmp_path / "out" / "tissue" / "tiles.csv")
    assert rows and all(108 - CELL < int(r["x"]) < 540 and 72 - CELL < int(r["y"]) < 432 for r in rows)
    assert all(float(r["tissue"]) >= 0.5 for r in rows)
    assert summary["tissue"]["area_mm2"] == pytest.approx(truth["tissue_mm2"], rel=0.05)
    assert summary["tiles"]["classified"] < summary["tiles"]["grid"] / 2


def test_an_interrupted_run_continues_and_ends_with_the_uninterrupted_results(server, test_files, tmp_path):
    """Killed (SIGKILL, mid-write at worst) and run again: tiles.csv is byte for byte the one run that
    was never interrupted wrote (one tile per request, one in flight: Triton batches nothing, so each
    probability is computed the same way both times)."""
    slide = digit_slide(tmp_path / "digits.tiff", test_files, columns=12, rows=10)
    common = ["--url", server.grpc_url, "--model", MODEL, "--min-tissue", 0, "--batch-size", 1, "--concurrency", 1, "--workers", 1]
    slide_cli(slide, *common, "--out", tmp_path / "whole")
    command = [sys.executable, "-m", "histoserve.client", "slide", str(slide), *map(str, common), "--out", str(tmp_path / "cut")]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    progress = tmp_path / "cut" / "digits" / "progress.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not progress.exists() or len(progress.read_text().splitlines()) < 30):
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)  # the client only: its tile readers must die with it (PR_SET_PDEATHSIG)
    process.wait()
    time.sleep(0.5)
    states = subprocess.run(["ps", "-s", str(process.pid), "-o", "stat="], capture_output=True, text=True).stdout.split()
    alive = [state for state in states if not state.startswith("Z")]  # a killed reader is a zombie until init reaps it
    if alive:
        os.killpg(process.pid, signal.SIGKILL)
    assert alive == []
    done_before = len(progress.read_text().splitlines()) - 2
    assert 0 < done_before < 120 and not (tmp_path / "cut" / "digits" / "summary.json").exists()
    with open(progress, "a") as handle:
        handle.write("36,72,36,36,0.0,3,0.5")  # a row torn by the interruption
    resumed = slide_cli(slide, *common, "--out", tmp_path / "cut")
    assert "done: 120 tiles" in resumed.stdout
    assert (tmp_path / "cut" / "digits" / "tiles.csv").read_bytes() == (tmp_path / "whole" / "digits" / "tiles.csv").read_bytes()
    assert not progress.exists()


def test_unreadable_slides_are_one_error_line_each_and_the_others_go_on(server, test_files, tmp_path):
    good = digit_slide(tmp_path / "good.tiff", test_files, columns=4, rows=3)
    no_resolution = write_slide(tmp_path / "no-mpp.tiff", background(108, 144), mpp=None, levels=1)
    (tmp_path / "notes.svs").write_text("not a slide")
    args = [good, no_resolution, tmp_path / "notes.svs", tmp_path / "missing.tiff", FIXTURES / "unopenable.tiff",
            FIXTURES / "unreadable.svs"]
    result = slide_cli(*args, "--url", server.grpc_url, "--model", MODEL, "--out", tmp_path / "out", "--min-tissue", 0,
                       "--tile-px", 16, check=False)
    assert result.returncode == 1, result.stderr
    lines = dict(line.split("\t", 1) for line in result.stdout.splitlines())
    assert lines[str(good)].startswith("done: ")
    assert f"{no_resolution}: no resolution in the file" in lines[str(no_resolution)] and "--assume-mpp" in lines[str(no_resolution)]
    assert "not a slide format OpenSlide reads" in lines[str(tmp_path / "notes.svs")]
    assert "cannot open" in lines[str(tmp_path / "missing.tiff")] or "not a slide format" in lines[str(tmp_path / "missing.tiff")]
    assert lines[str(FIXTURES / "unopenable.tiff")].startswith("error: ")
    assert "cannot read" in lines[str(FIXTURES / "unreadable.svs")]
    assert "Traceback" not in result.stderr
    assumed = slide_cli(no_resolution, "--assume-mpp", 0.5, "--url", server.grpc_url, "--model", MODEL, "--out", tmp_path / "out",
                        "--min-tissue", 0)
    assert "done: 12 tiles" in assumed.stdout
    assert json.loads((tmp_path / "out" / "no-mpp" / "summary.json").read_text())["mpp"]["source"] == "--assume-mpp"


@pytest.mark.parametrize("fixture, vendor", [("small.svs", "aperio"), ("boxes.tiff", "generic-tiff"), ("boxes_0.dcm", "dicom")])
def test_openslide_s_own_vendor_files_are_classified(server, tmp_path, fixture, vendor):
    result = slide_cli(FIXTURES / fixture, "--url", server.grpc_url, "--model", MODEL, "--out", tmp_path / "out",
                       "--min-tissue", 0, "--tile-px", 16, "--json")
    summary = json.loads(result.stdout.splitlines()[-1])["summary"]
    assert summary["vendor"] == vendor and summary["tiles"]["classified"] == summary["tiles"]["grid"] > 0
    rows = read_rows(tmp_path / "out" / Path(fixture).stem / "tiles.csv")
    assert all(abs(sum(float(v) for k, v in row.items() if k.startswith("p_")) - 1) < 1e-4 for row in rows)


def test_the_grid_reads_from_the_right_level_and_refuses_what_a_slide_cannot_give(tmp_path, test_files):
    import openslide

    from histoserve.client.slide import SlideError
    from histoserve.formats.preprocessing import PreprocessSpec

    spec = PreprocessSpec(36, 32)
    slide = openslide.OpenSlide(str(digit_slide(tmp_path / "d.tiff", test_files, levels=3)))  # 0.5, 1, 2 µm/px
    for mpp, level, resampled in ((0.5, 0, False), (1.0, 1, False), (1.5, 1, True), (2.0, 2, False), (3.0, 2, True)):
        grid = plan_grid(slide, tmp_path / "d.tiff", SlideOptions(mpp=mpp), spec)
        assert (grid.level, grid.read_px != grid.tile_px, grid.footprint) == (level, resampled, round(36 * mpp / 0.5)), mpp
    with pytest.raises(SlideError, match="finer than the slide's level 0"):
        plan_grid(slide, tmp_path / "d.tiff", SlideOptions(mpp=0.25), spec)
    with pytest.raises(SlideError, match="spans .* more than the slide"):
        plan_grid(slide, tmp_path / "d.tiff", SlideOptions(tile_px=4000), spec)
    # a vendor-like pyramid whose levels halve approximately (601 → 300 px: 2.0033): level 1 is still used as it is
    odd = openslide.OpenSlide(str(write_slide(tmp_path / "odd.tiff", background(401, 601), 0.5, levels=2)))
    assert odd.level_downsamples[1] != 2.0
    grid = plan_grid(odd, tmp_path / "odd.tiff", SlideOptions(mpp=1.0), spec)
    assert (grid.level, grid.read_px) == (1, 36)


def test_tiles_narrower_than_a_thumbnail_pixel_still_show_in_the_overlay():
    from histoserve.client.slide import draw_overlay

    rows = [{"x": 0, "y": 0, "width": 36, "height": 36, "label": "a", "score": 1.0}]
    overlay = draw_overlay((100, 100), (40.0, 40.0), rows, {"a": "#ff0000"})
    assert overlay.getpixel((0, 0))[:3] == (255, 0, 0) and overlay.getpixel((1, 1))[3] == 0


def test_progress_of_another_slide_of_the_same_name_is_refused_not_taken(tmp_path):
    from histoserve.client.slide import SlideError, load_progress, open_progress

    key = {"slide_identity": "aaa", "grid": {}, "min_tissue": 0.5, "model": "m", "model_version": "1"}
    with open_progress(tmp_path / "progress.csv", key, ["x"]) as log:
        log.writerow({"x": 0, "y": 0, "width": 1, "height": 1, "tissue": 1.0, "label": "x", "score": 1.0, "p_x": 1.0})
    assert len(load_progress(tmp_path / "progress.csv", key, ["x"])) == 1
    with pytest.raises(SlideError, match="another slide of the same name"):
        load_progress(tmp_path / "progress.csv", {**key, "slide_identity": "bbb"}, ["x"])
    assert load_progress(tmp_path / "progress.csv", {**key, "min_tissue": 0.0}, ["x"]) == []  # same slide, other options
    assert list(tmp_path.glob("progress.csv.other-run-*"))  # set aside, not deleted
