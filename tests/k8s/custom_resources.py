"""Custom resources validated against their published CRD schemas (vendored in crds/, see its README).

The API server prunes unknown fields of a custom resource unless field validation is strict
(`kubectl apply --validate=strict`, the default since 1.27 for kubectl); here every object schema that
lists its properties also rejects others, so a misspelt field fails as it would there.
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path

import jsonschema
import yaml

CRDS = Path(__file__).parent / "crds"


@cache
def schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) → the strict JSON schema of that version's openAPIV3Schema."""
    found = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served", True):
                schema = strict(version["schema"]["openAPIV3Schema"])
                # every object has these, whether or not its CRD lists them (policy-controller's does not)
                for field, kind_of in (("apiVersion", "string"), ("kind", "string"), ("metadata", "object")):
                    schema.setdefault("properties", {}).setdefault(field, {"type": kind_of})
                found[(f"{group}/{version['name']}", kind)] = schema
    return found


def strict(schema: dict) -> dict:
    schema = copy.deepcopy(schema)

    def visit(node):
        if isinstance(node, dict):
            if (node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema)
    return schema


CUSTOM_GROUPS = ("monitoring.coreos.com/", "gateway.networking.k8s.io/", "gateway.envoyproxy.io/", "argoproj.io/",
                 "cert-manager.io/", "policy.sigstore.dev/")


def is_custom(obj: dict) -> bool:
    return obj["apiVersion"].startswith(CUSTOM_GROUPS)


def validate(obj: dict) -> None:
    """Raise jsonschema.ValidationError (or KeyError for a kind with no vendored schema)."""
    key = (obj["apiVersion"], obj["kind"])
    if key not in schemas():
        raise KeyError(f"no vendored CRD schema for {obj['kind']} {obj['apiVersion']}: add it to {CRDS}")
    # No meta-check of the schema: it holds Go regular expressions such as `^(?i)(abort|warn)?$` that
    # Python's re rejects; such a pattern only matters for a field we set (then validation raises).
    error = jsonschema.exceptions.best_match(jsonschema.Draft7Validator(schemas()[key]).iter_errors(obj))
    if error is not None:
        raise error
