"""Who published a version: OpenSSF model signing (PyPI `model-signing`) over a version folder.

`python -m histoserve.export --signing-key KEY` signs each version folder it writes, after SHA256SUMS: every
file of the folder but the signature itself (model.onnx, the configs, the labels, the golden answers,
the drift baseline, SHA256SUMS, the provenance statement and the model card) is listed with its
sha256 in an in-toto statement, and that statement is signed with an elliptic-curve key (P-256,
P-384 or P-521, PEM) into a Sigstore bundle, `model.sig`, beside them. `python -m histoserve.serve stage
--trusted-keys DIR` checks the bundle against the public keys (`*.pub`, PEM) in DIR before anything
is placed for Triton. Refused, each naming the file and the reason:

- unsigned: no `model.sig`;
- signed, but by a key that is not in DIR (the bundle names its key by the sha256 of its PEM);
- signed by a trusted key, but the bundle does not verify (altered signature or statement);
- signed by a trusted key, but the folder differs from what was signed: a file altered, missing or
  added after signing, even with SHA256SUMS rewritten to match (SHA256SUMS is one of the signed files).

Several trusted keys at once are the rotation: publish with the new key while the pods trust both,
then drop the old one once no served version needs it. Sigstore keyless signing (a short-lived
certificate for the CI job's OIDC identity) is the same bundle format; see docs/kubernetes/security.md, "Signed versions".
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from histoserve.formats.version import SIGNATURE_FILE, VersionFilesError, files_of, sha256_of

PUBLIC_KEY_SUFFIX = ".pub"


class SignatureError(VersionFilesError):
    """A version whose signature is missing, untrusted or does not match; the message names the file."""


@dataclass(frozen=True)
class VerifiedSignature:
    key: Path          # the trusted public key that verified it
    files: int         # files the signature covers


def key_fingerprint(public_pem: bytes) -> str:
    """How a model-signing bundle names its key: sha256 of the PEM SubjectPublicKeyInfo."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_public_key(public_pem)
    return hashlib.sha256(key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()


def _hashing_config():
    import model_signing

    # SIGNED_AS: only the signature itself is left out, no git-file exemptions, so no file of a version is unsigned.
    return model_signing.hashing.Config().set_ignored_paths(paths=SIGNED_AS["ignore_paths"], ignore_git_paths=False)


def check_signing_key(private_key: Path) -> None:
    """Refuse a key model-signing cannot sign with, before any work is done with it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_private_key(Path(private_key).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise SignatureError(f"{private_key}: not a usable signing key (an unencrypted EC private key in PEM): {error}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise SignatureError(f"{private_key}: model signing takes EC keys on P-256, P-384 or P-521, not {type(key).__name__}")


def sign_version(folder: Path, private_key: Path) -> Path:
    """Write folder/model.sig over every other file of `folder` with the PEM private key."""
    import model_signing

    folder, private_key = Path(folder), Path(private_key)
    try:
        config = model_signing.signing.Config().set_hashing_config(_hashing_config()).use_elliptic_key_signer(private_key=private_key)
    except (OSError, ValueError, TypeError) as error:
        raise SignatureError(f"{private_key}: not a usable signing key (an EC P-256/384/521 private key in PEM): {error}") from None
    config.sign(folder, folder / SIGNATURE_FILE)
    return folder / SIGNATURE_FILE


def trusted_keys(folder: Path) -> list[Path]:
    """The `*.pub` files of `folder` (a mounted ConfigMap: its hidden `..data` entries are skipped)."""
    folder = Path(folder)
    keys = sorted(p for p in folder.iterdir() if p.name.endswith(PUBLIC_KEY_SUFFIX) and not p.name.startswith(".") and p.is_file())
    if not keys:
        raise SignatureError(f"{folder}: no trusted public key (*{PUBLIC_KEY_SUFFIX}) in it")
    return keys


# How export signs, and the only way a version may be signed: every file hashed whole with sha256, no
# symlinks, nothing left out but the signature (model-signing's own defaults would leave out .git* files).
SIGNED_AS = {"method": "files", "hash_type": "sha256", "allow_symlinks": False, "ignore_paths": [SIGNATURE_FILE]}


def signed_statement(signature: Path) -> dict:
    bundle = json.loads(Path(signature).read_text())
    return json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))


def signed_files(signature: Path) -> dict[str, str]:
    """{relative path: sha256} as the bundle's statement lists them (not verified: for messages)."""
    return {r["name"]: r["digest"] for r in signed_statement(signature)["predicate"]["resources"]}


def _bundle_key_hint(signature: Path) -> str:
    try:
        return json.loads(Path(signature).read_text())["verificationMaterial"]["publicKey"]["hint"]
    except (KeyError, TypeError, ValueError, OSError):
        return ""


def verify_signature(folder: Path, keys: list[Path], shown_as: Path | None = None) -> VerifiedSignature:
    """Check folder/model.sig against the trusted `keys`; raise SignatureError naming the file and the
    reason. `shown_as`: the folder to name in messages (the store's, when `folder` is a copy)."""
    import model_signing

    folder = Path(folder)
    shown = Path(shown_as or folder)
    signature = folder / SIGNATURE_FILE
    if not signature.is_file():
        raise SignatureError(f"{shown / SIGNATURE_FILE}: missing: the version is unsigned, and this stage trusts only "
                             f"versions signed by one of {', '.join(k.name for k in keys)}")
    try:
        listed = signed_files(signature)
    except (KeyError, TypeError, ValueError, OSError) as error:
        raise SignatureError(f"{shown / SIGNATURE_FILE}: not a model-signing bundle ({type(error).__name__}: {error})") from None
    hint, failures = _bundle_key_hint(signature), []
    for key in keys:
        try:
            fingerprint = key_fingerprint(key.read_bytes())
        except (OSError, ValueError) as error:
            raise SignatureError(f"{key}: not a PEM public key ({error})") from None
        if hint and hint != fingerprint:
            continue  # not this key's signature
        try:
            model_signing.verifying.Config().use_elliptic_key_verifier(public_key=key).set_hashing_config(
                _hashing_config()).verify(folder, signature)
        except Exception as error:  # noqa: BLE001 - cryptography's InvalidSignature is no ValueError
            failures.append((key, error))
            continue
        serialization = signed_statement(signature)["predicate"].get("serialization", {})
        if {k: serialization.get(k) for k in SIGNED_AS} != SIGNED_AS:  # verified: the signer chose these
            raise SignatureError(f"{shown / SIGNATURE_FILE}: signed by {key.name} with other hashing settings than "
                                 f"export's ({serialization}): files it leaves out would go unchecked; re-sign with export")
        return VerifiedSignature(key, len(listed))
    if not failures:
        raise SignatureError(f"{shown / SIGNATURE_FILE}: signed by a key that is not trusted (its key's sha256 {hint[:16]}…; "
                             f"trusted: {', '.join(k.name for k in keys)})")
    mismatched = [(key, e) for key, e in failures if str(e).startswith("Signature mismatch")]
    if not mismatched:
        key, error = failures[0]
        tried = ", ".join(k.name for k, _ in failures)
        raise SignatureError(f"{shown / SIGNATURE_FILE}: does not verify with the trusted key{'s' if len(failures) > 1 else ''} "
                             f"{tried} (the signature or its statement was altered, or another key signed it): "
                             f"{type(error).__name__} {error}".rstrip())
    raise SignatureError(f"{shown}: differs from what {mismatched[0][0].name} signed: " + "; ".join(differences(folder, listed, shown)))


def differences(folder: Path, listed: dict[str, str], shown: Path) -> list[str]:
    """Each file of `folder` that is not as the signature lists it, named in `shown`."""
    present = set(files_of(folder, include_checksums=True))
    found = [f"{shown / name}: missing" for name in sorted(set(listed) - present)]
    found += [f"{shown / name}: altered after signing" for name in sorted(set(listed) & present)
              if sha256_of(folder / name) != listed[name]]
    found += [f"{shown / name}: not signed (added after signing)" for name in sorted(present - set(listed))]
    return found or [f"{shown}: the signed and present files differ"]
