import os
import shutil

from tritonclient.grpc import model_config_pb2 as mc

from histoserve.export.publish import publish
from histoserve.formats.repository_layout import config_to_text, encoded_twins, read_config
from histoserve.serve.cpu_repository import sync_cpu_repository
from tests.conftest import MODEL


def test_encoded_models_and_their_preprocessing_run_as_exported(encoded_repository, tmp_path):
    pixel_models = [MODEL, f"{MODEL}-int8"]
    twins = [name for model in pixel_models for name in encoded_twins(model)]
    assert sync_cpu_repository(encoded_repository, tmp_path / "local") == sorted(pixel_models + twins)
    for name in twins:  # file for file: their configs (but the latency buckets 2.51 cannot read) and version folders
        local, published = tmp_path / "local" / name, encoded_repository / name
        config = read_config(published / "config.pbtxt")
        assert config.HasField("model_metrics")
        config.ClearField("model_metrics")
        assert (local / "config.pbtxt").read_text() == config_to_text(config)
        assert sorted(p.name for p in (local / "1").iterdir()) == sorted(p.name for p in (published / "1").iterdir())
        assert all(os.path.realpath(p) == str((published / "1" / p.name).resolve()) for p in (local / "1").iterdir())


def test_local_derivative_runs_the_same_onnx_and_the_cpu_config(repository, tmp_path):
    assert sync_cpu_repository(repository, tmp_path / "local") == [MODEL, f"{MODEL}-int8"]
    cpu = read_config(repository / MODEL / "configs" / "cpu.pbtxt")
    local = read_config(tmp_path / "local" / MODEL / "config.pbtxt")
    assert local.backend == "python"
    assert [(g.kind, g.count) for g in local.instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, 1)]
    for field in ("input", "output", "max_batch_size", "dynamic_batching", "parameters", "model_warmup", "version_policy"):
        assert getattr(local, field) == getattr(cpu, field), field
    assert local.parameters["intra_op_thread_count"].string_value == cpu.parameters["intra_op_thread_count"].string_value
    linked = tmp_path / "local" / MODEL / "1" / "model.onnx"
    assert os.path.realpath(linked) == str((repository / MODEL / "1" / "model.onnx").resolve())
    assert (tmp_path / "local" / MODEL / "1" / "model.py").is_file()


def test_sync_follows_published_and_removed_versions_and_leaves_unchanged_configs_alone(repository, tmp_path):
    repo, local = tmp_path / "repo", tmp_path / "local"
    shutil.copytree(repository, repo)
    sync_cpu_repository(repo, local)
    config_mtime = (local / MODEL / "config.pbtxt").stat().st_mtime_ns
    config = read_config(repo / MODEL / "config.pbtxt")
    labels = (repo / MODEL / "labels.txt").read_text().splitlines()
    publish(repo, config, labels, repo / MODEL / "1" / "model.onnx")
    sync_cpu_repository(repo, local)
    assert sorted(p.name for p in (local / MODEL).iterdir() if not p.name.startswith(".")) == ["1", "2", "config.pbtxt", "labels.txt"]
    assert os.path.realpath(local / MODEL / "2" / "model.onnx") == str((repo / MODEL / "2" / "model.onnx").resolve())
    assert (local / MODEL / "config.pbtxt").stat().st_mtime_ns == config_mtime  # Triton would reload on a touch
    shutil.rmtree(repo / MODEL / "1")
    sync_cpu_repository(repo, local)
    assert not (local / MODEL / "1").exists() and (local / MODEL / "2" / "model.py").is_file()
    assert not [p for p in (local / MODEL).iterdir() if p.name.startswith(".staging")]


def test_local_derivative_keeps_the_cpu_instance_count_and_reads_config_pbtxt_without_a_cpu_config(repository, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(repository / MODEL, repo / MODEL)
    config = read_config(repo / MODEL / "configs" / "cpu.pbtxt")
    config.instance_group[0].count = 2
    (repo / MODEL / "configs" / "cpu.pbtxt").write_text(config_to_text(config))
    sync_cpu_repository(repo, tmp_path / "local")
    local = read_config(tmp_path / "local" / MODEL / "config.pbtxt")
    assert [(g.kind, g.count) for g in local.instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, 2)]
    shutil.rmtree(repo / MODEL / "configs")
    sync_cpu_repository(repo, tmp_path / "local")
    local = read_config(tmp_path / "local" / MODEL / "config.pbtxt")
    assert "intra_op_thread_count" not in local.parameters  # config.pbtxt (the GPU config) sets no CPU threads
    assert [(g.kind, g.count) for g in local.instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, 1)]
