"""The client's call metrics (client/telemetry.py) against the real Triton: what a caller got, per call
and per attempt, through OpenTelemetry's real SDK; exported by `python -m histoserve.client classify` over OTLP to a
real receiver only when the standard variables ask for it; and named, once in Prometheus, as the SLO
rules read them."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import yaml
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from histoserve.client.classifier import InferenceFailed, TritonClassifier
from histoserve.client.telemetry import CallMetrics, TelemetryConfigError, configure_from_environment
from histoserve.formats.repository_layout import config_to_text, read_config
from tests.conftest import MODEL, ROOT, run_cli, started_triton
from tests.otlp_receiver import OtlpReceiver, value


def sums(reader: InMemoryMetricReader, name: str) -> dict[tuple, float]:
    """{(model, version, grpc_code): value} of a counter, or of a histogram's count."""
    found = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    for point in metric.data.data_points:
                        key = (point.attributes["model"], point.attributes["version"], point.attributes["grpc_code"])
                        found[key] = point.value if hasattr(point, "value") else point.count  # a counter's, a histogram's
    return found


@pytest.fixture
def metrics():
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    yield CallMetrics(provider), reader
    provider.shutdown()


def test_calls_attempts_and_durations_count_what_the_caller_got(server, test_files, metrics):
    call_metrics, reader = metrics
    with TritonClassifier(server.grpc_url, MODEL, metrics=call_metrics) as classifier:
        results = list(classifier.classify_files(test_files[:20], batch_size=8))
        assert all(r.ok for r in results)
        wrong = np.zeros((1, 3, classifier.spec.crop_size + 1, classifier.spec.crop_size + 1), np.uint8)  # not the contract's shape
        with pytest.raises(InferenceFailed, match="INVALID_ARGUMENT"):
            classifier.infer(wrong)
    assert sums(reader, "histoserve.client.calls") == {(MODEL, "1", "OK"): 3, (MODEL, "", "INVALID_ARGUMENT"): 1}
    assert sums(reader, "histoserve.client.attempts") == {(MODEL, "", "OK"): 3, (MODEL, "", "INVALID_ARGUMENT"): 1}
    assert sums(reader, "histoserve.client.call.duration") == {(MODEL, "1", "OK"): 3, (MODEL, "", "INVALID_ARGUMENT"): 1}


def test_refusals_that_retries_hid_from_the_caller_show_as_attempts(repository, test_files, tmp_path, metrics):
    """A Triton whose queue holds one request refuses concurrent calls at the door (UNAVAILABLE,
    "Exceeds maximum queue size"); the client retries them within their deadline, so every call ends
    OK for the caller, and the attempts say what it took."""
    call_metrics, reader = metrics
    shutil.copytree(repository / MODEL, tmp_path / MODEL)
    cpu = tmp_path / MODEL / "configs" / "cpu.pbtxt"
    config = read_config(cpu)
    config.dynamic_batching.default_queue_policy.max_queue_size = 1
    os.chmod(cpu, 0o644)
    cpu.write_text(config_to_text(config))
    with started_triton(tmp_path) as refusing, \
            TritonClassifier(refusing.grpc_url, MODEL, metrics=call_metrics) as classifier:
        results = list(classifier.classify_files(test_files[:64] * 2, batch_size=1, concurrency=8))
    assert all(r.ok for r in results)
    calls, attempts = sums(reader, "histoserve.client.calls"), sums(reader, "histoserve.client.attempts")
    assert calls == {(MODEL, "1", "OK"): 128}
    assert attempts[(MODEL, "", "OK")] == 128 and attempts.get((MODEL, "", "UNAVAILABLE"), 0) > 0, attempts


def counter_total(receiver: OtlpReceiver, name: str, code: str = "OK") -> int:
    """The last cumulative value exported for (model, code) of a counter."""
    values = [value(point) for attributes, point, _ in receiver.points(name)
              if attributes.get("model") == MODEL and attributes.get("grpc_code") == code]
    return max(values, default=0)


def test_the_cli_exports_over_otlp_when_asked_and_never_otherwise(server, test_files):
    with OtlpReceiver() as receiver:
        environment = {**os.environ, "OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                       "OTEL_SERVICE_NAME": "clinic-batch", "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test"}
        run_cli("-m", "histoserve.client", "classify", *test_files[:20], "--url", server.grpc_url, "--model", MODEL, "--batch-size", 8,
                env=environment)
        assert counter_total(receiver, "histoserve.client.calls") == 3
        assert counter_total(receiver, "histoserve.client.attempts") == 3
        [(attributes, duration, resource)] = [p for p in receiver.points("histoserve.client.call.duration")]
        assert attributes == {"model": MODEL, "version": "1", "grpc_code": "OK"} and duration.count == 3
        assert 0.5 in list(duration.explicit_bounds)  # the SLO's threshold is a bucket bound
        assert resource["service.name"] == "clinic-batch" and resource["deployment.environment"] == "test"
        assert len(resource["service.instance.id"]) == 36  # each run its own series
        received = len(receiver.metrics)
        quiet = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        for unset in ({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}, {"OTEL_METRICS_EXPORTER": "none"}):
            run_cli("-m", "histoserve.client", "classify", *test_files[:4], "--url", server.grpc_url, "--model", MODEL,
                    env={**quiet, **unset})
        assert len(receiver.metrics) == received  # nothing configured, nothing sent


def test_a_misconfigured_exporter_is_named_before_any_work(server, test_files):
    result = run_cli("-m", "histoserve.client", "classify", test_files[0], "--url", server.grpc_url, "--model", MODEL, check=False,
                     env={**os.environ, "OTEL_METRICS_EXPORTER": "zipkin"})
    assert result.returncode == 2 and "unknown exporter 'zipkin'" in result.stderr
    with pytest.raises(TelemetryConfigError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        configure_from_environment({"OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"})


def test_prometheus_names_are_those_the_slo_rules_read(server, test_files):
    """OpenTelemetry's Prometheus exporter (what a service's /metrics shows) names the instruments as
    k8s/components/monitoring/slo-rules.yaml reads them."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import REGISTRY, generate_latest

    reader = PrometheusMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        with TritonClassifier(server.grpc_url, MODEL, metrics=CallMetrics(provider)) as classifier:
            assert all(r.ok for r in classifier.classify_files(test_files[:4]))
        text = generate_latest(REGISTRY).decode()
    finally:
        provider.shutdown()  # also takes the reader's collector out of the registry
    rules = yaml.safe_load((ROOT / "k8s" / "components" / "monitoring" / "slo-rules.yaml").read_text())
    expressions = " ".join(r["expr"] for g in rules["spec"]["groups"] for r in g["rules"] if "expr" in r)
    for name in ("histoserve_client_calls_total", "histoserve_client_call_duration_seconds_bucket",
                 "histoserve_client_call_duration_seconds_count"):
        assert name in expressions
        assert f"\n{name}{{" in text, (name, text[:2000])
    assert 'grpc_code="OK"' in text and f'model="{MODEL}"' in text and 'le="0.5"' in text
