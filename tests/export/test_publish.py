from pathlib import Path

import onnx
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from histoserve.export.publish import BatchingConfig, CpuTuning, TensorRTConfig, build_config, cpu_variant, publish
from histoserve.formats.preprocessing import PreprocessSpec
from histoserve.formats.repository_layout import RepositoryError, read_config, versions
from tests.conftest import MODEL


def test_exported_config_parses_with_triton_types_and_carries_the_contract(repository):
    config = read_config(repository / MODEL / "config.pbtxt")
    assert config.name == MODEL and config.backend == "onnxruntime"
    assert config.max_batch_size == 16
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
    [image] = config.input
    assert (image.name, image.data_type, image.format, list(image.dims)) == (
        "image", mc.TYPE_UINT8, mc.ModelInput.FORMAT_NCHW, [3, 32, 32])
    [probabilities] = config.output
    assert (probabilities.name, probabilities.data_type, list(probabilities.dims), probabilities.label_filename) == (
        "probabilities", mc.TYPE_FP32, [10], "labels.txt")
    parameters = {k: v.string_value for k, v in config.parameters.items()}
    assert PreprocessSpec.from_parameters(parameters) == PreprocessSpec(36, 32, "bilinear")
    assert parameters["color_mode"] == "RGB"
    assert [w.batch_size for w in config.model_warmup] == [1, 16]
    assert (repository / MODEL / "labels.txt").read_text().splitlines() == [str(d) for d in range(10)]


def test_every_published_config_gives_triton_latency_buckets_that_resolve_the_slo(repository, tmp_path):
    """config.pbtxt and its CPU variant (each version's own copies too) set the latency histogram's
    buckets; the thresholds the alerts, the canary analysis and the SLO rules compare against are
    bucket bounds. The local Triton (2.51) cannot read the field: its derivative drops it."""
    from histoserve.export.publish import LATENCY_BUCKETS_MS, LATENCY_HISTOGRAM_FAMILY
    from histoserve.serve.cpu_repository import sync_cpu_repository
    from tests.k8s.manifests import ROOT, render

    model = repository / MODEL
    for path in (model / "config.pbtxt", model / "configs" / "cpu.pbtxt", model / "1" / "config.pbtxt"):
        [control] = read_config(path).model_metrics.metric_control
        assert control.metric_identifier.family == LATENCY_HISTOGRAM_FAMILY, path
        assert tuple(control.histogram_options.buckets) == LATENCY_BUCKETS_MS, path
    objects = render("overlays/gpu-canary")
    serving = next(o for o in objects if o["kind"] == "AnalysisTemplate" and o["metadata"]["name"] == "triton-canary-serving")
    max_p99 = next(float(a["value"]) for a in serving["spec"]["args"] if a["name"] == "max-p99-ms")
    alert = next(r for o in objects if o["kind"] == "PrometheusRule" and o["metadata"]["name"] == "triton"
                 for g in o["spec"]["groups"] for r in g["rules"] if r.get("alert") == "TritonP99LatencyHigh")
    slo = (ROOT / "k8s" / "components" / "gateway-grpc" / "slo-rules.yaml").read_text()
    assert max_p99 in LATENCY_BUCKETS_MS and float(alert["expr"].split(">")[-1]) in LATENCY_BUCKETS_MS
    assert r'le=~"500(\\.0)?"' in slo and 500 in LATENCY_BUCKETS_MS  # Prometheus 2 and 3 spellings of le
    sync_cpu_repository(repository, tmp_path / "local")
    assert not read_config(tmp_path / "local" / MODEL / "config.pbtxt").HasField("model_metrics")


def test_the_cpu_variant_carries_the_cpu_tuning_in_the_onnxruntime_backends_terms(repository):
    gpu = read_config(repository / MODEL / "config.pbtxt")
    cpu = read_config(repository / MODEL / "configs" / "cpu.pbtxt")
    assert [(g.kind, g.count) for g in cpu.instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, CpuTuning.instance_count)]
    parameters = {k: v.string_value for k, v in cpu.parameters.items()}
    assert (parameters["intra_op_thread_count"], parameters["inter_op_thread_count"], parameters["execution_mode"]) == (
        str(CpuTuning.intra_op_threads), "1", "0")
    assert cpu.dynamic_batching.max_queue_delay_microseconds == CpuTuning.max_queue_delay_us
    assert gpu.dynamic_batching.max_queue_delay_microseconds == 2000  # the fixture's --max-queue-delay-us: GPU only
    for field in ("instance_group", "dynamic_batching", "parameters"):
        gpu.ClearField(field), cpu.ClearField(field)
    assert gpu == cpu


def test_cpu_tuning_and_preferred_batch_sizes_are_written_and_checked():
    config = build_config("m", 3, PreprocessSpec(36, 32), BatchingConfig(16, 100, 2, (4, 8)))
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    cpu = cpu_variant(config, CpuTuning(instance_count=3, intra_op_threads=4, max_queue_delay_us=0, preferred_batch_sizes=(2,)))
    assert [(g.kind, g.count) for g in cpu.instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, 3)]
    assert list(cpu.dynamic_batching.preferred_batch_size) == [2] and cpu.dynamic_batching.max_queue_delay_microseconds == 0
    assert cpu.parameters["intra_op_thread_count"].string_value == "4"
    with pytest.raises(RepositoryError, match="preferred batch sizes"):
        build_config("m", 3, PreprocessSpec(36, 32), BatchingConfig(8, 100, 1, (16,)))


