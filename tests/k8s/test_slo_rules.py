"""The caller-side SLO rules (scripts/slo_rules.py writes them; components gateway-grpc and monitoring
carry them), tested with promtool on the rendered PrometheusRules: error budgets that burn fast (a
page within minutes), slowly (a ticket after many hours, never a page) and not at all, for both
SLOs (availability, latency) and both sources (the gateway's Envoy counters, the client libraries'
OpenTelemetry metrics as Prometheus names them). Alerts are read from Prometheus' own ALERTS series."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest
import yaml

from tests.k8s.manifests import ROOT, render
from tests.k8s.test_monitoring import PROMTOOL, require

ALERTS = {"availability": "Histoserve{}AvailabilityBudgetBurn", "latency": "Histoserve{}LatencyBudgetBurn"}


@dataclass(frozen=True)
class Source:
    name: str
    overlay: str
    rule: str
    key: dict                      # the label an alert is per
    calls: list[tuple[str, dict]]  # (metric, labels) pairs that each count every call, summed
    failed: tuple[str, dict]       # counts failed calls
    fast: list[tuple[str, dict]]   # count calls within 500 ms, one series per entry of `calls`
    timed: list[tuple[str, dict]]  # count every call the latency histogram saw, likewise


def edge(cluster: str) -> dict:
    return {"envoy_cluster_name": cluster, "envoy_grpc_bridge_service": "inference", "envoy_grpc_bridge_method": "GRPCInferenceService",
            "namespace": "envoy-gateway-system"}


STABLE, CANARY = "grpcroute/histoserve/triton/rule/0/backend/0", "grpcroute/histoserve/triton/rule/0/backend/1"
SOURCES = {
    # Envoy writes le="500"; Prometheus 3 stores it as le="500.0": one cluster each way
    "edge": Source("edge", "overlays/gpu-canary", "triton-gateway-slo", {"route": "histoserve/triton", "namespace": "histoserve"},
                   calls=[("envoy_cluster_grpc_ModelInfer_total", edge(STABLE)), ("envoy_cluster_grpc_ModelInfer_total", edge(CANARY))],
                   failed=("envoy_cluster_grpc_ModelInfer_failure", edge(STABLE)),
                   fast=[("envoy_cluster_upstream_rq_time_bucket", {**edge(STABLE), "le": "500.0"}),
                         ("envoy_cluster_upstream_rq_time_bucket", {**edge(CANARY), "le": "500"})],
                   timed=[("envoy_cluster_upstream_rq_time_count", edge(STABLE)), ("envoy_cluster_upstream_rq_time_count", edge(CANARY))]),
    "client": Source("client", "overlays/gpu", "histoserve-client-slo", {"model": "digits"},
                     calls=[("histoserve_client_calls_total", {"model": "digits", "version": "3", "grpc_code": "OK", "job": "clinic-api"})],
                     failed=("histoserve_client_calls_total", {"model": "digits", "version": "", "grpc_code": "UNAVAILABLE",
                                                               "job": "clinic-api"}),
                     fast=[("histoserve_client_call_duration_seconds_bucket", {"model": "digits", "version": "3", "grpc_code": "OK",
                                                                                "le": "0.5", "job": "clinic-api"})],
                     timed=[("histoserve_client_call_duration_seconds_count", {"model": "digits", "version": "3", "grpc_code": "OK",
                                                                                "job": "clinic-api"})]),
}


BUDGET = {"availability": 0.001, "latency": 0.01}  # 99.9 % of calls OK, 99 % within 500 ms


@dataclass(frozen=True)
class Burn:
    """Calls per step; from step `start`, a fraction of them fails (or is slow): `fraction` itself, or
    `times_budget` times the SLO's error budget."""

    step: str        # promtool's interval
    steps: int
    start: int
    checks: tuple[tuple[str, set[str]], ...]  # (eval time, the severities firing then)
    fraction: float = 0.0
    times_budget: float = 0.0

    def bad(self, slo: str) -> float:
        return self.fraction or self.times_budget * BUDGET[slo]


