"""A Node.js service calling the encoded model (client/node: Triton's own protos and @grpc/grpc-js,
nothing of ours on its side) gets exactly the Python client's answers, file for file."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.conftest import MODEL, ROOT, run_cli
from tests.odd_images import write_odd_images

NODE_CLIENT = ROOT / "client" / "node"


@pytest.fixture(scope="module")
def node() -> str:
    executable = shutil.which("node")
    assert executable, "Node.js is not installed"
    assert (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir(), \
        "client/node has no node_modules: `make test` runs `npm ci --prefix client/node`"
    return executable


@pytest.fixture(scope="module")
def server(encoded_repository):
    """Triton with the digits model and its encoded twin."""
    from histoserve.serve.server import TritonServer, free_ports

    with TritonServer(encoded_repository, free_ports()) as running:
        yield running


def node_classify(node, url, model, files, top_k=3) -> subprocess.CompletedProcess:
    return subprocess.run([node, str(NODE_CLIENT / "classify.js"), "--url", url, "--model", model, "--top-k", str(top_k),
                           *map(str, files)], capture_output=True, text=True, timeout=300)


def lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_the_node_client_gets_the_python_client_s_answers_for_every_file(node, server, test_files, tmp_path):
    files = [*test_files, *write_odd_images(tmp_path / "odd").values()]
    from_node = node_classify(node, server.grpc_url, f"{MODEL}-encoded", files)
    from_python = run_cli("-m", "client", "classify", *files, "--url", server.grpc_url, "--model", MODEL, "--top-k", 3, "--json")
    assert from_node.returncode == 0, from_node.stderr
    assert [row["path"] for row in lines(from_node.stdout)] == [str(f) for f in files]  # in input order
    assert lines(from_node.stdout) == lines(from_python.stdout)  # labels, indices and scores, exactly


def test_a_bad_file_gets_its_error_line_and_the_others_their_answers(node, server, test_files, tmp_path):
    broken = tmp_path / "scan.png"
    broken.write_bytes(test_files[0].read_bytes()[:40])
    files = [test_files[0], broken, tmp_path / "missing.png", test_files[1]]
    result = node_classify(node, server.grpc_url, f"{MODEL}-encoded", files, top_k=1)
    rows = lines(result.stdout)
    assert result.returncode == 1
    assert [bool(row["predictions"]) for row in rows] == [True, False, False, True]
    assert "image_file[0]" in rows[1]["error"] and str(broken) in rows[1]["error"]
    assert "cannot read (ENOENT)" in rows[2]["error"]


def test_the_node_client_refuses_the_pixel_model_and_a_missing_one(node, server, test_files):
    pixel = node_classify(node, server.grpc_url, MODEL, test_files[:1])
    assert pixel.returncode == 2 and "does not take image files" in pixel.stderr
    missing = node_classify(node, server.grpc_url, "no-such-model-encoded", test_files[:1])
    assert missing.returncode == 2 and "cannot use no-such-model-encoded" in missing.stderr


def test_the_node_client_exports_what_it_got_over_otlp_as_the_python_client_does(node, server, test_files, tmp_path):
    """OpenTelemetry's standard variables only: the same instruments, units and attributes as the Python
    client's (histoserve.client.telemetry), one call per request, the failed batch's status counted too."""
    import os

    from tests.otlp_receiver import OtlpReceiver, value

    broken = tmp_path / "scan.png"
    broken.write_bytes(test_files[0].read_bytes()[:40])
    files = [*test_files[:3], broken]  # the batch fails (INVALID_ARGUMENT), then each file is sent alone
    with OtlpReceiver() as receiver:
        environment = {**os.environ, "OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                       "OTEL_SERVICE_NAME": "node-caller"}
        result = subprocess.run([node, str(NODE_CLIENT / "classify.js"), "--url", server.grpc_url, "--model", f"{MODEL}-encoded",
                                 *map(str, files)], capture_output=True, text=True, timeout=300, env=environment)
        assert result.returncode == 1, result.stderr
        calls = {(a["model"], a["version"], a["grpc_code"]): value(p) for a, p, _ in receiver.points("histoserve.client.calls")}
        attempts = {(a["model"], a["version"], a["grpc_code"]): value(p) for a, p, _ in receiver.points("histoserve.client.attempts")}
        durations = list(receiver.points("histoserve.client.call.duration"))
        resources = {(r.get("service.name"), len(r.get("service.instance.id", ""))) for _, _, r in durations}
        quiet = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        before = len(receiver.metrics)
        subprocess.run([node, str(NODE_CLIENT / "classify.js"), "--url", server.grpc_url, "--model", f"{MODEL}-encoded",
                        str(test_files[0])], capture_output=True, text=True, timeout=300,
                       env={**quiet, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint})
        assert len(receiver.metrics) == before  # no exporter named: nothing sent
    model = f"{MODEL}-encoded"
    assert calls == attempts == {(model, "", "INVALID_ARGUMENT"): 2, (model, "1", "OK"): 3}
    assert sum(p.count for _, p, _ in durations) == 5 and 0.5 in list(durations[0][1].explicit_bounds)
    assert resources == {("node-caller", 36)}  # and a service.instance.id of its own
