"""The canary overlay's AnalysisRun, judged as Argo Rollouts judges it (tests/k8s/argo_analysis.py), over
minutes of recorded series that no local server can produce, evaluated by a real Prometheus at each
measurement's moment:

- the edge: Envoy Gateway v1.9's per-backend grpc_stats counters for the GRPCRoute's canary backend
  (cluster grpcroute/histoserve/triton/rule/0/backend/1; components/gateway-grpc/edge-metrics.yaml has
  the shape), a `_failure` counter that exists only from the first failure, as Envoy creates it;
- Triton 26.x's latency histogram (nv_inference_first_response_histogram_ms, the buckets export
  writes) per pod, labelled with the pod-template hash as the ServiceMonitor labels it, and Triton's
  own success and failure counters, which never see a request refused at the door;
- the drift monitor's gauges for the canary's version.

Each scenario is a minute-by-minute story of the canary's traffic; the stable pods serve 1800 calls a
minute in 8 ms throughout. Measurement k (one a minute after the step's 10-minute pause) sees minute
PAUSE + k - 1."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from histoserve.export.publish import LATENCY_BUCKETS_MS
from tests.k8s import argo_analysis
from tests.k8s.manifests import render
from tests.k8s.recorded_prometheus import STEP_S, RecordedPrometheus, Recording
from tests.k8s.test_canary_analysis import OVERLAY, resolved_metrics

NAMESPACE, MODEL = "histoserve", "digits"
STABLE_HASH, CANARY_HASH, CANARY_VERSION = "5d8f9c7b6", "7c4b8f9d5", 2
CANARY_CLUSTER = f"grpcroute/{NAMESPACE}/triton/rule/0/backend/1"
STABLE_CLUSTER = f"grpcroute/{NAMESPACE}/triton/rule/0/backend/0"
PAUSE, MINUTES = 10, 24
BUCKETS = [*map(str, LATENCY_BUCKETS_MS), "+Inf"]


@dataclass(frozen=True)
class Minute:
    """One minute of calls on one side (canary or stable)."""

    calls: int                      # ModelInfer calls through the gateway
    refused: float = 0.0            # the fraction refused at Triton's door (UNAVAILABLE): never reaches its counters
    failed: float = 0.0             # the fraction callers got wrong themselves (INVALID_ARGUMENT): refused at the door too
    latency_ms: int = 8
    slow_fraction: float = 0.0      # ... and this fraction takes slow_ms instead
    slow_ms: int = 800
    triton_only: int = 0            # requests Triton answers that never crossed the gateway (warm-up, golden gate)


def measurement_minute(k: int) -> int:
    return PAUSE + k - 1


def spike_at(*measurements: int) -> Callable[[int], Minute]:
    minutes = {measurement_minute(k) for k in measurements}
    return lambda m: Minute(200, slow_fraction=0.05) if m in minutes else Minute(200)


def refusing_at(*measurements: int) -> Callable[[int], Minute]:
    minutes = {measurement_minute(k) for k in measurements}
    return lambda m: Minute(200, refused=0.05) if m in minutes else Minute(200)


@dataclass
class Scenario:
    canary: Callable[[int], Minute]
    phase: str                                   # the AnalysisRun's
    metrics: dict[str, str] = field(default_factory=dict)  # metric -> phase, where it matters
    stable: Callable[[int], Minute] = lambda m: Minute(1800)
    stable_buckets: tuple[str, ...] = tuple(BUCKETS)  # the stable version's config.pbtxt's


SCENARIOS = {
    "good": Scenario(lambda m: Minute(200), "Successful",
                     {"error-ratio": "Successful", "latency-p99": "Successful", "latency-p99-against-stable": "Successful"}),
    # one minute in which 5 % of the canary's calls take 800 ms: one failed measurement, then three good
    "one latency spike": Scenario(spike_at(1), "Successful", {"latency-p99": "Successful", "latency-p99-against-stable": "Successful"}),
    "two latency spikes": Scenario(spike_at(1, 3), "Failed", {"latency-p99": "Failed"}),
    # 5 % of calls refused before Triton's scheduler (a full queue): Triton counts none of them
    "door refusals": Scenario(lambda m: Minute(200, refused=0.05), "Failed", {"error-ratio": "Failed"}),
    "door refusals now and then": Scenario(refusing_at(0, 2), "Failed", {"error-ratio": "Failed"}),
    "one refusing minute": Scenario(refusing_at(1), "Successful", {"error-ratio": "Successful"}),
    # a caller sends malformed tensors: 3 % of calls fail on both backends alike; not the canary's doing
    "a noisy caller": Scenario(lambda m: Minute(200, failed=0.03), "Successful", {"error-ratio": "Successful"},
                               stable=lambda m: Minute(1800, failed=0.03)),
    # ... and the canary refuses 5 % more on top of it
    "a noisy caller and door refusals": Scenario(lambda m: Minute(200, refused=0.05, failed=0.03), "Failed", {"error-ratio": "Failed"},
                                                 stable=lambda m: Minute(1800, failed=0.03)),
    # 20 calls a minute reach the canary: below min-requests, nothing can be concluded
    "too little traffic": Scenario(lambda m: Minute(20), "Inconclusive",
                                   {"error-ratio": "Inconclusive", "latency-p99": "Inconclusive"}),
    # no caller traffic at all, but Triton answers its golden gate and warm-up: still no data
    "only the golden gate": Scenario(lambda m: Minute(0, triton_only=12), "Inconclusive",
                                     {"error-ratio": "Inconclusive", "latency-p99": "Inconclusive"}),
    # the stable version was published before export wrote latency buckets (Triton's defaults): the
    # comparison has nothing comparable, and pauses for a person
    "stable with Triton's default buckets": Scenario(lambda m: Minute(200), "Inconclusive",
                                                     {"latency-p99": "Successful", "latency-p99-against-stable": "Inconclusive"},
                                                     stable_buckets=("100", "500", "2000", "5000", "+Inf")),
    # 300 ms: under the absolute 500 ms, but far slower than the stable pods
    "slow": Scenario(lambda m: Minute(200, latency_ms=300), "Failed",
                     {"latency-p99": "Successful", "latency-p99-against-stable": "Failed"}),
}


class Counters:
    """Cumulative counters of one scrape target, written every STEP_S into a Recording."""

    def __init__(self):
        self.values: dict[tuple[str, tuple], float] = {}

    def inc(self, name: str, labels: dict[str, str], amount: float) -> None:
        key = (name, tuple(sorted(labels.items())))
        self.values[key] = self.values.get(key, 0.0) + amount

    def write(self, recording: Recording, t: int) -> None:
        for (name, labels), value in self.values.items():
            recording.add(name, dict(labels), t, value)


def record_side(counters: Counters, minute: Minute, cluster: str, pod_hash: str, version: str, pods: list[str],
                buckets: tuple[str, ...] = tuple(BUCKETS)) -> None:
    """One scrape interval's share of `minute` on the edge cluster and the side's Triton pods."""
    share = STEP_S / 60
    calls = minute.calls * share
    refused, failed = calls * minute.refused, calls * minute.failed
    if calls:
        edge = {"envoy_cluster_name": cluster, "envoy_grpc_bridge_service": "inference",
                "envoy_grpc_bridge_method": "GRPCInferenceService", "namespace": "envoy-gateway-system"}
        counters.inc("envoy_cluster_grpc_ModelInfer_total", edge, calls)
        counters.inc("envoy_cluster_grpc_ModelInfer_success", edge, calls - refused - failed)
        counters.inc("envoy_cluster_grpc_ModelInfer_0", edge, calls - refused - failed)
        for code, count in (("14", refused), ("3", failed)):  # UNAVAILABLE, INVALID_ARGUMENT
            if count:
                counters.inc("envoy_cluster_grpc_ModelInfer_failure", edge, count)
                counters.inc(f"envoy_cluster_grpc_ModelInfer_{code}", edge, count)
    served = calls - refused - failed + minute.triton_only * share
    for pod in pods:
        labels = {"namespace": NAMESPACE, "pod": pod, "model": MODEL, "version": version, "rollouts_pod_template_hash": pod_hash}
        per_pod = served / len(pods)
        counters.inc("nv_inference_request_success", labels, per_pod)
        counters.inc("nv_inference_request_failure", {**labels, "reason": "REJECTED"}, 0)
        slow = per_pod * minute.slow_fraction
        for bound in buckets:
            limit = float("inf") if bound == "+Inf" else float(bound)
            inside = (per_pod - slow) * (minute.latency_ms <= limit) + slow * (minute.slow_ms <= limit)
            counters.inc("nv_inference_first_response_histogram_ms_bucket", {**labels, "le": bound}, inside)
        counters.inc("nv_inference_first_response_histogram_ms_count", labels, per_pod)


def recording_of(scenario: Scenario, start: int) -> Recording:
    recording, counters = Recording(start), Counters()
    for minute in range(MINUTES):
        for step in range(60 // STEP_S):
            t = minute * 60 + (step + 1) * STEP_S
            record_side(counters, scenario.stable(minute), STABLE_CLUSTER, STABLE_HASH, "1", ["triton-stable-a", "triton-stable-b"],
                        scenario.stable_buckets)
            record_side(counters, scenario.canary(minute), CANARY_CLUSTER, CANARY_HASH, str(CANARY_VERSION), ["triton-canary-a"])
            counters.write(recording, t)
            for version in ("1", str(CANARY_VERSION)):
                monitor = {"namespace": NAMESPACE, "pod": "histoserve-monitor", "model": MODEL, "version": version}
                recording.add("histoserve_prediction_drift", monitor, t, 0)
                recording.add("histoserve_estimated_accuracy", monitor, t, 0.95)
                recording.add("histoserve_baseline_expected_accuracy", monitor, t, 0.955)
    return recording


@pytest.fixture(scope="module")
def objects():
    return render(OVERLAY)


@pytest.mark.parametrize("name", SCENARIOS)
def test_the_analysis_run_ends_as_a_person_would_want(name, objects, tmp_path):
    scenario = SCENARIOS[name]
    start = (int(time.time()) // 60 - MINUTES - 30) * 60  # recent enough for Prometheus' retention
    with RecordedPrometheus(recording_of(scenario, start), tmp_path) as prometheus:
        metrics = resolved_metrics(objects, CANARY_VERSION, CANARY_HASH, STABLE_HASH, prometheus.address, NAMESPACE)

        def at_measurement(query: str, k: int) -> list[float]:
            return argo_analysis.prometheus_query(prometheus.address, query, at=start + (PAUSE + k) * 60 + 5)

        phase, outcomes = argo_analysis.run_analysis(metrics, at_measurement)
        summary = {m: (o.phase, [(p, r[:1]) for p, r in o.measurements]) for m, o in outcomes.items()}
        assert phase == scenario.phase, summary
        for metric, expected in scenario.metrics.items():
            assert outcomes[metric].phase == expected, (metric, summary[metric])
        if name == "door refusals":  # Triton's own error ratio, as the analysis read it before: a clean 0
            canary = f'rollouts_pod_template_hash="{CANARY_HASH}"'
            triton_ratio = (f"sum(rate(nv_inference_request_failure{{{canary}}}[1m]))"
                            f" / sum(rate(nv_inference_request_success{{{canary}}}[1m]))")
            assert argo_analysis.prometheus_query(prometheus.address, triton_ratio, at=start + (PAUSE + 1) * 60 + 5) == [0.0]
        if name == "good":  # three good measurements in a row are enough: no metric waits for its count
            assert all(len(o.measurements) == 3 for o in outcomes.values()), summary
