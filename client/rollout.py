"""Has a model version reached every Triton server? Asked of each server's repository index.

Production pods serve one pinned version each (docs/kubernetes/rollouts.md, "Rollout and rollback"): a rollout is a
new ReplicaSet, and a server that answers is a Ready pod, old or new. Behind a Kubernetes headless
Service, `dns:///name:port` expands to one server per Ready pod, so the rollout of version N is done,
from the callers' side, when every server has N READY; until then the old pods report the versions
they serve (OTHER_VERSION), and a new pod that fails its checksums or golden answers never appears.
Triton in poll mode (`python -m histoserve.serve`, the dev overlay) loads a new version folder within its poll
interval and keeps serving the versions it had when the new one fails to load; there the check fails
as soon as every server has answered and one reports the version UNAVAILABLE, naming Triton's reason. The repository index is an admin API:
the calls carry the admin key (formats/admin.py), and a server that refuses it is reported as REFUSED.
Over TLS each pod is called by address with the Service's name as the certificate's expected name.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from histoserve.formats.admin import REFUSED_HINT, AdminKey, headers, refused
from histoserve.formats.options import ClientTls
from histoserve.formats.repository_layout import VersionState


def expand_servers(url: str) -> list[str]:
    """`dns:///host:port` → one `address:port` per address the name resolves to (every pod behind a
    headless Service); `a:p1,b:p2` → both; anything else → itself."""
    if url.startswith("dns:"):
        host, _, port = url.split("/")[-1].rpartition(":")
        addresses = sorted({info[4][0] for info in socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)})
        return [f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in addresses]
    return [part.strip() for part in url.split(",") if part.strip()]


@dataclass(frozen=True)
class Caller:
    """How to call each server: the admin key, and TLS with the name its certificate carries (the
    Service's DNS name when `dns:///` was expanded to pod addresses)."""

    admin_key: AdminKey | None = None
    tls: ClientTls | None = None
    server_name: str = ""

    def client(self, server: str) -> grpcclient.InferenceServerClient:
        if self.tls is None:
            return grpcclient.InferenceServerClient(server)
        options = [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else None
        return grpcclient.InferenceServerClient(server, channel_args=options, **self.tls.client_arguments())


def repository_states(server: str, caller: Caller = Caller(), timeout_s: float = 10.0) -> list[VersionState]:
    """Every model version one server knows, from its repository index (raises InferenceServerException)."""
    with caller.client(server) as client:
        index = client.get_model_repository_index(headers=headers(caller.admin_key), as_json=True,
                                                   client_timeout=timeout_s).get("models", [])
    return [VersionState.from_index_entry(server, entry) for entry in index]


def version_state(server: str, model: str, version: str, caller: Caller = Caller(), timeout_s: float = 10.0) -> VersionState:
    try:
        states = repository_states(server, caller, timeout_s)
    except InferenceServerException as error:
        message = error.message() or str(error)
        if refused(message):
            return VersionState(server, "REFUSED", f"{REFUSED_HINT} ({message})", model, version)
        return VersionState(server, "UNREACHABLE", message, model, version)
    found = next((s for s in states if (s.model, s.version) == (model, version)), None)
    if found is not None:
        return found
    serving = sorted((s.version for s in states if s.model == model and s.state == "READY"), key=lambda v: int(v) if v.isdigit() else 0)
    if serving:
        return VersionState(server, "OTHER_VERSION", f"serves version {', '.join(serving)}", model, version)
    return VersionState(server, "UNKNOWN", "", model, version)


def wait_for_version(url: str, model: str, version: str, timeout_s: float, poll_s: float = 2.0,
                     admin_key: AdminKey | None = None, tls: ClientTls | None = None) -> list[VersionState]:
    """Poll until every server has the version READY, or every server has settled with at least one
    failure, or the timeout passes; returns the last states. A failure sticks until the version turns
    READY: Triton in poll mode retries a broken version on every poll (LOADING, then UNAVAILABLE)."""
    deadline = time.monotonic() + timeout_s
    failed: dict[str, VersionState] = {}
    caller = Caller(admin_key, tls, url.split("/")[-1].rpartition(":")[0] if url.startswith("dns:") else "")
    while True:
        states = []
        for server in expand_servers(url):
            state = version_state(server, model, version, caller)
            if state.state == "UNAVAILABLE":
                failed[server] = state
            elif state.state == "READY":
                failed.pop(server, None)
            states.append(failed.get(server, state))
        settled = all(s.state in ("READY", "UNAVAILABLE", "UNLOADED", "REFUSED") for s in states)
        if states and (settled or time.monotonic() >= deadline):
            return states
        time.sleep(poll_s)
