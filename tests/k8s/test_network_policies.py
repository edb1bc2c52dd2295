"""Who can reach which port, with every rendered NetworkPolicy evaluated as the cluster enforces it
(tests/k8s/network.py): each overlay deployed beside the load-test, training and publish jobs, and
pods of our own making, labelled and not, in other namespaces."""

import copy
from functools import cache

import pytest

from tests.k8s.manifests import JOBS, OVERLAYS, render
from tests.k8s.network import Pod, allowed, pods_of

PROMETHEUS = Pod("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"})
GRAFANA = Pod("grafana", "monitoring", {"app.kubernetes.io/name": "grafana"})
FAKE_PROMETHEUS = Pod("prometheus-elsewhere", "payments", {"app.kubernetes.io/name": "prometheus"})
CLIENT = Pod("payments-api", "payments", {"app": "payments-api", "histoserve.io/triton-client": "true"})
CLIENT_WRONG_VALUE = Pod("payments-worker", "payments", {"histoserve.io/triton-client": "yes"})
STRANGER = Pod("stranger", "payments", {"app": "stranger"})
NEIGHBOUR = Pod("neighbour", "histoserve", {"app": "neighbour"})
GATEWAY_PROXY = Pod("envoy", "envoy-gateway-system", {"app.kubernetes.io/managed-by": "envoy-gateway", "app.kubernetes.io/name": "envoy"})


@cache
def cluster(overlay: str) -> tuple:
    """The overlay and every job, as applied to one cluster."""
    return tuple(o for k in (overlay, *JOBS) for o in render(k))


def objects(overlay: str) -> list[dict]:
    return copy.deepcopy(list(cluster(overlay)))


def expectations(overlay: str, pods: dict) -> list[tuple[Pod, Pod, object, bool]]:
    triton, locust, publish, train = pods["triton"], pods["locust"], pods["triton-publish"], pods["histoserve-train"]
    neighbour = Pod(NEIGHBOUR.name, triton.namespace, NEIGHBOUR.labels)
    cases = [
        (PROMETHEUS, triton, "metrics", True),
        (PROMETHEUS, triton, "grpc", False),
        (PROMETHEUS, triton, "http", False),
        (GRAFANA, triton, "metrics", False),
        (FAKE_PROMETHEUS, triton, "metrics", False),
        (CLIENT, triton, "grpc", True),
        (CLIENT, triton, "http", True),
        (CLIENT, triton, "metrics", False),
        (CLIENT_WRONG_VALUE, triton, "grpc", False),
        (STRANGER, triton, "grpc", False),
        (STRANGER, triton, "http", False),
        (STRANGER, triton, "metrics", False),
        (neighbour, triton, "grpc", False),
        (locust, triton, "grpc", True),          # the in-cluster load test
        (publish, triton, "grpc", True),         # the publish job's rollout check
        (locust, locust, "locust", True),        # workers reach the master
        (STRANGER, locust, "locust", False),
        (NEIGHBOUR, locust, "locust", False),
        (train, train, "rendezvous", True),      # multi-node training: c10d ...
        (train, train, 45123, True),             # ... then NCCL/gloo on ports picked at run time
        (NEIGHBOUR, train, "rendezvous", False),
        (locust, train, 45123, False),
        (STRANGER, publish, 8080, False),
        (GATEWAY_PROXY, triton, "grpc", overlay == "overlays/gpu-gateway"),
        (GATEWAY_PROXY, triton, "metrics", False),
    ]
    if "histoserve-monitor" in pods:  # the drift monitor (components/drift-monitor): records in, metrics out
        monitor = pods["histoserve-monitor"]
        cases += [
            (CLIENT, monitor, "http", True),         # a classifying service posts its records
            (locust, monitor, "http", True),
            (PROMETHEUS, monitor, "http", True),     # scrapes /metrics
            (CLIENT_WRONG_VALUE, monitor, "http", False),
            (STRANGER, monitor, "http", False),
            (FAKE_PROMETHEUS, monitor, "http", False),
            (GRAFANA, monitor, "http", False),
            (neighbour, monitor, "http", False),
            (monitor, triton, "grpc", False),        # the monitor calls nobody
        ]
    return cases


