"""Where the time goes, from Triton itself: its statistics extension (queue, compute input / infer /
output, executions) and its Prometheus `nv_inference_*` metrics, read before and after a load step
and turned into per-request figures for that step. Statistics are an admin API: the calls carry the
admin key (formats/admin.py); without it Triton refuses them (StatisticsRefused)."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass

import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from histoserve.formats.admin import REFUSED_HINT, AdminKey, headers, refused
from histoserve.formats.options import ClientTls

STAGES = ("queue", "compute_input", "compute_infer", "compute_output")
# Counters that add up over a step; their labels name the model and version.
METRIC_COUNTERS = ("nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
                   "nv_inference_exec_count", "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
                   "nv_inference_compute_input_duration_us", "nv_inference_compute_infer_duration_us",
                   "nv_inference_compute_output_duration_us")


class StatisticsRefused(RuntimeError):
    """Triton refused its statistics API: no admin key, or a wrong one."""


@dataclass(frozen=True)
class TritonSnapshot:
    """Cumulative counters of one model (every version) at one moment."""

    requests: int
    executions: int
    inferences: int
    stage_ns: dict[str, int]
    metrics: dict[str, float]

    def since(self, before: TritonSnapshot) -> dict:
        """Per-request figures for what happened between `before` and this snapshot."""
        requests = self.requests - before.requests
        executions = self.executions - before.executions
        result = {
            "requests": requests,
            "executions": executions,
            "average_batch": (self.inferences - before.inferences) / executions if executions else None,
        }
        for stage in STAGES:
            spent = self.stage_ns[stage] - before.stage_ns[stage]
            result[f"{stage}_ms_per_request"] = spent / requests / 1e6 if requests else None
        result["metrics"] = {name: self.metrics[name] - before.metrics.get(name, 0.0)
                             for name in self.metrics if name in METRIC_COUNTERS}
        result["metrics"].update({name: value for name, value in self.metrics.items() if name not in METRIC_COUNTERS})
        return result


def snapshot(url: str, model: str, metrics_url: str | None = None, timeout_s: float = 10.0,
             tls: ClientTls | None = None, admin_key: AdminKey | None = None) -> TritonSnapshot:
    """The model's statistics over gRPC (over TLS with `tls`, with the admin key) and, when
    `metrics_url` is given, its nv_inference_* metrics (an unreachable metrics endpoint gives no
    metrics rather than an error: they are extra)."""
    with grpcclient.InferenceServerClient(url, **(tls.client_arguments() if tls else {})) as client:
        try:
            stats = client.get_inference_statistics(model, headers=headers(admin_key), as_json=True,
                                                    client_timeout=timeout_s).get("model_stats", [])
        except InferenceServerException as error:
            if refused(error.message()):
                raise StatisticsRefused(f"{url} refused its statistics: {REFUSED_HINT}") from None
            raise
    requests = executions = inferences = 0
    stage_ns = dict.fromkeys(STAGES, 0)
    for entry in stats:
        inference = entry.get("inference_stats", {})
        requests += int(inference.get("success", {}).get("count", 0))
        executions += int(entry.get("execution_count", 0))
        inferences += int(entry.get("inference_count", 0))
        for stage in STAGES:
            stage_ns[stage] += int(inference.get(stage, {}).get("ns", 0))
    return TritonSnapshot(requests, executions, inferences, stage_ns, model_metrics(metrics_url, model) if metrics_url else {})


def model_metrics(metrics_url: str, model: str, timeout_s: float = 10.0) -> dict[str, float]:
    """Every nv_inference_* sample of `model`, summed over versions (counters and gauges such as
    nv_inference_pending_request_count)."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=timeout_s) as response:
            text = response.read().decode()
    except OSError:
        return {}
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("nv_inference_") and sample.labels.get("model") == model:
                name = sample.name.removesuffix("_total")
                values[name] = values.get(name, 0.0) + sample.value
    return values
