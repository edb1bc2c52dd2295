"""Triton's admin APIs behind a key: which protocol groups are restricted, and how a caller proves it
may use them.

Triton restricts groups of its API with `--grpc-restricted-protocol=<groups>:<key>=<value>` (gRPC:
the caller sends the metadata `triton-grpc-protocol-<key>: <value>`) and
`--http-restricted-api=<groups>:<key>=<value>` (HTTP: the header `<key>: <value>`). We restrict
every group a classifying caller never needs: repository index and model load/unload, shared-memory
registration, statistics, trace and log settings. Health, metadata, inference and model config stay
open: the client reads its contract through model config, and kubelet probes call health.

Measured on Triton 2.51 (the same code on the r26.08 branch): a refused gRPC call ends with
UNAVAILABLE "This protocol is restricted, expecting header 'triton-grpc-protocol-admin-key'", a
refused HTTP call with 403 "This API is restricted, expecting header 'admin-key'" — the same answer
with no key and with a wrong one.

The key itself comes from a file (`--admin-key-file`; in Kubernetes a Secret mounted read-only) or
the environment variable HISTOSERVE_ADMIN_KEY, never from a command line a process list shows.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

RESTRICTED_GROUPS = ("shared-memory", "model-repository", "statistics", "trace", "logging")
KEY_NAME = "admin-key"
GRPC_HEADER = f"triton-grpc-protocol-{KEY_NAME}"
HTTP_HEADER = KEY_NAME
ENVIRONMENT_VARIABLE = "HISTOSERVE_ADMIN_KEY"
# Triton splits its flag at ':' and '=' and HTTP/gRPC carry the value in a header: keep it to
# characters that survive all three.
VALID_KEY = re.compile(r"^[A-Za-z0-9._~+/-]{16,256}$")


class AdminKeyError(ValueError):
    """No usable admin key; the message names the file or variable."""


@dataclass(frozen=True)
class AdminKey:
    value: str = field(repr=False)

    def __post_init__(self):
        if not VALID_KEY.match(self.value):
            raise AdminKeyError("an admin key is 16 to 256 characters of A-Z a-z 0-9 . _ ~ + / - "
                                f"(got {len(self.value)} characters{'' if self.value.isprintable() else ', some unprintable'})")

    @classmethod
    def generate(cls) -> AdminKey:
        return cls(secrets.token_urlsafe(32))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> AdminKey:
        try:
            text = Path(path).read_text().strip()
        except OSError as error:
            raise AdminKeyError(f"admin key file {path}: {error.strerror or error}") from error
        if not text:
            raise AdminKeyError(f"admin key file {path} is empty")
        try:
            return cls(text)
        except AdminKeyError as error:
            raise AdminKeyError(f"admin key file {path}: {error}") from None

    @classmethod
    def resolve(cls, path: str | os.PathLike | None = None) -> AdminKey | None:
        """The key from `path` when given, else from HISTOSERVE_ADMIN_KEY, else None."""
        if path:
            return cls.from_file(path)
        value = os.environ.get(ENVIRONMENT_VARIABLE, "").strip()
        if not value:
            return None
        try:
            return cls(value)
        except AdminKeyError as error:
            raise AdminKeyError(f"{ENVIRONMENT_VARIABLE}: {error}") from None

    def write(self, path: str | os.PathLike) -> Path:
        """Into a new file only its owner can read."""
        path = Path(path)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(self.value + "\n")
        return path

    def grpc_headers(self) -> dict[str, str]:
        """tritonclient.grpc's `headers=` (sent as gRPC metadata)."""
        return {GRPC_HEADER: self.value}

    def http_headers(self) -> dict[str, str]:
        return {HTTP_HEADER: self.value}

    def triton_flags(self, groups: tuple[str, ...] = RESTRICTED_GROUPS) -> list[str]:
        """tritonserver's arguments that put `groups` behind this key, over gRPC and HTTP."""
        restriction = f"{','.join(groups)}:{KEY_NAME}={self.value}"
        return [f"--grpc-restricted-protocol={restriction}", f"--http-restricted-api={restriction}"]


def headers(key: AdminKey | None) -> dict[str, str] | None:
    """gRPC metadata for an admin call, or None without a key (the call then fails as refused)."""
    return key.grpc_headers() if key is not None else None


def refused(message: str) -> bool:
    """Whether Triton's error message is its answer to a call without the right admin key."""
    return "is restricted, expecting header" in (message or "")


REFUSED_HINT = (f"the server restricts this API: pass its admin key with --admin-key-file (or set "
                f"{ENVIRONMENT_VARIABLE})")
