"""A small model of the cluster objects that decide who serves during a move between overlays: the
Triton Deployment and its pods, the Argo Rollout and its pods, the HPA, the Services' selectors and the
GRPCRoute's weights. Manifests come from real `kubectl kustomize` renders; what the controllers do with
them is written here from their sources (Argo Rollouts v1.9.1, Kubernetes' HPA):

- `kubectl apply` (client-side): a field the manifest leaves out keeps its live value when it was never
  applied (the Deployment's and the Rollout's replicas, set by the HPA or `kubectl scale`; the
  pod-template hash Argo adds to a Service selector);
- a Rollout created without replicas gets 1 (rollout/controller.go); its pods start unready;
- workloadRef scaleDown (rollout/sync.go, rollout/replicaset.go; revision 1 only): `never` leaves the
  Deployment alone, `onsuccess` sets it to 0 once the Rollout is Healthy, `progressively` to
  spec.replicas - ready (0 once Healthy);
- a stable or canary Service gets the ReplicaSet's hash in its selector only once that ReplicaSet is
  fully available (rollout/service.go ensureSVCTargets, since argo-rollouts #1777); without a traffic
  router or Services in the Rollout, Argo touches neither;
- the Gateway API plugin sets the stable backend's weight to 100 - canary weight (no canary: 100/0);
- deleting the Rollout deletes its ReplicaSets and pods (owner references) and leaves the Deployment
  as it is (rollout/controller.go does nothing on deletion);
- the HPA (pkg/controller/podautoscaler/horizontal.go): a target at 0 replicas is not scaled
  (ScalingDisabled); a target under minReplicas is raised to it; load does not change here.

Only one revision runs (a move never starts a canary), so the Rollout has one ReplicaSet."""

from __future__ import annotations

import copy
import re
import shlex
from dataclasses import dataclass, field

HASH = "rollouts-pod-template-hash"
ROLLOUT_HASH = "7d9f8c6b5"


@dataclass
class Pod:
    owner: str          # "Deployment" or "Rollout"
    labels: dict
    ready: bool = False


