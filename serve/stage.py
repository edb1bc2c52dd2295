"""python -m histoserve.serve stage --store /store --model NAME --version N --target /models --trusted-keys /trusted-keys
python -m histoserve.serve stage --store /store --published RESULT_FILE --target /tmp/check --trusted-keys /trusted-keys

Copies exactly one published version out of the model store into a serving repository of its own,
and proves the copy intact first. What a Kubernetes pod's init container runs (the store is the
model claim mounted read-only, or the folder an S3 download filled); Triton then starts with
--model-control-mode=none on the result:

    <target>/<model>/config.pbtxt          the version's own config.pbtxt
    <target>/<model>/configs/cpu.pbtxt     its own CPU variant (--model-config-name=cpu)
    <target>/<model>/labels.txt            its own labels
    <target>/<model>/<version>/            every file of the version: model.onnx, golden answers, ...

and, when the store has them at the same version, the model's encoded twins (`<model>-preprocess`,
`<model>-encoded`: `python -m histoserve.export --encoded`), each checked the same way.

Every file is checked against the version's signature (model.sig, formats/signing.py) and its
SHA256SUMS *after* it was copied, so what Triton reads is what `python -m histoserve.export` wrote and signed:
an unsigned version, one signed by a key not in --trusted-keys (a folder of PEM public keys, `*.pub`:
a ConfigMap in the cluster; two keys at once during a rotation), or a file missing, altered or added
after signing stops the stage with a message naming the file and the reason, and nothing is left in
the target; so is a signed folder moved to another model or version in the store (identity.json,
which the signature covers, names where it was published). --allow-unsigned skips the signature
(local experiments only; every overlay that stages passes --trusted-keys; the dev overlay does not
stage at all: its Triton polls the claim, unverified). The config must name the
model, keep the serving contract and agree with the labels. Exit code 0: staged; 1: refused.

A target folder already holding a model is replaced only when an earlier stage wrote it (a pod's
init container runs again when the pod restarts); anything else there is refused, never deleted.
With --published, the model and version are the ones `python -m histoserve.export --result-file` wrote: how
the publish Job proves that what it put in the store verifies before anyone deploys it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from histoserve.formats.contract import LABELS_FILE, ContractError
from histoserve.formats.options import POSITIVE_INT, existing_file, existing_folder
from histoserve.formats.repository_layout import (
    MODEL_FILE,
    NAME_PATTERN,
    RepositoryError,
    contract_of,
    encoded_twins,
    is_model_name,
    read_config,
    versions,
)
from histoserve.formats.signing import trusted_keys, verify_signature
from histoserve.formats.version import (
    IDENTITY_FILE,
    VERSION_CONFIG,
    VERSION_CPU_CONFIG,
    VERSION_LABELS,
    GoldenAnswers,
    VersionFilesError,
    read_identity,
    read_published,
    verify_checksums,
    version_folder,
)

STAGE_MARKER = ".histoserve-stage.json"


class StageError(RuntimeError):
    """The version cannot be served as it is; the message names the file or the option."""


@dataclass(frozen=True)
class StagedVersion:
    model: str
    version: int
    folder: Path  # <target>/<model>
    files: int
    twins: tuple[str, ...] = ()  # the encoded model and its preprocessing, staged beside it
    signed_by: Path | None = None  # the trusted key that verified every staged folder (None: not checked)


def stage(store: Path, model: str, version: int, target: Path, trusted: list[Path] | None = None) -> StagedVersion:
    """Stage `model` at `version`, and its encoded twins at the same version when the store has them;
    with `trusted` (public keys), each folder's signature must verify with one of them first."""
    if not is_model_name(model):
        raise StageError(f"--model {model!r} must match {NAME_PATTERN.pattern}")
    source = version_folder(store, model, version)
    if not source.is_dir():
        known = versions(Path(store) / model)
        raise StageError(f"{source}: no such version in the store"
                         + (f" (it holds versions {', '.join(map(str, known))})" if known else f" (no model {model!r} there)"))
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    twins = tuple(name for name in encoded_twins(model) if version_folder(store, name, version).is_dir())
    for name in (model, *twins):
        if (target / name).exists() and not (target / name / STAGE_MARKER).is_file():
            raise StageError(f"{target / name} exists and was not written by `serve stage`: stage into an empty --target")
    placed = {VERSION_CONFIG: "config.pbtxt", VERSION_CPU_CONFIG: "configs/cpu.pbtxt", VERSION_LABELS: LABELS_FILE}
    twin_placed = {VERSION_CONFIG: "config.pbtxt", VERSION_LABELS: LABELS_FILE}
    prepared: list[tuple[str, Path]] = []
    signers = set()
    try:  # every folder verified before any is placed: a bad twin leaves nothing for Triton either
        for name, files, check in ((model, placed, check_version), *((t, twin_placed, check_twin) for t in twins)):
            work, signer = prepare_folder(Path(store), name, version, target, files, check, trusted)
            prepared.append((name, work))
            signers.add(signer)
        for name, work in prepared:
            place(work, target, name)
    finally:
        for _, work in prepared:
            shutil.rmtree(work, ignore_errors=True)
    folder = target / model
    return StagedVersion(model, version, folder, sum(1 for p in version_folder(target, model, version).iterdir() if p.is_file()), twins,
                         next(iter(signers)) if len(signers) == 1 else None)


