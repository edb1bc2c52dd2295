"""Triton's admin APIs behind the key, on the real tritonserver started with the Deployment's own
arguments (tests/k8s/conftest.py): without the key every admin call is refused, over gRPC and (with
HTTP turned back on, the Deployment's own --http-restricted-api then guarding it) over HTTP; with the
key each works; what a classifying caller needs works without one; the key never reaches the log."""

from __future__ import annotations

import multiprocessing.shared_memory
import os
import secrets

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.model_config_pb2 as mc
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from histoserve.client.classifier import TritonClassifier
from histoserve.formats.admin import AdminKey
from histoserve.formats.preprocessing import preprocess_file
from tests.conftest import MODEL, run_cli
from tests.k8s.conftest import start_manifest_server
from tests.k8s.kubelet import grpc_probe

REFUSED_GRPC = "This protocol is restricted, expecting header 'triton-grpc-protocol-admin-key'"
REFUSED_HTTP = "This API is restricted, expecting header 'admin-key'"


@pytest.fixture(scope="module")
def shm_region():
    """A real POSIX shared-memory region a client could register with Triton."""
    region = multiprocessing.shared_memory.SharedMemory(create=True, size=4096, name=f"histoserve_test_{secrets.token_hex(4)}")
    try:
        yield f"/{region.name}"
    finally:
        region.close()
        region.unlink()


def admin_calls(client, shm_key: str) -> dict:
    """One call of each restricted RPC, by the name of Triton's gRPC method (the HTTP client's
    equivalents for HTTP). Each takes the headers to send."""
    return {
        "RepositoryIndex": lambda h: client.get_model_repository_index(headers=h),
        "RepositoryModelLoad": lambda h: client.load_model(MODEL, headers=h),
        "RepositoryModelUnload": lambda h: client.unload_model("no-such-model", headers=h),
        "ModelStatistics": lambda h: client.get_inference_statistics(MODEL, headers=h),
        "SystemSharedMemoryStatus": lambda h: client.get_system_shared_memory_status(headers=h),
        "SystemSharedMemoryRegister": lambda h: client.register_system_shared_memory("probe", shm_key, 4096, headers=h),
        "SystemSharedMemoryUnregister": lambda h: client.unregister_system_shared_memory("probe", headers=h),
        "CudaSharedMemoryStatus": lambda h: client.get_cuda_shared_memory_status(headers=h),
        "CudaSharedMemoryUnregister": lambda h: client.unregister_cuda_shared_memory("probe", headers=h),
        "TraceSetting (read)": lambda h: client.get_trace_settings(headers=h),
        "TraceSetting (update)": lambda h: client.update_trace_settings(settings={"trace_rate": "1000"}, headers=h),
        "LogSettings (read)": lambda h: client.get_log_settings(headers=h),
        "LogSettings (update)": lambda h: client.update_log_settings(settings={"log_verbose_level": 0}, headers=h),
    }


def outcome(call, headers) -> str:
    try:
        call(headers)
        return "ok"
    except InferenceServerException as error:
        return error.message() or str(error)


def refusals(client, key: AdminKey, shm_key: str, refused_message: str, headers_of) -> dict[str, list[str]]:
    """For each admin call: what happened with no key, a wrong key and the right key. A call may fail
    with the key for reasons of its own (a pinned pod's Triton allows no load/unload, a CPU server has no CUDA), but
    never with the refusal."""
    wrong = AdminKey.generate()
    problems: dict[str, list[str]] = {}
    for name, call in admin_calls(client, shm_key).items():
        mistakes = []
        for label, headers in (("no key", None), ("a wrong key", headers_of(wrong))):
            got = outcome(call, headers)
            if refused_message not in got:
                mistakes.append(f"with {label}: {got}")
        got = outcome(call, headers_of(key))
        if refused_message in got:
            mistakes.append(f"refused with the key: {got}")
        if mistakes:
            problems[name] = mistakes
    return problems


def test_every_admin_rpc_refuses_callers_without_the_key_over_grpc(manifest_server, shm_region):
    with grpcclient.InferenceServerClient(manifest_server.grpc_url) as client:
        problems = refusals(client, manifest_server.admin_key, shm_region, REFUSED_GRPC, AdminKey.grpc_headers)
        # the calls that must work with the key, do
        key = manifest_server.admin_key.grpc_headers()
        assert client.get_model_repository_index(headers=key).models
        assert client.get_inference_statistics(MODEL, headers=key).model_stats
        client.register_system_shared_memory("probe", shm_region, 4096, headers=key)
        assert client.get_system_shared_memory_status(headers=key).regions
        client.unregister_system_shared_memory("probe", headers=key)
    assert problems == {}


@pytest.fixture(scope="module")
def manifest_server_with_http(repository):
    """The same arguments with HTTP turned back on (as an overlay might) and verbose logging (the dev
    overlay's): the Deployment's own --http-restricted-api must then guard HTTP."""
    server = start_manifest_server(repository, extra=["--allow-http=true", "--log-verbose=1"])
    try:
        yield server
    finally:
        server.stop()


