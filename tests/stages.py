"""The stages, as pyproject.toml lists them: its [tool.setuptools] packages is the one list the
packaging, import-graph, image and command tests read."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGES = tuple(name.removeprefix("histoserve.") for name in PYPROJECT["tool"]["setuptools"]["packages"])
# formats is what the stages share; it has no command of its own
STAGES = tuple(package for package in PACKAGES if (ROOT / package / "__main__.py").is_file())
SCRIPTS = PYPROJECT["project"]["scripts"]
