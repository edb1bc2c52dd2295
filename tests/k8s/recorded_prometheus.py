"""A real Prometheus over series written beforehand: samples become TSDB blocks with promtool (`tsdb
create-blocks-from openmetrics`), Prometheus serves them, and queries are asked at chosen moments
(`time=`), so a scenario minutes long is evaluated in seconds, the same way every run.

For series no local server can produce: Triton 26.x's latency histogram (2.51 exports none for these
models), Envoy Gateway's per-backend gRPC counters (no Envoy runs here), kube-state-metrics. Their
shapes are written where they are built, with the source they follow."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path

from histoserve.serve.triton_flags import free_ports
from tests.k8s.test_monitoring import PROMETHEUS, PROMTOOL, require

STEP_S = 15  # the ServiceMonitor's and PodMonitor's scrape interval


def label_text(labels: dict[str, str]) -> str:
    return ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))


class Recording:
    """Samples by series: add(name, labels, t, value); t in seconds since `start`."""

    def __init__(self, start: int):
        self.start = start
        self.samples: dict[tuple[str, str], list[tuple[int, float]]] = {}

    def add(self, name: str, labels: dict[str, str], t: int, value: float) -> None:
        self.samples.setdefault((name, label_text(labels)), []).append((self.start + t, value))

    def openmetrics(self) -> str:
        lines = []
        by_name: dict[str, list] = {}
        for (name, labels), samples in self.samples.items():
            by_name.setdefault(name, []).append((labels, samples))
        for name, series in sorted(by_name.items()):  # a metric family's samples together, untyped
            for labels, samples in series:
                lines += [f"{name}{{{labels}}} {value:.6g} {t}" for t, value in samples]
        return "\n".join(lines) + "\n# EOF\n"


class RecordedPrometheus:
    """`with RecordedPrometheus(recording, tmp_path) as prometheus: prometheus.query(q, at)`."""

    def __init__(self, recording: Recording, folder: Path):
        self.recording, self.folder = recording, Path(folder)
        self.process: subprocess.Popen | None = None
        self.address = ""

    def __enter__(self) -> RecordedPrometheus:
        data = self.folder / "tsdb"
        (self.folder / "series.om").write_text(self.recording.openmetrics())
        built = subprocess.run([require(PROMTOOL, "promtool"), "tsdb", "create-blocks-from", "openmetrics",
                                str(self.folder / "series.om"), str(data)], capture_output=True, text=True)
        assert built.returncode == 0, built.stdout + built.stderr
        (self.folder / "prometheus.yml").write_text("global: {scrape_interval: 15s}\n")
        port = free_ports().http
        self.process = subprocess.Popen(
            [require(PROMETHEUS, "prometheus"), f"--config.file={self.folder / 'prometheus.yml'}", f"--storage.tsdb.path={data}",
             "--storage.tsdb.retention.time=10y", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.address = f"http://127.0.0.1:{port}"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + 30
        while True:
            try:
                with opener.open(f"{self.address}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                assert time.monotonic() < deadline, "Prometheus over the recorded blocks did not become ready"
                time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
