"""Images you can trust, and a platform no overlay can take down: every image pinned by digest from one
list (k8s/components/images), admitted only as the Sigstore policy-controller policy says (its globs
evaluated as the controller evaluates them), an SBOM per project image listing the pinned packages, and
the Namespace and the model store's claim outside every serving overlay."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.utils import canonicalize_name

from tests.k8s import custom_resources
from tests.k8s.manifests import (
    CLUSTER_SCOPED,
    JOBS,
    K8S,
    KUSTOMIZATIONS,
    OVERLAYS,
    PLATFORMS,
    ROOT,
    containers,
    platform_for,
    pod_templates,
    render_cached,
)

IMAGES = K8S / "components" / "images" / "kustomization.yaml"


def pinned_images() -> dict[str, str]:
    """Placeholder name → the reference kustomize renders (name:tag@digest)."""
    return {i["name"]: f"{i['newName']}:{i['newTag']}@{i['digest']}" for i in yaml.safe_load(IMAGES.read_text())["images"]}


def rendered_images(kustomization: str) -> list[tuple[str, dict]]:
    return [(f"{w['metadata']['name']}/{c['name']}", c) for w, t in pod_templates(render_cached(kustomization))
            for c in containers(t)]


# --- one list of digests -------------------------------------------------------------------------

def test_every_image_is_pinned_by_digest_in_the_images_component():
    pinned = pinned_images()
    for reference in pinned.values():
        assert re.fullmatch(r"[^@\s]+:[^@\s]+@sha256:[0-9a-f]{64}", reference), reference
    for kustomization in KUSTOMIZATIONS:
        for where, container in rendered_images(kustomization):
            assert container["image"] in pinned.values(), f"{kustomization} {where}: {container['image']} is not from {IMAGES}"
            assert container["imagePullPolicy"] == "IfNotPresent", f"{kustomization} {where}"


def test_no_other_kustomization_or_manifest_names_an_image():
    """The component is the one place: other kustomizations set no `images:`, and every container in
    the sources names one of its placeholders (a literal reference there would escape it)."""
    names = set(pinned_images())
    for path in sorted(K8S.rglob("*.yaml")):
        text = path.read_text()
        if path.name == "kustomization.yaml" and path != IMAGES:
            assert "images" not in (yaml.safe_load(text) or {}), f"{path}: images: belongs in {IMAGES}"
        for image in re.findall(r"^\s*(?:-\s+)?image:\s*(\S+)", text, re.MULTILINE):
            assert image in names, f"{path}: image {image} is not a placeholder of {IMAGES}"


def test_the_image_check_notices_a_tag_without_a_digest():
    from tests.k8s.manifests import check_images

    objects = copy.deepcopy(render_cached("overlays/gpu"))
    assert check_images(objects) == []
    deployment = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "triton")
    deployment["spec"]["template"]["spec"]["containers"][0]["image"] = "nvcr.io/nvidia/tritonserver:26.10-py3"
    assert check_images(objects)


# --- the admission policy, as policy-controller matches it ---------------------------------------

def glob_regex(glob: str) -> re.Pattern:
    """policy-controller's pkg/apis/glob.Compile (v0.15.1): `**` any characters, `*` any but `/`."""
    if glob == "*/*":
        glob = "index.docker.io/*/*"
    if glob == "*":
        glob = "index.docker.io/library/*"
    if not re.fullmatch(r"[a-zA-Z0-9\-_:/*.@]+", glob):
        raise ValueError(f"invalid glob {glob!r}")
    pattern = glob.replace(".", r"\.").replace("**", "#").replace("*", "[^/]*").replace("#", ".*")
    return re.compile(f"^{pattern}$")


def full_name(image: str) -> str:
    """go-containerregistry's name.ParseReference(...).Name() for the references we use: Docker Hub
    images under index.docker.io/ (and library/ for single names), the rest as written."""
    repository = image.split("@")[0]
    first = repository.split("/")[0]
    if "." not in first and ":" not in first and first != "localhost":
        repository = "index.docker.io/" + (repository if "/" in repository else "library/" + repository)
    return repository + image[len(image.split("@")[0]):]


def glob_matches(glob: str, image: str) -> bool:
    regex = glob_regex(glob)
    return bool(regex.match(full_name(image)) or regex.match(image))


def policies() -> list[dict]:
    return [o for o in render_cached("platform") if o["kind"] == "ClusterImagePolicy"]


def admitting_policies(image: str, cluster_policies: list[dict]) -> list[dict]:
    return [p for p in cluster_policies if any(glob_matches(g["glob"], image) for g in p["spec"]["images"])]


