"""A CycloneDX SBOM per project image, from the pinned environment: `make sbom`.

Each Dockerfile stage that installs this project (`pip install -c constraints.txt "<its wheel>[extras]"`) gets
sbom/<stage>.cdx.json listing exactly the Python packages that install puts in the image, each at the
version constraints.txt pins: the project's requirements with those extras, and theirs, resolved from
the installed metadata of this environment (markers evaluated for it: Linux, CPython 3.11, as the
image), written as pinned requirements and turned into CycloneDX JSON by cyclonedx-py. Attach each to
its pushed image as a signed attestation (the admission policy requires it, k8s/platform):

    cosign attest --key cosign.key --type cyclonedx --predicate sbom/serve-tools.cdx.json IMAGE@DIGEST

What it does not list: the base image's operating-system packages (python:3.11-slim's Debian, or
NVIDIA's Triton for the triton stage); `syft IMAGE` adds those where Docker runs.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "histoserve"
# a stage's `pip install -c .../constraints.txt "$(ls .../histoserve-*.whl)[extras]"` of the project's wheel
INSTALL = re.compile(r'pip install .*-c \S*constraints\.txt\s+"\$\(ls \S*/histoserve-\*\.whl\)(?:\[([^\]]*)\])?"')


def image_extras(dockerfile: Path) -> dict[str, list[str]]:
    """Dockerfile stage → the extras its `pip install` of the project names (stages that install it)."""
    stages, stage = {}, None
    for line in dockerfile.read_text().splitlines():
        start = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE)
        if start:
            stage = start.group(1)
        found = INSTALL.search(line)
        if found and stage:
            stages[stage] = [e.strip() for e in (found.group(1) or "").split(",") if e.strip()]
    if not stages:
        raise SystemExit(f"error: no stage of {dockerfile} installs the project with -c constraints.txt")
    return stages


def pins(constraints: Path) -> dict[str, str]:
    found = {}
    for line in constraints.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            found[canonicalize_name(name)] = version.strip()
    return found


def project_requirements(pyproject: Path, extras: list[str]) -> list[Requirement]:
    """The project's own requirements with `extras`, its self-references (histoserve[train]) expanded."""
    project = tomllib.loads(pyproject.read_text())["project"]
    wanted, seen, found = list(extras), set(), [Requirement(r) for r in project.get("dependencies", [])]
    while wanted:
        extra = wanted.pop()
        if extra in seen:
            continue
        seen.add(extra)
        if extra not in project.get("optional-dependencies", {}):
            raise SystemExit(f"error: the Dockerfile installs extra {extra!r}, which pyproject.toml does not define")
        for text in project["optional-dependencies"][extra]:
            requirement = Requirement(text)
            if canonicalize_name(requirement.name) == PROJECT:
                wanted.extend(requirement.extras)
            else:
                found.append(requirement)
    return found


def closure(requirements: list[Requirement], pinned: dict[str, str]) -> dict[str, str]:
    """Every distribution those requirements install here, by canonical name, at its pinned version."""
    installed, queue = {}, [(r, "") for r in requirements]
    while queue:
        requirement, extra = queue.pop()
        if requirement.marker and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        extras = set(requirement.extras)
        if name in installed and extras <= installed[name][1]:
            continue
        if name not in pinned:
            raise SystemExit(f"error: {requirement.name} is installed by the image but not pinned in constraints.txt")
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"error: {requirement.name} is not installed in {sys.prefix}: `make install` first") from None
        if canonicalize_name(distribution.version) != canonicalize_name(pinned[name]):
            raise SystemExit(f"error: {name} {distribution.version} is installed, constraints.txt pins {pinned[name]}")
        known = installed.get(name, (pinned[name], set()))[1]
        installed[name] = (pinned[name], known | extras)
        for text in distribution.requires or []:
            dependency = Requirement(text)
            for wanted_extra in [""] + sorted(extras):
                if not dependency.marker or dependency.marker.evaluate({"extra": wanted_extra}):
                    queue.append((dependency, wanted_extra))
                    break
    return {name: version for name, (version, _) in sorted(installed.items())}


def write_sbom(stage: str, packages: dict[str, str], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{stage}.cdx.json"
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as requirements:
        requirements.write("".join(f"{name}=={version}\n" for name, version in packages.items()))
    try:
        subprocess.run([sys.executable, "-m", "cyclonedx_py", "requirements", requirements.name, "--pyproject",
                        str(ROOT / "pyproject.toml"), "--mc-type", "application", "--output-reproducible",
                        "--of", "JSON", "-o", str(target)], check=True)
    finally:
        Path(requirements.name).unlink()
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "sbom")
    parser.add_argument("--dockerfile", type=Path, default=ROOT / "Dockerfile")
    parser.add_argument("--constraints", type=Path, default=ROOT / "constraints.txt")
    args = parser.parse_args(argv)
    pinned = pins(args.constraints)
    for stage, extras in image_extras(args.dockerfile).items():
        packages = closure(project_requirements(ROOT / "pyproject.toml", extras), pinned)
        path = write_sbom(stage, packages, args.out)
        print(f"{path}: {len(packages)} packages ({stage}: histoserve{'[' + ','.join(extras) + ']' if extras else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
