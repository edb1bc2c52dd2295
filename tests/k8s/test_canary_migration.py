"""Moving a running gpu-gateway onto the canary overlay and back, command by command as k8s/README.md
documents it ("Moving onto the canary overlay, and back"), over the overlays' real renders and a model
of what the controllers do with them (tests/k8s/cluster_model.py). After every command, and after every
pod that becomes Ready on the way, gateway callers must have Ready pods behind every backend the route
weighs, and as many as served before the move (never fewer than the HPA's minimum); in-cluster callers
of triton-grpc likewise. The shortcuts a person might take instead fail the same checks."""

from __future__ import annotations

import copy
import re
from functools import cache

import pytest

from tests.k8s.cluster_model import Cluster, commands, run
from tests.k8s.manifests import K8S, render

SECTION = "## Moving onto the canary overlay, and back"
SERVING = 4  # the HPA holds 4 pods when the move starts (its minimum is 2)


@cache
def rendered(kustomization: str) -> tuple:
    return tuple(render(kustomization))


def render_fresh(kustomization: str) -> list[dict]:
    return copy.deepcopy(list(rendered(kustomization)))


def documented(which: str) -> list[str]:
    """The shell block of the README section whose first line is `# <which>`."""
    text = (K8S / "README.md").read_text()
    section = text[text.index(SECTION):]
    section = section[:section.index("\n## ", len(SECTION))]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    block = next(b for b in blocks if b.startswith(f"# {which}\n"))
    return commands(block)


def running_gateway() -> Cluster:
    """gpu-gateway as it runs before the move: the HPA holds SERVING Ready pods of the Deployment."""
    cluster = Cluster()
    cluster.log.append("kubectl apply -k k8s/overlays/gpu-gateway (running)")
    cluster.apply(render_fresh("overlays/gpu-gateway"))
    cluster.scale("Deployment", SERVING)
    for pod in cluster.pods:
        pod.ready = True
    cluster.problems.clear()
    cluster.baseline = SERVING
    return cluster


def test_the_documented_move_onto_the_canary_overlay_drops_nothing():
    cluster = running_gateway()
    for command in documented("into the canary overlay"):
        run(cluster, command, render_fresh)
    assert cluster.problems == []
    # where it ends: the canary overlay as designed, the Deployment's pods gone
    assert cluster.route_backends() == {"triton-stable": 100}
    assert cluster.objects[("HorizontalPodAutoscaler", "triton")]["spec"]["scaleTargetRef"]["kind"] == "Rollout"
    assert cluster.replicas["Deployment"] == 0 and cluster.ready("Rollout") == SERVING
    assert cluster.selectors["triton-stable"].get("rollouts-pod-template-hash")
    assert cluster.most_pods == 2 * SERVING  # the GPU headroom k8s/README.md states: one more pod per serving pod


def test_the_documented_way_back_drops_nothing():
    cluster = running_gateway()
    for command in documented("into the canary overlay"):
        run(cluster, command, render_fresh)
    cluster.most_pods = 0
    for command in documented("back to gpu-gateway"):
        run(cluster, command, render_fresh)
    assert cluster.problems == []
    assert cluster.rollout() is None and cluster.route_backends() == {"triton-grpc": 1}
    assert cluster.objects[("HorizontalPodAutoscaler", "triton")]["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    assert cluster.ready("Deployment") == SERVING and not cluster.hpa_disabled
    assert cluster.most_pods == 2 * SERVING


def progressively(objects: list[dict]) -> list[dict]:  # the canary overlay as it was: scaleDown progressively
    for o in objects:
        if o["kind"] == "Rollout":
            o["spec"]["workloadRef"]["scaleDown"] = "progressively"
    return objects


@pytest.mark.parametrize("moved_in, shortcut, found", [
    # one apply: the Deployment goes to 0 once the Rollout's pods (the HPA's minimum) are Ready
    (False, ["kubectl apply -k k8s/overlays/gpu-canary", "kubectl argo rollouts status triton -n histoserve"], "fewer than the 4"),
    # the overlay as it was before: the Deployment is scaled to 1 - 0 the moment the Rollout appears
    (False, ["kubectl apply -k k8s/overlays/gpu-canary-progressively"], "fewer than the 4"),
    # back in one apply: the Deployment stays at Argo's 0 and its HPA cannot scale it up
    (True, ["kubectl apply -k k8s/overlays/gpu-gateway",
            "kubectl -n histoserve delete rollout/triton service/triton-stable service/triton-canary"], "has no Ready pod"),
])
def test_shortcuts_are_caught(moved_in, shortcut, found):
    cluster = running_gateway()
    if moved_in:
        for command in documented("into the canary overlay"):
            run(cluster, command, render_fresh)
        assert cluster.problems == []

    def render_with_the_old_rollout(kustomization: str) -> list[dict]:
        if kustomization == "overlays/gpu-canary-progressively":
            return progressively(render_fresh("overlays/gpu-canary"))
        return render_fresh(kustomization)

    for command in shortcut:
        run(cluster, command, render_with_the_old_rollout)
    assert any(found in problem for problem in cluster.problems), cluster.problems


def test_the_model_refuses_a_command_it_does_not_know():
    with pytest.raises(AssertionError, match="does not know"):
        run(running_gateway(), "kubectl -n histoserve rollout restart deploy/triton", render_fresh)
