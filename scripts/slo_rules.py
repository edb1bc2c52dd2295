"""Writes the caller-side SLO rules: recording rules for the error and slow-call ratios over the windows
the alerts need, and multi-window, multi-burn-rate alerts (Google's SRE workbook, "Alerting on SLOs",
the table for a 30-day SLO: page at 14.4x over 1 h and 5 min or 6x over 6 h and 30 min, ticket at 3x
over 1 d and 2 h or 1x over 3 d and 6 h; each long window confirmed by its short one, so an alert
stops soon after the burning does).

Two sources of caller-side numbers, each with its own rules and alerts (their callers do not overlap):
  edge    gRPC calls through the Gateway, counted by its Envoy proxies per route
          (k8s/components/gateway-grpc/slo-rules.yaml)
  client  calls made by the histoserve client libraries (Python, Node.js) through their
          OpenTelemetry metrics, per model: in-cluster callers that never pass the gateway
          (k8s/components/monitoring/slo-rules.yaml)

    python scripts/slo_rules.py            # rewrite both files
    python scripts/slo_rules.py --check    # exit 1 if either differs from what this writes (tests)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

K8S = Path(__file__).resolve().parent.parent / "k8s"
WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
# (severity, burn rate, long window, short window): the SRE workbook's table for a 30-day SLO
BURNS = (("critical", 14.4, "1h", "5m"), ("critical", 6, "6h", "30m"), ("warning", 3, "1d", "2h"), ("warning", 1, "3d", "6h"))
AVAILABILITY_TARGET = 0.999   # of calls end with gRPC status OK
LATENCY_TARGET = 0.99         # of calls answered within LATENCY_THRESHOLD_MS
LATENCY_THRESHOLD_MS = 500    # the p99 limit of the alerts and the canary analysis; a bucket bound at every source


@dataclass(frozen=True)
class Source:
    name: str
    by: str              # the label the SLO is kept per
    errors: str          # PromQL: rate of failed calls over [WINDOW], by `by`
    calls: str           # rate of all calls
    fast: str            # rate of calls within the latency threshold
    timed: str           # rate of all calls the latency histogram saw
    where: str           # who these callers are, for the alert text


def edge_rate(metric: str, extra: str = "") -> str:
    """Summed per route over the route's Envoy clusters, labelled with the route's own namespace (the
    scraped series carry the proxies' namespace, envoy-gateway-system) and `route`, "<namespace>/<name>"."""
    rate = f'rate({metric}{{envoy_cluster_name=~"grpcroute/.+"{extra}}}[WINDOW])'
    named = f'label_replace({rate}, "route", "$1", "envoy_cluster_name", "grpcroute/([^/]+/[^/]+)/.*")'
    return f'sum by (namespace, route) (label_replace({named}, "namespace", "$1", "envoy_cluster_name", "grpcroute/([^/]+)/.*"))'


# Prometheus 3 stores a classic histogram's `le` as a float ("500.0"); 2.x keeps what the target wrote
# ("500", as Envoy writes it): match both.
EDGE_LE = f'le=~"{LATENCY_THRESHOLD_MS}(\\\\.0)?"'


EDGE = Source(
    name="edge",
    by="route",
    # Envoy Gateway's grpc_stats filter, per Envoy cluster (one per backend of the GRPCRoute): Envoy's tag
    # extraction reads "inference.GRPCInferenceService" as service "inference" and method
    # "GRPCInferenceService", leaving the method name in the metric's (Envoy issue #29735).
    errors=edge_rate("envoy_cluster_grpc_ModelInfer_failure"),
    calls=edge_rate("envoy_cluster_grpc_ModelInfer_total"),
    fast=edge_rate("envoy_cluster_upstream_rq_time_bucket", f", {EDGE_LE}"),
    timed=edge_rate("envoy_cluster_upstream_rq_time_count"),
    where="through the gateway",
)
CLIENT = Source(
    name="client",
    by="model",
    errors='sum by (model) (rate(histoserve_client_calls_total{grpc_code!="OK"}[WINDOW]))',
    calls="sum by (model) (rate(histoserve_client_calls_total[WINDOW]))",
    fast=f'sum by (model) (rate(histoserve_client_call_duration_seconds_bucket{{le="{LATENCY_THRESHOLD_MS / 1000:g}"}}[WINDOW]))',
    timed="sum by (model) (rate(histoserve_client_call_duration_seconds_count[WINDOW]))",
    where="made by the histoserve client libraries",
)


def over(query: str, window: str) -> str:
    return query.replace("[WINDOW]", f"[{window}]")


def record(source: Source, sli: str, window: str) -> str:
    return f"histoserve:{source.name}_call_{sli}:ratio_rate{window}"


def rules(source: Source) -> dict:
    recording = []
    for window in WINDOWS:
        recording.append({"record": record(source, "errors", window),
                          "expr": f"{over(source.errors, window)}\n  / {over(source.calls, window)}\n"})
        recording.append({"record": record(source, "slow", window),
                          "expr": f"1 - {over(source.fast, window)}\n  / {over(source.timed, window)}\n"})
    alerts = []
    for sli, target, what in (("errors", AVAILABILITY_TARGET, "availability"), ("slow", LATENCY_TARGET, "latency")):
        budget = round(1 - target, 6)
        alert = f"Histoserve{source.name.capitalize()}{what.capitalize()}BudgetBurn"
        for severity in ("critical", "warning"):
            pairs = [(burn, long, short) for s, burn, long, short in BURNS if s == severity]
            expr = "\n or\n".join(f"(\n  {record(source, sli, long)} > ({burn:g} * {budget:g})\n"
                                    f"  and {record(source, sli, short)} > ({burn:g} * {budget:g})\n)"
                                    for burn, long, short in pairs)
            objective = (f"{target:.1%} of calls end OK" if sli == "errors"
                         else f"{target:.0%} of calls answered within {LATENCY_THRESHOLD_MS} ms")
            windows = " or ".join(f"{burn:g}x over {long} and {short}" for burn, long, short in pairs)
            alerts.append({
                "alert": alert,
                "expr": expr + "\n",
                "labels": {"severity": severity, "slo": what, "source": source.name},
                "annotations": {
                    "summary": f"Calls {source.where} burn the {what} error budget of {{{{ $labels.{source.by} }}}}",
                    "description": (f"SLO: {objective} over 30 days, for calls {source.where}. The error budget burns "
                                    f"{'fast enough to be spent within days' if severity == 'critical' else 'faster than it may'} "
                                    f"({windows}): {{{{ $value | humanizePercentage }}}} "
                                    f"of calls are {'failing' if sli == 'errors' else 'slower'} over the long window "
                                    f"(docs/kubernetes/observability.md, \"Caller-side SLOs\")."),
                },
            })
    return {"groups": [{"name": f"histoserve-{source.name}-slo.records", "rules": recording},
                       {"name": f"histoserve-{source.name}-slo.alerts", "rules": alerts}]}


class BlockDumper(yaml.SafeDumper):
    """PromQL over several lines as YAML block text (`|`), as a person would write it."""


BlockDumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def prometheus_rule(source: Source, name: str) -> str:
    header = (f"# Generated by scripts/slo_rules.py ({source.name} source): edit that script, not this file.\n"
              f"# Caller-side SLOs for calls {source.where}; unit-tested with promtool\n"
              f"# (tests/k8s/test_slo_rules.py).\n")
    rule = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule", "metadata": {"name": name},
            "spec": rules(source)}
    return header + yaml.dump(rule, Dumper=BlockDumper, sort_keys=False, width=1000)


TARGETS = {
    K8S / "components" / "gateway-grpc" / "slo-rules.yaml": (EDGE, "triton-gateway-slo"),
    K8S / "components" / "monitoring" / "slo-rules.yaml": (CLIENT, "histoserve-client-slo"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    args = parser.parse_args(argv)
    stale = []
    for path, (source, name) in TARGETS.items():
        text = prometheus_rule(source, name)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path)
        else:
            path.write_text(text)
    for path in stale:
        print(f"{path} is not what scripts/slo_rules.py writes: run it", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
