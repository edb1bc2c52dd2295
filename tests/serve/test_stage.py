"""`python -m histoserve.serve stage`: a pod's repository holds exactly one version, copied and proven intact
against the SHA256SUMS export wrote; any missing, altered or added file stops it, naming the file."""

import json
import os

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from histoserve.formats.preprocessing import preprocess_file
from histoserve.formats.repository_layout import config_to_text, contract_of, encoded_twins, read_config
from histoserve.formats.signing import SignatureError
from histoserve.formats.version import CHECKSUMS_FILE, GoldenAnswers, verify_checksums
from histoserve.serve.stage import STAGE_MARKER, StageError, stage
from tests.conftest import MODEL, run_cli, started_triton
from tests.publisher_keys import session_publisher
from tests.serve.published import copy_model, copy_version, republish, swap_labels


@pytest.fixture
def store(repository, tmp_path):
    """A writable copy of the digits model: the tests alter it as a careless or broken writer would."""
    copy_model(repository, MODEL, tmp_path / "store")
    return tmp_path / "store"


def test_a_published_version_is_staged_whole_with_its_own_config_and_labels(repository, store, tmp_path):
    staged = stage(store, MODEL, 1, tmp_path / "pod")
    model_dir = tmp_path / "pod" / MODEL
    published = repository / MODEL / "1"
    assert staged.folder == model_dir and staged.files == len(list(published.iterdir()))
    assert sorted(p.name for p in model_dir.iterdir()) == sorted([STAGE_MARKER, "1", "config.pbtxt", "configs", "labels.txt"])
    for name in os.listdir(published):
        assert (model_dir / "1" / name).read_bytes() == (published / name).read_bytes(), name
    assert (model_dir / "config.pbtxt").read_bytes() == (published / "config.pbtxt").read_bytes()
    assert (model_dir / "configs" / "cpu.pbtxt").read_bytes() == (published / "cpu.pbtxt").read_bytes()
    assert (model_dir / "labels.txt").read_bytes() == (published / "labels.txt").read_bytes()
    assert read_config(model_dir / "config.pbtxt").name == MODEL
    assert verify_checksums(model_dir / "1") == []


def test_the_version_brings_its_own_config_not_the_stores_current_one(store, tmp_path):
    """The model-level config.pbtxt follows the newest export; a pod of version 1 keeps version 1's."""
    current = store / MODEL / "config.pbtxt"
    current.write_text(current.read_text().replace("max_batch_size: 16", "max_batch_size: 4"))
    stage(store, MODEL, 1, tmp_path / "pod")
    assert read_config(tmp_path / "pod" / MODEL / "config.pbtxt").max_batch_size == 16


def flip_a_byte(folder):
    path = folder / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def edit_labels(folder):
    swap_labels(folder)


def remove_golden(folder):
    (folder / "golden.json").unlink()


def add_a_file(folder):
    (folder / "model.onnx.bak").write_bytes(b"left behind by hand")


def truncate_model(folder):
    path = folder / "model.onnx"
    path.write_bytes(path.read_bytes()[:1000])


@pytest.mark.parametrize("alter, file, problem", [
    (flip_a_byte, "model.onnx", "altered"),
    (truncate_model, "model.onnx", "altered"),
    (edit_labels, "labels.txt", "altered"),
    (remove_golden, "golden.json", "missing"),
    (add_a_file, "model.onnx.bak", "not in SHA256SUMS"),
], ids=lambda v: getattr(v, "__name__", v))
def test_a_missing_altered_or_added_file_stops_the_stage_naming_it(store, tmp_path, alter, file, problem):
    alter(store / MODEL / "1")
    with pytest.raises(StageError) as error:
        stage(store, MODEL, 1, tmp_path / "pod")
    assert f"{store / MODEL / '1' / file}: {problem}" in str(error.value)
    assert os.listdir(tmp_path / "pod") == []  # nothing half-staged for Triton to load


@pytest.mark.parametrize("content, message", [
    (None, f"{CHECKSUMS_FILE}: cannot read"),
    ("", "lists no file"),
    ("not a checksum line\n", "not a `sha256sum` line"),
    ("0" * 64 + "  ../../etc/passwd\n", "not a `sha256sum` line"),
])
def test_a_missing_or_malformed_checksums_file_stops_the_stage(store, tmp_path, content, message):
    sums = store / MODEL / "1" / CHECKSUMS_FILE
    if content is None:
        sums.unlink()
    else:
        sums.write_text(content)
    with pytest.raises(StageError, match=message.replace("`", ".")):
        stage(store, MODEL, 1, tmp_path / "pod")
    assert str(sums) in str(pytest.raises(StageError, stage, store, MODEL, 1, tmp_path / "pod").value)


