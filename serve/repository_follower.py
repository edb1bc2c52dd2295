"""Poll mode's repository follower: a thread that keeps the CPU derivative (serve/cpu_repository.py)
in step with the repository `python -m histoserve.export` publishes into, as a pod's volume follows
the model store, and names each version Triton then fails to load, once.

It knows nothing of the Triton process: Triton's repository index comes from the `index` callable
(serve/server.py reads it over HTTP or gRPC with the admin key), so the follower runs, and is
tested, on its own.
"""

from __future__ import annotations

import sys
import threading
import urllib.error
from collections.abc import Callable
from pathlib import Path

from tritonclient.utils import InferenceServerException

from histoserve.formats.repository_layout import VersionState
from histoserve.serve.cpu_repository import sync_cpu_repository

# What reading the index may raise while Triton is busy, restarting or unreachable: no version is known to have failed.
INDEX_ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError, ValueError, InferenceServerException)


class RepositoryFollower:
    """`sync_cpu_repository(source, local)` every `poll_s` seconds on a daemon thread, from `start()`
    until `stop()`; `failed_versions` holds (model, version) → Triton's reason for each version that
    failed to load (Triton keeps serving the versions it had)."""

    def __init__(self, source: Path, local: Path, poll_s: float, index: Callable[[], list[dict]], server: str = ""):
        self.source, self.local, self.poll_s = Path(source), Path(local), poll_s
        self.index, self.server = index, server
        self.failed_versions: dict[tuple[str, str], str] = {}
        self.syncs = 0  # how often the local repository was brought up to date
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> RepositoryFollower:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="repository-follower", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _run(self) -> None:
        while not self._stopping.wait(self.poll_s):
            self.sync_once()

    def sync_once(self) -> None:
        """One poll: mirror the source, then report the versions that newly failed to load."""
        try:
            sync_cpu_repository(self.source, self.local)
        except Exception as error:  # a half-written or broken repository must not stop serving
            print(f"serve: cannot follow {self.source}: {error}", file=sys.stderr, flush=True)
        self.syncs += 1
        for (model, version), reason in self.unavailable_versions().items():
            if (model, version) not in self.failed_versions:
                self.failed_versions[(model, version)] = reason
                print(f"serve: error: model {model!r} version {version} failed to load and is not served: {reason}",
                      file=sys.stderr, flush=True)

    def unavailable_versions(self) -> dict[tuple[str, str], str]:
        """(model, version) → Triton's reason, for each version that failed to load (its repository
        index, read with the same rule as `python -m histoserve.client rollout-status`)."""
        return unavailable_versions(self.index, self.server)


def unavailable_versions(index: Callable[[], list[dict]], server: str = "") -> dict[tuple[str, str], str]:
    try:
        entries = index()
    except INDEX_ERRORS:
        return {}
    states = [VersionState.from_index_entry(server, entry) for entry in entries]
    return {(s.model, s.version): s.reason for s in states if s.state == "UNAVAILABLE"}
