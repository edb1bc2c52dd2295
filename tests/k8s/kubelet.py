"""What the kubelet does with a pod spec, done here against real local processes: a gRPC probe
(`grpc: {port: N}`) and the expansion of `$(VAR)` in a container's arguments.

The gRPC probe calls the standard health service, grpc.health.v1.Health/Check, with an empty
service name, and passes only on SERVING. Its two messages are tiny, so they are encoded here by
hand (protobuf wire format) instead of pulling in grpcio-health-checking, whose releases for our
grpcio need protobuf 7.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import grpc

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
SERVING_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def _request(service: str) -> bytes:
    data = service.encode()
    if not data:
        return b""
    assert len(data) < 128  # one-byte length: enough for a service name
    return b"\x0a" + bytes([len(data)]) + data  # field 1, wire type 2 (length-delimited)


def _status(response: bytes) -> str:
    if not response:
        return SERVING_STATUS[0]  # proto3 leaves the default (UNKNOWN) out
    assert response[0] == 0x08, response  # field 1, wire type 0 (varint); the enum values fit one byte
    return SERVING_STATUS.get(response[1], f"status {response[1]}")


def grpc_probe(address: str, timeout_s: float = 1.0, service: str = "") -> str:
    """The probe's verdict: SERVING, NOT_SERVING, UNKNOWN, or the gRPC error that failed it."""
    with grpc.insecure_channel(address) as channel:
        check = channel.unary_unary(HEALTH_CHECK, request_serializer=_request, response_deserializer=_status)
        try:
            return check(service, timeout=timeout_s)
        except grpc.RpcError as error:
            return f"error {error.code().name}"


def expand(words: list[str], container: dict, secrets: dict[tuple[str, str], str], annotations: dict[str, str] | None = None,
           name: str | None = None, namespace: str | None = None) -> list[str]:
    """`$(VAR)` in the arguments replaced by the container's environment, as the kubelet does: `value`
    entries as written, `secretKeyRef` entries from `secrets[(name, key)]`, downward-API `fieldRef`s
    to `metadata.annotations['k']` from the pod's `annotations`, to `metadata.name` and
    `metadata.namespace` from the pod's `name` and `namespace`. An unknown variable stays as written
    (the kubelet's rule); `$$` escapes a `$`."""
    values = {}
    pod_fields = {"metadata.name": name, "metadata.namespace": namespace}
    for entry in container.get("env", []):
        source = entry.get("valueFrom", {})
        path = source.get("fieldRef", {}).get("fieldPath", "")
        if "value" in entry:
            values[entry["name"]] = entry["value"]
        elif reference := source.get("secretKeyRef"):
            values[entry["name"]] = secrets[(reference["name"], reference["key"])]
        elif field := ANNOTATION_FIELD.fullmatch(path):
            values[entry["name"]] = (annotations or {})[field.group(1)]
        elif path in pod_fields:
            if pod_fields[path] is None:
                raise KeyError(f"{entry['name']} reads the pod's {path}: give the pod a {path.split('.')[1]}")
            values[entry["name"]] = pod_fields[path]

    def one(word: str) -> str:
        return re.sub(r"\$\$|\$\((\w+)\)", lambda m: "$" if m.group(0) == "$$" else values.get(m.group(1), m.group(0)), word)

    return [one(word) for word in words]


ANNOTATION_FIELD = re.compile(r"metadata\.annotations\['([^']+)'\]")


def local_command(container: dict, template: dict, mounts: dict[str, Path], secrets: dict | None = None) -> list[str]:
    """The container's command line, expanded as the kubelet does, with each volume's mount path
    (a word, or the value of `--option=path`) replaced by the local folder `mounts[volume name]` stands
    in for, and `python` by this interpreter."""
    words = expand(container.get("command", []) + container.get("args", []), container, secrets or {},
                   template["metadata"].get("annotations", {}))
    words = localize(words, container, mounts)
    return [sys.executable, *words[1:]] if words[:1] == ["python"] else words


def localize(words: list[str], container: dict, mounts: dict[str, Path]) -> list[str]:
    """`words` with the container's mount paths replaced by the local folders of `mounts[volume name]`."""
    paths = {m["mountPath"]: Path(mounts[m["name"]]) for m in container.get("volumeMounts", []) if m["name"] in mounts}

    def local(word: str) -> str:
        option, equals, value = word.partition("=") if word.startswith("--") else ("", "", word)
        for mount_path, folder in paths.items():
            if value == mount_path or value.startswith(mount_path + "/"):
                return option + equals + str(folder) + value[len(mount_path):]
        return word

    return [local(word) for word in words]


def http_probe(url: str, timeout_s: float = 1.0) -> str:
    """An httpGet probe's verdict: `success` for a status from 200 to 399, else the status or error."""
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout_s) as response:
            return "success" if 200 <= response.status < 400 else f"status {response.status}"
    except urllib.error.HTTPError as error:
        return f"status {error.code}"
    except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
        return f"error {error}"