@dataclass
class Cluster:
    objects: dict = field(default_factory=dict)        # (kind, name) -> the applied manifest
    replicas: dict = field(default_factory=dict)       # "Deployment"/"Rollout" -> spec.replicas
    selectors: dict = field(default_factory=dict)      # Service name -> live selector
    pods: list = field(default_factory=list)
    hpa_disabled: bool = False
    baseline: int = 0                                  # Ready pods behind the route before the move
    most_pods: int = 0
    problems: list = field(default_factory=list)
    log: list = field(default_factory=list)

    # --- what people do -------------------------------------------------------------------------
    def apply(self, objects: list[dict]) -> None:
        for manifest in objects:
            key = (manifest["kind"], manifest["metadata"]["name"])
            if key in (("Deployment", "triton"), ("Rollout", "triton")):
                if "replicas" in manifest["spec"]:
                    self.replicas[manifest["kind"]] = manifest["spec"]["replicas"]
                elif key not in self.objects:
                    self.replicas[manifest["kind"]] = 1
            if manifest["kind"] == "Service":
                live = self.selectors.get(key[1], {})
                self.selectors[key[1]] = {**manifest["spec"].get("selector", {}),
                                          **({HASH: live[HASH]} if HASH in live and key in self.objects else {})}
            self.objects[key] = copy.deepcopy(manifest)
        self.reconcile()

    def scale(self, kind: str, count: int) -> None:
        self.replicas[kind] = count
        self.reconcile()

    def delete(self, kind: str, name: str) -> None:
        self.objects.pop((kind, name), None)
        if kind == "Service":
            self.selectors.pop(name, None)
        if kind == "Rollout":
            self.pods = [p for p in self.pods if p.owner != "Rollout"]
            self.replicas.pop("Rollout", None)
        self.reconcile()

    def settle(self, until) -> None:
        """Pods become Ready one at a time, the controllers acting after each, until `until()`."""
        for _ in range(100):
            if until():
                return
            waiting = next((p for p in self.pods if not p.ready), None)
            assert waiting is not None, f"nothing left to become Ready, and still not there: {self.log[-1:]}"
            waiting.ready = True
            self.reconcile()
        raise AssertionError("did not settle")

    # --- what the controllers do ----------------------------------------------------------------
    def rollout(self) -> dict | None:
        return self.objects.get(("Rollout", "triton"))

    def ready(self, owner: str) -> int:
        return sum(p.ready for p in self.pods if p.owner == owner)

    def healthy(self) -> bool:
        return self.rollout() is not None and self.ready("Rollout") >= self.replicas.get("Rollout", 0) > 0

    def reconcile(self) -> None:
        for _ in range(20):
            before = (dict(self.replicas), copy.deepcopy(self.selectors), len(self.pods))
            self._hpa()
            self._argo()
            self._replica_sets()
            if before == (dict(self.replicas), copy.deepcopy(self.selectors), len(self.pods)):
                break
        self.check()

    def _hpa(self) -> None:
        hpa = self.objects.get(("HorizontalPodAutoscaler", "triton"))
        if hpa is None:
            return
        target = hpa["spec"]["scaleTargetRef"]["kind"]
        if target not in self.replicas or (target == "Rollout" and self.rollout() is None):
            return
        self.hpa_disabled = self.replicas[target] == 0
        if not self.hpa_disabled and self.replicas[target] < hpa["spec"]["minReplicas"]:
            self.replicas[target] = hpa["spec"]["minReplicas"]

    def _argo(self) -> None:
        rollout = self.rollout()
        if rollout is None:
            return
        mode = rollout["spec"]["workloadRef"].get("scaleDown", "progressively")
        if mode == "onsuccess" and self.healthy():
            self.replicas["Deployment"] = 0
        elif mode == "progressively":
            self.replicas["Deployment"] = 0 if self.healthy() else max(0, self.replicas["Rollout"] - self.ready("Rollout"))
        canary = rollout["spec"]["strategy"]["canary"]
        if self.healthy():  # no canary: stable and canary Services both point at the one ReplicaSet
            for role in ("stableService", "canaryService"):
                if canary.get(role) in self.selectors:
                    self.selectors[canary[role]] = {**self.selectors[canary[role]], HASH: ROLLOUT_HASH}

    def _replica_sets(self) -> None:
        deployment = self.objects[("Deployment", "triton")]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        owners = {"Deployment": dict(labels)}
        if self.rollout() is not None:
            owners["Rollout"] = {**labels, HASH: ROLLOUT_HASH}
        for owner, pod_labels in owners.items():
            mine = [p for p in self.pods if p.owner == owner]
            wanted = self.replicas.get(owner, 0)
            for _ in range(wanted - len(mine)):
                self.pods.append(Pod(owner, pod_labels))
            for pod in sorted(mine, key=lambda p: p.ready)[:max(0, len(mine) - wanted)]:  # unready pods go first
                self.pods.remove(pod)
        self.most_pods = max(self.most_pods, len(self.pods))

    # --- what callers see -----------------------------------------------------------------------
    def endpoints(self, service: str) -> int:
        selector = self.selectors.get(service)
        if selector is None:
            return 0
        return sum(p.ready and all(p.labels.get(k) == v for k, v in selector.items()) for p in self.pods)

    def route_backends(self) -> dict[str, int]:
        """The GRPCRoute's backends that get calls (weight > 0; the plugin keeps stable at 100 with no canary)."""
        route = self.objects[("GRPCRoute", "triton")]
        return {b["name"]: b.get("weight", 1) for b in route["spec"]["rules"][0]["backendRefs"] if b.get("weight", 1) > 0}

    def check(self) -> None:
        hpa = self.objects.get(("HorizontalPodAutoscaler", "triton"))
        floor = max(self.baseline, hpa["spec"]["minReplicas"] if hpa else 0)
        where = self.log[-1] if self.log else "start"
        for backend in self.route_backends():
            if self.endpoints(backend) == 0:
                self.problems.append(f"{where}: the route's backend {backend} has no Ready pod: gateway callers get UNAVAILABLE")
        serving = sum(self.endpoints(b) for b in self.route_backends())
        if serving < floor:
            self.problems.append(f"{where}: {serving} Ready pods behind the route, fewer than the {floor} that served before")
        if self.endpoints("triton-grpc") < floor:
            self.problems.append(f"{where}: {self.endpoints('triton-grpc')} Ready pods behind triton-grpc (in-cluster callers), "
                                 f"fewer than {floor}")


COMMAND = re.compile(r"^kubectl\s")


def commands(block: str) -> list[str]:
    """The kubectl commands of a shell block (comments dropped, continuation lines joined)."""
    lines, current = [], ""
    for raw in block.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            lines.append(current.strip())
            current = ""
    assert all(COMMAND.match(line) for line in lines), lines
    return lines


def run(cluster: Cluster, command: str, render) -> None:
    """One documented command, as the cluster would take it. Anything not understood fails the test,
    so the procedure and this model cannot drift apart silently."""
    cluster.log.append(command)
    substitution = re.search(r"\$\(kubectl -n histoserve get (deploy|rollout)/triton -o jsonpath='\{\.spec\.replicas\}'\)", command)
    if substitution:
        value = cluster.replicas.get({"deploy": "Deployment", "rollout": "Rollout"}[substitution.group(1)], 0)
        command = command.replace(substitution.group(0), str(value))
    words = shlex.split(command)
    if words[1:3] == ["apply", "-k"]:
        cluster.apply(render(words[3].removeprefix("k8s/")))
    elif words[1:4] == ["-n", "histoserve", "scale"]:
        kind = {"rollout/triton": "Rollout", "deploy/triton": "Deployment"}[words[4]]
        cluster.scale(kind, int(words[5].removeprefix("--replicas=")))
    elif words[1:4] == ["argo", "rollouts", "status"]:
        cluster.settle(cluster.healthy)
    elif words[1:6] == ["-n", "histoserve", "rollout", "status", "deploy/triton"]:
        cluster.settle(lambda: cluster.ready("Deployment") >= cluster.replicas.get("Deployment", 0))
    elif words[1:4] == ["-n", "histoserve", "delete"]:
        kinds = {"rollout": "Rollout", "service": "Service", "analysistemplate": "AnalysisTemplate", "prometheusrule": "PrometheusRule"}
        for target in words[4:]:
            kind, name = target.split("/")
            cluster.delete(kinds[kind], name)
    else:
        raise AssertionError(f"the model does not know this command: {command}")
