"""The encoded model against the real Triton: image files in, exactly what the Python client gets out.

The server-side step's tensor is compared with the client's, pixel for pixel, for every file of the
digits test split and a corpus of awkward files; the encoded model's probabilities with the pixel
model's fed by the client (FP32, INT8 and FP16 twins); its classification output with the Python
client's; and files that cannot be used fail their own request, never their neighbours in a batch.
"""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from histoserve.client.classifier import TritonClassifier
from histoserve.formats.preprocessing import preprocess_file
from histoserve.formats.repository_layout import config_to_text, contract_of, read_config
from tests.conftest import MODEL, run_cli, started_triton
from tests.odd_images import unusable_files, write_odd_images

MAX_FILE_BYTES = 2_000_000  # this module's limit (the export default is 64 MiB): an oversize file is cheap to make
BATCH = 16


@pytest.fixture(scope="module")
def store(encoded_repository, trained_run, tmp_path_factory):
    """The session's models and twins, an FP16 model with its twin (`python -m histoserve.export --encoded`), and
    a lower file-size limit."""
    store = tmp_path_factory.mktemp("encoded-store")
    for model in sorted(p.name for p in encoded_repository.iterdir()):
        shutil.copytree(encoded_repository / model, store / model)
    run_cli("-m", "histoserve.export", trained_run / "checkpoint.pt", "--repository", store, "--name", MODEL, "--max-batch-size", BATCH,
            "--precision", "fp16", "--encoded")
    config_file = store / f"{MODEL}-preprocess" / "config.pbtxt"
    config = read_config(config_file)
    config.parameters["max_file_bytes"].string_value = str(MAX_FILE_BYTES)
    config_file.write_text(config_to_text(config))
    return store


@pytest.fixture(scope="module")
def triton(store):
    with started_triton(store) as server:
        yield server


@pytest.fixture(scope="module")
def files(test_files, tmp_path_factory) -> list:
    odd = write_odd_images(tmp_path_factory.mktemp("odd"))
    return [*test_files, *odd.values()]


def file_tensor(paths) -> grpcclient.InferInput:
    data = np.array([[p.read_bytes()] for p in paths], dtype=np.object_)
    tensor = grpcclient.InferInput("image_file", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    return tensor


def chunks(items, size=BATCH):
    return [items[i:i + size] for i in range(0, len(items), size)]


def spec_of(store, model=MODEL):
    return contract_of(read_config(store / model / "config.pbtxt")).preprocess


def test_the_server_side_step_gives_the_client_s_pixels_for_every_file(triton, store, files):
    spec = spec_of(store)
    different = []
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        for group in chunks(files):
            served = client.infer(f"{MODEL}-preprocess", [file_tensor(group)]).as_numpy("image")
            for path, pixels in zip(group, served, strict=True):
                if not np.array_equal(pixels, preprocess_file(path, spec)):
                    different.append(path.name)
    assert len(files) > 270 and different == []  # the 270 test files and the 13 awkward ones


@pytest.mark.parametrize("pixel_model", [MODEL, f"{MODEL}-int8", f"{MODEL}-fp16"])
def test_the_encoded_model_answers_as_its_pixel_model_fed_by_the_client(triton, store, files, pixel_model):
    spec = spec_of(store, pixel_model)
    worst = 0.0
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        for group in chunks(files):
            encoded = client.infer(f"{pixel_model}-encoded", [file_tensor(group)]).as_numpy("probabilities")
            pixels = np.stack([preprocess_file(p, spec) for p in group])
            tensor = grpcclient.InferInput("image", list(pixels.shape), "UINT8")
            tensor.set_data_from_numpy(pixels)
            direct = client.infer(pixel_model, [tensor]).as_numpy("probabilities")
            worst = max(worst, float(np.abs(encoded - direct).max()))
    assert worst <= 1e-6


def test_its_classification_output_is_the_python_client_s(triton, files):
    with TritonClassifier(triton.grpc_url, MODEL) as classifier:
        expected = [[(p.label, p.index, round(p.score, 4)) for p in result.predictions]
                    for result in classifier.classify_files(files, top_k=3)]
    got = []
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        for group in chunks(files):
            rows = client.infer(f"{MODEL}-encoded", [file_tensor(group)],
                                outputs=[grpcclient.InferRequestedOutput("probabilities", class_count=3)]).as_numpy("probabilities")
            for row in rows:
                got.append([(label, int(index), round(float(score), 4))
                            for score, index, label in (entry.decode().split(":", 2) for entry in row)])
    assert got == expected


def test_a_file_that_cannot_be_used_fails_its_own_request_and_no_other(triton, store, files, tmp_path):
    big = tmp_path / "oversize.bmp"  # an uncompressed 1200×600 BMP: over this store's 2 MB limit
    from PIL import Image

    Image.new("RGB", (1200, 600), (120, 80, 40)).save(big)
    bad = {name: data for name, (data, _) in unusable_files(next(f for f in files if f.name == "slide_patch.png")).items()}
    bad["oversize"] = big.read_bytes()
    expected = {name: phrase for name, (_, phrase) in unusable_files(next(f for f in files if f.name == "slide_patch.png")).items()}
    expected["oversize"] = f"over the limit of {MAX_FILE_BYTES}"
    good = [f for f in files if f.suffix == ".png"][:24]
    outcomes, start = {}, threading.Barrier(len(bad) + len(good))

    def send(name, data):
        tensor = grpcclient.InferInput("image_file", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[data]], dtype=np.object_))
        with grpcclient.InferenceServerClient(triton.grpc_url) as client:
            start.wait()  # all at once: the batcher puts good and bad files in the same executions
            try:
                outcomes[name] = ("ok", client.infer(f"{MODEL}-encoded", [tensor]).as_numpy("probabilities").shape)
            except InferenceServerException as error:
                outcomes[name] = (error.status(), error.message())

    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        before = client.get_inference_statistics(f"{MODEL}-preprocess", headers=triton.admin_key.grpc_headers(), as_json=True)
    threads = [threading.Thread(target=send, args=(name, data)) for name, data in bad.items()]
    threads += [threading.Thread(target=send, args=(f"good-{i}", path.read_bytes())) for i, path in enumerate(good)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for name, phrase in expected.items():
        status, message = outcomes[name]
        assert status == "StatusCode.INVALID_ARGUMENT" and phrase in message and "image_file[0]" in message, (name, outcomes[name])
    assert all(outcomes[f"good-{i}"] == ("ok", (1, 10)) for i in range(len(good))), outcomes
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        after = client.get_inference_statistics(f"{MODEL}-preprocess", headers=triton.admin_key.grpc_headers(), as_json=True)
        assert client.is_server_live() and client.is_model_ready(f"{MODEL}-encoded")
    stats = [(s.get("inference_count", 0), s.get("execution_count", 0)) for s in (before["model_stats"][0], after["model_stats"][0])]
    inferences, executions = (int(a) - int(b) for a, b in zip(stats[1], stats[0], strict=True))
    assert executions < inferences  # bad and good files shared executions, and only the bad ones failed
