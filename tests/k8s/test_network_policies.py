"""Who can reach which port, and what our pods can reach, with every rendered NetworkPolicy evaluated as
the cluster enforces it (tests/k8s/network.py): each overlay deployed beside the load-test, training
and publish jobs, pods of our own making, labelled and not, in other namespaces, and addresses
outside the cluster."""

import copy
from functools import cache

import pytest

from tests.k8s.manifests import JOBS, OVERLAYS, platform_for, render
from tests.k8s.network import Address, Pod, allowed, pods_of

ALLOWED_NAMESPACE = {"histoserve.io/triton-clients": "allowed"}
CLIENT_LABEL = {"histoserve.io/triton-client": "true"}
PROMETHEUS = Pod("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"})
GRAFANA = Pod("grafana", "monitoring", {"app.kubernetes.io/name": "grafana"})
FAKE_PROMETHEUS = Pod("prometheus-elsewhere", "payments", {"app.kubernetes.io/name": "prometheus"}, namespace_labels=ALLOWED_NAMESPACE)
CLIENT = Pod("payments-api", "payments", {"app": "payments-api", **CLIENT_LABEL}, namespace_labels=ALLOWED_NAMESPACE)
# a tenant that labels its own pod, in a namespace no cluster admin allowed
SELF_LABELLED = Pod("intruder", "tenant-b", {"app": "intruder", **CLIENT_LABEL})
CLIENT_WRONG_VALUE = Pod("payments-worker", "payments", {"histoserve.io/triton-client": "yes"}, namespace_labels=ALLOWED_NAMESPACE)
STRANGER = Pod("stranger", "payments", {"app": "stranger"}, namespace_labels=ALLOWED_NAMESPACE)
NEIGHBOUR = Pod("neighbour", "histoserve", {"app": "neighbour"})
OUR_GATEWAY_PROXY = Pod("envoy-histoserve-triton", "envoy-gateway-system", {
    "app.kubernetes.io/managed-by": "envoy-gateway", "app.kubernetes.io/name": "envoy", "app.kubernetes.io/component": "proxy",
    "gateway.envoyproxy.io/owning-gateway-name": "triton", "gateway.envoyproxy.io/owning-gateway-namespace": "histoserve"})
OTHER_GATEWAY_PROXY = Pod("envoy-shop-web", "envoy-gateway-system", {
    "app.kubernetes.io/managed-by": "envoy-gateway", "app.kubernetes.io/name": "envoy", "app.kubernetes.io/component": "proxy",
    "gateway.envoyproxy.io/owning-gateway-name": "web", "gateway.envoyproxy.io/owning-gateway-namespace": "shop"})
KUBE_DNS = Pod("coredns", "kube-system", {"k8s-app": "kube-dns"}, {"dns": 53, "dns-tcp": 53})
OTLP_PORTS = {"otlp-grpc": 4317, "otlp-http": 4318}
# the trace backend, in a namespace a cluster admin labelled for it, and the same in one not labelled
TRACE_BACKEND = Pod("tempo-distributor", "observability", {"app.kubernetes.io/name": "tempo"}, OTLP_PORTS,
                    namespace_labels={"histoserve.io/trace-backend": "allowed"})
OTHER_COLLECTOR = Pod("otel-collector", "shop", {"app.kubernetes.io/name": "otel-collector"}, OTLP_PORTS)
INTERNET = Address("example.org", "93.184.215.14")
S3 = Address("s3.eu-west-1.amazonaws.com", "52.218.1.10")  # S3's public address
# the VPC's interface endpoints of S3 and STS, in the subnet components/s3-endpoint-egress names
S3_ENDPOINT = Address("S3 interface endpoint", "10.0.128.5")
STS_ENDPOINT = Address("STS interface endpoint", "10.0.128.9")
METADATA = Address("cloud metadata service", "169.254.169.254")
POD_IDENTITY_AGENT = Address("EKS Pod Identity agent", "169.254.170.23")
PRIVATE_HOST = Address("a database in the VPC", "10.20.30.40")


@cache
def cluster(*kustomizations: str) -> tuple:
    """The kustomizations (an overlay, every job, ...) as applied to one cluster."""
    return tuple(o for k in kustomizations for o in render(k))


def objects(overlay: str, *more: str) -> list[dict]:
    """The overlays on their platforms (the Namespaces, their labels), beside every job."""
    platforms = dict.fromkeys(platform_for(k) for k in (overlay, *more))
    return copy.deepcopy(list(cluster(*platforms, overlay, *more, *JOBS)))


