"""The Triton release we pin: at or above the floor that NVIDIA's security bulletins set
(k8s/triton-security.yaml), listed in k8s/README.md, and started only with flags that release has."""

import copy
import re
from pathlib import Path

import pytest
import yaml

from tests.k8s.manifests import K8S, OVERLAYS, containers, pod_templates, render, triton_command

SECURITY = K8S / "triton-security.yaml"
OPTIONS = Path(__file__).parent / "triton" / "tritonserver-options-r26.08.txt"
CATEGORIES = Path(__file__).parent / "triton" / "restricted-categories-r26.08.txt"
RELEASE = re.compile(r"^(\d{2})\.(\d{2})(?:\D|$)")  # NGC's YY.MM, e.g. 26.10-py3 or a composed 26.10-ort-trt


def release_of(tag: str) -> tuple[int, int]:
    match = RELEASE.match(tag)
    if not match:
        raise ValueError(f"tag {tag!r} names no YY.MM release")
    return int(match.group(1)), int(match.group(2))


def pinned_releases(objects: list[dict]) -> dict[str, tuple[int, int]]:
    """image → release, for every container that runs tritonserver."""
    found = {}
    for _, template in pod_templates(objects):
        for container in containers(template):
            if triton_command(container):
                name = container["image"].split("@")[0]
                found[container["image"]] = release_of(name.rsplit(":", 1)[1])
    return found


def security() -> dict:
    return yaml.safe_load(SECURITY.read_text())


def release_problems(objects: list[dict], data: dict) -> list[str]:
    problems = []
    floor = release_of(data["floor"])
    for bulletin in data["bulletins"]:
        if release_of(str(bulletin["fixed_in"])) > floor:
            problems.append(f"bulletin {bulletin['id']} is fixed in {bulletin['fixed_in']}, above the floor {data['floor']}")
    pinned = pinned_releases(objects)
    if not pinned:
        problems.append("no Triton container found")
    for image, release in pinned.items():
        if release < floor:
            problems.append(f"{image} is older than the floor {data['floor']}")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pinned_release_is_at_or_above_the_floor_of_the_bulletins(overlay):
    assert release_problems(render(overlay), security()) == []


def test_an_older_pin_or_a_newer_bulletin_fails_the_check():
    objects, data = render("overlays/gpu"), security()
    older = copy.deepcopy(objects)
    for _, template in pod_templates(older):
        for container in containers(template):
            if triton_command(container):
                container["image"] = "nvcr.io/nvidia/tritonserver:24.10-py3"   # what main ran before
    assert any("older than the floor" in p for p in release_problems(older, data))
    newer = {**data, "bulletins": [*data["bulletins"], {"id": 9999, "fixed_in": "26.11", "cves": []}]}
    assert any("above the floor" in p for p in release_problems(objects, newer))


def test_the_floor_covers_the_2025_and_2026_criticals():
    data = security()
    assert release_of(data["floor"]) >= (26, 7)
    listed = {cve for bulletin in data["bulletins"] for cve in bulletin["cves"]}
    assert {"CVE-2025-23310", "CVE-2025-23311", "CVE-2025-23317", "CVE-2025-23316", "CVE-2025-23319", "CVE-2025-23320",
            "CVE-2025-23334", "CVE-2026-24207"} <= listed


def test_the_readme_lists_every_bulletin_considered():
    readme = (K8S / "README.md").read_text()
    section = readme[readme.index("## Triton release and security bulletins"):]
    section = section[:section.index("\n## ", 3)]
    data = security()
    for bulletin in data["bulletins"]:
        assert re.search(rf"^\| {bulletin['id']} \|", section, re.M), f"bulletin {bulletin['id']} is not in k8s/README.md's table"
    assert f"floor {data['floor']}" in section


def known_options() -> set[str]:
    return {line.strip() for line in OPTIONS.read_text().splitlines() if line.strip() and not line.startswith("#")}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_flag_exists_in_the_release_we_pin(overlay):
    """tritonserver exits on an unknown flag: check ours against the option table of the newest release
    branch available offline (r26.08), not only against the 2.51 the local tests run."""
    options, categories = known_options(), set(CATEGORIES.read_text().split()) - {"#"}
    for _, template in pod_templates(render(overlay)):
        for container in containers(template):
            for word in triton_command(container):
                assert word.startswith("--"), word
                name = word[2:].split("=", 1)[0]
                assert name in options, f"--{name} is not an option of tritonserver r26.08"
                if name in ("grpc-restricted-protocol", "http-restricted-api"):
                    groups = word.split("=", 1)[1].split(":", 1)[0].split(",")
                    assert set(groups) <= categories, groups


def test_the_image_with_the_package_builds_on_the_release_the_manifests_pin():
    """The Dockerfile's `triton` target (Triton plus the package, for encoded models) starts from
    the very release components/images pins: one release, whichever image the pods run."""
    from tests.conftest import ROOT

    images = yaml.safe_load((K8S / "components" / "images" / "kustomization.yaml").read_text())
    pin = next(image for image in images["images"] if image["name"] == "tritonserver")
    built = re.search(r"^FROM (\S+):(\S+) AS triton$", (ROOT / "Dockerfile").read_text(), flags=re.MULTILINE)
    assert built and (built.group(1), built.group(2)) == (pin["newName"], pin["newTag"])