def reachability_problems(objects: list[dict], overlay: str) -> list[str]:
    pods = pods_of(objects)
    problems = []
    for source, target, port, expected in expectations(overlay, pods):
        if allowed(objects, source, target, port) != expected:
            problems.append(f"{source.namespace}/{source.name} → {target.namespace}/{target.name}:{port} "
                            f"{'denied' if expected else 'allowed'}, expected {'allowed' if expected else 'denied'}")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_who_reaches_which_port(overlay):
    assert reachability_problems(objects(overlay), overlay) == []


def rewrite_peers_like_include_selectors(objects):
    """What `labels: includeSelectors: true` did to the policy: every peer podSelector got our labels."""
    for policy in (o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "triton"):
        for rule in policy["spec"]["ingress"]:
            for peer in rule["from"]:
                peer.setdefault("podSelector", {}).setdefault("matchLabels", {}).update(
                    {"app.kubernetes.io/name": "triton", "app.kubernetes.io/part-of": "histoserve"})


def admit_any_pod_of_any_namespace(objects):
    policy = next(o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "triton")
    policy["spec"]["ingress"][0]["from"] = [{"namespaceSelector": {}}]


def drop_the_training_policy(objects):
    objects[:] = [o for o in objects if not (o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "histoserve-train")]


def training_policy_admits_only_the_rendezvous_port(objects):
    policy = next(o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "histoserve-train")
    policy["spec"]["ingress"][0]["ports"] = [{"port": "rendezvous", "protocol": "TCP"}]


def deny_all_egress_from_locust(objects):
    objects.append({"kind": "NetworkPolicy", "apiVersion": "networking.k8s.io/v1",
                    "metadata": {"name": "locust-egress", "namespace": "histoserve"},
                    "spec": {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "locust"}}, "policyTypes": ["Egress"]}})


@pytest.mark.parametrize("breakage", [rewrite_peers_like_include_selectors, admit_any_pod_of_any_namespace,
                                      drop_the_training_policy, training_policy_admits_only_the_rendezvous_port,
                                      deny_all_egress_from_locust], ids=lambda f: f.__name__)
def test_reachability_check_fails_on_a_broken_policy(breakage):
    broken = objects("overlays/gpu")
    breakage(broken)
    assert reachability_problems(broken, "overlays/gpu"), f"nothing noticed {breakage.__name__}"


def test_the_old_include_selectors_policy_denied_prometheus_and_every_client():
    """The bug this replaces, shown by the evaluator: the rewritten peers admit neither Prometheus nor
    a labelled client, only pods that are themselves called triton."""
    broken = objects("overlays/gpu")
    rewrite_peers_like_include_selectors(broken)
    triton = pods_of(broken)["triton"]
    assert not allowed(broken, PROMETHEUS, triton, "metrics")
    assert not allowed(broken, CLIENT, triton, "grpc")
    impostor = Pod("x", "monitoring", {"app.kubernetes.io/name": "triton", "app.kubernetes.io/part-of": "histoserve"})
    assert allowed(broken, impostor, triton, "metrics")


@pytest.mark.parametrize("selector, labels, expected", [
    ({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]}, {"tier": "b"}, True),
    ({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["a"]}]}, {"tier": "b"}, False),
    ({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["a"]}]}, {}, True),
    ({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}, {}, False),
    ({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}, {"tier": "a"}, False),
    ({}, {"anything": "x"}, True),
])
def test_label_selectors_follow_kubernetes(selector, labels, expected):
    from tests.k8s.network import selects

    assert selects(selector, labels) is expected


def test_a_peer_with_only_a_pod_selector_means_the_policy_namespace():
    policy = {"kind": "NetworkPolicy", "metadata": {"name": "p", "namespace": "a"},
              "spec": {"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "c"}}}]}]}}
    target = Pod("t", "a", {}, {"web": 80})
    assert allowed([policy], Pod("c", "a", {"role": "c"}), target, "web")
    assert not allowed([policy], Pod("c", "b", {"role": "c"}), target, "web")


@pytest.mark.parametrize("overlay", ["overlays/gpu", "overlays/cpu"])
def test_the_drift_monitor_is_deployed_and_guarded_where_models_live_on_a_claim(overlay):
    pods = pods_of(objects(overlay))
    assert "histoserve-monitor" in pods
    without_policy = [o for o in objects(overlay) if not (o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "histoserve-monitor")]
    assert allowed(without_policy, STRANGER, pods["histoserve-monitor"], "http")  # the policy is what keeps strangers out