def expectations(overlay: str, pods: dict) -> list[tuple]:
    triton, locust, publish, train = pods["triton"], pods["locust"], pods["triton-publish"], pods["histoserve-train"]
    publish_s3 = pods["triton-publish-s3"]
    neighbour = Pod(NEIGHBOUR.name, triton.namespace, NEIGHBOUR.labels)
    same_namespace_client = Pod("batch-scorer", triton.namespace, dict(CLIENT_LABEL), namespace_labels=triton.namespace_labels)
    dev = overlay == "overlays/dev"
    cases = [
        (PROMETHEUS, triton, "metrics", True),
        (PROMETHEUS, triton, "grpc", False),
        (GRAFANA, triton, "metrics", False),
        (FAKE_PROMETHEUS, triton, "metrics", False),
        (CLIENT, triton, "grpc", not dev),        # dev admits its own namespace's clients only
        (CLIENT, triton, "metrics", False),
        (CLIENT, triton, 8000, False),            # no HTTP: Triton serves gRPC only
        (same_namespace_client, triton, "grpc", True),
        (SELF_LABELLED, triton, "grpc", False),   # the pod label alone admits nobody
        (CLIENT_WRONG_VALUE, triton, "grpc", False),
        (STRANGER, triton, "grpc", False),
        (STRANGER, triton, "metrics", False),
        (neighbour, triton, "grpc", False),
        # the in-cluster load test, in production's namespace (dev: render the jobs into histoserve-dev
        # to use them there); the publish job writes and verifies the store and calls no Triton
        (locust, triton, "grpc", not dev),
        (publish, triton, "grpc", False),
        (locust, locust, "locust", True),         # workers reach the master
        (STRANGER, locust, "locust", False),
        (NEIGHBOUR, locust, "locust", False),
        (train, train, "rendezvous", True),       # multi-node training: c10d ...
        (train, train, 45123, True),              # ... then NCCL/gloo on ports picked at run time
        (NEIGHBOUR, train, "rendezvous", False),
        (locust, train, 45123, False),
        (STRANGER, publish, 8080, False),
        (OUR_GATEWAY_PROXY, triton, "grpc", overlay.startswith(("overlays/gpu-gateway", "overlays/gpu-canary"))),
        (OUR_GATEWAY_PROXY, triton, "metrics", False),
        (OTHER_GATEWAY_PROXY, triton, "grpc", False),  # another team's Gateway on the same controller
        # what Triton itself may reach: DNS only where it resolves a name (the trace collector, the S3
        # endpoints); the object store only where an init container downloads, and then only through
        # the VPC's endpoints: never the internet, S3's public addresses included
        (triton, KUBE_DNS, 53, not dev),
        (triton, INTERNET, 443, False),
        (triton, INTERNET, 80, False),
        (triton, METADATA, 80, False),
        (triton, PRIVATE_HOST, 5432, False),
        (triton, CLIENT, 8080, False),
        (triton, S3, 443, False),
        (triton, S3_ENDPOINT, 443, overlay == "overlays/gpu-s3"),
        (triton, STS_ENDPOINT, 443, overlay == "overlays/gpu-s3"),
        (triton, S3_ENDPOINT, 80, False),
        (triton, POD_IDENTITY_AGENT, 80, False),
        (triton, PRIVATE_HOST, 443, False),
        # the publish Jobs, the store's only writers: on a claim nothing at all, not even DNS; on S3
        # DNS and the endpoints
        (publish, KUBE_DNS, 53, False),
        (publish, INTERNET, 443, False),
        (publish, S3_ENDPOINT, 443, False),
        (publish, METADATA, 80, False),
        (publish_s3, KUBE_DNS, 53, True),
        (publish_s3, S3_ENDPOINT, 443, True),
        (publish_s3, STS_ENDPOINT, 443, True),
        (publish_s3, S3, 443, False),
        (publish_s3, INTERNET, 443, False),
        (publish_s3, METADATA, 80, False),
        (publish_s3, POD_IDENTITY_AGENT, 80, False),
        (publish_s3, PRIVATE_HOST, 443, False),
        (publish_s3, triton, "grpc", False),
        (STRANGER, publish_s3, 8080, False),
    ]
    if "histoserve-monitor" in pods:  # the drift monitor (components/drift-monitor): records in, metrics out
        monitor = pods["histoserve-monitor"]
        cases += [
            (CLIENT, monitor, "http", True),         # a classifying service posts its records
            (locust, monitor, "http", True),
            (PROMETHEUS, monitor, "http", True),     # scrapes /metrics
            (SELF_LABELLED, monitor, "http", False),
            (CLIENT_WRONG_VALUE, monitor, "http", False),
            (STRANGER, monitor, "http", False),
            (FAKE_PROMETHEUS, monitor, "http", False),
            (GRAFANA, monitor, "http", False),
            (neighbour, monitor, "http", False),
            (monitor, triton, "grpc", False),        # the monitor calls nobody ...
            (monitor, INTERNET, 443, False),         # ... and reaches nothing
            (monitor, METADATA, 80, False),
        ]
    if "otel-collector" in pods:  # components/tracing: spans in from Triton, clients and our gateway; metrics out
        collector = pods["otel-collector"]
        gateway = overlay.startswith(("overlays/gpu-gateway", "overlays/gpu-canary"))
        cases += [
            (triton, collector, "otlp-http", True),         # Triton's exporter speaks OTLP/HTTP ...
            (triton, collector, "otlp-grpc", False),        # ... and nothing else
            (triton, collector, "metrics", False),
            (CLIENT, collector, "otlp-http", True),         # a traced caller sends its own spans
            (CLIENT, collector, "otlp-grpc", True),
            (same_namespace_client, collector, "otlp-http", True),
            (locust, collector, "otlp-http", True),
            (CLIENT, collector, "metrics", False),
            (SELF_LABELLED, collector, "otlp-http", False),
            (CLIENT_WRONG_VALUE, collector, "otlp-grpc", False),
            (STRANGER, collector, "otlp-http", False),
            (STRANGER, collector, "otlp-grpc", False),
            (neighbour, collector, "otlp-http", False),
            (OUR_GATEWAY_PROXY, collector, "otlp-grpc", gateway),   # the edge's spans (EnvoyProxy)
            (OUR_GATEWAY_PROXY, collector, "otlp-http", False),
            (OTHER_GATEWAY_PROXY, collector, "otlp-grpc", False),
            (PROMETHEUS, collector, "metrics", True),
            (PROMETHEUS, collector, "otlp-http", False),
            (FAKE_PROMETHEUS, collector, "metrics", False),
            (GRAFANA, collector, "metrics", False),
            (publish, collector, "otlp-http", False),
            # the collector reaches DNS and the OTLP ports of the backend's labelled namespace, nothing else
            (collector, KUBE_DNS, 53, True),
            (collector, TRACE_BACKEND, "otlp-http", True),
            (collector, TRACE_BACKEND, "otlp-grpc", True),
            (collector, TRACE_BACKEND, 9095, False),
            (collector, OTHER_COLLECTOR, "otlp-http", False),
            (collector, INTERNET, 443, False),
            (collector, METADATA, 80, False),
            (collector, triton, "grpc", False),
            (collector, PRIVATE_HOST, 4318, False),
            # Triton's spans go to the collector only: never straight to a backend or to another collector
            (triton, TRACE_BACKEND, "otlp-http", False),
            (triton, OTHER_COLLECTOR, "otlp-http", False),
        ]
    return cases