def verifies_our_signature_and_sbom(policy: dict) -> bool:
    return policy["spec"].get("mode", "enforce") == "enforce" and any(
        "key" in a and "static" not in a and any(att.get("predicateType") == "cyclonedx" for att in a.get("attestations", []))
        for a in policy["spec"]["authorities"])


def admission_problems(cluster_policies: list[dict]) -> list[str]:
    """Every image we run matches a policy (the controller refuses one that matches none); our own
    images only policies that check the project's signature and SBOM attestation (every matching
    policy must pass, so a static pass beside them would not weaken them, but a project image
    matched by a static pass alone would be admitted unsigned)."""
    problems = []
    ours = {ref for name, ref in pinned_images().items() if name.startswith("histoserve")}
    for reference in sorted(set(pinned_images().values())):
        matching = admitting_policies(reference, cluster_policies)
        if not matching:
            problems.append(f"{reference}: matches no ClusterImagePolicy: the controller refuses the pod")
        elif reference in ours and not any(verifies_our_signature_and_sbom(p) for p in matching):
            problems.append(f"{reference}: admitted without the project's signature and SBOM attestation")
    return problems


def test_the_policy_validates_against_the_vendored_crd_and_a_misspelling_fails():
    for policy in policies():
        custom_resources.validate(policy)
    broken = copy.deepcopy(policies()[0])
    broken["spec"]["authorities"][0]["key"]["secretref"] = broken["spec"]["authorities"][0]["key"].pop("secretRef")
    with pytest.raises(jsonschema.ValidationError):
        custom_resources.validate(broken)


def test_every_image_we_run_is_admitted_and_ours_only_signed_with_an_sbom():
    assert admission_problems(policies()) == []


@pytest.mark.parametrize("breakage", ["unsigned", "static-pass", "wrong-registry", "warn-only"])
def test_the_admission_check_notices_a_weakened_policy(breakage):
    broken = copy.deepcopy(policies())
    ours = next(p for p in broken if p["metadata"]["name"] == "histoserve-images")
    if breakage == "unsigned":
        ours["spec"]["authorities"][0].pop("attestations")
    elif breakage == "static-pass":
        ours["spec"]["authorities"] = [{"name": "anything", "static": {"action": "pass"}}]
    elif breakage == "wrong-registry":  # our images then match no policy
        ours["spec"]["images"] = [{"glob": "registry.example.org/histoserve**"}]
    else:
        ours["spec"]["mode"] = "warn"
    assert admission_problems(broken)


@pytest.mark.parametrize("glob, image, expected", [  # policy-controller's glob_test.go cases, and ours
    ("index.docker.io/library/ubuntu", "ubuntu", True),
    ("*", "ubuntu", True),
    ("*/*", "myuser/myapp", True),
    ("index.docker.io/amazon/aws-cli**", "amazon/aws-cli:2.17.0@sha256:" + "6" * 64, True),
    ("registry.example.com/histoserve**", "registry.example.com/histoserve-serve:0.1.0@sha256:" + "0" * 64, True),
    ("registry.example.com/histoserve*", "registry.example.com/histoserve/tritonserver:26.10", False),  # * stops at /
    ("ghcr.io/*", "ghcr.io/a/b", False),
])
def test_globs_match_as_the_policy_controller_matches_them(glob, image, expected):
    assert glob_matches(glob, image) is expected


def test_only_production_namespaces_are_enforced():
    namespaces = {o["metadata"]["name"]: o["metadata"]["labels"] for p in PLATFORMS for o in render_cached(p) if o["kind"] == "Namespace"}
    assert namespaces["histoserve"]["policy.sigstore.dev/include"] == "true"
    assert "policy.sigstore.dev/include" not in namespaces["histoserve-dev"]  # dev runs images built on the spot


# --- the platform outlives the overlays ----------------------------------------------------------

def identity(o: dict) -> tuple:
    return o["kind"], None if o["kind"] in CLUSTER_SCOPED else o["metadata"].get("namespace"), o["metadata"]["name"]