def test_a_version_whose_files_check_out_but_belong_to_another_model_is_refused(store, tmp_path):
    version = store / MODEL / "1"
    (version / "cpu.pbtxt").write_text((version / "cpu.pbtxt").read_text().replace(f'name: "{MODEL}"', 'name: "other"'))
    republish(version)
    with pytest.raises(StageError, match=f"{version / 'cpu.pbtxt'}: name: the config is for model 'other'"):
        stage(store, MODEL, 1, tmp_path / "pod")


def test_golden_answers_for_another_version_are_refused(store, tmp_path):
    version = store / MODEL / "1"
    golden = version / "golden.json"
    golden.write_text(json.dumps({**json.loads(golden.read_text()), "version": 7}))
    republish(version)
    with pytest.raises(StageError, match="answers for digits version 7, not digits version 1"):
        stage(store, MODEL, 1, tmp_path / "pod")


def test_a_version_not_in_the_store_names_the_versions_there(store, tmp_path):
    with pytest.raises(StageError, match=r"digits/9: no such version in the store \(it holds versions 1\)"):
        stage(store, MODEL, 9, tmp_path / "pod")


def test_staging_again_replaces_its_own_earlier_copy_and_never_a_foreign_folder(store, tmp_path):
    pod = tmp_path / "pod"
    stage(store, MODEL, 1, pod)
    (pod / MODEL / "1" / "leftover").write_text("x")
    stage(store, MODEL, 1, pod)  # the init container again, after a pod restart
    assert not (pod / MODEL / "1" / "leftover").exists() and verify_checksums(pod / MODEL / "1") == []
    assert [p.name for p in pod.iterdir()] == [MODEL]
    foreign = tmp_path / "foreign"
    (foreign / MODEL).mkdir(parents=True)
    (foreign / MODEL / "notes.txt").write_text("mine")
    with pytest.raises(StageError, match="was not written by `serve stage`"):
        stage(store, MODEL, 1, foreign)
    assert (foreign / MODEL / "notes.txt").read_text() == "mine"


def test_the_stage_command_exits_1_naming_the_file_and_0_when_intact(store, tmp_path):
    args = ("-m", "histoserve.serve", "stage", "--store", store, "--model", MODEL, "--version", 1, "--trusted-keys", session_publisher()[1])
    flip_a_byte(store / MODEL / "1")
    failed = run_cli(*args, "--target", tmp_path / "bad", check=False)
    assert failed.returncode == 1
    assert f"{store / MODEL / '1' / 'model.onnx'}: altered" in failed.stderr
    republish(store / MODEL / "1")  # the flipped byte, now vouched for: only the golden answers can tell
    done = run_cli(*args, "--target", tmp_path / "good")
    assert "staged digits version 1" in done.stdout
    answers, inputs = GoldenAnswers.read(tmp_path / "good" / MODEL / "1")
    assert (answers.model, answers.version, len(inputs)) == (MODEL, 1, len(answers.top1))


@pytest.fixture
def store_with_twins(encoded_repository, tmp_path):
    """The digits model and its encoded twins (`python -m histoserve.export --encoded`), writable."""
    for name in (MODEL, *encoded_twins(MODEL)):
        copy_model(encoded_repository, name, tmp_path / "store")
    return tmp_path / "store"