def reachability_problems(objects: list[dict], overlay: str) -> list[str]:
    pods = pods_of(objects)
    problems = []
    for source, target, port, expected in expectations(overlay, pods):
        protocol = "UDP" if port == 53 else "TCP"
        if allowed(objects, source, target, port, protocol) != expected:
            problems.append(f"{source.namespace}/{source.name} → {target.namespace}/{target.name}:{port} "
                            f"{'denied' if expected else 'allowed'}, expected {'allowed' if expected else 'denied'}")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_who_reaches_which_port(overlay):
    assert reachability_problems(objects(overlay), overlay) == []


def test_dev_pods_never_reach_production():
    """Both overlays in one cluster: a pod of the dev namespace, labelled as a client (the dev overlay's
    own Triton admits it), is refused by production's Triton, and production's clients do not reach
    dev's."""
    both = objects("overlays/gpu", "overlays/dev")
    pods = pods_of(both)
    production, dev = pods["histoserve/triton"], pods["histoserve-dev/triton"]
    dev_client = Pod("notebook", "histoserve-dev", dict(CLIENT_LABEL), namespace_labels=dev.namespace_labels)
    production_client = Pod("batch-scorer", "histoserve", dict(CLIENT_LABEL), namespace_labels=production.namespace_labels)
    assert allowed(both, dev_client, dev, "grpc")
    assert not allowed(both, dev_client, production, "grpc")
    assert not allowed(both, dev, production, "grpc")
    assert allowed(both, production_client, production, "grpc")
    assert not allowed(both, production_client, dev, "grpc")


