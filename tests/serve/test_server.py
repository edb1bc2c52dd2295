"""The real tritonserver from nvidia-pytriton, over real gRPC."""

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from histoserve.client.classifier import TritonClassifier
from histoserve.formats.preprocessing import preprocess_file
from histoserve.serve.server import wait_for_readiness
from histoserve.serve.triton_flags import free_ports
from histoserve.train.checkpoint import load_checkpoint
from histoserve.train.model import ServingModel
from tests.conftest import MODEL, ROOT, run_cli


def test_served_predictions_equal_pytorch(server, trained_run, test_files):
    classifier, meta = load_checkpoint(trained_run / "checkpoint.pt")
    files = test_files[::5]
    images = np.stack([preprocess_file(p, meta.preprocess) for p in files])
    with torch.no_grad():
        expected = ServingModel(classifier, meta.temperature).eval()(torch.from_numpy(images)).numpy()
    with TritonClassifier(server.grpc_url, MODEL) as client:
        assert client.spec == meta.preprocess  # the contract came from the server's config
        results = list(client.classify_files(files, top_k=1))
        served = np.concatenate([client.infer_probabilities(images[i:i + 16]) for i in range(0, len(images), 16)])
    assert all(r.ok for r in results)
    assert [r.predictions[0].index for r in results] == expected.argmax(1).tolist()
    assert [r.predictions[0].label for r in results] == [meta.class_names[i] for i in expected.argmax(1)]
    assert np.abs(served - expected).max() <= 1e-4


def model_statistics(server):
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        stats = client.get_inference_statistics(MODEL, headers=server.admin_key.grpc_headers(), as_json=True)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def test_concurrent_single_image_requests_are_batched(server, test_files):
    with TritonClassifier(server.grpc_url, MODEL) as probe:
        image = preprocess_file(test_files[0], probe.spec)[None]
    inferences_before, executions_before = model_statistics(server)
    requests, barrier, errors = 32, threading.Barrier(32), []

    def send():
        with TritonClassifier(server.grpc_url, MODEL) as client:
            barrier.wait()
            try:
                client.infer(image)
            except Exception as error:  # collected and asserted below
                errors.append(error)

    threads = [threading.Thread(target=send) for _ in range(requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    deadline = time.monotonic() + 20  # Triton updates statistics just after it sends each response
    while (inferences_after := model_statistics(server)[0]) - inferences_before < requests and time.monotonic() < deadline:
        time.sleep(0.1)
    inferences_after, executions_after = model_statistics(server)
    assert inferences_after - inferences_before == requests
    assert executions_after - executions_before < requests, "Triton executed every request alone"


def test_health_and_metrics_endpoints_answer(server):
    import urllib.request

    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready"):
        with urllib.request.urlopen(server.http_url + path, timeout=5) as response:
            assert response.status == 200, path
    with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
        metrics = response.read().decode()
    assert f'nv_inference_request_success{{model="{MODEL}",version="1"}}' in metrics
    assert "nv_inference_queue_duration_us" in metrics


def test_serve_refuses_a_taken_port_with_a_clear_message(repository):
    ports = free_ports()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", ports.grpc))
        blocker.listen()
        result = run_cli("-m", "histoserve.serve", "--model-repository", repository, "--http-port", ports.http,
                         "--grpc-port", ports.grpc, "--metrics-port", ports.metrics, check=False, timeout=120)
    assert result.returncode == 1
    assert f"grpc port {ports.grpc} on 127.0.0.1 already in use" in result.stderr


def test_serve_refuses_a_missing_repository(tmp_path):
    result = run_cli("-m", "histoserve.serve", "--model-repository", tmp_path / "nothing", check=False, timeout=120)
    assert result.returncode == 2 and f"argument --model-repository: no such folder: {tmp_path / 'nothing'}" in result.stderr


def descendants_alive(pid):
    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if p.is_running()]
    except psutil.NoSuchProcess:
        return []


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_cli_stops_cleanly(repository, stop_signal):
    ports = free_ports()
    command = [sys.executable, "-m", "histoserve.serve", "--model-repository", str(repository), "--http-port", str(ports.http),
               "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for_readiness(f"http://127.0.0.1:{ports.http}", 120, process), process.stderr.read()
        output = []
        while not any(line.strip().startswith("log") for line in output):  # printed once it is ready
            output.append(process.stdout.readline())
        assert any(line.startswith("ready: models digits") for line in output), "".join(output)
        workdir = Path(next(line.split()[-1] for line in output if line.strip().startswith("log"))).parent
        children = descendants_alive(process.pid)
        shm_regions = list(Path("/dev/shm").glob(f"histoserve_{process.pid}_*"))
        assert children and shm_regions and workdir.is_dir()  # what must be gone afterwards is there now
        # no key given: one made for this run, in an owner-only file of the work folder, printed by path only
        key_file = Path(next(line for line in output if line.strip().startswith("admin")).split(" key in ")[1].split()[0])
        assert key_file.parent == workdir and key_file.stat().st_mode & 0o777 == 0o600
        key = key_file.read_text().strip()
        assert key not in "".join(output) and len(key) >= 32
        with grpcclient.InferenceServerClient(f"127.0.0.1:{ports.grpc}") as client:
            assert client.get_inference_statistics(MODEL, headers={"triton-grpc-protocol-admin-key": key}).model_stats
            with pytest.raises(InferenceServerException, match="restricted"):
                client.get_inference_statistics(MODEL)

        process.send_signal(stop_signal)
        assert process.wait(timeout=60) == 0
        time.sleep(0.5)
        assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        assert not list(Path("/dev/shm").glob(f"histoserve_{process.pid}_*"))
        assert not workdir.exists()
    finally:
        if process.poll() is None:
            process.kill()


def test_stock_http_client_sees_one_uint8_input_and_one_fp32_output(server, test_files):
    """What generic Triton tools (image_client, perf_analyzer) rely on, spoken over HTTP/REST."""
    import tritonclient.http as httpclient

    with TritonClassifier(server.grpc_url, MODEL) as grpc_client:
        image = preprocess_file(test_files[0], grpc_client.spec)[None]
        expected = grpc_client.infer(image, top_k=2)[0]
    client = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
    metadata = client.get_model_metadata(MODEL)
    assert [(i["name"], i["datatype"], i["shape"]) for i in metadata["inputs"]] == [("image", "UINT8", [-1, 3, 32, 32])]
    assert [(o["name"], o["datatype"], o["shape"]) for o in metadata["outputs"]] == [("probabilities", "FP32", [-1, 10])]
    request = httpclient.InferInput("image", list(image.shape), "UINT8")
    request.set_data_from_numpy(image)
    result = client.infer(MODEL, [request], outputs=[httpclient.InferRequestedOutput("probabilities", class_count=2)])
    top = [entry.decode().split(":") for entry in result.as_numpy("probabilities")[0]]
    assert [(int(index), label) for _, index, label in top] == [(p.index, p.label) for p in expected]
    client.close()


@pytest.mark.parametrize("content, message", [
    (None, "admin key file"), ("", "is empty"), ("short", "16 to 256 characters"),
    ("has:a:colon-and-more-than-16", "16 to 256 characters"),
], ids=["missing", "empty", "too short", "a colon"])
def test_serve_refuses_an_unusable_admin_key_before_starting_anything(tmp_path, content, message):
    key_file = tmp_path / "admin-key"
    if content is not None:
        key_file.write_text(content)
    result = run_cli("-m", "histoserve.serve", "--model-repository", tmp_path, "--admin-key-file", key_file, check=False, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr
