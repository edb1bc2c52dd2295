"""Signed versions (formats/signing.py): a version folder signed with one key verifies against a
folder of trusted public keys, and every way of changing who published it or what it holds is
refused, naming the file and the reason. Real model-signing bundles over small folders."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from histoserve.formats.signing import SignatureError, check_signing_key, sign_version, trusted_keys, verify_signature
from histoserve.formats.version import CHECKSUMS_FILE, SIGNATURE_FILE, VersionFilesError, read_checksums, write_checksums
from tests.publisher_keys import make_key_pair, trusted_folder


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    return {name: make_key_pair(root, name) for name in ("old", "new", "stranger")}


def signed_version(folder: Path, key) -> Path:
    """A small version folder as export writes it: files, SHA256SUMS, then model.sig over all."""
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(bytes(range(256)) * 64)
    (folder / "labels.txt").write_text("benign\nmalignant\n")
    (folder / "MODEL_CARD.md").write_text("# Model card\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "extra.json").write_text("{}")
    write_checksums(folder)
    sign_version(folder, key.private)
    return folder


def rewrite_statement(folder: Path, change) -> None:
    bundle = json.loads((folder / SIGNATURE_FILE).read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    change(statement, bundle)
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    (folder / SIGNATURE_FILE).write_text(json.dumps(bundle))


def test_a_signed_version_verifies_with_its_key_and_covers_every_file_but_the_signature(keys, tmp_path):
    folder = signed_version(tmp_path / "1", keys["old"])
    verified = verify_signature(folder, [keys["old"].public])
    assert verified.key == keys["old"].public
    assert verified.files == 5  # model.onnx, labels.txt, MODEL_CARD.md, sub/extra.json and SHA256SUMS itself
    assert SIGNATURE_FILE not in read_checksums(folder)


def test_rotation_two_trusted_keys_accept_versions_signed_by_either(keys, tmp_path):
    trusted = trusted_keys(trusted_folder(tmp_path / "trusted", keys["old"], keys["new"]))
    for name in ("old", "new"):
        folder = signed_version(tmp_path / name, keys[name])
        assert verify_signature(folder, trusted).key.name == f"{name}.pub"
    with pytest.raises(SignatureError, match=r"signed by a key that is not trusted .*trusted: new\.pub"):
        verify_signature(tmp_path / "old", trusted_keys(trusted_folder(tmp_path / "after", keys["new"])))


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))


# Each: how the folder is changed after signing, and what the refusal must say (the file, the reason).
ALTERATIONS = {
    "unsigned": (lambda f, k: (f / SIGNATURE_FILE).unlink(), r"model\.sig: missing: the version is unsigned"),
    "a file altered, SHA256SUMS rewritten to match": (
        lambda f, k: (flip_byte(f / "model.onnx"), write_checksums(f)),
        r"SHA256SUMS: altered after signing.*model\.onnx: altered after signing"),
    "a file in a subfolder altered": (lambda f, k: (f / "sub" / "extra.json").write_text('{"x": 1}'),
                                      r"sub/extra\.json: altered after signing"),
    "a file added, SHA256SUMS rewritten": (lambda f, k: ((f / "backdoor.py").write_text("x"), write_checksums(f)),
                                           r"backdoor\.py: not signed \(added after signing\)"),
    "a file removed": (lambda f, k: (f / "labels.txt").unlink(), r"labels\.txt: missing"),
    "a .gitignore added (model-signing's default would skip it)": (lambda f, k: (f / ".gitignore").write_text("*"),
                                                                    r"\.gitignore: not signed"),
    "re-signed by another key": (lambda f, k: sign_version(f, k["stranger"].private), r"signed by a key that is not trusted"),
    "the statement's digest edited": (
        lambda f, k: rewrite_statement(f, lambda s, b: s["predicate"]["resources"][0].update(digest="0" * 64)),
        r"model\.sig: does not verify with the trusted key old\.pub"),
    "the key hint removed and another key's signature": (
        lambda f, k: (sign_version(f, k["stranger"].private),
                      rewrite_statement(f, lambda s, b: b["verificationMaterial"]["publicKey"].pop("hint"))),
        r"model\.sig: does not verify with the trusted key old\.pub"),
    "not a bundle": (lambda f, k: (f / SIGNATURE_FILE).write_text("garbage"), r"model\.sig: not a model-signing bundle"),
}


@pytest.mark.parametrize("alteration", list(ALTERATIONS))
def test_a_changed_version_is_refused_naming_the_file_and_the_reason(keys, tmp_path, alteration):
    change, message = ALTERATIONS[alteration]
    folder = signed_version(tmp_path / "1", keys["old"])
    change(folder, keys)
    shown = tmp_path / "store" / "digits" / "1"  # the stage names the store's folder, not its copy
    with pytest.raises(SignatureError, match=message) as refused:
        verify_signature(folder, [keys["old"].public], shown_as=shown)
    assert str(shown) in str(refused.value) and str(folder) not in str(refused.value)


def test_a_copied_version_still_verifies(keys, tmp_path):
    """The signature names files relative to the folder: the pod's copy under another path verifies."""
    folder = signed_version(tmp_path / "1", keys["old"])
    copy = shutil.copytree(folder, tmp_path / "pod" / ".stage-x" / "1")
    assert verify_signature(copy, [keys["old"].public]).files == 5


