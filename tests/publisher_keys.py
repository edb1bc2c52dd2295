"""EC key pairs for signing versions in tests, as an operator makes them with
`openssl ecparam -name prime256v1 -genkey -noout -out publisher.key` and
`openssl ec -in publisher.key -pubout -out publisher.pub`."""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


@dataclass(frozen=True)
class KeyPair:
    private: Path  # PEM, unencrypted (the Secret histoserve-model-signing)
    public: Path   # PEM SubjectPublicKeyInfo, `<name>.pub` (an entry of the ConfigMap histoserve-model-trust)


def make_key_pair(folder: Path, name: str, curve: ec.EllipticCurve | None = None) -> KeyPair:
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(curve or ec.SECP256R1())
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return KeyPair(private, public)


def trusted_folder(folder: Path, *pairs: KeyPair) -> Path:
    """A folder holding only the public keys of `pairs`: what the ConfigMap mounts at /trusted-keys."""
    folder.mkdir(parents=True, exist_ok=True)
    for pair in pairs:
        (folder / pair.public.name).write_bytes(pair.public.read_bytes())
    return folder


@functools.cache
def session_publisher() -> tuple[KeyPair, Path]:
    """The session's publisher: the key pair every published test version is signed with, and a
    trusted-keys folder holding its public key."""
    root = Path(tempfile.mkdtemp(prefix="histoserve-publisher-"))
    pair = make_key_pair(root / "keys", "publisher")
    return pair, trusted_folder(root / "trusted", pair)
