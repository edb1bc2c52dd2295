"""Who can reach which port: the rendered NetworkPolicies evaluated as a cluster would enforce them.

Kubernetes semantics (networking.k8s.io/v1), as the API reference states them:
- a pod is isolated for ingress (egress) when at least one policy in its namespace selects it and
  lists Ingress (Egress) in policyTypes (default: Ingress, plus Egress when `egress` is present);
- a connection is allowed when the target admits it on ingress *and* the source admits it on egress;
  each side is the union of every rule of every policy that selects the pod;
- a peer with only podSelector means pods of the policy's own namespace; with only
  namespaceSelector, every pod of the matching namespaces; with both, matching pods in matching
  namespaces; an absent or empty `from`/`to` admits everyone, an absent `ports` every port;
- a named port is resolved against the *target* pod's container ports;
- an ipBlock peer matches every address inside `cidr` and outside its `except` ranges. The API
  reference leaves it to the network plugin whether pod addresses count; common plugins (Calico,
  Cilium) match them, so here they do: every pod gets an address in the pod network 10.244.0.0/16,
  and an ipBlock that covers it admits the pod. Addresses outside the cluster are `Address`es
  (no labels, no namespace), which only ipBlock peers match.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field

from tests.k8s.manifests import WORKLOADS, pod_labels

POD_NETWORK = ipaddress.ip_network("10.244.0.0/16")


def pod_address(namespace: str, name: str) -> str:
    """A stable address in the pod network for a pod of that name."""
    digest = int.from_bytes(hashlib.sha256(f"{namespace}/{name}".encode()).digest()[:2], "big")
    return str(POD_NETWORK[1 + digest % (POD_NETWORK.num_addresses - 2)])


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: dict = field(default_factory=dict)
    ports: dict = field(default_factory=dict)  # container port name -> number
    namespace_labels: dict = field(default_factory=dict)
    address: str = ""  # default: pod_address(namespace, name)

    @property
    def ip(self) -> str:
        return self.address or pod_address(self.namespace, self.name)

    @property
    def all_namespace_labels(self) -> dict:
        # The API server labels every namespace with its own name (Kubernetes >= 1.22).
        return {**self.namespace_labels, "kubernetes.io/metadata.name": self.namespace}


def selects(selector: dict | None, labels: dict) -> bool:
    """A LabelSelector: matchLabels AND matchExpressions; an empty selector selects everything."""
    if selector is None:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def policy_types(policy: dict) -> set[str]:
    spec = policy["spec"]
    if "policyTypes" in spec:
        return set(spec["policyTypes"])
    return {"Ingress", "Egress"} if "egress" in spec else {"Ingress"}


@dataclass(frozen=True)
class Address:
    """Somewhere outside the cluster (the internet, the cloud's metadata service, a private subnet)."""

    name: str
    ip: str
    ports: dict = field(default_factory=dict)
    namespace: str = ""  # belongs to none: no namespace or pod selector matches it
    labels: dict = field(default_factory=dict)


def in_block(block: dict, ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    network = ipaddress.ip_network(block["cidr"], strict=False)
    if address.version != network.version or address not in network:
        return False
    return not any(address in ipaddress.ip_network(excepted, strict=False) for excepted in block.get("except", []))


def peer_matches(peer: dict, policy_namespace: str, pod: Pod | Address) -> bool:
    if "ipBlock" in peer:
        return in_block(peer["ipBlock"], pod.ip)
    if isinstance(pod, Address):
        return False
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], pod.all_namespace_labels):
            return False
    elif pod.namespace != policy_namespace:
        return False
    return selects(peer.get("podSelector"), pod.labels)


def port_matches(rule_ports: list[dict] | None, target: Pod | Address, port: int, protocol: str) -> bool:
    if not rule_ports:
        return True
    for entry in rule_ports:
        if entry.get("protocol", "TCP") != protocol:
            continue
        wanted = entry.get("port")
        if wanted is None:
            return True
        number = target.ports.get(wanted) if isinstance(wanted, str) else wanted
        if number is None:
            continue
        if number == port or (isinstance(wanted, int) and wanted <= port <= entry.get("endPort", wanted)):
            return True
    return False


def _side_allows(policies: list[dict], pod: Pod | Address, other: Pod | Address, target: Pod | Address, port: int,
                 protocol: str, direction: str) -> bool:
    if isinstance(pod, Address):
        return True  # outside the cluster: no policy of ours applies there
    kind, rules_key, peers_key = ("Ingress", "ingress", "from") if direction == "in" else ("Egress", "egress", "to")
    selecting = [p for p in policies
                 if p["metadata"].get("namespace", "default") == pod.namespace
                 and kind in policy_types(p) and selects(p["spec"]["podSelector"], pod.labels)]
    if not selecting:
        return True  # not isolated in this direction
    for policy in selecting:
        for rule in policy["spec"].get(rules_key) or []:
            peers = rule.get(peers_key)
            if peers and not any(peer_matches(peer, policy["metadata"].get("namespace", "default"), other) for peer in peers):
                continue
            if port_matches(rule.get("ports"), target, port, protocol):
                return True
    return False


def allowed(policies: list[dict], source: Pod | Address, target: Pod | Address, port: int | str, protocol: str = "TCP") -> bool:
    """May `source` open a connection to `target` on `port` (a number or one of target's port names)?"""
    policies = [p for p in policies if p["kind"] == "NetworkPolicy"]
    if isinstance(port, str):
        if port not in target.ports:
            raise KeyError(f"{target.name} has no port named {port!r} (it has {sorted(target.ports)})")
        port = target.ports[port]
    return (_side_allows(policies, target, source, target, port, protocol, "in")
            and _side_allows(policies, source, target, target, port, protocol, "out"))


def pods_of(objects: list[dict]) -> dict[str, Pod]:
    """One Pod per workload as the rendered pod template would create it, by workload name, or by
    "namespace/name" for a name that several namespaces use (two overlays in one cluster)."""
    namespaces = {o["metadata"]["name"]: o["metadata"].get("labels", {}) for o in objects if o["kind"] == "Namespace"}
    pods = []
    for workload in (o for o in objects if o["kind"] in WORKLOADS):
        template = workload["spec"]["template"]
        namespace = workload["metadata"].get("namespace", "default")
        ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", []) if "name" in p}
        pods.append(Pod(workload["metadata"]["name"], namespace, pod_labels(workload), ports, namespaces.get(namespace, {})))
    names = [pod.name for pod in pods]
    return {(pod.name if names.count(pod.name) == 1 else f"{pod.namespace}/{pod.name}"): pod for pod in pods}