def prepare_folder(store: Path, model: str, version: int, target: Path, placed: dict[str, str], check,
                   trusted: list[Path] | None) -> tuple[Path, Path | None]:
    """Copy store/model/version into a hidden folder of `target`, verify it (signature with `trusted`,
    SHA256SUMS, contents) and place its own config files (`placed`: file of the version → path in the
    model folder; absent ones skipped). Returns the folder and the key that verified it."""
    source = version_folder(store, model, version)
    work = Path(tempfile.mkdtemp(dir=target, prefix=f".stage-{model}-"))
    signer = None
    try:
        copied = work / str(version)
        copy_version(source, copied)
        if trusted is not None:  # first: the signature covers SHA256SUMS, so it says which file was changed after signing
            signer = verify_signature(copied, trusted, shown_as=source).key
        check_identity(copied, model, version, source, required=trusted is not None)
        try:
            problems = verify_checksums(copied)
        except VersionFilesError as error:
            raise as_named(error, copied, source) from None
        if problems:
            raise StageError(f"{source} does not match its SHA256SUMS after copying ({len(problems)} problem(s)):\n  "
                             + "\n  ".join(p.replace(str(copied), str(source)) for p in problems))
        check(copied, model, version, source)
        for name, where in placed.items():
            if (copied / name).is_file():
                (work / where).parent.mkdir(exist_ok=True)
                shutil.copyfile(copied / name, work / where)
        (work / STAGE_MARKER).write_text(json.dumps({"model": model, "version": version, "source": str(source)}) + "\n")
        os.chmod(work, 0o755)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return work, signer


def place(work: Path, target: Path, model: str) -> None:
    """Rename a prepared folder to target/model, replacing an earlier stage's."""
    destination = target / model
    if destination.exists():  # an earlier stage of this pod: swap it out, then remove it
        retired = target / f".retired-{model}-{os.getpid()}"
        os.rename(destination, retired)
        os.rename(work, destination)
        shutil.rmtree(retired)
    else:
        os.rename(work, destination)


def copy_version(source: Path, destination: Path) -> None:
    """The version's files, read through any symlink. A version is flat (export writes files only):
    a folder, or anything else that is not a file, is refused rather than copied or skipped."""
    destination.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if not path.is_file():
            raise StageError(f"{path}: not a file (a version holds files only: export never writes "
                             f"{'a folder' if path.is_dir() else 'this'})")
        shutil.copyfile(path, destination / path.name)


def check_identity(folder: Path, model: str, version: int, source: Path, required: bool) -> None:
    """The folder was published as this model and version (identity.json, covered by the signature):
    a signed folder moved to another name or version number in the store is refused."""
    try:
        identity = read_identity(folder)
    except VersionFilesError as error:
        raise as_named(error, folder, source) from None
    if identity is None:
        if required:
            raise StageError(f"{source / IDENTITY_FILE}: missing: the signature does not say which model and version "
                             "it was published as (publish it again with this release's export)")
        return
    if identity != (model, version):
        raise StageError(f"{source / IDENTITY_FILE}: published as {identity[0]} version {identity[1]}, not {model} "
                         f"version {version}: a signed version moved in the store")


