"""The installed distribution claims one top-level name, histoserve; the repository keeps one folder
per stage and its `python -m <stage>` commands."""

import re
import shutil
import subprocess
import sys
import zipfile

from tests.conftest import ROOT

STAGES = ("client", "train", "export", "serve", "loadtest", "monitor")
PACKAGES = ("formats", *STAGES)  # formats: what the stages share; it has no command of its own


def test_the_wheel_installs_everything_under_histoserve_only(tmp_path):
    source = tmp_path / "source"  # a copy: building in the checkout would leave build/ there
    for name in ("pyproject.toml", "README.md"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, source / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)],
                   check=True, capture_output=True, timeout=300)
    [wheel] = tmp_path.glob("histoserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"histoserve"}
    assert "histoserve/formats/contract.py" in names
    for stage in STAGES:
        assert f"histoserve/{stage}/__init__.py" in names
        assert f"histoserve/{stage}/__main__.py" in names
    assert "histoserve/serve/onnxruntime_model.py" in names  # the python-backend model serve copies


def test_stages_run_as_histoserve_modules_outside_the_repository(tmp_path):
    for stage in ("client", "export", "serve", "train", "monitor"):
        result = subprocess.run([sys.executable, "-m", f"histoserve.{stage}", "--help"], cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "usage:" in result.stdout


def test_the_image_copies_every_package_the_distribution_maps():
    """`pip install .` in the Dockerfile fails on a package folder it was not given (formats/ once)."""
    mapped = set(re.findall(r'^"histoserve\.\w+" = "(\w+)"$', (ROOT / "pyproject.toml").read_text(), flags=re.MULTILINE))
    copied = set(re.findall(r"^COPY (\w+) \1$", (ROOT / "Dockerfile").read_text(), flags=re.MULTILINE))
    assert mapped == set(PACKAGES) == copied