def test_with_http_turned_back_on_every_admin_api_refuses_callers_without_the_key(manifest_server_with_http, shm_region):
    server = manifest_server_with_http
    assert server.http_enabled
    client = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
    try:
        problems = refusals(client, server.admin_key, shm_region, REFUSED_HTTP, AdminKey.http_headers)
        assert client.get_inference_statistics(MODEL, headers=server.admin_key.http_headers())["model_stats"]
        assert client.get_model_config(MODEL)["name"] == MODEL  # open: the client's contract
        assert client.is_server_ready()
    finally:
        client.close()
    assert problems == {}
    assert server.admin_key.value not in server.log_text()  # verbose logging of every call, never the key


def test_the_deployment_serves_no_http_at_all(manifest_server):
    import socket

    with socket.socket() as http, pytest.raises(ConnectionRefusedError):
        http.connect(("127.0.0.1", manifest_server.ports.http))


def test_what_a_classifying_caller_needs_works_without_a_key(manifest_server, test_files):
    with grpcclient.InferenceServerClient(manifest_server.grpc_url) as client:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
        assert client.get_server_metadata().name == "triton"
        assert client.get_model_metadata(MODEL).inputs[0].datatype == "UINT8"
        assert client.get_model_config(MODEL).config.name == MODEL
    assert grpc_probe(manifest_server.grpc_url) == "SERVING"
    with TritonClassifier(manifest_server.grpc_url, MODEL) as classifier:  # reads its contract via model config
        results = list(classifier.classify_files(test_files[:20], top_k=2))
    assert all(r.ok for r in results) and len(results) == 20
    assert manifest_server.admin_key.value not in manifest_server.log_text()


def test_the_calls_tritons_stock_image_client_makes_work_without_a_key(manifest_server, test_files):
    """Triton's examples/image_client.py (-i grpc -s NONE): model metadata and config, its model checks,
    Pillow's bilinear resize to the input's H×W in the input's datatype, NCHW, infer with class_count.
    The script itself is not vendored here (it is code, and not in any wheel); these are its calls, in
    its order, over gRPC without a key, and its answers agree with our client's on real scans."""
    with grpcclient.InferenceServerClient(manifest_server.grpc_url) as client:
        metadata = client.get_model_metadata(model_name=MODEL, model_version="")
        config = client.get_model_config(model_name=MODEL, model_version="").config
        assert len(metadata.inputs) == len(metadata.outputs) == len(config.input) == 1
        assert metadata.outputs[0].datatype == "FP32"
        assert config.input[0].format == mc.ModelInput.FORMAT_NCHW and config.max_batch_size > 0
        _, c, h, w = metadata.inputs[0].shape
        dtype = triton_to_np_dtype(metadata.inputs[0].datatype)
        agreed = 0
        with TritonClassifier(manifest_server.grpc_url, MODEL) as ours:
            for path in test_files[:10]:
                pixels = np.array(Image.open(path).convert("RGB").resize((w, h), Image.BILINEAR)).astype(dtype)
                request = grpcclient.InferInput(metadata.inputs[0].name, [1, c, h, w], metadata.inputs[0].datatype)
                request.set_data_from_numpy(np.transpose(pixels, (2, 0, 1))[None])
                output = grpcclient.InferRequestedOutput(metadata.outputs[0].name, class_count=1)
                result = client.infer(MODEL, [request], outputs=[output])
                score, index, label = result.as_numpy(metadata.outputs[0].name)[0][0].decode().split(":")
                assert float(score) > 0 and label.isdigit()
                agreed += int(index) == ours.infer(preprocess_file(path, ours.spec)[None])[0][0].index
    assert agreed >= 8  # its resize is not ours (no crop, no antialias): most, not all, agree


def test_rollout_status_needs_the_admin_key(manifest_server):
    without = run_cli("-m", "histoserve.client", "rollout-status", "--url", manifest_server.grpc_url, "--model", MODEL, "--version", 1,
                      "--timeout", 5, check=False, env={**os.environ, "HISTOSERVE_ADMIN_KEY": ""})
    assert without.returncode == 2, without.stdout + without.stderr
    assert "REFUSED" in without.stdout and "no admin key was given" in without.stderr
    wrong = run_cli("-m", "histoserve.client", "rollout-status", "--url", manifest_server.grpc_url, "--model", MODEL, "--version", 1,
                    "--timeout", 5, check=False, env={**os.environ, "HISTOSERVE_ADMIN_KEY": AdminKey.generate().value})
    assert wrong.returncode == 2 and "the admin key is wrong" in wrong.stderr
    admitted = run_cli("-m", "histoserve.client", "rollout-status", "--url", manifest_server.grpc_url, "--model", MODEL, "--version", 1,
                       "--timeout", 30, "--admin-key-file", manifest_server.admin_key_file, check=False)
    assert admitted.returncode == 0 and "READY" in admitted.stdout, admitted.stdout + admitted.stderr