def test_tensorrt_accelerator_round_trips_through_config_pbtxt_and_stays_off_cpu(tmp_path):
    config = build_config("m-int8", 3, PreprocessSpec(256, 224), BatchingConfig(16, 100), precision="int8",
                          tensorrt=TensorRTConfig("INT8", 1 << 31, "/cache/trt"))
    publish(tmp_path, config, ["a", "b", "c"], fake_model_file(tmp_path))
    written = read_config(tmp_path / "m-int8" / "config.pbtxt")
    [accelerator] = written.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    assert dict(accelerator.parameters) == {
        "precision_mode": "INT8", "max_workspace_size_bytes": str(1 << 31),
        "trt_engine_cache_enable": "1", "trt_engine_cache_path": "/cache/trt",
        "trt_timing_cache_enable": "1", "trt_timing_cache_path": "/cache/trt",
        "trt_profile_min_shapes": "image:1x3x224x224", "trt_profile_opt_shapes": "image:16x3x224x224",
        "trt_profile_max_shapes": "image:16x3x224x224",
    }
    assert [w.batch_size for w in written.model_warmup] == [1, 16]  # the engine is built before the model is ready
    assert written.parameters["precision"].string_value == "int8"
    cpu = read_config(tmp_path / "m-int8" / "configs" / "cpu.pbtxt")
    assert not cpu.HasField("optimization")
    with pytest.raises(RepositoryError, match="TensorRT precision"):
        build_config("m", 3, PreprocessSpec(36, 32), tensorrt=TensorRTConfig("BF16"))


def test_exported_onnx_takes_uint8_with_a_dynamic_batch_and_returns_fp32(repository):
    model = onnx.load(str(repository / MODEL / "1" / "model.onnx"))
    [graph_input], [graph_output] = model.graph.input, model.graph.output
    assert (graph_input.name, graph_output.name) == ("image", "probabilities")
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert graph_output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    batch, *rest = graph_input.type.tensor_type.shape.dim
    assert batch.dim_param and not batch.dim_value
    assert [d.dim_value for d in rest] == [3, 32, 32]


def small_config(name="m", crop=32, classes=3):
    return build_config(name, classes, PreprocessSpec(crop + 4, crop), BatchingConfig(8, 100))


def fake_model_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"publish copies bytes; it is export's job to check them")
    return path


def test_versions_are_numbered_and_published_whole(tmp_path):
    repo, onnx_file = tmp_path / "repo", fake_model_file(tmp_path)
    assert publish(repo, small_config(), ["a", "b", "c"], onnx_file).name == "1"
    (repo / "m" / "3").mkdir()
    (repo / "m" / "3" / "model.onnx").write_bytes(b"x")
    assert publish(repo, small_config(), ["a", "b", "c"], onnx_file).name == "4"
    assert versions(repo / "m") == [1, 3, 4]
    assert sorted(p.name for p in (repo / "m").iterdir()) == ["1", "3", "4", "config.pbtxt", "configs", "labels.txt"]
    assert (repo / "m" / "4" / "model.onnx").read_bytes() == onnx_file.read_bytes()


def test_existing_versions_are_immutable(tmp_path):
    repo, onnx_file = tmp_path / "repo", fake_model_file(tmp_path)
    publish(repo, small_config(), ["a", "b", "c"], onnx_file, version=2)
    with pytest.raises(RepositoryError, match="immutable"):
        publish(repo, small_config(), ["a", "b", "c"], onnx_file, version=2)


@pytest.mark.parametrize("config, labels, what", [
    (small_config(), ["a", "b", "x"], "labels"),
    (small_config(crop=48), ["a", "b", "c"], "preprocess"),
])
def test_a_new_version_cannot_change_the_contract_of_a_model(tmp_path, config, labels, what):
    repo, onnx_file = tmp_path / "repo", fake_model_file(tmp_path)
    publish(repo, small_config(), ["a", "b", "c"], onnx_file)
    before = (repo / "m" / "config.pbtxt").read_text()
    with pytest.raises(RepositoryError, match=what):
        publish(repo, config, labels, onnx_file)
    assert (repo / "m" / "config.pbtxt").read_text() == before and versions(repo / "m") == [1]


@pytest.mark.parametrize("name", ["bad name", "-x", "a/b", ""])
def test_model_names_triton_cannot_use_are_refused(name):
    with pytest.raises(RepositoryError):
        small_config(name=name)


def test_an_unchanged_config_is_not_rewritten_by_a_new_version(tmp_path):
    """A polling Triton reloads a model whose config.pbtxt changes on disk."""
    import os

    repo, onnx_file = tmp_path / "repo", fake_model_file(tmp_path)
    publish(repo, small_config(), ["a", "b", "c"], onnx_file)
    config = repo / "m" / "config.pbtxt"
    os.utime(config, (1_000_000, 1_000_000))
    publish(repo, small_config(), ["a", "b", "c"], onnx_file)
    assert config.stat().st_mtime == 1_000_000