def rewrite_peers_like_include_selectors(objects):
    """What `labels: includeSelectors: true` did to the policy: every peer podSelector got our labels."""
    for policy in (o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "triton"):
        for rule in policy["spec"]["ingress"]:
            for peer in rule["from"]:
                peer.setdefault("podSelector", {}).setdefault("matchLabels", {}).update(
                    {"app.kubernetes.io/name": "triton", "app.kubernetes.io/part-of": "histoserve"})


def triton_policy(objects):
    return next(o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "triton")


def admit_any_pod_of_any_namespace(objects):
    triton_policy(objects)["spec"]["ingress"][0]["from"] = [{"namespaceSelector": {}}]


def admit_labelled_pods_of_any_namespace(objects):  # what main had before: any tenant labels itself in
    triton_policy(objects)["spec"]["ingress"][0]["from"][0]["namespaceSelector"] = {}


def admit_every_address(objects):  # an ipBlock peer covering everything: pods and the internet alike
    triton_policy(objects)["spec"]["ingress"][0]["from"].append({"ipBlock": {"cidr": "0.0.0.0/0"}})


def admit_the_pod_network(objects):
    triton_policy(objects)["spec"]["ingress"][0]["from"].append({"ipBlock": {"cidr": "10.244.0.0/16"}})


def open_triton_egress(objects):
    triton_policy(objects)["spec"]["policyTypes"] = ["Ingress"]
    triton_policy(objects)["spec"].pop("egress", None)


def egress_to_the_internet_with_the_metadata_service(objects):
    triton_policy(objects)["spec"].setdefault("egress", []).append(
        {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}]})


DNS_RULE = {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
            "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}


def dns_for_a_triton_that_resolves_nothing(objects):  # what base/networkpolicy.yaml had: DNS for every Triton
    triton_policy(objects)["spec"].setdefault("egress", []).append(copy.deepcopy(DNS_RULE))


def s3_download_to_public_https(objects):  # what components/model-store-s3 had: 443 to every public address
    policy = next(o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "model-store-s3-egress")
    policy["spec"]["egress"][1]["to"] = [{"ipBlock": {"cidr": "0.0.0.0/0", "except": [
        "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16", "127.0.0.0/8"]}}]


def publish_egress_unrestricted(objects):  # what k8s/jobs/publish (and so publish-s3) had: Ingress-only policies
    for policy in (o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"].startswith("triton-publish")):
        policy["spec"]["policyTypes"] = ["Ingress"]


def publish_s3_egress_everywhere(objects):
    policy = next(o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "model-store-s3-egress-s3")
    policy["spec"]["egress"].append({})


def drop_the_training_policy(objects):
    objects[:] = [o for o in objects if not (o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "histoserve-train")]


def training_policy_admits_only_the_rendezvous_port(objects):
    policy = next(o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "histoserve-train")
    policy["spec"]["ingress"][0]["ports"] = [{"port": "rendezvous", "protocol": "TCP"}]


def deny_all_egress_from_locust(objects):
    objects.append({"kind": "NetworkPolicy", "apiVersion": "networking.k8s.io/v1",
                    "metadata": {"name": "locust-egress", "namespace": "histoserve"},
                    "spec": {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "locust"}}, "policyTypes": ["Egress"]}})


def monitor_open_to_every_labelled_pod(objects):
    policy = next(o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "histoserve-monitor")
    policy["spec"]["ingress"][0]["from"][0]["namespaceSelector"] = {}


def gateway_policy_admits_every_envoy(objects):
    policy = next(o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "triton-gateway")
    policy["spec"]["ingress"][0]["from"][0]["podSelector"] = {"matchLabels": {"app.kubernetes.io/managed-by": "envoy-gateway"}}


def collector_policy(objects, name="otel-collector"):
    return next(o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == name)


def collector_open_to_every_labelled_pod(objects):  # any tenant labels its pods and floods the collector
    collector_policy(objects)["spec"]["ingress"][1]["from"][0]["namespaceSelector"] = {}


def collector_open_to_its_whole_namespace(objects):
    collector_policy(objects)["spec"]["ingress"][0]["from"] = [{"podSelector": {}}]


def collector_egress_to_every_namespace(objects):
    collector_policy(objects)["spec"]["egress"][1]["to"] = [{"namespaceSelector": {}}]