BURNS = {
    # an outage from minute 30: half the calls fail (or are slow); a page within minutes
    "fast": Burn("1m", 120, 30, (("29m", set()), ("45m", {"critical", "warning"}), ("119m", {"critical", "warning"})), fraction=0.5),
    # 5 × the budget after 4 good hours: a ticket once the 3 d ratio passes 1 × (after about 1 h), never a page
    "slow": Burn("150s", 288, 96, (("4h30m", set()), ("6h", {"warning"}), ("11h50m", {"warning"})), times_budget=5),
    # half the budget, for 12 hours: nothing
    "none": Burn("150s", 288, 0, (("4h", set()), ("8h", set()), ("11h50m", set())), times_budget=0.5),
}
CALLS_PER_STEP = {"1m": 600, "150s": 1500}


def counter(per_step: float, steps: int, start: int = 0) -> str:
    return " ".join(f"{max(0, i - start) * per_step:g}" for i in range(steps + 1))


def series(name: str, labels: dict, values: str) -> dict:
    label_text = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{label_text}}}", "values": values}


def input_series(source: Source, slo: str, burn: Burn) -> list[dict]:
    calls = CALLS_PER_STEP[burn.step]
    bad = calls * burn.bad(slo)
    out = []
    # calls split over the sources' series (two Envoy clusters); the bad ones on the first
    share = calls / len(source.calls)
    for name, labels in source.calls:
        out.append(series(name, labels, counter(share, burn.steps)))
    if slo == "availability":
        out.append(series(*source.failed, counter(bad, burn.steps, burn.start)))
    shares = len(source.timed)
    for (fast, fast_labels), (timed, timed_labels) in zip(source.fast, source.timed, strict=True):
        slow = bad / shares if slo == "latency" else 0
        out.append(series(fast, fast_labels, " ".join(f"{i * calls / shares - max(0, i - burn.start) * slow:g}"
                                                       for i in range(burn.steps + 1))))
        out.append(series(timed, timed_labels, counter(calls / shares, burn.steps)))
    return out


def test_rules_are_what_the_generator_writes():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "slo_rules.py"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("slo", ["availability", "latency"])
@pytest.mark.parametrize("burn", BURNS)
def test_budget_burns_page_ticket_or_stay_quiet(source, slo, burn, tmp_path):
    source, case = SOURCES[source], BURNS[burn]
    rule = next(o for o in render(source.overlay) if o["kind"] == "PrometheusRule" and o["metadata"]["name"] == source.rule)
    (tmp_path / "slo.rules.yaml").write_text(yaml.safe_dump(rule["spec"]))
    alert = ALERTS[slo].format(source.name.capitalize())
    checks = []
    for at, severities in case.checks:
        checks.append({"expr": f'ALERTS{{alertname="{alert}", alertstate="firing"}}', "eval_time": at,
                       "exp_samples": [{"labels": "ALERTS" + "{" + ", ".join(
                           f'{k}="{v}"' for k, v in sorted({"alertname": alert, "alertstate": "firing", "severity": severity,
                                                            "slo": slo, "source": source.name, **source.key}.items())) + "}",
                                        "value": 1} for severity in sorted(severities)]})
    tests = [{"interval": case.step, "input_series": input_series(source, slo, case), "promql_expr_test": checks}]
    (tmp_path / "slo-test.yaml").write_text(yaml.safe_dump({"rule_files": ["slo.rules.yaml"], "evaluation_interval": case.step,
                                                            "tests": tests}))
    result = subprocess.run([require(PROMTOOL, "promtool"), "test", "rules", "slo-test.yaml"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_a_wrong_expectation_fails(tmp_path):
    """promtool here does fail when the alerts differ from the expectation (so the tests above can)."""
    source, case = SOURCES["edge"], BURNS["none"]
    rule = next(o for o in render(source.overlay) if o["kind"] == "PrometheusRule" and o["metadata"]["name"] == source.rule)
    (tmp_path / "slo.rules.yaml").write_text(yaml.safe_dump(rule["spec"]))
    alert = ALERTS["availability"].format("Edge")
    test = {"interval": case.step, "input_series": input_series(source, "availability", case),
            "promql_expr_test": [{"expr": f'ALERTS{{alertname="{alert}"}}', "eval_time": "8h",
                                  "exp_samples": [{"labels": f'ALERTS{{alertname="{alert}"}}', "value": 1}]}]}
    (tmp_path / "slo-test.yaml").write_text(yaml.safe_dump({"rule_files": ["slo.rules.yaml"], "evaluation_interval": case.step,
                                                            "tests": [test]}))
    result = subprocess.run([require(PROMTOOL, "promtool"), "test", "rules", "slo-test.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0