def protected() -> set[tuple]:
    """What must outlive every overlay: the Namespaces and the model store's claims."""
    return {identity(o) for p in PLATFORMS for o in render_cached(p)
            if o["kind"] == "Namespace" or (o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"] == "triton-model-repository")}


def deleted_by(kustomization: str) -> set[tuple]:
    """What `kubectl delete -k` deletes: every object the kustomization renders (a GitOps prune of it
    the same)."""
    return {identity(o) for o in render_cached(kustomization)}


def test_the_platform_holds_the_namespaces_and_the_claims():
    assert {(k, n) for k, _, n in protected()} == {
        ("Namespace", "histoserve"), ("Namespace", "histoserve-dev"), ("PersistentVolumeClaim", "triton-model-repository")}
    assert ("PersistentVolumeClaim", "histoserve", "triton-model-repository") in protected()
    assert ("PersistentVolumeClaim", "histoserve-dev", "triton-model-repository") in protected()
    for platform in PLATFORMS:
        for o in render_cached(platform):
            if identity(o) in protected():  # and a GitOps controller is told never to prune or delete them
                annotations = o["metadata"].get("annotations", {})
                assert annotations.get("argocd.argoproj.io/sync-options") == "Delete=false,Prune=false", identity(o)
                assert annotations.get("kustomize.toolkit.fluxcd.io/prune") == "disabled", identity(o)


@pytest.mark.parametrize("kustomization", OVERLAYS + JOBS)
def test_deleting_an_overlay_or_job_cannot_delete_the_namespace_or_the_store(kustomization):
    assert deleted_by(kustomization) & protected() == set()


def test_every_overlay_renders_on_its_platform():
    """The overlay's pods claim the store the platform creates, in the namespace the platform creates."""
    for overlay in OVERLAYS:
        platform = render_cached(platform_for(overlay))
        namespaces = {o["metadata"]["name"] for o in platform if o["kind"] == "Namespace"}
        claims = {o["metadata"]["name"] for o in platform if o["kind"] == "PersistentVolumeClaim"}
        for workload, template in pod_templates(render_cached(overlay)):
            assert workload["metadata"]["namespace"] in namespaces, overlay
            for volume in template["spec"].get("volumes", []):
                claim = volume.get("persistentVolumeClaim", {}).get("claimName")
                assert claim is None or claim in claims or claim == "histoserve-monitor-records", (overlay, claim)


def test_the_deletion_check_notices_a_namespace_back_in_an_overlay():
    namespace = next(o for o in render_cached("platform") if o["kind"] == "Namespace")
    assert {identity(o) for o in render_cached("overlays/gpu") + [namespace]} & protected()


# --- SBOM per image ------------------------------------------------------------------------------

@cache
def sboms(out: str) -> dict[str, dict]:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "sbom.py"), "--out", out], capture_output=True, text=True,
                            timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    return {path.name.removesuffix(".cdx.json"): json.loads(path.read_text()) for path in sorted(Path(out).glob("*.cdx.json"))}


@pytest.fixture(scope="module")
def sbom(tmp_path_factory):
    return sboms(str(tmp_path_factory.mktemp("sbom")))


def constraint_pins() -> dict[str, str]:
    return {canonicalize_name(n): v for n, v in (line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines()
                                                 if "==" in line and not line.startswith("#"))}


def listed(document: dict) -> dict[str, str]:
    return {canonicalize_name(c["name"]): c["version"] for c in document["components"]}


def test_each_project_image_has_an_sbom_of_its_pinned_packages(sbom):
    assert set(sbom) == {"serve-tools", "full", "triton"}  # every Dockerfile stage that installs the project
    pins = constraint_pins()
    for image, document in sbom.items():
        assert document["bomFormat"] == "CycloneDX" and document["specVersion"].startswith("1.")
        packages = listed(document)
        assert packages, image
        for component in document["components"]:
            name, version = canonicalize_name(component["name"]), component["version"]
            assert pins.get(name) == version, f"{image}: {name} {version}, constraints.txt pins {pins.get(name)}"
            assert component["purl"] == f"pkg:pypi/{name}@{version}", component["purl"]


def test_the_sboms_list_what_each_image_installs_and_nothing_it_does_not(sbom):
    thin, full = listed(sbom["serve-tools"]), listed(sbom["full"])
    assert {"numpy", "pillow", "tritonclient", "grpcio", "protobuf"} <= set(thin)
    assert "torch" not in thin and "onnxruntime" not in thin  # the thin image has no torch
    assert {"torch", "torchvision", "onnx", "onnxruntime", "locust", "numpy"} <= set(full)
    assert set(thin) <= set(full)
    assert "ruff" not in full and "cyclonedx-bom" not in full  # dev tools are not in any image (locust does need pytest)
    assert "pytest" in full and "pytest" not in thin
    assert "histoserve" not in listed(sbom["triton"]) and set(listed(sbom["triton"])) <= set(thin)  # the package's
    # requirements, in NVIDIA's Python, for the python backend's preprocessing (no signing extra)