def collector_admits_every_envoy(objects):
    policy = collector_policy(objects, "otel-collector-gateway")
    policy["spec"]["ingress"][0]["from"][0]["podSelector"] = {"matchLabels": {"app.kubernetes.io/managed-by": "envoy-gateway"}}


def triton_egress_to_every_otlp_port(objects):  # what a namespaceSelector-less rule on the port would do
    policy = collector_policy(objects, "triton-tracing")
    policy["spec"]["egress"][1]["to"] = [{"namespaceSelector": {}}]


BROKEN = {  # breakage: the overlay it breaks
    rewrite_peers_like_include_selectors: "overlays/gpu", admit_any_pod_of_any_namespace: "overlays/gpu",
    admit_labelled_pods_of_any_namespace: "overlays/gpu", admit_every_address: "overlays/gpu",
    admit_the_pod_network: "overlays/gpu", open_triton_egress: "overlays/dev",
    dns_for_a_triton_that_resolves_nothing: "overlays/dev", s3_download_to_public_https: "overlays/gpu-s3",
    publish_egress_unrestricted: "overlays/gpu", publish_s3_egress_everywhere: "overlays/gpu",
    egress_to_the_internet_with_the_metadata_service: "overlays/gpu", drop_the_training_policy: "overlays/gpu",
    training_policy_admits_only_the_rendezvous_port: "overlays/gpu", deny_all_egress_from_locust: "overlays/gpu",
    monitor_open_to_every_labelled_pod: "overlays/gpu", gateway_policy_admits_every_envoy: "overlays/gpu-gateway",
    collector_open_to_every_labelled_pod: "overlays/gpu", collector_open_to_its_whole_namespace: "overlays/cpu",
    collector_egress_to_every_namespace: "overlays/gpu", collector_admits_every_envoy: "overlays/gpu-gateway",
    triton_egress_to_every_otlp_port: "overlays/gpu",
}


@pytest.mark.parametrize("breakage", list(BROKEN), ids=lambda f: f.__name__)
def test_reachability_check_fails_on_a_broken_policy(breakage):
    overlay = BROKEN[breakage]
    broken = objects(overlay)
    assert reachability_problems(broken, overlay) == []
    breakage(broken)
    assert reachability_problems(broken, overlay), f"nothing noticed {breakage.__name__}"


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


@pytest.mark.parametrize("cidr, excepted, address, expected", [
    ("0.0.0.0/0", [], "93.184.215.14", True),
    ("0.0.0.0/0", ["169.254.0.0/16"], "169.254.169.254", False),
    ("10.244.0.0/16", [], "10.244.3.7", True),       # a pod address: ipBlock admits pods too
    ("10.244.0.0/16", ["10.244.3.0/24"], "10.244.3.7", False),
    ("192.168.0.0/16", [], "10.244.3.7", False),
    ("::/0", [], "10.244.3.7", False),               # families never mix
])
def test_ip_blocks_match_addresses_inside_and_not_excepted(cidr, excepted, address, expected):
    policy = {"kind": "NetworkPolicy", "metadata": {"name": "p", "namespace": "a"},
              "spec": {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": cidr, "except": excepted}}]}]}}
    assert allowed([policy], Address("source", address), Pod("t", "a", {}, {"web": 80}), "web") is expected


def test_egress_rules_need_both_ends_to_agree():
    """A connection passes when the source's egress and the target's ingress both allow it."""
    egress = {"kind": "NetworkPolicy", "metadata": {"name": "out", "namespace": "a"},
              "spec": {"podSelector": {}, "policyTypes": ["Egress"],
                       "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "b"}}}]}]}}
    source, target = Pod("s", "a"), Pod("t", "b", {}, {"web": 80})
    assert allowed([egress], source, target, "web")
    assert not allowed([egress], source, Pod("t", "c", {}, {"web": 80}), "web")
    assert not allowed([egress], source, INTERNET, 443)
    deny_in = {"kind": "NetworkPolicy", "metadata": {"name": "in", "namespace": "b"},
               "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}
    assert not allowed([egress, deny_in], source, target, "web")


@pytest.mark.parametrize("overlay", ["overlays/gpu", "overlays/cpu"])
def test_the_drift_monitor_is_deployed_and_guarded_where_models_live_on_a_claim(overlay):
    pods = pods_of(objects(overlay))
    assert "histoserve-monitor" in pods
    without_policy = [o for o in objects(overlay) if not (o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "histoserve-monitor")]
    assert allowed(without_policy, STRANGER, pods["histoserve-monitor"], "http")  # the policy is what keeps strangers out
