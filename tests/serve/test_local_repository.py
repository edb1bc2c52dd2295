import os

from tritonclient.grpc import model_config_pb2 as mc

from export.repository import read_config
from serve.local_repository import derive_local_repository
from tests.conftest import MODEL


def test_local_derivative_runs_the_same_onnx_on_cpu_and_keeps_the_rest_of_the_config(repository, tmp_path):
    assert derive_local_repository(repository, tmp_path / "local") == [MODEL]
    production = read_config(repository / MODEL / "config.pbtxt")
    local = read_config(tmp_path / "local" / MODEL / "config.pbtxt")
    assert local.backend == "python"
    assert [(g.kind, g.count) for g in local.instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, 1)]
    for field in ("input", "output", "max_batch_size", "dynamic_batching", "parameters", "model_warmup", "version_policy"):
        assert getattr(local, field) == getattr(production, field), field
    linked = tmp_path / "local" / MODEL / "1" / "model.onnx"
    assert os.path.realpath(linked) == str((repository / MODEL / "1" / "model.onnx").resolve())
    assert (tmp_path / "local" / MODEL / "1" / "model.py").is_file()
