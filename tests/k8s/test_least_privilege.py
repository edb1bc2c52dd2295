"""Least privilege for the store's writers and its downloads: who runs the publish Jobs, what their
cloud identities may do to the bucket (the IAM policy examples evaluated as IAM evaluates them), where
the signing key goes, and which pods may resolve names at all."""

from __future__ import annotations

import copy
import json
import re
from fnmatch import fnmatchcase

import pytest

from tests.k8s.manifests import K8S, OVERLAYS, containers, render_cached
from tests.k8s.network import Pod, allowed, pods_of
from tests.k8s.test_network_policies import KUBE_DNS, objects

IAM = K8S / "iam"
PUBLISH_JOBS = {"jobs/publish": "triton-publish", "jobs/publish-s3": "triton-publish-s3"}


def job(kustomization: str) -> dict:
    return next(o for o in render_cached(kustomization) if o["kind"] == "Job")


def by_name(template: dict) -> dict[str, dict]:
    return {c["name"]: c for c in containers(template)}


# --- the publish Jobs' identity ------------------------------------------------------------------

@pytest.mark.parametrize("kustomization, account", PUBLISH_JOBS.items())
def test_each_publish_job_runs_as_its_own_service_account_without_an_api_token(kustomization, account):
    objects = render_cached(kustomization)
    spec = job(kustomization)["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == account  # not the namespace's `default`, which anything may use
    [service_account] = [o for o in objects if o["kind"] == "ServiceAccount"]
    assert service_account["metadata"]["name"] == account
    assert service_account["automountServiceAccountToken"] is False and spec["automountServiceAccountToken"] is False


def test_no_serving_pod_runs_as_a_publish_service_account():
    for overlay in OVERLAYS:
        for o in render_cached(overlay):
            if o["kind"] in ("Deployment", "Rollout", "Job") and "template" in o["spec"]:
                assert o["spec"]["template"]["spec"].get("serviceAccountName") not in PUBLISH_JOBS.values(), overlay


# --- IAM: the policies as IAM evaluates them -----------------------------------------------------

def iam_allows(policy: dict, action: str, resource: str, context: dict | None = None) -> bool:
    """Would this identity policy allow the request? (Allow statements only, as these are; Action and
    Resource with IAM's * and ? wildcards; StringLike/StringEquals conditions, any listed value.)"""
    context = context or {}
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow", "the evaluator knows Allow statements only"
        actions = [statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"]
        resources = [statement["Resource"]] if isinstance(statement["Resource"], str) else statement["Resource"]
        if not any(fnmatchcase(action.lower(), a.lower()) for a in actions):
            continue
        if not any(fnmatchcase(resource, r) for r in resources):
            continue
        conditions_hold = True
        for operator, keys in statement.get("Condition", {}).items():
            for key, wanted in keys.items():
                wanted = [wanted] if isinstance(wanted, str) else wanted
                value = context.get(key)
                match = fnmatchcase if operator == "StringLike" else str.__eq__
                if value is None or not any(match(value, w) for w in wanted):
                    conditions_hold = False
        if conditions_hold:
            return True
    return False


def iam(name: str) -> dict:
    return json.loads((IAM / name).read_text())


def env(container: dict) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def s3_prefix(url: str) -> tuple[str, str]:
    bucket, _, prefix = re.fullmatch(r"s3://(.+)", url).group(1).partition("/")
    return bucket, prefix.rstrip("/")


def store_prefixes() -> tuple[tuple[str, str], tuple[str, str]]:
    """(bucket, prefix) the pods download from and the publish Job writes to, as the manifests say."""
    deployment = next(o for o in render_cached("overlays/gpu-s3") if o["kind"] == "Deployment" and o["metadata"]["name"] == "triton")
    download = by_name(deployment["spec"]["template"])["model-download"]
    upload = by_name(job("jobs/publish-s3")["spec"]["template"])["upload"]
    return s3_prefix(env(download)["MODEL_SOURCE"]), s3_prefix(env(upload)["MODEL_STORE"])


def test_the_pods_read_and_the_job_writes_the_same_prefix_the_policies_name():
    (bucket, prefix), written = store_prefixes()
    assert written == (bucket, prefix)
    for name in ("model-store-read.json", "model-store-publish.json"):
        policy = iam(name)
        assert iam_allows(policy, "s3:GetObject", f"arn:aws:s3:::{bucket}/{prefix}/digits/3/model.onnx"), name
        assert iam_allows(policy, "s3:ListBucket", f"arn:aws:s3:::{bucket}", {"s3:prefix": f"{prefix}/digits/"}), name


REQUESTS = [  # (action, resource, context) against bucket histoserve-models, prefix model_repository
    ("s3:GetObject", "arn:aws:s3:::histoserve-models/model_repository/digits/3/model.onnx", {}),
    ("s3:ListBucket", "arn:aws:s3:::histoserve-models", {"s3:prefix": "model_repository/digits/"}),
    ("s3:PutObject", "arn:aws:s3:::histoserve-models/model_repository/digits/4/model.onnx", {}),
    ("s3:DeleteObject", "arn:aws:s3:::histoserve-models/model_repository/digits/3/model.onnx", {}),
    ("s3:PutObject", "arn:aws:s3:::histoserve-models/elsewhere/x", {}),
    ("s3:GetObject", "arn:aws:s3:::histoserve-models/training-data/slide.tif", {}),
    ("s3:ListBucket", "arn:aws:s3:::histoserve-models", {"s3:prefix": "training-data/"}),
    ("s3:ListBucket", "arn:aws:s3:::histoserve-models", {}),      # the whole bucket
    ("s3:PutObject", "arn:aws:s3:::another-bucket/x", {}),
    ("s3:PutBucketPolicy", "arn:aws:s3:::histoserve-models", {}),
    ("s3:PutObjectAcl", "arn:aws:s3:::histoserve-models/model_repository/digits/3/model.onnx", {}),
]


@pytest.mark.parametrize("policy, expected", [
    # the downloads: read the prefix, nothing else
    ("model-store-read.json", [True, True, False, False, False, False, False, False, False, False, False]),
    # the publish Job: also write under the prefix; never delete, never outside it
    ("model-store-publish.json", [True, True, True, False, False, False, False, False, False, False, False]),
])
def test_what_each_identity_may_do_to_the_bucket(policy, expected):
    assert [iam_allows(iam(policy), *request) for request in REQUESTS] == expected


def test_the_iam_evaluator_notices_a_broadened_policy():
    broad = iam("model-store-read.json")
    broad["Statement"][0]["Action"] = "s3:*"
    assert iam_allows(broad, "s3:PutObject", REQUESTS[2][1])
    unconditional = iam("model-store-publish.json")
    del unconditional["Statement"][1]["Condition"]
    assert iam_allows(unconditional, "s3:ListBucket", "arn:aws:s3:::histoserve-models", {"s3:prefix": "training-data/"})


def test_the_vpc_endpoint_admits_the_model_bucket_for_this_account_only():
    policy = iam("vpc-endpoint-policy.json")
    ours = {"aws:PrincipalAccount": "111122223333"}
    assert iam_allows(policy, "s3:GetObject", "arn:aws:s3:::histoserve-models/model_repository/digits/3/model.onnx", ours)
    assert iam_allows(policy, "s3:PutObject", "arn:aws:s3:::histoserve-models/model_repository/digits/4/model.onnx", ours)
    # exfiltration through the endpoint: another bucket, or our bucket with someone else's keys
    assert not iam_allows(policy, "s3:PutObject", "arn:aws:s3:::attacker-bucket/loot", ours)
    assert not iam_allows(policy, "s3:PutObject", "arn:aws:s3:::histoserve-models/model_repository/x",
                          {"aws:PrincipalAccount": "444455556666"})


# --- the signing key and the trusted keys --------------------------------------------------------

SIGNING_SECRET, TRUST_CONFIG_MAP = "histoserve-model-signing", "histoserve-model-trust"


def volume_named(template: dict, source: str, name: str) -> str | None:
    return next((v["name"] for v in template["spec"]["volumes"]
                 if (v.get(source) or {}).get("secretName" if source == "secret" else "name") == name), None)


def path_argument(container: dict, flag: str) -> str | None:
    script = " ".join(container.get("command", []) + container.get("args", []))
    found = re.search(rf'{flag}[ =]"?([^"\s]+)', script)
    if not found:
        return None
    return re.sub(r"\$(\w+)", lambda m: env(container).get(m.group(1)) or m.group(0), found.group(1))


def mount_holding(container: dict, path: str) -> dict | None:
    return next((m for m in container.get("volumeMounts", [])
                 if path == m["mountPath"] or path.startswith(m["mountPath"] + "/")), None)


def signing_key_holders(template: dict) -> list[str]:
    volume = volume_named(template, "secret", SIGNING_SECRET)
    return [c["name"] for c in containers(template) if any(m["name"] == volume for m in c.get("volumeMounts", []))]


@pytest.mark.parametrize("kustomization", PUBLISH_JOBS)
def test_only_export_holds_the_signing_key_and_verify_checks_against_the_trusted_keys(kustomization):
    template = job(kustomization)["spec"]["template"]
    named = by_name(template)
    secret_volume = volume_named(template, "secret", SIGNING_SECRET)
    trust_volume = volume_named(template, "configMap", TRUST_CONFIG_MAP)
    assert secret_volume and trust_volume
    assert signing_key_holders(template) == ["export"]  # not verify, not the S3 containers holding bucket credentials
    key = path_argument(named["export"], "--signing-key")
    mount = mount_holding(named["export"], key or "")
    assert mount and mount["name"] == secret_volume and mount["readOnly"], key
    keys = path_argument(named["verify"], "--trusted-keys")
    mount = mount_holding(named["verify"], keys or "")
    assert mount and mount["name"] == trust_volume and mount["readOnly"], keys
    secret = next(v for v in template["spec"]["volumes"] if v["name"] == secret_volume)["secret"]
    assert secret.get("optional") is not True and secret["defaultMode"] == 0o400


def test_on_eks_the_store_writer_s_role_skips_the_containers_that_hold_the_signing_key_or_verify():
    """The IRSA webhook gives the role's token to every container the annotation does not name: the
    key holder (export) and the verifier get no writer credentials; the S3 containers do."""
    template = job("jobs/publish-s3")["spec"]["template"]
    skipped = set(template["metadata"]["annotations"]["eks.amazonaws.com/skip-containers"].split(","))
    assert skipped == set(signing_key_holders(template)) | {"verify"}
    assert {c["name"] for c in containers(template)} - skipped == {"store-state", "upload", "download"}


def test_the_holder_check_notices_the_key_given_to_an_s3_container():
    template = copy.deepcopy(job("jobs/publish-s3")["spec"]["template"])
    by_name(template)["upload"]["volumeMounts"].append(
        {"name": volume_named(template, "secret", SIGNING_SECRET), "mountPath": "/var/run/secrets/model-signing", "readOnly": True})
    assert signing_key_holders(template) == ["export", "upload"]


# --- DNS only where a pod resolves a name --------------------------------------------------------

# Every pod our manifests run, and whether it resolves names: Triton only to reach the trace collector
# or the S3 endpoints (not in dev, which has neither), the publish Job on a claim never, the drift
# monitor never (it calls nobody). A new pod must be added here, deciding.
RESOLVES_NAMES = {
    "triton": lambda overlay: overlay != "overlays/dev",
    "triton-publish": lambda overlay: False,
    "triton-publish-s3": lambda overlay: True,    # the S3 and STS endpoints, by name
    "histoserve-monitor": lambda overlay: False,
    "otel-collector": lambda overlay: True,       # the trace backend, by name
    "locust": lambda overlay: True,               # the master and the gRPC Service, by name
    "histoserve-train": lambda overlay: True,     # the rendezvous (other pods than 0)
    "histoserve-slides": lambda overlay: True,    # the gRPC Service, by name
}


def dns_problems(cluster: list[dict], overlay: str) -> list[str]:
    problems = []
    for name, pod in pods_of(cluster).items():
        if name not in RESOLVES_NAMES:
            problems.append(f"{name}: not in RESOLVES_NAMES: decide whether it needs DNS")
            continue
        for protocol in ("UDP", "TCP"):
            if allowed(cluster, pod, KUBE_DNS, 53, protocol) != RESOLVES_NAMES[name](overlay):
                problems.append(f"{name}: DNS over {protocol} {'allowed' if not RESOLVES_NAMES[name](overlay) else 'denied'}")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_pods_that_resolve_names_reach_dns(overlay):
    assert dns_problems(objects(overlay), overlay) == []


def test_the_dns_check_notices_dns_given_back_to_a_pod_that_needs_none():
    cluster = objects("overlays/dev")
    policy = next(o for o in cluster if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "triton-publish")
    policy["spec"]["egress"] = [{"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}]}]
    assert dns_problems(cluster, "overlays/dev")
    other = Pod("resolver", "histoserve", {"app.kubernetes.io/name": "triton-publish", "app.kubernetes.io/part-of": "histoserve"})
    assert allowed(cluster, other, KUBE_DNS, 53, "UDP")
