"""What cert-manager puts into a TLS pod's Secret volumes, made here with `cryptography` (nothing
downloaded or reused): each Secret a folder holding tls.crt, tls.key and ca.crt, as the kubelet mounts
a kubernetes.io/tls Secret that cert-manager's CA issuer filled."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from histoserve.formats.options import ClientTls
from tests.client.certificates import CertificateAuthority


@dataclass
class SecretFiles:
    """One mounted Secret: `folder` is what the kubelet mounts (the pod's mountPath stands for it)."""

    folder: Path

    @property
    def client_tls(self) -> ClientTls:
        return ClientTls(str(self.folder / "ca.crt"), str(self.folder / "tls.key"), str(self.folder / "tls.crt"))


@dataclass
class PodCertificates:
    """One CA (the Issuer histoserve-ca) and the Secrets a pod mounts, by Secret name."""

    folder: Path
    authority: CertificateAuthority = field(init=False)
    secrets: dict[str, SecretFiles] = field(default_factory=dict, init=False)

    def __post_init__(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        self.authority = CertificateAuthority(self.folder, "histoserve-ca")

    def issue(self, secret: str, server: bool, authority: CertificateAuthority | None = None) -> SecretFiles:
        """The Secret `secret`, issued by this CA (or another `authority`), as the kubelet lays it out:
        the files are links into a ..data folder that an update swaps atomically."""
        authority = authority or self.authority
        key, certificate = authority.issue(f"{secret}-{len(self.secrets)}", server=server)
        folder = self.folder / secret
        version = self.folder / f"{secret}.{os.urandom(3).hex()}"
        version.mkdir()
        shutil.copy(key, version / "tls.key")
        shutil.copy(certificate, version / "tls.crt")
        shutil.copy(self.authority.certificate_file, version / "ca.crt")  # the CA of *this* pod's issuer
        folder.mkdir(exist_ok=True)
        swap = folder / "..data_tmp"
        swap.symlink_to(version.resolve())
        swap.replace(folder / "..data")
        for name in ("tls.crt", "tls.key", "ca.crt"):
            if not (folder / name).is_symlink():
                (folder / name).symlink_to(Path("..data") / name)
        self.secrets[secret] = SecretFiles(folder)
        return self.secrets[secret]
