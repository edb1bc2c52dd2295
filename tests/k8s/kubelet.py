"""What the kubelet does with a pod spec, done here against real local processes: a gRPC probe
(`grpc: {port: N}`) and the expansion of `$(VAR)` in a container's arguments.

The gRPC probe calls the standard health service, grpc.health.v1.Health/Check, with an empty
service name, and passes only on SERVING. Its two messages are tiny, so they are encoded here by
hand (protobuf wire format) instead of pulling in grpcio-health-checking, whose releases for our
grpcio need protobuf 7.
"""

from __future__ import annotations

import re

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


def expand(words: list[str], container: dict, secrets: dict[tuple[str, str], str]) -> list[str]:
    """`$(VAR)` in the arguments replaced by the container's environment, as the kubelet does: `value`
    entries as written, `secretKeyRef` entries from `secrets[(name, key)]`. An unknown variable stays as
    written (the kubelet's rule); `$$` escapes a `$`."""
    values = {}
    for entry in container.get("env", []):
        if "value" in entry:
            values[entry["name"]] = entry["value"]
        elif reference := entry.get("valueFrom", {}).get("secretKeyRef"):
            values[entry["name"]] = secrets[(reference["name"], reference["key"])]

    def one(word: str) -> str:
        return re.sub(r"\$\$|\$\((\w+)\)", lambda m: "$" if m.group(0) == "$$" else values.get(m.group(1), m.group(0)), word)

    return [one(word) for word in words]