def check_version(folder: Path, model: str, version: int, source: Path) -> None:
    """What checksums cannot say: the files belong to this model and version and fit together."""

    def named(path: Path) -> Path:
        return source / path.relative_to(folder)

    if not (folder / MODEL_FILE).is_file():
        raise StageError(f"{named(folder / MODEL_FILE)}: missing (not listed in SHA256SUMS either)")
    labels = (folder / VERSION_LABELS).read_text().splitlines() if (folder / VERSION_LABELS).is_file() else None
    for name in (VERSION_CONFIG, VERSION_CPU_CONFIG):
        config = own_config(folder, name, model, source)
        try:
            contract = contract_of(config)
        except ContractError as error:
            raise StageError(f"{source / name}: {error}") from None
        if labels is None or len(labels) != contract.num_classes:
            raise StageError(f"{named(folder / VERSION_LABELS)}: {len(labels or [])} labels for the config's "
                             f"{contract.num_classes} classes")
    try:
        golden, _ = GoldenAnswers.read(folder)
    except VersionFilesError as error:
        raise as_named(error, folder, source) from None
    if (golden.model, golden.version) != (model, version):
        raise StageError(f"{source / 'golden.json'}: answers for {golden.model} version {golden.version}, "
                         f"not {model} version {version}")


def own_config(folder: Path, name: str, model: str, source: Path):
    """The config file `name` of a copied version, which must be there, parse and name `model`
    (errors name the file in the store, `source`)."""
    if not (folder / name).is_file():
        raise StageError(f"{source / name}: missing (not listed in SHA256SUMS either)")
    try:
        config = read_config(folder / name)
    except RepositoryError as error:
        raise as_named(error, folder, source) from None
    if config.name != model:
        raise StageError(f"{source / name}: name: the config is for model {config.name!r}, not {model!r}")
    return config


def check_twin(folder: Path, model: str, version: int, source: Path) -> None:
    """An encoded twin's version: its config names it, and an ensemble's steps name this version."""
    config = own_config(folder, VERSION_CONFIG, model, source)
    if other := [step.model_version for step in config.ensemble_scheduling.step if step.model_version != version]:
        raise StageError(f"{source / VERSION_CONFIG}: its steps call version(s) {other}, not {version}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`python -m histoserve.serve stage`'s options (serve/__main__.py)."""
    parser.add_argument("--store", type=existing_folder, required=True, help="the model store (a repository written by export)")
    parser.add_argument("--model")
    parser.add_argument("--version", type=POSITIVE_INT)
    parser.add_argument("--published", type=existing_file, help="instead of --model and --version: export's --result-file")
    parser.add_argument("--target", type=Path, required=True, help="the serving repository to assemble")
    trust = parser.add_mutually_exclusive_group(required=True)
    trust.add_argument("--trusted-keys", type=existing_folder,
                       help="folder of PEM public keys (*.pub): the version must be signed by one of them")
    trust.add_argument("--allow-unsigned", action="store_true", help="skip the signature check (local experiments only)")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if bool(args.published) == bool(args.model and args.version) or (args.published and (args.model or args.version)):
        parser.error("give --model and --version, or --published (not both)")
    try:
        if args.published:
            published = read_published(args.published)
            args.model, args.version = published.name, published.version
        trusted = None if args.allow_unsigned else trusted_keys(args.trusted_keys)
        staged = stage(args.store, args.model, args.version, args.target, trusted)
    except (StageError, VersionFilesError, OSError) as error:  # SignatureError too
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    signed = f", signed by {staged.signed_by.name}" if staged.signed_by else " (signature not checked: --allow-unsigned)"
    print(f"staged {staged.model} version {staged.version} into {staged.folder}: {staged.files} files, every one "
          f"matching its SHA256SUMS{signed}" + (f"; and its encoded twins {', '.join(staged.twins)}" if staged.twins else ""),
          flush=True)
    return 0


def as_named(error: Exception, copy: Path, source: Path) -> StageError:
    """`error` about the working copy, as a StageError naming the store's files it was copied from."""
    return StageError(str(error).replace(str(copy), str(source)))