def test_the_encoded_twins_are_staged_with_their_version_and_serve_from_the_pod_s_folder(store_with_twins, tmp_path, test_files):
    """What a pod's Triton then loads (--model-control-mode=none): the pixel model and, beside it, the
    encoded model answering a file as the pixel model answers the client's pixels."""
    pod = tmp_path / "pod"
    publisher, _ = session_publisher()
    staged = stage(store_with_twins, MODEL, 1, pod, trusted=[publisher.public])
    assert staged.twins == encoded_twins(MODEL) and staged.signed_by == publisher.public  # the twins are signed too
    assert sorted(p.name for p in pod.iterdir()) == sorted([MODEL, *encoded_twins(MODEL)])
    for name in encoded_twins(MODEL):
        assert verify_checksums(pod / name / "1") == []
        assert (pod / name / "config.pbtxt").read_bytes() == (store_with_twins / name / "1" / "config.pbtxt").read_bytes()
    assert (pod / f"{MODEL}-encoded" / "labels.txt").is_file()
    spec = contract_of(read_config(pod / MODEL / "config.pbtxt")).preprocess
    with started_triton(pod) as server, grpcclient.InferenceServerClient(server.grpc_url) as client:
        files = np.array([[path.read_bytes()] for path in test_files[:4]], dtype=np.object_)
        encoded = grpcclient.InferInput("image_file", list(files.shape), "BYTES")
        encoded.set_data_from_numpy(files)
        pixels = np.stack([preprocess_file(path, spec) for path in test_files[:4]])
        direct = grpcclient.InferInput("image", list(pixels.shape), "UINT8")
        direct.set_data_from_numpy(pixels)
        assert np.allclose(client.infer(f"{MODEL}-encoded", [encoded]).as_numpy("probabilities"),
                           client.infer(MODEL, [direct]).as_numpy("probabilities"), atol=1e-6, rtol=0)


def test_an_altered_twin_stops_the_stage_naming_its_file_and_leaves_nothing(store_with_twins, tmp_path):
    preprocess, _ = encoded_twins(MODEL)
    code = store_with_twins / preprocess / "1" / "model.py"
    code.write_text(code.read_text() + "\n# edited in the store\n")
    with pytest.raises(StageError, match=f"{code}: altered"):
        stage(store_with_twins, MODEL, 1, tmp_path / "pod")
    assert os.listdir(tmp_path / "pod") == []  # not even the pixel model, verified before it


def test_an_unsigned_twin_stops_the_stage_and_leaves_nothing(store_with_twins, tmp_path):
    _, encoded = encoded_twins(MODEL)
    (store_with_twins / encoded / "1" / "model.sig").unlink()
    with pytest.raises(SignatureError, match=f"{store_with_twins / encoded / '1' / 'model.sig'}: missing: the version is unsigned"):
        stage(store_with_twins, MODEL, 1, tmp_path / "pod", trusted=[session_publisher()[0].public])
    assert os.listdir(tmp_path / "pod") == []


def test_an_encoded_twin_whose_steps_call_another_version_is_refused(store_with_twins, tmp_path):
    _, encoded = encoded_twins(MODEL)
    version = store_with_twins / encoded / "1"
    config = read_config(version / "config.pbtxt")
    config.ensemble_scheduling.step[1].model_version = 2
    (version / "config.pbtxt").write_text(config_to_text(config))
    republish(version)
    with pytest.raises(StageError, match=r"its steps call version\(s\) \[2\], not 1"):
        stage(store_with_twins, MODEL, 1, tmp_path / "pod")


def test_a_signed_version_moved_to_another_number_or_model_is_refused(store_with_twins, tmp_path):
    """A writer of the store cannot forge a signature, but could move a signed folder: an older
    version under a newer number, or a twin of another version. identity.json, which the signature
    covers, says where each folder was published."""
    import shutil

    trusted = [session_publisher()[0].public]
    preprocess, _ = encoded_twins(MODEL)
    for name in (MODEL, *encoded_twins(MODEL)):
        shutil.copytree(store_with_twins / name / "1", store_with_twins / name / "2")
    with pytest.raises(StageError, match=rf"{MODEL}/2/identity\.json: published as {MODEL} version 1, not {MODEL} version 2"):
        stage(store_with_twins, MODEL, 2, tmp_path / "pod", trusted)
    shutil.rmtree(store_with_twins / MODEL / "2")
    copy_version(store_with_twins / MODEL, 1, 2)  # a real version 2, signed; its preprocess twin is still version 1's
    with pytest.raises(StageError, match=rf"{preprocess}/2/identity\.json: published as {preprocess} version 1"):
        stage(store_with_twins, MODEL, 2, tmp_path / "pod", trusted)
    assert os.listdir(tmp_path / "pod") == []


def test_a_folder_inside_a_version_is_refused_not_copied_or_skipped(store, tmp_path):
    (store / MODEL / "1" / "extra").mkdir()
    with pytest.raises(StageError, match=r"1/extra: not a file"):
        stage(store, MODEL, 1, tmp_path / "pod", [session_publisher()[0].public])
    assert os.listdir(tmp_path / "pod") == []