def test_keys_that_cannot_sign_or_verify_are_refused_by_name(keys, tmp_path):
    (tmp_path / "garbage.key").write_text("not a key")
    with pytest.raises(SignatureError, match=r"garbage\.key: not a usable signing key"):
        check_signing_key(tmp_path / "garbage.key")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    (tmp_path / "rsa.key").write_bytes(rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(SignatureError, match=r"rsa\.key: model signing takes EC keys"):
        check_signing_key(tmp_path / "rsa.key")
    with pytest.raises(SignatureError, match="P-256, P-384 or P-521"):
        check_signing_key(make_key_pair(tmp_path, "k1", ec.SECP256K1()).private)
    check_signing_key(keys["old"].private)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SignatureError, match=r"no trusted public key \(\*\.pub\)"):
        trusted_keys(tmp_path / "empty")
    folder = signed_version(tmp_path / "1", keys["old"])
    (tmp_path / "bad.pub").write_text("not pem")
    with pytest.raises(SignatureError, match=r"bad\.pub: not a PEM public key"):
        verify_signature(folder, [tmp_path / "bad.pub"])


def test_a_configmap_mount_is_read_through_its_symlinks_and_hidden_entries_are_skipped(keys, tmp_path):
    """A ConfigMap volume holds `..data/<key>` and a symlink `<key>` → `..data/<key>`."""
    mount = tmp_path / "trusted-keys"
    (mount / "..2026_12_02").mkdir(parents=True)
    (mount / "..2026_12_02" / "new.pub").write_bytes(keys["new"].public.read_bytes())
    (mount / "..data").symlink_to("..2026_12_02")
    (mount / "new.pub").symlink_to("..data/new.pub")
    assert [p.name for p in trusted_keys(mount)] == ["new.pub"]
    assert verify_signature(signed_version(tmp_path / "1", keys["new"]), trusted_keys(mount)).key.name == "new.pub"


def test_sha256sums_naming_a_file_twice_is_malformed(tmp_path):
    """`sha256sum -c` checks both lines and reports one FAILED; the last line must not silently win."""
    (tmp_path / "a.txt").write_text("a")
    write_checksums(tmp_path)
    line = (tmp_path / CHECKSUMS_FILE).read_text()
    (tmp_path / CHECKSUMS_FILE).write_text(f"{'0' * 64}  a.txt\n{line}")
    with pytest.raises(VersionFilesError, match=r"SHA256SUMS:2: a\.txt is listed twice"):
        read_checksums(tmp_path)


def test_a_version_signed_with_other_hashing_settings_is_refused(keys, tmp_path):
    """model-signing's own defaults leave .git* files out of the signature: a trusted key's signature
    made that way would let such files through, so only export's settings are accepted."""
    import model_signing

    folder = signed_version(tmp_path / "1", keys["old"])
    hashing = model_signing.hashing.Config().set_ignored_paths(paths=[SIGNATURE_FILE])  # git paths ignored: the default
    model_signing.signing.Config().set_hashing_config(hashing).use_elliptic_key_signer(
        private_key=keys["old"].private).sign(folder, folder / SIGNATURE_FILE)
    with pytest.raises(SignatureError, match="with other hashing settings than export's"):
        verify_signature(folder, [keys["old"].public])
